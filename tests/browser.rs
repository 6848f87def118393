//! The challenge page in a real headless Chromium, against the gateway with
//! Redis and a real SMTP server, and the `stepgate demo` flow. Screenshots
//! of each step land in `artifacts/screenshots/<test>/`.

mod support;

use std::time::Duration;

use support::browser::{origin, Browser};
use support::flow::*;
use support::gateway::*;
use support::smtp::extract_code;

/// Sign `u` in: the browser gets the primary token cookie for the gateway.
async fn sign_in(b: &Browser, gw: &TestGateway, u: &User) {
    b.goto(&gw.url("/assets/signin")).await;
    b.set_cookie("access_token", u.auth.trim_start_matches("Bearer "))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The whole browser flow: protected page -> challenge page -> email ->
// code from the received mail -> back on the page with upstream content.
async fn browser_step_up_by_email() {
    let env = Env::start(true, OTP).await;
    let b = Browser::start("email_flow").await;
    let u = user("alice", Some("browser-session"));
    sign_in(&b, &env.gw, &u).await;

    b.goto(&env.gw.url("/admin/panel?tab=users")).await;
    let url = b.wait_for_url(|u| u.contains("/.stepgate/challenge")).await;
    assert!(
        url.ends_with("/.stepgate/challenge?rd=/admin/panel%3Ftab%3Dusers"),
        "{url}"
    );
    assert_eq!(b.title().await, "Verify it's you · stepgate");
    let email_choice = b.find("input[name=channel][value=email]").await;
    assert_eq!(email_choice.attr("checked").await.as_deref(), Some("true"));
    assert!(b.source().await.contains("a***@example.com"));
    b.screenshot("1-choose").await;

    b.find("#send").await.click().await;
    let code_input = b.find("#code").await;
    assert_eq!(
        code_input.attr("inputmode").await.as_deref(),
        Some("numeric")
    );
    assert_eq!(
        code_input.attr("autocomplete").await.as_deref(),
        Some("one-time-code")
    );
    let mail = env
        .smtp
        .wait_for_message(&u.email, Duration::from_secs(10))
        .await;
    let code = extract_code(&mail).expect("code in mail");
    b.screenshot("2-code").await;
    // Pasted with a space, as people do; the page strips it.
    code_input
        .type_text(&format!("{} {}", &code[..3], &code[3..]))
        .await;
    b.screenshot("3-typed").await;
    b.find("#verify").await.click().await;

    let url = b.wait_for_url(|u| !u.contains("/.stepgate/")).await;
    assert!(url.ends_with("/admin/panel?tab=users"), "{url}");
    let page = b.source().await;
    assert!(page.contains(r#""upstream":"echo""#), "{page}");
    assert!(page.contains(r#""x-stepgate-stepup":"email""#), "{page}");
    b.screenshot("4-arrived").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// A wrong code shows the error and the attempts left, tied to the input.
async fn browser_wrong_code_shows_attempts_left() {
    let env = Env::start(false, OTP).await;
    let b = Browser::start("wrong_code").await;
    let u = user("bob", None);
    sign_in(&b, &env.gw, &u).await;
    b.goto(&env.gw.url("/.stepgate/challenge?rd=/admin")).await;
    b.find("#send").await.click().await;
    let input = b.find("#code").await;
    let code = mailed_code(&env.smtp, &u.email, 0).await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    input.type_text(wrong).await;
    b.find("#verify").await.click().await;
    let err = b.find("#code-error").await;
    assert_eq!(
        err.text().await,
        "That code is not right. 2 attempt(s) left."
    );
    let input = b.find("#code").await;
    assert_eq!(input.attr("aria-invalid").await.as_deref(), Some("true"));
    assert_eq!(
        input.attr("aria-describedby").await.as_deref(),
        Some("code-error")
    );
    b.screenshot("wrong-code").await;
    // The page is usable at 320 px: nothing wider than the viewport.
    b.resize(320, 640).await;
    let overflow = b
        .execute("return document.documentElement.scrollWidth > window.innerWidth")
        .await;
    assert_eq!(overflow, serde_json::Value::Bool(false));
    b.screenshot("wrong-code-320px").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Open-redirect attempts fall back to "/", in the page and after verifying.
async fn browser_open_redirects_land_on_root() {
    let env = Env::start(false, OTP).await;
    let b = Browser::start("open_redirect").await;
    let u = user("carl", None);
    sign_in(&b, &env.gw, &u).await;
    for rd in [
        "//evil.example/x",
        "/%5Cevil.example",
        "https://evil.example/",
        "javascript:alert(1)",
        "%2F%2Fevil.example",
        "/\\evil.example",
    ] {
        b.goto(&env.gw.url(&format!("/.stepgate/challenge?rd={rd}")))
            .await;
        let field = b.find("input[name=rd]").await;
        assert_eq!(field.attr("value").await.as_deref(), Some("/"), "rd {rd}");
    }
    b.goto(&env.gw.url("/.stepgate/challenge?rd=//evil.example/x"))
        .await;
    b.find("#send").await.click().await;
    let input = b.find("#code").await;
    input
        .type_text(&mailed_code(&env.smtp, &u.email, 0).await)
        .await;
    b.find("#verify").await.click().await;
    let url = b.wait_for_url(|u| !u.contains("/.stepgate/")).await;
    assert_eq!(url, format!("{}/", origin(env.gw.addr)));
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// A form post without the CSRF token is refused and sends nothing.
async fn browser_form_without_csrf_is_refused() {
    let env = Env::start(false, OTP).await;
    let b = Browser::start("csrf").await;
    let u = user("dora", None);
    sign_in(&b, &env.gw, &u).await;
    b.goto(&env.gw.url("/.stepgate/challenge?rd=/admin")).await;
    b.execute("document.querySelector('input[name=csrf]').remove()")
        .await;
    b.find("#send").await.click().await;
    let err = b.find("#choose-error").await;
    assert_eq!(
        err.text().await,
        "Your session on this page expired. Please try again."
    );
    b.screenshot("csrf-refused").await;
    assert!(
        env.smtp.received().is_empty(),
        "a code was sent without CSRF token"
    );
    // A forged token fails the same way. (The old error is removed first so
    // that finding it again means the new answer has arrived.)
    b.execute(
        "document.getElementById('choose-error').remove();\
         document.querySelector('input[name=csrf]').value = 'deadbeef'",
    )
    .await;
    b.find("#send").await.click().await;
    b.find("#choose-error").await;
    assert!(env.smtp.received().is_empty());
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// `stepgate demo` end to end: sign in on the dev page, hit /admin, get the
// code from the dev codes page, verify, land on admin; a form post made
// without a fresh factor is replayed after verification.
async fn browser_demo_flow() {
    let running = stepgate::demo::start("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("demo starts");
    let base = origin(running.addr);
    let b = Browser::start("demo").await;
    b.goto(&format!("{base}/admin")).await;
    b.wait_for_url(|u| u.contains("/login?rd=/admin")).await;
    b.screenshot("1-signin").await;
    b.find("#signin").await.click().await;
    let challenge = b.wait_for_url(|u| u.contains("/.stepgate/challenge")).await;
    b.find("#send").await.click().await;
    let code_page = b.wait_for_url(|u| u.contains("cid=")).await;
    assert!(
        challenge.ends_with("/.stepgate/challenge?rd=/admin"),
        "{challenge}"
    );
    assert!(
        code_page.contains("/.stepgate/challenge?rd=/admin&cid="),
        "{code_page}"
    );
    b.goto(&format!("{base}/dev/codes")).await;
    let code = b.find("#email-code").await.text().await;
    assert_eq!(code.len(), 6, "{code}");
    b.screenshot("2-dev-codes").await;
    b.goto(&code_page).await;
    b.find("#code").await.type_text(&code).await;
    b.find("#verify").await.click().await;
    b.wait_for_url(|u| u == format!("{base}/admin")).await;
    let ok = b.find("#admin-ok").await.text().await;
    assert!(ok.contains("You verified by email"), "{ok}");
    b.screenshot("3-admin").await;

    // Sign in again (a new session: the old factor no longer applies), then
    // post the admin form straight away: the post is stashed, the challenge
    // runs, and the post is replayed with what was typed.
    b.goto(&format!("{base}/logout")).await;
    b.goto(&format!("{base}/login?rd=/")).await;
    b.find("#signin").await.click().await;
    b.wait_for_url(|u| u == format!("{base}/")).await;
    b.execute(
        "var f = document.createElement('form'); f.method = 'post'; f.action = '/admin/settings';\
         var i = document.createElement('input'); i.name = 'motd'; i.value = 'kept across step-up'; f.appendChild(i);\
         document.body.appendChild(f); f.submit();",
    )
    .await;
    let url = b.wait_for_url(|u| u.contains("/.stepgate/challenge")).await;
    assert!(url.contains("stash="), "{url}");
    // Email is still in its resend cooldown; the text message is not.
    b.find("input[name=channel][value=sms]").await.click().await;
    b.find("#send").await.click().await;
    b.wait_for_url(|u| u.contains("cid=")).await;
    let code = running
        .gateway
        .console()
        .and_then(|c| c.last_code("+15550100123"))
        .expect("console code");
    b.find("#code").await.type_text(&code).await;
    b.find("#verify").await.click().await;
    let saved = b.find("#saved").await.text().await;
    assert_eq!(saved, "Saved message of the day: kept across step-up");
    b.screenshot("4-replayed").await;
    b.close().await;
    running.shutdown().await.expect("demo stops");
}
