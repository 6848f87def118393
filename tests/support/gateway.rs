//! The gateway under test: in-process on 127.0.0.1:0, or the real binary,
//! plus an HTTP client, a raw-socket client and a primary-token minter.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use stepgate::{Config, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// HS256 secret of primary tokens in tests.
pub const JWT_SECRET: &str = "test-primary-secret-0123456789abcdef";
/// HS256 key of second-factor tokens in tests.
pub const STEPUP_KEY: &str = "test-stepup-signing-key-0123456789abcdef";

/// A config with the usual test routes in front of `upstream`. `extra`
/// is appended at the top level (e.g. a `store:` section).
pub fn config_yaml(upstream: &str, stepup_extra: &str, extra: &str) -> String {
    format!(
        r#"listen:
  address: 127.0.0.1:0
  header_read_timeout: 2s
  drain_timeout: 5s
admin:
  address: 127.0.0.1:0
upstream:
  url: {upstream}
  connect_timeout: 1s
  timeout: 2s
identity:
  jwt:
    algorithms: [HS256]
    secret: {JWT_SECRET}
    issuer: https://idp.test
    audience: legacy-app
    leeway: 0s
  trusted_header:
    user: X-Forwarded-User
    email: X-Forwarded-Email
    from: [10.9.9.9/32]
  login_url: https://idp.test/login
stepup:
  token:
    signing_key: {STEPUP_KEY}
{stepup_extra}
routes:
  - name: static
    path: /assets/**
    public: true
  - name: internal
    path: /internal/**
    deny: true
  - name: admin
    path: /admin/**
    stepup: {{ max_age: 5m }}
  - name: export
    path: /billing/export
    stepup: {{ max_age: 5m, one_time: true }}
  - name: keys
    path_regex: '^/api/v[0-9]+/keys$'
    methods: [POST, DELETE]
    stepup: {{ max_age: 1m, factors: [sms] }}
  - name: account
    path: /account/**
default: pass
dev: true
{extra}
"#
    )
}

/// The default `stepup_extra`: console delivery in dev mode.
pub const CONSOLE: &str = "  console: true\n";

pub fn load(yaml: &str) -> Config {
    let dir = std::env::temp_dir();
    Config::from_yaml(&dir.join("gateway.yaml"), yaml, &Default::default())
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}"))
}

/// Every problem `Config::from_yaml` reports for `yaml` as the file
/// `g.yaml` (`FILE:LINE:COL: key: message` lines), empty when it is valid.
pub fn config_problems(yaml: &str) -> String {
    match Config::from_yaml(Path::new("g.yaml"), yaml, &Default::default()) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

/// An in-process gateway on ephemeral ports.
pub struct TestGateway {
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl TestGateway {
    pub async fn start(yaml: &str) -> TestGateway {
        let running = stepgate::start(load(yaml)).await.expect("gateway starts");
        TestGateway {
            addr: running.addr,
            admin: running.admin_addr,
            running: Some(running),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("clean shutdown");
        }
    }
}

/// Wait until `/readyz` answers 200 (e.g. the provider's keys arrived).
pub async fn wait_ready(gw: &TestGateway) {
    super::eventually("/readyz 200", || async {
        get(&gw.admin_url("/readyz"), &[]).await.status == 200
    })
    .await;
}

/// The value of the first `/metrics` line starting with `prefix` (0 when
/// absent).
pub async fn metric(gw: &TestGateway, prefix: &str) -> f64 {
    let text = get(&gw.admin_url("/metrics"), &[]).await.text();
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Mint a primary token like an identity provider would.
pub fn primary_token(
    sub: &str,
    email: Option<&str>,
    phone: Option<&str>,
    sid: Option<&str>,
) -> String {
    let now = stepgate::token::unix_now();
    let mut claims = serde_json::json!({
        "sub": sub, "iss": "https://idp.test", "aud": "legacy-app", "iat": now, "exp": now + 3600,
    });
    if let Some(e) = email {
        claims["email"] = e.into();
    }
    if let Some(p) = phone {
        claims["phone_number"] = p.into();
    }
    if let Some(s) = sid {
        claims["sid"] = s.into();
    }
    sign(&claims)
}

/// Sign arbitrary claims with the test primary secret (HS256).
pub fn sign(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign test token")
}

/// A response read whole.
#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `Retry-After` in seconds (0 when absent or unparsable).
    pub fn retry_after(&self) -> u64 {
        self.header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The echo upstream's view of a request header.
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_string)
    }

    /// Every value the echo upstream received for `name` (lower case), one
    /// per header line, in order: a duplicate cannot hide behind the first.
    pub fn upstream_header_all(&self, name: &str) -> Vec<String> {
        self.json()["header_lines"]
            .as_array()
            .expect("an echo response with header_lines")
            .iter()
            .filter(|l| l[0].as_str() == Some(name))
            .filter_map(|l| l[1].as_str().map(str::to_string))
            .collect()
    }

    /// Every header name the echo upstream received, one per line.
    pub fn upstream_header_names(&self) -> Vec<String> {
        self.json()["header_lines"]
            .as_array()
            .expect("an echo response with header_lines")
            .iter()
            .filter_map(|l| l[0].as_str().map(str::to_string))
            .collect()
    }
}

/// Send one request over a fresh HTTP/1.1 connection.
pub async fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> TestResponse {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(body.into()))
        .expect("valid test request");
    let res = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("response within 30s")
        .expect("request succeeds");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    TestResponse {
        status,
        headers,
        body,
    }
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> TestResponse {
    request(Method::GET, url, headers, Bytes::new()).await
}

/// Write raw bytes on a new connection and read until the peer closes or
/// `Connection: close` response ends (bounded by a timeout).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP/1.1 response.
pub fn raw_status(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The real `stepgate` binary serving a config file.
pub struct BinaryGateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    _dir: tempfile::TempDir,
}

impl BinaryGateway {
    /// Start the binary with `yaml` (its `listen`/`admin` addresses are
    /// replaced by free ports) and wait until `/healthz` answers.
    pub async fn start(yaml: &str) -> BinaryGateway {
        BinaryGateway::start_inner(yaml, false).await
    }

    /// Like `start`, with the process's log (stderr) kept in `log_path()`.
    pub async fn start_logged(yaml: &str) -> BinaryGateway {
        BinaryGateway::start_inner(yaml, true).await
    }

    /// Where `start_logged` writes the gateway's log.
    pub fn log_path(&self) -> PathBuf {
        self._dir.path().join("stepgate.log")
    }

    async fn start_inner(yaml: &str, logged: bool) -> BinaryGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, a) = (free_port(), free_port());
        let yaml = yaml
            .replacen(
                "address: 127.0.0.1:0",
                &format!("address: 127.0.0.1:{p}"),
                1,
            )
            .replacen(
                "address: 127.0.0.1:0",
                &format!("address: 127.0.0.1:{a}"),
                1,
            );
        let config = dir.path().join("gateway.yaml");
        std::fs::write(&config, yaml).expect("write config");
        let stderr = if logged {
            Stdio::from(std::fs::File::create(dir.path().join("stepgate.log")).expect("log file"))
        } else {
            Stdio::null()
        };
        let child = Command::new(env!("CARGO_BIN_EXE_stepgate"))
            .args(["run", "-c"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn stepgate");
        let gw = BinaryGateway {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], p)),
            admin: SocketAddr::from(([127, 0, 0, 1], a)),
            config,
            _dir: dir,
        };
        gw.wait_healthy().await;
        gw
    }

    async fn wait_healthy(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            if TcpStream::connect(self.admin).await.is_ok()
                && TcpStream::connect(self.addr).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("stepgate binary did not become healthy");
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for BinaryGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run the binary to completion with `args` and exactly these extra
/// environment variables: the variables configs may refer to are removed
/// first, so a developer's shell cannot make a test pass or fail.
pub fn run_cli(args: &[&str], cwd: Option<&Path>, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stepgate"));
    cmd.args(args);
    for var in [
        "JWT_SECRET",
        "STEPGATE_KEY",
        "STEPGATE_CONFIG",
        "SMTP_PASSWORD",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let out = cmd.output().expect("run stepgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
