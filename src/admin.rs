//! The admin listener: `/healthz`, `/readyz`, `/metrics`, and `/jwks.json`
//! (the signed assertion's keys). Never served on the public address.

use std::future::Future;
use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::gateway::Gateway;
use crate::proxy::{full, Body};

/// Serve the admin endpoints until `shutdown` resolves.
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            res = listener.accept() => match res {
                Ok(x) => x,
                Err(_) => continue,
            },
            () = &mut shutdown => return,
        };
        let gw = gateway.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let gw = gw.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&gw, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(gw: &Gateway, req: Request<Incoming>) -> Response<Body> {
    let (status, ctype, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => match gw.ready().await {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        "/jwks.json" => match gw.assertion_jwks() {
            Some(set) => (StatusCode::OK, "application/jwk-set+json", set.to_string()),
            None => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "no upstream.assertion configured\n".to_string(),
            ),
        },
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            gw.metrics.encode(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut res = Response::new(full(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    res
}
