use std::collections::BTreeMap;
use std::time::Duration;

use ::http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Value};

use super::*;
use crate::event::{Event, Item};

/// 2025-12-05T05:36:40Z
const NOW: i64 = 1_764_913_000_000;
const TOKEN: &str = "tt-access-token-123";
const UA: &str = "Mozilla/5.0 (X11; Linux x86_64)";

fn cfg() -> TikTokTagConfig {
    TikTokTagConfig {
        name: "tiktok".into(),
        trigger: Default::default(),
        pixel_code: "C4ABCDEF1234567890AB".into(),
        access_token: Secret::new(TOKEN),
        endpoint: "https://business-api.tiktok.com".into(),
        test_event_code: None,
        event_names: BTreeMap::new(),
        forward_unmapped: true,
        batch_max: 1000,
        timeout_ms: 5000,
    }
}

fn tag(c: &TikTokTagConfig) -> TikTokTag {
    match TikTokTag::from_config(c) {
        Ok(t) => t,
        Err(p) => panic!("config rejected: {p:?}"),
    }
}

fn purchase() -> Event {
    let mut e = Event {
        event_name: "purchase".into(),
        event_id: "ev-1".into(),
        timestamp_ms: NOW - 10_500,
        source: "ga4".into(),
        user_agent: Some(UA.into()),
        ip_override: Some("203.0.113.7".into()),
        page_location: Some("https://shop.example.com/checkout/done".into()),
        page_referrer: Some("https://shop.example.com/cart".into()),
        currency: Some("eur".into()),
        transaction_id: Some("10023".into()),
        user_id: Some("  User123 ".into()),
        items: vec![Item {
            item_id: Some("SKU1".into()),
            item_name: Some("Shirt".into()),
            item_category: Some("Apparel".into()),
            item_brand: Some("X".into()),
            price: Some(25.0),
            quantity: Some(2.0),
            ..Default::default()
        }],
        ..Default::default()
    };
    e.user_data.email_address = Some(" John.Doe@Example.COM ".into());
    e.user_data.phone_number = Some("+1 (213) 373-4253".into());
    e.identity.ttclid = Some("E.C.P.CqQBclick".into());
    e.identity.ttp = Some("01K5Y2QHK3PRN35DHHJTBYE973_.tt.1".into());
    e
}

fn body(enc: &Encoded) -> Value {
    assert_eq!(enc.requests.len(), 1, "{enc:?}");
    serde_json::from_slice(&enc.requests[0].0.body).unwrap()
}

#[test]
fn purchase_golden_request() {
    let t = tag(&cfg());
    let enc = t.encode(&[purchase()], NOW);
    let (req, idx) = &enc.requests[0];
    assert_eq!(idx, &vec![0]);
    assert_eq!(req.method, Method::POST);
    assert_eq!(
        req.url,
        "https://business-api.tiktok.com/open_api/v1.3/event/track/"
    );
    assert_eq!(
        req.headers,
        vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("access-token".to_string(), TOKEN.to_string()),
        ]
    );
    // Hashes: sha256sum of `john.doe@example.com`, `+12133734253`, `User123`.
    assert_eq!(
        body(&enc),
        json!({
            "event_source": "web",
            "event_source_id": "C4ABCDEF1234567890AB",
            "data": [{
                "event": "CompletePayment",
                "event_time": 1_764_912_989,
                "event_id": "ev-1",
                "user": {
                    "email": "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f",
                    "phone": "9f7ec22d72092cd3c0b58726ed9c2d91b92e51a3f29837508fb2948bb22dd2fd",
                    "external_id": "a61a8adf60038792a2cb88e670b20540a9d6c2ca204ab754fc768950e79e7d36",
                    "ttclid": "E.C.P.CqQBclick",
                    "ttp": "01K5Y2QHK3PRN35DHHJTBYE973_.tt.1",
                    "ip": "203.0.113.7",
                    "user_agent": UA
                },
                "page": {
                    "url": "https://shop.example.com/checkout/done",
                    "referrer": "https://shop.example.com/cart"
                },
                "properties": {
                    "contents": [{
                        "content_id": "SKU1", "content_type": "product", "content_name": "Shirt",
                        "content_category": "Apparel", "brand": "X", "price": 25.0, "quantity": 2
                    }],
                    "content_type": "product",
                    "currency": "EUR",
                    "value": 50.0,
                    "order_id": "10023"
                }
            }]
        })
    );
    // The body is compact JSON with the fixed fields first, as built once per tag.
    assert!(String::from_utf8_lossy(&req.body).starts_with(
        r#"{"event_source":"web","event_source_id":"C4ABCDEF1234567890AB","data":[{"#
    ));
}

#[test]
fn names_map_from_ga4_and_overrides_and_test_code() {
    let mut c = cfg();
    c.event_names
        .insert("sign_up".into(), "SubmitApplication".into());
    c.test_event_code = Some("TEST123".into());
    let t = tag(&c);
    let ev = |name: &str| Event {
        event_name: name.into(),
        event_id: format!("id-{name}"),
        timestamp_ms: NOW,
        ..Default::default()
    };
    let events = [
        ev("page_view"),
        ev("add_to_cart"),
        ev("sign_up"),
        ev("generate_lead"),
        ev("my_custom"),
        ev("user_engagement"),
    ];
    let enc = t.encode(&events, NOW);
    let b = body(&enc);
    let names: Vec<&str> = b["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec![
            "Pageview",
            "AddToCart",
            "SubmitApplication",
            "SubmitForm",
            "my_custom"
        ]
    );
    assert_eq!(b["test_event_code"], "TEST123");
    assert_eq!(enc.skipped.len(), 1);
    assert_eq!(enc.skipped[0].0, 5);
    // An event with nothing but a name still goes (TikTok decides what to match it by).
    assert_eq!(b["data"][0]["user"], json!({}));

    let mut c = cfg();
    c.forward_unmapped = false;
    let enc = tag(&c).encode(&[ev("my_custom")], NOW);
    assert!(enc.requests.is_empty());
    assert!(enc.skipped[0].1.contains("forward_unmapped"), "{enc:?}");
}

