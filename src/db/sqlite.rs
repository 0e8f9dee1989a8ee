//! SQLite connections: one writer, a few readers, and write transactions that send their
//! statements in as few trips as possible.
//!
//! sqlx runs each SQLite statement on the connection's worker thread, so every statement is a
//! round trip between that thread and the async runtime; a pooled connection adds a ping when it
//! is returned to the pool (and, by default, another when it is checked out). On a busy 2-core
//! machine those hops, not the SQL, are what a query costs. So the connections are owned here,
//! outside any pool: the writer behind an async mutex, the readers taken in turn. A [`SqliteTx`]
//! collects statements whose results nobody reads ([`SqliteTx::defer`]) and sends them together
//! with `BEGIN IMMEDIATE`, the next read, or `COMMIT` as one multi-statement query, so a
//! group-commit batch that only inserts is one send. Such sends in a transaction, which read no
//! rows (or only a column of text, [`SqliteTx::fetch_texts`]), skip sqlx's thread: they run
//! directly on the task that holds the writer (see [`super::direct`]), unless they bind many
//! arguments or the database is in memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor, SqliteConnection};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

use super::direct::{DirectError, DualConnection, Part};
use super::{Arg, Row};

/// The writer connection, used through sqlx or directly (see [`super::direct`]), and whether a
/// dropped transaction left it inside a transaction.
pub struct WriterConnection {
    conn: DualConnection,
    /// A transaction was dropped without commit or rollback; roll back before the next use.
    needs_rollback: bool,
}

/// The shared handle to SQLite's writer connection.
#[derive(Clone)]
pub struct SqliteWriter {
    inner: Arc<Mutex<WriterConnection>>,
    checkpoints: Arc<CheckpointSignal>,
    /// Stops the checkpointer when the last handle goes.
    _stop_on_drop: Arc<StopCheckpointer>,
}

/// What the writer tells its checkpointer.
#[derive(Default)]
struct CheckpointSignal {
    /// Woken by every commit (the checkpointer has work) and by a stop.
    wake: Notify,
    stopped: std::sync::atomic::AtomicBool,
}

impl CheckpointSignal {
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// Stops the checkpointer when dropped.
struct StopCheckpointer(Arc<CheckpointSignal>);

impl Drop for StopCheckpointer {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl std::fmt::Debug for SqliteWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteWriter")
    }
}

impl SqliteWriter {
    /// Wraps an open connection (with a shared cache, as in-memory databases are, if
    /// `shared_cache`).
    pub fn new(conn: SqliteConnection, shared_cache: bool) -> Self {
        let checkpoints = Arc::new(CheckpointSignal::default());
        Self {
            inner: Arc::new(Mutex::new(WriterConnection {
                conn: DualConnection::new(conn, super::BUSY_TIMEOUT, shared_cache),
                needs_rollback: false,
            })),
            _stop_on_drop: Arc::new(StopCheckpointer(checkpoints.clone())),
            checkpoints,
        }
    }

