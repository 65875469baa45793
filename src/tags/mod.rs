//! Tags are encoders: a batch of events in, HTTP requests out; a vendor response in, an
//! outcome out. Sending, retrying and durability are the outbox's job.

pub(crate) mod batch;
pub mod ga4;
pub mod google_ads;
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

/// What delivery must respect for a vendor, declared by its tag so the dispatcher names no
/// vendor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryRules {
    /// Who receives the events, as named in dead-letter reasons (`Meta`).
    pub vendor: &'static str,
    /// The vendor refuses events older than this (by event time): older ones are dead-lettered
    /// without a send, and retries never go on past it whatever `max_retry_age_secs` says.
    pub max_event_age: Option<Duration>,
}

/// A credential the dispatcher puts on a tag's requests as `Authorization`, for vendors whose
/// tokens expire (OAuth). The implementation caches and refreshes it; only dispatchers ask, so
/// a token fetch never happens on the hit path. The value never reaches logs or the debug view:
/// the dispatcher shows `Bearer [redacted]` in its place.
#[async_trait::async_trait]
pub trait Credential: Send + Sync + std::fmt::Debug {
    /// The `Authorization` header value. The error says what to fix and holds no secret.
    async fn authorization(&self) -> Result<crate::secret::Secret, String>;
}

/// How to learn what became of a request a vendor accepted but processes later (Google's Data
/// Manager answers a request id). The dispatcher sends `request` every `interval` until the
/// tag's [`Tag::classify_status`] gives a final outcome or `max_wait` has passed; then the
/// accepted request counts as delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusCheck {
    pub request: OutboundRequest,
    pub interval: Duration,
    pub max_wait: Duration,
}

/// A vendor's answer to a status check.
#[derive(Debug, Clone, PartialEq)]
pub enum StatusOutcome {
    /// Still processing: ask again after the interval.
    Pending(String),
    /// The request's final outcome, for every event it carried.
    Final(Outcome),
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
    /// The credential the dispatcher sets as `Authorization` on every request of this tag.
    fn credential(&self) -> Option<Arc<dyn Credential>> {
        None
    }
    /// For a response classified `Delivered`: the status check that tells the request's real
    /// outcome, when the vendor processes asynchronously. `None`: delivered is final.
    fn status_check(&self, _response_body: &[u8]) -> Option<StatusCheck> {
        None
    }
    /// Classifies the answer to a status check of a request carrying `events` events.
    fn classify_status(&self, _status: StatusCode, _body: &[u8], _events: usize) -> StatusOutcome {
        StatusOutcome::Final(Outcome::Delivered)
    }
    /// The vendor's own limits on what it accepts.
    fn delivery_rules(&self) -> DeliveryRules {
        DeliveryRules {
            vendor: self.kind(),
            max_event_age: None,
        }
    }
}

/// What every tag type's config can do; the registry ([`TagConfig`]) hands configs out as this.
pub trait TagSpec {
    fn name(&self) -> &str;
    fn trigger(&self) -> &trigger::TriggerConfig;
    /// Validates the config into the tag (every problem named by its key).
    fn build(&self) -> Result<Box<dyn Tag>, Vec<String>>;
}

crate::typed_table::typed_configs! {
    /// A `[[tags]]` entry, by its `type`. A new tag type is a folder under `src/tags/` whose
    /// config implements [`TagSpec`], and one line here.
    pub enum TagConfig("tag", TAG_TYPES) as dyn TagSpec {
        Ga4("ga4", ga4::Ga4TagConfig),
        MetaCapi("meta_capi", meta_capi::MetaCapiTagConfig),
        Http("http", http::HttpTagConfig),
        TikTok("tiktok", tiktok::TikTokTagConfig),
        GoogleAds("google_ads", google_ads::GoogleAdsTagConfig),
    }
}

impl TagConfig {
    pub fn name(&self) -> &str {
        self.spec().name()
    }
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
