//! The MCP server at `/mcp` (Streamable HTTP, JSON-RPC 2.0), speaking both protocol eras:
//!
//! - **2025-11-25 / 2025-06-18** ([`legacy`]): `initialize` handshake, `Mcp-Session-Id`,
//!   `MCP-Protocol-Version` on later requests, a GET stream for `tools/list_changed`, DELETE to
//!   end a session. Sessions are rows in the database, so any replica serves any session.
//! - **2026-07-28** ([`modern`]): stateless; `server/discover`, the protocol version in every
//!   request's `_meta`, `Mcp-Method`/`Mcp-Name` headers checked against the body, `ttlMs` and
//!   `cacheScope` on list results, `subscriptions/listen` for change notifications.
//!
//! The era is chosen per request by the `MCP-Protocol-Version` header: absent or a handshake
//! version → legacy; anything else → modern (which refuses versions it does not speak). Every
//! request needs a bearer agent token. `tools/list` shows exactly what `/v1/tools` shows for the
//! token; `tools/call` goes through the same invocation path as `POST /v1/actions/{name}/invoke`.

mod legacy;
mod modern;
pub mod resource_metadata;
mod tools;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde_json::{Value, json};

use crate::AppState;
use crate::agents::AgentPrincipal;
use crate::http::extract::JsonTextProblem;

/// Versions of the handshake era this server accepts, newest first.
pub const HANDSHAKE_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];
/// Versions of the stateless era this server speaks.
pub const MODERN_VERSIONS: &[&str] = &["2026-07-28"];

/// How long a handshake-era session lasts after `initialize`; then it is unknown (404) and the
/// client starts a new one, as the transport says it must.
pub const SESSION_LIFETIME_MS: i64 = 24 * 3600 * 1000;

/// JSON-RPC error codes used here.
pub mod codes {
    /// Invalid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a JSON-RPC request.
    pub const INVALID_REQUEST: i64 = -32600;
    /// Unknown method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Bad parameters.
    pub const INVALID_PARAMS: i64 = -32602;
    /// Server fault.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// A routing header disagrees with the body (2026-07-28).
    pub const HEADER_MISMATCH: i64 = -32020;
    /// Protocol version not served (2026-07-28).
    pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;
}

/// A JSON-RPC error to answer with.
#[derive(Debug, Clone)]
pub struct RpcError {
    /// JSON-RPC code.
    pub code: i64,
    /// Human sentence.
    pub message: String,
    /// Optional structured data.
    pub data: Option<Value>,
}

impl RpcError {
    /// An error without data.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }
}

/// The MCP route. A request from a browser page whose origin is not in `allowed_origins` is
/// refused before anything else, preflights too; pages from listed origins may call across
/// origins: their preflights are answered and their answers carry the headers that let the page
/// read them.
pub fn routes(allowed_origins: &[String]) -> Router<AppState> {
    let allowed = std::sync::Arc::new(allowed_origins.to_vec());
    let guard = axum::middleware::from_fn_with_state(allowed.clone(), guard_origin);
    let router = Router::new().route("/mcp", any(handle));
    if allowed.is_empty() {
        return router.layer(guard);
    }
    let mcp_headers = [
        "mcp-protocol-version",
        "mcp-session-id",
        "mcp-method",
        "mcp-name",
        "last-event-id",
    ]
    .map(header::HeaderName::from_static);
    // Past the guard, every origin left is a listed one (in whatever spelling).
    let cors = tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::AllowOrigin::predicate(|_, _| true))
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers(tower_http::cors::AllowHeaders::list(
            [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT]
                .into_iter()
                .chain(mcp_headers.clone()),
        ))
        // A page's client reads the challenge to find the resource metadata.
        .expose_headers(tower_http::cors::ExposeHeaders::list(
            mcp_headers.into_iter().chain([header::WWW_AUTHENTICATE]),
        ));
    router.layer(cors).layer(guard)
}

/// Refuses (403) a request whose origin is not listed, before CORS or the handler see it.
async fn guard_origin(
    State(allowed): State<std::sync::Arc<Vec<String>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match check_origin(&allowed, request.headers()) {
        Ok(()) => next.run(request).await,
        Err((status, message)) => rpc_error_response(
            status,
            Value::Null,
            &RpcError::new(codes::INVALID_REQUEST, message),
        ),
    }
}

