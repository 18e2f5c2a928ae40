//! Upstreams: peers resolved at load, TLS material parsed and checked once, the HTTP version
//! spoken to them, pingora's round-robin load balancer with an optional HTTP health check, and
//! per-route header rules.
//!
//! Everything that can be wrong with certificate files or addresses is found here, at load, as
//! a config error; pingora's own TLS code assumes well-formed material and would panic on it.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use pingora::lb::LoadBalancer;
use pingora::lb::health_check::HttpHealthCheck;
use pingora::lb::selection::RoundRobin;
use pingora::prelude::HttpPeer;
use pingora::utils::tls::{CertKey, WrappedX509, parse_x509};
use url::Url;

use super::defaults;
use super::file::{
    HeadersFile, HealthCheckFile, UpstreamFile, UpstreamPeersFile, UpstreamProtocolFile,
    UpstreamTlsFile,
};
use super::{BuildResult, ConfigProblem, http_url, positive};
use crate::tls::{read_certs, read_key};

/// Where a route's requests go.
pub struct Upstream {
    /// For logs: the first peer's URL, or all of them.
    pub display: String,
    /// One prebuilt peer per address; cloned per request (cheap: options are shared `Arc`s).
    pub peers: Vec<(SocketAddr, HttpPeer)>,
    /// Round robin over healthy peers.
    pub balancer: Arc<LoadBalancer<RoundRobin>>,
    /// Health checks run only when configured.
    pub health_check_interval: Option<Duration>,
    /// `tls.verify: false` on https:// peers: the certificate and host name are not checked.
    /// Reported by [`crate::config::Config::warnings`].
    pub unverified_tls: bool,
    /// The HTTP version the peers are spoken to in (`protocol`, `auto` by default).
    pub protocol: UpstreamProtocol,
}

/// `routes[].upstream.protocol`: the HTTP version spoken to a route's peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 only, over TLS or not.
    Http1,
    /// HTTP/2 over TLS, required by ALPN (gRPC behind TLS).
    H2,
    /// HTTP/2 with prior knowledge over plain TCP (RFC 9113 §3.3; gRPC inside a cluster).
    H2c,
    /// `https://` peers: HTTP/2 or HTTP/1.1, as ALPN decides; `http://` peers: HTTP/1.1.
    Auto,
}

impl UpstreamProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2 => "h2",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::Auto => "auto",
        }
    }

    /// pingora's (max, min) HTTP version for a peer; over TLS it becomes the ALPN offer, over
    /// plain TCP a minimum of 2 is how pingora speaks h2c.
    fn versions(self, tls: bool) -> (u8, u8) {
        match self {
            UpstreamProtocol::Http1 => (1, 1),
            UpstreamProtocol::H2 | UpstreamProtocol::H2c => (2, 2),
            UpstreamProtocol::Auto if tls => (2, 1),
            UpstreamProtocol::Auto => (1, 1),
        }
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("peers", &self.display)
            .field("health_check_interval", &self.health_check_interval)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// The peer for a request: the next healthy one in rotation, skipping `avoid` (a peer that
    /// just failed to connect) when another exists.
    pub fn select(&self, avoid: Option<SocketAddr>) -> Option<(SocketAddr, HttpPeer)> {
        // One peer is the answer whatever its health (an unhealthy pool still gets tried):
        // no balancer call on the common single-upstream route.
        if let [(addr, peer)] = self.peers.as_slice() {
            return Some((*addr, peer.clone()));
        }
        let iterations = self.peers.len().max(1) * 2;
        let backend = self
            .balancer
            .select_with(b"", iterations, |b, healthy| {
                healthy && Some(b.addr.as_inet().copied()).flatten() != avoid
            })
            .or_else(|| self.balancer.select(b"", iterations))?;
        let addr = backend.addr.as_inet().copied()?;
        self.peers
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(a, peer)| (*a, peer.clone()))
    }

    /// Whether an HTTP/1.1 upgrade (WebSocket) can still be sent to `peer` by falling back to
    /// HTTP/1.1: only when the version was left to ALPN. An upgrade does not exist in HTTP/2
    /// (RFC 9113 §8.6), so such a request must not be negotiated onto it.
    pub fn pin_http1_for_upgrade(&self, peer: &mut HttpPeer) {
        if self.protocol == UpstreamProtocol::Auto {
            peer.options.set_http_version(1, 1);
        }
    }
}

