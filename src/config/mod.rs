//! The config file: raw serde schema (`raw.rs`, `${NAME}` from `env.rs`) ->
//! validation -> immutable [`Config`]; positions from `position.rs`.
//!
//! Loading happens in three steps so that every problem is reported with
//! `FILE:LINE:COL: key.path: message`:
//! 1. `serde_yaml` parses the text into [`raw`] structs that refuse unknown
//!    keys; `${NAME}` is substituted inside every string as it is read, so an
//!    unset variable is reported at the place it is used.
//! 2. A position index built from the same text (yaml-rust2's event parser,
//!    which keeps marks) maps key paths like `routes[2].stepup.max_age` to
//!    their line and column.
//! 3. [`validate`] walks the raw structs once, collects *every* semantic
//!    problem, and builds the typed `Config` only when there is none.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use ipnet::IpNet;
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::delivery::email::{EmailSettings, SmtpSecurity};
use crate::delivery::sms::SmsSettings;
use crate::delivery::Channel;
use crate::policy::{Action, DefaultPolicy, Glob, HostPattern, PathMatcher, Policy, Rule, StepUp};

/// One problem in a config file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub col: usize,
    /// Key path such as `stepup.otp.ttl`; empty for file-level problems.
    pub key: String,
    pub message: String,
}

/// Every problem found in a config file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}:{}: ", self.file.display(), p.line, p.col)?;
            if !p.key.is_empty() {
                write!(f, "{}: ", p.key)?;
            }
            f.write_str(&p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The validated, immutable configuration.
#[derive(Clone)]
pub struct Config {
    pub file: PathBuf,
    pub listen: Listen,
    pub admin: Admin,
    pub upstream: Upstream,
    pub identity: Identity,
    pub stepup: Stepup,
    pub store: StoreConfig,
    pub policy: Policy,
    pub log: Log,
    /// Development mode: allows the console channel.
    pub dev: bool,
    /// [`source_digest`] of the text this config was read from, so a
    /// reload can tell whether the file changed since.
    pub digest: [u8; 32],
}

/// SHA-256 of config file text.
pub fn source_digest(text: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(text).into()
}

/// `listen.max_connections` when not set.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct Listen {
    pub address: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// Largest request head (request line + headers) accepted; 431 above.
    pub max_header_bytes: usize,
    /// Longest request target accepted; 414 above.
    pub max_uri_bytes: usize,
    /// Time a client has to send a complete request head.
    pub header_read_timeout: Duration,
    /// How long in-flight requests may take to finish at shutdown.
    pub drain_timeout: Duration,
    /// Peers whose `X-Forwarded-For`/`-Proto`/`-Host` are trusted and extended.
    pub trusted_proxies: Vec<IpNet>,
    /// Client connections served at once; further ones wait in the
    /// listen backlog until one closes.
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub address: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    /// Scheme and authority of the upstream; its path (if any) is a prefix.
    pub url: Uri,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Extra CA certificates (PEM) trusted for an https upstream.
    pub ca_file: Option<PathBuf>,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// A signed assertion for the app on every request with an identity.
    pub assertion: Option<crate::assertion::AssertionSettings>,
}

/// A key that checks primary tokens.
#[derive(Clone)]
pub struct JwtKeys {
    /// Keys by `kid` (JWKS); the empty string holds the key used when a
    /// token names no `kid` or there is only one.
    pub keys: HashMap<String, (DecodingKey, Option<Algorithm>)>,
}

#[derive(Clone)]
pub struct Jwt {
    pub from_header: bool,
    pub from_cookie: bool,
    pub cookie: String,
    pub algorithms: Vec<Algorithm>,
    pub keys: JwtKeys,
    /// Keys fetched from the identity provider (`jwks_url`, or discovery
    /// from `issuer` alone); `keys` is empty then.
    pub remote: Option<crate::identity::jwks::JwksSettings>,
    /// The HS secret, kept so `stepgate token` can mint trial tokens.
    pub hs_secret: Option<Vec<u8>>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

#[derive(Debug, Clone)]
pub struct TrustedHeader {
    pub user: http::HeaderName,
    pub email: Option<http::HeaderName>,
    pub from: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct ClaimNames {
    pub subject: String,
    pub email: String,
    pub phone: String,
}

#[derive(Clone)]
pub struct Identity {
    pub jwt: Option<Jwt>,
    pub trusted_header: Option<TrustedHeader>,
    pub claims: ClaimNames,
    pub login_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Otp {
    pub length: u32,
    pub ttl: Duration,
    pub max_attempts: u32,
    pub resend_after: Duration,
    pub max_sends: u32,
    pub lockout: Duration,
    pub max_failures: u32,
    /// Sends per client address (IPv6: per /64) per hour, all users and
    /// channels together; 0 turns the cap off.
    pub max_sends_per_client: u32,
}

/// Caps on sending codes that protect the operator's bill rather than one
/// user: how many codes a channel may send per hour across all users, and
/// which destinations SMS may go to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendBudget {
    /// Email codes per hour, all users together; `None`: unlimited.
    pub email_per_hour: Option<u32>,
    /// SMS codes per hour, all users together; `None`: unlimited.
    pub sms_per_hour: Option<u32>,
    /// E.164 prefixes (`+44`, `+1204`) SMS may be sent to; empty: any.
    pub sms_countries: Vec<String>,
}

/// How second-factor tokens are signed.
#[derive(Clone)]
pub enum SigningKey {
    Hs256(Vec<u8>),
    /// An Ed25519 or P-256 private key (PEM) and its public half.
    Pem {
        algorithm: Algorithm,
        encoding: jsonwebtoken::EncodingKey,
        decoding: DecodingKey,
    },
}

#[derive(Clone)]
pub struct Token {
    pub signing_key: SigningKey,
    /// Key for the keyed hash of codes and CSRF tokens (derived from the
    /// signing key unless given).
    pub secret: Vec<u8>,
    pub lifetime: Duration,
    pub cookie: String,
    pub header: http::HeaderName,
}

#[derive(Debug, Clone)]
pub struct Branding {
    pub product: String,
    pub logo_url: Option<String>,
    pub accent: String,
}

#[derive(Clone)]
pub struct Stepup {
    pub prefix: String,
    pub otp: Otp,
    pub token: Token,
    pub email: Option<EmailSettings>,
    pub sms: Option<SmsSettings>,
    pub sms_timeout: Duration,
    pub budget: SendBudget,
    pub console: bool,
    pub branding: Branding,
    /// Largest request body kept to replay a form post after step-up.
    pub stash_max_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Memory {
        max_entries: usize,
    },
    Redis {
        url: String,
        prefix: String,
        /// PEM roots for `rediss://` instead of the system ones.
        ca_file: Option<PathBuf>,
    },
    Cluster {
        urls: Vec<String>,
        prefix: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
}

/// The largest config file read, in bytes. A real one is a few KiB; the
/// bound keeps a hostile or mistaken file (a log, a binary) from costing
/// memory and parse time.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;

/// The deepest nesting of mappings and sequences accepted. The schema needs
/// five levels (`routes[0].stepup.factors[0]`); YAML parsers spend time
/// that grows with the square of the depth, so a deeply nested file is
/// refused before it is parsed.
pub const MAX_CONFIG_DEPTH: usize = 32;

impl Config {
    /// Read, parse and validate a config file. Blocking: it reads files
    /// (the config and the keys, secrets and certificates it names).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let fail = |message: String| ConfigError {
            file: path.to_path_buf(),
            problems: vec![Problem {
                line: 0,
                col: 0,
                key: String::new(),
                message,
            }],
        };
        let bytes =
            read_bounded(path).map_err(|e| fail(format!("cannot read config file: {e}")))?;
        if let Some(p) = too_large(&bytes) {
            return Err(ConfigError {
                file: path.to_path_buf(),
                problems: vec![p],
            });
        }
        let text = String::from_utf8(bytes).map_err(|_| {
            fail("cannot read config file: stream did not contain valid UTF-8".into())
        })?;
        Config::from_yaml(path, &text, &process_env())
    }

    /// Parse and validate config text; `env` resolves `${NAME}`.
    /// Relative file paths in the config are resolved against the config
    /// file's directory.
    pub fn from_yaml(
        file: &Path,
        text: &str,
        env: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            file: file.to_path_buf(),
            problems,
        };
        // Bounds first: the parsers below are not linear in the depth.
        if let Some(p) = too_large(text.as_bytes()).or_else(|| too_deep(text)) {
            return Err(fail(vec![p]));
        }
        let (parsed, missing) =
            env::with_env(env.clone(), || serde_yaml::from_str::<raw::File>(text));
        let mut env_problems = missing_env_problems(text, &missing);
        let raw = match parsed {
            Ok(raw) => raw,
            Err(e) => {
                let mut p = problem_from_serde(&e);
                if let Some((line, col)) = PositionIndex::build(text).duplicate(&p.message) {
                    (p.line, p.col) = (line, col);
                }
                env_problems.push(p);
                env_problems.sort_by_key(|p| (p.line, p.col));
                return Err(fail(env_problems));
            }
        };
        let index = PositionIndex::build(text);
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut v = Validator {
            index: &index,
            base,
            problems: Vec::new(),
        };
        let config = v.file(file, raw);
        if v.problems.is_empty() && env_problems.is_empty() {
            if let Some(mut config) = config {
                config.digest = source_digest(text.as_bytes());
                return Ok(config);
            }
        }
        // A value with an unset variable is reported once, as that.
        let mut problems = v.problems;
        problems.retain(|p| !env_problems.iter().any(|e| e.line == p.line));
        problems.extend(env_problems);
        problems.sort_by_key(|p| (p.line, p.col));
        Err(fail(problems))
    }

