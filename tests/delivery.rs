//! Delivery of one-time codes against real servers: an aiosmtpd SMTP sink
//! for email, a recording HTTP server for the SMS webhook and Twilio API.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stepgate::delivery::{
    mask_email, mask_phone, CodeMessage, ConsoleNotifier, DeliveryError, EmailNotifier,
    EmailSettings, Notifier, SmsNotifier, SmsSettings, SmtpSecurity,
};
use support::http_sink::{HttpSink, RESPONSE_BODY_MARKER};
use support::smtp::{self, SmtpServer, TestCa};

const WAIT: Duration = Duration::from_secs(10);

fn email_settings(port: u16) -> EmailSettings {
    EmailSettings {
        host: "127.0.0.1".to_owned(),
        port,
        security: SmtpSecurity::None,
        username: None,
        password: None,
        from: "Security <no-reply@example.com>".to_owned(),
        subject: "Your verification code".to_owned(),
        timeout: Duration::from_secs(5),
        ca_file: None,
    }
}

fn message<'a>(to: &'a str, code: &'a str, product: &'a str) -> CodeMessage<'a> {
    CodeMessage {
        to,
        code,
        ttl: Duration::from_secs(300),
        product,
    }
}

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind probe port");
    listener.local_addr().expect("probe address").port()
}

/// Collects everything logged on this thread while the guard lives.
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

// ---------------------------------------------------------------- email

#[tokio::test]
// Protects against a code email that is missing the code, the right
// envelope recipient, the headers, or one of the two alternative bodies.
async fn email_arrives_with_subject_from_text_and_html() {
    let sink = SmtpServer::start();
    let notifier = EmailNotifier::new(email_settings(sink.port())).expect("valid settings");

    notifier
        .send(&message("jane.doe@example.com", "493817", "Acme Admin"))
        .await
        .expect("sink accepts the message");

    let raw = sink.wait_for_message("jane.doe@example.com", WAIT).await;
    let received = &sink.received()[0];
    assert_eq!(received.mail_from, "no-reply@example.com");
    assert_eq!(received.rcpt_tos, vec!["jane.doe@example.com".to_owned()]);
    assert_eq!(
        smtp::header(&raw, "Subject").as_deref(),
        Some("Your verification code")
    );
    assert_eq!(
        smtp::header(&raw, "From").as_deref(),
        Some("Security <no-reply@example.com>")
    );
    assert_eq!(
        smtp::header(&raw, "To").as_deref(),
        Some("jane.doe@example.com")
    );
    assert!(smtp::header(&raw, "Message-ID").is_some(), "{raw}");
    assert!(smtp::header(&raw, "Date").is_some(), "{raw}");
    let content_type = smtp::header(&raw, "Content-Type").expect("Content-Type header");
    assert!(
        content_type.starts_with("multipart/alternative"),
        "{content_type}"
    );

    let text = smtp::text_part(&raw).expect("text/plain part");
    assert!(text.contains("493817"), "{text}");
    assert!(text.contains("Acme Admin"), "{text}");
    assert!(text.contains("5 minutes"), "{text}");
    let html = smtp::html_part(&raw).expect("text/html part");
    assert!(html.contains("493817"), "{html}");
    assert!(html.contains("5 minutes"), "{html}");
    assert_eq!(smtp::extract_code(&raw).as_deref(), Some("493817"));
}

#[tokio::test]
// Protects against HTML injection through the configured product name.
async fn email_html_escapes_product_name() {
    let sink = SmtpServer::start();
    let notifier = EmailNotifier::new(email_settings(sink.port())).expect("valid settings");

    notifier
        .send(&message("x@example.com", "120034", "<b>Acme</b> & \"Co\""))
        .await
        .expect("sink accepts the message");

    let raw = sink.wait_for_message("x@example.com", WAIT).await;
    let html = smtp::html_part(&raw).expect("text/html part");
    // Escaped by the template engine, as numeric character references.
    assert!(
        html.contains("&#60;b&#62;Acme&#60;/b&#62; &#38; &#34;Co&#34;"),
        "{html}"
    );
    assert!(!html.contains("<b>Acme"), "{html}");
    // The plain-text part shows the name as is.
    let text = smtp::text_part(&raw).expect("text/plain part");
    assert!(text.contains("<b>Acme</b>"), "{text}");
}

