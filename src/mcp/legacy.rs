//! The 2025-11-25 / 2025-06-18 era (and the 2025-03-26 revision before it, whose sessions also
//! take JSON-RPC batches): `initialize` handshake, sessions, GET stream, DELETE.
//! JSON-RPC errors to requests are answered with HTTP 200 (clients of this era read error bodies
//! only from 2xx answers); 4xx is kept for transport faults.

use std::convert::Infallible;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{
    HANDSHAKE_VERSIONS, INSTRUCTIONS, Message, RpcError, accepted, accepts, codes, json_response,
    method_not_allowed, parse_message, rpc_error, rpc_error_response, rpc_result, sends_json, server_info,
    tools,
};
use crate::agents::AgentPrincipal;
use crate::db::{self, now_ms};
use crate::{AppState, args, crypto};

const SESSION_HEADER: &str = "mcp-session-id";

pub async fn handle(
    state: &AppState,
    agent: &AgentPrincipal,
    method: &Method,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    match *method {
        Method::POST => post(state, agent, headers, body).await,
        Method::GET => stream(state, agent, headers).await,
        Method::DELETE => end_session(state, agent, headers).await,
        _ => method_not_allowed("GET, POST, DELETE"),
    }
}

fn transport_error(status: StatusCode, message: &str) -> Response {
    rpc_error_response(
        status,
        Value::Null,
        &RpcError::new(codes::INVALID_REQUEST, message),
    )
}

async fn post(state: &AppState, agent: &AgentPrincipal, headers: &HeaderMap, body: &[u8]) -> Response {
    if !accepts(headers, "application/json") {
        return transport_error(
            StatusCode::NOT_ACCEPTABLE,
            "Not Acceptable: Client must accept application/json",
        );
    }
    if !sends_json(headers) {
        return transport_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported Media Type: send application/json",
        );
    }
    if let Some(batch) = as_batch(body) {
        return post_batch(state, agent, headers, batch).await;
    }
    let (id, method, params) = match parse_message(body) {
        Err((status, id, e)) => return rpc_error_response(status, id, &e),
        Ok(Message::Request { id, method, params }) => (id, method, params),
        Ok(Message::Other) => {
            // Notifications need a session too, except that none is owed before initialize.
            return match session(state, agent, headers).await {
                Ok(_) | Err(SessionProblem::Missing) => accepted(),
                Err(p) => p.response(),
            };
        }
    };
    if method == "initialize" {
        return initialize(state, agent, &id, &params).await;
    }
    // Only the stateless revision has this method: sent without a version header, let it say
    // what the request lacks instead of asking for a session that revision never has. (Sent
    // with a handshake version, it is that era's request, answered as such.)
    if method == "server/discover" && !headers.contains_key("mcp-protocol-version") {
        return super::modern::handle(state, agent, &Method::POST, headers, body).await;
    }
    match session(state, agent, headers).await {
        Ok(_) => {}
        // A stateless-era request that left out its version header would be told only that it
        // has no session, which is not what it lacks.
        Err(SessionProblem::Missing)
            if params
                .pointer("/_meta/io.modelcontextprotocol~1protocolVersion")
                .is_some() =>
        {
            return transport_error(
                StatusCode::BAD_REQUEST,
                "Bad Request: Missing session ID; a 2026-07-28 request must also send its protocol version as the MCP-Protocol-Version header",
            );
        }
        Err(p) => return p.response(),
    }
    match answer(state, agent, &method, &params).await {
        Ok(r) => json_response(rpc_result(&id, r)),
        Err(e) => rpc_error_response(StatusCode::OK, id, &e),
    }
}

/// The result of one request on a session.
async fn answer(
    state: &AppState,
    agent: &AgentPrincipal,
    method: &str,
    params: &Value,
) -> Result<Value, RpcError> {
    match method {
        "ping" => Ok(json!({})),
        "tools/list" => tools::list(state, agent).await.map(|t| json!({"tools": t})),
        "tools/call" => tools::call(state, agent, params).await,
        other => Err(RpcError {
            code: codes::METHOD_NOT_FOUND,
            message: "Method not found".into(),
            data: Some(other.into()),
        }),
    }
}

/// Revisions whose transport takes a JSON-RPC batch (an array) in one POST; later ones refuse it.
const BATCHING_VERSIONS: &[&str] = &["2025-03-26", "2024-11-05"];

/// Most messages in one batch.
const MOST_BATCHED: usize = 100;

