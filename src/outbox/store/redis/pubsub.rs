//! What replicas tell each other through Redis pub/sub: wake-ups (records committed for a
//! tag), tag pauses (a vendor's `Retry-After`) and the debug view's traces.
//!
//! Pub/sub is at most once. Nothing depends on it for correctness: a missed wake-up is made
//! up by the dispatchers' idle poll, a missed pause by the pause key each lease reads, a
//! missed trace only leaves it out of another replica's debug page.
//!
//! Traces are shared bounded and redacted: they are redacted where they are made (the same
//! copy the local page shows), only traced hits are sent (sampling decides), every message is
//! capped in size and their rate per replica too, and a full queue drops rather than waits. A debug page open on any replica
//! makes every replica trace with `watching` sampling, so watching a visitor works behind a
//! load balancer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Inner;
use crate::clock::now_ms;
use crate::trace::{Attempt, TagOutcome, Trace, TraceShare, Traces};

/// Largest debug message sent (a trace is already truncated to a few tens of KiB).
const MAX_DEBUG_MESSAGE: usize = 512 * 1024;
/// Debug messages waiting to be published at most; more are dropped.
const DEBUG_QUEUE: usize = 1_024;
/// Debug messages one replica publishes per second at most (a page shows 50 new hits a
/// second): sampling every hit on a busy site must not flood Redis or the other replicas.
const DEBUG_PER_SEC: u32 = 500;
/// How often a replica with a debug page open says so, and how long others believe it.
const WATCH_EVERY: Duration = Duration::from_secs(2);
const WATCH_FOR: Duration = Duration::from_secs(6);

/// A debug message as sent.
#[derive(Serialize)]
struct Out<'a> {
    /// The sending consumer: a replica ignores its own messages.
    o: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expect: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace: Option<&'a Trace>,
    #[serde(skip_serializing_if = "Option::is_none")]
    update: Option<UpdateOut<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    watch: bool,
}

#[derive(Serialize)]
struct UpdateOut<'a> {
    tag: &'a str,
    event_ids: &'a [String],
    attempt: Option<&'a Attempt>,
    outcome: &'a TagOutcome,
}

/// A debug message as received.
#[derive(Deserialize)]
struct In {
    o: String,
    #[serde(default)]
    expect: Option<Vec<String>>,
    /// Read as a value, then as a trace (see `debug`).
    #[serde(default)]
    trace: Option<serde_json::Value>,
    #[serde(default)]
    update: Option<UpdateIn>,
    #[serde(default)]
    watch: bool,
}

#[derive(Deserialize)]
struct UpdateIn {
    tag: String,
    event_ids: Vec<String>,
    attempt: Option<Attempt>,
    outcome: TagOutcome,
}

/// Queued by the trace hooks; serialized and published by `publish`.
enum Outgoing {
    Expect(Vec<String>),
    Trace(Arc<Trace>),
    Update {
        tag: String,
        event_ids: Vec<String>,
        attempt: Option<Arc<Attempt>>,
        outcome: TagOutcome,
    },
    Watch,
}

struct Sharer {
    tx: mpsc::Sender<Outgoing>,
}

impl Sharer {
    fn send(&self, m: Outgoing) {
        // Full: dropped (the debug view is best effort; hits and deliveries never wait).
        let _ = self.tx.try_send(m);
    }
}

impl TraceShare for Sharer {
    fn expect(&self, event_ids: Vec<String>) {
        self.send(Outgoing::Expect(event_ids));
    }
    fn recorded(&self, trace: Arc<Trace>) {
        self.send(Outgoing::Trace(trace));
    }
    fn updated(
        &self,
        tag: &str,
        event_ids: Vec<String>,
        attempt: Option<Arc<Attempt>>,
        outcome: TagOutcome,
    ) {
        self.send(Outgoing::Update {
            tag: tag.to_owned(),
            event_ids,
            attempt,
            outcome,
        });
    }
    fn watching(&self) {
        self.send(Outgoing::Watch);
    }
}

/// Hooks `traces` up: what is traced here is published, what others publish lands here.
pub(crate) fn share_traces(inner: &Arc<Inner>, traces: &Arc<Traces>) {
    if inner.traces.set(traces.clone()).is_err() {
        return;
    }
    let (tx, rx) = mpsc::channel(DEBUG_QUEUE);
    traces.share_with(Arc::new(Sharer { tx }));
    let task = tokio::spawn(publish(inner.clone(), traces.clone(), rx));
    if let Ok(mut t) = inner.tasks.lock() {
        t.push(task);
    }
}

