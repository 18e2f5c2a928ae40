//! Property tests of the parsers that read untrusted input: the `Authorization` header, the
//! query string, the request path, `gateway.yaml`, the STS's answers and callers' JWT headers.
//!
//! Each property holds for every input, so a generator explores far more shapes than a table
//! could name. They complement the fuzz targets in `fuzz/` (which need a nightly-style build)
//! and run in `cargo test`: case counts are set so the whole file stays within a few seconds of
//! a debug build. A failure prints the minimal input proptest shrank it to; persistence files
//! are off so a failing run leaves nothing behind in the tree.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::yaml::{Cache, Exchange, GatewayYaml, Route, TokenService};
use http::{HeaderMap, HeaderValue, header};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use serde_json::{Value, json};
use txgate::admission::credential::{bearer, strip_query_token};
use txgate::admission::path::{EscapedSlashes, PathError, PathRules, normalize};
use txgate::config::Config;
use txgate::error::GatewayError;
use txgate::inbound::{InboundError, JwtSettings, JwtValidator};
use txgate::router::Router;

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

// ---------------------------------------------------------------------------------------------
// Authorization: Bearer (RFC 6750 §2.1)

/// RFC 6750 §2.1 b64token, written out: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" /
/// "/" ) *"="`.
fn is_b64token(token: &[u8]) -> bool {
    let body = token
        .iter()
        .rposition(|b| *b != b'=')
        .map_or(&[][..], |last| &token[..=last]);
    !body.is_empty()
        && body
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(b))
}

fn authorization(values: &[Vec<u8>]) -> Option<HeaderMap> {
    let mut headers = HeaderMap::new();
    for value in values {
        headers.append(header::AUTHORIZATION, HeaderValue::from_bytes(value).ok()?);
    }
    Some(headers)
}

/// Tokens that are b64token, with optional padding.
fn b64token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._~+/-]{1,48}={0,3}"
}

/// Bytes a header value can hold (no CTLs other than HTAB, no DEL), weighted towards the
/// characters that sit at the edge of b64token.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => prop::sample::select(b"aZ09-._~+/= \t,;\"%\\:".to_vec()),
        1 => 0x20u8..0x7f,
        1 => 0x80u8..=0xff,
        1 => Just(b'\t'),
    ];
    prop::collection::vec(byte, 0..40)
}

