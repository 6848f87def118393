//! The `stepgate` binary as an operator uses it: `--version`/`--help`,
//! `check` on the shipped file and on broken files (every error class, each
//! at its line and column), `explain`, `token` against a running gateway,
//! and policy reload on file change and on SIGHUP.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use http::StatusCode;
use support::eventually;
use support::gateway::{
    config_yaml, get, primary_token, run_cli, BinaryGateway, TestResponse, CONSOLE, JWT_SECRET,
};
use support::upstream::Upstream;

/// 1-based (line, column) of the only occurrence of `needle` in `text`.
fn at(text: &str, needle: &str) -> (usize, usize) {
    assert_eq!(
        text.matches(needle).count(),
        1,
        "{needle:?} must occur exactly once in:\n{text}"
    );
    let i = text.find(needle).expect("needle present");
    let line = text[..i].matches('\n').count() + 1;
    let start = text[..i].rfind('\n').map_or(0, |n| n + 1);
    (line, text[start..i].chars().count() + 1)
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("temp paths are UTF-8").to_string()
}

/// A config file in its own temp dir (relative paths in it resolve there).
struct ConfigFile {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new(yaml: &str) -> ConfigFile {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, yaml).expect("write config");
        ConfigFile { dir, path }
    }

    fn path(&self) -> String {
        path_str(&self.path)
    }

    /// A path inside the config's directory.
    fn sibling(&self, name: &str) -> String {
        path_str(&self.dir.path().join(name))
    }
}

/// What `stepgate check` printed for an invalid file.
struct Invalid {
    file: ConfigFile,
    stderr: String,
}

impl Invalid {
    /// Assert one problem line reads `FILE:LINE:COL: what...`.
    fn has(&self, (line, col): (usize, usize), what: &str) -> &Self {
        let want = format!("{}:{line}:{col}: {what}", self.file.path());
        assert!(
            self.stderr.lines().any(|l| l.starts_with(&want)),
            "no line starting {want:?} in:\n{}",
            self.stderr
        );
        self
    }

    /// Assert exactly `n` problems were reported, one per line.
    fn count(&self, n: usize) -> &Self {
        let prefix = format!("{}:", self.file.path());
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert!(
            lines.iter().all(|l| l.starts_with(&prefix)),
            "every line must be FILE:LINE:COL: ...:\n{}",
            self.stderr
        );
        assert_eq!(lines.len(), n, "problem count in:\n{}", self.stderr);
        self
    }
}

/// `stepgate check` on `file` must exit 1 and print nothing on stdout.
fn check_invalid(file: ConfigFile) -> Invalid {
    let (code, out, err) = run_cli(&["check", "-c", &file.path()], None, &[]);
    assert_eq!(code, 1, "check must fail\nstdout:\n{out}\nstderr:\n{err}");
    assert!(out.is_empty(), "nothing on stdout when invalid: {out}");
    Invalid { file, stderr: err }
}

fn invalid(yaml: &str) -> Invalid {
    check_invalid(ConfigFile::new(yaml))
}

/// A small valid file; each error test breaks one thing in it.
const BASE: &str = "\
listen:
  address: 127.0.0.1:8080
upstream:
  url: http://127.0.0.1:3000
identity:
  jwt:
    algorithms: [HS256]
    secret: 0123456789abcdef0123456789abcdef
stepup:
  otp:
    length: 6
    ttl: 5m
    max_attempts: 5
  token:
    signing_key: fedcba9876543210fedcba9876543210
    lifetime: 15m
  console: true
