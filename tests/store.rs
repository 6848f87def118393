//! The `ChallengeStore` contract, run against every implementation: the
//! in-memory store, Redis on one node, and a one-node Redis Cluster (which
//! makes Redis reject any script or command whose keys span hash slots).
//! Redis-only tests cover outages, lazy connection and key prefixes.

mod support;

use std::sync::Arc;
use std::time::Duration;

use stepgate::channel::Channel;
use stepgate::store::{
    Challenge, ChallengeStore, Failure, Limits, MemoryStore, NewChallenge, RedisStore,
    StartOutcome, StoreError,
};
use tokio::sync::Barrier;

use support::redis::RedisServer;

type Store = Arc<dyn ChallengeStore>;

/// Concurrent callers in the race tests.
const RACERS: usize = 50;

/// Guard against a hang in the outage tests; far above the store's own bound.
const GUARD: Duration = Duration::from_secs(5);

/// Runs each listed contract test against every store.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(std::sync::Arc::new(stepgate::store::MemoryStore::default())).await;
                }
            )*
        }
        mod redis_node {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let server = crate::RedisServer::start();
                    super::$name(std::sync::Arc::new(crate::Kind::Node.store(&server, "test:"))).await;
                }
            )*
        }
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let server = crate::RedisServer::start_cluster();
                    super::$name(std::sync::Arc::new(crate::Kind::Cluster.store(&server, "test:"))).await;
                }
            )*
        }
    };
}

contract!(
    round_trip,
    restart_ends_previous_challenge,
    cooldown_is_per_channel,
    send_limit_spans_channels,
    challenge_expires,
    abort_refunds_once,
    wrong_codes_use_up_attempts,
    lockout_spans_challenges,
    one_consume_wins,
    spend_once_is_once,
    revocation,
    expiry_edge_marks_outlive_token_acceptance,
    send_abuse_client_cap_spans_users_and_channels,
    send_abuse_budget_is_per_channel_across_users,
    send_abuse_refused_start_takes_no_shared_count,
    send_abuse_parallel_starts_never_exceed_shared_caps,
    blobs_are_taken_once,
    subjects_are_isolated,
);

/// Runs each listed Redis-only test against a node and a cluster.
macro_rules! redis_only {
    ($($name:ident),* $(,)?) => {
        mod redis_node_only {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(crate::Kind::Node).await;
                }
            )*
        }
        mod redis_cluster_only {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(crate::Kind::Cluster).await;
                }
            )*
        }
    };
}

redis_only!(
    revocation_converges_without_notification,
    recovers_after_outage,
    starts_without_redis,
    prefix_isolates_stores
);

#[derive(Clone, Copy)]
enum Kind {
    Node,
    Cluster,
}

impl Kind {
    fn server(self) -> RedisServer {
        match self {
            Kind::Node => RedisServer::start(),
            Kind::Cluster => RedisServer::start_cluster(),
        }
    }

    fn store(self, server: &RedisServer, prefix: &str) -> RedisStore {
        let store = match self {
            Kind::Node => RedisStore::new(&server.url(), prefix),
            Kind::Cluster => RedisStore::cluster(&[server.url()], prefix),
        };
        ok(store)
    }
}

fn ok<T>(result: Result<T, StoreError>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("store operation failed: {e}"),
    }
}

fn limits() -> Limits {
    Limits {
        ttl: Duration::from_secs(60),
        max_attempts: 3,
        resend_after: Duration::from_secs(30),
        max_sends: 10,
        send_window: Duration::from_secs(3600),
        lockout: Duration::from_secs(600),
        max_failures: 5,
        max_sends_per_client: 0,
        email_budget: None,
        sms_budget: None,
    }
}

