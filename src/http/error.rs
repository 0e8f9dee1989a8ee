//! [`ApiError`]: the one place where failures become the contract's error body
//! `{"error": {"code", "message", "details"}}` with the fitting status.

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

/// One problem inside a request, pointing at where it is (`/amount`) and what to do about it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorDetail {
    /// JSON pointer into the request (or into the arguments for invocations).
    pub path: String,
    /// A sentence a person or an LLM can act on.
    pub message: String,
}

impl ErrorDetail {
    /// The same problem, pointed at from `prefix` (a pointer to where the checked value sits in
    /// a larger body): `/amount` under `/action/arguments` is `/action/arguments/amount`.
    pub fn under(self, prefix: &str) -> Self {
        let inner = if self.path == "/" { "" } else { self.path.as_str() };
        Self {
            path: format!("{prefix}{inner}"),
            message: self.message,
        }
    }
}

/// Per-field problems (as an error body's `details` holds them) in one line, for a person or a
/// model to read: `/amount: must be positive; /currency: …`.
pub fn describe_details(details: &[Value]) -> String {
    details
        .iter()
        .map(|d| {
            format!(
                "{}: {}",
                d["path"].as_str().unwrap_or("/"),
                d["message"].as_str().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// An error answer of the HTTP API.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable `snake_case` code clients can branch on.
    pub code: Cow<'static, str>,
    /// Human sentence; never a secret, a stack trace or another tenant's data.
    pub message: String,
    /// Per-field problems (validation) or other structured context.
    pub details: Vec<Value>,
    /// Seconds for `Retry-After` (429).
    pub retry_after: Option<u64>,
    /// Whether to add `WWW-Authenticate: Bearer` (401).
    pub bearer_challenge: bool,
}

/// Shorthand for handler results.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// Any status with a code and message.
    pub fn new(status: StatusCode, code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            details: Vec::new(),
            retry_after: None,
            bearer_challenge: false,
        }
    }

    /// 400 for a request that cannot be understood.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401: no credentials or credentials that do not hold.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, code, message);
        e.bearer_challenge = true;
        e
    }

    /// 403: authenticated but not allowed.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// 404 for an object that does not exist in this tenant (also another tenant's object).
    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("no such {what}"))
    }

    /// 412 for a change made against a version (`If-Match`) the object has moved on from.
    pub fn version_mismatch(what: &str, current: i64) -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            "version_mismatch",
            format!(
                "the {what} was changed meanwhile and is at version {current} now; read it again and apply your change to that version"
            ),
        )
    }

    /// 409 for a conflict (duplicate name, idempotency key reused with other arguments).
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 422 with one detail per problem.
    pub fn validation(message: impl Into<String>, details: Vec<ErrorDetail>) -> Self {
        let mut e = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", message);
        e.details = details
            .into_iter()
            .map(|d| serde_json::to_value(d).unwrap_or(Value::Null))
            .collect();
        e
    }

    /// 422 for a single field.
    pub fn invalid_field(path: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::validation(
            format!("{path}: {message}"),
            vec![ErrorDetail {
                path: path.into(),
                message,
            }],
        )
    }

    /// The same error, telling the client to retry after `secs` seconds (at least one).
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// 429 with `Retry-After`.
    pub fn rate_limited(message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message).with_retry_after(retry_after_secs)
    }

    /// 500; the cause is logged here and never shown to the caller.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the server failed to handle this request; it has been logged",
        )
    }

    /// 503 with `Retry-After` when the database was briefly unable to serve; the same request
    /// may be retried (an idempotency key makes that safe). The cause is logged.
    pub fn storage_unavailable(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "database unavailable");
        Self::unavailable(
            "the database is briefly unavailable; retry shortly (with the same Idempotency-Key)",
            1,
        )
    }

    /// 503 with `Retry-After` for a moment's unavailability of the database, already logged.
    fn unavailable(message: impl Into<String>, retry_after_secs: u64) -> Self {
        metrics::counter!("opsiq_storage_unavailable_total").increment(1);
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).with_retry_after(retry_after_secs)
    }

    /// The answer to a call a rate limit (of its `what`: agent, action) refused: 429 with
    /// `Retry-After`; if the limit could not be read, 503 (a moment's trouble) or 500 (lasting),
    /// logged only by the caller that asked the database.
    pub fn rate_refusal(refusal: crate::rate::RateError, what: &str) -> Self {
        use crate::rate::{RateError, retry_after_secs};
        match refusal {
            RateError::Limited(wait) => Self::rate_limited(
                format!("too many calls for this {what}; retry later"),
                retry_after_secs(wait),
            ),
            RateError::Unavailable(wait) => Self::unavailable(
                format!("this {what}'s rate limit cannot be checked just now; retry shortly"),
                retry_after_secs(wait),
            ),
            RateError::Broken => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the server failed to handle this request; it has been logged",
            ),
            RateError::Db(e) => e.into(),
        }
    }

    /// Replaces the message.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// Adds structured details.
    pub fn with_details(mut self, details: Vec<Value>) -> Self {
        self.details = details;
        self
    }
}

/// Longest message an error carries; longer ones (a rejected value quoted whole) are cut.
const MAX_MESSAGE_CHARS: usize = 1000;

/// `message` cut to [`MAX_MESSAGE_CHARS`] on a character boundary, marked as cut.
fn clipped(message: &str) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((at, _)) => format!("{}…", &message[..at]),
        None => message.to_string(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(mut self) -> Response {
        for detail in &mut self.details {
            if let Some(message) = detail.get("message").and_then(Value::as_str) {
                detail["message"] = clipped(message).into();
            }
        }
        let message = clipped(&self.message);
        let body = json!({"error": {"code": self.code, "message": message, "details": self.details}});
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.bearer_challenge {
            // RFC 6750: a credential that was sent but refused is named as such.
            let challenge = match &*self.code {
                "invalid_token" | "invalid_api_key" => "Bearer realm=\"opsiq\", error=\"invalid_token\"",
                _ => "Bearer realm=\"opsiq\"",
            };
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        response
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        if e.is_transient() {
            Self::storage_unavailable(e)
        } else {
            Self::internal(e)
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if crate::db::is_transient(&e) {
            Self::storage_unavailable(e)
        } else {
            Self::internal(e)
        }
    }
}

impl From<crate::crypto::CryptoError> for ApiError {
    fn from(e: crate::crypto::CryptoError) -> Self {
        Self::internal(e)
    }
}

/// Answers unknown routes in the contract's shape.
pub async fn not_found_fallback() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// Answers a known route called with the wrong method.
pub async fn method_not_allowed_fallback() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detail_is_pointed_at_from_its_place_in_a_larger_body() {
        let at = |path: &str| {
            ErrorDetail {
                path: path.into(),
                message: "m".into(),
            }
            .under("/then/0/invoke/arguments")
            .path
        };
        assert_eq!(at("/amount"), "/then/0/invoke/arguments/amount");
        assert_eq!(at("/"), "/then/0/invoke/arguments");
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE_CHARS + 5);
        let cut = clipped(&long);
        assert_eq!(cut.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(clipped("short"), "short");
        let exact = "x".repeat(MAX_MESSAGE_CHARS);
        assert_eq!(clipped(&exact), exact);
    }
}
