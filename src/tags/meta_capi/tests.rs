use std::collections::BTreeMap;
use std::time::Duration;

use ::http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Value};

use super::normalize::{self, Key};
use super::*;
use crate::event::{Event, Item};

/// 2025-12-05T05:36:40Z
const NOW: i64 = 1_764_913_000_000;
const TOKEN: &str = "EAABtesttoken123";
const APP_SECRET: &str = "test-app-secret";
/// hex HMAC-SHA256(key = APP_SECRET, msg = TOKEN), computed independently with Python's hmac.
const PROOF: &str = "28b069776575f5c84cfff7566f7d09c3d1aa61ca522aef06c349ba107e90f8f6";
const UA: &str = "Mozilla/5.0 (X11; Linux x86_64)";

fn cfg() -> MetaCapiTagConfig {
    MetaCapiTagConfig {
        name: "meta".into(),
        trigger: Default::default(),
        pixel_id: "123456789012345".into(),
        access_token: Secret::new(TOKEN),
        api_version: "v24.0".into(),
        endpoint: "https://graph.facebook.com".into(),
        test_event_code: None,
        app_secret: Some(Secret::new(APP_SECRET)),
        event_names: BTreeMap::new(),
        forward_unmapped: true,
        purchase_event_id_from_transaction: false,
        batch_max: 1000,
        timeout_ms: 1500,
        action_source: ActionSource::Website,
        action_source_from_event: false,
    }
}

fn tag(c: &MetaCapiTagConfig) -> MetaCapiTag {
    match MetaCapiTag::from_config(c) {
        Ok(t) => t,
        Err(p) => panic!("config rejected: {p:?}"),
    }
}

fn web_event(name: &str, id: &str) -> Event {
    Event {
        event_name: name.into(),
        event_id: id.into(),
        timestamp_ms: NOW - 10_000,
        source: "ga4".into(),
        user_agent: Some(UA.into()),
        ip_override: Some("203.0.113.7".into()),
        page_location: Some("https://shop.example.com/".into()),
        ..Default::default()
    }
}

fn body_json(req: &OutboundRequest) -> Value {
    serde_json::from_slice(&req.body).expect("body is JSON")
}

fn expected_url() -> String {
    format!(
        "https://graph.facebook.com/v24.0/123456789012345/events?access_token={TOKEN}&appsecret_proof={PROOF}"
    )
}

fn single_request(enc: &Encoded) -> &OutboundRequest {
    assert_eq!(enc.requests.len(), 1, "{enc:?}");
    &enc.requests[0].0
}

fn h(s: &str) -> String {
    sha256_hex(s).as_str().to_owned()
}

// ---------------------------------------------------------------- golden requests

#[test]
fn page_view_with_fbc_and_fbp() {
    let t = tag(&cfg());
    let mut e = web_event("page_view", "ev-1");
    e.page_location = Some("https://shop.example.com/landing?fbclid=IwAR2xYz".into());
    e.page_referrer = Some("https://www.facebook.com/".into());
    e.identity.fbc = Some("fb.1.1764912991234.IwAR2xYz".into());
    e.identity.fbp = Some("fb.1.1764912990000.1234567890".into());
    let enc = t.encode(&[e], NOW);
    assert!(enc.rejected.is_empty() && enc.skipped.is_empty(), "{enc:?}");
    assert_eq!(enc.requests[0].1, vec![0]);
    let req = single_request(&enc);
    assert_eq!(req.method, Method::POST);
    assert_eq!(req.url, expected_url());
    assert_eq!(
        req.headers,
        vec![("content-type".to_owned(), "application/json".to_owned())]
    );
    assert_eq!(
        body_json(req),
        json!({"data": [{
            "event_name": "PageView",
            "event_time": 1_764_912_990,
            "event_id": "ev-1",
            "action_source": "website",
            "event_source_url": "https://shop.example.com/landing?fbclid=IwAR2xYz",
            "referrer_url": "https://www.facebook.com/",
            "user_data": {
                "client_ip_address": "203.0.113.7",
                "client_user_agent": UA,
                "fbc": "fb.1.1764912991234.IwAR2xYz",
                "fbp": "fb.1.1764912990000.1234567890"
            }
        }]})
    );
}

#[test]
fn fbc_is_built_from_fbclid_when_no_cookie() {
    let t = tag(&cfg());
    let mut e = web_event("page_view", "ev-2");
    e.page_location = Some("https://shop.example.com/?utm_source=fb&fbclid=IwAR2xYz".into());
    let enc = t.encode(&[e.clone()], NOW);
    let body = body_json(single_request(&enc));
    assert_eq!(
        body["data"][0]["user_data"]["fbc"],
        json!(format!("fb.1.{}.IwAR2xYz", e.timestamp_ms))
    );
    // A malformed cookie is not sent; the URL's click id replaces it.
    e.identity.fbc = Some("garbage".into());
    let enc = t.encode(&[e.clone()], NOW);
    let body = body_json(single_request(&enc));
    assert_eq!(
        body["data"][0]["user_data"]["fbc"],
        json!(format!("fb.1.{}.IwAR2xYz", e.timestamp_ms))
    );
}

fn purchase() -> Event {
    let mut e = web_event("purchase", "ev-purchase");
    e.page_location = Some("https://shop.example.com/checkout/thanks".into());
    e.page_referrer = Some("https://shop.example.com/checkout".into());
    e.currency = Some("eur".into());
    e.value = Some(118.0);
    e.transaction_id = Some("T-1024".into());
    e.user_id = Some(" User 123 ".into());
    e.items.push(Item {
        item_id: Some("SKU_123".into()),
        item_name: Some("Trail Shoe".into()),
        item_brand: Some("Acme".into()),
        item_category: Some("Shoes".into()),
        price: Some(59.0),
        quantity: Some(2.0),
        ..Default::default()
    });
    let u = &mut e.user_data;
    u.email_address = Some("  John.Doe@Example.COM ".into());
    u.phone_number = Some("+1 (650) 555-1212".into());
    u.date_of_birth = Some("1990-02-14".into());
    u.gender = Some("Female".into());
    let a = &mut u.address;
    a.first_name = Some("  Mary-Jane ".into());
    a.last_name = Some("O'Brien".into());
    a.city = Some("San Francisco".into());
    a.region = Some("California".into());
    a.postal_code = Some("94025-1234".into());
    a.country = Some("United States".into());
    e
}

