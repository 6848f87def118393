//! The primary credential a request carries, and the look-alikes beside it.
//!
//! The gateway reads one primary token: `Authorization: Bearer <token>`
//! (RFC 6750: the scheme in any case, one or more spaces, a token68) and/or
//! the identity cookie. Apps read credentials more leniently: a tab or a
//! comma after `Bearer`, another scheme (`JWT`, `Token`, `Basic`), a cookie
//! name with stray whitespace, quotes, another case or percent-escapes (PHP
//! decodes names and maps ` ` `.` `[` to `_`; ASP.NET compares names
//! without case; Django strips Unicode whitespace), cookies separated by
//! `,` (RFC 2965 parsers), or an `access_token` query parameter (RFC 6750
//! §2.3). When the gateway has found a primary token, any of these beside
//! it could make the app act for another user than the one checked, so the
//! request is refused ([`IdentityError::Ambiguous`]). Without a primary
//! token the gateway vouches for nobody and they pass unchanged.

use std::borrow::Cow;

use http::header::{AUTHORIZATION, COOKIE};
use http::HeaderMap;

use super::{IdentityError, JwtSettings};

/// The query parameter RFC 6750 §2.3 defines for bearer tokens.
const ACCESS_TOKEN: &str = "access_token";

/// The one primary token in `headers` (bearer header, identity cookie),
/// or none. Several different tokens, or a primary token with a
/// look-alike beside it (in the headers or the `query`), are refused.
pub(crate) fn primary_token<'a>(
    jwt: &JwtSettings,
    headers: &'a HeaderMap,
    query: Option<&str>,
) -> Result<Option<&'a str>, IdentityError> {
    let mut found: Option<&str> = None;
    let mut add = |t: &'a str| match found {
        Some(f) if f != t => Err(IdentityError::Ambiguous),
        _ => {
            found = Some(t);
            Ok(())
        }
    };
    let mut lookalike = false;
    for v in headers.get_all(AUTHORIZATION) {
        match bearer(v.as_bytes()) {
            Some(t) if jwt.from_header => add(t)?,
            _ => lookalike = true,
        }
    }
    let exact = if jwt.from_cookie {
        let mut n = 0;
        for t in crate::http::cookies::cookies(headers, &jwt.cookie) {
            add(t)?;
            n += 1;
        }
        n
    } else {
        0
    };
    let Some(found) = found else {
        return Ok(None);
    };
    let cookie = fold(jwt.cookie.as_bytes());
    lookalike = lookalike
        || cookie_names(headers).filter(|n| fold(n) == cookie).count() > exact
        || query.is_some_and(|q| {
            form_urlencoded::parse(q.as_bytes()).any(|(k, _)| {
                let k = fold(k.as_bytes());
                k == cookie || k == ACCESS_TOKEN.as_bytes()
            })
        });
    if lookalike {
        return Err(IdentityError::Ambiguous);
    }
    Ok(Some(found))
}

/// The token of a strict `Bearer <token68>` value (RFC 6750 §2.1).
fn bearer(v: &[u8]) -> Option<&str> {
    let scheme = v.get(..6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let rest = &v[6..];
    let token = rest.trim_ascii_start();
    if token.len() == rest.len() || !rest[..rest.len() - token.len()].iter().all(|b| *b == b' ') {
        return None;
    }
    // token68: 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
    let b64 = token
        .iter()
        .rposition(|b| *b != b'=')
        .map_or(&[][..], |i| &token[..=i]);
    if b64.is_empty() || !all_token68(b64) {
        return None;
    }
    std::str::from_utf8(token).ok()
}

/// Whether every byte is one of a token68 before its `=` padding: ALPHA
/// DIGIT `-._~+/`. Primary tokens are long and checked on every request:
/// 16 bytes at a time without a branch per byte (a table lookup and a
/// branch per byte cost about twice the instructions).
fn all_token68(bytes: &[u8]) -> bool {
    fn ok(b: u8) -> bool {
        let lower = b | 0x20;
        (lower.wrapping_sub(b'a') < 26)
            | (b.wrapping_sub(b'0') < 10)
            | (b == b'-')
            | (b == b'.')
            | (b == b'_')
            | (b == b'~')
            | (b == b'+')
            | (b == b'/')
    }
    let mut chunks = bytes.chunks_exact(16);
    for chunk in &mut chunks {
        if !chunk.iter().fold(true, |all, b| all & ok(*b)) {
            return false;
        }
    }
    chunks.remainder().iter().all(|b| ok(*b))
}

/// Every cookie name in the `Cookie` headers as a lenient parser sees
/// them: split on `;` and on `,`.
fn cookie_names(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| crate::http::cookies::split_any(v.as_bytes(), b';', b','))
        .filter_map(|p| p.iter().position(|b| *b == b'=').map(|i| &p[..i]))
}

