//! Primary identity: who the signed-in user is, from a JWT (bearer header or
//! cookie) or from a header set by a trusted proxy in front.
//!
//! The result travels in request extensions as [`Identity`]; the session it
//! names is what second-factor tokens are bound to. Verification keys come
//! from the config or from the identity provider (`jwks.rs`).

mod credentials;
pub mod jwks;
mod settings;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::HeaderMap;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use self::jwks::{KeySet, Keys, RemoteKeys};
pub use self::settings::{ClaimNames, JwtKeys, JwtSettings, Settings, TrustedHeader};
use crate::telemetry::Metrics;

/// The signed-in user behind a request.
#[derive(Debug, Clone)]
pub struct Identity {
    pub subject: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    /// The primary session: `sid:<sid claim>`, else `jwt:<hash of the
    /// token>`, else `hdr:<subject>` for trusted-header identities.
    pub session: String,
    /// [`session_binding`](crate::token::session_binding) of `session`,
    /// what second-factor tokens are bound to: made with a JWT identity
    /// (so a cached token carries it), on first use for the others.
    pub(crate) binding: std::sync::OnceLock<[u8; 24]>,
    /// What the sign-in at the identity provider proved (the token's
    /// `amr`, `acr` and `auth_time` claims; empty for trusted headers).
    pub amr: Vec<String>,
    pub acr: Option<String>,
    pub auth_time: Option<u64>,
}

/// Equal when every claim is: the binding follows from the session,
/// whether it has been made yet or not.
impl PartialEq for Identity {
    fn eq(&self, other: &Identity) -> bool {
        self.subject == other.subject
            && self.email == other.email
            && self.phone == other.phone
            && self.session == other.session
            && self.amr == other.amr
            && self.acr == other.acr
            && self.auth_time == other.auth_time
    }
}

impl Eq for Identity {}

impl Identity {
    /// [`session_binding`](crate::token::session_binding) of `session`.
    pub fn session_binding(&self) -> &[u8; 24] {
        self.binding
            .get_or_init(|| crate::token::session_binding(&self.session))
    }
}

/// Why a presented credential was not accepted. Never shown to clients in
/// detail; logged at debug level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("token header unreadable")]
    Header,
    #[error("algorithm {0:?} is not allowed")]
    Algorithm(Algorithm),
    #[error("no key for kid {0:?}")]
    UnknownKey(String),
    #[error("token rejected: {0}")]
    Rejected(String),
    #[error("claim {0:?} missing or not a string")]
    Claim(String),
    /// More than one different primary credential: the gateway would check
    /// one and the app might read another, so the request is refused.
    #[error("more than one primary credential")]
    Ambiguous,
    /// The identity provider's keys have not been fetched yet.
    #[error("no keys from the identity provider yet")]
    KeysUnavailable,
}

/// Verified primary tokens kept at most (per policy generation).
pub const TOKEN_CACHE_ENTRIES: usize = 10_000;

/// Identities of primary tokens that passed full verification, so a token
/// presented again is not verified again (an RS256 check costs a few
/// hundred microseconds). The key is the SHA-256 of the whole token plus
/// the generation of the key set it was verified with (a new JWKS from the
/// identity provider has a new one) and this cache's own generation; an
/// entry is used only until the token's `exp` (plus the configured leeway,
/// exactly as verification allows it), and [`TokenCache::bump_generation`]
/// forgets every entry. Tokens that fail verification are never cached.
pub struct TokenCache {
    entries: quick_cache::sync::Cache<CacheKey, CachedIdentity>,
    generation: AtomicU64,
}

/// SHA-256 of the token, key-set generation, cache generation.
type CacheKey = ([u8; 32], u64, u64);

#[derive(Clone)]
struct CachedIdentity {
    /// Shared with the requests it serves: a hit costs no copy of the
    /// claims.
    identity: Arc<Identity>,
    /// Unix seconds after which the token is expired (`exp` + leeway).
    valid_until: u64,
}

impl TokenCache {
    pub fn new(capacity: usize) -> TokenCache {
        TokenCache {
            entries: quick_cache::sync::Cache::new(capacity.max(1)),
            generation: AtomicU64::new(0),
        }
    }

