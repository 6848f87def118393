//! Primary identity from a real OpenID provider (oidc-provider on Node.js,
//! see tests/support/oidc.rs): keys by JWKS URL and by discovery, rotation
//! while running, the provider down at start and after a good fetch.

mod support;

use serde_json::json;
use support::assertion::{private_key, served_jwks, verify_assertion, verify_with};
use support::eventually;
use support::gateway::{config_problems, get, metric, wait_ready, TestGateway, TestResponse};
use support::oidc::{gateway_yaml as yaml, signed_in, user, OidcProvider, AUDIENCE};
use support::upstream::Upstream;

async fn get_as(gw: &TestGateway, path: &str, token: &str) -> TestResponse {
    get(
        &gw.url(path),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
}

/// `token` with its header's `kid` replaced (signature left as is): what a
/// forger or a provider with a key we never saw would send.
fn with_kid(token: &str, kid: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let mut parts = token.splitn(2, '.');
    let (_, rest) = (parts.next(), parts.next().expect("a JWT"));
    let header = json!({"alg": "RS256", "typ": "at+jwt", "kid": kid});
    format!("{}.{rest}", URL_SAFE_NO_PAD.encode(header.to_string()))
}

#[tokio::test]
// The convenient form: `issuer` alone finds the keys by OpenID discovery,
// and a real provider's RS256 access token (typ at+jwt) is accepted.
async fn discovery_from_issuer_accepts_real_tokens() {
    let idp = OidcProvider::start();
    let up = Upstream::start().await;
    let gw = TestGateway::start(&yaml(&up, &format!("    issuer: {}", idp.issuer()))).await;
    wait_ready(&gw).await;

    let token = idp.token(AUDIENCE, &user("alice")).await;
    let res = get_as(&gw, "/account/me", &token).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(
        res.upstream_header("x-stepgate-user").as_deref(),
        Some("alice")
    );
    assert_eq!(
        res.upstream_header("x-stepgate-email").as_deref(),
        Some("alice@example.com")
    );
    // The provider's token for another audience is refused.
    let other = idp.token("https://other.test", &user("alice")).await;
    assert_eq!(get_as(&gw, "/account/me", &other).await.status, 401);
    assert!(metric(&gw, "stepgate_jwks_fetches_total{result=\"ok\"}").await >= 1.0);
    let age = metric(&gw, "stepgate_jwks_age_seconds").await;
    assert!((0.0..60.0).contains(&age), "key-set age {age}");
}

#[tokio::test]
// The provider rotates its signing key while the gateway runs: a token
// signed with the new key is accepted at once (unknown kid -> one refetch),
// and tokens signed with the old, still published, key keep working.
async fn rotation_at_the_provider_needs_no_restart() {
    let idp = OidcProvider::start();
    let up = Upstream::start().await;
    let jwt = format!(
        "    jwks_url: {}\n    issuer: {}",
        idp.jwks_url(),
        idp.issuer()
    );
    let gw = TestGateway::start(&yaml(&up, &jwt)).await;
    wait_ready(&gw).await;
    let old = idp.token(AUDIENCE, &user("alice")).await;
    assert_eq!(get_as(&gw, "/account/me", &old).await.status, 200);
    let fetches = idp.jwks_requests().await;

    let new_kid = idp.rotate(true).await;
    let new = idp.token(AUDIENCE, &user("bob")).await;
    assert!(new.len() > 20 && new_kid.len() > 4);
    let res = get_as(&gw, "/account/me", &new).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(
        res.upstream_header("x-stepgate-user").as_deref(),
        Some("bob")
    );
    assert_eq!(idp.jwks_requests().await, fetches + 1, "one refetch");
    assert_eq!(get_as(&gw, "/account/me", &old).await.status, 200);
}

#[tokio::test]
// A key withdrawn at the provider stops verifying tokens after the next
// background refresh, which follows the JWKS Cache-Control max-age (here
// 1s) without any token asking for it.
async fn withdrawn_key_is_dropped_by_the_background_refresh() {
    let idp = OidcProvider::start();
    idp.set_jwks_max_age(Some(1)).await;
    let up = Upstream::start().await;
    let jwt = format!("    jwks_url: {}\n    jwks_min_refresh: 1s", idp.jwks_url());
    let gw = TestGateway::start(&yaml(&up, &jwt)).await;
    wait_ready(&gw).await;
    let old = idp.token(AUDIENCE, &user("alice")).await;
    assert_eq!(get_as(&gw, "/account/me", &old).await.status, 200);

    idp.rotate(false).await;
    let before = idp.jwks_requests().await;
    eventually("a background refresh", || async {
        idp.jwks_requests().await > before
    })
    .await;
    eventually("the old key to be refused", || async {
        get_as(&gw, "/account/me", &old).await.status == 401
    })
    .await;
    let new = idp.token(AUDIENCE, &user("alice")).await;
    assert_eq!(get_as(&gw, "/account/me", &new).await.status, 200);
}

#[tokio::test]
// A flood of tokens naming kids the provider never published costs the
// provider at most one extra fetch per jwks_min_refresh (default 30s).
async fn unknown_kids_are_refetched_rate_limited() {
    let idp = OidcProvider::start();
    let up = Upstream::start().await;
    let gw = TestGateway::start(&yaml(&up, &format!("    jwks_url: {}", idp.jwks_url()))).await;
    wait_ready(&gw).await;
    let fetches = idp.jwks_requests().await;
    let token = idp.token(AUDIENCE, &user("mallory")).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (url, bogus) = (
            gw.url("/account/me"),
            with_kid(&token, &format!("bogus-{i}")),
        );
        tasks.push(tokio::spawn(async move {
            get(&url, &[("authorization", &format!("Bearer {bogus}"))])
                .await
                .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("request task"), 401);
    }
    let extra = idp.jwks_requests().await - fetches;
    assert!(extra <= 1, "{extra} fetches for 40 bogus kids");
    // The real token still passes.
    assert_eq!(get_as(&gw, "/account/me", &token).await.status, 200);
}

#[tokio::test]
// The provider is down when the gateway starts: fail closed (503, /readyz
// 503) where an identity is needed, public routes flow; once the provider
// is up the keys arrive without a restart.
async fn provider_down_at_start_fails_closed_until_keys_arrive() {
    let mut idp = OidcProvider::stopped(None);
    let up = Upstream::start().await;
    let gw = TestGateway::start(&yaml(&up, &format!("    issuer: {}", idp.issuer()))).await;

    let ready = get(&gw.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 503);
    assert!(
        ready.text().contains("identity provider"),
        "{}",
        ready.text()
    );
    let res = get(&gw.url("/account/me"), &[("authorization", "Bearer a.b.c")]).await;
    assert_eq!(res.status, 503);
    assert_eq!(res.json()["error"], "identity_unavailable");
    assert_eq!(get(&gw.url("/account/me"), &[]).await.status, 503);
    assert_eq!(get(&gw.url("/admin/x"), &[]).await.status, 503);
    assert_eq!(
        get(&gw.url("/.stepgate/api/methods"), &[]).await.status,
        503
    );
    assert_eq!(get(&gw.url("/assets/app.css"), &[]).await.status, 200);
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    eventually("a failed fetch", || async {
        metric(&gw, "stepgate_jwks_fetches_total{result=\"error\"}").await >= 1.0
    })
    .await;
    assert_eq!(metric(&gw, "stepgate_jwks_age_seconds").await, -1.0);

    idp.start_again();
    wait_ready(&gw).await;
    let token = idp.token(AUDIENCE, &user("alice")).await;
    assert_eq!(get_as(&gw, "/account/me", &token).await.status, 200);
}

#[tokio::test]
// The provider goes down after a good fetch: the last good set is kept
// (tokens verify, /readyz stays 200) while fetches fail; when it is back
// with a new key, tokens signed with that key are accepted.
async fn provider_down_after_a_good_fetch_keeps_the_last_set() {
    let mut idp = OidcProvider::start();
    let up = Upstream::start().await;
    let jwt = format!("    issuer: {}\n    jwks_min_refresh: 1s", idp.issuer());
    let gw = TestGateway::start(&yaml(&up, &jwt)).await;
    wait_ready(&gw).await;
    let token = idp.token(AUDIENCE, &user("alice")).await;
    assert_eq!(get_as(&gw, "/account/me", &token).await.status, 200);

    idp.stop();
    // An unknown kid makes the gateway try the (down) provider.
    let bogus = with_kid(&token, "not-published");
    eventually("a failed fetch", || async {
        let _ = get_as(&gw, "/account/me", &bogus).await;
        metric(&gw, "stepgate_jwks_fetches_total{result=\"error\"}").await >= 1.0
    })
    .await;
    assert_eq!(get_as(&gw, "/account/me", &token).await.status, 200);
    assert_eq!(get(&gw.admin_url("/readyz"), &[]).await.status, 200);

    idp.start_again();
    idp.rotate(false).await;
    let new = idp.token(AUDIENCE, &user("bob")).await;
    eventually("the new key to be fetched", || async {
        get_as(&gw, "/account/me", &new).await.status == 200
    })
    .await;
}

#[tokio::test]
// Keys over TLS: an https provider with a private CA is trusted through
// identity.jwt.ca_file, and not without it (system roots only).
async fn https_provider_needs_its_ca() {
    let certs = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/certs/gen-dev-cert.sh"
    ))
    .arg(certs.path())
    .output()
    .expect("gen-dev-cert.sh runs");
    assert!(out.status.success());
    let (cert, key, ca) = (
        certs.path().join("server.crt"),
        certs.path().join("server.key"),
        certs.path().join("ca.crt"),
    );
    let idp = OidcProvider::start_tls(&cert, &key, &ca);
    let up = Upstream::start().await;

    let without = TestGateway::start(&yaml(&up, &format!("    issuer: {}", idp.issuer()))).await;
    eventually("a failed TLS fetch", || async {
        metric(&without, "stepgate_jwks_fetches_total{result=\"error\"}").await >= 1.0
    })
    .await;
    assert_eq!(get(&without.admin_url("/readyz"), &[]).await.status, 503);

    let jwt = format!(
        "    issuer: {}\n    ca_file: {}",
        idp.issuer(),
        ca.display()
    );
    let gw = TestGateway::start(&yaml(&up, &jwt)).await;
    wait_ready(&gw).await;
    let token = idp.token(AUDIENCE, &user("alice")).await;
    assert_eq!(get_as(&gw, "/account/me", &token).await.status, 200);
}

