//! OAuth 2.0 Token Introspection (RFC 7662) for tokens the gateway cannot verify itself.
//!
//! Opaque tokens carry nothing to check locally, so the issuer is asked whether the token is
//! active. The introspection endpoint is a remote dependency that can be slow, down or wrong:
//! every call has a deadline and a body cap, and any answer that is not a clear "active" or
//! "inactive" makes the validator report itself unavailable (503) rather than calling the
//! token invalid. Active answers are reused for a short while so that a busy caller does not
//! cost one introspection per request; concurrent requests with the same token share one call.
//!
//! A clear "no" is remembered too, briefly: a replayed revoked or foreign token is answered
//! from memory instead of costing the issuer one call per attempt. And the calls in flight are
//! capped, like the token endpoint's: a flood of made-up tokens gets 503 from the gateway
//! instead of being passed on to the issuer.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{StatusCode, header};
use moka::future::Cache;
use serde_json::{Map, Value};
use tokio::sync::Semaphore;

use super::{
    BodyError, Cached, InboundError, TokenDigest, ValidatedToken, check_size, invalid, new_cache,
    now_secs, numeric_date, read_capped, ttl_until,
};

pub use crate::config::inbound::{IntrospectionAuth, IntrospectionSettings};

/// Largest introspection answer read; answers are a handful of claims.
pub const MAX_INTROSPECTION_RESPONSE_BYTES: usize = 64 * 1024;
/// RFC 8693 §3 identifier of refresh tokens, which some servers put in `token_type`.
const REFRESH_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:refresh_token";

/// Validates tokens by asking the issuer (RFC 7662). Build it once per configuration.
pub struct IntrospectionValidator {
    settings: IntrospectionSettings,
    http: reqwest::Client,
    cache: Cache<TokenDigest, Cached>,
    /// Recent refusals by token digest, with their reason; `None` when turned off.
    refused: Option<Cache<TokenDigest, Arc<str>>>,
    /// The concurrency cap.
    slots: Semaphore,
    calls: AtomicU64,
}

impl fmt::Debug for IntrospectionValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntrospectionValidator")
            .field("endpoint", &super::redacted(&self.settings.endpoint))
            .field("client_id", &self.settings.client_id)
            .finish_non_exhaustive()
    }
}

