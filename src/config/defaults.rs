//! What a key of `gateway.yaml` is when the file leaves it out, each value once.
//!
//! The builders in [`super`] read them here and nowhere else, and `docs/configuration.md` gives
//! the same values in its "default" column. A few defaults are still defined by the runtime
//! piece that uses them (the STS resilience settings in `exchange::resilience`, the JWT and
//! introspection settings in `inbound`); the builders take those from there.

use std::time::Duration;

// --- server ---------------------------------------------------------------------------------

/// `server.threads`: one proxy worker thread, pingora's own default; a gateway that needs more
/// cores says so.
pub const THREADS: usize = 1;
/// `server.work_stealing`: off. Each thread serves the connections it was given, which costs
/// less per request than tokio's work stealing; stealing only pays for few uneven connections.
pub const WORK_STEALING: bool = false;
/// `server.grace_period`: after SIGTERM, 5 s in which in-flight requests are still served —
/// enough for an API call, well inside an orchestrator's kill timeout.
pub const GRACE_PERIOD: Duration = Duration::from_secs(5);
/// `server.shutdown_timeout`: the hard stop 5 s after the grace period, so a stuck connection
/// cannot hold a shutdown or an upgrade forever.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// `server.h2c`: off. A plain listener speaks HTTP/1.1 unless told that its clients (a mesh
/// sidecar, gRPC services inside a cluster) send HTTP/2 with prior knowledge; TLS listeners
/// negotiate HTTP/2 by ALPN whatever this says.
pub const H2C: bool = false;
/// `server.max_token_bytes`: 8 KiB. RFC 6750 sets no limit; real JWTs stay well below it, and
/// anything larger is refused before it is parsed or sent anywhere.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// `server.max_request_header_bytes`: 32 KiB, room for a large token next to the usual
/// cookies; a larger header block is answered 431.
pub const MAX_REQUEST_HEADER_BYTES: usize = 32 * 1024;
/// `server.tls.reload_interval`: every 10 s the certificate files are checked, so a rotated
/// certificate is served within seconds for the cost of two `stat` calls.
pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

// --- token_services ---------------------------------------------------------------------------

/// `token_services.<name>.timeout`: 5 s for one whole STS call (connect, send, answer). A
/// caller waits at most this long for a token before getting 504.
pub const STS_TIMEOUT: Duration = Duration::from_secs(5);
/// `token_services.<name>.connect_timeout`: 2 s. A healthy STS connects in milliseconds; a
/// failed connect should leave time in [`STS_TIMEOUT`] for a retry.
pub const STS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// `token_services.<name>.region` of `profile: pingone`: `com` (`auth.pingone.com`), the
/// region PingOne environments are created in unless another is chosen.
pub const PINGONE_REGION: &str = "com";
/// `inbound.introspection.cache_ttl`: an `active` answer is reused for 60 s (never past the
/// token's `exp`), so a revoked token stops working within a minute while a busy caller costs
/// one introspection call a minute.
pub const INTROSPECTION_CACHE_TTL: Duration = Duration::from_secs(60);
/// Deadline for one introspection call: 5 s (the token service's `timeout` when configured).
pub const INTROSPECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on cached validations per validator (JWT results and introspection answers): 100 000
/// callers' tokens, the same bound as the token cache.
pub const VALIDATION_CACHE_ENTRIES: u64 = 100_000;
/// `inbound.introspection.negative_cache_ttl`: a refused token is remembered 30 s, so a replayed
/// bad token costs one introspection call every 30 s, not one per request.
pub const INTROSPECTION_NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// `inbound.introspection.max_concurrent`: 64 calls in flight, the same bound as the token
/// endpoint's, so an introspection outage cannot pile up unbounded waiting requests.
pub const INTROSPECTION_MAX_CONCURRENT: usize = 64;
/// `inbound.introspection.queue_timeout`: a request waits 250 ms for a free slot, then gets 503.
pub const INTROSPECTION_QUEUE_TIMEOUT: Duration = Duration::from_millis(250);
/// `inbound.jwt.algorithms`: RS256 and ES256, the asymmetric algorithms identity providers sign
/// access tokens with; `none` and HMAC are never accepted whatever is configured.
pub const JWT_ALGORITHMS: &[jsonwebtoken::Algorithm] = &[
    jsonwebtoken::Algorithm::RS256,
    jsonwebtoken::Algorithm::ES256,
];
/// `inbound.jwt.leeway`: 30 s of clock difference tolerated for `exp`, `nbf` and `iat`.
pub const JWT_LEEWAY: Duration = Duration::from_secs(30);
/// How often the JWKS is refetched in the background: every 5 minutes, so a retired key stops
/// being accepted soon after the issuer drops it.
pub const JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// Refetches triggered by an unknown `kid` happen at most every 30 s, so forged `kid`s cannot
/// make the gateway hammer the issuer.
pub const JWKS_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// `token_services.<name>.max_concurrent`: 64 STS calls in flight per token service.
pub const STS_MAX_CONCURRENT: usize = 64;
/// `token_services.<name>.queue_timeout`: a request waits 250 ms for a free slot, then gets 503.
pub const STS_QUEUE_TIMEOUT: Duration = Duration::from_millis(250);
/// `token_services.<name>.retries`: one retry (no connection, or 503 without `Retry-After`),
/// inside the call's timeout.
pub const STS_RETRIES: u32 = 1;
/// `token_services.<name>.circuit_breaker.failure_threshold`: 5 failures in a row open it.
pub const STS_FAILURE_THRESHOLD: u32 = 5;
/// `token_services.<name>.circuit_breaker.open_for`: an open breaker fails fast for 5 s, then
/// lets one probe through.
pub const STS_OPEN_FOR: Duration = Duration::from_secs(5);

