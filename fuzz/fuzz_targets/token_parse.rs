//! Primary-credential parsing: no input panics, none that the test key did
//! not sign is accepted.
#![no_main]

use std::sync::OnceLock;

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use stepgate::config::Config;
use stepgate::identity::Authenticator;
use stepgate::telemetry::Metrics;

/// The shared fuzz policy (HS256 primary tokens, cookie `access_token`).
const POLICY: &str = include_str!("../policy.yaml");

fn auth() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let cfg = Config::from_yaml(std::path::Path::new("fuzz/policy.yaml"), POLICY, &Default::default())
            .unwrap_or_else(|e| panic!("fuzz config: {e}"));
        let metrics = std::sync::Arc::new(Metrics::new());
        Authenticator::new(&cfg.identity, &cfg.built.jwt_keys, &metrics, None).unwrap_or_else(|e| panic!("authenticator: {e}"))
    })
}

/// Verification is async (keys may come from a URL); a static secret never
/// waits, so a current-thread runtime per thread is enough.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    let (a, b) = data.split_at(data.len() / 2);
    if let Ok(v) = HeaderValue::from_bytes(a) {
        headers.append(http::header::AUTHORIZATION, v);
    }
    if let Ok(v) = HeaderValue::from_bytes(b) {
        headers.append(http::header::COOKIE, v);
    }
    let peer = "127.0.0.1".parse().expect("ip");
    let got = runtime().block_on(auth().authenticate(&headers, None, peer));
    assert!(!matches!(got, Ok(Some(_))), "forged credential accepted");
});
