//! Second-factor tokens: the short-lived JWTs the gateway issues after a
//! verified code, and their verification.
//!
//! A token can never be confused with a primary token: it carries its own
//! `typ` header, issuer and audience, is signed with the gateway's own key,
//! and is bound to one subject and one primary session (`ses`, a hash of the
//! session so the token does not reveal it).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{SigningKey, Token as TokenConfig};
use crate::delivery::Channel;

/// `typ` header of every second-factor token.
pub const TOKEN_TYPE: &str = "stepgate-sf+jwt";
/// `iss` of every second-factor token.
pub const ISSUER: &str = "stepgate";
/// `aud` of every second-factor token.
pub const AUDIENCE: &str = "stepgate:second-factor";

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

/// Issues and verifies second-factor tokens.
#[derive(Clone)]
pub struct Tokens {
    algorithm: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    lifetime: Duration,
    validation: Validation,
}

impl Tokens {
    pub fn new(cfg: &TokenConfig) -> Tokens {
        let (algorithm, encoding, decoding) = match &cfg.signing_key {
            SigningKey::Hs256(secret) => (
                Algorithm::HS256,
                EncodingKey::from_secret(secret),
                DecodingKey::from_secret(secret),
            ),
            SigningKey::Pem {
                algorithm,
                encoding,
                decoding,
            } => (*algorithm, encoding.clone(), decoding.clone()),
        };
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // The token's own lifetime is short; clock skew between gateway
        // instances sharing a key is the only leeway needed.
        validation.leeway = 5;
        Tokens {
            algorithm,
            encoding,
            decoding,
            lifetime: cfg.lifetime,
            validation,
        }
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

/// The session binding written into tokens: a hash, never the session.
pub fn session_hash(session: &str) -> String {
    let digest = Sha256::digest(session.as_bytes());
    URL_SAFE_NO_PAD.encode(&digest[..18])
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
        Tokens::new(&TokenConfig {
            signing_key: SigningKey::Hs256(key.to_vec()),
            secret: vec![7; 32],
            lifetime: Duration::from_secs(900),
            cookie: "stepgate_sf".into(),
            header: http::HeaderName::from_static("x-second-factor-token"),
        })
    }

    #[test]
    // A token round-trips with its binding and factor.
    fn issue_and_verify() {
        let t = tokens(&[1; 32]);
        let tok = t.issue("alice", "sid:1", Channel::Sms).unwrap_or_default();
        let sf = t.verify(&tok).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sf.subject, "alice");
        assert_eq!(sf.session, session_hash("sid:1"));
        assert_eq!(sf.channel, Channel::Sms);
        assert!(sf.exp - sf.auth_time <= 900);
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
        let decoding = ed25519_public_from_private_pem(&pem).unwrap_or_else(|e| panic!("{e}"));
        let encoding = EncodingKey::from_ed_pem(pem.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let t = Tokens::new(&TokenConfig {
            signing_key: SigningKey::Pem {
                algorithm: Algorithm::EdDSA,
                encoding,
                decoding,
            },
            secret: vec![7; 32],
            lifetime: Duration::from_secs(60),
            cookie: "c".into(),
            header: http::HeaderName::from_static("x-t"),
        });
        let tok = t.issue("bob", "s", Channel::Email).unwrap_or_default();
        assert_eq!(t.verify(&tok).map(|s| s.subject), Ok("bob".to_string()));
    }
}