    /// Checkpoints the WAL on a connection of its own (opened with `options`) whenever commits
    /// have added to it, so that no commit waits for a checkpoint's fsyncs (the writer runs with
    /// `wal_autocheckpoint = 0`). Ends when the writer is closed or dropped.
    pub fn spawn_checkpointer(&self, options: SqliteConnectOptions) {
        let writer = Arc::downgrade(&self.inner);
        let signal = self.checkpoints.clone();
        // Waiting for readers to leave the WAL must not hold commits back for long.
        let options = options.busy_timeout(std::time::Duration::from_millis(200));
        tokio::spawn(async move {
            let mut conn: Option<SqliteConnection> = None;
            let mut failing = false;
            loop {
                signal.wake.notified().await;
                if signal.stopped.load(Ordering::SeqCst) {
                    break;
                }
                // Let a few commits gather: the hot pages they share are copied once.
                tokio::time::sleep(CHECKPOINT_DELAY).await;
                let Some(writer) = writer.upgrade() else {
                    break;
                };
                match checkpoint_once(&options, &mut conn, &writer).await {
                    Ok(()) => failing = false,
                    Err(e) => {
                        // Reconnect next time; say so once per run of failures, not every pass.
                        conn = None;
                        if !failing {
                            tracing::warn!(error = %e, "checkpointing the WAL failed; retrying after the next commit");
                        }
                        failing = true;
                        // Come back even if no commit follows.
                        signal.wake.notify_one();
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
            if let Some(conn) = conn {
                let _ = conn.close().await;
            }
        });
    }

    /// Waits for the connection, first undoing whatever a dropped transaction left open.
    async fn lock(&self) -> Result<HeldWriter, sqlx::Error> {
        let mut held = HeldWriter::take(&self.inner, "transaction").await;
        if held.needs_rollback {
            roll_back(&mut held).await?;
            held.needs_rollback = false;
        }
        Ok(held)
    }

    /// Starts a write transaction. Nothing is sent, and the connection is not even taken, until
    /// the first statement must run: a batch builds its statements while the previous batch
    /// holds the connection.
    pub fn begin(&self) -> SqliteTx {
        SqliteTx {
            writer: self.clone(),
            conn: None,
            pending: String::from(BEGIN),
            ends: vec![(BEGIN.len(), 0)],
            args: Vec::new(),
            sent: false,
            poisoned: false,
            direct_most_arguments: DIRECT_MOST_ARGUMENTS,
        }
    }

    /// Runs one statement on its own (autocommit); returns the rows it affected.
    pub async fn execute(&self, sql: &str, args: Vec<Arg>) -> Result<u64, sqlx::Error> {
        // Through sqlx's thread: one statement may touch thousands of rows (retention, a
        // limit's waiting deliveries made due), which run directly would hold a runtime thread.
        let mut guard = self.lock().await?;
        let query = bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql)), args);
        let affected = query.execute(guard.conn.sqlx()).await?.rows_affected();
        self.checkpoints.wake.notify_one();
        Ok(affected)
    }

    /// Closes the connection (checkpointing the WAL).
    pub async fn close(&self) {
        self.checkpoints.stop();
        // A closed connection cannot be taken out of the mutex; a checkpoint is what closing
        // buys, so ask for it directly and leave the handle to be dropped with the process.
        if let Ok(mut guard) = self.lock().await {
            let _ = guard.conn.sqlx().execute("PRAGMA wal_checkpoint(PASSIVE)").await;
        }
    }
}

/// The writer connection while one task holds it; how long it was held is measured, since
/// every other write waits that long.
struct HeldWriter {
    guard: OwnedMutexGuard<WriterConnection>,
    since: std::time::Instant,
    /// What held it: a `transaction`, or the `checkpoint` that restarts the WAL.
    by: &'static str,
}

impl HeldWriter {
    /// Waits for the writer connection and holds it for `by`.
    async fn take(writer: &Arc<Mutex<WriterConnection>>, by: &'static str) -> Self {
        let guard = writer.clone().lock_owned().await;
        Self {
            guard,
            since: std::time::Instant::now(),
            by,
        }
    }
}

impl std::ops::Deref for HeldWriter {
    type Target = WriterConnection;
    fn deref(&self) -> &WriterConnection {
        &self.guard
    }
}

impl std::ops::DerefMut for HeldWriter {
    fn deref_mut(&mut self) -> &mut WriterConnection {
        &mut self.guard
    }
}

impl Drop for HeldWriter {
    fn drop(&mut self) {
        metrics::histogram!("opsiq_sqlite_writer_held_seconds", "by" => self.by)
            .record(self.since.elapsed().as_secs_f64());
    }
}

/// The name of the writer connection's thread.
pub const WRITER_THREAD: &str = "sqlite-writer";

