//! OAuth 2.0 Token Exchange (RFC 8693) at a token service.
//!
//! One function, [`exchange`], sends the §2.1 request for an [`ExchangeProfile`] and turns the
//! answer into an [`ExchangedToken`] or an [`ExchangeError`] whose variant decides the caller's
//! status (DESIGN.md step 6). The STS is a remote dependency that can be slow, down, or wrong,
//! so the whole call is bounded by the token service's `timeout`, the answer's body is capped,
//! and the JSON is read defensively: RFC 8693 §2.2.1 says `issued_token_type` and `token_type`
//! are required, but real servers omit them (Entra's on-behalf-of has no `issued_token_type`),
//! send `expires_in` as a string, or answer `N_A`.

pub mod actor;
pub mod discovery;
mod profile;
pub mod resilience;

use std::time::Duration;

use http::{HeaderValue, StatusCode, header};
use serde::Deserialize;

pub use profile::{
    ActorSource, ExchangeProfile, Mode, TokenService, TokenServices, token_services,
};

use crate::config::{ClientAuth, ExchangeSettings, Grant};

/// RFC 8693 §2.1 `grant_type`.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 7523 §2.1 `grant_type`, used by Entra's on-behalf-of flow.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The largest STS answer read; token responses are a few KiB at most.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// `Retry-After` sent to callers when the STS is unavailable and gave no hint of its own.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(2);
/// Longest lifetime believed from `expires_in`; longer values are clamped.
const MAX_EXPIRES_IN: Duration = Duration::from_secs(24 * 3600);

/// Builds the HTTP client for one token service. Called once per token service at config load;
/// the total timeout is applied per call by [`exchange`].
pub fn http_client(connect_timeout: Duration) -> reqwest::Result<reqwest::Client> {
    crate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        // A token endpoint that redirects would make us resend credentials elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("txgate/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A token issued by the STS.
pub struct ExchangedToken {
    pub access_token: String,
    /// `expires_in`, clamped to a day; `None` when the STS omitted it.
    pub expires_in: Option<Duration>,
    pub issued_token_type: Option<String>,
}

/// Why an exchange failed. Each variant maps to one caller status (see [`crate::error`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExchangeError {
    /// `invalid_grant` / `invalid_request`: the STS rejected the caller's token.
    #[error("the token service rejected the subject token ({code})")]
    SubjectRejected { code: OAuthErrorCode },
    /// `invalid_target` / `invalid_scope` / `unauthorized_client` / `access_denied`.
    #[error("the token service refused the requested access ({code})")]
    Forbidden { code: OAuthErrorCode },
    /// `invalid_client` or `unsupported_grant_type`, or a 401 without an error code (`code` is
    /// `None`): the gateway's own credentials or setup are wrong.
    #[error(
        "the token service rejected the gateway's client credentials (HTTP {status}, {})",
        .code.map_or("no error code", OAuthErrorCode::as_str)
    )]
    ClientRejected {
        status: u16,
        code: Option<OAuthErrorCode>,
    },
    /// 5xx, 429, no connection, or refused by the gateway's own guard (see [`Unavailability`]).
    #[error("the token service is unavailable ({cause})")]
    Unavailable {
        cause: Unavailability,
        retry_after: Option<Duration>,
    },
    /// The `private_key_jwt` / `client_secret_jwt` assertion could not be signed: the gateway
    /// cannot authenticate, so the STS is not called.
    #[error(transparent)]
    SigningFailed(crate::assertion::SigningError),
    /// No complete answer within the token service's `timeout`.
    #[error("the token service did not answer within {0:?}")]
    Timeout(Duration),
    /// An answer the gateway cannot use.
    #[error("the token service sent an unusable answer: {0}")]
    BadResponse(String),
    /// The issued token is, or contains, the subject or actor token the gateway sent:
    /// forwarding it would hand the caller's (or the gateway's) own token to the upstream.
    #[error("the token service echoed an input token as the issued token")]
    EchoedInputToken,
    /// The STS wants the user to authenticate again, more strongly or with consent (RFC 9470
    /// `insufficient_user_authentication`, OpenID `interaction_required` / `consent_required`):
    /// relayed to the caller as a 401 challenge with what the STS asked for.
    #[error("the token service asks for a stronger user authentication ({})", .0.code)]
    StepUp(StepUp),
    /// `issued_token_type` is not the configured `requested_token_type` (RFC 8693 §2.2.1).
    #[error("the token service issued a {issued} where {requested} was requested")]
    UnexpectedTokenType { requested: String, issued: String },
}

