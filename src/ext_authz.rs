//! The second front door: Envoy's external authorization (ext_authz). Envoy, Istio or Envoy
//! Gateway asks about each request before routing it; txgate answers with the same routes,
//! validation, exchange and cache as the proxy, as header mutations Envoy applies, or as the
//! answer the proxy would have sent.
//!
//! A Check passes [`admission::admit`] like a proxied request, then [`decide`] turns the result
//! into a [`Verdict`]: for an allowed request the exchanged token set in `authorization`, every
//! header still carrying the caller's token removed, `access_token` removed from the query; for
//! a refused one the status, challenge, `Retry-After` and JSON body of [`crate::error`]. The
//! transports ([`grpc`], [`http`]) only translate a Check in and a verdict out. Nothing here
//! knows pingora: this front door proves the request-path stages do not depend on it.
//!
//! Two things the proxy can do are out of reach here, so the request is refused instead of
//! letting the promise break: rewriting the path (a path normalisation would change is refused
//! with 400, the route must be decided on what the upstream serves), and, over the HTTP
//! contract, removing a query parameter (a token in `access_token` is refused with 400).

pub mod grpc;
pub mod http;
mod proto;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, header};

use crate::admission::upstream_token::TokenHeader;
use crate::admission::{self, Admitted, CacheUse, Refusal, UpstreamToken, path};
use crate::error::GatewayError;
use crate::redact;
use crate::state::{CurrentState, GatewayState};
use crate::token::CallerToken;

/// The query parameter a caller's token may arrive in (RFC 6750 §2.3); never forwarded.
pub const QUERY_TOKEN: &str = "access_token";

/// Which ext_authz contract a Check arrived by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `envoy.service.auth.v3.Authorization/Check` over gRPC.
    Grpc,
    /// Envoy's HTTP authorization service contract.
    Http,
}

impl Transport {
    /// The `transport` label of the ext_authz metrics and the `front_door` of the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Http => "http",
        }
    }

    /// The `front_door` of the access event.
    pub fn front_door(self) -> &'static str {
        match self {
            Transport::Grpc => "ext_authz_grpc",
            Transport::Http => "ext_authz_http",
        }
    }
}

/// The bound ext_authz listeners, for the status page and the startup line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Listeners {
    pub grpc: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
}

/// The request a Check describes, owned (a gRPC Check carries it as strings).
pub struct Described {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    /// The caller's address as Envoy saw it, when the Check says (gRPC's `source`).
    pub client: Option<std::net::IpAddr>,
}

impl Described {
    fn request(&self) -> admission::Request<'_> {
        admission::Request {
            method: &self.method,
            uri: &self.uri,
            headers: &self.headers,
            client: self.client,
        }
    }
}

/// What Envoy does to the upstream request of an allowed Check.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Mutations {
    /// Headers set, replacing any value the request had.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Headers removed (never one that is also set).
    pub remove: Vec<HeaderName>,
    /// Query parameters removed, by name.
    pub remove_query: Vec<&'static str>,
}

/// What the caller of a refused Check gets: what the proxy would have answered.
#[derive(Debug, PartialEq, Eq)]
pub struct Denial {
    pub status: u16,
    /// `{"error": ..., "error_description": ...}`
    pub body: String,
    pub www_authenticate: Option<String>,
    pub retry_after: Option<Duration>,
}

impl Denial {
    fn from_error(error: &GatewayError) -> Denial {
        Denial {
            status: error.status(),
            body: error.body(),
            www_authenticate: error.www_authenticate(),
            retry_after: error.retry_after(),
        }
    }

    /// The headers of the answer: content type, no caching, the challenge and `Retry-After`.
    pub fn headers(&self) -> Vec<(HeaderName, String)> {
        let mut headers = vec![
            (header::CONTENT_TYPE, "application/json".to_string()),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ];
        if let Some(challenge) = &self.www_authenticate {
            headers.push((header::WWW_AUTHENTICATE, challenge.clone()));
        }
        if let Some(after) = self.retry_after {
            headers.push((header::RETRY_AFTER, after.as_secs().max(1).to_string()));
        }
        headers
    }
}

/// The answer to one Check.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow(Mutations),
    Deny(Denial),
}

