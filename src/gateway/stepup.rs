//! Phase 5, step-up: on a step-up rule, a fresh second factor bound to
//! this identity, or a challenge. The verified
//! [`SecondFactor`](crate::token::SecondFactor) travels on in the request's
//! extensions. A browser form post that meets a challenge is kept so it
//! can be replayed after verification.

use http::{Method, Request};
use std::sync::Arc;

use super::{Exchange, State};
use crate::http::form;
use crate::http::negotiate::Client;
use crate::http::{Body, Rejection};
use crate::identity::Identity;
use crate::policy::{normalize_path, Action, StepUp as Need};
use crate::stepup::{safe_rd, StepupCheck};
use crate::telemetry::Mode;

pub(super) async fn run(
    s: &State,
    req: &mut Request<Body>,
    ex: &mut Exchange<'_>,
) -> Result<(), Rejection> {
    let (Some(rule), Action::StepUp(need)) = (ex.rule, ex.action) else {
        return Ok(());
    };
    let id = req
        .extensions()
        .get::<Arc<Identity>>()
        .ok_or(Rejection::Unauthenticated)?;
    let client = ex.conn.peer.ip();
    // Boxed: large and off the plain-proxy path.
    let check = Box::pin(
        s.stepup
            .check(req.headers(), id, rule, need, client, ex.mode),
    )
    .await;
    match check {
        StepupCheck::Fresh(sf) => {
            req.extensions_mut().insert(sf);
            Ok(())
        }
        StepupCheck::FreshFromIdp(proof) => {
            req.extensions_mut().insert(proof);
            Ok(())
        }
        StepupCheck::Needed => {
            let codes = s.stepup.sends_codes_for(&need.factors);
            // Forward-auth never sees the body, so there is nothing to
            // keep; nor is there when only the identity provider can help
            // (the browser goes to sign in there, not to the challenge page).
            let stash = if ex.mode == Mode::Proxy && ex.client == Client::FormPost && codes {
                let id = req
                    .extensions()
                    .get::<Arc<Identity>>()
                    .cloned()
                    .ok_or(Rejection::Unauthenticated)?;
                Box::pin(s.stepup.stash_form(req, &id, ex.host.as_deref())).await
            } else {
                None
            };
            Err(required(need, codes, stash))
        }
        StepupCheck::Unavailable => Err(Rejection::StepupUnavailable),
    }
}

/// The refusal of a request that needs a fresh second factor: `codes` when
/// one of the rule's factors can be sent, else only the identity provider
/// can help (its `acr_values` and `max_age` go with the redirect there).
fn required(need: &Need, codes: bool, stash: Option<String>) -> Rejection {
    let acr_values = need
        .idp
        .as_ref()
        .filter(|i| !i.acr.is_empty())
        .map(|i| i.acr.join(" "));
    Rejection::StepUpRequired {
        max_age: need.max_age.as_secs(),
        acr_values,
        codes,
        stash,
    }
}

/// The challenge page (`GET {prefix}/challenge?rd=...`) for a return
/// target whose rule only the identity provider can satisfy (no factor of
/// it can be sent). With ingress-nginx, `auth-signin` sends every refusal
/// to the challenge page; a code form would be no use there, so the page
/// refuses as proxy mode refuses on `rd` itself: `rescue` sends the browser
/// to `identity.login_url` with `rd`, the rule's `acr_values` and
/// `max_age`. `rd` is checked as the page checks it (a path on this host,
/// else `/`), and matched as a `GET` on this host, as the browser will
/// request it.
pub(super) fn idp_only_page<B>(
    s: &State,
    req: &Request<B>,
    sub: &str,
    ex: &mut Exchange<'_>,
) -> Result<(), Rejection> {
    if sub != "/challenge" || !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Ok(());
    }
    let query = form::parse(req.uri().query().unwrap_or("").as_bytes());
    let rd = safe_rd(form::get(&query, "rd"));
    let path = rd.split(['?', '#']).next().unwrap_or("/");
    let Ok(path) = normalize_path(path) else {
        return Ok(());
    };
    let rule = s
        .config
        .policy
        .route(&Method::GET, ex.host.as_deref(), &path);
    let Some(Action::StepUp(need)) = rule.map(|r| &r.action) else {
        return Ok(());
    };
    if s.stepup.sends_codes_for(&need.factors) {
        return Ok(());
    }
    ex.target = rd;
    Err(required(need, false, None))
}
