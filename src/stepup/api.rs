//! The challenge API (`{prefix}/api/...`, JSON in and out) and the two
//! operations it shares with the HTML page: start a challenge, verify a code.

use std::time::Duration;

use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;

use super::Stepup;
use crate::delivery::{mask_email, mask_phone, Channel, CodeMessage};
use crate::gateway::{json, json_error};
use crate::identity::Identity;
use crate::otp;
use crate::proxy::{Body, ClientConn};
use crate::store::{NewChallenge, StartOutcome};
use crate::telemetry::AuditEvent;
use crate::token::session_hash;

/// Largest JSON or form body the gateway reads.
pub(super) const MAX_BODY: usize = 8 * 1024;

/// Why a challenge operation was refused. Mapped to HTTP in one place.
#[derive(Debug)]
pub(super) enum ApiError {
    BadRequest(&'static str),
    /// A JSON field missing or not a string.
    Field {
        name: &'static str,
        missing: bool,
    },
    UnsupportedMediaType,
    MethodNotAllowed,
    UnknownMethod,
    CodeFormat,
    Cooldown(Duration),
    SendLimit(Duration),
    /// `max_sends_per_client` reached for this client address.
    ClientLimit(Duration),
    /// The channel's hourly budget is spent.
    BudgetExhausted(Duration),
    /// SMS to a number outside `stepup.sms.allowed_countries`.
    DestinationNotAllowed,
    Locked(Duration),
    Delivery,
    Unavailable,
    InvalidCode {
        attempts_left: u32,
    },
    Gone,
}

impl ApiError {
    pub(super) fn response(&self) -> Response<Body> {
        use ApiError::*;
        let (status, code, msg) = match self {
            BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", *m),
            Field { name, missing } => {
                let msg = if *missing {
                    format!("{name} is required")
                } else {
                    format!("{name} must be a string")
                };
                return json_error(StatusCode::BAD_REQUEST, "bad_request", &msg);
            }
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send application/json",
            ),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed",
            ),
            UnknownMethod => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_method",
                "that method is not available",
            ),
            CodeFormat => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_code_format",
                "the code has the wrong format",
            ),
            Cooldown(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_soon",
                "wait before asking for another code",
            ),
            SendLimit(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_codes",
                "too many codes requested; try later",
            ),
            ClientLimit(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_codes_from_client",
                "too many codes requested from this address; try later",
            ),
            BudgetExhausted(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "send_budget_exhausted",
                "no more codes can be sent on this channel for now; try later or another method",
            ),
            DestinationNotAllowed => (
                StatusCode::FORBIDDEN,
                "destination_not_allowed",
                "codes cannot be sent to this phone number; use another method",
            ),
            Locked(_) => (
                StatusCode::LOCKED,
                "locked",
                "too many wrong codes; try later",
            ),
            Delivery => (
                StatusCode::BAD_GATEWAY,
                "delivery_failed",
                "the code could not be sent; try again",
            ),
            Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "stepup_unavailable",
                "step-up is temporarily unavailable",
            ),
            InvalidCode { attempts_left } => {
                return json(
                    StatusCode::UNAUTHORIZED,
                    &serde_json::json!({"error": "invalid_code", "attempts_left": attempts_left}),
                );
            }
            Gone => (
                StatusCode::GONE,
                "challenge_gone",
                "this code has expired or was used; ask for a new one",
            ),
        };
        let mut res = json_error(status, code, msg);
        if let Some(wait) = self.retry_after() {
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(wait));
        }
        res
    }

    /// Whole seconds to wait, rounded up, for 423/429 answers.
    pub(super) fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Cooldown(d)
            | ApiError::SendLimit(d)
            | ApiError::ClientLimit(d)
            | ApiError::BudgetExhausted(d)
            | ApiError::Locked(d) => Some(d.as_secs() + u64::from(d.subsec_nanos() > 0)),
            _ => None,
        }
    }
}

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
    pub set_cookie: String,
}

pub(super) async fn serve(
    s: &Stepup,
    req: Request<Body>,
    sub: &str,
    id: &Identity,
    conn: ClientConn,
) -> Response<Body> {
    let post = req.method() == Method::POST;
    let result = match sub {
        "/api/methods" if req.method() == Method::GET => Ok(methods(s, id)),
        "/api/otp" if post => start_api(s, read_json(req).await, id, conn).await,
        "/api/otp/verify" if post => verify_api(s, read_json(req).await, id, conn).await,
        // A cross-site HTML form can only send these three types; refusing
        // them keeps logout from being triggered from another site.
        "/api/logout" if post && is_form_type(req.headers()) => Err(ApiError::UnsupportedMediaType),
        "/api/logout" if post => logout(s, req.headers(), id, conn).await,
        _ => Err(ApiError::MethodNotAllowed),
    };
    result.unwrap_or_else(|e| e.response())
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

/// A content type an HTML form can send cross-site without a preflight.
fn is_form_type(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase())
        .is_some_and(|t| {
            matches!(
                t.as_str(),
                "application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain"
            )
        })
}

async fn read_json(req: Request<Body>) -> Result<JsonObject, ApiError> {
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false);
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = read_body(req.into_body(), MAX_BODY).await?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::BadRequest("expected a JSON object")),
        Err(_) => Err(ApiError::BadRequest("malformed JSON")),
    }
}

/// Read a whole body of at most `max` bytes.
pub(super) async fn read_body(mut body: Body, max: usize) -> Result<bytes::Bytes, ApiError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ApiError::BadRequest("body unreadable"))?;
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > max {
                return Err(ApiError::BadRequest("body too large"));
            }
            buf.extend_from_slice(data);
        }
    }
    Ok(buf.freeze())
}