#[test]
fn bearer_never_panics_on_any_header_values() {
    let values = prop::collection::vec(prop::collection::vec(any::<u8>(), 0..48), 0..4);
    runner(512)
        .run(&(values, 0usize..64), |(values, max)| {
            if let Some(headers) = authorization(&values) {
                let _ = bearer(&headers, max);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn bearer_accepts_exactly_rfc6750_b64token_syntax() {
    let scheme = "[bB][eE][aA][rR][eE][rR]";
    let token = prop_oneof![b64token().prop_map(String::into_bytes), header_bytes()];
    let padding = "[ \t]{0,2}";
    runner(1024)
        .run(
            &(scheme, " {1,3}", token, padding, 1usize..64),
            |(scheme, space, token, trailing, max)| {
                let value = [
                    scheme.as_bytes(),
                    space.as_bytes(),
                    &token,
                    trailing.as_bytes(),
                ]
                .concat();
                let Some(headers) = authorization(&[value]) else {
                    return Ok(());
                };
                let trimmed = token.trim_ascii();
                let result = bearer(&headers, max);
                match result {
                    Ok(accepted) => {
                        prop_assert!(is_b64token(trimmed));
                        prop_assert!(trimmed.len() <= max);
                        prop_assert_eq!(accepted.as_bytes(), trimmed);
                    }
                    Err(GatewayError::TokenTooLarge(limit)) => {
                        prop_assert_eq!(limit, max);
                        prop_assert!(trimmed.len() > max);
                    }
                    Err(GatewayError::MalformedCredential(_)) => {
                        prop_assert!(trimmed.len() <= max || trimmed.is_empty());
                        prop_assert!(!is_b64token(trimmed));
                    }
                    Err(other) => prop_assert!(false, "unexpected {other:?}"),
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn any_other_scheme_is_no_bearer_credential() {
    let scheme = "[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,12}"
        .prop_filter("not bearer", |s| !s.eq_ignore_ascii_case("bearer"));
    runner(512)
        .run(&(scheme, header_bytes()), |(scheme, rest)| {
            let value = [scheme.as_bytes(), b" ", &rest].concat();
            if let Some(headers) = authorization(&[value]) {
                prop_assert!(matches!(
                    bearer(&headers, 8192),
                    Err(GatewayError::MissingToken)
                ));
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn two_authorization_headers_are_always_refused() {
    let value = prop_oneof![
        b64token().prop_map(|t| format!("Bearer {t}").into_bytes()),
        header_bytes()
    ];
    runner(256)
        .run(&(value.clone(), value), |(a, b)| {
            if let Some(headers) = authorization(&[a, b]) {
                prop_assert!(matches!(
                    bearer(&headers, 8192),
                    Err(GatewayError::DuplicateCredential)
                ));
            }
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// access_token in the query (RFC 6750 §2.3)

/// Form-decodes one `key[=value]` pair the way an upstream framework would.
fn decoded_key(pair: &str) -> String {
    url::form_urlencoded::parse(pair.as_bytes())
        .next()
        .map(|(k, _)| k.into_owned())
        .unwrap_or_default()
}

/// `access_token` spelled with any mix of literal and percent-encoded (either hex case)
/// characters, so the key decodes to `access_token` without reading like it.
fn disguised_access_token() -> impl Strategy<Value = String> {
    prop::collection::vec((any::<bool>(), any::<bool>()), 12).prop_map(|choices| {
        "access_token"
            .bytes()
            .zip(choices)
            .map(|(b, (encode, lower))| match (encode, lower) {
                (false, _) => (b as char).to_string(),
                (true, false) => format!("%{b:02X}"),
                (true, true) => format!("%{b:02x}"),
            })
            .collect()
    })
}

/// Query strings made of parameters, some of them `access_token` in disguise.
fn query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        3 => "[a-z_%0-9A-F+.]{0,10}",
        2 => disguised_access_token(),
        1 => Just("access_token".to_string()),
    ];
    let value = "[a-zA-Z0-9%=+._~/-]{0,12}";
    let pair = prop_oneof![
        4 => (key, value).prop_map(|(k, v)| format!("{k}={v}")),
        1 => "[a-z_%=]{0,8}",
    ];
    prop::collection::vec(pair, 0..8).prop_map(|pairs| pairs.join("&"))
}

#[test]
fn strip_query_token_never_leaves_an_access_token_parameter() {
    let input = prop_oneof![3 => query(), 1 => any::<String>()];
    runner(1024)
        .run(&input, |query| {
            let (rest, removed) = match strip_query_token(&query) {
                Some(stripped) => (stripped.rest.unwrap_or_default(), stripped.removed),
                // Nothing removed: the query is forwarded as sent, pairs as they are.
                None => (
                    query
                        .split('&')
                        .filter(|p| !p.is_empty())
                        .collect::<Vec<_>>()
                        .join("&"),
                    Vec::new(),
                ),
            };
            for pair in rest.split('&') {
                prop_assert_ne!(decoded_key(pair), "access_token", "left in {:?}", rest);
            }
            // Everything else is kept, byte for byte and in order.
            let expected: Vec<&str> = query
                .split('&')
                .filter(|p| !p.is_empty() && decoded_key(p) != "access_token")
                .collect();
            prop_assert_eq!(rest, expected.join("&"));
            // Each removed parameter's value is reported, decoded, for the leak guard.
            let values: Vec<String> = query
                .split('&')
                .filter(|p| decoded_key(p) == "access_token")
                .map(|p| {
                    url::form_urlencoded::parse(p.as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default()
                })
                .collect();
            prop_assert_eq!(removed, values);
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Request paths (RFC 3986 §2.3, §5.2.4), normalised before routing

/// Pieces hostile paths are made of: slashes, dot segments plain and percent-encoded, encoded
/// slashes and backslashes, a raw backslash, encoded unreserved letters, words and the route
/// prefixes of [`path_router`].
const PATH_PIECES: &[&str] = &[
    "/",
    "/",
    "/",
    ".",
    ".",
    "..",
    "%2e",
    "%2E",
    "%2F",
    "%2f",
    "%5C",
    "%5c",
    "\\",
    "%41",
    "%7E",
    "%6F",
    "a",
    "x",
    "7",
    "orders",
    "admin",
    "public",
    "/public",
    "/orders",
    "/orders/admin",
];

/// Encoded slashes and backslashes, and the raw backslash: refused by default.
const SLASHY_PIECES: &[&str] = &["%2F", "%2f", "%5C", "%5c", "\\"];

/// A path from [`PATH_PIECES`], and whether it holds a [`SLASHY_PIECES`] piece. Mostly
/// origin-form (a leading `/`); now and then not.
fn hostile_path() -> impl Strategy<Value = (String, bool)> {
    (
        prop::collection::vec(prop::sample::select(PATH_PIECES), 0..14),
        prop::bool::weighted(0.9),
    )
        .prop_map(|(pieces, rooted)| {
            let slashy = pieces.iter().any(|p| SLASHY_PIECES.contains(p));
            let path = pieces.concat();
            let path = if rooted { format!("/{path}") } else { path };
            (path, slashy)
        })
}

/// Path rules from generated values (the rules themselves need not be `Debug` or `Clone`).
fn path_rules(normalize_path: bool, merge_slashes: bool, escaped: u8) -> PathRules {
    PathRules {
        normalize_path,
        merge_slashes,
        escaped_slashes: match escaped % 3 {
            0 => EscapedSlashes::RejectRequest,
            1 => EscapedSlashes::KeepUnchanged,
            _ => EscapedSlashes::UnescapeAndForward,
        },
    }
}

/// Routes `/public`, `/orders` and `/orders/admin`, and nothing else.
fn path_router() -> Router {
    let route = |name: &str, prefix: &str| Route::new(name, prefix, "http://127.0.0.1:1");
    let yaml = GatewayYaml::new()
        .route(route("public", "/public"))
        .route(route("orders", "/orders"))
        .route(route("admin", "/orders/admin"))
        .to_yaml();
    let config = Config::from_yaml(&yaml, "test.yaml", &|_| None).expect("the routes load");
    Router::new(&config.routes)
}

/// The route the gateway picks for a request path: the route of its normalised form.
fn route_of(router: &Router, path: &str, rules: &PathRules) -> Option<String> {
    let normalised = normalize(path, rules).ok()?;
    router
        .find(None, &normalised)
        .map(|(_, route)| route.name.clone())
}

#[test]
fn path_normalisation_is_idempotent_under_every_rule_set() {
    let rules = (any::<bool>(), any::<bool>(), 0u8..3);
    runner(2048)
        .run(
            &(hostile_path(), rules),
            |((path, _), (normalize_path, merge_slashes, escaped))| {
                let rules = path_rules(normalize_path, merge_slashes, escaped);
                if let Ok(once) = normalize(&path, &rules) {
                    let twice = normalize(&once, &rules);
                    prop_assert!(
                        matches!(&twice, Ok(t) if *t == once),
                        "{:?} -> {:?} -> {:?}",
                        path,
                        once,
                        twice
                    );
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn a_path_and_its_normalised_form_get_the_same_route() {
    let router = path_router();
    let rules = PathRules::default();
    runner(2048)
        .run(&hostile_path(), |(path, _)| {
            if let Ok(normalised) = normalize(&path, &rules) {
                let direct = router
                    .find(None, &normalised)
                    .map(|(_, route)| route.name.clone());
                prop_assert_eq!(route_of(&router, &path, &rules), direct.clone());
                prop_assert_eq!(route_of(&router, &normalised, &rules), direct);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn a_normalised_path_never_lies_outside_its_route() {
    let router = path_router();
    let rules = PathRules::default();
    runner(2048)
        .run(&hostile_path(), |(path, slashy)| {
            let normalised = match normalize(&path, &rules) {
                Ok(n) => n,
                Err(_) => return Ok(()),
            };
            // Encoded slashes and backslashes are refused by default, never passed on.
            prop_assert!(!slashy, "{:?} accepted as {:?}", path, normalised);
            prop_assert!(
                normalised.starts_with('/'),
                "{:?} -> {:?}",
                path,
                normalised
            );
            prop_assert!(!normalised.contains("//"), "{:?} -> {:?}", path, normalised);
            prop_assert!(
                normalised.split('/').all(|s| s != "." && s != ".."),
                "{:?} -> {:?}",
                path,
                normalised
            );
            // RFC 3986 §2.3: encoded unreserved characters are decoded.
            let lower = normalised.to_ascii_lowercase();
            prop_assert!(
                !["%2e", "%41", "%7e", "%6f"]
                    .iter()
                    .any(|e| lower.contains(e)),
                "{:?} -> {:?}",
                path,
                normalised
            );
            if let Some((_, route)) = router.find(None, &normalised) {
                let prefix = route.path_prefix.as_str();
                let inside = normalised.strip_prefix(prefix).is_some_and(|rest| {
                    rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/')
                });
                prop_assert!(inside, "{:?} -> {:?} on {}", path, normalised, prefix);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn path_normalisation_by_example() {
    let defaults = PathRules::default();
    let normalised = |path: &str, rules: &PathRules| -> Result<String, String> {
        normalize(path, rules)
            .map(|n| n.into_owned())
            .map_err(|e| format!("{e:?}"))
    };
    for (path, expected) in [
        ("/", "/"),
        ("/orders", "/orders"),
        ("/public/../orders/7", "/orders/7"),
        ("/public/%2e%2e/orders/7", "/orders/7"),
        ("/public/.%2E/orders/7", "/orders/7"),
        ("/public/%2E%2e/orders/7", "/orders/7"),
        ("//orders///7", "/orders/7"),
        ("/orders/./7", "/orders/7"),
        ("/orders/%37", "/orders/7"),
        ("/%6Frders/%7Eitem%2Dx%5F%2E%41", "/orders/~item-x_.A"),
        ("/orders/7/8/..", "/orders/7/"),
        ("/orders/7/.", "/orders/7/"),
        // Only unreserved characters are decoded: an encoded `?`, `#` or space stays encoded.
        ("/orders/a%20b", "/orders/a%20b"),
        ("/orders/7%3Fadmin=1", "/orders/7%3Fadmin=1"),
        ("/orders/7%23x", "/orders/7%23x"),
    ] {
        assert_eq!(
            normalised(path, &defaults).as_deref(),
            Ok(expected),
            "{path}"
        );
    }
    for path in [
        "/orders/a%2Fb",
        "/orders/a%2fb",
        "/orders%5C7",
        "/orders%5c7",
    ] {
        assert!(
            matches!(normalize(path, &defaults), Err(PathError::EscapedSlash)),
            "{path}: {:?}",
            normalised(path, &defaults)
        );
    }
    // A raw backslash is refused too (which error is not the point).
    assert!(normalize("/orders\\7", &defaults).is_err());
    for path in ["/..", "/../orders", "/a/../../orders", "/%2e%2e/orders"] {
        assert!(
            matches!(normalize(path, &defaults), Err(PathError::AboveRoot)),
            "{path}: {:?}",
            normalised(path, &defaults)
        );
    }
    for path in ["orders/7", "http://gateway.test/orders/7"] {
        assert!(
            matches!(normalize(path, &defaults), Err(PathError::NotOriginForm)),
            "{path}: {:?}",
            normalised(path, &defaults)
        );
    }
    let keep = PathRules {
        escaped_slashes: EscapedSlashes::KeepUnchanged,
        ..PathRules::default()
    };
    assert_eq!(
        normalised("/orders/a%2Fb", &keep).as_deref(),
        Ok("/orders/a%2Fb")
    );
    assert_eq!(
        normalised("/orders%5C7", &keep).as_deref(),
        Ok("/orders%5C7")
    );
    // Unescaped before the dot segments go, so the route is chosen on what the upstream reads.
    let unescape = PathRules {
        escaped_slashes: EscapedSlashes::UnescapeAndForward,
        ..PathRules::default()
    };
    assert_eq!(
        normalised("/orders/a%2Fb", &unescape).as_deref(),
        Ok("/orders/a/b")
    );
    assert_eq!(
        normalised("/public/..%2Forders/7", &unescape).as_deref(),
        Ok("/orders/7")
    );
    let no_merge = PathRules {
        merge_slashes: false,
        ..PathRules::default()
    };
    assert_eq!(
        normalised("/orders//7", &no_merge).as_deref(),
        Ok("/orders//7")
    );
    let merge_only = PathRules {
        normalize_path: false,
        ..PathRules::default()
    };
    assert_eq!(
        normalised("/orders//7", &merge_only).as_deref(),
        Ok("/orders/7")
    );
    assert_eq!(
        normalised("/orders/./7", &merge_only).as_deref(),
        Ok("/orders/./7")
    );
}

#[test]
fn path_normalisation_never_panics() {
    let rules = (any::<bool>(), any::<bool>(), 0u8..3);
    runner(1024)
        .run(
            &(any::<String>(), rules),
            |(path, (normalize_path, merge_slashes, escaped))| {
                let rules = path_rules(normalize_path, merge_slashes, escaped);
                let _ = normalize(&path, &rules);
                Ok(())
            },
        )
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// gateway.yaml

/// A valid configuration that needs no network and no file: explicit token endpoint, loopback
/// upstreams, one JWT-validated route. Kept as text, flow and block style mixed: the properties
/// below feed it to the parser cut at every length and mutated.
const BASE_CONFIG: &str = r#"
server:
  listen: ["127.0.0.1:0"]
  admin_listen: "127.0.0.1:0"
  max_token_bytes: 4096
token_services:
  corp:
    token_endpoint: "http://127.0.0.1:9/token"
    client_id: "gateway"
    client_secret: "${SECRET}"
    timeout: 2s
    inbound:
      jwt: { issuer: "https://idp.example", jwks_uri: "http://127.0.0.1:9/jwks", audiences: ["api"] }
routes:
  - name: orders
    match: { path_prefix: "/orders", host: "*.example.com" }
    upstream: "http://127.0.0.1:9"
    headers: { remove: ["x-debug"], set: { x-env: "test" } }
    exchange:
      mode: impersonation
      token_service: corp
      audience: ["https://orders.example.com"]
      scope: "orders:read"
  - name: public
    match: { path_prefix: "/" }
    upstream: { peers: ["http://127.0.0.1:9", "http://127.0.0.1:10"] }
    exchange: { mode: none }
cache:
  max_entries: 1000
  expiry_skew: 5s
"#;

fn env(name: &str) -> Option<String> {
    (name == "SECRET").then(|| "s3cret".to_string())
}

/// The file name must open every error, as `txgate check` prints it.
fn names_the_file(result: Result<Config, txgate::config::ConfigError>, source: &str) -> bool {
    match result {
        Ok(_) => true,
        Err(e) => e.file == source && e.to_string().starts_with(&format!("{source}: ")),
    }
}

/// A scalar or small node without `:` or `/`, so no mutation can form a URL: nothing a
/// mutated config names is ever resolved or fetched.
fn yaml_leaf() -> impl Strategy<Value = serde_yaml::Value> {
    use serde_yaml::Value as Y;
    prop_oneof![
        Just(Y::Null),
        any::<bool>().prop_map(Y::Bool),
        any::<i64>().prop_map(|n| Y::Number(n.into())),
        any::<f64>().prop_map(|n| Y::Number(n.into())),
        "[a-z0-9_ .${}-]{0,12}".prop_map(Y::String),
        Just(Y::Sequence(vec![])),
        Just(Y::Mapping(Default::default())),
        "[a-z_]{1,8}".prop_map(|k| {
            let mut m = serde_yaml::Mapping::new();
            m.insert(Y::String(k), Y::Null);
            Y::Mapping(m)
        }),
    ]
}

/// Replaces, deletes or adds the node at position `pick` (in a depth-first walk) of `tree`.
fn mutate(tree: &mut serde_yaml::Value, pick: &mut usize, leaf: &serde_yaml::Value, op: u8) {
    use serde_yaml::Value as Y;
    match tree {
        Y::Mapping(map) => {
            let keys: Vec<Y> = map.keys().cloned().collect();
            for key in keys {
                if *pick == 0 {
                    match op % 3 {
                        0 => {
                            map.insert(key, leaf.clone());
                        }
                        1 => {
                            map.remove(&key);
                        }
                        _ => {
                            map.insert(Y::String("unexpected_key".into()), leaf.clone());
                        }
                    }
                    *pick = usize::MAX;
                    return;
                }
                *pick -= 1;
                if let Some(child) = map.get_mut(&key) {
                    mutate(child, pick, leaf, op);
                }
                if *pick == usize::MAX {
                    return;
                }
            }
        }
        Y::Sequence(items) => {
            for i in 0..items.len() {
                if *pick == 0 {
                    match op % 3 {
                        0 => items[i] = leaf.clone(),
                        1 => {
                            items.remove(i);
                        }
                        _ => items.push(leaf.clone()),
                    }
                    *pick = usize::MAX;
                    return;
                }
                *pick -= 1;
                mutate(&mut items[i], pick, leaf, op);
                if *pick == usize::MAX {
                    return;
                }
            }
        }
        _ => {}
    }
}

#[test]
fn config_base_is_valid() {
    Config::from_yaml(BASE_CONFIG, "base.yaml", &env).expect("the base config loads");
}

#[test]
fn config_errors_always_name_the_file() {
    let source = "[a-z]{1,8}\\.ya?ml";
    let text = prop_oneof![
        any::<String>(),
        "[a-z_:{}\\[\\], \n\"'&*!|>%@-]{0,80}",
        Just(BASE_CONFIG.to_string())
            .prop_flat_map(|base| (Just(base.clone()), 0..base.len()))
            .prop_map(|(base, cut)| base
                .char_indices()
                .take_while(|(i, _)| *i < cut)
                .map(|(_, c)| c)
                .collect()),
    ];
    runner(384)
        .run(&(text, source), |(text, source)| {
            prop_assert!(names_the_file(
                Config::from_yaml(&text, &source, &env),
                &source
            ));
            Ok(())
        })
        .unwrap();
}

#[test]
fn mutated_configs_load_or_fail_with_a_located_error() {
    let base: serde_yaml::Value = serde_yaml::from_str(BASE_CONFIG).unwrap();
    let mutations = prop::collection::vec((0usize..80, yaml_leaf(), any::<u8>()), 1..4);
    runner(384)
        .run(&mutations, |mutations| {
            let mut tree = base.clone();
            for (pick, leaf, op) in &mutations {
                let mut pick = *pick;
                mutate(&mut tree, &mut pick, leaf, *op);
            }
            let text = serde_yaml::to_string(&tree).unwrap();
            let result = Config::from_yaml(&text, "mutated.yaml", &env);
            if let Err(e) = &result {
                prop_assert!(!e.message.is_empty());
            }
            prop_assert!(names_the_file(result, "mutated.yaml"), "{}", text);
            Ok(())
        })
        .unwrap();
}

#[test]
fn an_unset_variable_is_an_error_at_its_key() {
    runner(64)
        .run(&"[A-Z][A-Z0-9_]{0,15}", |name| {
            let mut tree: serde_yaml::Value = serde_yaml::from_str(BASE_CONFIG).unwrap();
            tree["token_services"]["corp"]["client_id"] = format!("${{{name}}}").into();
            let text = serde_yaml::to_string(&tree).unwrap();
            let e = Config::from_yaml(&text, "vars.yaml", &env).unwrap_err();
            prop_assert_eq!(&e.file, "vars.yaml");
            prop_assert!(e.to_string().contains(&name), "{}", e);
            Ok(())
        })
        .unwrap();
}

/// Aliases that expand exponentially ("billion laughs") and deep nesting: bounded by the YAML
/// parser's limits, answered with an error, quickly, without exhausting the stack.
#[test]
fn hostile_yaml_shapes_fail_fast() {
    let mut laughs = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for (i, prev) in ('b'..='i').zip('a'..='h') {
        laughs.push_str(&format!(
            "{i}: &{i} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        ));
    }
    let nested = format!("{}{}", "[".repeat(2_000), "]".repeat(2_000));
    let nested_maps = "a: {".repeat(2_000);
    for (name, text) in [
        ("laughs", laughs),
        ("nested", nested),
        ("nested_maps", nested_maps),
    ] {
        let started = Instant::now();
        let result = Config::from_yaml(&text, "hostile.yaml", &env);
        assert!(result.is_err(), "{name} loaded");
        assert!(names_the_file(result, "hostile.yaml"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name} took {:?}",
            started.elapsed()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// STS answers (RFC 8693 §2.2, RFC 6749 §5.2), through a real gateway

/// A token response the gateway must accept.
fn valid_token_response() -> impl Strategy<Value = (String, String)> {
    let token_type = prop_oneof![
        Just(None),
        Just(Some(json!("Bearer"))),
        Just(Some(json!("bearer"))),
        Just(Some(json!("N_A")))
    ];
    let expires_in = prop_oneof![
        Just(None),
        (0u64..100_000).prop_map(|n| Some(json!(n))),
        (0u64..100_000).prop_map(|n| Some(json!(n.to_string()))),
        Just(Some(Value::Null)),
    ];
    (
        "[A-Za-z0-9._~+/-]{1,64}={0,2}",
        token_type,
        expires_in,
        any::<bool>(),
    )
        .prop_map(|(token, token_type, expires_in, issued)| {
            let mut body = json!({ "access_token": token });
            if let Some(t) = token_type {
                body["token_type"] = t;
            }
            if let Some(e) = expires_in {
                body["expires_in"] = e;
            }
            if issued {
                body["issued_token_type"] = json!("urn:ietf:params:oauth:token-type:jwt");
            }
            (body.to_string(), token)
        })
}

/// Any JSON-ish body: odd types, odd tokens, error objects with known and unknown codes.
fn odd_body() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        ".{0,20}".prop_map(Value::String),
    ];
    let code = prop_oneof![
        prop::sample::select(vec![
            "invalid_grant",
            "invalid_request",
            "invalid_target",
            "invalid_scope",
            "unauthorized_client",
            "access_denied",
            "invalid_client",
            "unsupported_grant_type",
            "temporarily_unavailable",
            "server_error",
        ])
        .prop_map(|c| json!(c)),
        scalar.clone(),
    ];
    let field = prop::sample::select(vec![
        "access_token",
        "token_type",
        "expires_in",
        "issued_token_type",
        "error",
        "refresh_token",
    ]);
    prop_oneof![
        prop::collection::vec((field, scalar.clone()), 0..5).prop_map(|fields| {
            let map: serde_json::Map<String, Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            Value::Object(map).to_string()
        }),
        code.prop_map(|c| json!({"error": c, "error_description": "x"}).to_string()),
        ".{0,40}",
        scalar.prop_map(|s| s.to_string()),
    ]
}

/// One gateway in front of a scriptable STS, shared by all cases of the STS properties.
struct StsBench {
    rt: tokio::runtime::Runtime,
    sts: common::TestSts,
    upstream: common::RecordingUpstream,
    gw: txgate::server::RunningGateway,
    client: reqwest::Client,
}

impl StsBench {
    fn start() -> StsBench {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (sts, upstream, gw) = rt.block_on(async {
            let sts = common::TestSts::start(common::Behavior::issue()).await;
            let upstream = common::RecordingUpstream::start().await;
            let yaml = GatewayYaml::new()
                .token_service(
                    TokenService::at(&sts)
                        .timeout(Duration::from_secs(5))
                        // A breaker that never opens: every case must reach the STS, or the
                        // properties below would hold vacuously while it is open.
                        .set("circuit_breaker", json!({ "failure_threshold": 1_000_000 })),
                )
                .route(
                    Route::new("r", "/", upstream.url()).exchange(Exchange::impersonation("corp")),
                )
                .cache(Cache::new().expiry_skew(Duration::ZERO))
                .to_yaml();
            let gw = common::gateway(&yaml).await;
            (sts, upstream, gw)
        });
        StsBench {
            rt,
            sts,
            upstream,
            gw,
            client: common::client(),
        }
    }

    /// Scripts the STS's next answer, sends one request with a fresh caller token, and returns
    /// the gateway's status, its `Retry-After`, whether the STS was called, and what the
    /// upstream got (if the request was forwarded).
    fn answer(
        &self,
        status: u16,
        body: &str,
    ) -> (u16, Option<String>, bool, Option<Option<String>>) {
        self.sts.set(common::Behavior::Reply {
            status,
            body: body.to_string(),
            headers: vec![("content-type".into(), "application/json".into())],
        });
        self.rt.block_on(async {
            let calls = self.sts.calls();
            let seen = self.upstream.seen().len();
            let response = self
                .client
                .get(self.gw.url())
                .bearer_auth(common::caller_token())
                .send()
                .await
                .expect("the gateway answers");
            let got = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let forwarded = self
                .upstream
                .seen()
                .get(seen)
                .map(|s| s.bearer().map(str::to_string));
            (got, retry_after, self.sts.calls() > calls, forwarded)
        })
    }
}

#[test]
fn sts_answers_map_to_documented_statuses_and_only_200_forwards() {
    let bench = StsBench::start();
    let status = prop_oneof![
        3 => Just(200u16),
        1 => prop::sample::select(vec![400u16, 401, 403, 429, 500, 502, 503]),
        1 => 200u16..600,
    ];
    let body = prop_oneof![
        valid_token_response().prop_map(|(body, _)| body),
        odd_body()
    ];
    runner(96)
        .run(&(status, body), |(status, body)| {
            let (got, retry_after, called, forwarded) = bench.answer(status, &body);
            if !called {
                // Declined without asking the STS (a full queue): 503 only.
                prop_assert_eq!(got, 503);
                prop_assert!(forwarded.is_none());
                return Ok(());
            }
            if status == 200 {
                match &forwarded {
                    // Exactly the token the STS issued, which is bearer-safe.
                    Some(token) => {
                        let token = token.clone().unwrap_or_default();
                        let issued = serde_json::from_str::<Value>(&body)
                            .ok()
                            .and_then(|b| b.get("access_token").cloned());
                        prop_assert_eq!(Some(json!(token)), issued);
                        prop_assert!(is_b64token(token.as_bytes()));
                        prop_assert_eq!(got, 200);
                    }
                    None => prop_assert_eq!(got, 502, "body {}", body),
                }
            } else {
                // RFC 8693 §2.2.2: an error answer never yields a token to forward.
                prop_assert!(forwarded.is_none(), "forwarded after HTTP {}", status);
                prop_assert!([401, 403, 502, 503].contains(&got), "{} -> {}", status, got);
            }
            if got == 503 {
                prop_assert!(retry_after.is_some());
            }
            Ok(())
        })
        .unwrap();

    // Every well-formed success is forwarded with exactly its token.
    runner(48)
        .run(&valid_token_response(), |(body, token)| {
            let (got, _, called, forwarded) = bench.answer(200, &body);
            prop_assert!(called);
            prop_assert_eq!(got, 200, "body {}", body);
            prop_assert_eq!(forwarded, Some(Some(token)));
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Callers' JWTs (RFC 7515 §4, RFC 8725)

/// A validator loaded with a [`common::TestIssuer`]'s JWKS, on its own runtime.
struct JwtBench {
    rt: tokio::runtime::Runtime,
    issuer: common::TestIssuer,
    validator: Arc<JwtValidator>,
}

impl JwtBench {
    fn start() -> JwtBench {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (issuer, validator) = rt.block_on(async {
            let issuer = common::TestIssuer::start().await;
            let mut settings = JwtSettings::new(
                issuer.issuer.clone(),
                url::Url::parse(&issuer.jwks_uri).unwrap(),
            );
            settings.audiences = vec!["api".into()];
            // One refetch for the first unknown kid, then none: the cases stay local.
            settings.min_refetch_interval = Duration::from_secs(3600);
            let http = txgate::exchange::http_client(Duration::from_secs(2)).unwrap();
            let validator = Arc::new(JwtValidator::new(settings, http));
            validator.refresh().await.expect("the JWKS loads");
            (issuer, validator)
        });
        JwtBench {
            rt,
            issuer,
            validator,
        }
    }

    fn validate(&self, token: &str) -> Result<(), InboundError> {
        self.rt.block_on(self.validator.validate(token)).map(|_| ())
    }
}

/// JOSE headers an attacker would try: every alg spelling that must fail, odd kids, header
/// parameters that name foreign keys.
fn jose_header(kid: String) -> impl Strategy<Value = Value> {
    let alg = prop_oneof![
        prop::sample::select(vec![
            "none", "None", "NONE", "nOnE", "HS256", "HS384", "HS512", "hs256", "RS256", "RS384",
            "PS256", "ES256", "ES384", "ES512", "EdDSA", "", "ES256 ",
        ])
        .prop_map(|a| json!(a)),
        any::<i64>().prop_map(|n| json!(n)),
        Just(Value::Null),
    ];
    let kid = prop_oneof![
        Just(Some(json!(kid))),
        Just(None),
        ".{0,12}".prop_map(|k| Some(json!(k))),
        any::<i64>().prop_map(|n| Some(json!(n))),
    ];
    let extra = prop::sample::subsequence(
        vec![
            ("crit", json!(["exp"])),
            ("jku", json!("http://127.0.0.1:9/jwks")),
            ("x5u", json!("http://127.0.0.1:9/cert")),
            ("jwk", json!({"kty": "oct", "k": "AAAA"})),
            ("typ", json!("JWT")),
            ("cty", json!("JWT")),
            ("b64", json!(false)),
            ("zip", json!("DEF")),
        ],
        0..4,
    );
    (alg, kid, extra).prop_map(|(alg, kid, extra)| {
        let mut header = json!({ "alg": alg });
        if let Some(kid) = kid {
            header["kid"] = kid;
        }
        for (k, v) in extra {
            header[k] = v;
        }
        header
    })
}

#[test]
fn forged_jwts_never_validate() {
    let bench = JwtBench::start();
    let kid = jsonwebtoken::decode_header(bench.issuer.sign(json!({"aud": "api"})))
        .unwrap()
        .kid
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"iss": bench.issuer.issuer, "aud": "api", "sub": "x", "exp": now + 600});
    let segment = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..80).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
        "[A-Za-z0-9_=+/-]{0,40}",
    ];
    let forged = (jose_header(kid), segment.clone(), segment).prop_map(move |(h, p, s)| {
        let payload = if p.len() % 3 == 0 {
            URL_SAFE_NO_PAD.encode(claims.to_string())
        } else {
            p
        };
        format!("{}.{payload}.{s}", URL_SAFE_NO_PAD.encode(h.to_string()))
    });
    let anything = prop_oneof![
        2 => forged,
        1 => any::<String>(),
        1 => "[A-Za-z0-9_.-]{0,120}",
    ];
    runner(512)
        .run(&anything, |token| {
            match bench.validate(&token) {
                Ok(()) => prop_assert!(false, "validated {token}"),
                // The JWKS is loaded and refetches are throttled: every refusal is final.
                Err(InboundError::Invalid(_)) => {}
                Err(e) => prop_assert!(false, "{e:?} for {token}"),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn no_single_character_change_of_a_valid_jwt_validates() {
    let bench = JwtBench::start();
    let token = bench
        .issuer
        .sign(json!({"aud": "api", "sub": "alice", "scope": "a b"}));
    assert!(
        bench.validate(&token).is_ok(),
        "the unchanged token is valid"
    );
    let alphabet: Vec<char> = ('A'..='Z')
        .chain('a'..='z')
        .chain('0'..='9')
        .chain(['-', '_', '.', '='])
        .collect();
    runner(512)
        .run(
            &(0..token.len(), prop::sample::select(alphabet)),
            |(at, with)| {
                let mut changed: Vec<char> = token.chars().collect();
                if changed[at] == with {
                    return Ok(());
                }
                changed[at] = with;
                let changed: String = changed.into_iter().collect();
                prop_assert!(bench.validate(&changed).is_err(), "{}", changed);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn jose_header_decoding_never_panics() {
    runner(512)
        .run(&any::<String>(), |token| {
            let _ = jsonwebtoken::decode_header(&token);
            let _ = txgate::jwt::unverified_claims(&token);
            let _ = txgate::jwt::unverified_exp(&token);
            Ok(())
        })
        .unwrap();
}
