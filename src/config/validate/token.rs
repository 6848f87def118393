//! `stepup.token`: the second-factor token's signing key (an HS256 secret
//! or an Ed25519/P-256 PEM), the code hash key, lifetime and names.

use std::time::Duration;

use super::Validator;
use crate::config::build::Build;
use crate::config::raw;
use crate::token::{Settings, SigningKey};

pub(super) fn validate(v: &mut Validator<'_>, t: raw::Token) -> Option<Settings> {
    let lifetime = v.duration(
        "stepup.token.lifetime",
        t.lifetime,
        Duration::from_secs(900),
    );
    if lifetime.is_zero() {
        v.problem("stepup.token.lifetime", "must be more than 0");
    }
    let header_name = t
        .header
        .map(|h| h.0)
        .unwrap_or_else(|| "X-Second-Factor-Token".into());
    let header = v.header_name("stepup.token.header", &header_name);
    let cookie = t
        .cookie
        .map(|c| c.0)
        .unwrap_or_else(|| "stepgate_sf".into());
    if cookie.is_empty()
        || !cookie
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        v.problem(
            "stepup.token.cookie",
            format!("invalid cookie name {cookie:?}"),
        );
    }
    // The PEM file, named when its key does not load.
    let mut pem_file = None;
    let signing_key = match (t.signing_key, t.signing_key_file) {
        (Some(_), Some(_)) => {
            v.problem(
                "stepup.token.signing_key",
                "give either signing_key or signing_key_file, not both",
            );
            None
        }
        (Some(k), None) => {
            if k.0.len() < 32 {
                v.problem(
                    "stepup.token.signing_key",
                    format!("HS256 key is {} bytes; at least 32 are required", k.0.len()),
                );
            }
            let bytes = k.0.into_bytes();
            Some((SigningKey::Hs256(bytes.clone()), bytes))
        }
        (None, Some(f)) => {
            let path = v.path(&f.0);
            match std::fs::read(&path) {
                Ok(bytes) if bytes.starts_with(b"-----BEGIN") => {
                    pem_file = Some(path);
                    Some((SigningKey::Pem(bytes.clone()), bytes))
                }
                Ok(bytes) => {
                    let s = String::from_utf8_lossy(&bytes).trim_end().to_string();
                    if s.len() < 32 {
                        v.problem(
                            "stepup.token.signing_key_file",
                            format!("HS256 key is {} bytes; at least 32 are required", s.len()),
                        );
                    }
                    let bytes = s.into_bytes();
                    Some((SigningKey::Hs256(bytes.clone()), bytes))
                }
                Err(e) => {
                    v.problem(
                        "stepup.token.signing_key_file",
                        format!("cannot read {}: {e}", path.display()),
                    );
                    None
                }
            }
        }
        (None, None) => {
            v.problem("stepup.token.signing_key", "is required (an HS256 secret of at least 32 bytes, or signing_key_file with a PEM key)");
            None
        }
    };
    let hash_key = v.secret("stepup.token.hash_key", t.hash_key, t.hash_key_file);
    if let Some(h) = &hash_key {
        if h.len() < 32 {
            v.problem(
                "stepup.token.hash_key",
                format!("key is {} bytes; at least 32 are required", h.len()),
            );
        }
    }
    // Without a hash_key, the key for code hashes and CSRF tokens is
    // derived from the (secret) signing key material.
    let (signing_key, material) = signing_key?;
    let secret = match hash_key {
        Some(h) => h.into_bytes(),
        None => crate::otp::derive_key(&material, b"stepgate code hash v1"),
    };
    let settings = Settings {
        signing_key,
        secret,
        lifetime,
        cookie,
        header: header?,
    };
    v.build(Build::Tokens(settings.clone(), pem_file));
    Some(settings)
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{load, problems, BASE};
    use crate::token::SigningKey;

    #[test]
    // The token's names, lifetime and keys: each bad one at its key, all
    // at once; a key is given one way only; a PEM must be a signing key.
    fn token_settings_are_each_checked() {
        let with = |keys: &str| BASE.replace("    signing_key: ${STEPGATE_KEY}\n", keys);
        let e = problems(&with(
            "    signing_key: ${STEPGATE_KEY}\n    cookie: \"a b\"\n    header: \"X Bad\"\n    lifetime: 0s\n    hash_key: short\n",
        ));
        for want in [
            "gateway.yaml:10:13: stepup.token.cookie: invalid cookie name \"a b\"",
            "gateway.yaml:11:13: stepup.token.header: invalid header name",
            "gateway.yaml:12:15: stepup.token.lifetime: must be more than 0",
            "gateway.yaml:13:15: stepup.token.hash_key: key is 5 bytes",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        let e = problems(&with("    cookie: sf\n"));
        assert!(e.contains("stepup.token.signing_key: is required"), "{e}");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "-----BEGIN PRIVATE KEY-----\nnope\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let e = problems(&with(&format!(
            "    signing_key: ${{STEPGATE_KEY}}\n    signing_key_file: {}\n",
            bad.display()
        )));
        assert!(
            e.contains("give either signing_key or signing_key_file, not both"),
            "{e}"
        );
        let e = problems(&with(&format!("    signing_key_file: {}\n", bad.display())));
        assert!(
            e.contains("expected an Ed25519 or P-256 private key"),
            "{e}"
        );
        let short = dir.path().join("short.key");
        std::fs::write(&short, "0123456789\n").unwrap_or_else(|e| panic!("{e}"));
        let e = problems(&with(&format!(
            "    signing_key_file: {}\n",
            short.display()
        )));
        assert!(
            e.contains("stepup.token.signing_key_file: HS256 key is 10 bytes"),
            "{e}"
        );
        let c = load(BASE).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(c.stepup.token.signing_key, SigningKey::Hs256(_)));
        assert_eq!(c.stepup.token.cookie, "stepgate_sf");
    }
}
