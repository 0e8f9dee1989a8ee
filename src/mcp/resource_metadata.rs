//! OAuth 2.0 Protected Resource Metadata (RFC 9728) for the MCP server. Under the MCP
//! authorization rules a client that is refused (401) reads the `resource_metadata` URL from
//! the challenge, fetches this document and learns from it which authorization servers issue
//! tokens for `/mcp`. Gateway-minted tokens come from the admin API, not from an OAuth server,
//! so the document exists only when the operator lists authorization servers
//! (`mcp_authorization_servers`: an external issuer a tenant trusts, say) — the rules require it
//! to name at least one — together with the URL clients use (`public_url`), which is what the
//! document must name as the resource: it is never taken from a request's `Host`.

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
const MCP_METADATA_PATH: &str = "/.well-known/oauth-protected-resource/mcp";

/// The metadata routes (public, like any discovery document); 404 unless configured.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/.well-known/oauth-protected-resource/mcp", get(for_mcp))
        .route("/.well-known/oauth-protected-resource", get(for_server))
}

/// Where the document is and what it says, when the configuration gives both.
struct Published<'a> {
    /// `public_url` without a trailing slash.
    base: &'a str,
    /// The authorization servers, at least one.
    servers: &'a [String],
}

fn published(config: &Config) -> Option<Published<'_>> {
    let base = config.public_url.as_deref()?;
    let servers = config.mcp_authorization_servers.as_slice();
    (!servers.is_empty()).then_some(Published { base, servers })
}

/// The document for the resource `resource`.
fn document(resource: String, servers: &[String]) -> Response {
    let doc = json!({
        "resource": resource,
        "authorization_servers": servers,
        "bearer_methods_supported": ["header"],
        "resource_name": "OpsIQ gateway",
    });
    let mut response = axum::Json(doc).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    // Public metadata: browser-based MCP clients read it from other origins.
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    response
}

async fn for_mcp(State(state): State<AppState>) -> Response {
    match published(&state.config) {
        Some(p) => document(format!("{}/mcp", p.base), p.servers),
        None => unpublished().into_response(),
    }
}

/// At the bare well-known name the resource is the server itself (RFC 9728 §3.3: the resource
/// is what the document's URL was formed from); clients that find no document for `/mcp` try
/// this one, and accept a resource that `/mcp` lies under.
async fn for_server(State(state): State<AppState>) -> Response {
    match published(&state.config) {
        Some(p) => document(p.base.to_string(), p.servers),
        None => unpublished().into_response(),
    }
}

/// 404, told apart from a route that does not exist.
fn unpublished() -> ApiError {
    ApiError::not_found("resource metadata").with_message(
        "this server publishes no OAuth resource metadata; its operator publishes it by setting \
         public_url and mcp_authorization_servers",
    )
}

/// Adds `resource_metadata` (RFC 9728 §5.1) to a 401's `WWW-Authenticate: Bearer` challenge,
/// when there is a document to name.
pub fn name_metadata_in_challenge(response: &mut Response, config: &Config) {
    let Some(p) = published(config) else {
        return;
    };
    let headers: &mut HeaderMap = response.headers_mut();
    let Some(challenge) = headers
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    let extended = format!("{challenge}, resource_metadata=\"{}{MCP_METADATA_PATH}\"", p.base);
    if let Ok(value) = HeaderValue::from_str(&extended) {
        headers.insert(header::WWW_AUTHENTICATE, value);
    }
}
