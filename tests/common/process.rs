//! Child processes whose output a test reads as it is written: the `txgate` binary run as an
//! operator runs it (`txgate run --config FILE`), for the tests that need the real process (its
//! logs, its signals, its exit status), and any other program a test starts (Prometheus).
//!
//! Such a child listens on port 0 and the test reads the address it bound from its log: the
//! `txgate` binary's `txgate <version> starting` event carries its addresses, and
//! [`TxgateProcess::start`] reads them from there. No port is picked in advance (a port bound,
//! released and handed to a child is a race with every other process on the machine), and
//! nothing sleeps to wait for readiness: the sockets are listening when that event is written.

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::tls::TempDir;

/// How long [`TxgateProcess::start`] waits for the binary to log its addresses.
pub const START_WITHIN: Duration = Duration::from_secs(30);

/// What the binary wrote so far.
#[derive(Clone, Default)]
pub struct Streams {
    pub stdout: String,
    pub stderr: String,
    /// Streams not yet at end of file; 0 once the process closed both (it exited).
    open: usize,
}

impl Streams {
    /// Both streams, for a failure message.
    pub fn both(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// How to start the binary: its configuration, log level and format, and environment.
pub struct Launch {
    yaml: String,
    level: String,
    format: Option<String>,
    env: Vec<(String, String)>,
}

impl Launch {
    /// The level in `TXGATE_LOG` (default `info`). It must let the `txgate` target's info
    /// events through: the start event carries the addresses.
    pub fn log_level(mut self, level: &str) -> Launch {
        self.level = level.to_string();
        self
    }

    /// `--log-format` (`text`, the binary's default, or `json`).
    pub fn log_format(mut self, format: &str) -> Launch {
        self.format = Some(format.to_string());
        self
    }

    /// One more environment variable. `TEST_CLIENT_SECRET` is always set to
    /// [`super::CLIENT_SECRET`].
    pub fn env(mut self, name: &str, value: &str) -> Launch {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Writes the configuration into a fresh directory, starts the binary on it, and returns
    /// once it has logged the addresses it listens on. Panics with its output if it exits or
    /// [`START_WITHIN`] passes first.
    pub async fn start(self) -> TxgateProcess {
        let dir = TempDir::new("process");
        let config = dir.write("gateway.yaml", &self.yaml);
        let mut command = Command::new(env!("CARGO_BIN_EXE_txgate"));
        command.args(["run", "--config"]).arg(&config);
        if let Some(format) = &self.format {
            command.args(["--log-format", format]);
        }
        command
            .env("TXGATE_LOG", &self.level)
            .env("TEST_CLIENT_SECRET", super::CLIENT_SECRET)
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let process = Process::spawn(&mut command).expect("txgate runs");
        let mut process = TxgateProcess {
            process,
            config,
            proxy: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: None,
            _dir: dir,
        };
        let (proxy, admin) = process
            .wait_for_stderr("log the addresses it listens on", START_WITHIN, |stderr| {
                bound_addresses(stderr)
            })
            .await;
        process.proxy = proxy;
        process.admin = admin;
        process
    }
}

/// The `txgate` binary, running; a [`Process`] with the addresses it bound.
pub struct TxgateProcess {
    process: Process,
    config: PathBuf,
    /// The first proxy listener, as bound.
    pub proxy: SocketAddr,
    /// The admin listener, as bound, when `server.admin_listen` is set.
    pub admin: Option<SocketAddr>,
    _dir: TempDir,
}

impl TxgateProcess {
    /// The binary on `yaml`, at log level `info` in text; see [`Launch`].
    pub fn run(yaml: &str) -> Launch {
        Launch {
            yaml: yaml.to_string(),
            level: "info".to_string(),
            format: None,
            env: Vec::new(),
        }
    }

    /// The proxy listener as a base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.proxy)
    }

    /// The admin listener as a base URL; panics when there is none.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin.expect("server.admin_listen is set"))
    }

    /// The configuration file the binary runs on (rewrite it, then send `HUP`).
    pub fn config_path(&self) -> &Path {
        &self.config
    }
}

impl Deref for TxgateProcess {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for TxgateProcess {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// A child process with its stdout and stderr piped. One thread per stream reads it to the end
/// as it is written (a full pipe never stalls the child). Killed on drop, so a test that fails
/// early leaves nothing running.
pub struct Process {
    child: Child,
    output: Arc<watch::Sender<Streams>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// While set, the readers stop reading: the child's pipes fill up and its writes block,
    /// as with a stalled terminal or log collector ([`Process::stall_output`]).
    stalled: Arc<watch::Sender<bool>>,
}

impl Process {
    /// Starts `command` with stdin closed and stdout and stderr read by this process.
    pub fn spawn(command: &mut Command) -> std::io::Result<Process> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (output, _) = watch::channel(Streams {
            open: 2,
            ..Streams::default()
        });
        let output = Arc::new(output);
        let stalled = Arc::new(watch::channel(false).0);
        let readers = vec![
            read_lines(
                child.stdout.take().unwrap(),
                output.clone(),
                stalled.clone(),
                |s| &mut s.stdout,
            ),
            read_lines(
                child.stderr.take().unwrap(),
                output.clone(),
                stalled.clone(),
                |s| &mut s.stderr,
            ),
        ];
        Ok(Process {
            child,
            output,
            readers,
            stalled,
        })
    }

