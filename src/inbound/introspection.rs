//! OAuth 2.0 Token Introspection (RFC 7662) for tokens the gateway cannot verify itself.
//!
//! Opaque tokens carry nothing to check locally, so the issuer is asked whether the token is
//! active. The introspection endpoint is a remote dependency that can be slow, down or wrong:
//! every call has a deadline and a body cap, and any answer that is not a clear "active" or
//! "inactive" makes the validator report itself unavailable (503) rather than calling the
//! token invalid. Active answers are reused for a short while so that a busy caller does not
//! cost one introspection per request; concurrent requests with the same token share one call.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{HeaderValue, StatusCode, header};
use moka::future::Cache;
use serde_json::Value;

use super::{
    BodyError, Cached, InboundError, TokenDigest, ValidatedToken, check_size, invalid, new_cache,
    now_secs, numeric_date, read_capped, token_digest, ttl_until,
};
use crate::secret::Secret;

/// Longest reuse of an `active` answer when none is configured: 60 seconds.
pub const DEFAULT_INTROSPECTION_CACHE_TTL: Duration = Duration::from_secs(60);
/// Deadline for one introspection call when none is configured: 5 seconds.
pub const DEFAULT_INTROSPECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest introspection answer read; answers are a handful of claims.
pub const MAX_INTROSPECTION_RESPONSE_BYTES: usize = 64 * 1024;

/// How the gateway authenticates to the introspection endpoint (RFC 7662 §2.1 requires some
/// form of authorization; these are the RFC 6749 §2.3.1 client password methods).
#[derive(Clone)]
pub enum IntrospectionAuth {
    /// `client_secret_basic`: this ready-made `Authorization` header value is sent.
    Basic {
        /// `Basic base64(urlencode(client_id) ":" urlencode(secret))`.
        header: HeaderValue,
    },
    /// `client_secret_post`: `client_id` and `client_secret` are added to the form.
    Post {
        /// The client secret.
        secret: Secret,
    },
}

impl fmt::Debug for IntrospectionAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntrospectionAuth::Basic { .. } => f.write_str("Basic(<redacted>)"),
            IntrospectionAuth::Post { .. } => f.write_str("Post(<redacted>)"),
        }
    }
}

/// Settings for introspection, already parsed from config (the config layer builds these).
#[derive(Debug, Clone)]
pub struct IntrospectionSettings {
    /// The issuer's `introspection_endpoint`.
    pub endpoint: url::Url,
    /// The gateway's client id at the issuer; sent in the form with [`IntrospectionAuth::Post`].
    pub client_id: String,
    /// Client authentication.
    pub auth: IntrospectionAuth,
    /// Deadline for one call, connect to last byte; [`DEFAULT_INTROSPECTION_TIMEOUT`] by default.
    pub timeout: Duration,
    /// Longest reuse of an `active` answer, never past the token's `exp`; zero disables
    /// caching. [`DEFAULT_INTROSPECTION_CACHE_TTL`] by default.
    pub cache_ttl: Duration,
    /// Bound on cached answers; [`super::DEFAULT_MAX_CACHED`] by default.
    pub max_cached: u64,
}

impl IntrospectionSettings {
    /// Settings for `endpoint` and the given client with every other field at its default.
    pub fn new(
        endpoint: url::Url,
        client_id: impl Into<String>,
        auth: IntrospectionAuth,
    ) -> IntrospectionSettings {
        IntrospectionSettings {
            endpoint,
            client_id: client_id.into(),
            auth,
            timeout: DEFAULT_INTROSPECTION_TIMEOUT,
            cache_ttl: DEFAULT_INTROSPECTION_CACHE_TTL,
            max_cached: super::DEFAULT_MAX_CACHED,
        }
    }
}

/// Validates tokens by asking the issuer (RFC 7662). Build it once per configuration.
pub struct IntrospectionValidator {
    settings: IntrospectionSettings,
    http: reqwest::Client,
    cache: Cache<TokenDigest, Cached>,
    calls: AtomicU64,
}

impl fmt::Debug for IntrospectionValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntrospectionValidator")
            .field("endpoint", &self.settings.endpoint.as_str())
            .field("client_id", &self.settings.client_id)
            .finish_non_exhaustive()
    }
}

