//! `cache.shared`: the second cache level, on Redis, as data.
//!
//! Everything here is checked at load and nothing connects: the URL (its scheme, and no
//! credentials in it, so the address can be logged and shown), the password (inline or from a
//! file), and the sealing keys read from `encryption_key_file`. The cache builds the client
//! from these settings once (`crate::cache::shared`); a replica that cannot reach Redis starts
//! anyway and goes on alone.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest, Sha256};
use url::Url;

use super::file::SharedCacheFile;
use super::{BuildResult, ConfigProblem, defaults};
use crate::secret::Secret;

/// `cache.shared` after validation.
#[derive(Debug, Clone)]
pub struct SharedCacheSettings {
    /// The Redis address, without credentials: `redis://`, `rediss://` (TLS) or
    /// `redis+unix://` (a socket). Safe to log.
    pub url: Url,
    /// The ACL user (Redis 6+); `None` authenticates as the default user.
    pub username: Option<String>,
    /// `AUTH` password, from `password` or `password_file`.
    pub password: Option<Secret>,
    /// The sealing keys in file order: the first seals, every one opens.
    pub keys: Arc<[SealingKey]>,
    /// Put before every Redis key the gateway writes.
    pub key_prefix: String,
    /// The longest one Redis operation may take; then the replica goes on alone.
    pub timeout: Duration,
}

impl SharedCacheSettings {
    /// True when the password goes to another host without TLS (`redis://` to a host that is
    /// not this machine): anyone on the path can read it. The values are sealed either way.
    pub fn password_in_clear(&self) -> bool {
        if self.password.is_none() || self.url.scheme() != "redis" {
            return false;
        }
        // `redis:` is not a special scheme to the URL parser, so its host stays text.
        let Some(host) = self.url.host_str() else {
            return false;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => !ip.is_loopback(),
            Err(_) => !host.eq_ignore_ascii_case("localhost"),
        }
    }
}

/// Warning text of a Redis password sent over `redis://` to another host.
pub const CLEAR_TEXT_REDIS_PASSWORD: &str = "redis:// to a non-loopback host sends the Redis password in clear (the cached values are sealed); use rediss://";

/// Schemes of `cache.shared.url` (the ones the Redis client understands, minus none).
const SCHEMES: &[&str] = &["redis", "rediss", "redis+unix", "unix"];

/// One 256-bit AES-GCM key of `cache.shared.encryption_key_file`. Its `Debug` shows the key id
/// only; the bytes leave this type only through [`SealingKey::expose`].
#[derive(Clone)]
pub struct SealingKey {
    id: [u8; 4],
    bytes: [u8; 32],
}

impl SealingKey {
    /// Wraps key material; the id is derived from it, so it is the same on every replica and
    /// stays with the key when lines move in the file.
    pub fn new(bytes: [u8; 32]) -> SealingKey {
        let digest = Sha256::new()
            .chain_update(b"txgate-cache-key-id-v1")
            .chain_update(bytes)
            .finalize();
        let mut id = [0u8; 4];
        id.copy_from_slice(&digest[..4]);
        SealingKey { id, bytes }
    }

    /// The key id written in front of every value it seals.
    pub fn id(&self) -> [u8; 4] {
        self.id
    }

    /// The key itself. Call this only where the cipher is built.
    pub fn expose(&self) -> &[u8; 32] {
        &self.bytes
    }
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealingKey(id {}, <redacted>)", hex::encode(self.id))
    }
}

