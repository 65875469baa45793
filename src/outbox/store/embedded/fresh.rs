//! First deliveries without delivery rows.
//!
//! An event lists the tags it still owes a first delivery to (its frame in the outbox log,
//! or `events.fresh` for a row in SQLite: a JSON array written once with it). Each tag reads
//! its first deliveries in row order, like a consumer reading a log: a delivery is either
//! handed to the tag's dispatcher straight from the commit (the tag is caught up and its
//! queue has room), or left in the store and handed out later by a lease that reads from
//! where the tag lags. Only a delivery that fails (nack), dies, is given back or outlives its
//! lease gets a row in `pending`, which keeps its attempts and error (and its event a copy
//! in `events`, see `log_state`).
//!
//! Why: an event then costs one record appended to the log, where a delivery row per tag
//! (each with two index entries) inserted, leased and deleted cost several times the CPU
//! and the page writes, and an event row per event (inserted, then deleted) most of the
//! rest.
//!
//! What survives a restart is each tag's committed position (`cursors`), written by every
//! commit that moves it: every row below it has had that tag's delivery settled or turned
//! into a delivery row. A restart hands out again from there, so deliveries settled beyond
//! it are sent again: at-least-once, as for any in-flight lease. A clean close first gives
//! every unsettled delivery a row, so the positions are exact.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use super::log::Pos;

/// An event's tags that can be delivered without rows: a fresh id carries the tag's
/// position in 4 bits. Further tags of the same event get delivery rows.
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

/// An event as a delivery of it is handed out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Held {
    pub row: i64,
    pub enqueued_ms: i64,
    /// Where its frame is in the outbox log (`None`: a row in SQLite, or not known yet; see
    /// [`FreshSet::place`]).
    pub at: Option<Pos>,
    /// Its payload's size, for the byte count once it is done.
    pub bytes: u32,
}

/// An event with deliveries out (handed to dispatchers, not settled yet).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// The tags its `fresh` column lists, by position.
    pub tags: Arc<[Arc<str>]>,
    /// Bit `k`: the delivery of `tags[k]` is out.
    pub out: u16,
    pub enqueued_ms: i64,
    pub at: Option<Pos>,
    pub bytes: u32,
}

/// One delivery taken out of the set by a settlement.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Taken {
    pub row: i64,
    pub tag: Arc<str>,
    pub enqueued_ms: i64,
    pub at: Option<Pos>,
    pub bytes: u32,
    /// Nothing of this event is out any more and every tag it lists has been handed it:
    /// the event row can go (unless a delivery row still needs it).
    pub done: bool,
}

/// Where one tag stands in the events table.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    /// `Some(row)`: this tag's deliveries from `row` on wait in the store and a lease scans
    /// from there. `None`: caught up, new commits hand deliveries straight to its queue.
    pub lag_from: Option<i64>,
    /// Handed out, in order: `(row, position, lease end)`. Settled ones leave from the
    /// front lazily.
    handed: VecDeque<(i64, usize, i64)>,
    /// Deliveries waiting in the store and out in memory (for gauges).
    pub waiting: u64,
    pub out: u64,
    /// When the oldest waiting delivery was enqueued (at most: the scan keeps it as the
    /// time of the last row it handed out).
    pub oldest_waiting_ms: Option<i64>,
    /// The committed position as last written (`None`: never).
    pub persisted: Option<i64>,
    /// Some event this process wrote to the log lists this tag: its lag holds log segments.
    /// A tag no event lists any more (removed from the config) reads only rows copied into
    /// SQLite at open, and holds none.
    reads_log: bool,
}

/// `(tag, waiting, out, oldest enqueued_ms)` of one tag's first deliveries.
pub(crate) type Gauge = (Arc<str>, u64, u64, Option<i64>);

/// The writer's view of first deliveries: what is out, and where each tag stands.
#[derive(Debug, Default)]
pub(crate) struct FreshSet {
    entries: BTreeMap<i64, Entry>,
    /// Keyed by tag names from the config, so a fast unkeyed hash is safe; SipHash here
    /// was ~5 % of the writer's instructions (callgrind).
    cursors: HashMap<Arc<str>, Cursor, foldhash::fast::RandomState>,
    /// Highest row inserted so far.
    last_row: i64,
    recount: bool,
    /// `(tag, row)` whose delivery got a row before this tag was rewound to its written
    /// position (a crash, a failed commit): its scan must not hand them out again, even once
    /// that row is settled and gone. Left behind as the tag passes them.
    skips: std::collections::HashSet<(Arc<str>, i64)>,
}

