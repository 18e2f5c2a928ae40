//! STS answer parsing (RFC 8693 §2.2, RFC 6749 §5.2): any status and body become a token or an
//! error, never a panic; only a 200 yields a token, and that token is safe to put in an
//! `Authorization` header.
//!
//! Needs `txgate::exchange::interpret` to be public.

#![no_main]

use std::time::Duration;

use http::StatusCode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [hi, lo, retry, body @ ..] = data else {
        return;
    };
    // Statuses 100..=999 are all the http crate accepts.
    let code = 100 + u16::from_be_bytes([*hi, *lo]) % 900;
    let Ok(status) = StatusCode::from_u16(code) else {
        return;
    };
    let retry_after = (*retry > 0).then(|| Duration::from_secs(u64::from(*retry)));
    match txgate::exchange::interpret(status, retry_after, body) {
        Ok(token) => {
            assert_eq!(status, StatusCode::OK);
            assert!(!token.access_token.is_empty());
            assert!(
                token
                    .access_token
                    .bytes()
                    .all(txgate::exchange::is_token_char)
            );
            assert!(
                token
                    .expires_in
                    .is_none_or(|d| d <= Duration::from_secs(24 * 3600))
            );
        }
        Err(e) => {
            let _ = e.outcome();
        }
    }
});
