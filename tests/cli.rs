//! The `txgate` command as users run it: `check` on every shipped and every invalid config,
//! `--version`, and the demo's printed curl commands run for real.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_txgate");

fn check(file: &str, secret: Option<&str>) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command
        .args(["check", "--config", file])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("TXGATE_CLIENT_SECRET")
        .env_remove("TXGATE_FIXTURE_UNSET_SECRET");
    if let Some(secret) = secret {
        command.env("TXGATE_CLIENT_SECRET", secret);
    }
    let output = command.output().expect("txgate runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_gateway_yaml_passes_check() {
    let (code, stdout, stderr) = check("gateway.yaml", Some("any-secret"));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.trim(),
        "gateway.yaml: ok: 6 routes, 1 token service, listening on 127.0.0.1:8080, admin on 127.0.0.1:9090"
    );
}

#[test]
fn the_shipped_gateway_yaml_needs_its_secret_from_the_environment() {
    let (code, _, stderr) = check("gateway.yaml", None);
    assert_eq!(code, 2);
    assert_eq!(
        stderr.trim(),
        "gateway.yaml: token_services.corp.client_secret: environment variable TXGATE_CLIENT_SECRET is not set"
    );
}

/// Every file in tests/fixtures/invalid has exactly one expected message here, and vice versa.
const INVALID: &[(&str, &str)] = &[
    (
        "bad_duration.yaml",
        r#"token_services.corp.timeout: invalid duration "2 parsecs" (expected e.g. 500ms, 2s, 1m 30s)"#,
    ),
    (
        "bad_path_prefix.yaml",
        r#"routes[0].match.path_prefix: "orders" must start with '/'"#,
    ),
    (
        "bad_upstream.yaml",
        r#"routes[0].upstream: invalid upstream "http://127.0.0.1:9001/api": only scheme, host and port are allowed"#,
    ),
    (
        "bad_url.yaml",
        r#"token_services.corp.token_endpoint: invalid URL "htp//sts.example.com/token": relative URL without a base"#,
    ),
    (
        "bad_yaml.yaml",
        "invalid YAML: did not find expected ',' or ']' at line 3 column 1, while parsing a flow sequence at line 2 column 11",
    ),
    (
        "both_secrets.yaml",
        "token_services.corp: set either client_secret or client_secret_file, not both",
    ),
    (
        "client_credentials_without_audience.yaml",
        "routes[0].inbound.jwt.audiences: a client_credentials route forwards the gateway's own token, \
         so it must require an audience of the caller's token (any token of the issuer would do otherwise)",
    ),
    (
        "duplicate_route_name.yaml",
        r#"routes[1].name: duplicate route name "orders" (first used at routes[0])"#,
    ),
    (
        "ext_authz_without_listeners.yaml",
        "server.ext_authz: set grpc_listen, http_listen or both (or remove the section)",
    ),
    (
        "h2_to_http_peers.yaml",
        "routes[0].upstream.protocol: h2 is HTTP/2 over TLS and the peers are http://; use h2c for HTTP/2 without TLS",
    ),
    (
        "leeway_above_a_day.yaml",
        "routes[0].inbound.jwt.leeway: 1day 1h is more than a day, the most allowed: clocks that far apart \
         are a misconfiguration, and a token that expired that long ago would still be accepted",
    ),
    (
        "max_ttl_below_default.yaml",
        "cache.max_ttl: 1m is below cache.default_ttl (5m); the longest lifetime cannot be shorter than the default one",
    ),
    (
        "missing_env_var.yaml",
        "token_services.corp.client_secret: environment variable TXGATE_FIXTURE_UNSET_SECRET is not set",
    ),
    ("missing_key.yaml", "routes[0]: missing key `upstream`"),
    (
        "none_with_token_service.yaml",
        "routes[0].exchange.token_service: mode none sends no token upstream; remove this key",
    ),
    (
        "nothing_listens.yaml",
        "server.listen: at least one listen address is required (server.listen, server.tls.listen or server.ext_authz)",
    ),
    (
        "retries_above_limit.yaml",
        "token_services.corp.retries: 6 is more than 5, the most allowed: retries run inside the call's \
         timeout, and more of them only add load to a failing STS",
    ),
    (
        "shared_inbound_without_audience.yaml",
        "token_services.corp.inbound.jwt.audiences: route \"m2m\" uses this inbound block: a client_credentials \
         route forwards the gateway's own token, so it must require an audience of the caller's token (any token \
         of the issuer would do otherwise); set audiences here or give the route an inbound block of its own",
    ),
    (
        "unknown_key.yaml",
        "routes[0].match.hots: unknown key `hots`, expected `path_prefix` or `host`",
    ),
    (
        "unknown_mode.yaml",
        "routes[0].exchange.mode: unknown value `impersonate`, expected one of `impersonation`, `delegation`, `client_credentials`, `transaction_token`, `none`",
    ),
    (
        "unknown_token_service.yaml",
        r#"routes[1].exchange.token_service: unknown token service "corp2" (known: corp)"#,
    ),
];

