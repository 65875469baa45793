//! GA4 tag: forwards events to Google Analytics 4 (`/g/collect` or Measurement Protocol).
//!
//! `collect` rebuilds the browser's own hit (so server-sent data matches browser data, and
//! session/engagement parameters survive); `measurement_protocol` sends documented JSON and
//! applies GA4's documented limits itself, since MP silently drops what it does not like.
//! Neither mode ever sends `user_data` (PII) to Google.

mod collect;
mod mp;
#[cfg(test)]
mod tests;

use std::borrow::Cow;

pub(crate) use crate::text::{encode_component, truncate_chars};
use std::net::IpAddr;

use http::{HeaderMap, StatusCode};
use serde::Deserialize;

use crate::event::Event;
use crate::secret::Secret;
use crate::tags::trigger::TriggerConfig;
use crate::tags::{Encoded, Outcome, Tag};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ga4TagConfig {
    pub name: String,
    #[serde(default)]
    pub trigger: TriggerConfig,
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    #[serde(default)]
    pub mode: Ga4Mode,
    /// Overrides the hit's own `tid`.
    pub measurement_id: Option<String>,
    /// Required for `mode = "measurement_protocol"`.
    pub api_secret: Option<Secret>,
    #[serde(default)]
    pub redact_ip: RedactIp,
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_endpoint() -> String {
    "https://region1.google-analytics.com".into()
}
fn default_batch_max() -> usize {
    25
}
fn default_timeout_ms() -> u64 {
    5_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Ga4Mode {
    #[default]
    Collect,
    MeasurementProtocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RedactIp {
    #[default]
    None,
    LastOctet,
    Full,
}

/// Most events one GA4 request may carry (documented for MP; gtag batches far fewer).
pub const MAX_EVENTS_PER_REQUEST: usize = crate::ga4_limits::MAX_EVENTS;

#[derive(Debug)]
pub struct Ga4Tag {
    mode: Ga4Mode,
    /// Without trailing slash.
    endpoint: String,
    measurement_id: Option<String>,
    api_secret: Option<Secret>,
    redact_ip: RedactIp,
    batch_max: usize,
    timeout_ms: u64,
}

impl Ga4Tag {
    pub fn from_config(cfg: &Ga4TagConfig) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let endpoint = match validate_endpoint(&cfg.endpoint) {
            Ok(e) => e,
            Err(m) => {
                problems.push(format!("endpoint: {m}"));
                String::new()
            }
        };
        if let Some(mid) = &cfg.measurement_id {
            if !is_measurement_id(mid) {
                problems.push(format!(
                    "measurement_id: `{mid}` is not a GA4 measurement id (expected `G-` followed by letters and digits, e.g. \"G-ABCDEF1234\")"
                ));
            }
        }
        if cfg.mode == Ga4Mode::MeasurementProtocol {
            match &cfg.api_secret {
                None => problems.push(
                    "api_secret: required when mode = \"measurement_protocol\"; set api_secret = \"${GA4_API_SECRET}\" (Admin › Data streams › Measurement Protocol API secrets)".into(),
                ),
                Some(s) if s.expose().trim().is_empty() => {
                    problems.push("api_secret: is empty".into())
                }
                Some(_) => {}
            }
        }
        if cfg.batch_max == 0 || cfg.batch_max > MAX_EVENTS_PER_REQUEST {
            problems.push(format!(
                "batch_max: must be between 1 and {MAX_EVENTS_PER_REQUEST} (GA4 takes at most {MAX_EVENTS_PER_REQUEST} events per request), got {}",
                cfg.batch_max
            ));
        }
        if cfg.timeout_ms == 0 {
            problems.push("timeout_ms: must be greater than 0".into());
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Ga4Tag {
            mode: cfg.mode,
            endpoint,
            measurement_id: cfg.measurement_id.clone(),
            api_secret: cfg.api_secret.clone(),
            redact_ip: cfg.redact_ip,
            batch_max: cfg.batch_max,
            timeout_ms: cfg.timeout_ms,
        })
    }

    /// The measurement id an event goes to: the configured override, else the hit's own.
    fn measurement_id<'a>(&'a self, e: &'a Event) -> Option<&'a str> {
        self.measurement_id
            .as_deref()
            .or(e.ga.measurement_id.as_deref())
            .filter(|m| !m.is_empty())
    }
}

impl Tag for Ga4Tag {
    fn kind(&self) -> &'static str {
        "ga4"
    }
    fn max_batch(&self) -> usize {
        self.batch_max
    }
    fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms)
    }
    fn encode_batch(&self, events: &[&Event], now_ms: i64) -> Encoded {
        match self.mode {
            Ga4Mode::Collect => collect::encode(self, events),
            Ga4Mode::MeasurementProtocol => mp::encode(self, events, now_ms),
        }
    }
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Outcome {
        crate::tags::classify_http(status, headers, body)
    }
    fn redact(&self, text: &str) -> String {
        let Some(secret) = self.api_secret.as_ref().map(Secret::expose) else {
            return text.to_owned();
        };
        if secret.is_empty() {
            return text.to_owned();
        }
        let mut out = text.replace(secret, "[redacted]");
        // The secret travels percent-encoded in the URL; catch that spelling too.
        let encoded = encode_component(secret);
        if encoded != secret {
            out = out.replace(encoded.as_ref(), "[redacted]");
        }
        out
    }
}

