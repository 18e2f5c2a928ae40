//! Reload and shutdown: new routes apply without dropping requests in flight, an invalid new
//! config is refused while the old one keeps serving, and SIGTERM drains before exiting.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use common::process::TxgateProcess;
use common::yaml::{Exchange, GatewayYaml, Route, TokenService};
use common::{Behavior, TestSts, caller_token, client, eventually, gateway, get};

/// How long a request may take to reach the slow upstream.
const ARRIVE_WITHIN: Duration = Duration::from_secs(10);
/// How long the binary may take to log that it refused or applied a configuration.
const RELOAD_WITHIN: Duration = Duration::from_secs(10);

/// An upstream that answers after `delay`, counting requests that reached it.
async fn slow_upstream(delay: Duration) -> (SocketAddr, Arc<Mutex<usize>>) {
    let arrived = Arc::new(Mutex::new(0usize));
    let counter = arrived.clone();
    let app = Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            *counter.lock().unwrap() += 1;
            tokio::time::sleep(delay).await;
            "slow ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, arrived)
}

/// A gateway with one impersonation route `r<p>` on `/<p>` per prefix, all to `upstream`.
fn routes(sts: &TestSts, upstream: SocketAddr, prefixes: &[&str]) -> GatewayYaml {
    prefixes.iter().fold(
        GatewayYaml::new().token_service(TokenService::at(sts)),
        |config, p| {
            config.route(
                Route::new(
                    &format!("r{p}"),
                    &format!("/{p}"),
                    format!("http://{upstream}"),
                )
                .exchange(Exchange::impersonation("corp")),
            )
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_new_routes_without_dropping_requests_in_flight() {
    let sts = TestSts::start(Behavior::issue()).await;
    let (upstream, arrived) = slow_upstream(Duration::from_millis(800)).await;
    let gw = gateway(&routes(&sts, upstream, &["a"]).to_yaml()).await;
    let token = caller_token();

    let url = format!("{}/a", gw.url());
    let in_flight = {
        let token = token.clone();
        tokio::spawn(async move { get(&url, Some(&token)).await.status })
    };
    eventually(
        "the request to reach the upstream",
        ARRIVE_WITHIN,
        || async { *arrived.lock().unwrap() == 1 },
    )
    .await;

    // Route a is gone and route b is new in the next configuration.
    gw.reload(common::config(&routes(&sts, upstream, &["b"]).to_yaml()))
        .await
        .unwrap();
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the request in flight finished"
    );
    let b = get(&format!("{}/b", gw.url()), Some(&token)).await;
    assert_eq!(b.status, 200);
    let a = get(&format!("{}/a", gw.url()), Some(&token)).await;
    assert_eq!(a.status, 404);
}

/// The binary on `config`, which has route `/a`, once a first request through it has been
/// answered 200. Returns it and the route's URL.
async fn serving_binary(config: &GatewayYaml, token: &str) -> (TxgateProcess, String) {
    let gw = TxgateProcess::run(&config.to_yaml()).start().await;
    let url = format!("{}/a", gw.url());
    assert_eq!(
        status_of(&url, token).await,
        Some(200),
        "the gateway does not serve:\n{}",
        gw.stderr()
    );
    (gw, url)
}

async fn status_of(url: &str, token: &str) -> Option<u16> {
    client()
        .get(url)
        .bearer_auth(token)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_refuses_an_invalid_config_and_applies_a_valid_one() {
    let sts = TestSts::start(Behavior::issue()).await;
    let (upstream, _) = slow_upstream(Duration::ZERO).await;
    let config = |prefixes: &[&str]| {
        routes(&sts, upstream, prefixes)
            .grace_period(Duration::ZERO)
            .shutdown_timeout(Duration::from_secs(1))
    };
    let token = caller_token();
    let (gw, _) = serving_binary(&config(&["a"]), &token).await;
    let base = gw.url();
    let file = gw.config_path().to_path_buf();

    std::fs::write(
        &file,
        "server: { listen: [\"127.0.0.1:1\"] }\nroutes: [ { name: broken } ]\n",
    )
    .unwrap();
    gw.signal("HUP");
    gw.wait_for_stderr("log the refusal", RELOAD_WITHIN, |log| {
        log.contains("invalid and was refused").then_some(())
    })
    .await;
    assert!(
        gw.stderr().contains("routes[0]: missing key"),
        "{}",
        gw.stderr()
    );
    assert_eq!(status_of(&format!("{base}/a"), &token).await, Some(200));

    std::fs::write(&file, config(&["a", "b"]).to_yaml()).unwrap();
    gw.signal("HUP");
    gw.wait_for_stderr("log the reload", RELOAD_WITHIN, |log| {
        log.contains("configuration reloaded").then_some(())
    })
    .await;
    assert_eq!(
        status_of(&format!("{base}/b"), &token).await,
        Some(200),
        "route b after the reload:\n{}",
        gw.stderr()
    );
    assert!(!gw.stderr().contains(&token), "a caller token in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_then_exits() {
    let sts = TestSts::start(Behavior::issue()).await;
    let (upstream, arrived) = slow_upstream(Duration::from_millis(1000)).await;
    let token = caller_token();
    let config = routes(&sts, upstream, &["a"])
        .grace_period(Duration::from_secs(3))
        .shutdown_timeout(Duration::from_secs(2));
    let (mut gw, url) = serving_binary(&config, &token).await;
    let before = *arrived.lock().unwrap();
    let in_flight = {
        let (url, token) = (url.clone(), token.clone());
        tokio::spawn(async move { status_of(&url, &token).await })
    };
    eventually(
        "the request to reach the upstream",
        ARRIVE_WITHIN,
        || async { *arrived.lock().unwrap() > before },
    )
    .await;
    gw.signal("TERM");
    assert_eq!(in_flight.await.unwrap(), Some(200), "drained, not dropped");
    let exited = gw.exited_within(Duration::from_secs(15)).await;
    assert!(
        exited.is_some_and(|s| s.success()),
        "txgate exits 0 after draining"
    );
}

/// The binary's default runtime (`server.work_stealing: false`: one single-threaded runtime per
/// worker thread) with two threads serves concurrent requests on many connections, and stops
/// on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_threads_without_work_stealing_serve_concurrent_requests() {
    let sts = TestSts::start(Behavior::issue()).await;
    let (upstream, arrived) = slow_upstream(Duration::from_millis(200)).await;
    let token = caller_token();
    let config = routes(&sts, upstream, &["a"])
        .threads(2)
        .grace_period(Duration::ZERO)
        .shutdown_timeout(Duration::from_secs(1));
    let (mut gw, url) = serving_binary(&config, &token).await;
    let before = *arrived.lock().unwrap();
    // Separate clients: separate connections, handed to the two runtimes at random.
    let requests: Vec<_> = (0..40)
        .map(|_| {
            let (url, token) = (url.clone(), token.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build()
                    .unwrap();
                client
                    .get(&url)
                    .bearer_auth(&token)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .ok()
            })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), Some(200), "{}", gw.stderr());
    }
    assert_eq!(*arrived.lock().unwrap() - before, 40);
    gw.signal("TERM");
    let exited = gw.exited_within(Duration::from_secs(10)).await;
    assert!(
        exited.is_some_and(|s| s.success()),
        "txgate exits 0 on SIGTERM"
    );
}
