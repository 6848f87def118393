//! Second-factor tokens: the short-lived JWTs the gateway issues after a
//! verified code, and their verification.
//!
//! A token can never be confused with a primary token: it carries its own
//! `typ` header, issuer and audience, is signed with the gateway's own key,
//! and is bound to one subject and one primary session (`ses`, a hash of the
//! session so the token does not reveal it).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::channel::Channel;

/// `typ` header of every second-factor token.
pub const TOKEN_TYPE: &str = "stepgate-sf+jwt";
/// `iss` of every second-factor token.
pub const ISSUER: &str = "stepgate";
/// `aud` of every second-factor token.
pub const AUDIENCE: &str = "stepgate:second-factor";

/// Seconds a token is still accepted past its `exp`: clock skew between
/// gateway instances sharing a key is the only leeway needed.
pub const LEEWAY_SECS: u64 = 5;

/// Extra life given to every spent or revoked mark beyond the last instant
/// its token can be accepted.
const MARK_MARGIN: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    sub: String,
    ses: String,
    amr: Vec<String>,
    auth_time: u64,
    iat: u64,
    exp: u64,
    jti: String,
}

/// A verified second factor, as carried by a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecondFactor {
    pub subject: String,
    /// Hash of the primary session the factor was proved under.
    pub session: String,
    pub channel: Channel,
    /// Unix seconds when the code was verified.
    pub auth_time: u64,
    /// Unix seconds when the token expires.
    pub exp: u64,
    pub jti: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed or badly signed second-factor token")]
    Invalid,
    #[error("second-factor token expired")]
    Expired,
}

/// How second-factor tokens are signed: key material as the config gives
/// it; [`Tokens::new`] loads it.
#[derive(Clone)]
pub enum SigningKey {
    /// An HS256 secret.
    Hs256(Vec<u8>),
    /// An Ed25519 or P-256 private key, PKCS#8 PEM.
    Pem(Vec<u8>),
}

impl SigningKey {
    /// The algorithm and the signing and verifying keys.
    pub fn load(&self) -> Result<(Algorithm, EncodingKey, DecodingKey), String> {
        let pem = match self {
            SigningKey::Hs256(secret) => {
                return Ok((
                    Algorithm::HS256,
                    EncodingKey::from_secret(secret),
                    DecodingKey::from_secret(secret),
                ))
            }
            SigningKey::Pem(pem) => pem,
        };
        let text = String::from_utf8_lossy(pem);
        // The PEM does not name its curve; try each kind.
        if let Ok(encoding) = EncodingKey::from_ed_pem(pem) {
            let decoding = ed25519_public_from_private_pem(&text)?;
            return Ok((Algorithm::EdDSA, encoding, decoding));
        }
        if let Ok(encoding) = EncodingKey::from_ec_pem(pem) {
            let decoding = p256_public_from_private_pem(&text)?;
            return Ok((Algorithm::ES256, encoding, decoding));
        }
        Err("expected an Ed25519 or P-256 private key in PKCS#8 PEM".into())
    }
}

/// The `stepup.token` settings, built by the config loader.
#[derive(Clone)]
pub struct Settings {
    pub signing_key: SigningKey,
    /// Key for the keyed hash of codes and CSRF tokens (derived from the
    /// signing key unless given).
    pub secret: Vec<u8>,
    pub lifetime: Duration,
    pub cookie: String,
    pub header: http::HeaderName,
}

/// Issues and verifies second-factor tokens.
#[derive(Clone)]
pub struct Tokens {
    algorithm: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    lifetime: Duration,
    validation: Validation,
    /// Tokens that passed [`Tokens::verify`], for [`Tokens::verify_cached`].
    verified: Arc<quick_cache::sync::Cache<[u8; 32], Verified>>,
}

/// Verified second-factor tokens kept at most (per policy: a reload, and
/// so any change of the signing key, starts an empty cache).
pub const VERIFIED_TOKENS: usize = 10_000;

