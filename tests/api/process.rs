//! Tests that run the real `tagrelay` binary: CLI check, graceful shutdown.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::helpers::test_config;

pub const BIN: &str = env!("CARGO_BIN_EXE_tagrelay");

/// A running `tagrelay` process, the addresses it logged, and everything it wrote to stdout
/// and stderr (JSON logs), kept for the test to read.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    output: Arc<Mutex<String>>,
}

impl Proc {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Everything the process wrote so far, stdout and stderr line by line.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until the output holds a line for which `pred` holds (panics after `secs`,
    /// naming `what`), and returns that line.
    pub async fn wait_for_line(
        &self,
        what: &str,
        secs: u64,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(line) = self.output().lines().find(|l| pred(l)) {
                return line.to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no line with {what} in {secs}s; the output:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for exit (panics after `secs`).
    pub fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "tagrelay did not exit in {secs}s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on `config_path` with JSON logs and reads the bound addresses.
pub fn start(config_path: &Path) -> Proc {
    start_with(config_path, &[], "info")
}

/// [`start`] with extra environment variables and a `RUST_LOG` filter.
pub fn start_with(config_path: &Path, env: &[(&str, &str)], rust_log: &str) -> Proc {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config_path)
        .env("TAGRELAY__SERVER__LOG_FORMAT", "json")
        .env("RUST_LOG", rust_log)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tagrelay");
    let output = Arc::new(Mutex::new(String::new()));
    // Both pipes are drained to the end, so the child never blocks on a full pipe.
    let stdout = child.stdout.take().expect("stdout");
    let out = output.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut o = out.lock().unwrap();
            o.push_str(&line);
            o.push('\n');
        }
    });
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let listening = loop {
        let line = match lines.next() {
            Some(Ok(l)) => l,
            _ => panic!(
                "tagrelay exited before listening:\n{}",
                output.lock().unwrap()
            ),
        };
        {
            let mut o = output.lock().unwrap();
            o.push_str(&line);
            o.push('\n');
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["public_addr"].is_string() {
            break v;
        }
    };
    let out = output.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let mut o = out.lock().unwrap();
            o.push_str(&line);
            o.push('\n');
        }
    });
    Proc {
        child,
        addr: listening["public_addr"].as_str().unwrap().parse().unwrap(),
        admin: listening["admin_addr"].as_str().unwrap().parse().unwrap(),
        output,
    }
}

pub fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("tagrelay.toml");
    std::fs::write(&path, test_config(dir, extra)).unwrap();
    path
}

fn check(path: &Path, env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(path)
        .envs(env.iter().copied())
        .output()
        .expect("run check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_default_and_every_example() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("config/tagrelay.toml")];
    for entry in std::fs::read_dir(root.join("config/examples")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            files.push(p);
        }
    }
    assert!(files.len() >= 2, "config/examples/ has examples");
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("shopify-ga4-meta-google-ads.toml")),
        "the Shopify example is checked"
    );
    // The Google Ads example reads a credentials file (checked at load): give it one.
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("google.json");
    std::fs::write(
        &creds,
        r#"{"type":"authorized_user","client_id":"c","client_secret":"s","refresh_token":"r"}"#,
    )
    .unwrap();
    let creds = creds.display().to_string();
    // Examples reference secrets as ${VAR}; give them values as a deployment would.
    let env = [
        ("GA4_API_SECRET", "test-secret"),
        ("META_ACCESS_TOKEN", "test-token"),
        ("META_APP_SECRET", "test-app-secret"),
        ("TAGRELAY_ADMIN_TOKEN", "test-admin-token-long-enough"),
        ("WEBHOOK_TOKEN", "test-webhook"),
        ("MP_API_SECRET", "test-mp"),
        ("GOOGLE_ADS_CREDENTIALS", creds.as_str()),
        ("TIKTOK_ACCESS_TOKEN", "test-tiktok-token"),
        ("SHOPIFY_WEBHOOK_SECRET", "test-shopify-secret"),
    ];
    for f in files {
        let (ok, out, err) = check(&f, &env);
        assert!(ok, "{} failed: {err}", f.display());
        assert!(out.contains(": ok ("), "{out}");
    }
}

#[test]
fn check_names_a_misspelt_key_its_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.toml");
    std::fs::write(&path, "[server]\nlistn = \"127.0.0.1:8080\"\n").unwrap();
    let (ok, _, err) = check(&path, &[]);
    assert!(!ok);
    assert!(err.contains("unknown key `listn` in [server]"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("did you mean `listen`?"), "{err}");
}

