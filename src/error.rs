//! The one error type of the request path, and its single translation into a response.
//!
//! Every way a request can fail before reaching the upstream is a [`GatewayError`]. Its
//! [`status`](GatewayError::status), [`outcome`](GatewayError::outcome) and public body are
//! decided here and nowhere else (DESIGN.md steps 2 and 6). Public messages reveal nothing
//! internal: no STS error text, no endpoint, no token.

use std::time::Duration;

use crate::exchange::{DEFAULT_RETRY_AFTER, ExchangeError, Unavailability};
use crate::path::PathError;

/// The realm in every `WWW-Authenticate` challenge (RFC 6750 §3).
pub const REALM: &str = "txgate";

/// Why the gateway answered a request itself instead of forwarding it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches the request")]
    NoRoute,
    /// No `Authorization: Bearer` credential (RFC 6750 §3.1: no error code in the challenge).
    #[error("no bearer token")]
    MissingToken,
    /// More than one `Authorization` header.
    #[error("more than one Authorization header")]
    DuplicateCredential,
    /// A bearer credential that is not RFC 6750 §2.1 syntax.
    #[error("malformed bearer credential: {0}")]
    MalformedCredential(&'static str),
    #[error("bearer token longer than {0} bytes")]
    TokenTooLarge(usize),
    /// The request header block is larger than `server.max_request_header_bytes`.
    #[error("request headers larger than the configured limit")]
    HeadersTooLarge,
    /// The caller's token appears in the request URL (path, query or host) outside
    /// `access_token`.
    #[error("the bearer token appears in the request URL")]
    TokenInUrl,
    /// More `access_token` query parameters than a request may carry.
    #[error("too many access_token query parameters")]
    TooManyQueryTokens,
    /// A path the gateway will not route: an encoded slash, a climb above the root...
    #[error("refused path: {0}")]
    InvalidPath(PathError),
    /// Several `Host` headers, or a `Host` that differs from the URI's authority.
    #[error("ambiguous or unreadable host")]
    InvalidHost,
    /// An ext_authz Check for a path that normalisation would change: the proxy in front
    /// forwards the path as it is, so the route decided on the normalised one could differ from
    /// what the upstream serves.
    #[error("the path is not in normal form")]
    PathNotNormalized,
    /// The caller's token failed local validation (signature, expiry, issuer, audience...).
    #[error("the bearer token failed local validation: {0}")]
    InvalidToken(String),
    /// Local validation cannot decide now (no JWKS yet, introspection endpoint down).
    #[error("the token validator is unavailable: {0}")]
    ValidatorUnavailable(String),
    /// Too many introspection calls in flight: refused without calling the issuer.
    #[error("too many token validation calls in flight")]
    ValidatorOverloaded,
    /// An internal route (`inbound.txn_token`) was sent no `Txn-Token`, or several.
    #[error("no single Txn-Token header")]
    TxnTokenRequired,
    /// The `Txn-Token` failed validation (signature, `typ`, trust domain, expiry...).
    #[error("the Txn-Token failed validation: {0}")]
    InvalidTxnToken(String),
    /// `require_may_act`: the subject's `may_act` does not name the actor (RFC 8693 §4.4).
    #[error("the subject token's may_act does not name the actor")]
    MayActDenied,
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
}

impl From<crate::inbound::InboundError> for GatewayError {
    fn from(e: crate::inbound::InboundError) -> GatewayError {
        match e {
            crate::inbound::InboundError::Invalid(why) => GatewayError::InvalidToken(why),
            crate::inbound::InboundError::Unavailable(why) => {
                GatewayError::ValidatorUnavailable(why)
            }
            crate::inbound::InboundError::Overloaded => GatewayError::ValidatorOverloaded,
        }
    }
}

