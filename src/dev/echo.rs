//! A demo backend that answers every request with a JSON description of what it received.
//!
//! `txgate demo` puts it behind the gateway so a user can see, in one `curl`, which headers the
//! gateway forwarded and which token it put in `Authorization` after the exchange. The token is
//! decoded **without verifying its signature**: this backend only shows what arrived, it makes
//! no trust decisions and must never be used as a real service.

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
    if axum::body::to_bytes(body, MAX_BODY_BYTES).await.is_err() {
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
    Json(json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "token": token,
    }))
    .into_response()
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
