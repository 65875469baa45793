//! The admin listener: health, readiness, Prometheus metrics (and the debug view).

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
pub mod debug;
pub(crate) mod hot_metrics;
pub mod throttle;
pub mod trace;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::app::AppState;
use crate::ingress::RouteLabel;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide metrics recorder once and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let latency = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            // Ages of returned visitor cookies: hours to 400 days, with edges around Safari's
            // 7-day cap (604800 s) so "WebKit never above 7 days" reads off the buckets.
            let day = 86_400.0;
            let cookie_age = [
                3_600.0,
                day,
                3.0 * day,
                6.0 * day,
                7.0 * day,
                8.0 * day,
                14.0 * day,
                30.0 * day,
                90.0 * day,
                180.0 * day,
                400.0 * day,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::identity::COOKIE_AGE_METRIC.into()),
                        &cookie_age,
                    )
                })
                .expect("static bucket lists are not empty");
            match builder.install_recorder() {
                Ok(h) => h,
                // Another recorder is installed (embedding); keep a private one for /metrics.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const METRICS_UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the metrics recorder's memory flat. Histograms buffer every raw sample until they
/// are folded into buckets, which the exporter only does on a scrape or an upkeep; without
/// this task an unscraped instance grows by several bytes per hit (~1 GiB per hour at 20k
/// hits/s). Call once inside the runtime; the task ends with it.
pub fn spawn_metrics_upkeep() {
    let handle = metrics_handle();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(METRICS_UPKEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

/// Counts every request by bounded route label and status, and times it.
pub async fn record_http_metrics(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let resp = next.run(req).await;
    record_response(&resp, started);
    resp
}

/// `tagrelay_http_requests_total{route,status}` and `…_duration_seconds{route}` for one
/// answered request.
pub(crate) fn record_response(resp: &Response, started: Instant) {
    // The label a handler put on the response (`other` when none did).
    let route = resp
        .extensions()
        .get::<RouteLabel>()
        .map(|r| r.0)
        .unwrap_or("other");
    tracing::Span::current().record("route", route);
    hot_metrics::requests(route, resp.status()).increment(1);
    hot_metrics::request_duration(route).record(started.elapsed().as_secs_f64());
}

/// The statuses tagrelay answers as static labels, so counting a hit allocates nothing.
fn status_label(status: StatusCode) -> metrics::SharedString {
    let s = match status.as_u16() {
        200 => "200",
        204 => "204",
        302 => "302",
        303 => "303",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        414 => "414",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        other => return other.to_string().into(),
    };
    s.into()
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { labelled("ok".into_response(), "admin_health") }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/debug", get(debug::page))
        .route("/debug/", get(debug::page))
        .route("/debug/login", get(debug::login_form).post(debug::login))
        .route("/debug/api/traces", get(debug::traces))
        .route("/debug/api/traces/{id}", get(debug::trace))
        .route("/debug/api/stream", get(debug::stream))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            debug::require_token,
        ))
        .with_state(state)
        .layer(axum::middleware::from_fn(record_http_metrics))
}

fn labelled(mut r: Response, route: &'static str) -> Response {
    r.extensions_mut().insert(RouteLabel(route));
    r
}

async fn readyz(State(state): State<AppState>) -> Response {
    let r = if state.outbox().is_open() && !state.is_shutting_down() {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    };
    labelled(r, "readyz")
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let body = state.metrics().render();
    labelled(
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        "metrics",
    )
}
