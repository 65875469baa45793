//! A hit goes in, the fake vendor gets the event: client IP, reload.

use crate::helpers::{spawn_app, spawn_app_server, FakeVendor};

fn http_tag(vendor: &FakeVendor, events: &str) -> String {
    format!(
        r#"
[[clients]]
type = "ga4"

[[tags]]
name = "hook"
type = "http"
url = "{}/hook"
[tags.trigger]
events = {events}
"#,
        vendor.url()
    )
}

const UA: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/136.0 Safari/537.36";

fn hit(en: &str) -> String {
    format!("/g/collect?v=2&tid=G-TEST1&cid=111.222&dl=https%3A%2F%2Fwww.example.com%2F&en={en}")
}

#[tokio::test]
async fn client_ip_comes_from_a_trusted_proxy_chain() {
    let vendor = FakeVendor::start().await;
    let app = spawn_app(&http_tag(&vendor, "[\"*\"]")).await;
    let r = app
        .http
        .get(app.url(&hit("page_view")))
        .header("user-agent", UA)
        .header(
            "x-forwarded-for",
            "198.51.100.23, 203.0.113.5:4711, 127.0.0.9",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let got = vendor.wait_for(10, |r| !r.is_empty()).await;
    let event = got[0].json();
    assert_eq!(event["ip_override"], "203.0.113.5", "{event}");
    assert_eq!(event["user_agent"], UA);
    app.stop().await;
}

#[tokio::test]
async fn forwarding_headers_from_untrusted_peers_are_ignored() {
    let vendor = FakeVendor::start().await;
    let app = spawn_app_server("trusted_proxies = []", &http_tag(&vendor, "[\"*\"]")).await;
    app.http
        .get(app.url(&hit("page_view")))
        .header("x-forwarded-for", "198.51.100.23")
        .header("x-real-ip", "198.51.100.24")
        .send()
        .await
        .unwrap();
    let got = vendor.wait_for(10, |r| !r.is_empty()).await;
    assert_eq!(got[0].json()["ip_override"], "127.0.0.1");
    app.stop().await;
}

#[tokio::test]
async fn ipv6_and_garbage_forwarding_headers() {
    let vendor = FakeVendor::start().await;
    let app = spawn_app(&http_tag(&vendor, "[\"*\"]")).await;
    for (xff, want) in [
        ("[2001:db8::42]:443", "2001:db8::42"),
        ("junk, 2001:db8::43", "2001:db8::43"),
        // An unreadable hop ends the walk at the nearest address we can vouch for.
        ("2001:db8::43, junk, 300.1.1.1", "127.0.0.1"),
        ("%%%%", "127.0.0.1"),
    ] {
        let r = app
            .http
            .get(app.url(&hit("page_view")))
            .header("x-forwarded-for", xff)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204, "{xff}");
        let got = vendor.wait_for(10, |r| !r.is_empty()).await;
        assert_eq!(got.last().unwrap().json()["ip_override"], want, "{xff}");
        vendor.clear();
    }
    app.stop().await;
}

#[tokio::test]
async fn reload_swaps_the_pipeline_and_a_broken_file_keeps_the_old_one() {
    let vendor = FakeVendor::start().await;
    let app = spawn_app(&http_tag(&vendor, "[\"page_view\"]")).await;
    let send = |en: &'static str| {
        let (http, url) = (app.http.clone(), app.url(&hit(en)));
        async move {
            let r = http.get(url).send().await.unwrap();
            assert_eq!(r.status(), 204);
        }
    };
    send("page_view").await;
    vendor.wait_for(10, |r| r.len() == 1).await;

    // Change the trigger on disk and reload (what SIGHUP does).
    let path = app.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("[\"page_view\"]", "[\"purchase\"]")).unwrap();
    app.state.reload().expect("valid config reloads");
    send("page_view").await;
    send("purchase").await;
    let got = vendor.wait_for(10, |r| r.len() == 2).await;
    assert_eq!(got[1].json()["event_name"], "purchase");

    // A broken file is refused and the previous pipeline keeps serving.
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("events = ", "evnts = ")).unwrap();
    let err = app.state.reload().expect_err("broken config is refused");
    assert!(err.to_string().contains("unknown key `evnts`"), "{err}");
    send("purchase").await;
    let got = vendor.wait_for(10, |r| r.len() == 3).await;
    assert_eq!(got[2].json()["event_name"], "purchase");
    // The page_view sent under the new trigger never arrives: once the outbox owes nothing,
    // whatever that hit fired has been delivered.
    app.wait_until_drained().await;
    assert_eq!(vendor.received().len(), 3);
    assert!(vendor
        .received()
        .iter()
        .skip(1)
        .all(|r| r.json()["event_name"] == "purchase"));
    app.stop().await;
}