impl GatewayError {
    /// The HTTP status the caller gets.
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::NoRoute => 404,
            GatewayError::HeadersTooLarge => 431,
            GatewayError::MissingToken
            | GatewayError::TokenTooLarge(_)
            | GatewayError::InvalidToken(_)
            | GatewayError::TxnTokenRequired
            | GatewayError::InvalidTxnToken(_) => 401,
            GatewayError::MayActDenied => 403,
            GatewayError::ValidatorUnavailable(_) | GatewayError::ValidatorOverloaded => 503,
            GatewayError::DuplicateCredential
            | GatewayError::MalformedCredential(_)
            | GatewayError::TokenInUrl
            | GatewayError::TooManyQueryTokens
            | GatewayError::InvalidPath(_)
            | GatewayError::InvalidHost
            | GatewayError::PathNotNormalized => 400,
            GatewayError::Exchange(e) => match e {
                ExchangeError::SubjectRejected { .. } | ExchangeError::StepUp(_) => 401,
                ExchangeError::Forbidden { .. } => 403,
                ExchangeError::ClientRejected { .. }
                | ExchangeError::SigningFailed(_)
                | ExchangeError::BadResponse(_)
                | ExchangeError::EchoedInputToken
                | ExchangeError::UnexpectedTokenType { .. } => 502,
                ExchangeError::Unavailable { .. } => 503,
                ExchangeError::Timeout(_) => 504,
            },
        }
    }

    /// A short, bounded label for metrics and access logs.
    pub fn outcome(&self) -> &'static str {
        match self {
            GatewayError::NoRoute => "no_route",
            GatewayError::HeadersTooLarge => "headers_too_large",
            GatewayError::MissingToken => "missing_token",
            GatewayError::DuplicateCredential => "duplicate_credential",
            GatewayError::MalformedCredential(_) => "malformed_credential",
            GatewayError::TokenTooLarge(_) => "token_too_large",
            GatewayError::TokenInUrl => "token_in_url",
            GatewayError::TooManyQueryTokens => "too_many_query_tokens",
            GatewayError::InvalidPath(_) => "invalid_path",
            GatewayError::InvalidHost => "invalid_host",
            GatewayError::PathNotNormalized => "path_not_normalized",
            GatewayError::InvalidToken(_) => "invalid_token",
            GatewayError::TxnTokenRequired => "missing_txn_token",
            GatewayError::InvalidTxnToken(_) => "invalid_txn_token",
            GatewayError::ValidatorUnavailable(_) => "validator_unavailable",
            GatewayError::ValidatorOverloaded => "validator_overloaded",
            GatewayError::MayActDenied => "may_act_denied",
            GatewayError::Exchange(e) => e.outcome(),
        }
    }

    /// The OAuth error code of the body and of the `WWW-Authenticate` challenge.
    pub fn code(&self) -> &'static str {
        match self.status() {
            400 => "invalid_request",
            401 if matches!(self, GatewayError::MissingToken) => "unauthorized",
            401 if matches!(self, GatewayError::Exchange(ExchangeError::StepUp(_))) => {
                "insufficient_user_authentication"
            }
            401 => "invalid_token",
            403 => "insufficient_scope",
            404 => "not_found",
            431 => "request_header_fields_too_large",
            503 => "temporarily_unavailable",
            504 => "gateway_timeout",
            _ => "bad_gateway",
        }
    }

    /// The public description: what the caller can act on, nothing internal.
    pub fn description(&self) -> &'static str {
        match self {
            GatewayError::NoRoute => "no route matches this request",
            GatewayError::HeadersTooLarge => "the request headers are too large",
            GatewayError::MissingToken => "a bearer token is required",
            GatewayError::DuplicateCredential => "send exactly one Authorization header",
            GatewayError::MalformedCredential(why) => why,
            GatewayError::TokenTooLarge(_) => "the bearer token is too large",
            GatewayError::TokenInUrl => "bearer tokens must not be sent in the URL",
            GatewayError::TooManyQueryTokens => "bearer tokens must not be sent in the URL",
            GatewayError::InvalidPath(PathError::EscapedSlash) => {
                "encoded slashes and backslashes are not accepted in the path"
            }
            GatewayError::InvalidPath(PathError::AboveRoot) => "the path climbs above the root",
            GatewayError::InvalidPath(PathError::BadEscape) => {
                "the path has a malformed percent-encoding"
            }
            GatewayError::InvalidPath(PathError::NotOriginForm) => {
                "the request target must be an absolute path"
            }
            GatewayError::InvalidHost => "the request names more than one host",
            GatewayError::PathNotNormalized => {
                "the path has dot segments, repeated slashes or escapes the gateway would normalise"
            }
            GatewayError::InvalidToken(_) => "the bearer token was rejected",
            GatewayError::TxnTokenRequired | GatewayError::InvalidTxnToken(_) => {
                "a valid Txn-Token is required"
            }
            GatewayError::ValidatorUnavailable(_) | GatewayError::ValidatorOverloaded => {
                "the token cannot be validated right now; retry later"
            }
            GatewayError::MayActDenied => "the gateway may not act for this token",
            GatewayError::Exchange(e) => match e {
                ExchangeError::SubjectRejected { .. } => "the bearer token was rejected",
                ExchangeError::StepUp(_) => {
                    "a stronger or more recent user authentication is required"
                }
                ExchangeError::Forbidden { .. } => {
                    "the bearer token does not grant access to this resource"
                }
                ExchangeError::ClientRejected { .. }
                | ExchangeError::SigningFailed(_)
                | ExchangeError::BadResponse(_)
                | ExchangeError::EchoedInputToken
                | ExchangeError::UnexpectedTokenType { .. } => "the token exchange failed",
                ExchangeError::Unavailable { .. } => {
                    "the token service is unavailable; retry later"
                }
                ExchangeError::Timeout(_) => "the token service did not answer in time",
            },
        }
    }

    /// RFC 6750 §3 challenge for 400/401/403; `None` for other statuses.
    pub fn www_authenticate(&self) -> Option<String> {
        if let GatewayError::Exchange(ExchangeError::StepUp(step_up)) = self {
            return Some(step_up_challenge(step_up, self.description()));
        }
        match self.status() {
            401 if matches!(self, GatewayError::MissingToken) => {
                Some(format!("Bearer realm=\"{REALM}\""))
            }
            400 | 401 | 403 => Some(format!(
                "Bearer realm=\"{REALM}\", error=\"{}\", error_description=\"{}\"",
                self.code(),
                self.description()
            )),
            _ => None,
        }
    }

    /// `Retry-After` for 503 answers.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::Exchange(ExchangeError::Unavailable { retry_after, .. }) => {
                Some(retry_after.unwrap_or(DEFAULT_RETRY_AFTER))
            }
            GatewayError::ValidatorUnavailable(_) => Some(DEFAULT_RETRY_AFTER),
            // A burst, not an outage: the slots free up as soon as answers arrive.
            GatewayError::ValidatorOverloaded => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The JSON body: `{"error": ..., "error_description": ...}`.
    pub fn body(&self) -> String {
        let mut body = serde_json::json!({
            "error": self.code(),
            "error_description": self.description(),
        });
        // A step-up answer tells the client what to ask the user for (RFC 9470 §3).
        if let GatewayError::Exchange(ExchangeError::StepUp(step_up)) = self {
            if let Some(acr) = &step_up.acr_values {
                body["acr_values"] = acr.as_str().into();
            }
            if let Some(max_age) = step_up.max_age {
                body["max_age"] = max_age.into();
            }
            if let Some(claims) = &step_up.claims {
                body["claims"] = claims.as_str().into();
            }
        }
        body.to_string()
    }

    /// Logs the error at the level its cause deserves: our own credentials being rejected is an
    /// operator problem (`error!`), an STS outage a warning, a bad caller token only `debug!`.
    pub fn log(&self, route: &str) {
        let outcome = self.outcome();
        match self {
            GatewayError::Exchange(ExchangeError::ClientRejected { .. }) => {
                tracing::error!(route, outcome, error = %self, "token service rejected the gateway's credentials; check client_id and secret");
            }
            GatewayError::Exchange(ExchangeError::SigningFailed(_)) => {
                tracing::error!(route, outcome, error = %self, "cannot sign the client assertion; check the token service's signing key");
            }
            GatewayError::ValidatorUnavailable(_) => {
                tracing::warn!(route, outcome, error = %self, "token validation unavailable")
            }
            // Refusals by the open breaker or a concurrency cap are counted; one warning per
            // request would flood the log during an outage.
            GatewayError::ValidatorOverloaded => {
                tracing::debug!(route, outcome, error = %self, "token validation refused")
            }
            GatewayError::Exchange(ExchangeError::Unavailable {
                cause: Unavailability::CircuitOpen | Unavailability::Overloaded,
                ..
            }) => tracing::debug!(route, outcome, error = %self, "token exchange refused"),
            GatewayError::Exchange(
                ExchangeError::BadResponse(_)
                | ExchangeError::Unavailable { .. }
                | ExchangeError::Timeout(_),
            ) => tracing::warn!(route, outcome, error = %self, "token exchange failed"),
            // Already logged at error, with the token service, by `exchange::exchange`.
            GatewayError::Exchange(
                ExchangeError::EchoedInputToken | ExchangeError::UnexpectedTokenType { .. },
            ) => tracing::debug!(route, outcome, error = %self, "token exchange refused"),
            _ => tracing::debug!(route, outcome, error = %self, "request rejected"),
        }
    }
}

