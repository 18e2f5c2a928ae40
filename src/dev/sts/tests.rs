//! Tests for the dev STS over real HTTP, so routing, client authentication and response headers
//! are exercised exactly as the gateway sees them.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;

const CLIENT_ID: &str = "txgate";
const CLIENT_SECRET: &str = "s3cret+with/odd:chars";
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const ID_JAG: &str = "urn:ietf:params:oauth:token-type:id-jag";
const TXN_TOKEN: &str = "urn:ietf:params:oauth:token-type:txn_token";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const OTHER_CLIENT_ID: &str = "other-app";
const API_B: &str = "https://api.b.example";

/// A dev STS listening on an ephemeral port; stops when dropped.
struct Running {
    sts: Arc<DevSts>,
    base: String,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Running {
    async fn start() -> Running {
        Running::start_with(|_| {}).await
    }

    /// Two clients, [`CLIENT_ID`] and [`OTHER_CLIENT_ID`], and whatever `adjust` changes.
    async fn start_with(adjust: impl FnOnce(&mut DevStsOptions)) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let mut options = DevStsOptions::new(
            base.clone(),
            vec![
                DevClient {
                    client_id: CLIENT_ID.into(),
                    client_secret: Secret::new(CLIENT_SECRET),
                },
                DevClient {
                    client_id: OTHER_CLIENT_ID.into(),
                    client_secret: Secret::new(CLIENT_SECRET),
                },
            ],
        );
        adjust(&mut options);
        let sts = DevSts::new(options).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(Arc::clone(&sts).serve(listener, async {
            let _ = stopped.await;
        }));
        Running {
            sts,
            base,
            http: http_client(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn token(
        &self,
        form: &[(&str, &str)],
    ) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
        self.token_as(CLIENT_ID, form).await
    }

    async fn token_as(
        &self,
        client_id: &str,
        form: &[(&str, &str)],
    ) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
        let mut body: Vec<(&str, &str)> =
            vec![("client_id", client_id), ("client_secret", CLIENT_SECRET)];
        body.extend_from_slice(form);
        self.post_form("/token", &body, None).await
    }

    /// Exchanges a fresh user token of `sub` and returns the whole answer.
    async fn exchange_for(&self, sub: &str, form: &[(&str, &str)]) -> (reqwest::StatusCode, Value) {
        let subject = self.user_token(sub).await;
        let mut body = vec![
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", subject.as_str()),
            ("subject_token_type", ACCESS_TOKEN),
        ];
        body.extend_from_slice(form);
        let (status, _, answer) = self.token(&body).await;
        (status, answer)
    }

    async fn post_form(
        &self,
        path: &str,
        form: &[(&str, &str)],
        authorization: Option<&str>,
    ) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
        let mut request = self.http.post(self.url(path)).form(form);
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.json::<Value>().await.unwrap();
        (status, headers, body)
    }