impl IntrospectionValidator {
    /// Builds the validator; `http` comes from [`crate::exchange::http_client`]. Called once
    /// per inbound introspection configuration at start.
    pub fn new(settings: IntrospectionSettings, http: reqwest::Client) -> Self {
        IntrospectionValidator {
            cache: new_cache(settings.max_cached),
            settings,
            http,
            calls: AtomicU64::new(0),
        }
    }

    /// Asks the introspection endpoint about `token` (RFC 7662 §2.1: `token=<token>&
    /// token_type_hint=access_token` with client authentication).
    ///
    /// `active: false` is `Invalid`; a non-200 status, a body that is not a JSON object with a
    /// boolean `active`, a body over 64 KiB, or a timeout is `Unavailable`. Active answers are
    /// cached by SHA-256 of the token for `min(cache_ttl, exp - now)`; inactive answers and
    /// failures are not cached. Concurrent calls with the same token share one request.
    pub async fn validate(&self, token: &str) -> Result<Arc<ValidatedToken>, InboundError> {
        check_size(token)?;
        if self.settings.cache_ttl.is_zero() {
            return self.introspect(token).await.map(|cached| cached.token);
        }
        let digest = token_digest(token);
        if let Some(hit) = self.cache.get(&digest).await {
            if hit.token.exp.is_none_or(|exp| exp > now_secs()) {
                return Ok(hit.token);
            }
            self.cache.invalidate(&digest).await;
        }
        self.cache
            .try_get_with(digest, self.introspect(token))
            .await
            .map(|cached| cached.token)
            .map_err(|error| InboundError::clone(&error))
    }

    /// Number of introspection requests sent so far, for tests and diagnostics.
    pub fn introspection_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    async fn introspect(&self, token: &str) -> Result<Cached, InboundError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut form = vec![("token", token), ("token_type_hint", "access_token")];
        let mut request = self
            .http
            .post(self.settings.endpoint.clone())
            .timeout(self.settings.timeout)
            .header(header::ACCEPT, "application/json");
        match &self.settings.auth {
            IntrospectionAuth::Basic { header: value } => {
                request = request.header(header::AUTHORIZATION, value.clone());
            }
            IntrospectionAuth::Post { secret } => {
                form.push(("client_id", &self.settings.client_id));
                form.push(("client_secret", secret.expose()));
            }
        }
        let response = request
            .form(&form)
            .send()
            .await
            .map_err(|error| unavailable(transport_reason(&error)))?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(InboundError::Unavailable(format!(
                "the introspection endpoint answered HTTP {}",
                status.as_u16()
            )));
        }
        let body = read_capped(response, MAX_INTROSPECTION_RESPONSE_BYTES)
            .await
            .map_err(|error| match error {
                BodyError::TooLarge => unavailable("the introspection answer is too large"),
                BodyError::Transport(error) => unavailable(transport_reason(&error)),
            })?;
        let now = now_secs();
        let token = interpret(&body, now)?;
        Ok(Cached {
            ttl: ttl_until(token.exp, now, self.settings.cache_ttl),
            token: Arc::new(token),
            epoch: 0,
        })
    }
}

/// Reads an RFC 7662 §2.2 answer taken at time `now`.
fn interpret(body: &[u8], now: u64) -> Result<ValidatedToken, InboundError> {
    let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(body) else {
        return Err(unavailable("the introspection answer is not a JSON object"));
    };
    // §2.2: `active` is REQUIRED and boolean; anything else is a broken server, not a verdict.
    match claims.get("active") {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => return Err(invalid("inactive per introspection")),
        _ => {
            return Err(unavailable(
                "the introspection answer has no boolean active",
            ));
        }
    }
    if let Some(exp) = claims.get("exp") {
        let exp = numeric_date(exp)
            .ok_or_else(|| unavailable("the introspection answer has a malformed exp"))?;
        // An "active" token past its own `exp` is not trusted, whatever the server thinks.
        if exp <= now {
            return Err(invalid("expired"));
        }
    }
    Ok(ValidatedToken::from_claims(claims))
}

fn unavailable(reason: &str) -> InboundError {
    InboundError::Unavailable(reason.to_owned())
}

fn transport_reason(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "the introspection endpoint timed out"
    } else if error.is_connect() {
        "cannot connect to the introspection endpoint"
    } else {
        "the introspection request failed"
    }
}
