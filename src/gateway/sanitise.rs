//! Phase 2, sanitise: remove what must never reach the upstream or be
//! believed — hop-by-hop headers (and those `Connection` names), the
//! gateway's own `X-Stepgate-*` headers, URL-rewrite and re-method headers,
//! claims about the client connection from peers that are not trusted
//! proxies, and identity headers from peers not trusted to assert them.
//! Runs before anything reads identity, so nothing downstream can be fooled
//! by them.
//!
//! One list, [`RESERVED`] (plus the names the config adds), says what
//! happens to each header the gateway owns, reads or refuses. Names are
//! compared after mapping `_` to `-` (hyper has already lower-cased them):
//! CGI-style servers (PHP, Werkzeug, Rack, ASP.NET's server variables) give
//! `X_Original_URL` and `X-Original-URL` the same variable, so a copy in an
//! underscore spelling is another line of the same header. Such an alias of
//! a listed header is always removed: the gateway reads and sets only the
//! dashed spelling, so the alias is a copy nothing checked.

use http::{HeaderMap, HeaderName, Request};

use super::{Exchange, State};
use crate::http::{Body, Carried};
use crate::proxy;
use crate::telemetry::Mode;

/// What happens to a client's header with a listed name (dashed spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Treatment {
    /// Removed from every request: the gateway sets its own, or none.
    Remove,
    /// A claim about the client connection: kept (and `X-Forwarded-For`
    /// extended) when the peer is a trusted proxy, else removed; the
    /// gateway then sets `X-Forwarded-For/-Proto/-Host` itself.
    TrustedProxyOnly,
    /// Read by a later phase in exactly this spelling (method overrides by
    /// the policy, hop-by-hop headers by the forwarder, the second-factor
    /// token by step-up, which removes it before forwarding).
    Read,
}

/// A listed name: the whole name, or every name starting with it.
enum Name {
    Exact(&'static str),
    Prefix(&'static str),
}

use Name::{Exact, Prefix};
use Treatment::{Read, Remove, TrustedProxyOnly};

/// The reserved and rewrite headers, in their normalised (lower-case,
/// dashed) spelling. The config adds the trusted-identity headers, the
/// signed assertion header and the second-factor token header.
const RESERVED: &[(Name, Treatment)] = &[
    // The gateway's own headers (CONTRACT §4): only it speaks in them.
    (Prefix("x-stepgate-"), Remove),
    // URL rewrite (IIS, Symfony, Zend, Spring's ForwardedHeaderFilter):
    // the app would serve another path than the one the policy checked.
    (Exact("x-original-url"), Remove),
    (Exact("x-rewrite-url"), Remove),
    (Exact("x-original-uri"), Remove),
    (Exact("x-forwarded-path"), Remove),
    (Exact("x-forwarded-prefix"), Remove),
    (Exact("x-forwarded-uri"), Remove),
    // Re-method headers a proxy in front uses for forward-auth only
    // (read from the auth request by `normalise`, before this phase).
    (Exact("x-original-method"), Remove),
    (Exact("x-forwarded-method"), Remove),
    // httpoxy (CVE-2016-5385): `Proxy` becomes HTTP_PROXY in a CGI app.
    (Exact("proxy"), Remove),
    // Method overrides: checked by the policy, every line.
    (Exact("x-http-method-override"), Read),
    (Exact("x-http-method"), Read),
    (Exact("x-method-override"), Read),
    // Who the client is: only a trusted proxy may say.
    (Exact("forwarded"), TrustedProxyOnly),
    (Prefix("x-forwarded-"), TrustedProxyOnly),
    (Exact("x-real-ip"), TrustedProxyOnly),
    (Exact("x-client-ip"), TrustedProxyOnly),
    (Exact("true-client-ip"), TrustedProxyOnly),
    // Framing and hop-by-hop headers (removed by the forwarder): an
    // underscore copy could frame the request differently at the app.
    (Exact("connection"), Read),
    (Exact("keep-alive"), Read),
    (Exact("proxy-connection"), Read),
    (Exact("proxy-authenticate"), Read),
    (Exact("proxy-authorization"), Read),
    (Exact("transfer-encoding"), Read),
    (Exact("content-length"), Read),
];

/// The first letters of the [`RESERVED`] names (`_` read as `-`): a name
/// starting with any other letter is not listed there.
const RESERVED_FIRST: [bool; 256] = {
    let mut first = [false; 256];
    let mut i = 0;
    while i < RESERVED.len() {
        let (Exact(n) | Prefix(n)) = &RESERVED[i].0;
        first[n.as_bytes()[0] as usize] = true;
        i += 1;
    }
    first
};

pub(super) fn run(s: &State, req: &mut Request<Body>, ex: &mut Exchange<'_>) {
    // Noted before anything is removed: a header removed below stays
    // noted (a later lookup finds nothing), never the other way round.
    ex.carried = Carried::of(req.headers(), &s.config.stepup.token.header);
    ex.upgrade = ex.mode == Mode::Proxy
        && ex.carried.upgrade
        && proxy::wants_upgrade(req.headers(), req.version());
    let headers = req.headers_mut();
    let trusts_identity = s.auth.trusts_header_from(ex.conn.peer.ip());
    // One pass over the names present: hop-by-hop ones (and those
    // `Connection` names), then the listed ones; only those found are
    // removed.
    let named: Vec<&str> = if ex.carried.connection {
        proxy::connection_tokens(headers).collect()
    } else {
        Vec::new()
    };
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            proxy::is_hop_by_hop(name, ex.upgrade, &named)
                || match listed(s, trusts_identity, name.as_str()) {
                    None => false,
                    // An alias spelling of a listed header: nothing checks it.
                    Some((false, _)) => true,
                    Some((true, Remove)) => true,
                    Some((true, TrustedProxyOnly)) => !ex.trusted_proxy,
                    Some((true, Read)) => false,
                }
        })
        .cloned()
        .collect();
    drop(named);
    remove_all(headers, doomed);
}

