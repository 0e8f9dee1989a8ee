//! Agent tokens. Gateway-minted tokens are HS256 JWTs signed with the tenant's own key (stored
//! encrypted) with `iss` and `aud` "opsiq"; each has a `jti` row so revoking a token or its agent
//! takes effect on the next request. Tenants may also trust one external issuer (RS/ES/EdDSA keys
//! from a JWKS or a PEM), whose roles claim is mapped.
//!
//! Every failure is a 401 `invalid_token` with a reason, never a hint about other tenants.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use jsonwebtoken::jwk::PublicKeyUse;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, decode_header, encode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::crypto::MasterKey;
use crate::db::{Database, now_ms};
use crate::http::ApiError;
use crate::http::auth::API_KEY_PREFIX;
use crate::{args, ids};

/// `iss` and `aud` of gateway-minted tokens.
pub const GATEWAY_ISSUER: &str = "opsiq";

/// Claims of a gateway-minted token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Agent id.
    pub sub: String,
    /// Tenant id.
    pub tid: String,
    /// The agent's roles when minted (informational; current roles are read at use).
    pub roles: Vec<String>,
    /// Space-separated scopes, e.g. `invoke:refund_*`.
    pub scope: String,
    /// Expiry (unix seconds).
    pub exp: u64,
    /// Issued at (unix seconds).
    pub iat: u64,
    /// Not before (unix seconds).
    pub nbf: u64,
    /// Token id.
    pub jti: String,
    /// Audience.
    pub aud: String,
    /// Issuer.
    pub iss: String,
}

/// Who is calling the agent API.
#[derive(Debug, Clone)]
pub struct AgentPrincipal {
    /// The tenant everything is scoped to.
    pub tenant_id: String,
    /// The agent (`sub`).
    pub agent_id: String,
    /// Roles checked by the policy engine.
    pub roles: Vec<String>,
    /// `invoke:<glob>` scopes.
    pub scopes: Vec<String>,
    /// Token id (gateway-minted tokens).
    pub jti: Option<String>,
    /// The tenant's policy version, read together with the token's revocation state (saving
    /// the policy check a read of its own); `None` when it was not read.
    pub policy_version: Option<i64>,
}

impl AgentPrincipal {
    /// The principal string used for idempotency scope and records: `agent:<id>`.
    pub fn principal(&self) -> String {
        format!("agent:{}", self.agent_id)
    }

    /// The policy subjects of this caller: the agent itself and each of its roles.
    pub fn subjects(&self) -> Vec<String> {
        policy_subjects(&self.agent_id, &self.roles)
    }
}

/// The policy subjects of an agent with `roles`: the agent itself and each role.
pub fn policy_subjects(agent_id: &str, roles: &[String]) -> Vec<String> {
    std::iter::once(format!("agent:{agent_id}"))
        .chain(roles.iter().map(|r| format!("role:{r}")))
        .collect()
}

fn invalid(reason: &str) -> ApiError {
    ApiError::unauthorized("invalid_token", format!("the agent token is not valid: {reason}"))
}

/// Caches decrypted per-tenant signing keys (they never change).
#[derive(Default)]
pub struct TenantKeys {
    keys: Mutex<HashMap<String, Arc<Vec<u8>>>>,
}

impl TenantKeys {
    async fn get(
        &self,
        db: &Database,
        master: &MasterKey,
        tenant_id: &str,
    ) -> Result<Option<Arc<Vec<u8>>>, ApiError> {
        if let Some(k) = self.keys.lock().unwrap_or_else(|e| e.into_inner()).get(tenant_id) {
            return Ok(Some(k.clone()));
        }
        let row: Option<(String,)> = db
            .fetch_optional("SELECT jwt_key_enc FROM tenants WHERE id = $1", args![tenant_id])
            .await?;
        let Some((sealed,)) = row else { return Ok(None) };
        let key = Arc::new(master.open(&sealed)?.into_bytes());
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tenant_id.to_string(), key.clone());
        Ok(Some(key))
    }
}

