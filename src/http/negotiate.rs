//! Content negotiation: is a request a browser navigation, a browser form
//! post, JSON? Decides how a refusal is rendered and what the step-up
//! endpoints accept.

use http::header::{ACCEPT, CONTENT_TYPE};
use http::{HeaderMap, Method};

/// How a request was sent, as far as rendering an answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// `GET`/`HEAD` that accepts HTML: gets redirects and pages.
    Navigation,
    /// A browser submitting a plain HTML form (`POST`, urlencoded, accepts
    /// HTML): gets a 303 and may have its form kept across the challenge.
    FormPost,
    /// Anything else (APIs, scripts): gets JSON.
    Api,
}

impl Client {
    pub fn of(method: &Method, headers: &HeaderMap) -> Client {
        let accepts_html = headers
            .get_all(ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/html"));
        if !accepts_html {
            Client::Api
        } else if method == Method::GET || method == Method::HEAD {
            Client::Navigation
        } else if method == Method::POST
            && media_type(headers).as_deref() == Some("application/x-www-form-urlencoded")
        {
            Client::FormPost
        } else {
            Client::Api
        }
    }
}

/// The media type of `Content-Type`, lower-cased, without parameters.
pub fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase())
}

/// A JSON body (`application/json`).
pub fn is_json(headers: &HeaderMap) -> bool {
    media_type(headers).as_deref() == Some("application/json")
}

/// A content type an HTML form can send cross-site without a CORS
/// preflight.
pub fn is_form_type(headers: &HeaderMap) -> bool {
    matches!(
        media_type(headers).as_deref(),
        Some("application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain")
    )
}
