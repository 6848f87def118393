//! An in-process `ChallengeStore` for a single gateway instance.
//!
//! All state sits behind one `std::sync::Mutex` and every trait method is a
//! single critical section that never awaits, so each check-and-update is
//! atomic exactly like the Lua scripts of the Redis store.
//!
//! The layout mirrors the Redis store: per user, per channel, one slot holding
//! the open challenge and the channel cooldown, so "one open challenge per
//! channel" holds by construction; an index maps challenge ids to their
//! user and channel.
//!
//! Memory is bounded by `max_entries` (users, indexed challenges, token marks
//! and blobs together). Expired entries are dropped when touched, and the
//! whole store is swept every few writes and whenever it is full. When it is
//! still full after that sweep, writes fail with a `StoreError` instead of
//! growing: callers fail closed, and an attacker cannot exhaust memory.
//!
//! Expiry uses `tokio::time::Instant`, so tests may run it under paused time.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Challenge, ChallengeStore, Failure, Limits, NewChallenge, StartOutcome, StoreError};
use crate::channel::Channel;

/// The bound `MemoryStore::default()` uses.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

/// Writes between two routine sweeps.
const SWEEP_EVERY: u32 = 1024;

/// Longest lifetime any entry is given. Limits come from configuration;
/// capping them keeps `Instant` arithmetic from overflowing on absurd values.
const MAX_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The shortest `retry_after` ever reported, so a caller never sees zero.
const MIN_RETRY: Duration = Duration::from_millis(1);

/// Challenge state held in this process; see the module documentation.
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// A store holding at most `max_entries` entries.
    pub fn new(max_entries: usize) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner {
                max_entries,
                users: HashMap::new(),
                index: HashMap::new(),
                spent: HashMap::new(),
                revoked: HashMap::new(),
                blobs: HashMap::new(),
                clients: HashMap::new(),
                budgets: HashMap::new(),
                writes_since_sweep: 0,
                earliest_expiry: None,
            }),
        }
    }

    fn state(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        // A poisoned mutex means a panic mid-update; the state may be half
        // written, so refuse to serve from it rather than guess (fail closed).
        self.inner
            .lock()
            .map_err(|_| StoreError("memory store poisoned by a panic".into()))
    }
}

impl Default for MemoryStore {
    fn default() -> MemoryStore {
        MemoryStore::new(DEFAULT_MAX_ENTRIES)
    }
}

/// A value that lives until `until`.
struct Timed<T> {
    value: T,
    until: Instant,
}

impl<T> Timed<T> {
    fn live(&self, now: Instant) -> bool {
        self.until > now
    }
}

/// A challenge as stored in its user's channel slot.
struct Stored {
    id: String,
    session: String,
    code_hash: [u8; 32],
    attempts_left: u32,
}

/// What one user has on one channel.
#[derive(Default)]
struct Slot {
    /// The open challenge; starting another replaces it.
    challenge: Option<Timed<Stored>>,
    /// The cooldown, holding the id of the challenge that started it.
    cooldown: Option<Timed<String>>,
}

/// Everything kept about one user.
#[derive(Default)]
struct User {
    lock: Option<Instant>,
    failures: Option<Timed<u32>>,
    sends: Option<Timed<u32>>,
    channels: HashMap<Channel, Slot>,
}

impl User {
    /// Drops expired parts; `true` when nothing is left.
    fn prune(&mut self, now: Instant) -> bool {
        if self.lock.is_some_and(|t| t <= now) {
            self.lock = None;
        }
        if self.failures.as_ref().is_some_and(|f| !f.live(now)) {
            self.failures = None;
        }
        if self.sends.as_ref().is_some_and(|s| !s.live(now)) {
            self.sends = None;
        }
        self.channels.retain(|_, slot| {
            if slot.challenge.as_ref().is_some_and(|c| !c.live(now)) {
                slot.challenge = None;
            }
            if slot.cooldown.as_ref().is_some_and(|c| !c.live(now)) {
                slot.cooldown = None;
            }
            slot.challenge.is_some() || slot.cooldown.is_some()
        });
        self.lock.is_none()
            && self.failures.is_none()
            && self.sends.is_none()
            && self.channels.is_empty()
    }

