//! The storage layer: one [`Database`] that is either an embedded SQLite file or a PostgreSQL
//! server, chosen by the URL at run time. Queries are written once with `$n` placeholders (both
//! drivers accept them) and dialect-neutral [`Arg`]s, and run through [`Database`] or a [`Tx`],
//! so code that composes writes (an event, its deliveries, an invocation) is written once; the
//! few statements that differ (claiming work) branch on [`Dialect`] where they are used.
//!
//! SQLite gets a pool of readers and exactly one writer connection ([`SqliteWriter`]), so
//! writers queue in-process instead of spinning on `SQLITE_BUSY`, and a write transaction is
//! `BEGIN IMMEDIATE`.

pub mod batch;
mod sql;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, PgPool};

/// Storage failures; the HTTP layer answers a transient one (see [`DbError::is_transient`]) with
/// a retryable 503 and every other with a 500, never with details.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The driver reported an error.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored JSON column did not parse; the row was written by something else.
    #[error("stored JSON is corrupt: {0}")]
    Json(#[from] serde_json::Error),
    /// A stored secret did not open under the master key (another key, or a corrupt row).
    #[error("a stored secret cannot be opened: {0}")]
    Sealed(#[from] crate::crypto::CryptoError),
    /// A grouped write failed or the writer stopped.
    #[error("batched write failed: {0}")]
    Batch(String),
    /// A grouped write failed for a reason that may well be gone on a retry (see
    /// [`DbError::is_transient`]).
    #[error("batched write failed: {0}")]
    BatchTransient(String),
    /// The database did not answer in time for the named work.
    #[error("the database did not answer in time for {0}")]
    TimedOut(&'static str),
}

impl DbError {
    /// A copy to hand to a waiting submitter (driver errors are not `Clone`).
    pub fn clone_for_reply(&self) -> DbError {
        if self.is_unique_violation() {
            DbError::Batch(format!("UNIQUE constraint failed: {self}"))
        } else if self.is_transient() {
            DbError::BatchTransient(self.to_string())
        } else {
            DbError::Batch(self.to_string())
        }
    }

    /// Whether the database was unreachable or briefly unable to serve (a connection it
    /// dropped, a restart, a full pool, a lock or serialization conflict), so the same request
    /// may well succeed when retried. A connection lost during COMMIT leaves the outcome
    /// unknown, which is why the answer asks for a retry with the same idempotency key.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Sqlx(e) => is_transient(e),
            DbError::BatchTransient(_) | DbError::TimedOut(_) => true,
            _ => false,
        }
    }

    /// Whether this is a unique-constraint violation (an idempotency race lost).
    pub fn is_unique_violation(&self) -> bool {
        match self {
            DbError::Sqlx(sqlx::Error::Database(d)) => d.is_unique_violation(),
            DbError::Batch(m) => m.contains("UNIQUE") || m.contains("duplicate key"),
            _ => false,
        }
    }
}

/// Whether a driver error is one that retrying may cure; see [`DbError::is_transient`].
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        // Protocol errors and a crashed SQLite worker are bugs or corruption, not load: they
        // stay 500s so they are seen rather than retried.
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            true
        }
        sqlx::Error::Database(d) => {
            if let Some(pg) = d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                let code = pg.code();
                // 08: connection exception (but not 08P01, a protocol violation); 53:
                // insufficient resources; 57P01–57P03: the server is shutting down or
                // starting; 40001/40P01: serialization, deadlock; 55P03: a lock not had within
                // the statement's lock_timeout.
                (code.starts_with("08") && code != "08P01")
                    || code.starts_with("53")
                    || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "55P03")
            } else {
                // SQLite: SQLITE_BUSY and SQLITE_LOCKED, with their extended codes.
                d.code()
                    .and_then(|c| c.parse::<i32>().ok())
                    .is_some_and(|c| matches!(c & 0xff, 5 | 6))
            }
        }
        _ => false,
    }
}

