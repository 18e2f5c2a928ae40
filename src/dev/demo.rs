//! `txgate demo`: the development STS, an echo backend and the gateway, on loopback.
//!
//! The demo runs the repository's `gateway.yaml` unchanged. It starts the development STS at
//! the address of the configured token endpoint and an echo backend at each loopback upstream,
//! then prints curl commands that show a refused request and an exchange. The client secret
//! comes from `TXGATE_CLIENT_SECRET` when set; otherwise a random one is generated for this run
//! and given to both the STS and the gateway, so no secret is ever written down.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;

use crate::config::{Config, ConfigError, Exchange, ModeKind};
use crate::dev::sts::{DEMO_STEP_UP_SUBJECT, DevClient, DevSts, DevStsOptions};
use crate::server::{self, BoundListeners};

/// The variable `gateway.yaml` reads the client secret from.
pub const CLIENT_SECRET_VAR: &str = "TXGATE_CLIENT_SECRET";

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Setup(String),
}

/// Runs the demo in the foreground until SIGINT or SIGTERM.
pub fn run(config_path: &Path) -> Result<(), DemoError> {
    let secret = std::env::var(CLIENT_SECRET_VAR)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 24]>()));
    let source = config_path.display().to_string();
    let text = std::fs::read_to_string(config_path).map_err(|e| ConfigError {
        file: source.clone(),
        path: String::new(),
        message: format!("cannot read file: {e}"),
    })?;
    let env = |name: &str| {
        if name == CLIENT_SECRET_VAR {
            Some(secret.clone())
        } else {
            std::env::var(name).ok()
        }
    };
    // Port 0 in the STS's or an echo backend's address: bind now, and run the configuration
    // with the ports the system chose.
    let (text, mut prebound) = assign_ports(&text, &source)?;
    let config = Config::from_yaml(&text, &source, &env)?;

    let sts_addr = sts_address(&config)?;
    let backends: BTreeSet<SocketAddr> = config
        .routes
        .iter()
        .flat_map(|r| r.upstream.peers.iter().map(|(addr, _)| *addr))
        .filter(|a| a.ip().is_loopback() && *a != sts_addr)
        .collect();
    let clients = config
        .token_services
        .values()
        .filter_map(|s| {
            Some(DevClient {
                client_id: s.client_id.clone(),
                client_secret: s.client_secret.clone()?,
            })
        })
        .collect::<Vec<_>>();
    let mut options = DevStsOptions::new(format!("http://{sts_addr}"), dedup(clients));
    options.step_up_subjects = vec![DEMO_STEP_UP_SUBJECT.to_string()];
    let sts = DevSts::new(options)
        .map_err(|e| DemoError::Setup(format!("cannot start the development STS: {e}")))?;

    let mut take = |addr: SocketAddr, what: &str| match prebound.remove(&addr) {
        Some(socket) => Ok(socket),
        None => bind(addr, what),
    };
    let sts_socket = take(sts_addr, "development STS")?;
    let backend_sockets = backends
        .iter()
        .map(|a| take(*a, "echo backend"))
        .collect::<Result<Vec<_>, _>>()?;
    let gateway =
        BoundListeners::bind(&config.server).map_err(|e| DemoError::Setup(e.to_string()))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("txgate-demo")
        .build()
        .map_err(|e| DemoError::Setup(format!("cannot start the demo runtime: {e}")))?;
    runtime.block_on(async {
        let sts_listener = tokio::net::TcpListener::from_std(sts_socket)
            .map_err(|e| DemoError::Setup(e.to_string()))?;
        tokio::spawn(sts.clone().serve(sts_listener, std::future::pending()));
        for socket in backend_sockets {
            let listener = tokio::net::TcpListener::from_std(socket)
                .map_err(|e| DemoError::Setup(e.to_string()))?;
            tokio::spawn(crate::dev::echo::serve(listener, std::future::pending()));
        }
        Ok::<(), DemoError>(())
    })?;

    server::log_warnings(&config);
    print!("{}", banner(&config, &gateway, sts_addr, &backends));
    server::run_until_signal(&config, gateway).map_err(|e| DemoError::Setup(e.to_string()))?;
    runtime.shutdown_background();
    Ok(())
}

