//! Traces of hits for the debug view: a bounded in-memory ring plus a live fan-out.
//!
//! Memory stays flat under load: the ring is capped by count and by (estimated) bytes, request
//! bodies and vendor responses are truncated, and nothing is recorded at all unless sampling
//! says so (by default: only while someone watches, or for hits marked with the debug cookie).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::event::Event;
use crate::set_cookie::CookieDecision;

mod delivery;
mod draft;
mod redact;

pub use delivery::{AttemptOutcome, DeliveryObserver, NoopObserver, Settled};
pub use draft::{Served, TraceDraft};
pub use redact::{redact_query, shorten_cookie_header, truncate};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TraceSampling {
    /// Every hit while a debug page is open, and marked hits always.
    #[default]
    Watching,
    /// Only hits marked with the debug cookie or header, even while a page is open: on a busy
    /// site, tracing every hit costs a third or more of the throughput (README).
    Marked,
    All,
    None,
}

/// Longest request body / vendor response kept in a trace.
pub const MAX_BODY_CHARS: usize = 8 * 1024;
/// Delivery attempts kept per (event, tag); older ones are dropped.
const MAX_ATTEMPTS_KEPT: usize = 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trace {
    pub id: String,
    pub time_ms: i64,
    pub method: String,
    /// `http`, or what a proxy in front said (`X-Forwarded-Proto`); for display and curl.
    pub scheme: String,
    pub path: String,
    pub query: String,
    pub body: String,
    pub body_truncated: bool,
    pub headers: Vec<(String, String)>,
    pub client_ip: String,
    pub host: String,
    #[serde(deserialize_with = "crate::text::de_interned_opt")]
    pub client: Option<&'static str>,
    pub status: u16,
    pub error: Option<String>,
    pub debug_marker: Option<String>,
    pub latency_us: u64,
    pub events: Vec<Arc<Event>>,
    pub cookies: Vec<CookieDecision>,
    pub tags: Vec<TagTrace>,
    /// What the running ITP check says of this page and tagging host, when it is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub itp: Option<ItpNote>,
    /// The events' stored size, known from the outbox payloads (MessagePack, ~14 % under
    /// their JSON): the ring's byte budget is kept without serializing traces on the hit path.
    #[serde(skip)]
    pub events_bytes: usize,
}

impl Trace {
    /// About what the trace takes as JSON (and in memory); delivery attempts are charged as
    /// they are added.
    fn estimated_bytes(&self) -> usize {
        let strings = [
            &self.id,
            &self.method,
            &self.scheme,
            &self.path,
            &self.query,
            &self.body,
            &self.client_ip,
            &self.host,
        ];
        256 + strings.iter().map(|s| s.len()).sum::<usize>()
            + self.error.as_ref().map_or(0, String::len)
            + self.debug_marker.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
            + self.events_bytes
            + self.cookies.len() * 192
            + self
                .tags
                .iter()
                .map(|t| t.tag.len() + t.event_id.len() + t.event_name.len() + t.reason.len() + 128)
                .sum::<usize>()
    }
}

