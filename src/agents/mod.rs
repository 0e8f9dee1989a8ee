//! Agents and their tokens: the AI clients that invoke actions. An agent has roles (checked by
//! the policy engine); each token it is given carries scopes (`invoke:<glob>`) and a TTL. Tenants
//! may also trust an external token issuer.

pub mod tokens;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::changes::Change;
use crate::db::{now_ms, rfc3339};
use crate::http::{AdminAuth, ApiError, ApiResult, JsonBody, Page, PageQuery, Path, Permission, Query};
use crate::{AppState, args, ids};

pub use tokens::AgentPrincipal;

/// The agent routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/agents", get(list_agents).post(create_agent))
        .route("/v1/agents/{id}", get(get_agent).delete(revoke_agent))
        .route("/v1/agents/{id}/tokens", get(list_tokens).post(create_token))
        .route("/v1/agents/{id}/tokens/{jti}", delete(revoke_token))
        .route(
            "/v1/token-issuer",
            get(get_issuer).put(put_issuer).delete(delete_issuer),
        )
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct AgentRow {
    id: String,
    name: String,
    roles: String,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl AgentRow {
    fn roles(&self) -> Vec<String> {
        serde_json::from_str(&self.roles).unwrap_or_default()
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "roles": self.roles(),
            "created_at": rfc3339(self.created_at),
            "revoked": self.revoked_at.is_some(),
        })
    }
}

/// A token as listed: what it allows and until when, never the token itself.
#[derive(Debug, Clone, sqlx::FromRow)]
struct TokenRow {
    jti: String,
    scopes: String,
    created_at: i64,
    expires_at: i64,
    revoked_at: Option<i64>,
}

impl TokenRow {
    /// The token as listed; revoking its agent revoked it too (`agent_revoked_at`).
    fn to_json(&self, now: i64, agent_revoked_at: Option<i64>) -> Value {
        // Whichever came first: revoking a token of a revoked agent does not move its time.
        let revoked_at = match (self.revoked_at, agent_revoked_at) {
            (Some(token), Some(agent)) => Some(token.min(agent)),
            (token, agent) => token.or(agent),
        };
        let status = match revoked_at {
            Some(_) => "revoked",
            None if self.expires_at <= now => "expired",
            None => "active",
        };
        json!({
            "jti": self.jti,
            "scopes": serde_json::from_str::<Value>(&self.scopes).unwrap_or_else(|_| json!([])),
            "status": status,
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "revoked_at": revoked_at.map(rfc3339),
        })
    }
}

fn check_word(path: &str, value: &str, what: &str) -> ApiResult<()> {
    let ok = (1..=64).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            path,
            format!("{what} must be 1 to 64 characters from A-Z, a-z, 0-9, `_`, `-`, `.`"),
        ))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAgent {
    id: Option<String>,
    name: String,
    #[serde(default)]
    roles: Vec<String>,
}

async fn create_agent(
    State(state): State<AppState>,
    auth: AdminAuth,
    body: JsonBody,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    auth.require(Permission::Manage)?;
    let body: CreateAgent = body.parse()?;
    let id = body.id.clone().unwrap_or_else(|| ids::new_id("agt"));
    check_word("/id", &id, "an agent id")?;
    crate::audit::note("created", id.clone());
    if body.name.trim().is_empty() || body.name.chars().count() > 200 {
        return Err(ApiError::invalid_field("/name", "must be 1 to 200 characters"));
    }
    if body.roles.len() > 32 {
        return Err(ApiError::invalid_field("/roles", "at most 32 roles"));
    }
    for (i, r) in body.roles.iter().enumerate() {
        check_word(&format!("/roles/{i}"), r, "a role")?;
    }
    let row = AgentRow {
        id,
        name: body.name.trim().to_string(),
        roles: serde_json::to_string(&body.roles).map_err(ApiError::internal)?,
        created_at: now_ms(),
        revoked_at: None,
    };
    let inserted = state
        .db
        .execute(
            "INSERT INTO agents (tenant_id, id, name, roles, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tenant_id, id) DO NOTHING",
            args![&auth.tenant_id, &row.id, &row.name, &row.roles, row.created_at],
        )
        .await?;
    if inserted == 0 {
        return Err(ApiError::conflict(
            "already_exists",
            "an agent with this id already exists",
        ));
    }
    Ok((StatusCode::CREATED, axum::Json(row.to_json())))
}

