//! The hit's core, the same for the server, the benchmarks and `tagrelay test`: a claimed
//! request in; its events (stamped, with identity), the first-party cookies to set, the
//! outbox records for the tags that fired and the answer's shape out. Pure: no sockets, no
//! outbox, no clock but the request's receipt time; the caller does the I/O.

use std::sync::Arc;

use bytes::Bytes;
use rand::RngCore;

use super::Pipeline;
use crate::clients::{Client, ClientError, ClientResponse, HitRequest, Parsed};
use crate::event::Event;
use crate::identity::IdentityInput;
use crate::outbox::NewEvent;
use crate::set_cookie::CookieDecision;
use crate::stitching::SessionRecord;
use crate::trace::{TagOutcome, TagState, TagTrace, TraceDraft};

/// A sender's clock this far ahead of ours is not believed: vendors would refuse the event.
const MAX_CLOCK_AHEAD_MS: i64 = 60_000;

/// What a hit produced.
#[derive(Debug)]
pub struct Processed {
    /// Every event, in hit order, shared with the outbox records and the trace.
    pub events: Vec<Arc<Event>>,
    /// One record per event that fired at least one tag.
    pub queued: Vec<NewEvent>,
    /// The `Set-Cookie`s of the answer.
    pub cookies: Vec<CookieDecision>,
    pub response: ClientResponse,
    /// A browser's hit (first-party cookies are managed for it), not a server's.
    pub browser: bool,
    /// Browsing sessions to record for later backend orders (empty unless a webhook client is
    /// configured and an event carried a key).
    pub sessions: Vec<SessionRecord>,
}

/// Why a hit produced nothing to store.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// An event could not be serialized for the outbox (a bug, never the sender's fault).
    #[error("could not serialize an event: {0}")]
    Payload(#[from] rmp_serde::encode::Error),
}

impl Pipeline {
    /// The client that takes `method path` (path without `path_prefix`): first claimant wins,
    /// in config order.
    pub fn claim(&self, method: &http::Method, path: &str) -> Option<&dyn Client> {
        self.clients
            .iter()
            .find(|c| c.claims(method, path))
            .map(|c| c.as_ref())
    }

    /// Runs a claimed hit through parse → stamp → identity → triggers → payloads. `marker` is
    /// the browser's debug mark, if any; `traceparent` the W3C trace context of the hit's
    /// span when OpenTelemetry samples it (stored with each event, see `telemetry::otel`);
    /// `trace` is filled when the hit is traced for the debug view (trigger explanations are
    /// built only then).
    pub fn process(
        &self,
        client: &dyn Client,
        hit: &HitRequest<'_>,
        marker: Option<&str>,
        traceparent: Option<&str>,
        rng: &mut impl RngCore,
        trace: Option<&mut TraceDraft>,
    ) -> Result<Processed, ProcessError> {
        let parsed = self.parse(client, hit, marker, traceparent)?;
        self.complete(parsed, hit, rng, trace)
    }

    /// The first half of [`process`](Self::process): parse and stamp (event id, source, time,
    /// debug mark). A webhook's order events are then claimed and stitched by the caller
    /// (that needs the stitching store) before [`complete`](Self::complete).
    pub fn parse(
        &self,
        client: &dyn Client,
        hit: &HitRequest<'_>,
        marker: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<Parsed, ProcessError> {
        let now_ms = hit.now_ms;
        let mut parsed = client.parse(hit)?;
        for e in &mut parsed.events {
            if e.event_id.is_empty() {
                e.event_id = match (e.event_name.as_str(), e.transaction_id.as_deref()) {
                    // The id the webhook of the same order gets, so vendors count it once.
                    ("purchase", Some(t)) if !t.trim().is_empty() => {
                        crate::event::order_event_id("purchase", t.trim(), None)
                    }
                    _ => uuid::Uuid::now_v7().to_string(),
                };
            }
            if e.source.is_empty() {
                e.source = client.kind().into();
            }
            if e.timestamp_ms == 0 || e.timestamp_ms > now_ms + MAX_CLOCK_AHEAD_MS {
                e.timestamp_ms = now_ms;
            }
            if let Some(m) = marker {
                e.identity.debug_marker = Some(m.to_owned());
            }
            if let Some(tp) = traceparent {
                e.traceparent = Some(tp.to_owned());
            }
        }
        Ok(parsed)
    }

    /// The second half of [`process`](Self::process): identity (cookies), the sessions to
    /// record for backend orders, triggers and payloads.
    pub fn complete(
        &self,
        mut parsed: Parsed,
        hit: &HitRequest<'_>,
        rng: &mut impl RngCore,
        mut trace: Option<&mut TraceDraft>,
    ) -> Result<Processed, ProcessError> {
        let now_ms = hit.now_ms;
        let browser = parsed.set_cookies;
        let mut sessions = Vec::new();
        let cookies = if browser {
            let cookie = hit.cookie_header();
            let input = IdentityInput {
                host: hit.host,
                cookie_header: cookie.as_deref(),
                referer: hit.header("referer"),
                now_ms,
            };
            let cookies = self.cookies.apply(&input, &mut parsed.events, rng);
            if let Some(policy) = &self.stitch_records() {
                sessions = crate::stitching::record::records(
                    &parsed.events,
                    cookie.as_deref(),
                    policy,
                    now_ms,
                );
            }
            cookies
        } else {
            Vec::new()
        };

        // Shared with the dispatchers, which then never re-parse what was just stored.
        let events: Vec<Arc<Event>> = parsed.events.into_iter().map(Arc::new).collect();
        let mut queued = Vec::with_capacity(events.len());
        for e in &events {
            let mut fired_tags: Vec<Arc<str>> = Vec::new();
            for tag in &self.tags {
                // Explanations are only built for traced hits; the hot path asks yes or no.
                let fired = match trace.as_deref_mut() {
                    None => tag.trigger.fires(e),
                    Some(t) => {
                        let decision = tag.trigger.evaluate(e);
                        t.tags.push(TagTrace {
                            tag: tag.name.to_string(),
                            kind: tag.tag.kind(),
                            event_id: e.event_id.clone(),
                            event_name: e.event_name.clone(),
                            fired: decision.fired,
                            outcome: if decision.fired {
                                TagOutcome::new(TagState::Queued, "in the outbox")
                            } else {
                                TagOutcome::new(TagState::NotFired, decision.reason.clone())
                            },
                            reason: decision.reason,
                            attempts: Vec::new(),
                        });
                        decision.fired
                    }
                };
                if fired {
                    fired_tags.push(tag.name.clone());
                }
            }
            if fired_tags.is_empty() {
                if let Some(t) = trace.as_deref_mut() {
                    // Not serialized just to be measured.
                    t.events_bytes += crate::event::TYPICAL_PAYLOAD_BYTES;
                }
                continue;
            }
            let payload = Bytes::from(e.to_payload()?);
            if let Some(t) = trace.as_deref_mut() {
                t.events_bytes += payload.len();
            }
            queued.push(NewEvent {
                event_id: e.event_id.clone(),
                payload,
                event: Some(e.clone()),
                tags: fired_tags,
                enqueued_at_ms: now_ms,
            });
        }
        if let Some(t) = trace {
            // The same events the outbox and dispatchers share: a trace costs no copy of them.
            t.events = events.clone();
            t.cookies = cookies.clone();
        }
        Ok(Processed {
            events,
            queued,
            cookies,
            response: parsed.response,
            browser,
            sessions,
        })
    }
}
