//! A real gRPC upstream and client for the tests (tonic, with hand-written prost messages and
//! services: no protoc, no build script).
//!
//! The upstream ([`GrpcUpstream`]) serves `echo.Echo` over h2c or over TLS with ALPN `h2` and
//! records the metadata (every header and pseudo-header) of each call it gets:
//! - `/echo.Echo/Say` (unary) answers with the request's message (with `hold`, only after
//!   [`GrpcUpstream::release`]);
//! - `/echo.Echo/Collect` (client streaming) records each message as it arrives
//!   ([`GrpcUpstream::collected`]) and answers with all of them joined by `,`;
//! - `/echo.Echo/Stream` (server streaming) answers `count` replies of `size` payload bytes
//!   each, then ends with the status the request asks for, carrying an `x-checksum` trailer
//!   (the SHA-256 of every payload sent) so a client can tell the stream arrived whole. With
//!   `hold`, it sends the first reply and waits for [`GrpcUpstream::release`] before the rest.
//!
//! The client ([`h2c_channel`], [`tls_channel`], [`say`], [`stream`]) is tonic's own.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::BoxStream;
use http::uri::PathAndQuery;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

use super::Seen;
use super::tls::TestCa;

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
    /// Server streaming: how many replies.
    #[prost(uint32, tag = "2")]
    pub count: u32,
    /// Server streaming: payload bytes per reply.
    #[prost(uint32, tag = "3")]
    pub size: u32,
    /// Server streaming: the gRPC status the stream ends with (0 = OK).
    #[prost(int32, tag = "4")]
    pub end_code: i32,
    /// Server streaming: wait for [`GrpcUpstream::release`] after the first reply.
    #[prost(bool, tag = "5")]
    pub hold: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(uint32, tag = "2")]
    pub index: u32,
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
}

/// The payload of reply `index`: deterministic, different per reply.
pub fn payload(index: u32, size: u32) -> Vec<u8> {
    (0..size)
        .map(|i| (i.wrapping_mul(31) ^ index.wrapping_mul(7)) as u8)
        .collect()
}

/// The hex SHA-256 over payloads in order: what the `x-checksum` trailer carries.
pub fn checksum<'a>(payloads: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut hash = Sha256::new();
    for p in payloads {
        hash.update(p);
    }
    hex::encode(hash.finalize())
}

/// One call the upstream received, with the HTTP version it came over.
#[derive(Clone, Debug)]
pub struct GrpcSeen {
    pub request: Seen,
    pub version: http::Version,
    /// The `:authority` (the URI's authority), if any.
    pub authority: Option<String>,
}

struct UpstreamState {
    seen: Mutex<Vec<GrpcSeen>>,
    release: Notify,
    /// The messages of client-streaming calls, as they arrive.
    collected: tokio::sync::watch::Sender<Vec<String>>,
}

/// A gRPC server on `127.0.0.1:0`; stopped on drop.
pub struct GrpcUpstream {
    pub addr: SocketAddr,
    tls: bool,
    state: Arc<UpstreamState>,
    task: JoinHandle<()>,
}

impl GrpcUpstream {
    /// Cleartext HTTP/2 with prior knowledge (h2c).
    pub async fn h2c() -> GrpcUpstream {
        GrpcUpstream::start(None).await
    }

    /// TLS with ALPN `h2` only, a certificate from `ca` for `127.0.0.1`.
    pub async fn h2(ca: &TestCa) -> GrpcUpstream {
        txgate::tls::install_crypto_provider();
        let issued = ca.server_cert(&["127.0.0.1"]);
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![issued.cert.clone()], issued.key())
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        GrpcUpstream::start(Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start(tls: Option<TlsAcceptor>) -> GrpcUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            seen: Mutex::new(Vec::new()),
            release: Notify::new(),
            collected: tokio::sync::watch::Sender::new(Vec::new()),
        });
        let is_tls = tls.is_some();
        let task = tokio::spawn(accept(listener, tls, state.clone()));
        GrpcUpstream {
            addr,
            tls: is_tls,
            state,
            task,
        }
    }

    /// `http://…` or `https://…`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<GrpcSeen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The messages client-streaming calls have delivered so far.
    pub fn collected(&self) -> Vec<String> {
        self.state.collected.borrow().clone()
    }

    /// Lets held streams send the rest of their replies.
    pub fn release(&self) {
        self.state.release.notify_waiters();
        self.state.release.notify_one();
    }
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, tls: Option<TlsAcceptor>, state: Arc<UpstreamState>) {
    // Connections live in this set, so aborting the accept task closes them too.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(state, request).await) }
            });
            let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                }
            }
        });
    }
}

