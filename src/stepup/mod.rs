//! The step-up layer: demands a fresh second factor on protected routes, and
//! serves the gateway's own challenge API (`api.rs`) and page (`page.rs`).

mod api;
mod page;

pub use self::page::{parse_form as parse_form_pairs, safe_rd};

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, WWW_AUTHENTICATE};
use http::{HeaderMap, Request, Response, StatusCode};

use crate::config::{self, Config};
use crate::delivery::{Channel, ConsoleNotifier, EmailNotifier, Notifier, SmsNotifier};
use crate::gateway::{is_browser, json, json_error, redirect, url_encode};
use crate::identity::{self, Identity};
use crate::policy::{Rule, StepUp as Need};
use crate::proxy::{Body, ClientConn};
use crate::store::{ChallengeStore, Limits};
use crate::telemetry::{audit, AuditContext, AuditEvent, Metrics, Outcome};
use crate::token::{session_hash, unix_now, SecondFactor, Tokens};

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

/// A form post kept across the challenge.
pub(crate) struct Stashed {
    /// Path and query the form was posted to.
    pub target: String,
    /// The `application/x-www-form-urlencoded` body.
    pub body: String,
}

/// Where a session's stashed form post lives. One per session: a newer
/// post replaces the older one, so no client can pile up stashes.
fn stash_key(id: &Identity) -> String {
    format!("stash:{}", session_hash(&id.session))
}

/// A browser submitting a plain HTML form.
fn is_browser_form_post<B>(req: &Request<B>) -> bool {
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .unwrap_or("")
    };
    req.method() == http::Method::POST
        && header(http::header::ACCEPT).contains("text/html")
        && header(http::header::CONTENT_TYPE)
            .split(';')
            .next()
            .is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
}

/// Step-up state shared by all requests of one policy generation.
pub struct Stepup {
    cfg: config::Stepup,
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
    pub fn new(
        config: &Config,
        store: Arc<dyn ChallengeStore>,
        metrics: Arc<Metrics>,
    ) -> Result<Stepup, String> {
        let cfg = config.stepup.clone();
        let email: Option<Arc<dyn Notifier>> = match &cfg.email {
            Some(s) => Some(Arc::new(EmailNotifier::new(s.clone())?)),
            None => None,
        };
        let sms: Option<Arc<dyn Notifier>> = match &cfg.sms {
            Some(s) => Some(Arc::new(SmsNotifier::new(s.clone(), cfg.sms_timeout)?)),
            None => None,
        };
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
        Ok(Stepup {
            tokens: Tokens::new(&cfg.token),
            cfg,
            store,
            email,
            sms,
            console,
            limits,
            metrics,
            secure_cookies: config.listen.tls.is_some(),
            trusted_proxies: config.listen.trusted_proxies.clone(),
        })
    }

    /// The console notifier, in dev/demo mode.
    pub fn console(&self) -> Option<&Arc<ConsoleNotifier>> {
        self.console.as_ref()
    }

