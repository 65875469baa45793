//! The group-commit writer: one thread owns the outbox log and the SQLite write connection,
//! drains requests from a channel and applies as many as possible at once (the group's
//! frames in one write to the log, at most one SQLite transaction), then hands the hits to
//! the syncer, which answers them after its fsync, and answers everything else at once.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use std::rc::Rc;

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::fresh::{self, FreshSet, Held};
use super::log::parse_column;
use super::log_state::LogState;
use super::schema::INSERT_COPY;
use super::shared::Shared;
use super::syncer::{Job, Syncer, Waiter};
use crate::outbox::{EnqueueError, HotQueue, LeasedRecord, NewEvent, Settlement, StoreError};

pub(crate) enum Op {
    Enqueue {
        events: Vec<NewEvent>,
        /// Delivery records (events × fired tags).
        records: u64,
        bytes: u64,
        done: oneshot::Sender<Result<(), EnqueueError>>,
    },
    Lease {
        tag: Arc<str>,
        now_ms: i64,
        limit: usize,
        lease_until_ms: i64,
        done: oneshot::Sender<Result<Vec<LeasedRecord>, StoreError>>,
    },
    Settle {
        settlement: Settlement,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    /// (id, lease end) of leases given back unused.
    Release {
        leases: Vec<(i64, i64)>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
    /// Every delivery as the store sees it (tests compare it with a model).
    #[cfg(test)]
    Snapshot {
        done: oneshot::Sender<Vec<DeliveryState>>,
    },
    /// How many events the store holds (see `EmbeddedStore::held_events`).
    #[cfg(test)]
    Held {
        done: oneshot::Sender<i64>,
    },
}

/// `(tag, event id, attempts, next attempt, lease end)` of one delivery.
#[cfg(test)]
pub(crate) type DeliveryState = (String, String, i64, i64, i64);

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Enqueue { records, .. } => write!(f, "Enqueue({records})"),
            Op::Lease { tag, limit, .. } => write!(f, "Lease({tag}, {limit})"),
            Op::Settle { settlement, .. } => write!(
                f,
                "Settle(ack {}, nack {}, dead {})",
                settlement.ack.len(),
                settlement.nack.len(),
                settlement.dead.len()
            ),
            Op::Release { leases, .. } => write!(f, "Release({})", leases.len()),
            Op::Close { .. } => write!(f, "Close"),
            #[cfg(test)]
            Op::Snapshot { .. } => write!(f, "Snapshot"),
            #[cfg(test)]
            Op::Held { .. } => write!(f, "Held"),
        }
    }
}

impl Op {
    /// Rows this op writes, for the `commit_max_records` budget.
    fn weight(&self) -> usize {
        match self {
            Op::Enqueue { records, .. } => usize::try_from(*records).unwrap_or(usize::MAX),
            Op::Lease { limit, .. } => *limit,
            Op::Settle { settlement, .. } => {
                settlement.ack.len() + settlement.nack.len() + settlement.dead.len()
            }
            Op::Release { leases, .. } => leases.len(),
            Op::Close { .. } => 0,
            #[cfg(test)]
            Op::Snapshot { .. } | Op::Held { .. } => 0,
        }
    }
}

/// The writer keeps collecting a group for at most `commit_interval`, but stops as soon as
/// no request arrived during one nap of this length: when every waiting caller is already in
/// the group (closed-loop load, light traffic) waiting longer only adds latency, while a
/// steady stream of hits keeps arriving and fills the group. Requests that come during a
/// commit's fsync are grouped into the next commit anyway. The writer naps instead of
/// blocking on the channel, because a send wakes a blocked receiver: under load that was a
/// context switch into this thread per hit (docs/performance-log.md has the measurements).
const ARRIVAL_GAP: Duration = Duration::from_micros(50);

#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub commit_interval: Duration,
    pub commit_max_records: usize,
    /// Dead-letter retention (`None`: unbounded), applied every `purge_every`.
    pub dead_letter_max_age: Option<Duration>,
    pub dead_letter_max_records: Option<u64>,
    pub purge_every: Duration,
}

/// Dead letters deleted per purge step at most: a step never holds hits up for long.
const PURGE_STEP: i64 = 5_000;

const INSERT: &str = "INSERT INTO pending (tag, event_row, attempts, next_attempt_ms, first_enqueued_ms, lease_until_ms)
     VALUES (?1, ?2, 0, ?3, ?3, 0)";
/// A first delivery that needs a row after all (failed, given back, lease ended).
const MATERIALIZE: &str = "INSERT INTO pending (tag, event_row, attempts, next_attempt_ms, first_enqueued_ms, last_error, lease_until_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)";
/// The rows a lagging tag reads its first deliveries from, in order, below the log's first
/// row (?3; from there on it reads the log). (Deliveries that got a row before a crash or
/// failed commit rewound the tag are passed over by `FreshSet::skip`.)
const SCAN: &str = "SELECT id, event_id, payload, fresh, enqueued_ms FROM events
     WHERE id >= ?1 AND id < ?3 ORDER BY id LIMIT ?2";
const COLUMN: &str = "SELECT fresh FROM events WHERE id = ?1";
/// Events every tag is done with, unless a delivery row still needs them.
const DROP_SETTLED: &str = "DELETE FROM events WHERE id IN rarray(?1)
     AND NOT EXISTS (SELECT 1 FROM pending WHERE event_row = events.id)
     RETURNING id, length(payload)";
const BURY_FRESH: &str = "INSERT INTO dead_letters (tag, event_id, payload, attempts, next_attempt_ms, first_enqueued_ms, last_error, lease_until_ms, reason, dead_at_ms)
     SELECT ?2, event_id, payload, ?3, ?4, ?4, NULL, 0, ?5, ?6 FROM events WHERE id = ?1";
const POSITION: &str = "INSERT INTO cursors (tag, committed_row) VALUES (?1, ?2)
     ON CONFLICT (tag) DO UPDATE SET committed_row = excluded.committed_row";
const LEASE: &str = "UPDATE pending SET lease_until_ms = ?1, next_attempt_ms = ?1
     WHERE id IN (SELECT id FROM pending
                  WHERE tag = ?2 AND next_attempt_ms <= ?3 AND lease_until_ms <= ?3
                  ORDER BY next_attempt_ms, id LIMIT ?4)
     RETURNING id, event_row, attempts, first_enqueued_ms, last_error";
const EVENT: &str = "SELECT event_id, payload FROM events WHERE id = ?1";
/// Whole slices at once (`rarray` binds a list): one statement per slice, not per record.
const ACK: &str = "DELETE FROM pending WHERE id IN rarray(?1) RETURNING event_row";
const NACK: &str = "UPDATE pending SET attempts = attempts + 1, next_attempt_ms = ?2, last_error = ?3, lease_until_ms = 0
     WHERE id = ?1";
const BURY: &str = "INSERT INTO dead_letters (tag, event_id, payload, attempts, next_attempt_ms, first_enqueued_ms, last_error, lease_until_ms, reason, dead_at_ms)
     SELECT p.tag, coalesce(e.event_id, ''), coalesce(e.payload, x''), p.attempts + ?2, p.next_attempt_ms, p.first_enqueued_ms, p.last_error, 0, ?3, ?4
     FROM pending p LEFT JOIN events e ON e.id = p.event_row WHERE p.id = ?1";
