//! The durable outbox: every event for every fired tag is written here before the hit is
//! answered, then delivered by per-tag dispatchers with retries and dead letters.
//!
//! Two traits split the surface so that the storage engine (`store::embedded`, log + SQLite
//! on this machine, or `store::redis`, Streams shared by every replica) can change without
//! touching clients, tags or delivery:
//! - [`Outbox`] is the hit path's view: enqueue and readiness.
//! - [`DeliveryStore`] adds what dispatchers need: lease, settle (ack / nack / dead-letter),
//!   wake-ups, tag pauses, backlog for gauges, and close.
//!
//! Operator tools (stats, dead letters, replay) for either engine are in `store::tools`.

pub mod config;
pub mod delivery;
pub mod store;

use std::sync::Arc;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use crate::event::Event;

/// One event queued for every tag it fired: the store keeps its payload once and one small
/// delivery record per tag.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: String,
    /// The event as stored (MessagePack, see `Event::to_payload`): what survives a restart.
    pub payload: Bytes,
    /// The same event, parsed, handed straight to dispatchers that are keeping up so the hot
    /// path never re-reads or re-parses what it just wrote. `None`: dispatchers parse `payload`.
    pub event: Option<Arc<Event>>,
    /// Tags that fired for this event (one delivery record each).
    pub tags: Vec<Arc<str>>,
    pub enqueued_at_ms: i64,
}

impl NewEvent {
    /// Delivery records this event adds.
    pub fn records(&self) -> usize {
        self.tags.len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    #[error("outbox is full")]
    Full { retry_after_secs: u64 },
    /// A shared store cannot be reached (or did not confirm the write) for now; it reports the
    /// outage itself, once. The sender should retry after `retry_after_secs`.
    #[error("outbox unavailable: {reason}")]
    Unavailable {
        retry_after_secs: u64,
        reason: String,
    },
    #[error("outbox is closed")]
    Closed,
    #[error("outbox write failed: {0}")]
    Io(String),
    /// The store stopped taking hits after a failure it cannot recover from while running.
    #[error("outbox stopped: {0}")]
    Failed(String),
    /// These events cannot be stored as they are (the hit's fault, not the store's).
    #[error("{0}")]
    Invalid(String),
}

/// A store operation other than enqueue failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("outbox is closed")]
    Closed,
    #[error("outbox store error: {0}")]
    Io(String),
    /// A shared store cannot be reached for now. It logs the outage once and recovers on its
    /// own; callers wait and try again without logging each failure.
    #[error("outbox unavailable: {0}")]
    Unavailable(String),
}

/// Which record a lease, a settlement or a release names. Opaque to delivery: each engine
/// makes and reads its own (a row of the embedded store; a stream entry of a partition of
/// the shared one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId(RecordKey);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum RecordKey {
    Row(i64),
    Entry {
        tag: u32,
        partition: u16,
        ms: u64,
        seq: u64,
    },
}

impl RecordId {
    /// A row of the embedded store.
    pub const fn row(row: i64) -> RecordId {
        RecordId(RecordKey::Row(row))
    }

    /// The embedded store's row; `i64::MIN` (no row) for another engine's id.
    pub const fn as_row(self) -> i64 {
        match self.0 {
            RecordKey::Row(r) => r,
            RecordKey::Entry { .. } => i64::MIN,
        }
    }

    /// Stream entry `ms-seq` of a partition of a tag (numbered by the store) of the shared
    /// store.
    pub const fn entry(tag: u32, partition: u16, ms: u64, seq: u64) -> RecordId {
        RecordId(RecordKey::Entry {
            tag,
            partition,
            ms,
            seq,
        })
    }

    /// `(tag number, partition, ms, seq)` of a stream entry; `None` for another engine's id.
    pub const fn as_entry(self) -> Option<(u32, u16, u64, u64)> {
        match self.0 {
            RecordKey::Entry {
                tag,
                partition,
                ms,
                seq,
            } => Some((tag, partition, ms, seq)),
            RecordKey::Row(_) => None,
        }
    }
}

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            RecordKey::Row(r) => write!(f, "{r}"),
            RecordKey::Entry {
                tag,
                partition,
                ms,
                seq,
            } => write!(f, "{tag}/{partition}/{ms}-{seq}"),
        }
    }
}

/// The hit path's view of the outbox. `enqueue` resolves once the records are committed.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    async fn enqueue(&self, events: Vec<NewEvent>) -> Result<(), EnqueueError>;
    /// Open and accepting writes (for `/readyz`).
    fn is_open(&self) -> bool;
}

