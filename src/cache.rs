//! The exchanged-token cache.
//!
//! Keys are SHA-256 digests over (exchange profile, subject token, actor identity): a raw token
//! or secret is never a key, and two routes with different audiences or two callers never share
//! an entry. Each entry lives `min(expires_in, issued exp, subject exp) − skew` (DESIGN.md step
//! 5). Concurrent misses for one key run one exchange and share its result (moka's
//! `or_try_insert_with`); failures are returned to every waiter and not cached.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use moka::Expiry;
use moka::future::Cache;
use sha2::{Digest, Sha256};

use crate::config::{CacheSettings, ExchangeProfile};
use crate::exchange::{ExchangeError, ExchangedToken};

/// A cache key: a digest, never a token.
pub type CacheKey = [u8; 32];

/// A cached exchange result, ready to forward.
pub struct CachedToken {
    /// `Bearer <token>`, built once, marked sensitive so it never prints.
    pub authorization: HeaderValue,
    /// How long the entry may be served from the cache.
    pub ttl: Duration,
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

impl Expiry<CacheKey, Arc<CachedToken>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedToken>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The bounded token cache shared by all requests.
pub struct TokenCache {
    entries: Cache<CacheKey, Arc<CachedToken>>,
    skew: Duration,
    default_ttl: Duration,
}

impl TokenCache {
    /// Builds the cache from `cache:` settings; called once at start.
    pub fn new(settings: &CacheSettings) -> Self {
        TokenCache {
            entries: Cache::builder()
                .max_capacity(settings.max_entries)
                .expire_after(PerEntryTtl)
                .build(),
            skew: settings.expiry_skew,
            default_ttl: settings.default_ttl,
        }
    }

    /// The key for `subject_token` under `profile`, with an optional actor identity.
    pub fn key(profile: &ExchangeProfile, subject_token: &str, actor: Option<&[u8]>) -> CacheKey {
        let mut h = Sha256::new();
        h.update(profile.key_prefix);
        h.update((subject_token.len() as u64).to_be_bytes());
        h.update(subject_token.as_bytes());
        match actor {
            Some(actor) => {
                h.update([1]);
                h.update((actor.len() as u64).to_be_bytes());
                h.update(actor);
            }
            None => h.update([0]),
        }
        h.finalize().into()
    }

    /// Returns the cached token for `key`, or runs `exchange` (once for all concurrent callers
    /// of the same key) and caches its result for the computed lifetime.
    pub async fn get_or_exchange<F>(
        &self,
        key: CacheKey,
        subject_token: &str,
        exchange: F,
    ) -> (Result<Arc<CachedToken>, ExchangeError>, Lookup)
    where
        F: Future<Output = Result<ExchangedToken, ExchangeError>>,
    {
        if let Some(token) = self.entries.get(&key).await {
            return (Ok(token), Lookup::Hit);
        }
        let ran = AtomicBool::new(false);
        let subject_exp = crate::jwt::unverified_exp(subject_token);
        let init = async {
            ran.store(true, Ordering::Relaxed);
            let issued = exchange.await?;
            self.to_cached(issued, subject_exp)
        };
        let result = self.entries.entry(key).or_try_insert_with(init).await;
        let lookup = if ran.load(Ordering::Relaxed) {
            Lookup::Miss
        } else {
            Lookup::Coalesced
        };
        match result {
            Ok(entry) => (Ok(entry.into_value()), lookup),
            Err(shared) => (Err((*shared).clone()), lookup),
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
            self.skew,
            self.default_ttl,
        );
        let mut authorization = HeaderValue::try_from(format!("Bearer {}", issued.access_token))
            .map_err(|_| ExchangeError::BadResponse("access_token is not header-safe".into()))?;
        authorization.set_sensitive(true);
        Ok(Arc::new(CachedToken { authorization, ttl }))
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

/// The lifetime of a cache entry: the earliest of the STS's `expires_in`, the issued token's
/// `exp` and the subject token's `exp`, minus `skew`. `default_ttl` stands in when the STS says
/// nothing about the issued token's lifetime. Zero means "use once, do not cache".
pub fn entry_ttl(
    now: u64,
    expires_in: Option<Duration>,
    issued_exp: Option<u64>,
    subject_exp: Option<u64>,
    skew: Duration,
    default_ttl: Duration,
) -> Duration {
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
    bound.saturating_sub(skew)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn ttl_is_the_earliest_bound_minus_skew() {
        assert_eq!(
            entry_ttl(1000, Some(S(300)), None, None, S(30), S(60)),
            S(270)
        );
        assert_eq!(
            entry_ttl(1000, Some(S(300)), Some(1100), None, S(30), S(60)),
            S(70)
        );
        assert_eq!(
            entry_ttl(1000, Some(S(300)), Some(2000), Some(1050), S(30), S(60)),
            S(20)
        );
    }

    #[test]
    fn default_ttl_applies_only_without_lifetime_information() {
        assert_eq!(entry_ttl(1000, None, None, None, S(0), S(60)), S(60));
        assert_eq!(entry_ttl(1000, None, None, Some(1010), S(0), S(60)), S(10));
        assert_eq!(entry_ttl(1000, None, Some(1500), None, S(0), S(60)), S(500));
    }

    #[test]
    fn expired_or_short_tokens_are_not_cached() {
        assert_eq!(entry_ttl(1000, Some(S(10)), None, None, S(30), S(60)), S(0));
        assert_eq!(
            entry_ttl(1000, Some(S(300)), None, Some(900), S(0), S(60)),
            S(0)
        );
    }
}