    /// The earliest instant at which some part of this user expires.
    fn earliest_expiry(&self) -> Option<Instant> {
        let slots = self.channels.values().flat_map(|s| {
            [
                s.challenge.as_ref().map(|c| c.until),
                s.cooldown.as_ref().map(|c| c.until),
            ]
        });
        [
            self.lock,
            self.failures.as_ref().map(|f| f.until),
            self.sends.as_ref().map(|s| s.until),
        ]
        .into_iter()
        .chain(slots)
        .flatten()
        .min()
    }
}

struct Inner {
    max_entries: usize,
    users: HashMap<String, User>,
    /// Challenge id -> (subject, channel) of the slot that holds it. An entry
    /// may outlive its challenge (replaced or consumed); lookups check the id.
    index: HashMap<String, Timed<(String, Channel)>>,
    spent: HashMap<String, Instant>,
    revoked: HashMap<String, Instant>,
    blobs: HashMap<String, Timed<Vec<u8>>>,
    /// Sends per client key in the current window.
    clients: HashMap<String, Timed<u32>>,
    /// Sends per channel (all users) in the current window.
    budgets: HashMap<Channel, Timed<u32>>,
    writes_since_sweep: u32,
    /// No entry expires before this, so sweeping earlier would free nothing.
    /// A lower bound only: entries may since have been removed or extended.
    earliest_expiry: Option<Instant>,
}

impl Inner {
    fn len(&self) -> usize {
        self.users.len()
            + self.index.len()
            + self.spent.len()
            + self.revoked.len()
            + self.blobs.len()
            + self.clients.len()
            + self.budgets.len()
    }

    /// Notes a new expiry instant so the next sweep is not skipped.
    fn expires(&mut self, until: Instant) {
        self.earliest_expiry = Some(self.earliest_expiry.map_or(until, |e| e.min(until)));
    }

    fn sweep(&mut self, now: Instant) {
        if self.earliest_expiry.is_none_or(|e| e > now) {
            return;
        }
        self.users.retain(|_, u| !u.prune(now));
        self.index.retain(|_, e| e.live(now));
        self.spent.retain(|_, t| *t > now);
        self.revoked.retain(|_, t| *t > now);
        self.blobs.retain(|_, b| b.live(now));
        self.clients.retain(|_, c| c.live(now));
        self.budgets.retain(|_, b| b.live(now));
        self.earliest_expiry = self
            .users
            .values()
            .filter_map(User::earliest_expiry)
            .chain(self.index.values().map(|e| e.until))
            .chain(self.spent.values().copied())
            .chain(self.revoked.values().copied())
            .chain(self.blobs.values().map(|b| b.until))
            .chain(self.clients.values().map(|c| c.until))
            .chain(self.budgets.values().map(|b| b.until))
            .min();
        self.writes_since_sweep = 0;
    }

    /// Counts a write and sweeps every `SWEEP_EVERY` of them, so expired
    /// entries nobody touches again do not pile up until the store is full.
    fn wrote(&mut self, now: Instant) {
        self.writes_since_sweep += 1;
        if self.writes_since_sweep >= SWEEP_EVERY {
            self.sweep(now);
        }
    }

    /// Ensures `needed` more entries fit, sweeping if that helps.
    fn make_room(&mut self, now: Instant, needed: usize) -> Result<(), StoreError> {
        if self.len() + needed > self.max_entries {
            self.sweep(now);
        }
        if self.len() + needed > self.max_entries {
            return Err(StoreError("memory store full".into()));
        }
        Ok(())
    }

    /// The user's live state, pruned; an empty user is removed.
    fn user(&mut self, subject: &str, now: Instant) -> Option<&mut User> {
        let empty = self.users.get_mut(subject)?.prune(now);
        if empty {
            self.users.remove(subject);
            return None;
        }
        self.users.get_mut(subject)
    }

