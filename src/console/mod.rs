//! The web console at `/`: a single page (HTML, a stylesheet, an icon, two ES modules) compiled into the
//! binary and run in the browser over the public API, signed in with an API key. It includes
//! the visual rule builder, so people who do not write JSON can compose rules.
//!
//! The page holds no data and needs no authentication; every call it makes carries the key the
//! user typed. A strict Content-Security-Policy allows only this origin's scripts and styles,
//! so nothing injected into the page could run.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::AppState;
use crate::http::ApiError;

/// The page's only sources are this origin; forms never submit, frames never embed it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One file of the console.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

/// Every file the console serves under `/console/`.
const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/app.js"),
    },
    Asset {
        name: "rule-builder.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/rule-builder.js"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        body: include_str!("assets/icon.svg"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("assets/style.css"),
    },
];

const INDEX: &str = include_str!("assets/index.html");

/// `/` (the page) and `/console/{asset}` (its script and style files).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/console/{asset}", get(asset))
}

/// Every answer of the server gets the console's security headers unless it set its own: the
/// page's, but also a 405 on `/` or a 404 under `/console/`, and the API's JSON, which no
/// browser should sniff, frame or cache either.
pub fn with_security_headers(router: Router) -> Router {
    let security = |name, value: &'static str| {
        SetResponseHeaderLayer::if_not_present(name, HeaderValue::from_static(value))
    };
    router
        .layer(security(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .layer(security(header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(security(header::X_FRAME_OPTIONS, "DENY"))
        .layer(security(header::REFERRER_POLICY, "no-referrer"))
        // The files change with the binary: a browser must not pair an old script with a new page.
        .layer(security(header::CACHE_CONTROL, "no-cache"))
}

async fn index() -> Response {
    serve("text/html; charset=utf-8", INDEX)
}

async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => serve(a.content_type, a.body),
        None => ApiError::not_found("console file").into_response(),
    }
}

fn serve(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}
