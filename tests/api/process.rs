//! Tests that run the real `tagrelay` binary: CLI check, graceful shutdown.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helpers::test_config;

pub const BIN: &str = env!("CARGO_BIN_EXE_tagrelay");

/// A running `tagrelay` process and the addresses it logged.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Proc {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
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
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config_path)
        .env("TAGRELAY__SERVER__LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tagrelay");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = match lines.next() {
            Some(Ok(l)) => l,
            _ => panic!("tagrelay exited before listening"),
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if let Some(a) = v["public_addr"].as_str() {
            break a.parse().unwrap();
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    Proc { child, addr }
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

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "[[clients]]\ntype = \"ga4\"\n");
    let mut proc = start(&path);

    // A POST whose body arrives slowly: it is in flight when SIGTERM lands.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let url = proc.url("/g/collect?v=2&tid=G-TEST1&cid=111.222");
    let request = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .header("content-type", "text/plain;charset=UTF-8")
            .body(body)
            .send()
            .await
    });
    tx.send(Ok(b"en=page_view&_et=1".to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proc.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.send(Ok(b"\r\nen=scroll&_et=2".to_vec())).await.unwrap();
    drop(tx);

    let resp = request.await.unwrap().expect("in-flight request completes");
    assert_eq!(resp.status(), 204);
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
