//! `application/x-www-form-urlencoded` bodies and query strings (decoded by
//! `form_urlencoded`), and percent-encoding of query values we build.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Characters left as they are in a query value we build: the unreserved
/// set of RFC 3986, plus `/` so that `rd=/admin/x` stays readable.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Decoded `key=value` pairs, in order (a body that is not UTF-8 is
/// decoded lossily).
pub fn parse(input: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(input)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The first value of `key`.
pub fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Percent-encode `s` for use as a query value.
pub fn query_value(s: &str) -> String {
    utf8_percent_encode(s, QUERY_VALUE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // Form decoding handles +, escapes and broken escapes without panicking.
    fn form_decoding() {
        let f = parse(b"a=1+2&b=%2Fx&c=%zz&d=%4&e&f=%+a");
        assert_eq!(get(&f, "a"), Some("1 2"));
        assert_eq!(get(&f, "b"), Some("/x"));
        assert_eq!(get(&f, "c"), Some("%zz"));
        assert_eq!(get(&f, "d"), Some("%4"));
        assert_eq!(get(&f, "e"), Some(""));
        // `%+a` is not an escape (the old decoder read "+a" as hex 0x0a).
        assert_eq!(get(&f, "f"), Some("% a"));
    }

    #[test]
    // Query values we build cannot break out of their parameter.
    fn query_values_are_encoded() {
        assert_eq!(
            query_value("/admin/x?y=1&z=2#f"),
            "/admin/x%3Fy%3D1%26z%3D2%23f"
        );
        assert_eq!(query_value("a b+é"), "a%20b%2B%C3%A9");
    }
}
