//! The challenge page (`{prefix}/challenge`): server-rendered HTML from
//! templates compiled into the binary (`templates/`), plain form posts that
//! work without JavaScript, a CSRF token bound to the session on every post,
//! and the replay of a form post that was interrupted by the challenge.

use askama::Template;
use http::header::SET_COOKIE;
use http::{Method, Request, Response, StatusCode};

use super::{api, Stash, Stepup};
use crate::channel::Channel;
use crate::delivery::{mask_email, mask_phone};
use crate::http::form::{self, get, query_value};
use crate::http::response::{html, redirect};
use crate::http::{read_limited, Body, Rejection};
use crate::identity::Identity;
use crate::otp;
use crate::proxy::ClientConn;

pub(super) async fn serve(
    s: &Stepup,
    req: Request<Body>,
    sub: &str,
    id: &Identity,
    conn: ClientConn,
) -> Result<Response<Body>, Rejection> {
    let query = form::parse(req.uri().query().unwrap_or("").as_bytes());
    match (sub, req.method()) {
        ("/challenge", &Method::GET) | ("/challenge", &Method::HEAD) => {
            let rd = safe_rd(get(&query, "rd"));
            let stash = stash_id(get(&query, "stash"));
            let cid = get(&query, "cid").filter(|c| !c.is_empty() && c.len() <= 64);
            let channel = get(&query, "ch").and_then(Channel::parse);
            let view = match (cid, channel) {
                (Some(cid), Some(ch)) => View::Code {
                    cid: cid.to_string(),
                    channel: ch,
                    error: None,
                },
                _ => View::Choose { error: None },
            };
            Ok(page(s, id, &Ctx { rd: &rd, stash }, view, StatusCode::OK))
        }
        ("/challenge/send", &Method::POST) | ("/challenge/verify", &Method::POST) => {
            let body = read_limited(req.into_body(), api::MAX_BODY).await?;
            let form = form::parse(&body);
            let rd = safe_rd(get(&form, "rd"));
            let ctx = Ctx {
                rd: &rd,
                stash: stash_id(get(&form, "stash")),
            };
            // Constant-time: the token is a MAC.
            let csrf_ok = get(&form, "csrf")
                .is_some_and(|t| otp::ct_eq(t.as_bytes(), csrf_token(s, id).as_bytes()));
            if !csrf_ok {
                let view = View::Choose {
                    error: Some("Your session on this page expired. Please try again.".into()),
                };
                return Ok(page(s, id, &ctx, view, StatusCode::FORBIDDEN));
            }
            Ok(if sub == "/challenge/send" {
                send(s, id, &form, &ctx, conn).await
            } else {
                verify(s, id, &form, &ctx, conn).await
            })
        }
        _ => Err(Rejection::MethodNotAllowed),
    }
}

async fn send(
    s: &Stepup,
    id: &Identity,
    form: &[(String, String)],
    ctx: &Ctx<'_>,
    conn: ClientConn,
) -> Response<Body> {
    let Some(channel) = get(form, "channel").and_then(Channel::parse) else {
        let view = View::Choose {
            error: Some("Choose where to send the code.".into()),
        };
        return page(s, id, ctx, view, StatusCode::BAD_REQUEST);
    };
    match api::start(s, id, channel, conn).await {
        Ok(st) => {
            let mut location = format!(
                "{}/challenge?rd={}&cid={}&ch={}",
                s.cfg.prefix,
                query_value(ctx.rd),
                query_value(&st.challenge_id),
                channel.as_str()
            );
            if let Some(stash) = ctx.stash {
                location.push_str("&stash=");
                location.push_str(stash);
            }
            redirect(StatusCode::SEE_OTHER, &location)
        }
        Err(e) => {
            let status = e.status();
            let view = View::Choose {
                error: Some(message(&e)),
            };
            page(s, id, ctx, view, status)
        }
    }
}

async fn verify(
    s: &Stepup,
    id: &Identity,
    form: &[(String, String)],
    ctx: &Ctx<'_>,
    conn: ClientConn,
) -> Response<Body> {
    let cid = get(form, "cid").unwrap_or("").to_string();
    let channel = get(form, "ch")
        .and_then(Channel::parse)
        .unwrap_or(Channel::Email);
    let code: String = get(form, "code")
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    match api::verify(s, id, &cid, &code, conn).await {
        Ok(issued) => {
            let replay = match ctx.stash {
                Some(stash) => s.take_stash(stash, id).await,
                None => None,
            };
            let mut res = match replay {
                Some(stashed) => continue_page(s, &stashed),
                None => redirect(StatusCode::SEE_OTHER, ctx.rd),
            };
            if let Some(v) = issued.set_cookie {
                res.headers_mut().insert(SET_COOKIE, v);
            }
            res
        }
        Err(e) => {
            let status = e.status();
            let view = match e {
                Rejection::InvalidCode { .. } | Rejection::CodeFormat => View::Code {
                    cid,
                    channel,
                    error: Some(message(&e)),
                },
                _ => View::Choose {
                    error: Some(message(&e)),
                },
            };
            page(s, id, ctx, view, status)
        }
    }
}

