//! `stepup`: the gateway's prefix, one-time codes, send budgets, the
//! channels (`email.rs`, `sms.rs`), the token (`token.rs`) and branding.

use std::time::Duration;

use super::{email, sms, token, Validator};
use crate::config::raw;
use crate::stepup::{Branding, OtpSettings, SendBudget, Settings};

/// NIST SP 800-63B's longest life for a code sent out of band.
const NIST_MAX_OTP_TTL: Duration = Duration::from_secs(600);

pub(super) fn validate(v: &mut Validator<'_>, mut s: raw::Stepup, dev: bool) -> Option<Settings> {
    let prefix = s.prefix.map(|p| p.0).unwrap_or_else(|| "/.stepgate".into());
    let prefix_ok = prefix.starts_with('/')
        && prefix.len() > 1
        && !prefix.ends_with('/')
        && crate::policy::normalize_path(&prefix).as_deref() == Ok(prefix.as_str());
    if !prefix_ok {
        v.problem(
            "stepup.prefix",
            format!("invalid prefix {prefix:?}: expected a normalised path like /.stepgate"),
        );
    }
    let o = s.otp.unwrap_or_default();
    let length = v.count("stepup.otp.length", o.length, 6, 6, 10);
    let ttl = v.duration("stepup.otp.ttl", o.ttl, Duration::from_secs(300));
    if ttl > NIST_MAX_OTP_TTL && !o.allow_long_ttl.unwrap_or(false) {
        v.problem(
            "stepup.otp.ttl",
            "codes valid longer than 10m are refused (NIST SP 800-63B); set stepup.otp.allow_long_ttl: true to override",
        );
    }
    if ttl.is_zero() {
        v.problem("stepup.otp.ttl", "must be more than 0");
    }
    let otp = OtpSettings {
        length,
        ttl,
        max_attempts: v.count("stepup.otp.max_attempts", o.max_attempts, 5, 1, 100),
        resend_after: v.duration(
            "stepup.otp.resend_after",
            o.resend_after,
            Duration::from_secs(30),
        ),
        max_sends: v.count("stepup.otp.max_sends", o.max_sends, 5, 1, 1000),
        lockout: v.duration("stepup.otp.lockout", o.lockout, Duration::from_secs(900)),
        max_failures: v.count("stepup.otp.max_failures", o.max_failures, 10, 1, 10_000),
        max_sends_per_client: v.count(
            "stepup.otp.max_sends_per_client",
            o.max_sends_per_client,
            50,
            0,
            1_000_000,
        ),
    };
    let token = token::validate(v, s.token.unwrap_or_default());
    let mut budget = SendBudget::default();
    if let Some(e) = &s.email {
        budget.email_per_hour = e
            .hourly_budget
            .map(|n| v.count("stepup.email.hourly_budget", Some(n), 1, 1, 100_000_000));
    }
    if let Some(sms) = &mut s.sms {
        budget.sms_per_hour = sms
            .hourly_budget
            .map(|n| v.count("stepup.sms.hourly_budget", Some(n), 1, 1, 100_000_000));
        budget.sms_countries = country_codes(v, sms.allowed_countries.take());
    }
    let email = s.email.and_then(|e| email::validate(v, e));
    let (sms, sms_timeout) = match s.sms {
        Some(sms) => {
            let timeout = v.duration(
                "stepup.sms.timeout",
                sms.timeout.clone(),
                Duration::from_secs(10),
            );
            (sms::validate(v, sms, timeout), timeout)
        }
        None => (None, Duration::from_secs(10)),
    };
    let console = s.console.unwrap_or(false);
    if console && !dev {
        v.problem(
            "stepup.console",
            "the console channel prints codes to the log: it is refused unless dev: true (or `stepgate demo`)",
        );
    }
    let b = s.branding.unwrap_or_default();
    let accent = b.accent.map(|a| a.0).unwrap_or_else(|| "#2457d6".into());
    let accent_ok = accent.len() <= 32
        && (accent.starts_with('#') && accent[1..].chars().all(|c| c.is_ascii_hexdigit())
            || accent.chars().all(|c| c.is_ascii_alphabetic()));
    if !accent_ok {
        v.problem(
            "stepup.branding.accent",
            format!("invalid colour {accent:?}: use #rrggbb or a CSS colour name"),
        );
    }
    let branding = Branding {
        product: b.product.map(|p| p.0).unwrap_or_else(|| "stepgate".into()),
        logo_url: b.logo_url.map(|p| p.0),
        accent,
    };
    let stash_max_bytes = s.stash_max_bytes.unwrap_or(64 * 1024) as usize;
    Some(Settings {
        prefix,
        otp,
        token: token?,
        email,
        sms,
        sms_timeout,
        budget,
        console,
        branding,
        stash_max_bytes,
    })
}

/// `stepup.sms.allowed_countries`: E.164 prefixes, `+` and 1 to 6
/// digits (a country calling code, or a longer prefix such as one
/// NANP area code). An empty list is refused: it would allow nothing.
fn country_codes(v: &mut Validator<'_>, list: Option<Vec<raw::Str>>) -> Vec<String> {
    const KEY: &str = "stepup.sms.allowed_countries";
    let Some(list) = list else {
        return Vec::new();
    };
    if list.is_empty() {
        v.problem(
            KEY,
            "an empty list would block every SMS; omit the key to allow any destination",
        );
    }
    let mut out = Vec::new();
    for (i, s) in list.into_iter().enumerate() {
        let digits = s.0.strip_prefix('+').unwrap_or("");
        if (1..=6).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
            out.push(s.0);
        } else {
            v.problem(
                &format!("{KEY}[{i}]"),
                format!(
                    "invalid country code {:?}: expected + and 1 to 6 digits, e.g. \"+44\"",
                    s.0
                ),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{load, problems, BASE};

    #[test]
    // Step-up settings: documented defaults, and a bad prefix, code
    // settings and colour each reported at once.
    fn defaults_and_each_bad_value_is_located() {
        let c = load(BASE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.stepup.branding.accent, "#2457d6");
        assert_eq!(c.stepup.branding.product, "stepgate");
        assert_eq!(c.stepup.stash_max_bytes, 64 * 1024);
        assert_eq!(c.stepup.otp.max_attempts, 5);
        let e = problems(&BASE.replace(
            "  console: true\n",
            "  console: true\n  prefix: /gate/\n  otp: { ttl: 0s, max_sends: 0 }\n  branding: { accent: \"red;x\" }\n",
        ));
        for want in [
            "gateway.yaml:11:11: stepup.prefix: invalid prefix \"/gate/\"",
            "stepup.otp.ttl: must be more than 0",
            "stepup.otp.max_sends: 0 is out of range 1..=1000",
            "stepup.branding.accent: invalid colour \"red;x\"",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }
}
