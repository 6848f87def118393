//! The challenge page (`{prefix}/challenge`): plain HTML forms that work
//! without JavaScript, protected by a CSRF token bound to the session.

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
            page(s, id, &rd, view, StatusCode::OK)
        }
        ("/challenge/send", &Method::POST) | ("/challenge/verify", &Method::POST) => {
            let body = match api::read_body(req.into_body()).await {
                Ok(b) => b,
                Err(e) => return e.response(),
            };
            let form = parse_form(&String::from_utf8_lossy(&body));
            let rd = safe_rd(get(&form, "rd"));
            let csrf_ok = get(&form, "csrf")
                .is_some_and(|t| otp::ct_eq(t.as_bytes(), csrf_token(s, id).as_bytes()));
            if !csrf_ok {
                return page(
                    s,
                    id,
                    &rd,
                    View::Choose {
                        error: Some("Your session on this page expired. Please try again.".into()),
                    },
                    StatusCode::FORBIDDEN,
                );
            }
            if sub == "/challenge/send" {
                send(s, id, &form, &rd, conn).await
            } else {
                verify(s, id, &form, &rd, conn).await
            }
        }
        _ => api::ApiError::MethodNotAllowed.response(),
    }
}

async fn send(
    s: &Stepup,
    id: &Identity,
    form: &[(String, String)],
    rd: &str,
    conn: ClientConn,
) -> Response<Body> {
    let Some(channel) = get(form, "channel").and_then(Channel::parse) else {
        return page(
            s,
            id,
            rd,
            View::Choose {
                error: Some("Choose where to send the code.".into()),
            },
            StatusCode::BAD_REQUEST,
        );
    };
    match api::start(s, id, channel, conn).await {
        Ok(st) => see_other(&format!(
            "{}/challenge?rd={}&cid={}&ch={}",
            s.cfg.prefix,
            url_encode(rd),
            url_encode(&st.challenge_id),
            channel.as_str()
        )),
        Err(e) => {
            let status = e.response().status();
            page(
                s,
                id,
                rd,
                View::Choose {
                    error: Some(message(&e)),
                },
                status,
            )
        }
    }
}

async fn verify(
    s: &Stepup,
    id: &Identity,
    form: &[(String, String)],
    rd: &str,
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
            let mut res = see_other(rd);
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
            page(s, id, rd, view, status)
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
        ApiError::Cooldown(_) | ApiError::SendLimit(_) => format!(
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
        ApiError::UnknownMethod => "That way of receiving a code is not available.".into(),
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

fn page(s: &Stepup, id: &Identity, rd: &str, view: View, status: StatusCode) -> Response<Body> {
    let b = &s.cfg.branding;
    let prefix = &s.cfg.prefix;
    let csrf = csrf_token(s, id);
    let product = esc(&b.product);
    let mut main = String::new();
    match view {
        View::Choose { error } => {
            let methods = s.methods(id);
            if let Some(e) = &error {
                main.push_str(&format!(
                    r#"<p class="err" role="alert" id="err">{}</p>"#,
                    esc(e)
                ));
            }
            if methods.is_empty() {
                main.push_str("<p>No way to send you a code is set up for your account. Contact your administrator.</p>");
            } else {
                main.push_str(&format!(
                    r#"<form method="post" action="{prefix}/challenge/send"><fieldset><legend>Where should we send a code?</legend>"#
                ));
                for (i, (c, target)) in methods.iter().enumerate() {
                    let masked = match c {
                        Channel::Email => mask_email(target),
                        Channel::Sms => mask_phone(target),
                    };
                    let label = match c {
                        Channel::Email => "Email",
                        Channel::Sms => "Text message",
                    };
                    main.push_str(&format!(
                        r#"<label><input type="radio" name="channel" value="{v}"{checked}> {label} to <b>{t}</b></label>"#,
                        v = c.as_str(),
                        checked = if i == 0 { " checked" } else { "" },
                        t = esc(&masked)
                    ));
                }
                main.push_str(&format!(
                    r#"</fieldset><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="rd" value="{rd}"><button type="submit" id="send">Send code</button></form>"#,
                    rd = esc(rd)
                ));
            }
        }
        View::Code {
            cid,
            channel,
            error,
        } => {
            let described = if error.is_some() {
                r#" aria-describedby="err" aria-invalid="true""#
            } else {
                ""
            };
            main.push_str(&format!(
                r#"<form method="post" action="{prefix}/challenge/verify"><p>We sent a code by {via}. It expires in {mins} minutes.</p>"#,
                via = if channel == Channel::Email { "email" } else { "text message" },
                mins = s.cfg.otp.ttl.as_secs().div_ceil(60)
            ));
            if let Some(e) = &error {
                main.push_str(&format!(
                    r#"<p class="err" role="alert" id="err">{}</p>"#,
                    esc(e)
                ));
            }
            main.push_str(&format!(
                r#"<label for="code">Verification code</label><input id="code" name="code" inputmode="numeric" autocomplete="one-time-code" pattern="[0-9]*" maxlength="{len}" required autofocus{described}><input type="hidden" name="cid" value="{cid}"><input type="hidden" name="ch" value="{ch}"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="rd" value="{rd}"><button type="submit" id="verify">Verify</button></form>"#,
                len = s.cfg.otp.length,
                cid = esc(&cid),
                ch = channel.as_str(),
                rd = esc(rd)
            ));
            main.push_str(&format!(
                r#"<form method="post" action="{prefix}/challenge/send"><input type="hidden" name="channel" value="{ch}"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="rd" value="{rd}"><button type="submit" class="link" id="resend">Send a new code</button></form>"#,
                ch = channel.as_str(),
                rd = esc(rd)
            ));
        }
    }
    let logo = b
        .logo_url
        .as_deref()
        .map(|u| format!(r#"<img src="{}" alt="" height="32">"#, esc(u)))
        .unwrap_or_default();
    let html = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>Verify it's you · {product}</title><style>
body{{font:16px/1.5 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d1f23}}
main{{max-width:26rem;margin:8vh auto;background:#fff;padding:1.5rem;border-radius:.75rem;box-shadow:0 1px 4px #0002}}
h1{{font-size:1.3rem;margin:.5rem 0 1rem}}fieldset{{border:0;padding:0;margin:0 0 1rem}}legend{{margin-bottom:.5rem}}
label{{display:block;margin:.4rem 0}}input[name=code]{{font-size:1.5rem;letter-spacing:.3em;width:100%;box-sizing:border-box;padding:.4rem}}
button{{background:{accent};color:#fff;border:0;border-radius:.4rem;padding:.6rem 1.2rem;font-size:1rem;margin-top:.8rem;cursor:pointer}}
button.link{{background:none;color:{accent};padding:0;text-decoration:underline}}
.err{{color:#a40000;background:#fdecec;padding:.5rem;border-radius:.4rem}}:focus-visible{{outline:3px solid {accent};outline-offset:2px}}
</style></head><body><main>{logo}<h1>Verify it's you</h1><p>{product} needs a fresh confirmation before you continue.</p>{main}</main></body></html>"#,
        accent = b.accent,
    );
    let mut res = Response::new(crate::proxy::full(html));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    res
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

/// HTML-escape text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Parse `application/x-www-form-urlencoded` (also query strings).
fn parse_form(s: &str) -> Vec<(String, String)> {
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
