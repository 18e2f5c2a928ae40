//! Test parts: a scriptable in-process STS, a recording upstream, and a gateway started from
//! YAML. Everything binds `127.0.0.1:0`; nothing waits on sleeps for readiness (the gateway's
//! sockets are listening when `RunningGateway::start` returns, and axum servers are spawned on
//! already-bound listeners).

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::oneshot;

use txgate::config::Config;
use txgate::server::RunningGateway;

/// The client secret every test token service uses, via `${TEST_CLIENT_SECRET}`.
pub const CLIENT_SECRET: &str = "test-secret-value";

/// What the test STS answers.
#[derive(Clone)]
pub enum Behavior {
    /// A 200 token response with a unique token `xt-<n>`; `expires_in` as given (JSON value,
    /// `None` to omit).
    Issue {
        expires_in: Option<serde_json::Value>,
    },
    /// A fixed answer.
    Reply {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// Waits, then behaves as the inner behavior.
    Delay(Duration, Box<Behavior>),
    /// Call n (from the first call since it was set) behaves as item n; the last repeats.
    Sequence(Vec<Behavior>),
}

impl Behavior {
    pub fn issue() -> Behavior {
        Behavior::Issue {
            expires_in: Some(serde_json::json!(300)),
        }
    }

    pub fn error(status: u16, code: &str) -> Behavior {
        Behavior::Reply {
            status,
            body: serde_json::json!({"error": code, "error_description": "from the test STS"})
                .to_string(),
            headers: vec![("content-type".into(), "application/json".into())],
        }
    }
}

/// One request the STS received.
#[derive(Clone, Debug)]
pub struct Captured {
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub form: Vec<(String, String)>,
}

impl Captured {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn params(&self, key: &str) -> Vec<&str> {
        self.form
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

struct StsState {
    behavior: Mutex<Behavior>,
    calls: AtomicUsize,
    captured: Mutex<Vec<Captured>>,
    /// issued token → subject token it was issued for
    issued: Mutex<HashMap<String, String>>,
}

/// A token endpoint whose answers the test scripts.
pub struct TestSts {
    pub addr: SocketAddr,
    state: Arc<StsState>,
    _stop: oneshot::Sender<()>,
}

impl TestSts {
    pub async fn start(behavior: Behavior) -> TestSts {
        let state = Arc::new(StsState {
            behavior: Mutex::new(behavior),
            calls: AtomicUsize::new(0),
            captured: Mutex::new(Vec::new()),
            issued: Mutex::new(HashMap::new()),
        });
        let app = Router::new()
            .route("/token", axum::routing::post(sts_token))
            .with_state(state.clone());
        let (addr, stop) = serve(app).await;
        TestSts {
            addr,
            state,
            _stop: stop,
        }
    }

