//! The embedded store's database: file names, the schema and its version, and the queries that
//! the store, its writer thread and the operator tools share.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

use super::fresh::Gauge;
use crate::outbox::TagBacklog;

/// The database file inside `[outbox] path`.
pub const DB_FILE: &str = "outbox.sqlite3";
/// The outbox log's directory, inside `[outbox] path` (see `log`).
pub const LOG_DIR: &str = "log";
/// Version 4 writes payloads as MessagePack (see `Event::to_payload`); its tables are version
/// 3's, and version 3's JSON payloads are still read. The bump is for the other direction: a
/// tagrelay from before reads JSON only and would dead-letter every MessagePack event, so it
/// refuses the store instead ("written by a newer tagrelay").
///
/// Version 5 keeps hits' events in the outbox log (`<path>/log/`, see `log`) until a tag needs
/// them in SQLite; its tables are version 4's. A tagrelay from before would not read the log
/// and would lose the first deliveries still owed from it, so it refuses the store.
pub(crate) const SCHEMA_VERSION: i64 = 5;
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

// Version 2 keeps each event's payload once (`events`) and one small delivery row per tag
// (`pending`): a hit firing two tags writes its ~1 KB payload once, and leases, retries and
// acks touch only the small rows. Version 3 adds `events.fresh`, the tags an event owes a
// first delivery to, read by each tag in row order from its position in `cursors`; delivery
// rows are left for retries (see `fresh`).
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    fresh TEXT,
    enqueued_ms INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tag TEXT NOT NULL,
    event_row INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    first_enqueued_ms INTEGER NOT NULL,
    last_error TEXT,
    lease_until_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS pending_due ON pending (tag, next_attempt_ms);
CREATE INDEX IF NOT EXISTS pending_event ON pending (event_row);
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
CREATE INDEX IF NOT EXISTS dead_by_time ON dead_letters (dead_at_ms);
CREATE TABLE IF NOT EXISTS outbox_totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    records INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    tag TEXT PRIMARY KEY,
    committed_row INTEGER NOT NULL
);
";

/// Columns version 3 added to tables that older versions already have.
pub(crate) const V3_COLUMNS: [(&str, &str, &str); 2] = [
    ("events", "fresh", "TEXT"),
    ("events", "enqueued_ms", "INTEGER NOT NULL DEFAULT 0"),
];

/// Per tag: first deliveries waiting from its position on, and the oldest one's time.
pub(crate) const WAITING: &str = "
SELECT c.tag, count(e.id), min(e.enqueued_ms)
FROM cursors c JOIN events e ON e.id >= c.committed_row AND e.fresh IS NOT NULL
JOIN json_each(e.fresh) j ON j.value = c.tag
WHERE json_valid(e.fresh) AND e.id < ?1
  AND NOT EXISTS (SELECT 1 FROM pending p WHERE p.event_row = e.id AND p.tag = c.tag)
GROUP BY c.tag";

/// `(tag, row)` of delivery rows at or past their tag's written position: a tag resuming
/// from there must not hand those deliveries out again from the event row.
pub(crate) fn rows_with_delivery_rows(conn: &Connection) -> rusqlite::Result<Vec<(Arc<str>, i64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT p.tag, p.event_row FROM pending p JOIN cursors c ON c.tag = p.tag
         WHERE p.event_row >= c.committed_row",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((Arc::from(r.get::<_, String>(0)?.as_str()), r.get(1)?))
    })?;
    rows.collect()
}

/// `(tag, deliveries waiting in `events` below row `below` from its written position, oldest
/// enqueued_ms)`; nothing for a store an older tagrelay wrote (the CLI reads stores without
/// migrating them).
pub(crate) fn waiting(
    conn: &Connection,
    below: i64,
) -> rusqlite::Result<Vec<(String, u64, Option<i64>)>> {
    let has_cursors: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'cursors'",
        [],
        |r| r.get(0),
    )?;
    if has_cursors == 0 {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached(WAITING)?;
    let rows = stmt.query_map([below], |r| {
        Ok((
            r.get::<_, String>(0)?,
            u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
            r.get::<_, Option<i64>>(2)?,
        ))
    })?;
    rows.collect()
}