/// Due again at once, in their original order; only if nobody leased them since.
const RELEASE: &str = "UPDATE pending SET lease_until_ms = 0, next_attempt_ms = first_enqueued_ms
     WHERE id = ?1 AND lease_until_ms = ?2";
const TOTALS: &str =
    "UPDATE outbox_totals SET records = max(records + ?1, 0), bytes = max(bytes + ?2, 0)
     WHERE id = 0 RETURNING records, bytes";

/// The writer thread's own state besides the connection.
pub(crate) struct State {
    fresh: FreshSet,
    log: LogState,
    /// Pending records and bytes as `outbox_totals` last returned them, and the change since:
    /// a commit of hits alone opens no SQLite transaction, so the totals are written with the
    /// next one that does (any that moves a tag's position).
    totals: (i64, i64),
    unsaved: (i64, i64),
    /// Makes hits' commits durable and answers them (`None` with `fsync = "off"`).
    syncer: Option<Syncer>,
    /// When dead letters were last purged (`None`: not yet).
    purged: Option<Instant>,
    /// Reused for each event's `fresh` column.
    column: Vec<u8>,
}

/// Records of dispatcher work (leases, settlements) one commit takes while hits are waiting:
/// about 0.3 ms of the writer's time.
const DISPATCH_SLICE: usize = 64;

/// How many records of dispatcher work (leases, settlements) join a commit whose hits
/// carry `hit_records`. With hits waiting, about as much as the hits themselves (never less
/// than a slice): acks keep pace with enqueues, and no hit waits behind a thousand acks.
/// Without hits, a few slices: a hit arriving meanwhile waits for this commit too. Closing:
/// everything.
fn dispatch_budget(hit_records: usize, closing: bool, commit_max_records: usize) -> usize {
    if closing {
        commit_max_records
    } else if hit_records == 0 {
        DISPATCH_SLICE * 4
    } else {
        DISPATCH_SLICE.max(hit_records)
    }
}

/// Whether the writer should nap once more for hits before committing its group. Only hits
/// are worth waiting for, only while they keep arriving, and never past `commit_interval`
/// (`left`). With a syncer (`syncing` is `Some`), only while it is inside an fsync: hits
/// committed now would wait for that fsync to end anyway, while with no fsync in flight a
/// commit now starts theirs at once: lower p99 and a higher max, for somewhat smaller groups
/// when the disk is quick (docs/performance-log.md).
///
/// With no hits yet (`empty`: only dispatcher work), the writer waits only while an fsync is
/// in flight: hits arriving meanwhile would commit after it anyway, so the dispatcher work
/// shares their commit instead of paying for one of its own (a commit has a fixed cost
/// whatever it holds, and at full load many commits were dispatcher work alone).
fn keep_gathering(arrived: bool, left: Duration, empty: bool, syncing: Option<bool>) -> bool {
    if left.is_zero() {
        false
    } else if empty {
        syncing == Some(true)
    } else {
        arrived && syncing != Some(false)
    }
}

/// Moves deferred ops into the group, oldest first, up to `budget` records; at least one op
/// always goes, so nothing starves.
fn admit(deferred: &mut VecDeque<Op>, budget: usize, batch: &mut Vec<Op>) {
    let mut used = 0usize;
    while let Some(op) = deferred.front() {
        let w = op.weight().max(1);
        if used > 0 && used + w > budget {
            break;
        }
        used += w;
        batch.extend(deferred.pop_front());
    }
}

fn sort(
    op: Op,
    batch: &mut Vec<Op>,
    deferred: &mut VecDeque<Op>,
    close: &mut Option<oneshot::Sender<()>>,
    weight: &mut usize,
) {
    match op {
        Op::Close { done } => *close = Some(done),
        op @ Op::Enqueue { .. } => {
            *weight += op.weight();
            batch.push(op);
        }
        op => deferred.push_back(op),
    }
}

/// What the writer starts from (see `EmbeddedStore::open`).
pub(crate) struct Start {
    pub fresh: FreshSet,
    pub log: LogState,
    pub totals: (i64, i64),
    pub syncer: Option<Syncer>,
}

/// The writer thread's body. Returns when closed or when every sender is gone.
pub(crate) fn run(
    mut conn: Connection,
    rx: mpsc::Receiver<Op>,
    shared: Arc<Shared>,
    s: Settings,
    start: Start,
) {
    // However the writer ends (closed, or a panic), the store stops reporting ready.
    struct NotOpenOnExit(Arc<Shared>);
    impl Drop for NotOpenOnExit {
        fn drop(&mut self) {
            self.0
                .open
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }
    let _guard = NotOpenOnExit(shared.clone());
    let mut batch: Vec<Op> = Vec::with_capacity(256);
    // Dispatcher work (leases, settlements) waits here so that it joins commits a slice
    // at a time: a hit never waits behind a thousand acks.
    let mut deferred: VecDeque<Op> = VecDeque::new();
    let mut close = None;
    let mut state = State {
        fresh: start.fresh,
        log: start.log,
        totals: start.totals,
        unsaved: (0, 0),
        syncer: start.syncer,
        purged: None,
        column: Vec::new(),
    };
    loop {
        // Weight of the hits' records in this group.
        let mut weight = 0usize;
        if deferred.is_empty() {
            let Ok(first) = rx.recv() else { break };
            sort(first, &mut batch, &mut deferred, &mut close, &mut weight);
        }
        let deadline = Instant::now() + s.commit_interval;
        // Whether anything arrived since the writer last slept.
        let mut arrived = true;
        while close.is_none() && weight < s.commit_max_records {
            let next = match rx.try_recv() {
                Ok(op) => op,
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let syncing = state
                        .syncer
                        .as_ref()
                        .map(|_| shared.syncing.load(Ordering::Acquire));
                    if !keep_gathering(arrived, left, batch.is_empty(), syncing) {
                        break;
                    }
                    std::thread::sleep(left.min(ARRIVAL_GAP));
                    arrived = false;
                    continue;
                }
            };
            arrived = true;
            sort(next, &mut batch, &mut deferred, &mut close, &mut weight);
        }
        let budget = dispatch_budget(weight, close.is_some(), s.commit_max_records);
        admit(&mut deferred, budget, &mut batch);
        if !batch.is_empty() {
            commit(&mut conn, &mut batch, &shared, &mut state);
            if let Some(e) = state.log.take_sync_failure() {
                tracing::error!(error = %e, "outbox: fsync of the outbox log failed; hits are refused and the server reports not ready until it is restarted");
                shared.stop_taking_hits(format!(
                    "fsync of the outbox failed ({e}); restart tagrelay"
                ));
            }
            super::checkpoint::writer_step(&conn, &shared);
            if state.purged.is_none_or(|t| t.elapsed() >= s.purge_every) {
                match purge_dead_letters(&conn, &s) {
                    // A full step: more to delete, at the next commit.
                    Ok(true) => state.purged = None,
                    Ok(false) => state.purged = Some(Instant::now()),
                    Err(e) => {
                        state.purged = Some(Instant::now());
                        tracing::warn!(error = %e, "outbox: could not delete expired dead letters; will retry");
                    }
                }
            }
        }
        if close.is_some() && deferred.is_empty() {
            // Deliveries still out get rows, so the next start resumes each tag exactly
            // where it stands.
            if let Err(e) = give_rows_to_all_out(&conn, &mut state) {
                tracing::warn!(error = %e, "outbox: could not record deliveries in flight at close; they are sent again after restart");
            }
            // Every hit handed to the syncer is answered before the close is.
            drop(state.syncer.take());
            // Tidy shutdown: fold the WAL back into the database so the next start is quick.
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "outbox: checkpoint at close failed (harmless)");
            }
            if let Some(done) = close.take() {
                let _ = done.send(());
            }
            break;
        }
    }
    // Anything still queued after a close is answered `Closed` by dropping its responder.
}