impl FreshSet {
    pub fn new(last_row: i64) -> Self {
        FreshSet {
            last_row,
            ..FreshSet::default()
        }
    }

    /// A tag whose position is `row`, with `waiting` deliveries in the store from there,
    /// the oldest enqueued at `oldest_ms` (at open, and after a reset).
    pub fn resume(&mut self, tag: Arc<str>, row: i64, waiting: u64, oldest_ms: Option<i64>) {
        let c = self.cursors.entry(tag).or_default();
        c.lag_from = Some(row);
        c.waiting = waiting;
        c.oldest_waiting_ms = oldest_ms;
        c.persisted = Some(row);
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, row: i64) -> bool {
        self.entries.contains_key(&row)
    }

    /// The lease end of delivery `k` of `row` if it is out.
    #[cfg(test)]
    pub fn out_lease(&self, row: i64, k: usize) -> Option<i64> {
        let e = self.entries.get(&row)?;
        if e.out & (1 << k) == 0 {
            return None;
        }
        let c = self.cursors.get(e.tags.get(k)?)?;
        c.handed
            .iter()
            .find(|&&(r, kk, _)| r == row && kk == k)
            .map(|&(_, _, until)| until)
    }

    pub fn cursor(&mut self, tag: &Arc<str>) -> &mut Cursor {
        if !self.cursors.contains_key(tag) {
            self.cursors.insert(tag.clone(), Cursor::default());
        }
        self.cursors.get_mut(tag).expect("just inserted")
    }

    pub fn lags(&self, tag: &str) -> Option<i64> {
        self.cursors.get(tag).and_then(|c| c.lag_from)
    }

    /// Whether `tag` has been handed `row` (or was never going to be).
    fn passed(&self, tag: &str, row: i64) -> bool {
        self.cursors
            .get(tag)
            .and_then(|c| c.lag_from)
            .is_none_or(|lag| lag > row)
    }

    /// Whether every tag in `tags` has been handed `row` (`None`: an unreadable column,
    /// which never counts as passed).
    pub fn all_passed(&self, tags: Option<&[Arc<str>]>, row: i64) -> bool {
        tags.is_some_and(|tags| tags.iter().all(|t| self.passed(t, row)))
    }

    /// The lowest id the next event row may take.
    pub fn next_row(&self) -> i64 {
        self.last_row.saturating_add(1)
    }

    /// Row `row` was inserted.
    pub fn inserted(&mut self, row: i64) {
        self.last_row = self.last_row.max(row);
    }

    /// The delivery to `tag` of `row` (enqueued at `enqueued_ms`) is left in the store.
    pub fn leave(&mut self, tag: &Arc<str>, row: i64, enqueued_ms: i64) {
        let c = self.cursor(tag);
        c.reads_log = true;
        if c.lag_from.is_none() {
            c.lag_from = Some(row);
            c.oldest_waiting_ms = Some(enqueued_ms);
        }
        c.waiting += 1;
    }

    /// Hands the delivery of `tags[k]` of event `ev` out until `lease_until_ms`.
    /// `from_store`: it was waiting there (a lease scan) rather than coming from the commit.
    pub fn hand(
        &mut self,
        ev: &Held,
        tags: &Arc<[Arc<str>]>,
        k: usize,
        lease_until_ms: i64,
        from_store: bool,
    ) -> bool {
        let Some(tag) = tags.get(k) else {
            return false;
        };
        if k >= MAX_TAGS {
            return false;
        }
        let row = ev.row;
        let entry = self.entries.entry(row).or_insert_with(|| Entry {
            tags: tags.clone(),
            out: 0,
            enqueued_ms: ev.enqueued_ms,
            at: ev.at,
            bytes: ev.bytes,
        });
        if entry.out & (1 << k) != 0 {
            return false;
        }
        entry.out |= 1 << k;
        let c = self.cursor(tag);
        c.reads_log |= !from_store;
        c.handed.push_back((row, k, lease_until_ms));
        c.out += 1;
        if from_store {
            c.waiting = c.waiting.saturating_sub(1);
            c.oldest_waiting_ms = Some(ev.enqueued_ms);
        }
        true
    }

