//! Operator tools over an outbox directory (`[outbox] path`): stats, dead letters, replay.
//!
//! Each call opens its own connection with a busy timeout, so the tools work while the
//! server runs (SQLite serialises the writes; WAL lets reads proceed alongside). A replay
//! made while the server runs is picked up by its dispatchers within their idle poll (1 s).

use std::fmt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

use super::schema::{BUSY_TIMEOUT, DB_FILE, LOG_DIR};
use crate::clock::now_ms;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("no outbox at `{0}` (expected the file {DB_FILE} in the `[outbox] path` directory)")]
    Missing(PathBuf),
    #[error("outbox `{path}`: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("outbox log `{path}`: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Backlog of one tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TagStats {
    pub tag: String,
    pub pending: u64,
    /// In flight right now (part of `pending`).
    pub leased: u64,
    /// Age of the oldest pending record, in seconds.
    pub oldest_age_secs: Option<u64>,
    pub dead_letters: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub tags: Vec<TagStats>,
    pub pending: u64,
    pub dead_letters: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<24} {:>10} {:>8} {:>12} {:>12}",
            "TAG", "PENDING", "LEASED", "OLDEST", "DEAD"
        )?;
        for t in &self.tags {
            let oldest = t
                .oldest_age_secs
                .map(|s| crate::text::human_duration(std::time::Duration::from_secs(s)))
                .unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "{:<24} {:>10} {:>8} {:>12} {:>12}",
                t.tag, t.pending, t.leased, oldest, t.dead_letters
            )?;
        }
        write!(
            f,
            "total: {} pending, {} dead letters",
            self.pending, self.dead_letters
        )
    }
}

/// One dead-lettered record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub tag: String,
    pub event_id: String,
    /// From the stored event, when it parses.
    pub event_name: Option<String>,
    pub attempts: u32,
    pub first_enqueued_ms: i64,
    pub dead_at_ms: i64,
    /// `first_enqueued_ms` and `dead_at_ms` as RFC 3339 UTC, for people.
    pub first_enqueued_at: String,
    pub dead_at: String,
    pub reason: String,
    pub last_error: Option<String>,
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC (`2026-11-29T10:04:05.123Z`).
fn utc(ms: i64) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms} ms since 1970"))
}

impl fmt::Display for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} tag={} event_id={} event={} attempts={} enqueued={} dead_at={} reason: {}",
            self.id,
            self.tag,
            self.event_id,
            self.event_name.as_deref().unwrap_or("?"),
            self.attempts,
            self.first_enqueued_at,
            self.dead_at,
            self.reason
        )
    }
}

/// The database file of an outbox directory.
pub fn db_file(dir: &Path) -> PathBuf {
    dir.join(DB_FILE)
}

fn open(dir: &Path) -> Result<(Connection, PathBuf), ToolError> {
    let path = db_file(dir);
    if !path.is_file() {
        return Err(ToolError::Missing(path));
    }
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .and_then(|c| c.busy_timeout(BUSY_TIMEOUT).map(|_| c))
    .map_err(|source| ToolError::Sqlite {
        path: path.clone(),
        source,
    })?;
    Ok((conn, path))
}

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> ToolError + '_ {
    move |source| ToolError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// Pending and dead-letter counts per tag.
