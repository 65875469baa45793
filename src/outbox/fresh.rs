//! Deliveries the writer handed straight to a dispatcher's queue at commit time ("fresh"):
//! they get no delivery row. The event row lists their tags (`events.fresh`, a JSON array),
//! which is all a restart needs to make them due again; while the process runs, this set is
//! the truth about which of them are still unsettled.
//!
//! Why: with both tags keeping up, an event costs one row insert and one row delete, instead
//! of a payload row plus a delivery row per tag (each with two index entries) inserted,
//! leased and deleted. A delivery row is written only when a fresh delivery needs one: it
//! failed (nack), died, was given back, or its lease ran out.
//!
//! Settling one tag of an event while another is still in flight does not rewrite the row
//! (that would cost the page write this saves). If the process then crashes, the settled tag
//! is sent again with the other: at-least-once, as for any in-flight lease. A clean close
//! rewrites those rows first, so a restart resends only what was really unsettled.

use std::collections::BTreeMap;
use std::sync::Arc;

/// An event's tags that can be fresh: a fresh id carries the tag's position in 4 bits.
/// Further tags of the same event get delivery rows.
pub(crate) const MAX_TAGS: usize = 16;

/// The record id a dispatcher sees for tag position `k` of event `row`. Delivery rows have
/// positive ids; fresh ones are negative, so one `i64` names either.
pub(crate) fn id(row: i64, k: usize) -> Option<i64> {
    if row < 1 || k >= MAX_TAGS {
        return None;
    }
    row.checked_mul(MAX_TAGS as i64)?
        .checked_add(k as i64)
        .map(|n| -n)
}

/// `(row, k)` of a fresh id; `None` for delivery-row ids.
pub(crate) fn decode(id: i64) -> Option<(i64, usize)> {
    if id >= 0 {
        return None;
    }
    let n = id.checked_neg()?;
    let row = n / MAX_TAGS as i64;
    let k = usize::try_from(n % MAX_TAGS as i64).ok()?;
    (row >= 1).then_some((row, k))
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// The event's tags by position (fresh or not; `unsettled` says which are fresh).
    pub tags: Arc<[Arc<str>]>,
    /// Bit `k`: the delivery of `tags[k]` is fresh and not settled yet.
    pub unsettled: u16,
    pub enqueued_ms: i64,
    pub lease_until_ms: i64,
    /// Some tags were settled without rewriting the row's `fresh` column.
    pub column_stale: bool,
}

impl Entry {
    pub fn remaining(&self) -> impl Iterator<Item = &Arc<str>> {
        self.tags
            .iter()
            .enumerate()
            .filter(|(k, _)| self.unsettled & (1 << k) != 0)
            .map(|(_, t)| t)
    }

    /// The `fresh` column for what is still unsettled (`None`: nothing).
    pub fn column(&self) -> Option<String> {
        column(self.remaining().map(|t| &**t))
    }
}

/// The `fresh` column listing `tags` (`None` if there are none).
pub(crate) fn column<'a>(tags: impl Iterator<Item = &'a str>) -> Option<String> {
    let tags: Vec<&str> = tags.collect();
    if tags.is_empty() {
        return None;
    }
    serde_json::to_string(&tags).ok()
}

/// One fresh delivery taken out of the set by a settlement.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Taken {
    pub row: i64,
    pub tag: Arc<str>,
    pub enqueued_ms: i64,
    /// It was the event's last unsettled fresh delivery (the entry is gone).
    pub last: bool,
}

/// The unsettled fresh deliveries, by event row, with an undo log so that a commit that
/// rolls back leaves the set as it was.
#[derive(Debug, Default)]
pub(crate) struct FreshSet {
    entries: BTreeMap<i64, Entry>,
    /// Entries as they were before the current commit first touched them (`None`: absent).
    undo: Vec<(i64, Option<Entry>)>,
    touched: std::collections::HashSet<i64>,
    /// Highest row ever inserted (the floor when nothing is fresh).
    last_row: i64,
}