impl TagTrace {
    /// A retry storm must not grow a trace without bound: the latest few attempts stay.
    fn keep_attempt(&mut self, a: Arc<Attempt>) {
        if self.attempts.len() >= MAX_ATTEMPTS_KEPT {
            self.attempts.remove(0);
        }
        self.attempts.push(a);
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TagTrace {
    pub tag: String,
    #[serde(deserialize_with = "crate::text::de_interned")]
    pub kind: &'static str,
    pub event_id: String,
    pub event_name: String,
    pub fired: bool,
    pub reason: String,
    pub outcome: TagOutcome,
    /// Shared with the other events of the same vendor request.
    pub attempts: Vec<Arc<Attempt>>,
}

/// The ITP check's verdict on a traced hit's (page host, tagging host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItpNote {
    /// The verdict's code (`ok-same-range`, `capped-cname`, …).
    #[serde(deserialize_with = "crate::text::de_interned")]
    pub verdict: &'static str,
    /// `ok`, `warn`, `capped` or `error`.
    #[serde(deserialize_with = "crate::text::de_interned")]
    pub severity: &'static str,
    /// One sentence naming the hosts.
    pub summary: String,
    /// The recommended fix, when something needs one.
    pub fix: Option<String>,
}

/// Where one event stands with one tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TagState {
    NotFired,
    Queued,
    /// The tag fired but the hit was refused before its events were stored.
    NotQueued,
    Delivered,
    /// Accepted by a vendor that reports its processing later.
    Pending,
    Retrying,
    DeadLettered,
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagOutcome {
    pub state: TagState,
    pub detail: String,
    pub next_attempt_ms: Option<i64>,
}

impl TagOutcome {
    pub fn new(state: TagState, detail: impl Into<String>) -> Self {
        TagOutcome {
            state,
            detail: detail.into(),
            next_attempt_ms: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    pub time_ms: i64,
    pub request: RequestView,
    pub status: Option<u16>,
    pub response_body: String,
    pub latency_ms: u64,
    pub outcome: String,
}

/// An outbound request as shown to people: secrets already redacted by the tag.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestView {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// A message on the live stream.
#[derive(Debug, Clone)]
pub enum StreamMsg {
    /// A new trace, by sequence number: a stream serializes only the traces it sends (it
    /// drops what it cannot keep up with), read from the ring when it sends them.
    Trace(u64),
    Update(Arc<str>),
}

#[derive(Debug, Serialize)]
struct Update<'a> {
    trace_id: &'a str,
    tag: &'a str,
    event_id: &'a str,
    attempt: Option<&'a Attempt>,
    outcome: &'a TagOutcome,
}

/// Traces are shared (`Arc`) so readers copy pointers, not traces, while they hold the lock that
/// hits and deliveries take too; an update copies a trace only if a reader still holds it.
struct Ring {
    traces: VecDeque<(Arc<Trace>, usize)>,
    /// Sequence number of `traces[0]`; a trace's number never changes, so the event index
    /// finds it by subtraction instead of a scan of the ring.
    first_seq: u64,
    bytes: usize,
    /// event id → sequence number of its trace, so delivery updates find it.
    by_event: HashMap<String, u64>,
    /// Events of traced hits that are stored but whose trace is not recorded yet (the hit
    /// still waits for its fsync): deliveries can finish first, and their updates wait here
    /// for `record`.
    early: Early,
}

/// Updates waiting for their trace, bounded by event count ([`MAX_EARLY`]), per tag
/// ([`MAX_ATTEMPTS_KEPT`]) and by the bytes of their attempts (a quarter of the ring's budget;
/// past it only outcomes are kept): a hit whose trace never comes (its client went away, the
/// request timed out) leaves an entry that only these bounds remove.
#[derive(Default)]
struct Early {
    /// event id → (generation, updates).
    events: HashMap<String, (u64, Vec<EarlyUpdate>)>,
    /// Oldest first; an entry whose generation no longer matches was taken since.
    order: VecDeque<(u64, String)>,
    next_gen: u64,
    bytes: usize,
}

impl Early {
    fn len(&self) -> usize {
        self.events.len()
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    fn expect(&mut self, id: &str) {
        if self.events.contains_key(id) {
            return;
        }
        self.next_gen += 1;
        self.events
            .insert(id.to_owned(), (self.next_gen, Vec::new()));
        self.order.push_back((self.next_gen, id.to_owned()));
        while self.events.len() > MAX_EARLY {
            let Some((generation, old)) = self.order.pop_front() else {
                break;
            };
            if self.events.get(&old).is_some_and(|(g, _)| *g == generation) {
                self.take(&old);
            }
        }
        if self.order.len() > 2 * MAX_EARLY {
            let events = &self.events;
            self.order
                .retain(|(generation, id)| events.get(id).is_some_and(|(g, _)| g == generation));
        }
    }

    /// Keeps an update if the event is expected; `false` if it is not.
    fn push(
        &mut self,
        id: &str,
        tag: &str,
        attempt: Option<&Arc<Attempt>>,
        outcome: &TagOutcome,
        max_bytes: usize,
    ) -> bool {
        let Some((_, updates)) = self.events.get_mut(id) else {
            return false;
        };
        if updates.iter().filter(|u| u.tag == tag).count() >= MAX_ATTEMPTS_KEPT {
            if let Some(i) = updates.iter().position(|u| u.tag == tag) {
                let old = updates.remove(i);
                self.bytes -= old.attempt.as_deref().map_or(0, attempt_bytes);
            }
        }
        let attempt = attempt.filter(|a| self.bytes + attempt_bytes(a) <= max_bytes);
        self.bytes += attempt.map_or(0, |a| attempt_bytes(a));
        updates.push(EarlyUpdate {
            tag: tag.to_owned(),
            attempt: attempt.cloned(),
            outcome: outcome.clone(),
        });
        true
    }

    fn take(&mut self, id: &str) -> Option<Vec<EarlyUpdate>> {
        let (_, updates) = self.events.remove(id)?;
        self.bytes -= updates
            .iter()
            .map(|u| u.attempt.as_deref().map_or(0, attempt_bytes))
            .sum::<usize>();
        Some(updates)
    }
}

/// A delivery update for an event whose trace is not recorded yet.
struct EarlyUpdate {
    tag: String,
    attempt: Option<Arc<Attempt>>,
    outcome: TagOutcome,
}

/// Events awaiting their trace at most (see `Early`).
const MAX_EARLY: usize = 4_096;

impl Ring {
    /// Events whose delivery updates a trace takes, recorded or awaited.
    fn indexed(&self) -> usize {
        self.by_event.len() + self.early.len()
    }

