//! The request path, top to bottom: telemetry -> rescue -> normalise ->
//! policy -> identity -> step-up -> proxy.
//!
//! Every stage that refuses a request answers with a response (never an
//! error that would drop the connection), and a protected route is only
//! forwarded after every check has passed: when anything breaks, it fails
//! closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue, ACCEPT, HOST, LOCATION, WWW_AUTHENTICATE};
use http::{HeaderName, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::config::{Config, StoreConfig};
use crate::identity::{Authenticator, Identity};
use crate::policy::{normalize_path, Action, DefaultPolicy, Rule};
use crate::proxy::{self, Body, BoxError, ClientConn, Proxy};
use crate::stepup::{Stepup, StepupCheck};
use crate::store::ChallengeStore;
use crate::telemetry::{Metrics, Outcome};
use crate::token::SecondFactor;

const X_STEPGATE_USER: HeaderName = HeaderName::from_static("x-stepgate-user");
const X_STEPGATE_EMAIL: HeaderName = HeaderName::from_static("x-stepgate-email");
const X_STEPGATE_STEPUP: HeaderName = HeaderName::from_static("x-stepgate-stepup");
const X_STEPGATE_STEPUP_AGE: HeaderName = HeaderName::from_static("x-stepgate-stepup-age");

/// Everything a request needs that a reload may replace.
pub struct State {
    pub config: Arc<Config>,
    pub auth: Authenticator,
    pub proxy: Proxy,
    pub stepup: Stepup,
}

/// The gateway: shared by every connection.
pub struct Gateway {
    state: ArcSwap<State>,
    store: Arc<dyn ChallengeStore>,
    store_config: StoreConfig,
    pub metrics: Arc<Metrics>,
    /// Rule labels for requests no rule matched and for the gateway's own
    /// endpoints (shared, so labelling a request never allocates).
    no_rule: Arc<str>,
    gateway_rule: Arc<str>,
}

impl Gateway {
    /// Build the gateway from a validated config. Fails only on things the
    /// config loader cannot check (e.g. an unreadable CA file).
    pub fn new(config: Config) -> Result<Arc<Gateway>, String> {
        let metrics = Arc::new(Metrics::new());
        let store = crate::store::from_config(&config.store)?;
        let state = State::build(config, store.clone(), metrics.clone(), None)?;
        Ok(Arc::new(Gateway {
            store_config: state.config.store.clone(),
            state: ArcSwap::from_pointee(state),
            store,
            metrics,
            no_rule: Arc::from("-"),
            gateway_rule: Arc::from("stepgate"),
        }))
    }

    pub fn config(&self) -> Arc<Config> {
        self.state.load().config.clone()
    }

    /// The console notifier of the current policy, in dev/demo mode.
    pub fn console(&self) -> Option<Arc<crate::delivery::ConsoleNotifier>> {
        self.state.load().stepup.console().cloned()
    }

    pub fn store(&self) -> &Arc<dyn ChallengeStore> {
        &self.store
    }

    /// Swap in a new policy. Listener addresses and the store are fixed
    /// for the life of the process; a change to them is reported and
    /// ignored.
    pub fn reload(&self, config: Config) -> Result<(), String> {
        let old = self.config();
        if config.listen.address != old.listen.address || config.admin.address != old.admin.address
        {
            tracing::warn!(
                "listen/admin address changes need a restart; keeping the old addresses"
            );
        }
        if config.store != self.store_config {
            tracing::warn!("store changes need a restart; keeping the old store");
        }
        let previous = self.state.load();
        let state = State::build(
            config,
            self.store.clone(),
            self.metrics.clone(),
            Some(&previous),
        )?;
        self.metrics.reload(true);
        self.state.store(Arc::new(state));
        Ok(())
    }

    /// Whether the gateway can serve protected routes: the store is
    /// reachable and the identity provider's keys have arrived. `Err` says
    /// what is missing.
    pub async fn ready(&self) -> Result<(), &'static str> {
        if !self.state.load().auth.keys_ready() {
            return Err("identity provider keys not fetched yet");
        }
        self.store.ping().await.map_err(|_| "store unreachable")
    }

    /// Serve one request.
    pub async fn handle<B>(&self, req: Request<B>, conn: ClientConn) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let start = Instant::now();
        let state = self.state.load_full();
        let method = req.method().clone();
        let mut log = RequestLog {
            rule: self.no_rule.clone(),
            path: String::new(),
            outcome: Outcome::Gateway,
        };
        let req = req.map(|b| b.map_err(Into::into).boxed());
        let res = self.route(&state, req, conn, &mut log).await;
        let elapsed = start.elapsed();
        self.metrics.request(&log.rule, log.outcome, elapsed);
        tracing::info!(
            target: "stepgate::access",
            client = %conn.peer.ip(),
            method = %method,
            path = %log.path,
            status = res.status().as_u16(),
            rule = %log.rule,
            outcome = log.outcome.as_str(),
            ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
        res
    }

    async fn route(
        &self,
        state: &State,
        mut req: Request<Body>,
        conn: ClientConn,
        log: &mut RequestLog,
    ) -> Response<Body> {
        let cfg = &state.config;
        // Normalise once: the path matched is the path forwarded.
        let raw_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
        if raw_len > cfg.listen.max_uri_bytes {
            log.outcome = Outcome::BadRequest;
            return json_error(
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                "request target too long",
            );
        }
        if req.method() == Method::CONNECT {
            log.outcome = Outcome::BadRequest;
            return json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "CONNECT is not supported",
            );
        }
        let path = match normalize_path(req.uri().path()) {
            Ok(p) => p,
            Err(e) => {
                log.outcome = Outcome::BadRequest;
                log.path = "<invalid>".into();
                return json_error(StatusCode::BAD_REQUEST, "bad_path", &e.to_string());
            }
        };
        log.path.clone_from(&path);
        let host = match request_host(&req) {
            Ok(h) => h,
            Err(()) => {
                log.outcome = Outcome::BadRequest;
                return json_error(StatusCode::BAD_REQUEST, "bad_host", "invalid Host");
            }
        };

        let upgrade = proxy::wants_upgrade(req.headers(), req.version());
        let headers = req.headers_mut();
        proxy::strip_hop_by_hop(headers, upgrade);
        proxy::strip_reserved(headers);
        if let Some(a) = &cfg.upstream.assertion {
            // Only the gateway speaks in this header, whatever its name.
            headers.remove(&a.header);
        }
        if !state.auth.trusts_header_from(conn.peer.ip()) {
            for name in state.auth.trusted_header_names() {
                headers.remove(name);
            }
        }

        // Per-request facts travel in request extensions: the identity here,
        // the verified second factor below.
        match state.auth.authenticate(req.headers(), conn.peer.ip()).await {
            Ok(Some(id)) => {
                req.extensions_mut().insert(id);
            }
            Ok(None) => {}
            Err(crate::identity::IdentityError::Ambiguous) => {
                log.outcome = Outcome::BadRequest;
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "ambiguous_credentials",
                    "send one primary credential",
                );
            }
            Err(e) => tracing::debug!(error = %e, "primary credential refused"),
        }

        // The step-up futures below are boxed: they are large and off the
        // plain-proxy path, and inlining them would make every request's
        // future (moved on each poll setup) several times bigger.
        if under_prefix(&path, &cfg.stepup.prefix) {
            log.rule = self.gateway_rule.clone();
            if let Some(res) = keys_pending(state, &req, log) {
                return res;
            }
            let (res, outcome) = Box::pin(state.stepup.endpoint(req, &path, conn)).await;
            log.outcome = outcome;
            return res;
        }

        let rule = cfg.policy.route(req.method(), host.as_deref(), &path);
        if let Some(r) = rule {
            log.rule = r.name.clone();
        }
        // A method override header must not move the request to a rule the
        // policy did not check (e.g. POST + X-HTTP-Method-Override: DELETE).
        // Every line counts: an app may read the last copy, not the first.
        for name in &proxy::METHOD_OVERRIDE {
            for v in req.headers().get_all(name) {
                let same = Method::from_bytes(v.as_bytes())
                    .map(|m| same_rule(cfg.policy.route(&m, host.as_deref(), &path), rule))
                    .unwrap_or(false);
                if !same {
                    log.outcome = Outcome::BadRequest;
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        "method_override",
                        "method override would change the route",
                    );
                }
            }
        }

        let action = match rule {
            Some(r) => &r.action,
            None => match cfg.policy.default {
                DefaultPolicy::Pass => &Action::Public,
                DefaultPolicy::Identity => &Action::Identity,
            },
        };
        match action {
            Action::Deny => {
                log.outcome = Outcome::Denied;
                return json_error(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "this route is not available",
                );
            }
            Action::Public => {}
            Action::Identity | Action::StepUp(_) => {
                let Some(id) = req.extensions().get::<Identity>().cloned() else {
                    if let Some(res) = keys_pending(state, &req, log) {
                        return res;
                    }
                    log.outcome = Outcome::Unauthenticated;
                    return unauthenticated(&req, cfg.identity.login_url.as_deref());
                };
                if let (Action::StepUp(need), Some(rule)) = (action, rule) {
                    match Box::pin(state.stepup.check(req.headers(), &id, rule, need, conn)).await {
                        StepupCheck::Fresh(sf) => {
                            req.extensions_mut().insert(sf);
                        }
                        StepupCheck::FreshFromIdp(proof) => {
                            req.extensions_mut().insert(proof);
                        }
                        StepupCheck::Needed => {
                            log.outcome = Outcome::Challenged;
                            return Box::pin(state.stepup.challenge(req, &id, need)).await;
                        }
                        StepupCheck::Unavailable => {
                            log.outcome = Outcome::StoreUnavailable;
                            return json_error(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "stepup_unavailable",
                                "step-up is temporarily unavailable",
                            );
                        }
                    }
                }
            }
        }

        let identity_headers = req
            .extensions()
            .get::<Identity>()
            .map(identity_header_values);
        let factor = req
            .extensions()
            .get::<SecondFactor>()
            .map(|sf| (sf.channel.as_str(), sf.auth_time))
            .or_else(|| {
                let idp = req.extensions().get::<crate::stepup::IdpProof>();
                idp.map(|p| ("idp", p.auth_time))
            });
        let assertion = cfg
            .upstream
            .assertion
            .as_ref()
            .and_then(|a| sign_assertion(a, &req, rule));
        let headers = req.headers_mut();
        state.stepup.strip_token(headers);
        if let Some((name, value)) = assertion {
            headers.insert(name, value);
        }
        if let Some((user, email)) = identity_headers {
            headers.extend(user.map(|v| (X_STEPGATE_USER, v)));
            headers.extend(email.map(|v| (X_STEPGATE_EMAIL, v)));
        }
        if let Some((channel, auth_time)) = factor {
            headers.insert(X_STEPGATE_STEPUP, HeaderValue::from_static(channel));
            let age = crate::token::unix_now().saturating_sub(auth_time);
            headers.insert(X_STEPGATE_STEPUP_AGE, HeaderValue::from(age));
        }
        proxy::set_forwarded(headers, &conn, host.as_deref());
        if let Some(h) = &host {
            // The host the rules matched is the host the app reads (HTTP/2
            // carries it in :authority; HTTP/1.1 upstreams need Host).
            if let Ok(v) = HeaderValue::from_str(h) {
                headers.insert(HOST, v);
            }
        }
        let uri = match state.proxy.upstream_uri(&path, req.uri().query()) {
            Ok(u) => u,
            Err(e) => {
                log.outcome = Outcome::BadRequest;
                tracing::debug!(error = %e, "cannot build upstream URI");
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "request target cannot be forwarded",
                );
            }
        };
        match state.proxy.forward(req, uri, upgrade).await {
            Ok(res) => {
                log.outcome = Outcome::Forwarded;
                res
            }
            Err(e) => {
                log.outcome = Outcome::UpstreamError;
                tracing::warn!(error = %e, "upstream request failed");
                let (code, msg) = match e.status() {
                    StatusCode::GATEWAY_TIMEOUT => {
                        ("upstream_timeout", "the upstream did not answer in time")
                    }
                    _ => ("upstream_unavailable", "the upstream is unavailable"),
                };
                json_error(e.status(), code, msg)
            }
        }
    }
}

