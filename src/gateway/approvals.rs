//! Approvals: invocations of actions declared `"approval": "always"` wait, unsent, until a person
//! with role owner, admin or approver decides. Approving creates the action request's delivery
//! (exactly as it would have been sent at invocation time) in the same transaction that records
//! the decision; denying settles the invocation as `denied`.

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::invocations::InvocationRow;
use super::invoke::derived_key;
use crate::db::{now_ms, rfc3339};
use crate::delivery::outbox::{self, Kind, NewDelivery};
use crate::http::{AdminAuth, ApiError, ApiResult, OptionalJsonBody, Page, Path, Permission, Query};
use crate::registry::store;
use crate::{AppState, args};

/// The approval routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/approvals", get(list_approvals))
        .route("/v1/approvals/{id}", get(get_approval))
        .route("/v1/approvals/{id}/approve", post(approve))
        .route("/v1/approvals/{id}/deny", post(deny))
}

#[derive(Debug, sqlx::FromRow)]
struct ApprovalRow {
    id: String,
    invocation_id: String,
    status: String,
    reason: Option<String>,
    decided_by: Option<String>,
    decided_by_name: Option<String>,
    comment: Option<String>,
    created_at: i64,
    decided_at: Option<i64>,
    /// The gateway-minted token the call was made with.
    token_id: Option<String>,
}

impl ApprovalRow {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "invocation_id": self.invocation_id,
            "status": self.status,
            "reason": self.reason,
            "decided_by": self.decided_by,
            "decided_by_name": self.decided_by_name,
            "comment": self.comment,
            "created_at": rfc3339(self.created_at),
            "decided_at": self.decided_at.map(rfc3339),
        })
    }
}

/// An approval, with the name of the API key that decided it (`decided_by` is `key:<id>`).
const SELECT: &str = "SELECT a.id, a.invocation_id, a.status, a.reason, a.decided_by, \
     k.name AS decided_by_name, a.comment, a.created_at, a.decided_at, a.token_id FROM approvals a \
     LEFT JOIN api_keys k ON k.tenant_id = a.tenant_id AND k.id = substr(a.decided_by, 5) \
     AND a.decided_by LIKE 'key:%'";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalFilter {
    status: Option<String>,
    #[serde(default, deserialize_with = "crate::http::page::limit")]
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn list_approvals(
    State(state): State<AppState>,
    auth: AdminAuth,
    Query(filter): Query<ApprovalFilter>,
) -> ApiResult<axum::Json<Page<Value>>> {
    let limit = crate::http::page::page_size(filter.limit);
    let cursor = crate::http::page::newest_first_cursor(filter.cursor.as_deref(), "apr")?;
    if let Some(status) = &filter.status
        && !matches!(status.as_str(), "pending" | "approved" | "denied")
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "status must be pending, approved or denied",
        ));
    }
    let rows: Vec<ApprovalRow> = match &filter.status {
        Some(status) => {
            state
                .db
                .fetch_all(
                    sqlx::AssertSqlSafe(format!(
                        "{SELECT} WHERE a.tenant_id = $1 AND a.status = $2 AND a.id < $3 \
                         ORDER BY a.id DESC LIMIT $4"
                    )),
                    args![&auth.tenant_id, status, cursor, limit + 1],
                )
                .await?
        }
        None => {
            state
                .db
                .fetch_all(
                    sqlx::AssertSqlSafe(format!(
                        "{SELECT} WHERE a.tenant_id = $1 AND a.id < $2 ORDER BY a.id DESC LIMIT $3"
                    )),
                    args![&auth.tenant_id, cursor, limit + 1],
                )
                .await?
        }
    };
    Ok(axum::Json(
        Page::from_rows(rows, limit, |r| r.id.clone()).map(|r| r.to_json()),
    ))
}

