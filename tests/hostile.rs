//! Hostile requests through a real gateway, one table per kind of attack.
//!
//! Each row is a request a careless or malicious client could send, with the answer the README
//! error table promises for it. For every row the test also checks what must hold whatever the
//! answer: the gateway does not panic and keeps serving (a good request after the row still
//! gets 200), a token the gateway can judge locally never reaches the STS, and the caller's
//! token never reaches the upstream, raw or percent-encoded. Requests go out as raw bytes over a
//! `TcpStream`, because HTTP client libraries refuse to send most of these.
//!
//! One configuration ([`Parts::yaml_with`]) serves every table, with one route per kind of route:
//! - `/open`: impersonation of any syntactically valid token (no inbound validation), with a
//!   `headers.set` entry; `/jwt` and `/orders`: impersonation of callers' JWTs, validated
//!   against a [`TestIssuer`]'s JWKS first (by their token service); `/public`: `mode: none`;
//! - `/delegation`: delegation, the actor being the gateway's own client-credentials token;
//!   `/machine`: client credentials for validated callers; `/anonymous`: client credentials
//!   with `caller: anonymous`;
//! - `/tls/...`: one HTTPS upstream whose certificate the gateway does not trust, written as a
//!   bare URL, as a peer list without `tls:`, and with `tls: { verify: false }`.
//!
//! The HTTP/2 table ([`h2_rows`]) sends its requests as raw frames over h2c to a gateway with
//! `server.h2c`, both in process and against the binary.
//!
//! Every table runs in process (a [`RunningGateway`]), and all of them again against the
//! `txgate` binary started on the same configuration with trace logging, whose whole output is
//! then searched for every caller token (`the_binary_*` at the end). Only the rows for
//! non-default path settings, which each need a configuration of their own, run in process
//! alone.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::process::TxgateProcess;
use common::tls::{TestCa, TlsUpstream};
use common::yaml::{Actor, Exchange, GatewayYaml, Inbound, Route, TokenService, Upstream};
use common::{Behavior, RecordingUpstream, Seen, TestIssuer, TestSts, caller_token, gateway};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use txgate::server::RunningGateway;

/// `server.max_token_bytes` of the test gateway: below the default so the boundary rows stay
/// small, above every JWT row so those reach the validator.
const MAX_TOKEN_BYTES: usize = 2048;
/// The audience the validating routes require of callers' tokens.
const AUDIENCE: &str = "gateway-api";
/// The value the `/open` route's `headers.set` gives `X-Gateway`.
const GATEWAY_HEADER: &str = "txgate-edge-gateway";
/// What the HTTPS upstream answers (its name).
const TLS_UPSTREAM: &str = "tls upstream ok";
/// The longest request target the gateway reads. pingora (pingora-http's
/// `RequestHeader::build`) parses every request target into an `http::Uri`, and `http` refuses
/// one over `u16::MAX - 1` bytes; pingora's own limit on the whole header block
/// (`MAX_HEADER_SIZE`, 1 MiB) is far above it.
const MAX_REQUEST_TARGET: usize = 65_534;
/// How long the binary may take to load the JWKS, and to exit after SIGTERM.
const BINARY_WITHIN: Duration = Duration::from_secs(30);