    /// Where the frame of `row`, handed out before it was written, ended up in the log.
    pub fn place(&mut self, row: i64, at: Pos) {
        if let Some(e) = self.entries.get_mut(&row) {
            e.at = Some(at);
        }
    }

    /// Settles the delivery named by fresh id `id`. `None` if it is not out (settled
    /// already, or its lease ended and it got a delivery row).
    pub fn take(&mut self, id: i64) -> Option<Taken> {
        let (row, k) = decode(id)?;
        let entry = self.entries.get_mut(&row)?;
        if entry.out & (1 << k) == 0 {
            return None;
        }
        entry.out &= !(1 << k);
        let tag = entry.tags.get(k)?.clone();
        let enqueued_ms = entry.enqueued_ms;
        let (at, bytes) = (entry.at, entry.bytes);
        let tags = entry.tags.clone();
        let nothing_out = entry.out == 0;
        if nothing_out {
            self.entries.remove(&row);
        }
        if let Some(c) = self.cursors.get_mut(&tag) {
            c.out = c.out.saturating_sub(1);
        }
        Some(Taken {
            row,
            tag,
            enqueued_ms,
            at,
            bytes,
            done: nothing_out && self.all_passed(Some(&tags), row),
        })
    }

    /// `tag`'s deliveries out whose lease ended by `now_ms`, taken out of the set (they
    /// need rows), with their lease's end. A tag hands out in order with the same lease, so
    /// the ended ones are at the front.
    pub fn expire(&mut self, tag: &str, now_ms: i64) -> Vec<(Taken, i64)> {
        let mut ended = Vec::new();
        loop {
            self.trim(tag);
            let Some(c) = self.cursors.get_mut(tag) else {
                break;
            };
            let Some(&(row, k, until)) = c.handed.front() else {
                break;
            };
            if until > now_ms {
                break;
            }
            c.handed.pop_front();
            if let Some(taken) = id(row, k).and_then(|id| self.take(id)) {
                ended.push((taken, until));
            }
        }
        ended
    }

    /// Drops settled deliveries from the front of `tag`'s hand-out order.
    fn trim(&mut self, tag: &str) {
        let Some(c) = self.cursors.get_mut(tag) else {
            return;
        };
        while let Some(&(row, k, _)) = c.handed.front() {
            let out = self
                .entries
                .get(&row)
                .is_some_and(|e| e.out & (1 << k) != 0);
            if out {
                break;
            }
            c.handed.pop_front();
        }
    }

    /// Everything still out (a clean close gives each a delivery row).
    pub fn take_all(&mut self) -> Vec<Taken> {
        let ids: Vec<i64> = self
            .entries
            .iter()
            .flat_map(|(&row, e)| {
                (0..MAX_TAGS)
                    .filter(|k| e.out & (1 << k) != 0)
                    .filter_map(move |k| id(row, k))
            })
            .collect();
        ids.into_iter().filter_map(|id| self.take(id)).collect()
    }

    /// Each tag's committed position that changed since it was last written: every row below
    /// it has had that tag's delivery settled or given a delivery row. A new tag's goes with
    /// its first rows (a tag that has none after a power cut resumes from the first row in
    /// the log that lists it; see `sqlite::import_log`).
    pub fn positions_to_write(&mut self) -> Vec<(Arc<str>, i64)> {
        let tags: Vec<Arc<str>> = self.cursors.keys().cloned().collect();
        let mut out = Vec::new();
        for tag in tags {
            self.trim(&tag);
            let next = self.last_row.saturating_add(1);
            let Some(c) = self.cursors.get(&tag) else {
                continue;
            };
            let pos = c
                .handed
                .front()
                .map(|&(row, _, _)| row)
                .or(c.lag_from)
                .unwrap_or(next);
            if c.persisted != Some(pos) {
                out.push((tag, pos));
            }
        }
        out
    }

    pub fn written(&mut self, positions: &[(Arc<str>, i64)]) {
        for (tag, pos) in positions {
            if let Some(c) = self.cursors.get_mut(tag) {
                c.persisted = Some(*pos);
            }
        }
    }

    /// After a commit failed: nothing handed out by this process counts any more, and every
    /// tag resumes from its written position, as after a restart (rare: the disk failed).
    pub fn reset(&mut self) {
        self.entries.clear();
        for c in self.cursors.values_mut() {
            c.handed.clear();
            c.waiting += c.out;
            c.out = 0;
            c.lag_from = c.persisted;
        }
        self.recount = true;
    }

