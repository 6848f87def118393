//! `identity`: where the primary identity comes from (a JWT, see `jwt.rs`,
//! or a header a trusted proxy sets), claim names and the login URL.

use http::Uri;

use super::{jwt, Validator};
use crate::config::raw;
use crate::identity::{ClaimNames, Settings, TrustedHeader};

pub(super) fn validate(v: &mut Validator<'_>, id: raw::Identity) -> Option<Settings> {
    let jwt = match id.jwt {
        Some(j) => Some(jwt::validate(v, j)?),
        None => None,
    };
    let trusted_header = id.trusted_header.and_then(|t| {
        let user = v.header_name("identity.trusted_header.user", &t.user.0);
        let email = match t.email {
            Some(e) => Some(v.header_name("identity.trusted_header.email", &e.0)?),
            None => None,
        };
        if t.from.is_empty() {
            v.problem(
                "identity.trusted_header.from",
                "must list the peers allowed to assert identity",
            );
        }
        let from = v.cidrs("identity.trusted_header.from", t.from);
        if from.iter().any(|n| n.prefix_len() == 0) {
            v.problem(
                "identity.trusted_header.from",
                "a /0 range lets every client assert any identity; list the proxies in front",
            );
        }
        for (key, name) in [("user", user.as_ref()), ("email", email.as_ref())] {
            let Some(name) = name else { continue };
            let n = name.as_str();
            // Headers the gateway strips or reads itself can never carry
            // an asserted identity (and must not look as if they did).
            if n.starts_with("x-stepgate-")
                || n.starts_with("x_stepgate_")
                || n == "authorization"
                || n == "cookie"
            {
                v.problem(
                    &format!("identity.trusted_header.{key}"),
                    format!("{n} cannot carry a trusted identity (reserved by the gateway)"),
                );
            }
        }
        Some(TrustedHeader {
            user: user?,
            email,
            from,
        })
    });
    let c = id.claims.unwrap_or_default();
    let claims = ClaimNames {
        subject: c.subject.map(|s| s.0).unwrap_or_else(|| "sub".into()),
        email: c.email.map(|s| s.0).unwrap_or_else(|| "email".into()),
        phone: c
            .phone
            .map(|s| s.0)
            .unwrap_or_else(|| "phone_number".into()),
    };
    let login_url = id.login_url.and_then(|u| match u.0.parse::<Uri>() {
        Ok(uri) if uri.scheme().is_some() || u.0.starts_with('/') => Some(u.0),
        _ => {
            v.problem("identity.login_url", format!("invalid URL {:?}", u.0));
            None
        }
    });
    Some(Settings {
        jwt,
        trusted_header,
        claims,
        login_url,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{load, problems, BASE};

    #[test]
    // Claim names default to the OpenID Connect ones; a login URL is
    // absolute or a path, anything else is refused at its key.
    fn claims_default_and_login_url_is_checked() {
        let c = load(BASE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.identity.claims.subject, "sub");
        assert_eq!(c.identity.claims.phone, "phone_number");
        let with =
            |url: &str| BASE.replace("identity:\n", &format!("identity:\n  login_url: {url}\n"));
        for ok in ["/login", "https://idp.test/login"] {
            let c = load(&with(ok)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.identity.login_url.as_deref(), Some(ok));
        }
        let e = problems(&with("login"));
        assert!(
            e.contains("gateway.yaml:4:14: identity.login_url: invalid URL \"login\""),
            "{e}"
        );
        let e = problems(&BASE.replace(
            "    secret: ${JWT_SECRET}\n",
            "    secret: ${JWT_SECRET}\n  trusted_header: { user: \"X User\", from: [] }\n",
        ));
        assert!(
            e.contains("identity.trusted_header.user: invalid header name"),
            "{e}"
        );
        assert!(
            e.contains("identity.trusted_header.from: must list the peers"),
            "{e}"
        );
    }
}
