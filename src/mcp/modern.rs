//! The stateless 2026-07-28 era: every request carries its protocol version in `_meta` and in
//! `MCP-Protocol-Version`, its method in `Mcp-Method` and (for `tools/call`) the tool in
//! `Mcp-Name`; disagreements are refused before anything runs. No sessions: any replica answers
//! any request. Errors carry the HTTP status the revision assigns to each code.

use std::convert::Infallible;
use std::time::Duration;

use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

use super::{
    HANDSHAKE_VERSIONS, INSTRUCTIONS, MODERN_VERSIONS, Message, RpcError, accepted, accepts, codes,
    json_response, method_not_allowed, parse_message, rpc_error_response, rpc_result, sends_json,
    server_info, tools,
};
use crate::AppState;
use crate::agents::AgentPrincipal;

const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
const META_SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";
const META_SUBSCRIPTION: &str = "io.modelcontextprotocol/subscriptionId";

fn status_of(code: i64) -> StatusCode {
    match code {
        codes::METHOD_NOT_FOUND => StatusCode::NOT_FOUND,
        codes::INTERNAL_ERROR => StatusCode::OK,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn fail(id: Value, e: RpcError) -> Response {
    rpc_error_response(status_of(e.code), id, &e)
}

/// 406 for a client that does not accept `media`, as a JSON-RPC error like every other refusal.
fn not_acceptable(media: &str) -> Response {
    rpc_error_response(
        StatusCode::NOT_ACCEPTABLE,
        Value::Null,
        &RpcError::new(
            codes::INVALID_REQUEST,
            format!("Not Acceptable: Client must accept {media}"),
        ),
    )
}

/// The answer to a routing header (`what`, lower case) that is missing or disagrees with the body.
fn mismatch(id: &Value, headers: &HeaderMap, what: &str) -> Response {
    let message = if headers.contains_key(what) {
        format!("the {what} header does not match the request body")
    } else {
        format!("the {what} header is missing; it must repeat what the request body says")
    };
    fail(id.clone(), RpcError::new(codes::HEADER_MISMATCH, message))
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Decodes an `Mcp-Name` value: plain, or `=?base64?<base64 of UTF-8>?=`.
pub fn decode_header_value(value: &str) -> Option<String> {
    match value.strip_prefix("=?base64?").and_then(|v| v.strip_suffix("?=")) {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok()),
        None => Some(value.to_string()),
    }
}

fn with_result_fields(mut result: Value, list: bool) -> Value {
    result["resultType"] = "complete".into();
    result["_meta"] = json!({ META_SERVER_INFO: server_info() });
    if list {
        result["ttlMs"] = 0.into();
        result["cacheScope"] = "private".into();
    }
    result
}

pub async fn handle(
    state: &AppState,
    agent: &AgentPrincipal,
    method: &Method,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    if *method != Method::POST {
        return method_not_allowed("POST");
    }
    if !accepts(headers, "application/json") {
        return not_acceptable("application/json");
    }
    if !sends_json(headers) {
        return rpc_error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Value::Null,
            &RpcError::new(
                codes::INVALID_REQUEST,
                "Unsupported Media Type: send application/json",
            ),
        );
    }
    let (id, rpc_method, params) = match parse_message(body) {
        Err((status, id, e)) => return rpc_error_response(status, id, &e),
        Ok(Message::Other) => {
            let version = header(headers, "mcp-protocol-version").unwrap_or_default();
            return if MODERN_VERSIONS.contains(&version) {
                accepted()
            } else {
                unsupported(Value::Null, version)
            };
        }
        Ok(Message::Request { id, method, params }) => (id, method, params),
    };
    if rpc_method == "subscriptions/listen" && !accepts(headers, "text/event-stream") {
        return not_acceptable("text/event-stream");
    }
    for name in ["mcp-protocol-version", "mcp-method", "mcp-name"] {
        if headers.get_all(name).iter().count() > 1 {
            return fail(
                id,
                RpcError::new(
                    codes::HEADER_MISMATCH,
                    format!("the {name} header appears more than once"),
                ),
            );
        }
    }
    // A version spoken nowhere here: say which ones are, not what a stateless request lacks.
    if let Some(version) = header(headers, "mcp-protocol-version")
        && !MODERN_VERSIONS.contains(&version)
    {
        return unsupported(id, version);
    }
    let meta = params.get("_meta").and_then(Value::as_object);
    let Some(meta) = meta
        .filter(|m| m.contains_key(META_VERSION) && m.get(META_CAPABILITIES).is_some_and(Value::is_object))
    else {
        return fail(
            id,
            RpcError::new(
                codes::INVALID_PARAMS,
                format!(
                    "params._meta must be an object carrying the required '{META_VERSION}' and '{META_CAPABILITIES}' keys"
                ),
            ),
        );
    };
    let meta_version = meta.get(META_VERSION).and_then(Value::as_str);
    if header(headers, "mcp-protocol-version") != meta_version {
        return mismatch(&id, headers, "mcp-protocol-version");
    }
    if header(headers, "mcp-method") != Some(rpc_method.as_str()) {
        return mismatch(&id, headers, "mcp-method");
    }
    if rpc_method == "tools/call"
        && let Some(name) = params.get("name").and_then(Value::as_str)
        && header(headers, "mcp-name")
            .and_then(decode_header_value)
            .as_deref()
            != Some(name)
    {
        return mismatch(&id, headers, "mcp-name");
    }
    let Some(version) = meta_version else {
        return fail(
            id,
            RpcError::new(
                codes::INVALID_PARAMS,
                "the protocol version in _meta must be a string",
            ),
        );
    };
    if !MODERN_VERSIONS.contains(&version) {
        return unsupported(id, version);
    }

    let result = match rpc_method.as_str() {
        "server/discover" => Ok(with_result_fields(
            json!({
                // A dual-era server: the handshake revisions are spoken on the same endpoint.
                "supportedVersions": MODERN_VERSIONS.iter().chain(HANDSHAKE_VERSIONS).collect::<Vec<_>>(),
                "capabilities": {"tools": {"listChanged": true}},
                "instructions": INSTRUCTIONS,
            }),
            true,
        )),
        "tools/list" => tools::list(state, agent)
            .await
            .map(|t| with_result_fields(json!({"tools": t}), true)),
        "tools/call" => tools::call(state, agent, &params)
            .await
            .map(|r| with_result_fields(r, false)),
        "subscriptions/listen" => return listen(state, agent, headers, id, &params).await,
        other => Err(RpcError {
            code: codes::METHOD_NOT_FOUND,
            message: "Method not found".into(),
            data: Some(other.into()),
        }),
    };
    match result {
        Ok(r) => json_response(rpc_result(&id, r)),
        Err(e) => fail(id, e),
    }
}

fn unsupported(id: Value, requested: &str) -> Response {
    fail(
        id,
        RpcError {
            code: codes::UNSUPPORTED_PROTOCOL_VERSION,
            message: "Unsupported protocol version".into(),
            data: Some(json!({
                "supported": MODERN_VERSIONS.iter().chain(HANDSHAKE_VERSIONS).collect::<Vec<_>>(),
                "requested": requested,
            })),
        },
    )
}

/// `subscriptions/listen`: an event stream acknowledging the honoured notification kinds, then
/// `notifications/tools/list_changed` whenever the tools this agent may see can have changed.
async fn listen(
    state: &AppState,
    agent: &AgentPrincipal,
    headers: &HeaderMap,
    id: Value,
    params: &Value,
) -> Response {
    let wants_tools = params
        .get("notifications")
        .and_then(|n| n.get("toolsListChanged"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let honoured = if wants_tools {
        json!({"toolsListChanged": true})
    } else {
        json!({})
    };
    let ack = json!({
        "jsonrpc": "2.0",
        "method": "notifications/subscriptions/acknowledged",
        "params": {"_meta": {META_SUBSCRIPTION: id}, "notifications": honoured},
    });
    let watch = super::ToolsWatch::new(state, agent, headers).await;
    let first = futures_util::stream::once(async move {
        Ok::<_, Infallible>(Event::default().event("message").data(ack.to_string()))
    });
    let changes = futures_util::stream::unfold((watch, id), move |(mut watch, id)| async move {
        loop {
            // Ends with its token (revoked, expired); tells of changes only if asked to.
            match watch.tick().await {
                super::Tick::Ended => return None,
                super::Tick::Changed if wants_tools => {
                    let note = json!({
                        "jsonrpc": "2.0",
                        "method": "notifications/tools/list_changed",
                        "params": {"_meta": {META_SUBSCRIPTION: id}},
                    });
                    let event = Event::default().event("message").data(note.to_string());
                    return Some((Ok::<_, Infallible>(event), (watch, id)));
                }
                _ => {}
            }
        }
    });
    use futures_util::StreamExt;
    Sse::new(first.chain(changes))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_may_be_base64_encoded() {
        assert_eq!(
            super::decode_header_value("refund_invoice").unwrap(),
            "refund_invoice"
        );
        assert_eq!(
            super::decode_header_value("=?base64?WsO8cmljaCA=?=").unwrap(),
            "Zürich "
        );
        assert!(super::decode_header_value("=?base64?***?=").is_none());
    }
}
