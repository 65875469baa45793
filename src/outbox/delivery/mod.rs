//! Dispatchers: one task per tag leases due records, encodes them with the tag, sends the
//! requests, classifies the answers and settles the records (ack / retry later / dead-letter).
//!
//! Tags are looked up by name in a [`TagDirectory`] (the configuration in force) on every
//! batch, so a config reload changes encoders without restarting anything; a supervisor starts
//! dispatchers for new tag names within a second (or at once via [`Dispatchers::ensure`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

pub mod retry;
#[cfg(test)]
mod status_tests;

use crate::clock::now_ms;
use crate::event::Event;
use crate::outbox::config::OutboxConfig;
use crate::outbox::{
    DeadLetterRequest, DeliveryStore, HotQueue, LeasedRecord, Nack, Settlement, StoreError,
};
use crate::tags::{
    Credential, Encoded, OutboundRequest, Outcome, StatusCheck, StatusOutcome, TagInstance,
};
use crate::trace::{AttemptOutcome, DeliveryObserver, RequestView, Settled};
use retry::{human_duration, retry_label, RetryDecision, RetryPolicy, MAX_RETRY_AFTER};

/// Records per settle request (the writer gives dispatcher work about this much of each
/// commit while hits wait).
const SETTLE_CHUNK: usize = 64;

/// Most of a vendor response body kept for classification and the debug view.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// The threads that send to vendors: a runtime of their own, so encoding, TLS and response
/// handling for a burst of deliveries never queue in front of hits on the request
/// runtime's threads, and (with `dispatch_nice`) the kernel runs hits first when both want
/// the CPU.
#[derive(Debug)]
pub struct DeliveryRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

/// Name of the delivery threads (visible in `top -H`, `ps -L`, profiles).
pub const DELIVERY_THREAD_NAME: &str = "tagrelay-send";

impl DeliveryRuntime {
    pub fn start(cfg: &OutboxConfig) -> std::io::Result<DeliveryRuntime> {
        let threads = match cfg.dispatch_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let nice = cfg.dispatch_nice;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(DELIVERY_THREAD_NAME)
            .on_thread_start(move || lower_priority(nice))
            .enable_all()
            .build()?;
        Ok(DeliveryRuntime {
            runtime: Some(runtime),
        })
    }

    pub fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.runtime.as_ref().map(|r| r.handle())
    }

    /// Stops the threads without waiting for tasks still running (shut the dispatchers down
    /// first). Safe to call from async code, unlike dropping a runtime.
    pub fn shutdown(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for DeliveryRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(target_os = "linux")]
