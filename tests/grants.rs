//! Grants beyond one token exchange: the jwt-bearer grant, chains of exchanges, the token
//! service chosen by the caller's issuer, step-up answers relayed, Transaction Tokens issued
//! and validated. Real gateway, real HTTP STSs (scripted, and the development STS), real
//! upstreams, all on 127.0.0.1:0.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{
    Behavior, RecordingUpstream, TestIssuer, TestSts, caller_token, client, gateway, get,
};
use serde_json::json;

const TXN: &str = "urn:ietf:params:oauth:token-type:txn_token";

fn service(name: &str, sts: &TestSts, extra: &str) -> String {
    format!(
        "  {name}: {{ token_endpoint: \"{}\", client_id: gateway, client_secret: \"${{TEST_CLIENT_SECRET}}\"{extra} }}\n",
        sts.token_endpoint()
    )
}

fn gateway_yaml(services: &str, routes: &str) -> String {
    format!("server: {{ listen: [\"127.0.0.1:0\"] }}\ntoken_services:\n{services}routes:\n{routes}")
}

fn issued(body: serde_json::Value) -> Behavior {
    Behavior::Reply {
        status: 200,
        body: body.to_string(),
        headers: vec![("content-type".into(), "application/json".into())],
    }
}

fn step_up(body: serde_json::Value) -> Behavior {
    Behavior::Reply {
        status: 400,
        body: body.to_string(),
        headers: vec![("content-type".into(), "application/json".into())],
    }
}

