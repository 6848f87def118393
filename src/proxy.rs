//! The forwarding service: request sanitising, the upstream URI, hop-by-hop
//! and forwarded headers, streaming bodies both ways, WebSocket upgrades.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use tower::Service;

use crate::assertion::AssertionSettings;

pub use crate::http::{empty, full, Body, BoxError};

/// Headers that describe one connection, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Whether the request asks for a WebSocket upgrade. Only WebSocket is
/// passed through: an upgrade to anything else (notably `h2c`) would let
/// later requests on the connection reach the upstream without passing the
/// policy, so its `Upgrade` header is dropped like any hop-by-hop header.
pub fn wants_upgrade(req_headers: &HeaderMap, version: Version) -> bool {
    version == Version::HTTP_11
        && req_headers
            .get_all(header::UPGRADE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
        && connection_tokens(req_headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The header names the `Connection` headers list (trimmed, as sent).
pub(crate) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether `name` is hop-by-hop in a message whose `Connection` headers
/// list `named` ([`connection_tokens`]): a fixed hop-by-hop name, one the
/// `Connection` header names, or `Upgrade` unless it is kept.
pub(crate) fn is_hop_by_hop(name: &HeaderName, keep_upgrade: bool, named: &[&str]) -> bool {
    if *name == header::UPGRADE {
        return !keep_upgrade;
    }
    HOP_BY_HOP.contains(name) || named.iter().any(|t| t.eq_ignore_ascii_case(name.as_str()))
}

/// Remove hop-by-hop headers, including those the `Connection` header
/// names. Runs before the gateway sets any header of its own, so a client
/// cannot use `Connection` to strip what the gateway adds. One pass over
/// the names present; only those found are removed.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Usually `Connection` lists only `keep-alive`, `close` or a fixed
    // hop-by-hop name: the fixed names present are then found in one pass
    // and removed, without allocating.
    let names_other = connection_tokens(headers).any(|t| {
        !HOP_BY_HOP
            .iter()
            .any(|h| t.eq_ignore_ascii_case(h.as_str()))
            && headers.contains_key(t)
    });
    if !names_other {
        let mut found = 0u16;
        for name in headers.keys() {
            if *name == header::UPGRADE {
                if !keep_upgrade {
                    found |= 1 << HOP_BY_HOP.len();
                }
            } else if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
                found |= 1 << i;
            }
        }
        if found != 0 {
            for (i, name) in HOP_BY_HOP.iter().chain([&header::UPGRADE]).enumerate() {
                if found & (1 << i) != 0 {
                    headers.remove(name);
                }
            }
        }
        return;
    }
    let named: Vec<&str> = connection_tokens(headers).collect();
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n, keep_upgrade, &named))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Facts about the client connection the forwarded headers describe.
/// Whether the peer is a trusted proxy is not among them: that is decided
/// per request from the current config, so a reload that removes a proxy
/// takes effect on its open keep-alive connections too.
#[derive(Debug, Clone, Copy)]
pub struct ClientConn {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Set `X-Forwarded-For/Proto/Host`. A trusted proxy's chain is extended;
/// anyone else's claims are replaced (and `Forwarded` dropped), as we
/// cannot vouch for them.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    conn: &ClientConn,
    trusted_proxy: bool,
    host: Option<&str>,
) {
    let proto = HeaderValue::from_static(if conn.tls { "https" } else { "http" });
    if trusted_proxy {
        let peer_ip = conn.peer.ip().to_string();
        let prior: Vec<String> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect();
        let mut xff = prior.join(", ");
        if !xff.is_empty() {
            xff.push_str(", ");
        }
        xff.push_str(&peer_ip);
        set(headers, X_FORWARDED_FOR, &xff);
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, proto);
        }
        if !headers.contains_key(&X_FORWARDED_HOST) {
            if let Some(h) = host {
                set(headers, X_FORWARDED_HOST, h);
            }
        }
    } else {
        headers.remove(&FORWARDED);
        headers.insert(X_FORWARDED_FOR, ip_value(conn.peer.ip()));
        headers.insert(X_FORWARDED_PROTO, proto);
        // The client's own is replaced, or removed when there is no host
        // (or it is not a valid value). Usually the host is the client's
        // `Host` header, whose value is shared rather than copied.
        let value = host.and_then(|h| match headers.get(header::HOST) {
            Some(v) if v.as_bytes() == h.as_bytes() => Some(v.clone()),
            _ => HeaderValue::from_str(h).ok(),
        });
        match value {
            Some(v) => {
                headers.insert(X_FORWARDED_HOST, v);
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
}

/// An IP address as a header value (IPv4 digits written directly).
fn ip_value(ip: std::net::IpAddr) -> HeaderValue {
    let std::net::IpAddr::V4(v4) = ip else {
        // Digits, ':' and '.' only: always a valid value.
        return HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static(""));
    };
    let mut buf = [0u8; 15];
    let mut n = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    HeaderValue::from_bytes(&buf[..n]).unwrap_or(HeaderValue::from_static(""))
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("upstream unreachable: {0}")]
    Connect(String),
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("upstream failed: {0}")]
    Upstream(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// The `upstream` settings, built by the config loader.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Scheme and authority of the upstream; its path (if any) is a prefix.
    pub url: Uri,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Extra CA certificates (PEM) trusted for an https upstream.
    pub ca_file: Option<std::path::PathBuf>,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// A signed assertion for the app on every request with an identity.
    pub assertion: Option<AssertionSettings>,
}

