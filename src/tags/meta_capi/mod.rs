//! Meta Conversions API tag (wire-formats §3, §4, §6, §7).
//!
//! `POST {endpoint}/{api_version}/{pixel_id}/events?access_token=…[&appsecret_proof=…]` with a
//! JSON body `{"data":[…], "test_event_code"?}`. User data is normalised and SHA-256 hashed per
//! Meta's documented target forms (see `normalize.rs`); the GA4 → Meta mapping is in
//! `mapping.rs`.

mod mapping;
mod normalize;
#[cfg(test)]
mod tests;

pub use mapping::default_meta_name;
pub use normalize::{normalized, sha256_hex, Key};

use std::collections::BTreeMap;

use crate::text::truncate_chars;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ::http::{HeaderMap, Method, StatusCode};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::event::Event;
use crate::secret::Secret;
use crate::tags::trigger::TriggerConfig;
use crate::tags::{
    classify_http, retry_after, DeliveryRules, Encoded, OutboundRequest, Outcome, Tag,
};
use mapping::Mapper;
#[cfg(test)]
use mapping::NotSent;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaCapiTagConfig {
    pub name: String,
    #[serde(default)]
    pub trigger: TriggerConfig,
    pub pixel_id: String,
    pub access_token: Secret,
    #[serde(default = "default_api_version")]
    pub api_version: String,
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    pub test_event_code: Option<String>,
    pub app_secret: Option<Secret>,
    /// GA4 event name → Meta event name, on top of the default mapping.
    #[serde(default)]
    pub event_names: BTreeMap<String, String>,
    #[serde(default = "yes")]
    pub forward_unmapped: bool,
    /// Use `transaction_id` as Meta's `event_id` for purchases (matches pixels that do).
    #[serde(default)]
    pub purchase_event_id_from_transaction: bool,
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Where the conversions happened, as Meta's `action_source`.
    #[serde(default)]
    pub action_source: ActionSource,
    /// Let an event's own `action_source` parameter override `action_source`. Off by default:
    /// otherwise any browser could relabel a website tag's events with `ep.action_source`.
    #[serde(default)]
    pub action_source_from_event: bool,
}

/// Meta rejects events whose `event_time` is more than seven days old.
const MAX_EVENT_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Meta's `action_source` values a tag can send. `app` and `business_messaging` are left out:
/// Meta requires `app_data` / `messaging_channel` with them, which no client produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ActionSource {
    /// A browser on a website: `event_source_url` and `client_user_agent` are required.
    #[default]
    Website,
    Email,
    PhoneCall,
    Chat,
    PhysicalStore,
    SystemGenerated,
    Other,
}

fn default_api_version() -> String {
    "v24.0".into()
}
fn default_endpoint() -> String {
    "https://graph.facebook.com".into()
}
fn yes() -> bool {
    true
}
/// Meta takes up to 1,000 events per request, but a dispatcher holds `batch_max ×
/// dispatch_concurrency` events in memory per tag (parsed, plus the request body), so a
/// smaller batch keeps peak memory down, and a failed request retries less.
fn default_batch_max() -> usize {
    250
}
fn default_timeout_ms() -> u64 {
    1_500
}

/// Graph error codes worth retrying (§3.7): 1 unknown and 2 temporary service errors, 4 app
/// throttling, 17 user/account throttling, 341 application limit, 613 rate limit.
const RETRY_CODES: [i64; 6] = [1, 2, 4, 17, 341, 613];
const TOKEN_ERROR_FIX: &str = "access token invalid or expired: generate a new one in Events \
    Manager → Settings → Conversions API and update access_token";
/// At most one invalid-token error log per tag and interval: every batch would log it otherwise.
const TOKEN_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Vendor text quoted in reasons is cut here; reasons end up in dead letters and logs.
const MAX_REASON_CHARS: usize = 600;

