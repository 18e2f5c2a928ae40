#!/usr/bin/env bash
# Runs `txgate demo`: the development STS, an echo backend and the gateway (gateway.yaml) on
# loopback, after installing what the build needs. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release --locked -- demo --config gateway.yaml "$@"
