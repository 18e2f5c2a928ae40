//! The exchanged-token cache.
//!
//! Keys are SHA-256 digests over (exchange profile, subject token, actor identity): a raw token
//! or secret is never a key, and two routes with different audiences or two callers never share
//! an entry. Each entry lives `min(expires_in, issued exp, subject exp) − skew` (DESIGN.md step
//! 5), `default_ttl − skew` when the STS gives no lifetime at all, and never longer than
//! `max_ttl`: a token the STS calls eternal is still re-exchanged daily by default. Concurrent
//! misses for one key run one exchange and share its result (moka's `or_try_insert_with`).
//! Definitive rejections of the caller's token are remembered briefly (negative caching);
//! outages, timeouts, our own credential problems and refused answers never are. An entry
//! past `refresh_ahead` of its lifetime is re-exchanged once in the background while it keeps
//! being served, so busy callers never wait on the STS at expiry.
//!
//! With `cache.shared`, a second level in Redis ([`shared`]) sits between a local miss and the
//! STS: replicas share exchanged tokens and rejections, and one replica exchanges a key while
//! the others wait for its result.

pub mod seal;
pub mod shared;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use moka::Expiry;
use moka::future::Cache;
use sha2::{Digest, Sha256};

use crate::config::{CacheSettings, ConfigProblem, ExchangeSettings};
use crate::exchange::actor::Actor;
use crate::exchange::{ExchangeError, ExchangedToken, OAuthErrorCode};
use crate::metrics::Metrics;
use crate::token::TokenDigest;
use shared::{Found, Lease, SharedCache};

/// A cache key: digests only, never a token. Compared whole (moka checks equality after its
/// hash), so two requests share an entry only when profile, subject token and actor are the
/// same, short of a SHA-256 collision; and building one hashes nothing beyond the token's own
/// digest, which the request computes once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// The exchange profile's digest ([`ExchangeSettings::key_prefix`]).
    profile: [u8; 32],
    /// SHA-256 of the subject token; zero for a profile's own token.
    subject: TokenDigest,
    /// SHA-256 of the actor's identity; zero without an actor.
    actor: [u8; 32],
}

impl CacheKey {
    /// One digest of the whole key, for forms stored outside this process.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.profile);
        h.update(self.subject);
        h.update(self.actor);
        h.finalize().into()
    }
}

/// A cached exchange result, ready to forward.
pub struct CachedToken {
    /// `Bearer <token>`, built once, marked sensitive so it never prints.
    pub authorization: HeaderValue,
    /// How long the entry may be served from the cache.
    pub ttl: Duration,
    created: Instant,
    /// Set once a background refresh has been started for this entry.
    refreshing: AtomicBool,
    /// The token as a delegation's actor, derived on first use (the gateway's own token).
    actor: OnceLock<Arc<Actor>>,
}

impl CachedToken {
    /// The token itself (the header value without `Bearer `).
    pub fn token(&self) -> &str {
        self.authorization
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
    }

    /// The token as an actor: claims and identity derived once per cached token, not per
    /// delegated request.
    pub fn actor(&self) -> Arc<Actor> {
        self.actor
            .get_or_init(|| Arc::new(Actor::new(Arc::from(self.token()))))
            .clone()
    }
}

/// What an entry holds: a token, or a remembered definitive rejection.
#[derive(Clone)]
enum CacheValue {
    Token(Arc<CachedToken>),
    Rejected(Arc<(ExchangeError, Duration)>),
}

impl CacheValue {
    fn into_result(self) -> Result<Arc<CachedToken>, ExchangeError> {
        match self {
            CacheValue::Token(token) => Ok(token),
            CacheValue::Rejected(rejection) => Err(rejection.0.clone()),
        }
    }
}

/// How a lookup was answered; the `result` label of `txgate_token_cache_lookups_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    /// This request ran the exchange.
    Miss,
    /// Another request's exchange for the same key answered this one.
    Coalesced,
}

impl Lookup {
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
            Lookup::Coalesced => "coalesced",
        }
    }
}

struct PerEntryTtl;

impl Expiry<CacheKey, CacheValue> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &CacheValue,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(match value {
            CacheValue::Token(token) => token.ttl,
            CacheValue::Rejected(rejection) => rejection.1,
        })
    }

    fn expire_after_update(
        &self,
        key: &CacheKey,
        value: &CacheValue,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        // A refreshed entry starts a lifetime of its own.
        self.expire_after_create(key, value, updated_at)
    }
}

