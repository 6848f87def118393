//! A real SMTP server (aiosmtpd) on a free loopback port.
//!
//! The server is `tests/support/smtp_sink.py`, run with Debian's
//! `/usr/bin/python3` (package `python3-aiosmtpd`). Every message it accepts
//! lands as a file in a fresh temporary directory; the helpers here read
//! those files back and pick MIME messages apart.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;

/// The interpreter that has `aiosmtpd` (the `python3` on PATH may not).
const PYTHON: &str = "/usr/bin/python3";
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/smtp_sink.py");
/// How long the server may take to print its READY line.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A message as the server received it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Received {
    /// Envelope sender (`MAIL FROM`).
    pub mail_from: String,
    /// Envelope recipients (`RCPT TO`).
    pub rcpt_tos: Vec<String>,
    /// The raw RFC 5322 message.
    pub data: String,
}

/// A running SMTP sink; killed when dropped.
pub struct SmtpServer {
    child: Option<Child>,
    /// Kept open: the script exits when its stdin closes, so it cannot
    /// outlive this process even if `Drop` never runs.
    _stdin: Option<ChildStdin>,
    port: u16,
    dir: tempfile::TempDir,
}

impl SmtpServer {
    /// A sink that accepts every message, no authentication.
    pub fn start() -> SmtpServer {
        SmtpServer::start_with(&[])
    }

    /// A sink that answers `554` to every DATA.
    pub fn start_failing() -> SmtpServer {
        SmtpServer::start_with(&["--fail"])
    }

    /// A sink that requires SMTP AUTH with these credentials (allowed
    /// without TLS).
    pub fn start_with_auth(user: &str, password: &str) -> SmtpServer {
        SmtpServer::start_with(&["--auth", &format!("{user}:{password}")])
    }

    /// A sink that speaks TLS with a certificate for `127.0.0.1`/`localhost`
    /// issued by `ca`: `"starttls"` (STARTTLS offered and required) or
    /// `"implicit"` (TLS from the first byte); with `auth`, SMTP AUTH with
    /// those credentials is required too.
    pub fn start_tls(mode: &str, ca: &TestCa, auth: Option<(&str, &str)>) -> SmtpServer {
        let cert = ca.cert.to_string_lossy().into_owned();
        let key = ca.key.to_string_lossy().into_owned();
        let credentials = auth.map(|(user, password)| format!("{user}:{password}"));
        let mut args = vec!["--tls", mode, "--tls-cert", &cert, "--tls-key", &key];
        if let Some(credentials) = &credentials {
            args.extend(["--auth", credentials]);
        }
        SmtpServer::start_with(&args)
    }

    /// A sink started with extra `smtp_sink.py` arguments.
    pub fn start_with(extra_args: &[&str]) -> SmtpServer {
        let dir = tempfile::tempdir().expect("create temp dir for the SMTP sink");
        let mut child = Command::new(PYTHON)
            .arg(SCRIPT)
            .arg("--port")
            .arg("0")
            .arg("--dir")
            .arg(dir.path())
            .args(extra_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("start {PYTHON} {SCRIPT}: {e} (apt-get install -y python3-aiosmtpd)")
            });
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");

