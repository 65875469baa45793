//! The shared outbox on Redis / Valkey Streams: any replica takes any hit and delivers any
//! event; a replica that dies loses nothing it acknowledged, and its deliveries in flight are
//! claimed by the others.
//!
//! - **Hits** (`writer`): group commit, one pipeline (and at most one `WAIT`) per group; a
//!   hit is answered once Redis (and `wait_replicas` replicas) hold its events.
//! - **Delivery**: each tag's partitions are streams with one consumer group; each process is
//!   a consumer. A lease runs one script per partition (`scripts::LEASE`): due retries back
//!   into the stream, `XAUTOCLAIM` of deliveries whose lease ended (a crashed replica's),
//!   then `XREADGROUP`. Settling is one script per partition too: delivered entries are
//!   acked and deleted, retries move to the partition's schedule (a sorted set scored by
//!   when they are due), dead letters to its dead-letter stream.
//! - **Shared state** (`pubsub`): wake-ups after commits, tag pauses after a `Retry-After`
//!   (also kept in Redis, so a replica that missed the message still sees the pause in its
//!   next lease) and the debug view's traces.
//! - **Outages** (`conn`): while Redis is out of reach hits get 503 + `Retry-After`,
//!   `/readyz` fails and delivery waits; all resume on their own, logged once each way.
//!
//! Keys: `keys`. Record format and rolling upgrades: `record`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use redis::Value;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

pub(crate) mod conn;
pub mod keys;
mod pubsub;
pub mod record;
mod scripts;
mod state;
pub mod stitch;
pub mod tools;
mod upkeep;
mod writer;

#[cfg(test)]
pub(crate) mod test_server;
#[cfg(test)]
mod tests;

use crate::clock::now_ms;
use crate::outbox::config::{OutboxConfig, Role};
use crate::outbox::{
    DeliveryStore, EnqueueError, LeasedRecord, NewEvent, Outbox, RecordId, Settlement, StoreError,
    TagBacklog,
};
use conn::{Connector, Link};
use keys::{Keys, GROUP};
use record::{int, READ_VERSION};
use scripts::{LEASE_SCRIPT, PAUSE_SCRIPT, SETTLE_SCRIPT};
use state::{LocalEvents, Signals, TagLease, Totals};

/// Deliveries taken this many times without being settled are dead-lettered: each time, the
/// replica that took it stopped (crashed, was killed) before it could settle it.
const MAX_DELIVERIES: u32 = 10;
/// What hits are told to wait when the outbox is full.
const FULL_RETRY_AFTER_SECS: u64 = 5;
/// At most one log line per this long about a full outbox or unconfirmed writes.
const LOG_EVERY_MS: i64 = 10_000;
/// Redis memory use (of `maxmemory`) above which hits are refused before Redis refuses
/// writes itself.
const MEMORY_FULL_PERCENT: u64 = 95;
/// Entries given back (newer schema) look idle this long, so any replica's next claim
/// may take them.
const GIVE_BACK_IDLE_MS: u64 = 365 * 24 * 3600 * 1000;

/// The store's view of its configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub partitions: u16,
    pub wait_replicas: u32,
    pub wait_timeout_ms: u64,
    pub commit_max_records: usize,
    pub max_records: u64,
    pub max_bytes: u64,
    pub share_percent: u64,
    pub dead_letter_max_age_ms: u64,
    pub dead_letter_max_records: u64,
    pub dead_letter_max_bytes: u64,
    pub role: Role,
}

impl Settings {
    fn from_config(cfg: &OutboxConfig) -> Settings {
        let r = &cfg.redis;
        Settings {
            partitions: r.partitions.max(1),
            wait_replicas: r.wait_replicas,
            wait_timeout_ms: r.wait_timeout_ms.max(1),
            commit_max_records: cfg.commit_max_records.max(1),
            max_records: cfg.max_records,
            max_bytes: cfg.max_bytes,
            share_percent: u64::from(r.max_tag_share_percent.clamp(1, 100)),
            dead_letter_max_age_ms: cfg.dead_letter_max_age_secs.saturating_mul(1000),
            dead_letter_max_records: cfg.dead_letter_max_records,
            dead_letter_max_bytes: r.dead_letter_max_bytes,
            role: cfg.role,
        }
    }
}

