//! Delivery of one-time codes by email over SMTP.

use std::fmt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use askama::Template;
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::AsyncSmtpTransportBuilder;
use lettre::{Address, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{error_chain, mask_email, minutes_phrase, CodeMessage, DeliveryError, Notifier};

/// The HTML part of a code email (`templates/code_email.html`).
#[derive(askama::Template)]
#[template(path = "code_email.html")]
struct CodeEmail<'a> {
    product: &'a str,
    code: &'a str,
    minutes: &'a str,
}

/// How the connection to the SMTP server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain SMTP, no TLS at all (local relays and tests only).
    None,
    /// Plain connection upgraded with STARTTLS; refuses servers without it.
    StartTls,
    /// TLS from the first byte (SMTPS, "implicit TLS").
    Tls,
}

/// Where and how to send code emails.
#[derive(Clone)]
pub struct EmailSettings {
    /// SMTP server host name (also the name its TLS certificate must carry).
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    /// SMTP AUTH user; credentials are only used when both this and
    /// `password` are set.
    pub username: Option<String>,
    pub password: Option<String>,
    /// The sender mailbox, e.g. `Security <no-reply@example.com>`.
    pub from: String,
    pub subject: String,
    /// Upper bound for one whole send (connect, dialogue, data).
    pub timeout: Duration,
    /// A PEM file with extra root certificates to trust for the SMTP
    /// server, in addition to the built-in web PKI roots. Only valid with
    /// `StartTls` or `Tls`.
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for EmailSettings {
    /// Shows everything but the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("from", &self.from)
            .field("subject", &self.subject)
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Sends one-time codes as multipart (plain text + HTML) emails through one
/// pooled SMTP transport.
pub struct EmailNotifier {
    builder: AsyncSmtpTransportBuilder,
    /// Built on first use: the pool starts a task on the current runtime.
    transport: OnceLock<AsyncSmtpTransport<Tokio1Executor>>,
    from: Mailbox,
    subject: String,
    timeout: Duration,
}

impl fmt::Debug for EmailNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailNotifier")
            .field("from", &self.from)
            .field("subject", &self.subject)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl EmailNotifier {
    /// Checks the settings (sender, credentials, TLS roots) and prepares the
    /// SMTP transport. Nothing connects and no task starts before the first
    /// send, so this also works outside a Tokio runtime (e.g. to validate a
    /// configuration).
    pub fn new(settings: EmailSettings) -> Result<EmailNotifier, String> {
        let host = settings.host.trim();
        if host.is_empty() {
            return Err("email: SMTP host is empty".to_owned());
        }
        if settings.port == 0 {
            return Err("email: SMTP port is 0".to_owned());
        }
        if settings.timeout.is_zero() {
            return Err("email: timeout is zero".to_owned());
        }
        let from: Mailbox = settings
            .from
            .parse()
            .map_err(|e| format!("email: sender {:?} is not a mailbox: {e}", settings.from))?;

        let builder = match settings.security {
            SmtpSecurity::None => {
                if settings.ca_file.is_some() {
                    return Err("email: ca_file is set but security is none".to_owned());
                }
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            }
            SmtpSecurity::StartTls => {
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host).tls(Tls::Required(
                    tls_parameters(host, settings.ca_file.as_ref())?,
                ))
            }
            SmtpSecurity::Tls => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host).tls(
                Tls::Wrapper(tls_parameters(host, settings.ca_file.as_ref())?),
            ),
        };
        let mut builder = builder.port(settings.port).timeout(Some(settings.timeout));
        match (settings.username, settings.password) {
            (Some(user), Some(password)) => {
                builder = builder.credentials(Credentials::new(user, password));
            }
            (None, None) => {}
            _ => return Err("email: username and password must be set together".to_owned()),
        }

        Ok(EmailNotifier {
            builder,
            transport: OnceLock::new(),
            from,
            subject: settings.subject,
            timeout: settings.timeout,
        })
    }

    /// The pooled transport, built on first use.
    fn transport(&self) -> &AsyncSmtpTransport<Tokio1Executor> {
        self.transport.get_or_init(|| self.builder.clone().build())
    }

    /// Builds the email for `msg`.
    fn message(&self, msg: &CodeMessage<'_>) -> Result<Message, DeliveryError> {
        let to: Address = msg
            .to
            .trim()
            .parse()
            .map_err(|_| DeliveryError::InvalidRecipient)?;
        let minutes = minutes_phrase(msg.ttl);
        let text = format!(
            "Your {product} verification code is: {code}\r\n\
             \r\n\
             It expires in {minutes}.\r\n\
             \r\n\
             If you did not just try to sign in to {product}, ignore this email.\r\n\
             Never share this code with anyone.\r\n",
            product = msg.product,
            code = msg.code,
        );
        // Escaped by the template (askama), like every page the gateway
        // renders.
        let html = CodeEmail {
            product: msg.product,
            code: msg.code,
            minutes: &minutes,
        }
        .render()
        .map_err(|e| DeliveryError::Unavailable(format!("email template: {e}")))?;
        Message::builder()
            .from(self.from.clone())
            .to(Mailbox::new(None, to))
            .subject(self.subject.clone())
            .message_id(None)
            .multipart(MultiPart::alternative_plain_html(text, html))
            .map_err(|_| DeliveryError::InvalidRecipient)
    }
}

#[async_trait::async_trait]
impl Notifier for EmailNotifier {
    async fn send(&self, msg: &CodeMessage<'_>) -> Result<(), DeliveryError> {
        let email = self.message(msg)?;
        let result = match tokio::time::timeout(self.timeout, self.transport().send(email)).await {
            Err(_elapsed) => Err(DeliveryError::Timeout),
            Ok(Ok(_response)) => Ok(()),
            Ok(Err(e)) => Err(classify(&e)),
        };
        match &result {
            Ok(()) => tracing::debug!(to = %mask_email(msg.to), "code email sent"),
            Err(e) => tracing::warn!(to = %mask_email(msg.to), error = %e, "code email failed"),
        }
        result
    }
}

/// Maps an SMTP client error onto a delivery error without the server's
/// reply text (which may echo the recipient).
fn classify(e: &lettre::transport::smtp::Error) -> DeliveryError {
    if let Some(code) = e.status() {
        let kind = if e.is_transient() {
            "transient"
        } else {
            "permanent"
        };
        DeliveryError::Rejected(format!("SMTP {code} ({kind})"))
    } else if e.is_timeout() {
        DeliveryError::Timeout
    } else {
        DeliveryError::Unavailable(error_chain(e))
    }
}

/// TLS parameters for `host`, trusting the web PKI roots plus any in
/// `ca_file`.
fn tls_parameters(host: &str, ca_file: Option<&PathBuf>) -> Result<TlsParameters, String> {
    let mut builder = TlsParameters::builder(host.to_owned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("email: cannot read ca_file {}: {e}", path.display()))?;
        if !pem
            .windows(b"-----BEGIN CERTIFICATE-----".len())
            .any(|w| w == b"-----BEGIN CERTIFICATE-----")
        {
            return Err(format!(
                "email: ca_file {} holds no PEM certificate",
                path.display()
            ));
        }
        let cert = Certificate::from_pem(&pem)
            .map_err(|e| format!("email: ca_file {}: {e}", path.display()))?;
        builder = builder.add_root_certificate(cert);
    }
    builder
        .build_rustls()
        .map_err(|e| format!("email: TLS setup for {host}: {e}"))
}
