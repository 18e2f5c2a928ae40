//! Stage 4: the token the upstream receives (DESIGN.md steps 4 and 5): none for a public
//! route, else the exchanged token for the route's profile, from the cache or the STS (one
//! call for concurrent misses), refreshed in the background before it expires.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::{Caller, Request, Target};
use crate::cache::{CacheKey, Lookup, TokenCache};
use crate::config::ContextAttribute;
use crate::error::GatewayError;
use crate::exchange::actor::Actor;
use crate::exchange::{self, ActorSource, ExchangeProfile, Mode, Tokens};
use crate::inbound::ValidatedToken;
use crate::metrics::Metrics;
use crate::state::GatewayState;
use crate::token::CallerToken;
use crate::token::TokenDigest;

/// The header an exchanged token goes upstream in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TokenHeader {
    /// `Authorization: Bearer <token>`.
    #[default]
    Authorization,
    /// `Txn-Token: <token>` (draft-ietf-oauth-transaction-tokens §7.1); no `Authorization`.
    TxnToken,
}

impl TokenHeader {
    /// The name as written on the wire.
    pub fn wire_name(self) -> &'static str {
        match self {
            TokenHeader::Authorization => "Authorization",
            TokenHeader::TxnToken => TXN_TOKEN_HEADER,
        }
    }
}

/// The Transaction Token header, as written on the wire.
pub const TXN_TOKEN_HEADER: &str = "Txn-Token";

/// What goes upstream, in which header, and how the cache answered.
#[derive(Debug, Default)]
pub struct UpstreamToken {
    pub header: TokenHeader,
    /// The header's value (`Bearer <exchanged>` for `Authorization`); `None` sends no token
    /// at all.
    pub value: Option<HeaderValue>,
    /// How the cache answered; `None` when no token was needed or none is cached
    /// (Transaction Tokens).
    pub cache: Option<CacheUse>,
    /// The cache key the token was found under, to drop it if the upstream rejects it.
    pub key: Option<CacheKey>,
    /// The exchange that produced it: the route's, or the one the caller's issuer chose.
    pub profile: Option<Arc<ExchangeProfile>>,
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

/// A Transaction Token request's `request_context` for `request`: the attributes `context`
/// lists, as a JSON object, base64url-encoded without padding. The path is the normalised one
/// without the query (a query can carry anything, tokens included).
pub fn request_context(
    context: &[ContextAttribute],
    request: Request<'_>,
    target: &Target,
) -> String {
    let mut object = serde_json::Map::new();
    for attribute in context {
        let value = match attribute {
            ContextAttribute::Method => request.method.as_str().to_string(),
            ContextAttribute::Path => target
                .normalized_path
                .clone()
                .unwrap_or_else(|| request.uri.path().to_string()),
            ContextAttribute::ClientAddress => match request.client {
                Some(ip) => ip.to_string(),
                None => continue,
            },
        };
        object.insert(attribute.key().to_string(), value.into());
    }
    URL_SAFE_NO_PAD.encode(serde_json::Value::Object(object).to_string())
}

/// Obtains the upstream token of `target` for `caller` from `profile` (the route's exchange,
/// or the one its issuer chose; `None` for a public route), whose token `checked` validated
/// locally (when the route validates). `context` is a Transaction Token request's
/// `request_context`.
pub async fn obtain(
    state: &GatewayState,
    target: &Target,
    profile: Option<&Arc<ExchangeProfile>>,
    caller: &Caller,
    checked: Option<Arc<ValidatedToken>>,
    context: Option<String>,
) -> Result<UpstreamToken, Unobtained> {
    let Some(profile) = profile else {
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
    if let Mode::TransactionToken { .. } = profile.mode {
        digest()?;
        // Boxed for the same reason as a chain (see `fetch`).
        return Box::pin(transaction_token(
            state,
            profile,
            subject,
            context.as_deref(),
        ))
        .await;
    }
    let waited = Instant::now();
    let (key, actor) = match &profile.mode {
        Mode::Impersonation | Mode::Chain { .. } | Mode::TransactionToken { .. } => {
            (TokenCache::key(&profile.settings, digest()?, None), None)
        }
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
    let subject_digest = caller.token.as_ref().map(|t| *t.digest());
    let tokens = Tokens {
        subject: subject_for_sts,
        actor: actor.as_ref().map(|a| &*a.token),
        context: None,
    };
    let (result, lookup) = state
        .cache
        .get_or_exchange(
            key,
            subject_for_sts.unwrap_or_default(),
            lease(&profile),
            fetch(
                &state.cache,
                &state.metrics,
                &profile,
                tokens,
                subject_digest,
            ),
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
                context: None,
            };
            let fresh = fetch(&cache, &metrics, &profile, tokens, subject_digest);
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
            header: TokenHeader::Authorization,
            value: Some(token.authorization.clone()),
            cache,
            key: Some(key),
            profile: Some(profile),
        }),
        Err(error) => Err(Unobtained {
            error: error.into(),
            cache,
        }),
    }
}