#[tokio::test]
// A policy reload keeps the fetched keys: no refetch, never unready.
async fn reload_keeps_the_fetched_keys() {
    let idp = OidcProvider::start();
    let up = Upstream::start().await;
    let text = yaml(&up, &format!("    jwks_url: {}", idp.jwks_url()));
    let gw = TestGateway::start(&text).await;
    wait_ready(&gw).await;
    let fetches = idp.jwks_requests().await;
    let running = gw.running.as_ref().expect("running");
    running
        .gateway
        .reload(support::gateway::load(&text))
        .expect("reload");
    assert_eq!(get(&gw.admin_url("/readyz"), &[]).await.status, 200);
    let token = idp.token(AUDIENCE, &user("alice")).await;
    assert_eq!(get_as(&gw, "/account/me", &token).await.status, 200);
    assert_eq!(idp.jwks_requests().await, fetches);
}

#[test]
// Config mistakes around provider keys are reported with their location.
fn provider_key_config_errors() {
    let check = |jwt: &str| -> String {
        let text = format!(
            "upstream: {{ url: http://127.0.0.1:1 }}\nstepup:\n  token: {{ signing_key: test-stepup-signing-key-0123456789abcdef }}\nidentity:\n  jwt:\n{jwt}\n"
        );
        config_problems(&text)
    };
    assert_eq!(check("    issuer: https://idp.example.com"), "");
    assert_eq!(check("    jwks_url: https://idp.example.com/jwks"), "");
    let e = check("    jwks_url: http://idp.example.com/jwks");
    assert!(e.contains("g.yaml:6:") && e.contains("https"), "{e}");
    let e = check("    jwks_url: https://idp.example.com/jwks\n    algorithms: [HS256]");
    assert!(e.contains("HS algorithms"), "{e}");
    let e = check(
        "    secret: 0123456789abcdef0123456789abcdef\n    algorithms: [HS256]\n    ca_file: x.pem",
    );
    assert!(
        e.contains("identity.jwt.ca_file") || e.contains("applies only"),
        "{e}"
    );
    let e = check("    jwks_url: https://idp.example.com/jwks\n    public_key: k.pem");
    assert!(e.contains("exactly one"), "{e}");
    let e = check(
        "    jwks_url: https://idp.example.com/jwks\n    jwks_min_refresh: 10m\n    jwks_max_refresh: 5m",
    );
    assert!(e.contains("jwks_max_refresh"), "{e}");
    // Neither keys nor an issuer.
    let e = check("    audience: x");
    assert!(e.contains("issuer alone"), "{e}");
}

