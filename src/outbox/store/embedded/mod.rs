//! The embedded store: the outbox log for hits' events (see `log`, `log_state`) and SQLite in
//! WAL mode for the rest (retries, dead letters, positions), one writer thread doing group
//! commit for both.
//!
//! # Durability (`[outbox] fsync`)
//!
//! A group of hits appends its events to the log's current file with one `write`; that
//! reaches the OS, not the disk. SQLite commits use `synchronous = NORMAL`: in WAL mode a
//! commit appends the transaction's pages to the `-wal` file, which likewise reaches the OS.
//! Durability comes from the syncer (see `syncer`), which fsyncs the log file on its own
//! thread (and the WAL, for the rare hit whose event also went to SQLite) and only then
//! answers the hits written before that fsync:
//!
//! - `batch` (default): `enqueue` resolves only after an fsync that began after its group was
//!   written. An answered hit survives a process crash *and* a power cut / kernel panic.
//!   While one fsync runs the writer writes the next group, and the next fsync covers every
//!   group written meanwhile: the cost is paid per fsync, never per event, and the writer
//!   does not wait for the disk's flush. After a failed fsync the store refuses hits and
//!   reports not ready until restarted (see `syncer`).
//! - `always`: the same on Linux. On macOS, where a plain fsync does not flush the drive's
//!   cache, checkpoints also use F_FULLFSYNC (`checkpoint_fullfsync`); the syncer's
//!   `sync_data` uses it in both modes (that is what Rust's `sync_data` does there).
//! - `off`: no syncer. Hits' events are written to the OS page cache only. An answered hit
//!   survives a crash or `kill -9` of tagrelay (the kernel still holds the pages), but a
//!   power cut or kernel panic can lose the last of them. The database itself never
//!   corrupts in any mode, and a torn record at the log's end is never read as an event.
//!
//! Checkpoints still sync the WAL before copying it and the database after (the
//! checkpointer's connection and `synchronous = NORMAL` both do), so a WAL is never rewound
//! over frames that are not yet in a synced database. Before a log file is deleted the WAL
//! is fsynced, so an event copied out of it into SQLite (a retry's) is durable first.
//!
//! Deliveries may start before the fsync that makes their hit durable has returned (the
//! dispatchers get written records at once). A power cut or a failed fsync can then leave a
//! vendor with an event whose hit was never acknowledged, which its sender may send again:
//! at least once, as everywhere else in delivery.
//!
//! Dispatcher writes (leases, acks, nacks, dead letters, positions) go through the same
//! writer thread and share the same group commits. They wait for no fsync: losing them to a
//! power cut only means deliveries sent again, which delivery already allows (a crash
//! between a vendor's answer and the ack does the same).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use tokio::sync::{oneshot, Notify};

mod checkpoint;
mod fresh;
mod log;
mod log_state;
pub mod schema;
mod shared;
mod syncer;
pub mod tools;
mod writer;

#[cfg(test)]
mod stress_tests;
#[cfg(test)]
mod tests;

use crate::outbox::config::{FsyncMode, OutboxConfig};
use crate::outbox::{
    DeliveryStore, EnqueueError, HotQueue, LeasedRecord, NewEvent, Outbox, Settlement, StoreError,
    TagBacklog,
};
use checkpoint::Checkpointer;
use fresh::FreshSet;
use log::Log;
use log_state::LogState;
use schema::{
    backlog, positions, rows_with_delivery_rows, waiting, BUSY_TIMEOUT, DB_FILE, INSERT_COPY,
    LOG_DIR, MIGRATE_V1_ASIDE, MIGRATE_V1_COPY, SCHEMA, SCHEMA_VERSION, V3_COLUMNS,
};
use shared::Shared;
use syncer::Syncer;
use writer::Op;
pub use writer::WriteError;

/// Longest event id the outbox takes.
const MAX_EVENT_ID_BYTES: usize = u16::MAX as usize;

/// How often dead letters past their retention are deleted.
#[cfg(not(test))]
const PURGE_EVERY: Duration = Duration::from_secs(60);
#[cfg(test)]
const PURGE_EVERY: Duration = Duration::ZERO;

