//! The admin listener: the status page at `/`, `/metrics`, `/healthz`, `/readyz`.
//!
//! It runs as its own pingora service on its own address, so scrapes and probes never queue
//! behind proxy traffic and are never reachable through a proxy route.
//!
//! The status page is for an operator with a browser and nothing else: one self-contained HTML
//! document (inline style, no scripts, no external assets) built from the same state and
//! counters `/metrics` exports, so the page and the dashboards never disagree. Every string that
//! comes from the configuration is HTML-escaped where it is written ([`Esc`]), and the answer
//! carries a Content-Security-Policy that forbids scripts, so a hostile route name, path or
//! audience can at worst look odd.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use http::{Response, StatusCode, header};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora_prometheus::prometheus::IntCounterVec;
use pingora_prometheus::prometheus::core::Collector;

use crate::config::{Exchange, ExchangeSettings, HostPattern, ModeKind, ModeSettings, Route};
use crate::exchange::ActorSource;
use crate::state::{CurrentState, GatewayState};

const TEXT: &str = "text/plain; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";
/// Nothing on the admin listener needs scripts, frames or remote loads; the status page needs
/// its one inline `<style>`. Denying the rest means an escaping slip cannot run code.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'";

/// The exchange outcomes in the order the page lists them: success first, then the caller's
/// problems, then ours and the STS's (the `outcome` label of `txgate_token_exchanges_total`).
const OUTCOME_ORDER: &[&str] = &[
    "success",
    "subject_rejected",
    "forbidden",
    "client_rejected",
    "unavailable",
    "timeout",
    "bad_response",
    "echoed_input_token",
    "unexpected_token_type",
];

/// The admin HTTP application.
pub struct AdminApp {
    current: CurrentState,
    /// The ext_authz listeners, shown with their Check counts.
    ext_authz: crate::ext_authz::Listeners,
}

/// One admin answer before it becomes an HTTP response.
struct Answer {
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Answer {
    fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> Answer {
        Answer {
            status: StatusCode::OK,
            content_type,
            body: body.into(),
        }
    }
}

impl AdminApp {
    pub fn new(current: CurrentState, ext_authz: crate::ext_authz::Listeners) -> AdminApp {
        AdminApp { current, ext_authz }
    }

    async fn answer(&self, method: &http::Method, path: &str) -> Answer {
        if method != http::Method::GET && method != http::Method::HEAD {
            return Answer {
                status: StatusCode::METHOD_NOT_ALLOWED,
                content_type: TEXT,
                body: b"only GET and HEAD\n".to_vec(),
            };
        }
        match path {
            "/" => {
                let mut snapshot = Snapshot::take(&self.current.load_full()).await;
                snapshot.ext_authz = self.ext_authz;
                Answer::ok(HTML, status_page(&snapshot))
            }
            "/metrics" => {
                let entries = self.current.load_full().cache.entry_count().await;
                self.current
                    .load_full()
                    .metrics
                    .cache_entries
                    .set(i64::try_from(entries).unwrap_or(i64::MAX));
                Answer::ok(
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.current.load_full().metrics.encode(),
                )
            }
            "/healthz" => Answer::ok(TEXT, "ok\n"),
            "/readyz" => {
                if self.current.load_full().is_ready() {
                    Answer::ok(TEXT, "ready\n")
                } else {
                    Answer {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        content_type: TEXT,
                        body: b"not ready\n".to_vec(),
                    }
                }
            }
            _ => Answer {
                status: StatusCode::NOT_FOUND,
                content_type: TEXT,
                body: b"not found: try /, /metrics, /healthz or /readyz\n".to_vec(),
            },
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let Answer {
            status,
            content_type,
            body,
        } = self.answer(&method, &path).await;
        let length = body.len();
        let body = if method == http::Method::HEAD {
            Vec::new()
        } else {
            body
        };
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, length)
            .header(header::CACHE_CONTROL, "no-store")
            .header(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY)
            .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
            .body(body)
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}

/// Writes its text HTML-escaped. Every config-derived string on the page goes through this, at
/// the point where it is formatted, so no code path can forget it.
struct Esc<'a>(&'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// Counter values of one metric family keyed by the values of `labels`, summed over every
/// other label. Read through `collect()`, which never creates a series, so looking at the page
/// adds nothing to `/metrics`.
fn sums(counter: &IntCounterVec, labels: &[&str]) -> BTreeMap<Vec<String>, u64> {
    let mut out: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    for family in counter.collect() {
        for metric in family.get_metric() {
            let pairs = metric.get_label();
            let key = labels
                .iter()
                .map(|want| {
                    pairs
                        .iter()
                        .find(|p| p.name() == *want)
                        .map(|p| p.value().to_string())
                        .unwrap_or_default()
                })
                .collect();
            // Counters are integral; the exposition model stores them as f64.
            *out.entry(key).or_default() += metric.get_counter().value() as u64;
        }
    }
    out
}

/// Cache lookups of one route (or of all routes) by result.
#[derive(Default, Clone, Copy)]
struct Lookups {
    hit: u64,
    miss: u64,
    coalesced: u64,
}

impl Lookups {
    fn total(self) -> u64 {
        self.hit + self.miss + self.coalesced
    }