fn lower_priority(nice: i32) {
    if nice > 0 {
        // Linux keeps the nice value per thread: this touches only the calling thread.
        if let Err(e) = rustix::process::setpriority_process(None, nice) {
            tracing::warn!(error = %e, nice, "cannot lower the priority of a delivery thread; it shares the CPU evenly with hits");
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_nice: i32) {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchSettings {
    /// Batches (requests) of one tag in flight at once.
    pub concurrency: usize,
    pub lease_timeout: Duration,
    /// Wait after a wake-up when traffic is light, so batches fill.
    pub linger: Duration,
    /// Look for due retries this often when nothing wakes the dispatcher.
    pub idle_poll: Duration,
    /// Refresh the pending gauges this often.
    pub gauge_interval: Duration,
    pub retry: RetryPolicy,
}

impl DispatchSettings {
    pub fn from_config(cfg: &OutboxConfig) -> Self {
        DispatchSettings {
            concurrency: cfg.dispatch_concurrency.max(1),
            lease_timeout: Duration::from_millis(cfg.lease_timeout_ms.max(1_000)),
            linger: Duration::from_millis(cfg.dispatch_linger_ms),
            idle_poll: Duration::from_secs(1),
            gauge_interval: Duration::from_secs(5),
            retry: RetryPolicy::from_config(cfg),
        }
    }
}

struct Inner {
    /// Where dispatcher tasks run (the delivery runtime in the server).
    runtime: tokio::runtime::Handle,
    store: Arc<dyn DeliveryStore>,
    tags: Arc<dyn TagDirectory>,
    http: reqwest::Client,
    observer: Arc<dyn DeliveryObserver>,
    settings: DispatchSettings,
    /// `Some(deadline)` once shutdown began: stop leasing, finish sends by the deadline.
    shutdown: watch::Sender<Option<tokio::time::Instant>>,
    running: Mutex<HashMap<Arc<str>, JoinHandle<()>>>,
}

/// The running dispatchers. Dropping this handle does not stop them; call `shutdown`.
pub struct Dispatchers {
    inner: Arc<Inner>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Dispatchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatchers")
            .field("tags", &self.running_tags())
            .field("settings", &self.inner.settings)
            .finish()
    }
}

/// Where dispatchers find the tags in force. The application's swappable pipeline implements
/// it, so a reload changes encoders without restarting anything.
pub trait TagDirectory: Send + Sync + 'static {
    /// The tag named `name` in the configuration in force.
    fn tag(&self, name: &str) -> Option<Arc<TagInstance>>;
    /// Every tag name in the configuration in force.
    fn names(&self) -> Vec<Arc<str>>;
}

/// Starts one dispatcher per tag of the current pipeline and a supervisor that adds
/// dispatchers for tags that appear on reload and refreshes the pending gauges.
/// Must be called inside a tokio runtime; every dispatcher task runs on that runtime, even
/// those started later from another one (see [`DeliveryRuntime`]).
pub fn spawn_dispatchers(
    store: Arc<dyn DeliveryStore>,
    tags: Arc<dyn TagDirectory>,
    settings: DispatchSettings,
    observer: Arc<dyn DeliveryObserver>,
) -> Result<Dispatchers, reqwest::Error> {
    let http = reqwest::Client::builder()
        .user_agent(concat!("tagrelay/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(settings.concurrency.max(8))
        .connect_timeout(Duration::from_secs(10))
        // Following a redirect turns a POST into a body-less GET that may answer 200: data
        // would be acknowledged without being sent. A 3xx is a configuration error instead.
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let (shutdown, _) = watch::channel(None);
    let inner = Arc::new(Inner {
        runtime: tokio::runtime::Handle::current(),
        store,
        tags,
        http,
        observer,
        settings,
        shutdown,
        running: Mutex::new(HashMap::new()),
    });
    inner.ensure();
    let supervisor = inner.runtime.spawn(supervise(inner.clone()));
    Ok(Dispatchers {
        inner,
        supervisor: Mutex::new(Some(supervisor)),
    })
}

impl Dispatchers {
    /// Starts dispatchers for tags of the current pipeline that have none (call after a
    /// reload to skip the supervisor's one-second delay).
    pub fn ensure(&self) {
        self.inner.ensure();
    }

    /// Tag names with a running dispatcher.
    pub fn running_tags(&self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = match self.inner.running.lock() {
            Ok(map) => map
                .iter()
                .filter(|(_, h)| !h.is_finished())
                .map(|(n, _)| n.clone())
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    /// Stops leasing, gives in-flight sends until `grace` to finish (their records are
    /// settled), abandons the rest (their leases are cleared at the next open, so they are
    /// resent), and returns. Close the store afterwards.
    pub async fn shutdown(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        self.inner.shutdown.send_replace(Some(deadline));
        let supervisor = self.supervisor.lock().ok().and_then(|mut s| s.take());
        if let Some(s) = supervisor {
            let _ = s.await;
        }
        let handles: Vec<JoinHandle<()>> = match self.inner.running.lock() {
            Ok(mut map) => map.drain().map(|(_, h)| h).collect(),
            Err(_) => Vec::new(),
        };
        for h in handles {
            // Each tag task enforces the deadline itself; this bound only guards against bugs.
            let abort = h.abort_handle();
            if tokio::time::timeout_at(deadline + Duration::from_secs(1), h)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Inner {
    fn ensure(self: &Arc<Self>) {
        if self.shutdown.borrow().is_some() {
            return;
        }
        let names = self.tags.names();
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        running.retain(|_, h| !h.is_finished());
        for name in names {
            if let std::collections::hash_map::Entry::Vacant(slot) = running.entry(name) {
                tracing::debug!(tag = %slot.key(), "outbox: starting dispatcher");
                let name = slot.key().clone();
                slot.insert(self.runtime.spawn(run_tag(self.clone(), name)));
            }
        }
    }
}

async fn supervise(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut last_gauges: Option<Instant> = None;
    let mut gauged: HashSet<String> = HashSet::new();
    loop {
        if last_gauges.is_none_or(|t| t.elapsed() >= inner.settings.gauge_interval) {
            last_gauges = Some(Instant::now());
            refresh_gauges(&inner, &mut gauged).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => {}
        }
        if shutdown.borrow().is_some() {
            break;
        }
        inner.ensure();
    }
}

async fn refresh_gauges(inner: &Inner, gauged: &mut HashSet<String>) {
    let now = now_ms();
    let backlog = match inner.store.backlog(now).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "outbox: cannot read backlog for gauges");
            return;
        }
    };
    let mut seen = HashSet::with_capacity(backlog.len());
    for b in backlog {
        let oldest = b
            .oldest_enqueued_ms
            .map(|t| (now.saturating_sub(t)).max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        metrics::gauge!("tagrelay_outbox_pending", "tag" => b.tag.clone()).set(b.pending as f64);
        metrics::gauge!("tagrelay_outbox_oldest_pending_seconds", "tag" => b.tag.clone())
            .set(oldest);
        seen.insert(b.tag);
    }
    for t in inner
        .tags
        .names()
        .iter()
        .map(|t| t.to_string())
        .chain(gauged.drain())
    {
        if !seen.contains(&t) {
            metrics::gauge!("tagrelay_outbox_pending", "tag" => t.clone()).set(0.0);
            metrics::gauge!("tagrelay_outbox_oldest_pending_seconds", "tag" => t.clone()).set(0.0);
        }
    }
    *gauged = seen;
}

/// Waits for a wake-up, the idle poll, or shutdown. Returns `false` on shutdown.
async fn idle(
    inner: &Inner,
    wake: &tokio::sync::Notify,
    shutdown: &mut watch::Receiver<Option<tokio::time::Instant>>,
) -> bool {
    let woke = tokio::select! {
        _ = wake.notified() => true,
        _ = tokio::time::sleep(inner.settings.idle_poll) => false,
        _ = shutdown.changed() => return false,
    };
    if woke && !inner.settings.linger.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(inner.settings.linger) => {}
            _ = shutdown.changed() => return false,
        }
    }
    shutdown.borrow().is_none()
}

/// Records one tag's dispatcher may hold in memory, handed over by the writer, per batch
/// it can have in flight: enough to keep every permit busy between two wake-ups.
const HOT_BATCHES_PER_PERMIT: usize = 4;

async fn run_tag(inner: Arc<Inner>, name: Arc<str>) {
    let wake = inner.store.wakeup(&name);
    let permits = Arc::new(Semaphore::new(inner.settings.concurrency));
    let mut shutdown = inner.shutdown.subscribe();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let lease_ms = u64::try_from(inner.settings.lease_timeout.as_millis()).unwrap_or(u64::MAX);
    let hot = inner.tags.tag(&name).and_then(|t| {
        let capacity =
            (t.tag.max_batch().max(1) * inner.settings.concurrency * HOT_BATCHES_PER_PERMIT)
                .clamp(256, 2_048);
        inner.store.subscribe_hot(&name, capacity, lease_ms)
    });
    // Records can be due in the store (retries, overflow, a previous process's backlog):
    // look there first, then whenever the writer left some there, and at least every poll.
    let mut store_due = true;
    let mut last_store_look = Instant::now();
    // What each delivery task carries, so a task that panics can still settle its records.
    let mut carried: HashMap<tokio::task::Id, Vec<Carried>> = HashMap::new();
    // Until when the vendor asked (Retry-After) this tag to send nothing.
    let pause = Arc::new(AtomicI64::new(0));
    loop {
        while let Some(done) = tasks.try_join_next_with_id() {
            finished(&inner, &name, done, &mut carried).await;
        }
        if shutdown.borrow().is_some() {
            break;
        }
        let Some(tag) = inner.tags.tag(&name) else {
            tracing::info!(tag = %name, "outbox: tag removed from config; its pending records stay in the outbox");
            break;
        };
        // Take a permit before leasing so records are never leased while they cannot be sent.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => continue,
        };
        let paused_ms = pause.load(Ordering::Acquire).saturating_sub(now_ms());
        if paused_ms > 0 {
            drop(permit);
            let wait = Duration::from_millis(u64::try_from(paused_ms).unwrap_or(0));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let limit = tag.tag.max_batch().max(1);
        if let Some(q) = &hot {
            store_due |= q.take_overflowed();
        }
        store_due |= last_store_look.elapsed() >= inner.settings.idle_poll;
        let mut batch = Vec::new();
        if !store_due {
            if let Some(q) = &hot {
                batch = take_hot(&inner, &name, q, limit).await;
            }
        }
        if batch.is_empty() {
            last_store_look = Instant::now();
            batch = match inner.store.lease(&name, now_ms(), limit, lease_ms).await {
                Ok(b) => b,
                Err(StoreError::Closed) => break,
                Err(e) => {
                    tracing::warn!(tag = %name, error = %e, "outbox: lease failed; retrying");
                    drop(permit);
                    if !idle(&inner, &wake, &mut shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            // A full batch means there may be more due in the store.
            store_due = batch.len() >= limit;
            if batch.is_empty() {
                if let Some(q) = &hot {
                    batch = take_hot(&inner, &name, q, limit).await;
                }
            }
        }
        if batch.is_empty() {
            drop(permit);
            if !idle(&inner, &wake, &mut shutdown).await {
                break;
            }
            continue;
        }
        let full = batch.len() >= limit;
        let what: Vec<Carried> = batch
            .iter()
            .map(|r| Carried {
                id: r.id,
                attempts: r.attempts,
                first_enqueued_ms: r.first_enqueued_ms,
            })
            .collect();
        let task = tasks.spawn(deliver(inner.clone(), tag, batch, pause.clone(), permit));
        carried.insert(task.id(), what);
        let more_waiting = store_due || hot.as_ref().is_some_and(|q| !q.is_empty());
        // A partial batch with nothing else waiting means everything due was taken: wait
        // for more rather than spin.
        if !full && !more_waiting && !idle(&inner, &wake, &mut shutdown).await {
            break;
        }
    }
    if let Some(q) = &hot {
        inner.store.unsubscribe_hot(&name);
        // Due again at once, for the next dispatcher of this tag or the next process.
        if let Err(e) = inner.store.release(q.drain()).await {
            tracing::debug!(tag = %name, error = %e, "outbox: could not give back leases; they end on their own");
        }
    }
    let deadline = *shutdown.borrow();
    match deadline {
        Some(deadline) => {
            let drained = tokio::time::timeout_at(deadline, async {
                while let Some(done) = tasks.join_next_with_id().await {
                    finished(&inner, &name, done, &mut carried).await;
                }
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    tag = %name,
                    in_flight = tasks.len(),
                    "outbox: shutdown deadline reached; unfinished sends will be retried after restart"
                );
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
            }
        }
        None => {
            while let Some(done) = tasks.join_next_with_id().await {
                finished(&inner, &name, done, &mut carried).await;
            }
        }
    }
}

/// Takes a batch from the in-memory queue; gives back to the store what waited too long.
async fn take_hot(inner: &Inner, name: &str, q: &HotQueue, limit: usize) -> Vec<LeasedRecord> {
    let (fresh, stale) = q.take(limit, now_ms());
    if !stale.is_empty() {
        if let Err(e) = inner.store.release(stale).await {
            // Their leases end on their own; they are sent then.
            tracing::warn!(tag = %name, error = %e, "outbox: could not give back leases");
        }
    }
    fresh
}

/// After a failed attempt: retry later (`Ok`), or give up once the retry window has ended
/// (`Err`, the dead letter). `reason` says what failed.
fn after_failure(
    policy: &RetryPolicy,
    rec: &Carried,
    now: i64,
    window: Duration,
    after: Option<Duration>,
    reason: String,
    rng: &mut impl rand::Rng,
) -> Result<Nack, DeadLetterRequest> {
    let attempts = rec.attempts.saturating_add(1);
    match policy.decide(attempts, rec.first_enqueued_ms, now, window, after, rng) {
        RetryDecision::RetryAt(at) => Ok(Nack {
            id: rec.id,
            next_attempt_ms: at,
            error: reason,
        }),
        RetryDecision::GiveUp => {
            let span =
                Duration::from_millis(u64::try_from(now - rec.first_enqueued_ms).unwrap_or(0));
            Err(DeadLetterRequest {
                id: rec.id,
                reason: format!(
                    "expired: gave up after {attempts} attempts over {}: {reason}",
                    human_duration(span)
                ),
                attempted: true,
            })
        }
    }
}

/// A record as a delivery task took it.
struct Carried {
    id: i64,
    attempts: u32,
    first_enqueued_ms: i64,
}

/// Bookkeeping for a finished delivery task. One that panicked (a bug in an encoder, say)
/// never settled its records: left leased they would be taken again when the lease ends
/// and panic again, forever. They count a failed attempt instead, so they back off and are
/// dead-lettered when their retry window ends, like any other failure.
async fn finished(
    inner: &Inner,
    name: &str,
    done: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    carried: &mut HashMap<tokio::task::Id, Vec<Carried>>,
) {
    let e = match done {
        Ok((id, ())) => {
            carried.remove(&id);
            return;
        }
        Err(e) => e,
    };
    let records = carried.remove(&e.id()).unwrap_or_default();
    if !e.is_panic() {
        // Aborted at the shutdown deadline: the records are resent after the restart.
        return;
    }
    let now = now_ms();
    let window = match inner.tags.tag(name) {
        Some(t) => inner.settings.retry.window_for(&t.tag.delivery_rules()),
        None => inner.settings.retry.max_age,
    };
    let error = "delivery task panicked (a bug in tagrelay)";
    let mut settlement = Settlement {
        now_ms: now,
        ..Settlement::default()
    };
    {
        let mut rng = rand::thread_rng();
        for r in &records {
            match after_failure(
                &inner.settings.retry,
                r,
                now,
                window,
                None,
                error.to_owned(),
                &mut rng,
            ) {
                Ok(nack) => settlement.nack.push(nack),
                Err(dead) => settlement.dead.push(dead),
            }
        }
    }
    tracing::error!(
        tag = %name,
        records = records.len(),
        error = %e,
        "outbox: delivery task panicked; its records will be retried with backoff"
    );
    if !settlement.dead.is_empty() {
        metrics::counter!("tagrelay_outbox_dead_lettered_total", "tag" => name.to_string(), "reason" => "expired")
            .increment(settlement.dead.len() as u64);
    }
    for part in settlement.chunks(SETTLE_CHUNK) {
        if let Err(e) = inner.store.settle(part).await {
            tracing::error!(tag = %name, error = %e, "outbox: could not record delivery results");
        }
    }
}

/// A record's fate within one batch. Ordered by severity: a record carried by several
/// requests takes its worst outcome (resending a delivered part is allowed, losing one is not).
#[derive(Debug, Clone, PartialEq)]
enum Fate {
    Undecided,
    /// The tag chose not to send it: done, but not counted as delivered.
    Skipped,
    /// Already settled before sending (invalid payload, past the vendor's age limit).
    Settled,
    Done,
    Rejected(String),
    Retry {
        after: Option<Duration>,
        reason: String,
        label: &'static str,
    },
}

impl Fate {
    fn rank(&self) -> u8 {
        match self {
            Fate::Undecided => 0,
            Fate::Skipped | Fate::Done => 1,
            Fate::Rejected(_) => 2,
            Fate::Retry { .. } => 3,
            Fate::Settled => 4,
        }
    }
    fn merge(&mut self, other: Fate) {
        if other.rank() > self.rank() {
            *self = other;
        }
    }
}

async fn deliver(
    inner: Arc<Inner>,
    tag: Arc<TagInstance>,
    batch: Vec<LeasedRecord>,
    pause: Arc<AtomicI64>,
    _permit: OwnedSemaphorePermit,
) {
    let name: &str = &tag.name;
    let now = now_ms();
    let mut settlement = Settlement {
        now_ms: now,
        ..Settlement::default()
    };
    let rules = tag.tag.delivery_rules();
    let mut fates: Vec<Fate> = vec![Fate::Undecided; batch.len()];
    let mut events: Vec<Arc<Event>> = Vec::with_capacity(batch.len());
    // Event index (what the tag sees) → record index.
    let mut owners: Vec<usize> = Vec::with_capacity(batch.len());
    let mut invalid = 0u64;
    let mut expired = 0u64;
    for (i, rec) in batch.iter().enumerate() {
        let parsed = match &rec.event {
            Some(ev) => Ok(ev.clone()),
            None => Event::from_payload(&rec.payload).map(Arc::new),
        };
        match parsed {
            Ok(ev) => {
                let born = if ev.timestamp_ms > 0 {
                    ev.timestamp_ms
                } else {
                    rec.first_enqueued_ms
                };
                let age = Duration::from_millis(u64::try_from(now - born).unwrap_or(0));
                if let Some(limit) = rules.max_event_age.filter(|limit| age >= *limit) {
                    expired += 1;
                    settlement.dead.push(DeadLetterRequest {
                        id: rec.id,
                        reason: format!(
                            "expired: {} accepts events up to {} old and this one is {} old",
                            rules.vendor,
                            human_duration(limit),
                            human_duration(age)
                        ),
                        attempted: false,
                    });
                    if let Some(f) = fates.get_mut(i) {
                        *f = Fate::Settled;
                    }
                    continue;
                }
                events.push(ev);
                owners.push(i);
            }
            Err(e) => {
                invalid += 1;
                settlement.dead.push(DeadLetterRequest {
                    id: rec.id,
                    reason: format!("invalid: stored payload is not an event: {e}"),
                    attempted: false,
                });
                if let Some(f) = fates.get_mut(i) {
                    *f = Fate::Settled;
                }
            }
        }
    }

    let encoded = if events.is_empty() {
        Encoded::default()
    } else {
        let refs: Vec<&Event> = events.iter().map(|e| &**e).collect();
        tag.tag.encode_batch(&refs, now)
    };
    let mut rejected = 0u64;
    for (idx, reason) in &encoded.rejected {
        if let Some(&r) = owners.get(*idx) {
            if let Some(f) = fates.get_mut(r) {
                f.merge(Fate::Rejected(reason.clone()));
            }
        }
    }
    for (idx, _) in &encoded.skipped {
        if let Some(&r) = owners.get(*idx) {
            if let Some(f) = fates.get_mut(r) {
                f.merge(Fate::Skipped);
            }
        }
    }

    for (request, idxs) in &encoded.requests {
        let records: Vec<usize> = idxs
            .iter()
            .filter_map(|i| owners.get(*i).copied())
            .collect();
        let fate = send(&inner, &tag, request, &records, &batch).await;
        if matches!(fate, Fate::Rejected(_)) && idxs.len() > 1 {
            let found = bisect(&inner, &tag, &events, idxs, now, &batch, &owners).await;
            for (i, fate) in found {
                if let Some(f) = owners.get(i).and_then(|&r| fates.get_mut(r)) {
                    f.merge(fate);
                }
            }
            continue;
        }
        for r in records {
            if let Some(f) = fates.get_mut(r) {
                f.merge(fate.clone());
            }
        }
    }
    drop(events);

    let now = now_ms();
    settlement.now_ms = now;
    let window = inner.settings.retry.window_for(&rules);
    let mut delivered = 0u64;
    let mut gave_up = 0u64;
    let mut retries: Vec<(&'static str, u64)> = Vec::new();
    let observe = inner.observer.enabled();
    let skipped_reason = |rec_idx: usize| -> String {
        encoded
            .skipped
            .iter()
            .find(|(i, _)| owners.get(*i) == Some(&rec_idx))
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    };
    {
        let mut rng = rand::thread_rng();
        for (rec_idx, (rec, fate)) in batch.iter().zip(fates).enumerate() {
            let (dead_before, nack_before) = (settlement.dead.len(), settlement.nack.len());
            match fate {
                Fate::Settled => {
                    if observe {
                        if let Some(d) = settlement.dead.iter().find(|d| d.id == rec.id) {
                            inner.observer.settled(
                                name,
                                &rec.event_id,
                                Settled::DeadLettered(&d.reason),
                            );
                        }
                    }
                }
                Fate::Skipped => {
                    settlement.ack.push(rec.id);
                    if observe {
                        let reason = skipped_reason(rec_idx);
                        inner
                            .observer
                            .settled(name, &rec.event_id, Settled::Skipped(&reason));
                    }
                }
                Fate::Done => {
                    delivered += 1;
                    settlement.ack.push(rec.id);
                    if observe {
                        inner
                            .observer
                            .settled(name, &rec.event_id, Settled::Delivered);
                    }
                }
                Fate::Undecided => {
                    invalid += 1;
                    settlement.dead.push(DeadLetterRequest {
                        id: rec.id,
                        reason: format!(
                            "invalid: tag `{name}` neither sent, skipped nor rejected this event"
                        ),
                        attempted: false,
                    });
                }
                Fate::Rejected(reason) => {
                    rejected += 1;
                    settlement.dead.push(DeadLetterRequest {
                        id: rec.id,
                        reason: format!("rejected: {reason}"),
                        attempted: true,
                    });
                }
                Fate::Retry {
                    after,
                    reason,
                    label,
                } => {
                    if let Some(after) = after {
                        // The vendor asked the whole tag to wait, not just this request
                        // (within reason, whatever it says).
                        let wait = after.min(MAX_RETRY_AFTER);
                        pause.fetch_max(
                            now.saturating_add(retry::duration_ms(wait)),
                            Ordering::AcqRel,
                        );
                    }
                    let carried = Carried {
                        id: rec.id,
                        attempts: rec.attempts,
                        first_enqueued_ms: rec.first_enqueued_ms,
                    };
                    match after_failure(
                        &inner.settings.retry,
                        &carried,
                        now,
                        window,
                        after,
                        reason,
                        &mut rng,
                    ) {
                        Ok(nack) => {
                            match retries.iter_mut().find(|(l, _)| *l == label) {
                                Some((_, n)) => *n += 1,
                                None => retries.push((label, 1)),
                            }
                            settlement.nack.push(nack);
                        }
                        Err(dead) => {
                            gave_up += 1;
                            settlement.dead.push(dead);
                        }
                    }
                }
            }
            if observe {
                if let Some(d) = settlement.dead.get(dead_before..).and_then(|d| d.first()) {
                    inner
                        .observer
                        .settled(name, &rec.event_id, Settled::DeadLettered(&d.reason));
                } else if let Some(n) = settlement.nack.get(nack_before..).and_then(|n| n.first()) {
                    inner.observer.settled(
                        name,
                        &rec.event_id,
                        Settled::Retrying {
                            reason: &n.error,
                            next_attempt_ms: n.next_attempt_ms,
                        },
                    );
                }
            }
        }
    }
    expired += gave_up;

    let tag_label = name.to_string();
    if delivered > 0 {
        metrics::counter!("tagrelay_outbox_delivered_total", "tag" => tag_label.clone())
            .increment(delivered);
    }
    for (label, n) in retries {
        metrics::counter!("tagrelay_outbox_retries_total", "tag" => tag_label.clone(), "reason" => label)
            .increment(n);
    }
    for (label, n) in [
        ("rejected", rejected),
        ("expired", expired),
        ("invalid", invalid),
    ] {
        if n > 0 {
            metrics::counter!("tagrelay_outbox_dead_lettered_total", "tag" => tag_label.clone(), "reason" => label)
                .increment(n);
        }
    }
    if let Some(first) = settlement.dead.first() {
        // One line per batch: a vendor rejecting everything must not flood the logs.
        tracing::warn!(
            tag = %name,
            records = settlement.dead.len(),
            first_reason = %first.reason,
            "outbox: dead-lettered (list with `tagrelay outbox dead-letters`)"
        );
    }
    // In slices, so a big batch's acks never hold up hits' commits (see the writer).
    let parts = settlement.chunks(SETTLE_CHUNK);
    let results =
        futures_util::future::join_all(parts.into_iter().map(|p| inner.store.settle(p))).await;
    if let Some(e) = results.into_iter().find_map(Result::err) {
        // The leases expire and these records are sent again: at-least-once, never lost.
        tracing::error!(tag = %name, error = %e, "outbox: could not record delivery results");
    }
}

/// A vendor refused a request carrying several events (Meta fails a whole batch for one bad
/// event). Split it in halves and resend until the refused events stand alone, so one bad
/// event never dead-letters its neighbours. When both halves of a split are refused, the
/// error is about the request (an invalid token), not an event: stop splitting and reject
/// them all, so a bad token costs two extra requests, not one per event.
/// Returns (event index, fate) for every event of `idxs`.
async fn bisect(
    inner: &Inner,
    tag: &TagInstance,
    events: &[Arc<Event>],
    idxs: &[usize],
    now: i64,
    batch: &[LeasedRecord],
    owners: &[usize],
) -> Vec<(usize, Fate)> {
    let mut out = Vec::with_capacity(idxs.len());
    let mut stack = vec![idxs.to_vec()];
    while let Some(set) = stack.pop() {
        let (a, b) = set.split_at(set.len() / 2);
        let mut results = Vec::with_capacity(2);
        for half in [a, b] {
            let subset: Vec<&Event> = half
                .iter()
                .filter_map(|&i| events.get(i).map(|e| &**e))
                .collect();
            let encoded = tag.tag.encode_batch(&subset, now);
            let mut fates: Vec<(usize, Fate)> = Vec::new();
            for (sub, reason) in &encoded.rejected {
                fates.extend(half.get(*sub).map(|&i| (i, Fate::Rejected(reason.clone()))));
            }
            for (sub, _) in &encoded.skipped {
                fates.extend(half.get(*sub).map(|&i| (i, Fate::Skipped)));
            }
            for (request, subs) in &encoded.requests {
                let ev: Vec<usize> = subs.iter().filter_map(|s| half.get(*s).copied()).collect();
                let records: Vec<usize> =
                    ev.iter().filter_map(|i| owners.get(*i).copied()).collect();
                let fate = send(inner, tag, request, &records, batch).await;
                fates.extend(ev.into_iter().map(|i| (i, fate.clone())));
            }
            results.push((half, fates));
        }
        let all_rejected = |f: &[(usize, Fate)]| {
            !f.is_empty() && f.iter().all(|(_, x)| matches!(x, Fate::Rejected(_)))
        };
        let request_wide = results.iter().all(|(_, f)| all_rejected(f));
        for (half, fates) in results {
            if !request_wide && half.len() > 1 && all_rejected(&fates) {
                stack.push(half.to_vec());
            } else {
                out.extend(fates);
            }
        }
    }
    out
}

/// Sends one request and classifies the answer; for a vendor that processes asynchronously,
/// also waits (bounded) for the request's real outcome.
async fn send(
    inner: &Inner,
    tag: &TagInstance,
    request: &OutboundRequest,
    records: &[usize],
    batch: &[LeasedRecord],
) -> Fate {
    let credential = tag.tag.credential();
    let (status, body, fate, latency) = attempt(inner, tag, request, credential.as_deref()).await;
    let check = match fate {
        Fate::Done => tag.tag.status_check(&body),
        _ => None,
    };
    let outcome = match check {
        // Accepted for later processing: pending until its status is known.
        Some(_) => AttemptOutcome::Pending("accepted; checking its processing status".into()),
        None => fate_outcome(&fate),
    };
    observe(
        inner, tag, request, records, batch, status, &body, latency, &outcome,
    );
    match check {
        Some(check) => check_status(inner, tag, check, credential.as_deref(), records, batch).await,
        None => fate,
    }
}

/// One HTTP exchange: `(status, response body, fate, latency)`. With a credential, its
/// `Authorization` goes on the request; failing to get one is retried like a network error.
async fn attempt(
    inner: &Inner,
    tag: &TagInstance,
    request: &OutboundRequest,
    credential: Option<&dyn Credential>,
) -> (Option<u16>, Bytes, Fate, Duration) {
    let started = Instant::now();
    let authorization = match credential {
        None => None,
        Some(c) => match c.authorization().await {
            Ok(v) => Some(v),
            Err(e) => {
                let fate = Fate::Retry {
                    after: None,
                    reason: tag.tag.redact(&format!("credentials: {e}")),
                    label: "auth",
                };
                return (None, Bytes::new(), fate, started.elapsed());
            }
        },
    };
    let mut builder = inner
        .http
        .request(request.method.clone(), &request.url)
        .timeout(tag.tag.timeout())
        .body(request.body.clone());
    for (k, v) in &request.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    if let Some(a) = &authorization {
        builder = builder.header(reqwest::header::AUTHORIZATION, a.expose());
    }
    let (status, body, fate) = match builder.send().await {
        Ok(resp) => {
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = read_body(resp).await;
            let fate = if status.is_redirection() {
                let to = headers
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?");
                Fate::Rejected(tag.tag.redact(&format!(
                    "HTTP {} redirect to {to}: point the tag at the final URL",
                    status.as_u16()
                )))
            } else {
                match tag.tag.classify(status, &headers, &body) {
                    Outcome::Delivered => Fate::Done,
                    Outcome::Rejected { reason } => Fate::Rejected(tag.tag.redact(&reason)),
                    Outcome::Retry { after, reason } => Fate::Retry {
                        after,
                        reason: tag.tag.redact(&reason),
                        label: retry_label(Some(status.as_u16()), false),
                    },
                }
            };
            (Some(status.as_u16()), body, fate)
        }
        // The request itself cannot be built (e.g. a header value with a control character):
        // retrying never helps.
        Err(e) if e.is_builder() => (
            None,
            Bytes::new(),
            Fate::Rejected(
                tag.tag
                    .redact(&format!("invalid request: {}", e.without_url())),
            ),
        ),
        Err(e) => {
            let timed_out = e.is_timeout();
            let label = retry_label(None, timed_out);
            let reason = tag.tag.redact(&format!("{label}: {}", e.without_url()));
            (
                None,
                Bytes::new(),
                Fate::Retry {
                    after: None,
                    reason,
                    label,
                },
            )
        }
    };
    let latency = started.elapsed();
    metrics::histogram!("tagrelay_tag_request_duration_seconds", "tag" => tag.name.to_string())
        .record(latency.as_secs_f64());
    (status, body, fate, latency)
}

/// Polls a vendor's status for a request it accepted, every `interval`, until the tag gives a
/// final outcome or the wait ends (the check's `max_wait`, at most half the lease, so the
/// records are never handed out again while their status is awaited). The records stay leased
/// meanwhile and the delivery slot stays taken: the request is not done until its status is
/// known. A wait that ends undecided leaves the accepted request delivered.
async fn check_status(
    inner: &Inner,
    tag: &TagInstance,
    check: StatusCheck,
    credential: Option<&dyn Credential>,
    records: &[usize],
    batch: &[LeasedRecord],
) -> Fate {
    let budget = check.max_wait.min(inner.settings.lease_timeout / 2);
    let deadline = Instant::now() + budget;
    let mut shutdown = inner.shutdown.subscribe();
    let mut last = String::from("no answer");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(check.interval.min(left)) => {}
            // Stopping: the request was accepted, its outcome is not awaited any longer.
            _ = shutdown.changed() => break,
        }
        let (status, body, fate, latency) = attempt(inner, tag, &check.request, credential).await;
        // `Err(what)`: still pending, because the vendor says so or the status request failed
        // (the accepted request stands either way; ask again).
        let decided = match (fate, status) {
            (Fate::Done, Some(code)) => {
                let code = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
                match tag.tag.classify_status(code, &body, records.len()) {
                    StatusOutcome::Pending(what) => Err(tag.tag.redact(&what)),
                    StatusOutcome::Final(Outcome::Delivered) => Ok(Fate::Done),
                    StatusOutcome::Final(Outcome::Rejected { reason }) => {
                        Ok(Fate::Rejected(tag.tag.redact(&reason)))
                    }
                    StatusOutcome::Final(Outcome::Retry { after, reason }) => Ok(Fate::Retry {
                        after,
                        reason: tag.tag.redact(&reason),
                        label: "vendor",
                    }),
                }
            }
            (Fate::Retry { reason, .. } | Fate::Rejected(reason), _) => {
                Err(format!("status check failed: {reason}"))
            }
            (_, _) => Err("status check failed: no answer".to_string()),
        };
        let outcome = match &decided {
            Ok(fate) => fate_outcome(fate),
            Err(what) => AttemptOutcome::Pending(what.clone()),
        };
        observe(
            inner,
            tag,
            &check.request,
            records,
            batch,
            status,
            &body,
            latency,
            &outcome,
        );
        match decided {
            Ok(fate) => return fate,
            Err(what) => last = what,
        }
    }
    metrics::counter!("tagrelay_tag_status_unknown_total", "tag" => tag.name.to_string())
        .increment(1);
    tracing::info!(
        tag = %tag.name,
        events = records.len(),
        last = %last,
        "the vendor accepted a request whose processing outcome was not known in time; counted as delivered"
    );
    Fate::Done
}

/// A fate as the debug view's outcome line: `delivered`, `retry: …` or `rejected: …`.
fn fate_outcome(fate: &Fate) -> AttemptOutcome {
    match fate {
        Fate::Done | Fate::Undecided | Fate::Settled | Fate::Skipped => AttemptOutcome::Delivered,
        Fate::Rejected(r) => AttemptOutcome::Rejected(r.clone()),
        Fate::Retry { reason, .. } => AttemptOutcome::Retry(reason.clone()),
    }
}

/// Shows one exchange to the debug view with its outcome line.
#[allow(clippy::too_many_arguments)]
fn observe(
    inner: &Inner,
    tag: &TagInstance,
    request: &OutboundRequest,
    records: &[usize],
    batch: &[LeasedRecord],
    status: Option<u16>,
    body: &[u8],
    latency: Duration,
    outcome: &AttemptOutcome,
) {
    if !inner.observer.enabled() {
        return;
    }
    let event_ids: Vec<String> = records
        .iter()
        .filter_map(|r| batch.get(*r).map(|rec| rec.event_id.clone()))
        .collect();
    let mut headers: Vec<(String, String)> = request
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), tag.tag.redact(v)))
        .collect();
    if tag.tag.credential().is_some() {
        // What the dispatcher added, without its value.
        headers.push(("authorization".into(), "Bearer [redacted]".into()));
    }
    let redacted = RequestView {
        method: request.method.to_string(),
        url: tag.tag.redact(&request.url),
        headers,
        body: tag.tag.redact(&String::from_utf8_lossy(&request.body)),
    };
    inner.observer.attempt(
        &tag.name, &event_ids, redacted, status, body, latency, outcome,
    );
}

/// Reads at most [`MAX_RESPONSE_BODY`] bytes; a body that breaks off is classified as read.
async fn read_body(mut resp: reqwest::Response) -> Bytes {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = MAX_RESPONSE_BODY.saturating_sub(out.len());
        out.extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
        if out.len() >= MAX_RESPONSE_BODY {
            break;
        }
    }
    Bytes::from(out)
}
