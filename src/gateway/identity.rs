//! Phase 3, identity: who the signed-in user is (JWT or trusted header).
//! The [`Identity`](crate::identity::Identity) travels on in the request's
//! extensions. An invalid credential is treated as none (the policy
//! decides whether one is needed); two different ones are refused.

use http::Request;

use super::{Exchange, State};
use crate::http::{Body, Rejection};
use crate::identity::IdentityError;

pub(super) async fn run(
    s: &State,
    req: &mut Request<Body>,
    ex: &mut Exchange<'_>,
) -> Result<(), Rejection> {
    // A primary token comes in `Authorization` or `Cookie`; without
    // either (and without a trusted-header identity) there is none to find.
    if !ex.carried.authorization
        && !ex.carried.cookie
        && s.auth.trusted_header_names().next().is_none()
    {
        return Ok(());
    }
    // The query of the request decided (the original one in forward-auth).
    let query = ex.target.split_once('?').map(|(_, q)| q);
    match s
        .auth
        .authenticate_shared(req.headers(), query, ex.conn.peer.ip())
        .await
    {
        Ok(Some(id)) => {
            req.extensions_mut().insert(id);
        }
        Ok(None) => {}
        Err(IdentityError::Ambiguous) => return Err(Rejection::AmbiguousCredentials),
        Err(e) => tracing::debug!(error = %e, "primary credential refused"),
    }
    Ok(())
}

/// The refusal for a request that needs an identity and has none: sign in,
/// or, while the identity provider's keys have not arrived, 503 (its token
/// could not be checked, so fail closed rather than ask for a new sign-in).
pub(super) fn missing(s: &State) -> Rejection {
    if s.auth.keys_ready() {
        Rejection::Unauthenticated
    } else {
        Rejection::IdentityUnavailable
    }
}