/// Where reads go: SQLite's reader connections or the PostgreSQL pool.
#[derive(Debug, Clone)]
pub enum Readers {
    /// An embedded SQLite file.
    Sqlite(SqliteReaders),
    /// A PostgreSQL server.
    Postgres(PgPool),
}

/// A bind parameter that either dialect accepts; built with [`args!`](crate::args).
#[derive(Debug, Clone)]
pub enum Arg {
    /// TEXT.
    Text(String),
    /// BIGINT / INTEGER.
    Int(i64),
    /// BOOLEAN.
    Bool(bool),
    /// NULL of TEXT type.
    NullText,
    /// NULL of BIGINT type.
    NullInt,
}

impl From<String> for Arg {
    fn from(v: String) -> Self {
        Arg::Text(v)
    }
}
impl From<&String> for Arg {
    fn from(v: &String) -> Self {
        Arg::Text(v.clone())
    }
}
impl From<&str> for Arg {
    fn from(v: &str) -> Self {
        Arg::Text(v.to_string())
    }
}
impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}
impl From<bool> for Arg {
    fn from(v: bool) -> Self {
        Arg::Bool(v)
    }
}
impl From<Option<String>> for Arg {
    fn from(v: Option<String>) -> Self {
        v.map_or(Arg::NullText, Arg::Text)
    }
}
impl From<Option<&String>> for Arg {
    fn from(v: Option<&String>) -> Self {
        v.map_or(Arg::NullText, |s| Arg::Text(s.clone()))
    }
}
impl From<Option<&str>> for Arg {
    fn from(v: Option<&str>) -> Self {
        v.map_or(Arg::NullText, |s| Arg::Text(s.to_string()))
    }
}
impl From<Option<i64>> for Arg {
    fn from(v: Option<i64>) -> Self {
        v.map_or(Arg::NullInt, Arg::Int)
    }
}

/// Builds a `Vec<Arg>` from values of mixed types: `args![tenant_id, now, true]`.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$($crate::db::Arg::from($a)),*] };
}

/// Binds `args` onto a sqlx query or query_as builder of either dialect.
macro_rules! bind_all {
    ($query:expr, $args:expr) => {{
        let mut q = $query;
        for arg in $args {
            q = match arg {
                Arg::Text(v) => q.bind(v),
                Arg::Int(v) => q.bind(v),
                Arg::Bool(v) => q.bind(v),
                Arg::NullText => q.bind(None::<String>),
                Arg::NullInt => q.bind(None::<i64>),
            };
        }
        q
    }};
}

mod direct;
mod postgres;
mod sqlite;
pub use postgres::PgTx;
pub use sqlite::{ReaderConnection, SqliteReaders, SqliteTx, SqliteWriter};

/// A row type that decodes from both dialects (`#[derive(sqlx::FromRow)]` gives this).
pub trait Row:
    for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
    + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
    + Send
    + Unpin
{
}
impl<T> Row for T where
    T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
        + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
        + Send
        + Unpin
{
}

/// Runs one statement kind on a pool or transaction of either dialect.
macro_rules! dispatch {
    ($target:expr, $sql:expr, $args:expr, execute) => {
        match $target {
            Target::SqliteReaders(p) => bind_all!(sqlx::query($sql), $args)
                .execute(&mut *p.get().await?)
                .await?
                .rows_affected(),
            Target::PgPool(p) => bind_all!(sqlx::query($sql), $args)
                .execute(p)
                .await?
                .rows_affected(),
            Target::PgTransaction(t) => bind_all!(sqlx::query($sql), $args)
                .execute(&mut **t)
                .await?
                .rows_affected(),
        }
    };
    ($target:expr, $sql:expr, $args:expr, $fetch:ident) => {
        match $target {
            Target::SqliteReaders(p) => {
                bind_all!(sqlx::query_as($sql), $args)
                    .$fetch(&mut *p.get().await?)
                    .await?
            }
            Target::PgPool(p) => bind_all!(sqlx::query_as($sql), $args).$fetch(p).await?,
            Target::PgTransaction(t) => bind_all!(sqlx::query_as($sql), $args).$fetch(&mut **t).await?,
        }
    };
}

