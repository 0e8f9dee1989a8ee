//! Verifying received webhooks: the receiving side of [`signing`](super::signing), used by
//! `opsiq listen`, `opsiq verify`, `POST /v1/signatures/verify`, and usable by any Rust receiver.
//!
//! A request is accepted when its timestamp is within 300 seconds of the receiver's clock, a
//! signature matches one of the receiver's secrets (constant-time), and — for a [`Verifier`] that
//! keeps state — its nonce was not accepted before within the window. The nonce is only recorded
//! after the signature holds, so forged requests cannot fill the cache.

use std::collections::HashMap;
use std::sync::Mutex;

use super::signing::{self, Scheme};

/// How far a timestamp may be from the receiver's clock, either way.
pub const TOLERANCE_SECS: i64 = 300;

/// Why a request was refused; [`reason`](Self::reason) is the contract's snake_case word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A header the scheme needs is absent.
    #[error("the {0} header is missing")]
    MissingHeader(&'static str),
    /// A header is present but cannot be read.
    #[error("the {0} header is malformed")]
    MalformedHeader(&'static str),
    /// The timestamp is more than 300 seconds from now.
    #[error("the timestamp is more than 300 seconds away from now")]
    TimestampOutOfWindow,
    /// No signature matches any secret.
    #[error("no signature matches any of the secrets")]
    SignatureMismatch,
    /// The nonce was already accepted within the window (a replay).
    #[error("this nonce was already accepted: the request is a replay")]
    DuplicateNonce,
}

impl VerifyError {
    /// The machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::MissingHeader(_) => "missing_header",
            VerifyError::MalformedHeader(_) => "malformed_header",
            VerifyError::TimestampOutOfWindow => "timestamp_out_of_window",
            VerifyError::SignatureMismatch => "signature_mismatch",
            VerifyError::DuplicateNonce => "duplicate_nonce",
        }
    }
}

/// Case-insensitive header lookup over whatever holds the received headers.
pub trait Headers {
    /// The value of header `name`, if present and text.
    fn header(&self, name: &str) -> Option<&str>;
}

impl Headers for http::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
}

impl<K: AsRef<str>, V: AsRef<str>> Headers for [(K, V)] {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k.as_ref().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    }
}

impl Headers for serde_json::Map<String, serde_json::Value> {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_str())
    }
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Which scheme the request was signed with.
    pub scheme: Scheme,
    /// The signed timestamp.
    pub timestamp: i64,
    /// The replay-protection key (nonce, or webhook-id for Standard Webhooks).
    pub nonce: String,
}

fn required<'h>(headers: &'h (impl Headers + ?Sized), name: &'static str) -> Result<&'h str, VerifyError> {
    headers.header(name).ok_or(VerifyError::MissingHeader(name))
}

fn check_window(timestamp: &str, name: &'static str, now: i64) -> Result<i64, VerifyError> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::MalformedHeader(name))?;
    // abs_diff: a crafted timestamp near i64::MIN must not overflow.
    if now.abs_diff(ts) > TOLERANCE_SECS as u64 {
        return Err(VerifyError::TimestampOutOfWindow);
    }
    Ok(ts)
}

/// Verifies an `opsiq-v1` request without replay state.
pub fn verify_opsiq_v1(
    secrets: &[&str],
    headers: &(impl Headers + ?Sized),
    request_target: &str,
    body: &[u8],
    now: i64,
) -> Result<Verified, VerifyError> {
    let signature = required(headers, "x-opsiq-signature")?;
    let timestamp = required(headers, "x-opsiq-timestamp")?;
    let nonce = required(headers, "x-opsiq-nonce")?;
    let idempotency_key = required(headers, "idempotency-key")?;
    let ts = check_window(timestamp, "x-opsiq-timestamp", now)?;
    let matched = signature.split(',').map(str::trim).any(|value| {
        value.strip_prefix("sha256=").is_some_and(|hex| {
            secrets.iter().any(|secret| {
                signing::check_opsiq_v1(
                    secret,
                    timestamp,
                    nonce,
                    idempotency_key,
                    request_target,
                    body,
                    hex,
                )
            })
        })
    });
    if !matched {
        return Err(VerifyError::SignatureMismatch);
    }
    Ok(Verified {
        scheme: Scheme::OpsiqV1,
        timestamp: ts,
        nonce: nonce.to_string(),
    })
}

/// Verifies a Standard Webhooks request without replay state.
pub fn verify_standard(
    secrets: &[&str],
    headers: &(impl Headers + ?Sized),
    body: &[u8],
    now: i64,
) -> Result<Verified, VerifyError> {
    let msg_id = required(headers, "webhook-id")?;
    let timestamp = required(headers, "webhook-timestamp")?;
    let signature = required(headers, "webhook-signature")?;
    let ts = check_window(timestamp, "webhook-timestamp", now)?;
    let matched = signature.split(' ').any(|value| {
        value.strip_prefix("v1,").is_some_and(|b64| {
            secrets
                .iter()
                .any(|secret| signing::check_standard(secret, msg_id, timestamp, body, b64))
        })
    });
    if !matched {
        return Err(VerifyError::SignatureMismatch);
    }
    Ok(Verified {
        scheme: Scheme::StandardWebhooks,
        timestamp: ts,
        nonce: format!("{msg_id}.{timestamp}"),
    })
}

