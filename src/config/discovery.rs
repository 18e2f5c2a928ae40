//! OIDC discovery: the endpoints of a token service read from its issuer's metadata document
//! (OpenID Connect Discovery 1.0 §4, RFC 8414 §3).
//!
//! Loading the configuration never touches the network itself: whoever loads it passes a
//! [`Discover`] — `txgate check`, `txgate run` and every reload pass
//! `exchange::discovery::OidcDiscovery`, which fetches the document; [`NoDiscovery`] refuses.
//! It is asked only for a token service that has an `issuer` (written or from its profile) and
//! still lacks an endpoint after the explicit keys and the profile: the token endpoint, or the
//! JWKS URI or introspection endpoint its `inbound` block needs. A document that cannot be
//! fetched in the service's `timeout`, or that names another issuer, is a config error at
//! `issuer`.

use std::time::Duration;

use url::Url;

use super::{BuildResult, ConfigProblem};

/// Fetches an issuer's discovery document: the one network step of loading, explicit at
/// every call of [`super::Config::load`].
pub trait Discover {
    /// The document of `issuer`, checked to be for that issuer; the error is a sentence.
    fn document(
        &self,
        issuer: &str,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Discovered, String>;
}

/// Refuses every discovery: for loads that must stay off the network (tests of the config
/// rules, fuzzing). A configuration that needs discovery then fails at its `issuer` key.
pub struct NoDiscovery;

impl Discover for NoDiscovery {
    fn document(&self, issuer: &str, _: Duration, _: Duration) -> Result<Discovered, String> {
        Err(format!(
            "OIDC discovery at {issuer} is needed, and this load does not run it"
        ))
    }
}

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
    discover: &dyn Discover,
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
    let found = discover
        .document(issuer, connect_timeout, timeout)
        .map_err(err)?;
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