    /// This cache's generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Forget every cached identity (a new key set gets a new generation of
    /// its own and needs no bump). A verification that started before the bump stores
    /// its result under the old generation, where it is never found.
    pub fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.entries.clear();
    }

    /// Cached identities (for tests and metrics).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn get(&self, key: &CacheKey, now: u64) -> Option<Arc<Identity>> {
        let hit = self.entries.get(key)?;
        if now > hit.valid_until {
            self.entries.remove(key);
            return None;
        }
        Some(hit.identity)
    }
}

/// Turns request headers into an [`Identity`].
#[derive(Clone)]
pub struct Authenticator {
    cfg: Settings,
    /// JWT verification keys (`None` without `identity.jwt`).
    keys: Option<Keys>,
    /// One `Validation` per accepted algorithm, built once per policy.
    validations: Arc<[(Algorithm, Validation)]>,
    cache: Arc<TokenCache>,
}

impl Authenticator {
    /// Keys fetched from the identity provider are taken over from
    /// `previous` (the authenticator of the policy being replaced) when
    /// they come from the same place, so a reload neither refetches them
    /// nor fails closed meanwhile. `loaded` is what the config's build
    /// step loaded for `cfg.jwt` (keys, CA certificates).
    pub fn new(
        cfg: &Settings,
        loaded: &JwtKeys,
        metrics: &Arc<Metrics>,
        previous: Option<&Authenticator>,
    ) -> Result<Authenticator, String> {
        let keys = match cfg.jwt.as_ref().map(|j| (j, &j.remote)) {
            None => None,
            Some((_, Some(settings))) => {
                let old = previous.and_then(|p| match &p.keys {
                    Some(Keys::Remote(r)) => Some(r),
                    _ => None,
                });
                Some(Keys::Remote(match old {
                    Some(r) if r.settings() == settings => r.clone(),
                    // Same place, other bounds: keep serving the keys we
                    // have while the new fetcher starts.
                    _ => {
                        let seed = old
                            .filter(|r| {
                                r.settings().source == settings.source
                                    && r.settings().ca_file == settings.ca_file
                            })
                            .and_then(|r| r.current());
                        Arc::new(RemoteKeys::start(
                            settings.clone(),
                            &loaded.ca,
                            metrics.clone(),
                            seed,
                        )?)
                    }
                }))
            }
            Some((_, None)) => Some(Keys::Fixed(Arc::new(KeySet::new(loaded.keys.clone())))),
        };
        let validations = cfg
            .jwt
            .as_ref()
            .map(|jwt| {
                jwt.algorithms
                    .iter()
                    .map(|&alg| (alg, validation(jwt, alg)))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        Ok(Authenticator {
            cfg: cfg.clone(),
            keys,
            validations: validations.into(),
            cache: Arc::new(TokenCache::new(TOKEN_CACHE_ENTRIES)),
        })
    }

    /// The cache of verified primary tokens.
    pub fn token_cache(&self) -> &Arc<TokenCache> {
        &self.cache
    }

    /// Forget every cached verified token.
    pub fn bump_generation(&self) {
        self.cache.bump_generation();
    }

    /// Whether JWTs can be verified: false until the identity provider's
    /// keys first arrive (requests needing an identity then fail closed).
    pub fn keys_ready(&self) -> bool {
        self.keys.as_ref().is_none_or(Keys::is_ready)
    }

    /// The generation of the current key set: changes whenever the keys
    /// do, so caches of verified tokens must include it in their key.
    pub fn key_generation(&self) -> Option<u64> {
        self.keys.as_ref()?.current().map(|s| s.generation)
    }

    /// Whether `peer` may assert identity by header.
    pub fn trusts_header_from(&self, peer: IpAddr) -> bool {
        self.cfg
            .trusted_header
            .as_ref()
            .is_some_and(|t| t.from.iter().any(|n| n.contains(&peer)))
    }

    /// Header names that carry asserted identity (stripped from requests
    /// of untrusted peers before anything else sees them).
    pub fn trusted_header_names(&self) -> impl Iterator<Item = &http::HeaderName> {
        self.cfg
            .trusted_header
            .iter()
            .flat_map(|t| std::iter::once(&t.user).chain(t.email.iter()))
    }

    /// The identity in `headers`, if any. `Ok(None)` when no credential was
    /// presented; `Err` when one was presented and is not valid, or when a
    /// primary token has another credential beside it in the headers or
    /// the request's `query` (`credentials.rs`).
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        peer: IpAddr,
    ) -> Result<Option<Identity>, IdentityError> {
        self.authenticate_shared(headers, query, peer)
            .await
            .map(|id| id.map(Arc::unwrap_or_clone))
    }

    /// [`authenticate`](Self::authenticate), the identity shared with the
    /// verified-token cache instead of copied out of it (what the gateway
    /// puts in a request's extensions).
    pub async fn authenticate_shared(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        peer: IpAddr,
    ) -> Result<Option<Arc<Identity>>, IdentityError> {
        if let Some(jwt) = &self.cfg.jwt {
            if let Some(token) = credentials::primary_token(jwt, headers, query)? {
                return self.verify_jwt(jwt, token).await.map(Some);
            }
        }
        if let Some(t) = &self.cfg.trusted_header {
            if self.trusts_header_from(peer) {
                let user = headers
                    .get(&t.user)
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim);
                if let Some(user) = user.filter(|u| !u.is_empty()) {
                    let email = t
                        .email
                        .as_ref()
                        .and_then(|h| headers.get(h))
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let session = format!("hdr:{user}");
                    return Ok(Some(Arc::new(Identity {
                        subject: user.to_string(),
                        email,
                        phone: None,
                        binding: std::sync::OnceLock::new(),
                        session,
                        amr: Vec::new(),
                        acr: None,
                        auth_time: None,
                    })));
                }
            }
        }
        Ok(None)
    }

