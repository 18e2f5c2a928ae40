//! Admission: the stages every request passes, in the same order, before it may be forwarded
//! (DESIGN.md steps 1 to 5).
//!
//! 1. [`route::select`]: the path normalised, the host decided, the route chosen.
//! 2. [`credential::read`]: the bearer token, tokens in the URL (for every route kind), sizes.
//! 3. [`validation::choose`] and [`validation::check`]: the exchange and validators (the
//!    caller's issuer picks them on a route with several token services), local validation of
//!    the caller's token, and of an internal route's `Txn-Token`.
//! 4. [`upstream_token::obtain`]: the token for the upstream, from the cache or the STS.
//!
//! After the upstream answered, [`purge::after_upstream`] drops a token it rejected and says
//! whether the request is sent again with a fresh one.
//!
//! Route kinds differ only in the data a stage gets (a `none` route asks stage 4 for no
//! token), never by a return that skips a later stage: that is how a rule once came to hold for
//! four route kinds out of five. The stages know nothing of pingora; a front door (the proxy)
//! hands them a [`Request`] and turns the result into its own answer.

pub mod credential;
pub mod purge;
pub mod route;
pub mod upstream_token;
pub mod validation;

use http::{HeaderMap, Method, Uri};

use crate::error::GatewayError;
use crate::state::GatewayState;

/// Path normalisation, the first thing stage 1 does (it lives below config, which holds its
/// rules).
pub use crate::path;

pub use credential::Caller;
pub use route::Target;
pub use upstream_token::{CacheUse, UpstreamToken};

/// What admission reads of a request, whichever front door received it.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// Checked for the caller's token too: an extension method is any token of the grammar
    /// (RFC 9110 §9.1), and the upstream receives it as sent.
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    /// The caller's address, when the front door knows it (a Transaction Token's context).
    pub client: Option<std::net::IpAddr>,
}

/// A request that may be forwarded, with everything forwarding needs.
pub struct Admitted {
    pub target: Target,
    pub caller: Caller,
    pub upstream: UpstreamToken,
}

/// A request the gateway answers itself, with what was known of it when it was refused: the
/// route (for the route label of metrics and logs) and the caller's token (for the
/// fingerprint in the access log).
#[derive(Debug)]
pub struct Refusal {
    pub error: GatewayError,
    pub route: Option<usize>,
    pub caller: Option<crate::token::CallerToken>,
    /// How the token cache answered, when it was asked.
    pub cache: Option<CacheUse>,
}

impl From<GatewayError> for Refusal {
    fn from(error: GatewayError) -> Refusal {
        Refusal {
            error,
            route: None,
            caller: None,
            cache: None,
        }
    }
}

/// Runs the stages for one request. Stages 1 and 2 read the request and return owned data,
/// so nothing borrowed from it is used across the awaits of stages 3 and 4.
pub async fn admit(state: &GatewayState, request: Request<'_>) -> Result<Admitted, Refusal> {
    let target = route::select(state, request)?;
    let caller = credential::read(state, request, &target).map_err(|e| Refusal {
        error: e.error,
        route: Some(target.index),
        caller: e.token,
        cache: None,
    })?;
    let on_route = |error, cache| Refusal {
        error,
        route: Some(target.index),
        caller: caller.token.clone(),
        cache,
    };
    let chosen = validation::choose(state, &target, &caller).map_err(|e| on_route(e, None))?;
    let context = match chosen.profile.map(|p| &p.mode) {
        Some(crate::exchange::Mode::TransactionToken { context }) => {
            Some(upstream_token::request_context(context, request, &target))
        }
        _ => None,
    };
    // Boxed: only internal routes validate a Txn-Token, and inline its validation would grow
    // every request's future.
    if let Some(read) = validation::txn_token_of(state, &target, request) {
        Box::pin(validation::check_txn_token(read))
            .await
            .map_err(|e| on_route(e, None))?;
    }
    let checked = validation::check(&chosen, &target, &caller)
        .await
        .map_err(|e| on_route(e, None))?;
    let upstream =
        upstream_token::obtain(state, &target, chosen.profile, &caller, checked, context)
            .await
            .map_err(|e| on_route(e.error, e.cache))?;
    Ok(Admitted {
        target,
        caller,
        upstream,
    })
}
