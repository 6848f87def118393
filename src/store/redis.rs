//! A `ChallengeStore` in Redis (one node or a Redis Cluster), shared by all
//! gateway instances.
//!
//! # Connections
//!
//! Construction only parses the URLs, so the gateway starts (and reports
//! not-ready) while Redis is down. The connection is opened on first use;
//! after a failure it is dropped and the next call opens a fresh one, so the
//! same store recovers by itself when Redis comes back. Every operation is
//! bounded by `OP_TIMEOUT`: a dead or hanging Redis yields a `StoreError`
//! within about two seconds, never a hang.
//!
//! # Key layout
//!
//! With `P` the configured prefix and `U` the lowercase hex SHA-256 of the
//! subject (hashing keeps arbitrary subjects, including ones with `{`, `}`
//! or `:`, from escaping the hash tag, and keeps them out of key names):
//!
//! | key                    | holds                                             |
//! |------------------------|---------------------------------------------------|
//! | `P{u:U}:ch:<channel>`  | hash: the user's open challenge on that channel    |
//! | `P{u:U}:cool:<channel>`| cooldown; value = id of the challenge that set it  |
//! | `P{u:U}:sends`         | sends in the current window                        |
//! | `P{u:U}:fails`         | wrong codes, living `lockout` after the latest     |
//! | `P{u:U}:lock`          | present while the user is locked out               |
//! | `Pcid:<id>`            | `U:<channel>`: where challenge `<id>` is held      |
//! | `Ponce:<jti>`          | token id already used (`spend_once`)               |
//! | `Prevoked:<jti>`       | revoked token id                                   |
//! | `Pblob:<key>`          | a blob                                             |
//! | `Pclient:<client>`     | sends from one client address in the window        |
//! | `Pbudget:<channel>`    | sends on one channel, all users, in the window     |
//!
//! Every key has an expiry. The challenge hash has the fields `id`,
//! `subject`, `session`, `channel`, `code` (hex of the code hash) and
//! `attempts`.
//!
//! # Why challenges live under the user's hash tag
//!
//! A Lua script may only touch keys of one hash slot on a cluster. `start`
//! must check the user's limits, replace the user's open challenge on the
//! channel and count the send in one atomic step, and `fail` must spend an
//! attempt and count a failure in one step, so the challenge sits in the
//! user's slot. Storing it per channel (not per id) makes "one open challenge
//! per channel" structural: a new start overwrites the old one.
//!
//! `lookup` and `consume` only get the id, so `Pcid:<id>` points to the
//! user and channel. It is written just before the `start` script and may
//! dangle (start refused, challenge replaced or consumed, pointer left to
//! expire with the challenge ttl); readers therefore always check the `id`
//! field of the hash it points to. Reading the pointer and acting on the hash
//! are two steps, which is harmless: the pointer never changes for an id, and
//! the step that matters (the `id` check and `DEL` in `consume`) is atomic.
//!
//! # Shared caps
//!
//! The client and budget counts cannot share the user's slot (they are
//! shared by many users), so `start` takes them one at a time, each with an
//! atomic check-and-count script on its own key (client, then budget, then
//! the user's `start` script), and gives back what it took when a later
//! step refuses. No cap can be exceeded by parallel starts; at worst a count
//! briefly held by a start that is then refused turns away another start.
//! An error between the steps leaves the counts taken (fail closed).
//!
//! A zero `resend_after` means no cooldown. The prefix may not contain `{`
//! or `}`, since that would move the hash tag out of `{u:U}`.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Script, Value};
use sha2::{Digest, Sha256};

use super::revocation::{self, spawn_subscriber, RevocationCache};
use super::{Challenge, ChallengeStore, Failure, Limits, NewChallenge, StartOutcome, StoreError};
use crate::channel::Channel;

