"""Consistency checks for deploy/, run by deploy/check.sh.

Schema validation says each object is well formed; these checks say the objects agree with
each other and with the gateway: the drain time, ports and probes match gateway.yaml, the
selectors find the pods, and every PromQL expression names only metrics txgate exports.

    python3 deploy/checks.py manifests RENDERED.yaml
    python3 deploy/checks.py shared-cache RENDERED.yaml (the shared-cache overlay, rendered)
    python3 deploy/checks.py promql-rules OUT.yaml      (dashboard queries as rules, for promtool)
    python3 deploy/checks.py metric-names METRICS.txt   (live /metrics text)
    python3 deploy/checks.py ext-authz RENDERED.yaml    (deploy/istio and deploy/envoy-gateway)
    python3 deploy/checks.py readme-commands FILE.md deploy/check.sh

Each prints what it checked and exits 1 with the reasons on failure.
"""

import json
import re
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
DASHBOARD = DEPLOY / "prometheus" / "grafana-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
SERVICE_MONITOR = DEPLOY / "prometheus" / "servicemonitor.yaml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
GATEWAY_YAML = DEPLOY / "kubernetes" / "base" / "gateway.yaml"
SECRET_EXAMPLE = DEPLOY / "kubernetes" / "base" / "secret.example.yaml"
SHARED_CACHE = DEPLOY / "kubernetes" / "overlays" / "shared-cache"
ISTIO = DEPLOY / "istio"
ENVOY_GATEWAY = DEPLOY / "envoy-gateway"
# The namespace deploy/istio and deploy/envoy-gateway assume txgate runs in.
TXGATE_NAMESPACE = "txgate"

# What txgate's own defaults are when gateway.yaml leaves the keys out (README: server.*).
DEFAULT_GRACE_SECONDS = 5.0
DEFAULT_SHUTDOWN_SECONDS = 5.0

failures = []


def fail(message):
    failures.append(message)


def finish(check, detail):
    if failures:
        for message in failures:
            print(f"FAIL {check}: {message}", file=sys.stderr)
        sys.exit(1)
    print(f"ok {check}: {detail}")


# --- durations ------------------------------------------------------------------------------

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def seconds(text):
    """A gateway.yaml duration ("5s", "500ms", "1m 30s") in seconds."""
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)\b", str(text))
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)\b|\s", "", str(text)):
        raise ValueError(f"cannot read duration {text!r}")
    for number, unit in parts:
        total += float(number) * UNITS[unit]
    return total


# --- manifests ------------------------------------------------------------------------------


def by_kind(objects, kind):
    return [o for o in objects if o.get("kind") == kind]


def one(objects, kind):
    found = by_kind(objects, kind)
    if len(found) != 1:
        fail(f"expected exactly one {kind}, found {len(found)}")
        return {}
    return found[0]


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def port_of(address):
    return int(str(address).rsplit(":", 1)[1])