enum Target<'a> {
    SqliteReaders(&'a SqliteReaders),
    PgPool(&'a PgPool),
    PgTransaction(&'a mut sqlx::Transaction<'static, sqlx::Postgres>),
}

impl Target<'_> {
    async fn execute(self, sql: impl sqlx::SqlSafeStr, args: Vec<Arg>) -> Result<u64, sqlx::Error> {
        Ok(dispatch!(self, sql, args, execute))
    }

    async fn fetch_all<T: Row>(
        self,
        sql: impl sqlx::SqlSafeStr,
        args: Vec<Arg>,
    ) -> Result<Vec<T>, sqlx::Error> {
        Ok(dispatch!(self, sql, args, fetch_all))
    }

    async fn fetch_optional<T: Row>(
        self,
        sql: impl sqlx::SqlSafeStr,
        args: Vec<Arg>,
    ) -> Result<Option<T>, sqlx::Error> {
        Ok(dispatch!(self, sql, args, fetch_optional))
    }
}

impl Readers {
    fn target(&self) -> Target<'_> {
        match self {
            Readers::Sqlite(p) => Target::SqliteReaders(p),
            Readers::Postgres(p) => Target::PgPool(p),
        }
    }
}

/// Whether `sql` begins with `keyword` (ASCII, any case, after leading white space).
fn starts_with_keyword(sql: &str, keyword: &str) -> bool {
    sql.trim_start()
        .get(..keyword.len())
        .is_some_and(|word| word.eq_ignore_ascii_case(keyword))
}

/// A write transaction (`BEGIN IMMEDIATE` on SQLite); rolled back if dropped uncommitted.
pub enum Tx {
    /// On SQLite's writer connection.
    Sqlite(SqliteTx),
    /// On PostgreSQL.
    Postgres(PgTx),
}

impl Tx {
    /// Which dialect this transaction speaks.
    pub fn dialect(&self) -> Dialect {
        match self {
            Tx::Sqlite(_) => Dialect::Sqlite,
            Tx::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Runs a statement; returns the number of rows it affected.
    pub async fn execute(&mut self, sql: impl sqlx::SqlSafeStr, args: Vec<Arg>) -> Result<u64, sqlx::Error> {
        let sql = sql.into_sql_str();
        // A SELECT's "rows affected" are rows locked or read (or on SQLite a stale count), not
        // changes.
        let changes_rows = !starts_with_keyword(sql.as_str(), "SELECT");
        let affected = match self {
            Tx::Sqlite(t) => t.execute(sql.as_str(), args).await,
            Tx::Postgres(t) => t.execute(sql, args).await,
        }?;
        if affected > 0 && changes_rows {
            crate::audit::note_change();
        }
        Ok(affected)
    }

    /// Runs a statement that returns no rows and whose row count is not needed. It is held and
    /// sent with the next statement or the commit, saving a round trip each (on PostgreSQL a
    /// batch of held inserts may even be sent as one statement, see `postgres.rs`).
    pub async fn defer(&mut self, sql: impl sqlx::SqlSafeStr, args: Vec<Arg>) -> Result<(), sqlx::Error> {
        crate::audit::note_change();
        match self {
            Tx::Sqlite(t) => {
                t.defer(sql.into_sql_str().as_str(), args);
                Ok(())
            }
            Tx::Postgres(t) => {
                t.defer(sql, args);
                Ok(())
            }
        }
    }

    /// Fetches every row.
    pub async fn fetch_all<T: Row>(
        &mut self,
        sql: impl sqlx::SqlSafeStr,
        args: Vec<Arg>,
    ) -> Result<Vec<T>, sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.fetch_all(sql.into_sql_str().as_str(), args).await,
            Tx::Postgres(t) => t.fetch_all(sql, args).await,
        }
    }

