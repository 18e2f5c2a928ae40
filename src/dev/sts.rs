//! A development Security Token Service that speaks real OAuth 2.0 Token Exchange (RFC 8693).
//!
//! `txgate demo`, `txgate dev-sts` and the test suites need an STS to exchange tokens against
//! without standing up an identity provider. This one is embedded in the binary, keeps
//! everything in memory and generates a fresh ES256 (P-256) signing key every time it starts, so
//! tokens never survive a restart.
//!
//! Endpoints (all relative to the configured issuer):
//!
//! - `GET /.well-known/openid-configuration` (also served at
//!   `/.well-known/oauth-authorization-server`): discovery metadata.
//! - `GET /jwks`: the public signing key.
//! - `POST /token`: `urn:ietf:params:oauth:grant-type:token-exchange`,
//!   `urn:ietf:params:oauth:grant-type:jwt-bearer` and `client_credentials` grants, with client
//!   authentication by HTTP Basic or body parameters (RFC 6749 §2.3.1).
//! - `POST /introspect`: RFC 7662 introspection of tokens this STS signed, client-authenticated.
//! - `GET|POST /dev/user-token`: **development only and unauthenticated** — anyone who can reach
//!   it can mint a user token for any subject. It exists so the demo can obtain a caller token
//!   with a single `curl`. Never expose a dev STS beyond localhost or a test network.
//!
//! What `/token` issues:
//!
//! - **Token exchange** (RFC 8693) by `requested_token_type`:
//!   - `…:access_token` (the default): a JWT access token, `token_type` `Bearer`, `aud` = the
//!     `audience` values, else the `resource` values, else the client; `act` with an actor token.
//!   - `…:jwt`: the same claims (a JWT authorization grant for another domain's AS when
//!     `audience` names that AS, for identity chaining), `token_type` `N_A`.
//!   - `…:id-jag`: an Identity Assertion JWT Authorization Grant
//!     (draft-ietf-oauth-identity-assertion-authz-grant), JOSE `typ` `oauth-id-jag+jwt`, living
//!     at most 300 s. Exactly one `audience` (the resource's AS) is required; optional single
//!     `resource` and `scope` are copied into it; `client_id` is the requesting client.
//!   - `…:txn_token`: a Transaction Token (draft-ietf-oauth-transaction-tokens), JOSE `typ`
//!     `txntoken+jwt`, living at most 60 s. Exactly one `audience` (the trust domain) and a
//!     `scope` (the purpose, copied to `scope` and `purp`) are required; `request_context`, the
//!     unpadded base64url of a JSON object, becomes `rctx` with `req_wl` = the requesting client.
//!     Every Transaction Token has a fresh random `txn`.
//! - **JWT bearer** (RFC 7523 §2.1): the `assertion` must be signed by this STS (its only trusted
//!   issuer), unexpired, with `sub` and an `aud` naming this issuer, its token endpoint or
//!   [`AUTHORIZATION_SERVER_NAME`] (so a configuration need not know the port it runs on). An
//!   ID-JAG (JOSE `typ` `oauth-id-jag+jwt`) must carry the requesting client's `client_id`; the
//!   access token's `aud` is its `resource` claim, else the `audience` values, else the
//!   `resource` values, else the client, and its scope the ID-JAG's (a `scope` parameter must be
//!   a subset, and does not narrow it). Any other JWT gets `aud` from `audience`, else
//!   `resource`, else the client, and the `scope` parameter. `requested_token_use` is accepted
//!   and ignored.
//! - **Step-up** (RFC 9470): a subject listed in [`DevStsOptions::step_up_subjects`] gets
//!   `400 {"error":"insufficient_user_authentication","error_description":…,"acr_values":
//!   "urn:txgate:dev:mfa","max_age":300}` from token exchange and JWT bearer alike, once its
//!   token has verified.
//!
//! Issued tokens are logged by subject, audience, client and grant, and counted per grant
//! ([`DevSts::tokens_issued_by`]); the tokens themselves and client secrets never reach the logs.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// A name the development STS answers to as an assertion's audience besides its issuer and
/// token endpoint: `gateway.yaml`'s chain route asks for grants for it, whatever port the STS
/// was given.
pub const AUTHORIZATION_SERVER_NAME: &str = "urn:txgate:dev-sts";

/// The subject `txgate demo`'s development STS asks to authenticate again (RFC 9470).
pub const DEMO_STEP_UP_SUBJECT: &str = "needs-mfa";

/// Lifetime of tokens issued at `/token` when nothing else is configured: 300 seconds.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);

/// Lifetime of tokens minted at `/dev/user-token` when nothing else is configured: 3600 seconds.
pub const DEFAULT_USER_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// The longest an ID-JAG lives, whatever `token_ttl` says: 300 seconds
/// (draft-ietf-oauth-identity-assertion-authz-grant: short-lived, single use).
pub const MAX_ID_JAG_TTL: Duration = Duration::from_secs(300);

/// The longest a Transaction Token lives, whatever `token_ttl` says: 60 seconds
/// (draft-ietf-oauth-transaction-tokens: the lifetime of one call chain).
pub const MAX_TXN_TOKEN_TTL: Duration = Duration::from_secs(60);

/// The `acr_values` a step-up answer asks for.
pub const STEP_UP_ACR: &str = "urn:txgate:dev:mfa";

/// The `max_age` (seconds) a step-up answer asks for.
pub const STEP_UP_MAX_AGE: u64 = 300;

const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const CLIENT_CREDENTIALS_GRANT: &str = "client_credentials";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
const ID_JAG_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id-jag";
const TXN_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:txn_token";
/// JOSE `typ` of an ID-JAG.
const ID_JAG_TYP: &str = "oauth-id-jag+jwt";
/// JOSE `typ` of a Transaction Token.
const TXN_TOKEN_TYP: &str = "txntoken+jwt";
/// `token_type` of an issued token that is not an access token (RFC 8693 §2.2.1).
const NOT_APPLICABLE: &str = "N_A";
const DEFAULT_USER_AUDIENCE: &str = "txgate-demo";
const BASIC_CHALLENGE: &str = "Basic realm=\"txgate-dev-sts\"";
const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded";
/// Token requests are a handful of short parameters plus at most two JWTs; anything bigger is
/// not a token request.
const MAX_FORM_BYTES: usize = 64 * 1024;
const MAX_SUBJECT_CHARS: usize = 256;

