//! The pingora front door: each `ProxyHttp` phase is a few lines that call one function
//! returning our own types ([`admission::admit`], [`forward::rewrite`], [`record::record`]).
//! pingora's `bool` and error conventions are translated in exactly one place each
//! (`request_filter` and `fail_to_proxy`).

pub mod forward;
pub mod grpc;
mod record;
mod reply;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use pingora::proxy::{FailToProxy, ProxyWarnLogContext};
use pingora::{Error as PingoraError, ErrorSource, ErrorType};

use crate::admission::{self, Admitted, Request, purge};
use crate::config::Route;
use crate::error::{GatewayError, ProxyFailure};
use crate::state::{CurrentState, GatewayState};
use reply::Reply;

pub use forward::fingerprint;

/// The pingora proxy application.
pub struct Gateway {
    current: CurrentState,
}

impl Gateway {
    pub fn new(current: CurrentState) -> Gateway {
        Gateway { current }
    }
}

/// What one request carries between phases: filled once, from admission's result.
pub struct RequestCtx {
    /// The configuration this request started with, even if a reload swaps it meanwhile.
    state: Arc<GatewayState>,
    started: Instant,
    request_id: Option<HeaderValue>,
    /// The route chosen, also for refused requests (metric and log labels).
    route: Option<usize>,
    /// The caller's bearer token once read, also for refused requests (its fingerprint is
    /// logged).
    caller: Option<crate::token::CallerToken>,
    /// How the token cache answered, also for refused requests.
    cache: Option<admission::CacheUse>,
    admitted: Option<Admitted>,
    error: Option<GatewayError>,
    /// The peer chosen for this request, and one that failed to connect (retry elsewhere).
    upstream_addr: Option<SocketAddr>,
    failed_peer: Option<SocketAddr>,
    retried: bool,
    /// The request was sent again with a fresh token after the upstream rejected one.
    token_retried: bool,
    /// The caller speaks gRPC: the gateway's own answers are gRPC statuses.
    grpc: bool,
    /// The caller's gRPC deadline (`grpc-timeout`), counted from the request's arrival.
    deadline: Option<Instant>,
    /// The HTTP status of the answer the gateway wrote itself. A gRPC caller receives it as a
    /// `grpc-status` in a 200, but metrics and the access log count what it stands for.
    answered: Option<u16>,
}

