//! `spawn_app()` on port 0 and fake vendors on loopback.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use tagrelay::config::{load_str, LoadedConfig, Source};
use tagrelay::{AppState, Application};
use tokio::sync::oneshot;

pub struct TestApp {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub state: AppState,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("tagrelay.toml")
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The body of a GET on the admin listener (`/metrics`, `/debug`, …).
    pub async fn admin_text(&self, path: &str) -> String {
        self.http
            .get(self.admin_url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The dead letters once there are at least `n` (waits up to 10 s), as
    /// `tagrelay outbox dead-letters --json` lists them.
    pub async fn wait_for_dead_letters(&self, n: usize) -> Vec<serde_json::Value> {
        wait_for_dead_letter_count(&self.config_path(), n).await
    }

    /// Waits until the outbox owes nothing to any tag: see [`wait_until_drained`].
    pub async fn wait_until_drained(&self) {
        wait_until_drained(&self.dir.path().join("outbox")).await;
    }

    /// Waits (up to `secs`) for the app to stop on its own (a drain, a stop request), without
    /// asking it to.
    /// Returns its directory (config, outbox) for the test to look into.
    pub async fn wait_stopped(mut self, secs: u64) -> tempfile::TempDir {
        let done = self.done.take().expect("the app runs");
        tokio::time::timeout(Duration::from_secs(secs), done)
            .await
            .unwrap_or_else(|_| panic!("the app did not stop in {secs}s"))
            .expect("app task")
            .expect("app run");
        self.dir
    }

    /// Stops the app gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            done.await.expect("app task").expect("app run");
        }
    }
}

/// Waits (up to 10 s) until the outbox in `dir` owes nothing to any tag: nothing pending,
/// nothing in flight, as `tagrelay outbox stats` counts it. Every event a hit fired before
/// is then delivered or dead-lettered, so "it never arrived" can be checked without a sleep.
pub async fn wait_until_drained(dir: &std::path::Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = tagrelay::outbox::store::embedded::tools::stats(dir).expect("outbox stats");
        if stats.pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox still owes deliveries after 10 s: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The dead letters of the outbox of `config` once there are at least `n` (waits up to
/// 10 s), as `tagrelay outbox dead-letters --json` lists them.
pub async fn wait_for_dead_letter_count(
    config: &std::path::Path,
    n: usize,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = dead_letters(config);
        if list.len() >= n {
            return list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} dead letters after 10 s, waited for {n}: {list:?}",
            list.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `tagrelay outbox dead-letters --json` against a config file.
pub fn dead_letters(config: &std::path::Path) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(crate::process::BIN)
        .args(["outbox", "dead-letters", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).unwrap() {
        serde_json::Value::Array(list) => list,
        other => panic!("not a list: {other}"),
    }
}

/// Base config for tests: both listeners on 127.0.0.1:0, an outbox in a temp dir, cookies
/// without `Secure` (tests speak plain http). `extra` is appended (clients, tags, overrides).
pub fn test_config(dir: &std::path::Path, extra: &str) -> String {
    test_config_server(dir, "trusted_proxies = [\"127.0.0.0/8\"]", extra)
}

/// Like `test_config` with `server_lines` in `[server]` instead of the trusted loopback proxy.
pub fn test_config_server(dir: &std::path::Path, server_lines: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_timeout_ms = 3000
{server_lines}

[cookies]
secure = false

[outbox]
path = "{}"
retry_initial_ms = 50
retry_max_ms = 200

{extra}
"#,
        dir.join("outbox").display()
    )
}

pub async fn spawn_app(extra: &str) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = test_config(dir.path(), extra);
    spawn_with(dir, &text).await
}

pub async fn spawn_app_server(server_lines: &str, extra: &str) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = test_config_server(dir.path(), server_lines, extra);
    spawn_with(dir, &text).await
}

pub async fn spawn_with(dir: tempfile::TempDir, text: &str) -> TestApp {
    let path = dir.path().join("tagrelay.toml");
    std::fs::write(&path, text).expect("write config");
    let config = load_str(text, &path.display().to_string(), false).expect("valid test config");
    let loaded = LoadedConfig {
        config,
        source: Source::File(path),
    };
    let app = Application::build(loaded).await.expect("app builds");
    let (addr, admin, state) = (
        app.public_addr().expect("a process that takes hits"),
        app.admin_addr(),
        app.state(),
    );
    let (tx, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        admin,
        state,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client"),
        dir,
        stop: Some(tx),
        done: Some(done),
    }
}

/// One request a fake vendor received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it arrived, and the status it was answered.
    pub at: std::time::Instant,
    pub status: u16,
}

impl Received {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("vendor body is JSON")
    }
}

/// A loopback HTTP server standing in for GA4 / Graph API. Answers with a scripted status
/// sequence (the last one repeats), records every request.
#[derive(Clone)]
pub struct FakeVendor {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<Vec<Reply>>>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    reject_containing: Arc<Mutex<Option<String>>>,
}

/// One scripted answer of a fake vendor.
#[derive(Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
}

impl FakeVendor {
    pub async fn start() -> FakeVendor {
        let received = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(vec![Reply {
            status: StatusCode::OK,
            body: "{}".to_string(),
            headers: vec![],
        }]));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fake = FakeVendor {
            addr,
            received,
            script,
            delay_ms: Arc::default(),
            reject_containing: Arc::default(),
        };
        let router = axum::Router::new()
            .fallback(record)
            .with_state(fake.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        fake
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers these statuses in turn; the last repeats.
    pub fn respond(&self, seq: &[(u16, &str)]) {
        *self.script.lock().unwrap() = seq
            .iter()
            .map(|(s, b)| Reply {
                status: StatusCode::from_u16(*s).unwrap(),
                body: b.to_string(),
                headers: vec![],
            })
            .collect();
    }

    pub fn respond_with(&self, seq: Vec<Reply>) {
        *self.script.lock().unwrap() = seq;
    }

    /// Answers 400 to any request whose body contains `needle` (a vendor refusing a batch for
    /// one bad event), whatever the script says.
    pub fn reject_containing(&self, needle: &str) {
        *self.reject_containing.lock().unwrap() = Some(needle.to_owned());
    }

    /// Every answer waits this long first (a slow vendor).
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn clear(&self) {
        self.received.lock().unwrap().clear();
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `pred` holds over what was received (or panics after `secs`).
    pub async fn wait_for(&self, secs: u64, pred: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.received();
            if pred(&got) {
                return got;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("fake vendor did not get what was expected in {secs}s; got {got:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn record(
    State(fake): State<FakeVendor>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let at = std::time::Instant::now();
    let refuse = fake
        .reject_containing
        .lock()
        .unwrap()
        .as_deref()
        .is_some_and(|n| String::from_utf8_lossy(&body).contains(n));
    let reply = if refuse {
        None
    } else {
        let mut script = fake.script.lock().unwrap();
        Some(if script.len() > 1 {
            script.remove(0)
        } else {
            script[0].clone()
        })
    };
    fake.received.lock().unwrap().push(Received {
        method,
        uri,
        headers,
        body,
        at,
        status: reply.as_ref().map_or(400, |r| r.status.as_u16()),
    });
    let Some(reply) = reply else {
        return (StatusCode::BAD_REQUEST, "invalid event in batch").into_response();
    };
    let delay = fake.delay_ms.load(std::sync::atomic::Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut resp = (reply.status, reply.body).into_response();
    for (k, v) in reply.headers {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}
