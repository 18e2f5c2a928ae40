//! JOSE header parsing and JWT validation (RFC 7515, RFC 8725) against a local JWKS.
//!
//! A validator is loaded once with the public key of a key pair made at start and served from
//! 127.0.0.1; every input is validated with it. Nothing the fuzzer writes can carry a valid
//! signature, so every input must be refused as invalid: never accepted, never a panic, and
//! never "unavailable" (the keys are loaded and unknown-kid refetches are throttled).

#![no_main]

use std::io::{Read, Write};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use txgate::inbound::{InboundError, JwtSettings, JwtValidator};

struct Bench {
    rt: tokio::runtime::Runtime,
    validator: Arc<JwtValidator>,
}

/// Serves `jwks` to any request on 127.0.0.1, from a thread, for the life of the process.
fn serve_jwks(jwks: String) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks}",
                jwks.len()
            );
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    format!("http://{addr}/jwks")
}

fn bench() -> &'static Bench {
    static BENCH: OnceLock<Bench> = OnceLock::new();
    BENCH.get_or_init(|| {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let point = pair.public_key().as_ref();
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "fuzz-key",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]})
        .to_string();
        let uri = serve_jwks(jwks);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut settings = JwtSettings::new("https://issuer.fuzz", url::Url::parse(&uri).unwrap());
        settings.audiences = vec!["api".into()];
        settings.min_refetch_interval = Duration::from_secs(24 * 3600);
        let http = txgate::exchange::http_client(Duration::from_secs(2)).unwrap();
        let validator = Arc::new(JwtValidator::new(settings, http));
        rt.block_on(validator.refresh())
            .expect("the local JWKS loads");
        Bench { rt, validator }
    })
}

fuzz_target!(|data: &[u8]| {
    let bench = bench();
    // Raw text as a token, and the same bytes as a JOSE header in front of claims the
    // validator would otherwise accept, so the header parser sees every shape.
    let raw = String::from_utf8_lossy(data).into_owned();
    let claims = URL_SAFE_NO_PAD
        .encode(br#"{"iss":"https://issuer.fuzz","aud":"api","sub":"x","exp":4102444800}"#);
    let framed = format!(
        "{}.{claims}.{}",
        URL_SAFE_NO_PAD.encode(data),
        URL_SAFE_NO_PAD.encode([0u8; 64])
    );
    for token in [raw.as_str(), framed.as_str()] {
        let _ = jsonwebtoken_free_checks(token);
        match bench.rt.block_on(bench.validator.validate(token)) {
            Ok(_) => panic!("validated a token nobody signed: {token:?}"),
            Err(InboundError::Invalid(_)) => {}
            Err(e) => panic!("{e:?} for {token:?}"),
        }
    }
});

/// The unverified helpers the proxy uses for delegation; they must not panic either.
fn jsonwebtoken_free_checks(token: &str) -> Option<u64> {
    let _ = txgate::jwt::unverified_claims(token);
    txgate::jwt::unverified_exp(token)
}