fn challenge(id: &str, subject: &str, channel: Channel) -> NewChallenge {
    // Zero and 0xff bytes included, so a store that is not binary-safe shows.
    let mut code_hash = [0u8; 32];
    for (i, b) in code_hash.iter_mut().enumerate() {
        *b = u8::try_from(i * 8).unwrap_or(0xff) ^ u8::try_from(id.len()).unwrap_or(0);
    }
    code_hash[0] = 0;
    code_hash[31] = 0xff;
    NewChallenge {
        id: id.to_owned(),
        subject: subject.to_owned(),
        session: format!("session-of-{id}"),
        channel,
        code_hash,
        client: "192.0.2.1".to_owned(),
    }
}

fn from_client(mut c: NewChallenge, client: &str) -> NewChallenge {
    c.client = client.to_owned();
    c
}

async fn start(store: &Store, c: &NewChallenge, limits: &Limits) -> StartOutcome {
    ok(store.start(c, limits).await)
}

fn stored(c: &NewChallenge, attempts_left: u32) -> Option<Challenge> {
    Some(Challenge {
        subject: c.subject.clone(),
        session: c.session.clone(),
        channel: c.channel,
        code_hash: c.code_hash,
        attempts_left,
    })
}

// Protects against fields lost or mangled on their way through the store.
async fn round_trip(store: Store) {
    let l = limits();
    let c = challenge("c1", "alice@example.com", Channel::Email);
    assert_eq!(start(&store, &c, &l).await, StartOutcome::Started);
    assert_eq!(ok(store.lookup("c1").await), stored(&c, 3));
    assert_eq!(ok(store.lookup("unknown").await), None);
    assert!(!ok(store.consume("unknown").await));
    assert_eq!(ok(store.locked("alice@example.com").await), None);
    ok(store.ping().await);
}

// Protects against two live codes for one user and channel after a resend.
async fn restart_ends_previous_challenge(store: Store) {
    let l = Limits {
        resend_after: Duration::ZERO,
        ..limits()
    };
    let first = challenge("c1", "alice", Channel::Email);
    let second = challenge("c2", "alice", Channel::Email);
    let other_channel = challenge("c3", "alice", Channel::Sms);
    assert_eq!(start(&store, &first, &l).await, StartOutcome::Started);
    assert_eq!(start(&store, &second, &l).await, StartOutcome::Started);
    assert_eq!(ok(store.lookup("c1").await), None);
    assert!(!ok(store.consume("c1").await));
    assert_eq!(ok(store.lookup("c2").await), stored(&second, 3));
    assert_eq!(
        start(&store, &other_channel, &l).await,
        StartOutcome::Started
    );
    assert_eq!(ok(store.lookup("c2").await), stored(&second, 3));
    assert_eq!(ok(store.lookup("c3").await), stored(&other_channel, 3));
}

// Protects against code flooding on one channel, and one channel's cooldown blocking the other.
async fn cooldown_is_per_channel(store: Store) {
    let l = limits();
    let first = challenge("c1", "alice", Channel::Email);
    assert_eq!(start(&store, &first, &l).await, StartOutcome::Started);
    match start(&store, &challenge("c2", "alice", Channel::Email), &l).await {
        StartOutcome::Cooldown { retry_after } => {
            assert!(
                !retry_after.is_zero() && retry_after <= l.resend_after,
                "{retry_after:?}"
            );
        }
        other => panic!("expected a cooldown, got {other:?}"),
    }
    // A refused start must neither store its challenge nor end the open one.
    assert_eq!(ok(store.lookup("c2").await), None);
    assert_eq!(ok(store.lookup("c1").await), stored(&first, 3));
    let sms = challenge("c3", "alice", Channel::Sms);
    assert_eq!(start(&store, &sms, &l).await, StartOutcome::Started);
}

// Protects against unlimited sends by switching channels or skipping cooldowns.
async fn send_limit_spans_channels(store: Store) {
    let l = Limits {
        resend_after: Duration::ZERO,
        max_sends: 3,
        ..limits()
    };
    for (id, channel) in [
        ("c1", Channel::Email),
        ("c2", Channel::Sms),
        ("c3", Channel::Email),
    ] {
        assert_eq!(
            start(&store, &challenge(id, "alice", channel), &l).await,
            StartOutcome::Started
        );
    }
    match start(&store, &challenge("c4", "alice", Channel::Sms), &l).await {
        StartOutcome::SendLimit { retry_after } => {
            assert!(
                !retry_after.is_zero() && retry_after <= l.send_window,
                "{retry_after:?}"
            );
        }
        other => panic!("expected the send limit, got {other:?}"),
    }
    assert_eq!(ok(store.lookup("c4").await), None);
    let bob = challenge("c5", "bob", Channel::Sms);
    assert_eq!(start(&store, &bob, &l).await, StartOutcome::Started);
}

