//! The debug view: traces with the whole journey, secrets never shown, bounded memory,
//! authentication, and the live page in a real browser.

use std::time::Duration;

use crate::browser::Browser;
use crate::helpers::{spawn_app, spawn_app_server, FakeVendor, TestApp};

const META_TOKEN: &str = "EAAB-debug-secret-token-42";
const APP_SECRET: &str = "app-secret-debug-77";
const HOOK_TOKEN: &str = "hook-secret-header-99";

fn config(meta: &FakeVendor, hook: &FakeVendor, admin: &str) -> String {
    format!(
        r#"
[admin]
trace_sampling = "all"
{admin}

[[clients]]
type = "ga4"

[[tags]]
name = "meta"
type = "meta_capi"
endpoint = "{}"
pixel_id = "998877"
access_token = "{META_TOKEN}"
app_secret = "{APP_SECRET}"
[tags.trigger]
events = ["purchase"]

[[tags]]
name = "hook"
type = "http"
url = "{}/hook"
headers = {{ Authorization = "Bearer {HOOK_TOKEN}" }}
[tags.trigger]
events = ["purchase"]
conditions = [{{ field = "value", gt = 100 }}]
"#,
        meta.url(),
        hook.url()
    )
}

fn purchase(value: u32) -> String {
    format!("/g/collect?v=2&tid=G-DBG1&cid=55.66&en=purchase&cu=EUR&epn.value={value}&ep.transaction_id=T-{value}&dl=https%3A%2F%2Fshop.example.com%2Fthanks")
}

/// A hit from alice's browser, marked for the debug view.
async fn hit(app: &TestApp, path: &str) {
    hit_with_cookie(app, path, "_ga=GA1.1.55.66; tagrelay_debug=alice").await;
}

