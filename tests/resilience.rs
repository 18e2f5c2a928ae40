//! STS faults through a real gateway: retry, circuit breaker, Retry-After, concurrency cap,
//! negative caching and refresh-ahead.

mod common;

use std::time::{Duration, Instant};

use common::yaml::{Cache, Exchange, GatewayYaml, Route, TokenService};
use common::{Behavior, RecordingUpstream, TestSts, caller_token, eventually, gateway, get};

/// One route `r` on `/`, impersonation at `service`; `cache` with `expiry_skew: 0s` added.
fn yaml(service: TokenService, upstream: &RecordingUpstream, cache: Cache) -> String {
    GatewayYaml::new()
        .token_service(service)
        .route(Route::new("r", "/", upstream.url()).exchange(Exchange::impersonation("corp")))
        .cache(cache.expiry_skew(Duration::ZERO))
        .to_yaml()
}

fn status(code: u16) -> Behavior {
    Behavior::Reply {
        status: code,
        body: String::new(),
        headers: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_once_within_the_deadline() {
    let sts = TestSts::start(Behavior::Sequence(vec![status(503), Behavior::issue()])).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml(TokenService::at(&sts), &upstream, Cache::new())).await;
    let response = get(&gw.url(), Some(&caller_token())).await;
    assert_eq!(response.status, 200);
    assert_eq!(sts.calls(), 2, "one retry");
    assert_eq!(upstream.seen()[0].bearer(), Some("xt-2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_is_not_retried() {
    let sts = TestSts::start(status(500)).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml(TokenService::at(&sts), &upstream, Cache::new())).await;
    assert_eq!(get(&gw.url(), Some(&caller_token())).await.status, 503);
    assert_eq!(sts.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_fails_fast_serves_hits_and_closes_after_a_probe() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml(
        TokenService::at(&sts)
            .retries(0)
            .circuit_breaker(3, Duration::from_secs(1)),
        &upstream,
        Cache::new(),
    ))
    .await;
    let cached = caller_token();
    assert_eq!(get(&gw.url(), Some(&cached)).await.status, 200);

    sts.set(status(500));
    for _ in 0..3 {
        assert_eq!(get(&gw.url(), Some(&caller_token())).await.status, 503);
    }
    let calls = sts.calls();
    // Open: misses fail fast without calling the STS, with Retry-After.
    let started = Instant::now();
    let refused = get(&gw.url(), Some(&caller_token())).await;
    assert_eq!(refused.status, 503);
    assert!(refused.headers.contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(sts.calls(), calls, "no STS call while open");
    // Hits keep being served.
    assert_eq!(get(&gw.url(), Some(&cached)).await.status, 200);

    // After open_for, one probe goes through; its success closes the breaker.
    sts.set(Behavior::issue());
    eventually("the breaker to close", Duration::from_secs(10), || async {
        get(&gw.url(), Some(&caller_token())).await.status == 200
    })
    .await;
    assert_eq!(get(&gw.url(), Some(&caller_token())).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_from_a_429_holds_misses_off() {
    let sts = TestSts::start(Behavior::Reply {
        status: 429,
        body: String::new(),
        headers: vec![("retry-after".into(), "30".into())],
    })
    .await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml(TokenService::at(&sts), &upstream, Cache::new())).await;
    let first = get(&gw.url(), Some(&caller_token())).await;
    assert_eq!(first.status, 503);
    assert_eq!(first.headers["retry-after"], "30");
    for _ in 0..5 {
        let again = get(&gw.url(), Some(&caller_token())).await;
        assert_eq!(again.status, 503);
        let after: u64 = again.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((25..=30).contains(&after), "{after}");
    }
    assert_eq!(sts.calls(), 1, "no retry storm against a 429");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_cap_sheds_a_burst_of_fresh_tokens() {
    let sts = TestSts::start(Behavior::Delay(
        Duration::from_millis(600),
        Box::new(Behavior::issue()),
    ))
    .await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml(
        TokenService::at(&sts).max_concurrent(2, Duration::from_millis(50)),
        &upstream,
        Cache::new(),
    ))
    .await;
    let url = gw.url();
    let burst = (0..6).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { get(&url, Some(&caller_token())).await.status.as_u16() })
    });
    let statuses: Vec<u16> = futures::future::join_all(burst)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(sts.calls(), 2, "the STS never saw more than the cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitive_rejections_are_cached_briefly_and_outages_are_not() {
    let sts = TestSts::start(Behavior::error(400, "invalid_grant")).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml(
        TokenService::at(&sts),
        &upstream,
        Cache::new().negative_ttl(Duration::from_secs(1)),
    ))
    .await;
    let rejected = caller_token();
    assert_eq!(get(&gw.url(), Some(&rejected)).await.status, 401);
    assert_eq!(get(&gw.url(), Some(&rejected)).await.status, 401);
    assert_eq!(sts.calls(), 1, "the rejection was remembered");
    // After negative_ttl the STS is asked again (waiting on the configured lifetime).
    sts.set(Behavior::issue());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get(&gw.url(), Some(&rejected)).await.status, 200);
    assert_eq!(sts.calls(), 2);

    sts.set(Behavior::error(401, "invalid_client"));
    let other = caller_token();
    assert_eq!(get(&gw.url(), Some(&other)).await.status, 502);
    assert_eq!(get(&gw.url(), Some(&other)).await.status, 502);
    assert_eq!(
        sts.calls(),
        4,
        "our own credential failures are never cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_near_expiry_is_refreshed_in_the_background_while_served() {
    let sts = TestSts::start(Behavior::Issue {
        expires_in: Some(serde_json::json!(2)),
    })
    .await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml(
        TokenService::at(&sts),
        &upstream,
        Cache::new().refresh_ahead(0.5),
    ))
    .await;
    let token = caller_token();
    assert_eq!(get(&gw.url(), Some(&token)).await.status, 200);
    // Past half of the 2 s lifetime: the next hit is served the cached token and starts a
    // refresh (this waits on the token's lifetime, not on readiness).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = Instant::now();
    assert_eq!(get(&gw.url(), Some(&token)).await.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "served without waiting"
    );
    assert_eq!(upstream.seen()[1].bearer(), Some("xt-1"));
    eventually("a background refresh", Duration::from_secs(5), || async {
        sts.calls() >= 2
    })
    .await;
    // Once the refresh landed, hits get the new token; one refresh, not one per hit.
    eventually(
        "the refreshed token to be served",
        Duration::from_secs(5),
        || async {
            assert_eq!(get(&gw.url(), Some(&token)).await.status, 200);
            upstream.seen().last().unwrap().bearer() == Some("xt-2")
        },
    )
    .await;
    assert_eq!(sts.calls(), 2);
}