/// A gateway with token service `corp` at `sts` and one route `r` on `/` to `upstream`, whose
/// `exchange` map holds `exchange` (after `mode: impersonation, token_service: corp`).
async fn one_route(
    sts: &TestSts,
    service_extra: &str,
    upstream: &RecordingUpstream,
    exchange: &str,
) -> txgate::server::RunningGateway {
    gateway(&gateway_yaml(
        &service("corp", sts, service_extra),
        &format!(
            "  - {{ name: r, match: {{ path_prefix: / }}, upstream: \"{}\", exchange: {{ mode: impersonation, token_service: corp{exchange} }} }}\n",
            upstream.url()
        ),
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jwt_bearer_grant_sends_the_caller_token_as_the_assertion() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = one_route(
        &sts,
        "",
        &upstream,
        ", grant: jwt_bearer, scope: \"orders:read\", resource: [\"https://orders.example.com\"]",
    )
    .await;
    let caller = caller_token();
    assert_eq!(get(&gw.url(), Some(&caller)).await.status, 200);
    let call = &sts.captured()[0];
    assert_eq!(
        call.param("grant_type"),
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    );
    assert_eq!(call.param("assertion"), Some(caller.as_str()));
    assert_eq!(call.param("scope"), Some("orders:read"));
    assert_eq!(call.param("resource"), Some("https://orders.example.com"));
    assert_eq!(call.param("subject_token"), None);
    assert_eq!(call.param("requested_token_use"), None);
    let seen = &upstream.seen()[0];
    assert_eq!(seen.bearer(), Some("xt-1"));
    assert!(!seen.everything().contains(&caller));
}

/// Two token services: A (the user's domain) and B (the resource's authorization server).
async fn chain_gateway(
    a: &TestSts,
    b: &TestSts,
    upstream: &RecordingUpstream,
) -> txgate::server::RunningGateway {
    gateway(&gateway_yaml(
        &format!("{}{}", service("domain-a", a, ""), service("domain-b", b, "")),
        &format!(
            "  - name: chained\n    match: {{ path_prefix: / }}\n    upstream: \"{}\"\n    exchange:\n      mode: impersonation\n      chain:\n        - {{ token_service: domain-a, audience: [\"https://as.b.example\"], requested_token_type: jwt }}\n        - {{ token_service: domain-b, grant: jwt_bearer, scope: \"orders:read\", resource: [\"https://api.b.example\"] }}\n",
            upstream.url()
        ),
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_sends_each_result_to_the_next_step_and_caches_each_by_its_own_expiry() {
    // Step 1's grant lives five minutes; step 2's token is not reusable (expires_in 0).
    let a = TestSts::start(issued(json!({
        "access_token": "grant-from-a-0123456789",
        "issued_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_type": "N_A",
        "expires_in": 300,
    })))
    .await;
    let b = TestSts::start(Behavior::Issue {
        expires_in: Some(json!(0)),
    })
    .await;
    let upstream = RecordingUpstream::start().await;
    let gw = chain_gateway(&a, &b, &upstream).await;
    let caller = caller_token();
    assert_eq!(get(&gw.url(), Some(&caller)).await.status, 200);

    let step1 = &a.captured()[0];
    assert_eq!(
        step1.param("grant_type"),
        Some("urn:ietf:params:oauth:grant-type:token-exchange")
    );
    assert_eq!(step1.param("subject_token"), Some(caller.as_str()));
    assert_eq!(step1.param("audience"), Some("https://as.b.example"));
    assert_eq!(
        step1.param("requested_token_type"),
        Some("urn:ietf:params:oauth:token-type:jwt")
    );
    let step2 = &b.captured()[0];
    assert_eq!(
        step2.param("grant_type"),
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    );
    assert_eq!(step2.param("assertion"), Some("grant-from-a-0123456789"));
    assert_eq!(step2.param("resource"), Some("https://api.b.example"));
    assert!(
        b.captured()
            .iter()
            .all(|c| !c.form.iter().any(|(_, v)| v == &caller)),
        "domain B never sees the caller's token"
    );
    let seen = &upstream.seen()[0];
    assert_eq!(seen.bearer(), Some("xt-1"));
    assert!(!seen.everything().contains(&caller));
    assert!(!seen.everything().contains("grant-from-a"));

    // The final token expired at once; the intermediate grant is still good: only B is asked.
    assert_eq!(get(&gw.url(), Some(&caller)).await.status, 200);
    assert_eq!((a.calls(), b.calls()), (1, 2));
    assert_eq!(upstream.seen()[1].bearer(), Some("xt-2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_of_a_fresh_caller_make_one_call_per_step() {
    let slow = |b: Behavior| Behavior::Delay(Duration::from_millis(300), Box::new(b));
    let a = TestSts::start(slow(issued(json!({
        "access_token": "grant-from-a-0123456789",
        "issued_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "expires_in": 300,
    }))))
    .await;
    let b = TestSts::start(slow(Behavior::issue())).await;
    let upstream = RecordingUpstream::start().await;
    let gw = chain_gateway(&a, &b, &upstream).await;
    let caller = Arc::new(caller_token());
    let url = gw.url();
    let requests: Vec<_> = (0..50)
        .map(|_| {
            let (url, caller) = (url.clone(), caller.clone());
            tokio::spawn(async move { get(&url, Some(&caller)).await.status.as_u16() })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }
    assert_eq!((a.calls(), b.calls()), (1, 1), "one STS call per step");
    assert!(upstream.seen().iter().all(|s| s.bearer() == Some("xt-1")));
    // Cached as a whole: a 51st request calls nobody.
    assert_eq!(get(&url, Some(&caller)).await.status, 200);
    assert_eq!((a.calls(), b.calls()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_refuses_a_cached_grant_gets_a_fresh_one_once() {
    let a = TestSts::start(issued(json!({
        "access_token": "grant-from-a-0123456789",
        "issued_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "expires_in": 300,
    })))
    .await;
    // B takes each assertion once: the second use of the cached grant is refused.
    let b = TestSts::start(Behavior::Sequence(vec![
        Behavior::Issue {
            expires_in: Some(json!(0)),
        },
        Behavior::error(400, "invalid_grant"),
        Behavior::Issue {
            expires_in: Some(json!(0)),
        },
    ]))
    .await;
    let upstream = RecordingUpstream::start().await;
    let gw = chain_gateway(&a, &b, &upstream).await;
    let caller = caller_token();
    assert_eq!(get(&gw.url(), Some(&caller)).await.status, 200);
    assert_eq!(get(&gw.url(), Some(&caller)).await.status, 200);
    assert_eq!((a.calls(), b.calls()), (2, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_whose_last_step_echoes_the_caller_token_is_refused() {
    let a = TestSts::start(issued(json!({
        "access_token": "grant-from-a-0123456789",
        "expires_in": 300,
    })))
    .await;
    let caller = caller_token();
    let b = TestSts::start(issued(json!({
        "access_token": format!("wrapped.{caller}"),
        "expires_in": 300,
    })))
    .await;
    let upstream = RecordingUpstream::start().await;
    let gw = chain_gateway(&a, &b, &upstream).await;
    let reply = get(&gw.url(), Some(&caller)).await;
    assert_eq!(reply.status, 502);
    assert!(upstream.seen().is_empty());
    assert!(!reply.body.contains(&caller));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_issuer_picks_the_token_service() {
    let (idp1, idp2, stranger) = (
        TestIssuer::start().await,
        TestIssuer::start().await,
        TestIssuer::start().await,
    );
    let (sts1, sts2) = (
        TestSts::start(Behavior::issue()).await,
        TestSts::start(Behavior::issue()).await,
    );
    let inbound = |idp: &TestIssuer| {
        format!(
            ", inbound: {{ jwt: {{ issuer: \"{}\", jwks_uri: \"{}\" }} }}",
            idp.issuer, idp.jwks_uri
        )
    };
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&gateway_yaml(
        &format!(
            "{}{}",
            service("tenant-one", &sts1, &inbound(&idp1)),
            service("tenant-two", &sts2, &inbound(&idp2))
        ),
        &format!(
            "  - {{ name: r, match: {{ path_prefix: / }}, upstream: \"{}\", exchange: {{ mode: impersonation, token_services: [tenant-one, tenant-two], audience: [\"https://orders.example.com\"] }} }}\n",
            upstream.url()
        ),
    ))
    .await;
    let one = idp1.sign(json!({"sub": "alice"}));
    let two = idp2.sign(json!({"sub": "bob"}));
    assert_eq!(get(&gw.url(), Some(&one)).await.status, 200);
    assert_eq!((sts1.calls(), sts2.calls()), (1, 0));
    assert_eq!(
        sts1.captured()[0].param("subject_token"),
        Some(one.as_str())
    );
    assert_eq!(get(&gw.url(), Some(&two)).await.status, 200);
    assert_eq!((sts1.calls(), sts2.calls()), (1, 1));
    assert_eq!(
        sts2.captured()[0].param("subject_token"),
        Some(two.as_str())
    );

    // No listed issuer, an issuer's name on another's signature, no issuer at all: 401, and
    // no token service hears of them.
    let forged = idp2.sign(json!({"sub": "mallory", "iss": idp1.issuer}));
    for token in [
        stranger.sign(json!({"sub": "eve"})),
        forged,
        common::unsigned_jwt(json!({"sub": "eve"})),
        caller_token(),
    ] {
        let reply = get(&gw.url(), Some(&token)).await;
        assert_eq!(reply.status, 401, "{}", reply.body);
        assert_eq!(reply.json()["error"], "invalid_token");
    }
    assert_eq!((sts1.calls(), sts2.calls()), (1, 1));
    assert_eq!(upstream.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_up_answer_is_relayed_with_its_parameters_and_neither_cached_nor_counted() {
    let sts = TestSts::start(step_up(json!({
        "error": "insufficient_user_authentication",
        "error_description": "from the STS",
        "acr_values": "urn:example:mfa phr",
        "max_age": 300,
    })))
    .await;
    let upstream = RecordingUpstream::start().await;
    let gw = one_route(
        &sts,
        ", circuit_breaker: { failure_threshold: 2, open_for: 30s }",
        &upstream,
        ", audience: [\"https://orders.example.com\"]",
    )
    .await;
    let caller = caller_token();
    for round in 1..=4 {
        let reply = get(&gw.url(), Some(&caller)).await;
        assert_eq!(reply.status, 401, "round {round}: {}", reply.body);
        let challenge = reply.header("www-authenticate").unwrap();
        assert!(
            challenge
                .starts_with("Bearer realm=\"txgate\", error=\"insufficient_user_authentication\""),
            "{challenge}"
        );
        assert!(
            challenge.contains("acr_values=\"urn:example:mfa phr\""),
            "{challenge}"
        );
        assert!(challenge.contains("max_age=\"300\""), "{challenge}");
        let body = reply.json();
        assert_eq!(body["error"], "insufficient_user_authentication");
        assert_eq!(body["acr_values"], "urn:example:mfa phr");
        assert_eq!(body["max_age"], 300);
        // Asked again each time (never remembered), and never enough for the breaker.
        assert_eq!(sts.calls(), round);
    }
    assert!(upstream.seen().is_empty());

    // Entra's claims challenge, with quotes that must be escaped in the header.
    let claims = r#"{"access_token":{"acrs":{"essential":true,"value":"c1"}}}"#;
    sts.set(step_up(
        json!({"error": "interaction_required", "claims": claims}),
    ));
    let reply = get(&gw.url(), Some(&caller)).await;
    assert_eq!(reply.status, 401);
    let challenge = reply.header("www-authenticate").unwrap();
    assert!(
        challenge.contains(
            r#"claims="{\"access_token\":{\"acrs\":{\"essential\":true,\"value\":\"c1\"}}}""#
        ),
        "{challenge}"
    );
    assert_eq!(reply.json()["claims"], claims);
    sts.set(step_up(json!({"error": "consent_required"})));
    let reply = get(&gw.url(), Some(&caller)).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["error"], "insufficient_user_authentication");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_up_answer_that_would_carry_a_token_or_break_the_header_is_not_relayed() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = one_route(&sts, "", &upstream, "").await;
    let caller = caller_token();
    for answer in [
        json!({"error": "insufficient_user_authentication", "acr_values": format!("x {caller}")}),
        json!({"error": "interaction_required", "claims": format!("{{\"t\":\"{caller}\"}}")}),
        json!({"error": "insufficient_user_authentication", "acr_values": "a\r\nSet-Cookie: x=1"}),
        json!({"error": "insufficient_user_authentication", "max_age": "soon"}),
        json!({"error": "insufficient_user_authentication", "acr_values": "x".repeat(5000)}),
    ] {
        sts.set(step_up(answer.clone()));
        let reply = get(&gw.url(), Some(&caller)).await;
        assert_eq!(reply.status, 502, "{answer}: {}", reply.body);
        let everything = format!("{:?} {}", reply.headers, reply.body);
        assert!(!everything.contains(&caller), "{everything}");
        assert!(!everything.contains("Set-Cookie"), "{everything}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_token_goes_upstream_alone_and_is_obtained_for_each_request() {
    let tts = TestSts::start(issued(json!({
        "access_token": "txn-token-0123456789",
        "issued_token_type": TXN,
        "token_type": "N_A",
        "expires_in": 60,
    })))
    .await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&gateway_yaml(
        &service("tts", &tts, ""),
        &format!(
            "  - {{ name: txn, match: {{ path_prefix: /orders }}, upstream: \"{}\", exchange: {{ mode: transaction_token, token_service: tts, trust_domain: \"https://trust.example.com\", purpose: \"orders.read\" }} }}\n",
            upstream.url()
        ),
    ))
    .await;
    let caller = caller_token();
    let response = client()
        .post(format!(
            "{}/orders/./42/../7?access_token={caller}",
            gw.url()
        ))
        .bearer_auth(&caller)
        .header("txn-token", "forged-by-the-caller-0123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let call = &tts.captured()[0];
    assert_eq!(call.param("subject_token"), Some(caller.as_str()));
    assert_eq!(call.param("audience"), Some("https://trust.example.com"));
    assert_eq!(call.param("scope"), Some("orders.read"));
    assert_eq!(call.param("requested_token_type"), Some(TXN));
    let context = URL_SAFE_NO_PAD
        .decode(call.param("request_context").unwrap())
        .unwrap();
    let context: serde_json::Value = serde_json::from_slice(&context).unwrap();
    assert_eq!(
        context,
        json!({"method": "POST", "path": "/orders/7", "req_ip": "127.0.0.1"})
    );
    let seen = &upstream.seen()[0];
    assert_eq!(seen.header("txn-token"), Some("txn-token-0123456789"));
    assert_eq!(seen.header("authorization"), None);
    assert!(!seen.everything().contains(&caller));
    assert!(!seen.everything().contains("forged-by-the-caller"));
    // A Txn-Token is one transaction's: the next request gets its own.
    assert_eq!(
        get(&format!("{}/orders/7", gw.url()), Some(&caller))
            .await
            .status,
        200
    );
    assert_eq!(tts.calls(), 2);
    // No token, no Transaction Token.
    assert_eq!(
        get(&format!("{}/orders/7", gw.url()), None).await.status,
        401
    );
    assert_eq!(tts.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_sent_txn_token_never_passes_a_route_that_does_not_validate_it() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&gateway_yaml(
        &service("corp", &sts, ""),
        &format!(
            "  - {{ name: r, match: {{ path_prefix: /x }}, upstream: \"{0}\", exchange: {{ mode: impersonation, token_service: corp }} }}\n  - {{ name: p, match: {{ path_prefix: /public }}, upstream: \"{0}\", exchange: {{ mode: none }} }}\n",
            upstream.url()
        ),
    ))
    .await;
    for path in ["/x", "/public"] {
        let response = client()
            .get(format!("{}{path}", gw.url()))
            .bearer_auth(caller_token())
            .header("Txn-Token", "forged-by-the-caller-0123")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    for seen in upstream.seen() {
        assert_eq!(seen.header("txn-token"), None, "{}", seen.everything());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_route_passes_only_a_valid_txn_token_of_its_trust_domain() {
    let tts = TestIssuer::start().await;
    let other = TestIssuer::start().await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&format!(
        "server: {{ listen: [\"127.0.0.1:0\"] }}\nroutes:\n  - {{ name: internal, match: {{ path_prefix: / }}, upstream: \"{}\", exchange: {{ mode: none }}, inbound: {{ txn_token: {{ trust_domain: \"https://trust.example.com\", issuer: \"{}\", jwks_uri: \"{}\" }} }} }}\n",
        upstream.url(),
        tts.issuer,
        tts.jwks_uri
    ))
    .await;
    let send = |values: Vec<String>| {
        let url = gw.url();
        async move {
            let mut request = client().get(url);
            for v in values {
                request = request.header("Txn-Token", v);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    let claims = |aud: &str| {
        json!({"aud": aud, "txn": "97053963-771d-49cc-a4e3-20aad399c312", "sub": "alice",
               "purp": "orders.read", "rctx": {"req_ip": "10.0.0.1"}})
    };
    let good = tts.sign_typed("txntoken+jwt", claims("https://trust.example.com"));
    assert_eq!(send(vec![good.clone()]).await.0, 200);
    assert_eq!(upstream.seen()[0].header("txn-token"), Some(good.as_str()));

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut expired = claims("https://trust.example.com");
    expired["exp"] = (now - 3600).into();
    for (why, values) in [
        ("missing", vec![]),
        (
            "another trust domain",
            vec![tts.sign_typed("txntoken+jwt", claims("https://other.example.com"))],
        ),
        (
            "an access token, not a Txn-Token",
            vec![tts.sign(claims("https://trust.example.com"))],
        ),
        (
            "another issuer's key",
            vec![other.sign_typed("txntoken+jwt", {
                let mut c = claims("https://trust.example.com");
                c["iss"] = tts.issuer.clone().into();
                c
            })],
        ),
        ("expired", vec![tts.sign_typed("txntoken+jwt", expired)]),
        ("two of them", vec![good.clone(), good.clone()]),
        ("not a JWT", vec!["opaque-0123456789".to_string()]),
    ] {
        let (status, body) = send(values).await;
        assert_eq!(status, 401, "{why}: {body}");
        assert!(body.contains("Txn-Token"), "{why}: {body}");
    }
    assert_eq!(upstream.seen().len(), 1);
}

#[test]
fn check_verbose_prints_every_step_of_a_chain_and_the_transaction_token_request() {
    let config = common::config(
        "server: { listen: [\"127.0.0.1:0\"] }\ntoken_services:\n  idp: { token_endpoint: \"http://127.0.0.1:9/token\", client_id: gateway, client_secret: \"${TEST_CLIENT_SECRET}\" }\n  as: { token_endpoint: \"http://127.0.0.1:8/token\", client_id: gw-b, client_secret: \"${TEST_CLIENT_SECRET}\" }\nroutes:\n  - name: jag\n    match: { path_prefix: /jag }\n    upstream: \"http://127.0.0.1:7\"\n    exchange:\n      mode: impersonation\n      chain:\n        - { token_service: idp, requested_token_type: id_jag, audience: [\"https://as.example\"], resource: [\"https://api.example\"] }\n        - { token_service: as, grant: jwt_bearer, scope: \"orders:read\" }\n  - { name: txn, match: { path_prefix: /txn }, upstream: \"http://127.0.0.1:7\", exchange: { mode: transaction_token, token_service: idp, trust_domain: \"https://trust.example\", purpose: \"orders.read\", request_context: [method, client_address] } }\n",
    );
    let out = txgate::describe::verbose(&config);
    assert!(out.contains("mode chain of 2 steps"), "{out}");
    assert!(
        out.contains("step 1 at idp: POST http://127.0.0.1:9/token"),
        "{out}"
    );
    assert!(out.contains("subject_token=CALLER_TOKEN"), "{out}");
    assert!(
        out.contains("requested_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aid-jag"),
        "{out}"
    );
    assert!(
        out.contains("step 2 at as: POST http://127.0.0.1:8/token"),
        "{out}"
    );
    assert!(out.contains("assertion=RESULT_OF_STEP_1"), "{out}");
    assert!(out.contains("request_context=REQUEST_CONTEXT"), "{out}");
    assert!(out.contains("base64url JSON of method, req_ip"), "{out}");
    assert!(!out.contains(common::CLIENT_SECRET), "{out}");
}

#[test]
fn grant_keys_in_the_wrong_place_are_config_errors_at_their_key() {
    let base = "server: { listen: [\"127.0.0.1:0\"] }\ntoken_services:\n  a: { token_endpoint: \"http://127.0.0.1:9/token\", client_id: gateway, client_secret: s }\n  b: { token_endpoint: \"http://127.0.0.1:8/token\", client_id: gateway, client_secret: s }\n  j: { token_endpoint: \"http://127.0.0.1:8/token\", client_id: gateway, client_secret: s, inbound: { jwt: { issuer: \"https://idp\", jwks_uri: \"http://127.0.0.1:6/jwks\" } } }\n  k: { token_endpoint: \"http://127.0.0.1:8/token\", client_id: gateway, client_secret: s, inbound: { jwt: { issuer: \"https://idp\", jwks_uri: \"http://127.0.0.1:5/jwks\" } } }\nroutes:\n";
    for (exchange, at, says) in [
        (
            "{ mode: impersonation, chain: [ { token_service: a } ] }",
            "routes[0].exchange.chain",
            "2 to 4 steps",
        ),
        (
            "{ mode: delegation, chain: [ { token_service: a }, { token_service: b } ] }",
            "routes[0].exchange.chain",
            "use mode impersonation",
        ),
        (
            "{ mode: impersonation, token_service: a, chain: [ { token_service: a }, { token_service: b } ] }",
            "routes[0].exchange.token_service",
            "on its steps",
        ),
        (
            "{ mode: impersonation, chain: [ { token_service: a }, { token_service: nope } ] }",
            "routes[0].exchange.chain[1].token_service",
            "unknown token service",
        ),
        (
            "{ mode: impersonation, token_services: [a, b] }",
            "routes[0].exchange.token_services[0]",
            "no inbound.jwt",
        ),
        (
            "{ mode: impersonation, token_services: [j, k] }",
            "routes[0].exchange.token_services[1]",
            "the same issuer",
        ),
        (
            "{ mode: delegation, token_service: a, grant: jwt_bearer }",
            "routes[0].exchange.grant",
            "no actor token",
        ),
        (
            "{ mode: impersonation, token_service: a, grant: jwt_bearer, subject_token_type: jwt }",
            "routes[0].exchange.subject_token_type",
            "assertion",
        ),
        (
            "{ mode: transaction_token, token_service: a, purpose: p }",
            "routes[0].exchange.trust_domain",
            "required",
        ),
        (
            "{ mode: transaction_token, token_service: a, trust_domain: t, purpose: p, audience: [x] }",
            "routes[0].exchange.audience",
            "trust_domain",
        ),
        (
            "{ mode: transaction_token, token_service: a, trust_domain: t, purpose: p, purge_on_upstream_status: [401] }",
            "routes[0].exchange.purge_on_upstream_status",
            "never cached",
        ),
        (
            "{ mode: impersonation, token_service: a, purpose: p }",
            "routes[0].exchange.purpose",
            "transaction_token only",
        ),
        (
            "{ mode: none, chain: [ { token_service: a }, { token_service: b } ] }",
            "routes[0].exchange.chain",
            "mode none",
        ),
    ] {
        let yaml = format!(
            "{base}  - {{ name: r, match: {{ path_prefix: / }}, upstream: \"http://127.0.0.1:2\", exchange: {exchange} }}\n"
        );
        let error = txgate::config::Config::from_yaml(&yaml, "t.yaml", &|_| None)
            .expect_err(exchange)
            .to_string();
        assert!(error.contains(at), "{exchange}: {error}");
        assert!(error.contains(says), "{exchange}: {error}");
    }
    let txn_on_exchange = format!(
        "{base}  - {{ name: r, match: {{ path_prefix: / }}, upstream: \"http://127.0.0.1:2\", exchange: {{ mode: impersonation, token_service: a }}, inbound: {{ txn_token: {{ trust_domain: t, issuer: i, jwks_uri: \"http://127.0.0.1:4/jwks\" }} }} }}\n"
    );
    let error = txgate::config::Config::from_yaml(&txn_on_exchange, "t.yaml", &|_| None)
        .expect_err("txn_token on an exchanging route")
        .to_string();
    assert!(error.contains("routes[0].inbound.txn_token"), "{error}");
}

/// The edge gateway asks the development STS for a Transaction Token per request; an internal
/// gateway behind it validates that token (`inbound.txn_token`) and passes it on unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_tokens_from_the_development_sts_cross_an_internal_hop() {
    const TRUST: &str = "https://trust.example.com";
    let (sts, issuer, _stop) = common::dev_sts().await;
    let upstream = RecordingUpstream::start().await;
    let internal = gateway(&format!(
        "server: {{ listen: [\"127.0.0.1:0\"] }}\nroutes:\n  - {{ name: internal, match: {{ path_prefix: / }}, upstream: \"{}\", exchange: {{ mode: none }}, inbound: {{ txn_token: {{ trust_domain: \"{TRUST}\", issuer: \"{issuer}\", jwks_uri: \"{issuer}/jwks\" }} }} }}\n",
        upstream.url()
    ))
    .await;
    let edge = gateway(&format!(
        "server: {{ listen: [\"127.0.0.1:0\"] }}\ntoken_services:\n  tts: {{ issuer: \"{issuer}\", client_id: gateway, client_secret: \"${{TEST_CLIENT_SECRET}}\", inbound: {{ jwt: {{ audiences: [txgate-demo] }} }} }}\nroutes:\n  - {{ name: edge, match: {{ path_prefix: /orders }}, upstream: \"{}\", exchange: {{ mode: transaction_token, token_service: tts, trust_domain: \"{TRUST}\", purpose: \"orders.read\" }} }}\n",
        internal.url()
    ))
    .await;
    let user = sts.issue_user_token("alice", None, None).unwrap();
    let mut txns = Vec::new();
    for round in 0..2 {
        let response = client()
            .delete(format!("{}/orders/42", edge.url()))
            .bearer_auth(&user)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "round {round}");
        let seen = &upstream.seen()[round];
        assert_eq!(seen.header("authorization"), None);
        assert!(!seen.everything().contains(&user));
        let txn_token = seen.header("txn-token").expect("a Txn-Token upstream");
        let header = jsonwebtoken::decode_header(txn_token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("txntoken+jwt"));
        let claims = txgate::jwt::unverified_claims(txn_token).unwrap();
        assert_eq!(claims["iss"], issuer.as_str());
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["aud"], TRUST);
        assert_eq!(claims["purp"], "orders.read");
        assert_eq!(claims["rctx"]["method"], "DELETE");
        assert_eq!(claims["rctx"]["path"], "/orders/42");
        assert_eq!(claims["rctx"]["req_ip"], "127.0.0.1");
        assert_eq!(claims["rctx"]["req_wl"], "gateway");
        txns.push(claims["txn"].as_str().unwrap().to_string());
    }
    assert_ne!(txns[0], txns[1], "each request is its own transaction");
    assert_eq!(
        sts.tokens_issued_by(txgate::dev::sts::DevGrant::TokenExchange),
        2
    );
    // The internal hop refuses what did not come from the trust domain's service.
    let reply = client()
        .get(internal.url())
        .header("txn-token", &user)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 401);
    assert_eq!(upstream.seen().len(), 2);
}
