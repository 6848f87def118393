//! Path normalisation and the route table: the pure functions that decide
//! which policy rule covers a request.
//!
//! This module is the security boundary between "what the client sent" and
//! "what the rules talk about". Every request path goes through
//! [`normalize_path`] exactly once; the result is both what [`Policy::route`]
//! matches and what is forwarded upstream, so the gate and the backend can
//! never disagree about which resource a request names.
//!
//! Normalisation decodes percent-escapes of unreserved characters, merges
//! repeated slashes and resolves `.`/`..` segments. Anything that a backend
//! could read in more than one way is refused (answered 400, never
//! forwarded) instead of guessed at: encoded `/` or `\`, backslashes, NUL and
//! other control characters, bytes that are not UTF-8 once decoded, and `..`
//! climbing above the root.
//!
//! A raw `;` is refused as well. Tomcat, Jetty and Spring strip `;params`
//! from every segment before routing, so `/admin;x=1/panel` or `/..;/admin`
//! reach a different resource there than the string suggests; other proxies
//! have been bypassed this way. Real applications hardly ever put a `;` in a
//! path, so refusing it costs little. An encoded `%3B` stays encoded and is
//! harmless.
//!
//! Escapes of reserved characters (`%40`, `%3A`, ...) are kept, with
//! uppercase hex, because a backend may treat `%2B` differently from `+`.
//! Most backends still decode them before routing, so a glob literal matches
//! a character either raw or percent-encoded: `/users/@me` also covers
//! `/users/%40me`, and `/café` covers `/caf%C3%A9`. A `path_regex` sees the
//! normalised string as it is; its author has to allow for both forms.
//!
//! Matching is case-sensitive unless a rule sets `case_insensitive` (for
//! IIS and other case-insensitive upstreams; see [`Glob::case_insensitive`]),
//! a glob ignores one trailing slash (backends
//! serve `/x` and `/x/` alike), and a rule listing `GET` also covers `HEAD`.
//! Rules are tried in file order and the first match wins.

use std::time::Duration;

use http::Method;

use crate::channel::Channel;

/// Why a request path was refused; each becomes a 400 with this text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("path must start with '/'")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("malformed percent-escape in path")]
    InvalidEscape,
    /// A percent-encoded `/` or `\`.
    #[error("encoded '/' or '\\' in path")]
    EncodedSeparator,
    /// A raw backslash.
    #[error("backslash in path")]
    Backslash,
    /// A percent-encoded NUL byte.
    #[error("NUL byte in path")]
    Nul,
    /// A control character, raw or percent-encoded.
    #[error("control character in path")]
    ControlChar,
    /// The percent-decoded path is not valid UTF-8.
    #[error("path is not valid UTF-8 once decoded")]
    InvalidUtf8,
    /// A `..` segment that climbs above the root.
    #[error("path climbs above the root")]
    AboveRoot,
    /// A raw `;` (path parameter).
    #[error("';' path parameters are not allowed")]
    PathParameter,
    /// A raw byte outside ASCII.
    #[error("raw non-ASCII byte in path")]
    NonAscii,
    /// A raw space, `?` or `#`, which would change the request target upstream.
    #[error("space, '?' or '#' in path")]
    InvalidChar,
}

/// Normalise the path part of a request target (no query).
///
/// Returns the one canonical form that is both matched against the rules and
/// forwarded upstream, or the reason the path is refused.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_already_normal(bytes) {
        return Ok(raw.to_owned());
    }
    normalize_slow(bytes)
}

/// A raw byte that normalisation keeps as it is and needs no closer look.
fn is_plain(b: u8) -> bool {
    matches!(b, 0x21..=0x7E) && !matches!(b, b'%' | b'\\' | b';' | b'?' | b'#')
}

/// True when `bytes` (starting with `/`) is already in normal form: only
/// plain bytes, no empty segment except a trailing one, no dot segments.
fn is_already_normal(bytes: &[u8]) -> bool {
    let mut seg_start = 1;
    for i in 1..=bytes.len() {
        let at_end = i == bytes.len();
        if at_end || bytes[i] == b'/' {
            let seg = &bytes[seg_start..i];
            if (seg.is_empty() && !at_end) || seg == b"." || seg == b".." {
                return false;
            }
            seg_start = i + 1;
        } else if !is_plain(bytes[i]) {
            return false;
        }
    }
    true
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte encoded by `%XY` at `bytes[i]`, if `bytes[i..]` starts with one.
fn escape_at(bytes: &[u8], i: usize) -> Option<u8> {
    if bytes.get(i) != Some(&b'%') {
        return None;
    }
    let hi = hex_val(*bytes.get(i + 1)?)?;
    let lo = hex_val(*bytes.get(i + 2)?)?;
    Some(hi << 4 | lo)
}

/// RFC 3986 unreserved characters: ALPHA DIGIT `-` `.` `_` `~`.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn push_escape(out: &mut Vec<u8>, b: u8) {
    out.extend_from_slice(&[
        b'%',
        HEX_UPPER[usize::from(b >> 4)],
        HEX_UPPER[usize::from(b & 0x0F)],
    ]);
}

/// Check a raw (not percent-encoded) byte.
fn check_raw(b: u8) -> Result<(), PathError> {
    match b {
        b'\\' => Err(PathError::Backslash),
        0x00..=0x1F | 0x7F => Err(PathError::ControlChar),
        0x80..=0xFF => Err(PathError::NonAscii),
        b';' => Err(PathError::PathParameter),
        b' ' | b'?' | b'#' => Err(PathError::InvalidChar),
        _ => Ok(()),
    }
}

/// Validate a finished run of consecutive decoded non-ASCII bytes.
///
/// Raw non-ASCII is refused, so such bytes only come from escapes, and an
/// ASCII byte can never continue a multi-byte sequence: the decoded path is
/// valid UTF-8 exactly when every such run is.
fn flush_utf8_run(run: &mut Vec<u8>) -> Result<(), PathError> {
    if run.is_empty() {
        return Ok(());
    }
    let valid = std::str::from_utf8(run).is_ok();
    run.clear();
    if valid {
        Ok(())
    } else {
        Err(PathError::InvalidUtf8)
    }
}

fn normalize_slow(bytes: &[u8]) -> Result<String, PathError> {
    // Pass 1: check every byte, decode unreserved escapes, uppercase the
    // others. The result is pure ASCII.
    let mut canon: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut high_run: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            flush_utf8_run(&mut high_run)?;
            check_raw(b)?;
            canon.push(b);
            i += 1;
            continue;
        }
        let v = escape_at(bytes, i).ok_or(PathError::InvalidEscape)?;
        i += 3;
        if v >= 0x80 {
            high_run.push(v);
            push_escape(&mut canon, v);
            continue;
        }
        flush_utf8_run(&mut high_run)?;
        match v {
            b'/' | b'\\' => return Err(PathError::EncodedSeparator),
            0x00 => return Err(PathError::Nul),
            0x01..=0x1F | 0x7F => return Err(PathError::ControlChar),
            _ if is_unreserved(v) => canon.push(v),
            _ => push_escape(&mut canon, v),
        }
    }
    flush_utf8_run(&mut high_run)?;
    let canon = String::from_utf8(canon).map_err(|_| PathError::InvalidUtf8)?;

    // Pass 2: merge slashes and resolve dot segments (`canon` starts with '/').
    let body = canon.get(1..).unwrap_or("");
    let last = body.rsplit('/').next().unwrap_or("");
    let trailing_slash = matches!(last, "" | "." | "..");
    let mut stack: Vec<&str> = Vec::new();
    for seg in body.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if stack.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => stack.push(s),
        }
    }
    let mut out = String::with_capacity(canon.len());
    for seg in &stack {
        out.push('/');
        out.push_str(seg);
    }
    if stack.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

/// A compiled glob pattern: `*` matches within one segment, `**` any number
/// of whole segments.
#[derive(Debug, Clone)]
pub struct Glob {
    src: String,
    segs: Vec<GlobSeg>,
    /// Literals are case-folded, and so is each path before matching.
    case_insensitive: bool,
}

#[derive(Debug, Clone)]
enum GlobSeg {
    /// `**`: zero or more segments.
    AnyDepth,
    /// One segment, as literal bytes and `*`s.
    One(Vec<Tok>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// Any run of characters inside the segment, possibly empty.
    Star,
    /// One character, raw or percent-encoded in the path.
    Byte(u8),
}

impl Glob {
    /// Compile a glob; `Err` explains why the pattern is invalid.
    ///
    /// A pattern starts with `/`, has no empty segments (one trailing slash
    /// is allowed and ignored), no `.`/`..` segments, `**` only as a whole
    /// segment, and none of `? # [ ] { }`, spaces or control characters
    /// (use `path_regex`, or a percent-escape for a literal character).
    pub fn new(pattern: &str) -> Result<Glob, String> {
        Glob::parse(pattern)
    }

