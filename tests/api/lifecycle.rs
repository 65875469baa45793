//! The life of a running instance as an orchestrator drives it: a stop that fails readiness
//! before it stops serving, a drain that delivers what the outbox holds and stops, reloads
//! without a shell (the admin endpoint, `tagrelay reload`, a watched config file), and what
//! the process logs about its configuration and its failed deliveries.

use std::process::Command;
use std::time::Duration;

use crate::helpers::{spawn_app, spawn_app_server, test_config, FakeVendor, TestApp};
use crate::process::{self, BIN};

const GA4: &str = "[[clients]]\ntype = \"ga4\"\n";

fn hook(vendor: &FakeVendor, name: &str) -> String {
    format!(
        "[[tags]]\nname = \"{name}\"\ntype = \"http\"\nurl = \"{}/{name}\"\n",
        vendor.url()
    )
}

async fn hit(app: &TestApp, id: &str) -> reqwest::Response {
    app.http
        .get(app.url(&format!(
            "/g/collect?v=2&tid=G-TEST1&cid=1.2&en=page_view&ep.event_id={id}"
        )))
        .send()
        .await
        .unwrap()
}

/// Polls `GET url` until it answers `status` (panics after 10 s).
async fn wait_status(http: &reqwest::Client, url: &str, status: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status() == status {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} did not answer {status} in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pending(app: &TestApp) -> u64 {
    tagrelay::outbox::store::embedded::tools::stats(&app.dir.path().join("outbox"))
        .unwrap()
        .pending
}

#[tokio::test]
async fn a_stop_fails_readiness_first_and_keeps_serving_until_the_delay_ends() {
    let app = spawn_app_server("shutdown_delay_ms = 600000", GA4).await;
    assert_eq!(hit(&app, "before").await.status(), 204);

    app.state.lifecycle().request_stop();
    // Readiness fails on both listeners while hits are still taken: load balancers move
    // traffic away before anything is refused.
    wait_status(&app.http, &app.url("/readyz"), 503).await;
    assert_eq!(
        app.http
            .get(app.admin_url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(hit(&app, "during-the-delay").await.status(), 204);

    // A second request ends the delay (a second Ctrl-C): the app stops without waiting.
    app.state.lifecycle().request_stop();
    let addr = app.addr;
    app.wait_stopped(10).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the public listener is closed"
    );
}

#[tokio::test]
async fn a_drain_refuses_new_hits_delivers_what_is_pending_and_stops() {
    let vendor = FakeVendor::start().await;
    // The vendor fails twice before it takes events: the drain waits for the retries.
    vendor.respond(&[(503, "busy"), (503, "busy"), (200, "{}")]);
    let app = spawn_app(&format!("{GA4}{}", hook(&vendor, "hook"))).await;
    for i in 0..3 {
        assert_eq!(hit(&app, &format!("ev-{i}")).await.status(), 204);
    }
    let r = app
        .http
        .post(app.admin_url("/admin/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(r.text().await.unwrap().starts_with("draining"));

    // Out of rotation and refusing hits at once; a sender is told to go elsewhere.
    wait_status(&app.http, &app.url("/readyz"), 503).await;
    let r = hit(&app, "after-the-drain").await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    assert!(r.text().await.unwrap().contains("draining"));

    let dir = app.wait_stopped(20).await;
    let stats =
        tagrelay::outbox::store::embedded::tools::stats(&dir.path().join("outbox")).unwrap();
    assert_eq!(stats.pending, 0, "{stats:?}");
    let mut got: Vec<String> = vendor
        .received()
        .iter()
        .filter(|r| !r.body.is_empty())
        .map(|r| r.json()["event_id"].as_str().unwrap().to_owned())
        .collect();
    got.sort();
    got.dedup();
    assert_eq!(got, ["ev-0", "ev-1", "ev-2"]);
}

#[tokio::test]
async fn a_drain_stops_at_its_time_limit_and_leaves_the_rest_in_the_outbox() {
    let vendor = FakeVendor::start().await;
    vendor.respond(&[(503, "down for good")]);
    let app = spawn_app(&format!("{GA4}{}", hook(&vendor, "hook"))).await;
    assert_eq!(hit(&app, "stuck").await.status(), 204);
    vendor.wait_for(10, |r| !r.is_empty()).await;
    let r = app
        .http
        .post(app.admin_url("/admin/drain?timeout_ms=300"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let dir = app.wait_stopped(20).await;
    let stats =
        tagrelay::outbox::store::embedded::tools::stats(&dir.path().join("outbox")).unwrap();
    assert_eq!(stats.pending, 1, "kept for the next start: {stats:?}");
}

#[tokio::test]
async fn reload_and_drain_need_the_admin_token_and_refuse_browsers() {
    let token = "a-token-of-enough-characters";
    let app = spawn_app(&format!("[admin]\ntoken = \"{token}\"\n{GA4}")).await;
    let post = |path: &str| app.http.post(app.admin_url(path));
    assert_eq!(post("/admin/reload").send().await.unwrap().status(), 401);
    assert_eq!(post("/admin/drain").send().await.unwrap().status(), 401);
    // A page elsewhere cannot have a logged-in browser do it.
    let r = post("/admin/drain")
        .bearer_auth(token)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(!app.state.lifecycle().is_draining());
    let r = post("/admin/reload")
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.starts_with("reloaded: "), "{text}");
    assert!(text.contains("clients: ga4"), "{text}");
    assert!(!text.contains(token), "{text}");
    // GET is not how they are asked.
    assert_eq!(
        app.http
            .get(app.admin_url("/admin/drain"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status(),
        405
    );
    assert_eq!(pending(&app), 0);
    app.stop().await;
}

/// `tagrelay reload` against the running server: a good file is in force at once, a bad one
/// is refused with its problems and the previous one keeps serving.
#[tokio::test]
async fn tagrelay_reload_applies_a_good_file_and_reports_a_bad_one() {
    let (first, second) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app(&format!("{GA4}{}", hook(&first, "first"))).await;
    let path = app.config_path();
    let reload = |url: String| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(["reload", "--url", &url, "--config"])
                .arg(&path)
                .output()
                .unwrap()
        })
    };
    std::fs::write(
        &path,
        test_config(
            app.dir.path(),
            &format!("{GA4}{}{}", hook(&first, "first"), hook(&second, "second")),
        ),
    )
    .unwrap();
    let out = reload(format!("http://{}", app.admin)).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("second (http)"), "{stdout}");
    assert_eq!(hit(&app, "to-both").await.status(), 204);
    second.wait_for(10, |r| r.len() == 1).await;

    std::fs::write(
        &path,
        test_config(
            app.dir.path(),
            &format!("{GA4}[[tags]]\nname = \"x\"\ntype = \"http\"\nurl = \"nowhere\"\n"),
        ),
    )
    .unwrap();
    let out = reload(format!("http://{}", app.admin)).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("HTTP 422"), "{stderr}");
    assert!(stderr.contains("tags[0] (`x`).url"), "{stderr}");
    assert!(
        app.state.pipeline().tag("second").is_some(),
        "the previous config serves"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_watched_config_file_is_reloaded_when_it_changes() {
    let (first, second) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app_server(
        "config_watch_interval_ms = 100",
        &format!("{GA4}{}", hook(&first, "first")),
    )
    .await;
    // Serving: the file is watched from here on.
    assert_eq!(hit(&app, "before-the-change").await.status(), 204);
    first.wait_for(10, |r| r.len() == 1).await;
    // As a ConfigMap update does: a new file takes the old one's name.
    let text = test_config_with_watch(app.dir.path(), &format!("{GA4}{}", hook(&second, "second")));
    let staged = app.dir.path().join("staged.toml");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, app.config_path()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.state.pipeline().tag("second").is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not reloaded in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(app.state.pipeline().tag("first").is_none());
    assert_eq!(hit(&app, "after-the-change").await.status(), 204);
    second.wait_for(10, |r| r.len() == 1).await;
    app.stop().await;
}

fn test_config_with_watch(dir: &std::path::Path, extra: &str) -> String {
    crate::helpers::test_config_server(dir, "config_watch_interval_ms = 100", extra)
}

/// The real binary: SIGTERM fails readiness while hits are still served for
/// `shutdown_delay_ms`; a second SIGTERM ends the wait and the process exits 0.
#[tokio::test]
async fn sigterm_keeps_serving_for_the_delay_and_a_second_one_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tagrelay.toml");
    std::fs::write(
        &path,
        crate::helpers::test_config_server(dir.path(), "shutdown_delay_ms = 600000", GA4),
    )
    .unwrap();
    let mut proc = process::start(&path);
    proc.signal("TERM");
    proc.wait_for_line("the delay", 10, |l| l.contains("still serving"))
        .await;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(proc.url("/readyz")).send().await.unwrap().status(),
        503
    );
    let r = http
        .get(proc.url("/g/collect?v=2&tid=G-TEST1&cid=1.2&en=page_view"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "hits are still taken during the delay");
    proc.signal("TERM");
    let status = tokio::task::spawn_blocking(move || proc.wait_exit(15))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// `tagrelay drain --wait` against the real binary: it returns once the server, having
/// delivered what it held, has stopped (exit 0).
#[tokio::test]
async fn tagrelay_drain_waits_for_the_server_to_deliver_and_stop() {
    let vendor = FakeVendor::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = process::write_config(dir.path(), &format!("{GA4}{}", hook(&vendor, "hook")));
    let mut proc = process::start(&path);
    let r = reqwest::get(proc.url("/g/collect?v=2&tid=G-TEST1&cid=1.2&en=page_view"))
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let admin = format!("http://{}", proc.admin);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args([
                "drain",
                "--wait",
                "--timeout-secs",
                "30",
                "--url",
                &admin,
                "--config",
            ])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("draining"), "{stdout}");
    assert!(stdout.ends_with("tagrelay stopped\n"), "{stdout}");
    let status = tokio::task::spawn_blocking(move || proc.wait_exit(10))
        .await
        .unwrap();
    assert!(status.success());
    assert_eq!(vendor.received().len(), 1);
    let stats =
        tagrelay::outbox::store::embedded::tools::stats(&dir.path().join("outbox")).unwrap();
    assert_eq!(stats.pending, 0);
}

/// The start names the config file in force, the variables over it, the outbox and what
/// runs; a list key works from the environment, and a bad one names its variable.
#[tokio::test]
async fn the_start_logs_the_config_in_force_and_list_keys_come_from_the_environment() {
    let vendor = FakeVendor::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = process::write_config(dir.path(), &format!("{GA4}{}", hook(&vendor, "hook")));
    let proxies = (
        "TAGRELAY__SERVER__TRUSTED_PROXIES",
        r#"["10.0.0.0/8", "127.0.0.0/8"]"#,
    );
    let proc = process::start_with(&path, &[proxies], "info");
    let line = proc
        .wait_for_line("the config in force", 10, |l| {
            l.contains("configuration in force")
        })
        .await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["config"], path.display().to_string());
    assert_eq!(v["outbox"], dir.path().join("outbox").display().to_string());
    assert_eq!(v["clients"], "ga4");
    assert_eq!(v["tags"], "hook (http)");
    let env = v["env_overrides"].as_str().unwrap();
    assert!(env.contains("TAGRELAY__SERVER__TRUSTED_PROXIES"), "{env}");
    // The list took effect: the forwarded address from a trusted proxy is the visitor's.
    let r = reqwest::Client::new()
        .get(proc.url("/g/collect?v=2&tid=G-TEST1&cid=1.2&en=page_view"))
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let got = vendor.wait_for(10, |r| r.len() == 1).await;
    assert_eq!(got[0].json()["ip_override"], "203.0.113.9");
    drop(proc);

    // Not a list: the message names the variable and how to write one, not the file.
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .env("TAGRELAY__SERVER__TRUSTED_PROXIES", "10.0.0.0/8")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let line = err
        .lines()
        .find(|l| l.contains("TAGRELAY__SERVER__TRUSTED_PROXIES"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("write a list as TOML"), "{line}");
    assert!(!line.contains("tagrelay.toml"), "{line}");
}

/// Dead letters are logged at ERROR — the first at once, then at most a line a minute per
/// tag however many follow — and failed attempts at INFO the same way.
#[tokio::test]
async fn delivery_failures_are_logged_in_aggregate() {
    let (refusing, failing) = (FakeVendor::start().await, FakeVendor::start().await);
    refusing.respond(&[(400, "bad event")]);
    failing.respond(&[(503, "busy")]);
    let dir = tempfile::tempdir().unwrap();
    let path = process::write_config(
        dir.path(),
        &format!(
            "{GA4}{}{}",
            hook(&refusing, "refusing"),
            hook(&failing, "failing")
        ),
    );
    let proc = process::start(&path);
    let http = reqwest::Client::new();
    // One at a time, so each is a batch of its own: one line per batch would be five.
    for i in 1..=5 {
        let r = http
            .get(proc.url(&format!(
                "/g/collect?v=2&tid=G-TEST1&cid=1.2&en=page_view&ep.event_id=e{i}"
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        crate::helpers::wait_for_dead_letter_count(&path, i).await;
    }
    failing.wait_for(10, |r| r.len() >= 10).await;
    let out = proc.output();
    let dead: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("deliveries dead-lettered"))
        .collect();
    assert_eq!(dead.len(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(dead[0]).unwrap();
    assert_eq!(v["level"], "ERROR");
    assert_eq!(v["tag"], "refusing");
    assert_eq!(v["reasons"], "rejected: 1");
    assert!(v["example"].as_str().unwrap().contains("HTTP 400"), "{v}");
    let failed: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("delivery attempts failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(failed[0]).unwrap();
    assert_eq!(
        (v["level"].as_str(), v["tag"].as_str()),
        (Some("INFO"), Some("failing"))
    );
    assert!(
        v["reasons"].as_str().unwrap().starts_with("http_5xx: "),
        "{v}"
    );
}