    async fn user_token(&self, sub: &str) -> String {
        let response = self
            .http
            .post(self.url("/dev/user-token"))
            .form(&[("sub", sub)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }

    async fn decoding_key(&self) -> DecodingKey {
        let jwks: Value = self
            .http
            .get(self.url("/jwks"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let key = &jwks["keys"][0];
        DecodingKey::from_ec_components(key["x"].as_str().unwrap(), key["y"].as_str().unwrap())
            .unwrap()
    }

    /// Verifies `token` against the published JWKS and returns its claims.
    async fn verified_claims(&self, token: &str, audience: &[&str]) -> Map<String, Value> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[self.base.as_str()]);
        validation.set_audience(audience);
        let data = jsonwebtoken::decode::<Map<String, Value>>(
            token,
            &self.decoding_key().await,
            &validation,
        )
        .unwrap();
        let kid = self.jwks_kid().await;
        assert_eq!(data.header.kid.as_deref(), Some(kid.as_str()));
        data.claims
    }

    async fn jwks_kid(&self) -> String {
        let jwks: Value = self
            .http
            .get(self.url("/jwks"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        jwks["keys"][0]["kid"].as_str().unwrap().to_owned()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn http_client() -> reqwest::Client {
    // reqwest is built without a bundled TLS provider; it insists on one even for plain http.
    pingora::tls::install_default_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
}

#[tokio::test]
async fn discovery_and_jwks_describe_the_issuer() {
    let sts = Running::start().await;
    let discovery: Value = sts
        .http
        .get(sts.url("/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["issuer"], sts.base.as_str());
    assert_eq!(discovery["token_endpoint"], sts.url("/token").as_str());
    assert_eq!(discovery["jwks_uri"], sts.url("/jwks").as_str());
    assert_eq!(
        discovery["introspection_endpoint"],
        sts.url("/introspect").as_str()
    );
    assert_eq!(
        discovery["grant_types_supported"],
        serde_json::json!([TOKEN_EXCHANGE, "client_credentials", JWT_BEARER])
    );
    assert_eq!(
        discovery["token_endpoint_auth_methods_supported"],
        serde_json::json!(["client_secret_basic", "client_secret_post"])
    );
    assert_eq!(
        discovery["id_token_signing_alg_values_supported"],
        serde_json::json!(["ES256"])
    );
    assert_eq!(sts.sts.token_endpoint(), sts.url("/token"));

    let jwks: Value = sts
        .http
        .get(sts.url("/jwks"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    assert_eq!(key["alg"], "ES256");
    assert_eq!(key["use"], "sig");
    assert_eq!(key["kid"].as_str().unwrap().len(), 16);
    for coordinate in ["x", "y"] {
        let decoded = URL_SAFE_NO_PAD
            .decode(key[coordinate].as_str().unwrap())
            .unwrap();
        assert_eq!(decoded.len(), 32);
    }
}

#[tokio::test]
async fn token_exchange_issues_a_delegated_token() {
    let sts = Running::start().await;
    let subject = sts.user_token("alice").await;
    let actor = sts.sts.issue_user_token("gateway-1", None, None).unwrap();

    let before = now();
    let (status, headers, body) = sts
        .token(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", &subject),
            ("subject_token_type", ACCESS_TOKEN),
            ("actor_token", &actor),
            ("actor_token_type", ACCESS_TOKEN),
            ("audience", "orders"),
            ("audience", "billing"),
            ("scope", "orders.read billing:read"),
        ])
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["issued_token_type"], ACCESS_TOKEN);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 300);
    assert_eq!(body["scope"], "orders.read billing:read");
    assert_eq!(sts.sts.tokens_issued(), 1);

    let claims = sts
        .verified_claims(body["access_token"].as_str().unwrap(), &["orders"])
        .await;
    assert_eq!(claims["iss"], sts.base.as_str());
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], serde_json::json!(["orders", "billing"]));
    assert_eq!(claims["scope"], "orders.read billing:read");
    assert_eq!(claims["client_id"], CLIENT_ID);
    assert_eq!(claims["act"], serde_json::json!({ "sub": "gateway-1" }));
    let iat = claims["iat"].as_u64().unwrap();
    assert!(iat >= before && iat <= now());
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 300);
    assert_eq!(claims["jti"].as_str().unwrap().len(), 32);
}

#[tokio::test]
async fn exchange_defaults_audience_and_nests_prior_actors() {
    let sts = Running::start().await;
    let subject = sts.user_token("alice").await;

    // A first exchange without an actor: the audience falls back to the client.
    let (status, _, first) = sts
        .token(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", &subject),
            ("subject_token_type", ACCESS_TOKEN),
            (
                "requested_token_type",
                "urn:ietf:params:oauth:token-type:jwt",
            ),
        ])
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(
        first["issued_token_type"],
        "urn:ietf:params:oauth:token-type:jwt"
    );
    assert_eq!(first["token_type"], "N_A");
    assert!(first.get("scope").is_none());
    let first_token = first["access_token"].as_str().unwrap();
    let claims = sts.verified_claims(first_token, &[CLIENT_ID]).await;
    assert_eq!(claims["aud"], CLIENT_ID);
    assert!(claims.get("act").is_none());
    assert!(claims.get("scope").is_none());

    // The actor token itself carries an `act`, which must stay in the chain.
    let (_, _, delegated) = sts
        .token(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", &subject),
            ("subject_token_type", ACCESS_TOKEN),
            ("actor_token", &sts.user_token("svc-a").await),
            ("actor_token_type", ACCESS_TOKEN),
        ])
        .await;
    let actor_with_act = delegated["access_token"].as_str().unwrap().to_owned();
    let (status, _, nested) = sts
        .token(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", &subject),
            ("subject_token_type", ACCESS_TOKEN),
            ("actor_token", &actor_with_act),
            ("actor_token_type", ACCESS_TOKEN),
            ("resource", "https://api.example/orders"),
        ])
        .await;
    assert_eq!(status, 200, "{nested}");
    let claims = sts
        .verified_claims(
            nested["access_token"].as_str().unwrap(),
            &["https://api.example/orders"],
        )
        .await;
    assert_eq!(claims["aud"], "https://api.example/orders");
    assert_eq!(
        claims["act"],
        serde_json::json!({ "sub": "alice", "act": { "sub": "svc-a" } })
    );

    // A subject's own `act` is not copied when no actor token is given.
    let (_, _, plain) = sts
        .token(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", &actor_with_act),
            ("subject_token_type", ACCESS_TOKEN),
        ])
        .await;
    let claims = sts
        .verified_claims(plain["access_token"].as_str().unwrap(), &[CLIENT_ID])
        .await;
    assert!(claims.get("act").is_none());
    assert_eq!(sts.sts.tokens_issued(), 4);
}

