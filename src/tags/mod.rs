//! Tags are encoders: a batch of events in, HTTP requests out; a vendor response in, an
//! outcome out. Sending, retrying and durability are the outbox's job.

pub mod ga4;
pub mod http;
pub mod match_keys;
pub mod meta_capi;
pub mod tiktok;
pub mod trigger;
pub(crate) mod values;

use std::sync::Arc;
use std::time::Duration;

use ::http::{HeaderMap, Method, StatusCode};
use bytes::Bytes;

use crate::event::Event;
use trigger::Trigger;

/// One request to a vendor, fully built.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundRequest {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// The result of encoding a batch.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Encoded {
    /// Each request with the indices (into the input batch) of the events it carries.
    pub requests: Vec<(OutboundRequest, Vec<usize>)>,
    /// Events that can never be sent (index, reason): they go to dead letters at once.
    pub rejected: Vec<(usize, String)>,
    /// Events the tag deliberately does not send (index, reason), e.g. GA4-reserved names
    /// over Measurement Protocol. They count as done.
    pub skipped: Vec<(usize, String)>,
}

/// How a vendor's answer is classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered,
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    Rejected {
        reason: String,
    },
}

/// Characters left as-is in query values: RFC 3986 unreserved. Everything else is
/// percent-encoded, so one decode gives back exactly the original value.
const COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes a query name or value (vendor URLs, tokens).
pub(crate) fn encode_component(s: &str) -> std::borrow::Cow<'_, str> {
    percent_encoding::utf8_percent_encode(s, COMPONENT).into()
}

/// Cuts `s` to at most `max` characters (vendor limits count characters, not bytes).
pub fn truncate_chars(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((cut, _)) => &s[..cut],
        None => s,
    }
}

/// [`truncate_chars`] with `…` appended when something was cut: for values quoted in
/// human-facing reasons.
pub fn ellipsize(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    let cut = truncate_chars(s, max);
    if cut.len() < s.len() {
        std::borrow::Cow::Owned(format!("{cut}…"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// A vendor encoder. Pure: no I/O, no clock except what is passed in.
pub trait Tag: Send + Sync + std::fmt::Debug {
    /// The tag's type name (`ga4`, `meta_capi`, `http`).
    fn kind(&self) -> &'static str;
    /// Most events one request may carry.
    fn max_batch(&self) -> usize;
    /// Per-request timeout the dispatcher applies.
    fn timeout(&self) -> Duration;
    /// Builds the vendor requests for a batch of events. Borrowed one by one so dispatchers
    /// can pass events they share with the hit path without copying them.
    fn encode_batch(&self, events: &[&Event], now_ms: i64) -> Encoded;
    /// [`encode_batch`](Self::encode_batch) for owned events.
    fn encode(&self, events: &[Event], now_ms: i64) -> Encoded {
        let refs: Vec<&Event> = events.iter().collect();
        self.encode_batch(&refs, now_ms)
    }
    /// Classifies the vendor's response to one request.
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Outcome;
    /// Replaces every secret this tag holds (tokens, API secrets, proofs) in `text`.
    fn redact(&self, text: &str) -> String;
}

/// A configured tag: its name, trigger and encoder.
#[derive(Debug)]
pub struct TagInstance {
    pub name: Arc<str>,
    pub trigger: Trigger,
    pub tag: Box<dyn Tag>,
}

/// Shared response classification for vendors without an error envelope:
/// 2xx delivered; 408, 429 and 5xx retried (honouring `Retry-After`); other 4xx rejected.
pub fn classify_http(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Outcome {
    if status.is_success() {
        return Outcome::Delivered;
    }
    let reason = || {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
        let text = text.trim();
        if text.is_empty() {
            format!("HTTP {}", status.as_u16())
        } else {
            format!("HTTP {}: {text}", status.as_u16())
        }
    };
    if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        Outcome::Retry {
            after: retry_after(headers),
            reason: reason(),
        }
    } else {
        Outcome::Rejected { reason: reason() }
    }
}

/// Parses a `Retry-After` header given in seconds (the HTTP-date form is rare from APIs).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(::http::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_classification() {
        let h = HeaderMap::new();
        assert_eq!(
            classify_http(StatusCode::NO_CONTENT, &h, b""),
            Outcome::Delivered
        );
        assert!(matches!(
            classify_http(StatusCode::BAD_REQUEST, &h, b"bad"),
            Outcome::Rejected { .. }
        ));
        let mut h2 = HeaderMap::new();
        h2.insert(::http::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(
            classify_http(StatusCode::TOO_MANY_REQUESTS, &h2, b""),
            Outcome::Retry {
                after: Some(Duration::from_secs(2)),
                reason: "HTTP 429".into()
            }
        );
        assert!(matches!(
            classify_http(StatusCode::BAD_GATEWAY, &h, b""),
            Outcome::Retry { after: None, .. }
        ));
    }
}
