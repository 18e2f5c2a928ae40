//! Micro-benchmarks of the gateway's per-request work outside the engine: the cache key, the
//! route lookup and the credential handling. `cargo bench --bench hot_path`.
//!
//! Each runs on inputs shaped like real traffic (a JWT-sized bearer token, a route table of
//! realistic size), so a number here can be set against the per-request CPU the end-to-end
//! benchmark (`bench/run.sh`) measures. Measurement time is kept short by default so the whole
//! file runs in well under a minute; pass `--measurement-time` for steadier numbers.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, header};
use txgate::admission::credential;
use txgate::cache::TokenCache;
use txgate::config::{Config, Exchange, ExchangeSettings};
use txgate::router::Router;

/// A bearer token the size of a signed JWT with a handful of claims (~600 bytes), in the
/// b64token alphabet that `credential::bearer` checks byte by byte.
fn jwt_sized_token() -> String {
    let part = |n: usize, seed: u8| -> String {
        (0..n)
            .map(|i| {
                let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                alphabet[(i * 7 + seed as usize) % alphabet.len()] as char
            })
            .collect()
    };
    format!("{}.{}.{}", part(100, 1), part(400, 2), part(86, 3))
}

/// `count` routes: a mix of plain prefixes, nested prefixes, exact hosts and wildcards, the
/// way a gateway in front of a few dozen services is configured.
fn config_yaml(count: usize) -> String {
    let mut yaml = String::from(
        "server: { listen: [\"127.0.0.1:0\"] }\n\
         token_services:\n  sts:\n    token_endpoint: \"http://127.0.0.1:9/token\"\n    \
         client_id: gateway\n    client_secret: \"${SECRET}\"\n\
         routes:\n",
    );
    for i in 0..count {
        let host = match i % 4 {
            0 => String::new(),
            1 => format!(", host: \"svc{i}.example.com\""),
            2 => ", host: \"*.internal.example.com\"".to_string(),
            _ => String::new(),
        };
        let prefix = if i % 3 == 0 {
            format!("/api/v1/service{i}/items")
        } else {
            format!("/service{i}")
        };
        yaml.push_str(&format!(
            "  - name: r{i}\n    match: {{ path_prefix: \"{prefix}\"{host} }}\n    \
             upstream: \"http://127.0.0.1:9\"\n    exchange:\n      mode: impersonation\n      \
             token_service: sts\n      audience: [\"https://service{i}.example.com\"]\n      \
             scope: \"service{i}:read\"\n"
        ));
    }
    yaml
}

fn load(count: usize) -> Config {
    let env = |name: &str| (name == "SECRET").then(|| "bench-secret".to_string());
    match Config::from_yaml(&config_yaml(count), "bench.yaml", &env) {
        Ok(config) => config,
        Err(error) => panic!("bench config: {error}"),
    }
}

fn profile(config: &Config) -> Arc<ExchangeSettings> {
    match &config.routes[0].exchange {
        Exchange::Token(profile) => profile.clone(),
        _ => panic!("the bench routes exchange tokens at one token service"),
    }
}

fn cache_key(c: &mut Criterion) {
    let config = load(1);
    let profile = profile(&config);
    let token = jwt_sized_token();
    c.bench_function("cache_key/impersonation_600B_token", |b| {
        // The token's digest is taken once per request and shared with validation and the log.
        b.iter(|| {
            let digest = txgate::token::digest(black_box(&token));
            TokenCache::key(black_box(&profile), &digest, None)
        })
    });
    let actor = &txgate::token::digest("https://sts.example.com\0gateway");
    c.bench_function("cache_key/delegation_600B_token", |b| {
        b.iter(|| {
            let digest = txgate::token::digest(black_box(&token));
            TokenCache::key(black_box(&profile), &digest, Some(actor))
        })
    });
}

fn router_find(c: &mut Criterion) {
    for count in [3, 50] {
        let config = load(count);
        let router = Router::new(&config.routes);
        // The last route in match order (a short prefix) is the slowest to reach.
        let last = format!("/service{}/orders/42", count - 1);
        c.bench_function(&format!("router_find/{count}_routes/first"), |b| {
            b.iter(|| {
                router.find(
                    black_box(Some("gateway.example.com:8080")),
                    black_box("/api/v1/service0/items/42"),
                )
            })
        });
        c.bench_function(&format!("router_find/{count}_routes/last"), |b| {
            b.iter(|| router.find(black_box(Some("gateway.example.com")), black_box(&last)))
        });
        c.bench_function(&format!("router_find/{count}_routes/none"), |b| {
            b.iter(|| {
                router.find(
                    black_box(Some("gateway.example.com")),
                    black_box("/nowhere"),
                )
            })
        });
    }
}

fn credential_parsing(c: &mut Criterion) {
    let token = jwt_sized_token();
    let mut headers = HeaderMap::new();
    // What a browser or SDK typically sends alongside the token.
    headers.insert(
        header::HOST,
        HeaderValue::from_static("gateway.example.com"),
    );
    headers.insert(header::USER_AGENT, HeaderValue::from_static("bench/1.0"));
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("a header-safe token"),
    );
    c.bench_function("credential/bearer_600B_token", |b| {
        b.iter(|| credential::bearer(black_box(&headers), black_box(8192)).is_ok())
    });
    c.bench_function("credential/strip_query_token/no_token", |b| {
        b.iter(|| credential::strip_query_token(black_box("page=2&sort=asc&filter=open")))
    });
    let with_token = format!("page=2&access_token={token}&sort=asc");
    c.bench_function("credential/strip_query_token/with_token", |b| {
        b.iter(|| credential::strip_query_token(black_box(&with_token)))
    });
}

fn short() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30)
}

criterion_group! {
    name = hot_path;
    config = short();
    targets = cache_key, router_find, credential_parsing
}
criterion_main!(hot_path);