/// Mints a token for an agent; returns (token, jti, expiry in unix seconds).
#[allow(clippy::too_many_arguments)]
pub async fn mint(
    db: &Database,
    master: &MasterKey,
    keys: &TenantKeys,
    tenant_id: &str,
    agent_id: &str,
    roles: &[String],
    scopes: &[String],
    ttl_seconds: u64,
) -> Result<(String, String, u64), ApiError> {
    let key = keys
        .get(db, master, tenant_id)
        .await?
        .ok_or_else(|| ApiError::internal("tenant key missing"))?;
    let now = (now_ms() / 1000) as u64;
    let claims = Claims {
        sub: agent_id.to_string(),
        tid: tenant_id.to_string(),
        roles: roles.to_vec(),
        scope: scopes.join(" "),
        exp: now + ttl_seconds,
        iat: now,
        nbf: now,
        jti: ids::new_id("jti"),
        aud: GATEWAY_ISSUER.into(),
        iss: GATEWAY_ISSUER.into(),
    };
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&key),
    )
    .map_err(ApiError::internal)?;
    crate::audit::note("created", claims.jti.clone());
    crate::audit::note("scopes", scopes.to_vec());
    db.execute(
        "INSERT INTO agent_tokens (jti, tenant_id, agent_id, scopes, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        args![&claims.jti, tenant_id, agent_id, serde_json::to_string(scopes).unwrap_or_default(), now_ms(),
            (claims.exp * 1000) as i64],
    )
    .await?;
    Ok((token, claims.jti, claims.exp))
}

/// An external issuer a tenant trusts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `aud`.
    pub audience: String,
    /// A JWKS document (the content of a JWKS file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<Value>,
    /// Where to fetch the JWKS (cached for five minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// A PEM public key (RSA, EC or Ed25519).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_pem: Option<String>,
    /// Claim holding the roles (an array or a space-separated string).
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
}

fn default_roles_claim() -> String {
    "roles".into()
}

impl IssuerConfig {
    /// Checks the configuration can verify anything at all.
    pub fn check(&self) -> Result<(), String> {
        if self.issuer.is_empty() || self.issuer == GATEWAY_ISSUER {
            return Err("issuer must be set and must not be \"opsiq\"".into());
        }
        if self.audience.is_empty() {
            return Err("audience must be set".into());
        }
        let sources = [
            self.jwks.is_some(),
            self.jwks_url.is_some(),
            self.public_key_pem.is_some(),
        ];
        if sources.iter().filter(|given| **given).count() > 1 {
            return Err("give one of jwks, jwks_url or public_key_pem, not several".into());
        }
        match (&self.jwks, &self.jwks_url, &self.public_key_pem) {
            (None, None, None) => Err("give jwks, jwks_url or public_key_pem".into()),
            (Some(jwks), _, _) => {
                // Only public keys: private members (`d`, a symmetric `k`…) would be stored and
                // shown to anyone who reads the configuration.
                let private = ["d", "p", "q", "dp", "dq", "qi", "k", "oth"];
                let keys = jwks.get("keys").and_then(Value::as_array).into_iter().flatten();
                if keys
                    .into_iter()
                    .any(|key| private.iter().any(|m| key.get(m).is_some()))
                {
                    return Err("jwks must hold public keys only (no d, k or other private members)".into());
                }
                let set = serde_json::from_value::<jsonwebtoken::jwk::JwkSet>(jwks.clone())
                    .map_err(|e| format!("jwks is not a JWKS document: {e}"))?;
                if !set.keys.iter().any(verifies_signatures) {
                    return Err("jwks holds no key that can verify signatures".into());
                }
                Ok(())
            }
            (_, _, Some(pem)) => pem_keys(pem).map(|_| ()),
            _ => Ok(()),
        }
    }
}

