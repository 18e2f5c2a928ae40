//! The issuer's public signing keys, fetched from its `jwks_uri` (RFC 7517 §5).
//!
//! A JWKS document is remote, hostile input: it is fetched with a deadline and a size cap,
//! parsed strictly at the document level and tolerantly per key. A key the validator cannot use
//! safely (encryption keys, symmetric keys, weak RSA moduli, unknown curves, algorithms outside
//! the allow-list) is dropped rather than failing the whole set, so one odd entry published by
//! the issuer does not take token validation down. A document with no usable key at all is an
//! error and the previously loaded set stays in force.

use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{BodyError, read_capped};

/// Deadline for one JWKS download, connect to last byte.
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document read; real sets are a few KiB.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// RFC 7518 §3.3: RSA keys used with RS*/PS* must be at least 2048 bits.
const MIN_RSA_MODULUS_BITS: usize = 2048;
/// Verification cost grows with the modulus; nothing legitimate publishes more than 8192 bits.
const MAX_RSA_MODULUS_BITS: usize = 8192;

/// The curve or key family a JWK belongs to, which fixes the algorithms it may verify
/// (RFC 7518 §3.4 ties ES256 to P-256 and ES384 to P-384; RFC 8037 §3.1 ties EdDSA to OKP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    fn fits(self, alg: Algorithm) -> bool {
        match self {
            KeyKind::Rsa => matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            KeyKind::P256 => alg == Algorithm::ES256,
            KeyKind::P384 => alg == Algorithm::ES384,
            KeyKind::Ed25519 => alg == Algorithm::EdDSA,
        }
    }
}

/// One usable public key.
struct VerificationKey {
    kid: Option<String>,
    kind: KeyKind,
    /// The JWK's own `alg`, when it names one; the key then verifies only that algorithm.
    alg: Option<Algorithm>,
    key: DecodingKey,
    /// Digest over kid, kind and key material: tells whether a refresh dropped this key.
    identity: [u8; 32],
}

impl VerificationKey {
    /// RFC 8725 §3.1: the key, not the token, decides which algorithm may be used with it.
    fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|own| own == alg)
    }
}

/// The outcome of looking a token's key up in a [`KeySet`].
pub(super) enum Selection<'a> {
    Key(&'a DecodingKey),
    /// The token names a `kid` the set does not contain: a refetch may help (key rotation).
    UnknownKid,
    /// The set cannot verify this token, and refetching would not change that.
    Unusable(&'static str),
}

/// A parsed, non-empty JWKS, immutable once built; replaced wholesale by a refresh.
pub(super) struct KeySet {
    keys: Vec<VerificationKey>,
    /// Increases with every successful fetch, so waiters can tell that a refetch happened.
    pub(super) generation: u64,
}

impl KeySet {
    /// Parses a JWKS document, keeping the keys that can verify one of `allowed`.
    pub(super) fn parse(body: &[u8], allowed: &[Algorithm]) -> Result<KeySet, String> {
        let document: Value =
            serde_json::from_slice(body).map_err(|_| "the JWKS is not valid JSON".to_owned())?;
        let keys = document
            .as_object()
            .and_then(|object| object.get("keys"))
            .and_then(Value::as_array)
            .ok_or_else(|| "the JWKS is not an object with a \"keys\" array".to_owned())?;
        let usable: Vec<VerificationKey> = keys
            .iter()
            .filter_map(Value::as_object)
            .filter_map(|jwk| parse_key(jwk, allowed))
            .collect();
        if usable.is_empty() {
            return Err(format!(
                "the JWKS has no usable signing key among {} entries",
                keys.len()
            ));
        }
        Ok(KeySet {
            keys: usable,
            generation: 0,
        })
    }

    /// Number of usable keys.
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Picks the key for a token signed with `alg` (already allow-listed, never HMAC).
    ///
    /// With a `kid` (RFC 7515 §4.1.4) only keys with that `kid` are considered. Without one the
    /// set must hold exactly one key that fits `alg`; guessing among several would let a token
    /// pick its own key.
    pub(super) fn select(&self, alg: Algorithm, kid: Option<&str>) -> Selection<'_> {
        match kid {
            Some(kid) => {
                let mut named = self
                    .keys
                    .iter()
                    .filter(|key| key.kid.as_deref() == Some(kid))
                    .peekable();
                if named.peek().is_none() {
                    return Selection::UnknownKid;
                }
                match named.find(|key| key.fits(alg)) {
                    Some(key) => Selection::Key(&key.key),
                    None => Selection::Unusable("the key named by kid does not fit the token alg"),
                }
            }
            None => {
                let mut fitting = self.keys.iter().filter(|key| key.fits(alg));
                match (fitting.next(), fitting.next()) {
                    (Some(key), None) => Selection::Key(&key.key),
                    (None, _) => Selection::Unusable("no key fits the token alg"),
                    (Some(_), Some(_)) => {
                        Selection::Unusable("no kid in the token and several keys fit its alg")
                    }
                }
            }
        }
    }

    /// True when some key of `self` is missing from `next`: tokens it signed must stop being
    /// served from the validation cache.
    pub(super) fn loses_keys_in(&self, next: &KeySet) -> bool {
        self.keys
            .iter()
            .any(|old| !next.keys.iter().any(|new| new.identity == old.identity))
    }
}

