#!/usr/bin/env bash
# Runs every test: unit tests, the end-to-end gateway tests (real pingora server, in-process
# STS and upstreams on 127.0.0.1:0), the CLI and demo tests, after installing what they need.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
cargo test --locked "$@"