/// Whether `name` is listed, as `(exact spelling?, treatment)`. The
/// config's names come first: a trusted-identity header may be an
/// `X-Forwarded-*` name (oauth2-proxy's `X-Forwarded-User`), trusted by
/// `identity.trusted_header.from`, not by `listen.trusted_proxies`.
fn listed(s: &State, trusts_identity: bool, name: &str) -> Option<(bool, Treatment)> {
    let identity = if trusts_identity { Read } else { Remove };
    let configured = s
        .auth
        .trusted_header_names()
        .map(|n| (n, identity))
        .chain(
            s.config
                .upstream
                .assertion
                .as_ref()
                .map(|a| (&a.header, Remove)),
        )
        .chain(std::iter::once((&s.config.stepup.token.header, Read)))
        .find(|(n, _)| same_name(name, n.as_str()))
        .map(|(n, t)| (name == n.as_str(), t));
    configured.or_else(|| {
        if !RESERVED_FIRST[usize::from(name.as_bytes().first().copied().map_or(0, dash))] {
            return None;
        }
        RESERVED.iter().find_map(|(n, t)| match n {
            Exact(n) if same_name(name, n) => Some((name == *n, *t)),
            Prefix(p) if same_prefix(name, p) => Some((!name.contains('_'), *t)),
            _ => None,
        })
    })
}

fn remove_all(headers: &mut HeaderMap, names: Vec<HeaderName>) {
    for name in names {
        headers.remove(name);
    }
}

/// `a` and `b` name the same header once `_` is read as `-` (both are
/// lower case: hyper lower-cases names, and so does the config).
pub(super) fn same_name(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| dash(x) == dash(y))
}

/// `name` starts with `prefix` once `_` is read as `-`.
fn same_prefix(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name
            .bytes()
            .zip(prefix.bytes())
            .all(|(x, y)| dash(x) == dash(y))
}

fn dash(b: u8) -> u8 {
    if b == b'_' {
        b'-'
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // The comparison every removal relies on: `_` and `-` are one letter,
    // nothing else is.
    fn names_compare_with_underscore_as_dash() {
        assert!(same_name("x_original_url", "x-original-url"));
        assert!(same_name("x-original_url", "x-original-url"));
        assert!(same_name("x-original-url", "x_original_url"));
        assert!(!same_name("x-original-urls", "x-original-url"));
        assert!(!same_name("x.original.url", "x-original-url"));
        assert!(same_prefix("x_stepgate_user", "x-stepgate-"));
        assert!(same_prefix("x-stepgate-", "x-stepgate-"));
        assert!(!same_prefix("x-stepgate", "x-stepgate-"));
        assert!(!same_prefix("x-stepgat_-a", "x-stepgate-"));
    }
}