routes:
  - name: static
    path: /assets/**
    public: true
  - name: admin
    path: /admin/**
    stepup: { max_age: 5m, factors: [email] }
default: pass
dev: true
";

/// BASE with `from` replaced by `to` (which must occur once).
fn base_with(from: &str, to: &str) -> String {
    assert_eq!(BASE.matches(from).count(), 1, "{from:?} not unique in BASE");
    BASE.replacen(from, to, 1)
}

fn check_ok(yaml: &str) -> String {
    let file = ConfigFile::new(yaml);
    let (code, out, err) = run_cli(&["check", "-c", &file.path()], None, &[]);
    assert_eq!(code, 0, "check must pass\nstderr:\n{err}");
    out
}

/// Make a P-256 key pair (PKCS#8 private, SPKI public) with the openssl CLI.
fn p256_keypair(dir: &Path) -> (String, String) {
    let private = dir.join("p256.key.pem");
    let public = dir.join("p256.pub.pem");
    let ok = Command::new("openssl")
        .args(["genpkey", "-algorithm", "EC", "-pkeyopt"])
        .arg("ec_paramgen_curve:P-256")
        .arg("-out")
        .arg(&private)
        .status()
        .expect("the openssl CLI is installed")
        .success();
    assert!(ok, "openssl genpkey failed");
    let ok = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()
        .expect("the openssl CLI is installed")
        .success();
    assert!(ok, "openssl pkey -pubout failed");
    (path_str(&private), path_str(&public))
}

// ---------------------------------------------------------------- 1. basics

#[test]
// The version flag reports the crate version under the binary's name.
fn version_prints_name_and_version() {
    let (code, out, _) = run_cli(&["--version"], None, &[]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim_end(),
        format!("stepgate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
// --help documents every contract subcommand and the -c option.
fn help_lists_the_subcommands() {
    let (code, out, _) = run_cli(&["--help"], None, &[]);
    assert_eq!(code, 0);
    for cmd in ["run", "check", "explain", "token"] {
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().next() == Some(cmd)),
            "--help does not list {cmd}:\n{out}"
        );
    }
    assert!(out.contains("-c, --config"), "{out}");
}

// ------------------------------------------------- 2. the shipped gateway.yaml

const SHIPPED_DIR: &str = env!("CARGO_MANIFEST_DIR");

fn shipped_text() -> String {
    std::fs::read_to_string(Path::new(SHIPPED_DIR).join("gateway.yaml"))
        .expect("read the shipped gateway.yaml")
}

#[test]
// The example the README tells operators to start from must stay valid, and
// the summary must show every part of it, each route with its line.
fn shipped_config_checks_with_secrets_set() {
    let key = "0123456789abcdef".repeat(4);
    let (code, out, err) = run_cli(
        &["check", "-c", "gateway.yaml"],
        Some(Path::new(SHIPPED_DIR)),
        &[("JWT_SECRET", &key), ("STEPGATE_KEY", &key)],
    );
    assert_eq!(code, 0, "shipped gateway.yaml invalid:\n{err}");
    assert!(err.is_empty(), "no warnings expected: {err}");
    assert!(out.starts_with("gateway.yaml: ok\n"), "{out}");
    let text = shipped_text();
    let value = |prefix: &str, n: usize| -> String {
        text.lines()
            .filter_map(|l| l.trim_start().strip_prefix(prefix))
            .nth(n)
            .unwrap_or_else(|| panic!("no {prefix:?} #{n} in the shipped file"))
            .trim()
            .to_string()
    };
    let summary_line = |head: &str| -> String {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(head))
            .unwrap_or_else(|| panic!("no {head} line in:\n{out}"))
            .to_string()
    };
    assert!(
        summary_line("listen").contains(&value("address:", 0)),
        "{out}"
    );
    assert!(
        summary_line("admin").contains(&value("address:", 1)),
        "{out}"
    );
    assert!(
        summary_line("upstream").contains(&value("url:", 0)),
        "{out}"
    );
    assert!(summary_line("identity").contains("jwt [HS256]"), "{out}");
    assert!(summary_line("store").contains("memory"), "{out}");
    let routes: Vec<(String, usize)> = text
        .lines()
        .enumerate()
        .filter_map(|(i, l)| {
            l.trim_start()
                .strip_prefix("- name: ")
                .map(|n| (n.trim().to_string(), i + 1))
        })
        .collect();
    assert!(routes.len() >= 3, "the shipped file has routes");
    assert!(
        summary_line("routes").contains(&format!("({},", routes.len())),
        "{out}"
    );
    for (name, line) in routes {
        // Route lines are indented under `routes` (a route may be named
        // like a section, e.g. admin).
        let l = out
            .lines()
            .filter(|l| l.starts_with("  "))
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("route {name} not in:\n{out}"));
        let words: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(
            words.get(1..3),
            Some(&["line", line.to_string().as_str()][..]),
            "route {name} must be shown at line {line}: {l}"
        );
    }
}

#[test]
// An unset ${VAR} must fail the check at its use, never become "".
fn shipped_config_without_secrets_names_both_variables() {
    let (code, out, err) = run_cli(
        &["check", "-c", "gateway.yaml"],
        Some(Path::new(SHIPPED_DIR)),
        &[],
    );
    assert_eq!(code, 1, "stdout:\n{out}");
    let text = shipped_text();
    for var in ["JWT_SECRET", "STEPGATE_KEY"] {
        let (line, col) = at(&text, &format!(": ${{{var}}}"));
        let want = format!(
            "gateway.yaml:{line}:{}: environment variable {var} is not set",
            col + 2
        );
        assert!(err.lines().any(|l| l == want), "want {want:?} in:\n{err}");
    }
    assert_eq!(err.lines().count(), 2, "only the two variables:\n{err}");
}

// ------------------------------------------------ 3. every config error class

#[test]
// The error tests below break BASE one way each: BASE itself must pass.
fn base_config_is_valid() {
    let out = check_ok(BASE);
    assert!(out.contains("admin          line 22 "), "{out}");
}

#[test]
// Bad indentation is a YAML syntax error at the offending line.
fn yaml_bad_indentation() {
    let y = base_with(
        "  url: http://127.0.0.1:3000\n",
        "  url: http://127.0.0.1:3000\n timeout: 5s\n",
    );
    invalid(&y)
        .has(at(&y, "timeout: 5s"), "did not find expected key")
        .count(1);
}

#[test]
// An unclosed flow map is reported where the parser gives up, and the
// message says where the `{` was opened.
fn yaml_unclosed_flow_map() {
    let y = base_with(
        "stepup: { max_age: 5m, factors: [email] }",
        "stepup: { max_age: 5m, factors: [email]",
    );
    let (open_line, open_col) = at(&y, "{ max_age");
    let (next_line, _) = at(&y, "default: pass");
    let e = invalid(&y);
    e.count(1);
    let want = format!("{}:{next_line}:", e.file.path());
    let line = e
        .stderr
        .lines()
        .find(|l| l.starts_with(&want))
        .unwrap_or_else(|| panic!("no problem at line {next_line}:\n{}", e.stderr));
    assert!(line.contains("did not find expected ',' or '}'"), "{line}");
    assert!(
        line.contains(&format!(
            "while parsing a flow mapping at line {open_line} column {open_col}"
        )),
        "{line}"
    );
}

#[test]
// A typo in a top-level key is refused, pointing at the key.
fn unknown_top_level_key() {
    let y = base_with("dev: true\n", "dev: true\ndevv: false\n");
    invalid(&y)
        .has(at(&y, "devv"), "unknown field `devv`, expected one of")
        .count(1);
}

#[test]
// A typo in a nested key (routes[1].stepp) is refused at the key, naming
// the route it is in.
fn unknown_nested_key() {
    let y = base_with(
        "    stepup: { max_age: 5m, factors: [email] }\n",
        "    stepup: { max_age: 5m, factors: [email] }\n    stepp: {}\n",
    );
    invalid(&y)
        .has(at(&y, "stepp"), "routes[1]: unknown field `stepp`")
        .count(1);
    // Inside a flow map too.
    let y = base_with("factors: [email] }", "factors: [email], maxage: 1m }");
    invalid(&y)
        .has(at(&y, "maxage"), "routes[1].stepup: unknown field `maxage`")
        .count(1);
}

#[test]
// A list where a map belongs is a type error at the value.
fn list_where_map_expected() {
    let y = base_with(
        "listen:\n  address: 127.0.0.1:8080\n",
        "listen: [127.0.0.1:8080]\n",
    );
    invalid(&y)
        .has(at(&y, "[127.0.0.1"), "listen: invalid type: sequence")
        .count(1);
}

#[test]
// A string where a number belongs is a type error at the value.
fn string_where_number_expected() {
    let y = base_with("max_attempts: 5", "max_attempts: five");
    invalid(&y)
        .has(
            at(&y, "five"),
            "stepup.otp.max_attempts: invalid type: string \"five\"",
        )
        .count(1);
}

#[test]
// Every unset ${VAR} is reported at its own use (also inside a quoted
// string in a flow map), once, and not also as a too-short secret.
fn unset_variables_reported_where_used() {
    let y = base_with(
        "    secret: 0123456789abcdef0123456789abcdef\n",
        "    secret: ${STEPGATE_TEST_UNSET_A}\n",
    )
    .replace(
        "  console: true\n",
        "  console: true\n  sms:\n    webhook: { url: https://sms.test/send, auth_header: \"Bearer ${STEPGATE_TEST_UNSET_B}\" }\n",
    );
    invalid(&y)
        .has(
            at(&y, "${STEPGATE_TEST_UNSET_A}"),
            "environment variable STEPGATE_TEST_UNSET_A is not set",
        )
        .has(
            at(&y, "${STEPGATE_TEST_UNSET_B}"),
            "environment variable STEPGATE_TEST_UNSET_B is not set",
        )
        .count(2);
}

#[test]
// "5 minutes" is not a duration; the file says which value is wrong.
fn invalid_duration() {
    let y = base_with("lifetime: 15m", "lifetime: 15 minutes");
    invalid(&y)
        .has(
            at(&y, "15 minutes"),
            "stepup.token.lifetime: invalid duration \"15 minutes\"",
        )
        .count(1);
}

#[test]
// A guessable HMAC secret for primary tokens is refused (31 bytes fails).
fn weak_jwt_secret() {
    let y = base_with(
        "secret: 0123456789abcdef0123456789abcdef",
        "secret: 0123456789abcdef0123456789abcde",
    );
    invalid(&y)
        .has(
            at(&y, "0123456789abcdef0123456789abcde\n"),
            "identity.jwt.secret: HS secret is 31 bytes; at least 32 are required",
        )
        .count(1);
}

#[test]
// A guessable key for second-factor tokens is refused (31 bytes fails).
fn weak_stepup_signing_key() {
    let y = base_with(
        "signing_key: fedcba9876543210fedcba9876543210",
        "signing_key: fedcba9876543210fedcba987654321",
    );
    invalid(&y)
        .has(
            at(&y, "fedcba9876543210fedcba987654321"),
            "stepup.token.signing_key: HS256 key is 31 bytes; at least 32 are required",
        )
        .count(1);
}

#[test]
// alg none would accept unsigned tokens.
fn alg_none_refused() {
    let y = base_with("algorithms: [HS256]", "algorithms: [HS256, none]");
    invalid(&y)
        .has(
            at(&y, "none]"),
            "identity.jwt.algorithms[1]: alg none is never accepted",
        )
        .count(1);
}

#[test]
// Algorithm confusion: HS next to a public key (the public key would be an
// HMAC secret), and asymmetric algorithms next to a secret.
fn hs_with_public_key_refused() {
    let keys = tempfile::tempdir().expect("tempdir");
    let (_, public) = p256_keypair(keys.path());
    let y = base_with(
        "    algorithms: [HS256]\n    secret: 0123456789abcdef0123456789abcdef\n",
        &format!("    algorithms: [HS256, ES256]\n    public_key: {public}\n"),
    );
    invalid(&y)
        .has(
            at(&y, "algorithms:"),
            "identity.jwt.algorithms: HS algorithms are refused when a public key is configured",
        )
        .count(1);
    let y = base_with("algorithms: [HS256]", "algorithms: [HS256, RS256]");
    invalid(&y)
        .has(
            at(&y, "algorithms:"),
            "identity.jwt.algorithms: a secret only verifies HS256/384/512",
        )
        .count(1);
}

#[test]
// A missing secret file, public key or certificate is found at check time,
// relative paths resolved against the config's directory.
fn missing_files() {
    let y = base_with(
        "    secret: 0123456789abcdef0123456789abcdef\n",
        "    secret_file: jwt.secret\n",
    )
    .replace(
        "    signing_key: fedcba9876543210fedcba9876543210\n",
        "    signing_key_file: stepup.pem\n",
    )
    .replace(
        "  address: 127.0.0.1:8080\n",
        "  address: 127.0.0.1:8080\n  tls:\n    cert: certs/server.crt\n    key: certs/server.key\n",
    );
    let e = invalid(&y);
    e.has(
        at(&y, "jwt.secret"),
        &format!(
            "identity.jwt.secret_file: cannot read {}:",
            e.file.sibling("jwt.secret")
        ),
    )
    .has(
        at(&y, "stepup.pem"),
        &format!(
            "stepup.token.signing_key_file: cannot read {}:",
            e.file.sibling("stepup.pem")
        ),
    )
    .has(
        at(&y, "certs/server.crt"),
        &format!(
            "listen.tls.cert: file {} does not exist",
            e.file.sibling("certs/server.crt")
        ),
    )
    .has(
        at(&y, "certs/server.key"),
        &format!(
            "listen.tls.key: file {} does not exist",
            e.file.sibling("certs/server.key")
        ),
    )
    .count(4);

    let y = base_with(
        "    algorithms: [HS256]\n    secret: 0123456789abcdef0123456789abcdef\n",
        "    algorithms: [ES256]\n    public_key: keys/idp.pem\n",
    );
    let e = invalid(&y);
    e.has(
        at(&y, "keys/idp.pem"),
        &format!(
            "identity.jwt.public_key: file {} does not exist",
            e.file.sibling("keys/idp.pem")
        ),
    )
    .count(1);
}

#[test]
// A glob the matcher cannot express is refused, not matched literally.
fn invalid_glob() {
    let y = base_with("path: /admin/**", "path: /admin/[x");
    invalid(&y)
        .has(at(&y, "/admin/[x"), "routes[1].path: invalid glob")
        .count(1);
}

#[test]
// A broken regex is refused at the value, in one line (the regex crate's
// multi-line message would break FILE:LINE:COL parsing).
fn invalid_regex() {
    let y = base_with("path: /admin/**", "path_regex: '^/(admin$'");
    invalid(&y)
        .has(
            at(&y, "'^/(admin$'"),
            "routes[1].path_regex: invalid path_regex `^/(admin$`",
        )
        .count(1);
}

#[test]
// A factor the gateway cannot deliver is a typo, not "any factor".
fn unknown_factor() {
    let y = base_with("factors: [email]", "factors: [email, pigeon]");
    invalid(&y)
        .has(
            at(&y, "pigeon"),
            "routes[1].stepup.factors[1]: unknown factor \"pigeon\": expected email or sms",
        )
        .count(1);
}

#[test]
// A route cannot ask for a second factor older than tokens live.
fn max_age_above_token_lifetime() {
    let y = base_with("max_age: 5m", "max_age: 20m");
    invalid(&y)
        .has(
            at(&y, "20m"),
            "routes[1].stepup.max_age: max_age 20m is longer than stepup.token.lifetime 15m",
        )
        .count(1);
}

#[test]
// Codes valid over 10 minutes need an explicit override.
fn otp_ttl_above_ten_minutes() {
    let y = base_with("ttl: 5m", "ttl: 11m");
    invalid(&y)
        .has(
            at(&y, "11m"),
            "stepup.otp.ttl: codes valid longer than 10m are refused",
        )
        .count(1);
    check_ok(&base_with("ttl: 5m", "ttl: 11m\n    allow_long_ttl: true"));
}

#[test]
// Code length outside 6..10 digits is refused on both sides.
fn otp_length_out_of_range() {
    for bad in ["5", "11"] {
        let y = base_with("length: 6", &format!("length: {bad}"));
        let (line, col) = at(&y, &format!("length: {bad}"));
        invalid(&y)
            .has(
                (line, col + "length: ".len()),
                &format!("stepup.otp.length: {bad} is out of range 6..=10"),
            )
            .count(1);
    }
}

#[test]
// The console channel leaks codes into logs: refused without dev: true.
fn console_without_dev() {
    let y = base_with("dev: true\n", "");
    invalid(&y)
        .has(
            {
                let (l, c) = at(&y, "console: true");
                (l, c + "console: ".len())
            },
            "stepup.console: the console channel prints codes to the log",
        )
        .count(1);
}

#[test]
// Only pass and identity are default policies.
fn bad_default() {
    let y = base_with("default: pass", "default: deny");
    invalid(&y)
        .has(
            at(&y, "deny"),
            "default: unknown default policy \"deny\": expected pass or identity",
        )
        .count(1);
}

#[test]
// A problem with a route as a whole points at the route's first key (a
// block mapping's own mark is the `:` after that key).
fn route_level_problem_at_the_route() {
    let y = base_with(
        "    path: /admin/**\n",
        "    path: /admin/**\n    path_regex: '^/admin$'\n",
    );
    invalid(&y)
        .has(
            at(&y, "name: admin"),
            "routes[1]: give either path or path_regex, not both",
        )
        .count(1);
}

#[test]
// Route names label metrics and logs: two routes cannot share one.
fn duplicate_route_name() {
    let y = base_with("- name: admin", "- name: static");
    // The second `- name: static` is the line above admin's path.
    let (line, _) = at(&y, "    path: /admin/**");
    invalid(&y)
        .has(
            (line - 1, "  - name: ".len() + 1),
            "routes[1].name: duplicate route name \"static\" (also routes[0])",
        )
        .count(1);
}

#[test]
// A duplicated YAML key is reported at the second occurrence, not at the
// start of the map that holds it.
fn duplicate_key_at_second_occurrence() {
    let y = base_with("dev: true\n", "dev: true\ndefault: identity\n");
    invalid(&y)
        .has(at(&y, "default: identity"), "duplicate field `default`")
        .count(1);
    let y = base_with(
        "    path: /admin/**\n",
        "    path: /admin/**\n    public: true\n    path: /other/**\n",
    );
    invalid(&y)
        .has(at(&y, "path: /other"), "routes[1]: duplicate field `path`")
        .count(1);
}

#[test]
// The upstream is required and must be an http(s) URL with a host.
fn upstream_url_missing_or_invalid() {
    let y = base_with("  url: http://127.0.0.1:3000\n", "  timeout: 5s\n");
    invalid(&y)
        .has(at(&y, "upstream:"), "upstream.url: is required")
        .count(1);
    // Without the section, at the start of the file's first key.
    let y = base_with("upstream:\n  url: http://127.0.0.1:3000\n", "");
    invalid(&y)
        .has((1, 1), "upstream.url: is required")
        .count(1);
    for bad in ["127.0.0.1:3000", "ftp://files.test", "http://"] {
        let y = base_with("http://127.0.0.1:3000", bad);
        let (line, col) = at(&y, "  url: ");
        invalid(&y)
            .has(
                (line, col + "  url: ".len()),
                &format!("upstream.url: invalid URL {bad:?}"),
            )
            .count(1);
    }
}

#[test]
// A Redis URL without redis:// is refused at check time, not at startup.
fn bad_redis_url() {
    let y = base_with(
        "default: pass\n",
        "store:\n  redis: localhost:6379\ndefault: pass\n",
    );
    invalid(&y)
        .has(
            at(&y, "localhost:6379"),
            "store.redis: invalid Redis URL \"localhost:6379\"",
        )
        .count(1);
}

/// `stepgate check` refuses `file`, and `stepgate run` refuses it with the
/// very same lines: check is exactly as strict as run.
fn refused_by_check_and_run(file: ConfigFile) -> Invalid {
    let e = check_invalid(file);
    let (code, out, err) = run_cli(&["run", "-c", &e.file.path()], None, &[]);
    assert_eq!(
        code, 1,
        "run must refuse too\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert_eq!(err, e.stderr, "run must refuse with check's lines");
    e
}

/// A dev CA and server certificate for localhost in `dir`, made by the
/// script the README tells operators to use: (cert, key, ca).
fn dev_cert(dir: &Path) -> (String, String, String) {
    std::fs::create_dir_all(dir).expect("cert dir");
    let status = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/certs/gen-dev-cert.sh"
    ))
    .arg(dir)
    .stdout(std::process::Stdio::null())
    .status()
    .expect("gen-dev-cert.sh runs");
    assert!(status.success());
    (
        path_str(&dir.join("server.crt")),
        path_str(&dir.join("server.key")),
        path_str(&dir.join("ca.crt")),
    )
}

#[test]
// Check as strict as run: a Redis key prefix with hash-tag braces, which
// the store refuses at start-up, is a located check error (and only where
// a Redis store uses the prefix).
fn check_as_strict_as_run_redis_prefix() {
    let y = base_with(
        "default: pass\n",
        "store:\n  redis: redis://127.0.0.1:6379/0\n  prefix: \"a{b}\"\ndefault: pass\n",
    );
    refused_by_check_and_run(ConfigFile::new(&y))
        .has(
            at(&y, "\"a{b}\""),
            "store.prefix: redis key prefix \"a{b}\" may not contain '{' or '}'",
        )
        .count(1);
    let y = base_with(
        "default: pass\n",
        "store:\n  redis_cluster: [redis://127.0.0.1:7000]\n  prefix: \"x}\"\ndefault: pass\n",
    );
    refused_by_check_and_run(ConfigFile::new(&y))
        .has(at(&y, "\"x}\""), "store.prefix: redis key prefix")
        .count(1);
    // Each cluster node URL is checked where it is written.
    let y = base_with(
        "default: pass\n",
        "store:\n  redis_cluster: [redis://127.0.0.1:7000, \"nope\"]\ndefault: pass\n",
    );
    refused_by_check_and_run(ConfigFile::new(&y))
        .has(
            at(&y, "\"nope\""),
            "store.redis_cluster[1]: invalid Redis URL",
        )
        .count(1);
}

#[test]
// Check as strict as run: a secret file that cannot be read is one problem,
// not also a misleading "username and password must be set together".
fn check_as_strict_as_run_unreadable_password_file() {
    let y = base_with(
        "  console: true\n",
        "  console: true\n  email:\n    smtp: { host: 127.0.0.1, port: 2525, security: none, username: u, password_file: smtp.pass }\n    from: \"Security <no-reply@example.com>\"\n",
    );
    let e = refused_by_check_and_run(ConfigFile::new(&y));
    e.has(
        at(&y, "smtp.pass"),
        &format!(
            "stepup.email.smtp.password_file: cannot read {}:",
            e.file.sibling("smtp.pass")
        ),
    )
    .count(1);
}

#[test]
// Check as strict as run: an SMS timeout the notifier refuses at start-up.
fn check_as_strict_as_run_sms_timeout() {
    let y = base_with(
        "  console: true\n",
        "  console: true\n  sms:\n    webhook: { url: http://127.0.0.1:9/send }\n    timeout: 0s\n",
    );
    refused_by_check_and_run(ConfigFile::new(&y))
        .has(at(&y, "sms:"), "stepup.sms: sms: timeout is zero")
        .count(1);
}

#[test]
// Check as strict as run: certificate and CA files are loaded by check as
// the server, the upstream client and the Redis client load them, so a file
// that exists but holds no usable certificate or key is a located error.
fn check_as_strict_as_run_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = path_str(&dir.path().join("garbage.pem"));
    std::fs::write(&garbage, "not a PEM file\n").expect("write");
    let (crt, key, ca) = dev_cert(&dir.path().join("a"));
    let (_, other_key, _) = dev_cert(&dir.path().join("b"));
    let tls = |cert: &str, key: &str| {
        base_with(
            "  address: 127.0.0.1:8080\n",
            &format!("  address: 127.0.0.1:8080\n  tls: {{ cert: {cert}, key: {key} }}\n"),
        )
    };
    let refused = |y: &str, want: &str| {
        let e = refused_by_check_and_run(ConfigFile::new(y));
        assert!(e.stderr.contains(want), "no {want:?} in:\n{}", e.stderr);
        e.count(1);
    };
    // Sound files pass, so each failure below is that file's fault.
    check_ok(&tls(&crt, &key));
    refused(
        &tls(&garbage, &key),
        &format!("listen.tls.cert: cannot load {garbage}: no certificate found"),
    );
    refused(
        &tls(&crt, &garbage),
        &format!("listen.tls.key: cannot load {garbage}:"),
    );
    refused(
        &tls(&crt, &other_key),
        &format!("listen.tls.key: does not fit the certificate in {crt}:"),
    );

    let upstream = |ca_file: &str| {
        base_with(
            "  url: http://127.0.0.1:3000\n",
            &format!("  url: https://127.0.0.1:3000\n  ca_file: {ca_file}\n"),
        )
    };
    check_ok(&upstream(&ca));
    refused(
        &upstream(&garbage),
        &format!("upstream.ca_file: cannot load {garbage}: no certificate found"),
    );

    let store = |ca_file: &str| {
        base_with(
            "default: pass\n",
            &format!(
                "store:\n  redis: rediss://127.0.0.1:6380/0\n  ca_file: {ca_file}\ndefault: pass\n"
            ),
        )
    };
    check_ok(&store(&ca));
    refused(&store(&garbage), "store.ca_file: ");
}

#[test]
// Check as strict as run: keys are loaded by the build step, not during
// validation, and a key file that exists but does not load is still a
// located problem, beside an unrelated one (every problem at once).
fn check_as_strict_as_run_key_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = path_str(&dir.path().join("garbage.pem"));
    std::fs::write(&garbage, "not a PEM file\n").expect("write");
    let jwt = |keys: &str| {
        base_with(
            "    algorithms: [HS256]\n    secret: 0123456789abcdef0123456789abcdef\n",
            &format!("    algorithms: [ES256]\n{keys}"),
        )
    };
    let y = jwt(&format!("    public_key: {garbage}\n"));
    refused_by_check_and_run(ConfigFile::new(&y))
        .has(
            at(&y, &garbage),
            &format!("identity.jwt.public_key: cannot load {garbage}:"),
        )
        .count(1);
    let y = jwt(&format!("    jwks_file: {garbage}\n"));
    refused_by_check_and_run(ConfigFile::new(&y))
        .has(
            at(&y, &garbage),
            &format!("identity.jwt.jwks_file: cannot load {garbage}:"),
        )
        .count(1);
    let y = base_with(
        "  url: http://127.0.0.1:3000\n",
        &format!(
            "  url: http://127.0.0.1:3000\n  assertion: {{ signing_key_file: {garbage}, audience: app }}\n"
        ),
    )
    .replace("    ttl: 5m\n", "    ttl: 5 minutes\n");
    refused_by_check_and_run(ConfigFile::new(&y))
        .has(
            at(&y, &garbage),
            &format!(
                "upstream.assertion.signing_key_file: {garbage}: expected an Ed25519 or P-256 private key"
            ),
        )
        .has(at(&y, "5 minutes"), "stepup.otp.ttl: invalid duration")
        .count(2);
}

#[test]
// Hostile config files: 60,000 levels of nesting (which used to keep check
// busy for a minute) and a file above 1 MiB are refused before parsing,
// each with one located line.
fn hostile_config_files_refused_before_parsing() {
    let y = format!(
        "{BASE}routes: {}{}\n",
        "[".repeat(60_000),
        "]".repeat(60_000)
    );
    let (line, col) = at(&y, "routes: ");
    invalid(&y)
        .has(
            (line, col + "routes: ".len() + 32),
            "nested deeper than 32 levels; nothing was parsed",
        )
        .count(1);
    let y = format!("{BASE}{}", "# padding\n".repeat(110_000));
    let e = invalid(&y);
    assert!(
        e.stderr
            .contains(": the config file is larger than 1048576 bytes; nothing was parsed"),
        "{}",
        e.stderr
    );
    e.count(1);
}

#[test]
// One run reports every problem, each at its own line, in file order.
fn several_errors_reported_together() {
    let y = "\
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
  console: true
store:
  redis: http://localhost:6379
routes:
  - name: a
    path: /a/**/b/**x
    stepup: { max_age: 1h, factors: [pigeon] }
  - name: a
    path_regex: '^/(x$'
default: maybe
";
    let e = invalid(y);
    e.has((2, 8), "upstream.url: invalid URL")
        .has((3, 12), "upstream.timeout: invalid duration")
        .has((6, 25), "identity.jwt.algorithms[1]: alg none")
        .has((7, 13), "identity.jwt.secret: HS secret is 5 bytes")
        .has((10, 13), "stepup.otp.length: 4 is out of range")
        .has((11, 10), "stepup.otp.ttl: codes valid longer than 10m")
        .has((13, 18), "stepup.token.signing_key: HS256 key is 8 bytes")
        .has((14, 12), "stepup.console: ")
        .has((16, 10), "store.redis: invalid Redis URL")
        .has((19, 11), "routes[0].path: invalid glob")
        .has((20, 24), "routes[0].stepup.max_age: max_age 1h is longer")
        .has((20, 38), "routes[0].stepup.factors[0]: unknown factor")
        .has((21, 11), "routes[1].name: duplicate route name")
        .has((22, 17), "routes[1].path_regex: invalid path_regex")
        .has((23, 10), "default: unknown default policy")
        .count(15);
    let lines: Vec<usize> = e
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{}:", e.file.path())))
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .collect();
    assert!(
        lines.windows(2).all(|w| w[0] <= w[1]),
        "file order: {lines:?}"
    );
}

// --------------------------------------------------------------- 4. explain

/// The test config with a GET-only, host-bound route added before `account`.
fn explain_config() -> String {
    let y = config_yaml("http://127.0.0.1:9", CONSOLE, "");
    let route = "  - name: account\n";
    assert!(y.contains(route));
    y.replacen(
        route,
        "  - name: reports\n    path: /reports/**\n    methods: [GET]\n    hosts: [app.example.com]\n    stepup: { max_age: 2m, factors: [email] }\n  - name: account\n",
        1,
    )
}

fn explain(file: &ConfigFile, method: &str, url: &str) -> (i32, String, String) {
    run_cli(&["explain", "-c", &file.path(), method, url], None, &[])
}

fn explain_ok(file: &ConfigFile, method: &str, url: &str) -> String {
    let (code, out, err) = explain(file, method, url);
    assert_eq!(code, 0, "explain {method} {url}: {err}");
    out
}

#[test]
// explain shows the path after normalisation (traversal, %-decoding) and
// the rule that really matches it, with the rule's line in the file.
fn explain_normalises_then_matches() {
    let y = explain_config();
    let f = ConfigFile::new(&y);
    let (admin_line, _) = at(&y, "- name: admin");
    let out = explain_ok(&f, "GET", "/assets/../admin/%75sers");
    assert!(out.contains("normalised path: /admin/users\n"), "{out}");
    assert!(
        out.contains(&format!(
            "rule \"admin\" (line {admin_line}): step-up, max_age 5m, factors email,sms\n"
        )),
        "{out}"
    );
    let (export_line, _) = at(&y, "- name: export");
    let out = explain_ok(&f, "GET", "/billing/export");
    assert!(
        out.contains(&format!(
            "rule \"export\" (line {export_line}): step-up, max_age 5m, factors email,sms, one-time"
        )),
        "{out}"
    );
    let (keys_line, _) = at(&y, "- name: keys");
    let out = explain_ok(&f, "DELETE", "/api/v2/keys");
    assert!(
        out.contains(&format!(
            "rule \"keys\" (line {keys_line}): step-up, max_age 1m, factors sms"
        )),
        "{out}"
    );
}

#[test]
// A full URL's host takes part in matching (port and case ignored), and a
// GET-only rule covers HEAD but not POST.
fn explain_full_url_host_and_head() {
    let y = explain_config();
    let f = ConfigFile::new(&y);
    let (line, _) = at(&y, "- name: reports");
    let want = format!("rule \"reports\" (line {line}): step-up, max_age 2m, factors email\n");
    for (method, url) in [
        ("GET", "https://app.example.com/reports/q"),
        ("GET", "https://App.Example.com:8443/reports/q"),
        ("HEAD", "https://app.example.com/reports/q"),
    ] {
        let out = explain_ok(&f, method, url);
        assert!(out.contains(&want), "{method} {url}:\n{out}");
    }
    for (method, url) in [
        ("POST", "https://app.example.com/reports/q"),
        ("GET", "https://other.example.com/reports/q"),
    ] {
        let out = explain_ok(&f, method, url);
        assert!(
            out.contains("no rule matches: default pass"),
            "{method} {url}:\n{out}"
        );
    }
}

#[test]
// Requests no rule matches are explained as the default policy.
fn explain_unmatched_uses_default() {
    let f = ConfigFile::new(&explain_config());
    let out = explain_ok(&f, "GET", "/nowhere/x");
    assert!(out.starts_with("normalised path: /nowhere/x\n"), "{out}");
    assert!(
        out.ends_with("no rule matches: default pass (forwarded as is)\n"),
        "{out}"
    );
    // A bare path cannot match host-limited rules: explain says so.
    assert!(out.contains("limited to hosts were skipped"), "{out}");
    let out = explain_ok(&f, "GET", "https://other.example.com/nowhere/x");
    assert!(!out.contains("skipped"), "{out}");
    let f = ConfigFile::new(
        &config_yaml("http://127.0.0.1:9", CONSOLE, "")
            .replace("default: pass", "default: identity"),
    );
    let out = explain_ok(&f, "GET", "/nowhere/x");
    assert!(out.contains("no rule matches: default identity"), "{out}");
}

#[test]
// Paths the gateway answers 400 (encoded slash, climbing above the root)
// are explained as such, with a failing exit code.
fn explain_ambiguous_path_is_400() {
    let f = ConfigFile::new(&explain_config());
    for url in ["/a%2fb", "/admin%2F..%2Fx", "/../admin"] {
        let (code, out, err) = explain(&f, "GET", url);
        assert_ne!(code, 0, "{url}: {out}");
        assert!(!out.contains("rule"), "{url}: {out}");
        assert!(err.contains("400 Bad Request"), "{url}: {err}");
    }
}

// ----------------------------------------------------------------- 5. token

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

async fn get_with_token(gw: &BinaryGateway, path: &str, token: &str) -> TestResponse {
    let auth = bearer(token);
    get(&gw.url(path), &[("authorization", &auth)]).await
}

#[tokio::test]
// `stepgate token` mints what the gateway on the same config accepts,
// issuer and audience included.
async fn token_with_config_secret_is_accepted() {
    let up = Upstream::start().await;
    let gw = BinaryGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    let cfg = path_str(&gw.config);
    let (code, out, err) = run_cli(
        &[
            "token",
            "--sub",
            "alice",
            "--email",
            "a@example.com",
            "--ttl",
            "10m",
            "-c",
            &cfg,
        ],
        None,
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let token = out.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT: {out}");
    let none = get(&gw.url("/account/x"), &[]).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED, "{}", none.text());
    let res = get_with_token(&gw, "/account/x", token).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(
        res.upstream_header("x-stepgate-user").as_deref(),
        Some("alice")
    );
    assert_eq!(
        res.upstream_header("x-stepgate-email").as_deref(),
        Some("a@example.com")
    );
}

#[tokio::test]
// With a private key, `token` signs ES256 for a gateway that verifies with
// the public key, and that gateway refuses an HS token (no alg confusion).
async fn token_with_es256_key_is_accepted() {
    let keys = tempfile::tempdir().expect("tempdir");
    let (private, public) = p256_keypair(keys.path());
    let up = Upstream::start().await;
    let hs = format!("    algorithms: [HS256]\n    secret: {JWT_SECRET}\n");
    let yaml = config_yaml(&up.url(), CONSOLE, "");
    assert!(yaml.contains(&hs));
    let yaml = yaml.replacen(
        &hs,
        &format!("    algorithms: [ES256]\n    public_key: {public}\n"),
        1,
    );
    let gw = BinaryGateway::start(&yaml).await;
    let cfg = path_str(&gw.config);
    let (code, out, err) = run_cli(
        &[
            "token", "--sub", "bob", "--ttl", "10m", "--key", &private, "--alg", "ES256", "-c",
            &cfg,
        ],
        None,
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let res = get_with_token(&gw, "/account/x", out.trim()).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text());
    assert_eq!(
        res.upstream_header("x-stepgate-user").as_deref(),
        Some("bob")
    );
    let hs_token = primary_token("bob", None, None, None);
    let res = get_with_token(&gw, "/account/x", &hs_token).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{}", res.text());
    // Without --key there is no secret to sign with: a clear error.
    let (code, _, err) = run_cli(&["token", "--sub", "bob", "-c", &cfg], None, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("--key"), "{err}");
}

// ---------------------------------------------------------------- 6. reload

/// Replace the file the way editors and ConfigMaps do: write a sibling,
/// then rename it over the original.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).expect("write temp config");
    std::fs::rename(&tmp, path).expect("rename config into place");
}

/// The `stepgate_config_reloads_total{event=...}` counter.
async fn reloads(gw: &BinaryGateway, event: &str) -> u64 {
    let res = get(&format!("http://{}/metrics", gw.admin), &[]).await;
    assert_eq!(res.status, StatusCode::OK);
    let prefix = format!("stepgate_config_reloads_total{{event=\"{event}\"}} ");
    res.text()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse().expect("counter value"))
}

async fn status(gw: &BinaryGateway, path: &str, token: Option<&str>) -> StatusCode {
    match token {
        Some(t) => get_with_token(gw, path, t).await.status,
        None => get(&gw.url(path), &[]).await.status,
    }
}

#[tokio::test]
// An edit saved the moment the gateway starts accepting is not lost (the
// file may change between loading it and watching it).
async fn edit_right_after_start_is_picked_up() {
    let up = Upstream::start().await;
    let gw = BinaryGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    let good = std::fs::read_to_string(&gw.config).expect("read config");
    let account = "  - name: account\n    path: /account/**\n";
    assert_eq!(good.matches(account).count(), 1);
    replace_file(
        &gw.config,
        &good.replacen(account, &format!("{account}    public: true\n"), 1),
    );
    eventually("the public edit to be live", || async {
        status(&gw, "/account/x", None).await == StatusCode::OK
    })
    .await;
}

#[tokio::test]
// A saved edit goes live without a restart; a broken edit keeps the last
// good policy; SIGHUP reloads on its own (the file watcher cannot see the
// last change).
async fn reload_on_change_keeps_last_good_and_on_sighup() {
    let up = Upstream::start().await;
    let gw = BinaryGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    let token = primary_token("alice", None, None, None);
    assert_eq!(
        status(&gw, "/account/x", Some(&token)).await,
        StatusCode::OK
    );

    let good = std::fs::read_to_string(&gw.config).expect("read config");
    let account = "  - name: account\n    path: /account/**\n";
    assert_eq!(good.matches(account).count(), 1);
    let denied = good.replacen(account, &format!("{account}    deny: true\n"), 1);
    let public = good.replacen(account, &format!("{account}    public: true\n"), 1);
    let broken = format!("{denied}stepp: 1\n");

    // 1. A good edit is picked up by the file watcher.
    replace_file(&gw.config, &denied);
    eventually("the deny edit to be live", || async {
        status(&gw, "/account/x", Some(&token)).await == StatusCode::FORBIDDEN
    })
    .await;
    assert_eq!(reloads(&gw, "rejected").await, 0);

    // 2. A broken edit is rejected and the last good policy keeps serving.
    replace_file(&gw.config, &broken);
    eventually("the broken edit to be rejected", || async {
        reloads(&gw, "rejected").await >= 1
    })
    .await;
    assert_eq!(
        status(&gw, "/account/x", Some(&token)).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(status(&gw, "/assets/a", None).await, StatusCode::OK);

    // 3. SIGHUP. Make the config a symlink to a file in a directory the
    // watcher does not watch (the swap itself is seen: still the broken
    // text), then fix that file: only SIGHUP can bring the fix in.
    let outside = tempfile::tempdir().expect("tempdir");
    let real = outside.path().join("real.yaml");
    std::fs::write(&real, &broken).expect("write real config");
    let rejected = reloads(&gw, "rejected").await;
    let link = gw.config.with_extension("yaml.link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    std::fs::rename(&link, &gw.config).expect("swap in the symlink");
    eventually("the symlink swap to be seen (and rejected)", || async {
        reloads(&gw, "rejected").await > rejected
    })
    .await;
    std::fs::write(&real, &public).expect("write the public config");
    let ok_before = reloads(&gw, "ok").await;
    assert_eq!(
        status(&gw, "/account/x", None).await,
        StatusCode::FORBIDDEN,
        "nothing but SIGHUP may load the fixed file"
    );
    gw.signal("HUP");
    eventually("SIGHUP to load the public route", || async {
        status(&gw, "/account/x", None).await == StatusCode::OK
    })
    .await;
    assert_eq!(reloads(&gw, "ok").await, ok_before + 1);
    let res = get(&gw.url("/account/x"), &[]).await;
    assert_eq!(res.json()["path"], "/account/x", "forwarded upstream");
}

#[tokio::test]
// A reload whose key does not load is refused whole: the last good policy
// keeps serving (the route edit made with it included) and no assertion
// key is published; once the key file is fixed, SIGHUP brings both in.
async fn reload_with_a_bad_key_keeps_the_last_good_policy() {
    let up = Upstream::start().await;
    let gw = BinaryGateway::start(&config_yaml(&up.url(), CONSOLE, "")).await;
    let token = primary_token("alice", None, None, None);
    let good = std::fs::read_to_string(&gw.config).expect("read config");
    let key = gw.config.with_file_name("assertion.pem");
    std::fs::write(&key, "not a PEM file\n").expect("write key");
    let account = "  - name: account\n    path: /account/**\n";
    let connect = "  connect_timeout: 1s\n";
    assert_eq!(good.matches(account).count(), 1);
    assert_eq!(good.matches(connect).count(), 1);
    let edited = good
        .replacen(account, &format!("{account}    deny: true\n"), 1)
        .replacen(
            connect,
            &format!(
                "{connect}  assertion: {{ signing_key_file: {}, audience: app }}\n",
                key.display()
            ),
            1,
        );

    replace_file(&gw.config, &edited);
    eventually("the edit with a bad key to be rejected", || async {
        reloads(&gw, "rejected").await >= 1
    })
    .await;
    assert_eq!(
        status(&gw, "/account/x", Some(&token)).await,
        StatusCode::OK
    );
    let jwks = format!("http://{}/jwks.json", gw.admin);
    assert_eq!(get(&jwks, &[]).await.status, StatusCode::NOT_FOUND);

    let ok = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .status()
        .expect("the openssl CLI is installed")
        .success();
    assert!(ok, "openssl genpkey failed");
    gw.signal("HUP");
    eventually("SIGHUP to load the fixed key and the deny rule", || async {
        status(&gw, "/account/x", Some(&token)).await == StatusCode::FORBIDDEN
    })
    .await;
    assert_eq!(get(&jwks, &[]).await.status, StatusCode::OK);
}

#[test]
// A non-UTF-8 variable in the environment must not crash the config loader.
fn non_utf8_environment_is_ignored() {
    use std::os::unix::ffi::OsStrExt;
    let f = ConfigFile::new(&config_yaml("http://127.0.0.1:9", CONSOLE, ""));
    let out = Command::new(env!("CARGO_BIN_EXE_stepgate"))
        .args(["check", "-c"])
        .arg(&f.path)
        .env(
            std::ffi::OsStr::from_bytes(b"ODD_\xff"),
            std::ffi::OsStr::from_bytes(b"\xfe"),
        )
        .env("ODD_VALUE", std::ffi::OsStr::from_bytes(b"\xfe\xfd"))
        .output()
        .expect("run stepgate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
