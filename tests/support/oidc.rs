//! A real OpenID provider for identity tests: the npm package
//! `oidc-provider` (pinned in `tests/support/oidc/package.json`, installed
//! by `scripts/test.sh` with `npm ci`) run by Node.js on a loopback port.
//! It issues real RS256 JWT access tokens (client_credentials with a
//! resource indicator), serves discovery and its JWKS, rotates its signing
//! keys on request, and can be stopped and started again on the same port
//! with the same keys.
//!
//! No free-port race: this process binds the listening socket (port 0
//! the first time, so the OS picks a free one) and hands it to Node as its
//! stdin, which serves on it (`--listen-fd 0`). There is no moment in which
//! the port is free but still meant for the provider, except while it is
//! stopped on purpose; binding it again then retries until the port is
//! free (a client's ephemeral port may hold it briefly).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use super::upstream::Upstream;

/// The audience (resource indicator) of every test token.
pub const AUDIENCE: &str = "https://app.test";

const CLIENT_ID: &str = "stepgate-tests";
const CLIENT_SECRET: &str = "stepgate-tests-secret-0123456789abcdef";
/// How long the provider gets to say it listens.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// The provider's directory (script, package.json, node_modules).
fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/oidc")
}

/// A running (or stopped) oidc-provider child process, killed when dropped.
pub struct OidcProvider {
    child: Option<Child>,
    /// 0 until the first start picks a port.
    port: u16,
    /// Keys and the provider's log live here.
    state: tempfile::TempDir,
    /// TLS certificate and key, and the CA that signed them.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl OidcProvider {
    /// Start a provider on a free port (plain HTTP).
    pub fn start() -> OidcProvider {
        let mut p = OidcProvider::unstarted(None);
        p.start_again();
        p
    }

