//! `routes` and `default`: the policy, rule by rule in file order.

use std::collections::HashMap;
use std::time::Duration;

use super::Validator;
use crate::channel::Channel;
use crate::config::{fmt_duration, raw};
use crate::policy::{Action, DefaultPolicy, Glob, HostPattern, PathMatcher, Rule, StepUp};
use crate::stepup::Settings as Stepup;

/// `default`: what requests no rule matches need.
pub(super) fn default_policy(v: &mut Validator<'_>, default: Option<raw::Str>) -> DefaultPolicy {
    match default.as_ref().map(|s| s.0.as_str()) {
        None | Some("pass") => DefaultPolicy::Pass,
        Some("identity") => DefaultPolicy::Identity,
        Some(other) => {
            v.problem(
                "default",
                format!("unknown default policy {other:?}: expected pass or identity"),
            );
            DefaultPolicy::Pass
        }
    }
}

pub(super) fn validate(
    v: &mut Validator<'_>,
    routes: Vec<raw::Route>,
    stepup: Option<&Stepup>,
) -> Vec<Rule> {
    let mut rules = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, r) in routes.into_iter().enumerate() {
        let at = format!("routes[{i}]");
        let line = v.index.locate(&at).0;
        let name = r
            .name
            .map(|n| n.0)
            .unwrap_or_else(|| format!("route{}", i + 1));
        if let Some(prev) = names.insert(name.clone(), i) {
            v.problem(
                &format!("{at}.name"),
                format!("duplicate route name {name:?} (also routes[{prev}])"),
            );
        }
        let any_case = r.case_insensitive.unwrap_or(false);
        let path = match (r.path, r.path_regex) {
            (Some(p), None) if any_case => match Glob::case_insensitive(&p.0) {
                Ok(g) => Some(PathMatcher::Glob(g)),
                Err(e) => {
                    v.problem(&format!("{at}.path"), e);
                    None
                }
            },
            (Some(p), None) => match Glob::new(&p.0) {
                Ok(g) => Some(PathMatcher::Glob(g)),
                Err(e) => {
                    v.problem(&format!("{at}.path"), e);
                    None
                }
            },
            (None, Some(re)) => match PathMatcher::regex_with_case(&re.0, any_case) {
                Ok(m) => Some(m),
                Err(e) => {
                    v.problem(&format!("{at}.path_regex"), e);
                    None
                }
            },
            (Some(_), Some(_)) => {
                v.problem(&at, "give either path or path_regex, not both");
                None
            }
            (None, None) => {
                v.problem(&at, "needs path or path_regex");
                None
            }
        };
        if let (Some(PathMatcher::Glob(g)), Some(su)) = (&path, stepup) {
            let prefix_glob = Glob::new(&format!("{}/**", su.prefix));
            if g.matches(&su.prefix) || prefix_glob.map(|p| p.matches(g.as_str())).unwrap_or(false)
            {
                v.problem(
                    &format!("{at}.path"),
                    format!("overlaps the gateway's own prefix {}", su.prefix),
                );
            }
        }
        let methods = r.methods.map(|ms| {
            ms.iter()
                .enumerate()
                .filter_map(|(j, m)| {
                    // Upper case only: a request whose method has a lower-case
                    // letter is refused (400), so `methods: [delete]` would
                    // never match anything and its rule would protect nothing.
                    let valid = !m.0.is_empty() && m.0.bytes().all(|b| b.is_ascii_uppercase());
                    match http::Method::from_bytes(m.0.as_bytes()) {
                        Ok(method) if valid => Some(method),
                        _ => {
                            v.problem(
                                &format!("{at}.methods[{j}]"),
                                format!(
                                    "invalid method {:?}: upper-case letters only, e.g. GET",
                                    m.0
                                ),
                            );
                            None
                        }
                    }
                })
                .collect::<Vec<_>>()
        });
        let hosts = r.hosts.map(|hs| {
            hs.iter()
                .enumerate()
                .filter_map(|(j, h)| match HostPattern::new(&h.0) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        v.problem(&format!("{at}.hosts[{j}]"), e);
                        None
                    }
                })
                .collect::<Vec<_>>()
        });
        let public = r.public.unwrap_or(false);
        let deny = r.deny.unwrap_or(false);
        let kinds = usize::from(public) + usize::from(deny) + usize::from(r.stepup.is_some());
        if kinds > 1 {
            v.problem(&at, "a route is one of public, deny or stepup");
        }
        let action = if let Some(s) = r.stepup {
            let key = format!("{at}.stepup");
            let lifetime = stepup
                .map(|s| s.token.lifetime)
                .unwrap_or(Duration::from_secs(900));
            let max_age = v.duration(&format!("{key}.max_age"), s.max_age, lifetime);
            if max_age > lifetime {
                v.problem(
                    &format!("{key}.max_age"),
                    format!(
                        "max_age {} is longer than stepup.token.lifetime {}",
                        fmt_duration(max_age),
                        fmt_duration(lifetime)
                    ),
                );
            }
            let mut factors = Vec::new();
            for (j, f) in s.factors.unwrap_or_default().iter().enumerate() {
                match Channel::parse(&f.0) {
                    Some(c) if !factors.contains(&c) => factors.push(c),
                    Some(_) => {}
                    None => v.problem(
                        &format!("{key}.factors[{j}]"),
                        format!("unknown factor {:?}: expected email or sms", f.0),
                    ),
                }
            }
            if factors.is_empty() {
                factors = Channel::ALL.to_vec();
            }
            let idp = s.idp.map(|i| {
                let list = |v: Option<Vec<raw::Str>>| -> Vec<String> {
                    v.unwrap_or_default()
                        .into_iter()
                        .map(|s| s.0)
                        .filter(|s| !s.is_empty())
                        .collect()
                };
                let f = crate::policy::IdpFactor {
                    amr: list(i.amr),
                    acr: list(i.acr),
                };
                if f.amr.is_empty() && f.acr.is_empty() {
                    v.problem(
                        &format!("{key}.idp"),
                        "list amr and/or acr values that count as a second factor",
                    );
                }
                if let Some(bad) = f.acr.iter().find(|a| a.contains(['"', '\\', ' '])) {
                    v.problem(
                        &format!("{key}.idp.acr"),
                        format!("{bad:?}: acr values cannot contain spaces, quotes or backslashes"),
                    );
                }
                f
            });
            // A rule the IdP alone can satisfy needs no channel here.
            if let (Some(su), None) = (stepup, &idp) {
                let usable = factors.iter().any(|c| match c {
                    Channel::Email => su.email.is_some() || su.console,
                    Channel::Sms => su.sms.is_some() || su.console,
                });
                if !usable {
                    v.problem(
                        &key,
                        "none of this route's factors is configured (stepup.email / stepup.sms)",
                    );
                }
            }
            Action::StepUp(StepUp {
                max_age,
                factors,
                one_time: s.one_time.unwrap_or(false),
                idp,
            })
        } else if public {
            Action::Public
        } else if deny {
            Action::Deny
        } else {
            Action::Identity
        };
        if let Some(path) = path {
            rules.push(Rule {
                name: name.into(),
                line,
                path,
                methods,
                hosts,
                action,
            });
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::Method;

    use crate::channel::Channel;
    use crate::config::tests::{load, problems, BASE};
    use crate::policy::Action;

    fn rules(routes: &str) -> crate::policy::Policy {
        load(&format!("{BASE}routes:\n{routes}"))
            .unwrap_or_else(|e| panic!("{e}"))
            .policy
    }

    fn routed(p: &crate::policy::Policy, m: &Method, path: &str) -> Option<String> {
        p.route(m, None, path).map(|r| r.name.to_string())
    }

    #[test]
    // A route's options reach the rule: `case_insensitive` only where it is
    // set, methods as listed (upper case only: `delete` could never match a
    // request, all of which are upper case), `factors` as listed.
    fn route_options_reach_the_rule() {
        let p = rules(concat!(
            "  - { name: ci, path: /admin/**, case_insensitive: true, deny: true }\n",
            "  - { name: cs, path: /b/**, deny: true }\n",
            "  - { name: del, path: /c, methods: [DELETE, PROPFIND], deny: true }\n",
            "  - { name: sms, path: /d, stepup: { max_age: 1m, factors: [sms, sms] } }\n",
            "  - { name: one, path: /e, stepup: { max_age: 1m, factors: [email], one_time: true } }\n",
            "  - { name: amr, path: /f, stepup: { max_age: 1m, idp: { amr: [hwk] } } }\n",
        ));
        assert_eq!(routed(&p, &Method::GET, "/ADMIN/x").as_deref(), Some("ci"));
        assert_eq!(routed(&p, &Method::GET, "/B/x"), None);
        assert_eq!(routed(&p, &Method::GET, "/b/x").as_deref(), Some("cs"));
        assert_eq!(routed(&p, &Method::DELETE, "/c").as_deref(), Some("del"));
        let propfind = Method::from_bytes(b"PROPFIND").unwrap_or(Method::GET);
        assert_eq!(routed(&p, &propfind, "/c").as_deref(), Some("del"));
        assert_eq!(routed(&p, &Method::GET, "/c"), None);
        let step = |path: &str| match p.route(&Method::GET, None, path).map(|r| &r.action) {
            Some(Action::StepUp(s)) => s.clone(),
            other => panic!("{path}: {other:?}"),
        };
        assert_eq!(step("/d").factors, vec![Channel::Sms]);
        assert!(!step("/d").one_time);
        assert_eq!(step("/e").factors, vec![Channel::Email]);
        assert!(step("/e").one_time);
        assert_eq!(step("/e").max_age, Duration::from_secs(60));
        assert_eq!(step("/f").idp.map(|i| i.amr), Some(vec!["hwk".to_owned()]));
        for bad in ["delete", "Get", "G-T", "\"\""] {
            let e = problems(&format!(
                "{BASE}routes:\n  - {{ name: x, path: /x, methods: [{bad}], deny: true }}\n"
            ));
            assert!(
                e.contains("routes[0].methods[0]: invalid method"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    // The edges of the route checks: `max_age` may equal the token lifetime
    // (15m by default) but not exceed it; a path is refused when it covers
    // the prefix or lies under it.
    fn route_check_edges() {
        let at = |max_age: &str| {
            problems(&format!(
                "{BASE}routes:\n  - {{ name: x, path: /x, stepup: {{ max_age: {max_age} }} }}\n"
            ))
        };
        assert_eq!(at("15m"), "");
        assert!(at("901s").contains("is longer than stepup.token.lifetime"));
        for path in ["/.stepgate", "/.stepgate/api/*", "/*"] {
            let e = problems(&format!(
                "{BASE}routes:\n  - {{ name: x, path: \"{path}\", public: true }}\n"
            ));
            assert!(
                e.contains("overlaps the gateway's own prefix"),
                "{path}: {e}"
            );
        }
        assert_eq!(
            problems(&format!(
                "{BASE}routes:\n  - {{ name: x, path: /stepgate/**, public: true }}\n"
            )),
            ""
        );
    }

    #[test]
    // Each route's problems at their keys, all routes at once: a path over
    // the gateway's prefix, a duplicated name, bad methods and hosts, a
    // route of two kinds, unusable IdP settings, a bad default.
    fn route_problems_are_each_located() {
        let e = problems(&format!(
            "{BASE}routes:\n  - {{ name: a, path: /.stepgate/**, public: true }}\n  - {{ name: a, path: /b, methods: [\"G T\"], hosts: [\"a b\"], public: true, deny: true }}\n  - {{ name: c, path: /c, stepup: {{ max_age: 1m, idp: {{ acr: [\"a b\"] }} }} }}\n  - {{ name: d, path: /d, stepup: {{ max_age: 1m, idp: {{}} }} }}\ndefault: maybe\n"
        ));
        for want in [
            "routes[0].path: overlaps the gateway's own prefix /.stepgate",
            "routes[1].name: duplicate route name \"a\" (also routes[0])",
            "routes[1].methods[0]: invalid method \"G T\"",
            "routes[1].hosts[0]: ",
            "routes[1]: a route is one of public, deny or stepup",
            "routes[2].stepup.idp.acr: \"a b\": acr values cannot contain",
            "routes[3].stepup.idp: list amr and/or acr values",
            "gateway.yaml:17:10: default: unknown default policy \"maybe\"",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        let e = problems(&format!(
            "{}routes:\n  - {{ name: a, path: /a, stepup: {{ max_age: 1m }} }}\n",
            BASE.replace("  console: true\n", "")
        ));
        assert!(
            e.contains(
                "gateway.yaml:12:26: routes[0].stepup: none of this route's factors is configured"
            ),
            "{e}"
        );
    }
}
