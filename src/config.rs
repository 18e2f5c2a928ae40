//! The gateway's runtime configuration, built once from `gateway.yaml`.
//!
//! Loading goes text → YAML tree → `${VAR}` expansion → [`file::GatewayFile`] (strict serde
//! mirror, read from the tree by [`tree`] with messages of our own) → [`Config`]. Everything the request path needs is parsed here: URLs, socket
//! addresses, durations, prebuilt client-auth headers, the STS HTTP client, and each route's
//! exchange profile with its cache-key prefix. Any problem is a [`ConfigError`] naming the file
//! and the key path, never a panic.

pub mod defaults;
pub mod discovery;
pub mod env;
pub mod file;
mod grants;
pub mod inbound;
pub mod profile;
pub mod shared_cache;
pub mod token_service;
pub mod tree;
pub mod upstream;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use url::Url;

pub use discovery::{Discover, NoDiscovery};
use file::{
    ActorFile, CacheFile, CallerFile, ExchangeFile, GatewayFile, GrantFile, MatchFile, ModeFile,
    RouteFile, ServerFile,
};
pub use inbound::InboundSettings;
pub use profile::Profile;
pub use shared_cache::{SealingKey, SharedCacheSettings};
pub use token_service::{ClientAuth, ResilienceSettings, TokenServiceSettings};
pub use upstream::{HeaderRules, Upstream};

/// RFC 8693 §3 token type identifiers, by the short names `gateway.yaml` accepts.
const TOKEN_TYPES: &[(&str, &str)] = &[
    (
        "access_token",
        "urn:ietf:params:oauth:token-type:access_token",
    ),
    (
        "refresh_token",
        "urn:ietf:params:oauth:token-type:refresh_token",
    ),
    ("id_token", "urn:ietf:params:oauth:token-type:id_token"),
    ("jwt", "urn:ietf:params:oauth:token-type:jwt"),
    ("saml1", "urn:ietf:params:oauth:token-type:saml1"),
    ("saml2", "urn:ietf:params:oauth:token-type:saml2"),
    ("id_jag", ID_JAG_TOKEN_TYPE),
    ("txn_token", TXN_TOKEN_TYPE),
];

/// An Identity Assertion JWT Authorization Grant (draft-ietf-oauth-identity-assertion-authz-grant).
pub const ID_JAG_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id-jag";
/// A Transaction Token (draft-ietf-oauth-transaction-tokens).
pub const TXN_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:txn_token";

/// The default `subject_token_type`: the caller presents an OAuth access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// What is wrong at one key of the file. Every builder returns this; the builders never know
/// the file's name, which [`ConfigProblem::in_file`] adds once, at the top, to make the
/// [`ConfigError`] users see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Key path such as `routes[1].exchange.token_service`; empty for whole-file problems.
    pub path: String,
    pub message: String,
}

impl ConfigProblem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> ConfigProblem {
        ConfigProblem {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A problem with the file as a whole (unreadable, not YAML, empty).
    pub fn whole_file(message: impl Into<String>) -> ConfigProblem {
        ConfigProblem::new(String::new(), message)
    }

    /// The error reported for this problem in `file` (as named on the command line).
    pub fn in_file(self, file: &str) -> ConfigError {
        let ConfigProblem { path, message } = self;
        ConfigError {
            file: file.to_string(),
            path,
            message,
        }
    }
}

/// A configuration error: which file, where in it, and what is wrong. Printed by `txgate
/// check` and `txgate run` as `file: key.path: message`, then the process exits 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// Key path such as `routes[1].exchange.token_service`; empty for whole-file errors.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Something a valid configuration allows but that weakens what the gateway promises: an
/// upstream whose certificate is not verified, credentials or keys over plain HTTP. Computed
/// only by [`Config::warnings`] (and [`TokenService::transport_warnings`] for one service);
/// `txgate check` prints each one, `txgate run` logs each one at start and on reload, and the
/// admin status page marks the token service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// Key path, as in [`ConfigError`].
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Warning text of `upstream.tls.verify: false`.
pub const UNVERIFIED_UPSTREAM: &str =
    "false: the upstream's certificate and host name are not verified";
/// Warning text of a token or introspection endpoint over plain HTTP to another host.
pub const CLEAR_TEXT_CREDENTIALS: &str =
    "http:// to a non-loopback host sends credentials and tokens in clear";
/// Warning text of a JWKS URI over plain HTTP to another host.
pub const CLEAR_TEXT_KEYS: &str =
    "http:// to a non-loopback host lets anyone on the network path replace the signing keys";

/// True for an `http://` URL whose host is not this machine (127.0.0.0/8, ::1, `localhost`):
/// what travels to it can be read and changed on the way.
pub fn clear_text_remote(url: &Url) -> bool {
    if url.scheme() != "http" {
        return false;
    }
    match url.host() {
        Some(url::Host::Ipv4(ip)) => !ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => !ip.is_loopback(),
        Some(url::Host::Domain(name)) => !name.eq_ignore_ascii_case("localhost"),
        None => true,
    }
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    /// The file it came from, as named on the command line (used in messages).
    pub source: String,
    pub server: ServerSettings,
    pub token_services: BTreeMap<String, Arc<TokenServiceSettings>>,
    pub routes: Vec<Arc<Route>>,
    pub cache: CacheSettings,
}

/// `server:` after validation.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: Vec<SocketAddr>,
    pub tls: Option<ServerTls>,
    /// Poll interval for config file changes; `None` reloads on SIGHUP only.
    pub watch_config: Option<Duration>,
    pub max_request_header_bytes: usize,
    pub admin_listen: Option<SocketAddr>,
    pub threads: usize,
    /// tokio work stealing between the worker threads (pingora's `work_stealing`).
    pub work_stealing: bool,
    pub grace_period: Duration,
    pub shutdown_timeout: Duration,
    pub max_token_bytes: usize,
    /// How request paths are normalised before routing.
    pub paths: crate::path::PathRules,
    /// The plain listeners also accept HTTP/2 with prior knowledge (`server.h2c`).
    pub h2c: bool,
    /// `server.ext_authz`: the listeners Envoy asks about each request.
    pub ext_authz: ExtAuthzSettings,
}

