//! Write statements run on SQLite's writer connection directly, on the task that holds it.
//!
//! sqlx runs every SQLite call on the connection's own thread, so each send is a hand-off to
//! that thread and back: two thread wake-ups, which on a busy 2-core machine cost about as much
//! as the SQL of a small group-commit batch, and which every other write waits behind. While the
//! writer runs statements here, the connection is locked away from that thread
//! ([`LockedSqliteHandle`]); the scripts a transaction sends without reading typed rows (its
//! deferred inserts and `COMMIT`, a `ROLLBACK`) then run straight from the task that holds the
//! writer, with their statements kept prepared. A typed read, an autocommit statement and a
//! script too big to hold a runtime thread for lend the connection back to sqlx first; an
//! in-memory or shared-cache database never leaves sqlx.
//!
//! This module holds all of the crate's `unsafe` code: the ownership of the connection that the
//! lock borrows, and SQLite's C API, called only under the lock, on statements this module
//! prepared and finalizes.

use std::collections::HashMap;
use std::ffi::{c_char, c_int};
use std::ptr::{self, NonNull};
use std::time::Duration;

use libsqlite3_sys as ffi;
use sqlx::SqliteConnection;
use sqlx::sqlite::LockedSqliteHandle;

use super::Arg;

/// Most statements kept prepared; past it, all are finalized and prepared again as used.
const MOST_PREPARED: usize = 128;

/// Statements with longer texts (the biggest multi-row inserts) are finalized after use rather
/// than kept: each holds its compiled program, which grows with its rows.
const LONGEST_KEPT: usize = 16 * 1024;

/// SQLite's extended result codes share their low byte with the primary code.
const PRIMARY_CODE: c_int = 0xff;

/// The writer connection, lent to sqlx or locked away from sqlx's thread for direct use, with
/// the statements prepared on it (kept across both).
pub(super) struct DualConnection {
    /// Held while in direct use; borrows `*conn` (see `Drop`).
    locked: Option<LockedSqliteHandle<'static>>,
    /// Prepared by [`DualConnection::run`], by text; reset whenever not running.
    prepared: HashMap<Box<str>, NonNull<ffi::sqlite3_stmt>>,
    /// How long sqlx's use of the connection waits for another process's write lock.
    busy_timeout: Duration,
    /// Off for a shared-cache database (sqlx opens in-memory ones so), where a write that meets
    /// a reader must wait for it as only sqlx does (unlock notification).
    direct_allowed: bool,
    /// Owned (made by `Box::leak`, freed in `Drop`).
    conn: NonNull<SqliteConnection>,
}

// SAFETY: `conn` is owned like a `Box<SqliteConnection>`, which is `Send`; the lock guard is
// `Send`; the statements are used only through `&mut self`, by whoever holds the writer, under
// the lock, and SQLite connections opened by sqlx (multi-thread mode) may move between threads.
#[allow(unsafe_code)]
unsafe impl Send for DualConnection {}

/// Why a script did not run directly.
pub(super) enum DirectError {
    /// Nothing of it ran, and it must go through sqlx: direct use is off (a shared cache), a
    /// part holds more than one statement or is too long for SQLite's API, or a lock held by
    /// another connection was met while preparing or at the first part (waiting for it belongs
    /// on sqlx's thread, not on the runtime's).
    Unsent,
    /// A statement failed: to prepare (then nothing ran), or to run (then those before it did).
    Failed(sqlx::Error),
}

/// One statement of a script.
pub(super) struct Part<'a> {
    /// The statement's text (its separator may follow).
    pub sql: &'a str,
    /// Its arguments, in the order of its `?` placeholders.
    pub args: &'a [Arg],
}

/// A statement ready to run, and whether it is kept prepared afterwards.
struct Ready {
    statement: NonNull<ffi::sqlite3_stmt>,
    kept: bool,
}

impl DualConnection {
    /// Takes ownership of `conn`, lent to sqlx until the first direct use. `busy_timeout` must
    /// be the one it was opened with; `shared_cache` turns direct use off.
    pub(super) fn new(conn: SqliteConnection, busy_timeout: Duration, shared_cache: bool) -> Self {
        Self {
            locked: None,
            prepared: HashMap::new(),
            busy_timeout,
            direct_allowed: !shared_cache,
            conn: NonNull::from(Box::leak(Box::new(conn))),
        }
    }

