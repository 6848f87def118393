//! Delivery of one-time codes: the `Notifier` trait and its channels.

use std::fmt;

pub mod email;
pub mod sms;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

pub use self::email::{EmailNotifier, EmailSettings, SmtpSecurity};
pub use self::sms::{SmsNotifier, SmsSettings};

/// What a notifier is asked to deliver.
#[derive(Clone, Copy)]
pub struct CodeMessage<'a> {
    /// The recipient: an email address or a phone number, depending on the
    /// channel.
    pub to: &'a str,
    /// The one-time code itself.
    pub code: &'a str,
    /// How long the code stays valid.
    pub ttl: Duration,
    /// The name of the protected product, shown to the recipient.
    pub product: &'a str,
}

impl fmt::Debug for CodeMessage<'_> {
    /// Shows the recipient masked and never the code.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodeMessage")
            .field("to", &mask_contact(self.to))
            .field("code", &"<redacted>")
            .field("ttl", &self.ttl)
            .field("product", &self.product)
            .finish()
    }
}

/// Why a code could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The provider did not answer within the configured timeout.
    #[error("delivery timed out")]
    Timeout,
    /// The provider answered and refused the message (HTTP status other than
    /// 2xx, SMTP 4xx/5xx reply). The text names the status, never the body.
    #[error("delivery rejected by the provider: {0}")]
    Rejected(String),
    /// The provider could not be reached or the connection broke.
    #[error("delivery provider unavailable: {0}")]
    Unavailable(String),
    /// The recipient cannot be used on this channel (not an email address,
    /// empty phone number, ...).
    #[error("invalid recipient for this channel")]
    InvalidRecipient,
}

/// Delivers one-time codes over one channel.
#[async_trait::async_trait]
pub trait Notifier: Send + Sync + 'static {
    /// Delivers `msg` once; returns when the provider has accepted it.
    async fn send(&self, msg: &CodeMessage<'_>) -> Result<(), DeliveryError>;
}

/// The placeholder used when nothing of a contact may be shown.
const FULL_MASK: &str = "***";

/// Masks an email address for display: `jane.doe@example.com` becomes
/// `j***@example.com`. Local parts of one character, and anything that does
/// not look like an address, are masked entirely.
pub fn mask_email(addr: &str) -> String {
    let Some((local, domain)) = addr.trim().rsplit_once('@') else {
        return FULL_MASK.to_owned();
    };
    let domain_ok = !domain.is_empty()
        && domain
            .chars()
            .all(|c| !c.is_control() && !c.is_whitespace() && c != '@');
    let mut chars = local.chars();
    let first = chars.next();
    let local_long_enough = chars.next().is_some();
    match first {
        Some(first) if domain_ok && local_long_enough && first.is_alphanumeric() => {
            format!("{first}***@{domain}")
        }
        _ if domain_ok && !local.is_empty() => format!("{FULL_MASK}@{domain}"),
        _ => FULL_MASK.to_owned(),
    }
}

/// Masks a phone number for display: `+15550100123` becomes `+*******0123`
/// (the leading `+`, one star per hidden digit, the last four digits).
/// Numbers with fewer than eight digits, and anything that is not a phone
/// number, are masked entirely.
pub fn mask_phone(phone: &str) -> String {
    const SHOWN: usize = 4;
    const MIN_DIGITS: usize = 8;
    let phone = phone.trim();
    let (plus, rest) = match phone.strip_prefix('+') {
        Some(rest) => ("+", rest),
        None => ("", phone),
    };
    let separators = [' ', '-', '.', '(', ')'];
    if !rest
        .chars()
        .all(|c| c.is_ascii_digit() || separators.contains(&c))
    {
        return "****".to_owned();
    }
    let digits: Vec<char> = rest.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < MIN_DIGITS {
        return "****".to_owned();
    }
    let hidden = digits.len() - SHOWN;
    let mut out = String::with_capacity(plus.len() + digits.len());
    out.push_str(plus);
    out.extend(std::iter::repeat_n('*', hidden));
    out.extend(&digits[hidden..]);
    out
}

/// Masks a contact of unknown kind: addresses with `@` as email, the rest as
/// phone numbers.
pub(crate) fn mask_contact(contact: &str) -> String {
    if contact.contains('@') {
        mask_email(contact)
    } else {
        mask_phone(contact)
    }
}

/// The lifetime of a code in whole minutes, rounded up, at least one.
pub(crate) fn ttl_minutes(ttl: Duration) -> u64 {
    ttl.as_secs().div_ceil(60).max(1)
}

/// "1 minute", "5 minutes".
pub(crate) fn minutes_phrase(ttl: Duration) -> String {
    match ttl_minutes(ttl) {
        1 => "1 minute".to_owned(),
        n => format!("{n} minutes"),
    }
}

/// A notifier for development and demos: it logs each code (recipient
/// masked) at WARN under the `stepgate::console` target and remembers the
/// last code per recipient, so a demo page can show it. Never use it in
/// production: it is the one place a code is ever logged.
#[derive(Debug, Default)]
pub struct ConsoleNotifier {
    last: Mutex<HashMap<String, String>>,
}

impl ConsoleNotifier {
    /// How many recipients are remembered before the memory is cleared.
    const MAX_REMEMBERED: usize = 10_000;

    /// A notifier with an empty memory.
    pub fn new() -> ConsoleNotifier {
        ConsoleNotifier::default()
    }

    /// The last code sent to `to`, if any.
    pub fn last_code(&self, to: &str) -> Option<String> {
        self.last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(to)
            .cloned()
    }
}

#[async_trait::async_trait]
impl Notifier for ConsoleNotifier {
    async fn send(&self, msg: &CodeMessage<'_>) -> Result<(), DeliveryError> {
        tracing::warn!(
            target: "stepgate::console",
            "code for {}: {}",
            mask_contact(msg.to),
            msg.code
        );
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.len() >= Self::MAX_REMEMBERED && !last.contains_key(msg.to) {
            last.clear();
        }
        last.insert(msg.to.to_owned(), msg.code.to_owned());
        Ok(())
    }
}

/// An error and its sources, joined by ": ", each cause shown once.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
