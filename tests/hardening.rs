//! The core promise under pressure, through real gateways: a caller's token reaches no
//! upstream even when the upstream's network path, the STS or the introspection endpoint
//! misbehaves. HTTPS upstreams are verified unless told otherwise; an STS that hands an input
//! token back is refused; introspection refusals are remembered; and what weakens any of this
//! is reported by `txgate check`, at start, and on the status page.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::tls::{TempDir, TestCa, TlsUpstream};
use common::yaml::{Exchange, GatewayYaml, Inbound, Route, TokenService, Upstream};
use common::{Behavior, RecordingUpstream, TestSts, caller_token, gateway, get};
use txgate::dev::sts::{DevClient, DevSts, DevStsOptions};

const BIN: &str = env!("CARGO_BIN_EXE_txgate");

// ---- upstream TLS ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified_however_they_are_written() {
    // A certificate for 127.0.0.1 from a CA that is in no system store.
    let ca = TestCa::new("unknown-to-the-system");
    let upstream = TlsUpstream::start(&ca, &["127.0.0.1"], None).await;
    let url = upstream.url();
    let route = |name: &str, upstream: Upstream| Route::new(name, &format!("/{name}"), upstream);
    let peers = || Upstream::peers(&[&url]);
    let yaml = GatewayYaml::new()
        .route(route("bare-url", Upstream::from(&url)))
        .route(route("peer-list", peers()))
        .route(route("empty-tls", peers().tls(serde_json::json!({}))))
        .route(route(
            "with-ca",
            peers().tls(serde_json::json!({ "ca_file": ca.ca_file })),
        ))
        .route(route(
            "unverified",
            peers().tls(serde_json::json!({ "verify": false })),
        ))
        .to_yaml();
    let gw = gateway(&yaml).await;

    // No CA named: the system roots decide, and they do not know this certificate. The
    // request never reaches the upstream.
    for path in ["/bare-url", "/peer-list", "/empty-tls"] {
        let response = get(&format!("{}{path}", gw.url()), None).await;
        assert_eq!(response.status, 502, "{path}");
        assert!(upstream.seen().is_empty(), "{path} reached the upstream");
    }
    let response = get(&format!("{}/with-ca/x", gw.url()), None).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body, "tls-upstream");
    assert_eq!(upstream.seen().len(), 1);
    let response = get(&format!("{}/unverified/y", gw.url()), None).await;
    assert_eq!(response.status, 200);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen[0].request.uri.ends_with("/with-ca/x"));
    assert!(seen[1].request.uri.ends_with("/unverified/y"));

    // Each route keeps its own verdict: the verified connection pooled for /with-ca is not
    // what makes /bare-url work, and the unverified one is not reused by a verified route.
    assert_eq!(
        get(&format!("{}/bare-url", gw.url()), None).await.status,
        502
    );
    assert_eq!(upstream.seen().len(), 2);
}

