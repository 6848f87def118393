//! The challenge API and page over real TCP: any method, path, content type
//! and body gets an answer below 500 and never reaches the upstream.
#![no_main]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use stepgate::config::Config;

/// The shared fuzz policy (upstream where nothing listens).
const POLICY: &str = include_str!("../policy.yaml");

const PATHS: &[&str] = &[
    "/.stepgate/api/otp",
    "/.stepgate/api/otp/verify",
    "/.stepgate/api/logout",
    "/.stepgate/api/methods",
    "/.stepgate/challenge?rd=/admin/x",
];
const TYPES: &[&str] = &[
    "application/json",
    "application/x-www-form-urlencoded",
    "text/plain",
    "multipart/form-data; boundary=x",
];

fn gateway() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async move {
                let cfg = Config::from_yaml(std::path::Path::new("fuzz/policy.yaml"), POLICY, &Default::default())
                    .unwrap_or_else(|e| panic!("fuzz config: {e}"));
                let running = stepgate::start(cfg).await.expect("gateway starts");
                tx.send(running.addr).expect("send addr");
                std::future::pending::<()>().await;
            });
        });
        rx.recv().expect("gateway address")
    })
}

/// A valid primary token for the fuzz config, so the API gets past identity.
fn bearer() -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let claims = serde_json::json!({
            "sub": "fuzz", "email": "fuzz@example.com", "iat": now, "exp": now + 86_400,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"fuzz-secret-that-is-at-least-32-bytes-long"),
        )
        .expect("sign")
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let path = PATHS[data[0] as usize % PATHS.len()];
    let ctype = TYPES[data[1] as usize % TYPES.len()];
    let method = if data[2] & 1 == 0 { "POST" } else { "GET" };
    let auth = if data[2] & 2 == 0 {
        format!("Authorization: Bearer {}\r\n", bearer())
    } else {
        String::new()
    };
    let body = &data[3..];
    let mut s = TcpStream::connect(gateway()).expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: app.test\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body).expect("write");
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no answer: {text:?}"));
    assert!(status < 500, "{method} {path} {ctype} -> {status}");
});