fn now() -> u64 {
    stepgate::token::unix_now()
}

#[tokio::test]
// CONTRACT 5.3: a fresh MFA at the identity provider (amr or acr listed by
// the rule, auth_time within max_age) satisfies a step-up rule without a
// code; the app is told `X-Stepgate-Stepup: idp`. Anything less gets the
// RFC 9470 challenge naming the acr values.
async fn a_fresh_mfa_at_the_provider_satisfies_idp_rules() {
    let idp = OidcProvider::start();
    let up = Upstream::start().await;
    let gw = TestGateway::start(&yaml(&up, &format!("    issuer: {}", idp.issuer()))).await;
    wait_ready(&gw).await;
    let t = now();

    // amr contains a listed value (Auth0-style ["pwd", "mfa"]).
    let mfa = idp
        .token(AUDIENCE, &signed_in("alice", &["pwd", "mfa"], None, t - 10))
        .await;
    let res = get_as(&gw, "/payroll/run", &mfa).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(
        res.upstream_header("x-stepgate-stepup").as_deref(),
        Some("idp")
    );
    let age: u64 = res
        .upstream_header("x-stepgate-stepup-age")
        .and_then(|a| a.parse().ok())
        .expect("age header");
    assert!((10..=15).contains(&age), "age {age}");

    // acr is a listed value (Keycloak LoA-style), amr says nothing.
    let loa2 = idp
        .token(
            AUDIENCE,
            &signed_in("bob", &[], Some("urn:example:loa:2"), t),
        )
        .await;
    assert_eq!(get_as(&gw, "/payroll/run", &loa2).await.status, 200);

    // Refused: password only; a listed amr but too old; a future auth_time;
    // a listed acr spelled differently; no auth_time at all.
    let refused = [
        signed_in("carol", &["pwd"], Some("urn:example:loa:1"), t),
        signed_in("dave", &["mfa"], None, t - 301),
        signed_in("erin", &["mfa"], None, t + 3600),
        signed_in("frank", &["pwd"], Some("URN:EXAMPLE:LOA:2"), t),
        json!({"sub": "gina", "amr": ["mfa"], "sid": "s-gina"}),
    ];
    for claims in refused {
        let token = idp.token(AUDIENCE, &claims).await;
        let res = get_as(&gw, "/payroll/run", &token).await;
        assert_eq!(res.status, 401, "{claims}: {}", res.text());
        let www = res.header("www-authenticate").unwrap_or_default();
        assert!(
            www.contains("error=\"insufficient_user_authentication\"")
                && www.contains("acr_values=\"urn:example:loa:2\"")
                && www.contains("max_age=300"),
            "{www}"
        );
        assert_eq!(res.json()["acr_values"], "urn:example:loa:2");
    }

    // A rule without `idp` never takes the provider's MFA.
    let res = get_as(&gw, "/admin/x", &mfa).await;
    assert_eq!(res.status, 401);
    let www = res.header("www-authenticate").unwrap_or_default();
    assert!(!www.contains("acr_values"), "{www}");
    // A client cannot claim the provider's MFA by header.
    let res = get(
        &gw.url("/account/me"),
        &[
            ("authorization", &format!("Bearer {mfa}")),
            ("x-stepgate-stepup", "idp"),
        ],
    )
    .await;
    assert_eq!(res.status, 200);
    assert_eq!(res.upstream_header("x-stepgate-stepup"), None);
}

