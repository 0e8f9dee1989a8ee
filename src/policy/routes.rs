//! `GET|PUT /v1/policies`: a tenant's API-managed rows (file rows are shown, never replaced).

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;

use super::{PolicyError, PolicyRow, replace_rows, rows_tag, tenant_rows};
use crate::AppState;
use crate::http::{AdminAuth, ApiError, ApiResult, ErrorDetail, IfMatch, JsonBody, Permission};

/// The policy routes.
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/policies", get(get_policies).put(put_policies))
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        match e {
            // Storage errors keep their own mapping, so a transient one stays a retryable 503.
            PolicyError::Db(e) => e.into(),
            PolicyError::Changed => ApiError::new(
                axum::http::StatusCode::PRECONDITION_FAILED,
                "version_mismatch",
                "the policy rows were changed meanwhile; read them again and apply your change to them",
            ),
            other => ApiError::internal(other),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
    rows: Vec<PolicyRow>,
    /// Shown by GET and ignored here (file rows change only with their file), so that what a GET
    /// answered can be PUT back as it is.
    #[serde(default, rename = "file_rows")]
    _file_rows: serde::de::IgnoredAny,
}

async fn get_policies(State(state): State<AppState>, auth: AdminAuth) -> ApiResult<impl IntoResponse> {
    let rows = tenant_rows(&state.db, &auth.tenant_id).await?;
    Ok((
        IfMatch::etag(rows_tag(&rows)),
        axum::Json(json!({"rows": rows, "file_rows": state.policy.file_rows()})),
    ))
}

async fn put_policies(
    State(state): State<AppState>,
    auth: AdminAuth,
    IfMatch(expected_tag): IfMatch,
    body: JsonBody,
) -> ApiResult<impl IntoResponse> {
    auth.require(Permission::Manage)?;
    let body: PolicyBody = body.parse()?;
    if body.rows.len() > 10_000 {
        return Err(ApiError::invalid_field("/rows", "at most 10000 rows"));
    }
    let problems: Vec<ErrorDetail> = body
        .rows
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            r.check()
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(move |(field, message)| ErrorDetail {
                    path: format!("/rows/{i}/{field}"),
                    message,
                })
        })
        .collect();
    if !problems.is_empty() {
        return Err(ApiError::validation("the policy rows are invalid", problems));
    }
    // Cached token states carry the policy version.
    let (db, tenant_id, rows) = (state.db.clone(), auth.tenant_id.clone(), body.rows.clone());
    let replace = async move { replace_rows(&db, &tenant_id, &rows, expected_tag.as_deref()).await };
    let tag = state.gateway.change_token_state(replace).await??;
    Ok((
        IfMatch::etag(tag),
        axum::Json(json!({"rows": body.rows, "file_rows": state.policy.file_rows()})),
    ))
}