/// Gives every SQLite writer thread of this process (one per open database) the scheduling
/// priority `nice`; returns how many it changed. Every write waits for that one thread, so when
/// it is preempted by the process's other threads, all of them wait: at 2,000 gateway calls/s a
/// writer at nice -5 cut the calls' p99 by about a fifth. A negative value needs root,
/// `CAP_SYS_NICE` or a `RLIMIT_NICE` that allows it; elsewhere than Linux nothing changes.
pub fn prioritize_writer_threads(nice: i32) -> std::io::Result<usize> {
    #[cfg(target_os = "linux")]
    {
        let mut changed = 0;
        for task in std::fs::read_dir("/proc/self/task")? {
            let task = task?;
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if name.trim_end() != WRITER_THREAD {
                continue;
            }
            let tid = task.file_name().to_str().and_then(|t| t.parse::<i32>().ok());
            let Some(pid) = tid.and_then(rustix::process::Pid::from_raw) else {
                continue;
            };
            match rustix::process::setpriority_process(Some(pid), nice) {
                Ok(()) => changed += 1,
                // The thread ended (its database closed) since it was listed.
                Err(rustix::io::Errno::SRCH) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(changed)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = nice;
        Ok(0)
    }
}

/// SQLite's read-only connections, opened on first use and taken in turn.
#[derive(Clone)]
pub struct SqliteReaders {
    inner: Arc<ReadersInner>,
}

struct ReadersInner {
    options: SqliteConnectOptions,
    connections: Vec<Arc<Mutex<Option<SqliteConnection>>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for SqliteReaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqliteReaders({})", self.inner.connections.len())
    }
}

impl SqliteReaders {
    /// Up to `count` read-only connections with `options`.
    pub fn new(options: SqliteConnectOptions, count: usize) -> Self {
        Self {
            inner: Arc::new(ReadersInner {
                options: options.read_only(true),
                connections: (0..count.max(1)).map(|_| Arc::new(Mutex::new(None))).collect(),
                next: AtomicUsize::new(0),
            }),
        }
    }

    /// A free connection if there is one, else the next in turn once it is free.
    pub async fn get(&self) -> Result<ReaderConnection, sqlx::Error> {
        let inner = &*self.inner;
        let count = inner.connections.len();
        let start = inner.next.fetch_add(1, Ordering::Relaxed);
        let free = (0..count).find_map(|k| {
            inner.connections[(start + k) % count]
                .clone()
                .try_lock_owned()
                .ok()
        });
        let mut guard = match free {
            Some(guard) => guard,
            None => inner.connections[start % count].clone().lock_owned().await,
        };
        if guard.is_none() {
            *guard = Some(inner.options.connect().await?);
        }
        Ok(ReaderConnection(guard))
    }

    /// Closes every connection.
    pub async fn close(&self) {
        for slot in self.inner.connections.iter() {
            if let Some(conn) = slot.lock().await.take() {
                let _ = conn.close().await;
            }
        }
    }
}

/// One reader connection, held for one query.
pub struct ReaderConnection(OwnedMutexGuard<Option<SqliteConnection>>);

impl std::ops::Deref for ReaderConnection {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        self.0.as_ref().expect("opened in `get`")
    }
}

impl std::ops::DerefMut for ReaderConnection {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.0.as_mut().expect("opened in `get`")
    }
}

/// How long the checkpointer lets commits gather before it copies them into the database.
const CHECKPOINT_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// WAL pages past which the checkpointer briefly holds commits back to let the WAL start over.
const WAL_RESTART_PAGES: i64 = 4000;