impl State {
    fn build(
        config: Config,
        store: Arc<dyn ChallengeStore>,
        metrics: Arc<Metrics>,
        previous: Option<&State>,
    ) -> Result<State, String> {
        let auth = Authenticator::new(&config.identity, &metrics, previous.map(|p| &p.auth))?;
        let proxy = Proxy::new(&config.upstream)?;
        let stepup = Stepup::new(&config, store, metrics)?;
        Ok(State {
            config: Arc::new(config),
            auth,
            proxy,
            stepup,
        })
    }
}

struct RequestLog {
    rule: Arc<str>,
    path: String,
    outcome: Outcome,
}

/// A request without an identity while the identity provider's keys have
/// not arrived yet: its token could not be checked, so fail closed (503)
/// rather than ask the user to sign in again.
fn keys_pending<B>(
    state: &State,
    req: &Request<B>,
    log: &mut RequestLog,
) -> Option<Response<Body>> {
    if req.extensions().get::<Identity>().is_some() || state.auth.keys_ready() {
        return None;
    }
    log.outcome = Outcome::IdentityUnavailable;
    let mut res = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "identity_unavailable",
        "sign-in cannot be checked right now; try again shortly",
    );
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    Some(res)
}

/// `path` is the prefix itself or below it (whole segments only).
fn under_prefix(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn same_rule(a: Option<&Rule>, b: Option<&Rule>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// The host the client asked for: the URI authority (HTTP/2, absolute-form),
/// else `Host`. Refused (RFC 9112 3.2) when there are several `Host`
/// headers or the value is not `host[:port]`: rules must match the host the
/// app will read.
pub(crate) fn request_host<B>(req: &Request<B>) -> Result<Option<String>, ()> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(());
    }
    let header = match header {
        Some(v) => Some(v.to_str().map_err(|_| ())?),
        None => None,
    };
    // An authority in the target (absolute-form, HTTP/2 :authority) wins
    // over Host (RFC 9112 3.2.2); the forwarded Host is set to it.
    let host = req.uri().authority().map(|a| a.as_str()).or(header);
    match host {
        Some(h)
            if h.is_empty()
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b)) =>
        {
            Err(())
        }
        h => Ok(h.map(str::to_string)),
    }
}

