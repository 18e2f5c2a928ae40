#!/usr/bin/env python3
"""txgate benchmark harness: starts every peer on loopback, measures, writes the results.

bench/run.sh installs the peers and builds the binaries, then runs this file. It only uses
the standard library. Every process it starts is its own child, stopped by its pid when the
run ends (or fails); every load is bounded in time (wrk -d) or in count (the miss and memory
phases), and all traffic goes to 127.0.0.1.

Phases (PHASES, default all four):
  throughput  for each worker count: every target in turn, REPEAT rounds, medians
  grpc        for each worker count: h2c gRPC unary calls (h2load) straight to an h2c
              upstream, through txgate and through Envoy, REPEAT rounds, medians
  miss        MISS_N fresh callers one at a time: gateway latency minus the STS round trip
  memory      RSS before and after MEM_ENTRIES exchanged tokens are cached

Settings come from the environment; see bench/README.md.
"""

import base64
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)

TARGETS = [
    "direct",
    "pingora-bare",
    "txgate-hit",
    "txgate-hit-log",
    "txgate-hit-validated",
    "txgate-10k-users",
    "txgate-shared-hit",
    "nginx",
    "haproxy",
    "envoy",
    "envoy+txgate-ext-authz",
]
# Envoy with its ext_authz filter asking the bench gateway (gRPC) about every request.
EXT_AUTHZ_TARGET = "envoy+txgate-ext-authz"
TXGATE_TARGETS = {"txgate-hit", "txgate-hit-log", "txgate-hit-validated", "txgate-10k-users"}
# Targets measured under callgrind by the profile phase (txgate-10k-users is left out: warming
# 10,000 callers under valgrind takes longer than the rest of the run, and what it adds over
# txgate-hit is cache misses of the CPU, not instructions).
PROFILE_TARGETS = ["pingora-bare", "txgate-hit", "txgate-hit-log", "txgate-hit-validated"]
# The gRPC phase's targets, each measured with h2load over h2c (bench/README.md, "gRPC").
GRPC_TARGETS = ["grpc-direct", "grpc-txgate", "grpc-envoy"]
# The gRPC method every call names, and the route txgate matches it on.
GRPC_PATH = "/bench.Echo/Say"
# A second gateway with the shared cache level (cache.shared) on a redis-server of its own and a
# one-entry local cache: nearly every request is a local miss answered from Redis.
SHARED_TARGET = "txgate-shared-hit"

CLIENT_ID = "gateway"
# The development STS issues exchanged tokens for 300 s and the bench config drops them 30 s
# early (cache.expiry_skew): a cached entry lives 270 s. Past 80 % of that (cache.refresh_ahead,
# default 0.8) the next hit re-exchanges it in the background: warm sets are renewed with new
# caller tokens before a measurement could reach that point, so the measured path makes no STS
# call at all.
EXCHANGED_TTL = 270.0
REFRESH_AHEAD = 0.8
FRESH_FOR = EXCHANGED_TTL * REFRESH_AHEAD
RENEW_MARGIN = 15.0
AUDIENCE = "https://bench.example.com"
SCOPE = "bench:read"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


def env_int(name, default):
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def env_float(name, default):
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


class Settings:
    def __init__(self):
        self.duration = env_float("DURATION", 30)
        self.repeat = env_int("REPEAT", 3)
        self.warmup = env_float("WARMUP", 2)
        self.connections = env_int("CONNECTIONS", 50)
        self.wrk_threads = env_int("WRK_THREADS", 1)
        self.workers = [int(w) for w in os.environ.get("WORKERS", "1 2").split()]
        self.targets = os.environ.get("TARGETS", " ".join(TARGETS)).replace(",", " ").split()
        self.phases = os.environ.get("PHASES", "throughput grpc miss memory").replace(",", " ").split()
        self.grpc_streams = env_int("GRPC_STREAMS", 1)
        self.users = env_int("USERS", 10000)
        self.miss_n = env_int("MISS_N", 1000)
        self.mem_entries = env_int("MEM_ENTRIES", 100000)
        self.base_port = env_int("BASE_PORT", 18100)
        self.results_dir = os.environ.get("RESULTS_DIR", os.path.join(BENCH_DIR, "results"))
        self.run_dir = os.environ.get("RUN_DIR") or os.path.join(self.results_dir, "run")
        # Where `cargo build --release` put the binaries (run.sh builds them).
        target_dir = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO_DIR, "target")
        self.txgate = os.environ.get("TXGATE_BIN", os.path.join(target_dir, "release/txgate"))
        self.passthrough = os.environ.get(
            "PASSTHROUGH_BIN", os.path.join(target_dir, "release/examples/passthrough")
        )
        self.envoy = os.environ.get("ENVOY_BIN", "envoy")
        self.nginx = os.environ.get("NGINX_BIN", "nginx")
        self.haproxy = os.environ.get("HAPROXY_BIN", "haproxy")
        self.wrk = os.environ.get("WRK_BIN", "wrk")
        self.redis = os.environ.get("REDIS_BIN", "redis-server")
        self.h2load = os.environ.get("H2LOAD_BIN", "h2load")
        self.secret = base64.urlsafe_b64encode(os.urandom(18)).decode()
        for name in self.targets:
            if name not in TARGETS:
                sys.exit(f"harness: unknown target {name!r} (known: {', '.join(TARGETS)})")
        self.grpc_targets = os.environ.get(
            "GRPC_TARGETS", " ".join(GRPC_TARGETS)).replace(",", " ").split()
        for name in self.grpc_targets:
            if name not in GRPC_TARGETS:
                sys.exit(f"harness: unknown gRPC target {name!r} (known: {', '.join(GRPC_TARGETS)})")
        ncpu = os.cpu_count() or 1
        # Cores: with one worker the proxy owns core 0 and the load (wrk, upstream, STS) shares
        # core 1, so a proxy's throughput is its own single-core limit. With two workers on a
        # two-core machine nothing can be set apart: everything shares both cores.
        self.proxy_cpus = {1: "0"}
        self.load_cpus = {1: "1" if ncpu > 1 else "0"}
        for w in self.workers:
            if w != 1:
                self.proxy_cpus[w] = f"0-{ncpu - 1}"
                self.load_cpus[w] = f"0-{ncpu - 1}"

    def port(self, offset):
        return self.base_port + offset


# Port offsets from BASE_PORT. GRPC_UPSTREAM: the upstream's h2c server (the gRPC phase).
(UPSTREAM, STS, PASSTHROUGH, GATEWAY, GATEWAY_ADMIN, NGINX, HAPROXY, ENVOY, ENVOY_ADMIN,
 GRPC_UPSTREAM, GATEWAY_LOG, GATEWAY_LOG_ADMIN, SHARED_GATEWAY, SHARED_ADMIN,
 ENVOY_AUTHZ, ENVOY_AUTHZ_ADMIN, GATEWAY_AUTHZ) = range(17)
PORT_COUNT = 17
# ENVOY_AUTHZ: Envoy with ext_authz (envoy+txgate-ext-authz); GATEWAY_AUTHZ: the bench
# gateway's ext_authz gRPC listener.
# GATEWAY_LOG: a second gateway, as shipped (access log at info), for txgate-hit-log.


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def log_run(record):
    """One measurement's line in the progress log (throughput and gRPC phases)."""
    log(f"  {record['target']:22} w{record['workers']} rep{record['rep']}: "
        f"{record['rps']:9.0f} req/s  "
        f"p50 {record['p50_us'] / 1000:6.2f} ms  p99 {record['p99_us'] / 1000:6.2f} ms"
        f"  cpu {record['cpu_us_per_req']:5.1f} us/req"
        + (f"  sts {record['sts_calls']}" if "sts_calls" in record else "")
        + ("" if not any(record["errors"].values()) else f"  ERRORS {record['errors']}"))


def sts_calls(before, after):
    """Token exchanges between two scrapes of a gateway's /metrics."""
    return int(metric_sum(after, "txgate_token_exchanges_total")
               - metric_sum(before, "txgate_token_exchanges_total"))


# ---------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A child process, pinned with taskset, logging to a file in the run directory."""

    def __init__(self, name, argv, cpus, run_dir, env=None, stop_signal=signal.SIGINT):
        self.name = name
        self.stop_signal = stop_signal
        self.log_path = os.path.join(run_dir, f"{name}.log")
        self.log_file = open(self.log_path, "ab")
        full_env = dict(os.environ)
        full_env.update(env or {})
        # taskset execs the command, so the pid is the process itself.
        self.popen = subprocess.Popen(
            ["taskset", "-c", cpus] + argv,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
        )
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def tree(self):
        """This process and its children (nginx's workers)."""
        return [self.pid] + children_of(self.pid)

    def pin(self, cpus):
        for pid in self.tree():
            subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)],
                           stdout=subprocess.DEVNULL, check=False)

    def stop(self):
        if self.alive():
            self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self.log_file.close()

    def tail(self, lines=15):
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""


class Procs:
    """Every process this run started, so all of them stop however the run ends."""

    def __init__(self):
        self.running = []

    def start(self, *args, **kwargs):
        proc = Proc(*args, **kwargs)
        self.running.append(proc)
        return proc

    def stop(self, proc):
        proc.stop()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self):
        for proc in reversed(self.running):
            try:
                proc.stop()
            except Exception as error:  # keep stopping the others
                log(f"stopping {proc.name}: {error}")
        self.running = []


