//! The challenge page (`{prefix}/challenge`): server-rendered HTML from
//! templates compiled into the binary (`templates/`), plain form posts that
//! work without JavaScript, a CSRF token bound to the session on every post,
//! and the replay of a form post that was interrupted by the challenge.

use askama::Template;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};

use super::api::{self, ApiError};
use super::Stepup;
use crate::delivery::{mask_email, mask_phone, Channel};
use crate::gateway::url_encode;
use crate::identity::Identity;
use crate::otp;
use crate::proxy::{Body, ClientConn};

pub(super) async fn serve(
    s: &Stepup,
    req: Request<Body>,
    sub: &str,
    id: &Identity,
    conn: ClientConn,
) -> Response<Body> {
    let query = parse_form(req.uri().query().unwrap_or(""));
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
            page(s, id, &Ctx { rd: &rd, stash }, view, StatusCode::OK)
        }
        ("/challenge/send", &Method::POST) | ("/challenge/verify", &Method::POST) => {
            let body = match api::read_body(req.into_body(), api::MAX_BODY).await {
                Ok(b) => b,
                Err(e) => return e.response(),
            };
            let form = parse_form(&String::from_utf8_lossy(&body));
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
                return page(s, id, &ctx, view, StatusCode::FORBIDDEN);
            }
            if sub == "/challenge/send" {
                send(s, id, &form, &ctx, conn).await
            } else {
                verify(s, id, &form, &ctx, conn).await
            }
        }
        _ => api::ApiError::MethodNotAllowed.response(),
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
                url_encode(ctx.rd),
                url_encode(&st.challenge_id),
                channel.as_str()
            );
            if let Some(stash) = ctx.stash {
                location.push_str("&stash=");
                location.push_str(stash);
            }
            see_other(&location)
        }
        Err(e) => {
            let status = e.response().status();
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
                None => see_other(ctx.rd),
            };
            if let Ok(v) = HeaderValue::from_str(&issued.set_cookie) {
                res.headers_mut().insert(SET_COOKIE, v);
            }
            res
        }
        Err(e) => {
            let status = e.response().status();
            let view = match e {
                ApiError::InvalidCode { .. } | ApiError::CodeFormat => View::Code {
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

fn message(e: &ApiError) -> String {
    match e {
        ApiError::InvalidCode { attempts_left } => {
            format!("That code is not right. {attempts_left} attempt(s) left.")
        }
        ApiError::CodeFormat => "Enter the digits from the message.".into(),
        ApiError::Gone => "That code has expired or was already used. Ask for a new one.".into(),
        ApiError::Cooldown(_)
        | ApiError::SendLimit(_)
        | ApiError::ClientLimit(_)
        | ApiError::BudgetExhausted(_) => format!(
            "Too many codes requested. Try again in {} seconds.",
            e.retry_after().unwrap_or(0)
        ),
        ApiError::Locked(_) => format!(
            "Too many wrong codes. Try again in {} minutes.",
            e.retry_after().unwrap_or(0).div_ceil(60)
        ),
        ApiError::Delivery => "The code could not be sent. Please try again.".into(),
        ApiError::Unavailable => {
            "Verification is unavailable right now. Please try again shortly.".into()
        }
        ApiError::UnknownMethod | ApiError::DestinationNotAllowed => {
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
    brand: &'a crate::config::Branding,
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
    brand: &'a crate::config::Branding,
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
fn continue_page(s: &Stepup, stashed: &super::Stashed) -> Response<Body> {
    let nonce = otp::random_id();
    let tpl = ContinuePage {
        brand: &s.cfg.branding,
        nonce: nonce.clone(),
        action: &stashed.target,
        enctype: None,
        fields: parse_form(&stashed.body),
    };
    html(tpl.render(), StatusCode::OK, &nonce)
}

fn html(rendered: askama::Result<String>, status: StatusCode, nonce: &str) -> Response<Body> {
    let (body, status) = match rendered {
        Ok(b) => (b, status),
        Err(e) => {
            tracing::error!(error = %e, "template rendering failed");
            (
                "<!doctype html><title>Error</title><p>Something went wrong. Please try again.</p>"
                    .to_string(),
                StatusCode::INTERNAL_SERVER_ERROR,
            )
        }
    };
    let mut res = Response::new(crate::proxy::full(body));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let csp = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src https: data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert("content-security-policy", v);
    }
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    res
}

/// A stash id from a form or query, if it has the shape of one.
fn stash_id(v: Option<&str>) -> Option<&str> {
    v.filter(|s| {
        s.len() == 22
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

fn see_other(location: &str) -> Response<Body> {
    let mut res = Response::new(crate::proxy::empty());
    *res.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(location) {
        res.headers_mut().insert(LOCATION, v);
    }
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Parse `application/x-www-form-urlencoded` (also query strings).
pub fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
        assert_eq!(safe_rd(Some(&decode("%2F%2Fevil.com"))), "/");
        assert_eq!(safe_rd(Some(&decode("/%2Fevil.com"))), "/");
    }

    #[test]
    // Form decoding handles +, escapes and broken escapes without panicking.
    fn form_decoding() {
        let f = parse_form("a=1+2&b=%2Fx&c=%zz&d=%4&e");
        assert_eq!(get(&f, "a"), Some("1 2"));
        assert_eq!(get(&f, "b"), Some("/x"));
        assert_eq!(get(&f, "c"), Some("%zz"));
        assert_eq!(get(&f, "d"), Some("%4"));
        assert_eq!(get(&f, "e"), Some(""));
    }
}
