//! Operational routes: liveness, readiness (the database answers), Prometheus metrics and the
//! OpenAPI document.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;

use crate::AppState;

/// `/healthz`, `/readyz`, `/metrics`, `/openapi.json`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
}

/// The OpenAPI 3.1 document of the HTTP API, kept in the repository beside the other schemas;
/// a test calls every operation it lists against the running server.
pub(crate) const OPENAPI: &str = include_str!("../schemas/openapi.json");

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI.replacen("\"VERSION\"", concat!("\"", env!("CARGO_PKG_VERSION"), "\""), 1),
    )
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.db.ping().await {
        (StatusCode::OK, axum::Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(
                json!({"error": {"code": "not_ready", "message": "the database is unreachable", "details": []}}),
            ),
        )
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
