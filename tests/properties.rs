//! Property tests of the boundary's oracles, run in CI on stable.
//!
//! The same oracles drive the `cargo fuzz` targets in `fuzz/` (see
//! `scripts/fuzz.sh`); these are the short, deterministic smoke pass.
//! Every crash or counter-example the fuzzers find becomes a row in
//! `regressions()` below.

mod support;

use std::path::Path;

use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;
use stepgate::config::Config;
use stepgate::identity::Authenticator;
use stepgate::policy::{normalize_path, Glob};
use support::gateway::{config_yaml, load, CONSOLE};

/// The test suite's usual gateway config, loaded once.
fn test_config() -> &'static Config {
    static CONFIG: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
    CONFIG.get_or_init(|| load(&config_yaml("http://127.0.0.1:9", CONSOLE, "")))
}

/// Path pieces an attacker combines to dodge a prefix rule.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("admin".to_string()),
        Just("ADMIN".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2e".to_string()),
        Just("%2E%2e".to_string()),
        Just(".%2e".to_string()),
        Just("".to_string()),
        Just("%61dmin".to_string()),
        Just("%2f".to_string()),
        Just("%5c".to_string()),
        Just("%00".to_string()),
        Just(";x".to_string()),
        Just("%3b".to_string()),
        Just("x".to_string()),
        Just("%".to_string()),
        Just("%zz".to_string()),
        Just("caf%C3%A9".to_string()),
        Just("%ff".to_string()),
        "[a-z0-9._~-]{0,6}",
        "[ -~]{0,4}",
    ]
}

fn attack_path() -> impl Strategy<Value = String> {
    prop::collection::vec(piece(), 0..8).prop_map(|parts| format!("/{}", parts.join("/")))
}

/// The oracle every normalised path must satisfy.
fn check_normal_form(raw: &str) -> Result<(), TestCaseError> {
    let Ok(norm) = normalize_path(raw) else {
        return Ok(());
    };
    // Idempotent: the forwarded path normalises to itself.
    let again = normalize_path(&norm);
    prop_assert_eq!(again.as_deref(), Ok(norm.as_str()));
    prop_assert!(norm.starts_with('/'), "{norm:?} not absolute");
    prop_assert!(!norm.contains("//"), "{norm:?} has //");
    prop_assert!(!norm.contains("/./"), "{norm:?} has /./");
    prop_assert!(!norm.contains("/../"), "{norm:?} has /../");
    prop_assert!(!norm.ends_with("/.") && !norm.ends_with("/.."), "{norm:?}");
    prop_assert!(!norm.contains('\\') && !norm.contains(';'), "{norm:?}");
    // A path that normalises into the protected prefix matches its rule.
    let rule = Glob::new("/admin/**").expect("glob");
    if norm == "/admin" || norm.starts_with("/admin/") {
        prop_assert!(rule.matches(&norm), "{raw:?} -> {norm:?} escapes /admin/**");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Class: path confusion (dot segments, doubled slashes, encodings)
    /// that would let a path dodge a prefix rule or differ upstream.
    #[test]
    fn normalisation_is_idempotent_and_never_dodges_a_prefix(raw in attack_path()) {
        check_normal_form(&raw)?;
    }

    /// Same oracle on arbitrary printable input.
    #[test]
    fn normalisation_holds_on_any_printable_path(raw in "/[ -~]{0,40}") {
        check_normal_form(&raw)?;
    }

    /// The route table sees exactly the normalised path: whatever a
    /// request path is, if its normal form is under /admin the admin rule
    /// (step-up) is chosen, never the default.
    #[test]
    fn a_path_that_normalises_under_admin_routes_to_the_admin_rule(raw in attack_path()) {
        let cfg = test_config();
        if let Ok(norm) = normalize_path(&raw) {
            let rule = cfg.policy.route(&Method::GET, Some("app.test"), &norm);
            if norm == "/admin" || norm.starts_with("/admin/") {
                prop_assert_eq!(rule.map(|r| &*r.name), Some("admin"));
            }
        }
    }

    /// Class: hostile config files. The loader never panics and every
    /// refusal is located as FILE:LINE:COL.
    #[test]
    fn the_config_loader_never_panics_and_locates_every_error(text in config_text()) {
        let file = Path::new("/etc/stepgate/fuzz.yaml");
        if let Err(e) = Config::from_yaml(file, &text, &Default::default()) {
            prop_assert!(!e.problems.is_empty());
            for p in &e.problems {
                prop_assert!(p.line >= 1 && p.col >= 1, "unlocated: {}: {}", e, p.message);
            }
            prop_assert!(e.to_string().starts_with("/etc/stepgate/fuzz.yaml:"));
        }
    }

    /// Class: token parsing. No credential the gateway did not sign is
    /// accepted, and no byte string makes the parser panic.
    #[test]
    fn arbitrary_bearer_tokens_are_refused_without_panicking(token in token_text()) {
        let cfg = test_config();
        let auth = Authenticator::new(&cfg.identity, &cfg.built.jwt_keys, &Default::default(), None).expect("authenticator");
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
            headers.insert(http::header::AUTHORIZATION, v);
            let got = rt.block_on(auth.authenticate(&headers, None, "127.0.0.1".parse().expect("ip")));
            prop_assert!(!matches!(got, Ok(Some(_))), "forged token accepted: {token:?}");
        }
    }
}