#[test]
fn purchase_with_items_and_pii() {
    let mut c = cfg();
    c.test_event_code = Some("TEST12345".into());
    c.purchase_event_id_from_transaction = true;
    let t = tag(&c);
    let enc = t.encode(&[purchase()], NOW);
    let req = single_request(&enc);
    assert_eq!(req.url, expected_url());
    let body = body_json(req);
    assert_eq!(
        body,
        json!({
            "data": [{
                "event_name": "Purchase",
                "event_time": 1_764_912_990,
                "event_id": "T-1024",
                "action_source": "website",
                "event_source_url": "https://shop.example.com/checkout/thanks",
                "referrer_url": "https://shop.example.com/checkout",
                "user_data": {
                    "em": ["836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f"],
                    "ph": ["e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"],
                    "fn": ["f08f448a5e7a9dc3619bb7c129f6a7d5fc6af002cea17ad71dfdc1c68f4d4e0e"],
                    "ln": ["b4cb6cb33fe4b865868de825023a1e2790dc12ac01ecc8d7c5afe8254071c8ba"],
                    "db": ["80fb6af0c4310e4790db22c054d0c42a95c39ae4f1e14691ffbf69ce9e612940"],
                    "ge": ["252f10c83610ebca1a059c0bae8255eba2f95be4d1d7bcfa89d7248a82d9f111"],
                    "ct": ["1a6bd4d9d79dc0a79b53795c70d3349fa9e38968a3fbefbfe8783efb1d2b6aac"],
                    "st": ["6959097001d10501ac7d54c0bdb8db61420f658f2922cc26e46d536119a31126"],
                    "zp": ["b9a9cf3cd3723a2e91b7c23ecf68456e872b6e5d86e5cab7f3d45a7302da32c7"],
                    "country": ["79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621"],
                    "external_id": ["e606e38b0d8c19b24cf0ee3808183162ea7cd63ff7912dbb22b5e803286b4446"],
                    "client_ip_address": "203.0.113.7",
                    "client_user_agent": UA
                },
                "custom_data": {
                    "value": 118.0,
                    "currency": "EUR",
                    "content_name": "Trail Shoe",
                    "content_category": "Shoes",
                    "content_ids": ["SKU_123"],
                    "contents": [{
                        "id": "SKU_123", "quantity": 2, "item_price": 59.0,
                        "title": "Trail Shoe", "brand": "Acme", "category": "Shoes"
                    }],
                    "content_type": "product",
                    "num_items": 2,
                    "order_id": "T-1024"
                }
            }],
            "test_event_code": "TEST12345"
        })
    );
    // No raw PII anywhere on the wire.
    let raw = String::from_utf8_lossy(&req.body);
    for pii in [
        "john",
        "Doe",
        "650",
        "Mary",
        "Brien",
        "Francisco",
        "1990",
        "User",
    ] {
        assert!(!raw.contains(pii), "{pii} leaked: {raw}");
    }
}

#[test]
fn purchase_event_id_is_the_event_id_unless_configured() {
    let t = tag(&cfg());
    let body = body_json(single_request(&t.encode(&[purchase()], NOW)));
    assert_eq!(body["data"][0]["event_id"], json!("ev-purchase"));
    assert!(body.get("test_event_code").is_none());
}

#[test]
fn lead_with_prehashed_email() {
    let t = tag(&cfg());
    let mut e = web_event("generate_lead", "ev-lead");
    // GA-style upper-case hex is accepted and sent lower-case, not re-hashed.
    e.user_data.sha256_email_address =
        Some(" 836F82DB99121B3481011F16B49DFA5FBC714A0D1B1B9F784A1EBBBF5B39577F ".into());
    let body = body_json(single_request(&t.encode(&[e], NOW)));
    assert_eq!(
        body["data"][0],
        json!({
            "event_name": "Lead",
            "event_time": 1_764_912_990,
            "event_id": "ev-lead",
            "action_source": "website",
            "event_source_url": "https://shop.example.com/",
            "user_data": {
                "em": ["836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f"],
                "client_ip_address": "203.0.113.7",
                "client_user_agent": UA
            }
        })
    );
}

#[test]
fn plain_and_ga_hashed_email_both_sent_when_different() {
    let t = tag(&cfg());
    let mut e = web_event("generate_lead", "ev");
    e.user_data.email_address = Some("john.doe@example.com".into());
    e.user_data.sha256_email_address = Some(h("johndoe@example.com"));
    // Not a digest: dropped, never hashed as-is.
    e.user_data.sha256_phone_number = Some("+16505551212".into());
    let body = body_json(single_request(&t.encode(std::slice::from_ref(&e), NOW)));
    let ud = &body["data"][0]["user_data"];
    assert_eq!(
        ud["em"],
        json!([
            "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f",
            h("johndoe@example.com")
        ])
    );
    assert!(ud.get("ph").is_none(), "{ud}");
    // Same digest twice is sent once.
    e.user_data.sha256_email_address = Some(h("john.doe@example.com"));
    let body = body_json(single_request(&t.encode(&[e], NOW)));
    assert_eq!(
        body["data"][0]["user_data"]["em"],
        json!(["836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f"])
    );
}

#[test]
fn invalid_user_data_is_dropped_not_sent_raw() {
    let t = tag(&cfg());
    let mut e = web_event("page_view", "ev");
    e.user_data.email_address = Some("not-an-email".into());
    e.user_data.phone_number = Some("07946 095812".into());
    e.user_data.address.country = Some("Atlantis".into());
    e.user_data.date_of_birth = Some("02/03/1990".into());
    e.user_data.gender = Some("unknown".into());
    e.ip_override = Some("not-an-ip".into());
    e.identity.fbp = Some("fbp-garbage".into());
    let req = single_request(&t.encode(&[e], NOW)).clone();
    let body = body_json(&req);
    assert_eq!(
        body["data"][0]["user_data"],
        json!({"client_user_agent": UA})
    );
}

