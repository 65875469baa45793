//! The dispatcher's seam for tags with an expiring credential and asynchronous processing:
//! `Authorization` from the tag's credential (never shown), a credential that cannot be had is
//! retried, and accepted requests are followed by bounded status checks.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

use super::*;
use crate::clock::now_ms;
use crate::config::Config;
use crate::event::Event;
use crate::identity::config::{ConsentDefault, CookiesConfig};
use crate::identity::CookiePolicy;
use crate::outbox::config::{FsyncMode, OutboxConfig};
use crate::outbox::store::embedded::{tools, EmbeddedStore};
use crate::outbox::{NewEvent, Outbox};
use crate::pipeline::Pipeline;
use crate::secret::Secret;
use crate::tags::trigger::{Trigger, TriggerConfig};
use crate::tags::{
    classify_http, Credential, Encoded, OutboundRequest, Outcome, StatusCheck, StatusOutcome, Tag,
    TagInstance,
};
use crate::trace::{AttemptOutcome, DeliveryObserver, RequestView};

const TOKEN: &str = "tok-very-secret";

#[derive(Debug)]
struct Cred {
    ok: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl Credential for Cred {
    async fn authorization(&self) -> Result<Secret, String> {
        if self.ok.load(Ordering::SeqCst) {
            Ok(Secret::new(format!("Bearer {TOKEN}")))
        } else {
            Err("the token endpoint refused the refresh token".into())
        }
    }
}

/// Posts event ids to `{base}/ingest`; the answer's body is a request id, whose status is
/// asked at `{base}/status?id=…` and classified by its body: `pending`, `failed` or `ok`.
#[derive(Debug)]
struct AsyncTag {
    base: String,
    cred: Arc<Cred>,
    max_wait: Duration,
}

impl Tag for AsyncTag {
    fn kind(&self) -> &'static str {
        "async_test"
    }
    fn max_batch(&self) -> usize {
        10
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(2)
    }
    fn encode_batch(&self, events: &[&Event], _now_ms: i64) -> Encoded {
        let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
        Encoded {
            requests: vec![(
                OutboundRequest {
                    method: Method::POST,
                    url: format!("{}/ingest", self.base),
                    headers: vec![],
                    body: Bytes::from(ids.join(",")),
                },
                (0..events.len()).collect(),
            )],
            ..Default::default()
        }
    }
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Outcome {
        classify_http(status, headers, body)
    }
    fn redact(&self, text: &str) -> String {
        text.replace(TOKEN, "[redacted]")
    }
    fn credential(&self) -> Option<Arc<dyn Credential>> {
        Some(self.cred.clone())
    }
    fn status_check(&self, body: &[u8]) -> Option<StatusCheck> {
        let id = String::from_utf8_lossy(body).into_owned();
        Some(StatusCheck {
            request: OutboundRequest {
                method: Method::GET,
                url: format!("{}/status?id={id}", self.base),
                headers: vec![],
                body: Bytes::new(),
            },
            interval: Duration::from_millis(10),
            max_wait: self.max_wait,
        })
    }
    fn classify_status(&self, _status: StatusCode, body: &[u8], events: usize) -> StatusOutcome {
        match body {
            b"pending" => StatusOutcome::Pending("still processing".into()),
            b"failed" => StatusOutcome::Final(Outcome::Rejected {
                reason: format!("the vendor failed all {events} events"),
            }),
            _ => StatusOutcome::Final(Outcome::Delivered),
        }
    }
}

/// The fake vendor: `/ingest` answers `req-N`, `/status` answers `status` (fixed per test).
#[derive(Default)]
struct Vendor {
    status: Mutex<&'static str>,
    ingests: AtomicUsize,
    polls: AtomicUsize,
    authorizations: Mutex<Vec<String>>,
}