/// What hits are told to wait when the outbox is full.
const FULL_RETRY_AFTER_SECS: u64 = 5;
/// At most one "outbox full" error log per this many milliseconds.
const FULL_LOG_EVERY_MS: i64 = 10_000;

/// Why the store could not be opened. Each names the path and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("outbox.path: cannot create `{}`: {source}", path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("outbox.path: `{}` is in use by another tagrelay process; each server needs its own outbox directory", .0.display())]
    InUse(PathBuf),
    #[error("outbox `{}`: {source}", path.display())]
    Database {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("outbox `{}`: could not enable WAL journal mode (got `{mode}`); is the file on a network filesystem?", path.display())]
    NoWal { path: PathBuf, mode: String },
    #[error("outbox `{}`: schema version {found} was written by a newer tagrelay (this one knows {SCHEMA_VERSION})", path.display())]
    NewerSchema { path: PathBuf, found: i64 },
    #[error("outbox log `{}`: {source}", path.display())]
    Log { path: PathBuf, source: WriteError },
    #[error("outbox: cannot start its {what}: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("outbox: the task opening it failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The embedded outbox. Cheap to share behind an `Arc`; every write goes to one writer thread.
#[derive(Debug)]
pub struct EmbeddedStore {
    tx: mpsc::Sender<Op>,
    pub(crate) shared: Arc<Shared>,
    reader: Arc<Mutex<Connection>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    checkpointer: Mutex<Option<Checkpointer>>,
    path: PathBuf,
    max_records: u64,
    max_bytes: u64,
    /// Held for the store's lifetime: a second server on the same directory would clear this
    /// one's leases at open and double-send (the CLI tools do not take it).
    lock: std::fs::File,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in directory `cfg.path`, clears leases left by a
    /// previous process (those records are resent: at-least-once) and starts the writer.
    pub async fn open(cfg: &OutboxConfig) -> Result<Arc<EmbeddedStore>, OpenError> {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || Self::open_blocking(&cfg)).await?
    }

    /// Blocking variant of [`EmbeddedStore::open`] (for CLIs and tests without a runtime).
    pub fn open_blocking(cfg: &OutboxConfig) -> Result<Arc<EmbeddedStore>, OpenError> {
        let dir = Path::new(&cfg.path);
        let create = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OpenError::Create { path, source }
        };
        std::fs::create_dir_all(dir).map_err(create(dir))?;
        let lock_path = dir.join("LOCK");
        let lock = std::fs::File::create(&lock_path).map_err(create(&lock_path))?;
        lock.try_lock()
            .map_err(|_| OpenError::InUse(dir.to_path_buf()))?;
        let path = dir.join(DB_FILE);
        let ctx = |source: rusqlite::Error| OpenError::Database {
            path: path.clone(),
            source,
        };

        let conn = Connection::open(&path).map_err(ctx)?;
        let mode = configure_writer(&conn, cfg.fsync).map_err(ctx)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OpenError::NoWal { path, mode });
        }
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(ctx)?;
        if version > SCHEMA_VERSION {
            return Err(OpenError::NewerSchema {
                path,
                found: version,
            });
        }
        migrate(&conn, version).map_err(ctx)?;
        // Records in flight when the previous process stopped are due at once, in their
        // original order (first_enqueued_ms is always in the past).
        let cleared = conn
            .execute(
                "UPDATE pending SET lease_until_ms = 0, next_attempt_ms = first_enqueued_ms WHERE lease_until_ms > 0",
                [],
            )
            .map_err(ctx)?;
        // First deliveries the previous process left in the log (owed by a tag that lagged,
        // or out when it stopped) are copied into `events`, and the log starts afresh: from
        // here on everything below `first_row` is read from SQLite as it always was.
        let log_dir = dir.join(LOG_DIR);
        let log_err = |e: WriteError| OpenError::Log {
            path: log_dir.clone(),
            source: e,
        };
        let mut log = Log::open(&log_dir, cfg.log_segment_bytes).map_err(|e| log_err(e.into()))?;
        let mut log_last_row = 0;
        if !log.is_empty() {
            let (copied, last) = import_log(&conn, &log).map_err(log_err)?;
            log_last_row = last;
            let damaged = log.remove_all().map_err(|e| log_err(e.into()))?;
            for path in damaged {
                tracing::error!(file = %path.display(), "outbox: a log file is damaged before its end; the events after the damage could not be read and were not delivered (the file is kept for an operator)");
            }
            if copied > 0 {
                tracing::info!(
                    events = copied,
                    "outbox: copied events still owed from the outbox log into the store"
                );
            }
        }
        let fresh = resume_fresh(&conn, log_last_row).map_err(ctx)?;
        let first_row = fresh.next_row();
        if cleared > 0 {
            tracing::info!(
                records = cleared,
                "outbox: resuming records that were in flight when the previous process stopped"
            );
        }
        let (records, bytes) = load_totals(&conn).map_err(ctx)?;

        let reader = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(ctx)?;
        reader.busy_timeout(BUSY_TIMEOUT).map_err(ctx)?;

        let shared = Arc::new(Shared {
            open: AtomicBool::new(true),
            committed_records: AtomicU64::new(records),
            committed_bytes: AtomicU64::new(bytes),
            ..Shared::default()
        });
        let (tx, rx) = mpsc::channel();
        let settings = writer::Settings {
            commit_interval: Duration::from_millis(cfg.commit_interval_ms),
            commit_max_records: cfg.commit_max_records.max(1),
            dead_letter_max_age: (cfg.dead_letter_max_age_secs > 0)
                .then(|| Duration::from_secs(cfg.dead_letter_max_age_secs)),
            dead_letter_max_records: (cfg.dead_letter_max_records > 0)
                .then_some(cfg.dead_letter_max_records),
            purge_every: PURGE_EVERY,
        };
        let thread_shared = shared.clone();
        let checkpointer =
            Checkpointer::start(&path, cfg.fsync, shared.clone()).map_err(|e| match e {
                checkpoint::StartError::Database(source) => OpenError::Database {
                    path: path.clone(),
                    source,
                },
                checkpoint::StartError::Thread(source) => OpenError::Thread {
                    what: "checkpoint thread",
                    source,
                },
            })?;
        // From here on the writer's commits only reach the OS; the syncer makes hits' commits
        // durable before they are answered, without holding the writer up.
        let wal_path = {
            let mut wal = path.clone().into_os_string();
            wal.push("-wal");
            std::path::PathBuf::from(wal)
        };
        let syncer = match cfg.fsync {
            FsyncMode::Off => None,
            FsyncMode::Batch | FsyncMode::Always => {
                conn.pragma_update(None, "synchronous", "NORMAL")
                    .map_err(ctx)?;
                Some(Syncer::start(&wal_path, shared.clone()).map_err(|source| {
                    OpenError::Thread {
                        what: "fsync thread",
                        source,
                    }
                })?)
            }
        };
        let handle = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || {
                let start = writer::Start {
                    fresh,
                    log: LogState::new(log, first_row, wal_path),
                    totals: (
                        i64::try_from(records).unwrap_or(i64::MAX),
                        i64::try_from(bytes).unwrap_or(i64::MAX),
                    ),
                    syncer,
                };
                writer::run(conn, rx, thread_shared, settings, start)
            })
            .map_err(|source| OpenError::Thread {
                what: "writer thread",
                source,
            })?;

        Ok(Arc::new(EmbeddedStore {
            tx,
            shared,
            reader: Arc::new(Mutex::new(reader)),
            writer_thread: Mutex::new(Some(handle)),
            checkpointer: Mutex::new(Some(checkpointer)),
            path,
            max_records: cfg.max_records,
            max_bytes: cfg.max_bytes,
            lock,
        }))
    }

    /// The database file.
    pub fn db_path(&self) -> &Path {
        &self.path
    }

    /// Transactions committed by the writer since open (group commit makes this far smaller
    /// than the number of records).
    pub fn commit_count(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Of those, the commits whose hits waited for an fsync.
    pub fn synced_commit_count(&self) -> u64 {
        self.shared.synced_commits.load(Ordering::Relaxed)
    }

    /// fsyncs made for hits since open.
    pub fn fsync_count(&self) -> u64 {
        self.shared.fsyncs.load(Ordering::Acquire)
    }

    /// Pending records and payload bytes as the back-pressure check sees them.
    pub fn pending_totals(&self) -> (u64, u64) {
        let s = &self.shared;
        (
            s.committed_records.load(Ordering::Acquire)
                + s.reserved_records.load(Ordering::Acquire),
            s.committed_bytes.load(Ordering::Acquire) + s.reserved_bytes.load(Ordering::Acquire),
        )
    }

    fn reject_full(&self, records: u64, bytes: u64) -> EnqueueError {
        metrics::counter!("tagrelay_outbox_rejected_full_total").increment(1);
        let now = crate::clock::now_ms();
        let last = self.shared.last_full_log_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= FULL_LOG_EVERY_MS
            && self
                .shared
                .last_full_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::error!(
                pending_records = records,
                pending_bytes = bytes,
                max_records = self.max_records,
                max_bytes = self.max_bytes,
                "outbox is full: new hits are refused with 503 until dispatchers drain it (check vendor reachability and tagrelay_outbox_pending)"
            );
        }
        EnqueueError::Full {
            retry_after_secs: FULL_RETRY_AFTER_SECS,
        }
    }

    /// Stops accepting writes, commits everything queued, checkpoints the WAL and stops the
    /// writer thread. Call after the dispatchers have shut down.
    pub async fn close(&self) {
        self.shared.open.store(false, Ordering::Release);
        let checkpointer = self.checkpointer.lock().ok().and_then(|mut c| c.take());
        if let Some(mut c) = checkpointer {
            let _ = tokio::task::spawn_blocking(move || c.stop()).await;
        }
        let (done, wait) = oneshot::channel();
        if self.send(Op::Close { done }) {
            // An error means the writer already stopped; either way it is flushed.
            let _ = wait.await;
        }
        let handle = self.writer_thread.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        // Nothing writes any more: the directory is free for the next server.
        let _ = self.lock.unlock();
    }

    /// Every delivery, sorted, as `(tag, event id, attempts, next attempt, lease end)`.
    #[cfg(test)]
    pub(crate) async fn snapshot(&self) -> Vec<writer::DeliveryState> {
        let (done, wait) = oneshot::channel();
        if !self.send(Op::Snapshot { done }) {
            return Vec::new();
        }
        wait.await.unwrap_or_default()
    }

    /// Commits with hits fail from now on, as if writing the log failed (`false`: no more).
    #[cfg(test)]
    pub(crate) fn fail_log_writes(&self, on: bool) {
        self.shared.fail_log.store(on, Ordering::Release);
    }

    /// The next fsync of hits' commits fails, as if the disk reported an I/O error.
    #[cfg(test)]
    pub(crate) fn fail_next_fsync(&self) {
        self.shared.fail_fsync.store(true, Ordering::Release);
    }

    /// Events the store holds for deliveries still owed or out: rows in `events`, and log
    /// frames some tag still needs that have no copy there.
    #[cfg(test)]
    pub(crate) async fn held_events(&self) -> i64 {
        let (done, wait) = oneshot::channel();
        if !self.send(Op::Held { done }) {
            return -1;
        }
        wait.await.unwrap_or(-1)
    }

    /// Tests simulate a crash by leaking the store; a real crash also releases the lock.
    #[cfg(test)]
    pub(crate) fn leak_as_if_crashed(self: Arc<Self>) {
        if let Some(mut c) = self.checkpointer.lock().ok().and_then(|mut c| c.take()) {
            c.stop();
        }
        let _ = self.lock.unlock();
        std::mem::forget(self);
    }

    fn send(&self, op: Op) -> bool {
        self.tx.send(op).is_ok()
    }
}

