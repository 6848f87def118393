//! Forward-auth (`{prefix}/auth`, CONTRACT §5.1): a proxy in front
//! (ingress-nginx, nginx `auth_request`, Traefik `ForwardAuth`, Caddy
//! `forward_auth`, Envoy `ext_authz`) asks whether a request may pass and
//! forwards it itself. Two pieces of the pipeline differ from proxy mode:
//! the source of the request being decided ([`original`], read from the
//! proxy's headers) and the terminal ([`answer`]: 200 with the identity
//! headers, and the signed assertion when configured, for the proxy to
//! copy upstream).

use http::header::{HeaderValue, CACHE_CONTROL};
use http::{HeaderName, Method, Request, Response, StatusCode, Uri};

use super::forward::{set_identity_headers, sign_assertion, IDENTITY_HEADERS};
use super::normalise::valid_host;
use super::{Exchange, State};
use crate::http::{empty, Body, Rejection};
use crate::telemetry::Outcome;

const X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
const X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
const X_ORIGINAL_URL: HeaderName = HeaderName::from_static("x-original-url");

/// `{prefix}/auth`, or below it (Envoy's `ext_authz` appends the original
/// path to the configured one; the original is read from headers anyway).
pub(super) fn is_endpoint(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix("/auth"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The original request, as the proxy in front describes it.
pub(super) struct Original {
    pub method: Method,
    /// The host, when the headers name one (else the `Host` of the auth
    /// request, which proxies keep or set to the original host).
    pub host: Option<String>,
    /// Path and query as the client sent them (not yet normalised).
    pub target: String,
    /// Traefik/Caddy style (may answer 302); nginx style never does.
    pub redirects: bool,
}

/// Read the original request from `X-Forwarded-Method/-Proto/-Host/-Uri`
/// (Traefik/Caddy) or `X-Original-Method` + `X-Original-URL` (nginx,
/// ingress-nginx; absolute or a path). Only trusted proxies are believed.
pub(super) fn original(req: &Request<Body>, trusted_proxy: bool) -> Result<Original, Rejection> {
    if !trusted_proxy {
        return Err(Rejection::UntrustedPeer);
    }
    if let Some(uri) = one(req, &X_FORWARDED_URI)? {
        let method = one(req, &X_FORWARDED_METHOD)?
            .ok_or(Rejection::MissingOriginal("X-Forwarded-Method is required"))?;
        return Ok(Original {
            method: method_of(method)?,
            host: valid_host(one(req, &X_FORWARDED_HOST)?)?,
            target: uri.to_string(),
            redirects: true,
        });
    }
    if let Some(url) = one(req, &X_ORIGINAL_URL)? {
        let method = one(req, &X_ORIGINAL_METHOD)?
            .ok_or(Rejection::MissingOriginal("X-Original-Method is required"))?;
        let (host, target) = if url.starts_with('/') {
            (valid_host(one(req, &X_FORWARDED_HOST)?)?, url.to_string())
        } else {
            let uri: Uri = url
                .parse()
                .map_err(|_| Rejection::MissingOriginal("X-Original-URL is not a URL"))?;
            let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
            let (Some(authority), true) = (uri.authority(), scheme_ok) else {
                return Err(Rejection::MissingOriginal(
                    "X-Original-URL must be an http(s) URL or a path",
                ));
            };
            let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
            (valid_host(Some(authority.as_str()))?, target.to_string())
        };
        return Ok(Original {
            method: method_of(method)?,
            host,
            target,
            redirects: false,
        });
    }
    Err(Rejection::MissingOriginal(
        "send X-Forwarded-Method and X-Forwarded-Uri, or X-Original-Method and X-Original-URL",
    ))
}

/// The one value of header `name`; several are refused (which one would
/// the proxy have meant?).
fn one<'a>(req: &'a Request<Body>, name: &HeaderName) -> Result<Option<&'a str>, Rejection> {
    let mut values = req.headers().get_all(name).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return match req.headers().contains_key(name) {
            true => Err(Rejection::MissingOriginal("a forwarded header is repeated")),
            false => Ok(None),
        };
    };
    v.to_str()
        .map(|v| Some(v.trim()))
        .map_err(|_| Rejection::MissingOriginal("a forwarded header is not visible ASCII"))
}

