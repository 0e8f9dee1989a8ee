//! `/v1/actions`: create, read, list, update, delete, and the version history.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;
use serde_json::Value;

use super::model::ActionDeclaration;
use super::store::{self, Source, StoreError, UpsertMode};
use crate::AppState;
use crate::args;
use crate::changes::Change;
use crate::http::{
    AdminAuth, ApiError, ApiResult, IfMatch, JsonBody, Page, PageQuery, Path, Permission, Query,
};

/// The registry routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/actions", get(list_actions).post(create_action))
        .route(
            "/v1/actions/{name}",
            get(get_action).put(replace_action).delete(delete_action),
        )
        .route("/v1/actions/{name}/versions", get(list_versions))
        .route("/v1/actions/{name}/versions/{version}", get(get_version))
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => ApiError::conflict(
                "already_exists",
                "an action with this name already exists; use PUT /v1/actions/{name} to change it",
            ),
            StoreError::NotFound => ApiError::not_found("action"),
            StoreError::VersionMismatch { current } => ApiError::version_mismatch("action", current),
            StoreError::Db(e) => e.into(),
        }
    }
}

/// Validates a declaration, including that its endpoint exists in this tenant.
async fn check_declaration(state: &AppState, tenant_id: &str, decl: &ActionDeclaration) -> ApiResult<()> {
    let mut problems = decl.validate().err().unwrap_or_default();
    if let Some(endpoint_id) = &decl.endpoint_id {
        let exists: Option<(String,)> = state
            .db
            .fetch_optional(
                "SELECT id FROM endpoints WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
                args![tenant_id, endpoint_id],
            )
            .await?;
        if exists.is_none() {
            problems.push(crate::http::ErrorDetail {
                path: "/endpoint_id".into(),
                message: format!("no endpoint {endpoint_id} in this tenant"),
            });
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApiError::validation(
            "the action declaration is invalid",
            problems,
        ))
    }
}

async fn create_action(
    State(state): State<AppState>,
    auth: AdminAuth,
    decl: JsonBody,
) -> ApiResult<impl IntoResponse> {
    auth.require(Permission::Manage)?;
    let decl: ActionDeclaration = decl.parse()?;
    check_declaration(&state, &auth.tenant_id, &decl).await?;
    crate::audit::note("created", decl.name.clone());
    let (action, _) = store::upsert(
        &state.db,
        &auth.tenant_id,
        &decl,
        Source::Api,
        UpsertMode::CreateOnly,
    )
    .await?;
    state.changed(Change::Actions(auth.tenant_id.clone())).await;
    Ok((
        StatusCode::CREATED,
        IfMatch::etag(action.version),
        axum::Json(action.to_json()),
    ))
}

async fn replace_action(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(name): Path<String>,
    if_match: IfMatch,
    body: JsonBody,
) -> ApiResult<impl IntoResponse> {
    auth.require(Permission::Manage)?;
    let mut body: Value = body.parse()?;
    let Some(map) = body.as_object_mut() else {
        return Err(ApiError::invalid_field(
            "/",
            "the body must be an action declaration object",
        ));
    };
    match map.get("name") {
        None => {
            map.insert("name".into(), name.clone().into());
        }
        Some(Value::String(n)) if *n == name => {}
        Some(_) => {
            return Err(ApiError::invalid_field(
                "/name",
                "must match the name in the URL; actions cannot be renamed",
            ));
        }
    }
    // Server-managed fields may be echoed back from a GET; they are not part of the declaration.
    for field in [
        "id",
        "version",
        "content_hash",
        "source",
        "created_at",
        "updated_at",
    ] {
        map.remove(field);
    }
    let decl: ActionDeclaration = crate::http::extract::from_json_value(body)?;
    check_declaration(&state, &auth.tenant_id, &decl).await?;
    let (action, _) = store::upsert(
        &state.db,
        &auth.tenant_id,
        &decl,
        Source::Api,
        UpsertMode::UpdateOnly(if_match.version()),
    )
    .await?;
    state.changed(Change::Actions(auth.tenant_id.clone())).await;
    Ok((IfMatch::etag(action.version), axum::Json(action.to_json())))
}

async fn get_action(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let action = store::get(&state.db, &auth.tenant_id, &name)
        .await?
        .ok_or_else(|| ApiError::not_found("action"))?;
    Ok((IfMatch::etag(action.version), axum::Json(action.to_json())))
}

async fn list_actions(
    State(state): State<AppState>,
    auth: AdminAuth,
    Query(page): Query<PageQuery>,
) -> ApiResult<axum::Json<Page<Value>>> {
    let limit = page.limit();
    let after = page.cursor.clone().unwrap_or_default();
    let rows = store::list(&state.db, &auth.tenant_id, &after, limit + 1).await?;
    Ok(axum::Json(
        Page::from_rows(rows, limit, |a| a.declaration.name.clone()).map(|a| a.to_json()),
    ))
}

async fn delete_action(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(name): Path<String>,
    if_match: IfMatch,
) -> ApiResult<StatusCode> {
    auth.require(Permission::Manage)?;
    let expected_version = if_match.version();
    if !store::delete(&state.db, &auth.tenant_id, &name, expected_version).await? {
        return Err(ApiError::not_found("action"));
    }
    state.changed(Change::Actions(auth.tenant_id.clone())).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionPage {
    #[serde(default, deserialize_with = "crate::http::page::limit")]
    limit: Option<u32>,
    cursor: Option<i64>,
}

async fn list_versions(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(name): Path<String>,
    Query(page): Query<VersionPage>,
) -> ApiResult<axum::Json<Page<Value>>> {
    let limit = crate::http::page::page_size(page.limit);
    let rows = store::versions(
        &state.db,
        &auth.tenant_id,
        &name,
        page.cursor.unwrap_or(i64::MAX),
        limit + 1,
    )
    .await?;
    if rows.is_empty() && page.cursor.is_none() {
        return Err(ApiError::not_found("action"));
    }
    Ok(axum::Json(
        Page::from_rows(rows, limit, |v| v.version.to_string()).map(|v| v.to_json()),
    ))
}

async fn get_version(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path((name, version)): Path<(String, i64)>,
) -> ApiResult<axum::Json<Value>> {
    let rows = store::versions(&state.db, &auth.tenant_id, &name, version.saturating_add(1), 1).await?;
    rows.into_iter()
        .find(|v| v.version == version)
        .map(|v| axum::Json(v.to_json()))
        .ok_or_else(|| ApiError::not_found("action version"))
}