#[tokio::test]
async fn http_basic_client_authentication() {
    let sts = Running::start().await;
    let subject = sts.user_token("alice").await;
    let form = [
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", subject.as_str()),
        ("subject_token_type", ACCESS_TOKEN),
    ];
    // Credentials are form-urlencoded before base64: '+' is %2B, '/' is %2F, ':' is %3A.
    let encoded_secret = "s3cret%2Bwith%2Fodd%3Achars";
    let (status, _, body) = sts
        .post_form("/token", &form, Some(&basic(CLIENT_ID, encoded_secret)))
        .await;
    assert_eq!(status, 200, "{body}");

    // The same secret without encoding decodes differently ('+' becomes a space).
    let (status, _, body) = sts
        .post_form("/token", &form, Some(&basic(CLIENT_ID, "s3cret+with/odd")))
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_client");

    // Both methods at once.
    let mut both = form.to_vec();
    both.push(("client_secret", CLIENT_SECRET));
    let (status, _, body) = sts
        .post_form("/token", &both, Some(&basic(CLIENT_ID, encoded_secret)))
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_request");
}

#[tokio::test]
async fn wrong_or_missing_client_credentials_are_invalid_client() {
    let sts = Running::start().await;
    let form = [("grant_type", "client_credentials")];
    for authorization in [
        Some(basic(CLIENT_ID, "wrong")),
        Some(basic("nobody", CLIENT_SECRET)),
        Some("Basic !!!not-base64".to_owned()),
        Some("Bearer abc".to_owned()),
        None,
    ] {
        let (status, headers, body) = sts
            .post_form("/token", &form, authorization.as_deref())
            .await;
        assert_eq!(status, 401, "{authorization:?}");
        assert_eq!(body["error"], "invalid_client");
        assert_eq!(
            headers["www-authenticate"],
            "Basic realm=\"txgate-dev-sts\""
        );
        assert_eq!(headers["cache-control"], "no-store");
        assert_eq!(headers["content-type"], "application/json");
    }
    assert_eq!(sts.sts.tokens_issued(), 0);
}

#[tokio::test]
async fn subject_tokens_not_from_this_sts_are_invalid_grant() {
    let sts = Running::start().await;
    // Same issuer, different key: only the signature can tell them apart.
    let impostor = DevSts::new(DevStsOptions::new(sts.base.clone(), Vec::new())).unwrap();
    let foreign = impostor.issue_user_token("alice", None, None).unwrap();
    for subject in [foreign.as_str(), "not-a-jwt", "a.b.c"] {
        let (status, headers, body) = sts
            .token(&[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", subject),
                ("subject_token_type", ACCESS_TOKEN),
            ])
            .await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_grant");
        assert!(body["error_description"].is_string());
        assert_eq!(headers["cache-control"], "no-store");
    }

    // A valid subject with a foreign actor is rejected too.
    let subject = sts.user_token("alice").await;
    let (status, _, body) = sts
        .token(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", &subject),
            ("subject_token_type", ACCESS_TOKEN),
            ("actor_token", &foreign),
            ("actor_token_type", ACCESS_TOKEN),
        ])
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(sts.sts.tokens_issued(), 0);
}

#[tokio::test]
async fn malformed_exchange_requests_are_rejected() {
    let sts = Running::start().await;
    let subject = sts.user_token("alice").await;
    let subject = subject.as_str();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("grant_type", TOKEN_EXCHANGE), ("subject_token", subject)],
            "invalid_request",
        ),
        (
            vec![
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token_type", ACCESS_TOKEN),
            ],
            "invalid_request",
        ),
        (
            vec![
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", subject),
                ("subject_token_type", ACCESS_TOKEN),
                ("actor_token", subject),
            ],
            "invalid_request",
        ),
        (
            vec![
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", subject),
                ("subject_token_type", ACCESS_TOKEN),
                ("actor_token_type", ACCESS_TOKEN),
            ],
            "invalid_request",
        ),
        (
            vec![
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", subject),
                ("subject_token_type", ACCESS_TOKEN),
                (
                    "requested_token_type",
                    "urn:ietf:params:oauth:token-type:saml2",
                ),
            ],
            "invalid_request",
        ),
        (
            vec![
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", subject),
                ("subject_token_type", ACCESS_TOKEN),
                ("subject_token", subject),
            ],
            "invalid_request",
        ),
        (
            vec![
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", subject),
                ("subject_token_type", ACCESS_TOKEN),
                ("resource", "/relative/path"),
            ],
            "invalid_target",
        ),
        (
            vec![
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", subject),
                ("subject_token_type", ACCESS_TOKEN),
                ("scope", "bad\"scope"),
            ],
            "invalid_scope",
        ),
        (vec![("grant_type", "password")], "unsupported_grant_type"),
        (vec![("scope", "x")], "invalid_request"),
    ];
    for (form, expected) in cases {
        let (status, headers, body) = sts.token(&form).await;
        assert_eq!(status, 400, "{form:?}: {body}");
        assert_eq!(body["error"], expected, "{form:?}");
        assert_eq!(headers["cache-control"], "no-store");
        assert_eq!(headers["content-type"], "application/json");
    }

    // A JSON body is not a token request.
    let response = sts
        .http
        .post(sts.url("/token"))
        .json(&serde_json::json!({ "grant_type": "client_credentials" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(sts.sts.tokens_issued(), 0);
}

#[tokio::test]
async fn client_credentials_issues_a_token_about_the_client() {
    let sts = Running::start().await;
    let (status, headers, body) = sts
        .token(&[
            ("grant_type", "client_credentials"),
            ("resource", "https://api.example/a"),
            ("resource", "https://api.example/b"),
            ("scope", "read"),
        ])
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 300);
    assert_eq!(body["scope"], "read");
    assert!(body.get("issued_token_type").is_none());
    let claims = sts
        .verified_claims(
            body["access_token"].as_str().unwrap(),
            &["https://api.example/b"],
        )
        .await;
    assert_eq!(claims["sub"], CLIENT_ID);
    assert_eq!(claims["client_id"], CLIENT_ID);
    assert_eq!(
        claims["aud"],
        serde_json::json!(["https://api.example/a", "https://api.example/b"])
    );
    assert_eq!(sts.sts.tokens_issued(), 1);

    // Exchanging a client-credentials token keeps the client as the subject.
    let (status, _, exchanged) = sts
        .token(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", body["access_token"].as_str().unwrap()),
            ("subject_token_type", ACCESS_TOKEN),
        ])
        .await;
    assert_eq!(status, 200, "{exchanged}");
    let claims = sts
        .verified_claims(exchanged["access_token"].as_str().unwrap(), &[CLIENT_ID])
        .await;
    assert_eq!(claims["sub"], CLIENT_ID);
}

