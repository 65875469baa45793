//! Storage engines behind the [`DeliveryStore`](crate::outbox::DeliveryStore) trait, and the one
//! place that opens the configured one.

use std::sync::Arc;

use crate::outbox::config::{Backend, OutboxConfig};
use crate::outbox::DeliveryStore;

pub mod embedded;
pub mod redis;
pub mod tools;

#[cfg(test)]
mod conformance;

/// Opens the engine `[outbox] backend` names.
pub async fn open(cfg: &OutboxConfig) -> Result<Arc<dyn DeliveryStore>, String> {
    match cfg.backend {
        Backend::Embedded => embedded::EmbeddedStore::open(cfg)
            .await
            .map(|s| s as Arc<dyn DeliveryStore>)
            .map_err(|e| format!("opening the outbox at {}: {e}", cfg.path)),
        Backend::Redis => redis::RedisStore::open(cfg)
            .await
            .map(|s| s as Arc<dyn DeliveryStore>),
    }
}
