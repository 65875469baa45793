//! The embedded stitching store: its own SQLite database (WAL), owned by one thread that
//! takes commands from a bounded queue. The hit path only `try_send`s session records to it;
//! webhook requests await their lookups and claims through the same queue, so a lookup sees
//! every record handed over before it. Records are batched into one transaction per wake-up
//! and committed without fsync (`synchronous = NORMAL`): a crash loses at most the last
//! moments of sessions (those orders go out unstitched), never an order.
//!
//! Claims in flight live in the thread's memory: a claim whose holder crashed is free again
//! when the process restarts. Committed claims are rows kept for the dedup window.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

pub use super::Limits;
use super::{
    email_hash, Claim, Forget, Found, OrderLedger, SessionRecord, SessionSnapshot, SessionStore,
    StoreError, StoreKey,
};

/// Commands waiting for the store thread; past this, session records are dropped (counted)
/// and webhook requests wait for room.
const QUEUE: usize = 16_384;
/// Commands taken per wake-up (session records share one transaction).
const BATCH: usize = 512;
/// How often expired sessions, stale dedup rows and sessions over `max_records` are deleted.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stitch_sessions (
    key TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    client_id TEXT,
    email TEXT,
    recorded_ms INTEGER NOT NULL,
    snapshot TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS stitch_sessions_client ON stitch_sessions(client_id);
