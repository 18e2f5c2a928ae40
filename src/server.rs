//! Assembling and running the pingora server: proxy listeners, admin listener, shutdown.
//!
//! Listening sockets are bound here, before pingora starts, and handed to it through its
//! listener fd table. That gives a clear error when an address is taken (instead of a panic
//! inside a service), lets port 0 work (tests learn the real port), and means connections
//! queue in the kernel backlog from the moment [`RunningGateway::start`] returns.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::IntoRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::protocols::Stream;
use pingora::server::configuration::ServerConf;
use pingora::server::{
    ListenFds, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora::services::Service;
use pingora::services::listening::Service as ListeningService;
use tokio::sync::oneshot;

use crate::admin::AdminApp;
use crate::config::{Config, ServerSettings};
use crate::ext_authz;
use crate::proxy::Gateway;
use crate::state::CurrentState;
use crate::state::GatewayState;
use crate::tls::ReloadingCert;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

/// A startup failure. `txgate run` prints it and exits 1, or 2 for a setting that cannot be
/// put to work (the message then names the file and key, as config errors do).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Other(String),
}

impl From<crate::state::StateError> for StartError {
    fn from(e: crate::state::StateError) -> StartError {
        match e {
            crate::state::StateError::Config(e) => StartError::Config(e),
            other => StartError::Other(other.to_string()),
        }
    }
}

/// Sockets bound for one configuration.
pub struct BoundListeners {
    pub proxy: Vec<(SocketAddr, TcpListener)>,
    /// `server.tls.listen`
    pub tls: Vec<(SocketAddr, TcpListener)>,
    pub admin: Option<(SocketAddr, TcpListener)>,
    /// `server.ext_authz.grpc_listen`
    pub ext_authz_grpc: Option<(SocketAddr, TcpListener)>,
    /// `server.ext_authz.http_listen`
    pub ext_authz_http: Option<(SocketAddr, TcpListener)>,
}

impl BoundListeners {
    /// Binds every listener in `server:`; fails on the first address that cannot be bound.
    pub fn bind(settings: &ServerSettings) -> Result<BoundListeners, StartError> {
        let proxy = settings
            .listen
            .iter()
            .map(|addr| bind_one(*addr, "server.listen"))
            .collect::<Result<Vec<_>, _>>()?;
        let tls = settings
            .tls
            .iter()
            .flat_map(|t| t.listen.iter())
            .map(|addr| bind_one(*addr, "server.tls.listen"))
            .collect::<Result<Vec<_>, _>>()?;
        let admin = settings
            .admin_listen
            .map(|addr| bind_one(addr, "server.admin_listen"))
            .transpose()?;
        let ext_authz_grpc = settings
            .ext_authz
            .grpc_listen
            .map(|addr| bind_one(addr, "server.ext_authz.grpc_listen"))
            .transpose()?;
        let ext_authz_http = settings
            .ext_authz
            .http_listen
            .map(|addr| bind_one(addr, "server.ext_authz.http_listen"))
            .transpose()?;
        Ok(BoundListeners {
            proxy,
            tls,
            admin,
            ext_authz_grpc,
            ext_authz_http,
        })
    }

    /// The bound ext_authz listeners.
    pub fn ext_authz_addrs(&self) -> ext_authz::Listeners {
        ext_authz::Listeners {
            grpc: self.ext_authz_grpc.as_ref().map(|(a, _)| *a),
            http: self.ext_authz_http.as_ref().map(|(a, _)| *a),
        }
    }

    pub fn tls_addrs(&self) -> Vec<SocketAddr> {
        self.tls.iter().map(|(a, _)| *a).collect()
    }

    pub fn proxy_addrs(&self) -> Vec<SocketAddr> {
        self.proxy.iter().map(|(a, _)| *a).collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(a, _)| *a)
    }
}