/// The signed assertion (CONTRACT §5.4) for a request with an identity:
/// who, and which second factor was checked for `rule`.
fn sign_assertion<B>(
    a: &crate::assertion::AssertionSettings,
    req: &Request<B>,
    rule: Option<&Rule>,
) -> Option<(HeaderName, HeaderValue)> {
    use crate::assertion::Factor;
    let id = req.extensions().get::<Identity>()?;
    let rule_name = rule.map_or("", |r| &*r.name);
    let factor = if let Some(sf) = req.extensions().get::<SecondFactor>() {
        Some(Factor {
            amr: vec!["otp", sf.channel.as_str()],
            acr: None,
            auth_time: sf.auth_time,
            rule: rule_name,
        })
    } else {
        req.extensions()
            .get::<crate::stepup::IdpProof>()
            .map(|p| Factor {
                amr: p.amr.iter().map(String::as_str).collect(),
                acr: p.acr.as_deref(),
                auth_time: p.auth_time,
                rule: rule_name,
            })
    };
    let token = a.sign(&id.subject, id.email.as_deref(), factor)?;
    Some((a.header.clone(), HeaderValue::from_str(&token).ok()?))
}

/// `X-Stepgate-User` and `X-Stepgate-Email` values for an identity (a value
/// that is not a valid header value is left out, never forwarded raw).
fn identity_header_values(id: &Identity) -> (Option<HeaderValue>, Option<HeaderValue>) {
    (
        HeaderValue::from_str(&id.subject).ok(),
        id.email
            .as_deref()
            .and_then(|e| HeaderValue::from_str(e).ok()),
    )
}