impl IntrospectionValidator {
    /// Builds the validator; `http` comes from [`crate::exchange::http_client`]. Called once
    /// per inbound introspection configuration at start.
    pub fn new(settings: IntrospectionSettings, http: reqwest::Client) -> Self {
        let refused = (!settings.negative_cache_ttl.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(settings.max_cached)
                .time_to_live(settings.negative_cache_ttl)
                .build()
        });
        IntrospectionValidator {
            cache: new_cache(settings.max_cached),
            refused,
            slots: Semaphore::new(settings.max_concurrent.max(1)),
            settings,
            http,
            calls: AtomicU64::new(0),
        }
    }

    /// Asks the introspection endpoint about `token` (RFC 7662 §2.1: `token=<token>&
    /// token_type_hint=access_token` with client authentication).
    ///
    /// `active: false` is `Invalid`, and so is an active answer for a refresh token, past its
    /// `exp`, or outside the configured `audiences` / `client_ids`. A non-200 status, a body
    /// that is not a JSON object with a boolean `active`, a body over 64 KiB, or a timeout is
    /// `Unavailable`; no free slot within `queue_timeout` is `Overloaded`. Accepted answers are
    /// cached by SHA-256 of the token for `min(cache_ttl, exp - now)`, refusals for
    /// `negative_cache_ttl`; failures are not cached. Concurrent calls with the same token
    /// share one request.
    pub async fn validate(&self, token: &str) -> Result<Arc<ValidatedToken>, InboundError> {
        self.validate_digested(token, &crate::token::digest(token))
            .await
    }

    /// [`IntrospectionValidator::validate`] for a token whose SHA-256 the caller already has.
    pub async fn validate_digested(
        &self,
        token: &str,
        digest: &TokenDigest,
    ) -> Result<Arc<ValidatedToken>, InboundError> {
        check_size(token)?;
        let digest = *digest;
        if let Some(refused) = &self.refused
            && let Some(reason) = refused.get(&digest).await
        {
            return Err(InboundError::Invalid(reason.to_string()));
        }
        let result = if self.settings.cache_ttl.is_zero() {
            self.introspect(token).await.map(|cached| cached.token)
        } else {
            self.cached_or_introspect(digest, token).await
        };
        if let (Err(InboundError::Invalid(reason)), Some(refused)) = (&result, &self.refused) {
            refused.insert(digest, Arc::from(reason.as_str())).await;
        }
        result
    }

    async fn cached_or_introspect(
        &self,
        digest: TokenDigest,
        token: &str,
    ) -> Result<Arc<ValidatedToken>, InboundError> {
        if let Some(hit) = self.cache.get(&digest).await {
            if hit.token.exp.is_none_or(|exp| exp > now_secs()) {
                return Ok(hit.token);
            }
            self.cache.invalidate(&digest).await;
        }
        self.cache
            .try_get_with(digest, self.introspect(token))
            .await
            .map(|cached| cached.token)
            .map_err(|error| InboundError::clone(&error))
    }

    /// The introspection endpoint (for configuration warnings).
    pub fn endpoint(&self) -> &url::Url {
        &self.settings.endpoint
    }

    /// Number of introspection requests sent so far, for tests and diagnostics.
    pub fn introspection_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    async fn introspect(&self, token: &str) -> Result<Cached, InboundError> {
        // Held until the answer is read: the cap counts calls the issuer is working on.
        let _slot =
            match tokio::time::timeout(self.settings.queue_timeout, self.slots.acquire()).await {
                Ok(Ok(slot)) => slot,
                _ => return Err(InboundError::Overloaded),
            };
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut form = vec![("token", token), ("token_type_hint", "access_token")];
        let mut request = self
            .http
            .post(self.settings.endpoint.clone())
            .timeout(self.settings.timeout)
            .header(header::ACCEPT, "application/json");
        match &self.settings.auth {
            IntrospectionAuth::Basic { header: value } => {
                request = request.header(header::AUTHORIZATION, value.clone());
            }
            IntrospectionAuth::Post { secret } => {
                form.push(("client_id", &self.settings.client_id));
                form.push(("client_secret", secret.expose()));
            }
        }
        let response = request
            .form(&form)
            .send()
            .await
            .map_err(|error| unavailable(transport_reason(&error)))?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(InboundError::Unavailable(format!(
                "the introspection endpoint answered HTTP {}",
                status.as_u16()
            )));
        }
        let body = read_capped(response, MAX_INTROSPECTION_RESPONSE_BYTES)
            .await
            .map_err(|error| match error {
                BodyError::TooLarge => unavailable("the introspection answer is too large"),
                BodyError::Transport(error) => unavailable(transport_reason(&error)),
            })?;
        let now = now_secs();
        let token = interpret(&body, now, &self.settings)?;
        Ok(Cached {
            ttl: ttl_until(token.exp, now, self.settings.cache_ttl),
            token: Arc::new(token),
            epoch: 0,
        })
    }
}