    pub fn token_endpoint(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn set(&self, behavior: Behavior) {
        *self.state.behavior.lock().unwrap() = behavior;
    }

    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    pub fn captured(&self) -> Vec<Captured> {
        self.state.captured.lock().unwrap().clone()
    }

    /// The subject token a given issued token was minted for.
    pub fn subject_of(&self, issued: &str) -> Option<String> {
        self.state.issued.lock().unwrap().get(issued).cloned()
    }
}

async fn sts_token(
    State(state): State<Arc<StsState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let n = state.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let captured = Captured {
        authorization: header(&headers, "authorization"),
        content_type: header(&headers, "content-type"),
        form,
    };
    let subject = captured
        .param("subject_token")
        .unwrap_or_default()
        .to_string();
    state.captured.lock().unwrap().push(captured);
    let mut behavior = state.behavior.lock().unwrap().clone();
    if let Behavior::Sequence(items) = behavior {
        let at = (n - 1).min(items.len().saturating_sub(1));
        behavior = items.get(at).cloned().unwrap_or_else(Behavior::issue);
    }
    while let Behavior::Delay(wait, inner) = behavior {
        tokio::time::sleep(wait).await;
        behavior = *inner;
    }
    match behavior {
        Behavior::Issue { expires_in } => {
            let token = format!("xt-{n}");
            state.issued.lock().unwrap().insert(token.clone(), subject);
            let mut body = serde_json::json!({
                "access_token": token,
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "token_type": "Bearer",
            });
            if let Some(e) = expires_in {
                body["expires_in"] = e;
            }
            ([("content-type", "application/json")], body.to_string()).into_response()
        }
        Behavior::Reply {
            status,
            body,
            headers,
        } => {
            let mut response = Response::builder().status(status);
            for (k, v) in headers {
                response = response.header(k, v);
            }
            response
                .body(Body::from(body))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Behavior::Delay(..) | Behavior::Sequence(_) => {
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// One request the upstream received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn bearer(&self) -> Option<&str> {
        self.header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
    }

    /// Everything the upstream saw, as one string, to search for leaks.
    pub fn everything(&self) -> String {
        let mut s = format!("{} {}\n", self.method, self.uri);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}\n"));
        }
        s
    }
}

/// An upstream that records every request and answers 200.
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    _stop: oneshot::Sender<()>,
}

impl RecordingUpstream {
    pub async fn start() -> RecordingUpstream {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new().fallback(record).with_state(seen.clone());
        let (addr, stop) = serve(app).await;
        RecordingUpstream {
            addr,
            seen,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn record(State(seen): State<Arc<Mutex<Vec<Seen>>>>, request: Request) -> Response {
    let headers = request
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    seen.lock().unwrap().push(Seen {
        method: request.method().to_string(),
        uri: request.uri().to_string(),
        headers,
    });
    "upstream ok".into_response()
}

async fn serve(app: Router) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (addr, stop)
}

/// Parses a gateway config; `${TEST_CLIENT_SECRET}` resolves to [`CLIENT_SECRET`].
pub fn config(yaml: &str) -> Config {
    Config::from_yaml_with(
        yaml,
        "test.yaml",
        &|name| (name == "TEST_CLIENT_SECRET").then(|| CLIENT_SECRET.to_string()),
        &txgate::exchange::discovery::OidcDiscovery,
    )
    .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{yaml}"))
}

/// Starts a gateway from YAML and waits until it can validate tokens (its JWKS are loaded);
/// its sockets accept from the start.
pub async fn gateway(yaml: &str) -> RunningGateway {
    txgate::tls::install_crypto_provider();
    let gw = RunningGateway::start(&config(yaml)).expect("gateway starts");
    tokio::time::timeout(Duration::from_secs(10), gw.state().wait_ready())
        .await
        .expect("the gateway's JWKS load within 10 s");
    gw
}

/// A plain HTTP client for driving the gateway.
pub fn client() -> reqwest::Client {
    txgate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A response read to the end: what [`get`] returns.
#[derive(Debug)]
pub struct Reply {
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    /// The body as text (invalid UTF-8 replaced).
    pub body: String,
}

impl Reply {
    /// The body parsed as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not a JSON body ({e}): {}", self.body))
    }

    /// A header's value as text, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// GETs `url`, with `Authorization: Bearer <token>` when a token is given, and reads the whole
/// response. Panics when no response comes (a refused connection, [`client`]'s 20 s timeout).
pub async fn get(url: &str, token: Option<&str>) -> Reply {
    let mut request = client().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: no answer: {e}"));
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: the body breaks off: {e}"));
    Reply {
        status,
        headers,
        body,
    }
}

/// How often [`eventually`] looks again.
pub const POLL_EVERY: Duration = Duration::from_millis(50);

/// What an [`eventually`] condition returns: `true`, `Some(value)` or `Ok(value)` when it
/// holds; `false`, `None` or `Err(what was seen instead)` when not yet.
pub trait Probe {
    type Value;
    fn check(self) -> Result<Self::Value, String>;
}

impl Probe for bool {
    type Value = ();
    fn check(self) -> Result<(), String> {
        if self { Ok(()) } else { Err("false".into()) }
    }
}

impl<T> Probe for Option<T> {
    type Value = T;
    fn check(self) -> Result<T, String> {
        self.ok_or_else(|| "nothing yet".into())
    }
}

impl<T, E: std::fmt::Display> Probe for Result<T, E> {
    type Value = T;
    fn check(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Evaluates `condition` every [`POLL_EVERY`] until it holds and returns its value; panics
/// naming `what` and the last thing seen if `within` passes first. For what the gateway does
/// in its own time (a reload, a health check, a background refresh, a scrape): never to wait
/// for a listener, which is bound before its address is known.
pub async fn eventually<F, Fut>(
    what: &str,
    within: Duration,
    mut condition: F,
) -> <Fut::Output as Probe>::Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future,
    Fut::Output: Probe,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        match condition().await.check() {
            Ok(value) => return value,
            Err(last) if std::time::Instant::now() >= deadline => {
                panic!("{what}: not within {within:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(POLL_EVERY).await,
        }
    }
}

/// A fresh opaque-looking caller token, unique per call.
pub fn caller_token() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "caller-{}-{:016x}",
        N.fetch_add(1, Ordering::SeqCst),
        rand::random::<u64>()
    )
}

/// An issuer of caller tokens with its own JWKS endpoint: signs whatever claims a test wants
/// (including tokens without `sub`, with `may_act`, expired ...).
pub struct TestIssuer {
    pub issuer: String,
    pub jwks_uri: String,
    key: jsonwebtoken::EncodingKey,
    kid: String,
    _stop: oneshot::Sender<()>,
}

impl TestIssuer {
    pub async fn start() -> TestIssuer {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let der = pair.to_pkcs8v1().unwrap();
        let public = pair.public_key().as_ref().to_vec();
        let b64 = |b: &[u8]| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        };
        let kid = format!("test-{:08x}", rand::random::<u32>());
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(&public[1..33]), "y": b64(&public[33..65]),
        }]})
        .to_string();
        let app = Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let jwks = jwks.clone();
                async move { ([("content-type", "application/json")], jwks) }
            }),
        );
        let (addr, stop) = serve(app).await;
        TestIssuer {
            issuer: format!("http://{addr}"),
            jwks_uri: format!("http://{addr}/jwks"),
            key: jsonwebtoken::EncodingKey::from_ec_der(der.as_ref()),
            kid,
            _stop: stop,
        }
    }

    /// Signs `claims` (ES256, with this issuer's kid). `iss` and `exp` are added unless present.
    pub fn sign(&self, claims: serde_json::Value) -> String {
        self.sign_typed("JWT", claims)
    }

    /// [`TestIssuer::sign`] with the JOSE `typ` set to `typ` (a Transaction Token's is
    /// `txntoken+jwt`).
    pub fn sign_typed(&self, typ: &str, mut claims: serde_json::Value) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        if claims.get("iss").is_none() {
            claims["iss"] = self.issuer.clone().into();
        }
        if claims.get("exp").is_none() {
            claims["exp"] = (now + 600).into();
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some(typ.to_string());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

/// A development STS on `127.0.0.1:0` with the gateway (`gateway`, [`CLIENT_SECRET`]) as its
/// client: the STS, its issuer URL, and the sender that stops it.
pub async fn dev_sts() -> (Arc<txgate::dev::sts::DevSts>, String, oneshot::Sender<()>) {
    use txgate::dev::sts::{DevClient, DevSts, DevStsOptions};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let sts = DevSts::new(DevStsOptions::new(
        issuer.clone(),
        vec![DevClient {
            client_id: "gateway".into(),
            client_secret: txgate::secret::Secret::new(CLIENT_SECRET),
        }],
    ))
    .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(sts.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    (sts, issuer, stop)
}

/// A JWT with the given claims and a meaningless signature, for paths that do not verify.
pub fn unsigned_jwt(claims: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.c2ln",
        b64(r#"{"alg":"ES256","typ":"JWT"}"#),
        b64(&claims.to_string())
    )
}

/// Writes a freshly generated private key as PEM (PKCS#8) into a temp file; returns the path
/// and the public key in SPKI DER for verifying what it signed.
pub fn private_key_pem(kind: &str) -> (std::path::PathBuf, Vec<u8>) {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair;
    use base64::Engine;
    let (der, public): (Vec<u8>, Vec<u8>) = match kind {
        "ec" => {
            use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
            let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
            (
                pair.to_pkcs8v1().unwrap().as_ref().to_vec(),
                pair.public_key().as_ref().to_vec(),
            )
        }
        _ => {
            let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
            let der: aws_lc_rs::encoding::Pkcs8V1Der = pair.as_der().unwrap();
            // PKCS#1 RSAPublicKey, what jsonwebtoken's `from_rsa_der` takes.
            (der.as_ref().to_vec(), pair.public_key().as_ref().to_vec())
        }
    };
    let body = base64::engine::general_purpose::STANDARD.encode(&der);
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    let path =
        std::env::temp_dir().join(format!("txgate-key-{}-{kind}.pem", rand::random::<u64>()));
    std::fs::write(&path, pem).unwrap();
    (path, public)
}

pub mod envoy;
pub mod grpc;
pub mod process;
pub mod redis_server;
pub mod tls;
pub mod yaml;

/// Parses a gateway config whose `${VAR}`s resolve from `vars`, plus `${TEST_CLIENT_SECRET}`
/// as in [`config`]; any other variable is unset.
pub fn config_with_env(yaml: &str, vars: &[(&str, &str)]) -> Config {
    let env = |name: &str| {
        if name == "TEST_CLIENT_SECRET" {
            return Some(CLIENT_SECRET.to_string());
        }
        vars.iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.to_string())
    };
    Config::from_yaml_with(
        yaml,
        "test.yaml",
        &env,
        &txgate::exchange::discovery::OidcDiscovery,
    )
    .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{yaml}"))
}

/// [`gateway`] with `${VAR}`s resolved from `vars` (see [`config_with_env`]).
pub async fn gateway_with_env(yaml: &str, vars: &[(&str, &str)]) -> RunningGateway {
    txgate::tls::install_crypto_provider();
    let gw = RunningGateway::start(&config_with_env(yaml, vars)).expect("gateway starts");
    tokio::time::timeout(Duration::from_secs(10), gw.state().wait_ready())
        .await
        .expect("the gateway's JWKS load within 10 s");
    gw
}
