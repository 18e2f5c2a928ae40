//! Actor tokens for delegation (RFC 8693 §2.1 `actor_token`), and what the gateway derives from
//! one: its claims and the identity that separates cache entries of different actors.
//!
//! An actor token changes rarely (a rotated file, a renewed client-credentials token) while
//! every delegated request needs it, so everything derived from it is computed once per token
//! value, never per request. A token file that a platform keeps current (for example a
//! projected service-account token, rotated by the kubelet) is read at load (a missing file is
//! a config error) and re-read by a background watcher when its modification time changes; a
//! failed re-read keeps serving the last good token and warns. Requests only load the current
//! value: no file system call on the request path.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

/// How often a watched token file is checked for a change. The kubelet renews projected tokens
/// well before they expire (at 80 % of their life), so a few seconds of lag cost nothing.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_secs(5);

type Claims = serde_json::Map<String, serde_json::Value>;

/// An actor token and what is derived from it.
pub struct Actor {
    pub token: Arc<str>,
    /// Its claims when it is a JWT, read without verifying (the gateway's own token, or one its
    /// platform gave it); used for `may_act` checks.
    pub claims: Option<Claims>,
    /// What identifies the actor in cache keys: its issuer and `sub` (or `client_id`), else a
    /// digest of the token. Never the raw token.
    pub identity: String,
    /// SHA-256 of `identity`, the actor's part of cache keys.
    pub identity_digest: [u8; 32],
}

impl Actor {
    /// Derives claims and identity from `token`, once.
    pub fn new(token: Arc<str>) -> Actor {
        let claims = crate::jwt::unverified_claims(&token);
        let named = claims.as_ref().and_then(|c| {
            let iss = c.get("iss").and_then(|v| v.as_str()).unwrap_or_default();
            c.get("sub")
                .or_else(|| c.get("client_id"))
                .and_then(|v| v.as_str())
                .map(|sub| format!("{iss}\u{0}{sub}"))
        });
        let identity = named.unwrap_or_else(|| hex::encode(Sha256::digest(token.as_bytes())));
        let identity_digest = Sha256::digest(identity.as_bytes()).into();
        Actor {
            token,
            claims,
            identity,
            identity_digest,
        }
    }
}

/// The token never prints.
impl std::fmt::Debug for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actor")
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A token file and its last read value.
pub struct TokenFile {
    path: PathBuf,
    current: ArcSwap<Actor>,
    /// The modification time of the value in `current`.
    modified: Mutex<Option<SystemTime>>,
}

/// The path only: the token is a credential and never prints.
impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl TokenFile {
    /// Reads `path` now; an unreadable or empty file is an error.
    pub fn open(path: &Path) -> Result<TokenFile, String> {
        let (modified, token) = read(path)?;
        Ok(TokenFile {
            path: path.to_path_buf(),
            current: ArcSwap::from_pointee(Actor::new(token)),
            modified: Mutex::new(modified),
        })
    }

    /// The current actor: a load, no I/O. Called for every delegated request.
    pub fn actor(&self) -> Arc<Actor> {
        self.current.load_full()
    }

    /// Re-reads the file if it changed since the last read. Blocking file I/O: the watcher
    /// runs it off the request path ([`TokenFile::watch`]); tests call it directly.
    pub fn refresh(&self) {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut last = match self.modified.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if modified.is_none() || modified == *last {
            return;
        }
        match read(&self.path) {
            Ok((modified, token)) => {
                self.current.store(Arc::new(Actor::new(token)));
                *last = modified;
            }
            Err(e) => {
                *last = modified;
                tracing::warn!(error = %e, "cannot re-read the actor token file; using the previous token")
            }
        }
    }

    /// Checks the file every [`FILE_POLL_INTERVAL`] until the last strong reference (the
    /// configuration that holds it) is gone. Called once per file when a configuration starts.
    pub fn watch(file: &Arc<TokenFile>) {
        let file = Arc::downgrade(file);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(FILE_POLL_INTERVAL).await;
                let Some(strong) = file.upgrade() else { break };
                if tokio::task::spawn_blocking(move || strong.refresh())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
    }
}

fn read(path: &Path) -> Result<(Option<SystemTime>, Arc<str>), String> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read \"{}\": {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() || !token.bytes().all(crate::exchange::is_token_char) {
        return Err(format!(
            "\"{}\" does not hold a token (empty, or characters a token cannot have)",
            path.display()
        ));
    }
    Ok((modified, Arc::from(token)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rereads_the_file_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("txgate-actor-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "first-token\n").unwrap();
        let file = TokenFile::open(&path).unwrap();
        assert_eq!(&*file.actor().token, "first-token");
        std::fs::write(&path, "second-token").unwrap();
        // Make the change visible even on filesystems with coarse timestamps.
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        // Nothing changes until the watcher (here: the test) refreshes.
        assert_eq!(&*file.actor().token, "first-token");
        file.refresh();
        assert_eq!(&*file.actor().token, "second-token");
        std::fs::write(&path, "").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + std::time::Duration::from_secs(5))
            .unwrap();
        file.refresh();
        assert_eq!(
            &*file.actor().token,
            "second-token",
            "a bad re-read keeps the last token"
        );
        assert!(TokenFile::open(&dir.join("missing")).is_err());
        let shown = format!("{file:?}");
        assert!(!shown.contains("second-token"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_actor_is_identified_by_issuer_and_subject_or_a_digest() {
        let claims = serde_json::json!({"iss": "https://idp", "sub": "gateway-svc"});
        let body = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            claims.to_string(),
        );
        let jwt = Actor::new(Arc::from(format!("eyJhbGciOiJub25lIn0.{body}.")));
        assert_eq!(jwt.identity, "https://idp\u{0}gateway-svc");
        assert!(jwt.claims.is_some());
        let opaque = Actor::new(Arc::from("opaque-actor-token"));
        assert_eq!(opaque.identity.len(), 64);
        assert!(!opaque.identity.contains("opaque"));
        assert!(!format!("{opaque:?}").contains("opaque-actor-token"));
    }
}
