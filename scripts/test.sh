#!/usr/bin/env bash
# Runs every test: unit tests, the end-to-end gateway tests (real pingora server, in-process
# STS and upstreams on 127.0.0.1:0), the CLI and demo tests, after installing what they need.
# Ends with one summary line: "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --locked --lib --bins --tests "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
