//! `opsiq listen`: a local receiver that verifies every delivery (signature, timestamp window,
//! nonce) and pretty-prints it, optionally forwarding verified requests to a local app. The
//! quickest way to see a first webhook.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::verify::{Headers, Verifier};

struct Listener {
    verifier: Verifier,
    forward: Option<String>,
    client: reqwest::Client,
}

/// Serves on `listener` until the process ends; prints one block per request to stdout.
pub async fn run(
    listener: tokio::net::TcpListener,
    secrets: Vec<String>,
    forward: Option<String>,
) -> anyhow::Result<()> {
    crate::crypto::install_tls_provider();
    let state = Arc::new(Listener {
        verifier: Verifier::new(secrets),
        forward,
        client: reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()?,
    });
    let app = Router::new().fallback(receive).with_state(state);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn receive(
    State(state): State<Arc<Listener>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let verdict = state.verifier.verify(&headers, &target, &body, now);
    let label = headers
        .header("x-opsiq-event")
        .or_else(|| headers.header("x-opsiq-action"))
        .unwrap_or("-");
    let id = headers.header("x-opsiq-id").unwrap_or("-");
    let attempt = headers.header("x-opsiq-attempt").unwrap_or("-");
    let status_line = match &verdict {
        Ok(v) => format!("valid ({})", v.scheme.as_str()),
        Err(e) => format!("INVALID: {} ({e})", e.reason()),
    };
    let pretty = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    println!("── {method} {target}  {status_line}\n   {label}  {id}  attempt {attempt}\n{pretty}\n");
    if let Err(e) = verdict {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": {"code": e.reason(), "message": e.to_string(), "details": []}})),
        )
            .into_response();
    }
    let Some(forward) = &state.forward else {
        return (StatusCode::OK, axum::Json(json!({"received": true}))).into_response();
    };
    let mut req = state.client.post(forward).body(body);
    for (name, value) in &headers {
        if !matches!(
            name.as_str(),
            "host" | "content-length" | "connection" | "transfer-encoding"
        ) {
            req = req.header(name, value);
        }
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status();
            let bytes = resp.bytes().await.unwrap_or_default();
            println!("   → forwarded to {forward}: {status}\n");
            (status, bytes).into_response()
        }
        Err(e) => {
            println!("   → forwarding to {forward} failed: {e}\n");
            (
                StatusCode::BAD_GATEWAY,
                axum::Json(
                    json!({"error": {"code": "forward_failed", "message": e.to_string(), "details": []}}),
                ),
            )
                .into_response()
        }
    }
}
