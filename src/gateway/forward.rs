//! Terminal, proxy mode: the request goes upstream with the gateway's
//! identity headers, without the second-factor token, with forwarded
//! headers describing the client, on the normalised path.

use http::header::{HeaderValue, HOST};
use http::{Extensions, HeaderMap, HeaderName, Request, Response};
use std::sync::Arc;

use super::{Exchange, State};
use crate::http::{cookies, Body, Rejection};
use crate::identity::Identity;
use crate::policy::Rule;
use crate::proxy::{self, ProxyError};
use crate::stepup::IdpProof;
use crate::telemetry::Outcome;
use crate::token::SecondFactor;

const X_STEPGATE_USER: HeaderName = HeaderName::from_static("x-stepgate-user");
const X_STEPGATE_EMAIL: HeaderName = HeaderName::from_static("x-stepgate-email");
const X_STEPGATE_STEPUP: HeaderName = HeaderName::from_static("x-stepgate-stepup");
const X_STEPGATE_STEPUP_AGE: HeaderName = HeaderName::from_static("x-stepgate-stepup-age");
/// The headers the gateway sets for the upstream (CONTRACT §4).
pub(super) const IDENTITY_HEADERS: [HeaderName; 4] = [
    X_STEPGATE_USER,
    X_STEPGATE_EMAIL,
    X_STEPGATE_STEPUP,
    X_STEPGATE_STEPUP_AGE,
];

pub(super) async fn run(
    s: &State,
    req: Request<Body>,
    ex: &mut Exchange<'_>,
) -> Result<Response<Body>, Rejection> {
    let assertion = s
        .config
        .built
        .assertion
        .as_ref()
        .and_then(|a| sign_assertion(a, &req, ex.rule));
    let (mut parts, body) = req.into_parts();
    let headers = &mut parts.headers;
    s.stepup.strip_token(headers, &ex.carried);
    // HTTP/2 clients send one `cookie` field per cookie (RFC 9113
    // 8.2.3); an HTTP/1.1 upstream expects them in one header.
    if ex.carried.cookie {
        cookies::join(headers);
    }
    set_identity_headers(headers, &parts.extensions);
    if let Some((name, value)) = assertion {
        headers.insert(name, value);
    }
    proxy::set_forwarded(headers, &ex.conn, ex.trusted_proxy, ex.host.as_deref());
    if let Some(h) = &ex.host {
        // The host the rules matched is the host the app reads (HTTP/2
        // carries it in :authority; HTTP/1.1 upstreams need Host). Most
        // often it is the client's `Host` already, left as it is.
        let same = headers
            .get(HOST)
            .is_some_and(|v| v.as_bytes() == h.as_bytes());
        if !same {
            if let Ok(v) = HeaderValue::from_str(h) {
                headers.insert(HOST, v);
            }
        }
    }
    let req = Request::from_parts(parts, body);
    let uri = s
        .proxy
        .upstream_uri(&ex.path, req.uri().query())
        .map_err(|e| {
            tracing::debug!(error = %e, "cannot build upstream URI");
            Rejection::BadTarget
        })?;
    match s.proxy.forward(req, uri, ex.upgrade).await {
        Ok(res) => {
            ex.outcome = Outcome::Forwarded;
            Ok(res)
        }
        Err(e) => {
            tracing::warn!(error = %e, "upstream request failed");
            Err(match e {
                ProxyError::Timeout(_) => Rejection::UpstreamTimeout,
                _ => Rejection::UpstreamUnavailable,
            })
        }
    }
}

/// The signed assertion (CONTRACT §5.4) for a request with an identity:
/// who, and which second factor was checked for `rule`.
pub(super) fn sign_assertion<B>(
    a: &crate::assertion::Signer,
    req: &Request<B>,
    rule: Option<&Rule>,
) -> Option<(HeaderName, HeaderValue)> {
    use crate::assertion::Factor;
    let id = req.extensions().get::<Arc<Identity>>()?;
    let rule_name = rule.map_or("", |r| &*r.name);
    let factor = if let Some(sf) = req.extensions().get::<SecondFactor>() {
        Some(Factor {
            amr: vec!["otp", sf.channel.as_str()],
            acr: None,
            auth_time: sf.auth_time,
            rule: rule_name,
        })
    } else {
        req.extensions().get::<IdpProof>().map(|p| Factor {
            amr: p.amr.iter().map(String::as_str).collect(),
            acr: p.acr.as_deref(),
            auth_time: p.auth_time,
            rule: rule_name,
        })
    };
    let token = a.sign(&id.subject, id.email.as_deref(), factor)?;
    Some((a.header.clone(), HeaderValue::from_str(&token).ok()?))
}

/// Set `X-Stepgate-User`, `-Email`, `-Stepup`, `-Stepup-Age` in `out` for
/// the identity and second factor the phases put in the request's
/// extensions (a value that is not a valid header value is left out, never
/// forwarded raw; whatever `out` held under those names is then kept).
pub(super) fn set_identity_headers(out: &mut HeaderMap, ext: &Extensions) {
    if let Some(id) = ext.get::<Arc<Identity>>() {
        if let Ok(v) = HeaderValue::from_str(&id.subject) {
            out.insert(X_STEPGATE_USER, v);
        }
        if let Some(v) = id
            .email
            .as_deref()
            .and_then(|e| HeaderValue::from_str(e).ok())
        {
            out.insert(X_STEPGATE_EMAIL, v);
        }
    }
    let factor = ext
        .get::<SecondFactor>()
        .map(|sf| (sf.channel.as_str(), sf.auth_time))
        .or_else(|| ext.get::<IdpProof>().map(|p| ("idp", p.auth_time)));
    if let Some((factor, auth_time)) = factor {
        out.insert(X_STEPGATE_STEPUP, HeaderValue::from_static(factor));
        let age = crate::token::unix_now().saturating_sub(auth_time);
        out.insert(X_STEPGATE_STEPUP_AGE, HeaderValue::from(age));
    }
}