/// Tags in the order they were numbered, and each tag's number.
type TagNumbers = (Vec<Arc<str>>, HashMap<Arc<str>, u32>);

/// The shared outbox. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub settings: Settings,
    pub keys: Keys,
    /// This process's consumer name in every group.
    pub consumer: String,
    pub link: Arc<Link>,
    pub totals: Totals,
    pub signals: Signals,
    /// Events committed here, parsed, for this process's dispatchers.
    pub local: LocalEvents,
    /// Tags by the number record ids carry.
    tag_numbers: RwLock<TagNumbers>,
    leases: Mutex<HashMap<Arc<str>, TagLease>>,
    /// Partitions read: the configured count, or more if this deployment once wrote more.
    pub read_partitions: AtomicU16,
    /// Tags known to be in `P:tags`.
    registered: RwLock<HashSet<String>>,
    open: AtomicBool,
    pub memory_full: AtomicBool,
    last_full_log_ms: AtomicI64,
    last_unconfirmed_log_ms: AtomicI64,
    writer: mpsc::UnboundedSender<writer::Msg>,
    writer_task: Mutex<Option<JoinHandle<()>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Set once the debug view shares its traces through this store.
    pub traces: OnceLock<Arc<crate::trace::Traces>>,
    pub stop: Notify,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("link", &self.link)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

/// This process's consumer name: host, process id and a random part, so a restarted
/// process never mistakes another's deliveries for its own.
fn consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tagrelay".into());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

impl RedisStore {
    /// Connects (refusing a Redis that would lose events: see `conn::ServerInfo::refusal`),
    /// and starts the group-commit writer and the background tasks. An unreachable Redis is
    /// not an error: the store starts not ready and connects when it can.
    pub async fn open(cfg: &OutboxConfig) -> Result<Arc<RedisStore>, String> {
        let connector = Connector::from_config(&cfg.redis)?;
        let link = Arc::new(Link::new(connector, &cfg.redis));
        link.start().await?;
        let settings = Settings::from_config(cfg);
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            keys: Keys::new(&cfg.redis.key_prefix),
            consumer: consumer_name(),
            link: link.clone(),
            totals: Totals::default(),
            signals: Signals::default(),
            local: LocalEvents::default(),
            tag_numbers: RwLock::default(),
            leases: Mutex::default(),
            read_partitions: AtomicU16::new(settings.partitions),
            registered: RwLock::default(),
            open: AtomicBool::new(true),
            memory_full: AtomicBool::new(false),
            last_full_log_ms: AtomicI64::new(0),
            last_unconfirmed_log_ms: AtomicI64::new(0),
            writer: tx,
            writer_task: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
            traces: OnceLock::new(),
            stop: Notify::new(),
            settings,
        });
        if link.is_up() {
            upkeep::prepare(&inner).await;
        }
        let writer = tokio::spawn(writer::run(inner.clone(), rx));
        if let Ok(mut w) = inner.writer_task.lock() {
            *w = Some(writer);
        }
        let tasks = vec![
            tokio::spawn(link.clone().supervise()),
            tokio::spawn(upkeep::run(inner.clone())),
            tokio::spawn(pubsub::run(inner.clone())),
        ];
        if let Ok(mut t) = inner.tasks.lock() {
            t.extend(tasks);
        }
        tracing::info!(
            primary = %link.describe(),
            consumer = %inner.consumer,
            key_prefix = %cfg.redis.key_prefix,
            partitions = inner.settings.partitions,
            wait_replicas = inner.settings.wait_replicas,
            role = inner.settings.role.as_str(),
            "outbox: shared store on Redis"
        );
        Ok(Arc::new(RedisStore { inner }))
    }

    /// This process's consumer name.
    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }

    /// Whether Redis is reachable and usable now.
    pub fn connected(&self) -> bool {
        self.inner.link.is_up()
    }

    /// Pending records and bytes as the back-pressure check sees them.
    pub fn pending_totals(&self) -> (u64, u64) {
        self.inner.totals.pending()
    }

    /// Stops background work without flushing or giving anything back, as a process that
    /// dies would (tests).
    #[cfg(test)]
    pub(crate) fn abandon(&self) {
        self.inner.open.store(false, Ordering::Release);
        self.inner.link.close();
        if let Ok(mut t) = self.inner.tasks.lock() {
            for t in t.drain(..) {
                t.abort();
            }
        }
        if let Some(w) = self
            .inner
            .writer_task
            .lock()
            .ok()
            .and_then(|mut w| w.take())
        {
            w.abort();
        }
    }
}