    /// The connection for sqlx, lent back from direct use first (the prepared statements stay).
    pub(super) fn sqlx(&mut self) -> &mut SqliteConnection {
        if let Some(mut locked) = self.locked.take() {
            set_busy_timeout(&mut locked, self.busy_timeout);
            metrics::counter!("opsiq_sqlite_writer_switches_total", "to" => "sqlx").increment(1);
        }
        // SAFETY: `conn` is valid until `self` is dropped, and with the lock gone nothing else
        // borrows it; `&mut self` makes this borrow the only one.
        #[allow(unsafe_code)]
        unsafe {
            self.conn.as_mut()
        }
    }

    /// The raw connection, locked away from sqlx's thread first if sqlx had it (one round trip
    /// to that thread).
    async fn lock(&mut self) -> Result<*mut ffi::sqlite3, sqlx::Error> {
        let locked = match self.locked.take() {
            Some(locked) => locked,
            None => {
                // SAFETY: the connection outlives the lock, which `Drop` releases first, and
                // while the lock holds this borrow the connection is reached only through it:
                // `sqlx` releases the lock before it lends the connection out again.
                #[allow(unsafe_code)]
                let conn: &'static mut SqliteConnection = unsafe { &mut *self.conn.as_ptr() };
                let mut locked = conn.lock_handle().await?;
                set_busy_timeout(&mut locked, Duration::ZERO);
                metrics::counter!("opsiq_sqlite_writer_switches_total", "to" => "direct").increment(1);
                locked
            }
        };
        Ok(self.locked.insert(locked).as_raw_handle().as_ptr())
    }