impl ExchangeError {
    /// The `outcome` label of `txgate_token_exchanges_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ExchangeError::SubjectRejected { .. } => "subject_rejected",
            ExchangeError::Forbidden { .. } => "forbidden",
            // Counted with our own credentials: like a rejected client, the gateway cannot
            // authenticate or act, and an operator has to fix it.
            ExchangeError::ClientRejected { .. } | ExchangeError::SigningFailed(_) => {
                "client_rejected"
            }
            // Refused by the gateway itself: no STS call was made.
            ExchangeError::Unavailable { cause, .. } => match cause {
                Unavailability::CircuitOpen => "circuit_open",
                Unavailability::Overloaded => "overloaded",
                _ => "unavailable",
            },
            ExchangeError::Timeout(_) => "timeout",
            ExchangeError::BadResponse(_) => "bad_response",
            ExchangeError::EchoedInputToken => "echoed_input_token",
            ExchangeError::UnexpectedTokenType { .. } => "unexpected_token_type",
            ExchangeError::StepUp(_) => "step_up",
        }
    }

    /// The OAuth code of a definitive rejection (what the shared cache stores of it); `None`
    /// for every other error.
    pub fn rejected_code(&self) -> Option<OAuthErrorCode> {
        match self {
            ExchangeError::SubjectRejected { code } | ExchangeError::Forbidden { code }
                if self.is_definitive() =>
            {
                Some(*code)
            }
            _ => None,
        }
    }

    /// Whether the STS gave a definitive answer about this request, one that asking again
    /// right away would not change; the token cache remembers these for `cache.negative_ttl`.
    /// `invalid_grant` and `invalid_request` are about the subject token itself and
    /// `invalid_target` about the route's configured audience or resource (RFC 8693 §2.2.2).
    /// The other refusals, outages, timeouts and our own credential problems are asked again.
    pub fn is_definitive(&self) -> bool {
        matches!(
            self,
            ExchangeError::SubjectRejected {
                code: OAuthErrorCode::InvalidGrant | OAuthErrorCode::InvalidRequest,
            } | ExchangeError::Forbidden {
                code: OAuthErrorCode::InvalidTarget,
            }
        )
    }
}

/// What an STS asked of the user in a step-up answer, checked to be safe in a
/// `WWW-Authenticate` challenge (RFC 9470 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepUp {
    /// The code the STS sent.
    pub code: OAuthErrorCode,
    /// `acr_values`: space-separated authentication context class references.
    pub acr_values: Option<String>,
    /// `max_age`: the longest time since the user's authentication, in seconds.
    pub max_age: Option<u64>,
    /// Entra's `claims` challenge (a JSON object as text), relayed as the STS sent it.
    pub claims: Option<String>,
}

/// The longest `acr_values` or `claims` value relayed from an STS.
const MAX_CHALLENGE_VALUE: usize = 2048;

impl StepUp {
    /// The parameters of a step-up answer, or an unusable answer when a value could not go
    /// into a challenge safely (control characters, absurd lengths, a non-number `max_age`).
    fn from_body(code: OAuthErrorCode, body: &ErrorResponse) -> Result<StepUp, ExchangeError> {
        let text = |name: &str, value: &Option<serde_json::Value>| match value {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(v))
                if v.len() <= MAX_CHALLENGE_VALUE
                    && v.bytes().all(|b| (0x20..0x7f).contains(&b)) =>
            {
                Ok(Some(v.clone()))
            }
            Some(_) => Err(ExchangeError::BadResponse(format!(
                "the step-up answer's {name} is not printable text of at most {MAX_CHALLENGE_VALUE} bytes"
            ))),
        };
        let acr_values = text("acr_values", &body.acr_values)?;
        let claims = match &body.claims {
            // Entra sends the claims challenge as text; an object is taken as its JSON.
            Some(serde_json::Value::Object(o)) => text(
                "claims",
                &Some(serde_json::Value::String(
                    serde_json::Value::Object(o.clone()).to_string(),
                )),
            )?,
            other => text("claims", other)?,
        };
        let max_age = match &body.max_age {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
            Some(_) => None,
        };
        if body.max_age.as_ref().is_some_and(|v| !v.is_null()) && max_age.is_none() {
            return Err(ExchangeError::BadResponse(
                "the step-up answer's max_age is not a number of seconds".into(),
            ));
        }
        Ok(StepUp {
            code,
            acr_values,
            max_age,
            claims,
        })
    }

    /// Whether any value carries `input` (an STS must never make the gateway hand a token to
    /// the caller's client in a challenge).
    fn carries(&self, input: &str) -> bool {
        [self.acr_values.as_deref(), self.claims.as_deref()]
            .into_iter()
            .flatten()
            .any(|v| v.contains(input))
    }
}

/// Why a token service cannot be used right now. A type, not a message: metrics, logs and the
/// retry decision match on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailability {
    /// No connection could be made.
    #[error("cannot connect")]
    CannotConnect,
    /// The connection broke during the call.
    #[error("connection failed")]
    ConnectionFailed,
    /// The STS answered 429 or a 5xx status.
    #[error("HTTP {0}")]
    Status(u16),
    /// The STS answered `temporarily_unavailable` or `server_error` (RFC 6749 §4.1.2.1).
    #[error("{0}")]
    OAuthError(OAuthErrorCode),
    /// The circuit breaker is open: no STS call was made.
    #[error("the token service circuit breaker is open")]
    CircuitOpen,
    /// The concurrency cap was reached: no STS call was made.
    #[error("too many concurrent calls to the token service")]
    Overloaded,
}