/// Replies for a batch, and the pending totals after it if they changed.
type Applied = (Vec<Reply>, Option<(i64, i64)>);

enum Reply {
    #[cfg(test)]
    Snapshot(Vec<DeliveryState>),
    #[cfg(test)]
    Held(i64),
    Enqueued,
    Leased(Vec<LeasedRecord>),
    Settled,
}

/// Per-commit bookkeeping applied only if the transaction commits.
#[derive(Default)]
struct Delta {
    records: i64,
    bytes: i64,
    enqueued: Vec<(Arc<str>, u64)>,
    committed_records: u64,
    /// Some hit's event went to SQLite as well as the log (tags past `fresh::MAX_TAGS`): the
    /// syncer fsyncs the WAL too.
    hits_in_sqlite: bool,
    /// Per tag seen in this commit: its dispatcher's queue (if it has one), the records to
    /// hand it after the commit, and whether some had to be left in the store instead.
    hot: Vec<HotHandoff>,
}

struct HotHandoff {
    tag: Arc<str>,
    queue: Option<Arc<HotQueue>>,
    records: Vec<LeasedRecord>,
    /// Places in the queue promised to this commit's records.
    promised: usize,
    overflowed: bool,
}

impl Delta {
    fn handoff(&mut self, tag: &Arc<str>, shared: &Shared) -> &mut HotHandoff {
        let i = match self.hot.iter().position(|h| h.tag == *tag) {
            Some(i) => i,
            None => {
                self.hot.push(HotHandoff {
                    tag: tag.clone(),
                    queue: shared.hot_queue(tag),
                    records: Vec::new(),
                    promised: 0,
                    overflowed: false,
                });
                self.hot.len() - 1
            }
        };
        &mut self.hot[i]
    }
}

/// A write transaction begun only when a statement needs one. Hits' events and acks of
/// deliveries from the log touch no SQLite page (see `log_state`); what a commit then writes
/// to SQLite is the positions that moved and the totals, a few small rows, whatever the
/// number of events in it.
struct Tx<'c> {
    conn: &'c Connection,
    open: Cell<bool>,
}

impl<'c> Tx<'c> {
    fn new(conn: &'c Connection) -> Self {
        Tx {
            conn,
            open: Cell::new(false),
        }
    }