/// Version 1 stored the payload in every pending row: its table steps aside before
/// [`SCHEMA`] creates version 2's, then [`MIGRATE_V1_COPY`] moves the rows over.
pub(crate) const MIGRATE_V1_ASIDE: &str = "
ALTER TABLE pending RENAME TO pending_v1;
DROP INDEX IF EXISTS pending_due;
";

/// Each version-1 row becomes one event and one delivery with the same id; the totals are
/// recomputed (bytes now count payloads once).
pub(crate) const MIGRATE_V1_COPY: &str = "
INSERT INTO events (id, event_id, payload) SELECT id, event_id, payload FROM pending_v1;
INSERT INTO pending (id, tag, event_row, attempts, next_attempt_ms, first_enqueued_ms, last_error, lease_until_ms)
    SELECT id, tag, id, attempts, next_attempt_ms, first_enqueued_ms, last_error, lease_until_ms FROM pending_v1;
DROP TABLE pending_v1;
DELETE FROM outbox_totals;
";

/// A log row copied into `events` (see `log_state`), with the tags it owes first deliveries
/// to (`fresh`, ?4), so that SQLite's queries about it work as for any row.
pub(crate) const INSERT_COPY: &str =
    "INSERT OR IGNORE INTO events (id, event_id, payload, fresh, enqueued_ms)
     VALUES (?1, ?2, ?3, ?4, ?5)";

/// Each tag's written position (see `fresh`).
pub(crate) fn positions(conn: &Connection) -> rusqlite::Result<HashMap<String, i64>> {
    conn.prepare("SELECT tag, committed_row FROM cursors")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}

/// Pending work per tag. `live`: the running writer's gauges of first deliveries (waiting
/// and out); without them (the CLI, on the files) the waiting ones are counted from each
/// tag's committed position.
pub(crate) fn backlog(
    conn: &Connection,
    now_ms: i64,
    live: Option<&[Gauge]>,
) -> rusqlite::Result<Vec<TagBacklog>> {
    let mut stmt = conn.prepare_cached(
        "SELECT tag, count(*), sum(lease_until_ms > ?1), min(first_enqueued_ms)
         FROM pending GROUP BY tag ORDER BY tag",
    )?;
    let mut by_tag: std::collections::BTreeMap<String, TagBacklog> = stmt
        .query_map([now_ms], |r| {
            Ok(TagBacklog {
                tag: r.get(0)?,
                pending: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                leased: u64::try_from(r.get::<_, Option<i64>>(2)?.unwrap_or(0)).unwrap_or(0),
                oldest_enqueued_ms: r.get(3)?,
            })
        })?
        .map(|b| b.map(|b| (b.tag.clone(), b)))
        .collect::<rusqlite::Result<_>>()?;
    let mut add = |tag: &str, waiting: u64, out: u64, oldest: Option<i64>| {
        if waiting + out == 0 {
            return;
        }
        let b = by_tag.entry(tag.to_string()).or_insert_with(|| TagBacklog {
            tag: tag.to_string(),
            pending: 0,
            leased: 0,
            oldest_enqueued_ms: None,
        });
        b.pending += waiting + out;
        b.leased += out;
        b.oldest_enqueued_ms = match (b.oldest_enqueued_ms, oldest) {
            (Some(a), Some(o)) => Some(a.min(o)),
            (a, o) => a.or(o),
        };
    };
    match live {
        Some(gauges) => {
            for (tag, waiting, out, oldest) in gauges {
                add(tag, *waiting, *out, *oldest);
            }
        }
        None => {
            for (tag, n, oldest) in waiting(conn, i64::MAX)? {
                add(&tag, n, 0, oldest);
            }
        }
    }
    Ok(by_tag.into_values().collect())
}
