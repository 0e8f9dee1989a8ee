//! The audit log: every configuration change an admin API key makes through the API (creating,
//! changing, deleting or rotating anything; deciding an approval; replaying a delivery), and
//! every reading of an endpoint's secret, as one row per tenant in a hash chain. Each row's hash
//! is an HMAC, under a key derived from the master key, of its fields and the previous row's
//! hash: editing, deleting or reordering a row breaks the chain from there on, and whoever can
//! write to the database but does not hold the master key cannot forge hashes that verify.
//! `opsiq audit verify` walks every chain and names the first row that does not hold. (Rows cut
//! from a chain's end leave a shorter chain that holds: the log proves what was recorded, not
//! that nothing followed.)
//!
//! A middleware prepares each change's row; the first transaction of the request that changes a
//! row writes it before its own `COMMIT`, so a change and its row are committed together or not
//! at all (a crash cannot keep one without the other, and a row that cannot be written fails the
//! change, which is then safe to retry). A change made in a task of its own takes the row along
//! through [`carry`]. What changes no row in a transaction of the request's task — a secret read —
//! has its row written after it succeeded, before the answer leaves. The change and its row run
//! in a task of their own, so a client hanging up cancels neither. A row keeps who, which route,
//! which path and the request id, never a body, so no secret reaches the log.
//! Agents' invocations and ingested events are the data plane, recorded in their own tables.
//! An action file applied at start (or by `opsiq init`) that changes an action is recorded as
//! made by `file:<name>` ([`by_file`]); creating a tenant with `opsiq init` is not recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::db::{Database, DbError, Dialect, Tx, now_ms, rfc3339};
use crate::http::{AdminAuth, ApiError, ApiResult, Page, PageQuery, Permission, Query};
use crate::{AppState, args, ids};

/// The `prev_hash` of a chain's first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Routes that take a POST but change no configuration (dry runs, checks) or belong to the data
/// plane (invocations, events, MCP), which have records of their own.
const NOT_AUDITED: &[&str] = &[
    "/v1/actions/{name}/invoke",
    "/v1/events",
    "/v1/preview",
    "/v1/signatures/verify",
    "/v1/rules/test",
    "/v1/rules/{id}/test",
    "/mcp",
];

/// Reads audited like changes: they reveal a secret.
const AUDITED_READS: &[&str] = &["/v1/endpoints/{id}/secret"];

/// Longest client-chosen request id kept in a row.
const MAX_REQUEST_ID: usize = 128;

/// `GET /v1/audit`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/audit", get(list))
}

/// Who made a change, filled in by [`AdminAuth`] when the request authenticates.
#[derive(Clone, Default)]
pub struct AuditActor(Arc<Mutex<Option<Actor>>>);

/// The maker of a change and the tenant whose chain records it.
#[derive(Clone)]
struct Actor {
    tenant_id: String,
    /// `key:<id>` for an API key, `file:<name>` for a declarative file.
    name: String,
}

impl AuditActor {
    /// Records the authenticated caller of this request.
    pub fn set(&self, auth: &AdminAuth) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Actor {
            tenant_id: auth.tenant_id.clone(),
            name: auth.actor(),
        });
    }

    fn get(&self) -> Option<Actor> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

tokio::task_local! {
    /// The row of the change the current task is making, until a transaction writes it.
    static PENDING_ROW: Arc<PendingRow>;
}

/// A change's audit row before it is written.
struct PendingRow {
    actor: AuditActor,
    action: String,
    target: String,
    /// The request id, and what the change noted of itself (see [`note`]).
    details: Mutex<serde_json::Map<String, Value>>,
    key: [u8; 32],
    /// Whether the transaction under way has changed a row.
    changed: AtomicBool,
    /// Whether a committed transaction holds the row.
    written: AtomicBool,
}

impl PendingRow {
    /// A row for `action` on `target` by `actor`, hashed under `key`, noting `details`.
    fn new(
        actor: AuditActor,
        (action, target): (String, String),
        details: serde_json::Map<String, Value>,
        key: &[u8; 32],
    ) -> Arc<Self> {
        Arc::new(Self {
            actor,
            action,
            target,
            details: Mutex::new(details),
            key: *key,
            changed: AtomicBool::new(false),
            written: AtomicBool::new(false),
        })
    }