#[test]
fn batches_split_at_batch_max_and_prehashed_values_pass() {
    let mut c = cfg();
    c.batch_max = 2;
    let t = tag(&c);
    let mut e = purchase();
    e.user_data.email_address = None;
    e.user_data.sha256_email_address = Some("A".repeat(64));
    e.user_data.phone_number = Some("0123 national".into());
    let events = [e.clone(), e.clone(), e];
    let enc = t.encode(&events, NOW);
    assert_eq!(enc.requests.len(), 2);
    assert_eq!(enc.requests[0].1, vec![0, 1]);
    assert_eq!(enc.requests[1].1, vec![2]);
    let b: Value = serde_json::from_slice(&enc.requests[1].0.body).unwrap();
    assert_eq!(b["data"][0]["user"]["email"], "a".repeat(64));
    assert!(
        b["data"][0]["user"].get("phone").is_none(),
        "a phone that is no E.164 number is dropped, not hashed"
    );
}

fn classify(t: &TikTokTag, status: u16, body: &str) -> Outcome {
    t.classify(
        StatusCode::from_u16(status).unwrap(),
        &HeaderMap::new(),
        body.as_bytes(),
    )
}

#[test]
fn success_is_code_zero_in_the_body() {
    let t = tag(&cfg());
    assert_eq!(
        classify(
            &t,
            200,
            r#"{"code":0,"message":"OK","request_id":"r1","data":{}}"#
        ),
        Outcome::Delivered
    );
    assert_eq!(
        classify(&t, 200, r#"{"code":20001,"message":"partial"}"#),
        Outcome::Delivered
    );
    assert_eq!(
        classify(
            &t,
            200,
            r#"{"code":40002,"message":"Invalid event_source_id","request_id":"r2"}"#
        ),
        Outcome::Rejected {
            reason: "TikTok code 40002: Invalid event_source_id [request_id r2]".into()
        }
    );
    assert!(matches!(
        classify(&t, 200, r#"{"code":40001,"message":"No permission"}"#),
        Outcome::Rejected { .. }
    ));
    let mut h = HeaderMap::new();
    h.insert(::http::header::RETRY_AFTER, "7".parse().unwrap());
    assert_eq!(
        t.classify(
            StatusCode::OK,
            &h,
            br#"{"code":40100,"message":"Too many requests"}"#
        ),
        Outcome::Retry {
            after: Some(Duration::from_secs(7)),
            reason: "TikTok code 40100: Too many requests".into()
        }
    );
    // Codes the reference has no verdict for follow the HTTP status.
    assert!(matches!(
        classify(&t, 503, r#"{"code":51000,"message":"busy"}"#),
        Outcome::Retry { .. }
    ));
    assert!(matches!(
        classify(&t, 200, r#"{"code":40999,"message":"?"}"#),
        Outcome::Rejected { .. }
    ));
    // No envelope: HTTP rules; a 200 without one is not a success.
    assert!(matches!(
        classify(&t, 502, "bad gateway"),
        Outcome::Retry { .. }
    ));
    assert!(matches!(
        classify(&t, 200, "<html>"),
        Outcome::Rejected { .. }
    ));
}

#[test]
fn the_token_never_shows() {
    let t = tag(&cfg());
    let out = classify(
        &t,
        200,
        &format!(r#"{{"code":40001,"message":"token {TOKEN} has no permission"}}"#),
    );
    let Outcome::Rejected { reason } = out else {
        panic!("{out:?}")
    };
    assert!(
        !reason.contains(TOKEN) && reason.contains("[redacted]"),
        "{reason}"
    );
    assert!(!format!("{t:?}").contains(TOKEN));
    assert_eq!(
        t.redact(&format!("access-token: {TOKEN}")),
        "access-token: [redacted]"
    );
}

#[test]
fn build_errors_name_the_key() {
    let mut c = cfg();
    c.pixel_code = "C4 ABC".into();
    c.access_token = Secret::new(" ");
    c.endpoint = "business-api.tiktok.com".into();
    c.batch_max = 1001;
    c.test_event_code = Some(" ".into());
    c.event_names.insert("purchase".into(), " ".into());
    let err = TikTokTag::from_config(&c).unwrap_err().join("\n");
    for key in [
        "pixel_code:",
        "access_token:",
        "endpoint:",
        "batch_max:",
        "test_event_code:",
        "event_names.purchase:",
    ] {
        assert!(err.contains(key), "{key} in {err}");
    }
}

#[test]
fn ttclid_from_the_page_url_when_no_cookie_was_kept() {
    let t = tag(&cfg());
    let mut e = purchase();
    e.identity.ttclid = None;
    e.page_location = Some("https://shop.example.com/p?ttclid=E.C.P.fromurl".into());
    let b = body(&t.encode(&[e], NOW));
    assert_eq!(b["data"][0]["user"]["ttclid"], "E.C.P.fromurl");
}
