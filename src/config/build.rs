//! The build step, separate from validation: every runtime object `run`
//! builds from the settings (the listener's TLS config, CA roots, the
//! notifiers, the Redis client, the token signing key) is built here once, by the code of the
//! module that owns it, and dropped. What a constructor refuses is a
//! problem at the key that names it, so `stepgate check` refuses exactly
//! what `run` would.
//!
//! Validation builds none of these: a section whose own values are sound
//! records what is to be built ([`Build`]), and [`check`] builds it after
//! every section has been validated. A section with a problem is not built
//! (its problem would only come back as a misleading follow-on).

use std::path::PathBuf;
use std::time::Duration;

use super::validate::Validator;
use crate::delivery::email::{EmailNotifier, EmailSettings};
use crate::delivery::sms::{SmsNotifier, SmsSettings};
use crate::store::Settings as StoreSettings;
use crate::tls::{tls_certs, tls_key, tls_server_config, TlsFiles};
use crate::token::SigningKey;

/// A runtime object to build from validated settings.
pub(super) enum Build {
    /// `listen.tls`: the server TLS config from the certificate and key.
    ListenerTls(TlsFiles),
    /// CA certificates (PEM) a client trusts, at the key naming the file.
    CaFile(&'static str, PathBuf),
    /// `stepup.email`: the SMTP notifier.
    Email(EmailSettings),
    /// `stepup.sms`: the SMS notifier, with its timeout.
    Sms(SmsSettings, Duration),
    /// `stepup.token.signing_key_file`: the token signing key from its PEM.
    TokenKey(PathBuf, SigningKey),
    /// `store`: the Redis client (it connects lazily, so Redis need not be
    /// up).
    Store(StoreSettings),
}

/// Build everything validation recorded; report what is refused.
pub(super) fn check(v: &mut Validator<'_>) {
    for build in v.take_builds() {
        match build {
            Build::ListenerTls(files) => listener_tls(v, &files),
            Build::CaFile(key, path) => {
                let mut roots = rustls::RootCertStore::empty();
                if let Err(e) = crate::proxy::add_ca_file(&mut roots, &path) {
                    v.problem(key, format!("cannot load {e}"));
                }
            }
            Build::Email(settings) => {
                if let Err(msg) = EmailNotifier::new(settings) {
                    v.problem("stepup.email", msg);
                }
            }
            // What only the notifier checks (Twilio SID shape, header
            // values, a zero timeout) is a config error too, not a
            // start-up failure.
            Build::Sms(settings, timeout) => {
                if let Err(msg) = SmsNotifier::new(settings, timeout) {
                    v.problem("stepup.sms", msg);
                }
            }
            Build::Store(settings) => store(v, &settings),
            Build::TokenKey(path, key) => {
                if let Err(e) = key.load() {
                    v.problem(
                        "stepup.token.signing_key_file",
                        format!("{}: {e}", path.display()),
                    );
                }
            }
        }
    }
}

/// The certificate and key, loaded as the server loads them.
fn listener_tls(v: &mut Validator<'_>, files: &TlsFiles) {
    let certs = tls_certs(&files.cert)
        .map_err(|e| v.problem("listen.tls.cert", format!("cannot load {e}")));
    let key =
        tls_key(&files.key).map_err(|e| v.problem("listen.tls.key", format!("cannot load {e}")));
    if let (Ok(certs), Ok(key)) = (certs, key) {
        if let Err(e) = tls_server_config(certs, key) {
            v.problem(
                "listen.tls.key",
                format!(
                    "does not fit the certificate in {}: {e}",
                    files.cert.display()
                ),
            );
        }
    }
}

/// The Redis client as `run` builds it, with its CA file.
fn store(v: &mut Validator<'_>, store: &StoreSettings) {
    match store {
        StoreSettings::Memory { .. } => {}
        StoreSettings::Redis {
            url,
            prefix,
            ca_file,
        } => {
            let ca = ca_file.as_ref().and_then(|path| {
                std::fs::read(path)
                    .map_err(|e| {
                        v.problem(
                            "store.ca_file",
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })
                    .ok()
            });
            if ca_file.is_some() && ca.is_none() {
                return;
            }
            // The Redis client takes the PEM as it is; a file without a
            // certificate would only fail at the first connection.
            if let Some(path) = ca_file {
                let mut roots = rustls::RootCertStore::empty();
                if let Err(e) = crate::proxy::add_ca_file(&mut roots, path) {
                    v.problem("store.ca_file", format!("cannot load {e}"));
                    return;
                }
            }
            let key = if ca.is_some() {
                "store.ca_file"
            } else {
                "store.redis"
            };
            if let Err(e) = crate::store::RedisStore::with_ca(url, prefix, ca) {
                v.problem(key, e.to_string());
            }
        }
        StoreSettings::Cluster { urls, prefix } => {
            if let Err(e) = crate::store::RedisStore::cluster(urls, prefix) {
                v.problem("store.redis_cluster", e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{problems, BASE};

    fn with_sms(sms: &str) -> String {
        BASE.replace(
            "  console: true\n",
            &format!("  console: true\n  sms:\n    webhook: {{ url: {sms} }}\n    timeout: 0s\n"),
        )
    }

    #[test]
    // Every problem at once: what a constructor refuses (TLS files, a CA
    // file, a notifier) is reported at its key beside an unrelated
    // validation problem; a section with its own problem is not built.
    fn build_problems_are_reported_with_the_others() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a PEM file\n").unwrap_or_else(|e| panic!("{e}"));
        let g = garbage.display();
        let text = format!(
            "{}listen:\n  tls: {{ cert: {g}, key: {g} }}\nstore:\n  redis: rediss://127.0.0.1:6380/0\n  ca_file: {g}\n",
            with_sms("http://127.0.0.1:9/send")
                .replace("  url: http://127.0.0.1:3000\n", "  url: ftp://x\n")
        );
        let e = problems(&text);
        for want in [
            "gateway.yaml:2:8: upstream.url: invalid URL".to_string(),
            format!("listen.tls.cert: cannot load {g}"),
            format!("listen.tls.key: cannot load {g}"),
            format!("store.ca_file: cannot load {g}"),
            "stepup.sms: sms: timeout is zero".to_string(),
        ] {
            assert!(e.contains(&want), "missing {want:?} in:\n{e}");
        }
        let e = problems(&with_sms("ftp://127.0.0.1:9/send"));
        assert!(e.contains("stepup.sms.webhook.url: invalid URL"), "{e}");
        assert!(!e.contains("timeout is zero"), "{e}");
    }
}
