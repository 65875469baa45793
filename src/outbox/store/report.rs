//! What the operator tools report, whichever engine holds the outbox: per-tag backlog and
//! dead letters, with times people can read.

use std::fmt;

use serde::Serialize;

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

/// Which dead letter: a row of the embedded store, or `tag/partition/entry` of the shared one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum DeadLetterId {
    Row(i64),
    Entry(String),
}

impl fmt::Display for DeadLetterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadLetterId::Row(r) => write!(f, "{r}"),
            DeadLetterId::Entry(e) => f.write_str(e),
        }
    }
}

/// One dead-lettered record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub id: DeadLetterId,
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
pub fn utc(ms: i64) -> String {
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

#[cfg(test)]
mod tests {
    #[test]
    fn times_read_as_rfc3339_utc() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(1_764_410_645_123), "2025-11-29T10:04:05.123Z");
    }

    #[test]
    fn dead_letter_ids_keep_their_json_type() {
        use super::DeadLetterId;
        assert_eq!(serde_json::to_string(&DeadLetterId::Row(7)).unwrap(), "7");
        assert_eq!(
            serde_json::to_string(&DeadLetterId::Entry("ga4/0/1-0".into())).unwrap(),
            "\"ga4/0/1-0\""
        );
    }
}
