//! GA4 tag: forwards events to Google Analytics 4 (`/g/collect` or Measurement Protocol).

use serde::Deserialize;

use crate::config::Secret;
use crate::tags::trigger::TriggerConfig;

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

#[derive(Debug)]
pub struct Ga4Tag {
    cfg: Ga4TagConfig,
}

impl Ga4Tag {
    pub fn from_config(cfg: &Ga4TagConfig) -> Result<Self, Vec<String>> {
        Ok(Ga4Tag { cfg: cfg.clone() })
    }
}

impl crate::tags::Tag for Ga4Tag {
    fn kind(&self) -> &'static str {
        "ga4"
    }
    fn max_batch(&self) -> usize {
        self.cfg.batch_max
    }
    fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.cfg.timeout_ms)
    }
    fn encode(&self, events: &[crate::event::Event], _now_ms: i64) -> crate::tags::Encoded {
        crate::tags::Encoded {
            rejected: (0..events.len()).map(|i| (i, "encoder not built yet".into())).collect(),
            ..Default::default()
        }
    }
    fn classify(&self, status: ::http::StatusCode, headers: &::http::HeaderMap, body: &[u8]) -> crate::tags::Outcome {
        crate::tags::classify_http(status, headers, body)
    }
    fn redact(&self, text: &str) -> String {
        text.to_owned()
    }
}