    async fn verify_jwt(
        &self,
        jwt: &JwtSettings,
        token: &str,
    ) -> Result<Arc<Identity>, IdentityError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = crate::token::unix_now();
        // Only a token verified with the current key set is served from
        // the cache.
        let set_generation = self
            .keys
            .as_ref()
            .and_then(|k| k.current())
            .map(|s| s.generation);
        let key = set_generation.map(|g| (digest, g, self.cache.generation()));
        if let Some(key) = &key {
            if let Some(id) = self.cache.get(key, now) {
                return Ok(id);
            }
        }
        // Boxed: off the cached path, and large (it may fetch the key
        // set); inline, it would make every request's future ~2 KB bigger.
        let (id, exp, used_generation) = Box::pin(self.verify_uncached(token, &digest)).await?;
        let id = Arc::new(id);
        if let (Some(exp), Some(key)) = (exp, key) {
            let valid_until = exp.saturating_add(jwt.leeway.as_secs());
            // Cached under the generation of the set that verified it.
            if valid_until >= now && key.1 == used_generation {
                self.cache.entries.insert(
                    key,
                    CachedIdentity {
                        identity: id.clone(),
                        valid_until,
                    },
                );
            }
        }
        Ok(id)
    }

    /// Full verification: signature, algorithm, key, `exp`/`nbf`, `iss`,
    /// `aud`, claims. Returns the identity, the token's `exp` and the
    /// generation of the key set that verified it.
    async fn verify_uncached(
        &self,
        token: &str,
        digest: &[u8; 32],
    ) -> Result<(Identity, Option<u64>, u64), IdentityError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| IdentityError::Header)?;
        // The gateway's own second-factor tokens are never primary
        // credentials, even if an operator reused one key for both.
        if header.typ.as_deref() == Some(crate::token::TOKEN_TYPE) {
            return Err(IdentityError::Header);
        }
        let Some((_, v)) = self.validations.iter().find(|(a, _)| *a == header.alg) else {
            return Err(IdentityError::Algorithm(header.alg));
        };
        let keys = self.keys.as_ref().ok_or(IdentityError::KeysUnavailable)?;
        let kid = header.kid.as_deref();
        let mut set = keys.current();
        if set.as_ref().is_none_or(|s| s.get(kid).is_none()) {
            // A key the provider rotated in since the last fetch (or the
            // first set, still missing): fetch again, rate-limited.
            set = keys.refetch_for_unknown_kid().await;
        }
        let set = set.ok_or(IdentityError::KeysUnavailable)?;
        let (key, key_alg) = set
            .get(kid)
            .ok_or_else(|| IdentityError::UnknownKey(kid.unwrap_or_default().to_string()))?;
        if key_alg.is_some_and(|a| a != header.alg) {
            return Err(IdentityError::Algorithm(header.alg));
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, v)
            .map_err(|e| IdentityError::Rejected(e.to_string()))?;
        let claims = data.claims;
        if claims.get("aud").and_then(Value::as_str) == Some(crate::token::AUDIENCE) {
            return Err(IdentityError::Header);
        }
        let names = &self.cfg.claims;
        let subject = string_claim(&claims, &names.subject)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| IdentityError::Claim(names.subject.clone()))?;
        let session = match string_claim(&claims, "sid") {
            Some(sid) if !sid.is_empty() => format!("sid:{sid}"),
            _ => format!("jwt:{}", URL_SAFE_NO_PAD.encode(digest)),
        };
        // jsonwebtoken accepted `exp` as a number; a fractional one is
        // rounded down (the token is cached for less, never longer).
        let exp = claims.get("exp").and_then(|e| {
            e.as_u64()
                .or_else(|| e.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        });
        let identity = Identity {
            subject,
            email: string_claim(&claims, &names.email),
            phone: string_claim(&claims, &names.phone),
            binding: crate::token::session_binding(&session).into(),
            session,
            amr: match claims.get("amr") {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
                Some(Value::String(s)) => vec![s.clone()],
                _ => Vec::new(),
            },
            acr: string_claim(&claims, "acr"),
            auth_time: claims.get("auth_time").and_then(|t| {
                t.as_u64()
                    .or_else(|| t.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            }),
        };
        Ok((identity, exp, set.generation))
    }
}

