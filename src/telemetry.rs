//! Logs, metrics and audit events.
//!
//! Logs never carry a token, a cookie, a code or a full contact: request
//! logs name the normalised path (no query) and the outcome; audit events
//! name the subject, channel, rule and client address.

use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;

mod access;
pub use access::{access, AccessLine};
use access::{AccessSink, ACCESS_SINK};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The `log` settings, built by the config loader.
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// Log lines queued between the threads that log and the writer thread.
/// Past this the sink is slower than traffic: further lines are dropped
/// (counted in `stepgate_log_dropped_lines_total`, with a warning) rather
/// than stalling requests.
pub const LOG_QUEUE_LINES: usize = 65_536;

/// How long the writer gathers lines after the first one of a batch
/// before writing them all: one `write(2)` and one thread wake-up per
/// batch, not per line.
const LOG_BATCH_WINDOW: Duration = Duration::from_millis(5);

/// Lines the log writer dropped because its queue was full.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped so far because the sink (stderr) could not keep up.
pub fn dropped_log_lines() -> u64 {
    DROPPED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Keeps the log writer thread alive; dropping it writes what is queued
/// and stops the thread.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    writer: Option<(Arc<LogQueue>, std::thread::JoinHandle<()>)>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some((queue, thread)) = self.writer.take() {
            queue.close();
            let _ = thread.join();
        }
    }
}

/// Formatted lines waiting for the writer thread: one growing buffer that
/// the writer swaps for an empty one and writes whole.
struct LogQueue {
    state: std::sync::Mutex<Pending>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    lines: usize,
    closed: bool,
}

impl LogQueue {
    fn new() -> LogQueue {
        LogQueue {
            state: std::sync::Mutex::new(Pending::default()),
            wake: std::sync::Condvar::new(),
        }
    }

    /// Queue one formatted line (never blocks on the sink).
    fn push(&self, line: &[u8]) {
        self.push_with(|bytes| bytes.extend_from_slice(line));
    }

    /// Queue one line that `write` appends to the queue's buffer (a whole
    /// line, ending in `\n`): no intermediate copy. A full queue drops the
    /// line (counted) without formatting it.
    fn push_with(&self, write: impl FnOnce(&mut Vec<u8>)) {
        let mut p = match self.state.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        if p.lines >= LOG_QUEUE_LINES {
            drop(p);
            DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let first = p.lines == 0;
        write(&mut p.bytes);
        p.lines += 1;
        drop(p);
        // Only the first line of a batch wakes the writer.
        if first {
            self.wake.notify_one();
        }
    }

    fn close(&self) {
        let mut p = match self.state.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        p.closed = true;
        drop(p);
        self.wake.notify_one();
    }

    /// The writer thread: wait for a line, let a batch gather, write it
    /// in one go; until closed and drained.
    fn run(&self, mut sink: impl std::io::Write) {
        let mut spare = Vec::new();
        loop {
            let mut p = match self.state.lock() {
                Ok(p) => p,
                Err(poisoned) => poisoned.into_inner(),
            };
            while p.lines == 0 && !p.closed {
                p = match self.wake.wait(p) {
                    Ok(p) => p,
                    Err(poisoned) => poisoned.into_inner(),
                };
            }
            if p.lines == 0 && p.closed {
                return;
            }
            if !p.closed {
                drop(p);
                std::thread::sleep(LOG_BATCH_WINDOW);
                p = match self.state.lock() {
                    Ok(p) => p,
                    Err(poisoned) => poisoned.into_inner(),
                };
            }
            std::mem::swap(&mut p.bytes, &mut spare);
            p.lines = 0;
            drop(p);
            // A failing sink loses this batch; there is nowhere to say so.
            let _ = sink.write_all(&spare);
            let _ = sink.flush();
            spare.clear();
            // Do not keep a burst's memory for good.
            if spare.capacity() > 4 << 20 {
                spare = Vec::new();
            }
        }
    }
}

/// The `MakeWriter` of the log subscriber: each event's line is written
/// in one `write_all`, which queues it.
#[derive(Clone)]
struct QueueWriter(Arc<LogQueue>);

impl std::io::Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.push(buf);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueueWriter {
    type Writer = QueueWriter;

