//! Hostile requests through a real gateway, one table per kind of attack.
//!
//! Each row is a request a careless or malicious client could send, with the answer the README
//! error table promises for it. For every row the test also checks what must hold whatever the
//! answer: the gateway does not panic and keeps serving (a good request after the row still
//! gets 200), a token the gateway can judge locally never reaches the STS, and the caller's
//! token never reaches the upstream. Requests go out as raw bytes over a `TcpStream`, because
//! HTTP client libraries refuse to send most of these.
//!
//! One gateway serves two routes: `/open` exchanges any syntactically valid token (no inbound
//! validation), `/jwt` validates callers' JWTs locally against a [`TestIssuer`]'s JWKS first.

mod common;

use std::net::SocketAddr;
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Behavior, RecordingUpstream, TestIssuer, TestSts, caller_token, gateway};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use txgate::server::RunningGateway;

/// `server.max_token_bytes` of the test gateway: below the default so the boundary rows stay
/// small, above every JWT row so those reach the validator.
const MAX_TOKEN_BYTES: usize = 2048;
/// The audience `/jwt` requires of callers' tokens.
const AUDIENCE: &str = "gateway-api";

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
}

/// What a row expects.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Forwarded: 200 from the upstream, which got a token the STS minted for this caller.
    Forwarded,
    /// Answered by txgate itself with this status, JSON `error` code and challenge; the STS and
    /// the upstream are not called.
    Refused(u16, &'static str, Challenge),
    /// Refused by the HTTP/1.1 parser before txgate's code runs: 400 (or, tolerated, the
    /// connection closed without an answer); the STS and the upstream are not called.
    ParserRefused,
}

/// One hostile request.
struct Row {
    name: &'static str,
    /// The complete request as written to the socket.
    bytes: Vec<u8>,
    expect: Expect,
    /// The caller token the upstream must never see (and, when forwarded, the subject the STS
    /// must have minted the upstream's token for). Empty when the row carries no token.
    token: String,
}

impl Row {
    /// `GET path` with these extra header lines (name, raw value), and `Host: gateway.test`
    /// unless they have their own.
    fn get(name: &'static str, path: &str, headers: &[(&str, &[u8])], expect: Expect) -> Row {
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
        Row {
            name,
            bytes,
            expect,
            token: String::new(),
        }
    }

    /// `GET path` with one `Authorization` header of the raw `value`.
    fn auth(name: &'static str, path: &str, value: &[u8], expect: Expect) -> Row {
        Row::get(name, path, &[("Authorization", value)], expect)
    }

