//! The durable outbox. A delivery row is written in the same transaction as the event or
//! invocation that caused it; workers claim due rows with a lease (`FOR UPDATE SKIP LOCKED` on
//! PostgreSQL, the single-writer `UPDATE … RETURNING` on SQLite) and record each attempt's
//! outcome afterwards, never holding a transaction across the HTTP call.
//!
//! `attempts` is incremented when a delivery is claimed, so a worker that dies mid-send and the
//! worker that later reclaims the lease send different attempt numbers: no attempt is sent twice.

use std::sync::Arc;

use crate::db::{Arg, Database, Dialect, Tx, now_ms};
use crate::{args, ids};

/// What a delivery carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An event.
    Event,
    /// An action request for an invocation.
    Action,
}

impl Kind {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Action => "action",
        }
    }
}

/// A delivery to create.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    /// Owning tenant.
    pub tenant_id: String,
    /// Target endpoint.
    pub endpoint_id: String,
    /// Event or action.
    pub kind: Kind,
    /// The event it carries, if any.
    pub event_id: Option<String>,
    /// The invocation it carries, if any.
    pub invocation_id: Option<String>,
    /// Event type or action name.
    pub label: String,
    /// Stable across attempts and replays.
    pub idempotency_key: Option<String>,
    /// The exact body to send.
    pub body: Arc<str>,
}

/// A delivery held by a worker for one attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Job {
    /// `dlv_…`.
    pub id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// Target endpoint.
    pub endpoint_id: String,
    /// `event` or `action`.
    pub kind: String,
    /// Event type or action name.
    pub label: String,
    /// Stable across attempts.
    pub idempotency_key: String,
    /// The exact body.
    pub body: String,
    /// The number of this attempt.
    pub attempts: i64,
    /// Retry schedule step of this attempt.
    pub schedule_index: i64,
    /// When this retry cycle began (ms).
    pub cycle_started_at: Option<i64>,
    /// When the lease ends (ms).
    pub lease_until: Option<i64>,
    /// The invocation it carries, if any.
    pub invocation_id: Option<String>,
    /// The event it carries, if any.
    pub event_id: Option<String>,
}

impl Job {
    /// Whether this is an action request.
    pub fn is_action(&self) -> bool {
        self.kind == "action"
    }
}

/// Who holds new deliveries: this process's worker (handed over in memory) or nobody yet.
#[derive(Debug, Clone)]
pub enum Lease {
    /// Leased to `node` until `until` (ms); the creating request hands them to the worker.
    To {
        /// The worker's node id.
        node: String,
        /// Lease end (ms).
        until: i64,
    },
    /// Left pending for any worker to claim.
    Pending,
}

const JOB_COLUMNS: &str = "id, tenant_id, endpoint_id, kind, label, idempotency_key, body, attempts, \
    schedule_index, cycle_started_at, lease_until, invocation_id, event_id";

