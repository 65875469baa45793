//! The public tracking listener: health, CORS, client dispatch and the hit path.
//!
//! The hit path is: claim → parse (pure) → identity (pure) → triggers (pure) → one outbox
//! enqueue (awaits the group commit) → answer. It never waits on a vendor.

pub mod client_ip;
pub mod cors;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http_body_util::BodyExt;
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument;

use crate::app::AppState;
use crate::clients::{ClientError, ClientResponse, HitRequest};
use crate::clock::now_ms;
use crate::event::Event;
use crate::identity::{CookieDecision, IdentityInput};
use crate::outbox::{EnqueueError, NewEvent};
use crate::pipeline::Pipeline;
use crate::trace::{self, TagOutcome, TagState, TagTrace, Trace};

/// Bounded route label for metrics and logs, set by handlers as a response extension.
#[derive(Debug, Clone, Copy)]
pub struct RouteLabel(pub &'static str);

/// Why a hit was not accepted. Every variant is a clear 4xx/5xx with a short reason.
#[derive(Debug, thiserror::Error)]
pub enum HitError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("could not read request body: {0}")]
    Body(String),
    #[error("no client claims {0} {1}")]
    NotClaimed(Method, String),
    #[error("origin not allowed: {0}")]
    Origin(String),
    #[error("outbox is full, retry later")]
    Full(u64),
    /// The shared outbox cannot be reached for now (it logs the outage once, not per hit).
    #[error("event storage is unavailable, retry later")]
    Unavailable(u64),
    #[error("service is shutting down")]
    Closed,
    #[error("could not store events")]
    Store,
    /// Logged once where it happened, not per hit.
    #[error("event storage failed; this server must be restarted")]
    StoreFailed,
    #[error("{0}")]
    Unstorable(String),
}

