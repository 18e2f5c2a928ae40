//! Provider profiles: which STS family a token service is, and the endpoints that family
//! documents, derived from a few keys (PingOne's environment and region, Keycloak's base URL
//! and realm, Okta's authorization server, Entra's tenant).
//!
//! Runs at config load for every token service, without network access. Explicit endpoint
//! keys win over what is derived here; OIDC discovery ([`super::discovery`]) fills only what
//! is still missing after both.

use url::Url;

use super::defaults;
use super::file::ProfileFile;
use super::{BuildResult, ConfigProblem, http_url};

/// PingOne regions and their top-level domains.
pub const PINGONE_REGIONS: &[(&str, &str)] = &[
    ("com", "auth.pingone.com"),
    ("eu", "auth.pingone.eu"),
    ("ca", "auth.pingone.ca"),
    ("asia", "auth.pingone.asia"),
    ("com.au", "auth.pingone.com.au"),
    ("sg", "auth.pingone.sg"),
];

/// Which STS family a token service is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Generic,
    PingOne,
    Keycloak,
    Okta,
    /// Microsoft Entra ID on-behalf-of: the jwt-bearer grant instead of token exchange.
    EntraObo,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Generic => "generic",
            Profile::PingOne => "pingone",
            Profile::Keycloak => "keycloak",
            Profile::Okta => "okta",
            Profile::EntraObo => "entra_obo",
        }
    }
}

/// The profile keys of a token service, as written in the file.
pub(super) struct ProfileKeys {
    pub environment_id: Option<String>,
    pub region: Option<String>,
    pub base_url: Option<String>,
    pub realm: Option<String>,
    pub authorization_server: Option<String>,
    pub tenant: Option<String>,
}

/// What a profile says about a token service: its issuer and the endpoints the provider
/// documents (none for `generic`).
#[derive(Default)]
pub(super) struct Derived {
    pub issuer: Option<String>,
    pub token: Option<Url>,
    pub jwks: Option<Url>,
    pub introspection: Option<Url>,
}

/// The endpoints a provider documents, from its profile keys. Keys of another profile are
/// errors, so a PingOne `region` on a Keycloak service does not silently do nothing.
pub(super) fn derive_endpoints(
    path: &str,
    profile: ProfileFile,
    keys: ProfileKeys,
) -> BuildResult<(Profile, Derived)> {
    let ProfileKeys {
        environment_id,
        region,
        base_url,
        realm,
        authorization_server,
        tenant,
    } = keys;
    let allowed: &[&str] = match profile {
        ProfileFile::Generic => &[],
        ProfileFile::Pingone => &["environment_id", "region"],
        ProfileFile::Keycloak => &["base_url", "realm"],
        ProfileFile::Okta => &["authorization_server"],
        ProfileFile::EntraObo => &["tenant"],
    };
    for (key, set) in [
        ("environment_id", environment_id.is_some()),
        ("region", region.is_some()),
        ("base_url", base_url.is_some()),
        ("realm", realm.is_some()),
        ("authorization_server", authorization_server.is_some()),
        ("tenant", tenant.is_some()),
    ] {
        if set && !allowed.contains(&key) {
            return Err(ConfigProblem::new(
                format!("{path}.{key}"),
                format!("is not a key of profile {}", profile_name(profile)),
            ));
        }
    }
    let required = |key: &str, v: Option<String>| {
        v.filter(|s| !s.is_empty()).ok_or_else(|| {
            ConfigProblem::new(
                format!("{path}.{key}"),
                format!("required by profile {}", profile_name(profile)),
            )
        })
    };
    let url = |key: &str, text: String| {
        Url::parse(&text).map_err(|e| {
            ConfigProblem::new(
                format!("{path}.{key}"),
                format!("invalid URL \"{text}\": {e}"),
            )
        })
    };
    let from_issuer =
        |issuer: String, token: &str, jwks: &str, introspect: &str| -> BuildResult<Derived> {
            Ok(Derived {
                token: Some(url("issuer", format!("{issuer}{token}"))?),
                jwks: Some(url("issuer", format!("{issuer}{jwks}"))?),
                introspection: Some(url("issuer", format!("{issuer}{introspect}"))?),
                issuer: Some(issuer),
            })
        };
    match profile {
        ProfileFile::Generic => Ok((Profile::Generic, Derived::default())),
        ProfileFile::Pingone => {
            let env = required("environment_id", environment_id)?;
            if !is_uuid(&env) {
                return Err(ConfigProblem::new(
                    format!("{path}.environment_id"),
                    format!("\"{env}\" is not a PingOne environment id (a UUID)"),
                ));
            }
            let region = region.unwrap_or_else(|| defaults::PINGONE_REGION.to_string());
            let host = PINGONE_REGIONS
                .iter()
                .find(|(r, _)| *r == region)
                .map(|(_, h)| *h)
                .ok_or_else(|| {
                    let known: Vec<&str> = PINGONE_REGIONS.iter().map(|(r, _)| *r).collect();
                    ConfigProblem::new(
                        format!("{path}.region"),
                        format!(
                            "unknown PingOne region \"{region}\" (known: {})",
                            known.join(", ")
                        ),
                    )
                })?;
            let issuer = format!("https://{host}/{}/as", env.to_ascii_lowercase());
            Ok((
                Profile::PingOne,
                from_issuer(issuer, "/token", "/jwks", "/introspect")?,
            ))
        }
        ProfileFile::Keycloak => {
            let base = http_url(
                &format!("{path}.base_url"),
                &required("base_url", base_url)?,
            )?;
            let realm = required("realm", realm)?;
            if realm.contains(['/', '?', '#']) {
                return Err(ConfigProblem::new(
                    format!("{path}.realm"),
                    format!("invalid realm \"{realm}\""),
                ));
            }
            let issuer = format!("{}/realms/{realm}", base.as_str().trim_end_matches('/'));
            Ok((
                Profile::Keycloak,
                from_issuer(
                    issuer,
                    "/protocol/openid-connect/token",
                    "/protocol/openid-connect/certs",
                    "/protocol/openid-connect/token/introspect",
                )?,
            ))
        }
        ProfileFile::Okta => {
            let server = http_url(
                &format!("{path}.authorization_server"),
                &required("authorization_server", authorization_server)?,
            )?;
            let issuer = server.as_str().trim_end_matches('/').to_string();
            Ok((
                Profile::Okta,
                from_issuer(issuer, "/v1/token", "/v1/keys", "/v1/introspect")?,
            ))
        }
        ProfileFile::EntraObo => {
            let tenant = required("tenant", tenant)?;
            if !tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return Err(ConfigProblem::new(
                    format!("{path}.tenant"),
                    format!("invalid tenant \"{tenant}\""),
                ));
            }
            let login = format!("https://login.microsoftonline.com/{tenant}");
            Ok((
                Profile::EntraObo,
                Derived {
                    issuer: Some(format!("{login}/v2.0")),
                    token: Some(url("tenant", format!("{login}/oauth2/v2.0/token"))?),
                    jwks: Some(url("tenant", format!("{login}/discovery/v2.0/keys"))?),
                    introspection: None,
                },
            ))
        }
    }
}

fn profile_name(profile: ProfileFile) -> &'static str {
    match profile {
        ProfileFile::Generic => "generic",
        ProfileFile::Pingone => "pingone",
        ProfileFile::Keycloak => "keycloak",
        ProfileFile::Okta => "okta",
        ProfileFile::EntraObo => "entra_obo",
    }
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}