/// `server.ext_authz:` after validation; both `None` when the section is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtAuthzSettings {
    /// `envoy.service.auth.v3.Authorization/Check` over gRPC.
    pub grpc_listen: Option<SocketAddr>,
    /// Envoy's HTTP authorization service contract.
    pub http_listen: Option<SocketAddr>,
}

impl ExtAuthzSettings {
    /// Whether any ext_authz listener is configured.
    pub fn is_set(&self) -> bool {
        self.grpc_listen.is_some() || self.http_listen.is_some()
    }
}

/// `server.tls:` after validation: the files are readable and hold a usable key pair.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub listen: Vec<SocketAddr>,
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    pub reload_interval: Duration,
}

/// One route.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub host: Option<HostPattern>,
    /// Starts with `/`; matches on whole path segments (see [`crate::router`]).
    pub path_prefix: String,
    pub upstream: Upstream,
    /// Header rules applied before forwarding.
    pub headers: HeaderRules,
    pub exchange: Exchange,
    /// Local validation of the caller's token: the route's own `inbound`, else its token
    /// service's; `None` leaves validation to the STS (and for [`Exchange::ByIssuer`], where
    /// each choice has its own).
    pub inbound: Option<Arc<InboundSettings>>,
    /// `inbound.txn_token` of an internal route: the `Txn-Token` every request must carry,
    /// validated and passed on unchanged.
    pub txn_token: Option<Arc<inbound::JwtSettings>>,
}

impl Route {
    /// Whether the route does anything with a caller token it is sent (exchanges it, or
    /// checks it); a `none` route only keeps it from the upstream.
    pub fn uses_caller_token(&self) -> bool {
        !matches!(self.exchange, Exchange::None)
    }

    /// Whether a request must present a caller token: every route that exchanges one, except
    /// `client_credentials` with `caller: anonymous`. Called by admission for every request.
    pub fn needs_caller_token(&self) -> bool {
        match &self.exchange {
            Exchange::None => false,
            Exchange::ByIssuer(_) => true,
            Exchange::Token(profile) => !matches!(
                profile.mode,
                ModeSettings::ClientCredentials {
                    caller: CallerPolicy::Anonymous
                }
            ),
        }
    }
}

/// `match.host`: exact (case-insensitive) or `*.suffix` (one or more labels before the suffix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// Holds the suffix including its leading dot, e.g. `.example.com`.
    Suffix(String),
}

/// What token, if any, a route sends upstream.
#[derive(Debug)]
pub enum Exchange {
    /// `mode: none` — a public route; no token goes upstream at all.
    None,
    /// A token exchanged at a token service.
    Token(Arc<ExchangeSettings>),
    /// `exchange.token_services`: one exchange per token service, the caller's validated `iss`
    /// picks it (multi-IdP, multi-tenant). In configured order; issuers are distinct.
    ByIssuer(Arc<[IssuerChoice]>),
}

/// One token service of a route that lists several: the issuer whose callers it serves, the
/// exchange at it, and the validation of those callers' tokens.
#[derive(Debug)]
pub struct IssuerChoice {
    pub issuer: String,
    pub exchange: Arc<ExchangeSettings>,
    pub inbound: Arc<InboundSettings>,
}

/// The exchange modes of DESIGN.md step 4 that call an STS, each with the data only it has:
/// a delegation without an actor, or an impersonation that admits anonymous callers, cannot be
/// written.
#[derive(Debug)]
pub enum ModeSettings {
    /// The caller's token is the subject; no actor.
    Impersonation,
    /// The caller's token is the subject; the gateway's (or a configured) token is the actor.
    Delegation {
        actor: ActorSettings,
        /// Refuse unless the subject's `may_act` names the actor (RFC 8693 §4.4).
        require_may_act: bool,
    },
    /// The gateway's own token for the route; the caller's token is checked, never sent.
    ClientCredentials { caller: CallerPolicy },
    /// `exchange.chain`: the caller's token is step 1's subject, each step's result the next
    /// one's; the last result goes upstream. Each step is an impersonation of its own.
    Chain { steps: Vec<Arc<ExchangeSettings>> },
    /// A Transaction Token for each request (draft-ietf-oauth-transaction-tokens), sent in
    /// `Txn-Token`; the caller's token is the subject and goes nowhere else.
    TransactionToken { context: Vec<ContextAttribute> },
}

/// A request attribute put in a Transaction Token request's `request_context`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextAttribute {
    /// The request method, as `method`.
    Method,
    /// The normalised path without the query, as `path`.
    Path,
    /// The caller's IP address, as `req_ip`.
    ClientAddress,
}

impl ContextAttribute {
    /// Its name in `request_context`.
    pub fn key(self) -> &'static str {
        match self {
            ContextAttribute::Method => "method",
            ContextAttribute::Path => "path",
            ContextAttribute::ClientAddress => "req_ip",
        }
    }
}

/// Whether a `client_credentials` route needs a caller token (`exchange.caller`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerPolicy {
    /// A validated caller token is required (the default).
    Required,
    /// No caller token is needed; one that is sent is still kept from the upstream.
    Anonymous,
}

/// A mode without its data: for messages, labels and the profile digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeKind {
    Impersonation,
    Delegation,
    ClientCredentials,
    Chain,
    TransactionToken,
}

impl ModeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModeKind::Impersonation => "impersonation",
            ModeKind::Delegation => "delegation",
            ModeKind::ClientCredentials => "client_credentials",
            ModeKind::Chain => "chain",
            ModeKind::TransactionToken => "transaction_token",
        }
    }
}

impl ModeSettings {
    pub fn kind(&self) -> ModeKind {
        match self {
            ModeSettings::Impersonation => ModeKind::Impersonation,
            ModeSettings::Delegation { .. } => ModeKind::Delegation,
            ModeSettings::ClientCredentials { .. } => ModeKind::ClientCredentials,
            ModeSettings::Chain { .. } => ModeKind::Chain,
            ModeSettings::TransactionToken { .. } => ModeKind::TransactionToken,
        }
    }

