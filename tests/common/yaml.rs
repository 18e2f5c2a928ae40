//! `gateway.yaml` for tests, built as data and written by serde: a route, a token service or a
//! `server:` key is a value in a tree, never text pasted into other text, so a test cannot
//! produce YAML that means something else than it reads (a quote in a value, a key at the
//! wrong indentation).
//!
//! The keys are the gateway's own (`src/config/file.rs`); each builder has a method for the
//! keys tests commonly set and [`set`](Route::set) for any other. Durations are
//! [`Duration`]s, written as `humantime` text (`300ms`, `1m 30s`).
//!
//! ```ignore
//! let yaml = GatewayYaml::new()
//!     .admin()
//!     .token_service(TokenService::at(&sts))
//!     .route(Route::new("orders", "/orders", upstream.url())
//!         .exchange(Exchange::impersonation("corp").audience("https://orders.example.com")))
//!     .to_yaml();
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use super::TestSts;

/// A key's value as a tree node.
fn value(v: impl Serialize) -> Value {
    serde_json::to_value(v).expect("a test config value serializes")
}

/// A duration as the config writes it.
fn duration(d: Duration) -> Value {
    Value::String(humantime::format_duration(d).to_string())
}

/// Adds a key to a map, replacing any earlier value.
fn put(map: &mut Map<String, Value>, key: &str, v: Value) {
    map.insert(key.to_string(), v);
}

/// The whole file: `server:`, `token_services:`, `routes:` and `cache:`.
#[derive(Clone)]
pub struct GatewayYaml {
    server: Map<String, Value>,
    token_services: Map<String, Value>,
    routes: Vec<Value>,
    cache: Map<String, Value>,
}

impl Default for GatewayYaml {
    fn default() -> Self {
        GatewayYaml::new()
    }
}

impl GatewayYaml {
    /// One proxy listener on `127.0.0.1:0`, nothing else.
    pub fn new() -> GatewayYaml {
        let mut server = Map::new();
        put(&mut server, "listen", value(["127.0.0.1:0"]));
        GatewayYaml {
            server,
            token_services: Map::new(),
            routes: Vec::new(),
            cache: Map::new(),
        }
    }

    /// `server.admin_listen: 127.0.0.1:0`.
    pub fn admin(self) -> GatewayYaml {
        self.server("admin_listen", "127.0.0.1:0")
    }

    /// `server.grace_period`.
    pub fn grace_period(self, d: Duration) -> GatewayYaml {
        self.server("grace_period", duration(d))
    }

    /// `server.shutdown_timeout`.
    pub fn shutdown_timeout(self, d: Duration) -> GatewayYaml {
        self.server("shutdown_timeout", duration(d))
    }

    /// `server.threads`.
    pub fn threads(self, n: usize) -> GatewayYaml {
        self.server("threads", n)
    }

    /// `server.max_token_bytes`.
    pub fn max_token_bytes(self, n: usize) -> GatewayYaml {
        self.server("max_token_bytes", n)
    }

    /// `server.tls`: a TLS listener on `127.0.0.1:0` with this certificate and key.
    pub fn tls(self, cert_file: &Path, key_file: &Path, reload_interval: Duration) -> GatewayYaml {
        self.server(
            "tls",
            serde_json::json!({
                "listen": ["127.0.0.1:0"],
                "cert_file": cert_file,
                "key_file": key_file,
                "reload_interval": duration(reload_interval),
            }),
        )
    }

    /// Any other `server:` key.
    pub fn server(mut self, key: &str, v: impl Serialize) -> GatewayYaml {
        put(&mut self.server, key, value(v));
        self
    }

    /// One more token service under its name.
    pub fn token_service(mut self, service: TokenService) -> GatewayYaml {
        put(
            &mut self.token_services,
            &service.name,
            Value::Object(service.keys),
        );
        self
    }

    /// One more route, after the ones already added.
    pub fn route(mut self, route: Route) -> GatewayYaml {
        self.routes.push(Value::Object(route.keys));
        self
    }