async fn handle(State(state): State<AppState>, request: axum::extract::Request) -> Response {
    // The body is read only once the token holds: a stranger's stalled body holds nothing.
    let (parts, body) = request.into_parts();
    let (method, headers) = (parts.method.clone(), parts.headers.clone());
    let refuse = |(status, message): (StatusCode, String)| {
        rpc_error_response(
            status,
            Value::Null,
            &RpcError::new(codes::INVALID_REQUEST, message),
        )
    };
    let agent = match authenticate(&state, &headers).await {
        Ok(agent) => agent,
        Err(response) => return response,
    };
    let version = match protocol_version(&headers) {
        Ok(version) => version,
        Err(refusal) => return refuse(refusal),
    };
    let deadline = state.config.read_timeout;
    let read = Bytes::from_request(axum::extract::Request::from_parts(parts, body), &state);
    let Ok(body) = tokio::time::timeout(deadline, read).await else {
        let e = crate::http::extract::body_too_slow(deadline);
        return rpc_error_response(
            StatusCode::REQUEST_TIMEOUT,
            Value::Null,
            &RpcError::new(codes::INVALID_REQUEST, e.message),
        );
    };
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            return rpc_error_response(
                rejection.status(),
                Value::Null,
                &RpcError::new(
                    codes::INVALID_REQUEST,
                    "the request body could not be read or is too large",
                ),
            );
        }
    };
    // Nested too deep, holding a NUL or a number too large, or naming a key twice: refused
    // before it is parsed, as everywhere. (A batch, which only some sessions take, is checked
    // message by message where it is taken, so that one bad message spoils only its answer.)
    let max_depth = state.config.max_json_depth;
    if let Err(problem) = crate::http::extract::scan_json_text(&body, max_depth) {
        let batch = problem != JsonTextProblem::TooDeep
            && serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(&body).is_ok();
        if !batch {
            let (status, answer) = answer_to_problem(problem, &body, max_depth);
            return (status, axum::Json(answer)).into_response();
        }
    }
    match version {
        // A stateless-era POST says in JSON-RPC which versions are spoken; another method has
        // no body to say it in.
        Some(v)
            if !HANDSHAKE_VERSIONS.contains(&v)
                && !MODERN_VERSIONS.contains(&v)
                && matches!(method, Method::GET | Method::DELETE) =>
        {
            refuse((
                StatusCode::BAD_REQUEST,
                format!("Bad Request: Unsupported protocol version {v}"),
            ))
        }
        Some(v) if !HANDSHAKE_VERSIONS.contains(&v) => {
            modern::handle(&state, &agent, &method, &headers, &body).await
        }
        _ => legacy::handle(&state, &agent, &method, &headers, &body).await,
    }
}

/// Refuses a browser's request from an origin not listed in `mcp_allowed_origins` (403), as
/// the transport requires against DNS rebinding: a page that rebinds its own name to this server
/// sends its own origin. Clients that are not browsers send no `Origin` and pass.
fn check_origin(allowed: &[String], headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
    let mut origins = headers.get_all(header::ORIGIN).iter();
    let Some(origin) = origins.next() else {
        return Ok(());
    };
    let listed = origins.next().is_none()
        && origin
            .to_str()
            .ok()
            .and_then(crate::config::normalize_origin)
            .is_some_and(|origin| allowed.contains(&origin));
    if listed {
        return Ok(());
    }
    let shown = String::from_utf8_lossy(origin.as_bytes());
    Err((
        StatusCode::FORBIDDEN,
        format!(
            "Forbidden: requests from origin {shown} are not allowed; an operator may list it in mcp_allowed_origins"
        ),
    ))
}

/// The one `MCP-Protocol-Version` header of a request, if it sends one. Two, or one that is
/// not text, are a 400: every reader must see the version the others saw.
fn protocol_version(headers: &HeaderMap) -> Result<Option<&str>, (StatusCode, String)> {
    let mut values = headers.get_all("mcp-protocol-version").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let refuse = |message: &str| Err((StatusCode::BAD_REQUEST, message.to_string()));
    if values.next().is_some() {
        return refuse("Bad Request: send one MCP-Protocol-Version header");
    }
    match value.to_str() {
        Ok(version) => Ok(Some(version)),
        Err(_) => refuse("Bad Request: Unsupported protocol version (not ASCII)"),
    }
}

/// What a stream of `notifications/tools/list_changed` watches: the tools one agent may see.
/// Checked once a second; a change of the tenant's registry or of a policy, or of the agent's
/// roles or scopes, makes it list the tools again, and only a list that differs is a change.
/// The token is checked each time too: a stream ends when its token is revoked or expires, and
/// when the server begins to stop.
pub struct ToolsWatch {
    state: AppState,
    /// Only the `Authorization` header of the request that opened the stream.
    credentials: HeaderMap,
    /// (registry and policy versions, roles, scopes) when the tools were last listed.
    listed_at: (i64, Vec<String>, Vec<String>),
    tools: Vec<Value>,
}

