//! The shared cache level: exchanged tokens (and definitive rejections) in Redis, so replicas
//! behind one Service exchange a caller's token once between them instead of once each.
//!
//! It sits behind the local cache: it is asked only on a local miss, by the one request of this
//! replica that runs the key's exchange (the local single-flight). On a shared miss that request
//! takes a short lease on the key (`SET NX PX`), so only one replica calls the STS; the others
//! poll the key until the value arrives, the lease is given up, or the lease's time is over,
//! and then exchange alone. Keys are the local cache's SHA-256 digests under `key_prefix`;
//! values are sealed ([`super::seal`]), so nothing in Redis reads as a token.
//!
//! Redis is never in the way: every operation is bounded by `cache.shared.timeout`, a breaker
//! stops asking after [`FAILURE_THRESHOLD`] failures in a row for [`OPEN_FOR`], and every
//! failure reads as "not there", so the request goes on with the STS. A replica that cannot
//! reach Redis at start logs an error naming `cache.shared.url` (or `cache.shared.password`
//! when Redis refuses the credentials) and starts anyway.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pingora_prometheus::prometheus::{IntCounter, IntGauge};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, IntoConnectionInfo, Pipeline};
use serde::{Deserialize, Serialize};

use super::CacheKey;
use super::seal::Sealer;
use crate::config::{ConfigProblem, SharedCacheSettings};
use crate::exchange::OAuthErrorCode;
use crate::metrics::Metrics;

/// Failed operations in a row that open the breaker: three, so one lost packet does not turn
/// the level off, while a Redis that is down costs at most three timeouts before it is skipped.
pub const FAILURE_THRESHOLD: u32 = 3;
/// How long an open breaker skips Redis: 5 s, then the next operation is tried again (one more
/// failure opens it again at once).
pub const OPEN_FOR: Duration = Duration::from_secs(5);
/// Connecting (TCP, TLS and `AUTH`) may take longer than one operation: 2 s. Operations do not
/// wait for it beyond `timeout`; they are skipped while it runs.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a waiting replica looks at the key: from 5 ms, doubling up to 50 ms.
const FIRST_POLL: Duration = Duration::from_millis(5);
const MAX_POLL: Duration = Duration::from_millis(50);

/// Deletes a lease only if it is still the holder's: a lease that expired and was taken by
/// another replica is not removed by the late first holder.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// The Redis key of a cache key: the prefix and the key's one digest in hex. Never a token.
pub fn redis_key(prefix: &str, key: &CacheKey) -> String {
    format!("{prefix}{}", hex::encode(key.digest()))
}

/// The Redis key of the lease on a cache key.
pub fn lease_key(prefix: &str, key: &CacheKey) -> String {
    format!("{prefix}lease:{}", hex::encode(key.digest()))
}

/// What the shared level holds for a key, opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// An exchanged token and how much longer it may be used.
    Token { token: String, ttl: Duration },
    /// A definitive rejection (`invalid_grant`, `invalid_request`, `invalid_target`).
    Rejected { code: OAuthErrorCode, ttl: Duration },
}

/// The answer of a lookup.
#[derive(Debug)]
pub enum Found {
    Entry(Entry),
    /// Nothing usable is stored (also: a value that does not open).
    Miss,
    /// Redis was not asked or did not answer; the caller goes on alone.
    Unavailable,
}

/// The answer to taking a lease.
#[derive(Debug)]
pub enum Lease {
    /// This replica exchanges; the lease is released when the value is stored.
    Taken(LeaseId),
    /// Another replica is exchanging this key.
    HeldElsewhere,
    /// Redis was not asked or did not answer.
    Unavailable,
}

/// The random value a lease holds, so only its holder releases it.
#[derive(Debug, Clone, Copy)]
pub struct LeaseId(u64);

/// The plaintext of a value before it is sealed. `x` is the absolute expiry (Unix ms): the TTL
/// in Redis could be extended by whoever writes there, the sealed expiry cannot.
#[derive(Serialize, Deserialize)]
struct Stored {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<String>,
    x: u64,
}

/// Why an operation did not give an answer.
enum Failed {
    /// Not asked: no connection yet, or the breaker is open.
    Bypassed,
    /// Asked, and it failed or timed out.
    Error,
}

