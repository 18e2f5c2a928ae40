//! Soak driver: the real `txgate` binary under sustained load while its STS turns slow, then
//! down, then comes back.
//!
//! It starts, in this process, an STS that remembers every token it minted (for which caller
//! and which audience) and an upstream that checks every request it gets: the `Authorization`
//! must be a token the STS minted for exactly this caller and this route's audience (else a
//! "wrong token"), and no caller token may appear anywhere in the request (else a "leak").
//! The gateway runs as a child process from a generated config. Many keep-alive connections
//! send requests from thousands of distinct callers across several routes; the STS's faults
//! follow a schedule expressed in fractions of the run. The gateway's RSS is sampled after
//! warm-up and at the end. Every answer must be one the design allows: 200, 503 with
//! `Retry-After` (STS down and the token not cached), or 504 (STS slower than the timeout).
//!
//! Settings come from the environment (see `soak/run.sh`, which builds and runs this):
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `SOAK_REQUESTS` | 1000000 | requests to send |
//! | `SOAK_CALLERS` | 10000 | distinct caller tokens |
//! | `SOAK_ROUTES` | 3 | routes, each with its own audience |
//! | `SOAK_CONCURRENCY` | 64 | concurrent keep-alive connections |
//! | `SOAK_SCHEDULE` | `slow@0.25-0.35,down@0.50-0.75` | STS faults, as fractions of `SOAK_REQUESTS` |
//! | `SOAK_SLOW_MS` | 200 | extra STS latency while `slow` |
//! | `SOAK_DOWN_MODE` | `refuse` | `refuse` (listener closed) or `503` while `down` |
//! | `SOAK_STS_TIMEOUT` | `1s` | the token service's `timeout` |
//! | `SOAK_OPEN_FOR` | `5s` | the token service's `circuit_breaker.open_for` |
//! | `SOAK_TOKEN_TTL` | 20 | `expires_in` of minted tokens, seconds (cached for 1 s less) |
//! | `SOAK_WARMUP` | `SOAK_REQUESTS / 10` | requests before the first RSS sample |
//! | `SOAK_THREADS` | 2 | gateway worker threads |
//! | `SOAK_MAX_SECONDS` | 1800 | hard bound on the load phase |
//! | `SOAK_GATEWAY_BIN` | `target/release/txgate` | the gateway binary |
//! | `SOAK_OUT` | `soak/out` | where the config and the gateway's log go |
//!
//! Exits 0 when there were no wrong tokens, no leaks, no unexpected statuses and no transport
//! errors, 1 otherwise.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::oneshot;

/// Every caller token starts with this, so one substring search finds any caller's token.
const CALLER_PREFIX: &str = "soakcaller-";
const CLIENT_SECRET: &str = "soak-client-secret";

// ---------------------------------------------------------------------------------------------
// Settings

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not valid")),
        Err(_) => default,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    Slow,
    Down,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Slow => "slow",
            Fault::Down => "down",
        }
    }
}

/// A fault from request `start` (inclusive) to `end` (exclusive).
#[derive(Clone, Copy, Debug)]
struct Window {
    fault: Fault,
    start: u64,
    end: u64,
}

impl Window {
    /// `slow@0.3-0.4`: a fault over a fraction of the run's requests.
    fn parse(item: &str, requests: u64) -> Option<Window> {
        let (fault, range) = item.split_once('@')?;
        let (from, to) = range.split_once('-')?;
        let fault = match fault {
            "slow" => Fault::Slow,
            "down" => Fault::Down,
            _ => return None,
        };
        let at = |s: &str| s.parse::<f64>().ok().map(|f| (f * requests as f64) as u64);
        Some(Window {
            fault,
            start: at(from)?,
            end: at(to)?,
        })
    }
}

struct Settings {
    requests: u64,
    callers: usize,
    routes: usize,
    concurrency: usize,
    schedule: Vec<Window>,
    slow: Duration,
    down_refuses: bool,
    sts_timeout: String,
    /// `circuit_breaker.open_for` of the token service.
    open_for: String,
    token_ttl: u64,
    warmup: u64,
    threads: usize,
    max_time: Duration,
    gateway_bin: PathBuf,
    out: PathBuf,
}

