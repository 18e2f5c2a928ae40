//! The ext_authz front door through real parts: a real Envoy (the `envoy` binary, see
//! `common::envoy`) in front of a recording upstream, its ext_authz filter pointing at txgate,
//! over gRPC in one test and over Envoy's HTTP service contract in the other. The in-process
//! STS counts its calls. And, with the binary, what a Check leaves in the log, the metrics and
//! a denied body when the caller put its token where it does not belong.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::envoy::{Authz, Envoy};
use common::process::TxgateProcess;
use common::yaml::{Cache, Exchange, GatewayYaml, Route, TokenService};
use common::{Behavior, RecordingUpstream, TestSts, caller_token, client, gateway, get};

/// txgate with ext_authz only (no proxy listener): `orders` exchanges at `corp`, `flaky` at a
/// token service that answers 503, `public` needs no token.
fn yaml(listen_key: &str, sts: &TestSts, down: &TestSts, upstream: &RecordingUpstream) -> String {
    let up = upstream.url();
    GatewayYaml::new()
        .server("listen", Vec::<String>::new())
        .server(
            "ext_authz",
            serde_json::json!({ listen_key: "127.0.0.1:0" }),
        )
        .admin()
        .token_service(TokenService::at(sts))
        .token_service(TokenService::new("down", down.token_endpoint()).retries(0))
        .route(
            Route::new("orders", "/orders", &up)
                .exchange(Exchange::impersonation("corp").audience("https://orders.example.com")),
        )
        .route(
            Route::new("flaky", "/flaky", &up)
                .exchange(Exchange::impersonation("down").audience("https://flaky.example.com")),
        )
        .route(Route::new("public", "/public", &up).exchange(Exchange::none()))
        .cache(Cache::new().expiry_skew(Duration::ZERO))
        .to_yaml()
}

/// A GET through Envoy with the caller's token (when given) and a copy of it in a custom
/// header.
async fn through(envoy: &Envoy, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = client().get(format!("{}{path}", envoy.url()));
    if let Some(token) = token {
        request = request
            .bearer_auth(token)
            .header("x-forwarded-access-token", token);
    }
    request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}\n{}", envoy.output()))
}

