//! OIDC discovery over the network (OpenID Connect Discovery 1.0 §4, RFC 8414 §3): the
//! [`Discover`] that `txgate check`, `txgate run` and reloads hand to the config loader. The
//! config module decides when a document is needed and what to take from it; this module only
//! fetches it and checks whose it is.

use std::time::Duration;

use crate::config::discovery::{Discover, Discovered};

/// Fetches discovery documents with a client of its own per call: its pooled connections
/// belong to the short-lived runtime of one load, not to the proxy's.
#[derive(Debug, Clone, Copy, Default)]
pub struct OidcDiscovery;

impl Discover for OidcDiscovery {
    fn document(
        &self,
        issuer: &str,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Discovered, String> {
        let http = super::http_client(connect_timeout)
            .map_err(|e| format!("cannot build the discovery client: {e}"))?;
        fetch(issuer, &http, timeout)
    }
}

/// Fetches `<issuer>/.well-known/openid-configuration` (RFC 8414 §3 path as fallback) and
/// checks that the document is for this issuer (OpenID Connect Discovery §4.3). Runs on its
/// own thread and runtime so config loading works from any context, async or not.
fn fetch(issuer: &str, http: &reqwest::Client, timeout: Duration) -> Result<Discovered, String> {
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
