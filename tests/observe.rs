//! Observability end to end, with the real tools an operator uses:
//! - Debian's `prometheus` scrapes a running gateway and its HTTP API returns the request
//!   count and the cache hit ratio that the traffic produced;
//! - the `txgate` binary, run as in production with JSON logs at debug level, logs exactly one
//!   access event per request and never a caller's token or the client secret;
//! - headless Chromium renders the admin status page, config-derived text escaped.
//!
//! Prometheus and Chromium come from Debian (`prometheus`, `chromium`; `scripts/setup.sh
//! --test`). Every wait polls for the condition under a deadline; none sleeps for a fixed time.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{Process, TxgateProcess};
use common::yaml::{Exchange, GatewayYaml, Route, TokenService};
use common::{
    Behavior, RecordingUpstream, TestSts, caller_token, client, eventually, gateway, get,
};

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "txgate-observe-{what}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process that is killed when the test ends, passes or panics.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tool(variable: &str, default: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| default.to_string())
}

fn read_lossy(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

// --- a real Prometheus ---------------------------------------------------------------------

/// The address Prometheus bound, from its log line `msg="Listening on" address=127.0.0.1:PORT`
/// (its web listener on port 0).
fn listening_on(log: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains("msg=\"Listening on\""))?;
    let at = line.find("address=")? + "address=".len();
    line[at..].split_whitespace().next()?.parse().ok()
}

/// Prometheus's HTTP API: `GET /api/v1/<path>` as JSON, or why not.
async fn prometheus_api(base: &str, path: &str) -> Result<serde_json::Value, String> {
    let response = client()
        .get(format!("{base}/api/v1/{path}"))
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|e| format!("{status}: not JSON: {e}"))?;
    if body["status"] != "success" {
        return Err(format!("{status}: {body}"));
    }
    Ok(body["data"].clone())
}