/// The checks every primary token of algorithm `alg` must pass.
fn validation(jwt: &JwtSettings, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = jwt.leeway.as_secs();
    v.set_required_spec_claims(&["exp"]);
    v.validate_exp = true;
    v.validate_nbf = true;
    match &jwt.issuer {
        Some(iss) => {
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".into());
        }
        None => v.iss = None,
    }
    match &jwt.audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            v.required_spec_claims.insert("aud".into());
        }
        None => v.validate_aud = false,
    }
    v
}

fn string_claim(claims: &Map<String, Value>, name: &str) -> Option<String> {
    claims.get(name).and_then(Value::as_str).map(str::to_string)
}

#[cfg(test)]
mod sf_tests {
    use super::*;
    use crate::config::Config;
    use http::header::AUTHORIZATION;

    #[tokio::test]
    // With one key for both, a second-factor token still never passes as a
    // primary token (typ and audience are the gateway's own).
    async fn second_factor_token_is_not_a_primary_token() {
        let key = "shared-key-0123456789abcdef0123456789";
        let yaml = format!(
            "upstream: {{ url: http://127.0.0.1:1 }}\nidentity:\n  jwt: {{ algorithms: [HS256], secret: {key} }}\nstepup:\n  token: {{ signing_key: {key} }}\n  console: true\ndev: true\n"
        );
        let cfg = Config::from_yaml(std::path::Path::new("t.yaml"), &yaml, &Default::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let sf = crate::token::Tokens::new(&cfg.stepup.token)
            .unwrap_or_else(|e| panic!("{e}"))
            .issue("alice", "sid:1", crate::channel::Channel::Email)
            .unwrap_or_default();
        let auth = Authenticator::new(
            &cfg.identity,
            &cfg.built.jwt_keys,
            &Default::default(),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            format!("Bearer {sf}")
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
        assert!(auth
            .authenticate(&h, None, IpAddr::from([127, 0, 0, 1]))
            .await
            .is_err());
        // A same-key token without the gateway's typ but with its audience is refused too.
        let claims = serde_json::json!({"sub": "alice", "exp": crate::token::unix_now() + 60, "aud": crate::token::AUDIENCE});
        let forged = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap_or_default();
        h.insert(
            AUTHORIZATION,
            format!("Bearer {forged}")
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
        assert!(auth
            .authenticate(&h, None, IpAddr::from([127, 0, 0, 1]))
            .await
            .is_err());
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use crate::config::Config;
    use http::header::AUTHORIZATION;

    const KEY: &str = "cache-test-primary-key-0123456789abcdef";

    fn authenticator(leeway: &str) -> Authenticator {
        let yaml = format!(
            "upstream: {{ url: http://127.0.0.1:1 }}\nidentity:\n  jwt: {{ algorithms: [HS256], secret: {KEY}, leeway: {leeway} }}\nstepup:\n  token: {{ signing_key: other-key-0123456789abcdef0123456789 }}\n  console: true\ndev: true\n"
        );
        let cfg = Config::from_yaml(std::path::Path::new("t.yaml"), &yaml, &Default::default())
            .unwrap_or_else(|e| panic!("{e}"));
        Authenticator::new(
            &cfg.identity,
            &cfg.built.jwt_keys,
            &Default::default(),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Where `auth`'s verified-token cache files token `t` now.
    fn cache_key(auth: &Authenticator, t: &str) -> CacheKey {
        let digest: [u8; 32] = Sha256::digest(t.as_bytes()).into();
        (
            digest,
            auth.key_generation().unwrap_or_default(),
            auth.token_cache().generation(),
        )
    }

    fn token(exp: u64) -> String {
        let claims = serde_json::json!({"sub": "alice", "exp": exp, "sid": "s1"});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(KEY.as_bytes()),
        )
        .unwrap_or_default()
    }

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            format!("Bearer {token}")
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
        h
    }

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn signed(claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(KEY.as_bytes()),
        )
        .unwrap_or_default()
    }

    async fn identity_of(auth: &Authenticator, claims: serde_json::Value) -> Identity {
        match auth
            .authenticate(&headers(&signed(&claims)), None, PEER)
            .await
        {
            Ok(Some(id)) => id,
            other => panic!("{claims} refused: {other:?}"),
        }
    }

    #[tokio::test]
    // The claims an identity is made of, in each form a provider may send
    // them: `amr` as a list or as one string (anything else is no method),
    // a fractional `auth_time` (rounded down), and an empty `sid`, which
    // names no session: the token's own hash does, so two sign-ins with
    // empty `sid`s never share a session (nor second-factor tokens).
    async fn claims_in_every_form() {
        let auth = authenticator("0s");
        let now = crate::token::unix_now();
        let exp = now + 600;
        let claims = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"sub": "alice", "exp": exp});
            if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
                c.extend(extra.clone());
            }
            c
        };
        let id = identity_of(&auth, claims(serde_json::json!({"amr": ["pwd", "otp"]}))).await;
        assert_eq!(id.amr, ["pwd", "otp"]);
        let id = identity_of(&auth, claims(serde_json::json!({"amr": "mfa"}))).await;
        assert_eq!(id.amr, ["mfa"]);
        let id = identity_of(&auth, claims(serde_json::json!({"amr": 7}))).await;
        assert!(id.amr.is_empty());
        let t = now - 30;
        let id = identity_of(&auth, claims(serde_json::json!({"auth_time": t}))).await;
        assert_eq!(id.auth_time, Some(t));
        let frac = serde_json::json!({"auth_time": t as f64 + 0.75});
        let id = identity_of(&auth, claims(frac)).await;
        assert_eq!(id.auth_time, Some(t));
        let id = identity_of(&auth, claims(serde_json::json!({"auth_time": -5.5}))).await;
        assert_eq!(id.auth_time, None);
        let id = identity_of(&auth, claims(serde_json::json!({"sid": "s9"}))).await;
        assert_eq!(id.session, "sid:s9");
        let a = identity_of(&auth, claims(serde_json::json!({"sid": ""}))).await;
        let b = identity_of(&auth, claims(serde_json::json!({"sid": "", "jti": "2"}))).await;
        assert!(a.session.starts_with("jwt:"), "{}", a.session);
        assert_ne!(a.session, b.session);
        assert_ne!(a.session_binding(), b.session_binding());
    }

    #[tokio::test]
    // A fractional `exp` (jsonwebtoken rounds it to verify) is cached until
    // the whole second below it plus the leeway: never longer than the
    // token is accepted.
    async fn fractional_exp_is_cached_until_its_whole_second() {
        let auth = authenticator("0s");
        let now = crate::token::unix_now();
        let t = signed(&serde_json::json!({"sub": "alice", "exp": (now + 600) as f64 + 0.5}));
        assert!(auth.authenticate(&headers(&t), None, PEER).await.is_ok());
        assert_eq!(auth.token_cache().len(), 1, "verified token is cached");
        let key = cache_key(&auth, &t);
        assert!(auth.token_cache().get(&key, now + 600).is_some());
        assert!(auth.token_cache().get(&key, now + 601).is_none());
    }

    #[test]
    // Each key set has its own generation (what cached tokens are filed
    // under); without JWT keys there is none.
    fn each_key_set_has_its_own_generation() {
        let (a, b) = (authenticator("0s"), authenticator("0s"));
        assert!(a.key_generation().is_some());
        assert_ne!(a.key_generation(), b.key_generation());
        let yaml = "upstream: { url: http://127.0.0.1:1 }\nidentity:\n  trusted_header: { user: X-User, from: [127.0.0.1/32] }\nstepup:\n  token: { signing_key: other-key-0123456789abcdef0123456789 }\n  console: true\ndev: true\n";
        let cfg = Config::from_yaml(std::path::Path::new("t.yaml"), yaml, &Default::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let none = Authenticator::new(
            &cfg.identity,
            &cfg.built.jwt_keys,
            &Default::default(),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(none.key_generation(), None);
    }

    #[tokio::test]
    // A cached token is refused once its exp has passed: the cache never
    // extends a token's life.
    async fn cached_token_is_refused_after_exp() {
        let auth = authenticator("0s");
        let exp = crate::token::unix_now() + 1;
        let h = headers(&token(exp));
        let id = auth.authenticate(&h, None, PEER).await;
        assert_eq!(id.map(|i| i.map(|i| i.subject)), Ok(Some("alice".into())));
        assert_eq!(auth.token_cache().len(), 1, "verified token is cached");
        // Served from the cache while valid, with the binding of its own
        // session (what second-factor tokens are checked against).
        let cached = auth.authenticate(&h, None, PEER).await;
        let binding = cached.map(|i| i.map(|i| (i.session.clone(), i.binding.get().copied())));
        assert_eq!(
            binding,
            Ok(Some((
                "sid:s1".to_string(),
                Some(crate::token::session_binding("sid:s1"))
            )))
        );
        assert_eq!(
            crate::token::session_binding("sid:s1"),
            crate::token::session_hash("sid:s1").as_bytes()
        );
        // Wait for the wall clock to pass exp (not a synchronisation sleep:
        // the condition is time itself).
        while crate::token::unix_now() <= exp {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            auth.authenticate(&h, None, PEER).await.is_err(),
            "expired token refused"
        );
        assert_eq!(auth.token_cache().len(), 0, "expired entry dropped");
    }

    #[tokio::test]
    // The cache lookup itself refuses an entry past exp + leeway, whatever
    // the verification would say.
    async fn cache_entry_ends_at_exp_plus_leeway() {
        let auth = authenticator("5s");
        let now = crate::token::unix_now();
        let t = token(now + 60);
        assert!(auth.authenticate(&headers(&t), None, PEER).await.is_ok());
        let key = cache_key(&auth, &t);
        assert!(auth.token_cache().get(&key, now + 65).is_some());
        assert!(auth.token_cache().get(&key, now + 66).is_none());
        assert!(auth.token_cache().is_empty());
    }

    #[tokio::test]
    // A key change (generation bump) forgets every cached token, and a
    // verification that finished under the old keys is never served again.
    async fn key_change_invalidates_cached_tokens() {
        let auth = authenticator("0s");
        let now = crate::token::unix_now();
        let t = token(now + 600);
        assert!(auth.authenticate(&headers(&t), None, PEER).await.is_ok());
        let digest: [u8; 32] = Sha256::digest(t.as_bytes()).into();
        let set = auth.key_generation().unwrap_or_default();
        let old = auth.token_cache().generation();
        assert!(auth.token_cache().get(&(digest, set, old), now).is_some());
        auth.bump_generation();
        assert!(auth.token_cache().is_empty());
        let new = auth.token_cache().generation();
        assert_ne!(old, new);
        assert!(auth.token_cache().get(&(digest, set, new), now).is_none());
        // A late insert under the old generation is invisible.
        auth.token_cache().entries.insert(
            (digest, set, old),
            CachedIdentity {
                identity: Arc::new(Identity {
                    subject: "mallory".into(),
                    email: None,
                    phone: None,
                    session: "sid:x".into(),
                    binding: std::sync::OnceLock::new(),
                    amr: Vec::new(),
                    acr: None,
                    auth_time: None,
                }),
                valid_until: now + 600,
            },
        );
        let id = auth.authenticate(&headers(&t), None, PEER).await;
        assert_eq!(id.map(|i| i.map(|i| i.subject)), Ok(Some("alice".into())));
    }

    #[tokio::test]
    // Tokens that fail verification are not cached.
    async fn refused_tokens_are_not_cached() {
        let auth = authenticator("0s");
        let mut t = token(crate::token::unix_now() + 600);
        t.push('x');
        assert!(auth.authenticate(&headers(&t), None, PEER).await.is_err());
        assert!(auth.token_cache().is_empty());
    }
}
