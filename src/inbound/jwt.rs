//! Local validation of JWT bearer tokens against the issuer's published keys.
//!
//! A JWT is checked without calling anyone on the request path: the signature against the
//! issuer's JWKS (fetched at start, refreshed in the background, and refetched once, throttled,
//! for an unknown `kid`), then `alg`, `iss`, `aud`, `exp`, `nbf` and `iat` (RFC 7519, RFC 8725).
//! Only asymmetric algorithms are accepted, so a published public key can never serve as an
//! HMAC secret. The validator is its own module because none of this is shared with
//! introspection, which asks the issuer instead.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, Validation};
use moka::future::Cache;
use serde_json::{Map, Value};
use tokio::sync::watch;

use super::jwks::{self, KeySet, Selection};
use super::{
    Cached, InboundError, TokenDigest, ValidatedToken, check_size, invalid, new_cache, now_secs,
    numeric_date, redacted, ttl_until,
};

pub use crate::config::inbound::JwtSettings;
/// A cached validation is re-checked at least this often even when the token lives longer;
/// re-verifying a signature once a day costs nothing and keeps the cache free of forever-entries.
const MAX_CACHE_TTL: Duration = Duration::from_secs(24 * 3600);
/// First delay before the background refresher retries a failed fetch; doubles up to the
/// refresh interval.
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Floor for the refresh interval, so a zero in the settings cannot spin the refresher.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Largest leeway honoured. More than a day of clock skew is a misconfiguration, and the
/// library's `now - leeway` must never underflow.
const MAX_LEEWAY: Duration = Duration::from_secs(24 * 3600);

/// Local JWT validation against the issuer's JWKS. Build it once per issuer configuration,
/// call [`JwtValidator::refresh`] at start and keep it fresh with
/// [`JwtValidator::spawn_refresher`].
pub struct JwtValidator {
    settings: JwtSettings,
    http: reqwest::Client,
    /// Claim checks for each allowed asymmetric algorithm; a token is checked against exactly
    /// the entry of its own `alg`.
    checks: Vec<(Algorithm, Validation)>,
    /// The current key set; `None` until the first successful fetch. Readers clone the `Arc`
    /// under a brief read lock and never hold it across an await.
    keys: watch::Sender<Option<Arc<KeySet>>>,
    /// Single flight for unknown-`kid` refetches: the last attempt's time and outcome.
    refetch: tokio::sync::Mutex<Option<RefetchAttempt>>,
    cache: Cache<TokenDigest, Cached>,
    /// Bumped whenever a refresh drops a key; cached validations made before are not served.
    key_removals: AtomicU64,
    fetches: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct RefetchAttempt {
    at: Instant,
    succeeded: bool,
}

impl std::fmt::Debug for JwtValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtValidator")
            .field("issuer", &self.settings.issuer)
            .field("jwks_uri", &redacted(&self.settings.jwks_uri))
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl JwtValidator {
    /// Builds a validator that has no keys yet (not ready). Called once per inbound JWT
    /// configuration at start; `http` comes from [`crate::exchange::http_client`].
    pub fn new(settings: JwtSettings, http: reqwest::Client) -> JwtValidator {
        let leeway = settings.leeway.min(MAX_LEEWAY).as_secs();
        let mut checks: Vec<(Algorithm, Validation)> = Vec::new();
        for &alg in &settings.algorithms {
            // RFC 8725 §2.1, §3.1: an HMAC alg would turn a public key into a shared secret.
            if alg.family() == AlgorithmFamily::Hmac || checks.iter().any(|(a, _)| *a == alg) {
                continue;
            }
            let mut validation = Validation::new(alg);
            validation.leeway = leeway;
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.set_issuer(&[settings.issuer.as_str()]);
            if settings.audiences.is_empty() {
                validation.validate_aud = false;
                validation.set_required_spec_claims(&["exp", "iss"]);
            } else {
                validation.set_audience(&settings.audiences);
                validation.set_required_spec_claims(&["exp", "iss", "aud"]);
            }
            checks.push((alg, validation));
        }
        JwtValidator {
            cache: new_cache(settings.max_cached),
            settings,
            http,
            checks,
            keys: watch::Sender::new(None),
            refetch: tokio::sync::Mutex::new(None),
            key_removals: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
        }
    }

    /// Fetches the JWKS now and installs it. Called at start (readiness waits for the first
    /// success), by the background refresher, and for unknown `kid`s. On failure the previous
    /// key set stays in force, the failure is logged at warn, and `Unavailable` is returned.
    pub async fn refresh(&self) -> Result<(), InboundError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let fetched = match jwks::fetch(&self.http, &self.settings.jwks_uri).await {
            Ok(body) => KeySet::parse(&body, &self.settings.algorithms),
            Err(reason) => Err(reason),
        };
        let set = match fetched {
            Ok(set) => set,
            Err(reason) => {
                tracing::warn!(
                    issuer = %self.settings.issuer,
                    jwks_uri = %redacted(&self.settings.jwks_uri),
                    %reason,
                    "JWKS refresh failed; the previous key set, if any, stays in use"
                );
                return Err(InboundError::Unavailable(reason));
            }
        };
        let count = set.len();
        let mut lost_keys = false;
        self.keys.send_modify(|slot| {
            let mut set = set;
            match slot {
                Some(previous) => {
                    lost_keys = previous.loses_keys_in(&set);
                    set.generation = previous.generation.wrapping_add(1);
                }
                None => set.generation = 1,
            }
            *slot = Some(Arc::new(set));
        });
        if lost_keys {
            // After the swap: a validation that read the old counter may have used an old key,
            // and its cache entry will not match the new counter.
            self.key_removals.fetch_add(1, Ordering::SeqCst);
            tracing::info!(
                issuer = %self.settings.issuer,
                keys = count,
                "JWKS refresh removed keys; cached validations are re-checked"
            );
        } else {
            tracing::debug!(issuer = %self.settings.issuer, keys = count, "JWKS refreshed");
        }
        Ok(())
    }