/// Whether a published key may verify signatures: not one marked for encryption (`use`), nor
/// one whose `key_ops` leave verifying out.
fn verifies_signatures(key: &jsonwebtoken::jwk::Jwk) -> bool {
    key.common.public_key_use != Some(PublicKeyUse::Encryption)
        && (key.common.key_operations.as_ref())
            .is_none_or(|ops| ops.contains(&jsonwebtoken::jwk::KeyOperations::Verify))
        // An encryption algorithm (`RSA-OAEP`) names no signature a token could carry.
        && (key.common.key_algorithm)
            .is_none_or(|alg| alg.to_string().parse::<Algorithm>().is_ok())
        && DecodingKey::from_jwk(key).is_ok()
}

fn pem_keys(pem: &str) -> Result<Vec<DecodingKey>, String> {
    let b = pem.as_bytes();
    let keys: Vec<DecodingKey> = [
        DecodingKey::from_rsa_pem(b),
        DecodingKey::from_ec_pem(b),
        DecodingKey::from_ed_pem(b),
    ]
    .into_iter()
    .filter_map(Result::ok)
    .collect();
    if keys.is_empty() {
        Err("public_key_pem is not an RSA, EC or Ed25519 public key".into())
    } else {
        Ok(keys)
    }
}

/// Fetched JWKS documents by URL, kept five minutes.
#[derive(Default)]
pub struct JwksCache {
    docs: Mutex<HashMap<String, (std::time::Instant, jsonwebtoken::jwk::JwkSet)>>,
}

