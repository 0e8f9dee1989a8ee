//! PostgreSQL write transactions that begin only when they must.
//!
//! Every statement sent to PostgreSQL is a round trip, and `BEGIN` and `COMMIT` are two more. A
//! group-commit batch that only inserts (an event and its deliveries; an invocation, its
//! idempotency record, delivery and `action.invoked` event) reads nothing back, so its
//! statements are held until the commit and sent as one statement, the first ones as
//! data-modifying `WITH` clauses. A single statement is atomic on its own: one round trip
//! instead of four or more, and no `BEGIN`/`COMMIT`. Anything else (an update, a read, an
//! `ON CONFLICT`) opens a real transaction first and sends what was held, in order.

use sqlx::{PgPool, Postgres, Transaction};

use super::{Arg, Row, Target};

/// Held inserts are sent as one statement up to this many arguments; larger batches (where a
/// round trip matters less) keep one statement each. Each distinct combination is a statement
/// text of its own, prepared and cached per connection (sqlx evicts the least recently used),
/// so this cap also bounds how large those texts get.
const COMBINED_ARGS_MAX: usize = 2_000;

/// A write transaction on PostgreSQL; rolled back if dropped uncommitted.
pub struct PgTx {
    pool: PgPool,
    /// Opened at the first statement that must run before the commit.
    open: Option<Transaction<'static, Postgres>>,
    /// Statements held for the commit (or for the transaction, once one is opened).
    held: Vec<(String, Vec<Arg>)>,
}

impl PgTx {
    /// A transaction on `pool`; nothing is sent yet.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            open: None,
            held: Vec::new(),
        }
    }

    /// Holds a statement whose result nobody reads until the next statement or the commit.
    pub fn defer(&mut self, sql: impl sqlx::SqlSafeStr, args: Vec<Arg>) {
        self.held.push((sql.into_sql_str().as_str().to_string(), args));
    }

    /// The open transaction, beginning it and sending what was held first if needed.
    async fn transaction(&mut self) -> Result<&mut Transaction<'static, Postgres>, sqlx::Error> {
        let tx = match self.open {
            Some(ref mut tx) => tx,
            None => self.open.insert(self.pool.begin().await?),
        };
        for (sql, args) in self.held.drain(..) {
            Target::PgTransaction(tx)
                .execute(sqlx::AssertSqlSafe(sql), args)
                .await?;
        }
        Ok(tx)
    }

    /// Sends what was held.
    pub async fn flush(&mut self) -> Result<(), sqlx::Error> {
        self.transaction().await.map(|_| ())
    }

    /// Runs a statement now; returns the number of rows it affected.
    pub async fn execute(&mut self, sql: impl sqlx::SqlSafeStr, args: Vec<Arg>) -> Result<u64, sqlx::Error> {
        Target::PgTransaction(self.transaction().await?)
            .execute(sql, args)
            .await
    }

    /// Runs a statement now and returns every row.
    pub async fn fetch_all<T: Row>(
        &mut self,
        sql: impl sqlx::SqlSafeStr,
        args: Vec<Arg>,
    ) -> Result<Vec<T>, sqlx::Error> {
        Target::PgTransaction(self.transaction().await?)
            .fetch_all(sql, args)
            .await
    }

    /// Runs a statement now and returns its first row.
    pub async fn fetch_optional<T: Row>(
        &mut self,
        sql: impl sqlx::SqlSafeStr,
        args: Vec<Arg>,
    ) -> Result<Option<T>, sqlx::Error> {
        Target::PgTransaction(self.transaction().await?)
            .fetch_optional(sql, args)
            .await
    }

    /// Commits: held inserts alone go as one statement; otherwise the transaction is opened if
    /// it is not yet, sent what was held, and committed.
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        if self.open.is_none() {
            if self.held.is_empty() {
                return Ok(());
            }
            if let Some((sql, args)) = combine(&mut self.held) {
                Target::PgPool(&self.pool)
                    .execute(sqlx::AssertSqlSafe(sql), args)
                    .await?;
                return Ok(());
            }
        }
        self.transaction().await?;
        match self.open.take() {
            Some(tx) => tx.commit().await,
            None => Ok(()),
        }
    }

    /// Rolls back whatever was sent; what was held is dropped unsent.
    pub async fn rollback(mut self) {
        if let Some(tx) = self.open.take() {
            let _ = tx.rollback().await;
        }
    }
}