#[test]
fn check_names_a_missing_environment_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.toml");
    std::fs::write(
        &path,
        "[[tags]]\nname = \"meta\"\ntype = \"meta_capi\"\npixel_id = \"123\"\naccess_token = \"${TAGRELAY_TEST_UNSET_TOKEN}\"\n",
    )
    .unwrap();
    let (ok, _, err) = check(&path, &[]);
    assert!(!ok);
    assert!(err.contains("TAGRELAY_TEST_UNSET_TOKEN"), "{err}");
    assert!(err.contains("access_token"), "{err}");
}

#[test]
fn check_refuses_an_empty_or_short_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.toml");
    std::fs::write(
        &path,
        "[server]\nadmin_listen = \"0.0.0.0:9090\"\n[admin]\ntoken = \"${TAGRELAY_TEST_ADMIN_TOKEN}\"\n",
    )
    .unwrap();
    // Set but empty: the hole this closes (an empty token let anyone log in).
    let (ok, _, err) = check(&path, &[("TAGRELAY_TEST_ADMIN_TOKEN", "")]);
    assert!(!ok, "an empty admin token passed check");
    assert!(err.contains("admin.token: is empty"), "{err}");
    // Whitespace only is empty once trimmed.
    let (ok, _, err) = check(&path, &[("TAGRELAY_TEST_ADMIN_TOKEN", "   \t ")]);
    assert!(!ok && err.contains("admin.token: is empty"), "{err}");
    let (ok, _, err) = check(&path, &[("TAGRELAY_TEST_ADMIN_TOKEN", "short-token")]);
    assert!(!ok, "an 11-character admin token passed check");
    assert!(err.contains("has 11 characters"), "{err}");
    assert!(
        !err.contains("short-token"),
        "the token itself is printed: {err}"
    );
    // Sixteen characters after trimming pass.
    let (ok, _, err) = check(
        &path,
        &[("TAGRELAY_TEST_ADMIN_TOKEN", " 0123456789abcdef\n")],
    );
    assert!(ok, "{err}");
}

#[test]
fn check_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\npath_prefix = \"t/\"\nadmin_listen = \"0.0.0.0:9090\"\n[[tags]]\nname = \"a\"\ntype = \"http\"\nurl = \"http://127.0.0.1:1/\"\n[[tags]]\nname = \"a\"\ntype = \"http\"\nurl = \"http://127.0.0.1:1/\"\n",
    )
    .unwrap();
    let (ok, _, err) = check(&path, &[]);
    assert!(!ok);
    assert!(err.contains("server.path_prefix"), "{err}");
    assert!(err.contains("admin.token"), "{err}");
    assert!(err.contains("already named `a`"), "{err}");
}