/// Text that is mostly YAML-shaped, with the gateway's own keys, so the
/// validator and not only the YAML parser gets exercised.
fn config_text() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("listen"),
        Just("address"),
        Just("upstream"),
        Just("url"),
        Just("routes"),
        Just("path"),
        Just("stepup"),
        Just("max_age"),
        Just("identity"),
        Just("jwt"),
        Just("store"),
        Just("prefix"),
        Just("- name"),
        Just("&a"),
        Just("*a"),
        Just("<<"),
        Just("${X}"),
        Just("{"),
        Just("["),
    ];
    let value = prop_oneof![
        Just(""),
        Just("127.0.0.1:0"),
        Just("http://127.0.0.1:1"),
        Just("/admin/**"),
        Just("5m"),
        Just("[a, b]"),
        Just("{ x: 1 }"),
        Just("'unterminated"),
        Just("!!binary x"),
        Just("~"),
        Just("-1"),
        Just("99999999999999999999"),
    ];
    let line = (0usize..6, key, value)
        .prop_map(|(indent, k, v)| format!("{}{}: {}", "  ".repeat(indent), k, v));
    prop_oneof![
        prop::collection::vec(line, 0..20).prop_map(|l| l.join("\n")),
        "[ -~\n\t]{0,200}",
    ]
}

fn token_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}",
        "eyJ[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_.=-]{0,60}",
        // alg none / HS256 header with junk payloads
        "eyJhbGciOiJub25lIn0\\.[A-Za-z0-9_-]{0,40}\\.?",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9\\.[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,43}",
        "[ -~]{0,80}",
    ]
}

