//! The access log line (`stepgate::access`), one per request.
//!
//! It is written by hand straight into the log queue's buffer rather than
//! through `tracing-subscriber`'s formatter (about 14,800 instructions a
//! line there), but it is the same line, byte for byte, in both formats
//! (the tests compare the two). When the subscriber is not the one
//! [`init_logging`](super::init_logging) installed without colours, the
//! line goes through `tracing` as before.
//!
//! Values from the request cannot forge a line or a field: in text, the
//! path and method are written as they are only when every byte is a
//! visible ASCII character (always, for a normalised path and a method
//! hyper accepted), any other byte as `\xNN`; control characters in the
//! rule name (from the config) likewise. In JSON every string is escaped
//! by `serde_json`, as the subscriber does.

use std::io::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use super::{LogFormat, LogQueue};

/// Where the hand-written access lines go: set once by `init_logging`.
pub(super) static ACCESS_SINK: OnceLock<AccessSink> = OnceLock::new();

pub(super) struct AccessSink {
    pub(super) queue: Arc<LogQueue>,
    pub(super) format: LogFormat,
}

/// One request, as the access log tells it.
#[derive(Debug, Clone, Copy)]
pub struct AccessLine<'a> {
    pub client: IpAddr,
    pub method: &'a str,
    /// The normalised path (no query).
    pub path: &'a str,
    pub status: u16,
    pub rule: &'a str,
    pub outcome: &'static str,
    pub mode: &'static str,
    pub ms: f64,
}

/// Log one request (target `stepgate::access`, level INFO), if that
/// target is enabled.
pub fn access(line: &AccessLine<'_>) {
    if !tracing::enabled!(target: "stepgate::access", tracing::Level::INFO) {
        return;
    }
    match ACCESS_SINK.get() {
        Some(sink) => sink
            .queue
            .push_with(|buf| write_line(buf, sink.format, SystemTime::now(), line)),
        None => via_tracing(line),
    }
}

/// The same line through `tracing` (colours, another subscriber).
fn via_tracing(line: &AccessLine<'_>) {
    tracing::info!(
        target: "stepgate::access",
        client = %line.client,
        method = %line.method,
        path = %line.path,
        status = line.status,
        rule = %line.rule,
        outcome = line.outcome,
        mode = line.mode,
        ms = line.ms,
        "request"
    );
}

/// Append the whole line, `\n` included.
fn write_line(buf: &mut Vec<u8>, format: LogFormat, now: SystemTime, l: &AccessLine<'_>) {
    match format {
        LogFormat::Text => {
            write_timestamp(buf, now);
            buf.extend_from_slice(b"  INFO stepgate::access: request client=");
            write_ip(buf, l.client);
            buf.extend_from_slice(b" method=");
            write_visible(buf, l.method);
            buf.extend_from_slice(b" path=");
            write_visible(buf, l.path);
            buf.extend_from_slice(b" status=");
            write_u64(buf, u64::from(l.status));
            buf.extend_from_slice(b" rule=");
            write_no_controls(buf, l.rule);
            buf.extend_from_slice(b" outcome=");
            write_debug_str(buf, l.outcome);
            buf.extend_from_slice(b" mode=");
            write_debug_str(buf, l.mode);
            buf.extend_from_slice(b" ms=");
            write_debug_f64(buf, l.ms);
            buf.push(b'\n');
        }
        LogFormat::Json => {
            buf.extend_from_slice(b"{\"timestamp\":\"");
            write_timestamp(buf, now);
            buf.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\",\"client\":\"");
            write_ip(buf, l.client);
            buf.extend_from_slice(b"\",\"method\":");
            json_str(buf, l.method);
            buf.extend_from_slice(b",\"path\":");
            json_str(buf, l.path);
            buf.extend_from_slice(b",\"status\":");
            write_u64(buf, u64::from(l.status));
            buf.extend_from_slice(b",\"rule\":");
            json_str(buf, l.rule);
            buf.extend_from_slice(b",\"outcome\":");
            json_str(buf, l.outcome);
            buf.extend_from_slice(b",\"mode\":");
            json_str(buf, l.mode);
            buf.extend_from_slice(b",\"ms\":");
            // serde_json, as the subscriber: shortest round-trip digits,
            // `null` for a non-finite value.
            let _ = serde_json::to_writer(&mut *buf, &l.ms);
            buf.extend_from_slice(b",\"target\":\"stepgate::access\"}\n");
        }
    }
}

/// A `&str` field as the subscriber writes it in text: with `Debug`
/// (quoted, escaped). The outcome and mode names need no escaping.
fn write_debug_str(buf: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        let _ = write!(buf, "{s:?}");
    }
}

/// An `f64` field as `Debug` writes it: the shortest digits that read
/// back as the same number. In [1e-4, 1e15) `Debug` and `serde_json`
/// (ryu) write the same plain decimal (`3.0`, `0.0125`, `121.761011`);
/// outside it, `Debug` itself.
fn write_debug_f64(buf: &mut Vec<u8>, v: f64) {
    if (1e-4..1e15).contains(&v) {
        let _ = serde_json::to_writer(&mut *buf, &v);
    } else {
        let _ = write!(buf, "{v:?}");
    }
}

