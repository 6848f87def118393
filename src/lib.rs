//! stepgate: a reverse proxy that demands a fresh second factor before it
//! forwards protected routes.
//!
//! The request path reads top to bottom in `gateway/mod.rs` (`pipeline`),
//! wrapped by telemetry and rescue: normalise -> sanitise -> identity ->
//! policy -> step-up -> forward (proxy mode) or answer (forward-auth mode),
//! one file per phase under `gateway/`. Dependencies point one way:
//! `gateway/` uses the domain modules (`identity`, `policy`, `stepup`,
//! `proxy`, `store`, ...), which share `http/` and `channel`; nothing
//! imports `gateway/` but the server and admin listeners.

#![forbid(unsafe_code)]

pub mod admin;
pub mod assertion;
pub mod channel;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod gateway;
pub mod http;
pub mod identity;
pub mod otp;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod stepup;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

pub use crate::config::Config;
pub use crate::gateway::Gateway;

/// A gateway serving on its listeners.
pub struct Running {
    pub gateway: Arc<Gateway>,
    /// The public address actually bound (useful with port 0).
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Running {
    /// Stop accepting, drain in-flight requests, and wait until done.
    pub async fn shutdown(self) -> Result<(), String> {
        let _ = self.stop.send(true);
        self.task.await.map_err(|e| e.to_string())?
    }
}

/// Bind the listeners of `config` and serve in the background.
pub async fn start(config: Config) -> Result<Running, String> {
    let public = server::bind(config.listen.address).await?;
    let admin = server::bind(config.admin.address).await?;
    let addr = public.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
    let gateway = Gateway::new(config)?;
    let (stop, stopped) = watch::channel(false);
    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(admin::serve(gateway.clone(), admin, wait(stopped.clone())));
    let task = tokio::spawn(server::serve(gateway.clone(), public, wait(stopped)));
    Ok(Running {
        gateway,
        addr,
        admin_addr,
        stop,
        task,
    })
}

/// Serve `config` until `shutdown` resolves, reloading the policy when
/// the file changes or on SIGHUP.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    let path = config.file.clone();
    let hangups = reload::hangups();
    let running = start(config).await?;
    tracing::info!(
        listen = %running.addr,
        admin = %running.admin_addr,
        "stepgate listening"
    );
    let watcher = reload::watch(running.gateway.clone(), path, hangups);
    shutdown.await;
    drop(watcher);
    running.shutdown().await
}
