//! JWT client assertions for `private_key_jwt` and `client_secret_jwt` (RFC 7523 §2.2,
//! OpenID Connect Core §9).
//!
//! The signing key is loaded once at config load; each STS call signs a fresh assertion with a
//! unique `jti` and a short lifetime, so a captured assertion is useless soon after.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::secret::Secret;

/// `client_assertion_type` for JWT client authentication (RFC 7523 §2.2).
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Lifetime of one assertion. Short: it is used once, immediately.
const ASSERTION_LIFETIME_SECS: u64 = 60;

/// A client assertion could not be signed. The key signed a probe at config load, so this is
/// the signing library refusing it later; the STS is not called.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot sign the client assertion: {0}")]
pub struct SigningError(#[from] jsonwebtoken::errors::Error);

/// A key that signs client assertions.
pub struct AssertionSigner {
    key: EncodingKey,
    alg: Algorithm,
    kid: Option<String>,
}

impl std::fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AssertionSigner({:?}, <key redacted>)", self.alg)
    }
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: u64,
    exp: u64,
}

impl AssertionSigner {
    /// `private_key_jwt`: an RSA or EC (P-256/P-384) private key in PEM. The algorithm is
    /// `alg` when given, else RS256 for RSA and ES256/ES384 for EC keys.
    pub fn from_pem_file(
        path: &Path,
        alg: Option<Algorithm>,
        kid: Option<String>,
    ) -> Result<AssertionSigner, String> {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read \"{}\": {e}", path.display()))?;
        let text = String::from_utf8_lossy(&pem);
        let is_ec = text.contains("BEGIN EC PRIVATE KEY") || {
            // PKCS#8 does not name the key type in its armor; try EC first, then RSA.
            text.contains("BEGIN PRIVATE KEY") && EncodingKey::from_ec_pem(&pem).is_ok()
        };
        let (key, default_alg) = if is_ec {
            let key = EncodingKey::from_ec_pem(&pem).map_err(|e| {
                format!("\"{}\" is not a usable EC private key: {e}", path.display())
            })?;
            (key, Algorithm::ES256)
        } else {
            let key = EncodingKey::from_rsa_pem(&pem).map_err(|e| {
                format!(
                    "\"{}\" is not a PEM RSA or EC private key: {e}",
                    path.display()
                )
            })?;
            (key, Algorithm::RS256)
        };
        let alg = alg.unwrap_or(default_alg);
        let fits = match alg {
            Algorithm::ES256 | Algorithm::ES384 => is_ec,
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => !is_ec,
            _ => false,
        };
        if !fits {
            return Err(format!(
                "algorithm {alg:?} does not fit the {} key in \"{}\"",
                if is_ec { "EC" } else { "RSA" },
                path.display()
            ));
        }
        let signer = AssertionSigner { key, alg, kid };
        // Sign once now so a key that cannot sign fails at load, not on the first request.
        signer
            .sign("probe", "https://probe.invalid/token")
            .map_err(|e| e.to_string())?;
        Ok(signer)
    }

    /// `client_secret_jwt`: HMAC with the client secret (HS256 unless `alg` says otherwise).
    pub fn from_secret(secret: &Secret, alg: Option<Algorithm>) -> Result<AssertionSigner, String> {
        let alg = alg.unwrap_or(Algorithm::HS256);
        if !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(format!(
                "client_secret_jwt signs with HS256/HS384/HS512, not {alg:?}"
            ));
        }
        Ok(AssertionSigner {
            key: EncodingKey::from_secret(secret.expose().as_bytes()),
            alg,
            kid: None,
        })
    }

    /// A fresh assertion for `client_id` at `audience` (the token endpoint URL).
    pub fn sign(&self, client_id: &str, audience: &str) -> Result<String, SigningError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = AssertionClaims {
            iss: client_id,
            sub: client_id,
            aud: audience,
            jti: hex::encode(rand::random::<[u8; 16]>()),
            iat: now,
            exp: now + ASSERTION_LIFETIME_SECS,
        };
        let mut header = Header::new(self.alg);
        header.kid = self.kid.clone();
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_assertions_carry_the_rfc_7523_claims() {
        let signer = AssertionSigner::from_secret(&Secret::new("s3cret"), None).unwrap();
        let a = signer
            .sign("gateway", "https://sts.example.com/token")
            .unwrap();
        let b = signer
            .sign("gateway", "https://sts.example.com/token")
            .unwrap();
        let claims = crate::jwt::unverified_claims(&a).unwrap();
        assert_eq!(claims["iss"], "gateway");
        assert_eq!(claims["sub"], "gateway");
        assert_eq!(claims["aud"], "https://sts.example.com/token");
        let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
        assert_eq!(lifetime, ASSERTION_LIFETIME_SECS);
        let other = crate::jwt::unverified_claims(&b).unwrap();
        assert_ne!(
            claims["jti"], other["jti"],
            "every assertion has its own jti"
        );
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.set_audience(&["https://sts.example.com/token"]);
        jsonwebtoken::decode::<serde_json::Value>(
            &a,
            &jsonwebtoken::DecodingKey::from_secret(b"s3cret"),
            &validation,
        )
        .unwrap();
    }

    #[test]
    fn secret_assertions_refuse_asymmetric_algorithms() {
        assert!(AssertionSigner::from_secret(&Secret::new("x"), Some(Algorithm::RS256)).is_err());
    }
}
