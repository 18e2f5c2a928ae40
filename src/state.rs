//! The running gateway's shared state: what every request of one configuration reads, built
//! once from a [`Config`], and the background tasks that keep it current (JWKS refreshers,
//! upstream health checks). A reload builds a new state and swaps it in; requests in flight
//! keep the one they started with.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use pingora_prometheus::prometheus::{Histogram, IntCounter};

use crate::cache::TokenCache;
use crate::config::{Config, ConfigError, Exchange, Route};
use crate::exchange::{ActorSource, ExchangeProfile};
use crate::inbound::{Inbound, JwtValidator, RefresherGuard};
use crate::metrics::Metrics;
use crate::path::PathRules;
use crate::router::Router;

/// The configuration in force; a reload swaps it, requests in flight keep the one they began
/// with.
pub type CurrentState = Arc<arc_swap::ArcSwap<GatewayState>>;

/// Everything requests share: built once per configuration.
pub struct GatewayState {
    pub router: Router,
    pub routes: Vec<Arc<Route>>,
    pub cache: Arc<TokenCache>,
    pub metrics: Arc<Metrics>,
    pub(crate) route_metrics: Vec<RouteMetrics>,
    pub(crate) max_token_bytes: usize,
    pub(crate) max_request_header_bytes: usize,
    /// How request paths are normalised before routing.
    pub(crate) paths: PathRules,
    /// Set when the proxy service has started accepting; read by `/readyz`.
    pub ready: Arc<AtomicBool>,
    /// Set when shutdown begins; `/readyz` then fails so load balancers drain us.
    pub shutting_down: Arc<AtomicBool>,
    /// The listen addresses of this configuration (they change only with a restart).
    pub listen: Vec<SocketAddr>,
    pub tls_listen: Vec<SocketAddr>,
    /// The validators of each route (by index in the configured order); `None` leaves
    /// validation to the STS.
    pub(crate) inbound: Vec<Option<Arc<Inbound>>>,
    /// The live exchange of each route (by index in the configured order); `None` for
    /// `mode: none`.
    pub(crate) profiles: Vec<Option<Arc<ExchangeProfile>>>,
    /// The token services of each route that lists several (`exchange.token_services`), in
    /// configured order; empty for every other route.
    pub(crate) choices: Vec<Vec<IssuerRoute>>,
    /// The `Txn-Token` validator of each internal route (`inbound.txn_token`).
    pub(crate) txn_tokens: Vec<Option<Arc<JwtValidator>>>,
    /// Every distinct JWT validator; readiness waits for their first JWKS.
    pub jwt_validators: Vec<Arc<JwtValidator>>,
    /// Keeps the validators' background JWKS refreshers running.
    refreshers: Mutex<Vec<RefresherGuard>>,
}

/// One token service of a route that lists several: the caller's `iss` that picks it, its
/// exchange, and its validators.
pub(crate) struct IssuerRoute {
    pub(crate) issuer: String,
    pub(crate) profile: Arc<ExchangeProfile>,
    pub(crate) inbound: Arc<Inbound>,
}

/// Per-route metric handles, resolved once so the hot path does no label hashing for them.
pub(crate) struct RouteMetrics {
    pub(crate) duration: Histogram,
    pub(crate) hit: IntCounter,
    pub(crate) miss: IntCounter,
    pub(crate) coalesced: IntCounter,
    /// `txgate_requests_total{route, status}` for the statuses a gateway answers most; others
    /// are looked up by label (which takes the metric family's lock).
    pub(crate) by_status: Vec<(u16, IntCounter)>,
}

/// Statuses whose request counters are resolved once per route.
const COMMON_STATUSES: &[u16] = &[
    200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 429, 431, 500, 502, 503, 504,
];

