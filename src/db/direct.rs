//! Write statements run on SQLite's writer connection directly, on the task that holds it.
//!
//! sqlx runs every SQLite call on the connection's own thread, so each send is a hand-off to
//! that thread and back: two thread wake-ups, which on a busy 2-core machine cost about as much
//! as the SQL of a small group-commit batch, and which every other write waits behind. While the
//! writer runs statements here, the connection is locked away from sqlx's thread
//! ([`LockedSqliteHandle`]); the scripts a transaction sends without reading rows (its deferred
//! inserts and `COMMIT`) then run straight from the task that holds the writer, with their
//! statements kept prepared. Anything that reads rows gives the connection back to sqlx first.
//!
//! This is the crate's one module with `unsafe` code: SQLite's C API, called only while the
//! lock is held, on statements this module prepared and finalizes.

use std::collections::HashMap;
use std::ffi::{c_char, c_int};
use std::ptr::{self, NonNull};

use libsqlite3_sys as ffi;
use sqlx::sqlite::LockedSqliteHandle;

use super::Arg;

/// Most statements kept prepared; past it, all are finalized and prepared again as used.
const MOST_PREPARED: usize = 256;

/// The writer connection locked away from sqlx's thread, with the statements prepared on it.
pub(super) struct DirectConnection {
    /// Borrows the boxed connection it was taken from (see `WriterConnection`).
    handle: LockedSqliteHandle<'static>,
    prepared: HashMap<Box<str>, NonNull<ffi::sqlite3_stmt>>,
}

// SAFETY: the statements are used only through `&mut self`, by whoever holds the lock, and
// SQLite connections (opened by sqlx without a shared cache) may move between threads.
#[allow(unsafe_code)]
unsafe impl Send for DirectConnection {}

/// Why a script did not run directly.
pub(super) enum DirectError {
    /// A part of it holds more than one statement: it must go through sqlx. Nothing ran.
    NotOneStatementEach,
    /// A statement failed; the statements before it ran.
    Failed(sqlx::Error),
}

/// One statement of a script: its text and how many arguments it binds.
pub(super) struct Part<'a> {
    /// The statement's text (its separator may follow).
    pub sql: &'a str,
    /// Its arguments, in the order of its `?` placeholders.
    pub args: &'a [Arg],
}

impl DirectConnection {
    /// Wraps a locked connection.
    pub(super) fn new(handle: LockedSqliteHandle<'static>) -> Self {
        Self {
            handle,
            prepared: HashMap::new(),
        }
    }

