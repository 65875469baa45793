//! A real browser running the open-source GA4 library ga4mp sends hits to tagrelay; tagrelay
//! answers with a server-set, HttpOnly, first-party visitor cookie that the next hit carries.

use crate::browser::{npm_file, site, Browser};
use crate::helpers::{spawn_app, FakeVendor};

#[tokio::test]
async fn ga4mp_in_chromium_gets_a_first_party_visitor_cookie() {
    let vendor = FakeVendor::start().await;
    let app = spawn_app(&format!(
        r#"
[[clients]]
type = "ga4"

[[tags]]
name = "hook"
type = "http"
url = "{}/hook"
"#,
        vendor.url()
    ))
    .await;
    let tagrelay_port = app.addr.port();
    let page = format!(
        r#"<!doctype html><html><head><title>Trail Shoe</title>
<script src="/ga4mp.umd.js"></script></head><body><h1>shop</h1><script>
const t = ga4mp(["G-BROWSER1"], {{ endpoint: "http://sgtm.example.test:{tagrelay_port}/g/collect" }});
t.trackEvent("page_view");
t.trackEvent("sign_up", {{ method: "email" }});
window.jsClientId = t.getClientId();
</script></body></html>"#
    );
    let site_addr = site(vec![
        ("/", "text/html; charset=utf-8", page),
        (
            "/ga4mp.umd.js",
            "application/javascript",
            npm_file("@analytics-debugger/ga4mp/dist/ga4mp.umd.js"),
        ),
    ])
    .await;
    let browser = Browser::start().await;
    let home = format!("http://www.example.test:{}/", site_addr.port());

    browser.client.goto(&home).await.unwrap();
    let js_cid_1 = browser.wait_js(10, "window.jsClientId").await;
    let got = vendor.wait_for(20, |r| r.len() >= 2).await;
    let events: Vec<serde_json::Value> = got.iter().map(|r| r.json()).collect();
    let names: Vec<&str> = events
        .iter()
        .filter_map(|e| e["event_name"].as_str())
        .collect();
    assert!(
        names.contains(&"page_view") && names.contains(&"sign_up"),
        "{names:?}"
    );
    let sign_up = events
        .iter()
        .find(|e| e["event_name"] == "sign_up")
        .unwrap();
    assert_eq!(sign_up["params"]["method"], "email", "{sign_up}");
    assert_eq!(sign_up["ga"]["measurement_id"], "G-BROWSER1");
    assert_eq!(
        sign_up["page_location"],
        format!("http://www.example.test:{}/", site_addr.port())
    );
    assert!(sign_up["user_agent"].as_str().unwrap().contains("Chrome"));
    // First visit: the GA client id the page had is kept (migrate_from_ga).
    let first_client_id = events[0]["client_id"].as_str().unwrap().to_owned();
    assert_eq!(first_client_id, js_cid_1.as_str().unwrap());

    // The browser stored the server-set visitor cookie for the whole registrable domain.
    let cookies = browser.client.get_all_cookies().await.unwrap();
    let fpid = cookies
        .iter()
        .find(|c| c.name() == "FPID")
        .unwrap_or_else(|| panic!("no FPID cookie in {cookies:?}"));
    assert_eq!(
        fpid.domain().map(|d| d.trim_start_matches('.')),
        Some("example.test")
    );
    assert_eq!(fpid.http_only(), Some(true));
    assert!(fpid.value().starts_with("FPID2.2."), "{}", fpid.value());
    // HttpOnly: invisible to the page's scripts.
    let script_cookies = browser.eval("return document.cookie;").await;
    assert!(!script_cookies.as_str().unwrap_or("").contains("FPID"));

    // Next page load: ga4mp mints a new JS client id, but the cookie keeps the visitor.
    vendor.clear();
    browser.client.goto(&home).await.unwrap();
    let js_cid_2 = browser.wait_js(10, "window.jsClientId").await;
    assert_ne!(
        js_cid_1, js_cid_2,
        "ga4mp does not persist its id; the cookie must"
    );
    let got = vendor.wait_for(20, |r| r.len() >= 2).await;
    for r in &got {
        let e = r.json();
        assert_eq!(e["client_id"], first_client_id.as_str(), "{e}");
        assert_eq!(e["ga"]["js_client_id"], js_cid_2, "{e}");
    }
    app.stop().await;
}
