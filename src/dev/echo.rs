//! A demo backend that answers every request with a JSON description of what it received.
//!
//! `txgate demo` puts it behind the gateway so a user can see, in one `curl`, which headers the
//! gateway forwarded and which token it put in `Authorization` after the exchange. The token is
//! decoded **without verifying its signature**: this backend only shows what arrived, it makes
//! no trust decisions and must never be used as a real service.
//!
//! It speaks HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same port, and answers a
//! gRPC call (`content-type: application/grpc*`, any method) as a gRPC echo service would:
//! one message holding the same JSON description (the `application/grpc+json` codec), then
//! `grpc-status: 0` in the trailers. So the demo's gRPC route shows the same thing through a
//! real gRPC exchange, with a `curl --http2-prior-knowledge` command.

use std::collections::BTreeMap;
use std::future::Future;

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// Request bodies are read (so clients never see a reset connection) and thrown away; more than
/// this is refused.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Answers every request — any method, any path — with JSON describing what it received:
/// `method`, `path`, `query` (string or null), `headers` (name to list of values) and `token`
/// (the UNVERIFIED header and claims of a bearer JWT, `{"opaque": true}` for a non-JWT bearer
/// value, or null without a bearer token). Bodies over 1 MiB get 413.
pub fn router() -> Router {
    Router::new().fallback(echo)
}

/// Serves [`router`] on an already-bound listener until `shutdown` resolves, then lets
/// in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let address = listener.local_addr()?;
    tracing::info!(%address, "echo backend listening");
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown)
        .await
}

async fn echo(request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let grpc = is_grpc(&parts.headers);
    if axum::body::to_bytes(body, MAX_BODY_BYTES).await.is_err() {
        if grpc {
            return grpc_reply(None, "8", "request larger than 1 MiB or unreadable");
        }
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(json!({ "error": "request body larger than 1 MiB or unreadable" })),
        )
            .into_response();
    }
    let mut headers: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let token = bearer_token(&parts.headers).map(describe_token);
    let described = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "token": token,
    });
    if grpc {
        return grpc_reply(Some(described.to_string().into()), "0", "");
    }
    Json(described).into_response()
}

/// `application/grpc`, `application/grpc+<codec>` or `application/grpc;...`.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
}

/// A gRPC answer: HTTP 200, then `message` as one length-prefixed message (uncompressed), then
/// the status in the trailers (gRPC's PROTOCOL-HTTP2.md).
fn grpc_reply(
    message: Option<axum::body::Bytes>,
    status: &'static str,
    text: &'static str,
) -> Response {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", axum::http::HeaderValue::from_static(status));
    if !text.is_empty() {
        trailers.insert("grpc-message", axum::http::HeaderValue::from_static(text));
    }
    let framed = message.map(|m| {
        let mut framed = Vec::with_capacity(5 + m.len());
        framed.push(0);
        // The body is at most `MAX_BODY_BYTES` plus its description: far below 4 GiB.
        framed.extend_from_slice(&u32::try_from(m.len()).unwrap_or(u32::MAX).to_be_bytes());
        framed.extend_from_slice(&m);
        axum::body::Bytes::from(framed)
    });
    let body = GrpcBody {
        message: framed,
        trailers: Some(trailers),
    };
    (
        [(header::CONTENT_TYPE, "application/grpc+json")],
        axum::body::Body::new(body),
    )
        .into_response()
}

/// One data frame, then the trailers.
struct GrpcBody {
    message: Option<axum::body::Bytes>,
    trailers: Option<HeaderMap>,
}

impl http_body::Body for GrpcBody {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = match self.message.take() {
            Some(message) => Some(http_body::Frame::data(message)),
            None => self.trailers.take().map(http_body::Frame::trailers),
        };
        std::task::Poll::Ready(frame.map(Ok))
    }
}

/// The credentials of the first `Authorization: Bearer <token>` header, if any.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The decoded, unverified header and claims of a compact JWS, or `{"opaque": true}`.
fn describe_token(token: &str) -> Value {
    let header = token
        .split('.')
        .next()
        .and_then(|encoded| URL_SAFE_NO_PAD.decode(encoded.trim_end_matches('=')).ok())
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .filter(Value::is_object);
    match (header, crate::jwt::unverified_claims(token)) {
        (Some(header), Some(claims)) => json!({ "header": header, "claims": claims }),
        _ => json!({ "opaque": true }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn http_client() -> reqwest::Client {
        // reqwest is built without a bundled TLS provider; it insists on one even for plain http.
        pingora::tls::install_default_crypto_provider();
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn echoes_the_request_and_decodes_the_bearer_token() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, async {
            let _ = stopped.await;
        }));
        let http = http_client();

        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k1"}"#);
        let claims = URL_SAFE_NO_PAD.encode(r#"{"sub":"alice","aud":"orders"}"#);
        let jwt = format!("{header}.{claims}.c2ln");
        let response = http
            .put(format!("{base}/orders/42?verbose=1&x=y"))
            .header("authorization", format!("Bearer {jwt}"))
            .header("x-multi", "one")
            .header("x-multi", "two")
            .body("ignored body")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["method"], "PUT");
        assert_eq!(body["path"], "/orders/42");
        assert_eq!(body["query"], "verbose=1&x=y");
        assert_eq!(body["headers"]["x-multi"], json!(["one", "two"]));
        assert_eq!(body["token"]["header"]["kid"], "k1");
        assert_eq!(body["token"]["claims"]["sub"], "alice");

        let body: Value = http
            .get(format!("{base}/"))
            .header("authorization", "Bearer opaque-reference-token")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["path"], "/");
        assert_eq!(body["query"], Value::Null);
        assert_eq!(body["token"], json!({ "opaque": true }));

        let body: Value = http
            .delete(format!("{base}/x"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["method"], "DELETE");
        assert_eq!(body["token"], Value::Null);

        let response = http
            .post(format!("{base}/upload"))
            .body(vec![0u8; MAX_BODY_BYTES + 1])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413);

        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[test]
    fn non_jwt_bearer_values_are_opaque() {
        assert_eq!(describe_token("abc"), json!({ "opaque": true }));
        assert_eq!(describe_token("a.b.c"), json!({ "opaque": true }));
        assert_eq!(describe_token("..."), json!({ "opaque": true }));
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
        headers.insert(header::AUTHORIZATION, "bearer  tok ".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some("tok"));
    }
}