/// Panics anywhere in this test binary, counted by a hook: pingora catches a panicking request
/// task and drops the connection, which a client alone could mistake for a parser refusal.
/// A failing assertion on a test's own thread is not counted.
static PANICS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static TEST_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs the panic counter once and marks the calling thread (the test's) as not counted.
fn count_panics() {
    static HOOK: Once = Once::new();
    TEST_THREAD.with(|t| t.set(true));
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !TEST_THREAD.with(|t| t.get()) {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// The `WWW-Authenticate` challenge a refusal must carry (RFC 6750 §3).
#[derive(Clone, Copy, Debug)]
enum Challenge {
    /// None at all (404, 431, 503 ...).
    Absent,
    /// `Bearer realm="txgate"` exactly: no credential was presented (RFC 6750 §3.1).
    Bare,
    /// `Bearer realm="txgate", error="<the body's error code>", ...`.
    WithError,
    /// Not checked: the README does not say whether a refusal of the request itself (its path,
    /// its Host, its query) rather than of its credential carries one.
    Unspecified,
}

/// What the upstream must find in `Authorization` when a row is forwarded, and how many STS
/// calls that takes.
#[derive(Clone, Copy, Debug)]
enum Sent {
    /// A token the STS minted for this row's caller token, in one STS call (impersonation;
    /// delegation, whose actor token the harness has cached beforehand).
    Exchanged,
    /// The gateway's own client-credentials token, cached since [`Harness::warm`]: no STS
    /// call, and nothing the caller sent.
    Machine,
    /// No `Authorization` at all (`mode: none`), and no STS call.
    Nothing,
    /// Exactly this token, which the row's scripted STS answer carried (one STS call).
    Scripted(&'static str),
}

/// What a row expects.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Forwarded: 200 from the upstream, which got what [`Sent`] says.
    Forwarded(Sent),
    /// Answered by txgate itself with this status, JSON `error` code and challenge; the STS and
    /// the upstream are not called.
    Refused(u16, &'static str, Challenge),
    /// Answered by txgate with this status, code and challenge after one STS call; the
    /// upstream gets nothing.
    RefusedAfterExchange(u16, &'static str, Challenge),
    /// Refused by the HTTP/1.1 parser before txgate's code runs: 400 (or, tolerated, the
    /// connection closed without an answer); the STS and the upstream are not called.
    ParserRefused,
    /// Either [`Expect::ParserRefused`] (a 400 without txgate's JSON body, or no answer) or
    /// this [`Expect::Refused`] from txgate.
    ParserOrRefused(u16, &'static str, Challenge),
    /// Answered by txgate with some 4xx and a JSON `error`, which one not being the point of
    /// the row; the STS and the upstream are not called.
    NotForwarded,
    /// Answered by txgate to a gRPC caller: HTTP 200, `content-type: application/grpc` and
    /// this `grpc-status`, with the challenge, after this many STS calls; the upstream is not
    /// called.
    GrpcRefused(&'static str, Challenge, usize),
}

/// Forwarded with a token exchanged for the caller.
const FORWARDED: Expect = Expect::Forwarded(Sent::Exchanged);

/// A check on the one request the upstream received for a forwarded row.
#[derive(Debug)]
enum Check {
    /// The request target (path and query), exactly.
    Target(String),
    /// This header (lower-case name) with exactly this value.
    Header(&'static str, String),
    /// This header with some non-empty value.
    Present(&'static str),
    /// No such header.
    Absent(&'static str),
}

/// One hostile request.
struct Row {
    name: String,
    /// The complete request as written to the socket.
    bytes: Vec<u8>,
    expect: Expect,
    /// The caller token the upstream must never see (and, when forwarded, the subject the STS
    /// must have minted the upstream's token for). Empty when the row carries no token.
    token: String,
    /// Other token-like values the request carries (query parameters, tokens in headers that
    /// are not the credential): like the token, they reach neither the upstream nor a log.
    secrets: Vec<String>,
    /// What the STS answers while this row is sent, instead of issuing tokens.
    sts: Option<Behavior>,
    /// Checks on what the upstream received, when forwarded.
    upstream: Vec<Check>,
    /// The answer must come within this time.
    within: Option<Duration>,
    /// Sent as this HTTP/2 header block (pseudo-headers first) over h2c instead of `bytes`.
    h2: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl Row {
    /// The complete request `bytes`, as written.
    fn raw(name: impl Into<String>, bytes: Vec<u8>, expect: Expect) -> Row {
        Row {
            name: name.into(),
            bytes,
            expect,
            token: String::new(),
            secrets: Vec::new(),
            sts: None,
            upstream: Vec::new(),
            within: None,
            h2: None,
        }
    }

    /// An HTTP/2 request (h2c, prior knowledge) of exactly these header fields, in order and
    /// as written (names are not lower-cased): `GET`, `http`, `:authority: gateway.test` and
    /// `path`, then `headers`. Any pseudo-header in `headers` replaces the default one.
    fn h2(name: impl Into<String>, path: &str, headers: &[(&str, &[u8])], expect: Expect) -> Row {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for (pseudo, value) in [
            (":method", &b"GET"[..]),
            (":scheme", b"http"),
            (":authority", b"gateway.test"),
            (":path", path.as_bytes()),
        ] {
            let value = headers
                .iter()
                .find(|(h, _)| *h == pseudo)
                .map_or(value, |(_, v)| *v);
            fields.push((pseudo.as_bytes().to_vec(), value.to_vec()));
        }
        fields.extend(
            headers
                .iter()
                .filter(|(h, _)| !h.starts_with(':'))
                .map(|(h, v)| (h.as_bytes().to_vec(), v.to_vec())),
        );
        let mut row = Row::raw(name, Vec::new(), expect);
        row.h2 = Some(fields);
        row
    }

    /// `GET path` with these extra header lines (name, raw value), and `Host: gateway.test`
    /// unless they have their own.
    fn get(name: impl Into<String>, path: &str, headers: &[(&str, &[u8])], expect: Expect) -> Row {
        let mut bytes = format!("GET {path} HTTP/1.1\r\n").into_bytes();
        if !headers.iter().any(|(h, _)| h.eq_ignore_ascii_case("host")) {
            bytes.extend_from_slice(b"Host: gateway.test\r\n");
        }
        for (header, value) in headers {
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(value);
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"Connection: close\r\n\r\n");
        Row::raw(name, bytes, expect)
    }

    /// `GET path` with one `Authorization` header of the raw `value`.
    fn auth(name: impl Into<String>, path: &str, value: &[u8], expect: Expect) -> Row {
        Row::get(name, path, &[("Authorization", value)], expect)
    }

    /// Records the caller token this row carries, for the leak and subject checks.
    fn carrying(mut self, token: &str) -> Row {
        self.token = token.to_string();
        self
    }

    /// Records another token-like value this row carries, for the leak checks.
    fn hiding(mut self, secret: &str) -> Row {
        self.secrets.push(secret.to_string());
        self
    }

    /// Scripts the STS's answer while this row is sent.
    fn scripted(mut self, behavior: Behavior) -> Row {
        self.sts = Some(behavior);
        self
    }

    /// The upstream must receive exactly this request target.
    fn arriving_as(mut self, target: &str) -> Row {
        self.upstream.push(Check::Target(target.to_string()));
        self
    }

    /// The upstream must receive this header with this value.
    fn upstream_has(mut self, name: &'static str, value: &str) -> Row {
        self.upstream.push(Check::Header(name, value.to_string()));
        self
    }

    /// The upstream must receive this header, with some value.
    fn upstream_has_some(mut self, name: &'static str) -> Row {
        self.upstream.push(Check::Present(name));
        self
    }

    /// The upstream must not receive this header.
    fn upstream_lacks(mut self, name: &'static str) -> Row {
        self.upstream.push(Check::Absent(name));
        self
    }

    /// The answer must come within `limit`.
    fn within(mut self, limit: Duration) -> Row {
        self.within = Some(limit);
        self
    }
}

/// What came back on the socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The JSON body's `error`, if the body is txgate's JSON error object.
    fn error_code(&self) -> Option<String> {
        serde_json::from_str::<Value>(&self.body)
            .ok()?
            .get("error")?
            .as_str()
            .map(str::to_string)
    }
}

/// Writes `request` and reads one HTTP/1.1 answer; `None` when the peer closed without one.
async fn send_raw(addr: SocketAddr, request: &[u8]) -> Option<Answer> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        // A refusing server may close before reading all of a large request; what it answered
        // is still readable.
        let _ = stream.write_all(request).await;
        let mut received = Vec::new();
        let _ = stream.read_to_end(&mut received).await;
        parse_answer(&received)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the gateway answers or closes within 10 s")
}

/// Sends one HTTP/2 request with prior knowledge, written frame by frame (RFC 9113 §3.4, §6):
/// the preface, empty SETTINGS, and `fields` HPACK-encoded in one HEADERS frame that ends the
/// stream. Reads until stream 1 ends. `None` when the gateway refused the stream or the
/// connection (RST_STREAM, GOAWAY) or closed without an answer. Raw frames, because an HTTP/2
/// client library refuses to send the malformed requests these rows are made of.
async fn send_h2(addr: SocketAddr, fields: &[(Vec<u8>, Vec<u8>)]) -> Option<Answer> {
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    const DATA: u8 = 0;
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const PING: u8 = 6;
    const GOAWAY: u8 = 7;
    const CONTINUATION: u8 = 9;
    const END_STREAM: u8 = 0x1;
    const ACK: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let block = loona_hpack::Encoder::new()
            .encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        // A block over the default maximum frame size (16 KiB) continues in CONTINUATION
        // frames (§6.10); the last fragment ends the header block.
        let fragments: Vec<&[u8]> = block.chunks(16_384).collect();
        for (i, fragment) in fragments.iter().enumerate() {
            let last = if i + 1 == fragments.len() {
                END_HEADERS
            } else {
                0
            };
            out.extend(if i == 0 {
                frame(HEADERS, last | END_STREAM, 1, fragment)
            } else {
                frame(CONTINUATION, last, 1, fragment)
            });
        }
        stream.write_all(&out).await.ok()?;
        let mut decoder = loona_hpack::Decoder::new();
        let mut headers: Option<Vec<(String, String)>> = None;
        let mut body = Vec::new();
        loop {
            let mut head = [0u8; 9];
            if stream.read_exact(&mut head).await.is_err() {
                break;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if stream.read_exact(&mut payload).await.is_err() {
                break;
            }
            match (kind, id) {
                (SETTINGS, 0) if flags & ACK == 0 => {
                    stream.write_all(&frame(SETTINGS, ACK, 0, &[])).await.ok()?;
                }
                (PING, 0) if flags & ACK == 0 => {
                    stream
                        .write_all(&frame(PING, ACK, 0, &payload))
                        .await
                        .ok()?;
                }
                (HEADERS, 1) => {
                    // Neither padded nor prioritised: the gateway sends neither.
                    let decoded = decoder.decode(&payload).ok()?;
                    let fields = decoded.into_iter().map(|(n, v)| {
                        (
                            String::from_utf8_lossy(&n).into_owned(),
                            String::from_utf8_lossy(&v).into_owned(),
                        )
                    });
                    headers.get_or_insert_with(Vec::new).extend(fields);
                    if flags & END_STREAM != 0 {
                        break;
                    }
                }
                (DATA, 1) => {
                    body.extend_from_slice(&payload);
                    if flags & END_STREAM != 0 {
                        break;
                    }
                }
                (RST_STREAM, 1) | (GOAWAY, 0) => break,
                _ => {}
            }
        }
        let headers = headers?;
        let status = headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.parse().ok())?;
        Some(Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the gateway answers or closes within 10 s")
}

/// Parses a response that ended with the connection (`Connection: close` was sent), honouring
/// `Content-Length` when present.
fn parse_answer(bytes: &[u8]) -> Option<Answer> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = &bytes[end + 4..];
    if let Some(length) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body = &body[..length.min(body.len())];
    }
    Some(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

/// Everything the gateway talks to: the STS, the plain upstream, an HTTPS upstream with a
/// certificate from a CA the gateway is never told about, and the issuer of callers' JWTs.
struct Parts {
    sts: TestSts,
    upstream: RecordingUpstream,
    tls: TlsUpstream,
    issuer: TestIssuer,
    _untrusted_ca: TestCa,
}

impl Parts {
    async fn start() -> Parts {
        let sts = TestSts::start(Behavior::issue()).await;
        let upstream = RecordingUpstream::start().await;
        let issuer = TestIssuer::start().await;
        let untrusted_ca = TestCa::new("untrusted");
        let tls = TlsUpstream::start_named(TLS_UPSTREAM, &untrusted_ca, &["localhost"], None).await;
        Parts {
            sts,
            upstream,
            tls,
            issuer,
            _untrusted_ca: untrusted_ca,
        }
    }

    /// The one configuration of the hostile gateway, in process and as a binary, with more
    /// keys in its `server:` map. Two token services at the same STS: `corp`, and `strict`,
    /// which validates callers' JWTs first (one validator shared by `/jwt`, `/orders` and
    /// `/machine`).
    fn yaml_with(&self, server: &[(&str, Value)]) -> String {
        let up = self.upstream.url();
        let https = format!("https://localhost:{}", self.tls.addr.port());
        let for_api = |exchange: Exchange, name: &str| {
            exchange.audience(&format!("https://{name}.example.com"))
        };
        let impersonation =
            |service: &str, name: &str| for_api(Exchange::impersonation(service), name);
        let strict = TokenService::new("strict", self.sts.token_endpoint())
            .inbound(Inbound::jwt_of(&self.issuer).audiences(&[AUDIENCE]));
        let config = GatewayYaml::new()
            .max_token_bytes(MAX_TOKEN_BYTES)
            .grace_period(Duration::ZERO)
            .shutdown_timeout(Duration::from_secs(1))
            .token_service(TokenService::at(&self.sts))
            .token_service(strict)
            .route(
                Route::new("open", "/open", &up)
                    .headers(&[], &[("X-Gateway", GATEWAY_HEADER)])
                    .exchange(impersonation("corp", "open")),
            )
            .route(Route::new("jwt", "/jwt", &up).exchange(impersonation("strict", "jwt")))
            .route(Route::new("public", "/public", &up))
            .route(
                Route::new("orders", "/orders", &up)
                    .exchange(impersonation("strict", "orders").scope("orders:read")),
            )
            .route(
                Route::new("delegation", "/delegation", &up).exchange(
                    for_api(Exchange::delegation("corp"), "delegation")
                        .actor(Actor::own_token("gateway:act")),
                ),
            )
            .route(Route::new("machine", "/machine", &up).exchange(
                for_api(Exchange::client_credentials("strict"), "machine").scope("machine:read"),
            ))
            .route(Route::new("anonymous", "/anonymous", &up).exchange(
                for_api(Exchange::client_credentials("corp"), "anonymous").caller("anonymous"),
            ))
            .route(
                Route::new("tls-bare", "/tls/bare", &https).exchange(impersonation("corp", "tls")),
            )
            .route(
                Route::new("tls-peers", "/tls/peers", Upstream::peers(&[&https]))
                    .exchange(impersonation("corp", "tls")),
            )
            .route(
                Route::new(
                    "tls-unverified",
                    "/tls/unverified",
                    Upstream::peers(&[&https]).tls(json!({ "verify": false })),
                )
                .exchange(impersonation("corp", "tls")),
            );
        server
            .iter()
            .fold(config, |config, (key, value)| config.server(key, value))
            .to_yaml()
    }

    /// A JWT the validating routes accept, for a fresh subject.
    fn jwt(&self) -> String {
        self.issuer
            .sign(json!({"sub": caller_token(), "aud": AUDIENCE}))
    }
}

/// The gateway under attack: in process, or the binary.
enum Gateway {
    /// Held so that it keeps serving while the harness lives.
    InProcess {
        _running: RunningGateway,
    },
    Binary(TxgateProcess),
}

/// The gateway under attack and everything it talks to.
struct Harness {
    parts: Parts,
    addr: SocketAddr,
    gateway: Gateway,
    /// The caller tokens the harness sent itself (warm-up, the good request after each row).
    sent: Mutex<Vec<String>>,
}

impl Harness {
    /// The gateway in process.
    async fn start() -> Harness {
        Harness::start_with(&[]).await
    }

    /// The gateway in process, with more keys in its `server:` map (see [`Parts::yaml_with`]).
    async fn start_with(server: &[(&str, Value)]) -> Harness {
        count_panics();
        let parts = Parts::start().await;
        let gw = gateway(&parts.yaml_with(server)).await;
        let harness = Harness {
            addr: gw.proxy_addrs[0],
            parts,
            gateway: Gateway::InProcess { _running: gw },
            sent: Mutex::new(Vec::new()),
        };
        harness.warm().await;
        harness
    }

    /// The `txgate` binary on the same configuration, logging at trace level in `format`.
    /// Ready once it has logged its listen address and that it loaded the JWKS (the debug
    /// event `JWKS refreshed`; the configuration has one validator).
    async fn start_binary(format: &'static str, server: &[(&str, Value)]) -> Harness {
        count_panics();
        let parts = Parts::start().await;
        let binary = TxgateProcess::run(&parts.yaml_with(server))
            .log_level("trace")
            .log_format(format)
            .start()
            .await;
        binary
            .wait_for_stderr("load the JWKS", BINARY_WITHIN, |stderr| {
                stderr.contains("JWKS refreshed").then_some(())
            })
            .await;
        let addr = binary.proxy;
        let harness = Harness {
            parts,
            addr,
            gateway: Gateway::Binary(binary),
            sent: Mutex::new(Vec::new()),
        };
        harness.warm().await;
        harness
    }

    /// Obtains the tokens every caller shares, so that rows find them cached: the delegation
    /// actor's and the two client-credentials routes' machine tokens.
    async fn warm(&self) {
        let (deleg, machine) = (caller_token(), self.parts.jwt());
        self.sent
            .lock()
            .unwrap()
            .extend([deleg.clone(), machine.clone()]);
        let requests = [
            Row::auth(
                "/delegation",
                "/delegation/warm",
                &bearer(&deleg),
                FORWARDED,
            ),
            Row::auth("/machine", "/machine/warm", &bearer(&machine), FORWARDED),
            Row::get("/anonymous", "/anonymous/warm", &[], FORWARDED),
        ];
        for row in requests {
            let answer = send_raw(self.addr, &row.bytes).await;
            assert_eq!(
                answer.as_ref().map(|a| a.status),
                Some(200),
                "warming {}: {answer:?}",
                row.name
            );
        }
    }

    /// Runs every row and then checks the leak property over everything the upstreams saw.
    /// Returns one line per violated expectation; empty means the table passed.
    async fn run(&self, rows: Vec<Row>) -> Vec<String> {
        let mut failures = Vec::new();
        for row in &rows {
            failures.extend(
                self.check(row)
                    .await
                    .into_iter()
                    .map(|f| format!("{}: {f}", row.name)),
            );
        }
        let seen = self.seen_everywhere();
        for row in &rows {
            for secret in std::iter::once(&row.token)
                .chain(&row.secrets)
                .filter(|s| !s.is_empty())
            {
                if let Some(leak) = seen.iter().find(|s| carries(s, secret)) {
                    failures.push(format!(
                        "{}: a caller's token reached the upstream: {}",
                        row.name,
                        leak.everything().trim_end().replace('\n', " | ")
                    ));
                }
            }
        }
        let panics = PANICS.load(Ordering::SeqCst);
        if panics > 0 {
            failures.push(format!("{panics} panic(s) in the process (see stderr)"));
        }
        failures
    }

    /// Every request either upstream received so far.
    fn seen_everywhere(&self) -> Vec<Seen> {
        let mut seen = self.parts.upstream.seen();
        seen.extend(self.parts.tls.seen().into_iter().map(|t| t.request));
        seen
    }

    async fn check(&self, row: &Row) -> Vec<String> {
        let mut failures = Vec::new();
        let sts = &self.parts.sts;
        if let Some(behavior) = &row.sts {
            sts.set(behavior.clone());
        }
        let calls_before = sts.calls();
        let plain_before = self.parts.upstream.seen().len();
        let tls_before = self.parts.tls.seen().len();
        let started = Instant::now();
        let answer = match &row.h2 {
            Some(fields) => send_h2(self.addr, fields).await,
            None => send_raw(self.addr, &row.bytes).await,
        };
        let took = started.elapsed();
        if row.sts.is_some() {
            sts.set(Behavior::issue());
        }
        // The observed answer, for `cargo test --test hostile -- --nocapture`.
        match &answer {
            Some(a) => println!(
                "{:<60} {} {:>9.1?} {}",
                row.name,
                a.status,
                took,
                a.header("www-authenticate").unwrap_or("-")
            ),
            None => println!("{:<60} closed without an answer {took:.1?}", row.name),
        }
        let calls = sts.calls() - calls_before;
        // Each request the upstreams received for this row, with the body its upstream answers.
        let forwarded: Vec<(Seen, &str)> = self.parts.upstream.seen()[plain_before..]
            .iter()
            .map(|s| (s.clone(), "upstream ok"))
            .chain(
                self.parts.tls.seen()[tls_before..]
                    .iter()
                    .map(|t| (t.request.clone(), TLS_UPSTREAM)),
            )
            .collect();

        let refused_calls = match (row.expect, &answer) {
            (Expect::Forwarded(sent), Some(a)) => {
                failures.extend(self.forwarded_mismatch(row, sent, a, calls, &forwarded));
                None
            }
            (Expect::Refused(status, code, challenge), Some(a)) => {
                failures.extend(refusal_mismatch(a, status, code, challenge));
                Some(0)
            }
            (Expect::RefusedAfterExchange(status, code, challenge), Some(a)) => {
                failures.extend(refusal_mismatch(a, status, code, challenge));
                Some(1)
            }
            (Expect::ParserRefused, Some(a)) if a.status == 400 => Some(0),
            (Expect::ParserRefused | Expect::ParserOrRefused(..), None) => Some(0),
            (Expect::ParserOrRefused(..), Some(a))
                if a.status == 400 && a.error_code().is_none() =>
            {
                Some(0)
            }
            (Expect::ParserOrRefused(status, code, challenge), Some(a)) => {
                failures.extend(refusal_mismatch(a, status, code, challenge));
                Some(0)
            }
            (Expect::NotForwarded, Some(a))
                if (400..500).contains(&a.status) && a.error_code().is_some() =>
            {
                Some(0)
            }
            (Expect::GrpcRefused(code, challenge, calls), Some(a)) => {
                failures.extend(grpc_refusal_mismatch(a, code, challenge));
                Some(calls)
            }
            (_, answer) => {
                failures.push(format!("expected {:?}, got {answer:?}", row.expect));
                None
            }
        };
        if let Some(expected) = refused_calls {
            if calls != expected {
                failures.push(format!(
                    "the STS was called {calls} time(s), expected {expected}"
                ));
            }
            if let Some((first, _)) = forwarded.first() {
                failures.push(format!("forwarded upstream: {first:?}"));
            }
        }
        if let Some(limit) = row.within
            && took > limit
        {
            failures.push(format!("answered after {took:?}, over {limit:?}"));
        }

        // Whatever the row did, the gateway still serves a good caller.
        let good = caller_token();
        self.sent.lock().unwrap().push(good.clone());
        let after = Row::auth("good", "/open/after", &bearer(&good), FORWARDED);
        match send_raw(self.addr, &after.bytes).await {
            Some(a) if a.status == 200 => {}
            other => failures.push(format!("a good request afterwards got {other:?}")),
        }
        failures
    }

    /// How a forwarded row differs from what it expects.
    fn forwarded_mismatch(
        &self,
        row: &Row,
        sent: Sent,
        a: &Answer,
        calls: usize,
        forwarded: &[(Seen, &str)],
    ) -> Vec<String> {
        let [(one, body)] = forwarded else {
            return vec![format!(
                "expected one upstream request, got {} (answer {a:?})",
                forwarded.len()
            )];
        };
        let mut failures = Vec::new();
        if a.status != 200 || a.body != *body {
            failures.push(format!("expected 200 from the upstream, got {a:?}"));
        }
        let expected_calls = match sent {
            Sent::Exchanged | Sent::Scripted(_) => 1,
            Sent::Machine | Sent::Nothing => 0,
        };
        if calls != expected_calls {
            failures.push(format!(
                "expected {expected_calls} STS call(s), got {calls}"
            ));
        }
        let minted_for = one.bearer().and_then(|t| self.parts.sts.subject_of(t));
        let authorization_ok = match sent {
            Sent::Exchanged => minted_for.as_deref() == Some(row.token.as_str()),
            // Client credentials: minted with no subject token at all.
            Sent::Machine => minted_for.as_deref() == Some(""),
            Sent::Nothing => one.header("authorization").is_none(),
            Sent::Scripted(token) => one.bearer() == Some(token),
        };
        if !authorization_ok {
            failures.push(format!(
                "upstream got Authorization {:?}, expected {sent:?}",
                one.header("authorization")
            ));
        }
        for check in &row.upstream {
            let ok = match check {
                Check::Target(target) => one.uri == *target,
                Check::Header(name, value) => one.header(name) == Some(value.as_str()),
                Check::Present(name) => one.header(name).is_some_and(|v| !v.is_empty()),
                Check::Absent(name) => one.header(name).is_none(),
            };
            if !ok {
                failures.push(format!("upstream check {check:?} failed: got {one:?}"));
            }
        }
        failures
    }
}

/// Whether the upstream request `seen` holds `secret` anywhere, also once percent-decoded (the
/// upstream would decode its path and query).
fn carries(seen: &Seen, secret: &str) -> bool {
    let decoded = percent_encoding::percent_decode_str(&seen.uri).decode_utf8_lossy();
    seen.everything().contains(secret) || decoded.contains(secret)
}

/// How a refusal differs from the README: status, JSON body, challenge, `Cache-Control`.
fn refusal_mismatch(a: &Answer, status: u16, code: &str, challenge: Challenge) -> Vec<String> {
    if a.status != status {
        return vec![format!(
            "status {} instead of {status} ({})",
            a.status, a.body
        )];
    }
    let mut failures = Vec::new();
    let body: Option<Value> = serde_json::from_str(&a.body).ok();
    let error = body
        .as_ref()
        .and_then(|b| b.get("error"))
        .and_then(Value::as_str);
    if error != Some(code) {
        failures.push(format!(
            "body error {error:?} instead of {code:?}: {}",
            a.body
        ));
    }
    if body
        .as_ref()
        .and_then(|b| b.get("error_description"))
        .and_then(Value::as_str)
        .is_none()
    {
        failures.push(format!("body without error_description: {}", a.body));
    }
    if a.header("cache-control") != Some("no-store") {
        failures.push(format!("Cache-Control {:?}", a.header("cache-control")));
    }
    let found = a.header("www-authenticate");
    let ok = match challenge {
        Challenge::Absent => found.is_none(),
        Challenge::Bare => found == Some("Bearer realm=\"txgate\""),
        Challenge::WithError => found
            .is_some_and(|c| c.starts_with(&format!("Bearer realm=\"txgate\", error=\"{code}\""))),
        Challenge::Unspecified => true,
    };
    if !ok {
        failures.push(format!(
            "WWW-Authenticate {found:?}, expected {challenge:?}"
        ));
    }
    failures
}

/// How a gRPC answer differs from a refusal with `grpc-status: code` and `challenge`.
fn grpc_refusal_mismatch(a: &Answer, code: &str, challenge: Challenge) -> Vec<String> {
    let mut failures = Vec::new();
    if a.status != 200 || !a.body.is_empty() {
        failures.push(format!("expected a Trailers-Only 200, got {a:?}"));
    }
    if a.header("content-type") != Some("application/grpc") {
        failures.push(format!("content-type {:?}", a.header("content-type")));
    }
    if a.header("grpc-status") != Some(code) {
        failures.push(format!(
            "grpc-status {:?} instead of {code}",
            a.header("grpc-status")
        ));
    }
    if a.header("grpc-message").is_none_or(str::is_empty) {
        failures.push("no grpc-message".into());
    }
    let www = a.header("www-authenticate");
    let challenge_ok = match challenge {
        Challenge::Absent => www.is_none(),
        Challenge::Bare => www == Some("Bearer realm=\"txgate\""),
        Challenge::WithError => www.is_some_and(|w| w.contains("error=")),
        Challenge::Unspecified => true,
    };
    if !challenge_ok {
        failures.push(format!("WWW-Authenticate {www:?}, expected {challenge:?}"));
    }
    failures
}

fn assert_table(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} row check(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

const BAD_REQUEST: Expect = Expect::Refused(400, "invalid_request", Challenge::WithError);
/// 400 `invalid_request` for the request itself rather than its credential.
const INVALID_REQUEST: Expect = Expect::Refused(400, "invalid_request", Challenge::Unspecified);
const INVALID_TOKEN: Expect = Expect::Refused(401, "invalid_token", Challenge::WithError);
const NO_CREDENTIAL: Expect = Expect::Refused(401, "unauthorized", Challenge::Bare);
const NOT_FOUND: Expect = Expect::Refused(404, "not_found", Challenge::Absent);

fn bearer(token: &str) -> Vec<u8> {
    format!("Bearer {token}").into_bytes()
}

/// A caller token of exactly `len` b64token characters, unique per call.
fn token_of_len(len: usize) -> String {
    let mut token = caller_token().replace('-', "");
    while token.len() < len {
        token.push('x');
    }
    token.truncate(len);
    token
}

/// Every byte of `s` as `%XX`, upper-case hex.
fn encode_upper(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// Every byte of `s` as `%xx`, lower-case hex.
fn encode_lower(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02x}")).collect()
}
/// Every way an `Authorization` header (and a token beside it) can be wrong, on `/open`.
fn malformed_credential_rows() -> Vec<Row> {
    let mut t: Vec<String> = (0..32).map(|_| caller_token()).collect();
    // Tokens whose full text a row forwards, so the STS must have been sent exactly this.
    t[28].push_str("==");
    t[29].push_str("-._~+/AZaz09");
    let over = token_of_len(MAX_TOKEN_BYTES + 1);
    let large = token_of_len(16 * 1024);
    let huge = token_of_len(40 * 1024);
    let rows = vec![
        Row::get("no Authorization", "/open", &[], NO_CREDENTIAL),
        Row::auth(
            "Basic scheme",
            "/open",
            format!("Basic {}", t[0]).as_bytes(),
            NO_CREDENTIAL,
        )
        .carrying(&t[0]),
        Row::auth(
            "DPoP scheme",
            "/open",
            format!("DPoP {}", t[1]).as_bytes(),
            NO_CREDENTIAL,
        )
        .carrying(&t[1]),
        Row::auth(
            "Digest scheme",
            "/open",
            b"Digest username=\"a\", nonce=\"b\"",
            NO_CREDENTIAL,
        ),
        Row::auth(
            "scheme glued to the token",
            "/open",
            format!("Bearer{}", t[2]).as_bytes(),
            NO_CREDENTIAL,
        )
        .carrying(&t[2]),
        Row::auth(
            "tab instead of space after the scheme",
            "/open",
            format!("Bearer\t{}", t[3]).as_bytes(),
            NO_CREDENTIAL,
        )
        .carrying(&t[3]),
        Row::auth("empty Authorization value", "/open", b"", NO_CREDENTIAL),
        Row::auth("scheme only", "/open", b"Bearer", BAD_REQUEST),
        Row::auth(
            "scheme and spaces only",
            "/open",
            b"Bearer    ",
            BAD_REQUEST,
        ),
        Row::get(
            "two Authorization headers",
            "/open",
            &[
                ("Authorization", &bearer(&t[4])),
                ("Authorization", &bearer(&t[5])),
            ],
            BAD_REQUEST,
        )
        .carrying(&t[4]),
        Row::get(
            "two headers, second one another scheme",
            "/open",
            &[
                ("Authorization", &bearer(&t[6])),
                ("authorization", b"Basic eDp5"),
            ],
            BAD_REQUEST,
        )
        .carrying(&t[6]),
        Row::auth(
            "two tokens in one header",
            "/open",
            format!("Bearer {}, Bearer {}", t[7], t[8]).as_bytes(),
            BAD_REQUEST,
        )
        .carrying(&t[7]),
        Row::auth(
            "token with an inner space",
            "/open",
            format!("Bearer {} {}", t[9], t[10]).as_bytes(),
            BAD_REQUEST,
        )
        .carrying(&t[9]),
        Row::auth(
            "token with an inner tab",
            "/open",
            format!("Bearer {}\t{}", t[11], t[12]).as_bytes(),
            BAD_REQUEST,
        )
        .carrying(&t[11]),
        Row::auth(
            "= inside the token",
            "/open",
            format!("Bearer {}=x", t[13]).as_bytes(),
            BAD_REQUEST,
        )
        .carrying(&t[13]),
        Row::auth("padding only", "/open", b"Bearer ====", BAD_REQUEST),
        Row::auth(
            "quoted token",
            "/open",
            format!("Bearer \"{}\"", t[14]).as_bytes(),
            BAD_REQUEST,
        )
        .carrying(&t[14]),
        Row::auth(
            "auth-param syntax",
            "/open",
            format!("Bearer token=\"{}\"", t[15]).as_bytes(),
            BAD_REQUEST,
        )
        .carrying(&t[15]),
        Row::auth(
            "percent-encoded token",
            "/open",
            format!("Bearer {}%2Fx", t[16]).as_bytes(),
            BAD_REQUEST,
        )
        .carrying(&t[16]),
        Row::auth(
            "semicolon in the token",
            "/open",
            format!("Bearer {};x", t[17]).as_bytes(),
            BAD_REQUEST,
        )
        .carrying(&t[17]),
        Row::auth(
            "UTF-8 in the token",
            "/open",
            format!("Bearer {}é", t[18]).as_bytes(),
            BAD_REQUEST,
        )
        .carrying(&t[18]),
        Row::auth(
            "Latin-1 byte in the token",
            "/open",
            &[bearer(&t[19]), vec![0xff]].concat(),
            BAD_REQUEST,
        )
        .carrying(&t[19]),
        Row::auth(
            "token one byte over max_token_bytes",
            "/open",
            &bearer(&over),
            INVALID_TOKEN,
        )
        .carrying(&over),
        Row::auth("token 16 KiB", "/open", &bearer(&large), INVALID_TOKEN).carrying(&large),
        Row::auth(
            "header block over max_request_header_bytes",
            "/open",
            &bearer(&huge),
            Expect::Refused(431, "request_header_fields_too_large", Challenge::Absent),
        )
        .carrying(&huge),
        Row::auth(
            "no route",
            "/nowhere",
            &bearer(&t[20]),
            Expect::Refused(404, "not_found", Challenge::Absent),
        )
        .carrying(&t[20]),
        Row::auth(
            "caller's token in the path",
            &format!("/open/{}", t[21]),
            &bearer(&t[21]),
            BAD_REQUEST,
        )
        .carrying(&t[21]),
        Row::get(
            "token only in the query",
            &format!("/open?access_token={}", t[22]),
            &[],
            NO_CREDENTIAL,
        )
        .carrying(&t[22]),
        // The forwarded query loses the access_token parameter and keeps the rest.
        Row::get(
            "same token in the query and the header",
            &format!("/open?x=1&access_token={}", t[23]),
            &[("Authorization", &bearer(&t[23]))],
            FORWARDED,
        )
        .carrying(&t[23])
        .arriving_as("/open?x=1"),
        // RFC 9110 §11.1: auth schemes are case-insensitive, so these are accepted.
        Row::auth(
            "lowercase bearer",
            "/open",
            format!("bearer {}", t[24]).as_bytes(),
            FORWARDED,
        )
        .carrying(&t[24]),
        Row::auth(
            "uppercase BEARER",
            "/open",
            format!("BEARER {}", t[25]).as_bytes(),
            FORWARDED,
        )
        .carrying(&t[25]),
        Row::auth(
            "mixed-case bEaReR",
            "/open",
            format!("bEaReR {}", t[26]).as_bytes(),
            FORWARDED,
        )
        .carrying(&t[26]),
        Row::auth(
            "several spaces after the scheme",
            "/open",
            format!("Bearer   {}", t[27]).as_bytes(),
            FORWARDED,
        )
        .carrying(&t[27]),
        Row::auth(
            "trailing = padding",
            "/open",
            format!("Bearer {}", t[28]).as_bytes(),
            FORWARDED,
        )
        .carrying(&t[28]),
        Row::auth(
            "every b64token character",
            "/open",
            format!("Bearer {}", t[29]).as_bytes(),
            FORWARDED,
        )
        .carrying(&t[29]),
    ];
    let mut rows = rows;
    let exact = token_of_len(MAX_TOKEN_BYTES);
    rows.push(
        Row::auth(
            "token of exactly max_token_bytes",
            "/open",
            &bearer(&exact),
            FORWARDED,
        )
        .carrying(&exact),
    );
    let more: Vec<String> = (0..6).map(|_| caller_token()).collect();
    let many_headers: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| (format!("X-Filler-{i}"), b"1".to_vec()))
        .collect();
    let mut filler: Vec<(&str, &[u8])> = many_headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let with_token = bearer(&more[3]);
    filler.push(("Authorization", &with_token));
    rows.extend([
        Row::get(
            "token under another query parameter",
            &format!("/open?token={}", more[0]),
            &[("Authorization", &bearer(&more[0]))],
            BAD_REQUEST,
        )
        .carrying(&more[0]),
        // The leak guard drops every other header that carries the caller's token.
        Row::get(
            "token copied into a cookie and a custom header",
            "/open",
            &[
                ("Authorization", &bearer(&more[1])),
                ("Cookie", format!("session={}", more[1]).as_bytes()),
                ("X-Api-Key", more[1].as_bytes()),
            ],
            FORWARDED,
        )
        .carrying(&more[1])
        .upstream_lacks("cookie")
        .upstream_lacks("x-api-key"),
        // The host is part of the URL: a token there is refused like one in the path.
        Row::get(
            "token as the Host header",
            "/open",
            &[
                ("Authorization", &bearer(&more[2])),
                ("Host", more[2].as_bytes()),
            ],
            BAD_REQUEST,
        )
        .carrying(&more[2]),
        Row::get("300 header fields", "/open", &filler, Expect::ParserRefused).carrying(&more[3]),
    ]);
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_credentials_get_their_documented_answer() {
    let h = Harness::start().await;
    assert_table(h.run(malformed_credential_rows()).await);
}

/// Bytes no HTTP/1.1 parser should let through.
fn parser_refused_rows() -> Vec<Row> {
    let t: Vec<String> = (0..8).map(|_| caller_token()).collect();
    let with = |token: &str, bytes: &[u8]| [bearer(token), bytes.to_vec(), b"x".to_vec()].concat();
    let rows = vec![
        Row::auth("NUL in the token", "/open", &with(&t[0], b"\0"), Expect::ParserRefused).carrying(&t[0]),
        Row::auth("SOH control byte in the token", "/open", &with(&t[1], b"\x01"), Expect::ParserRefused).carrying(&t[1]),
        Row::auth("DEL in the token", "/open", &with(&t[2], b"\x7f"), Expect::ParserRefused).carrying(&t[2]),
        Row::auth("bare CR in the token", "/open", &with(&t[3], b"\r"), Expect::ParserRefused).carrying(&t[3]),
        // RFC 9112 §2.2 lets a recipient take a bare LF as a line end: the caller split its own
        // header block, and the token before the LF is forwarded as any other.
        Row::auth("bare LF ending the header", "/open", &[bearer(&t[4]), b"\nX-Other: 1".to_vec()].concat(), FORWARDED).carrying(&t[4]),
        Row::raw(
            "obsolete line folding (RFC 9112 §5.2)",
            format!("GET /open HTTP/1.1\r\nHost: gateway.test\r\nAuthorization: Bearer\r\n {}\r\nConnection: close\r\n\r\n", t[5]).into_bytes(),
            Expect::ParserRefused,
        )
        .carrying(&t[5]),
        Row::raw(
            "space before the colon (RFC 9112 §5.1)",
            format!("GET /open HTTP/1.1\r\nHost: gateway.test\r\nAuthorization : Bearer {}\r\nConnection: close\r\n\r\n", t[6]).into_bytes(),
            Expect::ParserRefused,
        )
        .carrying(&t[6]),
        Row::raw(
            "non-ASCII header name",
            format!("GET /open HTTP/1.1\r\nHost: gateway.test\r\nAuthorizatión: Bearer {}\r\nConnection: close\r\n\r\n", t[7]).into_bytes(),
            Expect::ParserRefused,
        )
        .carrying(&t[7]),
        Row::raw(
            "garbage request line",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(),
            Expect::ParserRefused,
        ),
    ];
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_the_http_parser_refuses_never_reach_txgate() {
    let h = Harness::start().await;
    assert_table(h.run(parser_refused_rows()).await);
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWS from a header, claims and raw signature, exactly as given.
fn compact(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(signature)
    )
}

/// A key the attacker holds: any JWT it signs must fail, whatever its header says.
struct Attacker {
    key: jsonwebtoken::EncodingKey,
}

impl Attacker {
    fn new() -> Attacker {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let der = pair.to_pkcs8v1().unwrap();
        Attacker {
            key: jsonwebtoken::EncodingKey::from_ec_der(der.as_ref()),
        }
    }

    fn sign(&self, header: jsonwebtoken::Header, claims: &Value) -> String {
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

/// Re-signs `token`'s header and claims with HMAC-SHA256 under `secret`.
fn hs256(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}

/// JWTs forged, tampered with or issued for someone else, on `/jwt`: each fails the local
/// validation, so the STS never sees it.
async fn forged_jwt_rows(parts: &Parts) -> Vec<Row> {
    let issuer = &parts.issuer;
    let now = now();
    let claims = |extra: Value| {
        let mut c = json!({"sub": caller_token(), "aud": AUDIENCE});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let good = issuer.sign(claims(json!({})));
    let kid = jsonwebtoken::decode_header(&good).unwrap().kid.unwrap();
    let jwks = common::client()
        .get(&issuer.jwks_uri)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let jwk: Value = serde_json::from_str::<Value>(&jwks).unwrap()["keys"][0].clone();
    let point = [
        vec![4u8],
        URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap(),
        URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap(),
    ]
    .concat();
    let full = |iss_claims: Value| {
        let mut c = iss_claims;
        c["iss"] = issuer.issuer.clone().into();
        c["exp"] = (now + 600).into();
        c
    };
    let attacker = Attacker::new();
    let es256 = |kid: Option<&str>| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = kid.map(str::to_string);
        header
    };
    let tamper = |token: &str, part: usize, with: &str| {
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        parts[part] = with.to_string();
        parts.join(".")
    };
    let payload_of = |token: &str| token.split('.').nth(1).unwrap().to_string();
    let header_of = |token: &str| token.split('.').next().unwrap().to_string();

    let mut flipped = good.clone();
    let last = flipped.pop().unwrap();
    flipped.push(if last == 'A' { 'B' } else { 'A' });
    let other_sub = issuer.sign(claims(json!({})));
    let rows: Vec<(&'static str, String, Expect)> = vec![
        (
            "alg none, empty signature",
            compact(
                &json!({"alg": "none", "typ": "JWT"}),
                &full(claims(json!({}))),
                b"",
            ),
            INVALID_TOKEN,
        ),
        (
            "alg NONE, empty signature",
            compact(&json!({"alg": "NONE"}), &full(claims(json!({}))), b""),
            INVALID_TOKEN,
        ),
        (
            "alg none keeping the issuer's kid and signature",
            tamper(
                &good,
                0,
                &b64(json!({"alg": "none", "kid": kid}).to_string().as_bytes()),
            ),
            INVALID_TOKEN,
        ),
        (
            "HS256 keyed with the JWKS document",
            hs256(
                &json!({"alg": "HS256", "kid": kid}),
                &full(claims(json!({}))),
                jwks.as_bytes(),
            ),
            INVALID_TOKEN,
        ),
        (
            "HS256 keyed with the JWK",
            hs256(
                &json!({"alg": "HS256", "kid": kid}),
                &full(claims(json!({}))),
                jwk.to_string().as_bytes(),
            ),
            INVALID_TOKEN,
        ),
        (
            "HS256 keyed with the public point",
            hs256(
                &json!({"alg": "HS256", "kid": kid}),
                &full(claims(json!({}))),
                &point,
            ),
            INVALID_TOKEN,
        ),
        (
            "HS384 keyed with the public point",
            hs256(
                &json!({"alg": "HS384", "kid": kid}),
                &full(claims(json!({}))),
                &point,
            ),
            INVALID_TOKEN,
        ),
        (
            "expired an hour ago",
            issuer.sign(claims(json!({"exp": now - 3600}))),
            INVALID_TOKEN,
        ),
        (
            "nbf an hour ahead",
            issuer.sign(claims(json!({"nbf": now + 3600}))),
            INVALID_TOKEN,
        ),
        (
            "iat an hour ahead",
            issuer.sign(claims(json!({"iat": now + 3600}))),
            INVALID_TOKEN,
        ),
        (
            "exp as a string",
            issuer.sign(claims(json!({"exp": (now + 600).to_string()}))),
            INVALID_TOKEN,
        ),
        (
            "exp negative",
            issuer.sign(claims(json!({"exp": -1}))),
            INVALID_TOKEN,
        ),
        (
            "wrong iss",
            issuer.sign(claims(json!({"iss": "https://evil.example"}))),
            INVALID_TOKEN,
        ),
        (
            "iss as an array holding the right issuer",
            issuer.sign(claims(json!({"iss": [issuer.issuer.clone()]}))),
            INVALID_TOKEN,
        ),
        (
            "iss with a trailing slash",
            issuer.sign(claims(json!({"iss": format!("{}/", issuer.issuer)}))),
            INVALID_TOKEN,
        ),
        (
            "wrong aud",
            issuer.sign(claims(json!({"aud": "someone-else"}))),
            INVALID_TOKEN,
        ),
        (
            "aud missing",
            issuer.sign(json!({"sub": caller_token()})),
            INVALID_TOKEN,
        ),
        (
            "aud a prefix of the expected one",
            issuer.sign(claims(json!({"aud": "gateway"}))),
            INVALID_TOKEN,
        ),
        (
            "unknown kid, attacker's key",
            attacker.sign(es256(Some("attacker-key-1")), &full(claims(json!({})))),
            INVALID_TOKEN,
        ),
        (
            "issuer's kid, attacker's key",
            attacker.sign(es256(Some(&kid)), &full(claims(json!({})))),
            INVALID_TOKEN,
        ),
        (
            "no kid, attacker's key",
            attacker.sign(es256(None), &full(claims(json!({})))),
            INVALID_TOKEN,
        ),
        (
            "jku pointing at the attacker's keys",
            {
                let mut header = es256(Some("attacker-key-2"));
                header.jku = Some("http://127.0.0.1:1/attacker-jwks".into());
                attacker.sign(header, &full(claims(json!({}))))
            },
            INVALID_TOKEN,
        ),
        (
            "embedded jwk header",
            {
                let mut header = json!({"alg": "ES256", "kid": kid});
                header["jwk"] = jwk.clone();
                compact(&header, &full(claims(json!({}))), b"not-a-signature")
            },
            INVALID_TOKEN,
        ),
        (
            "crit header",
            tamper(
                &good,
                0,
                &b64(json!({"alg": "ES256", "kid": kid, "crit": ["exp"]})
                    .to_string()
                    .as_bytes()),
            ),
            INVALID_TOKEN,
        ),
        (
            "RS256 header on an ES256 signature",
            tamper(
                &good,
                0,
                &b64(json!({"alg": "RS256", "kid": kid}).to_string().as_bytes()),
            ),
            INVALID_TOKEN,
        ),
        (
            "ES384, not in the allow-list",
            tamper(
                &good,
                0,
                &b64(json!({"alg": "ES384", "kid": kid}).to_string().as_bytes()),
            ),
            INVALID_TOKEN,
        ),
        (
            "unknown alg",
            tamper(
                &good,
                0,
                &b64(json!({"alg": "XX999", "kid": kid}).to_string().as_bytes()),
            ),
            INVALID_TOKEN,
        ),
        (
            "header is a JSON array",
            tamper(&good, 0, &b64(b"[\"ES256\"]")),
            INVALID_TOKEN,
        ),
        (
            "header is b64token but not base64url",
            tamper(&good, 0, "ab+/cd"),
            INVALID_TOKEN,
        ),
        (
            "header without alg",
            tamper(&good, 0, &b64(json!({"kid": kid}).to_string().as_bytes())),
            INVALID_TOKEN,
        ),
        (
            "payload swapped for another subject's",
            tamper(&good, 1, &payload_of(&other_sub)),
            INVALID_TOKEN,
        ),
        (
            "payload not JSON",
            tamper(&good, 1, &b64(b"hello")),
            INVALID_TOKEN,
        ),
        ("last signature character flipped", flipped, INVALID_TOKEN),
        ("signature removed", tamper(&good, 2, ""), INVALID_TOKEN),
        (
            "signature of zeros",
            tamper(&good, 2, &b64(&[0u8; 64])),
            INVALID_TOKEN,
        ),
        (
            "header re-encoded with padding",
            tamper(&good, 0, &format!("{}==", header_of(&good))),
            BAD_REQUEST,
        ),
        ("four parts", format!("{good}.extra"), INVALID_TOKEN),
        (
            "five parts (JWE shape)",
            format!("{good}.a.b"),
            INVALID_TOKEN,
        ),
        ("opaque token on a JWT route", caller_token(), INVALID_TOKEN),
        (
            "valid within the exp leeway",
            issuer.sign(claims(json!({"exp": now - 5}))),
            FORWARDED,
        ),
        ("valid", good.clone(), FORWARDED),
    ];
    rows.into_iter()
        .map(|(name, token, expect)| {
            Row::auth(name, "/jwt/x", &bearer(&token), expect).carrying(&token)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_foreign_jwts_fail_locally_without_an_sts_call() {
    let h = Harness::start().await;
    let rows = forged_jwt_rows(&h.parts).await;
    assert_table(h.run(rows).await);
}

/// Percent-encoding every character of the token must not hide it from the URL check: the
/// upstream would decode the path or the query and hold the caller's token. (Regression: the
/// check once compared only the raw, still-encoded target and forwarded these.)
fn percent_encoded_rows() -> Vec<Row> {
    let (a, b) = (caller_token(), caller_token());
    vec![
        Row::auth(
            "token percent-encoded in the path",
            &format!("/open/{}", encode_upper(&a)),
            &bearer(&a),
            BAD_REQUEST,
        )
        .carrying(&a),
        Row::auth(
            "token percent-encoded in the query",
            &format!("/open?q={}", encode_upper(&b)),
            &bearer(&b),
            BAD_REQUEST,
        )
        .carrying(&b),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_tokens_in_the_url_are_refused() {
    let h = Harness::start().await;
    assert_table(h.run(percent_encoded_rows()).await);
}

/// A 200 token response carrying `access_token`, as a scripted STS answer.
fn sts_reply(access_token: &str, expires_in: Value) -> Behavior {
    Behavior::Reply {
        status: 200,
        body:
            json!({"access_token": access_token, "token_type": "Bearer", "expires_in": expires_in})
                .to_string(),
        headers: vec![("content-type".into(), "application/json".into())],
    }
}

/// An STS answering with an absurd `expires_in` (a finite number of seconds no `Duration`
/// holds) must not take the request down: the README clamps `expires_in` to a day, so the
/// token is forwarded. (Regression: found by the `sts_response` fuzz target, the parser once
/// panicked in `Duration::from_secs_f64` before clamping and the caller got no answer.)
fn huge_expires_in_rows() -> Vec<Row> {
    [json!(1e20), json!("1e308")]
        .into_iter()
        .map(|expires_in| {
            let token = caller_token();
            Row::auth(
                format!("expires_in {expires_in}"),
                "/open",
                &bearer(&token),
                Expect::Forwarded(Sent::Scripted("huge-expiry")),
            )
            .carrying(&token)
            .scripted(sts_reply("huge-expiry", expires_in))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_expires_in_from_the_sts_is_clamped_not_fatal() {
    let h = Harness::start().await;
    assert_table(h.run(huge_expires_in_rows()).await);
}

// ---------------------------------------------------------------------------------------------
// Issue 11: attacks on the request path, the URL rules, the leak guard, the STS's answer and
// the upstream's certificate.

/// Paths that climb out of `/public` (`mode: none`) into `/orders` (validated JWTs), or are
/// written with encoded unreserved characters, dot segments or repeated slashes. The gateway
/// normalises the path first (RFC 3986 §2.3 decoding of unreserved characters, §5.2.4 dot
/// segment removal, merged slashes), routes on the result and forwards the result, query
/// untouched. Encoded slashes and backslashes, and paths above the root, are refused.
fn path_rows(parts: &Parts) -> Vec<Row> {
    let mut rows = Vec::new();
    for path in [
        "/public/../orders/7",
        "/public/%2e%2e/orders/7",
        "/public/.%2E/orders/7",
        "/public/%2E%2e/orders/7",
        "//orders///7",
        "/orders/./7",
    ] {
        // Into the orders route, with its rules: no token, no entry.
        rows.push(Row::get(
            format!("{path} without a token"),
            path,
            &[],
            NO_CREDENTIAL,
        ));
        let jwt = parts.jwt();
        rows.push(
            Row::auth(
                format!("{path} with a valid token"),
                path,
                &bearer(&jwt),
                FORWARDED,
            )
            .carrying(&jwt)
            .arriving_as("/orders/7"),
        );
    }
    // (sent, what the upstream receives): only unreserved characters are decoded; an encoded
    // `?` or `#` stays encoded, or the upstream would read a query or fragment into the path.
    for (path, normalised) in [
        (
            "/public/../orders/7?next=/public/../x&q=%2e%2e&s=a//b%2F%5C",
            "/orders/7?next=/public/../x&q=%2e%2e&s=a//b%2F%5C",
        ),
        ("/orders/%37", "/orders/7"),
        ("/%6Frders/%7Eitem%2Dx%5F%2E%41", "/orders/~item-x_.A"),
        ("/orders/7/8/..", "/orders/7/"),
        ("/orders/7/.", "/orders/7/"),
        ("/orders/a%20b", "/orders/a%20b"),
        ("/orders/7%3Fadmin=1", "/orders/7%3Fadmin=1"),
        ("/orders/7%23x", "/orders/7%23x"),
    ] {
        rows.push(to_orders(parts, path, normalised));
    }
    for (path, normalised) in [
        ("/public/./info", "/public/info"),
        ("/public/%69nfo", "/public/info"),
        ("/public//info", "/public/info"),
    ] {
        rows.push(
            Row::get(
                format!("{path} forwarded as {normalised}"),
                path,
                &[],
                Expect::Forwarded(Sent::Nothing),
            )
            .arriving_as(normalised),
        );
    }
    // Refused whatever the token: encoded slashes and backslashes, and climbing above the root.
    for path in [
        "/orders/7%2F..%2F..%2Fadmin",
        "/orders/7%2f..",
        "/public/..%2Forders/7",
        "/public/%2e%2e%2forders/7",
        "/orders%5C7",
        "/orders/7%5c..%5cadmin",
        "/..",
        "/../orders/7",
        "/a/../../orders/7",
        "/%2e%2e/orders/7",
        "/orders/../../orders/7",
    ] {
        rows.push(refused_path(parts, path));
    }
    // A raw backslash: the HTTP parser may refuse it before txgate does.
    for path in ["/orders\\7", "/public\\..\\orders\\7"] {
        let jwt = parts.jwt();
        rows.push(
            Row::auth(
                format!("{path} refused"),
                path,
                &bearer(&jwt),
                Expect::ParserOrRefused(400, "invalid_request", Challenge::Unspecified),
            )
            .carrying(&jwt),
        );
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalised_before_routing_and_forwarded_normalised() {
    let h = Harness::start().await;
    let rows = path_rows(&h.parts);
    assert_table(h.run(rows).await);
}

/// `path` with a valid token, forwarded to the orders route as `normalised`.
fn to_orders(parts: &Parts, path: &str, normalised: &str) -> Row {
    let jwt = parts.jwt();
    Row::auth(
        format!("{path} forwarded as {normalised}"),
        path,
        &bearer(&jwt),
        FORWARDED,
    )
    .carrying(&jwt)
    .arriving_as(normalised)
}

/// `path` with a valid token, refused before routing.
fn refused_path(parts: &Parts, path: &str) -> Row {
    let jwt = parts.jwt();
    Row::auth(
        format!("{path} refused"),
        path,
        &bearer(&jwt),
        INVALID_REQUEST,
    )
    .carrying(&jwt)
}

/// The `server:` keys that change path handling, each set on a gateway of its own (so these
/// rows run in process only), with rows that tell its effect from the defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_settings_change_what_is_refused_and_forwarded() {
    type Rows = fn(&Parts) -> Vec<Row>;
    let settings: [(Vec<(&str, Value)>, Rows); 5] = [
        (
            vec![
                ("normalize_path", json!(true)),
                ("merge_slashes", json!(true)),
                ("path_with_escaped_slashes_action", json!("reject_request")),
            ],
            |parts| {
                vec![
                    refused_path(parts, "/orders/a%2Fb"),
                    to_orders(parts, "//orders/./7", "/orders/7"),
                ]
            },
        ),
        (
            vec![("path_with_escaped_slashes_action", json!("keep_unchanged"))],
            |parts| {
                vec![
                    to_orders(parts, "/orders/a%2Fb", "/orders/a%2Fb"),
                    to_orders(parts, "/orders/a%5Cb", "/orders/a%5Cb"),
                ]
            },
        ),
        (
            // Unescaped before routing: the route is chosen on the path the upstream reads.
            vec![(
                "path_with_escaped_slashes_action",
                json!("unescape_and_forward"),
            )],
            |parts| {
                vec![
                    to_orders(parts, "/orders/a%2Fb", "/orders/a/b"),
                    to_orders(parts, "/public/..%2Forders/7", "/orders/7"),
                    Row::get(
                        "/public/..%2Forders/7 without a token",
                        "/public/..%2Forders/7",
                        &[],
                        NO_CREDENTIAL,
                    ),
                ]
            },
        ),
        (vec![("merge_slashes", json!(false))], |parts| {
            vec![to_orders(parts, "/orders//7", "/orders//7")]
        }),
        (vec![("normalize_path", json!(false))], |parts| {
            vec![
                to_orders(parts, "/orders/./7", "/orders/./7"),
                to_orders(parts, "/orders/%37", "/orders/%37"),
            ]
        }),
    ];
    let mut failures = Vec::new();
    for (server, rows) in settings {
        let h = Harness::start_with(&server).await;
        let rows = rows(&h.parts);
        let label = server
            .iter()
            .map(|(key, value)| format!("{key}: {value}"))
            .collect::<Vec<_>>()
            .join(", ");
        failures.extend(
            h.run(rows)
                .await
                .into_iter()
                .map(|f| format!("{label}: {f}")),
        );
    }
    assert_table(failures);
}

/// One kind of route. A token-in-URL rule once held on four kinds out of five, so the URL
/// table runs on every kind.
struct Kind {
    name: &'static str,
    prefix: &'static str,
    /// What the upstream gets when a request is forwarded.
    sent: Sent,
    /// The route validates callers' JWTs: a good bearer is one from the test issuer.
    validates: bool,
    /// A request without any credential is forwarded too.
    anonymous: bool,
}

const KINDS: [Kind; 5] = [
    Kind {
        name: "impersonation",
        prefix: "/open",
        sent: Sent::Exchanged,
        validates: false,
        anonymous: false,
    },
    Kind {
        name: "delegation",
        prefix: "/delegation",
        sent: Sent::Exchanged,
        validates: false,
        anonymous: false,
    },
    Kind {
        name: "client_credentials",
        prefix: "/machine",
        sent: Sent::Machine,
        validates: true,
        anonymous: false,
    },
    Kind {
        name: "client_credentials, caller anonymous",
        prefix: "/anonymous",
        sent: Sent::Machine,
        validates: false,
        anonymous: true,
    },
    Kind {
        name: "none",
        prefix: "/public",
        sent: Sent::Nothing,
        validates: false,
        anonymous: true,
    },
];

/// Where a row puts the caller's token: the text written for it.
type Placement = fn(&str) -> String;

/// The caller's bearer token anywhere in the URL or the Host header is refused on route
/// `kind`, raw or percent-encoded; `access_token` parameters are removed before forwarding
/// (more than four: refused).
fn url_token_rows(parts: &Parts, kind: &Kind) -> Vec<Row> {
    let good = || {
        if kind.validates {
            parts.jwt()
        } else {
            caller_token()
        }
    };
    let (p, k) = (kind.prefix, kind.name);
    let forwarded = Expect::Forwarded(kind.sent);
    let mut rows = Vec::new();
    // What follows the route's prefix in the request target.
    let after_prefix: [(&str, Placement); 4] = [
        ("raw in the path", |t| format!("/{t}")),
        ("percent-encoded in the path", |t| {
            format!("/{}", encode_upper(t))
        }),
        ("raw in the query", |t| format!("?q={t}")),
        ("percent-encoded in the query", |t| {
            format!("?q={}", encode_lower(t))
        }),
    ];
    for (what, suffix) in after_prefix {
        let t = good();
        rows.push(
            Row::auth(
                format!("{k}: token {what}"),
                &format!("{p}{}", suffix(&t)),
                &bearer(&t),
                INVALID_REQUEST,
            )
            .carrying(&t),
        );
    }
    let params = |n: usize| -> (String, Vec<String>) {
        let values: Vec<String> = (0..n).map(|_| caller_token()).collect();
        let query = values
            .iter()
            .map(|v| format!("access_token={v}&"))
            .collect::<String>();
        (query, values)
    };
    for n in [1, 4] {
        let (query, values) = params(n);
        let t = good();
        let mut row = Row::auth(
            format!("{k}: {n} access_token parameter(s) removed"),
            &format!("{p}/items?{query}page=2"),
            &bearer(&t),
            forwarded,
        )
        .carrying(&t)
        .arriving_as(&format!("{p}/items?page=2"));
        for v in &values {
            row = row.hiding(v);
        }
        rows.push(row);
    }
    let (query, values) = params(1);
    let mut row = Row::get(
        format!("{k}: access_token parameter without Authorization"),
        &format!("{p}/items?{query}page=2"),
        &[],
        if kind.anonymous {
            forwarded
        } else {
            NO_CREDENTIAL
        },
    )
    .hiding(&values[0]);
    if kind.anonymous {
        row = row.arriving_as(&format!("{p}/items?page=2"));
    }
    rows.push(row);
    let (query, values) = params(5);
    let t = good();
    let mut row = Row::auth(
        format!("{k}: 5 access_token parameters"),
        &format!("{p}/items?{query}page=2"),
        &bearer(&t),
        INVALID_REQUEST,
    )
    .carrying(&t);
    for v in &values {
        row = row.hiding(v);
    }
    rows.push(row);
    let hosts: [(&str, Placement); 2] = [
        ("as the Host header", |t| t.to_string()),
        ("inside the Host header", |t| {
            format!("{t}.gateway.test:8080")
        }),
    ];
    for (what, host) in hosts {
        let t = good();
        rows.push(
            Row::get(
                format!("{k}: token {what}"),
                &format!("{p}/items"),
                &[
                    ("Authorization", &bearer(&t)),
                    ("Host", host(&t).as_bytes()),
                ],
                INVALID_REQUEST,
            )
            .carrying(&t),
        );
    }
    // An extension method is any token of the grammar (RFC 9110 §9.1): a caller token fits.
    let t = good();
    rows.push(
        Row::raw(
            format!("{k}: token as the method"),
            format!(
                "{t} {p}/items HTTP/1.1\r\nHost: gateway.test\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n"
            )
            .into_bytes(),
            INVALID_REQUEST,
        )
        .carrying(&t),
    );
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_tokens_in_the_url_are_refused_on_every_kind_of_route() {
    let h = Harness::start().await;
    let rows = KINDS
        .iter()
        .flat_map(|kind| url_token_rows(&h.parts, kind))
        .collect();
    assert_table(h.run(rows).await);
}

/// `X-Request-Id` the leak-guard rows send, and one of the values they try to steer with.
const REQUEST_ID: &str = "req-5d1c2a9b7e40";

/// `access_token` values chosen to match what the gateway itself sends upstream must not make
/// the leak guard drop it; values under 8 bytes are no tokens at all. A caller's header that
/// carries its bearer token is still dropped. And the most `access_token` parameters a request
/// line can hold are refused quickly.
fn leak_guard_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for value in [
        "http",
        "https",
        "127.0.0.1",
        REQUEST_ID,
        "Bearer",
        "Bearer xt-",
        "xt-",
        GATEWAY_HEADER,
        "edge-gateway",
        "gateway",
    ] {
        let t = caller_token();
        let query: String = url::form_urlencoded::byte_serialize(value.as_bytes()).collect();
        rows.push(
            Row::get(
                format!("access_token={value:?} steers nothing"),
                &format!("/open/c?access_token={query}"),
                &[
                    ("Authorization", &bearer(&t)),
                    ("X-Request-Id", REQUEST_ID.as_bytes()),
                ],
                FORWARDED,
            )
            .carrying(&t)
            .arriving_as("/open/c")
            .upstream_has("x-forwarded-proto", "http")
            .upstream_has("x-forwarded-for", "127.0.0.1")
            .upstream_has_some("x-request-id")
            .upstream_has("x-forwarded-host", "gateway.test")
            .upstream_has("x-gateway", GATEWAY_HEADER),
        );
    }
    let short = format!("{:07x}", rand::random::<u32>() >> 4);
    // Letters past `f`, so that no request id or digest in a log or header matches by chance.
    let eight: String = (0..8)
        .map(|_| char::from(b'g' + rand::random::<u8>() % 20))
        .collect();
    let t: Vec<String> = (0..4).map(|_| caller_token()).collect();
    rows.extend([
        Row::get(
            "bearer token in X-Forwarded-Access-Token and a cookie",
            "/open/c",
            &[
                ("Authorization", &bearer(&t[0])),
                ("X-Forwarded-Access-Token", t[0].as_bytes()),
                ("Cookie", format!("t={}", t[0]).as_bytes()),
            ],
            FORWARDED,
        )
        .carrying(&t[0])
        .upstream_lacks("x-forwarded-access-token")
        .upstream_lacks("cookie"),
        Row::get(
            "a 7-byte access_token is no token",
            &format!("/open/c?access_token={short}"),
            &[
                ("Authorization", &bearer(&t[1])),
                ("X-Trace", format!("span-{short}").as_bytes()),
            ],
            FORWARDED,
        )
        .carrying(&t[1])
        .arriving_as("/open/c")
        .upstream_has("x-trace", &format!("span-{short}")),
        Row::get(
            "an 8-byte access_token is guarded",
            &format!("/open/c?access_token={eight}"),
            &[
                ("Authorization", &bearer(&t[2])),
                ("X-Trace", format!("span-{eight}").as_bytes()),
            ],
            FORWARDED,
        )
        .carrying(&t[2])
        .hiding(&eight)
        .arriving_as("/open/c")
        .upstream_lacks("x-trace"),
    ]);
    // As many parameters as the longest request target holds; the same length without
    // access_token is forwarded whole, and one byte more is not read at all.
    let filled = |name: &str| -> String {
        let mut target = String::from("/open/c?");
        for i in 0.. {
            let param = format!("{name}=v{i:08}&");
            if target.len() + param.len() > MAX_REQUEST_TARGET {
                break;
            }
            target.push_str(&param);
        }
        target
    };
    let many = filled("access_token");
    let plain = filled("not_a_token_");
    let mut over = plain.clone();
    over.push_str(&"x".repeat(MAX_REQUEST_TARGET + 1 - over.len()));
    rows.extend([
        Row::auth(
            format!(
                "{} access_token parameters",
                many.matches("access_token=").count()
            ),
            &many,
            &bearer(&t[3]),
            INVALID_REQUEST,
        )
        .carrying(&t[3])
        .within(Duration::from_secs(1)),
        {
            let t = caller_token();
            Row::auth(
                format!("request target of {} bytes", plain.len()),
                &plain,
                &bearer(&t),
                FORWARDED,
            )
            .carrying(&t)
            .arriving_as(&plain)
        },
        {
            let t = caller_token();
            Row::auth(
                format!("request target of {} bytes", over.len()),
                &over,
                &bearer(&t),
                Expect::ParserRefused,
            )
            .carrying(&t)
        },
    ]);
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leak_guard_cannot_be_steered_by_query_values() {
    let h = Harness::start().await;
    assert_table(h.run(leak_guard_rows()).await);
}

/// An STS that hands the subject token back, alone or inside a longer string, would make the
/// gateway forward the caller's own token: 502, and the upstream gets nothing.
fn echoed_subject_rows(parts: &Parts) -> Vec<Row> {
    let bad_gateway = Expect::RefusedAfterExchange(502, "bad_gateway", Challenge::Absent);
    let echo = |name: &str, path: &str, token: String, answer: String| {
        Row::auth(name, path, &bearer(&token), bad_gateway)
            .carrying(&token)
            .scripted(sts_reply(&answer, json!(300)))
    };
    let t: Vec<String> = (0..5).map(|_| caller_token()).collect();
    let jwt = parts.jwt();
    vec![
        echo(
            "the subject token itself",
            "/open",
            t[0].clone(),
            t[0].clone(),
        ),
        echo(
            "the subject token inside a longer one",
            "/open",
            t[1].clone(),
            format!("x{}y", t[1]),
        ),
        echo(
            "the subject token with a suffix",
            "/open",
            t[2].clone(),
            format!("{}.sig", t[2]),
        ),
        echo(
            "delegation: the subject token itself",
            "/delegation",
            t[3].clone(),
            t[3].clone(),
        ),
        echo(
            "delegation: the subject token inside a longer one",
            "/delegation",
            t[4].clone(),
            format!("Ab{}", t[4]),
        ),
        echo(
            "validated JWT: the subject token itself",
            "/jwt",
            jwt.clone(),
            jwt.clone(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sts_answer_holding_the_subject_token_is_a_bad_gateway() {
    let h = Harness::start().await;
    let rows = echoed_subject_rows(&h.parts);
    assert_table(h.run(rows).await);
}

/// An HTTPS upstream whose certificate the gateway does not trust, however the upstream is
/// written, gets no request: 502. `verify: false` (first, so a pooled unverified connection
/// would show) is the contrast.
fn untrusted_upstream_rows() -> Vec<Row> {
    let refused = Expect::RefusedAfterExchange(502, "bad_gateway", Challenge::Absent);
    let t: Vec<String> = (0..3).map(|_| caller_token()).collect();
    vec![
        Row::auth(
            "https peer with tls: { verify: false }",
            "/tls/unverified/x",
            &bearer(&t[0]),
            FORWARDED,
        )
        .carrying(&t[0]),
        Row::auth(
            "bare https URL, untrusted certificate",
            "/tls/bare/x",
            &bearer(&t[1]),
            refused,
        )
        .carrying(&t[1]),
        Row::auth(
            "https peer list without tls, untrusted certificate",
            "/tls/peers/x",
            &bearer(&t[2]),
            refused,
        )
        .carrying(&t[2]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_https_upstream_gets_no_request() {
    let h = Harness::start().await;
    let mut failures = h.run(untrusted_upstream_rows()).await;
    // The 502s came from refusing the certificate, not from failing to connect.
    if !h
        .parts
        .tls
        .failed_handshakes_reach(2, Duration::from_secs(5))
        .await
    {
        failures.push(format!(
            "the upstream saw {} failed handshake(s), expected 2",
            h.parts.tls.failed_handshakes()
        ));
    }
    assert_table(failures);
}

/// Unrouted requests with tokens in the path, for the log test: a 404 path is logged too.
fn unrouted_rows(parts: &Parts) -> Vec<Row> {
    let t: Vec<String> = (0..4).map(|_| caller_token()).collect();
    let (jwt, other_jwt) = (parts.jwt(), parts.jwt());
    vec![
        Row::auth(
            "no route: token in the path and the header",
            &format!("/nowhere/{}", t[0]),
            &bearer(&t[0]),
            Expect::NotForwarded,
        )
        .carrying(&t[0]),
        // An opaque string in a path is only known to be a token when the request presents it
        // as one (in `Authorization` or as `access_token`); JWTs are known by their shape.
        Row::get(
            "no route: token in the path and as access_token, no Authorization",
            &format!("/nowhere/{}?access_token={}", t[1], t[1]),
            &[],
            NOT_FOUND,
        )
        .carrying(&t[1]),
        Row::auth(
            "no route: token percent-encoded in the path and in the header",
            &format!("/nowhere/{}", encode_upper(&t[2])),
            &bearer(&t[2]),
            Expect::NotForwarded,
        )
        .carrying(&t[2]),
        Row::get(
            "no route: token percent-encoded in the path and as access_token, no Authorization",
            &format!("/nowhere/{}?access_token={}", encode_lower(&t[3]), t[3]),
            &[],
            NOT_FOUND,
        )
        .carrying(&t[3]),
        Row::get(
            "no route: JWT in a path segment, no Authorization",
            &format!("/nowhere/{jwt}/x"),
            &[],
            NOT_FOUND,
        )
        .carrying(&jwt),
        Row::get(
            "no route: JWT as the whole path, no Authorization",
            &format!("/{other_jwt}"),
            &[],
            NOT_FOUND,
        )
        .carrying(&other_jwt),
    ]
}

// ---------------------------------------------------------------------------------------------
// Every row again, through the binary, and nothing of any token in its output.

/// Every table of this file, in order.
/// HTTP/2 requests (h2c) with the caller's token where HTTP/2 can put it: in other metadata,
/// in a pseudo-header, next to a second host; and the requests RFC 9113 §8.2 calls malformed
/// (connection-specific headers, upper-case names), which the HTTP/2 layer refuses before
/// txgate reads them.
fn h2_rows() -> Vec<Row> {
    let t: Vec<String> = (0..17).map(|_| caller_token()).collect();
    let grpc = ("content-type", &b"application/grpc"[..]);
    let rows = vec![
        Row::h2(
            "h2: a plain request",
            "/open/a",
            &[("authorization", &bearer(&t[0]))],
            FORWARDED,
        )
        .carrying(&t[0])
        .arriving_as("/open/a")
        .upstream_has("host", "gateway.test"),
        Row::h2(
            "h2: the token copied into other metadata",
            "/open/b",
            &[
                ("authorization", &bearer(&t[1])),
                grpc,
                ("x-forwarded-access-token", t[1].as_bytes()),
                ("x-user", format!("{{\"token\":\"{}\"}}", t[1]).as_bytes()),
            ],
            FORWARDED,
        )
        .carrying(&t[1])
        .upstream_lacks("x-forwarded-access-token")
        .upstream_lacks("x-user"),
        Row::h2(
            "h2: the token in :path",
            &format!("/open/{}", t[2]),
            &[("authorization", &bearer(&t[2]))],
            INVALID_REQUEST,
        )
        .carrying(&t[2]),
        Row::h2(
            "h2: the token percent-encoded in :path",
            &format!("/open/{}", encode_upper(&t[3])),
            &[("authorization", &bearer(&t[3]))],
            INVALID_REQUEST,
        )
        .carrying(&t[3]),
        Row::h2(
            "h2: the token in the query of :path",
            &format!("/open/c?q={}", t[4]),
            &[("authorization", &bearer(&t[4]))],
            INVALID_REQUEST,
        )
        .carrying(&t[4]),
        Row::h2(
            "h2: the token in :authority",
            "/open/d",
            &[
                ("authorization", &bearer(&t[5])),
                (":authority", format!("{}.gateway.test", t[5]).as_bytes()),
            ],
            INVALID_REQUEST,
        )
        .carrying(&t[5]),
        // pingora refuses these itself (its own 400) before txgate's host rule would.
        Row::h2(
            "h2: :authority and host name different hosts",
            "/open/e",
            &[("authorization", &bearer(&t[6])), ("host", b"other.test")],
            Expect::ParserOrRefused(400, "invalid_request", Challenge::Unspecified),
        )
        .carrying(&t[6]),
        Row::h2(
            "h2: :authority and host agree",
            "/open/f",
            &[("authorization", &bearer(&t[7])), ("host", b"gateway.test")],
            FORWARDED,
        )
        .carrying(&t[7])
        .upstream_has("host", "gateway.test"),
        Row::h2(
            "h2: two authorization fields",
            "/open/g",
            &[
                ("authorization", &bearer(&t[8])),
                ("authorization", &bearer(&t[9])),
            ],
            BAD_REQUEST,
        )
        .carrying(&t[8])
        .hiding(&t[9]),
        Row::h2(
            "h2: te: trailers (allowed, not passed to an HTTP/1.1 upstream)",
            "/open/h",
            &[
                ("authorization", &bearer(&t[10])),
                grpc,
                ("te", b"trailers"),
            ],
            FORWARDED,
        )
        .carrying(&t[10])
        .upstream_lacks("te"),
        Row::h2(
            "h2: no token on a public route",
            "/public/i",
            &[],
            Expect::Forwarded(Sent::Nothing),
        ),
        Row::h2("h2: no token", "/open/j", &[], NO_CREDENTIAL),
        Row::h2(
            "h2: the token as :method",
            "/open/k",
            &[
                ("authorization", &bearer(&t[16])),
                (":method", t[16].as_bytes()),
            ],
            INVALID_REQUEST,
        )
        .carrying(&t[16]),
        Row::h2(
            "h2: a gRPC call without a token",
            "/open/echo.Echo/Say",
            &[grpc],
            Expect::GrpcRefused("16", Challenge::Bare, 0),
        ),
        Row::h2(
            "h2: a gRPC call with the token in :path",
            &format!("/open/echo.Echo/{}", t[11]),
            &[("authorization", &bearer(&t[11])), grpc],
            Expect::GrpcRefused("3", Challenge::WithError, 0),
        )
        .carrying(&t[11]),
        Row::h2(
            "h2: a gRPC call with two authorization fields",
            "/open/echo.Echo/Say",
            &[
                ("authorization", &bearer(&t[12])),
                ("authorization", &bearer(&t[13])),
                ("content-type", b"application/grpc+proto"),
            ],
            Expect::GrpcRefused("3", Challenge::WithError, 0),
        )
        .carrying(&t[12])
        .hiding(&t[13]),
        Row::h2(
            "h2: a gRPC call with headers over the configured limit",
            "/open/echo.Echo/Say",
            &[grpc, ("x-padding", "p".repeat(40 * 1024).as_bytes())],
            Expect::GrpcRefused("8", Challenge::Absent, 0),
        ),
        Row::h2(
            "h2: a gRPC call to no route",
            "/nowhere.Service/Call",
            &[("authorization", &bearer(&t[14])), grpc],
            Expect::GrpcRefused("12", Challenge::Absent, 0),
        )
        .carrying(&t[14]),
        Row::h2(
            "h2: a gRPC call the STS cannot serve",
            "/open/echo.Echo/Say",
            &[("authorization", &bearer(&t[15])), grpc],
            // One call and the token service's one retry (`retries: 1`).
            Expect::GrpcRefused("14", Challenge::Absent, 2),
        )
        .carrying(&t[15])
        .scripted(Behavior::error(503, "temporarily_unavailable")),
    ];
    let mut rows = rows;
    // Malformed in HTTP/2, each carrying a token: never forwarded, whatever answers.
    for (i, (what, name, value)) in [
        ("a connection header", "connection", &b"keep-alive"[..]),
        ("a keep-alive header", "keep-alive", b"timeout=5"),
        (
            "a transfer-encoding header",
            "transfer-encoding",
            b"chunked",
        ),
        ("an upgrade header", "upgrade", b"websocket"),
        ("a proxy-connection header", "proxy-connection", b"close"),
        ("te other than trailers", "te", b"gzip"),
        ("an upper-case header name", "X-Token", b"copy"),
        ("an upper-case authorization", "Authorization", b"Bearer x"),
    ]
    .into_iter()
    .enumerate()
    {
        let token = caller_token();
        rows.push(
            Row::h2(
                format!("h2: {what} (RFC 9113 §8.2)"),
                &format!("/open/m{i}"),
                &[("authorization", &bearer(&token)), (name, value)],
                Expect::ParserRefused,
            )
            .carrying(&token),
        );
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_requests_keep_every_rule() {
    let h = Harness::start_with(&[("h2c", json!(true))]).await;
    let rows = h2_rows();
    assert_table(h.run(rows).await);
}

async fn every_row(parts: &Parts) -> Vec<Row> {
    let mut rows = malformed_credential_rows();
    rows.extend(parser_refused_rows());
    rows.extend(forged_jwt_rows(parts).await);
    rows.extend(percent_encoded_rows());
    rows.extend(huge_expires_in_rows());
    rows.extend(path_rows(parts));
    rows.extend(KINDS.iter().flat_map(|kind| url_token_rows(parts, kind)));
    rows.extend(leak_guard_rows());
    rows.extend(echoed_subject_rows(parts));
    rows.extend(untrusted_upstream_rows());
    rows.extend(unrouted_rows(parts));
    rows
}

/// The forms of a token that must not appear in a log: raw, every byte `%XX` in upper- and in
/// lower-case hex, and for a JWT its signature alone. Forms under 8 bytes are left out.
fn forms(token: &str) -> Vec<(&'static str, String)> {
    let mut forms = vec![
        ("raw", token.to_string()),
        ("percent-encoded", encode_upper(token)),
        ("percent-encoded (lower-case hex)", encode_lower(token)),
    ];
    if let [_, _, signature] = token.split('.').collect::<Vec<_>>()[..] {
        forms.push(("JWT signature", signature.to_string()));
    }
    forms.retain(|(_, form)| form.len() >= 8);
    forms
}

/// Where `text` shows any of `secrets` (whose request, the secret) in any of its [`forms`]: one
/// line per secret and form, with the first place it appears. One pass over the text, looking
/// up every 8-byte window among the forms' first 8 bytes.
fn shown(text: &str, secrets: &[(String, String)]) -> Vec<String> {
    let mut by_start: HashMap<[u8; 8], Vec<(usize, &'static str, String)>> = HashMap::new();
    for (i, (_, secret)) in secrets.iter().enumerate() {
        for (form, value) in forms(secret) {
            let start: [u8; 8] = value.as_bytes()[..8].try_into().unwrap();
            by_start.entry(start).or_default().push((i, form, value));
        }
    }
    let bytes = text.as_bytes();
    let mut found = BTreeMap::new();
    for at in 0..bytes.len().saturating_sub(7) {
        let start: [u8; 8] = bytes[at..at + 8].try_into().unwrap();
        let Some(candidates) = by_start.get(&start) else {
            continue;
        };
        for (i, form, value) in candidates {
            if bytes[at..].starts_with(value.as_bytes()) {
                found.entry((*i, *form)).or_insert(at);
            }
        }
    }
    found
        .into_iter()
        .map(|((i, form), at)| {
            let line_start = text[..at].rfind('\n').map_or(0, |n| n + 1);
            let line_end = text[at..].find('\n').map_or(text.len(), |n| at + n);
            let line = &text[line_start..line_end];
            let excerpt: String = line.chars().take(400).collect();
            format!("{}: the token {form} in: {excerpt}", secrets[i].0)
        })
        .collect()
}

/// Runs every table through the binary logging at trace level in `format`, stops it with
/// SIGTERM, and returns the failed row checks and each token its output shows.
async fn replay_through_the_binary(format: &'static str) -> Vec<String> {
    let h = Harness::start_binary(format, &[]).await;
    let rows = every_row(&h.parts).await;
    replay(h, rows).await
}

/// Runs `rows` through the binary `h` started, then stops it and searches its output.
async fn replay(mut h: Harness, rows: Vec<Row>) -> Vec<String> {
    let mut secrets: Vec<(String, String)> = rows
        .iter()
        .flat_map(|row| {
            std::iter::once(&row.token)
                .chain(&row.secrets)
                .filter(|s| !s.is_empty())
                .map(|s| (row.name.clone(), s.clone()))
        })
        .collect();
    let mut failures = h.run(rows).await;
    secrets.extend(
        h.sent
            .lock()
            .unwrap()
            .iter()
            .map(|t| ("a good request of the harness".to_string(), t.clone())),
    );
    let Gateway::Binary(binary) = &mut h.gateway else {
        unreachable!("started as a binary")
    };
    let (status, output) = binary.stop(BINARY_WITHIN).await;
    let (stdout, stderr) = (output.stdout, output.stderr);
    if !status.success() {
        failures.push(format!("txgate exited with {status}"));
    }
    for (name, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        if let Some(line) = text.lines().find(|l| l.contains("panicked")) {
            failures.push(format!("a panic in {name}: {line}"));
        }
        failures.extend(
            shown(text, &secrets)
                .into_iter()
                .map(|leak| format!("{name}: {leak}")),
        );
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_no_caller_token_in_json() {
    assert_table(replay_through_the_binary("json").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_no_caller_token_in_text() {
    assert_table(replay_through_the_binary("text").await);
}

/// The HTTP/2 rows through a binary whose plain listener accepts h2c. (Not every table: with
/// `server.h2c` a plain connection's first 24 bytes are read to tell HTTP/2 from HTTP/1.1, and
/// the parser table holds a shorter request.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_no_caller_token_from_h2_requests() {
    let h = Harness::start_binary("json", &[("h2c", json!(true))]).await;
    assert_table(replay(h, h2_rows()).await);
}

// ---------------------------------------------------------------------------------------------
// Issue 16: grants beyond one exchange. Their own gateway (every route kind the grants add,
// beside the kinds a smuggled Txn-Token must not pass), raw HTTP/1.1 requests.

/// The Transaction Token every `transaction_token` route of this table is issued.
const ISSUED_TXN: &str = "issued-txn-token-0123456789";

struct GrantParts {
    sts: TestSts,
    tts: TestSts,
    upstream: RecordingUpstream,
    tenant_one: TestIssuer,
    tenant_two: TestIssuer,
    txn_issuer: TestIssuer,
}

impl GrantParts {
    async fn start() -> GrantParts {
        let tts = TestSts::start(Behavior::Reply {
            status: 200,
            body: json!({
                "access_token": ISSUED_TXN,
                "issued_token_type": "urn:ietf:params:oauth:token-type:txn_token",
                "token_type": "N_A",
            })
            .to_string(),
            headers: vec![("content-type".into(), "application/json".into())],
        })
        .await;
        GrantParts {
            sts: TestSts::start(Behavior::issue()).await,
            tts,
            upstream: RecordingUpstream::start().await,
            tenant_one: TestIssuer::start().await,
            tenant_two: TestIssuer::start().await,
            txn_issuer: TestIssuer::start().await,
        }
    }

    fn yaml(&self) -> String {
        let sts = self.sts.token_endpoint();
        let inbound = |i: &TestIssuer| {
            format!(
                ", inbound: {{ jwt: {{ issuer: \"{}\", jwks_uri: \"{}\" }} }}",
                i.issuer, i.jwks_uri
            )
        };
        let service = |name: &str, endpoint: &str, extra: String| {
            format!(
                "  {name}: {{ token_endpoint: \"{endpoint}\", client_id: gateway, client_secret: \"${{TEST_CLIENT_SECRET}}\"{extra} }}\n"
            )
        };
        let up = self.upstream.url();
        format!(
            "server: {{ listen: [\"127.0.0.1:0\"] }}\ntoken_services:\n{}{}{}{}routes:\n\
  - {{ name: open, match: {{ path_prefix: /open }}, upstream: \"{up}\", exchange: {{ mode: impersonation, token_service: corp }} }}\n\
  - {{ name: public, match: {{ path_prefix: /public }}, upstream: \"{up}\", exchange: {{ mode: none }} }}\n\
  - {{ name: anonymous, match: {{ path_prefix: /anonymous }}, upstream: \"{up}\", exchange: {{ mode: client_credentials, token_service: corp, caller: anonymous }} }}\n\
  - {{ name: delegation, match: {{ path_prefix: /delegation }}, upstream: \"{up}\", exchange: {{ mode: delegation, token_service: corp }} }}\n\
  - {{ name: bearer, match: {{ path_prefix: /bearer }}, upstream: \"{up}\", exchange: {{ mode: impersonation, token_service: corp, grant: jwt_bearer }} }}\n\
  - {{ name: chain, match: {{ path_prefix: /chain }}, upstream: \"{up}\", exchange: {{ mode: impersonation, chain: [ {{ token_service: corp, audience: [\"https://as.example\"] }}, {{ token_service: corp, grant: jwt_bearer }} ] }} }}\n\
  - {{ name: tenants, match: {{ path_prefix: /tenants }}, upstream: \"{up}\", exchange: {{ mode: impersonation, token_services: [one, two] }} }}\n\
  - {{ name: txn, match: {{ path_prefix: /txn }}, upstream: \"{up}\", exchange: {{ mode: transaction_token, token_service: tts, trust_domain: \"https://trust.example\", purpose: p }} }}\n\
  - {{ name: internal, match: {{ path_prefix: /internal }}, upstream: \"{up}\", exchange: {{ mode: none }}, inbound: {{ txn_token: {{ trust_domain: \"https://trust.example\", issuer: \"{}\", jwks_uri: \"{}\" }} }} }}\n",
            service("corp", &sts, String::new()),
            service("one", &sts, inbound(&self.tenant_one)),
            service("two", &sts, inbound(&self.tenant_two)),
            service("tts", &self.tts.token_endpoint(), String::new()),
            self.txn_issuer.issuer,
            self.txn_issuer.jwks_uri,
        )
    }
}

fn raw_get(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// A Txn-Token a caller writes itself reaches no workload: on every route kind but an internal
/// one it is removed (however its name is spelled, however many there are), and on an internal
/// route only one valid token of the trust domain passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smuggled_txn_token_reaches_no_upstream_on_any_route_kind() {
    count_panics();
    let parts = GrantParts::start().await;
    let gw = gateway(&parts.yaml()).await;
    let addr = gw.proxy_addrs[0];
    const FORGED: &str = "forged-txn-token-by-the-caller";
    let mut failures = Vec::new();
    let mut callers = Vec::new();
    for (path, token) in [
        ("/open/x", Some(caller_token())),
        ("/public/x", Some(caller_token())),
        ("/public/x", None),
        ("/anonymous/x", None),
        ("/delegation/x", Some(caller_token())),
        ("/bearer/x", Some(caller_token())),
        ("/chain/x", Some(caller_token())),
        (
            "/tenants/x",
            Some(parts.tenant_one.sign(json!({"sub": "alice"}))),
        ),
        ("/txn/x", Some(caller_token())),
    ] {
        for name in ["Txn-Token", "txn-token", "TXN-TOKEN", "tXn-ToKeN"] {
            let auth = token.as_ref().map(|t| format!("Bearer {t}"));
            let mut headers = vec![(name, FORGED), (name, "second-forged-txn-token")];
            if let Some(auth) = &auth {
                headers.push(("Authorization", auth));
            }
            let answer = send_raw(addr, &raw_get(path, &headers)).await;
            if answer.as_ref().map(|a| a.status) != Some(200) {
                failures.push(format!("{path} with {name}: {answer:?}"));
            }
        }
        callers.extend(token);
    }
    // The internal route: anything but one valid Txn-Token of its trust domain is 401.
    let valid = parts.txn_issuer.sign_typed(
        "txntoken+jwt",
        json!({"aud": "https://trust.example", "txn": "t-1", "sub": "alice"}),
    );
    let caller = caller_token();
    for (why, headers, status) in [
        ("forged", vec![("Txn-Token", FORGED)], 401),
        (
            "a bearer token instead",
            vec![("Authorization", &*format!("Bearer {caller}"))],
            401,
        ),
        (
            "the caller's token as Txn-Token",
            vec![("Txn-Token", caller.as_str())],
            401,
        ),
        (
            "valid twice",
            vec![("Txn-Token", valid.as_str()), ("txn-token", valid.as_str())],
            401,
        ),
        ("valid", vec![("TXN-TOKEN", valid.as_str())], 200),
    ] {
        let answer = send_raw(addr, &raw_get("/internal/x", &headers)).await;
        if answer.as_ref().map(|a| a.status) != Some(status) {
            failures.push(format!("/internal {why}: {answer:?}"));
        }
    }
    for seen in parts.upstream.seen() {
        let everything = seen.everything();
        if everything.contains("forged-txn-token") || everything.contains("second-forged") {
            failures.push(format!("a forged Txn-Token passed: {everything}"));
        }
        if everything.contains(&caller) || callers.iter().any(|c| everything.contains(c.as_str())) {
            failures.push(format!("a caller's token passed: {everything}"));
        }
        let on_txn_route = seen.uri.starts_with("/txn");
        if on_txn_route && seen.header("txn-token") != Some(ISSUED_TXN) {
            failures.push(format!(
                "the txn route lost its own Txn-Token: {everything}"
            ));
        }
        if seen.uri.starts_with("/internal") && seen.header("txn-token") != Some(valid.as_str()) {
            failures.push(format!(
                "the internal route changed the Txn-Token: {everything}"
            ));
        }
    }
    assert_table(failures);
}

/// The caller's issuer picks the token service, so the `iss` is what an attacker steers: every
/// way of naming one tenant while holding another's (or no) key is refused before any STS
/// call, and the caller's token never reaches the chain's second STS call as anything but the
/// first step's subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steered_issuer_or_chain_reaches_no_token_service() {
    count_panics();
    let parts = GrantParts::start().await;
    let gw = gateway(&parts.yaml()).await;
    let addr = gw.proxy_addrs[0];
    let one = &parts.tenant_one;
    let two = &parts.tenant_two;
    let header_of = |token: &str| format!("{}.", token.split('.').next().unwrap());
    let with_payload = |token: &str, claims: Value| {
        let mut parts = token.split('.');
        let (h, _, s) = (parts.next().unwrap(), parts.next(), parts.next().unwrap());
        format!("{h}.{}.{s}", URL_SAFE_NO_PAD.encode(claims.to_string()))
    };
    let signed_by_two = two.sign(json!({"sub": "mallory"}));
    let mut failures = Vec::new();
    for (why, token) in [
        (
            "tenant one's iss, tenant two's key",
            two.sign(json!({"sub": "mallory", "iss": one.issuer})),
        ),
        (
            "iss swapped into a tenant-two token",
            with_payload(
                &signed_by_two,
                json!({"sub": "mallory", "iss": one.issuer, "exp": 4_000_000_000u64}),
            ),
        ),
        (
            "iss as a list",
            two.sign(json!({"sub": "mallory", "iss": [one.issuer.clone()]})),
        ),
        (
            "iss with a trailing slash",
            one.sign(json!({"sub": "mallory", "iss": format!("{}/", one.issuer)})),
        ),
        (
            "iss differing in case",
            one.sign(json!({"sub": "mallory", "iss": one.issuer.to_uppercase()})),
        ),
        (
            "no iss",
            with_payload(&one.sign(json!({"sub": "x"})), json!({"sub": "mallory"})),
        ),
        (
            "alg none",
            format!(
                "{}{}.",
                header_of(&URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#)),
                URL_SAFE_NO_PAD.encode(json!({"iss": one.issuer, "sub": "m"}).to_string())
            ),
        ),
        ("opaque", caller_token()),
    ] {
        let answer = send_raw(
            addr,
            &raw_get(
                "/tenants/x",
                &[("Authorization", &format!("Bearer {token}"))],
            ),
        )
        .await;
        match &answer {
            Some(a) if a.status == 401 && a.error_code().as_deref() == Some("invalid_token") => {}
            other => failures.push(format!("{why}: {other:?}")),
        }
    }
    if parts.sts.calls() != 0 {
        failures.push(format!(
            "{} STS calls for refused issuers",
            parts.sts.calls()
        ));
    }
    if !parts.upstream.seen().is_empty() {
        failures.push("a refused issuer reached the upstream".into());
    }
    // A chain: the caller's token is only ever step 1's subject.
    let caller = caller_token();
    let answer = send_raw(
        addr,
        &raw_get(
            "/chain/x",
            &[("Authorization", &format!("Bearer {caller}"))],
        ),
    )
    .await;
    if answer.as_ref().map(|a| a.status) != Some(200) {
        failures.push(format!("chain: {answer:?}"));
    }
    let calls = parts.sts.captured();
    let with_caller: Vec<_> = calls
        .iter()
        .filter(|c| c.form.iter().any(|(_, v)| v.contains(&caller)))
        .collect();
    if with_caller.len() != 1 || with_caller[0].param("subject_token") != Some(caller.as_str()) {
        failures.push(format!(
            "the caller's token went to the STS as more than step 1's subject: {calls:?}"
        ));
    }
    assert_table(failures);
}
