//! Forward-auth mode (CONTRACT §5.1) through a real nginx (`auth_request`)
//! and a real Caddy (`forward_auth`), each started here on a free loopback
//! port with its own temporary config: a refused request never reaches the
//! upstream, an allowed one arrives with the identity headers, and the
//! browser flow (challenge page through the proxy, code from the real SMTP
//! sink, then the protected page) works end to end. Also the endpoint's
//! answers per contract, asked directly, and the identity-provider path
//! through nginx: real RS256 tokens from a real OpenID provider, the
//! signed assertion copied upstream, and failing closed while the
//! provider's keys have not arrived.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::assertion::{private_key, verify_assertion};
use support::flow::{mailed_code, user, Env, User, OTP};
use support::gateway::*;
use support::oidc::{gateway_yaml, signed_in, OidcProvider, AUDIENCE};
use support::upstream::Upstream;

/// The gateway (forward-auth endpoint and challenge pages), the app behind
/// the proxy, and the mailbox codes arrive in; with `trusted`, loopback
/// peers may speak for the original request.
async fn stack(trusted: bool) -> Env {
    Env::start_edited(false, OTP, |yaml| match trusted {
        true => yaml.replacen(
            "  drain_timeout: 5s\n",
            "  drain_timeout: 5s\n  trusted_proxies: [127.0.0.1/32]\n",
            1,
        ),
        false => yaml,
    })
    .await
}