/// Checks the endpoint is an absolute http(s) URL without query or fragment, and returns it
/// without trailing slashes so paths can be appended.
fn validate_endpoint(raw: &str) -> Result<String, String> {
    let bad = || {
        format!("`{raw}` must be an http(s) URL such as \"https://region1.google-analytics.com\"")
    };
    let uri: http::Uri = raw.parse().map_err(|_| bad())?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad());
    }
    if uri.query().is_some() || raw.contains('#') {
        return Err(format!(
            "`{raw}` must not have a query or fragment; give the base URL only"
        ));
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

fn is_measurement_id(s: &str) -> bool {
    s.strip_prefix("G-")
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// The visitor IP as it may be shown to Google under the configured redaction.
/// `None` when there is nothing safe to send.
fn redacted_ip(mode: RedactIp, ip: Option<&str>) -> Option<Cow<'_, str>> {
    match mode {
        RedactIp::Full => Some(Cow::Borrowed("::")),
        RedactIp::None => ip.filter(|s| !s.is_empty()).map(Cow::Borrowed),
        RedactIp::LastOctet => {
            // An address we cannot parse cannot be redacted, so it is not sent at all.
            let parsed: IpAddr = ip?.trim().parse().ok()?;
            let v4 = match parsed {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(v6) => v6.to_ipv4_mapped(),
            };
            Some(Cow::Owned(match v4 {
                Some(v4) => {
                    let [a, b, c, _] = v4.octets();
                    format!("{a}.{b}.{c}.0")
                }
                None => {
                    // Keep the /48 (network prefix, enough for geolocation), zero the rest.
                    let IpAddr::V6(v6) = parsed else {
                        return None;
                    };
                    let bits = u128::from(v6) & (!0u128 << 80);
                    std::net::Ipv6Addr::from(bits).to_string()
                }
            }))
        }
    }
}

/// Counts something the tag dropped or cut to fit GA4's limits. Labels are fixed strings.
fn count_dropped(reason: &'static str) {
    metrics::counter!("tagrelay_tag_dropped_total", "tag_type" => "ga4", "reason" => reason)
        .increment(1);
}

impl crate::tags::TagSpec for Ga4TagConfig {
    fn name(&self) -> &str {
        &self.name
    }
    fn trigger(&self) -> &TriggerConfig {
        &self.trigger
    }
    fn build(&self) -> Result<Box<dyn Tag>, Vec<String>> {
        Ga4Tag::from_config(self).map(|t| Box::new(t) as Box<dyn Tag>)
    }
}
