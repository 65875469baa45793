//! Generic HTTP tag: the event JSON to any URL (webhooks, anything without a tag yet).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::EnvString;
use crate::tags::trigger::TriggerConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTagConfig {
    pub name: String,
    #[serde(default)]
    pub trigger: TriggerConfig,
    pub url: String,
    #[serde(default = "default_method")]
    pub method: String,
    /// Header values may be `${ENV}` references; they are treated as secrets in the debug view.
    #[serde(default)]
    pub headers: BTreeMap<String, EnvString>,
    /// 1 = one request per event with the event object as body; >1 = JSON arrays.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_method() -> String {
    "POST".into()
}
fn default_batch_max() -> usize {
    1
}
fn default_timeout_ms() -> u64 {
    5_000
}

#[derive(Debug)]
pub struct HttpTag {
    cfg: HttpTagConfig,
}

impl HttpTag {
    pub fn from_config(cfg: &HttpTagConfig) -> Result<Self, Vec<String>> {
        Ok(HttpTag { cfg: cfg.clone() })
    }
}

impl crate::tags::Tag for HttpTag {
    fn kind(&self) -> &'static str {
        "http"
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
