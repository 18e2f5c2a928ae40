//! Answers the gateway writes itself: refusals from admission and failures to proxy, each a
//! JSON body from the tables in [`crate::error`], never cached by clients; to a gRPC caller
//! the same answer as a gRPC status (see [`super::grpc`]).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, header};
use pingora::http::ResponseHeader;
use pingora::prelude::Session;

use super::forward::WIRE_X_REQUEST_ID;
use super::grpc;
use crate::error::{GatewayError, ProxyFailure};

/// A response written by the gateway itself.
pub struct Reply {
    status: u16,
    body: String,
    /// The public description (the body's `error_description`; a gRPC caller's
    /// `grpc-message`).
    message: &'static str,
    www_authenticate: Option<String>,
    retry_after: Option<Duration>,
}

impl Reply {
    pub fn from_error(error: &GatewayError) -> Reply {
        Reply {
            status: error.status(),
            body: error.body(),
            message: error.description(),
            www_authenticate: error.www_authenticate(),
            retry_after: error.retry_after(),
        }
    }

    /// The answer to a failure after admission; `None` when nobody is left to answer.
    pub fn from_proxy_failure(failure: ProxyFailure) -> Option<Reply> {
        Some(Reply {
            status: failure.status()?,
            body: failure.body(),
            message: failure.description(),
            www_authenticate: None,
            retry_after: None,
        })
    }

    /// Writes the answer: to a gRPC caller (`grpc`) as a gRPC status, else as JSON.
    pub async fn send(
        self,
        session: &mut Session,
        request_id: Option<&HeaderValue>,
        grpc: bool,
    ) -> pingora::Result<()> {
        if grpc {
            return self.send_grpc(session, request_id).await;
        }
        let mut response = ResponseHeader::build(self.status, Some(6))?;
        response.insert_header(header::CONTENT_TYPE, "application/json")?;
        response.insert_header(header::CACHE_CONTROL, "no-store")?;
        response.insert_header(header::CONTENT_LENGTH, self.body.len().to_string())?;
        if let Some(challenge) = self.www_authenticate {
            response.insert_header(header::WWW_AUTHENTICATE, challenge)?;
        }
        if let Some(after) = self.retry_after {
            response.insert_header(header::RETRY_AFTER, after.as_secs().max(1).to_string())?;
        }
        if let Some(id) = request_id {
            response.insert_header(WIRE_X_REQUEST_ID, id.clone())?;
        }
        session.set_keepalive(None);
        session
            .write_response_header(Box::new(response), false)
            .await?;
        session
            .write_response_body(Some(Bytes::from(self.body)), true)
            .await
    }
}

impl Reply {
    /// A gRPC "Trailers-Only" answer: HTTP 200 and the status in the one header block, which
    /// ends the stream. The challenge and `Retry-After` stay: a client can still read them.
    async fn send_grpc(
        self,
        session: &mut Session,
        request_id: Option<&HeaderValue>,
    ) -> pingora::Result<()> {
        let mut response = ResponseHeader::build(200, Some(6))?;
        response.insert_header(header::CONTENT_TYPE, "application/grpc")?;
        response.insert_header("grpc-status", grpc::code_for(self.status).as_str())?;
        response.insert_header("grpc-message", grpc::message(self.message))?;
        if let Some(challenge) = self.www_authenticate {
            response.insert_header(header::WWW_AUTHENTICATE, challenge)?;
        }
        if let Some(after) = self.retry_after {
            response.insert_header(header::RETRY_AFTER, after.as_secs().max(1).to_string())?;
        }
        if let Some(id) = request_id {
            response.insert_header(WIRE_X_REQUEST_ID, id.clone())?;
        }
        if !session.is_http2() {
            // HTTP/1.1 has no frame to end the message with: say it is empty.
            response.insert_header(header::CONTENT_LENGTH, "0")?;
            session.set_keepalive(None);
        }
        session
            .write_response_header(Box::new(response), true)
            .await
    }
}
