//! Prometheus metrics, registered once per gateway.
//!
//! Every metric is created here with a fixed name (the DESIGN.md contract) and bounded labels:
//! route and token-service names from the config, status codes, and small enums. Never a path,
//! user or token. Each gateway has its own registry, so two gateways in one process (tests)
//! never mix their numbers; the admin listener encodes it.

use pingora_prometheus::prometheus::{
    self, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Latency buckets (seconds): sub-millisecond cache hits up to multi-second STS timeouts.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The gateway's metrics.
pub struct Metrics {
    registry: Registry,
    /// `txgate_requests_total{route,status}`
    pub requests: IntCounterVec,
    /// `txgate_request_duration_seconds{route}`
    pub request_duration: HistogramVec,
    /// `txgate_token_exchanges_total{token_service,outcome}`
    pub exchanges: IntCounterVec,
    /// `txgate_token_exchange_duration_seconds{token_service}`
    pub exchange_duration: HistogramVec,
    /// `txgate_token_cache_lookups_total{route,result}` (result: hit|miss|coalesced)
    pub cache_lookups: IntCounterVec,
    /// `txgate_token_cache_entries`
    pub cache_entries: IntGauge,
    /// `txgate_token_service_circuit_open{token_service}`: 1 while the breaker is open or
    /// half-open.
    pub circuit_open: IntGaugeVec,
    /// `txgate_shared_cache_lookups_total{result}`: lookups of the shared level after a local
    /// miss (hit, miss, unreadable, error, bypassed).
    pub shared_lookups: IntCounterVec,
    /// `txgate_shared_cache_lease_waits_total{outcome}`: waits for another replica's exchange
    /// (filled: its token arrived; alone: the wait ended without it and this replica exchanged).
    pub shared_lease_waits: IntCounterVec,
    /// `txgate_shared_cache_errors_total{operation}`: Redis operations that failed or timed out.
    pub shared_errors: IntCounterVec,
    /// `txgate_shared_cache_circuit_open`: 1 while the shared level's breaker is open.
    pub shared_circuit_open: IntGauge,
    /// `txgate_upstream_token_purges_total{route,retried}`: tokens dropped because the upstream
    /// answered a `purge_on_upstream_status`, and whether the request was sent again.
    pub upstream_token_purges: IntCounterVec,
    /// `txgate_ext_authz_checks_total{route,status,transport}`: Checks answered by the
    /// ext_authz front door (transport: grpc|http), by the HTTP status the caller gets (200:
    /// allowed). Proxied requests are in `txgate_requests_total`, never here.
    pub ext_authz_checks: IntCounterVec,
    /// `txgate_ext_authz_check_duration_seconds{route,transport}`
    pub ext_authz_check_duration: HistogramVec,
    /// `txgate_log_lines_dropped_total`: log lines dropped because the writer's queue was
    /// full (see [`crate::logging`]); brought up to date at each scrape.
    log_lines_dropped: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "txgate_requests_total",
                "Requests answered, by route and HTTP status.",
            ),
            &["route", "status"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "txgate_request_duration_seconds",
                "Time from request header to the end of the response, by route.",
            )
            .buckets(BUCKETS.to_vec()),
            &["route"],
        )?;
        let exchanges = IntCounterVec::new(
            Opts::new(
                "txgate_token_exchanges_total",
                "Token exchange calls to a token service, by outcome.",
            ),
            &["token_service", "outcome"],
        )?;
        let exchange_duration = HistogramVec::new(
            HistogramOpts::new(
                "txgate_token_exchange_duration_seconds",
                "Duration of token exchange calls to a token service.",
            )
            .buckets(BUCKETS.to_vec()),
            &["token_service"],
        )?;
        let cache_lookups = IntCounterVec::new(
            Opts::new(
                "txgate_token_cache_lookups_total",
                "Exchanged-token cache lookups, by route and result (hit, miss, coalesced).",
            ),
            &["route", "result"],
        )?;
        let cache_entries = IntGauge::new(
            "txgate_token_cache_entries",
            "Exchanged tokens currently cached.",
        )?;
        let circuit_open = IntGaugeVec::new(
            Opts::new(
                "txgate_token_service_circuit_open",
                "1 while the token service's circuit breaker is open or half-open, else 0.",
            ),
            &["token_service"],
        )?;
        let shared_lookups = IntCounterVec::new(
            Opts::new(
                "txgate_shared_cache_lookups_total",
                "Lookups of the shared cache level after a local miss, by result (hit, miss, unreadable, error, bypassed).",
            ),
            &["result"],
        )?;
        let shared_lease_waits = IntCounterVec::new(
            Opts::new(
                "txgate_shared_cache_lease_waits_total",
                "Waits for another replica's exchange of the same key, by outcome (filled, alone).",
            ),
            &["outcome"],
        )?;
        let shared_errors = IntCounterVec::new(
            Opts::new(
                "txgate_shared_cache_errors_total",
                "Shared cache operations that failed or timed out, by operation.",
            ),
            &["operation"],
        )?;
        let shared_circuit_open = IntGauge::new(
            "txgate_shared_cache_circuit_open",
            "1 while the shared cache level's circuit breaker is open (Redis is not asked), else 0.",
        )?;
        let upstream_token_purges = IntCounterVec::new(
            Opts::new(
                "txgate_upstream_token_purges_total",
                "Exchanged tokens dropped from the cache because the upstream rejected them, by route and whether the request was retried.",
            ),
            &["route", "retried"],
        )?;
        let ext_authz_checks = IntCounterVec::new(
            Opts::new(
                "txgate_ext_authz_checks_total",
                "ext_authz Checks answered, by route, the HTTP status the caller gets (200: allowed) and transport (grpc, http).",
            ),
            &["route", "status", "transport"],
        )?;
        let ext_authz_check_duration = HistogramVec::new(
            HistogramOpts::new(
                "txgate_ext_authz_check_duration_seconds",
                "Time to answer an ext_authz Check, by route and transport (grpc, http).",
            )
            .buckets(BUCKETS.to_vec()),
            &["route", "transport"],
        )?;
        let log_lines_dropped = IntCounter::new(
            "txgate_log_lines_dropped_total",
            "Log lines dropped because the log writer could not keep up (the request was never held up).",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "txgate_build_info",
                "Always 1; the version label says which build runs.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(exchanges.clone()))?;
        registry.register(Box::new(exchange_duration.clone()))?;
        registry.register(Box::new(cache_lookups.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(circuit_open.clone()))?;
        registry.register(Box::new(shared_lookups.clone()))?;
        registry.register(Box::new(shared_lease_waits.clone()))?;
        registry.register(Box::new(shared_errors.clone()))?;
        registry.register(Box::new(shared_circuit_open.clone()))?;
        registry.register(Box::new(upstream_token_purges.clone()))?;
        registry.register(Box::new(ext_authz_checks.clone()))?;
        registry.register(Box::new(ext_authz_check_duration.clone()))?;
        registry.register(Box::new(log_lines_dropped.clone()))?;
        registry.register(Box::new(build_info))?;
        Ok(Metrics {
            registry,
            requests,
            request_duration,
            exchanges,
            exchange_duration,
            cache_lookups,
            cache_entries,
            circuit_open,
            shared_lookups,
            shared_lease_waits,
            shared_errors,
            shared_circuit_open,
            upstream_token_purges,
            ext_authz_checks,
            ext_authz_check_duration,
            log_lines_dropped,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let dropped = crate::logging::dropped_lines();
        let counted = self.log_lines_dropped.get();
        if dropped > counted {
            self.log_lines_dropped.inc_by(dropped - counted);
        }
        let mut out = Vec::with_capacity(8 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}