/// Upper bound on one store operation, retries and reconnects included.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on opening one TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on waiting for one reply.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest expiry ever set. Limits come from configuration; capping them
/// keeps absurd values from overflowing Redis's expiry arithmetic.
const MAX_MILLIS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// Functions every script starts with.
///
/// `remaining(key, fallback)`: the remaining life of a key in ms (0 when
/// absent, at least 1 when present). A key without expiry (which this
/// store never writes) gets `fallback` ms, so a stray key cannot lock a
/// user out forever.
///
/// `take(key, cap, window)`: counts one send on the window count `key`
/// unless it is at `cap`, starting the window on the first. Returns 0 when
/// counted, else the ms until the window ends (the whole window for a
/// count that is at the cap but has no life left).
const PRELUDE_LUA: &str = r#"
local function remaining(key, fallback)
  local t = redis.call('PTTL', key)
  if t == -2 then return 0 end
  if t < 0 then
    redis.call('PEXPIRE', key, fallback)
    return fallback
  end
  if t == 0 then return 1 end
  return t
end
local function take(key, cap, window)
  local n = tonumber(redis.call('GET', key) or 0)
  if n >= cap then
    local wait = remaining(key, window)
    if wait == 0 then wait = window end
    return wait
  end
  if redis.call('INCR', key) == 1 or redis.call('PTTL', key) < 0 then
    redis.call('PEXPIRE', key, window)
  end
  return 0
end
"#;

/// KEYS: lock, cooldown, sends, challenge.
/// ARGV: id, subject, session, channel, code, max_attempts, ttl_ms,
///       resend_ms, max_sends, window_ms, lockout_ms.
/// Returns {0, 0} started, {1, ms} locked, {2, ms} cooldown, {3, ms} limit.
const START_LUA: &str = r#"
local locked = remaining(KEYS[1], tonumber(ARGV[11]))
if locked > 0 then return {1, locked} end
local resend = tonumber(ARGV[8])
local cool = remaining(KEYS[2], math.max(resend, 1))
if cool > 0 then return {2, cool} end
local wait = take(KEYS[3], tonumber(ARGV[9]), tonumber(ARGV[10]))
if wait > 0 then return {3, wait} end
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[4], 'id', ARGV[1], 'subject', ARGV[2], 'session', ARGV[3],
  'channel', ARGV[4], 'code', ARGV[5], 'attempts', ARGV[6])
redis.call('PEXPIRE', KEYS[4], ARGV[7])
if resend > 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', resend)
end
return {0, 0}
"#;

/// KEYS: a window count. ARGV: cap, window_ms.
/// Counts one send unless the count is at `cap` (see `take`). Returns
/// {0, 0} counted, {1, ms} refused with the window's rest.
const TAKE_LUA: &str = r#"
local wait = take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if wait > 0 then return {1, wait} end
return {0, 0}
"#;

/// KEYS: a window count. Gives one send back (never below zero, never
/// creating the key). Returns the count left.
const GIVE_BACK_LUA: &str = r#"
local n = tonumber(redis.call('GET', KEYS[1]) or 0)
if n > 1 then return redis.call('DECR', KEYS[1]) end
redis.call('DEL', KEYS[1])
return 0
"#;

/// KEYS: challenge, cooldown, sends. ARGV: id.
/// Undoes a start only while its challenge is still open, so a repeated or
/// late abort cannot hand out extra sends. Returns 1 when undone.
const ABORT_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
local sent = tonumber(redis.call('GET', KEYS[3]) or 0)
if sent > 1 then redis.call('DECR', KEYS[3]) else redis.call('DEL', KEYS[3]) end
return 1
"#;

/// KEYS: challenge. ARGV: id. Returns 1 for the one caller that spent it.
const CONSUME_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"#;

/// KEYS: fails, lock, then the user's challenge key of every channel.
/// ARGV: id, max_failures, lockout_ms.
/// Returns {attempts_left, locked_ms}; locked_ms is 0 when not locked.
const FAIL_LUA: &str = r#"
local left = 0
for i = 3, #KEYS do
  if redis.call('HGET', KEYS[i], 'id') == ARGV[1] then
    left = redis.call('HINCRBY', KEYS[i], 'attempts', -1)
    if left <= 0 then
      redis.call('DEL', KEYS[i])
      left = 0
    end
    break
  end
