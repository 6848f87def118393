//! Phase 4, policy: the gateway's own endpoints, else the first matching
//! rule (or the default) and what it asks: deny, an identity, a fresh
//! second factor. A method override header may not move the request to a
//! rule the policy did not check.

use http::{HeaderMap, Method, Request};
use std::sync::Arc;

use super::{Exchange, State};
use crate::http::carried::METHOD_OVERRIDE;
use crate::http::{Body, Rejection};
use crate::identity::Identity;
use crate::policy::{Action, DefaultPolicy, Rule};
use crate::telemetry::Mode;

/// Where the request goes next.
pub(super) enum Route {
    /// `{prefix}/...`: the gateway's own pages and API.
    Gateway,
    /// A rule (or the default) applies; `Exchange::action` says what it asks.
    Rule,
}

pub(super) fn run<'s>(
    s: &'s State,
    req: &Request<Body>,
    ex: &mut Exchange<'s>,
) -> Result<Route, Rejection> {
    let cfg = &s.config;
    if ex.mode == Mode::Proxy && under_prefix(&ex.path, &cfg.stepup.prefix) {
        return Ok(Route::Gateway);
    }
    let host = ex.host.as_deref();
    let rule = cfg.policy.route(&ex.method, host, &ex.path);
    if let Some(r) = rule {
        ex.rule_label = r.name.clone();
    }
    ex.rule = rule;
    // e.g. POST + X-HTTP-Method-Override: delete must not reach a rule
    // that only the DELETE was checked against.
    if ex.carried.method_override {
        if let Some(m) = override_method(req.headers())? {
            if !same_rule(cfg.policy.route(&m, host, &ex.path), rule) {
                return Err(Rejection::MethodOverride);
            }
        }
    }
    ex.action = match rule {
        Some(r) => &r.action,
        None => match cfg.policy.default {
            DefaultPolicy::Pass => &Action::Public,
            DefaultPolicy::Identity => &Action::Identity,
        },
    };
    match ex.action {
        Action::Deny => Err(Rejection::Denied),
        Action::Identity | Action::StepUp(_)
            if req.extensions().get::<Arc<Identity>>().is_none() =>
        {
            Err(super::identity::missing(s))
        }
        _ => Ok(Route::Rule),
    }
}

/// The method the override headers ask for ([`METHOD_OVERRIDE`]; a
/// `_method` form field is inside the body, which the policy cannot see:
/// see README; `sanitise` has removed every other spelling of them),
/// upper-cased as frameworks do (`delete` is DELETE to them). Every line
/// of every override header counts: an app may read the last copy, or
/// another header than the first. Values that differ, or are not a
/// method, are refused.
fn override_method(headers: &HeaderMap) -> Result<Option<Method>, Rejection> {
    let mut found: Option<Method> = None;
    for v in METHOD_OVERRIDE.iter().flat_map(|n| headers.get_all(n)) {
        let upper = v.as_bytes().to_ascii_uppercase();
        if !super::normalise::is_plain_method(&upper) {
            return Err(Rejection::MethodOverride);
        }
        let m = Method::from_bytes(&upper).map_err(|_| Rejection::MethodOverride)?;
        match &found {
            Some(f) if *f != m => return Err(Rejection::MethodOverride),
            _ => found = Some(m),
        }
    }
    Ok(found)
}

/// `path` is the prefix itself or below it (whole segments only).
pub(super) fn under_prefix(path: &str, prefix: &str) -> bool {
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