fn json_str(buf: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// A value from the request: visible ASCII as it is, any other byte
/// (space, control, non-ASCII) as `\xNN`, so it stays one field.
fn write_visible(buf: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    if b.iter().all(|c| matches!(c, 0x21..=0x7e)) {
        buf.extend_from_slice(b);
        return;
    }
    for &c in b {
        if matches!(c, 0x21..=0x7e) {
            buf.push(c);
        } else {
            hex_escape(buf, c);
        }
    }
}

/// A value from the config: as it is, but a control character as `\xNN`
/// (it could end the line).
fn write_no_controls(buf: &mut Vec<u8>, s: &str) {
    for &c in s.as_bytes() {
        if c < 0x20 || c == 0x7f {
            hex_escape(buf, c);
        } else {
            buf.push(c);
        }
    }
}

fn hex_escape(buf: &mut Vec<u8>, c: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.extend_from_slice(&[
        b'\\',
        b'x',
        HEX[usize::from(c >> 4)],
        HEX[usize::from(c & 0xf)],
    ]);
}

fn write_ip(buf: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            write_u64(buf, u64::from(a));
            buf.push(b'.');
            write_u64(buf, u64::from(b));
            buf.push(b'.');
            write_u64(buf, u64::from(c));
            buf.push(b'.');
            write_u64(buf, u64::from(d));
        }
        IpAddr::V6(_) => {
            let _ = write!(buf, "{ip}");
        }
    }
}

