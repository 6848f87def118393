//! The signed assertion for the upstream (CONTRACT §5.4): a short JWT in a
//! request header that tells the app who the user is and which second
//! factor was checked, so the app need not trust plain headers blindly.
//!
//! Signed with the operator's Ed25519 (`EdDSA`) or P-256 (`ES256`) key;
//! the public key is served as a JWKS at `/jwks.json` on the admin
//! listener, with the RFC 7638 thumbprint as `kid`. After a reload with a
//! new key the previous one stays in that set until every assertion it
//! signed has expired ([`PublishedKeys`]), so an app that fetches the set
//! in between still verifies the assertions in flight.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// `iss` of every assertion.
pub const ISSUER: &str = "stepgate";
/// Default header name.
pub const DEFAULT_HEADER: &str = "x-stepgate-assertion";

/// `upstream.assertion`, validated: where the key is and what goes in
/// the token. The build step loads the key ([`Signer::load`]).
#[derive(Debug, Clone)]
pub struct AssertionSettings {
    /// An Ed25519 or P-256 private key, PKCS#8 PEM.
    pub signing_key_file: PathBuf,
    pub header: http::HeaderName,
    pub audience: String,
    pub lifetime: Duration,
}

/// The loaded signing key, and what goes in the token.
#[derive(Clone)]
pub struct Signer {
    algorithm: Algorithm,
    key: EncodingKey,
    /// The public key as a JWK (with `kid`, `alg`, `use`).
    jwk: Value,
    kid: String,
    pub header: http::HeaderName,
    pub audience: String,
    pub lifetime: Duration,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .field("header", &self.header)
            .field("audience", &self.audience)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// The key `settings` name, read from its file. Blocking.
    pub fn load(settings: &AssertionSettings) -> Result<Signer, String> {
        let path = &settings.signing_key_file;
        let pem = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Signer::from_pem(
            &pem,
            settings.header.clone(),
            settings.audience.clone(),
            settings.lifetime,
        )
        .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// From a PKCS#8 PEM private key: Ed25519 or P-256.
    pub fn from_pem(
        pem: &str,
        header: http::HeaderName,
        audience: String,
        lifetime: Duration,
    ) -> Result<Signer, String> {
        let (algorithm, key, public) = if let Ok(k) = {
            use ed25519_dalek::pkcs8::DecodePrivateKey;
            ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
        } {
            let x = URL_SAFE_NO_PAD.encode(k.verifying_key().to_bytes());
            let key = EncodingKey::from_ed_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
            // RFC 7638: the required members in lexicographic order.
            (
                Algorithm::EdDSA,
                key,
                json!({"crv": "Ed25519", "kty": "OKP", "x": x}),
            )
        } else if let Ok(k) = {
            use p256::pkcs8::DecodePrivateKey;
            p256::SecretKey::from_pkcs8_pem(pem)
        } {
            let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(
                &k.public_key(),
                false,
            );
            let (Some(x), Some(y)) = (point.x(), point.y()) else {
                return Err("P-256 public key has no coordinates".into());
            };
            let key = EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
            (
                Algorithm::ES256,
                key,
                json!({"crv": "P-256", "kty": "EC", "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)}),
            )
        } else {
            return Err("expected an Ed25519 or P-256 private key in PKCS#8 PEM".into());
        };
        // serde_json keeps object keys sorted, as RFC 7638 wants them.
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(public.to_string().as_bytes()));
        let mut jwk = public;
        jwk["kid"] = kid.clone().into();
        jwk["use"] = "sig".into();
        jwk["alg"] = match algorithm {
            Algorithm::EdDSA => "EdDSA",
            _ => "ES256",
        }
        .into();
        Ok(Signer {
            algorithm,
            key,
            jwk,
            kid,
            header,
            audience,
            lifetime,
        })
    }

    /// Sign an assertion for one forwarded request.
    pub fn sign(
        &self,
        subject: &str,
        email: Option<&str>,
        factor: Option<Factor<'_>>,
    ) -> Option<String> {
        let iat = crate::token::unix_now();
        let claims = Claims {
            iss: ISSUER,
            aud: &self.audience,
            sub: subject,
            email,
            iat,
            exp: iat + self.lifetime.as_secs(),
            jti: crate::otp::random_id(),
            amr: factor.as_ref().map(|f| f.amr.clone()),
            acr: factor.as_ref().and_then(|f| f.acr),
            auth_time: factor.as_ref().map(|f| f.auth_time),
            rule: factor.as_ref().map(|f| f.rule),
        };
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        match jsonwebtoken::encode(&header, &claims, &self.key) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "cannot sign the upstream assertion");
                None
            }
        }
    }
}

/// How long a replaced key stays published after its last assertion can
/// have expired: room for clocks that differ and for apps' leeway.
pub const RETIRED_KEY_MARGIN: Duration = Duration::from_secs(300);

/// The keys served at `/jwks.json`: the current one, and keys a reload
/// replaced, each until `lifetime` + [`RETIRED_KEY_MARGIN`] after it was
/// replaced (no assertion it signed is valid after that). Kept across
/// reloads, not across restarts.
#[derive(Clone, Debug, Default)]
pub struct PublishedKeys {
    current: Option<PublishedKey>,
    /// Replaced keys and when they stop being published.
    retired: Vec<(PublishedKey, Instant)>,
}