/// The OAuth error codes (RFC 6749 §5.2 and §4.1.2.1, RFC 8693 §2.2.2) the gateway tells
/// apart. An STS's `error` string becomes one of these once, in [`interpret`]; the caller's
/// status, negative caching and the circuit breaker match on the variant, never on the text.
/// A code not listed here is an unusable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthErrorCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnauthorizedClient,
    UnsupportedGrantType,
    InvalidScope,
    /// RFC 8693 §2.2.2: the STS will not issue a token for the requested audience or resource.
    InvalidTarget,
    /// An authorization-endpoint code (RFC 6749 §4.1.2.1) that some STSs also send from the
    /// token endpoint when policy forbids the exchange.
    AccessDenied,
    /// Also an authorization-endpoint code; STSs send it for an internal failure.
    ServerError,
    /// Also an authorization-endpoint code; STSs send it when overloaded or in maintenance.
    TemporarilyUnavailable,
    /// RFC 9470 §3: the user must authenticate again, as `acr_values` / `max_age` say.
    InsufficientUserAuthentication,
    /// OpenID Connect Core §3.1.2.6: the user must interact (Entra: a claims challenge).
    InteractionRequired,
    /// OpenID Connect Core §3.1.2.6: the user must consent.
    ConsentRequired,
}

impl OAuthErrorCode {
    /// The code as an STS spells it, or `None` for a code the gateway does not tell apart.
    pub fn parse(code: &str) -> Option<OAuthErrorCode> {
        Some(match code {
            "invalid_request" => OAuthErrorCode::InvalidRequest,
            "invalid_client" => OAuthErrorCode::InvalidClient,
            "invalid_grant" => OAuthErrorCode::InvalidGrant,
            "unauthorized_client" => OAuthErrorCode::UnauthorizedClient,
            "unsupported_grant_type" => OAuthErrorCode::UnsupportedGrantType,
            "invalid_scope" => OAuthErrorCode::InvalidScope,
            "invalid_target" => OAuthErrorCode::InvalidTarget,
            "access_denied" => OAuthErrorCode::AccessDenied,
            "server_error" => OAuthErrorCode::ServerError,
            "temporarily_unavailable" => OAuthErrorCode::TemporarilyUnavailable,
            "insufficient_user_authentication" => OAuthErrorCode::InsufficientUserAuthentication,
            "interaction_required" => OAuthErrorCode::InteractionRequired,
            "consent_required" => OAuthErrorCode::ConsentRequired,
            _ => return None,
        })
    }

    /// The wire spelling, for logs and error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            OAuthErrorCode::InvalidRequest => "invalid_request",
            OAuthErrorCode::InvalidClient => "invalid_client",
            OAuthErrorCode::InvalidGrant => "invalid_grant",
            OAuthErrorCode::UnauthorizedClient => "unauthorized_client",
            OAuthErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            OAuthErrorCode::InvalidScope => "invalid_scope",
            OAuthErrorCode::InvalidTarget => "invalid_target",
            OAuthErrorCode::AccessDenied => "access_denied",
            OAuthErrorCode::ServerError => "server_error",
            OAuthErrorCode::TemporarilyUnavailable => "temporarily_unavailable",
            OAuthErrorCode::InsufficientUserAuthentication => "insufficient_user_authentication",
            OAuthErrorCode::InteractionRequired => "interaction_required",
            OAuthErrorCode::ConsentRequired => "consent_required",
        }
    }
}

impl std::fmt::Display for OAuthErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The tokens an STS call carries.
#[derive(Clone, Copy)]
pub struct Tokens<'a> {
    /// The caller's token; `None` for client credentials.
    pub subject: Option<&'a str>,
    /// The actor token of a delegation.
    pub actor: Option<&'a str>,
    /// A Transaction Token request's `request_context` (base64url of a JSON object).
    pub context: Option<&'a str>,
}

