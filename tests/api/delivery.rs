//! Tags end to end: a hit into the GA4 client reaches fake GA4 and Graph API servers; the
//! outbox retries, honours Retry-After, dead-letters, replays, pushes back when full.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::helpers::{spawn_app, FakeVendor, Reply, TestApp};
use crate::process::{self, BIN};

const UA: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari/605.1.15";

/// Reference hit (c): a purchase with items, plus an fbclid on the landing URL.
const PURCHASE: &str = "/g/collect?v=2&tid=G-ABCDEF1234&gtm=45je5ca1v9876543210za200&_p=1764912991250&gcs=G111&gcd=13t3t3t3t5l1&npa=0&dma=0&cid=1234567890.1764912990&ul=en-us&sr=1920x1080&_s=7&sid=1764912991&sct=1&seg=1&dl=https%3A%2F%2Fshop.example.com%2Fcheckout%2Fthanks%3Ffbclid%3DIwAR2xYz&dt=Thank%20you&uid=u_8842&en=purchase&_c=1&cu=EUR&ep.transaction_id=T-1024&epn.value=134&epn.tax=21.4&epn.shipping=4.9&ep.coupon=SUMMER&pr1=idSKU_123~nmTrail%20Shoe~brAcme~caShoes~c2Running~vablue~pr59~qt2~k0size~v042&pr2=idSKU_777~nmSocks~brAcme~caAccessories~pr16~qt1&_et=2311";

fn ga4_and_meta(ga4: &FakeVendor, meta: &FakeVendor) -> String {
    format!(
        r#"
[[clients]]
type = "ga4"

[[tags]]
name = "ga4"
type = "ga4"
endpoint = "{}"

[[tags]]
name = "meta"
type = "meta_capi"
endpoint = "{}"
pixel_id = "1234567890"
access_token = "EAAB-test-token-never-printed"
app_secret = "app-secret-never-printed"
[tags.trigger]
events = ["purchase"]
consent = ["ad_storage"]
"#,
        ga4.url(),
        meta.url()
    )
}

async fn send(app: &TestApp, path: &str) -> reqwest::Response {
    app.http
        .post(app.url(path))
        .header("host", "sgtm.example.com")
        .header("user-agent", UA)
        .header("content-type", "text/plain;charset=UTF-8")
        .header("x-forwarded-for", "203.0.113.77")
        .send()
        .await
        .unwrap()
}

