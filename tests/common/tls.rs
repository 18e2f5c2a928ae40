//! TLS and multi-peer test parts: a throwaway CA that issues server and client certificates as
//! PEM files, an HTTPS upstream that reports the SNI and client certificate it saw, a plain
//! upstream whose `/healthz` a test can fail on demand, a WebSocket echo upstream, and HTTPS
//! clients pinned to one ALPN protocol.
//!
//! Like the rest of `common`, every server binds `127.0.0.1:0` before its task is spawned, so
//! it accepts as soon as `start` returns; nothing here sleeps to wait for readiness.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as WsRequest, Response as WsResponse,
};

use super::Seen;

/// A directory under the system temp dir, unique per instance, removed with everything in it
/// on drop. Holds the PEM files a gateway config points at.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "txgate-{label}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` in this directory and returns the full path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path.join(name);
        replace_file(&path, contents);
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Replaces `path` by writing a sibling and renaming it over, so a reader polling the file
/// sees either the old or the new contents, never a half-written one.
pub fn replace_file(path: &Path, contents: &str) {
    let staging = path.with_extension(format!("tmp-{:08x}", rand::random::<u32>()));
    std::fs::write(&staging, contents).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

/// A self-signed certificate authority created for one test. Its certificate is written to
/// [`TestCa::ca_file`] (for `ca_file:` keys) and kept in memory (for clients and servers).
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub name: String,
    pub cert: CertificateDer<'static>,
    pub cert_pem: String,
    pub ca_file: PathBuf,
    _dir: TempDir,
}

impl TestCa {
    /// A new CA whose subject CN is `name` (distinct names keep verifiers from confusing two
    /// test CAs with the same subject).
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = TempDir::new("ca");
        let ca_file = dir.write("ca.pem", &cert.pem());
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            name: name.to_string(),
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            ca_file,
            _dir: dir,
        }
    }

    /// A server certificate for `names` (DNS names, or IP addresses such as `127.0.0.1`).
    pub fn server_cert(&self, names: &[&str]) -> Issued {
        self.issue(
            names,
            names.first().copied().unwrap_or("server"),
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose subject CN is `name`.
    pub fn client_cert(&self, name: &str) -> Issued {
        self.issue(&[], name, rcgen::ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// Roots holding only this CA, for a rustls server or client.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        roots
    }

    /// This CA as a root for a reqwest client.
    pub fn reqwest_root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_der(&self.cert).unwrap()
    }

    fn issue(&self, names: &[&str], cn: &str, usage: rcgen::ExtendedKeyUsagePurpose) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn.to_string());
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        // A fresh serial per certificate: a reissue for the same names is a different
        // certificate, which is what the reload test looks for.
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let dir = TempDir::new("cert");
        let cert_file = dir.write("cert.pem", &cert.pem());
        let key_file = dir.write("key.pem", &key.serialize_pem());
        Issued {
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
            cert_file,
            key_file,
            _dir: dir,
        }
    }
}

fn random_serial() -> rcgen::SerialNumber {
    // Positive (top bit clear) and non-zero, as RFC 5280 §4.1.2.2 requires.
    let mut bytes = rand::random::<[u8; 16]>();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    rcgen::SerialNumber::from_slice(&bytes)
}

/// A certificate and its private key, in memory and as PEM files (`cert_file`, `key_file`)
/// in a directory of their own, removed on drop.
pub struct Issued {
    pub cert: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
    key_der: Vec<u8>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    _dir: TempDir,
}

impl Issued {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Overwrites `cert_file` and `key_file` (another certificate's paths) with this
    /// certificate and key, key first: a reader that picks up the new certificate finds the
    /// matching key already in place.
    pub fn install_at(&self, cert_file: &Path, key_file: &Path) {
        replace_file(key_file, &self.key_pem);
        replace_file(cert_file, &self.cert_pem);
    }
}

/// One request an HTTPS upstream received, with what its TLS handshake showed.
#[derive(Clone, Debug)]
pub struct TlsSeen {
    pub request: Seen,
    /// The server name the client sent (SNI), if any.
    pub sni: Option<String>,
    /// Whether the client presented a certificate.
    pub client_cert: bool,
    /// The negotiated ALPN protocol, if any.
    pub alpn: Option<String>,
}

struct TlsUpstreamState {
    name: String,
    seen: Mutex<Vec<TlsSeen>>,
    /// A count that can be awaited: the client may learn of a refused handshake before the
    /// server task has counted it.
    failed_handshakes: tokio::sync::watch::Sender<usize>,
}

/// An HTTPS server (rustls; HTTP/1.1 and HTTP/2 by ALPN) that records every request and
/// answers 200 with its own name as the body. Stopped by [`TlsUpstream::stop`] or drop.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    pub name: String,
    state: Arc<TlsUpstreamState>,
    task: Option<JoinHandle<()>>,
}

impl TlsUpstream {
    /// An upstream named `tls-upstream`; see [`TlsUpstream::start_named`].
    pub async fn start(ca: &TestCa, names: &[&str], client_ca: Option<&TestCa>) -> TlsUpstream {
        TlsUpstream::start_named("tls-upstream", ca, names, client_ca).await
    }