    fn c(&self) -> WriteResult<&'c Connection> {
        if !self.open.get() {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            self.open.set(true);
        }
        Ok(self.conn)
    }

    fn is_open(&self) -> bool {
        self.open.get()
    }

    fn commit(&self) -> WriteResult<()> {
        if self.open.replace(false) {
            self.conn.execute_batch("COMMIT")?;
        }
        Ok(())
    }

    fn rollback(&self) {
        if self.open.replace(false) {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// Why a commit (or a step of the writer's upkeep) failed: the database or the outbox log.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Sql(#[from] rusqlite::Error),
    #[error("outbox log: {0}")]
    Log(#[from] std::io::Error),
    #[error("cannot write an event's tag list: {0}")]
    Tags(#[from] serde_json::Error),
}

type WriteResult<T> = Result<T, WriteError>;

fn commit(conn: &mut Connection, batch: &mut Vec<Op>, shared: &Shared, state: &mut State) {
    let mut delta = Delta::default();
    let mut positions = Vec::new();
    let sync = state.syncer.is_some() && has_hits(batch);
    let tx = Tx::new(conn);
    let mut unsaved = state.unsaved;
    let mut release_bound = None;
    let result = (|| -> WriteResult<Applied> {
        let recounted = state.fresh.take_recount();
        if recounted {
            unsaved = (0, 0);
            recount(&tx, state)?;
        }
        let mut replies = Vec::with_capacity(batch.len());
        for op in batch.iter() {
            replies.push(apply(&tx, op, &mut delta, shared, state)?);
        }
        #[cfg(test)]
        if state.log.has_unwritten() && shared.fail_log.load(Ordering::Acquire) {
            return Err(std::io::Error::other("injected log failure").into());
        }
        state.log.flush(&mut state.fresh)?;
        // Segments every tag has read past go after this commit; deliveries of theirs still
        // out (a slow send) are copied into `events` first, so they never hold the log up.
        release_bound = state.log.release_bound(state.fresh.lowest_lag());
        if let Some(bound) = release_bound {
            for (row, at) in state.fresh.out_below(bound) {
                copy_in(&tx, state, row, at)?;
            }
        }
        positions = write_positions(&tx, &mut state.fresh)?;
        unsaved.0 += delta.records;
        unsaved.1 += delta.bytes;
        let totals = if tx.is_open() && (unsaved != (0, 0) || recounted) {
            let mut stmt = tx.c()?.prepare_cached(TOTALS)?;
            Some(stmt.query_row([unsaved.0, unsaved.1], |r| Ok((r.get(0)?, r.get(1)?)))?)
        } else {
            None
        };
        tx.commit()?;
        Ok((replies, totals))
    })();

    let reserved_records: u64 = batch
        .iter()
        .map(|op| match op {
            Op::Enqueue { records, .. } => *records,
            _ => 0,
        })
        .sum();
    let reserved_bytes: u64 = batch
        .iter()
        .map(|op| match op {
            Op::Enqueue { bytes, .. } => *bytes,
            _ => 0,
        })
        .sum();

    match result {
        Ok((replies, totals)) => {
            state.fresh.written(&positions);
            shared.set_fresh_gauges(state.fresh.gauges());
            match totals {
                Some(t) => {
                    state.totals = t;
                    state.unsaved = (0, 0);
                }
                None => state.unsaved = unsaved,
            }
            let records = state.totals.0.saturating_add(state.unsaved.0);
            let bytes = state.totals.1.saturating_add(state.unsaved.1);
            shared
                .committed_records
                .store(u64::try_from(records).unwrap_or(0), Ordering::Release);
            shared
                .committed_bytes
                .store(u64::try_from(bytes).unwrap_or(0), Ordering::Release);
            release(shared, reserved_records, reserved_bytes);
            shared.commits.fetch_add(1, Ordering::Relaxed);
            if sync {
                shared.synced_commits.fetch_add(1, Ordering::Relaxed);
            }
            metrics::counter!("tagrelay_outbox_commits_total", "synced" => if sync { "true" } else { "false" })
                .increment(1);
            if delta.committed_records > 0 {
                metrics::histogram!("tagrelay_outbox_commit_records")
                    .record(delta.committed_records as f64);
            }
            for h in delta.hot.drain(..) {
                if let Some(q) = h.queue {
                    if h.overflowed {
                        q.mark_overflowed();
                    }
                    if !h.records.is_empty() {
                        q.push(h.records);
                    }
                }
            }
            for (tag, n) in &delta.enqueued {
                metrics::counter!("tagrelay_outbox_enqueued_total", "tag" => tag.to_string())
                    .increment(*n);
                shared.notify(tag);
            }
            // Hits wait for the syncer's next fsync; the rest needs no sync (see `has_hits`).
            let mut waiting: Vec<Waiter> = Vec::new();
            for (op, reply) in batch.drain(..).zip(replies) {
                match op {
                    Op::Enqueue { done, .. } if sync => waiting.push(done),
                    op => answer(op, Ok(reply)),
                }
            }
            if let (Some(syncer), false) = (&state.syncer, waiting.is_empty()) {
                syncer.submit_job(Job {
                    waiters: waiting,
                    log: state.log.current_file(),
                    wal: delta.hits_in_sqlite,
                });
            }
            if let Some(bound) = release_bound {
                state.log.release(bound);
            }
            state.log.report_size();
        }
        Err(e) => {
            tx.rollback();
            state.log.discard();
            state.fresh.reset();
            release(shared, reserved_records, reserved_bytes);
            let msg = e.to_string();
            tracing::error!(error = %msg, ops = batch.len(), "outbox: commit failed");
            for op in batch.drain(..) {
                answer(op, Err(msg.clone()));
            }
        }
    }
}

/// Whether a commit carries hits, which wait for the syncer's fsync of the log before they
/// are answered: only hits wait for their events to be durable. Leases, acks, nacks and dead
/// letters lost to a power cut come back as deliveries sent again (as after a crash between a
/// vendor's answer and its ack).
fn has_hits(batch: &[Op]) -> bool {
    batch.iter().any(|op| matches!(op, Op::Enqueue { .. }))
}

fn release(shared: &Shared, records: u64, bytes: u64) {
    if records > 0 {
        shared.reserved_records.fetch_sub(records, Ordering::AcqRel);
        shared.reserved_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

fn answer(op: Op, reply: Result<Reply, String>) {
    // A dropped receiver means the caller stopped waiting; the write stands regardless.
    match (op, reply) {
        (Op::Enqueue { done, .. }, Ok(_)) => {
            let _ = done.send(Ok(()));
        }
        (Op::Enqueue { done, .. }, Err(e)) => {
            let _ = done.send(Err(EnqueueError::Io(e)));
        }
        (Op::Lease { done, .. }, Ok(Reply::Leased(records))) => {
            let _ = done.send(Ok(records));
        }
        (Op::Lease { done, .. }, Ok(_)) => {
            let _ = done.send(Ok(Vec::new()));
        }
        (Op::Lease { done, .. }, Err(e)) => {
            let _ = done.send(Err(StoreError::Io(e)));
        }
        (Op::Settle { done, .. }, Ok(_)) => {
            let _ = done.send(Ok(()));
        }
        (Op::Settle { done, .. }, Err(e)) | (Op::Release { done, .. }, Err(e)) => {
            let _ = done.send(Err(StoreError::Io(e)));
        }
        (Op::Release { done, .. }, Ok(_)) => {
            let _ = done.send(Ok(()));
        }
        (Op::Close { done }, _) => {
            let _ = done.send(());
        }
        #[cfg(test)]
        (Op::Snapshot { done }, Ok(Reply::Snapshot(v))) => {
            let _ = done.send(v);
        }
        #[cfg(test)]
        (Op::Snapshot { .. }, _) => {}
        #[cfg(test)]
        (Op::Held { done }, Ok(Reply::Held(n))) => {
            let _ = done.send(n);
        }
        #[cfg(test)]
        (Op::Held { .. }, _) => {}
    }
}

fn apply(
    tx: &Tx<'_>,
    op: &Op,
    delta: &mut Delta,
    shared: &Shared,
    state: &mut State,
) -> WriteResult<Reply> {
    match op {
        Op::Enqueue {
            events,
            records,
            bytes,
            ..
        } => {
            let now = crate::clock::now_ms();
            for e in events {
                if e.tags.is_empty() {
                    continue;
                }
                let row = state.fresh.next_row();
                // Ids cannot name first deliveries of rows this high (never reached): every
                // tag then gets a delivery row.
                let listed = if fresh::id(row, 0).is_some() {
                    e.tags.len().min(fresh::MAX_TAGS)
                } else {
                    0
                };
                state.column.clear();
                serde_json::to_writer(&mut state.column, &e.tags[..listed])?;
                let off = state.log.push(
                    row,
                    e.enqueued_at_ms,
                    &state.column,
                    &e.event_id,
                    &e.payload,
                )?;
                state.fresh.inserted(row);
                if listed < e.tags.len() {
                    // Delivery rows for the tags past what fresh ids name need the event in
                    // `events`, durable with the hit.
                    insert_copy(
                        tx,
                        &mut state.log,
                        row,
                        &e.event_id,
                        &e.payload,
                        &state.column,
                        e.enqueued_at_ms,
                    )?;
                    delta.hits_in_sqlite = true;
                }
                let held = Held {
                    row,
                    enqueued_ms: e.enqueued_at_ms,
                    at: None,
                    bytes: u32::try_from(e.payload.len()).unwrap_or(u32::MAX),
                };
                let mut handed = false;
                // The event's tag list for `FreshSet`, built only if a delivery is handed over.
                let mut tags: Option<Arc<[Arc<str>]>> = None;
                for (k, tag) in e.tags.iter().enumerate() {
                    let h = delta.handoff(tag, shared);
                    if k >= listed {
                        tx.c()?.prepare_cached(INSERT)?.execute(rusqlite::params![
                            &**tag,
                            row,
                            e.enqueued_at_ms
                        ])?;
                        h.overflowed = true;
                    } else {
                        // Straight to the queue only for a tag that is caught up: one that
                        // lags reads in row order from the store, this row included.
                        let room = state.fresh.lags(tag).is_none()
                            && h.queue.as_ref().is_some_and(|q| q.has_room(h.promised, 1));
                        let lease_until = h.queue.as_ref().map_or(0, |q| {
                            now.saturating_add(i64::try_from(q.lease_ms()).unwrap_or(i64::MAX))
                        });
                        let id = fresh::id(row, k);
                        match id {
                            Some(id)
                                if room
                                    && state.fresh.hand(
                                        &held,
                                        tags.get_or_insert_with(|| e.tags[..listed].into()),
                                        k,
                                        lease_until,
                                        false,
                                    ) =>
                            {
                                handed = true;
                                h.promised += 1;
                                h.records.push(LeasedRecord::first_delivery(
                                    id,
                                    tag.clone(),
                                    e.event_id.clone(),
                                    e.payload.clone(),
                                    e.event.clone(),
                                    e.enqueued_at_ms,
                                    lease_until,
                                ));
                            }
                            _ => {
                                if h.queue.is_some() {
                                    h.overflowed = true;
                                }
                                state.fresh.leave(tag, row, e.enqueued_at_ms);
                            }
                        }
                    }
                    match delta.enqueued.iter_mut().find(|(t, _)| t == tag) {
                        Some((_, n)) => *n += 1,
                        None => delta.enqueued.push((tag.clone(), 1)),
                    }
                }
                if handed {
                    state.log.unplaced(row, off);
                }
            }
            delta.records += i64::try_from(*records).unwrap_or(i64::MAX);
            delta.bytes += i64::try_from(*bytes).unwrap_or(i64::MAX);
            delta.committed_records += records;
            Ok(Reply::Enqueued)
        }
        Op::Lease {
            tag,
            now_ms,
            limit,
            lease_until_ms,
            ..
        } => {
            // Deliveries of this tag out in memory whose lease ended are due again, like
            // delivery rows whose lease ended (this tag's dispatcher is the one to resend).
            end_expired_leases(tx, tag, state, *now_ms)?;
            let mut out = lease_rows(tx.c()?, tag, *now_ms, *limit, *lease_until_ms)?;
            if out.len() < *limit {
                let want = *limit - out.len();
                let mut passed_over = Vec::new();
                let capped = scan(
                    tx,
                    tag,
                    want,
                    *lease_until_ms,
                    state,
                    &mut out,
                    &mut passed_over,
                )?;
                if capped {
                    // Tell the dispatcher to lease again at once rather than at its next poll.
                    if let Some(q) = shared.hot_queue(tag) {
                        q.mark_overflowed();
                    }
                }
                // A row passed over may have waited only for this tag to pass it.
                let done: Vec<(i64, u32)> = passed_over
                    .into_iter()
                    .filter(|(row, tags, _)| {
                        !state.fresh.contains(*row) && state.fresh.all_passed(Some(tags), *row)
                    })
                    .map(|(row, _, bytes)| (row, bytes))
                    .collect();
                drop_done(tx, state, delta, done)?;
            }
            Ok(Reply::Leased(out))
        }
        Op::Settle { settlement, .. } => {
            settle(tx, settlement, delta, state)?;
            Ok(Reply::Settled)
        }
        Op::Release { leases, .. } => {
            for &(id, until) in leases {
                if fresh::decode(id).is_some() {
                    // Still out means still as handed out: due again at once.
                    if let Some(t) = state.fresh.take(id) {
                        materialize(tx, state, &t, 0, t.enqueued_ms, None)?;
                    }
                } else {
                    tx.c()?.prepare_cached(RELEASE)?.execute([id, until])?;
                }
            }
            Ok(Reply::Settled)
        }
        Op::Close { .. } => Ok(Reply::Settled),
        #[cfg(test)]
        Op::Snapshot { .. } => Ok(Reply::Snapshot(snapshot(tx, state)?)),
        #[cfg(test)]
        Op::Held { .. } => Ok(Reply::Held(held(tx, state)?)),
    }
}

/// Events every tag is done with (`(row, payload bytes)`): rows in SQLite are deleted unless
/// a delivery row still needs them; log rows only leave the byte count (their segment goes
/// once every row in it is passed, see `log_state`).
fn drop_done(
    tx: &Tx<'_>,
    state: &mut State,
    delta: &mut Delta,
    done: Vec<(i64, u32)>,
) -> WriteResult<()> {
    let mut rows: Vec<Value> = Vec::new();
    for (row, bytes) in done {
        if state.log.in_events(row) {
            rows.push(Value::Integer(row));
        } else {
            delta.bytes -= i64::from(bytes);
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    let mut drop_events = tx.c()?.prepare_cached(DROP_SETTLED)?;
    let mut freed = drop_events.query([Rc::new(rows)])?;
    while let Some(r) = freed.next()? {
        state.log.copied.remove(&r.get::<_, i64>(0)?);
        delta.bytes -= r.get::<_, i64>(1)?;
    }
    Ok(())
}

#[cfg(test)]
fn held(tx: &Tx<'_>, state: &mut State) -> WriteResult<i64> {
    let mut n: i64 = tx
        .c()?
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
    state.log.flush(&mut state.fresh)?;
    let lags = state.fresh.lagging();
    for f in state.log.log.frames(None) {
        let f = f?;
        if state.log.copied.contains(&f.row) {
            continue;
        }
        let owed = f
            .tag_list()
            .unwrap_or_default()
            .iter()
            .any(|t| lags.iter().any(|(l, r)| l == t && *r <= f.row));
        if owed || state.fresh.contains(f.row) {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
fn snapshot(tx: &Tx<'_>, state: &mut State) -> WriteResult<Vec<DeliveryState>> {
    let conn = tx.c()?;
    state.log.flush(&mut state.fresh)?;
    let fresh_set = &state.fresh;
    let mut out: Vec<DeliveryState> = conn
        .prepare(
            "SELECT p.tag, e.event_id, p.attempts, p.next_attempt_ms, p.lease_until_ms
             FROM pending p JOIN events e ON e.id = p.event_row",
        )?
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut rows: Vec<(i64, String, Option<String>, i64)> = conn
        .prepare(
            "SELECT id, event_id, fresh, enqueued_ms FROM events
             WHERE fresh IS NOT NULL AND id < ?1",
        )?
        .query_map([state.log.start_row()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    // First deliveries of log rows, from the log (a copy in `events` is the same event).
    for f in state.log.log.frames(None) {
        let f = f?;
        let column = String::from_utf8_lossy(&f.tags).into_owned();
        rows.push((f.row, f.event_id, Some(column), f.enqueued_ms));
    }
    for (row, event_id, column, enqueued_ms) in rows {
        let tags = parse_column(column.as_deref()).unwrap_or_default();
        for (k, tag) in tags.iter().enumerate() {
            if fresh_set.lags(tag).is_some_and(|lag| lag <= row) {
                out.push((tag.to_string(), event_id.clone(), 0, enqueued_ms, 0));
            } else if let Some(until) = fresh_set.out_lease(row, k) {
                out.push((tag.to_string(), event_id.clone(), 0, until, until));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Leases due delivery rows (retries, given back, or written as rows from the start).
fn lease_rows(
    conn: &Connection,
    tag: &Arc<str>,
    now_ms: i64,
    limit: usize,
    lease_until_ms: i64,
) -> WriteResult<Vec<LeasedRecord>> {
    let mut stmt = conn.prepare_cached(LEASE)?;
    let rows = stmt.query_map(
        rusqlite::params![
            lease_until_ms,
            &**tag,
            now_ms,
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                u32::try_from(r.get::<_, i64>(2)?).unwrap_or(u32::MAX),
                r.get::<_, i64>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        },
    )?;
    let mut leased = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    // RETURNING yields rows in no promised order; dispatchers want oldest first.
    leased.sort_unstable_by_key(|r| r.0);
    let mut event = conn.prepare_cached(EVENT)?;
    let mut out = Vec::with_capacity(leased.len());
    for (id, row, attempts, first_enqueued_ms, last_error) in leased {
        // A delivery without its event cannot be sent; an empty payload makes the
        // dispatcher dead-letter it as invalid rather than failing every lease.
        let (event_id, payload) = event
            .query_row([row], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .optional()?
            .unwrap_or_default();
        out.push(LeasedRecord {
            id,
            tag: tag.clone(),
            event_id,
            payload: Bytes::from(payload),
            event: None,
            attempts,
            first_enqueued_ms,
            last_error,
            lease_until_ms,
        });
    }
    Ok(out)
}

/// Rows read past what is still wanted per step of a scan, for rows that do not list the
/// tag (each row read carries its payload, so reading far ahead is costly).
const SCAN_SLACK: usize = 8;
/// Rows a lease may read past four times what it wants.
const SCAN_MAX_SKIP: usize = 1_024;

/// A row a scan passed over (see `FreshSet::skip`): `(row, its tags, its payload's size)`.
type PassedOver = (i64, Arc<[Arc<str>]>, u32);

/// Hands out up to `want` first deliveries of a lagging `tag`, reading from where it lags:
/// rows below the log's first row from `events`, the rest from the log. A scan that reaches
/// the last row leaves the tag caught up. Returns whether it stopped at its read limit with
/// the tag still behind (more may be due at once).
fn scan(
    tx: &Tx<'_>,
    tag: &Arc<str>,
    want: usize,
    lease_until_ms: i64,
    state: &mut State,
    out: &mut Vec<LeasedRecord>,
    passed_over: &mut Vec<PassedOver>,
) -> WriteResult<bool> {
    let Some(mut from) = state.fresh.lags(tag) else {
        return Ok(false);
    };
    let mut got = 0usize;
    // A tag that fires rarely, far behind, must not hold the writer (and every hit) while
    // it reads a long stretch of other tags' rows: it goes on at its next lease.
    let mut examined = 0usize;
    let max_examined = want.saturating_mul(4).saturating_add(SCAN_MAX_SKIP);
    // Frames of this commit not written yet are read like the others.
    state.log.flush(&mut state.fresh)?;
    let first_log_row = state.log.start_row();
    // One event read back, from either place.
    let mut take = |state: &mut State,
                    row: i64,
                    event_id: String,
                    payload: Bytes,
                    tags: Option<Vec<Arc<str>>>,
                    enqueued_ms: i64,
                    at: Option<super::log::Pos>,
                    out: &mut Vec<LeasedRecord>|
     -> bool {
        let Some(tags) = tags else {
            // Never written so by us: the event stays in the store for an operator.
            tracing::error!(
                row,
                "outbox: an event lists its tags unreadably; it is skipped"
            );
            return false;
        };
        let tags: Arc<[Arc<str>]> = tags.into();
        let Some(k) = tags.iter().position(|t| t == tag) else {
            return false;
        };
        let bytes = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        // Its delivery got a row before a crash or a failed commit rewound this tag.
        if state.fresh.skip(tag, row) {
            passed_over.push((row, tags, bytes));
            return false;
        }
        let Some(id) = fresh::id(row, k) else {
            return false;
        };
        let held = Held {
            row,
            enqueued_ms,
            at,
            bytes,
        };
        if !state.fresh.hand(&held, &tags, k, lease_until_ms, true) {
            return false;
        }
        out.push(LeasedRecord::first_delivery(
            id,
            tag.clone(),
            event_id,
            payload,
            None,
            enqueued_ms,
            lease_until_ms,
        ));
        true
    };
    if from < first_log_row {
        let mut stmt = tx.c()?.prepare_cached(SCAN)?;
        loop {
            if examined >= max_examined {
                state.fresh.cursor(tag).lag_from = Some(from);
                return Ok(true);
            }
            let chunk = want - got + SCAN_SLACK;
            let rows = stmt
                .query_map(
                    rusqlite::params![
                        from,
                        i64::try_from(chunk).unwrap_or(i64::MAX),
                        first_log_row
                    ],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, Vec<u8>>(2)?,
                            r.get::<_, Option<String>>(3)?,
                            r.get::<_, i64>(4)?,
                        ))
                    },
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let seen = rows.len();
            for (row, event_id, payload, column, enqueued_ms) in rows {
                from = row.saturating_add(1);
                examined += 1;
                let payload = Bytes::from(payload);
                if take(
                    state,
                    row,
                    event_id,
                    payload,
                    parse_column(column.as_deref()),
                    enqueued_ms,
                    None,
                    out,
                ) {
                    got += 1;
                    if got == want {
                        state.fresh.cursor(tag).lag_from = Some(from);
                        return Ok(false);
                    }
                }
            }
            if seen < chunk {
                // Past the rows in SQLite: on in the log.
                from = first_log_row;
                break;
            }
        }
    }
    let start = state
        .log
        .resume_at(tag, from)
        .or_else(|| state.log.locate(from));
    let Some(mut pos) = start else {
        // Nothing written at or after `from`: caught up.
        state.fresh.cursor(tag).lag_from = None;
        state.log.set_resume(tag, None);
        return Ok(false);
    };
    loop {
        if examined >= max_examined {
            state.fresh.cursor(tag).lag_from = Some(from);
            state.log.set_resume(tag, Some((from, pos)));
            return Ok(true);
        }
        let chunk = want - got + SCAN_SLACK;
        let (frames, next) = match state.log.read(pos, chunk) {
            Ok(read) => read,
            Err(e) => {
                // A damaged stretch of the log: this tag goes on after it rather than failing
                // every commit from here on. What was in it is lost to this tag.
                let after = state.log.entry_after(pos);
                tracing::error!(tag = %tag, row = from, error = %e, resumes_at = ?after.map(|(r, _)| r), "outbox: could not read the outbox log; the events up to where it resumes are lost for this tag");
                match after {
                    Some((row, p)) => {
                        from = from.max(row);
                        pos = p;
                        examined += 1;
                        continue;
                    }
                    None => {
                        state.fresh.cursor(tag).lag_from = None;
                        state.log.set_resume(tag, None);
                        return Ok(false);
                    }
                }
            }
        };
        let seen = frames.len();
        for (at, f) in frames {
            if f.row < from {
                // The start of the group `from` is in.
                continue;
            }
            from = f.row.saturating_add(1);
            pos = super::log::Pos {
                segment: at.segment,
                offset: at.offset + f.encoded_len(),
            };
            examined += 1;
            let tags = f.tag_list();
            if take(
                state,
                f.row,
                f.event_id,
                f.payload,
                tags,
                f.enqueued_ms,
                Some(at),
                out,
            ) {
                got += 1;
                if got == want {
                    state.fresh.cursor(tag).lag_from = Some(from);
                    state.log.set_resume(tag, Some((from, pos)));
                    return Ok(false);
                }
            }
        }
        pos = next;
        if seen < chunk {
            // Past the last row: from now on commits hand this tag's deliveries over.
            state.fresh.cursor(tag).lag_from = None;
            state.log.set_resume(tag, None);
            return Ok(false);
        }
    }
}

fn settle(tx: &Tx<'_>, s: &Settlement, delta: &mut Delta, state: &mut State) -> WriteResult<()> {
    // Events every tag is done with (their last first delivery settled).
    let mut done: Vec<(i64, u32)> = Vec::new();
    // Delivery rows that go (acked or dead).
    let mut gone: Vec<Value> = Vec::with_capacity(s.ack.len());
    for d in &s.dead {
        if fresh::decode(d.id).is_none() {
            // Copied out before their delivery rows or events go.
            tx.c()?.prepare_cached(BURY)?.execute(rusqlite::params![
                d.id,
                i64::from(d.attempted),
                d.reason,
                s.now_ms
            ])?;
            gone.push(Value::Integer(d.id));
        } else if let Some(t) = state.fresh.take(d.id) {
            copy_in(tx, state, t.row, t.at)?;
            tx.c()?
                .prepare_cached(BURY_FRESH)?
                .execute(rusqlite::params![
                    t.row,
                    &*t.tag,
                    i64::from(d.attempted),
                    t.enqueued_ms,
                    d.reason,
                    s.now_ms
                ])?;
            delta.records -= 1;
            if t.done {
                done.push((t.row, t.bytes));
            }
        }
        // A fresh id no longer out: its lease ended and it has a delivery row now,
        // which is sent again (at-least-once, as for any lease that ends).
    }
    for &id in &s.ack {
        if fresh::decode(id).is_none() {
            gone.push(Value::Integer(id));
        } else if let Some(t) = state.fresh.take(id) {
            delta.records -= 1;
            if t.done {
                done.push((t.row, t.bytes));
            }
        }
    }
    if !gone.is_empty() {
        let conn = tx.c()?;
        let mut rows: Vec<i64> = Vec::with_capacity(gone.len());
        {
            let mut ack = conn.prepare_cached(ACK)?;
            let mut found = ack.query([Rc::new(gone)])?;
            while let Some(r) = found.next()? {
                delta.records -= 1;
                rows.push(r.get(0)?);
            }
        }
        rows.sort_unstable();
        rows.dedup();
        // The event goes too if nothing else needs it: no delivery of it is out, and
        // every tag it lists has been handed it.
        let mut column = conn.prepare_cached(COLUMN)?;
        for row in rows {
            if state.fresh.contains(row) {
                continue;
            }
            let listed: Option<Option<String>> =
                column.query_row([row], |r| r.get(0)).optional()?;
            let Some(listed) = listed else { continue };
            if state
                .fresh
                .all_passed(parse_column(listed.as_deref()).as_deref(), row)
            {
                // In `events`, so `drop_done` deletes it and counts its bytes.
                done.push((row, 0));
            }
        }
    }
    for n in &s.nack {
        if fresh::decode(n.id).is_none() {
            tx.c()?.prepare_cached(NACK)?.execute(rusqlite::params![
                n.id,
                n.next_attempt_ms,
                n.error
            ])?;
        } else if let Some(t) = state.fresh.take(n.id) {
            materialize(tx, state, &t, 1, n.next_attempt_ms, Some(&n.error))?;
        }
    }
    drop_done(tx, state, delta, done)
}

/// Copies log row `row` (its frame at `at`, if known) into `events`, unless it is there.
fn copy_in(
    tx: &Tx<'_>,
    state: &mut State,
    row: i64,
    at: Option<super::log::Pos>,
) -> WriteResult<()> {
    if state.log.in_events(row) {
        return Ok(());
    }
    // Its frame may be in this commit's, not written yet.
    state.log.flush(&mut state.fresh)?;
    // Not readable (a damaged file) or not there (never seen: rows are released only once
    // passed): the delivery row finds no event, and its dispatcher dead-letters it as
    // invalid. One event's loss, never a failed commit for every hit in it.
    let f = match state.log.frame(row, at) {
        Ok(Some(f)) => f,
        Ok(None) => {
            tracing::error!(row, "outbox: an event is missing from the outbox log");
            return Ok(());
        }
        Err(e) => {
            tracing::error!(row, error = %e, "outbox: an event could not be read back from the outbox log");
            return Ok(());
        }
    };
    insert_copy(
        tx,
        &mut state.log,
        f.row,
        &f.event_id,
        &f.payload,
        &f.tags,
        f.enqueued_ms,
    )
}

/// Writes log row `row` into `events` (its `fresh` column: `tags`) and remembers it there.
fn insert_copy(
    tx: &Tx<'_>,
    log: &mut LogState,
    row: i64,
    event_id: &str,
    payload: &[u8],
    tags: &[u8],
    enqueued_ms: i64,
) -> WriteResult<()> {
    tx.c()?
        .prepare_cached(INSERT_COPY)?
        .execute(rusqlite::params![
            row,
            event_id,
            payload,
            std::str::from_utf8(tags).ok(),
            enqueued_ms
        ])?;
    log.copied.insert(row);
    Ok(())
}

/// Writes a delivery row for first delivery `t` (its event copied into `events` first).
fn materialize(
    tx: &Tx<'_>,
    state: &mut State,
    t: &fresh::Taken,
    attempts: i64,
    next_attempt_ms: i64,
    last_error: Option<&str>,
) -> WriteResult<()> {
    copy_in(tx, state, t.row, t.at)?;
    tx.c()?
        .prepare_cached(MATERIALIZE)?
        .execute(rusqlite::params![
            &*t.tag,
            t.row,
            attempts,
            next_attempt_ms,
            t.enqueued_ms,
            last_error
        ])?;
    Ok(())
}

/// `tag`'s deliveries out in memory whose lease ended by `now_ms` get delivery rows, due
/// from their lease's end, as a delivery row's lease that ends.
fn end_expired_leases(tx: &Tx<'_>, tag: &str, state: &mut State, now_ms: i64) -> WriteResult<()> {
    let expired = state.fresh.expire(tag, now_ms);
    if expired.is_empty() {
        return Ok(());
    }
    for (t, lease_until_ms) in &expired {
        materialize(tx, state, t, 0, *lease_until_ms, None)?;
    }
    tracing::warn!(
        tag,
        deliveries = expired.len(),
        "outbox: leases of deliveries handed out in memory ended before they were settled; they are due again"
    );
    Ok(())
}

/// Deletes dead letters past their retention (age, then count), at most `PURGE_STEP` of
/// each per call. Returns whether a rule filled its step (there may be more).
fn purge_dead_letters(conn: &Connection, s: &Settings) -> WriteResult<bool> {
    let mut purged = 0usize;
    let mut full = false;
    if let Some(age) = s.dead_letter_max_age {
        let before = crate::clock::now_ms()
            .saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
        let n = conn.execute(
            "DELETE FROM dead_letters WHERE id IN
                 (SELECT id FROM dead_letters WHERE dead_at_ms < ?1 ORDER BY dead_at_ms LIMIT ?2)",
            [before, PURGE_STEP],
        )?;
        full |= n as i64 >= PURGE_STEP;
        purged += n;
    }
    if let Some(max) = s.dead_letter_max_records {
        let n = conn.execute(
            "DELETE FROM dead_letters WHERE id IN
                 (SELECT id FROM dead_letters ORDER BY id
                  LIMIT min(?2, max(0, (SELECT count(*) FROM dead_letters) - ?1)))",
            [i64::try_from(max).unwrap_or(i64::MAX), PURGE_STEP],
        )?;
        full |= n as i64 >= PURGE_STEP;
        purged += n;
    }
    if purged > 0 {
        metrics::counter!("tagrelay_outbox_dead_letters_purged_total").increment(purged as u64);
        tracing::info!(
            dead_letters = purged,
            "outbox: deleted dead letters past their retention (dead_letter_max_age_secs, dead_letter_max_records)"
        );
    }
    Ok(full)
}

/// After a reset every tag resumes from its written position, so deliveries it settled past
/// it are owed again: the record and byte counts and the gauges are taken from the store
/// (`events` below the log's first row, then the log).
fn recount(tx: &Tx<'_>, state: &mut State) -> WriteResult<()> {
    let conn = tx.c()?;
    let mut total: u64 = conn.query_row("SELECT count(*) FROM pending", [], |r| {
        r.get::<_, i64>(0).map(|n| u64::try_from(n).unwrap_or(0))
    })?;
    let mut bytes: i64 = conn.query_row(
        "SELECT coalesce(sum(length(payload)), 0) FROM events",
        [],
        |r| r.get(0),
    )?;
    // Copies written by the failed commit were rolled back with it.
    state.log.copied = conn
        .prepare("SELECT id FROM events WHERE id >= ?1")?
        .query_map([state.log.first_row], |r| r.get::<_, i64>(0))?
        .collect::<rusqlite::Result<_>>()?;
    let fresh_set = &mut state.fresh;
    fresh_set.clear_waiting();
    fresh_set.set_skips(super::schema::rows_with_delivery_rows(conn)?);
    let mut waiting: std::collections::HashMap<Arc<str>, (u64, Option<i64>)> =
        std::collections::HashMap::new();
    state.log.flush(fresh_set)?;
    let bound = state.log.start_row();
    for (tag, n, oldest) in super::schema::waiting(conn, bound)? {
        waiting.insert(Arc::from(tag.as_str()), (n, oldest));
    }
    let lags = fresh_set.lagging();
    if let Some(low) = lags.iter().map(|&(_, l)| l).min() {
        for f in state.log.frames_from(low.max(bound)) {
            let f = match f {
                Ok(f) => f,
                Err(e) => {
                    // Counted up to the damage (each tag's scan passes over it, logged).
                    // Failing here would fail this commit, reset, and recount again.
                    tracing::error!(error = %e, "outbox: could not read the outbox log to recount what is owed; the counts leave out what follows the damage");
                    break;
                }
            };
            let mut owed = false;
            for t in &f.tag_list().unwrap_or_default() {
                let lag = lags.iter().find(|(l, _)| l == t).map(|&(_, r)| r);
                if lag.is_some_and(|r| r <= f.row) && !fresh_set.is_skipped(t, f.row) {
                    let w = waiting.entry(t.clone()).or_default();
                    w.0 += 1;
                    w.1 = Some(w.1.map_or(f.enqueued_ms, |o| o.min(f.enqueued_ms)));
                    owed = true;
                }
            }
            if owed && !state.log.copied.contains(&f.row) {
                bytes += f.payload.len() as i64;
            }
        }
    }
    for (tag, (n, oldest)) in waiting {
        fresh_set.set_waiting(&tag, n, oldest);
        total += n;
    }
    conn.execute(
        "UPDATE outbox_totals SET records = ?1, bytes = ?2 WHERE id = 0",
        [i64::try_from(total).unwrap_or(i64::MAX), bytes],
    )?;
    Ok(())
}

/// Writes every position that changed, in the commit that moved it: with events in the log,
/// a tag's written position is all that tells a restart which of them it has had (where the
/// SQLite store deleted each event row as its last delivery settled).
fn write_positions(tx: &Tx<'_>, fresh_set: &mut FreshSet) -> WriteResult<Vec<(Arc<str>, i64)>> {
    let positions = fresh_set.positions_to_write();
    if !positions.is_empty() {
        let mut stmt = tx.c()?.prepare_cached(POSITION)?;
        for (tag, pos) in &positions {
            stmt.execute(rusqlite::params![&**tag, pos])?;
        }
    }
    Ok(positions)
}

/// At a clean close: every delivery still out gets a row, and the positions are written.
/// First deliveries still owed from the log stay there: the next start copies them in.
fn give_rows_to_all_out(conn: &Connection, state: &mut State) -> WriteResult<()> {
    let tx = Tx::new(conn);
    let result = (|| {
        for t in state.fresh.take_all() {
            materialize(&tx, state, &t, 0, t.enqueued_ms, None)?;
        }
        let positions = write_positions(&tx, &mut state.fresh)?;
        let unsaved = state.unsaved;
        if unsaved != (0, 0) {
            tx.c()?
                .prepare_cached(TOTALS)?
                .query_row([unsaved.0, unsaved.1], |_| Ok(()))?;
        }
        tx.commit()?;
        Ok(positions)
    })();
    match result {
        Ok(positions) => {
            state.fresh.written(&positions);
            state.unsaved = (0, 0);
            Ok(())
        }
        Err(e) => {
            tx.rollback();
            state.fresh.reset();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settle_op(records: usize) -> Op {
        let (done, _) = oneshot::channel();
        Op::Settle {
            settlement: Settlement {
                ack: (0..records as i64).collect(),
                ..Settlement::default()
            },
            done,
        }
    }

    fn admitted(hit_records: usize, closing: bool) -> usize {
        let mut deferred: VecDeque<Op> = (0..32).map(|_| settle_op(64)).collect();
        let mut batch = Vec::new();
        admit(
            &mut deferred,
            dispatch_budget(hit_records, closing, 4096),
            &mut batch,
        );
        assert_eq!(batch.len() + deferred.len(), 32);
        batch.len()
    }

    #[test]
    fn hits_share_a_commit_with_a_bounded_slice_of_dispatcher_work() {
        // 32 queued settlement slices of 64 records each.
        assert_eq!(
            admitted(1, false),
            1,
            "a lone hit waits for one slice, not 32"
        );
        assert_eq!(admitted(200, false), 3, "more hits, more acks keep pace");
        assert_eq!(admitted(0, false), 4, "no hit waiting: a few slices");
        assert_eq!(admitted(1, true), 32, "closing flushes everything");
    }

    #[test]
    fn the_writer_gathers_hits_only_while_an_fsync_is_in_flight() {
        let ms = Duration::from_millis(1);
        // No syncer (`fsync = "off"`): while hits keep coming, up to the interval.
        assert!(keep_gathering(true, ms, false, None));
        assert!(
            !keep_gathering(false, ms, false, None),
            "none came during the nap"
        );
        assert!(
            !keep_gathering(true, Duration::ZERO, false, None),
            "interval over"
        );
        assert!(!keep_gathering(true, ms, true, None), "no hit to wait with");
        // With a syncer: only while it is inside an fsync.
        assert!(keep_gathering(true, ms, false, Some(true)));
        assert!(!keep_gathering(true, ms, false, Some(false)));
        assert!(!keep_gathering(true, Duration::ZERO, false, Some(true)));
        // Dispatcher work alone waits for the hits of a running fsync, arriving or not.
        assert!(keep_gathering(false, ms, true, Some(true)));
        assert!(!keep_gathering(true, ms, true, Some(false)));
        assert!(!keep_gathering(false, Duration::ZERO, true, Some(true)));
    }

    #[test]
    fn one_op_always_goes_however_big() {
        let mut deferred: VecDeque<Op> = [settle_op(5_000)].into_iter().collect();
        let mut batch = Vec::new();
        admit(&mut deferred, dispatch_budget(1, false, 4096), &mut batch);
        assert_eq!(batch.len(), 1);
    }
}