impl RequestCtx {
    fn route(&self) -> Option<&Arc<Route>> {
        self.route.and_then(|i| self.state.routes.get(i))
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            state: self.current.load_full(),
            started: Instant::now(),
            request_id: None,
            route: None,
            caller: None,
            cache: None,
            admitted: None,
            error: None,
            upstream_addr: None,
            failed_peer: None,
            retried: false,
            token_retried: false,
            grpc: false,
            deadline: None,
            answered: None,
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        let header = session.req_header();
        ctx.request_id = Some(forward::request_id(header));
        ctx.grpc = grpc::is_grpc(&header.headers);
        if ctx.grpc {
            ctx.deadline = grpc::timeout(&header.headers).and_then(|t| ctx.started.checked_add(t));
        }
        let request = Request {
            method: &header.method,
            uri: &header.uri,
            headers: &header.headers,
            client: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip()),
        };
        match admission::admit(&ctx.state, request).await {
            Ok(admitted) => {
                ctx.route = Some(admitted.target.index);
                ctx.caller = admitted.caller.token.clone();
                ctx.cache = admitted.upstream.cache;
                ctx.admitted = Some(admitted);
                // pingora: `false` = not answered here, go on to the upstream.
                Ok(false)
            }
            Err(refusal) => {
                ctx.route = refusal.route;
                ctx.caller = refusal.caller;
                ctx.cache = refusal.cache;
                let route = ctx.route().map_or("", |r| r.name.as_str());
                refusal.error.log(route);
                let reply = Reply::from_error(&refusal.error);
                ctx.answered = Some(refusal.error.status());
                ctx.error = Some(refusal.error);
                reply
                    .send(session, ctx.request_id.as_ref(), ctx.grpc)
                    .await?;
                // pingora: `true` = a response was sent, stop here.
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let route = ctx
            .route()
            .ok_or_else(|| PingoraError::explain(ErrorType::InternalError, "no route selected"))?;
        let (addr, mut peer) = route.upstream.select(ctx.failed_peer).ok_or_else(|| {
            PingoraError::explain(ErrorType::ConnectNoRoute, "no upstream peer is available")
        })?;
        if session.is_upgrade_req() {
            route.upstream.pin_http1_for_upgrade(&mut peer);
        }
        if let Some(deadline) = ctx.deadline {
            bound_by_deadline(&mut peer, deadline)?;
        }
        ctx.upstream_addr = Some(addr);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<PingoraError>,
    ) -> Box<PingoraError> {
        // One retry, on another peer, for requests that are safe to repeat (RFC 9110 §9.2.2).
        let other_peers = ctx.route().is_some_and(|r| r.upstream.peers.len() > 1);
        if !ctx.retried && other_peers && session.req_header().method.is_idempotent() {
            ctx.retried = true;
            ctx.failed_peer = ctx.upstream_addr;
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let Some(admitted) = &ctx.admitted else {
            return Err(PingoraError::explain(
                ErrorType::InternalError,
                "forwarding a request that was not admitted",
            ));
        };
        let hop = forward::Hop {
            request_id: ctx.request_id.as_ref(),
            client: session.client_addr().and_then(|a| a.as_inet()).copied(),
            upgrade: session.is_upgrade_req(),
            over_tls: session.digest().is_some_and(|d| d.ssl_digest.is_some()),
        };
        // A request whose decided path cannot be written is not forwarded (500), never sent
        // with the path as the caller wrote it.
        forward::rewrite(upstream, admitted, &hop)
            .map_err(|e| PingoraError::because(ErrorType::InternalError, "forwarding", e))?;
        if let Some(deadline) = ctx.deadline {
            // The upstream gets what is left of the caller's deadline, as gRPC proxies pass it.
            let left = deadline.saturating_duration_since(Instant::now());
            upstream.insert_header("grpc-timeout", grpc::timeout_value(left))?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let request = session.req_header();
        let repeatable =
            !ctx.token_retried && request.method.is_idempotent() && session.is_body_empty();
        let Some(admitted) = ctx.admitted.as_mut() else {
            return Ok(());
        };
        let status = response.status.as_u16();
        match purge::after_upstream(&ctx.state, admitted, status, repeatable).await {
            purge::AfterUpstream::Forward => Ok(()),
            purge::AfterUpstream::Retry => {
                // pingora: an error marked for retry before anything went downstream runs
                // upstream_peer and upstream_request_filter again (now with the fresh token).
                ctx.token_retried = true;
                let mut e = PingoraError::explain(
                    ErrorType::Custom(TOKEN_REJECTED),
                    format!("upstream answered {status}; retrying with a fresh token"),
                );
                e.set_retry(true);
                Err(e)
            }
        }
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let wanted = ctx.route().is_none_or(|r| r.headers.request_id);
        if let Some(id) = ctx.request_id.as_ref().filter(|_| wanted) {
            response.insert_header(forward::WIRE_X_REQUEST_ID, id.clone())?;
        }
        Ok(())
    }

    /// pingora warns "Fail to proxy" before each retry; a purge-and-retry is not a failure
    /// (it is counted in `txgate_upstream_token_purges_total`), so that one warning is left out.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        e: &PingoraError,
        context: ProxyWarnLogContext,
    ) -> bool {
        matches!(context, ProxyWarnLogContext::UpstreamRetry)
            && e.etype() == &ErrorType::Custom(TOKEN_REJECTED)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &PingoraError,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let failure = classify(e);
        if let Some(reply) = Reply::from_proxy_failure(failure) {
            match reply.send(session, ctx.request_id.as_ref(), ctx.grpc).await {
                Ok(()) => ctx.answered = failure.status(),
                Err(write) => {
                    tracing::debug!(error = %write, "cannot send the error response downstream");
                }
            }
        }
        FailToProxy {
            // pingora: 0 = no response was sent.
            error_code: failure.status().unwrap_or(0),
            can_reuse_downstream: false,
        }
    }

    /// pingora puts this in its own error logs; the default includes the query string, where a
    /// caller may have put a token. Method and path only, with any caller token masked.
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let request = session.req_header();
        let presented = crate::redact::presented(&request.uri, &request.headers);
        format!(
            "{} {}",
            crate::redact::method(request.method.as_str(), &presented),
            crate::redact::path(request.uri.path(), &presented)
        )
    }

    async fn logging(&self, session: &mut Session, e: Option<&PingoraError>, ctx: &mut RequestCtx) {
        record::record(session, e, ctx);
    }
}

/// The error that makes pingora send a request again after the upstream rejected its token.
const TOKEN_REJECTED: &str = "upstream rejected the token";
/// Shortens the peer's connect and read timeouts to what is left of a gRPC caller's deadline,
/// so a call the caller has given up on does not hold an upstream connection; a deadline
/// already past (the exchange took it) is an upstream timeout without connecting.
fn bound_by_deadline(peer: &mut HttpPeer, deadline: Instant) -> pingora::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(PingoraError::explain(
            ErrorType::ConnectTimedout,
            "the caller's gRPC deadline passed before the upstream was called",
        )
        .into_up());
    }
    let options = &mut peer.options;
    options.connection_timeout = Some(options.connection_timeout.map_or(left, |t| t.min(left)));
    options.read_timeout = Some(options.read_timeout.map_or(left, |t| t.min(left)));
    Ok(())
}

