//! A caller's bearer token as the request path holds it: shared between the stages and the
//! access log without copies, never printed, and hashed at most once.
//!
//! The SHA-256 of the token is the only form in which it is used beyond the request: the key
//! of the validation caches, the input of the exchange cache key, and (its first 8 bytes) the
//! `caller` fingerprint of the access log. Hashing a kilobyte-long JWT is the largest single
//! cost of a cached request, so it happens once, on first use.

use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};

/// SHA-256 of a token.
pub type TokenDigest = [u8; 32];

/// SHA-256 of `token`.
pub fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// A short fingerprint of a token for logs: 16 hex digits of its SHA-256.
pub fn fingerprint(token: &str) -> String {
    hex::encode(&digest(token)[..8])
}

/// The caller's bearer token; cheap to clone (shared), its digest computed on first use.
#[derive(Clone)]
pub struct CallerToken(Arc<Inner>);

struct Inner {
    text: Arc<str>,
    digest: OnceLock<TokenDigest>,
}

impl CallerToken {
    pub fn new(text: Arc<str>) -> CallerToken {
        CallerToken(Arc::new(Inner {
            text,
            digest: OnceLock::new(),
        }))
    }

    pub fn as_str(&self) -> &str {
        &self.0.text
    }

    /// The token as shared text (the leak guard keeps a copy of the handle, not the bytes).
    pub fn shared(&self) -> &Arc<str> {
        &self.0.text
    }

    /// SHA-256 of the token, computed the first time it is asked for.
    pub fn digest(&self) -> &TokenDigest {
        self.0.digest.get_or_init(|| digest(&self.0.text))
    }

    /// The access log's `caller`: 16 hex digits of [`CallerToken::digest`].
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.digest()[..8])
    }
}

/// The token never prints.
impl std::fmt::Debug for CallerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallerToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_digest_serves_the_cache_and_the_fingerprint() {
        let token = CallerToken::new(Arc::from("a-caller-token"));
        assert_eq!(token.digest(), &digest("a-caller-token"));
        assert_eq!(token.fingerprint(), fingerprint("a-caller-token"));
        assert_eq!(token.fingerprint().len(), 16);
        assert_ne!(fingerprint("a"), fingerprint("b"));
        assert!(!format!("{token:?}").contains("a-caller-token"));
    }
}