// --- routes[].upstream -----------------------------------------------------------------------

/// `routes[].upstream.connect_timeout`: 5 s per connection attempt; a timeout is answered 504.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `routes[].upstream.health_check.interval`: each peer is checked every 5 s, so a dead peer
/// leaves rotation within seconds without the checks adding noticeable load.
pub const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// `routes[].upstream.health_check.unhealthy_after` and `healthy_after`: 2 checks in a row, so
/// one lost probe neither removes a peer nor brings a flapping one back.
pub const HEALTH_CHECK_THRESHOLD: usize = 2;
/// Most concurrent streams the gateway opens on one HTTP/2 connection to a peer (pingora's
/// own default is 1, a connection per request in flight). 100 is the minimum RFC 9113 §6.5.2
/// asks a server to allow; a peer that allows fewer makes the gateway open more connections.
pub const UPSTREAM_H2_STREAMS: usize = 100;
/// `routes[].upstream.tls.verify`: every `https` peer's certificate and host name are verified;
/// turning it off is for tests and is warned about.
pub const UPSTREAM_TLS_VERIFY: bool = true;

// --- cache ----------------------------------------------------------------------------------

/// `cache.max_entries`: 100 000 exchanged tokens bound the memory the cache can take while
/// holding more distinct callers and routes than one gateway sees in a token's lifetime.
pub const CACHE_MAX_ENTRIES: u64 = 100_000;
/// `cache.expiry_skew`: an entry is dropped 30 s before its token expires, so a token handed
/// upstream still has time to be checked there.
pub const CACHE_EXPIRY_SKEW: Duration = Duration::from_secs(30);
/// `cache.default_ttl`: 60 s, when the STS sends no `expires_in` and the issued token has no
/// `exp` — short, because nothing says how long the token is good for.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// `cache.max_ttl`: no entry lives longer than 24 h whatever the STS says, so a token minted
/// with a far-off expiry is still exchanged again daily.
pub const CACHE_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// `cache.negative_ttl`: a definitive rejection is remembered 5 s — long enough to absorb a
/// client retrying a bad token in a loop, short enough that a fixed grant works almost at once.
pub const CACHE_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// `cache.refresh_ahead`: once an entry has lived 80% of its lifetime, a hit re-exchanges it in
/// the background, so busy callers never wait for an expiry.
pub const CACHE_REFRESH_AHEAD: f64 = 0.8;

/// `routes[].headers.forwarded`: the upstream learns the caller's address, scheme and host from
/// `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host`, as behind any reverse proxy.
pub const FORWARDED_HEADERS: bool = true;
/// `routes[].headers.request_id`: the request id (the caller's when it is clean, else a fresh
/// one) goes upstream and back in `X-Request-Id`, so both sides can be matched with the log.
pub const REQUEST_ID_HEADER: bool = true;

// --- cache.shared ---------------------------------------------------------------------------

/// `cache.shared.key_prefix`: `txgate:`, so the gateway's keys are easy to find (and to keep
/// apart with ACLs) in a Redis that serves others too.
pub const SHARED_CACHE_KEY_PREFIX: &str = "txgate:";
/// `cache.shared.timeout`: 50 ms per Redis operation. A healthy Redis answers in well under a
/// millisecond; past 50 ms asking it costs more than it saves, and the replica goes on alone.
pub const SHARED_CACHE_TIMEOUT: Duration = Duration::from_millis(50);
/// The largest `cache.shared.timeout` accepted: 5 s, the default STS timeout. Waiting longer
/// for a cache than for the exchange it saves is never right.
pub const SHARED_CACHE_MAX_TIMEOUT: Duration = Duration::from_secs(5);

// --- routes[].exchange ----------------------------------------------------------------------

/// `routes[].exchange.purge_on_upstream_status`: `[401]`. A 401 from the upstream says the
/// token it got is not (or no longer) good: revoked, rotated signing keys, an audience the
/// upstream stopped accepting. 403 is left out: it usually means the caller may not, and a new
/// token would say the same.
pub const PURGE_ON_UPSTREAM_STATUS: &[u16] = &[401];