fn bind_one(addr: SocketAddr, key: &str) -> Result<(SocketAddr, TcpListener), StartError> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| StartError::Other(format!("{key}: cannot listen on {addr}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| StartError::Other(format!("{key}: {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| StartError::Other(format!("{key}: {addr}: {e}")))?;
    Ok((bound, listener))
}

/// A listening service whose sockets were bound before the server started. pingora adopts an
/// fd from its table when the table has one under the service's listen address.
struct Prebound<S> {
    inner: S,
    sockets: Vec<(String, TcpListener)>,
    on_start: Option<Box<dyn FnOnce(ShutdownWatch) + Send + Sync>>,
}

#[async_trait]
impl<S: Service> Service for Prebound<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        if let Some(table) = &fds {
            let mut table = table.lock();
            for (addr, socket) in self.sockets.drain(..) {
                table.add(addr, socket.into_raw_fd());
            }
        }
        if let Some(on_start) = self.on_start.take() {
            on_start(shutdown.clone());
        }
        self.inner
            .start_service(fds, shutdown, listeners_per_fd)
            .await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

/// The task of a front door served by tokio alone (the ext_authz listeners): given the
/// server's shutdown watch, it serves until shutdown begins and then lets work in flight end.
type FrontDoorTask = Box<
    dyn FnOnce(ShutdownWatch) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync,
>;

/// A front door that is not a pingora application, run as a pingora service so that it starts
/// with the server, on a runtime of its own, and stops with its graceful shutdown.
struct FrontDoor {
    name: String,
    threads: usize,
    task: Option<FrontDoorTask>,
}

#[async_trait]
impl Service for FrontDoor {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        if let Some(task) = self.task.take() {
            task(shutdown).await;
        }
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn threads(&self) -> Option<usize> {
        Some(self.threads)
    }
}

/// Resolves when `shutdown` says the server is stopping (or the server is gone).
async fn shutting_down(mut shutdown: ShutdownWatch) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// The ext_authz front door on `socket`: `router` serves each connection.
fn ext_authz_service(
    name: &'static str,
    socket: TcpListener,
    router: axum::Router,
    threads: usize,
) -> FrontDoor {
    FrontDoor {
        name: name.to_string(),
        threads,
        task: Some(Box::new(move |shutdown: ShutdownWatch| {
            Box::pin(ext_authz::serve(
                socket,
                router,
                name,
                shutting_down(shutdown),
            ))
        })),
    }
}

/// How long a new plain connection has to send its first 24 bytes when `server.h2c` is on.
/// pingora reads that many (the length of the HTTP/2 preface) to tell HTTP/2 from HTTP/1.1,
/// with no time limit of its own: a client that sends fewer and waits would hold the connection
/// for as long as it likes. A real client sends its whole first request at once.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// The proxy application behind a bound on the wait for a plain connection's first bytes
/// ([`PREFACE_TIMEOUT`]), when pingora is going to wait for them (`within`: h2c is on).
struct PrefaceDeadline<A> {
    inner: Arc<A>,
    within: Option<Duration>,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for PrefaceDeadline<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if let Some(within) = self.within
            && stream.get_ssl_digest().is_none()
        {
            // The bytes peeked are put back: pingora's own peek then finds them at once.
            let mut preface = [0u8; 24];
            match tokio::time::timeout(within, stream.try_peek(&mut preface)).await {
                Ok(Ok(_)) => {}
                // Too slow, or closed before 24 bytes: nothing to answer.
                Ok(Err(_)) | Err(_) => return None,
            }
        }
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Builds the pingora server for `config` on already-bound sockets.
pub fn build(config: &Config, listeners: BoundListeners) -> Result<(Server, Reloader), StartError> {
    build_server(config, listeners, Runtime::AsConfigured)
}

/// Which tokio runtime flavour the proxy threads get.
#[derive(Clone, Copy, PartialEq)]
enum Runtime {
    /// `server.work_stealing`.
    AsConfigured,
    /// Work stealing whatever the config says: for servers started inside a process that may
    /// already have run and stopped another one. pingora's no-steal runtime remembers its
    /// thread pool in a process-wide table keyed by thread id, and thread ids are reused: a
    /// new runtime thread can inherit a stopped server's pool and hand its listeners to a
    /// runtime that no longer runs (connections are then refused).
    WorkStealing,
}

fn build_server(
    config: &Config,
    listeners: BoundListeners,
    runtime: Runtime,
) -> Result<(Server, Reloader), StartError> {
    let settings = &config.server;
    let conf = ServerConf {
        threads: settings.threads,
        // Without stealing pingora runs one single-threaded runtime per thread and spreads
        // new connections over them at random (bench/README.md, "Engine settings").
        work_stealing: settings.work_stealing || runtime == Runtime::WorkStealing,
        grace_period_seconds: Some(settings.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(settings.shutdown_timeout.as_secs()),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let state = Arc::new(GatewayState::new(config, None)?);
    let current: CurrentState = Arc::new(ArcSwap::from(state.clone()));
    let (reload_tx, reload_rx) = mpsc::channel::<ReloadRequest>(4);
    let reloader = Reloader {
        current: current.clone(),
        requests: reload_tx,
    };

    let mut app = pingora::proxy::http_proxy(&server.configuration, Gateway::new(current.clone()));
    if settings.h2c {
        // pingora peeks at each new plain connection for the HTTP/2 preface (RFC 9113 §3.4)
        // and serves HTTP/1.1 when it is absent; TLS listeners negotiate by ALPN regardless.
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        app.server_options = Some(options);
    }
    let mut proxy = ListeningService::new(
        "txgate proxy".to_string(),
        PrefaceDeadline {
            inner: Arc::new(app),
            within: settings.h2c.then_some(PREFACE_TIMEOUT),
        },
    );
    let ext_authz_listeners = listeners.ext_authz_addrs();
    let mut proxy_sockets = Vec::new();
    for (addr, socket) in listeners.proxy {
        proxy.add_tcp(&addr.to_string());
        proxy_sockets.push((addr.to_string(), socket));
    }
    let mut certificate = None;
    if let Some(tls) = &settings.tls {
        let cert = ReloadingCert::load(&tls.cert_file, &tls.key_file)
            .map_err(|e| StartError::Other(format!("server.tls: {e}")))?;
        for (addr, socket) in listeners.tls {
            let tls_settings = crate::tls::listener_settings(cert.clone())
                .map_err(|e| StartError::Other(format!("server.tls: {e}")))?;
            proxy.add_tls_with_settings(&addr.to_string(), None, tls_settings);
            proxy_sockets.push((addr.to_string(), socket));
        }
        certificate = Some((cert, tls.reload_interval));
    }
    let ready_state = state.clone();
    let reload_current = current.clone();
    let config_path = PathBuf::from(&config.source);
    let watch_interval = settings.watch_config;
    server.add_service(Prebound {
        inner: proxy,
        sockets: proxy_sockets,
        on_start: Some(Box::new(move |mut shutdown: ShutdownWatch| {
            ready_state.ready.store(true, Ordering::Release);
            ready_state.start_background();
            if let Some((cert, interval)) = certificate {
                // Ends with the runtime; the certificate lives as long as the listener.
                drop(cert.spawn_watcher(interval));
            }
            tokio::spawn(reload_loop(
                reload_current,
                reload_rx,
                config_path,
                watch_interval,
            ));
            // Readiness fails as soon as shutdown begins, so load balancers stop sending.
            let watcher = ready_state.clone();
            tokio::spawn(async move {
                while shutdown.changed().await.is_ok() {
                    if *shutdown.borrow() {
                        watcher.shutting_down.store(true, Ordering::Release);
                        break;
                    }
                }
            });
        })),
    });

    let ext_authz_doors = [
        (
            "txgate ext_authz grpc",
            listeners.ext_authz_grpc,
            ext_authz::grpc::router as fn(_) -> _,
        ),
        (
            "txgate ext_authz http",
            listeners.ext_authz_http,
            ext_authz::http::router,
        ),
    ];
    for (name, bound, router) in ext_authz_doors {
        if let Some((_, socket)) = bound {
            let router = router(current.clone());
            server.add_service(ext_authz_service(name, socket, router, settings.threads));
        }
    }

    if let Some((addr, socket)) = listeners.admin {
        let mut admin = ListeningService::new(
            "txgate admin".to_string(),
            AdminApp::new(current.clone(), ext_authz_listeners),
        );
        admin.add_tcp(&addr.to_string());
        admin.threads = Some(1);
        server.add_service(Prebound {
            inner: admin,
            sockets: vec![(addr.to_string(), socket)],
            on_start: None,
        });
    }
    Ok((server, reloader))
}

/// A request to apply a new configuration, answered with the outcome.
struct ReloadRequest {
    config: Box<Config>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Applies new configurations to a running gateway.
#[derive(Clone)]
pub struct Reloader {
    current: CurrentState,
    requests: mpsc::Sender<ReloadRequest>,
}

impl Reloader {
    /// The configuration in force.
    pub fn state(&self) -> Arc<GatewayState> {
        self.current.load_full()
    }

    /// Applies `config` (built and validated by the caller) on the server's runtime.
    pub async fn apply(&self, config: Config) -> Result<(), String> {
        let (done, outcome) = oneshot::channel();
        self.requests
            .send(ReloadRequest {
                config: Box::new(config),
                done,
            })
            .await
            .map_err(|_| "the gateway is not running".to_string())?;
        outcome
            .await
            .map_err(|_| "the gateway stopped during the reload".to_string())?
    }
}

/// Logs each [`Config::warnings`] entry at warn: at start (`txgate run`) and on every reload.
pub fn log_warnings(config: &Config) {
    for warning in config.warnings() {
        tracing::warn!(file = %config.source, "{warning}");
    }
}

/// Swaps in a new configuration. Requests in flight finish with the one they started with;
/// the cache, metrics and readiness carry over. Listen addresses change only with a restart.
fn swap(current: &CurrentState, config: &Config) -> Result<(), String> {
    let old = current.load_full();
    if old.listen != config.server.listen
        || old.tls_listen
            != config
                .server
                .tls
                .as_ref()
                .map(|t| t.listen.clone())
                .unwrap_or_default()
    {
        tracing::warn!(
            "listen addresses changed in the new configuration; they apply only after a restart"
        );
    }
    let state = Arc::new(GatewayState::new(config, Some(&old)).map_err(|e| e.to_string())?);
    log_warnings(config);
    state.start_background();
    current.store(state);
    tracing::info!(
        routes = config.routes.len(),
        source = %config.source,
        "configuration reloaded"
    );
    Ok(())
}

/// Reloads on SIGHUP, on a change of the config file (when `server.watch_config` is set), and
/// on in-process requests. A configuration that fails to load is logged and refused; the
/// running one keeps serving.
async fn reload_loop(
    current: CurrentState,
    mut requests: mpsc::Receiver<ReloadRequest>,
    path: PathBuf,
    watch: Option<Duration>,
) {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last_seen = modified(&path);
    let mut tick = tokio::time::interval(watch.unwrap_or(Duration::from_secs(3600)));
    tick.tick().await;
    loop {
        let from_file = tokio::select! {
            request = requests.recv() => match request {
                Some(request) => {
                    let _ = request.done.send(swap(&current, &request.config));
                    continue;
                }
                None => false,
            },
            _ = async {
                match hangup.as_mut() {
                    Some(signal) => { signal.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => true,
            _ = tick.tick(), if watch.is_some() => {
                let now = modified(&path);
                if now == last_seen {
                    continue;
                }
                last_seen = now;
                true
            }
        };
        if !from_file {
            // Every sender is gone but signals can still arrive: keep serving them.
            std::future::pending::<()>().await;
        }
        match Config::load(&path, &crate::exchange::discovery::OidcDiscovery) {
            Ok(config) => {
                if let Err(e) = swap(&current, &config) {
                    tracing::error!(error = %e, "the new configuration could not be applied; the running one keeps serving");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "the new configuration is invalid and was refused; the running one keeps serving");
            }
        }
    }
}

/// Runs `config` in the foreground until SIGTERM (graceful), SIGINT (fast) or SIGQUIT
/// (graceful upgrade). Used by `txgate run` and `txgate demo`.
pub fn run_until_signal(config: &Config, listeners: BoundListeners) -> Result<(), StartError> {
    let (server, _reloader) = build(config, listeners)?;
    server.run(RunArgs::default());
    Ok(())
}

/// Resolves when the owner of a [`RunningGateway`] asks it to stop (or drops it).
struct ChannelSignal(Mutex<Option<oneshot::Receiver<ShutdownSignal>>>);

#[async_trait]
impl ShutdownSignalWatch for ChannelSignal {
    async fn recv(&self) -> ShutdownSignal {
        let receiver = self.0.lock().ok().and_then(|mut r| r.take());
        match receiver {
            Some(receiver) => receiver.await.unwrap_or(ShutdownSignal::FastShutdown),
            None => std::future::pending().await,
        }
    }
}

/// A gateway running on a background thread, stopped by [`RunningGateway::stop`] or drop.
/// Used by tests and embedders; the sockets are listening when `start` returns.
pub struct RunningGateway {
    pub proxy_addrs: Vec<SocketAddr>,
    /// `server.tls.listen` addresses, bound.
    pub tls_addrs: Vec<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    /// `server.ext_authz` listeners, bound.
    pub ext_authz: ext_authz::Listeners,
    reloader: Reloader,
    stop: Option<oneshot::Sender<ShutdownSignal>>,
    thread: Option<JoinHandle<()>>,
}

impl RunningGateway {
    /// Binds, builds and starts `config`. The proxy threads always use tokio's work-stealing
    /// runtime here, whatever `server.work_stealing` says (see [`Runtime::WorkStealing`]);
    /// `txgate run` is one server per process and uses the setting.
    pub fn start(config: &Config) -> Result<RunningGateway, StartError> {
        let listeners = BoundListeners::bind(&config.server)?;
        let proxy_addrs = listeners.proxy_addrs();
        let tls_addrs = listeners.tls_addrs();
        let admin_addr = listeners.admin_addr();
        let ext_authz = listeners.ext_authz_addrs();
        let (server, reloader) = build_server(config, listeners, Runtime::WorkStealing)?;
        let (stop, receiver) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("txgate-server".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(ChannelSignal(Mutex::new(Some(receiver)))),
                })
            })
            .map_err(|e| StartError::Other(format!("cannot start the server thread: {e}")))?;
        Ok(RunningGateway {
            proxy_addrs,
            tls_addrs,
            admin_addr,
            ext_authz,
            reloader,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The configuration in force.
    pub fn state(&self) -> Arc<GatewayState> {
        self.reloader.state()
    }

    /// Applies a new configuration without dropping requests in flight (as SIGHUP does).
    pub async fn reload(&self, config: Config) -> Result<(), String> {
        self.reloader.apply(config).await
    }

    /// The first plain proxy address as a base URL, e.g. `http://127.0.0.1:40123`
    /// (`https://` when only TLS listeners are configured).
    pub fn url(&self) -> String {
        match (self.proxy_addrs.first(), self.tls_addrs.first()) {
            (Some(plain), _) => format!("http://{plain}"),
            (None, Some(tls)) => format!("https://{tls}"),
            (None, None) => String::new(),
        }
    }

    /// Stops the server and waits for its thread. `graceful` lets in-flight requests finish
    /// within the configured grace period and shutdown timeout.
    pub fn stop(mut self, graceful: bool) {
        self.shutdown(graceful);
    }

    fn shutdown(&mut self, graceful: bool) {
        if let Some(stop) = self.stop.take() {
            let signal = if graceful {
                ShutdownSignal::GracefulTerminate
            } else {
                ShutdownSignal::FastShutdown
            };
            let _ = stop.send(signal);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        self.shutdown(false);
    }
}
