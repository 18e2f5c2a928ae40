//! Stage 2: the caller's credential, and every copy of it the request carries (RFC 6750).
//!
//! Only the `Authorization` header is accepted as a credential. A token in the query string
//! (`access_token=`, RFC 6750 §2.3) is never accepted and is removed before forwarding; its
//! value still counts as the caller's token for the URL check and the leak guard. These rules
//! hold for every route kind: a public route reads the same credential, it just needs none.

use crate::token::CallerToken;
use std::borrow::Cow;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, header};
use memchr::memmem;

use super::{Request, Target};
use crate::error::GatewayError;
use crate::exchange::{TOKEN_BODY, TOKEN_CHARS};
use crate::state::GatewayState;

/// More `access_token` query parameters than this is refused: a request has one credential,
/// and each value costs the leak guard a pass over the headers.
pub const MAX_QUERY_TOKENS: usize = 4;
pub use crate::exchange::MIN_GUARDED_TOKEN_BYTES;

/// The caller as the request presents them.
#[derive(Debug, Default)]
pub struct Caller {
    /// The bearer token, when one was presented to a route that uses it (on routes that need
    /// none, a malformed credential is the same as none).
    pub token: Option<CallerToken>,
    /// What no upstream header may contain: the bearer token and the `access_token` values,
    /// each at least [`MIN_GUARDED_TOKEN_BYTES`] long.
    pub guarded: Vec<Arc<str>>,
    /// The query to forward when `access_token` parameters were removed (`Some(None)`: none
    /// remains); `None` leaves the query as sent.
    pub query: Option<Option<String>>,
}

impl Caller {
    /// Whether `bytes` contains one of the caller's tokens.
    pub fn is_carried_by(&self, bytes: &[u8]) -> bool {
        self.guarded.iter().any(|t| contains(bytes, t.as_bytes()))
    }

    /// The names of the headers in `headers` whose value carries one of the caller's tokens
    /// (each name once): what every front door drops before the upstream sees the request
    /// (the leak guard). One pass over the header bytes per guarded token, and there are at
    /// most five of those.
    pub fn headers_carrying(&self, headers: &HeaderMap) -> Vec<HeaderName> {
        if self.guarded.is_empty() {
            return Vec::new();
        }
        let mut names: Vec<HeaderName> = Vec::new();
        for (name, value) in headers {
            if self.is_carried_by(value.as_bytes()) && !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    }
}

/// A credential refused, with the bearer token when it had been read (for the fingerprint in
/// the access log).
#[derive(Debug)]
pub struct Unread {
    pub error: GatewayError,
    pub token: Option<CallerToken>,
}

impl From<GatewayError> for Unread {
    fn from(error: GatewayError) -> Unread {
        Unread { error, token: None }
    }
}

/// Reads the credential of `request` for `target`: a missing or malformed one is refused only
/// where the route needs a caller token; a token anywhere in the URL or the host is refused on
/// every route.
pub fn read(state: &GatewayState, request: Request<'_>, target: &Target) -> Result<Caller, Unread> {
    let header_bytes: usize = request
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > state.max_request_header_bytes {
        return Err(GatewayError::HeadersTooLarge.into());
    }
    let mut caller = Caller::default();
    if let Some(stripped) = request.uri.query().and_then(strip_query_token) {
        if stripped.removed.len() > MAX_QUERY_TOKENS {
            return Err(GatewayError::TooManyQueryTokens.into());
        }
        caller.guarded.extend(
            stripped
                .removed
                .into_iter()
                .filter(|t| t.len() >= MIN_GUARDED_TOKEN_BYTES)
                .map(Arc::from),
        );
        caller.query = Some(stripped.rest);
    }
    match bearer(request.headers, state.max_token_bytes) {
        Ok(token) => {
            let token: Arc<str> = Arc::from(token);
            if token.len() >= MIN_GUARDED_TOKEN_BYTES {
                caller.guarded.push(token.clone());
            }
            // A `none` route is not the caller's token's business: it is only guarded.
            caller.token = target
                .route
                .uses_caller_token()
                .then(|| CallerToken::new(token));
        }
        Err(e) if target.route.needs_caller_token() => return Err(e.into()),
        Err(_) => {}
    }
    if in_url(request, target, &caller) {
        return Err(Unread {
            error: GatewayError::TokenInUrl,
            token: caller.token,
        });
    }
    Ok(caller)
}

/// Whether a caller token appears in the path (as sent, percent-decoded, or normalised), the
/// query that will be forwarded (as sent or decoded), the host or the method: a backend that
/// decodes any of them would hold the caller's token.
fn in_url(request: Request<'_>, target: &Target, caller: &Caller) -> bool {
    if caller.guarded.is_empty() {
        return false;
    }
    let query = match &caller.query {
        Some(rest) => rest.as_deref(),
        None => request.uri.query(),
    };
    // The routed host is the `Host` header or, without one, the authority (equal when both).
    let host = target.host.as_ref().map(|h| h.as_bytes());
    [
        Some(request.uri.path()),
        query,
        target.normalized_path.as_deref(),
    ]
    .into_iter()
    .flatten()
    .any(|part| match decoded(part) {
        Cow::Borrowed(raw) => caller.is_carried_by(raw),
        Cow::Owned(decoded) => {
            caller.is_carried_by(part.as_bytes()) || caller.is_carried_by(&decoded)
        }
    }) || host.is_some_and(|h| caller.is_carried_by(h))
        || caller.is_carried_by(request.method.as_str().as_bytes())
}

/// Whether `haystack` contains `needle`. Most of what is searched (a path, a header value) is
/// shorter than a token: the length test answers those without building a searcher.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.len() >= needle.len() && memmem::find(haystack, needle).is_some()
}