    /// The body of [`Glob::new`]; cargo-mutants never mutates a function
    /// named `new`, and this parser decides which rules can exist.
    fn parse(pattern: &str) -> Result<Glob, String> {
        let err = |why: &str| format!("invalid glob `{pattern}`: {why}");
        let Some(body) = pattern.strip_prefix('/') else {
            return Err(err("must start with '/'"));
        };
        let mut segs = Vec::new();
        if !body.is_empty() {
            let body = body.strip_suffix('/').unwrap_or(body);
            for seg in body.split('/') {
                if seg.is_empty() {
                    return Err(err("empty segment ('//')"));
                }
                if seg == "**" {
                    if !matches!(segs.last(), Some(GlobSeg::AnyDepth)) {
                        segs.push(GlobSeg::AnyDepth);
                    }
                    continue;
                }
                if seg.contains("**") {
                    return Err(err("'**' must be a whole segment"));
                }
                segs.push(GlobSeg::One(compile_segment(seg).map_err(err)?));
            }
        }
        Ok(Glob {
            src: pattern.to_owned(),
            segs,
            case_insensitive: false,
        })
    }

    /// Compile a glob that matches paths in any case, for case-insensitive
    /// upstreams (IIS and other Windows servers): `/admin/**` then also
    /// covers `/ADMIN/x`, `/Admin/x` and `/%41dmin/x`.
    ///
    /// Both sides are folded per character (upper case, then lower case, so
    /// that `ſ`, `K` (Kelvin) and `ı` meet `s`, `k` and `i`), after the
    /// path's percent-escapes are decoded. Folding is wider than any one
    /// server's rule, which errs towards the rule covering more spellings.
    pub fn case_insensitive(pattern: &str) -> Result<Glob, String> {
        let mut glob = Glob::new(pattern)?;
        for seg in &mut glob.segs {
            if let GlobSeg::One(toks) = seg {
                *toks = fold_tokens(toks);
            }
        }
        glob.case_insensitive = true;
        Ok(glob)
    }

    /// Whether this glob ignores case.
    pub fn is_case_insensitive(&self) -> bool {
        self.case_insensitive
    }

    /// Whether the normalised `path` matches, with or without one trailing slash.
    pub fn matches(&self, path: &str) -> bool {
        if self.case_insensitive {
            let folded = fold_path(path);
            self.matches_units(folded.as_bytes(), true)
        } else {
            self.matches_units(path.as_bytes(), false)
        }
    }

    /// Glob matching over `path`; with `decoded`, the path's bytes are the
    /// characters themselves (no percent-escapes left to read).
    fn matches_units(&self, path: &[u8], decoded: bool) -> bool {
        if path.first() != Some(&b'/') {
            return false;
        }
        // Greedy matching with one backtrack point for the last `**`: each
        // non-`**` item consumes exactly one segment, so this is exact and
        // runs in O(pattern * path) instead of exponential time.
        let segs = &self.segs;
        let (mut p, mut pos) = (0usize, 0usize);
        let mut backtrack: Option<(usize, usize)> = None;
        loop {
            let cur = next_segment(path, pos);
            if let Some(item) = segs.get(p) {
                match item {
                    GlobSeg::AnyDepth => {
                        backtrack = Some((p + 1, pos));
                        p += 1;
                        continue;
                    }
                    GlobSeg::One(toks) => {
                        if let Some((start, end)) = cur {
                            if segment_matches(toks, &path[start..end], decoded) {
                                p += 1;
                                pos = end;
                                continue;
                            }
                        }
                    }
                }
            } else if cur.is_none() {
                return true;
            }
            // Mismatch: let the last `**` swallow one more segment.
            let Some((resume_p, resume_pos)) = backtrack else {
                return false;
            };
            let Some((_, end)) = next_segment(path, resume_pos) else {
                return false;
            };
            p = resume_p;
            pos = end;
            backtrack = Some((resume_p, end));
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.src
    }
}

/// Compile one glob segment (no `/`, not `**`) into tokens.
fn compile_segment(seg: &str) -> Result<Vec<Tok>, &'static str> {
    let bytes = seg.as_bytes();
    let mut toks = Vec::with_capacity(bytes.len());
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'*' => {
                if toks.last() != Some(&Tok::Star) {
                    toks.push(Tok::Star);
                }
                decoded.push(b'*');
                i += 1;
            }
            b'%' => {
                let v = escape_at(bytes, i).ok_or("malformed percent-escape")?;
                match v {
                    b'/' | b'\\' => return Err("encoded '/' or '\\' can never match"),
                    0x00..=0x1F | 0x7F => return Err("encoded control character can never match"),
                    _ => {}
                }
                toks.push(Tok::Byte(v));
                decoded.push(v);
                i += 3;
            }
            b'\\' => return Err("backslash can never match"),
            0x00..=0x20 | 0x7F => return Err("space or control character (write %20 for a space)"),
            b'?' | b'#' | b'[' | b']' | b'{' | b'}' => {
                return Err("'? # [ ] { }' are not glob syntax here; use path_regex, or a percent-escape for the literal character")
            }
            _ => {
                toks.push(Tok::Byte(b));
                decoded.push(b);
                i += 1;
            }
        }
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err("not valid UTF-8 once decoded, can never match");
    }
    if decoded == b"." || decoded == b".." {
        return Err("'.' and '..' segments can never match a normalised path");
    }
    Ok(toks)
}

/// Case-fold one character sequence (see [`Glob::case_insensitive`]).
fn fold(s: &str) -> String {
    s.chars()
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .collect()
}

/// A normalised path with every segment percent-decoded and case-folded.
/// Normalisation refuses encoded `/` and guarantees UTF-8, so segments stay
/// segments; a decoded `%` is only ever matched as a plain byte.
fn fold_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    for (i, seg) in bytes.split(|&b| b == b'/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        let mut decoded = Vec::with_capacity(seg.len());
        let mut j = 0;
        while j < seg.len() {
            let (b, len) = unit_at(seg, j);
            decoded.push(b);
            j += len;
        }
        out.push_str(&fold(&String::from_utf8_lossy(&decoded)));
    }
    out
}

/// Fold the literal runs of a compiled segment (between `*`s).
fn fold_tokens(toks: &[Tok]) -> Vec<Tok> {
    let mut out = Vec::with_capacity(toks.len());
    let mut run = Vec::new();
    let flush = |run: &mut Vec<u8>, out: &mut Vec<Tok>| {
        let folded = fold(&String::from_utf8_lossy(run));
        out.extend(folded.bytes().map(Tok::Byte));
        run.clear();
    };
    for t in toks {
        match t {
            Tok::Byte(b) => run.push(*b),
            Tok::Star => {
                flush(&mut run, &mut out);
                out.push(Tok::Star);
            }
        }
    }
    flush(&mut run, &mut out);
    out
}

/// The next non-empty segment of `path` at or after byte `pos`, as a range.
fn next_segment(path: &[u8], pos: usize) -> Option<(usize, usize)> {
    let rest = path.get(pos..)?;
    let skip = rest.iter().position(|&b| b != b'/')?;
    let start = pos + skip;
    let len = path[start..]
        .iter()
        .position(|&b| b == b'/')
        .unwrap_or(path.len() - start);
    Some((start, start + len))
}

/// The character at `seg[i]`: a `%XY` escape counts as the byte it encodes.
/// Returns the byte and how many input bytes it spans.
fn unit_at(seg: &[u8], i: usize) -> (u8, usize) {
    match escape_at(seg, i) {
        Some(v) => (v, 3),
        None => (seg[i], 1),
    }
}

/// Whether one path segment matches one glob segment; with `decoded`, each
/// byte of `seg` is one unit (no percent-escapes).
fn segment_matches(toks: &[Tok], seg: &[u8], decoded: bool) -> bool {
    let unit = |i: usize| {
        if decoded {
            (seg[i], 1)
        } else {
            unit_at(seg, i)
        }
    };
    // Same greedy scheme as across segments, over characters.
    let (mut p, mut s) = (0usize, 0usize);
    let mut backtrack: Option<(usize, usize)> = None;
    loop {
        match toks.get(p) {
            Some(Tok::Star) => {
                backtrack = Some((p + 1, s));
                p += 1;
                continue;
            }
            Some(&Tok::Byte(want)) => {
                if s < seg.len() {
                    let (got, len) = unit(s);
                    if got == want {
                        p += 1;
                        s += len;
                        continue;
                    }
                }
            }
            None => {
                if s == seg.len() {
                    return true;
                }
            }
        }
        let Some((resume_p, resume_s)) = backtrack else {
            return false;
        };
        if resume_s >= seg.len() {
            return false;
        }
        let (_, len) = unit(resume_s);
        p = resume_p;
        s = resume_s + len;
        backtrack = Some((resume_p, s));
    }
}