#[test]
fn client_ip_takes_the_first_address_and_skips_redacted() {
    let t = tag(&cfg());
    let mut chain = web_event("page_view", "a");
    chain.ip_override = Some(" 2001:db8::7 , 10.0.0.1".into());
    let mut redacted = web_event("page_view", "b");
    redacted.ip_override = Some("::".into());
    let body = body_json(single_request(&t.encode(&[chain, redacted], NOW)));
    assert_eq!(
        body["data"][0]["user_data"]["client_ip_address"],
        json!("2001:db8::7")
    );
    assert!(body["data"][1]["user_data"]
        .get("client_ip_address")
        .is_none());
}

#[test]
fn stale_and_future_events_are_rejected_before_sending() {
    let t = tag(&cfg());
    let mut old = web_event("page_view", "old");
    old.timestamp_ms = NOW - 8 * 24 * 3_600_000;
    let mut future = web_event("page_view", "future");
    future.timestamp_ms = NOW + 5 * 60_000;
    let mut six_days = web_event("page_view", "six-days");
    six_days.timestamp_ms = NOW - 6 * 24 * 3_600_000;
    let mut slight_skew = web_event("page_view", "skew");
    slight_skew.timestamp_ms = NOW + 30_000;
    let ok = web_event("page_view", "ok");
    let enc = t.encode(&[old, ok, future, six_days, slight_skew], NOW);
    assert_eq!(enc.rejected.len(), 2, "{enc:?}");
    assert_eq!(enc.rejected[0].0, 0);
    assert!(enc.rejected[0].1.contains("older than 7 days"), "{enc:?}");
    assert!(enc.rejected[0].1.contains("192 h"), "{enc:?}");
    assert_eq!(enc.rejected[1].0, 2);
    assert!(enc.rejected[1].1.contains("future"), "{enc:?}");
    assert_eq!(enc.requests.len(), 1);
    assert_eq!(enc.requests[0].1, vec![1, 3, 4]);
    let ids: Vec<Value> = body_json(&enc.requests[0].0)["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|d| d["event_id"].clone())
        .collect();
    assert_eq!(ids, vec![json!("ok"), json!("six-days"), json!("skew")]);
}

#[test]
fn unmapped_events_are_forwarded_or_skipped() {
    let e = web_event("newsletter_open", "ev-n");
    let t = tag(&cfg());
    let body = body_json(single_request(&t.encode(std::slice::from_ref(&e), NOW)));
    assert_eq!(body["data"][0]["event_name"], json!("newsletter_open"));

    let mut c = cfg();
    c.forward_unmapped = false;
    let t = tag(&c);
    let enc = t.encode(&[e, web_event("page_view", "pv")], NOW);
    assert_eq!(enc.skipped.len(), 1);
    assert_eq!(enc.skipped[0].0, 0);
    assert!(enc.skipped[0].1.contains("newsletter_open"), "{enc:?}");
    assert!(enc.rejected.is_empty());
    assert_eq!(enc.requests[0].1, vec![1]);
}

#[test]
fn event_names_override_defaults_and_unmapped() {
    let mut c = cfg();
    c.forward_unmapped = false;
    c.event_names
        .insert("generate_lead".into(), "Contact".into());
    c.event_names
        .insert("newsletter_open".into(), "Subscribe".into());
    let t = tag(&c);
    let enc = t.encode(
        &[
            web_event("generate_lead", "a"),
            web_event("newsletter_open", "b"),
            web_event("view_item", "c"),
        ],
        NOW,
    );
    let names: Vec<Value> = body_json(single_request(&enc))["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|d| d["event_name"].clone())
        .collect();
    assert_eq!(
        names,
        vec![json!("Contact"), json!("Subscribe"), json!("ViewContent")]
    );
}

#[test]
fn default_mapping_table() {
    for (ga4, meta) in [
        ("page_view", "PageView"),
        ("view_item", "ViewContent"),
        ("add_to_cart", "AddToCart"),
        ("add_to_wishlist", "AddToWishlist"),
        ("begin_checkout", "InitiateCheckout"),
        ("add_payment_info", "AddPaymentInfo"),
        ("purchase", "Purchase"),
        ("search", "Search"),
        ("view_search_results", "Search"),
        ("generate_lead", "Lead"),
        ("sign_up", "CompleteRegistration"),
    ] {
        assert_eq!(default_meta_name(ga4), Some(meta), "{ga4}");
    }
    assert_eq!(default_meta_name("scroll"), None);
}

#[test]
fn batches_respect_batch_max() {
    let mut c = cfg();
    c.batch_max = 2;
    let t = tag(&c);
    let events: Vec<Event> = (0..5)
        .map(|i| web_event("page_view", &format!("e{i}")))
        .collect();
    let enc = t.encode(&events, NOW);
    let idx: Vec<Vec<usize>> = enc.requests.iter().map(|(_, i)| i.clone()).collect();
    assert_eq!(idx, vec![vec![0, 1], vec![2, 3], vec![4]]);
    for (req, i) in &enc.requests {
        let data = body_json(req)["data"].as_array().expect("data").clone();
        assert_eq!(data.len(), i.len());
        assert_eq!(data[0]["event_id"], json!(format!("e{}", i[0])));
    }
    assert_eq!(t.max_batch(), 2);
    assert_eq!(t.timeout(), Duration::from_millis(1500));
    assert!(t.encode(&[], NOW).requests.is_empty());
}

#[test]
fn purchase_needs_value_and_currency() {
    let t = tag(&cfg());
    let mut no_currency = purchase();
    no_currency.currency = None;
    let mut bad_currency = purchase();
    bad_currency.currency = Some("euro".into());
    let mut no_value = purchase();
    no_value.value = None;
    no_value.items[0].price = None;
    let mut value_from_items = purchase();
    value_from_items.value = None;
    value_from_items.items[0].price = Some(59.99);
    value_from_items.items[0].quantity = Some(3.0);
    let enc = t.encode(
        &[no_currency, bad_currency, no_value, value_from_items],
        NOW,
    );
    let reasons: Vec<(usize, &str)> = enc.rejected.iter().map(|(i, r)| (*i, r.as_str())).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert_eq!(reasons[0].0, 0);
    assert!(reasons[0].1.contains("currency is missing"), "{reasons:?}");
    assert_eq!(reasons[1].0, 1);
    assert!(
        reasons[1].1.contains("`euro` is not an ISO 4217"),
        "{reasons:?}"
    );
    assert_eq!(reasons[2].0, 2);
    assert!(reasons[2].1.contains("value is missing"), "{reasons:?}");
    let body = body_json(single_request(&enc));
    let cd = &body["data"][0]["custom_data"];
    assert_eq!(cd["value"], json!(179.97));
    assert_eq!(cd["num_items"], json!(3));
}

#[test]
fn search_and_multi_item_custom_data() {
    let t = tag(&cfg());
    let mut s = web_event("search", "s");
    s.params
        .insert("search_term".into(), Value::String(" trail shoes ".into()));
    let mut cart = web_event("add_to_cart", "c");
    cart.currency = Some("usd".into());
    cart.items.push(Item {
        item_id: Some("A".into()),
        item_name: Some("Shoe".into()),
        price: Some(10.0),
        ..Default::default()
    });
    cart.items.push(Item {
        item_name: Some("No id".into()),
        price: Some(5.5),
        quantity: Some(2.0),
        ..Default::default()
    });
    let body = body_json(single_request(&t.encode(&[s, cart], NOW)));
    assert_eq!(
        body["data"][0]["custom_data"],
        json!({"search_string": "trail shoes"})
    );
    assert_eq!(
        body["data"][1]["custom_data"],
        json!({
            "value": 21.0,
            "currency": "USD",
            "content_ids": ["A"],
            "contents": [{"id": "A", "item_price": 10.0, "title": "Shoe"}],
            "content_type": "product",
            "num_items": 3
        })
    );
}

#[test]
fn website_events_need_url_and_user_agent() {
    let t = tag(&cfg());
    let mut no_ua = web_event("page_view", "a");
    no_ua.user_agent = None;
    let mut no_url = web_event("page_view", "b");
    no_url.page_location = Some("android-app://x".into());
    let mut no_name = web_event("", "c");
    no_name.event_name = "  ".into();
    let enc = t.encode(&[no_ua, no_url, no_name], NOW);
    assert!(enc.requests.is_empty());
    assert_eq!(enc.rejected.len(), 3);
    assert!(enc.rejected[0].1.contains("client_user_agent"));
    assert!(enc.rejected[1].1.contains("event_source_url"));
    assert!(enc.rejected[2].1.contains("no name"));
}

/// A purchase a shop's backend reports (Measurement Protocol or the data client): no page, no
/// browser, a signed-in customer.
fn backend_purchase() -> Event {
    let mut e = purchase();
    e.source = "measurement_protocol".into();
    e.page_location = None;
    e.page_referrer = None;
    e.user_agent = None;
    e.ip_override = None;
    e.identity = Default::default();
    e.user_data = Default::default();
    e.user_id = Some("User123".into());
    e
}

#[test]
fn events_from_elsewhere_go_with_their_action_source_and_without_browser_fields() {
    let mut c = cfg();
    c.action_source = ActionSource::SystemGenerated;
    let t = tag(&c);
    let enc = t.encode(&[backend_purchase()], NOW);
    assert!(enc.rejected.is_empty(), "{:?}", enc.rejected);
    let body = body_json(single_request(&enc));
    let ev = &body["data"][0];
    assert_eq!(ev["action_source"], "system_generated");
    assert_eq!(ev["event_name"], "Purchase");
    assert!(ev.get("event_source_url").is_none(), "{ev}");
    assert_eq!(ev["user_data"], json!({"external_id": [h("user123")]}));

    // What the event does have is still sent.
    let mut with_page = backend_purchase();
    with_page.page_location = Some("https://shop.example.com/checkout/thanks".into());
    with_page.user_agent = Some(UA.into());
    let body = body_json(single_request(&t.encode(&[with_page], NOW)));
    let ev = &body["data"][0];
    assert_eq!(
        ev["event_source_url"],
        "https://shop.example.com/checkout/thanks"
    );
    assert_eq!(ev["user_data"]["client_user_agent"], UA);

    // The default stays website, which refuses the same event with the way out in the reason.
    let enc = tag(&cfg()).encode(&[backend_purchase()], NOW);
    assert!(enc.requests.is_empty());
    assert!(
        enc.rejected[0].1.contains("action_source"),
        "{:?}",
        enc.rejected
    );
}

/// A tag that lets events name their own action source.
fn cfg_from_event() -> MetaCapiTagConfig {
    MetaCapiTagConfig {
        action_source_from_event: true,
        ..cfg()
    }
}

#[test]
fn an_events_action_source_parameter_is_ignored_unless_the_tag_allows_it() {
    // A browser could send `ep.action_source`: by default it changes nothing.
    let mut e = web_event("page_view", "pv-1");
    e.params
        .insert("action_source".into(), json!("system_generated"));
    let body = body_json(single_request(&tag(&cfg()).encode(&[e.clone()], NOW)));
    assert_eq!(body["data"][0]["action_source"], "website");
    e.params.insert("action_source".into(), json!("bogus"));
    assert!(tag(&cfg()).encode(&[e], NOW).rejected.is_empty());
}

#[test]
fn an_events_own_action_source_parameter_wins_over_the_tags() {
    // One website tag: the site's page view goes as website, the backend's purchase says
    // where it happened and goes without browser fields, in the same batch.
    let t = tag(&cfg_from_event());
    let mut store = backend_purchase();
    store
        .params
        .insert("action_source".into(), json!(" physical_store "));
    let enc = t.encode(&[web_event("page_view", "pv-1"), store], NOW);
    assert!(enc.rejected.is_empty(), "{:?}", enc.rejected);
    let body = body_json(single_request(&enc));
    assert_eq!(body["data"][0]["action_source"], "website");
    assert_eq!(body["data"][1]["action_source"], "physical_store");
    assert!(body["data"][1].get("event_source_url").is_none());
    // Not passed on as custom data.
    assert!(!body["data"][1]["custom_data"]
        .to_string()
        .contains("action_source"));

    // And the other way round: `website` on an event of a system_generated tag brings back
    // the website requirements, with the cause.
    let mut c = cfg_from_event();
    c.action_source = ActionSource::SystemGenerated;
    let mut claims_web = backend_purchase();
    claims_web
        .params
        .insert("action_source".into(), json!("website"));
    let enc = tag(&c).encode(&[claims_web], NOW);
    assert!(enc.requests.is_empty());
    assert!(
        enc.rejected[0].1.contains("event_source_url"),
        "{:?}",
        enc.rejected
    );

    // Empty means unset.
    let mut empty = backend_purchase();
    empty.params.insert("action_source".into(), json!(""));
    let body = body_json(single_request(&tag(&c).encode(&[empty], NOW)));
    assert_eq!(body["data"][0]["action_source"], "system_generated");
}

#[test]
fn an_action_source_parameter_meta_would_refuse_fails_only_its_event() {
    let t = tag(&cfg_from_event());
    let long = "x".repeat(5_000);
    let big = vec!["website"; 2_000];
    for (value, says) in [
        (json!("app"), "unknown variant `app`"),
        (json!("in_store"), "`physical_store`"),
        (json!(4), "must be a string, not a number"),
        (json!(long), "unknown variant"),
        (json!(big), "must be a string, not an array"),
    ] {
        let mut e = web_event("page_view", "pv-2");
        e.params.insert("action_source".into(), value.clone());
        let enc = t.encode(&[e, web_event("page_view", "pv-3")], NOW);
        assert_eq!(enc.rejected.len(), 1, "{value}: {:?}", enc.rejected);
        assert_eq!(enc.rejected[0].0, 0);
        let reason = &enc.rejected[0].1;
        assert!(
            reason.contains("action_source") && reason.contains(says),
            "{reason}"
        );
        assert!(reason.len() < 400, "{} bytes: {reason}", reason.len());
        // The good event still goes.
        let body = body_json(single_request(&enc));
        assert_eq!(body["data"].as_array().unwrap().len(), 1);
    }
}

#[test]
fn an_event_with_nothing_to_match_a_person_by_is_rejected() {
    let mut c = cfg();
    c.action_source = ActionSource::PhysicalStore;
    let t = tag(&c);
    let mut anonymous = backend_purchase();
    anonymous.user_id = None;
    // Redacted IPs identify no one either.
    anonymous.ip_override = Some("::".into());
    let enc = t.encode(&[anonymous, backend_purchase()], NOW);
    assert_eq!(enc.rejected.len(), 1, "{:?}", enc.rejected);
    assert_eq!(enc.rejected[0].0, 0);
    assert!(enc.rejected[0].1.contains("no customer information"));
    let body = body_json(single_request(&enc));
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["data"][0]["action_source"], "physical_store");
}

#[test]
fn action_source_names_meta_uses() {
    let parse = |name: &str| {
        toml::from_str::<MetaCapiTagConfig>(&format!(
            "name = \"m\"\npixel_id = \"1\"\naccess_token = \"t\"\naction_source = \"{name}\"\n"
        ))
        .map(|c| c.action_source)
    };
    for (name, want) in [
        ("website", ActionSource::Website),
        ("email", ActionSource::Email),
        ("phone_call", ActionSource::PhoneCall),
        ("chat", ActionSource::Chat),
        ("physical_store", ActionSource::PhysicalStore),
        ("system_generated", ActionSource::SystemGenerated),
        ("other", ActionSource::Other),
    ] {
        assert_eq!(parse(name).expect(name), want);
        assert_eq!(
            serde_json::to_value(want).unwrap(),
            name,
            "sent as configured"
        );
    }
    // Meta requires app_data / messaging_channel with these, which no client produces.
    for name in ["app", "business_messaging", "Website"] {
        assert!(parse(name).is_err(), "{name}");
    }
}

#[test]
fn no_nulls_on_the_wire() {
    let t = tag(&cfg());
    let mut e = purchase();
    e.value = Some(f64::NAN);
    e.items[0].quantity = Some(f64::INFINITY);
    let req = single_request(&t.encode(&[e], NOW)).clone();
    let raw = String::from_utf8_lossy(&req.body).into_owned();
    assert!(!raw.contains("null"), "{raw}");
    // Value falls back to the item sum with the non-finite quantity treated as 1.
    assert_eq!(
        body_json(&req)["data"][0]["custom_data"]["value"],
        json!(59.0)
    );
}

// ---------------------------------------------------------------- normalisation

fn norm(key: Key, input: &str) -> Option<String> {
    normalized(key, input, 2025)
}

#[test]
fn hash_vectors_from_reference() {
    for (input, hex) in [
        (
            "john.doe@example.com",
            "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f",
        ),
        (
            "16505551212",
            "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176",
        ),
        (
            "f",
            "252f10c83610ebca1a059c0bae8255eba2f95be4d1d7bcfa89d7248a82d9f111",
        ),
        (
            "us",
            "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621",
        ),
        (
            "ca",
            "6959097001d10501ac7d54c0bdb8db61420f658f2922cc26e46d536119a31126",
        ),
        (
            "94025",
            "b9a9cf3cd3723a2e91b7c23ecf68456e872b6e5d86e5cab7f3d45a7302da32c7",
        ),
    ] {
        assert_eq!(sha256_hex(input).as_str(), hex, "{input}");
    }
}

#[test]
fn normalize_and_hash_end_to_end() {
    let mut scratch = String::new();
    let cases = [
        (
            Key::Em,
            "  John.Doe@Example.COM ",
            "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f",
        ),
        (
            Key::Ph,
            "+1 (650) 555-1212",
            "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176",
        ),
        (
            Key::Ge,
            "Female",
            "252f10c83610ebca1a059c0bae8255eba2f95be4d1d7bcfa89d7248a82d9f111",
        ),
        (
            Key::Country,
            "United States",
            "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621",
        ),
        (
            Key::St,
            "California",
            "6959097001d10501ac7d54c0bdb8db61420f658f2922cc26e46d536119a31126",
        ),
        (
            Key::Zp,
            "94025-1234",
            "b9a9cf3cd3723a2e91b7c23ecf68456e872b6e5d86e5cab7f3d45a7302da32c7",
        ),
    ];
    for (key, input, hex) in cases {
        match normalize::normalize_and_hash(key, input, 2025, &mut scratch) {
            normalize::Hashed::Value(h) => assert_eq!(h.as_str(), hex, "{key:?} {input}"),
            other => panic!("{key:?} {input}: {other:?}"),
        }
    }
    assert_eq!(
        normalize::normalize_and_hash(Key::Em, "   ", 2025, &mut scratch),
        normalize::Hashed::Absent
    );
    assert_eq!(
        normalize::normalize_and_hash(Key::Em, "nope", 2025, &mut scratch),
        normalize::Hashed::Invalid
    );
    // Already hashed: passed through (lower-cased), not re-hashed, for every key.
    let digest = "6959097001D10501AC7D54C0BDB8DB61420F658F2922CC26E46D536119A31126";
    match normalize::normalize_and_hash(Key::St, digest, 2025, &mut scratch) {
        normalize::Hashed::Value(h) => assert_eq!(h.as_str(), digest.to_ascii_lowercase()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn email() {
    assert_eq!(
        norm(Key::Em, "  John.Doe@Example.COM ").as_deref(),
        Some("john.doe@example.com")
    );
    assert_eq!(
        norm(Key::Em, "j.o.h.n@gmail.com").as_deref(),
        Some("j.o.h.n@gmail.com")
    );
    for bad in [
        "john",
        "john@example",
        "@example.com",
        "john@.com",
        "john@example.",
        "jo hn@example.com",
    ] {
        assert_eq!(norm(Key::Em, bad), None, "{bad}");
    }
}

#[test]
fn phone() {
    for (input, want) in [
        ("+1 (650) 555-1212", "16505551212"),
        ("0044 20 7946 0958", "442079460958"),
        ("+44 (0)20 7946 0958", "442079460958"),
        ("+49.30.1234567", "49301234567"),
        ("16505551212", "16505551212"),
    ] {
        assert_eq!(norm(Key::Ph, input).as_deref(), Some(want), "{input}");
    }
    for bad in [
        "07946 095812",
        "555-12",
        "+1 650 555 1212 ext 3",
        "tel:+16505551212",
        "1234567890123456",
        "+1 +650",
    ] {
        assert_eq!(norm(Key::Ph, bad), None, "{bad}");
    }
}

#[test]
fn names_and_city() {
    assert_eq!(norm(Key::Fn, "  Mary-Jane ").as_deref(), Some("maryjane"));
    assert_eq!(norm(Key::Ln, "O'Brien").as_deref(), Some("obrien"));
    assert_eq!(norm(Key::Fn, "José").as_deref(), Some("josé"));
    assert_eq!(norm(Key::Ln, "van der Berg").as_deref(), Some("vanderberg"));
    assert_eq!(
        norm(Key::Ct, "San Francisco").as_deref(),
        Some("sanfrancisco")
    );
    assert_eq!(norm(Key::Ct, "New York 10").as_deref(), Some("newyork"));
    assert_eq!(
        norm(Key::Ct, "Saint-Étienne").as_deref(),
        Some("saintétienne")
    );
    assert_eq!(norm(Key::Fn, "-- 42 --"), None);
}

#[test]
fn state() {
    for (input, want) in [
        ("California", "ca"),
        ("CA", "ca"),
        (" ca ", "ca"),
        ("New York", "ny"),
        ("District of Columbia", "dc"),
        ("Québec", "qc"),
        ("Bavaria", "bavaria"),
        ("Île-de-France", "îledefrance"),
    ] {
        assert_eq!(norm(Key::St, input).as_deref(), Some(want), "{input}");
    }
    assert_eq!(norm(Key::St, "C"), None);
    assert_eq!(norm(Key::St, "12"), None);
}

#[test]
fn zip() {
    for (input, want) in [
        ("94025-1234", "94025"),
        ("94025", "94025"),
        (" SW1A 1AA", "sw1a1aa"),
        ("1000-001", "1000001"),
        ("K1A 0B1", "k1a0b1"),
    ] {
        assert_eq!(norm(Key::Zp, input).as_deref(), Some(want), "{input}");
    }
    for bad in ["1", "94025#", "—"] {
        assert_eq!(norm(Key::Zp, bad), None, "{bad}");
    }
}

#[test]
fn country() {
    for (input, want) in [
        ("United States", "us"),
        ("USA", "us"),
        ("us", "us"),
        ("U.S.", "us"),
        ("United Kingdom", "gb"),
        ("UK", "gb"),
        ("Germany", "de"),
        ("Deutschland", "de"),
        ("FR", "fr"),
        ("España", "es"),
    ] {
        assert_eq!(norm(Key::Country, input).as_deref(), Some(want), "{input}");
    }
    for bad in ["Atlantis", "zz", "x", "123"] {
        assert_eq!(norm(Key::Country, bad), None, "{bad}");
    }
}

#[test]
fn date_of_birth() {
    for (input, want) in [
        ("1990-02-14", "19900214"),
        ("19900214", "19900214"),
        ("1990/2/4", "19900204"),
        ("1990-02-14T00:00:00Z", "19900214"),
        ("14/02/1990", "19900214"),
        ("02/15/1990", "19900215"),
        ("05.05.1990", "19900505"),
        ("2000-02-29", "20000229"),
    ] {
        assert_eq!(norm(Key::Db, input).as_deref(), Some(want), "{input}");
    }
    for bad in [
        "02/03/1990",
        "1900-02-29",
        "1990-13-01",
        "1990-04-31",
        "1889-01-01",
        "2030-01-01",
        "14 Feb 1990",
        "90-02-14",
        "1990-02",
    ] {
        assert_eq!(norm(Key::Db, bad), None, "{bad}");
    }
}

#[test]
fn gender() {
    for (input, want) in [
        ("Female", "f"),
        ("F", "f"),
        ("woman", "f"),
        ("Male", "m"),
        (" m ", "m"),
        ("MAN", "m"),
    ] {
        assert_eq!(norm(Key::Ge, input).as_deref(), Some(want), "{input}");
    }
    assert_eq!(norm(Key::Ge, "other"), None);
}

#[test]
fn external_id() {
    assert_eq!(
        norm(Key::ExternalId, " User 123 ").as_deref(),
        Some("user123")
    );
    assert_eq!(norm(Key::ExternalId, "ABC-42").as_deref(), Some("abc-42"));
}

#[test]
fn year_of_instants() {
    assert_eq!(normalize::year_of(0), 1970);
    assert_eq!(normalize::year_of(NOW), 2025);
    // 2024-12-31T23:59:59.999Z and one millisecond later.
    assert_eq!(normalize::year_of(1_735_689_599_999), 2024);
    assert_eq!(normalize::year_of(1_735_689_600_000), 2025);
    assert_eq!(normalize::year_of(-1), 1969);
}

#[test]
fn lookup_tables_are_consistent() {
    let (iso, countries, regions) = normalize::tables();
    assert_eq!(iso.len(), 249, "ISO 3166-1 has 249 alpha-2 codes");
    assert!(iso.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
    for (name, code) in countries {
        assert!(iso.binary_search(code).is_ok(), "{name} → {code}");
    }
    for (name, code) in regions {
        assert!(
            code.len() == 2 && code.bytes().all(|b| b.is_ascii_lowercase()),
            "{name}"
        );
    }
}

// ---------------------------------------------------------------- responses

fn envelope(code: i64, subcode: Option<i64>, transient: bool, message: &str) -> Vec<u8> {
    let mut err = json!({
        "message": message,
        "type": "OAuthException",
        "code": code,
        "is_transient": transient,
        "fbtrace_id": "A1b2C3"
    });
    if let Some(s) = subcode {
        err["error_subcode"] = json!(s);
    }
    serde_json::to_vec(&json!({ "error": err })).expect("json")
}

#[test]
fn classify_success() {
    let t = tag(&cfg());
    let h = HeaderMap::new();
    let body = br#"{"events_received":1,"messages":[],"fbtrace_id":"A1b2C3"}"#;
    assert_eq!(t.classify(StatusCode::OK, &h, body), Outcome::Delivered);
}

#[test]
fn classify_transient_and_throttling() {
    let t = tag(&cfg());
    let mut h = HeaderMap::new();
    h.insert(::http::header::RETRY_AFTER, "30".parse().expect("header"));
    let out = t.classify(
        StatusCode::BAD_REQUEST,
        &h,
        &envelope(
            2,
            None,
            true,
            "An unexpected error has occurred. Please retry your request later.",
        ),
    );
    match out {
        Outcome::Retry { after, reason } => {
            assert_eq!(after, Some(Duration::from_secs(30)));
            assert!(reason.contains("code 2"), "{reason}");
            assert!(reason.contains("fbtrace_id A1b2C3"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    for code in [1, 4, 17, 341, 613] {
        let out = t.classify(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            &envelope(code, Some(1_487_742), false, "rate limited"),
        );
        assert!(
            matches!(out, Outcome::Retry { after: None, .. }),
            "code {code}: {out:?}"
        );
    }
}

#[test]
fn classify_invalid_token() {
    let t = tag(&cfg());
    // Graph echoes malformed tokens in its messages: the reason must not carry it.
    let body = envelope(
        190,
        Some(463),
        false,
        &format!("Malformed access token {TOKEN}"),
    );
    match t.classify(StatusCode::BAD_REQUEST, &HeaderMap::new(), &body) {
        Outcome::Rejected { reason } => {
            assert!(
                reason.starts_with("access token invalid or expired: generate a new one in Events Manager → Settings → Conversions API"),
                "{reason}"
            );
            assert!(reason.contains("code 190 subcode 463"), "{reason}");
            assert!(!reason.contains(TOKEN), "{reason}");
            assert!(reason.contains("[redacted]"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The error log is rate limited per tag.
    let fresh = tag(&cfg());
    assert!(fresh.token_log_due());
    assert!(!fresh.token_log_due());
}

#[test]
fn classify_invalid_parameter() {
    let t = tag(&cfg());
    let body = envelope(100, Some(2_804_003), false, "Invalid parameter");
    match t.classify(StatusCode::BAD_REQUEST, &HeaderMap::new(), &body) {
        Outcome::Rejected { reason } => {
            assert_eq!(
                reason,
                "Meta error code 100 subcode 2804003 (OAuthException), HTTP 400: Invalid parameter [fbtrace_id A1b2C3]"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn classify_without_envelope() {
    let t = tag(&cfg());
    let mut h = HeaderMap::new();
    h.insert(::http::header::RETRY_AFTER, "5".parse().expect("header"));
    assert_eq!(
        t.classify(StatusCode::TOO_MANY_REQUESTS, &h, b""),
        Outcome::Retry {
            after: Some(Duration::from_secs(5)),
            reason: "HTTP 429".into()
        }
    );
    assert!(matches!(
        t.classify(
            StatusCode::INTERNAL_SERVER_ERROR,
            &HeaderMap::new(),
            b"<html>oops</html>"
        ),
        Outcome::Retry { after: None, .. }
    ));
    // 5xx with an envelope that is not marked transient is still a server failure: retried.
    assert!(matches!(
        t.classify(
            StatusCode::SERVICE_UNAVAILABLE,
            &HeaderMap::new(),
            &envelope(100, None, false, "x")
        ),
        Outcome::Retry { .. }
    ));
    // A token straddling the quoting limit is still removed whole.
    let long = format!("{}{TOKEN}", "x".repeat(545));
    match t.classify(
        StatusCode::BAD_REQUEST,
        &HeaderMap::new(),
        &envelope(100, None, false, &long),
    ) {
        Outcome::Rejected { reason } => {
            assert!(!reason.contains("EAAB"), "{reason}");
            assert!(reason.chars().count() <= 600, "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let long_body = format!("{}{TOKEN}", "y".repeat(295));
    match t.classify(
        StatusCode::BAD_REQUEST,
        &HeaderMap::new(),
        long_body.as_bytes(),
    ) {
        Outcome::Rejected { reason } => assert!(!reason.contains("EAAB"), "{reason}"),
        other => panic!("{other:?}"),
    }
    match t.classify(
        StatusCode::FORBIDDEN,
        &HeaderMap::new(),
        format!("denied {TOKEN}").as_bytes(),
    ) {
        Outcome::Rejected { reason } => assert_eq!(reason, "HTTP 403: denied [redacted]"),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------- secrets and config

#[test]
fn redact_removes_token_secret_and_proof() {
    let t = tag(&cfg());
    let req = single_request(&t.encode(&[web_event("page_view", "x")], NOW)).clone();
    assert!(req.url.contains(TOKEN) && req.url.contains(PROOF));
    let text = format!("POST {} failed; secret {APP_SECRET}", req.url);
    let red = t.redact(&text);
    assert_eq!(
        red,
        "POST https://graph.facebook.com/v24.0/123456789012345/events?access_token=[redacted]&appsecret_proof=[redacted] failed; secret [redacted]"
    );
    assert_eq!(t.redact("nothing here"), "nothing here");
    let dbg = format!("{t:?}");
    assert!(
        !dbg.contains(TOKEN) && !dbg.contains(PROOF) && !dbg.contains(APP_SECRET),
        "{dbg}"
    );
}

#[test]
fn token_is_percent_encoded_and_redacted_in_both_forms() {
    let mut c = cfg();
    c.access_token = Secret::new("EAA/b+c=");
    c.app_secret = None;
    c.endpoint = "http://127.0.0.1:9000/meta/".into();
    let t = tag(&c);
    let req = single_request(&t.encode(&[web_event("page_view", "x")], NOW)).clone();
    assert_eq!(
        req.url,
        "http://127.0.0.1:9000/meta/v24.0/123456789012345/events?access_token=EAA%2Fb%2Bc%3D"
    );
    assert_eq!(
        t.redact(&format!("{} and EAA/b+c=", req.url)),
        "http://127.0.0.1:9000/meta/v24.0/123456789012345/events?access_token=[redacted] and [redacted]"
    );
}

#[test]
fn config_validation() {
    let mut c = cfg();
    c.pixel_id = "px-1".into();
    c.access_token = Secret::new("");
    c.api_version = "24".into();
    c.endpoint = "graph.facebook.com".into();
    c.batch_max = 1001;
    c.test_event_code = Some(" ".into());
    c.app_secret = Some(Secret::new(""));
    c.timeout_ms = 0;
    c.event_names.insert("generate_lead".into(), " ".into());
    let problems = MetaCapiTag::from_config(&c).expect_err("invalid config");
    let keys: Vec<&str> = problems
        .iter()
        .map(|p| p.split(':').next().unwrap_or(""))
        .collect();
    assert_eq!(
        keys,
        vec![
            "pixel_id",
            "access_token",
            "api_version",
            "endpoint",
            "test_event_code",
            "app_secret",
            "batch_max",
            "timeout_ms",
            "event_names.generate_lead"
        ],
        "{problems:?}"
    );
    let mut c = cfg();
    c.batch_max = 0;
    assert!(MetaCapiTag::from_config(&c).is_err());
    for v in ["v24.0", "v3.10"] {
        let mut c = cfg();
        c.api_version = v.into();
        assert!(MetaCapiTag::from_config(&c).is_ok(), "{v}");
    }
    for v in ["v24", "24.0", "v24.0.1", "vx.0"] {
        let mut c = cfg();
        c.api_version = v.into();
        assert!(MetaCapiTag::from_config(&c).is_err(), "{v}");
    }
    let mut c = cfg();
    c.endpoint = "https://graph.facebook.com?x=1".into();
    assert!(MetaCapiTag::from_config(&c).is_err());
}

#[test]
fn config_deserializes_with_defaults() {
    let c: MetaCapiTagConfig = toml::from_str(
        r#"
        name = "meta"
        pixel_id = "123"
        access_token = "tok"
        "#,
    )
    .expect("config");
    assert_eq!(c.api_version, "v24.0");
    assert_eq!(c.endpoint, "https://graph.facebook.com");
    assert!(c.forward_unmapped);
    assert!(!c.purchase_event_id_from_transaction);
    assert_eq!(c.batch_max, 250);
    assert_eq!(c.timeout_ms, 1500);
    assert_eq!(c.action_source, ActionSource::Website);
    let t = tag(&c);
    assert_eq!(t.kind(), "meta_capi");
}

#[test]
fn ga4_automatic_events_are_skipped_unless_mapped() {
    let m = Mapper {
        overrides: [("scroll".to_string(), "Scroll".to_string())]
            .into_iter()
            .collect(),
        forward_unmapped: true,
        purchase_event_id_from_transaction: false,
        action_source: ActionSource::Website,
        action_source_from_event: false,
    };
    assert!(matches!(
        m.meta_name("session_start"),
        Err(NotSent::Skipped(_))
    ));
    assert!(matches!(
        m.meta_name("user_engagement"),
        Err(NotSent::Skipped(_))
    ));
    assert_eq!(m.meta_name("scroll"), Ok("Scroll"));
    assert_eq!(m.meta_name("my_custom"), Ok("my_custom"));
}

#[test]
fn meta_declares_its_seven_day_limit() {
    let rules = tag(&cfg()).delivery_rules();
    assert_eq!(rules.vendor, "Meta");
    assert_eq!(
        rules.max_event_age,
        Some(std::time::Duration::from_secs(7 * 24 * 3600))
    );
}