    /// The `cache:` block.
    pub fn cache(mut self, cache: Cache) -> GatewayYaml {
        self.cache = cache.keys;
        self
    }

    /// The file's text.
    pub fn to_yaml(&self) -> String {
        let mut file = Map::new();
        put(&mut file, "server", Value::Object(self.server.clone()));
        if !self.token_services.is_empty() {
            put(
                &mut file,
                "token_services",
                Value::Object(self.token_services.clone()),
            );
        }
        put(&mut file, "routes", Value::Array(self.routes.clone()));
        if !self.cache.is_empty() {
            put(&mut file, "cache", Value::Object(self.cache.clone()));
        }
        serde_yaml::to_string(&file).expect("a test config serializes")
    }
}

/// `token_services.<name>`.
#[derive(Clone)]
pub struct TokenService {
    name: String,
    keys: Map<String, Value>,
}

impl TokenService {
    /// A token service at `token_endpoint` whose client is `gateway` with the secret
    /// `${TEST_CLIENT_SECRET}` (see [`super::CLIENT_SECRET`]).
    pub fn new(name: &str, token_endpoint: impl Into<String>) -> TokenService {
        TokenService {
            name: name.to_string(),
            keys: Map::new(),
        }
        .set("token_endpoint", token_endpoint.into())
        .set("client_id", "gateway")
        .set("client_secret", "${TEST_CLIENT_SECRET}")
    }

    /// `corp` at the test STS.
    pub fn at(sts: &TestSts) -> TokenService {
        TokenService::new("corp", sts.token_endpoint())
    }

    /// A token service found by OIDC discovery at `issuer`, with no `token_endpoint`.
    pub fn discovered(name: &str, issuer: &str) -> TokenService {
        TokenService {
            name: name.to_string(),
            keys: Map::new(),
        }
        .set("issuer", issuer)
        .set("client_id", "gateway")
        .set("client_secret", "${TEST_CLIENT_SECRET}")
    }

    /// `client_id`.
    pub fn client_id(self, id: &str) -> TokenService {
        self.set("client_id", id)
    }

    /// `auth_method` (`client_secret_basic`, `client_secret_post`, `private_key_jwt`, ...).
    pub fn auth_method(self, method: &str) -> TokenService {
        self.set("auth_method", method)
    }

    /// `auth_method: private_key_jwt` with this key file and key id, and no client secret.
    pub fn private_key_jwt(self, key_file: &Path, key_id: &str) -> TokenService {
        self.without("client_secret")
            .auth_method("private_key_jwt")
            .set("private_key_file", key_file)
            .set("private_key_id", key_id)
    }

    /// `profile` with its keys (`environment_id`, `region`, `realm`, ...), e.g.
    /// `.profile("keycloak", &[("base_url", "https://sso.example.com"), ("realm", "corp")])`.
    pub fn profile(self, profile: &str, keys: &[(&str, &str)]) -> TokenService {
        keys.iter()
            .fold(self.set("profile", profile), |s, (k, v)| s.set(k, *v))
    }

    /// `timeout`: the bound on one STS call.
    pub fn timeout(self, d: Duration) -> TokenService {
        self.set("timeout", duration(d))
    }

    /// `retries`.
    pub fn retries(self, n: u32) -> TokenService {
        self.set("retries", n)
    }

    /// `circuit_breaker: { failure_threshold, open_for }`.
    pub fn circuit_breaker(self, failure_threshold: u32, open_for: Duration) -> TokenService {
        self.set(
            "circuit_breaker",
            serde_json::json!({
                "failure_threshold": failure_threshold,
                "open_for": duration(open_for),
            }),
        )
    }

    /// `max_concurrent` STS calls, each waiting at most `queue_timeout` for a slot.
    pub fn max_concurrent(self, n: usize, queue_timeout: Duration) -> TokenService {
        self.set("max_concurrent", n)
            .set("queue_timeout", duration(queue_timeout))
    }

