//! Request `Cookie` headers read and edited as bytes (a legacy app's
//! cookie may hold bytes that are not visible ASCII, and must survive the
//! gateway untouched), and `Set-Cookie` built with the `cookie` crate.

use std::time::Duration;

use http::header::{HeaderValue, COOKIE};
use http::HeaderMap;

/// The `name=value` pairs of one `Cookie` header value, as bytes.
fn pairs(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    split_any(value, b';', b';')
        .map(|p| p.trim_ascii())
        .filter(|p| !p.is_empty())
}

/// `value` split on `a` and on `b`, like `<[u8]>::split` (empty pieces
/// included), found with `memchr`: second-factor and primary tokens make
/// cookie headers long, and they are read several times per request.
pub(crate) fn split_any(value: &[u8], a: u8, b: u8) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let r = rest?;
        match memchr::memchr2(a, b, r) {
            Some(i) => {
                rest = Some(&r[i + 1..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// The name of a `name=value` pair (the whole pair when it has no `=`).
fn name_of(pair: &[u8]) -> &[u8] {
    match pair.iter().position(|b| *b == b'=') {
        Some(i) => pair[..i].trim_ascii(),
        None => pair,
    }
}

/// The value of a `name=value` pair if its name is `name` (values that
/// are not UTF-8 are skipped: no token of ours looks like that).
fn value_of<'a>(pair: &'a [u8], name: &str) -> Option<&'a str> {
    let i = pair.iter().position(|b| *b == b'=')?;
    if pair[..i].trim_ascii() != name.as_bytes() {
        return None;
    }
    let v = std::str::from_utf8(&pair[i + 1..]).ok()?;
    Some(v.trim().trim_matches('"'))
}

/// Every value of cookie `name` in the request's `Cookie` headers.
pub fn cookies<'a, 'n>(headers: &'a HeaderMap, name: &'n str) -> impl Iterator<Item = &'a str> + 'n
where
    'a: 'n,
{
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| pairs(v.as_bytes()))
        .filter_map(move |p| value_of(p, name))
}

/// The first value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| pairs(v.as_bytes()))
        .find_map(|p| value_of(p, name))
}

/// Remove cookie `name` from the request's `Cookie` headers. Headers that
/// do not carry it are kept byte for byte; the others lose that pair only.
pub fn remove_cookie(headers: &mut HeaderMap, name: &str) {
    let carries = |v: &HeaderValue| pairs(v.as_bytes()).any(|p| name_of(p) == name.as_bytes());
    if !headers.get_all(COOKIE).iter().any(carries) {
        return;
    }
    let values: Vec<HeaderValue> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| {
            if !carries(v) {
                return Some(v.clone());
            }
            let kept: Vec<&[u8]> = pairs(v.as_bytes())
                .filter(|p| name_of(p) != name.as_bytes())
                .collect();
            if kept.is_empty() {
                return None;
            }
            HeaderValue::from_bytes(&kept.join(&b"; "[..])).ok()
        })
        .collect();
    headers.remove(COOKIE);
    for v in values {
        headers.append(COOKIE, v);
    }
}