/// The operations, as the `operation` label of `txgate_shared_cache_errors_total` counts them.
#[derive(Clone, Copy)]
enum Operation {
    Get,
    Lease,
    Wait,
    Store,
    Purge,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Get => "get",
            Operation::Lease => "lease",
            Operation::Wait => "wait",
            Operation::Store => "store",
            Operation::Purge => "purge",
        }
    }
}

/// Metric handles, resolved once.
struct Counters {
    hit: IntCounter,
    miss: IntCounter,
    unreadable: IntCounter,
    error: IntCounter,
    bypassed: IntCounter,
    filled: IntCounter,
    alone: IntCounter,
    errors: [IntCounter; 5],
    circuit_open: IntGauge,
}

impl Counters {
    fn new(metrics: &Metrics) -> Counters {
        let lookup = |r: &str| metrics.shared_lookups.with_label_values(&[r]);
        let error = |op: Operation| metrics.shared_errors.with_label_values(&[op.as_str()]);
        Counters {
            hit: lookup("hit"),
            miss: lookup("miss"),
            unreadable: lookup("unreadable"),
            error: lookup("error"),
            bypassed: lookup("bypassed"),
            filled: metrics.shared_lease_waits.with_label_values(&["filled"]),
            alone: metrics.shared_lease_waits.with_label_values(&["alone"]),
            errors: [
                error(Operation::Get),
                error(Operation::Lease),
                error(Operation::Wait),
                error(Operation::Store),
                error(Operation::Purge),
            ],
            circuit_open: metrics.shared_circuit_open.clone(),
        }
    }
}

/// Consecutive failures open it for [`OPEN_FOR`]; any success closes it.
struct Breaker {
    base: Instant,
    failures: AtomicU32,
    /// Milliseconds after `base` until which Redis is not asked.
    open_until: AtomicU64,
}

impl Breaker {
    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn allows(&self) -> bool {
        self.now() >= self.open_until.load(Ordering::Acquire)
    }

    fn is_open(&self) -> bool {
        !self.allows()
    }

    /// True when this success closed a breaker that had opened.
    fn success(&self) -> bool {
        self.failures.swap(0, Ordering::AcqRel) >= FAILURE_THRESHOLD
    }

    /// True when this failure opened the breaker.
    fn failure(&self) -> bool {
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if failures >= FAILURE_THRESHOLD && self.allows() {
            let until = self
                .now()
                .saturating_add(u64::try_from(OPEN_FOR.as_millis()).unwrap_or(u64::MAX));
            self.open_until.store(until, Ordering::Release);
            return true;
        }
        false
    }
}

/// How the shared level is doing, for the status page.
#[derive(Debug, Clone)]
pub struct SharedStatus {
    /// `cache.shared.url` (it holds no credentials).
    pub url: String,
    /// `connected`, `circuit open` or `not connected`.
    pub state: &'static str,
    /// The last failure, when the last operation failed.
    pub last_error: Option<String>,
}

/// The shared level: one Redis client, built once; connected when [`SharedCache::start`] runs.
pub struct SharedCache {
    client: redis::Client,
    connection: OnceLock<ConnectionManager>,
    started: AtomicBool,
    /// The last operation succeeded.
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
    sealer: Sealer,
    prefix: String,
    timeout: Duration,
    url: String,
    breaker: Breaker,
    counters: Counters,
}