end
local lockout = tonumber(ARGV[3])
local locked = remaining(KEYS[2], lockout)
if locked > 0 then return {left, locked} end
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], lockout)
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', lockout)
  redis.call('DEL', KEYS[1])
  return {left, lockout}
end
return {left, 0}
"#;

/// Challenge state in Redis; see the module documentation.
pub struct RedisStore {
    keys: Keys,
    target: Target,
    /// Only ever held to clone or replace the handle, never across an await.
    conn: Mutex<ConnSlot>,
    scripts: Scripts,
    /// Local revocation answers, kept current by pub/sub (see
    /// `revocation.rs`): a protected request costs no round trip.
    revocations: Arc<RevocationCache>,
    /// The pub/sub channel revocations are announced on.
    channel: String,
    /// The clients to subscribe with, until [`ChallengeStore::start_background`]
    /// starts the subscriber.
    unstarted: Mutex<Option<Vec<redis::Client>>>,
}

/// The current connection, `None` until first use and after a failure.
struct ConnSlot {
    /// Counts connections opened, so a failure reported on an old
    /// connection cannot discard a newer one.
    generation: u64,
    conn: Option<Conn>,
}

struct Scripts {
    start: Script,
    abort: Script,
    consume: Script,
    fail: Script,
    take: Script,
    give_back: Script,
}

/// Where to connect to.
/// Both clients are boxed: they are large and only cloned on (re)connect.
enum Target {
    Node(Box<redis::Client>),
    Cluster(Box<ClusterClient>),
}

/// A connection handle; both kinds multiplex and are cheap to clone.
#[derive(Clone)]
enum Conn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Whether `prefix` can start every key: braces would change the hash slot
/// the keys of one user fall in (Redis Cluster hash tags). The config
/// loader checks this too, so `stepgate check` refuses what `run` would.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.contains(['{', '}']) {
        return Err(format!(
            "redis key prefix {prefix:?} may not contain '{{' or '}}'"
        ));
    }
    Ok(())
}

impl RedisStore {
    /// A store on one Redis node at `url`, with every key under `prefix`.
    /// Fails only on a malformed URL or prefix; Redis need not be up.
    pub fn new(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        RedisStore::with_ca(url, prefix, None)
    }

