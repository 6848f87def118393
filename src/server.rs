//! Accept loop, TLS termination, HTTP/1.1 + HTTP/2 serving, graceful
//! shutdown. Plain HTTP/1.1 connections give their HTTP buffers back
//! while idle between requests (`park.rs`).

mod park;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::proxy::{Body, BoxError, ClientConn};

/// How long a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP/1.1 connection builder for plain connections (see `park.rs`),
/// with the same limits as [`http_builder`]'s. The header-read timeout is
/// not hyper's here: `park::ParkIo` keeps it on the timer it already has
/// (hyper's would be a new timer per request).
fn http1_builder(cfg: &Config) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.max_buf_size(cfg.listen.max_header_bytes.max(8192))
        .keep_alive(true);
    b
}

/// The HTTP connection builder with the configured limits.
fn http_builder(cfg: &Config) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.listen.header_read_timeout)
        .max_buf_size(cfg.listen.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.listen.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(250);
    b
}

/// Serve the public listener until `shutdown` resolves, then stop
/// accepting, let in-flight requests finish (bounded by the drain timeout)
/// and return.
///
/// Connections are accepted here and each is handed to one of
/// `listen.workers` serving threads (the one serving the fewest), which
/// runs it to its end on its own current-thread runtime: the client
/// connection, its requests and the upstream connections they use never
/// leave that thread, so no request wakes another thread (`worker.rs`).
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let cfg = gateway.config();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        gateway: gateway.clone(),
        // Built by the config's build step (h2 and http/1.1 by ALPN).
        tls: cfg.built.listener_tls.clone().map(TlsAcceptor::from),
        builder: http_builder(&cfg),
        http1: http1_builder(&cfg),
        idle_first_read: cfg.listen.header_read_timeout,
        stopping,
    });
    let mut workers = (1..=cfg.listen.workers.max(1))
        .map(|i| Worker::start(i, shared.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let graceful = GracefulShutdown::new();
    // At most `max_connections` client connections at once: past it the
    // loop stops accepting, so new connections wait in the kernel's listen
    // backlog (and are refused by the kernel once that is full) instead of
    // growing memory without bound.
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.listen.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            res = listener.accept() => match res {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // Off this runtime's poller; the worker registers it with its own.
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let accepted = Accepted {
            stream,
            peer,
            permit,
            watcher: graceful.watcher(),
        };
        let least = workers
            .iter()
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
            .ok_or_else(|| "no serving thread".to_string())?;
        least.open.fetch_add(1, Ordering::Relaxed);
        if least.tx.send(accepted).is_err() {
            least.open.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("a serving thread has stopped");
        }
    }
    drop(listener);
    let _ = stop.send(true);
    tracing::info!("shutting down: draining in-flight requests");
    if tokio::time::timeout(cfg.listen.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
    // The workers stop once nothing more can reach them; what is still
    // open on them is closed as their runtimes end.
    for w in workers.drain(..) {
        drop(w.tx);
        let _ = w.done.await;
    }
    Ok(())
}

/// What every serving thread needs to serve a connection.
struct Shared {
    gateway: Arc<Gateway>,
    tls: Option<TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    http1: hyper::server::conn::http1::Builder,
    /// How long a new connection may take to send its first byte.
    idle_first_read: Duration,
    /// Becomes true when the listener stops accepting.
    stopping: tokio::sync::watch::Receiver<bool>,
}

/// A connection accepted on the listener, on its way to a serving thread.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    /// Its place under `listen.max_connections`, held until it closes.
    permit: tokio::sync::OwnedSemaphorePermit,
    /// Shutdown waits for it while this is held.
    watcher: hyper_util::server::graceful::Watcher,
}

/// One serving thread, as the accept loop sees it.
struct Worker {
    tx: tokio::sync::mpsc::UnboundedSender<Accepted>,
    /// Connections it serves now.
    open: Arc<AtomicUsize>,
    /// Resolves once its runtime has ended.
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Worker {
    /// Start serving thread `i` (1-based). It serves what it is sent until
    /// the sender is dropped, then ends its runtime (closing whatever is
    /// still open on it).
    fn start(i: usize, shared: Arc<Shared>) -> Result<Worker, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start serving thread {i}: {e}"))?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
        let (finished, done) = tokio::sync::oneshot::channel();
        let open = Arc::new(AtomicUsize::new(0));
        let count = open.clone();
        std::thread::Builder::new()
            .name(format!("stepgate-worker-{i}"))
            .spawn(move || {
                crate::worker::enter(i);
                rt.block_on(async move {
                    while let Some(accepted) = rx.recv().await {
                        let shared = shared.clone();
                        let count = count.clone();
                        tokio::spawn(async move {
                            serve_connection(&shared, accepted).await;
                            count.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                });
                // Tasks still running (past the drain timeout) are dropped,
                // which closes their connections.
                rt.shutdown_timeout(Duration::from_secs(1));
                let _ = finished.send(());
            })
            .map_err(|e| format!("cannot start serving thread {i}: {e}"))?;
        Ok(Worker { tx, open, done })
    }
}

/// Serve one accepted connection to its end, on the current serving
/// thread.
async fn serve_connection(shared: &Shared, accepted: Accepted) {
    let Accepted {
        stream,
        peer,
        permit: _permit,
        watcher,
    } = accepted;
    let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
        return;
    };
    let gateway = &shared.gateway;
    let mut stopping = shared.stopping.clone();
    gateway.metrics.connection_opened();
    // A connection that has sent nothing yet holds no HTTP state
    // (hyper allocates its buffers on the first read); the same
    // deadline as for a request head applies, and shutdown ends it.
    let first = tokio::select! {
        r = tokio::time::timeout(shared.idle_first_read, stream.readable()) => matches!(r, Ok(Ok(()))),
        _ = stopping.wait_for(|s| *s) => false,
    };
    if !first {
        gateway.metrics.connection_closed();
        return;
    }
    let conn = ClientConn {
        peer,
        tls: shared.tls.is_some(),
    };
    match &shared.tls {
        Some(acceptor) => {
            let svc = TowerToHyperService::new(GatewayService {
                gateway: gateway.clone(),
                conn,
            });
            Box::pin(serve_tls(
                acceptor.clone(),
                stream,
                peer,
                &shared.builder,
                svc,
                watcher,
            ))
            .await
        }
        None if may_be_h2(&stream).await => {
            // HTTP/2 with prior knowledge (or too little sent to
            // tell): hyper-util's builder tells the two apart.
            let svc = TowerToHyperService::new(GatewayService {
                gateway: gateway.clone(),
                conn,
            });
            // Boxed: hyper-util's connection serves HTTP/1 and
            // HTTP/2 alike and is large; inline, it would make
            // every connection's task (plain and parked ones too)
            // about 700 bytes bigger.
            let fut = shared
                .builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc);
            if let Err(e) = Box::pin(watcher.watch(fut.into_owned())).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        None => {
            // Held, not used: shutdown waits for this connection.
            let _watcher = watcher;
            serve_parking(
                gateway,
                stream,
                conn,
                &shared.http1,
                shared.idle_first_read,
                stopping,
            )
            .await
        }
    }
    gateway.metrics.connection_closed();
}

/// The bytes every HTTP/2 prior-knowledge connection starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether what the client sent so far may be the start of HTTP/2 (the
/// preface, or a prefix of it).
async fn may_be_h2(stream: &tokio::net::TcpStream) -> bool {
    let mut head = [0u8; H2_PREFACE.len()];
    match stream.peek(&mut head).await {
        Ok(n) => H2_PREFACE.starts_with(&head[..n]),
        Err(_) => true,
    }
}

/// Serve a plain HTTP/1.1 connection, one hyper connection per busy
/// period: when hyper's connection ends because the client went idle
/// (`park.rs`), wait on the bare socket (bounded by the idle deadline and
/// shutdown) and start the next one.
async fn serve_parking(
    gateway: &Arc<Gateway>,
    stream: tokio::net::TcpStream,
    conn: ClientConn,
    http1: &hyper::server::conn::http1::Builder,
    idle_deadline: Duration,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let activity = Arc::new(park::Activity::default());
    let mut io = park::ParkIo::new(stream, activity.clone(), idle_deadline);
    loop {
        let svc = park::ParkedService {
            gateway: gateway.clone(),
            conn,
            activity: activity.clone(),
        };
        // Boxed: an idle connection's task then holds only the socket.
        let mut hyper_conn = Box::new(
            http1
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades(),
        );
        let mut result = tokio::select! {
            r = &mut *hyper_conn => Some(r),
            _ = stopping.wait_for(|s| *s) => None,
        };
        if result.is_none() {
            // Finish the request in flight, answer with `Connection: close`.
            std::pin::Pin::new(&mut *hyper_conn).graceful_shutdown();
            result = Some((&mut *hyper_conn).await);
        }
        let Some(parts) = hyper_conn.into_parts() else {
            return; // upgraded: hyper handed the socket to the tunnel
        };
        io = parts.io.into_inner();
        match result {
            Some(Ok(())) if io.parked() => {}
            // Part of a pipelined request's head had arrived: hyper calls
            // the early end-of-stream an incomplete message; the bytes are
            // kept below.
            Some(Err(e)) if io.parked() && e.is_incomplete_message() => {}
            Some(Err(e)) => {
                tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
                return;
            }
            // The client closed, or hyper closed (shutdown, `Connection:
            // close`, a refused head).
            _ => return,
        }
        // Part of a head carried over keeps the deadline it began with: a
        // head sent slowly across parks still meets one deadline
        // (slowloris).
        let wait = match io.head_deadline() {
            Some(by) if !parts.read_buf.is_empty() => {
                by.saturating_duration_since(tokio::time::Instant::now())
            }
            _ => idle_deadline,
        };
        io.resume(parts.read_buf);
        if *stopping.borrow() {
            return;
        }
        gateway.metrics.connection_parked(true);
        let readable = tokio::select! {
            r = tokio::time::timeout(wait, io.stream().readable()) => matches!(r, Ok(Ok(()))),
            _ = stopping.wait_for(|s| *s) => false,
        };
        gateway.metrics.connection_parked(false);
        if !readable {
            return;
        }
    }
}

/// Serve one TLS connection (boxed by the caller, so plain connections
/// do not carry the handshake state in their futures).
async fn serve_tls(
    acceptor: TlsAcceptor,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    svc: TowerToHyperService<GatewayService>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            let fut = builder.serve_connection_with_upgrades(TokioIo::new(tls_stream), svc);
            if let Err(e) = watcher.watch(fut.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// Bind a listener, naming the address on failure.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// The per-request future, boxed: hyper needs a `Send` future whose type
/// does not borrow the service.
pub type ResponseFuture = std::pin::Pin<
    Box<dyn Future<Output = Result<http::Response<Body>, std::convert::Infallible>> + Send>,
>;

/// The gateway as a tower `Service` for one client connection, so it
/// composes with tower layers and is served through hyper-util's glue.
#[derive(Clone)]
pub struct GatewayService {
    pub gateway: Arc<Gateway>,
    pub conn: ClientConn,
}

impl<B> tower::Service<http::Request<B>> for GatewayService
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // The gateway never applies backpressure per request; limits live in
        // the listener (connections) and the store (step-up).
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> ResponseFuture {
        let (gw, conn) = (self.gateway.clone(), self.conn);
        Box::pin(async move { Ok(handle_catching(gw, req, conn).await) })
    }
}

/// Serve one request. A panic (a bug) becomes a short 500 instead of a
/// dropped connection; nothing is forwarded from a request that panicked.
async fn handle_catching<B>(
    gw: Arc<Gateway>,
    req: http::Request<B>,
    conn: ClientConn,
) -> http::Response<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    use futures_util::FutureExt;
    // Boxed once where it is made: the request's future is large, and
    // each await level would otherwise move (copy) it again.
    match std::panic::AssertUnwindSafe(Box::pin(gw.handle(req, conn)))
        .catch_unwind()
        .await
    {
        Ok(res) => res,
        Err(_) => {
            tracing::error!("request handler panicked");
            crate::gateway::rescue::panicked()
        }
    }
}
