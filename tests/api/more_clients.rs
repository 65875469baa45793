//! The data client with its first-party snippet in a real browser, and Measurement Protocol
//! events through the same tags.

use crate::browser::{site, Browser};
use crate::helpers::{spawn_app, spawn_app_server, FakeVendor, TestApp};

fn tags(ga4: &FakeVendor, meta: &FakeVendor) -> String {
    format!(
        r#"
[[tags]]
name = "ga4"
type = "ga4"
endpoint = "{}"
measurement_id = "G-SNIPPET1"

[[tags]]
name = "meta"
type = "meta_capi"
endpoint = "{}"
pixel_id = "4455"
access_token = "token-more-clients"
"#,
        ga4.url(),
        meta.url()
    )
}

#[tokio::test]
async fn the_snippet_returns_the_event_id_that_meta_receives() {
    let (ga4, meta) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app_server(
        "trusted_proxies = [\"127.0.0.0/8\"]",
        &format!("[[clients]]\ntype = \"data\"\n{}", tags(&ga4, &meta)),
    )
    .await;
    let port = app.addr.port();
    let page = format!(
        r#"<!doctype html><html><head><title>Checkout</title>
<script src="http://sgtm.example.test:{port}/tagrelay.js"></script></head><body><script>
window.result = null;
tagrelay.track("purchase", {{
  value: 99.5, currency: "EUR", transaction_id: "T-SNIP-1",
  items: [{{ item_id: "SKU-9", item_name: "Lamp", price: 99.5, quantity: 1 }}],
  user_data: {{ email_address: " Jane.Doe@Example.com " }}
}}).then(id => {{ window.result = id; }}, err => {{ window.result = "error: " + err; }});
</script></body></html>"#
    );
    let site_addr = site(vec![("/checkout", "text/html; charset=utf-8", page)]).await;
    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!(
            "http://www.example.test:{}/checkout?fbclid=AbCd123",
            site_addr.port()
        ))
        .await
        .unwrap();
    let id = browser.wait_js(15, "window.result").await;
    let id = id.as_str().unwrap().to_owned();
    assert!(!id.starts_with("error"), "{id}");

    let got = meta.wait_for(15, |r| !r.is_empty()).await;
    let ev = &got[0].json()["data"][0];
    assert_eq!(
        ev["event_id"],
        id.as_str(),
        "the browser and Meta share the event id: {ev}"
    );
    assert_eq!(ev["event_name"], "Purchase");
    assert_eq!(ev["custom_data"]["order_id"], "T-SNIP-1");
    assert!(ev["event_source_url"]
        .as_str()
        .unwrap()
        .contains("/checkout?fbclid=AbCd123"));
    assert!(
        ev["user_data"]["fbc"]
            .as_str()
            .unwrap()
            .ends_with(".AbCd123"),
        "{ev}"
    );
    // Normalized (trimmed, lower-cased) then hashed.
    assert_eq!(ev["user_data"]["em"][0], sha256_hex("jane.doe@example.com"));
    let ga = ga4.wait_for(15, |r| !r.is_empty()).await;
    let all = format!("{}&{}", ga[0].uri.query().unwrap_or(""), ga[0].body_text());
    assert!(
        all.contains("tid=G-SNIPPET1") && all.contains("en=purchase"),
        "{all}"
    );
    assert!(!all.contains("jane"), "GA4 never receives user data: {all}");
    // In any case, any encoding, nor hashed (the browser sent ` Jane.Doe@Example.com `).
    let decoded: String = tagrelay::clients::ga4::parse_query_pairs(&all.replace("\r\n", "&"))
        .expect("GA4 request is well encoded")
        .iter()
        .map(|(k, v)| format!("{k}={v}&"))
        .collect();
    for text in [all.to_lowercase(), decoded.to_lowercase()] {
        for needle in ["jane", "%40example.com", "@example.com"] {
            assert!(
                !text.contains(needle),
                "GA4 got user data ({needle}): {all}"
            );
        }
        assert!(
            !text.contains(&sha256_hex("jane.doe@example.com")),
            "GA4 got the hashed email: {all}"
        );
    }
    app.stop().await;
}

fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// The shop's site sends GA4 hits; its backend, Measurement Protocol events.
const SHOP_CLIENTS: &str = r#"
[[clients]]
type = "ga4"

[[clients]]
type = "measurement_protocol"
api_secrets = ["mp-secret-1"]
"#;

/// A browser's page view on the shop's home page, through the GA4 client.
async fn shop_page_view(app: &TestApp) {
    let r = app
        .http
        .get(app.url(
            "/g/collect?v=2&tid=G-SNIPPET1&cid=111.222&en=page_view&dl=https%3A%2F%2Fshop.example.com%2F",
        ))
        .header("user-agent", "Mozilla/5.0 (X11; Linux x86_64)")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

/// Events the shop's backend reports through the Measurement Protocol client, for customer
/// `crm-42`: no page, no browser.
async fn backend_sends(app: &TestApp, events: serde_json::Value) {
    let r = app
        .http
        .post(app.url("/mp/collect?measurement_id=G-SNIPPET1&api_secret=mp-secret-1"))
        .json(&serde_json::json!({
            "client_id": "111.222",
            "user_id": "crm-42",
            "events": events
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

#[tokio::test]
async fn a_backends_purchase_reaches_meta_as_system_generated_beside_the_website_tag() {
    let (web, backend) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app(&format!(
        r#"{SHOP_CLIENTS}
[[tags]]
name = "meta_web"
type = "meta_capi"
endpoint = "{}"
pixel_id = "4455"
access_token = "token-web"
[tags.trigger]
exceptions = [{{ field = "source", equals = "measurement_protocol" }}]

[[tags]]
name = "meta_backend"
type = "meta_capi"
endpoint = "{}"
pixel_id = "4455"
access_token = "token-backend"
action_source = "system_generated"
[tags.trigger]
conditions = [{{ field = "source", equals = "measurement_protocol" }}]
"#,
        web.url(),
        backend.url()
    ))
    .await;
    shop_page_view(&app).await;
    // No page, no browser: only what the shop's backend knows.
    backend_sends(
        &app,
        serde_json::json!([{
            "name": "purchase",
            "params": { "transaction_id": "T-BACK-1", "value": 12.0, "currency": "EUR" }
        }]),
    )
    .await;

    let got = backend.wait_for(10, |r| !r.is_empty()).await;
    let ev = &got[0].json()["data"][0];
    assert_eq!(ev["event_name"], "Purchase");
    assert_eq!(ev["action_source"], "system_generated");
    assert!(ev.get("event_source_url").is_none(), "{ev}");
    assert_eq!(ev["user_data"]["external_id"][0], sha256_hex("crm-42"));
    assert_eq!(ev["custom_data"]["order_id"], "T-BACK-1");
    let got = web.wait_for(10, |r| !r.is_empty()).await;
    let ev = &got[0].json()["data"][0];
    assert_eq!(ev["event_name"], "PageView");
    assert_eq!(ev["action_source"], "website");
    assert_eq!(ev["event_source_url"], "https://shop.example.com/");
    // Each tag saw only its own source: once the outbox owes nothing, everything either hit
    // fired has been sent.
    app.wait_until_drained().await;
    assert_eq!(backend.received().len(), 1);
    assert_eq!(web.received().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn one_meta_tag_takes_the_site_and_a_backend_that_names_its_action_source() {
    let meta = FakeVendor::start().await;
    let app = spawn_app(&format!(
        r#"{SHOP_CLIENTS}
[[tags]]
name = "meta"
type = "meta_capi"
endpoint = "{}"
pixel_id = "4455"
access_token = "token-web"
action_source_from_event = true
"#,
        meta.url()
    ))
    .await;
    shop_page_view(&app).await;
    // A till sale the shop's backend reports, and one it mislabels.
    backend_sends(
        &app,
        serde_json::json!([
            { "name": "purchase", "params": {
                "transaction_id": "T-TILL-1", "value": 12.0, "currency": "EUR",
                "action_source": "physical_store" } },
            { "name": "purchase", "params": {
                "transaction_id": "T-TILL-2", "value": 13.0, "currency": "EUR",
                "action_source": "shop" } }
        ]),
    )
    .await;

    let got = meta
        .wait_for(10, |r| {
            r.iter()
                .map(|r| r.json()["data"].as_array().map_or(0, Vec::len))
                .sum::<usize>()
                >= 2
        })
        .await;
    let mut events: Vec<serde_json::Value> = got
        .iter()
        .flat_map(|r| r.json()["data"].as_array().cloned().unwrap_or_default())
        .collect();
    events.sort_by_key(|e| e["event_name"].as_str().unwrap_or("").to_owned());
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["event_name"], "PageView");
    assert_eq!(events[0]["action_source"], "website");
    assert_eq!(events[1]["event_name"], "Purchase");
    assert_eq!(events[1]["action_source"], "physical_store");
    assert_eq!(events[1]["custom_data"]["order_id"], "T-TILL-1");
    assert!(events[1].get("event_source_url").is_none(), "{}", events[1]);
    // The mislabelled sale is a dead letter that says why, not a failed batch.
    let dead = app.wait_for_dead_letters(1).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0]["reason"]
            .as_str()
            .unwrap()
            .contains("unknown variant `shop`"),
        "{dead:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn measurement_protocol_events_reach_ga4_and_meta_through_the_same_tags() {
    let (ga4, meta) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app(&format!(
        "[[clients]]\ntype = \"measurement_protocol\"\napi_secrets = [\"mp-secret-1\"]\n{}",
        tags(&ga4, &meta)
    ))
    .await;
    let body = serde_json::json!({
        "client_id": "777.888",
        "user_id": "crm-42",
        "ip_override": "198.51.100.9",
        "user_agent": "Mozilla/5.0 (iPhone) Safari/604.1",
        "events": [{
            "name": "purchase",
            "params": {
                "transaction_id": "T-MP-1", "value": 30.5, "currency": "USD",
                "session_id": "1764912991", "engagement_time_msec": 100,
                "page_location": "https://shop.example.com/done",
                "items": [{ "item_id": "SKU-1", "price": 30.5, "quantity": 1 }]
            }
        }]
    });
    let r = app
        .http
        .post(app.url("/mp/collect?measurement_id=G-SNIPPET1&api_secret=wrong"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .http
        .post(app.url("/mp/collect?measurement_id=G-SNIPPET1&api_secret=mp-secret-1"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(
        r.headers().get("set-cookie").is_none(),
        "server-to-server: no cookies"
    );

    let got = meta.wait_for(10, |r| !r.is_empty()).await;
    let ev = &got[0].json()["data"][0];
    assert_eq!(ev["event_name"], "Purchase");
    assert_eq!(ev["user_data"]["client_ip_address"], "198.51.100.9");
    assert_eq!(ev["custom_data"]["order_id"], "T-MP-1");
    assert_eq!(ev["user_data"]["external_id"][0], sha256_hex("crm-42"));
    let got = ga4.wait_for(10, |r| !r.is_empty()).await;
    let all = format!(
        "{}&{}",
        got[0].uri.query().unwrap_or(""),
        got[0].body_text()
    );
    assert!(
        all.contains("cid=777.888") && all.contains("en=purchase"),
        "{all}"
    );
    assert!(all.contains("_uip=198.51.100.9"), "{all}");

    // The validation endpoint answers like Google's and forwards nothing.
    let r = app
        .http
        .post(app.url("/debug/mp/collect?measurement_id=G-SNIPPET1&api_secret=mp-secret-1"))
        .json(&serde_json::json!({"client_id": "1.2", "events": [{"name": "_bad name"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["validationMessages"][0]["validationCode"], "NAME_INVALID",
        "{v}"
    );
    app.stop().await;
}
