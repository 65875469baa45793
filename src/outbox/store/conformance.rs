//! One suite, every engine: what delivery relies on from a store — enqueue, lease, settle,
//! the retry schedule, dead letters and replay, back-pressure, wake-ups, crash and reopen,
//! and the dispatchers on top — run against the embedded store and against Redis.
//!
//! Each test is written once against the [`DeliveryStore`] trait and the engine-agnostic
//! tools; the macro at the end instantiates it per engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::embedded::tests::{fast_settings, payload, pipeline, tag_instance, Vendor};
use super::embedded::EmbeddedStore;
use super::redis::test_server::RedisServer;
use super::redis::RedisStore;
use super::tools;
use crate::clock::now_ms;
use crate::event::Event;
use crate::outbox::config::{Backend, FsyncMode, OutboxConfig, RedisConfig};
use crate::outbox::delivery::spawn_dispatchers;
use crate::outbox::{
    DeadLetterRequest, DeliveryStore, EnqueueError, LeasedRecord, Nack, NewEvent, Settlement,
};
use crate::secret::Secret;
use crate::trace::NoopObserver;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Embedded,
    Redis,
}

/// An engine under test: its configuration and what backs it (a directory, a server).
struct Engine {
    kind: Kind,
    cfg: OutboxConfig,
    _dir: tempfile::TempDir,
    _server: Option<RedisServer>,
}

/// A store as opened, so that a test can drop it the way a crash does.
enum Opened {
    Embedded(Arc<EmbeddedStore>),
    Redis(Arc<RedisStore>),
}

impl Opened {
    fn store(&self) -> Arc<dyn DeliveryStore> {
        match self {
            Opened::Embedded(s) => s.clone(),
            Opened::Redis(s) => s.clone(),
        }
    }

    /// As if the process had been killed: nothing flushed, nothing given back.
    fn crash(self) {
        match self {
            Opened::Embedded(s) => s.leak_as_if_crashed(),
            Opened::Redis(s) => s.abandon(),
        }
    }
}

impl Engine {
    fn new(kind: Kind, tweak: impl FnOnce(&mut OutboxConfig)) -> Engine {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = OutboxConfig {
            path: dir.path().to_string_lossy().into_owned(),
            fsync: FsyncMode::Off,
            log_segment_bytes: 1 << 20,
            retry_initial_ms: 20,
            retry_max_ms: 100,
            ..OutboxConfig::default()
        };
        let server = match kind {
            Kind::Embedded => None,
            Kind::Redis => {
                let s = RedisServer::start(&[]);
                cfg.backend = Backend::Redis;
                cfg.redis = RedisConfig {
                    url: Some(Secret::new(s.url())),
                    ..RedisConfig::default()
                };
                Some(s)
            }
        };
        tweak(&mut cfg);
        Engine {
            kind,
            cfg,
            _dir: dir,
            _server: server,
        }
    }

    async fn open(&self) -> Opened {
        match self.kind {
            Kind::Embedded => Opened::Embedded(EmbeddedStore::open(&self.cfg).await.unwrap()),
            Kind::Redis => Opened::Redis(RedisStore::open(&self.cfg).await.unwrap()),
        }
    }

    /// The CLI tools run on a thread of their own (they block).
    async fn tool<T: Send + 'static>(
        &self,
        f: impl FnOnce(&OutboxConfig) -> Result<T, String> + Send + 'static,
    ) -> T {
        let cfg = self.cfg.clone();
        tokio::task::spawn_blocking(move || f(&cfg))
            .await
            .unwrap()
            .unwrap()
    }
}

fn event(tags: &[&str], event_id: &str, name: &str) -> NewEvent {
    NewEvent {
        event_id: event_id.into(),
        payload: payload(event_id, name),
        event: None,
        tags: tags.iter().map(|t| Arc::from(*t)).collect(),
        enqueued_at_ms: now_ms(),
    }
}

fn events(tag: &str, prefix: &str, n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| event(&[tag], &format!("{prefix}{i}"), "purchase"))
        .collect()
}