/// Answers one Check with the configuration in force (a reload applies to the next Check), and
/// records it (metrics and one access-log event).
pub async fn check(current: &CurrentState, transport: Transport, described: &Described) -> Verdict {
    let started = Instant::now();
    let state = current.load_full();
    let decided = decide(&state, transport, described).await;
    record(&state, transport, described, &decided, started.elapsed());
    match decided {
        Ok(allowed) => Verdict::Allow(allowed.mutations),
        Err(refusal) => {
            let route = refusal
                .route
                .and_then(|i| state.routes.get(i))
                .map_or("", |r| r.name.as_str());
            refusal.error.log(route);
            Verdict::Deny(Denial::from_error(&refusal.error))
        }
    }
}

/// Answers a Check that does not describe a request txgate can read (no method, a target
/// that is not a path, a header that is no HTTP header): refused with 400 and counted
/// without a route.
pub fn unreadable(current: &CurrentState, transport: Transport, error: GatewayError) -> Verdict {
    let state = current.load();
    state
        .metrics
        .ext_authz_checks
        .with_label_values(&["_none", &error.status().to_string(), transport.as_str()])
        .inc();
    tracing::debug!(outcome = error.outcome(), error = %error, "unreadable ext_authz Check");
    // Nothing of the request is logged: what could not be read could hold anything.
    tracing::info!(
        target: "txgate::access",
        front_door = transport.front_door(),
        route = "_none",
        status = error.status(),
        outcome = error.outcome(),
    );
    Verdict::Deny(Denial::from_error(&error))
}

/// An allowed Check: what the access log needs, and the mutations.
struct Allowed {
    route: usize,
    caller: Option<CallerToken>,
    cache: Option<CacheUse>,
    mutations: Mutations,
}

/// Runs admission for `described` and decides what Envoy must change.
async fn decide(
    state: &GatewayState,
    transport: Transport,
    described: &Described,
) -> Result<Allowed, Refusal> {
    // Before any stage runs (and so before any STS call): Envoy forwards the path as sent, so
    // a path normalisation would change is refused rather than routed on a path the upstream
    // does not serve. A path normalisation refuses is left to stage 1, which says why.
    if let Ok(Cow::Owned(_)) = path::normalize(described.uri.path(), &state.paths) {
        return Err(Refusal::from(GatewayError::PathNotNormalized));
    }
    let admitted = admission::admit(state, described.request()).await?;
    let refused = |error| Refusal {
        error,
        route: Some(admitted.target.index),
        caller: admitted.caller.token.clone(),
        cache: admitted.upstream.cache,
    };
    let mutations = mutations(described, &admitted, transport).map_err(refused)?;
    Ok(Allowed {
        route: admitted.target.index,
        caller: admitted.caller.token,
        cache: admitted.upstream.cache,
        mutations,
    })
}

/// The header carrying the upstream's token, and its value; `None` sends none. The one place
/// that knows which header that is.
pub fn upstream_headers(upstream: &UpstreamToken) -> Option<(HeaderName, HeaderValue)> {
    let name = match upstream.header {
        TokenHeader::Authorization => header::AUTHORIZATION,
        TokenHeader::TxnToken => TXN_TOKEN,
    };
    upstream.value.clone().map(|value| (name, value))
}

/// The Transaction Token header (`mode: transaction_token`), as a header name.
const TXN_TOKEN: HeaderName = HeaderName::from_static("txn-token");

