//! The pingora proxy: one request through route, credential, exchange, forward and record.
//!
//! Each `ProxyHttp` phase is a few lines that call one function returning our own types;
//! pingora's `bool` and error conventions are translated in exactly one place each
//! (`request_filter` and `fail_to_proxy`). Nothing borrowed from the session is held across an
//! `.await`: what the exchange needs is copied out first.

pub mod credential;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, header};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use pingora::proxy::FailToProxy;
use pingora::{Error as PingoraError, ErrorSource, ErrorType};
use pingora_prometheus::prometheus::{Histogram, IntCounter};
use sha2::{Digest, Sha256};

use crate::cache::{Lookup, TokenCache};
use crate::config::{
    ActorSource, Config, Exchange, ExchangeProfile, HeaderRules, Inbound, Mode, Route,
};
use crate::error::GatewayError;
use crate::exchange::{self, Tokens};
use crate::inbound::{JwtValidator, RefresherGuard, ValidatedToken};
use crate::metrics::Metrics;
use crate::router::Router;

/// Longest `X-Request-Id` kept from a client.
const MAX_REQUEST_ID: usize = 128;
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
// The same names as written on the wire. pingora's `insert_header` turns a custom `HeaderName`
// into its wire spelling by copying it; a `&'static str` is used as it is.
const WIRE_X_REQUEST_ID: &str = "X-Request-Id";
const WIRE_X_FORWARDED_FOR: &str = "X-Forwarded-For";
const WIRE_X_FORWARDED_PROTO: &str = "X-Forwarded-Proto";
const WIRE_X_FORWARDED_HOST: &str = "X-Forwarded-Host";

/// Everything requests share: built once per configuration.
pub struct GatewayState {
    pub router: Router,
    pub routes: Vec<Arc<Route>>,
    pub cache: Arc<TokenCache>,
    pub metrics: Arc<Metrics>,
    route_metrics: Vec<RouteMetrics>,
    max_token_bytes: usize,
    max_request_header_bytes: usize,
    /// Set when the proxy service has started accepting; read by `/readyz`.
    pub ready: Arc<AtomicBool>,
    /// Set when shutdown begins; `/readyz` then fails so load balancers drain us.
    pub shutting_down: Arc<AtomicBool>,
    /// The listen addresses of this configuration (they change only with a restart).
    pub listen: Vec<SocketAddr>,
    pub tls_listen: Vec<SocketAddr>,
    /// Every distinct JWT validator; readiness waits for their first JWKS.
    pub jwt_validators: Vec<Arc<JwtValidator>>,
    /// Keeps the validators' background JWKS refreshers running.
    refreshers: Mutex<Vec<RefresherGuard>>,
}

/// Per-route metric handles, resolved once so the hot path does no label hashing for them.
struct RouteMetrics {
    duration: Histogram,
    hit: IntCounter,
    miss: IntCounter,
    coalesced: IntCounter,
    /// `txgate_requests_total{route, status}` for the statuses a gateway answers most; others
    /// are looked up by label (which takes the metric family's lock).
    by_status: Vec<(u16, IntCounter)>,
}

/// Statuses whose request counters are resolved once per route.
const COMMON_STATUSES: &[u16] = &[
    200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 429, 431, 500, 502, 503, 504,
];

impl GatewayState {
    /// Starts the JWKS refreshers (first fetch now). Called once, on a runtime, when the proxy
    /// starts.
    pub fn start_background(&self) {
        let guards: Vec<RefresherGuard> = self
            .jwt_validators
            .iter()
            .map(|v| v.spawn_refresher())
            .collect();
        if let Ok(mut refreshers) = self.refreshers.lock() {
            refreshers.extend(guards);
        }
        // Upstream health checks; each loop ends when its configuration is replaced.
        for route in &self.routes {
            if let Some(interval) = route.upstream.health_check_interval {
                let balancer = Arc::downgrade(&route.upstream.balancer);
                tokio::spawn(async move {
                    while let Some(balancer) = balancer.upgrade() {
                        balancer.backends().run_health_check(true).await;
                        drop(balancer);
                        tokio::time::sleep(interval).await;
                    }
                });
            }
        }
    }