/// The Meta CAPI encoder. Everything derivable from config (URL with token and proof, body
/// suffix, name mapping, secrets to redact) is prepared once in `from_config`.
pub struct MetaCapiTag {
    name: String,
    pixel_id: String,
    api_version: String,
    /// Full request URL, credentials included.
    url: String,
    /// Closes the body: `]` plus the optional `test_event_code`, then `}`.
    body_suffix: Vec<u8>,
    /// Every string `redact` removes, longest first so a secret containing another is removed
    /// whole.
    secrets: Vec<String>,
    mapper: Mapper,
    batch_max: usize,
    timeout: Duration,
    created: Instant,
    /// Milliseconds since `created` (+1, so 0 means never) of the last invalid-token log line.
    last_token_log: AtomicU64,
}

impl std::fmt::Debug for MetaCapiTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL carries the token and proof, so it is not shown.
        f.debug_struct("MetaCapiTag")
            .field("name", &self.name)
            .field("pixel_id", &self.pixel_id)
            .field("api_version", &self.api_version)
            .field("batch_max", &self.batch_max)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn validate(cfg: &MetaCapiTagConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if cfg.pixel_id.is_empty() || !cfg.pixel_id.bytes().all(|b| b.is_ascii_digit()) {
        problems.push(format!(
            "pixel_id: `{}` is not a pixel (dataset) id; use the digits shown in Events Manager, \
             e.g. \"123456789012345\"",
            cfg.pixel_id
        ));
    }
    let token = cfg.access_token.expose();
    if token.trim().is_empty() {
        problems.push(
            "access_token: is empty; set it to a Conversions API token, e.g. \
             access_token = \"${META_CAPI_TOKEN}\""
                .into(),
        );
    } else if token.contains(char::is_whitespace) {
        problems.push("access_token: contains whitespace; check the environment variable".into());
    }
    if !is_api_version(&cfg.api_version) {
        problems.push(format!(
            "api_version: `{}` is not a Graph API version; write it like \"v24.0\"",
            cfg.api_version
        ));
    }
    let ep = cfg.endpoint.trim_end_matches('/');
    let host_part = ep
        .strip_prefix("https://")
        .or_else(|| ep.strip_prefix("http://"));
    match host_part {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => {
            if rest.contains(['?', '#']) || rest.contains(char::is_whitespace) {
                problems.push(format!(
                    "endpoint: `{}` must be a plain base URL without query, fragment or spaces",
                    cfg.endpoint
                ));
            }
        }
        _ => problems.push(format!(
            "endpoint: `{}` must be an http(s) URL, e.g. \"https://graph.facebook.com\"",
            cfg.endpoint
        )),
    }
    if let Some(code) = &cfg.test_event_code {
        if code.trim().is_empty() {
            problems.push(
                "test_event_code: is empty; remove the key or copy the code from Events Manager \
                 → Test events"
                    .into(),
            );
        }
    }
    if let Some(secret) = &cfg.app_secret {
        if secret.expose().trim().is_empty() {
            problems.push("app_secret: is empty; remove the key or set the app secret".into());
        }
    }
    if !(1..=1000).contains(&cfg.batch_max) {
        problems.push(format!(
            "batch_max: {} is out of range; Meta accepts 1 to 1000 events per request",
            cfg.batch_max
        ));
    }
    if cfg.timeout_ms == 0 {
        problems.push("timeout_ms: must be greater than 0 (Meta recommends 1500)".into());
    }
    for (from, to) in &cfg.event_names {
        if from.trim().is_empty() {
            problems.push("event_names: a GA4 event name is empty".into());
        }
        if to.trim().is_empty() {
            problems.push(format!(
                "event_names.{from}: the Meta event name is empty; use a standard name such as \
                 \"Lead\" or a custom one"
            ));
        }
    }
    problems
}

fn is_api_version(v: &str) -> bool {
    let Some((major, minor)) = v.strip_prefix('v').and_then(|r| r.split_once('.')) else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit());
    digits(major) && digits(minor)
}

