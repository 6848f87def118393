//! Delivery of one-time codes by SMS: a generic JSON webhook or the Twilio
//! Messages API.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{error_chain, mask_phone, minutes_phrase, CodeMessage, DeliveryError, Notifier};

/// Which SMS provider to use and how to reach it.
#[derive(Clone)]
pub enum SmsSettings {
    /// `POST url` with a JSON body `{"to": "...", "text": "..."}`.
    Webhook {
        url: Uri,
        /// Sent verbatim as the `Authorization` header when set.
        auth_header: Option<String>,
    },
    /// The Twilio Messages API.
    Twilio {
        account_sid: String,
        auth_token: String,
        /// The sending number or messaging service sender.
        from: String,
        /// The API root; [`SmsSettings::TWILIO_BASE_URL`] in production.
        base_url: Uri,
    },
}

impl SmsSettings {
    /// The production Twilio API root.
    pub const TWILIO_BASE_URL: &'static str = "https://api.twilio.com";
}

impl fmt::Debug for SmsSettings {
    /// Shows everything but credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmsSettings::Webhook { url, auth_header } => f
                .debug_struct("Webhook")
                .field("url", &redacted_uri(url))
                .field("auth_header", &auth_header.as_ref().map(|_| "<redacted>"))
                .finish(),
            SmsSettings::Twilio {
                account_sid,
                auth_token: _,
                from,
                base_url,
            } => f
                .debug_struct("Twilio")
                .field("account_sid", account_sid)
                .field("auth_token", &"<redacted>")
                .field("from", from)
                .field("base_url", base_url)
                .finish(),
        }
    }
}

/// The largest response body read from a provider (and then discarded).
const MAX_RESPONSE_BODY: usize = 64 * 1024;

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What every request of one notifier is sent to, prepared once.
enum Target {
    Webhook {
        url: Uri,
        authorization: Option<HeaderValue>,
    },
    Twilio {
        url: Uri,
        from: String,
        authorization: HeaderValue,
    },
}

/// Sends one-time codes as text messages through one pooled HTTP(S) client.
#[derive(Clone)]
pub struct SmsNotifier {
    client: HttpClient,
    target: Arc<Target>,
    timeout: Duration,
}

impl fmt::Debug for SmsNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (provider, url) = match &*self.target {
            Target::Webhook { url, .. } => ("webhook", url),
            Target::Twilio { url, .. } => ("twilio", url),
        };
        f.debug_struct("SmsNotifier")
            .field("provider", &provider)
            .field("url", &redacted_uri(url))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl SmsNotifier {
    /// Checks the settings and builds the HTTP client. `timeout` bounds one
    /// whole send (connect, request, response). No connection is made until
    /// the first send.
    pub fn new(settings: SmsSettings, timeout: Duration) -> Result<SmsNotifier, String> {
        if timeout.is_zero() {
            return Err("sms: timeout is zero".to_owned());
        }
        let target = match settings {
            SmsSettings::Webhook { url, auth_header } => {
                check_base(&url, "webhook url")?;
                let authorization = auth_header
                    .map(|h| {
                        let mut value = HeaderValue::from_str(h.trim()).map_err(|_| {
                            "sms: webhook auth_header is not a valid header value".to_owned()
                        })?;
                        value.set_sensitive(true);
                        Ok::<_, String>(value)
                    })
                    .transpose()?;
                Target::Webhook { url, authorization }
            }
            SmsSettings::Twilio {
                account_sid,
                auth_token,
                from,
                base_url,
            } => {
                check_base(&base_url, "twilio base_url")?;
                if account_sid.is_empty() || !account_sid.chars().all(|c| c.is_ascii_alphanumeric())
                {
                    return Err("sms: twilio account_sid must be letters and digits".to_owned());
                }
                if auth_token.is_empty() {
                    return Err("sms: twilio auth_token is empty".to_owned());
                }
                if from.trim().is_empty() {
                    return Err("sms: twilio from is empty".to_owned());
                }
                let root = base_url.to_string();
                let url = format!(
                    "{}/2010-04-01/Accounts/{account_sid}/Messages.json",
                    root.trim_end_matches('/')
                )
                .parse::<Uri>()
                .map_err(|e| format!("sms: twilio base_url gives a bad URL: {e}"))?;
                let credentials = base64::engine::general_purpose::STANDARD
                    .encode(format!("{account_sid}:{auth_token}"));
                let mut authorization = HeaderValue::from_str(&format!("Basic {credentials}"))
                    .map_err(|_| "sms: twilio credentials are not header-safe".to_owned())?;
                authorization.set_sensitive(true);
                Target::Twilio {
                    url,
                    from: from.trim().to_owned(),
                    authorization,
                }
            }
        };

        let tls = match HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
        {
            Ok(builder) => builder,
            Err(e) if target.url().scheme() == Some(&http::uri::Scheme::HTTPS) => {
                return Err(format!("sms: no trusted root certificates: {e}"));
            }
            // Plain-http targets never use the roots.
            Err(_) => HttpsConnectorBuilder::new().with_tls_config(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("sms: TLS setup: {e}"))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            ),
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        let connector = tls
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);

        Ok(SmsNotifier {
            client,
            target: Arc::new(target),
            timeout,
        })
    }

    /// Builds the provider request for `msg`.
    fn request(&self, msg: &CodeMessage<'_>) -> Result<Request<Full<Bytes>>, DeliveryError> {
        let to = msg.to.trim();
        if to.is_empty() || to.chars().any(char::is_control) {
            return Err(DeliveryError::InvalidRecipient);
        }
        let text = sms_text(msg);
        let request = match &*self.target {
            Target::Webhook { url, authorization } => {
                let body = serde_json::json!({ "to": to, "text": text }).to_string();
                let mut builder = Request::builder()
                    .method(Method::POST)
                    .uri(url.clone())
                    .header(CONTENT_TYPE, "application/json");
                if let Some(value) = authorization {
                    builder = builder.header(AUTHORIZATION, value.clone());
                }
                builder.body(Full::new(Bytes::from(body)))
            }
            Target::Twilio {
                url,
                from,
                authorization,
            } => {
                let body = form_urlencoded(&[("To", to), ("From", from), ("Body", &text)]);
                Request::builder()
                    .method(Method::POST)
                    .uri(url.clone())
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .header(AUTHORIZATION, authorization.clone())
                    .body(Full::new(Bytes::from(body)))
            }
        };
        request.map_err(|e| DeliveryError::Unavailable(format!("building the request: {e}")))
    }

    /// Sends the request and reads the answer, without a time limit.
    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<(), DeliveryError> {
        let response = self.client.request(request).await.map_err(|e| {
            let what = if e.is_connect() { "connect" } else { "request" };
            DeliveryError::Unavailable(format!("{what}: {}", error_chain(&e)))
        })?;
        let status = response.status();
        // Drain (bounded) so the connection can go back to the pool; the
        // body itself is never looked at.
        let _ = Limited::new(response.into_body(), MAX_RESPONSE_BODY)
            .collect()
            .await;
        if status.is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Rejected(format!("HTTP {status}")))
        }
    }
}