/// `text` percent-decoded, borrowed when there is nothing to decode. A `+` needs no form
/// decoding here: a token holds `+` but no space, so a `+` sent raw is found raw and one sent as
/// `%2B` is found decoded.
fn decoded(text: &str) -> Cow<'_, [u8]> {
    if text.contains('%') {
        Cow::Owned(percent_encoding::percent_decode_str(text).collect())
    } else {
        Cow::Borrowed(text.as_bytes())
    }
}

/// The bearer token of a request: exactly one `Authorization: Bearer <b64token>` header.
/// The scheme is case-insensitive (RFC 9110 §11.1), so `bearer` is accepted.
pub fn bearer(headers: &HeaderMap, max_bytes: usize) -> Result<&str, GatewayError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(GatewayError::MissingToken)?;
    if values.next().is_some() {
        return Err(GatewayError::DuplicateCredential);
    }
    let bytes = value.as_bytes();
    let (scheme, rest) = match bytes.iter().position(|b| *b == b' ') {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (bytes, &[][..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        // Another scheme (Basic, DPoP, ...) is no bearer credential at all.
        return Err(GatewayError::MissingToken);
    }
    let token = trim_spaces(rest);
    if token.is_empty() {
        return Err(GatewayError::MalformedCredential(
            "the bearer token is empty",
        ));
    }
    if token.len() > max_bytes {
        return Err(GatewayError::TokenTooLarge(max_bytes));
    }
    if !is_b64token(token) {
        return Err(GatewayError::MalformedCredential(
            "the bearer token has characters RFC 6750 does not allow",
        ));
    }
    // is_b64token admits ASCII only, so this cannot fail; no panic either way.
    std::str::from_utf8(token)
        .map_err(|_| GatewayError::MalformedCredential("the bearer token is not ASCII"))
}

fn trim_spaces(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// RFC 6750 §2.1: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_b64token(token: &[u8]) -> bool {
    let body_len = token.len() - token.iter().rev().take_while(|b| **b == b'=').count();
    let body = &token[..body_len];
    // No branch per byte: OR together the classes of the body's bytes with the body class
    // flipped off; any byte that is not a body character (a `=` inside, or anything outside
    // the alphabet) leaves a bit set. Eight bytes per step.
    let not_body = |b: &u8| TOKEN_CHARS[usize::from(*b)] ^ TOKEN_BODY;
    let mut chunks = body.chunks_exact(8);
    let mut seen = 0u8;
    for chunk in &mut chunks {
        seen |= chunk.iter().fold(0, |acc, b| acc | not_body(b));
    }
    seen |= chunks
        .remainder()
        .iter()
        .fold(0, |acc, b| acc | not_body(b));
    body_len > 0 && seen == 0
}

/// A query with its `access_token` parameters taken out.
#[derive(Debug, PartialEq, Eq)]
pub struct StrippedQuery {
    /// The other parameters, byte for byte as sent; `None` if nothing remains.
    pub rest: Option<String>,
    /// The decoded values of the removed parameters.
    pub removed: Vec<String>,
}

/// Splits `access_token` parameters (the name as sent or percent-encoded) out of a query
/// string, in one pass; `None`, with nothing allocated, when there are none.
pub fn strip_query_token(query: &str) -> Option<StrippedQuery> {
    const NAME: &[u8] = b"access_token";
    let is_token_key = |raw_key: &str| {
        if raw_key.contains('%') || raw_key.contains('+') {
            form_decode(raw_key).as_bytes() == NAME
        } else {
            raw_key.as_bytes() == NAME
        }
    };
    // Most queries hold no such parameter: say so without splitting.
    if !query.contains("access") && !query.contains('%') {
        return None;
    }
    let mut rest = String::new();
    let mut removed = Vec::new();
    for pair in query.split('&') {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        if is_token_key(raw_key) {
            removed.push(form_decode(raw_value).into_owned());
        } else if !pair.is_empty() {
            if !rest.is_empty() {
                rest.push('&');
            }
            rest.push_str(pair);
        }
    }
    if removed.is_empty() {
        return None;
    }
    Some(StrippedQuery {
        rest: Some(rest).filter(|r| !r.is_empty()),
        removed,
    })
}

/// `application/x-www-form-urlencoded` decoding of one key or value (`+` is a space).
fn form_decode(text: &str) -> Cow<'_, str> {
    if !text.contains(['%', '+']) {
        return Cow::Borrowed(text);
    }
    let spaced = text.replace('+', " ");
    Cow::Owned(
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::AUTHORIZATION, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    fn parse(values: &[&[u8]]) -> Result<String, GatewayError> {
        bearer(&headers(values), 64).map(str::to_string)
    }

    #[test]
    fn accepts_one_bearer_token() {
        assert_eq!(parse(&[b"Bearer abc.DEF-_~+/="]).unwrap(), "abc.DEF-_~+/=");
        assert_eq!(parse(&[b"bearer abc"]).unwrap(), "abc");
        assert_eq!(parse(&[b"BEARER  abc"]).unwrap(), "abc");
    }

    #[test]
    fn rejects_what_rfc_6750_does_not_allow() {
        assert!(matches!(parse(&[]), Err(GatewayError::MissingToken)));
        assert!(matches!(
            parse(&[b"Basic dXNlcjpwYXNz"]),
            Err(GatewayError::MissingToken)
        ));
        assert!(matches!(
            parse(&[b"Bearer"]),
            Err(GatewayError::MalformedCredential(_))
        ));
        assert!(matches!(
            parse(&[b"Bearer "]),
            Err(GatewayError::MalformedCredential(_))
        ));
        assert!(matches!(
            parse(&[b"Bearer a b"]),
            Err(GatewayError::MalformedCredential(_))
        ));
        assert!(matches!(
            parse(&[b"Bearer a=b"]),
            Err(GatewayError::MalformedCredential(_))
        ));
        assert!(matches!(
            parse(&[b"Bearer ==="]),
            Err(GatewayError::MalformedCredential(_))
        ));
        assert!(matches!(
            parse(&[b"Bearer \xc3\xa9t\xc3\xa9"]),
            Err(GatewayError::MalformedCredential(_))
        ));
        assert!(matches!(
            parse(&[b"Bearer a", b"Bearer b"]),
            Err(GatewayError::DuplicateCredential)
        ));
        let long = format!("Bearer {}", "a".repeat(65));
        assert!(matches!(
            parse(&[long.as_bytes()]),
            Err(GatewayError::TokenTooLarge(64))
        ));
    }

    /// The table-driven check against the grammar read literally, for every byte at every
    /// position of tokens that cross the eight-byte steps.
    #[test]
    fn b64token_check_matches_the_grammar() {
        fn reference(token: &[u8]) -> bool {
            let body_len = token.len() - token.iter().rev().take_while(|b| **b == b'=').count();
            body_len > 0
                && token[..body_len].iter().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
                })
        }
        for len in 1..=19 {
            for pos in 0..len {
                for byte in 0..=255u8 {
                    let mut token = vec![b'a'; len];
                    token[pos] = byte;
                    assert_eq!(is_b64token(&token), reference(&token), "{token:?}");
                }
            }
        }
        assert!(is_b64token(b"abc=="));
        assert!(!is_b64token(b"a=bc"));
        assert!(!is_b64token(b"==="));
        assert!(!is_b64token(b""));
    }

    #[test]
    fn query_tokens_are_removed_and_reported() {
        let stripped = |rest: Option<&str>, removed: &[&str]| {
            Some(StrippedQuery {
                rest: rest.map(str::to_string),
                removed: removed.iter().map(|s| s.to_string()).collect(),
            })
        };
        assert_eq!(
            strip_query_token("a=1&access_token=tok%2Bx&b=2"),
            stripped(Some("a=1&b=2"), &["tok+x"])
        );
        assert_eq!(strip_query_token("access_token=t"), stripped(None, &["t"]));
        assert_eq!(
            strip_query_token("access%5Ftoken=t&x"),
            stripped(Some("x"), &["t"])
        );
        assert_eq!(strip_query_token("a=%zz"), None);
        assert_eq!(strip_query_token("a=1&b=2"), None);
        assert_eq!(
            strip_query_token("access_token=a+b&access_token=c"),
            stripped(None, &["a b", "c"])
        );
    }
}
