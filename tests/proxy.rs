//! The gateway core end to end over TCP: forwarding, header hygiene,
//! normalisation, policy answers, primary identity, limits, timeouts,
//! TLS, WebSocket, admin endpoints.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::gateway::*;
use support::upstream::Upstream;

async fn setup() -> (Upstream, TestGateway) {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    (up, gw)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
// The upstream sees the identity, forwarded headers and the normalised
// path, and never a client-supplied X-Stepgate-* header.
async fn forwards_with_identity_and_forwarded_headers() {
    let (_up, gw) = setup().await;
    let tok = primary_token("alice", Some("alice@example.com"), None, None);
    let auth = bearer(&tok);
    let res = get(
        &gw.url("/account/./a//b/?q=1%2F"),
        &[
            ("authorization", &auth),
            ("x-stepgate-user", "mallory"),
            ("x-stepgate-stepup", "email"),
            ("x_stepgate_user", "mallory"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-original-url", "/admin"),
            ("host", "app.example.com"),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    let echo = res.json();
    assert_eq!(echo["path"], "/account/a/b/?q=1%2F");
    assert_eq!(
        res.upstream_header("x-stepgate-user").as_deref(),
        Some("alice")
    );
    assert_eq!(
        res.upstream_header("x-stepgate-email").as_deref(),
        Some("alice@example.com")
    );
    assert_eq!(res.upstream_header("x-stepgate-stepup"), None);
    assert_eq!(res.upstream_header("x_stepgate_user"), None);
    assert_eq!(
        res.upstream_header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        res.upstream_header("x-forwarded-proto").as_deref(),
        Some("http")
    );
    assert_eq!(
        res.upstream_header("x-forwarded-host").as_deref(),
        Some("app.example.com")
    );
    assert_eq!(res.upstream_header("x-original-url"), None);
}

#[tokio::test]
// Hop-by-hop headers go nowhere, and Connection cannot remove what the
// gateway sets (X-Forwarded-For, X-Stepgate-User).
async fn hop_by_hop_headers_are_removed_both_ways() {
    let (_up, gw) = setup().await;
    let tok = primary_token("alice", None, None, None);
    let auth = bearer(&tok);
    let res = get(
        &gw.url("/account/x"),
        &[
            ("authorization", &auth),
            (
                "connection",
                "x-secret, x-forwarded-for, x-stepgate-user, keep-alive",
            ),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);
    for h in [
        "x-secret",
        "keep-alive",
        "te",
        "connection",
        "proxy-authorization",
    ] {
        assert_eq!(res.upstream_header(h), None, "{h} was forwarded");
    }
    assert_eq!(
        res.upstream_header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        res.upstream_header("x-stepgate-user").as_deref(),
        Some("alice")
    );
    // Response side: the upstream's hop-by-hop headers stop at the gateway.
    assert!(res.header("keep-alive").is_none());
    assert!(res.header("x-upstream-private").is_none());
}

#[tokio::test]
// Normalisation happens before matching: dot segments, doubled slashes and
// encoded unreserved characters cannot reach a protected route unprotected.
async fn normalisation_cannot_bypass_rules() {
    let (up, gw) = setup().await;
    for path in [
        "/assets/../admin/x",
        "//admin/x",
        "/%61dmin/x",
        "/assets/%2e%2e/admin",
        "/admin",
        "/admin/",
        "/./admin/./x",
    ] {
        let res = get(&gw.url(path), &[]).await;
        assert_eq!(
            res.status,
            StatusCode::UNAUTHORIZED,
            "{path}: {}",
            res.text()
        );
    }
    // Ambiguous paths are refused outright and never forwarded.
    let before = up.hits();
    for path in [
        "/admin%2fx",
        "/admin%5cx",
        "/..",
        "/a/../..",
        "/%c0%ae%c0%ae/admin",
        "/a%00b",
    ] {
        let res = get(&gw.url(path), &[]).await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(res.json()["error"], "bad_path");
    }
    for target in ["/..;/admin", "/admin\\x", "/admin;jsessionid=1/x"] {
        let resp = raw(
            gw.addr,
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(raw_status(&resp), 400, "{target}: {resp}");
    }
    assert_eq!(up.hits(), before, "a refused path reached the upstream");
}

#[tokio::test]
// Deny rules answer 403 and never reach the upstream; public rules pass
// without identity; unmatched paths follow `default: pass`.
async fn deny_public_and_default() {
    let (up, gw) = setup().await;
    let res = get(&gw.url("/internal/metrics"), &[]).await;
    assert_eq!(res.status, StatusCode::FORBIDDEN);
    assert_eq!(res.json()["error"], "forbidden");
    assert_eq!(up.hits(), 0);
    assert_eq!(
        get(&gw.url("/assets/app.css"), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(get(&gw.url("/anything"), &[]).await.status, StatusCode::OK);
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
// The contract's answer table for step-up routes without identity or factor.
async fn stepup_route_answers_per_contract() {
    let (up, gw) = setup().await;
    // No identity, API client: 401 with realm.
    let res = get(&gw.url("/admin/users"), &[]).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        res.header("www-authenticate"),
        Some("Bearer realm=\"stepgate\"")
    );
    // No identity, browser: to the login page with rd.
    let res = get(
        &gw.url("/admin/users?x=1"),
        &[("accept", "text/html,application/xhtml+xml")],
    )
    .await;
    assert_eq!(res.status, StatusCode::FOUND);
    assert_eq!(
        res.header("location"),
        Some("https://idp.test/login?rd=/admin/users%3Fx%3D1")
    );
    // Identity, no factor, API client: RFC 9470.
    let tok = primary_token("alice", Some("a@example.com"), None, None);
    let auth = bearer(&tok);
    let res = get(&gw.url("/admin/users"), &[("authorization", &auth)]).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    let www = res
        .header("www-authenticate")
        .unwrap_or_default()
        .to_string();
    assert!(
        www.starts_with("Bearer error=\"insufficient_user_authentication\", error_description=\""),
        "{www}"
    );
    assert!(www.ends_with("max_age=300"), "{www}");
    let body = res.json();
    assert_eq!(body["error"], "insufficient_user_authentication");
    assert_eq!(body["max_age"], 300);
    assert_eq!(body["methods"], "/.stepgate/api/methods");
    // Identity, no factor, browser: to the challenge page.
    let res = get(
        &gw.url("/admin/users?x=1"),
        &[("authorization", &auth), ("accept", "text/html")],
    )
    .await;
    assert_eq!(res.status, StatusCode::FOUND);
    assert_eq!(
        res.header("location"),
        Some("/.stepgate/challenge?rd=/admin/users%3Fx%3D1")
    );
    // A forged second-factor token does not help.
    let res = get(
        &gw.url("/admin/users"),
        &[("authorization", &auth), ("x-second-factor-token", &tok)],
    )
    .await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
// Every way a primary JWT can be wrong ends in 401, never forwarded.
async fn jwt_rejection_cases() {
    let (up, gw) = setup().await;
    let now = stepgate::token::unix_now();
    let good = serde_json::json!({"sub": "alice", "iss": "https://idp.test", "aud": "legacy-app", "exp": now + 600});
    let with = |k: &str, v: serde_json::Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let b64 = |s: &str| base64_url(s.as_bytes());
    let sign_with = |key: &[u8], alg: jsonwebtoken::Algorithm, claims: &serde_json::Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(key),
        )
        .unwrap_or_default()
    };
    let payload = b64(&good.to_string());
    let mut no_exp = good.clone();
    no_exp.as_object_mut().map(|o| o.remove("exp"));
    let cases: Vec<(&str, String)> = vec![
        (
            "bad signature",
            sign_with(
                b"another-secret-0123456789abcdef0123",
                jsonwebtoken::Algorithm::HS256,
                &good,
            ),
        ),
        (
            "alg none",
            format!("{}.{payload}.", b64(r#"{"alg":"none","typ":"JWT"}"#)),
        ),
        (
            "alg not allowed (HS512)",
            sign_with(JWT_SECRET.as_bytes(), jsonwebtoken::Algorithm::HS512, &good),
        ),
        ("alg confusion (RS256 header, HMAC body)", {
            let head = b64(r#"{"alg":"RS256","typ":"JWT"}"#);
            format!("{head}.{payload}.{}", b64("sig"))
        }),
        ("expired", sign(&with("exp", (now - 10).into()))),
        ("missing exp", sign(&no_exp)),
        (
            "string exp",
            sign(&with("exp", (now + 600).to_string().into())),
        ),
        (
            "wrong issuer",
            sign(&with("iss", "https://evil.test".into())),
        ),
        ("wrong audience", sign(&with("aud", "other-app".into()))),
        ("no subject", sign(&with("sub", serde_json::Value::Null))),
        ("garbage", "not.a.jwt".into()),
    ];
    for (name, token) in cases {
        let auth = bearer(&token);
        let res = get(&gw.url("/account/me"), &[("authorization", &auth)]).await;
        assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{name} was accepted");
        // The same token in the cookie is refused too.
        let cookie = format!("access_token={token}");
        let res = get(&gw.url("/account/me"), &[("cookie", &cookie)]).await;
        assert_eq!(
            res.status,
            StatusCode::UNAUTHORIZED,
            "{name} (cookie) was accepted"
        );
    }
    assert_eq!(up.hits(), 0);
    // And the good one passes, from header and from cookie.
    let res = get(
        &gw.url("/account/me"),
        &[("authorization", &bearer(&sign(&good)))],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);
    let cookie = format!("access_token={}", sign(&good));
    let res = get(&gw.url("/account/me"), &[("cookie", &cookie)]).await;
    assert_eq!(res.status, StatusCode::OK);
}

fn base64_url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[tokio::test]
// A trusted-identity header from a peer outside `from` is stripped: it
// neither authenticates nor reaches the upstream.
async fn trusted_header_only_from_trusted_peers() {
    let (_up, gw) = setup().await;
    let res = get(&gw.url("/account/me"), &[("x-forwarded-user", "admin")]).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    let res = get(
        &gw.url("/public"),
        &[("x-forwarded-user", "admin"), ("x-forwarded-email", "a@b")],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.upstream_header("x-forwarded-user"), None);
    assert_eq!(res.upstream_header("x-forwarded-email"), None);
    assert_eq!(res.upstream_header("x-stepgate-user"), None);
}

#[tokio::test]
// A method override that would land on another rule is refused.
async fn method_override_cannot_change_the_rule() {
    let (up, gw) = setup().await;
    let res = get(
        &gw.url("/api/v1/keys"),
        &[("x-http-method-override", "DELETE")],
    )
    .await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    assert_eq!(res.json()["error"], "method_override");
    // The same override on a path where it changes nothing is forwarded.
    let res = get(&gw.url("/other"), &[("x-http-method-override", "DELETE")]).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
// HEAD is covered by a rule listing GET; methods are matched as sent.
async fn methods_match_as_sent() {
    let (_up, gw) = setup().await;
    // The keys rule lists POST and DELETE only: GET passes by default.
    assert_eq!(
        get(&gw.url("/api/v1/keys"), &[]).await.status,
        StatusCode::OK
    );
    let res = request(Method::POST, &gw.url("/api/v1/keys"), &[], Bytes::new()).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    let res = request(Method::HEAD, &gw.url("/admin/x"), &[], Bytes::new()).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
// Oversized heads and targets get 431/414; a slowloris client is cut off.
async fn limits_on_heads_targets_and_slow_clients() {
    let (up, gw) = setup().await;
    let big = "a".repeat(20 * 1024);
    let resp = raw(
        gw.addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(raw_status(&resp), 431, "{resp}");
    let long = "/x".repeat(5 * 1024);
    let resp = raw(
        gw.addr,
        format!("GET {long} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(raw_status(&resp), 414, "{resp}");
    assert_eq!(up.hits(), 0);
    // Slowloris: half a request head, then silence. The gateway closes the
    // connection after header_read_timeout (2s), well before our 5s bound.
    let start = std::time::Instant::now();
    let resp = raw(gw.addr, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "slow client held the connection"
    );
    assert!(resp.is_empty() || raw_status(&resp) == 408, "{resp}");
}

#[tokio::test]
// The upstream timeout holds on a pooled connection too, whose timer is
// the connection's own, moved on for each request: a slow answer on a
// reused connection is a 504, and the requests before and after it are
// served.
async fn upstream_timeout_on_a_reused_connection() {
    use tokio::io::AsyncWriteExt;
    let (up, gw) = setup().await;
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let mut ask = async |path: &str| {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        read_response(&mut s).await
    };
    assert_eq!(ask("/assets/a").await.0, 200);
    assert_eq!(ask("/assets/b").await.0, 200);
    assert_eq!(up.connections(), 1, "the pooled connection was not reused");
    let (status, body) = ask("/slow?ms=4000").await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("upstream_timeout"), "{body}");
    assert_eq!(ask("/assets/c").await.0, 200);
}

#[tokio::test]
// Upstream failures map to 502/504 with a short JSON error.
async fn upstream_errors_map_to_502_and_504() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    let res = get(&gw.url("/slow?ms=4000"), &[]).await;
    assert_eq!(res.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(res.json()["error"], "upstream_timeout");

    let port = free_port();
    let down = TestGateway::start(&config_yaml(
        &format!("http://127.0.0.1:{port}"),
        CONSOLE,
        "",
    ))
    .await;
    let res = get(&down.url("/x"), &[]).await;
    assert_eq!(res.status, StatusCode::BAD_GATEWAY);
    assert_eq!(res.json()["error"], "upstream_unavailable");
}

#[tokio::test]
// A connect that never completes ends in 502 after connect_timeout.
async fn connect_timeout_is_502() {
    // A listener with a backlog of 1 that never accepts: once the backlog is
    // full the kernel drops further SYNs, so connects hang.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = sock.local_addr().expect("addr");
    let _listener = sock.listen(1).expect("listen");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let gw = TestGateway::start(&config_yaml(&format!("http://{addr}"), CONSOLE, "")).await;
    let start = std::time::Instant::now();
    let res = get(&gw.url("/x"), &[]).await;
    assert_eq!(res.status, StatusCode::BAD_GATEWAY, "{}", res.text());
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "connect_timeout not applied"
    );
}

#[tokio::test]
// WebSocket upgrades pass through and echo.
async fn websocket_echo_through_gateway() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (_up, gw) = setup().await;
    let (mut ws, res) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .expect("websocket handshake");
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("hello through stepgate"))
        .await
        .expect("send");
    let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time");
    assert_eq!(
        msg.expect("message")
            .expect("ok")
            .into_text()
            .expect("text")
            .as_str(),
        "hello through stepgate"
    );
    // A tunnel idle for longer than a keep-alive connection may be is
    // still a tunnel (never parked as idle HTTP).
    tokio::time::sleep(Duration::from_millis(700)).await;
    ws.send(Message::text("after a pause")).await.expect("send");
    let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time");
    assert_eq!(
        msg.expect("message")
            .expect("ok")
            .into_text()
            .expect("text")
            .as_str(),
        "after a pause"
    );
}

/// A `/proc/self/status` memory figure of this process (`VmRSS`: resident
/// now, `VmHWM`: peak resident so far), in bytes.
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Bodies stream both ways: 1 GiB up and 1 GiB down move through the gateway
// without the process growing by anything near that.
async fn large_bodies_stream_with_bounded_memory() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let (_up, gw) = setup().await;
    const TOTAL: u64 = 1024 * 1024 * 1024;
    let base = proc_status_bytes("VmRSS:");
    // Upload: a generated stream, never in memory whole.
    let chunk = Bytes::from(vec![b'u'; 256 * 1024]);
    let stream = futures_util::stream::iter(
        (0..TOTAL / chunk.len() as u64)
            .map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone()))),
    );
    let client: hyper_util::client::legacy::Client<_, StreamBody<_>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = http::Request::post(gw.url("/upload"))
        .header("content-length", TOTAL.to_string())
        .body(StreamBody::new(stream))
        .expect("request");
    let res = client.request(req).await.expect("upload");
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("{{\"received\":{TOTAL}}}")
    );
    // Download: read frame by frame.
    let plain: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let res = plain
        .get(
            gw.url(&format!("/stream?bytes={TOTAL}"))
                .parse()
                .expect("uri"),
        )
        .await
        .expect("download");
    let mut body = res.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        got += frame
            .expect("frame")
            .data_ref()
            .map_or(0, |d| d.len() as u64);
    }
    assert_eq!(got, TOTAL);
    // The peak, not the current size: memory freed after a burst must not
    // hide the burst. (nextest runs each test in its own process.)
    let peak = proc_status_bytes("VmHWM:");
    assert!(peak > 0, "no VmHWM in /proc/self/status");
    let grown = peak.saturating_sub(base);
    assert!(
        grown < 128 * 1024 * 1024,
        "peak memory grew by {} MiB",
        grown / (1024 * 1024)
    );
}

#[tokio::test]
// Health, readiness and metrics live on the admin listener only.
async fn admin_endpoints() {
    let (_up, gw) = setup().await;
    let _ = get(&gw.url("/internal/x"), &[]).await;
    assert_eq!(
        get(&gw.admin_url("/healthz"), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&gw.admin_url("/readyz"), &[]).await.status,
        StatusCode::OK
    );
    let m = get(&gw.admin_url("/metrics"), &[]).await.text();
    assert!(
        m.contains(r#"stepgate_requests_total{rule="internal",outcome="denied",mode="proxy"} 1"#),
        "{m}"
    );
    assert!(
        m.contains("stepgate_request_duration_seconds_bucket"),
        "{m}"
    );
    assert!(m.contains("stepgate_log_dropped_lines_total 0"), "{m}");
    // On the public listener, /metrics is just another upstream path.
    let res = get(&gw.url("/metrics"), &[]).await;
    assert_eq!(res.json()["upstream"], "echo");
}

/// Read one response head from a kept-alive connection.
async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "connection closed before a response");
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
// listen.max_connections: past the limit a new connection is not served
// (it waits in the listen backlog) until an open one closes; then it is.
async fn max_connections_makes_new_connections_wait() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let up = Upstream::start().await;
    let yaml = config_yaml(&up.url(), CONSOLE, "")
        .replace(
            "  header_read_timeout: 2s\n",
            "  header_read_timeout: 30s\n",
        )
        .replace(
            "  drain_timeout: 5s\n",
            "  drain_timeout: 5s\n  max_connections: 2\n",
        );
    let gw = TestGateway::start(&yaml).await;
    let req = b"GET /assets/x HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        s.write_all(req).await.expect("write");
        assert_eq!(raw_status(&read_head(&mut s).await), 200);
        open.push(s);
    }
    let mut third = TcpStream::connect(gw.addr).await.expect("kernel accepts");
    third.write_all(req).await.expect("write");
    let early = tokio::time::timeout(Duration::from_millis(500), read_head(&mut third)).await;
    assert!(early.is_err(), "served beyond max_connections: {early:?}");
    let m = get(&gw.admin_url("/metrics"), &[]).await.text();
    assert!(m.contains("stepgate_open_connections 2"), "{m}");
    // One connection closes: the waiting one is served.
    drop(open.pop());
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut third))
        .await
        .expect("served once a slot is free");
    assert_eq!(raw_status(&head), 200, "{head}");
    // The first connection is still served on its kept-alive socket.
    open[0].write_all(req).await.expect("write");
    assert_eq!(raw_status(&read_head(&mut open[0]).await), 200);
}

#[tokio::test]
// listen.workers: new connections go to the serving thread with the
// fewest, and each thread keeps its own upstream connections: clients
// taking turns (never two requests at once), one per thread, are served
// over one upstream connection per thread, each reused for its thread's
// requests. Also with more threads than CPUs.
async fn each_serving_thread_has_its_connections_and_upstream_pool() {
    for workers in [2, 5] {
        serving_threads_keep_their_own(workers).await;
    }
}

async fn serving_threads_keep_their_own(workers: usize) {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let up = Upstream::start().await;
    let yaml = config_yaml(&up.url(), CONSOLE, "").replace(
        "  drain_timeout: 5s\n",
        &format!("  drain_timeout: 5s\n  workers: {workers}\n"),
    );
    let gw = TestGateway::start(&yaml).await;
    let req = b"GET /assets/x HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut clients = Vec::new();
    for _ in 0..workers {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        s.write_all(req).await.expect("write");
        assert_eq!(read_response(&mut s).await.0, 200);
        clients.push(s);
    }
    let m = get(&gw.admin_url("/metrics"), &[]).await.text();
    for worker in 1..=workers {
        let line = format!("stepgate_worker_connections{{worker=\"{worker}\"}} 1");
        assert!(m.lines().any(|l| l == line), "no {line:?} in:\n{m}");
    }
    for _ in 0..3 {
        for s in clients.iter_mut() {
            s.write_all(req).await.expect("write");
            assert_eq!(read_response(s).await.0, 200);
        }
    }
    assert_eq!(up.hits(), 4 * workers);
    assert_eq!(
        up.connections(),
        workers,
        "one upstream connection per thread ({workers} threads)"
    );
}

/// Read one whole response (head and `Content-Length` body) from a
/// kept-alive connection: its status and body.
async fn read_response(s: &mut tokio::net::TcpStream) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "connection closed before a response");
        out.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&out[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    while out.len() < head_end + len {
        let n = s.read(&mut buf).await.expect("read body");
        assert!(n > 0, "connection closed inside a body");
        out.extend_from_slice(&buf[..n]);
    }
    assert_eq!(out.len(), head_end + len, "bytes past the response");
    let body = String::from_utf8_lossy(&out[head_end..]).into_owned();
    (raw_status(&head), body)
}

