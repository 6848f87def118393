//! The build step, separate from validation: every runtime object the
//! gateway serves with that can be built from the settings alone (the
//! listener's TLS config, CA certificates, the primary-token keys, the
//! token signing key, the notifiers, the store's client, the assertion
//! key) is built here, once per load, by the code of the module that owns
//! it, and handed to the gateway in [`Built`]: nothing builds it again.
//! What a constructor refuses is a problem at the key that names it, so
//! `stepgate check` refuses exactly what `run` would.
//!
//! Validation builds none of these: a section whose own values are sound
//! records what is to be built ([`Build`]), and [`run`] builds it after
//! every section has been validated. A section with a problem is not built
//! (its problem would only come back as a misleading follow-on).
//!
//! What needs the gateway's runtime or its previous state (keys fetched
//! from the identity provider, the upstream pool, started stores) is made
//! by `Gateway::new` and `Gateway::reload` from these parts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;

use super::validate::Validator;
use crate::assertion::{AssertionSettings, Signer};
use crate::delivery::email::{EmailNotifier, EmailSettings};
use crate::delivery::sms::{SmsNotifier, SmsSettings};
use crate::identity::{JwtKeys, JwtSettings};
use crate::store::{ChallengeStore, MemoryStore, RedisStore, Settings as StoreSettings};
use crate::tls::{tls_certs, tls_key, tls_server_config, TlsFiles};
use crate::token::Tokens;

/// A runtime object to build from validated settings.
pub(super) enum Build {
    /// `listen.tls`: the server TLS config from the certificate and key.
    ListenerTls(TlsFiles),
    /// `upstream.ca_file`: CA certificates the upstream client trusts.
    UpstreamCa(PathBuf),
    /// `identity.jwt`: the keys from the secret or files, and `ca_file`.
    JwtKeys(JwtSettings),
    /// `stepup.email`: the SMTP notifier.
    Email(EmailSettings),
    /// `stepup.sms`: the SMS notifier, with its timeout.
    Sms(SmsSettings, Duration),
    /// `stepup.token`: the token keys, and the PEM file they came from.
    Tokens(crate::token::Settings, Option<PathBuf>),
    /// `store`: the store's client (it connects lazily, so Redis need not
    /// be up, and starts nothing until the gateway starts it).
    Store(StoreSettings),
    /// `upstream.assertion`: the signing key.
    Assertion(AssertionSettings),
}

/// What one load of the config built: the gateway serves with these.
#[derive(Clone)]
pub struct Built {
    /// `listen.tls`, ready to accept with.
    pub listener_tls: Option<Arc<rustls::ServerConfig>>,
    /// `upstream.ca_file`'s certificates (empty without it).
    pub upstream_ca: Vec<CertificateDer<'static>>,
    /// `identity.jwt`'s keys (empty without it, or with keys fetched from
    /// the identity provider).
    pub jwt_keys: JwtKeys,
    /// The second-factor token keys and the notifiers.
    pub stepup: crate::stepup::Parts,
    /// The challenge store, not started. The store is fixed for the life
    /// of the process: the gateway starts the one of the first load, and
    /// a reload's is dropped unused.
    pub store: Arc<dyn ChallengeStore>,
    /// `upstream.assertion`'s signing key.
    pub assertion: Option<Signer>,
}

/// What has been built so far.
#[derive(Default)]
struct Parts {
    listener_tls: Option<Arc<rustls::ServerConfig>>,
    upstream_ca: Vec<CertificateDer<'static>>,
    jwt_keys: JwtKeys,
    tokens: Option<Tokens>,
    email: Option<Arc<EmailNotifier>>,
    sms: Option<Arc<SmsNotifier>>,
    store: Option<Arc<dyn ChallengeStore>>,
    assertion: Option<Signer>,
}

