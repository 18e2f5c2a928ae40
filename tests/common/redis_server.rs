//! A real `redis-server` (Debian's `redis-server`; `scripts/setup.sh --test` installs it) for
//! the shared cache tests: on a unix socket in a temp dir (no port is picked in advance), with a
//! password, without persistence. Ready once it answers `PING` through the socket, polled
//! under a deadline; never a sleep.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use redis::IntoConnectionInfo;
use redis::aio::MultiplexedConnection;

use super::eventually;
use super::process::Process;
use super::tls::TempDir;

/// A redis-server this test owns; killed on drop.
pub struct RedisServer {
    process: Option<Process>,
    dir: TempDir,
    pub password: String,
}

impl RedisServer {
    /// Starts a server on a fresh socket and waits until it answers.
    pub async fn start() -> RedisServer {
        let dir = TempDir::new("redis");
        let password = format!("redis-pw-{:016x}", rand::random::<u64>());
        let mut server = RedisServer {
            process: None,
            dir,
            password,
        };
        server.restart().await;
        server
    }

    /// The socket the server listens on.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// `cache.shared.url` for this server.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    /// A file holding the password, for `cache.shared.password_file`.
    pub fn password_file(&self) -> PathBuf {
        self.dir
            .write("redis.password", &format!("{}\n", self.password))
    }

    /// Writes `keys` (base64, one per line) to a key file named `name` and returns its path.
    pub fn key_file(&self, name: &str, keys: &[&str]) -> PathBuf {
        self.dir.write(name, &format!("{}\n", keys.join("\n")))
    }

    /// Stops the server (SIGTERM) and waits for it to exit; its data is gone with it.
    pub async fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop(Duration::from_secs(10)).await;
        }
        let _ = std::fs::remove_file(self.socket());
    }

    /// Starts the server (again, on the same socket and password) and waits until it answers.
    pub async fn restart(&mut self) {
        self.stop().await;
        let program = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let process = Process::spawn(
            Command::new(&program)
                .args(["--port", "0", "--unixsocket"])
                .arg(self.socket())
                .args(["--unixsocketperm", "700", "--requirepass"])
                .arg(&self.password)
                .args(["--save", "", "--appendonly", "no", "--logfile", ""])
                .arg("--dir")
                .arg(self.dir.path()),
        )
        .unwrap_or_else(|e| panic!("cannot run {program} (apt-get install redis-server): {e}"));
        self.process = Some(process);
        let output = || {
            self.process
                .as_ref()
                .map(|p| p.output().both())
                .unwrap_or_default()
        };
        eventually(
            "redis-server answers PING",
            Duration::from_secs(10),
            || async {
                match self.try_connection().await {
                    Ok(mut c) => redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .map_err(|e| format!("{e}\n{}", output())),
                    Err(e) => Err(format!("{e}\n{}", output())),
                }
            },
        )
        .await;
    }

    async fn try_connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        let info = self.url().as_str().into_connection_info()?;
        let settings = info.redis_settings().clone().set_password(&self.password);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        client.get_multiplexed_async_connection().await
    }

    /// A connection authenticated with the password.
    pub async fn connection(&self) -> MultiplexedConnection {
        self.try_connection().await.expect("redis answers")
    }

    /// Every key and its value (as bytes; `None` for a key that is not a string).
    pub async fn dump(&self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut c = self.connection().await;
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut c)
            .await
            .unwrap();
        let mut out = Vec::new();
        for key in keys {
            let value: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut c)
                .await
                .ok()
                .flatten();
            out.push((key, value));
        }
        out
    }
}
