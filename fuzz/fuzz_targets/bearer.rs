//! `Authorization` parsing (RFC 6750 §2.1) over arbitrary header bytes.
//!
//! The input is split on `\n` into up to four header values (each must be a valid
//! `HeaderValue`, as it would be after pingora parsed the request); the first byte picks
//! `max_token_bytes`. A token that is accepted must be exactly what RFC 6750 allows.

#![no_main]

use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use txgate::error::GatewayError;

fn is_b64token(token: &[u8]) -> bool {
    let body = token
        .iter()
        .rposition(|b| *b != b'=')
        .map_or(&[][..], |last| &token[..=last]);
    !body.is_empty()
        && body
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(b))
}

fuzz_target!(|data: &[u8]| {
    let Some((&max, rest)) = data.split_first() else {
        return;
    };
    let mut headers = HeaderMap::new();
    let mut count = 0;
    for value in rest.split(|b| *b == b'\n').take(4) {
        let Ok(value) = HeaderValue::from_bytes(value) else {
            return;
        };
        headers.append(header::AUTHORIZATION, value);
        count += 1;
    }
    let max = usize::from(max);
    match txgate::admission::credential::bearer(&headers, max) {
        Ok(token) => {
            assert_eq!(count, 1);
            assert!(token.len() <= max);
            assert!(is_b64token(token.as_bytes()), "{token:?}");
        }
        Err(GatewayError::DuplicateCredential) => assert!(count > 1),
        Err(GatewayError::MissingToken) => assert!(count <= 1),
        Err(GatewayError::TokenTooLarge(limit)) => assert_eq!(limit, max),
        Err(GatewayError::MalformedCredential(_)) => {}
        Err(other) => panic!("unexpected {other:?}"),
    }
});