/// A record handed to a dispatcher. It stays in the store, invisible to other leases, until
/// it is settled or `lease_until_ms` passes (then it is due again: at-least-once).
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedRecord {
    pub id: RecordId,
    pub tag: Arc<str>,
    pub event_id: String,
    pub payload: Bytes,
    /// Set when the record came straight from the writer (see [`HotQueue`]).
    pub event: Option<Arc<Event>>,
    /// Failed attempts so far.
    pub attempts: u32,
    pub first_enqueued_ms: i64,
    pub last_error: Option<String>,
    /// When the lease ends (then the store may hand the record out again).
    pub lease_until_ms: i64,
}

impl LeasedRecord {
    /// A first delivery of an event, read from its row or handed over by the writer: no
    /// attempts yet, no error, first seen when the event was enqueued.
    pub(crate) fn first_delivery(
        id: RecordId,
        tag: Arc<str>,
        event_id: String,
        payload: Bytes,
        event: Option<Arc<Event>>,
        enqueued_ms: i64,
        lease_until_ms: i64,
    ) -> LeasedRecord {
        LeasedRecord {
            id,
            tag,
            event_id,
            payload,
            event,
            attempts: 0,
            first_enqueued_ms: enqueued_ms,
            last_error: None,
            lease_until_ms,
        }
    }
}

/// Try again later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    pub id: RecordId,
    pub next_attempt_ms: i64,
    pub error: String,
}

/// Give up on a record: it moves to the dead-letter store with `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRequest {
    pub id: RecordId,
    pub reason: String,
    /// Whether the failure that killed it was a delivery attempt (counted in `attempts`).
    pub attempted: bool,
}

/// The fate of a leased batch, applied in one store transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    pub ack: Vec<RecordId>,
    pub nack: Vec<Nack>,
    pub dead: Vec<DeadLetterRequest>,
    pub now_ms: i64,
}

impl Settlement {
    pub fn is_empty(&self) -> bool {
        self.ack.is_empty() && self.nack.is_empty() && self.dead.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ack.len() + self.nack.len() + self.dead.len()
    }

