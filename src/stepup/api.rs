//! The challenge API (`{prefix}/api/...`, JSON in and out) and the two
//! operations it shares with the HTML page: start a challenge, verify a code.

use http::header::SET_COOKIE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use serde_json::Value;

use super::Stepup;
use crate::channel::Channel;
use crate::delivery::{mask_email, mask_phone, CodeMessage};
use crate::http::negotiate::{is_form_type, is_json};
use crate::http::response::{json, no_content};
use crate::http::{read_limited, Body, Rejection};
use crate::identity::Identity;
use crate::otp;
use crate::proxy::ClientConn;
use crate::store::{NewChallenge, StartOutcome};
use crate::telemetry::AuditEvent;
use crate::token::session_hash;

/// Largest JSON or form body the gateway reads.
pub(super) const MAX_BODY: usize = 8 * 1024;

/// A started challenge, as the client sees it.
pub(super) struct Started {
    pub challenge_id: String,
    pub expires_in: u64,
    pub resend_after: u64,
}

/// A verified code: the token and its lifetime.
pub(super) struct Issued {
    pub token: String,
    pub expires_in: u64,
    pub set_cookie: Option<HeaderValue>,
}

pub(super) async fn serve(
    s: &Stepup,
    req: Request<Body>,
    sub: &str,
    id: &Identity,
    conn: ClientConn,
) -> Result<Response<Body>, Rejection> {
    let post = req.method() == Method::POST;
    match sub {
        "/api/methods" if req.method() == Method::GET => Ok(methods(s, id)),
        "/api/otp" if post => start_api(s, read_json(req).await, id, conn).await,
        "/api/otp/verify" if post => verify_api(s, read_json(req).await, id, conn).await,
        // A cross-site HTML form can only send these three types; refusing
        // them keeps logout from being triggered from another site.
        "/api/logout" if post && is_form_type(req.headers()) => {
            Err(Rejection::UnsupportedMediaType)
        }
        "/api/logout" if post => logout(s, req.headers(), id, conn).await,
        _ => Err(Rejection::MethodNotAllowed),
    }
}

fn methods(s: &Stepup, id: &Identity) -> Response<Body> {
    let list: Vec<Value> = s
        .methods(id)
        .into_iter()
        .map(|(c, target)| {
            let masked = match c {
                Channel::Email => mask_email(target),
                Channel::Sms => mask_phone(target),
            };
            serde_json::json!({"id": c.as_str(), "target": masked})
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "methods": list }))
}

/// Read a JSON object body of at most [`MAX_BODY`] bytes. Requiring the
/// JSON content type also keeps cross-site form posts out (they cannot set
/// it without a CORS preflight).
type JsonObject = serde_json::Map<String, Value>;

async fn read_json(req: Request<Body>) -> Result<JsonObject, Rejection> {
    if !is_json(req.headers()) {
        return Err(Rejection::UnsupportedMediaType);
    }
    let bytes = read_limited(req.into_body(), MAX_BODY).await?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Rejection::BadRequest("expected a JSON object")),
        Err(_) => Err(Rejection::BadRequest("malformed JSON")),
    }
}

/// A string field of a JSON object body.
fn str_field<'a>(body: &'a JsonObject, name: &'static str) -> Result<&'a str, Rejection> {
    match body.get(name) {
        Some(Value::String(v)) => Ok(v.as_str()),
        Some(_) => Err(Rejection::BadField {
            name,
            missing: false,
        }),
        None => Err(Rejection::BadField {
            name,
            missing: true,
        }),
    }
}

async fn start_api(
    s: &Stepup,
    body: Result<JsonObject, Rejection>,
    id: &Identity,
    conn: ClientConn,
) -> Result<Response<Body>, Rejection> {
    let body = body?;
    let channel = Channel::parse(str_field(&body, "method")?).ok_or(Rejection::UnknownChannel)?;
    let st = start(s, id, channel, conn).await?;
    Ok(json(
        StatusCode::ACCEPTED,
        &serde_json::json!({
            "challenge_id": st.challenge_id,
            "expires_in": st.expires_in,
            "resend_after": st.resend_after,
        }),
    ))
}