    /// Start a provider serving HTTPS with `cert`/`key` (for `localhost`),
    /// signed by `ca`.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path) -> OidcProvider {
        let mut p = OidcProvider::unstarted(Some((cert.into(), key.into(), ca.into())));
        p.start_again();
        p
    }

    /// A provider that is not running yet, whose issuer URL is already
    /// known: its port is one the OS found free, bound by
    /// [`start_again`](Self::start_again).
    pub fn stopped(tls: Option<(PathBuf, PathBuf, PathBuf)>) -> OidcProvider {
        let mut p = OidcProvider::unstarted(tls);
        p.port = super::gateway::free_port();
        p
    }

    fn unstarted(tls: Option<(PathBuf, PathBuf, PathBuf)>) -> OidcProvider {
        assert!(
            dir().join("node_modules/oidc-provider").is_dir(),
            "oidc-provider is not installed: run `npm ci --prefix tests/support/oidc` (scripts/test.sh does)"
        );
        OidcProvider {
            child: None,
            port: 0,
            state: tempfile::tempdir().expect("temporary directory for the provider"),
            tls,
        }
    }

    /// The listening socket for the provider: on a port the OS picks the
    /// first time, on the same port again after a stop.
    fn bind(&mut self) -> TcpListener {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            match TcpListener::bind(addr) {
                Ok(l) => {
                    self.port = l.local_addr().expect("bound address").port();
                    return l;
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    // Poll interval while another socket holds the port.
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot bind the provider's port {}: {e}", self.port),
            }
        }
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` with TLS.
    pub fn issuer(&self) -> String {
        match self.tls {
            Some(_) => format!("https://localhost:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// Where its JWKS is published.
    pub fn jwks_url(&self) -> String {
        format!("{}/jwks", self.issuer())
    }

    /// Kill the provider; the port and keys are kept for `start_again`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start (again) on the same port with the same keys, and wait until
    /// it says it listens.
    pub fn start_again(&mut self) {
        self.stop();
        let listener = self.bind();
        let log = std::fs::File::create(self.state.path().join("provider.log"))
            .expect("provider log file");
        let mut cmd = Command::new("node");
        cmd.arg(dir().join("server.mjs"))
            .args(["--listen-fd", "0"])
            .arg("--state")
            .arg(self.state.path());
        if let Some((cert, key, _)) = &self.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        let mut child = cmd
            .current_dir(dir())
            // The provider serves on the socket bound here; dropping `cmd`
            // below closes this process's copy, so a stopped provider's
            // port refuses connections.
            .stdin(Stdio::from(OwnedFd::from(listener)))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn node (is Node.js installed? scripts/test.sh installs it)");
        drop(cmd);
        let stdout = child.stdout.take().expect("provider stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the provider never blocks on a full pipe.
            for _ in lines {}
        });
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(50)) {
                assert_eq!(
                    line,
                    format!("listening {}", self.issuer()),
                    "unexpected first line from the provider"
                );
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("oidc-provider exited early ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "oidc-provider did not start in time: {}",
                self.log()
            );
        }
        self.child = Some(child);
    }

    /// The provider's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("provider.log")).unwrap_or_default()
    }

    /// A real access token for `resource` (its `aud`), carrying `claims`
    /// (e.g. `{"sub": "alice", "amr": ["mfa"], "auth_time": ...}`).
    pub async fn token(&self, resource: &str, claims: &Value) -> String {
        let body = format!(
            "grant_type=client_credentials&scope=api&resource={}&test_claims={}",
            form_encode(resource),
            form_encode(&claims.to_string())
        );
        let basic = STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
        let (status, res) = self
            .call(
                Method::POST,
                "/token",
                &[
                    ("authorization", &format!("Basic {basic}")),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                body,
            )
            .await;
        assert_eq!(status, 200, "token request failed: {res}");
        res["access_token"]
            .as_str()
            .expect("access_token in the token response")
            .to_string()
    }

    /// Put a new signing key first (tokens are signed with it from now on).
    /// `keep_old: false` also stops publishing the old keys. Returns the
    /// new key's `kid`.
    pub async fn rotate(&self, keep_old: bool) -> String {
        let path = if keep_old {
            "/_test/rotate"
        } else {
            "/_test/rotate?keep=0"
        };
        let (status, res) = self.call(Method::POST, path, &[], String::new()).await;
        assert_eq!(status, 200, "rotate: {res}");
        res["kid"].as_str().expect("kid").to_string()
    }

    /// `Cache-Control: max-age=N` on JWKS responses from now on (`None`: no header).
    pub async fn set_jwks_max_age(&self, seconds: Option<u64>) {
        let s = seconds.map_or(-1, |s| s as i64);
        let (status, _) = self
            .call(
                Method::POST,
                &format!("/_test/jwks-max-age?s={s}"),
                &[],
                String::new(),
            )
            .await;
        assert_eq!(status, 200);
    }

    /// How many times the JWKS was requested.
    pub async fn jwks_requests(&self) -> u64 {
        let (_, res) = self
            .call(Method::GET, "/_test/stats", &[], String::new())
            .await;
        res["jwks_requests"].as_u64().expect("jwks_requests")
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: String,
    ) -> (u16, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.issuer()));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body))).expect("request");
        let mut roots = rustls::RootCertStore::empty();
        if let Some((_, _, ca)) = &self.tls {
            use rustls_pki_types::pem::PemObject;
            for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("CA file") {
                roots.add(cert.expect("CA cert")).expect("add CA");
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
        let res = tokio::time::timeout(Duration::from_secs(20), client.request(req))
            .await
            .expect("provider answers within 20s")
            .expect("provider request");
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.expect("body").to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.stop();
    }
}

fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A gateway config in front of `upstream` whose primary identity comes
/// from a provider: `identity.jwt` gets the lines in `jwt` (indented by
/// four spaces). Routes: `/assets/**` public, `/account/**` identity,
/// `/admin/**` a code, `/payroll/**` a code or the provider's MFA (amr
/// `mfa`/`hwk` or acr `urn:example:loa:2`), `/export/**` one-time with the
/// provider's `mfa`.
pub fn gateway_yaml(upstream: &Upstream, jwt: &str) -> String {
    format!(
        r#"listen: {{ address: 127.0.0.1:0 }}
admin: {{ address: 127.0.0.1:0 }}
upstream: {{ url: "http://{}", timeout: 5s }}
identity:
  jwt:
{jwt}
    audience: {AUDIENCE}
    leeway: 0s
stepup:
  token: {{ signing_key: test-stepup-signing-key-0123456789abcdef }}
  console: true
routes:
  - name: static
    path: /assets/**
    public: true
  - name: account
    path: /account/**
  - name: admin
    path: /admin/**
    stepup: {{ max_age: 5m }}
  - name: payroll
    path: /payroll/**
    stepup: {{ max_age: 5m, idp: {{ amr: [mfa, hwk], acr: ["urn:example:loa:2"] }} }}
  - name: export
    path: /export/**
    stepup: {{ max_age: 5m, one_time: true, idp: {{ amr: [mfa] }} }}
dev: true
"#,
        upstream.addr
    )
}

/// The claims of a user signed in at the provider (password only).
pub fn user(sub: &str) -> Value {
    json!({"sub": sub, "email": format!("{sub}@example.com"), "sid": format!("sid-{sub}")})
}

/// A user whose sign-in at the provider proved `amr`/`acr` at `auth_time`.
pub fn signed_in(sub: &str, amr: &[&str], acr: Option<&str>, auth_time: u64) -> Value {
    let mut c = user(sub);
    c["amr"] = json!(amr);
    c["auth_time"] = json!(auth_time);
    if let Some(acr) = acr {
        c["acr"] = json!(acr);
    }
    c
}
