//! Token services as data: endpoints, client authentication, resilience settings and inbound
//! validation, resolved once at load. The live parts (HTTP client, breaker) are built from
//! these by `exchange::TokenService`.
//!
//! Endpoint precedence: explicit keys, then the profile's documented endpoints
//! ([`super::profile`]), then OIDC discovery from `issuer` for whatever is still missing
//! ([`super::discovery`]).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::HeaderValue;
use jsonwebtoken::Algorithm;
use url::Url;

use super::defaults;
use super::discovery::{self, Endpoints, Wanted};
use super::file::{self, AuthMethodFile, InboundFile, TokenServiceFile};
use super::inbound::{InboundSettings, IntrospectionAuth, IntrospectionSettings, JwtSettings};
use super::profile::{self, Profile, ProfileKeys};
use super::{
    BuildResult, CLEAR_TEXT_CREDENTIALS, CLEAR_TEXT_KEYS, ConfigProblem, ConfigWarning,
    clear_text_remote, http_url, is_label, positive,
};
use crate::assertion::AssertionSigner;
use crate::secret::Secret;

/// Most `retries` of one STS call. Every retry runs inside the call's `timeout`, so a larger
/// number buys nothing but load on an STS that is already failing.
pub const MAX_RETRIES: u32 = 5;
/// Largest `inbound.jwt.leeway`. Clocks a day apart are a misconfiguration, not skew, and a
/// longer leeway would accept tokens that expired that long ago.
const MAX_JWT_LEEWAY: Duration = Duration::from_secs(24 * 3600);
/// Bound of each inbound validation cache.
pub(super) const INBOUND_CACHE_ENTRIES: u64 = 100_000;

/// Settings of a token service's concurrency cap, retries and circuit breaker
/// (`token_services.<name>`); the breaker itself is `exchange::resilience::Resilience`.
#[derive(Debug, Clone)]
pub struct ResilienceSettings {
    pub max_concurrent: usize,
    pub queue_timeout: Duration,
    pub retries: u32,
    pub failure_threshold: u32,
    pub open_for: Duration,
}

impl Default for ResilienceSettings {
    fn default() -> Self {
        ResilienceSettings {
            max_concurrent: defaults::STS_MAX_CONCURRENT,
            queue_timeout: defaults::STS_QUEUE_TIMEOUT,
            retries: defaults::STS_RETRIES,
            failure_threshold: defaults::STS_FAILURE_THRESHOLD,
            open_for: defaults::STS_OPEN_FOR,
        }
    }
}

/// A Security Token Service the gateway exchanges tokens at, as configured.
pub struct TokenServiceSettings {
    pub name: String,
    pub profile: Profile,
    pub issuer: Option<String>,
    pub token_endpoint: Url,
    pub jwks_uri: Option<Url>,
    pub introspection_endpoint: Option<Url>,
    pub client_id: String,
    /// The client secret, when the auth method uses one.
    pub client_secret: Option<Secret>,
    pub client_auth: ClientAuth,
    /// Total time one STS call may take; past it the caller gets 504.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Validation of callers' tokens this service issued, for routes without their own.
    pub inbound: Option<Arc<InboundSettings>>,
    /// Concurrency cap, retries and circuit breaker.
    pub resilience: ResilienceSettings,
}

impl fmt::Debug for TokenServiceSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenServiceSettings")
            .field("name", &self.name)
            .field("profile", &self.profile)
            .field("token_endpoint", &self.token_endpoint.as_str())
            .field("client_id", &self.client_id)
            .field("client_auth", &self.client_auth)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TokenServiceSettings {
    /// Plain-HTTP endpoints of this service on another host (see [`super::ConfigWarning`]):
    /// its token endpoint, JWKS URI and introspection endpoint, and those of its `inbound`
    /// block where they differ. Used by `txgate check`, `txgate run` and the status page.
    pub fn transport_warnings(&self) -> Vec<ConfigWarning> {
        let path = format!("token_services.{}", self.name);
        let mut out = Vec::new();
        let mut check = |key: &str, url: Option<&Url>, message: &str| {
            if url.is_some_and(clear_text_remote) {
                out.push(ConfigWarning {
                    path: format!("{path}.{key}"),
                    message: message.into(),
                });
            }
        };
        check(
            "token_endpoint",
            Some(&self.token_endpoint),
            CLEAR_TEXT_CREDENTIALS,
        );
        check("jwks_uri", self.jwks_uri.as_ref(), CLEAR_TEXT_KEYS);
        check(
            "introspection_endpoint",
            self.introspection_endpoint.as_ref(),
            CLEAR_TEXT_CREDENTIALS,
        );
        if let Some(inbound) = &self.inbound {
            out.extend(inbound_warnings(&format!("{path}.inbound"), inbound, self));
        }
        out
    }
}