#[derive(Clone)]
struct Verified {
    factor: SecondFactor,
    /// Unix seconds after which verification would refuse the token as
    /// expired (`exp` + leeway).
    valid_until: u64,
}

impl Tokens {
    /// Load the signing key and build the validation; fails on a key
    /// that does not load (the config loader reports that first).
    pub fn new(cfg: &Settings) -> Result<Tokens, String> {
        let (algorithm, encoding, decoding) = cfg.signing_key.load()?;
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // `exp` is checked in whole seconds: a token is accepted while
        // `floor(now) <= exp + LEEWAY_SECS`; see `mark_ttl`.
        validation.leeway = LEEWAY_SECS;
        Ok(Tokens {
            algorithm,
            encoding,
            decoding,
            lifetime: cfg.lifetime,
            validation,
            verified: Arc::new(quick_cache::sync::Cache::new(VERIFIED_TOKENS)),
        })
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Issue a token for `subject` under `session`, proved by `channel` now.
    pub fn issue(
        &self,
        subject: &str,
        session: &str,
        channel: Channel,
    ) -> Result<String, TokenError> {
        let now = unix_now();
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: subject.into(),
            ses: session_hash(session),
            amr: vec!["otp".into(), channel.as_str().into()],
            auth_time: now,
            iat: now,
            exp: now + self.lifetime.as_secs(),
            jti: crate::otp::random_id(),
        };
        let mut header = Header::new(self.algorithm);
        header.typ = Some(TOKEN_TYPE.into());
        jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(|_| TokenError::Invalid)
    }

    /// [`Tokens::verify`], remembering tokens that pass: a token presented
    /// again is found by the SHA-256 of the whole token instead of being
    /// decoded and its signature checked again. An entry is used only
    /// while verification would still accept the token (until `exp` plus
    /// the leeway); the cache belongs to this `Tokens`, built per policy
    /// with its key, so a new key never finds an old entry. Refused tokens
    /// are not cached. What changes per request (revocation, a one-time
    /// spend, the rule's `max_age`) is for the caller to check every time.
    pub fn verify_cached(&self, token: &str) -> Result<SecondFactor, TokenError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = unix_now();
        if let Some(hit) = self.verified.get(&digest) {
            if now <= hit.valid_until {
                return Ok(hit.factor);
            }
            self.verified.remove(&digest);
        }
        let factor = self.verify(token)?;
        let valid_until = factor.exp.saturating_add(self.validation.leeway);
        if now <= valid_until {
            self.verified.insert(
                digest,
                Verified {
                    factor: factor.clone(),
                    valid_until,
                },
            );
        }
        Ok(factor)
    }

    /// Verified tokens cached (for tests).
    pub fn verified_len(&self) -> usize {
        self.verified.len()
    }

    /// Check signature, type, issuer, audience and expiry.
    pub fn verify(&self, token: &str) -> Result<SecondFactor, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        if header.typ.as_deref() != Some(TOKEN_TYPE) || header.alg != self.algorithm {
            return Err(TokenError::Invalid);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?;
        let c = data.claims;
        let channel = match c.amr.as_slice() {
            [otp, ch] if otp == "otp" => Channel::parse(ch).ok_or(TokenError::Invalid)?,
            _ => return Err(TokenError::Invalid),
        };
        // The token's own lifetime bounds auth_time; a token claiming a
        // factor from the future or older than its lifetime is forged.
        if c.auth_time > c.iat || c.exp.saturating_sub(c.auth_time) > self.lifetime.as_secs() {
            return Err(TokenError::Invalid);
        }
        Ok(SecondFactor {
            subject: c.sub,
            session: c.ses,
            channel,
            auth_time: c.auth_time,
            exp: c.exp,
            jti: c.jti,
        })
    }
}