    /// Ready: the proxy accepts, shutdown has not begun, and every JWKS has loaded once.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
            && !self
                .shutting_down
                .load(std::sync::atomic::Ordering::Acquire)
            && self.jwt_validators.iter().all(|v| v.is_ready())
    }

    /// Waits until every JWT validator has loaded its JWKS (used by embedders and tests that
    /// must not send traffic before the gateway can validate it).
    pub async fn wait_ready(&self) {
        for v in &self.jwt_validators {
            v.wait_ready().await;
        }
    }

    /// Builds the shared state for `config`.
    /// Builds the shared state for `config`. On a reload `previous` hands over what outlives a
    /// configuration: the token cache (entries are keyed by exchange profile, so changed
    /// routes simply miss), the metrics registry and the readiness flags.
    pub fn new(config: &Config, previous: Option<&GatewayState>) -> Result<GatewayState, String> {
        let metrics = match previous {
            Some(p) => p.metrics.clone(),
            None => Arc::new(Metrics::new().map_err(|e| format!("cannot register metrics: {e}"))?),
        };
        let route_metrics = config
            .routes
            .iter()
            .map(|r| RouteMetrics {
                duration: metrics
                    .request_duration
                    .with_label_values(&[r.name.as_str()]),
                hit: metrics
                    .cache_lookups
                    .with_label_values(&[r.name.as_str(), "hit"]),
                miss: metrics
                    .cache_lookups
                    .with_label_values(&[r.name.as_str(), "miss"]),
                coalesced: metrics
                    .cache_lookups
                    .with_label_values(&[r.name.as_str(), "coalesced"]),
                by_status: COMMON_STATUSES
                    .iter()
                    .map(|s| {
                        let label = http::StatusCode::from_u16(*s)
                            .map(|c| c.as_str().to_string())
                            .unwrap_or_default();
                        (
                            *s,
                            metrics
                                .requests
                                .with_label_values(&[r.name.as_str(), label.as_str()]),
                        )
                    })
                    .collect(),
            })
            .collect();
        let mut jwt_validators: Vec<Arc<JwtValidator>> = Vec::new();
        for inbound in config.routes.iter().filter_map(|r| r.inbound.as_ref()) {
            if let Some(jwt) = &inbound.jwt
                && !jwt_validators.iter().any(|v| Arc::ptr_eq(v, jwt))
            {
                jwt_validators.push(jwt.clone());
            }
        }
        Ok(GatewayState {
            jwt_validators,
            refreshers: Mutex::new(Vec::new()),
            router: Router::new(&config.routes),
            routes: config.routes.clone(),
            cache: match previous {
                Some(p) => p.cache.clone(),
                None => Arc::new(TokenCache::new(&config.cache)),
            },
            metrics,
            route_metrics,
            max_token_bytes: config.server.max_token_bytes,
            max_request_header_bytes: config.server.max_request_header_bytes,
            ready: previous.map_or_else(|| Arc::new(AtomicBool::new(false)), |p| p.ready.clone()),
            shutting_down: previous.map_or_else(
                || Arc::new(AtomicBool::new(false)),
                |p| p.shutting_down.clone(),
            ),
            listen: config.server.listen.clone(),
            tls_listen: config
                .server
                .tls
                .as_ref()
                .map(|t| t.listen.clone())
                .unwrap_or_default(),
        })
    }
}

/// The pingora proxy application.
/// The configuration in force; a reload swaps it, requests in flight keep the one they began
/// with.
pub type CurrentState = Arc<arc_swap::ArcSwap<GatewayState>>;

pub struct Gateway {
    current: CurrentState,
}

impl Gateway {
    pub fn new(current: CurrentState) -> Gateway {
        Gateway { current }
    }
}