    /// Like [`RedisStore::new`]; for `rediss://` URLs, `ca_pem` (PEM
    /// certificates) replaces the system roots when given.
    pub fn with_ca(
        url: &str,
        prefix: &str,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<RedisStore, StoreError> {
        let store = RedisStore::idle_with_ca(url, prefix, ca_pem)?;
        ChallengeStore::start_background(&store);
        Ok(store)
    }

    /// Like [`RedisStore::with_ca`], but its revocation subscriber waits
    /// for [`ChallengeStore::start_background`] (what the config's build step builds).
    pub fn idle_with_ca(
        url: &str,
        prefix: &str,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<RedisStore, StoreError> {
        let client = match ca_pem {
            Some(root_cert) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            ),
            None => redis::Client::open(url),
        }
        .map_err(|e| StoreError(format!("redis url: {e}")))?;
        let subscriber = client.clone();
        RedisStore::with_target(Target::Node(Box::new(client)), prefix, vec![subscriber])
    }

    /// A store on the Redis Cluster reachable through `urls`, with every key
    /// under `prefix`. Fails only on malformed URLs or prefix.
    pub fn cluster(urls: &[String], prefix: &str) -> Result<RedisStore, StoreError> {
        let store = RedisStore::idle_cluster(urls, prefix)?;
        ChallengeStore::start_background(&store);
        Ok(store)
    }

    /// Like [`RedisStore::cluster`], but its revocation subscriber waits
    /// for [`ChallengeStore::start_background`].
    pub fn idle_cluster(urls: &[String], prefix: &str) -> Result<RedisStore, StoreError> {
        if urls.is_empty() {
            return Err(StoreError("redis cluster: no node urls".into()));
        }
        let client = ClusterClient::builder(urls.iter().map(String::as_str))
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .build()
            .map_err(|e| StoreError(format!("redis cluster urls: {e}")))?;
        // A PUBLISH reaches every node of a cluster: subscribing on any one
        // of them (tried in turn) is enough.
        let subscribers = urls
            .iter()
            .filter_map(|u| redis::Client::open(u.as_str()).ok())
            .collect();
        RedisStore::with_target(Target::Cluster(Box::new(client)), prefix, subscribers)
    }

    fn with_target(
        target: Target,
        prefix: &str,
        subscribers: Vec<redis::Client>,
    ) -> Result<RedisStore, StoreError> {
        check_prefix(prefix).map_err(StoreError)?;
        let script = |body: &str| Script::new(&format!("{PRELUDE_LUA}{body}"));
        let revocations = Arc::new(RevocationCache::new());
        Ok(RedisStore {
            revocations,
            channel: format!("{prefix}revocations"),
            unstarted: Mutex::new(Some(subscribers)),
            keys: Keys {
                prefix: prefix.to_owned(),
            },
            target,
            conn: Mutex::new(ConnSlot {
                generation: 0,
                conn: None,
            }),
            scripts: Scripts {
                start: script(START_LUA),
                abort: script(ABORT_LUA),
                consume: script(CONSUME_LUA),
                fail: script(FAIL_LUA),
                take: script(TAKE_LUA),
                give_back: script(GIVE_BACK_LUA),
            },
        })
    }

    /// The local revocation answers (live while the pub/sub subscription
    /// is up).
    pub fn revocations(&self) -> &Arc<RevocationCache> {
        &self.revocations
    }

    /// The current connection, opening one (lazily: it connects on first
    /// command) when there is none.
    fn connection(&self) -> Result<(u64, Conn), StoreError> {
        let mut slot = self
            .conn
            .lock()
            .map_err(|_| StoreError("redis connection slot poisoned".into()))?;
        if let Some(conn) = &slot.conn {
            return Ok((slot.generation, conn.clone()));
        }
        let conn = match &self.target {
            Target::Node(client) => {
                // One quick retry smooths over a blip; anything longer is
                // the caller's to handle, within `OP_TIMEOUT`.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(100))
                    .set_max_delay(Duration::from_millis(500));
                let manager = ConnectionManager::new_lazy_with_config((**client).clone(), config)
                    .map_err(|e| StoreError(format!("redis: {e}")))?;
                Conn::Node(manager)
            }
            Target::Cluster(client) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(RESPONSE_TIMEOUT);
                Conn::Cluster(client.get_pending_async_connection_with_config(config))
            }
        };
        slot.generation += 1;
        slot.conn = Some(conn.clone());
        Ok((slot.generation, conn))
    }

    /// Drops connection `generation` so the next call opens a new one; a
    /// newer connection opened meanwhile by another caller is kept.
    fn discard(&self, generation: u64) {
        if let Ok(mut slot) = self.conn.lock() {
            if slot.generation == generation {
                slot.conn = None;
            }
        }
    }

    /// Runs `op` on a connection within `OP_TIMEOUT`, discarding the
    /// connection when it failed in a way a new one might not.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (generation, conn) = self.connection()?;
        match tokio::time::timeout(OP_TIMEOUT, op(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if needs_new_connection(&e) {
                    self.discard(generation);
                }
                Err(StoreError(format!("redis: {e}")))
            }
            Err(_) => {
                self.discard(generation);
                Err(StoreError(format!(
                    "redis: no answer within {} ms",
                    OP_TIMEOUT.as_millis()
                )))
            }
        }
    }

    /// Where challenge `id` is held, from its pointer key.
    async fn locate(&self, conn: &mut Conn, id: &str) -> RedisResult<Option<(String, Channel)>> {
        let pointer: Option<String> = redis::cmd("GET")
            .arg(self.keys.pointer(id))
            .query_async(conn)
            .await?;
        let Some(pointer) = pointer else {
            return Ok(None);
        };
        parse_pointer(&pointer)
            .map(Some)
            .ok_or_else(|| nonsense("malformed challenge pointer"))
    }
}