    /// Records the caller token this row carries, for the leak and subject checks.
    fn carrying(mut self, token: &str) -> Row {
        self.token = token.to_string();
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

/// The gateway under attack, its STS, upstream and caller-token issuer.
struct Harness {
    sts: TestSts,
    upstream: RecordingUpstream,
    issuer: TestIssuer,
    gw: RunningGateway,
}

impl Harness {
    async fn start() -> Harness {
        count_panics();
        let sts = TestSts::start(Behavior::issue()).await;
        let upstream = RecordingUpstream::start().await;
        let issuer = TestIssuer::start().await;
        let yaml = format!(
            r#"server:
  listen: ["127.0.0.1:0"]
  max_token_bytes: {MAX_TOKEN_BYTES}
{services}routes:
  - name: open
    match: {{ path_prefix: "/open" }}
    upstream: "{up}"
    exchange: {{ mode: impersonation, token_service: corp, audience: ["https://open.example.com"] }}
  - name: jwt
    match: {{ path_prefix: "/jwt" }}
    upstream: "{up}"
    inbound:
      jwt: {{ issuer: "{iss}", jwks_uri: "{jwks}", audiences: ["{AUDIENCE}"] }}
    exchange: {{ mode: impersonation, token_service: corp, audience: ["https://jwt.example.com"] }}
"#,
            services = common::token_service(&sts, ""),
            up = upstream.url(),
            iss = issuer.issuer,
            jwks = issuer.jwks_uri,
        );
        let gw = gateway(&yaml).await;
        Harness {
            sts,
            upstream,
            issuer,
            gw,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.gw.proxy_addrs[0]
    }

    /// Runs every row and then checks the leak property over everything the upstream saw.
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
        let seen = self.upstream.seen();
        for row in rows.iter().filter(|r| !r.token.is_empty()) {
            if let Some(leak) = seen.iter().find(|s| s.everything().contains(&row.token)) {
                failures.push(format!(
                    "{}: the caller's token reached the upstream: {}",
                    row.name,
                    leak.everything()
                ));
            }
        }
        let panics = PANICS.load(Ordering::SeqCst);
        if panics > 0 {
            failures.push(format!("{panics} panic(s) in the process (see stderr)"));
        }
        failures
    }

    async fn check(&self, row: &Row) -> Vec<String> {
        let mut failures = Vec::new();
        let calls_before = self.sts.calls();
        let seen_before = self.upstream.seen().len();
        let answer = send_raw(self.addr(), &row.bytes).await;
        // The observed answer, for `cargo test --test hostile -- --nocapture`.
        match &answer {
            Some(a) => println!(
                "{:<50} {} {}",
                row.name,
                a.status,
                a.header("www-authenticate").unwrap_or("-")
            ),
            None => println!("{:<50} closed without an answer", row.name),
        }
        let calls = self.sts.calls() - calls_before;
        let seen = self.upstream.seen();
        let forwarded = &seen[seen_before..];

        match (row.expect, &answer) {
            (Expect::Forwarded, Some(a)) => {
                if a.status != 200 || a.body != "upstream ok" {
                    failures.push(format!("expected 200 from the upstream, got {a:?}"));
                }
                if calls != 1 {
                    failures.push(format!("expected one STS call, got {calls}"));
                }
                match forwarded {
                    [one] => {
                        let minted_for = one.bearer().and_then(|t| self.sts.subject_of(t));
                        if minted_for.as_deref() != Some(row.token.as_str()) {
                            failures.push(format!(
                                "upstream got {:?}, not a token minted for the caller",
                                one.header("authorization")
                            ));
                        }
                    }
                    other => failures.push(format!(
                        "expected one upstream request, got {}",
                        other.len()
                    )),
                }
            }
            (Expect::Refused(status, code, challenge), Some(a)) => {
                failures.extend(refusal_mismatch(a, status, code, challenge));
            }
            (Expect::ParserRefused, Some(a)) if a.status == 400 => {}
            (Expect::ParserRefused, None) => {}
            (_, answer) => failures.push(format!("expected {:?}, got {answer:?}", row.expect)),
        }
        if !matches!(row.expect, Expect::Forwarded) {
            if calls != 0 {
                failures.push(format!("the STS was called {calls} time(s)"));
            }
            if !forwarded.is_empty() {
                failures.push(format!("forwarded upstream: {:?}", forwarded[0]));
            }
        }

        // Whatever the row did, the gateway still serves a good caller.
        let good = caller_token();
        let after = Row::auth(
            "good",
            "/open/after",
            format!("Bearer {good}").as_bytes(),
            Expect::Forwarded,
        );
        match send_raw(self.addr(), &after.bytes).await {
            Some(a) if a.status == 200 => {}
            other => failures.push(format!("a good request afterwards got {other:?}")),
        }
        failures
    }
}

/// How a refusal differs from the README: status, JSON body, challenge, `Cache-Control`.
fn refusal_mismatch(a: &Answer, status: u16, code: &str, challenge: Challenge) -> Vec<String> {
    let mut failures = Vec::new();
    if a.status != status {
        failures.push(format!(
            "status {} instead of {status} ({})",
            a.status, a.body
        ));
    }
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
    };
    if !ok {
        failures.push(format!(
            "WWW-Authenticate {found:?}, expected {challenge:?}"
        ));
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
const INVALID_TOKEN: Expect = Expect::Refused(401, "invalid_token", Challenge::WithError);
const NO_CREDENTIAL: Expect = Expect::Refused(401, "unauthorized", Challenge::Bare);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_credentials_get_their_documented_answer() {
    let h = Harness::start().await;
    let mut t: Vec<String> = (0..32).map(|_| caller_token()).collect();
    // Tokens whose full text a row forwards, so the STS must have been sent exactly this.
    t[28].push_str("==");
    t[29].push_str("-._~+/AZaz09");
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
            &bearer(&token_of_len(MAX_TOKEN_BYTES + 1)),
            INVALID_TOKEN,
        ),
        Row::auth(
            "token 16 KiB",
            "/open",
            &bearer(&token_of_len(16 * 1024)),
            INVALID_TOKEN,
        ),
        Row::auth(
            "header block over max_request_header_bytes",
            "/open",
            &bearer(&token_of_len(40 * 1024)),
            Expect::Refused(431, "request_header_fields_too_large", Challenge::Absent),
        ),
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
        Row::get(
            "same token in the query and the header",
            &format!("/open?x=1&access_token={}", t[23]),
            &[("Authorization", &bearer(&t[23]))],
            Expect::Forwarded,
        )
        .carrying(&t[23]),
        // RFC 9110 §11.1: auth schemes are case-insensitive, so these are accepted.
        Row::auth(
            "lowercase bearer",
            "/open",
            format!("bearer {}", t[24]).as_bytes(),
            Expect::Forwarded,
        )
        .carrying(&t[24]),
        Row::auth(
            "uppercase BEARER",
            "/open",
            format!("BEARER {}", t[25]).as_bytes(),
            Expect::Forwarded,
        )
        .carrying(&t[25]),
        Row::auth(
            "mixed-case bEaReR",
            "/open",
            format!("bEaReR {}", t[26]).as_bytes(),
            Expect::Forwarded,
        )
        .carrying(&t[26]),
        Row::auth(
            "several spaces after the scheme",
            "/open",
            format!("Bearer   {}", t[27]).as_bytes(),
            Expect::Forwarded,
        )
        .carrying(&t[27]),
        Row::auth(
            "trailing = padding",
            "/open",
            format!("Bearer {}", t[28]).as_bytes(),
            Expect::Forwarded,
        )
        .carrying(&t[28]),
        Row::auth(
            "every b64token character",
            "/open",
            format!("Bearer {}", t[29]).as_bytes(),
            Expect::Forwarded,
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
            Expect::Forwarded,
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
        // The leak guard drops every other header that carries the caller's token (the
        // upstream of the Host row gets an empty Host and no X-Forwarded-Host).
        Row::get(
            "token copied into a cookie and a custom header",
            "/open",
            &[
                ("Authorization", &bearer(&more[1])),
                ("Cookie", format!("session={}", more[1]).as_bytes()),
                ("X-Api-Key", more[1].as_bytes()),
            ],
            Expect::Forwarded,
        )
        .carrying(&more[1]),
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
    assert_table(h.run(rows).await);

    // The forwarded query lost the access_token parameter and kept the rest.
    let seen = h.upstream.seen();
    let query_row = seen.iter().find(|s| s.uri.starts_with("/open?"));
    assert_eq!(query_row.map(|s| s.uri.as_str()), Some("/open?x=1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_the_http_parser_refuses_never_reach_txgate() {
    let h = Harness::start().await;
    let t: Vec<String> = (0..8).map(|_| caller_token()).collect();
    let with = |token: &str, bytes: &[u8]| [bearer(token), bytes.to_vec(), b"x".to_vec()].concat();
    let rows = vec![
        Row::auth("NUL in the token", "/open", &with(&t[0], b"\0"), Expect::ParserRefused).carrying(&t[0]),
        Row::auth("SOH control byte in the token", "/open", &with(&t[1], b"\x01"), Expect::ParserRefused).carrying(&t[1]),
        Row::auth("DEL in the token", "/open", &with(&t[2], b"\x7f"), Expect::ParserRefused).carrying(&t[2]),
        Row::auth("bare CR in the token", "/open", &with(&t[3], b"\r"), Expect::ParserRefused).carrying(&t[3]),
        // RFC 9112 §2.2 lets a recipient take a bare LF as a line end: the caller split its own
        // header block, and the token before the LF is forwarded as any other.
        Row::auth("bare LF ending the header", "/open", &[bearer(&t[4]), b"\nX-Other: 1".to_vec()].concat(), Expect::Forwarded).carrying(&t[4]),
        Row {
            name: "obsolete line folding (RFC 9112 §5.2)",
            bytes: format!("GET /open HTTP/1.1\r\nHost: gateway.test\r\nAuthorization: Bearer\r\n {}\r\nConnection: close\r\n\r\n", t[5]).into_bytes(),
            expect: Expect::ParserRefused,
            token: t[5].clone(),
        },
        Row {
            name: "space before the colon (RFC 9112 §5.1)",
            bytes: format!("GET /open HTTP/1.1\r\nHost: gateway.test\r\nAuthorization : Bearer {}\r\nConnection: close\r\n\r\n", t[6]).into_bytes(),
            expect: Expect::ParserRefused,
            token: t[6].clone(),
        },
        Row {
            name: "non-ASCII header name",
            bytes: format!("GET /open HTTP/1.1\r\nHost: gateway.test\r\nAuthorizatión: Bearer {}\r\nConnection: close\r\n\r\n", t[7]).into_bytes(),
            expect: Expect::ParserRefused,
            token: t[7].clone(),
        },
        Row {
            name: "garbage request line",
            bytes: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(),
            expect: Expect::ParserRefused,
            token: String::new(),
        },
    ];
    assert_table(h.run(rows).await);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_foreign_jwts_fail_locally_without_an_sts_call() {
    let h = Harness::start().await;
    let issuer = &h.issuer;
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
            Expect::Forwarded,
        ),
        ("valid", good.clone(), Expect::Forwarded),
    ];
    let rows = rows
        .into_iter()
        .map(|(name, token, expect)| {
            Row::auth(name, "/jwt/x", &bearer(&token), expect).carrying(&token)
        })
        .collect();
    assert_table(h.run(rows).await);
}

/// Percent-encoding every character of the token must not hide it from the URL check: the
/// upstream would decode the path or the query and hold the caller's token. (Regression: the
/// check once compared only the raw, still-encoded target and forwarded these.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_tokens_in_the_url_are_refused() {
    let h = Harness::start().await;
    let encode = |t: &str| t.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
    let (a, b) = (caller_token(), caller_token());
    let rows = vec![
        Row::auth(
            "token percent-encoded in the path",
            &format!("/open/{}", encode(&a)),
            &bearer(&a),
            BAD_REQUEST,
        )
        .carrying(&a),
        Row::auth(
            "token percent-encoded in the query",
            &format!("/open?q={}", encode(&b)),
            &bearer(&b),
            BAD_REQUEST,
        )
        .carrying(&b),
    ];
    let mut failures = h.run(rows).await;
    for seen in h.upstream.seen() {
        let decoded: String = url::form_urlencoded::parse(format!("u={}", seen.uri).as_bytes())
            .map(|(_, v)| v.into_owned())
            .collect();
        for token in [&a, &b] {
            if decoded.contains(token.as_str()) {
                failures.push(format!(
                    "the upstream got the token encoded in {}",
                    seen.uri
                ));
            }
        }
    }
    assert_table(failures);
}

/// An STS answering with an absurd `expires_in` (a finite number of seconds no `Duration`
/// holds) must not take the request down: the README clamps `expires_in` to a day, so the
/// token is forwarded. (Regression: found by the `sts_response` fuzz target, the parser once
/// panicked in `Duration::from_secs_f64` before clamping and the caller got no answer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_expires_in_from_the_sts_is_clamped_not_fatal() {
    let h = Harness::start().await;
    let mut failures = Vec::new();
    for expires_in in [json!(1e20), json!("1e308")] {
        h.sts.set(Behavior::Reply {
            status: 200,
            body: json!({"access_token": "huge-expiry", "token_type": "Bearer", "expires_in": expires_in})
                .to_string(),
            headers: vec![("content-type".into(), "application/json".into())],
        });
        let token = caller_token();
        let row = Row::auth(
            "huge expires_in",
            "/open",
            &bearer(&token),
            Expect::Forwarded,
        );
        let answer = send_raw(h.addr(), &row.bytes).await;
        let forwarded = h
            .upstream
            .seen()
            .last()
            .map(|s| s.bearer().map(str::to_string));
        if answer.as_ref().map(|a| a.status) != Some(200)
            || forwarded != Some(Some("huge-expiry".to_string()))
        {
            failures.push(format!("expires_in {expires_in}: got {answer:?}"));
        }
    }
    h.sts.set(Behavior::issue());
    let good = Row::auth("good", "/open", &bearer(&caller_token()), Expect::Forwarded);
    match send_raw(h.addr(), &good.bytes).await {
        Some(a) if a.status == 200 => {}
        other => failures.push(format!("a good request afterwards got {other:?}")),
    }
    let panics = PANICS.load(Ordering::SeqCst);
    if panics > 0 {
        failures.push(format!("{panics} panic(s) in the process (see stderr)"));
    }
    assert_table(failures);
}
