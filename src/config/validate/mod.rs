//! Validation: raw structs in, the typed [`Config`] out, one file per
//! section of the file. Each section's validator reports located problems
//! into the shared [`Validator`] and carries on with a default, so one bad
//! key never hides another: every problem is reported at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::build::{Build, Built};
use super::position::PositionIndex;
use super::{parse_duration, raw, Config, Problem};
use crate::policy::{Action, DefaultPolicy, Policy};

mod admin;
mod email;
mod identity;
mod jwt;
mod listen;
mod log;
mod routes;
mod sms;
mod stepup;
mod store;
mod token;
mod upstream;

/// The shared error collector: where each key sits in the file, the
/// directory relative paths are resolved against, and every problem found
/// so far. The helpers parse the value kinds several sections share.
pub(super) struct Validator<'a> {
    index: &'a PositionIndex,
    base: PathBuf,
    pub(super) problems: Vec<Problem>,
    /// What `run` will build from the sections validated so far.
    builds: Vec<Build>,
}

impl<'a> Validator<'a> {
    pub(super) fn new(index: &'a PositionIndex, base: PathBuf) -> Validator<'a> {
        Validator {
            index,
            base,
            problems: Vec::new(),
            builds: Vec::new(),
        }
    }

    /// Record a runtime object for the build step to build.
    fn build(&mut self, b: Build) {
        self.builds.push(b);
    }

    /// What the build step is to build, in the order recorded.
    pub(in crate::config) fn take_builds(&mut self) -> Vec<Build> {
        std::mem::take(&mut self.builds)
    }

    pub(in crate::config) fn problem(&mut self, key: &str, message: impl Into<String>) {
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

    fn header_name(&mut self, key: &str, s: &str) -> Option<http::HeaderName> {
        match http::HeaderName::from_bytes(s.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.problem(key, format!("invalid header name {s:?}"));
                None
            }
        }
    }
}

/// Every section in file order, then the checks across sections. The
/// config is complete once the build step has built what validation
/// recorded: this returns it waiting for that.
pub(super) fn config(
    v: &mut Validator<'_>,
    file: &Path,
    raw: raw::File,
) -> Option<impl FnOnce(Built) -> Config> {
    let dev = raw.dev.unwrap_or(false);
    let listen = listen::validate(v, raw.listen.unwrap_or_default());
    let admin = admin::validate(v, raw.admin.unwrap_or_default(), listen.as_ref());
    let upstream = upstream::validate(v, raw.upstream.unwrap_or_default());
    let identity = identity::validate(v, raw.identity.unwrap_or_default());
    let stepup = stepup::validate(v, raw.stepup.unwrap_or_default(), dev);
    let store = store::validate(v, raw.store.unwrap_or_default());
    let default = routes::default_policy(v, raw.default);
    let rules = routes::validate(v, raw.routes, stepup.as_ref());
    let log = log::validate(v, raw.log.unwrap_or_default());
    let no_identity_source = identity
        .as_ref()
        .is_some_and(|id| id.jwt.is_none() && id.trusted_header.is_none());
    let needs_identity = default == DefaultPolicy::Identity
        || rules
            .iter()
            .any(|r| matches!(r.action, Action::Identity | Action::StepUp(_)));
    if no_identity_source && needs_identity {
        v.problem(
            "identity",
            "routes need a primary identity but neither identity.jwt nor identity.trusted_header is configured",
        );
    }
    let (listen, admin, upstream) = (listen?, admin?, upstream?);
    let (identity, stepup, store) = (identity?, stepup?, store?);
    let file = file.to_path_buf();
    Some(move |built| Config {
        file,
        listen,
        admin,
        upstream,
        identity,
        stepup,
        store,
        policy: Policy::new(rules, default),
        log,
        dev,
        digest: [0; 32],
        built,
    })
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