async fn hit_with_cookie(app: &TestApp, path: &str, cookie: &str) {
    let r = app
        .http
        .get(app.url(path))
        .header("user-agent", "Mozilla/5.0 Chrome/136")
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

/// Opens the live stream, as a debug page does; hits are watched while it is held.
async fn open_stream(app: &TestApp) -> reqwest::Response {
    let stream = app
        .http
        .get(app.admin_url("/debug/api/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    stream
}

async fn traces(app: &TestApp) -> serde_json::Value {
    app.http
        .get(app.admin_url("/debug/api/traces?limit=50"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn assert_no_secrets(text: &str, what: &str) {
    for secret in [META_TOKEN, APP_SECRET, HOOK_TOKEN] {
        assert!(!text.contains(secret), "{what} leaks a secret: {secret}");
    }
}

#[tokio::test]
async fn a_hit_is_traced_through_every_tag_and_no_secret_is_shown() {
    let (meta, hook) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app(&config(&meta, &hook, "")).await;

    // Watch the live stream while the hit happens.
    let mut stream = open_stream(&app).await;
    hit(&app, &purchase(42)).await;
    meta.wait_for(10, |r| !r.is_empty()).await;

    // The trace shows events, cookies and each tag's decision and delivery.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let t = loop {
        let all = traces(&app).await;
        let t = all["traces"][0].clone();
        let meta_state = t["tags"]
            .as_array()
            .and_then(|tags| tags.iter().find(|x| x["tag"] == "meta"))
            .map(|x| x["outcome"]["state"].clone());
        if meta_state == Some("delivered".into()) {
            break t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivered trace: {all}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(t["client"], "ga4");
    assert_eq!(t["status"], 204);
    assert_eq!(t["debug_marker"], "alice");
    assert_eq!(t["events"][0]["event_name"], "purchase");
    assert_eq!(t["events"][0]["value"], 42.0);
    let cookie_names: Vec<&str> = t["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        cookie_names.contains(&"FPID") && cookie_names.contains(&"_ga"),
        "{cookie_names:?}"
    );
    let tags = t["tags"].as_array().unwrap();
    let hook_t = tags.iter().find(|x| x["tag"] == "hook").unwrap();
    assert_eq!(hook_t["fired"], false);
    assert!(
        hook_t["reason"].as_str().unwrap().contains("value"),
        "{hook_t}"
    );
    let meta_t = tags.iter().find(|x| x["tag"] == "meta").unwrap();
    assert_eq!(meta_t["fired"], true);
    let attempt = &meta_t["attempts"][0];
    assert_eq!(attempt["status"], 200);
    let url = attempt["request"]["url"].as_str().unwrap();
    assert!(
        url.contains("/998877/events") && url.contains("[redacted]"),
        "{url}"
    );
    assert!(url.contains("access_token=[redacted]"), "{url}");
    assert!(attempt["request"]["body"]
        .as_str()
        .unwrap()
        .contains("Purchase"));

    // A second hit fires the hook, whose header carries a secret.
    hit(&app, &purchase(150)).await;
    let sent = hook.wait_for(10, |r| !r.is_empty()).await;
    assert_eq!(
        sent[0].headers["authorization"],
        format!("Bearer {HOOK_TOKEN}").as_str(),
        "the vendor gets the secret; only what people see is redacted"
    );
    // The hook's attempt reaches the trace: the checks below see it, not an earlier state.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let hook_attempt = loop {
        let all = traces(&app).await;
        let attempt = all["traces"].as_array().and_then(|ts| {
            ts.iter()
                .filter(|t| t["events"][0]["value"] == 150.0)
                .flat_map(|t| t["tags"].as_array().cloned().unwrap_or_default())
                .find(|x| x["tag"] == "hook" && x["attempts"][0]["status"] == 200)
                .map(|x| x["attempts"][0].clone())
        });
        if let Some(a) = attempt {
            break a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hook's attempt never reached the trace: {all}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let auth: Vec<&str> = hook_attempt["request"]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| {
            h[0].as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case("authorization"))
        })
        .filter_map(|h| h[1].as_str())
        .collect();
    // A header value written in the config is a secret whole: none of it is shown.
    assert_eq!(auth, vec!["[redacted]"], "{hook_attempt}");

    let all = traces(&app).await.to_string();
    assert_no_secrets(&all, "the traces API");
    let page = app.admin_text("/debug").await;
    assert_no_secrets(&page, "the debug page");
    // The live stream, read until it has carried the hook's attempt.
    let mut streamed = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let hook_header = r#"["Authorization","[redacted]"]"#;
    while !(streamed.contains(hook_header) && streamed.contains("event: update")) {
        match tokio::time::timeout_at(deadline, stream.chunk()).await {
            Ok(Ok(Some(chunk))) => streamed.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("the stream never carried the hook's attempt ({other:?}): {streamed}"),
        }
    }
    assert!(streamed.contains("event: trace"), "{streamed}");
    assert!(streamed.contains("event: update"), "{streamed}");
    assert!(streamed.contains("Bearer [redacted]") || streamed.contains("[redacted]"));
    assert!(streamed.contains(hook_header), "{streamed}");
    assert_no_secrets(&streamed, "the live stream");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_ring_stays_within_its_bounds_under_10000_hits() {
    let (meta, hook) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app(&config(
        &meta,
        &hook,
        "trace_capacity = 200\ntrace_max_bytes = 400000",
    ))
    .await;
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (http, base) = (app.http.clone(), app.url(""));
        tasks.push(tokio::spawn(async move {
            for i in 0..625 {
                let r = http
                    .get(format!(
                        "{base}/g/collect?v=2&tid=G-R&cid=1.{w}&en=page_view&ep.n={i}"
                    ))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 204);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (count, bytes) = app.state.traces().usage();
    assert!(count <= 200, "{count} traces kept");
    assert!(bytes <= 400_000, "{bytes} bytes kept");
    assert!(count > 50, "the ring keeps recent traces ({count})");
    let listed = app
        .http
        .get(app.admin_url("/debug/api/traces?limit=5000"))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(listed["traces"].as_array().unwrap().len(), count);
    app.stop().await;
}

#[tokio::test]
async fn with_a_token_the_admin_surface_needs_it() {
    let (meta, hook) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app(&config(
        &meta,
        &hook,
        "token = \"adm-token-1-of-sufficient-length\"",
    ))
    .await;
    let http = &app.http;
    for path in ["/debug", "/debug/api/traces", "/metrics"] {
        let r = http.get(app.admin_url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = http
        .get(app.admin_url("/debug/api/traces"))
        .header("authorization", "Bearer wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(app.admin_url("/debug/api/traces"))
        .header("authorization", "Bearer adm-token-1-of-sufficient-length")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Health stays open for probes.
    assert_eq!(
        http.get(app.admin_url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // The login form trades the token for a session cookie that never contains it.
    let r = http
        .post(app.admin_url("/debug/login"))
        .form(&[("token", "nope")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(app.admin_url("/debug/login"))
        .form(&[("token", "adm-token-1-of-sufficient-length")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && !cookie.contains("adm-token-1-of-sufficient-length"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    let r = http
        .get(app.admin_url("/debug/api/traces"))
        .header("cookie", session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_configured_token_is_trimmed_like_the_typed_one() {
    let (meta, hook) = (FakeVendor::start().await, FakeVendor::start().await);
    // A token pasted with its newline: the login form trims input, so the config does too.
    let app = spawn_app(&config(
        &meta,
        &hook,
        "token = \"  adm-token-1-of-sufficient-length\\n\"",
    ))
    .await;
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = c
        .post(app.admin_url("/debug/login"))
        .form(&[("token", "adm-token-1-of-sufficient-length")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let r = c
        .get(app.admin_url("/debug/api/traces"))
        .header("authorization", "Bearer adm-token-1-of-sufficient-length")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn guessing_the_admin_token_is_throttled_per_address() {
    let (meta, hook) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app(&config(
        &meta,
        &hook,
        "token = \"adm-token-1-of-sufficient-length\"",
    ))
    .await;
    let http = &app.http;
    // Ten wrong guesses in a minute, by header and by the login form.
    for i in 0..10 {
        let r = if i % 2 == 0 {
            http.get(app.admin_url("/metrics"))
                .header("authorization", format!("Bearer guess-{i}"))
                .send()
                .await
                .unwrap()
        } else {
            http.post(app.admin_url("/debug/login"))
                .form(&[("token", format!("guess-{i}"))])
                .send()
                .await
                .unwrap()
        };
        assert_eq!(r.status(), 401, "guess {i}");
    }
    // Now even the right token waits, and says how long.
    for r in [
        http.post(app.admin_url("/debug/login"))
            .form(&[("token", "adm-token-1-of-sufficient-length")])
            .send()
            .await
            .unwrap(),
        http.get(app.admin_url("/metrics"))
            .header("authorization", "Bearer adm-token-1-of-sufficient-length")
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(r.status(), 429);
        let wait: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&wait), "{wait}");
    }
    // Probes and the login page itself stay open.
    let r = http.get(app.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(app.admin_url("/debug/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
}

#[test]
fn a_public_admin_listener_without_a_token_is_refused() {
    let err = tagrelay::config::load_str(
        "[server]\nadmin_listen = \"0.0.0.0:9090\"\n",
        "x.toml",
        false,
    )
    .map(|c| tagrelay::pipeline::Pipeline::build(&c).map(|_| ()))
    .unwrap()
    .unwrap_err();
    assert!(err.join("\n").contains("admin.token"), "{err:?}");
}

#[tokio::test]
async fn the_live_page_lists_hits_with_their_tag_outcomes() {
    let (meta, hook) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app_server(
        "trusted_proxies = [\"127.0.0.0/8\"]",
        &config(&meta, &hook, "trace_sampling = \"watching\"")
            .replace("trace_sampling = \"all\"\n", ""),
    )
    .await;
    let browser = Browser::start().await;
    browser.client.goto(&app.admin_url("/debug")).await.unwrap();
    // The page's stream counts as a watcher: hits are traced while it is open.
    browser
        .wait_js(10, "document.querySelector('#status') !== null")
        .await;
    // Connected: the stream's response has arrived, so the server counts the watcher.
    browser
        .wait_js(
            10,
            "document.querySelector('#status').dataset.state === 'connected'",
        )
        .await;
    hit(&app, "/g/collect?v=2&tid=G-DBG1&cid=55.66&en=page_view").await;
    hit(&app, &purchase(250)).await;
    meta.wait_for(10, |r| !r.is_empty()).await;
    hook.wait_for(10, |r| !r.is_empty()).await;

    browser
        .wait_js(10, "document.querySelectorAll('.hit-row').length >= 2")
        .await;
    let chips = browser
        .eval("return [...document.querySelectorAll('.event-chip')].map(e => e.textContent);")
        .await;
    let chips = chips.to_string();
    assert!(
        chips.contains("purchase") && chips.contains("page_view"),
        "{chips}"
    );
    browser
        .wait_js(
            10,
            "document.querySelector('.tag-badge[data-tag=\"meta\"][data-state=\"delivered\"]') !== null",
        )
        .await;
    browser
        .wait_js(
            10,
            "document.querySelector('.tag-badge[data-tag=\"hook\"][data-state=\"delivered\"]') !== null",
        )
        .await;
    // Expand the purchase and see its journey.
    browser
        .eval("const r=[...document.querySelectorAll('.hit-row')].find(r=>r.textContent.includes('purchase')); r.click(); return true;")
        .await;
    browser
        .wait_js(10, "document.querySelector('#detail') && document.querySelector('#detail').textContent.includes('998877')")
        .await;
    let detail = browser
        .eval("return document.querySelector('#detail').textContent;")
        .await;
    assert_no_secrets(detail.as_str().unwrap(), "the expanded trace");
    let shot = browser.screenshot("debug-view.png").await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    app.stop().await;
}

#[tokio::test]
async fn marked_sampling_traces_only_marked_hits_while_a_page_is_open() {
    let (meta, hook) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app(
        &config(&meta, &hook, "trace_sampling = \"marked\"")
            .replace("trace_sampling = \"all\"\n", ""),
    )
    .await;
    let stream = open_stream(&app).await;
    // Another visitor's hit, while the page is open: not traced.
    hit_with_cookie(
        &app,
        "/g/collect?v=2&tid=G-DBG1&cid=77.88&en=page_view",
        "_ga=GA1.1.77.88",
    )
    .await;
    hit(&app, "/g/collect?v=2&tid=G-DBG1&cid=55.66&en=page_view").await;
    let list = traces(&app).await;
    let list = list["traces"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["debug_marker"], "alice");
    drop(stream);
    app.stop().await;
}

#[tokio::test]
async fn an_open_live_stream_does_not_hold_up_shutdown() {
    let (meta, hook) = (FakeVendor::start().await, FakeVendor::start().await);
    // A deadline of ten minutes: were the stream holding shutdown up, stopping would hang.
    let dir = tempfile::tempdir().unwrap();
    let text = crate::helpers::test_config(dir.path(), &config(&meta, &hook, ""))
        .replace("shutdown_timeout_ms = 3000", "shutdown_timeout_ms = 600000");
    assert!(text.contains("shutdown_timeout_ms = 600000"));
    let app = crate::helpers::spawn_with(dir, &text).await;
    let mut stream = open_stream(&app).await;
    tokio::time::timeout(Duration::from_secs(60), app.stop())
        .await
        .expect("shutdown waited for a debug stream");
    // The server ended the stream itself.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.chunk()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) | Ok(Err(_)) => break,
            Err(_) => panic!("the debug stream is still open after shutdown"),
        }
    }
}

#[tokio::test]
async fn without_a_token_the_admin_listener_refuses_foreign_host_names() {
    let (meta, hook) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app(&config(&meta, &hook, "")).await;
    // What a DNS-rebinding page would send.
    let r = app
        .http
        .get(app.admin_url("/debug/api/traces"))
        .header("host", "attacker.example:9090")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    for host in ["localhost:9090", "127.0.0.1"] {
        let r = app
            .http
            .get(app.admin_url("/debug/api/traces"))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{host}");
    }
    app.stop().await;
}
