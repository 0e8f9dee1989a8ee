//! Endpoints: customer URLs that receive signed webhooks, with their event subscriptions, rate
//! limits and secrets. Secrets are encrypted at rest with the master key and decrypted only to
//! sign; a rotation keeps the previous secret signing beside the new one for the overlap window.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::signing::{self, Scheme};
use crate::crypto::MasterKey;
use crate::db::{Database, DbError, Versioned, now_ms, rfc3339, version_holds};
use crate::http::{ApiError, ErrorDetail};
use crate::{args, ids};

/// A stored endpoint (secrets still sealed).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EndpointRow {
    /// `ep_…`.
    pub id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// Where deliveries go.
    pub url: String,
    /// Free text.
    pub description: String,
    /// JSON array of event type patterns.
    pub event_types: String,
    /// Disabled endpoints receive nothing.
    pub enabled: bool,
    /// Deliveries per second, if limited.
    pub rate_limit_per_s: Option<i64>,
    /// Concurrent deliveries, if limited.
    pub max_in_flight: Option<i64>,
    /// `opsiq-v1` or `standard-webhooks`.
    pub signature_scheme: String,
    /// The current secret, sealed.
    pub secret_enc: String,
    /// The rotated-out secret, sealed, while it still signs.
    pub previous_secret_enc: Option<String>,
    /// When the previous secret stops signing (ms).
    pub previous_expires_at: Option<i64>,
    /// Secrets rotated out before the previous one, as JSON [`RetiredSecret`]s, newest first.
    pub older_secrets: Option<String>,
    /// Why the endpoint was disabled automatically.
    pub disabled_reason: Option<String>,
    /// Start of the current run of failures (ms).
    pub failing_since: Option<i64>,
    /// Creation time (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
    /// Soft-deletion time (ms).
    pub deleted_at: Option<i64>,
    /// Bumped by every change of its configuration (the API's, the engine disabling it); the
    /// `ETag` that `If-Match` names.
    pub version: i64,
}

impl EndpointRow {
    /// The subscribed patterns.
    pub fn patterns(&self) -> Vec<String> {
        serde_json::from_str(&self.event_types).unwrap_or_default()
    }

    /// The scheme (unknown stored values fall back to the default).
    pub fn scheme(&self) -> Scheme {
        Scheme::parse(&self.signature_scheme).unwrap_or_default()
    }

    /// The rotated-out secrets that still sign at `now`, newest first, at most
    /// [`MAX_SIGNING_SECRETS`] − 1 of them.
    pub fn retired_secrets(&self, now: i64) -> Vec<RetiredSecret> {
        let previous = self
            .previous_secret_enc
            .clone()
            .zip(self.previous_expires_at)
            .map(|(secret_enc, expires_at)| RetiredSecret {
                secret_enc,
                expires_at,
            });
        // Written by this server only; an unreadable list signs with what else there is.
        let older: Vec<RetiredSecret> = self
            .older_secrets
            .as_deref()
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_default();
        previous
            .into_iter()
            .chain(older)
            .filter(|retired| retired.expires_at > now)
            .take(MAX_SIGNING_SECRETS - 1)
            .collect()
    }

    /// The secrets that sign now, newest first.
    pub fn signing_secrets(
        &self,
        keys: &MasterKey,
        now: i64,
    ) -> Result<Vec<String>, crate::crypto::CryptoError> {
        let retired = self.retired_secrets(now);
        std::iter::once(&self.secret_enc)
            .chain(retired.iter().map(|r| &r.secret_enc))
            .map(|sealed| keys.open(sealed))
            .collect()
    }

    /// Whether the endpoint subscribes to `event_type`.
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        self.patterns().iter().any(|p| pattern_matches(p, event_type))
    }

    /// The API representation (never the secret).
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "url": self.url,
            "description": self.description,
            "event_types": self.patterns(),
            "enabled": self.enabled,
            "rate_limit_per_s": self.rate_limit_per_s,
            "max_in_flight": self.max_in_flight,
            "signature_scheme": self.signature_scheme,
            "disabled_reason": self.disabled_reason,
            "failing_since": self.failing_since.map(rfc3339),
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "version": self.version,
        })
    }
}