/// A string field of a JSON object body.
fn str_field<'a>(body: &'a JsonObject, name: &'static str) -> Result<&'a str, ApiError> {
    match body.get(name) {
        Some(Value::String(v)) => Ok(v.as_str()),
        Some(_) => Err(ApiError::Field {
            name,
            missing: false,
        }),
        None => Err(ApiError::Field {
            name,
            missing: true,
        }),
    }
}

async fn start_api(
    s: &Stepup,
    body: Result<JsonObject, ApiError>,
    id: &Identity,
    conn: ClientConn,
) -> Result<Response<Body>, ApiError> {
    let body = body?;
    let channel = Channel::parse(str_field(&body, "method")?).ok_or(ApiError::UnknownMethod)?;
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
    body: Result<JsonObject, ApiError>,
    id: &Identity,
    conn: ClientConn,
) -> Result<Response<Body>, ApiError> {
    let body = body?;
    let challenge_id = str_field(&body, "challenge_id")?;
    if challenge_id.is_empty() || challenge_id.len() > 64 {
        return Err(ApiError::BadRequest("challenge_id must be a short string"));
    }
    let code = str_field(&body, "code")?;
    let issued = verify(s, id, challenge_id, code, conn).await?;
    let mut res = json(
        StatusCode::OK,
        &serde_json::json!({"token": issued.token, "expires_in": issued.expires_in}),
    );
    if let Ok(v) = HeaderValue::from_str(&issued.set_cookie) {
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
) -> Result<Started, ApiError> {
    let client = conn.peer.ip();
    let target = s
        .contacts(id)
        .into_iter()
        .find(|(c, _)| *c == channel)
        .map(|(_, t)| t.to_string())
        .ok_or(ApiError::UnknownMethod)?;
    if channel == Channel::Sms && !s.sms_destination_allowed(&target) {
        s.refused(id, channel, client, "sms_country");
        return Err(ApiError::DestinationNotAllowed);
    }
    let notifier = s.notifier(channel).ok_or(ApiError::UnknownMethod)?;
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
            return Err(ApiError::Locked(retry_after));
        }
        Ok(StartOutcome::Cooldown { retry_after }) => {
            s.metrics.send_refused(channel.as_str(), "cooldown");
            return Err(ApiError::Cooldown(retry_after));
        }
        Ok(StartOutcome::SendLimit { retry_after }) => {
            s.refused(id, channel, client, "max_sends");
            return Err(ApiError::SendLimit(retry_after));
        }
        Ok(StartOutcome::ClientLimit { retry_after }) => {
            s.refused(id, channel, client, "max_sends_per_client");
            return Err(ApiError::ClientLimit(retry_after));
        }
        Ok(StartOutcome::BudgetExhausted { retry_after }) => {
            s.refused(id, channel, client, "hourly_budget");
            return Err(ApiError::BudgetExhausted(retry_after));
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start challenge");
            return Err(ApiError::Unavailable);
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
        return Err(ApiError::Delivery);
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
) -> Result<Issued, ApiError> {
    let client = conn.peer.ip();
    if !otp::well_formed(code, s.cfg.otp.length) {
        return Err(ApiError::CodeFormat);
    }
    match s.store.locked(&id.subject).await {
        Ok(Some(wait)) => return Err(ApiError::Locked(wait)),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, "cannot check lockout");
            return Err(ApiError::Unavailable);
        }
    }
    let challenge = match s.store.lookup(challenge_id).await {
        Ok(Some(c)) => c,
        Ok(None) => return Err(ApiError::Gone),
        Err(e) => {
            tracing::error!(error = %e, "cannot look up challenge");
            return Err(ApiError::Unavailable);
        }
    };
    // Another user's (or another sign-in's) challenge looks exactly like a
    // missing one: nothing is revealed and nothing is counted against it.
    if challenge.subject != id.subject || challenge.session != session_hash(&id.session) {
        return Err(ApiError::Gone);
    }
    let presented = otp::hash_code(&s.cfg.token.secret, challenge_id, code);
    if !otp::ct_eq(&presented, &challenge.code_hash) {
        let failure = s
            .store
            .fail(challenge_id, &id.subject, &s.limits)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot record failure");
                ApiError::Unavailable
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
            return Err(ApiError::Locked(wait));
        }
        return Err(ApiError::InvalidCode {
            attempts_left: failure.attempts_left,
        });
    }
    match s.store.consume(challenge_id).await {
        Ok(true) => {}
        Ok(false) => return Err(ApiError::Gone),
        Err(e) => {
            tracing::error!(error = %e, "cannot consume challenge");
            return Err(ApiError::Unavailable);
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
        .map_err(|_| ApiError::Unavailable)?;
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
) -> Result<Response<Body>, ApiError> {
    if let Some(sf) = s
        .presented_token(headers)
        .and_then(|t| s.tokens.verify(t).ok())
    {
        if sf.subject == id.subject {
            let ttl = crate::token::mark_ttl(sf.exp);
            s.store.revoke(&sf.jti, ttl).await.map_err(|e| {
                tracing::error!(error = %e, "cannot revoke token");
                ApiError::Unavailable
            })?;
            s.audit(AuditEvent::Logout, id, Some(sf.channel), conn.peer.ip(), "");
        }
    }
    let mut res = Response::new(crate::proxy::empty());
    *res.status_mut() = StatusCode::NO_CONTENT;
    if let Ok(v) = HeaderValue::from_str(&s.clear_cookie()) {
        res.headers_mut().insert(SET_COOKIE, v);
    }
    Ok(res)
}
