//! The `identity` settings the config loader builds: where a primary
//! identity comes from and where the keys that check it are. Loading the
//! key files ([`JwtKeys::load`], called by the config's build step) is
//! here, next to the code that uses the keys.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use jsonwebtoken::{Algorithm, DecodingKey};

use super::jwks::JwksSettings;

/// What the build step loads for `identity.jwt`: the keys that check
/// primary tokens (from the secret, `public_key` or `jwks_file`), and the
/// CA certificates of `ca_file` to fetch the provider's keys with.
#[derive(Clone, Default)]
pub struct JwtKeys {
    /// Keys by `kid` (JWKS); the empty string holds the key used when a
    /// token names no `kid` or there is only one.
    pub keys: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    /// `ca_file`'s certificates (empty without it).
    pub ca: Vec<rustls_pki_types::CertificateDer<'static>>,
}

/// `identity.jwt`: where tokens come from and how they are checked.
#[derive(Clone)]
pub struct JwtSettings {
    pub from_header: bool,
    pub from_cookie: bool,
    pub cookie: String,
    pub algorithms: Vec<Algorithm>,
    /// A public key PEM of the first asymmetric algorithm's family.
    pub public_key: Option<PathBuf>,
    /// A JWKS file.
    pub jwks_file: Option<PathBuf>,
    /// Keys fetched from the identity provider (`jwks_url`, or discovery
    /// from `issuer` alone).
    pub remote: Option<JwksSettings>,
    /// The HS secret; also lets `stepgate token` mint trial tokens.
    pub hs_secret: Option<Vec<u8>>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

/// `identity.trusted_header`: an identity a proxy in front asserts.
#[derive(Debug, Clone)]
pub struct TrustedHeader {
    pub user: http::HeaderName,
    pub email: Option<http::HeaderName>,
    pub from: Vec<IpNet>,
}

/// Which claims hold the subject, email and phone.
#[derive(Debug, Clone)]
pub struct ClaimNames {
    pub subject: String,
    pub email: String,
    pub phone: String,
}

/// The `identity` settings, built by the config loader.
#[derive(Clone)]
pub struct Settings {
    pub jwt: Option<JwtSettings>,
    pub trusted_header: Option<TrustedHeader>,
    pub claims: ClaimNames,
    pub login_url: Option<String>,
}

impl JwtKeys {
    /// Load what `jwt` names. Blocking (reads files). Each failure is
    /// `(key, message)` at the config key naming the file.
    pub fn load(jwt: &JwtSettings) -> Result<JwtKeys, Vec<(&'static str, String)>> {
        let mut loaded = JwtKeys::default();
        let mut problems = Vec::new();
        if let Some(secret) = &jwt.hs_secret {
            loaded
                .keys
                .insert(String::new(), (DecodingKey::from_secret(secret), None));
        }
        if let Some(path) = &jwt.public_key {
            let alg = jwt
                .algorithms
                .iter()
                .copied()
                .find(|a| !matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
                .unwrap_or(Algorithm::RS256);
            match std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|pem| JwtKeys::decoding_key_from_pem(&pem, alg))
            {
                Ok(k) => {
                    loaded.keys.insert(String::new(), (k, None));
                }
                Err(e) => problems.push((
                    "identity.jwt.public_key",
                    format!("cannot load {}: {e}", path.display()),
                )),
            }
        }
        if let Some(path) = &jwt.jwks_file {
            match JwtKeys::load_jwks(path) {
                Ok(k) => loaded.keys.extend(k),
                Err(e) => problems.push((
                    "identity.jwt.jwks_file",
                    format!("cannot load {}: {e}", path.display()),
                )),
            }
        }
        if let Some(path) = jwt.remote.as_ref().and_then(|r| r.ca_file.as_ref()) {
            match crate::proxy::ca_certs(path) {
                Ok(certs) => loaded.ca = certs,
                Err(e) => problems.push(("identity.jwt.ca_file", format!("cannot load {e}"))),
            }
        }
        if problems.is_empty() {
            Ok(loaded)
        } else {
            Err(problems)
        }
    }

    /// A public key PEM of `alg`'s family.
    pub fn decoding_key_from_pem(pem: &[u8], alg: Algorithm) -> Result<DecodingKey, String> {
        use Algorithm::*;
        let r = match alg {
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => DecodingKey::from_rsa_pem(pem),
            ES256 | ES384 => DecodingKey::from_ec_pem(pem),
            EdDSA => DecodingKey::from_ed_pem(pem),
            HS256 | HS384 | HS512 => {
                return Err("HS algorithms take a secret, not a PEM key".into())
            }
        };
        r.map_err(|e| e.to_string())
    }

    /// Keys by `kid` from a JWKS file; a set of one key also serves
    /// tokens that name no `kid`.
    pub fn load_jwks(
        path: &Path,
    ) -> Result<HashMap<String, (DecodingKey, Option<Algorithm>)>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let mut keys = HashMap::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {i}: {e}"))?;
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            let kid = jwk.common.key_id.clone().unwrap_or_default();
            if set.keys.len() == 1 {
                keys.insert(String::new(), (key.clone(), alg));
            }
            keys.insert(kid, (key, alg));
        }
        if keys.is_empty() {
            return Err("the key set is empty".into());
        }
        Ok(keys)
    }
}