    pub fn as_str(&self) -> &'static str {
        self.kind().as_str()
    }

    /// The actor of a delegation; `None` for the other modes.
    pub fn actor(&self) -> Option<&ActorSettings> {
        match self {
            ModeSettings::Delegation { actor, .. } => Some(actor),
            _ => None,
        }
    }
}

/// The grant an STS call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// RFC 8693 token exchange.
    TokenExchange,
    /// RFC 7523 §2.1 jwt-bearer: the subject is sent as `assertion` (Microsoft Entra's
    /// on-behalf-of adds `requested_token_use`).
    JwtBearer,
    /// RFC 6749 §4.4 client credentials.
    ClientCredentials,
}

/// Where a delegation's actor token comes from.
#[derive(Debug)]
pub enum ActorSettings {
    /// The gateway's own token: client credentials per this profile, cached like any token.
    Own(Arc<ExchangeSettings>),
    /// A file a platform keeps current (read when the gateway starts, re-read when it
    /// changes).
    File(std::path::PathBuf),
}

/// Everything that decides what an exchange returns, fixed at load. Two routes with equal
/// profiles may share cache entries; different profiles never do (the key prefix differs).
#[derive(Debug)]
pub struct ExchangeSettings {
    /// The mode, with the data only it has (a delegation's actor, a machine route's callers).
    pub mode: ModeSettings,
    pub grant: Grant,
    pub service: Arc<TokenServiceSettings>,
    pub subject_token_type: String,
    /// `actor_token_type`, sent only with an actor token.
    pub actor_token_type: String,
    /// `requested_token_type` as a URN, when configured (also in `params`): an answer with
    /// another `issued_token_type` is refused.
    pub requested_token_type: Option<String>,
    /// RFC 8693 §2.1 parameters other than the tokens, only those configured, in send order.
    pub params: Vec<(&'static str, String)>,
    /// SHA-256 over everything above: the first input of every cache key for this profile.
    pub key_prefix: [u8; 32],
    /// Upstream statuses that drop the token from the cache, after which a repeatable request
    /// is retried once with a fresh one (`exchange.purge_on_upstream_status`). Not part of
    /// `key_prefix`: it changes what happens after an answer, not what the STS issues.
    pub purge_on_upstream_status: Vec<u16>,
}

/// `cache:` after validation.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub max_entries: u64,
    pub expiry_skew: Duration,
    /// Lifetime of an entry when neither `expires_in` nor the issued token's `exp` gives one.
    pub default_ttl: Duration,
    /// No entry lives longer than this.
    pub max_ttl: Duration,
    /// How long definitive rejections are remembered (0: never).
    pub negative_ttl: Duration,
    /// Share of an entry's lifetime after which hits refresh it in the background (1: never).
    pub refresh_ahead: f64,
    /// The second level on Redis, shared by replicas (`cache.shared`); `None`: this replica's
    /// memory only.
    pub shared: Option<SharedCacheSettings>,
}

impl Config {
    /// Reads and validates `path`, expanding `${VAR}` from the process environment and asking
    /// `discover` for the OIDC discovery documents it needs (the only network step).
    pub fn load(path: &Path, discover: &dyn Discover) -> Result<Config, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigProblem::whole_file(format!("cannot read file: {e}")).in_file(&source)
        })?;
        Config::from_yaml_with(&text, &source, &|name| std::env::var(name).ok(), discover)
    }

    /// Parses and validates YAML text without touching the network ([`NoDiscovery`]): `source`
    /// names it in errors, `env` resolves `${VAR}`.
    pub fn from_yaml(
        text: &str,
        source: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Config::from_yaml_with(text, source, env, &NoDiscovery)
    }

    /// [`Config::from_yaml`], asking `discover` for the OIDC discovery documents it needs.
    pub fn from_yaml_with(
        text: &str,
        source: &str,
        env: &dyn Fn(&str) -> Option<String>,
        discover: &dyn Discover,
    ) -> Result<Config, ConfigError> {
        let mut tree: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| ConfigProblem::whole_file(format!("invalid YAML: {e}")).in_file(source))?;
        if tree.is_null() {
            return Err(ConfigProblem::whole_file("the file is empty").in_file(source));
        }
        env::expand_tree(&mut tree, env).map_err(|p| p.in_file(source))?;
        let raw: GatewayFile = tree::from_tree(tree).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            ConfigProblem::new(path, e.into_inner().to_string()).in_file(source)
        })?;
        let mut config = build(raw, discover).map_err(|p| p.in_file(source))?;
        config.source = source.to_string();
        Ok(config)
    }

    /// Every [`ConfigWarning`] of this configuration: token services, the shared cache, then
    /// routes.
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        let mut out = Vec::new();
        for service in self.token_services.values() {
            out.extend(service.transport_warnings());
        }
        if self
            .cache
            .shared
            .as_ref()
            .is_some_and(SharedCacheSettings::password_in_clear)
        {
            out.push(ConfigWarning {
                path: "cache.shared.url".into(),
                message: shared_cache::CLEAR_TEXT_REDIS_PASSWORD.into(),
            });
        }
        for (i, route) in self.routes.iter().enumerate() {
            let path = format!("routes[{i}]");
            if route.upstream.unverified_tls {
                out.push(ConfigWarning {
                    path: format!("{path}.upstream.tls.verify"),
                    message: UNVERIFIED_UPSTREAM.into(),
                });
            }
            // A route's own `inbound` block; the service's was reported with the service.
            let Exchange::Token(profile) = &route.exchange else {
                continue;
            };
            if let Some(inbound) = &route.inbound
                && !profile
                    .service
                    .inbound
                    .as_ref()
                    .is_some_and(|own| Arc::ptr_eq(own, inbound))
            {
                out.extend(token_service::inbound_warnings(
                    &format!("{path}.inbound"),
                    inbound,
                    &profile.service,
                ));
            }
        }
        out
    }
}

/// What every builder returns: the built value, or the problem at the key it was built from.
type BuildResult<T> = Result<T, ConfigProblem>;