/// A proxy process (nginx or caddy) on a free loopback port.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn wait_listening(mut self, log: &Path) -> Proxy {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return self;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "proxy exited with {status}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "proxy did not listen: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    /// nginx with the README's `auth_request` snippet: `auth_request_set`
    /// copying the identity headers and the signed assertion upstream, and
    /// `error_page 401` sending browsers where stepgate's
    /// `X-Stepgate-Redirect` says (nginx style: stepgate itself never
    /// answers 302).
    async fn nginx(gw: SocketAddr, up: SocketAddr) -> Proxy {
        Proxy::nginx_with(&readme_nginx(gw, up)).await
    }

    /// nginx serving `locations` (server-level directives).
    async fn nginx_with(locations: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let d = dir.path().display();
        let locations = locations.replace('\n', "\n        ");
        let conf = format!(
            r#"worker_processes 1;
master_process off;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 128; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        {locations}
    }}
}}
"#
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).expect("write nginx.conf");
        let log = dir.path().join("error.log");
        let child = Command::new("nginx")
            .arg("-e")
            .arg(&log)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx (scripts/test.sh installs nginx-light)");
        Proxy {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        }
        .wait_listening(&log)
        .await
    }

    /// Caddy with `forward_auth` and `copy_headers` (Traefik/Caddy style:
    /// stepgate answers browsers with the redirect itself).
    async fn caddy(gw: SocketAddr, up: SocketAddr) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = format!(
            r#"{{
	admin off
	auto_https off
}}
http://:{port} {{
	bind 127.0.0.1
	handle /.stepgate/* {{
		reverse_proxy {gw}
	}}
	handle {{
		forward_auth {gw} {{
			uri /.stepgate/auth
			copy_headers X-Stepgate-User X-Stepgate-Email X-Stepgate-Stepup X-Stepgate-Stepup-Age
		}}
		reverse_proxy {up}
	}}
}}
"#
        );
        let path = dir.path().join("Caddyfile");
        std::fs::write(&path, conf).expect("write Caddyfile");
        let log = dir.path().join("caddy.log");
        let child = Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&path)
            .env("HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path().join("data"))
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn caddy (scripts/test.sh installs caddy)");
        Proxy {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        }
        .wait_listening(&log)
        .await
    }
}

/// The nginx example of the README (section "Put stepgate behind your
/// ingress or proxy"), with its stepgate (127.0.0.1:8080) and app
/// (127.0.0.1:3000) addresses replaced: what the README shows is what is
/// tested.
fn readme_nginx(gw: SocketAddr, up: SocketAddr) -> String {
    let readme = include_str!("../README.md");
    let at = readme
        .find("**nginx** (`auth_request`")
        .expect("the README's nginx example");
    let block = &readme[at..];
    let code = &block[block.find("```nginx\n").expect("an nginx code block") + 9..];
    let code = &code[..code.find("```").expect("the end of the code block")];
    assert!(code.contains("127.0.0.1:8080") && code.contains("127.0.0.1:3000"));
    code.replace("127.0.0.1:8080", &gw.to_string())
        .replace("127.0.0.1:3000", &up.to_string())
}

/// The value of `name="..." value="..."` in an HTML form.
fn hidden(html: &str, name: &str) -> String {
    let at = html
        .find(&format!("name=\"{name}\" value=\""))
        .unwrap_or_else(|| panic!("no field {name} in\n{html}"));
    let rest = &html[at + name.len() + 15..];
    // As a browser reads the attribute (askama escapes & < > " ' as
    // numeric character references).
    let mut value = rest[..rest.find('"').expect("closing quote")].to_string();
    for (entity, c) in [
        ("&#60;", "<"),
        ("&#62;", ">"),
        ("&#34;", "\""),
        ("&#39;", "'"),
        ("&#38;", "&"),
    ] {
        value = value.replace(entity, c);
    }
    value
}

/// A header of the echo upstream's view of the request, empty counted as
/// absent (Caddy 2.6.2 sends every `copy_headers` header, empty when the
/// auth answer has none).
fn seen(res: &TestResponse, name: &str) -> Option<String> {
    res.upstream_header(name).filter(|v| !v.is_empty())
}

/// What every proxy must do: refused requests never reach the upstream,
/// allowed ones carry the identity, the browser flow completes.
async fn exercise(stack: &Env, proxy: &Proxy, alice: &User) {
    let hits = stack.up.hits();
    // Refused: a deny rule, no identity, identity without a second factor.
    let res = get(&proxy.url("/internal/x"), &[("authorization", &alice.auth)]).await;
    assert_eq!(res.status, StatusCode::FORBIDDEN);
    let res = get(&proxy.url("/account/me"), &[("accept", "application/json")]).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    let res = get(
        &proxy.url("/admin/panel"),
        &[
            ("authorization", &alice.auth),
            ("accept", "application/json"),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    let res = get(&proxy.url("/a/%2e%2e%2f..%2fadmin"), &[]).await;
    assert!(
        res.status.is_client_error() || res.status.is_server_error(),
        "{}",
        res.status
    );
    assert_eq!(
        stack.up.hits(),
        hits,
        "a refused request reached the upstream"
    );

    // Allowed: the identity headers arrive; a forged one from the client
    // never does.
    let res = get(
        &proxy.url("/account/me"),
        &[
            ("authorization", &alice.auth),
            ("x-stepgate-user", "mallory"),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(seen(&res, "x-stepgate-user").as_deref(), Some("alice"));
    assert_eq!(
        seen(&res, "x-stepgate-email").as_deref(),
        Some(alice.email.as_str())
    );
    let res = get(
        &proxy.url("/assets/app.css"),
        &[("x-stepgate-user", "mallory")],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(seen(&res, "x-stepgate-user"), None);

    // The browser flow: redirected to the challenge page through the
    // proxy, a code by email, then the protected page. The query has an
    // `&` and an escaped `&` (`%26`): both must come back exactly.
    let target = "/admin/panel?tab=1&q=a%26b";
    let browser = |extra: &'static [(&'static str, &'static str)]| {
        let mut h = vec![
            ("authorization", alice.auth.as_str()),
            ("accept", "text/html"),
        ];
        h.extend_from_slice(extra);
        h
    };
    let res = get(&proxy.url(target), &browser(&[])).await;
    assert_eq!(res.status, StatusCode::FOUND, "{}", res.text());
    // nginx makes its own redirects absolute; stepgate's are relative.
    let location = res.header("location").expect("location");
    let location = location
        .strip_prefix(&proxy.url(""))
        .unwrap_or(location)
        .to_string();
    assert_eq!(
        location,
        "/.stepgate/challenge?rd=/admin/panel%3Ftab%3D1%26q%3Da%2526b"
    );
    let page = get(&proxy.url(&location), &browser(&[])).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text());
    let html = page.text();
    let (csrf, rd) = (hidden(&html, "csrf"), hidden(&html, "rd"));
    assert_eq!(rd, target);
    let form = |pairs: &[(&str, &str)]| {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    };
    let form_headers = browser(&[("content-type", "application/x-www-form-urlencoded")]);
    let sent = request(
        Method::POST,
        &proxy.url("/.stepgate/challenge/send"),
        &form_headers,
        Bytes::from(form(&[("channel", "email"), ("csrf", &csrf), ("rd", &rd)])),
    )
    .await;
    assert_eq!(sent.status, StatusCode::SEE_OTHER, "{}", sent.text());
    let next = sent.header("location").expect("location");
    let cid = form_urlencoded::parse(next.split_once('?').map_or("", |(_, q)| q).as_bytes())
        .find(|(k, _)| k == "cid")
        .map(|(_, v)| v.into_owned())
        .expect("cid");
    let n = stack
        .smtp
        .received()
        .iter()
        .filter(|r| {
            r.rcpt_tos
                .iter()
                .any(|t| t.eq_ignore_ascii_case(&alice.email))
        })
        .count();
    let code = mailed_code(&stack.smtp, &alice.email, n - 1).await;
    let verified = request(
        Method::POST,
        &proxy.url("/.stepgate/challenge/verify"),
        &form_headers,
        Bytes::from(form(&[
            ("cid", &cid),
            ("ch", "email"),
            ("code", &code),
            ("csrf", &csrf),
            ("rd", &rd),
        ])),
    )
    .await;
    assert_eq!(
        verified.status,
        StatusCode::SEE_OTHER,
        "{}",
        verified.text()
    );
    assert_eq!(verified.header("location"), Some(target));
    let cookie = verified.header("set-cookie").expect("token cookie");
    let cookie = cookie.split(';').next().expect("name=value").to_string();
    let hits = stack.up.hits();
    let res = get(
        &proxy.url(target),
        &[
            ("authorization", &alice.auth),
            ("accept", "text/html"),
            ("cookie", &cookie),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(stack.up.hits(), hits + 1);
    assert_eq!(res.json()["path"], target);
    assert_eq!(seen(&res, "x-stepgate-user").as_deref(), Some("alice"));
    assert_eq!(seen(&res, "x-stepgate-stepup").as_deref(), Some("email"));
    assert!(seen(&res, "x-stepgate-stepup-age").is_some());
}

#[tokio::test]
// nginx `auth_request`: the contract's nginx style end to end.
async fn through_real_nginx() {
    let stack = stack(true).await;
    let proxy = Proxy::nginx(stack.gw.addr, stack.up.addr).await;
    exercise(&stack, &proxy, &user("alice", Some("nginx-1"))).await;
}

#[tokio::test]
// Caddy `forward_auth` with `copy_headers`: the Traefik/Caddy style end to end.
async fn through_real_caddy() {
    let stack = stack(true).await;
    let proxy = Proxy::caddy(stack.gw.addr, stack.up.addr).await;
    exercise(&stack, &proxy, &user("alice", Some("caddy-1"))).await;
}

#[tokio::test]
// The endpoint's answers per contract, asked directly as a proxy would.
async fn answers_per_contract() {
    let stack = stack(true).await;
    let gw = &stack.gw;
    let alice = user("alice", Some("direct-1"));
    let auth = gw.url("/.stepgate/auth");
    let traefik = |method: &'static str, uri: &'static str| {
        vec![
            ("x-forwarded-method", method),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "app.test"),
            ("x-forwarded-uri", uri),
        ]
    };
    let with = |mut h: Vec<(&'static str, &'static str)>,
                extra: &[(&'static str, &'static str)]| {
        h.extend_from_slice(extra);
        h
    };
    // Public and identity routes: 200, identity headers when there is one.
    let res = get(&auth, &traefik("GET", "/assets/a.css")).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.header("x-stepgate-user"), Some(""));
    let h = with(traefik("GET", "/account/me"), &[]);
    let mut h2: Vec<(&str, &str)> = h.clone();
    h2.push(("authorization", &alice.auth));
    let res = get(&auth, &h2).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.header("x-stepgate-user"), Some("alice"));
    assert_eq!(res.header("x-stepgate-stepup"), Some(""));
    // No identity: 401 with the realm; a browser in Traefik style gets the
    // login redirect with the original path.
    let res = get(&auth, &traefik("GET", "/account/me")).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        res.header("www-authenticate"),
        Some("Bearer realm=\"stepgate\"")
    );
    let res = get(
        &auth,
        &with(
            traefik("GET", "/account/me?x=1"),
            &[("accept", "text/html")],
        ),
    )
    .await;
    assert_eq!(res.status, StatusCode::FOUND);
    assert_eq!(
        res.header("location"),
        Some("https://idp.test/login?rd=/account/me%3Fx%3D1")
    );
    // Identity without a fresh factor: RFC 9470 401 for APIs, 302 to the
    // challenge for a Traefik-style browser, never 302 in nginx style.
    let mut h = traefik("GET", "/admin/panel?tab=1");
    h.push(("authorization", &alice.auth));
    let res = get(&auth, &h).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert!(res.header("www-authenticate").is_some_and(|v| v
        .contains("insufficient_user_authentication")
        && v.contains("max_age=300")));
    assert_eq!(res.json()["methods"], "/.stepgate/api/methods");
    h.push(("accept", "text/html"));
    let res = get(&auth, &h).await;
    assert_eq!(res.status, StatusCode::FOUND);
    assert_eq!(
        res.header("location"),
        Some("/.stepgate/challenge?rd=/admin/panel%3Ftab%3D1")
    );
    let nginx = [
        ("x-original-method", "GET"),
        ("x-original-url", "https://app.test/admin/panel"),
        ("authorization", alice.auth.as_str()),
        ("accept", "text/html"),
    ];
    let res = get(&auth, &nginx).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    // Deny: 403. The method is the original one (the keys rule lists POST
    // and DELETE only, so a GET there is not a step-up route).
    let res = get(&auth, &traefik("GET", "/internal/x")).await;
    assert_eq!(res.status, StatusCode::FORBIDDEN);
    let res = request(
        Method::POST,
        &auth,
        &traefik("GET", "/api/v1/keys"),
        Bytes::new(),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);
    let mut h = traefik("DELETE", "/api/v1/keys");
    h.push(("authorization", &alice.auth));
    let res = get(&auth, &h).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    // The original path is normalised like proxy mode's; what cannot be is 400.
    let res = get(&auth, &traefik("GET", "/assets/../internal/x")).await;
    assert_eq!(res.status, StatusCode::FORBIDDEN);
    let res = get(&auth, &traefik("GET", "/a%2fb")).await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    let res = get(&auth, &[("x-forwarded-method", "GET")]).await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    // The upstream is never involved in forward-auth.
    assert_eq!(stack.up.hits(), 0);
    // Decisions are counted by mode.
    let m = get(&gw.admin_url("/metrics"), &[]).await.text();
    assert!(
        m.contains(
            r#"stepgate_requests_total{rule="internal",outcome="denied",mode="forward_auth"} 2"#
        ),
        "{m}"
    );
    assert!(
        m.contains(r#"outcome="allowed",mode="forward_auth"}"#),
        "{m}"
    );
}

#[tokio::test]
// Forward-auth headers are believed only from listen.trusted_proxies.
async fn untrusted_peers_get_403() {
    let stack = stack(false).await;
    let res = get(
        &stack.gw.url("/.stepgate/auth"),
        &[
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/assets/a.css"),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::FORBIDDEN);
    assert_eq!(res.json()["error"], "forbidden");
}

#[tokio::test]
// A one_time rule's token is spent by the 200 that lets it pass.
async fn one_time_token_is_spent_by_the_answer() {
    let stack = stack(true).await;
    let alice = user("alice", Some("once-1"));
    let res = support::flow::start_otp(&stack.gw, &alice, "email").await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.text());
    let cid = res.json()["challenge_id"]
        .as_str()
        .expect("cid")
        .to_string();
    let code = mailed_code(&stack.smtp, &alice.email, 0).await;
    let res = support::flow::verify(&stack.gw, &alice, &cid, &code).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    let token = res.json()["token"].as_str().expect("token").to_string();
    let h = [
        ("x-forwarded-method", "GET"),
        ("x-forwarded-uri", "/billing/export"),
        ("authorization", alice.auth.as_str()),
        ("x-second-factor-token", token.as_str()),
    ];
    let first = get(&stack.gw.url("/.stepgate/auth"), &h).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("x-stepgate-stepup"), Some("email"));
    let second = get(&stack.gw.url("/.stepgate/auth"), &h).await;
    assert_eq!(second.status, StatusCode::UNAUTHORIZED);
}

/// nginx as ingress-nginx configures it for the README's annotations:
/// `auth-url` is an `auth_request` to stepgate (ingress-nginx sends
/// `X-Original-URL` and `X-Original-Method`), `auth-response-headers` are
/// `auth_request_set` copies, and `auth-signin` is `error_page 401` to a
/// location that answers `302` to the sign-in URL: for
/// `https://$host/.stepgate/challenge?rd=$escaped_request_uri`, every
/// refusal goes to the challenge page. (`$escaped_request_uri` is
/// ingress-nginx's `set_escape_uri` of `$request_uri`, a module Debian's
/// nginx-light lacks; the tests' targets need no escaping, so
/// `$request_uri` stands in for it.)
fn ingress_nginx(gw: SocketAddr, up: SocketAddr) -> String {
    format!(
        r#"location /.stepgate/ {{
    proxy_pass http://{gw};
}}
location = /.stepgate/auth {{
    internal;
    proxy_pass http://{gw};
    proxy_pass_request_body off;
    proxy_set_header Content-Length "";
    proxy_set_header X-Original-URL $scheme://$http_host$request_uri;
    proxy_set_header X-Original-Method $request_method;
}}
location / {{
    auth_request /.stepgate/auth;
    auth_request_set $sg_user $upstream_http_x_stepgate_user;
    auth_request_set $sg_stepup $upstream_http_x_stepgate_stepup;
    proxy_set_header X-Stepgate-User $sg_user;
    proxy_set_header X-Stepgate-Stepup $sg_stepup;
    error_page 401 = @signin;
    proxy_pass http://{up};
}}
location @signin {{
    return 302 http://$http_host/.stepgate/challenge?rd=$request_uri;
}}
"#
    )
}

/// An HS256 primary token for `sub` whose sign-in proved `amr` at
/// `auth_time` (what the test gateways' `identity.jwt` accepts).
fn hs_token(sub: &str, amr: &[&str], auth_time: u64) -> String {
    let now = stepgate::token::unix_now();
    let claims = serde_json::json!({
        "sub": sub, "iss": "https://idp.test", "aud": "legacy-app", "iat": now,
        "exp": now + 3600, "amr": amr, "auth_time": auth_time, "sid": format!("sid-{sub}"),
        "email": format!("{sub}@example.com"),
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign a primary token")
}

#[tokio::test]
// ingress-nginx (`auth-signin` to the challenge page) on a rule only the
// identity provider can satisfy: the challenge page does not show a code
// form that cannot help, it sends the browser on to identity.login_url
// with rd, the rule's acr_values and max_age, as proxy mode does. An rd
// that is not a local path is not followed (open redirect): the page falls
// back to `/`. A rule with a channel still gets the code form; nothing
// refused reaches the app; after signing in again with MFA, the page is
// served.
async fn ingress_nginx_signin_on_an_idp_only_rule_goes_to_the_provider() {
    let up = Upstream::start().await;
    let email = "  email:\n    smtp: { host: 127.0.0.1, port: 9, security: none }\n    from: \"Security <no-reply@example.com>\"\n";
    let payroll = "  - name: payroll\n    path: /payroll/**\n    stepup: { max_age: 5m, factors: [sms], idp: { amr: [mfa], acr: [\"urn:example:loa:2\"] } }\n";
    let yaml = config_yaml(&up.url(), email, "")
        .replacen(
            "  drain_timeout: 5s\n",
            "  drain_timeout: 5s\n  trusted_proxies: [127.0.0.1/32]\n",
            1,
        )
        .replacen(
            "  - name: account\n",
            &format!("{payroll}  - name: account\n"),
            1,
        )
        // Without an SMS channel, the keys rule takes email codes.
        .replacen(
            "max_age: 1m, factors: [sms] }",
            "max_age: 1m, factors: [email] }",
            1,
        );
    assert_eq!(yaml.matches("name: payroll").count(), 1, "{yaml}");
    assert_eq!(yaml.matches("factors: [email]").count(), 1, "{yaml}");
    let gw = TestGateway::start(&yaml).await;
    let proxy = Proxy::nginx_with(&ingress_nginx(gw.addr, up.addr)).await;
    let t = stepgate::token::unix_now();
    let plain = format!("Bearer {}", hs_token("alice", &["pwd"], t));
    let browser = [("authorization", plain.as_str()), ("accept", "text/html")];

    // auth-signin: the refusal goes to the challenge page, with rd.
    let res = get(&proxy.url("/payroll/run"), &browser).await;
    assert_eq!(res.status, StatusCode::FOUND, "{}", res.text());
    let challenge = proxy.url("/.stepgate/challenge?rd=/payroll/run");
    assert_eq!(res.header("location"), Some(challenge.as_str()));
    // The challenge page sends the browser on to the provider.
    let res = get(&challenge, &browser).await;
    assert_eq!(res.status, StatusCode::FOUND, "{}", res.text());
    assert_eq!(
        res.header("location"),
        Some(
            "https://idp.test/login?rd=/payroll/run&acr_values=urn%3Aexample%3Aloa%3A2&max_age=300"
        )
    );
    // rd as a query value, escaped: the same.
    let res = get(
        &proxy.url("/.stepgate/challenge?rd=%2Fpayroll%2Frun%3Fm%3D1"),
        &browser,
    )
    .await;
    assert_eq!(res.status, StatusCode::FOUND, "{}", res.text());
    assert_eq!(
        res.header("location"),
        Some("https://idp.test/login?rd=/payroll/run%3Fm%3D1&acr_values=urn%3Aexample%3Aloa%3A2&max_age=300")
    );
    // An rd that is not a path on this host is not followed: the page
    // falls back to `/` (a public route here), and shows the code form.
    for rd in [
        "//evil.test/payroll/run",
        "https://evil.test/payroll/run",
        "/\\evil.test/payroll/run",
    ] {
        let url = proxy.url(&format!(
            "/.stepgate/challenge?rd={}",
            form_urlencoded::byte_serialize(rd.as_bytes()).collect::<String>()
        ));
        let res = get(&url, &browser).await;
        assert_eq!(res.status, StatusCode::OK, "{rd}: {}", res.text());
        assert_eq!(res.header("location"), None, "{rd}");
        assert_eq!(hidden(&res.text(), "rd"), "/", "{rd}");
    }
    // A rule with a channel: the code form, as before.
    let res = get(&proxy.url("/admin/panel"), &browser).await;
    assert_eq!(res.status, StatusCode::FOUND);
    let res = get(
        res.header("location")
            .expect("location to the challenge page"),
        &browser,
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(hidden(&res.text(), "rd"), "/admin/panel");
    assert_eq!(up.hits(), 0, "a refused request reached the upstream");

    // Signed in again with the provider's MFA: through, as idp.
    let mfa = format!("Bearer {}", hs_token("alice", &["pwd", "mfa"], t));
    let res = get(
        &proxy.url("/payroll/run"),
        &[("authorization", mfa.as_str()), ("accept", "text/html")],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(seen(&res, "x-stepgate-user").as_deref(), Some("alice"));
    assert_eq!(seen(&res, "x-stepgate-stepup").as_deref(), Some("idp"));
    assert_eq!(up.hits(), 1);
}

/// A gateway whose identities come from `idp` (by discovery), trusting
/// loopback proxies, signing assertions for the app `payroll` with an
/// Ed25519 key in `keys`.
async fn idp_gateway(idp: &OidcProvider, up: &Upstream, keys: &Path) -> TestGateway {
    let key = private_key(keys, "ed25519");
    let yaml = gateway_yaml(up, &format!("    issuer: {}", idp.issuer()))
        .replacen(
            "listen: { address: 127.0.0.1:0 }",
            "listen: { address: 127.0.0.1:0, trusted_proxies: [127.0.0.1/32] }",
            1,
        )
        .replacen(
            "timeout: 5s }",
            &format!(
                "timeout: 5s, assertion: {{ signing_key_file: {}, audience: payroll }} }}",
                key.display()
            ),
            1,
        );
    TestGateway::start(&yaml).await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
// The identity-provider path through nginx auth_request: a real RS256
// token (keys by discovery from a real OpenID provider) is accepted, the
// provider's MFA satisfies an idp rule, and the signed assertion from the
// auth answer reaches the app, which verifies it against /jwks.json.
// A client's own assertion never reaches the app.
async fn provider_tokens_and_assertion_through_real_nginx() {
    let idp = OidcProvider::start();
    let up = Upstream::start().await;
    let keys = tempfile::tempdir().expect("tempdir");
    let gw = idp_gateway(&idp, &up, keys.path()).await;
    wait_ready(&gw).await;
    let proxy = Proxy::nginx(gw.addr, up.addr).await;
    let t = stepgate::token::unix_now();

    // Identity only: who, no factor.
    let plain = bearer(
        &idp.token(AUDIENCE, &signed_in("alice", &["pwd"], None, t))
            .await,
    );
    let res = get(
        &proxy.url("/account/me"),
        &[
            ("authorization", &plain),
            ("x-stepgate-assertion", "forged"),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(seen(&res, "x-stepgate-user").as_deref(), Some("alice"));
    let assertion = seen(&res, "x-stepgate-assertion").expect("assertion upstream");
    assert_ne!(assertion, "forged");
    let c = verify_assertion(&gw, &assertion, "payroll").await;
    assert_eq!(
        (c["sub"].as_str(), c["iss"].as_str()),
        (Some("alice"), Some("stepgate"))
    );
    assert!(c.get("amr").is_none(), "{c}");

    // The provider's MFA on an idp rule: X-Stepgate-Stepup idp, and the
    // assertion states the provider's amr, when, and the rule.
    let mfa = bearer(
        &idp.token(AUDIENCE, &signed_in("alice", &["pwd", "mfa"], None, t - 10))
            .await,
    );
    let res = get(&proxy.url("/payroll/run"), &[("authorization", &mfa)]).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(res.json()["path"], "/payroll/run");
    assert_eq!(seen(&res, "x-stepgate-stepup").as_deref(), Some("idp"));
    let c = verify_assertion(
        &gw,
        &seen(&res, "x-stepgate-assertion").expect("assertion upstream"),
        "payroll",
    )
    .await;
    assert_eq!(c["amr"], serde_json::json!(["pwd", "mfa"]));
    assert_eq!(c["auth_time"], serde_json::json!(t - 10));
    assert_eq!(c["rule"], "payroll");

    // Refused, and never upstream: password only on the idp rule; a token
    // for another audience; no token.
    let hits = up.hits();
    let res = get(
        &proxy.url("/payroll/run"),
        &[("authorization", &plain), ("accept", "application/json")],
    )
    .await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    let other = bearer(
        &idp.token("https://other.test", &signed_in("alice", &["mfa"], None, t))
            .await,
    );
    let res = get(&proxy.url("/payroll/run"), &[("authorization", &other)]).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    let res = get(&proxy.url("/account/me"), &[]).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(up.hits(), hits, "a refused request reached the upstream");

    // Public: no identity, no assertion, and the client's copy is gone.
    let res = get(
        &proxy.url("/assets/app.css"),
        &[("x-stepgate-assertion", "forged")],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(seen(&res, "x-stepgate-assertion"), None);
}

#[tokio::test]
// The provider is down when the gateway starts: the auth endpoint answers
// 503 identity_unavailable for anything that needs an identity, even a
// token the provider really signed, and nginx lets nothing protected
// through; public routes flow. When the provider is back, the same token
// passes without a restart.
async fn provider_down_at_start_nginx_allows_nothing_protected() {
    // Real tokens first, then the provider goes away (its keys are kept
    // for its return).
    let mut idp = OidcProvider::start();
    let t = stepgate::token::unix_now();
    let plain = bearer(
        &idp.token(AUDIENCE, &signed_in("alice", &["pwd"], None, t))
            .await,
    );
    let mfa = bearer(
        &idp.token(AUDIENCE, &signed_in("alice", &["mfa"], None, t))
            .await,
    );
    idp.stop();

    let up = Upstream::start().await;
    let keys = tempfile::tempdir().expect("tempdir");
    let gw = idp_gateway(&idp, &up, keys.path()).await;
    let proxy = Proxy::nginx(gw.addr, up.addr).await;

    // Asked directly, as nginx asks.
    let auth = gw.url("/.stepgate/auth");
    for (path, token) in [
        ("/account/me", Some(&plain)),
        ("/payroll/run", Some(&mfa)),
        ("/admin/x", Some(&plain)),
        ("/account/me", None),
    ] {
        let url = format!("https://app.test{path}");
        let mut h = vec![
            ("x-original-method", "GET"),
            ("x-original-url", url.as_str()),
        ];
        if let Some(token) = token {
            h.push(("authorization", token.as_str()));
        }
        let res = get(&auth, &h).await;
        assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(res.json()["error"], "identity_unavailable", "{path}");
        assert_eq!(res.header("x-stepgate-user"), None, "{path}");
    }
    let public = [
        ("x-original-method", "GET"),
        ("x-original-url", "https://app.test/assets/app.css"),
    ];
    assert_eq!(get(&auth, &public).await.status, StatusCode::OK);

    // Through nginx: a failed auth subrequest is nginx's 500, never the app.
    for (path, token) in [
        ("/account/me", &plain),
        ("/payroll/run", &mfa),
        ("/admin/x", &plain),
    ] {
        let res = get(&proxy.url(path), &[("authorization", token)]).await;
        assert!(!res.status.is_success(), "{path}: {}", res.status);
    }
    assert_eq!(up.hits(), 0, "a protected request reached the upstream");
    let res = get(&proxy.url("/assets/app.css"), &[]).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(up.hits(), 1);

    // The provider is back: the keys arrive, the same tokens pass.
    idp.start_again();
    wait_ready(&gw).await;
    let res = get(&proxy.url("/account/me"), &[("authorization", &plain)]).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(seen(&res, "x-stepgate-user").as_deref(), Some("alice"));
    let res = get(&proxy.url("/payroll/run"), &[("authorization", &mfa)]).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(seen(&res, "x-stepgate-stepup").as_deref(), Some("idp"));
}
