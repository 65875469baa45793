//! The in-memory script cache. Owned by `AppState` (not the pipeline) so a config reload keeps
//! every cached script warm.
//!
//! One `Slot` per key (upstream URL + encoding variant). A slot's entry is read lock-free; its
//! async `fetch` lock serialises upstream requests for that key, and `generation` lets the
//! requests that queued behind a fetch reuse its result (success or failure) instead of
//! fetching again: that is the single-flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::HeaderValue;

/// Default bound on the bytes of all cached bodies.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;
/// Default bound on distinct keys (allowed query values vary per site and container).
pub const DEFAULT_MAX_KEYS: usize = 1_000;
/// After a failed background revalidation, stale requests wait this long before another
/// attempt, so a down upstream is not hammered once per request.
const REVALIDATE_BACKOFF: Duration = Duration::from_secs(5);

/// One cached upstream response. Immutable: a revalidation replaces it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub body: Bytes,
    pub content_type: HeaderValue,
    /// `None` for identity.
    pub content_encoding: Option<HeaderValue>,
    /// Upstream validators, sent back on revalidation.
    pub upstream_etag: Option<HeaderValue>,
    pub upstream_last_modified: Option<HeaderValue>,
    /// Our own strong ETag, derived from the body.
    pub etag: HeaderValue,
    pub fetched_at: Instant,
}

impl Entry {
    /// What the entry counts against the cache's byte bound.
    fn cost(&self, key: &str) -> usize {
        self.body.len() + key.len() + 256
    }

    /// The same entry, confirmed unchanged by the upstream now.
    pub fn refreshed(&self) -> Entry {
        Entry {
            fetched_at: Instant::now(),
            ..self.clone()
        }
    }
}

#[derive(Debug, Default)]
struct Failure {
    reason: Option<Arc<str>>,
    retry_at: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct Slot {
    entry: ArcSwapOption<Entry>,
    fetch: tokio::sync::Mutex<()>,
    /// Bumped (after the entry is stored) each time a fetch attempt ends.
    generation: AtomicU64,
    revalidating: AtomicBool,
    failure: Mutex<Failure>,
}

impl Slot {
    pub fn entry(&self) -> Option<Arc<Entry>> {
        self.entry.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub async fn lock_fetch(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.fetch.lock().await
    }

    /// Why the last fetch attempt failed (what a request that waited on it reports).
    pub fn last_failure(&self) -> Arc<str> {
        lock(&self.failure)
            .reason
            .clone()
            .unwrap_or_else(|| Arc::from("upstream fetch failed"))
    }

    fn finish_attempt(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Claims the right to start a background revalidation: at most one at a time, and none
    /// during the backoff after a failed one.
    pub fn begin_revalidation(&self) -> bool {
        if lock(&self.failure)
            .retry_at
            .is_some_and(|t| Instant::now() < t)
        {
            return false;
        }
        self.revalidating
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn end_revalidation(&self) {
        self.revalidating.store(false, Ordering::Release);
    }
}

struct Held {
    slot: Arc<Slot>,
    bytes: usize,
    last_used: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Box<str>, Held>,
    bytes: usize,
    tick: u64,
}

/// Upstream scripts by key, bounded by bytes and key count, least recently used evicted first.
pub struct ScriptCache {
    inner: Mutex<Inner>,
    max_bytes: usize,
    max_keys: usize,
}

impl std::fmt::Debug for ScriptCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (keys, bytes) = self.usage();
        f.debug_struct("ScriptCache")
            .field("keys", &keys)
            .field("bytes", &bytes)
            .field("max_bytes", &self.max_bytes)
            .field("max_keys", &self.max_keys)
            .finish()
    }
}

impl Default for ScriptCache {
    fn default() -> Self {
        ScriptCache::new(DEFAULT_MAX_BYTES, DEFAULT_MAX_KEYS)
    }
}

impl ScriptCache {
    pub fn new(max_bytes: usize, max_keys: usize) -> Self {
        ScriptCache {
            inner: Mutex::new(Inner::default()),
            max_bytes,
            max_keys: max_keys.max(1),
        }
    }

    /// `(keys, bytes)` currently held.
    pub fn usage(&self) -> (usize, usize) {
        let inner = lock(&self.inner);
        (inner.map.len(), inner.bytes)
    }

    /// The slot for `key`, created empty if absent; marks it most recently used.
    pub fn slot(&self, key: &str) -> Arc<Slot> {
        let mut inner = lock(&self.inner);
        inner.tick += 1;
        let tick = inner.tick;
        if let Some(h) = inner.map.get_mut(key) {
            h.last_used = tick;
            return h.slot.clone();
        }
        let slot = Arc::new(Slot::default());
        inner.map.insert(
            key.into(),
            Held {
                slot: slot.clone(),
                bytes: 0,
                last_used: tick,
            },
        );
        self.evict(&mut inner, key);
        slot
    }

    /// Stores a fetched (or revalidated) entry and ends the slot's fetch attempt.
    pub fn store(&self, key: &str, slot: &Arc<Slot>, entry: Arc<Entry>) {
        let cost = entry.cost(key);
        {
            let mut inner = lock(&self.inner);
            slot.entry.store(Some(entry));
            inner.tick += 1;
            let tick = inner.tick;
            match inner.map.get_mut(key) {
                Some(h) if Arc::ptr_eq(&h.slot, slot) => {
                    let old = std::mem::replace(&mut h.bytes, cost);
                    h.last_used = tick;
                    inner.bytes = inner.bytes.saturating_sub(old) + cost;
                }
                // The slot was evicted and the key taken by a newer slot while this fetch ran:
                // the requests holding this slot still get the result; the cache keeps the
                // newer slot.
                Some(_) => {}
                None => {
                    inner.map.insert(
                        key.into(),
                        Held {
                            slot: slot.clone(),
                            bytes: cost,
                            last_used: tick,
                        },
                    );
                    inner.bytes += cost;
                }
            }
            self.evict(&mut inner, key);
        }
        *lock(&slot.failure) = Failure::default();
        slot.finish_attempt();
    }

    /// Records a failed fetch attempt. A slot that never held an entry is dropped from the
    /// cache so failing keys do not crowd out working ones.
    pub fn fail(&self, key: &str, slot: &Arc<Slot>, reason: &str) {
        {
            let mut f = lock(&slot.failure);
            f.reason = Some(Arc::from(reason));
            f.retry_at = Some(Instant::now() + REVALIDATE_BACKOFF);
        }
        if slot.entry.load().is_none() {
            let mut inner = lock(&self.inner);
            if inner
                .map
                .get(key)
                .is_some_and(|h| Arc::ptr_eq(&h.slot, slot))
            {
                if let Some(h) = inner.map.remove(key) {
                    inner.bytes = inner.bytes.saturating_sub(h.bytes);
                }
            }
        }
        slot.finish_attempt();
    }

    /// Evicts least recently used keys (never `keep`) until both bounds hold. Linear in the
    /// number of keys, which is bounded and small; it runs only when a key or body is added.
    fn evict(&self, inner: &mut Inner, keep: &str) {
        while inner.bytes > self.max_bytes || inner.map.len() > self.max_keys {
            let victim = inner
                .map
                .iter()
                .filter(|(k, _)| &***k != keep)
                .min_by_key(|(_, h)| h.last_used)
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else { break };
            if let Some(h) = inner.map.remove(&victim) {
                inner.bytes = inner.bytes.saturating_sub(h.bytes);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, key: &str) -> bool {
        lock(&self.inner).map.contains_key(key)
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain counters; the data
/// is still usable, and a cache must never take the server down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