/// A refusal in the page's words.
fn message(e: &Rejection) -> String {
    match e {
        Rejection::InvalidCode { attempts_left } => {
            format!("That code is not right. {attempts_left} attempt(s) left.")
        }
        Rejection::CodeFormat => "Enter the digits from the message.".into(),
        Rejection::ChallengeGone => {
            "That code has expired or was already used. Ask for a new one.".into()
        }
        Rejection::Cooldown(_)
        | Rejection::SendLimit(_)
        | Rejection::ClientLimit(_)
        | Rejection::BudgetExhausted(_) => format!(
            "Too many codes requested. Try again in {} seconds.",
            e.retry_after().unwrap_or(0)
        ),
        Rejection::Locked(_) => format!(
            "Too many wrong codes. Try again in {} minutes.",
            e.retry_after().unwrap_or(0).div_ceil(60)
        ),
        Rejection::DeliveryFailed => "The code could not be sent. Please try again.".into(),
        Rejection::StepupUnavailable => {
            "Verification is unavailable right now. Please try again shortly.".into()
        }
        Rejection::UnknownChannel | Rejection::DestinationNotAllowed => {
            "That way of receiving a code is not available.".into()
        }
        _ => "Something was wrong with that request. Please try again.".into(),
    }
}

/// The CSRF token for this user's session: a keyed hash, so it needs no
/// storage and is useless under any other session.
fn csrf_token(s: &Stepup, id: &Identity) -> String {
    let mac = otp::keyed_hash(&s.cfg.token.secret, &[b"csrf", id.session.as_bytes()]);
    mac.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// `rd` if it is a path on this host, else `/`.
pub fn safe_rd(rd: Option<&str>) -> String {
    let Some(rd) = rd else { return "/".into() };
    let b = rd.as_bytes();
    let ok = b.first() == Some(&b'/')
        && !matches!(b.get(1), Some(b'/') | Some(b'\\'))
        && !rd.contains('\\')
        && !rd.chars().any(|c| c.is_control() || c.is_whitespace())
        && rd.len() <= 2048;
    if ok {
        rd.to_string()
    } else {
        "/".into()
    }
}

/// What every form on the page carries along.
pub(super) struct Ctx<'a> {
    rd: &'a str,
    stash: Option<&'a str>,
}

enum View {
    Choose {
        error: Option<String>,
    },
    Code {
        cid: String,
        channel: Channel,
        error: Option<String>,
    },
}

struct MethodView {
    id: &'static str,
    label: &'static str,
    target: String,
}

#[derive(Template)]
#[template(path = "challenge.html")]
struct ChallengePage<'a> {
    brand: &'a super::Branding,
    prefix: &'a str,
    csrf: String,
    nonce: String,
    rd: &'a str,
    stash: Option<&'a str>,
    error: Option<String>,
    methods: Vec<MethodView>,
    cid: Option<String>,
    channel: &'static str,
    via: &'static str,
    code_length: u32,
    ttl_minutes: u64,
    resend_after: u64,
}

#[derive(Template)]
#[template(path = "continue.html")]
struct ContinuePage<'a> {
    brand: &'a super::Branding,
    nonce: String,
    action: &'a str,
    enctype: Option<&'a str>,
    fields: Vec<(String, String)>,
}

fn page(
    s: &Stepup,
    id: &Identity,
    ctx: &Ctx<'_>,
    view: View,
    status: StatusCode,
) -> Response<Body> {
    let methods = s
        .methods(id)
        .into_iter()
        .map(|(c, target)| MethodView {
            id: c.as_str(),
            label: match c {
                Channel::Email => "Email",
                Channel::Sms => "Text message",
            },
            target: match c {
                Channel::Email => mask_email(target),
                Channel::Sms => mask_phone(target),
            },
        })
        .collect();
    let (cid, channel, error) = match view {
        View::Choose { error } => (None, Channel::Email, error),
        View::Code {
            cid,
            channel,
            error,
        } => (Some(cid), channel, error),
    };
    let nonce = otp::random_id();
    let tpl = ChallengePage {
        brand: &s.cfg.branding,
        prefix: &s.cfg.prefix,
        csrf: csrf_token(s, id),
        nonce: nonce.clone(),
        rd: ctx.rd,
        stash: ctx.stash,
        error,
        methods,
        cid,
        channel: channel.as_str(),
        via: match channel {
            Channel::Email => "by email",
            Channel::Sms => "by text message",
        },
        code_length: s.cfg.otp.length,
        ttl_minutes: s.cfg.otp.ttl.as_secs().div_ceil(60),
        resend_after: s.cfg.otp.resend_after.as_secs(),
    };
    html(tpl.render(), status, &nonce)
}

/// The page that replays a stashed form post after verification.
fn continue_page(s: &Stepup, stashed: &Stash) -> Response<Body> {
    let nonce = otp::random_id();
    let tpl = ContinuePage {
        brand: &s.cfg.branding,
        nonce: nonce.clone(),
        action: &stashed.target,
        enctype: None,
        fields: form::parse(stashed.body.as_bytes()),
    };
    html(tpl.render(), StatusCode::OK, &nonce)
}

/// A stash id from a form or query, if it has the shape of one.
fn stash_id(v: Option<&str>) -> Option<&str> {
    v.filter(|s| {
        s.len() == 22
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // Open redirects: only paths on this host survive.
    fn rd_must_be_local() {
        for bad in [
            "//evil.com",
            "/\\evil.com",
            "https://evil.com",
            "javascript:alert(1)",
            "evil",
            "/a\\b",
            "/\tx",
            "",
        ] {
            assert_eq!(safe_rd(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(safe_rd(None), "/");
        assert_eq!(safe_rd(Some("/admin?x=1")), "/admin?x=1");
        // An encoded slash decodes to a path segment, not a second slash.
        let decode =
            |s| form::get(&form::parse(format!("rd={s}").as_bytes()), "rd").map(str::to_string);
        assert_eq!(safe_rd(decode("%2F%2Fevil.com").as_deref()), "/");
        assert_eq!(safe_rd(decode("/%2Fevil.com").as_deref()), "/");
    }
}
