//! The shared cache level through real parts: a real `redis-server` on a unix socket with a
//! password (`common::redis_server`), several gateways sharing it, the scriptable STS that
//! counts its calls, and upstreams that record (or reject) what they receive.
//!
//! Replicas are gateways started in this process (`common::gateway`), each with its own local
//! cache, metrics and connection to Redis, exactly as separate processes would have; the
//! start-up errors are read from the real binary's log (`TxgateProcess`).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use base64::Engine;
use common::process::TxgateProcess;
use common::redis_server::RedisServer;
use common::yaml::{Cache, Exchange, GatewayYaml, Route, TokenService};
use common::{
    Behavior, RecordingUpstream, TestSts, caller_token, client, eventually, gateway, get,
};
use txgate::cache::TokenCache;
use txgate::cache::shared::redis_key;
use txgate::server::RunningGateway;

const HITS: &str = "txgate_shared_cache_lookups_total{result=\"hit\"}";
const UNREADABLE: &str = "txgate_shared_cache_lookups_total{result=\"unreadable\"}";
const FILLED: &str = "txgate_shared_cache_lease_waits_total{outcome=\"filled\"}";
const CIRCUIT_OPEN: &str = "txgate_shared_cache_circuit_open";

/// A fresh sealing key, base64, as an operator makes one (`openssl rand -base64 32`).
fn new_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

/// One impersonation route `orders` at the test STS, with the shared level on `redis`.
fn yaml(sts: &TestSts, upstream: &str, redis: &RedisServer, key_file: &Path) -> String {
    GatewayYaml::new()
        .admin()
        .token_service(TokenService::at(sts))
        .route(
            Route::new("orders", "/orders", upstream)
                .exchange(Exchange::impersonation("corp").audience("https://orders.example.com")),
        )
        .cache(Cache::new().set(
            "shared",
            serde_json::json!({
                "url": redis.url(),
                "password_file": redis.password_file(),
                "encryption_key_file": key_file,
                // Generous for a loaded two-core CI machine; the default is 50 ms.
                "timeout": "250ms",
            }),
        ))
        .to_yaml()
}