/// The bounded token cache shared by all requests.
pub struct TokenCache {
    entries: Cache<CacheKey, CacheValue>,
    skew: Duration,
    default_ttl: Duration,
    max_ttl: Duration,
    negative_ttl: Duration,
    refresh_ahead: f64,
    /// The level shared by replicas, when `cache.shared` is set.
    shared: Option<Arc<SharedCache>>,
}

impl TokenCache {
    /// Builds the local cache from `cache:` settings, without the shared level.
    pub fn new(settings: &CacheSettings) -> Self {
        TokenCache {
            shared: None,
            entries: Cache::builder()
                .max_capacity(settings.max_entries)
                .expire_after(PerEntryTtl)
                .build(),
            skew: settings.expiry_skew,
            default_ttl: settings.default_ttl,
            max_ttl: settings.max_ttl,
            negative_ttl: settings.negative_ttl,
            refresh_ahead: settings.refresh_ahead,
        }
    }

    /// Builds the cache with its shared level when `cache.shared` is set (the Redis client,
    /// not yet connected: see [`TokenCache::start`]); called once at start. The error names
    /// the `cache.shared` key at fault.
    pub fn build(settings: &CacheSettings, metrics: &Metrics) -> Result<Self, ConfigProblem> {
        let shared = match &settings.shared {
            Some(shared) => Some(Arc::new(SharedCache::new(shared, metrics)?)),
            None => None,
        };
        Ok(TokenCache {
            shared,
            ..TokenCache::new(settings)
        })
    }

    /// Connects the shared level (once; later calls do nothing). Called on a tokio runtime when
    /// the proxy starts.
    pub fn start(&self) {
        if let Some(shared) = &self.shared {
            shared.start();
        }
    }

    /// The shared level's state, for the status page; `None` without `cache.shared`.
    pub fn shared_status(&self) -> Option<shared::SharedStatus> {
        self.shared.as_ref().map(|s| s.status())
    }

    /// The key for a subject token, given as its SHA-256 (`crate::token::digest`, computed
    /// once per request), under `profile`, with the digest of an actor's identity.
    pub fn key(
        profile: &ExchangeSettings,
        subject: &TokenDigest,
        actor: Option<&[u8; 32]>,
    ) -> CacheKey {
        CacheKey {
            profile: profile.key_prefix,
            subject: *subject,
            actor: actor.copied().unwrap_or([0; 32]),
        }
    }

    /// The key of a profile's own token (client credentials: no subject, no actor): the
    /// profile's digest itself, computed at load, so machine routes and delegation actors hash
    /// nothing per request.
    pub fn machine_key(profile: &ExchangeSettings) -> CacheKey {
        CacheKey {
            profile: profile.key_prefix,
            subject: [0; 32],
            actor: [0; 32],
        }
    }

    /// Returns the cached token (or remembered rejection) for `key`, or runs `exchange` (once
    /// for all concurrent callers of the same key) and caches its result. With a shared level,
    /// a local miss asks it first; `lease` is the longest `exchange` can take, which is how
    /// long other replicas wait for its result.
    pub async fn get_or_exchange<F>(
        &self,
        key: CacheKey,
        subject_token: &str,
        lease: Duration,
        exchange: F,
    ) -> (Result<Arc<CachedToken>, ExchangeError>, Lookup)
    where
        F: Future<Output = Result<ExchangedToken, ExchangeError>>,
    {
        if let Some(value) = self.entries.get(&key).await {
            return (value.into_result(), Lookup::Hit);
        }
        let ran = AtomicBool::new(false);
        let subject_exp = crate::jwt::unverified_exp(subject_token);
        let init = async {
            ran.store(true, Ordering::Relaxed);
            match &self.shared {
                None => self.value_of(exchange.await, subject_exp),
                // Boxed: the Redis round trips' state is large, and inline it would grow the
                // future of every request, hits included, which pingora moves on each poll.
                Some(shared) => {
                    Box::pin(self.through_shared(shared, key, lease, subject_exp, exchange)).await
                }
            }
        };
        let result = self.entries.entry(key).or_try_insert_with(init).await;
        let lookup = if ran.load(Ordering::Relaxed) {
            Lookup::Miss
        } else {
            Lookup::Coalesced
        };
        match result {
            Ok(entry) => (entry.into_value().into_result(), lookup),
            Err(shared) => (Err((*shared).clone()), lookup),
        }
    }