/// Bodies the challenge API and the challenge page's form get thrown at them.
fn api_body() -> impl Strategy<Value = Vec<u8>> {
    let json_value = prop_oneof![
        Just("null".to_string()),
        Just("1e999".to_string()),
        Just("\"email\"".to_string()),
        Just("\"sms\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        "\"[ -~]{0,12}\"",
        "-?[0-9]{1,25}",
    ];
    let key = prop_oneof![
        Just("method"),
        Just("challenge_id"),
        Just("code"),
        Just("rd"),
        Just("csrf"),
        Just("__proto__"),
    ];
    prop_oneof![
        prop::collection::vec((key.clone(), json_value), 0..4).prop_map(|kv| {
            let inner: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", inner.join(",")).into_bytes()
        }),
        prop::collection::vec((key, "[ -~]{0,10}"), 0..4).prop_map(|kv| {
            let pairs: Vec<String> = kv.iter().map(|(k, v)| format!("{k}={v}")).collect();
            pairs.join("&").into_bytes()
        }),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

/// Class: malformed input at the challenge API and page. Whatever the body
/// and content type, the answer is a 2xx-4xx (never a 5xx or a dropped
/// connection) and nothing reaches the upstream.
#[test]
fn the_challenge_api_answers_any_body_with_a_client_error_and_forwards_nothing() {
    use proptest::test_runner::{Config as RunnerConfig, TestRunner};
    use support::upstream::Upstream;

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (upstream, gw) = rt.block_on(async {
        let upstream = Upstream::start().await;
        let gw =
            support::gateway::TestGateway::start(&config_yaml(&upstream.url(), CONSOLE, "")).await;
        (upstream, gw)
    });
    let auth = format!(
        "Bearer {}",
        support::gateway::primary_token("fuzz", Some("fuzz@example.com"), None, Some("s1"))
    );
    let paths = [
        "/.stepgate/api/otp",
        "/.stepgate/api/otp/verify",
        "/.stepgate/api/logout",
        "/.stepgate/challenge",
        "/.stepgate/challenge?rd=/admin/x",
    ];
    let types = [
        "application/json",
        "application/x-www-form-urlencoded",
        "text/plain",
        "application/json; charset=utf-16",
        "",
    ];
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 150,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    runner
        .run(
            &(0..paths.len(), 0..types.len(), any::<bool>(), api_body()),
            |(p, t, with_auth, body)| {
                let mut headers = vec![("origin", "http://app.test")];
                if !types[t].is_empty() {
                    headers.push(("content-type", types[t]));
                }
                if with_auth {
                    headers.push(("authorization", auth.as_str()));
                }
                let res = rt.block_on(support::gateway::request(
                    Method::POST,
                    &gw.url(paths[p]),
                    &headers,
                    body.clone(),
                ));
                prop_assert!(
                    res.status.as_u16() < 500,
                    "{} {} with {:?} -> {}: {}",
                    paths[p],
                    types[t],
                    String::from_utf8_lossy(&body),
                    res.status,
                    res.text()
                );
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        upstream.hits(),
        0,
        "a challenge API request reached the upstream"
    );
    let res = rt.block_on(support::gateway::get(
        &gw.url("/admin/x"),
        &[("authorization", &auth)],
    ));
    assert_eq!(
        res.status.as_u16(),
        401,
        "no code was entered: {}",
        res.text()
    );
    assert_eq!(upstream.hits(), 0);
}

/// Counter-examples found by fuzzing or review, kept as fixed cases.
#[test]
fn regressions() {
    for raw in [
        "/admin/%2e%2e/admin",
        "/%2e/admin",
        "//admin//",
        "/x/..//admin",
        "/admin/.",
        "/./",
        "/a/%2E%2E/%2E%2E",
    ] {
        if let Err(e) = check_normal_form(raw) {
            panic!("{raw:?}: {e}");
        }
    }
    // A YAML error without a position (a second document) used to be
    // reported at line 0, column 0.
    let e = Config::from_yaml(
        Path::new("/etc/stepgate/x.yaml"),
        "  listen: ~\nlisten: ",
        &Default::default(),
    )
    .err()
    .expect("refused");
    assert!(e.problems.iter().all(|p| p.line >= 1 && p.col >= 1), "{e}");
}

#[test]
// The one policy the fuzz targets share (fuzz/policy.yaml) stays a valid
// config: a fuzz run that panics on its own setup finds nothing.
fn fuzz_policy_is_valid() {
    let text = include_str!("../fuzz/policy.yaml");
    let cfg = Config::from_yaml(Path::new("fuzz/policy.yaml"), text, &Default::default())
        .unwrap_or_else(|e| panic!("fuzz/policy.yaml:\n{e}"));
    assert!(cfg.identity.jwt.is_some());
}