/// Join several `Cookie` headers into one (`; `-separated, bytes kept).
pub fn join(headers: &mut HeaderMap) {
    let values: Vec<&[u8]> = headers
        .get_all(COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if values.len() < 2 {
        return;
    }
    if let Ok(v) = HeaderValue::from_bytes(&values.join(&b"; "[..])) {
        headers.insert(COOKIE, v);
    }
}

/// `Set-Cookie` for a gateway cookie: whole site, HttpOnly, SameSite=Lax,
/// Secure when served over TLS. A zero `max_age` clears the cookie.
pub fn set_cookie(name: &str, value: &str, max_age: Duration, secure: bool) -> Option<HeaderValue> {
    let max_age = i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
    let c = cookie::Cookie::build((name, value))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Lax)
        .secure(secure)
        .max_age(cookie::time::Duration::seconds(max_age))
        .build();
    HeaderValue::from_str(&c.to_string()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(h: &HeaderMap) -> Vec<Vec<u8>> {
        h.get_all(COOKIE)
            .iter()
            .map(|v| v.as_bytes().to_vec())
            .collect()
    }

    #[test]
    // The memchr split is `<[u8]>::split` on either byte, empty pieces and
    // all.
    fn split_any_is_split() {
        for v in [
            &b""[..],
            b";",
            b"a",
            b"a;b",
            b";a;;b;",
            b"a,b;c",
            b",;,",
            b"x=1; y=2, z=3",
        ] {
            let want: Vec<&[u8]> = v.split(|c| *c == b';' || *c == b',').collect();
            assert_eq!(split_any(v, b';', b',').collect::<Vec<_>>(), want);
            let want: Vec<&[u8]> = v.split(|c| *c == b';').collect();
            assert_eq!(split_any(v, b';', b';').collect::<Vec<_>>(), want);
        }
    }

    #[test]
    // The second-factor cookie is removed without touching the app's cookies.
    fn remove_cookie_keeps_others() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_static("a=1; stepgate_sf=tok; b=2"),
        );
        h.append(COOKIE, HeaderValue::from_static("stepgate_sf=x"));
        remove_cookie(&mut h, "stepgate_sf");
        assert_eq!(values(&h), vec![b"a=1; b=2".to_vec()]);
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "stepgate_sf"), None);
    }

    #[test]
    // Bug fix: a Cookie header holding bytes that are not visible ASCII (a
    // legacy app's Latin-1 or UTF-8 cookie) used to be dropped whole when
    // the gateway removed its own cookie; now only the gateway's pair goes,
    // and a header without it is kept byte for byte.
    fn remove_cookie_keeps_non_ascii_cookies() {
        let mut h = HeaderMap::new();
        let legacy = b"name=J\xf6rg; stepgate_sf=tok; lang=de".as_slice();
        let other = b"city=M\xc3\xbcnchen".as_slice();
        h.append(
            COOKIE,
            HeaderValue::from_bytes(legacy).unwrap_or_else(|_| unreachable!()),
        );
        h.append(
            COOKIE,
            HeaderValue::from_bytes(other).unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(cookie(&h, "stepgate_sf"), Some("tok"));
        remove_cookie(&mut h, "stepgate_sf");
        assert_eq!(
            values(&h),
            vec![b"name=J\xf6rg; lang=de".to_vec(), other.to_vec()]
        );
        assert_eq!(cookie(&h, "lang"), Some("de"));
    }

    #[test]
    // A cookie named like a prefix of ours is not ours.
    fn names_match_whole() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_static("stepgate_sf_x=1; xstepgate_sf=2"),
        );
        remove_cookie(&mut h, "stepgate_sf");
        assert_eq!(
            values(&h),
            vec![b"stepgate_sf_x=1; xstepgate_sf=2".to_vec()]
        );
        assert_eq!(cookie(&h, "stepgate_sf"), None);
    }

    #[test]
    // The token cookie carries every protective attribute; Secure only on TLS.
    fn set_cookie_attributes() {
        let v = set_cookie("stepgate_sf", "tok", Duration::from_secs(900), false)
            .unwrap_or_else(|| unreachable!());
        let s = v.to_str().unwrap_or_default();
        assert!(s.starts_with("stepgate_sf=tok;"), "{s}");
        for attr in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=900"] {
            assert!(s.contains(attr), "{s} lacks {attr}");
        }
        assert!(!s.contains("Secure"));
        let v =
            set_cookie("stepgate_sf", "", Duration::ZERO, true).unwrap_or_else(|| unreachable!());
        let s = v.to_str().unwrap_or_default();
        assert!(s.contains("Max-Age=0") && s.contains("Secure"), "{s}");
    }
}
