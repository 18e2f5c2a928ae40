//! End-to-end behaviour through a real pingora gateway, a real HTTP STS and a recording
//! upstream, all on `127.0.0.1:0`.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::tls::dead_addr;
use common::yaml::{Cache, Exchange, GatewayYaml, Route, TokenService};
use common::{Behavior, RecordingUpstream, TestSts, caller_token, client, gateway, get};

const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// A gateway with `orders` and `billing` routes (impersonation at `service`, which is named
/// `corp`) and a `public` route (mode none), and an admin listener.
fn standard_yaml(service: TokenService, upstream: &RecordingUpstream) -> String {
    let up = upstream.url();
    GatewayYaml::new()
        .admin()
        .token_service(service)
        .route(
            Route::new("orders", "/orders", &up).exchange(
                Exchange::impersonation("corp")
                    .audience("https://orders.example.com")
                    .resource("https://orders.example.com/api")
                    .scope("orders:read orders:write"),
            ),
        )
        .route(
            Route::new("billing", "/billing", &up)
                .exchange(Exchange::impersonation("corp").audience("https://billing.example.com")),
        )
        .route(Route::new("public", "/public", &up).exchange(Exchange::none()))
        .cache(Cache::new().expiry_skew(Duration::ZERO))
        .to_yaml()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_sends_the_rfc8693_form_with_basic_auth_and_forwards_the_new_token() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&standard_yaml(TokenService::at(&sts), &upstream)).await;
    let token = caller_token();

    let response = get(&format!("{}/orders/42?x=1", gw.url()), Some(&token)).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body, "upstream ok");

    let captured = sts.captured();
    assert_eq!(captured.len(), 1);
    let call = &captured[0];
    assert_eq!(
        call.form,
        vec![
            (
                "grant_type".to_string(),
                "urn:ietf:params:oauth:grant-type:token-exchange".to_string()
            ),
            ("subject_token".to_string(), token.clone()),
            (
                "subject_token_type".to_string(),
                ACCESS_TOKEN_TYPE.to_string()
            ),
            (
                "audience".to_string(),
                "https://orders.example.com".to_string()
            ),
            (
                "resource".to_string(),
                "https://orders.example.com/api".to_string()
            ),
            ("scope".to_string(), "orders:read orders:write".to_string()),
        ]
    );
    let expected_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("gateway:{}", common::CLIENT_SECRET))
    );
    assert_eq!(call.authorization.as_deref(), Some(expected_basic.as_str()));
    assert_eq!(
        call.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );

    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].bearer(), Some("xt-1"));
    assert_eq!(seen[0].uri, "/orders/42?x=1");
    assert_eq!(seen[0].header("x-forwarded-for"), Some("127.0.0.1"));
    assert!(seen[0].header("x-request-id").is_some());
    assert!(!seen[0].everything().contains(&token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_post_puts_credentials_in_the_form() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&standard_yaml(
        TokenService::at(&sts).auth_method("client_secret_post"),
        &upstream,
    ))
    .await;
    let response = get(&format!("{}/billing", gw.url()), Some(&caller_token())).await;
    assert_eq!(response.status, 200);
    let call = &sts.captured()[0];
    assert_eq!(call.authorization, None);
    assert_eq!(call.param("client_id"), Some("gateway"));
    assert_eq!(call.param("client_secret"), Some(common::CLIENT_SECRET));
    assert_eq!(call.param("audience"), Some("https://billing.example.com"));
    assert_eq!(
        call.param("resource"),
        None,
        "only configured parameters are sent"
    );
    assert_eq!(call.param("scope"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_requests_with_one_token_make_one_sts_call() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&standard_yaml(TokenService::at(&sts), &upstream)).await;
    let token = caller_token();
    for _ in 0..20 {
        assert_eq!(
            get(&format!("{}/orders", gw.url()), Some(&token))
                .await
                .status,
            200
        );
    }
    assert_eq!(sts.calls(), 1);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 20);
    assert!(seen.iter().all(|s| s.bearer() == Some("xt-1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_with_a_fresh_token_make_one_sts_call() {
    // The STS is slow, so all 50 requests arrive while the first exchange is in flight.
    let sts = TestSts::start(Behavior::Delay(
        Duration::from_millis(500),
        Box::new(Behavior::issue()),
    ))
    .await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&standard_yaml(TokenService::at(&sts), &upstream)).await;
    let token = caller_token();
    let url = format!("{}/orders", gw.url());
    let requests = (0..50).map(|_| {
        let url = url.clone();
        let token = token.clone();
        tokio::spawn(async move { get(&url, Some(&token)).await.status })
    });
    for status in futures::future::join_all(requests).await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(sts.calls(), 1);
    assert!(upstream.seen().iter().all(|s| s.bearer() == Some("xt-1")));

    let metrics = metrics_text(&gw).await;
    let miss = metric_value(
        &metrics,
        r#"txgate_token_cache_lookups_total{result="miss",route="orders"}"#,
    );
    let coalesced = metric_value(
        &metrics,
        r#"txgate_token_cache_lookups_total{result="coalesced",route="orders"}"#,
    );
    let hit = metric_value(
        &metrics,
        r#"txgate_token_cache_lookups_total{result="hit",route="orders"}"#,
    );
    assert_eq!(miss, 1.0);
    assert_eq!(miss + coalesced + hit, 50.0);
    assert!(
        coalesced > 0.0,
        "some requests waited on the in-flight exchange"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_cache_entry_is_exchanged_again() {
    let sts = TestSts::start(Behavior::Issue {
        expires_in: Some(serde_json::json!(1)),
    })
    .await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&standard_yaml(TokenService::at(&sts), &upstream)).await;
    let token = caller_token();
    let url = format!("{}/orders", gw.url());
    assert_eq!(get(&url, Some(&token)).await.status, 200);
    assert_eq!(get(&url, Some(&token)).await.status, 200);
    assert_eq!(sts.calls(), 1, "served from the cache while fresh");
    // Let the one-second lifetime pass (this waits on token expiry, not on readiness).
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(get(&url, Some(&token)).await.status, 200);
    assert_eq!(sts.calls(), 2);
    let seen = upstream.seen();
    assert_eq!(seen[2].bearer(), Some("xt-2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_with_different_audiences_and_different_users_never_share_a_token() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&standard_yaml(TokenService::at(&sts), &upstream)).await;
    let alice = caller_token();
    let bob = caller_token();
    for (path, token) in [
        ("/orders", &alice),
        ("/billing", &alice),
        ("/orders", &bob),
        ("/billing", &bob),
        ("/orders", &alice),
        ("/billing", &bob),
    ] {
        assert_eq!(
            get(&format!("{}{path}", gw.url()), Some(token))
                .await
                .status,
            200
        );
    }
    assert_eq!(sts.calls(), 4, "one exchange per (route audience, user)");
    let seen = upstream.seen();
    let forwarded: Vec<&str> = seen.iter().map(|s| s.bearer().unwrap()).collect();
    // Each forwarded token was minted for the caller who sent the request.
    let callers = [&alice, &alice, &bob, &bob, &alice, &bob];
    for (token, caller) in forwarded.iter().zip(callers) {
        assert_eq!(sts.subject_of(token).as_deref(), Some(caller.as_str()));
    }
    let distinct: std::collections::HashSet<&&str> = forwarded[..4].iter().collect();
    assert_eq!(distinct.len(), 4);
    assert_eq!(forwarded[4], forwarded[0]);
    assert_eq!(forwarded[5], forwarded[3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_token_never_reaches_the_upstream() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&standard_yaml(TokenService::at(&sts), &upstream)).await;
    let token = caller_token();
    for path in ["/orders/7", "/public/page"] {
        let response = client()
            .get(format!("{}{path}?a=1&access_token={token}&b=2", gw.url()))
            .bearer_auth(&token)
            .header("X-Forwarded-Access-Token", &token)
            .header("X-Mixed", format!("prefix {token} suffix"))
            .header("X-Innocent", "kept")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert!(
            !request.everything().contains(&token),
            "caller token leaked: {}",
            request.everything()
        );
        assert!(request.uri.ends_with("?a=1&b=2"), "{}", request.uri);
        assert_eq!(request.header("x-innocent"), Some("kept"));
    }
    assert_eq!(seen[0].bearer(), Some("xt-1"));
    assert_eq!(
        seen[1].header("authorization"),
        None,
        "mode none sends no token"
    );
    assert_eq!(sts.calls(), 1, "the public route makes no exchange");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_the_query_alone_is_not_accepted() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&standard_yaml(TokenService::at(&sts), &upstream)).await;
    let response = get(
        &format!("{}/orders?access_token={}", gw.url(), caller_token()),
        None,
    )
    .await;
    assert_eq!(response.status, 401);
    assert_eq!(sts.calls(), 0);
    assert!(upstream.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_errors_are_answered_without_calling_the_sts() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&standard_yaml(TokenService::at(&sts), &upstream)).await;
    let url = format!("{}/orders", gw.url());

    let missing = get(&url, None).await;
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.headers["www-authenticate"],
        r#"Bearer realm="txgate""#
    );
    let body: serde_json::Value = missing.json();
    assert_eq!(body["error"], "unauthorized");

    let basic = client()
        .get(&url)
        .basic_auth("u", Some("p"))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);

    let duplicate = client()
        .get(&url)
        .header("authorization", "Bearer a")
        .header("authorization", "Bearer b")
        .send()
        .await
        .unwrap();
    assert_eq!(duplicate.status(), 400);
    assert!(
        duplicate.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains(r#"error="invalid_request""#)
    );

    let malformed = client()
        .get(&url)
        .header("authorization", "Bearer has,comma")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);

    let oversize = get(&url, Some(&"a".repeat(9000))).await;
    assert_eq!(oversize.status, 401);
    assert!(
        oversize.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains(r#"error="invalid_token""#)
    );

    let no_route = get(&format!("{}/nowhere", gw.url()), Some(&caller_token())).await;
    assert_eq!(no_route.status, 404);

    assert_eq!(sts.calls(), 0);
    assert!(upstream.seen().is_empty());
}

struct StsCase {
    name: &'static str,
    behavior: Behavior,
    status: u16,
    challenge_error: Option<&'static str>,
    retry_after: Option<&'static str>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sts_error_class_gives_the_designed_status() {
    let json = |status, body: &str, extra: Vec<(String, String)>| {
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        headers.extend(extra);
        Behavior::Reply {
            status,
            body: body.to_string(),
            headers,
        }
    };
    let cases = vec![
        StsCase {
            name: "invalid_grant",
            behavior: Behavior::error(400, "invalid_grant"),
            status: 401,
            challenge_error: Some("invalid_token"),
            retry_after: None,
        },
        StsCase {
            name: "invalid_request",
            behavior: Behavior::error(400, "invalid_request"),
            status: 401,
            challenge_error: Some("invalid_token"),
            retry_after: None,
        },
        StsCase {
            name: "invalid_target",
            behavior: Behavior::error(400, "invalid_target"),
            status: 403,
            challenge_error: Some("insufficient_scope"),
            retry_after: None,
        },
        StsCase {
            name: "invalid_scope",
            behavior: Behavior::error(400, "invalid_scope"),
            status: 403,
            challenge_error: Some("insufficient_scope"),
            retry_after: None,
        },
        StsCase {
            name: "unauthorized_client",
            behavior: Behavior::error(400, "unauthorized_client"),
            status: 403,
            challenge_error: Some("insufficient_scope"),
            retry_after: None,
        },
        StsCase {
            name: "access_denied",
            behavior: Behavior::error(403, "access_denied"),
            status: 403,
            challenge_error: Some("insufficient_scope"),
            retry_after: None,
        },
        StsCase {
            name: "invalid_client",
            behavior: Behavior::error(401, "invalid_client"),
            status: 502,
            challenge_error: None,
            retry_after: None,
        },
        StsCase {
            name: "500",
            behavior: json(500, "{}", vec![]),
            status: 503,
            challenge_error: None,
            retry_after: Some("2"),
        },
        StsCase {
            name: "503 with Retry-After",
            behavior: json(503, "", vec![("retry-after".into(), "9".into())]),
            status: 503,
            challenge_error: None,
            retry_after: Some("9"),
        },
        StsCase {
            name: "429 with Retry-After",
            behavior: json(429, "", vec![("retry-after".into(), "7".into())]),
            status: 503,
            challenge_error: None,
            retry_after: Some("7"),
        },
        StsCase {
            name: "HTML body",
            behavior: json(200, "<html>maintenance</html>", vec![]),
            status: 502,
            challenge_error: None,
            retry_after: None,
        },
        StsCase {
            name: "no access_token",
            behavior: json(200, r#"{"token_type":"Bearer"}"#, vec![]),
            status: 502,
            challenge_error: None,
            retry_after: None,
        },
    ];
    let upstream = RecordingUpstream::start().await;
    for case in cases {
        // A gateway per case: a Retry-After from one case rightly holds the next one off.
        let sts = TestSts::start(case.behavior).await;
        let gw = gateway(&standard_yaml(TokenService::at(&sts), &upstream)).await;
        let response = get(&format!("{}/orders", gw.url()), Some(&caller_token())).await;
        assert_eq!(response.status, case.status, "{}", case.name);
        let challenge = response
            .headers
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        match case.challenge_error {
            Some(code) => assert!(
                challenge
                    .as_deref()
                    .unwrap_or_default()
                    .contains(&format!("error=\"{code}\"")),
                "{}: {challenge:?}",
                case.name
            ),
            None => assert_eq!(challenge, None, "{}", case.name),
        }
        assert_eq!(
            response
                .headers
                .get("retry-after")
                .map(|v| v.to_str().unwrap()),
            case.retry_after,
            "{}",
            case.name
        );
        let body: serde_json::Value = response.json();
        assert!(body["error"].is_string(), "{}", case.name);
        assert!(
            !body.to_string().contains("test STS"),
            "{}: STS detail leaked to the caller",
            case.name
        );
    }
    assert!(upstream.seen().is_empty(), "failed exchanges never forward");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_sts_gives_503_and_failures_are_not_cached() {
    let dead = dead_addr();
    let upstream = RecordingUpstream::start().await;
    let yaml = GatewayYaml::new()
        .token_service(TokenService::new("corp", format!("http://{dead}/token")).client_id("g"))
        .route(Route::new("r", "/", upstream.url()).exchange(Exchange::impersonation("corp")))
        .to_yaml();
    let gw = gateway(&yaml).await;
    let response = get(&gw.url(), Some(&caller_token())).await;
    assert_eq!(response.status, 503);
    assert!(response.headers.contains_key("retry-after"));

    let sts = TestSts::start(Behavior::error(500, "server_error")).await;
    let gw = gateway(&standard_yaml(TokenService::at(&sts), &upstream)).await;
    let token = caller_token();
    let url = format!("{}/orders", gw.url());
    assert_eq!(get(&url, Some(&token)).await.status, 503);
    sts.set(Behavior::issue());
    assert_eq!(
        get(&url, Some(&token)).await.status,
        200,
        "the failure was not cached"
    );
    assert_eq!(sts.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sts_slower_than_the_timeout_gives_504_in_time() {
    let sts = TestSts::start(Behavior::Delay(
        Duration::from_secs(5),
        Box::new(Behavior::issue()),
    ))
    .await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&standard_yaml(
        TokenService::at(&sts).timeout(Duration::from_millis(300)),
        &upstream,
    ))
    .await;
    let started = Instant::now();
    let response = get(&format!("{}/orders", gw.url()), Some(&caller_token())).await;
    let elapsed = started.elapsed();
    assert_eq!(response.status, 504);
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(1300),
        "504 took {elapsed:?}"
    );
    let body: serde_json::Value = response.json();
    assert_eq!(body["error"], "gateway_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_gives_502() {
    let sts = TestSts::start(Behavior::issue()).await;
    let yaml = GatewayYaml::new()
        .token_service(TokenService::at(&sts))
        .route(
            Route::new("r", "/", format!("http://{}", dead_addr()))
                .exchange(Exchange::impersonation("corp")),
        )
        .to_yaml();
    let gw = gateway(&yaml).await;
    let response = get(&gw.url(), Some(&caller_token())).await;
    assert_eq!(response.status, 502);
    let body: serde_json::Value = response.json();
    assert_eq!(body["error"], "bad_gateway");
}

async fn metrics_text(gw: &txgate::server::RunningGateway) -> String {
    let admin = gw.admin_addr.expect("admin listener configured");
    let response = get(&format!("http://{admin}/metrics"), None).await;
    assert_eq!(response.status, 200);
    response.body
}

fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).map(str::trim))
        .unwrap_or_else(|| panic!("{series} not in metrics:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_probes_report_what_happened() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&standard_yaml(TokenService::at(&sts), &upstream)).await;
    let token = caller_token();
    for _ in 0..3 {
        get(&format!("{}/orders", gw.url()), Some(&token)).await;
    }
    get(&format!("{}/orders", gw.url()), None).await;
    sts.set(Behavior::error(400, "invalid_grant"));
    get(&format!("{}/billing", gw.url()), Some(&caller_token())).await;

    let text = metrics_text(&gw).await;
    assert_eq!(
        metric_value(
            &text,
            r#"txgate_requests_total{route="orders",status="200"}"#
        ),
        3.0
    );
    assert_eq!(
        metric_value(
            &text,
            r#"txgate_requests_total{route="orders",status="401"}"#
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &text,
            r#"txgate_requests_total{route="billing",status="401"}"#
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &text,
            r#"txgate_token_exchanges_total{outcome="success",token_service="corp"}"#
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &text,
            r#"txgate_token_exchanges_total{outcome="subject_rejected",token_service="corp"}"#
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &text,
            r#"txgate_token_exchange_duration_seconds_count{token_service="corp"}"#
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &text,
            r#"txgate_token_cache_lookups_total{result="hit",route="orders"}"#
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &text,
            r#"txgate_token_cache_lookups_total{result="miss",route="orders"}"#
        ),
        1.0
    );
    // One token, and the remembered invalid_grant (negative caching).
    assert_eq!(metric_value(&text, "txgate_token_cache_entries"), 2.0);
    assert_eq!(
        metric_value(
            &text,
            r#"txgate_request_duration_seconds_count{route="orders"}"#
        ),
        4.0
    );
    assert!(!text.contains(&token), "a token in the metrics");

    // The exposition passes promtool's linter.
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_string());
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {promtool} (apt-get install prometheus): {e}"));
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let admin = gw.admin_addr.unwrap();
    for (path, status) in [("/healthz", 200), ("/readyz", 200), ("/nope", 404)] {
        let response = get(&format!("http://{admin}{path}"), None).await;
        assert_eq!(response.status, status, "{path}");
    }
}