/// Builds `cache.shared` from the file layer.
pub(super) fn build(raw: SharedCacheFile) -> BuildResult<SharedCacheSettings> {
    let SharedCacheFile {
        url,
        username,
        password,
        password_file,
        encryption_key_file,
        key_prefix,
        timeout,
    } = raw;
    let url = redis_url(&url)?;
    let password = match (password, password_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigProblem::new(
                "cache.shared.password",
                "set either password or password_file, not both",
            ));
        }
        (Some(p), None) => Some(p),
        (None, Some(file)) => Some(read_password(&file)?),
        (None, None) => None,
    };
    if password.as_ref().is_some_and(Secret::is_empty) {
        return Err(ConfigProblem::new(
            "cache.shared.password",
            "is empty; leave it out for a Redis without a password",
        ));
    }
    if let Some(user) = &username
        && (user.is_empty() || user.contains(char::is_whitespace))
    {
        return Err(ConfigProblem::new(
            "cache.shared.username",
            "must be a non-empty name without spaces",
        ));
    }
    let keys = read_keys(&encryption_key_file)?;
    let key_prefix = key_prefix.unwrap_or_else(|| defaults::SHARED_CACHE_KEY_PREFIX.to_string());
    if key_prefix.len() > 64 || !key_prefix.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigProblem::new(
            "cache.shared.key_prefix",
            "must be at most 64 visible ASCII characters, without spaces",
        ));
    }
    let timeout = timeout.unwrap_or(defaults::SHARED_CACHE_TIMEOUT);
    if timeout.is_zero() || timeout > defaults::SHARED_CACHE_MAX_TIMEOUT {
        return Err(ConfigProblem::new(
            "cache.shared.timeout",
            format!(
                "must be above 0 and at most {}: a Redis operation must never cost more than the exchange it saves",
                humantime::format_duration(defaults::SHARED_CACHE_MAX_TIMEOUT)
            ),
        ));
    }
    Ok(SharedCacheSettings {
        url,
        username,
        password,
        keys,
        key_prefix,
        timeout,
    })
}

fn redis_url(text: &str) -> BuildResult<Url> {
    let problem = |m: String| ConfigProblem::new("cache.shared.url", m);
    let url = Url::parse(text).map_err(|e| problem(format!("invalid URL \"{text}\": {e}")))?;
    if !SCHEMES.contains(&url.scheme()) {
        return Err(problem(format!(
            "unsupported scheme \"{}\" (expected redis://, rediss:// or redis+unix://)",
            url.scheme()
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Checked before anything prints the URL: it is logged and shown on the status page.
        return Err(problem(
            "must not hold credentials; set cache.shared.username and cache.shared.password \
             (or password_file)"
                .to_string(),
        ));
    }
    if url.fragment().is_some() {
        // The client reads `#insecure` as "do not verify the server's certificate".
        return Err(problem(format!(
            "\"{text}\" must not have a #fragment; the server's certificate is always verified"
        )));
    }
    let unix = url.scheme().ends_with("unix");
    if unix && url.path().len() < 2 {
        return Err(problem(format!(
            "\"{text}\" names no socket path (e.g. redis+unix:///run/redis/redis.sock)"
        )));
    }
    if !unix && url.host_str().is_none_or(str::is_empty) {
        return Err(problem(format!("\"{text}\" names no host")));
    }
    Ok(url)
}

fn read_password(file: &Path) -> BuildResult<Secret> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        ConfigProblem::new(
            "cache.shared.password_file",
            format!("cannot read \"{}\": {e}", file.display()),
        )
    })?;
    Ok(Secret::new(text.trim_end_matches(['\r', '\n'])))
}

