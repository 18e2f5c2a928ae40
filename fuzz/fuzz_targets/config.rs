//! `gateway.yaml` parsing: any text either loads or fails with an error that names the file.
//!
//! Loading a valid config resolves host names (listen addresses, upstreams) and may run OIDC
//! discovery, so inputs whose strings could name a non-loopback address are skipped before
//! parsing: every such string needs a `:` (a URL scheme or a port). Run this target inside a
//! loopback-only network namespace as well (see fuzz/README.md).

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_yaml::Value;

const SOURCE: &str = "fuzz.yaml";

/// True when a string the config might resolve or fetch could leave the machine.
fn may_leave_loopback(s: &str) -> bool {
    const SAFE: &[&str] = &[
        "127.0.0.1:",
        "http://127.0.0.1:",
        "https://127.0.0.1:",
        "urn:",
    ];
    s.contains(':') && !SAFE.iter().any(|p| s.starts_with(p))
}

fn any_string(value: &Value, check: &dyn Fn(&str) -> bool) -> bool {
    match value {
        Value::String(s) => check(s),
        Value::Sequence(items) => items.iter().any(|v| any_string(v, check)),
        Value::Mapping(map) => map
            .iter()
            .any(|(k, v)| any_string(k, check) || any_string(v, check)),
        Value::Tagged(tagged) => any_string(&tagged.value, check),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Whatever serde_yaml cannot read, Config cannot either; it still goes through Config so
    // the error path is exercised.
    if let Ok(tree) = serde_yaml::from_str::<Value>(text)
        && any_string(&tree, &may_leave_loopback)
    {
        return;
    }
    let env = |name: &str| (name == "SECRET").then(|| "s3cret".to_string());
    if let Err(e) = txgate::config::Config::from_yaml(text, SOURCE, &env) {
        assert_eq!(e.file, SOURCE);
        assert!(e.to_string().starts_with("fuzz.yaml: "), "{e}");
    }
});
