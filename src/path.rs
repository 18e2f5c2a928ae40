//! Request paths in one canonical form before anything decides on them.
//!
//! A route is chosen by its path prefix, and a backend serves the path it finally understands.
//! When the two read a path differently, a request can climb out of its route:
//! `/public/../orders/7` or `/public/%2e%2e/orders/7` matches `public` as written but is served
//! as `/orders/7` by any backend that normalises. So the gateway normalises once, before
//! routing, and forwards exactly the path it routed on:
//!
//! - percent-encoded unreserved characters are decoded (RFC 3986 §2.3 and §6.2.2.2: `%2E` is
//!   `.`, `%7E` is `~`, in either hex case);
//! - dot segments are removed (RFC 3986 §5.2.4); a path that climbs above the root is refused;
//! - repeated slashes are merged;
//! - an encoded slash or backslash (`%2F`, `%5C`) or a raw backslash is refused by default:
//!   backends disagree on whether it separates segments, so no reading of it is safe;
//! - a `%` that does not start a two-digit escape is refused, so decoding can never produce a
//!   new escape (`%%32%65` would otherwise become `%2e` for the next decoder).
//!
//! Server-level keys relax each rule, named after Envoy's equivalents (`normalize_path`,
//! `merge_slashes`, `path_with_escaped_slashes_action`). A path that is already normal is
//! checked in one pass and returned borrowed: nothing is allocated on the common path.

use std::borrow::Cow;

/// What to do with `%2F`, `%5C` and `\` in a path (`server.path_with_escaped_slashes_action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EscapedSlashes {
    /// Refuse the request with 400 (the default).
    #[default]
    RejectRequest,
    /// Leave them as they are: they are ordinary characters inside a segment for routing.
    KeepUnchanged,
    /// Decode them to `/` (a backslash too) and normalise the result.
    UnescapeAndForward,
}

/// The normalisation rules of a server (`server.normalize_path`, `server.merge_slashes`,
/// `server.path_with_escaped_slashes_action`). The default applies every rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathRules {
    /// Decode unreserved escapes and remove dot segments (default: true).
    pub normalize_path: bool,
    /// Merge repeated slashes (default: true).
    pub merge_slashes: bool,
    /// Escaped slashes and backslashes (default: refuse).
    pub escaped_slashes: EscapedSlashes,
}

impl Default for PathRules {
    fn default() -> PathRules {
        PathRules {
            normalize_path: true,
            merge_slashes: true,
            escaped_slashes: EscapedSlashes::RejectRequest,
        }
    }
}

/// Why a path is refused (400 `invalid_request`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path contains an encoded slash or a backslash")]
    EscapedSlash,
    #[error("the path climbs above the root")]
    AboveRoot,
    #[error("the path contains a '%' that is not a two-digit escape")]
    BadEscape,
    #[error("the request target is not an absolute path")]
    NotOriginForm,
}

/// The canonical form of `path` (no query) under `rules`: borrowed when it already is.
pub fn normalize<'a>(path: &'a str, rules: &PathRules) -> Result<Cow<'a, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    if is_normal(path.as_bytes(), rules)? {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path.as_bytes(), rules)?;
    Ok(Cow::Owned(resolve(&decoded, rules)?))
}

/// One pass: `Ok(true)` when `path` needs no change, `Ok(false)` when it does, `Err` when it
/// must be refused whatever else it holds.
fn is_normal(path: &[u8], rules: &PathRules) -> Result<bool, PathError> {
    let mut normal = true;
    let mut i = 0;
    // Only `%`, `\` and `/` can need anything: jump from one to the next.
    while let Some(found) = memchr::memchr3(b'%', b'\\', b'/', &path[i..]) {
        i += found;
        match path[i] {
            b'%' => {
                let byte = escape_at(path, i)?;
                if is_slash(byte) {
                    match rules.escaped_slashes {
                        EscapedSlashes::RejectRequest => return Err(PathError::EscapedSlash),
                        EscapedSlashes::KeepUnchanged => {}
                        EscapedSlashes::UnescapeAndForward => normal = false,
                    }
                } else if rules.normalize_path && is_unreserved(byte) {
                    normal = false;
                }
                i += 3;
                continue;
            }
            b'\\' => match rules.escaped_slashes {
                EscapedSlashes::RejectRequest => return Err(PathError::EscapedSlash),
                EscapedSlashes::KeepUnchanged => {}
                EscapedSlashes::UnescapeAndForward => normal = false,
            },
            _ => {
                let rest = &path[i + 1..];
                if rules.merge_slashes && rest.first() == Some(&b'/') {
                    normal = false;
                }
                if rules.normalize_path && is_dot_segment(rest) {
                    normal = false;
                }
            }
        }
        i += 1;
    }
    Ok(normal)
}

