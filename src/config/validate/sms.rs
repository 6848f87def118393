//! `stepup.sms`: a webhook or Twilio, exactly one.

use std::time::Duration;

use http::Uri;

use super::Validator;
use crate::config::build::Build;
use crate::config::raw;
use crate::delivery::sms::SmsSettings;

pub(super) fn validate(
    v: &mut Validator<'_>,
    s: raw::Sms,
    timeout: Duration,
) -> Option<SmsSettings> {
    let before = v.problems.len();
    let settings = settings(v, s)?;
    if v.problems.len() > before {
        return None;
    }
    v.build(Build::Sms(settings.clone(), timeout));
    Some(settings)
}

fn settings(v: &mut Validator<'_>, s: raw::Sms) -> Option<SmsSettings> {
    match (s.webhook, s.twilio) {
        (Some(w), None) => {
            let url = match w.url.0.parse::<Uri>() {
                Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) => u,
                _ => {
                    v.problem(
                        "stepup.sms.webhook.url",
                        format!("invalid URL {:?}", w.url.0),
                    );
                    return None;
                }
            };
            let auth_header = v.secret(
                "stepup.sms.webhook.auth_header",
                w.auth_header,
                w.auth_header_file,
            );
            Some(SmsSettings::Webhook { url, auth_header })
        }
        (None, Some(t)) => {
            let auth_token = v.secret(
                "stepup.sms.twilio.auth_token",
                t.auth_token,
                t.auth_token_file,
            );
            if auth_token.is_none() {
                v.problem("stepup.sms.twilio.auth_token", "is required");
            }
            let base = t
                .base_url
                .map(|b| b.0)
                .unwrap_or_else(|| "https://api.twilio.com".into());
            let base_url = match base.parse::<Uri>() {
                Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) => u,
                _ => {
                    v.problem(
                        "stepup.sms.twilio.base_url",
                        format!("invalid URL {base:?}"),
                    );
                    return None;
                }
            };
            Some(SmsSettings::Twilio {
                account_sid: t.account_sid.0,
                auth_token: auth_token?,
                from: t.from.0,
                base_url,
            })
        }
        _ => {
            v.problem("stepup.sms", "give exactly one of webhook or twilio");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{load, problems, BASE};

    fn with(sms: &str) -> String {
        BASE.replace(
            "  console: true\n",
            &format!("  console: true\n  sms: {sms}\n"),
        )
    }

    #[test]
    // Exactly one SMS provider; a provider's own problems at its keys.
    fn one_provider_and_its_settings_are_checked() {
        assert!(load(&with("{ webhook: { url: \"https://sms.test/send\" } }")).is_ok());
        let e = problems(&with("{ timeout: 1s }"));
        assert!(
            e.contains("stepup.sms: give exactly one of webhook or twilio"),
            "{e}"
        );
        let e = problems(&with("{ webhook: { url: \"ftp://sms.test\" } }"));
        assert!(
            e.contains("stepup.sms.webhook.url: invalid URL \"ftp://sms.test\""),
            "{e}"
        );
        let e = problems(&with(
            "{ twilio: { account_sid: AC0, from: \"+15550100\" } }",
        ));
        assert!(
            e.contains("stepup.sms.twilio.auth_token: is required"),
            "{e}"
        );
    }
}
