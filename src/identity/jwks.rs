//! The keys that verify primary tokens: a fixed set from the config file,
//! or a set fetched from the identity provider (a JWKS URL, or OpenID
//! Connect discovery from the issuer) and kept fresh.
//!
//! A remote set is fetched at start, refreshed in the background (every
//! `Cache-Control: max-age`, clamped to `[min_refresh, max_refresh]`), and
//! fetched again when a token names a `kid` the set lacks — at most once per
//! `min_refresh`, one fetch at a time, so a flood of bogus kids costs the
//! provider one request. A failed fetch keeps the last good set. Until a
//! first set arrives there are no keys: every token is refused and the
//! gateway answers 503 where an identity is needed (fail closed).
//!
//! Every set carries a process-unique `generation` that changes whenever
//! the keys change, so a cache of verified tokens keyed on it can never
//! serve a token whose key was withdrawn.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{ACCEPT, AGE, CACHE_CONTROL, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::telemetry::Metrics;

/// Keys by `kid`, each with the algorithm it is restricted to (if the set
/// says). The empty `kid` holds the key for tokens that name none, when
/// there is exactly one.
pub type KeyMap = HashMap<String, (DecodingKey, Option<Algorithm>)>;

/// One whole fetch or response: connect, TLS, head and body.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest discovery document or key set read.
const MAX_BODY: usize = 1024 * 1024;
/// Refresh interval when the provider sends no `max-age` (then clamped).
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Retry after a failed fetch: 1 s, doubling, at most this.
const MAX_RETRY: Duration = Duration::from_secs(60);

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// One version of the verification keys.
pub struct KeySet {
    keys: KeyMap,
    /// Unique in this process; a new set (different keys) gets a new one.
    pub generation: u64,
    /// SHA-256 of the keys as published, to tell a changed set from a
    /// refetched identical one.
    fingerprint: [u8; 32],
    /// A token naming an unknown kid gets the default key (config-file
    /// keys: a secret or PEM key has no kid). Never for provider sets,
    /// where an unknown kid means "fetch again".
    fallback: bool,
}

impl KeySet {
    /// Keys from the config file.
    pub fn new(keys: KeyMap) -> KeySet {
        KeySet {
            keys,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            fingerprint: [0; 32],
            fallback: true,
        }
    }

    fn fetched(keys: KeyMap, fingerprint: [u8; 32]) -> KeySet {
        KeySet {
            keys,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            fingerprint,
            fallback: false,
        }
    }

    /// The key for a token's `kid` (tokens without one: the only key).
    pub fn get(&self, kid: Option<&str>) -> Option<&(DecodingKey, Option<Algorithm>)> {
        let exact = self.keys.get(kid.unwrap_or(""));
        match exact {
            None if self.fallback => self.keys.get(""),
            found => found,
        }
    }

    pub fn len(&self) -> usize {
        self.keys.keys().filter(|k| !k.is_empty()).count().max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Where a remote key set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// `identity.jwt.jwks_url`.
    Url(Uri),
    /// `identity.jwt.issuer` alone: its `/.well-known/openid-configuration`
    /// names the `jwks_uri`.
    Discovery { issuer: String },
}

/// How a remote key set is fetched and kept fresh (built by the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksSettings {
    pub source: JwksSource,
    /// Extra CA certificates (PEM) for an https provider.
    pub ca_file: Option<PathBuf>,
    /// Shortest time between refreshes, and between two fetches for
    /// unknown kids.
    pub min_refresh: Duration,
    /// Longest time a set is used without refetching it.
    pub max_refresh: Duration,
}

/// A provider URL is `https://`, or `http://` to this machine only (a key
/// set fetched in clear from elsewhere could be swapped on the way).
pub fn check_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s.parse().map_err(|_| format!("invalid URL {s:?}"))?;
    let host = uri.host().unwrap_or("");
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        _ if host.is_empty() => Err(format!("invalid URL {s:?}: no host")),
        Some("https") => Ok(uri),
        Some("http") if loopback => Ok(uri),
        Some("http") => Err(format!(
            "{s:?}: keys must be fetched over https (http only to a loopback address)"
        )),
        _ => Err(format!("invalid URL {s:?}: expected https://")),
    }
}

