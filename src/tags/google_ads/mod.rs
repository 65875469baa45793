//! Google Ads conversions through the Data Manager API (ad-platforms §1.5):
//! `POST {endpoint}/v1/events:ingest` with an OAuth2 bearer token (scope
//! `…/auth/datamanager`), one destination (the Ads account and conversion action from config),
//! up to 2,000 events per request.
//!
//! Data Manager validates a request whole ("fast-fail": one invalid event fails the request,
//! nothing is ingested), answers `{"requestId": …}`, and processes asynchronously;
//! `GET /v1/requestStatus:retrieve` then tells `SUCCESS`, `PROCESSING`, `FAILED` or
//! `PARTIAL_SUCCESS` per destination with error **counts per reason**, not which events
//! (`request_status_per_destination.proto`, `processing_errors.proto`). So:
//! - a synchronous error rejects the request and the dispatcher's bisection finds the events
//!   Google refuses, each dead-lettered with Google's reason;
//! - `FAILED` (nothing ingested) is a rejection of the request too, bisected the same way;
//!   `FAILED` only for internal errors is retried;
//! - `PARTIAL_SUCCESS` can only be pinned on an event when the request carried one; for more,
//!   the request counts as delivered and the reasons are logged and counted
//!   (`tagrelay_google_ads_processing_errors_total`), since resending would duplicate the
//!   events Google did ingest.

pub mod credentials;
mod mapping;

impl crate::tags::TagSpec for GoogleAdsTagConfig {
    fn name(&self) -> &str {
        &self.name
    }
    fn trigger(&self) -> &TriggerConfig {
        &self.trigger
    }
    fn build(&self) -> Result<Box<dyn Tag>, Vec<String>> {
        GoogleAdsTag::from_config(self).map(|t| Box::new(t) as Box<dyn Tag>)
    }
}

#[cfg(test)]
mod tests;

pub use credentials::GoogleCredential;

use std::sync::Arc;
use std::time::Duration;

use ::http::{HeaderMap, Method, StatusCode};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::event::Event;
use crate::secret::EnvString;
use crate::tags::batch::NotSent;
use crate::tags::trigger::TriggerConfig;
use crate::tags::values::endpoint_problem;
use crate::tags::{
    classify_http, retry_after, Credential, Encoded, OutboundRequest, Outcome, StatusCheck,
    StatusOutcome, Tag,
};
use crate::text::{encode_component, truncate_chars};
use mapping::Mapper;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoogleAdsTagConfig {
    pub name: String,
    #[serde(default)]
    pub trigger: TriggerConfig,
    /// A service-account key or an authorized-user JSON file; its `token_uri` is honoured.
    pub credentials_file: EnvString,
    /// The Google Ads customer id the conversions go to, digits only.
    pub operating_account_id: String,
    /// The conversion action's id (Data Manager's `productDestinationId`).
    pub conversion_action_id: String,
    /// The manager account acting for the operating account, when one is used.
    pub login_account_id: Option<String>,
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// Google validates the requests but ingests nothing (a dry run).
    #[serde(default)]
    pub validate_only: bool,
    /// Send the visitor's IP address (`eventDeviceInfo.ipAddress`). Google does not match on
    /// it for users in the EEA, the UK and Switzerland.
    #[serde(default = "yes")]
    pub send_ip_address: bool,
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// First status check this long after a request is accepted, then at this interval.
    #[serde(default = "default_status_poll_interval_ms")]
    pub status_poll_interval_ms: u64,
    /// Longest a request's processing status is awaited (at most half the outbox lease).
    #[serde(default = "default_status_poll_max_ms")]
    pub status_poll_max_ms: u64,
}