/// Binds the development STS and the echo backend on a port of the system's choosing where the
/// configuration names a loopback URL with port 0 — any URL of a token service or of a route's
/// `inbound` block (the STS), any upstream URL or peer (the echo backend) — and returns the
/// configuration text with those ports filled in, and the bound sockets by address. One STS
/// serves all such URLs, one echo backend all such upstreams. Text without port 0 comes back
/// unchanged.
fn assign_ports(
    text: &str,
    source: &str,
) -> Result<(String, BTreeMap<SocketAddr, TcpListener>), DemoError> {
    use serde_yaml::Value;
    let Ok(mut tree) = serde_yaml::from_str::<Value>(text) else {
        // Not YAML: the loader reports it properly.
        return Ok((text.to_string(), BTreeMap::new()));
    };
    let mut sts = Chosen::new("development STS", source);
    let mut echo = Chosen::new("echo backend", source);
    if let Some(services) = tree.get_mut("token_services") {
        sts.fill(services)?;
    }
    if let Some(Value::Sequence(routes)) = tree.get_mut("routes") {
        for route in routes {
            if let Some(upstream) = route.get_mut("upstream") {
                echo.fill(upstream)?;
            }
            if let Some(inbound) = route.get_mut("inbound") {
                sts.fill(inbound)?;
            }
        }
    }
    let bound: BTreeMap<SocketAddr, TcpListener> =
        sts.socket.into_iter().chain(echo.socket).collect();
    if bound.is_empty() {
        return Ok((text.to_string(), bound));
    }
    let text =
        serde_yaml::to_string(&tree).map_err(|e| DemoError::Setup(format!("{source}: {e}")))?;
    Ok((text, bound))
}

/// One demo service's port, bound the first time a URL asks for port 0.
struct Chosen<'a> {
    what: &'static str,
    source: &'a str,
    socket: Option<(SocketAddr, TcpListener)>,
}