/// One round of checkpointing on `conn` (connecting first if needed).
async fn checkpoint_once(
    options: &SqliteConnectOptions,
    conn: &mut Option<SqliteConnection>,
    writer: &Arc<Mutex<WriterConnection>>,
) -> Result<(), sqlx::Error> {
    let conn = match conn {
        Some(conn) => conn,
        None => conn.insert(options.connect().await?),
    };
    let wal_pages = checkpoint(conn, "PASSIVE").await?;
    // The WAL starts over only at a commit that finds all of it copied and no reader in it;
    // under steady load commits keep landing while a checkpoint runs, so it would only grow.
    // Past a limit, copy the last frames and wait for readers to leave while no commit can run:
    // the next commit then reuses the WAL from its start.
    if wal_pages >= WAL_RESTART_PAGES {
        // Copy what came in during the pass above first, while commits still run: every write
        // waits for the restart, so it should find little left to copy.
        checkpoint(conn, "PASSIVE").await?;
        let _writer = HeldWriter::take(writer, "checkpoint").await;
        checkpoint(conn, "RESTART").await?;
    }
    Ok(())
}

/// Runs a checkpoint in `mode`; returns the WAL's size in pages when it began (-1 if another
/// checkpoint was running).
async fn checkpoint(conn: &mut SqliteConnection, mode: &'static str) -> Result<i64, sqlx::Error> {
    let started = std::time::Instant::now();
    let sql = format!("PRAGMA wal_checkpoint({mode})");
    let (_busy, wal_pages, _copied): (i64, i64, i64) =
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_one(conn).await?;
    metrics::histogram!("opsiq_sqlite_checkpoint_seconds", "mode" => mode)
        .record(started.elapsed().as_secs_f64());
    Ok(wal_pages)
}

/// Sends `script` from `tx` (see [`SqliteTx::send_all_but_last`]) and runs its last statement
/// as `$query(…).$run(connection)`.
macro_rules! send_script {
    ($tx:expr, $script:expr, $query:path, $run:ident) => {
        async {
            let script = $tx.send_all_but_last($script).await?;
            bind_all!($query(sqlx::AssertSqlSafe(script.text)), script.args)
                .$run($tx.sqlx_conn().await?)
                .await
        }
        .await
    };
}

/// What a transaction sends first (with its first statements, in the same script).
const BEGIN: &str = "BEGIN IMMEDIATE\n;\n";

/// A write transaction on SQLite's writer connection. Dropped uncommitted, it is rolled back
/// before the connection is next used.
pub struct SqliteTx {
    writer: SqliteWriter,
    /// Taken at the first send and held until the transaction ends.
    conn: Option<HeldWriter>,
    /// Statements not yet sent (the first send also carries `BEGIN IMMEDIATE`).
    pending: String,
    /// Where each statement of `pending` ends: (text, arguments), after its separator.
    ends: Vec<(usize, usize)>,
    /// The arguments of `pending`, numbered across all of its statements.
    args: Vec<Arg>,
    /// Whether anything was sent, i.e. whether there is a transaction to end.
    sent: bool,
    /// A send failed or was cancelled part way: the transaction may be gone, so nothing more may
    /// run in it (it would run outside any transaction); it can only be rolled back.
    poisoned: bool,
    /// Scripts binding more arguments go through sqlx's thread.
    direct_most_arguments: usize,
}

/// Scripts up to this long are sent whole and kept prepared (the batches of light load, where a
/// round trip matters most); longer ones, whose text varies with the mix of a batch, are sent
/// statement by statement, each kept prepared (see [`SqliteTx::send_all_but_last`]).
const CACHED_SCRIPT_BYTES: usize = 4096;

impl SqliteTx {
    /// The writer connection, taken at the first send.
    async fn writer(&mut self) -> Result<&mut WriterConnection, sqlx::Error> {
        let guard = match self.conn {
            Some(ref mut guard) => guard,
            None => self.conn.insert(self.writer.lock().await?),
        };
        Ok(guard)
    }

    /// The writer connection, for sqlx.
    async fn sqlx_conn(&mut self) -> Result<&mut SqliteConnection, sqlx::Error> {
        Ok(self.writer().await?.conn.sqlx())
    }