pub fn stats(dir: &Path) -> Result<Stats, ToolError> {
    let (conn, path) = open(dir)?;
    let err = sql_err(&path);
    let now = now_ms();
    let mut pending = super::schema::backlog(&conn, now, None).map_err(&err)?;
    for (tag, n, oldest) in owed_in_log(dir, &conn)? {
        let i = match pending.iter().position(|b| b.tag == tag) {
            Some(i) => i,
            None => {
                pending.push(super::TagBacklog {
                    tag,
                    pending: 0,
                    leased: 0,
                    oldest_enqueued_ms: None,
                });
                pending.len() - 1
            }
        };
        if let Some(b) = pending.get_mut(i) {
            b.pending += n;
            b.oldest_enqueued_ms = match (b.oldest_enqueued_ms, oldest) {
                (Some(a), Some(o)) => Some(a.min(o)),
                (a, o) => a.or(o),
            };
        }
    }
    let mut dead: Vec<(String, u64)> = {
        let mut stmt = conn
            .prepare("SELECT tag, count(*) FROM dead_letters GROUP BY tag")
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                ))
            })
            .map_err(&err)?;
        rows.collect::<Result<_, _>>().map_err(&err)?
    };
    let mut tags: Vec<TagStats> = pending
        .into_iter()
        .map(|b| TagStats {
            dead_letters: 0,
            oldest_age_secs: b
                .oldest_enqueued_ms
                .map(|t| u64::try_from(now.saturating_sub(t)).unwrap_or(0) / 1000),
            tag: b.tag,
            pending: b.pending,
            leased: b.leased,
        })
        .collect();
    for (tag, n) in dead.drain(..) {
        match tags.iter_mut().find(|t| t.tag == tag) {
            Some(t) => t.dead_letters = n,
            None => tags.push(TagStats {
                tag,
                pending: 0,
                leased: 0,
                oldest_age_secs: None,
                dead_letters: n,
            }),
        }
    }
    tags.sort_by(|a, b| a.tag.cmp(&b.tag));
    Ok(Stats {
        pending: tags.iter().map(|t| t.pending).sum(),
        dead_letters: tags.iter().map(|t| t.dead_letters).sum(),
        tags,
    })
}

/// `(tag, first deliveries owed from the outbox log, oldest enqueued_ms)`: frames at or past
/// the tag's written position that have no copy in `events` (a copy is counted from there).
/// While the server runs this counts deliveries out in memory too, as owed.
fn owed_in_log(
    dir: &Path,
    conn: &Connection,
) -> Result<Vec<(String, u64, Option<i64>)>, ToolError> {
    let path = dir.join(LOG_DIR);
    if !path.is_dir() {
        return Ok(Vec::new());
    }
    let log_err = |source| ToolError::Log {
        path: path.clone(),
        source,
    };
    // A running server may delete a file between the listing and the open: list again.
    let log = match super::log::Log::open_read_only(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            super::log::Log::open_read_only(&path)
        }
        other => other,
    }
    .map_err(log_err)?;
    let db = db_file(dir);
    let err = sql_err(&db);
    let positions = super::schema::positions(conn).map_err(&err)?;
    let mut owed: std::collections::BTreeMap<String, (u64, Option<i64>)> = Default::default();
    let mut copied = conn
        .prepare("SELECT 1 FROM events WHERE id = ?1")
        .map_err(&err)?;
    for f in log.frames(None) {
        let f = f.map_err(log_err)?;
        let Some(tags) = f.tag_list() else {
            continue;
        };
        let due: Vec<_> = tags
            .iter()
            .filter(|t| positions.get(&***t).is_none_or(|&p| p <= f.row))
            .collect();
        if due.is_empty() || copied.exists([f.row]).map_err(&err)? {
            continue;
        }
        for t in due {
            let o = owed.entry(t.to_string()).or_default();
            o.0 += 1;
            o.1 = Some(o.1.map_or(f.enqueued_ms, |m| m.min(f.enqueued_ms)));
        }
    }
    Ok(owed.into_iter().map(|(t, (n, o))| (t, n, o)).collect())
}

#[derive(serde::Deserialize)]
struct EventName {
    event_name: Option<String>,
}

/// The most recent dead letters (newest first), optionally of one tag.
pub fn dead_letters(
    dir: &Path,
    tag: Option<&str>,
    limit: usize,
) -> Result<Vec<DeadLetter>, ToolError> {
    let (conn, path) = open(dir)?;
    let err = sql_err(&path);
    let mut stmt = conn
        .prepare(
            "SELECT id, tag, event_id, payload, attempts, first_enqueued_ms, dead_at_ms, reason, last_error
             FROM dead_letters WHERE ?1 IS NULL OR tag = ?1 ORDER BY id DESC LIMIT ?2",
        )
        .map_err(&err)?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt
        .query_map(rusqlite::params![tag, limit], |r| {
            let payload: Vec<u8> = r.get(3)?;
            let (first_enqueued_ms, dead_at_ms) = (r.get(5)?, r.get(6)?);
            Ok(DeadLetter {
                id: r.get(0)?,
                tag: r.get(1)?,
                event_id: r.get(2)?,
                event_name: crate::event::decode_payload::<EventName>(&payload)
                    .ok()
                    .and_then(|e| e.event_name),
                attempts: u32::try_from(r.get::<_, i64>(4)?).unwrap_or(u32::MAX),
                first_enqueued_ms,
                dead_at_ms,
                first_enqueued_at: utc(first_enqueued_ms),
                dead_at: utc(dead_at_ms),
                reason: r.get(7)?,
                last_error: r.get(8)?,
            })
        })
        .map_err(&err)?;
    rows.collect::<Result<_, _>>().map_err(err)
}

