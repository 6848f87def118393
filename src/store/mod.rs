//! Challenge state: the `ChallengeStore` trait and its implementations.
//!
//! Every operation that checks a limit and updates state does both in one
//! atomic step (a Lua script on Redis, one mutex section in memory), so that
//! parallel requests can never both pass a limit meant for one of them.

pub mod memory;
pub mod redis;
pub mod revocation;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

use crate::channel::Channel;

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;

/// The limits from `stepup.otp`, as the store enforces them.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a code is valid.
    pub ttl: Duration,
    /// Wrong codes per challenge before it dies.
    pub max_attempts: u32,
    /// Cooldown between two sends to one user on one channel.
    pub resend_after: Duration,
    /// Sends per user per `send_window`, all channels together.
    pub max_sends: u32,
    /// The window `max_sends` counts over (one hour in production).
    pub send_window: Duration,
    /// How long a user stays locked out.
    pub lockout: Duration,
    /// Wrong codes across all challenges of one user before the lockout.
    /// The count lives for `lockout` after the last failure and is never
    /// reset by asking for a new code.
    pub max_failures: u32,
    /// Sends per client address (see [`client_key`]) per `send_window`,
    /// all users and channels together; 0 means no cap.
    pub max_sends_per_client: u32,
    /// Email sends per `send_window` across all users; `None`: unlimited.
    pub email_budget: Option<u32>,
    /// SMS sends per `send_window` across all users; `None`: unlimited.
    pub sms_budget: Option<u32>,
}

impl Limits {
    /// The shared send budget of `channel`, if it has one.
    pub fn budget(&self, channel: Channel) -> Option<u32> {
        match channel {
            Channel::Email => self.email_budget,
            Channel::Sms => self.sms_budget,
        }
    }
}

/// The key a client address is counted under for `max_sends_per_client`:
/// an IPv4 address as is, an IPv6 address by its /64 (one subscriber's
/// network, which an attacker can fill with addresses), an IPv4-mapped
/// IPv6 address as the IPv4 address.
pub fn client_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{net}/64")
            }
        },
    }
}

/// A challenge about to be started. `code_hash` is the keyed hash of the
/// code; the code itself never reaches the store.
#[derive(Debug, Clone)]
pub struct NewChallenge {
    pub id: String,
    pub subject: String,
    /// The primary session the challenge was started under.
    pub session: String,
    pub channel: Channel,
    pub code_hash: [u8; 32],
    /// The requesting client, as [`client_key`] gives it.
    pub client: String,
}

/// A stored, live challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub subject: String,
    pub session: String,
    pub channel: Channel,
    pub code_hash: [u8; 32],
    pub attempts_left: u32,
}

/// What happened when a challenge was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// Stored; any earlier open challenge of this user on this channel is gone.
    Started,
    /// The user is locked out for this long.
    Locked { retry_after: Duration },
    /// Too soon after the last send on this channel.
    Cooldown { retry_after: Duration },
    /// `max_sends` reached in the current window.
    SendLimit { retry_after: Duration },
    /// `max_sends_per_client` reached for this client in the current window.
    ClientLimit { retry_after: Duration },
    /// The channel's shared budget is spent for the current window.
    BudgetExhausted { retry_after: Duration },
}

/// What happened when a wrong code was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Attempts left on this challenge; 0 means the challenge is now dead.
    pub attempts_left: u32,
    /// `Some` when this failure locked the user out (or they already were).
    pub locked_for: Option<Duration>,
}

/// The store could not be reached or answered nonsense. Callers fail closed.
#[derive(Debug, thiserror::Error)]
#[error("challenge store: {0}")]
pub struct StoreError(pub String);

#[async_trait]
pub trait ChallengeStore: Send + Sync + 'static {
    /// Refuse when the client is over `max_sends_per_client`, the channel's
    /// budget is spent, or the user is locked out, in cooldown for this
    /// channel or over `max_sends` (checked in that order); otherwise store
    /// the challenge (expiring after `limits.ttl`), end the user's earlier
    /// open challenge on this channel, start the channel cooldown and count
    /// the send against the user, the client and the budget.
    ///
    /// Every count is checked and taken atomically, so parallel starts can
    /// never exceed any cap. (On Redis the client, budget and user counts
    /// live in different hash slots: each is taken atomically in turn and
    /// given back when a later one refuses, so a cap may briefly refuse a
    /// send it would have allowed, never the other way round.)
    async fn start(&self, c: &NewChallenge, limits: &Limits) -> Result<StartOutcome, StoreError>;

    /// Undo `start` after the code could not be delivered: remove the
    /// challenge, the cooldown and the send it counted (for the user, the
    /// client and the budget), so a delivery failure costs nothing.
    async fn abort(&self, c: &NewChallenge) -> Result<(), StoreError>;

    /// The live challenge with this id, if any (expired or dead: `None`).
    async fn lookup(&self, id: &str) -> Result<Option<Challenge>, StoreError>;

    /// How much longer `subject` is locked out, if they are.
    async fn locked(&self, subject: &str) -> Result<Option<Duration>, StoreError>;

    /// Spend a challenge after its code matched. Exactly one caller gets
    /// `true` for a given live challenge, however many race.
    async fn consume(&self, id: &str) -> Result<bool, StoreError>;

    /// Record a wrong code against challenge `id` of `subject`: one attempt
    /// fewer on the challenge (deleted at zero), one more failure for the
    /// user (lockout at `max_failures`).
    async fn fail(&self, id: &str, subject: &str, limits: &Limits) -> Result<Failure, StoreError>;

    /// Mark a token id as used once; `true` for the first caller only.
    /// The mark lives for `ttl` (the token's remaining lifetime).
    async fn spend_once(&self, jti: &str, ttl: Duration) -> Result<bool, StoreError>;

    /// Revoke a token id until `ttl` has passed.
    async fn revoke(&self, jti: &str, ttl: Duration) -> Result<(), StoreError>;

    /// Whether a token id was revoked.
    async fn is_revoked(&self, jti: &str) -> Result<bool, StoreError>;

    /// Store a small blob (a stashed request, a CSRF nonce) for `ttl`.
    async fn put_blob(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError>;

    /// Take (read and delete) a blob stored with `put_blob`.
    async fn take_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Whether the store is reachable.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Begin the store's background work in the current Tokio runtime (a
    /// Redis store's revocation subscriber); nothing when there is none or
    /// it runs already. The config's build step builds the store without
    /// starting it, so a store a reload builds and never uses costs no
    /// connection.
    fn start_background(&self) {}
}

/// The `store` settings, built by the config loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settings {
    Memory {
        max_entries: usize,
    },
    Redis {
        url: String,
        prefix: String,
        /// PEM roots for `rediss://` instead of the system ones.
        ca_file: Option<PathBuf>,
    },
    Cluster {
        urls: Vec<String>,
        prefix: String,
    },
}