/// Reads an RFC 7662 §2.2 answer taken at time `now`, and applies `settings`' checks.
fn interpret(
    body: &[u8],
    now: u64,
    settings: &IntrospectionSettings,
) -> Result<ValidatedToken, InboundError> {
    let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(body) else {
        return Err(unavailable("the introspection answer is not a JSON object"));
    };
    // §2.2: `active` is REQUIRED and boolean; anything else is a broken server, not a verdict.
    match claims.get("active") {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => return Err(invalid("inactive per introspection")),
        _ => {
            return Err(unavailable(
                "the introspection answer has no boolean active",
            ));
        }
    }
    if let Some(exp) = claims.get("exp") {
        let exp = numeric_date(exp)
            .ok_or_else(|| unavailable("the introspection answer has a malformed exp"))?;
        // An "active" token past its own `exp` is not trusted, whatever the server thinks.
        if exp <= now {
            return Err(invalid("expired"));
        }
    }
    // A refresh token is active too, but it is not a credential for an API call: taking it
    // would let a leaked refresh token stand in for an access token.
    if is_refresh_token(&claims) {
        return Err(invalid("a refresh token, not an access token"));
    }
    if !settings.audiences.is_empty() && !audience_matches(claims.get("aud"), &settings.audiences) {
        return Err(invalid("wrong audience"));
    }
    if !settings.client_ids.is_empty() {
        let client = claims.get("client_id").and_then(Value::as_str);
        if !client.is_some_and(|c| settings.client_ids.iter().any(|allowed| allowed == c)) {
            return Err(invalid("issued to a client that is not allowed"));
        }
    }
    Ok(ValidatedToken::from_claims(claims))
}

/// `token_type` `refresh_token` (or its RFC 8693 URN), or Keycloak's `typ: Refresh`.
fn is_refresh_token(claims: &Map<String, Value>) -> bool {
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    text("token_type")
        .is_some_and(|t| t.eq_ignore_ascii_case("refresh_token") || t == REFRESH_TOKEN_TYPE)
        || text("typ").is_some_and(|t| t.eq_ignore_ascii_case("refresh"))
}

/// RFC 7662 §2.2 `aud` as in RFC 7519 §4.1.3: one string or an array of strings; any one of
/// them accepted is enough.
fn audience_matches(aud: Option<&Value>, accepted: &[String]) -> bool {
    let accepts = |v: &Value| v.as_str().is_some_and(|a| accepted.iter().any(|x| x == a));
    match aud {
        Some(Value::Array(values)) => values.iter().any(accepts),
        Some(value) => accepts(value),
        None => false,
    }
}

fn unavailable(reason: &str) -> InboundError {
    InboundError::Unavailable(reason.to_owned())
}

