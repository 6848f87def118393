//! Micro-benchmarks of the request path's own work, without sockets:
//! normalise + match on a 200-rule policy, primary token verification
//! (HS256 and RS256, verified-token cache hit and miss), and the
//! second-factor check of a step-up rule on the memory store.
//!
//! `cargo bench --bench hot_path` (criterion; `bench/run.sh` reads the
//! 200-rule match median from here). Under `cargo test` / nextest each
//! benchmark runs once as a smoke test. RS256 keys are made with the
//! `openssl` command.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use stepgate::channel::Channel;
use stepgate::config::Config;
use stepgate::identity::Authenticator;
use stepgate::policy::{normalize_path, Action};
use stepgate::stepup::{Stepup, StepupCheck};
use stepgate::telemetry::{Metrics, Mode};
use stepgate::token::Tokens;

const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const SF_KEY: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
const PEER: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// 200 rules of the four kinds a real policy has (subtree globs with
/// step-up, single-segment globs with methods, regexes, public paths),
/// then the rule the step-up benchmark uses.
fn rules_yaml() -> String {
    let mut y = String::new();
    for i in 0..200 {
        y.push_str(&match i % 4 {
            0 => format!("  - {{ name: r{i}, path: /app{i}/**, stepup: {{ max_age: 5m }} }}\n"),
            1 => format!("  - {{ name: r{i}, path: /svc{i}/items/*, methods: [GET, POST] }}\n"),
            2 => format!(
                "  - {{ name: r{i}, path_regex: '/api/v[0-9]+/thing{i}(/.*)?', stepup: {{ max_age: 1m, one_time: true }} }}\n"
            ),
            _ => format!("  - {{ name: r{i}, path: /static{i}/**, public: true }}\n"),
        });
    }
    y.push_str("  - { name: admin, path: /admin/**, stepup: { max_age: 10m } }\n");
    y
}

fn config(jwt_key: &str, alg: &str) -> Config {
    let yaml = format!(
        r#"listen: {{ address: 127.0.0.1:0 }}
admin: {{ address: 127.0.0.1:0 }}
upstream: {{ url: "http://127.0.0.1:9" }}
identity:
  jwt: {{ algorithms: [{alg}], {jwt_key} }}
stepup:
  token: {{ signing_key: "{SF_KEY}" }}
  console: true
routes:
{rules}default: pass
dev: true
"#,
        rules = rules_yaml()
    );
    let dir = std::env::temp_dir();
    Config::from_yaml(&dir.join("bench.yaml"), &yaml, &Default::default())
        .unwrap_or_else(|e| panic!("bench config invalid:\n{e}"))
}

fn rsa_keys() -> (tempfile::TempDir, Vec<u8>, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let private = dir.path().join("rsa.pem");
    let public = dir.path().join("rsa.pub.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private)
        .status()
        .expect("openssl")
        .success()
        && std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .status()
            .expect("openssl")
            .success();
    assert!(ok, "openssl could not make an RSA key");
    let pem = std::fs::read(&private).expect("private key");
    (dir, pem, public)
}

/// A primary token for `sub` (distinct `jti`s make distinct tokens).
fn primary(alg: Algorithm, key: &EncodingKey, sub: &str, jti: u64) -> String {
    let now = stepgate::token::unix_now();
    let claims = serde_json::json!({
        "sub": sub, "email": "bench@example.com", "sid": "bench1",
        "iat": now, "exp": now + 7200, "jti": jti.to_string(),
    });
    jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("sign")
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    h
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn policy(c: &mut Criterion) {
    let cfg = config(&format!("secret: \"{SECRET}\""), "HS256");
    let mut g = c.benchmark_group("policy");
    // The last rule of 200 (every rule is tried), and no rule at all.
    for (name, raw) in [
        (
            "normalise+match 200 rules, last rule",
            "/static199/css/site.css",
        ),
        (
            "normalise+match 200 rules, no rule",
            "/some/other/./path//x",
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let path = normalize_path(std::hint::black_box(raw)).expect("path");
                cfg.policy
                    .route(&Method::GET, Some("app.example.com"), &path)
                    .map(|r| r.line)
            })
        });
    }
    g.finish();
}

/// Time `authenticate` only; `before` runs untimed before each call.
fn timed_auth(
    rt: &tokio::runtime::Runtime,
    auth: &Authenticator,
    headers: &HeaderMap,
    iters: u64,
    before: impl Fn(),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        before();
        let t = Instant::now();
        let id = rt.block_on(auth.authenticate(headers, None, PEER));
        total += t.elapsed();
        assert!(matches!(id, Ok(Some(_))), "token refused");
    }
    total
}

fn identity(c: &mut Criterion) {
    let rt = runtime();
    let metrics = Arc::new(Metrics::new());
    let (_dir, rsa_pem, rsa_pub) = rsa_keys();
    let variants = [
        (
            "HS256",
            config(&format!("secret: \"{SECRET}\""), "HS256"),
            Algorithm::HS256,
            EncodingKey::from_secret(SECRET.as_bytes()),
        ),
        (
            "RS256",
            config(&format!("public_key: {}", rsa_pub.display()), "RS256"),
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(&rsa_pem).expect("rsa key"),
        ),
    ];
    let mut g = c.benchmark_group("identity");
    for (name, cfg, alg, key) in &variants {
        let auth = Authenticator::new(&cfg.identity, &cfg.built.jwt_keys, &metrics, None)
            .expect("authenticator");
        let headers = bearer(&primary(*alg, key, "bench", 1));
        g.bench_function(format!("{name} verified-token cache hit"), |b| {
            b.iter_custom(|iters| timed_auth(&rt, &auth, &headers, iters, || {}))
        });
        // A miss: the cache is emptied (untimed) before each verification.
        g.bench_function(format!("{name} cache miss (signature checked)"), |b| {
            b.iter_custom(|iters| {
                timed_auth(&rt, &auth, &headers, iters, || auth.bump_generation())
            })
        });
    }
    g.finish();
}

fn second_factor(c: &mut Criterion) {
    let rt = runtime();
    let cfg = config(&format!("secret: \"{SECRET}\""), "HS256");
    let metrics = Arc::new(Metrics::new());
    let store = cfg.built.store.clone();
    let stepup = Stepup::new(
        &cfg.stepup,
        cfg.built.stepup.clone(),
        false,
        Vec::new(),
        store,
        metrics.clone(),
    );
    let auth = Authenticator::new(&cfg.identity, &cfg.built.jwt_keys, &metrics, None)
        .expect("authenticator");
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let mut headers = bearer(&primary(Algorithm::HS256, &key, "bench", 1));
    let id = rt
        .block_on(auth.authenticate(&headers, None, PEER))
        .expect("identity")
        .expect("identity present");
    let sf = Tokens::new(&cfg.stepup.token)
        .expect("tokens")
        .issue(&id.subject, &id.session, Channel::Email)
        .expect("second-factor token");
    headers.insert(
        "x-second-factor-token",
        HeaderValue::from_str(&sf).expect("header"),
    );
    let rule = cfg
        .policy
        .route(&Method::GET, None, "/admin/x")
        .expect("admin rule");
    let Action::StepUp(need) = &rule.action else {
        panic!("admin is a step-up rule");
    };
    c.bench_function(
        "stepup/second-factor check (HS256 token, memory store)",
        |b| {
            b.iter(|| {
                let check = rt.block_on(stepup.check(&headers, &id, rule, need, PEER, Mode::Proxy));
                assert!(matches!(check, StepupCheck::Fresh(_)));
            })
        },
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = policy, identity, second_factor
}
criterion_main!(benches);