fn build(raw: GatewayFile, discover: &dyn Discover) -> BuildResult<Config> {
    let GatewayFile {
        server,
        token_services,
        routes,
        cache,
    } = raw;
    crate::tls::install_crypto_provider();
    let server = build_server(server)?;
    let mut services = BTreeMap::new();
    for (name, svc) in token_services {
        let path = format!("token_services.{name}");
        let built = token_service::build_token_service(discover, &path, &name, svc)?;
        services.insert(name, Arc::new(built));
    }
    let mut built_routes: Vec<Arc<Route>> = Vec::with_capacity(routes.len());
    for (i, route) in routes.into_iter().enumerate() {
        let path = format!("routes[{i}]");
        if let Some(first) = built_routes.iter().position(|r| r.name == route.name) {
            return Err(ConfigProblem::new(
                format!("{path}.name"),
                format!(
                    "duplicate route name \"{}\" (first used at routes[{first}])",
                    route.name
                ),
            ));
        }
        built_routes.push(Arc::new(build_route(&path, route, &services)?));
    }
    if built_routes.is_empty() {
        return Err(ConfigProblem::new(
            "routes",
            "at least one route is required",
        ));
    }
    Ok(Config {
        source: String::new(),
        server,
        token_services: services,
        routes: built_routes,
        cache: build_cache(cache)?,
    })
}

fn build_server(raw: ServerFile) -> BuildResult<ServerSettings> {
    let ServerFile {
        listen,
        admin_listen,
        threads,
        work_stealing,
        grace_period,
        shutdown_timeout,
        max_token_bytes,
        max_request_header_bytes,
        tls,
        watch_config,
        normalize_path,
        merge_slashes,
        path_with_escaped_slashes_action,
        h2c,
        ext_authz,
    } = raw;
    let paths = {
        use crate::path::{EscapedSlashes, PathRules};
        // The path rules' defaults belong to the path module, which applies them.
        let unset = PathRules::default();
        PathRules {
            normalize_path: normalize_path.unwrap_or(unset.normalize_path),
            merge_slashes: merge_slashes.unwrap_or(unset.merge_slashes),
            escaped_slashes: match path_with_escaped_slashes_action {
                None => unset.escaped_slashes,
                Some(file::EscapedSlashesFile::RejectRequest) => EscapedSlashes::RejectRequest,
                Some(file::EscapedSlashesFile::KeepUnchanged) => EscapedSlashes::KeepUnchanged,
                Some(file::EscapedSlashesFile::UnescapeAndForward) => {
                    EscapedSlashes::UnescapeAndForward
                }
            },
        }
    };
    let watch_config = watch_config
        .map(|d| positive("server.watch_config", d))
        .transpose()?;
    let ext_authz = build_ext_authz(ext_authz)?;
    if listen.is_empty() && tls.is_none() && !ext_authz.is_set() {
        return Err(ConfigProblem::new(
            "server.listen",
            "at least one listen address is required (server.listen, server.tls.listen or server.ext_authz)",
        ));
    }
    let listen = listen
        .iter()
        .enumerate()
        .map(|(i, a)| socket_addr(&format!("server.listen[{i}]"), a))
        .collect::<BuildResult<Vec<_>>>()?;
    let admin_listen = admin_listen
        .map(|a| socket_addr("server.admin_listen", &a))
        .transpose()?;
    let threads = threads.unwrap_or(defaults::THREADS);
    if threads == 0 {
        return Err(ConfigProblem::new("server.threads", "must be at least 1"));
    }
    let tls = tls
        .map(|t| {
            let file::ServerTlsFile {
                listen,
                cert_file,
                key_file,
                reload_interval,
            } = t;
            if listen.is_empty() {
                return Err(ConfigProblem::new(
                    "server.tls.listen".to_string(),
                    "at least one listen address is required".to_string(),
                ));
            }
            let listen = listen
                .iter()
                .enumerate()
                .map(|(i, a)| socket_addr(&format!("server.tls.listen[{i}]"), a))
                .collect::<BuildResult<Vec<_>>>()?;
            crate::tls::load_certified_key(&cert_file, &key_file)
                .map_err(|m| ConfigProblem::new("server.tls".to_string(), m))?;
            Ok(ServerTls {
                listen,
                cert_file,
                key_file,
                reload_interval: positive(
                    "server.tls.reload_interval",
                    reload_interval.unwrap_or(defaults::TLS_RELOAD_INTERVAL),
                )?,
            })
        })
        .transpose()?;
    let max_request_header_bytes =
        max_request_header_bytes.unwrap_or(defaults::MAX_REQUEST_HEADER_BYTES);
    if max_request_header_bytes < 1024 {
        return Err(ConfigProblem::new(
            "server.max_request_header_bytes",
            "must be at least 1024",
        ));
    }
    let max_token_bytes = max_token_bytes.unwrap_or(defaults::MAX_TOKEN_BYTES);
    if max_token_bytes == 0 {
        return Err(ConfigProblem::new(
            "server.max_token_bytes",
            "must be at least 1",
        ));
    }
    Ok(ServerSettings {
        listen,
        tls,
        watch_config,
        max_request_header_bytes,
        admin_listen,
        threads,
        work_stealing: work_stealing.unwrap_or(defaults::WORK_STEALING),
        grace_period: grace_period.unwrap_or(defaults::GRACE_PERIOD),
        shutdown_timeout: shutdown_timeout.unwrap_or(defaults::SHUTDOWN_TIMEOUT),
        max_token_bytes,
        paths,
        h2c: h2c.unwrap_or(defaults::H2C),
        ext_authz,
    })
}

fn build_ext_authz(raw: Option<file::ExtAuthzFile>) -> BuildResult<ExtAuthzSettings> {
    let Some(file::ExtAuthzFile {
        grpc_listen,
        http_listen,
    }) = raw
    else {
        return Ok(ExtAuthzSettings::default());
    };
    if grpc_listen.is_none() && http_listen.is_none() {
        return Err(ConfigProblem::new(
            "server.ext_authz",
            "set grpc_listen, http_listen or both (or remove the section)",
        ));
    }
    Ok(ExtAuthzSettings {
        grpc_listen: grpc_listen
            .map(|a| socket_addr("server.ext_authz.grpc_listen", &a))
            .transpose()?,
        http_listen: http_listen
            .map(|a| socket_addr("server.ext_authz.http_listen", &a))
            .transpose()?,
    })
}