/// How long a mark on a token (spent for a `one_time` rule, revoked at
/// logout) must live from now: past every instant the token with this `exp`
/// can still be accepted, so the token can never come back.
///
/// Verification compares whole seconds with leeway, so the token is
/// accepted up to (not including) the instant `exp + LEEWAY_SECS + 1`; the
/// mark lives until then plus `MARK_MARGIN`, rounded up to whole seconds.
pub fn mark_ttl(exp: u64) -> Duration {
    mark_ttl_at(exp, SystemTime::now())
}

fn mark_ttl_at(exp: u64, now: SystemTime) -> Duration {
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let accepted_until = Duration::from_secs(exp.saturating_add(LEEWAY_SECS).saturating_add(1));
    let left = accepted_until.saturating_sub(now) + MARK_MARGIN;
    Duration::from_secs(left.as_secs() + u64::from(left.subsec_nanos() > 0))
}

/// The session binding written into tokens: a hash, never the session.
pub fn session_hash(session: &str) -> String {
    let digest = Sha256::digest(session.as_bytes());
    URL_SAFE_NO_PAD.encode(&digest[..18])
}

/// [`session_hash`] as bytes, without allocating. An [`Identity`] keeps
/// its own, made once with it (for a cached primary token, once per
/// token), so a step-up request hashes no session.
///
/// [`Identity`]: crate::identity::Identity
pub fn session_binding(session: &str) -> [u8; 24] {
    let digest = Sha256::digest(session.as_bytes());
    // 18 bytes are exactly 24 base64 characters, without padding; were
    // the encoding to fail, zeros match no token's binding.
    let mut buf = [0u8; 24];
    if URL_SAFE_NO_PAD
        .encode_slice(&digest[..18], &mut buf)
        .is_err()
    {
        buf = [0; 24];
    }
    buf
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The public half of an Ed25519 private key in PKCS#8 PEM.
pub fn ed25519_public_from_private_pem(pem: &str) -> Result<DecodingKey, String> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let key = ed25519_dalek::SigningKey::from_pkcs8_pem(pem).map_err(|e| e.to_string())?;
    let x = URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes());
    DecodingKey::from_ed_components(&x).map_err(|e| e.to_string())
}