/// Whether an error may have left the connection unusable. Only a reply
/// that arrived but did not convert is known to leave it intact; for
/// anything else a fresh connection is cheap insurance.
fn needs_new_connection(e: &RedisError) -> bool {
    e.kind() != ErrorKind::UnexpectedReturnType
}

fn nonsense(what: &'static str) -> RedisError {
    RedisError::from((ErrorKind::UnexpectedReturnType, what))
}

/// Key names; see the module documentation.
struct Keys {
    prefix: String,
}

impl Keys {
    fn user(&self, tag: &str, rest: &str) -> String {
        format!("{}{{u:{tag}}}:{rest}", self.prefix)
    }

    fn lock(&self, tag: &str) -> String {
        self.user(tag, "lock")
    }

    fn fails(&self, tag: &str) -> String {
        self.user(tag, "fails")
    }

    fn sends(&self, tag: &str) -> String {
        self.user(tag, "sends")
    }

    fn cooldown(&self, tag: &str, channel: Channel) -> String {
        self.user(tag, &format!("cool:{}", channel.as_str()))
    }

    fn challenge(&self, tag: &str, channel: Channel) -> String {
        self.user(tag, &format!("ch:{}", channel.as_str()))
    }

    fn pointer(&self, id: &str) -> String {
        format!("{}cid:{id}", self.prefix)
    }

    fn once(&self, jti: &str) -> String {
        format!("{}once:{jti}", self.prefix)
    }

    fn revoked(&self, jti: &str) -> String {
        format!("{}revoked:{jti}", self.prefix)
    }

    fn blob(&self, key: &str) -> String {
        format!("{}blob:{key}", self.prefix)
    }

    fn client(&self, client: &str) -> String {
        format!("{}client:{client}", self.prefix)
    }

    fn budget(&self, channel: Channel) -> String {
        format!("{}budget:{}", self.prefix, channel.as_str())
    }
}

/// The hash-tag-safe form of a subject.
fn user_tag(subject: &str) -> String {
    hex(&Sha256::digest(subject.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn unhex32(s: &[u8]) -> Option<[u8; 32]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *byte = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

fn parse_pointer(pointer: &str) -> Option<(String, Channel)> {
    let (tag, channel) = pointer.split_once(':')?;
    unhex32(tag.as_bytes())?;
    Some((tag.to_owned(), Channel::parse(channel)?))
}

/// A duration as whole milliseconds, rounded up so nothing expires early.
fn millis(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(MAX_MILLIS).min(MAX_MILLIS)
}

/// A positive expiry in ms, as `PX`/`PEXPIRE` require.
fn expiry(d: Duration) -> u64 {
    millis(d).max(1)
}

/// A `retry_after` from a remaining-time reply, never below 1 ms.
fn retry_after(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0).max(1))
}

fn field<'a>(hash: &'a [(String, Vec<u8>)], name: &str) -> RedisResult<&'a [u8]> {
    hash.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
        .ok_or_else(|| nonsense("challenge hash misses a field"))
}

fn text(hash: &[(String, Vec<u8>)], name: &str) -> RedisResult<String> {
    String::from_utf8(field(hash, name)?.to_vec())
        .map_err(|_| nonsense("challenge field is not UTF-8"))
}

/// The challenge in `hash` if it is challenge `id` and still alive.
fn parse_challenge(
    hash: &[(String, Vec<u8>)],
    id: &str,
    channel: Channel,
) -> RedisResult<Option<Challenge>> {
    if hash.is_empty() || field(hash, "id")? != id.as_bytes() {
        return Ok(None);
    }
    let stored =
        Channel::parse(&text(hash, "channel")?).ok_or_else(|| nonsense("unknown channel"))?;
    if stored != channel {
        return Err(nonsense("challenge stored under another channel"));
    }
    let code_hash = unhex32(field(hash, "code")?).ok_or_else(|| nonsense("malformed code hash"))?;
    let attempts: i64 = text(hash, "attempts")?
        .parse()
        .map_err(|_| nonsense("malformed attempt count"))?;
    if attempts <= 0 {
        return Ok(None);
    }
    Ok(Some(Challenge {
        subject: text(hash, "subject")?,
        session: text(hash, "session")?,
        channel,
        code_hash,
        attempts_left: u32::try_from(attempts)
            .map_err(|_| nonsense("attempt count out of range"))?,
    }))
}

