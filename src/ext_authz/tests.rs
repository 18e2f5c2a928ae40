//! Verdicts for Checks decided before any STS call: public routes, tokens in the URL, paths
//! that normalisation would change, a missing token.

use std::sync::Arc;

use super::*;
use crate::config::Config;

const YAML: &str = r#"
server: { ext_authz: { grpc_listen: "127.0.0.1:0" } }
token_services:
  corp: { token_endpoint: "http://127.0.0.1:1/token", client_id: gw, client_secret: s }
routes:
  - name: public
    match: { path_prefix: "/public" }
    upstream: "http://127.0.0.1:1"
    headers: { remove: ["x-internal"], set: { x-route: "public-route-value" } }
    exchange: { mode: none }
  - name: orders
    match: { path_prefix: "/orders" }
    upstream: "http://127.0.0.1:1"
    exchange: { mode: impersonation, token_service: corp, audience: ["https://orders"] }
"#;

const TOKEN: &str = "caller-token-0123456789";

fn current() -> CurrentState {
    let config = Config::from_yaml(YAML, "test.yaml", &|_| None).unwrap();
    let state = GatewayState::new(&config, None).unwrap();
    Arc::new(arc_swap::ArcSwap::from_pointee(state))
}

fn described(method: &str, target: &str, headers: &[(&str, &str)]) -> Described {
    let mut map = HeaderMap::new();
    map.insert(header::HOST, HeaderValue::from_static("api.example.com"));
    for (name, value) in headers {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    Described {
        method: method.parse().unwrap(),
        uri: target.parse().unwrap(),
        headers: map,
        client: None,
    }
}

async fn verdict(transport: Transport, d: &Described) -> Verdict {
    check(&current(), transport, d).await
}

fn denied(v: Verdict) -> Denial {
    match v {
        Verdict::Deny(d) => d,
        Verdict::Allow(m) => panic!("allowed: {m:?}"),
    }
}

#[tokio::test]
async fn a_public_route_is_allowed_without_the_callers_token_anywhere() {
    let bearer = format!("Bearer {TOKEN}");
    let copy = format!("x {TOKEN} y");
    let d = described(
        "GET",
        "/public/a?x=1",
        &[
            ("authorization", &bearer),
            ("x-forwarded-access-token", &copy),
            ("x-internal", "1"),
            ("x-route", "caller-value"),
            ("x-fine", "ok"),
            ("txn-token", "from-outside"),
        ],
    );
    let Verdict::Allow(m) = verdict(Transport::Grpc, &d).await else {
        panic!("denied")
    };
    assert_eq!(
        m.remove,
        vec![
            header::AUTHORIZATION,
            HeaderName::from_static("txn-token"),
            HeaderName::from_static("x-internal"),
            HeaderName::from_static("x-forwarded-access-token"),
        ]
    );
    assert_eq!(
        m.set,
        vec![(
            HeaderName::from_static("x-route"),
            HeaderValue::from_static("public-route-value")
        )]
    );
    assert!(m.remove_query.is_empty());
}

#[tokio::test]
async fn a_query_token_is_removed_over_grpc_and_refused_over_http() {
    let d = described("GET", &format!("/public/a?access_token={TOKEN}&b=2"), &[]);
    let Verdict::Allow(m) = verdict(Transport::Grpc, &d).await else {
        panic!("denied")
    };
    assert_eq!(m.remove_query, vec![QUERY_TOKEN]);
    let refused = denied(verdict(Transport::Http, &d).await);
    assert_eq!(refused.status, 400);
    assert!(!refused.body.contains(TOKEN));
    // A name Envoy would not match is refused over gRPC too.
    let d = described("GET", &format!("/public/a?access%5Ftoken={TOKEN}"), &[]);
    assert_eq!(denied(verdict(Transport::Grpc, &d).await).status, 400);
}

#[tokio::test]
async fn a_path_normalisation_would_change_is_refused() {
    for target in ["/public/../orders/1", "/public//a", "/public/%2E%2E/orders"] {
        let d = described("GET", target, &[]);
        let refused = denied(verdict(Transport::Grpc, &d).await);
        assert_eq!(refused.status, 400, "{target}");
    }
    let d = described("GET", "/public/a%2Fb", &[]);
    assert_eq!(denied(verdict(Transport::Http, &d).await).status, 400);
}

#[tokio::test]
async fn a_missing_token_gets_the_proxys_challenge_and_body() {
    let d = described("GET", "/orders/1", &[]);
    let refused = denied(verdict(Transport::Grpc, &d).await);
    let error = GatewayError::MissingToken;
    assert_eq!(
        refused,
        Denial {
            status: 401,
            body: error.body(),
            www_authenticate: error.www_authenticate(),
            retry_after: None,
        }
    );
    assert!(
        refused
            .headers()
            .contains(&(header::WWW_AUTHENTICATE, "Bearer realm=\"txgate\"".into()))
    );
    let d = described("GET", "/nowhere", &[]);
    assert_eq!(denied(verdict(Transport::Http, &d).await).status, 404);
}

#[tokio::test]
async fn checks_are_counted_by_transport_and_status() {
    let current = current();
    let d = described("GET", "/orders/1", &[]);
    check(&current, Transport::Http, &d).await;
    let state = current.load();
    let counted = state
        .metrics
        .ext_authz_checks
        .with_label_values(&["orders", "401", "http"])
        .get();
    assert_eq!(counted, 1);
}

/// `mode: transaction_token` sends its token in `txn-token`, and then no `authorization`.
#[test]
fn the_upstream_token_goes_in_the_header_its_mode_names() {
    let value = HeaderValue::from_static("token-value");
    let txn = UpstreamToken {
        header: TokenHeader::TxnToken,
        value: Some(value.clone()),
        ..UpstreamToken::default()
    };
    assert_eq!(upstream_headers(&txn), Some((TXN_TOKEN, value.clone())));
    let bearer = UpstreamToken {
        value: Some(value.clone()),
        ..UpstreamToken::default()
    };
    assert_eq!(
        upstream_headers(&bearer),
        Some((header::AUTHORIZATION, value))
    );
    assert_eq!(upstream_headers(&UpstreamToken::default()), None);
}
