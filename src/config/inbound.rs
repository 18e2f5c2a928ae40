//! Settings of inbound validation (DESIGN.md step 3), as data: what `inbound.jwt` and
//! `inbound.introspection` say once checked. The validators that act on them (and fetch keys,
//! call endpoints and cache answers) are built from these in `inbound`.

use std::fmt;
use std::time::Duration;

use http::HeaderValue;
use jsonwebtoken::Algorithm;

use super::defaults;
use crate::secret::Secret;

/// Settings for JWT validation, already parsed from config (the config layer builds these).
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// The required `iss`, compared exactly (RFC 7519 §4.1.1, RFC 8725 §3.8).
    pub issuer: String,
    /// Where the issuer publishes its keys.
    pub jwks_uri: url::Url,
    /// Accepted audiences: empty does not check `aud`; otherwise `aud` must be present and
    /// contain one of them (RFC 7519 §4.1.3, RFC 8725 §3.9).
    pub audiences: Vec<String>,
    /// The `alg` allow-list (RFC 8725 §3.1); [`defaults::JWT_ALGORITHMS`] by default. HMAC entries
    /// are ignored: this validator only knows public keys.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in whole seconds and at most a day;
    /// [`defaults::JWT_LEEWAY`] by default.
    pub leeway: Duration,
    /// Background JWKS refresh period; [`defaults::JWKS_REFRESH_INTERVAL`] by default.
    pub refresh_interval: Duration,
    /// Throttle for refetches triggered by unknown `kid`s; [`defaults::JWKS_MIN_REFETCH_INTERVAL`] by
    /// default.
    pub min_refetch_interval: Duration,
    /// Bound on cached validations; [`defaults::VALIDATION_CACHE_ENTRIES`] by default.
    pub max_cached: u64,
    /// The JOSE `typ` every token must declare (RFC 8725 §3.11); `None` checks none.
    pub typ: Option<String>,
}

impl JwtSettings {
    /// Settings for `issuer` and `jwks_uri` with every other field at its default.
    pub fn new(issuer: impl Into<String>, jwks_uri: url::Url) -> JwtSettings {
        JwtSettings {
            issuer: issuer.into(),
            jwks_uri,
            audiences: Vec::new(),
            algorithms: defaults::JWT_ALGORITHMS.to_vec(),
            leeway: defaults::JWT_LEEWAY,
            refresh_interval: defaults::JWKS_REFRESH_INTERVAL,
            min_refetch_interval: defaults::JWKS_MIN_REFETCH_INTERVAL,
            max_cached: defaults::VALIDATION_CACHE_ENTRIES,
            typ: None,
        }
    }
}

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
    /// Deadline for one call, connect to last byte; the default in config/defaults.rs by default.
    pub timeout: Duration,
    /// Longest reuse of an `active` answer, never past the token's `exp`; zero disables
    /// caching. the default in config/defaults.rs by default.
    pub cache_ttl: Duration,
    /// Bound on cached answers (and, separately, on remembered refusals);
    /// the default in config/defaults.rs by default.
    pub max_cached: u64,
    /// Accepted `aud` values; empty does not check `aud`. Otherwise the answer's `aud` (a
    /// string or an array) must hold one of them.
    pub audiences: Vec<String>,
    /// Accepted `client_id` values (the client the token was issued to); empty does not check.
    pub client_ids: Vec<String>,
    /// How long a refusal is remembered; zero turns that off.
    /// the default in config/defaults.rs by default.
    pub negative_cache_ttl: Duration,
    /// Most calls in flight; the default in config/defaults.rs by default.
    pub max_concurrent: usize,
    /// Longest wait for a free slot; the default in config/defaults.rs by default.
    pub queue_timeout: Duration,
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
            timeout: defaults::INTROSPECTION_TIMEOUT,
            cache_ttl: defaults::INTROSPECTION_CACHE_TTL,
            max_cached: defaults::VALIDATION_CACHE_ENTRIES,
            audiences: Vec::new(),
            client_ids: Vec::new(),
            negative_cache_ttl: defaults::INTROSPECTION_NEGATIVE_TTL,
            max_concurrent: defaults::INTROSPECTION_MAX_CONCURRENT,
            queue_timeout: defaults::INTROSPECTION_QUEUE_TIMEOUT,
        }
    }
}

/// An `inbound:` block, checked: how callers' tokens are validated locally (DESIGN.md step 3) —
/// JWTs against a JWKS, opaque tokens by introspection. Shared (one `Arc`) by every route that
/// uses its token service's block, so those routes share one validator.
pub struct InboundSettings {
    pub jwt: Option<JwtSettings>,
    pub introspection: Option<IntrospectionSettings>,
}

/// What validates, as `txgate check --verbose` shows it.
impl fmt::Debug for InboundSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match (self.jwt.is_some(), self.introspection.is_some()) {
            (true, true) => "jwt+introspection",
            (true, false) => "jwt",
            (false, true) => "introspection",
            (false, false) => "none",
        })
    }
}