    /// Splits into settlements of at most `max` records each (order kept): the store can
    /// then fit them between hits' commits.
    pub fn chunks(self, max: usize) -> Vec<Settlement> {
        let max = max.max(1);
        if self.len() <= max {
            return vec![self];
        }
        let mut out: Vec<Settlement> = Vec::new();
        let mut cur = Settlement {
            now_ms: self.now_ms,
            ..Settlement::default()
        };
        let push = |cur: &mut Settlement, out: &mut Vec<Settlement>| {
            if cur.len() >= max {
                let now_ms = cur.now_ms;
                out.push(std::mem::replace(
                    cur,
                    Settlement {
                        now_ms,
                        ..Settlement::default()
                    },
                ));
            }
        };
        for id in self.ack {
            cur.ack.push(id);
            push(&mut cur, &mut out);
        }
        for n in self.nack {
            cur.nack.push(n);
            push(&mut cur, &mut out);
        }
        for d in self.dead {
            cur.dead.push(d);
            push(&mut cur, &mut out);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
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

/// What dispatchers need from a store: implemented by each engine in `store`.
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
    /// Asks the store to hand newly committed records of `tag` straight to the returned
    /// queue, already leased, instead of leaving them to be found by [`lease`](Self::lease).
    /// `None` when the store cannot (then everything goes through `lease`).
    fn subscribe_hot(&self, _tag: &str, _capacity: usize, _lease_ms: u64) -> Option<Arc<HotQueue>> {
        None
    }
    /// The dispatcher of `tag` stopped: stop handing records to its queue (then give back
    /// what is still in it with [`release`](Self::release)).
    fn unsubscribe_hot(&self, _tag: &str) {}
    /// Gives back leases that will not be used, so the records are due again at once rather
    /// than when the lease ends. Only leases still as handed out are released.
    async fn release(&self, _records: Vec<LeasedRecord>) -> Result<(), StoreError> {
        Ok(())
    }
    /// Pending records per tag (a scan: call every few seconds, not per hit).
    async fn backlog(&self, now_ms: i64) -> Result<Vec<TagBacklog>, StoreError>;
    /// Stops accepting writes, flushes everything queued, and releases the store.
    async fn close(&self);

    /// A vendor asked (`Retry-After`) that nothing be sent to `tag` for `wait`. A store that
    /// several processes share passes it on, so that none of them sends to the tag until
    /// then; the dispatcher that got the answer holds off by itself in any case.
    async fn pause_tag(&self, _tag: &str, _wait: std::time::Duration) -> Result<(), StoreError> {
        Ok(())
    }
    /// Until when (ms since the epoch, this process's clock) another process sharing the
    /// store paused `tag`; 0 when it is not paused. Cheap: dispatchers ask before each lease.
    fn paused_until(&self, _tag: &str) -> i64 {
        0
    }
    /// Shares the traces of the debug view with the other processes of a shared store, so
    /// the debug page of any of them shows hits and deliveries of all. Nothing to do alone.
    fn share_traces(&self, _traces: &Arc<crate::trace::Traces>) {}
    /// A store shared by several processes keeps the stitching stores too, so that a session
    /// one process recorded stitches an order another takes. `None`: each process keeps its
    /// own (the embedded stitching database).
    fn shared_stitching(
        &self,
        _limits: crate::stitching::Limits,
    ) -> Option<crate::stitching::Stores> {
        None
    }

    async fn ack(&self, ids: Vec<RecordId>, now_ms: i64) -> Result<(), StoreError> {
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

/// Records the writer leased for a dispatcher at the moment it committed them: the in-memory
/// fast path. The store row is written already leased (for `lease_ms`), so nothing else
/// leases it while it waits here; if the process dies, the lease is cleared at the next open
/// and the record is sent again, exactly as for a record leased from the store.
#[derive(Debug)]
pub struct HotQueue {
    queue: Mutex<VecDeque<LeasedRecord>>,
    capacity: usize,
    lease_ms: u64,
    /// Records were written due (not handed over) because the queue was full: the
    /// dispatcher must look in the store.
    overflowed: AtomicBool,
}

impl HotQueue {
    pub fn new(capacity: usize, lease_ms: u64) -> Self {
        HotQueue {
            queue: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity,
            lease_ms,
            overflowed: AtomicBool::new(false),
        }
    }

    /// How long a handed-over record stays leased in the store.
    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    /// Room for `n` more records on top of `reserved` already promised in this commit.
    pub fn has_room(&self, reserved: usize, n: usize) -> bool {
        match self.queue.lock() {
            Ok(q) => q.len().saturating_add(reserved).saturating_add(n) <= self.capacity,
            // A poisoned queue takes nothing: the records stay due in the store.
            Err(_) => false,
        }
    }

    pub fn len(&self) -> usize {
        self.queue.lock().map(|q| q.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Called by the store after the records are committed.
    pub fn push(&self, records: impl IntoIterator<Item = LeasedRecord>) {
        if let Ok(mut q) = self.queue.lock() {
            q.extend(records);
        }
    }

    /// Everything still queued (when the dispatcher stops).
    pub fn drain(&self) -> Vec<LeasedRecord> {
        self.queue
            .lock()
            .map(|mut q| q.drain(..).collect())
            .unwrap_or_default()
    }

    pub fn mark_overflowed(&self) {
        self.overflowed.store(true, Ordering::Release);
    }

    /// Whether records were left in the store since the last call.
    pub fn take_overflowed(&self) -> bool {
        self.overflowed.swap(false, Ordering::AcqRel)
    }

    /// Takes up to `limit` records, oldest first, as `(fresh, stale)`. Stale records have
    /// less than half their lease left: sending them now could overlap with the store
    /// handing them out again when it ends, so the caller gives them back
    /// ([`DeliveryStore::release`]) and they go through the store.
    pub fn take(&self, limit: usize, now_ms: i64) -> (Vec<LeasedRecord>, Vec<LeasedRecord>) {
        let Ok(mut q) = self.queue.lock() else {
            return (Vec::new(), Vec::new());
        };
        let half = i64::try_from(self.lease_ms / 2).unwrap_or(i64::MAX);
        let mut fresh = Vec::with_capacity(limit.min(q.len()));
        let mut stale = Vec::new();
        while fresh.len() < limit {
            let Some(rec) = q.pop_front() else {
                break;
            };
            if now_ms < rec.lease_until_ms.saturating_sub(half) {
                fresh.push(rec);
            } else {
                stale.push(rec);
            }
        }
        if !stale.is_empty() {
            self.overflowed.store(true, Ordering::Release);
        }
        (fresh, stale)
    }
}