    /// The lowest row a tag still reads from the log (where the most lagging one lags, or
    /// the next row).
    pub fn lowest_lag(&self) -> i64 {
        self.cursors
            .values()
            .filter(|c| c.reads_log)
            .filter_map(|c| c.lag_from)
            .fold(self.last_row.saturating_add(1), i64::min)
    }

    /// Rows below `row` with a delivery out, and where their frames are.
    pub fn out_below(&self, row: i64) -> Vec<(i64, Option<Pos>)> {
        self.entries.range(..row).map(|(&r, e)| (r, e.at)).collect()
    }

    /// `(tag, row it lags from)` of every lagging tag.
    pub fn lagging(&self) -> Vec<(Arc<str>, i64)> {
        self.cursors
            .iter()
            .filter_map(|(t, c)| c.lag_from.map(|l| (t.clone(), l)))
            .collect()
    }

    /// Whether `tag`'s scan will pass over `row` (see `skips`).
    pub fn is_skipped(&self, tag: &Arc<str>, row: i64) -> bool {
        !self.skips.is_empty() && self.skips.contains(&(tag.clone(), row))
    }

    /// Whether `tag`'s scan must pass over `row` (see `skips`); forgets it.
    pub fn skip(&mut self, tag: &Arc<str>, row: i64) -> bool {
        !self.skips.is_empty() && self.skips.remove(&(tag.clone(), row))
    }

    pub fn set_skips(&mut self, skips: impl IntoIterator<Item = (Arc<str>, i64)>) {
        self.skips = skips.into_iter().collect();
    }

    /// Every tag's waiting count and oldest time to zero (before a recount).
    pub fn clear_waiting(&mut self) {
        for c in self.cursors.values_mut() {
            c.waiting = 0;
            c.oldest_waiting_ms = None;
        }
    }

    /// `tag`'s waiting deliveries as counted in the store.
    pub fn set_waiting(&mut self, tag: &Arc<str>, waiting: u64, oldest_ms: Option<i64>) {
        let c = self.cursor(tag);
        c.waiting = waiting;
        c.oldest_waiting_ms = oldest_ms;
    }

    /// Whether the record count and gauges must be recomputed from the store (after a
    /// reset: deliveries settled past a written position are owed again). Clears the flag.
    pub fn take_recount(&mut self) -> bool {
        std::mem::take(&mut self.recount)
    }

