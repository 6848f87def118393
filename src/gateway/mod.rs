//! The request pipeline. [`Gateway::handle`] wraps it in telemetry and
//! rescue; [`pipeline`] reads as the list of phases, in the order they
//! run, one file each:
//!
//! normalise -> sanitise -> identity -> policy -> step-up ->
//! forward (proxy mode) or answer (forward-auth mode)
//!
//! A phase that refuses returns a [`Rejection`]; the first one is rendered
//! once (`rescue.rs`) and nothing is forwarded. A protected route is only
//! forwarded after every phase has passed: when anything breaks, it fails
//! closed. Forward-auth (`{prefix}/auth`) runs the same phases on the
//! original request a proxy in front describes, and answers instead of
//! forwarding.

mod forward;
mod forward_auth;
mod identity;
mod normalise;
mod policy;
pub mod rescue;
mod sanitise;
mod stepup;

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::{Method, Request, Response};
use http_body_util::BodyExt;

use crate::assertion::PublishedKeys;
use crate::config::Config;
use crate::http::negotiate::Client;
use crate::http::{Body, BoxError, Carried, Rejection};
use crate::identity::{Authenticator, Identity};
use crate::policy::{Action, Rule};
use crate::proxy::{ClientConn, Proxy};
use crate::stepup::Stepup;
use crate::store::ChallengeStore;
use crate::telemetry::{Metrics, Mode, Outcome};

/// Everything a request needs that a reload may replace.
pub struct State {
    pub config: Arc<Config>,
    pub auth: Authenticator,
    pub proxy: Proxy,
    pub stepup: Stepup,
    /// The assertion keys served at `/jwks.json` (replaced ones overlap).
    pub assertion_keys: PublishedKeys,
}

/// The gateway: shared by every connection.
pub struct Gateway {
    state: ArcSwap<State>,
    store: Arc<dyn ChallengeStore>,
    store_config: crate::store::Settings,
    pub metrics: Arc<Metrics>,
    /// Rule labels for requests no rule matched and for the gateway's own
    /// endpoints (shared, so labelling a request never allocates).
    no_rule: Arc<str>,
    gateway_rule: Arc<str>,
}

impl Gateway {
    /// The gateway of a loaded config, serving with what its build step
    /// built. Starts the store (this config's is the process's for good)
    /// and, with keys from the identity provider, their fetcher.
    pub fn new(config: Config) -> Result<Arc<Gateway>, String> {
        let metrics = Arc::new(Metrics::new());
        let store = config.built.store.clone();
        store.start_background();
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

    /// Swap in a new policy, served with what its load built. Listener
    /// addresses, TLS and the store are fixed for the life of the process;
    /// a change to them is reported (addresses, store) and ignored. Nothing
    /// changes when this fails.
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

    /// The assertion key set for `/jwks.json` (the current key and those a
    /// reload replaced, while assertions they signed may be valid), or
    /// `None` when there is none.
    pub fn assertion_jwks(&self) -> Option<serde_json::Value> {
        self.state.load().assertion_keys.jwks(Instant::now())
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

    /// Serve one request: the pipeline, its refusal rendered, the request
    /// counted and logged.
    pub async fn handle<B>(&self, req: Request<B>, conn: ClientConn) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let start = Instant::now();
        let state = self.state.load_full();
        let req = req.map(|b| b.map_err(Into::into).boxed());
        let mut ex = Exchange::new(&state, &req, conn, self.no_rule.clone());
        let res = match pipeline(&state, req, &mut ex, &self.gateway_rule).await {
            Ok(res) => res,
            Err(rejection) => {
                ex.outcome = rejection.outcome();
                rescue::render(&rejection, &ex, &state.config)
            }
        };
        let elapsed = start.elapsed();
        self.metrics
            .request(&ex.rule_label, ex.outcome, ex.mode, elapsed);
        crate::telemetry::access(&crate::telemetry::AccessLine {
            client: conn.peer.ip(),
            method: ex.method.as_str(),
            path: &ex.path,
            status: res.status().as_u16(),
            rule: &ex.rule_label,
            outcome: ex.outcome.as_str(),
            mode: ex.mode.as_str(),
            ms: elapsed.as_secs_f64() * 1000.0,
        });
        res
    }
}

/// The request path, in the order it runs. Each phase reads and extends
/// what the earlier ones learnt ([`Exchange`], request extensions).
async fn pipeline<'s>(
    s: &'s State,
    mut req: Request<Body>,
    ex: &mut Exchange<'s>,
    gateway_rule: &Arc<str>,
) -> Result<Response<Body>, Rejection> {
    normalise::run(s, &req, ex)?; // which request, which path (the one forwarded)
    sanitise::run(s, &mut req, ex); // hop-by-hop, reserved, unvouched identity headers
    identity::run(s, &mut req, ex).await?; // the primary identity, into an extension
    if let policy::Route::Gateway = policy::run(s, &req, ex)? {
        ex.rule_label = gateway_rule.clone();
        return endpoint(s, req, ex).await;
    }
    stepup::run(s, &mut req, ex).await?; // a fresh second factor, into an extension
    match ex.mode {
        Mode::Proxy => forward::run(s, req, ex).await,
        Mode::ForwardAuth => Ok(forward_auth::answer(s, &req, ex)),
    }
}

