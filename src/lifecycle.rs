//! Whether the process is stopping: both listeners' `/readyz` read it, and long-lived
//! responses (the debug view's live stream) end on it.

use std::future::Future;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

use crate::telemetry::metrics::RouteLabel;

#[derive(Debug)]
pub struct Lifecycle {
    stopping: watch::Sender<bool>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            stopping: watch::channel(false).0,
        }
    }
}

impl Lifecycle {
    /// From now on the instance is not ready and long-lived responses end.
    pub fn begin_stop(&self) {
        self.stopping.send_replace(true);
    }

    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Resolves when the stop begins.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stopping.subscribe();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    }

    /// Whether this instance should get traffic: its store takes hits and no stop began.
    pub fn is_ready(&self, store_open: bool) -> bool {
        store_open && !self.is_stopping()
    }

    /// The answer to `GET /readyz`.
    pub fn readiness(&self, store_open: bool) -> Response {
        let mut r = if self.is_ready(store_open) {
            "ready".into_response()
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
        };
        r.extensions_mut().insert(RouteLabel("readyz"));
        r
    }
}
