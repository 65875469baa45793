//! TikTok Events API tag (ad-platforms §2): `POST {endpoint}/open_api/v1.3/event/track/` with
//! the `Access-Token` header and a JSON body `{"event_source":"web","event_source_id":<pixel
//! code>,"data":[…]}`. Success is `code == 0` in the body, not the HTTP status (§2.6).
//!
//! User data is normalised and hashed by TikTok's policy (`tags::match_keys`); the click id
//! (`ttclid`) and browser id (`_ttp`) come from the click-id keeper.

mod mapping;

impl crate::tags::TagSpec for TikTokTagConfig {
    fn name(&self) -> &str {
        &self.name
    }
    fn trigger(&self) -> &TriggerConfig {
        &self.trigger
    }
    fn build(&self) -> Result<Box<dyn Tag>, Vec<String>> {
        TikTokTag::from_config(self).map(|t| Box::new(t) as Box<dyn Tag>)
    }
}

#[cfg(test)]
mod tests;

pub use mapping::default_tiktok_name;

use std::collections::BTreeMap;
use std::time::Duration;

use ::http::{HeaderMap, Method, StatusCode};
use bytes::Bytes;
use serde::Deserialize;

use crate::event::Event;
use crate::secret::Secret;
use crate::tags::trigger::TriggerConfig;
use crate::tags::values::endpoint_problem;
use crate::tags::{classify_http, retry_after, Encoded, OutboundRequest};
use crate::tags::{Outcome, Tag};
use crate::text::truncate_chars;
use mapping::Mapper;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TikTokTagConfig {
    pub name: String,
    #[serde(default)]
    pub trigger: TriggerConfig,
    /// The pixel code (Events Manager), sent as `event_source_id`.
    pub pixel_code: String,
    /// The Events API access token generated for the pixel.
    pub access_token: Secret,
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// Routes events to Events Manager › Test events.
    pub test_event_code: Option<String>,
    /// GA4 event name → TikTok event name, on top of the default mapping.
    #[serde(default)]
    pub event_names: BTreeMap<String, String>,
    /// Send events without a mapping under their GA4 name (as custom events).
    #[serde(default = "yes")]
    pub forward_unmapped: bool,
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_endpoint() -> String {
    "https://business-api.tiktok.com".into()
}
fn yes() -> bool {
    true
}
/// TikTok takes up to 1,000 events per request; like Meta's tag, fewer keep a dispatcher's
/// memory (batch × concurrency, parsed plus body) small.
fn default_batch_max() -> usize {
    250
}
fn default_timeout_ms() -> u64 {
    5_000
}

/// TikTok's `data[]` limit (§2.1).
const MAX_BATCH: usize = 1000;
/// Body codes (§2.6, as RudderStack handles them; TikTok's full table is UNVERIFIED).
const CODE_OK: i64 = 0;
const CODE_PARTIAL: i64 = 20001;
const CODE_RATE_LIMITED: i64 = 40100;
const CODES_REJECTED: [i64; 2] = [40001, 40002];
/// Vendor text quoted in reasons is cut here; reasons end up in dead letters and logs.
const MAX_REASON_CHARS: usize = 600;

/// The TikTok encoder. URL, headers and the body's fixed parts are prepared once.
pub struct TikTokTag {
    name: String,
    pixel_code: String,
    url: String,
    headers: Vec<(String, String)>,
    /// Opens the body up to `"data":[`.
    body_prefix: Vec<u8>,
    /// Closes it: `]`, the optional `test_event_code`, `}`.
    body_suffix: Vec<u8>,
    token: String,
    mapper: Mapper,
    batch_max: usize,
    timeout: Duration,
}

impl std::fmt::Debug for TikTokTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The headers carry the token, so they are not shown.
        f.debug_struct("TikTokTag")
            .field("name", &self.name)
            .field("pixel_code", &self.pixel_code)
            .field("url", &self.url)
            .field("batch_max", &self.batch_max)
            .finish_non_exhaustive()
    }
}

fn validate(cfg: &TikTokTagConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let code = cfg.pixel_code.trim();
    if code.is_empty() || !code.bytes().all(|b| b.is_ascii_alphanumeric()) {
        problems.push(format!(
            "pixel_code: `{}` is not a TikTok pixel code; copy it from Events Manager › Data \
             sources, e.g. \"C4ABCDEF1234567890AB\"",
            cfg.pixel_code
        ));
    }
    let token = cfg.access_token.expose();
    if token.trim().is_empty() {
        problems.push(
            "access_token: is empty; set it to the pixel's Events API token, e.g. \
             access_token = \"${TIKTOK_ACCESS_TOKEN}\""
                .into(),
        );
    } else if token.contains(char::is_whitespace) || token.contains(char::is_control) {
        problems.push("access_token: contains whitespace; check the environment variable".into());
    }
    problems.extend(endpoint_problem(
        "endpoint",
        &cfg.endpoint,
        "https://business-api.tiktok.com",
    ));
    if cfg
        .test_event_code
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        problems.push(
            "test_event_code: is empty; remove the key or copy the code from Events Manager › \
             Test events"
                .into(),
        );
    }
    if !(1..=MAX_BATCH).contains(&cfg.batch_max) {
        problems.push(format!(
            "batch_max: {} is out of range; TikTok accepts 1 to {MAX_BATCH} events per request",
            cfg.batch_max
        ));
    }
    if cfg.timeout_ms == 0 {
        problems.push("timeout_ms: must be greater than 0".into());
    }
    for (from, to) in &cfg.event_names {
        if from.trim().is_empty() {
            problems.push("event_names: a GA4 event name is empty".into());
        }
        if to.trim().is_empty() {
            problems.push(format!(
                "event_names.{from}: the TikTok event name is empty; use a standard name such \
                 as \"CompleteRegistration\" or a custom one"
            ));
        }
    }
    problems
}

