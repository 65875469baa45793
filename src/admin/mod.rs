//! The admin listener: health, readiness, Prometheus metrics and the debug view, guarded by
//! the admin token when one is configured. Never the public listener.

pub mod control;
pub mod debug;
pub mod throttle;

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::doctor::itp::ItpMonitor;
use crate::lifecycle::Lifecycle;
use crate::outbox::Outbox;
use crate::pipeline::Pipeline;
use crate::telemetry::hot::record_http_metrics;
use crate::telemetry::metrics::{metrics_handle, RouteLabel};
use crate::trace::Traces;
use throttle::LoginThrottle;

/// What the admin listener's handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    pub pipeline: Arc<ArcSwap<Pipeline>>,
    pub traces: Arc<Traces>,
    pub outbox: Arc<dyn Outbox>,
    pub lifecycle: Arc<Lifecycle>,
    /// Failed admin authentications per client address.
    pub logins: Arc<LoginThrottle>,
    /// The running ITP check, if `[server] itp_check` is on.
    pub itp: Arc<OnceLock<ItpMonitor>>,
    /// What `POST /admin/reload` calls.
    pub reloader: Arc<dyn control::Reloader>,
}

pub fn router(state: AdminState) -> Router {
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
        .route("/debug/api/itp", get(debug::itp))
        .route("/admin/reload", post(control::reload))
        .route("/admin/drain", post(control::drain))
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

async fn readyz(State(state): State<AdminState>) -> Response {
    state.lifecycle.readiness(state.outbox.is_open())
}

async fn metrics_text(State(state): State<AdminState>) -> Response {
    // Readiness as a metric, so an alert sees what the probes see.
    metrics::gauge!("tagrelay_ready").set(if state.lifecycle.is_ready(state.outbox.is_open()) {
        1.0
    } else {
        0.0
    });
    crate::telemetry::metrics::collect_process_metrics();
    let body = metrics_handle().render();
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
