//! Storage engines behind the [`DeliveryStore`](crate::outbox::DeliveryStore) trait, and the one
//! place that opens the configured one.

use std::sync::Arc;

use crate::outbox::config::{Backend, OutboxConfig};
use crate::outbox::DeliveryStore;

pub mod embedded;
pub mod redis;
pub mod report;
pub mod tools;

#[cfg(test)]
mod conformance;

/// Opens the engine `[outbox] backend` names.
pub async fn open(cfg: &OutboxConfig) -> Result<Arc<dyn DeliveryStore>, OpenError> {
    match cfg.backend {
        Backend::Embedded => embedded::EmbeddedStore::open(cfg)
            .await
            .map(|s| s as Arc<dyn DeliveryStore>)
            .map_err(OpenError::Embedded),
        Backend::Redis => redis::RedisStore::open(cfg)
            .await
            .map(|s| s as Arc<dyn DeliveryStore>)
            .map_err(OpenError::Redis),
    }
}

/// Why the configured engine could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Embedded(embedded::OpenError),
    #[error("{0}")]
    Redis(String),
}