/// Header rules of a route, parsed once.
#[derive(Debug, Default)]
pub struct HeaderRules {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// The gateway sets `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host`.
    pub forwarded: bool,
    /// The gateway sends `X-Request-Id` upstream and returns it on the response.
    pub request_id: bool,
}

pub(super) fn build_upstream(path: &str, raw: UpstreamFile) -> BuildResult<Upstream> {
    // A single URL reports errors at `upstream` itself, a peer list at `upstream.peers[i]`.
    let single = matches!(raw, UpstreamFile::Url(_));
    let raw = match raw {
        UpstreamFile::Url(url) => UpstreamPeersFile {
            peers: vec![url],
            tls: None,
            connect_timeout: None,
            read_timeout: None,
            health_check: None,
            protocol: None,
        },
        UpstreamFile::Peers(p) => *p,
    };
    let UpstreamPeersFile {
        peers,
        tls,
        connect_timeout,
        read_timeout,
        health_check,
        protocol,
    } = raw;
    let protocol = match protocol {
        None | Some(UpstreamProtocolFile::Auto) => UpstreamProtocol::Auto,
        Some(UpstreamProtocolFile::Http1) => UpstreamProtocol::Http1,
        Some(UpstreamProtocolFile::H2) => UpstreamProtocol::H2,
        Some(UpstreamProtocolFile::H2c) => UpstreamProtocol::H2c,
    };
    if peers.is_empty() {
        return Err(ConfigProblem::new(
            format!("{path}.peers"),
            "at least one peer is required",
        ));
    }
    let connect_timeout = positive(
        &format!("{path}.connect_timeout"),
        connect_timeout.unwrap_or(defaults::UPSTREAM_CONNECT_TIMEOUT),
    )?;
    let read_timeout = read_timeout
        .map(|d| positive(&format!("{path}.read_timeout"), d))
        .transpose()?;
    // Without a `tls:` block an https:// peer is verified against the system roots and its
    // host name, exactly as with `tls: {}`: only an explicit `verify: false` turns that off.
    let material = match tls {
        Some(t) => build_tls(&format!("{path}.tls"), t)?,
        None => TlsMaterial::system_roots(),
    };

    let mut built: Vec<(SocketAddr, HttpPeer)> = Vec::with_capacity(peers.len());
    let mut scheme_tls = None;
    for (i, text) in peers.iter().enumerate() {
        let key = if single {
            path.to_string()
        } else {
            format!("{path}.peers[{i}]")
        };
        let (url, addr) = peer_address(&key, text)?;
        let tls = url.scheme() == "https";
        if *scheme_tls.get_or_insert(tls) != tls {
            return Err(ConfigProblem::new(
                key,
                "all peers of an upstream use the same scheme",
            ));
        }
        if built.iter().any(|(a, _)| *a == addr) {
            return Err(ConfigProblem::new(
                key,
                format!("peer {addr} is listed twice"),
            ));
        }
        let host = url
            .host_str()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let sni = material.sni.clone().unwrap_or(host);
        let mut peer = match (&material.client, tls) {
            (Some(cert), true) => HttpPeer::new_mtls(addr, sni, cert.clone()),
            _ => HttpPeer::new(addr, tls, sni),
        };
        peer.options.connection_timeout = Some(connect_timeout);
        peer.options.read_timeout = read_timeout;
        let (max, min) = protocol.versions(tls);
        peer.options.set_http_version(max, min);
        if max == 2 {
            peer.options.max_h2_streams = defaults::UPSTREAM_H2_STREAMS;
        }
        if tls {
            peer.options.ca = material.ca.clone();
            peer.options.verify_cert = material.verify;
            peer.options.verify_hostname = material.verify;
            // pingora pools connections by a hash of the peer that leaves out the CA: without
            // this, a connection verified against one route's CA would be reused by a route
            // that does not trust it.
            peer.group_key = material.trust_key;
        }
        built.push((addr, peer));
    }
    let tls = scheme_tls.unwrap_or(false);
    if !tls && material.configured {
        return Err(ConfigProblem::new(
            format!("{path}.tls"),
            "the peers are http://; tls applies to https:// peers",
        ));
    }
    match (protocol, tls) {
        (UpstreamProtocol::H2, false) => {
            return Err(ConfigProblem::new(
                format!("{path}.protocol"),
                "h2 is HTTP/2 over TLS and the peers are http://; use h2c for HTTP/2 without TLS",
            ));
        }
        (UpstreamProtocol::H2c, true) => {
            return Err(ConfigProblem::new(
                format!("{path}.protocol"),
                "h2c is HTTP/2 without TLS and the peers are https://; use h2 for HTTP/2 over TLS",
            ));
        }
        _ => {}
    }

    let addrs: Vec<SocketAddr> = built.iter().map(|(a, _)| *a).collect();
    let mut balancer =
        LoadBalancer::<RoundRobin>::try_from_iter(addrs.iter().copied()).map_err(|e| {
            ConfigProblem::new(path.to_string(), format!("cannot build the peer set: {e}"))
        })?;
    let mut health_check_interval = None;
    if let Some(hc) = health_check {
        let HealthCheckFile {
            path: check_path,
            interval,
            unhealthy_after,
            healthy_after,
        } = hc;
        let hc_key = format!("{path}.health_check");
        if !check_path.starts_with('/') {
            return Err(ConfigProblem::new(
                format!("{hc_key}.path"),
                format!("\"{check_path}\" must start with '/'"),
            ));
        }
        let interval = positive(
            &format!("{hc_key}.interval"),
            interval.unwrap_or(defaults::HEALTH_CHECK_INTERVAL),
        )?;
        let threshold = |key: &str, v: Option<usize>| -> BuildResult<usize> {
            match v.unwrap_or(defaults::HEALTH_CHECK_THRESHOLD) {
                0 => Err(ConfigProblem::new(
                    format!("{hc_key}.{key}"),
                    "must be at least 1",
                )),
                n => Ok(n),
            }
        };
        let template = &built[0].1;
        let host = template.sni.clone();
        let mut check = HttpHealthCheck::new(&host, tls);
        check.consecutive_failure = threshold("unhealthy_after", unhealthy_after)?;
        check.consecutive_success = threshold("healthy_after", healthy_after)?;
        // The check goes over the peers' own protocol (the peer template below carries it).
        // pingora fills an HTTP/2 request's `:authority` from `Host` but always writes
        // `:scheme: https`; an h2c check names its scheme itself.
        check.req = pingora::http::RequestHeader::build("GET", check_path.as_bytes(), None)
            .map_err(|e| ConfigProblem::new(format!("{hc_key}.path"), e.to_string()))?;
        if protocol == UpstreamProtocol::H2c {
            let uri = http::Uri::try_from(format!("http://{}{check_path}", authority(&host)))
                .map_err(|e| ConfigProblem::new(format!("{hc_key}.path"), e.to_string()))?;
            check.req.set_uri(uri);
        }
        check
            .req
            .insert_header(http::header::HOST, authority(&host))
            .map_err(|e| ConfigProblem::new(format!("{hc_key}.path"), e.to_string()))?;
        check
            .req
            .insert_header(http::header::USER_AGENT, "txgate-health-check")
            .map_err(|e| ConfigProblem::new(format!("{hc_key}.path"), e.to_string()))?;
        // Any 2xx is healthy (pingora's default accepts 200 only).
        check.validator = Some(Box::new(|response| {
            if response.status.is_success() {
                Ok(())
            } else {
                pingora::Error::e_explain(
                    pingora::ErrorType::CustomCode("unhealthy", response.status.as_u16()),
                    "health check answered non-2xx",
                )
            }
        }));
        let mut peer_template = template.clone();
        peer_template.options.connection_timeout = Some(connect_timeout.min(interval));
        peer_template.options.read_timeout = Some(interval);
        check.peer_template = peer_template;
        balancer.set_health_check(Box::new(check));
        balancer.health_check_frequency = Some(interval);
        balancer.parallel_health_check = true;
        health_check_interval = Some(interval);
    }
    Ok(Upstream {
        display: peers.join(" "),
        peers: built,
        balancer: Arc::new(balancer),
        health_check_interval,
        unverified_tls: tls && !material.verify,
        protocol,
    })
}