/// A confidential client allowed to call `/token` and `/introspect`.
#[derive(Debug, Clone)]
pub struct DevClient {
    /// The `client_id` the client authenticates with.
    pub client_id: String,
    /// Its secret; must not be empty.
    pub client_secret: Secret,
}

/// Settings for [`DevSts::new`].
#[derive(Debug, Clone)]
pub struct DevStsOptions {
    /// The `iss` of every token and the base of the discovery URLs, e.g.
    /// `http://127.0.0.1:9400`. Must be an absolute `http` or `https` URL without query or
    /// fragment.
    pub issuer: String,
    /// Clients allowed at `/token` and `/introspect`. With none, every token request fails
    /// client authentication.
    pub clients: Vec<DevClient>,
    /// Lifetime of tokens issued at `/token`; [`DEFAULT_TOKEN_TTL`] by default. At least 1 s.
    pub token_ttl: Duration,
    /// Lifetime of tokens minted at `/dev/user-token`; [`DEFAULT_USER_TOKEN_TTL`] by default.
    /// At least 1 s.
    pub user_token_ttl: Duration,
    /// Subjects that must step up (RFC 9470): token exchange and JWT bearer answer them
    /// `insufficient_user_authentication` instead of a token. Empty by default.
    pub step_up_subjects: Vec<String>,
}

impl DevStsOptions {
    /// Options for `issuer` with the given clients and the default token lifetimes.
    pub fn new(issuer: impl Into<String>, clients: Vec<DevClient>) -> Self {
        DevStsOptions {
            issuer: issuer.into(),
            clients,
            token_ttl: DEFAULT_TOKEN_TTL,
            user_token_ttl: DEFAULT_USER_TOKEN_TTL,
            step_up_subjects: Vec::new(),
        }
    }
}

/// The grants `/token` issues tokens for, to count them apart ([`DevSts::tokens_issued_by`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevGrant {
    /// RFC 6749 §4.4.
    ClientCredentials,
    /// RFC 8693, whatever the requested token type.
    TokenExchange,
    /// RFC 7523 §2.1.
    JwtBearer,
}

impl DevGrant {
    const ALL: [DevGrant; 3] = [
        DevGrant::ClientCredentials,
        DevGrant::TokenExchange,
        DevGrant::JwtBearer,
    ];

