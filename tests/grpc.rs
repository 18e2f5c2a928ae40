//! gRPC and HTTP/2 end to end: a real tonic client calls a real gRPC server through the
//! gateway, over h2c (`server.h2c`) and over TLS with ALPN `h2`, to h2c and h2 upstreams
//! (`routes[].upstream.protocol`). The upstream records every header and pseudo-header it
//! gets, so the tests can look for the caller's token in all of them.

mod common;

use std::time::Duration;

use common::grpc::{
    Bare, EchoRequest, GrpcUpstream, checksum, collect, h2c_channel, payload, request, say,
    say_bare, stream, tls_channel,
};
use common::tls::{TestCa, dead_addr};
use common::yaml::{Exchange, GatewayYaml, Route, TokenService, Upstream};
use common::{Behavior, RecordingUpstream, TestSts, caller_token, client, gateway};
use tonic::Code;
use txgate::server::RunningGateway;

/// How long a test waits for something that should come at once.
const WITHIN: Duration = Duration::from_secs(10);

/// A gateway with an h2c-enabled plain listener and a TLS listener, whose one route sends
/// `echo.Echo` calls through an impersonation exchange to `upstream` in `protocol`.
struct Parts {
    ca: TestCa,
    sts: TestSts,
    upstream: GrpcUpstream,
    gw: RunningGateway,
}

async fn parts(protocol: &str, sts_behavior: Behavior) -> Parts {
    let ca = TestCa::new("grpc");
    let cert = ca.server_cert(&["127.0.0.1"]);
    let sts = TestSts::start(sts_behavior).await;
    let upstream = match protocol {
        "h2" => GrpcUpstream::h2(&ca).await,
        _ => GrpcUpstream::h2c().await,
    };
    let mut peers = Upstream::peers(&[upstream.url()]).set("protocol", protocol);
    if protocol == "h2" {
        peers = peers.tls(serde_json::json!({ "ca_file": ca.ca_file }));
    }
    let yaml = GatewayYaml::new()
        .admin()
        .server("h2c", true)
        .tls(&cert.cert_file, &cert.key_file, Duration::from_secs(10))
        .token_service(TokenService::at(&sts).timeout(Duration::from_secs(1)))
        .route(
            Route::new("echo", "/echo.Echo", peers)
                .exchange(Exchange::impersonation("corp").audience("https://echo")),
        )
        .to_yaml();
    let gw = gateway(&yaml).await;
    Parts {
        ca,
        sts,
        upstream,
        gw,
    }
}

impl Parts {
    async fn h2c(&self) -> tonic::transport::Channel {
        h2c_channel(&self.gw.url()).await
    }

    async fn tls(&self) -> tonic::transport::Channel {
        tls_channel(self.gw.tls_addrs[0], &self.ca).await
    }
}