fn socket_addr(path: &str, text: &str) -> BuildResult<SocketAddr> {
    let invalid = |why: String| {
        ConfigProblem::new(
            path.to_string(),
            format!("invalid listen address \"{text}\": {why} (expected host:port)"),
        )
    };
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| invalid("it resolves to no address".into())),
        Err(e) => Err(invalid(e.to_string())),
    }
}

fn positive(path: &str, d: Duration) -> BuildResult<Duration> {
    if d.is_zero() {
        Err(ConfigProblem::new(path, "must be greater than zero"))
    } else {
        Ok(d)
    }
}

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn http_url(path: &str, text: &str) -> BuildResult<Url> {
    let url = Url::parse(text).map_err(|e| {
        ConfigProblem::new(path.to_string(), format!("invalid URL \"{text}\": {e}"))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigProblem::new(
            path.to_string(),
            format!("invalid URL \"{text}\": the scheme must be http or https"),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigProblem::new(
            path.to_string(),
            format!("invalid URL \"{text}\": a host is required"),
        ));
    }
    Ok(url)
}

fn build_route(
    path: &str,
    raw: RouteFile,
    services: &BTreeMap<String, Arc<TokenServiceSettings>>,
) -> BuildResult<Route> {
    let RouteFile {
        name,
        r#match,
        upstream,
        headers,
        exchange,
        inbound,
    } = raw;
    if !is_label(&name) {
        return Err(ConfigProblem::new(
            format!("{path}.name"),
            format!("invalid route name \"{name}\": use 1-64 letters, digits, '-', '_' or '.'"),
        ));
    }
    let MatchFile { path_prefix, host } = r#match;
    if !path_prefix.starts_with('/') {
        return Err(ConfigProblem::new(
            format!("{path}.match.path_prefix"),
            format!("\"{path_prefix}\" must start with '/'"),
        ));
    }
    let host = host
        .map(|h| host_pattern(&format!("{path}.match.host"), &h))
        .transpose()?;
    let upstream = upstream::build_upstream(&format!("{path}.upstream"), upstream)?;
    let headers = upstream::build_headers(&format!("{path}.headers"), headers)?;
    let anonymous = exchange.caller == Some(CallerFile::Anonymous);
    let exchange = build_exchange(&format!("{path}.exchange"), exchange, services)?;
    // `inbound.txn_token` belongs to internal routes; the rest of `inbound` to exchanging ones.
    let (inbound, txn_token) = match inbound {
        Some(mut raw) => {
            let txn = raw.txn_token.take();
            let rest = (raw.jwt.is_some() || raw.introspection.is_some()).then_some(raw);
            (rest, txn)
        }
        None => (None, None),
    };
    let txn_token = match (txn_token, &exchange) {
        (None, _) => None,
        (Some(raw), Exchange::None) => Some(Arc::new(grants::txn_token(
            &format!("{path}.inbound.txn_token"),
            raw,
        )?)),
        (Some(_), _) => {
            return Err(ConfigProblem::new(
                format!("{path}.inbound.txn_token"),
                "validates the Txn-Token of an internal route, which exchanges nothing: \
                 use it with mode none",
            ));
        }
    };
    let service = match &exchange {
        Exchange::Token(profile) => Some(&profile.service),
        Exchange::None => None,
        Exchange::ByIssuer(_) if inbound.is_some() => {
            return Err(ConfigProblem::new(
                format!("{path}.inbound"),
                "with token_services, each token service's own inbound block validates its \
                 callers; remove this key",
            ));
        }
        Exchange::ByIssuer(_) => None,
    };
    let inbound = match (inbound, service) {
        (Some(_), None) => {
            return Err(ConfigProblem::new(
                format!("{path}.inbound"),
                "mode none forwards no token, so there is nothing to validate; remove this key \
                 (an internal route validates its Txn-Token with inbound.txn_token)",
            ));
        }
        (Some(raw), Some(service)) => Some(Arc::new(token_service::build_inbound(
            &format!("{path}.inbound"),
            raw,
            &token_service::InboundDefaults {
                issuer: service.issuer.as_deref(),
                jwks_uri: service.jwks_uri.as_ref(),
                introspection_endpoint: service.introspection_endpoint.as_ref(),
                client_id: &service.client_id,
                secret: service.client_secret.as_ref(),
                timeout: service.timeout,
            },
        )?)),
        (None, Some(service)) => service.inbound.clone(),
        (None, None) => None,
    };
    if let Exchange::Token(profile) = &exchange
        && profile.mode.kind() == ModeKind::ClientCredentials
        && inbound.is_none()
        && !anonymous
    {
        return Err(ConfigProblem::new(
            format!("{path}.exchange.caller"),
            "mode client_credentials forwards the gateway's own token, so callers must be validated: \
             configure inbound (on the route or its token service), or set caller: anonymous",
        ));
    }
    // Every token of the issuer passes a JWT check without `aud`; on a route that forwards
    // the gateway's own token, that would let a token minted for any other service in.
    if let Exchange::Token(profile) = &exchange
        && profile.mode.kind() == ModeKind::ClientCredentials
        && !anonymous
        && let Some(jwt) = inbound.as_ref().and_then(|i| i.jwt.as_ref())
        && jwt.audiences.is_empty()
    {
        const WHY: &str = "a client_credentials route forwards the gateway's own token, so it \
            must require an audience of the caller's token (any token of the issuer would do \
            otherwise)";
        let shared = matches!(
            (&profile.service.inbound, &inbound),
            (Some(service), Some(route)) if Arc::ptr_eq(service, route)
        );
        return Err(if !shared {
            ConfigProblem::new(format!("{path}.inbound.jwt.audiences"), WHY)
        } else {
            ConfigProblem::new(
                format!(
                    "token_services.{}.inbound.jwt.audiences",
                    profile.service.name
                ),
                format!(
                    "route \"{name}\" uses this inbound block: {WHY}; set audiences here or \
                     give the route an inbound block of its own"
                ),
            )
        });
    }
    Ok(Route {
        name,
        host,
        path_prefix,
        upstream,
        headers,
        exchange,
        inbound,
        txn_token,
    })
}

fn host_pattern(path: &str, text: &str) -> BuildResult<HostPattern> {
    let lower = text.to_ascii_lowercase();
    let valid_name = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
    };
    if let Some(suffix) = lower.strip_prefix("*.") {
        if valid_name(suffix) {
            return Ok(HostPattern::Suffix(format!(".{suffix}")));
        }
    } else if valid_name(&lower) {
        return Ok(HostPattern::Exact(lower));
    }
    Err(ConfigProblem::new(
        path,
        format!("invalid host \"{text}\": expected a host name or *.suffix, without a port"),
    ))
}