fn ids(records: &[LeasedRecord]) -> Vec<String> {
    let mut v: Vec<String> = records.iter().map(|r| r.event_id.clone()).collect();
    v.sort();
    v
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

async fn enqueue_then_lease_hands_each_delivery_out_once(kind: Kind) {
    let engine = Engine::new(kind, |_| {});
    let store = engine.open().await.store();
    let before = now_ms();
    let mut batch = events("t", "e", 4);
    batch.push(event(&["t", "u"], "both", "purchase"));
    store.enqueue(batch).await.unwrap();
    let now = now_ms();
    let got = store.lease("t", now, 10, 60_000).await.unwrap();
    assert_eq!(ids(&got), strings(&["both", "e0", "e1", "e2", "e3"]));
    for r in &got {
        let ev = Event::from_payload(&r.payload).unwrap();
        assert_eq!(ev.event_id, r.event_id);
        assert_eq!((r.attempts, r.last_error.as_deref()), (0, None));
        assert!(r.first_enqueued_ms >= before && r.first_enqueued_ms <= now);
        assert!(r.lease_until_ms >= now + 60_000);
        assert_eq!(&*r.tag, "t");
    }
    assert!(
        store.lease("t", now, 10, 60_000).await.unwrap().is_empty(),
        "leased records are not handed out again while leased"
    );
    let other = store.lease("u", now, 10, 60_000).await.unwrap();
    assert_eq!(ids(&other), strings(&["both"]));
    store.close().await;
}

async fn settling_acks_schedules_retries_and_dead_letters(kind: Kind) {
    let engine = Engine::new(kind, |_| {});
    let store = engine.open().await.store();
    store.enqueue(events("t", "e", 5)).await.unwrap();
    let now = now_ms();
    let mut leased = store.lease("t", now, 5, 60_000).await.unwrap();
    leased.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    let id = |i: usize| leased[i].id;
    store
        .settle(Settlement {
            ack: vec![id(0), id(1)],
            nack: vec![
                Nack {
                    id: id(2),
                    next_attempt_ms: now + 10_000,
                    error: "HTTP 503".into(),
                },
                Nack {
                    id: id(3),
                    next_attempt_ms: now + 10_000,
                    error: "HTTP 503".into(),
                },
            ],
            dead: vec![DeadLetterRequest {
                id: id(4),
                reason: "rejected: HTTP 400: bad".into(),
                attempted: true,
            }],
            now_ms: now,
        })
        .await
        .unwrap();
    let backlog = store.backlog(now).await.unwrap();
    let t = backlog.iter().find(|b| b.tag == "t").unwrap();
    assert_eq!(t.pending, 2, "{backlog:?}");
    assert!(t.oldest_enqueued_ms.is_some_and(|o| o <= now));
    // The retry schedule: not before its time, then with its attempt and error.
    assert!(store
        .lease("t", now + 9_999, 10, 60_000)
        .await
        .unwrap()
        .is_empty());
    let retried = store.lease("t", now + 10_000, 10, 60_000).await.unwrap();
    assert_eq!(ids(&retried), strings(&["e2", "e3"]));
    assert!(retried
        .iter()
        .all(|r| r.attempts == 1 && r.last_error.as_deref() == Some("HTTP 503")));
    // A second failure counts on.
    store
        .nack(
            vec![Nack {
                id: retried[0].id,
                next_attempt_ms: now + 20_000,
                error: "timeout".into(),
            }],
            now + 10_000,
        )
        .await
        .unwrap();
    let again = store.lease("t", now + 20_000, 10, 60_000).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].attempts, again[0].last_error.as_deref()),
        (2, Some("timeout"))
    );
    store.close().await;
}

async fn dead_letters_are_listed_counted_and_replayed(kind: Kind) {
    let engine = Engine::new(kind, |_| {});
    let store = engine.open().await.store();
    store.enqueue(events("t", "e", 2)).await.unwrap();
    let leased = store.lease("t", now_ms(), 10, 60_000).await.unwrap();
    let dead = leased.iter().find(|r| r.event_id == "e1").unwrap();
    let live = leased.iter().find(|r| r.event_id == "e0").unwrap();
    store
        .dead_letter(
            vec![DeadLetterRequest {
                id: dead.id,
                reason: "rejected: HTTP 400: bad".into(),
                attempted: true,
            }],
            now_ms(),
        )
        .await
        .unwrap();
    store.ack(vec![live.id], now_ms()).await.unwrap();
    let list = engine.tool(|c| tools::dead_letters(c, None, 10)).await;
    assert_eq!(list.len(), 1);
    let d = &list[0];
    assert_eq!((d.tag.as_str(), d.event_id.as_str()), ("t", "e1"));
    assert_eq!(d.event_name.as_deref(), Some("purchase"));
    assert_eq!(d.attempts, 1);
    assert_eq!(d.reason, "rejected: HTTP 400: bad");
    assert!(d.dead_at_ms >= d.first_enqueued_ms);
    assert!(engine
        .tool(|c| tools::dead_letters(c, Some("other"), 10))
        .await
        .is_empty());
    let stats = engine.tool(tools::stats).await;
    assert_eq!((stats.pending, stats.dead_letters), (0, 1));
    // Replayed while the store is open, as an operator would with the server running.
    assert_eq!(engine.tool(|c| tools::replay(c, Some("other"))).await, 0);
    assert_eq!(engine.tool(|c| tools::replay(c, None)).await, 1);
    let replayed = store.lease("t", now_ms(), 10, 60_000).await.unwrap();
    assert_eq!(ids(&replayed), strings(&["e1"]));
    assert_eq!(replayed[0].attempts, 0);
    assert!(Event::from_payload(&replayed[0].payload).is_ok());
    let stats = engine.tool(tools::stats).await;
    assert_eq!((stats.pending, stats.dead_letters), (1, 0));
    store.close().await;
}