    /// A local miss with a shared level: its entry, or the result of another replica's
    /// exchange (waited for under its lease), or this replica's own exchange, stored there.
    async fn through_shared<F>(
        &self,
        shared: &SharedCache,
        key: CacheKey,
        lease: Duration,
        subject_exp: Option<u64>,
        exchange: F,
    ) -> Result<CacheValue, ExchangeError>
    where
        F: Future<Output = Result<ExchangedToken, ExchangeError>>,
    {
        let held = match shared.lookup(&key).await {
            Found::Entry(entry) => {
                if let Some(value) = Self::local_value(entry) {
                    return Ok(value);
                }
                None
            }
            // Redis is not answering: no lease, no waiting.
            Found::Unavailable => return self.value_of(exchange.await, subject_exp),
            Found::Miss => match shared.lease(&key, lease).await {
                Lease::Taken(id) => Some(id),
                Lease::HeldElsewhere => match shared.wait(&key, lease).await {
                    Some(entry) => match Self::local_value(entry) {
                        Some(value) => return Ok(value),
                        None => None,
                    },
                    None => None,
                },
                Lease::Unavailable => None,
            },
        };
        let value = self.value_of(exchange.await, subject_exp);
        match &value {
            Ok(CacheValue::Token(token)) => {
                let entry = shared::Entry::Token {
                    token: token.token().to_string(),
                    ttl: token.ttl,
                };
                shared.store(&key, &entry, held).await;
            }
            Ok(CacheValue::Rejected(rejection)) => match rejection.0.rejected_code() {
                Some(code) => {
                    let entry = shared::Entry::Rejected {
                        code,
                        ttl: rejection.1,
                    };
                    shared.store(&key, &entry, held).await;
                }
                None => {
                    if let Some(id) = held {
                        shared.release(&key, id).await;
                    }
                }
            },
            Err(_) => {
                if let Some(id) = held {
                    shared.release(&key, id).await;
                }
            }
        }
        value
    }

    /// A shared entry as a local one; `None` for a token that cannot be a header value.
    fn local_value(entry: shared::Entry) -> Option<CacheValue> {
        match entry {
            shared::Entry::Token { token, ttl } => {
                let mut authorization = HeaderValue::try_from(format!("Bearer {token}")).ok()?;
                authorization.set_sensitive(true);
                Some(CacheValue::Token(Arc::new(CachedToken {
                    authorization,
                    ttl,
                    created: Instant::now(),
                    refreshing: AtomicBool::new(false),
                    actor: OnceLock::new(),
                })))
            }
            shared::Entry::Rejected { code, ttl } => {
                let error = match code {
                    OAuthErrorCode::InvalidTarget => ExchangeError::Forbidden { code },
                    _ => ExchangeError::SubjectRejected { code },
                };
                Some(CacheValue::Rejected(Arc::new((error, ttl))))
            }
        }
    }

    /// Drops the entry for `key` from both levels if it still holds the token `sent` (the
    /// upstream rejected it): a token another request has already replaced stays. Returns
    /// whether anything was dropped locally.
    pub async fn purge(&self, key: CacheKey, sent: &HeaderValue) -> bool {
        let local = match self.entries.get(&key).await {
            Some(CacheValue::Token(token)) if token.authorization == *sent => {
                self.entries.invalidate(&key).await;
                true
            }
            _ => false,
        };
        if let Some(shared) = &self.shared {
            shared.purge(&key).await;
        }
        local
    }

    /// What to store for an exchange outcome: the token, a remembered rejection, or nothing.
    fn value_of(
        &self,
        outcome: Result<ExchangedToken, ExchangeError>,
        subject_exp: Option<u64>,
    ) -> Result<CacheValue, ExchangeError> {
        match outcome {
            Ok(issued) => Ok(CacheValue::Token(self.to_cached(issued, subject_exp)?)),
            Err(e) if e.is_definitive() && !self.negative_ttl.is_zero() => {
                Ok(CacheValue::Rejected(Arc::new((e, self.negative_ttl))))
            }
            Err(e) => Err(e),
        }
    }