/// Obtains a token per `profile` (RFC 8693 §2.1 token exchange, Entra on-behalf-of, or client
/// credentials). Called on a cache miss; the caller coalesces concurrent misses, so this runs
/// once per key at a time.
pub async fn exchange(
    profile: &ExchangeProfile,
    tokens: Tokens<'_>,
) -> Result<ExchangedToken, ExchangeError> {
    let service = &profile.service;
    let timeout = service.settings.timeout;
    // One deadline for the whole call: queueing, every attempt and the backoff between them.
    let deadline = tokio::time::Instant::now() + timeout;
    let admission = service.resilience.admit().await?;
    let mut attempt = 0;
    let result = loop {
        // Built per attempt: a client assertion's `jti` must never be reused.
        let body = match form_body(&profile.settings, tokens, Render::Send) {
            Ok(body) => body,
            Err(e) => break Err(e),
        };
        let outcome = match tokio::time::timeout_at(deadline, send(service, body)).await {
            Ok(result) => result,
            Err(_) => Err(ExchangeError::Timeout(timeout)),
        };
        match outcome {
            Err(e)
                if resilience::retryable(&e) && attempt < service.resilience.settings.retries =>
            {
                attempt += 1;
                let wait = resilience::Resilience::backoff(attempt);
                if tokio::time::Instant::now() + wait >= deadline {
                    break Err(e);
                }
                tracing::debug!(token_service = %service.name(), attempt, "retrying the token service");
                tokio::time::sleep(wait).await;
            }
            other => break other,
        }
    };
    let result = result
        .and_then(|issued| accept(&profile.settings, tokens, issued))
        .map_err(|e| match e {
            // A challenge goes back to the caller's client: never with a token in it.
            ExchangeError::StepUp(step_up)
                if [tokens.subject, tokens.actor]
                    .into_iter()
                    .flatten()
                    .filter(|input| input.len() >= MIN_GUARDED_TOKEN_BYTES)
                    .any(|input| step_up.carries(input)) =>
            {
                ExchangeError::EchoedInputToken
            }
            other => other,
        });
    let summary = result.as_ref().map(|_| ()).map_err(Clone::clone);
    service.resilience.record(admission, &summary);
    if let Err(e @ (ExchangeError::EchoedInputToken | ExchangeError::UnexpectedTokenType { .. })) =
        &result
    {
        // Logged here, where every caller of an exchange passes (requests, background
        // refreshes, the gateway's own actor token), so none goes unreported. The error names
        // no token.
        tracing::error!(token_service = %service.name(), outcome = e.outcome(), error = %e, "refused the token service's answer");
    }
    result
}

/// Checks a successful answer against what was sent and asked for. An STS that answers with
/// the subject or actor token itself (a pass-through or a misconfigured mapping) would make
/// the gateway forward the very token it exists to keep from the upstream; a token of another
/// type than `requested_token_type` is not what the route was configured to send.
fn accept(
    profile: &ExchangeSettings,
    tokens: Tokens<'_>,
    issued: ExchangedToken,
) -> Result<ExchangedToken, ExchangeError> {
    let inputs = || {
        [tokens.subject, tokens.actor]
            .into_iter()
            .flatten()
            .filter(|input| !input.is_empty())
    };
    // A shorter input is matched whole only: inside a longer token it is likely chance.
    let echoes = |input: &str| {
        issued.access_token == input
            || (input.len() >= MIN_GUARDED_TOKEN_BYTES && issued.access_token.contains(input))
    };
    if inputs().any(echoes) {
        return Err(ExchangeError::EchoedInputToken);
    }
    if let (Some(requested), Some(got)) = (
        profile.requested_token_type.as_deref(),
        issued.issued_token_type.as_deref(),
    ) && requested != got
    {
        // The type is logged: never let an STS put an input token in a log line through it.
        let issued = if inputs().any(|input| got.contains(input)) {
            "<redacted>".to_string()
        } else {
            got.chars().take(128).collect()
        };
        return Err(ExchangeError::UnexpectedTokenType {
            requested: requested.to_string(),
            issued,
        });
    }
    Ok(issued)
}

/// Whether a form is for the wire or for showing to an operator.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Render {
    Send,
    /// Secrets as `<redacted>`, assertions as `<signed JWT>`.
    Describe,
}

/// The request a profile sends, for `txgate check --verbose`: the endpoint, the client
/// authentication, and the form with the caller's and actor's tokens as placeholders and no
/// secret.
pub fn describe_request(profile: &ExchangeSettings) -> String {
    describe_step(profile, "CALLER_TOKEN")
}

/// [`describe_request`] with `subject` as the subject's placeholder (a chain step's subject
/// is the previous step's result).
pub fn describe_step(profile: &ExchangeSettings, subject: &str) -> String {
    let tokens = Tokens {
        subject: Some(subject),
        actor: Some("ACTOR_TOKEN").filter(|_| profile.mode.actor().is_some()),
        context: Some("REQUEST_CONTEXT").filter(|_| {
            matches!(
                profile.mode,
                crate::config::ModeSettings::TransactionToken { .. }
            )
        }),
    };
    let body = form_body(profile, tokens, Render::Describe).unwrap_or_default();
    format!(
        "POST {} ({:?}) {body}",
        profile.service.token_endpoint, profile.service.client_auth
    )
}

