//! Phase 5, step-up: on a step-up rule, a fresh second factor bound to
//! this identity, or a challenge. The verified
//! [`SecondFactor`](crate::token::SecondFactor) travels on in the request's
//! extensions. A browser form post that meets a challenge is kept so it
//! can be replayed after verification.

use http::Request;

use super::{Exchange, State};
use crate::http::negotiate::Client;
use crate::http::{Body, Rejection};
use crate::identity::Identity;
use crate::policy::Action;
use crate::stepup::StepupCheck;
use crate::telemetry::Mode;

pub(super) async fn run(
    s: &State,
    req: &mut Request<Body>,
    ex: &mut Exchange<'_>,
) -> Result<(), Rejection> {
    let (Some(rule), Action::StepUp(need)) = (ex.rule, ex.action) else {
        return Ok(());
    };
    let id = req
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or(Rejection::Unauthenticated)?;
    let client = ex.conn.peer.ip();
    // Boxed: large and off the plain-proxy path.
    let check = Box::pin(
        s.stepup
            .check(req.headers(), &id, rule, need, client, ex.mode),
    )
    .await;
    match check {
        StepupCheck::Fresh(sf) => {
            req.extensions_mut().insert(sf);
            Ok(())
        }
        StepupCheck::FreshFromIdp(proof) => {
            req.extensions_mut().insert(proof);
            Ok(())
        }
        StepupCheck::Needed => {
            let codes = s.stepup.sends_codes_for(&need.factors);
            // Forward-auth never sees the body, so there is nothing to
            // keep; nor is there when only the identity provider can help
            // (the browser goes to sign in there, not to the challenge page).
            let stash = if ex.mode == Mode::Proxy && ex.client == Client::FormPost && codes {
                Box::pin(s.stepup.stash_form(req, &id, ex.host.as_deref())).await
            } else {
                None
            };
            let acr_values = need
                .idp
                .as_ref()
                .filter(|i| !i.acr.is_empty())
                .map(|i| i.acr.join(" "));
            Err(Rejection::StepUpRequired {
                max_age: need.max_age.as_secs(),
                acr_values,
                codes,
                stash,
            })
        }
        StepupCheck::Unavailable => Err(Rejection::StepupUnavailable),
    }
}