CREATE INDEX IF NOT EXISTS stitch_sessions_email ON stitch_sessions(email);
CREATE INDEX IF NOT EXISTS stitch_sessions_recorded ON stitch_sessions(recorded_ms);
CREATE TABLE IF NOT EXISTS stitch_orders (
    key TEXT PRIMARY KEY,
    sent_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS stitch_orders_sent ON stitch_orders(sent_ms);
";

enum Cmd {
    Record(Vec<SessionRecord>),
    Find {
        keys: Vec<StoreKey>,
        now_ms: i64,
        reply: oneshot::Sender<Result<Option<Found>, String>>,
    },
    Claim {
        key: String,
        now_ms: i64,
        reply: oneshot::Sender<Result<Claim, String>>,
    },
    Settle {
        keys: Vec<String>,
        sent: bool,
        now_ms: i64,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Forget {
        who: Forget,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    Purge {
        now_ms: i64,
        reply: Option<oneshot::Sender<()>>,
    },
    /// Answers once everything sent before is written.
    Flush(oneshot::Sender<()>),
    Close(oneshot::Sender<()>),
}

/// The embedded [`SessionStore`] and [`OrderLedger`].
pub struct EmbeddedStitchStore {
    tx: mpsc::Sender<Cmd>,
    ticker: Mutex<Option<tokio::task::JoinHandle<()>>>,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedStitchStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStitchStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Opens (creating) the database with the schema.
pub fn open_db(path: &Path) -> Result<Connection, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let conn =
        Connection::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))
        .and_then(|_| conn.pragma_update(None, "journal_mode", "WAL"))
        .and_then(|_| conn.pragma_update(None, "synchronous", "NORMAL"))
        .and_then(|_| conn.execute_batch(SCHEMA))
        .map_err(|e| format!("cannot prepare {}: {e}", path.display()))?;
    Ok(conn)
}

impl EmbeddedStitchStore {
    /// Opens the store and starts its thread (and, inside a Tokio runtime, its purge timer).
    pub fn open(path: &Path, limits: Limits) -> Result<EmbeddedStitchStore, String> {
        let conn = open_db(path)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("tagrelay-stitching".into())
            .spawn(move || run(conn, rx, limits))
            .map_err(|e| format!("cannot start the stitching thread: {e}"))?;
        let ticker = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let tx = tx.clone();
            rt.spawn(async move {
                let start = tokio::time::Instant::now() + PURGE_INTERVAL;
                let mut every = tokio::time::interval_at(start, PURGE_INTERVAL);
                loop {
                    every.tick().await;
                    let now_ms = crate::clock::now_ms();
                    if tx
                        .send(Cmd::Purge {
                            now_ms,
                            reply: None,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            })
        });
        Ok(EmbeddedStitchStore {
            tx,
            ticker: Mutex::new(ticker),
            path: path.to_owned(),
        })
    }

    async fn ask<T>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Cmd,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(cmd(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Closed)?
            .map_err(StoreError::Io)
    }

    /// Waits until everything handed over before is written.
    pub async fn flush(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Cmd::Flush(reply)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Deletes what retention and the size cap say must go, now.
    pub async fn purge(&self, now_ms: i64) {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Cmd::Purge {
                now_ms,
                reply: Some(reply),
            })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// Writes what is queued and stops the thread.
    pub async fn close(&self) {
        if let Some(t) = self.ticker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Cmd::Close(reply)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

#[async_trait]
impl SessionStore for EmbeddedStitchStore {
    fn record(&self, records: Vec<SessionRecord>) {
        let n = records.len() as u64;
        match self.tx.try_send(Cmd::Record(records)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("tagrelay_stitch_sessions_dropped_total", "reason" => "queue_full")
                    .increment(n);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                metrics::counter!("tagrelay_stitch_sessions_dropped_total", "reason" => "closed")
                    .increment(n);
            }
        }
    }

    async fn find(&self, keys: &[StoreKey], now_ms: i64) -> Result<Option<Found>, StoreError> {
        let keys = keys.to_vec();
        self.ask(|reply| Cmd::Find {
            keys,
            now_ms,
            reply,
        })
        .await
    }

    async fn forget(&self, who: &Forget) -> Result<u64, StoreError> {
        let who = who.clone();
        self.ask(|reply| Cmd::Forget { who, reply }).await
    }
}

#[async_trait]
impl OrderLedger for EmbeddedStitchStore {
    async fn claim(&self, key: &str, now_ms: i64) -> Result<Claim, StoreError> {
        let key = key.to_owned();
        self.ask(|reply| Cmd::Claim { key, now_ms, reply }).await
    }

    async fn settle(&self, keys: &[String], sent: bool, now_ms: i64) -> Result<(), StoreError> {
        let keys = keys.to_vec();
        self.ask(|reply| Cmd::Settle {
            keys,
            sent,
            now_ms,
            reply,
        })
        .await
    }
}

/// The store thread: takes commands in order, session records batched into one transaction.
fn run(conn: Connection, mut rx: mpsc::Receiver<Cmd>, limits: Limits) {
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut batch: Vec<Cmd> = Vec::with_capacity(BATCH);
    let mut records: Vec<SessionRecord> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        for cmd in batch.drain(..) {
            if let Cmd::Record(r) = cmd {
                records.extend(r);
                continue;
            }
            // Everything recorded before a lookup is visible to it.
            write_records(&conn, &mut records);
            match cmd {
                Cmd::Record(_) => {}
                Cmd::Find {
                    keys,
                    now_ms,
                    reply,
                } => {
                    let _ = reply.send(find(&conn, &keys, now_ms - limits.ttl_ms));
                }
                Cmd::Claim { key, now_ms, reply } => {
                    let r = claim(&conn, &mut in_flight, key, now_ms - limits.dedup_window_ms);
                    let _ = reply.send(r);
                }
                Cmd::Settle {
                    keys,
                    sent,
                    now_ms,
                    reply,
                } => {
                    let r = if sent {
                        commit(&conn, &keys, now_ms)
                    } else {
                        Ok(())
                    };
                    for k in &keys {
                        in_flight.remove(k);
                    }
                    let _ = reply.send(r);
                }
                Cmd::Forget { who, reply } => {
                    let _ = reply.send(forget(&conn, &who));
                }
                Cmd::Purge { now_ms, reply } => {
                    if let Err(e) = purge(&conn, now_ms, &limits) {
                        tracing::warn!(error = %e, "stitching store: purge failed; retried in a minute");
                    }
                    if let Some(r) = reply {
                        let _ = r.send(());
                    }
                }
                Cmd::Flush(reply) => {
                    let _ = reply.send(());
                }
                Cmd::Close(reply) => {
                    let _ = reply.send(());
                    return;
                }
            }
        }
        write_records(&conn, &mut records);
    }
}

fn sql_err(e: rusqlite::Error) -> String {
    e.to_string()
}

/// Upserts the records' keys in one transaction; a key keeps its newest session.
fn write_records(conn: &Connection, records: &mut Vec<SessionRecord>) {
    if records.is_empty() {
        return;
    }
    let n: usize = records.iter().map(|r| r.keys.len()).sum();
    let result = (|| -> Result<(), rusqlite::Error> {
        let tx = conn.unchecked_transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO stitch_sessions (key, label, client_id, email, recorded_ms, snapshot)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(key) DO UPDATE SET label = excluded.label,
                     client_id = excluded.client_id, email = excluded.email,
                     recorded_ms = excluded.recorded_ms, snapshot = excluded.snapshot
                 WHERE excluded.recorded_ms >= stitch_sessions.recorded_ms",
            )?;
            for r in records.iter() {
                let snapshot = serde_json::to_string(&r.snapshot).unwrap_or_default();
                for (key, label) in &r.keys {
                    stmt.execute(params![
                        key.as_str(),
                        label.as_str(),
                        r.client_id,
                        r.email,
                        r.snapshot.recorded_ms,
                        snapshot
                    ])?;
                }
            }
        }
        tx.commit()
    })();
    match result {
        Ok(()) => {
            metrics::counter!("tagrelay_stitch_sessions_recorded_total").increment(n as u64);
        }
        Err(e) => {
            metrics::counter!("tagrelay_stitch_sessions_dropped_total", "reason" => "store_error")
                .increment(n as u64);
            tracing::warn!(error = %e, keys = n, "stitching store: sessions not recorded; their orders will go out unstitched");
        }
    }
    records.clear();
}

fn find(conn: &Connection, keys: &[StoreKey], cutoff_ms: i64) -> Result<Option<Found>, String> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT label, snapshot FROM stitch_sessions WHERE key = ?1 AND recorded_ms >= ?2",
        )
        .map_err(sql_err)?;
    for (index, key) in keys.iter().enumerate() {
        let row: Option<(String, String)> = stmt
            .query_row(params![key.as_str(), cutoff_ms], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(sql_err)?;
        if let Some((label, snapshot)) = row {
            match serde_json::from_str::<SessionSnapshot>(&snapshot) {
                Ok(snapshot) => {
                    return Ok(Some(Found {
                        index,
                        label: label.into(),
                        snapshot,
                    }))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stitching store: an unreadable session was skipped")
                }
            }
        }
    }
    Ok(None)
}

