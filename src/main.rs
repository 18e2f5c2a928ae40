//! The `txgate` command: wiring only. Each subcommand calls into the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use txgate::config::Config;
use txgate::describe;
use txgate::dev::sts::{DevClient, DevSts, DevStsOptions};
use txgate::exchange::discovery::OidcDiscovery;
use txgate::logging;
use txgate::secret::Secret;
use txgate::server::{self, BoundListeners};
use txgate::state::{GatewayState, StateError};

/// mimalloc instead of the C library's allocator: a proxied request makes about a hundred small
/// allocations (pingora's header maps and buffers, the exchanged token's header value), and
/// mimalloc's thread-local free lists serve them for less (bench/README.md, "Engine settings").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for configuration errors (the contract: `txgate check` exits 2).
const EXIT_CONFIG: u8 = 2;
/// Exit status for failures to start (an address in use, ...).
const EXIT_START: u8 = 1;

#[derive(Parser)]
#[command(
    name = "txgate",
    version,
    about = "A reverse-proxy gateway that exchanges the caller's token (RFC 8693) per route"
)]
struct Cli {
    /// Log format on stderr. The level comes from TXGATE_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

impl From<LogFormat> for logging::LogFormat {
    fn from(format: LogFormat) -> logging::LogFormat {
        match format {
            LogFormat::Text => logging::LogFormat::Text,
            LogFormat::Json => logging::LogFormat::Json,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        #[arg(long, default_value = "gateway.yaml")]
        config: PathBuf,
    },
    /// Validate a configuration: exit 0 with a summary, or 2 with the error.
    Check {
        #[arg(long, default_value = "gateway.yaml")]
        config: PathBuf,
        /// Also print each token service's endpoints and each route's STS request.
        #[arg(long)]
        verbose: bool,
    },
    /// Run the development STS, an echo backend and the gateway on loopback.
    Demo {
        #[arg(long, default_value = "gateway.yaml")]
        config: PathBuf,
    },
    /// Run the development STS alone (development only: it signs tokens for anyone).
    DevSts {
        #[arg(long, default_value = "127.0.0.1:9400")]
        listen: SocketAddr,
        /// The client allowed at /token; its secret is TXGATE_CLIENT_SECRET or the file.
        #[arg(long, default_value = "gateway")]
        client_id: String,
        #[arg(long)]
        client_secret_file: Option<PathBuf>,
        /// A subject that must step up (RFC 9470): its token exchanges and JWT-bearer grants are
        /// answered `insufficient_user_authentication`. Repeatable.
        #[arg(long = "step-up-subject", value_name = "NAME")]
        step_up_subjects: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of main: dropping it flushes the lines still queued.
    let _log = match logging::init(cli.log_format.into()) {
        Ok(guard) => guard,
        Err(e) => return fail(EXIT_CONFIG, &e),
    };
    match cli.command {
        Command::Check { config, verbose } => match Config::load(&config, &OidcDiscovery) {
            Ok(config) => {
                // What `run` would build from it (actor token files, HTTP clients), so a
                // setting that reads well but cannot run fails here too.
                match GatewayState::new(&config, None) {
                    Ok(_) => {}
                    Err(StateError::Config(e)) => return config_error(&e),
                    Err(e) => return fail(EXIT_START, &e),
                }
                // On stderr: the summary on stdout stays one line for scripts.
                for warning in config.warnings() {
                    eprintln!("warning: {}: {warning}", config.source);
                }
                if verbose {
                    println!("{}", describe::verbose(&config));
                } else {
                    println!("{}", describe::summary(&config));
                }
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::Run { config } => {
            let config = match Config::load(&config, &OidcDiscovery) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            server::log_warnings(&config);
            let listeners = match BoundListeners::bind(&config.server) {
                Ok(l) => l,
                Err(e) => return fail(EXIT_START, &e),
            };
            tracing::info!(
                listen = ?listeners.proxy_addrs(),
                admin = ?listeners.admin_addr(),
                ext_authz_grpc = ?listeners.ext_authz_addrs().grpc,
                ext_authz_http = ?listeners.ext_authz_addrs().http,
                routes = config.routes.len(),
                "txgate {} starting",
                env!("CARGO_PKG_VERSION")
            );
            match server::run_until_signal(&config, listeners) {
                Ok(()) => ExitCode::SUCCESS,
                Err(server::StartError::Config(e)) => config_error(&e),
                Err(e) => fail(EXIT_START, &e),
            }
        }
        Command::Demo { config } => match txgate::dev::demo::run(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(txgate::dev::demo::DemoError::Config(e)) => config_error(&e),
            Err(e) => fail(EXIT_START, &e),
        },
        Command::DevSts {
            listen,
            client_id,
            client_secret_file,
            step_up_subjects,
        } => dev_sts(listen, client_id, client_secret_file, step_up_subjects),
    }
}

fn fail(code: u8, error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(code)
}

/// Config errors print as `file: key.path: message`, alone on the line, so scripts and tests can
/// match them exactly.
fn config_error(error: &txgate::config::ConfigError) -> ExitCode {
    eprintln!("{error}");
    ExitCode::from(EXIT_CONFIG)
}

fn dev_sts(
    listen: SocketAddr,
    client_id: String,
    secret_file: Option<PathBuf>,
    step_up_subjects: Vec<String>,
) -> ExitCode {
    let secret = match (
        &secret_file,
        std::env::var(txgate::dev::demo::CLIENT_SECRET_VAR),
    ) {
        (Some(path), _) => match std::fs::read_to_string(path) {
            Ok(s) => s.trim_end_matches(['\r', '\n']).to_string(),
            Err(e) => {
                return fail(
                    EXIT_CONFIG,
                    &format!("{}: cannot read: {e}", path.display()),
                );
            }
        },
        (None, Ok(s)) if !s.is_empty() => s,
        _ => {
            return fail(
                EXIT_CONFIG,
                &"set TXGATE_CLIENT_SECRET or --client-secret-file for the STS client",
            );
        }
    };
    let client = DevClient {
        client_id,
        client_secret: Secret::new(secret),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(EXIT_START, &e),
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => return fail(EXIT_START, &format!("cannot listen on {listen}: {e}")),
        };
        // The bound address is the issuer, so `--listen 127.0.0.1:0` works and says where it
        // went.
        let bound = listener.local_addr().unwrap_or(listen);
        let mut options = DevStsOptions::new(format!("http://{bound}"), vec![client]);
        options.step_up_subjects = step_up_subjects;
        let sts = match DevSts::new(options) {
            Ok(sts) => sts,
            Err(e) => return fail(EXIT_CONFIG, &e),
        };
        println!("development STS on http://{bound} (development only)");
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        match sts.serve(listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(EXIT_START, &e),
        }
    })
}
