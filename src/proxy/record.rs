//! DESIGN.md step 8: the request's metrics and its one access-log event. Never a token: the
//! caller appears as a short fingerprint, the path with the request's tokens masked.

use pingora::Error as PingoraError;
use pingora::prelude::Session;

use super::RequestCtx;
use crate::redact;
use crate::token::CallerToken;

/// Records one finished request (pingora's `logging` phase).
pub(super) fn record(session: &Session, e: Option<&PingoraError>, ctx: &RequestCtx) {
    let state = &ctx.state;
    // The gateway's own answer counts as its HTTP status also when a gRPC caller got it as a
    // `grpc-status` in a 200; nothing written at all is 0.
    let written = session.response_written().map(|r| r.status.as_u16());
    let status = match (ctx.answered, written) {
        (Some(answered), Some(_)) => answered,
        (_, written) => written.unwrap_or(0),
    };
    let route = ctx.route().map_or("", |r| r.name.as_str());
    let label = if route.is_empty() { "_none" } else { route };
    let code = http::StatusCode::from_u16(status).ok();
    let status_label = code.as_ref().map_or("0", |c| c.as_str());
    let elapsed = ctx.started.elapsed();
    let prebuilt = ctx.route.and_then(|i| {
        state.route_metrics[i]
            .by_status
            .iter()
            .find(|(s, _)| *s == status)
            .map(|(_, counter)| counter)
    });
    match prebuilt {
        Some(counter) => counter.inc(),
        None => state
            .metrics
            .requests
            .with_label_values(&[label, status_label])
            .inc(),
    }
    match ctx.route {
        Some(i) => state.route_metrics[i]
            .duration
            .observe(elapsed.as_secs_f64()),
        None => state
            .metrics
            .request_duration
            .with_label_values(&[label])
            .observe(elapsed.as_secs_f64()),
    }
    let outcome = match (&ctx.error, e) {
        (Some(err), _) => err.outcome(),
        (None, Some(_)) => "proxy_error",
        (None, None) => "forwarded",
    };
    if !tracing::enabled!(target: "txgate::access", tracing::Level::INFO) {
        return;
    }
    let caller = ctx.caller.as_ref().map(CallerToken::fingerprint);
    let request = session.req_header();
    let presented = redact::presented(&request.uri, &request.headers);
    tracing::info!(
        target: "txgate::access",
        route = label,
        method = redact::method(request.method.as_str(), &presented),
        path = redact::path(request.uri.path(), &presented).as_ref(),
        status,
        outcome,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        exchange_ms = ctx
            .cache
            .and_then(|c| c.exchange_wait)
            .map(|d| d.as_secs_f64() * 1000.0),
        cache = ctx.cache.map(|c| c.lookup.as_str()),
        upstream = ctx.upstream_addr.map(|a| a.to_string()),
        request_id = ctx.request_id.as_ref().and_then(|v| v.to_str().ok()),
        caller = caller.as_deref(),
        error = e.map(|e| e.etype().as_str()),
    );
}
