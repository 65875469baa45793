//! A hit goes in, the fake vendor gets the event: client IP, reload.

use std::time::Duration;

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
    // The page_view sent under the new trigger never arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(vendor
        .received()
        .iter()
        .skip(1)
        .all(|r| r.json()["event_name"] == "purchase"));
    app.stop().await;
}