/// Forwards requests to the one upstream over pooled connections.
///
/// The pool is ours rather than hyper-util's legacy `Client`: one upstream
/// needs no per-host map (whose key the legacy pool hashed four times per
/// request), and a connection goes back to the pool when its response body
/// ends, from the task that read it, instead of from a task spawned per
/// request to wait for it.
pub struct Proxy {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`, what the connector dials.
    dial: Uri,
    /// The upstream's authority, the `Host` of a request that has none.
    host: HeaderValue,
    pool: Arc<Pool>,
    /// The upstream URL's path without its trailing slash ("" for none).
    base_path: String,
    timeout: Duration,
}

impl Proxy {
    /// `ca` holds the certificates of `upstream.ca_file`, as the config's
    /// build step loaded them; `threads` is the number of serving threads
    /// (`listen.workers` as the server started them), each of which gets
    /// its own share of the pool.
    pub fn new(
        cfg: &Settings,
        ca: &[CertificateDer<'static>],
        threads: usize,
    ) -> Result<Proxy, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = upstream_tls(ca)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let authority = cfg
            .url
            .authority()
            .cloned()
            .ok_or_else(|| "upstream URL has no host".to_string())?;
        let scheme = cfg.url.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP);
        let dial = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| format!("upstream URL: {e}"))?;
        // As hyper-util set it: the host, and the port unless it is the
        // scheme's default.
        let default_port = if scheme == http::uri::Scheme::HTTPS {
            443
        } else {
            80
        };
        let host = match authority.port_u16() {
            Some(p) if p != default_port => format!("{}:{p}", authority.host()),
            _ => authority.host().to_string(),
        };
        let host = HeaderValue::from_str(&host).map_err(|e| format!("upstream host: {e}"))?;
        let base_path = cfg.url.path().trim_end_matches('/').to_string();
        Ok(Proxy {
            connector,
            dial,
            host,
            pool: Arc::new(Pool {
                // One per serving thread, and one for any other thread.
                shards: (0..=threads).map(|_| Mutex::new(Vec::new())).collect(),
                max_idle: cfg.pool_max_idle_per_host,
                idle_timeout: cfg.pool_idle_timeout,
                reaper: std::sync::Once::new(),
            }),
            base_path,
            timeout: cfg.timeout,
        })
    }

    /// The serving threads the pool has a shard for.
    pub fn threads(&self) -> usize {
        self.pool.shards.len() - 1
    }

    /// The upstream request target (origin form: the upstream's path
    /// prefix, the normalised path, the raw query).
    pub fn upstream_uri(&self, path: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
        let mut pq = String::with_capacity(
            self.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        pq.push_str(&self.base_path);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        let pq = PathAndQuery::try_from(pq).map_err(|e| ProxyError::Upstream(e.to_string()))?;
        Ok(Uri::from(pq))
    }

    /// Send a prepared request (headers already sanitised) upstream and
    /// return the response with hop-by-hop headers removed. For an upgrade
    /// request, splices the two upgraded connections together.
    pub async fn forward(
        &self,
        mut req: Request<Body>,
        uri: Uri,
        upgrade: bool,
    ) -> Result<Response<Body>, ProxyError> {
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        if upgrade {
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        req.headers_mut()
            .entry(header::HOST)
            .or_insert_with(|| self.host.clone());
        // `timeout` runs from the last request body progress, not from the
        // start: a large upload that keeps moving is never cut off, an
        // upstream that stops answering is (like nginx's proxy timeouts).
        // A request without a body (most are) makes no progress to track:
        // its body is sent as it is, without a wrapper and its allocations.
        let start = tokio::time::Instant::now();
        let progress = (!http_body::Body::is_end_stream(req.body())).then(|| Progress::new(start));
        let req = match &progress {
            None => req,
            Some(progress) => req.map(|b| {
                ProgressBody {
                    inner: b,
                    progress: progress.clone(),
                }
                .boxed()
            }),
        };
        let (res, conn) = self.send(req, start, progress.as_ref()).await?;
        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            // A 101 nobody asked for would hand the client's connection to
            // the upstream's protocol, past the policy: refuse it.
            return match client_upgrade {
                Some(client_upgrade) => Ok(splice_upgrade(res, client_upgrade, conn)),
                None => Err(ProxyError::Upstream(
                    "101 Switching Protocols without an upgrade request".into(),
                )),
            };
        }
        let (mut parts, body) = res.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        // The client's protocol is ours, not the upstream's (an HTTP/1.0
        // upstream must not turn our answer into an HTTP/1.0 one).
        parts.version = Version::HTTP_11;
        let body = PooledBody {
            inner: body,
            conn: Some(conn),
            pool: self.pool.clone(),
        };
        Ok(Response::from_parts(parts, body.boxed()))
    }

    /// Send on an idle pooled connection, or a new one, within `timeout`
    /// of the request's start or its body's last progress. A request
    /// that was never written (the connection closed while idle in the
    /// pool) is sent again on another connection, as hyper-util's client
    /// did; one that may have reached the upstream never is.
    async fn send(
        &self,
        mut req: Request<Body>,
        start: tokio::time::Instant,
        progress: Option<&Progress>,
    ) -> Result<(Response<Incoming>, Pooled), ProxyError> {
        let deadline =
            || start + Duration::from_millis(progress.map_or(0, Progress::last)) + self.timeout;
        loop {
            let (mut conn, reused) = match self.pool.checkout() {
                Some(conn) => (conn, true),
                // Boxed: a new connection is the rare case, and its future
                // (connector, TLS, handshake) is most of this one's size.
                None => match Box::pin(tokio::time::timeout_at(deadline(), self.connect())).await {
                    Ok(conn) => (conn?, false),
                    Err(_) => return Err(ProxyError::Timeout(self.timeout)),
                },
            };
            let Pooled { send, timer, .. } = &mut conn;
            // A pooled connection may still be finishing its last exchange
            // (its body was read to the end, the connection task has yet to
            // see it); one that has closed meanwhile was never sent on.
            if reused {
                let ready = std::future::poll_fn(|cx| send.poll_ready(cx));
                if within(timer, deadline, self.timeout, ready).await?.is_err() {
                    continue;
                }
            }
            match within(timer, deadline, self.timeout, send.try_send_request(req)).await? {
                Ok(res) => return Ok((res, conn)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(ProxyError::Upstream(error_chain(&e.into_error()))),
                },
            }
        }
    }

    /// A new HTTP/1.1 connection (TLS for an `https` upstream), its
    /// connection task spawned on the current thread's runtime.
    async fn connect(&self) -> Result<Pooled, ProxyError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|e| ProxyError::Connect(error_chain(&*e)))?;
        let io = connector
            .call(self.dial.clone())
            .await
            .map_err(|e| ProxyError::Connect(error_chain(&*e)))?;
        let (conn, task) = http1::Builder::new()
            .writev(false)
            .handshake(io)
            .await
            .map_err(|e| ProxyError::Connect(error_chain(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = task.with_upgrades().await {
                tracing::debug!(error = %error_chain(&e), "upstream connection failed");
            }
        });
        Ok(Pooled {
            send: conn,
            home: self.pool.shard(),
            timer: Box::pin(tokio::time::sleep(self.timeout)),
        })
    }
}

/// An upstream connection, the pool shard of the thread whose runtime
/// drives it (where it goes back when idle), and its timer for the
/// upstream timeout.
struct Pooled {
    send: SendRequest<Body>,
    home: usize,
    /// Bounds each exchange on this connection ([`within`]). One timer
    /// per connection, moved on for each request, rather than one made
    /// per request: a new timer is registered with the runtime's timer
    /// wheel when first polled and unregistered when dropped, both under
    /// its lock, where moving a registered one later is an atomic store.
    timer: Pin<Box<tokio::time::Sleep>>,
}

/// Wait for `fut`, but not past `deadline()` (which a request body's
/// progress moves on), on the connection's `timer`.
async fn within<T>(
    timer: &mut Pin<Box<tokio::time::Sleep>>,
    deadline: impl Fn() -> tokio::time::Instant,
    timeout: Duration,
    fut: impl Future<Output = T>,
) -> Result<T, ProxyError> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        loop {
            let at = deadline();
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            match timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                // Progress since the timer was set moved the deadline on.
                Poll::Ready(()) if deadline() != at => continue,
                Poll::Ready(()) => return Poll::Ready(Err(ProxyError::Timeout(timeout))),
            }
        }
    })
    .await
}

/// Idle upstream connections, the most recently used last, one shard per
/// serving thread (`worker.rs`): a connection is driven by the runtime of
/// the thread that opened it and only ever reused by requests on that
/// thread, so none of them wakes another thread (as nginx keeps its
/// upstream keep-alive connections per worker process).
struct Pool {
    shards: Box<[Mutex<Vec<Idle>>]>,
    /// At most this many idle connections per shard.
    max_idle: usize,
    idle_timeout: Duration,
    /// Starts the task that closes expired connections, once.
    reaper: std::sync::Once,
}

struct Idle {
    conn: Pooled,
    since: Instant,
}

impl Pool {
    /// The current thread's shard.
    fn shard(&self) -> usize {
        crate::worker::index() % self.shards.len()
    }

    /// An idle connection of the current thread's shard. Never one of
    /// another thread's: its runtime would then be woken for every read
    /// and write of this request (a new connection is cheaper over time).
    fn checkout(&self) -> Option<Pooled> {
        let mut idle = self.shards[self.shard()]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while let Some(e) = idle.pop() {
            if !e.conn.send.is_closed() && e.since.elapsed() < self.idle_timeout {
                return Some(e.conn);
            }
        }
        None
    }

    /// Keep a connection whose exchange has ended, unless the pool is full
    /// (it is then dropped, which closes it).
    fn checkin(self: &Arc<Self>, mut conn: Pooled) {
        if conn.send.is_closed() || self.max_idle == 0 {
            return;
        }
        if !conn.send.is_ready() {
            // Its connection task has not yet seen the exchange end (or a
            // request body is still going up): pool it once it is ready,
            // so a checkout never waits on someone else's exchange.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let pool = self.clone();
                rt.spawn(async move {
                    if conn.send.ready().await.is_ok() {
                        pool.checkin(conn);
                    }
                });
            }
            return;
        }
        {
            let shard = conn.home % self.shards.len();
            let mut idle = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() >= self.max_idle {
                return;
            }
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
        self.reaper.call_once(|| {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(reap(Arc::downgrade(self)));
            }
        });
    }
}

/// Close connections idle for longer than the timeout (or closed by the
/// upstream), until the pool is gone.
async fn reap(pool: Weak<Pool>) {
    let every = match pool.upgrade() {
        Some(p) => p.idle_timeout.max(Duration::from_millis(100)),
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        for shard in pool.shards.iter() {
            let expired: Vec<Idle> = {
                let mut idle = shard.lock().unwrap_or_else(|p| p.into_inner());
                let (keep, expired) = std::mem::take(&mut *idle).into_iter().partition(|e| {
                    !e.conn.send.is_closed() && e.since.elapsed() < pool.idle_timeout
                });
                *idle = keep;
                expired
            };
            drop(expired);
        }
    }
}

/// An upstream response body that returns its connection to the pool once
/// it has been read to the end. A body dropped before its end, or that
/// failed, takes its connection with it (hyper closes it).
struct PooledBody {
    inner: Incoming,
    conn: Option<Pooled>,
    pool: Arc<Pool>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(conn);
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            std::task::Poll::Ready(None) => self.release(),
            std::task::Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        poll.map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // hyper's server stops polling a body that says it has ended.
        if http_body::Body::is_end_stream(&self.inner) {
            self.release();
        }
    }
}

/// When a request body last made progress, in milliseconds since a base
/// (the start of the exchange).
#[derive(Clone)]
struct Progress {
    base: tokio::time::Instant,
    last_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Progress {
    fn new(base: tokio::time::Instant) -> Progress {
        Progress {
            base,
            last_ms: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn last(&self) -> u64 {
        self.last_ms.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A request body that records each frame it hands to the upstream.
struct ProgressBody {
    inner: Body,
    progress: Progress,
}

impl http_body::Body for ProgressBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(_))) = &poll {
            self.progress.touch();
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Answer 101 to the client and copy bytes between the two upgraded
/// connections until either side closes.
fn splice_upgrade(
    mut res: Response<Incoming>,
    client: hyper::upgrade::OnUpgrade,
    conn: Pooled,
) -> Response<Body> {
    let upstream = hyper::upgrade::on(&mut res);
    tokio::spawn(async move {
        // The connection is the tunnel's now, never pooled again; its
        // sender is kept until both sides have upgraded.
        let _conn = conn;
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let mut c = TokioIo::new(c);
                let mut u = TokioIo::new(u);
                let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    let (parts, _) = res.into_parts();
    Response::from_parts(parts, empty())
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// The CA certificates of a PEM file, checked as rustls will take them.
/// Blocking (reads the file); the config's build step calls it, once per
/// load, and the clients get what it read.
pub fn ca_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in &certs {
        roots
            .add(c.clone())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(certs)
}

/// rustls client config for an https upstream (or the identity provider):
/// system roots plus the certificates of a CA file ([`ca_certs`]).
pub(crate) fn upstream_tls(ca: &[CertificateDer<'static>]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    for cert in ca {
        roots.add(cert.clone()).map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request's future holds the upstream exchange's; dialling a
    /// new connection (connector, TLS, handshake) is boxed, so it does
    /// not make each of them as large as the rare dial (#8: a request's
    /// future was 7 KB, copied whole into its allocation).
    #[test]
    fn the_exchange_future_does_not_carry_the_dial() {
        let settings = Settings {
            url: Uri::from_static("http://127.0.0.1:9"),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            ca_file: None,
            pool_idle_timeout: Duration::from_secs(1),
            pool_max_idle_per_host: 1,
            assertion: None,
        };
        let proxy = Proxy::new(&settings, &[], 1).expect("proxy");
        let send = proxy.send(Request::new(empty()), tokio::time::Instant::now(), None);
        let dial = proxy.connect();
        let (send, dial) = (std::mem::size_of_val(&send), std::mem::size_of_val(&dial));
        assert!(send < dial, "exchange future {send} bytes, dial {dial}");
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                h.append(k, v);
            }
        }
        h
    }

    #[test]
    // Headers named in Connection are hop-by-hop too.
    fn connection_named_headers_are_removed() {
        let mut h = headers(&[
            ("connection", "close, x-foo"),
            ("x-foo", "1"),
            ("te", "trailers"),
            ("x-bar", "2"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-foo").is_none());
        assert!(h.get("te").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h.get("x-bar").and_then(|v| v.to_str().ok()), Some("2"));
    }

    #[test]
    // The usual message, whose Connection lists only fixed names: those
    // present go (Upgrade unless kept), everything else stays.
    fn fixed_hop_by_hop_names_are_removed() {
        let h = headers(&[
            ("connection", "Keep-Alive, TE"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("content-type", "text/plain"),
            ("x-bar", "2"),
        ]);
        let left = |keep_upgrade| {
            let mut h = h.clone();
            strip_hop_by_hop(&mut h, keep_upgrade);
            let mut names: Vec<String> = h.keys().map(|n| n.to_string()).collect();
            names.sort();
            names
        };
        assert_eq!(left(false), ["content-type", "x-bar"]);
        assert_eq!(left(true), ["content-type", "upgrade", "x-bar"]);
    }

    #[test]
    // An untrusted client cannot forge X-Forwarded-For.
    fn forwarded_replaced_for_untrusted_peer() {
        let mut h = headers(&[("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6")]);
        let conn = ClientConn {
            peer: SocketAddr::from(([127, 0, 0, 9], 1234)),
            tls: true,
        };
        set_forwarded(&mut h, &conn, false, Some("app.example.com"));
        assert_eq!(
            h.get("x-forwarded-for").and_then(|v| v.to_str().ok()),
            Some("127.0.0.9")
        );
        assert_eq!(
            h.get("x-forwarded-proto").and_then(|v| v.to_str().ok()),
            Some("https")
        );
        assert_eq!(
            h.get("x-forwarded-host").and_then(|v| v.to_str().ok()),
            Some("app.example.com")
        );
        assert!(h.get("forwarded").is_none());
    }

    #[test]
    // The peer address is written exactly as Display writes it.
    fn ip_values_are_the_display_form() {
        let mut ips: Vec<std::net::IpAddr> = [0u8, 1, 9, 10, 99, 100, 199, 200, 255]
            .iter()
            .flat_map(|&a| {
                [
                    [a, 0, 7, 255],
                    [255, a, 10, 1],
                    [1, 2, a, 100],
                    [9, 99, 199, a],
                ]
            })
            .map(std::net::IpAddr::from)
            .collect();
        ips.push("::1".parse().expect("v6"));
        ips.push("2001:db8::8a2e:370:7334".parse().expect("v6"));
        ips.push("::ffff:1.2.3.4".parse().expect("v6"));
        for ip in ips {
            assert_eq!(ip_value(ip).to_str().ok(), Some(ip.to_string().as_str()));
        }
    }

    #[test]
    // An untrusted client's X-Forwarded-Host never survives: replaced by
    // the host, or removed when there is none (or it is not a valid value).
    fn untrusted_forwarded_host_is_replaced_or_removed() {
        let conn = ClientConn {
            peer: SocketAddr::from(([127, 0, 0, 9], 1234)),
            tls: false,
        };
        for host in [None, Some("bad\nhost")] {
            let mut h = headers(&[("x-forwarded-host", "evil.example")]);
            set_forwarded(&mut h, &conn, false, host);
            assert!(h.get("x-forwarded-host").is_none(), "{host:?}");
            assert_eq!(
                h.get("x-forwarded-proto").and_then(|v| v.to_str().ok()),
                Some("http")
            );
        }
    }

    #[test]
    // A trusted proxy's chain is extended, not replaced.
    fn forwarded_extended_for_trusted_peer() {
        let mut h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        let conn = ClientConn {
            peer: SocketAddr::from(([10, 0, 0, 1], 1234)),
            tls: false,
        };
        set_forwarded(&mut h, &conn, true, None);
        assert_eq!(
            h.get("x-forwarded-for").and_then(|v| v.to_str().ok()),
            Some("1.2.3.4, 10.0.0.1")
        );
    }
}
