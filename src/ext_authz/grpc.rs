//! `envoy.service.auth.v3.Authorization/Check` over gRPC (h2c): a Check in, a
//! [`Verdict`](super::Verdict) out as a `CheckResponse`. Envoy applies an `OkHttpResponse`'s
//! header and query mutations to the upstream request and sends a `DeniedHttpResponse` to the
//! caller as it is (status, headers, body).

use std::future::Future;
use std::pin::Pin;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use tonic::Status;
use tonic_prost::ProstCodec;

use super::proto::{
    CheckRequest, CheckResponse, DeniedHttpResponse, HeaderValue as ProtoHeader, HeaderValueOption,
    HttpRequest, HttpResponse, HttpStatus, OVERWRITE_IF_EXISTS_OR_ADD, OkHttpResponse, RpcStatus,
};
use super::{Described, Transport, Verdict};
use crate::error::GatewayError;
use crate::state::CurrentState;

/// The method's path (gRPC over HTTP/2: `/package.Service/Method`).
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// gRPC status codes of a `CheckResponse.status` (Envoy allows on 0 and denies on any other).
const OK: i32 = 0;
const PERMISSION_DENIED: i32 = 7;
const UNAUTHENTICATED: i32 = 16;

/// The gRPC ext_authz service; any other method is `UNIMPLEMENTED`.
pub fn router(current: CurrentState) -> axum::Router {
    axum::Router::new()
        .route(CHECK_PATH, axum::routing::post(check))
        .fallback(|| async {
            Status::unimplemented("no such method").into_http::<axum::body::Body>()
        })
        .with_state(current)
}

async fn check(State(current): State<CurrentState>, request: axum::extract::Request) -> Response {
    let mut grpc = tonic::server::Grpc::new(ProstCodec::<CheckResponse, CheckRequest>::default());
    grpc.unary(Checker(current), request).await.into_response()
}

/// One Check call.
struct Checker(CurrentState);

impl tonic::server::UnaryService<CheckRequest> for Checker {
    type Response = CheckResponse;
    type Future =
        Pin<Box<dyn Future<Output = Result<tonic::Response<CheckResponse>, Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<CheckRequest>) -> Self::Future {
        let current = self.0.clone();
        Box::pin(async move {
            let verdict = match described(request.into_inner()) {
                Ok(described) => super::check(&current, Transport::Grpc, &described).await,
                Err(error) => super::unreadable(&current, Transport::Grpc, error),
            };
            Ok(tonic::Response::new(answer(verdict)))
        })
    }
}

/// The request a Check describes: method, target (path and query as sent), host, and the
/// headers (pseudo-headers left out; the host goes in `Host`).
fn described(check: CheckRequest) -> Result<Described, GatewayError> {
    let attributes = check.attributes.unwrap_or_default();
    let client = attributes
        .source
        .and_then(|peer| peer.address)
        .and_then(|address| address.socket_address)
        .and_then(|socket| socket.address.parse().ok());
    let http = attributes.request.and_then(|r| r.http).unwrap_or_default();
    let HttpRequest {
        id: _,
        method,
        headers,
        path,
        host,
        header_map,
    } = http;
    let unreadable = || GatewayError::MalformedCredential("the request cannot be read");
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| unreadable())?;
    let uri: Uri = path
        .parse()
        .map_err(|_| GatewayError::InvalidPath(crate::path::PathError::NotOriginForm))?;
    let mut map = HeaderMap::new();
    let mut add = |key: &str, value: &[u8]| -> Result<(), GatewayError> {
        if key.starts_with(':') || key.eq_ignore_ascii_case("host") {
            return Ok(());
        }
        let name = HeaderName::from_bytes(key.as_bytes()).map_err(|_| unreadable())?;
        let value = HeaderValue::from_bytes(value).map_err(|_| unreadable())?;
        map.append(name, value);
        Ok(())
    };
    match header_map {
        Some(raw) => {
            for h in raw.headers {
                let value = if h.raw_value.is_empty() {
                    h.value.into_bytes()
                } else {
                    h.raw_value
                };
                add(&h.key, &value)?;
            }
        }
        None => {
            for (key, value) in &headers {
                add(key, value.as_bytes())?;
            }
        }
    }
    if !host.is_empty() {
        let host = HeaderValue::from_str(&host).map_err(|_| GatewayError::InvalidHost)?;
        map.insert(http::header::HOST, host);
    }
    Ok(Described {
        method,
        uri,
        headers: map,
        client,
    })
}

fn option(name: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(ProtoHeader {
            key: name.to_string(),
            value,
            raw_value: Vec::new(),
        }),
        append_action: OVERWRITE_IF_EXISTS_OR_ADD,
    }
}