    /// Where the live challenge `id` is held, if it is.
    fn locate(&mut self, id: &str, now: Instant) -> Option<(String, Channel)> {
        let entry = self.index.get(id)?;
        if !entry.live(now) {
            self.index.remove(id);
            return None;
        }
        let (subject, channel) = entry.value.clone();
        let held = self
            .user(&subject, now)
            .and_then(|u| u.channels.get(&channel))
            .and_then(|s| s.challenge.as_ref())
            .is_some_and(|c| c.value.id == id);
        if !held {
            self.index.remove(id);
            return None;
        }
        Some((subject, channel))
    }

    /// The slot holding the live challenge `id`.
    fn slot_of(&mut self, id: &str, now: Instant) -> Option<(String, Channel, &mut Slot)> {
        let (subject, channel) = self.locate(id, now)?;
        let slot = self.users.get_mut(&subject)?.channels.get_mut(&channel)?;
        Some((subject, channel, slot))
    }
}

/// A live window count at or over `cap`: how long until the window ends.
fn over_cap(count: Option<&Timed<u32>>, cap: u32, now: Instant) -> Option<Duration> {
    count
        .filter(|c| c.live(now) && c.value >= cap)
        .map(|c| left(c.until, now))
}

/// Counts one more in a window count, starting a window when none is live.
/// Returns the instant a new window ends, if one was started.
fn bump(count: &mut Option<Timed<u32>>, now: Instant, window: Duration) -> Option<Instant> {
    match count {
        Some(c) if c.live(now) => {
            c.value = c.value.saturating_add(1);
            None
        }
        _ => {
            let until = deadline(now, window);
            *count = Some(Timed { value: 1, until });
            Some(until)
        }
    }
}

/// Gives one back to a window count (after an aborted start).
fn refund<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Timed<u32>>, key: &K, now: Instant) {
    match map.get_mut(key) {
        Some(c) if c.live(now) && c.value > 1 => c.value -= 1,
        Some(_) => {
            map.remove(key);
        }
        None => {}
    }
}

fn deadline(now: Instant, ttl: Duration) -> Instant {
    now + ttl.min(MAX_LIFETIME)
}

fn left(until: Instant, now: Instant) -> Duration {
    until.saturating_duration_since(now).max(MIN_RETRY)
}

