//! Events: something that happened in the customer's world (`invoice.paid`) or in the gateway
//! (`delivery.failed`). Recording an event fans it out, in the same transaction, to every enabled
//! endpoint of the tenant whose `event_types` patterns match.

pub mod catalog;
pub mod routes;

use std::sync::Arc;

use serde_json::{Value, json};

use crate::db::{DbError, Tx, rfc3339};
use crate::delivery::endpoints::{EndpointRow, pattern_matches};
use crate::delivery::outbox::{self, Job, Kind, Lease, NewDelivery};
use crate::{args, ids};

pub use routes::routes;

/// Event types are dotted names: `invoice.paid`, `escalation.opened`.
pub fn check_event_type(name: &str) -> Result<(), String> {
    let ok = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
        && name.split('.').all(|part| !part.is_empty());
    if ok {
        Ok(())
    } else {
        Err("must be 1 to 128 characters from A-Z, a-z, 0-9, `.`, `_`, `-` and `:`, with no empty part between dots, like invoice.paid".into())
    }
}

/// Checks a type a tenant names for events of its own (sent in, declared, or emitted by a rule):
/// well formed, and not one the gateway raises itself.
pub fn check_own_event_type(name: &str) -> Result<(), String> {
    check_event_type(name)?;
    if is_reserved(name) {
        return Err(format!(
            "{name} is raised by OpsIQ itself; use a name of your own"
        ));
    }
    Ok(())
}

/// An empty JSON object: the data of an event, or the arguments of a call, that gives none.
pub fn empty_data() -> Value {
    Value::Object(Default::default())
}

/// Whether an event type is raised only by the gateway itself (and so cannot be ingested).
pub fn is_reserved(event_type: &str) -> bool {
    // In any case: a receiver that compares names without it must not be fed `Delivery.Failed`.
    let name = event_type.to_ascii_lowercase();
    name.starts_with("opsiq.")
        || name.starts_with("action.")
        || matches!(
            name.as_str(),
            "delivery.failed" | "endpoint.disabled" | "approval.requested"
        )
}

/// An event to record.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Owning tenant.
    pub tenant_id: String,
    /// `invoice.paid`, …
    pub event_type: String,
    /// The payload.
    pub data: Value,
    /// Dedupe key of the request that sent it.
    pub idempotency_key: Option<String>,
    /// `api`, `system`, `rule:<id>`.
    pub source: String,
    /// How many `emit` steps led here (rules cut chains at 8).
    pub depth: i64,
    /// How many events the rules have emitted since the event that started the chain (shared
    /// along it; rules stop emitting at [`crate::rules::apply::MAX_EMITTED`]).
    pub emitted: EmitCount,
    /// Which endpoints receive it.
    pub fanout: Fanout,
    /// The tenant's rules, when it has any.
    pub rules: Option<Arc<crate::rules::apply::RuleContext>>,
}

/// A count shared by the events of one emit chain.
#[derive(Debug, Clone, Default)]
pub struct EmitCount(Arc<std::sync::atomic::AtomicUsize>);

impl EmitCount {
    /// Counts one more emitted event if fewer than `most` were; false when the budget is spent.
    pub fn take_one(&self, most: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < most).then_some(n + 1)
            })
            .is_ok()
    }
}

/// How an event finds its endpoints.
#[derive(Debug, Clone)]
pub enum Fanout {
    /// Every enabled, subscribed endpoint, read inside the recording transaction.
    Lookup,
    /// The subscribed endpoints among these (read beforehand from the engine's short cache).
    Among(Arc<Vec<EndpointRow>>),
    /// Exactly this endpoint (`POST /v1/endpoints/{id}/test`).
    Only(String),
}

/// A recorded event and the deliveries it caused.
#[derive(Debug, Clone)]
pub struct RecordedEvent {
    /// `evt_…`.
    pub id: String,
    /// The exact body every endpoint receives.
    pub body: Arc<str>,
    /// Deliveries created (leased ones are ready to hand to the worker): the event's own (to
    /// its subscribers and its rules' `deliver` outputs), and those its rules caused otherwise
    /// (action requests, emitted events).
    pub deliveries: Vec<Job>,
}

/// The body every subscriber receives: `{"id","type","created_at","data"}`.
pub fn event_body(id: &str, event_type: &str, created_at: i64, data: &Value) -> String {
    json!({"id": id, "type": event_type, "created_at": rfc3339(created_at), "data": data}).to_string()
}

/// Recording an event through the group-commit writer.
#[derive(Debug, Clone)]
pub struct RecordJob {
    /// The event.
    pub event: NewEvent,
    /// Who holds its deliveries.
    pub lease: Lease,
    /// Its time (ms).
    pub now: i64,
}

impl crate::db::batch::Job for RecordJob {
    type Output = RecordedEvent;

    fn write_batch<'a>(
        jobs: &'a [Self],
        tx: &'a mut Tx,
    ) -> crate::db::batch::BatchFuture<'a, Vec<RecordedEvent>> {
        Box::pin(async move {
            let Some(first) = jobs.first() else {
                return Ok(Vec::new());
            };
            // A fresh emit budget on every run: a batch rolled back and run again must not find
            // its first run's emitted events counted.
            let events: Vec<NewEvent> = jobs
                .iter()
                .map(|j| NewEvent {
                    emitted: EmitCount::default(),
                    ..j.event.clone()
                })
                .collect();
            // One lease and one clock for the batch: the jobs were submitted moments apart.
            record_many(tx, &events, &first.lease, first.now).await
        })
    }
}