#[tokio::test]
// On a one_time rule each sign-in at the provider admits one request;
// the next needs a new sign-in (or a code from the gateway).
async fn one_time_idp_rules_spend_the_sign_in() {
    let idp = OidcProvider::start();
    let up = Upstream::start().await;
    let gw = TestGateway::start(&yaml(&up, &format!("    issuer: {}", idp.issuer()))).await;
    wait_ready(&gw).await;
    let t = now();
    let first = idp
        .token(AUDIENCE, &signed_in("alice", &["mfa"], None, t - 5))
        .await;
    assert_eq!(get_as(&gw, "/export/all", &first).await.status, 200);
    assert_eq!(get_as(&gw, "/export/all", &first).await.status, 401);
    // A new token from the same sign-in is the same sign-in: still spent.
    let same = idp
        .token(AUDIENCE, &signed_in("alice", &["mfa"], None, t - 5))
        .await;
    assert_eq!(get_as(&gw, "/export/all", &same).await.status, 401);
    let again = idp
        .token(AUDIENCE, &signed_in("alice", &["mfa"], None, t - 1))
        .await;
    assert_eq!(get_as(&gw, "/export/all", &again).await.status, 200);
}

#[test]
// `stepup.idp` needs something to match, and acr values must fit the
// RFC 9470 challenge.
fn idp_rule_config_errors() {
    let check = |stepup: &str| -> String {
        let text = format!(
            "upstream: {{ url: http://127.0.0.1:1 }}\nstepup:\n  token: {{ signing_key: test-stepup-signing-key-0123456789abcdef }}\nidentity:\n  jwt: {{ issuer: https://idp.example.com }}\nroutes:\n  - path: /x\n    stepup: {stepup}\n"
        );
        config_problems(&text)
    };
    assert_eq!(check("{ max_age: 5m, idp: { amr: [mfa] } }"), "");
    let e = check("{ max_age: 5m, idp: {} }");
    assert!(
        e.contains("g.yaml:8:") && e.contains("amr and/or acr"),
        "{e}"
    );
    let e = check("{ max_age: 5m, idp: { acr: [\"a b\"] } }");
    assert!(e.contains("acr values cannot contain"), "{e}");
    let e = check("{ max_age: 5m, idp: { amr: [mfa], extra: 1 } }");
    assert!(e.contains("extra"), "{e}");
}

