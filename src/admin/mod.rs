//! The admin listener: health, readiness, Prometheus metrics (and the debug view).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
pub mod debug;
pub mod throttle;

use crate::app::AppState;
use crate::telemetry::hot::record_http_metrics;
use crate::telemetry::metrics::RouteLabel;

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

/// Whether this instance should get traffic: the outbox takes hits and no shutdown began.
pub(crate) fn is_ready(state: &AppState) -> bool {
    state.outbox().is_open() && !state.is_shutting_down()
}

/// `GET /readyz`, on both listeners (the public one for probes that cannot reach the admin
/// listener, such as a kubelet's).
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let r = if is_ready(&state) {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    };
    labelled(r, "readyz")
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    // Readiness as a metric, so an alert sees what the probes see.
    metrics::gauge!("tagrelay_ready").set(if is_ready(&state) { 1.0 } else { 0.0 });
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
