//! The step-up layer: demands a fresh second factor on protected routes, and
//! serves the gateway's own challenge API (`api.rs`) and page (`page.rs`).

mod api;
mod page;
mod settings;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response};

use crate::channel::Channel;
use crate::delivery::{ConsoleNotifier, EmailNotifier, Notifier, SmsNotifier};
use crate::http::{cookies, read_limited, Body, Carried, Rejection};
use crate::identity::Identity;
use crate::policy::{Rule, StepUp as Need};
use crate::proxy::ClientConn;
use crate::store::{ChallengeStore, Limits};
use crate::telemetry::{audit, AuditContext, AuditEvent, Metrics, Mode};
use crate::token::{session_hash, unix_now, SecondFactor, Tokens};

pub use self::page::safe_rd;
pub use self::settings::{Branding, OtpSettings, SendBudget, Settings};

/// The result of checking a request against a step-up rule.
pub enum StepupCheck {
    /// A fresh factor bound to this identity: forward.
    Fresh(SecondFactor),
    /// The identity provider's own fresh second factor satisfies the rule
    /// (`stepup.idp`): forward.
    FreshFromIdp(IdpProof),
    /// No usable factor: answer with a challenge.
    Needed,
    /// The store could not be asked: fail closed.
    Unavailable,
}

/// A second factor the identity provider did, accepted for one request:
/// what the primary token said about its sign-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdpProof {
    /// Unix seconds of the sign-in (the token's `auth_time`).
    pub auth_time: u64,
    pub amr: Vec<String>,
    pub acr: Option<String>,
}

/// Clock skew allowed on an `auth_time` in the future.
const AUTH_TIME_SKEW: u64 = 30;

/// Whether `id`'s sign-in at the identity provider satisfies `idp` for a
/// rule with `max_age`: `auth_time` recent enough, and one of the listed
/// `amr` values present or `acr` one of the listed values.
fn idp_proof(id: &Identity, idp: &crate::policy::IdpFactor, max_age: Duration) -> Option<IdpProof> {
    let auth_time = id.auth_time?;
    let now = unix_now();
    if auth_time > now + AUTH_TIME_SKEW || now.saturating_sub(auth_time) > max_age.as_secs() {
        return None;
    }
    let by_amr = id.amr.iter().any(|a| idp.amr.contains(a));
    let by_acr = id.acr.as_ref().is_some_and(|a| idp.acr.contains(a));
    (by_amr || by_acr).then(|| IdpProof {
        auth_time,
        amr: id.amr.clone(),
        acr: id.acr.clone(),
    })
}

/// A browser form post kept across the challenge, as stored. One per
/// session: a newer post replaces the older one, so no client can pile up
/// stashes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Stash {
    /// The random id the challenge page carries (`stash=`).
    pub id: String,
    /// The session it belongs to (hashed, like everything in the store).
    pub session: String,
    /// Path and query the form was posted to.
    pub target: String,
    /// The `application/x-www-form-urlencoded` body.
    pub body: String,
}

impl Stash {
    /// Where a session's stash lives in the store.
    fn key(id: &Identity) -> String {
        format!("stash:{}", session_hash(&id.session))
    }

    /// The stored stash, if it is the one `stash_id` names and belongs to
    /// this session.
    fn decode(bytes: &[u8], stash_id: &str, id: &Identity) -> Option<Stash> {
        let stash: Stash = serde_json::from_slice(bytes).ok()?;
        (stash.id == stash_id && stash.session == session_hash(&id.session)).then_some(stash)
    }
}

/// Whether the browser says the request comes from another site:
/// `Sec-Fetch-Site` other than `same-origin`/`none`, else an `Origin` whose
/// host is not the request's. Without either signal (old browsers) the
/// post counts as same-site.
fn cross_site(headers: &HeaderMap, host: Option<&str>) -> bool {
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = value("sec-fetch-site") {
        return !matches!(site.trim(), "same-origin" | "none");
    }
    match value("origin") {
        None => false,
        Some(origin) => {
            let origin_host = origin
                .split_once("://")
                .map(|(_, rest)| rest.trim_end_matches('/'));
            origin_host.is_none() || origin_host != host
        }
    }
}