#[tokio::test]
// CONTRACT 5.4: with upstream.assertion, every forwarded request with an
// identity carries a JWT signed with the configured Ed25519 (EdDSA) or
// P-256 (ES256) key, verifiable with the JWKS on the admin listener;
// claims name the user and, after a second factor, how and when and for
// which rule. A client-sent copy never reaches the app.
async fn signed_assertion_verifies_with_the_served_jwks() {
    let idp = OidcProvider::start();
    let up = Upstream::start().await;
    let keys = tempfile::tempdir().expect("tempdir");
    for (kind, header, alg) in [
        ("ed25519", "x-stepgate-assertion", "EdDSA"),
        ("p256", "x-app-assertion", "ES256"),
    ] {
        let key = private_key(keys.path(), kind);
        let text = yaml(&up, &format!("    issuer: {}", idp.issuer())).replace(
            "timeout: 5s }",
            &format!(
                "timeout: 5s, assertion: {{ signing_key_file: {}, header: {header}, audience: payroll, lifetime: 60s }} }}",
                key.display()
            ),
        );
        let gw = TestGateway::start(&text).await;
        wait_ready(&gw).await;
        let t = now();
        let mfa = idp
            .token(
                AUDIENCE,
                &signed_in("alice", &["pwd", "mfa"], Some("urn:example:loa:2"), t - 10),
            )
            .await;

        // After the provider's MFA on a step-up rule.
        let res = get(
            &gw.url("/payroll/run"),
            &[
                ("authorization", &format!("Bearer {mfa}")),
                (header, "forged"),
            ],
        )
        .await;
        assert_eq!(res.status, 200, "{}", res.text());
        let token = res.upstream_header(header).expect("assertion header");
        assert_ne!(token, "forged");
        assert_eq!(
            format!(
                "{:?}",
                jsonwebtoken::decode_header(&token).expect("header").alg
            ),
            alg
        );
        let c = verify_assertion(&gw, &token, "payroll").await;
        assert_eq!(c["iss"], "stepgate");
        assert_eq!(c["aud"], "payroll");
        assert_eq!(c["sub"], "alice");
        assert_eq!(c["email"], "alice@example.com");
        assert_eq!(c["amr"], json!(["pwd", "mfa"]));
        assert_eq!(c["acr"], "urn:example:loa:2");
        assert_eq!(c["auth_time"], json!(t - 10));
        assert_eq!(c["rule"], "payroll");
        assert_eq!(
            c["exp"].as_u64().unwrap_or(0) - c["iat"].as_u64().unwrap_or(0),
            60
        );
        assert!(c["jti"].as_str().is_some_and(|j| j.len() >= 16));

        // Identity only: who, no factor claims.
        let res = get_as(&gw, "/account/me", &mfa).await;
        let c = verify_assertion(
            &gw,
            &res.upstream_header(header).expect("assertion"),
            "payroll",
        )
        .await;
        assert_eq!(c["sub"], "alice");
        for absent in ["amr", "auth_time", "rule", "acr"] {
            assert!(c.get(absent).is_none(), "{absent} without a factor: {c}");
        }
        // Another app's audience does not verify.
        let res = get_as(&gw, "/account/me", &mfa).await;
        let token = res.upstream_header(header).expect("assertion");
        let set = served_jwks(&gw).await;
        assert!(verify_with(&set, &token, "payroll").is_ok());
        assert!(verify_with(&set, &token, "another-app").is_err());

        // After a code from stepgate: amr ["otp", "email"] and the rule.
        let bearer = format!("Bearer {mfa}");
        let auth = [
            ("authorization", bearer.as_str()),
            ("content-type", "application/json"),
        ];
        let started = support::gateway::request(
            http::Method::POST,
            &gw.url("/.stepgate/api/otp"),
            &auth,
            json!({"method": "email"}).to_string(),
        )
        .await;
        assert_eq!(started.status, 202, "{}", started.text());
        let code = gw
            .running
            .as_ref()
            .and_then(|r| r.gateway.console())
            .and_then(|c| c.last_code("alice@example.com"))
            .expect("the console got a code");
        let verified = support::gateway::request(
            http::Method::POST,
            &gw.url("/.stepgate/api/otp/verify"),
            &auth,
            json!({"challenge_id": started.json()["challenge_id"], "code": code}).to_string(),
        )
        .await;
        assert_eq!(verified.status, 200, "{}", verified.text());
        let sf = verified.json()["token"]
            .as_str()
            .expect("token")
            .to_string();
        let res = get(
            &gw.url("/admin/users"),
            &[("authorization", &bearer), ("x-second-factor-token", &sf)],
        )
        .await;
        assert_eq!(res.status, 200, "{}", res.text());
        let c = verify_assertion(
            &gw,
            &res.upstream_header(header).expect("assertion"),
            "payroll",
        )
        .await;
        assert_eq!(c["amr"], json!(["otp", "email"]));
        assert_eq!(c["rule"], "admin");
        assert!(c["auth_time"].as_u64().is_some_and(|a| a >= t));

        // No identity: no assertion, and the client's copy is removed.
        let res = get(&gw.url("/assets/app.css"), &[(header, "forged")]).await;
        assert_eq!(res.status, 200);
        assert_eq!(res.upstream_header(header), None);
    }
}