/// How a rule selects paths.
#[derive(Debug, Clone)]
pub enum PathMatcher {
    /// A glob (`glob:` in the config).
    Glob(Glob),
    /// An anchored regular expression; build it with [`PathMatcher::regex`].
    Regex(regex::Regex),
}

const REGEX_PREFIX: &str = "^(?:";
const REGEX_SUFFIX: &str = ")$";

impl PathMatcher {
    /// Compile a `path_regex` from the config; it must match the whole
    /// normalised path. `Err` explains why the expression is invalid.
    pub fn regex(src: &str) -> Result<PathMatcher, String> {
        PathMatcher::regex_with_case(src, false)
    }

    /// Like [`PathMatcher::regex`]; with `case_insensitive`, letters match
    /// in any case (Unicode case folding, as `(?i)` does). The regex sees
    /// the normalised path, where non-ASCII characters stay percent-encoded.
    pub fn regex_with_case(src: &str, case_insensitive: bool) -> Result<PathMatcher, String> {
        if src.is_empty() {
            return Err("invalid path_regex: empty".to_owned());
        }
        // Compile the expression on its own first: only a well-formed,
        // balanced expression can be wrapped, so input like `a)|(b` cannot
        // escape the anchors.
        regex::Regex::new(src).map_err(|e| format!("invalid path_regex `{src}`: {e}"))?;
        // `(?i)` inside the anchors, so `describe` shows it too.
        let flag = if case_insensitive { "(?i)" } else { "" };
        let anchored = format!("{REGEX_PREFIX}{flag}{src}{REGEX_SUFFIX}");
        regex::Regex::new(&anchored)
            .map(PathMatcher::Regex)
            .map_err(|e| format!("invalid path_regex `{src}` (cannot be anchored): {e}"))
    }

    /// Whether the normalised `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Glob(g) => g.matches(path),
            PathMatcher::Regex(r) => r.is_match(path),
        }
    }

    /// The pattern as written in the config, for `stepgate check`/`explain`.
    pub fn describe(&self) -> String {
        match self {
            PathMatcher::Glob(g) if g.is_case_insensitive() => format!("{} (any case)", g.as_str()),
            PathMatcher::Glob(g) => g.as_str().to_owned(),
            PathMatcher::Regex(r) => {
                let s = r.as_str();
                s.strip_prefix(REGEX_PREFIX)
                    .and_then(|s| s.strip_suffix(REGEX_SUFFIX))
                    .unwrap_or(s)
                    .to_owned()
            }
        }
    }
}

/// What a step-up rule demands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepUp {
    /// How old the last second-factor check may be.
    pub max_age: Duration,
    /// The channels the user may choose from.
    pub factors: Vec<Channel>,
    /// Whether a passed check is consumed by the first request it admits.
    pub one_time: bool,
    /// A second factor the identity provider did also counts (CONTRACT §5.3).
    pub idp: Option<IdpFactor>,
}

/// Which sign-ins at the identity provider count as a second factor: the
/// primary token's `amr` holds one of `amr`, or its `acr` is one of `acr`
/// (and its `auth_time` is within the rule's `max_age`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdpFactor {
    pub amr: Vec<String>,
    pub acr: Vec<String>,
}

/// What a matching rule does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forwarded even without a primary identity.
    Public,
    /// Answered 403, never forwarded.
    Deny,
    /// Needs a primary identity.
    Identity,
    /// Needs a primary identity and a fresh second factor.
    StepUp(StepUp),
}

/// One entry of the route table.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The rule's name from the config.
    pub name: std::sync::Arc<str>,
    /// 1-based line in the config file, for explain/check/logs.
    pub line: usize,
    /// Which normalised paths the rule covers.
    pub path: PathMatcher,
    /// Which methods the rule covers (`GET` implies `HEAD`); `None` = all.
    pub methods: Option<Vec<Method>>,
    /// Which hosts the rule covers; `None` = all, including no host.
    pub hosts: Option<Vec<HostPattern>>,
    /// What happens to a matching request.
    pub action: Action,
}

impl Rule {
    /// `host` is already stripped of its port.
    fn covers(&self, method: &Method, host: Option<&str>, path: &str) -> bool {
        if let Some(methods) = &self.methods {
            let listed = methods
                .iter()
                .any(|m| m == method || (*method == Method::HEAD && *m == Method::GET));
            if !listed {
                return false;
            }
        }
        if let Some(hosts) = &self.hosts {
            let Some(host) = host else {
                return false;
            };
            if !hosts.iter().any(|h| h.matches_bare(host)) {
                return false;
            }
        }
        self.path.matches(path)
    }
}

/// A host a rule applies to: `app.example.com` (exactly that host) or
/// `*.example.com` (any subdomain at any depth, not the apex).
/// Case-insensitive, stored lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// Lowercase, without a trailing dot; starts with `*.` for a wildcard.
    src: String,
}

impl HostPattern {
    /// Parse a host pattern; `Err` explains why it is invalid.
    pub fn new(s: &str) -> Result<HostPattern, String> {
        HostPattern::parse(s)
    }

    /// The body of [`HostPattern::new`], named so that cargo-mutants
    /// mutates it (it skips every function named `new`).
    fn parse(s: &str) -> Result<HostPattern, String> {
        let err = |why: &str| format!("invalid host `{s}`: {why}");
        let lower = s.to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() {
            return Err(err("empty host name (omit `hosts` to match every host)"));
        }
        if let Some(inner) = name.strip_prefix('[') {
            let Some(addr) = inner.strip_suffix(']') else {
                return Err(err("unclosed '['"));
            };
            if wildcard {
                return Err(err("a wildcard cannot precede an IP address"));
            }
            if addr.is_empty()
                || !addr
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            {
                return Err(err("not an IPv6 address"));
            }
        } else {
            if name.contains(':') {
                return Err(err("no port allowed (hosts match whatever port was used)"));
            }
            if name.contains('*') {
                return Err(err("'*' is only allowed as a leading `*.`"));
            }
            if name.len() > 253 {
                return Err(err("longer than 253 characters"));
            }
            for label in name.split('.') {
                if label.is_empty() || label.len() > 63 {
                    return Err(err("empty or over-long label"));
                }
                if !label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(err("only letters, digits, '-' and '_' are allowed"));
                }
            }
        }
        let src = if wildcard {
            format!("*.{name}")
        } else {
            name.to_owned()
        };
        Ok(HostPattern { src })
    }

    /// Whether a request host (any case, possibly with a port) matches.
    pub fn matches(&self, host: &str) -> bool {
        self.matches_bare(bare_host(host))
    }

    /// Like `matches`, for a host already stripped by [`bare_host`].
    fn matches_bare(&self, host: &str) -> bool {
        match self.src.strip_prefix('*') {
            // `suffix` is `.example.com`; at least one character must precede it.
            Some(suffix) => {
                host.len() > suffix.len()
                    && host.as_bytes()[host.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }
            None => host.eq_ignore_ascii_case(&self.src),
        }
    }

    /// The pattern, lowercase.
    pub fn as_str(&self) -> &str {
        &self.src
    }
}

/// The host part of a request host: no userinfo (a URI authority may carry
/// `user@`), no port (also for `[::1]:8080`), no trailing dot. Case is left
/// alone; comparisons ignore it.
fn bare_host(host: &str) -> &str {
    // Byte searches (`memchr`): this runs on every request, and `str`'s
    // char searchers cost several times more on a short host.
    let host = memchr::memrchr(b'@', host.as_bytes()).map_or(host, |i| &host[i + 1..]);
    let h = if host.starts_with('[') {
        match memchr::memchr(b']', host.as_bytes()) {
            Some(i) => &host[..=i],
            None => host,
        }
    } else {
        match memchr::memchr(b':', host.as_bytes()) {
            Some(i) => &host[..i],
            None => host,
        }
    };
    h.strip_suffix('.').unwrap_or(h)
}

/// What happens to a request no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultPolicy {
    /// Forward it as is.
    Pass,
    /// Require a primary identity.
    Identity,
}