/// What the config's build step built for `stepup`: the token keys and
/// the notifiers of the configured channels.
#[derive(Clone)]
pub struct Parts {
    pub tokens: Tokens,
    pub email: Option<Arc<EmailNotifier>>,
    pub sms: Option<Arc<SmsNotifier>>,
}

/// Step-up state shared by all requests of one policy generation.
pub struct Stepup {
    cfg: Settings,
    tokens: Tokens,
    store: Arc<dyn ChallengeStore>,
    email: Option<Arc<dyn Notifier>>,
    sms: Option<Arc<dyn Notifier>>,
    console: Option<Arc<ConsoleNotifier>>,
    limits: Limits,
    metrics: Arc<Metrics>,
    secure_cookies: bool,
    /// `listen.trusted_proxies`: whose `X-Forwarded-For` names the client.
    trusted_proxies: Vec<ipnet::IpNet>,
}

impl Stepup {
    /// `parts` are what the config's build step built from `cfg`;
    /// `secure_cookies` when the listener serves TLS; `trusted_proxies`
    /// are the peers whose `X-Forwarded-For` names the client.
    pub fn new(
        cfg: &Settings,
        parts: Parts,
        secure_cookies: bool,
        trusted_proxies: Vec<ipnet::IpNet>,
        store: Arc<dyn ChallengeStore>,
        metrics: Arc<Metrics>,
    ) -> Stepup {
        let cfg = cfg.clone();
        let email = parts.email.map(|n| n as Arc<dyn Notifier>);
        let sms = parts.sms.map(|n| n as Arc<dyn Notifier>);
        let console = cfg.console.then(|| Arc::new(ConsoleNotifier::new()));
        let o = &cfg.otp;
        let limits = Limits {
            ttl: o.ttl,
            max_attempts: o.max_attempts,
            resend_after: o.resend_after,
            max_sends: o.max_sends,
            send_window: Duration::from_secs(3600),
            lockout: o.lockout,
            max_failures: o.max_failures,
            max_sends_per_client: o.max_sends_per_client,
            email_budget: cfg.budget.email_per_hour,
            sms_budget: cfg.budget.sms_per_hour,
        };
        Stepup {
            tokens: parts.tokens,
            cfg,
            store,
            email,
            sms,
            console,
            limits,
            metrics,
            secure_cookies,
            trusted_proxies,
        }
    }

    /// The console notifier, in dev/demo mode.
    pub fn console(&self) -> Option<&Arc<ConsoleNotifier>> {
        self.console.as_ref()
    }

    /// Whether a code can be sent on any of `factors` (a channel of them
    /// is configured, or the console in dev mode). A rule whose factors
    /// none can serve is one only the identity provider satisfies.
    pub fn sends_codes_for(&self, factors: &[Channel]) -> bool {
        self.console.is_some()
            || factors.iter().any(|c| match c {
                Channel::Email => self.email.is_some(),
                Channel::Sms => self.sms.is_some(),
            })
    }

