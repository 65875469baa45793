//! The debug view: a live page, a JSON API and an SSE stream over the trace ring; and the
//! admin authentication that guards it when a token is configured.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::{Form, Json};
use futures_util::stream::{self, Stream};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::sync::broadcast::error::RecvError;

use super::AdminState;
use crate::trace::StreamMsg;

const PAGE: &str = include_str!("debug_page/index.html");
const SESSION_COOKIE: &str = "tagrelay_admin";
/// Most new-hit messages one stream sends per second; the rest are counted as dropped so a
/// browser tab stays responsive at thousands of hits per second.
const STREAM_TRACES_PER_SEC: u32 = 50;

pub async fn page(State(state): State<AdminState>) -> Response {
    let cookie = &state.pipeline.load().config.admin.debug_cookie;
    let html = PAGE.replacen(
        "content=\"tagrelay_debug\"",
        &format!("content=\"{}\"", html_escape(cookie)),
        1,
    );
    ([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
}

#[derive(Deserialize)]
pub struct TraceQuery {
    limit: Option<usize>,
    event: Option<String>,
    tag: Option<String>,
}

pub async fn traces(State(state): State<AdminState>, Query(q): Query<TraceQuery>) -> Response {
    let limit = q.limit.unwrap_or(200).min(5_000);
    let list = state
        .traces
        .recent(limit, q.event.as_deref(), q.tag.as_deref());
    Json(serde_json::json!({ "traces": list })).into_response()
}

/// The running ITP check: its verdict per (page host, tagging host) and the sentences for
/// what Safari will cap, worst first.
pub async fn itp(State(state): State<AdminState>) -> Response {
    let body = match state.itp.get() {
        None => serde_json::json!({ "enabled": false, "summary": [], "pairs": [] }),
        Some(itp) => serde_json::json!({
            "enabled": true,
            "summary": itp.summary(),
            "pairs": itp.pairs(),
        }),
    };
    Json(body).into_response()
}

pub async fn trace(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match state.traces.get(&id) {
        Some(t) => Json(t).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "no such trace (it may have aged out of the ring)\n",
        )
            .into_response(),
    }
}

pub async fn stream(
    State(state): State<AdminState>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let traces = state.traces.clone();
    let (guard, rx) = traces.watch();
    struct S {
        rx: tokio::sync::broadcast::Receiver<StreamMsg>,
        traces: std::sync::Arc<crate::trace::Traces>,
        _guard: crate::trace::WatchGuard,
        window: Instant,
        sent: u32,
        dropped: u64,
    }
    let init = S {
        rx,
        traces,
        _guard: guard,
        window: Instant::now(),
        sent: 0,
        dropped: 0,
    };
    let s = stream::unfold(init, |mut s| async move {
        loop {
            if s.window.elapsed() >= Duration::from_secs(1) {
                s.window = Instant::now();
                s.sent = 0;
                if s.dropped > 0 {
                    let n = std::mem::take(&mut s.dropped);
                    let ev = SseEvent::default()
                        .event("dropped")
                        .data(format!("{{\"count\":{n}}}"));
                    return Some((Ok(ev), s));
                }
            }
            match s.rx.recv().await {
                Ok(StreamMsg::Trace(seq)) => {
                    if s.sent >= STREAM_TRACES_PER_SEC {
                        s.dropped += 1;
                        continue;
                    }
                    // Serialized now, so a trace this stream drops costs nothing.
                    let Some(json) = s.traces.stream_json(seq) else {
                        s.dropped += 1;
                        continue;
                    };
                    s.sent += 1;
                    return Some((Ok(SseEvent::default().event("trace").data(json)), s));
                }
                Ok(StreamMsg::Update(json)) => {
                    return Some((Ok(SseEvent::default().event("update").data(&*json)), s));
                }
                Err(RecvError::Lagged(n)) => s.dropped += n,
                Err(RecvError::Closed) => return None,
            }
        }
    });
    // Ends with shutdown, so an open debug tab never holds the admin listener's drain.
    let s = futures_util::StreamExt::take_until(s, state.lifecycle.stopped());
    Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// How long a login lasts.
const SESSION_SECS: u64 = 12 * 3600;

/// `<issued unix seconds>.<HMAC-SHA256(token, issued)>`: the cookie never carries the token,
/// expires on its own, and rotating the token revokes every session.
fn session_value(token: &str, issued: u64) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(format!("tagrelay-admin-session:{issued}").as_bytes());
    format!("{issued}.{}", hex::encode(mac.finalize().into_bytes()))
}

fn session_valid(value: &str, token: &str) -> bool {
    let Some(issued) = value
        .split_once('.')
        .and_then(|(t, _)| t.parse::<u64>().ok())
    else {
        return false;
    };
    let now = crate::clock::unix_secs();
    issued <= now + 60
        && now.saturating_sub(issued) < SESSION_SECS
        && ct_eq(value, &session_value(token, issued))
}

fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Whether a request tries a token (right or wrong). A session cookie is not a try: it is
/// keyed by the token and cannot be guessed, and a browser keeps sending an expired one.
fn presents_credentials(headers: &HeaderMap) -> bool {
    headers.contains_key(header::AUTHORIZATION)
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        if ct_eq(bearer.trim(), token) {
            return true;
        }
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|h| crate::identity::cookie_value(h, SESSION_COOKIE))
        .any(|v| session_valid(v, token))
}