def check_manifests(rendered_path):
    objects = [o for o in yaml.safe_load_all(Path(rendered_path).read_text()) if o]
    deployment = one(objects, "Deployment")
    config_map = one(objects, "ConfigMap")
    if not deployment or not config_map:
        return
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    (container,) = spec["containers"]

    # The ConfigMap carries deploy/kubernetes/base/gateway.yaml unchanged.
    shipped = config_map.get("data", {}).get("gateway.yaml")
    if shipped != GATEWAY_YAML.read_text():
        fail("the ConfigMap's gateway.yaml differs from deploy/kubernetes/base/gateway.yaml")
    gateway = yaml.safe_load(shipped or "{}")
    server = gateway.get("server", {})

    # Graceful termination: the kubelet's SIGKILL must not cut the drain short.
    drain = seconds(server.get("grace_period", f"{DEFAULT_GRACE_SECONDS}s")) + seconds(
        server.get("shutdown_timeout", f"{DEFAULT_SHUTDOWN_SECONDS}s")
    )
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if not drain < grace <= drain + 30:
        fail(
            f"terminationGracePeriodSeconds is {grace}; the drain (grace_period + "
            f"shutdown_timeout) is {drain:g} s: it must be longer than that, by at most 30 s"
        )

    # Ports and probes agree with the listeners in gateway.yaml.
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    listen = [port_of(a) for a in server.get("listen", [])]
    if ports.get("proxy") not in listen:
        fail(f"container port 'proxy' {ports.get('proxy')} is not in server.listen {listen}")
    admin = server.get("admin_listen")
    if admin is None or ports.get("admin") != port_of(admin):
        fail(f"container port 'admin' {ports.get('admin')} is not server.admin_listen {admin}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") != "admin":
            fail(f"{probe} must GET {path} on the admin port, not {get}")

    # The config file is where `txgate run` is told to look.
    args = container.get("args", [])
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    config_volume = next(
        (n for n, v in volumes.items() if v.get("configMap", {}).get("name") == config_map["metadata"]["name"]),
        None,
    )
    if config_volume is None or f"{mounts.get(config_volume)}/gateway.yaml" not in args:
        fail(f"args {args} do not name gateway.yaml in the ConfigMap's mount {mounts.get(config_volume)}")
    if args[:1] != ["run"]:
        fail(f"the container must run `txgate run`, args are {args}")

    # The secret the environment references is the one the example creates.
    secret = yaml.safe_load(SECRET_EXAMPLE.read_text())
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for e in container.get("env", [])
        if e.get("name") == "TXGATE_CLIENT_SECRET" and "valueFrom" in e
    ]
    if len(refs) != 1:
        fail("TXGATE_CLIENT_SECRET must come from a secretKeyRef")
    elif refs[0]["name"] != secret["metadata"]["name"] or refs[0]["key"] not in secret.get("stringData", {}):
        fail(f"TXGATE_CLIENT_SECRET refers to {refs[0]}, which secret.example.yaml does not create")
    if "${TXGATE_CLIENT_SECRET}" not in shipped:
        fail("gateway.yaml does not read the client secret from ${TXGATE_CLIENT_SECRET}")

    # Restricted pod security (the Kubernetes "restricted" profile's requirements).
    pod_security = spec.get("securityContext", {})
    security = container.get("securityContext", {})
    if not (pod_security.get("runAsNonRoot") or security.get("runAsNonRoot")):
        fail("runAsNonRoot is not set")
    if security.get("allowPrivilegeEscalation") is not False:
        fail("allowPrivilegeEscalation must be false")
    if security.get("readOnlyRootFilesystem") is not True:
        fail("readOnlyRootFilesystem must be true")
    if security.get("capabilities", {}).get("drop") != ["ALL"]:
        fail("capabilities must drop ALL")
    seccomp = security.get("seccompProfile") or pod_security.get("seccompProfile") or {}
    if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
        fail("seccompProfile must be RuntimeDefault or Localhost")
    resources = container.get("resources", {})
    for need in ("requests.cpu", "requests.memory", "limits.memory"):
        group, name = need.split(".")
        if name not in resources.get(group, {}):
            fail(f"resources.{need} is not set")

    # Everything that selects pods selects these pods.
    if not selects(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        fail("the Deployment's selector does not match its own pods")
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        for obj in by_kind(objects, kind):
            spec_ = obj["spec"]
            selector = spec_.get("selector") or spec_.get("podSelector")
            selector = selector.get("matchLabels", selector) if kind != "Service" else selector
            if not selects(selector, pod_labels):
                fail(f"{kind}/{obj['metadata']['name']} does not select the txgate pods")
    for service in by_kind(objects, "Service"):
        for port in service["spec"]["ports"]:
            if port["targetPort"] not in ports:
                fail(f"Service/{service['metadata']['name']} targets unknown port {port['targetPort']}")
    hpa = one(objects, "HorizontalPodAutoscaler")
    target = hpa.get("spec", {}).get("scaleTargetRef", {})
    if (target.get("kind"), target.get("name")) != ("Deployment", deployment["metadata"]["name"]):
        fail(f"the HorizontalPodAutoscaler scales {target}, not the Deployment")
    if hpa and hpa["spec"].get("minReplicas", 1) < 2:
        fail("minReplicas below 2 leaves no gateway while one pod drains")
    # The ext_authz port: the container port is server.ext_authz.grpc_listen's, and the
    # Service publishes it.
    grpc_listen = (server.get("ext_authz") or {}).get("grpc_listen")
    if grpc_listen is not None and ports.get("ext-authz") != port_of(grpc_listen):
        fail(f"container port 'ext-authz' {ports.get('ext-authz')} is not server.ext_authz.grpc_listen {grpc_listen}")
    network_policy = one(objects, "NetworkPolicy")
    policy_ports = {
        p.get("port") for rule in network_policy.get("spec", {}).get("ingress", []) for p in rule.get("ports", [])
    }
    if not {"proxy", "admin"} <= policy_ports:
        fail(f"the NetworkPolicy must admit the proxy and admin ports, admits {policy_ports}")
    if grpc_listen is not None and "ext-authz" not in policy_ports:
        fail(f"the NetworkPolicy must admit the ext-authz port, admits {policy_ports}")

    # Prometheus finds the admin port: the ServiceMonitor's selector and port, and the plain
    # scrape config's DNS name and port, name the admin Service.
    monitor = yaml.safe_load(SERVICE_MONITOR.read_text())
    wanted = monitor["spec"]["selector"]["matchLabels"]
    matched = [s for s in by_kind(objects, "Service") if selects(wanted, s["metadata"].get("labels", {}))]
    if len(matched) != 1:
        fail(f"the ServiceMonitor selects {len(matched)} Services, expected exactly one")
    else:
        admin_service = matched[0]
        names = {p["name"]: p for p in admin_service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            port = names.get(endpoint["port"])
            if port is None or port["targetPort"] != "admin":
                fail(f"ServiceMonitor endpoint port {endpoint['port']} is not the admin port")
        job_label = monitor["spec"].get("jobLabel")
        if admin_service["metadata"]["labels"].get(job_label) != "txgate":
            fail("the ServiceMonitor's job label does not come out as `txgate` (the alerts use it)")
        scrape = yaml.safe_load(SCRAPE_CONFIG.read_text())
        (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "txgate"]
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                if not name.startswith(admin_service["metadata"]["name"] + "."):
                    fail(f"prometheus.yml discovers {name}, not the admin Service")
            if sd.get("port") != ports.get("admin"):
                fail(f"prometheus.yml scrapes port {sd.get('port')}, the admin port is {ports.get('admin')}")
        if admin_service["spec"].get("clusterIP") != "None":
            fail("the admin Service must be headless so DNS lists every pod")
    finish("manifests", f"they agree with gateway.yaml and each other ({len(objects)} objects, drain {drain:g} s < {grace} s)")


def check_shared_cache(rendered_path):
    """The shared-cache overlay: its gateway.yaml is the base's plus `cache.shared`, and the
    pod gets what that block reads (the password variable, the key file) from the Secrets the
    example creates, and may reach Redis."""
    objects = [o for o in yaml.safe_load_all(Path(rendered_path).read_text()) if o]
    deployment = one(objects, "Deployment")
    config_map = one(objects, "ConfigMap")
    if not deployment or not config_map:
        finish("shared-cache", "")
        return
    shipped = config_map.get("data", {}).get("gateway.yaml", "")
    if shipped != (SHARED_CACHE / "gateway.yaml").read_text():
        fail("the ConfigMap's gateway.yaml differs from the overlay's gateway.yaml")
    gateway = yaml.safe_load(shipped or "{}")
    shared = gateway.get("cache", {}).pop("shared", None)
    if not shared:
        fail("the overlay's gateway.yaml has no cache.shared")
        finish("shared-cache", "")
        return
    if gateway != yaml.safe_load(GATEWAY_YAML.read_text()):
        fail("the overlay's gateway.yaml differs from the base's outside cache.shared")

    secrets = {
        s["metadata"]["name"]: s
        for s in yaml.safe_load_all((SHARED_CACHE / "secrets.example.yaml").read_text())
        if s
    }
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container.get("env", [])}
    for name in ("TXGATE_CLIENT_SECRET", "TXGATE_REDIS_PASSWORD"):
        if "valueFrom" not in env.get(name, {}):
            fail(f"{name} must come from a secretKeyRef")
    ref = env.get("TXGATE_REDIS_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef", {})
    if ref.get("key") not in secrets.get(ref.get("name"), {}).get("stringData", {}):
        fail(f"TXGATE_REDIS_PASSWORD refers to {ref}, which secrets.example.yaml does not create")
    if shared.get("password") != "${TXGATE_REDIS_PASSWORD}":
        fail("cache.shared.password must be \"${TXGATE_REDIS_PASSWORD}\"")

    key_file = Path(str(shared.get("encryption_key_file", "")))
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mount = mounts.get(str(key_file.parent))
    secret_name = volumes.get((mount or {}).get("name"), {}).get("secret", {}).get("secretName")
    if mount is None or not mount.get("readOnly"):
        fail(f"no read-only mount at {key_file.parent} for cache.shared.encryption_key_file")
    elif key_file.name not in secrets.get(secret_name, {}).get("stringData", {}):
        fail(f"{key_file} comes from Secret {secret_name}, which secrets.example.yaml does not create with key {key_file.name}")

    url = str(shared.get("url", ""))
    match = re.match(r"rediss?://[^/:]+(?::(\d+))?", url)
    port = int(match.group(1) or 6379) if match else None
    if port is None:
        fail(f"cache.shared.url {url} is not a redis:// or rediss:// address")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    egress_ports = {
        p.get("port")
        for policy in by_kind(objects, "NetworkPolicy")
        if selects(policy["spec"].get("podSelector", {}).get("matchLabels", {}), pod_labels)
        for rule in policy["spec"].get("egress", [])
        for p in rule.get("ports", [])
    }
    if port not in egress_ports:
        fail(f"no NetworkPolicy lets the pods reach Redis on port {port} (egress ports: {sorted(map(str, egress_ports))})")
    finish("shared-cache", f"the overlay adds cache.shared, its Secrets and egress to Redis on port {port}")


# --- PromQL ---------------------------------------------------------------------------------

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
            "bool", "offset", "inf", "nan"}