#[tokio::test]
async fn introspection_reports_active_and_inactive_tokens() {
    let sts = Running::start().await;
    let token = sts.user_token("alice").await;
    let credentials = [("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)];

    let mut form = credentials.to_vec();
    form.push(("token", &token));
    let (status, headers, body) = sts.post_form("/introspect", &form, None).await;
    assert_eq!(status, 200);
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["active"], true);
    assert_eq!(body["sub"], "alice");
    assert_eq!(body["aud"], "txgate-demo");
    assert_eq!(body["iss"], sts.base.as_str());

    let foreign = DevSts::new(DevStsOptions::new(sts.base.clone(), Vec::new()))
        .unwrap()
        .issue_user_token("alice", None, None)
        .unwrap();
    for inactive in [foreign.as_str(), "garbage"] {
        let mut form = credentials.to_vec();
        form.push(("token", inactive));
        let (status, _, body) = sts.post_form("/introspect", &form, None).await;
        assert_eq!(status, 200);
        assert_eq!(body, serde_json::json!({ "active": false }));
    }

    let (status, _, body) = sts.post_form("/introspect", &credentials, None).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_request");

    let (status, _, body) = sts
        .post_form("/introspect", &[("token", token.as_str())], None)
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_client");
}

#[tokio::test]
async fn user_token_endpoint_mints_subject_tokens() {
    let sts = Running::start().await;

    let response = sts
        .http
        .post(sts.url("/dev/user-token"))
        .form(&[("sub", "alice"), ("scope", "orders.read")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/plain");
    let token = response.text().await.unwrap();
    let before = now();
    let claims = sts.verified_claims(&token, &["txgate-demo"]).await;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["scope"], "orders.read");
    let iat = claims["iat"].as_u64().unwrap();
    assert!(iat <= before);
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 3600);
    assert_eq!(claims["jti"].as_str().unwrap().len(), 32);

    let response = sts
        .http
        .get(sts.url("/dev/user-token?sub=bob&aud=orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let claims = sts
        .verified_claims(&response.text().await.unwrap(), &["orders"])
        .await;
    assert_eq!(claims["sub"], "bob");
    assert!(claims.get("scope").is_none());

    let too_long = "x".repeat(257);
    for query in ["", "?sub=", &format!("?sub={too_long}"), "?sub=a&sub=b"] {
        let response = sts
            .http
            .get(sts.url(&format!("/dev/user-token{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
    }
    let longest = "x".repeat(256);
    assert!(sts.sts.issue_user_token(&longest, None, None).is_ok());
    // User tokens are not token-endpoint issuance.
    assert_eq!(sts.sts.tokens_issued(), 0);
}

/// The JOSE header and the claims of `token`, verified against the published JWKS; `aud` must
/// contain `audience`.
async fn typed_claims(
    sts: &Running,
    token: &str,
    audience: &str,
) -> (Option<String>, Map<String, Value>) {
    let typ = jsonwebtoken::decode_header(token).unwrap().typ;
    (typ, sts.verified_claims(token, &[audience]).await)
}

#[tokio::test]
async fn an_id_jag_is_issued_and_redeemed_with_jwt_bearer() {
    let sts = Running::start().await;
    let (status, body) = sts
        .exchange_for(
            "alice",
            &[
                ("requested_token_type", ID_JAG),
                ("audience", &sts.base),
                ("resource", API_B),
                ("scope", "orders.read orders.write"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["issued_token_type"], ID_JAG);
    assert_eq!(body["token_type"], "N_A");
    assert_eq!(body["expires_in"], 300);
    let id_jag = body["access_token"].as_str().unwrap().to_owned();
    let (typ, claims) = typed_claims(&sts, &id_jag, &sts.base).await;
    assert_eq!(typ.as_deref(), Some("oauth-id-jag+jwt"));
    assert_eq!(claims["iss"], sts.base.as_str());
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], sts.base.as_str());
    assert_eq!(claims["client_id"], CLIENT_ID);
    assert_eq!(claims["resource"], API_B);
    assert_eq!(claims["scope"], "orders.read orders.write");
    assert_eq!(claims["jti"].as_str().unwrap().len(), 32);
    let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert!(lifetime <= 300, "{lifetime}");
    assert_eq!(sts.sts.tokens_issued_by(DevGrant::TokenExchange), 1);

    // Redeemed: the resource claim is the audience, the ID-JAG's scope the scope, even when a
    // narrower scope and another audience are asked for.
    let (status, headers, body) = sts
        .token(&[
            ("grant_type", JWT_BEARER),
            ("assertion", &id_jag),
            ("scope", "orders.read"),
            ("audience", "https://ignored.example"),
            ("requested_token_use", "on_behalf_of"),
        ])
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["issued_token_type"], ACCESS_TOKEN);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 300);
    let (typ, claims) = typed_claims(&sts, body["access_token"].as_str().unwrap(), API_B).await;
    assert_eq!(typ.as_deref(), Some("JWT"));
    assert_eq!(claims["iss"], sts.base.as_str());
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], API_B);
    assert_eq!(claims["scope"], "orders.read orders.write");
    assert_eq!(claims["client_id"], CLIENT_ID);
    assert_eq!(
        claims["exp"].as_u64().unwrap(),
        claims["iat"].as_u64().unwrap() + 300
    );
    assert_eq!(sts.sts.tokens_issued_by(DevGrant::JwtBearer), 1);
    assert_eq!(sts.sts.tokens_issued(), 2);
}

#[tokio::test]
async fn an_id_jag_without_resource_takes_the_requested_audience() {
    let sts = Running::start().await;
    // aud = the token endpoint URL is accepted as naming this STS too.
    let (_, body) = sts
        .exchange_for(
            "alice",
            &[
                ("requested_token_type", ID_JAG),
                ("audience", &sts.sts.token_endpoint()),
            ],
        )
        .await;
    let id_jag = body["access_token"].as_str().unwrap().to_owned();
    assert!(body.get("scope").is_none());

    let (status, _, body) = sts
        .token(&[
            ("grant_type", JWT_BEARER),
            ("assertion", &id_jag),
            ("resource", API_B),
        ])
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, claims) = typed_claims(&sts, body["access_token"].as_str().unwrap(), API_B).await;
    assert!(claims.get("scope").is_none());

    let (status, _, body) = sts
        .token(&[("grant_type", JWT_BEARER), ("assertion", &id_jag)])
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, claims) = typed_claims(&sts, body["access_token"].as_str().unwrap(), CLIENT_ID).await;
    assert_eq!(claims["aud"], CLIENT_ID);

    // No scope granted: any requested scope exceeds it.
    let (status, _, body) = sts
        .token(&[
            ("grant_type", JWT_BEARER),
            ("assertion", &id_jag),
            ("scope", "x"),
        ])
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_scope");
}