/// Downloads the JWKS at `uri`. The error is a short reason for logs.
pub(super) async fn fetch(http: &reqwest::Client, uri: &url::Url) -> Result<Vec<u8>, String> {
    let response = http
        .get(uri.clone())
        .timeout(JWKS_FETCH_TIMEOUT)
        .header(
            http::header::ACCEPT,
            "application/jwk-set+json, application/json",
        )
        .send()
        .await
        .map_err(|error| transport_reason(&error).to_owned())?;
    let status = response.status();
    if status != http::StatusCode::OK {
        return Err(format!(
            "the JWKS endpoint answered HTTP {}",
            status.as_u16()
        ));
    }
    read_capped(response, MAX_JWKS_BYTES)
        .await
        .map_err(|error| match error {
            BodyError::TooLarge => format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"),
            BodyError::Transport(error) => transport_reason(&error).to_owned(),
        })
}

fn transport_reason(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "the JWKS endpoint timed out"
    } else if error.is_connect() {
        "cannot connect to the JWKS endpoint"
    } else {
        "the JWKS request failed"
    }
}

/// One JWK (RFC 7517 §4) as a verification key, or `None` when it is not usable here.
fn parse_key(jwk: &Map<String, Value>, allowed: &[Algorithm]) -> Option<VerificationKey> {
    // RFC 7517 §4.2: only signature keys; an absent `use` does not restrict the key.
    match jwk.get("use") {
        None => {}
        Some(Value::String(usage)) if usage == "sig" => {}
        Some(_) => return None,
    }
    // RFC 7517 §4.3: when `key_ops` is given, it must allow verification.
    if let Some(operations) = jwk.get("key_ops") {
        let verifies = operations
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
        if !verifies {
            return None;
        }
    }
    let kid = match jwk.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return None,
    };
    let alg = match jwk.get("alg") {
        None => None,
        // Unknown names (including encryption algorithms such as RSA-OAEP) make the key unusable.
        Some(Value::String(name)) => Some(Algorithm::from_str(name).ok()?),
        Some(_) => return None,
    };

    let text = |name: &str| jwk.get(name).and_then(Value::as_str);
    let bytes = |name: &str| text(name).and_then(|value| URL_SAFE_NO_PAD.decode(value).ok());
    let (kind, key, material) = match text("kty")? {
        "RSA" => {
            let n = bytes("n")?;
            let e = bytes("e")?;
            let n = strip_leading_zeros(&n);
            let e = strip_leading_zeros(&e);
            // `n` has no leading zero byte left, so its first byte fixes the bit length.
            let bits = n.len() * 8 - n.first()?.leading_zeros() as usize;
            if !(MIN_RSA_MODULUS_BITS..=MAX_RSA_MODULUS_BITS).contains(&bits)
                || e.is_empty()
                || e.len() > 8
            {
                return None;
            }
            let material = [n, b"|", e].concat();
            (
                KeyKind::Rsa,
                DecodingKey::from_rsa_raw_components(n, e),
                material,
            )
        }
        "EC" => {
            let (kind, size) = match text("crv")? {
                "P-256" => (KeyKind::P256, 32),
                "P-384" => (KeyKind::P384, 48),
                _ => return None,
            };
            let x = bytes("x")?;
            let y = bytes("y")?;
            if x.len() != size || y.len() != size {
                return None;
            }
            // SEC 1 §2.3.3 uncompressed point, the form the verifier expects.
            let point = [&[0x04][..], &x, &y].concat();
            (kind, DecodingKey::from_ec_der(&point), point)
        }
        "OKP" => {
            if text("crv")? != "Ed25519" {
                return None;
            }
            let x = bytes("x")?;
            if x.len() != 32 {
                return None;
            }
            (KeyKind::Ed25519, DecodingKey::from_ed_der(&x), x)
        }
        // Symmetric (`oct`) keys never belong in a published set, and other types are unknown.
        _ => return None,
    };

    // Usable only if it can verify at least one allowed, asymmetric algorithm.
    let usable = allowed
        .iter()
        .any(|&candidate| kind.fits(candidate) && alg.is_none_or(|own| own == candidate));
    if !usable {
        return None;
    }

    let mut digest = Sha256::new();
    for part in [
        kid.as_deref().unwrap_or_default().as_bytes(),
        format!("{kind:?}").as_bytes(),
        &material,
    ] {
        digest.update((part.len() as u64).to_be_bytes());
        digest.update(part);
    }
    Some(VerificationKey {
        kid,
        kind,
        alg,
        key,
        identity: digest.finalize().into(),
    })
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes
        .iter()
        .position(|&byte| byte != 0)
        .unwrap_or(bytes.len());
    &bytes[first..]
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const ALLOWED: &[Algorithm] = &[Algorithm::RS256, Algorithm::ES256];

    fn ec_key(kid: &str) -> Value {
        json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode([1u8; 32]),
            "y": URL_SAFE_NO_PAD.encode([2u8; 32]),
        })
    }

    fn parse(document: Value) -> Result<KeySet, String> {
        KeySet::parse(document.to_string().as_bytes(), ALLOWED)
    }

    #[test]
    fn rejects_documents_that_are_not_key_sets() {
        for body in [
            &b"not json"[..],
            b"[]",
            b"{}",
            b"{\"keys\": {}}",
            b"{\"keys\": []}",
            b"{\"keys\": [1, \"a\", null]}",
            b"{\"keys\": []} trailing",
        ] {
            assert!(KeySet::parse(body, ALLOWED).is_err());
        }
    }

    #[test]
    fn drops_keys_that_are_not_usable_for_signatures() {
        let mut enc = ec_key("enc");
        enc["use"] = json!("enc");
        let mut no_verify = ec_key("ops");
        no_verify["key_ops"] = json!(["encrypt"]);
        let mut hmac = ec_key("hmac-alg");
        hmac["alg"] = json!("HS256");
        let mut odd_alg = ec_key("oaep");
        odd_alg["alg"] = json!("RSA-OAEP");
        let mut wrong_curve = ec_key("p521");
        wrong_curve["crv"] = json!("P-521");
        let mut short = ec_key("short");
        short["x"] = json!(URL_SAFE_NO_PAD.encode([1u8; 31]));
        let mut numeric_kid = ec_key("x");
        numeric_kid["kid"] = json!(7);
        let oct = json!({"kty": "oct", "k": "c2VjcmV0", "kid": "oct"});
        let weak_rsa = json!({
            "kty": "RSA", "kid": "weak",
            "n": URL_SAFE_NO_PAD.encode([0xffu8; 128]), "e": "AQAB",
        });
        let ed_not_allowed = json!({
            "kty": "OKP", "crv": "Ed25519", "kid": "ed",
            "x": URL_SAFE_NO_PAD.encode([3u8; 32]),
        });
        let document = json!({"keys": [
            enc, no_verify, hmac, odd_alg, wrong_curve, short, numeric_kid, oct, weak_rsa,
            ed_not_allowed,
        ]});
        assert!(parse(document).is_err());
    }

    #[test]
    fn keeps_usable_keys_and_ignores_the_rest() {
        let strong_rsa = json!({
            "kty": "RSA", "kid": "rsa",
            "n": URL_SAFE_NO_PAD.encode([0xffu8; 256]), "e": "AQAB",
        });
        let document = json!({"keys": [ec_key("a"), {"kty": "oct", "k": "AA"}, strong_rsa, 5]});
        let set = parse(document).unwrap();
        assert_eq!(set.len(), 2);
        assert!(matches!(
            set.select(Algorithm::ES256, Some("a")),
            Selection::Key(_)
        ));
        assert!(matches!(
            set.select(Algorithm::RS256, Some("a")),
            Selection::Unusable(_)
        ));
        assert!(matches!(
            set.select(Algorithm::ES256, Some("zzz")),
            Selection::UnknownKid
        ));
        assert!(matches!(
            set.select(Algorithm::RS256, None),
            Selection::Key(_)
        ));
        // A key declaring ES256 never verifies ES384, whatever the token says.
        assert!(matches!(
            set.select(Algorithm::ES384, Some("a")),
            Selection::Unusable(_)
        ));
    }

    #[test]
    fn without_kid_a_single_fitting_key_is_required() {
        let set = parse(json!({"keys": [ec_key("a"), ec_key("b")]})).unwrap();
        assert!(matches!(
            set.select(Algorithm::ES256, None),
            Selection::Unusable(_)
        ));
    }

    #[test]
    fn notices_dropped_and_replaced_keys() {
        let old = parse(json!({"keys": [ec_key("a"), ec_key("b")]})).unwrap();
        let same = parse(json!({"keys": [ec_key("b"), ec_key("a")]})).unwrap();
        let grown = parse(json!({"keys": [ec_key("a"), ec_key("b"), ec_key("c")]})).unwrap();
        let shrunk = parse(json!({"keys": [ec_key("a")]})).unwrap();
        let mut replaced_key = ec_key("b");
        replaced_key["y"] = json!(URL_SAFE_NO_PAD.encode([9u8; 32]));
        let replaced = parse(json!({"keys": [ec_key("a"), replaced_key]})).unwrap();
        assert!(!old.loses_keys_in(&same));
        assert!(!old.loses_keys_in(&grown));
        assert!(old.loses_keys_in(&shrunk));
        assert!(old.loses_keys_in(&replaced));
    }
}