    /// The built-in configuration of `stepgate demo`: the gateway on
    /// `listen` in front of the sample app on `upstream`, with these secrets.
    pub fn demo(
        listen: SocketAddr,
        admin: SocketAddr,
        upstream: SocketAddr,
        jwt_secret: &str,
        stepup_key: &str,
    ) -> Result<Config, ConfigError> {
        let text = include_str!("../demo.yaml")
            .replace("{listen}", &listen.to_string())
            .replace("{admin}", &admin.to_string())
            .replace("{upstream}", &upstream.to_string())
            .replace("{jwt_secret}", jwt_secret)
            .replace("{stepup_key}", stepup_key);
        Config::from_yaml(Path::new("<demo>"), &text, &HashMap::new())
    }
}

/// The config file's bytes, at most one more than [`MAX_CONFIG_BYTES`]
/// (never the whole of a huge file). Blocking.
pub fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A problem at the first byte past [`MAX_CONFIG_BYTES`], if there is one.
fn too_large(bytes: &[u8]) -> Option<Problem> {
    if bytes.len() <= MAX_CONFIG_BYTES {
        return None;
    }
    let head = &bytes[..MAX_CONFIG_BYTES];
    let line = head.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = head.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let col = String::from_utf8_lossy(&head[start..]).chars().count() + 1;
    Some(Problem {
        line,
        col,
        key: String::new(),
        message: format!(
            "the config file is larger than {MAX_CONFIG_BYTES} bytes; nothing was parsed"
        ),
    })
}

/// A problem where nesting first exceeds [`MAX_CONFIG_DEPTH`], if it does.
/// Walks parser events only up to that point, so the cost is bounded
/// whatever the file holds.
fn too_deep(text: &str) -> Option<Problem> {
    use yaml_rust2::parser::{Event, Parser};
    let deep = |line: usize, col: usize| Problem {
        line,
        col,
        key: String::new(),
        message: format!("nested deeper than {MAX_CONFIG_DEPTH} levels; nothing was parsed"),
    };
    let mut parser = Parser::new_from_str(text);
    let mut depth = 0usize;
    loop {
        let (event, mark) = match parser.next_token() {
            Ok(next) => next,
            // yaml-rust2 stops at its own (higher) nesting limit.
            Err(e) if e.info().contains("recursion limit") => {
                let (line, col) =
                    too_deep_flow(text).unwrap_or((e.marker().line(), e.marker().col() + 1));
                return Some(deep(line, col));
            }
            // Another syntax error is reported by the real parse in its
            // own words; only flow brackets could still nest deeply there.
            Err(_) => return too_deep_flow(text).map(|(line, col)| deep(line, col)),
        };
        match event {
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                depth += 1;
                if depth > MAX_CONFIG_DEPTH {
                    return Some(deep(mark.line(), mark.col() + 1));
                }
            }
            Event::MappingEnd | Event::SequenceEnd => depth = depth.saturating_sub(1),
            Event::StreamEnd => return None,
            _ => {}
        }
    }
}

/// Where unquoted `[`/`{` first nest deeper than [`MAX_CONFIG_DEPTH`]
/// (outside comments and quoted strings), as (line, column).
fn too_deep_flow(text: &str) -> Option<(usize, usize)> {
    let mut depth = 0usize;
    for (ln, line) in text.lines().enumerate() {
        let mut quote: Option<char> = None;
        for (col, c) in line.chars().enumerate() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_CONFIG_DEPTH {
                        return Some((ln + 1, col + 1));
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    None
}

/// The process environment; variables whose name or value is not UTF-8
/// are left out (a `${NAME}` naming one is then reported as unset).
fn process_env() -> HashMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// One problem per `${NAME}` use of an unset variable, at its position.
fn missing_env_problems(text: &str, missing: &[String]) -> Vec<Problem> {
    let mut names: Vec<&String> = missing.iter().collect();
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let needle = format!("${{{name}}}");
        for (ln, line) in text.lines().enumerate() {
            if line.trim_start().starts_with('#') {
                continue;
            }
            for (col, _) in line.match_indices(&needle) {
                out.push(Problem {
                    line: ln + 1,
                    col: line[..col].chars().count() + 1,
                    key: String::new(),
                    message: format!("environment variable {name} is not set"),
                });
            }
        }
    }
    out
}

fn problem_from_serde(e: &serde_yaml::Error) -> Problem {
    let (line, col) = e
        .location()
        .map(|l| (l.line(), l.column()))
        // Some parser errors (e.g. a second document) carry no position:
        // point at the start of the file rather than at a line 0 no editor
        // can jump to.
        .unwrap_or((1, 1));
    let mut message = e.to_string();
    // serde_yaml inserts " at line L column C"; we print the location first.
    // Keep what follows it, e.g. ", while parsing a flow mapping at line 6
    // column 13": where an unclosed `{` or quote began.
    if let Some(l) = e.location() {
        message = message.replacen(
            &format!(" at line {} column {}", l.line(), l.column()),
            "",
            1,
        );
    }
    Problem {
        line,
        col,
        key: String::new(),
        message,
    }
}

/// Parse `30s`, `5m`, `1h`, `250ms`, `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let err = || format!("invalid duration {s:?}: use a number and a unit, e.g. 30s, 5m, 1h");
    let n: u64 = num.parse().map_err(|_| err())?;
    let ms = match unit {
        "ms" => n,
        "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        _ => return Err(err()),
    };
    Ok(Duration::from_millis(ms))
}

/// Format a duration the way the config writes it.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() != 0 || s == 0 {
        format!("{}ms", d.as_millis())
    } else if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

mod env;
mod position;
mod raw;

use self::position::PositionIndex;

/// The raw `identity.jwt` keys about keys fetched from the provider.
struct RemoteKeys {
    url: Option<raw::Str>,
    /// The issuer, when it is to be discovered.
    issuer: Option<raw::Str>,
    ca_file: Option<raw::Str>,
    min_refresh: Option<raw::Str>,
    max_refresh: Option<raw::Str>,
}

/// Collects problems while turning raw structs into a `Config`.
struct Validator<'a> {
    index: &'a PositionIndex,
    base: PathBuf,
    problems: Vec<Problem>,
}

const NIST_MAX_OTP_TTL: Duration = Duration::from_secs(600);