/// Gives one send back on each of `keys` (see `GIVE_BACK_LUA`).
async fn give_back(scripts: &Scripts, conn: &mut Conn, keys: &[String]) -> RedisResult<()> {
    for key in keys {
        let _: i64 = scripts.give_back.key(key).invoke_async(conn).await?;
    }
    Ok(())
}

/// A two-integer script reply.
fn pair(reply: Vec<i64>) -> RedisResult<(i64, i64)> {
    match reply.as_slice() {
        [a, b] => Ok((*a, *b)),
        _ => Err(nonsense("script reply is not a pair")),
    }
}

#[async_trait]
impl ChallengeStore for RedisStore {
    async fn start(&self, c: &NewChallenge, limits: &Limits) -> Result<StartOutcome, StoreError> {
        let tag = user_tag(&c.subject);
        let keys = &self.keys;
        let scripts = &self.scripts;
        let window = expiry(limits.send_window);
        let (code, ms) = self
            .run(|mut conn| async move {
                // The shared counts first, each atomic on its own key; what
                // was taken is given back when a later step refuses.
                let mut taken: Vec<String> = Vec::new();
                let mut caps = Vec::new();
                if limits.max_sends_per_client > 0 {
                    caps.push((keys.client(&c.client), limits.max_sends_per_client, 4));
                }
                if let Some(cap) = limits.budget(c.channel) {
                    caps.push((keys.budget(c.channel), cap, 5));
                }
                for (key, cap, refused) in caps {
                    let reply: Vec<i64> = scripts
                        .take
                        .key(&key)
                        .arg(cap)
                        .arg(window)
                        .invoke_async(&mut conn)
                        .await?;
                    let (code, ms) = pair(reply)?;
                    if code != 0 {
                        give_back(scripts, &mut conn, &taken).await?;
                        return Ok((refused, ms));
                    }
                    taken.push(key);
                }
                // The pointer goes first: if the script then refuses, it just
                // dangles until it expires; the other order could leave a
                // started challenge nobody can find.
                let pointer = format!("{tag}:{}", c.channel.as_str());
                let _: () = redis::cmd("SET")
                    .arg(keys.pointer(&c.id))
                    .arg(pointer)
                    .arg("PX")
                    .arg(expiry(limits.ttl))
                    .query_async(&mut conn)
                    .await?;
                let reply: Vec<i64> = scripts
                    .start
                    .key(keys.lock(&tag))
                    .key(keys.cooldown(&tag, c.channel))
                    .key(keys.sends(&tag))
                    .key(keys.challenge(&tag, c.channel))
                    .arg(&c.id)
                    .arg(&c.subject)
                    .arg(&c.session)
                    .arg(c.channel.as_str())
                    .arg(hex(&c.code_hash))
                    .arg(limits.max_attempts)
                    .arg(expiry(limits.ttl))
                    .arg(millis(limits.resend_after))
                    .arg(limits.max_sends)
                    .arg(window)
                    .arg(expiry(limits.lockout))
                    .invoke_async(&mut conn)
                    .await?;
                let (code, ms) = pair(reply)?;
                if code != 0 {
                    give_back(scripts, &mut conn, &taken).await?;
                }
                Ok((code, ms))
            })
            .await?;
        let retry_after = retry_after(ms);
        match code {
            0 => Ok(StartOutcome::Started),
            1 => Ok(StartOutcome::Locked { retry_after }),
            2 => Ok(StartOutcome::Cooldown { retry_after }),
            3 => Ok(StartOutcome::SendLimit { retry_after }),
            4 => Ok(StartOutcome::ClientLimit { retry_after }),
            5 => Ok(StartOutcome::BudgetExhausted { retry_after }),
            _ => Err(StoreError("redis: unknown start outcome".into())),
        }
    }