impl<'a> Chosen<'a> {
    fn new(what: &'static str, source: &'a str) -> Chosen<'a> {
        Chosen {
            what,
            source,
            socket: None,
        }
    }

    /// Rewrites every loopback URL with port 0 under `value` to this service's port.
    fn fill(&mut self, value: &mut serde_yaml::Value) -> Result<(), DemoError> {
        use serde_yaml::Value;
        match value {
            Value::Sequence(items) => items.iter_mut().try_for_each(|v| self.fill(v)),
            Value::Mapping(map) => map.iter_mut().try_for_each(|(_, v)| self.fill(v)),
            Value::String(text) => {
                let Ok(mut url) = url::Url::parse(text) else {
                    return Ok(());
                };
                let loopback = url.host_str().is_some_and(|h| {
                    h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
                });
                if !loopback || url.port() != Some(0) {
                    return Ok(());
                }
                let port = self.port()?;
                let _ = url.set_host(Some("127.0.0.1"));
                let _ = url.set_port(Some(port));
                let mut written = url.to_string();
                // `Url` adds the root path to a bare origin; upstreams are written without.
                if !text.ends_with('/') && url.path() == "/" {
                    written.pop();
                }
                *text = written;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn port(&mut self) -> Result<u16, DemoError> {
        if let Some((addr, _)) = &self.socket {
            return Ok(addr.port());
        }
        let socket = bind(SocketAddr::from(([127, 0, 0, 1], 0)), self.what)?;
        let addr = socket
            .local_addr()
            .map_err(|e| DemoError::Setup(format!("{}: {}: {e}", self.source, self.what)))?;
        self.socket = Some((addr, socket));
        Ok(addr.port())
    }
}

fn dedup(mut clients: Vec<DevClient>) -> Vec<DevClient> {
    let mut seen = BTreeSet::new();
    clients.retain(|c| seen.insert(c.client_id.clone()));
    clients
}

fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, DemoError> {
    let socket = TcpListener::bind(addr)
        .map_err(|e| DemoError::Setup(format!("cannot start the {what} on {addr}: {e}")))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    Ok(socket)
}

/// The one loopback address every token service's endpoint points at.
fn sts_address(config: &Config) -> Result<SocketAddr, DemoError> {
    let mut addrs = BTreeSet::new();
    for service in config.token_services.values() {
        let url = &service.token_endpoint;
        let addr = url
            .socket_addrs(|| None)
            .ok()
            .and_then(|a| a.into_iter().next())
            .filter(|a| a.ip().is_loopback() && url.scheme() == "http" && url.path() == "/token")
            .ok_or_else(|| {
                DemoError::Setup(format!(
                    "{}: token_services.{}.token_endpoint: the demo serves the development STS at \
                     http://<loopback>:<port>/token, not {url}",
                    config.source, service.name
                ))
            })?;
        addrs.insert(addr);
    }
    match addrs.len() {
        1 => Ok(addrs.into_iter().next().unwrap_or_else(|| unreachable!())),
        0 => Err(DemoError::Setup(format!(
            "{}: the demo needs at least one token service",
            config.source
        ))),
        _ => Err(DemoError::Setup(format!(
            "{}: the demo runs one development STS; point every token_endpoint at the same address",
            config.source
        ))),
    }
}

fn host_of(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port()).to_string()
}

/// What the demo prints: where everything listens, and the commands to try.
fn banner(
    config: &Config,
    gateway: &BoundListeners,
    sts: SocketAddr,
    backends: &BTreeSet<SocketAddr>,
) -> String {
    let (scheme, first) = match (gateway.proxy_addrs().first(), gateway.tls_addrs().first()) {
        (Some(plain), _) => ("http", *plain),
        (None, Some(tls)) => ("https", *tls),
        (None, None) => ("http", SocketAddr::from(([127, 0, 0, 1], 0))),
    };
    let proxy = format!("{scheme}://{}", host_of(first));
    let mut out = String::new();
    out.push_str("txgate demo is running (Ctrl-C to stop)\n\n");
    out.push_str(&format!("  gateway          {proxy}\n"));
    if let Some(admin) = gateway.admin_addr() {
        out.push_str(&format!(
            "  metrics          http://{}/metrics\n",
            host_of(admin)
        ));
    }
    out.push_str(&format!(
        "  development STS  http://{sts}   (development only: it signs tokens for anyone)\n"
    ));
    for b in backends {
        out.push_str(&format!("  echo backend     http://{b}\n"));
    }
    out.push_str("\n  routes:\n");
    for route in &config.routes {
        let what = match &route.exchange {
            Exchange::None => "no token forwarded".to_string(),
            Exchange::ByIssuer(_) => "token service chosen by the caller's issuer".to_string(),
            Exchange::Token(p) => {
                let audience: Vec<&str> = p
                    .params
                    .iter()
                    .filter(|(k, _)| *k == "audience")
                    .map(|(_, v)| v.as_str())
                    .collect();
                format!(
                    "{} at {}, audience {}",
                    p.mode.as_str(),
                    p.service.name,
                    audience.join(" ")
                )
            }
        };
        let over = match route.upstream.protocol {
            crate::config::upstream::UpstreamProtocol::Auto => String::new(),
            protocol => format!(" over {}", protocol.as_str()),
        };
        out.push_str(&format!(
            "    {:<12} {:<14} -> {}{over}  ({what})\n",
            route.name, route.path_prefix, route.upstream.display
        ));
    }
    if let Some(route) = config
        .routes
        .iter()
        .find(|r| matches!(r.exchange, Exchange::Token(_)))
    {
        let url = format!("{proxy}{}", route.path_prefix);
        out.push_str("\nTry it:\n\n");
        out.push_str("  # 1. No token: the gateway answers 401 with a Bearer challenge.\n");
        out.push_str(&format!("  curl -i {url}\n\n"));
        out.push_str("  # 2. Get a user token from the development STS.\n");
        out.push_str(&format!(
            "  TOKEN=$(curl -s -d sub=alice http://{sts}/dev/user-token)\n\n"
        ));
        out.push_str(
            "  # 3. Call through the gateway: the echo backend shows the exchanged token it \
             received (a different token, with the route's audience).\n",
        );
        out.push_str(&format!(
            "  curl -s -H \"Authorization: Bearer $TOKEN\" {url}\n"
        ));
        if let Some(grpc) = grpc_route(config, scheme) {
            out.push_str(&format!(
                "\n  # 4. gRPC over h2c: a call to the echo service of route {}. Its one message is JSON\n  \
                 #    (what it received, the exchanged token decoded); the headers and the trailers\n  \
                 #    (grpc-status: 0) go to stderr. Without the token: grpc-status: 16.\n",
                grpc.name
            ));
            out.push_str(&format!(
                "  printf '\\0\\0\\0\\0\\2{{}}' | curl -s --http2-prior-knowledge -D /dev/stderr \
                 -H \"Authorization: Bearer $TOKEN\" -H 'content-type: application/grpc+json' \
                 -H 'te: trailers' --data-binary @- {proxy}{}/Say | tail -c +6\n",
                grpc.path_prefix
            ));
        }
        let mut n = 4;
        if let Some(chain) = route_of(config, ModeKind::Chain) {
            n += 1;
            out.push_str(&format!(
                "\n  # {n}. Two hops (route {}): an ID-JAG for the authorization server, then the jwt-bearer\n  \
                 #    grant with it; the backend gets the last step's token, never the ID-JAG.\n",
                chain.name
            ));
            out.push_str(&format!(
                "  curl -s -H \"Authorization: Bearer $TOKEN\" {proxy}{}\n",
                chain.path_prefix
            ));
        }
        if let Some(txn) = route_of(config, ModeKind::TransactionToken) {
            n += 1;
            out.push_str(&format!(
                "\n  # {n}. A Transaction Token (route {}): the backend gets Txn-Token with this request's\n  \
                 #    method, path and address in rctx, and no Authorization at all.\n",
                txn.name
            ));
            out.push_str(&format!(
                "  curl -s -X POST -H \"Authorization: Bearer $TOKEN\" {proxy}{}/42\n",
                txn.path_prefix
            ));
        }
        n += 1;
        out.push_str(&format!(
            "\n  # {n}. Step-up: the STS wants user {DEMO_STEP_UP_SUBJECT} to log in again; the gateway relays its\n  \
             #    challenge (401, error=\"insufficient_user_authentication\", acr_values, max_age).\n"
        ));
        out.push_str(&format!(
            "  curl -s -i -H \"Authorization: Bearer $(curl -s -d sub={DEMO_STEP_UP_SUBJECT} http://{sts}/dev/user-token)\" {url}\n"
        ));
    }
    out.push_str("\n(Ctrl-C stops the demo.)\n");
    out
}

/// The first route of `mode`.
fn route_of(config: &Config, mode: ModeKind) -> Option<&crate::config::Route> {
    config
        .routes
        .iter()
        .find(|r| matches!(&r.exchange, Exchange::Token(p) if p.mode.kind() == mode))
        .map(|r| r.as_ref())
}

/// A route that exchanges tokens for an h2c upstream, when the plain listener takes h2c: the
/// demo's gRPC call goes there.
fn grpc_route<'a>(config: &'a Config, scheme: &str) -> Option<&'a crate::config::Route> {
    if scheme != "http" || !config.server.h2c {
        return None;
    }
    config
        .routes
        .iter()
        .find(|r| {
            matches!(r.exchange, Exchange::Token(_))
                && r.upstream.protocol == crate::config::upstream::UpstreamProtocol::H2c
        })
        .map(|r| r.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_refuses_a_remote_sts() {
        let yaml = "server: { listen: [\"127.0.0.1:0\"] }\n\
            token_services:\n  corp: { token_endpoint: \"https://sts.example.com/token\", client_id: g, client_secret: s }\n\
            routes:\n  - { name: r, match: { path_prefix: / }, upstream: \"http://127.0.0.1:1\", exchange: { mode: impersonation, token_service: corp } }\n";
        let config = Config::from_yaml(yaml, "x.yaml", &|_| None).unwrap();
        let err = sts_address(&config).unwrap_err().to_string();
        assert!(err.contains("token_services.corp.token_endpoint"), "{err}");
    }
}