#[async_trait]
impl ChallengeStore for MemoryStore {
    async fn start(&self, c: &NewChallenge, limits: &Limits) -> Result<StartOutcome, StoreError> {
        let now = Instant::now();
        let mut st = self.state()?;
        st.wrote(now);

        // The shared caps first, so a refused send touches no user state.
        let client_cap = limits.max_sends_per_client;
        if client_cap > 0 {
            if let Some(retry_after) = over_cap(st.clients.get(&c.client), client_cap, now) {
                return Ok(StartOutcome::ClientLimit { retry_after });
            }
        }
        let budget = limits.budget(c.channel);
        if let Some(cap) = budget {
            let spent = over_cap(st.budgets.get(&c.channel), cap, now);
            if let Some(retry_after) = spent.or((cap == 0).then_some(limits.send_window)) {
                return Ok(StartOutcome::BudgetExhausted {
                    retry_after: retry_after.max(MIN_RETRY),
                });
            }
        }

        if let Some(user) = st.user(&c.subject, now) {
            if let Some(until) = user.lock {
                return Ok(StartOutcome::Locked {
                    retry_after: left(until, now),
                });
            }
            let cooldown = user
                .channels
                .get(&c.channel)
                .and_then(|s| s.cooldown.as_ref());
            if let Some(cooldown) = cooldown {
                return Ok(StartOutcome::Cooldown {
                    retry_after: left(cooldown.until, now),
                });
            }
            if let Some(sends) = user.sends.as_ref().filter(|s| s.value >= limits.max_sends) {
                return Ok(StartOutcome::SendLimit {
                    retry_after: left(sends.until, now),
                });
            }
        }
        if limits.max_sends == 0 {
            return Ok(StartOutcome::SendLimit {
                retry_after: limits.send_window.max(MIN_RETRY),
            });
        }

        let new_user = !st.users.contains_key(&c.subject);
        let new_index = !st.index.contains_key(&c.id);
        let new_client = client_cap > 0 && !st.clients.contains_key(&c.client);
        let new_budget = budget.is_some() && !st.budgets.contains_key(&c.channel);
        st.make_room(
            now,
            usize::from(new_user)
                + usize::from(new_index)
                + usize::from(new_client)
                + usize::from(new_budget),
        )?;
        if client_cap > 0 {
            let mut count = st.clients.remove(&c.client);
            if let Some(until) = bump(&mut count, now, limits.send_window) {
                st.expires(until);
            }
            if let Some(count) = count {
                st.clients.insert(c.client.clone(), count);
            }
        }
        if budget.is_some() {
            let mut count = st.budgets.remove(&c.channel);
            if let Some(until) = bump(&mut count, now, limits.send_window) {
                st.expires(until);
            }
            if let Some(count) = count {
                st.budgets.insert(c.channel, count);
            }
        }

        let expires = deadline(now, limits.ttl);
        let cooldown_ends = deadline(now, limits.resend_after);
        let window_ends = deadline(now, limits.send_window);
        let Inner { users, index, .. } = &mut *st;
        let user = users.entry(c.subject.clone()).or_default();
        let slot = user.channels.entry(c.channel).or_default();
        if let Some(old) = slot.challenge.take() {
            index.remove(&old.value.id);
        }
        slot.challenge = Some(Timed {
            value: Stored {
                id: c.id.clone(),
                session: c.session.clone(),
                code_hash: c.code_hash,
                attempts_left: limits.max_attempts,
            },
            until: expires,
        });
        // A zero `resend_after` means no cooldown at all.
        slot.cooldown = (!limits.resend_after.is_zero()).then(|| Timed {
            value: c.id.clone(),
            until: cooldown_ends,
        });
        match &mut user.sends {
            Some(sends) => sends.value = sends.value.saturating_add(1),
            None => {
                user.sends = Some(Timed {
                    value: 1,
                    until: window_ends,
                })
            }
        }
        index.insert(
            c.id.clone(),
            Timed {
                value: (c.subject.clone(), c.channel),
                until: expires,
            },
        );
        st.expires(expires.min(cooldown_ends).min(window_ends));
        Ok(StartOutcome::Started)
    }