    /// The `grant_type` value, as logged.
    pub fn as_str(self) -> &'static str {
        match self {
            DevGrant::ClientCredentials => CLIENT_CREDENTIALS_GRANT,
            DevGrant::TokenExchange => TOKEN_EXCHANGE_GRANT,
            DevGrant::JwtBearer => JWT_BEARER_GRANT,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why the dev STS could not start or could not mint a token.
#[derive(Debug, thiserror::Error)]
pub enum DevStsError {
    /// The issuer is not an absolute http(s) URL without query or fragment.
    #[error("invalid dev STS issuer {issuer:?}: {reason}")]
    InvalidIssuer {
        /// The configured issuer.
        issuer: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A client has an empty id or secret, or an id appears twice.
    #[error("invalid dev STS client configuration: {0}")]
    InvalidClient(String),
    /// A token lifetime is shorter than one second.
    #[error("dev STS token lifetimes must be at least one second")]
    InvalidTtl,
    /// The platform could not generate or export the signing key.
    #[error("generating the dev STS signing key failed")]
    KeyGeneration,
    /// A user-token subject is empty or longer than 256 characters.
    #[error("the subject must be 1 to {MAX_SUBJECT_CHARS} characters long")]
    InvalidSubject,
    /// A scope value does not follow the RFC 6749 §3.3 syntax.
    #[error("the scope is not a space-separated list of RFC 6749 scope tokens")]
    InvalidScope,
    /// Signing a token failed.
    #[error("signing a token failed: {0}")]
    Signing(#[from] jsonwebtoken::errors::Error),
}

/// The running STS: its signing key, settings and counters. Create it with [`DevSts::new`] and
/// serve it with [`DevSts::serve`] or mount [`DevSts::router`].
pub struct DevSts {
    options: DevStsOptions,
    /// SHA-256 of each client's secret, so that comparisons take the same time whatever the
    /// length or content of the presented secret.
    client_digests: HashMap<String, [u8; 32]>,
    encoding_key: EncodingKey,
    decoding_key: DecodingKey,
    kid: String,
    jwk_x: String,
    jwk_y: String,
    /// Tokens issued at `/token`, indexed by [`DevGrant::index`].
    tokens_issued: [AtomicU64; DevGrant::ALL.len()],
}

impl std::fmt::Debug for DevSts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevSts")
            .field("issuer", &self.options.issuer)
            .field("kid", &self.kid)
            .field("clients", &self.client_digests.len())
            .field("tokens_issued", &self.tokens_issued())
            .finish_non_exhaustive()
    }
}

impl DevSts {
    /// Checks `options` and generates a fresh ES256 (P-256) key pair. Called once at start by
    /// `txgate demo`, `txgate dev-sts` and tests.
    pub fn new(options: DevStsOptions) -> Result<Arc<DevSts>, DevStsError> {
        validate_issuer(&options.issuer)?;
        if options.token_ttl.as_secs() == 0 || options.user_token_ttl.as_secs() == 0 {
            return Err(DevStsError::InvalidTtl);
        }
        let mut client_digests = HashMap::with_capacity(options.clients.len());
        for client in &options.clients {
            if client.client_id.is_empty() {
                return Err(DevStsError::InvalidClient("empty client_id".into()));
            }
            if client.client_secret.is_empty() {
                return Err(DevStsError::InvalidClient(format!(
                    "client {:?} has an empty secret",
                    client.client_id
                )));
            }
            let digest = sha256(client.client_secret.expose().as_bytes());
            if client_digests
                .insert(client.client_id.clone(), digest)
                .is_some()
            {
                return Err(DevStsError::InvalidClient(format!(
                    "client {:?} is configured twice",
                    client.client_id
                )));
            }
        }

        let key_pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| DevStsError::KeyGeneration)?;
        let pkcs8 = key_pair
            .to_pkcs8v1()
            .map_err(|_| DevStsError::KeyGeneration)?;
        let public = key_pair.public_key().as_ref();
        // An uncompressed P-256 point is 0x04 || x (32 bytes) || y (32 bytes).
        let (x, y) = match public {
            [0x04, coordinates @ ..] if coordinates.len() == 64 => coordinates.split_at(32),
            _ => return Err(DevStsError::KeyGeneration),
        };
        let jwk_x = URL_SAFE_NO_PAD.encode(x);
        let jwk_y = URL_SAFE_NO_PAD.encode(y);
        let mut kid = hex::encode(sha256(public));
        kid.truncate(16);
        let decoding_key = DecodingKey::from_ec_components(&jwk_x, &jwk_y)
            .map_err(|_| DevStsError::KeyGeneration)?;

        Ok(Arc::new(DevSts {
            encoding_key: EncodingKey::from_ec_der(pkcs8.as_ref()),
            decoding_key,
            kid,
            jwk_x,
            jwk_y,
            client_digests,
            options,
            tokens_issued: Default::default(),
        }))
    }

    /// The issuer (`iss` of every token), exactly as configured.
    pub fn issuer(&self) -> &str {
        &self.options.issuer
    }

    /// The token endpoint URL (`<issuer>/token`), for wiring the gateway to this STS.
    pub fn token_endpoint(&self) -> String {
        format!("{}/token", self.base_url())
    }

    /// Signs a user (subject) token exactly as `/dev/user-token` does: `sub` must be 1 to 256
    /// characters, `audience` defaults to `txgate-demo`, `scope` is included only when given.
    /// The token lives for `user_token_ttl`. Used by tests and the demo.
    pub fn issue_user_token(
        &self,
        sub: &str,
        audience: Option<&str>,
        scope: Option<&str>,
    ) -> Result<String, DevStsError> {
        let length = sub.chars().count();
        if length == 0 || length > MAX_SUBJECT_CHARS {
            return Err(DevStsError::InvalidSubject);
        }
        if scope.is_some_and(|scope| !is_valid_scope(scope)) {
            return Err(DevStsError::InvalidScope);
        }
        let audience = audience
            .filter(|audience| !audience.is_empty())
            .unwrap_or(DEFAULT_USER_AUDIENCE);
        let mut claims = self.base_claims(self.options.user_token_ttl);
        claims.insert("sub".into(), sub.into());
        claims.insert("aud".into(), audience.into());
        if let Some(scope) = scope {
            claims.insert("scope".into(), scope.into());
        }
        let token = self.sign(&claims)?;
        tracing::info!(
            sub,
            aud = audience,
            client = "-",
            grant = "dev-user-token",
            "dev STS issued a user token"
        );
        Ok(token)
    }

    /// Number of `/token` requests that issued a token, across all grants. Starts at 0.
    pub fn tokens_issued(&self) -> u64 {
        DevGrant::ALL
            .iter()
            .map(|grant| self.tokens_issued_by(*grant))
            .sum()
    }

    /// Number of `/token` requests of `grant` that issued a token. Starts at 0.
    pub fn tokens_issued_by(&self, grant: DevGrant) -> u64 {
        self.tokens_issued[grant.index()].load(Ordering::Relaxed)
    }

    /// The HTTP routes of the STS, with this instance as state. Mount it or hand it to
    /// [`DevSts::serve`].
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/.well-known/oauth-authorization-server", get(discovery))
            .route("/jwks", get(jwks))
            .route("/token", post(token_endpoint))
            .route("/introspect", post(introspection_endpoint))
            .route(
                "/dev/user-token",
                get(user_token_from_query).post(user_token_from_form),
            )
            .with_state(Arc::clone(self))
    }

    /// Serves [`DevSts::router`] on an already-bound listener until `shutdown` resolves, then
    /// lets in-flight requests finish.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let address = listener.local_addr()?;
        tracing::info!(%address, issuer = %self.options.issuer, "dev STS listening");
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// The issuer without a trailing slash, so endpoint URLs never contain `//`.
    fn base_url(&self) -> &str {
        self.options.issuer.trim_end_matches('/')
    }