    /// Fetches the first column of every row, as text. On SQLite this keeps the writer in
    /// direct use (see `direct`), which a typed [`Tx::fetch_all`] ends for the transaction.
    pub async fn fetch_texts(
        &mut self,
        sql: impl sqlx::SqlSafeStr,
        args: Vec<Arg>,
    ) -> Result<Vec<String>, sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.fetch_texts(sql.into_sql_str().as_str(), args).await,
            Tx::Postgres(t) => {
                let rows: Vec<(String,)> = t.fetch_all(sql, args).await?;
                Ok(rows.into_iter().map(|(text,)| text).collect())
            }
        }
    }

    /// Fetches at most one row.
    pub async fn fetch_optional<T: Row>(
        &mut self,
        sql: impl sqlx::SqlSafeStr,
        args: Vec<Arg>,
    ) -> Result<Option<T>, sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.fetch_optional(sql.into_sql_str().as_str(), args).await,
            Tx::Postgres(t) => t.fetch_optional(sql, args).await,
        }
    }

    /// Marks the transaction as one nobody waits for; see [`SqliteTx::in_background`] (nothing
    /// changes on PostgreSQL).
    pub fn in_background(&mut self) {
        if let Tx::Sqlite(t) = self {
            t.in_background();
        }
    }

    /// Sends the statements held by [`Tx::defer`] now.
    pub async fn flush(&mut self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.flush().await,
            Tx::Postgres(t) => t.flush().await,
        }
    }

    /// Commits, with the audit row of the change this task is making if this transaction is the
    /// one that makes it (see `audit`).
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        let with_row = crate::audit::write_pending_row(&mut self).await?;
        match self {
            Tx::Sqlite(t) => t.commit().await,
            Tx::Postgres(t) => t.commit().await,
        }?;
        if with_row {
            crate::audit::pending_row_committed();
        }
        Ok(())
    }

    /// Rolls back (dropping does too, but later).
    pub async fn rollback(self) {
        match self {
            Tx::Sqlite(t) => t.rollback().await,
            Tx::Postgres(t) => t.rollback().await,
        }
    }
}

/// Where writes go: SQLite's single writer connection or the PostgreSQL pool.
#[derive(Debug, Clone)]
enum Writer {
    Sqlite(SqliteWriter),
    Postgres(PgPool),
}

/// The database handle every capability uses; cheap to clone.
#[derive(Debug, Clone)]
pub struct Database {
    read: Readers,
    write: Writer,
}

/// How long a SQLite statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A pooled PostgreSQL connection idle for longer than this is pinged before use.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