async fn verify_api(
    s: &Stepup,
    body: Result<JsonObject, Rejection>,
    id: &Identity,
    conn: ClientConn,
) -> Result<Response<Body>, Rejection> {
    let body = body?;
    let challenge_id = str_field(&body, "challenge_id")?;
    if challenge_id.is_empty() || challenge_id.len() > 64 {
        return Err(Rejection::BadRequest("challenge_id must be a short string"));
    }
    let code = str_field(&body, "code")?;
    let issued = verify(s, id, challenge_id, code, conn).await?;
    let mut res = json(
        StatusCode::OK,
        &serde_json::json!({"token": issued.token, "expires_in": issued.expires_in}),
    );
    if let Some(v) = issued.set_cookie {
        res.headers_mut().insert(SET_COOKIE, v);
    }
    Ok(res)
}

/// Start a challenge on `channel` and deliver its code.
pub(super) async fn start(
    s: &Stepup,
    id: &Identity,
    channel: Channel,
    conn: ClientConn,
) -> Result<Started, Rejection> {
    let client = conn.peer.ip();
    let target = s
        .contacts(id)
        .into_iter()
        .find(|(c, _)| *c == channel)
        .map(|(_, t)| t.to_string())
        .ok_or(Rejection::UnknownChannel)?;
    if channel == Channel::Sms && !s.sms_destination_allowed(&target) {
        s.refused(id, channel, client, "sms_country");
        return Err(Rejection::DestinationNotAllowed);
    }
    let notifier = s.notifier(channel).ok_or(Rejection::UnknownChannel)?;
    let challenge_id = otp::random_id();
    let code = otp::generate_code(s.cfg.otp.length);
    let new = NewChallenge {
        id: challenge_id.clone(),
        subject: id.subject.clone(),
        session: session_hash(&id.session),
        channel,
        code_hash: otp::hash_code(&s.cfg.token.secret, &challenge_id, &code),
        client: crate::store::client_key(client),
    };
    match s.store.start(&new, &s.limits).await {
        Ok(StartOutcome::Started) => {}
        Ok(StartOutcome::Locked { retry_after }) => {
            s.refused(id, channel, client, "locked");
            return Err(Rejection::Locked(retry_after));
        }
        Ok(StartOutcome::Cooldown { retry_after }) => {
            s.metrics.send_refused(channel.as_str(), "cooldown");
            return Err(Rejection::Cooldown(retry_after));
        }
        Ok(StartOutcome::SendLimit { retry_after }) => {
            s.refused(id, channel, client, "max_sends");
            return Err(Rejection::SendLimit(retry_after));
        }
        Ok(StartOutcome::ClientLimit { retry_after }) => {
            s.refused(id, channel, client, "max_sends_per_client");
            return Err(Rejection::ClientLimit(retry_after));
        }
        Ok(StartOutcome::BudgetExhausted { retry_after }) => {
            s.refused(id, channel, client, "hourly_budget");
            return Err(Rejection::BudgetExhausted(retry_after));
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start challenge");
            return Err(Rejection::StepupUnavailable);
        }
    }
    s.audit(AuditEvent::ChallengeStarted, id, Some(channel), client, "");
    let msg = CodeMessage {
        to: &target,
        code: &code,
        ttl: s.limits.ttl,
        product: &s.cfg.branding.product,
    };
    if let Err(e) = notifier.send(&msg).await {
        tracing::warn!(error = %e, channel = channel.as_str(), "code delivery failed");
        s.audit(AuditEvent::DeliveryFailed, id, Some(channel), client, "");
        // A failed delivery must not cost the user their cooldown or a send.
        if let Err(e) = s.store.abort(&new).await {
            tracing::error!(error = %e, "cannot undo challenge after delivery failure");
        }
        return Err(Rejection::DeliveryFailed);
    }
    s.audit(AuditEvent::CodeSent, id, Some(channel), client, "");
    Ok(Started {
        challenge_id,
        expires_in: s.limits.ttl.as_secs(),
        resend_after: s.limits.resend_after.as_secs(),
    })
}