#[async_trait::async_trait]
impl Notifier for SmsNotifier {
    async fn send(&self, msg: &CodeMessage<'_>) -> Result<(), DeliveryError> {
        let request = self.request(msg)?;
        let result = match tokio::time::timeout(self.timeout, self.exchange(request)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(DeliveryError::Timeout),
        };
        match &result {
            Ok(()) => tracing::debug!(to = %mask_phone(msg.to), "code sms sent"),
            Err(e) => tracing::warn!(to = %mask_phone(msg.to), error = %e, "code sms failed"),
        }
        result
    }
}

impl Target {
    fn url(&self) -> &Uri {
        match self {
            Target::Webhook { url, .. } | Target::Twilio { url, .. } => url,
        }
    }
}

/// The text message for `msg`.
fn sms_text(msg: &CodeMessage<'_>) -> String {
    format!(
        "{} is your {} verification code. It expires in {}.",
        msg.code,
        msg.product,
        minutes_phrase(msg.ttl)
    )
}

/// Requires an absolute http(s) URL.
fn check_base(url: &Uri, what: &str) -> Result<(), String> {
    match (url.scheme_str(), url.host()) {
        (Some("http" | "https"), Some(host)) if !host.is_empty() => Ok(()),
        _ => Err(format!("sms: {what} must be an absolute http(s) URL")),
    }
}

/// The URL without its query (which may carry a token), for display.
fn redacted_uri(url: &Uri) -> String {
    match (url.scheme_str(), url.authority()) {
        (Some(scheme), Some(authority)) => {
            let host = authority.as_str().rsplit('@').next().unwrap_or_default();
            format!("{scheme}://{host}{}", url.path())
        }
        _ => url.path().to_owned(),
    }
}

/// Encodes name/value pairs as `application/x-www-form-urlencoded`.
fn form_urlencoded(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        form_encode_into(&mut out, name);
        out.push('=');
        form_encode_into(&mut out, value);
    }
    out
}

fn form_encode_into(out: &mut String, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0x0f)]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // Guards against '+' in phone numbers turning into spaces at Twilio.
    fn form_encoding_escapes_reserved_characters() {
        assert_eq!(
            form_urlencoded(&[("To", "+1 555"), ("Body", "a&b=c/é")]),
            "To=%2B1+555&Body=a%26b%3Dc%2F%C3%A9"
        );
    }

    #[test]
    // Guards against query-string tokens of a webhook URL reaching logs.
    fn redacted_uri_drops_query_and_userinfo() {
        let url: Uri = "https://user:pw@hooks.example.com/sms?token=secret"
            .parse()
            .expect("static URL");
        assert_eq!(redacted_uri(&url), "https://hooks.example.com/sms");
    }
}