/// Wait until the gateway's metrics show `line`.
async fn wait_metric(gw: &TestGateway, line: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = get(&gw.admin_url("/metrics"), &[]).await.text();
        if m.lines().any(|l| l == line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never showed {line:?}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
// Idle keep-alive connections give their HTTP buffers back (the memory
// bound of #8) and are served again on the same socket; the bytes of a
// pipelined request that had partly arrived survive the park, and nothing
// mid-exchange is ever cut (a slow upload, a slow upstream).
async fn idle_keep_alive_connections_park_and_resume() {
    use tokio::io::AsyncWriteExt;
    let (_up, gw) = setup().await;
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    s.write_all(b"GET /assets/a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (status, body) = read_response(&mut s).await;
    assert_eq!(status, 200, "{body}");
    wait_metric(&gw, "stepgate_parked_connections 1").await;

    s.write_all(b"GET /assets/b HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (status, body) = read_response(&mut s).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"path\":\"/assets/b\""), "{body}");

    // One request whole and the next one's head cut short, in one write.
    s.write_all(b"GET /assets/c HTTP/1.1\r\nHost: x\r\n\r\nGET /assets/d HTTP/1.1\r\nHo")
        .await
        .expect("write");
    let (status, body) = read_response(&mut s).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"path\":\"/assets/c\""), "{body}");
    wait_metric(&gw, "stepgate_parked_connections 1").await;
    s.write_all(b"st: x\r\n\r\n").await.expect("write");
    let (status, body) = read_response(&mut s).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"path\":\"/assets/d\""), "{body}");

    // An upload that pauses longer than the idle period is not cut.
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.write_all(b"67890").await.expect("write");
    let (status, body) = read_response(&mut s).await;
    assert_eq!((status, body.as_str()), (200, "{\"received\":10}"));

    // Nor is an upstream that takes longer than the idle period to answer.
    s.write_all(b"GET /slow?ms=700 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (status, body) = read_response(&mut s).await;
    assert_eq!((status, body.as_str()), (200, "slow done"));
    wait_metric(&gw, "stepgate_open_connections 1").await;

    // A head trickled in a byte at a time, each pause long enough to park,
    // still has to be complete within header_read_timeout (2s): the
    // connection is cut long before the 6s trickle ends.
    s.write_all(b"GET /assets/e HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut sink = Vec::new();
        let _ = rd.read_to_end(&mut sink).await;
        sink
    });
    let mut sent = 0;
    while sent < 15 && !reader.is_finished() {
        tokio::time::sleep(Duration::from_millis(400)).await;
        if wr.write_all(b"a").await.is_err() {
            break;
        }
        sent += 1;
    }
    assert!(sent < 15, "a trickled head held the connection for 6s");
    let answer = reader.await.expect("reader");
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    wait_metric(&gw, "stepgate_parked_connections 0").await;
    wait_metric(&gw, "stepgate_open_connections 0").await;
}