/// Records one event and its deliveries in `tx`.
pub async fn record(tx: &mut Tx, event: NewEvent, lease: &Lease, now: i64) -> Result<RecordedEvent, DbError> {
    let mut recorded = record_many(tx, std::slice::from_ref(&event), lease, now).await?;
    recorded
        .pop()
        .ok_or_else(|| DbError::Batch("no event recorded".into()))
}

/// Records events and their deliveries in `tx` with multi-row inserts; one result per event.
pub fn record_many<'a>(
    tx: &'a mut Tx,
    events: &'a [NewEvent],
    lease: &'a Lease,
    now: i64,
) -> crate::db::batch::BatchFuture<'a, Vec<RecordedEvent>> {
    // A boxed future, not an `async fn`: rules run here may record events, which run rules.
    Box::pin(async move {
        const COLUMNS: usize = 9;
        let mut recorded = Vec::with_capacity(events.len());
        // Rules are checked before the insert: when none matches, the trace goes in with the row.
        let mut matched = Vec::new();
        let mut deliveries = Vec::new();
        let mut per_event = Vec::with_capacity(events.len());
        let mut candidate_sets = std::collections::HashMap::new();
        for chunk in crate::db::chunks(tx.dialect(), events) {
            let mut sql = String::from(
                "INSERT INTO events (id, tenant_id, type, body, idempotency_key, source, depth, created_at, rule_trace) \
                 VALUES ",
            );
            let mut values = Vec::with_capacity(chunk.len() * COLUMNS);
            for (i, event) in chunk.iter().enumerate() {
                let id = ids::new_id("evt");
                let body: Arc<str> = event_body(&id, &event.event_type, now, &event.data).into();
                let checked = event
                    .rules
                    .as_ref()
                    .map(|ctx| crate::rules::apply::Checked::new(ctx, event, &id, now));
                let trace = match checked {
                    Some(c) if c.any_matched() => {
                        matched.push((recorded.len(), c));
                        None
                    }
                    Some(c) => c.trace_without_outputs().map(|(trace, set)| {
                        candidate_sets.insert((event.tenant_id.clone(), set.id.clone()), set);
                        trace
                    }),
                    None => None,
                };
                if i > 0 {
                    sql.push_str(", ");
                }
                let placeholders: Vec<String> =
                    (1..=COLUMNS).map(|k| format!("${}", i * COLUMNS + k)).collect();
                sql.push_str(&format!("({})", placeholders.join(", ")));
                values.extend(args![
                    &id,
                    &event.tenant_id,
                    &event.event_type,
                    &*body,
                    event.idempotency_key.clone(),
                    &event.source,
                    event.depth,
                    now,
                    trace
                ]);
                let targets = fanout_targets(tx, event).await?;
                per_event.push(targets.len());
                deliveries.extend(targets.into_iter().map(|endpoint_id| NewDelivery {
                    tenant_id: event.tenant_id.clone(),
                    endpoint_id,
                    kind: Kind::Event,
                    event_id: Some(id.clone()),
                    invocation_id: None,
                    label: event.event_type.clone(),
                    idempotency_key: None,
                    body: body.clone(),
                }));
                recorded.push(RecordedEvent {
                    id,
                    body,
                    deliveries: Vec::new(),
                });
            }
            tx.defer(sqlx::AssertSqlSafe(sql), values).await?;
        }
        // Compact traces name their rule set: store each set the batch used (once per set).
        for ((tenant_id, set_id), set) in candidate_sets {
            tx.defer(
                "INSERT INTO rule_sets (tenant_id, id, rule_ids, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (tenant_id, id) DO NOTHING",
                args![
                    tenant_id,
                    set_id,
                    serde_json::to_string(&set.rule_ids).unwrap_or_default(),
                    now
                ],
            )
            .await?;
        }
        let mut jobs = outbox::insert(tx, deliveries, lease, now).await?.into_iter();
        for (event, n) in recorded.iter_mut().zip(per_event) {
            event.deliveries = jobs.by_ref().take(n).collect();
        }
        for (index, checked) in matched {
            let (event, done) = (&events[index], &mut recorded[index]);
            let (trace, jobs) = checked
                .carry_out(tx, event, &done.id, &done.body, lease, now)
                .await?;
            tx.defer(
                "UPDATE events SET rule_trace = $1 WHERE id = $2",
                args![trace, &done.id],
            )
            .await?;
            done.deliveries.extend(jobs);
        }
        Ok(recorded)
    })
}

/// The endpoints an event goes to.
async fn fanout_targets(tx: &mut Tx, event: &NewEvent) -> Result<Vec<String>, DbError> {
    let looked_up;
    let candidates: &[EndpointRow] = match &event.fanout {
        Fanout::Among(list) => list,
        Fanout::Lookup | Fanout::Only(_) => {
            looked_up = tx
                .fetch_all::<EndpointRow>(
                    "SELECT * FROM endpoints WHERE tenant_id = $1 AND enabled = $2 AND deleted_at IS NULL ORDER BY id",
                    args![&event.tenant_id, true],
                )
                .await?;
            &looked_up
        }
    };
    Ok(candidates
        .iter()
        .filter(|ep| match &event.fanout {
            Fanout::Only(only) => &ep.id == only,
            _ => {
                ep.tenant_id == event.tenant_id
                    && ep
                        .patterns()
                        .iter()
                        .any(|p| pattern_matches(p, &event.event_type))
            }
        })
        .map(|ep| ep.id.clone())
        .collect())
}