#[tokio::test]
// Without upstream.assertion there is no key set to serve, and bad
// assertion settings are config errors.
async fn assertion_config() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&yaml(&up, "    jwks_url: https://idp.example.com/jwks")).await;
    assert_eq!(get(&gw.admin_url("/jwks.json"), &[]).await.status, 404);

    let keys = tempfile::tempdir().expect("tempdir");
    let rsa = private_key(keys.path(), "rsa");
    let check = |assertion: String| -> String {
        let text = format!(
            "upstream: {{ url: http://127.0.0.1:1, assertion: {assertion} }}\nstepup:\n  token: {{ signing_key: test-stepup-signing-key-0123456789abcdef }}\n"
        );
        config_problems(&text)
    };
    let ed = private_key(keys.path(), "ed25519");
    assert_eq!(
        check(format!(
            "{{ signing_key_file: {}, audience: a }}",
            ed.display()
        )),
        ""
    );
    let e = check(format!(
        "{{ signing_key_file: {}, audience: a }}",
        rsa.display()
    ));
    assert!(e.contains("Ed25519 or P-256"), "{e}");
    let e = check(format!("{{ signing_key_file: {} }}", ed.display()));
    assert!(e.contains("upstream.assertion.audience"), "{e}");
    let e = check(format!(
        "{{ signing_key_file: {}, audience: a, header: Authorization }}",
        ed.display()
    ));
    assert!(e.contains("used for something else"), "{e}");
    let e = check(format!(
        "{{ signing_key_file: {}, audience: a, lifetime: 2h }}",
        ed.display()
    ));
    assert!(e.contains("1s..=1h"), "{e}");
}

#[test]
// `stepgate check` names where the keys come from and the assertion, and
// `explain` says a rule takes the provider's MFA.
fn check_and_explain_show_provider_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = private_key(dir.path(), "ed25519");
    let file = dir.path().join("gateway.yaml");
    let text = format!(
        "upstream: {{ url: http://127.0.0.1:3000, assertion: {{ signing_key_file: {}, audience: payroll }} }}\nidentity:\n  jwt: {{ issuer: https://idp.example.com/ }}\nstepup:\n  token: {{ signing_key: test-stepup-signing-key-0123456789abcdef }}\nroutes:\n  - name: payroll\n    path: /payroll/**\n    stepup: {{ max_age: 5m, idp: {{ amr: [mfa], acr: [gold] }} }}\n",
        key.display()
    );
    std::fs::write(&file, text).expect("write config");
    let f = file.to_str().expect("utf-8 path");
    let (code, out, err) = support::gateway::run_cli(&["check", "-c", f], None, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("keys discovered from https://idp.example.com/"),
        "{out}"
    );
    assert!(
        out.contains("signed assertion in x-stepgate-assertion for payroll"),
        "{out}"
    );
    let (code, out, err) =
        support::gateway::run_cli(&["explain", "-c", f, "GET", "/payroll/x"], None, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("or the identity provider's amr mfa or acr gold"),
        "{out}"
    );
}

