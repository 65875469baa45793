//! Scale-out on Redis: real `tagrelay` processes sharing real `redis-server`s (and a
//! sentinel), fake vendors on loopback, faults one at a time. Each test asserts what the
//! issue promises: every event a hit was answered 2xx for is delivered or dead-lettered,
//! whatever dies.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helpers::{FakeVendor, Received, Reply};
use crate::process::BIN;
use crate::redis_server::RedisServer;

/// A `tagrelay serve` process and what it logged.
struct Node {
    child: Child,
    public: Option<SocketAddr>,
    admin: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    config: PathBuf,
}

impl Node {
    fn start(dir: &Path, name: &str, toml: &str) -> Node {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("TAGRELAY__SERVER__LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tagrelay");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let kept = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("tagrelay listening") {
                    let _ = tx.send(line.clone());
                }
                kept.lock().unwrap().push(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "{name} did not start; it logged:\n{}",
                    logs.lock().unwrap().join("\n")
                )
            });
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let addr = |k: &str| {
            v.get(k)
                .or_else(|| v["fields"].get(k))
                .and_then(|a| a.as_str())
                .map(|a| a.parse().unwrap())
        };
        Node {
            child,
            public: addr("public_addr"),
            admin: addr("admin_addr").expect("admin_addr logged"),
            logs,
            config,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public.expect("a public listener"))
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Log lines containing `needle`.
    fn logged(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A node's config: the data client, one `http` tag to `vendor` that names the replica in a
/// header, the outbox on Redis; `outbox` and `redis` lines are appended to those sections.
fn node_config(name: &str, vendor: &FakeVendor, outbox: &str, redis: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_timeout_ms = 3000
trusted_proxies = ["127.0.0.0/8"]

[cookies]
secure = false

[outbox]
backend = "redis"
retry_initial_ms = 50
retry_max_ms = 200
lease_timeout_ms = 10000
{outbox}

[outbox.redis]
{redis}

[[clients]]
type = "data"

[[tags]]
name = "hook"
type = "http"
url = "{}/hook"
batch_max = 10
headers = {{ X-Replica = "{name}" }}
"#,
        vendor.url()
    )
}

fn url_line(server: &RedisServer) -> String {
    format!("url = \"{}\"", server.url())
}