/// A host name or address as the authority of a URI (IPv6 in brackets).
fn authority(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn peer_address(path: &str, text: &str) -> BuildResult<(Url, SocketAddr)> {
    let url = http_url(path, text)?;
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigProblem::new(
            path,
            format!("invalid upstream \"{text}\": only scheme, host and port are allowed"),
        ));
    }
    let tls = url.scheme() == "https";
    let host = url.host_str().unwrap_or_default().to_string();
    let port = url
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });
    let lookup = host.trim_start_matches('[').trim_end_matches(']');
    let addr = (lookup, port)
        .to_socket_addrs()
        .map_err(|e| {
            ConfigProblem::new(
                path.to_string(),
                format!("cannot resolve upstream \"{host}\": {e}"),
            )
        })?
        .next()
        .ok_or_else(|| {
            ConfigProblem::new(
                path.to_string(),
                format!("upstream \"{host}\" resolves to no address"),
            )
        })?;
    Ok((url, addr))
}

/// What `upstream.tls` decides for https:// peers.
struct TlsMaterial {
    configured: bool,
    /// A digest of the trust settings (CA certificates), separating connection pools.
    trust_key: u64,
    /// Trust anchors; `None` means the system roots (pingora's rustls connector loads them,
    /// honouring `SSL_CERT_FILE` and `SSL_CERT_DIR`).
    ca: Option<Arc<[WrappedX509]>>,
    client: Option<Arc<CertKey>>,
    sni: Option<String>,
    /// Certificate chain and host name checks; true unless `verify: false` is written.
    verify: bool,
}