#[derive(Clone, Debug)]
struct PublishedKey {
    kid: String,
    jwk: Value,
    lifetime: Duration,
}

impl PublishedKeys {
    /// The keys to publish once `current` (the new policy's key, if any)
    /// replaces what `previous` published, at `now`.
    pub fn next(
        previous: Option<&PublishedKeys>,
        current: Option<&Signer>,
        now: Instant,
    ) -> PublishedKeys {
        let current = current.map(|a| PublishedKey {
            kid: a.kid.clone(),
            jwk: a.jwk.clone(),
            lifetime: a.lifetime,
        });
        let mut retired: Vec<(PublishedKey, Instant)> = Vec::new();
        if let Some(prev) = previous {
            retired.extend(
                prev.retired
                    .iter()
                    .filter(|(_, until)| *until > now)
                    .cloned(),
            );
            if let Some(old) = &prev.current {
                if current.as_ref().map(|c| &c.kid) != Some(&old.kid) {
                    let until = now + old.lifetime + RETIRED_KEY_MARGIN;
                    retired.push((old.clone(), until));
                }
            }
        }
        // One entry per key, the latest end; never the current key twice.
        retired.sort_by(|a, b| a.0.kid.cmp(&b.0.kid).then(b.1.cmp(&a.1)));
        retired.dedup_by(|later, first| later.0.kid == first.0.kid);
        if let Some(c) = &current {
            retired.retain(|(k, _)| k.kid != c.kid);
        }
        PublishedKeys { current, retired }
    }

    /// The JWK set to serve at `now` (current key first), or `None` when
    /// there is no key to publish.
    pub fn jwks(&self, now: Instant) -> Option<Value> {
        let keys: Vec<&Value> = self
            .current
            .iter()
            .map(|k| &k.jwk)
            .chain(
                self.retired
                    .iter()
                    .filter(|(_, until)| *until > now)
                    .map(|(k, _)| &k.jwk),
            )
            .collect();
        (!keys.is_empty()).then(|| json!({ "keys": keys }))
    }
}

/// The second factor checked for a request, as the assertion states it.
pub struct Factor<'a> {
    /// `["otp", "email"]`, or what the identity provider put in `amr`.
    pub amr: Vec<&'a str>,
    /// The identity provider's `acr`, when its sign-in was the factor.
    pub acr: Option<&'a str>,
    pub auth_time: u64,
    /// The matched rule's name.
    pub rule: &'a str,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'static str,
    aud: &'a str,
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    iat: u64,
    exp: u64,
    jti: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    amr: Option<Vec<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    acr: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_time: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh Ed25519 key as PKCS#8 PEM.
    fn ed25519_pem(seed: u8) -> String {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
            .to_pkcs8_pem(Default::default())
            .map(|p| p.to_string())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn settings(seed: u8, lifetime: u64) -> Signer {
        Signer::from_pem(
            &ed25519_pem(seed),
            http::HeaderName::from_static(DEFAULT_HEADER),
            "app".into(),
            Duration::from_secs(lifetime),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn kids(keys: &PublishedKeys, at: Instant) -> Vec<String> {
        keys.jwks(at)
            .map(|set| {
                set["keys"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|k| k["kid"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    // A replaced key stays published until every assertion it signed has
    // expired (its lifetime plus the margin), then goes; a reload with the
    // same key retires nothing; going back to a retired key publishes it
    // once; removing upstream.assertion keeps serving the old key for as
    // long.
    fn replaced_keys_overlap_then_go() {
        let t0 = Instant::now();
        let (a, b) = (settings(1, 60), settings(2, 30));
        let first = PublishedKeys::next(None, Some(&a), t0);
        assert_eq!(kids(&first, t0), [a.kid.as_str()]);
        let same = PublishedKeys::next(Some(&first), Some(&a), t0);
        assert_eq!(
            kids(&same, t0 + Duration::from_secs(3600)),
            [a.kid.as_str()]
        );

        let t1 = t0 + Duration::from_secs(10);
        let rotated = PublishedKeys::next(Some(&same), Some(&b), t1);
        let end = t1 + Duration::from_secs(60) + RETIRED_KEY_MARGIN;
        assert_eq!(kids(&rotated, t1), [b.kid.as_str(), a.kid.as_str()]);
        assert_eq!(
            kids(&rotated, end - Duration::from_secs(1)),
            [b.kid.as_str(), a.kid.as_str()]
        );
        assert_eq!(kids(&rotated, end), [b.kid.as_str()]);

        // Back to a: published once, b retired for its own lifetime.
        let t2 = t1 + Duration::from_secs(5);
        let back = PublishedKeys::next(Some(&rotated), Some(&a), t2);
        assert_eq!(kids(&back, t2), [a.kid.as_str(), b.kid.as_str()]);
        let b_end = t2 + Duration::from_secs(30) + RETIRED_KEY_MARGIN;
        assert_eq!(kids(&back, b_end), [a.kid.as_str()]);

        // No assertion key any more: the old one until its end, then none.
        let off = PublishedKeys::next(Some(&first), None, t1);
        assert_eq!(kids(&off, t1), [a.kid.as_str()]);
        assert!(off.jwks(end).is_none());
        assert!(PublishedKeys::next(None, None, t0).jwks(t0).is_none());
    }
}
