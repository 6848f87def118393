//! Phase 1, normalise: which request is being decided, and its one
//! normalised path (the path matched is the path forwarded). In proxy mode
//! that is the request itself; at `{prefix}/auth` it is the original
//! request a proxy in front describes (`forward_auth.rs`).

use http::header::HOST;
use http::{Method, Request};

use super::{forward_auth, Exchange, State};
use crate::http::negotiate::Client;
use crate::http::{Body, Rejection};
use crate::policy::normalize_path;
use crate::telemetry::Mode;

pub(super) fn run(s: &State, req: &Request<Body>, ex: &mut Exchange<'_>) -> Result<(), Rejection> {
    let cfg = &s.config;
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    if target.len() > cfg.listen.max_uri_bytes {
        return Err(Rejection::UriTooLong);
    }
    if req.method() == Method::CONNECT {
        return Err(Rejection::ConnectMethod);
    }
    // hyper accepts any token as a method; Django, Werkzeug and ASP.NET
    // read `delete` as DELETE, while the policy matches methods as sent.
    if !is_plain_method(req.method().as_str().as_bytes()) {
        return Err(Rejection::BadMethod);
    }
    let path = normalize_path(req.uri().path()).map_err(|e| {
        ex.path = "<invalid>".into();
        Rejection::BadPath(e)
    })?;
    if forward_auth::is_endpoint(&path, &cfg.stepup.prefix) {
        ex.mode = Mode::ForwardAuth;
        ex.path = path;
        let original = forward_auth::original(req, ex.trusted_proxy)?;
        if original.target.len() > cfg.listen.max_uri_bytes {
            return Err(Rejection::UriTooLong);
        }
        let path = original.target.split(['?', '#']).next().unwrap_or("");
        ex.path = normalize_path(path).map_err(|e| {
            ex.path = "<invalid>".into();
            Rejection::BadPath(e)
        })?;
        if !is_plain_method(original.method.as_str().as_bytes()) {
            return Err(Rejection::BadMethod);
        }
        ex.client = Client::of(&original.method, req.headers());
        ex.method = original.method;
        ex.host = original.host.or(request_host(req)?);
        ex.target = original.target;
        ex.redirects = original.redirects;
        return Ok(());
    }
    ex.path = path;
    ex.host = request_host(req)?;
    ex.target = target.to_string();
    Ok(())
}

/// A method as nginx accepts it: upper-case letters, `-` and `_` only.
/// Anything else (`delete`, `Get`) would be matched as sent by the policy
/// and read as another method by some apps.
pub(super) fn is_plain_method(m: &[u8]) -> bool {
    !m.is_empty()
        && m.iter()
            .all(|b| b.is_ascii_uppercase() || *b == b'-' || *b == b'_')
}

/// The host the client asked for: the URI authority (HTTP/2, absolute-form),
/// else `Host`. Refused (RFC 9112 3.2) when there are several `Host`
/// headers or the value is not `host[:port]`: rules must match the host the
/// app will read.
fn request_host<B>(req: &Request<B>) -> Result<Option<String>, Rejection> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(Rejection::BadHost);
    }
    let header = match header {
        Some(v) => Some(v.to_str().map_err(|_| Rejection::BadHost)?),
        None => None,
    };
    // An authority in the target (absolute-form, HTTP/2 :authority) wins
    // over Host (RFC 9112 3.2.2); the forwarded Host is set to it.
    let host = req.uri().authority().map(|a| a.as_str()).or(header);
    valid_host(host)
}

/// `host[:port]` with nothing else in it, or no host at all.
pub(super) fn valid_host(host: Option<&str>) -> Result<Option<String>, Rejection> {
    match host {
        Some(h)
            if h.is_empty()
                || !h.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
                }) =>
        {
            Err(Rejection::BadHost)
        }
        h => Ok(h.map(str::to_string)),
    }
}