    /// Runs `parts` in order; returns the rows the last one changed, and, when `rows` is given,
    /// appends the first column of each row the last one returned. Every part is prepared
    /// before any runs, so a script refused as [`DirectError::Unsent`] ran nothing (and a part
    /// cannot use a table an earlier part of the same script creates).
    pub(super) async fn run(
        &mut self,
        parts: &[Part<'_>],
        rows: Option<&mut Vec<String>>,
    ) -> Result<u64, DirectError> {
        if !self.direct_allowed {
            return Err(DirectError::Unsent);
        }
        let db = self.lock().await.map_err(DirectError::Failed)?;
        self.run_locked(db, parts, rows)
    }

    /// [`run`](Self::run) once the connection is locked.
    fn run_locked(
        &mut self,
        db: *mut ffi::sqlite3,
        parts: &[Part<'_>],
        rows: Option<&mut Vec<String>>,
    ) -> Result<u64, DirectError> {
        if self.prepared.len() + parts.len() > MOST_PREPARED {
            self.finalize_all();
        }
        let mut ready = Vec::with_capacity(parts.len());
        let mut prepared = Ok(());
        for part in parts {
            match self.prepare(db, part.sql) {
                Ok(statement) => ready.push(statement),
                Err(e) => {
                    prepared = Err(e);
                    break;
                }
            }
        }
        let result = prepared.and_then(|()| self.run_prepared(db, parts, &ready, rows));
        for Ready { statement, kept } in ready.into_iter().flatten() {
            if !kept {
                // SAFETY: prepared on the locked connection for this run only, and reset.
                #[allow(unsafe_code)]
                unsafe {
                    ffi::sqlite3_finalize(statement.as_ptr())
                };
            }
        }
        result
    }

    fn run_prepared(
        &mut self,
        db: *mut ffi::sqlite3,
        parts: &[Part<'_>],
        ready: &[Option<Ready>],
        mut rows: Option<&mut Vec<String>>,
    ) -> Result<u64, DirectError> {
        let mut changed = 0;
        for (i, (part, ready)) in parts.iter().zip(ready).enumerate() {
            let Some(ready) = ready else { continue };
            let last = i + 1 == parts.len();
            // SAFETY: `db` is the locked connection.
            #[allow(unsafe_code)]
            let before = unsafe { ffi::sqlite3_total_changes64(db) };
            let rows = if last { rows.as_deref_mut() } else { None };
            match step(ready.statement.as_ptr(), part.args, rows) {
                Ok(()) => {}
                Err(StepFailure::Sqlite(code)) if i == 0 && code & PRIMARY_CODE == ffi::SQLITE_BUSY => {
                    return Err(DirectError::Unsent);
                }
                Err(StepFailure::Sqlite(_)) => return Err(DirectError::Failed(self.last_error())),
                Err(StepFailure::Refused(why)) => {
                    return Err(DirectError::Failed(sqlx::Error::Protocol(why)));
                }
            }
            if last {
                // SAFETY: as above. The statement's own count (as sqlx reports it) when it
                // changed anything, so that a statement that changes nothing (`COMMIT`) does
                // not report what the last `INSERT` did.
                #[allow(unsafe_code)]
                let changes = unsafe {
                    if ffi::sqlite3_total_changes64(db) == before {
                        0
                    } else {
                        ffi::sqlite3_changes64(db)
                    }
                };
                changed = u64::try_from(changes).unwrap_or(0);
            }
        }
        Ok(changed)
    }

    /// The prepared statement for `sql` (`None` for a part that is only white space or
    /// comments), preparing it on first use.
    fn prepare(&mut self, db: *mut ffi::sqlite3, sql: &str) -> Result<Option<Ready>, DirectError> {
        if let Some(&statement) = self.prepared.get(sql) {
            return Ok(Some(Ready {
                statement,
                kept: true,
            }));
        }
        let length = c_int::try_from(sql.len()).map_err(|_| DirectError::Unsent)?;
        let mut statement = ptr::null_mut();
        let mut tail: *const c_char = ptr::null();
        // SAFETY: `db` is the locked connection; `sql` outlives the call, which reads at most
        // `length` bytes of it and points `tail` into it.
        #[allow(unsafe_code)]
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                db,
                sql.as_ptr().cast(),
                length,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut statement,
                &mut tail,
            )
        };
        if rc & PRIMARY_CODE == ffi::SQLITE_BUSY {
            // Reading a schema another connection is changing; nothing has run yet.
            return Err(DirectError::Unsent);
        }
        if rc != ffi::SQLITE_OK {
            return Err(DirectError::Failed(self.last_error()));
        }
        let Some(statement) = NonNull::new(statement) else {
            return Ok(None);
        };
        // SAFETY: on success `tail` points into `sql`, at or after its start.
        #[allow(unsafe_code)]
        let used = usize::try_from(unsafe { tail.offset_from(sql.as_ptr().cast()) }).unwrap_or(0);
        if sql
            .get(used..)
            .unwrap_or_default()
            .chars()
            .any(|c| !c.is_whitespace() && c != ';')
        {
            // SAFETY: prepared above and not kept anywhere.
            #[allow(unsafe_code)]
            unsafe {
                ffi::sqlite3_finalize(statement.as_ptr())
            };
            return Err(DirectError::Unsent);
        }
        let kept = sql.len() <= LONGEST_KEPT;
        if kept {
            self.prepared.insert(sql.into(), statement);
        }
        Ok(Some(Ready { statement, kept }))
    }

    /// The connection's last error, as sqlx reports SQLite's errors.
    fn last_error(&mut self) -> sqlx::Error {
        match self.locked.as_mut().and_then(|locked| locked.last_error()) {
            Some(e) => sqlx::Error::Database(Box::new(e)),
            None => sqlx::Error::Protocol("SQLite reported an error without a code".into()),
        }
    }

    /// Finalizes every kept statement; the lock must be held.
    fn finalize_all(&mut self) {
        debug_assert!(self.locked.is_some());
        for (_, statement) in self.prepared.drain() {
            // SAFETY: prepared on the connection, which is locked, and removed from the map.
            #[allow(unsafe_code)]
            unsafe {
                ffi::sqlite3_finalize(statement.as_ptr())
            };
        }
    }
}

impl Drop for DualConnection {
    fn drop(&mut self) {
        // sqlx closes the connection when it is dropped, and closing fails (sqlx panics) while
        // statements of ours are open on it: finalize them under the lock, taking it back from
        // sqlx's thread if sqlx has it (that thread answers on its own; nothing here waits for
        // the runtime).
        if !self.prepared.is_empty() && self.locked.is_none() {
            // SAFETY: as in `lock`.
            #[allow(unsafe_code)]
            let conn: &'static mut SqliteConnection = unsafe { &mut *self.conn.as_ptr() };
            self.locked = futures_executor::block_on(conn.lock_handle()).ok();
        }
        if self.locked.is_some() {
            self.finalize_all();
        }
        // The lock before the connection it borrows.
        self.locked = None;
        if !self.prepared.is_empty() {
            // sqlx's thread is gone, and with it any way to finalize safely: closing would
            // fail and sqlx panic, so the connection is left to the process's end.
            tracing::warn!("the SQLite writer connection could not be closed cleanly; it stays open");
            return;
        }
        // SAFETY: made by `Box::leak` in `new`, freed only here, and no longer borrowed.
        #[allow(unsafe_code)]
        drop(unsafe { Box::from_raw(self.conn.as_ptr()) });
    }
}

/// Sets how long `locked`'s statements wait for another connection's write lock.
fn set_busy_timeout(locked: &mut LockedSqliteHandle<'_>, timeout: Duration) {
    let ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
    // SAFETY: the connection is locked.
    #[allow(unsafe_code)]
    unsafe {
        ffi::sqlite3_busy_timeout(locked.as_raw_handle().as_ptr(), ms)
    };
}

/// Why a statement did not run to its end.
enum StepFailure {
    /// SQLite's result code; the connection holds the error.
    Sqlite(c_int),
    /// Refused here, before or instead of SQLite.
    Refused(String),
}

/// Binds `args` to `statement`, steps it to the end and resets it.
fn step(
    statement: *mut ffi::sqlite3_stmt,
    args: &[Arg],
    mut rows: Option<&mut Vec<String>>,
) -> Result<(), StepFailure> {
    let result = bind(statement, args).and_then(|()| {
        loop {
            // SAFETY: `statement` was prepared on the locked connection and its text arguments
            // (bound without copying) live in `args` until it is reset below.
            #[allow(unsafe_code)]
            match unsafe { ffi::sqlite3_step(statement) } {
                ffi::SQLITE_DONE => break Ok(()),
                ffi::SQLITE_ROW => {
                    if let Some(rows) = rows.as_deref_mut() {
                        match column_text(statement) {
                            Some(text) => rows.push(text),
                            None => {
                                break Err(StepFailure::Refused("a value read as text is not text".into()));
                            }
                        }
                    }
                }
                code => break Err(StepFailure::Sqlite(code)),
            }
        }
    });
    // SAFETY: as above; resetting also ends the statement's use of the borrowed arguments.
    #[allow(unsafe_code)]
    unsafe {
        ffi::sqlite3_reset(statement);
        ffi::sqlite3_clear_bindings(statement);
    }
    result
}

/// Binds `args` to `statement`'s parameters, which must number as many.
fn bind(statement: *mut ffi::sqlite3_stmt, args: &[Arg]) -> Result<(), StepFailure> {
    // SAFETY: `statement` was prepared on the locked connection.
    #[allow(unsafe_code)]
    let wanted = unsafe { ffi::sqlite3_bind_parameter_count(statement) };
    if usize::try_from(wanted).ok() != Some(args.len()) {
        return Err(StepFailure::Refused(format!(
            "a statement has {wanted} parameters but {} arguments were given",
            args.len()
        )));
    }
    for (index, arg) in (1..).zip(args) {
        // SAFETY: `index` is within the parameter count checked above; a text is bound without
        // a copy (`SQLITE_STATIC`) and outlives the statement's use of it, which ends when
        // `step` resets the statement.
        #[allow(unsafe_code)]
        let rc = unsafe {
            match arg {
                Arg::Text(text) => ffi::sqlite3_bind_text64(
                    statement,
                    index,
                    text.as_ptr().cast(),
                    text.len() as u64,
                    ffi::SQLITE_STATIC(),
                    ffi::SQLITE_UTF8 as u8,
                ),
                Arg::Int(n) => ffi::sqlite3_bind_int64(statement, index, *n),
                Arg::Bool(b) => ffi::sqlite3_bind_int64(statement, index, i64::from(*b)),
                Arg::NullText | Arg::NullInt => ffi::sqlite3_bind_null(statement, index),
            }
        };
        if rc != ffi::SQLITE_OK {
            return Err(StepFailure::Sqlite(rc));
        }
    }
    Ok(())
}

/// The first column of the row `statement` is on, if it is text (as sqlx would decode a
/// `String`: not NULL, and valid UTF-8).
fn column_text(statement: *mut ffi::sqlite3_stmt) -> Option<String> {
    // SAFETY: `statement` is on a row; the text pointer is valid for the length SQLite gives
    // until the statement steps again, and it is copied before that.
    #[allow(unsafe_code)]
    unsafe {
        if ffi::sqlite3_column_type(statement, 0) != ffi::SQLITE_TEXT {
            return None;
        }
        let text = ffi::sqlite3_column_text(statement, 0);
        let length = usize::try_from(ffi::sqlite3_column_bytes(statement, 0)).ok()?;
        if text.is_null() {
            return None;
        }
        String::from_utf8(std::slice::from_raw_parts(text, length).to_vec()).ok()
    }
}
