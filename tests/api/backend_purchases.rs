//! Backend purchases end to end: browser hits into the real server, then signed order
//! webhooks (Shopify, WooCommerce, Stripe) built here from known secrets the way each
//! platform signs, and fake GA4 (Measurement Protocol), Meta and Google Data Manager
//! endpoints on loopback that show what each order became.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::ad_platforms::{credentials_file, token_server, FakeDataManager};
use crate::helpers::{spawn_app, FakeVendor, Received, TestApp};

const SHOPIFY_SECRET: &str = "shopify-signing-secret-e2e";
const WOO_SECRET: &str = "woo-signing-secret-e2e";
const STRIPE_SECRET: &str = "whsec_e2e_0123456789abcdef";
const BROWSER_UA: &str =
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148";
const BROWSER_IP: &str = "198.51.100.7";

struct Vendors {
    ga4: FakeVendor,
    meta: FakeVendor,
    dm: FakeDataManager,
    _token: FakeVendor,
    _creds: tempfile::TempDir,
    creds: String,
}

impl Vendors {
    async fn start() -> Vendors {
        let token = token_server().await;
        let dm = FakeDataManager::start().await;
        let creds_dir = tempfile::tempdir().unwrap();
        let creds = credentials_file(creds_dir.path(), &token);
        Vendors {
            ga4: FakeVendor::start().await,
            meta: FakeVendor::start().await,
            dm,
            _token: token,
            _creds: creds_dir,
            creds,
        }
    }

