//! Which of the headers the pipeline looks up a request carries, noted in
//! one pass over its names. A plain request carries few of them, and every
//! lookup of an absent one still hashes its name and probes the map
//! (about 100 instructions each, a dozen per request).

use http::header::{AUTHORIZATION, CONNECTION, COOKIE, UPGRADE};
use http::{HeaderMap, HeaderName};

/// The method override headers (Rails, Express, Symfony, ASP.NET).
pub const METHOD_OVERRIDE: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// `false` means the request has no header of that name (exact
/// spelling); `true` that it may have one. [`Carried::ANY`], what a
/// request is taken to carry until its names are read, has every one
/// `true`: a phase that runs without the note looks, as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    pub upgrade: bool,
    pub connection: bool,
    pub authorization: bool,
    pub cookie: bool,
    pub method_override: bool,
    /// The second-factor token header (`stepup.token.header`).
    pub second_factor: bool,
}

impl Carried {
    /// A request that carries none of them.
    pub const NONE: Carried = Carried {
        upgrade: false,
        connection: false,
        authorization: false,
        cookie: false,
        method_override: false,
        second_factor: false,
    };

    pub const ANY: Carried = Carried {
        upgrade: true,
        connection: true,
        authorization: true,
        cookie: true,
        method_override: true,
        second_factor: true,
    };

    /// What `headers` carries now. Only true while no header is added
    /// under these names: the pipeline adds none of them before it
    /// forwards.
    pub fn of(headers: &HeaderMap, second_factor: &HeaderName) -> Carried {
        let mut c = Carried::NONE;
        for name in headers.keys() {
            if *name == UPGRADE {
                c.upgrade = true;
            } else if *name == CONNECTION {
                c.connection = true;
            } else if *name == AUTHORIZATION {
                c.authorization = true;
            } else if *name == COOKIE {
                c.cookie = true;
            } else if name == second_factor {
                c.second_factor = true;
            } else if METHOD_OVERRIDE.contains(name) {
                c.method_override = true;
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn map(names: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for n in names {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_static("x"),
            );
        }
        h
    }

    #[test]
    fn each_name_is_noted_and_nothing_else() {
        let sf = HeaderName::from_static("x-second-factor-token");
        let none = Carried::of(&map(&["host", "accept", "x-other"]), &sf);
        assert_eq!(none, Carried::NONE);
        let all = map(&[
            "upgrade",
            "connection",
            "authorization",
            "cookie",
            "x-second-factor-token",
            "x-method-override",
        ]);
        assert_eq!(Carried::of(&all, &sf), Carried::ANY);
        for (name, check) in [
            ("upgrade", (|c: Carried| c.upgrade) as fn(Carried) -> bool),
            ("connection", |c| c.connection),
            ("authorization", |c| c.authorization),
            ("cookie", |c| c.cookie),
            ("x-second-factor-token", |c| c.second_factor),
            ("x-http-method-override", |c| c.method_override),
            ("x-http-method", |c| c.method_override),
            ("x-method-override", |c| c.method_override),
        ] {
            let c = Carried::of(&map(&["host", name]), &sf);
            assert!(check(c), "{name} not noted");
            let others = [
                c.upgrade,
                c.connection,
                c.authorization,
                c.cookie,
                c.method_override,
                c.second_factor,
            ];
            assert_eq!(others.iter().filter(|b| **b).count(), 1, "{name}: {c:?}");
        }
    }
}