/// The keys of `file`: one base64 key of 32 bytes per line; blank lines and lines starting with
/// `#` are skipped. A bad line is named by its number, never by its text.
fn read_keys(file: &PathBuf) -> BuildResult<Arc<[SealingKey]>> {
    let at = |m: String| ConfigProblem::new("cache.shared.encryption_key_file", m);
    let text = std::fs::read_to_string(file)
        .map_err(|e| at(format!("cannot read \"{}\": {e}", file.display())))?;
    let mut keys: Vec<SealingKey> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bytes: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(line)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                at(format!(
                    "\"{}\" line {}: not a base64-encoded 32-byte key (make one with: openssl rand -base64 32)",
                    file.display(),
                    n + 1
                ))
            })?;
        let key = SealingKey::new(bytes);
        if keys.iter().any(|k| k.id == key.id) {
            return Err(at(format!(
                "\"{}\" line {}: the same key is listed twice",
                file.display(),
                n + 1
            )));
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(at(format!(
            "\"{}\" holds no key (one base64-encoded 32-byte key per line; the first seals)",
            file.display()
        )));
    }
    Ok(keys.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("txgate-shared-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn file(url: &str, keys: &str) -> (SharedCacheFile, PathBuf) {
        let dir = dir();
        let key_file = dir.join("cache.keys");
        std::fs::write(&key_file, keys).unwrap();
        (
            SharedCacheFile {
                url: url.to_string(),
                username: None,
                password: Some(Secret::new("redis-password-never-printed")),
                password_file: None,
                encryption_key_file: key_file,
                key_prefix: None,
                timeout: None,
            },
            dir,
        )
    }

    fn key_line(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    #[test]
    fn keys_are_read_in_order_and_never_printed() {
        let (raw, dir) = file(
            "redis://10.0.0.5:6379/0",
            &format!("# rotated 2026-11\n{}\n\n{}\n", key_line(1), key_line(2)),
        );
        let settings = build(raw).unwrap();
        assert_eq!(settings.keys.len(), 2);
        assert_eq!(settings.keys[0].expose(), &[1u8; 32]);
        assert_eq!(settings.key_prefix, "txgate:");
        assert_eq!(settings.timeout, Duration::from_millis(50));
        let shown = format!("{settings:?}");
        assert!(!shown.contains("redis-password-never-printed"), "{shown}");
        assert!(!shown.contains(&key_line(1)), "{shown}");
        assert!(!shown.contains("1, 1, 1"), "{shown}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_key_id_follows_the_key_not_its_line() {
        let a = SealingKey::new([7; 32]);
        let b = SealingKey::new([7; 32]);
        assert_eq!(a.id(), b.id());
        assert_ne!(a.id(), SealingKey::new([8; 32]).id());
    }

    #[test]
    fn bad_settings_are_named_at_their_key() {
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "redis://:hunter2@10.0.0.5:6379",
                key_line(1),
                "cache.shared.url",
            ),
            ("http://10.0.0.5:6379", key_line(1), "cache.shared.url"),
            ("redis+unix://", key_line(1), "cache.shared.url"),
            (
                "rediss://10.0.0.5#insecure",
                key_line(1),
                "cache.shared.url",
            ),
            (
                "redis://10.0.0.5",
                "c2hvcnQ=".to_string(),
                "cache.shared.encryption_key_file",
            ),
            (
                "redis://10.0.0.5",
                "# nothing\n".to_string(),
                "cache.shared.encryption_key_file",
            ),
            (
                "redis://10.0.0.5",
                format!("{}\n{}\n", key_line(3), key_line(3)),
                "cache.shared.encryption_key_file",
            ),
        ];
        for (url, keys, path) in cases {
            let (raw, dir) = file(url, &keys);
            let problem = build(raw).unwrap_err();
            assert_eq!(problem.path, path, "{url} {keys}: {}", problem.message);
            assert!(!problem.message.contains("hunter2"), "{}", problem.message);
            assert!(
                !problem.message.contains(&key_line(3)),
                "{}",
                problem.message
            );
            let _ = std::fs::remove_dir_all(dir);
        }
        let (raw, dir) = file("redis://10.0.0.5", &key_line(1));
        assert!(build(raw).unwrap().password_in_clear());
        let _ = std::fs::remove_dir_all(dir);
        for url in [
            "rediss://10.0.0.5",
            "redis://127.0.0.1",
            "redis+unix:///run/r.sock",
        ] {
            let (raw, dir) = file(url, &key_line(1));
            assert!(!build(raw).unwrap().password_in_clear(), "{url}");
            let _ = std::fs::remove_dir_all(dir);
        }
        let (mut raw, dir) = file("redis://10.0.0.5", &key_line(1));
        raw.timeout = Some(Duration::ZERO);
        assert_eq!(build(raw).unwrap_err().path, "cache.shared.timeout");
        let _ = std::fs::remove_dir_all(dir);
    }
}
