//! How a delivery is written in a stream entry, and read back.
//!
//! An entry is a flat field list: `v` schema version, `e` event id, `t` first enqueued (ms),
//! `p` the event's payload (MessagePack, as the embedded store keeps it), and after a failed
//! attempt `a` attempts and `x` the last error. Dead letters add `r` reason and `d` when (ms).
//!
//! # Rolling upgrades
//! Replicas of two versions share one Redis during a deploy. A reader ignores fields it does
//! not know, so adding a field keeps `v`; `v` goes up only for a change an older reader would
//! misread. The scripts never hand a reader an entry whose `v` is above what it reads: they
//! give it back to the group (idle, its delivery count restored), and a newer replica claims
//! it. Lua moves entries between keys field for field, never rebuilding them.

use bytes::Bytes;
use redis::Value;

/// The schema this version writes.
pub const WRITE_VERSION: u32 = 1;
/// The highest schema this version reads.
pub const READ_VERSION: u32 = 1;

/// A stream entry id, `ms-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl EntryId {
    pub fn parse(s: &str) -> Option<EntryId> {
        let (ms, seq) = s.split_once('-')?;
        Some(EntryId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One entry as read.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Entry {
    pub id: Option<EntryId>,
    pub version: Option<u32>,
    pub event_id: Option<String>,
    pub first_ms: Option<i64>,
    pub payload: Option<Bytes>,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub reason: Option<String>,
    pub dead_at_ms: Option<i64>,
}

impl Entry {
    /// What makes it unreadable as a delivery, if anything (dead-lettered as invalid).
    pub fn problem(&self) -> Option<&'static str> {
        if self.version.is_none() {
            Some("no schema version")
        } else if self.event_id.is_none() {
            Some("no event id")
        } else if self.payload.is_none() {
            Some("no payload")
        } else {
            None
        }
    }
}

fn text(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn utf8(v: &Value) -> Option<String> {
    text(v)
        .and_then(|b| std::str::from_utf8(b).ok())
        .map(str::to_owned)
}

fn number<T: std::str::FromStr>(v: &Value) -> Option<T> {
    match v {
        Value::Int(n) => n.to_string().parse().ok(),
        _ => text(v)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse().ok()),
    }
}

/// Reads `[id, [field, value, ...]]`.
pub fn entry(v: &Value) -> Option<Entry> {
    let Value::Array(parts) = v else {
        return None;
    };
    let mut out = Entry {
        id: parts
            .first()
            .and_then(utf8)
            .and_then(|s| EntryId::parse(&s)),
        ..Entry::default()
    };
    let Some(Value::Array(fields)) = parts.get(1) else {
        return Some(out);
    };
    for pair in fields.chunks(2) {
        let [name, value] = pair else { continue };
        match text(name) {
            Some(b"v") => out.version = number(value),
            Some(b"e") => out.event_id = utf8(value),
            Some(b"t") => out.first_ms = number(value),
            Some(b"p") => out.payload = text(value).map(Bytes::copy_from_slice),
            Some(b"a") => out.attempts = number(value).unwrap_or(0),
            Some(b"x") => out.last_error = utf8(value),
            Some(b"r") => out.reason = utf8(value),
            Some(b"d") => out.dead_at_ms = number(value),
            // Written by a newer version: ignored (see the module doc).
            _ => {}
        }
    }
    Some(out)
}

/// Reads a list of entries (`[[id, fields], ...]`).
pub fn entries(v: &Value) -> Vec<Entry> {
    match v {
        Value::Array(list) => list.iter().filter_map(entry).collect(),
        _ => Vec::new(),
    }
}

/// An integer reply (or a number sent as text).
pub fn int(v: &Value) -> i64 {
    number(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn entries_read_known_fields_and_skip_unknown_ones() {
        let v = Value::Array(vec![
            bulk("1700000000000-7"),
            Value::Array(vec![
                bulk("v"),
                bulk("1"),
                bulk("e"),
                bulk("ev-1"),
                bulk("t"),
                bulk("1700000000000"),
                bulk("p"),
                Value::BulkString(vec![0x81, 0xa1, b'a', 0x01]),
                bulk("zz"),
                bulk("a field of a newer version"),
                bulk("a"),
                bulk("2"),
                bulk("x"),
                bulk("HTTP 503"),
            ]),
        ]);
        let e = entry(&v).unwrap();
        assert_eq!(
            e.id,
            Some(EntryId {
                ms: 1_700_000_000_000,
                seq: 7
            })
        );
        assert_eq!(e.version, Some(1));
        assert_eq!(e.event_id.as_deref(), Some("ev-1"));
        assert_eq!(e.first_ms, Some(1_700_000_000_000));
        assert_eq!(e.payload.as_deref(), Some(&[0x81, 0xa1, b'a', 0x01][..]));
        assert_eq!((e.attempts, e.last_error.as_deref()), (2, Some("HTTP 503")));
        assert_eq!(e.problem(), None);
        let bare = entry(&Value::Array(vec![bulk("1-0"), Value::Array(vec![])])).unwrap();
        assert_eq!(bare.problem(), Some("no schema version"));
        assert_eq!(EntryId::parse("12-3").unwrap().to_string(), "12-3");
        assert!(EntryId::parse("x-3").is_none());
    }
}