#[async_trait]
impl Outbox for EmbeddedStore {
    async fn enqueue(&self, events: Vec<NewEvent>) -> Result<(), EnqueueError> {
        let n: u64 = events.iter().map(|e| e.records() as u64).sum();
        if n == 0 {
            return Ok(());
        }
        // The log frames an event id with a 16-bit length; refused here, one hit, rather than
        // failing the group commit of every hit with it.
        if let Some(e) = events
            .iter()
            .find(|e| e.event_id.len() > MAX_EVENT_ID_BYTES)
        {
            return Err(EnqueueError::Invalid(format!(
                "event id of {} bytes is longer than the outbox takes ({MAX_EVENT_ID_BYTES} bytes)",
                e.event_id.len()
            )));
        }
        if !self.is_open() {
            if let Some(msg) = self.shared.failed.get() {
                return Err(EnqueueError::Failed(msg.clone()));
            }
            return Err(EnqueueError::Closed);
        }
        let bytes: u64 = events
            .iter()
            .filter(|e| !e.tags.is_empty())
            .map(|e| e.payload.len() as u64)
            .sum();
        // A soft cap: concurrent enqueues may overshoot by what they carry, never by more.
        let (cur_records, cur_bytes) = self.pending_totals();
        if cur_records.saturating_add(n) > self.max_records
            || cur_bytes.saturating_add(bytes) > self.max_bytes
        {
            return Err(self.reject_full(cur_records, cur_bytes));
        }
        self.shared.reserved_records.fetch_add(n, Ordering::AcqRel);
        self.shared
            .reserved_bytes
            .fetch_add(bytes, Ordering::AcqRel);
        let (done, wait) = oneshot::channel();
        if !self.send(Op::Enqueue {
            events,
            records: n,
            bytes,
            done,
        }) {
            self.shared.reserved_records.fetch_sub(n, Ordering::AcqRel);
            self.shared
                .reserved_bytes
                .fetch_sub(bytes, Ordering::AcqRel);
            return Err(EnqueueError::Closed);
        }
        let started = std::time::Instant::now();
        let result = wait.await.unwrap_or(Err(EnqueueError::Closed));
        crate::telemetry::hot::commit_wait().record(started.elapsed().as_secs_f64());
        result
    }