/// Most secrets that sign a request at once: the current one and the last four rotated out
/// within their overlap. Rotating more often than that drops the oldest early.
pub const MAX_SIGNING_SECRETS: usize = 5;

/// A secret rotated out, sealed, and when it stops signing (ms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetiredSecret {
    /// The secret, sealed under the master key.
    pub secret_enc: String,
    /// When it stops signing (ms).
    pub expires_at: i64,
}

/// Whether an event type matches a subscription pattern: `*` (everything), `invoice.*` (every
/// type under `invoice.`), a trailing `*` as a prefix, or an exact name.
pub fn pattern_matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => event_type.starts_with(prefix),
        None => pattern == event_type,
    }
}

/// Validates a subscription pattern.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let body = pattern.strip_suffix('*').unwrap_or(pattern);
    // No empty part between dots: no event type has one, so such a pattern could match nothing.
    let parts_ok = pattern == "*"
        || (!body.is_empty()
            && !body.starts_with('.')
            && !body.contains("..")
            && (pattern.ends_with('*') || !body.ends_with('.')));
    let ok = pattern.len() <= 128
        && parts_ok
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{pattern}` is not a pattern like `*`, `invoice.*` or `invoice.paid`"
        ))
    }
}

/// Fields accepted on create and (all optional) on update.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointInput {
    /// Where deliveries go.
    #[serde(default, deserialize_with = "crate::http::extract::not_null")]
    pub url: Option<String>,
    /// Free text.
    #[serde(default, deserialize_with = "crate::http::extract::not_null")]
    pub description: Option<String>,
    /// Event type patterns.
    #[serde(default, deserialize_with = "crate::http::extract::not_null")]
    pub event_types: Option<Vec<String>>,
    /// Enabled or not.
    #[serde(default, deserialize_with = "crate::http::extract::not_null")]
    pub enabled: Option<bool>,
    /// Deliveries per second (null for unlimited).
    #[serde(default, deserialize_with = "crate::http::extract::null_or_value")]
    pub rate_limit_per_s: Option<Option<i64>>,
    /// Concurrent deliveries (null for the default).
    #[serde(default, deserialize_with = "crate::http::extract::null_or_value")]
    pub max_in_flight: Option<Option<i64>>,
    /// `opsiq-v1` or `standard-webhooks`.
    #[serde(default, deserialize_with = "crate::http::extract::not_null")]
    pub signature_scheme: Option<Scheme>,
    /// A secret to use instead of a generated one (`whsec_` + base64 of 24–64 bytes).
    #[serde(default, deserialize_with = "crate::http::extract::not_null")]
    pub secret: Option<String>,
}

/// Checks an endpoint input; `allow_private` is `--dev`.
pub fn check_input(input: &mut EndpointInput, creating: bool, allow_private: bool) -> Result<(), ApiError> {
    let mut problems = Vec::new();
    let mut normalized = None;
    let mut push = |path: &str, message: String| {
        problems.push(ErrorDetail {
            path: path.into(),
            message,
        })
    };
    match &input.url {
        None if creating => push("/url", "is required".into()),
        None => {}
        // Stored (and shown in the delivery log) as it is sent: parsed and written back, so
        // `http:/host` or an unencoded path never stands for another URL than the one used.
        Some(url) => match reqwest::Url::parse(url) {
            Err(e) => push("/url", format!("is not a URL: {e}")),
            Ok(_) if url.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                push("/url", "must not contain spaces or control characters".into())
            }
            Ok(parsed) if parsed.fragment().is_some() => {
                push("/url", "must not have a fragment (#…): it is never sent".into())
            }
            Ok(parsed) if parsed.port() == Some(0) => push("/url", "port 0 cannot be connected to".into()),
            Ok(parsed) if parsed.as_str().len() > 2048 => {
                push("/url", "must be at most 2048 characters".into())
            }
            Ok(parsed) => match super::outbound::check_url(&parsed, allow_private) {
                Err(m) => push("/url", m),
                Ok(()) => normalized = Some(parsed.to_string()),
            },
        },
    }
    if let Some(d) = &input.description
        && d.chars().count() > 1000
    {
        push("/description", "must be at most 1000 characters".into());
    }
    if let Some(patterns) = &input.event_types {
        if patterns.len() > 100 {
            push("/event_types", "at most 100 patterns".into());
        }
        for (i, p) in patterns.iter().enumerate() {
            if let Err(m) = check_pattern(p) {
                push(&format!("/event_types/{i}"), m);
            }
        }
    }
    if let Some(Some(r)) = input.rate_limit_per_s
        && !(1..=100_000).contains(&r)
    {
        push(
            "/rate_limit_per_s",
            "must be between 1 and 100000, or null".into(),
        );
    }
    if let Some(Some(m)) = input.max_in_flight
        && !(1..=10_000).contains(&m)
    {
        push("/max_in_flight", "must be between 1 and 10000, or null".into());
    }
    if let Some(secret) = &input.secret {
        let len = signing::standard_key(secret).map(|k| k.len()).unwrap_or(0);
        if !secret.starts_with(signing::SECRET_PREFIX) || !(24..=64).contains(&len) {
            push(
                "/secret",
                "must be `whsec_` followed by base64 of 24 to 64 bytes".into(),
            );
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::validation("the endpoint is invalid", problems));
    }
    if normalized.is_some() {
        input.url = normalized;
    }
    // A pattern listed twice is kept once (endpoints saved before this held repeats, and an
    // edit sends back what it read).
    if let Some(patterns) = &mut input.event_types {
        let mut seen = std::collections::HashSet::new();
        patterns.retain(|p| seen.insert(p.clone()));
    }
    Ok(())
}

/// Loads an endpoint of this tenant unless deleted.
pub async fn get(db: &Database, tenant_id: &str, id: &str) -> Result<Option<EndpointRow>, DbError> {
    Ok(db
        .fetch_optional(
            "SELECT * FROM endpoints WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
            args![tenant_id, id],
        )
        .await?)
}

/// Every enabled endpoint of a tenant (fan-out candidates).
pub async fn enabled_for_tenant(db: &Database, tenant_id: &str) -> Result<Vec<EndpointRow>, DbError> {
    Ok(db
        .fetch_all(
            "SELECT * FROM endpoints WHERE tenant_id = $1 AND enabled = $2 AND deleted_at IS NULL ORDER BY id",
            args![tenant_id, true],
        )
        .await?)
}

/// Creates an endpoint; returns it with its plaintext secret (shown on create only).
pub async fn create(
    db: &Database,
    keys: &MasterKey,
    tenant_id: &str,
    input: EndpointInput,
) -> Result<(EndpointRow, String), DbError> {
    let now = now_ms();
    let secret = input.secret.clone().unwrap_or_else(signing::generate_secret);
    let id = ids::new_id("ep");
    crate::audit::note("created", id.clone());
    let row = EndpointRow {
        id,
        tenant_id: tenant_id.to_string(),
        url: input.url.unwrap_or_default(),
        description: input.description.unwrap_or_default(),
        event_types: serde_json::to_string(&input.event_types.unwrap_or_else(|| vec!["*".into()]))?,
        enabled: input.enabled.unwrap_or(true),
        rate_limit_per_s: input.rate_limit_per_s.flatten(),
        max_in_flight: input.max_in_flight.flatten(),
        signature_scheme: input.signature_scheme.unwrap_or_default().as_str().into(),
        secret_enc: keys.seal(&secret),
        previous_secret_enc: None,
        previous_expires_at: None,
        older_secrets: None,
        disabled_reason: None,
        failing_since: None,
        created_at: now,
        updated_at: now,
        deleted_at: None,
        version: 1,
    };
    db.execute(
        "INSERT INTO endpoints (id, tenant_id, url, description, event_types, enabled, rate_limit_per_s, \
         max_in_flight, signature_scheme, secret_enc, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        args![
            &row.id,
            &row.tenant_id,
            &row.url,
            &row.description,
            &row.event_types,
            row.enabled,
            row.rate_limit_per_s,
            row.max_in_flight,
            &row.signature_scheme,
            &row.secret_enc,
            now,
            now
        ],
    )
    .await?;
    Ok((row, secret))
}

/// Applies a partial update, given `expected` only to an endpoint still at that version; answers
/// the updated row.
pub async fn update(
    db: &Database,
    tenant_id: &str,
    id: &str,
    input: EndpointInput,
    expected: Option<i64>,
) -> Result<Versioned<EndpointRow>, DbError> {
    // Read and write in one transaction on a locked row: two updates of different fields (or an
    // update beside the engine disabling the endpoint) must not undo each other.
    let mut tx = db.begin().await?;
    let Some(mut row) = locked(&mut tx, tenant_id, id).await? else {
        return Ok(Versioned::Missing);
    };
    if !version_holds(expected, row.version) {
        return Ok(Versioned::Changed(row.version));
    }
    let before = row.clone();
    if let Some(url) = input.url {
        row.url = url;
    }
    if let Some(d) = input.description {
        row.description = d;
    }
    if let Some(p) = input.event_types {
        row.event_types = serde_json::to_string(&p)?;
    }
    if let Some(enabled) = input.enabled {
        row.enabled = enabled;
        if enabled {
            row.disabled_reason = None;
            row.failing_since = None;
        }
    }
    if let Some(r) = input.rate_limit_per_s {
        row.rate_limit_per_s = r;
    }
    if let Some(m) = input.max_in_flight {
        row.max_in_flight = m;
    }
    if let Some(s) = input.signature_scheme {
        row.signature_scheme = s.as_str().into();
    }
    // Nothing changed: no new version (which would fail others' If-Match for nothing).
    let settings = |r: &EndpointRow| {
        (
            (
                r.url.clone(),
                r.description.clone(),
                r.event_types.clone(),
                r.enabled,
            ),
            (r.rate_limit_per_s, r.max_in_flight, r.signature_scheme.clone()),
            (r.disabled_reason.clone(), r.failing_since),
        )
    };
    if settings(&before) == settings(&row) {
        tx.rollback().await;
        return Ok(Versioned::Done(before));
    }
    row.updated_at = now_ms();
    row.version += 1;
    tx.execute(
        "UPDATE endpoints SET url = $1, description = $2, event_types = $3, enabled = $4, \
         rate_limit_per_s = $5, max_in_flight = $6, signature_scheme = $7, disabled_reason = $8, \
         failing_since = $9, updated_at = $10, version = $11 WHERE tenant_id = $12 AND id = $13 AND deleted_at IS NULL",
        args![
            &row.url,
            &row.description,
            &row.event_types,
            row.enabled,
            row.rate_limit_per_s,
            row.max_in_flight,
            &row.signature_scheme,
            row.disabled_reason.clone(),
            row.failing_since,
            row.updated_at,
            row.version,
            tenant_id,
            id
        ],
    )
    .await?;
    if (row.rate_limit_per_s, row.max_in_flight) != (before.rate_limit_per_s, before.max_in_flight) {
        // Deliveries that waited for the old limits were given due times spaced at its rate: due
        // now instead, the new limits space them (a raise meant to clear a backlog clears it).
        tx.execute(super::outbox::WAITING_DUE_NOW, args![now_ms(), tenant_id, id])
            .await?;
    }
    tx.commit().await?;
    Ok(Versioned::Done(row))
}

/// An endpoint read for a change, locked until the transaction ends.
async fn locked(tx: &mut crate::db::Tx, tenant_id: &str, id: &str) -> Result<Option<EndpointRow>, DbError> {
    let select = crate::db::locking(
        tx,
        "SELECT * FROM endpoints WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
    );
    Ok(tx.fetch_optional(select, args![tenant_id, id]).await?)
}

/// Soft-deletes an endpoint, given `expected` only if it is still at that version.
pub async fn delete(
    db: &Database,
    tenant_id: &str,
    id: &str,
    expected: Option<i64>,
) -> Result<Versioned<()>, DbError> {
    let mut tx = db.begin().await?;
    let Some(row) = locked(&mut tx, tenant_id, id).await? else {
        return Ok(Versioned::Missing);
    };
    if !version_holds(expected, row.version) {
        return Ok(Versioned::Changed(row.version));
    }
    let now = now_ms();
    tx.execute(
        "UPDATE endpoints SET deleted_at = $1, enabled = $2, updated_at = $1, version = version + 1 \
         WHERE tenant_id = $3 AND id = $4",
        args![now, false, tenant_id, id],
    )
    .await?;
    // The events it still owed are given up with it, without alerts: its deleter asked for
    // that. An action's delivery is made due at once instead, so that the engine fails it now
    // and settles its invocation as failed (an attempt in flight records its own outcome). The
    // `|| ''` keeps both databases on the small index of pending deliveries instead of walking
    // every delivery the endpoint ever had.
    tx.execute(
        "UPDATE deliveries SET status = 'failed', last_error = $1, updated_at = $2 \
         WHERE status = 'pending' AND kind = 'event' AND (tenant_id || '') = $3 AND (endpoint_id || '') = $4",
        args![ENDPOINT_DELETED, now, tenant_id, id],
    )
    .await?;
    tx.execute(
        "UPDATE deliveries SET next_attempt_at = $1 \
         WHERE status = 'pending' AND kind = 'action' AND (tenant_id || '') = $2 AND (endpoint_id || '') = $3",
        args![now, tenant_id, id],
    )
    .await?;
    tx.commit().await?;
    Ok(Versioned::Done(()))
}

/// Why a delivery to a deleted endpoint gave up.
pub const ENDPOINT_DELETED: &str = "the endpoint was deleted";

/// How a rotation treats the secrets it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retire {
    /// The secret in use signs beside the new one for this long (ms); those rotated out before
    /// it until their own overlaps end.
    After(i64),
    /// Every earlier secret stops signing at once (a leaked secret).
    Now,
}

/// Rotates the secret: the new one signs from now on, the earlier ones as `retire` says.
pub async fn rotate_secret(
    db: &Database,
    keys: &MasterKey,
    tenant_id: &str,
    id: &str,
    new_secret: Option<String>,
    retire: Retire,
) -> Result<Rotation, DbError> {
    // Locked: of two rotations at once, the second keeps the first's new secret as its previous
    // one (rather than the secret both read), so no secret handed out stops verifying at once.
    let mut tx = db.begin().await?;
    let Some(row) = locked(&mut tx, tenant_id, id).await? else {
        return Ok(Rotation::Missing);
    };
    let now = now_ms();
    // A chosen secret that signs already would sign twice and take the place of one handed out.
    if let Some(chosen) = &new_secret
        && row.signing_secrets(keys, now)?.contains(chosen)
    {
        return Ok(Rotation::SecretInUse);
    }
    let secret = new_secret.unwrap_or_else(signing::generate_secret);
    let (previous, expires, older) = match retire {
        Retire::Now => (None, None, None),
        Retire::After(overlap_ms) => {
            // The secret in use becomes the previous one; those still signing move one place down.
            let older: Vec<RetiredSecret> = row
                .retired_secrets(now)
                .into_iter()
                .take(MAX_SIGNING_SECRETS - 2)
                .collect();
            let older = match older.is_empty() {
                true => None,
                false => Some(serde_json::to_string(&older)?),
            };
            (Some(row.secret_enc), Some(now + overlap_ms), older)
        }
    };
    tx.execute(
        "UPDATE endpoints SET secret_enc = $1, previous_secret_enc = $2, previous_expires_at = $3, \
         older_secrets = $4, updated_at = $5 WHERE tenant_id = $6 AND id = $7",
        args![keys.seal(&secret), previous, expires, older, now, tenant_id, id],
    )
    .await?;
    tx.commit().await?;
    Ok(Rotation::Done {
        secret,
        previous_expires_at: expires,
    })
}

/// What a rotation did.
#[derive(Debug)]
pub enum Rotation {
    /// The new secret signs; the one it replaced stops at `previous_expires_at` (`None`: now).
    Done {
        /// The new secret, shown once.
        secret: String,
        /// When the replaced secret stops signing.
        previous_expires_at: Option<i64>,
    },
    /// No such endpoint.
    Missing,
    /// The chosen secret is one that signs already.
    SecretInUse,
}
