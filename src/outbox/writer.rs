//! The group-commit writer: one thread owns the write connection, drains requests from a
//! channel and applies as many as possible in one transaction (one WAL sync), then answers
//! every waiter.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use std::rc::Rc;

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::fresh::{self, FreshSet};
use super::sqlite::Shared;
use super::{EnqueueError, HotQueue, LeasedRecord, NewEvent, Settlement, StoreError};

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
}

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
        }
    }
}

/// The writer keeps collecting a group for at most `commit_interval`, but stops as soon as
/// no request arrived for this long: when every waiting caller is already in the group
/// (closed-loop load, light traffic) waiting longer only adds latency, while a steady stream
/// of hits keeps arriving faster than this and fills the group. Meanwhile requests that come
/// during a commit's fsync are grouped into the next commit anyway.
const ARRIVAL_GAP: Duration = Duration::from_micros(200);

#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub commit_interval: Duration,
    pub commit_max_records: usize,
}

/// `fresh` (?3) lists the tags handed to dispatchers in memory (see `fresh`); the others get
/// a delivery row each.
const INSERT_EVENT: &str =
    "INSERT INTO events (event_id, payload, fresh, enqueued_ms) VALUES (?1, ?2, ?3, ?4)";
const INSERT: &str = "INSERT INTO pending (tag, event_row, attempts, next_attempt_ms, first_enqueued_ms, lease_until_ms)
     VALUES (?1, ?2, 0, ?3, ?3, 0)";
/// A fresh delivery that needs a row after all (failed, given back, lease ended).
const MATERIALIZE: &str = "INSERT INTO pending (tag, event_row, attempts, next_attempt_ms, first_enqueued_ms, last_error, lease_until_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)";
const SET_FRESH: &str = "UPDATE events SET fresh = ?2 WHERE id = ?1";
const CLEAR_FRESH: &str = "UPDATE events SET fresh = NULL WHERE id IN rarray(?1)";
/// Events whose fresh deliveries are all settled, unless a delivery row still needs them.
const DROP_SETTLED: &str = "DELETE FROM events WHERE id IN rarray(?1)
     AND NOT EXISTS (SELECT 1 FROM pending WHERE event_row = events.id)
     RETURNING id, length(payload)";
const BURY_FRESH: &str = "INSERT INTO dead_letters (tag, event_id, payload, attempts, next_attempt_ms, first_enqueued_ms, last_error, lease_until_ms, reason, dead_at_ms)
     SELECT ?2, event_id, payload, ?3, ?4, ?4, NULL, 0, ?5, ?6 FROM events WHERE id = ?1";
const LEASE: &str = "UPDATE pending SET lease_until_ms = ?1, next_attempt_ms = ?1
     WHERE id IN (SELECT id FROM pending
                  WHERE tag = ?2 AND next_attempt_ms <= ?3 AND lease_until_ms <= ?3
                  ORDER BY next_attempt_ms, id LIMIT ?4)
     RETURNING id, event_row, attempts, first_enqueued_ms, last_error";
const EVENT: &str = "SELECT event_id, payload FROM events WHERE id = ?1";
/// Whole slices at once (`rarray` binds a list): one statement per slice, not per record.
const ACK: &str = "DELETE FROM pending WHERE id IN rarray(?1) RETURNING event_row";
/// Events go with their last delivery.
const DROP_EVENTS: &str = "DELETE FROM events WHERE id IN rarray(?1)
     AND NOT EXISTS (SELECT 1 FROM pending WHERE event_row = events.id)
     RETURNING length(payload)";
const NACK: &str = "UPDATE pending SET attempts = attempts + 1, next_attempt_ms = ?2, last_error = ?3, lease_until_ms = 0
     WHERE id = ?1";
const BURY: &str = "INSERT INTO dead_letters (tag, event_id, payload, attempts, next_attempt_ms, first_enqueued_ms, last_error, lease_until_ms, reason, dead_at_ms)
     SELECT p.tag, coalesce(e.event_id, ''), coalesce(e.payload, x''), p.attempts + ?2, p.next_attempt_ms, p.first_enqueued_ms, p.last_error, 0, ?3, ?4
     FROM pending p LEFT JOIN events e ON e.id = p.event_row WHERE p.id = ?1";
