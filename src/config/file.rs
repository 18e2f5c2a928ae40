//! The serde mirror of `gateway.yaml`.
//!
//! These types are the file format and nothing else: strings stay strings, and every struct
//! rejects unknown keys so a typo is an error instead of a setting that silently never applies.
//! [`super::Config`] is built from them once, at load; the request path never sees these types.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::Visitor;
use serde::{Deserialize, Deserializer};

use crate::secret::Secret;

/// A duration key (`Option<Duration>`), in humantime's syntax: `500ms`, `2s`, `1m 30s`.
///
/// Ours rather than `humantime_serde`'s, so that text humantime does not read is refused in
/// our own words; the key path is added by the loader.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    struct Text;
    impl Visitor<'_> for Text {
        type Value = Duration;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
            humantime::parse_duration(text).map_err(|_| {
                E::custom(format!(
                    "invalid duration {text:?} (expected e.g. 500ms, 2s, 1m 30s)"
                ))
            })
        }
    }
    struct DurationText(Duration);
    impl<'de> Deserialize<'de> for DurationText {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_str(Text).map(DurationText)
        }
    }
    Ok(Option::<DurationText>::deserialize(d)?.map(|t| t.0))
}

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
    /// Proxy listeners, `host:port`; none when absent (then `server.tls` or `server.ext_authz`
    /// must listen).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`); none when absent.
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// Worker threads for the proxy; [`super::defaults::THREADS`] when absent.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Let idle worker threads take queued work from busy ones (tokio work stealing); off
    /// when absent: each thread runs its own connections, which costs less per request.
    #[serde(default)]
    pub work_stealing: Option<bool>,
    #[serde(default, deserialize_with = "duration")]
    pub grace_period: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub shutdown_timeout: Option<Duration>,
    #[serde(default)]
    pub max_token_bytes: Option<usize>,
    /// Largest total request header block accepted; larger → 431.
    #[serde(default)]
    pub max_request_header_bytes: Option<usize>,
    /// Downstream TLS listeners.
    #[serde(default)]
    pub tls: Option<ServerTlsFile>,
    /// Reload when the config file changes, checking this often; off when absent (SIGHUP
    /// always reloads).
    #[serde(default, deserialize_with = "duration")]
    pub watch_config: Option<Duration>,
    /// Decode unreserved escapes and remove dot segments before routing; default true.
    #[serde(default)]
    pub normalize_path: Option<bool>,
    /// Merge repeated slashes in paths before routing; default true.
    #[serde(default)]
    pub merge_slashes: Option<bool>,
    /// `%2F`, `%5C` and `\` in paths; default `reject_request`.
    #[serde(default)]
    pub path_with_escaped_slashes_action: Option<EscapedSlashesFile>,
    /// Accept HTTP/2 with prior knowledge (h2c) on the plain listeners too; default false.
    #[serde(default)]
    pub h2c: Option<bool>,
    /// The ext_authz front door for Envoy, Istio and Envoy Gateway; none when absent.
    #[serde(default)]
    pub ext_authz: Option<ExtAuthzFile>,
}

/// `server.ext_authz:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtAuthzFile {
    /// `envoy.service.auth.v3.Authorization/Check` over gRPC (h2c), `host:port`.
    #[serde(default)]
    pub grpc_listen: Option<String>,
    /// Envoy's HTTP authorization service contract, `host:port`.
    #[serde(default)]
    pub http_listen: Option<String>,
}

/// `server.path_with_escaped_slashes_action:`
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashesFile {
    RejectRequest,
    KeepUnchanged,
    UnescapeAndForward,
}

/// `server.tls:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsFile {
    pub listen: Vec<String>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// How often the files are checked for changes; [`super::defaults::TLS_RELOAD_INTERVAL`]
    /// when absent.
    #[serde(default, deserialize_with = "duration")]
    pub reload_interval: Option<Duration>,
}