/// Which SQL dialect a [`Database`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite 3.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Database {
    /// Connects (creating a SQLite file if missing) and applies the migrations.
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        Self::open(url, true).await
    }

    /// Connects to a database as it is, for tools that inspect it (`opsiq audit verify`): a
    /// SQLite file must exist, and no migration is applied.
    pub async fn connect_existing(url: &str) -> Result<Self, DbError> {
        Self::open(url, false).await
    }

    async fn open(url: &str, prepare: bool) -> Result<Self, DbError> {
        let db = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(prepare)
                .journal_mode(SqliteJournalMode::Wal)
                // With WAL, NORMAL keeps every committed transaction across a process crash;
                // only an OS crash or power loss can drop the last commits.
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(BUSY_TIMEOUT)
                .foreign_keys(true)
                .pragma("temp_store", "memory")
                .pragma("cache_size", "-32000")
                // A WAL grown by a burst is cut back to this size when it starts over.
                .pragma("journal_size_limit", "67108864");
            // Commits do not checkpoint: a checkpoint fsyncs twice, and inline it made every
            // dozenth commit wait for that. A task checkpoints on a connection of its own instead.
            // Each connection's worker thread is named, so `top -H` and profiles say which is busy.
            let writer_options = options
                .clone()
                .pragma("wal_autocheckpoint", "0")
                .thread_name(|_| sqlite::WRITER_THREAD.into());
            let mut conn = writer_options.connect().await?;
            if prepare {
                sqlx::migrate!("migrations/sqlite")
                    .run_direct(None, &mut conn, false)
                    .await?;
            }
            let shared_cache = sqlite_file(url)?.is_none() || url.contains("cache=shared");
            let write = SqliteWriter::new(conn, shared_cache);
            write.spawn_checkpointer(options.clone().thread_name(|_| "sqlite-checkpt".into()));
            let read = SqliteReaders::new(options.thread_name(|_| "sqlite-reader".into()), 4);
            Self {
                read: Readers::Sqlite(read),
                write: Writer::Sqlite(write),
            }
        } else {
            let options = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(30))
                // sqlx pings a connection at every check-out by default: a round trip in front
                // of every query. Ping only one that sat idle (as HikariCP does); a busy one was
                // just checked by the ping sqlx sends when it is returned.
                .test_before_acquire(false)
                .before_acquire(|conn, meta| {
                    Box::pin(async move {
                        if meta.idle_for > IDLE_BEFORE_PING {
                            sqlx::Connection::ping(conn).await?;
                        }
                        Ok(true)
                    })
                })
                .connect_with(options)
                .await?;
            if prepare {
                // Two replicas starting at once must not both apply the same migration.
                sqlx::migrate!("migrations/postgres").run(&pool).await?;
            }
            Self {
                read: Readers::Postgres(pool.clone()),
                write: Writer::Postgres(pool),
            }
        };
        Ok(db)
    }

    /// Sets the scheduling priority of SQLite's writer thread to `nice` (see
    /// [`sqlite::prioritize_writer_threads`]), saying in the log when it cannot; nothing on
    /// PostgreSQL or for 0.
    pub fn prioritize_writer(&self, nice: i32) {
        if nice == 0 || self.dialect() != Dialect::Sqlite {
            return;
        }
        match sqlite::prioritize_writer_threads(nice) {
            Ok(_) => tracing::debug!(nice, "SQLite's writer thread runs at a raised priority"),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => tracing::info!(
                nice,
                "SQLite's writer thread keeps the normal priority: a negative nice needs CAP_SYS_NICE \
                 (set sqlite_writer_nice = 0 not to try)"
            ),
            Err(e) => tracing::warn!(nice, error = %e, "cannot set the SQLite writer thread's priority"),
        }
    }

    /// Which dialect this database speaks.
    pub fn dialect(&self) -> Dialect {
        match self.write {
            Writer::Sqlite(_) => Dialect::Sqlite,
            Writer::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Begins a write transaction.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        crate::audit::note_begin();
        Ok(match &self.write {
            Writer::Sqlite(w) => Tx::Sqlite(w.begin()),
            Writer::Postgres(p) => Tx::Postgres(PgTx::new(p.clone())),
        })
    }

    /// Runs one write statement in its own transaction.
    pub async fn execute(&self, sql: impl sqlx::SqlSafeStr, args: Vec<Arg>) -> Result<u64, sqlx::Error> {
        if crate::audit::row_pending() {
            // An audited change: its row commits with it.
            let mut tx = self.begin().await?;
            let affected = tx.execute(sql, args).await?;
            tx.commit().await?;
            return Ok(affected);
        }
        match &self.write {
            Writer::Sqlite(w) => w.execute(sql.into_sql_str().as_str(), args).await,
            Writer::Postgres(p) => Target::PgPool(p).execute(sql, args).await,
        }
    }

    /// Reads every row.
    pub async fn fetch_all<T: Row>(
        &self,
        sql: impl sqlx::SqlSafeStr,
        args: Vec<Arg>,
    ) -> Result<Vec<T>, sqlx::Error> {
        self.read.target().fetch_all(sql, args).await
    }

    /// Reads at most one row.
    pub async fn fetch_optional<T: Row>(
        &self,
        sql: impl sqlx::SqlSafeStr,
        args: Vec<Arg>,
    ) -> Result<Option<T>, sqlx::Error> {
        self.read.target().fetch_optional(sql, args).await
    }

    /// Answers whether the database is reachable (for `/readyz`).
    pub async fn ping(&self) -> bool {
        self.read.target().execute("SELECT 1", Vec::new()).await.is_ok()
    }

    /// Closes every connection, waiting for queries in progress.
    pub async fn close(&self) {
        match &self.read {
            Readers::Sqlite(readers) => readers.close().await,
            Readers::Postgres(pool) => pool.close().await,
        }
        match &self.write {
            Writer::Sqlite(w) => w.close().await,
            Writer::Postgres(p) => p.close().await,
        }
    }
}