/// The form: grant, tokens, configured parameters, and client credentials for the methods that
/// put them in the body. Only what is configured is sent.
fn form_body(
    profile: &ExchangeSettings,
    tokens: Tokens<'_>,
    render: Render,
) -> Result<String, ExchangeError> {
    let subject = tokens.subject.unwrap_or_default();
    let mut form =
        url::form_urlencoded::Serializer::new(String::with_capacity(512 + subject.len()));
    match profile.grant {
        Grant::TokenExchange => {
            form.append_pair("grant_type", TOKEN_EXCHANGE_GRANT);
            form.append_pair("subject_token", subject);
            form.append_pair("subject_token_type", &profile.subject_token_type);
            if let Some(actor) = tokens.actor {
                form.append_pair("actor_token", actor);
                form.append_pair("actor_token_type", &profile.actor_token_type);
            }
        }
        Grant::JwtBearer => {
            form.append_pair("grant_type", JWT_BEARER_GRANT);
            form.append_pair("assertion", subject);
        }
        Grant::ClientCredentials => {
            form.append_pair("grant_type", "client_credentials");
        }
    }
    for (key, value) in &profile.params {
        form.append_pair(key, value);
    }
    if let Some(context) = tokens.context {
        form.append_pair("request_context", context);
    }
    let service = &profile.service;
    match &service.client_auth {
        ClientAuth::Basic { .. } => {}
        ClientAuth::Post => {
            form.append_pair("client_id", &service.client_id);
            if let Some(secret) = &service.client_secret {
                let secret = match render {
                    Render::Send => secret.expose(),
                    Render::Describe => "<redacted>",
                };
                form.append_pair("client_secret", secret);
            }
        }
        ClientAuth::PrivateKeyJwt(signer) | ClientAuth::SecretJwt(signer) => {
            let assertion = match render {
                Render::Send => signer
                    .sign(&service.client_id, service.token_endpoint.as_str())
                    .map_err(ExchangeError::SigningFailed)?,
                Render::Describe => "<signed JWT>".to_string(),
            };
            form.append_pair("client_id", &service.client_id);
            form.append_pair(
                "client_assertion_type",
                crate::assertion::JWT_BEARER_ASSERTION,
            );
            form.append_pair("client_assertion", &assertion);
        }
    }
    Ok(form.finish())
}

async fn send(live: &TokenService, body: String) -> Result<ExchangedToken, ExchangeError> {
    let service = &*live.settings;
    let mut request = live
        .http
        .post(service.token_endpoint.clone())
        .timeout(service.timeout)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ACCEPT, "application/json")
        .body(body);
    if let ClientAuth::Basic { header } = &service.client_auth {
        request = request.header(header::AUTHORIZATION, header.clone());
    }
    let transport_error = |e| transport_error(e, service.timeout);
    let mut response = request.send().await.map_err(transport_error)?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(parse_retry_after);
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(ExchangeError::BadResponse(format!(
                "response body larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    interpret(status, retry_after, &body)
}

/// A failed request or body read. `timeout` is the token service's, which reqwest enforces
/// per request as well as [`exchange`] for the whole call.
fn transport_error(e: reqwest::Error, timeout: Duration) -> ExchangeError {
    if e.is_timeout() && !e.is_connect() {
        // reqwest's own total timeout equals ours; report it the same way.
        return ExchangeError::Timeout(timeout);
    }
    let cause = if e.is_connect() {
        Unavailability::CannotConnect
    } else {
        Unavailability::ConnectionFailed
    };
    ExchangeError::Unavailable {
        cause,
        retry_after: None,
    }
}

/// `Retry-After` as delta-seconds (RFC 9110 §10.2.3); HTTP dates are ignored.
fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let secs: u64 = value.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(3600)))
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<serde_json::Value>,
    token_type: Option<serde_json::Value>,
    issued_token_type: Option<serde_json::Value>,
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: Option<serde_json::Value>,
    /// Step-up answers (RFC 9470 §3, Entra's claims challenge).
    #[serde(default)]
    acr_values: Option<serde_json::Value>,
    #[serde(default)]
    max_age: Option<serde_json::Value>,
    #[serde(default)]
    claims: Option<serde_json::Value>,
}