/// Plain-HTTP URLs of an `inbound` block at `path` that are not `service`'s own (those are
/// reported at the service's keys).
pub(super) fn inbound_warnings(
    path: &str,
    inbound: &InboundSettings,
    service: &TokenServiceSettings,
) -> Vec<ConfigWarning> {
    let mut out = Vec::new();
    if let Some(jwt) = &inbound.jwt
        && Some(&jwt.jwks_uri) != service.jwks_uri.as_ref()
        && clear_text_remote(&jwt.jwks_uri)
    {
        out.push(ConfigWarning {
            path: format!("{path}.jwt.jwks_uri"),
            message: CLEAR_TEXT_KEYS.into(),
        });
    }
    if let Some(introspection) = &inbound.introspection
        && Some(&introspection.endpoint) != service.introspection_endpoint.as_ref()
        && clear_text_remote(&introspection.endpoint)
    {
        out.push(ConfigWarning {
            path: format!("{path}.introspection.endpoint"),
            message: CLEAR_TEXT_CREDENTIALS.into(),
        });
    }
    out
}

/// How the gateway authenticates itself at the token endpoint.
pub enum ClientAuth {
    /// RFC 6749 §2.3.1 `Authorization: Basic`, prebuilt and marked sensitive.
    Basic { header: HeaderValue },
    /// RFC 6749 §2.3.1 `client_id` and `client_secret` in the form body.
    Post,
    /// RFC 7523 `private_key_jwt`: an assertion signed with our private key.
    PrivateKeyJwt(AssertionSigner),
    /// RFC 7523 `client_secret_jwt`: an assertion signed with HMAC over the secret.
    SecretJwt(AssertionSigner),
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientAuth::Basic { .. } => "client_secret_basic",
            ClientAuth::Post => "client_secret_post",
            ClientAuth::PrivateKeyJwt(_) => "private_key_jwt",
            ClientAuth::SecretJwt(_) => "client_secret_jwt",
        })
    }
}