fn default_endpoint() -> String {
    "https://datamanager.googleapis.com".into()
}
fn yes() -> bool {
    true
}
fn default_batch_max() -> usize {
    500
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_status_poll_interval_ms() -> u64 {
    10_000
}
fn default_status_poll_max_ms() -> u64 {
    60_000
}

/// Data Manager's events per request (`IngestEventsRequest.events`).
const MAX_BATCH: usize = 2000;
const MAX_REASON_CHARS: usize = 600;

pub struct GoogleAdsTag {
    name: String,
    ingest_url: String,
    status_url: String,
    /// Opens the body up to `"events":[`.
    body_prefix: Vec<u8>,
    credential: Arc<GoogleCredential>,
    secrets: Vec<String>,
    validate_only: bool,
    mapper: Mapper,
    batch_max: usize,
    timeout: Duration,
    poll_interval: Duration,
    poll_max: Duration,
}

impl std::fmt::Debug for GoogleAdsTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoogleAdsTag")
            .field("name", &self.name)
            .field("ingest_url", &self.ingest_url)
            .field("credential", &self.credential)
            .field("validate_only", &self.validate_only)
            .finish_non_exhaustive()
    }
}

fn account_id_problem(key: &str, id: &str) -> Option<String> {
    (id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit())).then(|| {
        format!(
            "{key}: `{id}` must be digits only, e.g. \"1234567890\" for the account shown as \
             123-456-7890"
        )
    })
}

fn validate(cfg: &GoogleAdsTagConfig) -> Vec<String> {
    let mut problems = Vec::new();
    problems.extend(account_id_problem(
        "operating_account_id",
        &cfg.operating_account_id,
    ));
    if let Some(login) = &cfg.login_account_id {
        problems.extend(account_id_problem("login_account_id", login));
    }
    let action = &cfg.conversion_action_id;
    if action.is_empty() || !action.bytes().all(|b| b.is_ascii_digit()) {
        problems.push(format!(
            "conversion_action_id: `{action}` must be the conversion action's numeric id (Goals › \
             Conversions › the action; `ctId=` in its URL), e.g. \"987654321\""
        ));
    }
    problems.extend(endpoint_problem(
        "endpoint",
        &cfg.endpoint,
        "https://datamanager.googleapis.com",
    ));
    if !(1..=MAX_BATCH).contains(&cfg.batch_max) {
        problems.push(format!(
            "batch_max: {} is out of range; Data Manager accepts 1 to {MAX_BATCH} events per \
             request",
            cfg.batch_max
        ));
    }
    if cfg.timeout_ms == 0 {
        problems.push("timeout_ms: must be greater than 0".into());
    }
    if cfg.status_poll_interval_ms == 0 {
        problems.push("status_poll_interval_ms: must be greater than 0".into());
    }
    problems
}