/// The route table: rules in file order plus the default.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The rules, in file order (read them with [`Policy::rules`]; they
    /// cannot change after [`Policy::new`], which indexes them).
    rules: Vec<Rule>,
    /// Which rules can match a path, by its first segment.
    index: RouteIndex,
    /// What applies when no rule matches.
    pub default: DefaultPolicy,
}

impl Policy {
    /// The route table for `rules`, tried in this order.
    pub fn new(rules: Vec<Rule>, default: DefaultPolicy) -> Policy {
        let index = RouteIndex::new(&rules);
        Policy {
            rules,
            index,
            default,
        }
    }

    /// The rules, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The first rule (file order) that covers `method`, `host` and the
    /// normalised `path`; `None` means the default applies.
    ///
    /// `host` is the request host as sent (any case, possibly with a port);
    /// `None` when the request has none, which no rule with `hosts` matches.
    ///
    /// Only the rules that can match the path's first segment are tried
    /// (see [`RouteIndex`]), in file order, so the answer is the one a scan
    /// of every rule would give.
    pub fn route(&self, method: &Method, host: Option<&str>, path: &str) -> Option<&Rule> {
        let host = host.map(bare_host);
        let covers = |i: usize| self.rules[i].covers(method, host, path);
        let Some(keyed) = self.index.keyed(path) else {
            return self.rules.iter().find(|r| r.covers(method, host, path));
        };
        // Merge the two ascending lists of rule numbers: file order.
        let unkeyed = &self.index.unkeyed;
        let (mut a, mut b) = (0, 0);
        loop {
            let next = match (keyed.get(a), unkeyed.get(b)) {
                (Some(&x), Some(&y)) if x < y => {
                    a += 1;
                    x
                }
                (_, Some(&y)) => {
                    b += 1;
                    y
                }
                (Some(&x), None) => {
                    a += 1;
                    x
                }
                (None, None) => return None,
            };
            if covers(next) {
                return Some(&self.rules[next]);
            }
        }
    }

    /// The first rule that covers the request, trying every rule in order:
    /// what [`Policy::route`] must always answer (the tests compare them).
    #[cfg(test)]
    fn route_linear(&self, method: &Method, host: Option<&str>, path: &str) -> Option<&Rule> {
        let host = host.map(bare_host);
        self.rules.iter().find(|r| r.covers(method, host, path))
    }
}

/// The rules that can match a path, by the path's first segment, so that
/// a request is checked against a handful of rules instead of all of them.
///
/// A rule is *keyed* by a first segment `K` when every path it matches has
/// exactly `K` as its first segment: a case-sensitive glob whose first
/// segment is made only of unreserved characters (letters, digits, `-`,
/// `.`, `_`, `~`), or a case-sensitive `path_regex` that starts with the
/// literal `/K/` (no `|` anywhere, `/` not followed by a quantifier).
/// Every other rule is *unkeyed* and tried for every path. A path whose
/// first segment holds a `%` is matched against every rule (a glob literal
/// also matches its percent-encoded form; normalised paths never encode
/// unreserved characters, so this happens only for other input).
#[derive(Debug, Clone, Default)]
struct RouteIndex {
    /// Keyed rules, ascending, by first segment.
    by_first: std::collections::HashMap<Box<[u8]>, Vec<usize>>,
    /// Unkeyed rules, ascending.
    unkeyed: Vec<usize>,
}

impl RouteIndex {
    fn new(rules: &[Rule]) -> RouteIndex {
        let mut index = RouteIndex::default();
        for (i, rule) in rules.iter().enumerate() {
            match first_segment_key(&rule.path) {
                Some(key) => index.by_first.entry(key.into()).or_default().push(i),
                None => index.unkeyed.push(i),
            }
        }
        index
    }

    /// The keyed rules that can match `path`, or `None` when every rule
    /// has to be tried.
    fn keyed(&self, path: &str) -> Option<&[usize]> {
        let bytes = path.as_bytes();
        if bytes.first() != Some(&b'/') {
            // No keyed rule matches a path that does not start with '/'.
            return Some(&[]);
        }
        let Some((start, end)) = next_segment(bytes, 0) else {
            return Some(&[]);
        };
        let seg = &bytes[start..end];
        if seg.contains(&b'%') {
            return None;
        }
        Some(self.by_first.get(seg).map_or(&[], Vec::as_slice))
    }
}

/// The first segment every path `m` matches must have, if there is one
/// (see [`RouteIndex`]).
fn first_segment_key(m: &PathMatcher) -> Option<Vec<u8>> {
    match m {
        PathMatcher::Glob(g) if !g.case_insensitive => match g.segs.first()? {
            GlobSeg::One(toks) => toks
                .iter()
                .map(|t| match t {
                    Tok::Byte(b) if is_unreserved(*b) => Some(*b),
                    _ => None,
                })
                .collect(),
            GlobSeg::AnyDepth => None,
        },
        PathMatcher::Glob(_) => None,
        PathMatcher::Regex(_) => regex_first_segment(&m.describe()),
    }
}