pub(super) fn build_token_service(
    discover: &dyn discovery::Discover,
    path: &str,
    name: &str,
    raw: TokenServiceFile,
) -> BuildResult<TokenServiceSettings> {
    let TokenServiceFile {
        profile,
        issuer,
        token_endpoint,
        jwks_uri,
        introspection_endpoint,
        environment_id,
        region,
        base_url,
        realm,
        authorization_server,
        tenant,
        client_id,
        client_secret,
        client_secret_file,
        private_key_file,
        private_key_id,
        assertion_alg,
        auth_method,
        timeout,
        connect_timeout,
        max_concurrent,
        queue_timeout,
        retries,
        circuit_breaker,
        inbound,
    } = raw;
    if !is_label(name) {
        return Err(ConfigProblem::new(
            path,
            "token service names may use only letters, digits, '-', '_' and '.'",
        ));
    }
    let err = |key: &str, message: String| ConfigProblem::new(format!("{path}.{key}"), message);
    let profile_keys = ProfileKeys {
        environment_id,
        region,
        base_url,
        realm,
        authorization_server,
        tenant,
    };
    let (profile, derived) = profile::derive_endpoints(path, profile, profile_keys)?;

    let timeout = positive(
        &format!("{path}.timeout"),
        timeout.unwrap_or(defaults::STS_TIMEOUT),
    )?;
    let connect_timeout = positive(
        &format!("{path}.connect_timeout"),
        connect_timeout.unwrap_or(defaults::STS_CONNECT_TIMEOUT),
    )?
    .min(timeout);

    let issuer = match issuer {
        Some(i) => Some(http_url(&format!("{path}.issuer"), &i)?.to_string()),
        None => derived.issuer.clone(),
    }
    .map(|i| i.trim_end_matches('/').to_string());
    let explicit = |key: &str, value: Option<String>| -> BuildResult<Option<Url>> {
        value
            .map(|v| http_url(&format!("{path}.{key}"), &v))
            .transpose()
    };
    let wants_jwks = inbound
        .as_ref()
        .and_then(|i| i.jwt.as_ref())
        .is_some_and(|j| j.jwks_uri.is_none());
    let wants_introspection = inbound
        .as_ref()
        .and_then(|i| i.introspection.as_ref())
        .is_some_and(|i| i.endpoint.is_none());
    let mut endpoints = Endpoints {
        token: explicit("token_endpoint", token_endpoint)?.or(derived.token),
        jwks: explicit("jwks_uri", jwks_uri)?.or(derived.jwks),
        introspection: explicit("introspection_endpoint", introspection_endpoint)?
            .or(derived.introspection),
    };
    if let Some(issuer) = &issuer {
        discovery::fill_missing_endpoints(
            discover,
            &format!("{path}.issuer"),
            issuer,
            &mut endpoints,
            Wanted {
                jwks: wants_jwks,
                introspection: wants_introspection,
            },
            connect_timeout,
            timeout,
        )?;
    }
    let Endpoints {
        token: token_endpoint,
        jwks: jwks_uri,
        introspection: introspection_endpoint,
    } = endpoints;
    let token_endpoint = token_endpoint.ok_or_else(|| {
        ConfigProblem::new(
            path.to_string(),
            "set token_endpoint, or issuer for OIDC discovery, or a profile".to_string(),
        )
    })?;

    if client_id.is_empty() {
        return Err(err("client_id", "must not be empty".into()));
    }
    let unset = ResilienceSettings::default();
    let (failure_threshold, open_for) = match circuit_breaker {
        Some(file::CircuitBreakerFile {
            failure_threshold,
            open_for,
        }) => (
            failure_threshold.unwrap_or(unset.failure_threshold),
            open_for.unwrap_or(unset.open_for),
        ),
        None => (unset.failure_threshold, unset.open_for),
    };
    if failure_threshold == 0 {
        return Err(err(
            "circuit_breaker.failure_threshold",
            "must be at least 1".into(),
        ));
    }
    let resilience = ResilienceSettings {
        max_concurrent: match max_concurrent.unwrap_or(unset.max_concurrent) {
            0 => return Err(err("max_concurrent", "must be at least 1".into())),
            n => n,
        },
        queue_timeout: queue_timeout.unwrap_or(unset.queue_timeout),
        retries: match retries.unwrap_or(unset.retries) {
            n if n > MAX_RETRIES => {
                return Err(err(
                    "retries",
                    format!(
                        "{n} is more than {MAX_RETRIES}, the most allowed: retries run inside \
                         the call's timeout, and more of them only add load to a failing STS"
                    ),
                ));
            }
            n => n,
        },
        failure_threshold,
        open_for: positive(&format!("{path}.circuit_breaker.open_for"), open_for)?,
    };
    let secret = match (client_secret, client_secret_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigProblem::new(
                path,
                "set either client_secret or client_secret_file, not both",
            ));
        }
        (Some(s), None) => Some(s),
        (None, Some(file)) => {
            Some(read_secret_file(&file).map_err(|m| err("client_secret_file", m))?)
        }
        (None, None) => None,
    };
    if secret.as_ref().is_some_and(Secret::is_empty) {
        return Err(err("client_secret", "the client secret is empty".into()));
    }
    let alg = assertion_alg
        .map(|a| {
            a.parse::<Algorithm>()
                .map_err(|_| err("assertion_alg", format!("unknown algorithm \"{a}\"")))
        })
        .transpose()?;
    let needs_secret = |secret: &Option<Secret>| -> BuildResult<Secret> {
        secret.clone().ok_or_else(|| {
            ConfigProblem::new(
                path.to_string(),
                "one of client_secret or client_secret_file is required".to_string(),
            )
        })
    };
    if auth_method != AuthMethodFile::PrivateKeyJwt && private_key_file.is_some() {
        return Err(err(
            "private_key_file",
            "is used only with auth_method: private_key_jwt".into(),
        ));
    }
    let client_auth = match auth_method {
        AuthMethodFile::ClientSecretBasic => {
            let header =
                basic_auth(&client_id, &needs_secret(&secret)?).map_err(|m| err("client_id", m))?;
            ClientAuth::Basic { header }
        }
        AuthMethodFile::ClientSecretPost => {
            needs_secret(&secret)?;
            ClientAuth::Post
        }
        AuthMethodFile::ClientSecretJwt => ClientAuth::SecretJwt(
            AssertionSigner::from_secret(&needs_secret(&secret)?, alg)
                .map_err(|m| err("assertion_alg", m))?,
        ),
        AuthMethodFile::PrivateKeyJwt => {
            let key_file = private_key_file.ok_or_else(|| {
                err(
                    "private_key_file",
                    "required for auth_method: private_key_jwt".into(),
                )
            })?;
            ClientAuth::PrivateKeyJwt(
                AssertionSigner::from_pem_file(&key_file, alg, private_key_id)
                    .map_err(|m| err("private_key_file", m))?,
            )
        }
    };

    let inbound = inbound
        .map(|i| {
            build_inbound(
                &format!("{path}.inbound"),
                i,
                &InboundDefaults {
                    issuer: issuer.as_deref(),
                    jwks_uri: jwks_uri.as_ref(),
                    introspection_endpoint: introspection_endpoint.as_ref(),
                    client_id: &client_id,
                    secret: secret.as_ref(),
                    timeout,
                },
            )
        })
        .transpose()?
        .map(Arc::new);

    Ok(TokenServiceSettings {
        name: name.to_string(),
        profile,
        issuer,
        token_endpoint,
        jwks_uri,
        introspection_endpoint,
        client_id,
        client_secret: secret,
        client_auth,
        timeout,
        connect_timeout,
        inbound,
        resilience,
    })
}