// Protects against codes that stay usable past their ttl.
async fn challenge_expires(store: Store) {
    let l = Limits {
        ttl: Duration::from_millis(250),
        ..limits()
    };
    let c = challenge("c1", "alice", Channel::Email);
    assert_eq!(start(&store, &c, &l).await, StartOutcome::Started);
    assert_eq!(ok(store.lookup("c1").await), stored(&c, 3));
    // Waiting out the ttl is the behaviour under test.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ok(store.lookup("c1").await), None);
    assert!(!ok(store.consume("c1").await));
}

// Protects against a failed delivery costing the user a cooldown or a send, and repeated aborts refunding extra sends.
async fn abort_refunds_once(store: Store) {
    let l = Limits {
        max_sends: 1,
        ..limits()
    };
    let first = challenge("c1", "alice", Channel::Email);
    assert_eq!(start(&store, &first, &l).await, StartOutcome::Started);
    ok(store.abort(&first).await);
    assert_eq!(ok(store.lookup("c1").await), None);
    // Neither the cooldown nor the one allowed send is used up.
    let second = challenge("c2", "alice", Channel::Email);
    assert_eq!(start(&store, &second, &l).await, StartOutcome::Started);
    // A late abort of the replaced challenge touches neither c2 nor the count.
    ok(store.abort(&first).await);
    assert_eq!(ok(store.lookup("c2").await), stored(&second, 3));
    assert!(matches!(
        start(&store, &challenge("c3", "alice", Channel::Sms), &l).await,
        StartOutcome::SendLimit { .. }
    ));

    let l = Limits {
        max_sends: 2,
        resend_after: Duration::ZERO,
        ..limits()
    };
    assert_eq!(
        start(&store, &challenge("d1", "bob", Channel::Email), &l).await,
        StartOutcome::Started
    );
    let aborted = challenge("d2", "bob", Channel::Sms);
    assert_eq!(start(&store, &aborted, &l).await, StartOutcome::Started);
    ok(store.abort(&aborted).await);
    ok(store.abort(&aborted).await);
    assert_eq!(
        start(&store, &challenge("d3", "bob", Channel::Sms), &l).await,
        StartOutcome::Started
    );
    // d1 and d3 count: the second abort of d2 refunded nothing.
    assert!(matches!(
        start(&store, &challenge("d4", "bob", Channel::Email), &l).await,
        StartOutcome::SendLimit { .. }
    ));
}

// Protects against unlimited guesses at one code.
async fn wrong_codes_use_up_attempts(store: Store) {
    let l = Limits {
        max_failures: 100,
        ..limits()
    };
    let c = challenge("c1", "alice", Channel::Email);
    assert_eq!(start(&store, &c, &l).await, StartOutcome::Started);
    for left in [2, 1] {
        let failure = ok(store.fail("c1", "alice", &l).await);
        assert_eq!(
            failure,
            Failure {
                attempts_left: left,
                locked_for: None
            }
        );
        assert_eq!(ok(store.lookup("c1").await), stored(&c, left));
    }
    let last = ok(store.fail("c1", "alice", &l).await);
    assert_eq!(
        last,
        Failure {
            attempts_left: 0,
            locked_for: None
        }
    );
    assert_eq!(ok(store.lookup("c1").await), None);
    assert!(!ok(store.consume("c1").await));
    // Failures named for another subject leave the challenge alone.
    let d = challenge("d1", "bob", Channel::Email);
    assert_eq!(start(&store, &d, &l).await, StartOutcome::Started);
    assert_eq!(ok(store.fail("d1", "mallory", &l).await).attempts_left, 0);
    assert_eq!(ok(store.lookup("d1").await), stored(&d, 3));
}