impl IntoResponse for HitError {
    fn into_response(self) -> Response {
        let status = match &self {
            HitError::Client(e) => e.status(),
            HitError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HitError::Body(_) | HitError::Unstorable(_) => StatusCode::BAD_REQUEST,
            HitError::NotClaimed(..) => StatusCode::NOT_FOUND,
            HitError::Origin(_) => StatusCode::FORBIDDEN,
            HitError::Full(_)
            | HitError::Unavailable(_)
            | HitError::Closed
            | HitError::StoreFailed => StatusCode::SERVICE_UNAVAILABLE,
            HitError::Store => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let text = self.to_string();
        let mut resp = (status, format!("{text}\n")).into_response();
        resp.extensions_mut().insert(ErrorText(text));
        if let HitError::Full(secs) | HitError::Unavailable(secs) = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// The public router. Tracking routes are resolved at request time against the current
/// pipeline, so a reload can change clients and `path_prefix` without a restart.
pub fn router(state: AppState) -> Router {
    let timeout = Duration::from_millis(state.pipeline().config.server.request_timeout_ms);
    Router::new()
        .route("/healthz", get(health))
        .route("/healthy", get(health))
        .route("/readyz", get(crate::admin::readyz))
        .fallback(track)
        .with_state(state.clone())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        // Outside the timeout, so 408s are counted too.
        .layer(axum::middleware::from_fn(edge))
}

const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// Everything every public request gets, in one layer: an `x-request-id` (the caller's, or
/// a new UUIDv7) on the request and echoed on the response, a DEBUG `hit` span carrying it,
/// and the HTTP metrics. tower-http's request-id, propagate and trace layers plus a metrics
/// middleware did the same as four nested layers: without any of them bench/run's max
/// hits/s rose ~10 %, with this one layer instead ~6 % (A/B, alternating runs).
async fn edge(mut req: Request, next: axum::middleware::Next) -> Response {
    let started = Instant::now();
    let id = match req.headers().get(&X_REQUEST_ID) {
        Some(id) => id.clone(),
        None => {
            let id = HeaderValue::try_from(uuid::Uuid::now_v7().to_string())
                .expect("a UUID is a valid header value");
            req.headers_mut().insert(X_REQUEST_ID, id.clone());
            id
        }
    };
    let span = tracing::debug_span!(
        "hit",
        method = %req.method(),
        path = %req.uri().path(),
        route = tracing::field::Empty,
        request_id = id.to_str().unwrap_or(""),
    );
    let mut resp = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        crate::admin::record_response(&resp, started);
        // A 5xx here is back-pressure or a store failure, logged once where it happens.
        tracing::debug!(
            status = resp.status().as_u16(),
            latency_ms = started.elapsed().as_secs_f64() * 1e3,
            "finished processing request"
        );
    });
    resp.headers_mut().entry(X_REQUEST_ID).or_insert(id);
    resp
}

async fn health() -> Response {
    let mut r = "ok".into_response();
    r.extensions_mut().insert(RouteLabel("health"));
    r
}

async fn track(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let pipeline = state.pipeline();
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.host())
        .unwrap_or("")
        .to_owned();
    let marker = debug_marker(&parts.headers, &pipeline.config.admin.debug_cookie);
    let mut trace = state
        .traces()
        .wants(marker.is_some())
        .then(TraceDraft::default);
    let ip = client_ip::client_ip(
        peer.ip(),
        &parts.headers,
        &pipeline.config.server.trusted_proxies,
        pipeline.config.server.client_ip_header,
    );
    let prefix = pipeline.config.server.path_prefix.as_str();
    let path = strip_prefix(parts.uri.path(), prefix);
    let mut ctx = HitContext {
        state: &state,
        pipeline: &pipeline,
        client: None,
        parts: &parts,
        path: path.unwrap_or(""),
        host: &host,
        ip,
        marker: marker.as_deref(),
    };
    let resp = match path {
        None => not_found(&parts.method, parts.uri.path()),
        Some(path) => route_hit(&mut ctx, path, body, &mut trace).await,
    };
    let elapsed = started.elapsed();
    if let Some(client) = ctx.client {
        crate::admin::hot_metrics::hit_duration(client.kind()).record(elapsed.as_secs_f64());
    }
    if let Some(draft) = trace {
        state.traces().record(draft.finish(&ctx, &resp, elapsed));
    }
    resp
}

/// CORS, preflight, client claim, then the hit itself.
async fn route_hit<'a>(
    ctx: &mut HitContext<'a>,
    path: &'a str,
    body: Body,
    trace: &mut Option<TraceDraft>,
) -> Response {
    let (parts, pipeline) = (ctx.parts, ctx.pipeline);
    let origin = parts.headers.get(header::ORIGIN);
    // CORS: a disallowed origin gets no credentials and no hit processing.
    if let Some(o) = origin {
        let o_str = o.to_str().unwrap_or("");
        if !cors::origin_allowed(o_str, ctx.host, &pipeline.config.server.allowed_origins) {
            return with_route(HitError::Origin(o_str.to_owned()).into_response(), "cors");
        }
    }
    if parts.method == Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        if let Some(o) = origin {
            cors::apply_preflight(
                r.headers_mut(),
                o,
                parts.headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS),
            );
        }
        return with_route(r, "preflight");
    }
    if parts.method == Method::GET || parts.method == Method::HEAD {
        if let Some(proxy) = pipeline.script_proxies.iter().find(|p| p.path() == path) {
            let mut resp = proxy.serve(ctx.state.script_cache(), parts).await;
            if let Some(o) = origin {
                cors::apply(resp.headers_mut(), o);
            }
            return with_route(resp, "script_proxy");
        }
    }
    let Some(client) = pipeline
        .clients
        .iter()
        .find(|c| c.claims(&parts.method, path))
    else {
        return not_found(&parts.method, parts.uri.path());
    };
    ctx.client = Some(client.as_ref());
    let route = client.kind();
    let mut resp = match handle_hit(ctx, client.as_ref(), body, trace).await {
        Ok(r) => r,
        Err(e) => {
            metrics::counter!("tagrelay_hits_rejected_total", "client" => route, "reason" => e.metric_reason())
                .increment(1);
            e.into_response()
        }
    };
    if let Some(o) = origin {
        cors::apply(resp.headers_mut(), o);
    }
    with_route(resp, route)
}