impl TlsMaterial {
    /// No `tls:` block: system roots, the URL's host as server name, full verification.
    fn system_roots() -> TlsMaterial {
        TlsMaterial {
            configured: false,
            trust_key: trust_key(None),
            ca: None,
            client: None,
            sni: None,
            verify: true,
        }
    }
}

/// A digest of the trust anchors, so connections verified against different CAs never share
/// a pool.
fn trust_key(ca: Option<&[WrappedX509]>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match ca {
        Some(certs) => {
            1u8.hash(&mut h);
            for cert in certs {
                cert.borrow_raw_cert().hash(&mut h);
            }
        }
        None => 0u8.hash(&mut h),
    }
    h.finish()
}

fn build_tls(path: &str, raw: UpstreamTlsFile) -> BuildResult<TlsMaterial> {
    let UpstreamTlsFile {
        ca_file,
        sni,
        client_cert_file,
        client_key_file,
        verify,
    } = raw;
    let ca: Option<Arc<[WrappedX509]>> = ca_file
        .map(|file| {
            let certs =
                read_certs(&file).map_err(|m| ConfigProblem::new(format!("{path}.ca_file"), m))?;
            // Check each certificate as a trust anchor now; pingora parses them again per
            // connection and would panic on one it cannot read.
            let mut store = rustls::RootCertStore::empty();
            for cert in &certs {
                store.add(cert.clone().into()).map_err(|e| {
                    ConfigProblem::new(
                        format!("{path}.ca_file"),
                        format!(
                            "\"{}\" holds an unusable CA certificate: {e}",
                            file.display()
                        ),
                    )
                })?;
            }
            let wrapped: Vec<WrappedX509> = certs
                .into_iter()
                .map(|der| WrappedX509::new(der, parse_x509))
                .collect();
            Ok::<_, ConfigProblem>(Arc::from(wrapped.into_boxed_slice()))
        })
        .transpose()?;
    let client = match (client_cert_file, client_key_file) {
        (Some(cert_file), Some(key_file)) => {
            let certs = read_certs(&cert_file)
                .map_err(|m| ConfigProblem::new(format!("{path}.client_cert_file"), m))?;
            let key = read_key(&key_file)
                .map_err(|m| ConfigProblem::new(format!("{path}.client_key_file"), m))?;
            // A config that rustls accepts proves the key matches the certificate.
            crate::tls::install_crypto_provider();
            let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.clone()).map_err(|e| {
                ConfigProblem::new(format!("{path}.client_key_file"), e.to_string())
            })?;
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_client_auth_cert(certs.iter().cloned().map(Into::into).collect(), key_der)
                .map_err(|e| {
                    ConfigProblem::new(
                        format!("{path}.client_key_file"),
                        format!("does not fit client_cert_file: {e}"),
                    )
                })?;
            Some(Arc::new(CertKey::new(certs, key)))
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigProblem::new(
                format!("{path}.client_key_file"),
                "required with client_cert_file",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigProblem::new(
                format!("{path}.client_cert_file"),
                "required with client_key_file",
            ));
        }
    };
    if let Some(sni) = &sni
        && (sni.is_empty() || sni.contains(['/', ' ', ':']))
    {
        return Err(ConfigProblem::new(
            format!("{path}.sni"),
            format!("invalid server name \"{sni}\""),
        ));
    }
    Ok(TlsMaterial {
        configured: true,
        trust_key: trust_key(ca.as_deref()),
        ca,
        client,
        sni,
        verify: verify.unwrap_or(defaults::UPSTREAM_TLS_VERIFY),
    })
}

