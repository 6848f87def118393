//! Primary-credential parsing: no input panics, none that the test key did
//! not sign is accepted.
#![no_main]

use std::sync::OnceLock;

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use stepgate::config::Config;
use stepgate::identity::Authenticator;

const YAML: &str = r#"
listen: { address: 127.0.0.1:0 }
admin: { address: 127.0.0.1:0 }
upstream: { url: http://127.0.0.1:9 }
identity:
  jwt: { algorithms: [HS256], secret: fuzz-secret-that-is-at-least-32-bytes-long, cookie: access_token }
stepup:
  console: true
  token: { signing_key: fuzz-stepup-key-that-is-at-least-32-bytes }
routes:
  - { name: admin, path: /admin/**, stepup: { max_age: 5m } }
default: identity
dev: true
"#;

fn auth() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let cfg = Config::from_yaml(std::path::Path::new("/tmp/fuzz.yaml"), YAML, &Default::default())
            .unwrap_or_else(|e| panic!("fuzz config: {e}"));
        Authenticator::new(&cfg.identity)
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
    let got = auth().authenticate(&headers, "127.0.0.1".parse().expect("ip"));
    assert!(!matches!(got, Ok(Some(_))), "forged credential accepted");
});