impl FreshSet {
    pub fn new(last_row: i64) -> Self {
        FreshSet {
            last_row,
            ..FreshSet::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, row: i64) -> bool {
        self.entries.contains_key(&row)
    }

    #[cfg(test)]
    pub fn get(&self, row: i64) -> Option<&Entry> {
        self.entries.get(&row)
    }

    fn save(&mut self, row: i64) {
        if self.touched.insert(row) {
            self.undo.push((row, self.entries.get(&row).cloned()));
        }
    }

    pub fn insert(&mut self, row: i64, entry: Entry) {
        self.save(row);
        self.last_row = self.last_row.max(row);
        if entry.unsettled != 0 {
            self.entries.insert(row, entry);
        }
    }

    /// Settles fresh delivery `id`. `None` if it is not (or no longer) fresh: settled
    /// already, or its lease ran out and it became a delivery row.
    pub fn take(&mut self, id: i64) -> Option<Taken> {
        let (row, k) = decode(id)?;
        let entry = self.entries.get(&row)?;
        if entry.unsettled & (1 << k) == 0 {
            return None;
        }
        self.save(row);
        let entry = self.entries.get_mut(&row)?;
        entry.unsettled &= !(1 << k);
        let taken = Taken {
            row,
            tag: entry.tags.get(k)?.clone(),
            enqueued_ms: entry.enqueued_ms,
            last: entry.unsettled == 0,
        };
        if taken.last {
            self.entries.remove(&row);
        } else {
            entry.column_stale = true;
        }
        Some(taken)
    }

    /// Marks `row`'s column as rewritten; returns the value to write.
    pub fn rewrite(&mut self, row: i64) -> Option<String> {
        self.save(row);
        let entry = self.entries.get_mut(&row)?;
        entry.column_stale = false;
        entry.column()
    }

    /// Removes and returns the entries whose lease ended by `now_ms`. Rows are in
    /// commit order and every fresh delivery gets the same lease, so the expired ones are at
    /// the front.
    pub fn expire(&mut self, now_ms: i64) -> Vec<(i64, Entry)> {
        let mut out = Vec::new();
        while let Some((&row, entry)) = self.entries.first_key_value() {
            if entry.lease_until_ms > now_ms {
                break;
            }
            self.save(row);
            if let Some(e) = self.entries.remove(&row) {
                out.push((row, e));
            }
        }
        out
    }

    /// Rows whose column lists tags settled since (a clean close rewrites them).
    pub fn stale_columns(&mut self) -> Vec<(i64, Option<String>)> {
        let rows: Vec<i64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.column_stale)
            .map(|(&r, _)| r)
            .collect();
        rows.into_iter().map(|r| (r, self.rewrite(r))).collect()
    }

    /// No row below this one has an unsettled fresh delivery: where the scan at the next
    /// open may start.
    pub fn floor(&self) -> i64 {
        self.entries
            .first_key_value()
            .map(|(&r, _)| r)
            .unwrap_or(self.last_row.saturating_add(1))
    }

    /// The current commit went through.
    pub fn commit(&mut self) {
        self.undo.clear();
        self.touched.clear();
    }

    /// The current commit rolled back: every entry it touched is restored.
    pub fn rollback(&mut self) {
        for (row, before) in self.undo.drain(..).rev() {
            match before {
                Some(e) => {
                    self.entries.insert(row, e);
                }
                None => {
                    self.entries.remove(&row);
                }
            }
        }
        self.touched.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tags: &[&str], unsettled: u16, lease_until_ms: i64) -> Entry {
        Entry {
            tags: tags.iter().map(|t| Arc::from(*t)).collect(),
            unsettled,
            enqueued_ms: 1_000,
            lease_until_ms,
            column_stale: false,
        }
    }