/// The messages of a body that is a JSON array, as their text.
fn as_batch(body: &[u8]) -> Option<Vec<&RawValue>> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'[' {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// A batch, on a session whose revision takes one: each request answered in order in one array
/// (notifications and responses get no entry; all of them, a 202). `initialize` may not be
/// batched. On later revisions a batch is refused as before.
async fn post_batch(
    state: &AppState,
    agent: &AgentPrincipal,
    headers: &HeaderMap,
    batch: Vec<&RawValue>,
) -> Response {
    let negotiated = match session(state, agent, headers).await {
        Ok((_, negotiated)) => negotiated,
        Err(p) => return p.response(),
    };
    let refuse = |message: &str| {
        rpc_error_response(
            StatusCode::BAD_REQUEST,
            Value::Null,
            &RpcError::new(codes::INVALID_REQUEST, message),
        )
    };
    if !BATCHING_VERSIONS.contains(&negotiated.as_str()) {
        return refuse("Body must be a single JSON-RPC request or notification object");
    }
    if batch.is_empty() || batch.len() > MOST_BATCHED {
        return refuse(&format!("a batch holds 1 to {MOST_BATCHED} messages"));
    }
    let mut answers = Vec::new();
    let max_depth = state.config.max_json_depth;
    for message in batch {
        let text = message.get().as_bytes();
        if let Err(problem) = crate::http::extract::scan_json_text(text, max_depth) {
            answers.push(super::answer_to_problem(problem, text, max_depth).1);
            continue;
        }
        match parse_message(text) {
            Err((_, id, mut e)) => {
                if e.code == codes::INVALID_REQUEST {
                    e.message =
                        "each message of a batch must be a JSON-RPC request, notification or response object"
                            .into();
                }
                answers.push(rpc_error(id, &e));
            }
            Ok(Message::Other) => {}
            Ok(Message::Request { id, method, .. }) if method == "initialize" => answers.push(rpc_error(
                id,
                &RpcError::new(codes::INVALID_REQUEST, "initialize may not be part of a batch"),
            )),
            Ok(Message::Request { id, method, params }) => {
                answers.push(match answer(state, agent, &method, &params).await {
                    Ok(r) => rpc_result(&id, r),
                    Err(e) => rpc_error(id, &e),
                });
            }
        }
    }
    if answers.is_empty() {
        return accepted();
    }
    json_response(Value::Array(answers))
}

async fn initialize(state: &AppState, agent: &AgentPrincipal, id: &Value, params: &Value) -> Response {
    // Required by every revision; an unknown one is answered with the newest spoken here.
    let Some(requested) = params.get("protocolVersion").and_then(Value::as_str) else {
        return rpc_error_response(
            StatusCode::OK,
            id.clone(),
            &RpcError::new(codes::INVALID_PARAMS, "initialize needs params.protocolVersion"),
        );
    };
    let version = if HANDSHAKE_VERSIONS.contains(&requested) {
        requested
    } else {
        HANDSHAKE_VERSIONS[0]
    };
    let session_id = crypto::sha256_hex(&crypto::random_bytes::<32>())[..32].to_string();
    let stored = state
        .db
        .execute(
            "INSERT INTO mcp_sessions (id, tenant_id, agent_id, protocol_version, created_at) VALUES ($1, $2, $3, $4, $5)",
            args![&session_id, &agent.tenant_id, &agent.agent_id, version, now_ms()],
        )
        .await;
    if let Err(e) = stored {
        tracing::error!(error = %e, "cannot store the MCP session");
        return rpc_error_response(
            StatusCode::OK,
            id.clone(),
            &RpcError::new(codes::INTERNAL_ERROR, "cannot start a session"),
        );
    }
    let result = json!({
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": true}},
        "serverInfo": server_info(),
        "instructions": INSTRUCTIONS,
    });
    let mut response = json_response(rpc_result(id, result));
    if let Ok(v) = HeaderValue::from_str(&session_id) {
        response.headers_mut().insert(SESSION_HEADER, v);
    }
    response
}

enum SessionProblem {
    Missing,
    Unknown,
    Storage,
    /// The version header names another version than the session negotiated.
    OtherVersion(String),
}

impl SessionProblem {
    fn response(self) -> Response {
        match self {
            SessionProblem::Missing => {
                transport_error(StatusCode::BAD_REQUEST, "Bad Request: Missing session ID")
            }
            SessionProblem::Unknown => transport_error(StatusCode::NOT_FOUND, "Session not found"),
            SessionProblem::Storage => {
                transport_error(StatusCode::SERVICE_UNAVAILABLE, "sessions are unavailable")
            }
            SessionProblem::OtherVersion(negotiated) => transport_error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "Bad Request: MCP-Protocol-Version must be {negotiated}, the version this session negotiated"
                ),
            ),
        }
    }
}

