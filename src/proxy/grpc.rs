//! gRPC callers: the gateway's own answers in gRPC's terms, and the caller's deadline.
//!
//! A gRPC client reads the outcome of a call from `grpc-status`, not from the HTTP status: a
//! plain 401 or 503 reaches its application as `UNKNOWN` or `INTERNAL` with the cause lost. So
//! when the caller speaks gRPC (`content-type: application/grpc*`), every answer the gateway
//! writes itself is a gRPC "Trailers-Only" response (HTTP 200 and `grpc-status` /
//! `grpc-message` in the one header block that ends the stream), as the gRPC HTTP/2 protocol
//! spec (PROTOCOL-HTTP2.md) defines and Envoy does. The status comes from [`code_for`], the one
//! table from the gateway's HTTP statuses to gRPC codes; `docs/errors.md` shows the same table.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, header};

/// The gRPC status codes the gateway answers with (grpc/doc/statuscodes.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl Code {
    /// The decimal text of `grpc-status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Unknown => "2",
            Code::InvalidArgument => "3",
            Code::DeadlineExceeded => "4",
            Code::PermissionDenied => "7",
            Code::ResourceExhausted => "8",
            Code::Unimplemented => "12",
            Code::Internal => "13",
            Code::Unavailable => "14",
            Code::Unauthenticated => "16",
        }
    }
}

/// The gRPC status of an answer the gateway writes with HTTP status `status`: the one table.
///
/// It follows grpc/doc/http-grpc-status-mapping.md (401 → UNAUTHENTICATED, 403 →
/// PERMISSION_DENIED, 404 → UNIMPLEMENTED, 502/503 → UNAVAILABLE) where the gateway means
/// what that table assumes. Where the gateway knows more than a status code tells, it says so:
/// its 400s are requests it refuses to forward (a token in the URL, a bad path: the caller's
/// argument, INVALID_ARGUMENT, where the generic table's INTERNAL stands for a broken gRPC
/// frame), 431 is gRPC's own answer to oversized metadata (RESOURCE_EXHAUSTED), 504 is a
/// deadline the STS or the upstream missed (DEADLINE_EXCEEDED, where the generic table says
/// UNAVAILABLE) and 500 is the gateway's own failure (INTERNAL).
pub fn code_for(status: u16) -> Code {
    match status {
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        431 => Code::ResourceExhausted,
        500 => Code::Internal,
        502 | 503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ => Code::Unknown,
    }
}

/// Whether the request is a gRPC call: `content-type` is `application/grpc` or
/// `application/grpc+<codec>` / `application/grpc;<params>` (PROTOCOL-HTTP2.md). gRPC-Web
/// (`application/grpc-web*`) frames its trailers in the body and is not a gRPC caller here.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let bytes = value.as_bytes();
    const GRPC: &[u8] = b"application/grpc";
    bytes.len() >= GRPC.len()
        && bytes[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(bytes.get(GRPC.len()), None | Some(b'+' | b';'))
}

/// The caller's deadline from `grpc-timeout` (PROTOCOL-HTTP2.md: at most 8 digits and a unit
/// `H`, `M`, `S`, `m`, `u` or `n`); `None` when absent or malformed (a malformed value is not a
/// deadline the gateway can honour; the upstream judges it).
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let bytes = headers.get("grpc-timeout")?.as_bytes();
    let (&unit, digits) = bytes.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `left` as a `grpc-timeout` value: milliseconds (rounded up, so a deadline never reaches the
/// upstream as zero), or seconds when that does not fit in 8 digits.
pub fn timeout_value(left: Duration) -> HeaderValue {
    let millis = left.as_nanos().div_ceil(1_000_000).max(1);
    let text = if millis < 100_000_000 {
        format!("{millis}m")
    } else {
        format!("{}S", left.as_secs().min(99_999_999))
    };
    HeaderValue::try_from(text).unwrap_or(HeaderValue::from_static("1m"))
}

/// `grpc-message`: percent-encoded UTF-8, every byte outside printable ASCII and `%` itself
/// escaped (PROTOCOL-HTTP2.md, "Status-Message").
pub fn message(text: &str) -> HeaderValue {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
    let encoded = percent_encoding::utf8_percent_encode(text, SET).to_string();
    HeaderValue::try_from(encoded).unwrap_or(HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_bytes(v.as_bytes()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn grpc_callers_are_told_by_their_content_type() {
        for grpc in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json",
            "application/grpc;charset=utf-8",
        ] {
            assert!(is_grpc(&headers(&[("content-type", grpc)])), "{grpc}");
        }
        for other in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpcx",
            "application/json",
            "",
        ] {
            assert!(!is_grpc(&headers(&[("content-type", other)])), "{other}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn deadlines_are_read_in_every_unit_and_malformed_ones_ignored() {
        let t = |v: &'static str| timeout(&headers(&[("grpc-timeout", v)]));
        assert_eq!(t("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(t("3M"), Some(Duration::from_secs(180)));
        assert_eq!(t("10S"), Some(Duration::from_secs(10)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(t("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "123456789m", "10", "10s", "-1S", "1.5S", "１S"] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    #[test]
    fn remaining_time_is_written_in_eight_digits_and_never_zero() {
        assert_eq!(timeout_value(Duration::from_millis(1500)), "1500m");
        assert_eq!(timeout_value(Duration::from_micros(1)), "1m");
        assert_eq!(timeout_value(Duration::ZERO), "1m");
        assert_eq!(timeout_value(Duration::from_secs(200_000)), "200000S");
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(
            message("a bearer token is required"),
            "a bearer token is required"
        );
        assert_eq!(message("100% sure\n"), "100%25 sure%0A");
        assert_eq!(message("é"), "%C3%A9");
    }

    #[test]
    fn the_table_maps_every_status_the_gateway_writes() {
        for (status, code) in [
            (400, 3),
            (401, 16),
            (403, 7),
            (404, 12),
            (431, 8),
            (500, 13),
            (502, 14),
            (503, 14),
            (504, 4),
            (418, 2),
        ] {
            assert_eq!(code_for(status) as u8, code, "{status}");
            assert_eq!(code_for(status).as_str(), code.to_string(), "{status}");
        }
    }
}