    /// The row's details as the JSON text its hash covers.
    fn details(&self) -> String {
        Value::Object(self.details.lock().unwrap_or_else(|e| e.into_inner()).clone()).to_string()
    }

    /// The row, made by `actor` of `tenant_id`, with `details` from [`details`](Self::details).
    fn entry<'a>(&'a self, tenant_id: &'a str, actor: &'a str, details: &'a str) -> Entry<'a> {
        Entry {
            tenant_id,
            actor,
            action: &self.action,
            target: &self.target,
            details,
        }
    }

    /// Logs and counts a row that could not be written; `outcome` says what became of the change.
    fn report_failure(&self, error: &dyn std::fmt::Display, outcome: &str) {
        metrics::counter!("opsiq_audit_failures_total").increment(1);
        tracing::error!(%error, action = %self.action, target = %self.target, "writing the audit row failed; {outcome}");
    }
}

/// Adds a fact to the audit row of the change the current task is making — the id of what it
/// creates, say, which the request path cannot name — if it makes one. Never a secret.
pub fn note(key: &str, value: impl Into<Value>) {
    let _ = PENDING_ROW.try_with(|p| {
        p.details
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), value.into());
    });
}

/// Runs `change` (to be spawned) with the audit row of the change the current task is making, so
/// that its transactions write that row as the task's own would.
pub fn carry<F: std::future::Future>(change: F) -> impl std::future::Future<Output = F::Output> {
    let pending = PENDING_ROW.try_with(Arc::clone).ok();
    async move {
        match pending {
            Some(pending) => PENDING_ROW.scope(pending, change).await,
            None => change.await,
        }
    }
}

/// Notes that a transaction begins (the database layer calls this).
pub(crate) fn note_begin() {
    let _ = PENDING_ROW.try_with(|p| p.changed.store(false, Ordering::Relaxed));
}

/// Notes that the transaction under way changed rows (the database layer calls this).
pub(crate) fn note_change() {
    let _ = PENDING_ROW.try_with(|p| p.changed.store(true, Ordering::Relaxed));
}

/// Whether the current task makes an audited change whose row is not written yet.
pub(crate) fn row_pending() -> bool {
    PENDING_ROW
        .try_with(|p| !p.written.load(Ordering::Relaxed))
        .unwrap_or(false)
}

/// Before `tx` commits: writes the current task's pending row in it if it changed rows. Returns
/// whether it did; [`pending_row_committed`] is called once the commit has succeeded.
pub(crate) async fn write_pending_row(tx: &mut Tx) -> Result<bool, sqlx::Error> {
    let Some(pending) = PENDING_ROW
        .try_with(Arc::clone)
        .ok()
        .filter(|p| p.changed.load(Ordering::Relaxed) && !p.written.load(Ordering::Relaxed))
    else {
        return Ok(false);
    };
    // A change before authentication cannot happen: the handlers authenticate first.
    let Some(actor) = pending.actor.get() else {
        return Ok(false);
    };
    let details = pending.details();
    let entry = pending.entry(&actor.tenant_id, &actor.name, &details);
    // Statements the change deferred are sent first, so that their failures are not taken for
    // the row's.
    tx.flush().await?;
    append_in(tx, &pending.key, entry)
        .await
        .inspect_err(|e| pending.report_failure(e, "the change is not made"))?;
    Ok(true)
}

/// After a commit that [`write_pending_row`] wrote the row in: the row is written.
pub(crate) fn pending_row_committed() {
    let _ = PENDING_ROW.try_with(|p| p.written.store(true, Ordering::Relaxed));
}

/// Runs `change`, a change to `tenant_id`'s configuration made from a declarative file named
/// `file` rather than through the API, so that the transaction that changes rows records it as
/// `action` on `target` by `file:<file>` (nothing is recorded if no row changes; a file that
/// takes over an action whose content it already matches changes the action's file record).
pub async fn by_file<F: std::future::Future>(
    key: &[u8; 32],
    (tenant_id, file): (&str, &str),
    (action, target): (&str, &str),
    change: F,
) -> F::Output {
    let actor = AuditActor(Arc::new(Mutex::new(Some(Actor {
        tenant_id: tenant_id.to_string(),
        name: format!("file:{file}"),
    }))));
    let pending = PendingRow::new(
        actor,
        (action.to_string(), target.to_string()),
        serde_json::Map::new(),
        key,
    );
    PENDING_ROW.scope(pending, change).await
}