/// The held statements as one: a lone statement as it is; several if they are all plain
/// `INSERT … VALUES` (no `SELECT`, `ON CONFLICT` or `RETURNING`: as `WITH` clauses they run on
/// one snapshot and cannot see each other's rows, which only such an insert cannot tell) within
/// [`COMBINED_ARGS_MAX`]. Takes them out of `held` when it combines them.
fn combine(held: &mut Vec<(String, Vec<Arg>)>) -> Option<(String, Vec<Arg>)> {
    if held.len() == 1 {
        return held.pop();
    }
    let plain_insert = |sql: &str| {
        let upper = sql.to_ascii_uppercase();
        upper.trim_start().starts_with("INSERT INTO ")
            && !["SELECT", "ON CONFLICT", "RETURNING"]
                .iter()
                .any(|word| upper.contains(word))
    };
    let total_args: usize = held.iter().map(|(_, args)| args.len()).sum();
    if total_args > COMBINED_ARGS_MAX || !held.iter().all(|(sql, _)| plain_insert(sql)) {
        return None;
    }
    let mut statements = std::mem::take(held).into_iter();
    let (last_sql, last_args) = statements.next_back()?;
    let mut sql = String::new();
    let mut args = Vec::with_capacity(total_args);
    for (k, (statement, statement_args)) in statements.enumerate() {
        sql.push_str(if k == 0 { "WITH " } else { ", " });
        sql.push_str(&format!("held_{k} AS ("));
        sql.push_str(&super::sql::renumber(&statement, args.len()));
        sql.push_str(")\n");
        args.extend(statement_args);
    }
    sql.push_str(&super::sql::renumber(&last_sql, args.len()));
    args.extend(last_args);
    Some((sql, args))
}

#[cfg(test)]
mod tests {
    use super::combine;
    use crate::db::Arg;

    fn held(statements: &[(&str, usize)]) -> Vec<(String, Vec<Arg>)> {
        statements
            .iter()
            .map(|(sql, n)| (sql.to_string(), (0..*n as i64).map(Arg::Int).collect()))
            .collect()
    }

    #[test]
    fn plain_inserts_become_one_statement_numbered_through() {
        let mut statements = held(&[
            ("INSERT INTO a (x, y) VALUES ($1, $2)", 2),
            ("INSERT INTO b (x) VALUES ($1), ($2)", 2),
            ("INSERT INTO c (x) VALUES ($1)", 1),
        ]);
        let (sql, args) = combine(&mut statements).expect("combinable");
        assert_eq!(
            sql,
            "WITH held_0 AS (INSERT INTO a (x, y) VALUES ($1, $2))\n, held_1 AS (INSERT INTO b (x) VALUES ($3), ($4))\nINSERT INTO c (x) VALUES ($5)"
        );
        assert_eq!(args.len(), 5);
        assert!(statements.is_empty());
    }

    #[test]
    fn anything_but_plain_inserts_is_left_alone() {
        for other in [
            "UPDATE a SET x = $1",
            "INSERT INTO a (x) VALUES ($1) ON CONFLICT (x) DO NOTHING",
            "INSERT INTO a (x) VALUES ($1) RETURNING x",
            "INSERT INTO a (x) SELECT x FROM b WHERE y = $1",
        ] {
            let mut statements = held(&[("INSERT INTO b (x) VALUES ($1)", 1), (other, 1)]);
            assert!(combine(&mut statements).is_none(), "{other}");
            assert_eq!(statements.len(), 2);
        }
        let mut big = held(&[
            ("INSERT INTO b (x) VALUES ($1)", 1),
            ("INSERT INTO b (x) VALUES ($1)", super::COMBINED_ARGS_MAX),
        ]);
        assert!(combine(&mut big).is_none());
        let mut lone = held(&[("UPDATE a SET x = $1", 1)]);
        assert_eq!(
            combine(&mut lone).map(|(sql, _)| sql).as_deref(),
            Some("UPDATE a SET x = $1")
        );
    }
}
