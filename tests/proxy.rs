//! The proxy layer end to end: downstream TLS (ALPN h2 and HTTP/1.1, certificate reload),
//! HTTPS upstreams (custom CA, SNI, client certificates), several peers (round robin, health
//! checks, connect-failure retry), WebSocket upgrades, header rules, hop-by-hop headers,
//! forwarding headers, streaming bodies and header limits. Every server is in-process on
//! `127.0.0.1:0`; waits on the gateway poll what it does, with a bound.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use reqwest::Version;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use common::tls::{
    Alpn, PeerUpstream, StreamingUpstream, TestCa, TlsUpstream, WsEchoUpstream, dead_addr,
    https_client, presented_cert,
};
use common::yaml::{Exchange, GatewayYaml, Route, TokenService, Upstream};
use common::{
    Behavior, RecordingUpstream, TestSts, caller_token, client, eventually, gateway,
    gateway_with_env, get,
};
use serde_json::json;
use txgate::server::RunningGateway;

/// How long a test waits for the gateway to change behaviour (reload, health) before failing.
const CHANGE_WITHIN: Duration = Duration::from_secs(15);

/// A gateway config with a plain listener and, if `sts` is given, the `corp` token service at
/// it; tests add routes and `server:` keys.
fn base(sts: Option<&TestSts>) -> GatewayYaml {
    match sts {
        Some(sts) => GatewayYaml::new().token_service(TokenService::at(sts)),
        None => GatewayYaml::new(),
    }
}

/// The gateway's first TLS listener as a base URL.
fn tls_url(gw: &RunningGateway) -> String {
    format!("https://{}", gw.tls_addrs[0])
}

fn proxy_addr(gw: &RunningGateway) -> SocketAddr {
    gw.proxy_addrs[0]
}

/// GETs `url` and returns the status and body.
async fn get_text(url: &str) -> (u16, String) {
    let response = get(url, None).await;
    (response.status.as_u16(), response.body)
}

/// A response read off a raw HTTP/1.1 connection.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Sends `head` (request line and headers, which must include `Connection: close`, without
/// the final blank line) on a new connection, and reads the whole response. For requests
/// whose exact bytes matter, where an HTTP client library would add or rewrite headers.
async fn raw_http1(addr: SocketAddr, head: &str) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("{}\r\n\r\n", head.trim_end());
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut bytes))
        .await
        .expect("the gateway answers and closes within 20 s")
        .unwrap();
    parse_response(&bytes)
}

fn parse_response(bytes: &[u8]) -> RawResponse {
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let raw_body = &bytes[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(raw_body)
    } else {
        raw_body.to_vec()
    };
    RawResponse {
        status,
        headers,
        body,
    }
}

/// Decodes an HTTP/1.1 chunked body (RFC 9112 §7.1), ignoring extensions and trailers.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return body;
        };
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return body;
        };
        if size == 0 || raw.len() < eol + 2 + size {
            return body;
        }
        body.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[(eol + 4 + size).min(raw.len())..];
    }
}