    /// Sends `script`, whose rows nobody reads but the first column of its last statement's
    /// (into `rows`, when given): directly when every part is one statement and the script is
    /// small enough not to hold a runtime thread for long, else through sqlx. Returns the rows
    /// its last statement changed.
    async fn send_direct(
        &mut self,
        script: Script,
        mut rows: Option<&mut Vec<String>>,
    ) -> Result<u64, sqlx::Error> {
        if script.args.len() <= self.direct_most_arguments {
            let conn = &mut self.writer().await?.conn;
            match conn.run(&script.parts(), rows.as_deref_mut()).await {
                Ok(changed) => return Ok(changed),
                Err(DirectError::Failed(e)) => return Err(e),
                Err(DirectError::Unsent) => {}
            }
        }
        match rows {
            Some(rows) => {
                let found: Vec<(String,)> = send_script!(self, script, sqlx::query_as, fetch_all)?;
                rows.extend(found.into_iter().map(|(text,)| text));
                Ok(0)
            }
            None => Ok(send_script!(self, script, sqlx::query, execute)?.rows_affected()),
        }
    }

    /// Marks the transaction as one nobody waits for (the delivery engine's outcomes): its large
    /// scripts go to sqlx's thread, since run directly they would hold a runtime thread, and
    /// the attempts waiting to be polled there, for a millisecond or more.
    pub fn in_background(&mut self) {
        self.direct_most_arguments = BACKGROUND_DIRECT_MOST_ARGUMENTS;
    }

    /// Queues a statement that returns no rows and whose row count nobody needs; it is sent with
    /// the next statement that must run now, or with `COMMIT`.
    pub fn defer(&mut self, sql: &str, args: Vec<Arg>) {
        push_statement(&mut self.pending, &mut self.args, sql, args);
        self.ends.push((self.pending.len(), self.args.len()));
    }

    /// Takes the queued script (with `sql` appended, if given) for sending: from here until
    /// [`sent_ok`](Self::sent_ok) the transaction counts as poisoned.
    fn take(&mut self, sql: Option<(&str, Vec<Arg>)>) -> Result<Script, sqlx::Error> {
        if self.poisoned {
            return Err(sqlx::Error::Protocol(
                "an earlier statement of this transaction failed; it can only be rolled back".into(),
            ));
        }
        if let Some((sql, args)) = sql {
            self.defer(sql, args);
        }
        self.sent = true;
        self.poisoned = true;
        Ok(Script {
            text: std::mem::take(&mut self.pending),
            args: std::mem::take(&mut self.args),
            ends: std::mem::take(&mut self.ends),
        })
    }

    /// Readies `script` for its last send. A script short enough to be cached as a whole goes
    /// in one trip; a longer one (its text varies with batch sizes, and parsing its multi-row
    /// statements afresh each time cost a tenth of the CPU under fan-out) is sent statement by
    /// statement, each cached on its own (batches are cut into a few fixed row counts, so their
    /// texts repeat), all but the last here. Returns what remains to send.
    async fn send_all_but_last(&mut self, script: Script) -> Result<Script, sqlx::Error> {
        if script.text.len() <= CACHED_SCRIPT_BYTES || script.ends.len() < 2 {
            return Ok(script);
        }
        let Script { text, mut args, ends } = script;
        let (mut text_from, mut args_from) = (0, 0);
        let (last_text, last_args) = ends[ends.len() - 2];
        for &(text_end, args_end) in &ends[..ends.len() - 1] {
            let statement_args: Vec<Arg> = args.drain(..args_end - args_from).collect();
            let statement = &text[text_from..text_end];
            bind_all!(sqlx::query(sqlx::AssertSqlSafe(statement)), statement_args)
                .execute(self.sqlx_conn().await?)
                .await?;
            (text_from, args_from) = (text_end, args_end);
        }
        debug_assert_eq!((text_from, args_from), (last_text, last_args));
        Ok(Script {
            text: text[last_text..].to_string(),
            args,
            ends: Vec::new(),
        })
    }