    fn by_seq(&mut self, seq: u64) -> Option<&mut (Arc<Trace>, usize)> {
        let i = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        self.traces.get_mut(i)
    }
}

pub struct Traces {
    ring: Mutex<Ring>,
    capacity: usize,
    max_bytes: usize,
    sampling: TraceSampling,
    watchers: AtomicUsize,
    /// Size of the event index (events whose deliveries a trace shows).
    indexed: AtomicUsize,
    tx: broadcast::Sender<StreamMsg>,
    /// Other processes that show these traces (a shared outbox's replicas).
    share: OnceLock<Arc<dyn TraceShare>>,
    /// A debug page is open on another process: `watching` sampling traces here too.
    remote_watching: AtomicBool,
}

/// Where traces go beyond this process: the replicas of a shared outbox show each other's
/// hits, and delivery outcomes from whichever replica delivered. Called on hit and delivery
/// paths: implementations only queue (they serialize and send elsewhere).
pub trait TraceShare: Send + Sync {
    /// A traced hit's events are about to be stored.
    fn expect(&self, event_ids: Vec<String>);
    fn recorded(&self, trace: Arc<Trace>);
    fn updated(
        &self,
        tag: &str,
        event_ids: Vec<String>,
        attempt: Option<Arc<Attempt>>,
        outcome: TagOutcome,
    );
    /// A debug page opened here (then again every few seconds while one is open).
    fn watching(&self);
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces")
            .field("capacity", &self.capacity)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl Traces {
    pub fn new(capacity: usize, max_bytes: usize, sampling: TraceSampling) -> Arc<Self> {
        let (tx, _) = broadcast::channel(1024);
        Arc::new(Traces {
            ring: Mutex::new(Ring {
                traces: VecDeque::new(),
                first_seq: 0,
                bytes: 0,
                by_event: HashMap::new(),
                early: Early::default(),
            }),
            capacity: capacity.max(1),
            max_bytes: max_bytes.max(1024),
            sampling,
            watchers: AtomicUsize::new(0),
            indexed: AtomicUsize::new(0),
            tx,
            share: OnceLock::new(),
            remote_watching: AtomicBool::new(false),
        })
    }

    /// Shares traces with other processes from now on (once; later calls are ignored).
    pub fn share_with(&self, share: Arc<dyn TraceShare>) {
        let _ = self.share.set(share);
    }

    /// Debug pages open on this process now.
    pub fn watchers_here(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }

    /// Whether a debug page is open on another process sharing traces with this one.
    pub fn set_remote_watching(&self, on: bool) {
        self.remote_watching.store(on, Ordering::Relaxed);
    }

    /// Whether a hit should be traced. Cheap: called on every hit.
    pub fn wants(&self, marked: bool) -> bool {
        match self.sampling {
            TraceSampling::None => false,
            TraceSampling::All => true,
            TraceSampling::Watching => {
                marked
                    || self.watchers.load(Ordering::Relaxed) > 0
                    || self.remote_watching.load(Ordering::Relaxed)
            }
            TraceSampling::Marked => marked,
        }
    }

    /// Registers a live watcher (SSE stream); dropping the guard unregisters it.
    pub fn watch(self: &Arc<Self>) -> (WatchGuard, broadcast::Receiver<StreamMsg>) {
        if self.watchers.fetch_add(1, Ordering::Relaxed) == 0 {
            if let Some(s) = self.share.get() {
                s.watching();
            }
        }
        (
            WatchGuard {
                traces: self.clone(),
            },
            self.tx.subscribe(),
        )
    }

    /// Called before a traced hit's events are stored: updates for them that come before the
    /// trace is recorded are kept for it.
    pub fn expect<'a>(&self, event_ids: impl IntoIterator<Item = &'a str>) {
        match self.share.get() {
            None => self.expect_here(event_ids),
            Some(share) => {
                let ids: Vec<String> = event_ids.into_iter().map(str::to_owned).collect();
                self.expect_here(ids.iter().map(String::as_str));
                share.expect(ids);
            }
        }
    }