/// `token_services.<name>:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenServiceFile {
    /// Which STS family this is; decides endpoint derivation and the grant used.
    #[serde(default)]
    pub profile: ProfileFile,
    /// The issuer; with the generic profile and no `token_endpoint`, OIDC discovery at
    /// `<issuer>/.well-known/openid-configuration` fills the endpoints.
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub token_endpoint: Option<String>,
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub introspection_endpoint: Option<String>,
    /// `profile: pingone`
    #[serde(default)]
    pub environment_id: Option<String>,
    /// `profile: pingone`: `com`, `eu`, `ca`, `asia`, `com.au`, `sg`;
    /// [`super::defaults::PINGONE_REGION`] when absent.
    #[serde(default)]
    pub region: Option<String>,
    /// `profile: keycloak`
    #[serde(default)]
    pub base_url: Option<String>,
    /// `profile: keycloak`
    #[serde(default)]
    pub realm: Option<String>,
    /// `profile: okta`: the authorization server URL, e.g. `https://x.okta.com/oauth2/default`.
    #[serde(default)]
    pub authorization_server: Option<String>,
    /// `profile: entra_obo`: the directory (tenant) id or domain.
    #[serde(default)]
    pub tenant: Option<String>,
    pub client_id: String,
    /// A [`Secret`] already here, so a `{:?}` of the parsed file shows no secret.
    #[serde(default)]
    pub client_secret: Option<Secret>,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// `private_key_jwt`: PEM RSA or EC private key.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// `private_key_jwt`: `kid` header of the assertions.
    #[serde(default)]
    pub private_key_id: Option<String>,
    /// Assertion algorithm for `private_key_jwt` / `client_secret_jwt`; from the key if absent.
    #[serde(default)]
    pub assertion_alg: Option<String>,
    #[serde(default)]
    pub auth_method: AuthMethodFile,
    #[serde(default, deserialize_with = "duration")]
    pub timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub connect_timeout: Option<Duration>,
    /// Most STS calls in flight at once; more wait `queue_timeout`, then get 503.
    #[serde(default)]
    pub max_concurrent: Option<usize>,
    #[serde(default, deserialize_with = "duration")]
    pub queue_timeout: Option<Duration>,
    /// Retries of a call that got no connection or a 503 (within `timeout`).
    #[serde(default)]
    pub retries: Option<u32>,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerFile>,
    /// Validation of callers' tokens issued by this service, for every route using it.
    #[serde(default)]
    pub inbound: Option<InboundFile>,
}

/// `token_services.<name>.auth_method:` — how the gateway authenticates to the STS.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethodFile {
    /// RFC 6749 §2.3.1, HTTP Basic.
    #[default]
    ClientSecretBasic,
    /// RFC 6749 §2.3.1, credentials in the form body.
    ClientSecretPost,
    /// RFC 7523 assertion signed with a private key.
    PrivateKeyJwt,
    /// RFC 7523 assertion signed with HMAC over the client secret.
    ClientSecretJwt,
}

/// `token_services.<name>.circuit_breaker:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerFile {
    #[serde(default)]
    pub failure_threshold: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    pub open_for: Option<Duration>,
}

/// `token_services.<name>.profile:`
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProfileFile {
    #[default]
    Generic,
    Pingone,
    Keycloak,
    Okta,
    EntraObo,
}

/// `inbound:` on a token service or a route.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct InboundFile {
    #[serde(default)]
    pub jwt: Option<JwtFile>,
    #[serde(default)]
    pub introspection: Option<IntrospectionFile>,
    /// Internal routes (`mode: none`): the `Txn-Token` header every request must carry.
    #[serde(default)]
    pub txn_token: Option<TxnTokenFile>,
}

/// `inbound.txn_token:` — validation of an incoming Transaction Token
/// (draft-ietf-oauth-transaction-tokens): a JWT of `typ` `txntoken+jwt` for the trust domain.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TxnTokenFile {
    /// The `aud` every Txn-Token must carry.
    pub trust_domain: String,
    /// The Transaction Token Service's `iss`.
    pub issuer: String,
    /// Where the Transaction Token Service publishes its keys.
    pub jwks_uri: String,
    #[serde(default)]
    pub algorithms: Vec<String>,
    #[serde(default, deserialize_with = "duration")]
    pub leeway: Option<Duration>,
}

/// `inbound.jwt:`
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct JwtFile {
    /// Required `iss`; the token service's issuer when absent.
    #[serde(default)]
    pub issuer: Option<String>,
    /// The token service's `jwks_uri` (explicit, profile or discovery) when absent.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Accepted `aud` values; empty accepts any audience.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Allowed `alg` values; RS256 and ES256 when absent. `none` and HMAC are refused.
    #[serde(default)]
    pub algorithms: Vec<String>,
    #[serde(default, deserialize_with = "duration")]
    pub leeway: Option<Duration>,
}