async fn publish(inner: Arc<Inner>, traces: Arc<Traces>, mut rx: mpsc::Receiver<Outgoing>) {
    let channel = inner.keys.debug_channel().to_owned();
    let mut heartbeat = tokio::time::interval(WATCH_EVERY);
    let (mut window, mut sent, mut dropped) = (Instant::now(), 0u32, 0u64);
    loop {
        let m = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
            _ = heartbeat.tick() => {
                if traces.watchers_here() == 0 {
                    continue;
                }
                Outgoing::Watch
            }
        };
        if window.elapsed() >= Duration::from_secs(1) {
            if dropped > 0 {
                tracing::debug!(
                    dropped,
                    "outbox: debug-view messages over the rate were not shared"
                );
            }
            (window, sent, dropped) = (Instant::now(), 0, 0);
        }
        if !matches!(m, Outgoing::Watch) {
            if sent >= DEBUG_PER_SEC {
                dropped += 1;
                continue;
            }
            sent += 1;
        }
        let o = inner.consumer.as_str();
        let mut out = Out {
            o,
            expect: None,
            trace: None,
            update: None,
            watch: false,
        };
        let json = match &m {
            Outgoing::Expect(ids) => {
                out.expect = Some(ids);
                serde_json::to_string(&out)
            }
            Outgoing::Trace(t) => {
                out.trace = Some(t);
                serde_json::to_string(&out)
            }
            Outgoing::Update {
                tag,
                event_ids,
                attempt,
                outcome,
            } => {
                out.update = Some(UpdateOut {
                    tag,
                    event_ids,
                    attempt: attempt.as_deref(),
                    outcome,
                });
                serde_json::to_string(&out)
            }
            Outgoing::Watch => {
                out.watch = true;
                serde_json::to_string(&out)
            }
        };
        drop(m);
        let Ok(json) = json else { continue };
        if json.len() > MAX_DEBUG_MESSAGE {
            tracing::debug!(
                bytes = json.len(),
                "outbox: a trace too large to share was kept on this replica only"
            );
            continue;
        }
        let Ok(mut conn) = inner.link.work() else {
            continue;
        };
        let _: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(json)
            .query_async(&mut conn)
            .await;
    }
}

/// Subscribes and applies what other replicas say; reconnects after an outage.
pub(crate) async fn run(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(200);
    let channels = [
        inner.keys.wake_channel().to_owned(),
        inner.keys.pause_channel().to_owned(),
        inner.keys.debug_channel().to_owned(),
    ];
    let mut watched_at: Option<Instant> = None;
    while !inner.link.is_closed() {
        if !inner.link.is_up() {
            tokio::select! {
                _ = inner.link.connected.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = inner.stop.notified() => return,
            }
            continue;
        }
        let pubsub = async {
            let client = inner.link.client().await?;
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channels).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        let mut ps = match pubsub.await {
            Ok(ps) => ps,
            Err(e) => {
                tracing::debug!(error = %e, "outbox: cannot subscribe to Redis yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        let mut messages = ps.on_message();
        let mut tick = tokio::time::interval(WATCH_EVERY);
        loop {
            tokio::select! {
                m = messages.next() => {
                    let Some(m) = m else { break };
                    let channel = m.get_channel_name();
                    let payload = m.get_payload_bytes();
                    if channel == channels[0] {
                        wake(&inner, payload);
                    } else if channel == channels[1] {
                        pause(&inner, payload);
                    } else if debug(&inner, payload) {
                        watched_at = Some(Instant::now());
                        if let Some(t) = inner.traces.get() {
                            t.set_remote_watching(true);
                        }
                    }
                }
                _ = tick.tick() => {
                    if watched_at.is_some_and(|t| t.elapsed() >= WATCH_FOR) {
                        watched_at = None;
                        if let Some(t) = inner.traces.get() {
                            t.set_remote_watching(false);
                        }
                    }
                    if !inner.link.is_up() {
                        break;
                    }
                }
                _ = inner.stop.notified() => return,
            }
        }
    }
}

fn wake(inner: &Inner, payload: &[u8]) {
    for tag in String::from_utf8_lossy(payload).split('\n') {
        if !tag.is_empty() {
            inner.signals.notify(tag);
        }
    }
}

fn pause(inner: &Inner, payload: &[u8]) {
    let text = String::from_utf8_lossy(payload);
    if let Some((tag, ms)) = text.split_once('\n') {
        if let Ok(ms) = ms.parse::<i64>() {
            inner.signals.pause(tag, now_ms().saturating_add(ms));
        }
    }
}

/// Applies a debug message; returns whether it said a debug page is open elsewhere.
fn debug(inner: &Inner, payload: &[u8]) -> bool {
    let Some(traces) = inner.traces.get() else {
        return false;
    };
    if payload.len() > MAX_DEBUG_MESSAGE {
        return false;
    }
    let Ok(m) = serde_json::from_slice::<In>(payload) else {
        return false;
    };
    if m.o == inner.consumer {
        return false;
    }
    if let Some(ids) = &m.expect {
        traces.receive_expect(ids);
    }
    // A trace's `&'static str` kinds are read through `text::interned`, so a trace is read
    // from an owned value (whose lifetime is `'static`), never borrowed from the message.
    if let Some(t) = m.trace.and_then(|v| Trace::deserialize(v).ok()) {
        traces.receive_trace(t);
    }
    if let Some(u) = m.update {
        traces.receive_update(&u.tag, &u.event_ids, u.attempt, &u.outcome);
    }
    m.watch
}
