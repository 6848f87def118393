//! Faults under load, with real processes and bounded request counts:
//!
//! - Redis killed and restarted under a mixed load: nothing protected is
//!   forwarded without a valid second factor; everything recovers;
//! - SMTP and SMS providers slow or down: clean JSON 5xx answers, bounded by
//!   the configured timeouts, while other traffic flows;
//! - an upstream resetting the connection mid-body: 502 (or a response the
//!   client can tell is cut short), never a panic, the gateway keeps serving;
//! - SIGTERM under load: every in-flight request completes;
//! - the policy reloaded 50 times under load: zero failed requests.
//!
//! Progress is awaited by polling state (request counts, metrics, ports),
//! never by sleeping a guessed time.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use support::flow::*;
use support::gateway::*;
use support::http_sink::HttpSink;
use support::upstream::Upstream;
use support::{eventually, PATIENCE};

/// One request; `Err` for a connection-level failure (no response).
async fn try_request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(StatusCode, Bytes), String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let res = tokio::time::timeout(PATIENCE, client.request(req))
        .await
        .map_err(|_| "no response head in time".to_string())?
        .map_err(|e| e.to_string())?;
    let status = res.status();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// A token the gateway must refuse: a valid one with its signature changed.
fn forged(token: &str) -> String {
    let mut t = token.to_string();
    let last = t.pop().unwrap_or('A');
    t.push(if last == 'A' { 'B' } else { 'A' });
    t
}