#[tokio::test]
async fn id_jag_refusals() {
    let sts = Running::start().await;
    let (_, body) = sts
        .exchange_for(
            "alice",
            &[
                ("requested_token_type", ID_JAG),
                ("audience", &sts.base),
                ("scope", "orders.read"),
            ],
        )
        .await;
    let id_jag = body["access_token"].as_str().unwrap().to_owned();
    let issued = sts.sts.tokens_issued();

    // Bound to the client it was issued to.
    let (status, _, body) = sts
        .token_as(
            OTHER_CLIENT_ID,
            &[("grant_type", JWT_BEARER), ("assertion", &id_jag)],
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant", "{body}");

    // A scope outside the ID-JAG's.
    let (status, _, body) = sts
        .token(&[
            ("grant_type", JWT_BEARER),
            ("assertion", &id_jag),
            ("scope", "orders.read orders.write"),
        ])
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_scope", "{body}");

    // An ID-JAG is a grant, not a subject token.
    let (status, _, body) = sts
        .token(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", &id_jag),
            ("subject_token_type", ACCESS_TOKEN),
        ])
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant", "{body}");

    // Malformed ID-JAG requests.
    let base = sts.base.clone();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("requested_token_type", ID_JAG)], "invalid_request"),
        (
            vec![
                ("requested_token_type", ID_JAG),
                ("audience", &base),
                ("audience", "https://as.c.example"),
            ],
            "invalid_request",
        ),
        (
            vec![
                ("requested_token_type", ID_JAG),
                ("audience", &base),
                ("resource", API_B),
                ("resource", "https://api.c.example"),
            ],
            "invalid_request",
        ),
        (
            vec![
                ("requested_token_type", ID_JAG),
                ("audience", &base),
                ("resource", "/relative"),
            ],
            "invalid_target",
        ),
    ];
    for (form, expected) in cases {
        let (status, body) = sts.exchange_for("alice", &form).await;
        assert_eq!(status, 400, "{form:?}: {body}");
        assert_eq!(body["error"], expected, "{form:?}: {body}");
    }
    assert_eq!(sts.sts.tokens_issued(), issued);
}

