//! `identity.jwt`: sources, algorithms and the one key source (a secret, a
//! public key, a JWKS file, or keys fetched from the identity provider),
//! refusing combinations that allow algorithm confusion.

use std::time::Duration;

use jsonwebtoken::Algorithm;

use super::Validator;
use crate::config::build::Build;
use crate::config::raw;
use crate::identity::jwks::JwksSettings;
use crate::identity::JwtSettings;

/// The raw `identity.jwt` keys about keys fetched from the provider.
struct RemoteKeys {
    url: Option<raw::Str>,
    /// The issuer, when it is to be discovered.
    issuer: Option<raw::Str>,
    ca_file: Option<raw::Str>,
    min_refresh: Option<raw::Str>,
    max_refresh: Option<raw::Str>,
}

pub(super) fn validate(v: &mut Validator<'_>, mut j: raw::Jwt) -> Option<JwtSettings> {
    let mut from_header = false;
    let mut from_cookie = false;
    let from = j
        .from
        .unwrap_or_else(|| vec![raw::Str("header".into()), raw::Str("cookie".into())]);
    if from.is_empty() {
        v.problem("identity.jwt.from", "must list header and/or cookie");
    }
    for (i, f) in from.iter().enumerate() {
        match f.0.as_str() {
            "header" => from_header = true,
            "cookie" => from_cookie = true,
            other => v.problem(
                &format!("identity.jwt.from[{i}]"),
                format!("unknown source {other:?}: expected header or cookie"),
            ),
        }
    }
    let algorithms_raw = j
        .algorithms
        .unwrap_or_else(|| vec![raw::Str("RS256".into())]);
    let mut algorithms = Vec::new();
    for (i, a) in algorithms_raw.iter().enumerate() {
        let key = format!("identity.jwt.algorithms[{i}]");
        if a.0.eq_ignore_ascii_case("none") {
            v.problem(&key, "alg none is never accepted");
            continue;
        }
        match a.0.parse::<Algorithm>() {
            Ok(alg) => algorithms.push(alg),
            Err(_) => v.problem(&key, format!("unknown algorithm {:?}", a.0)),
        }
    }
    // Only when nothing is listed: a list of unusable entries has
    // already been reported entry by entry.
    if algorithms_raw.is_empty() {
        v.problem(
            "identity.jwt.algorithms",
            "must list at least one algorithm",
        );
    }
    let is_hs = |a: &Algorithm| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
    let hs: Vec<Algorithm> = algorithms.iter().copied().filter(is_hs).collect();
    let asym: Vec<Algorithm> = algorithms.iter().copied().filter(|a| !is_hs(a)).collect();
    // Count what is written, not what loaded: an unreadable secret_file
    // is reported as that, not also as "no key given".
    let has_secret = j.secret.is_some() || j.secret_file.is_some();
    let secret = v.secret("identity.jwt.secret", j.secret, j.secret_file);
    let sources = [
        has_secret,
        j.public_key.is_some(),
        j.jwks_file.is_some(),
        j.jwks_url.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    // The issuer alone means: discover its keys (OpenID Connect).
    let discovery = sources == 0 && j.issuer.is_some();
    if sources > 1 || (sources == 0 && !discovery) {
        v.problem(
            "identity.jwt",
            "give exactly one of secret (or secret_file), public_key, jwks_file, jwks_url, or issuer alone for OpenID Connect discovery",
        );
    }
    let remote = remote(
        v,
        RemoteKeys {
            url: j.jwks_url.take(),
            issuer: j.issuer.clone().filter(|_| discovery),
            ca_file: j.ca_file.take(),
            min_refresh: j.jwks_min_refresh.take(),
            max_refresh: j.jwks_max_refresh.take(),
        },
        !hs.is_empty(),
    );
    let mut hs_secret = None;
    if let Some(secret) = secret {
        // Alg confusion: an HS key next to asymmetric algorithms would
        // let a public key be used as an HMAC secret.
        if !asym.is_empty() {
            v.problem(
                "identity.jwt.algorithms",
                "a secret only verifies HS256/384/512; remove the other algorithms",
            );
        }
        if secret.len() < 32 {
            v.problem(
                "identity.jwt.secret",
                format!(
                    "HS secret is {} bytes; at least 32 are required",
                    secret.len()
                ),
            );
        }
        hs_secret = Some(secret.into_bytes());
    }
    let mut public_key = None;
    if let Some(pk) = &j.public_key {
        if !hs.is_empty() {
            v.problem(
                "identity.jwt.algorithms",
                "HS algorithms are refused when a public key is configured",
            );
        }
        public_key = v.existing_file("identity.jwt.public_key", &pk.0);
    }
    let mut jwks_file = None;
    if let Some(f) = &j.jwks_file {
        if !hs.is_empty() {
            v.problem(
                "identity.jwt.algorithms",
                "HS algorithms are refused with a JWKS",
            );
        }
        jwks_file = v.existing_file("identity.jwt.jwks_file", &f.0);
    }
    let leeway = v.duration("identity.jwt.leeway", j.leeway, Duration::from_secs(30));
    let settings = JwtSettings {
        from_header,
        from_cookie,
        cookie: j
            .cookie
            .map(|c| c.0)
            .unwrap_or_else(|| "access_token".into()),
        algorithms,
        public_key,
        jwks_file,
        remote,
        hs_secret,
        issuer: j.issuer.map(|s| s.0),
        audience: j.audience.map(|s| s.0),
        leeway,
    };
    // The keys are loaded by the build step, from the files that exist,
    // whatever else is wrong here: a key that does not load is reported
    // beside the other problems.
    v.build(Build::JwtKeys(settings.clone()));
    Some(settings)
}

/// Settings for keys fetched by URL or discovered from the issuer.
fn remote(v: &mut Validator<'_>, j: RemoteKeys, hs: bool) -> Option<JwksSettings> {
    use crate::identity::jwks::{check_url, JwksSource};
    let wanted = j.url.is_some() || j.issuer.is_some();
    let source = match (&j.url, &j.issuer) {
        (Some(url), _) => match check_url(&url.0) {
            Ok(u) => Some(JwksSource::Url(u)),
            Err(e) => {
                v.problem("identity.jwt.jwks_url", e);
                None
            }
        },
        (None, Some(iss)) => match check_url(&iss.0) {
            Ok(_) => Some(JwksSource::Discovery {
                issuer: iss.0.clone(),
            }),
            Err(e) => {
                v.problem("identity.jwt.issuer", e);
                None
            }
        },
        _ => None,
    };
    let remote_only = [
        ("identity.jwt.ca_file", j.ca_file.is_some()),
        ("identity.jwt.jwks_min_refresh", j.min_refresh.is_some()),
        ("identity.jwt.jwks_max_refresh", j.max_refresh.is_some()),
    ];
    if !wanted {
        for (key, set) in remote_only {
            if set {
                v.problem(key, "applies only with jwks_url or issuer discovery");
            }
        }
        return None;
    }
    if hs {
        v.problem(
            "identity.jwt.algorithms",
            "HS algorithms are refused with keys from the identity provider",
        );
    }
    let ca_file = j
        .ca_file
        .as_ref()
        .and_then(|f| v.existing_file("identity.jwt.ca_file", &f.0));
    let min_refresh = v.duration(
        "identity.jwt.jwks_min_refresh",
        j.min_refresh,
        Duration::from_secs(30),
    );
    let max_refresh = v.duration(
        "identity.jwt.jwks_max_refresh",
        j.max_refresh,
        Duration::from_secs(3600),
    );
    if min_refresh > Duration::from_secs(3600) {
        v.problem("identity.jwt.jwks_min_refresh", "must be at most 1h");
    }
    if max_refresh < Duration::from_secs(1) || max_refresh > Duration::from_secs(7 * 86400) {
        v.problem("identity.jwt.jwks_max_refresh", "must be within 1s..=7d");
    } else if max_refresh < min_refresh {
        v.problem(
            "identity.jwt.jwks_max_refresh",
            "must not be shorter than jwks_min_refresh",
        );
    }
    Some(JwksSettings {
        source: source?,
        ca_file,
        min_refresh,
        max_refresh,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{problems, BASE};

    #[test]
    // Exactly one key source; keys about fetched keys are never silently
    // ignored; HS algorithms never meet keys from the identity provider.
    fn key_sources_and_remote_settings_are_checked() {
        let with = |keys: &str| BASE.replace("    secret: ${JWT_SECRET}\n", keys);
        let e = problems(&with(
            "    secret: ${JWT_SECRET}\n    jwks_min_refresh: 5m\n    leeway: 30\n",
        ));
        assert!(
            e.contains(
                "identity.jwt.jwks_min_refresh: applies only with jwks_url or issuer discovery"
            ),
            "{e}"
        );
        assert!(e.contains("identity.jwt.leeway: invalid duration"), "{e}");
        let e = problems(&with(
            "    jwks_url: https://idp.test/jwks.json\n    jwks_min_refresh: 10m\n    jwks_max_refresh: 5m\n",
        ));
        assert!(
            e.contains("HS algorithms are refused with keys from the identity provider"),
            "{e}"
        );
        assert!(
            e.contains("identity.jwt.jwks_max_refresh: must not be shorter than jwks_min_refresh"),
            "{e}"
        );
        let e = problems(&with(
            "    secret: ${JWT_SECRET}\n    jwks_url: https://idp.test/jwks.json\n",
        ));
        assert!(e.contains("identity.jwt: give exactly one of"), "{e}");
        let e = problems(&with("    jwks_file: missing.json\n"));
        assert!(e.contains("identity.jwt.jwks_file: file "), "{e}");
        assert!(e.contains("HS algorithms are refused with a JWKS"), "{e}");
    }
}