/// Check `code` against challenge `challenge_id` of this user and session.
pub(super) async fn verify(
    s: &Stepup,
    id: &Identity,
    challenge_id: &str,
    code: &str,
    conn: ClientConn,
) -> Result<Issued, Rejection> {
    let client = conn.peer.ip();
    if !otp::well_formed(code, s.cfg.otp.length) {
        return Err(Rejection::CodeFormat);
    }
    match s.store.locked(&id.subject).await {
        Ok(Some(wait)) => return Err(Rejection::Locked(wait)),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, "cannot check lockout");
            return Err(Rejection::StepupUnavailable);
        }
    }
    let challenge = match s.store.lookup(challenge_id).await {
        Ok(Some(c)) => c,
        Ok(None) => return Err(Rejection::ChallengeGone),
        Err(e) => {
            tracing::error!(error = %e, "cannot look up challenge");
            return Err(Rejection::StepupUnavailable);
        }
    };
    // Another user's (or another sign-in's) challenge looks exactly like a
    // missing one: nothing is revealed and nothing is counted against it.
    if challenge.subject != id.subject || challenge.session != session_hash(&id.session) {
        return Err(Rejection::ChallengeGone);
    }
    let presented = otp::hash_code(&s.cfg.token.secret, challenge_id, code);
    if !otp::ct_eq(&presented, &challenge.code_hash) {
        let failure = s
            .store
            .fail(challenge_id, &id.subject, &s.limits)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot record failure");
                Rejection::StepupUnavailable
            })?;
        s.audit(
            AuditEvent::VerifyFailed,
            id,
            Some(challenge.channel),
            client,
            "",
        );
        if let Some(wait) = failure.locked_for {
            s.audit(AuditEvent::Lockout, id, Some(challenge.channel), client, "");
            return Err(Rejection::Locked(wait));
        }
        return Err(Rejection::InvalidCode {
            attempts_left: failure.attempts_left,
        });
    }
    match s.store.consume(challenge_id).await {
        Ok(true) => {}
        Ok(false) => return Err(Rejection::ChallengeGone),
        Err(e) => {
            tracing::error!(error = %e, "cannot consume challenge");
            return Err(Rejection::StepupUnavailable);
        }
    }
    s.audit(
        AuditEvent::VerifyOk,
        id,
        Some(challenge.channel),
        client,
        "",
    );
    let token = s
        .tokens
        .issue(&id.subject, &id.session, challenge.channel)
        .map_err(|_| Rejection::StepupUnavailable)?;
    s.audit(
        AuditEvent::TokenIssued,
        id,
        Some(challenge.channel),
        client,
        "",
    );
    Ok(Issued {
        set_cookie: s.token_cookie(&token),
        token,
        expires_in: s.tokens.lifetime().as_secs(),
    })
}

async fn logout(
    s: &Stepup,
    headers: &http::HeaderMap,
    id: &Identity,
    conn: ClientConn,
) -> Result<Response<Body>, Rejection> {
    if let Some(sf) = s
        .presented_token(headers)
        .and_then(|t| s.tokens.verify(t).ok())
    {
        if sf.subject == id.subject {
            let ttl = crate::token::mark_ttl(sf.exp);
            s.store.revoke(&sf.jti, ttl).await.map_err(|e| {
                tracing::error!(error = %e, "cannot revoke token");
                Rejection::StepupUnavailable
            })?;
            s.audit(AuditEvent::Logout, id, Some(sf.channel), conn.peer.ip(), "");
        }
    }
    let mut res = no_content();
    if let Some(v) = s.clear_cookie() {
        res.headers_mut().insert(SET_COOKIE, v);
    }
    Ok(res)
}