#[tokio::test]
// A head trickled a byte every 100 ms never parks the connection (each
// byte comes before the idle period ends), so only the head's own deadline
// stops it: header_read_timeout (2s) cuts it, on a new connection and on a
// keep-alive one, while a head that is slow but complete in time is
// served. The deadline runs on the connection's one timer, not on a new
// timer per request.
async fn a_head_trickled_faster_than_the_park_still_times_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_up, gw) = setup().await;

    /// Send `head` a byte every 100 ms; how many bytes went out before
    /// the gateway closed the connection (all of them if it did not).
    async fn trickle(s: &mut tokio::net::TcpStream, head: &[u8]) -> usize {
        let mut probe = [0u8; 1];
        for (i, b) in head.iter().enumerate() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // A closed connection reads as end-of-stream (or a reset).
            match tokio::time::timeout(Duration::ZERO, s.peek(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return i,
                _ => {}
            }
            if s.write_all(&[*b]).await.is_err() {
                return i;
            }
        }
        head.len()
    }

    // The first head on a new connection: 60 bytes would take 6s.
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    s.write_all(b"GET /assets/a HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");
    let sent = trickle(&mut s, &[b'a'; 60]).await;
    assert!(
        sent < 40,
        "a trickled first head held the connection for {sent} bytes"
    );
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    assert!(
        rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&rest)
    );

    // A keep-alive connection: one request, then a head slow but complete
    // within the deadline (about 1.2s) is served, then one that is not
    // is cut.
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    s.write_all(b"GET /assets/b HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (status, _) = read_response(&mut s).await;
    assert_eq!(status, 200);
    s.write_all(b"GET /assets/c HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    assert_eq!(trickle(&mut s, b"X-Slow: abc\r\n\r\n").await, 15);
    let (status, body) = read_response(&mut s).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"path\":\"/assets/c\""), "{body}");
    s.write_all(b"GET /assets/d HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");
    let sent = trickle(&mut s, &[b'a'; 60]).await;
    assert!(
        sent < 40,
        "a trickled keep-alive head held the connection for {sent} bytes"
    );
    wait_metric(&gw, "stepgate_open_connections 0").await;

    // A keep-alive connection that sends nothing more is closed after
    // about header_read_timeout (2s) too, once parked.
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    s.write_all(b"GET /assets/e HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (status, _) = read_response(&mut s).await;
    assert_eq!(status, 200);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "an idle keep-alive connection was not closed: {closed:?}"
    );
}

