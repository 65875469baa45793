//! How delivery reports to the debug view: every attempt with the (already redacted) request
//! and the vendor's answer, and where each event ended up. Typed, so the dispatcher never
//! encodes an outcome as text for the view to parse back.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{Attempt, RequestView, TagOutcome, TagState, Traces, MAX_BODY_CHARS};

/// How a vendor's answer to one request was classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    /// Accepted by a vendor that reports its processing later (a status check follows).
    Pending(String),
    Retry(String),
    Rejected(String),
}

impl AttemptOutcome {
    /// As the debug page shows it next to the attempt (`delivered`, `retry: …`, `rejected: …`).
    pub fn label(&self) -> String {
        match self {
            AttemptOutcome::Delivered => "delivered".into(),
            AttemptOutcome::Pending(r) => format!("pending: {r}"),
            AttemptOutcome::Retry(r) => format!("retry: {r}"),
            AttemptOutcome::Rejected(r) => format!("rejected: {r}"),
        }
    }
}

/// Where one event ended up for one tag after a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled<'a> {
    Delivered,
    /// The tag chose not to send it (the reason says why).
    Skipped(&'a str),
    Retrying {
        reason: &'a str,
        next_attempt_ms: i64,
    },
    DeadLettered(&'a str),
}

/// Sees every delivery attempt. Called on the dispatcher's task, so it must be quick; return
/// `false` from `enabled` when nobody listens and no request copy is made.
pub trait DeliveryObserver: Send + Sync {
    fn enabled(&self) -> bool {
        true
    }
    /// `request` is already redacted by the tag; `status` is `None` for network errors and
    /// timeouts.
    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &self,
        tag: &str,
        event_ids: &[String],
        request: RequestView,
        status: Option<u16>,
        response_body: &[u8],
        latency: Duration,
        outcome: &AttemptOutcome,
    );
    fn settled(&self, _tag: &str, _event_id: &str, _settled: Settled<'_>) {}
}

/// Nobody listens.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopObserver;

impl DeliveryObserver for NoopObserver {
    fn enabled(&self) -> bool {
        false
    }
    fn attempt(
        &self,
        _: &str,
        _: &[String],
        _: RequestView,
        _: Option<u16>,
        _: &[u8],
        _: Duration,
        _: &AttemptOutcome,
    ) {
    }
}

impl DeliveryObserver for Traces {
    fn enabled(&self) -> bool {
        // Only traced events can be updated; skip building redacted copies otherwise.
        self.indexed.load(Ordering::Relaxed) > 0
    }

    fn attempt(
        &self,
        tag: &str,
        event_ids: &[String],
        mut request: RequestView,
        status: Option<u16>,
        response_body: &[u8],
        latency: Duration,
        outcome: &AttemptOutcome,
    ) {
        request.body = super::truncate(&request.body, MAX_BODY_CHARS).0;
        let (response_body, _) =
            super::truncate(&String::from_utf8_lossy(response_body), MAX_BODY_CHARS);
        let attempt = Attempt {
            time_ms: crate::clock::now_ms(),
            request,
            status,
            response_body,
            latency_ms: latency.as_millis() as u64,
            outcome: outcome.label(),
        };
        let state = match outcome {
            AttemptOutcome::Delivered => TagOutcome::new(
                TagState::Delivered,
                status.map(|s| format!("HTTP {s}")).unwrap_or_default(),
            ),
            AttemptOutcome::Pending(r) => TagOutcome::new(TagState::Pending, r.as_str()),
            AttemptOutcome::Retry(r) => TagOutcome::new(TagState::Retrying, r.as_str()),
            AttemptOutcome::Rejected(r) => TagOutcome::new(TagState::DeadLettered, r.as_str()),
        };
        self.update_many(tag, event_ids, Some(Arc::new(attempt)), &state);
    }

    fn settled(&self, tag: &str, event_id: &str, settled: Settled<'_>) {
        let outcome = match settled {
            // `attempt` already recorded it, with the vendor's status as detail.
            Settled::Delivered => return,
            Settled::Skipped(r) => TagOutcome::new(TagState::Skipped, r),
            Settled::DeadLettered(r) => TagOutcome::new(TagState::DeadLettered, r),
            Settled::Retrying {
                reason,
                next_attempt_ms,
            } => TagOutcome {
                next_attempt_ms: Some(next_attempt_ms),
                ..TagOutcome::new(TagState::Retrying, reason)
            },
        };
        self.update(tag, event_id, None, outcome);
    }
}