    /// Per tag: deliveries waiting in the store and out in memory, and when the oldest of
    /// them was enqueued.
    pub fn gauges(&self) -> Vec<Gauge> {
        self.cursors
            .iter()
            .filter(|(_, c)| c.waiting > 0 || c.out > 0)
            .map(|(t, c)| {
                let oldest_out = c
                    .handed
                    .iter()
                    .find_map(|&(row, _, _)| self.entries.get(&row).map(|e| e.enqueued_ms));
                let oldest_waiting = c.oldest_waiting_ms.filter(|_| c.waiting > 0);
                let oldest = match (oldest_out, oldest_waiting) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                (t.clone(), c.waiting, c.out, oldest)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::log::parse_column;
    use super::*;

    fn tags(names: &[&str]) -> Arc<[Arc<str>]> {
        names.iter().map(|t| Arc::from(*t)).collect()
    }

    fn t(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    fn held(row: i64, enqueued_ms: i64) -> Held {
        Held {
            row,
            enqueued_ms,
            at: None,
            bytes: 10,
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
    fn columns_parse_to_their_tags() {
        assert_eq!(
            parse_column(Some(r#"["ga4","meta"]"#)),
            Some(vec![t("ga4"), t("meta")])
        );
        assert_eq!(parse_column(Some(r#"["a\"b"]"#)), Some(vec![t("a\"b")]));
        assert_eq!(parse_column(None), Some(Vec::new()));
        assert_eq!(parse_column(Some("not json")), None, "unreadable");
    }

    #[test]
    fn an_event_is_done_when_nothing_is_out_and_every_tag_was_handed_it() {
        let mut set = FreshSet::new(0);
        let both = tags(&["ga4", "meta"]);
        set.inserted(5);
        assert!(set.hand(&held(5, 1_000), &both, 0, 9_000, false));
        // meta's queue was full: it lags from row 5.
        set.leave(&t("meta"), 5, 1_000);
        let ga4 = set.take(id(5, 0).unwrap()).unwrap();
        assert_eq!((&*ga4.tag, ga4.done), ("ga4", false), "meta has not had it");
        assert!(!set.contains(5));
        assert_eq!(set.take(id(5, 0).unwrap()), None, "settled twice");
        // meta's lease scan hands it out later and it is settled: now the event can go.
        assert!(set.hand(&held(5, 1_000), &both, 1, 9_000, true));
        set.cursor(&t("meta")).lag_from = None;
        let meta = set.take(id(5, 1).unwrap()).unwrap();
        assert!(meta.done);
    }

    #[test]
    fn positions_follow_the_oldest_delivery_out_or_where_a_tag_lags() {
        let mut set = FreshSet::new(0);
        let one = tags(&["t"]);
        for row in 1..=3 {
            set.inserted(row);
            set.hand(&held(row, 1_000), &one, 0, 9_000, false);
        }
        assert_eq!(
            set.positions_to_write(),
            vec![(t("t"), 1)],
            "a new tag's at once"
        );
        set.written(&[(t("t"), 1)]);
        assert!(
            set.positions_to_write().is_empty(),
            "unchanged: not written again"
        );
        // Settled out of order: the position waits for row 1.
        set.take(id(2, 0).unwrap()).unwrap();
        assert!(set.positions_to_write().is_empty());
        set.take(id(1, 0).unwrap()).unwrap();
        assert_eq!(set.positions_to_write(), vec![(t("t"), 3)]);
        set.take(id(3, 0).unwrap()).unwrap();
        assert_eq!(
            set.positions_to_write(),
            vec![(t("t"), 4)],
            "caught up: past the last row"
        );
        set.inserted(4);
        set.leave(&t("t"), 4, 2_000);
        assert_eq!(set.positions_to_write(), vec![(t("t"), 4)]);
        assert_eq!(set.gauges(), vec![(t("t"), 1, 0, Some(2_000))]);
    }

    #[test]
    fn ended_leases_are_taken_in_hand_out_order() {
        let mut set = FreshSet::new(0);
        let one = tags(&["t"]);
        set.hand(&held(1, 1_000), &one, 0, 100, false);
        set.hand(&held(2, 1_000), &one, 0, 200, false);
        set.hand(&held(3, 1_000), &one, 0, 300, false);
        set.take(id(1, 0).unwrap()).unwrap();
        let ended: Vec<(i64, i64)> = set
            .expire("t", 200)
            .into_iter()
            .map(|(t, until)| (t.row, until))
            .collect();
        assert_eq!(ended, vec![(2, 200)]);
        assert!(set.expire("other", 1_000).is_empty());
        assert_eq!(set.take(id(2, 0).unwrap()), None, "no longer out");
        assert!(set.contains(3));
    }

    #[test]
    fn a_reset_forgets_what_is_out_and_resumes_from_written_positions() {
        let mut set = FreshSet::new(0);
        let one = tags(&["t"]);
        set.hand(&held(1, 1_000), &one, 0, 100, false);
        let pos = set.positions_to_write();
        set.written(&pos);
        set.hand(&held(2, 1_000), &one, 0, 100, false);
        set.reset();
        assert!(set.is_empty());
        assert_eq!(set.lags("t"), Some(1));
        assert_eq!(set.gauges(), vec![(t("t"), 2, 0, None)]);
        // A tag never written had nothing committed: it stays caught up.
        let mut fresh = FreshSet::new(0);
        fresh.hand(&held(1, 1_000), &one, 0, 100, false);
        fresh.reset();
        assert_eq!(fresh.lags("t"), None);
    }

    #[test]
    fn a_clean_close_takes_everything_out() {
        let mut set = FreshSet::new(0);
        let both = tags(&["a", "b"]);
        set.hand(&held(1, 1_000), &both, 0, 100, false);
        set.hand(&held(1, 1_000), &both, 1, 100, false);
        set.hand(&held(2, 1_000), &both, 1, 100, false);
        let mut taken: Vec<(i64, String)> = set
            .take_all()
            .into_iter()
            .map(|t| (t.row, t.tag.to_string()))
            .collect();
        taken.sort();
        assert_eq!(
            taken,
            vec![(1, "a".into()), (1, "b".into()), (2, "b".into())]
        );
        assert!(set.is_empty());
    }
}
