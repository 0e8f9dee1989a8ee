//! Small, audited primitives: random tokens, SHA-256, and encryption of secrets at rest with
//! AES-256-GCM under the master key. Nothing here logs or formats a secret.

use std::fmt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

/// Failures of the master key or of decrypting a stored secret.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The master key is missing or not 32 bytes of base64.
    #[error("master key: {0}")]
    MasterKey(String),
    /// A stored ciphertext did not decrypt: the master key changed or the row was altered.
    #[error("a stored secret could not be decrypted (wrong master key?)")]
    Decrypt,
}

/// Fills a fresh array with bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // The OS RNG failing is not recoverable and must not silently yield weak keys.
    getrandom::fill(&mut buf).expect("the operating system's random source is unavailable");
    buf
}

/// A URL-safe random token of `N` bytes of entropy.
pub fn random_token<const N: usize>() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<N>())
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The 32-byte key that encrypts secrets at rest, and the keys derived from it; its `Debug`
/// never shows them.
#[derive(Clone)]
pub struct MasterKey {
    cipher: Aes256Gcm,
    /// Keys the audit log's hash chain (see [`MasterKey::audit_chain_key`]).
    audit_chain: [u8; 32],
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// A key for one purpose derived from `master`: HMAC-SHA256 keyed by it over `label` (one
/// block of HKDF-Expand), so no derived key reveals the master key or another derived key.
fn derive_key(master: &[u8], label: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, KeyInit as _, Mac};
    let mut mac = Hmac::<Sha256>::new_from_slice(master).expect("HMAC accepts keys of any length");
    mac.update(label);
    mac.finalize().into_bytes().into()
}

impl MasterKey {
    /// Builds the key from base64 text (as stored in the key file or `OPSIQ_MASTER_KEY`).
    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| CryptoError::MasterKey("not valid base64".into()))?;
        if bytes.len() != 32 {
            return Err(CryptoError::MasterKey(format!(
                "must be 32 bytes, found {}",
                bytes.len()
            )));
        }
        let cipher =
            Aes256Gcm::new_from_slice(&bytes).map_err(|_| CryptoError::MasterKey("unusable key".into()))?;
        Ok(Self {
            cipher,
            audit_chain: derive_key(&bytes, b"opsiq audit chain v1"),
        })
    }

    /// The key of the audit log's chain: without it, rows edited in the database cannot be given
    /// hashes that verify.
    pub fn audit_chain_key(&self) -> &[u8; 32] {
        &self.audit_chain
    }

    /// A new random key and its base64 text.
    pub fn generate() -> (Self, String) {
        let text = STANDARD.encode(random_bytes::<32>());
        let key = Self::from_base64(&text).expect("32 random bytes are a valid key");
        (key, text)
    }

    /// Reads the key from `inline` (environment) or `file`; creates the file when
    /// `create_if_missing` and neither exists.
    pub fn load(
        inline: Option<&str>,
        file: &Path,
        create_if_missing: bool,
    ) -> Result<(Self, bool), CryptoError> {
        if let Some(text) = inline {
            return Ok((Self::from_base64(text)?, false));
        }
        match std::fs::read_to_string(file) {
            Ok(text) => Ok((Self::from_base64(&text)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create_if_missing => {
                let (key, text) = Self::generate();
                write_private_file(file, &text)
                    .map_err(|e| CryptoError::MasterKey(format!("cannot create {}: {e}", file.display())))?;
                Ok((key, true))
            }
            Err(e) => Err(CryptoError::MasterKey(format!(
                "cannot read {}: {e} (run `opsiq init` or set OPSIQ_MASTER_KEY)",
                file.display()
            ))),
        }
    }

    /// Encrypts `plaintext` with a fresh nonce; the result is `base64(nonce || ciphertext)`.
    pub fn seal(&self, plaintext: &str) -> String {
        let nonce_bytes = random_bytes::<12>();
        let nonce = Nonce::from(nonce_bytes);
        let ciphertext = self
            .cipher
            .encrypt(&nonce, plaintext.as_bytes())
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&ciphertext);
        STANDARD.encode(out)
    }

    /// Decrypts what [`seal`](Self::seal) produced.
    pub fn open(&self, sealed: &str) -> Result<String, CryptoError> {
        let bytes = STANDARD.decode(sealed).map_err(|_| CryptoError::Decrypt)?;
        if bytes.len() < 12 {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| CryptoError::Decrypt)?;
        let plaintext = self
            .cipher
            .decrypt(&Nonce::from(nonce), ciphertext)
            .map_err(|_| CryptoError::Decrypt)?;
        String::from_utf8(plaintext).map_err(|_| CryptoError::Decrypt)
    }
}

/// Writes a file readable only by its owner (the master key must not be world-readable).
fn write_private_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

/// Installs rustls' `ring` provider for outbound TLS once per process (reqwest needs one).
pub fn install_tls_provider() {
    // Fails only when a provider is already installed, which is what we want anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_round_trip_and_detect_tampering() {
        let (key, _) = MasterKey::generate();
        let sealed = key.seal("whsec_abc");
        assert_ne!(sealed, key.seal("whsec_abc"), "nonces must differ");
        assert_eq!(key.open(&sealed).unwrap(), "whsec_abc");
        let (other, _) = MasterKey::generate();
        assert!(other.open(&sealed).is_err());
        assert!(key.open("AAAA").is_err());
    }
}