/// Moves dead letters (of one tag, or all) back to pending, due now, with attempts reset and
/// a fresh retry window. Returns how many were moved.
pub fn replay(dir: &Path, tag: Option<&str>) -> Result<usize, ToolError> {
    // Chunks of short transactions: one long write transaction over a big dead-letter table
    // would block the running server's group commits past their busy timeout.
    const CHUNK: i64 = 1_000;
    let (mut conn, path) = open(dir)?;
    let err = sql_err(&path);
    let now = now_ms();
    let mut moved = 0usize;
    loop {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&err)?;
        tx.execute(
            "CREATE TEMP TABLE IF NOT EXISTS replay_batch (id INTEGER PRIMARY KEY)",
            [],
        )
        .map_err(&err)?;
        tx.execute("DELETE FROM replay_batch", []).map_err(&err)?;
        tx.execute(
            "INSERT INTO replay_batch (id) SELECT id FROM dead_letters
             WHERE ?1 IS NULL OR tag = ?1 ORDER BY id LIMIT ?2",
            rusqlite::params![tag, CHUNK],
        )
        .map_err(&err)?;
        let (count, bytes): (i64, i64) = tx
            .query_row(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM dead_letters
                 WHERE id IN (SELECT id FROM replay_batch)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(&err)?;
        if count == 0 {
            tx.commit().map_err(&err)?;
            return Ok(moved);
        }
        {
            // Each dead letter carries its own copy of the event: it becomes one event and
            // one delivery again.
            let mut rows = tx
                .prepare(
                    "SELECT id FROM dead_letters WHERE id IN (SELECT id FROM replay_batch) ORDER BY id",
                )
                .map_err(&err)?;
            let ids = rows
                .query_map([], |r| r.get::<_, i64>(0))
                .map_err(&err)?
                .collect::<Result<Vec<i64>, _>>()
                .map_err(&err)?;
            // Below every id the server gives (those start at 1 and may be held in the
            // outbox log rather than in `events`): a replayed event never takes a log row's
            // id.
            let mut event = tx
                .prepare(
                    "INSERT INTO events (id, event_id, payload)
                     SELECT (SELECT min(0, coalesce(min(id), 0)) - 1 FROM events), event_id, payload
                     FROM dead_letters WHERE id = ?1",
                )
                .map_err(&err)?;
            let mut delivery = tx
                .prepare(
                    "INSERT INTO pending (tag, event_row, attempts, next_attempt_ms, first_enqueued_ms, last_error, lease_until_ms)
                     SELECT tag, ?2, 0, ?3, ?3, last_error, 0 FROM dead_letters WHERE id = ?1",
                )
                .map_err(&err)?;
            for id in ids {
                event.execute([id]).map_err(&err)?;
                let row = tx.last_insert_rowid();
                delivery.execute([id, row, now]).map_err(&err)?;
            }
        }
        tx.execute(
            "DELETE FROM dead_letters WHERE id IN (SELECT id FROM replay_batch)",
            [],
        )
        .map_err(&err)?;
        // Keep the totals the server's back-pressure reads in step with the moved rows.
        tx.execute(
            "UPDATE outbox_totals SET records = records + ?1, bytes = bytes + ?2 WHERE id = 0",
            [count, bytes],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        moved += usize::try_from(count).unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_read_as_rfc3339_utc() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(1_764_410_645_123), "2025-11-29T10:04:05.123Z");
    }
}