fn read_secret_file(file: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read \"{}\": {e}", file.display()))?;
    Ok(Secret::new(text.trim_end_matches(['\r', '\n'])))
}

/// `Authorization: Basic` for a client (RFC 6749 §2.3.1: id and secret are form-urlencoded
/// before Base64), marked sensitive so it never prints.
fn basic_auth(client_id: &str, secret: &Secret) -> Result<HeaderValue, String> {
    let encode =
        |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    let pair = format!("{}:{}", encode(client_id), encode(secret.expose()));
    let mut header = HeaderValue::try_from(format!("Basic {}", BASE64.encode(pair)))
        .map_err(|_| "cannot be sent in an Authorization header".to_string())?;
    header.set_sensitive(true);
    Ok(header)
}

/// What an `inbound:` block falls back to from its token service.
pub(super) struct InboundDefaults<'a> {
    pub issuer: Option<&'a str>,
    pub jwks_uri: Option<&'a Url>,
    pub introspection_endpoint: Option<&'a Url>,
    pub client_id: &'a str,
    pub secret: Option<&'a Secret>,
    pub timeout: Duration,
}

pub(super) fn build_inbound(
    path: &str,
    raw: InboundFile,
    fallback: &InboundDefaults<'_>,
) -> BuildResult<InboundSettings> {
    let InboundFile {
        jwt,
        introspection,
        txn_token,
    } = raw;
    if txn_token.is_some() {
        return Err(ConfigProblem::new(
            format!("{path}.txn_token"),
            "validates the Txn-Token of an internal route: set it on a route with mode none",
        ));
    }
    if jwt.is_none() && introspection.is_none() {
        return Err(ConfigProblem::new(path, "set jwt, introspection, or both"));
    }
    let jwt = jwt
        .map(|j| {
            let file::JwtFile {
                issuer,
                jwks_uri,
                audiences,
                algorithms,
                leeway,
            } = j;
            let p = |k: &str| format!("{path}.jwt.{k}");
            let issuer = issuer
                .or_else(|| fallback.issuer.map(str::to_string))
                .ok_or_else(|| {
                    ConfigProblem::new(
                        p("issuer"),
                        "required (the token service has no issuer)".to_string(),
                    )
                })?;
            let jwks_uri = match jwks_uri {
                Some(u) => http_url(&p("jwks_uri"), &u)?,
                None => fallback.jwks_uri.cloned().ok_or_else(|| {
                    ConfigProblem::new(
                        p("jwks_uri"),
                        "required (the token service has no jwks_uri, profile or discovery)"
                            .to_string(),
                    )
                })?,
            };
            Ok::<_, ConfigProblem>(JwtSettings {
                issuer,
                jwks_uri,
                audiences,
                algorithms: jwt_algorithms(&p("algorithms"), &algorithms)?,
                leeway: jwt_leeway(&p("leeway"), leeway)?,
                refresh_interval: defaults::JWKS_REFRESH_INTERVAL,
                min_refetch_interval: defaults::JWKS_MIN_REFETCH_INTERVAL,
                max_cached: INBOUND_CACHE_ENTRIES,
                typ: None,
            })
        })
        .transpose()?;
    let introspection = introspection
        .map(|i| {
            let file::IntrospectionFile {
                endpoint,
                cache_ttl,
                audiences,
                client_ids,
                negative_cache_ttl,
                max_concurrent,
                queue_timeout,
            } = i;
            let p = |k: &str| format!("{path}.introspection.{k}");
            let endpoint = match endpoint {
                Some(u) => http_url(&p("endpoint"), &u)?,
                None => fallback.introspection_endpoint.cloned().ok_or_else(|| {
                    ConfigProblem::new(
                        p("endpoint"),
                        "required (the token service has no introspection_endpoint)".to_string(),
                    )
                })?,
            };
            let secret = fallback.secret.ok_or_else(|| {
                ConfigProblem::new(
                    format!("{path}.introspection"),
                    "introspection authenticates with the token service's client secret; set client_secret".to_string(),
                )
            })?;
            let header = basic_auth(fallback.client_id, secret)
                .map_err(|m| ConfigProblem::new(format!("{path}.introspection"), m))?;
            Ok::<_, ConfigProblem>(IntrospectionSettings {
                    endpoint,
                    client_id: fallback.client_id.to_string(),
                    auth: IntrospectionAuth::Basic { header },
                    timeout: fallback.timeout,
                    cache_ttl: positive(
                        &p("cache_ttl"),
                        cache_ttl.unwrap_or(defaults::INTROSPECTION_CACHE_TTL),
                    )?,
                    max_cached: INBOUND_CACHE_ENTRIES,
                    audiences: non_empty(&p("audiences"), audiences)?,
                    client_ids: non_empty(&p("client_ids"), client_ids)?,
                    negative_cache_ttl: negative_cache_ttl
                        .unwrap_or(defaults::INTROSPECTION_NEGATIVE_TTL),
                    max_concurrent: match max_concurrent
                        .unwrap_or(defaults::INTROSPECTION_MAX_CONCURRENT)
                    {
                        0 => return Err(ConfigProblem::new(p("max_concurrent"), "must be at least 1")),
                        n => n,
                    },
                    queue_timeout: queue_timeout
                        .unwrap_or(defaults::INTROSPECTION_QUEUE_TIMEOUT),
            })
        })
        .transpose()?;
    Ok(InboundSettings { jwt, introspection })
}