    fn make_writer(&'a self) -> QueueWriter {
        self.clone()
    }
}

/// Install the global tracing subscriber. `RUST_LOG` overrides the level.
///
/// Lines are formatted on the thread that logs and appended to one queue
/// ([`LOG_QUEUE_LINES`] lines at most); one writer thread takes everything
/// queued every few milliseconds and writes it with one `write(2)`. A
/// request never waits for stderr: when the queue is full the line is
/// dropped and counted. Keep the returned guard until exit so queued
/// lines are written.
pub fn init_logging(log: &LogSettings) -> LogGuard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let queue = Arc::new(LogQueue::new());
    let writer = QueueWriter(queue.clone());
    // Colours only for a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    // A second init (tests, `demo`) keeps the first subscriber.
    let installed = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if installed.is_err() {
        return LogGuard { writer: None };
    }
    // The access line's own formatter writes exactly what the subscriber
    // would (without colours; with them, the subscriber formats it).
    if !std::io::stderr().is_terminal() {
        let _ = ACCESS_SINK.set(AccessSink {
            queue: queue.clone(),
            format: log.format,
        });
    }
    let worker = queue.clone();
    let thread = match std::thread::Builder::new()
        .name("stepgate-log".into())
        .spawn(move || worker.run(std::io::stderr()))
    {
        Ok(t) => t,
        Err(e) => {
            // No writer thread: lines would only pile up; say so once.
            eprintln!("stepgate: cannot start the log writer thread: {e}");
            return LogGuard { writer: None };
        }
    };
    // Say so when lines were lost (the warning itself goes through the
    // queue, so it arrives once the sink catches up).
    let _ = std::thread::Builder::new()
        .name("stepgate-logwatch".into())
        .spawn(|| {
            let mut reported = 0;
            loop {
                std::thread::sleep(Duration::from_secs(10));
                let dropped = dropped_log_lines();
                if dropped > reported {
                    tracing::warn!(
                        dropped = dropped - reported,
                        total = dropped,
                        "log lines dropped: the log sink is slower than traffic"
                    );
                    reported = dropped;
                }
            }
        });
    LogGuard {
        writer: Some((queue, thread)),
    }
}

/// What happened to a request, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Forwarded,
    Denied,
    Unauthenticated,
    Challenged,
    BadRequest,
    UpstreamError,
    Gateway,
    StoreUnavailable,
    /// The identity provider's keys have not arrived yet.
    IdentityUnavailable,
    /// Forward-auth: the proxy in front may pass the request on.
    Allowed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Denied => "denied",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Challenged => "challenged",
            Outcome::BadRequest => "bad_request",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Gateway => "gateway",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::IdentityUnavailable => "identity_unavailable",
            Outcome::Allowed => "allowed",
        }
    }
}

/// Which way a decision is delivered: stepgate forwards the request itself
/// (proxy), or answers a proxy in front that asked (forward-auth).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Proxy,
    ForwardAuth,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Proxy => "proxy",
            Mode::ForwardAuth => "forward_auth",
        }
    }
}

/// Labels of the request counter. Built per request without allocating:
/// the rule name is shared, the outcome is static.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    rule: RuleLabel,
    outcome: &'static str,
    mode: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RuleLabel(Arc<str>);