#[tokio::test]
async fn a_jwt_grant_is_issued_and_redeemed_with_jwt_bearer() {
    let sts = Running::start().await;
    let (status, body) = sts
        .exchange_for(
            "alice",
            &[
                ("requested_token_type", JWT),
                ("audience", &sts.base),
                ("scope", "orders.read"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["issued_token_type"], JWT);
    assert_eq!(body["token_type"], "N_A");
    let grant = body["access_token"].as_str().unwrap().to_owned();
    let (typ, claims) = typed_claims(&sts, &grant, &sts.base).await;
    assert_eq!(typ.as_deref(), Some("JWT"));
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], sts.base.as_str());
    assert_eq!(claims["client_id"], CLIENT_ID);
    assert_eq!(claims["scope"], "orders.read");
    assert!(claims["jti"].is_string());

    // Not an ID-JAG: audience and scope come from the request, and any client may redeem it.
    let (status, _, body) = sts
        .token_as(
            OTHER_CLIENT_ID,
            &[
                ("grant_type", JWT_BEARER),
                ("assertion", &grant),
                ("audience", API_B),
                ("scope", "billing.read"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "billing.read");
    let (_, claims) = typed_claims(&sts, body["access_token"].as_str().unwrap(), API_B).await;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], API_B);
    assert_eq!(claims["scope"], "billing.read");
    assert_eq!(claims["client_id"], OTHER_CLIENT_ID);

    let (status, _, body) = sts
        .token(&[("grant_type", JWT_BEARER), ("assertion", &grant)])
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("scope").is_none());
    let (_, claims) = typed_claims(&sts, body["access_token"].as_str().unwrap(), CLIENT_ID).await;
    assert!(claims.get("scope").is_none());
    assert_eq!(sts.sts.tokens_issued_by(DevGrant::JwtBearer), 2);
}

#[tokio::test]
async fn jwt_bearer_refuses_assertions_not_meant_for_this_sts() {
    let sts = Running::start().await;
    let signed = |edit: &dyn Fn(&mut Map<String, Value>)| {
        let mut claims = sts.sts.base_claims(Duration::from_secs(60));
        claims.insert("sub".into(), "alice".into());
        claims.insert("aud".into(), sts.base.clone().into());
        edit(&mut claims);
        sts.sts.sign(&claims).unwrap()
    };
    // The control: right issuer, key, audience and lifetime.
    let (status, _, body) = sts
        .token(&[("grant_type", JWT_BEARER), ("assertion", &signed(&|_| {}))])
        .await;
    assert_eq!(status, 200, "{body}");

    let impostor = DevSts::new(DevStsOptions::new(sts.base.clone(), Vec::new())).unwrap();
    let mut foreign = impostor.base_claims(Duration::from_secs(60));
    foreign.insert("sub".into(), "alice".into());
    foreign.insert("aud".into(), sts.base.clone().into());
    let foreign = impostor.sign(&foreign).unwrap();

    let cases = [
        (
            "wrong aud",
            signed(&|c| {
                c.insert("aud".into(), "https://as.elsewhere.example".into());
            }),
        ),
        // A user token is addressed to its resource, not to the STS.
        ("user token", sts.user_token("alice").await),
        (
            "expired",
            signed(&|c| {
                c.insert("exp".into(), (now() - 5).into());
            }),
        ),
        (
            "no sub",
            signed(&|c| {
                c.remove("sub");
            }),
        ),
        (
            "other issuer",
            signed(&|c| {
                c.insert("iss".into(), "https://as.elsewhere.example".into());
            }),
        ),
        ("other key", foreign),
        ("not a JWT", "not-a-jwt".to_owned()),
    ];
    for (what, assertion) in &cases {
        let (status, headers, body) = sts
            .token(&[("grant_type", JWT_BEARER), ("assertion", assertion)])
            .await;
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(body["error"], "invalid_grant", "{what}: {body}");
        assert_eq!(headers["cache-control"], "no-store");
    }
    let (status, _, body) = sts.token(&[("grant_type", JWT_BEARER)]).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(sts.sts.tokens_issued_by(DevGrant::JwtBearer), 1);
}

