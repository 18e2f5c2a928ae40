//! Logging off the request path.
//!
//! Every event is formatted on the thread that emits it and handed to a bounded queue; one
//! writer thread drains the queue to stderr. A worker serving traffic never waits on a `write`
//! to a slow terminal, pipe or log collector: when the queue is full, the line is dropped and
//! counted, and `txgate_log_lines_dropped_total` exports the count. The queue is flushed when
//! the [`LogGuard`] is dropped, at the end of `main`.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines held for the writer thread when `TXGATE_LOG_BUFFER_LINES` is not set: about two
/// seconds of access log at 60,000 requests per second, a few MiB at most.
pub const DEFAULT_BUFFER_LINES: usize = 128_000;

/// The variable that sets the queue's length, in lines.
pub const BUFFER_LINES_VAR: &str = "TXGATE_LOG_BUFFER_LINES";

/// The engines whose debug and trace events print whole request and response headers (cookies,
/// API keys, tokens in headers other than Authorization) and STS request details: never below
/// info, whatever `TXGATE_LOG` says. txgate's own events never hold a token.
const CAPPED_AT_INFO: &[&str] = &[
    "pingora_proxy",
    "pingora_core",
    "pingora_http",
    "pingora_pool",
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
];

/// The process's dropped-line counter, once logging is set up.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Keeps the writer thread; dropping it flushes what is queued.
pub struct LogGuard {
    _worker: WorkerGuard,
}

/// Why the logging settings were refused.
#[derive(Debug, thiserror::Error)]
#[error("{BUFFER_LINES_VAR}: \"{0}\" is not a number of lines from 1 up")]
pub struct LogSettingsError(String);

/// Sets up the process's logging: the `TXGATE_LOG` filter (default `info`), the engines capped
/// at info, `format`, and the queue to the writer thread (`TXGATE_LOG_BUFFER_LINES` lines).
/// Called once, first thing in `main`.
pub fn init(format: LogFormat) -> Result<LogGuard, LogSettingsError> {
    let lines = match std::env::var(BUFFER_LINES_VAR) {
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => return Err(LogSettingsError(text)),
        },
        Err(_) => DEFAULT_BUFFER_LINES,
    };
    let mut filter =
        EnvFilter::try_from_env("TXGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    for target in CAPPED_AT_INFO {
        if let Ok(directive) = format!("{target}=info").parse() {
            filter = filter.add_directive(directive);
        }
    }
    let (writer, worker) = NonBlockingBuilder::default()
        .buffered_lines_limit(lines)
        .lossy(true)
        .thread_name("txgate-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(LogGuard { _worker: worker })
}

/// Lines dropped so far because the queue was full; 0 when logging goes elsewhere (tests,
/// embedders with their own subscriber).
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}
