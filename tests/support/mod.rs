//! Real parts for integration tests: redis-server, an SMTP server, HTTP
//! upstreams and the gateway itself, each on a 127.0.0.1 port chosen by the
//! OS and stopped when dropped.
#![allow(dead_code)]

/// `both_stores!(f, g)`: for each `async fn f(redis: bool)`, a module `f`
/// with the tests `memory` (in-memory store) and `redis` (a real
/// redis-server). Use with `#[macro_use] mod support;`.
#[allow(unused_macros)]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$name(false).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name(true).await
            }
        }
    )*};
}

pub mod assertion;
pub mod browser;
pub mod cluster;
pub mod flow;
pub mod gateway;
pub mod http_sink;
pub mod oidc;
pub mod redis;
pub mod smtp;
pub mod upstream;

use std::future::Future;
use std::time::{Duration, Instant};

/// Longest a test waits for something the gateway (or a real part) does
/// in the background before failing.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Poll `probe` until it returns true, failing the test after
/// [`PATIENCE`]. The pause between polls is only a poll interval: the
/// condition, not the time, decides when the test goes on.
pub async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !probe().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