impl Settings {
    fn from_env() -> Settings {
        let requests: u64 = env_or("SOAK_REQUESTS", 1_000_000);
        let schedule_text: String =
            env_or("SOAK_SCHEDULE", "slow@0.25-0.35,down@0.50-0.75".to_string());
        let schedule = schedule_text
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|item| {
                Window::parse(item.trim(), requests).unwrap_or_else(|| {
                    panic!("SOAK_SCHEDULE item {item:?}: expected slow|down@FROM-TO")
                })
            })
            .collect();
        let down_mode: String = env_or("SOAK_DOWN_MODE", "refuse".to_string());
        Settings {
            requests,
            callers: env_or("SOAK_CALLERS", 10_000),
            routes: env_or("SOAK_ROUTES", 3),
            concurrency: env_or("SOAK_CONCURRENCY", 64),
            schedule,
            slow: Duration::from_millis(env_or("SOAK_SLOW_MS", 200)),
            down_refuses: match down_mode.as_str() {
                "refuse" => true,
                "503" => false,
                other => panic!("SOAK_DOWN_MODE={other:?}: expected refuse or 503"),
            },
            sts_timeout: env_or("SOAK_STS_TIMEOUT", "1s".to_string()),
            open_for: env_or("SOAK_OPEN_FOR", "5s".to_string()),
            token_ttl: env_or("SOAK_TOKEN_TTL", 20),
            warmup: env_or("SOAK_WARMUP", requests / 10),
            threads: env_or("SOAK_THREADS", 2),
            max_time: Duration::from_secs(env_or("SOAK_MAX_SECONDS", 1800)),
            gateway_bin: env_or("SOAK_GATEWAY_BIN", PathBuf::from("target/release/txgate")),
            out: env_or("SOAK_OUT", PathBuf::from("soak/out")),
        }
    }

    fn audience(route: usize) -> String {
        format!("https://svc{route}.soak.test")
    }
}

// ---------------------------------------------------------------------------------------------
// The STS: mints opaque tokens and remembers for whom

/// What the STS does with a request right now.
const MODE_NORMAL: u8 = 0;
const MODE_SLOW: u8 = 1;
const MODE_DOWN_503: u8 = 2;

struct Sts {
    mode: std::sync::atomic::AtomicU8,
    slow: Duration,
    ttl: u64,
    /// Caller token → caller index, to check the subject is one of ours.
    callers: HashMap<String, u32>,
    audiences: Vec<String>,
    /// Minted token → (caller index, route index).
    issued: RwLock<HashMap<String, (u32, u32)>>,
    calls: AtomicU64,
    minted: AtomicU64,
    unavailable: AtomicU64,
    rejected: AtomicU64,
}

async fn sts_token(State(sts): State<Arc<Sts>>, body: Bytes) -> Response {
    sts.calls.fetch_add(1, Ordering::Relaxed);
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let caller = form
        .get("subject_token")
        .and_then(|t| sts.callers.get(t))
        .copied();
    let route = form
        .get("audience")
        .and_then(|a| sts.audiences.iter().position(|x| x == a));
    let mode = sts.mode.load(Ordering::Relaxed);
    if mode == MODE_SLOW {
        tokio::time::sleep(sts.slow).await;
    }
    if mode == MODE_DOWN_503 {
        sts.unavailable.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "1"), ("content-type", "application/json")],
            r#"{"error":"temporarily_unavailable"}"#,
        )
            .into_response();
    }
    let (Some(caller), Some(route)) = (caller, route) else {
        // Not ours: the gateway sent a subject or audience the soak never used.
        sts.rejected.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::BAD_REQUEST,
            [("content-type", "application/json")],
            r#"{"error":"invalid_grant"}"#,
        )
            .into_response();
    };
    let n = sts.minted.fetch_add(1, Ordering::Relaxed);
    let token = format!("soakissued-{n:x}-{:016x}", rand::random::<u64>());
    sts.issued
        .write()
        .unwrap()
        .insert(token.clone(), (caller, route as u32));
    let body = serde_json::json!({
        "access_token": token,
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer",
        "expires_in": sts.ttl,
    });
    ([("content-type", "application/json")], body.to_string()).into_response()
}

