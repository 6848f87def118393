//! Phase 2, sanitise: remove what must never reach the upstream or be
//! believed — hop-by-hop headers (and those `Connection` names), the
//! gateway's own `X-Stepgate-*` headers and URL-rewrite headers, and
//! identity headers from peers not trusted to assert them. Runs before
//! anything reads identity, so nothing downstream can be fooled by them.

use http::Request;

use super::{Exchange, State};
use crate::http::Body;
use crate::proxy;
use crate::telemetry::Mode;

pub(super) fn run(s: &State, req: &mut Request<Body>, ex: &mut Exchange<'_>) {
    ex.upgrade = ex.mode == Mode::Proxy && proxy::wants_upgrade(req.headers(), req.version());
    let headers = req.headers_mut();
    proxy::strip_hop_by_hop(headers, ex.upgrade);
    proxy::strip_reserved(headers);
    if let Some(a) = &s.config.upstream.assertion {
        // Only the gateway speaks in this header, whatever its name.
        headers.remove(&a.header);
    }
    if !s.auth.trusts_header_from(ex.conn.peer.ip()) {
        for name in s.auth.trusted_header_names() {
            headers.remove(name);
        }
    }
}
