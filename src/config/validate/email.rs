//! `stepup.email`: the SMTP relay and the message.

use std::time::Duration;

use super::Validator;
use crate::config::build::Build;
use crate::config::raw;
use crate::delivery::email::{EmailSettings, SmtpSecurity};

pub(super) fn validate(v: &mut Validator<'_>, e: raw::Email) -> Option<EmailSettings> {
    let before = v.problems.len();
    let security = match e.smtp.security.as_ref().map(|s| s.0.as_str()) {
        None | Some("starttls") => SmtpSecurity::StartTls,
        Some("tls") => SmtpSecurity::Tls,
        Some("none") => SmtpSecurity::None,
        Some(other) => {
            v.problem(
                "stepup.email.smtp.security",
                format!("unknown value {other:?}: expected none, starttls or tls"),
            );
            SmtpSecurity::StartTls
        }
    };
    let default_port = match security {
        SmtpSecurity::None => 25,
        SmtpSecurity::StartTls => 587,
        SmtpSecurity::Tls => 465,
    };
    let port = match e.smtp.port {
        None => default_port,
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => {
            v.problem("stepup.email.smtp.port", format!("{p} is not a port"));
            default_port
        }
    };
    let password = v.secret(
        "stepup.email.smtp.password",
        e.smtp.password,
        e.smtp.password_file,
    );
    let ca_file = e
        .smtp
        .ca_file
        .and_then(|f| v.existing_file("stepup.email.smtp.ca_file", &f.0));
    let timeout = v.duration("stepup.email.timeout", e.timeout, Duration::from_secs(15));
    let settings = EmailSettings {
        host: e.smtp.host.0,
        port,
        security,
        username: e.smtp.username.map(|u| u.0),
        password,
        from: e.from.0,
        subject: e
            .subject
            .map(|s| s.0)
            .unwrap_or_else(|| "Your verification code".into()),
        timeout,
        ca_file,
    };
    if v.problems.len() > before {
        // A problem already reported (an unreadable password_file, say)
        // would only show up again as a misleading follow-on error.
        return None;
    }
    v.build(Build::Email(settings.clone()));
    Some(settings)
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{load, problems, BASE};

    fn with(smtp: &str) -> String {
        BASE.replace(
            "  console: true\n",
            &format!("  console: true\n  email:\n    smtp: {{ host: smtp.test{smtp} }}\n    from: \"Security <no-reply@example.com>\"\n"),
        )
    }

    #[test]
    // The port follows the security mode unless given; a bad mode and a
    // bad port are both reported.
    fn security_and_port_are_checked_together() {
        let c = load(&with(", security: tls")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.stepup.email.map(|e| e.port), Some(465));
        let c = load(&with("")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.stepup.email.map(|e| e.port), Some(587));
        let e = problems(&with(", security: ssl, port: 0"));
        assert!(
            e.contains(
                "stepup.email.smtp.security: unknown value \"ssl\": expected none, starttls or tls"
            ),
            "{e}"
        );
        assert!(e.contains("stepup.email.smtp.port: 0 is not a port"), "{e}");
    }
}