/// Why forwarding failed after admission: connecting to the upstream or talking with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyFailure {
    /// The upstream could not be reached or broke the exchange (502).
    UpstreamUnavailable,
    /// The upstream did not connect or answer in time (504).
    UpstreamTimeout,
    /// The client sent something the proxy could not read (400).
    BadRequest,
    /// The client went away: nobody to answer.
    ClientGone,
    /// A failure inside the gateway (500).
    Internal,
    /// A status the proxy engine decided itself (passed on as it is).
    Status(u16),
}

impl ProxyFailure {
    /// The status the caller gets; `None` when no answer can be sent.
    pub fn status(self) -> Option<u16> {
        match self {
            ProxyFailure::UpstreamUnavailable => Some(502),
            ProxyFailure::UpstreamTimeout => Some(504),
            ProxyFailure::BadRequest => Some(400),
            ProxyFailure::ClientGone => None,
            ProxyFailure::Internal => Some(500),
            ProxyFailure::Status(status) => Some(status),
        }
    }

    /// The JSON body: `{"error": ..., "error_description": ...}`.
    pub fn body(self) -> String {
        let code = match self.status() {
            Some(502) => "bad_gateway",
            Some(504) => "gateway_timeout",
            Some(400..=499) => "invalid_request",
            _ => "internal_error",
        };
        serde_json::json!({"error": code, "error_description": self.description()}).to_string()
    }