/// The cases both transports must pass. Over gRPC a token in `access_token` is removed and STS
/// trouble reaches the caller as txgate answered it; over Envoy's HTTP contract the first is
/// refused (it cannot remove a query parameter) and Envoy turns any 5xx of the service into its
/// own `status_on_error` answer (here 503), without txgate's body or `Retry-After`.
async fn the_promise_holds_through(
    envoy: &Envoy,
    sts: &TestSts,
    upstream: &RecordingUpstream,
    grpc: bool,
) {
    let query_token_allowed = grpc;
    // With a caller token: the upstream gets the exchanged token for the route's audience,
    // and the caller's nowhere.
    let token = caller_token();
    let reply = through(envoy, "/orders/1?x=1", Some(&token)).await;
    assert_eq!(reply.status(), 200, "{}", envoy.output());
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    let exchanged = seen[0]
        .bearer()
        .expect("an exchanged token upstream")
        .to_string();
    assert_ne!(exchanged, token);
    assert_eq!(sts.subject_of(&exchanged).as_deref(), Some(token.as_str()));
    assert_eq!(
        sts.captured()[0].param("audience"),
        Some("https://orders.example.com")
    );
    assert_eq!(seen[0].uri, "/orders/1?x=1");
    assert!(
        !seen[0].everything().contains(&token),
        "the caller's token reached the upstream:\n{}",
        seen[0].everything()
    );
    // The second request is served from the cache: no STS call.
    let reply = through(envoy, "/orders/2", Some(&token)).await;
    assert_eq!(reply.status(), 200);
    assert_eq!(sts.calls(), 1, "the second request called the STS");
    assert_eq!(upstream.seen()[1].bearer(), Some(exchanged.as_str()));

    // A token in the query: removed before the upstream (gRPC), or refused (HTTP).
    let query = format!("/orders/3?access_token={token}&y=2");
    let reply = client()
        .get(format!("{}{query}", envoy.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    if query_token_allowed {
        assert_eq!(reply.status(), 200);
        let last = upstream.seen().pop().unwrap();
        assert_eq!(last.uri, "/orders/3?y=2");
        assert!(!last.everything().contains(&token), "{}", last.everything());
    } else {
        assert_eq!(reply.status(), 400);
        assert_eq!(upstream.seen().len(), 2);
    }
    let upstream_count = upstream.seen().len();

    // Without a token: 401 with txgate's challenge and body; the upstream sees nothing.
    let reply = through(envoy, "/orders/1", None).await;
    assert_eq!(reply.status(), 401);
    assert_eq!(
        reply
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer realm=\"txgate\"")
    );
    let body: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
    assert_eq!(upstream.seen().len(), upstream_count);

    // STS down: 503 with Retry-After; the upstream sees nothing.
    let reply = through(envoy, "/flaky/1", Some(&caller_token())).await;
    assert_eq!(reply.status(), 503);
    if grpc {
        assert!(reply.headers().get("retry-after").is_some());
        let body: serde_json::Value = reply.json().await.unwrap();
        assert_eq!(body["error"], "temporarily_unavailable");
    }
    assert_eq!(upstream.seen().len(), upstream_count);

    // A public route: allowed, and no Authorization (nor the token) upstream.
    let reply = through(envoy, "/public/a", Some(&token)).await;
    assert_eq!(reply.status(), 200);
    let last = upstream.seen().pop().unwrap();
    assert_eq!(last.uri, "/public/a");
    assert_eq!(last.header("authorization"), None);
    assert!(!last.everything().contains(&token), "{}", last.everything());

    // No route: txgate's 404.
    let reply = through(envoy, "/nowhere", Some(&token)).await;
    assert_eq!(reply.status(), 404);
}

/// Checks counted by transport, from the admin listener.
async fn checks(admin: SocketAddr, transport: &str) -> u64 {
    let text = get(&format!("http://{admin}/metrics"), None).await.body;
    text.lines()
        .filter(|l| {
            l.starts_with("txgate_ext_authz_checks_total{")
                && l.contains(&format!("transport=\"{transport}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_with_grpc_ext_authz_forwards_only_exchanged_tokens() {
    let sts = TestSts::start(Behavior::issue()).await;
    let down = TestSts::start(Behavior::error(503, "temporarily_unavailable")).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml("grpc_listen", &sts, &down, &upstream)).await;
    assert!(gw.proxy_addrs.is_empty());
    let grpc = gw.ext_authz.grpc.expect("the gRPC ext_authz listener");
    let envoy = Envoy::start(upstream.addr, Authz::Grpc(grpc)).await;

    the_promise_holds_through(&envoy, &sts, &upstream, true).await;
    let admin = gw.admin_addr.unwrap();
    assert_eq!(checks(admin, "grpc").await, 7);
    let page = get(&format!("http://{admin}/"), None).await.body;
    assert!(page.contains("id=\"ext-authz\"") && page.contains(&grpc.to_string()));

    // txgate down: with failure_mode_allow: false Envoy refuses (403, its status_on_error
    // default), and the upstream sees nothing.
    let before = upstream.seen().len();
    gw.stop(false);
    let reply = through(&envoy, "/public/a", None).await;
    assert_eq!(reply.status(), 403, "{}", envoy.output());
    assert_eq!(upstream.seen().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_with_http_ext_authz_forwards_only_exchanged_tokens() {
    let sts = TestSts::start(Behavior::issue()).await;
    let down = TestSts::start(Behavior::error(503, "temporarily_unavailable")).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml("http_listen", &sts, &down, &upstream)).await;
    let http = gw.ext_authz.http.expect("the HTTP ext_authz listener");
    let envoy = Envoy::start(upstream.addr, Authz::Http(http)).await;

    the_promise_holds_through(&envoy, &sts, &upstream, false).await;
    assert_eq!(checks(gw.admin_addr.unwrap(), "http").await, 7);

    // txgate down: Envoy answers its status_on_error (503 here) and forwards nothing.
    let before = upstream.seen().len();
    gw.stop(false);
    let reply = through(&envoy, "/public/a", None).await;
    assert_eq!(reply.status(), 503, "{}", envoy.output());
    assert_eq!(upstream.seen().len(), before);
}

/// The `ext_authz_http=Some(127.0.0.1:PORT)` of the binary's start event.
fn http_check_address(stderr: &str) -> Option<SocketAddr> {
    let line = stderr.lines().find(|l| l.contains(" starting"))?;
    let at = line.find("ext_authz_http=Some(")? + "ext_authz_http=Some(".len();
    let address: String = line[at..].chars().take_while(|c| *c != ')').collect();
    address.parse().ok()
}

/// Tokens where they do not belong (query, custom header, path, a JWT-shaped path segment):
/// the access log masks them as the proxy's does, and neither a metric label nor a denied body
/// carries them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_never_log_label_or_echo_the_callers_token() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let up = upstream.url();
    let yaml = GatewayYaml::new()
        .server(
            "ext_authz",
            serde_json::json!({ "http_listen": "127.0.0.1:0" }),
        )
        .admin()
        .token_service(TokenService::at(&sts))
        .route(Route::new("orders", "/orders", &up).exchange(Exchange::impersonation("corp")))
        .route(Route::new("public", "/public", &up).exchange(Exchange::none()))
        .to_yaml();
    let binary = TxgateProcess::run(&yaml).start().await;
    let checks_at = http_check_address(&binary.stderr()).expect("the ext_authz_http address");
    let admin = binary.admin.expect("the admin address");
    let token = caller_token();
    let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl";
    let ask = |path: String, headers: Vec<(&'static str, String)>| {
        let mut request = client().get(format!("http://{checks_at}{path}"));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        async move { request.send().await.unwrap() }
    };
    let bearer = format!("Bearer {token}");
    let cases = [
        (format!("/orders?access_token={token}"), vec![], 401),
        (
            "/public/x".to_string(),
            vec![
                ("authorization", bearer.clone()),
                ("x-api-token", token.clone()),
            ],
            200,
        ),
        (
            format!("/orders/{token}"),
            vec![("authorization", bearer.clone())],
            400,
        ),
        (format!("/public/{jwt}"), vec![], 200),
        (
            format!("/public//{jwt}"),
            vec![("authorization", format!("Bearer {jwt}"))],
            400,
        ),
    ];
    for (path, headers, status) in cases {
        let reply = ask(path.clone(), headers).await;
        assert_eq!(reply.status(), status, "{path}");
        let body = reply.text().await.unwrap();
        assert!(!body.contains(&token) && !body.contains(jwt), "{body}");
    }
    let logged = binary
        .wait_for_stderr("five access events", Duration::from_secs(10), |stderr| {
            let lines: Vec<&str> = stderr
                .lines()
                .filter(|l| {
                    l.contains("front_door=\"ext_authz_http\"")
                        || l.contains("front_door=ext_authz_http")
                })
                .collect();
            (lines.len() >= 5).then(|| lines.join("\n"))
        })
        .await;
    assert!(!logged.contains(&token), "{logged}");
    assert!(!logged.contains(jwt), "{logged}");
    assert!(
        logged.contains("<token>") && logged.contains("<jwt>"),
        "{logged}"
    );
    let metrics = get(&format!("http://{admin}/metrics"), None).await.body;
    assert!(metrics.contains("txgate_ext_authz_checks_total{"));
    assert!(!metrics.contains(&token) && !metrics.contains(jwt));
    assert_eq!(sts.calls(), 0, "no Check here reached the STS");
    assert!(upstream.seen().is_empty());
}

/// A reload applies to the next Check: the listeners read the configuration in force for each
/// one, as the proxy does for each request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_to_the_next_check() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let up = upstream.url();
    let with_public = |mode: Exchange| {
        GatewayYaml::new()
            .server("listen", Vec::<String>::new())
            .server(
                "ext_authz",
                serde_json::json!({ "http_listen": "127.0.0.1:0" }),
            )
            .token_service(TokenService::at(&sts))
            .route(Route::new("public", "/public", &up).exchange(mode))
            .to_yaml()
    };
    let gw = gateway(&with_public(Exchange::none())).await;
    let checks_at = gw.ext_authz.http.expect("the HTTP ext_authz listener");
    let url = format!("http://{checks_at}/public/a");
    assert_eq!(get(&url, None).await.status, 200);
    gw.reload(common::config(&with_public(Exchange::impersonation(
        "corp",
    ))))
    .await
    .expect("the reload applies");
    let refused = get(&url, None).await;
    assert_eq!(refused.status, 401);
    assert_eq!(
        refused.header("www-authenticate"),
        Some("Bearer realm=\"txgate\"")
    );
    assert_eq!(refused.json()["error"], "unauthorized");
}

/// A `transaction_token` route behind Envoy: the Check's answer sets `txn-token` and removes
/// the caller's `authorization`, so the upstream gets the Transaction Token alone; one a caller
/// wrote itself is replaced; every request gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_forwards_a_transaction_token_and_nothing_of_the_callers() {
    let tts = TestSts::start(Behavior::Reply {
        status: 200,
        body: serde_json::json!({
            "access_token": "issued-txn-token-0123456789",
            "issued_token_type": "urn:ietf:params:oauth:token-type:txn_token",
            "token_type": "N_A",
        })
        .to_string(),
        headers: vec![("content-type".into(), "application/json".into())],
    })
    .await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&format!(
        "server: {{ listen: [], ext_authz: {{ grpc_listen: \"127.0.0.1:0\" }} }}\ntoken_services:\n  tts: {{ token_endpoint: \"{}\", client_id: gateway, client_secret: \"${{TEST_CLIENT_SECRET}}\" }}\nroutes:\n  - {{ name: txn, match: {{ path_prefix: /txn }}, upstream: \"{}\", exchange: {{ mode: transaction_token, token_service: tts, trust_domain: \"https://trust.example\", purpose: orders.read }} }}\n",
        tts.token_endpoint(),
        upstream.url()
    ))
    .await;
    let envoy = Envoy::start(
        upstream.addr,
        Authz::Grpc(gw.ext_authz.grpc.expect("the gRPC ext_authz listener")),
    )
    .await;
    let token = caller_token();
    for round in 0..2 {
        let reply = client()
            .post(format!("{}/txn/7", envoy.url()))
            .bearer_auth(&token)
            .header("txn-token", "forged-by-the-caller-0123")
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200, "{}", envoy.output());
        let seen = &upstream.seen()[round];
        assert_eq!(
            seen.header("txn-token"),
            Some("issued-txn-token-0123456789")
        );
        assert_eq!(seen.header("authorization"), None, "{}", seen.everything());
        assert!(!seen.everything().contains(&token), "{}", seen.everything());
        assert!(!seen.everything().contains("forged-by-the-caller"));
    }
    assert_eq!(tts.calls(), 2, "a Transaction Token per request");
    let call = &tts.captured()[0];
    assert_eq!(call.param("subject_token"), Some(token.as_str()));
    assert_eq!(call.param("audience"), Some("https://trust.example"));
}
