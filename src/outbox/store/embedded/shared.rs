//! State shared by the embedded store's handle and its threads (writer, syncer, checkpointer):
//! counters, the stop flag after a failed fsync, wake-ups and the dispatchers' in-memory queues.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use super::fresh::Gauge;
use crate::outbox::HotQueue;

/// State shared by the async handle and the writer thread.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub open: AtomicBool,
    /// Pending records/bytes as of the last commit (authoritative, from `outbox_totals`).
    pub committed_records: AtomicU64,
    pub committed_bytes: AtomicU64,
    /// Admitted by `enqueue` but not yet committed.
    pub reserved_records: AtomicU64,
    pub reserved_bytes: AtomicU64,
    pub commits: AtomicU64,
    /// Commits whose hits waited for an fsync (the others had no hit's events in
    /// them).
    pub synced_commits: AtomicU64,
    /// fsyncs for hits (one covers every commit handed over while the previous ran).
    pub fsyncs: AtomicU64,
    /// Whether the syncer is inside an fsync now (the writer gathers hits only meanwhile).
    pub syncing: AtomicBool,
    /// Why the store stopped taking hits while the process runs on (a failed fsync); set
    /// through [`Shared::stop_taking_hits`].
    pub failed: std::sync::OnceLock<String>,
    pub last_full_log_ms: AtomicI64,
    pub wakeups: RwLock<HashMap<Arc<str>, Arc<Notify>>>,
    /// Dispatchers that take freshly committed records straight from the writer.
    pub hot: RwLock<HashMap<Arc<str>, Arc<HotQueue>>>,
    /// Frames in the WAL at the checkpointer's last step (see `checkpoint`).
    pub wal_frames: AtomicI64,
    /// Per tag: first deliveries waiting in the store and out in memory, as of the last
    /// commit (see `fresh`).
    pub fresh_gauges: Mutex<Vec<Gauge>>,
    /// Tests: commits with frames to write fail as if the log's disk did.
    #[cfg(test)]
    pub fail_log: AtomicBool,
    /// Tests: the syncer's next fsync fails as if the disk reported EIO.
    #[cfg(test)]
    pub fail_fsync: AtomicBool,
}

impl Shared {
    /// After a failure that makes acknowledging hits unsafe: the store refuses hits with
    /// `reason` and reports not ready until tagrelay is restarted.
    pub fn stop_taking_hits(&self, reason: String) {
        let _ = self.failed.set(reason);
        // After `failed`: whoever sees the store closed finds the reason.
        self.open.store(false, Ordering::Release);
    }

    pub fn wakeup(&self, tag: &str) -> Arc<Notify> {
        if let Ok(map) = self.wakeups.read() {
            if let Some(n) = map.get(tag) {
                return n.clone();
            }
        }
        match self.wakeups.write() {
            Ok(mut map) => map.entry(Arc::from(tag)).or_default().clone(),
            // A poisoned map only loses wake-ups; dispatchers still poll.
            Err(_) => Arc::new(Notify::new()),
        }
    }

    pub fn set_fresh_gauges(&self, gauges: Vec<Gauge>) {
        if let Ok(mut g) = self.fresh_gauges.lock() {
            *g = gauges;
        }
    }

    pub fn hot_queue(&self, tag: &str) -> Option<Arc<HotQueue>> {
        self.hot.read().ok().and_then(|m| m.get(tag).cloned())
    }

    /// Wakes the dispatcher of `tag` if one ever asked for wake-ups.
    pub fn notify(&self, tag: &str) {
        if let Ok(map) = self.wakeups.read() {
            if let Some(n) = map.get(tag) {
                n.notify_one();
            }
        }
    }
}
