//! What `stepgate check`, `explain` and `token` print, as functions the
//! binary calls and tests can check.

use std::time::Duration;

use http::{Method, Uri};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::config::{fmt_duration, Config};
use crate::policy::{normalize_path, Action, DefaultPolicy};
use crate::store::Settings as StoreSettings;

/// One screen describing listeners, upstream, identity, store and rules.
pub fn summary(c: &Config) -> String {
    let mut s = String::new();
    let tls = if c.listen.tls.is_some() {
        "https (h2, http/1.1)"
    } else {
        "http"
    };
    s += &format!("{}: ok\n", c.file.display());
    s += &format!("listen    {} {tls}\n", c.listen.address);
    s += &format!(
        "admin     {} (/healthz /readyz /metrics)\n",
        c.admin.address
    );
    s += &format!(
        "upstream  {} (connect {}, timeout {}){}\n",
        c.upstream.url,
        fmt_duration(c.upstream.connect_timeout),
        fmt_duration(c.upstream.timeout),
        c.upstream
            .assertion
            .as_ref()
            .map_or(String::new(), |a| format!(
                ", signed assertion in {} for {}",
                a.header, a.audience
            ))
    );
    let mut id = Vec::new();
    if let Some(j) = &c.identity.jwt {
        let algs: Vec<String> = j.algorithms.iter().map(|a| format!("{a:?}")).collect();
        let mut from = Vec::new();
        if j.from_header {
            from.push("bearer header".to_string());
        }
        if j.from_cookie {
            from.push(format!("cookie {}", j.cookie));
        }
        use crate::identity::jwks::JwksSource;
        let keys = match j.remote.as_ref().map(|r| &r.source) {
            Some(JwksSource::Url(u)) => format!(", keys from {u}"),
            Some(JwksSource::Discovery { issuer }) => {
                format!(", keys discovered from {issuer}")
            }
            None => String::new(),
        };
        id.push(format!(
            "jwt [{}] from {}{keys}",
            algs.join(","),
            from.join(" + ")
        ));
    }
    if let Some(t) = &c.identity.trusted_header {
        let from: Vec<String> = t.from.iter().map(|n| n.to_string()).collect();
        id.push(format!("header {} from {}", t.user, from.join(",")));
    }
    s += &format!(
        "identity  {}\n",
        if id.is_empty() {
            "none".into()
        } else {
            id.join("; ")
        }
    );
    let store = match &c.store {
        StoreSettings::Memory { .. } => "memory (single instance)".to_string(),
        StoreSettings::Redis { url, .. } => format!("redis {}", redact_url(url)),
        StoreSettings::Cluster { urls, .. } => format!("redis cluster ({} nodes)", urls.len()),
    };
    s += &format!("store     {store}\n");
    let mut channels = Vec::new();
    if c.stepup.email.is_some() {
        channels.push("email");
    }
    if c.stepup.sms.is_some() {
        channels.push("sms");
    }
    if c.stepup.console {
        channels.push("console (dev)");
    }
    s += &format!(
        "stepup    {} · codes {} digits, ttl {} · token lifetime {} · channels {}\n",
        c.stepup.prefix,
        c.stepup.otp.length,
        fmt_duration(c.stepup.otp.ttl),
        fmt_duration(c.stepup.token.lifetime),
        if channels.is_empty() {
            "none".into()
        } else {
            channels.join(", ")
        }
    );
    s += &format!("routes    ({}, first match wins)\n", c.policy.rules().len());
    for r in c.policy.rules() {
        let methods = r
            .methods
            .as_ref()
            .map(|m| m.iter().map(Method::as_str).collect::<Vec<_>>().join(","))
            .unwrap_or_else(|| "*".into());
        let hosts = r
            .hosts
            .as_ref()
            .map(|h| {
                format!(
                    " hosts {}",
                    h.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(",")
                )
            })
            .unwrap_or_default();
        s += &format!(
            "  {:<14} line {:<4} {:<7} {}{hosts} -> {}\n",
            r.name,
            r.line,
            methods,
            r.path.describe(),
            requirement(&r.action)
        );
    }
    s += &format!(
        "default   {}\n",
        match c.policy.default {
            DefaultPolicy::Pass => "pass (forward as is)",
            DefaultPolicy::Identity => "identity (primary identity required)",
        }
    );
    s
}

