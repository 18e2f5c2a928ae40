//! Validation of the caller's bearer token before any exchange (DESIGN step 3).
//!
//! The gateway checks the caller's token itself, so a forged, expired or foreign token is
//! answered `401 invalid_token` without ever reaching the STS: the exchange would fail anyway,
//! and forwarding garbage would spend the STS's capacity on behalf of whoever sends it. Two
//! validators exist:
//!
//! - [`JwtValidator`] verifies a JWT's signature against the issuer's published keys (JWKS)
//!   and checks its claims, entirely locally.
//! - [`IntrospectionValidator`] asks the issuer (RFC 7662) about opaque tokens.
//!
//! Both treat tokens and the issuer's answers as hostile input. Both cache successful
//! validations keyed by the SHA-256 digest of the token (a raw token is never a key), never past
//! the token's `exp`. Introspection also remembers the issuer's refusals briefly; a failure to
//! get an answer is never cached. An [`InboundError`] separates "this token is
//! not acceptable" (401) from "the validator cannot decide right now" (503), so an unreachable
//! JWKS or introspection endpoint does not make valid callers look like attackers.

mod introspection;
mod jwks;
mod jwt;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moka::Expiry;
use moka::future::Cache;
use serde_json::{Map, Value};

pub use introspection::IntrospectionValidator;
pub use jwt::{JwtSettings, JwtValidator, RefresherGuard};

/// The validators of one `inbound:` block: JWTs against a JWKS, opaque tokens by
/// introspection. Built once per block and configuration ([`Inbound::build`]); routes that
/// share their token service's block share these.
pub struct Inbound {
    pub jwt: Option<Arc<JwtValidator>>,
    pub introspection: Option<Arc<IntrospectionValidator>>,
}

impl Inbound {
    /// The validators for `settings`, calling out with `http` (the token service's client, built
    /// once with its connect timeout). Nothing is fetched here: the JWKS loads when the
    /// configuration starts.
    pub fn build(settings: &crate::config::InboundSettings, http: &reqwest::Client) -> Inbound {
        Inbound {
            jwt: settings
                .jwt
                .clone()
                .map(|s| Arc::new(JwtValidator::new(s, http.clone()))),
            introspection: settings
                .introspection
                .clone()
                .map(|s| Arc::new(IntrospectionValidator::new(s, http.clone()))),
        }
    }
}
/// Longest token looked at. Bearer tokens are a few KiB; anything larger is refused before any
/// parsing or network call.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    /// The token is not acceptable: bad signature, expired, wrong `iss`/`aud`, `alg` not
    /// allowed or `none`, `kid` unknown even after a refetch, malformed, or inactive per
    /// introspection. The caller gets 401 `invalid_token`. The text is a short internal reason
    /// for debug logs; it never contains the token or values taken from it.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The validator cannot decide right now: the JWKS was never fetched or is unreachable,
    /// or the introspection endpoint is down, slow or answering nonsense. The caller gets 503.
    #[error("token validation unavailable: {0}")]
    Unavailable(String),
    /// Too many validator calls (introspection) in flight: the gateway refused this one
    /// without calling out. The caller gets 503, like [`InboundError::Unavailable`].
    #[error("too many token validation calls in flight")]
    Overloaded,
}

impl InboundError {
    /// A bounded label for logs and metrics: `invalid_token` or `validator_unavailable`.
    pub fn outcome(&self) -> &'static str {
        match self {
            InboundError::Invalid(_) => "invalid_token",
            InboundError::Unavailable(_) => "validator_unavailable",
            InboundError::Overloaded => "validator_overloaded",
        }
    }

    /// The short internal reason, for debug logs.
    pub fn reason(&self) -> &str {
        match self {
            InboundError::Invalid(reason) | InboundError::Unavailable(reason) => reason,
            InboundError::Overloaded => "too many validation calls in flight",
        }
    }
}

fn invalid(reason: impl Into<String>) -> InboundError {
    InboundError::Invalid(reason.into())
}

/// What a successful validation yields. The gateway uses `exp` to bound its exchanged-token
/// cache, `sub` / `client_id` for logs and `may_act` checks, and the claims for delegation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedToken {
    /// The `sub` claim (RFC 7519 §4.1.2), when it is a string.
    pub sub: Option<String>,
    /// The `client_id` claim (RFC 9068 §2.2, RFC 7662 §2.2), when it is a string.
    pub client_id: Option<String>,
    /// The `exp` claim in seconds since the epoch; always present for JWTs, optional for
    /// introspection answers.
    pub exp: Option<u64>,
    /// Every claim of the JWT payload, or every member of the introspection answer.
    pub claims: Map<String, Value>,
}