fn claim(
    conn: &Connection,
    in_flight: &mut HashSet<String>,
    key: String,
    cutoff_ms: i64,
) -> Result<Claim, String> {
    if in_flight.contains(&key) {
        return Ok(Claim::Busy);
    }
    let sent: Option<i64> = conn
        .query_row(
            "SELECT sent_ms FROM stitch_orders WHERE key = ?1 AND sent_ms >= ?2",
            params![key, cutoff_ms],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql_err)?;
    if let Some(at_ms) = sent {
        return Ok(Claim::Done { at_ms });
    }
    in_flight.insert(key);
    Ok(Claim::Fresh)
}

fn commit(conn: &Connection, keys: &[String], now_ms: i64) -> Result<(), String> {
    let tx = conn.unchecked_transaction().map_err(sql_err)?;
    for k in keys {
        tx.execute(
            "INSERT INTO stitch_orders (key, sent_ms) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET sent_ms = excluded.sent_ms",
            params![k, now_ms],
        )
        .map_err(sql_err)?;
    }
    tx.commit().map_err(sql_err)
}

/// Erases a person's sessions: those under (or carrying) their email's hash and every
/// session of the client ids found there; or every session of a client id.
pub fn forget(conn: &Connection, who: &Forget) -> Result<u64, String> {
    let tx = conn.unchecked_transaction().map_err(sql_err)?;
    let mut n = 0u64;
    match who {
        Forget::ClientId(cid) => {
            n += tx
                .execute(
                    "DELETE FROM stitch_sessions WHERE client_id = ?1",
                    params![cid],
                )
                .map_err(sql_err)? as u64;
        }
        Forget::Email(email) => {
            let Some(hash) = email_hash(email) else {
                return Err(format!("`{email}` is not an email address"));
            };
            let key = format!("e:{hash}");
            let clients: Vec<String> = {
                let mut stmt = tx
                    .prepare(
                        "SELECT DISTINCT client_id FROM stitch_sessions
                         WHERE (email = ?1 OR key = ?2) AND client_id IS NOT NULL",
                    )
                    .map_err(sql_err)?;
                let rows = stmt
                    .query_map(params![hash, key], |r| r.get(0))
                    .map_err(sql_err)?;
                rows.collect::<Result<_, _>>().map_err(sql_err)?
            };
            n += tx
                .execute(
                    "DELETE FROM stitch_sessions WHERE email = ?1 OR key = ?2",
                    params![hash, key],
                )
                .map_err(sql_err)? as u64;
            for cid in clients {
                n += tx
                    .execute(
                        "DELETE FROM stitch_sessions WHERE client_id = ?1",
                        params![cid],
                    )
                    .map_err(sql_err)? as u64;
            }
        }
    }
    tx.commit().map_err(sql_err)?;
    Ok(n)
}

/// Deletes expired sessions and dedup rows, then the oldest sessions over `max_records`.
fn purge(conn: &Connection, now_ms: i64, limits: &Limits) -> Result<(), String> {
    let expired = conn
        .execute(
            "DELETE FROM stitch_sessions WHERE recorded_ms < ?1",
            params![now_ms - limits.ttl_ms],
        )
        .map_err(sql_err)?;
    conn.execute(
        "DELETE FROM stitch_orders WHERE sent_ms < ?1",
        params![now_ms - limits.dedup_window_ms],
    )
    .map_err(sql_err)?;
    let count: i64 = conn
        .query_row("SELECT count(*) FROM stitch_sessions", [], |r| r.get(0))
        .map_err(sql_err)?;
    let over = u64::try_from(count)
        .unwrap_or(0)
        .saturating_sub(limits.max_records);
    let mut evicted = 0;
    if over > 0 {
        evicted = conn
            .execute(
                "DELETE FROM stitch_sessions WHERE key IN
                 (SELECT key FROM stitch_sessions ORDER BY recorded_ms LIMIT ?1)",
                params![i64::try_from(over).unwrap_or(i64::MAX)],
            )
            .map_err(sql_err)?;
    }
    if expired + evicted > 0 {
        metrics::counter!("tagrelay_stitch_sessions_purged_total")
            .increment((expired + evicted) as u64);
    }
    Ok(())
}
