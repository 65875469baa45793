//! The embedded store: SQLite in WAL mode, one writer thread doing group commit.
//!
//! # Durability (`[outbox] fsync`)
//!
//! In WAL mode a commit appends the transaction's pages to the `-wal` file. What the
//! `synchronous` pragma changes is whether that append is fsynced before the commit returns:
//!
//! - `batch` (default) → `synchronous = FULL`. Every group commit fsyncs the WAL once, and
//!   `enqueue` resolves only after that fsync. An answered hit survives a process crash *and*
//!   a power cut / kernel panic. The fsync cost is shared by every record in the group
//!   (up to `commit_max_records`), so it is paid per commit, never per event.
//! - `always` → `synchronous = FULL` plus `fullfsync` (F_FULLFSYNC on macOS, where a plain
//!   fsync does not flush the drive's cache; on Linux it is identical to `batch`). Still one
//!   sync per group commit: a per-event fsync buys no extra safety because no enqueue is
//!   answered before its group's sync anyway.
//! - `off` → `synchronous = NORMAL`. Commits are written to the OS page cache but the WAL is
//!   only fsynced at checkpoints. An answered hit survives a crash or `kill -9` of tagrelay
//!   (the kernel still holds the pages), but a power cut or kernel panic can lose the last
//!   commits since the previous checkpoint. The database itself never corrupts in any mode.
//!
//! Dispatcher writes (leases, acks, nacks, dead letters) go through the same writer thread
//! and share the same group commits, so delivery adds few commits of its own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use tokio::sync::{oneshot, Notify};

use super::writer::{self, Op};
use super::{
    DeliveryStore, EnqueueError, LeasedRecord, NewRecord, Outbox, Settlement, StoreError,
    TagBacklog,
};
use crate::config::{FsyncMode, OutboxConfig};

/// The database file inside `[outbox] path`.
pub const DB_FILE: &str = "outbox.sqlite3";

/// What hits are told to wait when the outbox is full.
const FULL_RETRY_AFTER_SECS: u64 = 5;
/// At most one "outbox full" error log per this many milliseconds.
const FULL_LOG_EVERY_MS: i64 = 10_000;
const SCHEMA_VERSION: i64 = 1;
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tag TEXT NOT NULL,
    event_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    first_enqueued_ms INTEGER NOT NULL,
    last_error TEXT,
    lease_until_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS pending_due ON pending (tag, next_attempt_ms);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tag TEXT NOT NULL,
    event_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_ms INTEGER NOT NULL,
    first_enqueued_ms INTEGER NOT NULL,
    last_error TEXT,
    lease_until_ms INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL,
    dead_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_by_tag ON dead_letters (tag, id);
CREATE TABLE IF NOT EXISTS outbox_totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    records INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
";

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
    pub last_full_log_ms: AtomicI64,
    pub wakeups: RwLock<HashMap<Arc<str>, Arc<Notify>>>,
}

impl Shared {
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

    /// Wakes the dispatcher of `tag` if one ever asked for wake-ups.
    pub fn notify(&self, tag: &str) {
        if let Ok(map) = self.wakeups.read() {
            if let Some(n) = map.get(tag) {
                n.notify_one();
            }
        }
    }
}

/// The embedded outbox. Cheap to share behind an `Arc`; every write goes to one writer thread.
#[derive(Debug)]
pub struct SqliteOutbox {
    tx: mpsc::Sender<Op>,
    shared: Arc<Shared>,
    reader: Arc<Mutex<Connection>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
    max_records: u64,
    max_bytes: u64,
}