impl ValidatedToken {
    fn from_claims(claims: Map<String, Value>) -> ValidatedToken {
        let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
        ValidatedToken {
            sub: text("sub"),
            client_id: text("client_id"),
            exp: claims.get("exp").and_then(numeric_date),
            claims,
        }
    }
}

/// SHA-256 of a token: the only form in which tokens are used as cache keys.
use crate::token::TokenDigest;

fn check_size(token: &str) -> Result<(), InboundError> {
    if token.is_empty() {
        return Err(invalid("empty token"));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(invalid("token too large"));
    }
    Ok(())
}

/// A cached successful validation.
#[derive(Clone)]
struct Cached {
    token: Arc<ValidatedToken>,
    ttl: Duration,
    /// The validator's key-removal counter when the validation started (0 for introspection).
    epoch: u64,
}

struct CachedTtl;

impl Expiry<TokenDigest, Cached> for CachedTtl {
    fn expire_after_create(
        &self,
        _key: &TokenDigest,
        value: &Cached,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

fn new_cache(max_cached: u64) -> Cache<TokenDigest, Cached> {
    Cache::builder()
        .max_capacity(max_cached)
        .expire_after(CachedTtl)
        .build()
}

/// How long a validation may be reused: until `exp` (if any), never longer than `cap`.
fn ttl_until(exp: Option<u64>, now: u64, cap: Duration) -> Duration {
    match exp {
        Some(exp) => Duration::from_secs(exp.saturating_sub(now)).min(cap),
        None => cap,
    }
}

/// RFC 7519 §2 NumericDate: non-negative seconds, possibly fractional (truncated).
fn numeric_date(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
            .map(|seconds| seconds as u64)
    })
}

/// A URL for logs: without user info or query, which may carry credentials.
fn redacted(url: &url::Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

enum BodyError {
    TooLarge,
    Transport(reqwest::Error),
}

/// Reads a response body, giving up as soon as it exceeds `limit` bytes.
async fn read_capped(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len().saturating_add(chunk.len()) > limit {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Test servers shared by the validator tests: real listeners on 127.0.0.1, ephemeral ports.
#[cfg(test)]
mod test_support {
    use std::net::SocketAddr;
    use std::time::Duration;

    /// Serves `router` on an ephemeral port for the rest of the test's runtime.
    pub(super) async fn serve(router: axum::Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        address
    }

    /// An address where nothing listens: connections are refused at once.
    pub(super) async fn closed_address() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    pub(super) fn http() -> reqwest::Client {
        crate::tls::install_crypto_provider();
        crate::exchange::http_client(Duration::from_secs(2)).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn outcomes_are_bounded_labels() {
        assert_eq!(invalid("x").outcome(), "invalid_token");
        assert_eq!(
            InboundError::Unavailable("y".into()).outcome(),
            "validator_unavailable"
        );
        assert_eq!(invalid("short reason").reason(), "short reason");
        assert_eq!(InboundError::Overloaded.outcome(), "validator_overloaded");
    }

    #[test]
    fn logged_urls_carry_no_credentials() {
        let url = url::Url::parse("https://user:pw@idp.example/jwks?api_key=k#x").unwrap();
        assert_eq!(redacted(&url), "https://idp.example/jwks");
    }

    #[test]
    fn numeric_dates_and_ttls() {
        assert_eq!(numeric_date(&json!(5)), Some(5));
        assert_eq!(numeric_date(&json!(5.9)), Some(5));
        assert_eq!(numeric_date(&json!(-1)), None);
        assert_eq!(numeric_date(&json!(1e300)), Some(u64::MAX));
        assert_eq!(numeric_date(&json!("5")), None);
        let cap = Duration::from_secs(60);
        assert_eq!(ttl_until(Some(1_010), 1_000, cap), Duration::from_secs(10));
        assert_eq!(ttl_until(Some(9_000), 1_000, cap), cap);
        assert_eq!(ttl_until(Some(900), 1_000, cap), Duration::ZERO);
        assert_eq!(ttl_until(None, 1_000, cap), cap);
    }
}
