//! Group commit: hits' events gathered while earlier commits are in flight go to Redis in
//! one pipeline — one `EVALSHA` per tag and partition touched, the wake-up for other
//! replicas, and with `wait_replicas` one `WAIT` — and every hit of the group is answered
//! when its reply is in. One round trip per group, never one per event.

use std::collections::BTreeMap;
use std::sync::Arc;

use redis::Value;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::conn::{breaks_link, is_oom};
use super::keys::{partition_of, GROUP};
use super::record::{int, WRITE_VERSION};
use super::scripts::ENQUEUE_SCRIPT;
use super::Inner;
use crate::outbox::{EnqueueError, NewEvent};

/// Group commits in flight at once: while one waits for Redis, the next gathers hits.
const IN_FLIGHT: usize = 4;

/// What hits are told to wait when Redis is out of reach or did not confirm a write.
pub(crate) const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 2;

/// What the writer is sent.
pub(crate) enum Msg {
    Job(Job),
    /// Commit what came before, then stop.
    Close,
}

/// One `enqueue` call.
pub(crate) struct Job {
    pub events: Vec<NewEvent>,
    /// `(tag, records, bytes)` reserved for it.
    pub reserved: Vec<(Arc<str>, u64, u64)>,
    pub done: oneshot::Sender<Result<(), EnqueueError>>,
}

/// Runs until `Close` (or every sender is gone), committing what was queued before it.
pub(crate) async fn run(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut closing = false;
    while !closing {
        let first = match rx.recv().await {
            Some(Msg::Job(j)) => j,
            Some(Msg::Close) | None => break,
        };
        // Taken before gathering: while every commit is in flight, hits pile up here and the
        // next group takes them all.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let mut records = records_of(&first);
        let mut jobs = vec![first];
        while records < inner.settings.commit_max_records {
            match rx.try_recv() {
                Ok(Msg::Job(j)) => {
                    records += records_of(&j);
                    jobs.push(j);
                }
                Ok(Msg::Close) => {
                    closing = true;
                    break;
                }
                Err(_) => break,
            }
        }
        tokio::spawn(commit(inner.clone(), jobs, permit));
    }
    // Wait for the commits still in flight.
    let _ = permits.acquire_many(IN_FLIGHT as u32).await;
}

fn records_of(j: &Job) -> usize {
    j.events.iter().map(NewEvent::records).sum()
}

async fn commit(inner: Arc<Inner>, jobs: Vec<Job>, _permit: OwnedSemaphorePermit) {
    let result = write(&inner, &jobs).await;
    for j in jobs {
        for (tag, records, bytes) in &j.reserved {
            inner
                .totals
                .unreserve(&inner.totals.tag(tag), *records, *bytes);
        }
        let _ = j.done.send(result.clone());
    }
}

async fn write(inner: &Inner, jobs: &[Job]) -> Result<(), EnqueueError> {
    let unavailable = |reason: String| EnqueueError::Unavailable {
        retry_after_secs: UNAVAILABLE_RETRY_AFTER_SECS,
        reason,
    };
    let mut conn = inner.link.hits().map_err(|e| unavailable(e.to_string()))?;
    let partitions = inner.settings.partitions;
    // (tag, partition) → deliveries, in a stable order.
    let mut groups: BTreeMap<(&str, u16), Vec<&NewEvent>> = BTreeMap::new();
    let mut records = 0u64;
    for e in jobs.iter().flat_map(|j| j.events.iter()) {
        let p = partition_of(&e.event_id, partitions);
        for tag in &e.tags {
            groups.entry((tag, p)).or_default().push(e);
            records += 1;
        }
    }
    if groups.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    let sha = ENQUEUE_SCRIPT.get_hash();
    for ((tag, p), events) in &groups {
        let k = inner.keys.partition(tag, *p);
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(sha)
            .arg(2)
            .arg(&k.queue)
            .arg(&k.counts)
            .arg(GROUP)
            .arg(WRITE_VERSION);
        for e in events {
            cmd.arg(&e.event_id)
                .arg(e.enqueued_at_ms)
                .arg(&e.payload[..]);
        }
    }
    let mut tags: Vec<&str> = groups.keys().map(|(t, _)| *t).collect();
    tags.dedup();
    let new_tags: Vec<&str> = tags
        .iter()
        .copied()
        .filter(|t| !inner.registered(t))
        .collect();
    if !new_tags.is_empty() {
        pipe.cmd("SADD")
            .arg(inner.keys.tags())
            .arg(&new_tags)
            .ignore();
    }
    pipe.cmd("PUBLISH")
        .arg(inner.keys.wake_channel())
        .arg(tags.join("\n"))
        .ignore();
    let wait = inner.settings.wait_replicas;
    if wait > 0 {
        pipe.cmd("WAIT")
            .arg(wait)
            .arg(inner.settings.wait_timeout_ms);
    }
    let replies: Vec<Value> = match pipe.query_async(&mut conn).await {
        Ok(r) => r,
        Err(e) if is_oom(&e) => return Err(inner.reject_full(true)),
        Err(e) => {
            if breaks_link(&e) {
                inner.link.failed(&e);
            } else {
                tracing::warn!(error = %e, "outbox: Redis refused a group commit; its hits are answered 503");
            }
            return Err(unavailable(e.to_string()));
        }
    };
    for t in &new_tags {
        inner.register(t);
    }
    for (((tag, p), _), reply) in groups.iter().zip(&replies) {
        if let Value::Array(v) = reply {
            if let [r, b, ..] = v.as_slice() {
                inner.totals.set(tag, *p, int(r), int(b));
            }
        }
    }
    if wait > 0 {
        let confirmed = replies.last().map(int).unwrap_or(0);
        if confirmed < i64::from(wait) {
            inner.unconfirmed(confirmed, wait);
            return Err(unavailable(format!(
                "{confirmed} of {wait} replicas confirmed the write within {} ms",
                inner.settings.wait_timeout_ms
            )));
        }
    }
    metrics::counter!("tagrelay_outbox_commits_total", "synced" => if wait > 0 { "true" } else { "false" })
        .increment(1);
    metrics::histogram!("tagrelay_outbox_commit_records").record(records as f64);
    let mut per_tag: BTreeMap<&str, u64> = BTreeMap::new();
    for ((tag, _), events) in &groups {
        *per_tag.entry(tag).or_default() += events.len() as u64;
    }
    // Before the wake-ups: this process's dispatchers find them parsed.
    inner
        .local
        .keep(jobs.iter().flat_map(|j| j.events.iter()).filter_map(|e| {
            e.event
                .as_ref()
                .map(|ev| (e.event_id.as_str(), ev, &e.payload, e.tags.len()))
        }));
    for (tag, n) in per_tag {
        metrics::counter!("tagrelay_outbox_enqueued_total", "tag" => tag.to_string()).increment(n);
        inner.signals.notify(tag);
    }
    Ok(())
}
