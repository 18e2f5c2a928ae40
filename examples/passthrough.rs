//! A minimal pingora pass-through proxy: the engine's own limit in `bench/run.sh`.
//!
//! Every request goes unchanged to one upstream over pingora's pooled keep-alive connections.
//! The server is built the way `txgate::server::build` builds the gateway's (same
//! `ServerConf` defaults, same thread and work-stealing settings, the same global allocator),
//! so the gap between this target and `txgate` is the gateway's own per-request work, not a
//! difference in engine settings.
//!
//! ```text
//! cargo build --release --example passthrough
//! target/release/examples/passthrough LISTEN UPSTREAM [THREADS]
//! target/release/examples/passthrough 127.0.0.1:8181 127.0.0.1:8180 1
//! ```
//!
//! SIGINT or SIGTERM stops it at once (no grace period: a benchmark peer has nothing to drain).

use std::net::SocketAddr;
use std::process::ExitCode;

use async_trait::async_trait;
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use pingora::server::Server;
use pingora::server::configuration::ServerConf;

/// The allocator txgate's binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Forwards to one fixed upstream and does nothing else.
struct Passthrough {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        // Plain HTTP: no TLS, so the SNI is unused.
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, upstream, threads) = match parse(&args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("passthrough: {message}");
            eprintln!("usage: passthrough LISTEN UPSTREAM [THREADS]");
            return ExitCode::from(2);
        }
    };
    let conf = ServerConf {
        threads,
        // txgate's default (`server.work_stealing: false`).
        work_stealing: false,
        // A benchmark peer stops at once on SIGTERM; the default would wait 300 s.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Passthrough { upstream },
        "passthrough",
    );
    proxy.add_tcp(&listen.to_string());
    server.add_service(proxy);
    server.run_forever()
}

fn parse(args: &[String]) -> Result<(SocketAddr, SocketAddr, usize), String> {
    let address = |i: usize, what: &str| -> Result<SocketAddr, String> {
        let text = args.get(i).ok_or_else(|| format!("missing {what}"))?;
        text.parse()
            .map_err(|e| format!("{what} {text:?} is not host:port: {e}"))
    };
    let listen = address(0, "LISTEN")?;
    let upstream = address(1, "UPSTREAM")?;
    let threads = match args.get(2) {
        None => 1,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("THREADS {text:?} is not a positive integer")),
        },
    };
    if args.len() > 3 {
        return Err("too many arguments".into());
    }
    Ok((listen, upstream, threads))
}