impl Inner {
    /// The number record ids carry for `tag` (given on first sight, for this process only).
    fn tag_number(&self, tag: &str) -> u32 {
        if let Ok(t) = self.tag_numbers.read() {
            if let Some(&n) = t.1.get(tag) {
                return n;
            }
        }
        let Ok(mut t) = self.tag_numbers.write() else {
            return u32::MAX;
        };
        if let Some(&n) = t.1.get(tag) {
            return n;
        }
        let n = u32::try_from(t.0.len()).unwrap_or(u32::MAX);
        let name: Arc<str> = Arc::from(tag);
        t.0.push(name.clone());
        t.1.insert(name, n);
        n
    }

    fn tag_of(&self, n: u32) -> Option<Arc<str>> {
        self.tag_numbers
            .read()
            .ok()
            .and_then(|t| t.0.get(n as usize).cloned())
    }

    pub fn registered(&self, tag: &str) -> bool {
        self.registered
            .read()
            .map(|r| r.contains(tag))
            .unwrap_or(false)
    }

    pub fn register(&self, tag: &str) {
        if let Ok(mut r) = self.registered.write() {
            r.insert(tag.to_owned());
        }
    }

    /// What `P:tags` holds now (it may have lost tags, e.g. with a Redis that lost its data).
    pub fn registered_are(&self, tags: &[String]) {
        if let Ok(mut r) = self.registered.write() {
            *r = tags.iter().cloned().collect();
        }
    }

    pub fn reject_full(&self, memory: bool) -> EnqueueError {
        metrics::counter!("tagrelay_outbox_rejected_full_total").increment(1);
        if self.log_due(&self.last_full_log_ms) {
            let (records, bytes) = self.totals.pending();
            if memory {
                tracing::error!(
                    "outbox: Redis is nearly out of memory (maxmemory): new hits are refused with 503 until dispatchers drain it or Redis gets more memory"
                );
            } else {
                tracing::error!(
                    pending_records = records,
                    pending_bytes = bytes,
                    max_records = self.settings.max_records,
                    max_bytes = self.settings.max_bytes,
                    "outbox is full: new hits are refused with 503 until dispatchers drain it (check vendor reachability and tagrelay_outbox_pending)"
                );
            }
        }
        EnqueueError::Full {
            retry_after_secs: FULL_RETRY_AFTER_SECS,
        }
    }

    pub fn unconfirmed(&self, confirmed: i64, wanted: u32) {
        if self.log_due(&self.last_unconfirmed_log_ms) {
            tracing::warn!(
                confirmed,
                wait_replicas = wanted,
                "outbox: fewer Redis replicas than wait_replicas confirmed a group commit; its hits are answered 503 with Retry-After (check the replicas)"
            );
        }
    }

