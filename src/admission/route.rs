//! Stage 1: which route a request is for (DESIGN.md step 1).
//!
//! The route is chosen on the normalised path (see [`crate::path`]) and the one host the
//! request names. The upstream later receives that same normalised path, so what was routed is
//! what is served.

use std::sync::Arc;

use http::{HeaderValue, header};

use super::Request;
use crate::config::Route;
use crate::error::GatewayError;
use crate::path;
use crate::state::GatewayState;

/// The route of a request and the path it was chosen on.
#[derive(Debug)]
pub struct Target {
    /// The route's index in the configured order (the key of per-route metrics).
    pub index: usize,
    pub route: Arc<Route>,
    /// The normalised path, when it differs from the request's; the upstream receives it.
    pub normalized_path: Option<String>,
    /// The host the request named (its `Host`, or the URI's authority), as routed on; the
    /// upstream gets it as `X-Forwarded-Host`.
    pub host: Option<HeaderValue>,
}

/// Picks the route for `request`: 400 for a path that cannot be normalised or an ambiguous
/// host, 404 when no route matches.
pub fn select(state: &GatewayState, request: Request<'_>) -> Result<Target, GatewayError> {
    let host = host(request)?;
    let raw = request.uri.path();
    let normalized = path::normalize(raw, &state.paths).map_err(GatewayError::InvalidPath)?;
    let (index, route) = state
        .router
        .find(host.as_ref().map(|(name, _)| *name), &normalized)
        .ok_or(GatewayError::NoRoute)?;
    Ok(Target {
        index,
        route: route.clone(),
        normalized_path: match normalized {
            std::borrow::Cow::Borrowed(_) => None,
            std::borrow::Cow::Owned(path) => Some(path),
        },
        host: host.map(|(_, value)| value),
    })
}

/// The host a request names: the URI's authority (absolute-form, HTTP/2 `:authority`) or the
/// `Host` header. Both present and different, or several `Host` headers, is refused (RFC 9112
/// §3.2, RFC 9113 §8.3.1): the route and the upstream must not read different hosts.
fn host(request: Request<'_>) -> Result<Option<(&str, HeaderValue)>, GatewayError> {
    let mut values = request.headers.get_all(header::HOST).iter();
    let header = values.next();
    if values.next().is_some() {
        return Err(GatewayError::InvalidHost);
    }
    let header = header
        .map(|v| v.to_str().map(|name| (name, v)))
        .transpose()
        .map_err(|_| GatewayError::InvalidHost)?;
    match (request.uri.authority().map(|a| a.as_str()), header) {
        (Some(authority), Some((name, _))) if !authority.eq_ignore_ascii_case(name) => {
            Err(GatewayError::InvalidHost)
        }
        (_, Some((name, value))) => Ok(Some((name, value.clone()))),
        (Some(authority), None) => HeaderValue::from_str(authority)
            .map(|value| Some((authority, value)))
            .map_err(|_| GatewayError::InvalidHost),
        (None, None) => Ok(None),
    }
}