/// Whether this process is the only one serving its database.
#[derive(Debug, Clone)]
pub enum ServerLock {
    /// PostgreSQL: replicas share it; nothing is locked.
    Shared,
    /// SQLite: this process holds `<file>.lock` for as long as it runs (`None`: an in-memory
    /// database, which no other process can open).
    Sole(Option<std::sync::Arc<std::fs::File>>),
    /// SQLite: another process, or another server in this one, holds this lock file.
    Contended(std::path::PathBuf),
}

impl ServerLock {
    /// Takes the lock for `url`: a SQLite file is served by one process, which may then keep
    /// some of its state (token revocations) in memory. The lock goes with the process, however
    /// it ends.
    pub fn take(url: &str) -> std::io::Result<Self> {
        if !url.starts_with("sqlite:") {
            return Ok(Self::Shared);
        }
        let Some(database) = sqlite_file(url).map_err(std::io::Error::other)? else {
            return Ok(Self::Sole(None));
        };
        // The same file reached through another path must find the same lock.
        let database = match (database.parent(), database.file_name()) {
            (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => {
                std::fs::canonicalize(dir).map(|dir| dir.join(name))?
            }
            _ => database.to_path_buf(),
        };
        let mut path = database.into_os_string();
        path.push(".lock");
        let path = std::path::PathBuf::from(path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Self::Sole(Some(std::sync::Arc::new(file)))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(Self::Contended(path)),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Whether this process alone writes the database.
    pub fn is_sole(&self) -> bool {
        matches!(self, Self::Sole(_))
    }
}

/// The file a `sqlite:` URL names; `None` for PostgreSQL or an in-memory database.
pub fn sqlite_file(url: &str) -> Result<Option<std::path::PathBuf>, sqlx::Error> {
    if !url.starts_with("sqlite:") || url.contains(":memory:") || url.contains("mode=memory") {
        return Ok(None);
    }
    Ok(Some(
        SqliteConnectOptions::from_str(url)?.get_filename().to_path_buf(),
    ))
}

/// Row counts SQLite's multi-row statements are cut into, largest first: a few statement texts
/// that stay prepared (see `SqliteTx::send_all_but_last`), where a statement per batch size would
/// be parsed afresh each time.
const SQLITE_CHUNK_SIZES: [usize; 4] = [50, 16, 4, 1];

/// Most rows in one PostgreSQL statement.
const POSTGRES_CHUNK: usize = 50;

/// The sizes that `total` rows are cut into for `dialect`. On SQLite, sizes from
/// [`SQLITE_CHUNK_SIZES`]; on PostgreSQL, where every statement is a round trip, as few
/// statements as [`POSTGRES_CHUNK`] allows.
pub fn chunk_sizes(dialect: Dialect, total: usize) -> impl Iterator<Item = usize> {
    let mut rest = total;
    std::iter::from_fn(move || {
        let size = match dialect {
            Dialect::Sqlite => SQLITE_CHUNK_SIZES.into_iter().find(|&size| size <= rest)?,
            Dialect::Postgres if rest == 0 => return None,
            Dialect::Postgres => rest.min(POSTGRES_CHUNK),
        };
        rest -= size;
        Some(size)
    })
}

/// Cuts `items` into slices of the sizes [`chunk_sizes`] gives.
pub fn chunks<T>(dialect: Dialect, items: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    chunk_sizes(dialect, items.len()).map(move |size| {
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        chunk
    })
}

/// Inserts `rows` (each of `columns` values) with multi-row statements cut by [`chunks`];
/// `head` is `INSERT INTO t (a, b, …) VALUES`. The statements are deferred (see [`Tx::defer`]).
pub async fn insert_rows(
    tx: &mut Tx,
    head: &str,
    columns: usize,
    rows: Vec<Vec<Arg>>,
) -> Result<(), sqlx::Error> {
    let sizes = chunk_sizes(tx.dialect(), rows.len());
    let mut rows = rows.into_iter();
    for size in sizes {
        let mut sql = String::from(head);
        let mut values = Vec::with_capacity(size * columns);
        for (i, row) in rows.by_ref().take(size).enumerate() {
            debug_assert_eq!(row.len(), columns);
            sql.push_str(if i == 0 { " (" } else { ", (" });
            for k in 0..columns {
                if k > 0 {
                    sql.push_str(", ");
                }
                sql.push('$');
                sql.push_str(&(i * columns + k + 1).to_string());
            }
            sql.push(')');
            values.extend(row);
        }
        tx.defer(sqlx::AssertSqlSafe(sql), values).await?;
    }
    Ok(())
}

/// `select` locking the rows it reads until the transaction ends: concurrent read-modify-writes
/// of one row queue on PostgreSQL, so each applies to what the one before it left (SQLite's
/// write transactions run one at a time already). `NO KEY UPDATE`, not `UPDATE`: the lock must
/// not stop inserts whose foreign keys point at the row (every tenant-owned row points at its
/// tenant's), which only take `KEY SHARE`.
pub fn locking(tx: &Tx, select: &'static str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(match tx.dialect() {
        Dialect::Postgres => format!("{select} FOR NO KEY UPDATE"),
        Dialect::Sqlite => select.to_string(),
    })
}

/// Bumps a named change counter (read by caches and MCP sessions to notice changes).
pub async fn bump_counter(tx: &mut Tx, name: &str) -> Result<(), sqlx::Error> {
    tx.execute(
        "INSERT INTO change_counters (name, version) VALUES ($1, 1) \
         ON CONFLICT (name) DO UPDATE SET version = change_counters.version + 1",
        vec![Arg::Text(name.to_string())],
    )
    .await
    .map(|_| ())
}

/// The current value of a change counter (0 if never bumped).
pub async fn counter(db: &Database, name: &str) -> Result<i64, sqlx::Error> {
    let row: Option<(i64,)> = db
        .fetch_optional(
            "SELECT version FROM change_counters WHERE name = $1",
            vec![Arg::Text(name.to_string())],
        )
        .await?;
    Ok(row.map(|r| r.0).unwrap_or(0))
}

/// The outcome of a change that may name the version it was based on (`If-Match`).
#[derive(Debug)]
pub enum Versioned<T> {
    /// Applied; the object as it is now.
    Done(T),
    /// There is no such object.
    Missing,
    /// The object is at this other version now; nothing was changed.
    Changed(i64),
}

/// Whether a change based on `expected` (none: unconditional) may apply to an object at `current`.
pub fn version_holds(expected: Option<i64>, current: i64) -> bool {
    expected.is_none_or(|v| v == current)
}

/// `$1, $2, …, $n`: the placeholders of an `IN (…)` list of `n` values.
pub fn in_list(n: usize) -> String {
    (1..=n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// Unix time in milliseconds, the representation of every timestamp column.
pub fn now_ms() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000
}

/// Formats a stored millisecond timestamp as RFC 3339 for API answers.
pub fn rfc3339(ms: i64) -> String {
    // Always three fractional digits, so that times compare as text the way they do as times.
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.millisecond()
            )
        })
        .unwrap_or_default()
}