/// The value of a PromQL query that returns one sample (a one-element vector).
async fn query_value(base: &str, promql: &str) -> Result<f64, String> {
    let query: String = url::form_urlencoded::byte_serialize(promql.as_bytes()).collect();
    let data = prometheus_api(base, &format!("query?query={query}")).await?;
    let result = data["result"]
        .as_array()
        .ok_or_else(|| format!("no result: {data}"))?;
    match result.as_slice() {
        [sample] => sample["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("unreadable sample: {sample}")),
        _ => Err(format!("{} samples: {data}", result.len())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_request_count_and_cache_hit_ratio() {
    let deadline = Instant::now() + Duration::from_secs(90);
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw =
        gateway(
            &GatewayYaml::new()
                .admin()
                .token_service(TokenService::at(&sts))
                .route(Route::new("orders", "/orders", upstream.url()).exchange(
                    Exchange::impersonation("corp").audience("https://orders.example.com"),
                ))
                .to_yaml(),
        )
        .await;
    let admin = gw.admin_addr.expect("admin listener");

    let dir = TempDir::new("prometheus");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: txgate\n    static_configs:\n      - targets: [\"{admin}\"]\n"
        ),
    )
    .unwrap();
    let program = tool("PROMETHEUS", "prometheus");
    let prometheus = Process::spawn(
        Command::new(&program)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0"),
    )
    .unwrap_or_else(|e| panic!("cannot run {program} (apt-get install prometheus): {e}"));
    let address = prometheus
        .wait_for_stderr(
            "log the address it listens on",
            deadline.saturating_duration_since(Instant::now()),
            listening_on,
        )
        .await;
    let base = format!("http://{address}");
    // What a timed-out wait shows besides the last answer.
    let with_log = |seen: String| format!("{seen}\nprometheus log:\n{}", prometheus.stderr());
    let left = || deadline.saturating_duration_since(Instant::now());

    // Scraped at least once before any traffic: every counter's first sample is its start.
    eventually("the txgate target to be up", left(), || async {
        let data = prometheus_api(&base, "targets").await.map_err(with_log)?;
        let targets = data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        match targets.iter().find(|t| t["labels"]["job"] == "txgate") {
            Some(t) if t["health"] == "up" => Ok(()),
            Some(t) => Err(with_log(format!(
                "health {} ({})",
                t["health"], t["lastError"]
            ))),
            None => Err(with_log(format!("no txgate target in {data}"))),
        }
    })
    .await;

    // 12 requests: one token 10 times (1 miss, 9 hits), another twice (1 miss, 1 hit).
    let (first, second) = (caller_token(), caller_token());
    for token in std::iter::repeat_n(&first, 10).chain(std::iter::repeat_n(&second, 2)) {
        let response = client()
            .get(format!("{}/orders", gw.url()))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(sts.calls(), 2, "two exchanges, the rest from the cache");

    let requests = eventually("sum(txgate_requests_total) = 12", left(), || async {
        match query_value(&base, "sum(txgate_requests_total)").await {
            Ok(v) if v == 12.0 => Ok(v),
            Ok(v) => Err(with_log(format!("{v}"))),
            Err(e) => Err(with_log(e)),
        }
    })
    .await;
    assert_eq!(requests, 12.0);

    let hit_ratio = r#"sum(rate(txgate_token_cache_lookups_total{result="hit"}[1m])) / sum(rate(txgate_token_cache_lookups_total[1m]))"#;
    let ratio = eventually("the cache hit ratio 10/12", left(), || async {
        match query_value(&base, hit_ratio).await {
            Ok(v) if (v - 10.0 / 12.0).abs() < 1e-9 => Ok(v),
            Ok(v) => Err(with_log(format!("{v}"))),
            Err(e) => Err(with_log(e)),
        }
    })
    .await;
    assert!((ratio - 10.0 / 12.0).abs() < 1e-9, "{ratio}");
    println!("scraped by Prometheus: sum(txgate_requests_total) = {requests}, hit ratio = {ratio}");
}

// --- the binary's logs ---------------------------------------------------------------------

/// One request of the log test: how it is sent, what it must get, and the secrets it carries.
struct Case {
    /// Sent as `X-Request-Id`, which the gateway keeps and logs: ties the event to the case.
    id: String,
    path: String,
    headers: Vec<(&'static str, String)>,
    status: u16,
    route: &'static str,
    /// The caller token the gateway should fingerprint (a Bearer token it accepted as one).
    caller: Option<String>,
    cache: Option<&'static str>,
    /// What the test STS answers while this request is made.
    sts: Behavior,
}

fn case(n: usize, path: &str, status: u16, route: &'static str) -> Case {
    Case {
        id: format!("observe-{n}"),
        path: path.to_string(),
        headers: Vec::new(),
        status,
        route,
        caller: None,
        cache: None,
        sts: Behavior::issue(),
    }
}

/// True when `needle` occurs in `haystack` as a whole token: not as part of a longer run of
/// letters, digits, `-` or `_` (so `xt-1` does not match inside `xt-12`).
fn contains_token(haystack: &str, needle: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    haystack.match_indices(needle).any(|(i, _)| {
        let before = haystack[..i].chars().next_back();
        let after = haystack[i + needle.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_one_json_access_event_per_request_and_never_a_token_or_secret() {
    let deadline = Instant::now() + Duration::from_secs(60);
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let secret = format!("client-secret-{:016x}", rand::random::<u64>());
    let yaml = GatewayYaml::new()
        .admin()
        .grace_period(Duration::from_secs(1))
        .shutdown_timeout(Duration::from_secs(1))
        .max_token_bytes(512)
        .token_service(TokenService::at(&sts).set("client_secret", "${TXGATE_CLIENT_SECRET}"))
        .route(
            Route::new("orders", "/orders", upstream.url())
                .exchange(Exchange::impersonation("corp").scope("orders:read")),
        )
        .route(Route::new("public", "/public", upstream.url()).exchange(Exchange::none()))
        .to_yaml();
    let mut child = TxgateProcess::run(&yaml)
        .log_format("json")
        .log_level("debug")
        .env("TXGATE_CLIENT_SECRET", &secret)
        .start()
        .await;
    let readyz = format!("{}/readyz", child.admin_url());
    eventually(
        "txgate /readyz",
        deadline.saturating_duration_since(Instant::now()),
        || async {
            match get(&readyz, None).await.status {
                status if status == 200 => Ok(()),
                status => Err(format!("{status}\n{}", child.output().both())),
            }
        },
    )
    .await;

    // Every token-like string sent, whatever the gateway made of it; none may be logged.
    // The secret also travels as HTTP Basic credentials (client_secret_basic).
    let basic = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("gateway:{secret}"))
    };
    let secrets = std::cell::RefCell::new(vec![secret.clone(), basic]);
    let token = || {
        let t = caller_token();
        secrets.borrow_mut().push(t.clone());
        t
    };
    let mut cases = Vec::new();
    let bearer = |t: &str| ("authorization", format!("Bearer {t}"));

    // Good tokens: an exchange, then a hit; a second caller; a lowercase scheme.
    let good = token();
    for cache in ["miss", "hit"] {
        let mut c = case(cases.len(), "/orders/7", 200, "orders");
        c.headers.push(bearer(&good));
        c.caller = Some(good.clone());
        c.cache = Some(cache);
        cases.push(c);
    }
    let other = token();
    let mut c = case(cases.len(), "/orders?page=2", 200, "orders");
    c.headers.push(("authorization", format!("bearer {other}")));
    c.caller = Some(other);
    c.cache = Some("miss");
    cases.push(c);
    // Refused by the STS: the caller's token (401), our own credentials (502), STS down (503).
    for (behavior, status) in [
        (Behavior::error(400, "invalid_grant"), 401),
        (Behavior::error(401, "invalid_client"), 502),
        (Behavior::error(503, "temporarily_unavailable"), 503),
    ] {
        let t = token();
        let mut c = case(cases.len(), "/orders", status, "orders");
        c.headers.push(bearer(&t));
        c.caller = Some(t);
        c.cache = Some("miss");
        c.sts = behavior;
        cases.push(c);
    }
    // Malformed: two words, two Authorization headers, over max_token_bytes, another scheme.
    let (a, b) = (token(), token());
    let mut c = case(cases.len(), "/orders", 400, "orders");
    c.headers.push(("authorization", format!("Bearer {a} {b}")));
    cases.push(c);
    let (a, b) = (token(), token());
    let mut c = case(cases.len(), "/orders", 400, "orders");
    c.headers.push(bearer(&a));
    c.headers.push(bearer(&b));
    cases.push(c);
    let long = format!("{}{}", token(), "x".repeat(600));
    secrets.borrow_mut().push(long.clone());
    let mut c = case(cases.len(), "/orders", 401, "orders");
    c.headers.push(bearer(&long));
    cases.push(c);
    let mut c = case(cases.len(), "/orders", 401, "orders");
    c.headers
        .push(("authorization", format!("Basic {}", token())));
    cases.push(c);
    // In the query string: never a credential, removed before forwarding.
    let (q, good_q) = (token(), token());
    let mut c = case(
        cases.len(),
        &format!("/orders?access_token={q}&x=1"),
        200,
        "orders",
    );
    c.headers.push(bearer(&good_q));
    c.caller = Some(good_q);
    c.cache = Some("miss");
    cases.push(c);
    let q = token();
    cases.push(case(
        cases.len(),
        &format!("/orders?access_token={q}"),
        401,
        "orders",
    ));
    // In the path as well as the header: refused, and the path must not carry it to the log.
    let in_path = token();
    let mut c = case(cases.len(), &format!("/orders/{in_path}"), 400, "orders");
    c.headers.push(bearer(&in_path));
    c.caller = Some(in_path);
    cases.push(c);
    // In extra headers, next to a good token.
    let (h1, h2, good_h) = (token(), token(), token());
    let mut c = case(cases.len(), "/orders", 200, "orders");
    c.headers.push(bearer(&good_h));
    c.headers.push(("x-forwarded-access-token", h1));
    c.headers.push(("cookie", format!("session={h2}")));
    c.caller = Some(good_h);
    c.cache = Some("miss");
    cases.push(c);
    // A public route and an unrouted path, each with a token that goes nowhere.
    let mut c = case(cases.len(), "/public/info", 200, "public");
    c.headers.push(bearer(&token()));
    cases.push(c);
    let mut c = case(cases.len(), "/nowhere", 404, "_none");
    c.headers.push(bearer(&token()));
    cases.push(c);

    let proxy = child.url();
    for c in &cases {
        sts.set(c.sts.clone());
        let mut request = client()
            .get(format!("{proxy}{}", c.path))
            .header("x-request-id", &c.id);
        for (name, value) in &c.headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), c.status, "{} {}", c.id, c.path);
    }
    // What the STS issued is a token too.
    let mut secrets = secrets.into_inner();
    secrets.extend((1..=sts.calls()).map(|n| format!("xt-{n}")));

    // SIGTERM, as Kubernetes stops it: a graceful drain, then exit.
    let (status, streams) = child
        .stop(deadline.saturating_duration_since(Instant::now()))
        .await;
    let all = streams.both();
    assert!(status.success(), "txgate exited with {status}\n{all}");

    let leaks: Vec<String> = all
        .lines()
        .filter_map(|line| {
            let found: Vec<&str> = secrets
                .iter()
                .filter(|s| contains_token(line, s))
                .map(String::as_str)
                .collect();
            (!found.is_empty()).then(|| format!("{found:?} in: {line}"))
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "tokens or the secret in the output:\n{}",
        leaks.join("\n")
    );

    let mut events = Vec::new();
    for line in streams
        .stdout
        .lines()
        .chain(streams.stderr.lines())
        .filter(|l| !l.is_empty())
    {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n{all}"));
        assert!(
            event["level"].is_string() && event["timestamp"].is_string(),
            "{line}"
        );
        if event["target"] == "txgate::access" {
            events.push(event);
        }
    }
    assert_eq!(
        events.len(),
        cases.len(),
        "one access event per request:\n{all}"
    );
    for c in &cases {
        let matching: Vec<&serde_json::Value> = events
            .iter()
            .filter(|e| e["request_id"] == c.id.as_str())
            .collect();
        let [event] = matching.as_slice() else {
            panic!("{} has {} access events:\n{all}", c.id, matching.len());
        };
        assert_eq!(event["status"], c.status, "{event}");
        assert_eq!(event["route"], c.route, "{event}");
        assert_eq!(event["method"], "GET", "{event}");
        // The path without the query, and with any caller token in it masked.
        let mut path = c.path.split('?').next().unwrap().to_string();
        if let Some(caller) = &c.caller {
            path = path.replace(caller.as_str(), "<token>");
        }
        assert_eq!(
            event["path"],
            path.as_str(),
            "the path, without the query: {event}"
        );
        assert!(
            event["duration_ms"].as_f64().is_some_and(|d| d >= 0.0),
            "{event}"
        );
        assert!(event["outcome"].is_string(), "{event}");
        let caller = c.caller.as_deref().map(txgate::proxy::fingerprint);
        assert_eq!(event["caller"].as_str(), caller.as_deref(), "{event}");
        assert_eq!(event["cache"].as_str(), c.cache, "{event}");
        // A forwarded request names its upstream (URL or address); no event names another.
        let upstream_named = event["upstream"]
            .as_str()
            .map(|u| u.contains(&upstream.addr.to_string()));
        assert_ne!(upstream_named, Some(false), "{event}");
        if event["outcome"] == "forwarded" {
            assert_eq!(upstream_named, Some(true), "{event}");
        }
    }
}

// --- the status page in a browser ----------------------------------------------------------

/// The DOM Chromium built from `url`, serialized (`--dump-dom`).
async fn chromium_dom(url: &str, deadline: Instant) -> String {
    let profile = TempDir::new("chromium");
    let out = profile.join("dom.html");
    let err = profile.join("chromium.log");
    let chromium = tool("CHROMIUM", "chromium");
    let mut child = KillOnDrop(
        Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!(
                "--user-data-dir={}",
                profile.join("profile").display()
            ))
            .arg("--dump-dom")
            .arg(url)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {chromium} (apt-get install chromium): {e}")),
    );
    let status = eventually(
        "chromium to dump the DOM",
        deadline.saturating_duration_since(Instant::now()),
        || {
            let exited = child.0.try_wait();
            let log = read_lossy(&err);
            async move {
                match exited {
                    Ok(Some(status)) => Ok(status),
                    Ok(None) => Err(format!("still running\n{log}")),
                    Err(e) => Err(format!("{e}\n{log}")),
                }
            }
        },
    )
    .await;
    assert!(status.success(), "chromium: {status}\n{}", read_lossy(&err));
    read_lossy(&out)
}

/// The text a reader sees: tags dropped, entities decoded, whitespace collapsed.
fn dom_text(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for ch in html.chars() {
        match ch {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                text.push(' ');
            }
            _ if !in_tag => text.push(ch),
            _ => {}
        }
    }
    let text = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_routes_services_and_cache_in_chromium() {
    let deadline = Instant::now() + Duration::from_secs(90);
    let sts = TestSts::start(Behavior::issue()).await;
    // A second token service that is down, whose breaker opens at its first failure.
    let down = TestSts::start(Behavior::error(503, "temporarily_unavailable")).await;
    let upstream = RecordingUpstream::start().await;
    // A route whose match and audience are markup: the page must show them as text.
    let up = upstream.url();
    let gw = gateway(
        &GatewayYaml::new()
            .admin()
            .token_service(TokenService::at(&sts))
            .token_service(
                TokenService::new("partner", down.token_endpoint())
                    .retries(0)
                    .circuit_breaker(1, Duration::from_secs(600)),
            )
            .route(
                Route::new("orders", "/orders", &up).exchange(
                    Exchange::impersonation("corp")
                        .audience("https://orders.example.com")
                        .scope("orders:read"),
                ),
            )
            .route(
                Route::new("hostile", "/x<script>alert(1)</script>", &up)
                    .host("*.example.com")
                    .exchange(
                        Exchange::impersonation("corp")
                            .audience("<img src=x onerror=alert(2)>")
                            .scope("a&b \"q\" 'q'"),
                    ),
            )
            .route(Route::new("public", "/public", &up).exchange(Exchange::none()))
            .route(
                Route::new("partner", "/partner", &up).exchange(Exchange::impersonation("partner")),
            )
            .to_yaml(),
    )
    .await;

    // Orders lookups: a (miss, hit, hit), b (miss), c (miss, the STS is down): 2 hits of 5,
    // 2 tokens cached (an outage is never cached); corp's exchanges: success 2, unavailable 1.
    let (a, b, c) = (caller_token(), caller_token(), caller_token());
    for (token, status) in [(&a, 200), (&a, 200), (&a, 200), (&b, 200), (&c, 503)] {
        if token == &c {
            sts.set(Behavior::error(503, "temporarily_unavailable"));
        }
        let response = client()
            .get(format!("{}/orders", gw.url()))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
    }
    let response = client()
        .get(format!("{}/public", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The partner STS fails once: its breaker opens (one more miss, no hit).
    let response = client()
        .get(format!("{}/partner", gw.url()))
        .bearer_auth(caller_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);

    let admin: SocketAddr = gw.admin_addr.expect("admin listener");
    let page = client()
        .get(format!("http://{admin}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'none'")
    );

    let dom = chromium_dom(&format!("http://{admin}/"), deadline).await;
    let text = dom_text(&dom);
    let expect = |needle: &str| {
        assert!(
            text.contains(needle),
            "{needle:?} not on the page:\n{text}\n\n{dom}"
        )
    };

    expect(&format!("txgate {}", env!("CARGO_PKG_VERSION")));
    expect("Readiness: ready");
    // Routes: name, match, upstream, mode, token service, parameters, requests, hit ratio.
    expect("orders any host /orders");
    expect(&format!("{} impersonation corp", upstream.addr));
    expect("audience=https://orders.example.com scope=orders:read 5 40.0%");
    expect("public any host /public");
    expect("none — 1 —");
    // Token services: the breakers' states, outcomes from the counters.
    expect(&format!(
        "corp generic {} gateway (client_secret_basic) closed 3 success 2, unavailable 1",
        sts.token_endpoint()
    ));
    expect(&format!(
        "partner generic {} gateway (client_secret_basic) open 1 unavailable 1",
        down.token_endpoint()
    ));
    // The cache.
    assert_eq!(gw.state().cache.entry_count().await, 2);
    expect("entries 2 hit ratio 33.3% hits 2 misses 4 coalesced 0");
    // Markup from the config is text on the page, never elements.
    expect("*.example.com /x<script>alert(1)</script>");
    expect("audience=<img src=x onerror=alert(2)> scope=a&b \"q\" 'q'");
    let lower = dom.to_ascii_lowercase();
    assert!(!lower.contains("<script"), "a script element:\n{dom}");
    assert!(!lower.contains("<img"), "an img element:\n{dom}");
}

// --- the shipped Kubernetes configuration --------------------------------------------------

/// `host` in every `//host` of `text` that ends in `.svc.cluster.local` replaced by 127.0.0.1.
fn cluster_hosts_on_loopback(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("//") {
        out.push_str(&rest[..i + 2]);
        rest = &rest[i + 2..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
            .unwrap_or(rest.len());
        if rest[..end].ends_with(".svc.cluster.local") {
            out.push_str("127.0.0.1");
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

/// txgate resolves upstream names when a configuration loads, and cluster-DNS names resolve
/// only in a cluster; with those hosts on loopback, everything else is validated as shipped
/// (deploy/check.sh runs `txgate check` on the same rewrite).
#[test]
fn the_kubernetes_gateway_yaml_is_valid_with_cluster_hosts_on_loopback() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/base/gateway.yaml"
    );
    let shipped = std::fs::read_to_string(path).unwrap();
    assert!(shipped.contains(".svc.cluster.local"), "in-cluster names");
    let local = cluster_hosts_on_loopback(&shipped);
    assert!(!local.contains("svc.cluster.local"), "{local}");
    let config =
        txgate::config::Config::from_yaml(&local, "deploy/kubernetes/base/gateway.yaml", &|name| {
            (name == "TXGATE_CLIENT_SECRET").then(|| "placeholder".to_string())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        txgate::describe::summary(&config),
        "deploy/kubernetes/base/gateway.yaml: ok: 4 routes, 1 token service, listening on 0.0.0.0:8080, admin on 0.0.0.0:9090, ext_authz grpc on 0.0.0.0:9191"
    );
    // The drain the Deployment's terminationGracePeriodSeconds (15) must outlast.
    assert_eq!(
        config.server.grace_period + config.server.shutdown_timeout,
        Duration::from_secs(10)
    );
}

/// The value of an unlabelled counter in a Prometheus text exposition.
fn counter(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Logging is off the request path: with nobody reading the binary's stderr (a stalled
/// terminal or log collector), requests are still answered at once; the lines that do not fit
/// the writer's queue are dropped and counted in `txgate_log_lines_dropped_total`, and once
/// stderr is read again the log flows again.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_log_reader_drops_and_counts_lines_and_never_holds_up_a_request() {
    let upstream = RecordingUpstream::start().await;
    let yaml = GatewayYaml::new()
        .admin()
        .route(Route::new("public", "/public", upstream.url()).exchange(Exchange::none()))
        .to_yaml();
    let child = TxgateProcess::run(&yaml)
        .env("TXGATE_LOG_BUFFER_LINES", "16")
        .start()
        .await;
    let metrics_url = format!("{}/metrics", child.admin_url());
    let before = counter(
        &get(&metrics_url, None).await.body,
        "txgate_log_lines_dropped_total",
    );
    assert_eq!(before, Some(0.0), "the counter is exported from the start");

    child.stall_output(true);
    let client = client();
    // An access line is ~250 bytes: 2,000 of them are several times the pipe's 64 KiB and the
    // queue's 16 lines together. Each request must still be answered promptly.
    for i in 0..2_000 {
        let url = format!("{}/public/{i}", child.url());
        let reply = tokio::time::timeout(Duration::from_secs(5), client.get(&url).send())
            .await
            .unwrap_or_else(|_| panic!("request {i} was held up by the stalled log"))
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(reply.status(), 200, "request {i}");
        reply.bytes().await.unwrap();
    }
    let exposition = get(&metrics_url, None).await.body;
    let dropped = counter(&exposition, "txgate_log_lines_dropped_total").unwrap_or(0.0);
    assert!(
        dropped > 0.0,
        "no line was counted as dropped:\n{exposition}"
    );

    child.stall_output(false);
    let marker = format!("/public/after-the-stall-{}", rand::random::<u32>());
    let url = format!("{}{marker}", child.url());
    eventually("the log to flow again", Duration::from_secs(20), || async {
        // One request per try: its access line is queued once the writer has room again.
        assert_eq!(get(&url, None).await.status, 200);
        if child.stderr().contains(&marker) {
            Ok(())
        } else {
            Err("the access line of a request after the stall is not in the log".to_string())
        }
    })
    .await;
}