    fn is_open(&self) -> bool {
        self.shared.open.load(Ordering::Acquire)
    }
}

#[async_trait]
impl DeliveryStore for EmbeddedStore {
    async fn lease(
        &self,
        tag: &str,
        now_ms: i64,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<LeasedRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (done, wait) = oneshot::channel();
        let op = Op::Lease {
            tag: Arc::from(tag),
            now_ms,
            limit,
            lease_until_ms: now_ms.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX)),
            done,
        };
        if !self.send(op) {
            return Err(StoreError::Closed);
        }
        wait.await.unwrap_or(Err(StoreError::Closed))
    }

    async fn settle(&self, settlement: Settlement) -> Result<(), StoreError> {
        if settlement.is_empty() {
            return Ok(());
        }
        let (done, wait) = oneshot::channel();
        if !self.send(Op::Settle { settlement, done }) {
            return Err(StoreError::Closed);
        }
        wait.await.unwrap_or(Err(StoreError::Closed))
    }

    fn wakeup(&self, tag: &str) -> Arc<Notify> {
        self.shared.wakeup(tag)
    }

    fn subscribe_hot(&self, tag: &str, capacity: usize, lease_ms: u64) -> Option<Arc<HotQueue>> {
        let queue = Arc::new(HotQueue::new(capacity, lease_ms));
        self.shared
            .hot
            .write()
            .ok()?
            .insert(Arc::from(tag), queue.clone());
        Some(queue)
    }

    fn unsubscribe_hot(&self, tag: &str) {
        if let Ok(mut map) = self.shared.hot.write() {
            map.remove(tag);
        }
    }

    async fn release(&self, records: Vec<LeasedRecord>) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let leases = records.iter().map(|r| (r.id, r.lease_until_ms)).collect();
        let (done, wait) = oneshot::channel();
        if !self.send(Op::Release { leases, done }) {
            return Err(StoreError::Closed);
        }
        wait.await.unwrap_or(Err(StoreError::Closed))
    }

    async fn backlog(&self, now_ms: i64) -> Result<Vec<TagBacklog>, StoreError> {
        let reader = self.reader.clone();
        let live = self
            .shared
            .fresh_gauges
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        tokio::task::spawn_blocking(move || {
            let conn = reader
                .lock()
                .map_err(|_| StoreError::Io("reader connection poisoned".into()))?;
            backlog(&conn, now_ms, Some(&live)).map_err(|e| StoreError::Io(e.to_string()))
        })
        .await
        .map_err(|e| StoreError::Io(format!("backlog task failed: {e}")))?
    }

    async fn close(&self) {
        EmbeddedStore::close(self).await
    }
}

