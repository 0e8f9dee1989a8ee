//! Invocation records: one row per call an agent (or a rule) made, allowed or not, with the
//! action version and hash it ran, its arguments, and its result or error. Rows are settled from
//! delivery outcomes in the worker's transaction.

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::args;
use crate::db::{DbError, Tx, rfc3339};
use crate::delivery::outbound::AttemptResult;
use crate::delivery::outbox::Job;
use crate::delivery::retry::Next;
use crate::http::ApiError;
use crate::registry::model::schema_errors;
use crate::registry::validators::Validators;

/// Statuses that will not change any more.
pub const TERMINAL: &[&str] = &["succeeded", "failed", "denied"];

/// A stored invocation.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InvocationRow {
    /// `inv_…`.
    pub id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// `agent:<id>` or `rule:<id>`.
    pub principal: String,
    /// The agent, if an agent called.
    pub agent_id: Option<String>,
    /// JSON array of roles at call time.
    pub roles: String,
    /// Action name.
    pub action_name: String,
    /// Action version that ran (absent when the action did not exist).
    pub action_version: Option<i64>,
    /// Content hash of that version.
    pub action_hash: Option<String>,
    /// JSON arguments.
    pub arguments: String,
    /// pending_approval, queued, delivering, succeeded, failed, denied.
    pub status: String,
    /// JSON result.
    pub result: Option<String>,
    /// JSON error.
    pub error: Option<String>,
    /// The agent's idempotency key.
    pub idempotency_key: Option<String>,
    /// The delivery carrying the action request.
    pub delivery_id: Option<String>,
    /// Creation (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
    /// Completion (ms).
    pub completed_at: Option<i64>,
}

impl InvocationRow {
    /// Whether the status is final.
    pub fn is_terminal(&self) -> bool {
        TERMINAL.contains(&self.status.as_str())
    }

    /// The API representation.
    pub fn to_json(&self) -> Value {
        let parse = |s: &Option<String>| s.as_deref().and_then(|t| serde_json::from_str::<Value>(t).ok());
        json!({
            "id": self.id,
            "invocation_id": self.id,
            "status": self.status,
            "action": {"name": self.action_name, "version": self.action_version, "content_hash": self.action_hash},
            "principal": self.principal,
            "agent_id": self.agent_id,
            "roles": serde_json::from_str::<Value>(&self.roles).unwrap_or(Value::Null),
            "arguments": serde_json::from_str::<Value>(&self.arguments).unwrap_or(Value::Null),
            "result": parse(&self.result),
            "error": parse(&self.error),
            "idempotency_key": self.idempotency_key,
            "delivery_id": self.delivery_id,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "completed_at": self.completed_at.map(rfc3339),
            "duration_ms": self.completed_at.map(|c| c - self.created_at),
        })
    }

    /// The answer to an invoke call in this state: (HTTP status, body), or the 403 of a call a
    /// person denied (as its replay answers).
    pub fn invoke_answer(&self) -> Result<(u16, Value), ApiError> {
        let parse = |s: &Option<String>| s.as_deref().and_then(|t| serde_json::from_str::<Value>(t).ok());
        Ok(match self.status.as_str() {
            "succeeded" => {
                let mut body =
                    json!({"invocation_id": self.id, "status": "succeeded", "result": parse(&self.result)});
                if let Some(err) = parse(&self.error) {
                    body["output_errors"] = err;
                }
                (200, body)
            }
            "failed" => (
                200,
                json!({"invocation_id": self.id, "status": "failed", "error": parse(&self.error)}),
            ),
            "denied" => {
                let error = parse(&self.error).unwrap_or(Value::Null);
                let text = |field: &str, default: &str| {
                    error
                        .get(field)
                        .and_then(Value::as_str)
                        .unwrap_or(default)
                        .to_string()
                };
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    text("code", "denied"),
                    text("message", "this call was denied"),
                )
                .with_details(vec![json!({"invocation_id": self.id})]));
            }
            // Still being delivered is, for the caller, still queued.
            "delivering" => (202, json!({"invocation_id": self.id, "status": "queued"})),
            other => (202, json!({"invocation_id": self.id, "status": other})),
        })
    }
}