/// `inbound.introspection:` (RFC 7662), authenticated as the token service's client.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionFile {
    /// The token service's `introspection_endpoint` when absent.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Longest reuse of an `active` answer (never past the token's `exp`);
    /// [`super::defaults::INTROSPECTION_CACHE_TTL`] when absent.
    #[serde(default, deserialize_with = "duration")]
    pub cache_ttl: Option<Duration>,
    /// Accepted `aud` values of the answer; empty (the default) does not check `aud`.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accepted `client_id` values of the answer; empty (the default) does not check it.
    #[serde(default)]
    pub client_ids: Vec<String>,
    /// How long a refusal (inactive, a refresh token, wrong audience or client) is remembered;
    /// default 30 s, 0 turns it off.
    #[serde(default, deserialize_with = "duration")]
    pub negative_cache_ttl: Option<Duration>,
    /// Most introspection calls in flight; more wait `queue_timeout`, then get 503. Default 64.
    #[serde(default)]
    pub max_concurrent: Option<usize>,
    /// Default 250 ms.
    #[serde(default, deserialize_with = "duration")]
    pub queue_timeout: Option<Duration>,
}

/// `routes[]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: String,
    pub r#match: MatchFile,
    pub upstream: UpstreamFile,
    /// Header rules applied before forwarding.
    #[serde(default)]
    pub headers: Option<HeadersFile>,
    pub exchange: ExchangeFile,
    /// Validation of callers' tokens on this route; overrides the token service's `inbound`.
    #[serde(default)]
    pub inbound: Option<InboundFile>,
}

/// `routes[].upstream:` — one URL, or peers with TLS, timeouts and a health check.
#[derive(Debug)]
pub enum UpstreamFile {
    Url(String),
    Peers(Box<UpstreamPeersFile>),
}

