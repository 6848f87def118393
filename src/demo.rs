//! `stepgate demo`: the whole product on one machine with nothing else
//! installed. A built-in sample "legacy app" runs as the upstream; it has a
//! dev sign-in page that mints a primary token cookie, a protected admin
//! area, a one-time export, and a dev-only page that shows the codes the
//! console channel "sent".

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::header::{HeaderValue, LOCATION, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::delivery::ConsoleNotifier;
use crate::http::cookies::set_cookie;
use crate::proxy::{full, Body};

/// How long a primary token minted by the sign-in page lives (and its
/// cookie).
const TOKEN_LIFETIME: Duration = Duration::from_secs(8 * 3600);

/// What the sample app needs to know.
struct App {
    jwt_secret: String,
    /// Set once the gateway is up: where the console codes are.
    console: OnceLock<Arc<ConsoleNotifier>>,
}

/// Start the sample app and the gateway on `listen` (port 0 picks one).
pub async fn start(listen: SocketAddr) -> Result<crate::Running, String> {
    let jwt_secret = crate::otp::random_id() + &crate::otp::random_id();
    let stepup_key = crate::otp::random_id() + &crate::otp::random_id();
    let app_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot start the sample app: {e}"))?;
    let app_addr = app_listener.local_addr().map_err(|e| e.to_string())?;
    let admin: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let config = Config::demo(listen, admin, app_addr, &jwt_secret, &stepup_key)
        .map_err(|e| e.to_string())?;
    let app = Arc::new(App {
        jwt_secret,
        console: OnceLock::new(),
    });
    tokio::spawn(serve_app(app.clone(), app_listener));
    let running = crate::start(config).await?;
    if let Some(console) = running.gateway.console() {
        let _ = app.console.set(console);
    }
    Ok(running)
}

/// Run the demo until `shutdown`, printing where to go.
pub async fn run(listen: SocketAddr, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    let running = start(listen).await?;
    let url = format!("http://{}/", display_addr(running.addr));
    println!("stepgate demo is running.\n");
    println!("  Open {url} and sign in with any name.");
    println!("  /admin needs a fresh code (max_age 2m), /billing/export a one-time code.");
    println!("  Codes appear below (\"code for ...\") and at {url}dev/codes\n");
    println!(
        "  Admin listener: http://{}/metrics   Stop with Ctrl-C.\n",
        running.admin_addr
    );
    shutdown.await;
    running.shutdown().await
}

fn display_addr(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

async fn serve_app(app: Arc<App>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(&app, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<Body> {
    let user = header(&req, "x-stepgate-user").map(str::to_string);
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/") => page(
            "Home",
            user.as_deref(),
            "<p>This is a sample legacy app behind stepgate. It has never heard of second factors; stepgate adds them.</p>\
             <ul><li><a href=\"/account\">Account</a> — needs you to be signed in</li>\
             <li><a href=\"/admin\">Admin</a> — needs a code no older than 2 minutes</li>\
             <li><a href=\"/billing/export\">Billing export</a> — needs a fresh code every time</li>\
             <li><a href=\"/dev/codes\">Dev: codes sent to you</a></li></ul>",
        ),
        (Method::GET, "/account") => page(
            "Account",
            user.as_deref(),
            &format!(
                "<p>Signed in as <b>{}</b> ({}).</p>",
                esc(user.as_deref().unwrap_or("?")),
                esc(header(&req, "x-stepgate-email").unwrap_or("no email"))
            ),
        ),
        (Method::GET, "/admin") | (Method::GET, "/admin/") => {
            let via = header(&req, "x-stepgate-stepup").unwrap_or("?");
            let age = header(&req, "x-stepgate-stepup-age").unwrap_or("?");
            page(
                "Admin console",
                user.as_deref(),
                &format!(
                    "<p id=\"admin-ok\">Welcome to the admin console. You verified by <b>{}</b> {} seconds ago.</p>\
                     <form method=\"post\" action=\"/admin/settings\"><label for=\"motd\">Message of the day</label> \
                     <input id=\"motd\" name=\"motd\"> <button type=\"submit\" id=\"save\">Save</button></form>",
                    esc(via),
                    esc(age)
                ),
            )
        }
        (Method::POST, "/admin/settings") => {
            let Some(body) = read_form(req).await else {
                return too_large(user.as_deref());
            };
            let motd = form_value(&body, "motd").unwrap_or_default();
            page("Saved", user.as_deref(), &format!("<p id=\"saved\">Saved message of the day: <b>{}</b></p>", esc(&motd)))
        }
        (Method::GET, "/billing/export") => {
            let mut res = Response::new(full(format!(
                "invoice,amount\n2026-001,120.00\n2026-002,80.50\n# exported for {}\n",
                user.as_deref().unwrap_or("?")
            )));
            res.headers_mut().insert("content-type", HeaderValue::from_static("text/csv"));
            res
        }
        (Method::GET, "/login") => {
            let rd = query_value(req.uri().query().unwrap_or(""), "rd").unwrap_or_else(|| "/".into());
            page(
                "Sign in (dev)",
                None,
                &format!(
                    "<p>A stand-in for your identity provider: it signs a primary token for whoever you say.</p>\
                     <form method=\"post\" action=\"/login\">\
                     <p><label for=\"name\">Name</label><br><input id=\"name\" name=\"name\" value=\"jane\" required></p>\
                     <p><label for=\"email\">Email</label><br><input id=\"email\" name=\"email\" value=\"jane@example.com\"></p>\
                     <p><label for=\"phone\">Phone</label><br><input id=\"phone\" name=\"phone\" value=\"+15550100123\"></p>\
                     <input type=\"hidden\" name=\"rd\" value=\"{}\"><button type=\"submit\" id=\"signin\">Sign in</button></form>",
                    esc(&rd)
                ),
            )
        }
        (Method::POST, "/login") => {
            let Some(body) = read_form(req).await else {
                return too_large(None);
            };
            let name = form_value(&body, "name").filter(|n| !n.trim().is_empty()).unwrap_or_else(|| "jane".into());
            let token = mint(app, &name, form_value(&body, "email"), form_value(&body, "phone"));
            let rd = crate::stepup::safe_rd(form_value(&body, "rd").as_deref());
            let mut res = see_other(&rd);
            if let Some(v) = set_cookie("access_token", &token, TOKEN_LIFETIME, false) {
                res.headers_mut().append(SET_COOKIE, v);
            }
            res
        }
        (Method::GET, "/logout") => {
            let mut res = see_other("/");
            for c in ["access_token", "stepgate_sf"] {
                if let Some(v) = set_cookie(c, "", Duration::ZERO, false) {
                    res.headers_mut().append(SET_COOKIE, v);
                }
            }
            res
        }
        (Method::GET, "/dev/codes") => {
            let claims = crate::http::cookies::cookie(req.headers(), "access_token").and_then(|t| decode(app, t));
            let body = match (claims, app.console.get()) {
                (Some((email, phone)), Some(console)) => {
                    let email_code = email.as_deref().and_then(|e| console.last_code(e));
                    let phone_code = phone.as_deref().and_then(|p| console.last_code(p));
                    format!(
                        "<p>Codes the console channel \"sent\" to you (dev only):</p><ul>\
                         <li>email: <b id=\"email-code\">{}</b></li><li>sms: <b id=\"sms-code\">{}</b></li></ul>\
                         <p><a href=\"/dev/codes\">Refresh</a></p>",
                        esc(email_code.as_deref().unwrap_or("none yet")),
                        esc(phone_code.as_deref().unwrap_or("none yet"))
                    )
                }
                _ => "<p>Sign in first: <a href=\"/login?rd=/dev/codes\">sign in</a>.</p>".into(),
            };
            page("Dev: your codes", user.as_deref(), &body)
        }
        _ => {
            let mut res = page("Not found", user.as_deref(), "<p>No such page.</p>");
            *res.status_mut() = StatusCode::NOT_FOUND;
            res
        }
    }
}

fn mint(app: &App, name: &str, email: Option<String>, phone: Option<String>) -> String {
    let now = crate::token::unix_now();
    let mut claims = serde_json::json!({
        "sub": name, "iat": now, "exp": now + TOKEN_LIFETIME.as_secs(), "sid": crate::otp::random_id(),
    });
    if let Some(e) = email.filter(|e| !e.is_empty()) {
        claims["email"] = e.into();
    }
    if let Some(p) = phone.filter(|p| !p.is_empty()) {
        claims["phone_number"] = p.into();
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(app.jwt_secret.as_bytes()),
    )
    .unwrap_or_default()
}

/// Email and phone from a token this app minted.
fn decode(app: &App, token: &str) -> Option<(Option<String>, Option<String>)> {
    let v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    let data = jsonwebtoken::decode::<serde_json::Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(app.jwt_secret.as_bytes()),
        &v,
    )
    .ok()?;
    let s = |k: &str| data.claims[k].as_str().map(str::to_string);
    Some((s("email"), s("phone_number")))
}

/// A form body of at most 16 KiB, read with the gateway's bounded reader;
/// `None` when it is larger or unreadable.
async fn read_form(req: Request<Incoming>) -> Option<String> {
    let body = req
        .into_body()
        .map_err(|e| Box::new(e) as crate::http::BoxError)
        .boxed();
    let bytes = crate::http::read_limited(body, 16 * 1024).await.ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The answer to a form too large (or unreadable) to read.
fn too_large(user: Option<&str>) -> Response<Body> {
    let mut res = page("Too large", user, "<p>That form is too large.</p>");
    *res.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    res
}

fn form_value(body: &str, key: &str) -> Option<String> {
    crate::http::form::parse(body.as_bytes())
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

fn query_value(q: &str, key: &str) -> Option<String> {
    form_value(q, key)
}

fn see_other(location: &str) -> Response<Body> {
    let mut res = Response::new(full(""));
    *res.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(location) {
        res.headers_mut().insert(LOCATION, v);
    }
    res
}

fn page(title: &str, user: Option<&str>, main: &str) -> Response<Body> {
    let who = match user {
        Some(u) => format!(
            "Signed in as <b>{}</b> · <a href=\"/logout\">sign out</a>",
            esc(u)
        ),
        None => "<a href=\"/login\">Sign in</a>".into(),
    };
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{t} · Demo Legacy App</title><style>body{{font:16px/1.5 Georgia,serif;max-width:40rem;margin:2rem auto;padding:0 1rem;color:#222}}\
         nav{{border-bottom:1px solid #ccc;padding-bottom:.5rem;margin-bottom:1rem}}</style></head><body>\
         <nav><a href=\"/\">Demo Legacy App</a> · {who}</nav><h1>{t}</h1>{main}</body></html>",
        t = esc(title)
    );
    let mut res = Response::new(full(html));
    res.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    res
}

/// `s` escaped for HTML text and quoted attributes, by askama's escaper
/// (as the gateway's own templates escape).
fn esc(s: &str) -> String {
    match askama::filters::escape(s, askama::filters::Html) {
        Ok(escaped) => escaped.to_string(),
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The status line of a form post to `path` on `addr`.
    async fn post_form(addr: std::net::SocketAddr, path: &str, body: &str) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut res = Vec::new();
        conn.read_to_end(&mut res)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let res = String::from_utf8_lossy(&res);
        res.lines().next().unwrap_or_default().to_string()
    }

    #[test]
    // The sample app's pages escape what users type, with askama's escaper.
    fn text_is_escaped() {
        assert_eq!(
            super::esc("<b>\"x\" & 'y'</b>"),
            "&#60;b&#62;&#34;x&#34; &#38; &#39;y&#39;&#60;/b&#62;"
        );
    }

    #[tokio::test]
    // The sample app reads forms with the gateway's bounded reader: a form
    // over 16 KiB is refused (413), not cut short and acted on (the old
    // reader signed in with whatever fitted).
    async fn oversized_form_is_refused_not_truncated() {
        let running = super::start("127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let small = post_form(running.addr, "/login", "name=jane&rd=/").await;
        assert!(small.starts_with("HTTP/1.1 303"), "{small}");
        let big = format!("name=jane&rd=/&pad={}", "a".repeat(20 * 1024));
        let big = post_form(running.addr, "/login", &big).await;
        assert!(big.starts_with("HTTP/1.1 413"), "{big}");
        running.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
    }
}