/// Runs `txgate check` on `file`; returns (exit code, stdout, stderr).
fn check(file: &std::path::Path) -> (i32, String, String) {
    let output = Command::new(BIN)
        .args(["check", "--config"])
        .arg(file)
        .output()
        .expect("txgate runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A config with one of each warning, and loopback endpoints that must not warn: a file as an
/// operator writes it, since `txgate check` and `txgate run` read it from disk and point at its keys.
const WARNINGS_YAML: &str = r#"server: { listen: ["127.0.0.1:0"] }
token_services:
  remote:
    token_endpoint: "http://sts.example.net/token"
    client_id: gateway
    client_secret: fixture-secret
    inbound:
      jwt:
        issuer: "https://idp.example.net"
        jwks_uri: "http://keys.example.net/jwks"
        audiences: ["gateway"]
  local:
    token_endpoint: "http://localhost:1/token"
    introspection_endpoint: "http://127.0.0.2:1/introspect"
    jwks_uri: "http://[::1]:1/jwks"
    client_id: gateway
    client_secret: fixture-secret
  secure:
    token_endpoint: "https://sts.example.net/token"
    client_id: gateway
    client_secret: fixture-secret
routes:
  - name: orders
    match: { path_prefix: "/orders" }
    upstream:
      peers: ["https://127.0.0.1:9443"]
      tls: { verify: false }
    exchange: { mode: impersonation, token_service: remote }
  - name: local
    match: { path_prefix: "/local" }
    upstream: "https://127.0.0.1:9443"
    exchange: { mode: impersonation, token_service: local }
    inbound:
      introspection: { endpoint: "http://introspect.example.net/introspect" }
"#;

#[test]
fn check_prints_each_warning_and_still_passes() {
    let dir = TempDir::new("warnings");
    let file = dir.write("gateway.yaml", WARNINGS_YAML);
    let (code, stdout, stderr) = check(&file);
    assert_eq!(code, 0, "{stderr}");
    let name = file.display();
    assert_eq!(
        stdout.trim(),
        format!("{name}: ok: 2 routes, 3 token services, listening on 127.0.0.1:0")
    );
    let expected = [
        "token_services.remote.token_endpoint: http:// to a non-loopback host sends credentials and tokens in clear",
        "token_services.remote.inbound.jwt.jwks_uri: http:// to a non-loopback host lets anyone on the network path replace the signing keys",
        "routes[0].upstream.tls.verify: false: the upstream's certificate and host name are not verified",
        "routes[1].inbound.introspection.endpoint: http:// to a non-loopback host sends credentials and tokens in clear",
    ]
    .map(|line| format!("warning: {name}: {line}"));
    assert_eq!(stderr.lines().collect::<Vec<_>>(), expected);
}

#[test]
fn run_logs_the_same_warnings_at_start() {
    let dir = TempDir::new("warnings-run");
    let file = dir.write("gateway.yaml", WARNINGS_YAML);
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&file)
        .env("TXGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // The warnings come before the listeners are bound; read until the last one.
    let mut warned = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if line.contains("WARN") && (line.contains(": http://") || line.contains(".verify: false"))
        {
            warned.push(line);
        }
        if warned.len() == 4 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(warned.len(), 4, "{warned:?}");
    for (line, key) in warned.iter().zip([
        "token_services.remote.token_endpoint",
        "token_services.remote.inbound.jwt.jwks_uri",
        "routes[0].upstream.tls.verify",
        "routes[1].inbound.introspection.endpoint",
    ]) {
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains(key), "{line} lacks {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_marks_a_token_service_reached_in_clear() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let route = |name: &str, service: &str| {
        Route::new(name, &format!("/{name}"), upstream.url())
            .exchange(Exchange::impersonation(service))
    };
    let yaml = GatewayYaml::new()
        .admin()
        .token_service(TokenService::new("remote", "http://sts.example.net/token"))
        .token_service(TokenService::new("local", sts.token_endpoint()))
        .route(route("a", "remote"))
        .route(route("b", "local"))
        .to_yaml();
    let gw = gateway(&yaml).await;
    let page = get(&format!("http://{}/", gw.admin_addr.unwrap()), None)
        .await
        .body;
    let row = |name: &str| {
        let start = page
            .find(&format!("<tr><td>{name}</td>"))
            .unwrap_or_else(|| panic!("no row for {name}: {page}"));
        let end = start + page[start..].find("</tr>").unwrap();
        page[start..end].to_string()
    };
    let remote = row("remote");
    assert!(remote.contains(">insecure transport</span>"), "{remote}");
    assert!(
        remote.contains("token_services.remote.token_endpoint"),
        "{remote}"
    );
    assert!(!row("local").contains("insecure transport"));
}

// ---- an STS that answers with an input token -------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sts_that_echoes_the_callers_token_is_refused_and_nothing_is_forwarded() {
    let caller = caller_token();
    let reply = |body: serde_json::Value| Behavior::Reply {
        status: 200,
        body: body.to_string(),
        headers: vec![("content-type".into(), "application/json".into())],
    };
    let sts = TestSts::start(reply(serde_json::json!({
        "access_token": caller,
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer",
        "expires_in": 300,
    })))
    .await;
    let upstream = RecordingUpstream::start().await;
    let yaml = GatewayYaml::new()
        .admin()
        .token_service(TokenService::at(&sts))
        .route(
            Route::new("echo", "/echo", upstream.url()).exchange(Exchange::impersonation("corp")),
        )
        .route(
            Route::new("typed", "/typed", upstream.url())
                .exchange(Exchange::impersonation("corp").requested_token_type("jwt")),
        )
        .to_yaml();
    let gw = gateway(&yaml).await;

    for attempt in 1..=2 {
        let response = get(&format!("{}/echo", gw.url()), Some(&caller)).await;
        assert_eq!(response.status, 502);
        assert_eq!(
            response.body,
            r#"{"error":"bad_gateway","error_description":"the token exchange failed"}"#
        );
        // Not cached: the second request asks the STS again.
        assert_eq!(sts.calls(), attempt);
    }

    // A wrapped echo is an echo too.
    sts.set(reply(serde_json::json!({
        "access_token": format!("v1.{caller}.sig"),
        "token_type": "Bearer",
    })));
    assert_eq!(
        get(&format!("{}/echo", gw.url()), Some(&caller))
            .await
            .status,
        502
    );

    // A fresh token of the wrong type, where a JWT was requested.
    sts.set(reply(serde_json::json!({
        "access_token": "fresh-but-opaque",
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer",
    })));
    assert_eq!(
        get(&format!("{}/typed", gw.url()), Some(&caller))
            .await
            .status,
        502
    );
    assert!(upstream.seen().is_empty(), "the upstream was called");

    let metrics = get(&format!("http://{}/metrics", gw.admin_addr.unwrap()), None)
        .await
        .body;
    for (outcome, n) in [("echoed_input_token", 3), ("unexpected_token_type", 1)] {
        let series = format!(
            "txgate_token_exchanges_total{{outcome=\"{outcome}\",token_service=\"corp\"}} {n}"
        );
        assert!(metrics.contains(&series), "{series} not in\n{metrics}");
    }
    assert!(!metrics.contains(&caller));

    // The same STS answering properly: the route works.
    sts.set(Behavior::issue());
    assert_eq!(
        get(&format!("{}/echo", gw.url()), Some(&caller))
            .await
            .status,
        200
    );
    assert_eq!(upstream.seen().len(), 1);
    assert!(!upstream.seen()[0].everything().contains(&caller));
}

// ---- introspection ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_checks_the_audience_and_remembers_refusals() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sts = DevSts::new(DevStsOptions::new(
        format!("http://{addr}"),
        vec![DevClient {
            client_id: "gateway".into(),
            client_secret: txgate::secret::Secret::new(common::CLIENT_SECRET),
        }],
    ))
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(Arc::clone(&sts).serve(listener, async {
        let _ = stopped.await;
    }));
    let upstream = RecordingUpstream::start().await;
    let yaml = GatewayYaml::new()
        .token_service(
            TokenService::new("dev", format!("http://{addr}/token"))
                .set(
                    "introspection_endpoint",
                    format!("http://{addr}/introspect"),
                )
                .inbound(
                    Inbound::introspection()
                        .audiences(&["gateway-api"])
                        .negative_cache_ttl(Duration::from_secs(60))
                        .introspection_key("max_concurrent", 4),
                ),
        )
        .route(
            Route::new("r", "/", upstream.url())
                .exchange(Exchange::impersonation("dev").audience("https://orders.example.com")),
        )
        .to_yaml();
    let gw = gateway(&yaml).await;
    let state = gw.state();
    let validator = state
        .validators(0)
        .and_then(|i| i.introspection.clone())
        .unwrap();

    let for_us = sts
        .issue_user_token("alice", Some("gateway-api"), None)
        .unwrap();
    assert_eq!(get(&gw.url(), Some(&for_us)).await.status, 200);
    assert_eq!(sts.tokens_issued(), 1);

    // Active, but minted for another API: refused before any exchange, and remembered.
    let elsewhere = sts
        .issue_user_token("mallory", Some("billing-api"), None)
        .unwrap();
    let calls = validator.introspection_calls();
    for _ in 0..3 {
        assert_eq!(get(&gw.url(), Some(&elsewhere)).await.status, 401);
    }
    assert_eq!(validator.introspection_calls(), calls + 1);

    // A token the issuer does not know: inactive, asked about once however often replayed.
    let unknown = caller_token();
    for _ in 0..3 {
        assert_eq!(get(&gw.url(), Some(&unknown)).await.status, 401);
    }
    assert_eq!(validator.introspection_calls(), calls + 2);
    assert_eq!(sts.tokens_issued(), 1, "no exchange for a refused token");
    assert_eq!(upstream.seen().len(), 1);
    drop(gw);
    let _ = stop.send(());
}