fn ask(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_string(),
        ..EchoRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_streaming_calls_pass_over_h2c_and_tls_to_h2c_and_h2_upstreams() {
    for protocol in ["h2c", "h2"] {
        let parts = parts(protocol, Behavior::issue()).await;
        let mut tokens = Vec::new();
        for (downstream, channel) in [("h2c", parts.h2c().await), ("tls", parts.tls().await)] {
            let case = format!("{downstream} -> {protocol}");
            let token = caller_token();
            let reply = say(&channel, request(ask(&case), Some(&token)))
                .await
                .unwrap_or_else(|s| panic!("{case}: {s:?}"));
            assert_eq!(reply.get_ref().message, case);

            let streamed = EchoRequest {
                message: case.clone(),
                count: 3,
                size: 10,
                ..EchoRequest::default()
            };
            let mut replies = stream(&channel, request(streamed, Some(&token)))
                .await
                .unwrap_or_else(|s| panic!("{case}: {s:?}"))
                .into_inner();
            let mut indexes = Vec::new();
            while let Some(reply) = replies.message().await.unwrap() {
                assert_eq!(reply.message, case);
                indexes.push(reply.index);
            }
            assert_eq!(indexes, [0, 1, 2], "{case}");
            tokens.push(token);
        }
        let seen = parts.upstream.seen();
        assert_eq!(seen.len(), 4, "{protocol}");
        for (i, call) in seen.iter().enumerate() {
            assert_eq!(call.version, http::Version::HTTP_2, "{protocol} call {i}");
            assert_eq!(
                call.request.header("content-type"),
                Some("application/grpc"),
                "{protocol} call {i}"
            );
            assert_eq!(call.request.header("te"), Some("trailers"));
            // The exchanged token, minted for this caller's token, and never the caller's own.
            let bearer = call.request.bearer().unwrap_or_default();
            assert!(bearer.starts_with("xt-"), "{protocol} call {i}: {bearer}");
            assert_eq!(
                parts.sts.subject_of(bearer).as_ref(),
                Some(&tokens[i / 2]),
                "{protocol} call {i}"
            );
            let everything = format!("{}{:?}", call.request.everything(), call.authority);
            for token in &tokens {
                assert!(!everything.contains(token.as_str()), "{everything}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_a_token_is_unauthenticated_and_keeps_the_challenge() {
    let parts = parts("h2c", Behavior::issue()).await;
    for channel in [parts.h2c().await, parts.tls().await] {
        let status = say(&channel, request(ask("hi"), None))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert_eq!(status.message(), "a bearer token is required");
        assert_eq!(
            status
                .metadata()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer realm=\"txgate\"")
        );
        assert!(status.metadata().get("x-request-id").is_some());
        // Malformed: a second `authorization` value.
        let mut twice = request(ask("hi"), Some(&caller_token()));
        twice
            .metadata_mut()
            .append("authorization", "Bearer another-token-1".parse().unwrap());
        let status = say(&channel, twice).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    assert!(parts.upstream.seen().is_empty());
    assert_eq!(parts.sts.calls(), 0);
    // Counted by what the answers stand for, not by the 200 that carried them.
    let metrics = common::get(
        &format!("http://{}/metrics", parts.gw.admin_addr.unwrap()),
        None,
    )
    .await
    .body;
    for (status, count) in [("401", 2), ("400", 2), ("200", 0)] {
        let line = format!("txgate_requests_total{{route=\"echo\",status=\"{status}\"}} {count}");
        assert!(metrics.lines().any(|l| l == line), "{line}\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_answers_to_grpc_callers_are_grpc_statuses() {
    let parts = parts("h2c", Behavior::error(503, "temporarily_unavailable")).await;
    let channel = parts.h2c().await;
    let call = || say(&channel, request(ask("hi"), Some(&caller_token())));

    let status = call().await.expect_err("STS down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.metadata().get("retry-after").is_some());

    parts.sts.set(Behavior::Delay(
        Duration::from_secs(3),
        Box::new(Behavior::issue()),
    ));
    let status = call().await.expect_err("STS too slow");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    parts.sts.set(Behavior::error(400, "invalid_target"));
    let status = call().await.expect_err("forbidden");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    parts.sts.set(Behavior::error(400, "invalid_grant"));
    let status = call().await.expect_err("token refused by the STS");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status
            .metadata()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("invalid_token"))
    );

    // No route: a method of another service.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let status = grpc
        .unary::<_, common::grpc::EchoReply, _>(
            request(ask("hi"), Some(&caller_token())),
            http::uri::PathAndQuery::from_static("/other.Service/Call"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("no route");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(parts.upstream.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_unavailable() {
    let sts = TestSts::start(Behavior::issue()).await;
    let yaml = GatewayYaml::new()
        .server("h2c", true)
        .token_service(TokenService::at(&sts))
        .route(
            Route::new(
                "echo",
                "/echo.Echo",
                Upstream::peers(&[format!("http://{}", dead_addr())]).set("protocol", "h2c"),
            )
            .exchange(Exchange::impersonation("corp")),
        )
        .to_yaml();
    let gw = gateway(&yaml).await;
    let channel = h2c_channel(&gw.url()).await;
    let status = say(&channel, request(ask("hi"), Some(&caller_token())))
        .await
        .expect_err("no upstream");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "the upstream is unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_and_a_large_stream_arrive_intact() {
    for protocol in ["h2c", "h2"] {
        let parts = parts(protocol, Behavior::issue()).await;
        let token = caller_token();
        for (downstream, channel) in [("h2c", parts.h2c().await), ("tls", parts.tls().await)] {
            // 64 replies of 64 KiB: 4 MiB, past every HTTP/2 flow-control window's default.
            let (count, size) = (64u32, 64 * 1024u32);
            for end_code in [Code::Ok, Code::Aborted] {
                let case = format!("{downstream} -> {protocol}, ending {end_code:?}");
                let ask = EchoRequest {
                    message: "big".into(),
                    count,
                    size,
                    end_code: end_code as i32,
                    hold: false,
                };
                let mut replies = stream(&channel, request(ask, Some(&token)))
                    .await
                    .unwrap_or_else(|s| panic!("{case}: {s:?}"))
                    .into_inner();
                let mut received = Vec::new();
                let end = loop {
                    match replies.message().await {
                        Ok(Some(reply)) => {
                            assert_eq!(reply.payload, payload(reply.index, size), "{case}");
                            received.push(reply.payload);
                        }
                        Ok(None) => break Ok(replies.trailers().await.unwrap()),
                        Err(status) => break Err(status),
                    }
                };
                assert_eq!(received.len(), count as usize, "{case}");
                let expected = checksum(received.iter().map(Vec::as_slice));
                let trailers = match (end_code, end) {
                    (Code::Ok, Ok(Some(trailers))) => trailers,
                    (Code::Aborted, Err(status)) => {
                        assert_eq!(status.code(), Code::Aborted, "{case}");
                        assert_eq!(status.message(), "stream end", "{case}");
                        status.metadata().clone()
                    }
                    (_, other) => panic!("{case}: ended with {other:?}"),
                };
                assert_eq!(
                    trailers.get("x-checksum").and_then(|v| v.to_str().ok()),
                    Some(expected.as_str()),
                    "{case}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_replies_are_forwarded_as_they_come() {
    let parts = parts("h2c", Behavior::issue()).await;
    let channel = parts.h2c().await;
    let ask = EchoRequest {
        message: "held".into(),
        count: 3,
        size: 16,
        end_code: 0,
        hold: true,
    };
    let mut replies = stream(&channel, request(ask, Some(&caller_token())))
        .await
        .unwrap()
        .into_inner();
    // The upstream sends one reply and then waits: a gateway that buffered the response would
    // deliver nothing until the upstream finished.
    let first = tokio::time::timeout(WITHIN, replies.message())
        .await
        .expect("the first reply arrives while the upstream still holds the stream")
        .unwrap()
        .unwrap();
    assert_eq!(first.index, 0);
    parts.upstream.release();
    let mut rest = Vec::new();
    while let Some(reply) = replies.message().await.unwrap() {
        rest.push(reply.index);
    }
    assert_eq!(rest, [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_requests_are_forwarded_as_they_come() {
    let parts = parts("h2c", Behavior::issue()).await;
    let channel = parts.h2c().await;
    let (send, receive) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    let messages =
        futures::stream::unfold(
            receive,
            |mut r| async move { r.recv().await.map(|m| (m, r)) },
        );
    let token = caller_token();
    let call = tokio::spawn(async move { collect(&channel, messages, &token).await });
    send.send(ask("first")).await.unwrap();
    // The request stream is still open: a gateway that buffered it would deliver nothing yet.
    common::eventually("the first message reaches the upstream", WITHIN, || async {
        parts.upstream.collected() == ["first"]
    })
    .await;
    send.send(ask("second")).await.unwrap();
    drop(send);
    let reply = call.await.unwrap().unwrap();
    assert_eq!(reply.get_ref().message, "first,second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_deadline_bounds_the_upstream_wait_and_travels_upstream() {
    let parts = parts("h2c", Behavior::issue()).await;
    let channel = parts.h2c().await;
    let token = caller_token();
    // A call that is answered: the upstream sees what is left of the deadline.
    let mut call = request(ask("quick"), Some(&token));
    call.set_timeout(Duration::from_secs(5));
    say(&channel, call).await.unwrap();
    let seen = parts.upstream.seen();
    let timeout = seen[0].request.header("grpc-timeout").unwrap_or_default();
    let millis: u64 = timeout.strip_suffix('m').unwrap().parse().unwrap();
    assert!(millis > 0 && millis <= 5000, "{timeout}");

    // A call the upstream holds past the deadline: the gateway gives up and says so. Over a
    // bare HTTP/2 connection, which (unlike tonic's channel) does not enforce the deadline
    // itself; the gateway's own message shows the answer is the gateway's.
    let bare = Bare::connect(parts.gw.proxy_addrs[0]).await;
    let mut call = request(
        EchoRequest {
            hold: true,
            ..ask("slow")
        },
        Some(&token),
    );
    call.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let status = tokio::time::timeout(WITHIN, say_bare(&bare, parts.gw.proxy_addrs[0], call))
        .await
        .expect("the gateway answers once the deadline passes")
        .expect_err("deadline exceeded");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(status.message(), "the upstream did not answer in time");
    assert!(started.elapsed() >= Duration::from_millis(250));
    parts.upstream.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_share_the_h2c_listener() {
    let upstream = RecordingUpstream::start().await;
    let yaml = GatewayYaml::new()
        .server("h2c", true)
        .route(Route::new("public", "/public", upstream.url()).exchange(Exchange::none()))
        .to_yaml();
    let gw = gateway(&yaml).await;
    let url = format!("{}/public", gw.url());
    let http1 = client().get(&url).send().await.unwrap();
    assert_eq!(http1.version(), http::Version::HTTP_11);
    assert_eq!(http1.status(), 200);
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(WITHIN)
        .build()
        .unwrap()
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(h2.version(), http::Version::HTTP_2);
    assert_eq!(h2.status(), 200);
    assert_eq!(h2.text().await.unwrap(), "upstream ok");
    assert_eq!(upstream.seen().len(), 2);

    // Without `server.h2c` a plain listener speaks HTTP/1.1 only.
    let yaml = GatewayYaml::new()
        .route(Route::new("public", "/public", upstream.url()).exchange(Exchange::none()))
        .to_yaml();
    let gw = gateway(&yaml).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(WITHIN)
        .build()
        .unwrap()
        .get(format!("{}/public", gw.url()))
        .send()
        .await;
    assert!(h2.is_err(), "{h2:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_too_slow_to_show_its_protocol_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = RecordingUpstream::start().await;
    let yaml = GatewayYaml::new()
        .server("h2c", true)
        .route(Route::new("public", "/public", upstream.url()).exchange(Exchange::none()))
        .to_yaml();
    let gw = gateway(&yaml).await;
    // Fewer bytes than the HTTP/2 preface, then nothing: without a bound the gateway would
    // wait for the rest as long as the client keeps the connection open.
    let mut slow = tokio::net::TcpStream::connect(gw.proxy_addrs[0])
        .await
        .unwrap();
    slow.write_all(b"GET /public").await.unwrap();
    let started = std::time::Instant::now();
    let limit = txgate::server::PREFACE_TIMEOUT + WITHIN;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(limit, slow.read_to_end(&mut rest))
        .await
        .expect("the gateway closes the connection");
    assert!(read.is_ok_and(|n| n == 0), "closed without an answer");
    assert!(started.elapsed() >= txgate::server::PREFACE_TIMEOUT - Duration::from_secs(1));
    // A client that sends its request at once is served meanwhile and after.
    let response = client()
        .get(format!("{}/public", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_use_the_upstreams_protocol() {
    // An h2-only upstream answers an HTTP/1.1 health check with a broken connection; over
    // HTTP/2 the check reaches the server (which answers the unknown path with a gRPC status
    // in a 200, healthy by the 2xx rule).
    let ca = TestCa::new("health");
    for (protocol, upstream, uri) in [
        ("h2c", GrpcUpstream::h2c().await, "http://127.0.0.1/healthz"),
        (
            "h2",
            GrpcUpstream::h2(&ca).await,
            "https://127.0.0.1/healthz",
        ),
    ] {
        let mut peers = Upstream::peers(&[upstream.url()])
            .set("protocol", protocol)
            .health_check("/healthz", Duration::from_millis(100), 1, 1);
        if protocol == "h2" {
            peers = peers.tls(serde_json::json!({ "ca_file": ca.ca_file }));
        }
        let yaml = GatewayYaml::new()
            .route(Route::new("echo", "/echo.Echo", peers).exchange(Exchange::none()))
            .to_yaml();
        let _gw = gateway(&yaml).await;
        let check = common::eventually(&format!("an {protocol} health check"), WITHIN, || async {
            upstream
                .seen()
                .into_iter()
                .find(|s| s.request.uri.ends_with("/healthz"))
        })
        .await;
        assert_eq!(check.version, http::Version::HTTP_2, "{protocol}");
        assert_eq!(check.request.uri, uri, "{protocol}");
    }
}