    fn log_due(&self, last: &AtomicI64) -> bool {
        let now = now_ms();
        let prev = last.load(Ordering::Relaxed);
        now.saturating_sub(prev) >= LOG_EVERY_MS
            && last
                .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn capacity_check(&self, per_tag: &[(Arc<str>, u64, u64)]) -> Result<(), EnqueueError> {
        if self.memory_full.load(Ordering::Acquire) {
            return Err(self.reject_full(true));
        }
        let s = &self.settings;
        let (n, bytes) = per_tag
            .iter()
            .fold((0, 0), |(n, b), (_, tn, tb)| (n + tn, b + tb));
        let (records, held) = self.totals.pending();
        if records.saturating_add(n) > s.max_records || held.saturating_add(bytes) > s.max_bytes {
            return Err(self.reject_full(false));
        }
        // A tag's share binds once there are others to protect.
        if s.share_percent < 100 && self.totals.known() > 1 {
            let max_r = (s.max_records.saturating_mul(s.share_percent) / 100).max(1);
            let max_b = (s.max_bytes.saturating_mul(s.share_percent) / 100).max(1);
            for (tag, tn, tb) in per_tag {
                let (r, b) = self.totals.tag(tag).pending();
                if r.saturating_add(*tn) > max_r || b.saturating_add(*tb) > max_b {
                    return Err(self.reject_full(false));
                }
            }
        }
        Ok(())
    }

    fn claim_every(lease_ms: u64) -> Duration {
        Duration::from_millis(lease_ms / 4).clamp(Duration::from_secs(1), Duration::from_secs(5))
    }

    async fn lease(
        &self,
        tag: &str,
        now: i64,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<LeasedRecord>, StoreError> {
        let mut conn = self.link.work()?;
        let parts = self.read_partitions.load(Ordering::Acquire).max(1);
        let tag_n = self.tag_number(tag);
        let tag_arc = self.tag_of(tag_n).unwrap_or_else(|| Arc::from(tag));
        let (start, claims, cursors) = {
            let mut leases = self
                .leases
                .lock()
                .map_err(|_| StoreError::Io("lease state poisoned".into()))?;
            let l = leases
                .entry(tag_arc.clone())
                .or_insert_with(|| TagLease::new(parts));
            l.grow(parts);
            let every = Self::claim_every(lease_ms);
            let claims: Vec<bool> = l
                .last_claim
                .iter()
                .map(|t| t.is_none_or(|t| t.elapsed() >= every))
                .collect();
            (l.next % parts, claims, l.cursors.clone())
        };
        let mut out: Vec<LeasedRecord> = Vec::with_capacity(limit.min(1024));
        let mut last = start;
        let sha = LEASE_SCRIPT.get_hash();
        for k in 0..parts {
            let p = (start + k) % parts;
            last = p;
            let want = limit - out.len();
            let claim = claims.get(usize::from(p)).copied().unwrap_or(false);
            let cursor = cursors
                .get(usize::from(p))
                .map(String::as_str)
                .unwrap_or("0-0");
            let keys = self.keys.partition(tag, p);
            let reply: Value = redis::cmd("EVALSHA")
                .arg(sha)
                .arg(5)
                .arg(&keys.queue)
                .arg(&keys.retries)
                .arg(&keys.pause)
                .arg(&keys.counts)
                .arg(&keys.dead)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(want)
                .arg(now)
                .arg(if claim { 1 } else { 0 })
                .arg(lease_ms)
                .arg(cursor)
                .arg(MAX_DELIVERIES)
                .arg(READ_VERSION)
                .arg(GIVE_BACK_IDLE_MS)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.link.failed(&e))?;
            let Value::Array(parts_of) = reply else {
                return Err(StoreError::Io("unexpected reply to a lease".into()));
            };
            let pause_ms = parts_of.first().map(int).unwrap_or(0);
            if pause_ms > 0 {
                // Another replica got a Retry-After for this tag.
                self.signals.pause(tag, now_ms().saturating_add(pause_ms));
                break;
            }
            if claim {
                if let Ok(mut leases) = self.leases.lock() {
                    if let Some(l) = leases.get_mut(tag) {
                        let i = usize::from(p);
                        if let Some(c) = l.cursors.get_mut(i) {
                            *c = parts_of
                                .get(1)
                                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                                .unwrap_or_else(|| "0-0".into());
                        }
                        if let Some(t) = l.last_claim.get_mut(i) {
                            *t = Some(Instant::now());
                        }
                    }
                }
            }
            let buried = parts_of.get(4).map(int).unwrap_or(0);
            if let (Some(r), Some(b)) = (parts_of.get(6), parts_of.get(7)) {
                self.totals.set(tag, p, int(r), int(b));
            }
            if buried > 0 {
                metrics::counter!("tagrelay_outbox_dead_lettered_total", "tag" => tag.to_string(), "reason" => "crashed")
                    .increment(u64::try_from(buried).unwrap_or(0));
                tracing::warn!(tag, records = buried, "outbox: dead-lettered deliveries that stopped every replica that took them (list with `tagrelay outbox dead-letters`)");
            }
            for list in [parts_of.get(2), parts_of.get(3)].into_iter().flatten() {
                for e in record::entries(list) {
                    let Some(id) = e.id else { continue };
                    let event_id = e.event_id.unwrap_or_default();
                    // An entry without a payload fails to parse and is dead-lettered as
                    // invalid by the dispatcher, like any unreadable record.
                    let payload = e.payload.unwrap_or_else(Bytes::new);
                    let event = self.local.take(&event_id, &payload);
                    out.push(LeasedRecord {
                        id: RecordId::entry(tag_n, p, id.ms, id.seq),
                        tag: tag_arc.clone(),
                        event_id,
                        payload,
                        event,
                        attempts: e.attempts,
                        first_enqueued_ms: e
                            .first_ms
                            .unwrap_or_else(|| i64::try_from(id.ms).unwrap_or(0)),
                        last_error: e.last_error,
                        lease_until_ms: now
                            .saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX)),
                    });
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        if let Ok(mut leases) = self.leases.lock() {
            if let Some(l) = leases.get_mut(tag) {
                l.next = (last + 1) % parts;
            }
        }
        Ok(out)
    }

    async fn settle(&self, s: Settlement) -> Result<(), StoreError> {
        // (tag number, partition) → ops.
        let mut groups: BTreeMap<(u32, u16), Vec<Op>> = BTreeMap::new();
        let mut put = |id: RecordId, op: Op| {
            if let Some((t, p, ms, seq)) = id.as_entry() {
                groups
                    .entry((t, p))
                    .or_default()
                    .push(op.with_id(format!("{ms}-{seq}")));
            }
        };
        for id in &s.ack {
            put(*id, Op::Ack(String::new()));
        }
        for n in &s.nack {
            put(
                n.id,
                Op::Retry(String::new(), n.next_attempt_ms, n.error.clone()),
            );
        }
        for d in &s.dead {
            put(d.id, Op::Dead(String::new(), d.reason.clone(), d.attempted));
        }
        if groups.is_empty() {
            return Ok(());
        }
        let mut conn = self.link.work()?;
        let mut pipe = redis::pipe();
        let mut order = Vec::with_capacity(groups.len());
        for ((t, p), ops) in &groups {
            let Some(tag) = self.tag_of(*t) else { continue };
            let keys = self.keys.partition(&tag, *p);
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(SETTLE_SCRIPT.get_hash())
                .arg(4)
                .arg(&keys.queue)
                .arg(&keys.retries)
                .arg(&keys.dead)
                .arg(&keys.counts)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(s.now_ms);
            for op in ops {
                match op {
                    Op::Ack(id) => {
                        cmd.arg("a").arg(id);
                    }
                    Op::Retry(id, at, error) => {
                        cmd.arg("n").arg(id).arg(*at).arg(error);
                    }
                    Op::Dead(id, reason, attempted) => {
                        cmd.arg("d")
                            .arg(id)
                            .arg(reason)
                            .arg(if *attempted { 1 } else { 0 });
                    }
                }
            }
            order.push((tag, *p));
        }
        let replies: Vec<Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.link.failed(&e))?;
        for ((tag, p), reply) in order.iter().zip(&replies) {
            if let Value::Array(v) = reply {
                if let (Some(r), Some(b)) = (v.get(4), v.get(5)) {
                    self.totals.set(tag, *p, int(r), int(b));
                }
            }
        }
        Ok(())
    }

    async fn pause(&self, tag: &str, wait: Duration) -> Result<(), StoreError> {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        self.signals.pause(
            tag,
            now_ms().saturating_add(i64::try_from(ms).unwrap_or(i64::MAX)),
        );
        let mut conn = self.link.work()?;
        let mut pipe = redis::pipe();
        for p in 0..self.read_partitions.load(Ordering::Acquire).max(1) {
            pipe.cmd("EVALSHA")
                .arg(PAUSE_SCRIPT.get_hash())
                .arg(1)
                .arg(&self.keys.partition(tag, p).pause)
                .arg(ms)
                .ignore();
        }
        pipe.cmd("PUBLISH")
            .arg(self.keys.pause_channel())
            .arg(format!("{tag}\n{ms}"))
            .ignore();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.link.failed(&e))
    }