async fn route(
    state: Arc<UpstreamState>,
    request: http::Request<Incoming>,
) -> http::Response<tonic::body::Body> {
    let seen = GrpcSeen {
        request: Seen {
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
        },
        version: request.version(),
        authority: request.uri().authority().map(|a| a.to_string()),
    };
    state.seen.lock().unwrap().push(seen);
    let mut grpc = tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default());
    match request.uri().path() {
        "/echo.Echo/Say" => {
            let say = tower::service_fn(move |call: tonic::Request<EchoRequest>| {
                let state = state.clone();
                async move {
                    let EchoRequest { message, hold, .. } = call.into_inner();
                    if hold {
                        state.release.notified().await;
                    }
                    Ok::<_, Status>(tonic::Response::new(EchoReply {
                        message,
                        index: 0,
                        payload: Vec::new(),
                    }))
                }
            });
            grpc.unary(say, request).await
        }
        "/echo.Echo/Stream" => {
            let stream = tower::service_fn(move |call: tonic::Request<EchoRequest>| {
                let state = state.clone();
                async move {
                    let ask = call.into_inner();
                    Ok::<_, Status>(tonic::Response::new(replies(state, ask)))
                }
            });
            grpc.server_streaming(stream, request).await
        }
        "/echo.Echo/Collect" => {
            let collect =
                tower::service_fn(move |call: tonic::Request<tonic::Streaming<EchoRequest>>| {
                    let state = state.clone();
                    async move {
                        let mut messages = call.into_inner();
                        let mut all = Vec::new();
                        while let Some(message) = messages.message().await? {
                            state
                                .collected
                                .send_modify(|c| c.push(message.message.clone()));
                            all.push(message.message);
                        }
                        Ok::<_, Status>(tonic::Response::new(EchoReply {
                            message: all.join(","),
                            index: 0,
                            payload: Vec::new(),
                        }))
                    }
                });
            grpc.client_streaming(collect, request).await
        }
        _ => Status::unimplemented("no such method").into_http(),
    }
}

fn replies(
    state: Arc<UpstreamState>,
    ask: EchoRequest,
) -> BoxStream<'static, Result<EchoReply, Status>> {
    let EchoRequest {
        message,
        count,
        size,
        end_code,
        hold,
    } = ask;
    let mut sum = Sha256::new();
    let stream = async_stream(move |tx| async move {
        for index in 0..count {
            let payload = payload(index, size);
            sum.update(&payload);
            let reply = EchoReply {
                message: message.clone(),
                index,
                payload,
            };
            if tx.send(Ok(reply)).await.is_err() {
                return;
            }
            if hold && index == 0 {
                state.release.notified().await;
            }
        }
        let mut trailers = tonic::metadata::MetadataMap::new();
        trailers.insert("x-checksum", hex::encode(sum.finalize()).parse().unwrap());
        let status = Status::with_metadata(Code::from(end_code), "stream end", trailers);
        let _ = tx.send(Err(status)).await;
    });
    stream.boxed()
}

/// A stream fed by a task through a channel of one (so the producer waits for the consumer,
/// as a real streaming server does).
fn async_stream<T, F, Fut>(produce: F) -> impl futures::Stream<Item = T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(produce(tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

// ---- client ------------------------------------------------------------------------------

/// A tonic channel speaking h2c to `url` (`http://host:port`).
pub async fn h2c_channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("gRPC connect to {url}: {e}"))
}

/// A tonic channel over TLS (ALPN `h2`, trusting only `ca`, server name `127.0.0.1`) to `addr`.
pub async fn tls_channel(addr: SocketAddr, ca: &TestCa) -> Channel {
    txgate::tls::install_crypto_provider();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    let connect = tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let tls = connector.connect(name, tcp).await?;
            let (_, session) = tls.get_ref();
            assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]), "ALPN chose h2");
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_with_connector(connect)
        .await
        .unwrap_or_else(|e| panic!("gRPC over TLS to {addr}: {e}"))
}

/// An HTTP/2 connection with prior knowledge to `addr`, as a service tonic's client can call
/// through. Unlike a [`Channel`], it enforces no `grpc-timeout` of its own, so a test can see
/// what the gateway does with a caller's deadline.
#[derive(Clone)]
pub struct Bare(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl Bare {
    pub async fn connect(addr: SocketAddr) -> Bare {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(connection);
        Bare(send)
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Bare {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, hyper::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

/// A unary `Say` call over a [`Bare`] connection to `authority`.
pub async fn say_bare(
    bare: &Bare,
    authority: SocketAddr,
    request: tonic::Request<EchoRequest>,
) -> Result<tonic::Response<EchoReply>, Status> {
    let origin: http::Uri = format!("http://{authority}").parse().unwrap();
    let mut grpc = tonic::client::Grpc::with_origin(bare.clone(), origin);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        request,
        PathAndQuery::from_static("/echo.Echo/Say"),
        ProstCodec::<EchoRequest, EchoReply>::default(),
    )
    .await
}

/// A request with `authorization: Bearer <token>` when a token is given.
pub fn request(message: EchoRequest, token: Option<&str>) -> tonic::Request<EchoRequest> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// A unary `Say` call.
pub async fn say(
    channel: &Channel,
    request: tonic::Request<EchoRequest>,
) -> Result<tonic::Response<EchoReply>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        request,
        PathAndQuery::from_static("/echo.Echo/Say"),
        ProstCodec::<EchoRequest, EchoReply>::default(),
    )
    .await
}

/// A server-streaming `Stream` call: the response (its stream not yet read).
pub async fn stream(
    channel: &Channel,
    request: tonic::Request<EchoRequest>,
) -> Result<tonic::Response<tonic::Streaming<EchoReply>>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.server_streaming(
        request,
        PathAndQuery::from_static("/echo.Echo/Stream"),
        ProstCodec::<EchoRequest, EchoReply>::default(),
    )
    .await
}

/// A client-streaming `Collect` call whose messages are what `messages` yields.
pub async fn collect(
    channel: &Channel,
    messages: impl futures::Stream<Item = EchoRequest> + Send + 'static,
    token: &str,
) -> Result<tonic::Response<EchoReply>, Status> {
    let mut request = tonic::Request::new(messages);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.client_streaming(
        request,
        PathAndQuery::from_static("/echo.Echo/Collect"),
        ProstCodec::<EchoRequest, EchoReply>::default(),
    )
    .await
}