impl prometheus_client::encoding::EncodeLabelValue for RuleLabel {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        prometheus_client::encoding::EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    channel: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AuditLabels {
    event: &'static str,
    mode: &'static str,
}

/// Where [`Metrics::request`] finds the counter of a rule, outcome and
/// mode: by the address of the rule name's allocation, which the entry
/// keeps alive (so no other name can take that address while it is
/// cached), hashed with one multiplication instead of `Family`'s SipHash
/// of the labels.
type RequestKey = (usize, u8, u8);

/// Counters by [`RequestKey`], with the name they were made for.
type RequestHandles =
    std::collections::HashMap<RequestKey, (Arc<str>, Counter), BuildHasherDefault<AddrHasher>>;

/// More entries than any policy has rules times outcomes: the cache is
/// then emptied (a reload gives every rule name a new allocation; the
/// counters themselves stay in `Family` and are found again).
const MAX_REQUEST_HANDLES: usize = 4096;

/// A hasher for small integer keys (FxHash's step).
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

/// The gateway's Prometheus metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_handles: std::sync::RwLock<RequestHandles>,
    duration: Histogram,
    audit: Family<AuditLabels, Counter>,
    connections: Gauge<i64, std::sync::atomic::AtomicI64>,
    parked: Gauge<i64, std::sync::atomic::AtomicI64>,
    worker_connections: Family<WorkerLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    reloads: Family<EventLabels, Counter<u64, AtomicU64>>,
    sends_refused: Family<RefusedLabels, Counter>,
    jwks_fetches: Family<ResultLabels, Counter<u64, AtomicU64>>,
    jwks_age: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Unix seconds of the last good key-set fetch (0: none yet).
    jwks_fetched_at: AtomicU64,
    log_dropped: Counter,
    /// Serialises the copy of the dropped-lines count into `log_dropped`.
    log_sync: std::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("stepgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by matched rule, outcome and mode (proxy or forward_auth)",
            requests.clone(),
        );
        let duration = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "request_duration_seconds",
            "Time to the response head, gateway plus upstream",
            duration.clone(),
        );
        let audit = Family::<AuditLabels, Counter>::default();
        registry.register(
            "audit_events",
            "Step-up audit events by kind and mode (proxy or forward_auth)",
            audit.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "open_connections",
            "Open client connections",
            connections.clone(),
        );
        let worker_connections = Family::<WorkerLabels, Gauge>::default();
        registry.register(
            "worker_connections",
            "Open client connections by the serving thread that serves them",
            worker_connections.clone(),
        );
        let parked = Gauge::default();
        registry.register(
            "parked_connections",
            "Open client connections idle between requests, holding no HTTP buffers",
            parked.clone(),
        );
        let reloads = Family::<EventLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Policy reloads by result",
            reloads.clone(),
        );
        let sends_refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "sends_refused",
            "Codes not sent, by channel and reason (locked, cooldown, max_sends, max_sends_per_client, hourly_budget, sms_country)",
            sends_refused.clone(),
        );
        let jwks_fetches = Family::<ResultLabels, Counter>::default();
        registry.register(
            "jwks_fetches",
            "Fetches of the identity provider's key set by result (ok, error)",
            jwks_fetches.clone(),
        );
        let jwks_age = Gauge::default();
        registry.register(
            "jwks_age_seconds",
            "Seconds since the identity provider's key set was last fetched successfully (-1: never)",
            jwks_age.clone(),
        );
        let log_dropped = Counter::default();
        registry.register(
            "log_dropped_lines",
            "Log lines dropped because the log sink was slower than traffic",
            log_dropped.clone(),
        );
        Metrics {
            sends_refused,
            log_dropped,
            log_sync: std::sync::Mutex::new(()),
            registry,
            jwks_fetches,
            jwks_age,
            jwks_fetched_at: AtomicU64::new(0),
            requests,
            request_handles: std::sync::RwLock::new(RequestHandles::default()),
            duration,
            audit,
            connections,
            parked,
            worker_connections,
            reloads,
        }
    }

    pub fn request(&self, rule: &Arc<str>, outcome: Outcome, mode: Mode, elapsed: Duration) {
        let key = (
            Arc::as_ptr(rule).cast::<u8>() as usize,
            outcome as u8,
            mode as u8,
        );
        let cached = {
            let handles = self
                .request_handles
                .read()
                .unwrap_or_else(|p| p.into_inner());
            handles.get(&key).map(|(_, c)| c.inc()).is_some()
        };
        if !cached {
            let counter = self
                .requests
                .get_or_create(&RequestLabels {
                    rule: RuleLabel(rule.clone()),
                    outcome: outcome.as_str(),
                    mode: mode.as_str(),
                })
                .clone();
            counter.inc();
            let mut handles = self
                .request_handles
                .write()
                .unwrap_or_else(|p| p.into_inner());
            if handles.len() >= MAX_REQUEST_HANDLES {
                handles.clear();
            }
            handles.insert(key, (rule.clone(), counter));
        }
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// A client connection is being served, on the current thread.
    pub fn connection_opened(&self) {
        self.connections.inc();
        self.worker_gauge().inc();
    }

    /// A connection [`Metrics::connection_opened`] counted has closed (on
    /// the same thread).
    pub fn connection_closed(&self) {
        self.connections.dec();
        self.worker_gauge().dec();
    }

    fn worker_gauge(&self) -> Gauge<i64, std::sync::atomic::AtomicI64> {
        let worker = crate::worker::index().to_string();
        self.worker_connections
            .get_or_create(&WorkerLabels { worker })
            .clone()
    }

    /// An idle connection gave its HTTP buffers back (`parked: true`) or
    /// is being served again (`false`).
    pub fn connection_parked(&self, parked: bool) {
        if parked {
            self.parked.inc();
        } else {
            self.parked.dec();
        }
    }

    /// A code not sent, and why.
    pub fn send_refused(&self, channel: &'static str, reason: &'static str) {
        self.sends_refused
            .get_or_create(&RefusedLabels { channel, reason })
            .inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&EventLabels {
                event: if ok { "ok" } else { "rejected" }.into(),
            })
            .inc();
    }

    /// A fetch of the identity provider's key set ended.
    pub fn jwks_fetch(&self, ok: bool) {
        self.jwks_fetches
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// The identity provider's key set was fetched successfully at `unix` seconds.
    pub fn jwks_loaded(&self, unix: u64) {
        self.jwks_fetched_at
            .store(unix, std::sync::atomic::Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let at = self
            .jwks_fetched_at
            .load(std::sync::atomic::Ordering::Relaxed);
        if at > 0 {
            let age = crate::token::unix_now().saturating_sub(at);
            self.jwks_age.set(i64::try_from(age).unwrap_or(i64::MAX));
        } else {
            self.jwks_age.set(-1);
        }
        let _sync = self.log_sync.lock();
        let dropped = dropped_log_lines();
        let seen = self.log_dropped.get();
        if dropped > seen {
            self.log_dropped.inc_by(dropped - seen);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn count_event(&self, event: &'static str, mode: Mode) {
        self.audit
            .get_or_create(&AuditLabels {
                event,
                mode: mode.as_str(),
            })
            .inc();
    }
}

/// A step-up audit event. Fields are what an auditor needs, and nothing
/// that would let a reader of the log take over the step-up.
#[derive(Debug, Clone, Copy)]
pub enum AuditEvent {
    ChallengeStarted,
    CodeSent,
    DeliveryFailed,
    VerifyOk,
    VerifyFailed,
    Lockout,
    TokenIssued,
    TokenSpent,
    Logout,
    Refused,
}

impl AuditEvent {
    fn as_str(self) -> &'static str {
        match self {
            AuditEvent::ChallengeStarted => "challenge_started",
            AuditEvent::CodeSent => "code_sent",
            AuditEvent::DeliveryFailed => "delivery_failed",
            AuditEvent::VerifyOk => "verify_ok",
            AuditEvent::VerifyFailed => "verify_failed",
            AuditEvent::Lockout => "lockout",
            AuditEvent::TokenIssued => "token_issued",
            AuditEvent::TokenSpent => "token_spent",
            AuditEvent::Logout => "logout",
            AuditEvent::Refused => "refused",
        }
    }
}

/// Who and where an audit event is about.
pub struct AuditContext<'a> {
    pub subject: &'a str,
    pub channel: Option<&'a str>,
    pub rule: Option<&'a str>,
    pub client: IpAddr,
    /// The request the event belongs to came through forward-auth or not.
    pub mode: Mode,
}

/// Emit an audit event (target `stepgate::audit`) and count it.
pub fn audit(metrics: &Metrics, event: AuditEvent, ctx: &AuditContext<'_>, detail: &str) {
    metrics.count_event(event.as_str(), ctx.mode);
    tracing::info!(
        target: "stepgate::audit",
        event = event.as_str(),
        subject = ctx.subject,
        channel = ctx.channel.unwrap_or("-"),
        rule = ctx.rule.unwrap_or("-"),
        client = %ctx.client,
        mode = ctx.mode.as_str(),
        detail,
        "audit"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(text: &str, rule: &str, outcome: &str) -> Option<u64> {
        let line = format!(
            "stepgate_requests_total{{rule=\"{rule}\",outcome=\"{outcome}\",mode=\"proxy\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|n| n.parse().ok())
    }

    #[test]
    // The request counter by cached handle: each rule and outcome counts on
    // its own, a rule name in a new allocation (a reload) counts on the
    // same series, and emptying the handle cache loses no count.
    fn request_counts_by_rule_and_outcome() {
        let m = Metrics::new();
        let admin: Arc<str> = Arc::from("admin");
        let other: Arc<str> = Arc::from("other");
        let d = Duration::from_millis(1);
        for _ in 0..3 {
            m.request(&admin, Outcome::Forwarded, Mode::Proxy, d);
        }
        m.request(&admin, Outcome::Denied, Mode::Proxy, d);
        m.request(&other, Outcome::Forwarded, Mode::Proxy, d);
        let reloaded: Arc<str> = Arc::from("admin");
        m.request(&reloaded, Outcome::Forwarded, Mode::Proxy, d);
        for i in 0..MAX_REQUEST_HANDLES {
            let name: Arc<str> = Arc::from(format!("r{i}"));
            m.request(&name, Outcome::Forwarded, Mode::Proxy, d);
        }
        m.request(&admin, Outcome::Forwarded, Mode::Proxy, d);
        let text = m.encode();
        assert_eq!(count(&text, "admin", "forwarded"), Some(5), "{text}");
        assert_eq!(count(&text, "admin", "denied"), Some(1));
        assert_eq!(count(&text, "other", "forwarded"), Some(1));
        assert_eq!(count(&text, "r7", "forwarded"), Some(1));
        assert_eq!(count(&text, "other", "denied"), None);
        assert!(m.request_handles.read().map_or(0, |h| h.len()) <= MAX_REQUEST_HANDLES);
    }
}