/// `appsecret_proof`: hex HMAC-SHA256 keyed with the app secret over the access token.
fn appsecret_proof(app_secret: &str, access_token: &str) -> String {
    // HMAC accepts keys of any length, so this never fails; an empty proof would only make Meta
    // reject the call, which the config validation already prevents.
    match Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(access_token.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

impl MetaCapiTag {
    pub fn from_config(cfg: &MetaCapiTagConfig) -> Result<Self, Vec<String>> {
        let problems = validate(cfg);
        if !problems.is_empty() {
            return Err(problems);
        }
        let token = cfg.access_token.expose();
        let encoded_token = crate::text::encode_component(token).into_owned();
        let mut url = format!(
            "{}/{}/{}/events?access_token={encoded_token}",
            cfg.endpoint.trim_end_matches('/'),
            cfg.api_version,
            cfg.pixel_id
        );
        let mut secrets = vec![token.to_owned(), encoded_token];
        if let Some(app_secret) = &cfg.app_secret {
            let proof = appsecret_proof(app_secret.expose(), token);
            url.push_str("&appsecret_proof=");
            url.push_str(&proof);
            secrets.push(app_secret.expose().to_owned());
            secrets.push(proof);
        }
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();

        let mut body_suffix = b"]".to_vec();
        if let Some(code) = &cfg.test_event_code {
            body_suffix.extend_from_slice(b",\"test_event_code\":");
            serde_json::to_writer(&mut body_suffix, code.trim())
                .map_err(|e| vec![format!("test_event_code: cannot be encoded: {e}")])?;
        }
        body_suffix.push(b'}');

        Ok(MetaCapiTag {
            name: cfg.name.clone(),
            pixel_id: cfg.pixel_id.clone(),
            api_version: cfg.api_version.clone(),
            url,
            body_suffix,
            secrets,
            mapper: Mapper {
                overrides: cfg
                    .event_names
                    .iter()
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .collect(),
                forward_unmapped: cfg.forward_unmapped,
                purchase_event_id_from_transaction: cfg.purchase_event_id_from_transaction,
                action_source: cfg.action_source,
                action_source_from_event: cfg.action_source_from_event,
            },
            batch_max: cfg.batch_max,
            timeout: Duration::from_millis(cfg.timeout_ms),
            created: Instant::now(),
            last_token_log: AtomicU64::new(0),
        })
    }

    fn request(&self, mut body: Vec<u8>) -> OutboundRequest {
        body.extend_from_slice(&self.body_suffix);
        OutboundRequest {
            method: Method::POST,
            url: self.url.clone(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body),
        }
    }

    /// True when this call may log the invalid-token error (at most once per interval).
    fn token_log_due(&self) -> bool {
        let now = u64::try_from(self.created.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        let last = self.last_token_log.load(Ordering::Relaxed);
        let interval = u64::try_from(TOKEN_LOG_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) < interval {
            return false;
        }
        self.last_token_log
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// One line describing Meta's error envelope, vendor text truncated and secrets removed.
    fn describe(&self, status: StatusCode, err: &GraphError) -> String {
        use std::fmt::Write as _;
        let mut s = String::from("Meta error");
        if let Some(code) = err.code {
            let _ = write!(s, " code {code}");
        }
        if let Some(sub) = err.subcode {
            let _ = write!(s, " subcode {sub}");
        }
        if let Some(kind) = &err.kind {
            let _ = write!(s, " ({kind})");
        }
        let _ = write!(s, ", HTTP {}", status.as_u16());
        if let Some(m) = &err.message {
            let _ = write!(s, ": {m}");
        }
        if let Some(m) = err
            .user_msg
            .as_ref()
            .filter(|m| Some(*m) != err.message.as_ref())
        {
            let _ = write!(s, " — {m}");
        }
        if let Some(id) = &err.fbtrace_id {
            let _ = write!(s, " [fbtrace_id {id}]");
        }
        // Redact before cutting: a cut through a token would leave its prefix unredacted.
        truncate_chars(&self.redact(&s), MAX_REASON_CHARS).to_owned()
    }

    /// Reason for a response without Graph's envelope (a proxy or load balancer answered).
    fn http_reason(&self, status: StatusCode, body: &[u8]) -> String {
        let text = self.redact(&String::from_utf8_lossy(body));
        let text = truncate_chars(text.trim(), 300);
        if text.is_empty() {
            format!("HTTP {}", status.as_u16())
        } else {
            format!("HTTP {}: {text}", status.as_u16())
        }
    }
}

/// The fields of Graph's error envelope we use. Read leniently from a `Value`: a field of an
/// unexpected type is ignored instead of hiding the whole envelope.
#[derive(Debug, Default)]
struct GraphError {
    message: Option<String>,
    kind: Option<String>,
    code: Option<i64>,
    subcode: Option<i64>,
    is_transient: bool,
    user_msg: Option<String>,
    fbtrace_id: Option<String>,
}

fn parse_graph_error(body: &[u8]) -> Option<GraphError> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let e = v.get("error")?.as_object()?;
    let text = |k: &str| {
        e.get(k)
            .and_then(|v| v.as_str())
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let int = |k: &str| {
        e.get(k).and_then(|v| match v {
            serde_json::Value::Number(n) => n.as_i64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        })
    };
    Some(GraphError {
        message: text("message"),
        kind: text("type"),
        code: int("code"),
        subcode: int("error_subcode"),
        is_transient: e
            .get("is_transient")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        user_msg: text("error_user_msg"),
        fbtrace_id: text("fbtrace_id"),
    })
}

impl Tag for MetaCapiTag {
    fn kind(&self) -> &'static str {
        "meta_capi"
    }

    fn max_batch(&self) -> usize {
        self.batch_max
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn encode_batch(&self, events: &[&Event], now_ms: i64) -> Encoded {
        let max_year = normalize::year_of(now_ms);
        let mut scratch = String::with_capacity(64);
        crate::tags::batch::json_batches(
            events,
            self.batch_max,
            700,
            b"{\"data\":[",
            |e| self.mapper.build(e, now_ms, max_year, &mut scratch),
            |body| self.request(body),
        )
    }

    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Outcome {
        if status.is_success() {
            // A 200 means Meta accepted the whole batch; `events_received` is informational
            // (the SDKs do not check it either).
            return Outcome::Delivered;
        }
        let Some(err) = parse_graph_error(body) else {
            // Shared retry rules, but the reason is built here so the body is redacted whole.
            return match classify_http(status, headers, b"") {
                Outcome::Retry { after, .. } => Outcome::Retry {
                    after,
                    reason: self.http_reason(status, body),
                },
                Outcome::Rejected { .. } => Outcome::Rejected {
                    reason: self.http_reason(status, body),
                },
                Outcome::Delivered => Outcome::Delivered,
            };
        };
        let detail = self.describe(status, &err);
        if err.code == Some(190) {
            if self.token_log_due() {
                tracing::error!(
                    tag = %self.name,
                    pixel_id = %self.pixel_id,
                    code = 190,
                    subcode = err.subcode,
                    "Meta CAPI {TOKEN_ERROR_FIX}; events go to dead letters until fixed ({detail})"
                );
            }
            return Outcome::Rejected {
                reason: format!("{TOKEN_ERROR_FIX} ({detail})"),
            };
        }
        let retryable = err.is_transient
            || err.code.is_some_and(|c| RETRY_CODES.contains(&c))
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || status.is_server_error();
        if retryable {
            Outcome::Retry {
                after: retry_after(headers),
                reason: detail,
            }
        } else {
            Outcome::Rejected { reason: detail }
        }
    }

    fn redact(&self, text: &str) -> String {
        crate::tags::batch::redact_secrets(&self.secrets, text)
    }

    fn delivery_rules(&self) -> DeliveryRules {
        DeliveryRules {
            vendor: "Meta",
            max_event_age: Some(MAX_EVENT_AGE),
        }
    }
}

impl crate::tags::TagSpec for MetaCapiTagConfig {
    fn name(&self) -> &str {
        &self.name
    }
    fn trigger(&self) -> &TriggerConfig {
        &self.trigger
    }
    fn build(&self) -> Result<Box<dyn Tag>, Vec<String>> {
        MetaCapiTag::from_config(self).map(|t| Box::new(t) as Box<dyn Tag>)
    }
}
