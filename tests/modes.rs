//! Exchange modes, inbound validation, client authentication and provider profiles, each
//! through a real gateway with a request-capturing STS (or the development STS) on
//! `127.0.0.1:0`.

mod common;

use base64::Engine;
use common::tls::dead_addr;
use common::yaml::{Actor, Exchange, GatewayYaml, Inbound, Route, TokenService};
use common::{
    Behavior, RecordingUpstream, TestIssuer, TestSts, caller_token, eventually, gateway, get,
    private_key_pem, unsigned_jwt,
};
use serde_json::json;
use std::time::Duration;

const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// A config with one token service (`service`, named `corp` unless the route says otherwise)
/// and one route `r` on `/` whose `exchange:` block is `exchange`.
fn yaml(service: TokenService, upstream: &RecordingUpstream, exchange: Exchange) -> String {
    GatewayYaml::new()
        .token_service(service)
        .route(Route::new("r", "/", upstream.url()).exchange(exchange))
        .to_yaml()
}

/// `corp` at `sts`, validating callers' JWTs from `issuer` for the audience `gateway-api`.
fn validating(sts: &TestSts, issuer: &TestIssuer) -> TokenService {
    TokenService::at(sts).inbound(Inbound::jwt_of(issuer).audiences(&["gateway-api"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegation_sends_the_gateways_own_token_as_actor_and_caches_it() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml(
        TokenService::at(&sts),
        &upstream,
        Exchange::delegation("corp")
            .audience("https://orders.example.com")
            .actor(Actor::own_token("gateway:act")),
    ))
    .await;
    let alice = caller_token();
    let bob = caller_token();
    assert_eq!(get(&gw.url(), Some(&alice)).await.status, 200);
    assert_eq!(get(&gw.url(), Some(&bob)).await.status, 200);
    assert_eq!(get(&gw.url(), Some(&alice)).await.status, 200);

    let calls = sts.captured();
    assert_eq!(
        calls.len(),
        3,
        "one actor token, then one exchange per caller"
    );
    assert_eq!(calls[0].param("grant_type"), Some("client_credentials"));
    assert_eq!(calls[0].param("scope"), Some("gateway:act"));
    assert_eq!(calls[0].param("subject_token"), None);
    for (call, subject) in [(&calls[1], &alice), (&calls[2], &bob)] {
        assert_eq!(call.param("grant_type"), Some(TOKEN_EXCHANGE));
        assert_eq!(call.param("subject_token"), Some(subject.as_str()));
        assert_eq!(
            call.param("actor_token"),
            Some("xt-1"),
            "the cached actor token"
        );
        assert_eq!(call.param("actor_token_type"), Some(ACCESS_TOKEN_TYPE));
        assert_eq!(call.param("audience"), Some("https://orders.example.com"));
    }
    let seen = upstream.seen();
    assert_eq!(seen[0].bearer(), Some("xt-2"));
    assert_eq!(seen[1].bearer(), Some("xt-3"));
    assert_eq!(seen[2].bearer(), Some("xt-2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegation_reads_the_actor_token_from_a_file() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let file = std::env::temp_dir().join(format!("txgate-actor-{}", rand::random::<u64>()));
    std::fs::write(&file, "platform-actor-token\n").unwrap();
    let gw = gateway(&yaml(
        TokenService::at(&sts),
        &upstream,
        Exchange::delegation("corp").actor(Actor::token_file(&file).token_type("jwt")),
    ))
    .await;
    assert_eq!(get(&gw.url(), Some(&caller_token())).await.status, 200);
    let calls = sts.captured();
    assert_eq!(
        calls.len(),
        1,
        "no client-credentials call for a file actor"
    );
    assert_eq!(calls[0].param("actor_token"), Some("platform-actor-token"));
    assert_eq!(
        calls[0].param("actor_token_type"),
        Some("urn:ietf:params:oauth:token-type:jwt")
    );
    let _ = std::fs::remove_file(&file);
}

/// A rotated actor token file is picked up by the background watcher: requests never touch
/// the file system, and a fresh caller's exchange carries the new actor token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_actor_token_file_is_picked_up() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let file = std::env::temp_dir().join(format!("txgate-actor-{}", rand::random::<u64>()));
    std::fs::write(&file, "actor-before-rotation\n").unwrap();
    let gw = gateway(&yaml(
        TokenService::at(&sts),
        &upstream,
        Exchange::delegation("corp").actor(Actor::token_file(&file)),
    ))
    .await;
    assert_eq!(get(&gw.url(), Some(&caller_token())).await.status, 200);
    std::fs::write(&file, "actor-after-rotation\n").unwrap();
    // A modification time the watcher cannot mistake for the first one, on any file system.
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(10))
        .unwrap();
    eventually(
        "a fresh caller's exchange carries the rotated actor token",
        Duration::from_secs(20),
        || async {
            let status = get(&gw.url(), Some(&caller_token())).await.status;
            let last = sts
                .captured()
                .last()
                .and_then(|c| c.param("actor_token").map(str::to_string));
            status == 200 && last.as_deref() == Some("actor-after-rotation")
        },
    )
    .await;
    let _ = std::fs::remove_file(&file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_may_act_refuses_subjects_that_do_not_name_the_actor() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let file = std::env::temp_dir().join(format!("txgate-actor-{}", rand::random::<u64>()));
    std::fs::write(
        &file,
        unsigned_jwt(json!({"sub": "gateway-svc", "iss": "https://idp"})),
    )
    .unwrap();
    let gw = gateway(&yaml(
        TokenService::at(&sts),
        &upstream,
        Exchange::delegation("corp")
            .require_may_act()
            .actor(Actor::token_file(&file)),
    ))
    .await;
    let allowed = unsigned_jwt(json!({"sub": "alice", "may_act": {"sub": "gateway-svc"}}));
    let other_actor = unsigned_jwt(json!({"sub": "bob", "may_act": {"sub": "someone-else"}}));
    let wrong_issuer = unsigned_jwt(
        json!({"sub": "carol", "may_act": {"sub": "gateway-svc", "iss": "https://other"}}),
    );
    let no_claim = unsigned_jwt(json!({"sub": "dave"}));
    assert_eq!(get(&gw.url(), Some(&allowed)).await.status, 200);
    for token in [&other_actor, &wrong_issuer, &no_claim] {
        let response = get(&gw.url(), Some(token)).await;
        assert_eq!(response.status, 403);
        assert!(
            response.headers["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("insufficient_scope")
        );
    }
    assert_eq!(sts.calls(), 1, "refused subjects never reach the STS");
    let _ = std::fs::remove_file(&file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_forwards_the_gateways_token_after_validating_the_caller() {
    let sts = TestSts::start(Behavior::issue()).await;
    let issuer = TestIssuer::start().await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml(
        validating(&sts, &issuer),
        &upstream,
        Exchange::client_credentials("corp")
            .audience("https://inventory.example.com")
            .scope("inventory:read"),
    ))
    .await;
    let alice = issuer.sign(json!({"sub": "alice", "aud": "gateway-api"}));
    let bob = issuer.sign(json!({"sub": "bob", "aud": ["other", "gateway-api"]}));
    assert_eq!(get(&gw.url(), Some(&alice)).await.status, 200);
    assert_eq!(get(&gw.url(), Some(&bob)).await.status, 200);
    let calls = sts.captured();
    assert_eq!(calls.len(), 1, "one machine token shared by all callers");
    assert_eq!(calls[0].param("grant_type"), Some("client_credentials"));
    assert_eq!(
        calls[0].param("audience"),
        Some("https://inventory.example.com")
    );
    assert_eq!(calls[0].param("scope"), Some("inventory:read"));
    assert_eq!(calls[0].param("subject_token"), None);
    let seen = upstream.seen();
    assert!(seen.iter().all(|s| s.bearer() == Some("xt-1")));
    assert!(!seen[0].everything().contains(&alice));

    // A caller token that fails validation is refused before any STS call.
    let calls_before = sts.calls();
    let wrong_audience = issuer.sign(json!({"sub": "eve", "aud": "elsewhere"}));
    let forged = unsigned_jwt(json!({"sub": "eve", "aud": "gateway-api", "iss": issuer.issuer}));
    for token in [wrong_audience.as_str(), forged.as_str(), "opaque-garbage"] {
        let response = get(&gw.url(), Some(token)).await;
        assert_eq!(response.status, 401, "{token}");
        assert!(
            response.headers["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token")
        );
    }
    assert_eq!(get(&gw.url(), None).await.status, 401);
    assert_eq!(sts.calls(), calls_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_with_anonymous_callers_needs_no_token() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml(
        TokenService::at(&sts),
        &upstream,
        Exchange::client_credentials("corp").caller("anonymous"),
    ))
    .await;
    assert_eq!(get(&gw.url(), None).await.status, 200);
    let stray = caller_token();
    assert_eq!(get(&gw.url(), Some(&stray)).await.status, 200);
    let seen = upstream.seen();
    assert!(seen.iter().all(|s| s.bearer() == Some("xt-1")));
    assert!(
        !seen[1].everything().contains(&stray),
        "a stray caller token is still removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_token_without_sub_is_exchanged_by_impersonation() {
    // PingOne machine-to-machine: a service's client-credentials token is the subject.
    let sts = TestSts::start(Behavior::issue()).await;
    let issuer = TestIssuer::start().await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml(
        validating(&sts, &issuer),
        &upstream,
        Exchange::impersonation("corp").scope("orders:read"),
    ))
    .await;
    let machine = issuer.sign(
        json!({"client_id": "billing-service", "aud": "gateway-api", "scope": "orders:read"}),
    );
    let response = get(&gw.url(), Some(&machine)).await;
    assert_eq!(response.status, 200);
    let call = &sts.captured()[0];
    assert_eq!(call.param("subject_token"), Some(machine.as_str()));
    assert_eq!(call.param("subject_token_type"), Some(ACCESS_TOKEN_TYPE));
    assert_eq!(upstream.seen()[0].bearer(), Some("xt-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_tampered_tokens_fail_locally() {
    let sts = TestSts::start(Behavior::issue()).await;
    let issuer = TestIssuer::start().await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml(
        validating(&sts, &issuer),
        &upstream,
        Exchange::impersonation("corp"),
    ))
    .await;
    let expired = issuer.sign(json!({"sub": "a", "aud": "gateway-api", "exp": 1_000_000}));
    let good = issuer.sign(json!({"sub": "a", "aud": "gateway-api"}));
    let mut tampered = good.clone();
    tampered.replace_range(tampered.len() - 4.., "AAAA");
    let other_issuer =
        issuer.sign(json!({"sub": "a", "aud": "gateway-api", "iss": "https://evil"}));
    for token in [&expired, &tampered, &other_issuer] {
        assert_eq!(get(&gw.url(), Some(token)).await.status, 401);
    }
    assert_eq!(sts.calls(), 0);
    assert_eq!(get(&gw.url(), Some(&good)).await.status, 200);
    assert_eq!(sts.calls(), 1);
}

fn verify_assertion(
    assertion: &str,
    key: jsonwebtoken::DecodingKey,
    alg: jsonwebtoken::Algorithm,
    audience: &str,
) -> serde_json::Value {
    let mut validation = jsonwebtoken::Validation::new(alg);
    validation.set_audience(&[audience]);
    validation.set_issuer(&["gateway"]);
    jsonwebtoken::decode::<serde_json::Value>(assertion, &key, &validation)
        .expect("the assertion verifies")
        .claims
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_jwt_signs_a_fresh_assertion_per_call() {
    for (kind, alg) in [
        ("ec", jsonwebtoken::Algorithm::ES256),
        ("rsa", jsonwebtoken::Algorithm::RS256),
    ] {
        let sts = TestSts::start(Behavior::issue()).await;
        let upstream = RecordingUpstream::start().await;
        let (pem, public) = private_key_pem(kind);
        let gw = gateway(&yaml(
            TokenService::at(&sts).private_key_jwt(&pem, "key-1"),
            &upstream,
            Exchange::impersonation("corp"),
        ))
        .await;
        assert_eq!(get(&gw.url(), Some(&caller_token())).await.status, 200);
        assert_eq!(get(&gw.url(), Some(&caller_token())).await.status, 200);
        let calls = sts.captured();
        let mut jtis = Vec::new();
        for call in &calls {
            assert_eq!(call.authorization, None, "{kind}");
            assert_eq!(call.param("client_id"), Some("gateway"));
            assert_eq!(
                call.param("client_assertion_type"),
                Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            );
            let assertion = call.param("client_assertion").unwrap();
            let header = jsonwebtoken::decode_header(assertion).unwrap();
            assert_eq!(header.alg, alg);
            assert_eq!(header.kid.as_deref(), Some("key-1"));
            let key = match kind {
                "ec" => jsonwebtoken::DecodingKey::from_ec_der(&public),
                _ => jsonwebtoken::DecodingKey::from_rsa_der(&public),
            };
            let claims = verify_assertion(assertion, key, alg, &sts.token_endpoint());
            assert_eq!(claims["sub"], "gateway");
            let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
            assert!(lifetime <= 60, "short-lived: {lifetime}");
            jtis.push(claims["jti"].as_str().unwrap().to_string());
        }
        assert_eq!(jtis.len(), 2);
        assert_ne!(jtis[0], jtis[1], "a unique jti per assertion");
        let _ = std::fs::remove_file(&pem);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_jwt_signs_with_the_secret() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml(
        TokenService::at(&sts).auth_method("client_secret_jwt"),
        &upstream,
        Exchange::impersonation("corp"),
    ))
    .await;
    assert_eq!(get(&gw.url(), Some(&caller_token())).await.status, 200);
    let call = &sts.captured()[0];
    assert_eq!(
        call.param("client_secret"),
        None,
        "the secret itself is never sent"
    );
    let claims = verify_assertion(
        call.param("client_assertion").unwrap(),
        jsonwebtoken::DecodingKey::from_secret(common::CLIENT_SECRET.as_bytes()),
        jsonwebtoken::Algorithm::HS256,
        &sts.token_endpoint(),
    );
    assert_eq!(claims["iss"], "gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_on_behalf_of_sends_the_jwt_bearer_grant() {
    let sts = TestSts::start(Behavior::Reply {
        status: 200,
        // Entra's answer has no issued_token_type.
        body: r#"{"token_type":"Bearer","scope":"api://orders/.default","expires_in":3599,"ext_expires_in":3599,"access_token":"entra-token"}"#.into(),
        headers: vec![("content-type".into(), "application/json".into())],
    })
    .await;
    let upstream = RecordingUpstream::start().await;
    let gw = gateway(&yaml(
        TokenService::at(&sts)
            .profile("entra_obo", &[("tenant", "contoso.onmicrosoft.com")])
            .auth_method("client_secret_post"),
        &upstream,
        Exchange::impersonation("corp").scope("api://orders/.default"),
    ))
    .await;
    let caller = caller_token();
    assert_eq!(get(&gw.url(), Some(&caller)).await.status, 200);
    let call = &sts.captured()[0];
    assert_eq!(
        call.form,
        vec![
            (
                "grant_type".to_string(),
                "urn:ietf:params:oauth:grant-type:jwt-bearer".to_string()
            ),
            ("assertion".to_string(), caller.clone()),
            (
                "requested_token_use".to_string(),
                "on_behalf_of".to_string()
            ),
            ("scope".to_string(), "api://orders/.default".to_string()),
            ("client_id".to_string(), "gateway".to_string()),
            (
                "client_secret".to_string(),
                common::CLIENT_SECRET.to_string()
            ),
        ]
    );
    assert_eq!(upstream.seen()[0].bearer(), Some("entra-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pingone_keycloak_and_okta_profiles_send_rfc8693_with_only_configured_parameters() {
    for (profile, profile_keys, exchange, expected_tail) in [
        (
            "pingone",
            &[
                ("environment_id", "3f1b6c2e-8a4d-4e1f-9b7a-0c5d2e8f1a34"),
                ("region", "eu"),
            ][..],
            Exchange::impersonation("corp")
                .scope("orders:read")
                .subject_token_type("id_token"),
            vec![
                (
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:id_token",
                ),
                ("scope", "orders:read"),
            ],
        ),
        (
            "keycloak",
            &[("base_url", "https://sso.example.com"), ("realm", "corp")][..],
            Exchange::impersonation("corp")
                .audience("orders-api")
                .requested_token_type("access_token"),
            vec![
                ("subject_token_type", ACCESS_TOKEN_TYPE),
                ("audience", "orders-api"),
                ("requested_token_type", ACCESS_TOKEN_TYPE),
            ],
        ),
        (
            "okta",
            &[(
                "authorization_server",
                "https://example.okta.com/oauth2/default",
            )][..],
            Exchange::impersonation("corp")
                .audience("api://orders")
                .scope("orders.read"),
            vec![
                ("subject_token_type", ACCESS_TOKEN_TYPE),
                ("audience", "api://orders"),
                ("scope", "orders.read"),
            ],
        ),
    ] {
        let sts = TestSts::start(Behavior::issue()).await;
        let upstream = RecordingUpstream::start().await;
        // The explicit token_endpoint (the capturing STS) wins over the profile's.
        let gw = gateway(&yaml(
            TokenService::at(&sts).profile(profile, profile_keys),
            &upstream,
            exchange,
        ))
        .await;
        let caller = caller_token();
        assert_eq!(get(&gw.url(), Some(&caller)).await.status, 200, "{profile}");
        let call = &sts.captured()[0];
        let mut expected = vec![
            ("grant_type".to_string(), TOKEN_EXCHANGE.to_string()),
            ("subject_token".to_string(), caller.clone()),
        ];
        expected.extend(
            expected_tail
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        assert_eq!(call.form, expected, "{profile}");
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("gateway:{}", common::CLIENT_SECRET))
        );
        assert_eq!(call.authorization.as_deref(), Some(basic.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_introspection_against_the_development_sts() {
    let (sts, issuer, stop) = common::dev_sts().await;
    let upstream = RecordingUpstream::start().await;
    // Only the issuer: discovery finds the token and introspection endpoints.
    let gw = gateway(&yaml(
        TokenService::discovered("dev", &issuer).inbound(Inbound::introspection()),
        &upstream,
        Exchange::impersonation("dev").audience("https://orders.example.com"),
    ))
    .await;
    let user = sts.issue_user_token("alice", None, None).unwrap();
    assert_eq!(get(&gw.url(), Some(&user)).await.status, 200);
    assert_eq!(sts.tokens_issued(), 1);
    let forwarded = upstream.seen()[0].bearer().unwrap().to_string();
    let claims = txgate::jwt::unverified_claims(&forwarded).unwrap();
    assert_eq!(claims["aud"], "https://orders.example.com");
    assert_eq!(claims["sub"], "alice");

    // Not a token the STS knows: introspection says inactive, and no exchange is attempted.
    let response = get(&gw.url(), Some(&caller_token())).await;
    assert_eq!(response.status, 401);
    assert_eq!(sts.tokens_issued(), 1);
    drop(gw);
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_jwks_and_requests_get_503_until_then() {
    let sts = TestSts::start(Behavior::issue()).await;
    let upstream = RecordingUpstream::start().await;
    let jwks_uri = format!("http://{}/jwks", dead_addr());
    let yaml = GatewayYaml::new()
        .admin()
        .token_service(TokenService::at(&sts).inbound(Inbound::jwt("https://idp", &jwks_uri)))
        .route(Route::new("r", "/", upstream.url()).exchange(Exchange::impersonation("corp")))
        .to_yaml();
    txgate::tls::install_crypto_provider();
    let gw = txgate::server::RunningGateway::start(&common::config(&yaml)).unwrap();
    let admin = gw.admin_addr.unwrap();
    let ready = get(&format!("http://{admin}/readyz"), None).await;
    assert_eq!(ready.status, 503, "not ready without a JWKS");
    let healthy = get(&format!("http://{admin}/healthz"), None).await;
    assert_eq!(healthy.status, 200, "alive all the same");
    let token = unsigned_jwt(json!({"sub": "a", "iss": "https://idp"}));
    let response = get(&gw.url(), Some(&token)).await;
    assert_eq!(response.status, 503);
    assert!(response.headers.contains_key("retry-after"));
    assert_eq!(sts.calls(), 0);
}
