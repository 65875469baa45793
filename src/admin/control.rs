//! Operating a running instance without a shell: `POST /admin/reload` and
//! `POST /admin/drain`, which `tagrelay reload` and `tagrelay drain` call (a distroless image
//! has no `kill` to send SIGHUP with).
//!
//! Guarded like the rest of the admin listener (the admin token when one is set). A browser
//! never has a reason to call them, so a request carrying an `Origin` header (which browsers
//! add to cross-site POSTs) is refused: a page cannot make a visitor's browser reload or
//! drain an instance on its loopback.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AdminState;
use crate::config::ConfigError;
use crate::lifecycle::DrainStart;
use crate::telemetry::metrics::RouteLabel;

/// What reloads the configuration in force (the application).
pub trait Reloader: Send + Sync {
    /// Re-reads and re-validates the configuration and swaps it in, or leaves the current
    /// one serving and says why not. Returns a summary of what is now in force.
    fn reload(&self) -> Result<String, ConfigError>;
}

fn answer(status: StatusCode, text: String) -> Response {
    let mut r = (status, format!("{text}\n")).into_response();
    r.extensions_mut().insert(RouteLabel("admin_control"));
    r
}

/// Refuses what a browser sent (see the module docs).
fn from_a_browser(headers: &HeaderMap) -> Option<Response> {
    headers.contains_key(header::ORIGIN).then(|| {
        answer(
            StatusCode::FORBIDDEN,
            "admin: reload and drain are not for browsers (the request has an Origin header); use `tagrelay reload`/`tagrelay drain` or curl".into(),
        )
    })
}

/// `POST /admin/reload`: 200 with what is now in force, or 422 with every problem of the new
/// configuration (the previous one keeps serving).
pub async fn reload(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(r) = from_a_browser(&headers) {
        return r;
    }
    let reloader = state.reloader.clone();
    // Reading and validating the file is blocking work.
    let result = tokio::task::spawn_blocking(move || reloader.reload()).await;
    match result {
        Ok(Ok(summary)) => answer(StatusCode::OK, format!("reloaded: {summary}")),
        Ok(Err(e)) => {
            tracing::error!(problems = ?e.problems, "new configuration rejected; the previous one keeps serving");
            answer(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("not reloaded; the previous configuration keeps serving.\n{e}")
                    .trim_end()
                    .to_owned(),
            )
        }
        Err(e) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reload failed: {e}"),
        ),
    }
}

#[derive(Deserialize)]
pub struct DrainQuery {
    /// Stop after this long even if deliveries are still pending (default
    /// `server.drain_timeout_ms`).
    timeout_ms: Option<u64>,
}

/// `POST /admin/drain[?timeout_ms=N]`: 202, and from now on `/readyz` fails, hits get 503,
/// the dispatchers deliver what the outbox holds, and the process stops when nothing is
/// pending or the time limit passes.
pub async fn drain(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(q): Query<DrainQuery>,
) -> Response {
    if let Some(r) = from_a_browser(&headers) {
        return r;
    }
    let limit_ms = q
        .timeout_ms
        .unwrap_or(state.pipeline.load().config.server.drain_timeout_ms)
        .max(1);
    let limit = Duration::from_millis(limit_ms);
    match state.lifecycle.begin_drain(limit) {
        DrainStart::Started => {
            tracing::warn!(
                limit_ms,
                "drain requested: not ready, new hits refused; stopping once the outbox has delivered what it holds"
            );
            answer(
                StatusCode::ACCEPTED,
                format!(
                    "draining: no new hits; tagrelay stops when its outbox owes nothing, or in {} at the latest",
                    crate::outbox::delivery::retry::human_duration(limit)
                ),
            )
        }
        DrainStart::AlreadyDraining => answer(StatusCode::ACCEPTED, "already draining".into()),
        DrainStart::AlreadyStopping => answer(StatusCode::CONFLICT, "already stopping".into()),
    }
}