impl GatewayState {
    /// Starts the JWKS refreshers (first fetch now). Called once, on a runtime, when the proxy
    /// starts.
    pub fn start_background(&self) {
        // The shared cache level connects once; the cache outlives reloads.
        self.cache.start();
        let guards: Vec<RefresherGuard> = self
            .jwt_validators
            .iter()
            .map(|v| v.spawn_refresher())
            .collect();
        if let Ok(mut refreshers) = self.refreshers.lock() {
            refreshers.extend(guards);
        }
        // Actor token files are re-read off the request path; each watcher ends with its
        // configuration.
        let chosen = self.choices.iter().flatten().map(|c| &c.profile);
        for profile in self.profiles.iter().flatten().chain(chosen) {
            if let Some(ActorSource::File(file)) = profile.mode.actor() {
                crate::exchange::actor::TokenFile::watch(file);
            }
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

    /// The live exchange of the route at `index` (configured order); `None` for `mode: none`.
    /// Called for every request.
    pub fn profile(&self, index: usize) -> Option<&Arc<ExchangeProfile>> {
        self.profiles.get(index).and_then(Option::as_ref)
    }

    /// The validators of the route at `index` (configured order); `None` when it validates
    /// nothing locally. For embedders and tests that look at a validator's counters.
    pub fn validators(&self, index: usize) -> Option<&Arc<Inbound>> {
        self.inbound.get(index).and_then(Option::as_ref)
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

    /// Builds the running gateway for `config`: the one place where settings become live parts
    /// (token services with their clients and breakers, each route's exchange with its actor,
    /// the validators, the route table). On a reload `previous` hands over what outlives a
    /// configuration: the token cache (entries are keyed by exchange profile, so changed
    /// routes simply miss), the metrics registry and the readiness flags.
    pub fn new(
        config: &Config,
        previous: Option<&GatewayState>,
    ) -> Result<GatewayState, StateError> {
        let metrics = match previous {
            Some(p) => p.metrics.clone(),
            None => Arc::new(Metrics::new().map_err(|e| StateError::Metrics(e.to_string()))?),
        };
        let in_file =
            |p: crate::config::ConfigProblem| StateError::Config(p.in_file(&config.source));
        let services = crate::exchange::token_services(&config.token_services).map_err(in_file)?;
        let profiles = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, route)| match &route.exchange {
                Exchange::None | Exchange::ByIssuer(_) => Ok(None),
                Exchange::Token(settings) => {
                    ExchangeProfile::build(&format!("routes[{i}].exchange"), settings, &services)
                        .map(|p| Some(Arc::new(p)))
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(in_file)?;
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
        // One set of validators per `inbound:` block: routes sharing their token service's block
        // (one `Arc` of settings) share its validators, so its JWKS is fetched once.
        let mut built: Vec<(*const crate::config::InboundSettings, Arc<Inbound>)> = Vec::new();
        let mut validators_of = |settings: &Arc<crate::config::InboundSettings>,
                                 http: &reqwest::Client| {
            let key = Arc::as_ptr(settings);
            if let Some((_, same)) = built.iter().find(|(k, _)| *k == key) {
                return same.clone();
            }
            let validators = Arc::new(Inbound::build(settings, http));
            built.push((key, validators.clone()));
            validators
        };
        let inbound: Vec<Option<Arc<Inbound>>> = config
            .routes
            .iter()
            .zip(&profiles)
            .map(|(route, profile)| {
                let (Some(settings), Some(profile)) = (&route.inbound, profile) else {
                    return None;
                };
                Some(validators_of(settings, &profile.service.http))
            })
            .collect();
        let mut choices: Vec<Vec<IssuerRoute>> = Vec::with_capacity(config.routes.len());
        for (i, route) in config.routes.iter().enumerate() {
            let Exchange::ByIssuer(listed) = &route.exchange else {
                choices.push(Vec::new());
                continue;
            };
            let mut built_choices = Vec::with_capacity(listed.len());
            for choice in listed.iter() {
                let path = format!("routes[{i}].exchange");
                let profile = Arc::new(
                    ExchangeProfile::build(&path, &choice.exchange, &services).map_err(in_file)?,
                );
                let inbound = validators_of(&choice.inbound, &profile.service.http);
                built_choices.push(IssuerRoute {
                    issuer: choice.issuer.clone(),
                    profile,
                    inbound,
                });
            }
            choices.push(built_choices);
        }
        let mut jwt_validators: Vec<Arc<JwtValidator>> = built
            .iter()
            .filter_map(|(_, validators)| validators.jwt.clone())
            .collect();
        let mut txn_tokens: Vec<Option<Arc<JwtValidator>>> = Vec::new();
        for (i, route) in config.routes.iter().enumerate() {
            let Some(settings) = &route.txn_token else {
                txn_tokens.push(None);
                continue;
            };
            let http = crate::exchange::http_client(crate::config::defaults::STS_CONNECT_TIMEOUT)
                .map_err(|e| {
                in_file(crate::config::ConfigProblem::new(
                    format!("routes[{i}].inbound.txn_token"),
                    format!("cannot build the HTTP client for its JWKS: {e}"),
                ))
            })?;
            let validator = Arc::new(JwtValidator::new((**settings).clone(), http));
            jwt_validators.push(validator.clone());
            txn_tokens.push(Some(validator));
        }
        Ok(GatewayState {
            jwt_validators,
            inbound,
            profiles,
            choices,
            txn_tokens,
            refreshers: Mutex::new(Vec::new()),
            router: Router::new(&config.routes),
            routes: config.routes.clone(),
            cache: match previous {
                Some(p) => p.cache.clone(),
                None => Arc::new(TokenCache::build(&config.cache, &metrics).map_err(in_file)?),
            },
            metrics,
            route_metrics,
            max_token_bytes: config.server.max_token_bytes,
            max_request_header_bytes: config.server.max_request_header_bytes,
            paths: config.server.paths,
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

/// Why a configuration could not be made to run.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A setting that reads as valid but cannot be put to work (an actor token file that
    /// cannot be read, an HTTP client that cannot be built), at its key.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot register metrics: {0}")]
    Metrics(String),
}