    /// `iss`, `iat`, `exp` and `jti` for a token living `ttl`.
    fn base_claims(&self, ttl: Duration) -> Map<String, Value> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut claims = Map::new();
        claims.insert("iss".into(), self.options.issuer.clone().into());
        claims.insert("iat".into(), now.into());
        claims.insert("exp".into(), now.saturating_add(ttl.as_secs()).into());
        claims.insert(
            "jti".into(),
            format!("{:032x}", rand::random::<u128>()).into(),
        );
        claims
    }

    fn sign(&self, claims: &Map<String, Value>) -> Result<String, jsonwebtoken::errors::Error> {
        self.sign_typed(claims, None)
    }

    /// Signs `claims` with JOSE header `typ` set to `typ` when given (ID-JAGs and Transaction
    /// Tokens are told apart from access tokens by it), else `JWT`.
    fn sign_typed(
        &self,
        claims: &Map<String, Value>,
        typ: Option<&str>,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        if let Some(typ) = typ {
            header.typ = Some(typ.to_owned());
        }
        jsonwebtoken::encode(&header, claims, &self.encoding_key)
    }

    /// The claims of `token` if this STS signed it, it has not expired and its `iss` is ours.
    /// The audience is deliberately not checked: subject and actor tokens are addressed to
    /// whoever presented them, not to the STS.
    fn verify(&self, token: &str) -> Option<Map<String, Value>> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[self.options.issuer.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss"]);
        validation.validate_aud = false;
        // Every token checked here was signed by this process's clock.
        validation.leeway = 0;
        jsonwebtoken::decode::<Map<String, Value>>(token, &self.decoding_key, &validation)
            .ok()
            .map(|data| data.claims)
    }

    /// Like [`DevSts::verify`], for a subject or actor token: an ID-JAG or a Transaction Token
    /// is a grant or a call-chain context, not a token to exchange, so it is refused.
    fn verify_exchangeable(&self, token: &str) -> Option<Map<String, Value>> {
        let typ = jsonwebtoken::decode_header(token).ok()?.typ;
        if typ
            .as_deref()
            .is_some_and(|typ| media_type_is(typ, ID_JAG_TYP) || media_type_is(typ, TXN_TOKEN_TYP))
        {
            return None;
        }
        self.verify(token)
    }

    /// RFC 7523 §3: the JWT-bearer `assertion` must be signed by a trusted issuer (for the dev
    /// STS only itself), unexpired, have a `sub`, and an `aud` naming this STS: its issuer or
    /// its token endpoint URL.
    fn verify_assertion(&self, assertion: &str) -> Result<Assertion, OAuthError> {
        let header = jsonwebtoken::decode_header(assertion)
            .map_err(|_| OAuthError::invalid_grant("assertion is not a JWT"))?;
        let token_endpoint = self.token_endpoint();
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[self.options.issuer.as_str()]);
        validation.set_audience(&[
            self.options.issuer.as_str(),
            self.base_url(),
            token_endpoint.as_str(),
            AUTHORIZATION_SERVER_NAME,
        ]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 0;
        let claims =
            jsonwebtoken::decode::<Map<String, Value>>(assertion, &self.decoding_key, &validation)
                .map_err(|error| {
                    use jsonwebtoken::errors::ErrorKind;
                    let reason = match error.kind() {
                        ErrorKind::ExpiredSignature => "it has expired",
                        ErrorKind::InvalidAudience => "its aud does not name this STS",
                        ErrorKind::InvalidIssuer => "its issuer is not trusted",
                        ErrorKind::MissingRequiredClaim(_) => "it lacks exp, iss, aud or sub",
                        ErrorKind::InvalidSignature => "its signature does not verify",
                        _ => "it is not a JWT signed by a trusted issuer",
                    };
                    OAuthError::invalid_grant(format!("assertion rejected: {reason}"))
                })?
                .claims;
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|sub| !sub.is_empty())
            .ok_or_else(|| OAuthError::invalid_grant("assertion rejected: it has no sub"))?
            .to_owned();
        let is_id_jag = header
            .typ
            .as_deref()
            .is_some_and(|typ| media_type_is(typ, ID_JAG_TYP));
        Ok(Assertion {
            sub,
            is_id_jag,
            claims,
        })
    }

    /// RFC 9470 §3: a configured subject is told to authenticate more strongly.
    fn check_step_up(&self, sub: &str, grant: DevGrant) -> Result<(), OAuthError> {
        if self.options.step_up_subjects.iter().any(|s| s == sub) {
            tracing::info!(sub, grant = grant.as_str(), "dev STS asked for step-up");
            return Err(OAuthError::insufficient_user_authentication());
        }
        Ok(())
    }

    fn discovery_document(&self) -> Value {
        let base = self.base_url();
        json!({
            "issuer": self.options.issuer,
            "token_endpoint": format!("{base}/token"),
            "jwks_uri": format!("{base}/jwks"),
            "introspection_endpoint": format!("{base}/introspect"),
            "grant_types_supported": [TOKEN_EXCHANGE_GRANT, CLIENT_CREDENTIALS_GRANT, JWT_BEARER_GRANT],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })
    }

    fn jwks_document(&self) -> Value {
        json!({
            "keys": [{
                "kty": "EC",
                "crv": "P-256",
                "x": self.jwk_x,
                "y": self.jwk_y,
                "kid": self.kid,
                "alg": "ES256",
                "use": "sig",
            }]
        })
    }

    /// Authenticates the client per RFC 6749 §2.3.1 and returns its id.
    fn authenticate(&self, headers: &HeaderMap, params: &Params) -> Result<String, OAuthError> {
        let body_id = params.single("client_id")?;
        let body_secret = params.single("client_secret")?;
        let mut authorization = headers.get_all(header::AUTHORIZATION).iter();
        let header_value = authorization.next();
        if authorization.next().is_some() {
            return Err(OAuthError::invalid_request(
                "more than one Authorization header",
            ));
        }
        let (client_id, secret) = match header_value {
            Some(value) => {
                if body_secret.is_some() {
                    return Err(OAuthError::invalid_request(
                        "more than one client authentication method used",
                    ));
                }
                let (id, secret) = parse_basic_credentials(value).ok_or_else(|| {
                    OAuthError::invalid_client("malformed HTTP Basic client credentials")
                })?;
                if body_id.is_some_and(|body_id| body_id != id) {
                    return Err(OAuthError::invalid_request(
                        "client_id in the body does not match the Authorization header",
                    ));
                }
                (id, secret)
            }
            None => match (body_id, body_secret) {
                (Some(id), Some(secret)) => (id.to_owned(), secret.to_owned()),
                _ => return Err(OAuthError::invalid_client("client authentication required")),
            },
        };
        if self.client_secret_matches(&client_id, &secret) {
            Ok(client_id)
        } else {
            Err(OAuthError::invalid_client(
                "unknown client or wrong client secret",
            ))
        }
    }

    fn client_secret_matches(&self, client_id: &str, secret: &str) -> bool {
        let presented = sha256(secret.as_bytes());
        match self.client_digests.get(client_id) {
            Some(expected) => verify_slices_are_equal(expected, &presented).is_ok(),
            None => {
                // Compare anyway so that unknown and known clients take the same time.
                let _ = verify_slices_are_equal(&[0; 32], &presented);
                false
            }
        }
    }

    async fn handle_token(&self, request: Request) -> Result<Response, OAuthError> {
        let (parts, body) = request.into_parts();
        let params = read_form(&parts.headers, body, true).await?;
        let client_id = self.authenticate(&parts.headers, &params)?;
        let grant = params
            .single("grant_type")?
            .ok_or_else(|| OAuthError::invalid_request("missing grant_type"))?;
        match grant {
            TOKEN_EXCHANGE_GRANT => self.token_exchange(&client_id, &params),
            JWT_BEARER_GRANT => self.jwt_bearer(&client_id, &params),
            CLIENT_CREDENTIALS_GRANT => self.client_credentials(&client_id, &params),
            _ => Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only token exchange, jwt-bearer and client_credentials are supported",
            )),
        }
    }

    /// RFC 8693 §2.1. The request's shape is checked before any token is verified, so a
    /// malformed request is `invalid_request` whatever its tokens.
    fn token_exchange(&self, client_id: &str, params: &Params) -> Result<Response, OAuthError> {
        let subject_token = params
            .single("subject_token")?
            .ok_or_else(|| OAuthError::invalid_request("missing subject_token"))?;
        params
            .single("subject_token_type")?
            .ok_or_else(|| OAuthError::invalid_request("missing subject_token_type"))?;
        let actor_token = match (
            params.single("actor_token")?,
            params.single("actor_token_type")?,
        ) {
            (Some(token), Some(_)) => Some(token),
            (None, None) => None,
            (Some(_), None) => {
                return Err(OAuthError::invalid_request(
                    "actor_token_type is required with actor_token",
                ));
            }
            (None, Some(_)) => {
                return Err(OAuthError::invalid_request(
                    "actor_token_type given without actor_token",
                ));
            }
        };
        let scope = requested_scope(params)?;
        let request = ExchangeRequest::parse(params, client_id, scope)?;

        let subject = self.verify_exchangeable(subject_token).ok_or_else(|| {
            OAuthError::invalid_grant("subject_token is invalid, expired or not issued here")
        })?;
        let sub = principal(&subject).ok_or_else(|| {
            OAuthError::invalid_grant("subject_token has neither sub nor client_id")
        })?;
        // The subject's own `act` is not carried over: without an actor token nobody is acting
        // on the subject's behalf in this exchange.
        let act = match actor_token {
            None => None,
            Some(actor_token) => {
                let actor = self.verify_exchangeable(actor_token).ok_or_else(|| {
                    OAuthError::invalid_grant("actor_token is invalid, expired or not issued here")
                })?;
                let actor_sub = principal(&actor).ok_or_else(|| {
                    OAuthError::invalid_grant("actor_token has neither sub nor client_id")
                })?;
                let mut act = Map::new();
                act.insert("sub".into(), actor_sub.into());
                // RFC 8693 §4.1: prior actors stay in the chain, nested under the current one.
                if let Some(prior) = actor.get("act") {
                    act.insert("act".into(), prior.clone());
                }
                Some(Value::Object(act))
            }
        };
        self.check_step_up(&sub, DevGrant::TokenExchange)?;

        let grant = DevGrant::TokenExchange;
        match request {
            ExchangeRequest::Token {
                issued_token_type,
                audience,
            } => {
                let ttl = self.options.token_ttl;
                let mut claims = self.access_claims(client_id, &sub, &audience, scope, ttl);
                if let Some(act) = act {
                    claims.insert("act".into(), act);
                }
                // RFC 8693 §2.2.1: `N_A` when the token is not an access token.
                let token_type = if issued_token_type == ACCESS_TOKEN_TYPE {
                    "Bearer"
                } else {
                    NOT_APPLICABLE
                };
                let token = self.issue(grant, client_id, issued_token_type, None, &claims)?;
                Ok(token_response(
                    &token,
                    Some(issued_token_type),
                    token_type,
                    ttl,
                    scope,
                ))
            }
            ExchangeRequest::IdJag { audience, resource } => {
                let ttl = self.options.token_ttl.min(MAX_ID_JAG_TTL);
                let mut claims =
                    self.access_claims(client_id, &sub, &[audience.to_owned()], scope, ttl);
                if let Some(resource) = resource {
                    claims.insert("resource".into(), resource.into());
                }
                let token = self.issue(
                    grant,
                    client_id,
                    ID_JAG_TOKEN_TYPE,
                    Some(ID_JAG_TYP),
                    &claims,
                )?;
                Ok(token_response(
                    &token,
                    Some(ID_JAG_TOKEN_TYPE),
                    NOT_APPLICABLE,
                    ttl,
                    scope,
                ))
            }
            ExchangeRequest::TxnToken {
                audience,
                purpose,
                mut context,
            } => {
                let ttl = self.options.token_ttl.min(MAX_TXN_TOKEN_TTL);
                let mut claims = self.base_claims(ttl);
                // `txn` identifies a Transaction Token; it has no `jti`.
                claims.remove("jti");
                claims.insert("aud".into(), audience.into());
                claims.insert(
                    "txn".into(),
                    format!("{:032x}", rand::random::<u128>()).into(),
                );
                claims.insert("sub".into(), sub.into());
                claims.insert("scope".into(), purpose.into());
                claims.insert("purp".into(), purpose.into());
                // The requesting workload is named by the STS, never by the request.
                context.insert("req_wl".into(), client_id.into());
                claims.insert("rctx".into(), Value::Object(context));
                let token = self.issue(
                    grant,
                    client_id,
                    TXN_TOKEN_TYPE,
                    Some(TXN_TOKEN_TYP),
                    &claims,
                )?;
                Ok(token_response(
                    &token,
                    Some(TXN_TOKEN_TYPE),
                    NOT_APPLICABLE,
                    ttl,
                    Some(purpose),
                ))
            }
        }
    }

    /// RFC 7523 §2.1: an ID-JAG or a JWT authorization grant, signed by this STS, for an access
    /// token of this STS.
    fn jwt_bearer(&self, client_id: &str, params: &Params) -> Result<Response, OAuthError> {
        let assertion = params
            .single("assertion")?
            .ok_or_else(|| OAuthError::invalid_request("missing assertion"))?;
        // Entra's on-behalf-of sends it; nothing here depends on it.
        params.single("requested_token_use")?;
        let scope_parameter = requested_scope(params)?;
        let requested = requested_audience(params, client_id)?;

        let assertion = self.verify_assertion(assertion)?;
        self.check_step_up(&assertion.sub, DevGrant::JwtBearer)?;

        let (audience, scope) = if assertion.is_id_jag {
            // draft-ietf-oauth-identity-assertion-authz-grant: the ID-JAG is bound to the
            // client it was issued to.
            if assertion.claims.get("client_id").and_then(Value::as_str) != Some(client_id) {
                return Err(OAuthError::invalid_grant(
                    "the ID-JAG was issued to another client",
                ));
            }
            let granted = match assertion.claims.get("scope") {
                None => None,
                Some(Value::String(scope)) => Some(scope.as_str()),
                Some(_) => {
                    return Err(OAuthError::invalid_grant(
                        "the ID-JAG's scope is not a string",
                    ));
                }
            };
            if let Some(asked) = scope_parameter {
                let granted: Vec<&str> =
                    granted.map(|g| g.split(' ').collect()).unwrap_or_default();
                if !asked.split(' ').all(|scope| granted.contains(&scope)) {
                    return Err(OAuthError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_scope",
                        "the requested scope exceeds the ID-JAG's scope",
                    ));
                }
            }
            let audience = match assertion.claims.get("resource") {
                Some(Value::String(resource)) if !resource.is_empty() => vec![resource.clone()],
                _ => requested,
            };
            (audience, granted)
        } else {
            (requested, scope_parameter)
        };

        let ttl = self.options.token_ttl;
        let claims = self.access_claims(client_id, &assertion.sub, &audience, scope, ttl);
        let token = self.issue(
            DevGrant::JwtBearer,
            client_id,
            ACCESS_TOKEN_TYPE,
            None,
            &claims,
        )?;
        Ok(token_response(
            &token,
            Some(ACCESS_TOKEN_TYPE),
            "Bearer",
            ttl,
            scope,
        ))
    }

    /// RFC 6749 §4.4: the client asks for a token about itself.
    fn client_credentials(&self, client_id: &str, params: &Params) -> Result<Response, OAuthError> {
        let audience = requested_audience(params, client_id)?;
        let scope = requested_scope(params)?;
        let ttl = self.options.token_ttl;
        let claims = self.access_claims(client_id, client_id, &audience, scope, ttl);
        let token = self.issue(
            DevGrant::ClientCredentials,
            client_id,
            ACCESS_TOKEN_TYPE,
            None,
            &claims,
        )?;
        Ok(token_response(&token, None, "Bearer", ttl, scope))
    }

    /// The claims of an access token, JWT grant or ID-JAG about `sub` for `client_id`.
    fn access_claims(
        &self,
        client_id: &str,
        sub: &str,
        audience: &[String],
        scope: Option<&str>,
        ttl: Duration,
    ) -> Map<String, Value> {
        let mut claims = self.base_claims(ttl);
        claims.insert("sub".into(), sub.into());
        claims.insert("aud".into(), audience_claim(audience));
        claims.insert("client_id".into(), client_id.into());
        if let Some(scope) = scope {
            claims.insert("scope".into(), scope.into());
        }
        claims
    }

    /// Signs, counts and logs one issued token; `typ` is its JOSE header type when not `JWT`.
    fn issue(
        &self,
        grant: DevGrant,
        client_id: &str,
        token_type: &str,
        typ: Option<&str>,
        claims: &Map<String, Value>,
    ) -> Result<String, OAuthError> {
        let token = self.sign_typed(claims, typ).map_err(|error| {
            tracing::error!(%error, "dev STS failed to sign a token");
            OAuthError::server_error()
        })?;
        self.tokens_issued[grant.index()].fetch_add(1, Ordering::Relaxed);
        let aud = match claims.get("aud") {
            Some(Value::String(aud)) => aud.clone(),
            Some(Value::Array(auds)) => auds
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        };
        let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("-");
        tracing::info!(
            sub,
            aud = %aud,
            client = client_id,
            grant = grant.as_str(),
            token_type,
            "dev STS issued a token"
        );
        Ok(token)
    }

    /// RFC 7662: any failure to verify is `{"active": false}`, never an error, so the caller
    /// learns nothing about why.
    async fn handle_introspect(&self, request: Request) -> Result<Response, OAuthError> {
        let (parts, body) = request.into_parts();
        let params = read_form(&parts.headers, body, true).await?;
        self.authenticate(&parts.headers, &params)?;
        let token = params
            .single("token")?
            .ok_or_else(|| OAuthError::invalid_request("missing token"))?;
        let body = match self.verify(token) {
            Some(mut claims) => {
                claims.insert("active".into(), true.into());
                Value::Object(claims)
            }
            None => json!({ "active": false }),
        };
        Ok(json_no_store(StatusCode::OK, body))
    }

    fn user_token_response(&self, params: &Params) -> Result<Response, OAuthError> {
        let sub = params
            .single("sub")?
            .ok_or_else(|| OAuthError::invalid_request("missing sub"))?;
        let audience = params.single("aud")?;
        let scope = params.single("scope")?;
        match self.issue_user_token(sub, audience, scope) {
            Ok(token) => {
                let mut response = ([(header::CONTENT_TYPE, "text/plain")], token).into_response();
                set_no_store(response.headers_mut());
                Ok(response)
            }
            Err(DevStsError::InvalidSubject) => Err(OAuthError::invalid_request(
                "sub must be 1 to 256 characters long",
            )),
            Err(DevStsError::InvalidScope) => Err(OAuthError::invalid_scope()),
            Err(error) => {
                tracing::error!(%error, "dev STS failed to sign a user token");
                Err(OAuthError::server_error())
            }
        }
    }
}