/// The changes to the upstream request of an admitted request, in the proxy's order of
/// thought: the caller's credential and every copy of it out, the route's `headers.remove`, the
/// query without `access_token`; then the route's `headers.set` and the upstream token.
fn mutations(
    described: &Described,
    admitted: &Admitted,
    transport: Transport,
) -> Result<Mutations, GatewayError> {
    let mut out = Mutations::default();
    if admitted.caller.query.is_some() {
        match transport {
            // Envoy's HTTP contract has no way to remove a query parameter.
            Transport::Http => return Err(GatewayError::TokenInUrl),
            Transport::Grpc => {
                // Envoy removes parameters by their name; a name spelled another way
                // (`access%5Ftoken`) could be left in place, so such a request is refused.
                if named_removal_leaves_token(described.uri.query(), admitted) {
                    return Err(GatewayError::TokenInUrl);
                }
                out.remove_query.push(QUERY_TOKEN);
            }
        }
    }
    let headers = &described.headers;
    let rules = &admitted.target.route.headers;
    let mut remove: Vec<HeaderName> = Vec::new();
    if headers.contains_key(header::AUTHORIZATION) {
        remove.push(header::AUTHORIZATION);
    }
    // As the proxy does: a Transaction Token from outside the trust domain is never passed on;
    // only a route that validates one keeps it.
    if admitted.target.route.txn_token.is_none() && headers.contains_key(&TXN_TOKEN) {
        remove.push(TXN_TOKEN);
    }
    remove.extend(
        rules
            .remove
            .iter()
            .filter(|name| headers.contains_key(*name))
            .cloned(),
    );
    remove.extend(admitted.caller.headers_carrying(headers));
    out.set.extend(rules.set.iter().cloned());
    out.set.extend(upstream_headers(&admitted.upstream));
    // A header that is set is replaced anyway; removing it too would leave its fate to the
    // order in which Envoy applies the two lists.
    let mut seen = Vec::new();
    remove.retain(|name| {
        let keep = !out.set.iter().any(|(set, _)| set == name) && !seen.contains(name);
        seen.push(name.clone());
        keep
    });
    out.remove = remove;
    Ok(out)
}

/// Whether the query, with the parameters literally named `access_token` removed (what Envoy
/// removes), still carries one of the caller's tokens.
fn named_removal_leaves_token(query: Option<&str>, admitted: &Admitted) -> bool {
    let Some(query) = query else {
        return false;
    };
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(key, _)| key) != QUERY_TOKEN)
        .collect();
    let rest = rest.join("&");
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(&rest).collect();
    admitted.caller.is_carried_by(rest.as_bytes()) || admitted.caller.is_carried_by(&decoded)
}

/// DESIGN.md step 8 for a Check: `txgate_ext_authz_checks_total`,
/// `txgate_ext_authz_check_duration_seconds` and one access-log event with `front_door`
/// telling it from a proxied request. Never a token: the caller is a fingerprint, the path is
/// masked as the proxy's is.
fn record(
    state: &GatewayState,
    transport: Transport,
    described: &Described,
    decided: &Result<Allowed, Refusal>,
    elapsed: Duration,
) {
    let (route, status, outcome, caller, cache) = match decided {
        Ok(allowed) => (
            Some(allowed.route),
            200,
            "allowed",
            allowed.caller.as_ref(),
            allowed.cache,
        ),
        Err(refusal) => (
            refusal.route,
            refusal.error.status(),
            refusal.error.outcome(),
            refusal.caller.as_ref(),
            refusal.cache,
        ),
    };
    let route = route
        .and_then(|i| state.routes.get(i))
        .map_or("_none", |r| r.name.as_str());
    state
        .metrics
        .ext_authz_checks
        .with_label_values(&[route, &status.to_string(), transport.as_str()])
        .inc();
    state
        .metrics
        .ext_authz_check_duration
        .with_label_values(&[route, transport.as_str()])
        .observe(elapsed.as_secs_f64());
    if !tracing::enabled!(target: "txgate::access", tracing::Level::INFO) {
        return;
    }
    let presented = redact::presented(&described.uri, &described.headers);
    let request_id = redact::kept_request_id(&described.uri, &described.headers);
    tracing::info!(
        target: "txgate::access",
        front_door = transport.front_door(),
        route,
        method = redact::method(described.method.as_str(), &presented),
        path = redact::path(described.uri.path(), &presented).as_ref(),
        status,
        outcome,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        exchange_ms = cache
            .and_then(|c| c.exchange_wait)
            .map(|d| d.as_secs_f64() * 1000.0),
        cache = cache.map(|c| c.lookup.as_str()),
        request_id = request_id.and_then(|v| v.to_str().ok()),
        caller = caller.map(CallerToken::fingerprint).as_deref(),
    );
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets Checks in flight finish.
/// The listener was bound by the caller (so port 0 works and the address is known).
pub(crate) async fn serve(
    listener: std::net::TcpListener,
    router: axum::Router,
    what: &'static str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "{what}: cannot use the listening socket");
            return;
        }
    };
    // No Nagle: an answer is a few small HTTP/2 frames, and waiting for the peer's delayed
    // ACK before sending the last of them would add tens of milliseconds to a Check.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an ext_authz connection");
        }
    });
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "{what}: the listener failed");
    }
}

#[cfg(test)]
mod tests;