    #[test]
    fn ids_round_trip_and_never_meet_delivery_rows() {
        for row in [1, 2, 17, 1 << 40] {
            for k in 0..MAX_TAGS {
                let id = id(row, k).unwrap();
                assert!(id < 0);
                assert_eq!(decode(id), Some((row, k)));
            }
        }
        assert_eq!(id(0, 0), None, "row 0 would give id 0");
        assert_eq!(id(5, MAX_TAGS), None);
        assert_eq!(id(i64::MAX, 1), None);
        assert_eq!(decode(7), None, "a delivery row");
        assert_eq!(decode(0), None);
        assert_eq!(decode(-3), None, "no row 0");
    }

    #[test]
    fn the_last_settled_tag_removes_the_entry() {
        let mut set = FreshSet::new(0);
        set.insert(5, entry(&["ga4", "meta"], 0b11, 9_000));
        let ga4 = set.take(id(5, 0).unwrap()).unwrap();
        assert_eq!((&*ga4.tag, ga4.last), ("ga4", false));
        assert!(set.get(5).unwrap().column_stale);
        assert_eq!(set.get(5).unwrap().column().as_deref(), Some(r#"["meta"]"#));
        assert_eq!(set.take(id(5, 0).unwrap()), None, "settled twice");
        let meta = set.take(id(5, 1).unwrap()).unwrap();
        assert!(meta.last);
        assert!(set.is_empty());
        assert_eq!(set.floor(), 6);
    }

    #[test]
    fn tags_that_were_not_fresh_cannot_be_taken() {
        let mut set = FreshSet::new(0);
        // Only "meta" went fresh; "ga4" got a delivery row.
        set.insert(3, entry(&["ga4", "meta"], 0b10, 9_000));
        assert_eq!(set.take(id(3, 0).unwrap()), None);
        assert_eq!(set.get(3).unwrap().column().as_deref(), Some(r#"["meta"]"#));
    }

    #[test]
    fn expiry_takes_the_front_in_row_order() {
        let mut set = FreshSet::new(0);
        set.insert(1, entry(&["t"], 1, 100));
        set.insert(2, entry(&["t"], 1, 200));
        set.insert(3, entry(&["t"], 1, 300));
        assert_eq!(set.floor(), 1);
        let gone: Vec<i64> = set.expire(200).into_iter().map(|(r, _)| r).collect();
        assert_eq!(gone, vec![1, 2]);
        assert_eq!(set.floor(), 3);
        assert_eq!(
            set.take(id(1, 0).unwrap()),
            None,
            "expired: no longer fresh"
        );
    }

    #[test]
    fn a_rolled_back_commit_leaves_the_set_as_it_was() {
        let mut set = FreshSet::new(0);
        set.insert(1, entry(&["a", "b"], 0b11, 100));
        set.commit();
        set.take(id(1, 0).unwrap()).unwrap();
        set.insert(2, entry(&["a"], 1, 100));
        set.take(id(1, 1).unwrap()).unwrap();
        set.expire(1_000);
        set.rollback();
        assert_eq!(set.get(1), Some(&entry(&["a", "b"], 0b11, 100)));
        assert!(!set.contains(2));
        // Undo is per commit: after a commit, a rollback undoes nothing older.
        set.take(id(1, 0).unwrap()).unwrap();
        set.commit();
        set.rollback();
        assert_eq!(set.get(1).unwrap().unsettled, 0b10);
    }

    #[test]
    fn a_clean_close_rewrites_only_stale_columns() {
        let mut set = FreshSet::new(0);
        set.insert(1, entry(&["a", "b"], 0b11, 100));
        set.insert(2, entry(&["a", "b"], 0b11, 100));
        set.take(id(2, 1).unwrap()).unwrap();
        assert_eq!(set.stale_columns(), vec![(2, Some(r#"["a"]"#.to_string()))]);
        assert!(set.stale_columns().is_empty());
    }
}