impl JwksCache {
    /// Forgets every fetched document (a tenant changed or removed its issuer: a key it no
    /// longer trusts must not keep verifying until the document would have expired).
    pub fn clear(&self) {
        self.docs.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Whether the token's header has a `crit` member at all (`"crit": null` reads as absent).
fn header_names_crit(token: &str) -> bool {
    use base64::Engine;
    let Some(encoded) = token.split('.').next() else {
        return false;
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Map<String, Value>>(&bytes).ok())
        .is_some_and(|header| header.contains_key("crit"))
}

/// Authenticates an agent token (gateway-minted or from the tenant's external issuer).
pub async fn authenticate(
    db: &Database,
    master: &MasterKey,
    keys: &TenantKeys,
    states: &TokenStates,
    jwks_cache: &JwksCache,
    outbound: &crate::delivery::outbound::Outbound,
    token: &str,
) -> Result<AgentPrincipal, ApiError> {
    if token.starts_with(API_KEY_PREFIX) {
        return Err(ApiError::unauthorized(
            "invalid_token",
            "this route needs an agent token (a JWT from POST /v1/agents/{id}/tokens), not an admin API key",
        ));
    }
    let header = decode_header(token).map_err(|_| invalid("malformed header or unsupported algorithm"))?;
    // RFC 7515 §4.1.11: a token whose critical extensions are not understood must be refused,
    // and this gateway understands none.
    if header.crit.is_some() || header_names_crit(token) {
        return Err(invalid(
            "the token names critical header extensions (crit), which are not supported",
        ));
    }
    let unverified = jsonwebtoken::dangerous::insecure_decode::<Value>(token)
        .map_err(|_| invalid("malformed token"))?
        .claims;
    let issuer = unverified.get("iss").and_then(Value::as_str).unwrap_or_default();
    if issuer == GATEWAY_ISSUER {
        verify_gateway_token(db, master, keys, states, token, header.alg, &unverified).await
    } else {
        let audiences: Vec<&str> = match unverified.get("aud") {
            Some(Value::String(a)) => vec![a.as_str()],
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let subject = unverified.get("sub").and_then(Value::as_str).unwrap_or_default();
        verify_external_token(
            db,
            jwks_cache,
            outbound,
            token,
            &header,
            (issuer, &audiences, subject),
        )
        .await
    }
}

async fn verify_gateway_token(
    db: &Database,
    master: &MasterKey,
    keys: &TenantKeys,
    states: &TokenStates,
    token: &str,
    alg: Algorithm,
    unverified: &Value,
) -> Result<AgentPrincipal, ApiError> {
    if alg != Algorithm::HS256 {
        return Err(invalid("unexpected algorithm"));
    }
    let tenant_id = unverified.get("tid").and_then(Value::as_str).unwrap_or_default();
    let key = keys
        .get(db, master, tenant_id)
        .await?
        .ok_or_else(|| invalid("signature does not match"))?;
    let claims = decode_gateway_token(token, &key)?;
    match states
        .read_through(&claims, read_token_state(db, &claims))
        .await?
    {
        Some(TokenState {
            token_revoked_at: None,
            agent_revoked_at: None,
            roles,
            scopes,
            policy_version,
        }) => Ok(AgentPrincipal {
            tenant_id: claims.tid,
            agent_id: claims.sub,
            roles: serde_json::from_str(&roles).unwrap_or_default(),
            scopes: serde_json::from_str(&scopes).unwrap_or_default(),
            jti: Some(claims.jti),
            policy_version: Some(policy_version.unwrap_or(0)),
        }),
        Some(_) => Err(invalid("the token or its agent was revoked")),
        None => Err(invalid("unknown token")),
    }
}

/// Reads a token's revocation state, its agent's roles and the policy version, in one query.
async fn read_token_state(db: &Database, claims: &Claims) -> Result<Option<TokenState>, sqlx::Error> {
    db.fetch_optional(
        "SELECT t.revoked_at AS token_revoked_at, a.revoked_at AS agent_revoked_at, a.roles, t.scopes, \
         (SELECT version FROM change_counters WHERE name = 'policy:' || t.tenant_id) AS policy_version FROM agent_tokens t \
         JOIN agents a ON a.tenant_id = t.tenant_id AND a.id = t.agent_id \
         WHERE t.jti = $1 AND t.tenant_id = $2 AND t.agent_id = $3",
        args![&claims.jti, &claims.tid, &claims.sub],
    )
    .await
}

/// What the database says about a token when it is used.
#[derive(Clone, sqlx::FromRow)]
struct TokenState {
    token_revoked_at: Option<i64>,
    agent_revoked_at: Option<i64>,
    roles: String,
    scopes: String,
    policy_version: Option<i64>,
}

/// Gateway tokens' database state (revocations, roles, scopes, policy version), kept in memory
/// only where this process alone serves the database (a locked SQLite file): every change to
/// that state (revoking an agent or a token, replacing policy rows) runs through
/// `Gateway::change_token_state`, which clears it once the change has run, even if the request
/// went away, and a call skips a read. With replicas (PostgreSQL) it stays off and every call
/// reads.
pub struct TokenStates {
    enabled: bool,
    /// Bumped by every clear; a state read under an older generation is not kept.
    generation: AtomicU64,
    /// By `jti`: the generation it was read under, and the state.
    entries: Mutex<HashMap<String, (u64, CachedToken)>>,
}

/// A token's cached state and whose it is.
#[derive(Clone)]
struct CachedToken {
    tenant_id: String,
    agent_id: String,
    state: TokenState,
}

/// Tokens kept at most; past it the cache starts over (tokens are reread at their next use).
const MAX_CACHED_TOKENS: usize = 10_000;

impl TokenStates {
    /// A cache that keeps states only if `enabled`.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            generation: AtomicU64::new(0),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Forgets every state: call after committing anything that changes one.
    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
    }

    /// `claims`' token's state: cached if it was read since the last clear, else `read` (kept
    /// unless a clear came while it ran).
    async fn read_through(
        &self,
        claims: &Claims,
        read: impl std::future::Future<Output = Result<Option<TokenState>, sqlx::Error>>,
    ) -> Result<Option<TokenState>, sqlx::Error> {
        if !self.enabled {
            return read.await;
        }
        let read_under = self.generation.load(Ordering::SeqCst);
        if let Ok(entries) = self.entries.lock()
            && let Some((generation, cached)) = entries.get(&claims.jti)
            && *generation == read_under
            && cached.tenant_id == claims.tid
            && cached.agent_id == claims.sub
        {
            return Ok(Some(cached.state.clone()));
        }
        let state = read.await?;
        if let (Some(state), Ok(mut entries)) = (&state, self.entries.lock())
            && self.generation.load(Ordering::SeqCst) == read_under
        {
            if entries.len() >= MAX_CACHED_TOKENS {
                entries.clear();
            }
            let cached = CachedToken {
                tenant_id: claims.tid.clone(),
                agent_id: claims.sub.clone(),
                state: state.clone(),
            };
            entries.insert(claims.jti.clone(), (read_under, cached));
        }
        Ok(state)
    }
}

/// Verifies a gateway-minted token's signature and claims with the tenant key (no revocation
/// check: that needs the database).
pub fn decode_gateway_token(token: &str, key: &[u8]) -> Result<Claims, ApiError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    validation.validate_nbf = true;
    validation.set_audience(&[GATEWAY_ISSUER]);
    validation.set_issuer(&[GATEWAY_ISSUER]);
    validation.set_required_spec_claims(&["exp", "nbf", "iat", "sub", "aud", "iss", "jti"]);
    decode::<Claims>(token, &DecodingKey::from_secret(key), &validation)
        .map(|data| data.claims)
        .map_err(|e| invalid(&describe(&e)))
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind::*;
    match e.kind() {
        ExpiredSignature => "expired".into(),
        ImmatureSignature => "not valid yet".into(),
        InvalidAudience => "wrong audience".into(),
        InvalidIssuer => "wrong issuer".into(),
        InvalidSignature => "signature does not match".into(),
        MissingRequiredClaim(c) => format!("missing claim {c}"),
        InvalidAlgorithm => "unexpected algorithm".into(),
        _ => "malformed token".into(),
    }
}

async fn verify_external_token(
    db: &Database,
    jwks_cache: &JwksCache,
    outbound: &crate::delivery::outbound::Outbound,
    token: &str,
    header: &Header,
    (issuer, audiences, subject): (&str, &[&str], &str),
) -> Result<AgentPrincipal, ApiError> {
    if issuer.is_empty() {
        return Err(invalid("no issuer"));
    }
    // Several workspaces may trust one identity provider, each with its own audience: the
    // (issuer, audience) pair names the workspace. Whether the subject is also the id of one of
    // the workspace's own agents is read with it.
    let rows: Vec<(String, String, String, bool)> = db
        .fetch_all(
            "SELECT i.tenant_id, i.audience, i.config, \
             EXISTS (SELECT 1 FROM agents a WHERE a.tenant_id = i.tenant_id AND a.id = $2) \
             FROM token_issuers i WHERE i.issuer = $1 ORDER BY i.tenant_id",
            args![issuer, subject],
        )
        .await?;
    let mut named = rows
        .into_iter()
        .filter(|(_, aud, _, _)| audiences.contains(&aud.as_str()));
    let Some((tenant_id, _, config, names_own_agent)) = named.next() else {
        return Err(invalid("unknown issuer or audience"));
    };
    let names_two_workspaces = named.next().is_some();
    let config: IssuerConfig = serde_json::from_str(&config).map_err(ApiError::internal)?;
    if matches!(header.alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
        return Err(invalid("external issuers must sign with a public-key algorithm"));
    }
    let keys = external_keys(&config, header, jwks_cache, outbound).await?;
    let mut validation = Validation::new(header.alg);
    validation.leeway = 30;
    validation.validate_nbf = true;
    validation.set_audience(&[&config.audience]);
    validation.set_issuer(&[&config.issuer]);
    validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
    let mut last = invalid("no key verifies the signature");
    for key in keys {
        match decode::<Value>(token, &key, &validation) {
            // The gateway's agents and the issuer's subjects are two sources of identity: a
            // subject posing as an agent would share its records, idempotency keys and policy
            // rows, and outlive its revocation. Said (like the next refusal) only of a signed
            // token, so that unsigned ones learn nothing about agents or workspaces.
            Ok(_) if names_own_agent => {
                return Err(invalid(
                    "claim sub is the id of an agent created in this workspace; an external issuer's subjects must differ from them",
                ));
            }
            // A token must name one workspace, not land in whichever matched first.
            Ok(_) if names_two_workspaces => {
                return Err(invalid(
                    "the token's audiences name more than one workspace; it must name exactly one",
                ));
            }
            Ok(data) => return principal_from_external(&tenant_id, &config, data.claims),
            Err(e) => last = invalid(&describe(&e)),
        }
    }
    Err(last)
}

async fn external_keys(
    config: &IssuerConfig,
    header: &Header,
    cache: &JwksCache,
    outbound: &crate::delivery::outbound::Outbound,
) -> Result<Vec<DecodingKey>, ApiError> {
    if let Some(pem) = &config.public_key_pem {
        return pem_keys(pem).map_err(|e| invalid(&e));
    }
    let set: jsonwebtoken::jwk::JwkSet = match (&config.jwks, &config.jwks_url) {
        (Some(doc), _) => {
            serde_json::from_value(doc.clone()).map_err(|_| invalid("issuer JWKS unreadable"))?
        }
        (None, Some(url)) => fetch_jwks(cache, outbound, url).await?,
        _ => return Err(invalid("issuer has no keys")),
    };
    let keys: Vec<DecodingKey> = set
        .keys
        .iter()
        .filter(|k| header.kid.is_none() || k.common.key_id == header.kid)
        // A key published for one algorithm, or for encryption, verifies nothing else.
        .filter(|k| {
            k.common
                .key_algorithm
                .is_none_or(|alg| alg.to_string() == format!("{:?}", header.alg))
        })
        .filter(|k| verifies_signatures(k))
        .filter_map(|k| DecodingKey::from_jwk(k).ok())
        .collect();
    Ok(keys)
}

async fn fetch_jwks(
    cache: &JwksCache,
    outbound: &crate::delivery::outbound::Outbound,
    url: &str,
) -> Result<jsonwebtoken::jwk::JwkSet, ApiError> {
    if let Some((at, set)) = cache.docs.lock().unwrap_or_else(|e| e.into_inner()).get(url)
        && at.elapsed() < std::time::Duration::from_secs(300)
    {
        return Ok(set.clone());
    }
    let got = outbound.get(url).await;
    let set: jsonwebtoken::jwk::JwkSet = match got.status {
        Some(200) => serde_json::from_str(&got.body).map_err(|_| invalid("issuer JWKS unreadable"))?,
        _ => return Err(invalid("issuer JWKS unreachable")),
    };
    cache
        .docs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(url.to_string(), (std::time::Instant::now(), set.clone()));
    Ok(set)
}

fn principal_from_external(
    tenant_id: &str,
    config: &IssuerConfig,
    claims: Value,
) -> Result<AgentPrincipal, ApiError> {
    if let Some(tid) = claims.get("tid").and_then(Value::as_str)
        && tid != tenant_id
    {
        return Err(invalid("token belongs to another tenant"));
    }
    let strings = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
            _ => Vec::new(),
        }
    };
    let sub = claims.get("sub").and_then(Value::as_str).unwrap_or_default();
    if sub.is_empty() {
        return Err(invalid("missing claim sub"));
    }
    // Policy subjects are matched in a space-separated list: a space in a subject or a role
    // would let it pose as another (`x agent:agt_billing`).
    let spaced = |s: &str| s.chars().any(|c| c.is_whitespace() || c.is_control());
    if spaced(sub) {
        return Err(invalid("claim sub must not contain spaces"));
    }
    // A rule's calls carry `rule:<id>` where an agent's carry its id (to guards and to the
    // endpoint): a subject of that form would pass for a rule.
    if sub.starts_with("rule:") {
        return Err(invalid(
            "claim sub must not start with rule: (a rule's calls are named so)",
        ));
    }
    let mut scopes = strings(claims.get("scope"));
    scopes.extend(strings(claims.get("scp")));
    let mut roles = strings(claims.get(&config.roles_claim));
    roles.retain(|r| !r.is_empty() && !spaced(r));
    Ok(AgentPrincipal {
        tenant_id: tenant_id.to_string(),
        agent_id: sub.to_string(),
        roles,
        scopes,
        // Only the gateway's own tokens have an id it can revoke (and check at approval).
        jti: None,
        policy_version: None,
    })
}
