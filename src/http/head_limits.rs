//! Limits on a request's head, answered with the contract's error body. hyper refuses heads
//! past its own limits (100 headers, about 400 KB) with an empty 431 or 414; these lower limits
//! catch what a client can reasonably send by mistake (a runaway query string, a token pasted
//! twice) with an answer that says what was too large, and keep kilobytes of header from
//! reaching authentication and logging.

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// Longest path and query, in bytes (what common proxies accept by default).
pub const MOST_TARGET_BYTES: usize = 8 * 1024;

/// Most bytes of header names and values together.
pub const MOST_HEADER_BYTES: usize = 32 * 1024;

/// Refuses a request whose target or headers are larger than the limits above.
pub async fn refuse_oversized_head(request: Request, next: Next) -> Response {
    let target = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MOST_TARGET_BYTES {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!(
                "the request's path and query are {target} bytes; at most {MOST_TARGET_BYTES} are accepted"
            ),
        )
        .into_response();
    }
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers > MOST_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the request's headers are {headers} bytes; at most {MOST_HEADER_BYTES} are accepted"),
        )
        .into_response();
    }
    next.run(request).await
}