/// The `CheckResponse` of a verdict.
fn answer(verdict: Verdict) -> CheckResponse {
    match verdict {
        Verdict::Allow(mutations) => CheckResponse {
            status: Some(RpcStatus {
                code: OK,
                message: String::new(),
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: mutations
                    .set
                    .iter()
                    .map(|(name, value)| {
                        option(
                            name.as_str(),
                            String::from_utf8_lossy(value.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
                headers_to_remove: mutations
                    .remove
                    .iter()
                    .map(|n| n.as_str().to_string())
                    .collect(),
                query_parameters_to_remove: mutations
                    .remove_query
                    .iter()
                    .map(|q| q.to_string())
                    .collect(),
            })),
        },
        Verdict::Deny(denial) => CheckResponse {
            status: Some(RpcStatus {
                code: if denial.status == 401 {
                    UNAUTHENTICATED
                } else {
                    PERMISSION_DENIED
                },
                message: String::new(),
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: i32::from(denial.status),
                }),
                headers: denial
                    .headers()
                    .into_iter()
                    .map(|(name, value)| option(name.as_str(), value))
                    .collect(),
                body: denial.body,
            })),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ext_authz::proto::{AttributeContext, AttributeRequest, HeaderMap as RawHeaders};

    fn check(http: HttpRequest) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                source: None,
                request: Some(AttributeRequest { http: Some(http) }),
            }),
        }
    }

    fn raw(key: &str, value: &str) -> ProtoHeader {
        ProtoHeader {
            key: key.to_string(),
            value: String::new(),
            raw_value: value.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_check_describes_the_request_without_pseudo_headers() {
        let request = HttpRequest {
            method: "POST".into(),
            path: "/orders/1?x=1".into(),
            host: "api.example.com".into(),
            headers: [
                (":authority", "api.example.com"),
                (":path", "/orders/1?x=1"),
                ("authorization", "Bearer abc"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..HttpRequest::default()
        };
        let d = described(check(request)).unwrap();
        assert_eq!(d.method, Method::POST);
        assert_eq!(d.uri, "/orders/1?x=1");
        assert_eq!(d.headers.len(), 2);
        assert_eq!(d.headers["host"], "api.example.com");
        assert_eq!(d.headers["authorization"], "Bearer abc");
    }

    /// With `encode_raw_headers`, repeated headers stay apart, so two credentials are two.
    #[test]
    fn raw_headers_keep_repeated_names_apart() {
        let request = HttpRequest {
            method: "GET".into(),
            path: "/".into(),
            host: "h".into(),
            header_map: Some(RawHeaders {
                headers: vec![
                    raw("authorization", "Bearer a"),
                    raw("authorization", "Bearer b"),
                    raw(":method", "GET"),
                ],
            }),
            ..HttpRequest::default()
        };
        let d = described(check(request)).unwrap();
        assert_eq!(d.headers.get_all("authorization").iter().count(), 2);
        assert_eq!(d.headers.len(), 3);
    }

    #[test]
    fn an_unreadable_check_is_a_400() {
        for request in [
            HttpRequest::default(),
            HttpRequest {
                method: "GET".into(),
                path: "no path".into(),
                ..HttpRequest::default()
            },
            HttpRequest {
                method: "GET".into(),
                path: "/".into(),
                headers: [("bad name".to_string(), "v".to_string())].into(),
                ..HttpRequest::default()
            },
        ] {
            let error = described(check(request)).err().expect("refused");
            assert_eq!(error.status(), 400);
        }
    }

    #[test]
    fn answers_carry_the_mutations_and_the_denial() {
        let allowed = answer(Verdict::Allow(super::super::Mutations {
            set: vec![(
                http::header::AUTHORIZATION,
                HeaderValue::from_static("Bearer x"),
            )],
            remove: vec![HeaderName::from_static("x-copy")],
            remove_query: vec!["access_token"],
        }));
        let Some(HttpResponse::OkResponse(ok)) = allowed.http_response else {
            panic!("not OK: {allowed:?}")
        };
        assert_eq!(allowed.status.unwrap().code, OK);
        let header = ok.headers[0].header.as_ref().unwrap();
        assert_eq!(
            (header.key.as_str(), header.value.as_str()),
            ("authorization", "Bearer x")
        );
        assert_eq!(ok.headers[0].append_action, OVERWRITE_IF_EXISTS_OR_ADD);
        assert_eq!(ok.headers_to_remove, ["x-copy"]);
        assert_eq!(ok.query_parameters_to_remove, ["access_token"]);

        let error = GatewayError::MissingToken;
        let denied = answer(Verdict::Deny(super::super::Denial::from_error(&error)));
        assert_eq!(denied.status.unwrap().code, UNAUTHENTICATED);
        let Some(HttpResponse::DeniedResponse(no)) = denied.http_response else {
            panic!("not denied")
        };
        assert_eq!(no.status.unwrap().code, 401);
        assert_eq!(no.body, error.body());
        assert!(
            no.headers
                .iter()
                .any(|h| h.header.as_ref().is_some_and(|h| {
                    h.key == "www-authenticate" && h.value == "Bearer realm=\"txgate\""
                }))
        );
    }
}