#[tokio::test]
// A request whose body the gateway refuses without reading (a POST to a
// route that needs an identity, without one) leaves hyper draining the
// body, and the connection never counts as idle: it must still be closed
// once nothing arrives for header_read_timeout (2s), not held forever.
async fn a_connection_after_a_refused_body_is_not_held_forever() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, gw) = setup().await;
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    s.write_all(b"POST /account/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
        .await
        .expect("write");
    let (status, body) = read_response(&mut s).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(up.hits(), 0);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the connection was held open: {closed:?}"
    );
}

/// A dev CA and a server certificate for localhost, made by the script
/// the README tells operators to use.
fn make_cert(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let status = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/certs/gen-dev-cert.sh"
    ))
    .arg(dir)
    .stdout(std::process::Stdio::null())
    .status()
    .expect("gen-dev-cert.sh runs");
    assert!(status.success());
    (
        dir.join("server.crt"),
        dir.join("server.key"),
        dir.join("ca.crt"),
    )
}

#[tokio::test]
// TLS termination: h2 and http/1.1 by ALPN, both forwarded to a plain upstream.
async fn tls_with_h2_and_http11() {
    use rustls_pki_types::pem::PemObject;
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (crt, key, ca) = make_cert(dir.path());
    let yaml = config_yaml(&up.url(), CONSOLE, "").replacen(
        "  header_read_timeout: 2s\n",
        &format!(
            "  header_read_timeout: 2s\n  tls:\n    cert: {}\n    key: {}\n",
            crt.display(),
            key.display()
        ),
        1,
    );
    let gw = TestGateway::start(&yaml).await;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&ca).expect("pem") {
        roots.add(c.expect("cert")).expect("add root");
    }
    for (alpn, want) in [
        (b"h2".to_vec(), http::Version::HTTP_2),
        (b"http/1.1".to_vec(), http::Version::HTTP_11),
    ] {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![alpn];
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
        let tcp = tokio::net::TcpStream::connect(gw.addr).await.expect("tcp");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let tls = connector.connect(name, tcp).await.expect("tls handshake");
        let io = hyper_util::rt::TokioIo::new(tls);
        let req = http::Request::get(format!("https://localhost:{}/hello", gw.addr.port()))
            .version(want)
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("req");
        let res = if want == http::Version::HTTP_2 {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .expect("h2");
            tokio::spawn(conn);
            send.send_request(req).await.expect("h2 response")
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.expect("h1");
            tokio::spawn(conn);
            let mut req = req;
            req.headers_mut()
                .insert("host", http::HeaderValue::from_static("localhost"));
            send.send_request(req).await.expect("h1 response")
        };
        assert_eq!(res.version(), want);
        assert_eq!(res.status(), StatusCode::OK);
        use http_body_util::BodyExt;
        let body = res.into_body().collect().await.expect("body").to_bytes();
        let echo: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(echo["path"], "/hello");
        assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
        assert!(echo["headers"]["host"]
            .as_str()
            .unwrap_or("")
            .starts_with("localhost"));
    }
}

