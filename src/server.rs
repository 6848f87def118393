//! Accept loop, TLS termination, HTTP/1.1 + HTTP/2 serving, graceful
//! shutdown.

use std::future::Future;
use std::net::SocketAddr;
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
use crate::tls::{tls_certs, tls_key, tls_server_config, TlsFiles};

/// How long a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Build a TLS acceptor (h2 and http/1.1 by ALPN) from PEM files.
pub fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    let certs = tls_certs(&files.cert)?;
    let key = tls_key(&files.key)?;
    let cfg =
        tls_server_config(certs, key).map_err(|e| format!("{}: {e}", files.cert.display()))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
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
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let cfg = gateway.config();
    let tls = match &cfg.listen.tls {
        Some(files) => Some(tls_acceptor(files)?),
        None => None,
    };
    let builder = Arc::new(http_builder(&cfg));
    let graceful = GracefulShutdown::new();
    // At most `max_connections` client connections at once: past it the
    // loop stops accepting, so new connections wait in the kernel's listen
    // backlog (and are refused by the kernel once that is full) instead of
    // growing memory without bound.
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.listen.max_connections));
    let idle_first_read = cfg.listen.header_read_timeout;
    let (stop, stopping) = tokio::sync::watch::channel(false);
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
        let gateway = gateway.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let _permit = permit;
            gateway.metrics.connection_opened();
            // A connection that has sent nothing yet holds no HTTP state
            // (hyper allocates its buffers on the first read); the same
            // deadline as for a request head applies, and shutdown ends it.
            let first = tokio::select! {
                r = tokio::time::timeout(idle_first_read, stream.readable()) => matches!(r, Ok(Ok(()))),
                _ = stopping.wait_for(|s| *s) => false,
            };
            if !first {
                gateway.metrics.connection_closed();
                return;
            }
            let conn = ClientConn {
                peer,
                tls: tls.is_some(),
            };
            let svc = TowerToHyperService::new(GatewayService {
                gateway: gateway.clone(),
                conn,
            });
            match tls {
                Some(acceptor) => {
                    Box::pin(serve_tls(acceptor, stream, peer, &builder, svc, watcher)).await
                }
                None => {
                    let fut = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    if let Err(e) = watcher.watch(fut.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
            }
            gateway.metrics.connection_closed();
        });
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
    Ok(())
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

    /// Serve one request. A panic (a bug) becomes a short 500 instead of a
    /// dropped connection; nothing is forwarded from a request that panicked.
    fn call(&mut self, req: http::Request<B>) -> ResponseFuture {
        use futures_util::FutureExt;
        let (gw, conn) = (self.gateway.clone(), self.conn);
        Box::pin(async move {
            match std::panic::AssertUnwindSafe(gw.handle(req, conn))
                .catch_unwind()
                .await
            {
                Ok(res) => Ok(res),
                Err(_) => {
                    tracing::error!("request handler panicked");
                    Ok(crate::gateway::rescue::panicked())
                }
            }
        })
    }
}