/// Middleware: after a successful change made with an admin API key (or a secret read), appends
/// its audit row.
pub async fn record_changes(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    // Every API request passes here (agents' calls too): decide before allocating anything.
    let action = match (req.method(), req.extensions().get::<MatchedPath>()) {
        (&Method::POST | &Method::PUT | &Method::PATCH | &Method::DELETE, Some(route))
            if !NOT_AUDITED.contains(&route.as_str()) =>
        {
            format!("{} {}", req.method(), route.as_str())
        }
        (&Method::GET, Some(route)) if AUDITED_READS.contains(&route.as_str()) => {
            format!("GET {}", route.as_str())
        }
        _ => return next.run(req).await,
    };
    let actor = AuditActor::default();
    req.extensions_mut().insert(actor.clone());
    let target = req.uri().path().to_string();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= MAX_REQUEST_ID)
        .map(str::to_string);
    let pending = PendingRow::new(
        actor,
        (action, target),
        serde_json::Map::from_iter([("request_id".to_string(), Value::from(request_id))]),
        state.keys.audit_chain_key(),
    );
    // The change and its row run in a task of their own: a client hanging up drops only this
    // future, so a change is never stopped between its commit and what follows it (announcing
    // it to the other replicas, a row written after it).
    let running = state.unfinished_changes.clone().read_owned().await;
    let change = tokio::spawn(
        async move {
            let _running = running;
            let response = PENDING_ROW.scope(pending.clone(), next.run(req)).await;
            if pending.written.load(Ordering::Relaxed) || !response.status().is_success() {
                return response;
            }
            let Some(actor) = pending.actor.get() else {
                return response;
            };
            let details = pending.details();
            let entry = pending.entry(&actor.tenant_id, &actor.name, &details);
            if let Err(e) = append(&state.db, &pending.key, entry).await {
                pending.report_failure(&e, "the change stands");
            }
            response
        }
        .instrument(tracing::Span::current()),
    );
    match change.await {
        Ok(response) => response,
        // Re-raised here, where the panic layer turns it into the contract's 500.
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the server is shutting down; retry shortly",
        )
        .with_retry_after(1)
        .into_response(),
    }
}

/// One change to record.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// The tenant whose chain it joins.
    pub tenant_id: &'a str,
    /// Who made it (`key:<id>`, `file:<name>`, `cli:<command>`).
    pub actor: &'a str,
    /// What was done: method and route (`DELETE /v1/endpoints/{id}`), or `create tenant`.
    pub action: &'a str,
    /// What it was done to: the request path (the tenant's id for `create tenant`).
    pub target: &'a str,
    /// Anything else worth keeping (never a secret), as JSON text: the hash covers these bytes.
    pub details: &'a str,
}

/// The hash of a row: HMAC-SHA256 under `key` of its fields and its predecessor's hash, taken as
/// a JSON array so that no two different rows serialize alike.
pub fn row_hash(
    key: &[u8],
    prev_hash: &str,
    seq: i64,
    id: &str,
    entry: &Entry<'_>,
    created_at: i64,
) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let canonical = json!([
        prev_hash,
        seq,
        entry.tenant_id,
        id,
        entry.actor,
        entry.action,
        entry.target,
        entry.details,
        created_at
    ]);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(canonical.to_string().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Appends `entry` to its tenant's chain, hashed under `key`, in a transaction of its own.
pub async fn append(db: &Database, key: &[u8], entry: Entry<'_>) -> Result<(), DbError> {
    let mut tx = db.begin().await?;
    append_in(&mut tx, key, entry).await?;
    tx.commit().await?;
    Ok(())
}

/// Appends `entry` to its tenant's chain, hashed under `key`, in `tx`.
pub(crate) async fn append_in(tx: &mut Tx, key: &[u8], entry: Entry<'_>) -> Result<(), sqlx::Error> {
    if tx.dialect() == Dialect::Postgres {
        // Replicas append to the same chain: one at a time per tenant. (SQLite's single writer
        // already serializes.)
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('opsiq.audit.' || $1, 0))",
            args![entry.tenant_id],
        )
        .await?;
    }
    let last: Option<(i64, String)> = tx
        .fetch_optional(
            "SELECT seq, hash FROM audit_log WHERE tenant_id = $1 ORDER BY seq DESC LIMIT 1",
            args![entry.tenant_id],
        )
        .await?;
    let (seq, prev_hash) = match last {
        Some((seq, hash)) => (seq + 1, hash),
        None => (1, GENESIS.to_string()),
    };
    let id = ids::new_id("aud");
    let created_at = now_ms();
    let hash = row_hash(key, &prev_hash, seq, &id, &entry, created_at);
    tx.execute(
        "INSERT INTO audit_log (seq, tenant_id, id, actor, action, target, details, prev_hash, hash, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        args![
            seq,
            entry.tenant_id,
            &id,
            entry.actor,
            entry.action,
            entry.target,
            entry.details,
            &prev_hash,
            &hash,
            created_at
        ],
    )
    .await?;
    Ok(())
}