    /// Where the keys come from (for configuration warnings; never logged with a query).
    pub fn jwks_uri(&self) -> &url::Url {
        &self.settings.jwks_uri
    }

    /// The accepted `aud` values; empty when `aud` is not checked.
    pub fn audiences(&self) -> &[String] {
        &self.settings.audiences
    }

    /// True once a JWKS has been fetched successfully at least once.
    pub fn is_ready(&self) -> bool {
        self.keys.borrow().is_some()
    }

    /// Resolves once a JWKS has been fetched successfully (immediately if it already was).
    /// For readiness probes and start-up code that waits for the background refresher.
    pub async fn wait_ready(&self) {
        let mut keys = self.keys.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = keys.wait_for(Option::is_some).await;
    }

    /// Number of JWKS downloads attempted so far (start, background and unknown-`kid`
    /// refetches), for tests and diagnostics.
    pub fn jwks_fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Spawns the periodic refresh on the current tokio runtime (call it from within one).
    ///
    /// If no JWKS has been loaded yet the first fetch happens immediately and failures are
    /// retried after 1 s, doubling up to `refresh_interval`; once loaded, the set is refreshed
    /// every `refresh_interval` (at least 1 s). The task stops when the returned guard is
    /// dropped, or when the last `Arc` to the validator is dropped.
    pub fn spawn_refresher(self: &Arc<Self>) -> RefresherGuard {
        let validator = Arc::downgrade(self);
        let interval = self.settings.refresh_interval.max(MIN_REFRESH_INTERVAL);
        let mut delay = if self.is_ready() {
            interval
        } else {
            Duration::ZERO
        };
        let task = tokio::spawn(async move {
            let mut retry = FIRST_RETRY_DELAY.min(interval);
            loop {
                tokio::time::sleep(delay).await;
                let Some(validator) = validator.upgrade() else {
                    return;
                };
                if validator.refresh().await.is_ok() {
                    delay = interval;
                    retry = FIRST_RETRY_DELAY.min(interval);
                } else {
                    delay = retry;
                    retry = retry.saturating_mul(2).min(interval);
                }
            }
        });
        RefresherGuard { task }
    }

    /// Validates a compact JWS (RFC 7515 §7.1) carrying JWT claims (RFC 7519 §7.2).
    ///
    /// Successful results are cached by SHA-256 of the token until the token's `exp` (at most
    /// a day, bounded by `max_cached`); failures are not cached. A cached result stops being
    /// served as soon as a JWKS refresh drops any key.
    pub async fn validate(&self, token: &str) -> Result<Arc<ValidatedToken>, InboundError> {
        self.validate_digested(token, &crate::token::digest(token))
            .await
    }

    /// [`JwtValidator::validate`] for a token whose SHA-256 the caller already has.
    pub async fn validate_digested(
        &self,
        token: &str,
        digest: &TokenDigest,
    ) -> Result<Arc<ValidatedToken>, InboundError> {
        check_size(token)?;
        let digest = *digest;
        if let Some(hit) = self.cache.get(&digest).await {
            if hit.epoch == self.key_removals.load(Ordering::SeqCst)
                && hit.token.exp.is_some_and(|exp| exp > now_secs())
            {
                return Ok(hit.token);
            }
            self.cache.invalidate(&digest).await;
        }
        // Read before the key set, so a concurrent key removal always invalidates this entry.
        let epoch = self.key_removals.load(Ordering::SeqCst);
        let validated = Arc::new(self.verify(token).await?);
        let ttl = ttl_until(validated.exp, now_secs(), MAX_CACHE_TTL);
        if !ttl.is_zero() {
            let entry = Cached {
                token: Arc::clone(&validated),
                ttl,
                epoch,
            };
            self.cache.insert(digest, entry).await;
        }
        Ok(validated)
    }

