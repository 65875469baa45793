//! A real browser lands on a page from an ad click (`?gclid=…&ttclid=…`): tagrelay sets the
//! platforms' first-party cookies, readable by their own scripts, and a purchase on a later
//! page (no click id in its URL) reaches Google Ads and TikTok with those click ids.

use crate::ad_platforms::{credentials_file, tags_config, token_server, FakeDataManager};
use crate::browser::{npm_file, site, Browser};
use crate::helpers::{spawn_app, FakeVendor};

#[tokio::test]
async fn a_landing_with_click_ids_gets_their_cookies_and_a_later_purchase_carries_them() {
    let token = token_server().await;
    let dm = FakeDataManager::start().await;
    let tiktok = FakeVendor::start().await;
    tiktok.respond(&[(200, r#"{"code":0,"message":"OK"}"#)]);
    let creds_dir = tempfile::tempdir().unwrap();
    let creds = credentials_file(creds_dir.path(), &token);
    let app = spawn_app(&tags_config(&creds, &dm, &tiktok, "")).await;
    let endpoint = format!("http://sgtm.example.test:{}/g/collect", app.addr.port());
    let page = |script: &str| {
        format!(
            r#"<!doctype html><html><head><title>Shop</title>
<script src="/ga4mp.umd.js"></script></head><body><h1>shop</h1><script>
const t = ga4mp(["G-ADS1"], {{ endpoint: "{endpoint}" }});
{script}
window.sent = true;
</script></body></html>"#
        )
    };
    let site_addr = site(vec![
        (
            "/landing",
            "text/html; charset=utf-8",
            page(r#"t.trackEvent("page_view");"#),
        ),
        (
            "/checkout",
            "text/html; charset=utf-8",
            page(
                r#"t.trackEvent("purchase", { transaction_id: "T-BROWSER-1", event_id: "ev-browser-1" });"#,
            ),
        ),
        (
            "/ga4mp.umd.js",
            "application/javascript",
            npm_file("@analytics-debugger/ga4mp/dist/ga4mp.umd.js"),
        ),
    ])
    .await;
    let origin = format!("http://www.example.test:{}", site_addr.port());
    let browser = Browser::start().await;

    browser
        .client
        .goto(&format!(
            "{origin}/landing?gclid=Cj0KCQiA-browser_1&ttclid=E.C.P.browser-2"
        ))
        .await
        .unwrap();
    browser.wait_js(10, "window.sent").await;
    // The cookies arrive with the answer to the page view's hit.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let cookies = loop {
        let cookies = browser.client.get_all_cookies().await.unwrap();
        if cookies.iter().any(|c| c.name() == "_gcl_aw")
            && cookies.iter().any(|c| c.name() == "ttclid")
        {
            break cookies;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no click-id cookies in {cookies:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let gcl = cookies.iter().find(|c| c.name() == "_gcl_aw").unwrap();
    assert!(
        gcl.value().starts_with("GCL.") && gcl.value().ends_with(".Cj0KCQiA-browser_1"),
        "{}",
        gcl.value()
    );
    assert_eq!(
        gcl.domain().map(|d| d.trim_start_matches('.')),
        Some("example.test")
    );
    let ttclid = cookies.iter().find(|c| c.name() == "ttclid").unwrap();
    assert_eq!(ttclid.value(), "E.C.P.browser-2");
    // Not HttpOnly: gtag and TikTok's pixel on the page read them.
    let script_cookies = browser.eval("return document.cookie;").await;
    let script_cookies = script_cookies.as_str().unwrap_or_default();
    assert!(
        script_cookies.contains("_gcl_aw=GCL.")
            && script_cookies.contains("ttclid=E.C.P.browser-2"),
        "{script_cookies}"
    );

    // A later page without click ids: the purchase carries them from the cookies.
    browser
        .client
        .goto(&format!("{origin}/checkout"))
        .await
        .unwrap();
    browser.wait_js(10, "window.sent").await;
    let got = tiktok.wait_for(20, |r| !r.is_empty()).await;
    let d = &got[0].json()["data"][0];
    assert_eq!(d["event"], "CompletePayment", "{d}");
    assert_eq!(d["user"]["ttclid"], "E.C.P.browser-2", "{d}");
    assert_eq!(d["page"]["url"], format!("{origin}/checkout"));
    let got = dm
        .wait_for(20, |r| {
            r.iter().any(|x| x.uri.path() == "/v1/events:ingest")
        })
        .await;
    let ingest = got
        .iter()
        .find(|r| r.uri.path() == "/v1/events:ingest")
        .unwrap();
    let ev = &ingest.json()["events"][0];
    assert_eq!(ev["adIdentifiers"]["gclid"], "Cj0KCQiA-browser_1", "{ev}");
    assert_eq!(ev["transactionId"], "T-BROWSER-1");
    app.stop().await;
}
