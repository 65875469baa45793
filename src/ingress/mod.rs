//! The public tracking listener, HTTP only: body and header limits, timeouts, client IP,
//! CORS, the client claim, status and headers of the answer, and the outbox enqueue it awaits.
//! What a hit becomes is [`Pipeline::process`]'s job; it never waits on a vendor.

pub mod client_ip;
pub mod cors;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http_body_util::BodyExt;
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument;

use crate::clients::script_proxy::ScriptCache;
use crate::clients::{Client, ClientError, ClientResponse, HitRequest};
use crate::clock::now_ms;
use crate::doctor::itp::ItpMonitor;
use crate::event::Event;
use crate::lifecycle::Lifecycle;
use crate::outbox::{EnqueueError, Outbox};
use crate::pipeline::{Pipeline, ProcessError, Processed};
use crate::set_cookie::CookieDecision;
use crate::stitching::{StitchError, Stitching};
use crate::telemetry::metrics::RouteLabel;
use crate::telemetry::otel::{HitEvent, HitSpan, Otel};
use crate::trace::{ItpNote, Served, TagOutcome, TagState, TraceDraft, Traces};

/// What the public listener's handlers share. Cheap to clone.
#[derive(Clone)]
pub struct IngressState {
    /// The pipeline in force; a reload swaps it, in-flight hits keep the one they loaded.
    pub pipeline: Arc<ArcSwap<Pipeline>>,
    pub traces: Arc<Traces>,
    pub outbox: Arc<dyn Outbox>,
    /// Outlives pipeline swaps so a reload keeps proxied scripts warm.
    pub script_cache: Arc<ScriptCache>,
    pub lifecycle: Arc<Lifecycle>,
    /// The running ITP check, if `[server] itp_check` is on: told each (page, tagging host).
    pub itp: Arc<OnceLock<ItpMonitor>>,
    /// OpenTelemetry traces, when `[telemetry] otlp_endpoint` is set.
    pub otel: Option<Arc<Otel>>,
    /// The stitching store (sessions for backend orders, the orders' dedup records), once the
    /// application has opened it.
    pub stitching: Arc<OnceLock<Stitching>>,
}

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
    /// `tagrelay drain`: this instance delivers what it holds and takes nothing new.
    #[error("this instance is draining and takes no new hits; send them to another")]
    Draining,
    #[error("could not store events")]
    Store,
    /// Logged once where it happened, not per hit.
    #[error("event storage failed; this server must be restarted")]
    StoreFailed,
    #[error("{0}")]
    Unstorable(String),
    /// Another request is taking the same order event.
    #[error("this order is being taken by another request; retry shortly")]
    OrderBusy,
    #[error("backend orders cannot be taken: {0}")]
    Stitching(String),
}

