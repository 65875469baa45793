//! The durable outbox: every event for every fired tag is written here before the hit is
//! answered, then delivered by per-tag dispatchers with retries and dead letters.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

/// One event queued for one tag.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    pub tag: Arc<str>,
    pub event_id: String,
    /// The event, serialized as JSON once and shared by every tag it fired.
    pub payload: Bytes,
    pub enqueued_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    #[error("outbox is full")]
    Full { retry_after_secs: u64 },
    #[error("outbox is closed")]
    Closed,
    #[error("outbox write failed: {0}")]
    Io(String),
}

/// The hit path's view of the outbox. `enqueue` resolves once the records are committed.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    async fn enqueue(&self, records: Vec<NewRecord>) -> Result<(), EnqueueError>;
    /// Open and accepting writes (for `/readyz`).
    fn is_open(&self) -> bool;
}