def grafana_to_promql(expr):
    """Replaces Grafana's variables with values Prometheus accepts."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def metric_names(expr):
    """The metric names an expression selects (functions, keywords and labels left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        token = match.group(0)
        following = expr[match.end():].lstrip()
        if following.startswith("(") or token.lower() in KEYWORDS:
            continue
        if re.match(r"^\d", expr[max(0, match.start() - 1):match.start()] or "x"):
            continue  # the unit of a number, e.g. the `m` of `5m`
        names.add(token)
    return names


def dashboard_queries():
    """(where, PromQL) for every query in the dashboard, template variables included."""
    board = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} {target['refId']}", grafana_to_promql(target["expr"])))
    for variable in board["templating"]["list"]:
        if variable.get("type") == "query":
            definition = variable["definition"]
            match = re.fullmatch(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)", definition)
            if not match:
                fail(f"variable {variable['name']}: unexpected query {definition}")
                continue
            queries.append((f"variable {variable['name']}", f"count by ({match.group(2)}) ({match.group(1)})"))
    return queries


def alert_queries():
    rules = yaml.safe_load(ALERTS.read_text())
    return [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"] if "alert" in r]


def write_promql_rules(out):
    """The dashboard's queries as recording rules, so `promtool check rules` parses them."""
    rules = [
        {"record": f"txgate_dashboard:query_{i}", "expr": expr}
        for i, (_, expr) in enumerate(dashboard_queries())
    ]
    Path(out).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    finish("promql-rules", f"{len(rules)} dashboard queries written to {out} for promtool")


def check_metric_names(metrics_path):
    live = set()
    for line in Path(metrics_path).read_text().splitlines():
        if line and not line.startswith("#"):
            live.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    if not live:
        fail(f"no samples in {metrics_path}")
    used = 0
    for where, expr, allowed in [(w, e, set()) for w, e in dashboard_queries()] + [
        (w, e, {"up"}) for w, e in alert_queries()
    ]:
        names = metric_names(expr)
        if not names:
            fail(f"{where}: no metric name found in {expr!r}")
        for name in names - allowed:
            used += 1
            if name not in live:
                fail(f"{where}: {name} is not in the gateway's /metrics")
    finish("metric-names", f"{used} metric references in the dashboard and alerts exist in live /metrics ({len(live)} series names)")


# --- ext_authz: Istio and Envoy Gateway -----------------------------------------------------
# Their CRD schemas are not available offline, so these are structural checks: kinds and
# apiVersions, the fields each object needs, and the names and port that must match the txgate
# Service of the rendered base.

def required(obj, path, where):
    value = obj
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            fail(f"{where}: {path} is missing")
            return None
        value = value[key]
    return value


def kind_of(objects, api_version, kind, where):
    found = [o for o in objects if o.get("kind") == kind]
    if len(found) != 1:
        fail(f"{where}: expected one {kind}, found {len(found)}")
        return {}
    if found[0].get("apiVersion") != api_version:
        fail(f"{where}: {kind} has apiVersion {found[0].get('apiVersion')}, expected {api_version}")
    if not found[0].get("metadata", {}).get("name"):
        fail(f"{where}: {kind} has no metadata.name")
    return found[0]


def check_ext_authz(rendered_path):
    objects = [o for o in yaml.safe_load_all(Path(rendered_path).read_text()) if o]
    service = next((s for s in by_kind(objects, "Service") if s["metadata"]["name"] == "txgate"), None)
    if service is None:
        fail("the base renders no Service `txgate`")
        finish("ext-authz", "")
    grpc_ports = [p for p in service["spec"]["ports"] if p["name"] == "ext-authz-grpc"]
    if len(grpc_ports) != 1:
        fail("Service/txgate has no `ext-authz-grpc` port")
        finish("ext-authz", "")
    port = grpc_ports[0]["port"]
    host = f"txgate.{TXGATE_NAMESPACE}.svc.cluster.local"

    mesh_file = ISTIO / "mesh-config.yaml"
    mesh = kind_of(list(yaml.safe_load_all(mesh_file.read_text())), "install.istio.io/v1alpha1", "IstioOperator", mesh_file.name)
    providers = required(mesh, "spec.meshConfig.extensionProviders", mesh_file.name) or []
    txgate_providers = [p for p in providers if p.get("name") == "txgate"]
    if len(txgate_providers) != 1:
        fail(f"{mesh_file.name}: expected one extension provider named txgate")
        provider = {}
    else:
        provider = txgate_providers[0].get("envoyExtAuthzGrpc")
        if not isinstance(provider, dict):
            fail(f"{mesh_file.name}: the txgate provider is not envoyExtAuthzGrpc")
            provider = {}
    if provider.get("service") != host or provider.get("port") != port:
        fail(f"{mesh_file.name}: the provider calls {provider.get('service')}:{provider.get('port')}, the Service is {host}:{port}")
    if provider.get("failOpen", False) is not False:
        fail(f"{mesh_file.name}: failOpen must be false (a request txgate did not check must not pass)")

    policy_file = ISTIO / "authorization-policy.yaml"
    policy = kind_of(list(yaml.safe_load_all(policy_file.read_text())), "security.istio.io/v1", "AuthorizationPolicy", policy_file.name)
    if policy.get("spec", {}).get("action") != "CUSTOM":
        fail(f"{policy_file.name}: action must be CUSTOM")
    if required(policy, "spec.provider.name", policy_file.name) != "txgate":
        fail(f"{policy_file.name}: provider.name must be the mesh's txgate provider")
    if not policy.get("spec", {}).get("rules"):
        fail(f"{policy_file.name}: a CUSTOM policy without rules applies to no request")

    eg_file = ENVOY_GATEWAY / "security-policy.yaml"
    eg_objects = list(yaml.safe_load_all(eg_file.read_text()))
    security = kind_of(eg_objects, "gateway.envoyproxy.io/v1alpha1", "SecurityPolicy", eg_file.name)
    if not required(security, "spec.targetRefs", eg_file.name):
        fail(f"{eg_file.name}: the SecurityPolicy targets nothing")
    refs = required(security, "spec.extAuth.grpc.backendRefs", eg_file.name) or []
    if len(refs) != 1 or (refs[0].get("kind"), refs[0].get("name"), refs[0].get("namespace"), refs[0].get("port")) != (
        "Service",
        "txgate",
        TXGATE_NAMESPACE,
        port,
    ):
        fail(f"{eg_file.name}: extAuth.grpc.backendRefs {refs} is not Service txgate.{TXGATE_NAMESPACE} port {port}")
    if security.get("spec", {}).get("extAuth", {}).get("failOpen", False) is not False:
        fail(f"{eg_file.name}: failOpen must be false")
    grant = kind_of(eg_objects, "gateway.networking.k8s.io/v1beta1", "ReferenceGrant", eg_file.name)
    policy_namespace = security.get("metadata", {}).get("namespace")
    if grant.get("metadata", {}).get("namespace") != TXGATE_NAMESPACE:
        fail(f"{eg_file.name}: the ReferenceGrant must live in {TXGATE_NAMESPACE}, beside the Service")
    froms = grant.get("spec", {}).get("from", [])
    if not any(f.get("kind") == "SecurityPolicy" and f.get("namespace") == policy_namespace for f in froms):
        fail(f"{eg_file.name}: the ReferenceGrant does not admit SecurityPolicies from {policy_namespace}")
    tos = grant.get("spec", {}).get("to", [])
    if not any(t.get("kind") == "Service" and t.get("name") in (None, "txgate") for t in tos):
        fail(f"{eg_file.name}: the ReferenceGrant does not grant the txgate Service")
    finish("ext-authz", f"Istio provider and policy, Envoy Gateway SecurityPolicy name Service txgate.{TXGATE_NAMESPACE} port {port}")


# --- README ---------------------------------------------------------------------------------

MARKER = "<!-- run by deploy/check.sh -->"


def check_readme_commands(readme, script):
    """Every command in a code block marked MARKER is a line of the check script, verbatim."""
    lines = Path(readme).read_text().splitlines()
    script_lines = {l.strip() for l in Path(script).read_text().splitlines()}
    checked = 0
    i = 0
    while i < len(lines):
        if lines[i].strip() == MARKER:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            j += 1
            while j < len(lines) and not lines[j].startswith("```"):
                command = lines[j].strip()
                if command and not command.startswith("#"):
                    checked += 1
                    if command not in script_lines:
                        fail(f"{readme}:{j + 1}: `{command}` is not a line of {script}")
                j += 1
            i = j
        i += 1
    if checked == 0:
        fail(f"{readme} has no code block marked {MARKER}")
    finish("readme-commands", f"{checked} README commands are the ones {script} runs")


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    command, args = sys.argv[1], sys.argv[2:]
    {
        "manifests": check_manifests,
        "shared-cache": check_shared_cache,
        "promql-rules": write_promql_rules,
        "metric-names": check_metric_names,
        "ext-authz": check_ext_authz,
        "readme-commands": check_readme_commands,
    }[command](*args)


if __name__ == "__main__":
    main()