async fn load_agent(state: &AppState, tenant_id: &str, id: &str) -> ApiResult<AgentRow> {
    state
        .db
        .fetch_optional(
            "SELECT id, name, roles, created_at, revoked_at FROM agents WHERE tenant_id = $1 AND id = $2",
            args![tenant_id, id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("agent"))
}

async fn list_agents(
    State(state): State<AppState>,
    auth: AdminAuth,
    Query(page): Query<PageQuery>,
) -> ApiResult<axum::Json<Page<Value>>> {
    let limit = page.limit();
    let rows: Vec<AgentRow> = state
        .db
        .fetch_all(
            "SELECT id, name, roles, created_at, revoked_at FROM agents WHERE tenant_id = $1 AND id > $2 \
             ORDER BY id LIMIT $3",
            args![
                &auth.tenant_id,
                page.cursor.clone().unwrap_or_default(),
                limit + 1
            ],
        )
        .await?;
    Ok(axum::Json(
        Page::from_rows(rows, limit, |r| r.id.clone()).map(|r| r.to_json()),
    ))
}

async fn get_agent(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(
        load_agent(&state, &auth.tenant_id, &id).await?.to_json(),
    ))
}

async fn revoke_agent(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    auth.require(Permission::Manage)?;
    let db = state.db.clone();
    let (tenant_id, agent_id) = (auth.tenant_id.clone(), id.clone());
    let revoke = async move {
        db.execute(
            "UPDATE agents SET revoked_at = $1 WHERE tenant_id = $2 AND id = $3 AND revoked_at IS NULL",
            args![now_ms(), &tenant_id, &agent_id],
        )
        .await
    };
    let n = state.gateway.change_token_state(revoke).await??;
    if n == 0 {
        // Revoking again is done already (DELETE is idempotent); only a missing agent is a 404.
        load_agent(&state, &auth.tenant_id, &id).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    scopes: Vec<String>,
    ttl_seconds: Option<u64>,
}

/// Checks a scope: `invoke:<glob>` where the glob uses action-name characters and `*`/`?`.
pub fn check_scope(scope: &str) -> Result<(), String> {
    let Some(glob) = scope.strip_prefix("invoke:") else {
        return Err(format!(
            "`{scope}` is not a scope like invoke:* or invoke:refund_*"
        ));
    };
    let ok = (1..=128).contains(&glob.len())
        && glob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'*' | b'?'));
    if ok {
        Ok(())
    } else {
        Err(format!("`{scope}` has an invalid action glob"))
    }
}

async fn create_token(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
    body: JsonBody,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    auth.require(Permission::Manage)?;
    let body: CreateToken = body.parse()?;
    let agent = load_agent(&state, &auth.tenant_id, &id).await?;
    if agent.revoked_at.is_some() {
        return Err(ApiError::conflict("agent_revoked", "the agent is revoked"));
    }
    if body.scopes.is_empty() || body.scopes.len() > 64 {
        return Err(ApiError::invalid_field(
            "/scopes",
            "give 1 to 64 scopes such as invoke:refund_*",
        ));
    }
    for (i, s) in body.scopes.iter().enumerate() {
        check_scope(s).map_err(|m| ApiError::invalid_field(&format!("/scopes/{i}"), m))?;
    }
    let ttl = body.ttl_seconds.unwrap_or(3600);
    if !(1..=30 * 24 * 3600).contains(&ttl) {
        return Err(ApiError::invalid_field(
            "/ttl_seconds",
            "must be between 1 and 2592000 (30 days)",
        ));
    }
    let (token, jti, exp) = tokens::mint(
        &state.db,
        &state.keys,
        &state.gateway.tenant_keys,
        &auth.tenant_id,
        &agent.id,
        &agent.roles(),
        &body.scopes,
        ttl,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(
            json!({"token": token, "jti": jti, "expires_at": rfc3339(exp as i64 * 1000), "scopes": body.scopes}),
        ),
    ))
}

/// An agent's tokens, newest first; revoking one needs its `jti`, and the token itself was
/// shown only when it was minted.
async fn list_tokens(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
    Query(page): Query<PageQuery>,
) -> ApiResult<axum::Json<Page<Value>>> {
    let agent = load_agent(&state, &auth.tenant_id, &id).await?;
    let limit = page.limit();
    let rows: Vec<TokenRow> = state
        .db
        .fetch_all(
            "SELECT jti, scopes, created_at, expires_at, revoked_at FROM agent_tokens \
             WHERE tenant_id = $1 AND agent_id = $2 AND jti < $3 ORDER BY jti DESC LIMIT $4",
            args![
                &auth.tenant_id,
                &id,
                crate::http::page::newest_first_cursor(page.cursor.as_deref(), "jti")?,
                limit + 1
            ],
        )
        .await?;
    let now = now_ms();
    Ok(axum::Json(
        Page::from_rows(rows, limit, |r| r.jti.clone()).map(|r| r.to_json(now, agent.revoked_at)),
    ))
}