    fn sent_ok<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if result.is_ok() {
            self.poisoned = false;
        }
        result
    }

    /// Sends whatever is queued.
    pub async fn flush(&mut self) -> Result<(), sqlx::Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let script = self.take(None)?;
        let result = self.send_direct(script, None).await;
        self.sent_ok(result).map(|_| ())
    }

    /// Runs a statement now; returns the number of rows it affected.
    pub async fn execute(&mut self, sql: &str, args: Vec<Arg>) -> Result<u64, sqlx::Error> {
        // The count must be this statement's alone, so what is queued goes first.
        self.flush().await?;
        let script = self.take(Some((sql, args)))?;
        let result = self.send_direct(script, None).await;
        self.sent_ok(result)
    }

    /// Runs the queued statements and then `sql`, returning the first column of `sql`'s rows
    /// as text (without leaving direct use, unlike [`fetch_all`](Self::fetch_all)).
    pub async fn fetch_texts(&mut self, sql: &str, args: Vec<Arg>) -> Result<Vec<String>, sqlx::Error> {
        let script = self.take(Some((sql, args)))?;
        let mut rows = Vec::new();
        let result = self.send_direct(script, Some(&mut rows)).await;
        self.sent_ok(result).map(|_| rows)
    }

    /// Runs the queued statements and then `sql`, returning `sql`'s rows.
    pub async fn fetch_all<T: Row>(&mut self, sql: &str, args: Vec<Arg>) -> Result<Vec<T>, sqlx::Error> {
        let script = self.take(Some((sql, args)))?;
        let result = send_script!(self, script, sqlx::query_as, fetch_all);
        self.sent_ok(result)
    }

    /// Runs the queued statements and then `sql`, returning its first row.
    pub async fn fetch_optional<T: Row>(
        &mut self,
        sql: &str,
        args: Vec<Arg>,
    ) -> Result<Option<T>, sqlx::Error> {
        let script = self.take(Some((sql, args)))?;
        let result = send_script!(self, script, sqlx::query_as, fetch_optional);
        self.sent_ok(result)
    }

    /// Sends what is queued and `COMMIT` together; on failure the transaction is rolled back.
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        if !self.sent && self.pending == BEGIN {
            // Nothing was written.
            return Ok(());
        }
        let script = self.take(Some(("COMMIT", Vec::new())))?;
        let result = self.send_direct(script, None).await;
        let result = self.sent_ok(result);
        if result.is_err() {
            self.end().await;
        } else {
            self.sent = false;
            self.writer.checkpoints.wake.notify_one();
        }
        result.map(|_| ())
    }

    /// Rolls back.
    pub async fn rollback(mut self) {
        self.end().await;
    }

    /// Rolls back if anything was sent, and releases the writer.
    async fn end(&mut self) {
        if self.sent
            && let Some(guard) = self.conn.as_mut()
        {
            match roll_back(guard).await {
                Ok(()) => self.sent = false,
                Err(e) => {
                    tracing::warn!(error = %e, "rolling back a write transaction failed; retrying at next use")
                }
            }
        }
    }
}

/// A script ready to send.
struct Script {
    text: String,
    args: Vec<Arg>,
    /// Where each statement ends (text, arguments).
    ends: Vec<(usize, usize)>,
}

impl Script {
    /// Its statements with their arguments.
    fn parts(&self) -> Vec<Part<'_>> {
        let (mut text_from, mut args_from) = (0, 0);
        self.ends
            .iter()
            .map(|&(text_end, args_end)| {
                let part = Part {
                    sql: &self.text[text_from..text_end],
                    args: &self.args[args_from..args_end],
                };
                (text_from, args_from) = (text_end, args_end);
                part
            })
            .collect()
    }
}

/// Scripts with more arguments than this go through sqlx: run directly, a batch's statements
/// hold the runtime thread they run on, and the biggest batches (hundreds of deliveries of a
/// fan-out) would hold it for milliseconds.
const DIRECT_MOST_ARGUMENTS: usize = 2000;

/// The same for a transaction that nobody waits for ([`SqliteTx::in_background`]).
const BACKGROUND_DIRECT_MOST_ARGUMENTS: usize = 256;