    /// Hits over all lookups, the ratio the dashboard and the alert use; `n/a` before the first
    /// lookup rather than a made-up 0 %.
    fn hit_ratio(self) -> String {
        match self.total() {
            0 => "n/a".to_string(),
            total => format!("{:.1}%", self.hit as f64 * 100.0 / total as f64),
        }
    }
}

/// A token service as the page shows it.
struct ServiceRow {
    name: String,
    profile: &'static str,
    token_endpoint: String,
    client_id: String,
    auth: String,
    /// The circuit breaker's state now: `closed`, `open` or `half_open`.
    circuit: &'static str,
    /// Key paths of this service's endpoints reached over plain HTTP on another host
    /// ([`crate::config::TokenService::transport_warnings`]); marked on the page.
    insecure: Vec<String>,
    /// `(outcome, count)` in [`OUTCOME_ORDER`], then any unknown outcome.
    outcomes: Vec<(String, u64)>,
}

/// Everything the page shows, read once so the page is consistent with itself.
struct Snapshot {
    version: &'static str,
    readiness: &'static str,
    routes: Vec<Arc<Route>>,
    requests: BTreeMap<String, u64>,
    lookups: BTreeMap<String, Lookups>,
    services: Vec<ServiceRow>,
    cache_entries: u64,
    /// The shared level (`cache.shared`): its state and its lookups by result.
    shared: Option<(crate::cache::shared::SharedStatus, BTreeMap<String, u64>)>,
    /// The ext_authz listeners and their Checks by (transport, status).
    ext_authz: crate::ext_authz::Listeners,
    checks: BTreeMap<Vec<String>, u64>,
}

impl Snapshot {
    async fn take(state: &GatewayState) -> Snapshot {
        let metrics = &state.metrics;
        let requests = sums(&metrics.requests, &["route"])
            .into_iter()
            .map(|(k, v)| (k.concat(), v))
            .collect();
        let mut lookups: BTreeMap<String, Lookups> = BTreeMap::new();
        for (key, n) in sums(&metrics.cache_lookups, &["route", "result"]) {
            let entry = lookups.entry(key[0].clone()).or_default();
            match key[1].as_str() {
                "hit" => entry.hit += n,
                "miss" => entry.miss += n,
                _ => entry.coalesced += n,
            }
        }
        let exchanges = sums(&metrics.exchanges, &["token_service", "outcome"]);
        // GatewayState holds the routes, not the configured services: the services shown are
        // the ones a route (or a delegation's own actor token) uses, each once.
        let mut services: BTreeMap<String, ServiceRow> = BTreeMap::new();
        for profile in state.profiles.iter().flatten() {
            let mut used = vec![&profile.service];
            if let Some(ActorSource::Own(own)) = profile.mode.actor() {
                used.push(&own.service);
            }
            for live in used {
                let service = &live.settings;
                services
                    .entry(service.name.clone())
                    .or_insert_with(|| ServiceRow {
                        name: service.name.clone(),
                        profile: service.profile.as_str(),
                        token_endpoint: service.token_endpoint.to_string(),
                        client_id: service.client_id.clone(),
                        auth: format!("{:?}", service.client_auth),
                        circuit: live.resilience.state().as_str(),
                        insecure: service
                            .transport_warnings()
                            .into_iter()
                            .map(|w| w.path)
                            .collect(),
                        outcomes: outcomes_of(&exchanges, &service.name),
                    });
            }
        }
        let ready = state.ready.load(Ordering::Acquire);
        let draining = state.shutting_down.load(Ordering::Acquire);
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            readiness: match (draining, state.is_ready(), ready) {
                (true, _, _) => "draining",
                (false, true, _) => "ready",
                (false, false, true) => "waiting for JWKS",
                (false, false, false) => "starting",
            },
            routes: state.routes.clone(),
            requests,
            lookups,
            services: services.into_values().collect(),
            cache_entries: state.cache.entry_count().await,
            ext_authz: crate::ext_authz::Listeners::default(),
            checks: sums(&metrics.ext_authz_checks, &["transport", "status"]),
            shared: state.cache.shared_status().map(|status| {
                let mut counts: BTreeMap<String, u64> = sums(&metrics.shared_lookups, &["result"])
                    .into_iter()
                    .map(|(k, v)| (k.concat(), v))
                    .collect();
                for (k, v) in sums(&metrics.shared_lease_waits, &["outcome"]) {
                    counts.insert(format!("wait {}", k.concat()), v);
                }
                (status, counts)
            }),
        }
    }
}

fn outcomes_of(exchanges: &BTreeMap<Vec<String>, u64>, service: &str) -> Vec<(String, u64)> {
    let mut found: Vec<(String, u64)> = exchanges
        .iter()
        .filter(|(key, _)| key[0] == service)
        .map(|(key, n)| (key[1].clone(), *n))
        .collect();
    let rank = |o: &str| {
        OUTCOME_ORDER
            .iter()
            .position(|k| *k == o)
            .unwrap_or(OUTCOME_ORDER.len())
    };
    found.sort_by(|a, b| rank(&a.0).cmp(&rank(&b.0)).then(a.0.cmp(&b.0)));
    found
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1f23}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .4em}\
table{border-collapse:collapse}th,td{border:1px solid #d0d7de;padding:.3em .6em;\
text-align:left;vertical-align:top}th{background:#f6f8fa}td.n{text-align:right}\
code{font:12px ui-monospace,monospace}.muted{color:#57606a}\
.circuit-open,.circuit-half_open,.insecure{color:#b42318;font-weight:600}";

/// The status page. Numbers are totals since this process started, like the counters.
fn status_page(s: &Snapshot) -> String {
    let mut out = String::with_capacity(8 * 1024);
    // `write!` into a String cannot fail; the results are ignored for that reason.
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>txgate status</title><style>{STYLE}</style></head><body>\
         <h1>txgate {version}</h1>\
         <p id=\"readiness\">Readiness: <strong>{readiness}</strong>. \
         <span class=\"muted\">Counts are totals since this process started. \
         Also here: <a href=\"/metrics\">/metrics</a>, <a href=\"/healthz\">/healthz</a>, \
         <a href=\"/readyz\">/readyz</a>.</span></p>",
        version = Esc(s.version),
        readiness = Esc(s.readiness),
    );
    if let Some((status, _)) = &s.shared
        && status.state != "connected"
    {
        // Not a readiness condition (the replica serves without Redis), but what an operator
        // looking at readiness needs to see.
        let _ = write!(
            out,
            "<p id=\"shared-readiness\" class=\"insecure\">Shared cache level: {state}; \
             this replica goes on with its own cache and the STS.</p>",
            state = Esc(status.state),
        );
    }

    out.push_str(
        "<h2>Routes</h2><table id=\"routes\"><tr><th>name</th><th>match</th>\
         <th>upstream</th><th>mode</th><th>token service</th><th>exchange parameters</th>\
         <th>requests</th><th>cache hit ratio</th></tr>",
    );
    for route in &s.routes {
        let host = match &route.host {
            None => "any host".to_string(),
            Some(HostPattern::Exact(h)) => h.clone(),
            Some(HostPattern::Suffix(suffix)) => format!("*{suffix}"),
        };
        let (mode, service, params) = match &route.exchange {
            Exchange::None => ("none", "—".to_string(), String::new()),
            Exchange::Token(p) => match &p.mode {
                ModeSettings::Chain { steps } => (
                    p.mode.as_str(),
                    steps
                        .iter()
                        .map(|s| s.service.name.as_str())
                        .collect::<Vec<_>>()
                        .join(" → "),
                    steps
                        .iter()
                        .map(|s| exchange_params(s))
                        .collect::<Vec<_>>()
                        .join(" → "),
                ),
                _ => (p.mode.as_str(), p.service.name.clone(), exchange_params(p)),
            },
            Exchange::ByIssuer(choices) => (
                choices[0].exchange.mode.as_str(),
                choices
                    .iter()
                    .map(|c| format!("{} (iss {})", c.exchange.service.name, c.issuer))
                    .collect::<Vec<_>>()
                    .join(", "),
                exchange_params(&choices[0].exchange),
            ),
        };
        let lookups = s.lookups.get(&route.name).copied().unwrap_or_default();
        let _ = write!(
            out,
            "<tr><td>{name}</td><td><code>{host}</code> <code>{prefix}</code></td>\
             <td><code>{upstream}</code></td><td>{mode}</td><td>{service}</td>\
             <td><code>{params}</code></td><td class=\"n\">{requests}</td>\
             <td class=\"n\">{ratio}</td></tr>",
            name = Esc(&route.name),
            host = Esc(&host),
            prefix = Esc(&route.path_prefix),
            upstream = Esc(route.upstream.display.as_str()),
            mode = Esc(mode),
            service = Esc(&service),
            params = Esc(&params),
            requests = s.requests.get(&route.name).copied().unwrap_or(0),
            ratio = Esc(&match &route.exchange {
                Exchange::None => "—".to_string(),
                // A Transaction Token is obtained for each request, never cached.
                Exchange::Token(p) if p.mode.kind() == ModeKind::TransactionToken => {
                    "not cached".to_string()
                }
                Exchange::Token(_) | Exchange::ByIssuer(_) => lookups.hit_ratio(),
            }),
        );
    }
    if let Some(n) = s.requests.get("_none") {
        let _ = write!(
            out,
            "<tr><td class=\"muted\">(no route matched)</td><td></td><td></td><td></td>\
             <td></td><td></td><td class=\"n\">{n}</td><td></td></tr>"
        );
    }
    out.push_str("</table>");

    out.push_str(
        "<h2>Token services</h2><table id=\"token-services\"><tr><th>name</th>\
         <th>profile</th><th>token endpoint</th><th>client</th><th>circuit</th>\
         <th>exchanges</th><th>outcomes</th></tr>",
    );
    for service in &s.services {
        let total: u64 = service.outcomes.iter().map(|(_, n)| n).sum();
        let outcomes = if service.outcomes.is_empty() {
            "none yet".to_string()
        } else {
            service
                .outcomes
                .iter()
                .map(|(o, n)| format!("{o} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let insecure = if service.insecure.is_empty() {
            String::new()
        } else {
            format!(
                " <span class=\"insecure\" title=\"{keys}\">insecure transport</span>",
                keys = Esc(&format!(
                    "plain http:// to a non-loopback host: {}",
                    service.insecure.join(", ")
                ))
            )
        };
        let _ = write!(
            out,
            "<tr><td>{name}</td><td>{profile}</td><td><code>{endpoint}</code>{insecure}</td>\
             <td>{client} ({auth})</td><td class=\"circuit-{circuit}\">{circuit}</td>\
             <td class=\"n\">{total}</td><td>{outcomes}</td></tr>",
            circuit = Esc(service.circuit),
            name = Esc(&service.name),
            profile = Esc(service.profile),
            endpoint = Esc(&service.token_endpoint),
            client = Esc(&service.client_id),
            auth = Esc(&service.auth),
            outcomes = Esc(&outcomes),
        );
    }
    if s.services.is_empty() {
        out.push_str("<tr><td colspan=\"7\" class=\"muted\">no route exchanges tokens</td></tr>");
    }
    out.push_str(
        "</table><p class=\"muted\">circuit: the breaker's state now (open: misses fail fast \
         with 503; half_open: one probe call is let through). Outcomes count STS calls since \
         start. insecure transport: an endpoint of the service is reached over plain http:// \
         on another host (see txgate check).</p>",
    );

    let all = s
        .lookups
        .values()
        .fold(Lookups::default(), |sum, l| Lookups {
            hit: sum.hit + l.hit,
            miss: sum.miss + l.miss,
            coalesced: sum.coalesced + l.coalesced,
        });
    let _ = writeln!(
        out,
        "<h2>Token cache</h2><table id=\"cache\">\
         <tr><th>entries</th><td class=\"n\">{entries}</td></tr>\
         <tr><th>hit ratio</th><td class=\"n\">{ratio}</td></tr>\
         <tr><th>hits</th><td class=\"n\">{hit}</td></tr>\
         <tr><th>misses</th><td class=\"n\">{miss}</td></tr>\
         <tr><th>coalesced</th><td class=\"n\">{coalesced}</td></tr></table>",
        entries = s.cache_entries,
        ratio = Esc(&all.hit_ratio()),
        hit = all.hit,
        miss = all.miss,
        coalesced = all.coalesced,
    );
    if let Some((status, counts)) = &s.shared {
        let count = |k: &str| counts.get(k).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "<h2>Shared cache level</h2><table id=\"shared-cache\">\
             <tr><th>Redis</th><td><code>{url}</code></td></tr>\
             <tr><th>state</th><td class=\"shared-{class}\">{state}</td></tr>\
             <tr><th>last error</th><td>{error}</td></tr>\
             <tr><th>hits</th><td class=\"n\">{hit}</td></tr>\
             <tr><th>misses</th><td class=\"n\">{miss}</td></tr>\
             <tr><th>unreadable values</th><td class=\"n\">{unreadable}</td></tr>\
             <tr><th>errors</th><td class=\"n\">{error_count}</td></tr>\
             <tr><th>not asked (breaker open)</th><td class=\"n\">{bypassed}</td></tr>\
             <tr><th>waits filled by another replica</th><td class=\"n\">{filled}</td></tr>\
             <tr><th>waits that ended alone</th><td class=\"n\">{alone}</td></tr></table>",
            url = Esc(&status.url),
            class = Esc(&status.state.replace(' ', "_")),
            state = Esc(status.state),
            error = Esc(status.last_error.as_deref().unwrap_or("—")),
            hit = count("hit"),
            miss = count("miss"),
            unreadable = count("unreadable"),
            error_count = count("error"),
            bypassed = count("bypassed"),
            filled = count("wait filled"),
            alone = count("wait alone"),
        );
    }
    ext_authz_section(&mut out, s);
    out.push_str("</body></html>");
    out
}

/// The ext_authz listeners, each with its Checks by status (200: allowed).
fn ext_authz_section(out: &mut String, s: &Snapshot) {
    let listeners = [("grpc", s.ext_authz.grpc), ("http", s.ext_authz.http)];
    if listeners.iter().all(|(_, addr)| addr.is_none()) {
        return;
    }
    out.push_str(
        "<h2>ext_authz</h2><table id=\"ext-authz\"><tr><th>transport</th><th>listening on</th>\
         <th>checks</th><th>by status</th></tr>",
    );
    for (transport, addr) in listeners {
        let Some(addr) = addr else { continue };
        let by_status: Vec<(String, u64)> = s
            .checks
            .iter()
            .filter(|(key, _)| key[0] == transport)
            .map(|(key, n)| (key[1].clone(), *n))
            .collect();
        let total: u64 = by_status.iter().map(|(_, n)| n).sum();
        let detail = by_status
            .iter()
            .map(|(status, n)| format!("{status}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            out,
            "<tr><td>{transport}</td><td><code>{addr}</code></td><td class=\"n\">{total}</td>\
             <td>{detail}</td></tr>",
            addr = Esc(&addr.to_string()),
            detail = Esc(&detail),
        );
    }
    out.push_str("</table>");
}

/// An exchange's parameters as `key=value` pairs, for the routes table.
fn exchange_params(p: &ExchangeSettings) -> String {
    p.params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_attribute_quotes() {
        assert_eq!(
            Esc(r#"<a href="x">Tom & 'Jerry'</a>"#).to_string(),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
        );
        assert_eq!(Esc("plain/orders").to_string(), "plain/orders");
        assert_eq!(Esc("").to_string(), "");
        assert_eq!(Esc("é<ü").to_string(), "é&lt;ü");
    }

    #[test]
    fn hit_ratio_is_not_made_up_before_the_first_lookup() {
        assert_eq!(Lookups::default().hit_ratio(), "n/a");
        let l = Lookups {
            hit: 5,
            miss: 1,
            coalesced: 0,
        };
        assert_eq!(l.hit_ratio(), "83.3%");
    }

    #[test]
    fn outcomes_list_success_first_then_known_then_unknown() {
        let mut exchanges = BTreeMap::new();
        for (service, outcome, n) in [
            ("corp", "timeout", 2),
            ("corp", "zzz_new", 1),
            ("corp", "success", 7),
            ("other", "success", 9),
        ] {
            exchanges.insert(vec![service.to_string(), outcome.to_string()], n);
        }
        assert_eq!(
            outcomes_of(&exchanges, "corp"),
            vec![
                ("success".to_string(), 7),
                ("timeout".to_string(), 2),
                ("zzz_new".to_string(), 1)
            ]
        );
    }
}
