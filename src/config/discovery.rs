//! OIDC discovery: the endpoints of a token service read from its issuer's metadata document
//! (OpenID Connect Discovery 1.0 §4, RFC 8414 §3).
//!
//! This is the one place where loading the configuration touches the network. It runs while
//! the config loads — `txgate check`, `txgate run` and every reload — and only for a token
//! service that has an `issuer` (written or from its profile) and still lacks an endpoint after
//! the explicit keys and the profile: the token endpoint, or the JWKS URI or introspection
//! endpoint its `inbound` block needs. A document that cannot be fetched in the service's
//! `timeout`, or that names another issuer, is a config error at `issuer`.

use std::time::Duration;

use url::Url;

use super::{BuildResult, ConfigProblem};

/// Endpoints found by OIDC discovery (OpenID Connect Discovery 1.0 §3, RFC 8414 §2).
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Discovered {
    pub issuer: Option<String>,
    pub token_endpoint: Option<String>,
    pub jwks_uri: Option<String>,
    pub introspection_endpoint: Option<String>,
}

/// A token service's endpoints as far as they are known; discovery fills the gaps.
pub(super) struct Endpoints {
    pub token: Option<Url>,
    pub jwks: Option<Url>,
    pub introspection: Option<Url>,
}

/// Which endpoints besides the token endpoint the service needs: those its `inbound` block
/// uses without naming them itself.
pub(super) struct Wanted {
    pub jwks: bool,
    pub introspection: bool,
}

/// Fills the endpoints of `known` that are missing and needed from the discovery document of
/// `issuer`; does nothing, and no I/O, when none is. Called once per token service by
/// [`super::token_service`] while it is built; `path` is the `issuer` key, where any failure
/// is reported.
pub(super) fn fill_missing_endpoints(
    path: &str,
    issuer: &str,
    known: &mut Endpoints,
    wanted: Wanted,
    connect_timeout: Duration,
    timeout: Duration,
) -> BuildResult<()> {
    let missing = known.token.is_none()
        || (wanted.jwks && known.jwks.is_none())
        || (wanted.introspection && known.introspection.is_none());
    if !missing {
        return Ok(());
    }
    let err = |message: String| ConfigProblem::new(path, message);
    // A client of its own: its pooled connections belong to discovery's short-lived runtime,
    // not to the proxy's.
    let client = crate::exchange::http_client(connect_timeout)
        .map_err(|e| err(format!("cannot build the discovery client: {e}")))?;
    let found = discover(issuer, &client, timeout).map_err(err)?;
    let pick = |key: &str, v: Option<String>| -> BuildResult<Option<Url>> {
        v.map(|u| {
            Url::parse(&u)
                .map_err(|e| err(format!("discovery returned an invalid {key} \"{u}\": {e}")))
        })
        .transpose()
    };
    if known.token.is_none() {
        known.token = pick("token_endpoint", found.token_endpoint)?;
    }
    if known.jwks.is_none() {
        known.jwks = pick("jwks_uri", found.jwks_uri)?;
    }
    if known.introspection.is_none() {
        known.introspection = pick("introspection_endpoint", found.introspection_endpoint)?;
    }
    Ok(())
}

/// Fetches `<issuer>/.well-known/openid-configuration` (RFC 8414 §3 path as fallback) and
/// checks that the document is for this issuer (OpenID Connect Discovery §4.3). Runs on its
/// own thread and runtime so config loading works from any context, async or not.
fn discover(issuer: &str, http: &reqwest::Client, timeout: Duration) -> Result<Discovered, String> {
    let issuer = issuer.to_string();
    let http = http.clone();
    let fetch = move || -> Result<Discovered, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot run discovery: {e}"))?;
        runtime.block_on(async {
            let mut last = String::new();
            for suffix in [
                "/.well-known/openid-configuration",
                "/.well-known/oauth-authorization-server",
            ] {
                let url = format!("{issuer}{suffix}");
                let answer = tokio::time::timeout(timeout, async {
                    let response = http.get(&url).send().await.map_err(|e| e.to_string())?;
                    if !response.status().is_success() {
                        return Err(format!("HTTP {}", response.status().as_u16()));
                    }
                    response
                        .json::<Discovered>()
                        .await
                        .map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
                match answer {
                    Ok(doc) => {
                        let found = doc.issuer.as_deref().map(|i| i.trim_end_matches('/'));
                        if found != Some(issuer.as_str()) {
                            return Err(format!(
                                "discovery at {url} is for issuer {:?}, not \"{issuer}\"",
                                doc.issuer.as_deref().unwrap_or("(none)")
                            ));
                        }
                        return Ok(doc);
                    }
                    Err(e) => last = format!("OIDC discovery at {url} failed: {e}"),
                }
            }
            Err(last)
        })
    };
    std::thread::scope(|scope| {
        scope
            .spawn(fetch)
            .join()
            .unwrap_or_else(|_| Err("discovery failed".to_string()))
    })
}