    /// `inbound`: how callers' tokens are validated for routes of this service.
    pub fn inbound(self, inbound: Inbound) -> TokenService {
        self.set("inbound", Value::Object(inbound.keys))
    }

    /// Any other key.
    pub fn set(mut self, key: &str, v: impl Serialize) -> TokenService {
        put(&mut self.keys, key, value(v));
        self
    }

    /// Removes a key set earlier (a default of [`TokenService::new`]).
    pub fn without(mut self, key: &str) -> TokenService {
        self.keys.remove(key);
        self
    }
}

/// `routes[]`.
#[derive(Clone)]
pub struct Route {
    keys: Map<String, Value>,
}

impl Route {
    /// A route `name` on `path_prefix` to `upstream`, with `exchange: { mode: none }` until
    /// [`Route::exchange`] says otherwise.
    pub fn new(name: &str, path_prefix: &str, upstream: impl Into<Upstream>) -> Route {
        let route = Route { keys: Map::new() }
            .set("name", name)
            .set("match", serde_json::json!({ "path_prefix": path_prefix }))
            .set("exchange", serde_json::json!({ "mode": "none" }));
        route.upstream(upstream)
    }

    /// `match.host` (exact, or `*.suffix`).
    pub fn host(mut self, host: &str) -> Route {
        if let Some(Value::Object(m)) = self.keys.get_mut("match") {
            put(m, "host", value(host));
        }
        self
    }

    /// `upstream`: a URL, or peers with their settings.
    pub fn upstream(self, upstream: impl Into<Upstream>) -> Route {
        self.set("upstream", upstream.into().0)
    }

    /// `exchange`.
    pub fn exchange(self, exchange: Exchange) -> Route {
        self.set("exchange", Value::Object(exchange.keys))
    }

    /// `inbound` for this route alone.
    pub fn inbound(self, inbound: Inbound) -> Route {
        self.set("inbound", Value::Object(inbound.keys))
    }

    /// `headers: { remove, set }`.
    pub fn headers(self, remove: &[&str], set: &[(&str, &str)]) -> Route {
        let set: Map<String, Value> = set.iter().map(|(k, v)| (k.to_string(), value(v))).collect();
        self.set(
            "headers",
            serde_json::json!({ "remove": remove, "set": set }),
        )
    }

    /// Any other key.
    pub fn set(mut self, key: &str, v: impl Serialize) -> Route {
        put(&mut self.keys, key, value(v));
        self
    }
}

/// `routes[].upstream`: one URL, or a map with `peers`.
#[derive(Clone)]
pub struct Upstream(Value);

impl Upstream {
    /// `{ peers: [...] }`.
    pub fn peers<S: AsRef<str>>(peers: &[S]) -> Upstream {
        let peers: Vec<&str> = peers.iter().map(AsRef::as_ref).collect();
        Upstream(serde_json::json!({ "peers": peers }))
    }

    /// `tls`, as a map of its keys (`ca_file`, `sni`, `client_cert_file`, `client_key_file`,
    /// `verify`); `serde_json::json!({})` for an empty one.
    pub fn tls(self, tls: Value) -> Upstream {
        self.set("tls", tls)
    }

    /// `health_check: { path, interval, unhealthy_after, healthy_after }`.
    pub fn health_check(
        self,
        path: &str,
        interval: Duration,
        unhealthy_after: usize,
        healthy_after: usize,
    ) -> Upstream {
        self.set(
            "health_check",
            serde_json::json!({
                "path": path,
                "interval": duration(interval),
                "unhealthy_after": unhealthy_after,
                "healthy_after": healthy_after,
            }),
        )
    }

    /// Any other key of the peers map.
    pub fn set(mut self, key: &str, v: impl Serialize) -> Upstream {
        match &mut self.0 {
            Value::Object(m) => put(m, key, value(v)),
            url => panic!("{key}: an upstream written as a URL ({url}) has no keys"),
        }
        self
    }
}

