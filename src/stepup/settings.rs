//! The `stepup` settings the config loader builds: codes, channels, the
//! second-factor token, send budgets and the page's branding.

use std::time::Duration;

use crate::delivery::email::EmailSettings;
use crate::delivery::sms::SmsSettings;

/// `stepup.otp`: one-time codes and the limits on sending and trying them.
#[derive(Debug, Clone)]
pub struct OtpSettings {
    pub length: u32,
    pub ttl: Duration,
    pub max_attempts: u32,
    pub resend_after: Duration,
    pub max_sends: u32,
    pub lockout: Duration,
    pub max_failures: u32,
    /// Sends per client address (IPv6: per /64) per hour, all users and
    /// channels together; 0 turns the cap off.
    pub max_sends_per_client: u32,
}

/// Caps on sending codes that protect the operator's bill rather than one
/// user: how many codes a channel may send per hour across all users, and
/// which destinations SMS may go to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendBudget {
    /// Email codes per hour, all users together; `None`: unlimited.
    pub email_per_hour: Option<u32>,
    /// SMS codes per hour, all users together; `None`: unlimited.
    pub sms_per_hour: Option<u32>,
    /// E.164 prefixes (`+44`, `+1204`) SMS may be sent to; empty: any.
    pub sms_countries: Vec<String>,
}

/// `stepup.branding`: how the challenge page looks.
#[derive(Debug, Clone)]
pub struct Branding {
    pub product: String,
    pub logo_url: Option<String>,
    pub accent: String,
}

/// The `stepup` settings, built by the config loader.
#[derive(Clone)]
pub struct Settings {
    pub prefix: String,
    pub otp: OtpSettings,
    pub token: crate::token::Settings,
    pub email: Option<EmailSettings>,
    pub sms: Option<SmsSettings>,
    pub sms_timeout: Duration,
    pub budget: SendBudget,
    pub console: bool,
    pub branding: Branding,
    /// Largest request body kept to replay a form post after step-up.
    pub stash_max_bytes: usize,
}
