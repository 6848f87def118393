//! Guards for the gateway's security decisions (#10, "the project's own
//! suite must guard every security decision"): each test here fails if the
//! decision it names is deleted or weakened. Real parts only: the gateway
//! in-process or as the binary, a real SMTP server, a real redis-server, a
//! real echo upstream that reports every header line it received.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use support::flow::*;
use support::gateway::*;

/// A code that is surely not `code`.
fn wrong(code: &str) -> String {
    if code.starts_with('0') {
        "1".repeat(code.len())
    } else {
        "0".repeat(code.len())
    }
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

/// Claims of a second-factor token exactly as the gateway issues them, for
/// `session` (the primary identity's session string, e.g. `sid:s1`).
fn sf_claims(sub: &str, session: &str, channel: &str) -> serde_json::Value {
    let now = stepgate::token::unix_now();
    serde_json::json!({
        "iss": stepgate::token::ISSUER,
        "aud": stepgate::token::AUDIENCE,
        "sub": sub,
        "ses": stepgate::token::session_hash(session),
        "amr": ["otp", channel],
        "auth_time": now,
        "iat": now,
        "exp": now + 600,
        "jti": format!("forged-{now}-{sub}"),
    })
}

/// Sign second-factor claims with the gateway's token type header.
fn sign_sf(
    alg: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    claims: &serde_json::Value,
) -> String {
    let mut header = jsonwebtoken::Header::new(alg);
    header.typ = Some(stepgate::token::TOKEN_TYPE.into());
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// An HS256 JWT over `claims` whose HMAC key is `key` (any bytes, e.g. a
/// public key's PEM text), with extra header fields.
fn hs256_with_key(key: &[u8], typ: Option<&str>, claims: &serde_json::Value) -> String {
    use hmac::Mac;
    let mut head = serde_json::json!({"alg": "HS256"});
    if let Some(t) = typ {
        head["typ"] = t.into();
    }
    let signing_input = format!(
        "{}.{}",
        b64(head.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("hmac key");
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()))
}

// ------------------------------------------------ forwarded header lines

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Protects against a client's own X-Stepgate-* lines reaching the app beside
// the gateway's (the app might read the first or the last copy).
async fn spoofed_gateway_headers_are_never_forwarded_beside_the_real_ones() {
    let env = Env::start(false, OTP).await;
    let u = user("gus", Some("s1"));
    let token = step_up(&env, &u, 0).await;
    let res = get(
        &env.gw.url("/admin/panel"),
        &[
            ("authorization", &u.auth),
            ("x-second-factor-token", &token),
            ("X-Stepgate-User", "mallory"),
            ("x-stepgate-user", "root"),
            ("X-Stepgate-Email", "mallory@evil.test"),
            ("X-Stepgate-Stepup", "sms"),
            ("x-stepgate-stepup", "email"),
            ("X-Stepgate-Stepup-Age", "0"),
            ("X_Stepgate_User", "mallory"),
            ("x_stepgate_email", "mallory@evil.test"),
            ("X-Forwarded-User", "root"),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(res.upstream_header_all("x-stepgate-user"), vec!["gus"]);
    assert_eq!(
        res.upstream_header_all("x-stepgate-email"),
        vec!["gus@example.com"]
    );
    assert_eq!(res.upstream_header_all("x-stepgate-stepup"), vec!["email"]);
    let age = res.upstream_header_all("x-stepgate-stepup-age");
    assert_eq!(age.len(), 1, "{age:?}");
    assert!(matches!(age[0].as_str(), "0" | "1"), "{age:?}");
    for name in ["x_stepgate_user", "x_stepgate_email", "x-forwarded-user"] {
        assert!(
            res.upstream_header_all(name).is_empty(),
            "{name} reached the upstream"
        );
    }
    // Without an identity no X-Stepgate-User line arrives at all.
    let res = get(
        &env.gw.url("/assets/a.css"),
        &[("x-stepgate-user", "mallory"), ("X-Stepgate-Stepup", "sms")],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);
    let names = res.upstream_header_names();
    assert!(
        !names.iter().any(|n| n.starts_with("x-stepgate-")),
        "{names:?}"
    );
}

#[tokio::test]
// Protects against a URL-rewrite header (IIS, Symfony) making the app serve
// another path than the one the policy checked; every copy is removed.
async fn every_rewrite_header_is_removed_before_forwarding() {
    let up = support::upstream::Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    let rewrite = [
        "x-original-url",
        "x-rewrite-url",
        "x-original-uri",
        "x-forwarded-path",
        "x-forwarded-prefix",
    ];
    let mut headers = Vec::new();
    for name in rewrite {
        headers.push((name.to_string(), "/admin/users".to_string()));
        headers.push((name.to_ascii_uppercase(), "/internal/x".to_string()));
    }
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let res = get(&gw.url("/assets/a.css"), &headers).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    for name in rewrite {
        assert!(
            res.upstream_header_all(name).is_empty(),
            "{name} reached the upstream"
        );
    }
    assert_eq!(res.json()["path"], "/assets/a.css");
}

#[tokio::test]
// Protects against a method-override header moving a request onto a rule
// that was never checked: every override header name, every line of it.
async fn every_method_override_header_and_line_is_checked() {
    let up = support::upstream::Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    // GET /api/v1/keys matches no rule; DELETE matches the step-up rule.
    for name in [
        "x-http-method-override",
        "X-HTTP-Method",
        "x-method-override",
    ] {
        let res = get(&gw.url("/api/v1/keys"), &[(name, "DELETE")]).await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{name}");
        assert_eq!(res.json()["error"], "method_override", "{name}");
        // A harmless first line does not hide a second that changes the rule.
        let res = get(&gw.url("/api/v1/keys"), &[(name, "GET"), (name, "DELETE")]).await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{name} twice");
    }
    assert_eq!(up.hits(), 0);
}

/// Header names the upstream received, spelled as CGI-style apps read them
/// (`_` as `-`, lower case).
fn cgi_names(res: &TestResponse) -> Vec<String> {
    res.upstream_header_names()
        .iter()
        .map(|n| n.replace('_', "-").to_ascii_lowercase())
        .collect()
}

#[tokio::test]
// Protects against a method override that a framework upper-cases
// (`delete` is DELETE to Rails, Express, Symfony) or reads under another
// spelling (`X_HTTP_Method_Override`, one CGI variable with the dashed
// one) moving a request onto a rule the policy did not check: values in
// any case, several values that differ, and every spelling.
async fn method_override_in_any_case_and_spelling_is_checked() {
    let up = support::upstream::Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    // GET /api/v1/keys matches no rule; DELETE matches the step-up rule.
    for name in [
        "x-http-method-override",
        "X-HTTP-Method",
        "x-method-override",
    ] {
        for value in ["delete", "Delete", "dElEtE"] {
            let res = get(&gw.url("/api/v1/keys"), &[(name, value)]).await;
            assert_eq!(res.status, StatusCode::BAD_REQUEST, "{name}: {value}");
            assert_eq!(res.json()["error"], "method_override", "{name}: {value}");
        }
        // Not a method at all: refused, never guessed.
        for value in ["DEL ETE", "", "DELETE,GET", "DELETE1"] {
            let res = request(
                Method::GET,
                &gw.url("/other"),
                &[(name, value)],
                Bytes::new(),
            )
            .await;
            assert_eq!(res.status, StatusCode::BAD_REQUEST, "{name}: {value:?}");
        }
    }
    // The POST the keys rule protects cannot leave it by asking for `get`.
    let res = request(
        Method::POST,
        &gw.url("/api/v1/keys"),
        &[("x-http-method-override", "get")],
        Bytes::new(),
    )
    .await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    // Two override headers (or lines) asking for different methods are
    // refused even where both land on the same rule: which one the app
    // reads is its own business.
    let res = get(
        &gw.url("/other"),
        &[
            ("x-http-method-override", "PUT"),
            ("x-method-override", "PATCH"),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    assert_eq!(res.json()["error"], "method_override");
    let res = get(
        &gw.url("/other"),
        &[("x-http-method", "PUT"), ("x-http-method", "PATCH")],
    )
    .await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    assert_eq!(up.hits(), 0, "a refused override reached the upstream");
    // Inside the rule it was checked against, an override in lower case is
    // the method it names: POST + delete on the keys rule still needs
    // sign-in, like a DELETE.
    let res = request(
        Method::POST,
        &gw.url("/api/v1/keys"),
        &[("x-http-method-override", "delete")],
        Bytes::new(),
    )
    .await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    // Equal values in any case and where they change nothing: forwarded.
    let res = get(
        &gw.url("/other"),
        &[
            ("x-http-method-override", "delete"),
            ("x-method-override", "DELETE"),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    // Every other spelling is removed before the policy and the app: the
    // app never reads an override the gateway did not check.
    let aliases = [
        "X_HTTP_Method_Override",
        "x-http_method-override",
        "X_HTTP_METHOD",
        "x_method_override",
    ];
    for name in aliases {
        let res = get(&gw.url("/api/v1/keys"), &[(name, "DELETE")]).await;
        assert_eq!(res.status, StatusCode::OK, "{name}: {}", res.text());
        let names = cgi_names(&res);
        for o in [
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
        ] {
            assert!(
                !names.contains(&o.to_string()),
                "{name} reached the app as {o}"
            );
        }
    }
}

#[tokio::test]
// Protects against a request method in lower or mixed case (`delete`):
// hyper accepts it as an extension method that no method-restricted rule
// matches, while Django, Werkzeug and ASP.NET treat it as DELETE. Refused
// with 400 like nginx does, over a raw socket (no client library would
// send it).
async fn request_method_not_in_upper_case_is_refused() {
    let up = support::upstream::Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    for method in [
        "delete", "Delete", "get", "pOST", "DELETe", "M-search", "DELETE1",
    ] {
        let req = format!(
            "{method} /api/v1/keys HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
        );
        let resp = raw(gw.addr, req.as_bytes()).await;
        assert_eq!(raw_status(&resp), 400, "{method}: {resp}");
        assert!(
            resp.contains("\"error\":\"bad_method\""),
            "{method}: {resp}"
        );
    }
    assert_eq!(up.hits(), 0, "a lower-case method reached the upstream");
    // Upper-case extension methods (WebDAV, SSDP) are methods like any other.
    for method in ["PROPFIND", "M-SEARCH", "BASELINE_CONTROL"] {
        let req = format!(
            "{method} /assets/a.css HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
        );
        let resp = raw(gw.addr, req.as_bytes()).await;
        assert_eq!(raw_status(&resp), 200, "{method}: {resp}");
    }
    assert_eq!(up.hits(), 3);
}

/// Every spelling class of `name`: as listed, upper case, all underscores,
/// and one underscore among dashes.
fn spellings(name: &str) -> Vec<String> {
    let mut out = vec![
        name.to_string(),
        name.to_ascii_uppercase(),
        name.replace('-', "_"),
    ];
    if let Some(i) = name.rfind('-') {
        let mut mixed = name.to_string();
        mixed.replace_range(i..=i, "_");
        out.push(mixed);
    }
    out
}

#[tokio::test]
// Protects against a reserved or rewrite header reaching the app in a
// spelling the gateway does not compare (CGI-style servers give
// `X_Original_URL` and `X-Original-URL` one variable): every header in the
// gateway's one list, in every spelling class, from a peer that is neither
// a trusted proxy nor trusted to assert identity.
async fn reserved_headers_are_removed_in_every_spelling() {
    let up = support::upstream::Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    let removed = [
        // The gateway's own (and the assertion's default header name).
        "x-stepgate-user",
        "x-stepgate-email",
        "x-stepgate-stepup",
        "x-stepgate-stepup-age",
        "x-stepgate-anything",
        // URL rewrite and re-method.
        "x-original-url",
        "x-rewrite-url",
        "x-original-uri",
        "x-forwarded-path",
        "x-forwarded-prefix",
        "x-forwarded-uri",
        "x-original-method",
        "x-forwarded-method",
        // httpoxy.
        "proxy",
        // Client claims from an untrusted peer.
        "forwarded",
        "x-forwarded-port",
        "x-forwarded-ssl",
        "x-forwarded-scheme",
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
        // The trusted-identity headers of this config (trusted from
        // 10.9.9.9 only).
        "x-forwarded-user",
        "x-forwarded-email",
    ];
    let mut sent = Vec::new();
    for name in removed {
        for spelling in spellings(name) {
            sent.push((spelling, "/internal/secret".to_string()));
        }
    }
    // Aliases of headers the gateway reads in their dashed spelling only.
    for name in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-second-factor-token",
        "keep-alive",
        "proxy-authorization",
    ] {
        sent.push((name.replace('-', "_"), "6.6.6.6".to_string()));
    }
    let sent: Vec<(&str, &str)> = sent.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let res = get(&gw.url("/assets/a.css"), &sent).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(res.json()["path"], "/assets/a.css");
    let names = cgi_names(&res);
    for name in
        removed
            .iter()
            .chain(&["x-second-factor-token", "keep-alive", "proxy-authorization"])
    {
        assert!(
            !names.contains(&name.to_string()),
            "{name} reached the app: {names:?}"
        );
    }
    // X-Forwarded-For/-Proto/-Host arrive once each, as the gateway saw
    // the request.
    for (name, want) in [
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
    ] {
        assert_eq!(res.upstream_header_all(name), vec![want], "{name}");
        assert_eq!(names.iter().filter(|n| *n == name).count(), 1, "{name}");
    }
    assert_eq!(names.iter().filter(|n| *n == "x-forwarded-host").count(), 1);
    assert!(!res.text().contains("6.6.6.6"), "{}", res.text());
    assert!(!res.text().contains("/internal/secret"), "{}", res.text());
}

#[tokio::test]
// The other side of the list: a trusted proxy's `X-Forwarded-*` claims and
// a trusted peer's identity header pass in their dashed spelling, while
// their underscore aliases and the rewrite headers are still removed.
async fn trusted_peers_keep_their_headers_but_never_an_alias() {
    let up = support::upstream::Upstream::start().await;
    let yaml = config_yaml(&up.url(), CONSOLE, "")
        .replace(
            "  drain_timeout: 5s\n",
            "  drain_timeout: 5s\n  trusted_proxies: [127.0.0.1/32]\n",
        )
        .replace("from: [10.9.9.9/32]", "from: [127.0.0.1/32]");
    let gw = TestGateway::start(&yaml).await;
    let res = get(
        &gw.url("/account/me"),
        &[
            ("x-forwarded-user", "carol"),
            ("X_Forwarded_User", "root"),
            ("x-forwarded-port", "443"),
            ("x_forwarded_port", "80"),
            ("x-forwarded-for", "203.0.113.7"),
            ("X_Forwarded_For", "6.6.6.6"),
            ("x-forwarded-prefix", "/internal"),
            ("x-real-ip", "203.0.113.7"),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(res.upstream_header_all("x-stepgate-user"), vec!["carol"]);
    assert_eq!(res.upstream_header_all("x-forwarded-user"), vec!["carol"]);
    assert_eq!(res.upstream_header_all("x-forwarded-port"), vec!["443"]);
    assert_eq!(
        res.upstream_header_all("x-forwarded-for"),
        vec!["203.0.113.7, 127.0.0.1"]
    );
    assert_eq!(res.upstream_header_all("x-real-ip"), vec!["203.0.113.7"]);
    let names = cgi_names(&res);
    for name in ["x-forwarded-user", "x-forwarded-port", "x-forwarded-for"] {
        assert_eq!(
            names.iter().filter(|n| *n == name).count(),
            1,
            "{name}: {names:?}"
        );
    }
    assert!(!names.contains(&"x-forwarded-prefix".to_string()));
    assert!(!res.text().contains("6.6.6.6"));
    assert!(!res.text().contains("root"));
}

#[tokio::test]
// Protects against a second credential beside the primary token the
// gateway checked: an app whose parser is more lenient than the gateway's
// (a tab or comma after `Bearer`, another scheme, a cookie name with
// stray spaces, case, escapes or `,` separators, an `access_token` query
// parameter) would act for whoever that credential names. Each is refused
// with 400 ambiguous_credentials; without a primary token nothing is
// vouched for and they pass.
async fn look_alike_credentials_beside_the_primary_token_are_refused() {
    let up = support::upstream::Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    let alice = primary_token("alice", None, None, None);
    let bob = primary_token("bob", None, None, None);
    let auth_alice = format!("Bearer {alice}");
    let cookie_alice = format!("access_token={alice}");
    // Beside a bearer header: other Authorization lines.
    for second in [
        format!("Bearer\t{bob}"),
        format!("Bearer,{bob}"),
        format!("Bearer {bob}"),
        format!("bearer {alice} {bob}"),
        format!("JWT {bob}"),
        format!("Token {bob}"),
        "Basic Ym9iOnNlY3JldA==".to_string(),
    ] {
        let res = get(
            &gw.url("/account/x"),
            &[("authorization", &auth_alice), ("authorization", &second)],
        )
        .await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{second}");
        assert_eq!(res.json()["error"], "ambiguous_credentials", "{second}");
    }
    // Beside a bearer header or the identity cookie: look-alike cookies.
    for primary in [
        ("authorization", auth_alice.as_str()),
        ("cookie", cookie_alice.as_str()),
    ] {
        for second in [
            format!("Access_Token={bob}"),
            format!("ACCESS_TOKEN={bob}"),
            format!("access_token\t={bob}"),
            format!("\"access_token\"={bob}"),
            format!("access%5Ftoken={bob}"),
            format!("access_token%20={bob}"),
            format!("access.token={bob}"),
            format!("access token={bob}"),
            format!("theme=dark, access_token={bob}"),
        ] {
            let res = get(&gw.url("/account/x"), &[primary, ("cookie", &second)]).await;
            assert_eq!(
                res.status,
                StatusCode::BAD_REQUEST,
                "{}: {second}",
                primary.0
            );
            assert_eq!(res.json()["error"], "ambiguous_credentials");
        }
        // An access_token query parameter (RFC 6750 §2.3), in any spelling.
        for q in [
            "access_token",
            "ACCESS_TOKEN",
            "access%5Ftoken",
            "access.token",
        ] {
            let res = get(&gw.url(&format!("/account/x?{q}={bob}")), &[primary]).await;
            assert_eq!(res.status, StatusCode::BAD_REQUEST, "{}: {q}", primary.0);
        }
    }
    // Beside the identity cookie: any Authorization header.
    for second in [format!("Token {bob}"), format!("Bearer\t{bob}")] {
        let res = get(
            &gw.url("/account/x"),
            &[("cookie", &cookie_alice), ("authorization", &second)],
        )
        .await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{second}");
    }
    // A non-ASCII space after the name (Django strips it), over a raw socket.
    let mut req = format!(
        "GET /account/x HTTP/1.1\r\nHost: app.test\r\nAuthorization: Bearer {alice}\r\nCookie: access_token"
    )
    .into_bytes();
    req.extend_from_slice(b"\xa0=");
    req.extend_from_slice(format!("{bob}\r\nConnection: close\r\n\r\n").as_bytes());
    let resp = raw(gw.addr, &req).await;
    assert_eq!(raw_status(&resp), 400, "{resp}");
    assert!(resp.contains("ambiguous_credentials"), "{resp}");
    assert_eq!(
        up.hits(),
        0,
        "a request with two credentials reached the app"
    );

    // The same token twice, unrelated cookies and parameters: one credential.
    for extra in [
        ("authorization", auth_alice.clone()),
        ("cookie", cookie_alice.clone()),
        (
            "cookie",
            "access_token_old=x; theme=a,b; token=y".to_string(),
        ),
    ] {
        let res = get(
            &gw.url("/account/x?token=1&access_tokens=2"),
            &[("authorization", &auth_alice), (extra.0, &extra.1)],
        )
        .await;
        assert_eq!(res.status, StatusCode::OK, "{extra:?}: {}", res.text());
        assert_eq!(res.upstream_header_all("x-stepgate-user"), vec!["alice"]);
    }
    // Without a primary token the gateway vouches for nobody: a look-alike
    // alone passes a public route unchanged and gets no identity.
    let token_bob = format!("Token {bob}");
    let res = get(&gw.url("/assets/a.css"), &[("authorization", &token_bob)]).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(
        res.upstream_header_all("authorization"),
        vec![token_bob.clone()]
    );
    assert!(res.upstream_header_all("x-stepgate-user").is_empty());
    let res = get(&gw.url("/account/x"), &[("authorization", &token_bob)]).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);

    // With `from: [header]` the cookie is not read, so any cookie of that
    // name beside the bearer header is a second credential.
    let yaml = config_yaml(&up.url(), CONSOLE, "").replace(
        "    algorithms: [HS256]\n",
        "    algorithms: [HS256]\n    from: [header]\n",
    );
    let gw = TestGateway::start(&yaml).await;
    let res = get(
        &gw.url("/account/x"),
        &[("authorization", &auth_alice), ("cookie", &cookie_alice)],
    )
    .await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    let res = get(&gw.url("/account/x"), &[("authorization", &auth_alice)]).await;
    assert_eq!(res.status, StatusCode::OK);

    // With `from: [cookie]` a bearer header is not read: alone it vouches
    // for nobody, and beside the cookie it is a second credential, even
    // when it carries the same token.
    let yaml = config_yaml(&up.url(), CONSOLE, "").replace(
        "    algorithms: [HS256]\n",
        "    algorithms: [HS256]\n    from: [cookie]\n",
    );
    let gw = TestGateway::start(&yaml).await;
    let res = get(&gw.url("/account/x"), &[("authorization", &auth_alice)]).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{}", res.text());
    let res = get(
        &gw.url("/account/x"),
        &[("cookie", &cookie_alice), ("authorization", &auth_alice)],
    )
    .await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    assert_eq!(res.json()["error"], "ambiguous_credentials");
    let res = get(&gw.url("/account/x"), &[("cookie", &cookie_alice)]).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.upstream_header_all("x-stepgate-user"), vec!["alice"]);

    // With the identity cookie renamed, a query parameter named like the
    // cookie and the RFC 6750 `access_token` parameter are both second
    // credentials; the same token in the header and the renamed cookie is
    // one credential.
    let yaml = config_yaml(&up.url(), CONSOLE, "").replace(
        "    algorithms: [HS256]\n",
        "    algorithms: [HS256]\n    cookie: id_jwt\n",
    );
    let gw = TestGateway::start(&yaml).await;
    for q in ["access_token", "id_jwt", "ID.JWT"] {
        let res = get(
            &gw.url(&format!("/account/x?{q}={bob}")),
            &[("authorization", &auth_alice)],
        )
        .await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(res.json()["error"], "ambiguous_credentials", "{q}");
    }
    let res = get(
        &gw.url("/account/x"),
        &[
            ("cookie", &format!("ID_JWT={bob}")),
            ("cookie", &format!("id_jwt={alice}")),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    let res = get(
        &gw.url("/account/x"),
        &[
            ("authorization", &auth_alice),
            ("cookie", &format!("id_jwt={alice}")),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(res.upstream_header_all("x-stepgate-user"), vec!["alice"]);
}

#[tokio::test]
// Protects the request-target limit (`listen.max_uri_bytes`): a target of
// exactly the limit is decided and forwarded, one byte more is 414, both
// for the request itself and for the original request a forward-auth
// proxy describes.
async fn request_targets_up_to_max_uri_bytes_and_not_one_byte_more() {
    const MAX: usize = 256;
    let up = support::upstream::Upstream::start().await;
    let yaml = config_yaml(&up.url(), CONSOLE, "").replace(
        "  drain_timeout: 5s\n",
        &format!(
            "  drain_timeout: 5s\n  max_uri_bytes: {MAX}\n  trusted_proxies: [127.0.0.1/32]\n"
        ),
    );
    let gw = TestGateway::start(&yaml).await;
    let target = |len: usize| format!("/assets/{}", "a".repeat(len - "/assets/".len()));
    let res = get(&gw.url(&target(MAX)), &[]).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(up.hits(), 1);
    let res = get(&gw.url(&target(MAX + 1)), &[]).await;
    assert_eq!(res.status, StatusCode::URI_TOO_LONG);
    assert_eq!(up.hits(), 1);
    for (len, status) in [(MAX, StatusCode::OK), (MAX + 1, StatusCode::URI_TOO_LONG)] {
        let uri = target(len);
        let res = get(
            &gw.url("/.stepgate/auth"),
            &[
                ("x-forwarded-method", "GET"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "app.test"),
                ("x-forwarded-uri", &uri),
            ],
        )
        .await;
        assert_eq!(res.status, status, "forward-auth target of {len} bytes");
    }
}

// ------------------------------------------------ second-factor decisions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Protects the freshness comparison (`age > max_age`): a factor is accepted
// up to and including the second it is exactly max_age old, and refused
// once it is older.
async fn freshness_refuses_a_factor_older_than_max_age() {
    const MAX_AGE: u64 = 1;
    let env = Env::start_edited(false, OTP, |y| {
        y.replace(
            "path: /admin/**\n    stepup: { max_age: 5m }",
            &format!("path: /admin/**\n    stepup: {{ max_age: {MAX_AGE}s }}"),
        )
    })
    .await;
    let u = user("fred", None);
    let token = step_up(&env, &u, 0).await;
    let auth_time = token_claim(&token, "auth_time");
    let (mut at_max_age, mut refused) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused < 3 {
        assert!(Instant::now() < deadline, "never refused");
        let before = stepgate::token::unix_now() - auth_time;
        let res = protected(&env.gw, "/admin/x", &u, &token).await;
        let after = stepgate::token::unix_now() - auth_time;
        if after <= MAX_AGE {
            assert_eq!(res.status, StatusCode::OK, "age {before}..{after} refused");
            if before == MAX_AGE {
                at_max_age += 1;
            }
        } else if before > MAX_AGE {
            assert_eq!(
                res.status,
                StatusCode::UNAUTHORIZED,
                "age {before} accepted"
            );
            assert_eq!(res.json()["error"], "insufficient_user_authentication");
            assert_eq!(res.json()["max_age"], MAX_AGE);
            refused += 1;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(at_max_age > 0, "no presentation at exactly max_age");
    // The same token still satisfies a rule with a longer max_age.
    assert_eq!(
        protected(&env.gw, "/billing/export", &u, &token)
            .await
            .status,
        StatusCode::OK
    );
}

both_stores!(one_time_idp_sign_in_stays_spent_after_the_request,);

// Protects the lifetime of the mark that spends a one-time sign-in at the
// identity provider: it must outlive every second the sign-in is accepted
// (`max_age` after `auth_time`, which may be up to the allowed skew in the
// future). A mark kept `max_age - skew` (1 s for this 31 s rule) would let
// the same sign-in in again within seconds; here every replay in the
// seconds after the spend is refused, and a new sign-in is admitted.
async fn one_time_idp_sign_in_stays_spent_after_the_request(redis: bool) {
    let env = Env::start_edited(redis, OTP, |y| {
        y.replace(
            "routes:\n",
            "routes:\n  - name: payroll\n    path: /payroll/**\n    stepup: { max_age: 31s, one_time: true, idp: { amr: [mfa] } }\n",
        )
    })
    .await;
    let signed_in = |auth_time: u64| {
        let now = stepgate::token::unix_now();
        format!(
            "Bearer {}",
            sign(&serde_json::json!({
                "sub": "paula", "iss": "https://idp.test", "aud": "legacy-app",
                "iat": now, "exp": now + 3600, "sid": "s-paula",
                "amr": ["pwd", "mfa"], "auth_time": auth_time,
            }))
        )
    };
    let t0 = stepgate::token::unix_now();
    let auth = signed_in(t0);
    let res = get(&env.gw.url("/payroll/run"), &[("authorization", &auth)]).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(res.upstream_header_all("x-stepgate-stepup"), vec!["idp"]);
    let mut replays = 0;
    while stepgate::token::unix_now() < t0 + 3 {
        let res = get(&env.gw.url("/payroll/run"), &[("authorization", &auth)]).await;
        assert_eq!(res.status, StatusCode::UNAUTHORIZED, "replay {replays}");
        replays += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(replays > 0);
    let res = get(
        &env.gw.url("/payroll/run"),
        &[("authorization", &signed_in(t0 + 1))],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
}

both_stores!(lockout_refuses_verification_of_a_correct_code,);

// Protects the lockout check on verification: a locked user's correct code
// for a still-open challenge yields no token.
async fn lockout_refuses_verification_of_a_correct_code(redis: bool) {
    let otp = OTP
        .replace("max_attempts: 3", "max_attempts: 5")
        .replace("max_failures: 6", "max_failures: 2");
    let env = Env::start(redis, &otp).await;
    let u = user("lola", None);
    let (cid, code) = email_challenge(&env, &env.gw, &u, 0).await;
    let res = verify(&env.gw, &u, &cid, &wrong(&code)).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{}", res.text());
    assert_eq!(res.json()["attempts_left"], 4);
    let res = verify(&env.gw, &u, &cid, &wrong(&code)).await;
    assert_eq!(res.status, StatusCode::LOCKED, "{}", res.text());
    // The challenge still has attempts left; the right code is refused.
    let res = verify(&env.gw, &u, &cid, &code).await;
    assert_eq!(res.status, StatusCode::LOCKED, "{}", res.text());
    assert_eq!(res.json()["error"], "locked");
    assert!(res.retry_after() > 0);
    assert!(res.header("set-cookie").is_none());
    assert!(!res.text().contains("token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Protects the signature check of second-factor tokens end to end: a token
// with exactly the claims and type the gateway issues, signed with another
// key, is refused (the same claims with the gateway's key pass).
async fn forged_second_factor_with_correct_claims_and_wrong_key_is_refused() {
    let env = Env::start(false, OTP).await;
    let u = user("fay", Some("s1"));
    let claims = sf_claims("fay", "sid:s1", "email");
    let alg = jsonwebtoken::Algorithm::HS256;
    let right = sign_sf(
        alg,
        &jsonwebtoken::EncodingKey::from_secret(STEPUP_KEY.as_bytes()),
        &claims,
    );
    assert_eq!(
        protected(&env.gw, "/admin/x", &u, &right).await.status,
        StatusCode::OK,
        "the control token (gateway key) must pass"
    );
    let hits = env.up.hits();
    let forged = [
        sign_sf(
            alg,
            &jsonwebtoken::EncodingKey::from_secret(b"attacker-key-0123456789abcdef0123456789"),
            &claims,
        ),
        // The primary token's key.
        sign_sf(
            alg,
            &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
            &claims,
        ),
        // A valid signature over other claims, spliced onto these claims.
        {
            let other = sign_sf(
                alg,
                &jsonwebtoken::EncodingKey::from_secret(STEPUP_KEY.as_bytes()),
                &sf_claims("someone", "sid:s1", "email"),
            );
            let parts: Vec<&str> = right.split('.').collect();
            let sig = other.rsplit('.').next().unwrap_or_default();
            format!("{}.{}.{sig}", parts[0], parts[1])
        },
        // No signature at all.
        {
            let parts: Vec<&str> = right.split('.').collect();
            format!("{}.{}.", parts[0], parts[1])
        },
    ];
    for (i, t) in forged.iter().enumerate() {
        let res = protected(&env.gw, "/admin/x", &u, t).await;
        assert_eq!(
            res.status,
            StatusCode::UNAUTHORIZED,
            "forgery #{i} accepted"
        );
        // The cookie path too.
        let res = get(
            &env.gw.url("/admin/x"),
            &[
                ("authorization", &u.auth),
                ("cookie", &format!("stepgate_sf={t}")),
            ],
        )
        .await;
        assert_eq!(
            res.status,
            StatusCode::UNAUTHORIZED,
            "forgery #{i} (cookie) accepted"
        );
    }
    assert_eq!(env.up.hits(), hits);
}

// ------------------------------------------------ algorithm confusion

/// Run `openssl` with `args` (test key material only).
fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
// Protects against algorithm confusion on primary tokens: with RS256 or
// ES256 and a public key file, an HS256 token whose HMAC key is that public
// key's PEM text (what an attacker can read) is refused.
async fn algorithm_confusion_public_key_as_hmac_secret_is_refused_for_primary_tokens() {
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey};
    let up = support::upstream::Upstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let rsa_priv = dir.path().join("rsa.pem");
    let rsa_pub = dir.path().join("rsa.pub.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        rsa_priv.to_str().expect("path"),
    ]);
    openssl(&[
        "pkey",
        "-in",
        rsa_priv.to_str().expect("path"),
        "-pubout",
        "-out",
        rsa_pub.to_str().expect("path"),
    ]);
    let ec = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let ec_pub = dir.path().join("ec.pub.pem");
    std::fs::write(
        &ec_pub,
        ec.public_key()
            .to_public_key_pem(Default::default())
            .expect("pem"),
    )
    .expect("write");
    let ec_priv = ec
        .to_pkcs8_pem(Default::default())
        .expect("pem")
        .to_string();
    let rsa_priv_pem = std::fs::read(&rsa_priv).expect("read");
    let now = stepgate::token::unix_now();
    let claims = serde_json::json!({"sub": "amy", "iss": "https://idp.test", "aud": "legacy-app", "iat": now, "exp": now + 600});
    for (alg, public, control_key) in [
        (
            "RS256",
            &rsa_pub,
            jsonwebtoken::EncodingKey::from_rsa_pem(&rsa_priv_pem).expect("rsa key"),
        ),
        (
            "ES256",
            &ec_pub,
            jsonwebtoken::EncodingKey::from_ec_pem(ec_priv.as_bytes()).expect("ec key"),
        ),
    ] {
        let yaml = config_yaml(&up.url(), CONSOLE, "").replacen(
            &format!("    algorithms: [HS256]\n    secret: {JWT_SECRET}\n"),
            &format!(
                "    algorithms: [{alg}]\n    public_key: {}\n",
                public.display()
            ),
            1,
        );
        let gw = TestGateway::start(&yaml).await;
        let algorithm: jsonwebtoken::Algorithm = alg.parse().expect("alg");
        let control =
            jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), &claims, &control_key)
                .expect("sign");
        let res = get(
            &gw.url("/account/me"),
            &[("authorization", &format!("Bearer {control}"))],
        )
        .await;
        assert_eq!(res.status, StatusCode::OK, "{alg} control token refused");
        let pem = std::fs::read(public).expect("read public key");
        let trimmed = String::from_utf8_lossy(&pem).trim().to_string();
        for key in [pem.clone(), trimmed.into_bytes()] {
            for typ in [Some("JWT"), None] {
                let forged = hs256_with_key(&key, typ, &claims);
                let res = get(
                    &gw.url("/account/me"),
                    &[("authorization", &format!("Bearer {forged}"))],
                )
                .await;
                assert_eq!(
                    res.status,
                    StatusCode::UNAUTHORIZED,
                    "{alg}: HS256 with the public key accepted"
                );
                let res = get(
                    &gw.url("/account/me"),
                    &[("cookie", &format!("access_token={forged}"))],
                )
                .await;
                assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{alg} (cookie)");
            }
        }
    }
    assert_eq!(up.hits(), 2, "only the two control tokens were forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Protects against algorithm confusion on second-factor tokens signed with
// an asymmetric key (ES256, EdDSA): an HS256 token with the gateway's exact
// claims whose HMAC key is the public key's PEM text is refused.
async fn algorithm_confusion_public_key_as_hmac_secret_is_refused_for_second_factor_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ec = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let ed = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let keys = {
        use p256::pkcs8::{EncodePrivateKey, EncodePublicKey};
        [
            (
                jsonwebtoken::Algorithm::ES256,
                ec.to_pkcs8_pem(Default::default())
                    .expect("pem")
                    .to_string(),
                ec.public_key()
                    .to_public_key_pem(Default::default())
                    .expect("pem"),
            ),
            (
                jsonwebtoken::Algorithm::EdDSA,
                ed.to_pkcs8_pem(Default::default())
                    .expect("pem")
                    .to_string(),
                ed.verifying_key()
                    .to_public_key_pem(Default::default())
                    .expect("pem"),
            ),
        ]
    };
    for (alg, private, public) in keys {
        let key_file = dir.path().join(format!("{alg:?}.pem"));
        std::fs::write(&key_file, &private).expect("write key");
        let env = Env::start_edited(false, OTP, |y| {
            y.replacen(
                &format!("    signing_key: {STEPUP_KEY}\n"),
                &format!("    signing_key_file: {}\n", key_file.display()),
                1,
            )
        })
        .await;
        let u = user("ada", Some("s7"));
        let claims = sf_claims("ada", "sid:s7", "email");
        let encoding = match alg {
            jsonwebtoken::Algorithm::ES256 => {
                jsonwebtoken::EncodingKey::from_ec_pem(private.as_bytes())
            }
            _ => jsonwebtoken::EncodingKey::from_ed_pem(private.as_bytes()),
        }
        .expect("encoding key");
        let control = sign_sf(alg, &encoding, &claims);
        assert_eq!(
            protected(&env.gw, "/admin/x", &u, &control).await.status,
            StatusCode::OK,
            "{alg:?} control token refused"
        );
        // The issued tokens use the configured algorithm.
        let issued = step_up(&env, &u, 0).await;
        assert_eq!(
            jsonwebtoken::decode_header(&issued).expect("header").alg,
            alg
        );
        for key in [public.as_bytes(), public.trim().as_bytes()] {
            let forged = hs256_with_key(key, Some(stepgate::token::TOKEN_TYPE), &claims);
            assert_eq!(
                protected(&env.gw, "/admin/x", &u, &forged).await.status,
                StatusCode::UNAUTHORIZED,
                "{alg:?}: HS256 with the public key accepted"
            );
        }
        assert_eq!(env.up.hits(), 1);
    }
}

// ------------------------------------------------ cookies under TLS

/// One HTTP/1.1 request over TLS to `addr`, verified against `ca`.
async fn tls_request(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> TestResponse {
    use http_body_util::BodyExt;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("pem") {
        roots.add(c.expect("cert")).expect("add root");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("tls handshake");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("localhost:{}", addr.port()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let res = send.send_request(req).await.expect("response");
    let (status, headers) = (res.status(), res.headers().clone());
    let body = res.into_body().collect().await.expect("body").to_bytes();
    TestResponse {
        status,
        headers,
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Protects the Secure flag: behind a TLS listener the second-factor cookie
// (and the cookie that clears it at logout) is never sent over plain HTTP.
async fn second_factor_cookie_is_secure_under_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let status = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/certs/gen-dev-cert.sh"
    ))
    .arg(dir.path())
    .stdout(std::process::Stdio::null())
    .status()
    .expect("gen-dev-cert.sh runs");
    assert!(status.success());
    let (crt, key, ca) = (
        dir.path().join("server.crt"),
        dir.path().join("server.key"),
        dir.path().join("ca.crt"),
    );
    let env = Env::start_edited(false, OTP, |y| {
        y.replacen(
            "  header_read_timeout: 2s\n",
            &format!(
                "  header_read_timeout: 2s\n  tls:\n    cert: {}\n    key: {}\n",
                crt.display(),
                key.display()
            ),
            1,
        )
    })
    .await;
    let u = user("tess", None);
    let json_headers = [
        ("authorization", u.auth.as_str()),
        ("content-type", "application/json"),
    ];
    let res = tls_request(
        env.gw.addr,
        &ca,
        Method::POST,
        "/.stepgate/api/otp",
        &json_headers,
        r#"{"method":"email"}"#,
    )
    .await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.text());
    let cid = res.json()["challenge_id"]
        .as_str()
        .expect("cid")
        .to_string();
    let code = mailed_code(&env.smtp, &u.email, 0).await;
    let res = tls_request(
        env.gw.addr,
        &ca,
        Method::POST,
        "/.stepgate/api/otp/verify",
        &json_headers,
        &serde_json::json!({"challenge_id": cid, "code": code}).to_string(),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    let cookie = res.header("set-cookie").unwrap_or_default().to_string();
    assert!(cookie.starts_with("stepgate_sf="), "{cookie}");
    let attrs: Vec<&str> = cookie.split(';').map(str::trim).collect();
    assert!(attrs.contains(&"Secure"), "{cookie}");
    assert!(attrs.contains(&"HttpOnly"), "{cookie}");
    let token = res.json()["token"].as_str().expect("token").to_string();
    let res = tls_request(
        env.gw.addr,
        &ca,
        Method::POST,
        "/.stepgate/api/logout",
        &[
            ("authorization", &u.auth),
            ("x-second-factor-token", &token),
        ],
        "",
    )
    .await;
    assert_eq!(res.status, StatusCode::NO_CONTENT);
    let clear = res.header("set-cookie").unwrap_or_default().to_string();
    let attrs: Vec<&str> = clear.split(';').map(str::trim).collect();
    assert!(attrs.contains(&"Max-Age=0"), "{clear}");
    assert!(attrs.contains(&"Secure"), "{clear}");
}

// ------------------------------------------------ primary token times

#[tokio::test]
// Protects the `nbf` check and the configured leeway on primary tokens:
// a token not yet valid is refused, and the leeway stretches `exp` and
// `nbf` by exactly what is configured, no more.
async fn primary_token_nbf_and_leeway() {
    let up = support::upstream::Upstream::start().await;
    let strict = TestGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    let lenient = TestGateway::start(&config_yaml(&up.url(), CONSOLE, "").replacen(
        "    leeway: 0s\n",
        "    leeway: 60s\n",
        1,
    ))
    .await;
    let now = stepgate::token::unix_now();
    let token = |extra: serde_json::Value| {
        let mut c = serde_json::json!({"sub": "nina", "iss": "https://idp.test", "aud": "legacy-app", "iat": now, "exp": now + 600});
        for (k, v) in extra.as_object().expect("object") {
            c[k] = v.clone();
        }
        format!("Bearer {}", sign(&c))
    };
    // (claims, accepted without leeway, accepted with 60 s leeway)
    let cases = [
        (serde_json::json!({}), true, true),
        (serde_json::json!({"nbf": now - 5}), true, true),
        (serde_json::json!({"nbf": now + 30}), false, true),
        (serde_json::json!({"nbf": now + 300}), false, false),
        (serde_json::json!({"exp": now - 30}), false, true),
        (serde_json::json!({"exp": now - 300}), false, false),
    ];
    for (claims, strict_ok, lenient_ok) in cases {
        let auth = token(claims.clone());
        for (gw, ok, name) in [
            (&strict, strict_ok, "leeway 0s"),
            (&lenient, lenient_ok, "leeway 60s"),
        ] {
            let res = get(&gw.url("/account/me"), &[("authorization", &auth)]).await;
            let want = if ok {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            assert_eq!(res.status, want, "{claims} with {name}");
        }
    }
}

// ------------------------------------------------ parallel sends

both_stores!(parallel_sends_never_exceed_max_sends,);

// Protects the atomicity of the per-user send cap: 20 concurrent code
// requests on both channels yield exactly max_sends codes.
async fn parallel_sends_never_exceed_max_sends(redis: bool) {
    const MAX_SENDS: usize = 3;
    let otp = OTP
        .replace("resend_after: 30s", "resend_after: 0s")
        .replace("max_sends: 5", &format!("max_sends: {MAX_SENDS}"));
    let env = Env::start(redis, &otp).await;
    let u = user("paula", None);
    let url = env.gw.url("/.stepgate/api/otp");
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (url, auth) = (url.clone(), u.auth.clone());
            let method = if i % 2 == 0 { "email" } else { "sms" };
            tokio::spawn(async move {
                request(
                    Method::POST,
                    &url,
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                    ],
                    Bytes::from(format!(r#"{{"method":"{method}"}}"#)),
                )
                .await
            })
        })
        .collect();
    let mut accepted = 0;
    for t in tasks {
        let res = t.await.expect("task");
        match res.status {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(res.json()["error"], "too_many_codes", "{}", res.text())
            }
            s => panic!("unexpected {s}: {}", res.text()),
        }
    }
    assert_eq!(accepted, MAX_SENDS);
    // What was accepted was delivered, and nothing more.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let delivered = env.smtp.received().len() + env.sms.requests().len();
        if delivered == MAX_SENDS {
            break;
        }
        assert!(delivered < MAX_SENDS, "{delivered} codes delivered");
        assert!(
            Instant::now() < deadline,
            "only {delivered} codes delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        start_otp(&env.gw, &u, "email").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

// ------------------------------------------------ key reload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Protects key rotation by reload: after a new second-factor signing key is
// swapped in, tokens issued under the old key no longer pass, and the old
// key's open challenges yield no token.
async fn reloading_a_new_signing_key_invalidates_issued_tokens() {
    let otp = OTP.replace("resend_after: 30s", "resend_after: 0s");
    let env = Env::start(false, &otp).await;
    let u = user("rory", None);
    let old = step_up(&env, &u, 0).await;
    assert_eq!(
        protected(&env.gw, "/admin/x", &u, &old).await.status,
        StatusCode::OK
    );
    let (cid, code) = email_challenge(&env, &env.gw, &u, 1).await;
    let new_key = "a-brand-new-stepup-signing-key-0123456789";
    let yaml = env.yaml.replacen(STEPUP_KEY, new_key, 1);
    assert_ne!(yaml, env.yaml);
    env.gw
        .running
        .as_ref()
        .expect("running")
        .gateway
        .reload(load(&yaml))
        .expect("reload");
    let hits = env.up.hits();
    let res = protected(&env.gw, "/admin/x", &u, &old).await;
    assert_eq!(
        res.status,
        StatusCode::UNAUTHORIZED,
        "old token still passes"
    );
    let res = get(
        &env.gw.url("/admin/x"),
        &[
            ("authorization", &u.auth),
            ("cookie", &format!("stepgate_sf={old}")),
        ],
    )
    .await;
    assert_eq!(
        res.status,
        StatusCode::UNAUTHORIZED,
        "old cookie still passes"
    );
    assert_eq!(env.up.hits(), hits);
    // The code of a challenge opened under the old key is no longer right.
    let res = verify(&env.gw, &u, &cid, &code).await;
    assert_ne!(res.status, StatusCode::OK, "{}", res.text());
    // Under the new key a fresh step-up works.
    let fresh = step_up(&env, &u, 2).await;
    assert_eq!(
        protected(&env.gw, "/admin/x", &u, &fresh).await.status,
        StatusCode::OK
    );
}

// ------------------------------------------------ form stash

/// A browser form post to `path` (same-origin), answered without a fresh
/// factor by a 303 to the challenge page; returns the `stash` id, if kept.
async fn form_post(gw: &TestGateway, u: &User, path: &str, body: String) -> Option<String> {
    let origin = format!("http://{}", gw.addr);
    let res = request(
        Method::POST,
        &gw.url(path),
        &[
            ("authorization", &u.auth),
            ("accept", "text/html"),
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", &origin),
            ("sec-fetch-site", "same-origin"),
        ],
        Bytes::from(body),
    )
    .await;
    assert_eq!(res.status, StatusCode::SEE_OTHER, "{}", res.text());
    let location = res.header("location").expect("location").to_string();
    assert!(location.starts_with("/.stepgate/challenge?"), "{location}");
    location
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("stash="))
        .map(str::to_string)
}

/// Verify a code on the challenge page (form post with its CSRF token),
/// carrying `stash`. Returns the page's answer.
async fn page_verify(env: &Env, u: &User, n: usize, stash: &str) -> TestResponse {
    let page = get(
        &env.gw.url(&format!(
            "/.stepgate/challenge?rd=/admin/settings&stash={stash}"
        )),
        &[("authorization", &u.auth), ("accept", "text/html")],
    )
    .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text());
    let html = page.text();
    let csrf = html
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("csrf field")
        .to_string();
    let (cid, code) = email_challenge(env, &env.gw, u, n).await;
    let form =
        format!("cid={cid}&ch=email&code={code}&csrf={csrf}&rd=%2Fadmin%2Fsettings&stash={stash}");
    request(
        Method::POST,
        &env.gw.url("/.stepgate/challenge/verify"),
        &[
            ("authorization", &u.auth),
            ("accept", "text/html"),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        Bytes::from(form),
    )
    .await
}

both_stores!(stash_is_bounded_and_one_per_session,);

// Protects the form stash limits: a post over stash_max_bytes is not kept,
// a session keeps one stash (a newer post replaces the older), and a stash
// is replayed only to the session that posted it.
async fn stash_is_bounded_and_one_per_session(redis: bool) {
    let otp = OTP.replace("resend_after: 30s", "resend_after: 0s");
    let env = Env::start_edited(redis, &otp, |y| {
        y.replacen("  otp:\n", "  stash_max_bytes: 256\n  otp:\n", 1)
    })
    .await;
    let u = user("stan", Some("s1"));
    // Over the limit: the challenge still works, nothing is kept.
    let big = format!("motd={}", "x".repeat(300));
    assert_eq!(form_post(&env.gw, &u, "/admin/settings", big).await, None);
    // Two posts by one session: the second replaces the first.
    let first = form_post(&env.gw, &u, "/admin/settings", "motd=first-post".into())
        .await
        .expect("first post kept");
    let second = form_post(&env.gw, &u, "/admin/settings", "motd=second-post".into())
        .await
        .expect("second post kept");
    assert_ne!(first, second);
    // Another sign-in of the same user cannot take this session's stash.
    let other = user("stan", Some("s2"));
    let res = page_verify(&env, &other, 0, &second).await;
    assert_eq!(res.status, StatusCode::SEE_OTHER, "{}", res.text());
    assert!(!res.text().contains("second-post"));
    let res = page_verify(&env, &u, 1, &second).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    let html = res.text();
    assert!(html.contains("second-post"), "{html}");
    assert!(!html.contains("first-post"), "{html}");
    // The replaced stash is gone, and the replayed one is not replayed twice.
    for stash in [&first, &second] {
        let res = page_verify(&env, &u, 2 + usize::from(stash == &second), stash).await;
        assert_eq!(res.status, StatusCode::SEE_OTHER, "{}", res.text());
        assert!(!res.text().contains("-post"), "{}", res.text());
    }
}

// ------------------------------------------------ audit events and outcomes

/// A string (or number, as text) field of a JSON log line.
fn log_field(line: &serde_json::Value, name: &str) -> Option<String> {
    let v = line.get(name).or_else(|| line["fields"].get(name))?;
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The JSON lines of the binary's log.
fn log_lines(gw: &BinaryGateway) -> Vec<serde_json::Value> {
    std::fs::read_to_string(gw.log_path())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Wait until a log line has every `(field, value)` pair; return it.
async fn wait_log(gw: &BinaryGateway, want: &[(&str, &str)]) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = log_lines(gw).into_iter().find(|l| {
            want.iter()
                .all(|(k, v)| log_field(l, k).as_deref() == Some(*v))
        }) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {want:?}:\n{}",
            std::fs::read_to_string(gw.log_path()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Protects the audit trail and the access log: every audit event and every
// request outcome the README lists is logged for the request that caused it
// (subject, channel, rule or detail; path, rule, status and outcome).
async fn every_audit_event_and_outcome_is_logged_for_its_request() {
    use support::gateway::BinaryGateway;
    let up = support::upstream::Upstream::start().await;
    let smtp = support::smtp::SmtpServer::start();
    let failing_sms = support::http_sink::HttpSink::start(500).await;
    let mut redis = support::redis::RedisServer::start();
    let otp = OTP
        .replace("resend_after: 30s", "resend_after: 0s")
        .replace("max_failures: 6", "max_failures: 2");
    let yaml = config_yaml(
        &up.url(),
        &stepup_yaml(smtp.port(), &failing_sms.url(), &otp),
        &format!(
            "store:\n  redis: {}\n  prefix: \"audit:\"\nlog:\n  format: json\n  level: info\n",
            redis.url()
        ),
    );
    let gw = BinaryGateway::start_logged(&yaml).await;
    let base = format!("http://{}", gw.addr);
    let post = |u: &User, path: &str, body: String| {
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
    let start =
        |u: &User, ch: &str| post(u, "/.stepgate/api/otp", format!(r#"{{"method":"{ch}"}}"#));
    let check = |u: &User, cid: &str, code: &str| {
        post(
            u,
            "/.stepgate/api/otp/verify",
            serde_json::json!({"challenge_id": cid, "code": code}).to_string(),
        )
    };

    // ann: a whole step-up, a one_time spend, a logout.
    let ann = user("ann", None);
    let res = start(&ann, "email").await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.text());
    let cid = res.json()["challenge_id"]
        .as_str()
        .expect("cid")
        .to_string();
    let code = mailed_code(&smtp, &ann.email, 0).await;
    let res = check(&ann, &cid, &code).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    let token = res.json()["token"].as_str().expect("token").to_string();
    for event in [
        "challenge_started",
        "code_sent",
        "verify_ok",
        "token_issued",
    ] {
        wait_log(
            &gw,
            &[("event", event), ("subject", "ann"), ("channel", "email")],
        )
        .await;
    }
    let res = get(
        &format!("{base}/billing/export"),
        &[
            ("authorization", &ann.auth),
            ("x-second-factor-token", &token),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);
    wait_log(
        &gw,
        &[
            ("event", "token_spent"),
            ("subject", "ann"),
            ("rule", "export"),
        ],
    )
    .await;
    wait_log(
        &gw,
        &[
            ("path", "/billing/export"),
            ("rule", "export"),
            ("status", "200"),
            ("outcome", "forwarded"),
        ],
    )
    .await;
    let res = request(
        Method::POST,
        &format!("{base}/.stepgate/api/logout"),
        &[
            ("authorization", &ann.auth),
            ("x-second-factor-token", &token),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(res.status, StatusCode::NO_CONTENT);
    wait_log(&gw, &[("event", "logout"), ("subject", "ann")]).await;

    // bea: SMS delivery fails.
    let bea = user("bea", None);
    assert_eq!(start(&bea, "sms").await.status, StatusCode::BAD_GATEWAY);
    wait_log(
        &gw,
        &[
            ("event", "delivery_failed"),
            ("subject", "bea"),
            ("channel", "sms"),
        ],
    )
    .await;

    // lou: wrong codes, a lockout, a refused send.
    let lou = user("lou", None);
    let res = start(&lou, "email").await;
    let cid = res.json()["challenge_id"]
        .as_str()
        .expect("cid")
        .to_string();
    let code = mailed_code(&smtp, &lou.email, 0).await;
    assert_eq!(
        check(&lou, &cid, &wrong(&code)).await.status,
        StatusCode::UNAUTHORIZED
    );
    wait_log(&gw, &[("event", "verify_failed"), ("subject", "lou")]).await;
    assert_eq!(
        check(&lou, &cid, &wrong(&code)).await.status,
        StatusCode::LOCKED
    );
    wait_log(&gw, &[("event", "lockout"), ("subject", "lou")]).await;
    assert_eq!(start(&lou, "email").await.status, StatusCode::LOCKED);
    wait_log(
        &gw,
        &[
            ("event", "refused"),
            ("subject", "lou"),
            ("detail", "locked"),
        ],
    )
    .await;

    // Request outcomes, one distinct request each.
    let cat = user("cat", None);
    // (path, headers, rule, status, outcome)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        ("/assets/a.css", vec![], "static", "200", "forwarded"),
        ("/internal/x", vec![], "internal", "403", "denied"),
        ("/account/me", vec![], "account", "401", "unauthenticated"),
        (
            "/admin/outcome",
            vec![("authorization", cat.auth.as_str())],
            "admin",
            "401",
            "challenged",
        ),
        (
            "/api/v1/keys",
            vec![("x-http-method-override", "DELETE")],
            "-",
            "400",
            "bad_request",
        ),
        (
            "/.stepgate/api/methods",
            vec![("authorization", cat.auth.as_str())],
            "stepgate",
            "200",
            "gateway",
        ),
        ("/slow", vec![], "-", "504", "upstream_error"),
    ];
    for (path, headers, rule, status, outcome) in &cases {
        let url = if *path == "/slow" {
            format!("{base}/slow?ms=3000")
        } else {
            format!("{base}{path}")
        };
        let res = get(&url, headers).await;
        assert_eq!(
            res.status.as_u16().to_string(),
            *status,
            "{path}: {}",
            res.text()
        );
        wait_log(
            &gw,
            &[
                ("path", path),
                ("rule", rule),
                ("status", status),
                ("outcome", outcome),
            ],
        )
        .await;
    }
    // The store goes away: a step-up route fails closed, and says so.
    let dan = user("dan", None);
    let res = start(&dan, "email").await;
    let cid = res.json()["challenge_id"]
        .as_str()
        .expect("cid")
        .to_string();
    let code = mailed_code(&smtp, &dan.email, 0).await;
    let token = check(&dan, &cid, &code).await.json()["token"]
        .as_str()
        .expect("token")
        .to_string();
    redis.stop();
    let res = get(
        &format!("{base}/admin/store"),
        &[
            ("authorization", &dan.auth),
            ("x-second-factor-token", &token),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
    wait_log(
        &gw,
        &[
            ("path", "/admin/store"),
            ("rule", "admin"),
            ("status", "503"),
            ("outcome", "store_unavailable"),
        ],
    )
    .await;
}