    async fn abort(&self, c: &NewChallenge) -> Result<(), StoreError> {
        let tag = user_tag(&c.subject);
        let keys = &self.keys;
        let script = &self.scripts.abort;
        let scripts = &self.scripts;
        self.run(|mut conn| async move {
            let undone: i64 = script
                .key(keys.challenge(&tag, c.channel))
                .key(keys.cooldown(&tag, c.channel))
                .key(keys.sends(&tag))
                .arg(&c.id)
                .invoke_async(&mut conn)
                .await?;
            // Only a start that is undone gives its shared counts back.
            if undone == 1 {
                let shared = [keys.client(&c.client), keys.budget(c.channel)];
                give_back(scripts, &mut conn, &shared).await?;
            }
            Ok(())
        })
        .await
    }

    async fn lookup(&self, id: &str) -> Result<Option<Challenge>, StoreError> {
        self.run(|mut conn| async move {
            let Some((tag, channel)) = self.locate(&mut conn, id).await? else {
                return Ok(None);
            };
            let hash: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
                .arg(self.keys.challenge(&tag, channel))
                .query_async(&mut conn)
                .await?;
            parse_challenge(&hash, id, channel)
        })
        .await
    }

    async fn locked(&self, subject: &str) -> Result<Option<Duration>, StoreError> {
        let key = self.keys.lock(&user_tag(subject));
        let ms: i64 = self
            .run(|mut conn| async move { redis::cmd("PTTL").arg(key).query_async(&mut conn).await })
            .await?;
        match ms {
            -2 => Ok(None),
            // Every lock is written with an expiry; one without is not ours
            // to interpret, so fail closed.
            -1 => Err(StoreError("redis: lock key without expiry".into())),
            ms => Ok(Some(retry_after(ms))),
        }
    }

    async fn consume(&self, id: &str) -> Result<bool, StoreError> {
        let script = &self.scripts.consume;
        self.run(|mut conn| async move {
            let Some((tag, channel)) = self.locate(&mut conn, id).await? else {
                return Ok(false);
            };
            let spent: i64 = script
                .key(self.keys.challenge(&tag, channel))
                .arg(id)
                .invoke_async(&mut conn)
                .await?;
            Ok(spent == 1)
        })
        .await
    }

    async fn fail(&self, id: &str, subject: &str, limits: &Limits) -> Result<Failure, StoreError> {
        let tag = user_tag(subject);
        let keys = &self.keys;
        let script = &self.scripts.fail;
        let (left, locked_ms) = self
            .run(|mut conn| async move {
                let mut invocation = script.key(keys.fails(&tag));
                invocation.key(keys.lock(&tag));
                for channel in Channel::ALL {
                    invocation.key(keys.challenge(&tag, channel));
                }
                let reply: Vec<i64> = invocation
                    .arg(id)
                    .arg(limits.max_failures)
                    .arg(expiry(limits.lockout))
                    .invoke_async(&mut conn)
                    .await?;
                pair(reply)
            })
            .await?;
        Ok(Failure {
            attempts_left: u32::try_from(left)
                .map_err(|_| StoreError("redis: attempt count out of range".into()))?,
            locked_for: (locked_ms > 0).then(|| retry_after(locked_ms)),
        })
    }

