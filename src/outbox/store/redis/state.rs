//! What this process keeps about the shared store: back-pressure counters (as Redis last
//! reported them, plus what is on its way), wake-ups, tag pauses and where each tag's leases
//! stand.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::event::Event;

/// One tag's share of the counters.
#[derive(Debug, Default)]
pub(crate) struct TagCounts {
    /// `(records, bytes)` of each partition as Redis last reported it.
    partitions: Mutex<Vec<(u64, u64)>>,
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    /// Admitted by `enqueue`, not yet written.
    pub reserved_records: AtomicU64,
    pub reserved_bytes: AtomicU64,
}

/// Pending records and bytes across tags (what `max_records` / `max_bytes` bound).
#[derive(Debug, Default)]
pub(crate) struct Totals {
    tags: RwLock<HashMap<Arc<str>, Arc<TagCounts>>>,
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub reserved_records: AtomicU64,
    pub reserved_bytes: AtomicU64,
}

impl Totals {
    pub fn tag(&self, tag: &str) -> Arc<TagCounts> {
        if let Ok(map) = self.tags.read() {
            if let Some(t) = map.get(tag) {
                return t.clone();
            }
        }
        match self.tags.write() {
            Ok(mut map) => map.entry(Arc::from(tag)).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Tags with counters.
    pub fn known(&self) -> usize {
        self.tags.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn tag_names(&self) -> Vec<Arc<str>> {
        self.tags
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Records what Redis says partition `p` of `tag` holds now.
    pub fn set(&self, tag: &str, p: u16, records: i64, bytes: i64) {
        let t = self.tag(tag);
        let (records, bytes) = (
            u64::try_from(records).unwrap_or(0),
            u64::try_from(bytes).unwrap_or(0),
        );
        let Ok(mut parts) = t.partitions.lock() else {
            return;
        };
        let i = usize::from(p);
        if parts.len() <= i {
            parts.resize(i + 1, (0, 0));
        }
        let (old_r, old_b) = parts[i];
        parts[i] = (records, bytes);
        // Under the lock, so concurrent reports of one tag apply in order.
        shift(&t.records, old_r, records);
        shift(&t.bytes, old_b, bytes);
        shift(&self.records, old_r, records);
        shift(&self.bytes, old_b, bytes);
    }

    pub fn reserve(&self, t: &TagCounts, records: u64, bytes: u64) {
        t.reserved_records.fetch_add(records, Ordering::AcqRel);
        t.reserved_bytes.fetch_add(bytes, Ordering::AcqRel);
        self.reserved_records.fetch_add(records, Ordering::AcqRel);
        self.reserved_bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    pub fn unreserve(&self, t: &TagCounts, records: u64, bytes: u64) {
        sub(&t.reserved_records, records);
        sub(&t.reserved_bytes, bytes);
        sub(&self.reserved_records, records);
        sub(&self.reserved_bytes, bytes);
    }

    /// `(records, bytes)` pending, reservations included.
    pub fn pending(&self) -> (u64, u64) {
        (
            self.records.load(Ordering::Acquire) + self.reserved_records.load(Ordering::Acquire),
            self.bytes.load(Ordering::Acquire) + self.reserved_bytes.load(Ordering::Acquire),
        )
    }
}

impl TagCounts {
    pub fn pending(&self) -> (u64, u64) {
        (
            self.records.load(Ordering::Acquire) + self.reserved_records.load(Ordering::Acquire),
            self.bytes.load(Ordering::Acquire) + self.reserved_bytes.load(Ordering::Acquire),
        )
    }
}

fn shift(a: &AtomicU64, old: u64, new: u64) {
    if new >= old {
        a.fetch_add(new - old, Ordering::AcqRel);
    } else {
        sub(a, old - new);
    }
}

fn sub(a: &AtomicU64, n: u64) {
    let _ = a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.saturating_sub(n))
    });
}

/// Where one tag's leases stand.
#[derive(Debug)]
pub(crate) struct TagLease {
    /// The partition the next lease starts at (rotates, so none starves).
    pub next: u16,
    /// Per partition: `XAUTOCLAIM` cursor and when it last ran.
    pub cursors: Vec<String>,
    pub last_claim: Vec<Option<Instant>>,
}

impl TagLease {
    pub fn new(partitions: u16) -> TagLease {
        let n = usize::from(partitions.max(1));
        TagLease {
            next: 0,
            cursors: vec!["0-0".to_owned(); n],
            last_claim: vec![None; n],
        }
    }

    pub fn grow(&mut self, partitions: u16) {
        let n = usize::from(partitions.max(1));
        if self.cursors.len() < n {
            self.cursors.resize(n, "0-0".to_owned());
            self.last_claim.resize(n, None);
        }
    }
}

/// Wake-ups per tag (a commit here or a message from another replica) and tag pauses.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    wakeups: RwLock<HashMap<Arc<str>, Arc<Notify>>>,
    /// Until when (this process's clock) each tag is paused.
    pauses: RwLock<HashMap<Arc<str>, Arc<AtomicI64>>>,
}

impl Signals {
    pub fn wakeup(&self, tag: &str) -> Arc<Notify> {
        if let Ok(map) = self.wakeups.read() {
            if let Some(n) = map.get(tag) {
                return n.clone();
            }
        }
        match self.wakeups.write() {
            Ok(mut map) => map.entry(Arc::from(tag)).or_default().clone(),
            Err(_) => Arc::new(Notify::new()),
        }
    }