/// Build everything validation recorded; report what is refused. `None`
/// when something was refused or a required part (token keys, store) was
/// not recorded because its section had a problem.
pub(super) fn run(v: &mut Validator<'_>) -> Option<Built> {
    let mut parts = Parts::default();
    let mut refused = false;
    for build in v.take_builds() {
        let before = v.problems.len();
        match build {
            Build::ListenerTls(files) => parts.listener_tls = listener_tls(v, &files),
            Build::UpstreamCa(path) => match crate::proxy::ca_certs(&path) {
                Ok(certs) => parts.upstream_ca = certs,
                Err(e) => v.problem("upstream.ca_file", format!("cannot load {e}")),
            },
            Build::JwtKeys(jwt) => match JwtKeys::load(&jwt) {
                Ok(keys) => parts.jwt_keys = keys,
                Err(problems) => {
                    for (key, message) in problems {
                        v.problem(key, message);
                    }
                }
            },
            Build::Email(settings) => match EmailNotifier::new(settings) {
                Ok(n) => parts.email = Some(Arc::new(n)),
                Err(msg) => v.problem("stepup.email", msg),
            },
            // What only the notifier checks (Twilio SID shape, header
            // values, a zero timeout) is a config error too, not a
            // start-up failure.
            Build::Sms(settings, timeout) => match SmsNotifier::new(settings, timeout) {
                Ok(n) => parts.sms = Some(Arc::new(n)),
                Err(msg) => v.problem("stepup.sms", msg),
            },
            Build::Tokens(settings, pem_file) => match Tokens::new(&settings) {
                Ok(t) => parts.tokens = Some(t),
                Err(e) => {
                    let file = pem_file.map_or(String::new(), |p| format!("{}: ", p.display()));
                    v.problem("stepup.token.signing_key_file", format!("{file}{e}"));
                }
            },
            Build::Store(settings) => parts.store = store(v, &settings),
            Build::Assertion(settings) => match Signer::load(&settings) {
                Ok(s) => parts.assertion = Some(s),
                Err(e) => v.problem("upstream.assertion.signing_key_file", e),
            },
        }
        refused |= v.problems.len() > before;
    }
    if refused {
        return None;
    }
    Some(Built {
        listener_tls: parts.listener_tls,
        upstream_ca: parts.upstream_ca,
        jwt_keys: parts.jwt_keys,
        stepup: crate::stepup::Parts {
            tokens: parts.tokens?,
            email: parts.email,
            sms: parts.sms,
        },
        store: parts.store?,
        assertion: parts.assertion,
    })
}

/// The certificate and key, loaded as the server serves them.
fn listener_tls(v: &mut Validator<'_>, files: &TlsFiles) -> Option<Arc<rustls::ServerConfig>> {
    let certs = tls_certs(&files.cert)
        .map_err(|e| v.problem("listen.tls.cert", format!("cannot load {e}")));
    let key =
        tls_key(&files.key).map_err(|e| v.problem("listen.tls.key", format!("cannot load {e}")));
    let (Ok(certs), Ok(key)) = (certs, key) else {
        return None;
    };
    match tls_server_config(certs, key) {
        Ok(cfg) => Some(Arc::new(cfg)),
        Err(e) => {
            v.problem(
                "listen.tls.key",
                format!(
                    "does not fit the certificate in {}: {e}",
                    files.cert.display()
                ),
            );
            None
        }
    }
}

/// The store's client, not started, with its CA file.
fn store(v: &mut Validator<'_>, store: &StoreSettings) -> Option<Arc<dyn ChallengeStore>> {
    match store {
        StoreSettings::Memory { max_entries } => Some(Arc::new(MemoryStore::new(*max_entries))),
        StoreSettings::Redis {
            url,
            prefix,
            ca_file,
        } => {
            let mut ca = None;
            if let Some(path) = ca_file {
                let pem = std::fs::read(path)
                    .map_err(|e| {
                        v.problem(
                            "store.ca_file",
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })
                    .ok()?;
                // The Redis client takes the PEM as it is; a file without
                // a certificate would only fail at the first connection.
                if let Err(e) = crate::proxy::ca_certs(path) {
                    v.problem("store.ca_file", format!("cannot load {e}"));
                    return None;
                }
                ca = Some(pem);
            }
            let key = if ca.is_some() {
                "store.ca_file"
            } else {
                "store.redis"
            };
            match RedisStore::idle_with_ca(url, prefix, ca) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    v.problem(key, e.to_string());
                    None
                }
            }
        }
        StoreSettings::Cluster { urls, prefix } => match RedisStore::idle_cluster(urls, prefix) {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => {
                v.problem("store.redis_cluster", e.to_string());
                None
            }
        },
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