fn build_exchange(
    path: &str,
    mut raw: ExchangeFile,
    services: &BTreeMap<String, Arc<TokenServiceSettings>>,
) -> BuildResult<Exchange> {
    if raw.mode == ModeFile::None {
        let configured = [
            ("token_service", raw.token_service.is_some()),
            ("token_services", raw.token_services.is_some()),
            ("grant", raw.grant.is_some()),
            ("chain", raw.chain.is_some()),
            ("audience", !raw.audience.is_empty()),
            ("resource", !raw.resource.is_empty()),
            ("scope", raw.scope.is_some()),
            ("subject_token_type", raw.subject_token_type.is_some()),
            ("requested_token_type", raw.requested_token_type.is_some()),
            ("actor", raw.actor.is_some()),
            ("require_may_act", raw.require_may_act),
            ("caller", raw.caller.is_some()),
            ("trust_domain", raw.trust_domain.is_some()),
            ("purpose", raw.purpose.is_some()),
            ("request_context", raw.request_context.is_some()),
            (
                "purge_on_upstream_status",
                raw.purge_on_upstream_status.is_some(),
            ),
        ];
        if let Some((key, _)) = configured.iter().find(|(_, set)| *set) {
            return Err(ConfigProblem::new(
                format!("{path}.{key}"),
                "mode none sends no token upstream; remove this key",
            ));
        }
        return Ok(Exchange::None);
    }
    if raw.mode != ModeFile::TransactionToken {
        for (key, set) in [
            ("trust_domain", raw.trust_domain.is_some()),
            ("purpose", raw.purpose.is_some()),
            ("request_context", raw.request_context.is_some()),
        ] {
            if set {
                return Err(ConfigProblem::new(
                    format!("{path}.{key}"),
                    "applies to mode transaction_token only",
                ));
            }
        }
    }
    if let Some(steps) = raw.chain.take() {
        return grants::chain(path, raw, steps, services).map(Exchange::Token);
    }
    if let Some(names) = raw.token_services.take() {
        return grants::by_issuer(path, raw, names, services);
    }
    if raw.mode == ModeFile::TransactionToken {
        return grants::transaction_token(path, raw, services).map(Exchange::Token);
    }
    let service = service_named(
        &format!("{path}.token_service"),
        raw.token_service.clone(),
        services,
        raw.mode,
    )?;
    build_single(path, raw, service).map(|s| Exchange::Token(Arc::new(s)))
}