/// Parses an RFC 3339 timestamp (as accepted by `since` filters) into unix milliseconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    use super::{Dialect, chunk_sizes, chunks, is_transient, rfc3339};

    #[test]
    fn times_have_three_fractional_digits() {
        assert_eq!(rfc3339(1_764_700_000_210), "2025-12-02T18:26:40.210Z");
        assert_eq!(rfc3339(1_764_700_000_000), "2025-12-02T18:26:40.000Z");
        assert!(rfc3339(1_764_700_000_009) < rfc3339(1_764_700_000_010));
    }
    use sqlx::ConnectOptions;
    use sqlx::sqlite::SqliteConnectOptions;
    use std::str::FromStr;

    #[test]
    fn only_errors_a_retry_may_cure_count_as_transient() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(is_transient(&sqlx::Error::Io(io)));
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(is_transient(&sqlx::Error::PoolClosed));
        assert!(!is_transient(&sqlx::Error::Protocol("garbled".into())));
        assert!(!is_transient(&sqlx::Error::WorkerCrashed));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
    }

    #[tokio::test]
    async fn a_locked_sqlite_file_is_transient_and_a_broken_constraint_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let options = SqliteConnectOptions::from_str(&url)
            .unwrap()
            .create_if_missing(true)
            .busy_timeout(std::time::Duration::ZERO);
        let mut holder = options.connect().await.unwrap();
        let mut other = options.connect().await.unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .execute(&mut holder)
            .await
            .unwrap();
        sqlx::query("BEGIN IMMEDIATE").execute(&mut holder).await.unwrap();
        let busy = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut other)
            .await
            .unwrap_err();
        assert!(is_transient(&busy), "{busy}");
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut holder)
            .await
            .unwrap();
        let duplicate = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut holder)
            .await
            .unwrap_err();
        assert!(!is_transient(&duplicate), "{duplicate}");
    }

    /// The names of this process's threads (Linux).
    #[cfg(target_os = "linux")]
    fn thread_names() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .map(|tasks| {
                tasks
                    .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
                    .map(|name| name.trim_end().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn every_sqlite_connection_runs_on_a_named_thread() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let db = super::Database::connect(&url).await.unwrap();
        // A commit wakes the checkpointer, which connects on first use; a read opens a reader.
        let mut tx = db.begin().await.unwrap();
        super::bump_counter(&mut tx, "named").await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(super::counter(&db, "named").await.unwrap(), 1);

        let wanted = ["sqlite-writer", "sqlite-checkpt", "sqlite-reader"];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut names = thread_names();
        while !wanted.iter().all(|w| names.iter().any(|n| n == w)) {
            assert!(std::time::Instant::now() < deadline, "threads: {names:?}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            names = thread_names();
        }
        db.close().await;
    }

    #[test]
    fn rows_are_cut_into_a_few_fixed_sizes_on_sqlite() {
        let sizes = |n| chunk_sizes(Dialect::Sqlite, n).collect::<Vec<_>>();
        assert!(sizes(0).is_empty());
        assert_eq!(sizes(1), [1]);
        assert_eq!(sizes(37), [16, 16, 4, 1]);
        assert_eq!(sizes(121), [50, 50, 16, 4, 1]);
        for total in 0..300 {
            let cut = sizes(total);
            assert_eq!(cut.iter().sum::<usize>(), total);
            assert!(cut.iter().all(|s| [50, 16, 4, 1].contains(s)));
        }
        let items: Vec<u32> = (0..23).collect();
        let cut: Vec<&[u32]> = chunks(Dialect::Sqlite, &items).collect();
        assert_eq!(cut.iter().map(|c| c.len()).collect::<Vec<_>>(), [16, 4, 1, 1, 1]);
        assert_eq!(cut.concat(), items);
    }

    #[test]
    fn rows_are_cut_into_few_statements_on_postgres() {
        let sizes = |n| chunk_sizes(Dialect::Postgres, n).collect::<Vec<_>>();
        assert!(sizes(0).is_empty());
        assert_eq!(sizes(37), [37]);
        assert_eq!(sizes(121), [50, 50, 21]);
        assert_eq!(sizes(100), [50, 50]);
    }
}