#[tokio::test]
// Protects against non-ASCII product names garbling the email (the text
// part then travels quoted-printable or base64).
async fn email_with_unicode_product_name_decodes() {
    let sink = SmtpServer::start();
    let notifier = EmailNotifier::new(email_settings(sink.port())).expect("valid settings");

    notifier
        .send(&message("x@example.com", "774411", "Bänk Ünïon — 銀行"))
        .await
        .expect("sink accepts the message");

    let raw = sink.wait_for_message("x@example.com", WAIT).await;
    let text = smtp::text_part(&raw).expect("text/plain part");
    assert!(text.contains("Bänk Ünïon — 銀行"), "{text}");
    let html = smtp::html_part(&raw).expect("text/html part");
    assert!(html.contains("Bänk Ünïon — 銀行"), "{html}");
    assert_eq!(smtp::extract_code(&raw).as_deref(), Some("774411"));
}

#[tokio::test]
// Protects against codes of different users crossing (pooled connection
// reused for several recipients).
async fn email_reaches_each_recipient_with_their_own_code() {
    let sink = SmtpServer::start();
    let notifier = EmailNotifier::new(email_settings(sink.port())).expect("valid settings");

    for (to, code) in [("a@example.com", "111111"), ("b@example.com", "222222")] {
        notifier
            .send(&message(to, code, "Acme"))
            .await
            .expect("sink accepts the message");
    }

    let a = sink.wait_for_message("a@example.com", WAIT).await;
    let b = sink.wait_for_message("b@example.com", WAIT).await;
    assert_eq!(smtp::extract_code(&a).as_deref(), Some("111111"));
    assert_eq!(smtp::extract_code(&b).as_deref(), Some("222222"));
    assert_eq!(sink.messages().len(), 2);
}

#[tokio::test]
// Protects against a permanent SMTP refusal being reported as success or
// as an outage.
async fn email_refused_by_server_is_rejected() {
    let sink = SmtpServer::start_failing();
    let notifier = EmailNotifier::new(email_settings(sink.port())).expect("valid settings");

    let err = notifier
        .send(&message("jane@example.com", "493817", "Acme"))
        .await
        .expect_err("the sink answers 554");

    assert!(
        matches!(&err, DeliveryError::Rejected(why) if why.contains("554")),
        "{err:?}"
    );
    assert!(!err.to_string().contains("jane@example.com"), "{err}");
    assert!(sink.messages().is_empty());
}

