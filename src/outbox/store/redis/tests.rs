//! The shared store against a real `redis-server`: what only a shared store does (several
//! processes on one Redis, takeover, shared pauses, rolling upgrades, outages, refusals).
//! What every engine must do is in `store::conformance`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::test_server::RedisServer;
use super::*;
use crate::clock::now_ms;
use crate::event::Event;
use crate::outbox::config::{Backend, OutboxConfig, RedisConfig};
use crate::outbox::{DeadLetterRequest, Nack};
use crate::secret::Secret;

pub(crate) fn config(server: &RedisServer) -> OutboxConfig {
    OutboxConfig {
        backend: Backend::Redis,
        redis: RedisConfig {
            url: Some(Secret::new(server.url())),
            ..RedisConfig::default()
        },
        ..OutboxConfig::default()
    }
}

fn payload(event_id: &str, name: &str) -> Bytes {
    let ev = Event {
        event_name: name.into(),
        event_id: event_id.into(),
        timestamp_ms: now_ms(),
        source: "test".into(),
        ..Event::default()
    };
    Bytes::from(ev.to_payload().unwrap())
}

fn event(tags: &[&str], event_id: &str) -> NewEvent {
    NewEvent {
        event_id: event_id.into(),
        payload: payload(event_id, "purchase"),
        event: None,
        tags: tags.iter().map(|t| Arc::from(*t)).collect(),
        enqueued_at_ms: now_ms(),
    }
}

fn events(tag: &str, prefix: &str, n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| event(&[tag], &format!("{prefix}{i}")))
        .collect()
}

