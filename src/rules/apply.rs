//! Carrying out a matched rule's outputs inside the transaction that records the event:
//! `deliver` adds a delivery of the event, `invoke` records an invocation (schema-validated, as
//! principal `rule:<id>`) with its delivery, `emit` records a new event (whose own rules run in
//! turn, up to a chain depth of [`MAX_EMIT_DEPTH`]).

use std::sync::Arc;

use serde_json::{Value, json};

use super::engine::{CandidateSet, Evaluation, Output, RuleSet, compact_trace};
use crate::args;
use crate::db::{DbError, Tx};
use crate::delivery::outbox::{self, Job, Kind, Lease, NewDelivery};
use crate::events::catalog::TenantCatalog;
use crate::events::{self, NewEvent};
use crate::http::error::describe_details;
use crate::registry::validators::Validators;

/// Emit chains longer than this are cut (a rule emitting what triggers it would loop forever).
pub const MAX_EMIT_DEPTH: i64 = 8;

/// Most events the rules emit from one event, across its whole chain: rules with several
/// `emit` outputs that trigger each other would otherwise multiply (four outputs, eight levels:
/// 87,000 events in one request).
pub const MAX_EMITTED: usize = 100;

/// What rules need to run while an event is recorded.
#[derive(Clone)]
pub struct RuleContext {
    /// The tenant's rules.
    pub rules: Arc<RuleSet>,
    /// Compiled action schemas (for `invoke` outputs).
    pub validators: Arc<Validators>,
    /// The tenant's event types (for `emit` outputs).
    pub catalog: TenantCatalog,
    /// What an emitted event's data keeps to.
    pub limits: EmitLimits,
}

/// The size and nesting an emitted event's data may have: those of an event sent in.
#[derive(Debug, Clone, Copy)]
pub struct EmitLimits {
    /// Bytes of the data as JSON.
    pub max_bytes: usize,
    /// Levels of nesting.
    pub max_depth: usize,
}

/// Whether `data` may be emitted as an event of `event_type`: a type of the tenant's own, and a
/// JSON object within the limits of an event sent in, matching its type's schema. The refusal says why, for the trace.
pub fn check_emitted(
    catalog: &TenantCatalog,
    limits: EmitLimits,
    event_type: &str,
    data: &Value,
) -> Result<(), String> {
    events::check_own_event_type(event_type)?;
    if !data.is_object() {
        return Err("an emitted event's data must be a JSON object".into());
    }
    // Measured as ingestion measures a request: `data` sits one level into the body, and the
    // body's size counts its type and the braces around it.
    if depth_exceeds(data, limits.max_depth.saturating_sub(1)) {
        return Err(format!(
            "the emitted data nests deeper than an event sent in may ({} levels in all)",
            limits.max_depth
        ));
    }
    let envelope = r#"{"type":"","data":}"#.len() + event_type.len();
    if super::template::json_len(data).saturating_add(envelope) > limits.max_bytes {
        return Err(format!(
            "the emitted data is larger than {} bytes, the most an event may carry",
            limits.max_bytes
        ));
    }
    catalog
        .check(event_type, data)
        .map_err(|e| format!("{} ({})", e.message, describe_details(&e.details)))
}

/// Whether `v` nests deeper than `most` levels (an object or array is one level).
fn depth_exceeds(v: &Value, most: usize) -> bool {
    let children: Box<dyn Iterator<Item = &Value>> = match v {
        Value::Array(items) => Box::new(items.iter()),
        Value::Object(map) => Box::new(map.values()),
        _ => return false,
    };
    most == 0 || children.into_iter().any(|c| depth_exceeds(c, most - 1))
}

impl std::fmt::Debug for RuleContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RuleContext")
    }
}

/// The event as rules see it.
pub fn document(id: &str, event_type: &str, created_at: i64, data: &Value) -> Value {
    json!({"id": id, "type": event_type, "created_at": crate::db::rfc3339(created_at), "data": data})
}

/// The tenant's rules checked against an event (pure: nothing is written).
pub struct Checked {
    doc: Value,
    evaluations: Vec<Evaluation>,
    /// The rules that were candidates, in the order of `evaluations`.
    set: Option<Arc<CandidateSet>>,
}

impl Checked {
    /// Checks the candidate rules for an event about to be recorded with `event_id`.
    pub fn new(ctx: &RuleContext, event: &NewEvent, event_id: &str, now: i64) -> Self {
        let doc = document(event_id, &event.event_type, now, &event.data);
        let evaluations = ctx.rules.evaluate(&event.event_type, &doc);
        let set = (!evaluations.is_empty()).then(|| ctx.rules.candidate_set(&event.event_type));
        Self {
            doc,
            evaluations,
            set,
        }
    }

    /// Whether some rule matched (its outputs must then be carried out).
    pub fn any_matched(&self) -> bool {
        self.evaluations.iter().any(|e| e.matched)
    }

    /// The compact trace when nothing matched (stored with the event row) and the candidate set
    /// it names (stored once in `rule_sets`); `None` when no rule was a candidate.
    pub fn trace_without_outputs(&self) -> Option<(String, Arc<CandidateSet>)> {
        let set = self.set.as_ref()?;
        Some((compact_trace(set, &self.evaluations), set.clone()))
    }