/// The gateway's own pages and API (`{prefix}/...`).
async fn endpoint(
    s: &State,
    req: Request<Body>,
    ex: &mut Exchange<'_>,
) -> Result<Response<Body>, Rejection> {
    let id = req
        .extensions()
        .get::<Arc<Identity>>()
        .cloned()
        .ok_or_else(|| identity::missing(s))?;
    let sub = ex.path[s.config.stepup.prefix.len()..].to_string();
    ex.outcome = Outcome::Gateway;
    // Where the code form cannot help, the browser goes to the provider.
    stepup::idp_only_page(s, &req, &sub, ex)?;
    // Boxed: the step-up futures are large and off the plain-proxy path;
    // inlining them would make every request's future several times bigger.
    Box::pin(s.stepup.endpoint(req, &sub, &id, ex.conn)).await
}

/// What the pipeline has learnt about one request, phase by phase.
pub struct Exchange<'s> {
    pub conn: ClientConn,
    /// Proxy, or forward-auth (decided by `normalise`).
    pub mode: Mode,
    /// The peer is in `listen.trusted_proxies` under the policy this
    /// request runs on (decided per request, never per connection).
    pub trusted_proxy: bool,
    /// Forward-auth in Traefik/Caddy style may answer with redirects;
    /// nginx style never does (nginx cannot pass a 302 on).
    pub redirects: bool,
    /// The method the policy checks (the original request's, in
    /// forward-auth).
    pub method: Method,
    /// The host the rules match and the app reads.
    pub host: Option<String>,
    /// The normalised path: the one matched and the one forwarded.
    pub path: String,
    /// Path and query as the client sent them: where redirects return to.
    pub target: String,
    /// Who asked, as far as rendering an answer goes.
    pub client: Client,
    /// A WebSocket upgrade to pass through.
    pub upgrade: bool,
    /// Which headers the later phases read the request carries (noted
    /// by `sanitise`; until then, any).
    pub carried: Carried,
    /// The matched rule, and what the policy asks of the request.
    pub rule: Option<&'s Rule>,
    pub action: &'s Action,
    pub rule_label: Arc<str>,
    pub outcome: Outcome,
}

impl<'s> Exchange<'s> {
    fn new(s: &State, req: &Request<Body>, conn: ClientConn, no_rule: Arc<str>) -> Exchange<'s> {
        Exchange {
            conn,
            mode: Mode::Proxy,
            trusted_proxy: s
                .config
                .listen
                .trusted_proxies
                .iter()
                .any(|n| n.contains(&conn.peer.ip())),
            redirects: true,
            method: req.method().clone(),
            host: None,
            path: String::new(),
            target: String::new(),
            client: Client::of(req.method(), req.headers()),
            upgrade: false,
            carried: Carried::ANY,
            rule: None,
            action: &Action::Public,
            rule_label: no_rule,
            outcome: Outcome::Gateway,
        }
    }
}

impl State {
    /// The state of one policy, from what its load built; what needs the
    /// runtime or the policy it replaces is made here.
    fn build(
        config: Config,
        store: Arc<dyn ChallengeStore>,
        metrics: Arc<Metrics>,
        previous: Option<&State>,
    ) -> Result<State, String> {
        let built = &config.built;
        let auth = Authenticator::new(
            &config.identity,
            &built.jwt_keys,
            &metrics,
            previous.map(|p| &p.auth),
        )?;
        // Serving threads are started once: a reload keeps their number.
        let threads = previous.map_or(config.listen.workers, |p| p.proxy.threads());
        let proxy = Proxy::new(&config.upstream, &built.upstream_ca, threads)?;
        let stepup = Stepup::new(
            &config.stepup,
            built.stepup.clone(),
            config.listen.tls.is_some(),
            config.listen.trusted_proxies.clone(),
            store,
            metrics,
        );
        let assertion_keys = PublishedKeys::next(
            previous.map(|p| &p.assertion_keys),
            built.assertion.as_ref(),
            Instant::now(),
        );
        Ok(State {
            config: Arc::new(config),
            auth,
            proxy,
            stepup,
            assertion_keys,
        })
    }
}