/// Reads from `stream` until what was read contains `needle` (panics after 10 s or at EOF).
async fn read_until(stream: &mut tokio::net::TcpStream, seen: &mut String, needle: &str) {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 1024];
    while !seen.contains(needle) {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no `{needle}` in 10 s; read: {seen:?}"))
            .expect("read");
        assert!(n > 0, "connection closed before `{needle}`; read: {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_and_exits_zero() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "[[clients]]\ntype = \"ga4\"\n");
    let mut proc = start(&path);

    // A POST whose body arrives in two parts. `Expect: 100-continue` makes the server say
    // when its handler starts reading the body: from then on the request is in flight.
    let (first, rest) = ("en=page_view&_et=1", "\r\nen=scroll&_et=2");
    let mut conn = tokio::net::TcpStream::connect(proc.addr).await.unwrap();
    let head = format!(
        "POST /g/collect?v=2&tid=G-TEST1&cid=111.222 HTTP/1.1\r\nhost: {}\r\ncontent-type: text/plain;charset=UTF-8\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        proc.addr,
        first.len() + rest.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = String::new();
    read_until(&mut conn, &mut answer, "100 Continue\r\n\r\n").await;
    let mut answer = answer
        .split_once("100 Continue\r\n\r\n")
        .map(|(_, after)| after.to_owned())
        .unwrap_or_default();
    conn.write_all(first.as_bytes()).await.unwrap();

    proc.signal("TERM");
    proc.wait_for_line("the shutdown starting", 10, |l| {
        l.contains("shutdown requested")
    })
    .await;
    // Shutting down: the admin listener is still up and says not ready while hits finish.
    let ready = reqwest::get(proc.admin_url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503, "/readyz while shutting down");
    conn.write_all(rest.as_bytes()).await.unwrap();

    read_until(&mut conn, &mut answer, "\r\n\r\n").await;
    let status_line = answer
        .split("\r\n")
        .find(|l| l.starts_with("HTTP/1.1 ") && !l.contains(" 100 "))
        .unwrap_or_else(|| panic!("no final status: {answer:?}"));
    assert_eq!(
        status_line, "HTTP/1.1 204 No Content",
        "in-flight request completes"
    );
    let status = tokio::task::spawn_blocking(move || proc.wait_exit(15))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn environment_overrides_config_keys() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let default = root.join("config/tagrelay.toml");
    let (ok, _, _) = check(&default, &[]);
    assert!(ok);
    // TAGRELAY__SECTION__KEY overrides the file; a bad value is reported under its key.
    let (ok, _, err) = check(&default, &[("TAGRELAY__SERVER__PATH_PREFIX", "no-slash")]);
    assert!(!ok);
    assert!(err.contains("server.path_prefix: `no-slash`"), "{err}");
    // A numeric secret from the environment is still a secret string, never echoed.
    let (ok, out, err) = check(&default, &[("TAGRELAY__ADMIN__TOKEN", "1234567890123456")]);
    assert!(ok, "{err}");
    assert!(!out.contains("1234567890123456") && !err.contains("1234567890123456"));
}

#[test]
fn check_refuses_outbox_settings_that_would_refuse_or_lose_hits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ob.toml");
    std::fs::write(
        &path,
        "[outbox]\nmax_records = 0\nmax_retry_age_secs = 5\nlease_timeout_ms = 100\ndispatch_nice = 25\n",
    )
    .unwrap();
    let (ok, _, err) = check(&path, &[]);
    assert!(!ok);
    for key in [
        "outbox.max_records",
        "outbox.max_retry_age_secs",
        "outbox.lease_timeout_ms",
        "outbox.dispatch_nice",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
}

/// `kill -HUP` of the real process: a good file takes effect (a new client answers, the new
/// trigger decides), a bad one is refused with the reason logged and the old one serving.
#[tokio::test]
async fn sighup_applies_a_good_file_and_refuses_a_bad_one_keeping_the_old() {
    let vendor = crate::helpers::FakeVendor::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tags = |events: &str| {
        format!(
            "[[tags]]\nname = \"hook\"\ntype = \"http\"\nurl = \"{}/hook\"\n[tags.trigger]\nevents = {events}\n",
            vendor.url()
        )
    };
    let ga4 = "[[clients]]\ntype = \"ga4\"\n";
    let path = write_config(dir.path(), &format!("{ga4}{}", tags("[\"page_view\"]")));
    let proc = start(&path);
    let http = reqwest::Client::new();
    let hit = |en: &str, id: &str| {
        let (http, url) = (
            http.clone(),
            proc.url(&format!(
                "/g/collect?v=2&tid=G-TEST1&cid=1.2&en={en}&ep.event_id={id}"
            )),
        );
        async move {
            assert_eq!(http.get(url).send().await.unwrap().status(), 204);
        }
    };
    let snippet = || {
        let (http, url) = (http.clone(), proc.url("/tagrelay.js"));
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    let outbox = dir.path().join("outbox");
    let ids = |v: &crate::helpers::FakeVendor| -> Vec<String> {
        v.received()
            .iter()
            .map(|r| r.json()["event_id"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    hit("page_view", "pv-1").await;
    vendor.wait_for(10, |r| r.len() == 1).await;
    assert_eq!(snippet().await, 404, "no data client yet");

    // A good file: the data client appears, the hook fires on purchases only.
    let good = write_config(
        dir.path(),
        &format!(
            "{ga4}[[clients]]\ntype = \"data\"\n{}",
            tags("[\"purchase\"]")
        ),
    );
    proc.signal("HUP");
    proc.wait_for_line("the reload", 10, |l| l.contains("configuration reloaded"))
        .await;
    assert_eq!(snippet().await, 200, "the new client answers");
    hit("page_view", "pv-2").await;
    hit("purchase", "buy-1").await;
    vendor.wait_for(10, |r| r.len() == 2).await;
    crate::helpers::wait_until_drained(&outbox).await;
    assert_eq!(
        ids(&vendor),
        vec!["pv-1", "buy-1"],
        "the new trigger decides"
    );

    // A bad file: refused, the reason logged, the good one keeps serving.
    let text = std::fs::read_to_string(&good).unwrap();
    std::fs::write(&good, text.replace("events = ", "evnts = ")).unwrap();
    proc.signal("HUP");
    let refused = proc
        .wait_for_line("the refused reload", 10, |l| {
            l.contains("new configuration rejected")
        })
        .await;
    assert!(refused.contains("\"level\":\"ERROR\""), "{refused}");
    assert!(refused.contains("unknown key `evnts`"), "{refused}");
    assert_eq!(snippet().await, 200, "the data client still answers");
    hit("page_view", "pv-3").await;
    hit("purchase", "buy-2").await;
    vendor.wait_for(10, |r| r.len() == 3).await;
    crate::helpers::wait_until_drained(&outbox).await;
    assert_eq!(ids(&vendor), vec!["pv-1", "buy-1", "buy-2"]);
    assert_eq!(
        proc.output().matches("configuration reloaded").count(),
        1,
        "the bad file was applied"
    );
}