async fn discovery(State(sts): State<Arc<DevSts>>) -> Json<Value> {
    Json(sts.discovery_document())
}

async fn jwks(State(sts): State<Arc<DevSts>>) -> Json<Value> {
    Json(sts.jwks_document())
}

async fn token_endpoint(State(sts): State<Arc<DevSts>>, request: Request) -> Response {
    sts.handle_token(request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn introspection_endpoint(State(sts): State<Arc<DevSts>>, request: Request) -> Response {
    sts.handle_introspect(request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn user_token_from_query(State(sts): State<Arc<DevSts>>, uri: Uri) -> Response {
    let params = Params::parse(uri.query().unwrap_or_default().as_bytes());
    sts.user_token_response(&params)
        .unwrap_or_else(IntoResponse::into_response)
}

async fn user_token_from_form(State(sts): State<Arc<DevSts>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // Lenient about the content type: this endpoint is for hand-typed curl commands.
    match read_form(&parts.headers, body, false).await {
        Ok(params) => sts.user_token_response(&params),
        Err(error) => Err(error),
    }
    .unwrap_or_else(IntoResponse::into_response)
}

/// Form parameters, keeping repeats: `audience` and `resource` may appear several times, and
/// every other parameter must not (RFC 6749 §3.2).
#[derive(Debug, Default)]
struct Params(HashMap<String, Vec<String>>);

impl Params {
    fn parse(raw: &[u8]) -> Params {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        for (name, value) in url::form_urlencoded::parse(raw) {
            // RFC 6749 §3.1: a parameter without a value is treated as omitted.
            if value.is_empty() {
                continue;
            }
            map.entry(name.into_owned())
                .or_default()
                .push(value.into_owned());
        }
        Params(map)
    }

    /// The value of a parameter that may appear at most once.
    fn single(&self, name: &str) -> Result<Option<&str>, OAuthError> {
        match self.0.get(name).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([value]) => Ok(Some(value)),
            Some(_) => Err(OAuthError::invalid_request(format!(
                "parameter {name} must not be repeated"
            ))),
        }
    }

    /// Every value of a repeatable parameter, in request order.
    fn all(&self, name: &str) -> &[String] {
        self.0.get(name).map(Vec::as_slice).unwrap_or_default()
    }
}

async fn read_form(
    headers: &HeaderMap,
    body: axum::body::Body,
    require_form_content_type: bool,
) -> Result<Params, OAuthError> {
    if require_form_content_type && !has_form_content_type(headers) {
        return Err(OAuthError::invalid_request(
            "the request body must be application/x-www-form-urlencoded",
        ));
    }
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| OAuthError::invalid_request("request body too large or unreadable"))?;
    Ok(Params::parse(&bytes))
}

fn has_form_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media_type| media_type.trim().eq_ignore_ascii_case(FORM_CONTENT_TYPE))
}