    /// A Shopify shop's setup (the README's): GA4 over the Measurement Protocol, Meta for the
    /// website and a second Meta tag for orders no session matched, Google Ads.
    fn config(&self, extra: &str) -> String {
        format!(
            r#"
[admin]
trace_sampling = "all"
{extra}

[[clients]]
type = "ga4"

[[clients]]
type = "data"

[[clients]]
type = "shopify"
path = "/webhooks/shopify"
secret = "{SHOPIFY_SECRET}"

[[clients]]
type = "woocommerce"
path = "/webhooks/woocommerce"
secret = "{WOO_SECRET}"

[[clients]]
type = "stripe"
path = "/webhooks/stripe"
secret = "{STRIPE_SECRET}"

[[tags]]
name = "ga4"
type = "ga4"
mode = "measurement_protocol"
endpoint = "{ga4}"
measurement_id = "G-SHOP1"
api_secret = "mp-secret"
[tags.trigger]
events = ["purchase", "refund"]

# The same orders as a /g/collect hit (collect mode), to the same fake.
[[tags]]
name = "ga4_collect"
type = "ga4"
endpoint = "{ga4}"
measurement_id = "G-SHOP1"
[tags.trigger]
events = ["purchase", "refund"]

[[tags]]
name = "meta_web"
type = "meta_capi"
endpoint = "{meta}"
pixel_id = "111"
access_token = "meta-token"
[tags.trigger]
events = ["purchase"]
exceptions = [{{ field = "stitch.status", equals = "unstitched" }}]

[[tags]]
name = "meta_backend"
type = "meta_capi"
endpoint = "{meta}"
pixel_id = "222"
access_token = "meta-token"
action_source = "system_generated"
[tags.trigger]
events = ["purchase"]
conditions = [{{ field = "stitch.status", equals = "unstitched" }}]

[[tags]]
name = "google_ads"
type = "google_ads"
credentials_file = "{creds}"
operating_account_id = "1234567890"
conversion_action_id = "987654321"
endpoint = "{dm}"
status_poll_interval_ms = 20
[tags.trigger]
events = ["purchase"]
"#,
            ga4 = self.ga4.url(),
            meta = self.meta.url(),
            dm = self.dm.url(),
            creds = self.creds,
        )
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An RFC 3339 time `ago` seconds before now, with Shopify's kind of offset.
fn rfc3339(ago: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(now_s() - ago)
        .unwrap()
        .to_offset(time::UtcOffset::from_hms(-5, 0, 0).unwrap());
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn sha256(s: &str) -> String {
    use sha2::Digest;
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn hmac(secret: &str, message: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(message);
    m.finalize().into_bytes().to_vec()
}

/// A GA4 hit from the visitor's browser; returns the cookies it set as `name=value`.
async fn ga4(app: &TestApp, query: &str, jar: &[String]) -> Vec<String> {
    let mut req = app
        .http
        .get(app.url(&format!("/g/collect?v=2&tid=G-SHOP1&cid=11.22&{query}")))
        .header("user-agent", BROWSER_UA)
        .header("x-forwarded-for", BROWSER_IP);
    if !jar.is_empty() {
        req = req.header("cookie", jar.join("; "));
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 204);
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_owned))
        .collect()
}

/// The Shopify order of the documentation's example, for this test's tokens and times.
fn shopify_order(id: u64, checkout_token: &str, email: &str) -> Value {
    json!({
        "id": id,
        "name": format!("#{}", id % 10_000),
        "order_number": id % 10_000,
        "email": email,
        "browser_ip": "216.191.105.146",
        "client_details": {"browser_ip": "216.191.105.146", "user_agent": "Order-Placing Browser/1.0"},
        "landing_site": "/?gclid=Cj0-ORDER-LANDING",
        "cart_token": format!("cart-{id}"),
        "checkout_token": checkout_token,
        "created_at": rfc3339(90),
        "processed_at": rfc3339(60),
        "currency": "EUR",
        "financial_status": "paid",
        "test": false,
        "total_price": "134.00",
        "total_tax": "21.40",
        "total_shipping_price_set": {"shop_money": {"amount": "4.90", "currency_code": "EUR"}},
        "discount_codes": [{"code": "WELCOME10", "amount": "10.00", "type": "fixed_amount"}],
        "line_items": [{
            "id": 1, "product_id": 632910392, "variant_id": 39072856, "sku": "SHOE-42",
            "title": "Trail Shoe", "variant_title": "42", "vendor": "Acme",
            "price": "64.55", "quantity": 2, "total_discount": "0.00"
        }],
        "billing_address": {"first_name": "Ada", "last_name": "Lovelace", "city": "London",
                            "zip": "N1 9GU", "country_code": "GB"},
        "customer": {"id": 7, "email": email}
    })
}

/// Posts a Shopify webhook signed with `secret`; returns status and body.
async fn shopify(app: &TestApp, topic: &str, body: &Value, secret: &str) -> (u16, Value) {
    let bytes = serde_json::to_vec(body).unwrap();
    let sig = base64::engine::general_purpose::STANDARD.encode(hmac(secret, &bytes));
    let r = app
        .http
        .post(app.url("/webhooks/shopify"))
        .header("content-type", "application/json")
        .header("x-shopify-topic", topic)
        .header("x-shopify-hmac-sha256", sig)
        .header("x-shopify-shop-domain", "shop.example.com")
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The GA4 Measurement Protocol events received, each with its request's top level.
fn ga4_events(got: &[Received]) -> Vec<(Value, Value)> {
    got.iter()
        .filter(|r| r.uri.path() == "/mp/collect")
        .flat_map(|r| {
            let body = r.json();
            body["events"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |e| (body.clone(), e))
        })
        .collect()
}

/// Meta's events for `pixel`.
fn meta_events(got: &[Received], pixel: &str) -> Vec<Value> {
    got.iter()
        .filter(|r| r.uri.path().contains(&format!("/{pixel}/events")))
        .flat_map(|r| r.json()["data"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn dm_events(dm: &FakeDataManager) -> Vec<Value> {
    dm.received()
        .iter()
        .filter(|r| r.uri.path() == "/v1/events:ingest")
        .flat_map(|r| r.json()["events"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The stitching part of the event a webhook's trace shows, once there is one.
async fn traced_stitch(app: &TestApp, client: &str) -> Value {
    let all: Value = app
        .http
        .get(app.admin_url("/debug/api/traces?limit=50"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t = all["traces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["client"] == client && t["events"][0].is_object())
        .unwrap_or_else(|| panic!("no {client} trace: {all}"))
        .clone();
    t["events"][0]["stitch"].clone()
}

#[tokio::test]
async fn a_shopify_order_is_stitched_to_the_session_that_clicked_the_ads() {
    let v = Vendors::start().await;
    let app = spawn_app(&v.config("")).await;

    // The visit: a landing from an ad (gclid and fbclid), then the checkout, which carries
    // Shopify's checkout token as the transaction id.
    let landing =
        "https://shop.example.com/p/trail-shoe?gclid=Cj0-SESSION-CLICK&fbclid=IwAR-session-click";
    let set = ga4(
        &app,
        &format!("en=page_view&sid=1767000100&sct=2&dl={}", enc(landing)),
        &[],
    )
    .await;
    assert!(set.iter().any(|c| c.starts_with("_fbc=")), "{set:?}");
    let fbc = set
        .iter()
        .find_map(|c| c.strip_prefix("_fbc="))
        .unwrap()
        .to_owned();
    let fbp = set
        .iter()
        .find_map(|c| c.strip_prefix("_fbp="))
        .unwrap()
        .to_owned();
    let token = "bd5a8aa1ecd019dd3520ff791ee3a24c";
    ga4(
        &app,
        &format!(
            "en=begin_checkout&sid=1767000100&sct=2&ep.transaction_id={token}&dl={}",
            enc("https://shop.example.com/checkouts/cn/abc")
        ),
        &set,
    )
    .await;

    // Minutes later Shopify sends the paid order, from its servers.
    let order = shopify_order(5_550_001, token, "Ada@Example.com");
    let (status, body) = shopify(&app, "orders/paid", &order, SHOPIFY_SECRET).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"][0]["event_id"], "purchase-5550001", "{body}");

    // GA4: the session's client id and session id, so the order joins the visit.
    let got = v
        .ga4
        .wait_for(10, |r| {
            ga4_events(r).iter().any(|(_, e)| e["name"] == "purchase")
        })
        .await;
    let (top, ev) = ga4_events(&got)
        .into_iter()
        .find(|(_, e)| e["name"] == "purchase")
        .unwrap();
    assert_eq!(top["client_id"], "11.22", "{top}");
    assert_eq!(ev["params"]["session_id"], "1767000100", "{ev}");
    assert_eq!(ev["params"]["transaction_id"], "5550001");
    assert_eq!(ev["params"]["value"], 134.0);
    assert_eq!(ev["params"]["currency"], "EUR");
    assert_eq!(ev["params"]["items"][0]["item_id"], "SHOE-42");
    assert_eq!(top["ip_override"], BROWSER_IP, "the session's IP");
    assert_eq!(top["user_agent"], BROWSER_UA);
    // In collect mode: a hit of the visit, with its client id, session, IP and User-Agent.
    let got = v
        .ga4
        .wait_for(10, |r| r.iter().any(|x| x.uri.path() == "/g/collect"))
        .await;
    let hit = got.iter().find(|x| x.uri.path() == "/g/collect").unwrap();
    let q: std::collections::HashMap<String, String> = hit
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .chain(hit.body_text().split('&').map(|s| s.trim()))
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            let d = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (d(k), d(v))
        })
        .collect();
    assert_eq!(q["en"], "purchase", "{q:?}");
    assert_eq!(q["cid"], "11.22");
    assert_eq!(q["sid"], "1767000100");
    assert_eq!(q["sct"], "2");
    assert_eq!(q["_uip"], BROWSER_IP);
    assert_eq!(q["ep.transaction_id"], "5550001");
    assert_eq!(q["dl"], "https://shop.example.com/checkouts/cn/abc");
    assert_eq!(hit.headers["user-agent"], BROWSER_UA);

    // Meta (website): the session's fbc, fbp, IP and User-Agent, the order's event id.
    let got = v
        .meta
        .wait_for(10, |r| !meta_events(r, "111").is_empty())
        .await;
    let m = &meta_events(&got, "111")[0];
    assert_eq!(m["event_name"], "Purchase");
    assert_eq!(m["event_id"], "purchase-5550001");
    assert_eq!(m["action_source"], "website");
    assert_eq!(
        m["event_source_url"],
        "https://shop.example.com/checkouts/cn/abc"
    );
    let u = &m["user_data"];
    assert_eq!(u["fbc"], fbc.as_str());
    assert_eq!(u["fbp"], fbp.as_str());
    assert_eq!(u["client_ip_address"], BROWSER_IP);
    assert_eq!(u["client_user_agent"], BROWSER_UA);
    assert_eq!(
        u["em"][0],
        sha256("ada@example.com"),
        "the order's email, hashed"
    );
    assert!(
        meta_events(&got, "222").is_empty(),
        "a stitched order is the website's"
    );

    // Google Ads: the session's click, not the order's landing page.
    v.dm.wait_for(10, |r| {
        r.iter().any(|x| x.uri.path() == "/v1/events:ingest")
    })
    .await;
    let g = &dm_events(&v.dm)[0];
    assert_eq!(
        g["adIdentifiers"],
        json!({"gclid": "Cj0-SESSION-CLICK"}),
        "{g}"
    );
    assert_eq!(g["transactionId"], "5550001");
    assert_eq!(g["conversionValue"], 134.0);

    // The debug view shows what was stitched, from which key.
    let st = traced_stitch(&app, "shopify").await;
    assert_eq!(st["status"], "stitched", "{st}");
    assert_eq!(st["key"], "checkout_token");
    assert_eq!(st["matched_event"], "begin_checkout");
    assert!(
        st.get("lookup").is_none(),
        "looked-up values are not kept: {st}"
    );

    // An order whose tokens the visit never sent is still found by the ad click its landing
    // site repeats (the landing page view recorded the visit under it).
    let mut order = shopify_order(5_550_010, "unknown-checkout", "other@example.com");
    order["landing_site"] =
        json!("/p/trail-shoe?gclid=Cj0-SESSION-CLICK&fbclid=IwAR-session-click");
    assert_eq!(
        shopify(&app, "orders/paid", &order, SHOPIFY_SECRET).await.0,
        200
    );
    let got = v
        .ga4
        .wait_for(10, |r| {
            ga4_events(r)
                .iter()
                .any(|(_, e)| e["params"]["transaction_id"] == "5550010")
        })
        .await;
    let (top, _) = ga4_events(&got)
        .into_iter()
        .find(|(_, e)| e["params"]["transaction_id"] == "5550010")
        .unwrap();
    assert_eq!(top["client_id"], "11.22", "{top}");
    let all: Value = app
        .http
        .get(app.admin_url("/debug/api/traces?limit=50"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let st = all["traces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["events"][0]["transaction_id"] == "5550010")
        .map(|t| t["events"][0]["stitch"].clone())
        .unwrap();
    assert_eq!(st["key"], "landing_site", "{st}");
    assert_eq!(st["matched_event"], "page_view");
    app.stop().await;
}

#[tokio::test]
async fn an_order_no_session_matches_goes_out_unstitched_with_what_it_carries() {
    let v = Vendors::start().await;
    let app = spawn_app(&v.config("")).await;
    let order = shopify_order(5_550_002, "no-such-checkout", "nobody@example.com");
    let (status, body) = shopify(&app, "orders/paid", &order, SHOPIFY_SECRET).await;
    assert_eq!(status, 200, "{body}");

    // Meta: only the tag for server events, with the order's own browser facts.
    let got = v
        .meta
        .wait_for(10, |r| !meta_events(r, "222").is_empty())
        .await;
    let m = &meta_events(&got, "222")[0];
    assert_eq!(m["action_source"], "system_generated");
    assert_eq!(m["event_id"], "purchase-5550002");
    assert_eq!(m["user_data"]["client_ip_address"], "216.191.105.146");
    assert_eq!(
        m["user_data"]["client_user_agent"],
        "Order-Placing Browser/1.0"
    );
    // GA4 still counts the revenue, under a client id derived from the order.
    let got = v
        .ga4
        .wait_for(10, |r| {
            ga4_events(r).iter().any(|(_, e)| e["name"] == "purchase")
        })
        .await;
    let (top, ev) = ga4_events(&got).remove(0);
    let cid = top["client_id"].as_str().unwrap();
    assert_ne!(cid, "11.22");
    assert!(cid.split('.').all(|p| p.len() == 10), "{cid}");
    assert!(
        ev["params"].get("session_id").is_none(),
        "no session to join"
    );
    // Google Ads: the click id of the order's landing page.
    v.dm.wait_for(10, |r| {
        r.iter().any(|x| x.uri.path() == "/v1/events:ingest")
    })
    .await;
    assert_eq!(
        dm_events(&v.dm)[0]["adIdentifiers"],
        json!({"gclid": "Cj0-ORDER-LANDING"})
    );
    app.wait_until_drained().await;
    assert!(
        meta_events(&v.meta.received(), "111").is_empty(),
        "not the website tag's"
    );
    let st = traced_stitch(&app, "shopify").await;
    assert_eq!(st["status"], "unstitched", "{st}");
    assert_eq!(
        st["tried"],
        json!([
            "checkout_token",
            "cart_token",
            "id",
            "name",
            "landing_site",
            "customer.id",
            "email"
        ])
    );
    app.stop().await;
}

#[tokio::test]
async fn the_same_webhook_three_times_is_one_delivery_per_tag() {
    let v = Vendors::start().await;
    let app = spawn_app(&v.config("")).await;
    let order = shopify_order(5_550_003, "ck-3", "three@example.com");
    for topic in ["orders/paid", "orders/paid", "orders/create"] {
        let (status, body) = shopify(&app, topic, &order, SHOPIFY_SECRET).await;
        assert_eq!(status, 200, "{body}");
    }
    // And the same webhook three times at once.
    let order = shopify_order(5_550_004, "ck-4", "four@example.com");
    let sends = (0..3).map(|_| shopify(&app, "orders/paid", &order, SHOPIFY_SECRET));
    let answers = futures_util::future::join_all(sends).await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    assert!(ok >= 1, "{answers:?}");
    for (status, body) in &answers {
        // One takes it; one racing it may be told to come back (then it is a duplicate).
        assert!(*status == 200 || *status == 503, "{status} {body}");
    }
    for (status, _) in answers.iter().filter(|(s, _)| *s == 503) {
        assert_eq!(*status, 503);
        let (again, _) = shopify(&app, "orders/paid", &order, SHOPIFY_SECRET).await;
        assert_eq!(again, 200);
    }
    app.wait_until_drained().await;
    let purchases = |ids: &[&str]| {
        let ga4: Vec<_> = ga4_events(&v.ga4.received())
            .into_iter()
            .filter(|(_, e)| e["name"] == "purchase")
            .map(|(_, e)| e["params"]["transaction_id"].as_str().unwrap().to_owned())
            .collect();
        let meta: Vec<_> = meta_events(&v.meta.received(), "222")
            .iter()
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect();
        let google: Vec<_> = dm_events(&v.dm)
            .iter()
            .map(|e| e["transactionId"].as_str().unwrap().to_owned())
            .collect();
        for id in ids {
            assert_eq!(
                ga4.iter().filter(|t| t == id).count(),
                1,
                "GA4 {id}: {ga4:?}"
            );
            assert_eq!(
                meta.iter()
                    .filter(|t| **t == format!("purchase-{id}"))
                    .count(),
                1,
                "Meta {id}: {meta:?}"
            );
            assert_eq!(
                google.iter().filter(|t| t == id).count(),
                1,
                "Google {id}: {google:?}"
            );
        }
    };
    purchases(&["5550003", "5550004"]);
    let metrics = app.admin_text("/metrics").await;
    assert!(
        metrics.contains(r#"tagrelay_stitch_orders_total{client="shopify",result="duplicate"}"#),
        "{metrics}"
    );
    app.stop().await;
}

fn stripe_session_event(reference: &str, pi: &str) -> Value {
    json!({
        "id": "evt_e2e_1", "object": "event", "api_version": "2024-06-20",
        "created": now_s() - 5, "livemode": false, "type": "checkout.session.completed",
        "data": {"object": {
            "id": "cs_test_e2e", "object": "checkout.session", "amount_total": 2000,
            "currency": "eur", "client_reference_id": reference,
            "customer_details": {"email": "stripe-buyer@example.com", "name": "Grace Hopper"},
            "metadata": {}, "mode": "payment", "payment_intent": pi,
            "payment_status": "paid", "total_details": {"amount_tax": 0, "amount_shipping": 0}
        }}
    })
}

async fn stripe(app: &TestApp, body: &Value, t: i64, secret: &str) -> (u16, String) {
    let bytes = serde_json::to_vec(body).unwrap();
    let mut message = format!("{t}.").into_bytes();
    message.extend_from_slice(&bytes);
    let header = format!("t={t},v1={}", hex::encode(hmac(secret, &message)));
    let r = app
        .http
        .post(app.url("/webhooks/stripe"))
        .header("content-type", "application/json; charset=utf-8")
        .header("stripe-signature", header)
        .body(bytes)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn woo_order(number: &str, email: &str) -> Value {
    // WooCommerce's `*_gmt` form: UTC without an offset.
    let paid = time::OffsetDateTime::from_unix_timestamp(now_s() - 30)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
        .trim_end_matches('Z')
        .to_owned();
    json!({
        "id": 900, "number": number, "status": "processing", "currency": "EUR",
        "date_paid_gmt": paid, "date_created_gmt": paid, "date_modified_gmt": paid,
        "total": "49.00", "total_tax": "0.00", "shipping_total": "0.00", "customer_id": 0,
        "customer_ip_address": "192.0.2.80", "customer_user_agent": "Woo Browser/1",
        "billing": {"first_name": "Alan", "last_name": "Turing", "email": email, "country": "GB"},
        "line_items": [{"id": 1, "name": "Book", "product_id": 5, "variation_id": 0,
                        "quantity": 1, "subtotal": "49.00", "total": "49.00", "sku": "BOOK"}],
        "coupon_lines": [], "refunds": [], "meta_data": []
    })
}

async fn woo(app: &TestApp, body: &[u8], signature: Option<String>) -> (u16, String) {
    let mut req = app
        .http
        .post(app.url("/webhooks/woocommerce"))
        .header("x-wc-webhook-topic", "order.created")
        .header("x-wc-webhook-source", "https://books.example.org/");
    if let Some(s) = signature {
        req = req
            .header("content-type", "application/json")
            .header("x-wc-webhook-signature", s);
    } else {
        req = req.header("content-type", "application/x-www-form-urlencoded");
    }
    let r = req.body(body.to_vec()).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn woo_signed(body: &Value, secret: &str) -> (Vec<u8>, Option<String>) {
    let bytes = serde_json::to_vec(body).unwrap();
    let sig = base64::engine::general_purpose::STANDARD.encode(hmac(secret, &bytes));
    (bytes, Some(sig))
}

#[tokio::test]
async fn bad_missing_and_stale_signatures_are_refused_and_store_nothing() {
    let v = Vendors::start().await;
    let app = spawn_app(&v.config("")).await;
    let order = shopify_order(5_550_005, "ck-5", "five@example.com");
    // Shopify: another secret, or none.
    let (status, body) = shopify(&app, "orders/paid", &order, "not-the-secret").await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body.as_str()
            .unwrap()
            .contains("X-Shopify-Hmac-Sha256 does not match"),
        "{body}"
    );
    let r = app
        .http
        .post(app.url("/webhooks/shopify"))
        .header("x-shopify-topic", "orders/paid")
        .json(&order)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // WooCommerce: unsigned (not a ping) and wrongly signed.
    let w = woo_order("W-1", "w@example.com");
    let (bytes, _) = woo_signed(&w, WOO_SECRET);
    assert_eq!(woo(&app, &bytes, None).await.0, 401);
    let (bytes, sig) = woo_signed(&w, "wrong");
    assert_eq!(woo(&app, &bytes, sig).await.0, 401);
    // Stripe: a genuine webhook replayed ten minutes later, and another endpoint's secret.
    let s = stripe_session_event("tv-none", "pi_e2e_stale");
    let (status, text) = stripe(&app, &s, now_s() - 600, STRIPE_SECRET).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("tolerance"), "{text}");
    assert!(!text.contains(STRIPE_SECRET));
    assert_eq!(stripe(&app, &s, now_s(), "whsec_other").await.0, 401);

    // Nothing was stored or sent, and no order was marked as sent: the same orders, signed
    // right, go out.
    app.wait_until_drained().await;
    assert!(v.ga4.received().is_empty() && v.meta.received().is_empty());
    let stats =
        tagrelay::outbox::store::embedded::tools::stats(&app.dir.path().join("outbox")).unwrap();
    assert_eq!(stats.pending, 0);
    assert_eq!(
        shopify(&app, "orders/paid", &order, SHOPIFY_SECRET).await.0,
        200
    );
    let (bytes, sig) = woo_signed(&w, WOO_SECRET);
    assert_eq!(woo(&app, &bytes, sig).await.0, 200);
    assert_eq!(stripe(&app, &s, now_s(), STRIPE_SECRET).await.0, 200);
    let got = v.ga4.wait_for(10, |r| ga4_events(r).len() >= 3).await;
    let mut ids: Vec<String> = ga4_events(&got)
        .iter()
        .map(|(_, e)| e["params"]["transaction_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, ["5550005", "W-1", "pi_e2e_stale"]);
    // WooCommerce's ping when the webhook is saved: exactly 200.
    let (status, text) = woo(&app, b"webhook_id=17", None).await;
    assert_eq!(status, 200, "{text}");
    app.stop().await;
}

#[tokio::test]
async fn a_refund_webhook_is_a_ga4_refund_of_the_same_transaction_and_visitor() {
    let v = Vendors::start().await;
    let app = spawn_app(&v.config("")).await;
    let set = ga4(
        &app,
        "en=page_view&sid=1767000200&sct=1&dl=https%3A%2F%2Fshop.example.com%2F",
        &[],
    )
    .await;
    ga4(
        &app,
        "en=begin_checkout&sid=1767000200&sct=1&ep.checkout_token=ck-refund",
        &set,
    )
    .await;
    let order = shopify_order(5_550_006, "ck-refund", "r@example.com");
    assert_eq!(
        shopify(&app, "orders/paid", &order, SHOPIFY_SECRET).await.0,
        200
    );
    let refund = json!({
        "id": 777001, "order_id": 5_550_006_u64, "created_at": rfc3339(10),
        "refund_line_items": [{"quantity": 1, "subtotal": 64.55, "total_tax": 0,
            "line_item": {"id": 1, "sku": "SHOE-42", "title": "Trail Shoe", "price": "64.55", "quantity": 2}}],
        "transactions": [{"kind": "refund", "status": "success", "amount": "64.55", "currency": "EUR"}]
    });
    let (status, body) = shopify(&app, "refunds/create", &refund, SHOPIFY_SECRET).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"][0]["event_id"], "refund-5550006-777001");
    let got = v
        .ga4
        .wait_for(10, |r| {
            ga4_events(r).iter().any(|(_, e)| e["name"] == "refund")
        })
        .await;
    let evs = ga4_events(&got);
    let (ptop, _) = evs.iter().find(|(_, e)| e["name"] == "purchase").unwrap();
    let (rtop, r) = evs.iter().find(|(_, e)| e["name"] == "refund").unwrap();
    assert_eq!(
        r["params"]["transaction_id"], "5550006",
        "the purchase's transaction"
    );
    assert_eq!(r["params"]["value"], 64.55);
    assert_eq!(r["params"]["currency"], "EUR");
    assert_eq!(r["params"]["items"][0]["item_id"], "SHOE-42");
    assert_eq!(r["params"]["items"][0]["quantity"], 1.0);
    assert_eq!(rtop["client_id"], "11.22", "the visitor who bought");
    assert_eq!(rtop["client_id"], ptop["client_id"]);
    app.stop().await;
}

#[tokio::test]
async fn stripe_and_woocommerce_orders_find_their_visitor_by_token_and_by_email() {
    let v = Vendors::start().await;
    let app = spawn_app(&v.config("")).await;
    // The data client, as tagrelay.js sends `tagrelay.checkout()`: a begin_checkout with the
    // visitor token the page handed Stripe as client_reference_id.
    let r = app
        .http
        .post(app.url("/data"))
        .header("content-type", "text/plain")
        .header("user-agent", BROWSER_UA)
        .header("x-forwarded-for", BROWSER_IP)
        .header("cookie", "FPID=FPID2.2.77.88; _fbp=fb.1.1767000000000.1234567890")
        .body(r#"{"event_name":"begin_checkout","tagrelay_visitor":"tv-e2e-token","page_location":"https://shop.example.com/pay","value":20,"currency":"EUR"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, text) = stripe(
        &app,
        &stripe_session_event("tv-e2e-token", "pi_e2e_1"),
        now_s(),
        STRIPE_SECRET,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let got = v
        .meta
        .wait_for(10, |r| {
            meta_events(r, "111")
                .iter()
                .any(|e| e["event_id"] == "purchase-pi_e2e_1")
        })
        .await;
    let m = meta_events(&got, "111")
        .into_iter()
        .find(|e| e["event_id"] == "purchase-pi_e2e_1")
        .unwrap();
    assert_eq!(m["user_data"]["fbp"], "fb.1.1767000000000.1234567890");
    assert_eq!(m["user_data"]["client_user_agent"], BROWSER_UA);
    assert_eq!(m["custom_data"]["value"], 20.0);
    assert_eq!(
        traced_stitch(&app, "stripe").await["key"],
        "client_reference_id"
    );

    // WooCommerce: the checkout page sent the email (hashed on receipt); the order has it.
    let r = app
        .http
        .post(app.url("/data"))
        .header("content-type", "text/plain")
        .header("user-agent", BROWSER_UA)
        .header("cookie", "FPID=FPID2.2.99.11")
        .body(r#"{"event_name":"add_payment_info","page_location":"https://books.example.org/checkout","user_data":{"email_address":"Alan@Example.org"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (bytes, sig) = woo_signed(&woo_order("W-77", "alan@example.org "), WOO_SECRET);
    assert_eq!(woo(&app, &bytes, sig).await.0, 200);
    let got = v
        .ga4
        .wait_for(10, |r| {
            ga4_events(r)
                .iter()
                .any(|(_, e)| e["params"]["transaction_id"] == "W-77")
        })
        .await;
    let (top, _) = ga4_events(&got)
        .into_iter()
        .find(|(_, e)| e["params"]["transaction_id"] == "W-77")
        .unwrap();
    assert_eq!(
        top["client_id"], "99.11",
        "the visitor who typed that email"
    );
    assert_eq!(
        traced_stitch(&app, "woocommerce").await["key"],
        "billing.email"
    );

    // `tagrelay identity forget --email` erases them: a later order of theirs is unstitched.
    let out = std::process::Command::new(crate::process::BIN)
        .args([
            "identity",
            "forget",
            "--email",
            "ALAN@example.org",
            "--config",
        ])
        .arg(app.config_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let erased: u64 = stdout.split_whitespace().next().unwrap().parse().unwrap();
    assert!(erased >= 2, "the email's session and the order's: {stdout}");
    let (bytes, sig) = woo_signed(&woo_order("W-78", "alan@example.org"), WOO_SECRET);
    assert_eq!(woo(&app, &bytes, sig).await.0, 200);
    let got = v
        .ga4
        .wait_for(10, |r| {
            ga4_events(r)
                .iter()
                .any(|(_, e)| e["params"]["transaction_id"] == "W-78")
        })
        .await;
    let (top, _) = ga4_events(&got)
        .into_iter()
        .find(|(_, e)| e["params"]["transaction_id"] == "W-78")
        .unwrap();
    assert_ne!(top["client_id"], "99.11", "forgotten");
    app.stop().await;
}

#[tokio::test]
async fn with_stitching_off_browser_hits_record_nothing_and_orders_still_go_once() {
    let v = Vendors::start().await;
    let app = spawn_app(&v.config("[stitching]\nenabled = false\n")).await;
    let set = ga4(&app, "en=page_view&sid=1767000300&sct=1", &[]).await;
    ga4(&app, "en=begin_checkout&ep.transaction_id=ck-off", &set).await;
    let order = shopify_order(5_550_007, "ck-off", "off@example.com");
    assert_eq!(
        shopify(&app, "orders/paid", &order, SHOPIFY_SECRET).await.0,
        200
    );
    assert_eq!(
        shopify(&app, "orders/paid", &order, SHOPIFY_SECRET).await.0,
        200
    );
    app.wait_until_drained().await;
    let evs = ga4_events(&v.ga4.received());
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_ne!(evs[0].0["client_id"], "11.22", "not stitched");
    assert_eq!(traced_stitch(&app, "shopify").await["status"], "unstitched");
    app.stop().await;
}

#[tokio::test]
async fn tagrelay_js_hands_stripe_a_visitor_token_and_the_pixel_the_orders_event_id() {
    let v = Vendors::start().await;
    let app = spawn_app(&v.config("")).await;
    let port = app.addr.port();
    // A checkout page sending the visitor to a Stripe Payment Link, the README's one line.
    let page = format!(
        r#"<!doctype html><html><head><title>Pay</title>
<script src="http://sgtm.example.test:{port}/tagrelay.js"></script></head><body>
<a id="pay" href="https://buy.stripe.com/test_abc">Pay</a><script>
const a = document.getElementById("pay");
a.href += "?client_reference_id=" + tagrelay.checkout({{ value: 20, currency: "EUR" }});
window.result = {{ href: a.href, again: tagrelay.visitor(), eventId: tagrelay.orderEventId("pi_js_1") }};
</script></body></html>"#
    );
    let site_addr = crate::browser::site(vec![("/pay", "text/html; charset=utf-8", page)]).await;
    let browser = crate::browser::Browser::start().await;
    browser
        .client
        .goto(&format!(
            "http://www.example.test:{}/pay?fbclid=IwAR-js-click",
            site_addr.port()
        ))
        .await
        .unwrap();
    let result = browser.wait_js(15, "window.result").await;
    let href = result["href"].as_str().unwrap();
    let token = href
        .split("client_reference_id=")
        .nth(1)
        .unwrap()
        .to_owned();
    assert!(token.starts_with("tv-") && token.len() > 20, "{href}");
    assert_eq!(result["again"], token.as_str(), "one token per visit");
    assert_eq!(
        result["eventId"], "purchase-pi_js_1",
        "the id the webhook's purchase gets"
    );

    // The begin_checkout that recorded the token reached the server before Stripe's webhook
    // (its trace is there); then the order comes back with the token.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let all: Value = app
            .http
            .get(app.admin_url("/debug/api/traces?limit=50"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let seen = all["traces"].as_array().unwrap().iter().any(|t| {
            t["events"][0]["event_name"] == "begin_checkout"
                && t["events"][0]["params"]["tagrelay_visitor"] == token.as_str()
        });
        if seen {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no begin_checkout: {all}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (status, text) = stripe(
        &app,
        &stripe_session_event(&token, "pi_js_1"),
        now_s(),
        STRIPE_SECRET,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let got = v
        .meta
        .wait_for(15, |r| {
            meta_events(r, "111")
                .iter()
                .any(|e| e["event_id"] == "purchase-pi_js_1")
        })
        .await;
    let m = meta_events(&got, "111")
        .into_iter()
        .find(|e| e["event_id"] == "purchase-pi_js_1")
        .unwrap();
    assert!(
        m["user_data"]["fbc"]
            .as_str()
            .unwrap()
            .ends_with(".IwAR-js-click"),
        "the browser's click: {m}"
    );
    assert!(m["event_source_url"]
        .as_str()
        .unwrap()
        .contains("/pay?fbclid="));
    assert_eq!(
        traced_stitch(&app, "stripe").await["key"],
        "client_reference_id"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_consent_of_the_visit_decides_where_its_order_goes() {
    let (ga4v, meta) = (FakeVendor::start().await, FakeVendor::start().await);
    let app = spawn_app(&format!(
        r#"
[admin]
trace_sampling = "all"

[[clients]]
type = "ga4"

[[clients]]
type = "shopify"
path = "/webhooks/shopify"
secret = "{SHOPIFY_SECRET}"

[[tags]]
name = "ga4"
type = "ga4"
mode = "measurement_protocol"
endpoint = "{ga4}"
measurement_id = "G-SHOP1"
api_secret = "mp-secret"
[tags.trigger]
events = ["purchase"]
consent = ["analytics_storage"]

[[tags]]
name = "meta"
type = "meta_capi"
endpoint = "{meta}"
pixel_id = "111"
access_token = "meta-token"
[tags.trigger]
events = ["purchase"]
consent = ["ad_storage"]
"#,
        ga4 = ga4v.url(),
        meta = meta.url()
    ))
    .await;
    // Analytics granted, ads denied (gcs G1 + ad_storage 0 + analytics_storage 1).
    let set = ga4(&app, "en=page_view&gcs=G101&sid=1767000400&sct=1&dl=https%3A%2F%2Fshop.example.com%2F%3Ffbclid%3DIwAR-denied", &[]).await;
    ga4(
        &app,
        "en=begin_checkout&gcs=G101&sid=1767000400&sct=1&ep.checkout_token=ck-consent",
        &set,
    )
    .await;
    let order = shopify_order(5_550_020, "ck-consent", "c@example.com");
    assert_eq!(
        shopify(&app, "orders/paid", &order, SHOPIFY_SECRET).await.0,
        200
    );
    app.wait_until_drained().await;
    // GA4 (analytics granted) gets the order in the visit's session; Meta (ads denied) nothing.
    let evs = ga4_events(&ga4v.received());
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].0["client_id"], "11.22");
    assert_eq!(evs[0].1["params"]["session_id"], "1767000400");
    assert!(meta.received().is_empty(), "the visitor refused ads");
    let st = traced_stitch(&app, "shopify").await;
    assert_eq!(st["status"], "stitched");
    app.stop().await;
}

/// Replicas sharing the Redis outbox share the stitching store too: the visit recorded by
/// one stitches the order another takes, and the platform's retry to a third is a duplicate.
#[tokio::test]
async fn replicas_on_redis_stitch_an_order_to_a_visit_another_replica_took() {
    let redis = crate::redis_server::RedisServer::start(&[]);
    let v = Vendors::start().await;
    let config = |dir: &std::path::Path| {
        let redis_url = format!("\n[outbox.redis]\nurl = \"{}\"\n", redis.url());
        crate::helpers::test_config(dir, &v.config(&redis_url)).replacen(
            "[outbox]\n",
            "[outbox]\nbackend = \"redis\"\n",
            1,
        )
    };
    let replica = || async {
        let dir = tempfile::tempdir().unwrap();
        let text = config(dir.path());
        crate::helpers::spawn_with(dir, &text).await
    };
    let a = replica().await;
    let b = replica().await;

    let token = "redis-shared-checkout-token";
    ga4(
        &a,
        &format!(
            "en=begin_checkout&sid=1767000200&sct=1&ep.transaction_id={token}&dl={}",
            enc("https://shop.example.com/checkouts/cn/r?gclid=Cj0-REDIS-CLICK")
        ),
        &[],
    )
    .await;
    // The visit is written by replica a's stitching task, off its hit path.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let key = format!("tagrelay:st:s:r:{token}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !redis::cmd("EXISTS")
        .arg(&key)
        .query::<bool>(&mut conn)
        .unwrap()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "replica a never recorded the visit in Redis"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let order = shopify_order(5_550_101, token, "shared@example.com");
    let (status, body) = shopify(&b, "orders/paid", &order, SHOPIFY_SECRET).await;
    assert_eq!(status, 200, "{body}");
    let stitch = traced_stitch(&b, "shopify").await;
    assert_eq!(stitch["status"], "stitched", "{stitch}");
    assert_eq!(stitch["matched_event"], "begin_checkout", "{stitch}");
    let got = v
        .ga4
        .wait_for(10, |r| {
            ga4_events(r).iter().any(|(_, e)| e["name"] == "purchase")
        })
        .await;
    let (top, ev) = ga4_events(&got)
        .into_iter()
        .find(|(_, e)| e["name"] == "purchase")
        .unwrap();
    assert_eq!(top["client_id"], "11.22", "{top}");
    assert_eq!(ev["params"]["session_id"], "1767000200", "{ev}");

    // Shopify retries the webhook; the load balancer sends it to replica a this time.
    let (status, body) = shopify(&a, "orders/paid", &order, SHOPIFY_SECRET).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["events"],
        json!([]),
        "a duplicate on the other replica: {body}"
    );

    // And the person asks to be forgotten: the CLI erases the visit from the shared store.
    let file = a.dir.path().join("forget.toml");
    std::fs::write(&file, config(a.dir.path())).unwrap();
    let out = std::process::Command::new(crate::process::BIN)
        .args(["--config"])
        .arg(&file)
        .args(["identity", "forget", "--client-id", "11.22"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("erased from the shared store"),
        "{out:?}"
    );
    assert!(!redis::cmd("EXISTS")
        .arg(&key)
        .query::<bool>(&mut conn)
        .unwrap());
    a.stop().await;
    b.stop().await;
}
