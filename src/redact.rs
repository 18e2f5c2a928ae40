//! What of a request may be written to a log: paths and request ids with the caller's tokens
//! masked, whatever route (if any) the request reached and however far admission got.
//!
//! A logged path masks, in any encoding, every credential the request itself presents (the
//! `Authorization` credentials and `access_token` query values) and any JWT-shaped run of
//! characters, which covers tokens sent in a path without any `Authorization` header.
//! Nothing here runs unless something is logged.

use std::borrow::Cow;

use crate::admission::credential::{MIN_GUARDED_TOKEN_BYTES, contains, strip_query_token};
use http::{HeaderMap, Uri, header};

/// Replaces a caller token in logged text.
const TOKEN_MASK: &str = "<token>";
/// Replaces a JWT-shaped run in logged text.
const JWT_MASK: &str = "<jwt>";

/// The credentials a request presents, as sent: the credential of each `Authorization` header
/// (whatever its scheme or syntax) and each decoded `access_token` query value, each at least
/// [`MIN_GUARDED_TOKEN_BYTES`] long.
pub fn presented<'a>(uri: &Uri, headers: &'a HeaderMap) -> Vec<Cow<'a, [u8]>> {
    let mut found: Vec<Cow<'a, [u8]>> = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| {
            let bytes = v.as_bytes().trim_ascii();
            // `Scheme credential`: the credential; a bare value is masked whole.
            let credential = match bytes.iter().position(|b| *b == b' ') {
                Some(i) => bytes[i + 1..].trim_ascii(),
                None => bytes,
            };
            (credential.len() >= MIN_GUARDED_TOKEN_BYTES).then_some(Cow::Borrowed(credential))
        })
        .collect();
    if let Some(stripped) = uri.query().and_then(strip_query_token) {
        found.extend(
            stripped
                .removed
                .into_iter()
                .filter(|t| t.len() >= MIN_GUARDED_TOKEN_BYTES)
                .map(|t| Cow::Owned(t.into_bytes())),
        );
    }
    found
}

/// `path` as it may be logged: as sent when it holds no token; else percent-decoded with each
/// presented token and each JWT-shaped run masked.
pub fn path<'a>(path: &'a str, presented: &[Cow<'_, [u8]>]) -> Cow<'a, str> {
    let decoded: Cow<'_, [u8]> = if path.contains('%') {
        Cow::Owned(percent_encoding::percent_decode_str(path).collect())
    } else {
        Cow::Borrowed(path.as_bytes())
    };
    let carries_token = presented.iter().any(|t| contains(&decoded, t.as_ref()));
    if !carries_token && !has_jwt_run(&decoded) {
        return Cow::Borrowed(path);
    }
    let mut text = String::from_utf8_lossy(&decoded).into_owned();
    for token in presented {
        let token = String::from_utf8_lossy(token);
        if text.contains(&*token) {
            text = text.replace(&*token, TOKEN_MASK);
        }
    }
    Cow::Owned(mask_jwt_runs(&text))
}

/// A request method as it may be logged: as sent, or masked whole when it carries a presented
/// credential or is JWT-shaped (an extension method is any token of the grammar, RFC 9110
/// §9.1, so a caller's token fits).
pub fn method<'a>(method: &'a str, presented: &[Cow<'_, [u8]>]) -> &'a str {
    if is_clean(method.as_bytes(), presented) {
        method
    } else {
        TOKEN_MASK
    }
}

/// Whether logged text that a caller chose (a request id) may be logged and echoed as it is:
/// it carries none of the presented credentials and nothing JWT-shaped.
pub fn is_clean(text: &[u8], presented: &[Cow<'_, [u8]>]) -> bool {
    !has_jwt_run(text) && !presented.iter().any(|t| contains(text, t.as_ref()))
}

/// Longest `X-Request-Id` kept from a client.
const MAX_REQUEST_ID: usize = 128;

/// The client's `X-Request-Id` when it may be kept, logged and echoed: short, plain (letters,
/// digits, `-_.:`) and carrying no credential of the request; `None` otherwise (the front door
/// then makes a new one, or logs none).
pub fn kept_request_id<'a>(uri: &Uri, headers: &'a HeaderMap) -> Option<&'a http::HeaderValue> {
    let value = headers.get("x-request-id")?;
    let bytes = value.as_bytes();
    let plain = !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    (plain && is_clean(bytes, &presented(uri, headers))).then_some(value)
}

