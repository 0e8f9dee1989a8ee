//! Agent-facing HTTP routes (`/v1/tools`, `/v1/actions/{name}/invoke`) and invocation records
//! (`/v1/invocations`, for admins and, restricted to their own, agents).

use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, State};
use axum::http::{HeaderMap, StatusCode, request::Parts};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::invocations::InvocationRow;
use super::invoke::{Caller, InvokeRequest, Repeat, invoke, load, poll_until_settled};
use super::tools::{Format, allowed_actions, tool};
use super::{AgentAuth, authenticate};
use crate::db::Arg;
use crate::events::routes::idempotency_key;
use crate::http::auth::{API_KEY_PREFIX, bearer_token};
use crate::http::{AdminAuth, ApiError, ApiResult, Json, Page, Path, Query};
use crate::{AppState, args};

/// The gateway routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/tools", get(list_tools))
        .route("/v1/actions/{name}/invoke", post(invoke_action))
        .route("/v1/invocations", get(list_invocations))
        .route("/v1/invocations/{id}", get(get_invocation))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolsQuery {
    format: Option<String>,
    #[serde(default, deserialize_with = "crate::http::page::limit")]
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn list_tools(
    State(state): State<AppState>,
    AgentAuth(agent): AgentAuth,
    Query(q): Query<ToolsQuery>,
) -> ApiResult<axum::Json<Value>> {
    let name = q.format.as_deref().unwrap_or("openai");
    let format = Format::parse(name)
        .ok_or_else(|| ApiError::bad_request("invalid_query", "format must be openai, anthropic or mcp"))?;
    // Tools come in name order; a cursor is the last name of the page before.
    let after = q.cursor.unwrap_or_default();
    let mut page: Vec<_> = allowed_actions(&state, &agent)
        .await?
        .into_iter()
        .filter(|a| a.declaration.name > after)
        .collect();
    // Without a limit, every tool at once: a client that does not page still sees them all.
    let next_cursor = match q.limit.map(|l| l as usize) {
        Some(limit) if page.len() > limit => {
            page.truncate(limit);
            page.last().map(|a| a.declaration.name.clone())
        }
        _ => None,
    };
    let tools: Vec<Value> = page.iter().map(|a| tool(a, format)).collect();
    Ok(axum::Json(
        json!({"format": name, "data": tools, "next_cursor": next_cursor}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvokeBody {
    #[serde(default = "crate::events::empty_data")]
    arguments: Value,
}

fn answer(row: &InvocationRow) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    let (status, body) = row.invoke_answer()?;
    Ok((
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        axum::Json(body),
    ))
}

async fn invoke_action(
    State(state): State<AppState>,
    AgentAuth(agent): AgentAuth,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(body): Json<InvokeBody>,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    let req = InvokeRequest {
        action: name,
        arguments: body.arguments,
        idempotency_key: idempotency_key(&headers)?,
        wait: None,
        repeat: Repeat::AsFirst,
    };
    let row = invoke(&state, &Caller::Agent(agent), req).await?;
    answer(&row)
}

/// Either an admin key (sees everything in its tenant) or an agent token (sees its own calls).
enum Viewer {
    Admin(AdminAuth),
    Agent(crate::agents::AgentPrincipal),
}

impl Viewer {
    fn tenant_id(&self) -> &str {
        match self {
            Viewer::Admin(a) => &a.tenant_id,
            Viewer::Agent(a) => &a.tenant_id,
        }
    }

    fn agent_id(&self) -> Option<&str> {
        match self {
            Viewer::Admin(_) => None,
            Viewer::Agent(a) => Some(&a.agent_id),
        }
    }
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        match bearer_token(parts) {
            Some(t) if t.starts_with(API_KEY_PREFIX) => {
                Ok(Viewer::Admin(AdminAuth::from_request_parts(parts, state).await?))
            }
            Some(t) => Ok(Viewer::Agent(authenticate(state, t).await?)),
            None => Err(ApiError::unauthorized(
                "unauthorized",
                "send an admin API key or an agent token",
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvocationFilter {
    status: Option<String>,
    action: Option<String>,
    agent_id: Option<String>,
    #[serde(default, deserialize_with = "crate::http::page::limit")]
    limit: Option<u32>,
    cursor: Option<String>,
}

/// Every status an invocation can be in.
const INVOCATION_STATUSES: [&str; 6] = [
    "pending_approval",
    "queued",
    "delivering",
    "succeeded",
    "failed",
    "denied",
];

async fn list_invocations(
    State(state): State<AppState>,
    viewer: Viewer,
    Query(filter): Query<InvocationFilter>,
) -> ApiResult<axum::Json<Page<Value>>> {
    let limit = crate::http::page::page_size(filter.limit);
    let mut sql = String::from("SELECT * FROM invocations WHERE tenant_id = $1 AND id < $2");
    let mut values: Vec<Arg> = args![
        viewer.tenant_id(),
        crate::http::page::newest_first_cursor(filter.cursor.as_deref(), "inv")?
    ];
    // An agent's own calls, and of those the filter's: another agent's filter finds none.
    for agent in [viewer.agent_id(), filter.agent_id.as_deref()]
        .into_iter()
        .flatten()
    {
        values.push(agent.into());
        sql.push_str(&format!(" AND agent_id = ${}", values.len()));
    }
    if let Some(status) = &filter.status {
        // A status no call can have would only ever answer an empty list.
        if !INVOCATION_STATUSES.contains(&status.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("status must be one of {}", INVOCATION_STATUSES.join(", ")),
            ));
        }
        values.push(status.into());
        sql.push_str(&format!(" AND status = ${}", values.len()));
    }
    if let Some(action) = &filter.action {
        values.push(action.into());
        sql.push_str(&format!(" AND action_name = ${}", values.len()));
    }
    values.push((limit + 1).into());
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", values.len()));
    let rows: Vec<InvocationRow> = state.db.fetch_all(sqlx::AssertSqlSafe(sql), values).await?;
    Ok(axum::Json(
        Page::from_rows(rows, limit, |r| r.id.clone()).map(|r| r.to_json()),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    wait: Option<String>,
}

async fn get_invocation(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<axum::Json<Value>> {
    let wait = match &q.wait {
        Some(w) => crate::config::parse_duration("wait", w)
            .map_err(|_| ApiError::bad_request("invalid_query", "wait must be a duration like 30s"))?
            .min(Duration::from_secs(60)),
        None => Duration::ZERO,
    };
    // Whose it is is checked before any wait: how long an answer takes must not tell an agent
    // about another agent's call.
    let row = load(&state, viewer.tenant_id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("invocation"))?;
    if viewer
        .agent_id()
        .is_some_and(|a| row.agent_id.as_deref() != Some(a))
    {
        return Err(ApiError::not_found("invocation"));
    }
    let row = if wait.is_zero() || row.is_terminal() {
        row
    } else {
        poll_until_settled(&state, viewer.tenant_id(), &id, wait).await?
    };
    Ok(axum::Json(row.to_json()))
}