def children_of(pid):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    """User + system CPU time of the processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state is field 3, utime 14 and stime 15 (1-based).
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def port_free(port):
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_http(proc, port, path, timeout=60.0, host="127.0.0.1", headers=None):
    """Waits until GET path answers 200; fails early if the process died."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        try:
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            response.read()
            conn.close()
            if response.status == 200:
                return
            last = f"status {response.status}"
        except OSError as error:
            last = str(error)
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready on port {port} after {timeout:.0f} s ({last})")


def render(template, run_dir, name, values):
    with open(os.path.join(BENCH_DIR, "conf", template)) as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    leftover = re.findall(r"@[A-Z_]+@", text)
    if leftover:
        raise RuntimeError(f"{template}: unfilled placeholders {leftover}")
    path = os.path.join(run_dir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------------------------
# HTTP helpers (keep-alive connections, one per thread)


class Client:
    def __init__(self, port):
        self.port = port
        self.conn = None

    def request(self, method, path, headers=None, body=None):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                data = response.read()
                if response.getheader("connection", "").lower() == "close":
                    self.close()
                return response.status, data
            except (http.client.HTTPException, ConnectionError):
                # A pooled connection the server closed: retry once on a new one.
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def parallel(items, threads, work):
    """Runs work(client_index, item) over items with `threads` threads; results in order."""
    results = [None] * len(items)
    errors = []

    def run(index):
        try:
            for i in range(index, len(items), threads):
                results[i] = work(index, items[i])
        except Exception as error:
            errors.append(error)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return results


def fetch_user_tokens(sts_port, subs, threads=4):
    """Caller tokens signed by the development STS, one per subject."""
    clients = [Client(sts_port) for _ in range(threads)]

    def one(index, sub):
        status, body = clients[index].request(
            "GET", "/dev/user-token?" + urllib.parse.urlencode({"sub": sub})
        )
        if status != 200:
            raise RuntimeError(f"/dev/user-token answered {status}: {body[:200]!r}")
        return body.decode().strip()

    try:
        return parallel(subs, threads, one)
    finally:
        for c in clients:
            c.close()


def send_each(port, path, tokens, threads=8):
    """Sends one request per token through the gateway; returns the status counts."""
    clients = [Client(port) for _ in range(threads)]

    def one(index, token):
        status, _ = clients[index].request("GET", path, {"Authorization": f"Bearer {token}"})
        return status

    try:
        statuses = parallel(tokens, threads, one)
    finally:
        for c in clients:
            c.close()
    counts = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    return counts


def exchange_form(subject_token):
    """The form txgate sends for the bench routes (RFC 8693 §2.1), for direct STS timing."""
    return urllib.parse.urlencode(
        [
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", subject_token),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
            ("audience", AUDIENCE),
            ("scope", SCOPE),
        ]
    )


def sts_headers(secret):
    basic = base64.b64encode(f"{CLIENT_ID}:{secret}".encode()).decode()
    return {
        "Authorization": f"Basic {basic}",
        "Content-Type": "application/x-www-form-urlencoded",
    }


def scrape(admin_port):
    """The gateway's metrics as {(name, labels): value}."""
    client = Client(admin_port)
    status, body = client.request("GET", "/metrics")
    client.close()
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    metrics = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key.partition("{")
        metrics[(name, labels.rstrip("}"))] = float(value)
    return metrics


def metric_sum(metrics, name, contains=""):
    return sum(v for (n, labels), v in metrics.items() if n == name and contains in labels)


def percentile(values, p):
    """Nearest-rank percentile of a list."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# ---------------------------------------------------------------------------------------------
# The bench


class WarmSet:
    """Caller tokens whose exchanged tokens are in a gateway's cache, and since when.

    The development STS's exchanged tokens live 270 s in the cache; a run that could outlive
    them would measure exchanges, not hits. Such a set is renewed with new caller tokens (new
    cache keys) and warmed again before the run."""

    def __init__(self, label, path, count):
        self.label = label
        self.path = path
        self.count = count
        self.tokens = []
        self.warmed_at = None
        self.generation = 0

    def ensure(self, bench, gateway_port, run_seconds):
        if self.warmed_at is not None and (
            time.monotonic() - self.warmed_at + run_seconds + RENEW_MARGIN < FRESH_FOR
        ):
            return False
        self.generation += 1
        subs = [f"{self.label}-{i}" for i in range(self.count)]
        self.tokens = fetch_user_tokens(bench.port(STS), subs)
        # Counted from before the first exchange: the entries expire no earlier than this.
        self.warmed_at = time.monotonic()
        counts = send_each(gateway_port, self.path, self.tokens)
        if set(counts) != {200}:
            raise RuntimeError(f"warming {self.label} through the gateway: statuses {counts}")
        return True

    def write(self, path):
        with open(path, "w") as f:
            f.write("\n".join(self.tokens) + "\n")


class Bench:
    def __init__(self, settings):
        self.s = settings
        self.procs = Procs()
        self.runs = []
        self.grpc_runs = []
        self.miss = None
        self.memory = None
        self.profile = None
        self.notes = []
        self.fixed_token = None
        if os.path.abspath(self.s.run_dir) == os.path.join(BENCH_DIR, "results", "run"):
            # The default run directory holds only the previous run's configs and logs.
            shutil.rmtree(self.s.run_dir, ignore_errors=True)
        os.makedirs(self.s.run_dir, exist_ok=True)

    def port(self, offset):
        return self.s.port(offset)

    # --- peers ---------------------------------------------------------------------------

    def start_upstream(self):
        conf = render("upstream.nginx.conf", self.s.run_dir, "upstream.nginx.conf", {
            "RUN_DIR": self.s.run_dir, "UPSTREAM_PORT": self.port(UPSTREAM),
            "GRPC_UPSTREAM_PORT": self.port(GRPC_UPSTREAM),
        })
        proc = self.procs.start(
            "upstream", [self.s.nginx, "-p", self.s.run_dir, "-c", conf, "-e",
                         os.path.join(self.s.run_dir, "upstream.error.log")],
            self.s.load_cpus[1], self.s.run_dir, stop_signal=signal.SIGTERM,
        )
        wait_http(proc, self.port(UPSTREAM), "/")
        return proc

    def start_sts(self):
        proc = self.procs.start(
            "dev-sts",
            [self.s.txgate, "dev-sts", "--listen", f"127.0.0.1:{self.port(STS)}",
             "--client-id", CLIENT_ID],
            self.s.load_cpus[1], self.s.run_dir,
            env={"TXGATE_CLIENT_SECRET": self.s.secret, "TXGATE_LOG": "warn"},
        )
        wait_http(proc, self.port(STS), "/jwks")
        return proc

    def start_gateway(self, workers, cpus, name, max_entries, as_shipped=False, ext_authz=False):
        port, admin = (GATEWAY_LOG, GATEWAY_LOG_ADMIN) if as_shipped else (GATEWAY, GATEWAY_ADMIN)
        ext_authz_line = (f'ext_authz: {{ grpc_listen: "127.0.0.1:{self.port(GATEWAY_AUTHZ)}" }}'
                          if ext_authz else "# no ext_authz listener in this run")
        conf = render("txgate.yaml", self.s.run_dir, f"{name}.yaml", {
            "PORT": self.port(port), "ADMIN_PORT": self.port(admin),
            "EXT_AUTHZ": ext_authz_line,
            "WORKERS": workers, "STS_PORT": self.port(STS),
            "UPSTREAM_PORT": self.port(UPSTREAM), "MAX_ENTRIES": max_entries,
        })
        # TXGATE_LOG=warn: the per-request access log (info) stays off during load, as the
        # other proxies run with their access logs off; `as_shipped` keeps the default (info),
        # one access line per request to stderr (a file in the run directory).
        proc = self.procs.start(
            name, [self.s.txgate, "run", "--config", conf], cpus, self.s.run_dir,
            env={"TXGATE_CLIENT_SECRET": self.s.secret,
                 "TXGATE_LOG": "info" if as_shipped else "warn"},
        )
        wait_http(proc, self.port(admin), "/readyz")
        return proc

    def start_redis(self):
        """A redis-server for txgate-shared-hit, once per run: a unix socket in the run
        directory, a password, no persistence. Ready when it answers on the socket."""
        if getattr(self, "redis_proc", None) is not None:
            return
        socket_path = os.path.join(self.s.run_dir, "redis.sock")
        self.redis_password = base64.urlsafe_b64encode(os.urandom(18)).decode()
        self.redis_keys = os.path.join(self.s.run_dir, "cache.keys")
        with open(self.redis_keys, "w") as f:
            f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
        self.redis_proc = self.procs.start(
            "redis",
            [self.s.redis, "--port", "0", "--unixsocket", socket_path, "--unixsocketperm", "700",
             "--requirepass", self.redis_password, "--save", "", "--appendonly", "no",
             "--dir", self.s.run_dir],
            self.s.load_cpus[1], self.s.run_dir, stop_signal=signal.SIGTERM,
        )
        self.redis_socket = socket_path
        deadline = time.monotonic() + 30
        while True:
            if not self.redis_proc.alive():
                raise RuntimeError(f"redis-server exited:\n{self.redis_proc.tail()}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(2)
                    sock.connect(socket_path)
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64):  # +PONG, or -NOAUTH: it answers either way
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer within 30 s")
            time.sleep(0.1)

    def start_shared_gateway(self, workers, cpus):
        self.start_redis()
        conf = render("txgate-shared.yaml", self.s.run_dir, f"txgate-shared-w{workers}.yaml", {
            "PORT": self.port(SHARED_GATEWAY), "ADMIN_PORT": self.port(SHARED_ADMIN),
            "WORKERS": workers, "STS_PORT": self.port(STS),
            "UPSTREAM_PORT": self.port(UPSTREAM), "REDIS_SOCKET": self.redis_socket,
            "KEY_FILE": self.redis_keys,
        })
        proc = self.procs.start(
            f"txgate-shared-w{workers}", [self.s.txgate, "run", "--config", conf], cpus,
            self.s.run_dir,
            env={"TXGATE_CLIENT_SECRET": self.s.secret, "TXGATE_LOG": "warn",
                 "TXGATE_REDIS_PASSWORD": self.redis_password},
        )
        wait_http(proc, self.port(SHARED_ADMIN), "/readyz")
        return proc

    def start_proxies(self, workers):
        """Every proxy target at `workers` workers; returns {target: Proc}."""
        cpus = self.s.proxy_cpus[workers]
        run_dir = self.s.run_dir
        token = self.fixed_token
        wanted = set(self.s.targets)
        started = {}
        if "pingora-bare" in wanted:
            proc = self.procs.start(
                f"pingora-bare-w{workers}",
                [self.s.passthrough, f"127.0.0.1:{self.port(PASSTHROUGH)}",
                 f"127.0.0.1:{self.port(UPSTREAM)}", str(workers)],
                cpus, run_dir,
            )
            wait_http(proc, self.port(PASSTHROUGH), "/")
            started["pingora-bare"] = proc
        if wanted & ((TXGATE_TARGETS - {"txgate-hit-log"}) | {EXT_AUTHZ_TARGET}):
            started["txgate"] = self.start_gateway(
                workers, cpus, f"txgate-w{workers}", max(self.s.users * 4, 100000),
                ext_authz=EXT_AUTHZ_TARGET in wanted)
        if SHARED_TARGET in wanted:
            started["txgate-shared"] = self.start_shared_gateway(workers, cpus)
        if "txgate-hit-log" in wanted:
            started["txgate-log"] = self.start_gateway(
                workers, cpus, f"txgate-log-w{workers}", 100000, as_shipped=True)
        if "nginx" in wanted:
            conf = render("nginx.conf", run_dir, f"nginx-w{workers}.conf", {
                "RUN_DIR": run_dir, "WORKERS": workers, "PORT": self.port(NGINX),
                "UPSTREAM_PORT": self.port(UPSTREAM), "FIXED_TOKEN": token,
            })
            proc = self.procs.start(
                f"nginx-w{workers}",
                [self.s.nginx, "-p", run_dir, "-c", conf, "-e",
                 os.path.join(run_dir, "nginx.error.log")],
                cpus, run_dir, stop_signal=signal.SIGTERM,
            )
            wait_http(proc, self.port(NGINX), "/")
            started["nginx"] = proc
        if "haproxy" in wanted:
            conf = render("haproxy.cfg", run_dir, f"haproxy-w{workers}.cfg", {
                "WORKERS": workers, "PORT": self.port(HAPROXY),
                "UPSTREAM_PORT": self.port(UPSTREAM), "FIXED_TOKEN": token,
            })
            proc = self.procs.start(
                f"haproxy-w{workers}", [self.s.haproxy, "-db", "-f", conf], cpus, run_dir,
                stop_signal=signal.SIGTERM,
            )
            wait_http(proc, self.port(HAPROXY), "/")
            started["haproxy"] = proc
        if "envoy" in wanted:
            conf = render("envoy.yaml", run_dir, f"envoy-w{workers}.yaml", {
                "PORT": self.port(ENVOY), "ADMIN_PORT": self.port(ENVOY_ADMIN),
                "UPSTREAM_PORT": self.port(UPSTREAM), "FIXED_TOKEN": token,
            })
            proc = self.procs.start(
                f"envoy-w{workers}",
                [self.s.envoy, "-c", conf, "--concurrency", str(workers), "--log-level", "warn",
                 "--disable-hot-restart"],
                cpus, run_dir, stop_signal=signal.SIGTERM,
            )
            wait_http(proc, self.port(ENVOY), "/")
            started["envoy"] = proc
        if EXT_AUTHZ_TARGET in wanted:
            conf = render("envoy-ext-authz.yaml", run_dir, f"envoy-ext-authz-w{workers}.yaml", {
                "PORT": self.port(ENVOY_AUTHZ), "ADMIN_PORT": self.port(ENVOY_AUTHZ_ADMIN),
                "UPSTREAM_PORT": self.port(UPSTREAM), "AUTHZ_PORT": self.port(GATEWAY_AUTHZ),
            })
            proc = self.procs.start(
                f"envoy-ext-authz-w{workers}",
                [self.s.envoy, "-c", conf, "--concurrency", str(workers), "--log-level", "warn",
                 "--disable-hot-restart"],
                cpus, run_dir, stop_signal=signal.SIGTERM,
            )
            # Readiness through the whole path: a 200 means txgate allowed the Check.
            wait_http(proc, self.port(ENVOY_AUTHZ), "/hit/resource",
                      headers={"Authorization": f"Bearer {self.hit_token}"})
            started[EXT_AUTHZ_TARGET] = proc
        return started

    # --- one wrk run ---------------------------------------------------------------------

    def wrk(self, url, duration, cpus, headers=(), script="report.lua", env=None, tag="wrk"):
        argv = ["taskset", "-c", cpus, self.s.wrk, "-t", str(self.s.wrk_threads),
                "-c", str(self.s.connections), "-d", f"{max(1, round(duration))}s", "--timeout", "5s",
                "-s", os.path.join(BENCH_DIR, "wrk", script)]
        for h in headers:
            argv += ["-H", h]
        argv.append(url)
        full_env = dict(os.environ)
        full_env.update(env or {})
        # wrk stops by itself after -d; the timeout only guards against a hung peer.
        out = subprocess.run(argv, capture_output=True, text=True, env=full_env,
                             timeout=duration + 60)
        with open(os.path.join(self.s.run_dir, "wrk.log"), "a") as f:
            f.write(f"==== {tag}: {' '.join(argv[3:])}\n{out.stdout}{out.stderr}\n")
        for line in out.stdout.splitlines():
            if line.startswith("WRK_JSON "):
                return json.loads(line[len("WRK_JSON "):])
        raise RuntimeError(f"wrk printed no result for {url}:\n{out.stdout}\n{out.stderr}")

    # --- phases --------------------------------------------------------------------------

    def throughput(self, workers, sets):
        log(f"throughput: {workers} worker(s), proxy cores {self.s.proxy_cpus[workers]}, "
            f"load cores {self.s.load_cpus[workers]}")
        started = self.start_proxies(workers)
        upstream = self.upstream
        try:
            gateway_port = self.port(GATEWAY)
            token_file = os.path.join(self.s.run_dir, "users.tokens")
            shared_token_file = os.path.join(self.s.run_dir, "shared.tokens")
            admin_of = {name: GATEWAY_ADMIN for name in TXGATE_TARGETS}
            admin_of["txgate-hit-log"] = GATEWAY_LOG_ADMIN
            admin_of[EXT_AUTHZ_TARGET] = GATEWAY_ADMIN
            admin_of[SHARED_TARGET] = SHARED_ADMIN
            # Fresh warm sets for a fresh gateway.
            for ws in sets.values():
                ws.warmed_at = None

            def target_spec(name):
                """(url, wrk headers, script, env, pids whose CPU counts)."""
                hit_token = sets["hit"].tokens[0] if sets["hit"].tokens else self.hit_token
                auth = [f"Authorization: Bearer {hit_token}"]
                if name == "direct":
                    return (f"http://127.0.0.1:{self.port(UPSTREAM)}/hit/resource", auth,
                            "report.lua", None, upstream.tree())
                if name == "pingora-bare":
                    return (f"http://127.0.0.1:{self.port(PASSTHROUGH)}/hit/resource", auth,
                            "report.lua", None, started["pingora-bare"].tree())
                if name == "txgate-hit":
                    return (f"http://127.0.0.1:{gateway_port}/hit/resource", auth,
                            "report.lua", None, started["txgate"].tree())
                if name == "txgate-hit-log":
                    token = sets["hit-log"].tokens[0]
                    return (f"http://127.0.0.1:{self.port(GATEWAY_LOG)}/hit/resource",
                            [f"Authorization: Bearer {token}"], "report.lua", None,
                            started["txgate-log"].tree())
                if name == "txgate-hit-validated":
                    token = sets["validated"].tokens[0]
                    return (f"http://127.0.0.1:{gateway_port}/validated/resource",
                            [f"Authorization: Bearer {token}"], "report.lua", None,
                            started["txgate"].tree())
                if name == "txgate-10k-users":
                    return (f"http://127.0.0.1:{gateway_port}/users/resource", [],
                            "users.lua", {"TOKEN_FILE": token_file}, started["txgate"].tree())
                if name == SHARED_TARGET:
                    return (f"http://127.0.0.1:{self.port(SHARED_GATEWAY)}/users/resource", [],
                            "users.lua", {"TOKEN_FILE": shared_token_file},
                            started["txgate-shared"].tree())
                if name == EXT_AUTHZ_TARGET:
                    # Envoy and txgate together: the CPU of both counts.
                    return (f"http://127.0.0.1:{self.port(ENVOY_AUTHZ)}/hit/resource", auth,
                            "report.lua", None,
                            started[EXT_AUTHZ_TARGET].tree() + started["txgate"].tree())
                port = {"nginx": NGINX, "haproxy": HAPROXY, "envoy": ENVOY}[name]
                return (f"http://127.0.0.1:{self.port(port)}/hit/resource", auth,
                        "report.lua", None, started[name].tree())

            def prepare(name, seconds):
                """Warm caches the target relies on, renewing them when they could expire."""
                if name in ("txgate-hit", EXT_AUTHZ_TARGET):
                    sets["hit"].ensure(self, gateway_port, seconds)
                elif name == "txgate-hit-log":
                    sets["hit-log"].ensure(self, self.port(GATEWAY_LOG), seconds)
                elif name == "txgate-hit-validated":
                    sets["validated"].ensure(self, gateway_port, seconds)
                elif name == "txgate-10k-users":
                    if sets["users"].ensure(self, gateway_port, seconds):
                        sets["users"].write(token_file)
                        log(f"  warmed {len(sets['users'].tokens)} callers through the gateway "
                            f"(generation {sets['users'].generation})")
                elif name == SHARED_TARGET:
                    # Exchanged once each and stored in Redis; the one-entry local cache then
                    # misses on nearly every request and the shared level answers.
                    if sets["shared"].ensure(self, self.port(SHARED_GATEWAY), seconds):
                        sets["shared"].write(shared_token_file)
                        log(f"  warmed {len(sets['shared'].tokens)} callers into Redis "
                            f"(generation {sets['shared'].generation})")

            def place_upstream(name):
                # `direct` with one worker: the upstream gets the proxy's core, so it is
                # measured alone on a core like every proxy.
                if workers == 1:
                    upstream.pin(self.s.proxy_cpus[1] if name == "direct"
                                 else self.s.load_cpus[1])

            # Warm-up: pools, JWKS and validation caches, first-touch allocations.
            for name in self.s.targets:
                prepare(name, self.s.warmup)
                place_upstream(name)
                url, headers, script, env, _ = target_spec(name)
                self.wrk(url, self.s.warmup, self.s.load_cpus[workers], headers, script, env,
                         tag=f"warmup {name} w{workers}")
            # Measured rounds; each round starts one target later so no target always runs
            # right after the same neighbour.
            n = len(self.s.targets)
            for rep in range(self.s.repeat):
                order = self.s.targets[rep % n:] + self.s.targets[:rep % n]
                for name in order:
                    prepare(name, self.s.duration)
                    place_upstream(name)
                    url, headers, script, env, pids = target_spec(name)
                    admin = admin_of.get(name)
                    before = scrape(self.port(admin)) if admin is not None else None
                    # Behind Envoy, txgate's own share of the CPU too.
                    own = started["txgate"].tree() if name == EXT_AUTHZ_TARGET else None
                    own0 = cpu_seconds(own) if own else None
                    cpu0 = cpu_seconds(pids)
                    result = self.wrk(url, self.s.duration, self.s.load_cpus[workers], headers,
                                      script, env, tag=f"{name} w{workers} rep{rep + 1}")
                    cpu1 = cpu_seconds(pids)
                    record = {
                        "workers": workers,
                        "target": name,
                        "rep": rep + 1,
                        "requests": result["requests"],
                        "seconds": result["duration_us"] / 1e6,
                        "rps": result["requests"] / (result["duration_us"] / 1e6),
                        "p50_us": result["latency_us"]["p50"],
                        "p90_us": result["latency_us"]["p90"],
                        "p99_us": result["latency_us"]["p99"],
                        "p999_us": result["latency_us"]["p999"],
                        "max_us": result["latency_us"]["max"],
                        "errors": result["errors"],
                        "cpu_us_per_req": (cpu1 - cpu0) * 1e6 / max(1, result["requests"]),
                    }
                    if own:
                        record["txgate_cpu_us_per_req"] = (
                            (cpu_seconds(own) - own0) * 1e6 / max(1, result["requests"]))
                    if before is not None:
                        record["sts_calls"] = sts_calls(before, scrape(self.port(admin)))
                    self.runs.append(record)
                    log_run(record)
        finally:
            upstream.pin(self.s.load_cpus[1])
            for proc in started.values():
                self.procs.stop(proc)

    def miss_path(self):
        """MISS_N fresh callers, one request at a time, each first seen by the gateway.

        For each: the client times a direct STS exchange for another fresh caller (the STS
        round trip, same form and client authentication as the gateway's) and then the
        gateway request that triggers the exchange. Gateway-added = gateway time - STS round
        trip; it includes the upstream hop. A second request with the same token (a hit) and
        a request straight to the upstream are timed for context."""
        n = self.s.miss_n
        log(f"miss path: {n} fresh callers")
        gw = self.start_gateway(1, self.s.proxy_cpus[1], "txgate-miss", 100000)
        try:
            tokens = fetch_user_tokens(self.port(STS), [f"miss-{i}" for i in range(n)])
            direct_tokens = fetch_user_tokens(self.port(STS),
                                              [f"miss-direct-{i}" for i in range(n)])
            gateway = Client(self.port(GATEWAY))
            sts = Client(self.port(STS))
            upstream = Client(self.port(UPSTREAM))
            headers = sts_headers(self.s.secret)
            # Open every connection (and the gateway's own to the STS) before timing.
            warm = fetch_user_tokens(self.port(STS), ["miss-warm"])[0]
            gateway.request("GET", "/hit/resource", {"Authorization": f"Bearer {warm}"})
            upstream.request("GET", "/hit/resource")
            before = scrape(self.port(GATEWAY_ADMIN))
            samples = []
            for i in range(n):
                t0 = time.perf_counter_ns()
                status, body = sts.request("POST", "/token", headers, exchange_form(direct_tokens[i]))
                t1 = time.perf_counter_ns()
                if status != 200:
                    raise RuntimeError(f"direct STS exchange answered {status}: {body[:200]!r}")
                auth = {"Authorization": f"Bearer {tokens[i]}"}
                status, _ = gateway.request("GET", "/hit/resource", auth)
                t2 = time.perf_counter_ns()
                if status != 200:
                    raise RuntimeError(f"gateway miss answered {status}")
                status, _ = gateway.request("GET", "/hit/resource", auth)
                t3 = time.perf_counter_ns()
                upstream.request("GET", "/hit/resource")
                t4 = time.perf_counter_ns()
                samples.append({"sts_us": (t1 - t0) / 1e3, "miss_us": (t2 - t1) / 1e3,
                                "hit_us": (t3 - t2) / 1e3, "upstream_us": (t4 - t3) / 1e3})
            after = scrape(self.port(GATEWAY_ADMIN))
            for c in (gateway, sts, upstream):
                c.close()
        finally:
            self.procs.stop(gw)
        calls = int(metric_sum(after, "txgate_token_exchanges_total")
                    - metric_sum(before, "txgate_token_exchanges_total"))
        success = int(metric_sum(after, "txgate_token_exchanges_total", 'outcome="success"')
                      - metric_sum(before, "txgate_token_exchanges_total", 'outcome="success"'))
        misses = int(metric_sum(after, "txgate_token_cache_lookups_total", 'result="miss"')
                     - metric_sum(before, "txgate_token_cache_lookups_total", 'result="miss"'))
        added = [s["miss_us"] - s["sts_us"] for s in samples]
        summary = {"n": n, "sts_calls": calls, "sts_success": success, "cache_misses": misses}
        for key, values in (("gateway_added", added),
                            ("miss", [s["miss_us"] for s in samples]),
                            ("sts", [s["sts_us"] for s in samples]),
                            ("hit", [s["hit_us"] for s in samples]),
                            ("upstream", [s["upstream_us"] for s in samples])):
            summary[key] = {"p50_us": percentile(values, 50), "p99_us": percentile(values, 99)}
        self.miss = {"summary": summary, "samples": samples}
        log(f"  gateway-added p50 {summary['gateway_added']['p50_us'] / 1000:.3f} ms, "
            f"p99 {summary['gateway_added']['p99_us'] / 1000:.3f} ms; STS calls {calls} of {n}")

    def memory_phase(self):
        """RSS of a fresh one-worker gateway before and after MEM_ENTRIES exchanged tokens
        are cached (and halfway, so the per-entry slope excludes one-time growth)."""
        n = self.s.mem_entries
        log(f"memory: caching {n} exchanged tokens")
        gw = self.start_gateway(1, self.s.proxy_cpus[1], "txgate-memory", n + n // 5 + 100)
        try:
            warm = fetch_user_tokens(self.port(STS), ["mem-warm"])[0]
            counts = send_each(self.port(GATEWAY), "/hit/resource", [warm], threads=1)
            if set(counts) != {200}:
                raise RuntimeError(f"memory warm-up: statuses {counts}")
            time.sleep(1)
            points = [{"entries": 1, "rss": rss_bytes(gw.pid)}]
            half = n // 2
            exchanged_lengths = []
            for lo, hi in ((0, half), (half, n)):
                subs = [f"mem-{i}" for i in range(lo, hi)]
                tokens = fetch_user_tokens(self.port(STS), subs)
                counts = send_each(self.port(GATEWAY), "/hit/resource", tokens)
                if set(counts) != {200}:
                    raise RuntimeError(f"memory fill: statuses {counts}")
                # The gateway's maintenance runs on its own schedule; give it a moment.
                time.sleep(2)
                entries = int(metric_sum(scrape(self.port(GATEWAY_ADMIN)),
                                         "txgate_token_cache_entries"))
                points.append({"entries": entries, "rss": rss_bytes(gw.pid), "sent": hi})
                if not exchanged_lengths:
                    # The size of the tokens being cached: exchange a few of the same shape.
                    sts = Client(self.port(STS))
                    for token in tokens[:20]:
                        status, body = sts.request("POST", "/token", sts_headers(self.s.secret),
                                                   exchange_form(token))
                        if status == 200:
                            exchanged_lengths.append(len(json.loads(body)["access_token"]))
                    sts.close()
        finally:
            self.procs.stop(gw)
        token_bytes = statistics.mean(exchanged_lengths) if exchanged_lengths else float("nan")
        first, mid, last = points
        cached = last["entries"] - first["entries"]
        per_entry = (last["rss"] - first["rss"]) / max(1, cached)
        slope = (last["rss"] - mid["rss"]) / max(1, last["entries"] - mid["entries"])
        self.memory = {
            "entries_requested": n,
            "points": points,
            "token_bytes": token_bytes,
            "bytes_per_entry": per_entry,
            "beyond_token": per_entry - token_bytes,
            "slope_bytes_per_entry": slope,
            "slope_beyond_token": slope - token_bytes,
        }
        log(f"  RSS {first['rss'] / 2**20:.1f} MiB -> {last['rss'] / 2**20:.1f} MiB for "
            f"{cached} entries: {per_entry:.0f} B/entry, {per_entry - token_bytes:.0f} beyond "
            f"the {token_bytes:.0f}-byte token")

    def profile_phase(self):
        """Instructions per request, counted by callgrind, for pingora-bare and the txgate rows
        of PROFILE_TARGETS (pingora-bare and txgate-hit always, the others when in TARGETS).

        Each runs alone under valgrind with one worker; after a warm-up the counters are
        zeroed, wrk runs PROFILE_SECONDS, and the counters are dumped. Instruction counts do
        not depend on what else the machine is doing, unlike req/s on a shared two-core box.
        The annotated profiles land in results/profile/, and a per-crate and per-function
        comparison in the report."""
        seconds = env_float("PROFILE_SECONDS", 20)
        out_dir = os.path.join(self.s.results_dir, "profile")
        os.makedirs(out_dir, exist_ok=True)
        self.profile = {}
        names = [n for n in PROFILE_TARGETS
                 if n in ("pingora-bare", "txgate-hit") or n in self.s.targets]
        for name in names:
            out_file = os.path.join(self.s.run_dir, f"callgrind.{name}.out")
            valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}"]
            cpus = self.s.proxy_cpus[1]
            headers = [f"Authorization: Bearer {self.hit_token}"]
            if name == "pingora-bare":
                proc = self.procs.start(
                    "profile-pingora-bare",
                    valgrind + [self.s.passthrough, f"127.0.0.1:{self.port(PASSTHROUGH)}",
                                f"127.0.0.1:{self.port(UPSTREAM)}", "1"],
                    cpus, self.s.run_dir)
                wait_http(proc, self.port(PASSTHROUGH), "/", timeout=300)
                url = f"http://127.0.0.1:{self.port(PASSTHROUGH)}/hit/resource"
            else:
                conf = render("txgate.yaml", self.s.run_dir, "txgate-profile.yaml", {
                    "PORT": self.port(GATEWAY), "ADMIN_PORT": self.port(GATEWAY_ADMIN),
                    "WORKERS": 1, "STS_PORT": self.port(STS),
                    "UPSTREAM_PORT": self.port(UPSTREAM), "MAX_ENTRIES": 100000,
                    "EXT_AUTHZ": "# no ext_authz listener in this run",
                })
                # As in the throughput phase: the access log off, except for txgate-hit-log.
                level = "info" if name == "txgate-hit-log" else "warn"
                proc = self.procs.start(
                    f"profile-{name}", valgrind + [self.s.txgate, "run", "--config", conf],
                    cpus, self.s.run_dir,
                    env={"TXGATE_CLIENT_SECRET": self.s.secret, "TXGATE_LOG": level})
                wait_http(proc, self.port(GATEWAY_ADMIN), "/readyz", timeout=300)
                path = "/validated/resource" if name == "txgate-hit-validated" else "/hit/resource"
                url = f"http://127.0.0.1:{self.port(GATEWAY)}{path}"
            try:
                saved = self.s.connections
                # Few connections: under valgrind a request takes ~50× longer.
                self.s.connections = 4
                self.wrk(url, 5, self.s.load_cpus[1], headers, tag=f"profile warm-up {name}")
                subprocess.run(["callgrind_control", "--zero", str(proc.pid)],
                               capture_output=True, check=True, timeout=120)
                result = self.wrk(url, seconds, self.s.load_cpus[1], headers,
                                  tag=f"profile {name}")
                subprocess.run(["callgrind_control", "--dump", str(proc.pid)],
                               capture_output=True, check=True, timeout=120)
            finally:
                self.s.connections = saved
                self.procs.stop(proc)
            dumps = sorted(f for f in os.listdir(self.s.run_dir)
                           if f.startswith(f"callgrind.{name}.out."))
            if not dumps:
                raise RuntimeError(f"callgrind wrote no dump for {name}")
            dump = os.path.join(self.s.run_dir, dumps[-1])
            requests = result["requests"]
            if result["errors"]["status"]:
                raise RuntimeError(f"profile {name}: non-2xx answers {result['errors']}")
            functions, total = annotate(dump, os.path.join(out_dir, name))
            self.profile[name] = {
                "requests": requests,
                "ir_total": total,
                "ir_per_request": total / max(1, requests),
                "functions": {f: ir / max(1, requests) for f, ir in functions.items()},
            }
            log(f"  {name}: {total / max(1, requests):,.0f} instructions per request "
                f"({requests} requests under callgrind)")

    # --- gRPC over h2c ------------------------------------------------------------------

    def h2load(self, url, duration, cpus, headers, body_file, tag):
        """One h2load run over h2c: {requests, seconds, errors, latencies (µs)}."""
        log_file = os.path.join(self.s.run_dir, "h2load.requests.log")
        argv = ["taskset", "-c", cpus, self.s.h2load, "-D", str(max(1, round(duration))),
                "-c", str(self.s.connections), "-m", str(self.s.grpc_streams),
                "-t", str(self.s.wrk_threads), "-d", body_file, "--log-file", log_file]
        for h in headers:
            argv += ["-H", h]
        argv.append(url)
        # h2load stops by itself after -D; the timeout only guards against a hung peer.
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
        with open(os.path.join(self.s.run_dir, "h2load.log"), "a") as f:
            f.write(f"==== {tag}: {' '.join(argv[3:])}\n{out.stdout}{out.stderr}\n")
        done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                         r"(\d+) failed, (\d+) errored, (\d+) timeout", out.stdout)
        codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out.stdout)
        took = re.search(r"finished in ([\d.]+)(m?s)", out.stdout)
        if not (done and codes and took):
            raise RuntimeError(f"h2load printed no result for {url}:\n{out.stdout}\n{out.stderr}")
        seconds = float(took.group(1)) / (1000 if took.group(2) == "ms" else 1)
        # One line per request: start (µs since the epoch), status, duration (µs).
        latencies = []
        with open(log_file) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    latencies.append(int(fields[2]))
        os.remove(log_file)
        latencies.sort()
        non_2xx = int(codes.group(2)) + int(codes.group(3)) + int(codes.group(4))
        return {
            "requests": int(codes.group(1)),
            "seconds": seconds,
            "errors": {"failed": int(done.group(5)), "errored": int(done.group(6)),
                       "timeout": int(done.group(7)), "non2xx": non_2xx},
            "latencies": latencies,
        }

    def start_grpc_proxies(self, workers):
        """txgate and Envoy proxying gRPC over h2c at `workers` workers: {target: Proc}."""
        cpus = self.s.proxy_cpus[workers]
        run_dir = self.s.run_dir
        started = {}
        if "grpc-txgate" in self.s.grpc_targets:
            conf = render("txgate-grpc.yaml", run_dir, f"txgate-grpc-w{workers}.yaml", {
                "PORT": self.port(GATEWAY), "ADMIN_PORT": self.port(GATEWAY_ADMIN),
                "WORKERS": workers, "STS_PORT": self.port(STS),
                "GRPC_UPSTREAM_PORT": self.port(GRPC_UPSTREAM),
            })
            proc = self.procs.start(
                f"txgate-grpc-w{workers}", [self.s.txgate, "run", "--config", conf], cpus,
                run_dir, env={"TXGATE_CLIENT_SECRET": self.s.secret, "TXGATE_LOG": "warn"},
            )
            wait_http(proc, self.port(GATEWAY_ADMIN), "/readyz")
            started["grpc-txgate"] = proc
        if "grpc-envoy" in self.s.grpc_targets:
            conf = render("envoy-grpc.yaml", run_dir, f"envoy-grpc-w{workers}.yaml", {
                "PORT": self.port(ENVOY), "ADMIN_PORT": self.port(ENVOY_ADMIN),
                "GRPC_UPSTREAM_PORT": self.port(GRPC_UPSTREAM),
                "FIXED_TOKEN": self.fixed_token,
            })
            proc = self.procs.start(
                f"envoy-grpc-w{workers}",
                [self.s.envoy, "-c", conf, "--concurrency", str(workers), "--log-level", "warn",
                 "--disable-hot-restart"],
                cpus, run_dir, stop_signal=signal.SIGTERM,
            )
            # Envoy's listener takes HTTP/1.1 too (codec AUTO) and forwards it over h2c.
            wait_http(proc, self.port(ENVOY), "/")
            started["grpc-envoy"] = proc
        return started

    def grpc_phase(self, workers):
        log(f"grpc: {workers} worker(s), proxy cores {self.s.proxy_cpus[workers]}, "
            f"load cores {self.s.load_cpus[workers]}")
        # One unary request message: the 5-byte gRPC prefix (uncompressed, length) and a
        # small protobuf-sized payload.
        message = b"txgate gRPC bench request"
        body_file = os.path.join(self.s.run_dir, "grpc-request.bin")
        with open(body_file, "wb") as f:
            f.write(b"\x00" + len(message).to_bytes(4, "big") + message)
        started = self.start_grpc_proxies(workers)
        upstream = self.upstream
        try:
            headers = ["content-type: application/grpc", "te: trailers",
                       f"authorization: Bearer {self.hit_token}"]

            def spec(name):
                """(url, pids whose CPU counts)."""
                if name == "grpc-direct":
                    return f"http://127.0.0.1:{self.port(GRPC_UPSTREAM)}{GRPC_PATH}", upstream.tree()
                if name == "grpc-txgate":
                    return f"http://127.0.0.1:{self.port(GATEWAY)}{GRPC_PATH}", started[name].tree()
                return f"http://127.0.0.1:{self.port(ENVOY)}{GRPC_PATH}", started[name].tree()

            def place_upstream(name):
                if workers == 1:
                    upstream.pin(self.s.proxy_cpus[1] if name == "grpc-direct"
                                 else self.s.load_cpus[1])

            # Warm-up: pools, and txgate's one exchange for this caller (cached from then on).
            for name in self.s.grpc_targets:
                place_upstream(name)
                url, _ = spec(name)
                self.h2load(url, self.s.warmup, self.s.load_cpus[workers], headers, body_file,
                            tag=f"warmup {name} w{workers}")
            n = len(self.s.grpc_targets)
            for rep in range(self.s.repeat):
                order = self.s.grpc_targets[rep % n:] + self.s.grpc_targets[:rep % n]
                for name in order:
                    place_upstream(name)
                    url, pids = spec(name)
                    before = scrape(self.port(GATEWAY_ADMIN)) if name == "grpc-txgate" else None
                    cpu0 = cpu_seconds(pids)
                    result = self.h2load(url, self.s.duration, self.s.load_cpus[workers],
                                         headers, body_file, tag=f"{name} w{workers} rep{rep + 1}")
                    cpu1 = cpu_seconds(pids)
                    lat = result["latencies"]
                    record = {
                        "workers": workers,
                        "target": name,
                        "rep": rep + 1,
                        "requests": result["requests"],
                        "seconds": result["seconds"],
                        "rps": result["requests"] / max(result["seconds"], 1e-9),
                        "p50_us": percentile(lat, 50),
                        "p99_us": percentile(lat, 99),
                        "errors": result["errors"],
                        "cpu_us_per_req": (cpu1 - cpu0) * 1e6 / max(1, result["requests"]),
                    }
                    if before is not None:
                        record["sts_calls"] = sts_calls(before, scrape(self.port(GATEWAY_ADMIN)))
                    self.grpc_runs.append(record)
                    log_run(record)
        finally:
            upstream.pin(self.s.load_cpus[1])
            for proc in started.values():
                self.procs.stop(proc)

    # --- the whole run -------------------------------------------------------------------

    def run(self):
        s = self.s
        started_at = time.strftime("%Y-%m-%d %H:%M:%S")
        for offset in range(PORT_COUNT):
            if not port_free(self.port(offset)):
                raise RuntimeError(f"port {self.port(offset)} is in use; set BASE_PORT")
        self.upstream = self.start_upstream()
        self.start_sts()
        self.hit_token = fetch_user_tokens(self.port(STS), ["alice"])[0]
        # The proxies' fixed Authorization value: a real exchanged token, so every proxy
        # sends the upstream a request of the same size as txgate's.
        sts = Client(self.port(STS))
        status, body = sts.request("POST", "/token", sts_headers(s.secret),
                                   exchange_form(self.hit_token))
        sts.close()
        if status != 200:
            raise RuntimeError(f"STS exchange answered {status}: {body[:300]!r}")
        self.fixed_token = json.loads(body)["access_token"]
        sets = {
            "hit": WarmSet("hit", "/hit/resource", 1),
            "hit-log": WarmSet("hit-log", "/hit/resource", 1),
            "validated": WarmSet("validated", "/validated/resource", 1),
            "users": WarmSet("user", "/users/resource", s.users),
            "shared": WarmSet("shared", "/users/resource", s.users),
        }
        if "throughput" in s.phases:
            for workers in s.workers:
                self.throughput(workers, sets)
        if "grpc" in s.phases:
            for workers in s.workers:
                self.grpc_phase(workers)
        if "miss" in s.phases:
            self.miss_path()
        if "memory" in s.phases:
            self.memory_phase()
        if "profile" in s.phases:
            self.profile_phase()
        return started_at


def annotate(dump, prefix):
    """Writes callgrind_annotate's exclusive and inclusive views next to `prefix`; returns
    ({function: exclusive instructions}, total instructions)."""
    views = {}
    for view in ("exclusive", "inclusive"):
        out = subprocess.run(
            ["callgrind_annotate", f"--inclusive={'yes' if view == 'inclusive' else 'no'}",
             "--auto=no", "--threshold=100", dump],
            capture_output=True, text=True, check=True, timeout=600)
        # The 300 costliest lines say where the time goes; the full listings run to MBs.
        with open(f"{prefix}.{view}.txt", "w") as f:
            f.write("\n".join(out.stdout.splitlines()[:300]) + "\n")
        views[view] = out.stdout
    total = 0
    functions = {}
    for line in views["exclusive"].splitlines():
        match = re.match(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*)$", line)
        if not match:
            continue
        count = int(match.group(1).replace(",", ""))
        what = match.group(2).strip()
        if what == "PROGRAM TOTALS":
            total = count
            continue
        # "file:function [object]": the file is where the code was inlined from; the symbol
        # is what it is part of.
        what = re.sub(r"\s+\[[^\]]*\]$", "", what)
        name = what.split(":", 1)[1] if ":" in what else what
        functions[name] = functions.get(name, 0) + count
    # A dump taken while the program runs lists the frames still on the worker thread's
    # stack (thread start, the runtime's run loop) with their inclusive cost. No real function
    # of a proxy spends half of all instructions by itself, so those frames are left out.
    functions = {f: c for f, c in functions.items() if c < total / 2}
    return functions, total


def crate_of(function):
    """The crate a demangled Rust symbol belongs to, or a bucket for C code."""
    text = function.lstrip("<&*( ")
    if text.startswith("dyn "):
        text = text[4:]
    head = re.split(r"::|<| as |>", text, maxsplit=1)[0].strip()
    if head in ("core", "alloc", "std"):
        return "std/core/alloc"
    if "::" not in function:
        return "C (libc, allocator, kernel entry)"
    return head


# ---------------------------------------------------------------------------------------------
# Report


def median_of(runs, key):
    values = [r[key] for r in runs]
    return statistics.median(values) if values else float("nan")


def summarize(runs, settings):
    rows = {}
    for workers in settings.workers:
        for name in settings.targets:
            mine = [r for r in runs if r["workers"] == workers and r["target"] == name]
            if not mine:
                continue
            rows[(workers, name)] = {
                "runs": len(mine),
                "rps": median_of(mine, "rps"),
                "p50_us": median_of(mine, "p50_us"),
                "p99_us": median_of(mine, "p99_us"),
                "cpu_us_per_req": median_of(mine, "cpu_us_per_req"),
                "txgate_cpu_us_per_req": (median_of(mine, "txgate_cpu_us_per_req")
                                          if all("txgate_cpu_us_per_req" in r for r in mine)
                                          else None),
                "errors": sum(sum(r["errors"].values()) for r in mine),
                "sts_calls": (sum(r["sts_calls"] for r in mine)
                              if all("sts_calls" in r for r in mine) else "—"),
            }
    return rows


def summarize_grpc(runs, settings):
    rows = {}
    for workers in settings.workers:
        for name in settings.grpc_targets:
            mine = [r for r in runs if r["workers"] == workers and r["target"] == name]
            if not mine:
                continue
            rows[(workers, name)] = {
                "runs": len(mine),
                "rps": median_of(mine, "rps"),
                "p50_us": median_of(mine, "p50_us"),
                "p99_us": median_of(mine, "p99_us"),
                "cpu_us_per_req": median_of(mine, "cpu_us_per_req"),
                "errors": sum(sum(r["errors"].values()) for r in mine),
                "sts_calls": sum(r.get("sts_calls", 0) for r in mine),
            }
    return rows


def ratio(a, b):
    return a / b if b and b == b and a == a else float("nan")


def fmt_ratio(x):
    return "—" if x != x else f"{x:.2f}×"


def checks(rows, settings, miss, memory, profile=None):
    """The targets: (what, measured, pass?). Efficiency is CPU per request against
    pingora-bare's (pingora-bare's CPU µs/req ÷ the target's)."""
    out = []
    bare1 = rows.get((1, "pingora-bare"))
    for name, floor in (("txgate-hit-log", 0.90), ("txgate-hit", 0.95),
                        ("txgate-10k-users", 0.85), ("txgate-hit-validated", 0.85)):
        row = rows.get((1, name))
        if row and bare1:
            e = ratio(bare1["cpu_us_per_req"], row["cpu_us_per_req"])
            what = "access log on, as shipped" if name == "txgate-hit-log" else ""
            out.append((f"w1: {name} ≥ {floor:.2f}× pingora-bare's efficiency"
                        + (f" ({what})" if what else ""), fmt_ratio(e), e >= floor))
    if profile and {"pingora-bare", "txgate-hit"} <= set(profile):
        r = ratio(profile["txgate-hit"]["ir_per_request"],
                  profile["pingora-bare"]["ir_per_request"])
        out.append(("txgate-hit instructions/request ≤ 1.15× pingora-bare's (callgrind)",
                    fmt_ratio(r), r <= 1.15))
    for w in settings.workers:
        hit = rows.get((w, "txgate-hit"))
        bare = rows.get((w, "pingora-bare"))
        ngx = rows.get((w, "nginx"))
        env = rows.get((w, "envoy"))
        users = rows.get((w, "txgate-10k-users"))
        if hit and bare:
            r = ratio(hit["rps"], bare["rps"])
            out.append((f"w{w}: txgate-hit ≥ 0.90× pingora-bare req/s", fmt_ratio(r), r >= 0.90))
            r = ratio(hit["p99_us"], bare["p99_us"])
            out.append((f"w{w}: txgate-hit p99 ≤ 1.2× pingora-bare", fmt_ratio(r), r <= 1.2))
        if hit and ngx:
            r = ratio(hit["rps"], ngx["rps"])
            out.append((f"w{w}: txgate-hit ≥ 1.2× nginx req/s", fmt_ratio(r), r >= 1.2))
        if hit and env:
            r = ratio(hit["rps"], env["rps"])
            out.append((f"w{w}: txgate-hit ≥ envoy req/s", fmt_ratio(r), r >= 1.0))
        if users and bare:
            r = ratio(users["rps"], bare["rps"])
            out.append((f"w{w}: txgate-10k-users ≥ 0.85× pingora-bare req/s", fmt_ratio(r),
                        r >= 0.85))
        shared = rows.get((w, SHARED_TARGET))
        if shared and users:
            # Same callers' spread, local hits against local misses answered by Redis.
            added = (shared["p50_us"] - users["p50_us"]) / 1000
            out.append((f"w{w}: txgate-shared-hit p50 ≤ txgate-10k-users p50 + 0.3 ms",
                        f"+{added:.2f} ms", added <= 0.3))
    if miss:
        m = miss["summary"]
        p50 = m["gateway_added"]["p50_us"] / 1000
        out.append(("miss: gateway-added p50 ≤ 0.5 ms", f"{p50:.3f} ms", p50 <= 0.5))
        out.append(("miss: STS calls = N", f"{m['sts_calls']} of {m['n']}",
                    m["sts_calls"] == m["n"]))
    if memory:
        b = memory["beyond_token"]
        out.append((f"memory: ≤ 1 KiB per entry beyond the token at {memory['entries_requested']}",
                    f"{b:.0f} B", b <= 1024))
    return out


def machine_notes():
    notes = []
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
        notes.append(f"CPU: {model}, {os.cpu_count()} cores")
    except OSError:
        pass
    try:
        with open("/proc/loadavg") as f:
            notes.append(f"load average at the end: {' '.join(f.read().split()[:3])}")
    except OSError:
        pass
    return notes


def versions(settings):
    def first_line(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            text = (out.stdout + out.stderr).strip().splitlines()
            return text[0] if text else "?"
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    return {
        "txgate": first_line([settings.txgate, "--version"]),
        "nginx": first_line([settings.nginx, "-v"]),
        "haproxy": first_line([settings.haproxy, "-v"]),
        "envoy": first_line([settings.envoy, "--version"]).split("version:")[-1].strip(),
        "wrk": first_line([settings.wrk, "-v"]),
        "h2load": first_line([settings.h2load, "--version"]),
    }


def report(bench, started_at):
    s = bench.s
    rows = summarize(bench.runs, s)
    lines = [
        "# txgate benchmark results",
        "",
        f"Run started {started_at}. Duration {s.duration:g} s per measurement, {s.repeat} "
        f"round(s) alternating the targets (medians shown), {s.connections} keep-alive "
        f"connections, wrk with {s.wrk_threads} thread(s), {s.warmup:g} s warm-up per target.",
        "txgate runs with `TXGATE_LOG=warn` (its per-request access log, written at info, is "
        "off, as the other proxies' access logs are), except `txgate-hit-log`: the same "
        "requests as `txgate-hit` on a second gateway as shipped, access log at info to stderr "
        "(a file).",
        "Cores: with 1 worker each proxy is pinned to core 0 and wrk, the upstream and the STS "
        "to core 1 (`direct` pins the upstream to core 0); with 2 workers everything shares "
        "both cores.",
        "",
    ]
    for w in s.workers:
        bare = rows.get((w, "pingora-bare"))
        ngx = rows.get((w, "nginx"))
        if not any((w, name) in rows for name in s.targets):
            continue
        lines += [
            f"## {w} worker(s)",
            "",
            "| target | req/s | p50 ms | p99 ms | CPU µs/req | instr/req | req/s ÷ pingora-bare "
            "| p99 ÷ pingora-bare | req/s ÷ nginx | errors | STS calls |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        profile = bench.profile or {}
        for name in s.targets:
            r = rows.get((w, name))
            if not r:
                continue
            instr = (f"{profile[name]['ir_per_request']:,.0f}" if name in profile and w == 1
                     else "—")
            lines.append(
                f"| {name} | {r['rps']:,.0f} | {r['p50_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f} "
                f"| {r['cpu_us_per_req']:.1f} "
                f"| {instr} "
                f"| {fmt_ratio(ratio(r['rps'], bare['rps']) if bare else float('nan'))} "
                f"| {fmt_ratio(ratio(r['p99_us'], bare['p99_us']) if bare else float('nan'))} "
                f"| {fmt_ratio(ratio(r['rps'], ngx['rps']) if ngx else float('nan'))} "
                f"| {r['errors']} | {r['sts_calls']} |"
            )
        lines.append("")
        plain, authz = rows.get((w, "envoy")), rows.get((w, EXT_AUTHZ_TARGET))
        if plain and authz:
            lines += [
                f"`{EXT_AUTHZ_TARGET}` against plain `envoy`: the Check adds "
                f"{(authz['p50_us'] - plain['p50_us']) / 1000:+.2f} ms at p50 and "
                f"{(authz['p99_us'] - plain['p99_us']) / 1000:+.2f} ms at p99; Envoy and txgate "
                f"together use {authz['cpu_us_per_req']:.1f} µs CPU per request"
                + (f", of which txgate {authz['txgate_cpu_us_per_req']:.1f} µs"
                   if authz.get("txgate_cpu_us_per_req") is not None else "")
                + f" (plain Envoy {plain['cpu_us_per_req']:.1f} µs"
                + (f", txgate-hit {rows[(w, 'txgate-hit')]['cpu_us_per_req']:.1f} µs"
                   if (w, "txgate-hit") in rows else "")
                + ").",
                "",
            ]
    if rows:
        lines += [
            "CPU µs/req: user + system CPU time of the proxy's processes (all threads, nginx's "
            "workers) during the measurement, divided by the requests wrk completed; for "
            "`direct` it is the upstream's. errors: wrk's connect/read/write/timeout errors "
            "plus non-2xx answers. STS calls: token exchanges the gateway made during the "
            "measurements (0 means every request was a cache hit). instr/req: instructions "
            "per request counted by callgrind in the profile phase (one worker; see below).",
            "",
        ]
    grpc_rows = summarize_grpc(bench.grpc_runs, s)
    if grpc_rows:
        lines += [
            "## gRPC over h2c (unary)",
            "",
            f"h2load, {s.connections} h2c connections × {s.grpc_streams} stream(s) each, "
            f"{s.wrk_threads} thread(s), POST `{GRPC_PATH}` with `content-type: "
            "application/grpc`, `te: trailers`, a caller token and one 30-byte message; the "
            "upstream is the same nginx on an h2c port answering a fixed body and a "
            "`grpc-status: 0` trailer. `grpc-txgate`: `server.h2c`, a route with "
            "`upstream.protocol: h2c` and an impersonation exchange (cached); `grpc-envoy`: "
            "Envoy with an h2c listener and an HTTP/2 cluster, replacing `authorization` with "
            "a fixed exchanged token. Cores: with 1 worker each proxy is pinned to core 0 and "
            "h2load, the upstream and the STS to core 1 (`grpc-direct` pins the upstream to "
            "core 0); with 2 workers everything shares both cores.",
            "",
        ]
        for w in s.workers:
            envoy = grpc_rows.get((w, "grpc-envoy"))
            direct = grpc_rows.get((w, "grpc-direct"))
            if not any((w, t) in grpc_rows for t in s.grpc_targets):
                continue
            lines += [
                f"### {w} worker(s)",
                "",
                "| target | req/s | p50 ms | p99 ms | CPU µs/req | req/s ÷ grpc-direct "
                "| req/s ÷ grpc-envoy | CPU ÷ grpc-envoy | errors | STS calls |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for name in s.grpc_targets:
                r = grpc_rows.get((w, name))
                if not r:
                    continue
                lines.append(
                    f"| {name} | {r['rps']:,.0f} | {r['p50_us'] / 1000:.2f} "
                    f"| {r['p99_us'] / 1000:.2f} | {r['cpu_us_per_req']:.1f} "
                    f"| {fmt_ratio(ratio(r['rps'], direct['rps']) if direct else float('nan'))} "
                    f"| {fmt_ratio(ratio(r['rps'], envoy['rps']) if envoy else float('nan'))} "
                    f"| {fmt_ratio(ratio(r['cpu_us_per_req'], envoy['cpu_us_per_req']) if envoy else float('nan'))} "
                    f"| {r['errors']} | {r['sts_calls'] if name == 'grpc-txgate' else '—'} |"
                )
            lines.append("")
        lines += [
            "CPU µs/req: user + system CPU time of the proxy's processes during the "
            "measurement ÷ requests h2load completed; for `grpc-direct`, the upstream's. errors: "
            "h2load's failed, errored and timed-out requests plus non-2xx answers. STS calls: "
            "token exchanges txgate made during the measurement (0: every call a cache hit).",
            "",
        ]
    if bench.miss:
        m = bench.miss["summary"]
        lines += [
            "## Miss path",
            "",
            f"{m['n']} fresh callers, one request at a time, against the development STS on "
            f"loopback. Per caller the client times a direct STS exchange (same form and "
            f"client authentication as the gateway's, another fresh caller), then the "
            f"gateway request that makes the exchange. Gateway-added = gateway time − STS "
            f"round trip; it still contains the upstream hop.",
            "",
            "| | p50 ms | p99 ms |",
            "|---|---:|---:|",
        ]
        for key, label in (("gateway_added", "gateway-added on a miss"),
                           ("miss", "gateway request, miss (client-observed)"),
                           ("sts", "STS round trip, direct"),
                           ("hit", "gateway request, hit (same token again)"),
                           ("upstream", "upstream, direct")):
            lines.append(f"| {label} | {m[key]['p50_us'] / 1000:.3f} | {m[key]['p99_us'] / 1000:.3f} |")
        lines += [
            "",
            f"STS calls counted by `txgate_token_exchanges_total`: {m['sts_calls']} "
            f"({m['sts_success']} success) for {m['n']} callers; cache misses "
            f"{m['cache_misses']}.",
            "",
        ]
    if bench.memory:
        mem = bench.memory
        p = mem["points"]
        lines += [
            "## Memory",
            "",
            "| cached entries | RSS MiB |",
            "|---:|---:|",
        ] + [f"| {pt['entries']:,} | {pt['rss'] / 2**20:.1f} |" for pt in p] + [
            "",
            f"Exchanged token: {mem['token_bytes']:.0f} bytes. Per entry: "
            f"{mem['bytes_per_entry']:.0f} B ({mem['beyond_token']:.0f} B beyond the token) "
            f"from the first to the last point; {mem['slope_bytes_per_entry']:.0f} B "
            f"({mem['slope_beyond_token']:.0f} B beyond the token) between the last two "
            "(excludes one-time growth). RSS includes what the allocator keeps from the "
            "exchanges that filled the cache.",
            "",
        ]
    if bench.profile and {"pingora-bare", "txgate-hit"} <= set(bench.profile):
        bare, gw = bench.profile["pingora-bare"], bench.profile["txgate-hit"]
        lines += [
            "## Where txgate's per-request cost goes (callgrind)",
            "",
            f"Instructions per request, one worker, counted by callgrind over "
            f"{gw['requests']:,} (txgate-hit) and {bare['requests']:,} (pingora-bare) "
            "requests after a warm-up. Full listings: `results/profile/`.",
            "",
            f"- pingora-bare: {bare['ir_per_request']:,.0f} instructions/request",
            f"- txgate-hit: {gw['ir_per_request']:,.0f} instructions/request "
            f"({fmt_ratio(ratio(gw['ir_per_request'], bare['ir_per_request']))})",
            "",
        ]
        crates = {}
        for which, prof in (("gw", gw), ("bare", bare)):
            for function, ir in prof["functions"].items():
                entry = crates.setdefault(crate_of(function), {"gw": 0.0, "bare": 0.0})
                entry[which] += ir
        sha = crates.get("sha2", {"gw": 0.0})["gw"]
        if sha:
            # valgrind does not emulate the SHA extensions, so sha2 runs its portable code
            # under callgrind; natively it uses SHA-NI where the CPU has it.
            lines += [
                f"- txgate-hit without `sha2`: {gw['ir_per_request'] - sha:,.0f} "
                f"instructions/request "
                f"({fmt_ratio(ratio(gw['ir_per_request'] - sha, bare['ir_per_request']))}). "
                "Under valgrind `sha2` runs its portable code (valgrind does not emulate "
                "SHA-NI); on a CPU with SHA-NI the native cost of the same hashing is a small "
                "fraction of this row.",
            ]
        lines += [
            "",
            "| crate | txgate-hit Ir/req | pingora-bare Ir/req | difference |",
            "|---|---:|---:|---:|",
        ]
        for crate, v in sorted(crates.items(), key=lambda kv: -(kv[1]["gw"] - kv[1]["bare"]))[:15]:
            lines.append(f"| {crate} | {v['gw']:,.0f} | {v['bare']:,.0f} | {v['gw'] - v['bare']:+,.0f} |")
        lines += [
            "",
            "| function (exclusive) | txgate-hit Ir/req | pingora-bare Ir/req | difference |",
            "|---|---:|---:|---:|",
        ]
        names = set(gw["functions"]) | set(bare["functions"])
        diffs = sorted(names, key=lambda n: -(gw["functions"].get(n, 0) - bare["functions"].get(n, 0)))
        for n in diffs[:25]:
            g, b = gw["functions"].get(n, 0), bare["functions"].get(n, 0)
            short = n if len(n) <= 110 else n[:107] + "..."
            short = short.replace("|", "\\|")
            lines.append(f"| `{short}` | {g:,.0f} | {b:,.0f} | {g - b:+,.0f} |")
        lines.append("")
    targets = checks(rows, s, bench.miss, bench.memory, bench.profile)
    if targets:
        lines += ["## Targets", "", "| target | measured | |", "|---|---:|---|"]
    for what, measured, ok in targets:
        lines.append(f"| {what} | {measured} | {'met' if ok else '**missed**'} |")
    lines += ["", "## Machine", ""]
    lines += [f"- {n}" for n in machine_notes()]
    lines += [f"- {k}: {v}" for k, v in versions(s).items()]
    lines += [f"- {n}" for n in bench.notes]
    lines.append("")
    text = "\n".join(lines)
    os.makedirs(s.results_dir, exist_ok=True)
    with open(os.path.join(s.results_dir, "latest.md"), "w") as f:
        f.write(text)
    raw = {
        "started": started_at,
        "settings": {k: v for k, v in vars(s).items() if k != "secret"},
        "runs": bench.runs,
        "summary": [{"workers": w, "target": t, **v} for (w, t), v in rows.items()],
        "grpc_runs": bench.grpc_runs,
        "grpc_summary": [{"workers": w, "target": t, **v}
                         for (w, t), v in summarize_grpc(bench.grpc_runs, s).items()],
        "miss": bench.miss,
        "memory": bench.memory,
        "profile": bench.profile,
    }
    with open(os.path.join(s.results_dir, "latest.json"), "w") as f:
        json.dump(raw, f, indent=1)
    return text


def main():
    settings = Settings()
    bench = Bench(settings)

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    try:
        started_at = bench.run()
    except BaseException:
        bench.procs.stop_all()
        raise
    bench.procs.stop_all()
    text = report(bench, started_at)
    print()
    print(text)
    print(f"(written to {os.path.join(settings.results_dir, 'latest.md')} and latest.json; "
          f"logs in {settings.run_dir})")


if __name__ == "__main__":
    main()