// ---- the test harness itself -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_tls_upstream_reports_sni_alpn_and_refused_handshakes() {
    let ca = TestCa::new("harness");
    let upstream = TlsUpstream::start_named("peer-a", &ca, &["backend.internal"], None).await;
    for (alpn, version, protocol) in [
        (Alpn::H2, Version::HTTP_2, "h2"),
        (Alpn::Http1, Version::HTTP_11, "http/1.1"),
    ] {
        // Resolving the name to the upstream makes the client send it as SNI.
        let client = reqwest::Client::builder()
            .tls_certs_only([ca.reqwest_root()])
            .resolve("backend.internal", upstream.addr);
        let client = match alpn {
            Alpn::H2 => client.http2_prior_knowledge(),
            Alpn::Http1 => client.http1_only(),
        }
        .build()
        .unwrap();
        let url = format!("https://backend.internal:{}/x?y=1", upstream.addr.port());
        let response = client.get(url).send().await.unwrap();
        assert_eq!(response.version(), version);
        assert_eq!(response.text().await.unwrap(), "peer-a");
        let seen = upstream.seen().pop().unwrap();
        assert_eq!(seen.sni.as_deref(), Some("backend.internal"));
        assert_eq!(seen.alpn.as_deref(), Some(protocol));
        assert!(!seen.client_cert);
        assert_eq!(seen.request.method, "GET");
        assert!(seen.request.uri.ends_with("/x?y=1"), "{}", seen.request.uri);
    }

    // A server that requires a client certificate refuses a client without one.
    let clients = TestCa::new("harness-clients");
    let strict = TlsUpstream::start(&ca, &["127.0.0.1"], Some(&clients)).await;
    let refused = https_client(&[&ca], Alpn::Http1)
        .get(strict.url())
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(
        strict
            .failed_handshakes_reach(1, Duration::from_secs(10))
            .await
    );
    assert_eq!(strict.failed_handshakes(), 1);
    assert!(strict.seen().is_empty());

    // Certificates name exactly what they were issued for: one for `backend.internal` does
    // not pass for 127.0.0.1, one for 127.0.0.1 does, and the client sees which it got.
    let response = https_client(&[&ca], Alpn::Http1)
        .get(upstream.url())
        .send()
        .await;
    assert!(response.is_err(), "{response:?}");
    let by_ip = TlsUpstream::start(&ca, &["127.0.0.1"], None).await;
    let response = https_client(&[&ca], Alpn::H2)
        .get(by_ip.url())
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "tls-upstream");
    assert_eq!(
        by_ip.seen()[0].sni,
        None,
        "no SNI for an IP address (RFC 6066 §3)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_peer_ws_and_streaming_upstreams_behave() {
    let peer = PeerUpstream::start("peer-a").await;
    assert_eq!(
        get_text(&format!("{}/any", peer.url())).await,
        (200, "peer-a".into())
    );
    assert_eq!(get_text(&format!("{}/healthz", peer.url())).await.0, 200);
    peer.set_healthy(false);
    assert_eq!(get_text(&format!("{}/healthz", peer.url())).await.0, 503);
    assert_eq!(peer.health_checks(), 2);
    assert_eq!(peer.seen().len(), 1);

    let ws = WsEchoUpstream::start().await;
    let mut request = format!("ws://{}/echo", ws.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer direct".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket.send(Message::text("ping?")).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::text("ping?")
    );
    assert_eq!(ws.upgrades()[0].bearer(), Some("direct"));

    let streaming = StreamingUpstream::start().await;
    let (body, _) = stream_post(streaming.addr, &streaming, "").await;
    assert_eq!(body, "part-1\npart-2\n");
    assert_eq!(streaming.received(), b"first-chunk|second-chunk");
}