/// Inserts deliveries (in the caller's transaction) and returns them as jobs. Leased rows start
/// at attempt 1 in the hands of `lease`'s worker; pending rows (`lease_until` empty) wait for a
/// claim and must not be handed to a worker directly.
pub async fn insert(
    tx: &mut Tx,
    deliveries: Vec<NewDelivery>,
    lease: &Lease,
    now: i64,
) -> Result<Vec<Job>, sqlx::Error> {
    let mut jobs = Vec::with_capacity(deliveries.len());
    for chunk in crate::db::chunks(tx.dialect(), &deliveries) {
        let mut sql = String::from(
            "INSERT INTO deliveries (id, tenant_id, endpoint_id, kind, event_id, invocation_id, label, \
             idempotency_key, body, status, attempts, schedule_index, cycle_started_at, next_attempt_at, \
             lease_until, leased_by, created_at, updated_at) VALUES ",
        );
        let mut values: Vec<Arg> = Vec::with_capacity(chunk.len() * 18);
        for (i, d) in chunk.iter().enumerate() {
            let id = ids::new_id("dlv");
            let idempotency_key = d
                .idempotency_key
                .clone()
                .unwrap_or_else(|| format!("idem_{}", &id[4..]));
            let (status, attempts, lease_until, leased_by) = match lease {
                Lease::To { node, until } => ("delivering", 1, Some(*until), Some(node.clone())),
                Lease::Pending => ("pending", 0, None, None),
            };
            if i > 0 {
                sql.push_str(", ");
            }
            let n = i * 18;
            sql.push('(');
            sql.push_str(
                &(1..=18)
                    .map(|k| format!("${}", n + k))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            sql.push(')');
            values.extend(args![
                &id,
                &d.tenant_id,
                &d.endpoint_id,
                d.kind.as_str(),
                d.event_id.clone(),
                d.invocation_id.clone(),
                &d.label,
                &idempotency_key,
                &*d.body,
                status,
                attempts,
                0i64,
                now,
                now,
                lease_until,
                leased_by,
                now,
                now
            ]);
            jobs.push(Job {
                id,
                tenant_id: d.tenant_id.clone(),
                endpoint_id: d.endpoint_id.clone(),
                kind: d.kind.as_str().into(),
                label: d.label.clone(),
                idempotency_key,
                body: d.body.to_string(),
                attempts,
                schedule_index: 0,
                cycle_started_at: Some(now),
                lease_until,
                invocation_id: d.invocation_id.clone(),
                event_id: d.event_id.clone(),
            });
        }
        tx.defer(sqlx::AssertSqlSafe(sql), values).await?;
    }
    Ok(jobs)
}

/// Claims up to `limit` deliveries that are due, or whose lease expired, for `node`.
pub async fn claim_due(
    db: &Database,
    node: &str,
    now: i64,
    lease_ms: i64,
    limit: i64,
) -> Result<Vec<Job>, sqlx::Error> {
    let pick = match db.dialect() {
        Dialect::Postgres => {
            "SELECT id FROM deliveries WHERE (status = 'pending' AND next_attempt_at <= $1) \
             OR (status = 'delivering' AND lease_until < $1) ORDER BY next_attempt_at LIMIT $2 \
             FOR UPDATE SKIP LOCKED"
        }
        Dialect::Sqlite => {
            "SELECT id FROM deliveries WHERE (status = 'pending' AND next_attempt_at <= $1) \
             OR (status = 'delivering' AND lease_until < $1) ORDER BY next_attempt_at LIMIT $2"
        }
    };
    let sql = format!(
        "UPDATE deliveries SET status = 'delivering', attempts = attempts + 1, lease_until = $3, \
         leased_by = $4, cycle_started_at = COALESCE(cycle_started_at, $1), updated_at = $1 \
         WHERE id IN ({pick}) RETURNING {JOB_COLUMNS}"
    );
    let mut tx = db.begin().await?;
    let jobs = tx
        .fetch_all(sqlx::AssertSqlSafe(sql), args![now, limit, now + lease_ms, node])
        .await?;
    tx.commit().await?;
    Ok(jobs)
}

/// When the earliest pending delivery falls due (ms), if any is pending.
pub async fn next_due(db: &Database) -> Result<Option<i64>, sqlx::Error> {
    let row: Option<(Option<i64>,)> = db
        .fetch_optional(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE status = 'pending'",
            Vec::new(),
        )
        .await?;
    Ok(row.and_then(|(at,)| at))
}

/// Extends a lease this node still holds for this attempt; false if another worker took over.
pub async fn extend_lease(db: &Database, job: &Job, node: &str, until: i64) -> Result<bool, sqlx::Error> {
    let n = db
        .execute(
            "UPDATE deliveries SET lease_until = $1 WHERE id = $2 AND leased_by = $3 AND attempts = $4 \
             AND status = 'delivering'",
            args![until, &job.id, node, job.attempts],
        )
        .await?;
    Ok(n == 1)
}

/// Gives deliveries leased to `node` but never attempted back to the outbox, due now (on
/// shutdown). Answers how many were still held; the others had been taken over.
pub async fn release(db: &Database, node: &str, jobs: &[Job], now: i64) -> Result<u64, sqlx::Error> {
    let mut tx = db.begin().await?;
    let mut released = 0;
    for job in jobs {
        released += tx
            .execute(
                "UPDATE deliveries SET status = 'pending', attempts = attempts - 1, next_attempt_at = $1, \
                 lease_until = NULL, leased_by = NULL, updated_at = $1 \
                 WHERE id = $2 AND leased_by = $3 AND attempts = $4 AND status = 'delivering'",
                args![now, &job.id, node, job.attempts],
            )
            .await?;
    }
    tx.commit().await?;
    Ok(released)
}

/// Makes an endpoint's deliveries waiting for their turn due at `$1` (now), given `$2` (tenant)
/// and `$3` (endpoint): their due times were spaced at limits or a pace that no longer hold.
/// Those not yet attempted only: a retry keeps its backoff. The `|| ''` keeps both databases on
/// the small index of pending rows, not the endpoint's whole history.
pub const WAITING_DUE_NOW: &str = "UPDATE deliveries SET next_attempt_at = $1 \
     WHERE status = 'pending' AND next_attempt_at > $1 \
     AND (tenant_id || '') = $2 AND (endpoint_id || '') = $3 AND schedule_index = 0";

/// Makes a pending delivery due at `now` (not later), if it still waits.
pub async fn due_now(db: &Database, delivery_id: &str, now: i64) -> Result<(), sqlx::Error> {
    db.execute(
        "UPDATE deliveries SET next_attempt_at = $1 WHERE id = $2 AND status = 'pending' AND next_attempt_at > $1",
        args![now, delivery_id],
    )
    .await
    .map(drop)
}

/// Gives a delivery leased to `node` but not attempted back to the outbox, due at `at` (its
/// endpoint's limit has enough waiting already). Waiting is not an attempt: a delivery not yet
/// attempted starts its 24-hour retry window when it is. Answers whether it was still held.
pub async fn defer(db: &Database, node: &str, job: &Job, at: i64) -> Result<bool, sqlx::Error> {
    let n = db
        .execute(
            "UPDATE deliveries SET status = 'pending', attempts = attempts - 1, next_attempt_at = $1, \
             lease_until = NULL, leased_by = NULL, updated_at = $2, \
             cycle_started_at = CASE WHEN schedule_index = 0 THEN NULL ELSE cycle_started_at END \
             WHERE id = $3 AND leased_by = $4 AND attempts = $5 AND status = 'delivering'",
            args![at, now_ms(), &job.id, node, job.attempts],
        )
        .await?;
    Ok(n == 1)
}

/// Puts an endpoint's failed deliveries from `first_id` on back in the queue, due now, as
/// [`requeue`] does; only those still failed when the statement runs. Returns how many.
pub async fn requeue_failed(
    db: &Database,
    tenant_id: &str,
    endpoint_id: &str,
    first_id: &str,
    now: i64,
) -> Result<u64, sqlx::Error> {
    db.execute(
        "UPDATE deliveries SET status = 'pending', next_attempt_at = $1, schedule_index = 0, \
         cycle_started_at = NULL, lease_until = NULL, leased_by = NULL, updated_at = $1 \
         WHERE tenant_id = $2 AND endpoint_id = $3 AND status = 'failed' AND id >= $4",
        args![now, tenant_id, endpoint_id, first_id],
    )
    .await
}

/// Puts a delivery back in the queue now (replay): same id and idempotency key, a fresh retry
/// cycle. Answers false if it does not exist or is being sent right now.
pub async fn requeue(tx: &mut Tx, tenant_id: &str, id: &str, now: i64) -> Result<bool, sqlx::Error> {
    let n = tx
        .execute(
            "UPDATE deliveries SET status = 'pending', next_attempt_at = $1, schedule_index = 0, \
             cycle_started_at = NULL, lease_until = NULL, leased_by = NULL, updated_at = $1 \
             WHERE tenant_id = $2 AND id = $3 AND (status <> 'delivering' OR lease_until < $1)",
            args![now, tenant_id, id],
        )
        .await?;
    Ok(n == 1)
}