/// A cookie or parameter name as the most lenient app reads it:
/// percent-escapes decoded, anything but letters, digits and `%-._[` cut
/// from both ends (whitespace, controls, quotes, non-ASCII spaces), ASCII
/// letters lower-cased, and ` ` `.` `[` read as `_` (PHP).
fn fold(name: &[u8]) -> Vec<u8> {
    let keep = |b: &u8| b.is_ascii_alphanumeric() || b"%-._[".contains(b);
    let trim = |n: &[u8]| -> (usize, usize) {
        let start = n.iter().position(keep).unwrap_or(n.len());
        let end = n.iter().rposition(keep).map_or(start, |i| i + 1);
        (start, end)
    };
    let (s, e) = trim(name);
    let name = &name[s..e];
    let decoded: Cow<[u8]> = percent_encoding::percent_decode(name).into();
    let (s, e) = trim(&decoded);
    decoded[s..e]
        .iter()
        .map(|b| match b.to_ascii_lowercase() {
            b' ' | b'.' | b'[' => b'_',
            b => b,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // The token68 check admits exactly ALPHA DIGIT `-._~+/`, at any
    // position of a long token (the 16-byte chunks and the remainder).
    fn token68_bytes_are_exactly_rfc_6750s() {
        for b in 0..=255u8 {
            let want = b.is_ascii_alphanumeric() || b"-._~+/".contains(&b);
            assert_eq!(all_token68(&[b]), want, "byte {b:#04x}");
            for at in [0, 15, 16, 31, 32, 40] {
                let mut long = vec![b'a'; 41];
                long[at] = b;
                assert_eq!(all_token68(&long), want, "byte {b:#04x} at {at}");
            }
        }
        assert!(all_token68(
            b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln-_~+/"
        ));
    }

    #[test]
    // Only a strict `Bearer <token68>` is the primary token; everything an
    // app might still read as a credential is not.
    fn strict_bearer() {
        assert_eq!(bearer(b"Bearer abc.def-_"), Some("abc.def-_"));
        assert_eq!(bearer(b"bEARER  abc"), Some("abc"));
        assert_eq!(bearer(b"Bearer abc=="), Some("abc=="));
        for v in [
            &b"Bearer\tabc"[..],
            b"Bearer,abc",
            b"Bearerabc",
            b"Bearer ",
            b"Bearer abc def",
            b"Bearer abc,Bearer def",
            b"Bearer ==",
            b"JWT abc",
            b"Token abc",
            b"Basic YTpi",
            b"abc",
        ] {
            assert_eq!(bearer(v), None, "{}", String::from_utf8_lossy(v));
        }
        // Every byte: exactly ALPHA DIGIT -._~+/ make a token68.
        for b in 0..=255u8 {
            let v = [&b"Bearer a"[..], &[b]].concat();
            let token68 = b.is_ascii_alphanumeric() || b"-._~+/".contains(&b);
            assert_eq!(bearer(&v).is_some(), token68 || b == b'=', "byte {b:#x}");
        }
    }

    #[test]
    // Names fold the way lenient parsers read them.
    fn folded_names() {
        for n in [
            &b"access_token"[..],
            b" access_token ",
            b"access_token\t",
            b"\x0baccess_token",
            b"\"access_token\"",
            b"Access_Token",
            b"ACCESS_TOKEN\xa0",
            b"access%5Ftoken",
            b"access%20token",
            b"access.token",
            b"access[token",
            b"access_token%20",
        ] {
            assert_eq!(fold(n), b"access_token", "{}", String::from_utf8_lossy(n));
        }
        assert_ne!(fold(b"access_tokens"), b"access_token");
        assert_ne!(fold(b"access-token"), b"access_token");
    }
}