impl<'de> Deserialize<'de> for UpstreamFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UpstreamFile;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an upstream URL or a map with `peers`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UpstreamFile, E> {
                Ok(UpstreamFile::Url(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<UpstreamFile, A::Error> {
                UpstreamPeersFile::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|p| UpstreamFile::Peers(Box::new(p)))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `routes[].upstream:` as a map.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamPeersFile {
    pub peers: Vec<String>,
    #[serde(default)]
    pub tls: Option<UpstreamTlsFile>,
    #[serde(default, deserialize_with = "duration")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub read_timeout: Option<Duration>,
    #[serde(default)]
    pub health_check: Option<HealthCheckFile>,
    /// The HTTP version spoken to the peers; `auto` when absent.
    #[serde(default)]
    pub protocol: Option<UpstreamProtocolFile>,
}

/// `routes[].upstream.protocol:`
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocolFile {
    Http1,
    H2,
    H2c,
    Auto,
}

/// `routes[].upstream.tls:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsFile {
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    #[serde(default)]
    pub verify: Option<bool>,
}

/// `routes[].upstream.health_check:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckFile {
    pub path: String,
    #[serde(default, deserialize_with = "duration")]
    pub interval: Option<Duration>,
    #[serde(default)]
    pub unhealthy_after: Option<usize>,
    #[serde(default)]
    pub healthy_after: Option<usize>,
}

/// `routes[].headers:`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HeadersFile {
    #[serde(default)]
    pub remove: Vec<String>,
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// `X-Forwarded-For`, `-Proto`, `-Host` to the upstream;
    /// [`super::defaults::FORWARDED_HEADERS`] when absent.
    #[serde(default)]
    pub forwarded: Option<bool>,
    /// `X-Request-Id` to the upstream and on the response;
    /// [`super::defaults::REQUEST_ID_HEADER`] when absent.
    #[serde(default)]
    pub request_id: Option<bool>,
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
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ExchangeFile {
    pub mode: ModeFile,
    #[serde(default)]
    pub token_service: Option<String>,
    /// Several token services, the caller's validated `iss` picks one.
    #[serde(default)]
    pub token_services: Option<Vec<String>>,
    /// `token_exchange` (default) or `jwt_bearer`.
    #[serde(default)]
    pub grant: Option<GrantFile>,
    /// Several exchanges in a row, each step's result the next one's subject.
    #[serde(default)]
    pub chain: Option<Vec<ChainStepFile>>,
    /// `transaction_token`: the trust domain (the request's `audience`).
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// `transaction_token`: the purpose (the request's `scope`).
    #[serde(default)]
    pub purpose: Option<String>,
    /// `transaction_token`: the request attributes sent as `request_context`.
    #[serde(default)]
    pub request_context: Option<Vec<ContextAttributeFile>>,
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
    /// `delegation`: where the actor token comes from; the gateway's own client-credentials
    /// token at the route's token service when absent.
    #[serde(default)]
    pub actor: Option<ActorFile>,
    /// `delegation`: the subject token's `may_act` claim must name the actor (RFC 8693 §4.4).
    #[serde(default)]
    pub require_may_act: bool,
    /// `client_credentials`: `required` (default) or `anonymous`.
    #[serde(default)]
    pub caller: Option<CallerFile>,
    /// Upstream statuses that drop the cached token (and retry a repeatable request once);
    /// [`super::defaults::PURGE_ON_UPSTREAM_STATUS`] when absent.
    #[serde(default)]
    pub purge_on_upstream_status: Option<Vec<u16>>,
}

/// `routes[].exchange.grant:`
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GrantFile {
    TokenExchange,
    JwtBearer,
}

/// `routes[].exchange.chain[]:`
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ChainStepFile {
    pub token_service: String,
    #[serde(default)]
    pub grant: Option<GrantFile>,
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

/// `routes[].exchange.request_context[]:`
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ContextAttributeFile {
    Method,
    Path,
    ClientAddress,
}

/// `routes[].exchange.actor:`
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ActorFile {
    /// A file holding the actor token, re-read when it changes (a platform rotates it).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// `actor_token_type`; `access_token` when absent.
    #[serde(default)]
    pub token_type: Option<String>,
    /// For the gateway's own token: `audience` of its client-credentials request.
    #[serde(default)]
    pub audience: Vec<String>,
    /// For the gateway's own token: `scope` of its client-credentials request.
    #[serde(default)]
    pub scope: Option<String>,
}

/// `routes[].exchange.caller:`
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CallerFile {
    Required,
    Anonymous,
}

/// `routes[].exchange.mode:`
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModeFile {
    Impersonation,
    Delegation,
    ClientCredentials,
    TransactionToken,
    None,
}

/// `cache:`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    #[serde(default)]
    pub max_entries: Option<u64>,
    #[serde(default, deserialize_with = "duration")]
    pub expiry_skew: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub default_ttl: Option<Duration>,
    /// Longest lifetime of any entry; at least `default_ttl`.
    #[serde(default, deserialize_with = "duration")]
    pub max_ttl: Option<Duration>,
    /// How long a definitive rejection (`invalid_grant`, `invalid_request`, `invalid_target`)
    /// is remembered; 0 turns negative caching off.
    #[serde(default, deserialize_with = "duration")]
    pub negative_ttl: Option<Duration>,
    /// Share of an entry's lifetime after which a hit also re-exchanges in the background.
    #[serde(default)]
    pub refresh_ahead: Option<f64>,
    /// The second cache level, on Redis, shared by replicas; none when absent.
    #[serde(default)]
    pub shared: Option<SharedCacheFile>,
}

/// `cache.shared:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedCacheFile {
    /// `redis://host:port/db`, `rediss://` (TLS) or `redis+unix:///path`; no credentials.
    pub url: String,
    #[serde(default)]
    pub username: Option<String>,
    /// A [`Secret`] already here, so a `{:?}` of the parsed file shows no password.
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Base64 32-byte keys, one per line; the first seals, all open.
    pub encryption_key_file: PathBuf,
    /// [`super::defaults::SHARED_CACHE_KEY_PREFIX`] when absent.
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// Per Redis operation; [`super::defaults::SHARED_CACHE_TIMEOUT`] when absent.
    #[serde(default, deserialize_with = "duration")]
    pub timeout: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parsed_file_prints_no_secret() {
        let yaml = "server: { listen: [\"127.0.0.1:0\"] }\ntoken_services:\n  corp:\n    token_endpoint: \"https://sts.example.com/token\"\n    client_id: gateway\n    client_secret: \"s3cr3t-value-from-the-file\"\n";
        let file: GatewayFile = serde_yaml::from_str(yaml).unwrap();
        let shown = format!("{file:?} {:#?}", file.token_services["corp"]);
        assert!(!shown.contains("s3cr3t-value-from-the-file"), "{shown}");
        assert!(shown.contains("client_id: \"gateway\""), "{shown}");
        let secret = file.token_services["corp"].client_secret.as_ref().unwrap();
        assert_eq!(secret.expose(), "s3cr3t-value-from-the-file");
    }
}
