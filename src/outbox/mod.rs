//! The durable outbox: every event for every fired tag is written here before the hit is
//! answered, then delivered by per-tag dispatchers with retries and dead letters.
//!
//! Two traits split the surface so that a shared broker can later replace the embedded
//! SQLite store without touching clients or tags:
//! - [`Outbox`] is the hit path's view: enqueue and readiness.
//! - [`DeliveryStore`] adds what dispatchers need: lease, settle (ack / nack / dead-letter),
//!   wake-ups, backlog for gauges, and close.
//!
//! Operator tools that work on the embedded store's files (stats, dead letters, replay) are
//! in [`tools`]; they open the database themselves so they work while the server runs.

pub mod dispatcher;
pub mod retry;
pub mod sqlite;
pub mod tools;
mod writer;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

pub use dispatcher::{
    spawn_dispatchers, DeliveryObserver, DispatchSettings, Dispatchers, NoopObserver,
};
pub use retry::RetryPolicy;
pub use sqlite::SqliteOutbox;

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

/// A store operation other than enqueue failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("outbox is closed")]
    Closed,
    #[error("outbox store error: {0}")]
    Io(String),
}

/// The hit path's view of the outbox. `enqueue` resolves once the records are committed.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    async fn enqueue(&self, records: Vec<NewRecord>) -> Result<(), EnqueueError>;
    /// Open and accepting writes (for `/readyz`).
    fn is_open(&self) -> bool;
}

/// A record handed to a dispatcher. It stays in the store, invisible to other leases, until
/// it is settled or `lease_until_ms` passes (then it is due again: at-least-once).
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedRecord {
    pub id: i64,
    pub tag: Arc<str>,
    pub event_id: String,
    pub payload: Bytes,
    /// Failed attempts so far.
    pub attempts: u32,
    pub first_enqueued_ms: i64,
    pub last_error: Option<String>,
}

/// Try again later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    pub id: i64,
    pub next_attempt_ms: i64,
    pub error: String,
}

/// Give up on a record: it moves to the dead-letter store with `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRequest {
    pub id: i64,
    pub reason: String,
    /// Whether the failure that killed it was a delivery attempt (counted in `attempts`).
    pub attempted: bool,
}

/// The fate of a leased batch, applied in one store transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    pub ack: Vec<i64>,
    pub nack: Vec<Nack>,
    pub dead: Vec<DeadLetterRequest>,
    pub now_ms: i64,
}

impl Settlement {
    pub fn is_empty(&self) -> bool {
        self.ack.is_empty() && self.nack.is_empty() && self.dead.is_empty()
    }
}

/// Pending work of one tag, for gauges.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TagBacklog {
    pub tag: String,
    pub pending: u64,
    /// Currently leased by a dispatcher (a subset of `pending`).
    pub leased: u64,
    pub oldest_enqueued_ms: Option<i64>,
}

/// What dispatchers need from a store. Implemented by [`SqliteOutbox`]; a shared broker
/// backend implements the same.
#[async_trait]
pub trait DeliveryStore: Outbox {
    /// Leases up to `limit` due records of `tag` (due: `next_attempt_ms <= now_ms` and not
    /// leased), oldest due first, until `now_ms + lease_ms`.
    async fn lease(
        &self,
        tag: &str,
        now_ms: i64,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<LeasedRecord>, StoreError>;
    /// Applies acks, nacks and dead letters together.
    async fn settle(&self, settlement: Settlement) -> Result<(), StoreError>;
    /// Signalled (at most once per commit) when records for `tag` were committed.
    fn wakeup(&self, tag: &str) -> Arc<Notify>;
    /// Pending records per tag (a scan: call every few seconds, not per hit).
    async fn backlog(&self, now_ms: i64) -> Result<Vec<TagBacklog>, StoreError>;
    /// Stops accepting writes, flushes everything queued, and releases the store.
    async fn close(&self);

    async fn ack(&self, ids: Vec<i64>, now_ms: i64) -> Result<(), StoreError> {
        self.settle(Settlement {
            ack: ids,
            now_ms,
            ..Settlement::default()
        })
        .await
    }
    async fn nack(&self, nacks: Vec<Nack>, now_ms: i64) -> Result<(), StoreError> {
        self.settle(Settlement {
            nack: nacks,
            now_ms,
            ..Settlement::default()
        })
        .await
    }
    async fn dead_letter(
        &self,
        dead: Vec<DeadLetterRequest>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.settle(Settlement {
            dead,
            now_ms,
            ..Settlement::default()
        })
        .await
    }
}

/// Wall clock in unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
