//! Where the process is in its life: serving, draining or stopping. Both listeners' `/readyz`
//! read it, the hit path asks whether it is draining, long-lived responses (the debug view's
//! live stream) end when the stop begins, and the application waits here for stop and drain
//! requests (signals, the admin endpoints).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

use crate::telemetry::metrics::RouteLabel;

#[derive(Debug)]
pub struct Lifecycle {
    /// The stop began: not ready, long-lived responses end.
    stopping: watch::Sender<bool>,
    /// Stop requests so far (signals, the end of a drain): the first stops, a second skips
    /// what is left of `server.shutdown_delay_ms`.
    requests: watch::Sender<u32>,
    /// A drain began: not ready, hits refused, and the drain's time limit.
    drain: watch::Sender<Option<Duration>>,
    draining: AtomicBool,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            stopping: watch::channel(false).0,
            requests: watch::channel(0).0,
            drain: watch::channel(None).0,
            draining: AtomicBool::new(false),
        }
    }
}

/// What [`Lifecycle::begin_drain`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainStart {
    Started,
    AlreadyDraining,
    AlreadyStopping,
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

    /// Asks the application to stop, as SIGTERM does; asked again, it skips the rest of the
    /// shutdown delay (a second Ctrl-C).
    pub fn request_stop(&self) {
        self.requests.send_modify(|n| *n = n.saturating_add(1));
    }

    /// Resolves at the first stop request.
    pub fn stop_requested(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.requests.subscribe();
        async move {
            let _ = rx.wait_for(|n| *n >= 1).await;
        }
    }

    /// Resolves at the second stop request.
    pub fn hurried(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.requests.subscribe();
        async move {
            let _ = rx.wait_for(|n| *n >= 2).await;
        }
    }

    /// Starts draining: not ready, new hits refused, and the application stops once what the
    /// outbox holds is delivered or `limit` has passed (see `app`).
    pub fn begin_drain(&self, limit: Duration) -> DrainStart {
        if self.is_stopping() || *self.requests.borrow() > 0 {
            return DrainStart::AlreadyStopping;
        }
        if self.draining.swap(true, Ordering::AcqRel) {
            return DrainStart::AlreadyDraining;
        }
        self.drain.send_replace(Some(limit));
        DrainStart::Started
    }

    /// Whether a drain began (then hits are refused).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Resolves with the drain's time limit when a drain begins.
    pub fn drain_started(&self) -> impl Future<Output = Duration> + Send + 'static {
        let mut rx = self.drain.subscribe();
        async move {
            let limit = rx
                .wait_for(Option::is_some)
                .await
                .map(|l| l.unwrap_or_default());
            match limit {
                Ok(limit) => limit,
                // The lifecycle is gone: nothing will drain.
                Err(_) => std::future::pending().await,
            }
        }
    }

    /// Whether this instance should get traffic: its store takes hits, no drain and no stop
    /// began.
    pub fn is_ready(&self, store_open: bool) -> bool {
        store_open && !self.is_stopping() && !self.is_draining()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_fails_readiness_once_and_a_second_stop_request_hurries() {
        let l = Lifecycle::default();
        assert!(l.is_ready(true));
        assert_eq!(l.begin_drain(Duration::from_secs(3)), DrainStart::Started);
        assert!(!l.is_ready(true) && l.is_draining());
        assert_eq!(
            l.begin_drain(Duration::from_secs(9)),
            DrainStart::AlreadyDraining
        );
        assert_eq!(l.drain_started().await, Duration::from_secs(3));

        let (stop, hurry) = (l.stop_requested(), l.hurried());
        l.request_stop();
        stop.await;
        let mut hurry = Box::pin(hurry);
        assert!(
            futures_util::poll!(&mut hurry).is_pending(),
            "one request does not hurry"
        );
        l.request_stop();
        hurry.await;
        let other = Lifecycle::default();
        other.request_stop();
        assert_eq!(
            other.begin_drain(Duration::from_secs(1)),
            DrainStart::AlreadyStopping
        );
    }
}
