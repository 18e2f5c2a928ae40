//! Reading the caller's credential (RFC 6750 §2.1) and keeping it away from the upstream.
//!
//! Only the `Authorization` header is accepted as a credential. A token in the query string
//! (`access_token=`, RFC 6750 §2.3) is never accepted and is removed before forwarding; its
//! value still counts as the caller's token for the leak guard.

use http::{HeaderMap, header};

use crate::error::GatewayError;
use crate::exchange::{TOKEN_BODY, TOKEN_CHARS};

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

/// Splits `access_token` parameters out of a query string. Returns the remaining query (byte
/// for byte as sent, `None` if nothing remains) and the decoded values that were removed.
pub fn strip_query_token(query: &str) -> (Option<String>, Vec<String>) {
    let mut kept: Vec<&str> = Vec::new();
    let mut removed = Vec::new();
    for pair in query.split('&') {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = |s: &str| -> String {
            url::form_urlencoded::parse(format!("k={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        if decoded(raw_key) == "access_token" {
            removed.push(decoded(raw_value));
        } else if !pair.is_empty() {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        None
    } else {
        Some(kept.join("&"))
    };
    (rest, removed)
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
        assert_eq!(
            strip_query_token("a=1&access_token=tok%2Bx&b=2"),
            (Some("a=1&b=2".to_string()), vec!["tok+x".to_string()])
        );
        assert_eq!(
            strip_query_token("access_token=t"),
            (None, vec!["t".to_string()])
        );
        assert_eq!(
            strip_query_token("access%5Ftoken=t&x"),
            (Some("x".to_string()), vec!["t".to_string()])
        );
        assert_eq!(
            strip_query_token("a=%zz"),
            (Some("a=%zz".to_string()), vec![])
        );
    }
}