    /// Every tag this deployment has records for (from `P:tags`).
    pub async fn all_tags(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.link.work()?;
        let mut tags: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.tags())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.link.failed(&e))?;
        tags.sort();
        Ok(tags)
    }
}

/// One settle operation of the script (`id` filled in per partition).
enum Op {
    Ack(String),
    Retry(String, i64, String),
    Dead(String, String, bool),
}

impl Op {
    fn with_id(self, id: String) -> Op {
        match self {
            Op::Ack(_) => Op::Ack(id),
            Op::Retry(_, at, e) => Op::Retry(id, at, e),
            Op::Dead(_, r, a) => Op::Dead(id, r, a),
        }
    }
}

#[async_trait]
impl Outbox for RedisStore {
    async fn enqueue(&self, events: Vec<NewEvent>) -> Result<(), EnqueueError> {
        let inner = &self.inner;
        let n: usize = events.iter().map(NewEvent::records).sum();
        if n == 0 {
            return Ok(());
        }
        if !inner.open.load(Ordering::Acquire) {
            return Err(EnqueueError::Closed);
        }
        if !inner.link.is_up() {
            return Err(EnqueueError::Unavailable {
                retry_after_secs: writer::UNAVAILABLE_RETRY_AFTER_SECS,
                reason: "Redis is unreachable".into(),
            });
        }
        // (tag, records, bytes): each tag's delivery carries its own copy of the payload.
        let mut per_tag: Vec<(Arc<str>, u64, u64)> = Vec::with_capacity(2);
        for e in &events {
            let b = e.payload.len() as u64;
            for t in &e.tags {
                match per_tag.iter_mut().find(|(x, _, _)| x == t) {
                    Some((_, r, by)) => {
                        *r += 1;
                        *by += b;
                    }
                    None => per_tag.push((t.clone(), 1, b)),
                }
            }
        }
        inner.capacity_check(&per_tag)?;
        for (t, r, b) in &per_tag {
            inner.totals.reserve(&inner.totals.tag(t), *r, *b);
        }
        let (done, wait) = oneshot::channel();
        let job = writer::Job {
            events,
            reserved: per_tag,
            done,
        };
        if let Err(mpsc::error::SendError(writer::Msg::Job(job))) =
            inner.writer.send(writer::Msg::Job(job))
        {
            for (t, r, b) in &job.reserved {
                inner.totals.unreserve(&inner.totals.tag(t), *r, *b);
            }
            return Err(EnqueueError::Closed);
        }
        let started = Instant::now();
        let result = wait.await.unwrap_or(Err(EnqueueError::Closed));
        crate::telemetry::hot::commit_wait().record(started.elapsed().as_secs_f64());
        result
    }

