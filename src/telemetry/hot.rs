//! Handles of the metrics every hit touches, registered once per label set.
//!
//! `metrics::counter!(name, labels)` builds a key, hashes it and looks it up in the
//! recorder's registry on every call: five of those were ~5 % of a hit's instructions
//! (callgrind). The label values here come from small fixed sets (client kinds, routes,
//! statuses), so each handle is registered on first use and reused, as the `metrics` crate
//! suggests for hot paths.
//!
//! Handles are kept only once [`super::metrics_handle`] has installed the global recorder
//! (before the first request is served); until then every call registers afresh, so nothing
//! caches the no-op handles of a process without a recorder. Unit tests never cache: they
//! count metrics with a thread's local recorder (`test_metrics::recording`), which a cached
//! handle would bypass, or capture for good.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{OnceLock, PoisonError, RwLock};
use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

use metrics::{Counter, Histogram};

use super::metrics::RouteLabel;

/// Handles by label values, filled on first use.
pub(crate) struct Handles<K, T> {
    map: OnceLock<RwLock<HashMap<K, T, foldhash::fast::RandomState>>>,
}

impl<K: Eq + Hash + Copy, T: Clone> Handles<K, T> {
    pub(crate) const fn new() -> Self {
        Handles {
            map: OnceLock::new(),
        }
    }

    /// The handle for `key`, registered by `register` the first time.
    pub(crate) fn get(&self, key: K, register: impl FnOnce() -> T) -> T {
        if installed() {
            self.cached(key, register)
        } else {
            register()
        }
    }

    fn cached(&self, key: K, register: impl FnOnce() -> T) -> T {
        let map = self.map.get_or_init(Default::default);
        if let Some(h) = map.read().unwrap_or_else(PoisonError::into_inner).get(&key) {
            return h.clone();
        }
        let h = register();
        map.write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert(h)
            .clone()
    }
}

fn installed() -> bool {
    !cfg!(test) && super::metrics::recorder_installed()
}

static HIT_DURATION: Handles<&'static str, Histogram> = Handles::new();
static EVENTS: Handles<&'static str, Counter> = Handles::new();
static REQUESTS: Handles<(&'static str, u16), Counter> = Handles::new();
static REQUEST_DURATION: Handles<&'static str, Histogram> = Handles::new();
static COMMIT_WAIT: Handles<(), Histogram> = Handles::new();

/// `tagrelay_hit_duration_seconds{client}`.
pub(crate) fn hit_duration(client: &'static str) -> Histogram {
    HIT_DURATION.get(
        client,
        || metrics::histogram!("tagrelay_hit_duration_seconds", "client" => client),
    )
}

/// `tagrelay_events_total{client}`.
pub(crate) fn events(client: &'static str) -> Counter {
    EVENTS.get(
        client,
        || metrics::counter!("tagrelay_events_total", "client" => client),
    )
}

/// `tagrelay_http_requests_total{route,status}`.
pub(crate) fn requests(route: &'static str, status: http::StatusCode) -> Counter {
    REQUESTS.get((route, status.as_u16()), || {
        metrics::counter!("tagrelay_http_requests_total", "route" => route, "status" => status_label(status))
    })
}

/// `tagrelay_http_request_duration_seconds{route}`.
pub(crate) fn request_duration(route: &'static str) -> Histogram {
    REQUEST_DURATION.get(
        route,
        || metrics::histogram!("tagrelay_http_request_duration_seconds", "route" => route),
    )
}

/// `tagrelay_outbox_commit_wait_seconds`.
pub(crate) fn commit_wait() -> Histogram {
    COMMIT_WAIT.get((), || {
        metrics::histogram!("tagrelay_outbox_commit_wait_seconds")
    })
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
    requests(route, resp.status()).increment(1);
    request_duration(route).record(started.elapsed().as_secs_f64());
}

/// The statuses tagrelay answers as static labels, so counting a hit allocates nothing.
pub(crate) fn status_label(status: http::StatusCode) -> metrics::SharedString {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_is_registered_once_per_label_set() {
        static H: Handles<(&'static str, u16), u32> = Handles::new();
        let mut registered = 0;
        for (key, value) in [
            (("a", 1), 10),
            (("a", 1), 11),
            (("a", 2), 20),
            (("b", 1), 30),
        ] {
            H.cached(key, || {
                registered += 1;
                value
            });
        }
        assert_eq!(registered, 3);
        assert_eq!(H.cached(("a", 1), || 99), 10);
        assert_eq!(H.cached(("b", 1), || 99), 30);
    }
}