/// Which [`ProxyFailure`] a pingora error after admission is.
fn classify(e: &PingoraError) -> ProxyFailure {
    match e.etype() {
        ErrorType::HTTPStatus(code) => ProxyFailure::Status(*code),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if e.esource() == &ErrorSource::Upstream =>
        {
            ProxyFailure::UpstreamTimeout
        }
        _ => match e.esource() {
            ErrorSource::Upstream => ProxyFailure::UpstreamUnavailable,
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                    ProxyFailure::ClientGone
                }
                _ => ProxyFailure::BadRequest,
            },
            ErrorSource::Internal | ErrorSource::Unset => ProxyFailure::Internal,
        },
    }
}

/// Admission and forwarding decisions on requests read by pingora's own HTTP/1 parser from a
/// mock stream: no listener, no upstream, no STS (every request here is decided before one
/// would be called).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const YAML: &str = r#"
server: { listen: ["127.0.0.1:0"] }
token_services:
  corp: { token_endpoint: "http://127.0.0.1:1/token", client_id: gw, client_secret: s }
routes:
  - name: public
    match: { path_prefix: "/public" }
    upstream: "http://127.0.0.1:1"
    headers: { set: { x-route: "public-route-value" } }
    exchange: { mode: none }
  - name: orders
    match: { path_prefix: "/orders" }
    upstream: "http://127.0.0.1:1"
    exchange: { mode: impersonation, token_service: corp, audience: ["https://orders"] }