/// Hop-by-hop and framing headers a route may not set or remove.
const RESERVED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "authorization",
];

pub(super) fn build_headers(path: &str, raw: Option<HeadersFile>) -> BuildResult<HeaderRules> {
    let HeadersFile {
        remove,
        set,
        forwarded,
        request_id,
    } = raw.unwrap_or_default();
    let name = |key: String, text: &str| -> BuildResult<HeaderName> {
        let name = HeaderName::try_from(text).map_err(|_| {
            ConfigProblem::new(key.clone(), format!("invalid header name \"{text}\""))
        })?;
        if RESERVED.contains(&name.as_str()) {
            return Err(ConfigProblem::new(
                key,
                format!("\"{text}\" is managed by the gateway and cannot be changed by a rule"),
            ));
        }
        Ok(name)
    };
    let remove = remove
        .iter()
        .enumerate()
        .map(|(i, h)| name(format!("{path}.remove[{i}]"), h))
        .collect::<BuildResult<Vec<_>>>()?;
    let set = set
        .iter()
        .map(|(k, v): (&String, &String)| {
            let key = format!("{path}.set.{k}");
            let header = name(key.clone(), k)?;
            let value = HeaderValue::try_from(v.as_str()).map_err(|_| {
                ConfigProblem::new(key, "the value cannot be sent in a header".to_string())
            })?;
            Ok((header, value))
        })
        .collect::<BuildResult<Vec<_>>>()?;
    Ok(HeaderRules {
        remove,
        set,
        forwarded: forwarded.unwrap_or(defaults::FORWARDED_HEADERS),
        request_id: request_id.unwrap_or(defaults::REQUEST_ID_HEADER),
    })
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn config(upstream: &str) -> Result<Config, crate::config::ConfigError> {
        let yaml = format!(
            "server: {{ listen: [\"127.0.0.1:0\"] }}\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: {upstream}\n    exchange: {{ mode: none }}\n"
        );
        Config::from_yaml(&yaml, "t.yaml", &|_| None)
    }

    #[test]
    fn a_single_url_is_one_peer_shown_as_written() {
        let c = config("\"http://127.0.0.1:9001\"").unwrap();
        assert_eq!(c.routes[0].upstream.display, "http://127.0.0.1:9001");
        assert_eq!(c.routes[0].upstream.peers.len(), 1);
    }

    #[test]
    fn https_peers_are_verified_unless_verify_false_is_written() {
        let verified = |c: &Config| {
            let upstream = &c.routes[0].upstream;
            upstream.peers.iter().all(|(_, peer)| {
                peer.options.verify_cert && peer.options.verify_hostname && !upstream.unverified_tls
            })
        };
        for written in [
            "\"https://127.0.0.1:9443\"",
            "{ peers: [\"https://127.0.0.1:9443\", \"https://127.0.0.1:9444\"] }",
            "{ peers: [\"https://127.0.0.1:9443\"], tls: { sni: backend.internal } }",
            "{ peers: [\"https://127.0.0.1:9443\"], tls: { verify: true } }",
        ] {
            let c = config(written).unwrap();
            assert!(verified(&c), "{written}");
            // No CA file: pingora verifies against the system roots.
            assert!(
                c.routes[0].upstream.peers[0].1.options.ca.is_none(),
                "{written}"
            );
        }
        let c = config("{ peers: [\"https://127.0.0.1:9443\"], tls: { verify: false } }").unwrap();
        let (_, peer) = &c.routes[0].upstream.peers[0];
        assert!(!peer.options.verify_cert && !peer.options.verify_hostname);
        assert!(c.routes[0].upstream.unverified_tls);
        // Plain http:// peers have nothing to verify.
        assert!(
            !config("\"http://127.0.0.1:9001\"").unwrap().routes[0]
                .upstream
                .unverified_tls
        );
    }

    #[test]
    fn the_protocol_sets_each_peers_versions_and_must_fit_the_scheme() {
        // (upstream, ALPN (max, min) version, streams per connection)
        for (written, versions, streams) in [
            ("\"http://127.0.0.1:9001\"", (1, 1), 1),
            ("\"https://127.0.0.1:9443\"", (2, 1), 100),
            (
                "{ peers: [\"http://127.0.0.1:1\"], protocol: auto }",
                (1, 1),
                1,
            ),
            (
                "{ peers: [\"http://127.0.0.1:1\"], protocol: http1 }",
                (1, 1),
                1,
            ),
            (
                "{ peers: [\"https://127.0.0.1:1\"], protocol: http1 }",
                (1, 1),
                1,
            ),
            (
                "{ peers: [\"http://127.0.0.1:1\"], protocol: h2c }",
                (2, 2),
                100,
            ),
            (
                "{ peers: [\"https://127.0.0.1:1\"], protocol: h2 }",
                (2, 2),
                100,
            ),
        ] {
            let c = config(written).unwrap();
            let options = &c.routes[0].upstream.peers[0].1.options;
            assert_eq!(
                (
                    options.alpn.get_max_http_version(),
                    options.alpn.get_min_http_version()
                ),
                versions,
                "{written}"
            );
            assert_eq!(options.max_h2_streams, streams, "{written}");
        }
        for (written, message) in [
            (
                "{ peers: [\"http://127.0.0.1:1\"], protocol: h2 }",
                "h2 is HTTP/2 over TLS and the peers are http://; use h2c for HTTP/2 without TLS",
            ),
            (
                "{ peers: [\"https://127.0.0.1:1\"], protocol: h2c }",
                "h2c is HTTP/2 without TLS and the peers are https://; use h2 for HTTP/2 over TLS",
            ),
        ] {
            let err = config(written).unwrap_err();
            assert_eq!(err.path, "routes[0].upstream.protocol", "{written}");
            assert_eq!(err.message, message, "{written}");
        }
        let err = config("{ peers: [\"http://127.0.0.1:1\"], protocol: http2 }").unwrap_err();
        assert_eq!(err.path, "routes[0].upstream.protocol");
    }

    #[test]
    fn only_auto_peers_are_pinned_to_http1_for_an_upgrade() {
        for (written, pinned) in [
            ("\"https://127.0.0.1:9443\"", true),
            ("{ peers: [\"https://127.0.0.1:1\"], protocol: h2 }", false),
        ] {
            let c = config(written).unwrap();
            let upstream = &c.routes[0].upstream;
            let (_, mut peer) = upstream.select(None).unwrap();
            upstream.pin_http1_for_upgrade(&mut peer);
            assert_eq!(
                peer.options.alpn.get_max_http_version() == 1,
                pinned,
                "{written}"
            );
        }
    }

    #[test]
    fn peer_lists_are_checked() {
        let err =
            config("{ peers: [\"http://127.0.0.1:1\", \"https://127.0.0.1:2\"] }").unwrap_err();
        assert_eq!(err.path, "routes[0].upstream.peers[1]");
        let err = config("{ peers: [] }").unwrap_err();
        assert_eq!(err.path, "routes[0].upstream.peers");
        let err =
            config("{ peers: [\"http://127.0.0.1:1\"], tls: { verify: false } }").unwrap_err();
        assert_eq!(err.path, "routes[0].upstream.tls");
        let err = config("{ peers: [\"http://127.0.0.1:1\"], health_check: { path: healthz } }")
            .unwrap_err();
        assert_eq!(err.path, "routes[0].upstream.health_check.path");
        let err =
            config("{ peers: [\"https://127.0.0.1:1\"], tls: { ca_file: /nonexistent/ca.pem } }")
                .unwrap_err();
        assert_eq!(err.path, "routes[0].upstream.tls.ca_file");
        let err = config("{ peers: [\"http://127.0.0.1:1\"], colour: blue }").unwrap_err();
        assert_eq!(err.path, "routes[0].upstream.colour");
    }
}
