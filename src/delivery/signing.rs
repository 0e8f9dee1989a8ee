//! Webhook signatures, exactly as the contract pins them.
//!
//! `opsiq-v1`: `X-OpsIQ-Signature: sha256=<hex>`, HMAC-SHA256 keyed with the UTF-8 bytes of the
//! whole secret (prefix included) over `{timestamp}.{nonce}.{idempotency_key}.{request_target}.{raw_body}`;
//! several values separated by `, ` (newest first) while a rotated-out secret still signs.
//!
//! `standard-webhooks`: `webhook-signature: v1,<base64>` (space-separated when several), HMAC-SHA256
//! keyed with the base64-decoded secret after `whsec_`, over `{webhook-id}.{webhook-timestamp}.{raw_body}`.
//!
//! Signatures are always computed over the exact bytes sent, never a re-serialised copy.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of every endpoint secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// Which signature headers an endpoint receives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scheme {
    /// OpsIQ's own scheme (covers nonce, idempotency key and request target).
    #[default]
    #[serde(rename = "opsiq-v1")]
    OpsiqV1,
    /// The Standard Webhooks scheme, for receivers using those libraries.
    #[serde(rename = "standard-webhooks")]
    StandardWebhooks,
}

impl Scheme {
    /// The stored and API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::OpsiqV1 => "opsiq-v1",
            Scheme::StandardWebhooks => "standard-webhooks",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "opsiq-v1" => Some(Scheme::OpsiqV1),
            "standard-webhooks" => Some(Scheme::StandardWebhooks),
            _ => None,
        }
    }
}

/// A new endpoint secret: `whsec_` + base64 of 32 random bytes.
pub fn generate_secret() -> String {
    format!(
        "{SECRET_PREFIX}{}",
        STANDARD.encode(crate::crypto::random_bytes::<32>())
    )
}

/// A fresh per-attempt nonce.
pub fn generate_nonce() -> String {
    format!("n_{}", hex::encode(crate::crypto::random_bytes::<16>()))
}

fn opsiq_mac(
    secret: &str,
    timestamp: &str,
    nonce: &str,
    idempotency_key: &str,
    target: &str,
    body: &[u8],
) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    for part in [timestamp, nonce, idempotency_key, target] {
        mac.update(part.as_bytes());
        mac.update(b".");
    }
    mac.update(body);
    mac
}

/// The `opsiq-v1` signature (lowercase hex) of one request.
pub fn sign_opsiq_v1(
    secret: &str,
    timestamp: &str,
    nonce: &str,
    idempotency_key: &str,
    target: &str,
    body: &[u8],
) -> String {
    hex::encode(
        opsiq_mac(secret, timestamp, nonce, idempotency_key, target, body)
            .finalize()
            .into_bytes(),
    )
}

/// Checks one `opsiq-v1` hex signature in constant time.
pub fn check_opsiq_v1(
    secret: &str,
    timestamp: &str,
    nonce: &str,
    idempotency_key: &str,
    target: &str,
    body: &[u8],
    signature_hex: &str,
) -> bool {
    let Ok(expected) = hex::decode(signature_hex) else {
        return false;
    };
    opsiq_mac(secret, timestamp, nonce, idempotency_key, target, body)
        .verify_slice(&expected)
        .is_ok()
}

