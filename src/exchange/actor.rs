//! Actor tokens read from a file that a platform keeps current (for example a projected
//! service-account token, rotated by the kubelet).
//!
//! The file is read at load (so a missing file is a config error) and again whenever its
//! modification time changes; a failed re-read keeps serving the last good token and warns.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// A token file and its last read value.
pub struct TokenFile {
    path: PathBuf,
    current: Mutex<(Option<SystemTime>, Arc<str>)>,
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
            current: Mutex::new((modified, token)),
        })
    }

    /// The token, re-read if the file changed since the last call.
    pub fn token(&self) -> Arc<str> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut current = match self.current.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if modified.is_some() && modified != current.0 {
            match read(&self.path) {
                Ok(fresh) => *current = fresh,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot re-read the actor token file; using the previous token")
                }
            }
        }
        current.1.clone()
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
        assert_eq!(&*file.token(), "first-token");
        std::fs::write(&path, "second-token").unwrap();
        // Make the change visible even on filesystems with coarse timestamps.
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(&*file.token(), "second-token");
        std::fs::write(&path, "").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + std::time::Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            &*file.token(),
            "second-token",
            "a bad re-read keeps the last token"
        );
        assert!(TokenFile::open(&dir.join("missing")).is_err());
        let shown = format!("{file:?}");
        assert!(!shown.contains("second-token"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