/// The body an endpoint answered: as JSON when it is JSON that can be kept exactly, else as its
/// text (an integer past 64 bits would be read as the nearest float: the caller gets the digits
/// the endpoint sent, not another number).
fn response_value(result: &AttemptResult) -> Value {
    if result.body.trim().is_empty() {
        return Value::Null;
    }
    match serde_json::from_str(&result.body) {
        Ok(value)
            if !matches!(
                crate::http::extract::scan_json_integers(result.body.as_bytes()),
                Err(crate::http::extract::JsonTextProblem::IntegerTooLarge(_))
            ) =>
        {
            value
        }
        _ => Value::String(result.body.clone()),
    }
}

/// Moves an invocation on after an attempt of its delivery (inside the outcome transaction).
pub async fn settle(
    tx: &mut Tx,
    validators: &Validators,
    job: &Job,
    result: &AttemptResult,
    next: &Next,
    now: i64,
) -> Result<(), DbError> {
    let Some(invocation_id) = &job.invocation_id else {
        return Ok(());
    };
    match next {
        Next::RetryAt { .. } => {
            tx.defer(
                "UPDATE invocations SET status = 'delivering', updated_at = $1 WHERE id = $2 AND status = 'queued'",
                args![now, invocation_id],
            )
            .await?;
        }
        Next::Succeeded => {
            let value = response_value(result);
            let output_error = check_output(tx, validators, job, &value).await?;
            tx.defer(
                "UPDATE invocations SET status = 'succeeded', result = $1, error = $2, updated_at = $3, completed_at = $3 \
                 WHERE id = $4",
                args![value.to_string(), output_error.map(|e| e.to_string()), now, invocation_id],
            )
            .await?;
        }
        Next::Failed { reason, .. } => {
            let error = match result.status {
                Some(status) => json!({
                    "code": "endpoint_error",
                    "status": status,
                    "message": format!("the action's endpoint answered {status}: {}", excerpt(&result.body)),
                    "body": response_value(result),
                }),
                None => json!({
                    "code": "delivery_failed",
                    "message": format!("the action request could not be delivered: {reason}"),
                    "error_class": result.error_class,
                }),
            };
            tx.defer(
                "UPDATE invocations SET status = 'failed', error = $1, updated_at = $2, completed_at = $2 WHERE id = $3",
                args![error.to_string(), now, invocation_id],
            )
            .await?;
        }
    }
    Ok(())
}

fn excerpt(body: &str) -> String {
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return "(no body)".into();
    }
    let cut: String = trimmed.chars().take(500).collect();
    if cut.len() < trimmed.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

/// Checks a result against the action version's output schema; returns the mismatch, if any.
async fn check_output(
    tx: &mut Tx,
    validators: &Validators,
    job: &Job,
    value: &Value,
) -> Result<Option<Value>, DbError> {
    // The action and version are in the request body; what ran never changes, so its output
    // schema (or its absence) is looked up once per version.
    let sent: Value = serde_json::from_str(&job.body).unwrap_or(Value::Null);
    let (name, Some(version)) = (job.label.as_str(), sent["action"]["version"].as_i64()) else {
        return Ok(None);
    };
    let validator = match validators.known_output(&job.tenant_id, name, version) {
        Some(known) => known,
        None => {
            let row: Option<(String,)> = tx
                .fetch_optional(
                    "SELECT declaration FROM action_versions WHERE tenant_id = $1 AND name = $2 AND version = $3",
                    args![&job.tenant_id, name, version],
                )
                .await?;
            let declaration: Value = match row {
                Some((d,)) => serde_json::from_str(&d)?,
                None => Value::Null,
            };
            let schema = declaration.get("output_schema").filter(|s| !s.is_null());
            validators.learn_output(&job.tenant_id, name, version, schema)
        }
    };
    let Some(validator) = validator else {
        return Ok(None);
    };
    let problems = schema_errors(&validator, value);
    if problems.is_empty() {
        return Ok(None);
    }
    tracing::warn!(invocation_id = ?job.invocation_id, "result does not match the output schema");
    Ok(Some(json!({
        "code": "output_schema_mismatch",
        "message": "the endpoint's result does not match the action's output_schema",
        "details": problems,
    })))
}