    /// Stops (`true`) or resumes (`false`) reading the child's output. Stopped, its pipes fill
    /// (64 KiB on Linux) and then its writes to them block.
    pub fn stall_output(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    /// Everything the process wrote so far.
    pub fn output(&self) -> Streams {
        self.output.borrow().clone()
    }

    /// What the process wrote to stderr so far (its log).
    pub fn stderr(&self) -> String {
        self.output.borrow().stderr.clone()
    }

    /// Sends the signal `name` (`HUP`, `TERM`, ...) with kill(1).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args([format!("-{name}"), pid.clone()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {pid} failed");
    }

    /// Waits until `found` finds what it looks for in stderr, looking again at each new line;
    /// panics with the output if the process exits or `within` passes first.
    pub async fn wait_for_stderr<T>(
        &self,
        what: &str,
        within: Duration,
        found: impl Fn(&str) -> Option<T>,
    ) -> T {
        let mut seen = None;
        let mut exited = false;
        let mut changes = self.output.subscribe();
        // `is_ok` at once: the value `wait_for` returns holds a read lock on the output.
        let in_time = tokio::time::timeout(
            within,
            changes.wait_for(|streams| {
                seen = found(&streams.stderr);
                exited = streams.open == 0;
                seen.is_some() || exited
            }),
        )
        .await
        .is_ok();
        match seen {
            Some(value) => value,
            None if in_time && exited => panic!(
                "the process exited before it would {what}\n{}",
                self.output().both()
            ),
            None => panic!(
                "the process did not {what} within {within:?}\n{}",
                self.output().both()
            ),
        }
    }

    /// Its exit status once it has exited (both streams read to the end), or `None` if it is
    /// still running after `within`.
    pub async fn exited_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let mut changes = self.output.subscribe();
        let closed = tokio::time::timeout(within, changes.wait_for(|s| s.open == 0))
            .await
            .is_ok();
        if !closed {
            return None;
        }
        for reader in self.readers.drain(..) {
            reader.join().expect("an output reader ends");
        }
        Some(self.child.wait().expect("the process exits"))
    }

    /// `SIGTERM`, as an orchestrator stops it; then its exit status and everything it wrote,
    /// read to the end. Panics if it is still running after `within`.
    pub async fn stop(&mut self, within: Duration) -> (ExitStatus, Streams) {
        self.signal("TERM");
        let status = self.exited_within(within).await.unwrap_or_else(|| {
            panic!(
                "the process still runs {within:?} after SIGTERM\n{}",
                self.output().both()
            )
        });
        (status, self.output())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `pipe` line by line into the stream `pick` selects, announcing each line and the end.
fn read_lines(
    pipe: impl std::io::Read + Send + 'static,
    output: Arc<watch::Sender<Streams>>,
    stalled: Arc<watch::Sender<bool>>,
    pick: fn(&mut Streams) -> &mut String,
) -> std::thread::JoinHandle<()> {
    use std::io::BufRead;
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(pipe);
        let mut line = Vec::new();
        let mut resumed = stalled.subscribe();
        loop {
            // A plain thread: block on the watch with a small runtime-free wait.
            while *resumed.borrow_and_update() {
                futures::executor::block_on(resumed.changed()).ok();
            }
            line.clear();
            let read = reader.read_until(b'\n', &mut line).unwrap_or(0);
            if read == 0 {
                output.send_modify(|s| s.open -= 1);
                return;
            }
            output.send_modify(|s| pick(s).push_str(&String::from_utf8_lossy(&line)));
        }
    })
}

/// The proxy and admin addresses from the binary's `txgate <version> starting` event:
/// `listen=[127.0.0.1:PORT] admin=Some(127.0.0.1:PORT)` in text, the same values as strings
/// under `"listen"` and `"admin"` in JSON; `admin=None` when there is no admin listener.
pub fn bound_addresses(log: &str) -> Option<(SocketAddr, Option<SocketAddr>)> {
    let line = log
        .lines()
        .find(|l| l.contains("txgate") && l.contains(" starting"))?;
    let after_listen = &line[line.find("listen")?..];
    let proxy = first_address(after_listen)?;
    let after_admin = &line[line.find("admin")?..];
    // Whichever comes first after the key: `None`, or `Some(` and the address.
    let admin = match (after_admin.find("Some("), after_admin.find("None")) {
        (Some(some), None) => Some(first_address(&after_admin[some..])?),
        (Some(some), Some(none)) if some < none => Some(first_address(&after_admin[some..])?),
        (_, Some(_)) => None,
        (None, None) => return None,
    };
    Some((proxy, admin))
}

/// The first `127.0.0.1:PORT` in `text`.
fn first_address(text: &str) -> Option<SocketAddr> {
    let at = text.find("127.0.0.1:")?;
    let address: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | ':'))
        .collect();
    address.parse().ok()
}