/// The token service `name` (the value at `path`), which mode `mode` requires.
fn service_named(
    path: &str,
    name: Option<String>,
    services: &BTreeMap<String, Arc<TokenServiceSettings>>,
    mode: ModeFile,
) -> BuildResult<Arc<TokenServiceSettings>> {
    let name = name.ok_or_else(|| {
        ConfigProblem::new(
            path,
            format!("required for mode {}", mode_name(mode).as_str()),
        )
    })?;
    services.get(&name).cloned().ok_or_else(|| {
        let known: Vec<&str> = services.keys().map(String::as_str).collect();
        ConfigProblem::new(
            path,
            format!(
                "unknown token service \"{name}\" (known: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        )
    })
}

fn mode_name(mode: ModeFile) -> ModeKind {
    match mode {
        ModeFile::Delegation => ModeKind::Delegation,
        ModeFile::ClientCredentials => ModeKind::ClientCredentials,
        ModeFile::TransactionToken => ModeKind::TransactionToken,
        ModeFile::Impersonation | ModeFile::None => ModeKind::Impersonation,
    }
}

/// One exchange at `service` (impersonation, delegation or client credentials), from the
/// route's `exchange` keys at `path` (a chain step's keys at its own path).
fn build_single(
    path: &str,
    raw: ExchangeFile,
    service: Arc<TokenServiceSettings>,
) -> BuildResult<ExchangeSettings> {
    let ExchangeFile {
        mode,
        audience,
        resource,
        scope,
        subject_token_type,
        requested_token_type,
        actor,
        require_may_act,
        caller,
        purge_on_upstream_status,
        grant,
        ..
    } = raw;
    let mode = mode_name(mode);
    let only_for = |key: &str, set: bool, wanted: ModeKind| -> BuildResult<()> {
        if set && mode != wanted {
            return Err(ConfigProblem::new(
                format!("{path}.{key}"),
                format!("applies to mode {} only", wanted.as_str()),
            ));
        }
        Ok(())
    };
    only_for("actor", actor.is_some(), ModeKind::Delegation)?;
    only_for("require_may_act", require_may_act, ModeKind::Delegation)?;
    only_for("caller", caller.is_some(), ModeKind::ClientCredentials)?;
    if mode == ModeKind::ClientCredentials {
        for (key, set) in [
            ("subject_token_type", subject_token_type.is_some()),
            ("requested_token_type", requested_token_type.is_some()),
            ("grant", grant.is_some()),
        ] {
            if set {
                return Err(ConfigProblem::new(
                    format!("{path}.{key}"),
                    "mode client_credentials sends no subject token; remove this key",
                ));
            }
        }
    }
    let entra = service.profile == Profile::EntraObo;
    let grant = match (mode, grant) {
        (ModeKind::ClientCredentials, _) => Grant::ClientCredentials,
        (ModeKind::Delegation, _) if entra => {
            return Err(ConfigProblem::new(
                format!("{path}.mode"),
                "Entra on-behalf-of has no actor token; use mode impersonation",
            ));
        }
        (ModeKind::Delegation, Some(GrantFile::JwtBearer)) => {
            return Err(ConfigProblem::new(
                format!("{path}.grant"),
                "the jwt-bearer grant has no actor token; use mode impersonation",
            ));
        }
        (_, Some(GrantFile::TokenExchange)) if entra => {
            return Err(ConfigProblem::new(
                format!("{path}.grant"),
                "Entra on-behalf-of is the jwt-bearer grant; remove this key or set jwt_bearer",
            ));
        }
        (_, Some(GrantFile::JwtBearer)) => Grant::JwtBearer,
        (_, None) if entra => Grant::JwtBearer,
        _ => Grant::TokenExchange,
    };
    if entra {
        if !audience.is_empty() || !resource.is_empty() {
            return Err(ConfigProblem::new(
                format!("{path}.audience"),
                "Entra on-behalf-of selects the API by scope (e.g. api://orders/.default); \
                 remove audience and resource",
            ));
        }
        if scope.is_none() {
            return Err(ConfigProblem::new(
                format!("{path}.scope"),
                "required by Entra on-behalf-of (e.g. api://orders/.default)",
            ));
        }
    }
    if grant == Grant::JwtBearer && subject_token_type.is_some() {
        return Err(ConfigProblem::new(
            format!("{path}.subject_token_type"),
            "the jwt-bearer grant sends the subject as an assertion, which has no token type; \
             remove this key",
        ));
    }
    let subject_token_type = match subject_token_type {
        Some(t) => token_type(&format!("{path}.subject_token_type"), &t)?,
        None => ACCESS_TOKEN_TYPE.to_string(),
    };
    let requested_token_type = requested_token_type
        .map(|t| token_type(&format!("{path}.requested_token_type"), &t))
        .transpose()?;
    let mut params = exchange_params(
        path,
        audience,
        resource,
        scope,
        requested_token_type.clone(),
    )?;
    if entra {
        params.insert(0, ("requested_token_use", "on_behalf_of".to_string()));
    }
    let (mode_data, actor_token_type) = match mode {
        ModeKind::Delegation => {
            let (actor, actor_token_type) = build_actor(&format!("{path}.actor"), actor, &service)?;
            (
                ModeSettings::Delegation {
                    actor,
                    require_may_act,
                },
                actor_token_type,
            )
        }
        ModeKind::ClientCredentials => (
            ModeSettings::ClientCredentials {
                caller: match caller {
                    Some(CallerFile::Anonymous) => CallerPolicy::Anonymous,
                    Some(CallerFile::Required) | None => CallerPolicy::Required,
                },
            },
            ACCESS_TOKEN_TYPE.to_string(),
        ),
        _ => (ModeSettings::Impersonation, ACCESS_TOKEN_TYPE.to_string()),
    };
    let key_prefix = profile_digest(
        mode,
        grant,
        &service,
        &subject_token_type,
        &params,
        &actor_token_type,
    );
    let purge_on_upstream_status = purge_statuses(path, purge_on_upstream_status)?;
    Ok(ExchangeSettings {
        purge_on_upstream_status,
        mode: mode_data,
        grant,
        service,
        subject_token_type,
        requested_token_type,
        params,
        key_prefix,
        actor_token_type,
    })
}

/// `exchange.purge_on_upstream_status`: error statuses only (a purge on success would
/// re-exchange on every answer); `[]` turns purging off.
fn purge_statuses(path: &str, raw: Option<Vec<u16>>) -> BuildResult<Vec<u16>> {
    let statuses = raw.unwrap_or_else(|| defaults::PURGE_ON_UPSTREAM_STATUS.to_vec());
    for (i, status) in statuses.iter().enumerate() {
        if !(400..=599).contains(status) {
            return Err(ConfigProblem::new(
                format!("{path}.purge_on_upstream_status[{i}]"),
                format!("{status} is not an error status (expected 400 to 599)"),
            ));
        }
    }
    Ok(statuses)
}

/// RFC 8693 §2.1 parameters other than the tokens, validated, in send order.
fn exchange_params(
    path: &str,
    audience: Vec<String>,
    resource: Vec<String>,
    scope: Option<String>,
    requested_token_type: Option<String>,
) -> BuildResult<Vec<(&'static str, String)>> {
    let mut params: Vec<(&'static str, String)> = Vec::new();
    for (i, a) in audience.into_iter().enumerate() {
        if a.is_empty() {
            return Err(ConfigProblem::new(
                format!("{path}.audience[{i}]"),
                "must not be empty",
            ));
        }
        params.push(("audience", a));
    }
    for (i, r) in resource.into_iter().enumerate() {
        // RFC 8693 §2.1: a resource is an absolute URI without a fragment.
        let url = Url::parse(&r).map_err(|e| {
            ConfigProblem::new(
                format!("{path}.resource[{i}]"),
                format!("invalid URL \"{r}\": {e}"),
            )
        })?;
        if url.fragment().is_some() {
            return Err(ConfigProblem::new(
                format!("{path}.resource[{i}]"),
                format!("\"{r}\" must not have a fragment"),
            ));
        }
        params.push(("resource", r));
    }
    if let Some(scope) = scope {
        if scope.split(' ').any(str::is_empty) {
            return Err(ConfigProblem::new(
                format!("{path}.scope"),
                "scopes are separated by single spaces (RFC 6749 §3.3)",
            ));
        }
        params.push(("scope", scope));
    }
    if let Some(t) = requested_token_type {
        params.push(("requested_token_type", t));
    }
    Ok(params)
}

/// The actor of a delegation: a token file, or the gateway's own client-credentials token at
/// the route's token service.
fn build_actor(
    path: &str,
    raw: Option<ActorFile>,
    service: &Arc<TokenServiceSettings>,
) -> BuildResult<(ActorSettings, String)> {
    let ActorFile {
        token_file,
        token_type: actor_type,
        audience,
        scope,
    } = raw.unwrap_or(ActorFile {
        token_file: None,
        token_type: None,
        audience: Vec::new(),
        scope: None,
    });
    let actor_token_type = match actor_type {
        Some(t) => token_type(&format!("{path}.token_type"), &t)?,
        None => ACCESS_TOKEN_TYPE.to_string(),
    };
    let source = match token_file {
        Some(file) => {
            if !audience.is_empty() || scope.is_some() {
                return Err(ConfigProblem::new(
                    format!("{path}.token_file"),
                    "a token file replaces the gateway's own token; audience and scope apply only without it",
                ));
            }
            ActorSettings::File(file)
        }
        None => {
            let params = exchange_params(path, audience, Vec::new(), scope, None)?;
            let key_prefix = profile_digest(
                ModeKind::ClientCredentials,
                Grant::ClientCredentials,
                service,
                "actor",
                &params,
                "",
            );
            ActorSettings::Own(Arc::new(ExchangeSettings {
                mode: ModeSettings::ClientCredentials {
                    caller: CallerPolicy::Anonymous,
                },
                grant: Grant::ClientCredentials,
                service: service.clone(),
                subject_token_type: String::new(),
                requested_token_type: None,
                params,
                key_prefix,
                actor_token_type: String::new(),
                // The gateway's own token is never what an upstream answers about.
                purge_on_upstream_status: Vec::new(),
            }))
        }
    };
    Ok((source, actor_token_type))
}

fn token_type(path: &str, text: &str) -> BuildResult<String> {
    if let Some((_, urn)) = TOKEN_TYPES.iter().find(|(short, _)| *short == text) {
        return Ok((*urn).to_string());
    }
    if text.starts_with("urn:") && !text.contains(char::is_whitespace) {
        return Ok(text.to_string());
    }
    let short: Vec<&str> = TOKEN_TYPES.iter().map(|(s, _)| *s).collect();
    Err(ConfigProblem::new(
        path,
        format!(
            "unknown token type \"{text}\" (expected one of {} or a urn: URI)",
            short.join(", ")
        ),
    ))
}

/// Length-prefixed SHA-256 over the profile, so no two distinct profiles collide by
/// concatenation.
fn profile_digest(
    mode: ModeKind,
    grant: Grant,
    service: &TokenServiceSettings,
    subject_token_type: &str,
    params: &[(&'static str, String)],
    actor_token_type: &str,
) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut put = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    put(b"txgate-exchange-profile-v2");
    put(mode.as_str().as_bytes());
    put(match grant {
        Grant::TokenExchange => b"token_exchange".as_slice(),
        Grant::JwtBearer => b"jwt_bearer",
        Grant::ClientCredentials => b"client_credentials",
    });
    put(service.name.as_bytes());
    put(service.token_endpoint.as_str().as_bytes());
    put(service.client_id.as_bytes());
    put(subject_token_type.as_bytes());
    put(actor_token_type.as_bytes());
    for (k, v) in params {
        put(k.as_bytes());
        put(v.as_bytes());
    }
    h.finalize().into()
}

fn build_cache(raw: CacheFile) -> BuildResult<CacheSettings> {
    let CacheFile {
        max_entries,
        expiry_skew,
        default_ttl,
        max_ttl,
        negative_ttl,
        refresh_ahead,
        shared,
    } = raw;
    let refresh_ahead = refresh_ahead.unwrap_or(defaults::CACHE_REFRESH_AHEAD);
    if !(refresh_ahead > 0.0 && refresh_ahead <= 1.0) {
        return Err(ConfigProblem::new(
            "cache.refresh_ahead",
            "must be greater than 0 and at most 1 (1 turns refresh-ahead off)",
        ));
    }
    let max_entries = max_entries.unwrap_or(defaults::CACHE_MAX_ENTRIES);
    if max_entries == 0 {
        return Err(ConfigProblem::new(
            "cache.max_entries",
            "must be at least 1",
        ));
    }
    let default_ttl = positive(
        "cache.default_ttl",
        default_ttl.unwrap_or(defaults::CACHE_TTL),
    )?;
    let max_ttl = positive("cache.max_ttl", max_ttl.unwrap_or(defaults::CACHE_MAX_TTL))?;
    if max_ttl < default_ttl {
        return Err(ConfigProblem::new(
            "cache.max_ttl",
            format!(
                "{} is below cache.default_ttl ({}); the longest lifetime cannot be shorter than the default one",
                humantime::format_duration(max_ttl),
                humantime::format_duration(default_ttl)
            ),
        ));
    }
    Ok(CacheSettings {
        max_entries,
        expiry_skew: expiry_skew.unwrap_or(defaults::CACHE_EXPIRY_SKEW),
        default_ttl,
        max_ttl,
        negative_ttl: negative_ttl.unwrap_or(defaults::CACHE_NEGATIVE_TTL),
        refresh_ahead,
        shared: shared.map(shared_cache::build).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(yaml, "t.yaml", &|_| None)
    }

    #[test]
    fn the_built_configuration_prints_no_secret_and_no_actor_token() {
        let dir = std::env::temp_dir().join(format!("txgate-debug-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let actor = dir.join("actor");
        std::fs::write(&actor, "actor-token-never-printed").unwrap();
        let yaml = format!(
            "server: {{ listen: [\"127.0.0.1:0\"] }}\ntoken_services:\n  corp: {{ token_endpoint: \"https://sts.example.com/token\", client_id: gw, client_secret: client-secret-never-printed, auth_method: client_secret_post }}\nroutes:\n  - {{ name: r, match: {{ path_prefix: / }}, upstream: \"http://127.0.0.1:2\", exchange: {{ mode: delegation, token_service: corp, actor: {{ token_file: \"{}\" }} }} }}\n",
            actor.display()
        );
        let config = load(&yaml).unwrap();
        let shown = format!("{config:?} {config:#?}");
        assert!(!shown.contains("client-secret-never-printed"), "{shown}");
        assert!(!shown.contains("actor-token-never-printed"), "{shown}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
