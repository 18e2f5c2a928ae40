//! DESIGN.md step 7: the request the upstream receives. The caller's credential goes out, the
//! path and query become the ones admission decided on, the leak guard drops any caller header
//! still carrying the caller's token, and only then does the gateway add its own headers
//! (route `headers.set`, forwarding headers, the request id, the exchanged `Authorization`), so
//! nothing a caller chooses can make the guard remove them.

use std::net::SocketAddr;

use http::{HeaderName, HeaderValue, header};
use pingora::http::RequestHeader;

use crate::admission::{Admitted, Caller};
use crate::redact;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static TXN_TOKEN: HeaderName = HeaderName::from_static("txn-token");
// The same names as written on the wire. pingora's `insert_header` turns a custom `HeaderName`
// into its wire spelling by copying it; a `&'static str` is used as it is.
pub(crate) const WIRE_X_REQUEST_ID: &str = "X-Request-Id";
const WIRE_X_FORWARDED_FOR: &str = "X-Forwarded-For";
const WIRE_X_FORWARDED_PROTO: &str = "X-Forwarded-Proto";
const WIRE_X_FORWARDED_HOST: &str = "X-Forwarded-Host";

/// What the forwarding step needs besides the admitted request.
pub struct Hop<'a> {
    pub request_id: Option<&'a HeaderValue>,
    /// The client's address (`X-Forwarded-For`).
    pub client: Option<SocketAddr>,
    /// A WebSocket (or other) upgrade: `Connection: upgrade` and `Upgrade` stay.
    pub upgrade: bool,
    /// The request arrived over TLS (`X-Forwarded-Proto: https`).
    pub over_tls: bool,
}

/// The upstream URI could not be built from the decided path and query: the request is not
/// forwarded at all (never with the path or query as sent).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the upstream URI from the normalised path and query")]
pub struct UnbuildableUri;

/// Rewrites the upstream request of an admitted request.
pub fn rewrite(
    upstream: &mut RequestHeader,
    admitted: &Admitted,
    hop: &Hop<'_>,
) -> Result<(), UnbuildableUri> {
    // `remove_header` drops every value of the name at once.
    upstream.remove_header(&header::AUTHORIZATION);
    // A Transaction Token from outside the trust domain is never passed on: only an internal
    // route, which validates it, keeps the one it was sent.
    if admitted.target.route.txn_token.is_none() {
        upstream.remove_header(&TXN_TOKEN);
    }
    // pingora has set the version the upstream speaks. HTTP/2 has no upgrade (RFC 9113 §8.6)
    // and no connection-specific headers (§8.2.2) but one: `te: trailers`, which gRPC sends to
    // find proxies that would drop its trailers, and which therefore passes to an HTTP/2
    // upstream when the caller sent it.
    let h2 = upstream.version == http::Version::HTTP_2;
    let trailers = h2 && accepts_trailers(upstream);
    remove_hop_by_hop(upstream, hop.upgrade && !h2);
    if trailers {
        let _ = upstream.insert_header(header::TE, HeaderValue::from_static("trailers"));
    }
    let rules = &admitted.target.route.headers;
    for name in &rules.remove {
        upstream.remove_header(name);
    }
    leak_guard(upstream, &admitted.caller);
    if let Some(uri) = upstream_uri(&upstream.uri, admitted)? {
        upstream.set_uri(uri);
    }
    // The gateway's own headers, after the guard.
    for (name, value) in &rules.set {
        let _ = upstream.insert_header(name.clone(), value.clone());
    }
    if rules.forwarded {
        forwarded(upstream, admitted, hop);
    }
    if let Some(id) = hop.request_id.filter(|_| rules.request_id) {
        let _ = upstream.insert_header(WIRE_X_REQUEST_ID, id.clone());
    }
    if let Some(value) = &admitted.upstream.value {
        let _ = upstream.insert_header(admitted.upstream.header.wire_name(), value.clone());
    }
    Ok(())
}

/// `X-Forwarded-Host`, `X-Forwarded-For` (appended to what a proxy before us wrote) and
/// `X-Forwarded-Proto`.
fn forwarded(upstream: &mut RequestHeader, admitted: &Admitted, hop: &Hop<'_>) {
    if let Some(host) = &admitted.target.host {
        let _ = upstream.insert_header(WIRE_X_FORWARDED_HOST, host.clone());
    }
    if let Some(ip) = hop.client.map(|a| a.ip()) {
        let value = match upstream
            .headers
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
        {
            Some(prior) => HeaderValue::try_from(format!("{prior}, {ip}")).ok(),
            None => ip_header_value(ip),
        };
        if let Some(value) = value {
            let _ = upstream.insert_header(WIRE_X_FORWARDED_FOR, value);
        }
    }
    let proto = if hop.over_tls { "https" } else { "http" };
    let _ = upstream.insert_header(WIRE_X_FORWARDED_PROTO, HeaderValue::from_static(proto));
}