/// Posts one event to a node's data client: its status, or `None` if the node is gone.
async fn post(http: &reqwest::Client, node_url: &str, id: &str, name: &str) -> Option<u16> {
    http.post(format!("{node_url}/data"))
        .header("content-type", "application/json")
        .body(format!(r#"{{"event_name":"{name}","event_id":"{id}"}}"#))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Event ids of a vendor request (the http tag sends an object or an array of them).
fn event_ids(r: &Received) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    let list = match v {
        serde_json::Value::Array(a) => a,
        other => vec![other],
    };
    list.iter()
        .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
        .collect()
}

/// How often the vendor accepted each event.
fn delivered(vendor: &FakeVendor) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in vendor.received().iter().filter(|r| r.status == 200) {
        for id in event_ids(r) {
            *out.entry(id).or_default() += 1;
        }
    }
    out
}

fn dead_letter_ids(config: &Path) -> BTreeSet<String> {
    crate::helpers::dead_letters(config)
        .iter()
        .map(|d| d["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until every id of `answered` is delivered or dead-lettered.
async fn all_accounted_for(
    vendor: &FakeVendor,
    config: &Path,
    answered: &BTreeSet<String>,
    secs: u64,
) -> (BTreeMap<String, usize>, BTreeSet<String>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = delivered(vendor);
        let dead = dead_letter_ids(config);
        let missing: Vec<&String> = answered
            .iter()
            .filter(|id| !got.contains_key(*id) && !dead.contains(*id))
            .collect();
        if missing.is_empty() {
            return (got, dead);
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} answered events neither delivered nor dead-lettered after {secs} s, e.g. {:?}",
            missing.len(),
            answered.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn until(what: &str, secs: u64, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status(http: &reqwest::Client, url: &str) -> Option<u16> {
    http.get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_replica_mid_send_loses_no_answered_event() {
    let redis = RedisServer::start(&[]);
    let vendor = FakeVendor::start().await;
    // Slow: deliveries are in flight when a replica dies.
    vendor.set_delay(300);
    let dir = tempfile::tempdir().unwrap();
    let two = "dispatch_concurrency = 2";
    let a = Node::start(
        dir.path(),
        "a",
        &node_config("a", &vendor, two, &url_line(&redis)),
    );
    let mut a = Some(a);
    let b = Node::start(
        dir.path(),
        "b",
        &node_config("b", &vendor, two, &url_line(&redis)),
    );
    let http = reqwest::Client::new();
    let (a_url, b_url) = (a.as_ref().unwrap().url(""), b.url(""));
    let answered = Arc::new(Mutex::new(BTreeSet::new()));
    // A bounded load: 400 events, 8 at a time, alternating replicas.
    let load = {
        let (http, answered) = (http.clone(), answered.clone());
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for worker in 0..8 {
                let (http, answered, a_url, b_url) =
                    (http.clone(), answered.clone(), a_url.clone(), b_url.clone());
                tasks.spawn(async move {
                    for i in 0..50 {
                        let id = format!("k-{worker}-{i}");
                        let node = if i % 2 == 0 { &a_url } else { &b_url };
                        if post(&http, node, &id, "purchase").await == Some(200) {
                            answered.lock().unwrap().insert(id);
                        }
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    // Mid-load, with A's sends in flight: kill -9 A.
    until("A has sends in flight", 30, async || {
        vendor
            .received()
            .iter()
            .any(|r| r.headers["x-replica"] == "a")
            && answered.lock().unwrap().len() >= 100
    })
    .await;
    a.take().unwrap().kill9();
    // After it is gone: everything A sent has arrived by now.
    let killed_at = Instant::now();
    load.await.unwrap();
    vendor.set_delay(0);
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() >= 200, "{} answered", answered.len());
    // A's deliveries in flight are claimed by B once their lease ends (10 s).
    let (got, dead) = all_accounted_for(&vendor, &b.config, &answered, 90).await;
    assert!(dead.is_empty(), "nothing was refused: {dead:?}");
    // Duplicates only where the crash interrupted a send: A had sent it before it died,
    // and at most what A could have had in flight (2 requests of 10).
    let sent_by_a_before_kill: BTreeSet<String> = vendor
        .received()
        .iter()
        .filter(|r| r.headers["x-replica"] == "a" && r.at <= killed_at)
        .flat_map(event_ids)
        .collect();
    let dups: Vec<&String> = got
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(
        dups.iter().all(|d| sent_by_a_before_kill.contains(*d)),
        "a duplicate no crash interrupted: {dups:?}"
    );
    assert!(dups.len() <= 20, "{} duplicates", dups.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sentinel_failover_loses_nothing_answered_with_wait_replicas() {
    let mut primary = RedisServer::start(&[]);
    let replica = RedisServer::replica_of(&primary, &[]);
    until("the replica is online", 20, async || {
        primary
            .cli(&["INFO", "replication"])
            .contains("state=online")
    })
    .await;
    let sentinel = RedisServer::sentinel(&primary, "mymaster");
    let vendor = FakeVendor::start().await;
    // The vendor is down: answered events wait in Redis while its primary dies.
    vendor.respond(&[(503, "down")]);
    let dir = tempfile::tempdir().unwrap();
    let redis = format!(
        "sentinel = {{ master = \"mymaster\", nodes = [\"{}\"] }}\nwait_replicas = 1\nwait_timeout_ms = 1000",
        sentinel.addr()
    );
    let a = Node::start(dir.path(), "a", &node_config("a", &vendor, "", &redis));
    let http = reqwest::Client::new();
    let mut answered = BTreeSet::new();
    for i in 0..150 {
        let id = format!("f-{i}");
        if post(&http, &a.url(""), &id, "purchase").await == Some(200) {
            answered.insert(id);
        }
    }
    assert_eq!(answered.len(), 150, "every hit confirmed by the replica");
    primary.kill9();
    until("the sentinel promotes the replica", 60, async || {
        sentinel
            .cli(&["SENTINEL", "get-master-addr-by-name", "mymaster"])
            .contains(&replica.port.to_string())
    })
    .await;
    until("the sentinel sees the new primary up", 30, async || {
        let m = sentinel.cli(&["SENTINEL", "MASTER", "mymaster"]);
        let flags = m
            .lines()
            .skip_while(|l| l.trim() != "flags")
            .nth(1)
            .unwrap_or("")
            .to_owned();
        flags.trim() == "master"
    })
    .await;
    until("A follows the failover", 30, async || {
        a.logged("Redis is reachable again") >= 1
    })
    .await;
    // The new primary has no replica: hits are refused rather than acknowledged unconfirmed.
    assert_eq!(
        post(&http, &a.url(""), "after-failover", "purchase").await,
        Some(503)
    );
    vendor.respond(&[(200, "{}")]);
    let (got, _) = all_accounted_for(&vendor, &a.config, &answered, 60).await;
    assert!(answered.iter().all(|id| got.contains_key(id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_for_ten_seconds_then_back_from_its_aof() {
    let mut redis = RedisServer::start(&[]);
    let vendor = FakeVendor::start().await;
    vendor.respond(&[(503, "down")]);
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(
        dir.path(),
        "a",
        &node_config("a", &vendor, "", &url_line(&redis)),
    );
    let http = reqwest::Client::new();
    let mut answered = BTreeSet::new();
    for i in 0..100 {
        let id = format!("d-{i}");
        if post(&http, &a.url(""), &id, "purchase").await == Some(200) {
            answered.insert(id);
        }
    }
    assert_eq!(answered.len(), 100);
    redis.kill9();
    let down_at = Instant::now();
    // Hits get 503 + Retry-After; not ready on either listener.
    until("hits are refused", 10, async || {
        post(&http, &a.url(""), "x", "purchase").await == Some(503)
    })
    .await;
    let r = http
        .post(a.url("/data"))
        .header("content-type", "application/json")
        .body(r#"{"event_name":"purchase","event_id":"refused"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(status(&http, &a.url("/readyz")).await, Some(503));
    assert_eq!(status(&http, &a.admin_url("/readyz")).await, Some(503));
    for i in 0..50 {
        assert_eq!(
            post(&http, &a.url(""), &format!("down-{i}"), "purchase").await,
            Some(503)
        );
    }
    // Ten seconds down, then back from its AOF.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed())).await;
    assert_eq!(status(&http, &a.url("/readyz")).await, Some(503));
    redis.restart();
    until("ready again", 30, async || {
        status(&http, &a.url("/readyz")).await == Some(200)
    })
    .await;
    assert_eq!(post(&http, &a.url(""), "back", "purchase").await, Some(200));
    answered.insert("back".into());
    vendor.respond(&[(200, "{}")]);
    all_accounted_for(&vendor, &a.config, &answered, 60).await;
    // The outage was logged once each way, not once per refused hit.
    assert_eq!(
        a.logged("Redis is unreachable"),
        1,
        "{:?}",
        a.logs.lock().unwrap()
    );
    assert_eq!(a.logged("Redis is reachable again"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_pauses_the_tag_on_every_replica_and_400s_are_dead_letters_to_replay() {
    let redis = RedisServer::start(&[]);
    let vendor = FakeVendor::start().await;
    vendor.respond(&[(503, "busy")]);
    let dir = tempfile::tempdir().unwrap();
    // One event per request and per replica at a time: a 400 names one event (a vendor that
    // refuses a batch for one event is the bisection's business, tested elsewhere), and what a
    // replica has in flight when the pause falls is one request.
    let one = "dispatch_concurrency = 1";
    let config = |name: &str| {
        node_config(name, &vendor, one, &url_line(&redis))
            .replace("batch_max = 10", "batch_max = 1")
    };
    let a = Node::start(dir.path(), "a", &config("a"));
    let b = Node::start(dir.path(), "b", &config("b"));
    let http = reqwest::Client::new();
    let (mut good, mut bad) = (BTreeSet::new(), BTreeSet::new());
    for i in 0..40 {
        let id = format!("p-{i}");
        let (node, name) = match i % 4 {
            0 => (&a, "bad_purchase"),
            1 => (&b, "bad_purchase"),
            2 => (&a, "purchase"),
            _ => (&b, "purchase"),
        };
        assert_eq!(post(&http, &node.url(""), &id, name).await, Some(200));
        if name == "purchase" {
            good.insert(id);
        } else {
            bad.insert(id);
        }
    }
    // 503s for a while, from both replicas (retrying every 50–200 ms).
    until("both replicas retry", 20, async || {
        let r = vendor.received();
        ["a", "b"]
            .iter()
            .all(|n| r.iter().filter(|r| r.headers["x-replica"] == *n).count() >= 3)
    })
    .await;
    // Then one 429 with Retry-After: 2, then 200 — and 400 for the bad events.
    vendor.reject_containing("bad_purchase");
    vendor.clear();
    vendor.respond_with(vec![
        Reply {
            status: http::StatusCode::TOO_MANY_REQUESTS,
            body: "slow down".into(),
            headers: vec![("retry-after", "2".into())],
        },
        Reply {
            status: http::StatusCode::OK,
            body: "{}".into(),
            headers: vec![],
        },
    ]);
    let t429 = {
        let mut at = None;
        until("a 429", 20, async || {
            at = vendor
                .received()
                .iter()
                .find(|r| r.status == 429)
                .map(|r| (r.at, r.headers["x-replica"].to_str().unwrap().to_owned()));
            at.is_some()
        })
        .await;
        at.unwrap()
    };
    let (good_now, dead) =
        all_accounted_for(&vendor, &a.config, &good.union(&bad).cloned().collect(), 60).await;
    assert_eq!(dead, bad, "the dead letters are exactly the 400s");
    assert!(good.iter().all(|id| good_now.contains_key(id)));
    // No replica sent to the tag during the pause: a replica leases nothing while the pause
    // key is set, so all that can land inside it is the one request (dispatch_concurrency = 1)
    // a replica had leased before the pause fell. Without the shared pause the replica that
    // did not get the 429 keeps retrying every 50–200 ms.
    let (at, paused_by) = t429;
    let received = vendor.received();
    for replica in ["a", "b"] {
        let in_pause: Vec<Duration> = received
            .iter()
            .filter(|r| r.headers["x-replica"] == replica && r.at > at)
            .map(|r| r.at - at)
            .filter(|d| *d < Duration::from_millis(2000))
            .collect();
        assert!(
            in_pause.len() <= 1,
            "replica {replica} sent during the pause {paused_by} got: {in_pause:?}"
        );
        assert!(
            received
                .iter()
                .any(|r| r.headers["x-replica"] == replica && r.at >= at + Duration::from_secs(2)),
            "replica {replica} sent again after the pause"
        );
    }
    // The dead letters are replayable: the vendor takes them now.
    vendor.reject_containing("nothing-is-refused-now");
    let out = Command::new(BIN)
        .args(["outbox", "replay", "--all", "--config"])
        .arg(&a.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with(&format!("{} dead letters moved back", bad.len())),
        "{said}"
    );
    until("the replayed events are delivered", 30, async || {
        let got = delivered(&vendor);
        bad.iter().all(|id| got.contains_key(id))
    })
    .await;
    assert!(dead_letter_ids(&a.config).is_empty());
    let stats = Command::new(BIN)
        .args(["outbox", "stats", "--json", "--config"])
        .arg(&b.config)
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["dead_letters"], 0, "{stats}");
}

#[tokio::test]
async fn a_redis_that_evicts_keys_is_refused_at_start_with_the_reason() {
    let redis = RedisServer::start(&["maxmemory 64mb", "maxmemory-policy allkeys-lru"]);
    let vendor = FakeVendor::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lru.toml");
    std::fs::write(&config, node_config("a", &vendor, "", &url_line(&redis))).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("maxmemory-policy is `allkeys-lru`") && err.contains("noeviction"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_and_deliver_roles_split_the_work() {
    let redis = RedisServer::start(&[]);
    let vendor = FakeVendor::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ingest = Node::start(
        dir.path(),
        "ingest",
        &node_config("ingest", &vendor, "role = \"ingest\"", &url_line(&redis)),
    );
    let deliver = Node::start(
        dir.path(),
        "deliver",
        &node_config("deliver", &vendor, "role = \"deliver\"", &url_line(&redis)),
    );
    assert!(
        deliver.public.is_none(),
        "a delivering process takes no hits"
    );
    let http = reqwest::Client::new();
    assert_eq!(
        status(&http, &deliver.admin_url("/readyz")).await,
        Some(200)
    );
    // The image's health check probes the admin listener of a process without a public one.
    let probe = dir.path().join("probe.toml");
    let closed = crate::redis_server::free_port();
    std::fs::write(
        &probe,
        format!(
            "[server]\nlisten = \"127.0.0.1:{closed}\"\nadmin_listen = \"0.0.0.0:{}\"\n[outbox]\nbackend = \"redis\"\nrole = \"deliver\"\n[outbox.redis]\n{}\n",
            deliver.admin.port(),
            url_line(&redis)
        ),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["healthcheck", "--config"])
            .arg(&probe)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut answered = BTreeSet::new();
    for i in 0..30 {
        let id = format!("r-{i}");
        assert_eq!(
            post(&http, &ingest.url(""), &id, "purchase").await,
            Some(200)
        );
        answered.insert(id);
    }
    all_accounted_for(&vendor, &deliver.config, &answered, 30).await;
    assert!(
        vendor
            .received()
            .iter()
            .all(|r| r.headers["x-replica"] == "deliver"),
        "only the deliver process sends"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_debug_page_of_one_replica_shows_hits_and_deliveries_of_another() {
    let redis = RedisServer::start(&[]);
    let vendor = FakeVendor::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ingest = Node::start(
        dir.path(),
        "ingest",
        &node_config("ingest", &vendor, "role = \"ingest\"", &url_line(&redis)),
    );
    let deliver = Node::start(
        dir.path(),
        "deliver",
        &node_config("deliver", &vendor, "role = \"deliver\"", &url_line(&redis)),
    );
    let http = reqwest::Client::new();
    // A page open on the delivering process: hits on the other one are traced and shown
    // there (watching a visitor behind a load balancer), with the delivery outcome.
    let stream = http
        .get(deliver.admin_url("/debug/api/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    until("the ingest process hears a page is open", 20, async || {
        // A hit sent now is traced on the ingest process and shared.
        post(&http, &ingest.url(""), "dbg-probe", "purchase").await;
        let list: serde_json::Value = http
            .get(deliver.admin_url("/debug/api/traces"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["traces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["events"][0]["event_id"] == "dbg-probe")
    })
    .await;
    assert_eq!(
        post(&http, &ingest.url(""), "dbg-1", "purchase").await,
        Some(200)
    );
    until("the delivery outcome shows on the page", 20, async || {
        let list: serde_json::Value = http
            .get(deliver.admin_url("/debug/api/traces"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["traces"].as_array().unwrap().iter().any(|t| {
            t["events"][0]["event_id"] == "dbg-1" && t["tags"][0]["outcome"]["state"] == "delivered"
        })
    })
    .await;
    // And on the ingest process's own page (it delivers nothing itself), the attempt the other
    // process made, redacted as the tag redacts it.
    until(
        "the outcome reaches the process that took the hit",
        20,
        async || {
            let list: serde_json::Value = http
                .get(ingest.admin_url("/debug/api/traces"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            list["traces"].as_array().unwrap().iter().any(|t| {
                t["events"][0]["event_id"] == "dbg-1"
                    && t["tags"][0]["outcome"]["state"] == "delivered"
                    && t["tags"][0]["attempts"][0]["status"] == 200
                    && t["tags"][0]["attempts"][0]["request"]["headers"]
                        .as_array()
                        .is_some_and(|h| {
                            h.iter()
                                .any(|kv| kv[0] == "X-Replica" && kv[1] == "[redacted]")
                        })
            })
        },
    )
    .await;
    drop(stream);
}

#[test]
fn check_validates_the_redis_settings_offline() {
    let dir = tempfile::tempdir().unwrap();
    let run = |toml: &str, env: &[(&str, &str)]| {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Nothing listens there: check never connects.
    let port = crate::redis_server::free_port();
    let (ok, err) = run(
        &format!("[outbox]\nbackend = \"redis\"\nrole = \"ingest\"\n[outbox.redis]\nurl = \"redis://:${{TEST_REDIS_PASSWORD}}@127.0.0.1:{port}/0\"\nwait_replicas = 1\n"),
        &[("TEST_REDIS_PASSWORD", "pw-never-printed")],
    );
    assert!(ok, "{err}");
    let (ok, err) = run(
        "[outbox]\nbackend = \"redis\"\n[outbox.redis]\nurl = \"redis://:pw-never-printed@a:6379,b:6379\"\npartitions = 0\nkey_prefix = \"has space\"\nlease_ms = 5\n",
        &[],
    );
    assert!(!ok);
    assert!(err.contains("unknown key `lease_ms`"), "{err}");
    let (ok, err) = run(
        "[outbox]\nbackend = \"redis\"\n[outbox.redis]\nurl = \"redis://:pw-never-printed@a:6379,b:6379\"\npartitions = 0\nkey_prefix = \"has space\"\n",
        &[],
    );
    assert!(!ok);
    for key in [
        "outbox.redis.url",
        "Redis Cluster is not supported",
        "outbox.redis.partitions",
        "outbox.redis.key_prefix",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    assert!(!err.contains("pw-never-printed"), "{err}");
    let (ok, err) = run("[outbox]\nrole = \"deliver\"\n", &[]);
    assert!(
        !ok && err.contains("outbox.role: `deliver` needs backend"),
        "{err}"
    );
}