/// The `X-OpsIQ-Signature` value for every secret that currently signs (newest first).
pub fn opsiq_v1_header(
    secrets: &[&str],
    timestamp: &str,
    nonce: &str,
    idempotency_key: &str,
    target: &str,
    body: &[u8],
) -> String {
    secrets
        .iter()
        .map(|s| {
            format!(
                "sha256={}",
                sign_opsiq_v1(s, timestamp, nonce, idempotency_key, target, body)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Standard Webhooks key: the base64-decoded part after `whsec_`.
pub fn standard_key(secret: &str) -> Option<Vec<u8>> {
    STANDARD
        .decode(secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret))
        .ok()
}

fn standard_mac(key: &[u8], msg_id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The Standard Webhooks signature (`v1,<base64>`) of one request.
pub fn sign_standard(secret: &str, msg_id: &str, timestamp: &str, body: &[u8]) -> Option<String> {
    let key = standard_key(secret)?;
    let bytes = standard_mac(&key, msg_id, timestamp, body)
        .finalize()
        .into_bytes();
    Some(format!("v1,{}", STANDARD.encode(bytes)))
}

/// Checks one Standard Webhooks base64 signature in constant time.
pub fn check_standard(secret: &str, msg_id: &str, timestamp: &str, body: &[u8], signature_b64: &str) -> bool {
    let (Some(key), Ok(expected)) = (standard_key(secret), STANDARD.decode(signature_b64)) else {
        return false;
    };
    standard_mac(&key, msg_id, timestamp, body)
        .verify_slice(&expected)
        .is_ok()
}

/// The `webhook-signature` value for every secret that currently signs (newest first).
pub fn standard_header(secrets: &[&str], msg_id: &str, timestamp: &str, body: &[u8]) -> String {
    secrets
        .iter()
        .filter_map(|s| sign_standard(s, msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The request target that is signed: the URL's path plus `?query` if any, exactly as sent.
pub fn request_target(url: &reqwest::Url) -> String {
    match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    }
}

/// What kind of webhook a delivery carries, for the `X-OpsIQ-Event` / `X-OpsIQ-Action` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carries<'a> {
    /// An event of this type.
    Event(&'a str),
    /// A request to run this action.
    Action(&'a str),
}

/// Everything that goes into one signed attempt.
#[derive(Debug, Clone)]
pub struct SignedAttempt<'a> {
    /// The delivery id (`X-OpsIQ-Id`, `webhook-id`).
    pub delivery_id: &'a str,
    /// Stable per delivery.
    pub idempotency_key: &'a str,
    /// Event type or action name.
    pub carries: Carries<'a>,
    /// 1, 2, …
    pub attempt: i64,
    /// Unix seconds of signing.
    pub timestamp: i64,
    /// Unique per attempt.
    pub nonce: &'a str,
    /// Path and query of the endpoint URL.
    pub request_target: &'a str,
    /// The exact body bytes.
    pub body: &'a [u8],
}

/// The complete header list of a signed attempt under `scheme` with the signing `secrets`.
pub fn signed_headers(
    scheme: Scheme,
    secrets: &[&str],
    a: &SignedAttempt<'_>,
) -> Vec<(&'static str, String)> {
    let ts = a.timestamp.to_string();
    let mut headers = vec![
        ("content-type", "application/json".to_string()),
        (
            "user-agent",
            concat!("OpsIQ-Webhooks/", env!("CARGO_PKG_VERSION")).to_string(),
        ),
        ("x-opsiq-id", a.delivery_id.to_string()),
        ("x-opsiq-timestamp", ts.clone()),
        ("x-opsiq-nonce", a.nonce.to_string()),
        ("idempotency-key", a.idempotency_key.to_string()),
        ("x-opsiq-attempt", a.attempt.to_string()),
    ];
    match a.carries {
        Carries::Event(t) => headers.push(("x-opsiq-event", t.to_string())),
        Carries::Action(n) => headers.push(("x-opsiq-action", n.to_string())),
    }
    match scheme {
        Scheme::OpsiqV1 => headers.push((
            "x-opsiq-signature",
            opsiq_v1_header(secrets, &ts, a.nonce, a.idempotency_key, a.request_target, a.body),
        )),
        Scheme::StandardWebhooks => {
            headers.push(("webhook-id", a.delivery_id.to_string()));
            headers.push(("webhook-timestamp", ts.clone()));
            headers.push((
                "webhook-signature",
                standard_header(secrets, a.delivery_id, &ts, a.body),
            ));
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_published_vector() {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/standard-webhooks-vector.json")).unwrap();
        let s = |k: &str| v[k].as_str().unwrap().to_string();
        let sig = sign_standard(
            &s("secret"),
            &s("webhook-id"),
            &s("webhook-timestamp"),
            s("body").as_bytes(),
        );
        assert_eq!(sig.unwrap(), s("webhook-signature"));
    }

    #[test]
    fn secrets_have_the_standard_format() {
        let secret = generate_secret();
        assert!(secret.starts_with("whsec_"));
        assert_eq!(standard_key(&secret).unwrap().len(), 32);
        assert_ne!(generate_nonce(), generate_nonce());
    }
}