#[tokio::test]
// Protects against hanging or claiming success when nothing listens.
async fn email_to_closed_port_is_unavailable() {
    let mut settings = email_settings(closed_port());
    settings.timeout = Duration::from_secs(3);
    let notifier = EmailNotifier::new(settings).expect("valid settings");

    let started = Instant::now();
    let err = notifier
        .send(&message("jane@example.com", "493817", "Acme"))
        .await
        .expect_err("nothing listens");

    assert!(matches!(err, DeliveryError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
// Protects against a dead pooled connection being treated as delivered
// after the SMTP server went away.
async fn email_after_server_stopped_is_unavailable() {
    let mut sink = SmtpServer::start();
    let mut settings = email_settings(sink.port());
    settings.timeout = Duration::from_secs(3);
    let notifier = EmailNotifier::new(settings).expect("valid settings");
    notifier
        .send(&message("first@example.com", "111111", "Acme"))
        .await
        .expect("first send while the server is up");

    sink.stop();
    let started = Instant::now();
    let err = notifier
        .send(&message("second@example.com", "222222", "Acme"))
        .await
        .expect_err("server stopped");

    assert!(matches!(err, DeliveryError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(sink.messages().len(), 1);
}

#[tokio::test]
// Protects against a server that accepts TCP but never speaks blocking a
// login request for longer than the configured timeout.
async fn email_to_silent_server_times_out() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind silent server");
    let port = silent.local_addr().expect("silent address").port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let mut settings = email_settings(port);
    settings.timeout = Duration::from_millis(500);
    let notifier = EmailNotifier::new(settings).expect("valid settings");

    let started = Instant::now();
    let err = notifier
        .send(&message("jane@example.com", "493817", "Acme"))
        .await
        .expect_err("the server never greets");

    assert!(matches!(err, DeliveryError::Timeout), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    holder.abort();
}

#[tokio::test]
// Protects against configured SMTP credentials being ignored, and against
// a wrong password counting as delivered.
async fn email_authenticates_with_credentials() {
    let sink = SmtpServer::start_with_auth("mailer", "s3cret");
    let mut settings = email_settings(sink.port());
    settings.username = Some("mailer".to_owned());
    settings.password = Some("s3cret".to_owned());
    let notifier = EmailNotifier::new(settings.clone()).expect("valid settings");
    notifier
        .send(&message("jane@example.com", "493817", "Acme"))
        .await
        .expect("authenticated send");
    sink.wait_for_message("jane@example.com", WAIT).await;

    settings.password = Some("wrong".to_owned());
    let notifier = EmailNotifier::new(settings).expect("valid settings");
    let err = notifier
        .send(&message("john@example.com", "111111", "Acme"))
        .await
        .expect_err("wrong password");
    assert!(matches!(err, DeliveryError::Rejected(_)), "{err:?}");
    assert_eq!(sink.messages().len(), 1);
}

#[tokio::test]
// Protects against STARTTLS being skipped, the extra CA (ca_file) being
// ignored, or credentials not being sent after the upgrade.
async fn email_over_starttls_with_auth_trusting_extra_ca() {
    let ca = TestCa::generate();
    let sink = SmtpServer::start_tls("starttls", &ca, Some(("mailer", "s3cret")));
    let mut settings = email_settings(sink.port());
    settings.security = SmtpSecurity::StartTls;
    settings.ca_file = Some(ca.ca_pem.clone());
    settings.username = Some("mailer".to_owned());
    settings.password = Some("s3cret".to_owned());
    let notifier = EmailNotifier::new(settings).expect("valid settings");

    notifier
        .send(&message("jane@example.com", "493817", "Acme"))
        .await
        .expect("STARTTLS send");

    let raw = sink.wait_for_message("jane@example.com", WAIT).await;
    assert_eq!(smtp::extract_code(&raw).as_deref(), Some("493817"));
}

#[tokio::test]
// Protects against implicit TLS (SMTPS) not working with a private CA.
async fn email_over_implicit_tls_trusting_extra_ca() {
    let ca = TestCa::generate();
    let sink = SmtpServer::start_tls("implicit", &ca, None);
    let mut settings = email_settings(sink.port());
    settings.security = SmtpSecurity::Tls;
    settings.ca_file = Some(ca.ca_pem.clone());
    let notifier = EmailNotifier::new(settings).expect("valid settings");

    notifier
        .send(&message("jane@example.com", "493817", "Acme"))
        .await
        .expect("TLS send");

    let raw = sink.wait_for_message("jane@example.com", WAIT).await;
    assert_eq!(smtp::extract_code(&raw).as_deref(), Some("493817"));
}

#[tokio::test]
// Protects against accepting an untrusted server certificate.
async fn email_over_tls_refuses_untrusted_certificate() {
    let ca = TestCa::generate();
    let sink = SmtpServer::start_tls("implicit", &ca, None);
    let mut settings = email_settings(sink.port());
    settings.security = SmtpSecurity::Tls;
    let notifier = EmailNotifier::new(settings).expect("valid settings");

    let err = notifier
        .send(&message("jane@example.com", "493817", "Acme"))
        .await
        .expect_err("certificate is not trusted");

    assert!(matches!(err, DeliveryError::Unavailable(_)), "{err:?}");
    assert!(sink.messages().is_empty());
}

#[tokio::test]
// Protects against a STARTTLS downgrade: a server that does not offer
// STARTTLS must not get the message (or the credentials) in clear text.
async fn email_starttls_refuses_server_without_starttls() {
    let sink = SmtpServer::start();
    let mut settings = email_settings(sink.port());
    settings.security = SmtpSecurity::StartTls;
    settings.username = Some("mailer".to_owned());
    settings.password = Some("s3cret".to_owned());
    let notifier = EmailNotifier::new(settings).expect("valid settings");

    let err = notifier
        .send(&message("jane@example.com", "493817", "Acme"))
        .await
        .expect_err("no STARTTLS on offer");

    assert!(matches!(err, DeliveryError::Unavailable(_)), "{err:?}");
    assert!(sink.messages().is_empty());
}

#[tokio::test]
// Protects against sending to (or SMTP-injecting through) a malformed
// recipient address.
async fn email_to_malformed_address_is_invalid_recipient() {
    let sink = SmtpServer::start();
    let notifier = EmailNotifier::new(email_settings(sink.port())).expect("valid settings");

    for to in ["", "not-an-address", "a@b.com>\r\nRCPT TO:<evil@x.com"] {
        let err = notifier
            .send(&message(to, "493817", "Acme"))
            .await
            .expect_err("malformed recipient");
        assert!(
            matches!(err, DeliveryError::InvalidRecipient),
            "{to:?}: {err:?}"
        );
    }
    assert!(sink.messages().is_empty());
}

#[tokio::test]
// Protects against starting with a sender or TLS setup that can never work.
async fn email_settings_are_validated() {
    let mut bad_from = email_settings(25);
    bad_from.from = "Security no-reply at example".to_owned();
    assert!(EmailNotifier::new(bad_from).is_err());

    let mut half_credentials = email_settings(25);
    half_credentials.username = Some("mailer".to_owned());
    assert!(EmailNotifier::new(half_credentials).is_err());

    let mut missing_ca = email_settings(465);
    missing_ca.security = SmtpSecurity::Tls;
    missing_ca.ca_file = Some("/nonexistent/ca.pem".into());
    assert!(EmailNotifier::new(missing_ca).is_err());

    let not_pem = tempfile::NamedTempFile::new().expect("temp file");
    let mut empty_ca = email_settings(465);
    empty_ca.security = SmtpSecurity::Tls;
    empty_ca.ca_file = Some(not_pem.path().to_path_buf());
    assert!(EmailNotifier::new(empty_ca).is_err());

    let mut tls = email_settings(465);
    tls.security = SmtpSecurity::Tls;
    assert!(EmailNotifier::new(tls).is_ok());
}

#[test]
// Protects against configuration validation (which runs before any Tokio
// runtime exists) failing just because notifiers are built there.
fn notifiers_can_be_built_outside_a_runtime() {
    let mut email = email_settings(587);
    email.security = SmtpSecurity::StartTls;
    email.username = Some("mailer".to_owned());
    email.password = Some("s3cret".to_owned());
    assert!(EmailNotifier::new(email).is_ok());

    let sms = SmsSettings::Webhook {
        url: "https://hooks.example.com/sms".parse().expect("URI"),
        auth_header: None,
    };
    assert!(SmsNotifier::new(sms, WAIT).is_ok());
}

#[tokio::test]
// Protects against the code or the full address reaching the logs.
async fn email_logs_neither_code_nor_address() {
    let sink = SmtpServer::start();
    let notifier = EmailNotifier::new(email_settings(sink.port())).expect("valid settings");
    let failing = EmailNotifier::new(email_settings(closed_port())).expect("valid settings");
    let logs = LogCapture::default();
    let guard = logs.install();

    notifier
        .send(&message("jane.doe@example.com", "493817", "Acme"))
        .await
        .expect("sink accepts the message");
    let _ = failing
        .send(&message("jane.doe@example.com", "582910", "Acme"))
        .await;
    drop(guard);

    let text = logs.text();
    assert!(text.contains("j***@example.com"), "{text}");
    for secret in ["493817", "582910", "jane.doe@"] {
        assert!(!text.contains(secret), "{secret} in logs: {text}");
    }
}

// ---------------------------------------------------------------- sms

fn webhook(sink: &HttpSink, auth: Option<&str>) -> SmsSettings {
    SmsSettings::Webhook {
        url: format!("{}/sms/send?key=abc", sink.url())
            .parse()
            .expect("sink URL"),
        auth_header: auth.map(str::to_owned),
    }
}

#[tokio::test]
// Protects against a webhook call with the wrong shape, text or missing
// Authorization header.
async fn sms_webhook_posts_json_with_code_and_authorization() {
    let sink = HttpSink::start(200).await;
    let notifier =
        SmsNotifier::new(webhook(&sink, Some("Bearer hook-token")), WAIT).expect("valid settings");

    notifier
        .send(&CodeMessage {
            to: "+15550100123",
            code: "493817",
            ttl: Duration::from_secs(90),
            product: "Acme",
        })
        .await
        .expect("sink answers 200");

    let request = sink.wait_for_request(WAIT).await;
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/sms/send?key=abc");
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.header("authorization"), Some("Bearer hook-token"));
    let body = request.json();
    assert_eq!(body["to"], "+15550100123");
    assert_eq!(
        body["text"],
        "493817 is your Acme verification code. It expires in 2 minutes."
    );
    assert_eq!(body.as_object().map(|o| o.len()), Some(2), "{body}");
}

#[tokio::test]
// Protects against sending an empty Authorization header when none is
// configured.
async fn sms_webhook_without_auth_header_sends_none() {
    let sink = HttpSink::start(204).await;
    let notifier = SmsNotifier::new(webhook(&sink, None), WAIT).expect("valid settings");

    notifier
        .send(&message("+15550100123", "493817", "Acme"))
        .await
        .expect("sink answers 204");

    let request = sink.wait_for_request(WAIT).await;
    assert_eq!(request.header("authorization"), None);
}

#[tokio::test]
// Protects against a provider error counting as delivered, and against the
// provider's response body leaking into errors.
async fn sms_webhook_server_error_is_rejected() {
    let sink = HttpSink::start(500).await;
    let notifier = SmsNotifier::new(webhook(&sink, None), WAIT).expect("valid settings");

    let err = notifier
        .send(&message("+15550100123", "493817", "Acme"))
        .await
        .expect_err("sink answers 500");

    assert!(
        matches!(&err, DeliveryError::Rejected(why) if why.contains("500")),
        "{err:?}"
    );
    assert!(!format!("{err:?}").contains(RESPONSE_BODY_MARKER));
    assert_eq!(sink.requests().len(), 1, "no silent retries");
}

#[tokio::test]
// Protects against a slow provider holding a login request beyond the
// configured timeout.
async fn sms_webhook_slow_provider_times_out() {
    let sink = HttpSink::start_delayed(200, Duration::from_secs(5)).await;
    let notifier =
        SmsNotifier::new(webhook(&sink, None), Duration::from_millis(300)).expect("valid settings");

    let started = Instant::now();
    let err = notifier
        .send(&message("+15550100123", "493817", "Acme"))
        .await
        .expect_err("sink is too slow");

    assert!(matches!(err, DeliveryError::Timeout), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(sink.requests().len(), 1);
}

#[tokio::test]
// Protects against a refused connection being reported as anything but an
// outage.
async fn sms_webhook_nothing_listening_is_unavailable() {
    let url = format!("http://127.0.0.1:{}/sms", closed_port())
        .parse()
        .expect("URL");
    let notifier = SmsNotifier::new(
        SmsSettings::Webhook {
            url,
            auth_header: None,
        },
        Duration::from_secs(3),
    )
    .expect("valid settings");

    let err = notifier
        .send(&message("+15550100123", "493817", "Acme"))
        .await
        .expect_err("nothing listens");

    assert!(matches!(err, DeliveryError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
// Protects against a malformed Twilio call: wrong path, unencoded '+', or
// missing/incorrect basic auth.
async fn sms_twilio_posts_form_with_basic_auth() {
    let sink = HttpSink::start(201).await;
    let notifier = SmsNotifier::new(
        SmsSettings::Twilio {
            account_sid: "AC0123456789abcdef".to_owned(),
            auth_token: "tw-token".to_owned(),
            from: "+15550009999".to_owned(),
            base_url: sink.url().parse().expect("sink URL"),
        },
        WAIT,
    )
    .expect("valid settings");

    notifier
        .send(&message("+15550100123", "493817", "Acme & Co"))
        .await
        .expect("sink answers 201");

    let request = sink.wait_for_request(WAIT).await;
    assert_eq!(request.method, "POST");
    assert_eq!(
        request.path,
        "/2010-04-01/Accounts/AC0123456789abcdef/Messages.json"
    );
    assert_eq!(
        request.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    // base64("AC0123456789abcdef:tw-token")
    assert_eq!(
        request.header("authorization"),
        Some("Basic QUMwMTIzNDU2Nzg5YWJjZGVmOnR3LXRva2Vu")
    );
    assert!(request.body_text().contains("To=%2B15550100123"));
    assert_eq!(request.form_field("To").as_deref(), Some("+15550100123"));
    assert_eq!(request.form_field("From").as_deref(), Some("+15550009999"));
    assert_eq!(
        request.form_field("Body").as_deref(),
        Some("493817 is your Acme & Co verification code. It expires in 5 minutes.")
    );
}

#[tokio::test]
// Protects against Twilio errors (e.g. 401 on a bad token) counting as sent.
async fn sms_twilio_error_status_is_rejected() {
    let sink = HttpSink::start(401).await;
    let notifier = SmsNotifier::new(
        SmsSettings::Twilio {
            account_sid: "AC1".to_owned(),
            auth_token: "bad".to_owned(),
            from: "+15550009999".to_owned(),
            base_url: format!("{}/", sink.url()).parse().expect("sink URL"),
        },
        WAIT,
    )
    .expect("valid settings");

    let err = notifier
        .send(&message("+15550100123", "493817", "Acme"))
        .await
        .expect_err("sink answers 401");

    assert!(
        matches!(&err, DeliveryError::Rejected(why) if why.contains("401")),
        "{err:?}"
    );
    let request = sink.wait_for_request(WAIT).await;
    assert_eq!(request.path, "/2010-04-01/Accounts/AC1/Messages.json");
}

#[tokio::test]
// Protects against configurations that would build odd URLs or headers.
async fn sms_settings_are_validated() {
    let relative = SmsSettings::Webhook {
        url: "/just/a/path".parse().expect("URI"),
        auth_header: None,
    };
    assert!(SmsNotifier::new(relative, WAIT).is_err());

    let bad_header = SmsSettings::Webhook {
        url: "http://127.0.0.1:1/".parse().expect("URI"),
        auth_header: Some("Bearer a\nb".to_owned()),
    };
    assert!(SmsNotifier::new(bad_header, WAIT).is_err());

    let sid_with_path = SmsSettings::Twilio {
        account_sid: "AC1/../../x".to_owned(),
        auth_token: "t".to_owned(),
        from: "+1555".to_owned(),
        base_url: SmsSettings::TWILIO_BASE_URL.parse().expect("URI"),
    };
    assert!(SmsNotifier::new(sid_with_path, WAIT).is_err());

    let production = SmsSettings::Twilio {
        account_sid: "AC1".to_owned(),
        auth_token: "t".to_owned(),
        from: "+1555".to_owned(),
        base_url: SmsSettings::TWILIO_BASE_URL.parse().expect("URI"),
    };
    assert!(!format!("{production:?}").contains("\"t\""));
    assert!(SmsNotifier::new(production, WAIT).is_ok());
}

#[tokio::test]
// Protects against the code or the full phone number reaching the logs.
async fn sms_logs_neither_code_nor_number() {
    let ok = HttpSink::start(200).await;
    let failing = HttpSink::start(500).await;
    let logs = LogCapture::default();
    let guard = logs.install();

    for sink in [&ok, &failing] {
        let notifier = SmsNotifier::new(webhook(sink, None), WAIT).expect("valid settings");
        let _ = notifier
            .send(&message("+15550100123", "493817", "Acme"))
            .await;
    }
    drop(guard);

    let text = logs.text();
    assert!(text.contains("+*******0123"), "{text}");
    assert!(!text.contains("493817"), "{text}");
    assert!(!text.contains("5550100123"), "{text}");
}

// ---------------------------------------------------------------- masking

#[test]
// Protects against a masked contact revealing more than intended, or the
// full contact, for any input shape.
fn masking_hides_contacts() {
    let emails = [
        ("jane.doe@example.com", "j***@example.com"),
        ("JD@example.com", "J***@example.com"),
        ("j@example.com", "***@example.com"),
        ("élodie@exemple.fr", "é***@exemple.fr"),
        ("用户@例子.中国", "用***@例子.中国"),
        ("a.b@c@example.com", "a***@example.com"),
        ("\"x y\"@example.com", "***@example.com"),
        ("  jane@example.com  ", "j***@example.com"),
        ("@example.com", "***"),
        ("jane@", "***"),
        ("jane", "***"),
        ("", "***"),
        ("jane@exa mple.com", "***"),
        ("jane@example.com\nforged log line", "***"),
    ];
    for (input, want) in emails {
        let got = mask_email(input);
        assert_eq!(got, want, "mask_email({input:?})");
        assert_ne!(got, input, "mask_email({input:?}) returned its input");
    }

    let phones = [
        ("+15550100123", "+*******0123"),
        ("15550100123", "*******0123"),
        ("+1 (555) 010-0123", "+*******0123"),
        ("+44 20 7946 0958", "+********0958"),
        ("+4912345678", "+******5678"),
        ("12345678", "****5678"),
        ("1234567", "****"),
        ("+123", "****"),
        ("0123", "****"),
        ("", "****"),
        ("+", "****"),
        ("not a phone", "****"),
        ("+1555010012３", "****"),
        ("+١٥٥٥٠١٠٠١٢٣", "****"),
        ("+15550100123\nforged", "****"),
    ];
    for (input, want) in phones {
        let got = mask_phone(input);
        assert_eq!(got, want, "mask_phone({input:?})");
        assert_ne!(got, input, "mask_phone({input:?}) returned its input");
    }
}

// ---------------------------------------------------------------- console

#[tokio::test]
// Protects against the demo page showing a stale or another user's code,
// and against the console log carrying the full address.
async fn console_notifier_remembers_last_code_per_recipient() {
    let console = ConsoleNotifier::new();
    let logs = LogCapture::default();
    let guard = logs.install();

    assert_eq!(console.last_code("jane@example.com"), None);
    for (to, code) in [
        ("jane@example.com", "111111"),
        ("+15550100123", "222222"),
        ("jane@example.com", "333333"),
    ] {
        console
            .send(&message(to, code, "Acme"))
            .await
            .expect("console never fails");
    }
    drop(guard);

    assert_eq!(
        console.last_code("jane@example.com").as_deref(),
        Some("333333")
    );
    assert_eq!(console.last_code("+15550100123").as_deref(), Some("222222"));
    assert_eq!(console.last_code("john@example.com"), None);

    let text = logs.text();
    assert!(text.contains("stepgate::console"), "{text}");
    assert!(text.contains("code for j***@example.com: 333333"), "{text}");
    assert!(text.contains("code for +*******0123: 222222"), "{text}");
    assert!(!text.contains("jane@example.com"), "{text}");
}

#[test]
// Protects against the code leaking through `{:?}` of a message.
fn code_message_debug_hides_code_and_address() {
    let msg = message("jane.doe@example.com", "493817", "Acme");
    let shown = format!("{msg:?}");
    assert!(!shown.contains("493817"), "{shown}");
    assert!(!shown.contains("jane.doe"), "{shown}");
    assert!(shown.contains("j***@example.com"), "{shown}");
}