impl From<StitchError> for HitError {
    fn from(e: StitchError) -> Self {
        match e {
            StitchError::Busy => HitError::OrderBusy,
            StitchError::Store(err) => {
                // The cause stays in the log: it may name this server's files.
                tracing::warn!(error = %err, "stitching store failed; the webhook is answered 503 so the platform retries");
                HitError::Stitching("the stitching store failed".into())
            }
        }
    }
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
            | HitError::Draining
            | HitError::StoreFailed
            | HitError::OrderBusy
            | HitError::Stitching(_) => StatusCode::SERVICE_UNAVAILABLE,
            HitError::Store => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let text = self.to_string();
        let mut resp = (status, format!("{text}\n")).into_response();
        resp.extensions_mut().insert(ErrorText(text));
        let retry_after = match self {
            HitError::Full(secs) | HitError::Unavailable(secs) => Some(secs),
            HitError::Draining => Some(5),
            HitError::OrderBusy => Some(ORDER_BUSY_RETRY_SECS),
            _ => None,
        };
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// When to come back with an order another request is taking (it is stored or released by
/// then).
const ORDER_BUSY_RETRY_SECS: u64 = 5;

/// The public router. Tracking routes are resolved at request time against the current
/// pipeline, so a reload can change clients and `path_prefix` without a restart.
pub fn router(state: IngressState) -> Router {
    let timeout = Duration::from_millis(state.pipeline.load().config.server.request_timeout_ms);
    Router::new()
        .route("/healthz", get(health))
        .route("/healthy", get(health))
        .route("/readyz", get(readyz))
        .fallback(track)
        .with_state(state)
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
/// and the HTTP metrics: one layer instead of tower-http's request-id, propagate and trace
/// layers plus a metrics middleware, which cost noticeably more per hit
/// (docs/performance-log.md).
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
        crate::telemetry::hot::record_response(&resp, started);
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

/// `GET /readyz` here too: probes that cannot reach the admin listener (a kubelet's) use it.
async fn readyz(State(state): State<IngressState>) -> Response {
    state.lifecycle.readiness(state.outbox.is_open())
}

async fn track(
    State(state): State<IngressState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let pipeline = state.pipeline.load_full();
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
        .traces
        .wants(marker.is_some())
        .then(TraceDraft::default);
    let ip = client_ip::client_ip(
        peer.ip(),
        &parts.headers,
        &pipeline.config.server.trusted_proxies,
        pipeline.config.server.client_ip_header,
    );
    let prefix = pipeline.config.server.path_prefix.as_str();
    // `None` unless OpenTelemetry is on: then no work and no allocation here.
    let mut span = state.otel.as_deref().map(|o| {
        let mut s = o.hit(peer.ip(), &parts.headers);
        s.record_request(&parts.method, parts.uri.path());
        s
    });
    let mut ctx = HitContext {
        state: &state,
        pipeline: &pipeline,
        client: None,
        parts: &parts,
        host: &host,
        ip,
        marker,
    };
    let resp = match strip_prefix(parts.uri.path(), prefix) {
        None => not_found(&parts.method, parts.uri.path()),
        Some(path) => route_hit(&mut ctx, path, body, &mut trace, &mut span).await,
    };
    if let Some(s) = span.as_mut() {
        let refused = resp.extensions().get::<Refused>().map(|r| r.0);
        s.record_outcome(
            ctx.client.map(|c| c.kind()),
            resp.status().as_u16(),
            refused,
        );
    }
    let elapsed = started.elapsed();
    if let Some(client) = ctx.client {
        crate::telemetry::hot::hit_duration(client.kind()).record(elapsed.as_secs_f64());
    }
    if let Some(draft) = trace {
        let error = (!resp.status().is_success()).then(|| {
            resp.extensions()
                .get::<ErrorText>()
                .map(|e| e.0.clone())
                .unwrap_or_default()
        });
        state.traces.record(draft.finish(Served {
            request: &parts,
            client_ip: ip,
            host: &host,
            client: ctx.client.map(|c| c.kind()),
            debug_marker: marker,
            status: resp.status().as_u16(),
            error,
            elapsed,
        }));
    }
    resp
}

/// CORS, preflight, script proxies, the client claim, then the hit itself.
async fn route_hit<'a>(
    ctx: &mut HitContext<'a>,
    path: &'a str,
    body: Body,
    trace: &mut Option<TraceDraft>,
    span: &mut Option<HitSpan>,
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
            let mut resp = proxy.serve(&ctx.state.script_cache, parts).await;
            if let Some(o) = origin {
                cors::apply(resp.headers_mut(), o);
            }
            return with_route(resp, "script_proxy");
        }
    }
    let Some(client) = pipeline.claim(&parts.method, path) else {
        return not_found(&parts.method, parts.uri.path());
    };
    ctx.client = Some(client);
    let route = client.kind();
    let mut resp = match handle_hit(ctx, client, path, body, trace, span).await {
        Ok(r) => r,
        Err(e) => {
            let reason = e.metric_reason();
            metrics::counter!("tagrelay_hits_rejected_total", "client" => route, "reason" => reason)
                .increment(1);
            let mut r = e.into_response();
            r.extensions_mut().insert(Refused(reason));
            r
        }
    };
    if let Some(o) = origin {
        cors::apply(resp.headers_mut(), o);
    }
    with_route(resp, route)
}

