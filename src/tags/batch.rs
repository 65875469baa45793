//! What the JSON vendor tags (Meta, TikTok, Google Ads) share: GA4 → vendor event names,
//! batches of events as one JSON array per request, and redaction of a list of secrets.

use std::collections::HashMap;

use serde::Serialize;

use super::{Encoded, OutboundRequest};
use crate::event::Event;

/// Why a tag does not send an event.
#[derive(Debug, Clone, PartialEq)]
pub enum NotSent {
    /// It can never be sent: dead-lettered at once with the reason.
    Rejected(String),
    /// The tag chooses not to send it (done, not delivered).
    Skipped(String),
}

/// GA4 events gtag sends on its own that mean nothing to ad platforms and would flood their
/// custom events; they go only when mapped explicitly.
const GA4_AUTOMATIC: &[&str] = &[
    "session_start",
    "first_visit",
    "user_engagement",
    "scroll",
    "form_start",
    "video_progress",
];

/// A vendor's name for a GA4 event: the configured override, then the vendor's default
/// (`default`), then the GA4 name itself as a custom event unless `forward_unmapped` is off.
pub fn vendor_event_name<'a>(
    vendor: &str,
    overrides: &'a HashMap<String, String>,
    default: Option<&'static str>,
    forward_unmapped: bool,
    ga4: &'a str,
) -> Result<&'a str, NotSent> {
    if let Some(n) = overrides.get(ga4) {
        return Ok(n);
    }
    if let Some(n) = default {
        return Ok(n);
    }
    if GA4_AUTOMATIC.contains(&ga4) {
        return Err(NotSent::Skipped(format!(
            "`{ga4}` is a GA4 automatic event; map it in event_names to send it to {vendor}"
        )));
    }
    if forward_unmapped {
        Ok(ga4)
    } else {
        Err(NotSent::Skipped(format!(
            "no {vendor} event is mapped for `{ga4}` and forward_unmapped = false \
             (add it to event_names to send it)"
        )))
    }
}

/// Encodes `events` as JSON arrays of at most `batch_max` elements: each request's body is
/// `prefix`, the events built by `build` joined by `,`, then whatever `finish` appends when it
/// turns the body into the request. `bytes_per_event` sizes the body up front.
pub fn json_batches<'e, T: Serialize>(
    events: &[&'e Event],
    batch_max: usize,
    bytes_per_event: usize,
    prefix: &[u8],
    mut build: impl FnMut(&'e Event) -> Result<T, NotSent>,
    finish: impl Fn(Vec<u8>) -> OutboundRequest,
) -> Encoded {
    let mut out = Encoded::default();
    let batch_max = batch_max.max(1);
    let per_request = events.len().min(batch_max);
    let mut body: Vec<u8> = Vec::new();
    let mut idx: Vec<usize> = Vec::with_capacity(per_request);
    for (i, e) in events.iter().enumerate() {
        let ev = match build(e) {
            Ok(ev) => ev,
            Err(NotSent::Rejected(r)) => {
                out.rejected.push((i, r));
                continue;
            }
            Err(NotSent::Skipped(r)) => {
                out.skipped.push((i, r));
                continue;
            }
        };
        if body.is_empty() {
            body.reserve(per_request * bytes_per_event + prefix.len() + 8);
            body.extend_from_slice(prefix);
        }
        let start = body.len();
        if !idx.is_empty() {
            body.push(b',');
        }
        if let Err(err) = serde_json::to_writer(&mut body, &ev) {
            body.truncate(start);
            out.rejected
                .push((i, format!("cannot encode event as JSON: {err}")));
            continue;
        }
        idx.push(i);
        if idx.len() == batch_max {
            let req = finish(std::mem::take(&mut body));
            out.requests.push((
                req,
                std::mem::replace(&mut idx, Vec::with_capacity(per_request)),
            ));
        }
    }
    if !idx.is_empty() {
        out.requests.push((finish(body), idx));
    }
    out
}

/// `text` with every one of `secrets` replaced by `[redacted]`. `secrets` should be sorted
/// longest first, so a secret containing another is removed whole.
pub fn redact_secrets(secrets: &[String], text: &str) -> String {
    let mut out: Option<String> = None;
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        let current = out.as_deref().unwrap_or(text);
        if current.contains(secret.as_str()) {
            out = Some(current.replace(secret.as_str(), "[redacted]"));
        }
    }
    out.unwrap_or_else(|| text.to_owned())
}
