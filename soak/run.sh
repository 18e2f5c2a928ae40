#!/usr/bin/env bash
# Soak: the release gateway binary under sustained load from thousands of callers across
# several routes while its STS turns slow, then down, then recovers (see examples/soak.rs for
# what is checked and every SOAK_* setting).
#
#   soak/run.sh                         # the full run: 1,000,000 requests, 10,000 callers
#   SOAK_REQUESTS=50000 soak/run.sh     # a short smoke run with the same schedule
#
# Prints the summary and keeps it, with the generated config and the gateway's log, in
# soak/out/. Exits non-zero on a wrong token, a leaked caller token, an unexpected status, a
# transport error, or a gateway that died.
set -euo pipefail
cd "$(dirname "$0")/.."

export SOAK_OUT="${SOAK_OUT:-soak/out}"
export SOAK_MAX_SECONDS="${SOAK_MAX_SECONDS:-1800}"
mkdir -p "$SOAK_OUT"

cargo build --release --locked --bin txgate --example soak

{
  echo "date            $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine         $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(uname -sr)"
  echo "commit          $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src 2>/dev/null || echo ' (src modified)')"
  echo "schedule        ${SOAK_SCHEDULE:-slow@0.25-0.35,down@0.50-0.75} (fractions of the requests), down mode ${SOAK_DOWN_MODE:-refuse}"
} | tee "$SOAK_OUT/summary.txt"

# The driver bounds its own load phase; this bounds everything else (build excluded).
status=0
timeout --signal=TERM "$((SOAK_MAX_SECONDS + 120))" target/release/examples/soak \
  | tee -a "$SOAK_OUT/summary.txt" || status=$?
exit "$status"