impl SharedCache {
    /// Builds the client from `cache.shared` (no connection yet). The error names the key.
    pub fn new(
        settings: &SharedCacheSettings,
        metrics: &Metrics,
    ) -> Result<SharedCache, ConfigProblem> {
        let SharedCacheSettings {
            url,
            username,
            password,
            keys,
            key_prefix,
            timeout,
        } = settings;
        let mut info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| ConfigProblem::new("cache.shared.url", e.to_string()))?;
        let mut redis = info.redis_settings().clone();
        if let Some(user) = username {
            redis = redis.set_username(user);
        }
        if let Some(password) = password {
            redis = redis.set_password(password.expose());
        }
        info = info.set_redis_settings(redis);
        let client = redis::Client::open(info)
            .map_err(|e| ConfigProblem::new("cache.shared.url", e.to_string()))?;
        let sealer = Sealer::new(keys).ok_or_else(|| {
            ConfigProblem::new("cache.shared.encryption_key_file", "no usable key")
        })?;
        Ok(SharedCache {
            client,
            connection: OnceLock::new(),
            started: AtomicBool::new(false),
            healthy: AtomicBool::new(false),
            last_error: Mutex::new(None),
            sealer,
            prefix: key_prefix.clone(),
            timeout: *timeout,
            url: url.to_string(),
            breaker: Breaker {
                base: Instant::now(),
                failures: AtomicU32::new(0),
                open_until: AtomicU64::new(0),
            },
            counters: Counters::new(metrics),
        })
    }

    /// Creates the connection (it reconnects by itself) and checks it once in the background,
    /// logging what is wrong. Called on a tokio runtime when the proxy starts; later calls do
    /// nothing.
    pub fn start(self: &std::sync::Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1));
        match ConnectionManager::new_lazy_with_config(self.client.clone(), config) {
            Ok(manager) => {
                let _ = self.connection.set(manager);
            }
            Err(e) => {
                tracing::error!(url = %self.url, error = %e, "cache.shared.url: cannot set up the Redis connection; this replica goes on without the shared cache level");
                self.note_error(e.to_string());
                return;
            }
        }
        let shared = self.clone();
        tokio::spawn(async move { shared.check_at_start().await });
    }

    /// One `PING` at start, so a wrong address, password or certificate is reported at once,
    /// not at the first request.
    async fn check_at_start(&self) {
        let Some(manager) = self.connection.get() else {
            return;
        };
        let mut connection = manager.clone();
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut connection);
        match tokio::time::timeout(CONNECT_TIMEOUT, ping).await {
            Ok(Ok(_)) => {
                self.healthy.store(true, Ordering::Release);
                tracing::info!(url = %self.url, "shared cache level connected");
            }
            Ok(Err(e)) => {
                let refused = e.kind() == redis::ErrorKind::AuthenticationFailed
                    || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"));
                let key = if refused {
                    "cache.shared.password"
                } else {
                    "cache.shared.url"
                };
                tracing::error!(
                    url = %self.url,
                    error = %e,
                    "{key}: Redis {}; this replica goes on with its own cache and the STS until Redis answers",
                    if refused { "refused the credentials" } else { "cannot be used" }
                );
                self.note_error(e.to_string());
            }
            Err(_) => {
                tracing::error!(
                    url = %self.url,
                    "cache.shared.url: Redis did not answer within {CONNECT_TIMEOUT:?}; this replica goes on with its own cache and the STS until Redis answers"
                );
                self.note_error(format!("no answer within {CONNECT_TIMEOUT:?}"));
            }
        }
    }

    fn note_error(&self, error: String) {
        self.healthy.store(false, Ordering::Release);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error);
        }
    }

    /// The level's state now, for the status page.
    pub fn status(&self) -> SharedStatus {
        let state = if self.breaker.is_open() {
            "circuit open"
        } else if self.healthy.load(Ordering::Acquire) {
            "connected"
        } else {
            "not connected"
        };
        let last_error = if self.healthy.load(Ordering::Acquire) {
            None
        } else {
            self.last_error.lock().ok().and_then(|e| e.clone())
        };
        SharedStatus {
            url: self.url.clone(),
            state,
            last_error,
        }
    }

    /// Runs `pipe` within `timeout`, through the breaker, counting failures.
    async fn query<T: FromRedisValue>(&self, op: Operation, pipe: &Pipeline) -> Result<T, Failed> {
        let Some(manager) = self.connection.get() else {
            return Err(Failed::Bypassed);
        };
        if !self.breaker.allows() {
            return Err(Failed::Bypassed);
        }
        let mut connection = manager.clone();
        let error = match tokio::time::timeout(self.timeout, pipe.query_async::<T>(&mut connection))
            .await
        {
            Ok(Ok(value)) => {
                self.healthy.store(true, Ordering::Release);
                if self.breaker.success() {
                    self.counters.circuit_open.set(0);
                    tracing::info!(url = %self.url, "shared cache level answers again");
                }
                return Ok(value);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        self.counters.errors[op as usize].inc();
        if self.breaker.failure() {
            self.counters.circuit_open.set(1);
            tracing::warn!(
                url = %self.url,
                error = %error,
                "shared cache level failing; not asked for {OPEN_FOR:?}, requests go on with the local cache and the STS"
            );
        }
        self.note_error(error);
        Err(Failed::Error)
    }

    /// The stored entry for `key`, opened. Counted in `txgate_shared_cache_lookups_total`.
    pub async fn lookup(&self, key: &CacheKey) -> Found {
        let rkey = redis_key(&self.prefix, key);
        let mut pipe = redis::pipe();
        pipe.get(&rkey).pttl(&rkey);
        match self
            .query::<(Option<Vec<u8>>, i64)>(Operation::Get, &pipe)
            .await
        {
            Err(Failed::Bypassed) => {
                self.counters.bypassed.inc();
                Found::Unavailable
            }
            Err(Failed::Error) => {
                self.counters.error.inc();
                Found::Unavailable
            }
            Ok((None, _)) => {
                self.counters.miss.inc();
                Found::Miss
            }
            Ok((Some(sealed), pttl)) => match self.open(&rkey, &sealed, pttl) {
                Opened::Entry(entry) => {
                    self.counters.hit.inc();
                    Found::Entry(entry)
                }
                Opened::Expired => {
                    self.counters.miss.inc();
                    Found::Miss
                }
                Opened::Unreadable => {
                    self.counters.unreadable.inc();
                    Found::Miss
                }
            },
        }
    }

    /// Takes the lease on `key` for `ttl` (the longest the exchange can take).
    pub async fn lease(&self, key: &CacheKey, ttl: Duration) -> Lease {
        let id = rand::random::<u64>();
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(lease_key(&self.prefix, key))
            .arg(id)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl).max(1));
        match self
            .query::<(Option<String>,)>(Operation::Lease, &pipe)
            .await
        {
            Ok((Some(_),)) => Lease::Taken(LeaseId(id)),
            Ok((None,)) => Lease::HeldElsewhere,
            Err(_) => Lease::Unavailable,
        }
    }

    /// Waits, at most `bound`, for the replica holding the lease on `key` to store its result.
    /// `None` when the wait ends without one: the lease was given up or ran out, or Redis
    /// stopped answering; the caller then exchanges alone.
    pub async fn wait(&self, key: &CacheKey, bound: Duration) -> Option<Entry> {
        let rkey = redis_key(&self.prefix, key);
        let lkey = lease_key(&self.prefix, key);
        let deadline = Instant::now() + bound;
        let mut every = FIRST_POLL;
        let found = loop {
            tokio::time::sleep(every).await;
            every = (every * 2).min(MAX_POLL);
            let mut pipe = redis::pipe();
            pipe.get(&rkey).pttl(&rkey).exists(&lkey);
            match self
                .query::<(Option<Vec<u8>>, i64, bool)>(Operation::Wait, &pipe)
                .await
            {
                Ok((Some(sealed), pttl, _)) => match self.open(&rkey, &sealed, pttl) {
                    Opened::Entry(entry) => break Some(entry),
                    Opened::Unreadable => {
                        self.counters.unreadable.inc();
                        break None;
                    }
                    Opened::Expired => break None,
                },
                Ok((None, _, true)) if Instant::now() < deadline => continue,
                Ok(_) | Err(_) => break None,
            }
        };
        match found {
            Some(_) => self.counters.filled.inc(),
            None => self.counters.alone.inc(),
        }
        found
    }

    /// Stores `entry` for `key` (for its ttl) and releases `lease` in one round trip. An entry
    /// too short to keep only releases the lease.
    pub async fn store(&self, key: &CacheKey, entry: &Entry, lease: Option<LeaseId>) {
        let rkey = redis_key(&self.prefix, key);
        let (stored, ttl) = match entry {
            Entry::Token { token, ttl } => (
                Stored {
                    t: Some(token.clone()),
                    r: None,
                    x: now_ms().saturating_add(millis(*ttl)),
                },
                *ttl,
            ),
            Entry::Rejected { code, ttl } => (
                Stored {
                    t: None,
                    r: Some(code.as_str().to_string()),
                    x: now_ms().saturating_add(millis(*ttl)),
                },
                *ttl,
            ),
        };
        let mut pipe = redis::pipe();
        if millis(ttl) > 0
            && let Some(sealed) = serde_json::to_vec(&stored)
                .ok()
                .and_then(|plain| self.sealer.seal(rkey.as_bytes(), &plain))
        {
            pipe.cmd("SET")
                .arg(&rkey)
                .arg(sealed)
                .arg("PX")
                .arg(millis(ttl))
                .ignore();
        }
        if let Some(LeaseId(id)) = lease {
            pipe.cmd("EVAL")
                .arg(RELEASE)
                .arg(1)
                .arg(lease_key(&self.prefix, key))
                .arg(id)
                .ignore();
        }
        if !pipe.is_empty() {
            let _ = self.query::<()>(Operation::Store, &pipe).await;
        }
    }

    /// Releases `lease` without storing anything (the exchange failed in a way not worth
    /// remembering), so the replicas waiting for it exchange at once.
    pub async fn release(&self, key: &CacheKey, lease: LeaseId) {
        let LeaseId(id) = lease;
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(lease_key(&self.prefix, key))
            .arg(id)
            .ignore();
        let _ = self.query::<()>(Operation::Store, &pipe).await;
    }

    /// Removes `key` (the upstream rejected its token).
    pub async fn purge(&self, key: &CacheKey) {
        let mut pipe = redis::pipe();
        pipe.del(redis_key(&self.prefix, key)).ignore();
        let _ = self.query::<()>(Operation::Purge, &pipe).await;
    }

    fn open(&self, rkey: &str, sealed: &[u8], pttl: i64) -> Opened {
        let Some(plain) = self.sealer.open(rkey.as_bytes(), sealed) else {
            return Opened::Unreadable;
        };
        let Ok(stored) = serde_json::from_slice::<Stored>(&plain) else {
            return Opened::Unreadable;
        };
        // The earlier of Redis's TTL (-1: none, -2: gone) and the sealed expiry.
        let sealed_left = stored.x.saturating_sub(now_ms());
        let left = match u64::try_from(pttl) {
            Ok(redis_left) => sealed_left.min(redis_left),
            Err(_) if pttl == -1 => sealed_left,
            Err(_) => 0,
        };
        if left == 0 {
            return Opened::Expired;
        }
        let ttl = Duration::from_millis(left);
        match (stored.t, stored.r) {
            (Some(token), None) if is_token_text(&token) => {
                Opened::Entry(Entry::Token { token, ttl })
            }
            (None, Some(code)) => match OAuthErrorCode::parse(&code) {
                Some(
                    code @ (OAuthErrorCode::InvalidGrant
                    | OAuthErrorCode::InvalidRequest
                    | OAuthErrorCode::InvalidTarget),
                ) => Opened::Entry(Entry::Rejected { code, ttl }),
                _ => Opened::Unreadable,
            },
            _ => Opened::Unreadable,
        }
    }
}

enum Opened {
    Entry(Entry),
    Expired,
    Unreadable,
}

/// A token that can be sent in a header: visible ASCII, not empty.
fn is_token_text(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_the_threshold_and_closes_on_success() {
        let b = Breaker {
            base: Instant::now(),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
        };
        for _ in 1..FAILURE_THRESHOLD {
            assert!(!b.failure());
            assert!(b.allows());
        }
        assert!(b.failure());
        assert!(b.is_open());
        // Time passes: it lets the next operation through; a success closes it.
        b.open_until.store(0, Ordering::Release);
        assert!(b.allows());
        assert!(b.success());
        assert!(!b.success());
    }

    #[test]
    fn keys_are_digests_under_the_prefix() {
        let key = CacheKey {
            profile: [0xab; 32],
            subject: [0xcd; 32],
            actor: [0; 32],
        };
        let rkey = redis_key("txgate:", &key);
        assert_eq!(rkey, format!("txgate:{}", hex::encode(key.digest())));
        assert_eq!(rkey.len(), "txgate:".len() + 64);
        assert!(lease_key("txgate:", &key).starts_with("txgate:lease:"));
        assert!(is_token_text("xt-1"));
        assert!(!is_token_text("a b"));
        assert!(!is_token_text(""));
    }
}