/// The keys the authenticator verifies with.
#[derive(Clone)]
pub enum Keys {
    Fixed(Arc<KeySet>),
    Remote(Arc<RemoteKeys>),
}

impl Keys {
    /// The current set; `None` until a remote set first arrives.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        match self {
            Keys::Fixed(set) => Some(set.clone()),
            Keys::Remote(r) => r.inner.current.load_full(),
        }
    }

    /// Whether there is a set to verify with.
    pub fn is_ready(&self) -> bool {
        match self {
            Keys::Fixed(_) => true,
            Keys::Remote(r) => r.inner.current.load().is_some(),
        }
    }

    /// The set after fetching again because a token named a `kid` the
    /// current set lacks (rate-limited; a fixed set never changes).
    pub async fn refetch_for_unknown_kid(&self) -> Option<Arc<KeySet>> {
        match self {
            Keys::Fixed(set) => Some(set.clone()),
            Keys::Remote(r) => r.refetch_for_unknown_kid().await,
        }
    }
}

/// A key set fetched from the identity provider, refreshed by a background
/// task that lives as long as this value.
pub struct RemoteKeys {
    inner: Arc<Inner>,
    task: Option<tokio::task::AbortHandle>,
}

struct Inner {
    settings: JwksSettings,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    current: ArcSwapOption<KeySet>,
    /// Held while fetching: one fetch at a time.
    fetch: tokio::sync::Mutex<FetchState>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct FetchState {
    /// The discovered `jwks_uri` (forgotten when a fetch from it fails).
    jwks_uri: Option<Uri>,
    /// When a token's unknown kid last caused a fetch.
    last_on_demand: Option<Instant>,
}

impl Drop for RemoteKeys {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl RemoteKeys {
    /// Start fetching per `settings` (in the background when a Tokio runtime
    /// is running; otherwise on the first token). `seed` is a set already
    /// fetched from the same place (a reload that changed other settings),
    /// used until the first fetch replaces it. `ca` holds the certificates
    /// of `settings.ca_file`, as the config's build step loaded them.
    pub fn start(
        settings: JwksSettings,
        ca: &[rustls_pki_types::CertificateDer<'static>],
        metrics: Arc<Metrics>,
        seed: Option<Arc<KeySet>>,
    ) -> Result<RemoteKeys, String> {
        let tls = crate::proxy::upstream_tls(ca)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(FETCH_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(https);
        let inner = Arc::new(Inner {
            settings,
            client,
            current: ArcSwapOption::new(seed),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
            metrics,
        });
        let task = tokio::runtime::Handle::try_current()
            .ok()
            .map(|rt| rt.spawn(refresh_loop(inner.clone())).abort_handle());
        Ok(RemoteKeys { inner, task })
    }

    pub fn settings(&self) -> &JwksSettings {
        &self.inner.settings
    }

    /// The current set, if any.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.inner.current.load_full()
    }

    async fn refetch_for_unknown_kid(&self) -> Option<Arc<KeySet>> {
        let seen = self.inner.current.load().as_ref().map(|s| s.generation);
        let mut st = self.inner.fetch.lock().await;
        let now = self.inner.current.load_full();
        // Another request's fetch finished while this one waited: use it.
        if now.as_ref().map(|s| s.generation) != seen {
            return now;
        }
        let min = self.inner.settings.min_refresh;
        if st.last_on_demand.is_some_and(|t| t.elapsed() < min) {
            return now;
        }
        st.last_on_demand = Some(Instant::now());
        if let Err(e) = self.inner.refresh(&mut st).await {
            tracing::warn!(error = %e, "identity provider keys: fetch for an unknown kid failed");
        }
        self.inner.current.load_full()
    }
}

/// Fetch, then wait as long as the provider says (within bounds), forever;
/// after a failure retry sooner, backing off.
async fn refresh_loop(inner: Arc<Inner>) {
    let mut failures: u32 = 0;
    loop {
        let result = {
            let mut st = inner.fetch.lock().await;
            inner.refresh(&mut st).await
        };
        let wait = match result {
            Ok(max_age) => {
                failures = 0;
                let s = &inner.settings;
                max_age
                    .unwrap_or(DEFAULT_REFRESH)
                    .clamp(s.min_refresh.max(Duration::from_secs(1)), s.max_refresh)
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = retry_after(failures).min(inner.settings.max_refresh);
                tracing::warn!(
                    error = %e,
                    retry_in_s = wait.as_secs(),
                    have_keys = inner.current.load().is_some(),
                    "identity provider keys: fetch failed; keeping the last good set"
                );
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// 1 s, 2 s, 4 s, ... at most [`MAX_RETRY`].
fn retry_after(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(16);
    Duration::from_secs(secs).min(MAX_RETRY)
}

impl Inner {
    /// Fetch the set once (discovering the JWKS URL first if needed) and
    /// install it if it changed. Returns the provider's `max-age`.
    async fn refresh(&self, st: &mut FetchState) -> Result<Option<Duration>, String> {
        let result = self.fetch_set(st).await;
        self.metrics.jwks_fetch(result.is_ok());
        let (keys, fingerprint, max_age) = result?;
        let changed = self
            .current
            .load()
            .as_ref()
            .is_none_or(|cur| cur.fingerprint != fingerprint);
        if changed {
            let set = KeySet::fetched(keys, fingerprint);
            tracing::info!(
                keys = set.len(),
                generation = set.generation,
                "identity provider keys loaded"
            );
            self.current.store(Some(Arc::new(set)));
        }
        self.metrics.jwks_loaded(crate::token::unix_now());
        Ok(max_age)
    }

    async fn fetch_set(
        &self,
        st: &mut FetchState,
    ) -> Result<(KeyMap, [u8; 32], Option<Duration>), String> {
        let uri = match (&self.settings.source, &st.jwks_uri) {
            (JwksSource::Url(u), _) => u.clone(),
            (JwksSource::Discovery { .. }, Some(u)) => u.clone(),
            (JwksSource::Discovery { issuer }, None) => {
                let u = self.discover(issuer).await?;
                st.jwks_uri = Some(u.clone());
                u
            }
        };
        let fetched = self.get(&uri).await.and_then(|(body, max_age)| {
            let (keys, fingerprint) = parse_key_set(&body)?;
            Ok((keys, fingerprint, max_age))
        });
        if fetched.is_err() {
            // The provider may have moved its keys: discover again next time.
            st.jwks_uri = None;
        }
        fetched.map_err(|e| format!("{uri}: {e}"))
    }

    /// `jwks_uri` from the issuer's discovery document, which must name
    /// exactly this issuer (OpenID Connect Discovery 1.0, section 4.3).
    async fn discover(&self, issuer: &str) -> Result<Uri, String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let uri = check_url(&url)?;
        let (body, _) = self.get(&uri).await.map_err(|e| format!("{url}: {e}"))?;
        let doc: Value =
            serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))?;
        if doc["issuer"].as_str() != Some(issuer) {
            return Err(format!(
                "{url}: names issuer {}, not {issuer:?}",
                doc["issuer"]
            ));
        }
        let jwks_uri = doc["jwks_uri"]
            .as_str()
            .ok_or_else(|| format!("{url}: no jwks_uri"))?;
        check_url(jwks_uri).map_err(|e| format!("{url}: jwks_uri {e}"))
    }

    /// GET `uri`: a 200 body (bounded) and its freshness lifetime.
    async fn get(&self, uri: &Uri) -> Result<(Bytes, Option<Duration>), String> {
        let req = Request::get(uri.clone())
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("stepgate/", env!("CARGO_PKG_VERSION")))
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let fetch = async {
            let res = self
                .client
                .request(req)
                .await
                .map_err(|e| crate::proxy::error_chain(&e))?;
            if res.status() != StatusCode::OK {
                return Err(format!("answered {}", res.status()));
            }
            let max_age = freshness(res.headers());
            let body = Limited::new(res.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the body: {e}"))?
                .to_bytes();
            Ok((body, max_age))
        };
        tokio::time::timeout(FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| format!("no answer within {}s", FETCH_TIMEOUT.as_secs()))?
    }
}

/// How long a response may be used: `max-age` less `Age`; `no-cache` and
/// `no-store` mean now. `None` when the response does not say.
fn freshness(headers: &http::HeaderMap) -> Option<Duration> {
    let mut max_age = None;
    for directive in headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let d = directive.trim();
        let (name, value) = d.split_once('=').unwrap_or((d, ""));
        match name.trim().to_ascii_lowercase().as_str() {
            "no-cache" | "no-store" => return Some(Duration::ZERO),
            "max-age" => max_age = value.trim().trim_matches('"').parse::<u64>().ok(),
            _ => {}
        }
    }
    let age = headers
        .get(AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    max_age.map(|m: u64| Duration::from_secs(m.saturating_sub(age)))
}

/// The signature keys of a published JWKS. Keys for encryption, secret
/// (`oct`) keys and keys this gateway cannot read are skipped, not fatal:
/// providers publish all of those next to their signing keys.
pub fn parse_key_set(body: &[u8]) -> Result<(KeyMap, [u8; 32]), String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let list = doc["keys"]
        .as_array()
        .ok_or("not a JWK set (no \"keys\" array)")?;
    let mut keys = KeyMap::new();
    let mut hash = Sha256::new();
    for v in list {
        let usable_kind = matches!(v["kty"].as_str(), Some("RSA" | "EC" | "OKP"));
        let for_signing = v.get("use").is_none_or(|u| u == "sig");
        if !usable_kind || !for_signing {
            continue;
        }
        let Ok(jwk) = serde_json::from_value::<Jwk>(v.clone()) else {
            continue;
        };
        let alg = match &jwk.common.key_algorithm {
            None => None,
            Some(a) => match a.to_string().parse::<Algorithm>() {
                Ok(alg) => Some(alg),
                // An encryption algorithm (RSA-OAEP, ...): not for us.
                Err(_) => continue,
            },
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        if keys.contains_key(&kid) {
            continue;
        }
        hash.update(v.to_string().as_bytes());
        keys.insert(kid, (key, alg));
    }
    if keys.len() == 1 {
        if let Some(only) = keys.values().next().cloned() {
            keys.entry(String::new()).or_insert(only);
        }
    }
    if keys.is_empty() {
        return Err("no usable signing key in the set".into());
    }
    Ok((keys, hash.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA_N: &str = "k2jdrhhgM9wxGSIcE4VNsar13gbb5Cmpwgt3SXokIk9ni6443TBuzc8x72ZRDZrKN8ZJyskUMJJvFreVEPRiEs6t1QeC5LREKUD1JuFebD6ukbi7uuGpuFiDYZZKQoX5g4YHVUv9ymDvKb-B5T7lmOYB0xnCVhtysTkC1i6pGK7tCuoBJ16j4NtuBgO2IztIpIB5lHALDpIDSGa1Au5TsMTvf3kkY4aMY0NJEoR8xG27d_37BirauU68K2JepMO_xw-b6mmYemS_Mhv628t53zRqUT93XNBhzXkjGIO4ivhHfwRuZ-oz5_UQN4f0enUtf1FWNyIzXGYtC_Eq5pz1qQ";

    fn rsa(kid: &str, extra: Value) -> Value {
        let mut k = serde_json::json!({"kty": "RSA", "kid": kid, "e": "AQAB", "n": RSA_N});
        if let (Some(k), Some(e)) = (k.as_object_mut(), extra.as_object()) {
            k.extend(e.clone());
        }
        k
    }

    #[test]
    // Keycloak publishes an RSA-OAEP encryption key next to its signing
    // key; Entra and others add keys of kinds we do not use. Those must
    // neither break the set nor be usable to verify a token.
    fn encryption_and_foreign_keys_are_skipped() {
        let set = serde_json::json!({"keys": [
            rsa("sig1", serde_json::json!({"use": "sig", "alg": "RS256"})),
            rsa("enc1", serde_json::json!({"use": "enc", "alg": "RSA-OAEP"})),
            rsa("oaep-no-use", serde_json::json!({"alg": "RSA-OAEP"})),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "XYZ", "kid": "future"},
        ]});
        let (keys, _) = parse_key_set(set.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let mut kids: Vec<_> = keys.keys().cloned().collect();
        kids.sort();
        // One signing key: also the key for tokens without a kid.
        assert_eq!(kids, vec!["".to_string(), "sig1".to_string()]);
        assert_eq!(keys["sig1"].1, Some(Algorithm::RS256));
    }

    #[test]
    // A set with nothing to verify with is an error (the last good set is kept).
    fn empty_or_malformed_set_is_an_error() {
        assert!(parse_key_set(br#"{"keys": []}"#).is_err());
        assert!(parse_key_set(br#"{"keys": [{"kty": "oct", "k": "eA"}]}"#).is_err());
        assert!(parse_key_set(b"<html>").is_err());
        assert!(parse_key_set(br#"{"nokeys": 1}"#).is_err());
    }

    #[test]
    // Two signing keys: tokens must name one (no default key).
    fn several_keys_have_no_default() {
        let set = serde_json::json!({"keys": [rsa("a", Value::Null), rsa("b", Value::Null)]});
        let (keys, fp1) =
            parse_key_set(set.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert!(!keys.contains_key(""));
        let set2 = serde_json::json!({"keys": [rsa("a", Value::Null)]});
        let (_, fp2) = parse_key_set(set2.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(fp1, fp2, "a changed set has a new fingerprint");
    }

    #[test]
    // Cache-Control is honoured: max-age less Age, no-store means refetch soon.
    fn freshness_from_cache_control() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap_or_else(|_| unreachable!()),
                    v.parse().unwrap_or_else(|_| unreachable!()),
                );
            }
            m
        };
        assert_eq!(freshness(&h(&[])), None);
        assert_eq!(
            freshness(&h(&[("cache-control", "public, max-age=600")])),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            freshness(&h(&[("cache-control", "max-age=600"), ("age", "100")])),
            Some(Duration::from_secs(500))
        );
        assert_eq!(
            freshness(&h(&[("cache-control", "no-store")])),
            Some(Duration::ZERO)
        );
        assert_eq!(freshness(&h(&[("cache-control", "max-age=junk")])), None);
    }

    #[test]
    // Keys in clear only from this machine; anything else needs https.
    fn provider_urls_need_https_off_loopback() {
        assert!(check_url("https://idp.example.com/jwks").is_ok());
        assert!(check_url("http://127.0.0.1:8080/jwks").is_ok());
        assert!(check_url("http://localhost:8080/jwks").is_ok());
        assert!(check_url("http://[::1]:8080/jwks").is_ok());
        assert!(check_url("http://idp.example.com/jwks").is_err());
        assert!(check_url("ftp://idp.example.com/jwks").is_err());
        assert!(check_url("not a url").is_err());
    }

    #[test]
    // Failed fetches back off, but never wait longer than a minute.
    fn retry_backs_off_to_a_minute() {
        assert_eq!(retry_after(1), Duration::from_secs(1));
        assert_eq!(retry_after(2), Duration::from_secs(2));
        assert_eq!(retry_after(4), Duration::from_secs(8));
        assert_eq!(retry_after(40), MAX_RETRY);
    }
}