/// Turns an STS answer into a token or an error (RFC 8693 §2.2.1 and §2.2.2, RFC 6749 §5.2).
pub fn interpret(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<ExchangedToken, ExchangeError> {
    if status == StatusCode::OK {
        return parse_success(body);
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return Err(ExchangeError::Unavailable {
            cause: Unavailability::Status(status.as_u16()),
            retry_after,
        });
    }
    let parsed = serde_json::from_slice::<ErrorResponse>(body).ok();
    let raw = parsed
        .as_ref()
        .and_then(|e| e.error.as_ref())
        .and_then(|e| e.as_str().map(str::to_string));
    // The one place where the STS's `error` text becomes a type; everything after this
    // matches on the variant.
    let code = raw.as_deref().and_then(OAuthErrorCode::parse);
    use OAuthErrorCode as C;
    match (status.as_u16(), code) {
        (400 | 401 | 403, Some(code @ (C::InvalidGrant | C::InvalidRequest))) => {
            Err(ExchangeError::SubjectRejected { code })
        }
        (
            400 | 401 | 403,
            Some(
                code @ (C::InvalidTarget
                | C::InvalidScope
                | C::UnauthorizedClient
                | C::AccessDenied),
            ),
        ) => Err(ExchangeError::Forbidden { code }),
        (status @ (400 | 401), Some(code @ (C::InvalidClient | C::UnsupportedGrantType))) => {
            Err(ExchangeError::ClientRejected {
                status,
                code: Some(code),
            })
        }
        // A bare 401 is about our credentials; a 401 with a code we do not know is not.
        (401, None) if raw.is_none() => Err(ExchangeError::ClientRejected {
            status: 401,
            code: None,
        }),
        (
            400 | 401 | 403,
            Some(
                code @ (C::InsufficientUserAuthentication
                | C::InteractionRequired
                | C::ConsentRequired),
            ),
        ) => match &parsed {
            Some(body) => Err(ExchangeError::StepUp(StepUp::from_body(code, body)?)),
            None => Err(unusable_error(status.as_u16(), raw.as_deref())),
        },
        (_, Some(code @ (C::TemporarilyUnavailable | C::ServerError))) => {
            Err(ExchangeError::Unavailable {
                cause: Unavailability::OAuthError(code),
                retry_after,
            })
        }
        (status, _) => Err(unusable_error(status, raw.as_deref())),
    }
}

/// An error answer that fits none of the classes: an unknown code, a known code with a status
/// it does not go with, or no OAuth error body at all.
fn unusable_error(status: u16, code: Option<&str>) -> ExchangeError {
    ExchangeError::BadResponse(match code {
        // The code is logged: only a short word of the shape OAuth codes have, never
        // arbitrary text an STS chose (it could hold the subject token).
        Some(code)
            if code.len() <= 40
                && code
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') =>
        {
            format!("HTTP {status} with unknown error code \"{code}\"")
        }
        Some(_) => {
            format!("HTTP {status} with an unknown error code that is not a plain word")
        }
        None => format!("HTTP {status} without an OAuth error body"),
    })
}

fn parse_success(body: &[u8]) -> Result<ExchangedToken, ExchangeError> {
    let bad = |m: &str| ExchangeError::BadResponse(m.to_string());
    let parsed: TokenResponse =
        serde_json::from_slice(body).map_err(|_| bad("the token response is not a JSON object"))?;
    let access_token = match parsed.access_token {
        Some(serde_json::Value::String(t)) if !t.is_empty() => t,
        Some(_) => return Err(bad("access_token is not a non-empty string")),
        None => return Err(bad("the token response has no access_token")),
    };
    // The token goes into an Authorization header: RFC 6750 b64token characters only.
    if !access_token.bytes().all(is_token_char) {
        return Err(bad(
            "access_token has characters not allowed in a bearer token",
        ));
    }
    match parsed.token_type {
        None => {}
        Some(serde_json::Value::String(t)) if t.eq_ignore_ascii_case("bearer") || t == "N_A" => {}
        Some(_) => {
            return Err(bad(
                "token_type is neither Bearer nor N_A; the gateway forwards bearer tokens only",
            ));
        }
    }
    let issued_token_type = match parsed.issued_token_type {
        Some(serde_json::Value::String(t)) => Some(t),
        None | Some(serde_json::Value::Null) => None,
        Some(_) => return Err(bad("issued_token_type is not a string")),
    };
    let expires_in = match parsed.expires_in {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => Some(seconds(n.as_f64())?),
        Some(serde_json::Value::String(s)) => Some(seconds(s.trim().parse::<f64>().ok())?),
        Some(_) => return Err(bad("expires_in is not a number")),
    };
    Ok(ExchangedToken {
        access_token,
        expires_in,
        issued_token_type,
    })
}

/// `expires_in` as a duration: negative means already expired, huge is clamped.
fn seconds(value: Option<f64>) -> Result<Duration, ExchangeError> {
    match value {
        // Clamp before converting: a huge value would not fit a Duration.
        Some(v) if v.is_finite() => Ok(Duration::from_secs_f64(
            v.clamp(0.0, MAX_EXPIRES_IN.as_secs_f64()),
        )),
        _ => Err(ExchangeError::BadResponse(
            "expires_in is not a number".into(),
        )),
    }
}

/// RFC 6750 §2.1 b64token characters, plus the trailing `=` padding.
pub fn is_token_char(b: u8) -> bool {
    TOKEN_CHARS[usize::from(b)] != 0
}

/// Shorter values are not treated as tokens when searched for inside other text (URLs,
/// headers, STS answers): no credential is this short, and a caller-chosen `http` or `1` would
/// otherwise match the gateway's own headers or half of every request.
pub const MIN_GUARDED_TOKEN_BYTES: usize = 8;

/// [`TOKEN_CHARS`] entry of a b64token body character (everything but `=`).
pub const TOKEN_BODY: u8 = 1;
/// [`TOKEN_CHARS`] entry of the `=` padding.
pub const TOKEN_PAD: u8 = 2;

/// Every byte's class for b64token checks: one table load per byte on the request path.
pub static TOKEN_CHARS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/') {
            table[b] = TOKEN_BODY;
        }
        b += 1;
    }
    table[b'=' as usize] = TOKEN_PAD;
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Result<ExchangedToken, ExchangeError> {
        interpret(StatusCode::OK, None, body.as_bytes())
    }

    fn err(status: u16, body: &str) -> ExchangeError {
        match interpret(StatusCode::from_u16(status).unwrap(), None, body.as_bytes()) {
            Err(e) => e,
            Ok(_) => panic!("expected an error for {status} {body}"),
        }
    }

    #[test]
    fn full_response_is_parsed() {
        let t = ok(r#"{"access_token":"abc.def.ghi","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","token_type":"Bearer","expires_in":300}"#).unwrap();
        assert_eq!(t.access_token, "abc.def.ghi");
        assert_eq!(t.expires_in, Some(Duration::from_secs(300)));
        assert!(t.issued_token_type.is_some());
    }

    #[test]
    fn optional_fields_may_be_missing_or_odd() {
        let t = ok(r#"{"access_token":"x"}"#).unwrap();
        assert_eq!(t.expires_in, None);
        assert_eq!(t.issued_token_type, None);
        let t = ok(r#"{"access_token":"x","token_type":"N_A","expires_in":"120"}"#).unwrap();
        assert_eq!(t.expires_in, Some(Duration::from_secs(120)));
        let t = ok(r#"{"access_token":"x","expires_in":-5}"#).unwrap();
        assert_eq!(t.expires_in, Some(Duration::ZERO));
        let t = ok(r#"{"access_token":"x","expires_in":1e12}"#).unwrap();
        assert_eq!(t.expires_in, Some(MAX_EXPIRES_IN));
        let t = ok(r#"{"access_token":"x","expires_in":1e300}"#).unwrap();
        assert_eq!(t.expires_in, Some(MAX_EXPIRES_IN));
    }

    #[test]
    fn unusable_success_bodies_are_bad_responses() {
        for body in [
            "<html>oops</html>",
            "{}",
            r#"{"access_token":""}"#,
            r#"{"access_token":42}"#,
            r#"{"access_token":"a b"}"#,
            r#"{"access_token":"x","token_type":"DPoP"}"#,
            r#"{"access_token":"x","expires_in":"soon"}"#,
            r#"{"access_token":"x","expires_in":[1]}"#,
        ] {
            assert!(
                matches!(ok(body), Err(ExchangeError::BadResponse(_))),
                "{body}"
            );
        }
    }

    /// The exchange profile of a route with the given extra `exchange:` keys.
    fn profile(extra: &str) -> std::sync::Arc<ExchangeSettings> {
        let yaml = format!(
            "server: {{ listen: [\"127.0.0.1:0\"] }}\ntoken_services:\n  corp: {{ token_endpoint: \"http://127.0.0.1:1/token\", client_id: gw, client_secret: s }}\nroutes:\n  - {{ name: r, match: {{ path_prefix: / }}, upstream: \"http://127.0.0.1:2\", exchange: {{ mode: delegation, token_service: corp{extra} }} }}\n"
        );
        let config = crate::config::Config::from_yaml(&yaml, "t.yaml", &|_| None).unwrap();
        match &config.routes[0].exchange {
            crate::config::Exchange::Token(p) => p.clone(),
            _ => unreachable!("the route exchanges at one token service"),
        }
    }

    fn issued(token: &str, issued_token_type: Option<&str>) -> ExchangedToken {
        ExchangedToken {
            access_token: token.into(),
            expires_in: None,
            issued_token_type: issued_token_type.map(str::to_string),
        }
    }

    const SUBJECT: &str = "eyJhbGciOiJFUzI1NiJ9.c3ViamVjdA.c2ln";
    const ACTOR: &str = "gateway-own-token-4f1c";
    const TOKENS: Tokens<'static> = Tokens {
        subject: Some(SUBJECT),
        actor: Some(ACTOR),
        context: None,
    };

    #[test]
    fn an_answer_holding_an_input_token_is_refused() {
        let p = profile("");
        for answer in [
            SUBJECT.to_string(),
            ACTOR.to_string(),
            format!("wrapped.{SUBJECT}"),
            format!("{ACTOR}-suffix"),
        ] {
            assert!(
                matches!(
                    accept(&p, TOKENS, issued(&answer, None)),
                    Err(ExchangeError::EchoedInputToken)
                ),
                "{answer}"
            );
        }
        let fresh = accept(&p, TOKENS, issued("a-new-token", None)).unwrap();
        assert_eq!(fresh.access_token, "a-new-token");
        // Client credentials send no input token: nothing to compare with.
        let none = Tokens {
            subject: None,
            actor: None,
            context: None,
        };
        assert!(accept(&p, none, issued(SUBJECT, None)).is_ok());
    }

    #[test]
    fn an_issued_token_type_other_than_the_requested_one_is_refused() {
        let jwt = "urn:ietf:params:oauth:token-type:jwt";
        let access = "urn:ietf:params:oauth:token-type:access_token";
        let p = profile(", requested_token_type: jwt");
        assert!(accept(&p, TOKENS, issued("t1", Some(jwt))).is_ok());
        // The answer may leave it out (Entra does); then there is nothing to compare.
        assert!(accept(&p, TOKENS, issued("t1", None)).is_ok());
        match accept(&p, TOKENS, issued("t1", Some(access))) {
            Err(e @ ExchangeError::UnexpectedTokenType { .. }) => {
                assert_eq!(e.outcome(), "unexpected_token_type");
                assert_eq!(
                    e.to_string(),
                    format!("the token service issued a {access} where {jwt} was requested")
                );
            }
            other => panic!("expected UnexpectedTokenType, got {:?}", other.err()),
        }
        // Nothing requested: any type is taken.
        assert!(accept(&profile(""), TOKENS, issued("t1", Some(access))).is_ok());
        // A type that smuggles an input token is not repeated in the error (it is logged).
        match accept(&p, TOKENS, issued("t1", Some(&format!("urn:{SUBJECT}")))) {
            Err(e) => assert!(!e.to_string().contains(SUBJECT), "{e}"),
            Ok(_) => panic!("accepted a mistyped token"),
        }
    }

    #[test]
    fn refusals_without_an_sts_call_have_their_own_outcomes() {
        let refused = |cause| ExchangeError::Unavailable {
            cause,
            retry_after: None,
        };
        assert_eq!(
            refused(Unavailability::CircuitOpen).outcome(),
            "circuit_open"
        );
        assert_eq!(refused(Unavailability::Overloaded).outcome(), "overloaded");
        assert_eq!(
            refused(Unavailability::Status(503)).outcome(),
            "unavailable"
        );
        assert_eq!(
            refused(Unavailability::CircuitOpen).to_string(),
            "the token service is unavailable (the token service circuit breaker is open)"
        );
    }

    #[test]
    fn error_codes_map_to_classes() {
        assert!(matches!(
            err(400, r#"{"error":"invalid_grant"}"#),
            ExchangeError::SubjectRejected { .. }
        ));
        assert!(matches!(
            err(400, r#"{"error":"invalid_request"}"#),
            ExchangeError::SubjectRejected { .. }
        ));
        for code in [
            "invalid_target",
            "invalid_scope",
            "unauthorized_client",
            "access_denied",
        ] {
            assert!(matches!(
                err(400, &format!(r#"{{"error":"{code}"}}"#)),
                ExchangeError::Forbidden { .. }
            ));
        }
        assert!(matches!(
            err(401, r#"{"error":"invalid_client"}"#),
            ExchangeError::ClientRejected { .. }
        ));
        assert!(matches!(err(401, ""), ExchangeError::ClientRejected { .. }));
        assert!(matches!(err(500, ""), ExchangeError::Unavailable { .. }));
        assert!(matches!(err(429, ""), ExchangeError::Unavailable { .. }));
        assert!(matches!(err(400, "nope"), ExchangeError::BadResponse(_)));
        assert!(matches!(
            err(400, r#"{"error":"weird"}"#),
            ExchangeError::BadResponse(_)
        ));
        assert!(matches!(err(302, ""), ExchangeError::BadResponse(_)));
        // A known code with a status it does not go with is as unusable as an unknown one.
        assert!(matches!(
            err(403, r#"{"error":"invalid_client"}"#),
            ExchangeError::BadResponse(_)
        ));
        assert!(matches!(
            err(400, r#"{"error":"temporarily_unavailable"}"#),
            ExchangeError::Unavailable {
                cause: Unavailability::OAuthError(OAuthErrorCode::TemporarilyUnavailable),
                ..
            }
        ));
    }

    #[test]
    fn error_codes_keep_their_wire_spelling() {
        for code in [
            OAuthErrorCode::InvalidRequest,
            OAuthErrorCode::InvalidClient,
            OAuthErrorCode::InvalidGrant,
            OAuthErrorCode::UnauthorizedClient,
            OAuthErrorCode::UnsupportedGrantType,
            OAuthErrorCode::InvalidScope,
            OAuthErrorCode::InvalidTarget,
            OAuthErrorCode::AccessDenied,
            OAuthErrorCode::ServerError,
            OAuthErrorCode::TemporarilyUnavailable,
        ] {
            assert_eq!(OAuthErrorCode::parse(code.as_str()), Some(code));
        }
        // Codes are case-sensitive (RFC 6749 §5.2 spells them in lower case).
        assert_eq!(OAuthErrorCode::parse("INVALID_GRANT"), None);
        assert_eq!(
            err(401, "").to_string(),
            "the token service rejected the gateway's client credentials (HTTP 401, no error code)"
        );
        assert_eq!(
            err(400, r#"{"error":"invalid_grant"}"#).to_string(),
            "the token service rejected the subject token (invalid_grant)"
        );
    }

    #[test]
    fn only_refusals_of_the_subject_or_the_target_are_definitive() {
        for (body, definitive) in [
            (r#"{"error":"invalid_grant"}"#, true),
            (r#"{"error":"invalid_request"}"#, true),
            (r#"{"error":"invalid_target"}"#, true),
            (r#"{"error":"invalid_scope"}"#, false),
            (r#"{"error":"unauthorized_client"}"#, false),
            (r#"{"error":"access_denied"}"#, false),
            (r#"{"error":"invalid_client"}"#, false),
            (r#"{"error":"server_error"}"#, false),
        ] {
            assert_eq!(err(400, body).is_definitive(), definitive, "{body}");
        }
        assert!(!err(503, "").is_definitive());
        assert!(!ExchangeError::Timeout(Duration::from_secs(1)).is_definitive());
    }
}