fn transport_reason(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "the introspection endpoint timed out"
    } else if error.is_connect() {
        "cannot connect to the introspection endpoint"
    } else {
        "the introspection request failed"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use crate::config::defaults::INTROSPECTION_CACHE_TTL as DEFAULT_INTROSPECTION_CACHE_TTL;
    use crate::secret::Secret;
    use http::HeaderValue;

    use axum::extract::State;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde_json::json;

    use super::super::test_support::{closed_address, http, serve};
    use super::*;
    use crate::dev::sts::{DevClient, DevSts, DevStsOptions};

    const CLIENT_ID: &str = "gateway";
    const CLIENT_SECRET: &str = "gateway-secret";

    fn basic() -> IntrospectionAuth {
        let credentials = STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
        let mut header = HeaderValue::from_str(&format!("Basic {credentials}")).unwrap();
        header.set_sensitive(true);
        IntrospectionAuth::Basic { header }
    }

    fn post_auth() -> IntrospectionAuth {
        IntrospectionAuth::Post {
            secret: Secret::new(CLIENT_SECRET),
        }
    }

    /// A dev STS on an ephemeral port, and its introspection endpoint.
    async fn dev_sts() -> (Arc<DevSts>, url::Url) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let sts = DevSts::new(DevStsOptions::new(
            base.clone(),
            vec![DevClient {
                client_id: CLIENT_ID.into(),
                client_secret: Secret::new(CLIENT_SECRET),
            }],
        ))
        .unwrap();
        tokio::spawn(Arc::clone(&sts).serve(listener, std::future::pending()));
        let endpoint = url::Url::parse(&format!("{base}/introspect")).unwrap();
        (sts, endpoint)
    }

    fn introspector(endpoint: url::Url, auth: IntrospectionAuth) -> IntrospectionValidator {
        IntrospectionValidator::new(
            IntrospectionSettings::new(endpoint, CLIENT_ID, auth),
            http(),
        )
    }

    /// An introspection endpoint that gives a fixed answer and records the forms it receives.
    struct Canned {
        status: StatusCode,
        body: String,
        forms: Mutex<Vec<Vec<(String, String)>>>,
        hang: bool,
        /// Signalled for each request received (a permit is kept if nobody waits yet).
        arrived: tokio::sync::Notify,
    }

    async fn canned(status: StatusCode, body: impl Into<String>) -> (Arc<Canned>, url::Url) {
        start_canned(Canned {
            status,
            body: body.into(),
            forms: Mutex::new(Vec::new()),
            hang: false,
            arrived: tokio::sync::Notify::new(),
        })
        .await
    }

    async fn start_canned(canned: Canned) -> (Arc<Canned>, url::Url) {
        let canned = Arc::new(canned);
        let router = axum::Router::new()
            .route("/introspect", post(answer))
            .with_state(Arc::clone(&canned));
        let address = serve(router).await;
        let endpoint = url::Url::parse(&format!("http://{address}/introspect")).unwrap();
        (canned, endpoint)
    }

    async fn answer(State(canned): State<Arc<Canned>>, body: axum::body::Bytes) -> Response {
        let form = url::form_urlencoded::parse(&body).into_owned().collect();
        canned.forms.lock().unwrap().push(form);
        canned.arrived.notify_one();
        if canned.hang {
            std::future::pending::<()>().await;
        }
        let mut response = (canned.status, canned.body.clone()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }

    fn unavailable_reason(result: Result<Arc<ValidatedToken>, InboundError>) -> String {
        match result {
            Err(InboundError::Unavailable(reason)) => reason,
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_active_answer_is_accepted_and_reused() {
        let (sts, endpoint) = dev_sts().await;
        let validator = introspector(endpoint, basic());
        let token = sts
            .issue_user_token("alice", Some("api"), Some("read"))
            .unwrap();

        let first = validator.validate(&token).await.unwrap();
        assert_eq!(first.sub.as_deref(), Some("alice"));
        assert!(first.exp.is_some_and(|exp| exp > now_secs()));
        assert_eq!(first.claims["scope"], "read");
        assert_eq!(validator.introspection_calls(), 1);

        let second = validator.validate(&token).await.unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(validator.introspection_calls(), 1);
    }

    #[tokio::test]
    async fn client_secret_post_works_too() {
        let (sts, endpoint) = dev_sts().await;
        let validator = introspector(endpoint, post_auth());
        let token = sts.issue_user_token("bob", None, None).unwrap();
        let validated = validator.validate(&token).await.unwrap();
        assert_eq!(validated.sub.as_deref(), Some("bob"));
    }

    #[tokio::test]
    async fn sends_the_rfc_7662_form() {
        let answer = json!({"active": true, "sub": "carol", "client_id": "web"}).to_string();
        let (canned, endpoint) = canned(StatusCode::OK, answer).await;
        let validated = introspector(endpoint, post_auth())
            .validate("opaque-token-1")
            .await
            .unwrap();
        assert_eq!(validated.sub.as_deref(), Some("carol"));
        assert_eq!(validated.client_id.as_deref(), Some("web"));
        assert_eq!(validated.exp, None);
        let forms = canned.forms.lock().unwrap().clone();
        let form = &forms[0];
        let value = |name: &str| {
            form.iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
        };
        assert_eq!(value("token"), Some("opaque-token-1"));
        assert_eq!(value("token_type_hint"), Some("access_token"));
        assert_eq!(value("client_id"), Some(CLIENT_ID));
        assert_eq!(value("client_secret"), Some(CLIENT_SECRET));
    }

    #[tokio::test]
    async fn an_inactive_answer_is_invalid_and_remembered_briefly() {
        let (_sts, endpoint) = dev_sts().await;
        let validator = introspector(endpoint.clone(), basic());
        // A replayed bad token costs the issuer one call, not one per attempt.
        for _ in 0..3 {
            let error = validator
                .validate("not-a-token-we-issued")
                .await
                .unwrap_err();
            assert_eq!(
                error,
                InboundError::Invalid("inactive per introspection".into())
            );
            assert_eq!(validator.introspection_calls(), 1);
        }
        // Another token is asked about.
        let _ = validator.validate("another-unknown-token").await;
        assert_eq!(validator.introspection_calls(), 2);

        // With negative caching off, every attempt asks.
        let mut settings = IntrospectionSettings::new(endpoint.clone(), CLIENT_ID, basic());
        settings.negative_cache_ttl = Duration::ZERO;
        let validator = IntrospectionValidator::new(settings, http());
        for expected_calls in [1, 2] {
            let _ = validator.validate("not-a-token-we-issued").await;
            assert_eq!(validator.introspection_calls(), expected_calls);
        }

        // Remembered for negative_cache_ttl only.
        let mut settings = IntrospectionSettings::new(endpoint, CLIENT_ID, basic());
        settings.negative_cache_ttl = Duration::from_millis(200);
        let validator = IntrospectionValidator::new(settings, http());
        let _ = validator.validate("not-a-token-we-issued").await;
        let _ = validator.validate("not-a-token-we-issued").await;
        assert_eq!(validator.introspection_calls(), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = validator.validate("not-a-token-we-issued").await;
        assert_eq!(validator.introspection_calls(), 2);
    }

    #[tokio::test]
    async fn a_refresh_token_is_not_accepted_as_an_access_token() {
        for answer in [
            json!({"active": true, "sub": "ann", "token_type": "refresh_token"}),
            json!({"active": true, "sub": "ann", "token_type": "Refresh_Token"}),
            json!({"active": true, "sub": "ann", "token_type": REFRESH_TOKEN_TYPE}),
            json!({"active": true, "sub": "ann", "typ": "Refresh"}),
        ] {
            let (canned, endpoint) = canned(StatusCode::OK, answer.to_string()).await;
            let validator = introspector(endpoint, basic());
            let error = validator.validate("opaque-refresh").await.unwrap_err();
            assert_eq!(
                error,
                InboundError::Invalid("a refresh token, not an access token".into()),
                "{answer}"
            );
            // Remembered like an inactive answer.
            let _ = validator.validate("opaque-refresh").await;
            assert_eq!(canned.forms.lock().unwrap().len(), 1);
        }
        let bearer = json!({"active": true, "sub": "ann", "token_type": "Bearer"});
        let (_canned, endpoint) = canned(StatusCode::OK, bearer.to_string()).await;
        assert!(
            introspector(endpoint, basic())
                .validate("opaque")
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn audiences_and_client_ids_are_checked_when_configured() {
        let checked = |endpoint: url::Url| {
            let mut settings = IntrospectionSettings::new(endpoint, CLIENT_ID, basic());
            settings.audiences = vec!["https://orders".into(), "orders-api".into()];
            settings.client_ids = vec!["web".into()];
            IntrospectionValidator::new(settings, http())
        };
        let cases = [
            (
                json!({"active": true, "aud": "orders-api", "client_id": "web"}),
                None,
            ),
            (
                json!({"active": true, "aud": ["other", "https://orders"], "client_id": "web"}),
                None,
            ),
            (
                json!({"active": true, "aud": "other", "client_id": "web"}),
                Some("wrong audience"),
            ),
            (
                json!({"active": true, "aud": ["other"], "client_id": "web"}),
                Some("wrong audience"),
            ),
            (
                json!({"active": true, "client_id": "web"}),
                Some("wrong audience"),
            ),
            (
                json!({"active": true, "aud": 7, "client_id": "web"}),
                Some("wrong audience"),
            ),
            (
                json!({"active": true, "aud": "orders-api", "client_id": "batch"}),
                Some("issued to a client that is not allowed"),
            ),
            (
                json!({"active": true, "aud": "orders-api"}),
                Some("issued to a client that is not allowed"),
            ),
        ];
        for (answer, refusal) in cases {
            let (_canned, endpoint) = canned(StatusCode::OK, answer.to_string()).await;
            let result = checked(endpoint.clone()).validate("opaque").await;
            match refusal {
                None => assert!(result.is_ok(), "{answer}: {result:?}"),
                Some(reason) => {
                    assert_eq!(
                        result.unwrap_err(),
                        InboundError::Invalid(reason.into()),
                        "{answer}"
                    )
                }
            }
            // Unconfigured, nothing is checked.
            assert!(
                introspector(endpoint, basic())
                    .validate("opaque")
                    .await
                    .is_ok(),
                "{answer}"
            );
        }
    }

    #[tokio::test]
    async fn calls_over_the_concurrency_cap_are_refused_without_a_call() {
        let (canned, endpoint) = start_canned(Canned {
            status: StatusCode::OK,
            body: r#"{"active":true}"#.into(),
            forms: Mutex::new(Vec::new()),
            hang: true,
            arrived: tokio::sync::Notify::new(),
        })
        .await;
        let mut settings = IntrospectionSettings::new(endpoint, CLIENT_ID, basic());
        settings.max_concurrent = 1;
        settings.queue_timeout = Duration::from_millis(50);
        // The endpoint never answers: the call after the refusal ends by this deadline.
        settings.timeout = Duration::from_millis(300);
        let validator = Arc::new(IntrospectionValidator::new(settings, http()));
        let holder = {
            let validator = Arc::clone(&validator);
            tokio::spawn(async move { validator.validate("first").await })
        };
        // The first call holds the only slot once the endpoint has it.
        canned.arrived.notified().await;
        let error = validator.validate("second").await.unwrap_err();
        assert_eq!(error, InboundError::Overloaded);
        assert_eq!(error.outcome(), "validator_overloaded");
        assert_eq!(validator.introspection_calls(), 1);
        assert_eq!(canned.forms.lock().unwrap().len(), 1);
        // A refusal of ours is not the issuer's verdict: it is not remembered.
        holder.abort();
        let _ = holder.await;
        let again = validator.validate("second").await;
        assert_ne!(again, Err(InboundError::Overloaded));
        assert_eq!(validator.introspection_calls(), 2);
    }

    #[tokio::test]
    async fn an_active_answer_past_its_exp_is_invalid() {
        let answer = json!({"active": true, "sub": "dave", "exp": now_secs() - 5}).to_string();
        let (_canned, endpoint) = canned(StatusCode::OK, answer).await;
        let error = introspector(endpoint, basic())
            .validate("opaque")
            .await
            .unwrap_err();
        assert_eq!(error, InboundError::Invalid("expired".into()));
    }

    #[tokio::test]
    async fn broken_endpoints_make_the_validator_unavailable() {
        let big = format!(
            "{{\"active\": true, \"pad\": \"{}\"}}",
            "x".repeat(MAX_INTROSPECTION_RESPONSE_BYTES)
        );
        let cases = [
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "{}".to_owned(),
                "HTTP 500",
            ),
            (
                StatusCode::UNAUTHORIZED,
                r#"{"error":"invalid_client"}"#.into(),
                "HTTP 401",
            ),
            (StatusCode::OK, "not json".into(), "JSON"),
            (StatusCode::OK, "[true]".into(), "JSON"),
            (StatusCode::OK, r#"{"sub":"x"}"#.into(), "active"),
            (StatusCode::OK, r#"{"active":"true"}"#.into(), "active"),
            (
                StatusCode::OK,
                r#"{"active":true,"exp":"soon"}"#.into(),
                "exp",
            ),
            (StatusCode::OK, big, "too large"),
        ];
        for (status, body, fragment) in cases {
            let (_canned, endpoint) = canned(status, body).await;
            let validator = introspector(endpoint, basic());
            let reason = unavailable_reason(validator.validate("opaque").await);
            assert!(reason.contains(fragment), "{reason:?} lacks {fragment:?}");
            // Failures are not cached: the next call asks again.
            let _ = validator.validate("opaque").await;
            assert_eq!(validator.introspection_calls(), 2);
        }

        let nowhere = url::Url::parse(&format!("http://{}/introspect", closed_address().await));
        let validator = introspector(nowhere.unwrap(), basic());
        let reason = unavailable_reason(validator.validate("opaque").await);
        assert!(reason.contains("connect"), "{reason:?}");

        // Wrong client credentials at a real STS: the gateway's problem, not the caller's.
        let (sts, endpoint) = dev_sts().await;
        let token = sts.issue_user_token("erin", None, None).unwrap();
        let wrong = IntrospectionAuth::Post {
            secret: Secret::new("wrong"),
        };
        let reason = unavailable_reason(introspector(endpoint, wrong).validate(&token).await);
        assert!(reason.contains("401"), "{reason:?}");
    }

    #[tokio::test]
    async fn a_hanging_endpoint_times_out() {
        let (_canned, endpoint) = start_canned(Canned {
            status: StatusCode::OK,
            body: r#"{"active":true}"#.into(),
            forms: Mutex::new(Vec::new()),
            hang: true,
            arrived: tokio::sync::Notify::new(),
        })
        .await;
        let mut settings = IntrospectionSettings::new(endpoint, CLIENT_ID, basic());
        settings.timeout = Duration::from_millis(200);
        let validator = IntrospectionValidator::new(settings, http());
        let reason = unavailable_reason(validator.validate("opaque").await);
        assert!(reason.contains("timed out"), "{reason:?}");
    }

    #[tokio::test]
    async fn concurrent_checks_of_one_token_share_a_call() {
        let (sts, endpoint) = dev_sts().await;
        let validator = introspector(endpoint, basic());
        let token = sts.issue_user_token("frank", None, None).unwrap();
        let results = futures::future::join_all((0..10).map(|_| validator.validate(&token))).await;
        for result in results {
            assert_eq!(result.unwrap().sub.as_deref(), Some("frank"));
        }
        assert_eq!(validator.introspection_calls(), 1);
    }

    #[tokio::test]
    async fn a_zero_cache_ttl_asks_every_time() {
        let (sts, endpoint) = dev_sts().await;
        let mut settings = IntrospectionSettings::new(endpoint, CLIENT_ID, basic());
        settings.cache_ttl = Duration::ZERO;
        let validator = IntrospectionValidator::new(settings, http());
        let token = sts.issue_user_token("grace", None, None).unwrap();
        validator.validate(&token).await.unwrap();
        validator.validate(&token).await.unwrap();
        assert_eq!(validator.introspection_calls(), 2);
    }

    #[tokio::test]
    async fn oversized_or_empty_tokens_are_refused_without_a_call() {
        let (_sts, endpoint) = dev_sts().await;
        let validator = introspector(endpoint, basic());
        for token in [String::new(), "t".repeat(super::super::MAX_TOKEN_BYTES + 1)] {
            let error = validator.validate(&token).await.unwrap_err();
            assert_eq!(error.outcome(), "invalid_token");
        }
        assert_eq!(validator.introspection_calls(), 0);
    }

    #[test]
    fn the_cache_lifetime_never_passes_exp() {
        let settings = IntrospectionSettings::new(
            url::Url::parse("http://127.0.0.1:1/introspect").unwrap(),
            CLIENT_ID,
            basic(),
        );
        let now = 1_000_000;
        let answer = json!({"active": true, "exp": now + 10}).to_string();
        let token = interpret(answer.as_bytes(), now, &settings).unwrap();
        assert_eq!(
            ttl_until(token.exp, now, DEFAULT_INTROSPECTION_CACHE_TTL),
            Duration::from_secs(10)
        );
        let answer = json!({"active": true, "exp": now + 3_600}).to_string();
        let token = interpret(answer.as_bytes(), now, &settings).unwrap();
        assert_eq!(
            ttl_until(token.exp, now, DEFAULT_INTROSPECTION_CACHE_TTL),
            DEFAULT_INTROSPECTION_CACHE_TTL
        );
    }

    #[test]
    fn debug_output_hides_credentials() {
        let text = format!("{:?} {:?}", basic(), post_auth());
        assert!(!text.contains(CLIENT_SECRET));
        assert!(!text.contains(&STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))));
    }
}
