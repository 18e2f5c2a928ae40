//! Envoy's HTTP authorization service contract (`http_service`): Envoy sends the request's
//! method, path (and query) and headers, without its body, to this listener. A 200 answer allows
//! the request: Envoy copies the answer's headers named in `allowed_upstream_headers` onto the
//! upstream request (replacing any value there) and removes the headers listed in
//! `x-envoy-auth-headers-to-remove`. Any other answer goes to the caller with its body and the
//! headers named in `allowed_client_headers`.
//!
//! What this contract cannot do, and what txgate does instead: it cannot remove a query
//! parameter, so a token in `access_token` is refused (400) rather than forwarded; it cannot
//! rewrite the path, so (as over gRPC) a path normalisation would change is refused (400).
//! Envoy's `path_prefix` must be empty: the path is routed as received.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, StatusCode};

use super::{Described, Transport, Verdict};
use crate::state::CurrentState;

/// The answer header that lists the headers Envoy removes from the upstream request.
pub const HEADERS_TO_REMOVE: HeaderName = HeaderName::from_static("x-envoy-auth-headers-to-remove");

/// The HTTP ext_authz service: every method and path is a Check.
pub fn router(current: CurrentState) -> axum::Router {
    axum::Router::new().fallback(check).with_state(current)
}

async fn check(State(current): State<CurrentState>, request: axum::extract::Request) -> Response {
    let (parts, _body) = request.into_parts();
    let described = Described {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        // Envoy's HTTP contract does not say who the caller is (its `x-forwarded-for` is
        // whatever Envoy was configured to write).
        client: None,
    };
    answer(super::check(&current, Transport::Http, &described).await)
}

/// The HTTP answer of a verdict.
fn answer(verdict: Verdict) -> Response {
    match verdict {
        Verdict::Allow(mutations) => {
            let mut response = StatusCode::OK.into_response();
            let headers = response.headers_mut();
            for (name, value) in mutations.set {
                headers.insert(name, value);
            }
            let removed: Vec<&str> = mutations.remove.iter().map(HeaderName::as_str).collect();
            if !removed.is_empty()
                && let Ok(list) = HeaderValue::from_str(&removed.join(", "))
            {
                headers.insert(HEADERS_TO_REMOVE, list);
            }
            response
        }
        Verdict::Deny(denial) => {
            let status =
                StatusCode::from_u16(denial.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (status, denial.body.clone()).into_response();
            let headers = response.headers_mut();
            for (name, value) in denial.headers() {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(name, value);
                }
            }
            response
        }
    }
}