/// Due again at once, in their original order; only if nobody leased them since.
const RELEASE: &str = "UPDATE pending SET lease_until_ms = 0, next_attempt_ms = first_enqueued_ms
     WHERE id = ?1 AND lease_until_ms = ?2";
const TOTALS: &str =
    "UPDATE outbox_totals SET records = max(records + ?1, 0), bytes = max(bytes + ?2, 0), fresh_floor = ?3
     WHERE id = 0 RETURNING records, bytes";

/// How often the writer looks for fresh deliveries whose lease ended.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// The writer thread's own state besides the connection.
pub(crate) struct State {
    fresh: FreshSet,
    /// `fresh_floor` as last committed.
    floor: i64,
    last_sweep: Instant,
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

/// The writer thread's body. Returns when closed or when every sender is gone.
pub(crate) fn run(
    mut conn: Connection,
    rx: mpsc::Receiver<Op>,
    shared: Arc<Shared>,
    s: Settings,
    last_row: i64,
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
        fresh: FreshSet::new(last_row),
        floor: -1,
        last_sweep: Instant::now(),
        column: Vec::new(),
    };
    loop {
        // Weight of the hits' records in this group.
        let mut weight = 0usize;
        if deferred.is_empty() {
            // With fresh deliveries out, wake up now and then to end expired leases.
            let first = if state.fresh.is_empty() {
                rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(SWEEP_EVERY)
            };
            match first {
                Ok(op) => sort(op, &mut batch, &mut deferred, &mut close, &mut weight),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    commit(&mut conn, &mut batch, &shared, &mut state);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let deadline = Instant::now() + s.commit_interval;
        while close.is_none() && weight < s.commit_max_records {
            let next = match rx.try_recv() {
                Ok(op) => op,
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    // Only hits are worth waiting for.
                    if left.is_zero() || batch.is_empty() {
                        break;
                    }
                    match rx.recv_timeout(left.min(ARRIVAL_GAP)) {
                        Ok(op) => op,
                        Err(_) => break,
                    }
                }
            };
            sort(next, &mut batch, &mut deferred, &mut close, &mut weight);
        }
        let budget = dispatch_budget(weight, close.is_some(), s.commit_max_records);
        admit(&mut deferred, budget, &mut batch);
        if !batch.is_empty() {
            commit(&mut conn, &mut batch, &shared, &mut state);
            super::checkpoint::writer_step(&conn, &shared);
        }
        if close.is_some() && deferred.is_empty() {
            // Settled tags of events still in flight leave their rows, so the next start
            // resends only what was really unsettled.
            if let Err(e) = rewrite_stale_columns(&conn, &mut state.fresh) {
                tracing::warn!(error = %e, "outbox: could not record settled deliveries at close; they may be sent again after restart");
            }
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

fn commit(conn: &mut Connection, batch: &mut Vec<Op>, shared: &Shared, state: &mut State) {
    let mut delta = Delta::default();
    let sweep = state.last_sweep.elapsed() >= SWEEP_EVERY;
    // Nothing to write and no lease to end.
    if batch.is_empty() && (!sweep || state.fresh.is_empty()) {
        return;
    }
    let result = (|| -> rusqlite::Result<Applied> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut replies = Vec::with_capacity(batch.len());
        for op in batch.iter() {
            replies.push(apply(conn, op, &mut delta, shared, state)?);
        }
        if sweep {
            end_expired_leases(conn, &mut state.fresh, super::now_ms())?;
        }
        let floor = state.fresh.floor();
        let totals = if delta.records != 0 || delta.bytes != 0 || floor != state.floor {
            let mut stmt = conn.prepare_cached(TOTALS)?;
            Some(stmt.query_row([delta.records, delta.bytes, floor], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?)
        } else {
            None
        };
        conn.execute_batch("COMMIT")?;
        Ok((replies, totals))
    })();
    if sweep {
        state.last_sweep = Instant::now();
    }

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
            state.fresh.commit();
            state.floor = state.fresh.floor();
            if let Some((records, bytes)) = totals {
                shared
                    .committed_records
                    .store(u64::try_from(records).unwrap_or(0), Ordering::Release);
                shared
                    .committed_bytes
                    .store(u64::try_from(bytes).unwrap_or(0), Ordering::Release);
            }
            release(shared, reserved_records, reserved_bytes);
            if !batch.is_empty() {
                shared.commits.fetch_add(1, Ordering::Relaxed);
            }
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
            for (op, reply) in batch.drain(..).zip(replies) {
                answer(op, Ok(reply));
            }
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            state.fresh.rollback();
            release(shared, reserved_records, reserved_bytes);
            let msg = e.to_string();
            tracing::error!(error = %msg, ops = batch.len(), "outbox: commit failed");
            for op in batch.drain(..) {
                answer(op, Err(msg.clone()));
            }
        }
    }
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
    }
}

fn apply(
    conn: &Connection,
    op: &Op,
    delta: &mut Delta,
    shared: &Shared,
    state: &mut State,
) -> rusqlite::Result<Reply> {
    match op {
        Op::Enqueue {
            events,
            records,
            bytes,
            ..
        } => {
            let mut insert_event = conn.prepare_cached(INSERT_EVENT)?;
            let mut insert = conn.prepare_cached(INSERT)?;
            let now = super::now_ms();
            for e in events {
                if e.tags.is_empty() {
                    continue;
                }
                // Which tags' dispatchers take this event from memory (fresh, no row).
                let mut hot: u16 = 0;
                let mut lease_until = 0i64;
                for (k, tag) in e.tags.iter().enumerate().take(fresh::MAX_TAGS) {
                    let h = delta.handoff(tag, shared);
                    match &h.queue {
                        Some(q) if q.has_room(h.promised, 1) => {
                            h.promised += 1;
                            hot |= 1 << k;
                            lease_until =
                                now.saturating_add(i64::try_from(q.lease_ms()).unwrap_or(i64::MAX));
                        }
                        Some(_) => h.overflowed = true,
                        None => {}
                    }
                }
                for tag in e.tags.iter().skip(fresh::MAX_TAGS) {
                    delta.handoff(tag, shared).overflowed = true;
                }
                let column = if hot == 0 {
                    None
                } else {
                    state.column.clear();
                    let names: Vec<&str> = e
                        .tags
                        .iter()
                        .enumerate()
                        .filter(|(k, _)| hot & (1 << k) != 0)
                        .map(|(_, t)| &**t)
                        .collect();
                    serde_json::to_writer(&mut state.column, &names)
                        .map_err(|err| rusqlite::Error::ToSqlConversionFailure(err.into()))?;
                    std::str::from_utf8(&state.column).ok()
                };
                insert_event.execute(rusqlite::params![
                    e.event_id,
                    &e.payload[..],
                    column,
                    e.enqueued_at_ms
                ])?;
                let row = conn.last_insert_rowid();
                if fresh::id(row, 0).is_none() {
                    // Ids cannot name fresh deliveries of this row (never for SQLite's own
                    // row ids): every tag gets a delivery row.
                    conn.execute("UPDATE events SET fresh = NULL WHERE id = ?1", [row])?;
                    hot = 0;
                }
                for (k, tag) in e.tags.iter().enumerate() {
                    let fresh_id = if k < fresh::MAX_TAGS && hot & (1 << k) != 0 {
                        fresh::id(row, k)
                    } else {
                        None
                    };
                    match fresh_id {
                        Some(id) => delta.handoff(tag, shared).records.push(LeasedRecord {
                            id,
                            tag: tag.clone(),
                            event_id: e.event_id.clone(),
                            payload: e.payload.clone(),
                            event: e.event.clone(),
                            attempts: 0,
                            first_enqueued_ms: e.enqueued_at_ms,
                            last_error: None,
                            lease_until_ms: lease_until,
                        }),
                        None => {
                            insert.execute(rusqlite::params![&**tag, row, e.enqueued_at_ms])?;
                        }
                    }
                    match delta.enqueued.iter_mut().find(|(t, _)| t == tag) {
                        Some((_, n)) => *n += 1,
                        None => delta.enqueued.push((tag.clone(), 1)),
                    }
                }
                if hot != 0 {
                    state.fresh.insert(
                        row,
                        fresh::Entry {
                            tags: e.tags.iter().take(fresh::MAX_TAGS).cloned().collect(),
                            unsettled: hot,
                            enqueued_ms: e.enqueued_at_ms,
                            lease_until_ms: lease_until,
                            column_stale: false,
                        },
                    );
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
            let mut stmt = conn.prepare_cached(LEASE)?;
            let limit = i64::try_from(*limit).unwrap_or(i64::MAX);
            let rows = stmt.query_map(
                rusqlite::params![lease_until_ms, &**tag, now_ms, limit],
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
                    lease_until_ms: *lease_until_ms,
                });
            }
            Ok(Reply::Leased(out))
        }
        Op::Settle { settlement, .. } => {
            settle(conn, settlement, delta, &mut state.fresh)?;
            Ok(Reply::Settled)
        }
        Op::Release { leases, .. } => {
            let mut release = conn.prepare_cached(RELEASE)?;
            let mut after = FreshAfter::default();
            for &(id, until) in leases {
                if fresh::decode(id).is_some() {
                    // Still fresh means still as handed out: due again at once.
                    if let Some(t) = state.fresh.take(id) {
                        materialize(conn, &t, 0, t.enqueued_ms, None)?;
                        after.row_added(&t);
                    }
                } else {
                    release.execute([id, until])?;
                }
            }
            after.apply(conn, delta, &mut state.fresh)?;
            Ok(Reply::Settled)
        }
        Op::Close { .. } => Ok(Reply::Settled),
    }
}

fn settle(
    conn: &Connection,
    s: &Settlement,
    delta: &mut Delta,
    fresh_set: &mut FreshSet,
) -> rusqlite::Result<()> {
    let mut after = FreshAfter::default();
    // Delivery rows that go (acked or dead).
    let mut gone: Vec<Value> = Vec::with_capacity(s.ack.len());
    if !s.dead.is_empty() {
        // Copied out before their delivery rows or events go.
        let mut bury = conn.prepare_cached(BURY)?;
        let mut bury_fresh = conn.prepare_cached(BURY_FRESH)?;
        for d in &s.dead {
            if fresh::decode(d.id).is_none() {
                bury.execute(rusqlite::params![
                    d.id,
                    i64::from(d.attempted),
                    d.reason,
                    s.now_ms
                ])?;
                gone.push(Value::Integer(d.id));
            } else if let Some(t) = fresh_set.take(d.id) {
                bury_fresh.execute(rusqlite::params![
                    t.row,
                    &*t.tag,
                    i64::from(d.attempted),
                    t.enqueued_ms,
                    d.reason,
                    s.now_ms
                ])?;
                delta.records -= 1;
                after.settled(&t);
            }
            // A fresh id no longer fresh: its lease ended and it has a delivery row now,
            // which is sent again (at-least-once, as for any lease that ends).
        }
    }
    for &id in &s.ack {
        if fresh::decode(id).is_none() {
            gone.push(Value::Integer(id));
        } else if let Some(t) = fresh_set.take(id) {
            delta.records -= 1;
            after.settled(&t);
        }
    }
    if !gone.is_empty() {
        let mut rows: Vec<Value> = Vec::with_capacity(gone.len());
        {
            let mut ack = conn.prepare_cached(ACK)?;
            let mut found = ack.query([Rc::new(gone)])?;
            while let Some(r) = found.next()? {
                delta.records -= 1;
                let row: i64 = r.get(0)?;
                // An event with fresh deliveries still out goes with the last of them.
                if !fresh_set.contains(row) {
                    rows.push(Value::Integer(row));
                }
            }
        }
        let mut drop_events = conn.prepare_cached(DROP_EVENTS)?;
        let mut freed = drop_events.query([Rc::new(rows)])?;
        while let Some(r) = freed.next()? {
            delta.bytes -= r.get::<_, i64>(0)?;
        }
    }
    if !s.nack.is_empty() {
        let mut nack = conn.prepare_cached(NACK)?;
        for n in &s.nack {
            if fresh::decode(n.id).is_none() {
                nack.execute(rusqlite::params![n.id, n.next_attempt_ms, n.error])?;
            } else if let Some(t) = fresh_set.take(n.id) {
                materialize(conn, &t, 1, n.next_attempt_ms, Some(&n.error))?;
                after.row_added(&t);
            }
        }
    }
    after.apply(conn, delta, fresh_set)
}

/// Writes a delivery row for fresh delivery `t`.
fn materialize(
    conn: &Connection,
    t: &fresh::Taken,
    attempts: i64,
    next_attempt_ms: i64,
    last_error: Option<&str>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(MATERIALIZE)?
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

/// What settling fresh deliveries leaves to do to their event rows, done once per row.
#[derive(Default)]
struct FreshAfter {
    /// Every fresh delivery settled: the event goes unless a delivery row needs it.
    settled: Vec<i64>,
    /// Some fresh deliveries remain but the column must lose those that got rows (a
    /// restart must not make them due a second time).
    rewrite: Vec<i64>,
    /// No fresh delivery remains and some got rows: the column is cleared.
    clear: Vec<i64>,
}

impl FreshAfter {
    fn settled(&mut self, t: &fresh::Taken) {
        if t.last {
            self.settled.push(t.row);
        }
    }

    fn row_added(&mut self, t: &fresh::Taken) {
        if t.last {
            self.clear.push(t.row);
        } else {
            self.rewrite.push(t.row);
        }
    }

    fn apply(
        mut self,
        conn: &Connection,
        delta: &mut Delta,
        fresh_set: &mut FreshSet,
    ) -> rusqlite::Result<()> {
        if !self.settled.is_empty() {
            let rows: Vec<Value> = self.settled.iter().map(|&r| Value::Integer(r)).collect();
            let mut dropped = Vec::with_capacity(self.settled.len());
            let mut drop = conn.prepare_cached(DROP_SETTLED)?;
            let mut freed = drop.query([Rc::new(rows)])?;
            while let Some(r) = freed.next()? {
                dropped.push(r.get::<_, i64>(0)?);
                delta.bytes -= r.get::<_, i64>(1)?;
            }
            dropped.sort_unstable();
            // Kept for their delivery rows: their column must not outlive the process.
            self.clear.extend(
                self.settled
                    .iter()
                    .filter(|r| dropped.binary_search(r).is_err()),
            );
        }
        self.rewrite.sort_unstable();
        self.rewrite.dedup();
        if !self.rewrite.is_empty() {
            let mut set = conn.prepare_cached(SET_FRESH)?;
            for &row in &self.rewrite {
                // Gone from the set: a later settlement in this batch took its last tag.
                if fresh_set.contains(row) {
                    set.execute(rusqlite::params![row, fresh_set.rewrite(row)])?;
                } else if !self.clear.contains(&row) {
                    self.clear.push(row);
                }
            }
        }
        if !self.clear.is_empty() {
            let rows: Vec<Value> = self.clear.iter().map(|&r| Value::Integer(r)).collect();
            conn.prepare_cached(CLEAR_FRESH)?.execute([Rc::new(rows)])?;
        }
        Ok(())
    }
}

/// Fresh deliveries whose lease ended get delivery rows, due at once, like any lease that
/// ends: their dispatcher may have died or hung.
fn end_expired_leases(
    conn: &Connection,
    fresh_set: &mut FreshSet,
    now_ms: i64,
) -> rusqlite::Result<()> {
    let expired = fresh_set.expire(now_ms);
    if expired.is_empty() {
        return Ok(());
    }
    let mut rows = Vec::with_capacity(expired.len());
    for (row, entry) in &expired {
        for tag in entry.remaining() {
            let t = fresh::Taken {
                row: *row,
                tag: tag.clone(),
                enqueued_ms: entry.enqueued_ms,
                last: false,
            };
            materialize(conn, &t, 0, entry.lease_until_ms, None)?;
        }
        rows.push(Value::Integer(*row));
    }
    tracing::warn!(
        events = expired.len(),
        "outbox: in-memory leases ended before their deliveries were settled; they are due again"
    );
    conn.prepare_cached(CLEAR_FRESH)?.execute([Rc::new(rows)])?;
    Ok(())
}

/// At a clean close: rows whose column still lists settled tags are rewritten.
fn rewrite_stale_columns(conn: &Connection, fresh_set: &mut FreshSet) -> rusqlite::Result<()> {
    let stale = fresh_set.stale_columns();
    if stale.is_empty() {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let mut set = conn.prepare_cached(SET_FRESH)?;
        for (row, column) in &stale {
            set.execute(rusqlite::params![row, column])?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            fresh_set.commit();
            conn.execute_batch("COMMIT")
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            fresh_set.rollback();
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
    fn one_op_always_goes_however_big() {
        let mut deferred: VecDeque<Op> = [settle_op(5_000)].into_iter().collect();
        let mut batch = Vec::new();
        admit(&mut deferred, dispatch_budget(1, false, 4096), &mut batch);
        assert_eq!(batch.len(), 1);
    }
}