    /// The second-factor token presented with a request (header first).
    fn presented_token<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        headers
            .get(&self.cfg.token.header)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim())
            .filter(|v| !v.is_empty())
            .or_else(|| identity::cookie(headers, &self.cfg.token.cookie))
    }

    /// Remove the second-factor token header and cookie before forwarding.
    pub fn strip_token(&self, headers: &mut HeaderMap) {
        headers.remove(&self.cfg.token.header);
        identity::remove_cookie(headers, &self.cfg.token.cookie);
    }

    /// Does this request carry a fresh factor bound to `id` for `rule`?
    pub async fn check(
        &self,
        headers: &HeaderMap,
        id: &Identity,
        rule: &Rule,
        need: &Need,
        conn: ClientConn,
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
                        client: conn.peer.ip(),
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
        let sf = match self.tokens.verify(token) {
            Ok(sf) => sf,
            Err(e) => {
                tracing::debug!(error = %e, "second-factor token refused");
                return StepupCheck::Needed;
            }
        };
        // Bound to this user and this sign-in; proved by an accepted factor;
        // fresh enough for this rule.
        if sf.subject != id.subject || sf.session != session_hash(&id.session) {
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
                        client: conn.peer.ip(),
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

    /// The answer to a request that needs a (fresh) second factor.
    pub async fn challenge(
        &self,
        req: Request<Body>,
        id: &Identity,
        need: &Need,
    ) -> Response<Body> {
        let max_age = need.max_age.as_secs();
        if is_browser(&req) {
            let rd = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
            return redirect(&format!(
                "{}/challenge?rd={}",
                self.cfg.prefix,
                url_encode(rd)
            ));
        }
        if is_browser_form_post(&req) {
            return self.stash_and_challenge(req, id).await;
        }
        let mut body = serde_json::json!({
            "error": "insufficient_user_authentication",
            "max_age": max_age,
            "methods": format!("{}/api/methods", self.cfg.prefix),
        });
        // RFC 9470: the acr values the identity provider may satisfy this
        // with (config refuses spaces, quotes and backslashes in them).
        let acr_values = need
            .idp
            .as_ref()
            .filter(|i| !i.acr.is_empty())
            .map(|i| i.acr.join(" "));
        let mut www = String::from(
            "Bearer error=\"insufficient_user_authentication\", error_description=\"A fresh second factor is required\"",
        );
        if let Some(acr) = &acr_values {
            body["acr_values"] = acr.clone().into();
            www.push_str(&format!(", acr_values=\"{acr}\""));
        }
        www.push_str(&format!(", max_age={max_age}"));
        let mut res = json(StatusCode::UNAUTHORIZED, &body);
        if let Ok(v) = HeaderValue::from_str(&www) {
            res.headers_mut().insert(WWW_AUTHENTICATE, v);
        }
        res
    }

    /// A browser posted a form to a protected route without a fresh
    /// factor: keep what the user typed (bounded, bound to the session, for
    /// the code's lifetime plus a margin) and send them to the challenge
    /// page, which replays the post after verification.
    async fn stash_and_challenge(&self, req: Request<Body>, id: &Identity) -> Response<Body> {
        let target = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        let path = req.uri().path().to_string();
        let mut location = format!("{}/challenge?rd={}", self.cfg.prefix, url_encode(&path));
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        // Too big to keep: the challenge still works, the form is not replayed.
        if declared.is_some_and(|n| n <= self.cfg.stash_max_bytes) {
            if let Ok(body) = api::read_body(req.into_body(), self.cfg.stash_max_bytes).await {
                let stash = crate::otp::random_id();
                let blob = serde_json::json!({
                    "i": stash,
                    "s": session_hash(&id.session),
                    "t": target,
                    "b": String::from_utf8_lossy(&body),
                });
                let ttl = self.cfg.otp.ttl + Duration::from_secs(300);
                match self
                    .store
                    .put_blob(&stash_key(id), blob.to_string().as_bytes(), ttl)
                    .await
                {
                    Ok(()) => {
                        location.push_str("&stash=");
                        location.push_str(&stash);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot stash form post; it will not be replayed")
                    }
                }
            }
        }
        let mut res = redirect(&location);
        *res.status_mut() = StatusCode::SEE_OTHER;
        res
    }

    /// Take a stashed form post of this session.
    async fn take_stash(&self, stash: &str, id: &Identity) -> Option<Stashed> {
        let bytes = self.store.take_blob(&stash_key(id)).await.ok().flatten()?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        if v["i"].as_str() != Some(stash)
            || v["s"].as_str() != Some(session_hash(&id.session).as_str())
        {
            return None;
        }
        Some(Stashed {
            target: v["t"].as_str()?.to_string(),
            body: v["b"].as_str()?.to_string(),
        })
    }

    /// Serve `{prefix}/...`.
    pub async fn endpoint(
        &self,
        req: Request<Body>,
        path: &str,
        conn: ClientConn,
    ) -> (Response<Body>, Outcome) {
        let identity = req.extensions().get::<Identity>().cloned();
        let sub = &path[self.cfg.prefix.len()..];
        // From here on `peer` is the client as far as the gateway can tell,
        // for the per-client send cap and the audit events.
        let conn = ClientConn {
            peer: std::net::SocketAddr::new(self.client_ip(req.headers(), conn), conn.peer.port()),
            ..conn
        };
        let Some(id) = identity else {
            let mut res = json_error(StatusCode::UNAUTHORIZED, "unauthenticated", "sign in first");
            res.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"stepgate\""),
            );
            return (res, Outcome::Unauthenticated);
        };
        let res = match sub {
            "/api/methods" | "/api/otp" | "/api/otp/verify" | "/api/logout" => {
                api::serve(self, req, sub, &id, conn).await
            }
            "/challenge" | "/challenge/send" | "/challenge/verify" => {
                page::serve(self, req, sub, &id, conn).await
            }
            _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
        };
        let outcome = match res.status() {
            s if s == StatusCode::SERVICE_UNAVAILABLE => Outcome::StoreUnavailable,
            s if s.is_client_error() => Outcome::BadRequest,
            _ => Outcome::Gateway,
        };
        (res, outcome)
    }

    /// The client address: the peer, or when the peer is a trusted proxy,
    /// the nearest address in `X-Forwarded-For` that is not one (walking
    /// from the right, so a client cannot choose it by sending its own).
    fn client_ip(&self, headers: &HeaderMap, conn: ClientConn) -> IpAddr {
        let mut client = conn.peer.ip();
        if !conn.trusted_proxy {
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
    fn token_cookie(&self, token: &str) -> String {
        format!(
            "{}={}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
            self.cfg.token.cookie,
            token,
            self.tokens.lifetime().as_secs(),
            if self.secure_cookies { "; Secure" } else { "" }
        )
    }

    fn clear_cookie(&self) -> String {
        format!(
            "{}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{}",
            self.cfg.token.cookie,
            if self.secure_cookies { "; Secure" } else { "" }
        )
    }
}
