// Verify OpsIQ webhooks (signature scheme "opsiq-v1") in Rust.
//
// Dependencies (Cargo.toml):
//
//     hmac = "0.13"
//     sha2 = "0.11"
//     hex = "0.4"
//
// Call `verify_webhook` with the raw body bytes and the request target (path plus `?query`)
// exactly as received, before parsing anything.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// How far a webhook's timestamp may be from the receiver's clock, either way, in seconds.
pub const TOLERANCE_SECONDS: i64 = 300;

/// Why a webhook was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerificationError {
    /// `X-OpsIQ-Signature`, `X-OpsIQ-Timestamp`, `X-OpsIQ-Nonce` or `Idempotency-Key` is absent.
    MissingHeader,
    /// `X-OpsIQ-Timestamp` is not an integer.
    MalformedHeader,
    /// The timestamp is more than 300 seconds away from the receiver's clock.
    TimestampOutOfWindow,
    /// No signature value matches any of the receiver's secrets.
    SignatureMismatch,
    /// The nonce was already accepted within the window: the request is a replay.
    DuplicateNonce,
}

impl VerificationError {
    /// The machine-readable reason.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            VerificationError::MissingHeader => "missing_header",
            VerificationError::MalformedHeader => "malformed_header",
            VerificationError::TimestampOutOfWindow => "timestamp_out_of_window",
            VerificationError::SignatureMismatch => "signature_mismatch",
            VerificationError::DuplicateNonce => "duplicate_nonce",
        }
    }
}

impl std::fmt::Display for VerificationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for VerificationError {}

/// The value of header `name`, compared case-insensitively.
fn required_header<'h>(headers: &[(&str, &'h str)], name: &str) -> Result<&'h str, VerificationError> {
    headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|&(_, value)| value)
        .ok_or(VerificationError::MissingHeader)
}

/// Verifies one received webhook against the secrets the receiver accepts (several during a
/// rotation), and records its nonce in `seen_nonces` once it is genuine.
///
/// `request_target` is the URL path plus `?query` if any, exactly as received; `body` is the raw
/// request body, never a re-serialised copy; `now` is the receiver's clock in unix seconds.
///
/// # Errors
///
/// Returns the first check that fails, in this order: a required header is missing, the
/// timestamp is not an integer, the timestamp is outside the window, no signature matches,
/// the nonce was already accepted.
pub fn verify_webhook(
    secrets: &[&str],
    headers: &[(&str, &str)],
    request_target: &str,
    body: &[u8],
    now: i64,
    seen_nonces: &mut std::collections::HashSet<String>,
) -> Result<(), VerificationError> {
    let signature = required_header(headers, "X-OpsIQ-Signature")?;
    let timestamp = required_header(headers, "X-OpsIQ-Timestamp")?;
    let nonce = required_header(headers, "X-OpsIQ-Nonce")?;
    let idempotency_key = required_header(headers, "Idempotency-Key")?;

    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerificationError::MalformedHeader)?;
    if now.abs_diff(ts) > TOLERANCE_SECONDS.unsigned_abs() {
        return Err(VerificationError::TimestampOutOfWindow);
    }

    let signed_prefix = format!("{timestamp}.{nonce}.{idempotency_key}.{request_target}.");
    let matched = signature
        .split(',')
        .filter_map(|value| value.trim().strip_prefix("sha256="))
        // A value that is not valid hex can never match: it counts as a mismatch.
        .filter_map(|hex_signature| hex::decode(hex_signature).ok())
        .any(|candidate| {
            secrets.iter().any(|secret| {
                // HMAC takes keys of any length, so this never fails in practice.
                let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
                    return false;
                };
                mac.update(signed_prefix.as_bytes());
                mac.update(body);
                // Constant-time comparison (and a length check) inside the hmac crate.
                mac.verify_slice(&candidate).is_ok()
            })
        });
    if !matched {
        return Err(VerificationError::SignatureMismatch);
    }

    // Recorded only now, after the signature held, so forged requests cannot fill the cache.
    // In production, expire entries once their timestamp leaves the window (and share the
    // cache between replicas, e.g. Redis `SET nonce 1 NX EX 600`).
    if !seen_nonces.insert(nonce.to_owned()) {
        return Err(VerificationError::DuplicateNonce);
    }
    Ok(())
}