    /// True once per entry, when it has lived `refresh_ahead` of its lifetime: the caller then
    /// starts a background [`refresh`](Self::refresh).
    pub fn refresh_due(&self, token: &CachedToken) -> bool {
        self.refresh_ahead < 1.0
            && !token.ttl.is_zero()
            && token.created.elapsed() >= token.ttl.mul_f64(self.refresh_ahead)
            && !token.refreshing.swap(true, Ordering::AcqRel)
    }

    /// Re-exchanges in the background and replaces the entry on success; on failure the
    /// current token keeps being served until it expires.
    pub async fn refresh<F>(&self, key: CacheKey, subject_token: &str, exchange: F)
    where
        F: Future<Output = Result<ExchangedToken, ExchangeError>>,
    {
        let subject_exp = crate::jwt::unverified_exp(subject_token);
        match exchange
            .await
            .and_then(|issued| self.to_cached(issued, subject_exp))
        {
            Ok(token) => {
                if let Some(shared) = &self.shared {
                    let entry = shared::Entry::Token {
                        token: token.token().to_string(),
                        ttl: token.ttl,
                    };
                    shared.store(&key, &entry, None).await;
                }
                self.entries.insert(key, CacheValue::Token(token)).await
            }
            Err(e) => {
                tracing::debug!(error = %e, "background refresh failed; serving the cached token until it expires")
            }
        }
    }

    fn to_cached(
        &self,
        issued: ExchangedToken,
        subject_exp: Option<u64>,
    ) -> Result<Arc<CachedToken>, ExchangeError> {
        let ttl = entry_ttl(
            now_unix(),
            issued.expires_in,
            crate::jwt::unverified_exp(&issued.access_token),
            subject_exp,
            Lifetimes {
                skew: self.skew,
                default_ttl: self.default_ttl,
                max_ttl: self.max_ttl,
            },
        );
        let mut authorization = HeaderValue::try_from(format!("Bearer {}", issued.access_token))
            .map_err(|_| ExchangeError::BadResponse("access_token is not header-safe".into()))?;
        authorization.set_sensitive(true);
        Ok(Arc::new(CachedToken {
            authorization,
            ttl,
            created: Instant::now(),
            refreshing: AtomicBool::new(false),
            actor: OnceLock::new(),
        }))
    }

    /// Entries currently held (approximate until pending maintenance runs).
    pub async fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks().await;
        self.entries.entry_count()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The `cache:` durations that bound an entry's lifetime.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// Dropped this long before the token expires.
    pub skew: Duration,
    /// Stands in when the STS says nothing about the issued token's lifetime.
    pub default_ttl: Duration,
    /// The ceiling of every lifetime.
    pub max_ttl: Duration,
}

