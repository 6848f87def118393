//! Rescue: the one place a [`Rejection`] becomes a response. Who asked
//! decides the form: a browser navigation gets a redirect (sign in, or the
//! challenge page) or a short HTML page, a browser form post that met a
//! challenge gets a 303 to the challenge page, anything else gets a short
//! JSON error with the headers the contract fixes (`WWW-Authenticate`,
//! `Retry-After`). Forward-auth in nginx style never redirects; for a
//! browser it names the redirect in `X-Stepgate-Redirect` instead.

use askama::Template;
use http::header::{HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderName, Response, StatusCode};

use super::Exchange;
use crate::config::Config;
use crate::http::form::query_value;
use crate::http::negotiate::Client;
use crate::http::response::{html, json, redirect};
use crate::http::{Body, Rejection};
use crate::stepup::Branding;
use crate::telemetry::Mode;

/// Header of a forward-auth refusal in nginx style that tells the proxy
/// where to send a browser (nginx cannot pass a 302 from the auth request
/// on, but can copy a header into its own `return 302`).
const X_STEPGATE_REDIRECT: HeaderName = HeaderName::from_static("x-stepgate-redirect");

/// Render `r` for the request `ex` describes.
pub fn render(r: &Rejection, ex: &Exchange<'_>, cfg: &Config) -> Response<Body> {
    let browser = match ex.mode {
        Mode::Proxy => ex.client,
        // A proxy in front passes our redirect on to the browser, which
        // may have been posting a form: both navigate to the answer.
        Mode::ForwardAuth if ex.redirects && ex.client != Client::Api => Client::Navigation,
        Mode::ForwardAuth => Client::Api,
    };
    if let Some((status, location)) = browser_redirect(r, ex, cfg, browser) {
        return redirect(status, &location);
    }
    let mut res = if ex.mode == Mode::Proxy && ex.client == Client::Navigation {
        page(r, &cfg.stepup.branding)
    } else {
        json(r.status(), &body(r, &cfg.stepup.prefix))
    };
    if ex.mode == Mode::ForwardAuth && !ex.redirects && ex.client != Client::Api {
        // Escaped here, where the original request is known exactly; an
        // nginx `return 302 ...?rd=$request_uri` would not escape it.
        let to = browser_redirect(r, ex, cfg, Client::Navigation);
        if let Some(v) = to.and_then(|(_, l)| HeaderValue::from_str(&l).ok()) {
            res.headers_mut().insert(X_STEPGATE_REDIRECT, v);
        }
    }
    let h = res.headers_mut();
    match r {
        Rejection::Unauthenticated => {
            h.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"stepgate\""),
            );
        }
        Rejection::StepUpRequired {
            max_age,
            acr_values,
            ..
        } => {
            // RFC 9470 (config refuses spaces, quotes and backslashes in
            // acr values).
            let acr = acr_values
                .as_ref()
                .map(|a| format!(", acr_values=\"{a}\""))
                .unwrap_or_default();
            let www = format!(
                "Bearer error=\"insufficient_user_authentication\", error_description=\"A fresh second factor is required\"{acr}, max_age={max_age}"
            );
            if let Ok(v) = HeaderValue::from_str(&www) {
                h.insert(WWW_AUTHENTICATE, v);
            }
        }
        _ => {}
    }
    if let Some(wait) = r.retry_after() {
        h.insert(RETRY_AFTER, HeaderValue::from(wait));
    }
    res
}

/// Where a browser (`client`) is sent instead of the refusal, if anywhere:
/// without a sign-in, to `identity.login_url`; without a fresh second
/// factor, to the challenge page, or, on a rule only the identity provider
/// can satisfy, to `identity.login_url` asking (as RFC 9470 clients do)
/// for the `acr_values` and `max_age` the rule needs.
fn browser_redirect(
    r: &Rejection,
    ex: &Exchange<'_>,
    cfg: &Config,
    client: Client,
) -> Option<(StatusCode, String)> {
    let prefix = &cfg.stepup.prefix;
    let login = cfg.identity.login_url.as_deref();
    match (r, client) {
        (Rejection::Unauthenticated, Client::Navigation) => {
            Some((StatusCode::FOUND, with_query(login?, &[("rd", &ex.target)])))
        }
        (
            Rejection::StepUpRequired {
                codes: false,
                max_age,
                acr_values,
                ..
            },
            Client::Navigation | Client::FormPost,
        ) => {
            let max_age = max_age.to_string();
            let mut query = vec![("rd", ex.target.as_str())];
            if let Some(acr) = acr_values {
                query.push(("acr_values", acr));
            }
            query.push(("max_age", &max_age));
            let status = match client {
                Client::FormPost => StatusCode::SEE_OTHER,
                _ => StatusCode::FOUND,
            };
            Some((status, with_query(login?, &query)))
        }
        (Rejection::StepUpRequired { .. }, Client::Navigation) => Some((
            StatusCode::FOUND,
            format!("{prefix}/challenge?rd={}", query_value(&ex.target)),
        )),
        (Rejection::StepUpRequired { stash, .. }, Client::FormPost) => {
            // The form's own target comes back with the replay, not in rd.
            let mut location = format!("{prefix}/challenge?rd={}", query_value(&ex.path));
            if let Some(stash) = stash {
                location.push_str("&stash=");
                location.push_str(stash);
            }
            Some((StatusCode::SEE_OTHER, location))
        }
        _ => None,
    }
}

/// `base` with `pairs` appended to its query (percent-encoded).
fn with_query(base: &str, pairs: &[(&str, &str)]) -> String {
    let mut out = base.to_string();
    let mut sep = if base.contains('?') { '&' } else { '?' };
    for (k, v) in pairs {
        out.push(sep);
        out.push_str(k);
        out.push('=');
        out.push_str(&query_value(v));
        sep = '&';
    }
    out
}

/// The JSON body: `{"error", "message"}`, or the shapes the contract
/// fixes for a wrong code and a step-up challenge.
fn body(r: &Rejection, prefix: &str) -> serde_json::Value {
    match r {
        Rejection::InvalidCode { attempts_left } => {
            serde_json::json!({"error": r.code(), "attempts_left": attempts_left})
        }
        Rejection::StepUpRequired {
            max_age,
            acr_values,
            ..
        } => {
            let mut body = serde_json::json!({
                "error": r.code(),
                "max_age": max_age,
                "methods": format!("{prefix}/api/methods"),
            });
            if let Some(acr) = acr_values {
                body["acr_values"] = acr.clone().into();
            }
            body
        }
        _ => serde_json::json!({"error": r.code(), "message": r.message()}),
    }
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage<'a> {
    brand: &'a Branding,
    title: &'a str,
    message: &'a str,
}

/// A short HTML page for a browser navigation that was refused.
fn page(r: &Rejection, brand: &Branding) -> Response<Body> {
    let status = r.status();
    let message = r.message();
    let tpl = MessagePage {
        brand,
        title: status.canonical_reason().unwrap_or("Error"),
        message: &message,
    };
    html(tpl.render(), status, &crate::otp::random_id())
}

/// The answer to a request whose handler panicked (a bug): a short 500,
/// nothing forwarded.
pub fn panicked() -> Response<Body> {
    let r = Rejection::Internal;
    json(r.status(), &body(&r, ""))
}
