#!/usr/bin/env bash
# Installs the system packages txgate's build and tests need, only those that are missing.
#   scripts/setup.sh          build needs: cmake (pingora builds zlib-ng with it), a C compiler
#   scripts/setup.sh --test   also promtool and prometheus (Debian's prometheus), curl, chromium
#                             (status page test), redis-server (the shared cache tests start
#                             their own on a unix socket), and Node.js with the interop suite's
#                             npm packages (tests/interop), used by the tests
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

# The interop suite's third-party STS (npm oidc-provider), pinned by its lockfile.
if [[ "${1:-}" == "--test" ]]; then
  interop="$(dirname "$0")/../tests/interop"
  if [[ ! -d "$interop/node_modules" || "$interop/package-lock.json" -nt "$interop/node_modules" ]]; then
    echo "txgate setup: installing the interop STS (npm ci in tests/interop)" >&2
    npm ci --prefix "$interop" --no-audit --no-fund --loglevel=error >/dev/null
    touch "$interop/node_modules"
  fi
fi