        // Read the READY line on a thread so a hung script cannot hang the
        // test; keep draining stdout afterwards so the script never blocks.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            for _ in lines {}
        });
        let port = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) => line
                .strip_prefix("READY ")
                .and_then(|p| p.trim().parse::<u16>().ok())
                .unwrap_or_else(|| panic!("SMTP sink said {line:?} instead of READY <port>")),
            other => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "SMTP sink did not start ({other:?}, exit {status:?}); \
                     is python3-aiosmtpd installed for {PYTHON}?"
                )
            }
        };

        SmtpServer {
            child: Some(child),
            _stdin: stdin,
            port,
            dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory the received messages are written to.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Every message received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .expect("read SMTP sink dir")
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|ext| ext == "json"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|path| {
                let text = std::fs::read_to_string(path).expect("read received message");
                serde_json::from_str(&text).expect("SMTP sink record is JSON")
            })
            .collect()
    }

    /// The raw text of every message received so far, in arrival order.
    pub fn messages(&self) -> Vec<String> {
        self.received().into_iter().map(|r| r.data).collect()
    }

    /// Waits until a message for envelope recipient `to` has arrived and
    /// returns its raw text; panics after `timeout`.
    pub async fn wait_for_message(&self, to: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .received()
                .into_iter()
                .find(|r| r.rcpt_tos.iter().any(|rcpt| rcpt.eq_ignore_ascii_case(to)));
            if let Some(received) = found {
                return received.data;
            }
            if Instant::now() >= deadline {
                panic!("no message for {to} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server; later connections are refused. Received messages
    /// stay readable.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self._stdin = None;
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A throw-away certificate authority and one server certificate it issued
/// (for `127.0.0.1` and `localhost`), made with the `openssl` command.
pub struct TestCa {
    /// The CA certificate (PEM), to trust as an extra root.
    pub ca_pem: PathBuf,
    /// The server certificate (PEM).
    pub cert: PathBuf,
    /// The server private key (PEM).
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn generate() -> TestCa {
        let dir = tempfile::tempdir().expect("create temp dir for certificates");
        let path = |name: &str| dir.path().join(name);
        std::fs::write(
            path("leaf.ext"),
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\n\
             subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("write extension file");
        let p = |name: &str| path(name).to_string_lossy().into_owned();
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        // Temp paths and subjects contain no spaces, so splitting is safe.
        let steps = [
            format!(
                "req -x509 {ec} -days 2 -subj /CN=stepgate-test-ca \
                 -addext basicConstraints=critical,CA:TRUE \
                 -addext keyUsage=critical,keyCertSign,cRLSign -keyout {} -out {}",
                p("ca.key"),
                p("ca.pem")
            ),
            format!(
                "req {ec} -subj /CN=localhost -keyout {} -out {}",
                p("server.key"),
                p("server.csr")
            ),
            format!(
                "x509 -req -days 2 -CAcreateserial -in {} -CA {} -CAkey {} -extfile {} -out {}",
                p("server.csr"),
                p("ca.pem"),
                p("ca.key"),
                p("leaf.ext"),
                p("server.pem")
            ),
        ];
        for step in steps {
            let args: Vec<&str> = step.split_whitespace().collect();
            let output = Command::new("openssl")
                .args(&args)
                .output()
                .expect("run openssl (needed to make test certificates)");
            assert!(
                output.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        TestCa {
            ca_pem: path("ca.pem"),
            cert: path("server.pem"),
            key: path("server.key"),
            _dir: dir,
        }
    }
}

/// The first run of 6 to 10 digits in the decoded text/plain part of `raw`
/// (or in the whole body when the message is not MIME multipart).
pub fn extract_code(raw: &str) -> Option<String> {
    let text = text_part(raw).unwrap_or_else(|| split_message(raw).1.to_owned());
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            if (6..=10).contains(&(i - start)) {
                return Some(chars[start..i].iter().collect());
            }
        } else {
            i += 1;
        }
    }
    None
}

/// The decoded text/plain part of `raw`.
pub fn text_part(raw: &str) -> Option<String> {
    find_part(raw, "text/plain")
}

/// The decoded text/html part of `raw`.
pub fn html_part(raw: &str) -> Option<String> {
    find_part(raw, "text/html")
}

/// The unfolded value of the first header `name` of `raw` (top level only).
pub fn header(raw: &str, name: &str) -> Option<String> {
    header_in(split_message(raw).0, name)
}

/// Splits a message or MIME part into its header block and body.
fn split_message(raw: &str) -> (&str, &str) {
    if let Some(i) = raw.find("\r\n\r\n") {
        (&raw[..i], &raw[i + 4..])
    } else if let Some(i) = raw.find("\n\n") {
        (&raw[..i], &raw[i + 2..])
    } else {
        (raw, "")
    }
}

fn header_in(headers: &str, name: &str) -> Option<String> {
    let mut current: Option<String> = None;
    for line in headers.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(value) = current.as_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if current.is_some() {
            return current;
        }
        if let Some((n, v)) = line.split_once(':') {
            if n.trim().eq_ignore_ascii_case(name) {
                current = Some(v.trim().to_owned());
            }
        }
    }
    current
}

/// A parameter (e.g. `boundary`) of a structured header value.
fn header_param(value: &str, param: &str) -> Option<String> {
    value.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(param)
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// Depth-first search for the first part of type `mime`, decoded.
fn find_part(raw: &str, mime: &str) -> Option<String> {
    let (headers, body) = split_message(raw);
    let content_type = header_in(headers, "Content-Type").unwrap_or_else(|| "text/plain".into());
    let kind = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if kind.starts_with("multipart/") {
        let boundary = header_param(&content_type, "boundary")?;
        let delimiter = format!("--{boundary}");
        return body
            .split(delimiter.as_str())
            .skip(1)
            .take_while(|part| !part.starts_with("--"))
            .find_map(|part| find_part(part.trim_start_matches(['\r', '\n']), mime));
    }
    if kind != mime {
        return None;
    }
    let encoding = header_in(headers, "Content-Transfer-Encoding")
        .unwrap_or_default()
        .to_ascii_lowercase();
    Some(decode_body(body, &encoding))
}

fn decode_body(body: &str, encoding: &str) -> String {
    match encoding {
        "base64" => {
            let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(compact)
                .expect("base64 body");
            String::from_utf8_lossy(&bytes).into_owned()
        }
        "quoted-printable" => decode_quoted_printable(body),
        _ => body.to_owned(),
    }
}

fn decode_quoted_printable(body: &str) -> String {
    let mut bytes = Vec::with_capacity(body.len());
    for line in body.lines() {
        let line = line.trim_end_matches([' ', '\t']);
        let (line, soft_break) = match line.strip_suffix('=') {
            Some(rest) => (rest, true),
            None => (line, false),
        };
        let raw = line.as_bytes();
        let mut j = 0;
        while j < raw.len() {
            let escaped = (raw[j] == b'=')
                .then(|| raw.get(j + 1..j + 3))
                .flatten()
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok());
            match escaped {
                Some(b) => {
                    bytes.push(b);
                    j += 3;
                }
                None => {
                    bytes.push(raw[j]);
                    j += 1;
                }
            }
        }
        if !soft_break {
            bytes.extend_from_slice(b"\r\n");
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}
