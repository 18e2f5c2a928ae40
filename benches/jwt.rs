//! Micro-benchmarks of inbound JWT validation (`JwtValidator::validate`), the per-request cost
//! `txgate-hit-validated` adds over `txgate-hit`. `cargo bench --bench jwt`.
//!
//! - `cached`: the same token again, answered from the validation cache (the steady state of a
//!   caller that sends many requests).
//! - `uncached`: the full check every time: header parse, key selection, ES256 signature and
//!   claims. The validator's cache is disabled (`max_cached: 0`), so the same token is verified
//!   from scratch on every iteration.
//!
//! The keys come from the development STS, served on 127.0.0.1 port 0 for the length of the
//! run; the tokens are its ES256 user tokens, as in the end-to-end benchmark.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use txgate::dev::sts::{DevClient, DevSts, DevStsOptions};
use txgate::inbound::{JwtSettings, JwtValidator};
use txgate::secret::Secret;

struct Fixture {
    /// Keeps the STS (and so the JWKS endpoint) running while the validators are used.
    runtime: tokio::runtime::Runtime,
    token: String,
    cached: JwtValidator,
    uncached: JwtValidator,
}

fn fixture() -> Fixture {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let (token, cached, uncached) = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let issuer = format!("http://{}", listener.local_addr().expect("local addr"));
        let client = DevClient {
            client_id: "gateway".into(),
            client_secret: Secret::new("bench-secret"),
        };
        let sts = DevSts::new(DevStsOptions::new(issuer.clone(), vec![client])).expect("dev STS");
        let token = sts
            .issue_user_token("alice", None, None)
            .expect("a user token");
        // Serves until the runtime is dropped at the end of the process.
        tokio::spawn(Arc::clone(&sts).serve(listener, std::future::pending()));
        let jwks = url::Url::parse(&format!("{issuer}/jwks")).expect("JWKS URL");
        let validator = |max_cached: u64| {
            let mut settings = JwtSettings::new(issuer.clone(), jwks.clone());
            settings.max_cached = max_cached;
            let http = txgate::exchange::http_client(Duration::from_secs(2)).expect("HTTP client");
            JwtValidator::new(settings, http)
        };
        let cached = validator(1000);
        let uncached = validator(0);
        for v in [&cached, &uncached] {
            v.refresh().await.expect("JWKS fetch");
            v.validate(&token).await.expect("the user token validates");
        }
        (token, cached, uncached)
    });
    Fixture {
        runtime,
        token,
        cached,
        uncached,
    }
}

fn validate(c: &mut Criterion) {
    let f = fixture();
    c.bench_function("jwt_validate/cached", |b| {
        b.to_async(&f.runtime)
            .iter(|| async { f.cached.validate(black_box(&f.token)).await.is_ok() })
    });
    c.bench_function("jwt_validate/uncached_es256", |b| {
        b.to_async(&f.runtime)
            .iter(|| async { f.uncached.validate(black_box(&f.token)).await.is_ok() })
    });
}

fn short() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30)
}

criterion_group! {
    name = jwt;
    config = short();
    targets = validate
}
criterion_main!(jwt);
