//! The admin listener: `/metrics`, `/healthz`, `/readyz`.
//!
//! It runs as its own pingora service on its own address, so scrapes and probes never queue
//! behind proxy traffic and are never reachable through a proxy route.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode, header};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::proxy::GatewayState;

/// The admin HTTP application.
pub struct AdminApp {
    state: Arc<GatewayState>,
}

impl AdminApp {
    pub fn new(state: Arc<GatewayState>) -> AdminApp {
        AdminApp { state }
    }

    async fn answer(
        &self,
        method: &http::Method,
        path: &str,
    ) -> (StatusCode, &'static str, Vec<u8>) {
        if method != http::Method::GET && method != http::Method::HEAD {
            return (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                b"only GET and HEAD\n".to_vec(),
            );
        }
        match path {
            "/metrics" => {
                let entries = self.state.cache.entry_count().await;
                self.state
                    .metrics
                    .cache_entries
                    .set(i64::try_from(entries).unwrap_or(i64::MAX));
                (
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.state.metrics.encode(),
                )
            }
            "/healthz" => (
                StatusCode::OK,
                "text/plain; charset=utf-8",
                b"ok\n".to_vec(),
            ),
            "/readyz" => {
                if self.state.is_ready() {
                    (
                        StatusCode::OK,
                        "text/plain; charset=utf-8",
                        b"ready\n".to_vec(),
                    )
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain; charset=utf-8",
                        b"not ready\n".to_vec(),
                    )
                }
            }
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                b"not found: try /metrics, /healthz or /readyz\n".to_vec(),
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let (status, content_type, body) = self.answer(&method, &path).await;
        let length = body.len();
        let body = if method == http::Method::HEAD {
            Vec::new()
        } else {
            body
        };
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, length)
            .header(header::CACHE_CONTROL, "no-store")
            .body(body)
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}