/// Guards the admin surface when `[admin] token` is set. Health probes stay open.
pub async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let pipeline = state.pipeline.load();
    let Some(token) = pipeline.config.admin.token.as_ref() else {
        // Without a token the admin surface trusts the network path (loopback, a port
        // forward). A web page on another domain can still reach it by DNS rebinding; its
        // requests carry that domain as Host, so only IPs and `localhost` are accepted.
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(crate::identity::host_without_port)
            .unwrap_or("");
        let local = host.is_empty()
            || host.eq_ignore_ascii_case("localhost")
            || host.parse::<std::net::IpAddr>().is_ok();
        if !local {
            return (
                StatusCode::FORBIDDEN,
                "admin: requests must address this listener by IP or `localhost` (set [admin] token to use a host name)\n",
            )
                .into_response();
        }
        return next.run(req).await;
    };
    let path = req.uri().path().to_owned();
    if matches!(path.as_str(), "/healthz" | "/readyz")
        || (path == "/debug/login" && req.method() != axum::http::Method::POST)
    {
        return next.run(req).await;
    }
    // Guessing the token is throttled per client address (see `throttle`).
    let ip = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let throttle = &state.logins;
    let now = std::time::Instant::now();
    let refuse = |wait: std::time::Duration, ip: std::net::IpAddr| {
        tracing::warn!(%ip, "admin: too many failed authentications from this address; refusing for now");
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(
                header::RETRY_AFTER,
                super::throttle::retry_after_secs(wait).to_string(),
            )],
            "admin: too many failed authentications from this address; try again later\n",
        )
            .into_response()
    };
    let login = path == "/debug/login";
    let tried = login || presents_credentials(req.headers());
    if let (true, Some(ip)) = (tried, ip) {
        // Counted before it is checked (a login form before it is even read), so guesses
        // sent in parallel each take a place; a success clears the count.
        if let Err(wait) = throttle.attempt(ip, now) {
            return refuse(wait, ip);
        }
    }
    if login {
        let resp = next.run(req).await;
        if let (Some(ip), Some(LoggedIn)) = (ip, resp.extensions().get::<LoggedIn>()) {
            throttle.succeeded(ip);
        }
        return resp;
    }
    if authorized(req.headers(), token.expose()) {
        if let (true, Some(ip)) = (tried, ip) {
            throttle.succeeded(ip);
        }
        return next.run(req).await;
    }
    let wants_html = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if wants_html && path == "/debug" {
        return (StatusCode::UNAUTHORIZED, Html(login_html(""))).into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "admin token required: send `Authorization: Bearer <token>` or log in at /debug/login\n",
    )
        .into_response()
}

fn login_html(message: &str) -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tagrelay · log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:15px system-ui,sans-serif;display:grid;place-items:center;min-height:90vh;background:#f6f7f9;color:#1d2330}}
form{{background:#fff;padding:28px 32px;border-radius:10px;box-shadow:0 1px 4px #0002;min-width:320px}}
input{{width:100%;box-sizing:border-box;padding:8px;margin:8px 0 14px;font:inherit}}button{{padding:8px 16px;font:inherit}}
.msg{{color:#b42318}}</style></head><body><form method="post" action="/debug/login">
<h1 style="font-size:18px;margin-top:0">tagrelay debug view</h1><p class="msg">{}</p>
<label for="token">Admin token</label><input id="token" name="token" type="password" autocomplete="current-password" autofocus>
<button type="submit">Log in</button></form></body></html>"#,
        html_escape(message)
    )
}

pub async fn login_form() -> Html<String> {
    Html(login_html(""))
}

#[derive(Deserialize)]
pub struct Login {
    token: String,
}

pub async fn login(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Form(form): Form<Login>,
) -> Response {
    let pipeline = state.pipeline.load();
    let Some(token) = pipeline.config.admin.token.as_ref() else {
        return axum::response::Redirect::to("/debug").into_response();
    };
    if !ct_eq(form.token.trim(), token.expose()) {
        return (
            StatusCode::UNAUTHORIZED,
            Html(login_html("That token is not right.")),
        )
            .into_response();
    }
    // Secure when a TLS-terminating proxy says the page came over https.
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECS}{}",
        session_value(token.expose(), crate::clock::unix_secs()),
        if secure { "; Secure" } else { "" }
    );
    let mut resp = (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, "/debug".to_owned()),
        ],
    )
        .into_response();
    resp.extensions_mut().insert(LoggedIn);
    resp
}

/// Marks the answer to a login with the right token (the throttle clears its count).
#[derive(Debug, Clone, Copy)]
struct LoggedIn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_are_bound_to_the_token() {
        let now = crate::clock::unix_secs();
        let v = session_value("tok", now);
        assert!(session_valid(&v, "tok"));
        assert!(
            !session_valid(&v, "other-token"),
            "rotating the token revokes it"
        );
        assert!(!v.contains("tok"));
        let old = session_value("tok", now - SESSION_SECS - 1);
        assert!(!session_valid(&old, "tok"), "expired");
        let forged = format!("{}.{}", now, "0".repeat(64));
        assert!(!session_valid(&forged, "tok"));
        assert!(!session_valid("garbage", "tok"));
    }
}