impl From<&str> for Upstream {
    fn from(url: &str) -> Upstream {
        Upstream(value(url))
    }
}

impl From<String> for Upstream {
    fn from(url: String) -> Upstream {
        Upstream(Value::String(url))
    }
}

impl From<&String> for Upstream {
    fn from(url: &String) -> Upstream {
        Upstream(Value::String(url.clone()))
    }
}

/// `routes[].exchange`.
#[derive(Clone)]
pub struct Exchange {
    keys: Map<String, Value>,
}

impl Exchange {
    fn mode(mode: &str, token_service: Option<&str>) -> Exchange {
        let exchange = Exchange { keys: Map::new() }.set("mode", mode);
        match token_service {
            Some(service) => exchange.set("token_service", service),
            None => exchange,
        }
    }

    /// `mode: none`: no token upstream.
    pub fn none() -> Exchange {
        Exchange::mode("none", None)
    }

    /// `mode: impersonation` at `token_service`.
    pub fn impersonation(token_service: &str) -> Exchange {
        Exchange::mode("impersonation", Some(token_service))
    }

    /// `mode: delegation` at `token_service`.
    pub fn delegation(token_service: &str) -> Exchange {
        Exchange::mode("delegation", Some(token_service))
    }

    /// `mode: client_credentials` at `token_service`.
    pub fn client_credentials(token_service: &str) -> Exchange {
        Exchange::mode("client_credentials", Some(token_service))
    }

    /// One more `audience` value.
    pub fn audience(self, audience: &str) -> Exchange {
        self.push("audience", audience)
    }

    /// One more `resource` value.
    pub fn resource(self, resource: &str) -> Exchange {
        self.push("resource", resource)
    }

    /// `scope`.
    pub fn scope(self, scope: &str) -> Exchange {
        self.set("scope", scope)
    }

    /// `subject_token_type` (`access_token`, `id_token`, `jwt`, or a URN).
    pub fn subject_token_type(self, t: &str) -> Exchange {
        self.set("subject_token_type", t)
    }

    /// `requested_token_type`.
    pub fn requested_token_type(self, t: &str) -> Exchange {
        self.set("requested_token_type", t)
    }

    /// `actor`: where a delegation's actor token comes from.
    pub fn actor(self, actor: Actor) -> Exchange {
        self.set("actor", Value::Object(actor.keys))
    }

    /// `require_may_act: true`.
    pub fn require_may_act(self) -> Exchange {
        self.set("require_may_act", true)
    }

    /// `caller` (`required`, `anonymous`).
    pub fn caller(self, caller: &str) -> Exchange {
        self.set("caller", caller)
    }

    /// Any other key.
    pub fn set(mut self, key: &str, v: impl Serialize) -> Exchange {
        put(&mut self.keys, key, value(v));
        self
    }

    fn push(mut self, key: &str, item: &str) -> Exchange {
        let list = self
            .keys
            .entry(key.to_string())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(items) = list {
            items.push(value(item));
        }
        self
    }
}

/// `routes[].exchange.actor`.
#[derive(Clone)]
pub struct Actor {
    keys: Map<String, Value>,
}

impl Actor {
    /// The gateway's own token from its token service (client credentials), for `scope`.
    pub fn own_token(scope: &str) -> Actor {
        Actor { keys: Map::new() }.set("scope", scope)
    }

    /// The gateway's own token with no `scope`; `audience` values with [`Actor::audience`].
    pub fn own() -> Actor {
        Actor { keys: Map::new() }
    }

    /// One more `audience` value of the gateway's own token request.
    pub fn audience(mut self, audience: &str) -> Actor {
        let list = self
            .keys
            .entry("audience".to_string())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(items) = list {
            items.push(value(audience));
        }
        self
    }

    /// A token read from a file.
    pub fn token_file(path: &Path) -> Actor {
        Actor { keys: Map::new() }.set("token_file", path)
    }