impl ToolsWatch {
    /// Starts watching what `agent` (authenticated by `headers`) may see now.
    pub async fn new(state: &AppState, agent: &AgentPrincipal, headers: &HeaderMap) -> Self {
        let mut credentials = HeaderMap::new();
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            credentials.insert(header::AUTHORIZATION, value.clone());
        }
        let version = legacy::tools_version(state, &agent.tenant_id).await;
        let tools = tools::list(state, agent).await.unwrap_or_default();
        Self {
            state: state.clone(),
            credentials,
            listed_at: (version, agent.roles.clone(), agent.scopes.clone()),
            tools,
        }
    }

    /// Waits a second, then says whether the agent's tools list changed, or whether its token
    /// no longer holds (the stream then ends).
    pub async fn tick(&mut self) -> Tick {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        // The server is stopping: the client opens a new stream on another process (or this
        // one, restarted).
        if self.state.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Tick::Ended;
        }
        let Ok(agent) = authenticate(&self.state, &self.credentials).await else {
            return Tick::Ended;
        };
        let version = legacy::tools_version(&self.state, &agent.tenant_id).await;
        let now = (version, agent.roles.clone(), agent.scopes.clone());
        if now == self.listed_at {
            return Tick::Same;
        }
        self.listed_at = now;
        match tools::list(&self.state, &agent).await {
            Ok(tools) if tools != self.tools => {
                self.tools = tools;
                Tick::Changed
            }
            _ => Tick::Same,
        }
    }
}

/// One look of a [`ToolsWatch`].
#[derive(Debug, PartialEq, Eq)]
pub enum Tick {
    /// Nothing this agent sees changed.
    Same,
    /// The agent's tools list changed.
    Changed,
    /// The token no longer holds.
    Ended,
}

async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<AgentPrincipal, Response> {
    let refused = |e: crate::http::ApiError| {
        let mut response = e.into_response();
        resource_metadata::name_metadata_in_challenge(&mut response, &state.config);
        response
    };
    let Some(token) = crate::http::auth::sole_bearer_token(headers) else {
        return Err(refused(crate::http::ApiError::unauthorized(
            "unauthorized",
            "the MCP server needs an agent token as `Authorization: Bearer <JWT>`",
        )));
    };
    crate::gateway::authenticate(state, token).await.map_err(refused)
}

/// The answer to one message whose text [`scan_json_text`](crate::http::extract::scan_json_text)
/// found `problem` in, with its HTTP status. In otherwise good JSON a tool call learns it as a
/// tool error its model can act on, another request as an error for its own id. Text that is no
/// JSON is a parse error; an envelope that names its id or method twice has neither that can be
/// trusted.
pub fn answer_to_problem(problem: JsonTextProblem, text: &[u8], max_depth: usize) -> (StatusCode, Value) {
    let envelope_ambiguous = matches!(&problem,
        JsonTextProblem::DuplicateKey(at) if ["/id", "/method", "/jsonrpc", "/params"].contains(&at.as_str()));
    let parsed = match problem {
        JsonTextProblem::TooDeep => None,
        _ => Some(serde_json::from_slice::<Value>(text)),
    };
    let e = problem.into_api_error(max_depth);
    let message = with_details(e.message, &e.details);
    let request = match parsed {
        Some(Err(_)) => {
            let e = RpcError::new(codes::PARSE_ERROR, "the request body is not valid JSON");
            return (StatusCode::BAD_REQUEST, rpc_error(Value::Null, &e));
        }
        Some(Ok(request)) if !envelope_ambiguous => Some(request),
        _ => None,
    };
    let id = request
        .as_ref()
        .and_then(|r| r.get("id"))
        .filter(|id| id.is_string() || id.is_number());
    match (&request, id) {
        (Some(r), Some(id)) if r["method"] == "tools/call" => {
            (StatusCode::OK, rpc_result(id, tools::tool_error(message)))
        }
        (Some(_), id) => (
            StatusCode::BAD_REQUEST,
            rpc_error(
                id.cloned().unwrap_or(Value::Null),
                &RpcError::new(codes::INVALID_PARAMS, message),
            ),
        ),
        (None, _) => (
            StatusCode::BAD_REQUEST,
            rpc_error(Value::Null, &RpcError::new(codes::INVALID_REQUEST, message)),
        ),
    }
}