    fn expect_here<'a>(&self, event_ids: impl IntoIterator<Item = &'a str>) {
        let Ok(mut guard) = self.ring.lock() else {
            return;
        };
        let ring = &mut *guard;
        for id in event_ids {
            ring.early.expect(id);
        }
        self.indexed.store(ring.indexed(), Ordering::Relaxed);
    }

    /// [`expect`](Self::expect) for a hit another process took.
    pub fn receive_expect(&self, event_ids: &[String]) {
        self.expect_here(event_ids.iter().map(String::as_str));
    }

    pub fn record(&self, trace: Trace) {
        let shared = self.record_here(trace);
        if let (Some(share), Some(t)) = (self.share.get(), shared) {
            share.recorded(t);
        }
    }

    /// [`record`](Self::record) for a hit another process took.
    pub fn receive_trace(&self, mut trace: Trace) {
        if self.get(&trace.id).is_some() {
            return;
        }
        trace.events_bytes = trace
            .events
            .iter()
            .map(|_| crate::event::TYPICAL_PAYLOAD_BYTES)
            .sum();
        self.record_here(trace);
    }

    /// Records a trace; returns it (shared) when someone else may want it.
    fn record_here(&self, mut trace: Trace) -> Option<Arc<Trace>> {
        let share = self.share.get().is_some();
        let seq = {
            let Ok(mut guard) = self.ring.lock() else {
                return None;
            };
            let ring = &mut *guard;
            let seq = ring.first_seq + ring.traces.len() as u64;
            // An event's updates serve all its tags: taken once per event.
            let mut taken: Vec<(String, Vec<EarlyUpdate>)> = Vec::new();
            if !ring.early.is_empty() {
                for t in trace.tags.iter().filter(|t| t.fired) {
                    if let Some(updates) = ring.early.take(&t.event_id) {
                        taken.push((t.event_id.clone(), updates));
                    }
                }
            }
            let mut early_bytes = 0;
            for t in trace.tags.iter_mut() {
                if !t.fired {
                    continue;
                }
                ring.by_event.insert(t.event_id.clone(), seq);
                let Some((_, updates)) = taken.iter().find(|(id, _)| *id == t.event_id) else {
                    continue;
                };
                for u in updates.iter() {
                    if u.tag != t.tag {
                        continue;
                    }
                    if let Some(a) = &u.attempt {
                        t.keep_attempt(a.clone());
                        early_bytes += attempt_bytes(a);
                    }
                    t.outcome = u.outcome.clone();
                }
            }
            let size = trace.estimated_bytes() + early_bytes;
            ring.bytes += size;
            let trace = Arc::new(trace);
            let out = share.then(|| trace.clone());
            ring.traces.push_back((trace, size));
            self.trim(ring);
            (seq, out)
        };
        // Fails only when no stream listens.
        let _ = self.tx.send(StreamMsg::Trace(seq.0));
        seq.1
    }

    /// A trace of the live stream as JSON, unless it has left the ring since.
    pub fn stream_json(&self, seq: u64) -> Option<String> {
        let trace = {
            let mut ring = self.ring.lock().ok()?;
            ring.by_seq(seq)?.0.clone()
        };
        serde_json::to_string(&*trace).ok()
    }

    /// Records a delivery attempt and/or a new outcome for (tag, event).
    pub fn update(&self, tag: &str, event_id: &str, attempt: Option<Attempt>, outcome: TagOutcome) {
        self.update_many(tag, &[event_id], attempt.map(Arc::new), &outcome);
    }

