//! The agent gateway: what makes OpsIQ an AI gateway. An agent (JWT) may run only what an admin
//! declared, only with valid arguments, only within its token's scopes AND its roles, exactly
//! once per idempotency key; every decision is recorded as an invocation.
//!
//! - [`invoke`]: the one invocation path (HTTP, MCP and rules all use it).
//! - [`invocations`]: invocation records, their views, and settling them from delivery outcomes.
//! - [`tools`]: the tool list in OpenAI, Anthropic and MCP formats.

pub mod approvals;
pub mod invocations;
pub mod invoke;
mod routes;
pub mod tools;

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::AppState;
use crate::agents::tokens::{self, AgentPrincipal, JwksCache, TenantKeys, TokenStates};
use crate::http::ApiError;
use crate::http::auth::bearer_token;
use crate::rate::{KeyedBuckets, Limit, SharedBuckets};
use crate::registry::validators::Validators;

/// The gateway's routes: agent-facing calls, invocation records and approvals.
pub fn routes() -> axum::Router<AppState> {
    routes::routes().merge(approvals::routes())
}

/// Gateway state shared by every request.
pub struct Gateway {
    /// Decrypted per-tenant token keys.
    pub tenant_keys: TenantKeys,
    /// Gateway tokens' revocation state, where this process is the only writer.
    pub token_states: TokenStates,
    /// Fetched JWKS documents of external issuers.
    pub jwks: JwksCache,
    /// Compiled schemas.
    pub validators: Arc<Validators>,
    /// Current action declarations by (tenant, name); cleared on every registry change here and,
    /// on PostgreSQL, on another replica's (`changes`); kept at most `cache_ttl`.
    pub actions: crate::cache::TtlCache<(String, String), Option<crate::registry::Action>>,
    agent_limiter: KeyedBuckets,
    action_limiter: KeyedBuckets,
}

impl Gateway {
    /// Builds the gateway state with per-agent and per-action limits (calls per second);
    /// `shared_rates` holds their buckets when replicas share them (else they are in memory);
    /// `sole_server` says whether this process alone serves its database (a locked SQLite file).
    pub fn new(
        validators: Arc<Validators>,
        (agent_per_s, action_per_s): (u32, u32),
        shared_rates: Option<Arc<SharedBuckets>>,
        sole_server: bool,
        cache_ttl: std::time::Duration,
    ) -> Self {
        let buckets = |n: u32| {
            let limit = Limit::per_second(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
            KeyedBuckets::new(limit, shared_rates.clone())
        };
        Self {
            tenant_keys: TenantKeys::default(),
            token_states: TokenStates::new(sole_server),
            jwks: JwksCache::default(),
            validators,
            actions: crate::cache::TtlCache::new(cache_ttl),
            agent_limiter: buckets(agent_per_s),
            action_limiter: buckets(action_per_s),
        }
    }

    /// Runs `change` (a write to agents, tokens or policy rows) to its end even if the request
    /// that asked for it goes away, then forgets the cached token states: a change committed
    /// while the cache kept its old state would leave a revoked token working.
    pub async fn change_token_state<T: Send + 'static>(
        self: &Arc<Self>,
        change: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let gateway = self.clone();
        // The change keeps its audit row: it commits with the change.
        tokio::spawn(crate::audit::carry(async move {
            let out = change.await;
            gateway.token_states.clear();
            out
        }))
        .await
        .map_err(ApiError::internal)
    }

    /// The action `name` of `tenant_id` as declared now (`None`: no such action), from the cache.
    pub async fn action(
        &self,
        db: &crate::db::Database,
        tenant_id: &str,
        name: &str,
    ) -> Result<Arc<Option<crate::registry::Action>>, crate::db::DbError> {
        self.actions
            .get_or_load(&(tenant_id.to_string(), name.to_string()), || {
                crate::registry::store::get(db, tenant_id, name)
            })
            .await
    }

    /// Takes one token from the agent's bucket, or says how long to wait.
    pub async fn rate_limit_agent(&self, tenant_id: &str, agent: &str) -> Result<(), ApiError> {
        self.agent_limiter
            .take(&format!("agent/{tenant_id}/{agent}"))
            .await
            .map_err(|refusal| ApiError::rate_refusal(refusal, "agent"))
    }

    /// Takes one token from the action's bucket, or says how long to wait. Called once the
    /// action is known to exist, so only real actions get buckets.
    pub async fn rate_limit_action(&self, tenant_id: &str, action: &str) -> Result<(), ApiError> {
        self.action_limiter
            .take(&format!("action/{tenant_id}/{action}"))
            .await
            .map_err(|refusal| ApiError::rate_refusal(refusal, "action"))
    }
}

/// An authenticated agent (from `Authorization: Bearer <JWT>`).
#[derive(Debug, Clone)]
pub struct AgentAuth(pub AgentPrincipal);

impl FromRequestParts<AppState> for AgentAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer_token(parts).ok_or_else(|| {
            ApiError::unauthorized(
                "unauthorized",
                "send an agent token as `Authorization: Bearer <JWT>`",
            )
        })?;
        authenticate(state, token).await.map(AgentAuth)
    }
}

/// Authenticates an agent token against this gateway's state.
pub async fn authenticate(state: &AppState, token: &str) -> Result<AgentPrincipal, ApiError> {
    tokens::authenticate(
        &state.db,
        &state.keys,
        &state.gateway.tenant_keys,
        &state.gateway.token_states,
        &state.gateway.jwks,
        state.engine.outbound(),
        token,
    )
    .await
}

/// Whether one of `scopes` (`invoke:<glob>`) covers `action`.
pub fn scope_allows(scopes: &[String], action: &str) -> bool {
    scopes
        .iter()
        .filter_map(|s| s.strip_prefix("invoke:"))
        .any(|glob| crate::glob::matches(glob, action))
}

#[cfg(test)]
mod tests {
    #[test]
    fn scopes_are_globs_over_action_names() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(super::scope_allows(&s(&["invoke:*"]), "refund_invoice"));
        assert!(super::scope_allows(&s(&["invoke:refund_*"]), "refund_invoice"));
        assert!(!super::scope_allows(&s(&["invoke:refund_*"]), "create_ticket"));
        assert!(super::scope_allows(
            &s(&["read:x", "invoke:create_ticket"]),
            "create_ticket"
        ));
        assert!(!super::scope_allows(&s(&["create_ticket"]), "create_ticket"));
    }
}