async fn revoke_token(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path((id, jti)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    auth.require(Permission::Manage)?;
    let db = state.db.clone();
    let (tenant_id, agent_id, token_id) = (auth.tenant_id.clone(), id.clone(), jti.clone());
    let revoke = async move {
        db.execute(
            "UPDATE agent_tokens SET revoked_at = $1 WHERE tenant_id = $2 AND agent_id = $3 AND jti = $4 \
             AND revoked_at IS NULL",
            args![now_ms(), &tenant_id, &agent_id, &token_id],
        )
        .await
    };
    let n = state.gateway.change_token_state(revoke).await??;
    if n == 0 {
        // Revoking again is done already (DELETE is idempotent); only a missing token is a 404.
        let known: Option<(String,)> = state
            .db
            .fetch_optional(
                "SELECT jti FROM agent_tokens WHERE tenant_id = $1 AND agent_id = $2 AND jti = $3",
                args![&auth.tenant_id, &id, &jti],
            )
            .await?;
        known.ok_or_else(|| ApiError::not_found("token"))?;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn get_issuer(State(state): State<AppState>, auth: AdminAuth) -> ApiResult<axum::Json<Value>> {
    let row: Option<(String,)> = state
        .db
        .fetch_optional(
            "SELECT config FROM token_issuers WHERE tenant_id = $1",
            args![&auth.tenant_id],
        )
        .await?;
    let (config,) = row.ok_or_else(|| ApiError::not_found("token issuer"))?;
    Ok(axum::Json(
        serde_json::from_str(&config).map_err(ApiError::internal)?,
    ))
}

async fn put_issuer(
    State(state): State<AppState>,
    auth: AdminAuth,
    config: JsonBody,
) -> ApiResult<axum::Json<Value>> {
    auth.require(Permission::Manage)?;
    let config: tokens::IssuerConfig = config.parse()?;
    config.check().map_err(|m| ApiError::invalid_field("/", m))?;
    if let Some(url) = &config.jwks_url {
        let parsed =
            reqwest::Url::parse(url).map_err(|_| ApiError::invalid_field("/jwks_url", "is not a URL"))?;
        crate::delivery::outbound::check_url(&parsed, state.config.dev)
            .map_err(|m| ApiError::invalid_field("/jwks_url", m))?;
    }
    let taken: Option<(String,)> = state
        .db
        .fetch_optional(
            "SELECT tenant_id FROM token_issuers WHERE issuer = $1 AND audience = $2 AND tenant_id <> $3",
            args![&config.issuer, &config.audience, &auth.tenant_id],
        )
        .await?;
    let in_use = || {
        ApiError::conflict(
            "audience_in_use",
            "this issuer and audience pair cannot be used; give this workspace an audience of its own",
        )
    };
    if taken.is_some() {
        return Err(in_use());
    }
    let text = serde_json::to_string(&config).map_err(ApiError::internal)?;
    let stored = state
        .db
        .execute(
            "INSERT INTO token_issuers (tenant_id, issuer, audience, config, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tenant_id) DO UPDATE SET issuer = $2, audience = $3, config = $4, updated_at = $5",
            args![&auth.tenant_id, &config.issuer, &config.audience, text, now_ms()],
        )
        .await
        .map_err(crate::db::DbError::from);
    match stored {
        // Another workspace claimed the pair between the check above and this write.
        Err(e) if e.is_unique_violation() => return Err(in_use()),
        other => other?,
    };
    state.changed(Change::TokenIssuer(auth.tenant_id.clone())).await;
    Ok(axum::Json(
        serde_json::to_value(&config).map_err(ApiError::internal)?,
    ))
}

async fn delete_issuer(State(state): State<AppState>, auth: AdminAuth) -> ApiResult<StatusCode> {
    auth.require(Permission::Manage)?;
    let n = state
        .db
        .execute(
            "DELETE FROM token_issuers WHERE tenant_id = $1",
            args![&auth.tenant_id],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("token issuer"));
    }
    state.changed(Change::TokenIssuer(auth.tenant_id.clone())).await;
    Ok(StatusCode::NO_CONTENT)
}