/// What a rule action requires, in words.
pub fn requirement(a: &Action) -> String {
    match a {
        Action::Public => "public".into(),
        Action::Deny => "deny (403)".into(),
        Action::Identity => "primary identity".into(),
        Action::StepUp(s) => {
            let factors: Vec<&str> = s.factors.iter().map(|f| f.as_str()).collect();
            let idp = match &s.idp {
                None => String::new(),
                Some(i) => {
                    let mut parts = Vec::new();
                    if !i.amr.is_empty() {
                        parts.push(format!("amr {}", i.amr.join(",")));
                    }
                    if !i.acr.is_empty() {
                        parts.push(format!("acr {}", i.acr.join(",")));
                    }
                    format!(", or the identity provider's {}", parts.join(" or "))
                }
            };
            format!(
                "step-up, max_age {}, factors {}{idp}{}",
                fmt_duration(s.max_age),
                factors.join(","),
                if s.one_time { ", one-time" } else { "" }
            )
        }
    }
}

/// `stepgate explain METHOD URL`.
pub fn explain(c: &Config, method: &str, url: &str) -> Result<String, String> {
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|_| format!("invalid method {method:?}"))?;
    let uri: Uri = url.parse().map_err(|_| format!("invalid URL {url:?}"))?;
    let host = uri.authority().map(|a| a.as_str().to_string());
    let path =
        normalize_path(uri.path()).map_err(|e| format!("{method} {url}: 400 Bad Request: {e}"))?;
    let mut s = format!("normalised path: {path}\n");
    if path == c.stepup.prefix || path.starts_with(&format!("{}/", c.stepup.prefix)) {
        s += "gateway endpoint (step-up API/page): primary identity\n";
        return Ok(s);
    }
    if host.is_none() {
        let skipped = c
            .policy
            .rules()
            .iter()
            .filter(|r| r.hosts.is_some())
            .count();
        if skipped > 0 {
            s += &format!("note: {skipped} rule(s) limited to hosts were skipped; give a full URL (https://host/path) to include them\n");
        }
    }
    match c.policy.route(&method, host.as_deref(), &path) {
        Some(r) => {
            s += &format!(
                "rule {:?} (line {}): {}\n",
                r.name,
                r.line,
                requirement(&r.action)
            )
        }
        None => {
            s += &format!(
                "no rule matches: default {}\n",
                match c.policy.default {
                    DefaultPolicy::Pass => "pass (forwarded as is)",
                    DefaultPolicy::Identity => "identity (primary identity required)",
                }
            )
        }
    }
    Ok(s)
}

/// Options of `stepgate token`.
pub struct TokenRequest<'a> {
    pub sub: &'a str,
    pub email: Option<&'a str>,
    pub phone: Option<&'a str>,
    pub sid: Option<&'a str>,
    pub ttl: Duration,
    /// A private key PEM and its algorithm, instead of the config's HS secret.
    pub key: Option<(Vec<u8>, Algorithm)>,
}

/// Mint a primary access token the config accepts.
pub fn mint(c: &Config, t: &TokenRequest<'_>) -> Result<String, String> {
    let jwt = c
        .identity
        .jwt
        .as_ref()
        .ok_or("the config has no identity.jwt section")?;
    let (alg, key) = match &t.key {
        Some((pem, alg)) => {
            let key = match alg {
                Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512 => EncodingKey::from_rsa_pem(pem),
                Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem),
                Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
                _ => return Err("--key takes an RSA, EC or Ed25519 private key".into()),
            }
            .map_err(|e| format!("cannot read key: {e}"))?;
            (*alg, key)
        }
        None => {
            let secret = jwt
                .hs_secret
                .as_ref()
                .ok_or("the config verifies with a public key; pass --key PRIVATE.pem --alg ALG")?;
            let alg = jwt
                .algorithms
                .first()
                .copied()
                .ok_or("the config lists no algorithm")?;
            (alg, EncodingKey::from_secret(secret))
        }
    };
    let now = crate::token::unix_now();
    let names = &c.identity.claims;
    let mut claims = serde_json::Map::new();
    claims.insert(names.subject.clone(), t.sub.into());
    if let Some(e) = t.email {
        claims.insert(names.email.clone(), e.into());
    }
    if let Some(p) = t.phone {
        claims.insert(names.phone.clone(), p.into());
    }
    if let Some(sid) = t.sid {
        claims.insert("sid".into(), sid.into());
    }
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + t.ttl.as_secs()).into());
    if let Some(iss) = &jwt.issuer {
        claims.insert("iss".into(), iss.clone().into());
    }
    if let Some(aud) = &jwt.audience {
        claims.insert("aud".into(), aud.clone().into());
    }
    jsonwebtoken::encode(&Header::new(alg), &claims, &key).map_err(|e| e.to_string())
}

fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}