async fn back_pressure_refuses_when_full_and_recovers(kind: Kind) {
    let engine = Engine::new(kind, |c| c.max_records = 10);
    let store = engine.open().await.store();
    store.enqueue(events("t", "a", 10)).await.unwrap();
    assert!(matches!(
        store.enqueue(events("t", "b", 1)).await,
        Err(EnqueueError::Full {
            retry_after_secs: 5
        })
    ));
    let leased = store.lease("t", now_ms(), 5, 60_000).await.unwrap();
    store
        .ack(leased.iter().map(|r| r.id).collect(), now_ms())
        .await
        .unwrap();
    store.enqueue(events("t", "c", 5)).await.unwrap();
    assert!(matches!(
        store.enqueue(events("t", "d", 1)).await,
        Err(EnqueueError::Full { .. })
    ));
    store.close().await;
    assert_eq!(
        store.enqueue(events("t", "z", 1)).await,
        Err(EnqueueError::Closed)
    );
    assert!(!store.is_open());
}

async fn a_commit_wakes_the_dispatcher_of_its_tags(kind: Kind) {
    let engine = Engine::new(kind, |_| {});
    let store = engine.open().await.store();
    let wake = store.wakeup("t");
    let woken = wake.notified();
    store.enqueue(events("t", "e", 1)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), woken)
        .await
        .expect("woken after the commit");
    store.close().await;
}

async fn a_crash_loses_nothing_acknowledged(kind: Kind) {
    let engine = Engine::new(kind, |_| {});
    let first = engine.open().await;
    let store = first.store();
    store.enqueue(events("t", "e", 6)).await.unwrap();
    // Three out (one of them delivered and acked), three not yet taken, when it dies.
    let out = store.lease("t", now_ms(), 3, 1_000).await.unwrap();
    assert_eq!(out.len(), 3);
    let acked = out[0].event_id.clone();
    store.ack(vec![out[0].id], now_ms()).await.unwrap();
    drop(store);
    first.crash();
    let second = engine.open().await;
    let store = second.store();
    let mut expected = strings(&["e0", "e1", "e2", "e3", "e4", "e5"]);
    expected.retain(|e| *e != acked);
    // The deliveries in flight come back when their lease ends (a reopened embedded store
    // clears them at once); the others are due as they were.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got: Vec<String> = Vec::new();
    while got.len() < expected.len() {
        assert!(
            Instant::now() < deadline,
            "after the crash only {got:?} of {expected:?} came back"
        );
        let leased = store.lease("t", now_ms(), 10, 1_000).await.unwrap();
        got.extend(leased.iter().map(|r| r.event_id.clone()));
        store
            .ack(leased.iter().map(|r| r.id).collect(), now_ms())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    got.sort();
    assert_eq!(got, expected, "each once, the acknowledged delivery never");
    store.close().await;
}

async fn dispatchers_deliver_retry_and_dead_letter_on_either_engine(kind: Kind) {
    // Every event's first request fails with 503; events named `bad` are refused (the tag
    // rejects them); the rest are delivered on a retry.
    let (vendor, url) = Vendor::start(Box::new(|_, ids| {
        static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let mut seen = SEEN.lock().unwrap();
        let fresh = ids.iter().any(|i| !seen.contains(i));
        seen.extend(ids.iter().cloned());
        if fresh {
            (503, None)
        } else {
            (200, None)
        }
    }))
    .await;
    let prefix = match kind {
        Kind::Embedded => "emb",
        Kind::Redis => "red",
    };
    let engine = Engine::new(kind, |_| {});
    let opened = engine.open().await;
    let store = opened.store();
    let swap = Arc::new(ArcSwap::from_pointee(pipeline(vec![tag_instance(
        "vendor", &url, 5, "test",
    )])));
    let dispatchers = spawn_dispatchers(
        store.clone(),
        swap,
        fast_settings(&engine.cfg),
        Arc::new(NoopObserver),
    )
    .unwrap();
    let mut good = Vec::new();
    for i in 0..12 {
        let id = format!("{prefix}-{i}");
        let name = if i % 4 == 3 { "bad" } else { "purchase" };
        if name != "bad" {
            good.push(id.clone());
        }
        store
            .enqueue(vec![event(&["vendor"], &id, name)])
            .await
            .unwrap();
    }
    good.sort();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut d = vendor.delivered();
        d.dedup();
        if d == good {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "delivered {d:?}, expected {good:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(vendor.hits().iter().any(|h| h.1 == 503), "retries happened");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dead = engine.tool(|c| tools::dead_letters(c, None, 100)).await;
        let stats = engine.tool(tools::stats).await;
        if dead.len() == 3 && stats.pending == 0 {
            assert!(dead.iter().all(|d| d.reason.contains("bad")), "{dead:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{dead:?} {stats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dispatchers.shutdown(Duration::from_secs(2)).await;
    store.close().await;
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Embedded).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Redis).await
                }
            )*
        }
    };
}

conformance!(
    enqueue_then_lease_hands_each_delivery_out_once,
    settling_acks_schedules_retries_and_dead_letters,
    dead_letters_are_listed_counted_and_replayed,
    back_pressure_refuses_when_full_and_recovers,
    a_commit_wakes_the_dispatcher_of_its_tags,
    a_crash_loses_nothing_acknowledged,
    dispatchers_deliver_retry_and_dead_letter_on_either_engine,
);