/// A browser navigation: `GET`/`HEAD` that accepts HTML.
pub fn is_browser<B>(req: &Request<B>) -> bool {
    (req.method() == Method::GET || req.method() == Method::HEAD)
        && req
            .headers()
            .get_all(ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/html"))
}

/// No valid primary identity on a route that needs one.
fn unauthenticated<B>(req: &Request<B>, login_url: Option<&str>) -> Response<Body> {
    if let (true, Some(login)) = (is_browser(req), login_url) {
        let rd = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let sep = if login.contains('?') { '&' } else { '?' };
        let location = format!("{login}{sep}rd={}", url_encode(rd));
        return redirect(&location);
    }
    let mut res = json_error(StatusCode::UNAUTHORIZED, "unauthenticated", "sign in first");
    res.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"stepgate\""),
    );
    res
}

/// A 302 to `location`.
pub fn redirect(location: &str) -> Response<Body> {
    let mut res = Response::new(proxy::empty());
    *res.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::from_str(location) {
        res.headers_mut().insert(LOCATION, v);
    }
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// A short JSON error: `{"error": code, "message": message}`.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(
        status,
        &serde_json::json!({ "error": code, "message": message }),
    )
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut res = Response::new(proxy::full(value.to_string()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Percent-encode for a query value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The peer address as seen by `ClientConn` for a socket.
pub fn client_conn(peer: SocketAddr, tls: bool, cfg: &Config) -> ClientConn {
    ClientConn {
        peer,
        tls,
        trusted_proxy: cfg
            .listen
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&peer.ip())),
    }
}