    /// Runs `parts` in order; returns the rows the last one changed, and, when `rows` is given,
    /// appends the first column of each row the last one returned. Every part is prepared
    /// before any runs, so a script refused as [`DirectError::NotOneStatementEach`] ran nothing.
    pub(super) fn run(
        &mut self,
        parts: &[Part<'_>],
        mut rows: Option<&mut Vec<String>>,
    ) -> Result<u64, DirectError> {
        if self.prepared.len() + parts.len() > MOST_PREPARED {
            self.finalize_all();
        }
        let mut statements = Vec::with_capacity(parts.len());
        for part in parts {
            statements.push(self.prepare(part.sql)?);
        }
        let db = self.handle.as_raw_handle().as_ptr();
        let mut changed = 0;
        for (i, (part, statement)) in parts.iter().zip(statements).enumerate() {
            let Some(statement) = statement else { continue };
            let last = i + 1 == parts.len();
            // SAFETY: `db` is the locked connection and `statement` was prepared on it.
            #[allow(unsafe_code)]
            let before = unsafe { ffi::sqlite3_total_changes64(db) };
            let result = self.step(
                statement,
                part.args,
                if last { rows.as_deref_mut() } else { None },
            );
            result.map_err(DirectError::Failed)?;
            if last {
                // SAFETY: as above. No table has a trigger, so this is the statement's own count.
                #[allow(unsafe_code)]
                let after = unsafe { ffi::sqlite3_total_changes64(db) };
                changed = u64::try_from(after - before).unwrap_or(0);
            }
        }
        Ok(changed)
    }

    /// The prepared statement for `sql` (`None` for a part that is only white space or
    /// comments), preparing and keeping it on first use.
    fn prepare(&mut self, sql: &str) -> Result<Option<NonNull<ffi::sqlite3_stmt>>, DirectError> {
        if let Some(&statement) = self.prepared.get(sql) {
            return Ok(Some(statement));
        }
        let db = self.handle.as_raw_handle().as_ptr();
        let length = c_int::try_from(sql.len()).map_err(|_| DirectError::NotOneStatementEach)?;
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
        if rc != ffi::SQLITE_OK {
            return Err(DirectError::Failed(self.last_error()));
        }
        let Some(statement) = NonNull::new(statement) else {
            return Ok(None);
        };
        // SAFETY: on success `tail` points into `sql`, at or after its start.
        #[allow(unsafe_code)]
        let used = usize::try_from(unsafe { tail.offset_from(sql.as_ptr().cast()) }).unwrap_or(0);
        let rest = sql.get(used..).unwrap_or_default();
        if rest.chars().any(|c| !c.is_whitespace() && c != ';') {
            // SAFETY: prepared above and not kept anywhere.
            #[allow(unsafe_code)]
            unsafe {
                ffi::sqlite3_finalize(statement.as_ptr())
            };
            return Err(DirectError::NotOneStatementEach);
        }
        self.prepared.insert(sql.into(), statement);
        Ok(Some(statement))
    }

    /// Binds `args` to `statement`, steps it to the end and resets it.
    fn step(
        &mut self,
        statement: NonNull<ffi::sqlite3_stmt>,
        args: &[Arg],
        mut rows: Option<&mut Vec<String>>,
    ) -> Result<(), sqlx::Error> {
        let statement = statement.as_ptr();
        let result = self.bind(statement, args).and_then(|()| {
            loop {
                // SAFETY: `statement` was prepared on the locked connection and its text
                // arguments (bound without copying) live in `args` until it is reset below.
                #[allow(unsafe_code)]
                match unsafe { ffi::sqlite3_step(statement) } {
                    ffi::SQLITE_DONE => break Ok(()),
                    ffi::SQLITE_ROW => {
                        if let Some(rows) = rows.as_deref_mut() {
                            rows.push(column_text(statement));
                        }
                    }
                    _ => break Err(self.last_error()),
                }
            }
        });
        // SAFETY: as above; resetting also drops the borrowed arguments before they go.
        #[allow(unsafe_code)]
        unsafe {
            ffi::sqlite3_reset(statement);
            ffi::sqlite3_clear_bindings(statement);
        }
        result
    }

    /// Binds `args` to `statement`'s parameters, which must number as many.
    fn bind(&mut self, statement: *mut ffi::sqlite3_stmt, args: &[Arg]) -> Result<(), sqlx::Error> {
        // SAFETY: `statement` was prepared on the locked connection.
        #[allow(unsafe_code)]
        let wanted = unsafe { ffi::sqlite3_bind_parameter_count(statement) };
        if usize::try_from(wanted).ok() != Some(args.len()) {
            return Err(sqlx::Error::Protocol(format!(
                "a statement has {wanted} parameters but {} arguments were given",
                args.len()
            )));
        }
        for (index, arg) in (1..).zip(args) {
            // SAFETY: `index` is within the parameter count checked above; a text is bound
            // without a copy (`SQLITE_STATIC`) and outlives the statement's use of it, which
            // ends when `step` resets the statement.
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
                return Err(self.last_error());
            }
        }
        Ok(())
    }

    /// The connection's last error, as sqlx reports SQLite's errors.
    fn last_error(&mut self) -> sqlx::Error {
        match self.handle.last_error() {
            Some(e) => sqlx::Error::Database(Box::new(e)),
            None => sqlx::Error::Protocol("SQLite reported an error without a code".into()),
        }
    }

    /// Finalizes every prepared statement.
    fn finalize_all(&mut self) {
        for (_, statement) in self.prepared.drain() {
            // SAFETY: prepared on the locked connection, removed from the map, not used again.
            #[allow(unsafe_code)]
            unsafe {
                ffi::sqlite3_finalize(statement.as_ptr())
            };
        }
    }
}

impl Drop for DirectConnection {
    fn drop(&mut self) {
        // While the lock is still held: sqlx closes the connection later, and closing fails
        // (sqlx panics) while statements of ours are open on it.
        self.finalize_all();
    }
}

/// The first column of the row `statement` is on, as text (empty for NULL).
fn column_text(statement: *mut ffi::sqlite3_stmt) -> String {
    // SAFETY: `statement` is on a row; the text pointer is valid for the length SQLite gives
    // until the statement steps again, and it is copied before that.
    #[allow(unsafe_code)]
    unsafe {
        let text = ffi::sqlite3_column_text(statement, 0);
        let length = usize::try_from(ffi::sqlite3_column_bytes(statement, 0)).unwrap_or(0);
        if text.is_null() {
            return String::new();
        }
        String::from_utf8_lossy(std::slice::from_raw_parts(text, length)).into_owned()
    }
}
