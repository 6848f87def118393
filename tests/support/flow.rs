//! A complete step-up environment for end-to-end tests: upstream, SMTP
//! server, SMS sink, optional redis-server, and the gateway in front.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};

use super::gateway::*;
use super::http_sink::HttpSink;
use super::redis::RedisServer;
use super::smtp::{extract_code, SmtpServer};
use super::upstream::Upstream;

/// Limits used unless a test overrides them.
pub const OTP: &str = "    length: 6\n    ttl: 5m\n    max_attempts: 3\n    resend_after: 30s\n    max_sends: 5\n    lockout: 15m\n    max_failures: 6\n";

pub struct Env {
    pub up: Upstream,
    pub smtp: SmtpServer,
    pub sms: HttpSink,
    pub gw: TestGateway,
    pub redis: Option<RedisServer>,
    pub yaml: String,
}

pub fn stepup_yaml(smtp_port: u16, sms_url: &str, otp: &str) -> String {
    format!(
        "  otp:\n{otp}  email:\n    smtp: {{ host: 127.0.0.1, port: {smtp_port}, security: none }}\n    from: \"Security <no-reply@example.com>\"\n    subject: \"Your verification code\"\n    timeout: 3s\n  sms:\n    webhook: {{ url: \"{sms_url}/send\", auth_header: \"Bearer sms-test-token\" }}\n    timeout: 3s\n"
    )
}

impl Env {
    pub async fn start(redis: bool, otp: &str) -> Env {
        Env::start_edited(redis, otp, |yaml| yaml).await
    }

    /// Like `start`, with the config text passed through `edit` first.
    pub async fn start_edited(redis: bool, otp: &str, edit: impl FnOnce(String) -> String) -> Env {
        let up = Upstream::start().await;
        let smtp = SmtpServer::start();
        let sms = HttpSink::start(200).await;
        let redis = redis.then(RedisServer::start);
        let store = redis
            .as_ref()
            .map(|r| format!("store:\n  redis: {}\n  prefix: \"test:\"\n", r.url()))
            .unwrap_or_default();
        let yaml = edit(config_yaml(
            &up.url(),
            &stepup_yaml(smtp.port(), &sms.url(), otp),
            &store,
        ));
        let gw = TestGateway::start(&yaml).await;
        Env {
            up,
            smtp,
            sms,
            gw,
            redis,
            yaml,
        }
    }

    /// Another gateway instance on the same config (and so the same store).
    pub async fn second_instance(&self) -> TestGateway {
        TestGateway::start(&self.yaml).await
    }
}

/// A signed-in user.
#[derive(Clone)]
pub struct User {
    pub auth: String,
    pub email: String,
    pub phone: String,
}

pub fn user(name: &str, sid: Option<&str>) -> User {
    let email = format!("{name}@example.com");
    let phone = format!("+1555010{:04}", name.len() * 7 % 10_000);
    let tok = primary_token(name, Some(&email), Some(&phone), sid);
    User {
        auth: format!("Bearer {tok}"),
        email,
        phone,
    }
}

/// The `n`-th (0-based) code mailed to `to`.
pub async fn mailed_code(smtp: &SmtpServer, to: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let msgs: Vec<String> = smtp
            .received()
            .into_iter()
            .filter(|r| r.rcpt_tos.iter().any(|t| t.eq_ignore_ascii_case(to)))
            .map(|r| r.data)
            .collect();
        if let Some(m) = msgs.get(n) {
            return extract_code(m).expect("a code in the mail");
        }
        assert!(Instant::now() < deadline, "no mail #{n} for {to}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn post_json(gw: &TestGateway, path: &str, u: &User, body: &str) -> TestResponse {
    request(
        Method::POST,
        &gw.url(path),
        &[
            ("authorization", &u.auth),
            ("content-type", "application/json"),
        ],
        Bytes::from(body.to_string()),
    )
    .await
}

pub async fn start_otp(gw: &TestGateway, u: &User, method: &str) -> TestResponse {
    post_json(
        gw,
        "/.stepgate/api/otp",
        u,
        &format!(r#"{{"method":"{method}"}}"#),
    )
    .await
}

pub async fn verify(gw: &TestGateway, u: &User, cid: &str, code: &str) -> TestResponse {
    post_json(
        gw,
        "/.stepgate/api/otp/verify",
        u,
        &serde_json::json!({"challenge_id": cid, "code": code}).to_string(),
    )
    .await
}

/// Start an email challenge and read its code from the mailbox.
pub async fn email_challenge(env: &Env, gw: &TestGateway, u: &User, n: usize) -> (String, String) {
    let res = start_otp(gw, u, "email").await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.text());
    let cid = res.json()["challenge_id"]
        .as_str()
        .expect("challenge_id")
        .to_string();
    (cid, mailed_code(&env.smtp, &u.email, n).await)
}

/// Full step-up by email; returns the second-factor token.
pub async fn step_up(env: &Env, u: &User, n: usize) -> String {
    let (cid, code) = email_challenge(env, &env.gw, u, n).await;
    let res = verify(&env.gw, u, &cid, &code).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    res.json()["token"].as_str().expect("token").to_string()
}

pub async fn protected(gw: &TestGateway, path: &str, u: &User, token: &str) -> TestResponse {
    get(
        &gw.url(path),
        &[("authorization", &u.auth), ("x-second-factor-token", token)],
    )
    .await
}