    pub fn notify(&self, tag: &str) {
        if let Ok(map) = self.wakeups.read() {
            if let Some(n) = map.get(tag) {
                n.notify_one();
            }
        }
    }

    pub fn pause(&self, tag: &str, until_ms: i64) {
        let slot = {
            let found = self.pauses.read().ok().and_then(|m| m.get(tag).cloned());
            match found {
                Some(s) => s,
                None => match self.pauses.write() {
                    Ok(mut m) => m.entry(Arc::from(tag)).or_default().clone(),
                    Err(_) => return,
                },
            }
        };
        slot.fetch_max(until_ms, Ordering::AcqRel);
    }

    pub fn paused_until(&self, tag: &str) -> i64 {
        self.pauses
            .read()
            .ok()
            .and_then(|m| m.get(tag).map(|a| a.load(Ordering::Acquire)))
            .unwrap_or(0)
    }
}

/// Events this process committed lately, parsed, by event id: when its own dispatchers lease
/// them back from Redis (in one replica, all of them; in several, their share), they take
/// the parsed event instead of decoding the payload again — the in-memory hand-over the
/// embedded store does, without taking the delivery away from the other replicas. Bounded by
/// count (the oldest go first); an entry goes once every tag it fired has leased it.
#[derive(Debug, Default)]
pub(crate) struct LocalEvents {
    inner: Mutex<LocalInner>,
}

#[derive(Debug, Default)]
struct LocalInner {
    /// event id → (event, payload it was stored with, tags still to lease it).
    by_id: HashMap<String, (Arc<Event>, Bytes, usize)>,
    order: VecDeque<String>,
}

/// Events kept for the hand-over at most (a few MiB).
const LOCAL_EVENTS: usize = 4_096;

impl LocalEvents {
    /// After a commit: `(event id, event, payload, tags)` of what it stored.
    pub fn keep<'a>(
        &self,
        events: impl Iterator<Item = (&'a str, &'a Arc<Event>, &'a Bytes, usize)>,
    ) {
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        let g = &mut *g;
        for (id, ev, payload, tags) in events {
            if g.by_id
                .insert(id.to_owned(), (ev.clone(), payload.clone(), tags))
                .is_none()
            {
                g.order.push_back(id.to_owned());
            }
        }
        while g.order.len() > LOCAL_EVENTS {
            if let Some(old) = g.order.pop_front() {
                g.by_id.remove(&old);
            }
        }
        if g.order.len() > 2 * g.by_id.len() + 64 {
            let by_id = &g.by_id;
            g.order.retain(|id| by_id.contains_key(id));
        }
    }

    /// The parsed event for a delivery read back, if this process stored exactly that payload.
    pub fn take(&self, event_id: &str, payload: &[u8]) -> Option<Arc<Event>> {
        let Ok(mut g) = self.inner.lock() else {
            return None;
        };
        let (ev, stored, left) = g.by_id.get_mut(event_id)?;
        if stored[..] != *payload {
            return None;
        }
        let ev = ev.clone();
        *left = left.saturating_sub(1);
        if *left == 0 {
            g.by_id.remove(event_id);
        }
        Some(ev)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.by_id.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_events_are_handed_over_once_per_tag_and_bounded() {
        let l = LocalEvents::default();
        let ev = Arc::new(Event::default());
        let p = Bytes::from_static(b"payload");
        l.keep([("a", &ev, &p, 2)].into_iter());
        assert!(
            l.take("a", b"other payload").is_none(),
            "not the stored one"
        );
        assert!(l.take("a", b"payload").is_some());
        assert!(l.take("a", b"payload").is_some());
        assert!(l.take("a", b"payload").is_none(), "each tag once");
        let ids: Vec<String> = (0..LOCAL_EVENTS + 10).map(|i| i.to_string()).collect();
        l.keep(ids.iter().map(|i| (i.as_str(), &ev, &p, 1)));
        assert_eq!(l.len(), LOCAL_EVENTS);
        assert!(l.take("0", b"payload").is_none(), "the oldest went first");
    }

    #[test]
    fn totals_follow_what_redis_reports_per_partition() {
        let t = Totals::default();
        t.set("a", 0, 10, 1000);
        t.set("a", 3, 5, 500);
        t.set("b", 1, 1, 10);
        assert_eq!(t.pending(), (16, 1510));
        t.set("a", 0, 2, 200);
        assert_eq!(t.tag("a").pending(), (7, 700));
        assert_eq!(t.pending(), (8, 710));
        let a = t.tag("a");
        t.reserve(&a, 3, 30);
        assert_eq!(t.pending(), (11, 740));
        assert_eq!(a.pending(), (10, 730));
        t.unreserve(&a, 3, 30);
        assert_eq!(t.pending(), (8, 710));
        assert_eq!(t.known(), 2);
    }

    #[test]
    fn pauses_only_grow() {
        let s = Signals::default();
        assert_eq!(s.paused_until("t"), 0);
        s.pause("t", 100);
        s.pause("t", 50);
        assert_eq!(s.paused_until("t"), 100);
    }
}
