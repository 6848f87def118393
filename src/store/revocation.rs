//! A local cache of revocation answers in front of a shared (Redis) store,
//! so the second-factor check of a protected route does not cost a Redis
//! round trip per request.
//!
//! # The bound
//!
//! A revocation (`api/logout` on any instance) takes effect on every
//! instance within [`MAX_STALENESS`] (1 s):
//!
//! - "not revoked" answers are kept for at most 1 s, counted from when the
//!   Redis query was *sent*. A query sent after the revocation was written
//!   sees it, so no instance can serve a revoked token for more than 1 s
//!   after the revoking request's `SET`, even if every notification is lost;
//! - the revoking instance publishes the token id on a Redis pub/sub channel;
//!   every instance that receives it marks the id revoked at once, so in the
//!   usual case the delay is one network hop;
//! - "revoked" answers are kept until the token would have expired (nothing
//!   is ever un-revoked).
//!
//! # Failing closed
//!
//! Answers are only served from the cache while this instance's pub/sub
//! subscription is up. When the subscription drops (Redis stopped or
//! restarted, connection lost) the cache is cleared and every check goes to
//! Redis again, which fails closed (`503`) while Redis is unreachable. A
//! Redis that hangs without closing the connection is noticed by the
//! queries themselves once the cached answers (at most 1 s old) run out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How old a cached "not revoked" answer may be.
pub const MAX_STALENESS: Duration = Duration::from_secs(1);

/// Token ids whose answers are kept at most.
const CAPACITY: usize = 100_000;

/// How long a revoked id is remembered when the revocation's own lifetime
/// is not known (an answer read from Redis): longer than any second-factor
/// token lives, and the store's key outlives the token anyway.
const REVOKED_FOR: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Copy)]
struct Entry {
    revoked: bool,
    until: Instant,
}

/// Cached revocation answers; see the module documentation.
pub struct RevocationCache {
    entries: quick_cache::sync::Cache<String, Entry>,
    /// The pub/sub subscription is up: cached answers may be used.
    live: AtomicBool,
}

impl Default for RevocationCache {
    fn default() -> Self {
        RevocationCache::new()
    }
}

impl RevocationCache {
    pub fn new() -> RevocationCache {
        RevocationCache {
            entries: quick_cache::sync::Cache::new(CAPACITY),
            live: AtomicBool::new(false),
        }
    }

    /// Whether cached answers are in use (the subscription is up).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// The subscription came up or went down. Either way the cache starts
    /// empty: notifications may have been missed in between.
    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Release);
        self.entries.clear();
    }

    /// The cached answer for `jti`, if there is a usable one.
    pub fn lookup(&self, jti: &str) -> Option<bool> {
        if !self.is_live() {
            return None;
        }
        let e = self.entries.get(jti)?;
        if Instant::now() < e.until {
            Some(e.revoked)
        } else {
            self.entries.remove(jti);
            None
        }
    }

    /// Start of a query to the store: `Some(time sent)` when its answer may
    /// be cached.
    pub fn begin(&self) -> Option<Instant> {
        self.is_live().then(Instant::now)
    }

    /// The store answered a query sent at `sent`.
    pub fn answered(&self, jti: &str, revoked: bool, sent: Instant) {
        let until = if revoked {
            Instant::now() + REVOKED_FOR
        } else {
            sent + MAX_STALENESS
        };
        self.entries
            .insert(jti.to_owned(), Entry { revoked, until });
    }

    /// `jti` was revoked for `ttl` (here or, by notification, elsewhere).
    /// Kept even while the subscription is down: a revoked answer can only
    /// make the gateway stricter.
    pub fn revoked(&self, jti: &str, ttl: Duration) {
        let until = Instant::now() + ttl.min(REVOKED_FOR);
        self.entries.insert(
            jti.to_owned(),
            Entry {
                revoked: true,
                until,
            },
        );
    }
}

/// The notification payload: `<ttl ms> <jti>`.
pub fn message(jti: &str, ttl: Duration) -> String {
    format!("{} {jti}", ttl.as_millis())
}

fn parse_message(msg: &str) -> Option<(&str, Duration)> {
    let (ms, jti) = msg.split_once(' ')?;
    let ms: u64 = ms.parse().ok()?;
    (!jti.is_empty()).then_some((jti, Duration::from_millis(ms)))
}

/// Keep a subscription to `channel` on one of `clients` (tried in turn)
/// for as long as `cache` lives, feeding revocations into it and marking it
/// live only while subscribed. Without a tokio runtime nothing is spawned
/// and the cache stays off (every check asks the store).
pub fn spawn_subscriber(
    cache: &Arc<RevocationCache>,
    clients: Vec<redis::Client>,
    channel: String,
) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if clients.is_empty() {
        return;
    }
    let weak = Arc::downgrade(cache);
    rt.spawn(subscribe_loop(weak, clients, channel));
}

async fn subscribe_loop(weak: Weak<RevocationCache>, clients: Vec<redis::Client>, channel: String) {
    use futures_util::StreamExt;
    let mut backoff = Duration::from_millis(100);
    for client in clients.iter().cycle() {
        if weak.strong_count() == 0 {
            return;
        }
        let connected = tokio::time::timeout(Duration::from_secs(2), async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(ps)
        })
        .await;
        let ps = match connected {
            Ok(Ok(ps)) => ps,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "revocation subscription failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        match weak.upgrade() {
            Some(c) => c.set_live(true),
            None => return,
        }
        let mut messages = ps.into_on_message();
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { break };
                    let Some(cache) = weak.upgrade() else { return };
                    match msg.get_payload::<String>() {
                        Ok(p) => match parse_message(&p) {
                            Some((jti, ttl)) => cache.revoked(jti, ttl),
                            None => tracing::warn!("malformed revocation notification ignored"),
                        },
                        Err(e) => tracing::warn!(error = %e, "unreadable revocation notification"),
                    }
                }
                () = tokio::time::sleep(Duration::from_secs(5)) => {
                    if weak.strong_count() == 0 {
                        return;
                    }
                }
            }
        }
        tracing::warn!(
            "revocation subscription lost; checking every token in Redis until it is back"
        );
        match weak.upgrade() {
            Some(c) => c.set_live(false),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // Nothing is served from the cache while the subscription is down.
    fn off_until_live() {
        let c = RevocationCache::new();
        assert!(c.begin().is_none());
        c.answered("a", false, Instant::now());
        assert_eq!(c.lookup("a"), None);
        c.set_live(true);
        let sent = c.begin().unwrap_or_else(Instant::now);
        c.answered("a", false, sent);
        assert_eq!(c.lookup("a"), Some(false));
        c.revoked("a", Duration::from_secs(60));
        assert_eq!(c.lookup("a"), Some(true));
        c.set_live(false);
        assert_eq!(c.lookup("a"), None);
    }

    #[test]
    // A "not revoked" answer lasts at most MAX_STALENESS from when the
    // query was sent.
    fn negative_answers_expire() {
        let c = RevocationCache::new();
        c.set_live(true);
        let old = Instant::now()
            .checked_sub(MAX_STALENESS)
            .unwrap_or_else(Instant::now);
        c.answered("a", false, old);
        assert_eq!(c.lookup("a"), None);
    }

    #[test]
    fn messages_round_trip() {
        let m = message("abc", Duration::from_millis(1500));
        assert_eq!(
            parse_message(&m),
            Some(("abc", Duration::from_millis(1500)))
        );
        assert_eq!(parse_message("x abc"), None);
        assert_eq!(parse_message("10 "), None);
    }
}