/// A JSON-RPC success response.
pub fn rpc_result(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// A JSON-RPC error response with the given HTTP status.
pub fn rpc_error_response(status: StatusCode, id: Value, error: &RpcError) -> Response {
    (status, axum::Json(rpc_error(id, error))).into_response()
}

/// A JSON-RPC error response.
pub fn rpc_error(id: Value, error: &RpcError) -> Value {
    let mut e = json!({"code": error.code, "message": error.message});
    if let Some(data) = &error.data {
        e["data"] = data.clone();
    }
    json!({"jsonrpc": "2.0", "id": id, "error": e})
}

/// A 200 JSON response.
pub fn json_response(body: Value) -> Response {
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// 202 with an empty body (notifications and responses from the client).
pub fn accepted() -> Response {
    StatusCode::ACCEPTED.into_response()
}

/// 405 with the methods that are allowed, in the contract's error shape.
pub fn method_not_allowed(allow: &'static str) -> Response {
    let mut r = crate::http::ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this MCP endpoint accepts {allow}"),
    )
    .into_response();
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// Whether the body is declared as JSON (`Content-Type: application/json`, parameters allowed).
pub fn sends_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
}

/// Whether the `Accept` header admits `media` (`type/subtype`), counting `*/*` and `type/*`.
pub fn accepts(headers: &HeaderMap, media: &str) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let kind = media.split('/').next().unwrap_or_default();
    accept.split(',').any(|part| {
        let essence = part
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        essence == media || essence == "*/*" || essence == format!("{kind}/*")
    })
}

/// A parsed JSON-RPC message.
pub enum Message {
    /// Has an `id` and a `method`.
    Request {
        /// The id, echoed exactly.
        id: Value,
        /// The method.
        method: String,
        /// The params (an object, or `{}`).
        params: Value,
    },
    /// A notification (no `id`) or a response from the client; both are acknowledged.
    Other,
}

/// Parses one JSON-RPC message; batches and malformed envelopes are errors, answered to the
/// request's id where it could be read (else `null`).
pub fn parse_message(body: &[u8]) -> Result<Message, (StatusCode, Value, RpcError)> {
    let value: Value = serde_json::from_slice(body).map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            Value::Null,
            RpcError::new(codes::PARSE_ERROR, "Parse error"),
        )
    })?;
    let invalid = || {
        (
            StatusCode::BAD_REQUEST,
            Value::Null,
            RpcError::new(
                codes::INVALID_REQUEST,
                "Body must be a single JSON-RPC request or notification object",
            ),
        )
    };
    let Some(obj) = value.as_object() else {
        return Err(invalid());
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid());
    }
    let Some(id) = obj.get("id") else {
        return Ok(Message::Other);
    };
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        // A response to something we sent (we send nothing that expects one): acknowledge it.
        return if obj.contains_key("result") || obj.contains_key("error") {
            Ok(Message::Other)
        } else {
            Err(invalid())
        };
    };
    if !(id.is_string() || id.is_i64() || id.is_u64()) {
        return Err(invalid());
    }
    // `null` is read as absent, so every method meets one rule for missing params.
    let params = obj
        .get("params")
        .filter(|p| !p.is_null())
        .cloned()
        .unwrap_or_else(|| json!({}));
    if !params.is_object() {
        // The id is known: the error answers the request by it.
        return Err((
            StatusCode::BAD_REQUEST,
            id.clone(),
            RpcError::new(codes::INVALID_PARAMS, "params must be an object"),
        ));
    }
    Ok(Message::Request {
        id: id.clone(),
        method: method.to_string(),
        params,
    })
}

/// The server's name and version for `serverInfo`.
pub fn server_info() -> Value {
    json!({"name": "opsiq", "title": "OpsIQ gateway", "version": env!("CARGO_PKG_VERSION")})
}

/// Instructions sent to clients on initialize and discover.
pub const INSTRUCTIONS: &str = "Tools here run actions on the customer's systems. Every call is checked against your \
token's scopes and roles and validated against the tool's input schema; a validation problem comes back as a tool \
error listing each field to fix. Pass `_meta[\"io.opsiq/idempotency-key\"]` so a retried call never runs twice.";

/// An API error's message with its details (`/path: …`) appended, for a JSON-RPC error.
fn with_details(message: String, details: &[Value]) -> String {
    if details.is_empty() {
        message
    } else {
        format!("{message}: {}", crate::http::error::describe_details(details))
    }
}