impl Validator<'_> {
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        let (line, col) = self.index.locate(key);
        self.problems.push(Problem {
            line,
            col,
            key: key.to_string(),
            message: one_line(&message.into()),
        });
    }

    fn duration(&mut self, key: &str, v: Option<raw::Str>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(&s.0) {
                Ok(d) => d,
                Err(e) => {
                    self.problem(key, e);
                    default
                }
            },
        }
    }

    fn addr(&mut self, key: &str, v: Option<raw::Str>, default: &str) -> Option<SocketAddr> {
        let s = v.map(|s| s.0).unwrap_or_else(|| default.to_string());
        match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    key,
                    format!("invalid address {s:?}: expected IP:PORT, e.g. 0.0.0.0:8080"),
                );
                None
            }
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn existing_file(&mut self, key: &str, p: &str) -> Option<PathBuf> {
        let path = self.path(p);
        if path.is_file() {
            Some(path)
        } else {
            self.problem(key, format!("file {} does not exist", path.display()));
            None
        }
    }

    /// A secret given inline as `key` or in a file as `key_file`.
    fn secret(
        &mut self,
        key: &str,
        inline: Option<raw::Str>,
        file: Option<raw::Str>,
    ) -> Option<String> {
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.problem(
                    key,
                    format!("give either {} or {}_file, not both", leaf(key), leaf(key)),
                );
                None
            }
            (Some(s), None) => Some(s.0),
            (None, Some(f)) => {
                let fkey = format!("{key}_file");
                let path = self.path(&f.0);
                match std::fs::read_to_string(&path) {
                    Ok(s) => Some(s.trim_end_matches(['\n', '\r']).to_string()),
                    Err(e) => {
                        self.problem(&fkey, format!("cannot read {}: {e}", path.display()));
                        None
                    }
                }
            }
            (None, None) => None,
        }
    }

    fn count(&mut self, key: &str, v: Option<u64>, default: u32, min: u32, max: u32) -> u32 {
        match v {
            None => default,
            Some(n) if n >= u64::from(min) && n <= u64::from(max) => n as u32,
            Some(n) => {
                self.problem(key, format!("{n} is out of range {min}..={max}"));
                default
            }
        }
    }

    fn file(&mut self, file: &Path, raw: raw::File) -> Option<Config> {
        let dev = raw.dev.unwrap_or(false);
        let listen = self.listen(raw.listen.unwrap_or_default());
        let admin_raw = raw.admin.unwrap_or_default();
        let admin = self.addr("admin.address", admin_raw.address, "127.0.0.1:9901");
        if let (Some(l), Some(a)) = (&listen, admin) {
            if l.address == a && a.port() != 0 {
                self.problem(
                    "admin.address",
                    "the admin listener must not share the public address",
                );
            }
        }
        let upstream = self.upstream(raw.upstream.unwrap_or_default());
        let identity = self.identity(raw.identity.unwrap_or_default());
        let stepup = self.stepup(raw.stepup.unwrap_or_default(), dev);
        let store = self.store(raw.store.unwrap_or_default());
        let default = match raw.default.as_ref().map(|s| s.0.as_str()) {
            None | Some("pass") => DefaultPolicy::Pass,
            Some("identity") => DefaultPolicy::Identity,
            Some(other) => {
                self.problem(
                    "default",
                    format!("unknown default policy {other:?}: expected pass or identity"),
                );
                DefaultPolicy::Pass
            }
        };
        let rules = self.routes(raw.routes, stepup.as_ref());
        let log = self.log(raw.log.unwrap_or_default());
        let no_identity_source = identity
            .as_ref()
            .is_some_and(|id| id.jwt.is_none() && id.trusted_header.is_none());
        let needs_identity = default == DefaultPolicy::Identity
            || rules
                .iter()
                .any(|r| matches!(r.action, Action::Identity | Action::StepUp(_)));
        if no_identity_source && needs_identity {
            self.problem(
                "identity",
                "routes need a primary identity but neither identity.jwt nor identity.trusted_header is configured",
            );
        }
        Some(Config {
            file: file.to_path_buf(),
            listen: listen?,
            admin: Admin { address: admin? },
            upstream: upstream?,
            identity: identity?,
            stepup: stepup?,
            store: store?,
            policy: Policy { rules, default },
            log,
            dev,
            digest: [0; 32],
        })
    }

    fn listen(&mut self, l: raw::Listen) -> Option<Listen> {
        let address = self.addr("listen.address", l.address, "0.0.0.0:8080");
        let tls = l.tls.and_then(|t| {
            let cert = self.existing_file("listen.tls.cert", &t.cert.0);
            let key = self.existing_file("listen.tls.key", &t.key.0);
            let files = TlsFiles {
                cert: cert?,
                key: key?,
            };
            self.tls_files(&files);
            Some(files)
        });
        let max_header_bytes = match l.max_header_bytes {
            None => 16 * 1024,
            Some(n) if (8192..=1024 * 1024).contains(&n) => n as usize,
            Some(n) => {
                self.problem(
                    "listen.max_header_bytes",
                    format!("{n} is out of range 8192..=1048576"),
                );
                16 * 1024
            }
        };
        let max_uri_bytes = match l.max_uri_bytes {
            None => 8 * 1024,
            Some(n) if (256..=1024 * 1024).contains(&n) => n as usize,
            Some(n) => {
                self.problem(
                    "listen.max_uri_bytes",
                    format!("{n} is out of range 256..=1048576"),
                );
                8 * 1024
            }
        };
        let max_connections = match l.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(n) if (1..=1_000_000).contains(&n) => n as usize,
            Some(n) => {
                self.problem(
                    "listen.max_connections",
                    format!("{n} is out of range 1..=1000000"),
                );
                DEFAULT_MAX_CONNECTIONS
            }
        };
        let header_read_timeout = self.duration(
            "listen.header_read_timeout",
            l.header_read_timeout,
            Duration::from_secs(10),
        );
        let drain_timeout = self.duration(
            "listen.drain_timeout",
            l.drain_timeout,
            Duration::from_secs(30),
        );
        let trusted_proxies = self.cidrs(
            "listen.trusted_proxies",
            l.trusted_proxies.unwrap_or_default(),
        );
        Some(Listen {
            address: address?,
            tls,
            max_header_bytes,
            max_uri_bytes,
            header_read_timeout,
            drain_timeout,
            trusted_proxies,
            max_connections,
        })
    }

    /// Load the certificate and key as the server will, so that a file
    /// `run` would refuse is a located error here.
    fn tls_files(&mut self, files: &TlsFiles) {
        let certs = crate::server::tls_certs(&files.cert)
            .map_err(|e| self.problem("listen.tls.cert", format!("cannot load {e}")));
        let key = crate::server::tls_key(&files.key)
            .map_err(|e| self.problem("listen.tls.key", format!("cannot load {e}")));
        if let (Ok(certs), Ok(key)) = (certs, key) {
            if let Err(e) = crate::server::tls_server_config(certs, key) {
                self.problem(
                    "listen.tls.key",
                    format!(
                        "does not fit the certificate in {}: {e}",
                        files.cert.display()
                    ),
                );
            }
        }
    }

    /// `stepup.sms.allowed_countries`: E.164 prefixes, `+` and 1 to 6
    /// digits (a country calling code, or a longer prefix such as one
    /// NANP area code). An empty list is refused: it would allow nothing.
    fn country_codes(&mut self, list: Option<Vec<raw::Str>>) -> Vec<String> {
        const KEY: &str = "stepup.sms.allowed_countries";
        let Some(list) = list else {
            return Vec::new();
        };
        if list.is_empty() {
            self.problem(
                KEY,
                "an empty list would block every SMS; omit the key to allow any destination",
            );
        }
        let mut out = Vec::new();
        for (i, s) in list.into_iter().enumerate() {
            let digits = s.0.strip_prefix('+').unwrap_or("");
            if (1..=6).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
                out.push(s.0);
            } else {
                self.problem(
                    &format!("{KEY}[{i}]"),
                    format!(
                        "invalid country code {:?}: expected + and 1 to 6 digits, e.g. \"+44\"",
                        s.0
                    ),
                );
            }
        }
        out
    }

    fn cidrs(&mut self, key: &str, list: Vec<raw::Str>) -> Vec<IpNet> {
        let mut out = Vec::new();
        for (i, s) in list.into_iter().enumerate() {
            let parsed =
                s.0.parse::<IpNet>()
                    .or_else(|_| s.0.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => out.push(n),
                Err(_) => self.problem(
                    &format!("{key}[{i}]"),
                    format!("invalid CIDR {:?}: expected e.g. 127.0.0.1/32", s.0),
                ),
            }
        }
        out
    }

    fn upstream(&mut self, u: raw::Upstream) -> Option<Upstream> {
        let url = match u.url {
            None => {
                self.problem("upstream.url", "is required (e.g. http://127.0.0.1:3000)");
                None
            }
            Some(s) => match s.0.parse::<Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.authority().is_some() =>
                {
                    if uri.query().is_some() {
                        self.problem("upstream.url", "must not have a query");
                        None
                    } else {
                        Some(uri)
                    }
                }
                _ => {
                    self.problem(
                        "upstream.url",
                        format!(
                            "invalid URL {:?}: expected http:// or https:// with a host",
                            s.0
                        ),
                    );
                    None
                }
            },
        };
        let connect_timeout = self.duration(
            "upstream.connect_timeout",
            u.connect_timeout,
            Duration::from_secs(5),
        );
        let timeout = self.duration("upstream.timeout", u.timeout, Duration::from_secs(60));
        let ca_file = u
            .ca_file
            .and_then(|f| self.existing_file("upstream.ca_file", &f.0));
        if let Some(path) = &ca_file {
            let mut roots = rustls::RootCertStore::empty();
            if let Err(e) = crate::proxy::add_ca_file(&mut roots, path) {
                self.problem("upstream.ca_file", format!("cannot load {e}"));
            }
        }
        let pool_idle_timeout = self.duration(
            "upstream.pool_idle_timeout",
            u.pool_idle_timeout,
            Duration::from_secs(90),
        );
        let pool_max_idle_per_host = u.pool_max_idle_per_host.unwrap_or(256) as usize;
        let assertion = u.assertion.and_then(|a| self.assertion(a));
        Some(Upstream {
            url: url?,
            connect_timeout,
            timeout,
            ca_file,
            pool_idle_timeout,
            pool_max_idle_per_host,
            assertion,
        })
    }

    /// `upstream.assertion`: the key loads, the header is not one the
    /// gateway or the app reads for something else.
    fn assertion(&mut self, a: raw::Assertion) -> Option<crate::assertion::AssertionSettings> {
        let key = "upstream.assertion";
        let header = a
            .header
            .map(|h| h.0)
            .unwrap_or_else(|| crate::assertion::DEFAULT_HEADER.into());
        let header = self.header_name(&format!("{key}.header"), &header);
        if let Some(h) = &header {
            let n = h.as_str();
            if matches!(
                n,
                "authorization"
                    | "cookie"
                    | "host"
                    | "connection"
                    | "content-length"
                    | "content-type"
                    | "transfer-encoding"
            ) || n.starts_with("x-forwarded-")
                || matches!(
                    n,
                    "x-stepgate-user"
                        | "x-stepgate-email"
                        | "x-stepgate-stepup"
                        | "x-stepgate-stepup-age"
                )
            {
                self.problem(
                    &format!("{key}.header"),
                    format!("{n} is used for something else"),
                );
            }
        }
        let audience = a.audience.map(|s| s.0).filter(|s| !s.is_empty());
        if audience.is_none() {
            self.problem(
                &format!("{key}.audience"),
                "is required (the app's name, its `aud`)",
            );
        }
        let lifetime = self.duration(
            &format!("{key}.lifetime"),
            a.lifetime,
            Duration::from_secs(60),
        );
        if lifetime < Duration::from_secs(1) || lifetime > Duration::from_secs(3600) {
            self.problem(&format!("{key}.lifetime"), "must be within 1s..=1h");
        }
        let Some(file) = a.signing_key_file else {
            self.problem(
                &format!("{key}.signing_key_file"),
                "is required (an Ed25519 or P-256 private key, PKCS#8 PEM)",
            );
            return None;
        };
        let path = self.existing_file(&format!("{key}.signing_key_file"), &file.0)?;
        let pem = match std::fs::read_to_string(&path) {
            Ok(p) => p,
            Err(e) => {
                self.problem(
                    &format!("{key}.signing_key_file"),
                    format!("cannot read {}: {e}", path.display()),
                );
                return None;
            }
        };
        match crate::assertion::AssertionSettings::from_pem(&pem, header?, audience?, lifetime) {
            Ok(s) => Some(s),
            Err(e) => {
                self.problem(
                    &format!("{key}.signing_key_file"),
                    format!("{}: {e}", path.display()),
                );
                None
            }
        }
    }

    fn identity(&mut self, id: raw::Identity) -> Option<Identity> {
        let jwt = match id.jwt {
            Some(j) => Some(self.jwt(j)?),
            None => None,
        };
        let trusted_header = id.trusted_header.and_then(|t| {
            let user = self.header_name("identity.trusted_header.user", &t.user.0);
            let email = match t.email {
                Some(e) => Some(self.header_name("identity.trusted_header.email", &e.0)?),
                None => None,
            };
            if t.from.is_empty() {
                self.problem(
                    "identity.trusted_header.from",
                    "must list the peers allowed to assert identity",
                );
            }
            let from = self.cidrs("identity.trusted_header.from", t.from);
            if from.iter().any(|n| n.prefix_len() == 0) {
                self.problem(
                    "identity.trusted_header.from",
                    "a /0 range lets every client assert any identity; list the proxies in front",
                );
            }
            for (key, name) in [("user", user.as_ref()), ("email", email.as_ref())] {
                let Some(name) = name else { continue };
                let n = name.as_str();
                // Headers the gateway strips or reads itself can never carry
                // an asserted identity (and must not look as if they did).
                if n.starts_with("x-stepgate-")
                    || n.starts_with("x_stepgate_")
                    || n == "authorization"
                    || n == "cookie"
                {
                    self.problem(
                        &format!("identity.trusted_header.{key}"),
                        format!("{n} cannot carry a trusted identity (reserved by the gateway)"),
                    );
                }
            }
            Some(TrustedHeader {
                user: user?,
                email,
                from,
            })
        });
        let c = id.claims.unwrap_or_default();
        let claims = ClaimNames {
            subject: c.subject.map(|s| s.0).unwrap_or_else(|| "sub".into()),
            email: c.email.map(|s| s.0).unwrap_or_else(|| "email".into()),
            phone: c
                .phone
                .map(|s| s.0)
                .unwrap_or_else(|| "phone_number".into()),
        };
        let login_url = id.login_url.and_then(|u| match u.0.parse::<Uri>() {
            Ok(uri) if uri.scheme().is_some() || u.0.starts_with('/') => Some(u.0),
            _ => {
                self.problem("identity.login_url", format!("invalid URL {:?}", u.0));
                None
            }
        });
        Some(Identity {
            jwt,
            trusted_header,
            claims,
            login_url,
        })
    }

    fn header_name(&mut self, key: &str, s: &str) -> Option<http::HeaderName> {
        match http::HeaderName::from_bytes(s.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.problem(key, format!("invalid header name {s:?}"));
                None
            }
        }
    }

    fn jwt(&mut self, mut j: raw::Jwt) -> Option<Jwt> {
        let mut from_header = false;
        let mut from_cookie = false;
        let from = j
            .from
            .unwrap_or_else(|| vec![raw::Str("header".into()), raw::Str("cookie".into())]);
        if from.is_empty() {
            self.problem("identity.jwt.from", "must list header and/or cookie");
        }
        for (i, f) in from.iter().enumerate() {
            match f.0.as_str() {
                "header" => from_header = true,
                "cookie" => from_cookie = true,
                other => self.problem(
                    &format!("identity.jwt.from[{i}]"),
                    format!("unknown source {other:?}: expected header or cookie"),
                ),
            }
        }
        let algorithms_raw = j
            .algorithms
            .unwrap_or_else(|| vec![raw::Str("RS256".into())]);
        let mut algorithms = Vec::new();
        for (i, a) in algorithms_raw.iter().enumerate() {
            let key = format!("identity.jwt.algorithms[{i}]");
            if a.0.eq_ignore_ascii_case("none") {
                self.problem(&key, "alg none is never accepted");
                continue;
            }
            match a.0.parse::<Algorithm>() {
                Ok(alg) => algorithms.push(alg),
                Err(_) => self.problem(&key, format!("unknown algorithm {:?}", a.0)),
            }
        }
        // Only when nothing is listed: a list of unusable entries has
        // already been reported entry by entry.
        if algorithms_raw.is_empty() {
            self.problem(
                "identity.jwt.algorithms",
                "must list at least one algorithm",
            );
        }
        let is_hs =
            |a: &Algorithm| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        let hs: Vec<Algorithm> = algorithms.iter().copied().filter(is_hs).collect();
        let asym: Vec<Algorithm> = algorithms.iter().copied().filter(|a| !is_hs(a)).collect();
        // Count what is written, not what loaded: an unreadable secret_file
        // is reported as that, not also as "no key given".
        let has_secret = j.secret.is_some() || j.secret_file.is_some();
        let secret = self.secret("identity.jwt.secret", j.secret, j.secret_file);
        let mut keys = HashMap::new();
        let sources = [
            has_secret,
            j.public_key.is_some(),
            j.jwks_file.is_some(),
            j.jwks_url.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        // The issuer alone means: discover its keys (OpenID Connect).
        let discovery = sources == 0 && j.issuer.is_some();
        if sources > 1 || (sources == 0 && !discovery) {
            self.problem(
                "identity.jwt",
                "give exactly one of secret (or secret_file), public_key, jwks_file, jwks_url, or issuer alone for OpenID Connect discovery",
            );
        }
        let remote = self.jwks_remote(
            RemoteKeys {
                url: j.jwks_url.take(),
                issuer: j.issuer.clone().filter(|_| discovery),
                ca_file: j.ca_file.take(),
                min_refresh: j.jwks_min_refresh.take(),
                max_refresh: j.jwks_max_refresh.take(),
            },
            !hs.is_empty(),
        );
        let mut hs_secret = None;
        if let Some(secret) = secret {
            // Alg confusion: an HS key next to asymmetric algorithms would
            // let a public key be used as an HMAC secret.
            if !asym.is_empty() {
                self.problem(
                    "identity.jwt.algorithms",
                    "a secret only verifies HS256/384/512; remove the other algorithms",
                );
            }
            if secret.len() < 32 {
                self.problem(
                    "identity.jwt.secret",
                    format!(
                        "HS secret is {} bytes; at least 32 are required",
                        secret.len()
                    ),
                );
            }
            keys.insert(
                String::new(),
                (DecodingKey::from_secret(secret.as_bytes()), None),
            );
            hs_secret = Some(secret.into_bytes());
        }
        if let Some(pk) = &j.public_key {
            if !hs.is_empty() {
                self.problem(
                    "identity.jwt.algorithms",
                    "HS algorithms are refused when a public key is configured",
                );
            }
            if let Some(path) = self.existing_file("identity.jwt.public_key", &pk.0) {
                match std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|pem| {
                        decoding_key_from_pem(
                            &pem,
                            asym.first().copied().unwrap_or(Algorithm::RS256),
                        )
                    }) {
                    Ok(k) => {
                        keys.insert(String::new(), (k, None));
                    }
                    Err(e) => self.problem(
                        "identity.jwt.public_key",
                        format!("cannot load {}: {e}", path.display()),
                    ),
                }
            }
        }
        if let Some(f) = &j.jwks_file {
            if !hs.is_empty() {
                self.problem(
                    "identity.jwt.algorithms",
                    "HS algorithms are refused with a JWKS",
                );
            }
            if let Some(path) = self.existing_file("identity.jwt.jwks_file", &f.0) {
                match load_jwks(&path) {
                    Ok(k) => keys.extend(k),
                    Err(e) => self.problem(
                        "identity.jwt.jwks_file",
                        format!("cannot load {}: {e}", path.display()),
                    ),
                }
            }
        }
        let leeway = self.duration("identity.jwt.leeway", j.leeway, Duration::from_secs(30));
        Some(Jwt {
            from_header,
            from_cookie,
            cookie: j
                .cookie
                .map(|c| c.0)
                .unwrap_or_else(|| "access_token".into()),
            algorithms,
            keys: JwtKeys { keys },
            remote,
            hs_secret,
            issuer: j.issuer.map(|s| s.0),
            audience: j.audience.map(|s| s.0),
            leeway,
        })
    }

    /// Settings for keys fetched by URL or discovered from the issuer.
    fn jwks_remote(
        &mut self,
        j: RemoteKeys,
        hs: bool,
    ) -> Option<crate::identity::jwks::JwksSettings> {
        use crate::identity::jwks::{check_url, JwksSettings, JwksSource};
        let wanted = j.url.is_some() || j.issuer.is_some();
        let source = match (&j.url, &j.issuer) {
            (Some(url), _) => match check_url(&url.0) {
                Ok(u) => Some(JwksSource::Url(u)),
                Err(e) => {
                    self.problem("identity.jwt.jwks_url", e);
                    None
                }
            },
            (None, Some(iss)) => match check_url(&iss.0) {
                Ok(_) => Some(JwksSource::Discovery {
                    issuer: iss.0.clone(),
                }),
                Err(e) => {
                    self.problem("identity.jwt.issuer", e);
                    None
                }
            },
            _ => None,
        };
        let remote_only = [
            ("identity.jwt.ca_file", j.ca_file.is_some()),
            ("identity.jwt.jwks_min_refresh", j.min_refresh.is_some()),
            ("identity.jwt.jwks_max_refresh", j.max_refresh.is_some()),
        ];
        if !wanted {
            for (key, set) in remote_only {
                if set {
                    self.problem(key, "applies only with jwks_url or issuer discovery");
                }
            }
            return None;
        }
        if hs {
            self.problem(
                "identity.jwt.algorithms",
                "HS algorithms are refused with keys from the identity provider",
            );
        }
        let ca_file = j
            .ca_file
            .as_ref()
            .and_then(|f| self.existing_file("identity.jwt.ca_file", &f.0));
        if let Some(path) = &ca_file {
            let mut roots = rustls::RootCertStore::empty();
            if let Err(e) = crate::proxy::add_ca_file(&mut roots, path) {
                self.problem("identity.jwt.ca_file", format!("cannot load {e}"));
            }
        }
        let min_refresh = self.duration(
            "identity.jwt.jwks_min_refresh",
            j.min_refresh,
            Duration::from_secs(30),
        );
        let max_refresh = self.duration(
            "identity.jwt.jwks_max_refresh",
            j.max_refresh,
            Duration::from_secs(3600),
        );
        if min_refresh > Duration::from_secs(3600) {
            self.problem("identity.jwt.jwks_min_refresh", "must be at most 1h");
        }
        if max_refresh < Duration::from_secs(1) || max_refresh > Duration::from_secs(7 * 86400) {
            self.problem("identity.jwt.jwks_max_refresh", "must be within 1s..=7d");
        } else if max_refresh < min_refresh {
            self.problem(
                "identity.jwt.jwks_max_refresh",
                "must not be shorter than jwks_min_refresh",
            );
        }
        Some(JwksSettings {
            source: source?,
            ca_file,
            min_refresh,
            max_refresh,
        })
    }

    fn stepup(&mut self, mut s: raw::Stepup, dev: bool) -> Option<Stepup> {
        let prefix = s.prefix.map(|p| p.0).unwrap_or_else(|| "/.stepgate".into());
        let prefix_ok = prefix.starts_with('/')
            && prefix.len() > 1
            && !prefix.ends_with('/')
            && crate::policy::normalize_path(&prefix).as_deref() == Ok(prefix.as_str());
        if !prefix_ok {
            self.problem(
                "stepup.prefix",
                format!("invalid prefix {prefix:?}: expected a normalised path like /.stepgate"),
            );
        }
        let o = s.otp.unwrap_or_default();
        let length = self.count("stepup.otp.length", o.length, 6, 6, 10);
        let ttl = self.duration("stepup.otp.ttl", o.ttl, Duration::from_secs(300));
        if ttl > NIST_MAX_OTP_TTL && !o.allow_long_ttl.unwrap_or(false) {
            self.problem(
                "stepup.otp.ttl",
                "codes valid longer than 10m are refused (NIST SP 800-63B); set stepup.otp.allow_long_ttl: true to override",
            );
        }
        if ttl.is_zero() {
            self.problem("stepup.otp.ttl", "must be more than 0");
        }
        let otp = Otp {
            length,
            ttl,
            max_attempts: self.count("stepup.otp.max_attempts", o.max_attempts, 5, 1, 100),
            resend_after: self.duration(
                "stepup.otp.resend_after",
                o.resend_after,
                Duration::from_secs(30),
            ),
            max_sends: self.count("stepup.otp.max_sends", o.max_sends, 5, 1, 1000),
            lockout: self.duration("stepup.otp.lockout", o.lockout, Duration::from_secs(900)),
            max_failures: self.count("stepup.otp.max_failures", o.max_failures, 10, 1, 10_000),
            max_sends_per_client: self.count(
                "stepup.otp.max_sends_per_client",
                o.max_sends_per_client,
                50,
                0,
                1_000_000,
            ),
        };
        let token = self.token(s.token.unwrap_or_default());
        let mut budget = SendBudget::default();
        if let Some(e) = &s.email {
            budget.email_per_hour = e
                .hourly_budget
                .map(|n| self.count("stepup.email.hourly_budget", Some(n), 1, 1, 100_000_000));
        }
        if let Some(sms) = &mut s.sms {
            budget.sms_per_hour = sms
                .hourly_budget
                .map(|n| self.count("stepup.sms.hourly_budget", Some(n), 1, 1, 100_000_000));
            budget.sms_countries = self.country_codes(sms.allowed_countries.take());
        }
        let email = s.email.and_then(|e| self.email(e));
        let (sms, sms_timeout) = match s.sms {
            Some(sms) => {
                let timeout = self.duration(
                    "stepup.sms.timeout",
                    sms.timeout.clone(),
                    Duration::from_secs(10),
                );
                (self.sms(sms, timeout), timeout)
            }
            None => (None, Duration::from_secs(10)),
        };
        let console = s.console.unwrap_or(false);
        if console && !dev {
            self.problem(
                "stepup.console",
                "the console channel prints codes to the log: it is refused unless dev: true (or `stepgate demo`)",
            );
        }
        let b = s.branding.unwrap_or_default();
        let accent = b.accent.map(|a| a.0).unwrap_or_else(|| "#2457d6".into());
        let accent_ok = accent.len() <= 32
            && (accent.starts_with('#') && accent[1..].chars().all(|c| c.is_ascii_hexdigit())
                || accent.chars().all(|c| c.is_ascii_alphabetic()));
        if !accent_ok {
            self.problem(
                "stepup.branding.accent",
                format!("invalid colour {accent:?}: use #rrggbb or a CSS colour name"),
            );
        }
        let branding = Branding {
            product: b.product.map(|p| p.0).unwrap_or_else(|| "stepgate".into()),
            logo_url: b.logo_url.map(|p| p.0),
            accent,
        };
        let stash_max_bytes = s.stash_max_bytes.unwrap_or(64 * 1024) as usize;
        Some(Stepup {
            prefix,
            otp,
            token: token?,
            email,
            sms,
            sms_timeout,
            budget,
            console,
            branding,
            stash_max_bytes,
        })
    }

    fn token(&mut self, t: raw::Token) -> Option<Token> {
        let lifetime = self.duration(
            "stepup.token.lifetime",
            t.lifetime,
            Duration::from_secs(900),
        );
        if lifetime.is_zero() {
            self.problem("stepup.token.lifetime", "must be more than 0");
        }
        let header_name = t
            .header
            .map(|h| h.0)
            .unwrap_or_else(|| "X-Second-Factor-Token".into());
        let header = self.header_name("stepup.token.header", &header_name);
        let cookie = t
            .cookie
            .map(|c| c.0)
            .unwrap_or_else(|| "stepgate_sf".into());
        if cookie.is_empty()
            || !cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            self.problem(
                "stepup.token.cookie",
                format!("invalid cookie name {cookie:?}"),
            );
        }
        let signing_key = match (t.signing_key, t.signing_key_file) {
            (Some(_), Some(_)) => {
                self.problem(
                    "stepup.token.signing_key",
                    "give either signing_key or signing_key_file, not both",
                );
                None
            }
            (Some(k), None) => {
                if k.0.len() < 32 {
                    self.problem(
                        "stepup.token.signing_key",
                        format!("HS256 key is {} bytes; at least 32 are required", k.0.len()),
                    );
                }
                let bytes = k.0.into_bytes();
                Some((SigningKey::Hs256(bytes.clone()), bytes))
            }
            (None, Some(f)) => {
                let path = self.path(&f.0);
                match std::fs::read(&path) {
                    Ok(bytes) if bytes.starts_with(b"-----BEGIN") => {
                        match signing_key_from_pem(&bytes) {
                            Ok(k) => Some((k, bytes)),
                            Err(e) => {
                                self.problem(
                                    "stepup.token.signing_key_file",
                                    format!("{}: {e}", path.display()),
                                );
                                None
                            }
                        }
                    }
                    Ok(bytes) => {
                        let s = String::from_utf8_lossy(&bytes).trim_end().to_string();
                        if s.len() < 32 {
                            self.problem(
                                "stepup.token.signing_key_file",
                                format!("HS256 key is {} bytes; at least 32 are required", s.len()),
                            );
                        }
                        let bytes = s.into_bytes();
                        Some((SigningKey::Hs256(bytes.clone()), bytes))
                    }
                    Err(e) => {
                        self.problem(
                            "stepup.token.signing_key_file",
                            format!("cannot read {}: {e}", path.display()),
                        );
                        None
                    }
                }
            }
            (None, None) => {
                self.problem("stepup.token.signing_key", "is required (an HS256 secret of at least 32 bytes, or signing_key_file with a PEM key)");
                None
            }
        };
        let hash_key = self.secret("stepup.token.hash_key", t.hash_key, t.hash_key_file);
        if let Some(h) = &hash_key {
            if h.len() < 32 {
                self.problem(
                    "stepup.token.hash_key",
                    format!("key is {} bytes; at least 32 are required", h.len()),
                );
            }
        }
        // Without a hash_key, the key for code hashes and CSRF tokens is
        // derived from the (secret) signing key material.
        let (signing_key, material) = signing_key?;
        let secret = match hash_key {
            Some(h) => h.into_bytes(),
            None => crate::otp::derive_key(&material, b"stepgate code hash v1"),
        };
        Some(Token {
            signing_key,
            secret,
            lifetime,
            cookie,
            header: header?,
        })
    }

    fn email(&mut self, e: raw::Email) -> Option<EmailSettings> {
        let before = self.problems.len();
        let security = match e.smtp.security.as_ref().map(|s| s.0.as_str()) {
            None | Some("starttls") => SmtpSecurity::StartTls,
            Some("tls") => SmtpSecurity::Tls,
            Some("none") => SmtpSecurity::None,
            Some(other) => {
                self.problem(
                    "stepup.email.smtp.security",
                    format!("unknown value {other:?}: expected none, starttls or tls"),
                );
                SmtpSecurity::StartTls
            }
        };
        let default_port = match security {
            SmtpSecurity::None => 25,
            SmtpSecurity::StartTls => 587,
            SmtpSecurity::Tls => 465,
        };
        let port = match e.smtp.port {
            None => default_port,
            Some(p) if (1..=65535).contains(&p) => p as u16,
            Some(p) => {
                self.problem("stepup.email.smtp.port", format!("{p} is not a port"));
                default_port
            }
        };
        let password = self.secret(
            "stepup.email.smtp.password",
            e.smtp.password,
            e.smtp.password_file,
        );
        let ca_file = e
            .smtp
            .ca_file
            .and_then(|f| self.existing_file("stepup.email.smtp.ca_file", &f.0));
        let timeout = self.duration("stepup.email.timeout", e.timeout, Duration::from_secs(15));
        let settings = EmailSettings {
            host: e.smtp.host.0,
            port,
            security,
            username: e.smtp.username.map(|u| u.0),
            password,
            from: e.from.0,
            subject: e
                .subject
                .map(|s| s.0)
                .unwrap_or_else(|| "Your verification code".into()),
            timeout,
            ca_file,
        };
        if self.problems.len() > before {
            // A problem already reported (an unreadable password_file, say)
            // would only show up again as a misleading follow-on error.
            return None;
        }
        if let Err(msg) = crate::delivery::email::EmailNotifier::new(settings.clone()) {
            self.problem("stepup.email", msg);
            return None;
        }
        Some(settings)
    }

    fn sms(&mut self, s: raw::Sms, timeout: Duration) -> Option<SmsSettings> {
        let before = self.problems.len();
        let settings = self.sms_settings(s)?;
        if self.problems.len() > before {
            return None;
        }
        // What only the notifier checks (Twilio SID shape, header values,
        // a zero timeout) is a config error too, not a start-up failure.
        if let Err(msg) = crate::delivery::sms::SmsNotifier::new(settings.clone(), timeout) {
            self.problem("stepup.sms", msg);
            return None;
        }
        Some(settings)
    }

    fn sms_settings(&mut self, s: raw::Sms) -> Option<SmsSettings> {
        match (s.webhook, s.twilio) {
            (Some(w), None) => {
                let url = match w.url.0.parse::<Uri>() {
                    Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) => u,
                    _ => {
                        self.problem(
                            "stepup.sms.webhook.url",
                            format!("invalid URL {:?}", w.url.0),
                        );
                        return None;
                    }
                };
                let auth_header = self.secret(
                    "stepup.sms.webhook.auth_header",
                    w.auth_header,
                    w.auth_header_file,
                );
                Some(SmsSettings::Webhook { url, auth_header })
            }
            (None, Some(t)) => {
                let auth_token = self.secret(
                    "stepup.sms.twilio.auth_token",
                    t.auth_token,
                    t.auth_token_file,
                );
                if auth_token.is_none() {
                    self.problem("stepup.sms.twilio.auth_token", "is required");
                }
                let base = t
                    .base_url
                    .map(|b| b.0)
                    .unwrap_or_else(|| "https://api.twilio.com".into());
                let base_url = match base.parse::<Uri>() {
                    Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) => u,
                    _ => {
                        self.problem(
                            "stepup.sms.twilio.base_url",
                            format!("invalid URL {base:?}"),
                        );
                        return None;
                    }
                };
                Some(SmsSettings::Twilio {
                    account_sid: t.account_sid.0,
                    auth_token: auth_token?,
                    from: t.from.0,
                    base_url,
                })
            }
            _ => {
                self.problem("stepup.sms", "give exactly one of webhook or twilio");
                None
            }
        }
    }

    fn store(&mut self, s: raw::Store) -> Option<StoreConfig> {
        let before = self.problems.len();
        let store = self.store_settings(s)?;
        if self.problems.len() > before {
            return None;
        }
        // Build the client as `run` will (it connects lazily, so Redis need
        // not be up): what it refuses is refused here, at its key.
        match &store {
            StoreConfig::Memory { .. } => {}
            StoreConfig::Redis {
                url,
                prefix,
                ca_file,
            } => {
                let ca = ca_file.as_ref().and_then(|path| {
                    std::fs::read(path)
                        .map_err(|e| {
                            self.problem(
                                "store.ca_file",
                                format!("cannot read {}: {e}", path.display()),
                            )
                        })
                        .ok()
                });
                if ca_file.is_some() && ca.is_none() {
                    return None;
                }
                // The Redis client takes the PEM as it is; a file without a
                // certificate would only fail at the first connection.
                if let Some(path) = ca_file {
                    let mut roots = rustls::RootCertStore::empty();
                    if let Err(e) = crate::proxy::add_ca_file(&mut roots, path) {
                        self.problem("store.ca_file", format!("cannot load {e}"));
                        return None;
                    }
                }
                let key = if ca.is_some() {
                    "store.ca_file"
                } else {
                    "store.redis"
                };
                if let Err(e) = crate::store::RedisStore::with_ca(url, prefix, ca) {
                    self.problem(key, e.to_string());
                    return None;
                }
            }
            StoreConfig::Cluster { urls, prefix } => {
                if let Err(e) = crate::store::RedisStore::cluster(urls, prefix) {
                    self.problem("store.redis_cluster", e.to_string());
                    return None;
                }
            }
        }
        Some(store)
    }

    fn store_settings(&mut self, s: raw::Store) -> Option<StoreConfig> {
        let prefix = s.prefix.map(|p| p.0).unwrap_or_else(|| "stepgate:".into());
        let redis_used = s.redis.is_some() || s.redis_cluster.is_some();
        if redis_used {
            if let Err(e) = crate::store::redis::check_prefix(&prefix) {
                self.problem("store.prefix", e);
            }
        }
        match (s.redis, s.redis_cluster) {
            (Some(_), Some(_)) => {
                self.problem("store", "give either redis or redis_cluster, not both");
                None
            }
            (Some(url), None) => {
                if !(url.0.starts_with("redis://")
                    || url.0.starts_with("rediss://")
                    || url.0.starts_with("unix://"))
                {
                    self.problem(
                        "store.redis",
                        format!(
                            "invalid Redis URL {:?}: expected redis://host:port/db",
                            url.0
                        ),
                    );
                    return None;
                }
                if let Err(e) = redis::Client::open(url.0.as_str()) {
                    self.problem("store.redis", format!("invalid Redis URL: {e}"));
                    return None;
                }
                let ca_file = s
                    .ca_file
                    .and_then(|f| self.existing_file("store.ca_file", &f.0));
                if ca_file.is_some() && !url.0.starts_with("rediss://") {
                    self.problem("store.ca_file", "only applies to rediss:// (TLS) URLs");
                }
                Some(StoreConfig::Redis {
                    url: url.0,
                    prefix,
                    ca_file,
                })
            }
            (None, Some(urls)) => {
                if urls.is_empty() {
                    self.problem("store.redis_cluster", "must list at least one node");
                }
                for (i, url) in urls.iter().enumerate() {
                    if let Err(e) = redis::Client::open(url.0.as_str()) {
                        self.problem(
                            &format!("store.redis_cluster[{i}]"),
                            format!("invalid Redis URL: {e}"),
                        );
                    }
                }
                if s.ca_file.is_some() {
                    self.problem(
                        "store.ca_file",
                        "applies to store.redis only, not to redis_cluster",
                    );
                }
                Some(StoreConfig::Cluster {
                    urls: urls.into_iter().map(|u| u.0).collect(),
                    prefix,
                })
            }
            (None, None) => {
                if s.ca_file.is_some() {
                    self.problem("store.ca_file", "applies to store.redis only");
                }
                Some(StoreConfig::Memory {
                    max_entries: s.max_entries.unwrap_or(100_000) as usize,
                })
            }
        }
    }

    fn routes(&mut self, routes: Vec<raw::Route>, stepup: Option<&Stepup>) -> Vec<Rule> {
        let mut rules = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, r) in routes.into_iter().enumerate() {
            let at = format!("routes[{i}]");
            let line = self.index.locate(&at).0;
            let name = r
                .name
                .map(|n| n.0)
                .unwrap_or_else(|| format!("route{}", i + 1));
            if let Some(prev) = names.insert(name.clone(), i) {
                self.problem(
                    &format!("{at}.name"),
                    format!("duplicate route name {name:?} (also routes[{prev}])"),
                );
            }
            let any_case = r.case_insensitive.unwrap_or(false);
            let path = match (r.path, r.path_regex) {
                (Some(p), None) if any_case => match Glob::case_insensitive(&p.0) {
                    Ok(g) => Some(PathMatcher::Glob(g)),
                    Err(e) => {
                        self.problem(&format!("{at}.path"), e);
                        None
                    }
                },
                (Some(p), None) => match Glob::new(&p.0) {
                    Ok(g) => Some(PathMatcher::Glob(g)),
                    Err(e) => {
                        self.problem(&format!("{at}.path"), e);
                        None
                    }
                },
                (None, Some(re)) => match PathMatcher::regex_with_case(&re.0, any_case) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        self.problem(&format!("{at}.path_regex"), e);
                        None
                    }
                },
                (Some(_), Some(_)) => {
                    self.problem(&at, "give either path or path_regex, not both");
                    None
                }
                (None, None) => {
                    self.problem(&at, "needs path or path_regex");
                    None
                }
            };
            if let (Some(PathMatcher::Glob(g)), Some(su)) = (&path, stepup) {
                let prefix_glob = Glob::new(&format!("{}/**", su.prefix));
                if g.matches(&su.prefix)
                    || prefix_glob.map(|p| p.matches(g.as_str())).unwrap_or(false)
                {
                    self.problem(
                        &format!("{at}.path"),
                        format!("overlaps the gateway's own prefix {}", su.prefix),
                    );
                }
            }
            let methods = r.methods.map(|ms| {
                ms.iter()
                    .enumerate()
                    .filter_map(|(j, m)| {
                        let valid = !m.0.is_empty() && m.0.bytes().all(|b| b.is_ascii_alphabetic());
                        match http::Method::from_bytes(m.0.as_bytes()) {
                            Ok(method) if valid => Some(method),
                            _ => {
                                self.problem(
                                    &format!("{at}.methods[{j}]"),
                                    format!("invalid method {:?}", m.0),
                                );
                                None
                            }
                        }
                    })
                    .collect::<Vec<_>>()
            });
            let hosts = r.hosts.map(|hs| {
                hs.iter()
                    .enumerate()
                    .filter_map(|(j, h)| match HostPattern::new(&h.0) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            self.problem(&format!("{at}.hosts[{j}]"), e);
                            None
                        }
                    })
                    .collect::<Vec<_>>()
            });
            let public = r.public.unwrap_or(false);
            let deny = r.deny.unwrap_or(false);
            let kinds = usize::from(public) + usize::from(deny) + usize::from(r.stepup.is_some());
            if kinds > 1 {
                self.problem(&at, "a route is one of public, deny or stepup");
            }
            let action = if let Some(s) = r.stepup {
                let key = format!("{at}.stepup");
                let lifetime = stepup
                    .map(|s| s.token.lifetime)
                    .unwrap_or(Duration::from_secs(900));
                let max_age = self.duration(&format!("{key}.max_age"), s.max_age, lifetime);
                if max_age > lifetime {
                    self.problem(
                        &format!("{key}.max_age"),
                        format!(
                            "max_age {} is longer than stepup.token.lifetime {}",
                            fmt_duration(max_age),
                            fmt_duration(lifetime)
                        ),
                    );
                }
                let mut factors = Vec::new();
                for (j, f) in s.factors.unwrap_or_default().iter().enumerate() {
                    match Channel::parse(&f.0) {
                        Some(c) if !factors.contains(&c) => factors.push(c),
                        Some(_) => {}
                        None => self.problem(
                            &format!("{key}.factors[{j}]"),
                            format!("unknown factor {:?}: expected email or sms", f.0),
                        ),
                    }
                }
                if factors.is_empty() {
                    factors = Channel::ALL.to_vec();
                }
                let idp = s.idp.map(|i| {
                    let list = |v: Option<Vec<raw::Str>>| -> Vec<String> {
                        v.unwrap_or_default()
                            .into_iter()
                            .map(|s| s.0)
                            .filter(|s| !s.is_empty())
                            .collect()
                    };
                    let f = crate::policy::IdpFactor {
                        amr: list(i.amr),
                        acr: list(i.acr),
                    };
                    if f.amr.is_empty() && f.acr.is_empty() {
                        self.problem(
                            &format!("{key}.idp"),
                            "list amr and/or acr values that count as a second factor",
                        );
                    }
                    if let Some(bad) = f.acr.iter().find(|a| a.contains(['"', '\\', ' '])) {
                        self.problem(
                            &format!("{key}.idp.acr"),
                            format!(
                                "{bad:?}: acr values cannot contain spaces, quotes or backslashes"
                            ),
                        );
                    }
                    f
                });
                // A rule the IdP alone can satisfy needs no channel here.
                if let (Some(su), None) = (stepup, &idp) {
                    let usable = factors.iter().any(|c| match c {
                        Channel::Email => su.email.is_some() || su.console,
                        Channel::Sms => su.sms.is_some() || su.console,
                    });
                    if !usable {
                        self.problem(
                            &key,
                            "none of this route's factors is configured (stepup.email / stepup.sms)",
                        );
                    }
                }
                Action::StepUp(StepUp {
                    max_age,
                    factors,
                    one_time: s.one_time.unwrap_or(false),
                    idp,
                })
            } else if public {
                Action::Public
            } else if deny {
                Action::Deny
            } else {
                Action::Identity
            };
            if let Some(path) = path {
                rules.push(Rule {
                    name: name.into(),
                    line,
                    path,
                    methods,
                    hosts,
                    action,
                });
            }
        }
        rules
    }

    fn log(&mut self, l: raw::Log) -> Log {
        let format = match l.format.as_ref().map(|f| f.0.as_str()) {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                self.problem(
                    "log.format",
                    format!("unknown format {other:?}: expected text or json"),
                );
                LogFormat::Text
            }
        };
        let level = l.level.map(|l| l.0).unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            self.problem("log.level", format!("invalid level {level:?}"));
        }
        Log { format, level }
    }
}