"#;

    fn state() -> GatewayState {
        let config = Config::from_yaml(YAML, "test.yaml", &|_| None).unwrap();
        GatewayState::new(&config, None).unwrap()
    }

    /// The request pingora's parser reads from `raw`.
    async fn parsed(raw: &str) -> Session {
        let stream = tokio_test::io::Builder::new().read(raw.as_bytes()).build();
        let mut session = Session::new_h1(Box::new(stream));
        assert!(session.read_request().await.unwrap(), "{raw}");
        session
    }

    /// Every proxied request holds admission's future across its awaits and moves it around:
    /// a stage that inlines a rarely taken path (a chain's nested lookups, a Transaction
    /// Token's validation, the shared cache's Redis state) grows it for every request, and
    /// the copies cost more than the rare path's allocation (callgrind: +66k instructions per
    /// cached request once). Such paths are boxed; this bound keeps them so.
    #[test]
    fn the_admission_future_stays_small() {
        let state = state();
        let (method, uri, headers) = (
            http::Method::GET,
            http::Uri::from_static("/orders/1"),
            http::HeaderMap::new(),
        );
        let request = Request {
            method: &method,
            uri: &uri,
            headers: &headers,
            client: None,
        };
        let future = admission::admit(&state, request);
        let size = std::mem::size_of_val(&future);
        assert!(
            size <= ADMISSION_FUTURE_BYTES,
            "admission's future grew to {size} bytes"
        );
    }

    /// The bound of [`the_admission_future_stays_small`]: 6,576 bytes in a debug build today;
    /// the chain's lookups inlined made it 32,816.
    const ADMISSION_FUTURE_BYTES: usize = 8192;

    async fn admit(state: &GatewayState, raw: &str) -> Result<Admitted, admission::Refusal> {
        let session = parsed(raw).await;
        let header = session.req_header();
        let request = Request {
            method: &header.method,
            uri: &header.uri,
            headers: &header.headers,
            client: None,
        };
        admission::admit(state, request).await
    }

    fn refused(
        result: Result<Admitted, admission::Refusal>,
    ) -> (u16, &'static str, Option<String>) {
        let refusal = result.err().expect("refused");
        let route = refusal.route.map(|i| ["public", "orders"][i].to_string());
        (refusal.error.status(), refusal.error.outcome(), route)
    }

    #[tokio::test]
    async fn paths_are_routed_in_their_normal_form() {
        let state = state();
        for path in [
            "/public/../orders/7",
            "/public/%2e%2e/orders/7",
            "/public/.%2E/orders/7",
            "//orders//7",
        ] {
            let raw = format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n");
            // The orders route, which needs a token: never the public one.
            assert_eq!(
                refused(admit(&state, &raw).await),
                (401, "missing_token", Some("orders".into())),
                "{path}"
            );
        }
        for path in [
            "/public/..%2forders/7",
            "/public/a%5Cb",
            "/../orders",
            "/a%zz",
        ] {
            let raw = format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n");
            assert_eq!(
                refused(admit(&state, &raw).await),
                (400, "invalid_path", None),
                "{path}"
            );
        }
        let admitted = admit(&state, "GET /public/x/./y HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            admitted.target.normalized_path.as_deref(),
            Some("/public/x/y")
        );
    }

    #[tokio::test]
    async fn url_rules_hold_on_a_public_route() {
        let state = state();
        let token = "caller-token-123";
        for target in [
            format!("/public/{token}"),
            "/public/caller%2Dtoken%2D123".to_string(),
            format!("/public?q={token}"),
            "/public?q=caller%2Dtoken%2D123".to_string(),
        ] {
            let raw = format!(
                "GET {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n"
            );
            assert_eq!(
                refused(admit(&state, &raw).await),
                (400, "token_in_url", Some("public".into())),
                "{target}"
            );
        }
        let raw = format!(
            "GET /public HTTP/1.1\r\nHost: x{token}\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        assert_eq!(refused(admit(&state, &raw).await).1, "token_in_url");
        let many = "access_token=aaaaaaaa&".repeat(5);
        let raw = format!("GET /public?{many} HTTP/1.1\r\nHost: gw\r\n\r\n");
        assert_eq!(
            refused(admit(&state, &raw).await).1,
            "too_many_query_tokens"
        );
        // pingora's HTTP/1 parser refuses this itself; an HTTP/2 request can still carry it.
        let uri: http::Uri = "http://other/public".parse().unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, HeaderValue::from_static("gw"));
        let request = Request {
            method: &http::Method::GET,
            uri: &uri,
            headers: &headers,
            client: None,
        };
        assert_eq!(
            refused(admission::admit(&state, request).await).1,
            "invalid_host"
        );
    }

    #[tokio::test]
    async fn the_guard_never_removes_the_gateways_own_headers() {
        let state = state();
        // The caller names values the gateway's own headers contain.
        let raw = "GET /public/a?access_token=127.0.0.1&access_token=public-route-value&x=1 HTTP/1.1\r\n\
                   Host: gw\r\nX-Forwarded-For: 127.0.0.1\r\nX-Copy: public-route-value\r\n\r\n";
        let session = parsed(raw).await;
        let admitted = {
            let header = session.req_header();
            let request = Request {
                method: &header.method,
                uri: &header.uri,
                headers: &header.headers,
                client: None,
            };
            admission::admit(&state, request).await.unwrap()
        };
        let mut upstream = session.req_header().clone();
        let id = HeaderValue::from_static("req-1");
        let hop = forward::Hop {
            request_id: Some(&id),
            client: Some("127.0.0.1:4000".parse().unwrap()),
            upgrade: false,
            over_tls: false,
        };
        forward::rewrite(&mut upstream, &admitted, &hop).unwrap();
        let header = |name: &str| upstream.headers.get(name).map(|v| v.to_str().unwrap());
        assert_eq!(upstream.uri.to_string(), "/public/a?x=1");
        // The caller's copies are gone, the gateway's own headers are there.
        assert_eq!(header("x-copy"), None);
        assert_eq!(header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(header("x-route"), Some("public-route-value"));
        assert_eq!(header("x-forwarded-proto"), Some("http"));
        assert_eq!(header("x-request-id"), Some("req-1"));
        assert_eq!(header("authorization"), None);
    }
}