#[tokio::test]
async fn a_transaction_token_carries_purpose_and_context() {
    let sts = Running::start().await;
    let context = serde_json::json!({ "req_ip": "10.0.0.7", "authn": "mfa", "req_wl": "forged" });
    let encoded = URL_SAFE_NO_PAD.encode(context.to_string());
    let form = [
        ("requested_token_type", TXN_TOKEN),
        ("audience", "trust-domain.example"),
        ("scope", "orders.read"),
        ("request_context", encoded.as_str()),
    ];
    let before = now();
    let (status, body) = sts.exchange_for("alice", &form).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["issued_token_type"], TXN_TOKEN);
    assert_eq!(body["token_type"], "N_A");
    assert_eq!(body["expires_in"], 60);
    let (typ, claims) = typed_claims(
        &sts,
        body["access_token"].as_str().unwrap(),
        "trust-domain.example",
    )
    .await;
    assert_eq!(typ.as_deref(), Some("txntoken+jwt"));
    assert_eq!(claims["iss"], sts.base.as_str());
    assert_eq!(claims["aud"], "trust-domain.example");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["scope"], "orders.read");
    assert_eq!(claims["purp"], "orders.read");
    assert_eq!(
        claims["rctx"],
        serde_json::json!({ "req_ip": "10.0.0.7", "authn": "mfa", "req_wl": CLIENT_ID })
    );
    let txn = claims["txn"].as_str().unwrap().to_owned();
    assert_eq!(txn.len(), 32);
    assert!(txn.bytes().all(|b| b.is_ascii_hexdigit()));
    let iat = claims["iat"].as_u64().unwrap();
    assert!(iat >= before);
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 60);
    assert!(claims.get("jti").is_none());

    // Every request gets its own txn; without a context, rctx names the workload only.
    let (_, again) = sts.exchange_for("alice", &form[..3]).await;
    let (_, claims) = typed_claims(
        &sts,
        again["access_token"].as_str().unwrap(),
        "trust-domain.example",
    )
    .await;
    assert_ne!(claims["txn"], txn.as_str());
    assert_eq!(claims["rctx"], serde_json::json!({ "req_wl": CLIENT_ID }));
    assert_eq!(sts.sts.tokens_issued_by(DevGrant::TokenExchange), 2);

    // A shorter token_ttl shortens Transaction Tokens too.
    let short = Running::start_with(|o| o.token_ttl = Duration::from_secs(20)).await;
    let (_, body) = short.exchange_for("alice", &form).await;
    assert_eq!(body["expires_in"], 20);
}

#[tokio::test]
async fn malformed_transaction_token_requests_are_rejected() {
    let sts = Running::start().await;
    let padded = STANDARD.encode("{\"a\":1}");
    assert!(padded.ends_with('='));
    let array = URL_SAFE_NO_PAD.encode("[1]");
    let not_json = URL_SAFE_NO_PAD.encode("{nope");
    for (extra, expected) in [
        (vec![("scope", "orders.read")], "missing audience"),
        (vec![("audience", "td")], "missing scope"),
        (
            vec![("audience", "td"), ("audience", "td2"), ("scope", "s")],
            "two audiences",
        ),
        (
            vec![
                ("audience", "td"),
                ("scope", "s"),
                ("request_context", "!!"),
            ],
            "not base64url",
        ),
        (
            vec![
                ("audience", "td"),
                ("scope", "s"),
                ("request_context", &padded),
            ],
            "padded",
        ),
        (
            vec![
                ("audience", "td"),
                ("scope", "s"),
                ("request_context", &array),
            ],
            "not an object",
        ),
        (
            vec![
                ("audience", "td"),
                ("scope", "s"),
                ("request_context", &not_json),
            ],
            "not JSON",
        ),
    ] {
        let mut form = vec![("requested_token_type", TXN_TOKEN)];
        form.extend(extra);
        let (status, body) = sts.exchange_for("alice", &form).await;
        assert_eq!(status, 400, "{expected}: {body}");
        assert_eq!(body["error"], "invalid_request", "{expected}: {body}");
    }
    assert_eq!(sts.sts.tokens_issued(), 0);
}

#[tokio::test]
async fn configured_subjects_must_step_up() {
    let sts = Running::start_with(|o| o.step_up_subjects = vec!["bob".into()]).await;
    let step_up = serde_json::json!({
        "error": "insufficient_user_authentication",
        "error_description": "a stronger authentication is required",
        "acr_values": "urn:txgate:dev:mfa",
        "max_age": 300,
    });
    let base = sts.base.clone();
    for form in [
        vec![],
        vec![
            ("requested_token_type", ID_JAG),
            ("audience", base.as_str()),
        ],
        vec![("requested_token_type", JWT), ("audience", base.as_str())],
        vec![
            ("requested_token_type", TXN_TOKEN),
            ("audience", "td"),
            ("scope", "s"),
        ],
    ] {
        let (status, body) = sts.exchange_for("bob", &form).await;
        assert_eq!(status, 400, "{form:?}");
        assert_eq!(body, step_up, "{form:?}");
        // Others are unaffected.
        let (status, body) = sts.exchange_for("alice", &form).await;
        assert_eq!(status, 200, "{form:?}: {body}");
    }

    // JWT bearer: an assertion about bob, signed here.
    let mut claims = sts.sts.base_claims(Duration::from_secs(60));
    claims.insert("sub".into(), "bob".into());
    claims.insert("aud".into(), sts.base.clone().into());
    claims.insert("client_id".into(), CLIENT_ID.into());
    let assertion = sts
        .sts
        .sign_typed(&claims, Some("oauth-id-jag+jwt"))
        .unwrap();
    let (status, headers, body) = sts
        .token(&[("grant_type", JWT_BEARER), ("assertion", &assertion)])
        .await;
    assert_eq!(status, 400);
    assert_eq!(body, step_up);
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(sts.sts.tokens_issued_by(DevGrant::JwtBearer), 0);
    assert_eq!(sts.sts.tokens_issued_by(DevGrant::TokenExchange), 4);
}

