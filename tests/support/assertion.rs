//! The app's side of the signed assertion (CONTRACT §5.4): keys made with
//! the real openssl CLI, and verification against the key set the gateway
//! serves at `/jwks.json`, as an app would do it.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::gateway::{get, TestGateway};

/// A fresh private key from openssl: `ed25519`, `p256` or `rsa` (2048
/// bits, which the assertion refuses), as PKCS#8 PEM.
pub fn private_key(dir: &Path, kind: &str) -> PathBuf {
    let path = dir.join(format!("{kind}-{}.pem", stepgate::otp::random_id()));
    let mut cmd = std::process::Command::new("openssl");
    cmd.arg("genpkey");
    match kind {
        "ed25519" => cmd.args(["-algorithm", "ed25519"]),
        "p256" => cmd.args(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
        "rsa" => cmd.args(["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
        _ => panic!("unknown key kind {kind}"),
    };
    let out = cmd.arg("-out").arg(&path).output().expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// The key set served at `/jwks.json` on the admin listener.
pub async fn served_jwks(gw: &TestGateway) -> jsonwebtoken::jwk::JwkSet {
    let res = get(&gw.admin_url("/jwks.json"), &[]).await;
    assert_eq!(res.status, 200, "{}", res.text());
    serde_json::from_slice(&res.body).expect("a JWK set")
}

/// Verify `token` with `set`, as an app would: key by `kid`, algorithm
/// from the key, `iss` and `aud`. `Err` says why it does not verify.
pub fn verify_with(
    set: &jsonwebtoken::jwk::JwkSet,
    token: &str,
    audience: &str,
) -> Result<Value, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("no kid")?;
    let jwk = set.find(&kid).ok_or("the kid is not in the set")?;
    let alg: jsonwebtoken::Algorithm = jwk
        .common
        .key_algorithm
        .ok_or("no alg")?
        .to_string()
        .parse()
        .map_err(|_| "not a signature algorithm")?;
    if alg != header.alg {
        return Err(format!("alg {:?} for a {alg:?} key", header.alg));
    }
    let mut v = jsonwebtoken::Validation::new(alg);
    v.set_audience(&[audience]);
    v.set_issuer(&["stepgate"]);
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

/// Verify `token` with the key set the gateway serves now; panics when it
/// does not verify.
pub async fn verify_assertion(gw: &TestGateway, token: &str, audience: &str) -> Value {
    let set = served_jwks(gw).await;
    verify_with(&set, token, audience)
        .unwrap_or_else(|e| panic!("the assertion does not verify with the served key: {e}"))
}