impl SqliteOutbox {
    /// Opens (creating if needed) the store in directory `cfg.path`, clears leases left by a
    /// previous process (those records are resent: at-least-once) and starts the writer.
    pub async fn open(cfg: &OutboxConfig) -> Result<Arc<SqliteOutbox>, String> {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || Self::open_blocking(&cfg))
            .await
            .map_err(|e| format!("outbox open task failed: {e}"))?
    }

    /// Blocking variant of [`SqliteOutbox::open`] (for CLIs and tests without a runtime).
    pub fn open_blocking(cfg: &OutboxConfig) -> Result<Arc<SqliteOutbox>, String> {
        let dir = Path::new(&cfg.path);
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("outbox.path: cannot create `{}`: {e}", dir.display()))?;
        let path = dir.join(DB_FILE);
        let ctx = |e: rusqlite::Error| format!("outbox `{}`: {e}", path.display());

        let conn = Connection::open(&path).map_err(ctx)?;
        configure_writer(&conn, cfg.fsync)
            .map_err(|e| format!("outbox `{}`: {e}", path.display()))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(ctx)?;
        if version > SCHEMA_VERSION {
            return Err(format!(
                "outbox `{}`: schema version {version} was written by a newer tagrelay (this one knows {SCHEMA_VERSION})",
                path.display()
            ));
        }
        conn.execute_batch(SCHEMA).map_err(ctx)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(ctx)?;
        // Records in flight when the previous process stopped are due at once, in their
        // original order (first_enqueued_ms is always in the past).
        let cleared = conn
            .execute(
                "UPDATE pending SET lease_until_ms = 0, next_attempt_ms = first_enqueued_ms WHERE lease_until_ms > 0",
                [],
            )
            .map_err(ctx)?;
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
        };
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer::run(conn, rx, thread_shared, settings))
            .map_err(|e| format!("outbox: cannot start writer thread: {e}"))?;

        Ok(Arc::new(SqliteOutbox {
            tx,
            shared,
            reader: Arc::new(Mutex::new(reader)),
            writer_thread: Mutex::new(Some(handle)),
            path,
            max_records: cfg.max_records,
            max_bytes: cfg.max_bytes,
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
        let now = super::now_ms();
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
        let (done, wait) = oneshot::channel();
        if self.send(Op::Close { done }) {
            // An error means the writer already stopped; either way it is flushed.
            let _ = wait.await;
        }
        let handle = self.writer_thread.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }

    fn send(&self, op: Op) -> bool {
        self.tx.send(op).is_ok()
    }
}

#[async_trait]
impl Outbox for SqliteOutbox {
    async fn enqueue(&self, records: Vec<NewRecord>) -> Result<(), EnqueueError> {
        if records.is_empty() {
            return Ok(());
        }
        if !self.is_open() {
            return Err(EnqueueError::Closed);
        }
        let n = records.len() as u64;
        let bytes: u64 = records.iter().map(|r| r.payload.len() as u64).sum();
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
            records,
            bytes,
            done,
        }) {
            self.shared.reserved_records.fetch_sub(n, Ordering::AcqRel);
            self.shared
                .reserved_bytes
                .fetch_sub(bytes, Ordering::AcqRel);
            return Err(EnqueueError::Closed);
        }
        wait.await.unwrap_or(Err(EnqueueError::Closed))
    }

    fn is_open(&self) -> bool {
        self.shared.open.load(Ordering::Acquire)
    }
}

#[async_trait]
impl DeliveryStore for SqliteOutbox {
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

    async fn backlog(&self, now_ms: i64) -> Result<Vec<TagBacklog>, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader
                .lock()
                .map_err(|_| StoreError::Io("reader connection poisoned".into()))?;
            backlog(&conn, now_ms).map_err(|e| StoreError::Io(e.to_string()))
        })
        .await
        .map_err(|e| StoreError::Io(format!("backlog task failed: {e}")))?
    }

    async fn close(&self) {
        SqliteOutbox::close(self).await
    }
}

fn configure_writer(conn: &Connection, fsync: FsyncMode) -> Result<(), String> {
    let s = |e: rusqlite::Error| e.to_string();
    conn.busy_timeout(BUSY_TIMEOUT).map_err(s)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(s)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!(
            "could not enable WAL journal mode (got `{mode}`); is the file on a network filesystem?"
        ));
    }
    let (sync, full) = match fsync {
        FsyncMode::Batch => ("FULL", false),
        FsyncMode::Always => ("FULL", true),
        FsyncMode::Off => ("NORMAL", false),
    };
    conn.pragma_update(None, "synchronous", sync).map_err(s)?;
    conn.pragma_update(None, "fullfsync", full).map_err(s)?;
    conn.pragma_update(None, "checkpoint_fullfsync", full)
        .map_err(s)?;
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(s)?;
    conn.pragma_update(None, "cache_size", -16_000).map_err(s)?;
    Ok(())
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
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM pending",
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

pub(crate) fn backlog(conn: &Connection, now_ms: i64) -> rusqlite::Result<Vec<TagBacklog>> {
    let mut stmt = conn.prepare_cached(
        "SELECT tag, count(*), sum(lease_until_ms > ?1), min(first_enqueued_ms)
         FROM pending GROUP BY tag ORDER BY tag",
    )?;
    let rows = stmt.query_map([now_ms], |r| {
        Ok(TagBacklog {
            tag: r.get(0)?,
            pending: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
            leased: u64::try_from(r.get::<_, Option<i64>>(2)?.unwrap_or(0)).unwrap_or(0),
            oldest_enqueued_ms: r.get(3)?,
        })
    })?;
    rows.collect()
}
