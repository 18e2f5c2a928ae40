//! Interop with a third-party STS: npm `oidc-provider` (tests/interop/sts.mjs) with an RFC 8693
//! grant registered through `provider.registerGrantType`. txgate discovers it from its issuer,
//! validates callers' tokens against its JWKS, and drives impersonation, delegation,
//! client_credentials and `private_key_jwt` through it; a key rotation must be picked up.
//!
//! Needs Node.js and `npm ci --prefix tests/interop` (scripts/setup.sh --test does both).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use base64::Engine;
use common::yaml::{Actor, Exchange, GatewayYaml, Inbound, Route, TokenService};
use common::{RecordingUpstream, client, gateway, private_key_pem};
use serde_json::{Value, json};

/// The oidc-provider STS as a child process. Dropping it closes its stdin, which ends it.
struct OidcProvider {
    issuer: String,
    child: Child,
    _stdin: ChildStdin,
    config_file: std::path::PathBuf,
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config_file);
    }
}

impl OidcProvider {
    fn start(config: &Value) -> OidcProvider {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
        assert!(
            root.join("node_modules/oidc-provider").is_dir(),
            "the interop STS is not installed: run scripts/setup.sh --test (npm ci --prefix tests/interop)"
        );
        let config_file =
            std::env::temp_dir().join(format!("txgate-interop-{}.json", rand::random::<u64>()));
        std::fs::write(&config_file, config.to_string()).unwrap();
        let mut child = Command::new("node")
            .arg(root.join("sts.mjs"))
            .args(["--port", "0", "--config"])
            .arg(&config_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("TXGATE_INTEROP_VERBOSE").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("node runs (apt-get install nodejs)");
        let stdin = child.stdin.take().unwrap();
        // The one stdout line is written once it listens: that is the readiness signal.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the interop STS did not start ({e}): {line:?}"));
        OidcProvider {
            issuer: ready["issuer"].as_str().unwrap().to_string(),
            child,
            _stdin: stdin,
            config_file,
        }
    }

    /// A client-credentials token of `client_id` for `resource`: the caller's (subject) token.
    async fn token_for(&self, client_id: &str, secret: &str, resource: &str) -> String {
        let response = client()
            .post(format!("{}/token", self.issuer))
            .basic_auth(client_id, Some(secret))
            .form(&[
                ("grant_type", "client_credentials"),
                ("resource", resource),
                ("scope", "orders:read"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_string()
    }

    async fn exchanges(&self) -> Vec<Value> {
        let body: Value = client()
            .get(format!("{}/__test/exchanges", self.issuer))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body.as_array().unwrap().clone()
    }

    async fn rotate(&self) -> String {
        let body: Value = client()
            .post(format!("{}/__test/rotate", self.issuer))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["kid"].as_str().unwrap().to_string()
    }
}

fn claims(token: &str) -> serde_json::Map<String, Value> {
    txgate::jwt::unverified_claims(token).expect("a JWT")
}

fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

const ORDERS: &str = "https://orders.example.com";
const BILLING: &str = "https://billing.example.com";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txgate_interoperates_with_oidc_provider() {
    let (pem, public) = private_key_pem("ec");
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let op = OidcProvider::start(&json!({
        "clients": [
            {"client_id": "gateway", "client_secret": common::CLIENT_SECRET, "auth_method": "client_secret_basic"},
            {"client_id": "gateway-pkjwt", "auth_method": "private_key_jwt", "jwks": {"keys": [{
                "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "gw-1",
                "x": b64(&public[1..33]), "y": b64(&public[33..65]),
            }]}},
            {"client_id": "user-app", "client_secret": "user-secret", "auth_method": "client_secret_basic"},
        ],
        "resources": [ORDERS, BILLING],
    }));
    let upstream = RecordingUpstream::start().await;
    // Only the issuer is configured: endpoints and JWKS come from oidc-provider's discovery.
    let inbound = || Inbound::service_jwt().audiences(&[ORDERS]);
    // Every route asks for a token for billing.
    let route = |name: &str, path_prefix: &str, exchange: Exchange| {
        Route::new(name, path_prefix, upstream.url()).exchange(exchange.audience(BILLING))
    };
    let yaml = GatewayYaml::new()
        .token_service(TokenService::discovered("op", &op.issuer).inbound(inbound()))
        .token_service(
            TokenService::discovered("op-pk", &op.issuer)
                .client_id("gateway-pkjwt")
                .private_key_jwt(&pem, "gw-1")
                .inbound(inbound()),
        )
        .route(route(
            "impersonation",
            "/imp",
            Exchange::impersonation("op"),
        ))
        .route(route(
            "delegation",
            "/deleg",
            Exchange::delegation("op").actor(Actor::own().audience(ORDERS)),
        ))
        .route(route(
            "machine",
            "/m2m",
            Exchange::client_credentials("op").scope("billing:read"),
        ))
        .route(route(
            "private-key-jwt",
            "/pk",
            Exchange::impersonation("op-pk"),
        ))
        .to_yaml();
    let gw = gateway(&yaml).await;
    let user = op.token_for("user-app", "user-secret", ORDERS).await;
    assert_eq!(claims(&user)["sub"], "user-app");

    let call = |path: &str, token: &str| {
        let url = format!("{}{path}", gw.url());
        let token = token.to_string();
        async move {
            client()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };

    // Impersonation: a token for the same subject, re-targeted at billing.
    assert_eq!(call("/imp", &user).await, 200);
    let forwarded = upstream
        .seen()
        .last()
        .unwrap()
        .bearer()
        .unwrap()
        .to_string();
    assert_ne!(forwarded, user);
    let c = claims(&forwarded);
    assert_eq!(c["iss"], op.issuer.as_str());
    assert_eq!(c["aud"], BILLING);
    assert_eq!(c["sub"], "user-app");
    assert_eq!(c["client_id"], "gateway");
    assert!(c.get("act").is_none());
    let record = op.exchanges().await.last().unwrap().clone();
    assert_eq!(record["status"], 200);
    assert_eq!(record["presented_auth"], "client_secret_basic");
    assert_eq!(record["params"]["subject_token"], user.as_str());
    assert_eq!(record["params"]["audience"], BILLING);

    // Delegation: the gateway's own token (client credentials at oidc-provider) is the actor.
    assert_eq!(call("/deleg", &user).await, 200);
    let c = claims(upstream.seen().last().unwrap().bearer().unwrap());
    assert_eq!(c["sub"], "user-app");
    assert_eq!(c["act"]["sub"], "gateway");
    let record = op.exchanges().await.last().unwrap().clone();
    assert_eq!(record["actor"]["sub"], "gateway");
    assert_eq!(
        record["params"]["actor_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );

    // Client credentials: the upstream gets the gateway's token; the caller's never leaves.
    assert_eq!(call("/m2m", &user).await, 200);
    let last = upstream.seen().last().unwrap().clone();
    assert!(!last.everything().contains(&user));
    let c = claims(last.bearer().unwrap());
    assert_eq!(c["sub"], "gateway");
    assert_eq!(c["aud"], BILLING);
    assert_eq!(c["scope"], "billing:read");

    // private_key_jwt: oidc-provider verified our assertion against the registered key.
    assert_eq!(call("/pk", &user).await, 200);
    let record = op.exchanges().await.last().unwrap().clone();
    assert_eq!(record["client_id"], "gateway-pkjwt");
    assert_eq!(record["client_auth_method"], "private_key_jwt");
    assert_eq!(record["presented_auth"], "client_assertion");
    assert_eq!(
        claims(upstream.seen().last().unwrap().bearer().unwrap())["client_id"],
        "gateway-pkjwt"
    );

    // Inbound validation against oidc-provider's JWKS: a tampered or foreign-audience token is
    // refused locally and never reaches the STS.
    let before = op.exchanges().await.len();
    let mut tampered = user.clone();
    tampered.replace_range(tampered.len() - 6.., "AAAAAA");
    let billing_token = op.token_for("user-app", "user-secret", BILLING).await;
    assert_eq!(call("/imp", &tampered).await, 401);
    assert_eq!(
        call("/imp", &billing_token).await,
        401,
        "aud must be orders"
    );
    assert_eq!(op.exchanges().await.len(), before);

    // Key rotation: tokens signed with the new kid are accepted after one JWKS refetch.
    let old_kid = kid(&user);
    let new_kid = op.rotate().await;
    assert_ne!(old_kid, new_kid);
    let rotated_user = op.token_for("user-app", "user-secret", ORDERS).await;
    assert_eq!(kid(&rotated_user), new_kid);
    assert_eq!(call("/imp", &rotated_user).await, 200);
    let c = claims(upstream.seen().last().unwrap().bearer().unwrap());
    assert_eq!(c["sub"], "user-app");
    assert_eq!(
        kid(upstream.seen().last().unwrap().bearer().unwrap()),
        new_kid
    );
    // Tokens signed with the previous key still verify (it stays in the JWKS).
    assert_eq!(call("/imp", &user).await, 200);

    drop(gw);
    let _ = std::fs::remove_file(&pem);
}

/// Two oidc-provider processes as two trust domains: A (the user's identity provider) and B
/// (the resource's authorization server, which trusts A's assertions). Both two-hop flows run
/// through txgate as `exchange.chain` routes; what the upstream receives is B's token for the
/// user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_across_two_trust_domains_id_jag_and_identity_chaining() {
    const API_B: &str = "https://api.b.example";
    let a = OidcProvider::start(&json!({
        "clients": [
            {"client_id": "gateway", "client_secret": common::CLIENT_SECRET},
            {"client_id": "user-app", "client_secret": "user-secret"},
            {"client_id": "stepup-user", "client_secret": "user-secret"},
        ],
        "resources": [ORDERS],
        "step_up": {"stepup-user": {"error": "insufficient_user_authentication", "acr_values": "urn:example:mfa", "max_age": 60}},
    }));
    let b = OidcProvider::start(&json!({
        // The ID-JAG names the client it was issued to: the gateway is registered at both.
        "clients": [{"client_id": "gateway", "client_secret": common::CLIENT_SECRET}],
        "resources": [API_B],
        "trusted_issuers": [{"issuer": a.issuer, "jwks_uri": format!("{}/jwks", a.issuer)}],
    }));
    let upstream = RecordingUpstream::start().await;
    let yaml = format!(
        r#"server: {{ listen: ["127.0.0.1:0"] }}
token_services:
  idp: {{ issuer: "{a}", client_id: gateway, client_secret: "${{TEST_CLIENT_SECRET}}" }}
  as-b: {{ issuer: "{b}", client_id: gateway, client_secret: "${{TEST_CLIENT_SECRET}}" }}
routes:
  - name: id-jag
    match: {{ path_prefix: /jag }}
    upstream: "{up}"
    exchange:
      mode: impersonation
      chain:
        - {{ token_service: idp, requested_token_type: id_jag, audience: ["{b}"], resource: ["{API_B}"], scope: "orders:read" }}
        - {{ token_service: as-b, grant: jwt_bearer }}
  - name: chaining
    match: {{ path_prefix: /chaining }}
    upstream: "{up}"
    exchange:
      mode: impersonation
      chain:
        - {{ token_service: idp, requested_token_type: jwt, audience: ["{b}"] }}
        - {{ token_service: as-b, grant: jwt_bearer, resource: ["{API_B}"], scope: "orders:read" }}
"#,
        a = a.issuer,
        b = b.issuer,
        up = upstream.url()
    );
    let gw = gateway(&yaml).await;
    let user = a.token_for("user-app", "user-secret", ORDERS).await;
    for (i, path) in ["/jag", "/chaining"].into_iter().enumerate() {
        let response = client()
            .get(format!("{}{path}", gw.url()))
            .bearer_auth(&user)
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert_eq!(status, 200, "{path}: {}", response.text().await.unwrap());
        let seen = &upstream.seen()[i];
        assert!(!seen.everything().contains(&user), "{path}");
        let token = seen.bearer().expect("a token upstream");
        let claims = claims(token);
        assert_eq!(
            claims["iss"],
            b.issuer.as_str(),
            "{path}: domain B issued it"
        );
        assert_eq!(claims["sub"], "user-app", "{path}: the caller's subject");
        let aud = &claims["aud"];
        assert!(
            aud == API_B || aud.as_array().is_some_and(|a| a.iter().any(|v| v == API_B)),
            "{path}: the last step's audience, got {aud}"
        );
    }
    // Cached as a whole: asking again calls neither domain.
    let before = (a.exchanges().await.len(), b.exchanges().await.len());
    let again = client()
        .get(format!("{}/jag", gw.url()))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(
        (a.exchanges().await.len(), b.exchanges().await.len()),
        before
    );

    // Domain A wants a stronger login for this user: relayed to the caller as RFC 9470 asks.
    let stepup = a.token_for("stepup-user", "user-secret", ORDERS).await;
    let response = client()
        .get(format!("{}/jag", gw.url()))
        .bearer_auth(&stepup)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let challenge = response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        challenge.contains("error=\"insufficient_user_authentication\"")
            && challenge.contains("acr_values=\"urn:example:mfa\"")
            && challenge.contains("max_age=\"60\""),
        "{challenge}"
    );
}