#[tokio::test]
// SIGTERM lets an in-flight request finish, then the process exits 0.
async fn sigterm_drains_in_flight_requests() {
    let up = Upstream::start().await;
    let mut gw = BinaryGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    let url = gw.url("/slow?ms=1500");
    let inflight = tokio::spawn(async move { get(&url, &[]).await });
    // Wait until the request has reached the upstream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while up.hits() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "request never reached upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.signal("TERM");
    let res = inflight.await.expect("task");
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.text(), "slow done");
    let status = tokio::task::spawn_blocking(move || gw.child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
// An https upstream is verified against the configured CA (and refused
// without it): the gateway never talks TLS to an unknown server.
async fn https_upstream_with_configured_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (crt, key, ca) = make_cert(dir.path());
    let up = Upstream::start_tls(&crt, &key).await;
    let url = format!("https://localhost:{}", up.addr.port());
    let yaml = config_yaml(&url, CONSOLE, "").replacen(
        "  connect_timeout: 1s\n",
        &format!("  connect_timeout: 1s\n  ca_file: {}\n", ca.display()),
        1,
    );
    let gw = TestGateway::start(&yaml).await;
    let res = get(&gw.url("/over-tls"), &[]).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(res.json()["path"], "/over-tls");
    // Without the CA the handshake fails: 502, nothing served.
    let untrusted = TestGateway::start(&config_yaml(&url, CONSOLE, "")).await;
    assert_eq!(
        get(&untrusted.url("/over-tls"), &[]).await.status,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
// Primary tokens verified with a JWKS: the key is chosen by kid, an unknown
// kid or an HS token is refused.
async fn jwks_keys_by_kid() {
    use p256::pkcs8::EncodePrivateKey;
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut keys = Vec::new();
    let mut jwks = Vec::new();
    for kid in ["k1", "k2"] {
        let sk = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        let point =
            p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&sk.public_key(), false);
        jwks.push(serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": base64_url(point.x().expect("x")), "y": base64_url(point.y().expect("y")),
        }));
        let pem = sk
            .to_pkcs8_pem(Default::default())
            .expect("pem")
            .to_string();
        keys.push((
            kid,
            jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).expect("key"),
        ));
    }
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, serde_json::json!({ "keys": jwks }).to_string())
        .expect("write jwks");
    let yaml = config_yaml(&up.url(), CONSOLE, "").replacen(
        &format!("    algorithms: [HS256]\n    secret: {JWT_SECRET}\n"),
        &format!(
            "    algorithms: [ES256]\n    jwks_file: {}\n",
            jwks_path.display()
        ),
        1,
    );
    let gw = TestGateway::start(&yaml).await;
    let now = stepgate::token::unix_now();
    let claims = serde_json::json!({"sub": "erin", "iss": "https://idp.test", "aud": "legacy-app", "exp": now + 600});
    let sign_kid = |kid: &str, key: &jsonwebtoken::EncodingKey| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some(kid.to_string());
        jsonwebtoken::encode(&h, &claims, key).expect("sign")
    };
    for (kid, key) in &keys {
        let res = get(
            &gw.url("/account/me"),
            &[("authorization", &bearer(&sign_kid(kid, key)))],
        )
        .await;
        assert_eq!(res.status, StatusCode::OK, "{kid}");
        assert_eq!(
            res.upstream_header("x-stepgate-user").as_deref(),
            Some("erin")
        );
    }
    // k1's key under k2's kid: wrong key, refused. Unknown kid: refused.
    let swapped = sign_kid("k2", &keys[0].1);
    assert_eq!(
        get(
            &gw.url("/account/me"),
            &[("authorization", &bearer(&swapped))]
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    let unknown = sign_kid("k9", &keys[0].1);
    assert_eq!(
        get(
            &gw.url("/account/me"),
            &[("authorization", &bearer(&unknown))]
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    // An HS256 token (alg confusion) is refused.
    let hs = primary_token("erin", None, None, None);
    assert_eq!(
        get(&gw.url("/account/me"), &[("authorization", &bearer(&hs))])
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
// A peer inside `trusted_header.from` may assert identity by header; the
// asserted user becomes X-Stepgate-User and the route's requirement is met.
async fn trusted_header_identity_from_trusted_peer() {
    let up = Upstream::start().await;
    let yaml =
        config_yaml(&up.url(), CONSOLE, "").replace("from: [10.9.9.9/32]", "from: [127.0.0.1/32]");
    let gw = TestGateway::start(&yaml).await;
    let res = get(
        &gw.url("/account/me"),
        &[
            ("x-forwarded-user", "carol"),
            ("x-forwarded-email", "carol@example.com"),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(
        res.upstream_header("x-stepgate-user").as_deref(),
        Some("carol")
    );
    assert_eq!(
        res.upstream_header("x-stepgate-email").as_deref(),
        Some("carol@example.com")
    );
    // An empty assertion is no identity.
    assert_eq!(
        get(&gw.url("/account/me"), &[("x-forwarded-user", " ")])
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
// Only WebSocket upgrades pass: an h2c upgrade would let later requests on
// the connection bypass the policy, so it is dropped and answered normally.
async fn non_websocket_upgrades_are_not_passed() {
    let (_up, gw) = setup().await;
    let resp = raw(
        gw.addr,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&resp), 200, "{resp}");
    let body = resp
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(!body.contains("\"upgrade\""), "{body}");
    assert!(!body.contains("http2-settings"), "{body}");
}

#[tokio::test]
// The client's protocol version is the gateway's, whatever the upstream speaks.
async fn http10_upstream_answers_as_http11() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
    });
    let gw = TestGateway::start(&config_yaml(&format!("http://{addr}"), CONSOLE, "")).await;
    let resp = raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("ok"), "{resp}");
}

#[tokio::test]
// upstream.timeout counts from the last upload progress: a slow upload that
// keeps moving outlives the timeout, while a silent upstream still gets 504.
async fn timeout_runs_from_last_upload_progress() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let (_up, gw) = setup().await;
    // Five chunks 700 ms apart: 2.8 s in all, more than the 2 s timeout.
    let stream = futures_util::stream::unfold(0u32, |i| async move {
        if i == 5 {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        Some((
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"0123456789"))),
            i + 1,
        ))
    });
    let client: hyper_util::client::legacy::Client<_, StreamBody<_>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = http::Request::post(gw.url("/upload"))
        .body(StreamBody::new(Box::pin(stream)))
        .expect("request");
    let res = client.request(req).await.expect("upload");
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"{\"received\":50}");
}