impl GoogleAdsTag {
    pub fn from_config(cfg: &GoogleAdsTagConfig) -> Result<Self, Vec<String>> {
        let mut problems = validate(cfg);
        let path = cfg.credentials_file.value.trim();
        let credential = if path.is_empty() {
            problems.push(
                "credentials_file: is empty; set the path of a service-account key or an \
                 authorized-user JSON file"
                    .into(),
            );
            None
        } else {
            GoogleCredential::load(path)
                .map_err(|e| problems.push(format!("credentials_file: {e}")))
                .ok()
        };
        let Some(credential) = credential.filter(|_| problems.is_empty()) else {
            return Err(problems);
        };
        let account = |id: &str| serde_json::json!({"accountType": "GOOGLE_ADS", "accountId": id});
        let mut destination = serde_json::json!({
            "operatingAccount": account(&cfg.operating_account_id),
            "productDestinationId": cfg.conversion_action_id,
        });
        if let (Some(login), Some(map)) = (&cfg.login_account_id, destination.as_object_mut()) {
            map.insert("loginAccount".into(), account(login));
        }
        let mut body_prefix = br#"{"destinations":["#.to_vec();
        serde_json::to_writer(&mut body_prefix, &destination)
            .map_err(|e| vec![format!("cannot encode the destination: {e}")])?;
        body_prefix.extend_from_slice(br#"],"encoding":"HEX","#);
        if cfg.validate_only {
            body_prefix.extend_from_slice(br#""validateOnly":true,"#);
        }
        body_prefix.extend_from_slice(br#""events":["#);
        let endpoint = cfg.endpoint.trim_end_matches('/');
        let mut secrets = credential.secrets().to_vec();
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Ok(GoogleAdsTag {
            name: cfg.name.clone(),
            ingest_url: format!("{endpoint}/v1/events:ingest"),
            status_url: format!("{endpoint}/v1/requestStatus:retrieve"),
            body_prefix,
            credential: Arc::new(credential),
            secrets,
            validate_only: cfg.validate_only,
            mapper: Mapper {
                send_ip_address: cfg.send_ip_address,
            },
            batch_max: cfg.batch_max,
            timeout: Duration::from_millis(cfg.timeout_ms),
            poll_interval: Duration::from_millis(cfg.status_poll_interval_ms),
            poll_max: Duration::from_millis(cfg.status_poll_max_ms),
        })
    }

    fn request(&self, mut body: Vec<u8>) -> OutboundRequest {
        body.extend_from_slice(b"]}");
        OutboundRequest {
            method: Method::POST,
            url: self.ingest_url.clone(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body),
        }
    }

    fn cut(&self, s: &str) -> String {
        truncate_chars(&self.redact(s), MAX_REASON_CHARS).to_owned()
    }
}

/// `google.rpc.Status` in its JSON error envelope: `{"error":{code,message,status,details}}`.
/// The details give Google's reason (`ErrorInfo.reason`) and the fields at fault
/// (`BadRequest.fieldViolations`).
fn describe_error(status: StatusCode, body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let err = v.get("error")?;
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let mut s = String::from("Google Data Manager");
    if let Some(st) = text(err, "status") {
        s.push(' ');
        s.push_str(&st);
    }
    s.push_str(&format!(" (HTTP {})", status.as_u16()));
    if let Some(m) = text(err, "message") {
        s.push_str(": ");
        s.push_str(&m);
    }
    for d in err
        .get("details")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(reason) = text(d, "reason") {
            s.push_str(&format!(" [reason {reason}]"));
        }
        for fv in d
            .get("fieldViolations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let field = text(fv, "field").unwrap_or_default();
            let desc = text(fv, "description").unwrap_or_default();
            s.push_str(&format!(" [{field}: {desc}]"));
        }
    }
    Some(s)
}

/// Error counts per reason of a status answer, as `REASON ×n, …`.
fn error_counts(dest: &Value, tag: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for c in dest
        .pointer("/errorInfo/errorCounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let reason = c
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("PROCESSING_ERROR_REASON_UNSPECIFIED")
            .to_owned();
        // int64 is a string in proto3 JSON.
        let n = match c.get("recordCount") {
            Some(Value::String(s)) => s.parse().unwrap_or(0),
            Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
            _ => 0,
        };
        // The reasons are a closed enum (processing_errors.proto): a bounded label.
        let label =
            if reason.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') && reason.len() < 100 {
                reason.clone()
            } else {
                "other".into()
            };
        metrics::counter!("tagrelay_google_ads_processing_errors_total", "tag" => tag.to_owned(), "reason" => label)
            .increment(n.max(1));
        out.push((reason, n));
    }
    out
}

impl Tag for GoogleAdsTag {
    fn kind(&self) -> &'static str {
        "google_ads"
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
            500,
            &self.body_prefix,
            |e| {
                self.mapper
                    .build(e, max_year, &mut scratch)
                    .map_err(NotSent::Rejected)
            },
            |body| self.request(body),
        )
    }

    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Outcome {
        if status.is_success() {
            return Outcome::Delivered;
        }
        let reason = match describe_error(status, body) {
            Some(d) => self.cut(&d),
            None => {
                let text = self.redact(&String::from_utf8_lossy(body));
                let text = truncate_chars(text.trim(), 300);
                if text.is_empty() {
                    format!("HTTP {}", status.as_u16())
                } else {
                    format!("HTTP {}: {text}", status.as_u16())
                }
            }
        };
        // 401: the token was refused; the next attempt fetches one afresh (a revoked
        // credential keeps failing until the retry window ends, with this reason).
        if status == StatusCode::UNAUTHORIZED {
            return Outcome::Retry {
                after: retry_after(headers),
                reason: format!("{reason} (check credentials_file)"),
            };
        }
        match classify_http(status, headers, b"") {
            Outcome::Retry { after, .. } => Outcome::Retry { after, reason },
            _ => Outcome::Rejected { reason },
        }
    }

    fn redact(&self, text: &str) -> String {
        crate::tags::batch::redact_secrets(&self.secrets, text)
    }

    fn credential(&self) -> Option<Arc<dyn Credential>> {
        Some(self.credential.clone())
    }

    fn status_check(&self, response_body: &[u8]) -> Option<StatusCheck> {
        // A dry run ingests nothing and has no status to retrieve (INVALID_REQUEST_ID).
        if self.validate_only {
            return None;
        }
        let v: Value = serde_json::from_slice(response_body).ok()?;
        let id = v.get("requestId")?.as_str()?.trim();
        if id.is_empty() {
            return None;
        }
        Some(StatusCheck {
            request: OutboundRequest {
                method: Method::GET,
                url: format!("{}?requestId={}", self.status_url, encode_component(id)),
                headers: Vec::new(),
                body: Bytes::new(),
            },
            interval: self.poll_interval,
            max_wait: self.poll_max,
        })
    }

    fn classify_status(&self, _status: StatusCode, body: &[u8], events: usize) -> StatusOutcome {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return StatusOutcome::Pending("the status answer is not JSON".into());
        };
        // One destination per request, so the first status is ours.
        let Some(dest) = v.pointer("/requestStatusPerDestination/0") else {
            return StatusOutcome::Pending("no status for the destination yet".into());
        };
        let state = dest
            .get("requestStatus")
            .and_then(Value::as_str)
            .unwrap_or("REQUEST_STATUS_UNKNOWN");
        let reasons = |counts: &[(String, u64)]| {
            let list: Vec<String> = counts.iter().map(|(r, n)| format!("{r} ×{n}")).collect();
            if list.is_empty() {
                "no reason given".to_owned()
            } else {
                list.join(", ")
            }
        };
        match state {
            "SUCCESS" => StatusOutcome::Final(Outcome::Delivered),
            "FAILED" => {
                let counts = error_counts(dest, &self.name);
                let reason = self.cut(&format!(
                    "Google Data Manager processing FAILED: {}",
                    reasons(&counts)
                ));
                let internal_only = !counts.is_empty()
                    && counts
                        .iter()
                        .all(|(r, _)| r == "PROCESSING_ERROR_REASON_INTERNAL_ERROR");
                if internal_only {
                    StatusOutcome::Final(Outcome::Retry {
                        after: None,
                        reason,
                    })
                } else {
                    StatusOutcome::Final(Outcome::Rejected { reason })
                }
            }
            "PARTIAL_SUCCESS" => {
                let counts = error_counts(dest, &self.name);
                let detail = reasons(&counts);
                if events == 1 {
                    return StatusOutcome::Final(Outcome::Rejected {
                        reason: self
                            .cut(&format!("Google Data Manager processing failed: {detail}")),
                    });
                }
                tracing::warn!(
                    tag = %self.name,
                    events,
                    reasons = %self.redact(&detail),
                    "Google processed the request partially and does not say which events failed; the request counts as delivered"
                );
                StatusOutcome::Final(Outcome::Delivered)
            }
            other => StatusOutcome::Pending(format!("Google reports {other}")),
        }
    }
}