/// The session of this request; it must exist, be live (ended by no DELETE, and younger than
/// [`super::SESSION_LIFETIME_MS`]) and belong to the calling agent, and a version header must
/// name the version it negotiated.
/// The request's live session of this agent: its id and negotiated protocol version.
async fn session(
    state: &AppState,
    agent: &AgentPrincipal,
    headers: &HeaderMap,
) -> Result<(String, String), SessionProblem> {
    let id = headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or(SessionProblem::Missing)?;
    let row: Option<(String, String)> = state
        .db
        .fetch_optional(
            "SELECT id, protocol_version FROM mcp_sessions WHERE id = $1 AND tenant_id = $2 AND agent_id = $3 \
             AND ended_at IS NULL AND created_at > $4",
            args![id, &agent.tenant_id, &agent.agent_id, now_ms() - super::SESSION_LIFETIME_MS],
        )
        .await
        .map_err(|_| SessionProblem::Storage)?;
    let (id, negotiated) = row.ok_or(SessionProblem::Unknown)?;
    match headers.get("mcp-protocol-version").and_then(|v| v.to_str().ok()) {
        Some(sent) if sent != negotiated => Err(SessionProblem::OtherVersion(negotiated)),
        _ => Ok((id, negotiated)),
    }
}

async fn end_session(state: &AppState, agent: &AgentPrincipal, headers: &HeaderMap) -> Response {
    let id = match session(state, agent, headers).await {
        Ok((id, _)) => id,
        Err(p) => return p.response(),
    };
    match state
        .db
        .execute(
            "UPDATE mcp_sessions SET ended_at = $1 WHERE id = $2",
            args![now_ms(), &id],
        )
        .await
    {
        Ok(_) => StatusCode::OK.into_response(),
        Err(_) => SessionProblem::Storage.response(),
    }
}

/// The version that moves when what this agent may see could have changed.
pub async fn tools_version(state: &AppState, tenant_id: &str) -> i64 {
    let registry = db::counter(&state.db, &format!("registry:{tenant_id}"))
        .await
        .unwrap_or(0);
    let policy = db::counter(&state.db, &crate::policy::counter_name(tenant_id))
        .await
        .unwrap_or(0);
    // An endpoint enabled, disabled or deleted changes which actions can be called.
    let mut endpoints: Vec<String> = match state.engine.subscribers(tenant_id).await {
        Ok(list) => list.iter().map(|endpoint| endpoint.id.clone()).collect(),
        Err(_) => Vec::new(),
    };
    endpoints.sort_unstable();
    let mut hasher = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(&endpoints, &mut hasher);
    registry
        .wrapping_mul(1_000_003)
        .wrapping_add(policy)
        .wrapping_mul(31)
        .wrapping_add(std::hash::Hasher::finish(&hasher) as i64)
}

/// GET: a server-to-client stream carrying `notifications/tools/list_changed`.
async fn stream(state: &AppState, agent: &AgentPrincipal, headers: &HeaderMap) -> Response {
    let session_id = match session(state, agent, headers).await {
        Ok((id, _)) => id,
        Err(p) => return p.response(),
    };
    if !accepts(headers, "text/event-stream") {
        return transport_error(
            StatusCode::NOT_ACCEPTABLE,
            "Not Acceptable: Client must accept text/event-stream",
        );
    }
    let state = state.clone();
    let watch = super::ToolsWatch::new(&state, agent, headers).await;
    let events =
        futures_util::stream::unfold((state, session_id, watch), |(state, sid, mut watch)| async move {
            loop {
                // Ends with its token (revoked, expired), or with its session.
                let tick = watch.tick().await;
                if tick == super::Tick::Ended {
                    return None;
                }
                let live: Option<(String,)> = state
                    .db
                    .fetch_optional(
                        "SELECT id FROM mcp_sessions WHERE id = $1 AND ended_at IS NULL AND created_at > $2",
                        args![&sid, now_ms() - super::SESSION_LIFETIME_MS],
                    )
                    .await
                    .ok()
                    .flatten();
                live.as_ref()?;
                if tick == super::Tick::Same {
                    continue;
                }
                let note = json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"});
                let event = Event::default().event("message").data(note.to_string());
                return Some((Ok::<_, Infallible>(event), (state, sid, watch)));
            }
        });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