/// A stored audit row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    /// Position in the tenant's chain, from 1.
    pub seq: i64,
    /// The tenant.
    pub tenant_id: String,
    /// `aud_…`.
    pub id: String,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// To what.
    pub target: String,
    /// Details, as stored (JSON text).
    pub details: String,
    /// The previous row's hash.
    pub prev_hash: String,
    /// This row's hash.
    pub hash: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

impl AuditRow {
    /// The hash this row should have under `key`, given its stored fields.
    fn expected_hash(&self, key: &[u8]) -> String {
        let entry = Entry {
            tenant_id: &self.tenant_id,
            actor: &self.actor,
            action: &self.action,
            target: &self.target,
            details: &self.details,
        };
        row_hash(key, &self.prev_hash, self.seq, &self.id, &entry, self.created_at)
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "seq": self.seq,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "details": serde_json::from_str::<Value>(&self.details).unwrap_or(Value::Null),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "created_at": rfc3339(self.created_at),
        })
    }
}

const SELECT_ROWS: &str =
    "SELECT seq, tenant_id, id, actor, action, target, details, prev_hash, hash, created_at FROM audit_log";

/// `GET /v1/audit`: the tenant's chain, newest first.
async fn list(
    State(state): State<AppState>,
    auth: AdminAuth,
    Query(page): Query<PageQuery>,
) -> ApiResult<axum::Json<Page<Value>>> {
    auth.require(Permission::Manage)?;
    let limit = page.limit();
    let before = match page.cursor.as_deref() {
        None => i64::MAX,
        Some(c) => c.parse::<i64>().map_err(|_| {
            crate::http::ApiError::bad_request("invalid_cursor", "cursor must be a next_cursor")
        })?,
    };
    let rows: Vec<AuditRow> = state
        .db
        .fetch_all(
            sqlx::AssertSqlSafe(format!(
                "{SELECT_ROWS} WHERE tenant_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
            )),
            args![&auth.tenant_id, before, limit + 1],
        )
        .await?;
    Ok(axum::Json(
        Page::from_rows(rows, limit, |r| r.seq.to_string()).map(|r| r.to_json()),
    ))
}

/// Where a chain stops holding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenRow {
    /// The tenant whose chain it is.
    pub tenant_id: String,
    /// The row's position (or the position expected there).
    pub seq: i64,
    /// The row's id.
    pub id: String,
    /// Why it does not hold.
    pub reason: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Rows checked.
    pub rows: u64,
    /// Chains (tenants) checked.
    pub chains: u64,
    /// The first row that does not hold, if any.
    pub broken: Option<BrokenRow>,
}