    /// `token_type` of the actor token.
    pub fn token_type(self, t: &str) -> Actor {
        self.set("token_type", t)
    }

    /// Any other key.
    pub fn set(mut self, key: &str, v: impl Serialize) -> Actor {
        put(&mut self.keys, key, value(v));
        self
    }
}

/// `inbound` of a token service or a route.
#[derive(Clone)]
pub struct Inbound {
    keys: Map<String, Value>,
}

impl Inbound {
    /// `jwt: { issuer, jwks_uri }`; audiences with [`Inbound::audiences`].
    pub fn jwt(issuer: &str, jwks_uri: &str) -> Inbound {
        Inbound { keys: Map::new() }.set(
            "jwt",
            serde_json::json!({ "issuer": issuer, "jwks_uri": jwks_uri }),
        )
    }

    /// `jwt: {}`: the token service's own issuer and `jwks_uri` (explicit, profile or
    /// discovery); audiences with [`Inbound::audiences`].
    pub fn service_jwt() -> Inbound {
        Inbound { keys: Map::new() }.set("jwt", serde_json::json!({}))
    }

    /// `jwt` for a [`super::TestIssuer`]'s tokens.
    pub fn jwt_of(issuer: &super::TestIssuer) -> Inbound {
        Inbound::jwt(&issuer.issuer, &issuer.jwks_uri)
    }

    /// `introspection: {}` (the token service's endpoint); keys with [`Inbound::introspection_key`].
    pub fn introspection() -> Inbound {
        Inbound { keys: Map::new() }.set("introspection", serde_json::json!({}))
    }

    /// `jwt.audiences` (or `introspection.audiences`): what a caller's token must be for.
    pub fn audiences(self, audiences: &[&str]) -> Inbound {
        let block = if self.keys.contains_key("jwt") {
            "jwt"
        } else {
            "introspection"
        };
        self.key_of(block, "audiences", value(audiences))
    }

    /// Another key of the `introspection` block (`endpoint`, `cache_ttl`, ...).
    pub fn introspection_key(self, key: &str, v: impl Serialize) -> Inbound {
        self.key_of("introspection", key, value(v))
    }

    /// `introspection.negative_cache_ttl`: how long a refusal is remembered.
    pub fn negative_cache_ttl(self, d: Duration) -> Inbound {
        self.key_of("introspection", "negative_cache_ttl", duration(d))
    }

    /// Another key of the `jwt` block (`algorithms`, `leeway`, ...).
    pub fn jwt_key(self, key: &str, v: impl Serialize) -> Inbound {
        self.key_of("jwt", key, value(v))
    }

    fn key_of(mut self, block: &str, key: &str, v: Value) -> Inbound {
        match self.keys.get_mut(block) {
            Some(Value::Object(m)) => put(m, key, v),
            _ => panic!("inbound.{block}.{key}: no {block} block"),
        }
        self
    }

    /// Any other key.
    pub fn set(mut self, key: &str, v: impl Serialize) -> Inbound {
        put(&mut self.keys, key, value(v));
        self
    }
}

/// `cache:`.
#[derive(Clone, Default)]
pub struct Cache {
    keys: Map<String, Value>,
}

impl Cache {
    pub fn new() -> Cache {
        Cache::default()
    }

    /// `expiry_skew`: how long before expiry an entry stops being served.
    pub fn expiry_skew(self, d: Duration) -> Cache {
        self.set("expiry_skew", duration(d))
    }

    /// `negative_ttl`: how long a definitive rejection is remembered.
    pub fn negative_ttl(self, d: Duration) -> Cache {
        self.set("negative_ttl", duration(d))
    }

    /// `refresh_ahead`: the fraction of a lifetime after which a hit refreshes the entry.
    pub fn refresh_ahead(self, fraction: f64) -> Cache {
        self.set("refresh_ahead", fraction)
    }

    /// Any other key.
    pub fn set(mut self, key: &str, v: impl Serialize) -> Cache {
        put(&mut self.keys, key, value(v));
        self
    }
}