/// A token response (RFC 6749 §5.1, RFC 8693 §2.2.1).
fn token_response(
    token: &str,
    issued_token_type: Option<&str>,
    token_type: &str,
    expires_in: Duration,
    scope: Option<&str>,
) -> Response {
    let mut body = Map::new();
    body.insert("access_token".into(), token.into());
    if let Some(issued_token_type) = issued_token_type {
        body.insert("issued_token_type".into(), issued_token_type.into());
    }
    body.insert("token_type".into(), token_type.into());
    body.insert("expires_in".into(), expires_in.as_secs().into());
    if let Some(scope) = scope {
        body.insert("scope".into(), scope.into());
    }
    json_no_store(StatusCode::OK, Value::Object(body))
}

/// What a token exchange asks for, with the parameters that kind of token needs.
enum ExchangeRequest<'a> {
    /// An access token or a JWT (RFC 8693 §3).
    Token {
        issued_token_type: &'static str,
        audience: Vec<String>,
    },
    /// An ID-JAG for the authorization server `audience`.
    IdJag {
        audience: &'a str,
        resource: Option<&'a str>,
    },
    /// A Transaction Token for the trust domain `audience`.
    TxnToken {
        audience: &'a str,
        purpose: &'a str,
        context: Map<String, Value>,
    },
}