/// The value of one series in a gateway's `/metrics` text; 0 when it is not there yet.
fn metric(gw: &RunningGateway, series: &str) -> u64 {
    let text = String::from_utf8(gw.state().metrics.encode()).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

fn sum(replicas: &[RunningGateway], series: &str) -> u64 {
    replicas.iter().map(|gw| metric(gw, series)).sum()
}

async fn get_ok(gw: &RunningGateway, token: &str) {
    let reply = get(&format!("{}/orders/1", gw.url()), Some(token)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// The Redis key under which `gw` keeps the exchanged token of `caller` on route 0.
fn key_of(gw: &RunningGateway, caller: &str) -> String {
    let state = gw.state();
    let profile = state.profile(0).expect("route 0 exchanges");
    let subject = txgate::token::digest(caller);
    redis_key(
        "txgate:",
        &TokenCache::key(&profile.settings, &subject, None),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_callers_alternating_between_two_replicas_cost_a_hundred_exchanges() {
    let redis = RedisServer::start().await;
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let keys = redis.key_file("cache.keys", &[&new_key()]);
    let yaml = yaml(&sts, &upstream.url(), &redis, &keys);
    let replicas = [gateway(&yaml).await, gateway(&yaml).await];

    for i in 0..100 {
        let token = caller_token();
        get_ok(&replicas[i % 2], &token).await;
        get_ok(&replicas[(i + 1) % 2], &token).await;
    }
    assert_eq!(sts.calls(), 100, "one exchange per caller, not per replica");
    assert_eq!(sum(&replicas, HITS), 100);
    // Both requests of each caller carried the same exchanged token.
    let seen = upstream.seen();
    assert_eq!(seen.len(), 200);
    for pair in seen.chunks(2) {
        assert_eq!(pair[0].bearer(), pair[1].bearer());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_fresh_callers_over_three_replicas_make_fifty_exchanges() {
    let redis = RedisServer::start().await;
    // Slow enough that every replica asks while the first exchange is still running.
    let sts = TestSts::start(Behavior::Delay(
        Duration::from_millis(300),
        Box::new(Behavior::issue()),
    ))
    .await;
    let upstream = RecordingUpstream::start().await;
    let keys = redis.key_file("cache.keys", &[&new_key()]);
    let yaml = yaml(&sts, &upstream.url(), &redis, &keys);
    let replicas = [
        gateway(&yaml).await,
        gateway(&yaml).await,
        gateway(&yaml).await,
    ];
    let mut requests = Vec::new();
    for _ in 0..50 {
        let token = caller_token();
        for gw in &replicas {
            let url = format!("{}/orders/1", gw.url());
            let token = token.clone();
            requests.push(tokio::spawn(async move { get(&url, Some(&token)).await }));
        }
    }
    for request in requests {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    assert_eq!(
        sts.calls(),
        50,
        "one exchange per caller across three replicas"
    );
    // The other two replicas of each caller waited for the lease holder or found its value.
    assert_eq!(sum(&replicas, FILLED) + sum(&replicas, HITS), 100);
    assert!(sum(&replicas, FILLED) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn definitive_rejections_are_shared_too() {
    let redis = RedisServer::start().await;
    let sts = TestSts::start(Behavior::error(400, "invalid_grant")).await;
    let upstream = RecordingUpstream::start().await;
    let keys = redis.key_file("cache.keys", &[&new_key()]);
    let yaml = yaml(&sts, &upstream.url(), &redis, &keys);
    let replicas = [gateway(&yaml).await, gateway(&yaml).await];
    let token = caller_token();
    for gw in &replicas {
        let reply = get(&format!("{}/orders/1", gw.url()), Some(&token)).await;
        assert_eq!(reply.status, 401, "{}", reply.body);
    }
    assert_eq!(sts.calls(), 1, "the second replica knew the rejection");
    assert!(upstream.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_mid_load_every_request_is_answered_and_the_level_comes_back() {
    let mut redis = RedisServer::start().await;
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let keys = redis.key_file("cache.keys", &[&new_key()]);
    let yaml = yaml(&sts, &upstream.url(), &redis, &keys);
    let replicas = [gateway(&yaml).await, gateway(&yaml).await];
    let mut known = Vec::new();
    for _ in 0..10 {
        let token = caller_token();
        get_ok(&replicas[0], &token).await;
        get_ok(&replicas[1], &token).await;
        known.push(token);
    }
    assert_eq!(sts.calls(), 10);

    redis.stop().await;
    for i in 0..30 {
        let token = caller_token();
        get_ok(&replicas[0], &token).await;
        get_ok(&replicas[1], &token).await;
        // Callers already cached locally keep being served without the STS.
        get_ok(&replicas[i % 2], &known[i % known.len()]).await;
    }
    assert_eq!(
        sts.calls(),
        10 + 60,
        "without Redis each replica exchanges alone"
    );
    for gw in &replicas {
        assert_eq!(metric(gw, CIRCUIT_OPEN), 1);
        let page = get(&format!("http://{}/", gw.admin_addr.unwrap()), None).await;
        assert!(page.body.contains("circuit open"), "{}", page.body);
        let ready = get(&format!("http://{}/readyz", gw.admin_addr.unwrap()), None).await;
        assert_eq!(ready.status, 200, "a replica without Redis still serves");
    }

    redis.restart().await;
    eventually(
        "a caller exchanged at one replica is a shared hit at the other",
        Duration::from_secs(30),
        || async {
            let token = caller_token();
            let before = sts.calls();
            get_ok(&replicas[0], &token).await;
            get_ok(&replicas[1], &token).await;
            match sts.calls() - before {
                1 => Ok(()),
                n => Err(format!("{n} exchanges for one caller")),
            }
        },
    )
    .await;
    assert_eq!(metric(&replicas[1], CIRCUIT_OPEN), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_in_redis_reads_as_a_token_and_a_changed_value_is_a_counted_miss() {
    let redis = RedisServer::start().await;
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let keys = redis.key_file("cache.keys", &[&new_key()]);
    let yaml = yaml(&sts, &upstream.url(), &redis, &keys);
    let replicas = [gateway(&yaml).await, gateway(&yaml).await];
    let callers: Vec<String> = (0..10).map(|_| caller_token()).collect();
    for token in &callers {
        get_ok(&replicas[0], token).await;
    }
    let issued: Vec<String> = upstream
        .seen()
        .iter()
        .map(|s| s.bearer().unwrap().to_string())
        .collect();
    assert_eq!(issued.len(), 10);

    let dump = redis.dump().await;
    assert_eq!(dump.len(), 10, "one value per caller, no lease left behind");
    for (key, value) in &dump {
        let key = String::from_utf8_lossy(key);
        assert!(key.starts_with("txgate:"), "{key}");
        let value = value.as_ref().expect("a string value");
        for secret in callers.iter().chain(&issued) {
            assert!(!key.contains(secret.as_str()), "{key} holds {secret}");
            assert!(
                !value.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "the value of {key} holds {secret}"
            );
        }
    }

    // One byte of the first caller's value changed in Redis.
    let key = key_of(&replicas[0], &callers[0]);
    let mut c = redis.connection().await;
    let mut value: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    let last = value.len() - 1;
    value[last] ^= 0x01;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(value)
        .arg("KEEPTTL")
        .query_async(&mut c)
        .await
        .unwrap();
    // The other replica has it in neither level now: it exchanges again.
    get_ok(&replicas[1], &callers[0]).await;
    assert_eq!(sts.calls(), 11);
    assert_eq!(metric(&replicas[1], UNREADABLE), 1);
    let sent = upstream
        .seen()
        .last()
        .unwrap()
        .bearer()
        .unwrap()
        .to_string();
    assert_eq!(sts.subject_of(&sent).as_deref(), Some(callers[0].as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_value_copied_to_another_callers_key_does_not_open() {
    let redis = RedisServer::start().await;
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let keys = redis.key_file("cache.keys", &[&new_key()]);
    let yaml = yaml(&sts, &upstream.url(), &redis, &keys);
    let replicas = [gateway(&yaml).await, gateway(&yaml).await];
    let (mallory, alice) = (caller_token(), caller_token());
    get_ok(&replicas[0], &mallory).await;
    get_ok(&replicas[0], &alice).await;
    // Someone with write access to Redis puts Mallory's value under Alice's key.
    let mut c = redis.connection().await;
    let value: Vec<u8> = redis::cmd("GET")
        .arg(key_of(&replicas[0], &mallory))
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(key_of(&replicas[0], &alice))
        .arg(value)
        .arg("PX")
        .arg(60_000)
        .query_async(&mut c)
        .await
        .unwrap();
    get_ok(&replicas[1], &alice).await;
    let sent = upstream
        .seen()
        .last()
        .unwrap()
        .bearer()
        .unwrap()
        .to_string();
    assert_eq!(
        sts.subject_of(&sent).as_deref(),
        Some(alice.as_str()),
        "Alice's request went upstream with a token issued for her"
    );
    assert_eq!(metric(&replicas[1], UNREADABLE), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_key_rotation_entries_sealed_with_the_old_key_still_open() {
    let redis = RedisServer::start().await;
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let (old, new) = (new_key(), new_key());
    let before = redis.key_file("before.keys", &[&old]);
    let after = redis.key_file("after.keys", &[&new, &old]);
    let not_rotated = gateway(&yaml(&sts, &upstream.url(), &redis, &before)).await;
    let rotated = gateway(&yaml(&sts, &upstream.url(), &redis, &after)).await;

    let alice = caller_token();
    get_ok(&not_rotated, &alice).await;
    get_ok(&rotated, &alice).await;
    assert_eq!(
        sts.calls(),
        1,
        "the rotated replica opens what the old key sealed"
    );
    assert_eq!(metric(&rotated, HITS), 1);

    // The rotated replica seals with the new key, which a replica without it cannot open.
    let bob = caller_token();
    get_ok(&rotated, &bob).await;
    get_ok(&not_rotated, &bob).await;
    assert_eq!(sts.calls(), 3);
    assert_eq!(metric(&not_rotated, UNREADABLE), 1);
}

/// An upstream that answers 401 to the tokens in `revoked` and 200 to any other, recording the
/// method and token of every request.
struct RevokingUpstream {
    addr: SocketAddr,
    state: Arc<UpstreamState>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

#[derive(Default)]
struct UpstreamState {
    revoked: Mutex<HashSet<String>>,
    seen: Mutex<Vec<(String, String)>>,
}

impl RevokingUpstream {
    async fn start() -> RevokingUpstream {
        let state = Arc::new(UpstreamState::default());
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        RevokingUpstream {
            addr,
            state,
            _stop: stop,
        }
    }

    fn revoke(&self, token: &str) {
        self.state.revoked.lock().unwrap().insert(token.to_string());
    }

    fn seen(&self) -> Vec<(String, String)> {
        self.state.seen.lock().unwrap().clone()
    }
}

async fn answer(State(state): State<Arc<UpstreamState>>, request: Request) -> impl IntoResponse {
    let token = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    let method = request.method().to_string();
    state.seen.lock().unwrap().push((method, token.clone()));
    if state.revoked.lock().unwrap().contains(&token) {
        (StatusCode::UNAUTHORIZED, "token revoked")
    } else {
        (StatusCode::OK, "upstream ok")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_401_purges_the_token_and_a_get_is_retried_once_with_a_fresh_one() {
    let redis = RedisServer::start().await;
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RevokingUpstream::start().await;
    let keys = redis.key_file("cache.keys", &[&new_key()]);
    let yaml = yaml(&sts, &format!("http://{}", upstream.addr), &redis, &keys);
    let replicas = [gateway(&yaml).await, gateway(&yaml).await];
    let purges = |retried: &str| {
        format!("txgate_upstream_token_purges_total{{retried=\"{retried}\",route=\"orders\"}}")
    };

    // The STS's first token is revoked at the upstream.
    upstream.revoke("xt-1");
    let alice = caller_token();
    get_ok(&replicas[0], &alice).await;
    assert_eq!(sts.calls(), 2, "one exchange, one more after the purge");
    let seen = upstream.seen();
    assert_eq!(
        seen,
        vec![
            ("GET".to_string(), "xt-1".to_string()),
            ("GET".to_string(), "xt-2".to_string())
        ]
    );
    assert_eq!(metric(&replicas[0], &purges("true")), 1);
    // Both levels hold the fresh token: the other replica uses it without an exchange.
    get_ok(&replicas[1], &alice).await;
    assert_eq!(sts.calls(), 2);
    assert_eq!(upstream.seen().last().unwrap().1, "xt-2");

    // A POST is not sent twice: the caller gets the 401, and the token is still dropped.
    upstream.revoke("xt-3");
    let bob = caller_token();
    let reply = client()
        .post(format!("{}/orders", replicas[0].url()))
        .bearer_auth(&bob)
        .body("order")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 401);
    assert_eq!(sts.calls(), 3);
    assert_eq!(upstream.seen().len(), 4);
    assert_eq!(metric(&replicas[0], &purges("false")), 1);
    get_ok(&replicas[0], &bob).await;
    assert_eq!(sts.calls(), 4, "the next request got a fresh token");
    assert_eq!(upstream.seen().last().unwrap().1, "xt-4");

    // An upstream that rejects every token: one retry, then its answer.
    upstream.revoke("xt-5");
    upstream.revoke("xt-6");
    let carol = caller_token();
    let reply = get(&format!("{}/orders/1", replicas[0].url()), Some(&carol)).await;
    assert_eq!(reply.status, 401);
    assert_eq!(sts.calls(), 6);
    assert_eq!(upstream.seen().len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_starts_without_redis_or_with_a_wrong_password_and_says_which_key() {
    let redis = RedisServer::start().await;
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let keys = redis.key_file("cache.keys", &[&new_key()]);
    let shared = |url: String| {
        GatewayYaml::new()
            .token_service(TokenService::at(&sts))
            .route(
                Route::new("orders", "/orders", upstream.url())
                    .exchange(Exchange::impersonation("corp").audience("https://orders")),
            )
            .cache(Cache::new().set(
                "shared",
                serde_json::json!({
                    "url": url,
                    "password": "${TXGATE_REDIS_PASSWORD}",
                    "encryption_key_file": keys,
                }),
            ))
            .to_yaml()
    };
    let cases = [
        (
            redis.url(),
            "wrong-password-never-logged",
            "cache.shared.password",
        ),
        (
            format!("redis+unix://{}/none.sock", std::env::temp_dir().display()),
            "irrelevant-password-never-logged",
            "cache.shared.url",
        ),
    ];
    for (url, password, key) in cases {
        let process = TxgateProcess::run(&shared(url))
            .env("TXGATE_REDIS_PASSWORD", password)
            .start()
            .await;
        process
            .wait_for_stderr(
                &format!("log an error naming {key}"),
                Duration::from_secs(10),
                |log| {
                    log.lines()
                        .find(|l| l.contains("ERROR") && l.contains(key))
                        .map(str::to_string)
                },
            )
            .await;
        let reply = get(
            &format!("{}/orders/1", process.url()),
            Some(&caller_token()),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(!process.stderr().contains(password), "{}", process.stderr());
    }
}