// ---- downstream TLS ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_h2_and_http1_by_alpn_and_forwards_the_exchanged_token() {
    let ca = TestCa::new("downstream");
    let cert = ca.server_cert(&["gateway.test", "127.0.0.1"]);
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let config = base(Some(&sts))
        .tls(&cert.cert_file, &cert.key_file, Duration::from_secs(10))
        .route(
            Route::new("orders", "/orders", upstream.url())
                .exchange(Exchange::impersonation("corp")),
        );
    let gw = gateway(&config.to_yaml()).await;

    let mut tokens = Vec::new();
    for (alpn, version) in [(Alpn::H2, Version::HTTP_2), (Alpn::Http1, Version::HTTP_11)] {
        let token = caller_token();
        let response = https_client(&[&ca], alpn)
            .get(format!("{}/orders/7", tls_url(&gw)))
            .bearer_auth(&token)
            .send()
            .await
            .expect("the TLS listener answers");
        assert_eq!(response.version(), version, "{alpn:?}");
        assert_eq!(response.status(), 200, "{alpn:?}");
        assert_eq!(presented_cert(&response).as_deref(), Some(&cert.cert[..]));
        assert_eq!(response.text().await.unwrap(), "upstream ok");
        tokens.push(token);
    }
    // The plain listener still serves, and says so upstream.
    let token = caller_token();
    let response = client()
        .get(format!("{}/orders/8", gw.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    tokens.push(token);

    let seen = upstream.seen();
    assert_eq!(seen.len(), 3);
    for (i, request) in seen.iter().enumerate() {
        let bearer = request.bearer().unwrap_or_default();
        assert!(bearer.starts_with("xt-"), "request {i}: {bearer}");
        assert_eq!(
            sts.subject_of(bearer).as_ref(),
            Some(&tokens[i]),
            "request {i}"
        );
        for token in &tokens {
            assert!(!request.everything().contains(token.as_str()));
        }
    }
    assert_eq!(seen[0].uri, "/orders/7");
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen[1].header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen[2].header("x-forwarded-proto"), Some("http"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificate_files_are_served_to_new_connections() {
    let first_ca = TestCa::new("first");
    let second_ca = TestCa::new("second");
    let first = first_ca.server_cert(&["127.0.0.1"]);
    let upstream = RecordingUpstream::start().await;
    let config = base(None)
        .tls(
            &first.cert_file,
            &first.key_file,
            Duration::from_millis(200),
        )
        .route(Route::new("public", "/", upstream.url()).exchange(Exchange::none()));
    let gw = gateway(&config.to_yaml()).await;
    let url = format!("{}/ping", tls_url(&gw));

    // What a brand-new connection is shown: a new client has no pooled connection.
    let served = || {
        let url = url.clone();
        let roots = [&first_ca, &second_ca];
        let client = https_client(&roots, Alpn::Http1);
        async move {
            let response = client.get(&url).send().await.ok()?;
            if response.status() != 200 {
                return None;
            }
            presented_cert(&response)
        }
    };
    assert_eq!(served().await.as_deref(), Some(&first.cert[..]));

    // A certificate from another CA.
    let second = second_ca.server_cert(&["127.0.0.1"]);
    second.install_at(&first.cert_file, &first.key_file);
    eventually(
        "the certificate from the second CA is served",
        CHANGE_WITHIN,
        || {
            let served = served();
            let expected = second.cert.to_vec();
            async move { served.await.filter(|der| *der == expected) }
        },
    )
    .await;

    // A reissue from the same CA: same names and issuer, new serial and key.
    let third = second_ca.server_cert(&["127.0.0.1"]);
    third.install_at(&first.cert_file, &first.key_file);
    eventually("the reissued certificate is served", CHANGE_WITHIN, || {
        let served = served();
        let expected = third.cert.to_vec();
        async move { served.await.filter(|der| *der == expected) }
    })
    .await;
}

// ---- HTTPS upstreams ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_is_verified_with_the_configured_ca_and_sni() {
    let upstream_ca = TestCa::new("backend");
    let named =
        TlsUpstream::start_named("by-name", &upstream_ca, &["backend.internal"], None).await;
    let by_address =
        TlsUpstream::start_named("by-address", &upstream_ca, &["127.0.0.1"], None).await;
    let sts = TestSts::start(Behavior::issue()).await;
    let ca_file = &upstream_ca.ca_file;
    let tls_route = |name: &str, peer: &TlsUpstream, tls: serde_json::Value| {
        Route::new(
            name,
            &format!("/{name}"),
            Upstream::peers(&[peer.url()]).tls(tls),
        )
    };
    let config = base(Some(&sts))
        .route(
            tls_route(
                "named",
                &named,
                json!({ "ca_file": ca_file, "sni": "backend.internal" }),
            )
            .exchange(Exchange::impersonation("corp")),
        )
        .route(tls_route(
            "by-address",
            &by_address,
            json!({ "ca_file": ca_file }),
        ))
        .route(tls_route(
            "wrong-name",
            &named,
            json!({ "ca_file": ca_file, "sni": "other.internal" }),
        ))
        .route(tls_route(
            "system-roots",
            &named,
            json!({ "sni": "backend.internal" }),
        ))
        .route(tls_route(
            "unverified",
            &named,
            json!({ "sni": "other.internal", "verify": false }),
        ));
    let gw = gateway(&config.to_yaml()).await;
    let token = caller_token();

    let response = client()
        .get(format!("{}/named/1", gw.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "by-name");
    let seen = named.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].sni.as_deref(), Some("backend.internal"));
    assert_eq!(seen[0].request.bearer(), Some("xt-1"));
    assert!(!seen[0].request.everything().contains(&token));

    // Without `sni`, the peer's address is what the certificate must name.
    assert_eq!(
        get_text(&format!("{}/by-address", gw.url())).await,
        (200, "by-address".into())
    );

    // A certificate that does not match the name, or a CA the gateway does not trust, is a
    // bad gateway; the request never reaches the upstream. `/system-roots` goes to the same
    // address and SNI as `/named` just did: a connection pooled under `/named`'s CA must not
    // be reused for a route that does not trust that CA.
    assert_eq!(get_text(&format!("{}/wrong-name", gw.url())).await.0, 502);
    assert_eq!(get_text(&format!("{}/system-roots", gw.url())).await.0, 502);
    assert_eq!(named.seen().len(), 1);

    // `verify: false` accepts it anyway, and still sends the configured SNI.
    assert_eq!(
        get_text(&format!("{}/unverified", gw.url())).await,
        (200, "by-name".into())
    );
    let seen = named.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].sni.as_deref(), Some("other.internal"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_requiring_a_client_certificate_gets_the_configured_one() {
    let upstream_ca = TestCa::new("mtls-backend");
    let client_ca = TestCa::new("mtls-clients");
    let gateway_cert = client_ca.client_cert("txgate");
    let upstream = TlsUpstream::start_named(
        "mtls",
        &upstream_ca,
        &["backend.internal"],
        Some(&client_ca),
    )
    .await;
    let sts = TestSts::start(Behavior::issue()).await;
    let tls = |client_cert: bool| {
        let mut tls = json!({ "ca_file": upstream_ca.ca_file, "sni": "backend.internal" });
        if client_cert {
            tls["client_cert_file"] = json!(gateway_cert.cert_file);
            tls["client_key_file"] = json!(gateway_cert.key_file);
        }
        Upstream::peers(&[upstream.url()]).tls(tls)
    };
    let config = base(Some(&sts))
        .route(
            Route::new("with-cert", "/with-cert", tls(true))
                .exchange(Exchange::impersonation("corp")),
        )
        .route(
            Route::new("without-cert", "/without-cert", tls(false))
                .exchange(Exchange::impersonation("corp")),
        );
    let gw = gateway(&config.to_yaml()).await;

    let response = client()
        .get(format!("{}/with-cert", gw.url()))
        .bearer_auth(caller_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "mtls");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].client_cert);
    assert_eq!(seen[0].request.bearer(), Some("xt-1"));

    let response = client()
        .get(format!("{}/without-cert", gw.url()))
        .bearer_auth(caller_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(
        upstream.seen().len(),
        1,
        "nothing got through without a certificate"
    );
    assert!(
        upstream
            .failed_handshakes_reach(1, Duration::from_secs(10))
            .await,
        "the gateway tried and was refused"
    );
}

// ---- several peers -------------------------------------------------------------------------

/// A gateway with one mode-none route `/` over `upstream`'s peers.
fn pool(upstream: Upstream) -> String {
    base(None)
        .route(Route::new("pool", "/", upstream))
        .to_yaml()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_alternate_between_two_peers() {
    let a = PeerUpstream::start("peer-a").await;
    let b = PeerUpstream::start("peer-b").await;
    let gw = gateway(&pool(Upstream::peers(&[a.url(), b.url()]))).await;

    let mut bodies = Vec::new();
    for i in 0..10 {
        let (status, body) = get_text(&format!("{}/item/{i}", gw.url())).await;
        assert_eq!(status, 200);
        bodies.push(body);
    }
    for pair in bodies.windows(2) {
        assert_ne!(pair[0], pair[1], "round robin alternates: {bodies:?}");
    }
    assert_eq!(a.seen().len(), 5);
    assert_eq!(b.seen().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_failing_its_health_check_leaves_rotation_and_returns_after_recovering() {
    let a = PeerUpstream::start("peer-a").await;
    let b = PeerUpstream::start("peer-b").await;
    let gw = gateway(&pool(Upstream::peers(&[a.url(), b.url()]).health_check(
        "/healthz",
        Duration::from_millis(100),
        2,
        1,
    )))
    .await;
    let url = format!("{}/work", gw.url());

    // Both serve to begin with.
    let mut served_by_b = false;
    for _ in 0..4 {
        let (status, body) = get_text(&url).await;
        assert_eq!(status, 200);
        served_by_b |= body == "peer-b";
    }
    assert!(served_by_b);

    // b fails its checks: within the bound, a run of requests goes to a only.
    b.set_healthy(false);
    eventually("peer-b leaves rotation", CHANGE_WITHIN, || {
        let url = url.clone();
        async move {
            for _ in 0..6 {
                if get_text(&url).await != (200, "peer-a".to_string()) {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    let b_requests = b.seen().len();
    let checks = b.health_checks();
    for _ in 0..10 {
        assert_eq!(get_text(&url).await, (200, "peer-a".into()));
    }
    assert_eq!(
        b.seen().len(),
        b_requests,
        "an unhealthy peer gets no traffic"
    );

    // b passes again: it is back in rotation.
    b.set_healthy(true);
    eventually("peer-b returns to rotation", CHANGE_WITHIN, || {
        let url = url.clone();
        async move { (get_text(&url).await == (200, "peer-b".to_string())).then_some(()) }
    })
    .await;
    assert!(
        b.health_checks() > checks,
        "the unhealthy peer was still checked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_to_a_dead_peer_is_retried_on_the_live_one() {
    let live = PeerUpstream::start("live").await;
    let dead = format!("http://{}", dead_addr());
    let gw = gateway(&pool(Upstream::peers(&[dead, live.url()]))).await;
    for i in 0..10 {
        assert_eq!(
            get_text(&format!("{}/get/{i}", gw.url())).await,
            (200, "live".into()),
            "request {i}"
        );
    }
    assert_eq!(live.seen().len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_to_a_dead_peer_is_not_retried() {
    let live = PeerUpstream::start("live").await;
    let dead = format!("http://{}", dead_addr());
    let gw = gateway(&pool(Upstream::peers(&[dead, live.url()]))).await;
    let mut statuses = Vec::new();
    for i in 0..4 {
        let response = client()
            .post(format!("{}/post/{i}", gw.url()))
            .body("payload")
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    // Round robin sends half of them to the dead peer; only idempotent methods move on.
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2);
    assert_eq!(live.seen().len(), 2);
}

// ---- WebSocket -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_carries_the_exchanged_token_and_echoes() {
    let sts = TestSts::start(Behavior::issue()).await;
    let ws = WsEchoUpstream::start().await;
    let config = base(Some(&sts))
        .route(Route::new("ws", "/ws", ws.url()).exchange(Exchange::impersonation("corp")));
    let gw = gateway(&config.to_yaml()).await;
    let token = caller_token();

    let mut request = format!("ws://{}/ws/chat", proxy_addr(&gw))
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut socket, response) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("the upgrade completes within 10 s")
    .expect("the gateway accepts the upgrade");
    assert_eq!(response.status(), 101);

    for message in [
        Message::text("hello through txgate"),
        Message::binary(vec![0u8, 1, 2, 255]),
    ] {
        socket.send(message.clone()).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("an echo within 10 s")
            .expect("the socket stays open")
            .unwrap();
        assert_eq!(echoed, message);
    }
    socket.close(None).await.unwrap();

    let upgrades = ws.upgrades();
    assert_eq!(upgrades.len(), 1);
    let upgrade = &upgrades[0];
    assert_eq!(upgrade.uri, "/ws/chat");
    assert_eq!(upgrade.bearer(), Some("xt-1"));
    assert_eq!(sts.subject_of("xt-1").as_deref(), Some(token.as_str()));
    assert!(!upgrade.everything().contains(&token));
    assert_eq!(
        upgrade
            .header("upgrade")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("websocket")
    );
}

// ---- headers -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rules_apply_and_hop_by_hop_headers_are_not_forwarded() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let config = base(Some(&sts)).route(
        Route::new("api", "/api", upstream.url())
            .headers(
                &["x-internal-debug"],
                &[
                    ("x-env", "test"),
                    ("x-from-env", "${TXGATE_TEST_HEADER_VALUE}"),
                ],
            )
            .exchange(Exchange::impersonation("corp")),
    );
    let gw = gateway_with_env(
        &config.to_yaml(),
        &[("TXGATE_TEST_HEADER_VALUE", "value-from-env")],
    )
    .await;
    let token = caller_token();

    let response = raw_http1(
        proxy_addr(&gw),
        &format!(
            "GET /api/things HTTP/1.1\r\n\
             Host: api.example.com\r\n\
             Authorization: Bearer {token}\r\n\
             X-Internal-Debug: 1\r\n\
             X-Env: prod\r\n\
             X-From-Env: from-the-caller\r\n\
             Connection: close, X-Hop\r\n\
             X-Hop: 1\r\n\
             Keep-Alive: timeout=5\r\n\
             Proxy-Connection: keep-alive\r\n\
             TE: trailers\r\n\
             Trailer: X-Checksum\r\n\
             X-Kept: yes"
        ),
    )
    .await;
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );

    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    let everything = seen.everything();
    assert_eq!(seen.header("x-internal-debug"), None, "{everything}");
    assert_eq!(seen.header("x-env"), Some("test"), "set replaces");
    assert_eq!(seen.header("x-from-env"), Some("value-from-env"));
    assert_eq!(
        seen.headers.iter().filter(|(k, _)| k == "x-env").count(),
        1,
        "{everything}"
    );
    for hop in ["x-hop", "keep-alive", "proxy-connection", "te", "trailer"] {
        assert_eq!(seen.header(hop), None, "{hop} was forwarded:\n{everything}");
    }
    if let Some(connection) = seen.header("connection") {
        assert!(
            !connection.to_ascii_lowercase().contains("x-hop"),
            "{everything}"
        );
    }
    assert_eq!(seen.header("x-kept"), Some("yes"));
    assert_eq!(seen.bearer(), Some("xt-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_name_the_client_host_proto_and_request_id() {
    let upstream = RecordingUpstream::start().await;
    let config = base(None).route(Route::new("public", "/", upstream.url()));
    let gw = gateway(&config.to_yaml()).await;

    let response = client()
        .get(format!("{}/where", gw.url()))
        .header("host", "shop.example.com:8443")
        .header("x-request-id", "req-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let longest_kept = "k".repeat(128);
    let long_id = "r".repeat(129);
    for id in [&long_id, &longest_kept] {
        let response = client()
            .get(format!("{}/where", gw.url()))
            .header("x-request-id", id)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    let seen = upstream.seen();
    assert_eq!(
        seen[0].header("x-forwarded-host"),
        Some("shop.example.com:8443")
    );
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen[0].header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen[0].header("x-request-id"), Some("req-abc-123"));
    let expected_host = proxy_addr(&gw).to_string();
    assert_eq!(
        seen[1].header("x-forwarded-host"),
        Some(expected_host.as_str())
    );
    let generated = seen[1].header("x-request-id").unwrap_or_default();
    assert!(
        !generated.is_empty() && generated != long_id,
        "a 129-character id is replaced: {generated}"
    );
    assert_eq!(seen[2].header("x-request-id"), Some(longest_kept.as_str()));
}

/// `headers.forwarded: false` and `headers.request_id: false` turn each family off on their
/// route: the gateway neither sets nor answers with them, and what the caller sent passes as
/// sent; the route beside keeps both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_header_families_can_be_turned_off_per_route() {
    let upstream = RecordingUpstream::start().await;
    let config = base(None)
        .route(Route::new("quiet", "/quiet", upstream.url()).set(
            "headers",
            serde_json::json!({ "forwarded": false, "request_id": false }),
        ))
        .route(Route::new("public", "/", upstream.url()));
    let gw = gateway(&config.to_yaml()).await;

    let quiet = client()
        .get(format!("{}/quiet/x", gw.url()))
        .header("x-forwarded-proto", "gopher")
        .send()
        .await
        .unwrap();
    assert_eq!(quiet.status(), 200);
    assert!(
        quiet.headers().get("x-request-id").is_none(),
        "no request id on the response of a route without it"
    );
    let loud = client()
        .get(format!("{}/loud", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(loud.status(), 200);
    assert!(loud.headers().get("x-request-id").is_some());

    let seen = upstream.seen();
    assert_eq!(seen[0].header("x-forwarded-for"), None);
    assert_eq!(seen[0].header("x-forwarded-host"), None);
    assert_eq!(
        seen[0].header("x-forwarded-proto"),
        Some("gopher"),
        "the caller's value passes as sent"
    );
    assert_eq!(seen[0].header("x-request-id"), None);
    assert_eq!(seen[1].header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen[1].header("x-forwarded-proto"), Some("http"));
    assert!(seen[1].header("x-request-id").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_request_headers_get_431_with_the_documented_body() {
    let ca = TestCa::new("limits");
    let cert = ca.server_cert(&["127.0.0.1"]);
    let upstream = RecordingUpstream::start().await;
    let config = base(None).route(Route::new("public", "/", upstream.url()));
    let gw = gateway(
        &config
            .clone()
            .server("max_request_header_bytes", 4096)
            .tls(&cert.cert_file, &cert.key_file, Duration::from_secs(10))
            .to_yaml(),
    )
    .await;

    let send = |client: reqwest::Client, url: String, size: usize| async move {
        let response = client
            .get(url)
            .header("x-big", "b".repeat(size))
            .send()
            .await
            .expect("the gateway answers");
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        (status, body)
    };
    let (status, _) = send(client(), format!("{}/small", gw.url()), 2000).await;
    assert_eq!(status, 200);
    for (client, url) in [
        (client(), gw.url()),
        (https_client(&[&ca], Alpn::H2), tls_url(&gw)),
        (https_client(&[&ca], Alpn::Http1), tls_url(&gw)),
    ] {
        let (status, body) = send(client, format!("{url}/big"), 5000).await;
        assert_eq!(status, 431, "{url}");
        assert_eq!(body["error"], "request_header_fields_too_large", "{body}");
        assert!(body["error_description"].is_string(), "{body}");
    }
    assert_eq!(
        upstream.seen().len(),
        1,
        "oversize requests are not forwarded"
    );

    // The default limit is 32 KiB.
    let default_gw = gateway(&config.to_yaml()).await;
    let (status, _) = send(client(), format!("{}/default", default_gw.url()), 16 * 1024).await;
    assert_eq!(status, 200);
    let (status, body) = send(client(), format!("{}/default", default_gw.url()), 40 * 1024).await;
    assert_eq!(status, 431);
    assert_eq!(body["error"], "request_header_fields_too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_token_gets_401_invalid_token_without_an_exchange() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let config = base(Some(&sts)).max_token_bytes(64).route(
        Route::new("orders", "/orders", upstream.url()).exchange(Exchange::impersonation("corp")),
    );
    let gw = gateway(&config.to_yaml()).await;

    let response = client()
        .get(format!("{}/orders", gw.url()))
        .bearer_auth("t".repeat(65))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(challenge.contains("invalid_token"), "{challenge}");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_token");
    assert_eq!(sts.calls(), 0);

    let response = client()
        .get(format!("{}/orders", gw.url()))
        .bearer_auth("t".repeat(64))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "a token of exactly the limit passes"
    );
    assert_eq!(upstream.seen().len(), 1);
}

// ---- streaming -----------------------------------------------------------------------------

/// POSTs a chunked body to `addr` (the upstream or a gateway in front of it) in two chunks,
/// the second only after `upstream` has received the first; then reads the response until
/// `part-1`, releases `part-2`, and reads the rest. Returns the response text and the head.
async fn stream_post(
    addr: SocketAddr,
    upstream: &StreamingUpstream,
    path_prefix: &str,
) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path_prefix}/upload HTTP/1.1\r\nHost: stream.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(b"c\r\nfirst-chunk|\r\n").await.unwrap();
    assert!(
        upstream.first_chunk_arrived(Duration::from_secs(10)).await,
        "the first chunk reaches the upstream before the body is complete"
    );
    stream
        .write_all(b"c\r\nsecond-chunk\r\n0\r\n\r\n")
        .await
        .unwrap();

    let mut bytes = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&bytes).contains("part-1") {
        let read = tokio::time::timeout_at(deadline.into(), stream.read(&mut buffer))
            .await
            .expect("part-1 arrives before the response is complete")
            .unwrap();
        assert!(
            read > 0,
            "closed before part-1: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        bytes.extend_from_slice(&buffer[..read]);
    }
    upstream.release_rest();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("the response ends within 10 s")
        .unwrap();
    let response = parse_response(&bytes);
    assert_eq!(response.status, 200);
    let head = response
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\n"))
        .collect();
    (String::from_utf8_lossy(&response.body).into_owned(), head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_stream_through() {
    let upstream = StreamingUpstream::start().await;
    let config = base(None).route(Route::new("uploads", "/uploads", upstream.url()));
    let gw = gateway(&config.to_yaml()).await;
    let (body, head) = stream_post(proxy_addr(&gw), &upstream, "/uploads").await;
    assert_eq!(body, "part-1\npart-2\n", "{head}");
    assert_eq!(upstream.received(), b"first-chunk|second-chunk");
}