/// `algorithms` of a JWT validator at `path`: the defaults when empty.
pub(super) fn jwt_algorithms(path: &str, algorithms: &[String]) -> BuildResult<Vec<Algorithm>> {
    if algorithms.is_empty() {
        return Ok(defaults::JWT_ALGORITHMS.to_vec());
    }
    algorithms
        .iter()
        .enumerate()
        .map(|(i, a)| allowed_algorithm(&format!("{path}[{i}]"), a))
        .collect()
}

/// `leeway` of a JWT validator at `path`: the default when absent, at most a day.
pub(super) fn jwt_leeway(path: &str, leeway: Option<Duration>) -> BuildResult<Duration> {
    match leeway.unwrap_or(defaults::JWT_LEEWAY) {
        l if l > MAX_JWT_LEEWAY => Err(ConfigProblem::new(
            path,
            format!(
                "{} is more than a day, the most allowed: clocks that far apart are a \
                 misconfiguration, and a token that expired that long ago would still be accepted",
                humantime::format_duration(l)
            ),
        )),
        l => Ok(l),
    }
}

/// A list of accepted values with no empty entry (an empty string would match a claim that
/// is present but says nothing).
fn non_empty(path: &str, values: Vec<String>) -> BuildResult<Vec<String>> {
    if let Some(i) = values.iter().position(String::is_empty) {
        return Err(ConfigProblem::new(
            format!("{path}[{i}]"),
            "must not be empty",
        ));
    }
    Ok(values)
}

/// An inbound `alg`: asymmetric only. `none` would accept unsigned tokens, and an HMAC
/// algorithm against a JWKS is the key-confusion attack of RFC 8725 §2.1.
fn allowed_algorithm(path: &str, text: &str) -> BuildResult<Algorithm> {
    let alg = text.parse::<Algorithm>().map_err(|_| {
        ConfigProblem::new(path.to_string(), format!("unknown algorithm \"{text}\""))
    })?;
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Err(ConfigProblem::new(
            path.to_string(),
            format!(
                "{text} is a shared-secret algorithm; inbound tokens are verified with public keys"
            ),
        )),
        _ => Ok(alg),
    }
}