impl<'a> ExchangeRequest<'a> {
    fn parse(
        params: &'a Params,
        client_id: &str,
        scope: Option<&'a str>,
    ) -> Result<Self, OAuthError> {
        let token = |issued_token_type| {
            Ok(ExchangeRequest::Token {
                issued_token_type,
                audience: requested_audience(params, client_id)?,
            })
        };
        match params.single("requested_token_type")? {
            None | Some(ACCESS_TOKEN_TYPE) => token(ACCESS_TOKEN_TYPE),
            Some(JWT_TOKEN_TYPE) => token(JWT_TOKEN_TYPE),
            Some(ID_JAG_TOKEN_TYPE) => {
                let audience = single_audience(params, "an ID-JAG")?;
                let resource = params.single("resource")?;
                if let Some(resource) = resource {
                    check_resource(resource)?;
                }
                Ok(ExchangeRequest::IdJag { audience, resource })
            }
            Some(TXN_TOKEN_TYPE) => {
                let audience = single_audience(params, "a Transaction Token")?;
                let purpose = scope.ok_or_else(|| {
                    OAuthError::invalid_request(
                        "scope (the purpose) is required for a Transaction Token",
                    )
                })?;
                let context = match params.single("request_context")? {
                    None => Map::new(),
                    Some(encoded) => decode_request_context(encoded)?,
                };
                Ok(ExchangeRequest::TxnToken {
                    audience,
                    purpose,
                    context,
                })
            }
            Some(_) => Err(OAuthError::invalid_request(
                "requested_token_type must be the access_token, jwt, id-jag or txn_token token type",
            )),
        }
    }
}

/// The one `audience` an ID-JAG or a Transaction Token is for.
fn single_audience<'a>(params: &'a Params, what: &str) -> Result<&'a str, OAuthError> {
    match params.all("audience") {
        [audience] => Ok(audience),
        [] => Err(OAuthError::invalid_request(format!(
            "audience is required for {what}"
        ))),
        _ => Err(OAuthError::invalid_request(format!(
            "{what} has exactly one audience"
        ))),
    }
}