    /// Carries out the matched rules' outputs; returns the full trace and the new deliveries.
    pub async fn carry_out(
        &self,
        tx: &mut Tx,
        event: &NewEvent,
        event_id: &str,
        body: &Arc<str>,
        lease: &Lease,
        now: i64,
    ) -> Result<(String, Vec<Job>), DbError> {
        let Some(ctx) = &event.rules else {
            return Ok((String::from("[]"), Vec::new()));
        };
        let mut trace = Vec::with_capacity(self.evaluations.len());
        let mut jobs = Vec::new();
        for evaluation in &self.evaluations {
            let mut entry = evaluation.trace();
            if evaluation.matched {
                let outputs = evaluation.rule.render_outputs(&self.doc, ctx.limits.max_bytes);
                let mut results = Vec::with_capacity(outputs.len());
                for (n, output) in outputs.iter().enumerate() {
                    let (result, new_jobs) = match output {
                        Ok(output) => {
                            apply_output(tx, ctx, event, event_id, body, evaluation, n, output, lease, now)
                                .await?
                        }
                        Err(refused) => (refused.clone(), Vec::new()),
                    };
                    results.push(result);
                    jobs.extend(new_jobs);
                }
                entry["outputs"] = Value::Array(results);
            }
            trace.push(entry);
        }
        Ok((Value::Array(trace).to_string(), jobs))
    }
}

/// The idempotency key of the call a rule's `n`th output makes for an event: one call per event
/// and output, however often the event is recorded.
pub fn rule_call_key(event_id: &str, n: usize) -> String {
    format!("{event_id}:{n}")
}

#[allow(clippy::too_many_arguments)]
async fn apply_output(
    tx: &mut Tx,
    ctx: &RuleContext,
    event: &NewEvent,
    event_id: &str,
    body: &Arc<str>,
    evaluation: &Evaluation,
    n: usize,
    output: &Output,
    lease: &Lease,
    now: i64,
) -> Result<(Value, Vec<Job>), DbError> {
    let mut result = output.describe();
    match output {
        Output::Deliver { endpoint_id } => {
            // The endpoint, if it is live, and the event's delivery to it, if it has one: an
            // endpoint receives an event once, whether it subscribes to it, a rule delivers it
            // there, or both.
            let live: Option<(String, Option<String>)> = tx
                .fetch_optional(
                    "SELECT e.id, (SELECT d.id FROM deliveries d WHERE d.event_id = $4 \
                     AND d.endpoint_id = e.id AND d.tenant_id = e.tenant_id ORDER BY d.id LIMIT 1) \
                     AS delivery_id FROM endpoints e WHERE e.tenant_id = $1 AND e.id = $2 AND e.enabled = $3 \
                     AND e.deleted_at IS NULL",
                    args![&event.tenant_id, endpoint_id, true, event_id],
                )
                .await?;
            let Some((_, existing)) = live else {
                result["error"] = format!("endpoint {endpoint_id} is deleted or disabled").into();
                return Ok((result, Vec::new()));
            };
            if let Some(delivery_id) = existing {
                result["delivery_id"] = delivery_id.into();
                result["note"] = "the endpoint already receives this event".into();
                return Ok((result, Vec::new()));
            }
            let delivery = NewDelivery {
                tenant_id: event.tenant_id.clone(),
                endpoint_id: endpoint_id.clone(),
                kind: Kind::Event,
                event_id: Some(event_id.to_string()),
                invocation_id: None,
                label: event.event_type.clone(),
                idempotency_key: None,
                body: body.clone(),
            };
            let jobs = outbox::insert(tx, vec![delivery], lease, now).await?;
            result["delivery_id"] = jobs.first().map(|j| j.id.clone()).into();
            Ok((result, jobs))
        }
        Output::Invoke { action, arguments } => {
            let key = rule_call_key(event_id, n);
            let outcome = crate::gateway::invoke::invoke_for_rule(
                tx,
                &ctx.validators,
                &event.tenant_id,
                &evaluation.rule.id,
                &key,
                action,
                arguments,
                lease,
                now,
            )
            .await?;
            result["invocation_id"] = outcome.invocation_id.into();
            result["status"] = outcome.status.into();
            if let Some(error) = outcome.error {
                result["error"] = error;
            }
            Ok((result, outcome.jobs))
        }
        Output::Emit { event_type, data } => {
            if event.depth + 1 > MAX_EMIT_DEPTH {
                result["cut"] = format!("emit chains stop at depth {MAX_EMIT_DEPTH}").into();
                return Ok((result, Vec::new()));
            }
            if let Err(m) = check_emitted(&ctx.catalog, ctx.limits, event_type, data) {
                result["error"] = m.into();
                return Ok((result, Vec::new()));
            }
            if !event.emitted.take_one(MAX_EMITTED) {
                result["cut"] = format!("rules emit at most {MAX_EMITTED} events from one event").into();
                return Ok((result, Vec::new()));
            }
            let emitted = NewEvent {
                tenant_id: event.tenant_id.clone(),
                event_type: event_type.clone(),
                data: data.clone(),
                idempotency_key: None,
                source: format!("rule:{}", evaluation.rule.id),
                depth: event.depth + 1,
                emitted: event.emitted.clone(),
                fanout: event.fanout.clone(),
                rules: event.rules.clone(),
            };
            let mut recorded = events::record_many(tx, std::slice::from_ref(&emitted), lease, now).await?;
            let Some(recorded) = recorded.pop() else {
                return Ok((result, Vec::new()));
            };
            result["event_id"] = recorded.id.clone().into();
            Ok((result, recorded.deliveries))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_counted_in_objects_and_arrays() {
        let two = json!({"a": [1, 2]});
        assert!(!depth_exceeds(&two, 2) && depth_exceeds(&two, 1));
        assert!(!depth_exceeds(&json!(5), 0) && depth_exceeds(&json!({}), 0));
        let mut deep = json!(1);
        for _ in 0..100 {
            deep = json!({ "x": deep });
        }
        assert!(depth_exceeds(&deep, 64) && !depth_exceeds(&deep, 100));
    }
}