    /// The public description of the failure.
    pub fn description(self) -> &'static str {
        match self.status() {
            Some(502) => "the upstream is unavailable",
            Some(504) => "the upstream did not answer in time",
            Some(400..=499) => "the request could not be read",
            _ => "the gateway failed to proxy the request",
        }
    }
}

/// The RFC 9470 §3 challenge of a step-up answer: `insufficient_user_authentication` with what
/// the STS asked for. Values are quoted-strings (RFC 9110 §5.6.4); the STS's values were
/// checked to be printable ASCII, and quotes and backslashes are escaped here.
fn step_up_challenge(step_up: &crate::exchange::StepUp, description: &str) -> String {
    let quoted = |v: &str| {
        let mut out = String::with_capacity(v.len() + 2);
        out.push('"');
        for c in v.chars() {
            if matches!(c, '"' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    };
    let mut challenge = format!(
        "Bearer realm=\"{REALM}\", error=\"insufficient_user_authentication\", error_description=\"{description}\""
    );
    if let Some(acr) = &step_up.acr_values {
        challenge.push_str(", acr_values=");
        challenge.push_str(&quoted(acr));
    }
    if let Some(max_age) = step_up.max_age {
        challenge.push_str(&format!(", max_age=\"{max_age}\""));
    }
    if let Some(claims) = &step_up.claims {
        challenge.push_str(", claims=");
        challenge.push_str(&quoted(claims));
    }
    challenge
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::OAuthErrorCode;

    #[test]
    fn status_table_matches_the_design() {
        let ex = |e| GatewayError::Exchange(e);
        let cases = [
            (GatewayError::NoRoute, 404),
            (GatewayError::MissingToken, 401),
            (GatewayError::DuplicateCredential, 400),
            (GatewayError::TokenTooLarge(10), 401),
            (GatewayError::ValidatorUnavailable("down".into()), 503),
            (GatewayError::ValidatorOverloaded, 503),
            (
                ex(ExchangeError::SubjectRejected {
                    code: OAuthErrorCode::InvalidGrant,
                }),
                401,
            ),
            (
                ex(ExchangeError::Forbidden {
                    code: OAuthErrorCode::InvalidTarget,
                }),
                403,
            ),
            (
                ex(ExchangeError::ClientRejected {
                    status: 401,
                    code: Some(OAuthErrorCode::InvalidClient),
                }),
                502,
            ),
            (
                ex(ExchangeError::Unavailable {
                    cause: Unavailability::Status(500),
                    retry_after: None,
                }),
                503,
            ),
            (ex(ExchangeError::Timeout(Duration::from_secs(1))), 504),
            (ex(ExchangeError::BadResponse("x".into())), 502),
            (ex(ExchangeError::EchoedInputToken), 502),
            (
                ex(ExchangeError::UnexpectedTokenType {
                    requested: "urn:ietf:params:oauth:token-type:jwt".into(),
                    issued: "urn:ietf:params:oauth:token-type:refresh_token".into(),
                }),
                502,
            ),
        ];
        for (error, status) in cases {
            assert_eq!(error.status(), status, "{error:?}");
        }
    }

    #[test]
    fn our_own_setup_failures_are_bad_gateway_counted_with_rejected_credentials() {
        let unsigned = crate::assertion::SigningError::from(jsonwebtoken::errors::Error::from(
            jsonwebtoken::errors::ErrorKind::InvalidKeyFormat,
        ));
        let error = GatewayError::Exchange(ExchangeError::SigningFailed(unsigned));
        assert_eq!(error.status(), 502, "{error:?}");
        assert_eq!(error.outcome(), "client_rejected", "{error:?}");
        assert_eq!(
            error.body(),
            r#"{"error":"bad_gateway","error_description":"the token exchange failed"}"#
        );
    }

    #[test]
    fn refused_sts_answers_are_bad_gateway_with_their_own_outcomes() {
        let echoed = GatewayError::Exchange(ExchangeError::EchoedInputToken);
        assert_eq!(echoed.outcome(), "echoed_input_token");
        assert_eq!(
            echoed.body(),
            r#"{"error":"bad_gateway","error_description":"the token exchange failed"}"#
        );
        let mistyped = GatewayError::Exchange(ExchangeError::UnexpectedTokenType {
            requested: "urn:ietf:params:oauth:token-type:jwt".into(),
            issued: "urn:x-internal".into(),
        });
        assert_eq!(mistyped.outcome(), "unexpected_token_type");
        assert!(!mistyped.body().contains("urn:x-internal"));
        assert!(mistyped.www_authenticate().is_none());
    }

    #[test]
    fn challenges_follow_rfc_6750() {
        assert_eq!(
            GatewayError::MissingToken.www_authenticate().unwrap(),
            "Bearer realm=\"txgate\""
        );
        let rejected = GatewayError::Exchange(ExchangeError::SubjectRejected {
            code: OAuthErrorCode::InvalidGrant,
        });
        assert!(
            rejected
                .www_authenticate()
                .unwrap()
                .starts_with("Bearer realm=\"txgate\", error=\"invalid_token\"")
        );
        assert!(GatewayError::NoRoute.www_authenticate().is_none());
    }

    #[test]
    fn bodies_reveal_no_internal_detail() {
        let e = GatewayError::Exchange(ExchangeError::BadResponse(
            "HTTP 400 with unknown error code \"secret-internal\"".into(),
        ));
        assert!(!e.body().contains("secret-internal"));
        assert_eq!(
            e.body(),
            r#"{"error":"bad_gateway","error_description":"the token exchange failed"}"#
        );
    }
}
