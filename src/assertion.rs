//! The signed assertion for the upstream (CONTRACT §5.4): a short JWT in a
//! request header that tells the app who the user is and which second
//! factor was checked, so the app need not trust plain headers blindly.
//!
//! Signed with the operator's Ed25519 (`EdDSA`) or P-256 (`ES256`) key;
//! the public key is served as a JWKS at `/jwks.json` on the admin
//! listener, with the RFC 7638 thumbprint as `kid`.

use std::time::Duration;

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

/// `upstream.assertion`, validated: the key and what goes in the token.
#[derive(Clone)]
pub struct AssertionSettings {
    algorithm: Algorithm,
    key: EncodingKey,
    /// The public key as a JWK (with `kid`, `alg`, `use`).
    jwk: Value,
    kid: String,
    pub header: http::HeaderName,
    pub audience: String,
    pub lifetime: Duration,
}

impl std::fmt::Debug for AssertionSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionSettings")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .field("header", &self.header)
            .field("audience", &self.audience)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl AssertionSettings {
    /// From a PKCS#8 PEM private key: Ed25519 or P-256.
    pub fn from_pem(
        pem: &str,
        header: http::HeaderName,
        audience: String,
        lifetime: Duration,
    ) -> Result<AssertionSettings, String> {
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
        Ok(AssertionSettings {
            algorithm,
            key,
            jwk,
            kid,
            header,
            audience,
            lifetime,
        })
    }

    /// The public key set served at `/jwks.json`.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk] })
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