    /// The second-factor token presented with a request (header first).
    fn presented_token<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        headers
            .get(&self.cfg.token.header)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim())
            .filter(|v| !v.is_empty())
            .or_else(|| cookies::cookie(headers, &self.cfg.token.cookie))
    }

    /// Remove the second-factor token header and cookie before forwarding
    /// (those of the two `carried` says the request may have).
    pub fn strip_token(&self, headers: &mut HeaderMap, carried: &Carried) {
        if carried.second_factor {
            headers.remove(&self.cfg.token.header);
        }
        if carried.cookie {
            cookies::remove_cookie(headers, &self.cfg.token.cookie);
        }
    }

    /// Does this request carry a fresh factor bound to `id` for `rule`?
    pub async fn check(
        &self,
        headers: &HeaderMap,
        id: &Identity,
        rule: &Rule,
        need: &Need,
        client: IpAddr,
        mode: Mode,
    ) -> StepupCheck {
        if let Some(proof) = need
            .idp
            .as_ref()
            .and_then(|f| idp_proof(id, f, need.max_age))
        {
            if !need.one_time {
                return StepupCheck::FreshFromIdp(proof);
            }
            // One request per sign-in at the provider: the sign-in (session
            // and auth_time) is spent like a token; once spent, only a
            // code from the gateway admits the next request.
            let key = format!("idp:{}:{}", session_hash(&id.session), proof.auth_time);
            match self
                .store
                .spend_once(&key, need.max_age + Duration::from_secs(AUTH_TIME_SKEW))
                .await
            {
                Ok(true) => {
                    let ctx = AuditContext {
                        subject: &id.subject,
                        channel: Some("idp"),
                        rule: Some(&rule.name),
                        client,
                        mode,
                    };
                    audit(&self.metrics, AuditEvent::TokenSpent, &ctx, "");
                    return StepupCheck::FreshFromIdp(proof);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot spend a one-time IdP sign-in; failing closed");
                    return StepupCheck::Unavailable;
                }
            }
        }
        let Some(token) = self.presented_token(headers) else {
            return StepupCheck::Needed;
        };
        let sf = match self.tokens.verify_cached(token) {
            Ok(sf) => sf,
            Err(e) => {
                tracing::debug!(error = %e, "second-factor token refused");
                return StepupCheck::Needed;
            }
        };
        // Bound to this user and this sign-in; proved by an accepted factor;
        // fresh enough for this rule.
        if sf.subject != id.subject || sf.session.as_bytes() != id.session_binding() {
            return StepupCheck::Needed;
        }
        if !need.factors.contains(&sf.channel) {
            return StepupCheck::Needed;
        }
        let age = unix_now().saturating_sub(sf.auth_time);
        if age > need.max_age.as_secs() {
            return StepupCheck::Needed;
        }
        match self.store.is_revoked(&sf.jti).await {
            Ok(false) => {}
            Ok(true) => return StepupCheck::Needed,
            Err(e) => {
                tracing::error!(error = %e, "cannot check token revocation; failing closed");
                return StepupCheck::Unavailable;
            }
        }
        if need.one_time {
            let ttl = crate::token::mark_ttl(sf.exp);
            match self.store.spend_once(&sf.jti, ttl).await {
                Ok(true) => {
                    let ctx = AuditContext {
                        subject: &id.subject,
                        channel: Some(sf.channel.as_str()),
                        rule: Some(&rule.name),
                        client,
                        mode,
                    };
                    audit(&self.metrics, AuditEvent::TokenSpent, &ctx, "");
                }
                Ok(false) => return StepupCheck::Needed,
                Err(e) => {
                    tracing::error!(error = %e, "cannot spend one-time token; failing closed");
                    return StepupCheck::Unavailable;
                }
            }
        }
        StepupCheck::Fresh(sf)
    }

    /// Keep a browser form post that met a challenge (bounded, bound to
    /// the session, for the code's lifetime plus a margin) so the challenge
    /// page can replay it after verification. Returns the stash id, or
    /// `None` when the form is too big to keep or the store refused (the
    /// challenge still works; the form is not replayed).
    pub async fn stash_form(
        &self,
        req: &mut Request<Body>,
        id: &Identity,
        host: Option<&str>,
    ) -> Option<String> {
        // Another site's form posting into the app is not kept: replayed
        // after the user's own verification, it would complete an action
        // the user never chose (a cross-site request forgery through us).
        if cross_site(req.headers(), host) {
            tracing::debug!("cross-site form post not stashed");
            return None;
        }
        let target = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_none_or(|n| n > self.cfg.stash_max_bytes) {
            return None;
        }
        let body = std::mem::replace(req.body_mut(), crate::http::empty());
        let body = read_limited(body, self.cfg.stash_max_bytes).await.ok()?;
        let stash = Stash {
            id: crate::otp::random_id(),
            session: session_hash(&id.session),
            target,
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        let blob = serde_json::to_vec(&stash).ok()?;
        let ttl = self.cfg.otp.ttl + Duration::from_secs(300);
        match self.store.put_blob(&Stash::key(id), &blob, ttl).await {
            Ok(()) => Some(stash.id),
            Err(e) => {
                tracing::warn!(error = %e, "cannot stash form post; it will not be replayed");
                None
            }
        }
    }

    /// Take a stashed form post of this session.
    async fn take_stash(&self, stash_id: &str, id: &Identity) -> Option<Stash> {
        let bytes = self.store.take_blob(&Stash::key(id)).await.ok().flatten()?;
        Stash::decode(&bytes, stash_id, id)
    }

    /// Serve `{prefix}/...` (`sub` is the part after the prefix) for a
    /// caller with a primary identity.
    pub async fn endpoint(
        &self,
        req: Request<Body>,
        sub: &str,
        id: &Identity,
        conn: ClientConn,
    ) -> Result<Response<Body>, Rejection> {
        // From here on `peer` is the client as far as the gateway can tell,
        // for the per-client send cap and the audit events.
        let conn = ClientConn {
            peer: std::net::SocketAddr::new(self.client_ip(req.headers(), conn), conn.peer.port()),
            ..conn
        };
        match sub {
            "/api/methods" | "/api/otp" | "/api/otp/verify" | "/api/logout" => {
                api::serve(self, req, sub, id, conn).await
            }
            "/challenge" | "/challenge/send" | "/challenge/verify" => {
                page::serve(self, req, sub, id, conn).await
            }
            _ => Err(Rejection::NotFound),
        }
    }

    /// The gateway's path prefix.
    pub fn prefix(&self) -> &str {
        &self.cfg.prefix
    }

    /// The client address: the peer, or when the peer is a trusted proxy,
    /// the nearest address in `X-Forwarded-For` that is not one (walking
    /// from the right, so a client cannot choose it by sending its own).
    fn client_ip(&self, headers: &HeaderMap, conn: ClientConn) -> IpAddr {
        let mut client = conn.peer.ip();
        if !self.trusted_proxies.iter().any(|n| n.contains(&client)) {
            return client;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.iter().rev() {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                break;
            };
            client = ip;
            if !self.trusted_proxies.iter().any(|n| n.contains(&ip)) {
                break;
            }
        }
        client
    }

    /// Whether SMS may be sent to `phone` (`stepup.sms.allowed_countries`).
    /// With an allow-list, a number not in E.164 form (`+` and digits;
    /// spaces, dots, dashes and brackets are ignored) is refused.
    fn sms_destination_allowed(&self, phone: &str) -> bool {
        let allowed = &self.cfg.budget.sms_countries;
        if allowed.is_empty() {
            return true;
        }
        let Some(rest) = phone.trim().strip_prefix('+') else {
            return false;
        };
        let mut digits = String::from("+");
        for c in rest.chars() {
            match c {
                '0'..='9' => digits.push(c),
                ' ' | '.' | '-' | '(' | ')' => {}
                _ => return false,
            }
        }
        allowed.iter().any(|p| digits.starts_with(p.as_str()))
    }

    /// Channels this user has a contact for and the config enables, with
    /// their targets, whether or not the destination is allowed.
    fn contacts<'a>(&self, id: &'a Identity) -> Vec<(Channel, &'a str)> {
        let mut out = Vec::new();
        if let Some(email) = id.email.as_deref().filter(|e| !e.is_empty()) {
            if self.email.is_some() || self.console.is_some() {
                out.push((Channel::Email, email));
            }
        }
        if let Some(phone) = id.phone.as_deref().filter(|p| !p.is_empty()) {
            if self.sms.is_some() || self.console.is_some() {
                out.push((Channel::Sms, phone));
            }
        }
        out
    }

    /// The channels offered to this user: `contacts` without SMS to a
    /// destination outside `stepup.sms.allowed_countries`.
    fn methods<'a>(&self, id: &'a Identity) -> Vec<(Channel, &'a str)> {
        let mut out = self.contacts(id);
        out.retain(|(c, target)| *c != Channel::Sms || self.sms_destination_allowed(target));
        out
    }

    fn notifier(&self, channel: Channel) -> Option<Arc<dyn Notifier>> {
        let real = match channel {
            Channel::Email => self.email.clone(),
            Channel::Sms => self.sms.clone(),
        };
        real.or_else(|| self.console.clone().map(|c| c as Arc<dyn Notifier>))
    }

    fn audit(
        &self,
        event: AuditEvent,
        id: &Identity,
        channel: Option<Channel>,
        client: IpAddr,
        detail: &str,
    ) {
        let ctx = AuditContext {
            subject: &id.subject,
            channel: channel.map(Channel::as_str),
            rule: None,
            client,
            mode: Mode::Proxy,
        };
        audit(&self.metrics, event, &ctx, detail);
    }

    /// A refused send: audited (event `refused`, `detail` = the reason) and
    /// counted in `stepgate_sends_refused_total{channel, reason}`.
    fn refused(&self, id: &Identity, channel: Channel, client: IpAddr, reason: &'static str) {
        self.metrics.send_refused(channel.as_str(), reason);
        self.audit(AuditEvent::Refused, id, Some(channel), client, reason);
    }

    /// `Set-Cookie` for a freshly issued token.
    fn token_cookie(&self, token: &str) -> Option<HeaderValue> {
        cookies::set_cookie(
            &self.cfg.token.cookie,
            token,
            self.tokens.lifetime(),
            self.secure_cookies,
        )
    }

    /// `Set-Cookie` that clears the token cookie.
    fn clear_cookie(&self) -> Option<HeaderValue> {
        cookies::set_cookie(
            &self.cfg.token.cookie,
            "",
            Duration::ZERO,
            self.secure_cookies,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(session: &str) -> Identity {
        Identity {
            subject: "alice".into(),
            email: None,
            phone: None,
            session: session.into(),
            binding: std::sync::OnceLock::new(),
            amr: Vec::new(),
            acr: None,
            auth_time: None,
        }
    }

    #[test]
    // The stash is a typed record: it round-trips, and is only handed back
    // for its own id and its own session (another sign-in cannot replay it).
    fn stash_is_typed_and_bound() {
        let alice = identity("sid:1");
        let stash = Stash {
            id: "abc".into(),
            session: session_hash(&alice.session),
            target: "/admin/save?x=1".into(),
            body: "name=x&v=%C3%A9".into(),
        };
        let blob = serde_json::to_vec(&stash).unwrap_or_default();
        assert_eq!(Stash::decode(&blob, "abc", &alice), Some(stash.clone()));
        assert_eq!(Stash::decode(&blob, "abd", &alice), None);
        assert_eq!(Stash::decode(&blob, "abc", &identity("sid:2")), None);
        // The untyped record of earlier versions is not accepted.
        let old = br#"{"i":"abc","s":"x","t":"/","b":""}"#;
        assert_eq!(Stash::decode(old, "abc", &alice), None);
    }

    #[test]
    // The identity provider's sign-in counts up to and including the second
    // it is exactly `max_age` old and up to the allowed skew in the future,
    // never a second beyond either; a listed amr or a listed acr suffices.
    fn idp_proof_edges() {
        let factor = crate::policy::IdpFactor {
            amr: vec!["mfa".into()],
            acr: vec!["loa2".into()],
        };
        let max_age = Duration::from_secs(300);
        let signed_in = |auth_time: u64, amr: &[&str], acr: Option<&str>| Identity {
            amr: amr.iter().map(|a| a.to_string()).collect(),
            acr: acr.map(str::to_string),
            auth_time: Some(auth_time),
            ..identity("sid:1")
        };
        let accepted =
            |id: &Identity| idp_proof(id, &factor, max_age).map(|p| (p.auth_time, p.amr, p.acr));
        // A round whose clock second changed part-way (a loaded machine)
        // is run again, so every case is decided against the `now` it was
        // built for.
        for _ in 0..50 {
            let now = unix_now();
            let old = now - max_age.as_secs();
            let ahead = now + AUTH_TIME_SKEW;
            let got = [
                accepted(&signed_in(old, &["pwd", "mfa"], None)),
                accepted(&signed_in(old - 1, &["mfa"], None)),
                accepted(&signed_in(ahead, &[], Some("loa2"))),
                accepted(&signed_in(ahead + 1, &["mfa"], Some("loa2"))),
                accepted(&signed_in(now, &["pwd"], Some("loa1"))),
            ];
            if unix_now() != now {
                continue;
            }
            let mfa = vec!["pwd".to_string(), "mfa".to_string()];
            assert_eq!(
                got,
                [
                    Some((old, mfa, None)),
                    None,
                    Some((ahead, Vec::new(), Some("loa2".to_string()))),
                    None,
                    None,
                ]
            );
            assert_eq!(idp_proof(&identity("sid:1"), &factor, max_age), None);
            return;
        }
        panic!("the clock never held still for one round");
    }
}