/// The lifetime of a cache entry: the earliest of the STS's `expires_in`, the issued token's
/// `exp` and the subject token's `exp`, minus `skew`, and at most `max_ttl`. `default_ttl`
/// stands in when the STS says nothing about the issued token's lifetime. Zero means "use
/// once, do not cache".
pub fn entry_ttl(
    now: u64,
    expires_in: Option<Duration>,
    issued_exp: Option<u64>,
    subject_exp: Option<u64>,
    limits: Lifetimes,
) -> Duration {
    let Lifetimes {
        skew,
        default_ttl,
        max_ttl,
    } = limits;
    let until = |exp: u64| Duration::from_secs(exp.saturating_sub(now));
    let issued_bound = match (expires_in, issued_exp) {
        (Some(e), Some(x)) => e.min(until(x)),
        (Some(e), None) => e,
        (None, Some(x)) => until(x),
        (None, None) => default_ttl,
    };
    let bound = match subject_exp {
        Some(x) => issued_bound.min(until(x)),
        None => issued_bound,
    };
    bound.saturating_sub(skew).min(max_ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn limits(skew: u64, default_ttl: u64) -> Lifetimes {
        Lifetimes {
            skew: S(skew),
            default_ttl: S(default_ttl),
            max_ttl: DAY,
        }
    }

    #[test]
    fn ttl_is_the_earliest_bound_minus_skew() {
        assert_eq!(
            entry_ttl(1000, Some(S(300)), None, None, limits(30, 60)),
            S(270)
        );
        assert_eq!(
            entry_ttl(1000, Some(S(300)), Some(1100), None, limits(30, 60)),
            S(70)
        );
        assert_eq!(
            entry_ttl(1000, Some(S(300)), Some(2000), Some(1050), limits(30, 60)),
            S(20)
        );
    }

    #[test]
    fn default_ttl_applies_only_without_lifetime_information() {
        assert_eq!(entry_ttl(1000, None, None, None, limits(0, 60)), S(60));
        // The skew applies to the default too.
        assert_eq!(entry_ttl(1000, None, None, None, limits(30, 60)), S(30));
        // The subject's own expiry still bounds it.
        assert_eq!(
            entry_ttl(1000, None, None, Some(1010), limits(0, 60)),
            S(10)
        );
        assert_eq!(
            entry_ttl(1000, None, Some(1500), None, limits(0, 60)),
            S(500)
        );
    }

    #[test]
    fn no_entry_outlives_max_ttl() {
        let capped = Lifetimes {
            max_ttl: S(3600),
            ..limits(30, 60)
        };
        // A year-long expires_in and exp, from the STS and in the issued token.
        let year = 365 * 24 * 3600;
        assert_eq!(entry_ttl(1000, Some(S(year)), None, None, capped), S(3600));
        assert_eq!(
            entry_ttl(1000, None, Some(1000 + year), None, capped),
            S(3600)
        );
        assert_eq!(
            entry_ttl(
                1000,
                Some(S(year)),
                Some(1000 + year),
                Some(1000 + year),
                capped
            ),
            S(3600)
        );
        // Shorter lifetimes are untouched.
        assert_eq!(entry_ttl(1000, Some(S(300)), None, None, capped), S(270));
        // The default day-long ceiling.
        assert_eq!(
            entry_ttl(1000, None, Some(u64::MAX), None, limits(30, 60)),
            DAY
        );
    }

    #[test]
    fn expired_or_short_tokens_are_not_cached() {
        assert_eq!(
            entry_ttl(1000, Some(S(10)), None, None, limits(30, 60)),
            S(0)
        );
        assert_eq!(
            entry_ttl(1000, Some(S(300)), None, Some(900), limits(0, 60)),
            S(0)
        );
    }

    fn cache(default_ttl: u64, max_ttl: u64) -> TokenCache {
        TokenCache::new(&CacheSettings {
            max_entries: 100,
            expiry_skew: S(0),
            default_ttl: S(default_ttl),
            max_ttl: S(max_ttl),
            negative_ttl: S(5),
            refresh_ahead: 1.0,
            shared: None,
        })
    }

    fn issued(token: &str, expires_in: Option<Duration>) -> ExchangedToken {
        ExchangedToken {
            access_token: token.into(),
            expires_in,
            issued_token_type: None,
        }
    }

    #[test]
    fn cached_entries_get_the_default_ttl_and_the_ceiling() {
        // An opaque token and no expires_in: the STS said nothing, so default_ttl applies.
        let cache = cache(90, 600);
        let entry = cache.to_cached(issued("opaque-1", None), None).unwrap();
        assert_eq!(entry.ttl, S(90));
        // A JWT whose exp is a year away, and a huge expires_in: capped at max_ttl.
        let far = now_unix() + 365 * 24 * 3600;
        let payload = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            format!("{{\"exp\":{far}}}"),
        );
        let jwt = format!("eyJhbGciOiJFUzI1NiJ9.{payload}.c2ln");
        let entry = cache.to_cached(issued(&jwt, Some(DAY)), None).unwrap();
        assert_eq!(entry.ttl, S(600));
    }

    #[tokio::test]
    async fn refused_sts_answers_are_never_cached() {
        let cache = cache(60, 600);
        let key = CacheKey {
            profile: [7; 32],
            subject: [8; 32],
            actor: [0; 32],
        };
        for refused in [
            ExchangeError::EchoedInputToken,
            ExchangeError::UnexpectedTokenType {
                requested: "a".into(),
                issued: "b".into(),
            },
        ] {
            let (result, lookup) = cache
                .get_or_exchange(key, "subject", S(1), async { Err(refused.clone()) })
                .await;
            assert!(result.is_err());
            assert_eq!(lookup, Lookup::Miss);
            // The next lookup asks again: nothing was remembered.
            let (result, lookup) = cache
                .get_or_exchange(key, "subject", S(1), async { Ok(issued("fresh", None)) })
                .await;
            assert_eq!(result.unwrap().token(), "fresh");
            assert_eq!(lookup, Lookup::Miss);
            cache.entries.invalidate(&key).await;
        }
    }
}