    /// Records one delivery attempt (shared, not copied) and/or outcome for several events of a
    /// batch. A trace is charged the attempt's size once however many of its events it carried,
    /// and the ring is trimmed back under its byte budget afterwards.
    pub fn update_many<S: AsRef<str>>(
        &self,
        tag: &str,
        event_ids: &[S],
        attempt: Option<Arc<Attempt>>,
        outcome: &TagOutcome,
    ) {
        let share = self.share.get();
        let shared = self.update_here(tag, event_ids, attempt.clone(), outcome, share.is_some());
        if let Some(share) = share.filter(|_| !shared.is_empty()) {
            share.updated(tag, shared, attempt, outcome.clone());
        }
    }

    /// [`update_many`](Self::update_many) for a delivery another process made.
    pub fn receive_update(
        &self,
        tag: &str,
        event_ids: &[String],
        attempt: Option<Attempt>,
        outcome: &TagOutcome,
    ) {
        self.update_here(tag, event_ids, attempt.map(Arc::new), outcome, false);
    }

    /// Applies an update; returns the events it concerned (when `collect`): those traced here.
    fn update_here<S: AsRef<str>>(
        &self,
        tag: &str,
        event_ids: &[S],
        attempt: Option<Arc<Attempt>>,
        outcome: &TagOutcome,
        collect: bool,
    ) -> Vec<String> {
        let mut concerned = Vec::new();
        let attempt_size = attempt.as_deref().map_or(0, attempt_bytes);
        let mut msgs = Vec::new();
        {
            let Ok(mut guard) = self.ring.lock() else {
                return concerned;
            };
            let ring = &mut *guard;
            let mut charged: Vec<u64> = Vec::new();
            let mut added_bytes = 0;
            for event_id in event_ids {
                let event_id = event_id.as_ref();
                // First: a sender may reuse an event id (a retried hit), and an older trace of
                // it may still be in the ring; the hit waiting for its trace is the newer.
                if ring
                    .early
                    .push(event_id, tag, attempt.as_ref(), outcome, self.max_bytes / 4)
                {
                    if collect {
                        concerned.push(event_id.to_owned());
                    }
                    continue;
                }
                let Some(&seq) = ring.by_event.get(event_id) else {
                    continue;
                };
                let Some((trace, size)) = ring.by_seq(seq) else {
                    continue;
                };
                // Found before `make_mut`, which copies the trace while a reader holds it.
                let Some(k) = trace
                    .tags
                    .iter()
                    .position(|t| t.tag == tag && t.event_id == event_id)
                else {
                    continue;
                };
                if collect {
                    concerned.push(event_id.to_owned());
                }
                let trace = Arc::make_mut(trace);
                let tt = &mut trace.tags[k];
                if let Some(a) = &attempt {
                    tt.keep_attempt(a.clone());
                    let added = if charged.contains(&seq) {
                        64
                    } else {
                        charged.push(seq);
                        attempt_size
                    };
                    *size += added;
                    added_bytes += added;
                }
                tt.outcome = outcome.clone();
                let update = Update {
                    trace_id: &trace.id,
                    tag,
                    event_id,
                    attempt: attempt.as_deref(),
                    outcome: &tt.outcome,
                };
                if let Ok(m) = serde_json::to_string(&update) {
                    msgs.push(m);
                }
            }
            ring.bytes += added_bytes;
            self.trim(ring);
        }
        for m in msgs {
            let _ = self.tx.send(StreamMsg::Update(m.into()));
        }
        concerned
    }

    /// Drops the oldest traces until the ring is within its count and byte budgets.
    fn trim(&self, ring: &mut Ring) {
        while ring.traces.len() > self.capacity || ring.bytes > self.max_bytes {
            let Some((old, old_size)) = ring.traces.pop_front() else {
                break;
            };
            let old_seq = ring.first_seq;
            ring.first_seq += 1;
            ring.bytes -= old_size;
            for t in &old.tags {
                if ring.by_event.get(&t.event_id) == Some(&old_seq) {
                    ring.by_event.remove(&t.event_id);
                }
            }
        }
        self.indexed.store(ring.indexed(), Ordering::Relaxed);
    }

