//! Meta Conversions API tag.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::Secret;
use crate::tags::trigger::TriggerConfig;

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
fn default_batch_max() -> usize {
    1000
}
fn default_timeout_ms() -> u64 {
    1_500
}

#[derive(Debug)]
pub struct MetaCapiTag {
    cfg: MetaCapiTagConfig,
}

impl MetaCapiTag {
    pub fn from_config(cfg: &MetaCapiTagConfig) -> Result<Self, Vec<String>> {
        Ok(MetaCapiTag { cfg: cfg.clone() })
    }
}

impl crate::tags::Tag for MetaCapiTag {
    fn kind(&self) -> &'static str {
        "meta_capi"
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
