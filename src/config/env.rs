//! `${NAME}` substitution. The file is parsed with every string kept as
//! written ([`Str`]); then [`substitute_all`] replaces each `${NAME}` in
//! every string of it, from an environment passed in explicitly. Unset
//! variables and malformed `${` are collected, not fatal, so that all of
//! them are reported at once, each where it is used.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A string of the config file; after [`substitute_all`], with `${NAME}`
/// substituted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Str(pub String);

impl<'de> Deserialize<'de> for Str {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Str, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Str;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str, E> {
                Ok(Str(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Str, E> {
                Ok(Str(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Str, E> {
                Ok(Str(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Str, E> {
                Ok(Str(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Every [`Str`] inside a raw config value, with its key path
/// (`routes[2].stepup.max_age`).
pub trait Strings {
    fn each_string(&mut self, path: &str, f: &mut dyn FnMut(&str, &mut Str));
}

impl Strings for Str {
    fn each_string(&mut self, path: &str, f: &mut dyn FnMut(&str, &mut Str)) {
        f(path, self)
    }
}

impl<T: Strings> Strings for Option<T> {
    fn each_string(&mut self, path: &str, f: &mut dyn FnMut(&str, &mut Str)) {
        if let Some(v) = self {
            v.each_string(path, f)
        }
    }
}

impl<T: Strings> Strings for Vec<T> {
    fn each_string(&mut self, path: &str, f: &mut dyn FnMut(&str, &mut Str)) {
        for (i, v) in self.iter_mut().enumerate() {
            v.each_string(&format!("{path}[{i}]"), f)
        }
    }
}

impl Strings for bool {
    fn each_string(&mut self, _: &str, _: &mut dyn FnMut(&str, &mut Str)) {}
}

impl Strings for u64 {
    fn each_string(&mut self, _: &str, _: &mut dyn FnMut(&str, &mut Str)) {}
}

/// `path.key`, or `key` at the top.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// What substitution could not resolve.
#[derive(Debug, Default)]
pub struct Unresolved {
    /// Names of unset variables, in order of use.
    pub missing: Vec<String>,
    /// Malformed `${...}`: the key path and what is wrong.
    pub malformed: Vec<(String, String)>,
}

/// Replace `${NAME}` in every string of `value` from `env`.
pub fn substitute_all(value: &mut impl Strings, env: &HashMap<String, String>) -> Unresolved {
    let mut out = Unresolved::default();
    value.each_string("", &mut |path, s| match substitute(
        &s.0,
        &|name| env.get(name).cloned(),
        &mut out.missing,
    ) {
        Ok(v) => s.0 = v,
        Err(e) => out.malformed.push((path.to_string(), e)),
    });
    out
}

/// Replace every `${NAME}` in `s`; names `lookup` does not know are pushed
/// to `missing` (and replaced by nothing).
pub fn substitute(
    s: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed ${{ in {s:?}"))?;
        let name = &after[..end];
        if !valid_name(name) {
            return Err(format!("invalid environment variable name {name:?}"));
        }
        match lookup(name) {
            Some(v) => out.push_str(&v),
            None => missing.push(name.to_string()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Unset variables that `text` names as `${NAME}` outside comment lines,
/// for a file that did not parse (so nothing was substituted).
pub fn unset_in_text(text: &str, env: &HashMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(i) = rest.find("${") {
            rest = &rest[i + 2..];
            let Some(end) = rest.find('}') else { break };
            let name = &rest[..end];
            if valid_name(name) && !env.contains_key(name) {
                out.push(name.to_string());
            }
            rest = &rest[end + 1..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // Substitution uses only the environment it is given, reports every
    // unset name, and refuses malformed references.
    fn substitutes_from_the_given_environment() {
        let env: HashMap<String, String> = [("A".to_string(), "1".to_string())].into();
        let lookup = |n: &str| env.get(n).cloned();
        let mut missing = Vec::new();
        assert_eq!(
            substitute("x${A}y${B}z${C}", &lookup, &mut missing),
            Ok("x1yz".to_string())
        );
        assert_eq!(missing, ["B", "C"]);
        assert!(substitute("${A", &lookup, &mut missing).is_err());
        assert!(substitute("${A-B}", &lookup, &mut missing).is_err());
        assert_eq!(
            unset_in_text("a: ${A}\n# b: ${B}\nc: \"${C} ${A}\"\n", &env),
            ["C"]
        );
    }
}