/// Verifies by whichever scheme the headers carry (`opsiq-v1` unless only `webhook-signature` is
/// present).
pub fn verify_request(
    secrets: &[&str],
    headers: &(impl Headers + ?Sized),
    request_target: &str,
    body: &[u8],
    now: i64,
) -> Result<Verified, VerifyError> {
    if headers.header("x-opsiq-signature").is_none() && headers.header("webhook-signature").is_some() {
        verify_standard(secrets, headers, body, now)
    } else {
        verify_opsiq_v1(secrets, headers, request_target, body, now)
    }
}

/// A receiver's verifier: several secrets (rotation) and a nonce cache for replay protection.
#[derive(Debug)]
pub struct Verifier {
    secrets: Vec<String>,
    seen: Mutex<HashMap<String, i64>>,
}

impl Verifier {
    /// A verifier accepting any of `secrets`.
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        Self {
            secrets: secrets.into_iter().collect(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Verifies a request and records its nonce; a second request with the same nonce within the
    /// window is a [`VerifyError::DuplicateNonce`].
    pub fn verify(
        &self,
        headers: &(impl Headers + ?Sized),
        request_target: &str,
        body: &[u8],
        now: i64,
    ) -> Result<Verified, VerifyError> {
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        let verified = verify_request(&secrets, headers, request_target, body, now)?;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        // Entries older than twice the window can never match an acceptable timestamp again.
        if seen.len() > 10_000 {
            seen.retain(|_, ts| now - *ts <= 2 * TOLERANCE_SECS);
        }
        if seen.contains_key(&verified.nonce) {
            return Err(VerifyError::DuplicateNonce);
        }
        seen.insert(verified.nonce.clone(), verified.timestamp);
        Ok(verified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Vec<Value> {
        let v: Value =
            serde_json::from_str(include_str!("../../tests/fixtures/signing-vectors.json")).unwrap();
        v["cases"].as_array().unwrap().clone()
    }

    #[test]
    fn every_signing_vector_verifies_as_specified() {
        for case in vectors() {
            let secrets: Vec<String> = case["secrets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().into())
                .collect();
            let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
            let headers = case["headers"].as_object().unwrap();
            let body = case["body"].as_str().unwrap().as_bytes();
            let got = verify_opsiq_v1(
                &refs,
                headers,
                case["request_target"].as_str().unwrap(),
                body,
                case["now"].as_i64().unwrap(),
            );
            let name = case["name"].as_str().unwrap();
            if case["valid"].as_bool().unwrap() {
                assert!(got.is_ok(), "{name}: {got:?}");
            } else {
                assert_eq!(
                    got.unwrap_err().reason(),
                    case["reason"].as_str().unwrap(),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn signing_reproduces_the_vector_signatures() {
        for case in vectors().into_iter().filter(|c| c["valid"].as_bool().unwrap()) {
            let h = &case["headers"];
            let expected = h["X-OpsIQ-Signature"].as_str().unwrap();
            let secret = case["secrets"][0].as_str().unwrap();
            let sig = signing::sign_opsiq_v1(
                secret,
                h["X-OpsIQ-Timestamp"].as_str().unwrap(),
                h["X-OpsIQ-Nonce"].as_str().unwrap(),
                h["Idempotency-Key"].as_str().unwrap(),
                case["request_target"].as_str().unwrap(),
                case["body"].as_str().unwrap().as_bytes(),
            );
            assert!(expected.contains(&sig), "{}", case["name"]);
        }
    }

    #[test]
    fn extreme_timestamps_are_out_of_window_not_a_crash() {
        let headers = [
            ("X-OpsIQ-Signature", "sha256=00"),
            ("X-OpsIQ-Timestamp", "-9223372036854775000"),
            ("X-OpsIQ-Nonce", "n"),
            ("Idempotency-Key", "k"),
        ];
        let err = verify_opsiq_v1(&["whsec_x"], headers.as_slice(), "/", b"x", i64::MAX).unwrap_err();
        assert_eq!(err, VerifyError::TimestampOutOfWindow);
        let err = verify_opsiq_v1(&["whsec_x"], headers.as_slice(), "/", b"x", i64::MIN).unwrap_err();
        assert_eq!(err, VerifyError::TimestampOutOfWindow);
    }

    #[test]
    fn a_replayed_nonce_is_refused() {
        let case = &vectors()[0];
        let verifier = Verifier::new([case["secrets"][0].as_str().unwrap().to_string()]);
        let headers = case["headers"].as_object().unwrap();
        let body = case["body"].as_str().unwrap().as_bytes();
        let now = case["now"].as_i64().unwrap();
        assert!(verifier.verify(headers, "/hooks/opsiq", body, now).is_ok());
        assert_eq!(
            verifier.verify(headers, "/hooks/opsiq", body, now).unwrap_err(),
            VerifyError::DuplicateNonce
        );
    }
}
