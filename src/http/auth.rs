//! Admin authentication: `Authorization: Bearer opsiq_sk_…` resolves to an [`AdminAuth`] (tenant,
//! key and role). Keys are looked up by their SHA-256, so the secret itself is never stored and
//! the comparison happens on a hash inside an index, not on the secret.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::{AppState, args, crypto};

/// The prefix every admin API key starts with.
pub const API_KEY_PREFIX: &str = "opsiq_sk_";

/// What an admin API key may do; ordered from most to least powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, including creating owner keys.
    Owner,
    /// Everything but owner keys.
    Admin,
    /// Reads, and ingests events.
    Developer,
    /// Reads, and decides approvals.
    Approver,
    /// Reads only.
    Viewer,
}

impl Role {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Developer => "developer",
            Role::Approver => "approver",
            Role::Viewer => "viewer",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            "developer" => Role::Developer,
            "approver" => Role::Approver,
            "viewer" => Role::Viewer,
            _ => return None,
        })
    }
}

/// What a request wants to do, checked against the key's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Any read of the admin API.
    Read,
    /// Changing configuration: actions, endpoints, rules, keys, agents, policy.
    Manage,
    /// Sending events in.
    IngestEvents,
    /// Approving or denying pending invocations.
    DecideApprovals,
}

impl Permission {
    fn allowed_for(self, role: Role) -> bool {
        use Role::*;
        match self {
            Permission::Read => true,
            Permission::Manage => matches!(role, Owner | Admin),
            Permission::IngestEvents => matches!(role, Owner | Admin | Developer),
            Permission::DecideApprovals => matches!(role, Owner | Admin | Approver),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Permission::Read => "any role",
            Permission::Manage => "role owner or admin",
            Permission::IngestEvents => "role owner, admin or developer",
            Permission::DecideApprovals => "role owner, admin or approver",
        }
    }
}

/// An authenticated admin API caller.
#[derive(Debug, Clone)]
pub struct AdminAuth {
    /// The tenant every query of this request is scoped to.
    pub tenant_id: String,
    /// The API key used, for audit.
    pub key_id: String,
    /// The key's role.
    pub role: Role,
}

impl AdminAuth {
    /// Fails with 403 unless the key's role grants `permission`.
    pub fn require(&self, permission: Permission) -> Result<(), ApiError> {
        if permission.allowed_for(self.role) {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "forbidden",
                format!(
                    "this needs {}; this API key has role {}",
                    permission.describe(),
                    self.role.as_str()
                ),
            ))
        }
    }

    /// The actor name written to audit records.
    pub fn actor(&self) -> String {
        format!("key:{}", self.key_id)
    }
}

/// The bearer token of a request, if it sends exactly one.
pub fn bearer_token(parts: &Parts) -> Option<&str> {
    sole_bearer_token(&parts.headers)
}

/// The bearer token in `headers`, if they hold exactly one `Authorization` header: with two, no
/// reader may pick a different one than another.
pub fn sole_bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer_token(parts).ok_or_else(|| {
            ApiError::unauthorized(
                "unauthorized",
                "send an admin API key as `Authorization: Bearer opsiq_sk_…`",
            )
        })?;
        if !token.starts_with(API_KEY_PREFIX) {
            return Err(ApiError::unauthorized(
                "invalid_api_key",
                "this route needs an admin API key (opsiq_sk_…), not an agent token",
            ));
        }
        let hash = crypto::sha256_hex(token.as_bytes());
        let row = state
            .api_keys
            .get_or_load(&hash, || async {
                state
                    .db
                    .fetch_optional::<(String, String, String)>(
                        "SELECT id, tenant_id, role FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
                        args![&hash],
                    )
                    .await
            })
            .await?;
        let (key_id, tenant_id, role) = row
            .as_ref()
            .clone()
            .ok_or_else(|| ApiError::unauthorized("invalid_api_key", "the API key is unknown or revoked"))?;
        let role = Role::parse(&role).ok_or_else(|| ApiError::internal("stored role is unknown"))?;
        let auth = AdminAuth {
            tenant_id,
            key_id,
            role,
        };
        if let Some(actor) = parts.extensions.get::<crate::audit::AuditActor>() {
            actor.set(&auth);
        }
        Ok(auth)
    }
}
