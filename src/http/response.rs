//! Responses the gateway writes itself: JSON, redirects and HTML pages,
//! never cached.

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use http::{Response, StatusCode};

use super::body::{empty, full, Body};

const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut res = Response::new(full(value.to_string()));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, NO_STORE);
    res
}

/// A redirect (302 for navigations, 303 after a form post) to `location`.
pub fn redirect(status: StatusCode, location: &str) -> Response<Body> {
    let mut res = Response::new(empty());
    *res.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(location) {
        res.headers_mut().insert(LOCATION, v);
    }
    res.headers_mut().insert(CACHE_CONTROL, NO_STORE);
    res
}

/// An empty answer that must not be cached (e.g. 204 after logout).
pub fn no_content() -> Response<Body> {
    let mut res = Response::new(empty());
    *res.status_mut() = StatusCode::NO_CONTENT;
    res.headers_mut().insert(CACHE_CONTROL, NO_STORE);
    res
}

/// An HTML page rendered by askama (which escapes every value), with a
/// strict CSP whose only script is the one carrying `nonce`. A template
/// that fails to render becomes a short 500 page.
pub fn html(rendered: askama::Result<String>, status: StatusCode, nonce: &str) -> Response<Body> {
    let (body, status) = match rendered {
        Ok(b) => (b, status),
        Err(e) => {
            tracing::error!(error = %e, "template rendering failed");
            (
                "<!doctype html><title>Error</title><p>Something went wrong. Please try again.</p>"
                    .to_string(),
                StatusCode::INTERNAL_SERVER_ERROR,
            )
        }
    };
    let mut res = Response::new(full(body));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, NO_STORE);
    let csp = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src https: data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert("content-security-policy", v);
    }
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    res
}