async fn vendor(status: &'static str) -> (Arc<Vendor>, String) {
    let v = Arc::new(Vendor {
        status: Mutex::new(status),
        ..Default::default()
    });
    let (a, b) = (v.clone(), v.clone());
    let app = axum::Router::new()
        .route(
            "/ingest",
            axum::routing::post(move |headers: HeaderMap| {
                let v = a.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    v.authorizations.lock().unwrap().push(auth);
                    format!("req-{}", v.ingests.fetch_add(1, Ordering::SeqCst) + 1)
                }
            }),
        )
        .route(
            "/status",
            axum::routing::get(move || {
                let v = b.clone();
                async move {
                    v.polls.fetch_add(1, Ordering::SeqCst);
                    let s: &'static str = *v.status.lock().unwrap();
                    s
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (v, url)
}

#[derive(Default)]
struct Seen(Mutex<Vec<(RequestView, String)>>);

impl DeliveryObserver for Seen {
    fn attempt(
        &self,
        _tag: &str,
        _ids: &[String],
        request: RequestView,
        _status: Option<u16>,
        _body: &[u8],
        _latency: Duration,
        outcome: &AttemptOutcome,
    ) {
        self.0.lock().unwrap().push((request, outcome.label()));
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    outbox: Arc<EmbeddedStore>,
    dispatchers: Dispatchers,
}

async fn start(tag: AsyncTag, seen: Arc<Seen>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboxConfig {
        path: dir.path().join("outbox").display().to_string(),
        fsync: FsyncMode::Off,
        retry_initial_ms: 20,
        retry_max_ms: 100,
        ..OutboxConfig::default()
    };
    let outbox = EmbeddedStore::open(&cfg).await.unwrap();
    let config: Config = toml::from_str("").unwrap();
    let pipeline = Pipeline {
        config: Arc::new(config),
        clients: vec![],
        script_proxies: vec![],
        tags: vec![Arc::new(TagInstance {
            name: Arc::from("async"),
            trigger: Trigger::build(&TriggerConfig::default(), ConsentDefault::Granted).unwrap(),
            tag: Box::new(tag),
        })],
        cookies: CookiePolicy::build(&CookiesConfig::default()).unwrap(),
    };
    let settings = DispatchSettings {
        idle_poll: Duration::from_millis(50),
        linger: Duration::from_millis(5),
        ..DispatchSettings::from_config(&cfg)
    };
    let dispatchers = spawn_dispatchers(
        outbox.clone(),
        Arc::new(ArcSwap::from_pointee(pipeline)),
        settings,
        seen,
    )
    .unwrap();
    Setup {
        dir: std::path::PathBuf::from(&cfg.path),
        _dir: dir,
        outbox,
        dispatchers,
    }
}

fn event(id: &str) -> NewEvent {
    let e = Event {
        event_name: "purchase".into(),
        event_id: id.into(),
        timestamp_ms: now_ms(),
        ..Default::default()
    };
    NewEvent {
        event_id: id.into(),
        payload: Bytes::from(e.to_payload().unwrap()),
        event: None,
        tags: vec![Arc::from("async")],
        enqueued_at_ms: now_ms(),
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_credential_goes_on_the_request_and_a_missing_one_is_retried() {
    let (v, url) = vendor("ok").await;
    let ok = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen::default());
    let tag = AsyncTag {
        base: url,
        cred: Arc::new(Cred { ok: ok.clone() }),
        max_wait: Duration::from_secs(5),
    };
    let s = start(tag, seen.clone()).await;
    s.outbox.enqueue(vec![event("e1")]).await.unwrap();
    // No credential: nothing is sent, the record waits for a retry with the reason.
    let dir = s.dir.clone();
    wait_until("a retry", || {
        let rows = tools::dead_letters(&dir, None, 10).unwrap();
        assert!(rows.is_empty(), "{rows:?}");
        seen.0
            .lock()
            .unwrap()
            .iter()
            .any(|(_, o)| o.contains("credentials: the token endpoint refused"))
    })
    .await;
    assert_eq!(v.ingests.load(Ordering::SeqCst), 0);
    ok.store(true, Ordering::SeqCst);
    // The store's files alone can show nothing pending while a retry is out in memory: wait
    // for the vendor to have it first.
    wait_until("delivery", || {
        v.ingests.load(Ordering::SeqCst) >= 1 && tools::stats(&dir).unwrap().pending == 0
    })
    .await;
    assert_eq!(
        v.authorizations.lock().unwrap().as_slice(),
        [format!("Bearer {TOKEN}")]
    );
    // The debug view gets the header without its value.
    for (req, _) in seen.0.lock().unwrap().iter() {
        let text = format!("{req:?}");
        assert!(!text.contains(TOKEN), "{text}");
        assert!(
            req.headers
                .iter()
                .any(|(k, v)| k == "authorization" && v == "Bearer [redacted]"),
            "{req:?}"
        );
    }
    s.dispatchers.shutdown(Duration::from_secs(2)).await;
    s.outbox.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_status_dead_letters_the_events_with_the_vendors_reason() {
    let (v, url) = vendor("failed").await;
    let seen = Arc::new(Seen::default());
    let tag = AsyncTag {
        base: url,
        cred: Arc::new(Cred {
            ok: Arc::new(AtomicBool::new(true)),
        }),
        max_wait: Duration::from_secs(5),
    };
    let s = start(tag, seen.clone()).await;
    s.outbox.enqueue(vec![event("f1")]).await.unwrap();
    let dir = s.dir.clone();
    wait_until("a dead letter", || {
        tools::stats(&dir).unwrap().dead_letters == 1
    })
    .await;
    let dead = tools::dead_letters(&dir, None, 10).unwrap();
    assert_eq!(dead[0].reason, "rejected: the vendor failed all 1 events");
    assert_eq!(v.polls.load(Ordering::SeqCst), 1);
    let outcomes: Vec<String> = seen
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(_, o)| o.clone())
        .collect();
    assert_eq!(
        outcomes,
        vec![
            "pending: accepted; checking its processing status".to_string(),
            "rejected: the vendor failed all 1 events".to_string()
        ]
    );
    s.dispatchers.shutdown(Duration::from_secs(2)).await;
    s.outbox.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_still_pending_at_the_end_of_the_wait_leaves_the_request_delivered() {
    let (v, url) = vendor("pending").await;
    let seen = Arc::new(Seen::default());
    let tag = AsyncTag {
        base: url,
        cred: Arc::new(Cred {
            ok: Arc::new(AtomicBool::new(true)),
        }),
        max_wait: Duration::from_millis(150),
    };
    let s = start(tag, seen.clone()).await;
    s.outbox
        .enqueue(vec![event("p1"), event("p2")])
        .await
        .unwrap();
    let dir = s.dir.clone();
    wait_until("a status check", || v.polls.load(Ordering::SeqCst) >= 1).await;
    // A graceful stop waits for the delivery in flight (its status checks included) and
    // settles it; the files then say what became of it.
    s.dispatchers.shutdown(Duration::from_secs(5)).await;
    s.outbox.close().await;
    let stats = tools::stats(&dir).unwrap();
    assert_eq!((stats.pending, stats.dead_letters), (0, 0));
    assert_eq!(
        v.ingests.load(Ordering::SeqCst),
        1,
        "accepted once, never resent"
    );
    assert!(v.polls.load(Ordering::SeqCst) >= 1);
    let outcomes: Vec<String> = seen
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(_, o)| o.clone())
        .collect();
    assert!(
        outcomes[1..]
            .iter()
            .all(|o| o == "pending: still processing"),
        "{outcomes:?}"
    );
}