impl Drop for SqliteTx {
    fn drop(&mut self) {
        if !self.sent {
            return;
        }
        let Some(mut guard) = self.conn.take() else { return };
        guard.needs_rollback = true;
        // Roll back now rather than at the writer's next use, so the file is not left locked
        // (another process, `opsiq init --tenant` say, may be waiting for it).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if roll_back(&mut guard).await.is_ok() {
                    guard.needs_rollback = false;
                }
            });
        }
    }
}

/// `ROLLBACK` (directly, like a transaction's other sends); "no transaction is active" counts as
/// done (SQLite may already have rolled back).
async fn roll_back(writer: &mut WriterConnection) -> Result<(), sqlx::Error> {
    let conn = &mut writer.conn;
    let rollback = Part {
        sql: "ROLLBACK",
        args: &[],
    };
    let result = match conn.run(&[rollback], None).await {
        Ok(_) => Ok(()),
        Err(DirectError::Failed(e)) => Err(e),
        Err(DirectError::Unsent) => conn.sqlx().execute("ROLLBACK").await.map(|_| ()),
    };
    match result {
        Err(e) if e.to_string().contains("no transaction is active") => Ok(()),
        other => other,
    }
}

/// Appends `sql` to `script` and its arguments to `script_args`, with every `$n` placeholder
/// rewritten as an anonymous `?` and the arguments laid out in the order the `?`s appear.
///
/// Anonymous parameters are bound by position across the whole script, and they are also much
/// cheaper to bind: sqlx looks each named parameter up by name, which SQLite answers by scanning
/// the statement's parameter list, so binding a 650-value multi-row insert by name is quadratic.
fn push_statement(script: &mut String, script_args: &mut Vec<Arg>, sql: &str, args: Vec<Arg>) {
    let placeholders = super::sql::placeholders(sql);
    // The last use of each argument takes it; earlier uses (`$13, $13`) clone it.
    let mut last_use = vec![usize::MAX; args.len()];
    for (k, &(_, _, n)) in placeholders.iter().enumerate() {
        if let Some(slot) = n.checked_sub(1).and_then(|n| last_use.get_mut(n)) {
            *slot = k;
        }
    }
    let mut args: Vec<Option<Arg>> = args.into_iter().map(Some).collect();
    script.reserve(sql.len() + 2);
    let mut copied = 0;
    for (k, &(start, end, n)) in placeholders.iter().enumerate() {
        script.push_str(&sql[copied..start]);
        script.push('?');
        copied = end;
        let index = n.wrapping_sub(1);
        // A number past the arguments binds NULL, as SQLite itself would.
        let arg = match args.get_mut(index) {
            Some(slot) if last_use[index] == k => slot.take(),
            Some(slot) => slot.clone(),
            None => None,
        };
        script_args.push(arg.unwrap_or(Arg::NullText));
    }
    script.push_str(&sql[copied..]);
    // On a line of its own, so a trailing line comment cannot swallow it.
    script.push_str("\n;\n");
}

#[cfg(test)]
mod tests {
    use super::push_statement;
    use crate::db::Arg;

    #[test]
    fn placeholders_become_anonymous_with_arguments_in_order() {
        let (mut script, mut args) = (String::new(), Vec::new());
        push_statement(&mut script, &mut args, "SELECT $1", vec![Arg::Int(7)]);
        push_statement(
            &mut script,
            &mut args,
            "INSERT INTO t (a, b, c) VALUES ($2, '$1 é', $1), ($2, \"$1\", $3) -- $9 'x",
            vec![Arg::Int(1), Arg::Text("two".into())],
        );
        assert_eq!(
            script,
            "SELECT ?\n;\nINSERT INTO t (a, b, c) VALUES (?, '$1 é', ?), (?, \"$1\", ?) -- $9 'x\n;\n"
        );
        let shown: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
        assert_eq!(
            shown,
            ["Int(7)", "Text(\"two\")", "Int(1)", "Text(\"two\")", "NullText"]
        );
    }
}