/// The per-hit facts every step needs.
struct HitContext<'a> {
    state: &'a AppState,
    pipeline: &'a Pipeline,
    /// The client that claimed the request, once one has.
    client: Option<&'a dyn crate::clients::Client>,
    parts: &'a http::request::Parts,
    path: &'a str,
    host: &'a str,
    ip: std::net::IpAddr,
    marker: Option<&'a str>,
}

/// What the hit path learns for the debug view, filled only when the hit is traced.
#[derive(Default)]
struct TraceDraft {
    body: Bytes,
    events: Vec<Arc<Event>>,
    events_bytes: usize,
    cookies: Vec<CookieDecision>,
    tags: Vec<TagTrace>,
}

impl TraceDraft {
    fn finish(self, ctx: &HitContext<'_>, resp: &Response, elapsed: Duration) -> Trace {
        let parts = ctx.parts;
        let (body, body_truncated) =
            trace::truncate(&String::from_utf8_lossy(&self.body), trace::MAX_BODY_CHARS);
        let headers = parts
            .headers
            .iter()
            .map(|(k, v)| {
                let v = String::from_utf8_lossy(v.as_bytes());
                let v = if k == header::COOKIE {
                    trace::shorten_cookie_header(&v)
                } else if matches!(
                    k.as_str(),
                    "authorization" | "proxy-authorization" | "x-api-key"
                ) {
                    "[redacted]".to_owned()
                } else {
                    v.into_owned()
                };
                (k.as_str().to_owned(), v)
            })
            .collect();
        let error = (!resp.status().is_success()).then(|| {
            resp.extensions()
                .get::<ErrorText>()
                .map(|e| e.0.clone())
                .unwrap_or_default()
        });
        Trace {
            id: uuid::Uuid::now_v7().to_string(),
            time_ms: now_ms(),
            method: parts.method.to_string(),
            scheme: parts
                .headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .filter(|v| matches!(*v, "http" | "https"))
                .unwrap_or("http")
                .to_owned(),
            path: parts.uri.path().to_owned(),
            query: trace::redact_query(parts.uri.query().unwrap_or("")),
            body,
            body_truncated,
            headers,
            client_ip: ctx.ip.to_string(),
            host: ctx.host.to_owned(),
            client: ctx.client.map(|c| c.kind()),
            status: resp.status().as_u16(),
            error,
            debug_marker: ctx.marker.map(str::to_owned),
            latency_us: elapsed.as_micros() as u64,
            events: self.events,
            cookies: self.cookies,
            tags: self.tags,
            events_bytes: self.events_bytes,
        }
    }
}

/// The reason text of an error response, kept for the debug view.
#[derive(Clone)]
struct ErrorText(String);

/// The debug marker from the `x-tagrelay-debug` header or the configured cookie: a short name
/// (letters, digits, `_`, `-`, `.`; at most 64), anything else is ignored.
fn debug_marker(headers: &HeaderMap, cookie_name: &str) -> Option<String> {
    let raw = match headers
        .get("x-tagrelay-debug")
        .and_then(|v| v.to_str().ok())
    {
        Some(v) => v,
        None => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|h| crate::identity::cookie_value(h, cookie_name))?,
    };
    let v = raw.trim();
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    ok.then(|| v.to_owned())
}

/// All `Cookie` headers as one (HTTP/2 proxies may split them), borrowed when there is one.
fn cookie_header(headers: &HeaderMap) -> Option<std::borrow::Cow<'_, str>> {
    let mut values = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    match values.next() {
        None => Some(std::borrow::Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = format!("{first}; {second}");
            for v in values {
                joined.push_str("; ");
                joined.push_str(v);
            }
            Some(std::borrow::Cow::Owned(joined))
        }
    }
}