    async fn verify(&self, token: &str) -> Result<ValidatedToken, InboundError> {
        let header = JwsHeader::parse(token)?;
        // RFC 8725 §3.11: explicit typing keeps a token of one kind from passing as another.
        if let Some(wanted) = &self.settings.typ {
            let typ = header.typ.as_deref().unwrap_or_default();
            let typ = typ
                .get(..12)
                .filter(|p| p.eq_ignore_ascii_case("application/"))
                .map_or(typ, |_| &typ[12..]);
            if !typ.eq_ignore_ascii_case(wanted) {
                return Err(invalid("wrong typ"));
            }
        }
        let checks = self
            .checks
            .iter()
            .find(|(alg, _)| *alg == header.alg)
            .map(|(_, checks)| checks)
            .ok_or_else(|| invalid("the token alg is not in the allow-list"))?;
        let keys = self
            .current_keys()
            .ok_or_else(|| InboundError::Unavailable("the JWKS has not been loaded yet".into()))?;
        let key = match keys.select(header.alg, header.kid.as_deref()) {
            Selection::Key(key) => key.clone(),
            Selection::Unusable(reason) => return Err(invalid(reason)),
            Selection::UnknownKid => {
                let fresh = self.refetch_for_unknown_kid(keys.generation).await?;
                match fresh.select(header.alg, header.kid.as_deref()) {
                    Selection::Key(key) => key.clone(),
                    Selection::Unusable(reason) => return Err(invalid(reason)),
                    Selection::UnknownKid => return Err(invalid("unknown kid")),
                }
            }
        };

        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, checks)
            .map_err(|error| invalid(rejection(error.kind())))?
            .claims;

        // RFC 7519 §4.1.1: `iss` is a single StringOrURI; the library would also take an array.
        if claims.get("iss").and_then(Value::as_str) != Some(self.settings.issuer.as_str()) {
            return Err(invalid("wrong issuer"));
        }
        let now = now_secs();
        let leeway = self.settings.leeway.min(MAX_LEEWAY).as_secs();
        if claims.get("exp").and_then(numeric_date).is_none() {
            return Err(invalid("malformed exp"));
        }
        // RFC 7519 §4.1.6: a token issued in the future comes from a broken or hostile clock.
        if let Some(iat) = claims.get("iat") {
            let iat = numeric_date(iat).ok_or_else(|| invalid("malformed iat"))?;
            if iat > now.saturating_add(leeway) {
                return Err(invalid("issued in the future (iat)"));
            }
        }
        Ok(ValidatedToken::from_claims(claims))
    }

    fn current_keys(&self) -> Option<Arc<KeySet>> {
        self.keys.borrow().clone()
    }

    /// Refetches the JWKS for a token whose `kid` is not in the set of generation `seen`
    /// (RFC 7517 §4.5: a new `kid` usually means the issuer rotated keys).
    ///
    /// Concurrent callers queue on one lock: the first one fetches, the others find a newer
    /// generation and reuse it. Refetches happen at most once per `min_refetch_interval`, so a
    /// stream of made-up `kid`s cannot turn the gateway into a JWKS load generator.
    async fn refetch_for_unknown_kid(&self, seen: u64) -> Result<Arc<KeySet>, InboundError> {
        let mut last = self.refetch.lock().await;
        if let Some(current) = self.current_keys()
            && current.generation != seen
        {
            return Ok(current);
        }
        if let Some(attempt) = *last
            && attempt.at.elapsed() < self.settings.min_refetch_interval
        {
            return Err(if attempt.succeeded {
                invalid("unknown kid")
            } else {
                InboundError::Unavailable("unknown kid and the JWKS could not be refetched".into())
            });
        }
        let outcome = self.refresh().await;
        *last = Some(RefetchAttempt {
            at: Instant::now(),
            succeeded: outcome.is_ok(),
        });
        drop(last);
        outcome?;
        self.current_keys()
            .ok_or_else(|| InboundError::Unavailable("the JWKS has not been loaded yet".into()))
    }
}

