//! `upstream`: where requests go, its timeouts and pool, and the signed
//! assertion the app may receive.

use std::time::Duration;

use http::Uri;

use super::Validator;
use crate::assertion::AssertionSettings;
use crate::config::build::Build;
use crate::config::raw;
use crate::proxy::Settings;

pub(super) fn validate(v: &mut Validator<'_>, u: raw::Upstream) -> Option<Settings> {
    let url = match u.url {
        None => {
            v.problem("upstream.url", "is required (e.g. http://127.0.0.1:3000)");
            None
        }
        Some(s) => match s.0.parse::<Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.authority().is_some() =>
            {
                if uri.query().is_some() {
                    v.problem("upstream.url", "must not have a query");
                    None
                } else {
                    Some(uri)
                }
            }
            _ => {
                v.problem(
                    "upstream.url",
                    format!(
                        "invalid URL {:?}: expected http:// or https:// with a host",
                        s.0
                    ),
                );
                None
            }
        },
    };
    let connect_timeout = v.duration(
        "upstream.connect_timeout",
        u.connect_timeout,
        Duration::from_secs(5),
    );
    let timeout = v.duration("upstream.timeout", u.timeout, Duration::from_secs(60));
    let ca_file = u
        .ca_file
        .and_then(|f| v.existing_file("upstream.ca_file", &f.0));
    if let Some(path) = &ca_file {
        v.build(Build::UpstreamCa(path.clone()));
    }
    let pool_idle_timeout = v.duration(
        "upstream.pool_idle_timeout",
        u.pool_idle_timeout,
        Duration::from_secs(90),
    );
    let pool_max_idle_per_host = u.pool_max_idle_per_host.unwrap_or(256) as usize;
    let assertion = u.assertion.and_then(|a| assertion(v, a));
    Some(Settings {
        url: url?,
        connect_timeout,
        timeout,
        ca_file,
        pool_idle_timeout,
        pool_max_idle_per_host,
        assertion,
    })
}

/// `upstream.assertion`: the key file exists (the build step loads it),
/// the header is not one the gateway or the app reads for something else.
fn assertion(v: &mut Validator<'_>, a: raw::Assertion) -> Option<AssertionSettings> {
    let key = "upstream.assertion";
    let header = a
        .header
        .map(|h| h.0)
        .unwrap_or_else(|| crate::assertion::DEFAULT_HEADER.into());
    let header = v.header_name(&format!("{key}.header"), &header);
    if let Some(h) = &header {
        let n = h.as_str();
        if matches!(
            n,
            "authorization"
                | "cookie"
                | "host"
                | "connection"
                | "content-length"
                | "content-type"
                | "transfer-encoding"
        ) || n.starts_with("x-forwarded-")
            || matches!(
                n,
                "x-stepgate-user"
                    | "x-stepgate-email"
                    | "x-stepgate-stepup"
                    | "x-stepgate-stepup-age"
            )
        {
            v.problem(
                &format!("{key}.header"),
                format!("{n} is used for something else"),
            );
        }
    }
    let audience = a.audience.map(|s| s.0).filter(|s| !s.is_empty());
    if audience.is_none() {
        v.problem(
            &format!("{key}.audience"),
            "is required (the app's name, its `aud`)",
        );
    }
    let lifetime = v.duration(
        &format!("{key}.lifetime"),
        a.lifetime,
        Duration::from_secs(60),
    );
    if lifetime < Duration::from_secs(1) || lifetime > Duration::from_secs(3600) {
        v.problem(&format!("{key}.lifetime"), "must be within 1s..=1h");
    }
    let Some(file) = a.signing_key_file else {
        v.problem(
            &format!("{key}.signing_key_file"),
            "is required (an Ed25519 or P-256 private key, PKCS#8 PEM)",
        );
        return None;
    };
    let signing_key_file = v.existing_file(&format!("{key}.signing_key_file"), &file.0)?;
    let settings = AssertionSettings {
        signing_key_file,
        header: header?,
        audience: audience?,
        lifetime,
    };
    v.build(Build::Assertion(settings.clone()));
    Some(settings)
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{problems, BASE};

    #[test]
    // The upstream URL is required and has no query; a bad assertion is
    // reported key by key, together.
    fn upstream_and_assertion_problems_are_each_located() {
        let e = problems(&BASE.replace("  url: http://127.0.0.1:3000\n", "  timeout: 1s\n"));
        assert!(e.contains("upstream.url: is required"), "{e}");
        let e = problems(&BASE.replace(
            "  url: http://127.0.0.1:3000\n",
            "  url: http://127.0.0.1:3000/app?x=1\n  connect_timeout: 5\n  assertion: { header: Cookie, lifetime: 2h }\n",
        ));
        for want in [
            "gateway.yaml:2:8: upstream.url: must not have a query",
            "gateway.yaml:3:20: upstream.connect_timeout: invalid duration",
            "upstream.assertion.header: cookie is used for something else",
            "upstream.assertion.audience: is required",
            "upstream.assertion.lifetime: must be within 1s..=1h",
            "upstream.assertion.signing_key_file: is required",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }
}