/// The STS's listener, which can be closed (connections refused) and opened again on the same
/// port.
struct StsServer {
    addr: SocketAddr,
    state: Arc<Sts>,
    stop: Option<oneshot::Sender<()>>,
}

impl StsServer {
    async fn start(state: Arc<Sts>) -> StsServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut server = StsServer {
            addr,
            state,
            stop: None,
        };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route("/token", axum::routing::post(sts_token))
            .with_state(self.state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        self.stop = Some(stop);
    }

    /// Stops accepting (new connections are refused) and closes idle keep-alive connections.
    fn close(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Listens again on the same port.
    async fn reopen(&mut self) {
        for _ in 0..200 {
            if let Ok(listener) = tokio::net::TcpListener::bind(self.addr).await {
                self.serve(listener);
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("cannot listen on {} again", self.addr);
    }
}

// ---------------------------------------------------------------------------------------------
// The upstream: checks every request's token and looks for leaks

struct Upstream {
    sts: Arc<Sts>,
    received: AtomicU64,
    wrong_tokens: AtomicU64,
    leaks: AtomicU64,
    examples: Mutex<Vec<String>>,
}

impl Upstream {
    fn note(&self, what: String) {
        let mut examples = self.examples.lock().unwrap();
        if examples.len() < 10 {
            examples.push(what);
        }
    }
}

async fn upstream(State(up): State<Arc<Upstream>>, request: Request) -> Response {
    up.received.fetch_add(1, Ordering::Relaxed);
    let headers: &HeaderMap = request.headers();
    let uri = request.uri().to_string();
    let leaked = uri.contains(CALLER_PREFIX)
        || headers
            .iter()
            .any(|(_, v)| contains(v.as_bytes(), CALLER_PREFIX.as_bytes()));
    if leaked {
        up.leaks.fetch_add(1, Ordering::Relaxed);
        up.note(format!("leak: {uri} {headers:?}"));
    }
    let route: Option<u32> = uri
        .strip_prefix("/r")
        .and_then(|rest| rest.split('/').next())
        .and_then(|r| r.parse().ok());
    let caller: Option<u32> = headers
        .get("x-soak-caller")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let minted_for = token.and_then(|t| up.sts.issued.read().unwrap().get(t).copied());
    let right = matches!((minted_for, caller, route), (Some(m), Some(c), Some(r)) if m == (c, r));
    if !right {
        up.wrong_tokens.fetch_add(1, Ordering::Relaxed);
        up.note(format!(
            "wrong token: {uri} caller {caller:?} got {token:?} minted for {minted_for:?}"
        ));
    }
    "ok".into_response()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

// ---------------------------------------------------------------------------------------------
// The gateway child process

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn gateway_config(
    s: &Settings,
    listen: u16,
    admin: u16,
    sts: SocketAddr,
    up: SocketAddr,
) -> String {
    let mut yaml = format!(
        r#"server:
  listen: ["127.0.0.1:{listen}"]
  admin_listen: "127.0.0.1:{admin}"
  threads: {threads}
token_services:
  soak:
    token_endpoint: "http://{sts}/token"
    client_id: "soak-gateway"
    client_secret: "${{SOAK_CLIENT_SECRET}}"
    timeout: {timeout}
    connect_timeout: 500ms
    circuit_breaker: {{ open_for: {open_for} }}
cache:
  max_entries: 200000
  expiry_skew: 1s
routes:
"#,
        threads = s.threads,
        timeout = s.sts_timeout,
        open_for = s.open_for,
    );
    for r in 0..s.routes {
        yaml.push_str(&format!(
            "  - name: r{r}\n    match: {{ path_prefix: \"/r{r}\" }}\n    upstream: \"http://{up}\"\n    exchange: {{ mode: impersonation, token_service: soak, audience: [\"{}\"], scope: \"svc{r}:read\" }}\n",
            Settings::audience(r)
        ));
    }
    yaml
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

async fn stop_child(child: &mut Child) {
    // SIGTERM first, as an orchestrator would; SIGKILL only if it does not drain in time.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..150 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------------------------
// Load

/// Per-phase status counts of one load task, merged at the end.
type Histogram = BTreeMap<(String, u16), u64>;

/// Per-phase latencies of one load task, in microseconds, merged and sorted at the end.
type Latencies = BTreeMap<String, Vec<u32>>;

struct Load {
    next: AtomicU64,
    done: AtomicU64,
    /// The phase name each request is attributed to (the one in force when it was sent).
    phase: RwLock<String>,
    stop: AtomicBool,
    unexpected: AtomicU64,
    transport_errors: AtomicU64,
    examples: Mutex<Vec<String>>,
    /// When the load began; the times below count from it.
    started: Instant,
    /// When the last 503 of a request sent in a normal phase arrived, in µs: the gateway still
    /// failing fast after the STS came back (its breaker's `open_for`).
    last_normal_503_us: AtomicU64,
}

impl Load {
    fn note(&self, what: String) {
        let mut examples = self.examples.lock().unwrap();
        if examples.len() < 10 {
            examples.push(what);
        }
    }
}

async fn load_task(
    load: Arc<Load>,
    client: reqwest::Client,
    base: String,
    callers: Arc<Vec<String>>,
    s: Arc<Settings>,
) -> (Histogram, Latencies) {
    let mut histogram = Histogram::new();
    let mut latencies = Latencies::new();
    loop {
        let i = load.next.fetch_add(1, Ordering::Relaxed);
        if i >= s.requests || load.stop.load(Ordering::Relaxed) {
            break;
        }
        // 7919 is prime and does not divide the caller count, so consecutive requests walk
        // all callers; with the route as i mod routes every (caller, route) pair recurs.
        let caller = ((i * 7919) % s.callers as u64) as usize;
        let route = (i % s.routes as u64) as usize;
        let token = &callers[caller];
        // Every tenth request also carries the token in the query, which must be stripped.
        let query = if i.is_multiple_of(10) {
            format!("?page=1&access_token={token}")
        } else {
            "?page=1".to_string()
        };
        let phase = load.phase.read().unwrap().clone();
        let sent_at = Instant::now();
        let sent = client
            .get(format!("{base}/r{route}/items/{i}{query}"))
            .bearer_auth(token)
            .header("x-soak-caller", caller.to_string())
            .send()
            .await;
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response.headers().contains_key("retry-after");
                let _ = response.bytes().await;
                let allowed = match status {
                    200 | 504 => true,
                    503 => retry_after,
                    _ => false,
                };
                if !allowed {
                    load.unexpected.fetch_add(1, Ordering::Relaxed);
                    load.note(format!(
                        "request {i} in {phase}: status {status} (Retry-After: {retry_after})"
                    ));
                }
                if status == 503 && phase == "normal" {
                    let at = load.started.elapsed().as_micros() as u64;
                    load.last_normal_503_us.fetch_max(at, Ordering::Relaxed);
                }
                latencies
                    .entry(phase.clone())
                    .or_default()
                    .push(sent_at.elapsed().as_micros().min(u32::MAX as u128) as u32);
                *histogram.entry((phase, status)).or_default() += 1;
            }
            Err(e) => {
                load.transport_errors.fetch_add(1, Ordering::Relaxed);
                load.note(format!("request {i} in {phase}: {e}"));
                *histogram.entry((phase, 0)).or_default() += 1;
            }
        }
        load.done.fetch_add(1, Ordering::Relaxed);
    }
    (histogram, latencies)
}

/// One fault as it happened.
struct Injected {
    fault: Fault,
    from: (f64, u64),
    to: Option<(f64, u64)>,
}

#[tokio::main]
async fn main() {
    txgate::tls::install_crypto_provider();
    let s = Arc::new(Settings::from_env());
    assert!(s.routes > 0 && s.callers > 0 && s.concurrency > 0);
    std::fs::create_dir_all(&s.out).unwrap();

    let callers: Arc<Vec<String>> = Arc::new(
        (0..s.callers)
            .map(|i| format!("{CALLER_PREFIX}{i}-{:016x}", rand::random::<u64>()))
            .collect(),
    );
    let sts_state = Arc::new(Sts {
        mode: std::sync::atomic::AtomicU8::new(MODE_NORMAL),
        slow: s.slow,
        ttl: s.token_ttl,
        callers: callers
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect(),
        audiences: (0..s.routes).map(Settings::audience).collect(),
        issued: RwLock::new(HashMap::new()),
        calls: AtomicU64::new(0),
        minted: AtomicU64::new(0),
        unavailable: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
    });
    let mut sts = StsServer::start(sts_state.clone()).await;
    let up = Arc::new(Upstream {
        sts: sts_state.clone(),
        received: AtomicU64::new(0),
        wrong_tokens: AtomicU64::new(0),
        leaks: AtomicU64::new(0),
        examples: Mutex::new(Vec::new()),
    });
    let up_addr = serve(Router::new().fallback(upstream).with_state(up.clone())).await;

    let (listen, admin) = (free_port(), free_port());
    let config_path = s.out.join("gateway.yaml");
    std::fs::write(
        &config_path,
        gateway_config(&s, listen, admin, sts.addr, up_addr),
    )
    .unwrap();
    let log_path = s.out.join("gateway.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(&s.gateway_bin)
        .args(["run", "--config"])
        .arg(&config_path)
        .env("TXGATE_LOG", "warn")
        .env("SOAK_CLIENT_SECRET", CLIENT_SECRET)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", s.gateway_bin.display()));
    let pid = child.id();

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(s.concurrency)
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let ready = async {
        loop {
            let answer = client
                .get(format!("http://127.0.0.1:{admin}/readyz"))
                .send()
                .await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .is_err()
    {
        let _ = child.kill();
        eprintln!(
            "the gateway did not become ready; its log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::process::exit(1);
    }

    let load = Arc::new(Load {
        next: AtomicU64::new(0),
        done: AtomicU64::new(0),
        phase: RwLock::new("normal".to_string()),
        stop: AtomicBool::new(false),
        unexpected: AtomicU64::new(0),
        transport_errors: AtomicU64::new(0),
        examples: Mutex::new(Vec::new()),
        started: Instant::now(),
        last_normal_503_us: AtomicU64::new(0),
    });
    let started = load.started;
    let base = format!("http://127.0.0.1:{listen}");
    let tasks: Vec<_> = (0..s.concurrency)
        .map(|_| {
            tokio::spawn(load_task(
                load.clone(),
                client.clone(),
                base.clone(),
                callers.clone(),
                s.clone(),
            ))
        })
        .collect();

    // The conductor: applies the fault schedule by request count, samples RSS, enforces the
    // time bound, and prints progress every 10 s.
    let mut injected: Vec<Injected> = Vec::new();
    let mut active: Option<usize> = None;
    let mut warm_rss: Option<(u64, u64, f64)> = None;
    // RSS at every tenth of the run, to tell growth that levels off from growth that does not.
    let mut rss_by_tenth: Vec<(u64, u64)> = Vec::new();
    let mut rss_max = 0u64;
    let mut rss_min = u64::MAX;
    let mut last_progress = Instant::now();
    let mut child_died = None;
    while load.done.load(Ordering::Relaxed) < s.requests {
        let sent = load.next.load(Ordering::Relaxed).min(s.requests);
        let at = (started.elapsed().as_secs_f64(), sent);
        let due = s
            .schedule
            .iter()
            .position(|w| sent >= w.start && sent < w.end);
        if due != active {
            if let Some(i) = active {
                let fault = s.schedule[i].fault;
                if fault == Fault::Down && s.down_refuses {
                    sts.reopen().await;
                }
                sts_state.mode.store(MODE_NORMAL, Ordering::Relaxed);
                if let Some(last) = injected.last_mut() {
                    last.to = Some(at);
                }
            }
            if let Some(i) = due {
                let fault = s.schedule[i].fault;
                match fault {
                    Fault::Slow => sts_state.mode.store(MODE_SLOW, Ordering::Relaxed),
                    Fault::Down if s.down_refuses => sts.close(),
                    Fault::Down => sts_state.mode.store(MODE_DOWN_503, Ordering::Relaxed),
                }
                injected.push(Injected {
                    fault,
                    from: at,
                    to: None,
                });
            }
            *load.phase.write().unwrap() = due
                .map_or("normal", |i| s.schedule[i].fault.name())
                .to_string();
            active = due;
        }
        if let Some(kib) = rss_kib(pid) {
            let done = load.done.load(Ordering::Relaxed);
            if warm_rss.is_none() && done >= s.warmup {
                warm_rss = Some((kib, done, started.elapsed().as_secs_f64()));
            }
            if warm_rss.is_some() {
                rss_max = rss_max.max(kib);
                rss_min = rss_min.min(kib);
            }
            let tenth = (done * 10 / s.requests.max(1)) as usize;
            if tenth > rss_by_tenth.len() {
                rss_by_tenth.push((done, kib));
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            child_died = Some(status);
            load.stop.store(true, Ordering::Relaxed);
            break;
        }
        if started.elapsed() > s.max_time {
            eprintln!("time bound of {:?} reached; stopping the load", s.max_time);
            load.stop.store(true, Ordering::Relaxed);
            break;
        }
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            let done = load.done.load(Ordering::Relaxed);
            eprintln!(
                "  {:>6.0} s  {done:>8} requests  {:>6.0} req/s  phase {}  rss {}",
                started.elapsed().as_secs_f64(),
                done as f64 / started.elapsed().as_secs_f64(),
                load.phase.read().unwrap(),
                rss_kib(pid).map(mib).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut histogram = Histogram::new();
    let mut latencies = Latencies::new();
    for task in tasks {
        let (counts, times) = task.await.unwrap();
        for (key, n) in counts {
            *histogram.entry(key).or_default() += n;
        }
        for (phase, mut t) in times {
            latencies.entry(phase).or_default().append(&mut t);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if active.is_some() {
        if let Some(last) = injected.last_mut() {
            last.to = Some((elapsed, load.next.load(Ordering::Relaxed)));
        }
        if s.down_refuses && sts.stop.is_none() {
            sts.reopen().await;
        }
    }
    let end_rss = rss_kib(pid);
    let metrics = client
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .send()
        .await
        .ok();
    let metrics = match metrics {
        Some(r) => r.text().await.unwrap_or_default(),
        None => String::new(),
    };
    if child_died.is_none() {
        stop_child(&mut child).await;
    }

    // Summary
    let done = load.done.load(Ordering::Relaxed);
    let mut totals: BTreeMap<u16, u64> = BTreeMap::new();
    let mut phases: BTreeMap<String, BTreeMap<u16, u64>> = BTreeMap::new();
    for ((phase, status), n) in &histogram {
        *totals.entry(*status).or_default() += n;
        *phases
            .entry(phase.clone())
            .or_default()
            .entry(*status)
            .or_default() += n;
    }
    let statuses = |m: &BTreeMap<u16, u64>| {
        m.iter()
            .map(|(s, n)| {
                if *s == 0 {
                    format!("transport error: {n}")
                } else {
                    format!("{s}: {n}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let wrong = up.wrong_tokens.load(Ordering::Relaxed);
    let leaks = up.leaks.load(Ordering::Relaxed);
    let unexpected = load.unexpected.load(Ordering::Relaxed);
    let transport = load.transport_errors.load(Ordering::Relaxed);
    let pass =
        wrong == 0 && leaks == 0 && unexpected == 0 && transport == 0 && child_died.is_none();

    println!(
        "requests        {done} ({} callers, {} routes, {} connections)",
        s.callers, s.routes, s.concurrency
    );
    println!(
        "duration        {elapsed:.1} s ({:.0} req/s)",
        done as f64 / elapsed
    );
    println!("statuses        {}", statuses(&totals));
    for (phase, m) in &phases {
        println!("  while {phase:<7} {}", statuses(m));
    }
    for (phase, times) in &mut latencies {
        times.sort_unstable();
        let at = |q: f64| {
            let i = ((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1));
            times.get(i).map_or(0.0, |us| *us as f64 / 1000.0)
        };
        println!(
            "  latency {phase:<7} p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            at(0.50),
            at(0.99),
            at(1.0)
        );
    }
    if !rss_by_tenth.is_empty() {
        let line: Vec<String> = rss_by_tenth
            .iter()
            .map(|(done, kib)| format!("{}k {:.1}", done / 1000, *kib as f64 / 1024.0))
            .collect();
        println!("rss by progress {} (requests, MiB)", line.join(" | "));
    }
    println!("faults");
    for f in &injected {
        let to =
            f.to.map(|(t, r)| format!("{t:.1} s (request {r})"))
                .unwrap_or_else(|| "the end".into());
        let what = match (f.fault, s.down_refuses) {
            (Fault::Slow, _) => format!(
                "slow (+{} ms, timeout {})",
                s.slow.as_millis(),
                s.sts_timeout
            ),
            (Fault::Down, true) => "down (connections refused)".to_string(),
            (Fault::Down, false) => "down (503, Retry-After: 1)".to_string(),
        };
        println!(
            "  {what:<34} from {:.1} s (request {}) to {to}",
            f.from.0, f.from.1
        );
    }
    // How long callers kept getting 503 after the STS was back: the breaker waits out its
    // `open_for` before the probe that closes it.
    if let Some(back) = injected
        .iter()
        .rev()
        .find(|f| f.fault == Fault::Down)
        .and_then(|f| f.to)
    {
        let last_503 = load.last_normal_503_us.load(Ordering::Relaxed) as f64 / 1e6;
        let recovery = (last_503 - back.0).max(0.0);
        println!(
            "recovery        503s for {recovery:.1} s after the STS came back at {:.1} s (circuit_breaker.open_for {})",
            back.0, s.open_for
        );
    }
    println!(
        "sts             {} calls, {} tokens minted (expires_in {} s), {} answered 503, {} refused as not ours",
        sts_state.calls.load(Ordering::Relaxed),
        sts_state.minted.load(Ordering::Relaxed),
        s.token_ttl,
        sts_state.unavailable.load(Ordering::Relaxed),
        sts_state.rejected.load(Ordering::Relaxed),
    );
    println!(
        "upstream        {} requests checked",
        up.received.load(Ordering::Relaxed)
    );
    match (warm_rss, end_rss) {
        (Some((warm, at, t)), Some(end)) => println!(
            "gateway rss     after warm-up {} (request {at}, {t:.1} s), at end {} ({:+.1} %), range {} .. {}",
            mib(warm),
            mib(end),
            (end as f64 - warm as f64) * 100.0 / warm as f64,
            mib(rss_min),
            mib(rss_max)
        ),
        _ => println!("gateway rss     not sampled (warm-up not reached or the gateway is gone)"),
    }
    for line in metrics.lines().filter(|l| {
        l.starts_with("txgate_token_exchanges_total")
            || l.starts_with("txgate_token_cache_entries")
            || l.starts_with("txgate_token_service_circuit_open")
    }) {
        println!("metrics         {line}");
    }
    // Cache lookups summed over routes: how much of the load the cache absorbed.
    let mut lookups: BTreeMap<&str, f64> = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("txgate_token_cache_lookups_total{"))
    {
        let result = line
            .split("result=\"")
            .nth(1)
            .and_then(|r| r.split('"').next());
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(result), Some(value)) = (result, value) {
            *lookups.entry(result).or_default() += value;
        }
    }
    if !lookups.is_empty() {
        let all: Vec<String> = lookups.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("cache lookups   {}", all.join(", "));
    }
    println!("wrong tokens    {wrong}");
    println!("leaks           {leaks}");
    println!("unexpected      {unexpected} (statuses other than 200, 503 with Retry-After, 504)");
    println!("transport errs  {transport}");
    if let Some(status) = child_died {
        println!("gateway         EXITED during the run: {status}");
    }
    for example in up
        .examples
        .lock()
        .unwrap()
        .iter()
        .chain(load.examples.lock().unwrap().iter())
    {
        println!("  e.g. {example}");
    }
    let warnings = std::fs::read_to_string(&log_path)
        .map(|l| l.lines().count())
        .unwrap_or(0);
    println!(
        "gateway log     {warnings} lines at warn or above ({})",
        log_path.display()
    );
    println!("result          {}", if pass { "PASS" } else { "FAIL" });
    std::process::exit(if pass { 0 } else { 1 });
}