    async fn spend_once(&self, jti: &str, ttl: Duration) -> Result<bool, StoreError> {
        let key = self.keys.once(jti);
        let reply: Value = self
            .run(|mut conn| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(expiry(ttl))
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        match reply {
            Value::Okay => Ok(true),
            Value::Nil => Ok(false),
            _ => Err(StoreError("redis: unexpected reply to SET NX".into())),
        }
    }

    async fn revoke(&self, jti: &str, ttl: Duration) -> Result<(), StoreError> {
        let key = self.keys.revoked(jti);
        self.run(|mut conn| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(1)
                .arg("PX")
                .arg(expiry(ttl))
                .query_async::<()>(&mut conn)
                .await
        })
        .await?;
        self.revocations.revoked(jti, ttl);
        // Tell the other instances now; if this is lost they still see the
        // revocation within `MAX_STALENESS` (their cached answers expire).
        let channel = self.channel.clone();
        let msg = revocation::message(jti, ttl);
        if let Err(e) = self
            .run(|mut conn| async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(msg)
                    .query_async::<i64>(&mut conn)
                    .await
            })
            .await
        {
            tracing::warn!(error = %e, "revocation stored but not announced; other instances see it within 1s");
        }
        Ok(())
    }

    async fn is_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        if let Some(known) = self.revocations.lookup(jti) {
            return Ok(known);
        }
        let sent = self.revocations.begin();
        let key = self.keys.revoked(jti);
        let n: i64 =
            self.run(|mut conn| async move {
                redis::cmd("EXISTS").arg(key).query_async(&mut conn).await
            })
            .await?;
        if let Some(sent) = sent {
            self.revocations.answered(jti, n > 0, sent);
        }
        Ok(n > 0)
    }

    async fn put_blob(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let key = self.keys.blob(key);
        self.run(|mut conn| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(expiry(ttl))
                .query_async(&mut conn)
                .await
        })
        .await
    }

    async fn take_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.keys.blob(key);
        self.run(
            |mut conn| async move { redis::cmd("GETDEL").arg(key).query_async(&mut conn).await },
        )
        .await
    }

    fn start_background(&self) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let subscribers = self.unstarted.lock().ok().and_then(|mut s| s.take());
        if let Some(subscribers) = subscribers {
            spawn_subscriber(&self.revocations, subscribers, self.channel.clone());
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let reply: String = self
            .run(|mut conn| async move { redis::cmd("PING").query_async(&mut conn).await })
            .await?;
        if reply == "PONG" {
            Ok(())
        } else {
            Err(StoreError("redis: unexpected reply to PING".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis Cluster's key slot: CRC16/XMODEM of the hash tag (the part
    /// between the first `{` and the next `}`, when not empty) or of the
    /// whole key, modulo 16384.
    fn slot(key: &str) -> u16 {
        let bytes = key.as_bytes();
        let hashed = bytes
            .iter()
            .position(|&b| b == b'{')
            .and_then(|open| {
                let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
                (close > 0).then(|| &bytes[open + 1..open + 1 + close])
            })
            .unwrap_or(bytes);
        let mut crc: u16 = 0;
        for &b in hashed {
            crc ^= u16::from(b) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc % 16384
    }

    #[test]
    // The slot function above is Redis's (test vectors from the cluster spec).
    fn slot_matches_redis() {
        // CRC16/XMODEM("123456789") = 0x31C3 (below 16384, so also the slot).
        assert_eq!(slot("123456789"), 0x31C3);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{bar}{zap}"), slot("bar"));
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
        // An empty first tag: the whole key is hashed.
        assert_ne!(slot("foo{}{bar}"), slot("bar"));
    }

    #[test]
    // Every multi-key script (start, abort, consume, fail) touches only the
    // user's keys, and those share one hash slot for any subject (hash-tag
    // and separator characters included), any allowed prefix and any
    // channel; the other scripts (take, give back) and commands take one key.
    fn every_script_touches_one_slot() {
        for prefix in ["", "stepgate:", "a:b:"] {
            let keys = Keys {
                prefix: prefix.to_owned(),
            };
            for subject in ["alice", "{alice}", "a}b{c", "}:lock", "", "ü{}"] {
                let tag = user_tag(subject);
                let mut user_keys = vec![keys.lock(&tag), keys.fails(&tag), keys.sends(&tag)];
                for channel in Channel::ALL {
                    user_keys.push(keys.cooldown(&tag, channel));
                    user_keys.push(keys.challenge(&tag, channel));
                }
                let want = slot(&format!("{{u:{tag}}}"));
                for key in &user_keys {
                    assert_eq!(slot(key), want, "{key} left the user's slot");
                }
            }
        }
    }
}
