//! The step-up flow end to end: a real SMTP server receives the code, a
//! real HTTP server receives SMS, the gateway forwards to a real upstream.
//! Every behaviour test runs twice: on the in-memory store and on a real
//! redis-server started for the test.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use support::gateway::BinaryGateway;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::flow::*;
use support::gateway::*;
use support::http_sink::HttpSink;
use support::smtp::extract_code;

both_stores!(
    email_flow_end_to_end,
    sms_flow_end_to_end,
    wrong_codes_count_down_then_the_challenge_dies,
    lockout_spans_challenges_and_resend_does_not_reset_it,
    cooldown_and_hourly_cap_answer_429_with_retry_after,
    codes_expire_after_ttl,
    parallel_verifies_give_exactly_one_token,
    codes_and_tokens_are_bound_to_user_and_session,
    freshness_one_time_and_logout,
    expiry_edge_spent_and_revoked_tokens_stay_dead_until_no_longer_accepted,
    malformed_requests_get_4xx,
    delivery_failure_is_502_and_costs_nothing,
    send_abuse_client_cap_budget_and_sms_countries,
);

// The whole flow: masked methods, code by real SMTP, token, forwarded
// request with the step-up headers and without the token.
async fn email_flow_end_to_end(redis: bool) {
    let env = Env::start(redis, OTP).await;
    let u = user("alice", None);
    let res = get(
        &env.gw.url("/.stepgate/api/methods"),
        &[("authorization", &u.auth)],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);
    let methods = res.json();
    assert_eq!(methods["methods"][0]["id"], "email");
    assert_eq!(methods["methods"][0]["target"], "a***@example.com");
    assert_eq!(methods["methods"][1]["id"], "sms");
    assert!(
        !res.text().contains(&u.phone) && !res.text().contains(&u.email),
        "full contact leaked"
    );

    let res = start_otp(&env.gw, &u, "email").await;
    assert_eq!(res.status, StatusCode::ACCEPTED);
    let body = res.json();
    assert_eq!(body["expires_in"], 300);
    assert_eq!(body["resend_after"], 30);
    let cid = body["challenge_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mail = env
        .smtp
        .wait_for_message(&u.email, Duration::from_secs(10))
        .await;
    assert!(mail.contains("Subject: Your verification code"), "{mail}");
    let code = extract_code(&mail).expect("code in mail");
    assert_eq!(code.len(), 6);

    let res = verify(&env.gw, &u, &cid, &code).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.json()["expires_in"], 900);
    let token = res.json()["token"].as_str().unwrap_or_default().to_string();
    let cookie = res.header("set-cookie").unwrap_or_default().to_string();
    assert!(
        cookie.starts_with(&format!("stepgate_sf={token};")),
        "{cookie}"
    );
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    assert!(!cookie.contains("Secure"), "Secure cookie on plain HTTP");

    let res = get(
        &env.gw.url("/admin/panel"),
        &[
            ("authorization", &u.auth),
            ("x-second-factor-token", &token),
            ("cookie", &format!("app=1; stepgate_sf={token}")),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(
        res.upstream_header("x-stepgate-stepup").as_deref(),
        Some("email")
    );
    // Whole seconds since the code was verified: 0, or 1 when a second
    // boundary fell between the verify and this request.
    let age = res.upstream_header("x-stepgate-stepup-age");
    assert!(
        matches!(age.as_deref(), Some("0" | "1")),
        "stepup age {age:?}"
    );
    assert_eq!(
        res.upstream_header("x-stepgate-user").as_deref(),
        Some("alice")
    );
    assert_eq!(res.upstream_header("x-second-factor-token"), None);
    assert_eq!(res.upstream_header("cookie").as_deref(), Some("app=1"));
    assert!(!res.text().contains(&token), "token reached the upstream");

    // The cookie alone works too (browsers).
    let res = get(
        &env.gw.url("/admin/panel"),
        &[
            ("authorization", &u.auth),
            ("cookie", &format!("stepgate_sf={token}")),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);

    // A used challenge is gone.
    assert_eq!(
        verify(&env.gw, &u, &cid, &code).await.status,
        StatusCode::GONE
    );
    let m = get(&env.gw.admin_url("/metrics"), &[]).await.text();
    for ev in [
        "challenge_started",
        "code_sent",
        "verify_ok",
        "token_issued",
    ] {
        assert!(
            m.contains(&format!(
                "stepgate_audit_events_total{{event=\"{ev}\",mode=\"proxy\"}} 1"
            )),
            "{ev}: {m}"
        );
    }
}

// SMS through the webhook provider: JSON {to,text} with the auth header.
async fn sms_flow_end_to_end(redis: bool) {
    let env = Env::start(redis, OTP).await;
    let u = user("bob", None);
    let res = start_otp(&env.gw, &u, "sms").await;
    assert_eq!(res.status, StatusCode::ACCEPTED);
    let cid = res.json()["challenge_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let req = env.sms.wait_for_request(Duration::from_secs(10)).await;
    assert_eq!(req.path, "/send");
    assert_eq!(req.header("authorization"), Some("Bearer sms-test-token"));
    let body = req.json();
    assert_eq!(body["to"], u.phone.as_str());
    let text = body["text"].as_str().unwrap_or_default();
    let code: String = text.chars().filter(char::is_ascii_digit).take(6).collect();
    let res = verify(&env.gw, &u, &cid, &code).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    let token = res.json()["token"].as_str().unwrap_or_default().to_string();
    // The keys rule accepts only sms; an sms factor passes it.
    let res = request(
        Method::POST,
        &env.gw.url("/api/v2/keys"),
        &[
            ("authorization", &u.auth),
            ("x-second-factor-token", &token),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(
        res.upstream_header("x-stepgate-stepup").as_deref(),
        Some("sms")
    );
}

// Each wrong code costs one attempt; at zero the challenge is dead even
// for the right code.
async fn wrong_codes_count_down_then_the_challenge_dies(redis: bool) {
    let env = Env::start(redis, OTP).await;
    let u = user("carol", None);
    let (cid, code) = email_challenge(&env, &env.gw, &u, 0).await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for left in [2, 1] {
        let res = verify(&env.gw, &u, &cid, wrong).await;
        assert_eq!(res.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            res.json(),
            serde_json::json!({"error": "invalid_code", "attempts_left": left})
        );
    }
    let res = verify(&env.gw, &u, &cid, wrong).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(res.json()["attempts_left"], 0);
    assert_eq!(
        verify(&env.gw, &u, &cid, &code).await.status,
        StatusCode::GONE
    );
    assert_eq!(env.up.hits(), 0);
}

// max_failures wrong codes across challenges lock the user; asking for a
// new code neither resets the count nor works while locked.
async fn lockout_spans_challenges_and_resend_does_not_reset_it(redis: bool) {
    let otp = OTP
        .replace("resend_after: 30s", "resend_after: 0s")
        .replace("max_failures: 6", "max_failures: 4");
    let env = Env::start(redis, &otp).await;
    let u = user("dave", None);
    let mut n = 0;
    let mut failures = 0;
    let mut last = None;
    while failures < 4 {
        let (cid, code) = email_challenge(&env, &env.gw, &u, n).await;
        n += 1;
        let wrong = if code == "000000" { "111111" } else { "000000" };
        for _ in 0..2 {
            last = Some(verify(&env.gw, &u, &cid, wrong).await);
            failures += 1;
        }
    }
    let last = last.expect("at least one attempt");
    assert_eq!(last.status, StatusCode::LOCKED, "{}", last.text());
    let retry = last.retry_after();
    assert!((890..=900).contains(&retry), "retry-after {retry}");
    let res = start_otp(&env.gw, &u, "email").await;
    assert_eq!(res.status, StatusCode::LOCKED);
    assert!(res.header("retry-after").is_some());
    // Another user is unaffected.
    assert_eq!(
        start_otp(&env.gw, &user("erin", None), "email")
            .await
            .status,
        StatusCode::ACCEPTED
    );
}

// resend_after per user and channel, max_sends per hour over all channels.
async fn cooldown_and_hourly_cap_answer_429_with_retry_after(redis: bool) {
    let otp = OTP.replace("max_sends: 5", "max_sends: 3");
    let env = Env::start(redis, &otp).await;
    let u = user("frank", None);
    assert_eq!(
        start_otp(&env.gw, &u, "email").await.status,
        StatusCode::ACCEPTED
    );
    let res = start_otp(&env.gw, &u, "email").await;
    assert_eq!(res.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.json()["error"], "too_soon");
    let retry = res.retry_after();
    assert!((1..=30).contains(&retry), "retry-after {retry}");
    // The other channel has its own cooldown.
    assert_eq!(
        start_otp(&env.gw, &u, "sms").await.status,
        StatusCode::ACCEPTED
    );

    let otp = OTP
        .replace("resend_after: 30s", "resend_after: 0s")
        .replace("max_sends: 5", "max_sends: 2");
    let env = Env::start(redis, &otp).await;
    assert_eq!(
        start_otp(&env.gw, &u, "email").await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        start_otp(&env.gw, &u, "sms").await.status,
        StatusCode::ACCEPTED
    );
    let res = start_otp(&env.gw, &u, "email").await;
    assert_eq!(res.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.json()["error"], "too_many_codes");
    let retry = res.retry_after();
    assert!((3500..=3600).contains(&retry), "retry-after {retry}");
}

// A code is valid for ttl and no longer. (Waiting is the behaviour under
// test here, not synchronisation.)
async fn codes_expire_after_ttl(redis: bool) {
    let otp = OTP.replace("ttl: 5m", "ttl: 1s");
    let env = Env::start(redis, &otp).await;
    let u = user("gina", None);
    let (cid, code) = email_challenge(&env, &env.gw, &u, 0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        verify(&env.gw, &u, &cid, &code).await.status,
        StatusCode::GONE
    );
}

// 50 concurrent verifies of one correct code: exactly one token.
async fn parallel_verifies_give_exactly_one_token(redis: bool) {
    let env = Env::start(redis, OTP).await;
    let u = user("hank", None);
    let (cid, code) = email_challenge(&env, &env.gw, &u, 0).await;
    let url = env.gw.url("/.stepgate/api/otp/verify");
    let body = serde_json::json!({"challenge_id": cid, "code": code}).to_string();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (url, body, auth) = (url.clone(), body.clone(), u.auth.clone());
            tokio::spawn(async move {
                request(
                    Method::POST,
                    &url,
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                    ],
                    Bytes::from(body),
                )
                .await
                .status
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let s = t.await.expect("task");
        assert!(
            s == StatusCode::OK || s == StatusCode::GONE,
            "unexpected {s}"
        );
        ok += usize::from(s == StatusCode::OK);
    }
    assert_eq!(ok, 1);
}

// A's code is useless to B; A's token is useless with B's primary token
// and with A's other sign-in.
async fn codes_and_tokens_are_bound_to_user_and_session(redis: bool) {
    let env = Env::start(redis, OTP).await;
    let a = user("ivan", Some("session-1"));
    let b = user("judy", Some("session-9"));
    let (cid, code) = email_challenge(&env, &env.gw, &a, 0).await;
    assert_eq!(
        verify(&env.gw, &b, &cid, &code).await.status,
        StatusCode::GONE
    );
    // Either half of the binding alone refuses: the same user signed in
    // elsewhere, and another user whose sign-in has the same sid.
    let a_other_session = user("ivan", Some("session-2"));
    let same_sid_other_user = user("judy", Some("session-1"));
    for (who, other) in [
        ("same user, other session", &a_other_session),
        ("other user, same sid", &same_sid_other_user),
    ] {
        assert_eq!(
            verify(&env.gw, other, &cid, &code).await.status,
            StatusCode::GONE,
            "{who}"
        );
    }
    // B's failed try did not burn A's challenge.
    let res = verify(&env.gw, &a, &cid, &code).await;
    assert_eq!(res.status, StatusCode::OK);
    let token = res.json()["token"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        protected(&env.gw, "/admin/x", &a, &token).await.status,
        StatusCode::OK
    );
    assert_eq!(
        protected(&env.gw, "/admin/x", &b, &token).await.status,
        StatusCode::UNAUTHORIZED
    );
    let a_elsewhere = user("ivan", Some("session-2"));
    assert_eq!(
        protected(&env.gw, "/admin/x", &a_elsewhere, &token)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    // Without a sid, the primary token itself is the session.
    let c1 = user("kim", None);
    let t = step_up(&env, &c1, 0).await;
    let c2 = User {
        auth: format!(
            "Bearer {}",
            primary_token("kim", Some("kim@example.com"), None, Some("other"))
        ),
        ..c1.clone()
    };
    assert_eq!(
        protected(&env.gw, "/admin/x", &c1, &t).await.status,
        StatusCode::OK
    );
    assert_eq!(
        protected(&env.gw, "/admin/x", &c2, &t).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Forged tokens: another key, a primary token, alg none.
    let other_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "kim", "exp": stepgate::token::unix_now() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-gateway-key-0123456789abcdef"),
    )
    .unwrap_or_default();
    let primary = c1.auth.trim_start_matches("Bearer ").to_string();
    for forged in [
        other_key,
        primary,
        format!(
            "{}.e30.",
            "eyJhbGciOiJub25lIiwidHlwIjoic3RlcGdhdGUtc2Yrand0In0"
        ),
    ] {
        assert_eq!(
            protected(&env.gw, "/admin/x", &c1, &forged).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
}

// max_age is per rule; one_time rules spend the token; logout revokes it.
async fn freshness_one_time_and_logout(redis: bool) {
    let env = Env::start(redis, OTP).await;
    let u = user("liam", None);
    let token = step_up(&env, &u, 0).await;
    // one_time: first use forwarded, second refused; other rules unaffected.
    assert_eq!(
        protected(&env.gw, "/billing/export", &u, &token)
            .await
            .status,
        StatusCode::OK
    );
    let res = protected(&env.gw, "/billing/export", &u, &token).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(res.json()["error"], "insufficient_user_authentication");
    assert_eq!(
        protected(&env.gw, "/admin/x", &u, &token).await.status,
        StatusCode::OK
    );
    // The keys rule accepts sms only: an email factor does not satisfy it.
    let res = request(
        Method::DELETE,
        &env.gw.url("/api/v1/keys"),
        &[
            ("authorization", &u.auth),
            ("x-second-factor-token", &token),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    // Logout revokes.
    let res = request(
        Method::POST,
        &env.gw.url("/.stepgate/api/logout"),
        &[
            ("authorization", &u.auth),
            ("x-second-factor-token", &token),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(res.status, StatusCode::NO_CONTENT);
    assert!(res
        .header("set-cookie")
        .unwrap_or_default()
        .contains("Max-Age=0"));
    // A cross-site form (form content types) cannot trigger a logout.
    let res = request(
        Method::POST,
        &env.gw.url("/.stepgate/api/logout"),
        &[
            ("authorization", &u.auth),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(res.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        protected(&env.gw, "/admin/x", &u, &token).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(env.up.hits(), 2);
}

/// A numeric claim of a token (read without verifying; the gateway verifies).
fn token_claim(token: &str, name: &str) -> u64 {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64url payload"),
    )
    .expect("JSON claims");
    claims[name].as_u64().expect("numeric claim")
}

// Expiry edges (#10.5): a spent one_time token and a revoked token are
// presented again and again until the gateway can no longer accept them,
// including in the last second it would (whole seconds: `exp` plus leeway,
// `auth_time` plus the rule's max_age, whichever ends first); their marks
// must outlive that, so every presentation is refused.
async fn expiry_edge_spent_and_revoked_tokens_stay_dead_until_no_longer_accepted(redis: bool) {
    const LIFETIME: u64 = 2;
    let otp = OTP.replace("resend_after: 30s", "resend_after: 0s");
    let env = Env::start_edited(redis, &otp, |yaml| {
        let key = format!("    signing_key: {STEPUP_KEY}\n");
        yaml.replacen(&key, &format!("{key}    lifetime: {LIFETIME}s\n"), 1)
            .replace("max_age: 5m", &format!("max_age: {LIFETIME}s"))
            .replace("max_age: 1m", &format!("max_age: {LIFETIME}s"))
    })
    .await;
    let u = user("edgar", None);
    let spent = step_up(&env, &u, 0).await;
    let revoked = step_up(&env, &u, 1).await;
    assert_eq!(
        protected(&env.gw, "/billing/export", &u, &spent)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        protected(&env.gw, "/admin/x", &u, &revoked).await.status,
        StatusCode::OK
    );
    let res = request(
        Method::POST,
        &env.gw.url("/.stepgate/api/logout"),
        &[
            ("authorization", &u.auth),
            ("x-second-factor-token", &revoked),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(res.status, StatusCode::NO_CONTENT);

    // The last whole second in which the gateway would accept each token.
    let last = |t: &str| {
        (token_claim(t, "exp") + stepgate::token::LEEWAY_SECS)
            .min(token_claim(t, "auth_time") + LIFETIME)
    };
    let last_accepted = last(&spent).max(last(&revoked));
    let (mut presented, mut in_last_second) = (0, 0);
    loop {
        let before = stepgate::token::unix_now();
        if before > last_accepted {
            break;
        }
        let again = protected(&env.gw, "/billing/export", &u, &spent).await;
        let back = protected(&env.gw, "/admin/x", &u, &revoked).await;
        assert_eq!(
            again.status,
            StatusCode::UNAUTHORIZED,
            "spent token accepted again"
        );
        assert_eq!(
            back.status,
            StatusCode::UNAUTHORIZED,
            "revoked token came back"
        );
        presented += 1;
        // Checked entirely within the last second the tokens are accepted.
        if before == last_accepted && stepgate::token::unix_now() == last_accepted {
            in_last_second += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(presented > 10, "only {presented} presentations");
    assert!(
        in_last_second > 0,
        "no presentation in the last accepted second"
    );
    assert_eq!(env.up.hits(), 2);
}

// Bad input gets a short JSON 4xx, never a 500 or a forwarded request.
async fn malformed_requests_get_4xx(redis: bool) {
    let env = Env::start(redis, OTP).await;
    let u = user("mia", None);
    let cases: &[(&str, &str, u16)] = &[
        ("/.stepgate/api/otp", "{not json", 400),
        ("/.stepgate/api/otp", "[]", 400),
        ("/.stepgate/api/otp", r#"{"method":42}"#, 400),
        ("/.stepgate/api/otp", r#"{"method":"pigeon"}"#, 422),
        ("/.stepgate/api/otp", r#"{}"#, 400),
        (
            "/.stepgate/api/otp/verify",
            r#"{"challenge_id":"x","code":"12345"}"#,
            422,
        ),
        (
            "/.stepgate/api/otp/verify",
            r#"{"challenge_id":"x","code":"1234567"}"#,
            422,
        ),
        (
            "/.stepgate/api/otp/verify",
            r#"{"challenge_id":"x","code":"١٢٣٤٥٦"}"#,
            422,
        ),
        (
            "/.stepgate/api/otp/verify",
            r#"{"challenge_id":"x","code":123456}"#,
            400,
        ),
        (
            "/.stepgate/api/otp/verify",
            r#"{"challenge_id":7,"code":"123456"}"#,
            400,
        ),
        (
            "/.stepgate/api/otp/verify",
            r#"{"challenge_id":"nope","code":"123456"}"#,
            410,
        ),
        // challenge_id: 1 to 64 bytes, looked up only then.
        (
            "/.stepgate/api/otp/verify",
            r#"{"challenge_id":"","code":"123456"}"#,
            400,
        ),
    ];
    for (path, body, want) in cases {
        let res = post_json(&env.gw, path, &u, body).await;
        assert_eq!(res.status.as_u16(), *want, "{path} {body}: {}", res.text());
        assert!(res.json()["error"].is_string(), "{body}");
    }
    for (len, want) in [(64, 410), (65, 400), (1_000, 400)] {
        let body = serde_json::json!({"challenge_id": "c".repeat(len), "code": "123456"});
        let res = post_json(&env.gw, "/.stepgate/api/otp/verify", &u, &body.to_string()).await;
        assert_eq!(res.status.as_u16(), want, "challenge_id of {len} bytes");
    }
    // A valid body well under the 8 KiB limit is read whole (whitespace
    // padding; "pigeon" is parsed and refused as an unknown method).
    let padded = format!(r#"{{"method":"pigeon"{}}}"#, " ".repeat(4_000));
    let res = post_json(&env.gw, "/.stepgate/api/otp", &u, &padded).await;
    assert_eq!(res.status.as_u16(), 422, "{}", res.text());
    // Each API path answers only its own method.
    let json = [
        ("authorization", u.auth.as_str()),
        ("content-type", "application/json"),
    ];
    for (method, path) in [
        (Method::POST, "/.stepgate/api/methods"),
        (Method::DELETE, "/.stepgate/api/methods"),
        (Method::GET, "/.stepgate/api/otp"),
        (Method::GET, "/.stepgate/api/otp/verify"),
        (Method::PUT, "/.stepgate/api/otp/verify"),
        (Method::GET, "/.stepgate/api/logout"),
        (Method::DELETE, "/.stepgate/api/logout"),
    ] {
        let res = request(method.clone(), &env.gw.url(path), &json, Bytes::new()).await;
        assert_eq!(
            res.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert!(res.json()["error"].is_string(), "{method} {path}");
    }
    let res = request(
        Method::POST,
        &env.gw.url("/.stepgate/api/otp"),
        &[("authorization", &u.auth), ("content-type", "text/plain")],
        Bytes::from(r#"{"method":"email"}"#),
    )
    .await;
    assert_eq!(res.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let big = format!(r#"{{"method":"{}"}}"#, "e".repeat(20_000));
    assert_eq!(
        post_json(&env.gw, "/.stepgate/api/otp", &u, &big)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    let anon = User {
        auth: String::new(),
        ..u.clone()
    };
    assert_eq!(
        post_json(
            &env.gw,
            "/.stepgate/api/otp",
            &anon,
            r#"{"method":"email"}"#
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(
            &env.gw.url("/.stepgate/api/otp"),
            &[("authorization", &u.auth)]
        )
        .await
        .status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        get(
            &env.gw.url("/.stepgate/nope"),
            &[("authorization", &u.auth)]
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    // A user without a phone has no sms method.
    let no_phone = User {
        auth: format!(
            "Bearer {}",
            primary_token("noah", Some("noah@example.com"), None, None)
        ),
        ..u.clone()
    };
    assert_eq!(
        start_otp(&env.gw, &no_phone, "sms").await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(env.up.hits(), 0);
    assert!(env.smtp.received().is_empty());
}

// SMS pumping and send abuse: an allow-list of SMS destinations (403, the
// method is not even offered), a global SMS budget per hour (429 with
// Retry-After, shared by instances on Redis), a per-client-address cap
// across accounts (429 with Retry-After, X-Forwarded-For from an untrusted
// peer does not get around it), all audited and counted in metrics; the
// real SMS sink receives only the codes that were allowed.
async fn send_abuse_client_cap_budget_and_sms_countries(redis: bool) {
    let otp = format!("{OTP}    max_sends_per_client: 4\n");
    let env = Env::start_edited(redis, &otp, |yaml| {
        let webhook = "auth_header: \"Bearer sms-test-token\" }\n";
        yaml.replacen(
            webhook,
            &format!("{webhook}    hourly_budget: 2\n    allowed_countries: [\"+1\", \"+4420\"]\n"),
            1,
        )
    })
    .await;
    // Outside the allow-list: not offered, refused with 403, nothing sent.
    let abroad = User {
        auth: format!(
            "Bearer {}",
            primary_token(
                "pat",
                Some("pat@example.com"),
                Some("+44 7700 900123"),
                None
            )
        ),
        email: "pat@example.com".into(),
        phone: "+44 7700 900123".into(),
    };
    let methods = get(
        &env.gw.url("/.stepgate/api/methods"),
        &[("authorization", &abroad.auth)],
    )
    .await
    .json();
    assert_eq!(
        methods["methods"].as_array().map(Vec::len),
        Some(1),
        "{methods}"
    );
    assert_eq!(methods["methods"][0]["id"], "email");
    let res = start_otp(&env.gw, &abroad, "sms").await;
    assert_eq!(res.status, StatusCode::FORBIDDEN, "{}", res.text());
    assert_eq!(res.json()["error"], "destination_not_allowed");

    // The SMS budget: two codes for everyone together.
    for name in ["quinn", "rosa"] {
        let res = start_otp(&env.gw, &user(name, None), "sms").await;
        assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.text());
    }
    let res = start_otp(&env.gw, &user("sven", None), "sms").await;
    assert_eq!(res.status, StatusCode::TOO_MANY_REQUESTS, "{}", res.text());
    assert_eq!(res.json()["error"], "send_budget_exhausted");
    assert!(
        (3500..=3600).contains(&res.retry_after()),
        "{:?}",
        res.headers
    );
    if redis {
        let other = env.second_instance().await;
        let res = start_otp(&other, &user("tara", None), "sms").await;
        assert_eq!(res.status, StatusCode::TOO_MANY_REQUESTS, "{}", res.text());
        assert_eq!(res.json()["error"], "send_budget_exhausted");
    }
    // Email has no budget here; the client cap (4 per address, all accounts
    // and channels) ends it: two SMS and two emails.
    for name in ["sven", "uma"] {
        let res = start_otp(&env.gw, &user(name, None), "email").await;
        assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.text());
    }
    let victor = user("victor", None);
    let res = start_otp(&env.gw, &victor, "email").await;
    assert_eq!(res.status, StatusCode::TOO_MANY_REQUESTS, "{}", res.text());
    assert_eq!(res.json()["error"], "too_many_codes_from_client");
    assert!(
        (3500..=3600).contains(&res.retry_after()),
        "{:?}",
        res.headers
    );
    // A forged X-Forwarded-For from an untrusted peer changes nothing.
    let res = request(
        Method::POST,
        &env.gw.url("/.stepgate/api/otp"),
        &[
            ("authorization", &victor.auth),
            ("content-type", "application/json"),
            ("x-forwarded-for", "203.0.113.77"),
        ],
        Bytes::from_static(br#"{"method":"email"}"#),
    )
    .await;
    assert_eq!(res.status, StatusCode::TOO_MANY_REQUESTS, "{}", res.text());

    let sent = env.sms.wait_for_requests(2, Duration::from_secs(10)).await;
    assert_eq!(sent.len(), 2);
    assert_eq!(env.sms.requests().len(), 2);
    assert!(sent.iter().all(|r| r.json()["to"]
        .as_str()
        .is_some_and(|to| to.starts_with("+1"))));
    let m = get(&env.gw.admin_url("/metrics"), &[]).await.text();
    for line in [
        r#"stepgate_sends_refused_total{channel="sms",reason="sms_country"} 1"#,
        r#"stepgate_sends_refused_total{channel="sms",reason="hourly_budget"} 1"#,
        r#"stepgate_sends_refused_total{channel="email",reason="max_sends_per_client"} 2"#,
        r#"stepgate_audit_events_total{event="refused",mode="proxy"} 4"#,
    ] {
        assert!(m.contains(line), "{line} missing from\n{m}");
    }
}

// Behind a trusted proxy the client is the nearest untrusted address in
// X-Forwarded-For: each forwarded client has its own cap, and a client
// cannot pick its address by sending its own X-Forwarded-For.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_abuse_client_cap_behind_a_trusted_proxy() {
    let otp = format!(
        "{}    max_sends_per_client: 1\n",
        OTP.replace("resend_after: 30s", "resend_after: 0s")
    );
    let env = Env::start_edited(false, &otp, |yaml| {
        yaml.replacen(
            "  header_read_timeout: 2s\n",
            "  header_read_timeout: 2s\n  trusted_proxies: [127.0.0.1/32]\n",
            1,
        )
    })
    .await;
    let send = |name: &'static str, xff: &'static str| {
        let gw = &env.gw;
        async move {
            let u = user(name, None);
            request(
                Method::POST,
                &gw.url("/.stepgate/api/otp"),
                &[
                    ("authorization", &u.auth),
                    ("content-type", "application/json"),
                    ("x-forwarded-for", xff),
                ],
                Bytes::from_static(br#"{"method":"email"}"#),
            )
            .await
            .status
        }
    };
    assert_eq!(send("wade", "198.51.100.1").await, StatusCode::ACCEPTED);
    assert_eq!(send("xena", "198.51.100.2").await, StatusCode::ACCEPTED);
    assert_eq!(
        send("yuri", "198.51.100.1").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // The client's own claim sits left of what the proxy saw: ignored.
    assert_eq!(
        send("zoe", "203.0.113.9, 198.51.100.2").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // IPv6 clients are counted per /64.
    assert_eq!(send("abe", "2001:db8:1:2::1").await, StatusCode::ACCEPTED);
    assert_eq!(
        send("bea", "2001:db8:1:2:ffff::9").await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

// SMTP down: 502, and the failed send costs no cooldown.
async fn delivery_failure_is_502_and_costs_nothing(redis: bool) {
    let mut env = Env::start(redis, OTP).await;
    env.smtp.stop();
    let u = user("olga", None);
    for _ in 0..2 {
        let res = start_otp(&env.gw, &u, "email").await;
        assert_eq!(res.status, StatusCode::BAD_GATEWAY, "{}", res.text());
        assert_eq!(res.json()["error"], "delivery_failed");
    }
    // SMS provider answering 500: 502 as well.
    let failing = HttpSink::start(500).await;
    let yaml = config_yaml(
        &env.up.url(),
        &stepup_yaml(free_port(), &failing.url(), OTP),
        "",
    );
    let gw = TestGateway::start(&yaml).await;
    assert_eq!(
        start_otp(&gw, &u, "sms").await.status,
        StatusCode::BAD_GATEWAY
    );
    let _ = &env.sms;
}

// Two instances share Redis: start on one, verify on the other; a spend on
// one is seen by the other; a restart between send and verify loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_redis_state() {
    let env = Env::start(true, OTP).await;
    let other = env.second_instance().await;
    let u = user("pia", None);
    let (cid, code) = email_challenge(&env, &env.gw, &u, 0).await;
    let res = verify(&other, &u, &cid, &code).await;
    assert_eq!(res.status, StatusCode::OK);
    let token = res.json()["token"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        protected(&env.gw, "/billing/export", &u, &token)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        protected(&other, "/billing/export", &u, &token)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    // Cooldown set through one instance holds on the other.
    assert_eq!(
        start_otp(&other, &u, "sms").await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        start_otp(&env.gw, &u, "sms").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // Restart: send through an instance, stop it, verify on a fresh one.
    let v = user("quinn", None);
    let mut first = env.second_instance().await;
    let res = start_otp(&first, &v, "email").await;
    let cid = res.json()["challenge_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let code = mailed_code(&env.smtp, &v.email, 0).await;
    first.stop().await;
    let fresh = env.second_instance().await;
    assert_eq!(verify(&fresh, &v, &cid, &code).await.status, StatusCode::OK);
}

/// Scheduling slack on top of a documented bound, for a loaded CI machine.
const SLACK: Duration = Duration::from_secs(2);

// Logout on one instance: another instance, which has just served the
// token (and cached that it is not revoked), refuses it within the
// documented bound, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_reaches_every_instance_within_the_bound() {
    let env = Env::start(true, OTP).await;
    let other = env.second_instance().await;
    let u = user("lena", None);
    let token = step_up(&env, &u, 0).await;
    for gw in [&env.gw, &other] {
        assert_eq!(
            protected(gw, "/admin/x", &u, &token).await.status,
            StatusCode::OK
        );
    }
    let hits = env.up.hits();
    let res = request(
        Method::POST,
        &env.gw.url("/.stepgate/api/logout"),
        &[
            ("authorization", &u.auth),
            ("x-second-factor-token", &token),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(res.status, StatusCode::NO_CONTENT);
    let revoked_at = Instant::now();
    // The instance that logged out refuses at once.
    assert_eq!(
        protected(&env.gw, "/admin/x", &u, &token).await.status,
        StatusCode::UNAUTHORIZED
    );
    let deadline = revoked_at + stepgate::store::revocation::MAX_STALENESS + SLACK;
    let mut served_after = 0;
    loop {
        let res = protected(&other, "/admin/x", &u, &token).await;
        if res.status == StatusCode::UNAUTHORIZED {
            assert_eq!(res.json()["error"], "insufficient_user_authentication");
            break;
        }
        assert_eq!(res.status, StatusCode::OK);
        served_after += 1;
        assert!(
            Instant::now() < deadline,
            "the other instance still serves a revoked token"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(env.up.hits(), hits + served_after);
    // And it stays refused.
    assert_eq!(
        protected(&other, "/admin/x", &u, &token).await.status,
        StatusCode::UNAUTHORIZED
    );
}

// Redis dies: step-up answers 503, protected routes are never forwarded,
// public traffic flows, /readyz says not ready; all recover by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_and_recovers() {
    let mut env = Env::start(true, OTP).await;
    let u = user("rita", None);
    let token = step_up(&env, &u, 0).await;
    assert_eq!(
        protected(&env.gw, "/admin/x", &u, &token).await.status,
        StatusCode::OK
    );
    let redis = env.redis.as_mut().expect("redis");
    redis.stop();
    // A revocation answer cached less than a second ago may still be used
    // while the gateway notices (it cannot be stale: nothing can be revoked
    // while Redis is down); after that, protected routes fail closed.
    let deadline = Instant::now() + stepgate::store::revocation::MAX_STALENESS + SLACK;
    let res = loop {
        let res = protected(&env.gw, "/admin/x", &u, &token).await;
        if res.status != StatusCode::OK || Instant::now() > deadline {
            break res;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.json()["error"], "stepup_unavailable");
    let hits = env.up.hits();
    let res = protected(&env.gw, "/admin/x", &u, &token).await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(env.up.hits(), hits, "forwarded while the store was down");
    let res = start_otp(&env.gw, &u, "email").await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        get(&env.gw.url("/assets/a.css"), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&env.gw.admin_url("/readyz"), &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(&env.gw.admin_url("/healthz"), &[]).await.status,
        StatusCode::OK
    );

    env.redis.as_mut().expect("redis").start_again();
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(&env.gw.admin_url("/readyz"), &[]).await.status != StatusCode::OK {
        assert!(Instant::now() < deadline, "never became ready again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        protected(&env.gw, "/admin/x", &u, &token).await.status,
        StatusCode::OK
    );
}

// Logs carry audit events with subject, channel and client, and never a
// code, a token, a cookie value or a full contact, even at debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_carry_secrets() {
    let up = support::upstream::Upstream::start().await;
    let smtp = support::smtp::SmtpServer::start();
    let sms = HttpSink::start(200).await;
    let yaml = config_yaml(
        &up.url(),
        &stepup_yaml(smtp.port(), &sms.url(), OTP),
        "log:\n  format: json\n  level: debug\n",
    );
    let bin = BinaryGateway::start_logged(&yaml).await;
    let base = format!("http://{}", bin.addr);
    let u = user("sara", None);
    let post = |path: &'static str, body: String| {
        let (url, auth) = (format!("{base}{path}"), u.auth.clone());
        async move {
            request(
                Method::POST,
                &url,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                Bytes::from(body),
            )
            .await
        }
    };
    let res = post("/.stepgate/api/otp", r#"{"method":"email"}"#.into()).await;
    assert_eq!(res.status, StatusCode::ACCEPTED);
    let cid = res.json()["challenge_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let code = mailed_code(&smtp, &u.email, 0).await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let _ = post(
        "/.stepgate/api/otp/verify",
        serde_json::json!({"challenge_id": cid, "code": wrong}).to_string(),
    )
    .await;
    let res = post(
        "/.stepgate/api/otp/verify",
        serde_json::json!({"challenge_id": cid, "code": code}).to_string(),
    )
    .await;
    let token = res.json()["token"].as_str().unwrap_or_default().to_string();
    let res = get(
        &format!("{base}/admin/x?secret=q"),
        &[
            ("authorization", &u.auth),
            ("cookie", &format!("stepgate_sf={token}")),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);
    // Wait for the access log line of that last request.
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = std::fs::read_to_string(bin.log_path()).unwrap_or_default();
        if log.contains(r#""path":"/admin/x""#) {
            break log;
        }
        assert!(Instant::now() < deadline, "no access log line:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for ev in [
        "challenge_started",
        "code_sent",
        "verify_failed",
        "verify_ok",
        "token_issued",
    ] {
        assert!(
            log.contains(&format!(r#""event":"{ev}""#)),
            "no {ev} event:\n{log}"
        );
    }
    assert!(log.contains(r#""subject":"sara""#));
    let primary = u.auth.trim_start_matches("Bearer ");
    for secret in [
        code.as_str(),
        token.as_str(),
        primary,
        u.email.as_str(),
        u.phone.as_str(),
        cid.as_str(),
        "secret=q",
    ] {
        assert!(!log.contains(secret), "log contains {secret:?}:\n{log}");
    }
}