// Redis dies and comes back while four clients send a mix of requests:
// protected with a valid factor (200 or 503), without or with a forged
// factor (always 401), public (always 200), and code requests (202 or 503).
// Nothing protected reaches the app without a valid factor; after the
// restart the whole flow works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_mixed_load() {
    const WORKERS: usize = 4;
    const PER_WORKER: usize = 120;
    let otp = format!("{OTP}    max_sends_per_client: 0\n");
    let mut env = Env::start(true, &otp).await;
    let alice = user("alice", None);
    let token = step_up(&env, &alice, 0).await;
    let hits_before = env.up.hits();
    let gw_url = env.gw.url("");

    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (done, gw_url, alice, token) =
                (done.clone(), gw_url.clone(), alice.clone(), token.clone());
            tokio::spawn(async move {
                let mut forwarded = 0usize;
                let mut unavailable = 0usize;
                let mut wrong = Vec::new();
                for i in 0..PER_WORKER {
                    let kind = (i + w) % 5;
                    let bad = forged(&token);
                    let someone = user(&format!("load-{w}-{i}"), None);
                    let (method, path, headers, body): (_, _, Vec<(&str, &str)>, _) = match kind {
                        0 => (
                            Method::GET,
                            "/admin/x",
                            vec![
                                ("authorization", alice.auth.as_str()),
                                ("x-second-factor-token", token.as_str()),
                            ],
                            Bytes::new(),
                        ),
                        1 => (
                            Method::GET,
                            "/admin/x",
                            vec![("authorization", alice.auth.as_str())],
                            Bytes::new(),
                        ),
                        2 => (
                            Method::GET,
                            "/billing/export",
                            vec![
                                ("authorization", alice.auth.as_str()),
                                ("x-second-factor-token", bad.as_str()),
                            ],
                            Bytes::new(),
                        ),
                        3 => (Method::GET, "/assets/app.js", vec![], Bytes::new()),
                        _ => (
                            Method::POST,
                            "/.stepgate/api/otp",
                            vec![
                                ("authorization", someone.auth.as_str()),
                                ("content-type", "application/json"),
                            ],
                            Bytes::from_static(br#"{"method":"email"}"#),
                        ),
                    };
                    let result =
                        try_request(method, &format!("{gw_url}{path}"), &headers, body).await;
                    let status = match result {
                        Ok((status, _)) => status,
                        Err(e) => {
                            wrong.push(format!("kind {kind}: {e}"));
                            done.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                    };
                    let fine = match (kind, status.as_u16()) {
                        (0, 200) | (3, 200) => {
                            forwarded += 1;
                            true
                        }
                        (0, 503) | (4, 503) => {
                            unavailable += 1;
                            true
                        }
                        (1 | 2, 401) | (4, 202) => true,
                        _ => false,
                    };
                    if !fine {
                        wrong.push(format!("kind {kind}: {status}"));
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
                (forwarded, unavailable, wrong)
            })
        })
        .collect();

    // Kill Redis a quarter of the way in, bring it back at the half.
    let total = WORKERS * PER_WORKER;
    eventually("a quarter of the load", || async {
        done.load(Ordering::SeqCst) >= total / 4
    })
    .await;
    env.redis.as_mut().expect("redis").stop();
    let stopped_at = done.load(Ordering::SeqCst);
    eventually("half of the load", || async {
        done.load(Ordering::SeqCst) >= total / 2
    })
    .await;
    env.redis.as_mut().expect("redis").start_again();

    let (mut forwarded, mut unavailable, mut wrong) = (0, 0, Vec::new());
    for w in workers {
        let (f, u, mut bad) = w.await.expect("worker");
        forwarded += f;
        unavailable += u;
        wrong.append(&mut bad);
    }
    assert!(wrong.is_empty(), "unexpected answers: {wrong:?}");
    assert!(stopped_at < total / 2);
    assert!(unavailable > 0, "the outage was never seen");
    assert_eq!(
        env.up.hits() - hits_before,
        forwarded,
        "the app saw requests the gateway did not answer 200 for"
    );

    // Recovery: ready again, and a new step-up works end to end (the
    // restarted Redis is empty: the old token's session state is gone, the
    // token itself is still valid).
    eventually("/readyz after the restart", || async {
        get(&env.gw.admin_url("/readyz"), &[]).await.status == StatusCode::OK
    })
    .await;
    let bob = user("bob", None);
    let fresh = step_up(&env, &bob, 0).await;
    assert_eq!(
        protected(&env.gw, "/billing/export", &bob, &fresh)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        protected(&env.gw, "/billing/export", &bob, &fresh)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

/// An SMTP server that accepts connections and never says a word.
async fn silent_server() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (port, task)
}

// SMTP and SMS providers that hang (accept, never answer) or are down
// (nothing listening): eight parallel code requests per gateway all get a
// clean `502 delivery_failed` JSON answer within the configured 3 s
// timeouts (the guard allows far more), and public traffic keeps flowing
// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_slow_or_down_answer_cleanly_within_timeouts() {
    const GUARD: Duration = Duration::from_secs(15);
    let up = Upstream::start().await;
    let (silent_smtp, _silent) = silent_server().await;
    let slow_sms = HttpSink::start_delayed(200, Duration::from_secs(60)).await;
    let dead_port = free_port();
    let otp = format!("{OTP}    max_sends_per_client: 0\n");
    let slow = TestGateway::start(&config_yaml(
        &up.url(),
        &stepup_yaml(silent_smtp, &slow_sms.url(), &otp),
        "",
    ))
    .await;
    let down = TestGateway::start(&config_yaml(
        &up.url(),
        &stepup_yaml(dead_port, &format!("http://127.0.0.1:{dead_port}"), &otp),
        "",
    ))
    .await;

    for (name, gw) in [("slow", &slow), ("down", &down)] {
        let sends: Vec<_> = (0..8)
            .map(|i| {
                let url = gw.url("/.stepgate/api/otp");
                let channel = if i % 2 == 0 { "email" } else { "sms" };
                let u = user(&format!("{name}-{i}"), None);
                tokio::spawn(async move {
                    let body = format!(r#"{{"method":"{channel}"}}"#);
                    tokio::time::timeout(
                        GUARD,
                        try_request(
                            Method::POST,
                            &url,
                            &[
                                ("authorization", &u.auth),
                                ("content-type", "application/json"),
                            ],
                            Bytes::from(body),
                        ),
                    )
                    .await
                })
            })
            .collect();
        // Other traffic is not held up by the hanging sends.
        for _ in 0..10 {
            assert_eq!(
                get(&gw.url("/assets/a.css"), &[]).await.status,
                StatusCode::OK
            );
        }
        for send in sends {
            let (status, body) = send
                .await
                .expect("task")
                .unwrap_or_else(|_| panic!("{name}: a send hung past the timeouts"))
                .unwrap_or_else(|e| panic!("{name}: no answer: {e}"));
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{name}");
            let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON error");
            assert_eq!(json["error"], "delivery_failed", "{name}");
        }
    }
}

/// An upstream that breaks connections with a TCP reset: `/reset-head`
/// after reading the request head, `/reset-upload` after the first bytes
/// of the request body, `/reset-body` after sending a response head and
/// part of the promised body; `/ok` answers normally.
async fn resetting_upstream() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                match path.as_str() {
                    "/ok" => {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                            .await;
                        return;
                    }
                    "/reset-upload" => {
                        let _ = stream.read(&mut buf).await;
                    }
                    "/reset-body" => {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
                            .await;
                        let _ = stream.write_all(&[b'x'; 10_000]).await;
                        let _ = stream.flush().await;
                    }
                    _ => {}
                }
                // SO_LINGER 0: closing sends RST instead of FIN.
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
                drop(stream);
            });
        }
    });
    (url, task)
}