/// Walks every tenant's chain in order and reports the first row that does not hold under `key`:
/// a hash that does not match its fields, a `prev_hash` that is not its predecessor's hash, a
/// gap, or a row out of sequence.
pub async fn verify(db: &Database, key: &[u8]) -> Result<Verification, DbError> {
    const PAGE: i64 = 1000;
    let tenants: Vec<(String,)> = db
        .fetch_all(
            "SELECT DISTINCT tenant_id FROM audit_log ORDER BY tenant_id",
            args![],
        )
        .await?;
    let mut report = Verification {
        rows: 0,
        chains: tenants.len() as u64,
        broken: None,
    };
    for (tenant_id,) in tenants {
        let (mut expected_seq, mut prev_hash) = (1_i64, GENESIS.to_string());
        // Every row is read, whatever its number: one at 0 or below is out of sequence too.
        let mut after = i64::MIN;
        loop {
            let rows: Vec<AuditRow> = db
                .fetch_all(
                    sqlx::AssertSqlSafe(format!(
                        "{SELECT_ROWS} WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                    )),
                    args![&tenant_id, after, PAGE],
                )
                .await?;
            let done = (rows.len() as i64) < PAGE;
            for row in rows {
                report.rows += 1;
                let reason = if row.seq > expected_seq {
                    Some(format!("row {expected_seq} is missing (the next is {})", row.seq))
                } else if row.seq < expected_seq {
                    Some(format!("it is out of sequence (row {expected_seq} was expected)"))
                } else if row.prev_hash != prev_hash {
                    Some("its prev_hash is not the previous row's hash".to_string())
                } else if row.expected_hash(key) != row.hash {
                    Some("its hash does not match its contents".to_string())
                } else {
                    None
                };
                if let Some(reason) = reason {
                    report.broken = Some(BrokenRow {
                        tenant_id: row.tenant_id,
                        seq: row.seq,
                        id: row.id,
                        reason,
                    });
                    return Ok(report);
                }
                expected_seq += 1;
                after = row.seq;
                prev_hash = row.hash;
            }
            if done {
                break;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::{Entry, append, row_hash, verify};
    use crate::args;
    use crate::db::Database;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const DETAILS: &str = r#"{"status":201}"#;

    fn entry(target: &str) -> Entry<'_> {
        Entry {
            tenant_id: "ten_1",
            actor: "key:k1",
            action: "POST /v1/things",
            target,
            details: DETAILS,
        }
    }

    async fn chain_of_three() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("audit.db").display());
        let db = Database::connect(&url).await.unwrap();
        for target in ["/a", "/b", "/c"] {
            append(&db, KEY, entry(target)).await.unwrap();
        }
        (dir, db)
    }

    /// Runs `edit` on the chain and returns the first row `verify` then reports broken.
    async fn broken_after(db: &Database, edit: &'static str) -> super::BrokenRow {
        db.execute(edit, args![]).await.unwrap();
        let report = verify(db, KEY).await.unwrap();
        report.broken.expect("the edit breaks the chain")
    }

    #[tokio::test]
    async fn a_removed_row_is_named_as_missing() {
        let (_dir, db) = chain_of_three().await;
        let report = verify(&db, KEY).await.unwrap();
        assert_eq!((report.rows, report.chains, report.broken), (3, 1, None));
        let broken = broken_after(&db, "DELETE FROM audit_log WHERE seq = 2").await;
        assert_eq!(broken.seq, 3);
        assert_eq!(broken.reason, "row 2 is missing (the next is 3)");
        db.close().await;
    }

    #[tokio::test]
    async fn a_row_numbered_out_of_sequence_is_found() {
        let (_dir, db) = chain_of_three().await;
        let broken = broken_after(&db, "UPDATE audit_log SET seq = 0 WHERE seq = 1").await;
        assert_eq!(broken.seq, 0);
        assert_eq!(broken.reason, "it is out of sequence (row 1 was expected)");
        db.close().await;
    }

    #[tokio::test]
    async fn a_rewritten_row_needs_the_key_and_still_breaks_the_next_link() {
        let (_dir, db) = chain_of_three().await;
        let (prev, id, created_at): (String, String, i64) = db
            .fetch_optional(
                "SELECT prev_hash, id, created_at FROM audit_log WHERE seq = 2",
                args![],
            )
            .await
            .unwrap()
            .unwrap();
        // Without the key, a recomputed hash does not verify even for the row itself.
        let guessed = row_hash(b"not the key", &prev, 2, &id, &entry("/forged"), created_at);
        db.execute(
            "UPDATE audit_log SET target = '/forged', hash = $1 WHERE seq = 2",
            args![&guessed],
        )
        .await
        .unwrap();
        let broken = verify(&db, KEY).await.unwrap().broken.expect("broken");
        assert_eq!(
            (broken.seq, broken.reason.as_str()),
            (2, "its hash does not match its contents")
        );
        // With the key, the row holds but the next one still points at the old hash.
        let forged = row_hash(KEY, &prev, 2, &id, &entry("/forged"), created_at);
        db.execute("UPDATE audit_log SET hash = $1 WHERE seq = 2", args![&forged])
            .await
            .unwrap();
        let broken = verify(&db, KEY).await.unwrap().broken.expect("broken");
        assert_eq!(broken.seq, 3);
        assert_eq!(broken.reason, "its prev_hash is not the previous row's hash");
        db.close().await;
    }
}
