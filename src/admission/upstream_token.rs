//! Stage 4: the token the upstream receives (DESIGN.md steps 4 and 5): none for a public
//! route, else the exchanged token for the route's profile, from the cache or the STS (one
//! call for concurrent misses), refreshed in the background before it expires.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;

use super::{Caller, Target};
use crate::cache::{CacheKey, Lookup, TokenCache};
use crate::error::GatewayError;
use crate::exchange::actor::Actor;
use crate::exchange::{self, ActorSource, ExchangeProfile, Mode, Tokens};
use crate::inbound::ValidatedToken;
use crate::metrics::Metrics;
use crate::state::GatewayState;
use crate::token::CallerToken;

/// What goes upstream in `Authorization`, and how the cache answered.
#[derive(Debug, Default)]
pub struct UpstreamToken {
    /// `Bearer <exchanged>`; `None` sends no `Authorization` at all.
    pub authorization: Option<HeaderValue>,
    /// How the cache answered; `None` when no token was needed.
    pub cache: Option<CacheUse>,
    /// The cache key the token was found under, to drop it if the upstream rejects it.
    pub key: Option<CacheKey>,
}

/// How the token cache answered one request (logged with it).
#[derive(Debug, Clone, Copy)]
pub struct CacheUse {
    pub lookup: Lookup,
    /// How long the request waited for an exchange (misses and coalesced lookups).
    pub exchange_wait: Option<Duration>,
}

/// Why no token could be obtained, and how the cache answered when it was asked.
#[derive(Debug)]
pub struct Unobtained {
    pub error: GatewayError,
    pub cache: Option<CacheUse>,
}

impl From<GatewayError> for Unobtained {
    fn from(error: GatewayError) -> Unobtained {
        Unobtained { error, cache: None }
    }
}

/// Obtains the upstream token of `target` for `caller`, whose token `checked` validated
/// locally (when the route validates).
pub async fn obtain(
    state: &GatewayState,
    target: &Target,
    caller: &Caller,
    checked: Option<Arc<ValidatedToken>>,
) -> Result<UpstreamToken, Unobtained> {
    let Some(profile) = state.profile(target.index) else {
        return Ok(UpstreamToken::default());
    };
    let profile = profile.clone();
    let subject = caller.token.as_ref().map_or("", CallerToken::as_str);
    // Impersonation and delegation always have a caller token (admission required one).
    let digest = || {
        caller
            .token
            .as_ref()
            .map(CallerToken::digest)
            .ok_or(Unobtained::from(GatewayError::MissingToken))
    };
    let waited = Instant::now();
    let (key, actor) = match &profile.mode {
        Mode::Impersonation => (TokenCache::key(&profile.settings, digest()?, None), None),
        Mode::Delegation {
            actor,
            require_may_act,
        } => {
            let actor = actor_of(state, actor).await?;
            if *require_may_act {
                let subject_claims = match &checked {
                    Some(v) => Some(v.claims.clone()),
                    None => crate::jwt::unverified_claims(subject),
                };
                if !may_act_allows(subject_claims.as_ref(), actor.claims.as_ref(), &profile) {
                    return Err(GatewayError::MayActDenied.into());
                }
            }
            let key = TokenCache::key(&profile.settings, digest()?, Some(&actor.identity_digest));
            (key, Some(actor))
        }
        // One machine token per profile, shared by every caller.
        Mode::ClientCredentials { .. } => (TokenCache::machine_key(&profile.settings), None),
    };
    let subject_for_sts =
        (!matches!(profile.mode, Mode::ClientCredentials { .. })).then_some(subject);
    let tokens = Tokens {
        subject: subject_for_sts,
        actor: actor.as_ref().map(|a| &*a.token),
    };
    let (result, lookup) = state
        .cache
        .get_or_exchange(
            key,
            subject_for_sts.unwrap_or_default(),
            profile.service.settings.timeout,
            exchange_with_metrics(&state.metrics, &profile, tokens),
        )
        .await;
    if let (Ok(token), Lookup::Hit) = (&result, lookup)
        && state.cache.refresh_due(token)
    {
        let cache = state.cache.clone();
        let metrics = state.metrics.clone();
        let profile = profile.clone();
        let subject = subject_for_sts.map(str::to_string);
        tokio::spawn(async move {
            let tokens = Tokens {
                subject: subject.as_deref(),
                actor: actor.as_ref().map(|a| &*a.token),
            };
            let fresh = exchange_with_metrics(&metrics, &profile, tokens);
            cache
                .refresh(key, subject.as_deref().unwrap_or_default(), fresh)
                .await;
        });
    }
    let metrics = &state.route_metrics[target.index];
    match lookup {
        Lookup::Hit => metrics.hit.inc(),
        Lookup::Miss => metrics.miss.inc(),
        Lookup::Coalesced => metrics.coalesced.inc(),
    }
    let cache = Some(CacheUse {
        lookup,
        exchange_wait: (lookup != Lookup::Hit).then(|| waited.elapsed()),
    });
    match result {
        Ok(token) => Ok(UpstreamToken {
            authorization: Some(token.authorization.clone()),
            cache,
            key: Some(key),
        }),
        Err(error) => Err(Unobtained {
            error: error.into(),
            cache,
        }),
    }
}