// An upstream resetting mid-request or mid-response, 24 times in parallel:
// a reset before the response head is `502 upstream_unavailable`; one
// mid-upload or mid-response is a 502 or a connection the client sees
// broken (never a success, never a complete body); the binary logs no
// panic and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_resetting_mid_body() {
    let (upstream, _task) = resetting_upstream().await;
    let gw = BinaryGateway::start_logged(&config_yaml(&upstream, CONSOLE, "")).await;
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let base = gw.url("");
            tokio::spawn(async move {
                match i % 3 {
                    0 => try_request(
                        Method::GET,
                        &format!("{base}/reset-head"),
                        &[],
                        Bytes::new(),
                    )
                    .await
                    .map(|(s, b)| (0, s, b)),
                    1 => try_request(
                        Method::POST,
                        &format!("{base}/reset-upload"),
                        &[("content-type", "application/octet-stream")],
                        Bytes::from(vec![b'u'; 256 * 1024]),
                    )
                    .await
                    .map(|(s, b)| (1, s, b)),
                    _ => try_request(
                        Method::GET,
                        &format!("{base}/reset-body"),
                        &[],
                        Bytes::new(),
                    )
                    .await
                    .map(|(s, b)| (2, s, b)),
                }
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("task") {
            // Whatever the timing, an answer is a clean 502, never a
            // success (a cut-off body never arrives as complete).
            Ok((_kind, status, body)) => {
                assert_eq!(
                    status,
                    StatusCode::BAD_GATEWAY,
                    "request {i}: {} bytes",
                    body.len()
                );
                let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON error");
                assert_eq!(json["error"], "upstream_unavailable");
            }
            // A reset before the response head is always answered; the
            // upload and the response body may instead break the client's
            // connection (the gateway stops reading the upload, or had
            // already sent the head), which the client sees as a failure.
            Err(e) => {
                assert_ne!(i % 3, 0, "request {i} failed without an answer: {e}");
            }
        }
    }
    let (status, body) = try_request(Method::GET, &gw.url("/ok"), &[], Bytes::new())
        .await
        .expect("still serving");
    assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"ok"[..]));
    let log = std::fs::read_to_string(gw.log_path()).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}

// SIGTERM while 20 slow requests are in flight (and more are arriving):
// every in-flight request completes with its full answer, and the process
// exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_completes_in_flight_requests() {
    const IN_FLIGHT: usize = 20;
    let up = Upstream::start().await;
    let mut gw = BinaryGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let url = gw.url("/slow?ms=1500");
            tokio::spawn(async move { try_request(Method::GET, &url, &[], Bytes::new()).await })
        })
        .collect();
    eventually("every request to reach the app", || async {
        up.hits() >= IN_FLIGHT
    })
    .await;
    gw.signal("TERM");
    for t in tasks {
        let (status, body) = t.await.expect("task").expect("in-flight request completes");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.as_ref(), b"slow done");
    }
    let status = tokio::task::spawn_blocking(move || gw.child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "exit status {status}");
}

// The policy reloaded 50 times (SIGHUP after each edit) while four clients
// send requests whose answers no edit changes: every request gets the
// expected answer, none fails; each edit is live before the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reloaded_50_times_under_load_with_zero_failed_requests() {
    const RELOADS: usize = 50;
    let up = Upstream::start().await;
    let gw = BinaryGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    let base = std::fs::read_to_string(&gw.config).expect("read config");
    // The config becomes a symlink to a file outside the watched directory,
    // so only SIGHUP reloads it: one reload per edit, no watcher delay.
    let outside = tempfile::tempdir().expect("tempdir");
    let real = outside.path().join("real.yaml");
    std::fs::write(&real, &base).expect("write real config");
    let link = gw.config.with_extension("yaml.link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    std::fs::rename(&link, &gw.config).expect("swap in the symlink");

    let stop = Arc::new(AtomicBool::new(false));
    let token = primary_token("alice", None, None, None);
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (stop, base, auth) = (stop.clone(), gw.url(""), format!("Bearer {token}"));
            tokio::spawn(async move {
                let mut sent = 0usize;
                let mut failed = Vec::new();
                // Bounded: the reloads finish long before this many.
                while !stop.load(Ordering::SeqCst) && sent < 20_000 {
                    let (path, want) = match (sent + w) % 3 {
                        0 => ("/account/profile", StatusCode::OK),
                        1 => ("/assets/app.js", StatusCode::OK),
                        _ => ("/internal/x", StatusCode::FORBIDDEN),
                    };
                    let headers = [("authorization", auth.as_str())];
                    match try_request(
                        Method::GET,
                        &format!("{base}{path}"),
                        &headers,
                        Bytes::new(),
                    )
                    .await
                    {
                        Ok((status, _)) if status == want => {}
                        Ok((status, _)) => failed.push(format!("{path}: {status}")),
                        Err(e) => failed.push(format!("{path}: {e}")),
                    }
                    sent += 1;
                }
                (sent, failed)
            })
        })
        .collect();

    for i in 0..RELOADS {
        let extra = format!("  - name: extra{i}\n    path: /extra/{i}\n    deny: true\n");
        let edited = base.replacen("routes:\n", &format!("routes:\n{extra}"), 1);
        std::fs::write(&real, edited).expect("edit config");
        gw.signal("HUP");
        let probe = gw.url(&format!("/extra/{i}"));
        eventually(&format!("reload {i} to be live"), || async {
            get(&probe, &[]).await.status == StatusCode::FORBIDDEN
        })
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for w in workers {
        let (sent, failed) = w.await.expect("worker");
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        total += sent;
    }
    assert!(total >= RELOADS, "only {total} requests under load");
    let metrics = get(&format!("http://{}/metrics", gw.admin), &[])
        .await
        .text();
    let count = |event: &str| {
        let prefix = format!("stepgate_config_reloads_total{{event=\"{event}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or(0)
    };
    assert!(count("ok") >= RELOADS, "{metrics}");
    assert_eq!(count("rejected"), 0, "{metrics}");
}
