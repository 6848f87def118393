//! The config file: raw serde schema (`raw.rs`, `${NAME}` from `env.rs`) ->
//! validation (`validate/`) -> build step (`build.rs`) -> immutable
//! [`Config`]; positions from `position.rs`.
//!
//! Loading happens in four steps so that every problem is reported with
//! `FILE:LINE:COL: key.path: message`:
//! 1. `serde_yaml` parses the text into [`raw`] structs that refuse unknown
//!    keys; then `env.rs` substitutes `${NAME}` in every string from the
//!    environment passed in, so an unset variable is reported at the place
//!    it is used.
//! 2. A position index built from the same text (yaml-rust2's event parser,
//!    which keeps marks) maps key paths like `routes[2].stepup.max_age` to
//!    their line and column.
//! 3. `validate/` walks the raw structs once, one file per section, and
//!    collects *every* semantic problem. It loads no key file and builds
//!    no runtime object, it records what is to be built; the only files it
//!    reads are secrets whose length it checks (`*_file` secrets, and
//!    `stepup.token.signing_key_file`, whose bytes also say whether it is
//!    an HS256 secret or a PEM and seed the code-hash key).
//! 4. `build.rs` builds, once per load, the runtime objects the gateway
//!    serves with (TLS, CA certificates, the primary-token and token keys,
//!    notifiers, the store's client, the assertion key), with the code of
//!    the module that owns each, into [`Config::built`]; what it refuses
//!    is a located problem beside the others, so `check` refuses what
//!    `run` would. The typed `Config` exists only when there is none.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

pub use self::build::Built;
use crate::policy::Policy;

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
    pub upstream: crate::proxy::Settings,
    pub identity: crate::identity::Settings,
    pub stepup: crate::stepup::Settings,
    pub store: crate::store::Settings,
    pub policy: Policy,
    pub log: crate::telemetry::LogSettings,
    /// Development mode: allows the console channel.
    pub dev: bool,
    /// [`source_digest`] of the text this config was read from, so a
    /// reload can tell whether the file changed since.
    pub digest: [u8; 32],
    /// The runtime objects the build step built from these settings; the
    /// gateway serves with them (see `build.rs`).
    pub built: Built,
}

/// SHA-256 of config file text.
pub fn source_digest(text: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(text).into()
}

/// `listen.workers` when not set: one per CPU the process may use (cgroup
/// quotas included), as nginx's `worker_processes auto`.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `listen.max_connections` when not set.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct Listen {
    pub address: SocketAddr,
    pub tls: Option<crate::tls::TlsFiles>,
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
    /// Threads serving client connections, each with its own runtime
    /// (and its own upstream connections).
    pub workers: usize,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub address: SocketAddr,
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
        let mut raw = match serde_yaml::from_str::<raw::File>(text) {
            Ok(raw) => raw,
            Err(e) => {
                // Nothing was substituted: unset variables are found in
                // the text, so they are reported beside the parse error.
                let mut problems = missing_env_problems(text, &env::unset_in_text(text, env));
                let mut p = problem_from_serde(&e);
                if let Some((line, col)) = PositionIndex::build(text).duplicate(&p.message) {
                    (p.line, p.col) = (line, col);
                }
                problems.push(p);
                problems.sort_by_key(|p| (p.line, p.col));
                return Err(fail(problems));
            }
        };
        let index = PositionIndex::build(text);
        let unresolved = env::substitute_all(&mut raw, env);
        let mut env_problems = missing_env_problems(text, &unresolved.missing);
        for (key, message) in unresolved.malformed {
            let (line, col) = index.locate(&key);
            env_problems.push(Problem {
                line,
                col,
                key,
                message,
            });
        }
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut v = validate::Validator::new(&index, base);
        let config = validate::config(&mut v, file, raw);
        let built = build::run(&mut v);
        if v.problems.is_empty() && env_problems.is_empty() {
            if let (Some(config), Some(built)) = (config, built) {
                let mut config = config(built);
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

mod build;
mod env;
mod position;
mod raw;
mod validate;

use self::position::PositionIndex;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DefaultPolicy;
    use crate::stepup::SendBudget;

    /// Load `text` as `gateway.yaml` with the two secrets `BASE` names set.
    pub(super) fn load(text: &str) -> Result<Config, ConfigError> {
        let env = [
            ("JWT_SECRET", "0123456789abcdef0123456789abcdef"),
            ("STEPGATE_KEY", "fedcba9876543210fedcba9876543210"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Config::from_yaml(Path::new("gateway.yaml"), text, &env)
    }

    /// Every problem `text` has, one per line (empty when it loads).
    pub(super) fn problems(text: &str) -> String {
        load(text).err().map(|e| e.to_string()).unwrap_or_default()
    }

    /// The smallest valid file (11 lines); tests append or replace keys.
    pub(super) const BASE: &str = "\
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
            crate::store::Settings::Memory {
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
    // A malformed `${` is a problem at its key beside the others, not a
    // parse failure that hides them; unset variables are still reported
    // when the file does not parse at all.
    fn malformed_and_unset_variables_beside_other_problems() {
        let text = BASE.replace(
            "  url: http://127.0.0.1:3000\n",
            "  url: ftp://x\n  timeout: ${OOPS\n",
        );
        let e = problems(&text);
        assert!(
            e.contains("gateway.yaml:2:8: upstream.url: invalid URL"),
            "{e}"
        );
        assert!(
            e.contains("gateway.yaml:3:12: upstream.timeout: unclosed ${ in \"${OOPS\""),
            "{e}"
        );
        assert!(!e.contains("invalid duration"), "{e}");
        let e = problems(&format!(
            "{}typo: 1\n",
            BASE.replace("${STEPGATE_KEY}", "${NOPE_KEY}")
        ));
        assert!(
            e.contains("gateway.yaml:9:18: environment variable NOPE_KEY is not set"),
            "{e}"
        );
        assert!(e.contains("gateway.yaml:12:1: unknown field `typo`"), "{e}");
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
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(fmt_duration(Duration::from_secs(300)), "5m");
        // The largest whole unit; milliseconds for a fraction of a second
        // (and for zero), never a rounded value.
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(fmt_duration(Duration::ZERO), "0ms");
        assert_eq!(fmt_duration(Duration::from_secs(86_400)), "24h");
        for d in ["250ms", "1500ms", "30s", "90s", "5m", "2h"] {
            assert_eq!(parse_duration(d).map(fmt_duration).as_deref(), Ok(d));
        }
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