/// The actor of a delegation: a token file's current value, or the gateway's own
/// client-credentials token (cached and refreshed by its own expiry like any exchanged token).
/// Claims and identity come derived with it, computed once per token value.
async fn actor_of(state: &GatewayState, source: &ActorSource) -> Result<Arc<Actor>, GatewayError> {
    match source {
        ActorSource::File(file) => Ok(file.actor()),
        ActorSource::Own(own) => {
            let tokens = Tokens {
                subject: None,
                actor: None,
            };
            let (result, _) = state
                .cache
                .get_or_exchange(
                    TokenCache::machine_key(&own.settings),
                    "",
                    own.service.settings.timeout,
                    exchange_with_metrics(&state.metrics, own, tokens),
                )
                .await;
            Ok(result?.actor())
        }
    }
}

/// One STS call, recorded in the exchange metrics.
async fn exchange_with_metrics(
    metrics: &Metrics,
    profile: &ExchangeProfile,
    tokens: Tokens<'_>,
) -> Result<exchange::ExchangedToken, exchange::ExchangeError> {
    let started = Instant::now();
    let result = exchange::exchange(profile, tokens).await;
    let service = profile.service.name();
    let open = profile.service.resilience.state() != exchange::resilience::BreakerState::Closed;
    metrics
        .circuit_open
        .with_label_values(&[service])
        .set(i64::from(open));
    let outcome = match &result {
        Ok(_) => "success",
        Err(e) => e.outcome(),
    };
    // Only calls that reached the STS have a duration worth recording.
    let refused_here = matches!(
        &result,
        Err(exchange::ExchangeError::Unavailable {
            cause: exchange::Unavailability::CircuitOpen | exchange::Unavailability::Overloaded,
            ..
        })
    );
    if !refused_here {
        metrics
            .exchange_duration
            .with_label_values(&[service])
            .observe(started.elapsed().as_secs_f64());
    }
    metrics
        .exchanges
        .with_label_values(&[service, outcome])
        .inc();
    result
}

type Claims = serde_json::Map<String, serde_json::Value>;

/// RFC 8693 §4.4: the subject's `may_act` names who may act for it. It matches when its `sub`
/// equals the actor's `sub` (or `client_id` for tokens without `sub`), and its `iss`, when
/// present, equals the actor's.
fn may_act_allows(
    subject: Option<&Claims>,
    actor: Option<&Claims>,
    profile: &ExchangeProfile,
) -> bool {
    let Some(may_act) = subject
        .and_then(|c| c.get("may_act"))
        .and_then(|m| m.as_object())
    else {
        return false;
    };
    let actor_sub = actor
        .and_then(|a| a.get("sub").or_else(|| a.get("client_id")))
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .or_else(|| match profile.mode.actor() {
            // The gateway's own opaque token: the actor is our client.
            Some(ActorSource::Own(_)) => Some(profile.service.settings.client_id.clone()),
            _ => None,
        });
    let Some(actor_sub) = actor_sub else {
        return false;
    };
    let sub_matches = may_act.get("sub").and_then(|v| v.as_str()) == Some(actor_sub.as_str());
    let iss_matches = match may_act.get("iss").and_then(|v| v.as_str()) {
        None => true,
        Some(iss) => actor.and_then(|a| a.get("iss")).and_then(|v| v.as_str()) == Some(iss),
    };
    sub_matches && iss_matches
}
