//! The storage layer: one [`Database`] that is either an embedded SQLite file or a PostgreSQL
//! server, chosen by the URL at run time. Queries are written once with `$n` placeholders (both
//! drivers accept them) and run on either pool through the [`on_pool!`](crate::on_pool) macro;
//! the few statements that differ (claiming work) are written per dialect where they are used.
//!
//! SQLite gets two pools: many readers and exactly one writer, so writers queue in-process
//! instead of spinning on `SQLITE_BUSY`, and a write transaction is `BEGIN IMMEDIATE`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

/// Storage failures; the HTTP layer turns every one of them into a 500 without details.
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
}

/// One connection pool of either kind.
#[derive(Debug, Clone)]
pub enum Pool {
    /// An embedded SQLite file.
    Sqlite(SqlitePool),
    /// A PostgreSQL server.
    Postgres(PgPool),
}

/// Runs the same sqlx code on whichever pool this is; `$pool` is bound to the concrete pool.
#[macro_export]
macro_rules! on_pool {
    ($pool_expr:expr, |$pool:ident| $body:expr) => {
        match $pool_expr {
            $crate::db::Pool::Sqlite($pool) => $body,
            $crate::db::Pool::Postgres($pool) => $body,
        }
    };
}

/// Begins a write transaction on `$pool_expr` (`BEGIN IMMEDIATE` on SQLite), binds it to `$tx`
/// and runs `$body`, which must evaluate to `Result<T, E>` with `E: From<sqlx::Error>`; commits
/// on `Ok`, rolls back on `Err`.
#[macro_export]
macro_rules! in_tx {
    ($pool_expr:expr, |$tx:ident| $body:expr) => {
        match $pool_expr {
            $crate::db::Pool::Sqlite(pool) => {
                let mut $tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let out = $body;
                if out.is_ok() {
                    $tx.commit().await?;
                }
                out
            }
            $crate::db::Pool::Postgres(pool) => {
                let mut $tx = pool.begin().await?;
                let out = $body;
                if out.is_ok() {
                    $tx.commit().await?;
                }
                out
            }
        }
    };
}

/// The database handle every capability uses; cheap to clone.
#[derive(Debug, Clone)]
pub struct Database {
    read: Pool,
    write: Pool,
}

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
        let db = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // With WAL, NORMAL keeps every committed transaction across a process crash;
                // only an OS crash or power loss can drop the last commits.
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                .pragma("temp_store", "memory")
                .pragma("cache_size", "-32000");
            let write = SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(options.clone())
                .await?;
            sqlx::migrate!("migrations/sqlite").run(&write).await?;
            let read = SqlitePoolOptions::new()
                .max_connections(8)
                .min_connections(1)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(options.read_only(true))
                .await?;
            Self {
                read: Pool::Sqlite(read),
                write: Pool::Sqlite(write),
            }
        } else {
            let options = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(options)
                .await?;
            // Two replicas starting at once must not both apply the same migration.
            sqlx::migrate!("migrations/postgres").run(&pool).await?;
            Self {
                read: Pool::Postgres(pool.clone()),
                write: Pool::Postgres(pool),
            }
        };
        Ok(db)
    }

    /// The pool for queries that only read.
    pub fn reader(&self) -> &Pool {
        &self.read
    }

    /// The pool for statements that write (on SQLite, the single writer connection).
    pub fn writer(&self) -> &Pool {
        &self.write
    }

    /// Which dialect this database speaks.
    pub fn dialect(&self) -> Dialect {
        match self.write {
            Pool::Sqlite(_) => Dialect::Sqlite,
            Pool::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Answers whether the database is reachable (for `/readyz`).
    pub async fn ping(&self) -> bool {
        on_pool!(&self.read, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .is_ok())
    }

    /// Closes every connection, waiting for queries in progress.
    pub async fn close(&self) {
        on_pool!(&self.read, |pool| pool.close().await);
        on_pool!(&self.write, |pool| pool.close().await);
    }
}

/// `INSERT … ON CONFLICT` that bumps a named change counter (read by caches and MCP sessions).
pub fn bump_counter_query<'q, DB>(
    name: &str,
    _now: i64,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>
where
    DB: sqlx::Database,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sqlx::query(
        "INSERT INTO change_counters (name, version) VALUES ($1, 1) \
         ON CONFLICT (name) DO UPDATE SET version = change_counters.version + 1",
    )
    .bind(name.to_string())
}

/// The current value of a change counter (0 if never bumped).
pub async fn counter(db: &Database, name: &str) -> Result<i64, DbError> {
    let row: Option<(i64,)> = crate::on_pool!(db.reader(), |pool| {
        sqlx::query_as("SELECT version FROM change_counters WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?
    });
    Ok(row.map(|r| r.0).unwrap_or(0))
}

/// Unix time in milliseconds, the representation of every timestamp column.
pub fn now_ms() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000
}

/// Formats a stored millisecond timestamp as RFC 3339 for API answers.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// Parses an RFC 3339 timestamp (as accepted by `since` filters) into unix milliseconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}