    fn is_open(&self) -> bool {
        self.inner.open.load(Ordering::Acquire) && self.inner.link.is_up()
    }
}

#[async_trait]
impl DeliveryStore for RedisStore {
    async fn lease(
        &self,
        tag: &str,
        now_ms: i64,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<LeasedRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        if !self.inner.open.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        if self.inner.signals.paused_until(tag) > crate::clock::now_ms() {
            return Ok(Vec::new());
        }
        self.inner.lease(tag, now_ms, limit, lease_ms).await
    }

    async fn settle(&self, settlement: Settlement) -> Result<(), StoreError> {
        if settlement.is_empty() {
            return Ok(());
        }
        self.inner.settle(settlement).await
    }

    fn wakeup(&self, tag: &str) -> Arc<Notify> {
        self.inner.signals.wakeup(tag)
    }

    async fn backlog(&self, now_ms: i64) -> Result<Vec<TagBacklog>, StoreError> {
        upkeep::backlog(&self.inner, now_ms).await
    }

    async fn close(&self) {
        let inner = &self.inner;
        inner.open.store(false, Ordering::Release);
        // Hits already queued are committed first.
        let _ = inner.writer.send(writer::Msg::Close);
        let writer = inner.writer_task.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = writer {
            let _ = w.await;
        }
        inner.stop.notify_waiters();
        inner.link.close();
        let tasks: Vec<JoinHandle<()>> = inner
            .tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for t in tasks {
            t.abort();
        }
    }

    async fn pause_tag(&self, tag: &str, wait: Duration) -> Result<(), StoreError> {
        self.inner.pause(tag, wait).await
    }

    fn paused_until(&self, tag: &str) -> i64 {
        self.inner.signals.paused_until(tag)
    }

    fn share_traces(&self, traces: &Arc<crate::trace::Traces>) {
        pubsub::share_traces(&self.inner, traces);
    }
    fn shared_stitching(
        &self,
        limits: crate::stitching::Limits,
    ) -> Option<crate::stitching::Stores> {
        let store = stitch::RedisStitchStore::start(
            self.inner.link.clone(),
            self.inner.keys.prefix(),
            &self.inner.consumer,
            limits,
        );
        Some(crate::stitching::Stores {
            sessions: store.clone(),
            ledger: store,
        })
    }
}