/// The URI the upstream receives when it differs from the request's: the normalised path and
/// the query without `access_token`; scheme and authority as they were.
fn upstream_uri(uri: &http::Uri, admitted: &Admitted) -> Result<Option<http::Uri>, UnbuildableUri> {
    let path = admitted.target.normalized_path.as_deref();
    let query = admitted.caller.query.as_ref();
    if path.is_none() && query.is_none() {
        return Ok(None);
    }
    let path = path.unwrap_or(uri.path());
    let query = match query {
        Some(rest) => rest.as_deref(),
        None => uri.query(),
    };
    let path_and_query = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().map_err(|_| UnbuildableUri)?);
    http::Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| UnbuildableUri)
}

/// Drops every caller header whose value still contains one of the caller's tokens (e.g. an
/// `X-Forwarded-Access-Token` set by an edge proxy, a cookie). One pass over the header bytes
/// per guarded token, and there are at most five of those.
fn leak_guard(upstream: &mut RequestHeader, caller: &Caller) {
    for name in caller.headers_carrying(&upstream.headers) {
        tracing::debug!(header = %name, "dropped a header carrying the caller's token");
        upstream.remove_header(&name);
    }
}

/// An IP address as a header value, formatted on the stack (no intermediate `String`).
fn ip_header_value(ip: std::net::IpAddr) -> Option<HeaderValue> {
    use std::io::Write;
    // The longest text form of an IPv6 address is 45 bytes.
    let mut buf = [0u8; 48];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    write!(cursor, "{ip}").ok()?;
    let len = usize::try_from(cursor.position()).ok()?;
    HeaderValue::from_bytes(&buf[..len]).ok()
}

/// Whether the request's `TE` lists `trailers` (RFC 9110 §10.1.4).
fn accepts_trailers(request: &RequestHeader) -> bool {
    request
        .headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// RFC 9110 §7.6.1: connection-specific headers are not forwarded. For an upgrade (WebSocket)
/// request `Connection: upgrade` and `Upgrade` are what the upstream needs, so they stay.
fn remove_hop_by_hop(upstream: &mut RequestHeader, upgrade: bool) {
    static HOP_BY_HOP: [HeaderName; 4] = [
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
    ];
    // Most requests carry none of these: one pass over the names decides, and the removals
    // (each a hash lookup in two maps) run only for what is there.
    let present = upstream.headers.keys().any(|name| {
        name == header::CONNECTION || name == header::UPGRADE || HOP_BY_HOP.contains(name)
    });
    if !present {
        return;
    }
    for name in &HOP_BY_HOP {
        upstream.remove_header(name);
    }
    if !upstream.headers.contains_key(header::CONNECTION) {
        if !upgrade {
            upstream.remove_header(&header::UPGRADE);
        }
        return;
    }
    let listed: Vec<HeaderName> = upstream
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .filter(|name| !(upgrade && name == header::UPGRADE))
        .collect();
    for name in listed {
        upstream.remove_header(&name);
    }
    if upgrade {
        let _ = upstream.insert_header(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        upstream.remove_header(&header::CONNECTION);
        upstream.remove_header(&header::UPGRADE);
    }
}

/// The client's `X-Request-Id` if it is short, plain and carries no credential of the request
/// (it is logged and echoed; see [`redact::kept_request_id`]), else a new random one.
pub fn request_id(request: &RequestHeader) -> HeaderValue {
    if let Some(value) = redact::kept_request_id(&request.uri, &request.headers) {
        return value.clone();
    }
    // 32 hex digits written on the stack: no formatting machinery on the hot path.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let id: u128 = rand::random();
    let mut digits = [0u8; 32];
    for (i, d) in digits.iter_mut().enumerate() {
        *d = HEX[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&digits).unwrap_or(HeaderValue::from_static("0"))
}

/// A short fingerprint of a token for logs: 16 hex digits of its SHA-256.
pub use crate::token::fingerprint;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn caller(tokens: &[&str]) -> Caller {
        Caller {
            token: None,
            guarded: tokens.iter().map(|t| Arc::from(*t)).collect(),
            query: None,
        }
    }

    #[test]
    fn leak_guard_drops_headers_carrying_the_token() {
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("x-forwarded-access-token", "tok123456")
            .unwrap();
        req.insert_header("x-other", "prefix-tok123456-suffix")
            .unwrap();
        req.insert_header("x-fine", "nothing").unwrap();
        leak_guard(&mut req, &caller(&["tok123456"]));
        assert!(req.headers.get("x-forwarded-access-token").is_none());
        assert!(req.headers.get("x-other").is_none());
        assert_eq!(req.headers.get("x-fine").unwrap(), "nothing");
    }

    #[test]
    fn request_ids_are_kept_only_when_plain_and_clean() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-request-id", "abc-123").unwrap();
        assert_eq!(request_id(&req), "abc-123");
        req.insert_header("x-request-id", "has space").unwrap();
        assert_ne!(request_id(&req), "has space");
        assert_eq!(request_id(&req).len(), 32);
        // A request id that carries the request's own credential is replaced: it is logged.
        req.insert_header("x-request-id", "id-secret-token-1")
            .unwrap();
        req.insert_header("authorization", "Bearer secret-token-1")
            .unwrap();
        assert_ne!(request_id(&req), "id-secret-token-1");
    }

    #[test]
    fn fingerprints_are_short_and_stable() {
        assert_eq!(fingerprint("a"), fingerprint("a"));
        assert_eq!(fingerprint("a").len(), 16);
        assert_ne!(fingerprint("a"), fingerprint("b"));
    }
}