impl HitError {
    fn metric_reason(&self) -> &'static str {
        match self {
            HitError::Client(_) => "invalid",
            HitError::TooLarge(_) => "too_large",
            HitError::Body(_) => "body",
            HitError::NotClaimed(..) => "not_claimed",
            HitError::Origin(_) => "origin",
            HitError::Full(_) => "outbox_full",
            HitError::Unavailable(_) => "store_unavailable",
            HitError::Closed => "shutting_down",
            HitError::Store => "store",
            HitError::StoreFailed => "store_failed",
            HitError::Unstorable(_) => "invalid",
        }
    }
}

async fn handle_hit(
    ctx: &HitContext<'_>,
    client: &dyn crate::clients::Client,
    body: Body,
    trace: &mut Option<TraceDraft>,
) -> Result<Response, HitError> {
    let (pipeline, parts) = (ctx.pipeline, ctx.parts);
    let limit = pipeline.config.server.max_body_bytes;
    let body = read_body(body, &parts.headers, limit).await?;
    if let Some(t) = trace.as_mut() {
        t.body = body.clone();
    }
    let now_ms = now_ms();
    let hit = HitRequest {
        method: &parts.method,
        path: ctx.path,
        query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
        body: &body,
        client_ip: ctx.ip,
        now_ms,
    };
    let mut parsed = client.parse(&hit)?;

    for e in &mut parsed.events {
        if e.event_id.is_empty() {
            e.event_id = uuid::Uuid::now_v7().to_string();
        }
        if e.source.is_empty() {
            e.source = client.kind().into();
        }
        // A sender's clock far ahead would make vendors refuse the event later.
        if e.timestamp_ms == 0 || e.timestamp_ms > now_ms + 60_000 {
            e.timestamp_ms = now_ms;
        }
        if let Some(m) = ctx.marker {
            e.identity.debug_marker = Some(m.to_owned());
        }
    }
    let cookies: Vec<CookieDecision> = if parsed.set_cookies {
        let cookie = cookie_header(&parts.headers);
        let input = IdentityInput {
            host: ctx.host,
            cookie_header: cookie.as_deref(),
            referer: hit.header("referer"),
            now_ms,
        };
        let mut rng = rand::thread_rng();
        pipeline.cookies.apply(&input, &mut parsed.events, &mut rng)
    } else {
        Vec::new()
    };

    // Shared with the dispatchers, which then never re-parse what was just stored.
    let events: Vec<Arc<Event>> = std::mem::take(&mut parsed.events)
        .into_iter()
        .map(Arc::new)
        .collect();
    let mut queued: Vec<NewEvent> = Vec::with_capacity(events.len());
    for e in &events {
        let mut fired_tags: Vec<Arc<str>> = Vec::new();
        for tag in &pipeline.tags {
            // Explanations are only built for traced hits; the hot path asks yes or no.
            let fired = match trace.as_mut() {
                None => tag.trigger.fires(e),
                Some(t) => {
                    let decision = tag.trigger.evaluate(e);
                    t.tags.push(TagTrace {
                        tag: tag.name.to_string(),
                        kind: tag.tag.kind(),
                        event_id: e.event_id.clone(),
                        event_name: e.event_name.clone(),
                        fired: decision.fired,
                        outcome: if decision.fired {
                            TagOutcome::new(TagState::Queued, "in the outbox")
                        } else {
                            TagOutcome::new(TagState::NotFired, decision.reason.clone())
                        },
                        reason: decision.reason,
                        attempts: Vec::new(),
                    });
                    decision.fired
                }
            };
            if fired {
                fired_tags.push(tag.name.clone());
            }
        }
        if fired_tags.is_empty() {
            if let Some(t) = trace.as_mut() {
                // Not serialized just to be measured.
                t.events_bytes += crate::event::TYPICAL_PAYLOAD_BYTES;
            }
        } else {
            let payload = Bytes::from(e.to_payload().map_err(|err| {
                tracing::error!(error = %err, "could not serialize an event; hit answered 500");
                HitError::Store
            })?);
            if let Some(t) = trace.as_mut() {
                t.events_bytes += payload.len();
            }
            queued.push(NewEvent {
                event_id: e.event_id.clone(),
                payload,
                event: Some(e.clone()),
                tags: fired_tags,
                enqueued_at_ms: now_ms,
            });
        }
    }
    if let Some(t) = trace.as_mut() {
        // The same events the outbox and dispatchers share: a trace costs no copy of them.
        t.events = events.clone();
        t.cookies = cookies.clone();
    }
    if !queued.is_empty() {
        if trace.is_some() {
            // Deliveries can finish before this hit's trace is recorded (it waits for the
            // fsync, they need not): their updates are kept for it.
            ctx.state
                .traces()
                .expect(queued.iter().map(|q| q.event_id.as_str()));
        }
        let stored = ctx.state.outbox().enqueue(queued).await.map_err(|e| match e {
            EnqueueError::Full { retry_after_secs } => HitError::Full(retry_after_secs),
            EnqueueError::Unavailable {
                retry_after_secs, ..
            } => HitError::Unavailable(retry_after_secs),
            EnqueueError::Closed => HitError::Closed,
            EnqueueError::Failed(_) => HitError::StoreFailed,
            EnqueueError::Invalid(msg) => HitError::Unstorable(msg),
            EnqueueError::Io(msg) => {
                tracing::error!(error = %msg, "could not store events; hit answered 500 so the sender retries");
                HitError::Store
            }
        });
        if let (Err(err), Some(t)) = (&stored, trace.as_mut()) {
            for tt in t.tags.iter_mut().filter(|tt| tt.fired) {
                tt.outcome = TagOutcome::new(TagState::NotQueued, format!("hit refused: {err}"));
            }
        }
        stored?;
    }
    crate::admin::hot_metrics::events(client.kind()).increment(events.len() as u64);

    let mut resp = match parsed.response {
        ClientResponse::NoContent => StatusCode::NO_CONTENT.into_response(),
        ClientResponse::EventIds => {
            let events: Vec<serde_json::Value> = events
                .iter()
                .map(|e| serde_json::json!({"event_id": e.event_id, "event_name": e.event_name}))
                .collect();
            axum::Json(serde_json::json!({ "events": events })).into_response()
        }
        ClientResponse::Body {
            status,
            content_type,
            body,
            headers,
        } => {
            let mut r = (status, [(header::CONTENT_TYPE, content_type)], body).into_response();
            for (name, value) in headers {
                // Parsed rather than `from_static` so a bad name from a client is skipped,
                // never a panic on the hit path.
                if let (Ok(n), Ok(v)) = (
                    header::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    r.headers_mut().append(n, v);
                }
            }
            r
        }
    };
    for c in &cookies {
        // Takes the String's buffer (same validation as `from_str`, without copying it).
        if let Ok(v) = HeaderValue::try_from(c.header_value()) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    Ok(resp)
}

async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, HitError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(HitError::TooLarge(limit));
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(HitError::TooLarge(limit)),
        Err(e) => Err(HitError::Body(e.to_string())),
    }
}

fn strip_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix.is_empty() {
        return Some(path);
    }
    let rest = path.strip_prefix(prefix)?;
    (rest.starts_with('/')).then_some(rest)
}

fn not_found(method: &Method, path: &str) -> Response {
    with_route(
        HitError::NotClaimed(method.clone(), path.to_owned()).into_response(),
        "not_found",
    )
}

fn with_route(mut r: Response, route: &'static str) -> Response {
    r.extensions_mut().insert(RouteLabel(route));
    r
}