/// Keeps the background JWKS refresher of [`JwtValidator::spawn_refresher`] running; dropping
/// it stops the task.
#[derive(Debug)]
pub struct RefresherGuard {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RefresherGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The parts of a JWS protected header (RFC 7515 §4.1) that decide how it is verified.
struct JwsHeader {
    alg: Algorithm,
    kid: Option<String>,
    /// `typ` (RFC 7515 §4.1.9), compared case-insensitively without an `application/` prefix.
    typ: Option<String>,
}

impl JwsHeader {
    fn parse(token: &str) -> Result<JwsHeader, InboundError> {
        let mut parts = token.split('.');
        // RFC 7515 §7.1: exactly three parts; five would be a JWE, which this gateway never
        // decrypts.
        let (Some(header), Some(_payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("not a compact JWS"));
        };
        let header = URL_SAFE_NO_PAD
            .decode(header)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
        let Some(Value::Object(header)) = header else {
            return Err(invalid("malformed JOSE header"));
        };
        let Some(Value::String(alg)) = header.get("alg") else {
            return Err(invalid("missing alg"));
        };
        // RFC 8725 §2.1, §3.1: an unsecured JWS is never accepted, whatever the spelling.
        if alg.eq_ignore_ascii_case("none") {
            return Err(invalid("alg none is never accepted"));
        }
        let alg = Algorithm::from_str(alg).map_err(|_| invalid("unsupported alg"))?;
        // RFC 8725 §2.1, §3.1: verifying HS* with a published public key as the HMAC secret is
        // the classic key-confusion forgery; this validator only trusts asymmetric keys.
        if alg.family() == AlgorithmFamily::Hmac {
            return Err(invalid("HMAC algs are not accepted"));
        }
        // RFC 7515 §4.1.11: critical extensions must be understood, and none are.
        if header.contains_key("crit") {
            return Err(invalid("crit header parameters are not supported"));
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => return Err(invalid("malformed kid")),
        };
        let typ = match header.get("typ") {
            None => None,
            Some(Value::String(typ)) => Some(typ.clone()),
            Some(_) => return Err(invalid("malformed typ")),
        };
        // `jku`, `x5u`, `jwk` and `x5c` are ignored: keys come only from the configured JWKS,
        // never from locations the token names (RFC 8725 §3.10).
        Ok(JwsHeader { alg, kid, typ })
    }
}

/// A short, token-free description of why the library refused a token.
fn rejection(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::ImmatureSignature => "not valid yet (nbf)".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        // The claim names come from our own required set: exp, iss or aud.
        ErrorKind::MissingRequiredClaim(claim) => format!("missing or malformed {claim}"),
        ErrorKind::InvalidClaimFormat(claim) => format!("malformed {claim}"),
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            "alg does not match the key".into()
        }
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => "the selected key cannot verify".into(),
        _ => "malformed token".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicU64;

    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    };
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::super::MAX_TOKEN_BYTES;
    use super::super::test_support::{closed_address, http, serve};
    use super::*;

    const ISSUER: &str = "https://issuer.example";

    fn b64(bytes: impl AsRef<[u8]>) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// An EC signing key and its public JWK.
    struct EcKey {
        kid: String,
        alg: Algorithm,
        encoding: EncodingKey,
        point: Vec<u8>,
        jwk: Value,
    }

    fn ec_key(kid: &str, alg: Algorithm) -> EcKey {
        let (signing, crv, size) = match alg {
            Algorithm::ES256 => (&ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32),
            _ => (&ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48),
        };
        let pair = EcdsaKeyPair::generate(signing).unwrap();
        let pkcs8 = pair.to_pkcs8v1().unwrap();
        let point = pair.public_key().as_ref().to_vec();
        let (x, y) = point[1..].split_at(size);
        let jwk = json!({
            "kty": "EC", "crv": crv, "kid": kid, "use": "sig", "alg": format!("{alg:?}"),
            "x": b64(x), "y": b64(y),
        });
        EcKey {
            kid: kid.to_owned(),
            alg,
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            point,
            jwk,
        }
    }

    impl EcKey {
        fn sign(&self, claims: &Value) -> String {
            let mut header = Header::new(self.alg);
            header.kid = Some(self.kid.clone());
            jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
        }

        fn sign_without_kid(&self, claims: &Value) -> String {
            jsonwebtoken::encode(&Header::new(self.alg), claims, &self.encoding).unwrap()
        }
    }

    /// A JWKS endpoint whose key set the test controls and whose GETs it counts.
    #[derive(Default)]
    struct JwksServer {
        keys: Mutex<Vec<Value>>,
        hits: AtomicU64,
        /// Number of upcoming requests answered with 500.
        failures: AtomicU64,
    }

    impl JwksServer {
        async fn start(keys: Vec<Value>) -> (Arc<JwksServer>, url::Url) {
            let server = Arc::new(JwksServer {
                keys: Mutex::new(keys),
                ..JwksServer::default()
            });
            let router = axum::Router::new()
                .route("/jwks", get(jwks))
                .with_state(Arc::clone(&server));
            let address = serve(router).await;
            let url = url::Url::parse(&format!("http://{address}/jwks")).unwrap();
            (server, url)
        }

        fn set_keys(&self, keys: Vec<Value>) {
            *self.keys.lock().unwrap() = keys;
        }

        fn hits(&self) -> u64 {
            self.hits.load(Ordering::SeqCst)
        }
    }

    async fn jwks(State(server): State<Arc<JwksServer>>) -> Response {
        server.hits.fetch_add(1, Ordering::SeqCst);
        let failing = server
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if failing {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        let keys = server.keys.lock().unwrap().clone();
        axum::Json(json!({ "keys": keys })).into_response()
    }

    fn claims() -> Value {
        let now = now_secs();
        json!({
            "iss": ISSUER, "sub": "alice", "aud": "api", "client_id": "web",
            "iat": now, "exp": now + 300, "scope": "read",
        })
    }

    fn with(mut claims: Value, name: &str, value: Value) -> Value {
        claims[name] = value;
        claims
    }

    fn without(mut claims: Value, name: &str) -> Value {
        if let Some(object) = claims.as_object_mut() {
            object.remove(name);
        }
        claims
    }

    /// A validator for ISSUER that has loaded the JWKS at `url`.
    async fn loaded(settings: JwtSettings) -> Arc<JwtValidator> {
        let validator = Arc::new(JwtValidator::new(settings, http()));
        validator.refresh().await.unwrap();
        validator
    }

    fn assert_invalid(result: Result<Arc<ValidatedToken>, InboundError>, fragment: &str) {
        match result {
            Err(InboundError::Invalid(reason)) => {
                assert!(reason.contains(fragment), "{reason:?} lacks {fragment:?}")
            }
            other => panic!("expected Invalid({fragment:?}), got {other:?}"),
        }
    }

    #[tokio::test]
    async fn accepts_a_valid_token_and_serves_the_second_check_from_cache() {
        let key = ec_key("k1", Algorithm::ES256);
        let (server, url) = JwksServer::start(vec![key.jwk.clone()]).await;
        let validator = loaded(JwtSettings::new(ISSUER, url)).await;
        assert!(validator.is_ready());
        assert_eq!((validator.jwks_fetches(), server.hits()), (1, 1));

        let token = key.sign(&claims());
        let first = validator.validate(&token).await.unwrap();
        assert_eq!(first.sub.as_deref(), Some("alice"));
        assert_eq!(first.client_id.as_deref(), Some("web"));
        assert!(first.exp.is_some_and(|exp| exp > now_secs()));
        assert_eq!(first.claims["scope"], "read");

        let second = validator.validate(&token).await.unwrap();
        assert!(Arc::ptr_eq(&first, &second), "not served from the cache");
        assert_eq!((validator.jwks_fetches(), server.hits()), (1, 1));
    }

    #[tokio::test]
    async fn checks_exp_nbf_and_iat_with_leeway() {
        let key = ec_key("k1", Algorithm::ES256);
        let (_server, url) = JwksServer::start(vec![key.jwk.clone()]).await;
        let validator = loaded(JwtSettings::new(ISSUER, url)).await;
        let now = now_secs();

        let expired = key.sign(&with(claims(), "exp", json!(now - 120)));
        assert_invalid(validator.validate(&expired).await, "expired");

        // Expired 10 s ago, inside the 30 s leeway: accepted, but never cached past `exp`.
        let lenient = key.sign(&with(claims(), "exp", json!(now - 10)));
        let first = validator.validate(&lenient).await.unwrap();
        let second = validator.validate(&lenient).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &second));

        let missing_exp = key.sign(&without(claims(), "exp"));
        assert_invalid(validator.validate(&missing_exp).await, "exp");
        let string_exp = key.sign(&with(claims(), "exp", json!("tomorrow")));
        assert_invalid(validator.validate(&string_exp).await, "exp");

        let immature = key.sign(&with(claims(), "nbf", json!(now + 120)));
        assert_invalid(validator.validate(&immature).await, "nbf");
        let almost = key.sign(&with(claims(), "nbf", json!(now + 10)));
        validator.validate(&almost).await.unwrap();

        let future_iat = key.sign(&with(claims(), "iat", json!(now + 120)));
        assert_invalid(validator.validate(&future_iat).await, "iat");
        let odd_iat = key.sign(&with(claims(), "iat", json!("now")));
        assert_invalid(validator.validate(&odd_iat).await, "iat");
        let skewed_iat = key.sign(&with(claims(), "iat", json!(now + 10)));
        validator.validate(&skewed_iat).await.unwrap();
    }

    #[tokio::test]
    async fn checks_issuer_and_audience() {
        let key = ec_key("k1", Algorithm::ES256);
        let (_server, url) = JwksServer::start(vec![key.jwk.clone()]).await;
        let mut settings = JwtSettings::new(ISSUER, url.clone());
        settings.audiences = vec!["api".into(), "other-api".into()];
        let validator = loaded(settings).await;

        let wrong_iss = key.sign(&with(claims(), "iss", json!("https://evil.example")));
        assert_invalid(validator.validate(&wrong_iss).await, "issuer");
        let array_iss = key.sign(&with(claims(), "iss", json!([ISSUER])));
        assert_invalid(validator.validate(&array_iss).await, "iss");
        let no_iss = key.sign(&without(claims(), "iss"));
        assert_invalid(validator.validate(&no_iss).await, "iss");

        let wrong_aud = key.sign(&with(claims(), "aud", json!("somebody-else")));
        assert_invalid(validator.validate(&wrong_aud).await, "audience");
        let no_aud = key.sign(&without(claims(), "aud"));
        assert_invalid(validator.validate(&no_aud).await, "aud");
        let empty_aud = key.sign(&with(claims(), "aud", json!([])));
        assert_invalid(validator.validate(&empty_aud).await, "aud");
        let array_aud = key.sign(&with(claims(), "aud", json!(["x", "other-api"])));
        validator.validate(&array_aud).await.unwrap();

        // Without configured audiences, `aud` is not checked at all.
        let any_audience = loaded(JwtSettings::new(ISSUER, url)).await;
        any_audience.validate(&wrong_aud).await.unwrap();
        any_audience.validate(&no_aud).await.unwrap();
    }

    #[tokio::test]
    async fn refuses_alg_none_hmac_confusion_and_algs_outside_the_allow_list() {
        let p256 = ec_key("k1", Algorithm::ES256);
        let p384 = ec_key("k2", Algorithm::ES384);
        let (server, url) = JwksServer::start(vec![p256.jwk.clone(), p384.jwk.clone()]).await;
        let mut settings = JwtSettings::new(ISSUER, url);
        // Listing HS256 must not enable it.
        settings.algorithms = vec![Algorithm::ES256, Algorithm::HS256];
        let validator = loaded(settings).await;

        let payload = b64(claims().to_string());
        for header in [
            json!({"alg": "none", "typ": "JWT"}),
            json!({"alg": "none", "kid": "k1"}),
            json!({"alg": "None"}),
            json!({"alg": "NONE"}),
        ] {
            let unsigned = format!("{}.{payload}.", b64(header.to_string()));
            assert_invalid(validator.validate(&unsigned).await, "none");
        }

        // The classic forgery: HS256 keyed with the issuer's public key, in every form an
        // attacker could fetch it.
        let jwk_text = p256.jwk.to_string();
        for secret in [&p256.point[..], jwk_text.as_bytes()] {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some("k1".into());
            let forged =
                jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(secret))
                    .unwrap();
            assert_invalid(validator.validate(&forged).await, "HMAC");
        }

        // ES384 is a fine algorithm with a published key, but not on the allow-list.
        let es384 = p384.sign(&claims());
        assert_invalid(validator.validate(&es384).await, "allow-list");

        // A token claiming ES384 while naming the P-256 key.
        let mismatched = {
            let mut header = Header::new(Algorithm::ES384);
            header.kid = Some("k1".into());
            jsonwebtoken::encode(&header, &claims(), &p384.encoding).unwrap()
        };
        let both = loaded({
            let mut settings = JwtSettings::new(ISSUER, validator.settings.jwks_uri.clone());
            settings.algorithms = vec![Algorithm::ES256, Algorithm::ES384];
            settings
        })
        .await;
        assert_invalid(both.validate(&mismatched).await, "does not fit");
        both.validate(&es384).await.unwrap();
        // None of this needed a refetch.
        assert_eq!(server.hits(), 2);
    }

    #[tokio::test]
    async fn refuses_tampered_tokens() {
        let key = ec_key("k1", Algorithm::ES256);
        let (_server, url) = JwksServer::start(vec![key.jwk.clone()]).await;
        let validator = loaded(JwtSettings::new(ISSUER, url)).await;
        let token = key.sign(&claims());

        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let signature = parts[2].clone();
        let middle = signature.len() / 2;
        let flipped = if &signature[middle..=middle] == "A" {
            "B"
        } else {
            "A"
        };
        parts[2] = format!(
            "{}{flipped}{}",
            &signature[..middle],
            &signature[middle + 1..]
        );
        assert_invalid(validator.validate(&parts.join(".")).await, "signature");

        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = b64(with(claims(), "sub", json!("mallory")).to_string());
        assert_invalid(validator.validate(&parts.join(".")).await, "signature");

        // The genuine token still passes, so the failures were not cached either way.
        validator.validate(&token).await.unwrap();
    }

    #[tokio::test]
    async fn refuses_malformed_tokens_without_fetching() {
        let key = ec_key("k1", Algorithm::ES256);
        let (server, url) = JwksServer::start(vec![key.jwk.clone()]).await;
        let validator = loaded(JwtSettings::new(ISSUER, url)).await;
        let payload = b64(claims().to_string());
        let good = key.sign(&claims());
        let signature = good.rsplit('.').next().unwrap().to_owned();
        let with_header = |header: &str| format!("{}.{payload}.{signature}", b64(header));

        let mut hostile = vec![
            String::new(),
            "x".repeat(MAX_TOKEN_BYTES + 1),
            "opaque-token".into(),
            "a.b".into(),
            "a.b.c".into(),
            "....".into(),
            "a.b.c.d.e".into(),
            format!("!!!.{payload}.{signature}"),
            with_header("[1, 2]"),
            with_header("{}"),
            with_header(r#"{"alg": 256}"#),
            with_header(r#"{"alg": "RS1"}"#),
            with_header(r#"{"alg": "ES256", "kid": 7}"#),
            with_header(r#"{"alg": "ES256", "kid": "k1", "crit": ["exp"], "exp": 1}"#),
            with_header(r#"{"alg": "ES256", "kid": "k1", "typ": 5}"#),
            with_header("not json"),
            format!("{}.!!!.{signature}", b64(r#"{"alg":"ES256","kid":"k1"}"#)),
        ];
        // A signed payload that is not a JSON object.
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        hostile.push(jsonwebtoken::encode(&header, &json!([1, 2]), &key.encoding).unwrap());
        for token in &hostile {
            assert!(
                matches!(
                    validator.validate(token).await,
                    Err(InboundError::Invalid(_))
                ),
                "accepted {token:?}"
            );
        }
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn selects_the_only_fitting_key_when_the_token_has_no_kid() {
        let key = ec_key("k1", Algorithm::ES256);
        let (server, url) = JwksServer::start(vec![key.jwk.clone()]).await;
        let validator = loaded(JwtSettings::new(ISSUER, url)).await;
        let token = key.sign_without_kid(&claims());
        validator.validate(&token).await.unwrap();

        // With two candidate keys, a token without kid is ambiguous and refused.
        let other = ec_key("k2", Algorithm::ES256);
        server.set_keys(vec![key.jwk.clone(), other.jwk.clone()]);
        let ambiguous = loaded(JwtSettings::new(
            ISSUER,
            validator.settings.jwks_uri.clone(),
        ))
        .await;
        assert_invalid(ambiguous.validate(&token).await, "several keys");
    }

    #[tokio::test]
    async fn verifies_rs256_tokens() {
        use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents};
        use aws_lc_rs::signature::RSA_PKCS1_SHA256;

        let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        let components = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
        let jwk = json!({
            "kty": "RSA", "kid": "rsa1", "alg": "RS256", "use": "sig",
            "n": b64(&components.n), "e": b64(&components.e),
        });
        let sign = |header: &Value, claims: &Value| {
            let message = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
            let mut signature = vec![0; pair.public_modulus_len()];
            pair.sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                message.as_bytes(),
                &mut signature,
            )
            .unwrap();
            format!("{message}.{}", b64(signature))
        };
        let (_server, url) = JwksServer::start(vec![jwk]).await;
        let validator = loaded(JwtSettings::new(ISSUER, url)).await;

        let token = sign(&json!({"alg": "RS256", "kid": "rsa1"}), &claims());
        let validated = validator.validate(&token).await.unwrap();
        assert_eq!(validated.sub.as_deref(), Some("alice"));

        // PS256 is not on the default allow-list, even though the key type would fit.
        let ps256 = sign(&json!({"alg": "PS256", "kid": "rsa1"}), &claims());
        assert_invalid(validator.validate(&ps256).await, "allow-list");

        // Key confusion with the RSA modulus as HMAC secret.
        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(&components.n),
        )
        .unwrap();
        assert_invalid(validator.validate(&forged).await, "HMAC");
    }

    #[tokio::test]
    async fn unknown_kid_refetches_once_and_accepts_a_rotated_key() {
        let old = ec_key("old", Algorithm::ES256);
        let (server, url) = JwksServer::start(vec![old.jwk.clone()]).await;
        let validator = loaded(JwtSettings::new(ISSUER, url)).await;
        assert_eq!(server.hits(), 1);

        // The issuer rotates: the new key appears in its JWKS.
        let new = ec_key("new", Algorithm::ES256);
        server.set_keys(vec![old.jwk.clone(), new.jwk.clone()]);
        let rotated = new.sign(&claims());
        validator.validate(&rotated).await.unwrap();
        assert_eq!(server.hits(), 2);

        // A kid nobody publishes: the refetch budget is spent, so no further GET.
        let stranger = ec_key("stranger", Algorithm::ES256).sign(&claims());
        assert_invalid(validator.validate(&stranger).await, "unknown kid");
        assert_eq!(server.hits(), 2);
        assert_eq!(validator.jwks_fetches(), 2);
    }

    #[tokio::test]
    async fn unknown_kid_is_invalid_after_one_refetch() {
        let key = ec_key("k1", Algorithm::ES256);
        let (server, url) = JwksServer::start(vec![key.jwk.clone()]).await;
        let validator = loaded(JwtSettings::new(ISSUER, url.clone())).await;
        let stranger = ec_key("stranger", Algorithm::ES256).sign(&claims());

        assert_invalid(validator.validate(&stranger).await, "unknown kid");
        assert_eq!(server.hits(), 2);
        assert_invalid(validator.validate(&stranger).await, "unknown kid");
        assert_eq!(server.hits(), 2);

        // Without a throttle every unknown kid refetches, still one GET per attempt.
        let mut settings = JwtSettings::new(ISSUER, url);
        settings.min_refetch_interval = Duration::ZERO;
        let eager = loaded(settings).await;
        let before = server.hits();
        assert_invalid(eager.validate(&stranger).await, "unknown kid");
        assert_invalid(eager.validate(&stranger).await, "unknown kid");
        assert_eq!(server.hits(), before + 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_unknown_kids_shares_one_refetch() {
        let key = ec_key("k1", Algorithm::ES256);
        let (server, url) = JwksServer::start(vec![key.jwk.clone()]).await;
        let validator = loaded(JwtSettings::new(ISSUER, url.clone())).await;

        let stranger = Arc::new(ec_key("stranger", Algorithm::ES256).sign(&claims()));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let validator = Arc::clone(&validator);
                let token = Arc::clone(&stranger);
                tokio::spawn(async move { validator.validate(&token).await })
            })
            .collect();
        for task in tasks {
            assert_invalid(task.await.unwrap(), "unknown kid");
        }
        assert_eq!(server.hits(), 2);

        // The same burst for a freshly rotated key: one refetch, twenty acceptances.
        let validator = loaded(JwtSettings::new(ISSUER, url)).await;
        let new = ec_key("new", Algorithm::ES256);
        server.set_keys(vec![key.jwk.clone(), new.jwk.clone()]);
        let before = server.hits();
        let rotated = Arc::new(new.sign(&claims()));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let validator = Arc::clone(&validator);
                let token = Arc::clone(&rotated);
                tokio::spawn(async move { validator.validate(&token).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(server.hits(), before + 1);
    }

    #[tokio::test]
    async fn a_removed_key_stops_cached_validations() {
        let old = ec_key("old", Algorithm::ES256);
        let new = ec_key("new", Algorithm::ES256);
        let (server, url) = JwksServer::start(vec![old.jwk.clone()]).await;
        let validator = loaded(JwtSettings::new(ISSUER, url)).await;
        let token = old.sign(&claims());
        validator.validate(&token).await.unwrap();

        server.set_keys(vec![new.jwk.clone()]);
        validator.refresh().await.unwrap();
        assert_invalid(validator.validate(&token).await, "unknown kid");
        validator.validate(&new.sign(&claims())).await.unwrap();
    }

    #[tokio::test]
    async fn jwks_down_at_start_means_not_ready_and_unavailable() {
        let key = ec_key("k1", Algorithm::ES256);
        let token = key.sign(&claims());

        let nowhere = url::Url::parse(&format!("http://{}/jwks", closed_address().await)).unwrap();
        let validator = JwtValidator::new(JwtSettings::new(ISSUER, nowhere), http());
        assert!(matches!(
            validator.refresh().await,
            Err(InboundError::Unavailable(_))
        ));
        assert!(!validator.is_ready());
        let error = validator.validate(&token).await.unwrap_err();
        assert_eq!(error.outcome(), "validator_unavailable");

        // An endpoint answering 500 is no better; once it recovers the validator is ready.
        let (server, url) = JwksServer::start(vec![key.jwk.clone()]).await;
        server.failures.store(1, Ordering::SeqCst);
        let validator = JwtValidator::new(JwtSettings::new(ISSUER, url), http());
        assert!(validator.refresh().await.is_err());
        assert!(!validator.is_ready());
        assert!(matches!(
            validator.validate(&token).await,
            Err(InboundError::Unavailable(_))
        ));
        validator.refresh().await.unwrap();
        assert!(validator.is_ready());
        validator.validate(&token).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_or_empty_refresh_keeps_the_previous_keys() {
        let key = ec_key("k1", Algorithm::ES256);
        let (server, url) = JwksServer::start(vec![key.jwk.clone()]).await;
        let validator = loaded(JwtSettings::new(ISSUER, url)).await;

        server.failures.store(1, Ordering::SeqCst);
        assert!(validator.refresh().await.is_err());
        server.set_keys(vec![json!({"kty": "oct", "k": "c2VjcmV0", "kid": "k1"})]);
        assert!(validator.refresh().await.is_err());

        assert!(validator.is_ready());
        validator.validate(&key.sign(&claims())).await.unwrap();
    }

    #[tokio::test]
    async fn the_refresher_loads_keys_and_retries_failures() {
        let key = ec_key("k1", Algorithm::ES256);
        let (server, url) = JwksServer::start(vec![key.jwk.clone()]).await;
        server.failures.store(1, Ordering::SeqCst);
        let validator = Arc::new(JwtValidator::new(JwtSettings::new(ISSUER, url), http()));
        let guard = validator.spawn_refresher();
        tokio::time::timeout(Duration::from_secs(10), validator.wait_ready())
            .await
            .expect("the refresher never loaded the JWKS");
        assert_eq!(server.hits(), 2);
        validator.validate(&key.sign(&claims())).await.unwrap();
        drop(guard);
    }
}