// Protects against guessing across fresh challenges, and new challenges wiping the failure count.
async fn lockout_spans_challenges(store: Store) {
    let l = Limits {
        max_attempts: 2,
        max_failures: 3,
        resend_after: Duration::ZERO,
        ..limits()
    };
    assert_eq!(ok(store.locked("alice").await), None);
    let first = challenge("c1", "alice", Channel::Email);
    assert_eq!(start(&store, &first, &l).await, StartOutcome::Started);
    assert_eq!(ok(store.fail("c1", "alice", &l).await).locked_for, None);
    assert_eq!(ok(store.fail("c1", "alice", &l).await).locked_for, None);

    let second = challenge("c2", "alice", Channel::Email);
    assert_eq!(start(&store, &second, &l).await, StartOutcome::Started);
    let failure = ok(store.fail("c2", "alice", &l).await);
    assert_eq!(failure.attempts_left, 1);
    let locked_for = failure
        .locked_for
        .expect("the third failure locks the user out");
    assert!(
        !locked_for.is_zero() && locked_for <= l.lockout,
        "{locked_for:?}"
    );

    let locked = ok(store.locked("alice").await).expect("locked() reports the lockout");
    assert!(!locked.is_zero() && locked <= l.lockout, "{locked:?}");
    match start(&store, &challenge("c3", "alice", Channel::Sms), &l).await {
        StartOutcome::Locked { retry_after } => assert!(retry_after <= l.lockout),
        other => panic!("expected a lockout, got {other:?}"),
    }
    assert!(ok(store.fail("c2", "alice", &l).await).locked_for.is_some());
    assert_eq!(ok(store.locked("bob").await), None);
}