#[test]
fn each_invalid_fixture_exits_2_with_its_exact_message() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    on_disk.sort();
    let listed: Vec<String> = INVALID.iter().map(|(f, _)| f.to_string()).collect();
    assert_eq!(
        on_disk, listed,
        "fixtures and expectations must match one to one"
    );
    for (file, message) in INVALID {
        let path = format!("tests/fixtures/invalid/{file}");
        let (code, stdout, stderr) = check(&path, Some("unused"));
        assert_eq!(code, 2, "{file}: {stderr}");
        assert_eq!(stdout, "", "{file}");
        assert_eq!(stderr.trim_end(), format!("{path}: {message}"), "{file}");
    }
}

#[test]
fn a_missing_file_is_a_config_error() {
    let (code, _, stderr) = check("does-not-exist.yaml", None);
    assert_eq!(code, 2);
    assert!(
        stderr.starts_with("does-not-exist.yaml: cannot read file:"),
        "{stderr}"
    );
}

#[test]
fn version_prints_the_crate_version() {
    let output = Command::new(BIN).arg("--version").output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("txgate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_demos_printed_curl_commands_show_401_then_an_exchanged_token() {
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.yaml"))
            .unwrap();
    // Every address on port 0: the demo binds the STS and the echo backend itself and prints
    // where everything listens; no port is picked in advance.
    let yaml = shipped
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0")
        .replace("127.0.0.1:9400", "127.0.0.1:0")
        .replace("127.0.0.1:9001", "127.0.0.1:0");
    let dir = std::env::temp_dir().join(format!("txgate-demo-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();

    let mut child = Command::new(BIN)
        .args(["demo", "--config"])
        .arg(&config)
        .env_remove("TXGATE_CLIENT_SECRET")
        .env("TXGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _demo = Killed(child);

    // The banner is printed once every listener is bound: read it up to its end.
    let mut commands = Vec::new();
    let mut in_try = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line.starts_with("Try it:") {
            in_try = true;
            continue;
        }
        if in_try {
            let trimmed = line.trim();
            if trimmed.starts_with("curl")
                || trimmed.starts_with("TOKEN=")
                || trimmed.starts_with("printf")
            {
                commands.push(trimmed.to_string());
            }
            if trimmed == "(Ctrl-C stops the demo.)" {
                break;
            }
        }
    }
    assert_eq!(commands.len(), 7, "{commands:?}");

    let shell = |script: &str| {
        let output = Command::new("sh").arg("-c").arg(script).output().unwrap();
        assert!(output.status.success(), "{script}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let refused = shell(&commands[0]);
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(
        refused
            .to_lowercase()
            .contains("www-authenticate: bearer realm=\"txgate\""),
        "{refused}"
    );

    let script = format!("{}\n{}\necho\necho \"$TOKEN\"\n", commands[1], commands[2]);
    let output = shell(&script);
    let mut lines = output.lines().filter(|l| !l.is_empty());
    let echoed: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let caller = lines.next().unwrap();
    let forwarded = echoed["headers"]["authorization"][0].as_str().unwrap();
    assert_eq!(
        forwarded.strip_prefix("Bearer ").map(|t| t == caller),
        Some(false)
    );
    assert!(
        !echoed.to_string().contains(caller),
        "the caller's token reached the backend"
    );
    assert_eq!(
        echoed["token"]["claims"]["aud"],
        "https://orders.example.com"
    );
    assert_eq!(echoed["token"]["claims"]["sub"], "alice");
    assert_eq!(echoed["token"]["claims"]["scope"], "orders:read");

    // The gRPC call: over h2c to the gRPC echo, the exchanged token in its metadata, the
    // status in the trailers (which the command shows on stderr).
    let script = format!("{}\n{}\necho\necho \"$TOKEN\"\n", commands[1], commands[3]);
    let output = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert!(output.status.success(), "{script}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("HTTP/2 200"), "{stderr}");
    assert!(stderr.contains("grpc-status: 0"), "{stderr}");
    let mut lines = stdout.lines().filter(|l| !l.is_empty());
    let echoed: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let caller = lines.next().unwrap();
    assert!(
        !echoed.to_string().contains(caller),
        "the caller's token reached the gRPC backend"
    );
    assert_eq!(echoed["path"], "/echo.Echo/Say");
    assert_eq!(
        echoed["headers"]["content-type"][0],
        "application/grpc+json"
    );
    assert_eq!(echoed["token"]["claims"]["aud"], "https://echo.example.com");
    assert_eq!(echoed["token"]["claims"]["sub"], "alice");

    // Two hops: the backend gets the jwt-bearer step's token for the ID-JAG's resource.
    let script = format!("{}\n{}\n", commands[1], commands[4]);
    let echoed: serde_json::Value = serde_json::from_str(shell(&script).trim()).unwrap();
    assert_eq!(
        echoed["token"]["claims"]["aud"],
        "https://reports.example.com"
    );
    assert_eq!(echoed["token"]["claims"]["sub"], "alice");
    assert_eq!(echoed["token"]["claims"]["scope"], "reports:read");

    // A Transaction Token: in Txn-Token, with no Authorization beside it.
    let script = format!("{}\n{}\n", commands[1], commands[5]);
    let echoed: serde_json::Value = serde_json::from_str(shell(&script).trim()).unwrap();
    assert!(echoed["headers"].get("authorization").is_none(), "{echoed}");
    let txn = echoed["headers"]["txn-token"][0].as_str().unwrap();
    let claims = txgate::jwt::unverified_claims(txn).unwrap();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], "https://trust.example.com");
    assert_eq!(claims["purp"], "transactions.read");
    assert_eq!(claims["rctx"]["method"], "POST");
    assert_eq!(claims["rctx"]["path"], "/transactions/42");

    // Step-up: the STS's challenge reaches the caller.
    let stepped = shell(&commands[6]);
    assert!(stepped.starts_with("HTTP/1.1 401"), "{stepped}");
    assert!(
        stepped.contains("error=\"insufficient_user_authentication\"")
            && stepped.contains("acr_values=\"urn:txgate:dev:mfa\""),
        "{stepped}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_pingone_config_passes_check_and_shows_its_endpoint_and_form() {
    let output = Command::new(BIN)
        .args(["check", "--verbose", "--config", "examples/pingone.yaml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PINGONE_CLIENT_ID", "gateway-app")
        .env("PINGONE_CLIENT_SECRET", "never-printed-secret")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!stdout.contains("never-printed-secret"));
    let env = "3f1b6c2e-8a4d-4e1f-9b7a-0c5d2e8f1a34";
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    assert_eq!(
        lines[0],
        "examples/pingone.yaml: ok: 3 routes, 1 token service, listening on 127.0.0.1:8080, admin on 127.0.0.1:9090"
    );
    assert_eq!(
        lines[1],
        format!(
            "token_services.pingone: profile pingone, token endpoint https://auth.pingone.eu/{env}/as/token, \
             client gateway-app (client_secret_basic), jwks https://auth.pingone.eu/{env}/as/jwks, inbound validation jwt"
        )
    );
    let token = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token=CALLER_TOKEN\
                 &subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token";
    assert_eq!(
        lines[2],
        format!(
            "routes[0] orders /orders -> http://127.0.0.1:9001: mode impersonation at pingone: \
             POST https://auth.pingone.eu/{env}/as/token (client_secret_basic) {token}&scope=orders%3Aread"
        )
    );
    assert!(
        lines[3].contains("actor_token=ACTOR_TOKEN&actor_token_type="),
        "{}",
        lines[3]
    );
    assert!(
        lines[3].ends_with("grant_type=client_credentials&scope=gateway%3Aact"),
        "{}",
        lines[3]
    );
    assert!(
        lines[4].ends_with(&format!("{token}&scope=inventory%3Aread")),
        "{}",
        lines[4]
    );
}

#[test]
fn every_shipped_config_passes_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec!["gateway.yaml".to_string()];
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") {
            files.push(format!("examples/{name}"));
        }
    }
    assert!(files.len() >= 2);
    for file in &files {
        let output = Command::new(BIN)
            .args(["check", "--config", file])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("TXGATE_CLIENT_SECRET", "x")
            .env("PINGONE_CLIENT_ID", "x")
            .env("PINGONE_CLIENT_SECRET", "x")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Shipped examples are what people copy: none may need a warning.
        assert_eq!(String::from_utf8_lossy(&output.stderr), "", "{file}");
    }
}

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `txgate dev-sts --listen 127.0.0.1:0` says where it listens, and its issuer is that address:
/// `txgate check` on a token service given only that issuer finds the token endpoint by OIDC
/// discovery (the explicit network step of loading) and prints it.
#[test]
fn check_discovers_the_endpoints_of_a_dev_sts_started_on_port_0() {
    let mut child = Command::new(BIN)
        .args(["dev-sts", "--listen", "127.0.0.1:0"])
        .env("TXGATE_CLIENT_SECRET", "discovery-test-secret")
        .env("TXGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _sts = Killed(child);
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).unwrap();
    let issuer = first
        .strip_prefix("development STS on ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_string();
    assert!(
        !issuer.ends_with(":0"),
        "the bound port is printed: {issuer}"
    );

    let dir = std::env::temp_dir().join(format!("txgate-discovery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.yaml");
    std::fs::write(
        &file,
        format!(
            "server: {{ listen: [\"127.0.0.1:0\"] }}\n\
             token_services:\n  dev: {{ issuer: \"{issuer}\", client_id: gateway, client_secret: s }}\n\
             routes:\n  - {{ name: r, match: {{ path_prefix: / }}, upstream: \"http://127.0.0.1:1\", exchange: {{ mode: impersonation, token_service: dev, audience: [a] }} }}\n"
        ),
    )
    .unwrap();
    let output = Command::new(BIN)
        .args(["check", "--verbose", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!("token endpoint {issuer}/token")),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A setting that reads well but cannot be put to work — an actor token file that is not there
/// — fails `txgate check` like any config error: exit 2, file and key named.
#[test]
fn check_reports_an_unreadable_actor_token_file_at_its_key() {
    let dir = std::env::temp_dir().join(format!("txgate-actor-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.yaml");
    let missing = dir.join("no-such-token");
    std::fs::write(
        &file,
        format!(
            "server: {{ listen: [\"127.0.0.1:0\"] }}\n\
             token_services:\n  corp: {{ token_endpoint: \"http://127.0.0.1:1/token\", client_id: g, client_secret: s }}\n\
             routes:\n  - {{ name: r, match: {{ path_prefix: / }}, upstream: \"http://127.0.0.1:1\", exchange: {{ mode: delegation, token_service: corp, actor: {{ token_file: \"{}\" }} }} }}\n",
            missing.display()
        ),
    )
    .unwrap();
    let output = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "{}: routes[0].exchange.actor.token_file: cannot read \"{}\"",
            file.display(),
            missing.display()
        )),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
