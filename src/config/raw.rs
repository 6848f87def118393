//! The serde schema of the config file, as written: every struct refuses
//! unknown keys, every value is optional here (defaults and requirements
//! are the validator's), and every string is a [`Str`] that `env.rs`
//! substitutes `${NAME}` in after parsing.

use serde::Deserialize;

pub use super::env::Str;
use super::env::{join, Strings};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub listen: Option<Listen>,
    pub admin: Option<Admin>,
    pub upstream: Option<Upstream>,
    pub identity: Option<Identity>,
    pub stepup: Option<Stepup>,
    pub store: Option<Store>,
    #[serde(default)]
    pub routes: Vec<Route>,
    pub default: Option<Str>,
    pub log: Option<Log>,
    pub dev: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub address: Option<Str>,
    pub tls: Option<Tls>,
    pub max_header_bytes: Option<u64>,
    pub max_uri_bytes: Option<u64>,
    pub header_read_timeout: Option<Str>,
    pub drain_timeout: Option<Str>,
    pub trusted_proxies: Option<Vec<Str>>,
    pub max_connections: Option<u64>,
    pub workers: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: Str,
    pub key: Str,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub address: Option<Str>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub url: Option<Str>,
    pub connect_timeout: Option<Str>,
    pub timeout: Option<Str>,
    pub ca_file: Option<Str>,
    pub pool_idle_timeout: Option<Str>,
    pub pool_max_idle_per_host: Option<u64>,
    pub assertion: Option<Assertion>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assertion {
    pub signing_key_file: Option<Str>,
    pub header: Option<Str>,
    pub audience: Option<Str>,
    pub lifetime: Option<Str>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub jwt: Option<Jwt>,
    pub trusted_header: Option<TrustedHeader>,
    pub claims: Option<Claims>,
    pub login_url: Option<Str>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Jwt {
    pub from: Option<Vec<Str>>,
    pub cookie: Option<Str>,
    pub algorithms: Option<Vec<Str>>,
    pub secret: Option<Str>,
    pub secret_file: Option<Str>,
    pub public_key: Option<Str>,
    pub jwks_file: Option<Str>,
    pub jwks_url: Option<Str>,
    pub ca_file: Option<Str>,
    pub jwks_min_refresh: Option<Str>,
    pub jwks_max_refresh: Option<Str>,
    pub issuer: Option<Str>,
    pub audience: Option<Str>,
    pub leeway: Option<Str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedHeader {
    pub user: Str,
    pub email: Option<Str>,
    pub from: Vec<Str>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    pub subject: Option<Str>,
    pub email: Option<Str>,
    pub phone: Option<Str>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Stepup {
    pub prefix: Option<Str>,
    pub otp: Option<Otp>,
    pub token: Option<Token>,
    pub email: Option<Email>,
    pub sms: Option<Sms>,
    pub console: Option<bool>,
    pub branding: Option<Branding>,
    pub stash_max_bytes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Otp {
    pub length: Option<u64>,
    pub ttl: Option<Str>,
    pub allow_long_ttl: Option<bool>,
    pub max_attempts: Option<u64>,
    pub resend_after: Option<Str>,
    pub max_sends: Option<u64>,
    pub max_sends_per_client: Option<u64>,
    pub lockout: Option<Str>,
    pub max_failures: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub signing_key: Option<Str>,
    pub signing_key_file: Option<Str>,
    pub hash_key: Option<Str>,
    pub hash_key_file: Option<Str>,
    pub lifetime: Option<Str>,
    pub cookie: Option<Str>,
    pub header: Option<Str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Email {
    pub smtp: Smtp,
    pub from: Str,
    pub subject: Option<Str>,
    pub timeout: Option<Str>,
    pub hourly_budget: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smtp {
    pub host: Str,
    pub port: Option<u64>,
    pub security: Option<Str>,
    pub username: Option<Str>,
    pub password: Option<Str>,
    pub password_file: Option<Str>,
    pub ca_file: Option<Str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sms {
    pub webhook: Option<Webhook>,
    pub twilio: Option<Twilio>,
    pub timeout: Option<Str>,
    pub hourly_budget: Option<u64>,
    pub allowed_countries: Option<Vec<Str>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: Str,
    pub auth_header: Option<Str>,
    pub auth_header_file: Option<Str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Twilio {
    pub account_sid: Str,
    pub auth_token: Option<Str>,
    pub auth_token_file: Option<Str>,
    pub from: Str,
    pub base_url: Option<Str>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Branding {
    pub product: Option<Str>,
    pub logo_url: Option<Str>,
    pub accent: Option<Str>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Store {
    pub redis: Option<Str>,
    pub redis_cluster: Option<Vec<Str>>,
    pub prefix: Option<Str>,
    pub max_entries: Option<u64>,
    pub ca_file: Option<Str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: Option<Str>,
    pub path: Option<Str>,
    pub path_regex: Option<Str>,
    pub methods: Option<Vec<Str>>,
    pub hosts: Option<Vec<Str>>,
    pub stepup: Option<RouteStepup>,
    pub public: Option<bool>,
    pub deny: Option<bool>,
    pub case_insensitive: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteStepup {
    pub max_age: Option<Str>,
    pub factors: Option<Vec<Str>>,
    pub one_time: Option<bool>,
    pub idp: Option<RouteIdp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteIdp {
    pub amr: Option<Vec<Str>>,
    pub acr: Option<Vec<Str>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub format: Option<Str>,
    pub level: Option<Str>,
}

/// Implements [`Strings`] for each struct: every field, by name. The
/// pattern lists the fields without `..`, so a new field that is not added
/// here does not compile (and could not escape substitution).
macro_rules! strings {
    ($($ty:ident { $($field:ident),* $(,)? })*) => {$(
        impl Strings for $ty {
            fn each_string(&mut self, path: &str, f: &mut dyn FnMut(&str, &mut Str)) {
                let $ty { $($field),* } = self;
                $($field.each_string(&join(path, stringify!($field)), f);)*
            }
        }
    )*};
}

strings! {
    File { listen, admin, upstream, identity, stepup, store, routes, default, log, dev }
    Listen { address, tls, max_header_bytes, max_uri_bytes, header_read_timeout, drain_timeout, trusted_proxies, max_connections, workers }
    Tls { cert, key }
    Admin { address }
    Upstream { url, connect_timeout, timeout, ca_file, pool_idle_timeout, pool_max_idle_per_host, assertion }
    Assertion { signing_key_file, header, audience, lifetime }
    Identity { jwt, trusted_header, claims, login_url }
    Jwt { from, cookie, algorithms, secret, secret_file, public_key, jwks_file, jwks_url, ca_file, jwks_min_refresh, jwks_max_refresh, issuer, audience, leeway }
    TrustedHeader { user, email, from }
    Claims { subject, email, phone }
    Stepup { prefix, otp, token, email, sms, console, branding, stash_max_bytes }
    Otp { length, ttl, allow_long_ttl, max_attempts, resend_after, max_sends, max_sends_per_client, lockout, max_failures }
    Token { signing_key, signing_key_file, hash_key, hash_key_file, lifetime, cookie, header }
    Email { smtp, from, subject, timeout, hourly_budget }
    Smtp { host, port, security, username, password, password_file, ca_file }
    Sms { webhook, twilio, timeout, hourly_budget, allowed_countries }
    Webhook { url, auth_header, auth_header_file }
    Twilio { account_sid, auth_token, auth_token_file, from, base_url }
    Branding { product, logo_url, accent }
    Store { redis, redis_cluster, prefix, max_entries, ca_file }
    Route { name, path, path_regex, methods, hosts, stepup, public, deny, case_insensitive }
    RouteStepup { max_age, factors, one_time, idp }
    RouteIdp { amr, acr }
    Log { format, level }
}
