//! `${NAME}` substitution: every string of the config file is read through
//! [`Str`], which replaces each `${NAME}` with the variable's value as the
//! file is deserialised. Unset variables are collected, not fatal, so that
//! all of them are reported at once, each where it is used.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

thread_local! {
    /// The environment `${NAME}` resolves against while this thread
    /// deserialises a config file.
    static CURRENT_ENV: RefCell<HashMap<String, String>> = RefCell::new(HashMap::new());
    /// Variables found unset while deserialising, reported together
    /// afterwards (so one missing variable does not hide the others).
    static MISSING: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` with `env` resolving `${NAME}` in every [`Str`].
/// Also returns the names of unset variables, in order of appearance.
pub fn with_env<R>(env: HashMap<String, String>, f: impl FnOnce() -> R) -> (R, Vec<String>) {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            CURRENT_ENV.with(|c| c.borrow_mut().clear());
            MISSING.with(|m| m.borrow_mut().clear());
        }
    }
    CURRENT_ENV.with(|c| *c.borrow_mut() = env);
    let _reset = Reset;
    let r = f();
    let missing = MISSING.with(|m| std::mem::take(&mut *m.borrow_mut()));
    (r, missing)
}

fn lookup(name: &str) -> Option<String> {
    CURRENT_ENV.with(|c| c.borrow().get(name).cloned())
}

/// Replace every `${NAME}` in `s`.
pub fn substitute(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed ${{ in {s:?}"))?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid environment variable name {name:?}"));
        }
        match lookup(name) {
            Some(v) => out.push_str(&v),
            None => MISSING.with(|m| m.borrow_mut().push(name.to_string())),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A string with `${NAME}` substituted.
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
                substitute(v, &lookup).map(Str).map_err(E::custom)
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
