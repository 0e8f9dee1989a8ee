//! Retention: deliveries that are settled (succeeded or failed), their attempts, and events older
//! than the retention period are deleted in small batches, so the purge never holds the writer
//! for long. Expired idempotency records, MCP sessions and idle shared rate buckets go the same
//! way.

use std::time::Duration;

use tokio::sync::watch;

use crate::db::{Database, now_ms};
use crate::{args, ids};

/// Rows deleted per statement.
const BATCH: i64 = 500;

/// Purges every `interval` until `stop` turns true.
pub async fn purge_loop(
    db: Database,
    retention: Duration,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match purge_once(&db, now_ms() - retention.as_millis() as i64).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "retention purge"),
            Err(e) => tracing::warn!(error = %e, "retention purge failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Deletes everything settled before `cutoff` (unix ms), and what has expired or gone idle;
/// returns how many deliveries went.
pub async fn purge_once(db: &Database, cutoff: i64) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let ids: Vec<(String,)> = db
            .fetch_all(
                "SELECT id FROM deliveries WHERE id < $1 AND status IN ('succeeded', 'failed') LIMIT $2",
                args![ids::time_floor("dlv", cutoff), BATCH],
            )
            .await?;
        if ids.is_empty() {
            break;
        }
        let list = crate::db::in_list(ids.len());
        let values: Vec<crate::db::Arg> = ids.iter().map(|(id,)| id.into()).collect();
        let mut tx = db.begin().await?;
        // Settled is checked again here: a delivery replayed or recovered since the SELECT is
        // owed again and stays.
        let deleted: Vec<(String,)> = tx
            .fetch_all(
                sqlx::AssertSqlSafe(format!(
                    "DELETE FROM deliveries WHERE id IN ({list}) AND status IN ('succeeded', 'failed') \
                     RETURNING id"
                )),
                values,
            )
            .await?;
        if !deleted.is_empty() {
            tx.execute(
                sqlx::AssertSqlSafe(format!(
                    "DELETE FROM delivery_attempts WHERE delivery_id IN ({})",
                    crate::db::in_list(deleted.len())
                )),
                deleted.iter().map(|(id,)| id.into()).collect(),
            )
            .await?;
        }
        tx.commit().await?;
        total += deleted.len() as u64;
    }
    // Events go once none of their deliveries is left.
    loop {
        let n = db
            .execute(
                "DELETE FROM events WHERE id IN (SELECT e.id FROM events e WHERE e.id < $1 \
                 AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id) LIMIT $2)",
                args![ids::time_floor("evt", cutoff), BATCH],
            )
            .await?;
        if n < BATCH as u64 {
            break;
        }
    }
    db.execute(
        "DELETE FROM idempotency_records WHERE expires_at < $1",
        args![now_ms()],
    )
    .await?;
    // MCP sessions go once ended (DELETE) or past their lifetime.
    loop {
        let n = db
            .execute(
                "DELETE FROM mcp_sessions WHERE id IN (SELECT id FROM mcp_sessions \
                 WHERE ended_at IS NOT NULL OR created_at <= $1 LIMIT $2)",
                args![now_ms() - crate::mcp::SESSION_LIFETIME_MS, BATCH],
            )
            .await?;
        if n < BATCH as u64 {
            break;
        }
    }
    crate::rate::purge_idle_buckets(db).await?;
    super::slots::purge_lapsed_slots(db).await?;
    Ok(total)
}