/// The public half of a P-256 private key in PKCS#8 PEM.
pub fn p256_public_from_private_pem(pem: &str) -> Result<DecodingKey, String> {
    use p256::pkcs8::DecodePrivateKey;
    let key = p256::SecretKey::from_pkcs8_pem(pem).map_err(|e| e.to_string())?;
    let point =
        p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key.public_key(), false);
    match (point.x(), point.y()) {
        (Some(x), Some(y)) => {
            DecodingKey::from_ec_components(&URL_SAFE_NO_PAD.encode(x), &URL_SAFE_NO_PAD.encode(y))
                .map_err(|e| e.to_string())
        }
        _ => Err("P-256 public key has no coordinates".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(key: &[u8]) -> Tokens {
        Tokens::new(&Settings {
            signing_key: SigningKey::Hs256(key.to_vec()),
            secret: vec![7; 32],
            lifetime: Duration::from_secs(900),
            cookie: "stepgate_sf".into(),
            header: http::HeaderName::from_static("x-second-factor-token"),
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    // The cache of verified tokens answers only for a token that passed
    // verification, only until exp + leeway, and only for the key that
    // verified it; refused tokens are never cached.
    fn verified_tokens_are_cached_until_exp_and_per_key() {
        let t = tokens(&[1; 32]);
        let tok = t
            .issue("alice", "sid:1", Channel::Email)
            .unwrap_or_default();
        let sf = t.verify_cached(&tok).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.verified_len(), 1);
        assert_eq!(t.verify_cached(&tok), Ok(sf.clone()));
        // Another key (a reload with a new key builds new Tokens) neither
        // accepts the token nor sees the entry.
        let other = tokens(&[2; 32]);
        assert_eq!(other.verify_cached(&tok), Err(TokenError::Invalid));
        assert_eq!(other.verified_len(), 0);
        // Refused tokens are not cached, however often they come.
        let forged = format!("{tok}x");
        for _ in 0..2 {
            assert!(t.verify_cached(&forged).is_err());
        }
        assert_eq!(t.verified_len(), 1);
        // An entry is served only while now <= valid_until: planted for a
        // string that is no token at all, it answers while valid and is
        // dropped (and the string refused) once past.
        let key = |s: &str| -> [u8; 32] { Sha256::digest(s.as_bytes()).into() };
        let now = unix_now();
        t.verified.insert(
            key("planted"),
            Verified {
                factor: sf.clone(),
                valid_until: now + 60,
            },
        );
        assert_eq!(t.verify_cached("planted"), Ok(sf.clone()));
        t.verified.insert(
            key("planted"),
            Verified {
                factor: sf,
                valid_until: now - 1,
            },
        );
        assert_eq!(t.verify_cached("planted"), Err(TokenError::Invalid));
        assert!(t.verified.get(&key("planted")).is_none());
    }

    #[test]
    // A token round-trips with its binding and factor.
    fn issue_and_verify() {
        let t = tokens(&[1; 32]);
        let tok = t.issue("alice", "sid:1", Channel::Sms).unwrap_or_default();
        let sf = t.verify(&tok).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sf.subject, "alice");
        assert_eq!(sf.session, session_hash("sid:1"));
        assert_eq!(sf.session.as_bytes(), session_binding("sid:1"));
        assert_ne!(sf.session.as_bytes(), session_binding("sid:2"));
        assert_eq!(sf.channel, Channel::Sms);
        assert!(sf.exp - sf.auth_time <= 900);
    }

    #[test]
    // Expiry edges: the mark on a token outlives the last instant the token
    // is accepted (whole-second `exp` check plus leeway), from any
    // sub-second starting point, and by at least the margin.
    fn expiry_edge_marks_outlive_acceptance() {
        let exp = 1_000_000u64;
        let last_accepted = exp + LEEWAY_SECS; // floor(now) == this still passes
        for start in [exp - 900, exp - 1, exp, last_accepted, last_accepted + 1] {
            for millis in [0u64, 1, 499, 500, 999] {
                let now = UNIX_EPOCH + Duration::from_secs(start) + Duration::from_millis(millis);
                let ttl = mark_ttl_at(exp, now);
                assert_eq!(ttl.subsec_nanos(), 0, "whole seconds");
                let mark_until = now + ttl;
                let need = UNIX_EPOCH + Duration::from_secs(last_accepted + 1) + MARK_MARGIN;
                assert!(
                    mark_until >= need,
                    "start {start}.{millis:03}: mark ends {mark_until:?}, token accepted until {need:?}"
                );
                assert!(ttl >= MARK_MARGIN);
            }
        }
    }

    #[test]
    // Mutation-testing kills (cargo-mutants on `Tokens::verify`): a token
    // signed with the gateway's own key is still refused when its header
    // type is not the gateway's, when its `amr` does not start with `otp`,
    // or when its `auth_time` lies in the future or further back than the
    // token lifetime allows. Each check alone must refuse.
    fn verify_refuses_each_wrong_claim_alone() {
        let t = tokens(&[1; 32]);
        let now = unix_now();
        let sign = |typ: Option<&str>, amr: [&str; 2], auth_time: u64, iat: u64| {
            let claims = serde_json::json!({
                "iss": ISSUER, "aud": AUDIENCE, "sub": "a", "ses": "s", "amr": amr,
                "auth_time": auth_time, "iat": iat, "exp": now + 600, "jti": "j",
            });
            let mut header = Header::new(Algorithm::HS256);
            header.typ = typ.map(str::to_string);
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&[1; 32]))
                .unwrap_or_default()
        };
        let good = sign(Some(TOKEN_TYPE), ["otp", "email"], now, now);
        assert!(t.verify(&good).is_ok(), "the control token passes");
        for (why, tok) in [
            ("typ JWT", sign(Some("JWT"), ["otp", "email"], now, now)),
            ("no typ", sign(None, ["otp", "email"], now, now)),
            (
                "amr pwd",
                sign(Some(TOKEN_TYPE), ["pwd", "email"], now, now),
            ),
            (
                "auth_time after iat",
                sign(Some(TOKEN_TYPE), ["otp", "email"], now + 10, now),
            ),
            (
                "auth_time before lifetime",
                sign(Some(TOKEN_TYPE), ["otp", "email"], now - 1000, now),
            ),
        ] {
            assert_eq!(t.verify(&tok), Err(TokenError::Invalid), "{why}");
        }
    }

    #[test]
    // Expiry edges: the acceptance window `mark_ttl` assumes is the one
    // verification applies (a token `LEEWAY_SECS` past `exp` still passes,
    // one a second beyond that is refused).
    fn expiry_edge_leeway_matches_verification() {
        let t = tokens(&[1; 32]);
        let sign = |exp: u64| {
            let claims = serde_json::json!({
                "iss": ISSUER, "aud": AUDIENCE, "sub": "a", "ses": "s", "amr": ["otp", "email"],
                "auth_time": exp.saturating_sub(60), "iat": exp.saturating_sub(60), "exp": exp, "jti": "j",
            });
            let mut header = Header::new(Algorithm::HS256);
            header.typ = Some(TOKEN_TYPE.into());
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&[1; 32]))
                .unwrap_or_default()
        };
        // One second of slack on each side for the clock ticking mid-test.
        let inside = sign(unix_now() - LEEWAY_SECS + 1);
        assert!(t.verify(&inside).is_ok());
        let outside = sign(unix_now() - LEEWAY_SECS - 2);
        assert_eq!(t.verify(&outside), Err(TokenError::Expired));
    }

    #[test]
    // A token signed with another key is refused.
    fn wrong_key_refused() {
        let tok = tokens(&[1; 32])
            .issue("alice", "s", Channel::Email)
            .unwrap_or_default();
        assert_eq!(tokens(&[2; 32]).verify(&tok), Err(TokenError::Invalid));
    }

    #[test]
    // A primary token signed with the same key is not a second factor.
    fn primary_token_is_not_a_second_factor() {
        let key = [1u8; 32];
        let claims = serde_json::json!({"sub": "alice", "exp": unix_now() + 60, "iss": ISSUER, "aud": AUDIENCE});
        let primary = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&key),
        )
        .unwrap_or_default();
        assert_eq!(tokens(&key).verify(&primary), Err(TokenError::Invalid));
    }

    #[test]
    // alg none must never verify.
    fn alg_none_refused() {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"stepgate-sf+jwt"}"#);
        let body = URL_SAFE_NO_PAD.encode(
            format!(
                r#"{{"iss":"stepgate","aud":"stepgate:second-factor","sub":"a","ses":"x","amr":["otp","email"],"auth_time":{n},"iat":{n},"exp":{e},"jti":"j"}}"#,
                n = unix_now(),
                e = unix_now() + 60
            )
            .as_bytes(),
        );
        assert_eq!(
            tokens(&[1; 32]).verify(&format!("{header}.{body}.")),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    // Ed25519 and P-256 PEM keys sign tokens that verify with the derived public half.
    fn pem_keys_round_trip() {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let sk = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let pem = sk
            .to_pkcs8_pem(Default::default())
            .map(|p| p.to_string())
            .unwrap_or_default();
        let t = Tokens::new(&Settings {
            signing_key: SigningKey::Pem(pem.into_bytes()),
            secret: vec![7; 32],
            lifetime: Duration::from_secs(60),
            cookie: "c".into(),
            header: http::HeaderName::from_static("x-t"),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let tok = t.issue("bob", "s", Channel::Email).unwrap_or_default();
        assert_eq!(t.verify(&tok).map(|s| s.subject), Ok("bob".to_string()));
    }
}