/// `K` when the expression `src` (as written, without the anchors the
/// gateway adds) can only match paths that start with the literal `/K/`.
/// Conservative: a leading group or flag (`(?i)`), any `|`, an escape or
/// any other metacharacter in `K`, or a quantifier after the second `/`
/// gives `None`.
fn regex_first_segment(src: &str) -> Option<Vec<u8>> {
    let b = src.as_bytes();
    if b.first() != Some(&b'/') || b.contains(&b'|') {
        return None;
    }
    let n = b[1..]
        .iter()
        .take_while(|&&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'~'))
        .count();
    let slash = 1 + n;
    if n == 0 || b.get(slash) != Some(&b'/') {
        return None;
    }
    if matches!(b.get(slash + 1), Some(b'*' | b'?' | b'{' | b'+')) {
        return None;
    }
    Some(b[1..slash].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathError::*;

    #[test]
    fn normalisation_table() {
        // (input, expected); every row names the attack or mistake it pins down.
        let cases: &[(&str, Result<&str, PathError>)] = &[
            // plain paths pass unchanged
            ("/", Ok("/")),
            ("/a/b", Ok("/a/b")),
            // the trailing slash is kept, not stripped or added
            ("/a/b/", Ok("/a/b/")),
            // case is preserved: matching is case-sensitive, so is the path
            ("/ADMIN", Ok("/ADMIN")),
            // Tomcat `..;` traversal past a prefix rule
            ("/admin/..;/", Err(PathParameter)),
            // Tomcat `..;` at the start
            ("/..;/admin", Err(PathParameter)),
            // Spring/Jetty strip `;x=1`, so `/admin;x=1` is `/admin` there
            ("/admin;x=1/panel", Err(PathParameter)),
            // any raw `;`
            ("/a;b", Err(PathParameter)),
            // an encoded `;` is harmless and stays encoded, uppercase hex
            ("/a/%3b", Ok("/a/%3B")),
            // encoded dots are dot segments: must be resolved, not passed on
            ("/%2e%2e/admin", Err(AboveRoot)),
            // encoded `..` resolved before matching
            ("/x/%2e%2e/admin", Ok("/admin")),
            // mixed raw and encoded dot
            ("/a/.%2E/b", Ok("/b")),
            // `./` prefix must not dodge `/admin/**`
            ("/./admin", Ok("/admin")),
            // doubled slash must not dodge `/admin/**`
            ("//admin", Ok("/admin")),
            // only slashes
            ("///", Ok("/")),
            // encoded slash: `/admin%2f..` is `/` to some backends, `/admin/..` to others
            ("/admin%2f..", Err(EncodedSeparator)),
            // uppercase encoded slash
            ("/admin%2F", Err(EncodedSeparator)),
            // encoded backslash (IIS and friends treat it as a separator)
            ("/admin%5c..", Err(EncodedSeparator)),
            // encoded unreserved letter must not dodge a literal rule
            ("/%61dmin", Ok("/admin")),
            // encoded single dot
            ("/admin/%2e/", Ok("/admin/")),
            // backslash traversal (Windows backends)
            ("/admin\\..\\x", Err(Backslash)),
            // encoded NUL truncates strings in C backends
            ("/a/%00", Err(Nul)),
            // encoded newline: header/log injection
            ("/a/%0a", Err(ControlChar)),
            // encoded DEL
            ("/a/%7f", Err(ControlChar)),
            // `..` above the root is ambiguous (clamped or refused?)
            ("/..", Err(AboveRoot)),
            // climbing above the root after a pop
            ("/a/../..", Err(AboveRoot)),
            // deeper climb
            ("/a/b/../../../c", Err(AboveRoot)),
            // overlong UTF-8 dots (IIS-style `%c0%ae` traversal)
            ("/%c0%ae%c0%ae/", Err(InvalidUtf8)),
            // overlong UTF-8 slash
            ("/%C0%AF", Err(InvalidUtf8)),
            // lone invalid byte
            ("/%FF", Err(InvalidUtf8)),
            // truncated multi-byte sequence
            ("/%e2%82", Err(InvalidUtf8)),
            // UTF-16 surrogate encoded as UTF-8
            ("/%ed%a0%80", Err(InvalidUtf8)),
            // a multi-byte sequence split by a slash is not UTF-8
            ("/%c3/%a9", Err(InvalidUtf8)),
            // valid UTF-8 stays encoded, uppercase hex
            ("/caf%c3%a9", Ok("/caf%C3%A9")),
            // encoded space stays encoded
            ("/a%20b", Ok("/a%20b")),
            // encoded tilde (unreserved) is decoded
            ("/a%7e", Ok("/a~")),
            // every unreserved class decodes
            ("/%41%5a%30%2d%5f", Ok("/AZ0-_")),
            // reserved characters stay encoded (`%2B` is not `+` everywhere)
            ("/a%3a%40%2b", Ok("/a%3A%40%2B")),
            // double encoding is not decoded twice
            ("/%252e%252e/", Ok("/%252e%252e/")),
            // a literal percent stays encoded
            ("/%25", Ok("/%25")),
            // everything at once
            ("/a/./b/../c//d/", Ok("/a/c/d/")),
            // slashes are merged before `..` is resolved
            ("/a//../b", Ok("/b")),
            // a trailing `.` keeps the directory slash
            ("/a/b/.", Ok("/a/b/")),
            // a trailing `..` keeps the directory slash
            ("/a/b/..", Ok("/a/")),
            // popping to the root
            ("/a/..", Ok("/")),
            // a lone dot
            ("/.", Ok("/")),
            // three dots are a name, not a dot segment
            ("/a/...", Ok("/a/...")),
            // dots inside a name are not segments
            ("/a/..b/c.", Ok("/a/..b/c.")),
            // raw tab
            ("/a\tb", Err(ControlChar)),
            // raw DEL
            ("/a\x7fb", Err(ControlChar)),
            // raw NUL
            ("/a\0b", Err(ControlChar)),
            // raw CR/LF: request splitting upstream
            ("/a\r\nb", Err(ControlChar)),
            // raw space would split the upstream request line
            ("/a b", Err(InvalidChar)),
            // a raw `?` would start a query upstream
            ("/admin?x", Err(InvalidChar)),
            // a raw `#` would start a fragment upstream
            ("/admin#x", Err(InvalidChar)),
            // raw non-ASCII
            ("/caf\u{e9}", Err(NonAscii)),
            // bad hex
            ("/zz%zz", Err(InvalidEscape)),
            // truncated escape
            ("/a%4", Err(InvalidEscape)),
            // bare percent at the end
            ("/a%", Err(InvalidEscape)),
            // `%%41` is not an escape of `%A`
            ("/a%%41", Err(InvalidEscape)),
            // IIS `%u` escapes are not escapes
            ("/%u002e%u002e/", Err(InvalidEscape)),
            // relative path
            ("admin", Err(NotAbsolute)),
            // empty path
            ("", Err(NotAbsolute)),
            // asterisk form (OPTIONS *)
            ("*", Err(NotAbsolute)),
            // absolute-form URI passed by mistake
            ("http://x/admin", Err(NotAbsolute)),
        ];
        assert!(cases.len() >= 40);
        for (input, expected) in cases {
            let got = normalize_path(input);
            let want = expected.map(str::to_owned);
            assert_eq!(got, want, "normalize_path({input:?})");
        }
    }

    #[test]
    fn normal_form_is_a_fixed_point() {
        // protects against the fast path and the slow path disagreeing, and
        // against double normalisation changing a path
        let inputs = [
            "/",
            "/a/b/",
            "/%61/%2e/x//y/../z/",
            "/caf%c3%a9/%3b",
            "/%252e",
            "/a:b@c!$&'()*+,=~",
        ];
        for input in inputs {
            let once = normalize_path(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(
                normalize_path(&once).as_deref(),
                Ok(once.as_str()),
                "{input:?}"
            );
            assert_eq!(
                normalize_slow(once.as_bytes()).as_deref(),
                Ok(once.as_str())
            );
            assert!(is_already_normal(once.as_bytes()) || once.contains('%'));
        }
    }

    #[test]
    fn fast_path_rejects_what_the_slow_path_rewrites() {
        // protects against the fast path waving through an unnormalised path
        for p in [
            "//a", "/a//b", "/./a", "/a/.", "/a/..", "/a;b", "/a%41", "/a\\b", "/a b",
        ] {
            assert!(!is_already_normal(p.as_bytes()), "{p:?}");
        }
        for p in ["/", "/a", "/a/", "/a/b.c/...", "/-_~:@!$&'()*+,="] {
            assert!(is_already_normal(p.as_bytes()), "{p:?}");
        }
    }

    #[test]
    fn path_errors_have_messages() {
        // protects against empty 400 bodies
        assert_eq!(AboveRoot.to_string(), "path climbs above the root");
        assert!(!EncodedSeparator.to_string().is_empty());
    }

    fn glob(p: &str) -> Glob {
        Glob::new(p).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn glob_single_star_is_one_segment() {
        // protects against `*` spilling into neighbouring segments
        let g = glob("/a/*");
        assert!(g.matches("/a/x"));
        assert!(g.matches("/a/x/"));
        assert!(!g.matches("/a"));
        assert!(!g.matches("/a/"));
        assert!(!g.matches("/a/x/y"));
    }

    #[test]
    fn glob_double_star_at_end_covers_the_prefix_itself() {
        // protects against `/admin` or `/admin/` slipping past `/admin/**`
        let g = glob("/admin/**");
        assert!(g.matches("/admin"));
        assert!(g.matches("/admin/"));
        assert!(g.matches("/admin/x/y"));
        assert!(!g.matches("/administrator"));
        assert!(!g.matches("/admin-x"));
        assert!(!g.matches("/"));
    }

    #[test]
    fn glob_is_case_sensitive() {
        // protects against a case-folding match that the backend would not do
        let g = glob("/admin/**");
        let p = normalize_path("/ADMIN").unwrap_or_default();
        assert!(!g.matches(&p));
    }

    #[test]
    fn glob_double_star_in_the_middle() {
        // protects against `**` requiring at least one segment
        let g = glob("/a/**/z");
        assert!(g.matches("/a/z"));
        assert!(g.matches("/a/b/c/z"));
        assert!(g.matches("/a/b/c/z/"));
        assert!(!g.matches("/a/b/c/zz"));
        assert!(!g.matches("/a/b/z/c"));
    }

    #[test]
    fn glob_double_star_at_start() {
        // protects against a leading `**` only matching one level
        let g = glob("/**/secret");
        assert!(g.matches("/secret"));
        assert!(g.matches("/x/y/secret"));
        assert!(g.matches("/x/secret/"));
        assert!(!g.matches("/x/secret/y"));
        assert!(!g.matches("/x/notsecret"));
    }

    #[test]
    fn glob_root_and_catch_all() {
        // protects against `/` acting as a catch-all, and `/**` missing the root
        assert!(glob("/").matches("/"));
        assert!(!glob("/").matches("/a"));
        assert!(glob("/**").matches("/"));
        assert!(glob("/**").matches("/a/b/c/"));
    }

    #[test]
    fn glob_star_inside_a_segment() {
        // protects against `*.css` matching across directories or suffixes
        let g = glob("/static/*.css");
        assert!(g.matches("/static/site.css"));
        assert!(!g.matches("/static/site.css.map"));
        assert!(!g.matches("/static/x/site.css"));
        assert!(!g.matches("/static/site.js"));
        assert!(glob("/v*/keys").matches("/v2/keys"));
        assert!(glob("/a*b*c").matches("/aXXbYYc"));
        assert!(!glob("/a*b*c").matches("/aXXbYY"));
    }

    #[test]
    fn glob_ignores_one_trailing_slash() {
        // protects against `/billing/export/` bypassing a `/billing/export` rule
        let g = glob("/billing/export");
        assert!(g.matches("/billing/export"));
        assert!(g.matches("/billing/export/"));
        assert!(!g.matches("/billing/export/x"));
        assert!(!g.matches("/billing/exports"));
        let g = glob("/billing/export/");
        assert!(g.matches("/billing/export"));
        assert!(g.matches("/billing/export/"));
    }

    #[test]
    fn glob_literal_matches_encoded_reserved_characters() {
        // protects against `%40` bypassing a rule the backend reads as `@`
        assert!(glob("/users/@me").matches("/users/%40me"));
        assert!(glob("/users/@me").matches("/users/@me"));
        assert!(glob("/caf\u{e9}").matches("/caf%C3%A9"));
        assert!(glob("/a%40b").matches("/a@b"));
        // a literal `*` via escape
        assert!(glob("/%2A").matches("/*"));
        assert!(!glob("/%2A").matches("/x"));
    }

    #[test]
    fn glob_star_never_splits_an_escape() {
        // protects against `*B` matching `%3B` by eating `%3`
        assert!(!glob("/x/*B").matches("/x/%3B"));
        assert!(glob("/x/*;").matches("/x/a%3B"));
    }

    #[test]
    fn glob_has_no_exponential_backtracking() {
        // protects against a ReDoS-style stall on hostile paths
        let long_seg = "a".repeat(5000);
        assert!(!glob("/*a*a*a*a*a*a*a*b").matches(&format!("/{long_seg}")));
        let deep = "/a".repeat(2000);
        assert!(!glob("/**/a/**/a/**/a/**/b").matches(&deep));
        assert!(glob("/**/a/**/a/**/a/**/a").matches(&deep));
    }

    #[test]
    fn glob_rejects_invalid_patterns() {
        // protects against patterns that silently never match (fail open)
        for p in [
            "",
            "admin",
            "/a//b",
            "//",
            "/a//",
            "/a**",
            "/**b/x",
            "/***",
            "/a/../b",
            "/a/./b",
            "/a/%2e%2e",
            "/a%2fb",
            "/a%5cb",
            "/%00",
            "/%zz",
            "/%ff",
            "/a?",
            "/a[0]",
            "/{a,b}",
            "/a b",
            "/a\\b",
            "/a#b",
            "/a\tb",
        ] {
            assert!(Glob::new(p).is_err(), "{p:?} should be rejected");
        }
        for p in ["/", "/a/", "/**", "/a/**/", "/%2A", "/**/**/x", "/:id/@me"] {
            assert!(Glob::new(p).is_ok(), "{p:?} should be accepted");
        }
        assert_eq!(glob("/a/**/").as_str(), "/a/**/");
    }

    fn re(src: &str) -> PathMatcher {
        PathMatcher::regex(src).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn regex_is_anchored_at_both_ends() {
        // protects against a prefix or suffix sneaking past an anchored rule
        let m = re("^/api/v[0-9]+/keys$");
        assert!(m.matches("/api/v12/keys"));
        assert!(!m.matches("/x/api/v1/keys"));
        assert!(!m.matches("/api/v1/keys/extra"));
    }

    #[test]
    fn regex_without_anchors_is_anchored_anyway() {
        // protects against `/api/v1` matching `/x/api/v1/y` by substring
        let m = re("/api/v1");
        assert!(m.matches("/api/v1"));
        assert!(!m.matches("/api/v1/x"));
        assert!(!m.matches("/x/api/v1"));
    }

    #[test]
    fn regex_alternation_stays_inside_the_anchors() {
        // protects against `^a|b$` precedence leaving one branch unanchored
        let m = re("/a|/b");
        assert!(m.matches("/a"));
        assert!(m.matches("/b"));
        assert!(!m.matches("/a/x"));
        assert!(!m.matches("/x/b"));
    }

    #[test]
    fn regex_cannot_break_out_of_the_group() {
        // protects against `)|(` injection defeating the anchors
        assert!(PathMatcher::regex("/a)|(.*").is_err());
        assert!(PathMatcher::regex("(?x)/a#").is_err());
        assert!(PathMatcher::regex("").is_err());
        assert!(PathMatcher::regex("/a(").is_err());
    }

    #[test]
    fn regex_is_case_sensitive() {
        // protects against `/ADMIN` matching a lowercase rule the backend would not
        assert!(!re("/admin/.*").matches("/ADMIN/x"));
    }

    #[test]
    fn case_insensitive_glob_covers_every_case_spelling() {
        // protects against `/ADMIN/x` reaching a case-insensitive (IIS)
        // backend past an `/admin/**` rule meant for it
        let g = Glob::case_insensitive("/admin/**").unwrap_or_else(|e| panic!("{e}"));
        for path in ["/admin", "/ADMIN/x", "/Admin/Users/", "/aDmIn/a/b"] {
            let p = normalize_path(path).unwrap_or_default();
            assert!(g.matches(&p), "{path}");
        }
        assert!(!g.matches("/administrator"));
        assert!(!g.matches("/ADMINISTRATOR/x"));
        // Non-ASCII letters fold too, after decoding: `É` meets `é`, and
        // `ſ` (long s) and `K` (Kelvin sign) meet `s` and `k`.
        let g = Glob::case_insensitive("/café/*").unwrap_or_else(|e| panic!("{e}"));
        assert!(g.matches(&normalize_path("/CAF%C3%89/x").unwrap_or_default()));
        let g = Glob::case_insensitive("/secret-key/**").unwrap_or_else(|e| panic!("{e}"));
        assert!(g.matches(&normalize_path("/%C5%BFECRET-%E2%84%AAEY").unwrap_or_default()));
        // Stars and literals keep their meaning; a decoded `%` is a plain byte.
        let g = Glob::case_insensitive("/a*c/%25XY").unwrap_or_else(|e| panic!("{e}"));
        assert!(g.matches("/ABBC/%25xy"));
        assert!(!g.matches("/ABBD/%25xy"));
        // The default stays case-sensitive.
        assert!(!glob("/admin/**").matches("/ADMIN/x"));
    }

    #[test]
    // `Glob::matches` takes a normalised path, which starts with `/`; a
    // relative one matches no glob, case-insensitive or not (folding must
    // not make `admin/x` absolute).
    fn relative_paths_match_no_glob() {
        let ci = Glob::case_insensitive("/admin/**").unwrap_or_else(|e| panic!("{e}"));
        for g in [glob("/admin/**"), ci] {
            assert!(g.matches("/admin/x"));
            for path in ["admin/x", "admin", "ADMIN/x", ""] {
                assert!(!g.matches(path), "{} matched {path:?}", g.as_str());
            }
        }
    }

    #[test]
    fn case_insensitive_regex_and_inline_flag() {
        // protects against `(?i)` being refused (regex built without
        // Unicode case folding) and against the rule option being ignored
        assert!(re("(?i)/admin/.*").matches("/ADMIN/x"));
        let m = PathMatcher::regex_with_case("/admin/.*", true).unwrap_or_else(|e| panic!("{e}"));
        assert!(m.matches("/AdMiN/x"));
        assert!(!m.matches("/x/admin/y"));
        assert_eq!(m.describe(), "(?i)/admin/.*");
        let g = Glob::case_insensitive("/a/**").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(PathMatcher::Glob(g).describe(), "/a/** (any case)");
    }

    #[test]
    fn describe_shows_the_pattern_as_written() {
        // protects against `explain` showing the internal anchored form
        assert_eq!(re("/api/v[0-9]+").describe(), "/api/v[0-9]+");
        assert_eq!(PathMatcher::Glob(glob("/a/**")).describe(), "/a/**");
    }

    fn rule(
        name: &str,
        path: &str,
        methods: Option<&[Method]>,
        hosts: Option<&[&str]>,
        action: Action,
    ) -> Rule {
        Rule {
            name: name.into(),
            line: 1,
            path: PathMatcher::Glob(glob(path)),
            methods: methods.map(<[Method]>::to_vec),
            hosts: hosts.map(|hs| {
                hs.iter()
                    .map(|h| HostPattern::new(h).unwrap_or_else(|e| panic!("{e}")))
                    .collect()
            }),
            action,
        }
    }

    fn policy(rules: Vec<Rule>) -> Policy {
        Policy::new(rules, DefaultPolicy::Identity)
    }

    fn routed<'a>(p: &'a Policy, m: &Method, host: Option<&str>, path: &str) -> Option<&'a str> {
        p.route(m, host, path).map(|r| &*r.name)
    }

    #[test]
    fn get_rule_covers_head() {
        // protects against HEAD skipping a GET-only step-up (HEAD runs the GET handler)
        let p = policy(vec![rule(
            "r",
            "/x",
            Some(&[Method::GET]),
            None,
            Action::Deny,
        )]);
        assert_eq!(routed(&p, &Method::HEAD, None, "/x"), Some("r"));
        assert_eq!(routed(&p, &Method::GET, None, "/x"), Some("r"));
        assert_eq!(routed(&p, &Method::POST, None, "/x"), None);
    }

    #[test]
    fn head_rule_does_not_cover_get() {
        // protects against the HEAD→GET implication working backwards
        let p = policy(vec![rule(
            "r",
            "/x",
            Some(&[Method::HEAD]),
            None,
            Action::Public,
        )]);
        assert_eq!(routed(&p, &Method::GET, None, "/x"), None);
    }

    #[test]
    fn methods_are_case_sensitive() {
        // protects against `get` (an extension method) being treated as GET
        let p = policy(vec![rule(
            "r",
            "/x",
            Some(&[Method::GET]),
            None,
            Action::Public,
        )]);
        let lower = Method::from_bytes(b"get").unwrap_or(Method::OPTIONS);
        assert_ne!(lower, Method::GET);
        assert_eq!(routed(&p, &lower, None, "/x"), None);
    }

    #[test]
    fn no_methods_means_every_method() {
        // protects against extension methods (PROPFIND, ...) slipping past a rule
        let p = policy(vec![rule("r", "/x", None, None, Action::Deny)]);
        let propfind = Method::from_bytes(b"PROPFIND").unwrap_or(Method::OPTIONS);
        assert_eq!(routed(&p, &propfind, None, "/x"), Some("r"));
        assert_eq!(routed(&p, &Method::DELETE, None, "/x"), Some("r"));
    }

    #[test]
    fn exact_host_ignores_port_case_and_trailing_dot() {
        // protects against `ADMIN.example.com:443` or `admin.example.com.` dodging a host rule
        let p = policy(vec![rule(
            "r",
            "/**",
            None,
            Some(&["Admin.Example.com"]),
            Action::Deny,
        )]);
        for h in [
            "admin.example.com",
            "ADMIN.example.COM:8443",
            "admin.example.com.",
            "admin.example.com.:80",
        ] {
            assert_eq!(routed(&p, &Method::GET, Some(h), "/"), Some("r"), "{h}");
        }
        // userinfo in a URI authority is not part of the host
        assert_eq!(
            routed(&p, &Method::GET, Some("x@admin.example.com:443"), "/"),
            Some("r")
        );
        for h in [
            "admin.example.com.evil.com",
            "xadmin.example.com",
            "example.com",
            "",
        ] {
            assert_eq!(routed(&p, &Method::GET, Some(h), "/"), None, "{h}");
        }
    }

    #[test]
    fn ipv6_host_with_port() {
        // protects against the port-stripping cutting an IPv6 literal at its first ':'
        let p = policy(vec![rule("r", "/**", None, Some(&["[::1]"]), Action::Deny)]);
        assert_eq!(routed(&p, &Method::GET, Some("[::1]:8080"), "/"), Some("r"));
        assert_eq!(routed(&p, &Method::GET, Some("[::1]"), "/"), Some("r"));
        assert_eq!(routed(&p, &Method::GET, Some("[::2]:8080"), "/"), None);
        assert!(HostPattern::new("[::1]").is_ok_and(|h| h.matches("[::1]:443")));
    }

    #[test]
    fn wildcard_host_covers_subdomains_not_apex() {
        // protects against `*.example.com` matching `evilexample.com` or the apex
        let h = HostPattern::new("*.Example.com").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.as_str(), "*.example.com");
        assert!(h.matches("a.example.com"));
        assert!(h.matches("A.B.EXAMPLE.COM:443"));
        assert!(!h.matches("example.com"));
        assert!(!h.matches(".example.com"));
        assert!(!h.matches("evilexample.com"));
        assert!(!h.matches("a.example.com.evil.net"));
    }

    #[test]
    fn host_rule_never_matches_without_a_host() {
        // protects against HTTP/1.0 requests without Host matching host-scoped Public rules
        let p = policy(vec![
            rule(
                "public-on-www",
                "/**",
                None,
                Some(&["www.example.com"]),
                Action::Public,
            ),
            rule("any-host", "/**", None, None, Action::Identity),
        ]);
        assert_eq!(routed(&p, &Method::GET, None, "/x"), Some("any-host"));
    }

    #[test]
    fn invalid_host_patterns_are_rejected() {
        // protects against host patterns that silently never (or always) match
        for h in [
            "",
            "*",
            "*.",
            "a.*.com",
            "*example.com",
            "example.com:80",
            "exa mple.com",
            "[::1",
            "*.[::1]",
            "a..b",
        ] {
            assert!(HostPattern::new(h).is_err(), "{h:?} should be rejected");
        }
        assert!(HostPattern::new("example.com.").is_ok_and(|h| h.as_str() == "example.com"));
        assert!(HostPattern::new("10.0.0.1").is_ok());
    }

    #[test]
    fn host_pattern_syntax_edges() {
        // protects against the host parser drifting at its edges: the DNS
        // limits (253-character name, 63-character label) moving by one,
        // `-` or `_` refused in a name, or a bracketed "IPv6 address" of
        // any text (or none) accepted
        let ok = |h: &str| HostPattern::new(h).is_ok();
        let l63 = "a".repeat(63);
        assert!(ok(&format!("{l63}.example")));
        assert!(!ok(&format!("{l63}b.example")));
        let n253 = format!("{l63}.{l63}.{l63}.{}", "b".repeat(61));
        assert_eq!(n253.len(), 253);
        assert!(ok(&n253));
        assert!(ok(&format!("*.{n253}")));
        assert!(!ok(&format!("{n253}b")));
        assert!(!ok(&format!("*.{n253}b")));
        for h in ["my-app.example.com", "my_app.example.com", "a-b_c.example"] {
            assert!(ok(h), "{h:?} should be accepted");
        }
        assert!(HostPattern::new("*.My-App.example").is_ok_and(|h| h.matches("x.my-app.EXAMPLE")));
        for h in ["[::1]", "[::ffff:10.0.0.1]", "[2001:DB8::1]"] {
            assert!(ok(h), "{h:?} should be accepted");
        }
        for h in ["[]", "[zz::1]", "[::1%25eth0]", "[::1/64]", "[fe80::1 ]"] {
            assert!(!ok(h), "{h:?} should be rejected");
        }
    }

    #[test]
    fn first_match_in_file_order_wins() {
        // protects against a broad later rule overriding a specific earlier one (or vice versa)
        let step = Action::StepUp(StepUp {
            max_age: Duration::from_secs(300),
            factors: vec![Channel::Email, Channel::Sms],
            one_time: true,
            idp: None,
        });
        let p = policy(vec![
            rule(
                "export",
                "/billing/export",
                Some(&[Method::GET]),
                None,
                step.clone(),
            ),
            rule("billing", "/billing/**", None, None, Action::Identity),
            rule("deny-all", "/**", None, None, Action::Deny),
        ]);
        assert_eq!(
            routed(&p, &Method::GET, None, "/billing/export/"),
            Some("export")
        );
        assert_eq!(
            p.route(&Method::GET, None, "/billing/export")
                .map(|r| &r.action),
            Some(&step)
        );
        assert_eq!(
            routed(&p, &Method::POST, None, "/billing/export"),
            Some("billing")
        );
        assert_eq!(routed(&p, &Method::GET, None, "/other"), Some("deny-all"));
    }

    #[test]
    fn unmatched_request_falls_to_the_default() {
        // protects against an unmatched path picking up an unrelated rule
        let p = policy(vec![rule("admin", "/admin/**", None, None, Action::Deny)]);
        assert!(p
            .route(&Method::GET, Some("example.com"), "/public")
            .is_none());
        assert_eq!(p.default, DefaultPolicy::Identity);
    }

    #[test]
    fn normalised_bypass_attempts_hit_the_rule() {
        // protects against the classic encodings slipping past `/admin/**` end to end
        let p = policy(vec![rule("admin", "/admin/**", None, None, Action::Deny)]);
        for raw in [
            "/%61dmin/x",
            "//admin",
            "/./admin/",
            "/x/../admin",
            "/%2e/admin",
            "/admin/x/%2e%2e",
        ] {
            let path = normalize_path(raw).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
            assert_eq!(
                routed(&p, &Method::GET, None, &path),
                Some("admin"),
                "{raw:?} -> {path:?}"
            );
        }
        // leaving the prefix really leaves it
        let path = normalize_path("/admin/%2e%2e/public").unwrap_or_default();
        assert_eq!(path, "/public");
        assert_eq!(routed(&p, &Method::GET, None, &path), None);
    }

    #[test]
    fn regex_rule_routes() {
        // protects against regex rules bypassing method/host filters
        let p = policy(vec![Rule {
            name: "keys".into(),
            line: 7,
            path: re("/api/v[0-9]+/keys"),
            methods: Some(vec![Method::DELETE]),
            hosts: None,
            action: Action::Deny,
        }]);
        assert_eq!(
            routed(&p, &Method::DELETE, None, "/api/v3/keys"),
            Some("keys")
        );
        assert_eq!(routed(&p, &Method::GET, None, "/api/v3/keys"), None);
        assert_eq!(routed(&p, &Method::DELETE, None, "/api/v3/keys/x"), None);
    }

    #[test]
    fn regex_first_segment_is_only_taken_when_certain() {
        let key = |src: &str| regex_first_segment(src).map(|k| String::from_utf8(k).unwrap());
        assert_eq!(key("/api/v[0-9]+/thing(/.*)?").as_deref(), Some("api"));
        assert_eq!(key("/a-b_c~9/x").as_deref(), Some("a-b_c~9"));
        assert_eq!(key("/api/").as_deref(), Some("api"));
        for src in [
            "/api",          // the segment may go on: /apis
            "/api.v1/x",     // `.` is any character
            "/api/x|/other", // a second alternative
            "/api/*x",       // the `/` is optional
            "/api/?x",       // likewise
            "/api/{0,1}x",   // likewise
            "/api/+x",       // a quantified `/`
            "/ap[i]/x",      // a class
            "/ap\\i/x",      // an escape
            "(?i)/api/x",    // flags (case-insensitive rules)
            "(/api)/x",      // a group
            "api/x",         // no leading slash
            "//x",           // an empty segment
            "/(api)/x",      // a group inside the segment
        ] {
            assert_eq!(key(src), None, "{src}");
        }
    }

    #[test]
    fn first_segment_keys_of_globs() {
        let key = |m: PathMatcher| first_segment_key(&m).map(|k| String::from_utf8(k).unwrap());
        assert_eq!(
            key(PathMatcher::Glob(glob("/app/**"))).as_deref(),
            Some("app")
        );
        assert_eq!(
            key(PathMatcher::Glob(glob("/a.b-c_d~e"))).as_deref(),
            Some("a.b-c_d~e")
        );
        assert_eq!(
            key(PathMatcher::Glob(glob("/%61pp/x"))).as_deref(),
            Some("app")
        );
        for pattern in [
            "/**",
            "/",
            "/a*/x",
            "/*",
            "/users@x/**",
            "/caf%C3%A9",
            "/a%2Fb",
        ] {
            if let Ok(g) = Glob::new(pattern) {
                assert_eq!(key(PathMatcher::Glob(g)), None, "{pattern}");
            }
        }
        let folded = Glob::case_insensitive("/admin/**").unwrap();
        assert_eq!(key(PathMatcher::Glob(folded)), None);
        assert_eq!(
            key(PathMatcher::regex("/admin/.*").unwrap()).as_deref(),
            Some("admin")
        );
        let any_case = PathMatcher::regex_with_case("/admin/.*", true).unwrap();
        assert_eq!(key(any_case), None);
    }

    #[test]
    fn indexed_route_keeps_file_order_across_keyed_and_unkeyed_rules() {
        let mut rules = vec![
            rule("late-admin", "/admin/x", None, None, Action::Deny),
            rule("any", "/**", Some(&[Method::POST]), None, Action::Deny),
            rule("admin", "/admin/**", None, None, Action::Identity),
        ];
        rules.push(Rule {
            path: PathMatcher::regex("/admin/r.*").unwrap(),
            ..rule("regex", "/x", None, None, Action::Public)
        });
        let p = policy(rules);
        assert_eq!(
            routed(&p, &Method::GET, None, "/admin/x"),
            Some("late-admin")
        );
        assert_eq!(routed(&p, &Method::POST, None, "/admin/y"), Some("any"));
        assert_eq!(routed(&p, &Method::GET, None, "/admin/y"), Some("admin"));
        assert_eq!(routed(&p, &Method::GET, None, "/admin/rx"), Some("admin"));
        assert_eq!(routed(&p, &Method::GET, None, "/other"), None);
        assert_eq!(routed(&p, &Method::POST, None, "/other"), Some("any"));
        // A first segment with an escape is matched against every rule.
        assert_eq!(routed(&p, &Method::GET, None, "/%61dmin/y"), Some("admin"));
        assert_eq!(routed(&p, &Method::GET, None, "/"), None);
        assert_eq!(routed(&p, &Method::GET, None, ""), None);
        // An expression whose second `/` is optional is tried for any path.
        let optional_slash = Rule {
            path: PathMatcher::regex("/a/*b").unwrap(),
            ..rule("optional", "/x", None, None, Action::Deny)
        };
        let p = policy(vec![optional_slash]);
        assert_eq!(routed(&p, &Method::GET, None, "/ab"), Some("optional"));
    }

    #[test]
    // The index is what makes 200 rules cheap: a path is checked against
    // the rules of its first segment and the unkeyed ones, nothing else.
    fn route_index_holds_each_rule_under_its_first_segment() {
        let mut rules = vec![
            rule("admin", "/admin/**", None, None, Action::Deny),
            rule("any", "/**", None, None, Action::Deny),
            rule("api", "/api/*", None, None, Action::Deny),
        ];
        rules.push(Rule {
            path: PathMatcher::regex("/admin/r[0-9]+").unwrap(),
            ..rule("regex", "/x", None, None, Action::Public)
        });
        let p = policy(rules);
        assert_eq!(p.index.keyed("/admin/x"), Some(&[0, 3][..]));
        assert_eq!(p.index.keyed("/api"), Some(&[2][..]));
        assert_eq!(p.index.keyed("/other/x"), Some(&[][..]));
        assert_eq!(p.index.keyed("/"), Some(&[][..]));
        assert_eq!(p.index.keyed("x"), Some(&[][..]));
        assert_eq!(p.index.keyed("/%61dmin/x"), None);
        assert_eq!(p.index.unkeyed, vec![1]);
    }

    proptest::proptest! {
        /// The index never changes the answer: for any rules and any path
        /// (normalised or not), `route` is the first rule in file order.
        #[test]
        fn indexed_route_equals_a_scan_of_every_rule(
            patterns in proptest::collection::vec(proptest::sample::select(vec![
                "g:/a/**", "g:/a", "g:/b/*", "g:/ab/**", "g:/a*/**", "g:/**", "g:/",
                "g:/*/a", "g:/%61/**", "g:/@/**", "g:/a/b", "i:/A/**", "i:/b",
                "r:/a/.*", "r:/b/[0-9]+", "r:/a(/.*)?", "r:/a|/b/.*", "r:(?i)/a/.*",
                "r:/.*", "r:/ab/x", "r:/a/*b", "r:[/]a/.*", "ri:/a/.*",
            ]), 0..12),
            methods in proptest::collection::vec(proptest::option::of(proptest::sample::select(vec![
                Method::GET, Method::POST, Method::DELETE,
            ])), 12),
            path in proptest::collection::vec(proptest::sample::select(vec![
                "a", "b", "ab", "A", "%61", "%40", "@", "0", "1x", "", ".", "x",
            ]), 0..4),
            lead in proptest::sample::select(vec!["/", "", "//"]),
            trail in proptest::bool::ANY,
            method in proptest::sample::select(vec![Method::GET, Method::HEAD, Method::POST, Method::DELETE]),
        ) {
            let rules: Vec<Rule> = patterns
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let (kind, src) = p.split_once(':').unwrap();
                    let path = match kind {
                        "g" => PathMatcher::Glob(Glob::new(src).unwrap()),
                        "i" => PathMatcher::Glob(Glob::case_insensitive(src).unwrap()),
                        "r" => PathMatcher::regex(src).unwrap(),
                        _ => PathMatcher::regex_with_case(src, true).unwrap(),
                    };
                    Rule {
                        path,
                        methods: methods[i].clone().map(|m| vec![m]),
                        ..rule(&format!("r{i}"), "/x", None, None, Action::Deny)
                    }
                })
                .collect();
            let p = policy(rules);
            let mut raw = format!("{lead}{}", path.join("/"));
            if trail {
                raw.push('/');
            }
            let indexed = p.route(&method, None, &raw).map(|r| r.name.clone());
            let scanned = p.route_linear(&method, None, &raw).map(|r| r.name.clone());
            proptest::prop_assert_eq!(indexed, scanned, "path {}", raw);
        }
    }
}