/// The byte a `%XX` escape at `at` stands for.
fn escape_at(path: &[u8], at: usize) -> Result<u8, PathError> {
    match (
        path.get(at + 1).and_then(|b| hex(*b)),
        path.get(at + 2).and_then(|b| hex(*b)),
    ) {
        (Some(high), Some(low)) => Ok(high << 4 | low),
        _ => Err(PathError::BadEscape),
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3: `ALPHA / DIGIT / "-" / "." / "_" / "~"`.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_slash(b: u8) -> bool {
    matches!(b, b'/' | b'\\')
}

/// Whether the segment that starts `rest` (the bytes after a `/`) is `.` or `..`.
fn is_dot_segment(rest: &[u8]) -> bool {
    matches!(
        rest,
        [b'.'] | [b'.', b'/', ..] | [b'.', b'.'] | [b'.', b'.', b'/', ..]
    )
}

/// Decodes the escapes the rules ask for; every other byte, and every other escape, as sent.
fn decode(path: &[u8], rules: &PathRules) -> Result<Vec<u8>, PathError> {
    let unescape_slashes = rules.escaped_slashes == EscapedSlashes::UnescapeAndForward;
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        match path[i] {
            b'%' => {
                let byte = escape_at(path, i)?;
                if is_slash(byte) && unescape_slashes {
                    out.push(b'/');
                } else if is_slash(byte) && rules.escaped_slashes == EscapedSlashes::RejectRequest {
                    return Err(PathError::EscapedSlash);
                } else if rules.normalize_path && is_unreserved(byte) {
                    out.push(byte);
                } else {
                    out.extend_from_slice(&path[i..i + 3]);
                }
                i += 3;
            }
            b'\\' if unescape_slashes => {
                out.push(b'/');
                i += 1;
            }
            b'\\' if rules.escaped_slashes == EscapedSlashes::RejectRequest => {
                return Err(PathError::EscapedSlash);
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// Removes dot segments (when normalising) and merges slashes (when asked), over a decoded
/// path that starts with `/`. A trailing slash, or a final `.`/`..`, leaves the path ending in
/// `/` (RFC 3986 §5.2.4).
fn resolve(decoded: &[u8], rules: &PathRules) -> Result<String, PathError> {
    // Segments after the leading slash.
    let segments: Vec<&[u8]> = decoded[1..].split(|b| *b == b'/').collect();
    let last = segments.len() - 1;
    let mut kept: Vec<&[u8]> = Vec::with_capacity(segments.len());
    let mut trailing_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        let is_last = i == last;
        match *segment {
            b"." if rules.normalize_path => trailing_slash = is_last,
            b".." if rules.normalize_path => {
                kept.pop().ok_or(PathError::AboveRoot)?;
                trailing_slash = is_last;
            }
            b"" if rules.merge_slashes => trailing_slash = is_last,
            _ => {
                kept.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = Vec::with_capacity(decoded.len());
    for segment in &kept {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push(b'/');
    }
    // Only ASCII escapes were decoded, into ASCII bytes: the path stays valid UTF-8 whenever
    // it was; a path that was not is refused rather than forwarded lossily.
    String::from_utf8(out).map_err(|_| PathError::NotOriginForm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(path: &str) -> Result<String, PathError> {
        normalize(path, &PathRules::default()).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for path in [
            "/",
            "/orders/7",
            "/a/b/",
            "/a%20b",
            "/x;y=1",
            "/.well-known/x",
            "/a/.b",
        ] {
            assert!(
                matches!(normalize(path, &PathRules::default()), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
    }

    #[test]
    fn dot_segments_are_removed_raw_and_encoded() {
        for path in [
            "/public/../orders/7",
            "/public/%2e%2e/orders/7",
            "/public/%2E%2E/orders/7",
            "/public/.%2E/orders/7",
            "/public/%2e./orders/7",
            "/orders/./7",
            "/orders/%2e/7",
            "//orders///7",
            "/public/x/../../orders/7",
        ] {
            assert_eq!(norm(path).as_deref(), Ok("/orders/7"), "{path}");
        }
        assert_eq!(norm("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(norm("/a/b/.").as_deref(), Ok("/a/b/"));
        assert_eq!(norm("/a/..").as_deref(), Ok("/"));
        assert_eq!(norm("/a//").as_deref(), Ok("/a/"));
        assert_eq!(norm("//").as_deref(), Ok("/"));
        assert_eq!(norm("/%7Euser/%41").as_deref(), Ok("/~user/A"));
        // Reserved characters stay encoded: decoding them would change what the path means.
        assert_eq!(norm("/a%3Fb/%25/%20").as_deref(), Ok("/a%3Fb/%25/%20"));
        assert_eq!(norm("/a/...").as_deref(), Ok("/a/..."));
    }

    #[test]
    fn climbing_above_the_root_is_refused() {
        for path in [
            "/..",
            "/../orders",
            "/a/../../orders",
            "/%2e%2e/orders",
            "/./../x",
        ] {
            assert_eq!(norm(path), Err(PathError::AboveRoot), "{path}");
        }
    }

    #[test]
    fn escaped_slashes_and_backslashes_are_refused_by_default() {
        for path in [
            "/a%2Fb",
            "/a%2fb",
            "/a%5Cb",
            "/a%5cb",
            "/a\\b",
            "/public/..%2forders",
        ] {
            assert_eq!(norm(path), Err(PathError::EscapedSlash), "{path}");
        }
    }

    #[test]
    fn broken_escapes_are_refused() {
        for path in ["/a%", "/a%2", "/a%zz", "/%%32%65%%32%65/x", "/a%2%65"] {
            assert_eq!(norm(path), Err(PathError::BadEscape), "{path}");
        }
        assert_eq!(norm("orders"), Err(PathError::NotOriginForm));
        assert_eq!(norm("*"), Err(PathError::NotOriginForm));
        assert_eq!(norm(""), Err(PathError::NotOriginForm));
    }

    #[test]
    fn each_rule_can_be_relaxed() {
        let keep = PathRules {
            escaped_slashes: EscapedSlashes::KeepUnchanged,
            ..PathRules::default()
        };
        assert_eq!(
            normalize("/a%2Fb/../c", &keep).as_deref(),
            Ok("/c"),
            "an escaped slash is part of its segment"
        );
        assert_eq!(normalize("/a\\b", &keep).as_deref(), Ok("/a\\b"));
        let unescape = PathRules {
            escaped_slashes: EscapedSlashes::UnescapeAndForward,
            ..PathRules::default()
        };
        assert_eq!(
            normalize("/public/..%2forders", &unescape).as_deref(),
            Ok("/orders")
        );
        assert_eq!(normalize("/a\\b%5Cc", &unescape).as_deref(), Ok("/a/b/c"));
        let no_merge = PathRules {
            merge_slashes: false,
            ..PathRules::default()
        };
        assert_eq!(normalize("/a//b", &no_merge).as_deref(), Ok("/a//b"));
        assert_eq!(normalize("/a//../b", &no_merge).as_deref(), Ok("/a/b"));
        let raw = PathRules {
            normalize_path: false,
            ..PathRules::default()
        };
        assert_eq!(normalize("/a/../%2e", &raw).as_deref(), Ok("/a/../%2e"));
        assert_eq!(normalize("/a//b", &raw).as_deref(), Ok("/a/b"));
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for path in [
            "/public/%2e%2e/orders/%7E7",
            "/a//b/./c/../d/",
            "/%25%32%65",
            "/a%2Fb",
        ] {
            for rules in [
                PathRules::default(),
                PathRules {
                    escaped_slashes: EscapedSlashes::KeepUnchanged,
                    ..PathRules::default()
                },
                PathRules {
                    escaped_slashes: EscapedSlashes::UnescapeAndForward,
                    merge_slashes: false,
                    ..PathRules::default()
                },
            ] {
                if let Ok(once) = normalize(path, &rules) {
                    let twice = normalize(&once, &rules).map(Cow::into_owned);
                    assert_eq!(twice.as_deref(), Ok(&*once), "{path} {rules:?}");
                }
            }
        }
    }
}