    /// Serves a certificate from `ca` for `names`. With `client_ca`, a client certificate
    /// issued by it is required: a handshake without one fails (and is counted in
    /// [`TlsUpstream::failed_handshakes`]).
    pub async fn start_named(
        name: &str,
        ca: &TestCa,
        names: &[&str],
        client_ca: Option<&TestCa>,
    ) -> TlsUpstream {
        txgate::tls::install_crypto_provider();
        let issued = ca.server_cert(names);
        let builder = rustls::ServerConfig::builder();
        let builder = match client_ca {
            Some(client_ca) => {
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder(Arc::new(client_ca.roots()))
                        .build()
                        .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(vec![issued.cert.clone()], issued.key())
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(TlsUpstreamState {
            name: name.to_string(),
            seen: Mutex::new(Vec::new()),
            failed_handshakes: tokio::sync::watch::Sender::new(0),
        });
        let task = tokio::spawn(accept_tls(listener, acceptor, state.clone()));
        TlsUpstream {
            addr,
            name: name.to_string(),
            state,
            task: Some(task),
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<TlsSeen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Handshakes that did not complete (for example, no client certificate when one is
    /// required), as counted so far.
    pub fn failed_handshakes(&self) -> usize {
        *self.state.failed_handshakes.borrow()
    }

    /// Waits until at least `n` handshakes have failed; false if that takes over `within`.
    pub async fn failed_handshakes_reach(&self, n: usize, within: std::time::Duration) -> bool {
        let mut count = self.state.failed_handshakes.subscribe();
        let reached = count.wait_for(|failed| *failed >= n);
        matches!(tokio::time::timeout(within, reached).await, Ok(Ok(_)))
    }

    /// Stops accepting and drops every open connection.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_tls(listener: TcpListener, acceptor: TlsAcceptor, state: Arc<TlsUpstreamState>) {
    // Connections live in this set, so aborting the accept task closes them too.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        connections.spawn(serve_tls(tcp, acceptor.clone(), state.clone()));
    }
}

async fn serve_tls(tcp: TcpStream, acceptor: TlsAcceptor, state: Arc<TlsUpstreamState>) {
    let Ok(tls) = acceptor.accept(tcp).await else {
        state.failed_handshakes.send_modify(|failed| *failed += 1);
        return;
    };
    let (_, connection) = tls.get_ref();
    let sni = connection.server_name().map(str::to_string);
    let client_cert = connection
        .peer_certificates()
        .is_some_and(|certs| !certs.is_empty());
    let alpn = connection
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let state = state.clone();
        let sni = sni.clone();
        let alpn = alpn.clone();
        async move {
            let request = request.map(Body::new);
            let seen = seen_from(&request);
            // Read the whole body so a client streaming one is not cut off mid-request.
            let _ = axum::body::to_bytes(request.into_body(), usize::MAX).await;
            state.seen.lock().unwrap().push(TlsSeen {
                request: seen,
                sni,
                client_cert,
                alpn,
            });
            Ok::<_, Infallible>(Response::new(Body::from(state.name.clone())))
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

fn seen_from<B>(request: &axum::http::Request<B>) -> Seen {
    Seen {
        method: request.method().to_string(),
        uri: request.uri().to_string(),
        headers: request
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    }
}

struct PeerState {
    name: String,
    healthy: AtomicBool,
    health_checks: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
}

/// A plain HTTP upstream that answers every request with its own name, and `GET /healthz`
/// with 200 or 503 as the test sets it. Health checks are counted, not recorded.
pub struct PeerUpstream {
    pub addr: SocketAddr,
    pub name: String,
    state: Arc<PeerState>,
    _stop: oneshot::Sender<()>,
}

impl PeerUpstream {
    /// Starts healthy.
    pub async fn start(name: &str) -> PeerUpstream {
        let state = Arc::new(PeerState {
            name: name.to_string(),
            healthy: AtomicBool::new(true),
            health_checks: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/healthz", axum::routing::get(peer_health))
            .fallback(peer_answer)
            .with_state(state.clone());
        let (addr, stop) = super::serve(app).await;
        PeerUpstream {
            addr,
            name: name.to_string(),
            state,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }

    pub fn health_checks(&self) -> usize {
        self.state.health_checks.load(Ordering::SeqCst)
    }

    /// Requests other than health checks.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

async fn peer_health(State(state): State<Arc<PeerState>>) -> StatusCode {
    state.health_checks.fetch_add(1, Ordering::SeqCst);
    if state.healthy.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn peer_answer(State(state): State<Arc<PeerState>>, request: Request) -> Response {
    state.seen.lock().unwrap().push(seen_from(&request));
    state.name.clone().into_response()
}

/// An address nothing listens on: a port bound and released at once, so a connect to it is
/// refused.
pub fn dead_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// A WebSocket server that records each upgrade request and echoes every text and binary
/// message back.
pub struct WsEchoUpstream {
    pub addr: SocketAddr,
    upgrades: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl WsEchoUpstream {
    pub async fn start() -> WsEchoUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upgrades = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(accept_ws(listener, upgrades.clone()));
        WsEchoUpstream {
            addr,
            upgrades,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The upgrade requests the server accepted, in order.
    pub fn upgrades(&self) -> Vec<Seen> {
        self.upgrades.lock().unwrap().clone()
    }
}

impl Drop for WsEchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_ws(listener: TcpListener, upgrades: Arc<Mutex<Vec<Seen>>>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let upgrades = upgrades.clone();
        connections.spawn(async move {
            // The signature is tungstenite's `Callback`, error type included.
            #[allow(clippy::result_large_err)]
            let record = |request: &WsRequest, response: WsResponse| {
                upgrades.lock().unwrap().push(seen_from(request));
                Ok::<_, ErrorResponse>(response)
            };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, record).await else {
                return;
            };
            while let Some(Ok(message)) = ws.next().await {
                if message.is_text() || message.is_binary() {
                    if ws.send(message).await.is_err() {
                        return;
                    }
                } else if message.is_close() {
                    return;
                }
            }
        });
    }
}

/// The one ALPN protocol an HTTPS client offers.
#[derive(Clone, Copy, Debug)]
pub enum Alpn {
    H2,
    Http1,
}

/// An HTTPS client that trusts only `roots` and offers only `alpn`. Each client has its own
/// connection pool, so a new client means a new TLS handshake. Responses carry the server's
/// certificate (see [`presented_cert`]); `response.version()` tells which protocol was used.
pub fn https_client(roots: &[&TestCa], alpn: Alpn) -> reqwest::Client {
    txgate::tls::install_crypto_provider();
    let builder = reqwest::Client::builder()
        .tls_certs_only(roots.iter().map(|ca| ca.reqwest_root()))
        .tls_info(true)
        .timeout(std::time::Duration::from_secs(20));
    let builder = match alpn {
        Alpn::H2 => builder.http2_prior_knowledge(),
        Alpn::Http1 => builder.http1_only(),
    };
    builder.build().unwrap()
}

/// The DER certificate the server presented on the connection `response` came over.
pub fn presented_cert(response: &reqwest::Response) -> Option<Vec<u8>> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .map(<[u8]>::to_vec)
}

struct StreamingState {
    first_chunk: Mutex<Option<oneshot::Sender<()>>>,
    release: Mutex<Option<oneshot::Receiver<()>>>,
    received: Mutex<Vec<u8>>,
}

/// An upstream for one request that proves bodies stream through a proxy rather than being
/// buffered: it reports when the first chunk of the request body arrives (before the client
/// has sent the rest), and answers `part-1` at once but holds `part-2` until the test
/// releases it (after the client has seen `part-1`).
pub struct StreamingUpstream {
    pub addr: SocketAddr,
    state: Arc<StreamingState>,
    first_chunk: Mutex<Option<oneshot::Receiver<()>>>,
    release: Mutex<Option<oneshot::Sender<()>>>,
    _stop: oneshot::Sender<()>,
}

impl StreamingUpstream {
    pub async fn start() -> StreamingUpstream {
        let (first_tx, first_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        let state = Arc::new(StreamingState {
            first_chunk: Mutex::new(Some(first_tx)),
            release: Mutex::new(Some(release_rx)),
            received: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .fallback(stream_answer)
            .with_state(state.clone());
        let (addr, stop) = super::serve(app).await;
        StreamingUpstream {
            addr,
            state,
            first_chunk: Mutex::new(Some(first_rx)),
            release: Mutex::new(Some(release_tx)),
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until the first chunk of the request body has arrived; false on timeout.
    pub async fn first_chunk_arrived(&self, within: std::time::Duration) -> bool {
        let receiver = self.first_chunk.lock().unwrap().take();
        match receiver {
            Some(receiver) => matches!(tokio::time::timeout(within, receiver).await, Ok(Ok(()))),
            None => true,
        }
    }

    /// Lets the response's second part go.
    pub fn release_rest(&self) {
        if let Some(release) = self.release.lock().unwrap().take() {
            let _ = release.send(());
        }
    }

    /// The whole request body received so far.
    pub fn received(&self) -> Vec<u8> {
        self.state.received.lock().unwrap().clone()
    }
}

async fn stream_answer(State(state): State<Arc<StreamingState>>, request: Request) -> Response {
    let mut body = request.into_body().into_data_stream();
    while let Some(Ok(chunk)) = body.next().await {
        state.received.lock().unwrap().extend_from_slice(&chunk);
        if let Some(first) = state.first_chunk.lock().unwrap().take() {
            let _ = first.send(());
        }
    }
    let release = state.release.lock().unwrap().take();
    let first = futures::stream::once(async { Ok::<_, Infallible>("part-1\n") });
    let rest = futures::stream::once(async move {
        if let Some(release) = release {
            let _ = release.await;
        }
        Ok::<_, Infallible>("part-2\n")
    });
    Response::new(Body::from_stream(first.chain(rest)))
}