/// Sets the writer connection up; returns the journal mode SQLite settled on (`wal`, unless
/// the filesystem cannot do it).
fn configure_writer(conn: &Connection, fsync: FsyncMode) -> rusqlite::Result<String> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    let (sync, full) = match fsync {
        FsyncMode::Batch => ("FULL", false),
        FsyncMode::Always => ("FULL", true),
        FsyncMode::Off => ("NORMAL", false),
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.pragma_update(None, "fullfsync", full)?;
    conn.pragma_update(None, "checkpoint_fullfsync", full)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // 4 MiB: the working set is the recent end of each table; more only raises peak RSS.
    conn.pragma_update(None, "cache_size", -4_000)?;
    // Checkpoints run on their own thread (see `checkpoint`), never inside a hit's commit.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // `rarray`: the writer binds whole lists of ids.
    rusqlite::vtab::array::load_module(conn)?;
    Ok(mode)
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction.
fn migrate(conn: &Connection, version: i64) -> rusqlite::Result<()> {
    let v1_tables: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'pending'
         AND sql LIKE '%payload%'",
        [],
        |r| r.get(0),
    )?;
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let from_v1 = version <= 1 && v1_tables > 0;
        if from_v1 {
            conn.execute_batch(MIGRATE_V1_ASIDE)?;
        }
        conn.execute_batch(SCHEMA)?;
        for (table, column, decl) in V3_COLUMNS {
            add_column_if_missing(conn, table, column, decl)?;
        }
        if from_v1 {
            conn.execute_batch(MIGRATE_V1_COPY)?;
            tracing::info!("outbox: migrated the store to schema version {SCHEMA_VERSION}");
        }
        migrate_interim_v3(conn)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// A development build between versions 2 and 3 (main at c5bff29, never released) kept the
/// tags of deliveries out in memory in `events.fresh` above `outbox_totals.fresh_floor`, with
/// no positions. Those deliveries become delivery rows, due at once, as that build did at
/// start; every other `fresh` list it left is stale and is cleared.
fn migrate_interim_v3(conn: &Connection) -> rusqlite::Result<()> {
    let interim: i64 = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('outbox_totals') WHERE name = 'fresh_floor'",
        [],
        |r| r.get(0),
    )?;
    if interim == 0 {
        return Ok(());
    }
    let n = conn.execute(
        "INSERT INTO pending (tag, event_row, attempts, next_attempt_ms, first_enqueued_ms, lease_until_ms)
         SELECT j.value, e.id, 0, e.enqueued_ms, e.enqueued_ms, 0
         FROM events e, json_each(e.fresh) j
         WHERE e.id >= (SELECT fresh_floor FROM outbox_totals WHERE id = 0)
           AND e.fresh IS NOT NULL AND json_valid(e.fresh)
         ORDER BY e.id, j.key",
        [],
    )?;
    conn.execute_batch(
        "UPDATE events SET fresh = NULL WHERE fresh IS NOT NULL;
         UPDATE outbox_totals SET records = (SELECT count(*) FROM pending) WHERE id = 0;
         ALTER TABLE outbox_totals DROP COLUMN fresh_floor;",
    )?;
    tracing::info!(
        records = n,
        "outbox: moved deliveries in flight in an interim-format store to delivery rows"
    );
    Ok(())
}