    async fn abort(&self, c: &NewChallenge) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut st = self.state()?;
        let Some(user) = st.user(&c.subject, now) else {
            return Ok(());
        };
        let Some(slot) = user.channels.get_mut(&c.channel) else {
            return Ok(());
        };
        // Only the challenge that is still open is undone, and only once: a
        // repeated or late abort must not hand out extra sends.
        if slot.challenge.as_ref().is_none_or(|ch| ch.value.id != c.id) {
            return Ok(());
        }
        slot.challenge = None;
        if slot.cooldown.as_ref().is_some_and(|cd| cd.value == c.id) {
            slot.cooldown = None;
        }
        match &mut user.sends {
            Some(sends) if sends.value > 1 => sends.value -= 1,
            _ => user.sends = None,
        }
        st.index.remove(&c.id);
        refund(&mut st.clients, &c.client, now);
        refund(&mut st.budgets, &c.channel, now);
        Ok(())
    }

    async fn lookup(&self, id: &str) -> Result<Option<Challenge>, StoreError> {
        let now = Instant::now();
        let mut st = self.state()?;
        let Some((subject, channel, slot)) = st.slot_of(id, now) else {
            return Ok(None);
        };
        // A challenge with no attempts left is dead, whatever its ttl says.
        let live = slot
            .challenge
            .as_ref()
            .filter(|ch| ch.value.attempts_left > 0);
        Ok(live.map(|ch| Challenge {
            subject,
            session: ch.value.session.clone(),
            channel,
            code_hash: ch.value.code_hash,
            attempts_left: ch.value.attempts_left,
        }))
    }

    async fn locked(&self, subject: &str) -> Result<Option<Duration>, StoreError> {
        let now = Instant::now();
        let mut st = self.state()?;
        Ok(st
            .user(subject, now)
            .and_then(|u| u.lock)
            .map(|until| left(until, now)))
    }

    async fn consume(&self, id: &str) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut st = self.state()?;
        let Some((_, _, slot)) = st.slot_of(id, now) else {
            return Ok(false);
        };
        slot.challenge = None;
        st.index.remove(id);
        Ok(true)
    }

    async fn fail(&self, id: &str, subject: &str, limits: &Limits) -> Result<Failure, StoreError> {
        let now = Instant::now();
        let mut st = self.state()?;
        st.wrote(now);

        let mut attempts_left = 0;
        if let Some((owner, _, slot)) = st.slot_of(id, now) {
            // A challenge only takes failures reported by its own user.
            if owner == subject {
                if let Some(ch) = slot.challenge.as_mut() {
                    ch.value.attempts_left = ch.value.attempts_left.saturating_sub(1);
                    attempts_left = ch.value.attempts_left;
                }
                if attempts_left == 0 {
                    slot.challenge = None;
                    st.index.remove(id);
                }
            }
        }

        if st.user(subject, now).is_none() {
            st.make_room(now, 1)?;
        }
        let lock_ends = deadline(now, limits.lockout);
        let user = st.users.entry(subject.to_owned()).or_default();
        if let Some(until) = user.lock {
            return Ok(Failure {
                attempts_left,
                locked_for: Some(left(until, now)),
            });
        }
        let failures = user
            .failures
            .as_ref()
            .map_or(0, |f| f.value)
            .saturating_add(1);
        let locked_for = if failures >= limits.max_failures {
            user.lock = Some(lock_ends);
            user.failures = None;
            Some(left(lock_ends, now))
        } else {
            // The count lives for `lockout` after the latest failure.
            user.failures = Some(Timed {
                value: failures,
                until: lock_ends,
            });
            None
        };
        st.expires(lock_ends);
        Ok(Failure {
            attempts_left,
            locked_for,
        })
    }

    async fn spend_once(&self, jti: &str, ttl: Duration) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut st = self.state()?;
        st.wrote(now);
        match st.spent.get(jti) {
            Some(until) if *until > now => return Ok(false),
            Some(_) => {}
            None => st.make_room(now, 1)?,
        }
        let until = deadline(now, ttl);
        st.spent.insert(jti.to_owned(), until);
        st.expires(until);
        Ok(true)
    }

    async fn revoke(&self, jti: &str, ttl: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut st = self.state()?;
        st.wrote(now);
        if !st.revoked.contains_key(jti) {
            st.make_room(now, 1)?;
        }
        let until = deadline(now, ttl);
        st.revoked.insert(jti.to_owned(), until);
        st.expires(until);
        Ok(())
    }

    async fn is_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        let now = Instant::now();
        let st = self.state()?;
        Ok(st.revoked.get(jti).is_some_and(|until| *until > now))
    }

    async fn put_blob(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut st = self.state()?;
        st.wrote(now);
        if !st.blobs.contains_key(key) {
            st.make_room(now, 1)?;
        }
        let until = deadline(now, ttl);
        st.blobs.insert(
            key.to_owned(),
            Timed {
                value: value.to_vec(),
                until,
            },
        );
        st.expires(until);
        Ok(())
    }

    async fn take_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let now = Instant::now();
        let mut st = self.state()?;
        Ok(st
            .blobs
            .remove(key)
            .filter(|b| b.live(now))
            .map(|b| b.value))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.state().map(|_| ())
    }
}