    /// Recent traces, newest first, filtered.
    pub fn recent(&self, limit: usize, event: Option<&str>, tag: Option<&str>) -> Vec<Arc<Trace>> {
        let Ok(ring) = self.ring.lock() else {
            return Vec::new();
        };
        ring.traces
            .iter()
            .rev()
            .map(|(t, _)| t)
            .filter(|t| event.is_none_or(|e| t.events.iter().any(|ev| ev.event_name == e)))
            .filter(|t| tag.is_none_or(|g| t.tags.iter().any(|tt| tt.tag == g)))
            .take(limit)
            .cloned()
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Trace>> {
        let ring = self.ring.lock().ok()?;
        ring.traces
            .iter()
            .find(|(t, _)| t.id == id)
            .map(|(t, _)| t.clone())
    }

    /// (count, estimated bytes) held now.
    pub fn usage(&self) -> (usize, usize) {
        self.ring
            .lock()
            .map(|r| (r.traces.len(), r.bytes))
            .unwrap_or((0, 0))
    }
}

pub struct WatchGuard {
    traces: Arc<Traces>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.traces.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What an attempt adds to a trace's share of the ring's byte budget.
fn attempt_bytes(a: &Attempt) -> usize {
    a.request.body.len() + a.request.url.len() + a.response_body.len() + 200
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(id: usize, body: &str) -> Trace {
        Trace {
            id: id.to_string(),
            time_ms: 0,
            method: "GET".into(),
            scheme: "http".into(),
            path: "/g/collect".into(),
            query: String::new(),
            body: body.into(),
            body_truncated: false,
            headers: vec![],
            client_ip: "127.0.0.1".into(),
            host: "h".into(),
            client: Some("ga4"),
            status: 204,
            error: None,
            debug_marker: None,
            latency_us: 1,
            events: vec![Arc::new(Event {
                event_name: "page_view".into(),
                ..Default::default()
            })],
            cookies: vec![],
            tags: vec![TagTrace {
                tag: "ga4".into(),
                kind: "ga4",
                event_id: format!("e{id}"),
                event_name: "page_view".into(),
                fired: true,
                reason: "ok".into(),
                outcome: TagOutcome::new(TagState::Queued, ""),
                attempts: vec![],
            }],
            itp: None,
            events_bytes: 100,
        }
    }

    #[test]
    fn ring_is_bounded_by_count_and_bytes() {
        let t = Traces::new(100, 1 << 30, TraceSampling::All);
        for i in 0..10_000 {
            t.record(trace(i, "x"));
        }
        assert_eq!(t.usage().0, 100);
        assert_eq!(t.recent(1, None, None)[0].id, "9999");
        let t = Traces::new(1_000_000, 64 * 1024, TraceSampling::All);
        for i in 0..10_000 {
            t.record(trace(i, &"y".repeat(1000)));
        }
        let (n, bytes) = t.usage();
        assert!(bytes <= 64 * 1024 && n < 100, "{n} traces, {bytes} bytes");
        // evicted traces drop out of the event index too
        assert!(t.ring.lock().unwrap().by_event.len() <= n);
    }

    #[test]
    fn updates_patch_the_trace_and_reach_watchers() {
        let t = Traces::new(10, 1 << 20, TraceSampling::Watching);
        assert!(!t.wants(false));
        assert!(t.wants(true), "marked hits are always traced");
        let (_guard, mut rx) = t.watch();
        assert!(t.wants(false));
        t.record(trace(1, ""));
        t.update(
            "ga4",
            "e1",
            None,
            TagOutcome::new(TagState::Delivered, "HTTP 204"),
        );
        assert_eq!(
            t.get("1").unwrap().tags[0].outcome.state,
            TagState::Delivered
        );
        assert!(matches!(rx.try_recv().unwrap(), StreamMsg::Trace(_)));
        match rx.try_recv().unwrap() {
            StreamMsg::Update(j) => assert!(j.contains("\"delivered\""), "{j}"),
            other => panic!("{other:?}"),
        }
        drop(_guard);
        assert!(!t.wants(false));
    }

    fn attempt(outcome: &str) -> Attempt {
        Attempt {
            time_ms: 1,
            request: RequestView {
                method: "POST".into(),
                url: "http://vendor/g/collect".into(),
                headers: vec![],
                body: String::new(),
            },
            status: Some(204),
            response_body: String::new(),
            latency_ms: 1,
            outcome: outcome.into(),
        }
    }

    #[test]
    fn deliveries_that_finish_before_the_trace_is_recorded_still_show_in_it() {
        let t = Traces::new(10, 1 << 20, TraceSampling::All);
        assert!(!DeliveryObserver::enabled(&*t));
        t.expect(["e1"]);
        // The dispatcher asks before it builds the views it reports.
        assert!(DeliveryObserver::enabled(&*t));
        t.update(
            "ga4",
            "e1",
            Some(attempt("delivered")),
            TagOutcome::new(TagState::Delivered, "HTTP 204"),
        );
        // Another tag's update, and an event no hit expects: neither lands in this trace.
        t.update(
            "meta",
            "e1",
            None,
            TagOutcome::new(TagState::Retrying, "HTTP 503"),
        );
        t.update(
            "ga4",
            "e9",
            None,
            TagOutcome::new(TagState::Delivered, "HTTP 204"),
        );
        t.record(trace(1, ""));
        let tt = &t.get("1").unwrap().tags[0];
        assert_eq!(tt.outcome.state, TagState::Delivered);
        assert_eq!(tt.attempts.len(), 1);
        // Taken: nothing waits for the event any more, and later updates patch the trace.
        t.update(
            "ga4",
            "e1",
            None,
            TagOutcome::new(TagState::DeadLettered, "x"),
        );
        assert_eq!(
            t.get("1").unwrap().tags[0].outcome.state,
            TagState::DeadLettered
        );
        assert!(t.ring.lock().unwrap().early.is_empty());
        // Ids `record` took, still named in the order, do not count against the bound.
        let ids: Vec<String> = (0..MAX_EARLY).map(|i| format!("y{i}")).collect();
        t.expect(ids.iter().map(String::as_str));
        let ring = t.ring.lock().unwrap();
        assert_eq!(ring.early.len(), MAX_EARLY);
        assert!(ring.early.events.contains_key("y0"));
    }

    #[test]
    fn a_reused_event_id_updates_the_hit_that_waits_not_the_older_trace() {
        let t = Traces::new(10, 1 << 20, TraceSampling::All);
        t.record(trace(1, ""));
        t.update(
            "ga4",
            "e1",
            None,
            TagOutcome::new(TagState::Retrying, "HTTP 503"),
        );
        // The sender sends the same event again; its trace is not recorded yet.
        t.expect(["e1"]);
        t.update(
            "ga4",
            "e1",
            None,
            TagOutcome::new(TagState::Delivered, "HTTP 204"),
        );
        assert_eq!(
            t.get("1").unwrap().tags[0].outcome.state,
            TagState::Retrying
        );
        let mut again = trace(1, "");
        again.id = "2".into();
        t.record(again);
        assert_eq!(
            t.get("2").unwrap().tags[0].outcome.state,
            TagState::Delivered
        );
    }

    #[test]
    fn waiting_attempts_are_bounded_by_bytes_and_per_tag() {
        // A quarter of 64 KiB: a few 8 KB attempts, then outcomes only.
        let t = Traces::new(10, 64 * 1024, TraceSampling::All);
        t.expect(["e1"]);
        let mut big = attempt("retrying");
        big.response_body = "x".repeat(8_000);
        for _ in 0..(MAX_ATTEMPTS_KEPT + 5) {
            t.update(
                "ga4",
                "e1",
                Some(big.clone()),
                TagOutcome::new(TagState::Retrying, "HTTP 503"),
            );
        }
        {
            let ring = t.ring.lock().unwrap();
            assert!(ring.early.bytes <= 16 * 1024, "{}", ring.early.bytes);
            assert_eq!(ring.early.events["e1"].1.len(), MAX_ATTEMPTS_KEPT);
        }
        t.record(trace(1, ""));
        assert_eq!(t.ring.lock().unwrap().early.bytes, 0);
        assert_eq!(
            t.get("1").unwrap().tags[0].outcome.state,
            TagState::Retrying
        );
    }

    #[test]
    fn events_whose_trace_never_comes_are_forgotten_past_a_bound() {
        let t = Traces::new(10, 1 << 20, TraceSampling::All);
        let ids: Vec<String> = (0..MAX_EARLY + 10).map(|i| format!("x{i}")).collect();
        t.expect(ids.iter().map(String::as_str));
        let ring = t.ring.lock().unwrap();
        assert_eq!(ring.early.len(), MAX_EARLY);
        assert_eq!(ring.early.order.len(), MAX_EARLY);
        assert!(
            !ring.early.events.contains_key("x0"),
            "the oldest goes first"
        );
    }

    #[test]
    fn the_stream_reads_a_trace_from_the_ring_when_it_sends_it() {
        let t = Traces::new(2, 1 << 20, TraceSampling::All);
        let (_guard, mut rx) = t.watch();
        t.record(trace(1, "a"));
        let Ok(StreamMsg::Trace(seq)) = rx.try_recv() else {
            panic!("no trace message");
        };
        t.update(
            "ga4",
            "e1",
            None,
            TagOutcome::new(TagState::Delivered, "HTTP 204"),
        );
        let json: serde_json::Value = serde_json::from_str(&t.stream_json(seq).unwrap()).unwrap();
        assert_eq!(json["id"], "1");
        assert_eq!(json["events"][0]["event_name"], "page_view");
        // What happened since is in it: the page dedupes what the update messages repeat.
        assert_eq!(json["tags"][0]["outcome"]["state"], "delivered");
        // Gone from the ring before the stream got to it: nothing to send.
        t.record(trace(2, "b"));
        t.record(trace(3, "c"));
        assert!(t.stream_json(seq).is_none());
    }

    #[test]
    fn a_traces_estimated_size_is_near_its_json() {
        let mut tr = trace(7, &"b".repeat(2_000));
        tr.headers = (0..12)
            .map(|i| (format!("header-{i}"), "v".repeat(40)))
            .collect();
        let event = tr.events[0].clone();
        // What the hit path records: the stored payload's size.
        tr.events_bytes = event.to_payload().unwrap().len();
        let real = serde_json::to_vec(&tr).unwrap().len();
        let est = tr.estimated_bytes();
        assert!(
            est > real / 2 && est < real * 2,
            "estimated {est} bytes, JSON {real}"
        );
    }

    #[test]
    fn marked_sampling_ignores_open_pages() {
        let t = Traces::new(10, 1 << 20, TraceSampling::Marked);
        let (_guard, _rx) = t.watch();
        assert!(!t.wants(false), "an open page does not trace every hit");
        assert!(t.wants(true));
        assert!(!Traces::new(10, 1 << 20, TraceSampling::None).wants(true));
        assert!(Traces::new(10, 1 << 20, TraceSampling::All).wants(false));
    }

    #[test]
    fn updates_find_their_trace_after_older_ones_are_evicted() {
        let t = Traces::new(3, 1 << 20, TraceSampling::All);
        for i in 1..=5 {
            t.record(trace(i, ""));
        }
        let delivered = || TagOutcome::new(TagState::Delivered, "HTTP 204");
        // Evicted: nothing to patch, nothing sent.
        let (_guard, mut rx) = t.watch();
        t.update("ga4", "e1", None, delivered());
        assert!(rx.try_recv().is_err());
        t.update("ga4", "e4", None, delivered());
        let state = |id: &str| t.get(id).unwrap().tags[0].outcome.state;
        assert_eq!(state("4"), TagState::Delivered);
        assert_eq!(state("3"), TagState::Queued);
        assert_eq!(state("5"), TagState::Queued);

        // A reader keeps the trace as it was; the ring gets the update.
        let held = t.get("5").unwrap();
        t.update("ga4", "e5", None, delivered());
        assert_eq!(held.tags[0].outcome.state, TagState::Queued);
        assert_eq!(state("5"), TagState::Delivered);

        // More evictions later, the index still points at the right traces.
        for i in 6..=7 {
            t.record(trace(i, ""));
        }
        t.update("ga4", "e6", None, delivered());
        assert_eq!(state("6"), TagState::Delivered);
        assert_eq!(state("7"), TagState::Queued);
        assert!(t.get("4").is_none());
        assert_eq!(t.ring.lock().unwrap().by_event.len(), 3);
    }

    #[test]
    fn secret_query_values_are_redacted() {
        assert_eq!(
            redact_query("measurement_id=G-1&api_secret=s3cr3t&x=1"),
            "measurement_id=G-1&api_secret=[redacted]&x=1"
        );
        // A sender may encode the name; the value must not reach the debug view either way.
        assert_eq!(
            redact_query("api%5Fsecret=s3cr3t&access%5ftoken=t&appsecret_proof=p"),
            "api%5Fsecret=[redacted]&access%5ftoken=[redacted]&appsecret_proof=[redacted]"
        );
    }

    #[test]
    fn cookie_values_are_shortened() {
        assert_eq!(
            shorten_cookie_header("_ga=GA1.1.1234567890.1764912990; a=b"),
            "_ga=GA1.1.1234…; a=b"
        );
        assert_eq!(truncate("héllo", 2), ("hé".to_string(), true));
    }
}