/// `[server] path_prefix = "/t"` (same-origin behind the site's proxy): every client answers
/// under the prefix and its events are delivered; the same paths outside it are not claimed.
#[tokio::test]
async fn path_prefix_mounts_every_client_under_it_and_nothing_outside() {
    let vendor = FakeVendor::start().await;
    let app = spawn_app_server(
        "trusted_proxies = [\"127.0.0.0/8\"]\npath_prefix = \"/t\"",
        &format!(
            "[[clients]]\ntype = \"ga4\"\n[[clients]]\ntype = \"measurement_protocol\"\n[[clients]]\ntype = \"data\"\n{}",
            http_tag(&vendor, "[\"*\"]")
        ),
    )
    .await;
    let mp = serde_json::json!({"client_id": "1.2", "events": [{"name": "refund", "params": {"event_id": "p-mp"}}]});
    let data = serde_json::json!({"event_name": "sign_up", "event_id": "p-data"});

    // Outside the prefix, first: nothing is claimed, nothing is enqueued.
    for path in [
        "/g/collect?v=2&tid=G-TEST1&cid=1.2&en=page_view&ep.event_id=out-ga4",
        "/tx/g/collect?v=2&tid=G-TEST1&cid=1.2&en=page_view&ep.event_id=out-tx",
        "/T/g/collect?v=2&tid=G-TEST1&cid=1.2&en=page_view&ep.event_id=out-case",
        "/t",
        "/tagrelay.js",
    ] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    for (path, body) in [("/mp/collect", &mp), ("/data", &data), ("/t/t/data", &data)] {
        let r = app
            .http
            .post(app.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }

    // Under it: each client claims its hits.
    let r = app
        .http
        .get(app.url(&format!("/t{}&ep.event_id=p-ga4", hit("page_view"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(
        r.headers().get("set-cookie").is_some(),
        "cookies are set under the prefix"
    );
    let r = app
        .http
        .post(app.url("/t/mp/collect?measurement_id=G-TEST1"))
        .json(&mp)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = app
        .http
        .post(app.url("/t/data"))
        .json(&data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .http
        .get(app.url("/t/tagrelay.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("tagrelay"));

    vendor.wait_for(10, |r| r.len() == 3).await;
    app.wait_until_drained().await;
    let mut ids: Vec<String> = vendor
        .received()
        .iter()
        .map(|r| r.json()["event_id"].as_str().unwrap_or("").to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["p-data", "p-ga4", "p-mp"]);
    app.stop().await;
}

/// `require_consent = true`: which `Set-Cookie`s a browser gets for each Consent Mode state.
/// The browser sends `_ga` and lands from an ad click (`fbclid`), so every cookie is due.
#[tokio::test]
async fn consent_mode_decides_exactly_which_cookies_are_set() {
    async fn cookie_names(app: &crate::helpers::TestApp, consent: &str) -> Vec<String> {
        let r = app
            .http
            .get(app.url(&format!(
                "/g/collect?v=2&tid=G-TEST1&cid=111.222&en=page_view&dl=https%3A%2F%2Fwww.example.com%2F%3Ffbclid%3DClick1{consent}"
            )))
            .header("host", "sgtm.example.com")
            .header("cookie", "_ga=GA1.1.111.222")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204, "{consent}");
        let mut names: Vec<String> = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| {
                let c = v.to_str().unwrap();
                assert!(c.contains("Domain=example.com"), "{c}");
                c.split('=').next().unwrap().to_owned()
            })
            .collect();
        names.sort();
        names
    }
    let all = ["FPID", "_fbc", "_fbp", "_ga"];
    let analytics = ["FPID", "_ga"];
    let ads = ["_fbc", "_fbp"];
    let none: [&str; 0] = [];

    async fn with_cookies(lines: &str) -> crate::helpers::TestApp {
        let dir = tempfile::tempdir().unwrap();
        let text = crate::helpers::test_config(dir.path(), "[[clients]]\ntype = \"ga4\"\n")
            .replace("[cookies]\n", &format!("[cookies]\n{lines}\n"));
        crate::helpers::spawn_with(dir, &text).await
    }
    let app = with_cookies("require_consent = true").await;
    for (consent, want) in [
        ("&gcs=G111", &all[..]),
        ("&gcs=G101", &analytics[..]), // ad_storage denied
        ("&gcs=G110", &ads[..]),       // analytics_storage denied
        ("&gcs=G100", &none[..]),
        // Consent Mode v2: `gcd` wins where definite (ad_storage denied by update here).
        ("&gcs=G111&gcd=13q3t3t2t5l1", &analytics[..]),
        ("&gcs=G100&gcd=13r3r3t2t5l1", &all[..]),
        // No signal: consent_default ("granted").
        ("", &all[..]),
    ] {
        assert_eq!(cookie_names(&app, consent).await, want, "{consent}");
    }
    app.stop().await;

    // With consent_default = "denied", a hit without signals sets nothing.
    let app = with_cookies("require_consent = true\nconsent_default = \"denied\"").await;
    assert_eq!(cookie_names(&app, "").await, none);
    assert_eq!(cookie_names(&app, "&gcs=G101").await, analytics);
    app.stop().await;

    // Without require_consent, the signals do not gate cookies.
    let app = with_cookies("").await;
    assert_eq!(cookie_names(&app, "&gcs=G100").await, all);
    app.stop().await;
}
