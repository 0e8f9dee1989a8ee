//! OAuth 2.0 Protected Resource Metadata (RFC 9728) for the MCP server. The MCP authorization
//! rules have a client that is refused (401) read the `resource_metadata` URL from the
//! challenge, fetch this document, and learn from it which authorization servers issue tokens
//! for `/mcp`. Gateway-minted tokens come from the admin API, not from an OAuth server, so the
//! document names authorization servers only when the operator lists them
//! (`mcp_authorization_servers`, an external issuer's URL, say).

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::AppState;
use crate::config::Config;
use crate::http::ApiError;

/// The document for `/mcp`: the well-known name followed by the resource's path (RFC 9728 §3.1).
pub const MCP_METADATA_PATH: &str = "/.well-known/oauth-protected-resource/mcp";

/// The same document at the bare well-known name, which clients try when the challenge names
/// no document.
pub const ROOT_METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

/// How long a client may keep the document.
const MAX_AGE_SECONDS: u32 = 300;

/// The metadata routes; public, like any discovery document.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(MCP_METADATA_PATH, get(document))
        .route(ROOT_METADATA_PATH, get(document))
}

/// The URL clients reach this server at, without a trailing slash: `public_url` when configured,
/// else `http://` and the request's `Host` (`None` if that is no host name).
pub fn base_url(config: &Config, headers: &HeaderMap) -> Option<String> {
    if let Some(url) = &config.public_url {
        return Some(url.clone());
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    // A parsed authority holds no quote, space or slash, so it is safe in the challenge's
    // quoted string and names a host, not a path.
    let authority: axum::http::uri::Authority = host.parse().ok()?;
    (authority.as_str() == host && !host.contains('@')).then(|| format!("http://{host}"))
}

async fn document(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(base) = base_url(&state.config, &headers) else {
        return ApiError::bad_request(
            "invalid_host",
            "the Host header names no host; an operator can set public_url to the address clients use",
        )
        .into_response();
    };
    let mut doc = json!({
        "resource": format!("{base}/mcp"),
        "resource_name": "OpsIQ gateway",
        "bearer_methods_supported": ["header"],
    });
    let servers = &state.config.mcp_authorization_servers;
    if !servers.is_empty() {
        doc["authorization_servers"] = json!(servers);
    }
    let mut response = axum::Json(doc).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(&format!("public, max-age={MAX_AGE_SECONDS}"))
            .unwrap_or(HeaderValue::from_static("no-cache")),
    );
    // Public metadata: browser-based MCP clients read it from other origins.
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    response
}

/// Adds `resource_metadata` (RFC 9728 §5.1) to a 401's `WWW-Authenticate: Bearer` challenge.
pub fn name_metadata_in_challenge(response: &mut Response, config: &Config, headers: &HeaderMap) {
    let Some(base) = base_url(config, headers) else {
        return;
    };
    let headers = response.headers_mut();
    let Some(challenge) = headers
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    let extended = format!("{challenge}, resource_metadata=\"{base}{MCP_METADATA_PATH}\"");
    if let Ok(value) = HeaderValue::from_str(&extended) {
        headers.insert(header::WWW_AUTHENTICATE, value);
    }
}