#[test]
fn jose_types_compare_as_media_types() {
    assert!(media_type_is("oauth-id-jag+jwt", ID_JAG_TYP));
    assert!(media_type_is("application/OAuth-ID-JAG+JWT", ID_JAG_TYP));
    assert!(!media_type_is("at+jwt", ID_JAG_TYP));
    assert!(!media_type_is("application/", ID_JAG_TYP));
    assert!(media_type_is("txntoken+jwt", TXN_TOKEN_TYP));
}

#[tokio::test]
async fn expired_tokens_do_not_verify() {
    let sts = DevSts::new(DevStsOptions::new("http://127.0.0.1:1", Vec::new())).unwrap();
    let mut claims = sts.base_claims(Duration::from_secs(60));
    claims.insert("sub".into(), "alice".into());
    assert!(sts.verify(&sts.sign(&claims).unwrap()).is_some());
    claims.insert("exp".into(), (now() - 10).into());
    assert!(sts.verify(&sts.sign(&claims).unwrap()).is_none());
    claims.insert("exp".into(), (now() + 60).into());
    claims.insert("iss".into(), "http://elsewhere".into());
    assert!(sts.verify(&sts.sign(&claims).unwrap()).is_none());
}

#[test]
fn options_are_checked() {
    let client = |id: &str, secret: &str| DevClient {
        client_id: id.into(),
        client_secret: Secret::new(secret),
    };
    assert!(matches!(
        DevSts::new(DevStsOptions::new("not a url", Vec::new())),
        Err(DevStsError::InvalidIssuer { .. })
    ));
    assert!(matches!(
        DevSts::new(DevStsOptions::new("ftp://host", Vec::new())),
        Err(DevStsError::InvalidIssuer { .. })
    ));
    assert!(matches!(
        DevSts::new(DevStsOptions::new("http://host", vec![client("a", "")])),
        Err(DevStsError::InvalidClient(_))
    ));
    assert!(matches!(
        DevSts::new(DevStsOptions::new(
            "http://host",
            vec![client("a", "x"), client("a", "y")]
        )),
        Err(DevStsError::InvalidClient(_))
    ));
    let mut options = DevStsOptions::new("http://host", Vec::new());
    options.token_ttl = Duration::from_millis(10);
    assert!(matches!(DevSts::new(options), Err(DevStsError::InvalidTtl)));

    let sts = DevSts::new(DevStsOptions::new(
        "http://host/",
        vec![client("a", "hunter2")],
    ))
    .unwrap();
    assert_eq!(sts.issuer(), "http://host/");
    assert_eq!(sts.token_endpoint(), "http://host/token");
    assert!(!format!("{sts:?}").contains("hunter2"));
}

#[test]
fn principal_falls_back_to_client_id() {
    let claims = |value: Value| value.as_object().cloned().unwrap();
    assert_eq!(
        principal(&claims(
            serde_json::json!({ "sub": "alice", "client_id": "c" })
        ))
        .as_deref(),
        Some("alice")
    );
    assert_eq!(
        principal(&claims(serde_json::json!({ "sub": 7, "client_id": "c" }))).as_deref(),
        Some("c")
    );
    assert_eq!(principal(&claims(serde_json::json!({ "sub": "" }))), None);
}

#[test]
fn form_components_decode_like_browsers_encode_them() {
    assert_eq!(form_urldecode("a+b%2Bc%3a%2f").as_deref(), Some("a b+c:/"));
    assert_eq!(form_urldecode("plain").as_deref(), Some("plain"));
    assert_eq!(form_urldecode("%").as_deref(), None);
    assert_eq!(form_urldecode("%4").as_deref(), None);
    assert_eq!(form_urldecode("%+1").as_deref(), None);
    assert_eq!(form_urldecode("%zz").as_deref(), None);
    assert_eq!(form_urldecode("%ff").as_deref(), None);
    assert_eq!(form_urldecode("%C3%A9").as_deref(), Some("é"));
}

#[test]
fn scopes_follow_rfc_6749() {
    assert!(is_valid_scope("read"));
    assert!(is_valid_scope("orders.read billing:write"));
    assert!(!is_valid_scope(""));
    assert!(!is_valid_scope("a  b"));
    assert!(!is_valid_scope(" a"));
    assert!(!is_valid_scope("a\"b"));
    assert!(!is_valid_scope("a\\b"));
    assert!(!is_valid_scope("é"));
}
