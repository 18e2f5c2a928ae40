//! Reading JWT claims without verifying them.
//!
//! The gateway reads `exp` from tokens to bound cache lifetimes (a cached exchange must never
//! outlive the subject token or the issued token). That needs the claims only; signature checks
//! happen at the STS, and in the inbound validator where configured.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Decodes the payload (second part) of a compact JWS as JSON, without verifying anything.
/// Returns `None` for anything that is not a three-part token with a JSON object payload.
pub fn unverified_claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

/// The `exp` claim (seconds since the epoch) of a JWT, if it is one and has a numeric `exp`.
pub fn unverified_exp(token: &str) -> Option<u64> {
    let claims = unverified_claims(token)?;
    let exp = claims.get("exp")?;
    exp.as_u64()
        .or_else(|| exp.as_f64().filter(|v| *v >= 0.0).map(|v| v as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(payload: &str) -> String {
        format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(payload))
    }

    #[test]
    fn reads_exp_from_a_jwt() {
        assert_eq!(
            unverified_exp(&token(r#"{"exp":1700000000}"#)),
            Some(1_700_000_000)
        );
        assert_eq!(unverified_exp(&token(r#"{"exp":17.5}"#)), Some(17));
    }

    #[test]
    fn opaque_or_odd_tokens_have_no_exp() {
        assert_eq!(unverified_exp("opaque-token"), None);
        assert_eq!(unverified_exp(&token(r#"{"exp":"soon"}"#)), None);
        assert_eq!(unverified_exp(&token(r#"{"exp":-5}"#)), None);
        assert_eq!(unverified_exp(&token("[1,2]")), None);
        assert_eq!(unverified_exp("a.b.c.d"), None);
    }
}