#[tokio::test]
// The gateway is a tower Service: driven directly (no sockets), a deny rule
// answers 403 and a bad path 400.
async fn gateway_is_a_tower_service() {
    use tower::Service;
    let gateway = stepgate::Gateway::new(load(&config_yaml("http://127.0.0.1:9", CONSOLE, "")))
        .expect("gateway");
    let mut svc = stepgate::server::GatewayService {
        gateway,
        conn: stepgate::proxy::ClientConn {
            peer: "127.0.0.1:5555".parse().expect("addr"),
            tls: false,
        },
    };
    for (path, want) in [
        ("/internal/x", StatusCode::FORBIDDEN),
        ("/a%2fb", StatusCode::BAD_REQUEST),
    ] {
        std::future::poll_fn(|cx| {
            Service::<http::Request<http_body_util::Full<Bytes>>>::poll_ready(&mut svc, cx)
        })
        .await
        .expect("ready");
        let req = http::Request::get(path)
            .body(http_body_util::Full::new(Bytes::new()))
            .expect("request");
        let res = svc.call(req).await.expect("infallible");
        assert_eq!(res.status(), want, "{path}");
    }
}

#[tokio::test]
// Two different primary credentials are refused: the gateway must never
// check one while the app reads the other.
async fn ambiguous_primary_credentials_are_refused() {
    let (up, gw) = setup().await;
    let alice = primary_token("alice", None, None, None);
    let bob = primary_token("bob", None, None, None);
    let (auth_alice, cookie_bob) = (bearer(&alice), format!("access_token={bob}"));
    let res = get(
        &gw.url("/account/x"),
        &[("authorization", &auth_alice), ("cookie", &cookie_bob)],
    )
    .await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    assert_eq!(res.json()["error"], "ambiguous_credentials");
    let both = format!("access_token={alice}; access_token={bob}");
    assert_eq!(
        get(&gw.url("/account/x"), &[("cookie", &both)])
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(up.hits(), 0);
    // The same token in header and cookie is one credential.
    let same = format!("access_token={alice}");
    assert_eq!(
        get(
            &gw.url("/account/x"),
            &[("authorization", &auth_alice), ("cookie", &same)]
        )
        .await
        .status,
        StatusCode::OK
    );
}

#[tokio::test]
// Host values the app could read differently from the gateway are refused;
// an absolute-form target's authority is the host matched and forwarded.
async fn host_is_unambiguous() {
    let (_up, gw) = setup().await;
    for head in [
        "Host: a.example.com\r\nHost: admin.example.com",
        "Host: admin.example.com:1@x.example.com",
        "Host: a b",
    ] {
        let resp = raw(
            gw.addr,
            format!("GET /x HTTP/1.1\r\n{head}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(raw_status(&resp), 400, "{head}: {resp}");
    }
    let resp = raw(gw.addr, b"GET http://admin.example.com/x HTTP/1.1\r\nHost: other.example.com\r\nConnection: close\r\n\r\n").await;
    assert_eq!(raw_status(&resp), 200, "{resp}");
    assert!(resp.contains(r#""host":"admin.example.com""#), "{resp}");
    assert!(!resp.contains("other.example.com"), "{resp}");
}

#[tokio::test]
// Case-insensitive upstreams (IIS): with `case_insensitive: true` an
// `/admin/**` rule protects `/ADMIN/x` and every other case spelling, and
// `(?i)` works in path_regex; the upstream still gets the path as sent.
// Without the option the rule is case-sensitive (what `/ADMIN` bypassed).
async fn case_insensitive_rules_protect_every_case_spelling() {
    let up = Upstream::start().await;
    let yaml = config_yaml(&up.url(), CONSOLE, "")
        .replacen(
            "    path: /admin/**\n",
            "    path: /admin/**\n    case_insensitive: true\n",
            1,
        )
        .replacen(
            "    path: /account/**\n",
            "    path: /account/**\n    case_insensitive: true\n",
            1,
        )
        .replacen(
            "path_regex: '^/api/v[0-9]+/keys$'",
            "path_regex: '(?i)^/api/v[0-9]+/keys$'",
            1,
        );
    let gw = TestGateway::start(&yaml).await;
    let tok = primary_token("alice", Some("a@example.com"), Some("+15550100"), None);
    let auth = bearer(&tok);
    for path in ["/ADMIN/x", "/Admin/Users", "/aDmIn", "/%41DMIN/x"] {
        let res = get(&gw.url(path), &[("authorization", &auth)]).await;
        assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            res.json()["error"],
            "insufficient_user_authentication",
            "{path}"
        );
    }
    let res = request(
        Method::POST,
        &gw.url("/API/V2/KEYS"),
        &[("authorization", &auth)],
        Bytes::new(),
    )
    .await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        up.hits(),
        0,
        "a case spelling of a step-up route was forwarded"
    );
    // An identity-only rule in any case: refused without identity, and
    // forwarded with the original case once the identity is there.
    let res = get(&gw.url("/ACCOUNT/Profile"), &[]).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    let res = get(&gw.url("/ACCOUNT/Profile"), &[("authorization", &auth)]).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(res.json()["path"], "/ACCOUNT/Profile");
    assert_eq!(up.hits(), 1);

    // The same rules without the option: `/ADMIN/x` matches nothing and
    // follows `default: pass` (the bypass the option closes).
    let (up, plain) = setup().await;
    let res = get(&plain.url("/ADMIN/x"), &[("authorization", &auth)]).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
// Bug fix: whether a peer is a trusted proxy used to be decided when its
// connection was accepted, so after a reload that removed it, its open
// keep-alive connection stayed trusted. It is decided per request now.
async fn trusted_proxy_is_decided_per_request() {
    let up = Upstream::start().await;
    let base = config_yaml(&up.url(), CONSOLE, "");
    let trusting = base.replacen(
        "  drain_timeout: 5s\n",
        "  drain_timeout: 5s\n  trusted_proxies: [127.0.0.1/32]\n",
        1,
    );
    let gw = TestGateway::start(&trusting).await;
    let stream = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let mut xff_seen = Vec::new();
    for round in 0..2 {
        if round == 1 {
            let running = gw.running.as_ref().expect("running");
            running.gateway.reload(load(&base)).expect("reload");
        }
        send.ready().await.expect("connection still open");
        let req = http::Request::get("/x")
            .header("host", "app.test")
            .header("x-forwarded-for", "1.2.3.4")
            .body(http_body_util::Full::new(Bytes::new()))
            .expect("request");
        let res = send.send_request(req).await.expect("response");
        assert_eq!(res.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .expect("body")
            .to_bytes();
        let echo: serde_json::Value = serde_json::from_slice(&body).expect("echo JSON");
        xff_seen.push(
            echo["headers"]["x-forwarded-for"]
                .as_str()
                .map(str::to_string),
        );
    }
    assert_eq!(
        xff_seen,
        vec![
            Some("1.2.3.4, 127.0.0.1".to_string()),
            Some("127.0.0.1".to_string())
        ],
        "the same connection is trusted before the reload and not after"
    );
}

#[tokio::test]
// Refusals are rendered once, by who asked: a browser navigation gets a
// short HTML page, an API client the JSON error, with the same status.
async fn refusals_render_for_who_asked() {
    let (_up, gw) = setup().await;
    let page = get(&gw.url("/internal/x"), &[("accept", "text/html")]).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(page
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/html")));
    assert!(
        page.text().contains("this route is not available"),
        "{}",
        page.text()
    );
    let api = get(&gw.url("/internal/x"), &[("accept", "application/json")]).await;
    assert_eq!(api.status, StatusCode::FORBIDDEN);
    assert_eq!(api.json()["error"], "forbidden");
}

#[tokio::test]
// #10 item 6, response and framing hygiene: an unsolicited 101 from the
// upstream becomes a 502 (it would hand the client's connection to another
// protocol past the policy); HTTP/2 cookie fields reach an HTTP/1.1
// upstream as one Cookie header; logout's 204 is never cached.
async fn hygiene_unsolicited_101_h2_cookies_logout_no_store() {
    // An upstream that answers 101 to anything.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let bad = l.local_addr().expect("addr");
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                    .await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let gw = TestGateway::start(&config_yaml(&format!("http://{bad}"), CONSOLE, "")).await;
    let res = get(&gw.url("/x"), &[]).await;
    assert_eq!(res.status, StatusCode::BAD_GATEWAY);

    // HTTP/2 (prior knowledge on the plain listener): two cookie fields,
    // one Cookie line upstream, the second-factor cookie removed.
    let (up, gw) = setup().await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.expect("tcp");
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2c");
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/echo", gw.addr))
        .header("cookie", "a=1")
        .header("cookie", "stepgate_sf=tok")
        .header("cookie", "b=2")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("req");
    let res = send.send_request(req).await.expect("h2 response");
    assert_eq!(res.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .expect("body")
        .to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&body).expect("echo");
    let cookies: Vec<&str> = echo["header_lines"]
        .as_array()
        .expect("header_lines")
        .iter()
        .filter(|l| {
            l[0].as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case("cookie"))
        })
        .filter_map(|l| l[1].as_str())
        .collect();
    assert_eq!(cookies, vec!["a=1; b=2"]);
    assert_eq!(up.hits(), 1);

    // Logout answers 204 with no-store.
    let tok = primary_token("alice", Some("a@example.com"), None, None);
    let res = request(
        Method::POST,
        &gw.url("/.stepgate/api/logout"),
        &[("authorization", &bearer(&tok))],
        Bytes::new(),
    )
    .await;
    assert_eq!(res.status, StatusCode::NO_CONTENT);
    assert_eq!(res.header("cache-control"), Some("no-store"));
}

#[tokio::test]
// #10 item 4, cross-site form posts are not stashed: another site's form
// posting into a step-up route still meets the challenge, but its body is
// not kept for replay (which would complete the forged action after the
// user's own verification); a same-site post is kept.
async fn cross_site_form_posts_are_not_stashed() {
    let (_up, gw) = setup().await;
    let tok = primary_token("alice", Some("a@example.com"), None, Some("s1"));
    let auth = bearer(&tok);
    let host = gw.addr.to_string();
    let same_origin = format!("http://{host}");
    for (headers, kept) in [
        (vec![("sec-fetch-site", "cross-site")], false),
        (vec![("origin", "https://evil.example")], false),
        (vec![("origin", "null")], false),
        (vec![("sec-fetch-site", "same-origin")], true),
        (vec![("origin", same_origin.as_str())], true),
    ] {
        let mut h = vec![
            ("authorization", auth.as_str()),
            ("accept", "text/html"),
            ("content-type", "application/x-www-form-urlencoded"),
        ];
        h.extend(headers.iter().copied());
        let res = request(Method::POST, &gw.url("/admin/save"), &h, Bytes::from("a=1")).await;
        assert_eq!(res.status, StatusCode::SEE_OTHER, "{headers:?}");
        let location = res.header("location").unwrap_or_default();
        assert!(
            location.starts_with("/.stepgate/challenge?rd=/admin/save"),
            "{location}"
        );
        assert_eq!(
            location.contains("&stash="),
            kept,
            "{headers:?}: {location}"
        );
    }
}

/// What a [`counting_upstream`] saw happen to its connections.
#[derive(Debug, PartialEq)]
enum UpstreamConn {
    Opened,
    /// The gateway closed it (end of file while waiting for a request).
    ClosedByGateway,
}

/// `yaml` with one serving thread. Each serving thread keeps its own
/// upstream connections, and these tests count the upstream connections
/// that requests made one after another (each from a new client
/// connection, which may go to either thread) use.
fn one_worker(yaml: String) -> String {
    assert!(yaml.contains("  drain_timeout: 5s\n"));
    yaml.replace(
        "  drain_timeout: 5s\n",
        "  drain_timeout: 5s\n  workers: 1\n",
    )
}

/// A plain HTTP/1.1 upstream that answers `200 ok` to the first `answers`
/// request heads on each connection, then closes it: at once, or, with
/// `swallow`, after reading one more request it never answers. Reports
/// each connection opened and each one the gateway closed.
async fn counting_upstream(
    answers: usize,
    swallow: bool,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<UpstreamConn>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            let _ = tx.send(UpstreamConn::Opened);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for answered in 0.. {
                    if answered == answers && !swallow {
                        return;
                    }
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => {
                                let _ = tx.send(UpstreamConn::ClosedByGateway);
                                return;
                            }
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    buf.drain(..end);
                    if answered == answers {
                        return;
                    }
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<UpstreamConn>) -> Vec<UpstreamConn> {
    let mut seen = Vec::new();
    while let Ok(e) = rx.try_recv() {
        seen.push(e);
    }
    seen
}

#[tokio::test]
// The upstream pool: one keep-alive connection serves requests one after
// another, and is closed by the gateway once idle for pool_idle_timeout;
// with pool_max_idle_per_host 0 nothing is kept.
async fn upstream_connections_are_reused_and_expire_when_idle() {
    let (addr, mut events) = counting_upstream(usize::MAX, false).await;
    let yaml = one_worker(config_yaml(&format!("http://{addr}"), CONSOLE, "")).replace(
        "  timeout: 2s\n",
        "  timeout: 2s\n  pool_idle_timeout: 2s\n",
    );
    let gw = TestGateway::start(&yaml).await;
    for _ in 0..5 {
        let res = get(&gw.url("/x"), &[]).await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.text());
        assert_eq!(res.text(), "ok");
    }
    assert_eq!(drain(&mut events), vec![UpstreamConn::Opened]);
    let closed = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
    assert_eq!(
        closed.ok().flatten(),
        Some(UpstreamConn::ClosedByGateway),
        "idle connection not closed after pool_idle_timeout"
    );

    let (addr, mut events) = counting_upstream(usize::MAX, false).await;
    let yaml = one_worker(config_yaml(&format!("http://{addr}"), CONSOLE, "")).replace(
        "  timeout: 2s\n",
        "  timeout: 2s\n  pool_max_idle_per_host: 0\n",
    );
    let gw = TestGateway::start(&yaml).await;
    for _ in 0..3 {
        let res = get(&gw.url("/x"), &[]).await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    }
    let opened = drain(&mut events)
        .into_iter()
        .filter(|e| *e == UpstreamConn::Opened)
        .count();
    assert_eq!(
        opened, 3,
        "a connection was kept with pool_max_idle_per_host 0"
    );
}

#[tokio::test]
// An upstream that closes its keep-alive connections after each answer
// costs no failed request: a request is never sent on a connection known
// to be closed, and one not yet written goes out on a new connection. A
// request the upstream read and then dropped without an answer is a 502,
// never sent a second time (it may have been acted on).
async fn upstream_closing_keep_alive_connections() {
    let (addr, mut events) = counting_upstream(1, false).await;
    let gw = TestGateway::start(&one_worker(config_yaml(
        &format!("http://{addr}"),
        CONSOLE,
        "",
    )))
    .await;
    for i in 0..10 {
        let res = get(&gw.url("/x"), &[]).await;
        assert_eq!(res.status, StatusCode::OK, "request {i}: {}", res.text());
        assert_eq!(res.text(), "ok");
    }
    let opened = drain(&mut events)
        .into_iter()
        .filter(|e| *e == UpstreamConn::Opened)
        .count();
    assert_eq!(opened, 10);

    let (addr, mut events) = counting_upstream(1, true).await;
    let gw = TestGateway::start(&one_worker(config_yaml(
        &format!("http://{addr}"),
        CONSOLE,
        "",
    )))
    .await;
    let res = request(Method::POST, &gw.url("/x"), &[], Bytes::from("a=1")).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    let res = request(Method::POST, &gw.url("/x"), &[], Bytes::from("a=2")).await;
    assert_eq!(res.status, StatusCode::BAD_GATEWAY, "{}", res.text());
    assert_eq!(res.json()["error"], "upstream_unavailable");
    assert_eq!(
        drain(&mut events),
        vec![UpstreamConn::Opened],
        "the unanswered request was sent again"
    );
}

#[tokio::test]
// A client that stops reading a response body mid-way and goes away: the
// upstream connection carrying the rest of that body is closed, never
// pooled (the next request would read the old body's bytes), and the next
// request goes out on a new connection.
async fn abandoned_response_body_closes_its_upstream_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BIG: usize = 64 * 1024 * 1024;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut s, _)) = l.accept().await {
            let _ = tx.send(UpstreamConn::Opened);
            let (tx, big) = (tx.clone(), std::mem::replace(&mut first, false));
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    buf.drain(..end);
                    if !big {
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                        continue;
                    }
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n");
                    let mut ok = s.write_all(head.as_bytes()).await.is_ok();
                    let body = vec![b'x'; 64 * 1024];
                    let mut sent = 0;
                    while ok && sent < BIG {
                        ok = s.write_all(&body).await.is_ok();
                        sent += body.len();
                    }
                    if !ok {
                        let _ = tx.send(UpstreamConn::ClosedByGateway);
                    }
                    return;
                }
            });
        }
    });
    let gw = TestGateway::start(&config_yaml(&format!("http://{addr}"), CONSOLE, "")).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut s).await;
    assert_eq!(raw_status(&head), 200, "{head}");
    drop(s);
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Some(UpstreamConn::ClosedByGateway) => return true,
                Some(UpstreamConn::Opened) => continue,
                None => return false,
            }
        }
    })
    .await;
    assert_eq!(
        closed.ok(),
        Some(true),
        "the abandoned body's upstream connection was not closed"
    );
    let res = get(&gw.url("/x"), &[]).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(res.text(), "ok");
    assert_eq!(drain(&mut events), vec![UpstreamConn::Opened]);
}
