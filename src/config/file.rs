//! The serde mirror of `gateway.yaml`.
//!
//! These types are the file format and nothing else: strings stay strings, and every struct
//! rejects unknown keys so a typo is an error instead of a setting that silently never applies.
//! [`super::Config`] is built from them once, at load; the request path never sees these types.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Default for `token_services.*.timeout`: the total time one STS call may take.
pub const DEFAULT_STS_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for `token_services.*.connect_timeout`.
pub const DEFAULT_STS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default for `cache.max_entries`.
pub const DEFAULT_CACHE_MAX_ENTRIES: u64 = 100_000;
/// Default for `cache.expiry_skew`: a cached token is dropped this long before it expires.
pub const DEFAULT_CACHE_EXPIRY_SKEW: Duration = Duration::from_secs(30);
/// Default for `cache.default_ttl`: used when the STS omits `expires_in` and the issued token
/// carries no `exp`.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);
/// Default for `server.max_token_bytes` (RFC 6750 sets no limit; real JWTs stay well below).
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Default for `server.grace_period`: how long a SIGTERM keeps serving in-flight requests.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(5);
/// Default for `server.shutdown_timeout`: the hard stop after the grace period.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    pub server: ServerFile,
    #[serde(default)]
    pub token_services: BTreeMap<String, TokenServiceFile>,
    #[serde(default)]
    pub routes: Vec<RouteFile>,
    #[serde(default)]
    pub cache: CacheFile,
}

/// `server:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// Proxy listeners, `host:port`.
    pub listen: Vec<String>,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`); none when absent.
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// Worker threads for the proxy; pingora's default (1) when absent.
    #[serde(default)]
    pub threads: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub grace_period: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub shutdown_timeout: Option<Duration>,
    #[serde(default)]
    pub max_token_bytes: Option<usize>,
}

/// `token_services.<name>:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenServiceFile {
    pub token_endpoint: String,
    pub client_id: String,
    #[serde(default)]
    pub client_secret: Option<String>,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub auth_method: AuthMethodFile,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
}

/// `token_services.<name>.auth_method:` — how the gateway authenticates to the STS
/// (RFC 6749 §2.3.1).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethodFile {
    #[default]
    ClientSecretBasic,
    ClientSecretPost,
}

/// `routes[]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: String,
    pub r#match: MatchFile,
    pub upstream: String,
    pub exchange: ExchangeFile,
}

/// `routes[].match:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchFile {
    pub path_prefix: String,
    #[serde(default)]
    pub host: Option<String>,
}

/// `routes[].exchange:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeFile {
    pub mode: ModeFile,
    #[serde(default)]
    pub token_service: Option<String>,
    #[serde(default)]
    pub audience: Vec<String>,
    #[serde(default)]
    pub resource: Vec<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub subject_token_type: Option<String>,
    #[serde(default)]
    pub requested_token_type: Option<String>,
}

/// `routes[].exchange.mode:`
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModeFile {
    Impersonation,
    Delegation,
    ClientCredentials,
    None,
}

/// `cache:`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    #[serde(default)]
    pub max_entries: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub expiry_skew: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub default_ttl: Option<Duration>,
}