async fn load(state: &AppState, tenant_id: &str, id: &str) -> ApiResult<ApprovalRow> {
    state
        .db
        .fetch_optional(
            sqlx::AssertSqlSafe(format!("{SELECT} WHERE a.tenant_id = $1 AND a.id = $2")),
            args![tenant_id, id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("approval"))
}

async fn get_approval(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(load(&state, &auth.tenant_id, &id).await?.to_json()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Decision {
    comment: Option<String>,
}

/// Longest comment kept with a decision.
const MAX_COMMENT: usize = 2000;

/// A decision's comment, if any, within [`MAX_COMMENT`] characters.
fn checked_comment(body: Option<Decision>) -> ApiResult<Option<String>> {
    let comment = body.unwrap_or_default().comment;
    if comment.as_ref().is_some_and(|c| c.chars().count() > MAX_COMMENT) {
        return Err(ApiError::invalid_field(
            "/comment",
            format!("must be at most {MAX_COMMENT} characters"),
        ));
    }
    Ok(comment)
}

fn already_decided(row: &ApprovalRow) -> ApiError {
    ApiError::conflict(
        "already_decided",
        format!("this approval was already {}", row.status),
    )
}

/// The conflict for a decision that lost a race: says what the other decision was.
async fn decided_meanwhile(state: &AppState, tenant_id: &str, id: &str) -> ApiError {
    match load(state, tenant_id, id).await {
        Ok(row) => already_decided(&row),
        Err(e) => e,
    }
}

/// The `revoked_at` of the row `sql` reads for (tenant, id): `None` when there is no row.
async fn revocation(
    state: &AppState,
    sql: &'static str,
    (tenant_id, id): (&str, &str),
) -> ApiResult<Option<Option<i64>>> {
    let row: Option<(Option<i64>,)> = state.db.fetch_optional(sql, args![tenant_id, id]).await?;
    Ok(row.map(|(revoked_at,)| revoked_at))
}

async fn approve(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
    body: OptionalJsonBody,
) -> ApiResult<axum::Json<Value>> {
    auth.require(Permission::DecideApprovals)?;
    let body: Option<Decision> = body.parse()?;
    let comment = checked_comment(body)?;
    let approval = load(&state, &auth.tenant_id, &id).await?;
    if approval.status != "pending" {
        return Err(already_decided(&approval));
    }
    let invocation: InvocationRow = state
        .db
        .fetch_optional(
            "SELECT * FROM invocations WHERE tenant_id = $1 AND id = $2",
            args![&auth.tenant_id, &approval.invocation_id],
        )
        .await?
        .ok_or_else(|| ApiError::internal("approved invocation vanished"))?;
    // A call approved now runs now: not if its action was deleted or disabled while it waited.
    match store::get(&state.db, &auth.tenant_id, &invocation.action_name).await? {
        None => {
            return Err(ApiError::conflict(
                "action_unavailable",
                "the action was deleted after this call was made; deny the call",
            ));
        }
        Some(action) if !action.declaration.enabled => {
            return Err(ApiError::conflict(
                "action_unavailable",
                format!(
                    "the action {} is disabled; enable it to approve this call, or deny it",
                    action.declaration.name
                ),
            ));
        }
        // Deleted and declared again since: another action under the same name.
        Some(action) if action.created_at > invocation.created_at => {
            return Err(ApiError::conflict(
                "action_unavailable",
                "the action was deleted after this call was made (and declared again since); deny the call",
            ));
        }
        Some(_) => {}
    }
    // Nor if the agent that made it was revoked meanwhile.
    if let Some(agent_id) = &invocation.agent_id {
        let agent = revocation(
            &state,
            "SELECT revoked_at FROM agents WHERE tenant_id = $1 AND id = $2",
            (&auth.tenant_id, agent_id),
        )
        .await?;
        // No row: an external issuer's agent, which only its issuer can revoke.
        if agent.is_some_and(|revoked_at| revoked_at.is_some()) {
            return Err(ApiError::conflict(
                "agent_revoked",
                format!("the agent {agent_id} that made this call was revoked; deny the call"),
            ));
        }
        // Nor if the token it was made with was revoked (an expired one was valid when used).
        if let Some(token_id) = &approval.token_id {
            let token = revocation(
                &state,
                "SELECT revoked_at FROM agent_tokens WHERE tenant_id = $1 AND jti = $2",
                (&auth.tenant_id, token_id),
            )
            .await?;
            if token.is_none_or(|revoked_at| revoked_at.is_some()) {
                return Err(ApiError::conflict(
                    "token_revoked",
                    format!("the token {token_id} this call was made with was revoked; deny the call"),
                ));
            }
        }
        // Nor if the policy now denies its roles the action: deny wins, also after the call.
        let roles: Vec<String> = serde_json::from_str(&invocation.roles).unwrap_or_default();
        let subjects = crate::agents::tokens::policy_subjects(agent_id, &roles);
        let decision = state
            .policy
            .check(
                &state.db,
                None,
                (&auth.tenant_id, &subjects, &invocation.action_name),
            )
            .await?;
        if let crate::policy::Decision::Deny(message) = decision {
            return Err(ApiError::conflict(
                "role_denied",
                format!("the policy no longer allows this call ({message}); deny the call"),
            ));
        }
    }
    let version = invocation.action_version.unwrap_or(0);
    let declaration: Option<(String,)> = state
        .db
        .fetch_optional(
            "SELECT declaration FROM action_versions WHERE tenant_id = $1 AND name = $2 AND version = $3",
            args![&auth.tenant_id, &invocation.action_name, version],
        )
        .await?;
    let endpoint_id = declaration
        .and_then(|(d,)| serde_json::from_str::<Value>(&d).ok())
        .and_then(|d| d["endpoint_id"].as_str().map(str::to_string))
        .ok_or_else(|| ApiError::conflict("action_unavailable", "the action version has no endpoint"))?;
    // The call goes to the endpoint of the version it was made against: it must still be there.
    if !crate::delivery::endpoints::get(&state.db, &auth.tenant_id, &endpoint_id)
        .await?
        .is_some_and(|ep| ep.enabled)
    {
        return Err(ApiError::conflict(
            "action_unavailable",
            format!(
                "the endpoint {endpoint_id} this call would be sent to is deleted or disabled; enable it to approve the call, or deny it"
            ),
        ));
    }
    let now = now_ms();
    let agent = match &invocation.agent_id {
        Some(agent_id) => {
            json!({"id": agent_id, "roles": serde_json::from_str::<Value>(&invocation.roles).unwrap_or(json!([]))})
        }
        None => json!({"id": invocation.principal, "roles": []}),
    };
    let body = json!({
        "id": invocation.id,
        "type": "action.invoke",
        "action": {"name": invocation.action_name, "version": version},
        "arguments": serde_json::from_str::<Value>(&invocation.arguments).unwrap_or(Value::Null),
        "agent": agent,
        "requested_at": rfc3339(invocation.created_at),
    })
    .to_string();
    let lease = state.engine.lease();
    let mut tx = state.db.begin().await?;
    let decided = tx
        .execute(
            "UPDATE approvals SET status = 'approved', decided_by = $1, comment = $2, decided_at = $3 \
             WHERE tenant_id = $4 AND id = $5 AND status = 'pending'",
            args![auth.actor(), comment, now, &auth.tenant_id, &id],
        )
        .await?;
    if decided == 0 {
        drop(tx);
        return Err(decided_meanwhile(&state, &auth.tenant_id, &id).await);
    }
    let delivery = NewDelivery {
        tenant_id: auth.tenant_id.clone(),
        endpoint_id,
        kind: Kind::Action,
        event_id: None,
        invocation_id: Some(invocation.id.clone()),
        label: invocation.action_name.clone(),
        idempotency_key: Some(derived_key(
            &auth.tenant_id,
            &invocation.principal,
            invocation.idempotency_key.as_deref(),
            &invocation.id,
        )),
        body: body.into(),
    };
    let jobs = outbox::insert(&mut tx, vec![delivery], &lease, now).await?;
    tx.execute(
        "UPDATE invocations SET status = 'queued', delivery_id = $1, updated_at = $2 WHERE id = $3 AND status = 'pending_approval'",
        args![jobs.first().map(|j| j.id.clone()), now, &invocation.id],
    )
    .await?;
    tx.commit().await?;
    state.engine.dispatch(jobs).await;
    Ok(axum::Json(load(&state, &auth.tenant_id, &id).await?.to_json()))
}

async fn deny(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
    body: OptionalJsonBody,
) -> ApiResult<axum::Json<Value>> {
    auth.require(Permission::DecideApprovals)?;
    let body: Option<Decision> = body.parse()?;
    let comment = checked_comment(body)?;
    let approval = load(&state, &auth.tenant_id, &id).await?;
    let now = now_ms();
    let mut tx = state.db.begin().await?;
    let decided = tx
        .execute(
            "UPDATE approvals SET status = 'denied', decided_by = $1, comment = $2, decided_at = $3 \
             WHERE tenant_id = $4 AND id = $5 AND status = 'pending'",
            args![auth.actor(), comment.clone(), now, &auth.tenant_id, &id],
        )
        .await?;
    if decided == 0 {
        drop(tx);
        return Err(decided_meanwhile(&state, &auth.tenant_id, &id).await);
    }
    let error = json!({
        "code": "approval_denied",
        "message": format!("a person denied this call{}", comment.as_deref().map(|c| format!(": {c}")).unwrap_or_default()),
    });
    tx.execute(
        "UPDATE invocations SET status = 'denied', error = $1, updated_at = $2, completed_at = $2 \
         WHERE tenant_id = $3 AND id = $4 AND status = 'pending_approval'",
        args![error.to_string(), now, &auth.tenant_id, &approval.invocation_id],
    )
    .await?;
    tx.commit().await?;
    Ok(axum::Json(load(&state, &auth.tenant_id, &id).await?.to_json()))
}