fn add_column_if_missing(
    conn: &Connection,
    table: &str,
    column: &str,
    decl: &str,
) -> rusqlite::Result<()> {
    let present: i64 = conn.query_row(
        "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
        [table, column],
        |r| r.get(0),
    )?;
    if present == 0 {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}

/// Copies the log's frames some tag still owes a first delivery to (at or past its written
/// position, or a tag without one) into `events`, made durable before the caller deletes the
/// log (the connection still syncs fully here, and each step ends with a checkpoint). Returns how many were
/// copied and the highest row the log held.
fn import_log(conn: &Connection, log: &Log) -> Result<(usize, i64), WriteError> {
    let positions = positions(conn)?;
    let mut insert = conn.prepare(INSERT_COPY)?;
    let (mut copied, mut last) = (0usize, 0i64);
    // A tag without a position: its first one did not reach the disk (the WAL is not fsynced
    // with hits). It resumes from the first row that lists it.
    let mut unplaced: HashMap<String, i64> = HashMap::new();
    let mut frames = log.frames(None).peekable();
    // In transactions of ~20k events, each copied back into the database file: one
    // transaction for a backlog of a million would grow the WAL by gigabytes. A start cut
    // short copies again (rows already copied are kept as they are).
    while frames.peek().is_some() {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let step = (|| -> Result<(), WriteError> {
            for f in frames.by_ref().take(IMPORT_EVENTS_PER_TRANSACTION) {
                let f = f?;
                last = last.max(f.row);
                // Unreadable: kept, for an operator (never written so by us).
                let owed = f.tag_list().is_none_or(|tags| {
                    let mut owed = false;
                    for t in &tags {
                        match positions.get(&**t) {
                            Some(&p) => owed |= p <= f.row,
                            None => {
                                unplaced.entry(t.to_string()).or_insert(f.row);
                                owed = true;
                            }
                        }
                    }
                    owed
                });
                if owed {
                    copied += insert.execute(rusqlite::params![
                        f.row,
                        f.event_id,
                        &f.payload[..],
                        std::str::from_utf8(&f.tags).ok(),
                        f.enqueued_ms
                    ])?;
                }
            }
            if frames.peek().is_none() {
                for (tag, row) in &unplaced {
                    conn.execute(
                        "INSERT OR IGNORE INTO cursors (tag, committed_row) VALUES (?1, ?2)",
                        rusqlite::params![tag, row],
                    )?;
                }
            }
            Ok(())
        })();
        if let Err(e) = step {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        conn.execute_batch("COMMIT")?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    Ok((copied, last))
}

/// Events per transaction when the log is copied in at open.
const IMPORT_EVENTS_PER_TRANSACTION: usize = 20_000;

/// Where each tag stands, from the positions the previous process committed. The record and
/// byte counts are recomputed: deliveries it settled beyond a position are due again, and
/// the counts written last may be older than the last hits. New rows go after
/// `at_least_row` (the highest the log held).
fn resume_fresh(conn: &Connection, at_least_row: i64) -> rusqlite::Result<FreshSet> {
    // Positions may point past the newest rows (deleted once settled): new rows go after.
    let last_row: i64 = conn.query_row(
        "SELECT max((SELECT coalesce(max(id), 0) FROM events),
                    (SELECT coalesce(max(committed_row), 1) - 1 FROM cursors), ?1)",
        [at_least_row],
        |r| r.get(0),
    )?;
    let mut fresh = FreshSet::new(last_row);
    let mut waiting_total = 0u64;
    let positions = positions(conn)?;
    let waiting: HashMap<String, (u64, Option<i64>)> = waiting(conn, i64::MAX)?
        .into_iter()
        .map(|(tag, n, oldest)| (tag, (n, oldest)))
        .collect();
    for (tag, pos) in positions {
        let (n, oldest) = waiting.get(&tag).copied().unwrap_or((0, None));
        waiting_total += n;
        fresh.resume(Arc::from(tag.as_str()), pos, n, oldest);
    }
    fresh.set_skips(rows_with_delivery_rows(conn)?);
    if waiting_total > 0 {
        tracing::info!(
            records = waiting_total,
            "outbox: resuming first deliveries the previous process had not settled"
        );
    }
    conn.execute(
        "UPDATE outbox_totals SET records = (SELECT count(*) FROM pending) + ?1,
             bytes = (SELECT coalesce(sum(length(payload)), 0) FROM events) WHERE id = 0",
        [i64::try_from(waiting_total).unwrap_or(i64::MAX)],
    )?;
    Ok(fresh)
}

/// Reads the pending totals row, computing it (one scan) if this database has none yet.
fn load_totals(conn: &Connection) -> rusqlite::Result<(u64, u64)> {
    let row: Option<(i64, i64)> = conn
        .query_row(
            "SELECT records, bytes FROM outbox_totals WHERE id = 0",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (records, bytes) = match row {
        Some(v) => v,
        None => {
            let v: (i64, i64) = conn.query_row(
                "SELECT (SELECT count(*) FROM pending),
                        (SELECT coalesce(sum(length(payload)), 0) FROM events)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            conn.execute(
                "INSERT INTO outbox_totals (id, records, bytes) VALUES (0, ?1, ?2)",
                [v.0, v.1],
            )?;
            v
        }
    };
    Ok((
        u64::try_from(records).unwrap_or(0),
        u64::try_from(bytes).unwrap_or(0),
    ))
}