/// `request_context`: the unpadded base64url of a JSON object.
fn decode_request_context(encoded: &str) -> Result<Map<String, Value>, OAuthError> {
    let malformed =
        || OAuthError::invalid_request("request_context is not the base64url of a JSON object");
    let bytes = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| malformed())?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(context)) => Ok(context),
        _ => Err(malformed()),
    }
}

/// A verified JWT-bearer assertion.
struct Assertion {
    sub: String,
    /// JOSE `typ` `oauth-id-jag+jwt`.
    is_id_jag: bool,
    claims: Map<String, Value>,
}

/// Whether the JOSE `typ` names `expected`, with or without `application/` (RFC 7515 §4.1.9
/// allows both, compared case-insensitively).
fn media_type_is(typ: &str, expected: &str) -> bool {
    let short = match typ.get(..12) {
        Some(prefix) if prefix.eq_ignore_ascii_case("application/") => &typ[12..],
        _ => typ,
    };
    short.eq_ignore_ascii_case(expected)
}

/// Resources must be absolute URIs without a fragment (RFC 8707 §2).
fn check_resource(resource: &str) -> Result<(), OAuthError> {
    if url::Url::parse(resource).is_ok_and(|url| url.fragment().is_none()) {
        Ok(())
    } else {
        Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_target",
            "resource must be an absolute URI without a fragment",
        ))
    }
}

/// The `aud` of an issued token: the `audience` values, else the `resource` values, else the
/// requesting client.
fn requested_audience(params: &Params, client_id: &str) -> Result<Vec<String>, OAuthError> {
    let resources = params.all("resource");
    for resource in resources {
        check_resource(resource)?;
    }
    let audiences = params.all("audience");
    let chosen: &[String] = if !audiences.is_empty() {
        audiences
    } else if !resources.is_empty() {
        resources
    } else {
        return Ok(vec![client_id.to_owned()]);
    };
    let mut unique: Vec<String> = Vec::with_capacity(chosen.len());
    for value in chosen {
        if !unique.contains(value) {
            unique.push(value.clone());
        }
    }
    Ok(unique)
}

fn requested_scope(params: &Params) -> Result<Option<&str>, OAuthError> {
    match params.single("scope")? {
        Some(scope) if !is_valid_scope(scope) => Err(OAuthError::invalid_scope()),
        scope => Ok(scope),
    }
}

/// RFC 6749 §3.3: `scope-token *( SP scope-token )`, each token of `%x21 / %x23-5B / %x5D-7E`.
fn is_valid_scope(scope: &str) -> bool {
    !scope.is_empty()
        && scope.split(' ').all(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E))
        })
}

/// A single audience is a string, several are an array (RFC 7519 §4.1.3).
fn audience_claim(audience: &[String]) -> Value {
    match audience {
        [single] => Value::String(single.clone()),
        several => Value::Array(several.iter().cloned().map(Value::String).collect()),
    }
}

/// Who a verified token speaks for: its `sub`, or for client-credentials style tokens without
/// one, its `client_id`.
fn principal(claims: &Map<String, Value>) -> Option<String> {
    ["sub", "client_id"].iter().find_map(|name| {
        claims
            .get(*name)
            .and_then(Value::as_str)
            .filter(|value| !value.is_empty())
            .map(str::to_owned)
    })
}

/// Parses `Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 §2.3.1).
fn parse_basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?.trim();
    let (scheme, credentials) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(credentials.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_urldecode(id)?, form_urldecode(secret)?))
}

/// Decodes one `application/x-www-form-urlencoded` component: `+` is a space and `%XX` a byte.
/// Returns `None` for a broken escape or a result that is not UTF-8.
fn form_urldecode(input: &str) -> Option<String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&first, tail)) = rest.split_first() {
        match first {
            b'+' => {
                out.push(b' ');
                rest = tail;
            }
            b'%' => {
                let [high, low, remaining @ ..] = tail else {
                    return None;
                };
                out.push((hex_value(*high)? << 4) | hex_value(*low)?);
                rest = remaining;
            }
            other => {
                out.push(other);
                rest = tail;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Tokens and token errors must not be cached by anything between the STS and the client
/// (RFC 6749 §5.1).
fn set_no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

fn json_no_store(status: StatusCode, body: Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    set_no_store(response.headers_mut());
    response
}

/// An RFC 6749 §5.2 error response.
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: String,
    /// Further members of the error object, e.g. a step-up's `acr_values`.
    extra: Map<String, Value>,
}

impl OAuthError {
    fn new(status: StatusCode, code: &'static str, description: impl Into<String>) -> Self {
        OAuthError {
            status,
            code,
            description: description.into(),
            extra: Map::new(),
        }
    }

    fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    fn invalid_client(description: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
    }

    fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }

    fn invalid_scope() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "scope must be space-separated RFC 6749 scope tokens",
        )
    }

    /// RFC 9470 §3: the subject must authenticate again, more strongly or more recently.
    fn insufficient_user_authentication() -> Self {
        let mut error = Self::new(
            StatusCode::BAD_REQUEST,
            "insufficient_user_authentication",
            "a stronger authentication is required",
        );
        error.extra.insert("acr_values".into(), STEP_UP_ACR.into());
        error.extra.insert("max_age".into(), STEP_UP_MAX_AGE.into());
        error
    }

    fn server_error() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the token could not be signed",
        )
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("error".into(), self.code.into());
        body.insert("error_description".into(), self.description.into());
        body.extend(self.extra);
        let mut response = json_no_store(self.status, Value::Object(body));
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(BASIC_CHALLENGE),
            );
        }
        response
    }
}

fn validate_issuer(issuer: &str) -> Result<(), DevStsError> {
    let invalid = |reason| DevStsError::InvalidIssuer {
        issuer: issuer.to_owned(),
        reason,
    };
    let url = url::Url::parse(issuer).map_err(|_| invalid("not an absolute URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("an issuer has no query or fragment"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