async fn until<T>(what: &str, secs: u64, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ids(records: &[LeasedRecord]) -> Vec<String> {
    let mut v: Vec<String> = records.iter().map(|r| r.event_id.clone()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_replica_that_dies_has_its_deliveries_claimed_by_another() {
    let server = RedisServer::start(&[]);
    let cfg = config(&server);
    let a = RedisStore::open(&cfg).await.unwrap();
    let b = RedisStore::open(&cfg).await.unwrap();
    a.enqueue(events("t", "e", 6)).await.unwrap();
    let now = now_ms();
    let taken = a.lease("t", now, 4, 1_000).await.unwrap();
    assert_eq!(taken.len(), 4);
    // B gets what A did not take, and nothing A holds.
    let rest = b.lease("t", now, 10, 1_000).await.unwrap();
    assert_eq!(rest.len(), 2);
    b.ack(rest.iter().map(|r| r.id).collect(), now_ms())
        .await
        .unwrap();
    a.abandon();
    // A's leases end (1 s idle): B claims them, with their content.
    let claimed = until("B claims A's deliveries", 15, async || {
        let got = b.lease("t", now_ms(), 10, 1_000).await.unwrap();
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(ids(&claimed), ids(&taken));
    assert!(claimed
        .iter()
        .all(|r| !r.payload.is_empty() && r.attempts == 0));
    b.ack(claimed.iter().map(|r| r.id).collect(), now_ms())
        .await
        .unwrap();
    assert_eq!(b.pending_totals().0, 0);
    b.close().await;
}

#[tokio::test]
async fn a_delivery_that_stops_every_replica_is_dead_lettered_as_such() {
    let server = RedisServer::start(&[]);
    let cfg = config(&server);
    let a = RedisStore::open(&cfg).await.unwrap();
    a.enqueue(events("t", "poison", 1)).await.unwrap();
    let taken = a.lease("t", now_ms(), 1, 1_000).await.unwrap();
    let (_, p, ms, seq) = taken[0].id.as_entry().unwrap();
    // As if ten replicas had taken it and died.
    let q = Keys::new("tagrelay").partition("t", p).queue.clone();
    server.cli(&[
        "XCLAIM",
        &q,
        GROUP,
        "someone",
        "0",
        &format!("{ms}-{seq}"),
        "IDLE",
        "5000",
        "RETRYCOUNT",
        "10",
    ]);
    // Claimed at the next claim round, and dead-lettered instead of handed out.
    let dead = until("the poisoned delivery is dead-lettered", 15, async || {
        let got = a.lease("t", now_ms(), 10, 1_000).await.unwrap();
        assert!(got.is_empty(), "{got:?}");
        let dead = tools::dead_letters(&cfg, None, 10).await.unwrap();
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.starts_with("crashed: taken 11 times"),
        "{}",
        dead[0].reason
    );
    assert_eq!(a.pending_totals().0, 0);
    a.close().await;
}

#[tokio::test]
async fn a_replica_leasing_what_it_committed_takes_the_parsed_event() {
    let server = RedisServer::start(&[]);
    let cfg = config(&server);
    let (a, b) = (
        RedisStore::open(&cfg).await.unwrap(),
        RedisStore::open(&cfg).await.unwrap(),
    );
    let mut mine = event(&["t", "u"], "mine");
    let parsed = Arc::new(Event::from_payload(&mine.payload).unwrap());
    mine.event = Some(parsed.clone());
    a.enqueue(vec![mine]).await.unwrap();
    // Each tag's delivery comes back with the very event the hit parsed: no second decode.
    for tag in ["t", "u"] {
        let got = a.lease(tag, now_ms(), 10, 60_000).await.unwrap();
        assert_eq!(got.len(), 1);
        assert!(got[0]
            .event
            .as_ref()
            .is_some_and(|e| Arc::ptr_eq(e, &parsed)));
    }
    assert_eq!(
        a.inner.local.len(),
        0,
        "handed over once per tag, then forgotten"
    );
    // Another replica reads it from its payload.
    let mut theirs = event(&["t"], "theirs");
    theirs.event = Some(Arc::new(Event::from_payload(&theirs.payload).unwrap()));
    a.enqueue(vec![theirs]).await.unwrap();
    let got = b.lease("t", now_ms(), 10, 60_000).await.unwrap();
    assert_eq!(ids(&got), vec!["theirs".to_string()]);
    assert!(got[0].event.is_none() && !got[0].payload.is_empty());
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn a_pause_reaches_every_replica() {
    let server = RedisServer::start(&[]);
    let cfg = config(&server);
    let a = RedisStore::open(&cfg).await.unwrap();
    let b = RedisStore::open(&cfg).await.unwrap();
    b.enqueue(events("t", "e", 3)).await.unwrap();
    let before = now_ms();
    a.pause_tag("t", Duration::from_secs(30)).await.unwrap();
    assert!(a.paused_until("t") >= before + 30_000);
    // B leases nothing while the pause lasts, and learns until when.
    assert!(b.lease("t", now_ms(), 10, 60_000).await.unwrap().is_empty());
    assert!(
        b.paused_until("t") >= before + 29_000,
        "{}",
        b.paused_until("t")
    );
    // A replica that missed the message still finds the pause in Redis.
    let c = RedisStore::open(&cfg).await.unwrap();
    assert_eq!(c.paused_until("t"), 0);
    assert!(c
        .inner
        .lease("t", now_ms(), 10, 60_000)
        .await
        .unwrap()
        .is_empty());
    assert!(c.paused_until("t") > now_ms());
    // A shorter pause never cuts a longer one short.
    a.pause_tag("t", Duration::from_millis(10)).await.unwrap();
    let k = Keys::new("tagrelay").partition("t", 0).pause.clone();
    let pttl: i64 = server.cli(&["PTTL", &k]).trim().parse().unwrap();
    assert!(pttl > 20_000, "{pttl}");
    for s in [a, b, c] {
        s.close().await;
    }
}

#[tokio::test]
async fn a_record_of_a_newer_schema_is_left_for_a_newer_replica() {
    let server = RedisServer::start(&[]);
    let cfg = config(&server);
    let old = RedisStore::open(&cfg).await.unwrap();
    // Make the stream and group, then add what a newer version writes: one record of a
    // newer schema, one of this schema with a field this version does not know.
    old.enqueue(vec![event(&["t"], "first")]).await.unwrap();
    let first = old.lease("t", now_ms(), 10, 60_000).await.unwrap();
    old.ack(first.iter().map(|r| r.id).collect(), now_ms())
        .await
        .unwrap();
    let p = keys::partition_of("first", 4);
    let q = Keys::new("tagrelay").partition("t", p).queue.clone();
    // JSON: a stored payload may be either format, and redis-cli takes text.
    let body = r#"{"event_name":"purchase","event_id":"same"}"#;
    let t = now_ms().to_string();
    server.cli(&[
        "XADD",
        &q,
        "*",
        "v",
        "2",
        "e",
        "newer",
        "t",
        &t,
        "p2",
        "a layout v1 cannot read",
    ]);
    server.cli(&[
        "XADD",
        &q,
        "*",
        "v",
        "1",
        "e",
        "same",
        "t",
        &t,
        "p",
        body,
        "zz",
        "new field",
    ]);
    let got = old.lease("t", now_ms(), 10, 60_000).await.unwrap();
    assert_eq!(
        ids(&got),
        vec!["same".to_string()],
        "never the newer record"
    );
    assert!(Event::from_payload(&got[0].payload).is_ok());
    // The newer record waits in the group, idle, taken by nobody's count: a newer replica
    // claims it as it was written.
    let claimed = server.cli(&["XAUTOCLAIM", &q, GROUP, "newer-replica", "60000", "0-0"]);
    assert!(claimed.contains("a layout v1 cannot read"), "{claimed}");
    let pending = server.cli(&["XPENDING", &q, GROUP, "-", "+", "10", "newer-replica"]);
    assert!(
        pending.lines().any(|l| l.trim() == "1"),
        "delivered once, to the newer replica: {pending}"
    );
    // A retry by the older replica keeps the field it does not know.
    let now = now_ms();
    old.nack(
        vec![Nack {
            id: got[0].id,
            next_attempt_ms: now,
            error: "HTTP 503".into(),
        }],
        now,
    )
    .await
    .unwrap();
    let again = old.lease("t", now + 1, 10, 60_000).await.unwrap();
    assert_eq!(ids(&again), vec!["same".to_string()]);
    assert_eq!(again[0].attempts, 1);
    let raw = server.cli(&["XRANGE", &q, "-", "+"]);
    assert!(raw.contains("new field"), "{raw}");
    old.close().await;
}

#[tokio::test]
async fn a_redis_that_evicts_keys_is_refused_with_the_reason() {
    let server = RedisServer::start(&["maxmemory 64mb", "maxmemory-policy allkeys-lru"]);
    let err = RedisStore::open(&config(&server)).await.unwrap_err();
    assert!(
        err.contains("allkeys-lru") && err.contains("noeviction"),
        "{err}"
    );
    let cluster = RedisServer::start(&["cluster-enabled yes"]);
    let err = RedisStore::open(&config(&cluster)).await.unwrap_err();
    assert!(err.contains("Redis Cluster"), "{err}");
}

#[tokio::test]
async fn while_redis_is_down_hits_are_refused_and_all_resumes_when_it_is_back() {
    let mut server = RedisServer::start(&[]);
    let cfg = config(&server);
    let store = RedisStore::open(&cfg).await.unwrap();
    store.enqueue(events("t", "before", 2)).await.unwrap();
    server.kill9();
    let refused = until("the store notices", 10, async || {
        match store.enqueue(events("t", "during", 1)).await {
            Err(EnqueueError::Unavailable {
                retry_after_secs, ..
            }) => Some(retry_after_secs),
            _ => None,
        }
    })
    .await;
    assert!(refused > 0);
    assert!(!store.is_open());
    assert!(matches!(
        store.lease("t", now_ms(), 10, 60_000).await,
        Err(StoreError::Unavailable(_))
    ));
    server.restart();
    until("the store reconnects", 15, async || {
        store.is_open().then_some(())
    })
    .await;
    store.enqueue(events("t", "after", 1)).await.unwrap();
    // Restarted from its AOF: what was acknowledged before the crash is there.
    let got = store.lease("t", now_ms(), 10, 60_000).await.unwrap();
    assert_eq!(ids(&got), vec!["after0", "before0", "before1"]);
    store.close().await;
}

#[tokio::test]
async fn opening_with_redis_unreachable_starts_not_ready_and_connects_later() {
    let port = test_server::free_port();
    let mut cfg = config(&RedisServer::start(&[]));
    cfg.redis.url = Some(Secret::new(format!("redis://127.0.0.1:{port}")));
    let store = RedisStore::open(&cfg).await.unwrap();
    assert!(!store.is_open());
    assert!(matches!(
        store.enqueue(events("t", "x", 1)).await,
        Err(EnqueueError::Unavailable { .. })
    ));
    // The server comes up on that port.
    let _server = RedisServer::start_on(port, &[]);
    until("the store connects", 15, async || {
        store.is_open().then_some(())
    })
    .await;
    store.enqueue(events("t", "x", 1)).await.unwrap();
    store.close().await;
}

#[tokio::test]
async fn one_tag_cannot_take_more_than_its_share() {
    let server = RedisServer::start(&[]);
    let mut cfg = config(&server);
    cfg.max_records = 10;
    cfg.redis.max_tag_share_percent = 50;
    let store = RedisStore::open(&cfg).await.unwrap();
    store.enqueue(events("good", "g", 1)).await.unwrap();
    store.enqueue(events("dead-vendor", "d", 5)).await.unwrap();
    assert!(matches!(
        store.enqueue(events("dead-vendor", "d-more", 1)).await,
        Err(EnqueueError::Full { .. })
    ));
    // The other tag still has room, up to the total.
    store.enqueue(events("good", "g-more", 4)).await.unwrap();
    assert!(matches!(
        store.enqueue(events("good", "over", 1)).await,
        Err(EnqueueError::Full { .. })
    ));
    // Another replica sees the same counts (they live in Redis).
    let other = RedisStore::open(&cfg).await.unwrap();
    assert_eq!(other.pending_totals().0, 10);
    assert!(matches!(
        other.enqueue(events("dead-vendor", "x", 1)).await,
        Err(EnqueueError::Full { .. })
    ));
    store.close().await;
    other.close().await;
}

#[tokio::test]
async fn with_wait_replicas_a_write_no_replica_confirmed_is_refused() {
    let primary = RedisServer::start(&[]);
    let mut cfg = config(&primary);
    cfg.redis.wait_replicas = 1;
    cfg.redis.wait_timeout_ms = 500;
    let store = RedisStore::open(&cfg).await.unwrap();
    assert!(matches!(
        store.enqueue(events("t", "lonely", 1)).await,
        Err(EnqueueError::Unavailable { .. })
    ));
    let _replica = RedisServer::replica_of(&primary, &[]);
    until("the primary sees its replica online", 20, async || {
        primary
            .cli(&["INFO", "replication"])
            .contains("state=online")
            .then_some(())
    })
    .await;
    // Accepted once the replica confirms (on a busy machine it may take a few tries).
    until("a write the replica confirms", 20, async || {
        store.enqueue(events("t", "confirmed", 1)).await.ok()
    })
    .await;
    store.close().await;
}

#[tokio::test]
async fn dead_letters_are_trimmed_by_age_count_and_bytes() {
    let server = RedisServer::start(&[]);
    let mut cfg = config(&server);
    cfg.redis.partitions = 1;
    cfg.dead_letter_max_records = 5;
    cfg.dead_letter_max_age_secs = 0;
    let store = RedisStore::open(&cfg).await.unwrap();
    store.enqueue(events("t", "d", 8)).await.unwrap();
    let got = store.lease("t", now_ms(), 10, 60_000).await.unwrap();
    store
        .dead_letter(
            got.iter()
                .map(|r| DeadLetterRequest {
                    id: r.id,
                    reason: "rejected: HTTP 400".into(),
                    attempted: true,
                })
                .collect(),
            now_ms(),
        )
        .await
        .unwrap();
    assert!(!upkeep::trim_dead(&store.inner).await);
    let kept = tools::dead_letters(&cfg, None, 100).await.unwrap();
    assert_eq!(kept.len(), 5, "the newest five are kept");
    // Bytes: a cap below two payloads keeps one.
    let one = got[0].payload.len() as u64;
    let mut by_bytes = cfg.clone();
    by_bytes.redis.dead_letter_max_bytes = one + one / 2;
    let s2 = RedisStore::open(&by_bytes).await.unwrap();
    upkeep::trim_dead(&s2.inner).await;
    assert_eq!(tools::dead_letters(&cfg, None, 100).await.unwrap().len(), 1);
    // Age: everything older than now.
    let mut by_age = cfg.clone();
    by_age.dead_letter_max_age_secs = 1;
    let s3 = RedisStore::open(&by_age).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    upkeep::trim_dead(&s3.inner).await;
    assert!(tools::dead_letters(&cfg, None, 100)
        .await
        .unwrap()
        .is_empty());
    let n = Keys::new("tagrelay").partition("t", 0).counts.clone();
    assert_eq!(server.cli(&["HGET", &n, "dead_bytes"]).trim(), "0");
    for s in [store, s2, s3] {
        s.close().await;
    }
}

#[tokio::test]
async fn traces_and_watching_are_shared_between_replicas() {
    use crate::trace::{TagOutcome, TagState, TagTrace, Trace, TraceSampling, Traces};
    let server = RedisServer::start(&[]);
    let cfg = config(&server);
    let (a, b) = (
        RedisStore::open(&cfg).await.unwrap(),
        RedisStore::open(&cfg).await.unwrap(),
    );
    let ta = Traces::new(100, 1 << 20, TraceSampling::Watching);
    let tb = Traces::new(100, 1 << 20, TraceSampling::Watching);
    a.share_traces(&ta);
    b.share_traces(&tb);
    // Give both subscriptions a moment to exist (pub/sub delivers only to subscribers).
    until("subscribed", 10, async || {
        let n = server.cli(&["PUBSUB", "NUMSUB", "tagrelay:debug"]);
        n.lines()
            .nth(1)
            .is_some_and(|l| l.trim() == "2")
            .then_some(())
    })
    .await;
    // A page open on A makes B trace every hit (watching a visitor behind a balancer).
    assert!(!tb.wants(false));
    let (_guard, _rx) = ta.watch();
    until("B hears A is watched", 10, async || {
        tb.wants(false).then_some(())
    })
    .await;
    // A hit B took shows on A, and A's delivery outcome shows on B.
    tb.expect(["ev-1"]);
    tb.record(Trace {
        id: "trace-1".into(),
        time_ms: now_ms(),
        method: "POST".into(),
        scheme: "http".into(),
        path: "/g/collect".into(),
        query: String::new(),
        body: String::new(),
        body_truncated: false,
        headers: vec![],
        client_ip: "127.0.0.1".into(),
        host: "h".into(),
        client: Some("ga4"),
        status: 204,
        error: None,
        debug_marker: Some("me".into()),
        latency_us: 1,
        events: vec![Arc::new(Event {
            event_name: "page_view".into(),
            event_id: "ev-1".into(),
            ..Event::default()
        })],
        cookies: vec![],
        tags: vec![TagTrace {
            tag: "ga4".into(),
            kind: "ga4",
            event_id: "ev-1".into(),
            event_name: "page_view".into(),
            fired: true,
            reason: "ok".into(),
            outcome: TagOutcome::new(TagState::Queued, "in the outbox"),
            attempts: vec![],
        }],
        itp: None,
        events_bytes: 100,
    });
    let got = until("A shows B's hit", 10, async || ta.get("trace-1")).await;
    assert_eq!(got.client, Some("ga4"));
    assert_eq!(got.tags[0].kind, "ga4");
    ta.update(
        "ga4",
        "ev-1",
        None,
        TagOutcome::new(TagState::Delivered, "HTTP 204"),
    );
    until("B shows A's delivery", 10, async || {
        (tb.get("trace-1")?.tags[0].outcome.state == TagState::Delivered).then_some(())
    })
    .await;
    a.close().await;
    b.close().await;
}