/// The per-hit facts every step needs.
struct HitContext<'a> {
    state: &'a IngressState,
    pipeline: &'a Pipeline,
    /// The client that claimed the request, once one has.
    client: Option<&'a dyn Client>,
    parts: &'a http::request::Parts,
    host: &'a str,
    ip: std::net::IpAddr,
    marker: Option<&'a str>,
}

/// The reason text of an error response, kept for the debug view.
#[derive(Clone)]
struct ErrorText(String);

/// The bounded reason of a refused hit (its metric label), for its trace span.
#[derive(Clone, Copy)]
struct Refused(&'static str);

/// The debug marker from the `x-tagrelay-debug` header or the configured cookie: a short name
/// (letters, digits, `_`, `-`, `.`; at most 64), anything else is ignored.
fn debug_marker<'a>(headers: &'a HeaderMap, cookie_name: &str) -> Option<&'a str> {
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
    ok.then_some(v)
}

/// The reasons `tagrelay_hits_rejected_total` counts for a claimed hit.
pub const REFUSED_REASONS: [&str; 8] = [
    "invalid",
    "too_large",
    "body",
    "outbox_full",
    "shutting_down",
    "draining",
    "store",
    "store_failed",
];

/// Registers the hit counters of every configured client at 0 (see
/// `outbox::delivery::register_tag_metrics`): an alert on a reason's `increase` then sees its
/// first count, and dashboards list every client from the start.
pub fn register_metrics(pipeline: &Pipeline) {
    for client in &pipeline.clients {
        let kind = client.kind();
        crate::telemetry::hot::events(kind).increment(0);
        for reason in REFUSED_REASONS {
            metrics::counter!("tagrelay_hits_rejected_total", "client" => kind, "reason" => reason)
                .increment(0);
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
            HitError::Draining => "draining",
            HitError::Store => "store",
            HitError::StoreFailed => "store_failed",
            HitError::Unstorable(_) => "invalid",
            HitError::OrderBusy => "order_busy",
            HitError::Stitching(_) => "stitching",
        }
    }
}