fn method_of(m: &str) -> Result<Method, Rejection> {
    Method::from_bytes(m.as_bytes())
        .map_err(|_| Rejection::MissingOriginal("the forwarded method is not a method"))
}

/// The request may pass: 200 with the identity headers for the proxy to
/// copy upstream (a one-time token was already spent by the step-up phase),
/// and with `upstream.assertion` the signed assertion (CONTRACT §5.4) in
/// its configured header, for the proxy to copy too.
/// All are always sent, empty when there is nothing to say: proxies
/// that copy a fixed list then overwrite any copy the client sent, and
/// Caddy 2.6 would otherwise forward its unreplaced placeholder
/// (`{http.reverse_proxy.header.X-Stepgate-User}`) as the value.
pub(super) fn answer(s: &State, req: &Request<Body>, ex: &mut Exchange<'_>) -> Response<Body> {
    ex.outcome = Outcome::Allowed;
    let mut res = Response::new(empty());
    *res.status_mut() = StatusCode::OK;
    let headers = res.headers_mut();
    for name in IDENTITY_HEADERS {
        headers.insert(name, HeaderValue::from_static(""));
    }
    set_identity_headers(headers, req.extensions());
    if let Some(a) = &s.config.built.assertion {
        let (name, value) = sign_assertion(a, req, ex.rule)
            .unwrap_or_else(|| (a.header.clone(), HeaderValue::from_static("")));
        headers.insert(name, value);
    }
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<Body> {
        let mut b = Request::get("/.stepgate/auth");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(empty()).unwrap_or_else(|_| unreachable!())
    }

    #[test]
    // Both header styles are read; nginx style never redirects; absolute
    // X-Original-URL names the host.
    fn original_request_from_either_style() {
        let o = original(
            &req(&[
                ("x-forwarded-method", "POST"),
                ("x-forwarded-host", "app.test"),
                ("x-forwarded-uri", "/admin/x?y=1"),
            ]),
            true,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            (o.method, o.host.as_deref(), o.target.as_str(), o.redirects),
            (Method::POST, Some("app.test"), "/admin/x?y=1", true)
        );
        let o = original(
            &req(&[
                ("x-original-method", "GET"),
                ("x-original-url", "https://app.test:8443/a?b"),
            ]),
            true,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            (o.host.as_deref(), o.target.as_str(), o.redirects),
            (Some("app.test:8443"), "/a?b", false)
        );
    }

    #[test]
    // Untrusted peers get 403; missing, repeated or malformed headers 400.
    fn refusals() {
        let good = [("x-forwarded-method", "GET"), ("x-forwarded-uri", "/")];
        assert_eq!(
            original(&req(&good), false).err(),
            Some(Rejection::UntrustedPeer)
        );
        for bad in [
            &[][..],
            &[("x-forwarded-uri", "/")][..],
            &[("x-original-url", "/")][..],
            &[("x-original-method", "GET"), ("x-original-url", "ftp://x/")][..],
            &[("x-forwarded-method", "G ET"), ("x-forwarded-uri", "/")][..],
            &[
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "/"),
                ("x-forwarded-uri", "/b"),
            ][..],
            &[
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "/"),
                ("x-forwarded-host", "a b"),
            ][..],
        ] {
            let r = original(&req(bad), true).err();
            assert_eq!(
                r.as_ref().map(Rejection::status),
                Some(StatusCode::BAD_REQUEST),
                "{bad:?}"
            );
        }
        assert!(is_endpoint("/.stepgate/auth", "/.stepgate"));
        assert!(is_endpoint("/.stepgate/auth/admin", "/.stepgate"));
        assert!(!is_endpoint("/.stepgate/authx", "/.stepgate"));
    }
}
