//! Which serving thread the current code runs on.
//!
//! The public listener is served by `listen.workers` threads, each with its
//! own current-thread Tokio runtime (`server.rs`): a client connection, the
//! requests on it and the upstream connections they use all stay on the
//! thread that took the connection, so a request never wakes another
//! thread. State that is cheaper kept per thread (the upstream connection
//! pool) is sharded by [`index`].

use std::cell::Cell;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The current thread's worker number: `1..=workers` on a serving thread,
/// 0 on any other.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// Mark the current thread as serving thread `i` (1-based).
pub(crate) fn enter(i: usize) {
    INDEX.with(|c| c.set(i));
}