/// A problem is one `FILE:LINE:COL: ...` line. A multi-line message (the
/// regex crate's: a header, the pattern, a caret, `error: ...`) keeps its
/// first and last lines.
fn one_line(msg: &str) -> String {
    let lines: Vec<&str> = msg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    match lines.as_slice() {
        [] => String::new(),
        [one] => (*one).to_string(),
        [first, .., last] => format!("{first} {}", last.trim_start_matches("error: ")),
    }
}

fn leaf(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

fn decoding_key_from_pem(pem: &[u8], alg: Algorithm) -> Result<DecodingKey, String> {
    use Algorithm::*;
    let r = match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => DecodingKey::from_rsa_pem(pem),
        ES256 | ES384 => DecodingKey::from_ec_pem(pem),
        EdDSA => DecodingKey::from_ed_pem(pem),
        HS256 | HS384 | HS512 => return Err("HS algorithms take a secret, not a PEM key".into()),
    };
    r.map_err(|e| e.to_string())
}

fn signing_key_from_pem(pem: &[u8]) -> Result<SigningKey, String> {
    let text = String::from_utf8_lossy(pem);
    // A private key PEM; we find the algorithm by trying each kind.
    if let Ok(encoding) = jsonwebtoken::EncodingKey::from_ed_pem(pem) {
        let decoding = crate::token::ed25519_public_from_private_pem(&text)?;
        return Ok(SigningKey::Pem {
            algorithm: Algorithm::EdDSA,
            encoding,
            decoding,
        });
    }
    if let Ok(encoding) = jsonwebtoken::EncodingKey::from_ec_pem(pem) {
        let decoding = crate::token::p256_public_from_private_pem(&text)?;
        return Ok(SigningKey::Pem {
            algorithm: Algorithm::ES256,
            encoding,
            decoding,
        });
    }
    Err("expected an Ed25519 or P-256 private key in PKCS#8 PEM".into())
}

