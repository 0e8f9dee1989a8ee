//! `tools/list` and `tools/call`, shared by both eras.

use serde_json::{Value, json};

use super::{RpcError, codes};
use crate::AppState;
use crate::agents::AgentPrincipal;
use crate::gateway::invocations::InvocationRow;
use crate::gateway::invoke::{Caller, InvokeRequest, Repeat, invoke};
use crate::gateway::tools::{Format, allowed_actions, tool};

/// The `_meta` key an agent may use to pass its idempotency key.
pub const IDEMPOTENCY_META_KEY: &str = "io.opsiq/idempotency-key";

/// The tools this agent may call, as MCP `Tool`s (`outputSchema` only for `sync` actions, as in
/// `GET /v1/tools?format=mcp`).
pub async fn list(state: &AppState, agent: &AgentPrincipal) -> Result<Vec<Value>, RpcError> {
    let actions = allowed_actions(state, agent).await.map_err(internal)?;
    Ok(actions.iter().map(|a| tool(a, Format::Mcp)).collect())
}

fn internal(e: crate::http::ApiError) -> RpcError {
    RpcError::new(codes::INTERNAL_ERROR, e.message)
}

fn text(t: impl Into<String>) -> Value {
    json!([{"type": "text", "text": t.into()}])
}

pub(crate) fn tool_error(message: impl Into<String>) -> Value {
    json!({"content": text(message), "isError": true})
}

/// Runs `tools/call` through the gateway's invocation path and renders a `CallToolResult`.
pub async fn call(state: &AppState, agent: &AgentPrincipal, params: &Value) -> Result<Value, RpcError> {
    let Some(name) = params.get("name").and_then(Value::as_str) else {
        return Err(RpcError::new(
            codes::INVALID_PARAMS,
            "tools/call needs params.name",
        ));
    };
    let arguments = params.get("arguments").cloned().unwrap_or_else(|| json!({}));
    let meta = params.get("_meta");
    if meta.is_some_and(|m| !m.is_object()) {
        return Err(RpcError::new(
            codes::INVALID_PARAMS,
            "params._meta must be an object",
        ));
    }
    let given = meta.and_then(|m| m.get(IDEMPOTENCY_META_KEY));
    if let Some(k) = given {
        let ok = k.as_str().is_some_and(crate::events::routes::is_idempotency_key);
        if !ok {
            return Ok(tool_error(format!(
                "_meta[\"{IDEMPOTENCY_META_KEY}\"] must be 1 to 255 visible ASCII characters"
            )));
        }
    }
    let key = given
        .and_then(Value::as_str)
        .map(str::to_string)
        // MCP clients rarely send one: without it every call is new (and the key is unique).
        .unwrap_or_else(|| format!("mcp:{}", crate::ids::new_id("call")));
    let req = InvokeRequest {
        action: name.to_string(),
        arguments,
        idempotency_key: Some(key),
        wait: None,
        repeat: Repeat::AsItStands,
    };
    match invoke(state, &Caller::Agent(agent.clone()), req).await {
        Ok(row) => {
            let promises_structure = match row.status.as_str() {
                "queued" | "delivering" => promises_structured_result(state, agent, name).await,
                _ => false,
            };
            Ok(render(&row, promises_structure))
        }
        Err(e) if e.status == axum::http::StatusCode::NOT_FOUND => Err(RpcError::new(
            codes::INVALID_PARAMS,
            format!("Unknown tool: {name}"),
        )),
        Err(e) if e.status.is_server_error() && e.status != axum::http::StatusCode::SERVICE_UNAVAILABLE => {
            Err(internal(e))
        }
        Err(e) => {
            // Denials, schema problems, rate limits, conflicts, a moment's unavailability (with
            // when to retry): a result the model can read and act on.
            let mut message = format!("{} ({})", e.message, e.code);
            for d in &e.details {
                if let (Some(path), Some(m)) = (
                    d.get("path").and_then(Value::as_str),
                    d.get("message").and_then(Value::as_str),
                ) {
                    message.push_str(&format!("\n- {path}: {m}"));
                }
            }
            if let Some(secs) = e.retry_after {
                message.push_str(&format!("\nRetry after {secs} seconds."));
            }
            Ok(tool_error(message))
        }
    }
}

/// Whether tool `name` advertises an output schema, so that a result without structured content
/// must be an error result (clients refuse it otherwise).
async fn promises_structured_result(state: &AppState, agent: &AgentPrincipal, name: &str) -> bool {
    let cached = state.gateway.action(&state.db, &agent.tenant_id, name).await;
    // Unknown now (deleted since the call): say the call is pending as an error, to be safe.
    cached.map_or(true, |action| {
        action
            .as_ref()
            .as_ref()
            .is_none_or(|a| crate::gateway::tools::advertised_output_schema(&a.declaration).is_some())
    })
}

/// The tool result for an invocation as it stands; `promises_structure` when the tool advertises
/// an output schema.
fn render(row: &InvocationRow, promises_structure: bool) -> Value {
    let parse = |s: &Option<String>| s.as_deref().and_then(|t| serde_json::from_str::<Value>(t).ok());
    match row.status.as_str() {
        "succeeded" => {
            let result = parse(&row.result).unwrap_or(Value::Null);
            let as_text = match &result {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            // A result that breaks the advertised output schema may not be given as structured
            // content (clients check it); it is an error result saying the action did run, so
            // that the model does not call it again.
            if let Some(mismatch) = parse(&row.error) {
                let problems = mismatch["details"]
                    .as_array()
                    .map(|d| crate::http::error::describe_details(d))
                    .unwrap_or_default();
                return tool_error(format!(
                    "The action ran (invocation {}), but its result does not match the tool's output schema ({}). Do not call it again for this; the result was: {as_text}",
                    row.id, problems
                ));
            }
            let mut out = json!({"content": text(as_text), "isError": false});
            if result.is_object() {
                out["structuredContent"] = result;
            }
            out
        }
        "failed" | "denied" => {
            let error = parse(&row.error).unwrap_or(Value::Null);
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or(if row.status == "denied" {
                    "the call was denied"
                } else {
                    "the action failed"
                })
                .to_string();
            tool_error(message)
        }
        "pending_approval" => tool_error(format!(
            "The call was accepted and waits for a person to approve it (invocation {}). It has not run yet.",
            row.id
        )),
        status => {
            let message = format!(
                "The call was accepted (invocation {}) and is {status}; its result is not available yet. \
                 It may still complete: do not call it again for this.",
                row.id
            );
            // Without the structured result the tool promised, only an error result is one a
            // client accepts; the text says the call stands.
            json!({"content": text(message), "isError": promises_structure})
        }
    }
}