// Protects against one code being redeemed by several racing requests.
async fn one_consume_wins(store: Store) {
    let c = challenge("c1", "alice", Channel::Email);
    assert_eq!(start(&store, &c, &limits()).await, StartOutcome::Started);
    let barrier = Arc::new(Barrier::new(RACERS));
    let racers: Vec<_> = (0..RACERS)
        .map(|_| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.consume("c1").await
            })
        })
        .collect();
    let mut winners = 0;
    for racer in racers {
        if ok(racer.await.expect("racer task")) {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(ok(store.lookup("c1").await), None);
}

// Protects against a one-time token being accepted twice by racing requests.
async fn spend_once_is_once(store: Store) {
    let barrier = Arc::new(Barrier::new(RACERS));
    let racers: Vec<_> = (0..RACERS)
        .map(|_| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.spend_once("jti-1", Duration::from_secs(60)).await
            })
        })
        .collect();
    let mut winners = 0;
    for racer in racers {
        if ok(racer.await.expect("racer task")) {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
    assert!(ok(store.spend_once("jti-2", Duration::from_secs(60)).await));
}

// Protects against revoked tokens passing, and revocation leaking to other ids or into spend_once.
async fn revocation(store: Store) {
    assert!(!ok(store.is_revoked("jti-1").await));
    ok(store.revoke("jti-1", Duration::from_secs(60)).await);
    assert!(ok(store.is_revoked("jti-1").await));
    assert!(!ok(store.is_revoked("jti-2").await));
    assert!(ok(store.spend_once("jti-1", Duration::from_secs(60)).await));

    ok(store.revoke("jti-3", Duration::from_millis(250)).await);
    assert!(ok(store.is_revoked("jti-3").await));
    // Waiting out the revocation's ttl is the behaviour under test.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!ok(store.is_revoked("jti-3").await));
}

// Expiry edges (#10.5): a spent or revoked mark written with the ttl the
// gateway uses must still be there in the last second its token can be
// accepted (whole-second `exp` plus leeway). The token here is accepted
// until the end of the next whole second, so the test takes one to two.
async fn expiry_edge_marks_outlive_token_acceptance(store: Store) {
    use stepgate::token::{mark_ttl, unix_now, LEEWAY_SECS};
    // Connect first (a cluster client takes a while): the window is short.
    ok(store.ping().await);
    // A loaded machine can stall past the last accepted second before the
    // first check in it; such a round proves nothing and is tried again with
    // fresh keys. Every check that does run must hold.
    for round in 0..5 {
        let spent = format!("edge-spent-{round}");
        let revoked = format!("edge-revoked-{round}");
        let exp = unix_now() + 1 - LEEWAY_SECS;
        assert!(ok(store.spend_once(&spent, mark_ttl(exp)).await));
        ok(store.revoke(&revoked, mark_ttl(exp)).await);
        let mut last_second = 0;
        while unix_now() <= exp + LEEWAY_SECS {
            let checked_at = unix_now();
            assert!(
                !ok(store.spend_once(&spent, mark_ttl(exp)).await),
                "spent twice while the token is still accepted"
            );
            assert!(
                ok(store.is_revoked(&revoked).await),
                "revocation gone while the token is still accepted"
            );
            if checked_at == exp + LEEWAY_SECS && unix_now() == checked_at {
                last_second += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if last_second > 0 {
            return;
        }
    }
    panic!("nothing checked in the last accepted second in five rounds");
}

// SMS pumping: one client cycling through many accounts (and channels) is
// capped by max_sends_per_client; another client is not; an aborted start
// (failed delivery) gives its count back.
async fn send_abuse_client_cap_spans_users_and_channels(store: Store) {
    let l = Limits {
        max_sends_per_client: 3,
        ..limits()
    };
    let started = [
        challenge("c1", "u1", Channel::Sms),
        challenge("c2", "u2", Channel::Email),
        challenge("c3", "u3", Channel::Sms),
    ];
    for c in &started {
        assert_eq!(start(&store, c, &l).await, StartOutcome::Started);
    }
    let fourth = challenge("c4", "u4", Channel::Email);
    match start(&store, &fourth, &l).await {
        StartOutcome::ClientLimit { retry_after } => {
            assert!(
                !retry_after.is_zero() && retry_after <= l.send_window,
                "{retry_after:?}"
            );
        }
        other => panic!("expected the client cap, got {other:?}"),
    }
    assert_eq!(ok(store.lookup("c4").await), None);
    let elsewhere = from_client(challenge("c5", "u5", Channel::Sms), "2001:db8::1/64");
    assert_eq!(start(&store, &elsewhere, &l).await, StartOutcome::Started);
    ok(store.abort(&started[2]).await);
    assert_eq!(start(&store, &fourth, &l).await, StartOutcome::Started);
    // A cap of zero is no cap.
    let off = Limits {
        max_sends_per_client: 0,
        ..limits()
    };
    let more = challenge("c6", "u6", Channel::Email);
    assert_eq!(start(&store, &more, &off).await, StartOutcome::Started);
}

// The costliest abuse: many clients and accounts together cannot send more
// than a channel's budget per window; the other channel keeps its own; an
// aborted start gives its send back.
async fn send_abuse_budget_is_per_channel_across_users(store: Store) {
    let l = Limits {
        sms_budget: Some(2),
        email_budget: Some(5),
        ..limits()
    };
    let first = from_client(challenge("c1", "u1", Channel::Sms), "192.0.2.1");
    let second = from_client(challenge("c2", "u2", Channel::Sms), "192.0.2.2");
    assert_eq!(start(&store, &first, &l).await, StartOutcome::Started);
    assert_eq!(start(&store, &second, &l).await, StartOutcome::Started);
    let third = from_client(challenge("c3", "u3", Channel::Sms), "192.0.2.3");
    match start(&store, &third, &l).await {
        StartOutcome::BudgetExhausted { retry_after } => {
            assert!(
                !retry_after.is_zero() && retry_after <= l.send_window,
                "{retry_after:?}"
            );
        }
        other => panic!("expected the SMS budget spent, got {other:?}"),
    }
    assert_eq!(ok(store.lookup("c3").await), None);
    let email = from_client(challenge("c4", "u3", Channel::Email), "192.0.2.3");
    assert_eq!(start(&store, &email, &l).await, StartOutcome::Started);
    ok(store.abort(&second).await);
    assert_eq!(start(&store, &third, &l).await, StartOutcome::Started);
    let none = Limits {
        sms_budget: Some(0),
        ..limits()
    };
    let blocked = from_client(challenge("c5", "u5", Channel::Sms), "192.0.2.5");
    assert!(matches!(
        start(&store, &blocked, &none).await,
        StartOutcome::BudgetExhausted { .. }
    ));
}

// A start refused by a later check (the user's cooldown, the budget) must
// not keep the shared counts it checked first, or refused requests would
// use up a client's cap or the budget without sending anything.
async fn send_abuse_refused_start_takes_no_shared_count(store: Store) {
    let l = Limits {
        max_sends_per_client: 2,
        sms_budget: Some(2),
        ..limits()
    };
    let first = challenge("c1", "u1", Channel::Sms);
    assert_eq!(start(&store, &first, &l).await, StartOutcome::Started);
    for i in 0..5 {
        let again = challenge(&format!("r{i}"), "u1", Channel::Sms);
        assert!(matches!(
            start(&store, &again, &l).await,
            StartOutcome::Cooldown { .. }
        ));
    }
    let second = challenge("c2", "u2", Channel::Sms);
    assert_eq!(start(&store, &second, &l).await, StartOutcome::Started);
    // The client is now at its cap: the budget was not consulted, so a
    // refused start from elsewhere still finds the budget where it was.
    assert!(matches!(
        start(&store, &challenge("c3", "u3", Channel::Sms), &l).await,
        StartOutcome::ClientLimit { .. }
    ));
    let elsewhere = from_client(challenge("c4", "u4", Channel::Sms), "192.0.2.9");
    assert!(matches!(
        start(&store, &elsewhere, &l).await,
        StartOutcome::BudgetExhausted { .. }
    ));
    let email = from_client(challenge("c5", "u5", Channel::Email), "192.0.2.9");
    assert_eq!(start(&store, &email, &l).await, StartOutcome::Started);
}

// Parallel starts from many accounts never get past a shared cap.
async fn send_abuse_parallel_starts_never_exceed_shared_caps(store: Store) {
    for (limits, client_of) in [
        (
            Limits {
                max_sends_per_client: 7,
                ..limits()
            },
            (|_| "192.0.2.1".to_owned()) as fn(usize) -> String,
        ),
        (
            Limits {
                sms_budget: Some(7),
                ..limits()
            },
            (|i| format!("198.51.100.{i}")) as fn(usize) -> String,
        ),
    ] {
        let limits = Arc::new(limits);
        let barrier = Arc::new(Barrier::new(RACERS));
        let round = client_of(1000);
        let racers: Vec<_> = (0..RACERS)
            .map(|i| {
                let (store, barrier, limits) = (store.clone(), barrier.clone(), limits.clone());
                let c = from_client(
                    challenge(
                        &format!("p{round}-{i}"),
                        &format!("{round}-u{i}"),
                        Channel::Sms,
                    ),
                    &client_of(i),
                );
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.start(&c, &limits).await
                })
            })
            .collect();
        let mut started = 0;
        for racer in racers {
            match ok(racer.await.expect("racer task")) {
                StartOutcome::Started => started += 1,
                StartOutcome::ClientLimit { .. } | StartOutcome::BudgetExhausted { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(started, 7);
    }
}

// Protects against a stashed request or CSRF nonce being used twice or outliving its ttl.
async fn blobs_are_taken_once(store: Store) {
    let value: Vec<u8> = (0..=255).collect();
    ok(store.put_blob("k1", &value, Duration::from_secs(60)).await);
    assert_eq!(ok(store.take_blob("k1").await), Some(value));
    assert_eq!(ok(store.take_blob("k1").await), None);
    assert_eq!(ok(store.take_blob("never").await), None);

    ok(store
        .put_blob("k2", b"short", Duration::from_millis(250))
        .await);
    // Waiting out the blob's ttl is the behaviour under test.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ok(store.take_blob("k2").await), None);
}

// Protects against subjects with hash-tag or separator characters sharing another user's state.
async fn subjects_are_isolated(store: Store) {
    let l = Limits {
        max_sends: 1,
        max_failures: 1,
        ..limits()
    };
    let subjects = [
        "alice",
        "alice}",
        "{alice}",
        "alice:lock",
        "a{b}:c",
        "}:sends",
        "",
    ];
    let challenges: Vec<_> = subjects
        .iter()
        .enumerate()
        .map(|(i, s)| challenge(&format!("c{i}"), s, Channel::Email))
        .collect();
    for c in &challenges {
        assert_eq!(
            start(&store, c, &l).await,
            StartOutcome::Started,
            "{:?}",
            c.subject
        );
    }
    for c in &challenges {
        assert_eq!(ok(store.lookup(&c.id).await), stored(c, 3));
    }
    assert!(ok(store.fail("c0", "alice", &l).await).locked_for.is_some());
    assert!(ok(store.locked("alice").await).is_some());
    for subject in &subjects[1..] {
        assert_eq!(ok(store.locked(subject).await), None, "{subject:?}");
    }
}

// Protects against an in-memory store growing without bound instead of failing closed.
#[tokio::test]
async fn memory_store_is_bounded() {
    let l = Limits {
        ttl: Duration::from_millis(200),
        resend_after: Duration::from_millis(200),
        send_window: Duration::from_millis(200),
        ..limits()
    };
    // Each started challenge takes two entries: its user and its id.
    let store: Store = Arc::new(MemoryStore::new(4));
    for user in ["u1", "u2"] {
        let c = challenge(&format!("{user}-c"), user, Channel::Email);
        assert_eq!(start(&store, &c, &l).await, StartOutcome::Started);
    }
    let third = challenge("u3-c", "u3", Channel::Email);
    assert!(store.start(&third, &l).await.is_err());
    assert!(store
        .put_blob("k", b"v", Duration::from_secs(1))
        .await
        .is_err());
    // Waiting for the entries to expire is the behaviour under test.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(start(&store, &third, &l).await, StartOutcome::Started);
}

// Protects against an instance serving a revoked token for longer than the
// documented bound when the revocation notification never reaches it: its
// cached "not revoked" answer runs out and Redis is asked again.
async fn revocation_converges_without_notification(kind: Kind) {
    let server = kind.server();
    let b = kind.store(&server, "other:");
    // Until b's subscription is up it asks Redis every time; wait for it so
    // the answer below is really cached.
    let deadline = std::time::Instant::now() + GUARD;
    while !b.revocations().is_live() {
        assert!(
            std::time::Instant::now() < deadline,
            "subscription never came up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!ok(b.is_revoked("jti-x").await));
    // Revoke behind b's back (no notification, as if it were lost): b
    // must converge by itself.
    let client = redis::Client::open(server.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let () = redis::cmd("SET")
        .arg("other:revoked:jti-x")
        .arg(1)
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("SET");
    let revoked_at = std::time::Instant::now();
    let bound = stepgate::store::revocation::MAX_STALENESS;
    loop {
        if ok(b.is_revoked("jti-x").await) {
            break;
        }
        assert!(
            revoked_at.elapsed() < bound + Duration::from_secs(2),
            "revocation not seen within the bound"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// Protects against a Redis outage hanging requests or needing a gateway restart to recover.
async fn recovers_after_outage(kind: Kind) {
    let mut server = kind.server();
    let store = kind.store(&server, "test:");
    let l = limits();
    assert_eq!(
        start_on(&store, &challenge("c1", "alice", Channel::Email), &l).await,
        Ok(StartOutcome::Started)
    );

    server.stop();
    let down = tokio::time::timeout(GUARD, async {
        (
            store.ping().await.is_err(),
            store
                .start(&challenge("c2", "bob", Channel::Email), &l)
                .await
                .is_err(),
            store.lookup("c1").await.is_err(),
            store.consume("c1").await.is_err(),
        )
    })
    .await
    .expect("a dead Redis must yield errors, not a hang");
    assert_eq!(down, (true, true, true, true));

    server.start_again();
    let up = tokio::time::timeout(GUARD, async {
        store.ping().await?;
        store
            .start(&challenge("c3", "carol", Channel::Email), &l)
            .await
    })
    .await
    .expect("a restarted Redis must answer, not hang");
    assert_eq!(up.map_err(|e| e.to_string()), Ok(StartOutcome::Started));
}

async fn start_on(
    store: &RedisStore,
    c: &NewChallenge,
    l: &Limits,
) -> Result<StartOutcome, String> {
    store.start(c, l).await.map_err(|e| e.to_string())
}

// Protects against the gateway failing to start, or hanging, while Redis is down.
async fn starts_without_redis(kind: Kind) {
    let mut server = kind.server();
    server.stop();
    let store = kind.store(&server, "test:");
    let result = tokio::time::timeout(GUARD, store.ping())
        .await
        .expect("a missing Redis must yield an error, not a hang");
    assert!(result.is_err());

    server.start_again();
    let result = tokio::time::timeout(GUARD, store.ping())
        .await
        .expect("Redis coming up must be noticed, not hang");
    assert!(result.is_ok(), "{result:?}");

    assert!(RedisStore::new("no scheme here", "test:").is_err());
    assert!(RedisStore::new(&server.url(), "te{st}:").is_err());
}

// Protects against two deployments sharing one Redis seeing each other's state.
async fn prefix_isolates_stores(kind: Kind) {
    let server = kind.server();
    let a = kind.store(&server, "a:");
    let b = kind.store(&server, "b:");
    let l = Limits {
        max_failures: 1,
        ..limits()
    };
    let c = challenge("c1", "alice", Channel::Email);
    assert_eq!(start_on(&a, &c, &l).await, Ok(StartOutcome::Started));
    assert_eq!(start_on(&b, &c, &l).await, Ok(StartOutcome::Started));
    assert!(ok(a.consume("c1").await));
    assert_eq!(ok(b.lookup("c1").await), stored(&c, 3));

    assert!(ok(a.fail("c1", "alice", &l).await).locked_for.is_some());
    assert_eq!(ok(b.locked("alice").await), None);

    ok(a.put_blob("k", b"v", Duration::from_secs(60)).await);
    assert_eq!(ok(b.take_blob("k").await), None);
    ok(a.revoke("jti", Duration::from_secs(60)).await);
    assert!(!ok(b.is_revoked("jti").await));
}

#[tokio::test]
// Redis over TLS: a rediss:// store verifies the server against the
// configured CA and works; without that CA the connection is refused.
async fn redis_over_tls_with_configured_ca() {
    let certs = tempfile::tempdir().expect("tempdir");
    let status = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/certs/gen-dev-cert.sh"
    ))
    .arg(certs.path())
    .stdout(std::process::Stdio::null())
    .status()
    .expect("gen-dev-cert.sh");
    assert!(status.success());
    let server = support::redis::RedisServer::start_tls(certs.path());
    let ca = std::fs::read(certs.path().join("ca.crt")).expect("ca");
    let store =
        stepgate::store::RedisStore::with_ca(&server.tls_url(), "tls:", Some(ca)).expect("store");
    use stepgate::store::ChallengeStore;
    store.ping().await.expect("TLS ping");
    assert!(store
        .spend_once("jti-1", std::time::Duration::from_secs(5))
        .await
        .expect("spend"));
    assert!(!store
        .spend_once("jti-1", std::time::Duration::from_secs(5))
        .await
        .expect("spend"));
    let untrusted = stepgate::store::RedisStore::new(&server.tls_url(), "tls:").expect("store");
    assert!(
        untrusted.ping().await.is_err(),
        "connected to a server with an unknown CA"
    );
}
