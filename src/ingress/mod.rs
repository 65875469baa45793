//! The public tracking listener: health, CORS, client dispatch and the hit path.
//!
//! The hit path is: claim → parse (pure) → identity (pure) → triggers (pure) → one outbox
//! enqueue (awaits the group commit) → answer. It never waits on a vendor.

pub mod client_ip;
pub mod cors;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http_body_util::BodyExt;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::app::AppState;
use crate::clients::{ClientError, ClientResponse, HitRequest};
use crate::identity::{CookieDecision, IdentityInput};
use crate::outbox::{EnqueueError, NewRecord};
use crate::pipeline::Pipeline;

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
    #[error("service is shutting down")]
    Closed,
    #[error("could not store events")]
    Store,
}

impl IntoResponse for HitError {
    fn into_response(self) -> Response {
        let status = match &self {
            HitError::Client(e) => e.status(),
            HitError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HitError::Body(_) => StatusCode::BAD_REQUEST,
            HitError::NotClaimed(..) => StatusCode::NOT_FOUND,
            HitError::Origin(_) => StatusCode::FORBIDDEN,
            HitError::Full(_) | HitError::Closed => StatusCode::SERVICE_UNAVAILABLE,
            HitError::Store => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut resp = (status, format!("{self}\n")).into_response();
        if let HitError::Full(secs) = self {
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
        .fallback(track)
        .with_state(state.clone())
        .layer(axum::middleware::from_fn(crate::admin::record_http_metrics))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::debug_span!("hit", method = %req.method(), path = %req.uri().path(), request_id = id)
        }))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
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
    let origin = parts.headers.get(header::ORIGIN).cloned();
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.host())
        .unwrap_or("")
        .to_owned();

    let prefix = pipeline.config.server.path_prefix.as_str();
    let full_path = parts.uri.path();
    let Some(path) = strip_prefix(full_path, prefix) else {
        return not_found(&parts.method, full_path);
    };

    // CORS: a disallowed origin gets no credentials and no hit processing.
    if let Some(o) = &origin {
        let o_str = o.to_str().unwrap_or("");
        if !cors::origin_allowed(o_str, &host, &pipeline.config.server.allowed_origins) {
            return with_route(HitError::Origin(o_str.to_owned()).into_response(), "cors");
        }
    }
    if parts.method == Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        if let Some(o) = &origin {
            cors::apply_preflight(
                r.headers_mut(),
                o,
                parts.headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS),
            );
        }
        return with_route(r, "preflight");
    }

    let Some(client) = pipeline.clients.iter().find(|c| c.claims(&parts.method, path)) else {
        return not_found(&parts.method, full_path);
    };
    let route = client.kind();

    let result = handle_hit(&state, &pipeline, client.as_ref(), &parts, path, body, peer, &host).await;
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            metrics::counter!("tagrelay_hits_rejected_total", "client" => route, "reason" => e.metric_reason())
                .increment(1);
            e.into_response()
        }
    };
    if let Some(o) = &origin {
        cors::apply(resp.headers_mut(), o);
    }
    metrics::histogram!("tagrelay_hit_duration_seconds", "client" => route)
        .record(started.elapsed().as_secs_f64());
    with_route(resp, route)
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
            HitError::Closed => "shutting_down",
            HitError::Store => "store",
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn handle_hit(
    state: &AppState,
    pipeline: &Pipeline,
    client: &dyn crate::clients::Client,
    parts: &http::request::Parts,
    path: &str,
    body: Body,
    peer: SocketAddr,
    host: &str,
) -> Result<Response, HitError> {
    let limit = pipeline.config.server.max_body_bytes;
    let body = read_body(body, &parts.headers, limit).await?;
    let ip = client_ip::client_ip(peer.ip(), &parts.headers, &pipeline.config.server.trusted_proxies);
    let now_ms = now_ms();
    let hit = HitRequest {
        method: &parts.method,
        path,
        query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
        body: &body,
        client_ip: ip,
        now_ms,
    };
    let mut parsed = client.parse(&hit)?;

    for e in &mut parsed.events {
        if e.event_id.is_empty() {
            e.event_id = uuid::Uuid::now_v7().to_string();
        }
        if e.source.is_empty() {
            e.source = client.kind().to_owned();
        }
        if e.timestamp_ms == 0 {
            e.timestamp_ms = now_ms;
        }
    }
    let cookies: Vec<CookieDecision> = if parsed.set_cookies {
        let input = IdentityInput {
            host,
            cookie_header: hit.header("cookie"),
            referer: hit.header("referer"),
            now_ms,
        };
        let mut rng = rand::thread_rng();
        pipeline.cookies.apply(&input, &mut parsed.events, &mut rng)
    } else {
        Vec::new()
    };

    let mut records = Vec::new();
    for e in &parsed.events {
        let mut payload = None;
        for tag in &pipeline.tags {
            if tag.trigger.evaluate(e).fired {
                let payload = payload
                    .get_or_insert_with(|| Bytes::from(serde_json::to_vec(e).unwrap_or_default()))
                    .clone();
                records.push(NewRecord {
                    tag: tag.name.clone(),
                    event_id: e.event_id.clone(),
                    payload,
                    enqueued_at_ms: now_ms,
                });
            }
        }
    }
    if !records.is_empty() {
        state.outbox().enqueue(records).await.map_err(|e| match e {
            EnqueueError::Full { retry_after_secs } => HitError::Full(retry_after_secs),
            EnqueueError::Closed => HitError::Closed,
            EnqueueError::Io(msg) => {
                tracing::error!(error = %msg, "could not store events; hit answered 500 so the sender retries");
                HitError::Store
            }
        })?;
    }
    metrics::counter!("tagrelay_events_total", "client" => client.kind())
        .increment(parsed.events.len() as u64);

    let mut resp = match parsed.response {
        ClientResponse::NoContent => StatusCode::NO_CONTENT.into_response(),
        ClientResponse::EventIds => {
            let events: Vec<serde_json::Value> = parsed
                .events
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
        if let Ok(v) = HeaderValue::from_str(&c.header_value()) {
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

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