impl TikTokTag {
    pub fn from_config(cfg: &TikTokTagConfig) -> Result<Self, Vec<String>> {
        let problems = validate(cfg);
        if !problems.is_empty() {
            return Err(problems);
        }
        let pixel_code = cfg.pixel_code.trim().to_owned();
        let mut body_prefix = br#"{"event_source":"web","event_source_id":"#.to_vec();
        let mut body_suffix = b"]".to_vec();
        let encode = |out: &mut Vec<u8>, key: &str, v: &str| {
            serde_json::to_writer(out, v)
                .map_err(|e| vec![format!("{key}: cannot be encoded: {e}")])
        };
        encode(&mut body_prefix, "pixel_code", &pixel_code)?;
        body_prefix.extend_from_slice(br#","data":["#);
        if let Some(code) = &cfg.test_event_code {
            body_suffix.extend_from_slice(br#","test_event_code":"#);
            encode(&mut body_suffix, "test_event_code", code.trim())?;
        }
        body_suffix.push(b'}');
        let token = cfg.access_token.expose().to_owned();
        Ok(TikTokTag {
            name: cfg.name.clone(),
            url: format!(
                "{}/open_api/v1.3/event/track/",
                cfg.endpoint.trim_end_matches('/')
            ),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("access-token".into(), token.clone()),
            ],
            pixel_code,
            body_prefix,
            body_suffix,
            token,
            mapper: Mapper {
                overrides: cfg
                    .event_names
                    .iter()
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .collect(),
                forward_unmapped: cfg.forward_unmapped,
            },
            batch_max: cfg.batch_max,
            timeout: Duration::from_millis(cfg.timeout_ms),
        })
    }

    fn request(&self, mut body: Vec<u8>) -> OutboundRequest {
        body.extend_from_slice(&self.body_suffix);
        OutboundRequest {
            method: Method::POST,
            url: self.url.clone(),
            headers: self.headers.clone(),
            body: Bytes::from(body),
        }
    }

    /// `TikTok code N: message [request_id …]`, redacted and cut.
    fn describe(&self, status: StatusCode, answer: &Answer) -> String {
        let mut s = format!("TikTok code {}", answer.code);
        if let Some(m) = answer.message.as_deref().filter(|m| !m.is_empty()) {
            s.push_str(": ");
            s.push_str(m);
        }
        if !status.is_success() {
            s.push_str(&format!(" (HTTP {})", status.as_u16()));
        }
        if let Some(id) = answer.request_id.as_deref().filter(|m| !m.is_empty()) {
            s.push_str(&format!(" [request_id {id}]"));
        }
        truncate_chars(&self.redact(&s), MAX_REASON_CHARS).to_owned()
    }
}

/// TikTok's answer envelope. Read leniently: the `code` decides, the rest is for reasons.
#[derive(Debug, Default, Deserialize)]
struct Answer {
    code: i64,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
}

impl Tag for TikTokTag {
    fn kind(&self) -> &'static str {
        "tiktok"
    }

    fn max_batch(&self) -> usize {
        self.batch_max
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn encode_batch(&self, events: &[&Event], now_ms: i64) -> Encoded {
        let max_year = crate::tags::match_keys::year_of(now_ms);
        let mut scratch = String::with_capacity(64);
        crate::tags::batch::json_batches(
            events,
            self.batch_max,
            600,
            &self.body_prefix,
            |e| self.mapper.build(e, max_year, &mut scratch),
            |body| self.request(body),
        )
    }

    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Outcome {
        let Some(answer) = serde_json::from_slice::<Answer>(body).ok() else {
            // No envelope (a proxy or load balancer answered): HTTP rules, redacted reason.
            let text = self.redact(&String::from_utf8_lossy(body));
            let text = truncate_chars(text.trim(), 300);
            let reason = if text.is_empty() {
                format!("HTTP {}", status.as_u16())
            } else {
                format!("HTTP {}: {text}", status.as_u16())
            };
            return match classify_http(status, headers, b"") {
                Outcome::Delivered if status.is_success() => Outcome::Rejected {
                    reason: format!("TikTok answered without its JSON envelope ({reason})"),
                },
                Outcome::Retry { after, .. } => Outcome::Retry { after, reason },
                _ => Outcome::Rejected { reason },
            };
        };
        match answer.code {
            CODE_OK if status.is_success() => Outcome::Delivered,
            CODE_PARTIAL if status.is_success() => {
                // TikTok does not say which events it dropped, so the batch counts as
                // delivered; the message is logged for the operator.
                tracing::warn!(
                    tag = %self.name,
                    reason = %self.describe(status, &answer),
                    "TikTok accepted the batch partially"
                );
                Outcome::Delivered
            }
            CODE_RATE_LIMITED => Outcome::Retry {
                after: retry_after(headers),
                reason: self.describe(status, &answer),
            },
            c if CODES_REJECTED.contains(&c) => Outcome::Rejected {
                reason: self.describe(status, &answer),
            },
            // Codes the reference has no verdict for: the HTTP status decides (§2.6).
            _ => match classify_http(status, headers, b"") {
                Outcome::Retry { after, .. } => Outcome::Retry {
                    after,
                    reason: self.describe(status, &answer),
                },
                _ => Outcome::Rejected {
                    reason: self.describe(status, &answer),
                },
            },
        }
    }

    fn redact(&self, text: &str) -> String {
        crate::tags::batch::redact_secrets(std::slice::from_ref(&self.token), text)
    }
}