#[tokio::test]
// A reload that changes only the refresh bounds keeps serving the keys
// already fetched, even while the provider is unreachable.
async fn reload_with_new_bounds_keeps_serving_the_keys() {
    let mut idp = OidcProvider::start();
    let up = Upstream::start().await;
    let text = yaml(&up, &format!("    jwks_url: {}", idp.jwks_url()));
    let gw = TestGateway::start(&text).await;
    wait_ready(&gw).await;
    let token = idp.token(AUDIENCE, &user("alice")).await;
    idp.stop();
    let changed = text.replace(
        "    audience:",
        "    jwks_min_refresh: 5s\n    jwks_max_refresh: 10m\n    audience:",
    );
    assert_ne!(changed, text);
    let running = gw.running.as_ref().expect("running");
    running
        .gateway
        .reload(support::gateway::load(&changed))
        .expect("reload");
    assert_eq!(get(&gw.admin_url("/readyz"), &[]).await.status, 200);
    assert_eq!(get_as(&gw, "/account/me", &token).await.status, 200);
}

#[tokio::test]
// A browser on a rule only the identity provider can satisfy (stepup.idp,
// no channel configured among its factors) is sent to identity.login_url
// to sign in again, with the rule's RFC 9470 acr_values and max_age, not
// to a challenge page that has no code to send. Rules with a channel
// still get the challenge page; API clients still get the 401; forward-
// auth answers the same way (nginx style: in X-Stepgate-Redirect).
// Without login_url the browser gets the 401 page.
async fn browsers_on_idp_only_rules_sign_in_again_at_the_provider() {
    let idp = OidcProvider::start();
    let up = Upstream::start().await;
    let text = yaml(&up, &format!("    issuer: {}", idp.issuer()))
        .replacen(
            "listen: { address: 127.0.0.1:0 }",
            "listen: { address: 127.0.0.1:0, trusted_proxies: [127.0.0.1/32] }",
            1,
        )
        .replacen(
            "    leeway: 0s\n",
            "    leeway: 0s\n  login_url: https://app.test/login?from=stepgate\n",
            1,
        )
        .replacen(
            "  console: true\n",
            "  email:\n    smtp: { host: 127.0.0.1, port: 9, security: none }\n    from: \"Security <no-reply@example.com>\"\n",
            1,
        )
        .replacen("{ max_age: 5m, idp:", "{ max_age: 5m, factors: [sms], idp:", 1)
        .replacen(
            "{ max_age: 5m, one_time: true, idp:",
            "{ max_age: 5m, factors: [sms], one_time: true, idp:",
            1,
        );
    assert_eq!(text.matches("factors: [sms]").count(), 2, "{text}");
    let gw = TestGateway::start(&text).await;
    wait_ready(&gw).await;
    let t = now();
    let plain = format!(
        "Bearer {}",
        idp.token(AUDIENCE, &signed_in("alice", &["pwd"], None, t))
            .await
    );
    let browser = [("authorization", plain.as_str()), ("accept", "text/html")];
    let login = "https://app.test/login?from=stepgate&rd=/payroll/run%3Fmonth%3D11%26x%3Da%2526b&acr_values=urn%3Aexample%3Aloa%3A2&max_age=300";

    let res = get(&gw.url("/payroll/run?month=11&x=a%26b"), &browser).await;
    assert_eq!(res.status, 302, "{}", res.text());
    assert_eq!(res.header("location"), Some(login));
    // Without acr values: max_age only.
    let res = get(&gw.url("/export/all"), &browser).await;
    assert_eq!(res.status, 302);
    assert_eq!(
        res.header("location"),
        Some("https://app.test/login?from=stepgate&rd=/export/all&max_age=300")
    );
    // A browser form post: 303 to the same place.
    let res = support::gateway::request(
        http::Method::POST,
        &gw.url("/payroll/run?month=11&x=a%26b"),
        &[
            ("authorization", plain.as_str()),
            ("accept", "text/html"),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        "amount=1",
    )
    .await;
    assert_eq!(res.status, 303);
    assert_eq!(res.header("location"), Some(login));
    // A rule with a channel: the challenge page, as before.
    let res = get(&gw.url("/admin/x"), &browser).await;
    assert_eq!(res.status, 302);
    assert_eq!(
        res.header("location"),
        Some("/.stepgate/challenge?rd=/admin/x")
    );
    // An API client: the RFC 9470 401, nothing forwarded.
    let res = get_as(&gw, "/payroll/run", plain.trim_start_matches("Bearer ")).await;
    assert_eq!(res.status, 401);
    assert!(res
        .header("www-authenticate")
        .is_some_and(|w| w.contains("acr_values=\"urn:example:loa:2\"")));
    assert_eq!(up.hits(), 0);
    // After signing in again with MFA: through.
    let mfa = idp
        .token(AUDIENCE, &signed_in("alice", &["mfa"], None, now()))
        .await;
    let res = get(
        &gw.url("/payroll/run"),
        &[
            ("authorization", &format!("Bearer {mfa}")),
            ("accept", "text/html"),
        ],
    )
    .await;
    assert_eq!(res.status, 200, "{}", res.text());

    // Forward-auth: Traefik style redirects, nginx style names the target.
    let auth = gw.url("/.stepgate/auth");
    let res = get(
        &auth,
        &[
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/payroll/run?month=11&x=a%26b"),
            ("authorization", plain.as_str()),
            ("accept", "text/html"),
        ],
    )
    .await;
    assert_eq!(res.status, 302);
    assert_eq!(res.header("location"), Some(login));
    let nginx = |accept: &'static str| {
        [
            ("x-original-method", "GET"),
            (
                "x-original-url",
                "https://app.test/payroll/run?month=11&x=a%26b",
            ),
            ("authorization", plain.as_str()),
            ("accept", accept),
        ]
    };
    let res = get(&auth, &nginx("text/html")).await;
    assert_eq!(res.status, 401);
    assert_eq!(res.header("x-stepgate-redirect"), Some(login));
    let res = get(&auth, &nginx("application/json")).await;
    assert_eq!(res.status, 401);
    assert_eq!(res.header("x-stepgate-redirect"), None);

    // Without login_url: the 401 page (there is no code to ask for).
    let without = text.replacen("  login_url: https://app.test/login?from=stepgate\n", "", 1);
    assert_ne!(without, text);
    gw.running
        .as_ref()
        .expect("running")
        .gateway
        .reload(support::gateway::load(&without))
        .expect("reload");
    let res = get(&gw.url("/payroll/run"), &browser).await;
    assert_eq!(res.status, 401);
    assert!(res
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/html")));
    let res = get(&auth, &nginx("text/html")).await;
    assert_eq!(res.status, 401);
    assert_eq!(res.header("x-stepgate-redirect"), None);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
// Assertion key rotation: after a reload with a new key, /jwks.json
// publishes the new key first and keeps the previous one, so an app that
// fetches the set after the change still verifies assertions signed
// before it (the previous key goes once they have all expired; see the
// unit test in src/assertion.rs). A reload with the same key changes
// nothing.
async fn assertion_key_rotation_keeps_the_previous_key_published() {
    use support::gateway::{config_yaml, load, primary_token, CONSOLE};
    let up = Upstream::start().await;
    let keys = tempfile::tempdir().expect("tempdir");
    let config = |key: &std::path::Path| {
        config_yaml(&up.url(), CONSOLE, "").replacen(
            "  timeout: 2s\n",
            &format!(
                "  timeout: 2s\n  assertion: {{ signing_key_file: {}, audience: payroll }}\n",
                key.display()
            ),
            1,
        )
    };
    let (old_key, new_key) = (
        private_key(keys.path(), "ed25519"),
        private_key(keys.path(), "p256"),
    );
    let gw = TestGateway::start(&config(&old_key)).await;
    let auth = format!(
        "Bearer {}",
        primary_token("alice", Some("alice@example.com"), None, Some("s-1"))
    );
    let assertion = |res: TestResponse| {
        assert_eq!(res.status, 200, "{}", res.text());
        res.upstream_header("x-stepgate-assertion")
            .expect("an assertion upstream")
    };
    let before = assertion(get(&gw.url("/account/me"), &[("authorization", &auth)]).await);
    let cached = served_jwks(&gw).await;
    assert_eq!(cached.keys.len(), 1);

    let reload = |text: String| {
        gw.running
            .as_ref()
            .expect("running")
            .gateway
            .reload(load(&text))
            .expect("reload")
    };
    reload(config(&new_key));
    let after = assertion(get(&gw.url("/account/me"), &[("authorization", &auth)]).await);
    let fetched = served_jwks(&gw).await;
    let kid = |t: &str| jsonwebtoken::decode_header(t).expect("header").kid;
    let served: Vec<_> = fetched
        .keys
        .iter()
        .map(|k| k.common.key_id.clone())
        .collect();
    assert_eq!(served, [kid(&after), kid(&before)], "new key first");
    assert_ne!(kid(&after), kid(&before));
    // The set fetched after the change verifies both; the set cached
    // before it verifies the old one (and refetching is what an app does
    // on the new kid).
    assert_eq!(
        verify_with(&fetched, &before, "payroll").expect("old assertion")["sub"],
        "alice"
    );
    assert_eq!(
        verify_with(&fetched, &after, "payroll").expect("new assertion")["sub"],
        "alice"
    );
    assert!(verify_with(&cached, &before, "payroll").is_ok());
    assert!(verify_with(&cached, &after, "payroll").is_err());

    // The same key again: still both, nothing new.
    reload(config(&new_key));
    assert_eq!(served_jwks(&gw).await.keys.len(), 2);
}