/// What one request carries between phases.
pub struct RequestCtx {
    state: Arc<GatewayState>,
    started: Instant,
    route: Option<usize>,
    request_id: Option<HeaderValue>,
    /// The `Authorization` value sent upstream; `None` sends none.
    upstream_authorization: Option<HeaderValue>,
    /// The caller's token values (header and query): no upstream header may contain them.
    /// Shared with the admission code, which holds the bearer token across awaits: one copy.
    caller_tokens: Vec<Arc<str>>,
    /// Set when the URI must change (an `access_token` query parameter was removed).
    upstream_uri: Option<http::Uri>,
    lookup: Option<Lookup>,
    exchange_wait: Option<Duration>,
    error: Option<GatewayError>,
    /// First 8 bytes of SHA-256 of the caller's token, hex: correlates log lines, reveals nothing.
    /// Index in `caller_tokens` of the bearer token; its fingerprint is computed only when the
    /// access log is on.
    bearer_index: Option<usize>,
    /// The peer chosen for this request, and one that failed to connect (retry elsewhere).
    upstream_addr: Option<SocketAddr>,
    failed_peer: Option<SocketAddr>,
    retried: bool,
    /// `X-Forwarded-Host`: the host the client asked for.
    forwarded_host: Option<HeaderValue>,
    /// The request arrived over TLS (`X-Forwarded-Proto: https`).
    over_tls: bool,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            state: self.current.load_full(),
            started: Instant::now(),
            route: None,
            request_id: None,
            upstream_authorization: None,
            caller_tokens: Vec::new(),
            upstream_uri: None,
            lookup: None,
            exchange_wait: None,
            error: None,
            bearer_index: None,
            upstream_addr: None,
            failed_peer: None,
            retried: false,
            forwarded_host: None,
            over_tls: false,
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.request_id = Some(request_id(session.req_header()));
        match self.admit(session, ctx).await {
            // pingora: `false` = not answered here, go on to the upstream.
            Ok(()) => Ok(false),
            Err(error) => {
                let route = self.route_name(ctx);
                error.log(route);
                let reply = Reply::from_error(&error);
                ctx.error = Some(error);
                reply.send(session, ctx.request_id.as_ref()).await?;
                // pingora: `true` = a response was sent, stop here.
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let route = self
            .route(ctx)
            .ok_or_else(|| PingoraError::explain(ErrorType::InternalError, "no route selected"))?;
        let (addr, peer) = route.upstream.select(ctx.failed_peer).ok_or_else(|| {
            PingoraError::explain(ErrorType::ConnectNoRoute, "no upstream peer is available")
        })?;
        ctx.upstream_addr = Some(addr);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<PingoraError>,
    ) -> Box<PingoraError> {
        // One retry, on another peer, for requests that are safe to repeat (RFC 9110 §9.2.2).
        let other_peers = self.route(ctx).is_some_and(|r| r.upstream.peers.len() > 1);
        if !ctx.retried && other_peers && session.req_header().method.is_idempotent() {
            ctx.retried = true;
            ctx.failed_peer = ctx.upstream_addr;
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let client = session.client_addr().and_then(|a| a.as_inet()).copied();
        let upgrade = session.is_upgrade_req();
        let rules = self.route(ctx).map(|r| &r.headers);
        rewrite_upstream_request(upstream, ctx, client, upgrade, rules);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let Some(id) = &ctx.request_id {
            response.insert_header(WIRE_X_REQUEST_ID, id.clone())?;
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &PingoraError,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let status = proxy_error_status(e);
        if status != 0 {
            let reply = Reply::proxy_failure(status);
            if let Err(write) = reply.send(session, ctx.request_id.as_ref()).await {
                tracing::debug!(error = %write, "cannot send the error response downstream");
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    /// pingora puts this in its own error logs; the default includes the query string, where a
    /// caller may have put a token. Method and path only, with any caller token masked.
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        let request = session.req_header();
        format!(
            "{} {}",
            request.method,
            mask_tokens(request.uri.path(), &ctx.caller_tokens)
        )
    }

    async fn logging(&self, session: &mut Session, e: Option<&PingoraError>, ctx: &mut RequestCtx) {
        self.record(session, e, ctx);
    }
}

impl Gateway {
    fn route<'a>(&self, ctx: &'a RequestCtx) -> Option<&'a Arc<Route>> {
        ctx.route.and_then(|i| ctx.state.routes.get(i))
    }

    fn route_name<'a>(&self, ctx: &'a RequestCtx) -> &'a str {
        self.route(ctx).map_or("", |r| r.name.as_str())
    }

    /// DESIGN.md steps 1 to 5: pick the route, read and validate the credential, obtain the
    /// token to send upstream. `Ok` means forward; `Err` is answered by the gateway.
    async fn admit(&self, session: &Session, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
        // The configuration this request started with, even if a reload swaps it meanwhile.
        let state = ctx.state.clone();
        // Phase 1: everything from the request header, copied out; no borrow crosses an await.
        let request = session.req_header();
        let header_bytes: usize = request
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        if header_bytes > state.max_request_header_bytes {
            return Err(GatewayError::HeadersTooLarge);
        }
        ctx.over_tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        ctx.forwarded_host = request.headers.get(header::HOST).cloned().or_else(|| {
            request
                .uri
                .authority()
                .and_then(|a| HeaderValue::try_from(a.as_str()).ok())
        });
        let host = request
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri.host());
        let (index, route) = state
            .router
            .find(host, request.uri.path())
            .ok_or(GatewayError::NoRoute)?;
        ctx.route = Some(index);
        if let Some(query) = request.uri.query() {
            let (rest, removed) = credential::strip_query_token(query);
            if !removed.is_empty() {
                ctx.upstream_uri = Some(with_query(&request.uri, rest.as_deref()));
                ctx.caller_tokens.extend(
                    removed
                        .into_iter()
                        .filter(|t| !t.is_empty())
                        .map(Into::into),
                );
            }
        }
        let bearer = credential::bearer(&request.headers, state.max_token_bytes);
        let profile = match &route.exchange {
            Exchange::Token(profile) => profile.clone(),
            Exchange::None => {
                // A public route: no token goes upstream, but any the caller sent is still
                // guarded against.
                if let Ok(token) = bearer {
                    ctx.caller_tokens.push(token.into());
                }
                return Ok(());
            }
        };
        let caller: Option<Arc<str>> = match bearer {
            Ok(token) => Some(Arc::from(token)),
            // `caller: anonymous`: a token is not required; one that is sent is still guarded.
            Err(_) if profile.anonymous_caller => None,
            Err(e) => return Err(e),
        };
        if let Some(token) = &caller {
            ctx.bearer_index = Some(ctx.caller_tokens.len());
            ctx.caller_tokens.push(token.clone());
            let target = ctx.upstream_uri.as_ref().unwrap_or(&request.uri);
            // Raw and percent-decoded: a token's `+`, `/` and `=` may arrive as %2B, %2F, %3D.
            let in_part = |part: &str| {
                contains(part.as_bytes(), token.as_bytes())
                    || (part.contains('%')
                        && contains(
                            &percent_encoding::percent_decode_str(part).collect::<Vec<u8>>(),
                            token.as_bytes(),
                        ))
            };
            let in_url = in_part(target.path()) || target.query().is_some_and(in_part);
            if in_url {
                return Err(GatewayError::TokenInUrl);
            }
        }
        let inbound = route.inbound.clone();

        // Phase 2: local validation; a token that fails here never reaches the STS.
        let validated = match (&inbound, &caller) {
            (Some(inbound), Some(token)) if !profile.anonymous_caller => {
                Some(validate(inbound, token).await?)
            }
            _ => None,
        };

        // Phase 3: the token for the upstream, through the cache.
        let subject = caller.as_deref().unwrap_or_default();
        let waited = Instant::now();
        let (key, actor) = match profile.mode {
            Mode::Impersonation => (TokenCache::key(&profile, subject, None), None),
            Mode::Delegation => {
                let actor = self.actor_token(&state, &profile).await?;
                let subject_claims = match &validated {
                    Some(v) => Some(v.claims.clone()),
                    None => crate::jwt::unverified_claims(subject),
                };
                let actor_claims = crate::jwt::unverified_claims(&actor);
                if profile.require_may_act
                    && !may_act_allows(subject_claims.as_ref(), actor_claims.as_ref(), &profile)
                {
                    return Err(GatewayError::MayActDenied);
                }
                let identity = actor_identity(&actor, actor_claims.as_ref());
                let key = TokenCache::key(&profile, subject, Some(identity.as_bytes()));
                (key, Some(actor))
            }
            // One machine token per profile, shared by every caller.
            Mode::ClientCredentials => (TokenCache::key(&profile, "", None), None),
        };
        let subject_for_sts = (profile.mode != Mode::ClientCredentials).then_some(subject);
        let tokens = Tokens {
            subject: subject_for_sts,
            actor: actor.as_deref(),
        };
        let (result, lookup) = state
            .cache
            .get_or_exchange(
                key,
                subject_for_sts.unwrap_or_default(),
                exchange_with_metrics(&state.metrics, &profile, tokens),
            )
            .await;
        if let (Ok(token), Lookup::Hit) = (&result, lookup)
            && state.cache.refresh_due(token)
        {
            let state = state.clone();
            let profile = profile.clone();
            let subject = subject_for_sts.map(str::to_string);
            tokio::spawn(async move {
                let tokens = Tokens {
                    subject: subject.as_deref(),
                    actor: actor.as_deref(),
                };
                let fresh = exchange_with_metrics(&state.metrics, &profile, tokens);
                state
                    .cache
                    .refresh(key, subject.as_deref().unwrap_or_default(), fresh)
                    .await;
            });
        }
        let metrics = &state.route_metrics[index];
        match lookup {
            Lookup::Hit => metrics.hit.inc(),
            Lookup::Miss => metrics.miss.inc(),
            Lookup::Coalesced => metrics.coalesced.inc(),
        }
        ctx.lookup = Some(lookup);
        if lookup != Lookup::Hit {
            ctx.exchange_wait = Some(waited.elapsed());
        }
        ctx.upstream_authorization = Some(result?.authorization.clone());
        Ok(())
    }