fn pairs(query_or_line: &str) -> Vec<(String, String)> {
    tagrelay::clients::ga4::parse_query_pairs(query_or_line)
        .expect("vendor request is well encoded")
        .into_iter()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[tokio::test]
async fn a_purchase_reaches_ga4_and_meta_with_the_expected_payloads() {
    let (ga4, meta) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app(&ga4_and_meta(&ga4, &meta)).await;
    let r = send(&app, PURCHASE).await;
    assert_eq!(r.status(), 204);
    let set_cookies: Vec<String> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert!(set_cookies
        .iter()
        .any(|c| c.starts_with("FPID=") && c.contains("HttpOnly")));
    let fbc = set_cookies
        .iter()
        .find(|c| c.starts_with("_fbc="))
        .expect("_fbc built from fbclid");
    assert!(
        fbc.starts_with("_fbc=fb.1.") && fbc.contains(".IwAR2xYz;"),
        "{fbc}"
    );
    assert!(fbc.contains("Domain=example.com"), "{fbc}");

    // GA4: a rebuilt /g/collect with the browser's UA, the visitor IP and the items.
    let got = ga4.wait_for(10, |r| !r.is_empty()).await;
    let req = &got[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.uri.path(), "/g/collect");
    assert_eq!(req.headers["user-agent"], UA);
    let mut params = pairs(req.uri.query().unwrap_or(""));
    for line in req.body_text().split("\r\n").filter(|l| !l.is_empty()) {
        params.extend(pairs(line));
    }
    let get = |k: &str| {
        params
            .iter()
            .find(|(pk, _)| pk == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("GA4 request lacks `{k}`: {params:?}"))
    };
    assert_eq!(get("en"), "purchase");
    assert_eq!(get("tid"), "G-ABCDEF1234");
    assert_eq!(
        get("cid"),
        "1234567890.1764912990",
        "visitor keeps the id GA knows"
    );
    assert_eq!(get("_uip"), "203.0.113.77");
    assert_eq!(get("ep.transaction_id"), "T-1024");
    assert_eq!(get("epn.value"), "134");
    assert_eq!(get("cu"), "EUR");
    assert_eq!(get("gcs"), "G111");
    assert!(
        get("pr1").starts_with("idSKU_123~nmTrail Shoe"),
        "{}",
        get("pr1")
    );
    assert!(get("pr1").contains("k0size~v042"), "{}", get("pr1"));
    assert_eq!(get("sid"), "1764912991");

    // Meta: Purchase with hashed external id, unhashed fbc/fbp/IP/UA, custom data.
    let got = meta.wait_for(10, |r| !r.is_empty()).await;
    let req = &got[0];
    assert_eq!(req.uri.path(), "/v24.0/1234567890/events");
    let q = req.uri.query().unwrap();
    assert!(
        q.contains("access_token=EAAB-test-token-never-printed"),
        "{q}"
    );
    assert!(q.contains("appsecret_proof="), "{q}");
    let body = req.json();
    let ev = &body["data"][0];
    assert_eq!(ev["event_name"], "Purchase");
    assert_eq!(ev["action_source"], "website");
    assert_eq!(
        ev["event_source_url"],
        "https://shop.example.com/checkout/thanks?fbclid=IwAR2xYz"
    );
    let ud = &ev["user_data"];
    assert_eq!(ud["client_ip_address"], "203.0.113.77");
    assert_eq!(ud["client_user_agent"], UA);
    assert!(ud["fbc"].as_str().unwrap().ends_with(".IwAR2xYz"), "{ud}");
    assert!(ud["fbp"].as_str().unwrap().starts_with("fb.1."), "{ud}");
    let ext = ud["external_id"][0].as_str().unwrap();
    assert_eq!(ext.len(), 64, "external_id is a SHA-256: {ext}");
    let cd = &ev["custom_data"];
    assert_eq!(cd["currency"], "EUR");
    assert_eq!(cd["value"], 134.0);
    assert_eq!(cd["order_id"], "T-1024");
    assert_eq!(cd["content_ids"], serde_json::json!(["SKU_123", "SKU_777"]));
    assert_eq!(cd["num_items"], 3);
    app.stop().await;
}

#[tokio::test]
async fn events_without_consent_never_reach_a_consent_gated_tag() {
    let (ga4, meta) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app(&ga4_and_meta(&ga4, &meta)).await;
    let denied = PURCHASE.replace("gcs=G111&gcd=13t3t3t3t5l1", "gcs=G101&gcd=13q3t3q2q5l1");
    assert_eq!(send(&app, &denied).await.status(), 204);
    ga4.wait_for(10, |r| !r.is_empty()).await;
    // GA4 (no consent condition) got it. A granted purchase after it must reach Meta; once it
    // has and the outbox owes nothing, whatever the denied hit fired has been sent too.
    let granted = PURCHASE.replace("T-1024", "T-GRANTED");
    assert_eq!(send(&app, &granted).await.status(), 204);
    meta.wait_for(10, |r| !r.is_empty()).await;
    app.wait_until_drained().await;
    let order_ids: Vec<serde_json::Value> = meta
        .received()
        .iter()
        .flat_map(|r| r.json()["data"].as_array().cloned().unwrap_or_default())
        .map(|e| e["custom_data"]["order_id"].clone())
        .collect();
    assert_eq!(
        order_ids,
        vec![serde_json::json!("T-GRANTED")],
        "Meta must not receive ad-denied events"
    );
    app.stop().await;
}

fn hook(vendor: &FakeVendor) -> String {
    format!(
        "[[clients]]\ntype = \"ga4\"\n[[tags]]\nname = \"hook\"\ntype = \"http\"\nurl = \"{}/hook\"\n",
        vendor.url()
    )
}

fn hit_with_id(id: &str) -> String {
    format!("/g/collect?v=2&tid=G-TEST1&cid=1.2&en=page_view&ep.event_id={id}")
}

#[tokio::test]
async fn a_500_is_retried_and_a_400_is_dead_lettered_then_replayed() {
    let vendor = FakeVendor::start().await;
    vendor.respond(&[(500, "boom"), (200, "ok")]);
    let app = spawn_app(&hook(&vendor)).await;
    assert_eq!(send(&app, &hit_with_id("retry-1")).await.status(), 204);
    let got = vendor.wait_for(10, |r| r.len() == 2).await;
    assert!(got.iter().all(|r| r.json()["event_id"] == "retry-1"));

    vendor.clear();
    vendor.respond(&[(400, "{\"error\":\"bad field\"}"), (200, "ok")]);
    assert_eq!(send(&app, &hit_with_id("dead-1")).await.status(), 204);
    vendor.wait_for(10, |r| r.len() == 1).await;
    // Dead-lettered: settled, so it can never be sent again. An event after it gets through.
    let config = app.config_path();
    let list = app.wait_for_dead_letters(1).await;
    assert_eq!(send(&app, &hit_with_id("after-dead-1")).await.status(), 204);
    vendor.wait_for(10, |r| r.len() == 2).await;
    app.wait_until_drained().await;
    let sent: Vec<String> = vendor
        .received()
        .iter()
        .map(|r| r.json()["event_id"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        sent,
        vec!["dead-1", "after-dead-1"],
        "a 400 is never retried"
    );
    assert_eq!(
        sent.iter().filter(|id| *id == "dead-1").count(),
        1,
        "a 400 is never retried"
    );

    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["event_id"], "dead-1", "{list:?}");
    assert!(
        list[0]["reason"].as_str().unwrap().contains("400"),
        "{list:?}"
    );

    // Fix the vendor, replay, and the event arrives.
    vendor.respond(&[(200, "ok")]);
    let out = std::process::Command::new(BIN)
        .args(["outbox", "replay", "--all", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 dead letter moved back"));
    let got = vendor.wait_for(10, |r| r.len() == 3).await;
    assert_eq!(got[2].json()["event_id"], "dead-1");
    app.stop().await;
}

#[tokio::test]
async fn retry_after_from_a_429_is_honoured() {
    let vendor = FakeVendor::start().await;
    vendor.respond_with(vec![
        Reply {
            status: axum::http::StatusCode::TOO_MANY_REQUESTS,
            body: "slow down".into(),
            headers: vec![("retry-after", "2".into())],
        },
        Reply {
            status: axum::http::StatusCode::OK,
            body: "ok".into(),
            headers: vec![],
        },
    ]);
    let app = spawn_app(&hook(&vendor)).await;
    send(&app, &hit_with_id("throttled")).await;
    vendor.wait_for(10, |r| r.len() == 1).await;
    let first = Instant::now();
    vendor.wait_for(10, |r| r.len() == 2).await;
    let gap = first.elapsed();
    assert!(gap >= Duration::from_millis(1800), "retried after {gap:?}");
    app.stop().await;
}

fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

/// A vendor asking for a day (`Retry-After: 86400`, a misbehaving proxy): the event is held
/// an hour, the longest tagrelay obeys, like the tag's pause; not the day, most of its retry
/// window, while later events go out.
#[tokio::test]
async fn a_retry_after_of_a_day_holds_the_event_an_hour() {
    let vendor = FakeVendor::start().await;
    vendor.respond_with(vec![Reply {
        status: axum::http::StatusCode::TOO_MANY_REQUESTS,
        body: "slow down".into(),
        headers: vec![("retry-after", "86400".into())],
    }]);
    let app = spawn_app(&format!(
        "[admin]\ntrace_sampling = \"all\"\n{}",
        hook(&vendor)
    ))
    .await;
    let before = now_ms();
    assert_eq!(send(&app, &hit_with_id("held-1")).await.status(), 204);
    vendor.wait_for(10, |r| r.len() == 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let next = loop {
        let all: serde_json::Value = app
            .http
            .get(app.admin_url("/debug/api/traces?limit=5"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let outcome = all["traces"][0]["tags"]
            .as_array()
            .and_then(|tags| tags.iter().find(|t| t["tag"] == "hook"))
            .map(|t| t["outcome"].clone());
        if let Some(o) = outcome.filter(|o| o["state"] == "retrying") {
            break o["next_attempt_ms"].as_i64().expect("retrying has a time");
        }
        assert!(Instant::now() < deadline, "never retrying: {all}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let after = now_ms();
    assert!(
        (before + 3_600_000..=after + 3_600_000).contains(&next),
        "next attempt {} s after the 429, not an hour",
        (next - before) / 1000
    );
    app.stop().await;
}

#[tokio::test]
async fn an_outage_delays_but_delivers_every_event_exactly_once() {
    let vendor = FakeVendor::start().await;
    let mut script: Vec<(u16, &str)> = vec![(503, "down"); 15];
    script.push((200, "ok"));
    vendor.respond(&script);
    let app = spawn_app(&hook(&vendor)).await;
    let mut accepted = HashSet::new();
    for i in 0..40 {
        let id = format!("outage-{i}");
        if send(&app, &hit_with_id(&id)).await.status() == 204 {
            accepted.insert(id);
        }
    }
    assert_eq!(accepted.len(), 40);
    let got = vendor
        .wait_for(20, |r| {
            r.iter()
                .skip(15)
                .map(|r| r.json()["event_id"].to_string())
                .collect::<HashSet<_>>()
                .len()
                >= 40
        })
        .await;
    // Successful deliveries: everything after the 15 scripted failures.
    let delivered: Vec<String> = got
        .iter()
        .skip(15)
        .map(|r| r.json()["event_id"].as_str().unwrap().to_owned())
        .collect();
    let unique: HashSet<String> = delivered.iter().cloned().collect();
    assert_eq!(unique, accepted, "every accepted event delivered");
    assert_eq!(delivered.len(), unique.len(), "none delivered twice");
    app.stop().await;
}

#[tokio::test]
async fn a_full_outbox_answers_503_with_retry_after_and_recovers() {
    let vendor = FakeVendor::start().await;
    vendor.respond(&[(503, "down")]);
    let dir = tempfile::tempdir().unwrap();
    let text = crate::helpers::test_config(dir.path(), &hook(&vendor))
        .replace("retry_max_ms = 200", "retry_max_ms = 200\nmax_records = 5");
    let app = crate::helpers::spawn_with(dir, &text).await;
    let mut statuses = Vec::new();
    for i in 0..8 {
        let r = send(&app, &hit_with_id(&format!("full-{i}"))).await;
        let status = r.status().as_u16();
        if status == 503 {
            assert!(r.headers().contains_key("retry-after"));
            assert!(r.text().await.unwrap().contains("outbox is full"));
        }
        statuses.push(status);
    }
    assert_eq!(&statuses[..5], &[204; 5], "{statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == 503), "{statuses:?}");
    // The vendor recovers, the outbox drains, hits are accepted again.
    vendor.respond(&[(200, "ok")]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = send(&app, &hit_with_id("after-full")).await;
        if r.status() == 204 {
            break;
        }
        assert!(Instant::now() < deadline, "outbox never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

/// kill -9 under load while the vendor is slow, restart on the same outbox: every hit that
/// got a 2xx is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_event() {
    let vendor = FakeVendor::start().await;
    vendor.set_delay(150);
    let dir = tempfile::tempdir().unwrap();
    let config = process::write_config(dir.path(), &hook(&vendor));
    let mut proc = process::start(&config);
    let addr = proc.addr;

    let client = reqwest::Client::new();
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(HashSet::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..8 {
        let (client, accepted, stop) = (client.clone(), accepted.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 2_000 {
                let id = format!("crash-{w}-{i}");
                i += 1;
                let url = format!("http://{addr}{}", hit_with_id(&id));
                if let Ok(r) = client.post(url).send().await {
                    if r.status() == 204 {
                        accepted.lock().unwrap().insert(id);
                    }
                }
            }
        }));
    }
    // Kill once a good number of hits were acknowledged (the slow vendor lags behind them).
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted.lock().unwrap().len() < 200 {
        assert!(
            Instant::now() < deadline,
            "the load generator never got going"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proc.signal("KILL");
    proc.wait_exit(5);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.len() > 50,
        "load generator got {} hits in",
        accepted.len()
    );
    let received_before: HashSet<String> = vendor
        .received()
        .iter()
        .map(|r| r.json()["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        !accepted.is_subset(&received_before),
        "the slow vendor should still have had a backlog at the kill"
    );

    vendor.set_delay(0);
    let _restarted = process::start(&config);
    vendor
        .wait_for(60, |r| {
            let got: HashSet<String> = r
                .iter()
                .map(|r| r.json()["event_id"].as_str().unwrap().to_owned())
                .collect();
            accepted.is_subset(&got)
        })
        .await;
}

fn batching_hook(vendor: &FakeVendor) -> String {
    format!(
        "[[clients]]\ntype = \"ga4\"\n[[tags]]\nname = \"hook\"\ntype = \"http\"\nbatch_max = 10\nurl = \"{}/hook\"\n",
        vendor.url()
    )
}

fn five_events(ids: [&str; 5]) -> String {
    ids.iter()
        .map(|id| format!("en=page_view&ep.event_id={id}"))
        .collect::<Vec<_>>()
        .join("\r\n")
}

fn dead_letter_ids(config: &std::path::Path) -> HashSet<String> {
    crate::helpers::dead_letters(config)
        .iter()
        .map(|d| d["event_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn one_bad_event_does_not_dead_letter_its_batch() {
    let vendor = FakeVendor::start().await;
    vendor.reject_containing("bad-3");
    let app = spawn_app(&batching_hook(&vendor)).await;
    let r = app
        .http
        .post(app.url("/g/collect?v=2&tid=G-TEST1&cid=1.2"))
        .body(five_events(["ok-1", "ok-2", "bad-3", "ok-4", "ok-5"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let delivered = |got: &[crate::helpers::Received]| -> HashSet<String> {
        got.iter()
            .filter(|r| !r.body_text().contains("bad-3"))
            .flat_map(|r| r.json().as_array().cloned().unwrap_or_default())
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let got = vendor.wait_for(10, |r| delivered(r).len() == 4).await;
    assert!(
        got[0].json().as_array().unwrap().len() == 5,
        "first try is one batch"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while dead_letter_ids(&app.config_path()).is_empty() {
        assert!(Instant::now() < deadline, "bad event never dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        dead_letter_ids(&app.config_path()),
        HashSet::from(["bad-3".to_string()])
    );
    app.stop().await;
}

#[tokio::test]
async fn a_request_wide_rejection_is_not_split_event_by_event() {
    let vendor = FakeVendor::start().await;
    vendor.reject_containing("event_id");
    let app = spawn_app(&batching_hook(&vendor)).await;
    app.http
        .post(app.url("/g/collect?v=2&tid=G-TEST1&cid=1.2"))
        .body(five_events(["w-1", "w-2", "w-3", "w-4", "w-5"]))
        .send()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dead_letter_ids(&app.config_path()).len() < 5 {
        assert!(Instant::now() < deadline, "batch never dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The batch, then its two halves: a bad token costs two extra requests, not one per event.
    assert_eq!(vendor.received().len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn a_redirect_is_a_configuration_error_not_a_delivery() {
    let vendor = FakeVendor::start().await;
    vendor.respond_with(vec![Reply {
        status: axum::http::StatusCode::MOVED_PERMANENTLY,
        body: String::new(),
        headers: vec![("location", "https://elsewhere.example/hook".into())],
    }]);
    let app = spawn_app(&hook(&vendor)).await;
    send(&app, &hit_with_id("moved-1")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = std::process::Command::new(BIN)
            .args(["outbox", "dead-letters", "--json", "--config"])
            .arg(app.config_path())
            .output()
            .unwrap();
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(d) = list.as_array().and_then(|l| l.first()) {
            let reason = d["reason"].as_str().unwrap();
            assert!(
                reason.contains("redirect to https://elsewhere.example/hook"),
                "{reason}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "redirected event never dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(vendor.received().len(), 1, "the redirect is not followed");
    app.stop().await;
}

#[tokio::test]
async fn a_hits_commit_is_synced_and_its_acks_commit_is_not() {
    let vendor = FakeVendor::start().await;
    let app = spawn_app(&hook(&vendor)).await;
    assert_eq!(send(&app, &hit_with_id("sync-1")).await.status(), 204);
    vendor.wait_for(10, |r| !r.is_empty()).await;
    // The ack is committed after the vendor's answer; the metrics say both kinds of commit.
    // (The recorder is shared by every test in this binary: only the series are checked.)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = app.admin_text("/metrics").await;
        let series = [
            "tagrelay_outbox_commits_total{synced=\"true\"}",
            "tagrelay_outbox_commits_total{synced=\"false\"}",
            "tagrelay_outbox_fsyncs_total ",
            "tagrelay_outbox_fsync_duration_seconds_count ",
            "tagrelay_outbox_log_bytes ",
            "tagrelay_outbox_log_files ",
        ];
        if series
            .iter()
            .all(|s| text.lines().any(|l| l.starts_with(s)))
        {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}