fn load_jwks(path: &Path) -> Result<HashMap<String, (DecodingKey, Option<Algorithm>)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let mut keys = HashMap::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {i}: {e}"))?;
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok());
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        if set.keys.len() == 1 {
            keys.insert(String::new(), (key.clone(), alg));
        }
        keys.insert(kid, (key, alg));
    }
    if keys.is_empty() {
        return Err("the key set is empty".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let env = [
            ("JWT_SECRET", "0123456789abcdef0123456789abcdef"),
            ("STEPGATE_KEY", "fedcba9876543210fedcba9876543210"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Config::from_yaml(Path::new("gateway.yaml"), text, &env)
    }

    const BASE: &str = "\
upstream:
  url: http://127.0.0.1:3000
identity:
  jwt:
    algorithms: [HS256]
    secret: ${JWT_SECRET}
stepup:
  token:
    signing_key: ${STEPGATE_KEY}
  console: true
dev: true
";

    #[test]
    // A minimal valid file loads with the documented defaults.
    fn minimal_file_loads_with_defaults() {
        let c = load(BASE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.listen.address.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin.address.to_string(), "127.0.0.1:9901");
        assert_eq!(c.stepup.prefix, "/.stepgate");
        assert_eq!(c.stepup.otp.length, 6);
        assert_eq!(c.stepup.otp.ttl, Duration::from_secs(300));
        assert_eq!(
            c.store,
            StoreConfig::Memory {
                max_entries: 100_000
            }
        );
        assert_eq!(c.policy.default, DefaultPolicy::Pass);
    }

    #[test]
    // Unknown keys are typos, never silently ignored.
    fn unknown_key_is_located() {
        let text = format!("{BASE}routes:\n  - path: /a\n    stepp: {{}}\n");
        let e = load(&text).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.starts_with("gateway.yaml:14:"), "{e}");
        assert!(e.contains("unknown field `stepp`"), "{e}");
    }

    #[test]
    // An unset variable must not silently become an empty secret.
    fn unset_env_is_an_error_naming_it() {
        let text = BASE
            .replace("${STEPGATE_KEY}", "${NOPE_KEY}")
            .replace("${JWT_SECRET}", "${NOPE_JWT}");
        let e = load(&text).err().map(|e| e.to_string()).unwrap_or_default();
        // Both are reported, each once, and not also as a short secret.
        assert!(
            e.contains("gateway.yaml:6:13: environment variable NOPE_JWT is not set"),
            "{e}"
        );
        assert!(!e.contains("bytes"), "{e}");
        assert!(
            e.contains("environment variable NOPE_KEY is not set"),
            "{e}"
        );
        assert!(
            e.contains("gateway.yaml:9:18: environment variable NOPE_KEY is not set"),
            "{e}"
        );
    }

    #[test]
    // Send-abuse settings: defaults (client cap on, no budgets, any SMS
    // destination), parsed values, and every bad value at its location.
    fn send_abuse_settings() {
        let c = load(BASE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.stepup.otp.max_sends_per_client, 50);
        assert_eq!(c.stepup.budget, SendBudget::default());
        let sms = "  sms:\n    webhook: { url: \"https://sms.test/send\" }\n";
        let good = BASE.replace(
            "  console: true\n",
            &format!("  console: true\n  otp:\n    max_sends_per_client: 0\n{sms}    hourly_budget: 300\n    allowed_countries: [\"+1\", \"+4420\"]\n"),
        );
        let c = load(&good).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.stepup.otp.max_sends_per_client, 0);
        assert_eq!(
            c.stepup.budget,
            SendBudget {
                email_per_hour: None,
                sms_per_hour: Some(300),
                sms_countries: vec!["+1".into(), "+4420".into()],
            }
        );
        let bad = BASE.replace(
            "  console: true\n",
            &format!("  console: true\n{sms}    hourly_budget: 0\n    allowed_countries: [\"44\", \"+1234567\", \"+1\"]\n"),
        );
        let e = load(&bad).err().map(|e| e.to_string()).unwrap_or_default();
        for want in [
            "gateway.yaml:13:20: stepup.sms.hourly_budget: 0 is out of range",
            "gateway.yaml:14:25: stepup.sms.allowed_countries[0]: invalid country code \"44\"",
            "gateway.yaml:14:31: stepup.sms.allowed_countries[1]: invalid country code",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        let empty = BASE.replace(
            "  console: true\n",
            &format!("  console: true\n{sms}    allowed_countries: []\n"),
        );
        let e = load(&empty)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("stepup.sms.allowed_countries: an empty list"),
            "{e}"
        );
    }

    #[test]
    // Every semantic problem is reported at once, each with its line.
    fn all_problems_reported_with_lines() {
        let text = "\
upstream:
  url: ftp://x
  timeout: 5 minutes
identity:
  jwt:
    algorithms: [HS256, none]
    secret: short
stepup:
  otp:
    length: 4
    ttl: 30m
  token:
    signing_key: tooshort
routes:
  - name: a
    path: /a/**/b/**x
    stepup: { max_age: 1h, factors: [pigeon] }
default: maybe
";
        let e = load(text).err().map(|e| e.to_string()).unwrap_or_default();
        for want in [
            "gateway.yaml:2:8: upstream.url: invalid URL",
            "gateway.yaml:3:12: upstream.timeout: invalid duration",
            "gateway.yaml:6:25: identity.jwt.algorithms[1]: alg none",
            "gateway.yaml:7:13: identity.jwt.secret: HS secret is 5 bytes",
            "gateway.yaml:10:13: stepup.otp.length: 4 is out of range",
            "gateway.yaml:11:10: stepup.otp.ttl: codes valid longer than 10m",
            "gateway.yaml:13:18: stepup.token.signing_key: HS256 key is 8 bytes",
            "gateway.yaml:16:11: routes[0].path:",
            "gateway.yaml:17:24: routes[0].stepup.max_age: max_age 1h is longer",
            "gateway.yaml:17:38: routes[0].stepup.factors[0]: unknown factor",
            "gateway.yaml:18:10: default: unknown default policy",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }

    #[test]
    // Every problem at once: an empty algorithm list is reported even when
    // an unrelated key earlier in the file is bad too (it used to be
    // skipped whenever any problem had been found before it).
    fn empty_algorithms_reported_beside_unrelated_problem() {
        let text = BASE
            .replace("  url: http://127.0.0.1:3000\n", "  url: ftp://x\n")
            .replace("algorithms: [HS256]", "algorithms: []");
        let e = load(&text).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.contains("gateway.yaml:2:8: upstream.url: invalid URL"),
            "{e}"
        );
        assert!(
            e.contains(
                "gateway.yaml:5:5: identity.jwt.algorithms: must list at least one algorithm"
            ),
            "{e}"
        );
        // A list whose every entry is refused is reported entry by entry.
        let e = load(&BASE.replace("algorithms: [HS256]", "algorithms: [none]"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("alg none is never accepted"), "{e}");
        assert!(!e.contains("must list at least one"), "{e}");
    }

    #[test]
    // Hostile config files: deep nesting (flow, block, and a file the
    // parsers disagree on) is refused before parsing, at the place where the
    // limit is crossed; the schema's own depth passes.
    fn hostile_nesting_refused_before_parsing() {
        let deep = [
            (
                format!(
                    "{BASE}routes: {}{}\n",
                    "[".repeat(60_000),
                    "]".repeat(60_000)
                ),
                "gateway.yaml:12:41: nested deeper than 32 levels",
            ),
            (
                format!(
                    "{BASE}routes: {}1{}\n",
                    "{a: ".repeat(60_000),
                    "}".repeat(60_000)
                ),
                "gateway.yaml:12:",
            ),
            (
                format!(
                    "{BASE}{}",
                    (0..40)
                        .map(|i| format!("{}a{i}:\n", "  ".repeat(i)))
                        .collect::<String>()
                ),
                "gateway.yaml:44:",
            ),
            // A tab where yaml-rust2 stops: the flow count still bounds it.
            (
                format!("{BASE}\tx: {}\n", "[".repeat(60_000)),
                "gateway.yaml:12:37: nested deeper than 32 levels",
            ),
        ];
        for (text, want) in deep {
            let e = load(&text).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.starts_with(want), "want {want:?}, got {e}");
            assert!(
                e.contains("nested deeper than 32 levels; nothing was parsed"),
                "{e}"
            );
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let ok = format!(
            "{BASE}routes:\n  - {{ name: a, path: /a/**, stepup: {{ max_age: 1m, factors: [email] }} }}\n"
        );
        assert!(load(&ok).is_ok());
    }

    #[test]
    // Hostile config files: a file above the size bound is refused unread,
    // located at the first byte past the bound; `load` never reads more.
    fn oversized_file_refused_before_parsing() {
        let mut text = BASE.to_string();
        while text.len() <= MAX_CONFIG_BYTES {
            text.push_str("# padding padding padding padding padding padding padding\n");
        }
        let e = load(&text).err().map(|e| e.to_string()).unwrap_or_default();
        let line = text[..MAX_CONFIG_BYTES].matches('\n').count() + 1;
        assert!(e.starts_with(&format!("gateway.yaml:{line}:")), "{e}");
        assert!(
            e.ends_with("the config file is larger than 1048576 bytes; nothing was parsed"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("big.yaml");
        std::fs::write(&path, &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read_bounded(&path).map(|b| b.len()).unwrap_or(0),
            MAX_CONFIG_BYTES + 1
        );
        let e = Config::load(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("larger than 1048576 bytes"), "{e}");
    }

    #[test]
    // alg confusion: a public key next to HS algorithms is refused.
    fn hs_with_public_key_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let pk = dir.path().join("pk.pem");
        std::fs::write(&pk, "not a key").unwrap_or_else(|e| panic!("{e}"));
        let text = BASE.replace(
            "    algorithms: [HS256]\n    secret: ${JWT_SECRET}\n",
            &format!(
                "    algorithms: [HS256, RS256]\n    public_key: {}\n",
                pk.display()
            ),
        );
        let e = load(&text).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.contains("HS algorithms are refused when a public key is configured"),
            "{e}"
        );
        assert!(e.contains("cannot load"), "{e}");
    }

    #[test]
    // The console channel leaks codes to logs; production configs refuse it.
    fn console_refused_outside_dev() {
        let e = load(&BASE.replace("dev: true\n", ""))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("stepup.console"), "{e}");
    }

    #[test]
    // A step-up route without any way to know the user is a config error,
    // not a route that can never be reached.
    fn routes_needing_identity_need_an_identity_source() {
        let text = "upstream: { url: http://127.0.0.1:1 }\nstepup:\n  token: { signing_key: fedcba9876543210fedcba9876543210 }\n  console: true\ndev: true\nroutes:\n  - { name: a, path: /a/**, stepup: { max_age: 1m } }\n";
        let e = load(text).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.contains("identity: routes need a primary identity"),
            "{e}"
        );
        let ok = text.replace("stepup: { max_age: 1m }", "public: true");
        assert!(load(&ok).is_ok());
    }

    #[test]
    // store.ca_file is never silently ignored.
    fn store_ca_file_only_with_redis() {
        let e = load(&format!("{BASE}store:\n  ca_file: Cargo.toml\n"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("store.ca_file: applies to store.redis only"),
            "{e}"
        );
        let e = load(&format!(
            "{BASE}store:\n  redis: redis://127.0.0.1:6379/0\n  ca_file: Cargo.toml\n"
        ))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("only applies to rediss://"), "{e}");
    }

    #[test]
    // Identity sources that are unsafe or can never work are refused.
    fn unsafe_identity_sources_refused() {
        let with_th = |th: &str| {
            BASE.replace(
                "    secret: ${JWT_SECRET}\n",
                &format!("    secret: ${{JWT_SECRET}}\n  trusted_header: {th}\n"),
            )
        };
        for (th, want) in [
            ("{ user: X-User, from: [0.0.0.0/0] }", "a /0 range"),
            ("{ user: X-User, from: [\"::/0\"] }", "a /0 range"),
            (
                "{ user: X-Stepgate-User, from: [127.0.0.1/32] }",
                "reserved by the gateway",
            ),
            (
                "{ user: Authorization, from: [127.0.0.1/32] }",
                "reserved by the gateway",
            ),
        ] {
            let e = load(&with_th(th))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(want), "{th}: {e}");
        }
        assert!(load(&with_th("{ user: X-User, from: [127.0.0.1/32] }")).is_ok());
        let e = load(&BASE.replace(
            "    algorithms: [HS256]\n",
            "    algorithms: [HS256]\n    from: []\n",
        ))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            e.contains("identity.jwt.from: must list header and/or cookie"),
            "{e}"
        );
    }

    #[test]
    // Durations parse in the units the contract documents.
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("5 m").is_err());
        assert_eq!(fmt_duration(Duration::from_secs(300)), "5m");
    }

    #[test]
    // A `*_file` secret is read from disk, without its trailing newline.
    fn secret_file_is_read() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = dir.path().join("jwt.key");
        std::fs::write(&f, "0123456789abcdef0123456789abcdefXYZ\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let text = BASE.replace(
            "secret: ${JWT_SECRET}",
            &format!("secret_file: {}", f.display()),
        );
        let c = load(&text).unwrap_or_else(|e| panic!("{e}"));
        let secret = c.identity.jwt.and_then(|j| j.hs_secret).unwrap_or_default();
        assert_eq!(secret, b"0123456789abcdef0123456789abcdefXYZ");
    }
}
