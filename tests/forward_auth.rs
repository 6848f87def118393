//! Forward-auth mode (CONTRACT §5.1) through a real nginx (`auth_request`)
//! and a real Caddy (`forward_auth`), each started here on a free loopback
//! port with its own temporary config: a refused request never reaches the
//! upstream, an allowed one arrives with the identity headers, and the
//! browser flow (challenge page through the proxy, code from the real SMTP
//! sink, then the protected page) works end to end. Also the endpoint's
//! answers per contract, asked directly.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::flow::{mailed_code, stepup_yaml, user, User, OTP};
use support::gateway::*;
use support::http_sink::HttpSink;
use support::smtp::SmtpServer;
use support::upstream::Upstream;

/// The gateway (forward-auth endpoint and challenge pages), the app behind
/// the proxy, and the mailbox codes arrive in.
struct Stack {
    up: Upstream,
    smtp: SmtpServer,
    _sms: HttpSink,
    gw: TestGateway,
}

impl Stack {
    async fn start(trusted: bool) -> Stack {
        let up = Upstream::start().await;
        let smtp = SmtpServer::start();
        let sms = HttpSink::start(200).await;
        let mut yaml = config_yaml(&up.url(), &stepup_yaml(smtp.port(), &sms.url(), OTP), "");
        if trusted {
            yaml = yaml.replacen(
                "  drain_timeout: 5s\n",
                "  drain_timeout: 5s\n  trusted_proxies: [127.0.0.1/32]\n",
                1,
            );
        }
        let gw = TestGateway::start(&yaml).await;
        Stack {
            up,
            smtp,
            _sms: sms,
            gw,
        }
    }
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

    /// nginx with `auth_request`, `auth_request_set` copying the identity
    /// headers upstream, and `error_page 401` sending browsers to the
    /// challenge page (nginx style: stepgate itself never answers 302).
    async fn nginx(gw: SocketAddr, up: SocketAddr) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let d = dir.path().display();
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
        location /.stepgate/ {{
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
            auth_request_set $sg_email $upstream_http_x_stepgate_email;
            auth_request_set $sg_stepup $upstream_http_x_stepgate_stepup;
            auth_request_set $sg_age $upstream_http_x_stepgate_stepup_age;
            proxy_set_header X-Stepgate-User $sg_user;
            proxy_set_header X-Stepgate-Email $sg_email;
            proxy_set_header X-Stepgate-Stepup $sg_stepup;
            proxy_set_header X-Stepgate-Stepup-Age $sg_age;
            error_page 401 = @stepup;
            proxy_pass http://{up};
        }}
        location @stepup {{
            if ($http_accept ~* "text/html") {{
                return 302 /.stepgate/challenge?rd=$request_uri;
            }}
            return 401;
        }}
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

fn upstream_addr(up: &Upstream) -> SocketAddr {
    up.addr
}

/// The value of `name="..." value="..."` in an HTML form.
fn hidden(html: &str, name: &str) -> String {
    let at = html
        .find(&format!("name=\"{name}\" value=\""))
        .unwrap_or_else(|| panic!("no field {name} in\n{html}"));
    let rest = &html[at + name.len() + 15..];
    rest[..rest.find('"').expect("closing quote")].to_string()
}

/// A header of the echo upstream's view of the request, empty counted as
/// absent (Caddy 2.6.2 sends every `copy_headers` header, empty when the
/// auth answer has none).
fn seen(res: &TestResponse, name: &str) -> Option<String> {
    res.upstream_header(name).filter(|v| !v.is_empty())
}

/// What every proxy must do: refused requests never reach the upstream,
/// allowed ones carry the identity, the browser flow completes.
async fn exercise(stack: &Stack, proxy: &Proxy, alice: &User) {
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
    // proxy, a code by email, then the protected page.
    let browser = |extra: &'static [(&'static str, &'static str)]| {
        let mut h = vec![
            ("authorization", alice.auth.as_str()),
            ("accept", "text/html"),
        ];
        h.extend_from_slice(extra);
        h
    };
    let res = get(&proxy.url("/admin/panel"), &browser(&[])).await;
    assert_eq!(res.status, StatusCode::FOUND, "{}", res.text());
    // nginx makes its own redirects absolute; stepgate's are relative.
    let location = res.header("location").expect("location");
    let location = location
        .strip_prefix(&proxy.url(""))
        .unwrap_or(location)
        .to_string();
    assert!(
        location.starts_with("/.stepgate/challenge?rd="),
        "{location}"
    );
    let page = get(&proxy.url(&location), &browser(&[])).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text());
    let html = page.text();
    let (csrf, rd) = (hidden(&html, "csrf"), hidden(&html, "rd"));
    assert_eq!(rd, "/admin/panel");
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
    assert_eq!(verified.header("location"), Some("/admin/panel"));
    let cookie = verified.header("set-cookie").expect("token cookie");
    let cookie = cookie.split(';').next().expect("name=value").to_string();
    let hits = stack.up.hits();
    let res = get(
        &proxy.url("/admin/panel"),
        &[
            ("authorization", &alice.auth),
            ("accept", "text/html"),
            ("cookie", &cookie),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(stack.up.hits(), hits + 1);
    assert_eq!(res.json()["path"], "/admin/panel");
    assert_eq!(seen(&res, "x-stepgate-user").as_deref(), Some("alice"));
    assert_eq!(seen(&res, "x-stepgate-stepup").as_deref(), Some("email"));
    assert!(seen(&res, "x-stepgate-stepup-age").is_some());
}

#[tokio::test]
// nginx `auth_request`: the contract's nginx style end to end.
async fn through_real_nginx() {
    let stack = Stack::start(true).await;
    let proxy = Proxy::nginx(stack.gw.addr, upstream_addr(&stack.up)).await;
    exercise(&stack, &proxy, &user("alice", Some("nginx-1"))).await;
}

#[tokio::test]
// Caddy `forward_auth` with `copy_headers`: the Traefik/Caddy style end to end.
async fn through_real_caddy() {
    let stack = Stack::start(true).await;
    let proxy = Proxy::caddy(stack.gw.addr, upstream_addr(&stack.up)).await;
    exercise(&stack, &proxy, &user("alice", Some("caddy-1"))).await;
}

#[tokio::test]
// The endpoint's answers per contract, asked directly as a proxy would.
async fn answers_per_contract() {
    let stack = Stack::start(true).await;
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
    let stack = Stack::start(false).await;
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
    let stack = Stack::start(true).await;
    let alice = user("alice", Some("once-1"));
    let env_like = &stack;
    let res = support::flow::start_otp(&env_like.gw, &alice, "email").await;
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