async fn handle_hit(
    ctx: &HitContext<'_>,
    client: &dyn Client,
    path: &str,
    body: Body,
    trace: &mut Option<TraceDraft>,
    span: &mut Option<HitSpan>,
) -> Result<Response, HitError> {
    let (pipeline, parts) = (ctx.pipeline, ctx.parts);
    if ctx.state.lifecycle.is_draining() {
        return Err(HitError::Draining);
    }
    let traceparent = span.as_ref().and_then(HitSpan::traceparent);
    let body = read_body(body, &parts.headers, pipeline.config.server.max_body_bytes).await?;
    if let Some(t) = trace.as_mut() {
        t.body = body.clone();
    }
    let hit = HitRequest {
        method: &parts.method,
        path,
        query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
        host: ctx.host,
        body: &body,
        client_ip: ctx.ip,
        now_ms: now_ms(),
    };
    let mut parsed = pipeline
        .parse(client, &hit, ctx.marker, traceparent.as_deref())
        .map_err(process_error)?;
    // A webhook's order events: each claimed once, then joined to its browsing session.
    let orders = if parsed.events.iter().any(|e| e.stitch.is_some()) {
        let Some(st) = ctx.state.stitching.get() else {
            return Err(HitError::Stitching(
                "the stitching store is not open".into(),
            ));
        };
        let prepared = st.prepare(&mut parsed.events, hit.now_ms).await?;
        Some((st, prepared))
    } else {
        None
    };
    // Its own statement: the thread's RNG must not live across an await.
    let completed = pipeline.complete(parsed, &hit, &mut rand::thread_rng(), trace.as_mut());
    let processed = match completed {
        Ok(p) => p,
        Err(e) => {
            if let Some((st, prepared)) = orders {
                st.settle(prepared, false, hit.now_ms).await;
            }
            return Err(process_error(e));
        }
    };
    let Processed {
        events,
        queued,
        cookies,
        response,
        browser,
        sessions,
    } = processed;
    if let Some(s) = span.as_mut().filter(|s| s.is_recording()) {
        record_span(s, pipeline, &events, &queued, &cookies);
    }
    if browser {
        if let Some(itp) = ctx.state.itp.get() {
            observe_itp(itp, &parts.headers, ctx.host, trace.as_mut());
        }
    }
    let stored = if queued.is_empty() {
        Ok(())
    } else {
        if trace.is_some() {
            // Deliveries can finish before this hit's trace is recorded (it waits for the
            // fsync, they need not): their updates are kept for it.
            ctx.state
                .traces
                .expect(queued.iter().map(|q| q.event_id.as_str()));
        }
        let stored = ctx.state.outbox.enqueue(queued).await.map_err(|e| match e {
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
        stored
    };
    // The order claims become "sent" only once the events are durable; otherwise they are
    // released so the platform's retry is taken.
    if let Some((st, prepared)) = orders {
        st.settle(prepared, stored.is_ok(), hit.now_ms).await;
    }
    stored?;
    if !sessions.is_empty() {
        if let Some(st) = ctx.state.stitching.get() {
            st.record(sessions);
        }
    }
    crate::telemetry::hot::events(client.kind()).increment(events.len() as u64);
    Ok(respond(response, &events, &cookies))
}

/// A traced hit's events, what fired for each and the cookies set, on its span.
fn record_span(
    span: &mut HitSpan,
    pipeline: &Pipeline,
    events: &[Arc<Event>],
    queued: &[crate::outbox::NewEvent],
    cookies: &[CookieDecision],
) {
    // `queued` keeps the events' order and skips those that fired nothing.
    let mut queued = queued.iter().peekable();
    let list: Vec<HitEvent<'_>> = events
        .iter()
        .map(|e| {
            let fired = match queued.peek() {
                Some(q) if q.event.as_ref().is_some_and(|qe| Arc::ptr_eq(qe, e)) => {
                    queued.next().map_or(&[][..], |q| &q.tags[..])
                }
                _ => &[][..],
            };
            HitEvent {
                name: &e.event_name,
                fired,
            }
        })
        .collect();
    span.record_events(
        &list,
        pipeline.tags.iter().map(|t| &*t.name),
        cookies.iter().map(|c| (c.name.as_str(), c.reason.label())),
    );
}

fn process_error(e: ProcessError) -> HitError {
    match e {
        ProcessError::Client(e) => HitError::Client(e),
        ProcessError::Payload(err) => {
            tracing::error!(error = %err, "could not serialize an event; hit answered 500");
            HitError::Store
        }
    }
}

/// Tells the ITP check which page host used which tagging host (it resolves new pairs in the
/// background, never here), and notes its verdict on a traced hit.
fn observe_itp(
    itp: &ItpMonitor,
    headers: &HeaderMap,
    tagging_host: &str,
    trace: Option<&mut TraceDraft>,
) {
    let Some(page) = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    itp.observe(page, tagging_host);
    if let Some(t) = trace {
        t.itp = itp.report_for(page, tagging_host).map(|r| ItpNote {
            verdict: r.verdict.code(),
            severity: r.severity.code(),
            summary: r.summary.clone(),
            fix: r.fix.first().cloned(),
        });
    }
}

/// The answer to a stored hit: the client's shape, plus the cookies.
fn respond(
    response: ClientResponse,
    events: &[Arc<Event>],
    cookies: &[CookieDecision],
) -> Response {
    let mut resp = match response {
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
    for c in cookies {
        // Takes the String's buffer (same validation as `from_str`, without copying it).
        if let Ok(v) = HeaderValue::try_from(c.header_value()) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
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