    /// The actor token of a delegation: a token file, or the gateway's own client-credentials
    /// token (cached and refreshed by its own expiry like any exchanged token).
    async fn actor_token(
        &self,
        state: &GatewayState,
        profile: &ExchangeProfile,
    ) -> Result<String, GatewayError> {
        match &profile.actor {
            Some(ActorSource::File(file)) => Ok(file.token().to_string()),
            Some(ActorSource::Own(own)) => {
                let key = TokenCache::key(own, "", None);
                let tokens = Tokens {
                    subject: None,
                    actor: None,
                };
                let (result, _) = state
                    .cache
                    .get_or_exchange(key, "", exchange_with_metrics(&state.metrics, own, tokens))
                    .await;
                Ok(result?.token().to_string())
            }
            None => Err(GatewayError::Exchange(
                exchange::ExchangeError::ClientRejected {
                    status: 0,
                    code: "no actor configured".into(),
                },
            )),
        }
    }

    /// DESIGN.md step 8: metrics and one access-log event. Never a token.
    fn record(&self, session: &Session, e: Option<&PingoraError>, ctx: &RequestCtx) {
        let state = &ctx.state;
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let route = self.route_name(ctx);
        let label = if route.is_empty() { "_none" } else { route };
        let code = http::StatusCode::from_u16(status).ok();
        let status_label = code.as_ref().map_or("0", |c| c.as_str());
        let elapsed = ctx.started.elapsed();
        let prebuilt = ctx.route.and_then(|i| {
            state.route_metrics[i]
                .by_status
                .iter()
                .find(|(s, _)| *s == status)
                .map(|(_, counter)| counter)
        });
        match prebuilt {
            Some(counter) => counter.inc(),
            None => state
                .metrics
                .requests
                .with_label_values(&[label, status_label])
                .inc(),
        }
        match ctx.route {
            Some(i) => state.route_metrics[i]
                .duration
                .observe(elapsed.as_secs_f64()),
            None => state
                .metrics
                .request_duration
                .with_label_values(&[label])
                .observe(elapsed.as_secs_f64()),
        }
        let outcome = match (&ctx.error, e) {
            (Some(err), _) => err.outcome(),
            (None, Some(_)) => "proxy_error",
            (None, None) => "forwarded",
        };
        if !tracing::enabled!(target: "txgate::access", tracing::Level::INFO) {
            return;
        }
        let caller = ctx
            .bearer_index
            .and_then(|i| ctx.caller_tokens.get(i))
            .map(|t| fingerprint(t));
        let request = session.req_header();
        tracing::info!(
            target: "txgate::access",
            route = label,
            method = request.method.as_str(),
            path = mask_tokens(request.uri.path(), &ctx.caller_tokens).as_ref(),
            status,
            outcome,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            exchange_ms = ctx.exchange_wait.map(|d| d.as_secs_f64() * 1000.0),
            cache = ctx.lookup.map(Lookup::as_str),
            upstream = ctx.upstream_addr.map(|a| a.to_string()),
            request_id = ctx.request_id.as_ref().and_then(|v| v.to_str().ok()),
            caller = caller.as_deref(),
            error = e.map(|e| e.etype().as_str()),
        );
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
    let service = profile.service.name.as_str();
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
    if !matches!(outcome, "circuit_open" | "overloaded") {
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

/// DESIGN.md step 3: a JWT goes to the JWT validator; anything else to introspection when
/// configured (opaque tokens), else to the JWT validator, which refuses it.
async fn validate(inbound: &Inbound, token: &str) -> Result<Arc<ValidatedToken>, GatewayError> {
    let looks_like_jwt = token.bytes().filter(|b| *b == b'.').count() == 2;
    let result = match (&inbound.jwt, &inbound.introspection) {
        (Some(jwt), _) if looks_like_jwt => jwt.validate(token).await,
        (_, Some(introspection)) => introspection.validate(token).await,
        (Some(jwt), None) => jwt.validate(token).await,
        (None, None) => return Err(GatewayError::InvalidToken("no validator".into())),
    };
    result.map_err(GatewayError::from)
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
        .or_else(|| match &profile.actor {
            // The gateway's own opaque token: the actor is our client.
            Some(ActorSource::Own(_)) => Some(profile.service.client_id.clone()),
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

/// What identifies an actor in cache keys: its issuer and `sub` (or `client_id`), else a
/// digest of the token. Never the raw token.
fn actor_identity(token: &str, claims: Option<&Claims>) -> String {
    let named = claims.and_then(|c| {
        let iss = c.get("iss").and_then(|v| v.as_str()).unwrap_or_default();
        c.get("sub")
            .or_else(|| c.get("client_id"))
            .and_then(|v| v.as_str())
            .map(|sub| format!("{iss}\u{0}{sub}"))
    });
    named.unwrap_or_else(|| hex::encode(Sha256::digest(token.as_bytes())))
}

/// DESIGN.md step 7: the caller's credential out, the exchanged one in, forwarding headers, and
/// the leak guard last so nothing added or left can carry the caller's token.
fn rewrite_upstream_request(
    upstream: &mut RequestHeader,
    ctx: &RequestCtx,
    client: Option<SocketAddr>,
    upgrade: bool,
    rules: Option<&HeaderRules>,
) {
    // `remove_header` drops every value of the name at once.
    upstream.remove_header(&header::AUTHORIZATION);
    remove_hop_by_hop(upstream, upgrade);
    if let Some(rules) = rules {
        for name in &rules.remove {
            upstream.remove_header(name);
        }
        for (name, value) in &rules.set {
            let _ = upstream.insert_header(name.clone(), value.clone());
        }
    }
    if let Some(host) = &ctx.forwarded_host {
        let _ = upstream.insert_header(WIRE_X_FORWARDED_HOST, host.clone());
    }
    if let Some(uri) = &ctx.upstream_uri {
        upstream.set_uri(uri.clone());
    }
    if let Some(ip) = client.map(|a| a.ip()) {
        let value = match upstream
            .headers
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
        {
            Some(prior) => HeaderValue::try_from(format!("{prior}, {ip}")).ok(),
            None => ip_header_value(ip),
        };
        if let Some(value) = value {
            let _ = upstream.insert_header(WIRE_X_FORWARDED_FOR, value);
        }
    }
    let proto = if ctx.over_tls { "https" } else { "http" };
    let _ = upstream.insert_header(WIRE_X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(id) = &ctx.request_id {
        let _ = upstream.insert_header(WIRE_X_REQUEST_ID, id.clone());
    }
    leak_guard(upstream, &ctx.caller_tokens);
    if let Some(authorization) = &ctx.upstream_authorization {
        let _ = upstream.insert_header(header::AUTHORIZATION, authorization.clone());
    }
}

/// An IP address as a header value, formatted on the stack (no intermediate `String`).
fn ip_header_value(ip: std::net::IpAddr) -> Option<HeaderValue> {
    use std::io::Write;
    // The longest text form of an IPv6 address is 45 bytes.
    let mut buf = [0u8; 48];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    write!(cursor, "{ip}").ok()?;
    let len = usize::try_from(cursor.position()).ok()?;
    HeaderValue::from_bytes(&buf[..len]).ok()
}

/// RFC 9110 §7.6.1: connection-specific headers are not forwarded. For an upgrade (WebSocket)
/// request `Connection: upgrade` and `Upgrade` are what the upstream needs, so they stay.
fn remove_hop_by_hop(upstream: &mut RequestHeader, upgrade: bool) {
    static HOP_BY_HOP: [HeaderName; 4] = [
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
    ];
    // Most requests carry none of these: one pass over the names decides, and the removals
    // (each a hash lookup in two maps) run only for what is there.
    let present = upstream.headers.keys().any(|name| {
        name == header::CONNECTION || name == header::UPGRADE || HOP_BY_HOP.contains(name)
    });
    if !present {
        return;
    }
    for name in &HOP_BY_HOP {
        upstream.remove_header(name);
    }
    if !upstream.headers.contains_key(header::CONNECTION) {
        if !upgrade {
            upstream.remove_header(&header::UPGRADE);
        }
        return;
    }
    let listed: Vec<HeaderName> = upstream
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .filter(|name| !(upgrade && name == header::UPGRADE))
        .collect();
    for name in listed {
        upstream.remove_header(&name);
    }
    if upgrade {
        let _ = upstream.insert_header(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        upstream.remove_header(&header::CONNECTION);
        upstream.remove_header(&header::UPGRADE);
    }
}

/// Drops every header whose value still contains one of the caller's tokens (e.g. an
/// `X-Forwarded-Access-Token` set by an edge proxy).
fn leak_guard(upstream: &mut RequestHeader, tokens: &[Arc<str>]) {
    if tokens.is_empty() {
        return;
    }
    let leaking: Vec<HeaderName> = upstream
        .headers
        .iter()
        .filter(|(_, value)| {
            tokens
                .iter()
                .any(|t| contains(value.as_bytes(), t.as_bytes()))
        })
        .map(|(name, _)| name.clone())
        .collect();
    for name in leaking {
        tracing::debug!(header = %name, "dropped a header carrying the caller's token");
        upstream.remove_header(&name);
    }
}

/// `text` with every caller token replaced by `<token>`, for logs.
fn mask_tokens<'a>(text: &'a str, tokens: &[Arc<str>]) -> std::borrow::Cow<'a, str> {
    let mut out = std::borrow::Cow::Borrowed(text);
    for token in tokens.iter().filter(|t| !t.is_empty()) {
        if out.contains(&**token) {
            out = std::borrow::Cow::Owned(out.replace(&**token, "<token>"));
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack.len() >= needle.len()
        && haystack.windows(needle.len()).any(|w| w == needle)
}

fn with_query(uri: &http::Uri, query: Option<&str>) -> http::Uri {
    let path_and_query = match query {
        Some(q) => format!("{}?{q}", uri.path()),
        None => uri.path().to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    http::Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// The client's `X-Request-Id` if it is short and plain, else a new random one.
fn request_id(request: &RequestHeader) -> HeaderValue {
    if let Some(value) = request.headers.get(&X_REQUEST_ID) {
        let bytes = value.as_bytes();
        if !bytes.is_empty()
            && bytes.len() <= MAX_REQUEST_ID
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        {
            return value.clone();
        }
    }
    // 32 hex digits written on the stack: no formatting machinery on the hot path.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let id: u128 = rand::random();
    let mut digits = [0u8; 32];
    for (i, d) in digits.iter_mut().enumerate() {
        *d = HEX[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&digits).unwrap_or(HeaderValue::from_static("0"))
}

/// A short fingerprint of a token for logs: 16 hex digits of its SHA-256.
pub fn fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    hex::encode(&digest[..8])
}

/// The status for a failure after admission (connecting to or talking with the upstream).
fn proxy_error_status(e: &PingoraError) -> u16 {
    match e.etype() {
        ErrorType::HTTPStatus(code) => *code,
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if e.esource() == &ErrorSource::Upstream =>
        {
            504
        }
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}

/// A response written by the gateway itself.
struct Reply {
    status: u16,
    body: String,
    www_authenticate: Option<String>,
    retry_after: Option<Duration>,
}

impl Reply {
    fn from_error(error: &GatewayError) -> Reply {
        Reply {
            status: error.status(),
            body: error.body(),
            www_authenticate: error.www_authenticate(),
            retry_after: error.retry_after(),
        }
    }

    fn proxy_failure(status: u16) -> Reply {
        let (code, description) = match status {
            502 => ("bad_gateway", "the upstream is unavailable"),
            504 => ("gateway_timeout", "the upstream did not answer in time"),
            400..=499 => ("invalid_request", "the request could not be read"),
            _ => ("internal_error", "the gateway failed to proxy the request"),
        };
        Reply {
            status,
            body: serde_json::json!({"error": code, "error_description": description}).to_string(),
            www_authenticate: None,
            retry_after: None,
        }
    }

    async fn send(
        self,
        session: &mut Session,
        request_id: Option<&HeaderValue>,
    ) -> pingora::Result<()> {
        let mut response = ResponseHeader::build(self.status, Some(6))?;
        response.insert_header(header::CONTENT_TYPE, "application/json")?;
        response.insert_header(header::CACHE_CONTROL, "no-store")?;
        response.insert_header(header::CONTENT_LENGTH, self.body.len().to_string())?;
        if let Some(challenge) = self.www_authenticate {
            response.insert_header(header::WWW_AUTHENTICATE, challenge)?;
        }
        if let Some(after) = self.retry_after {
            response.insert_header(header::RETRY_AFTER, after.as_secs().max(1).to_string())?;
        }
        if let Some(id) = request_id {
            response.insert_header(X_REQUEST_ID.clone(), id.clone())?;
        }
        session.set_keepalive(None);
        session
            .write_response_header(Box::new(response), false)
            .await?;
        session
            .write_response_body(Some(Bytes::from(self.body)), true)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leak_guard_drops_headers_carrying_the_token() {
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("x-forwarded-access-token", "tok123")
            .unwrap();
        req.insert_header("x-other", "prefix-tok123-suffix")
            .unwrap();
        req.insert_header("x-fine", "nothing").unwrap();
        leak_guard(&mut req, &["tok123".into()]);
        assert!(req.headers.get("x-forwarded-access-token").is_none());
        assert!(req.headers.get("x-other").is_none());
        assert_eq!(req.headers.get("x-fine").unwrap(), "nothing");
    }

    #[test]
    fn query_rewrite_keeps_other_parameters() {
        let uri: http::Uri = "/orders?access_token=t&x=1".parse().unwrap();
        assert_eq!(with_query(&uri, Some("x=1")).to_string(), "/orders?x=1");
        assert_eq!(with_query(&uri, None).to_string(), "/orders");
    }

    #[test]
    fn request_ids_are_kept_only_when_plain() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-request-id", "abc-123").unwrap();
        assert_eq!(request_id(&req), "abc-123");
        req.insert_header("x-request-id", "has space").unwrap();
        assert_ne!(request_id(&req), "has space");
        assert_eq!(request_id(&req).len(), 32);
    }

    #[test]
    fn tokens_are_masked_in_logged_paths() {
        let tokens: Vec<Arc<str>> = vec!["tok123".into()];
        assert_eq!(mask_tokens("/a/tok123/b", &tokens), "/a/<token>/b");
        assert!(matches!(
            mask_tokens("/plain", &tokens),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn fingerprints_are_short_and_stable() {
        assert_eq!(fingerprint("a"), fingerprint("a"));
        assert_eq!(fingerprint("a").len(), 16);
        assert_ne!(fingerprint("a"), fingerprint("b"));
    }
}