/// The longest one exchange of `profile` may take: a chain's steps run one after the other.
fn lease(profile: &ExchangeProfile) -> Duration {
    match &profile.mode {
        Mode::Chain { steps } => steps.iter().map(|s| s.service.settings.timeout).sum(),
        _ => profile.service.settings.timeout,
    }
}

/// What a cache miss runs: one STS call, or a chain's steps.
async fn fetch(
    cache: &TokenCache,
    metrics: &Metrics,
    profile: &ExchangeProfile,
    tokens: Tokens<'_>,
    subject_digest: Option<TokenDigest>,
) -> Result<exchange::ExchangedToken, exchange::ExchangeError> {
    match (&profile.mode, tokens.subject, subject_digest) {
        // Boxed: inline, a chain's nested cache lookups would grow every request's future
        // (cache hits included), and copying it costs more than the allocation of a miss.
        (Mode::Chain { steps }, Some(subject), Some(digest)) => {
            Box::pin(run_chain(cache, metrics, steps, subject, &digest)).await
        }
        // Admission requires a caller token on every chain route; never send the steps'
        // container as a request of its own.
        (Mode::Chain { .. }, _, _) => Err(exchange::ExchangeError::BadResponse(
            "a chain runs only for a caller's token".into(),
        )),
        _ => exchange_with_metrics(metrics, profile, tokens).await,
    }
}

/// Runs a chain for the caller's token `subject` (whose digest is `digest`): every step but
/// the last through the cache (each result kept by its own expiry, concurrent callers sharing
/// one call per step), the last one here (its result is the route's entry, cached by the
/// caller). When the last step refuses the cached result it was given (an authorization
/// server that takes each assertion once), that result is dropped and obtained afresh, once.
async fn run_chain(
    cache: &TokenCache,
    metrics: &Metrics,
    steps: &[Arc<ExchangeProfile>],
    subject: &str,
    digest: &TokenDigest,
) -> Result<exchange::ExchangedToken, exchange::ExchangeError> {
    let Some((last, before)) = steps.split_last() else {
        return Err(exchange::ExchangeError::BadResponse(
            "a chain without steps".into(),
        ));
    };
    // Whether the last intermediate result was already dropped once for being refused.
    let mut renewed = false;
    'again: loop {
        let mut input: Option<(Arc<crate::cache::CachedToken>, CacheKey, bool)> = None;
        for step in before {
            let previous = input.as_ref().map(|(t, _, _)| t.token());
            let key = TokenCache::key(&step.settings, digest, None);
            let tokens = Tokens {
                subject: Some(previous.unwrap_or(subject)),
                actor: None,
                context: None,
            };
            let (result, lookup) = cache
                .get_or_exchange(
                    key,
                    subject,
                    step.service.settings.timeout,
                    exchange_with_metrics(metrics, step, tokens),
                )
                .await;
            input = Some((result?, key, lookup == Lookup::Hit));
        }
        let previous = input.as_ref().map(|(t, _, _)| t.token());
        let tokens = Tokens {
            subject: Some(previous.unwrap_or(subject)),
            actor: None,
            context: None,
        };
        let result = exchange_with_metrics(metrics, last, tokens).await;
        match (&result, &input) {
            // The last step refused a cached input: drop it and redo the steps from there.
            (
                Err(e @ exchange::ExchangeError::SubjectRejected { .. }),
                Some((token, key, true)),
            ) if !renewed => {
                tracing::debug!(
                    outcome = e.outcome(),
                    "a chain step refused a cached input; obtaining a fresh one"
                );
                cache.purge(*key, &token.authorization).await;
                renewed = true;
                continue 'again;
            }
            _ => {}
        }
        let issued = result?;
        // The upstream receives the last result: it must not carry the caller's token either.
        if subject.len() >= exchange::MIN_GUARDED_TOKEN_BYTES
            && issued.access_token.contains(subject)
            || issued.access_token == subject
        {
            tracing::error!(
                outcome = "echoed_input_token",
                "refused a chain's final token: it carries the caller's token"
            );
            return Err(exchange::ExchangeError::EchoedInputToken);
        }
        return Ok(issued);
    }
}

/// A Transaction Token for this request: never cached or shared. A Txn-Token describes one
/// transaction (its `txn` identifies it in every workload's logs, its `rctx` carries this
/// request's context, its lifetime is short), so reusing one for another request would make
/// two transactions one.
async fn transaction_token(
    state: &GatewayState,
    profile: Arc<ExchangeProfile>,
    subject: &str,
    context: Option<&str>,
) -> Result<UpstreamToken, Unobtained> {
    let tokens = Tokens {
        subject: Some(subject),
        actor: None,
        context,
    };
    let issued = exchange_with_metrics(&state.metrics, &profile, tokens)
        .await
        .map_err(GatewayError::from)?;
    let mut value = HeaderValue::from_str(&issued.access_token).map_err(|_| {
        GatewayError::from(exchange::ExchangeError::BadResponse(
            "the Txn-Token cannot be sent in a header".into(),
        ))
    })?;
    value.set_sensitive(true);
    Ok(UpstreamToken {
        header: TokenHeader::TxnToken,
        value: Some(value),
        cache: None,
        key: None,
        profile: Some(profile),
    })
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
                context: None,
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