fn write_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        // n % 10 < 10: the cast cannot truncate.
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// `n` in exactly `width` digits (zero-padded; `n` fits).
fn write_padded(buf: &mut Vec<u8>, mut n: u64, width: usize) {
    let start = buf.len();
    buf.resize(start + width, b'0');
    for slot in buf[start..].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// `2026-12-04T03:37:40.123456Z`, as `tracing-subscriber`'s `SystemTime`
/// timer writes it (UTC, microseconds).
fn write_timestamp(buf: &mut Vec<u8>, now: SystemTime) {
    let Ok(d) = now.duration_since(SystemTime::UNIX_EPOCH) else {
        buf.extend_from_slice(b"<unknown time>");
        return;
    };
    let secs = d.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    if year > 9999 {
        buf.extend_from_slice(b"<unknown time>");
        return;
    }
    let rem = secs % 86_400;
    write_padded(buf, year, 4);
    buf.push(b'-');
    write_padded(buf, month, 2);
    buf.push(b'-');
    write_padded(buf, day, 2);
    buf.push(b'T');
    write_padded(buf, rem / 3600, 2);
    buf.push(b':');
    write_padded(buf, rem / 60 % 60, 2);
    buf.push(b':');
    write_padded(buf, rem % 60, 2);
    buf.push(b'.');
    write_padded(buf, u64::from(d.subsec_micros()), 6);
    buf.push(b'Z');
}

/// (year, month, day) of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`, for days >= 0).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    /// Captures what a `tracing-subscriber` writes.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    /// The line `tracing-subscriber` writes for `l`, configured as
    /// `init_logging` configures it (without colours).
    fn subscriber_line(format: LogFormat, l: &AccessLine<'_>) -> String {
        let out = Capture::default();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(out.clone());
        match format {
            LogFormat::Text => {
                tracing::subscriber::with_default(builder.finish(), || via_tracing(l));
            }
            LogFormat::Json => {
                let sub = builder.json().flatten_event(true).finish();
                tracing::subscriber::with_default(sub, || via_tracing(l));
            }
        }
        let bytes = out.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8(bytes).expect("utf-8 line")
    }

    fn own_line(format: LogFormat, now: SystemTime, l: &AccessLine<'_>) -> String {
        let mut buf = Vec::new();
        write_line(&mut buf, format, now, l);
        String::from_utf8(buf).expect("utf-8 line")
    }

    /// The line without its timestamp (the two are written at different
    /// instants).
    fn untimed(format: LogFormat, line: &str) -> String {
        match format {
            LogFormat::Text => line.split_once(' ').map(|(_, r)| r.to_string()),
            LogFormat::Json => line
                .split_once("\",\"level\"")
                .map(|(_, r)| format!("{{\"timestamp\":\"\",\"level\"{r}")),
        }
        .unwrap_or_default()
    }

    fn sample<'a>(path: &'a str, method: &'a str, rule: &'a str, ms: f64) -> AccessLine<'a> {
        AccessLine {
            client: IpAddr::from([127, 0, 0, 1]),
            method,
            path,
            status: 200,
            rule,
            outcome: "forwarded",
            mode: "proxy",
            ms,
        }
    }

    #[test]
    // The hand-written line is the subscriber's line, field for field and
    // byte for byte, for every kind of value a request can give (a
    // normalised path is visible ASCII, `"` included).
    fn the_access_line_is_the_subscribers_line() {
        let v6 = IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]);
        let cases = [
            sample("/admin/x", "GET", "admin", 0.123_456_7),
            sample("/", "POST", "-", 12.5),
            sample("/a%20b/%22q%22/\"x\"/=/{}", "M-SEARCH", "stepgate", 3.0),
            sample("<invalid>", "DELETE", "rule with spaces", 1_234.567_890_1),
            AccessLine {
                client: v6,
                status: 502,
                outcome: "upstream_error",
                mode: "forward_auth",
                ..sample("/x", "PUT", "r", 0.000_9)
            },
            AccessLine {
                client: IpAddr::from([10, 200, 3, 45]),
                status: 101,
                ..sample("/ws", "GET", "ws", 10_000.0)
            },
        ];
        let mut cases = cases.to_vec();
        for ms in [
            0.0001,
            0.000_123_4,
            0.001,
            0.01,
            0.1,
            1.0,
            1.5,
            99.999_999_999,
            1e3,
            1e6,
            1e14,
            9.99e14,
            1e15,
            1e16,
            1e-5,
            0.0,
            123.456_789_012_345_67,
            7.0e-3,
            2.5e-4,
        ] {
            cases.push(sample("/m", "GET", "-", ms));
        }
        for outcome in [
            "forwarded",
            "denied",
            "unauthenticated",
            "challenged",
            "bad_request",
            "upstream_error",
            "gateway",
            "store_unavailable",
            "identity_unavailable",
            "allowed",
            "a \"quoted\" one",
        ] {
            cases.push(AccessLine {
                outcome,
                ..sample("/o", "GET", "-", 1.0)
            });
        }
        let now = SystemTime::now();
        for format in [LogFormat::Text, LogFormat::Json] {
            for l in &cases {
                let theirs = subscriber_line(format, l);
                let ours = own_line(format, now, l);
                assert_eq!(untimed(format, &ours), untimed(format, &theirs), "{l:?}");
                assert!(ours.ends_with('\n') && ours.matches('\n').count() == 1);
            }
        }
    }

    #[test]
    // The timestamp as the subscriber's timer writes it: UTC, six digits
    // of microseconds, leap days and year ends right.
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |secs: u64, micros: u64| {
            let mut buf = Vec::new();
            write_timestamp(
                &mut buf,
                SystemTime::UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + micros),
            );
            String::from_utf8(buf).expect("ascii")
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_796_355_460, 123_456), "2026-12-04T03:37:40.123456Z");
        assert_eq!(at(4_102_444_799, 999_999), "2099-12-31T23:59:59.999999Z");
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000000Z");
        assert_eq!(at(4_107_542_399, 0), "2100-02-28T23:59:59.000000Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
    }

    #[test]
    // Request values cannot forge a line or a field: in text a control
    // character, space or non-ASCII byte in the path or method is written
    // as \xNN (one line, one field); in JSON the line stays one valid
    // object whose fields read back exactly as given.
    fn untrusted_values_cannot_forge_lines_or_fields() {
        let path = "/a\n2026-01-01T00:00:00.000000Z  INFO stepgate::access: request path=/admin \"x\"\r\t\u{1b}[31m\u{85}é";
        let method = "GET\nX status=200";
        let rule = "r\nule";
        let l = sample(path, method, rule, 1.0);
        let now = SystemTime::now();

        let text = own_line(LogFormat::Text, now, &l);
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(text.ends_with('\n'));
        assert!(
            !text.bytes().any(|b| b < 0x20 && b != b'\n' || b == 0x7f),
            "{text}"
        );
        assert!(text.contains(
            " method=GET\\x0aX\\x20status=200 path=/a\\x0a2026-01-01T00:00:00.000000Z\\x20\\x20INFO\\x20stepgate::access:\\x20request\\x20path=/admin\\x20\"x\"\\x0d\\x09\\x1b[31m\\xc2\\x85\\xc3\\xa9 status=200 rule=r\\x0aule "
        ), "{text}");
        // One field each: exactly the fields of the line, in order.
        let keys: Vec<&str> = text
            .trim_end()
            .split(' ')
            .filter_map(|f| f.split_once('=').map(|(k, _)| k))
            .collect();
        assert_eq!(
            keys,
            ["client", "method", "path", "status", "rule", "outcome", "mode", "ms"]
        );

        let json = own_line(LogFormat::Json, now, &l);
        assert_eq!(json.matches('\n').count(), 1, "{json}");
        assert!(!json.trim_end().bytes().any(|b| b < 0x20), "{json}");
        let v: serde_json::Value = serde_json::from_str(&json).expect("one JSON object");
        assert_eq!(v["path"], path);
        assert_eq!(v["method"], method);
        assert_eq!(v["rule"], rule);
        assert_eq!(v["status"], 200);
        assert_eq!(v["target"], "stepgate::access");
        assert_eq!(v.as_object().map(|o| o.len()), Some(12));
    }
}