/// Characters of a compact JWS/JWE: base64url and the dots between parts.
fn is_jwt_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// Maximal runs of JWT characters that start with `ey` (a JOSE header is a JSON object, and
/// `{"` or `{ ` encodes to `eyJ` / `eyA`) and hold at least two dots.
fn jwt_runs(text: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < text.len() {
            if !is_jwt_char(text[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < text.len() && is_jwt_char(text[i]) {
                i += 1;
            }
            let run = &text[start..i];
            if run.starts_with(b"ey") && run.iter().filter(|b| **b == b'.').count() >= 2 {
                return Some((start, i));
            }
        }
        None
    })
}

fn has_jwt_run(text: &[u8]) -> bool {
    jwt_runs(text).next().is_some()
}

fn mask_jwt_runs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (start, end) in jwt_runs(text.as_bytes()) {
        out.push_str(&text[last..start]);
        out.push_str(JWT_MASK);
        last = end;
    }
    out.push_str(&text[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";

    fn presented_by(authorization: &str, uri: &str) -> Vec<Vec<u8>> {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, authorization.parse().unwrap());
        presented(&uri.parse().unwrap(), &headers)
            .into_iter()
            .map(Cow::into_owned)
            .collect()
    }

    fn cows(tokens: &[Vec<u8>]) -> Vec<Cow<'_, [u8]>> {
        tokens.iter().map(|t| Cow::Borrowed(t.as_slice())).collect()
    }

    #[test]
    fn presented_tokens_are_masked_raw_and_encoded() {
        let owned = presented_by("Bearer tok123456789", "/x?access_token=query-token-1");
        let tokens = cows(&owned);
        assert_eq!(path("/a/tok123456789/b", &tokens), "/a/<token>/b");
        assert_eq!(path("/a/tok%31%323456789", &tokens), "/a/<token>");
        assert_eq!(path("/q/query-token-1", &tokens), "/q/<token>");
        assert!(matches!(path("/plain/%20", &tokens), Cow::Borrowed(_)));
    }

    #[test]
    fn jwt_shaped_runs_are_masked_without_any_credential() {
        assert_eq!(path(&format!("/nowhere/{JWT}"), &[]), "/nowhere/<jwt>");
        assert_eq!(path(&format!("/x;t={JWT}/y"), &[]), "/x;t=<jwt>/y");
        let encoded: String = JWT.bytes().map(|b| format!("%{b:02x}")).collect();
        assert_eq!(path(&format!("/n/{encoded}"), &[]), "/n/<jwt>");
        // Ordinary dotted names are not JWTs.
        assert!(matches!(path("/static/app.min.js", &[]), Cow::Borrowed(_)));
        assert!(matches!(path("/v1.2.3/eyes.png", &[]), Cow::Borrowed(_)));
    }

    #[test]
    fn short_and_malformed_credentials() {
        // Too short to be a token: not masked (it would mask half of every path).
        assert!(presented_by("Bearer abc", "/").is_empty());
        // A credential that is not valid bearer syntax is still masked.
        let owned = presented_by("Bearer two words-here", "/");
        assert_eq!(owned, vec![b"two words-here".to_vec()]);
        let tokens = cows(&owned);
        assert!(!is_clean(b"xx-two words-here", &tokens));
        assert!(is_clean(b"req-1", &tokens));
        assert!(!is_clean(JWT.as_bytes(), &[]));
    }
}
