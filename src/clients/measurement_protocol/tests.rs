use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, Method, StatusCode};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::json::Json;
use super::validate::{self, Context};
use super::*;
use crate::event::{ConsentState, Event, GaSession, Item};

/// 5 s after the §2.6 example's `timestamp_micros`.
const NOW_MS: i64 = 1_764_913_005_000;

const EXAMPLE: &str = r#"{"client_id":"1234567890.1764912990","user_id":"u_8842","timestamp_micros":1764913000000000,
 "consent":{"ad_user_data":"GRANTED","ad_personalization":"DENIED"},
 "ip_override":"203.0.113.7","user_agent":"Mozilla/5.0 (...)",
 "user_properties":{"customer_tier":{"value":"gold"}},
 "events":[{"name":"purchase","params":{"session_id":"1764912991","engagement_time_msec":2311,
   "currency":"EUR","value":134,"transaction_id":"T-1024","tax":21.4,"shipping":4.9,
   "items":[{"item_id":"SKU_123","item_name":"Trail Shoe","item_brand":"Acme","price":59,"quantity":2,"size":"42"},
            {"item_id":"SKU_777","item_name":"Socks","price":16,"quantity":1}]}}]}"#;

fn client() -> MeasurementProtocolClient {
    MeasurementProtocolClient::from_config(&MeasurementProtocolClientConfig::default()).unwrap()
}

fn client_with(secrets: &[&str], ids: &[&str]) -> MeasurementProtocolClient {
    MeasurementProtocolClient::from_config(&MeasurementProtocolClientConfig {
        api_secrets: secrets.iter().map(|s| Secret::new(*s)).collect(),
        measurement_ids: ids.iter().map(|s| s.to_string()).collect(),
    })
    .unwrap()
}

fn call(
    c: &MeasurementProtocolClient,
    method: Method,
    path: &str,
    query: &str,
    body: &[u8],
) -> Result<Parsed, ClientError> {
    let headers = HeaderMap::new();
    let req = HitRequest {
        method: &method,
        path,
        query,
        headers: &headers,
        host: "sgtm.example.com",
        body,
        client_ip: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
        now_ms: NOW_MS,
    };
    c.parse(&req)
}

fn collect(body: &str) -> Result<Parsed, ClientError> {
    call(
        &client(),
        Method::POST,
        COLLECT_PATH,
        "measurement_id=G-ABCDEF1234&api_secret=xxxx",
        body.as_bytes(),
    )
}

/// The debug endpoint's messages as `(fieldPath, validationCode)` pairs.
fn debug(body: &str) -> Vec<(String, String)> {
    let parsed = call(
        &client(),
        Method::POST,
        DEBUG_PATH,
        "measurement_id=G-ABCDEF1234",
        body.as_bytes(),
    )
    .unwrap();
    assert!(
        parsed.events.is_empty(),
        "the debug endpoint forwards nothing"
    );
    assert!(!parsed.set_cookies);
    let ClientResponse::Body {
        status,
        content_type,
        body,
        ..
    } = parsed.response
    else {
        panic!("debug answers a body, got {:?}", parsed.response)
    };
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/json");
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["validationMessages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert!(
                m["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{m}"
            );
            (
                m["fieldPath"].as_str().unwrap().to_owned(),
                m["validationCode"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn one(path: &str, code: &str) -> Vec<(String, String)> {
    vec![(path.to_owned(), code.to_owned())]
}

/// A valid body with one event whose params are `params`, plus extra top-level keys.
fn body_with(params: Value, extra: Value) -> String {
    let mut top = json!({"client_id": "1.2", "events": [{"name": "ok_event", "params": params}]});
    if let (Some(t), Value::Object(e)) = (top.as_object_mut(), extra) {
        t.extend(e);
    }
    top.to_string()
}

#[test]
fn example_2_6_maps_to_the_event_model() {
    let parsed = collect(EXAMPLE).unwrap();
    assert_eq!(parsed.response, ClientResponse::NoContent);
    assert!(
        !parsed.set_cookies,
        "server-to-server requests never get cookies"
    );

    let mut user_properties = Map::new();
    user_properties.insert("customer_tier".into(), json!("gold"));
    let mut params = Map::new();
    params.insert("tax".into(), json!(21.4));
    params.insert("shipping".into(), json!(4.9));
    let mut expected = Event {
        event_name: "purchase".into(),
        timestamp_ms: 1_764_913_000_000,
        client_id: Some("1234567890.1764912990".into()),
        user_id: Some("u_8842".into()),
        ip_override: Some("203.0.113.7".into()),
        user_agent: Some("Mozilla/5.0 (...)".into()),
        currency: Some("EUR".into()),
        value: Some(134.0),
        transaction_id: Some("T-1024".into()),
        items: vec![
            Item {
                item_id: Some("SKU_123".into()),
                item_name: Some("Trail Shoe".into()),
                item_brand: Some("Acme".into()),
                price: Some(59.0),
                quantity: Some(2.0),
                custom: vec![("size".into(), "42".into())],
                ..Default::default()
            },
            Item {
                item_id: Some("SKU_777".into()),
                item_name: Some("Socks".into()),
                price: Some(16.0),
                quantity: Some(1.0),
                ..Default::default()
            },
        ],
        ga: GaSession {
            measurement_id: Some("G-ABCDEF1234".into()),
            session_id: Some("1764912991".into()),
            engagement_time_msec: Some(2311),
            ..Default::default()
        },
        user_properties,
        params,
        ..Default::default()
    };
    expected.consent.ad_user_data = ConsentState::Granted;
    expected.consent.ad_personalization = ConsentState::Denied;
    assert_eq!(parsed.events, vec![expected]);

    assert_eq!(debug(EXAMPLE), vec![], "the reference example is valid");
}

#[test]
fn debug_body_has_googles_shape() {
    let body = r#"{"client_id":"1.2","events":[{"name":"_badEventName","params":{}}]}"#;
    let parsed = call(
        &client(),
        Method::POST,
        DEBUG_PATH,
        "measurement_id=G-X",
        body.as_bytes(),
    )
    .unwrap();
    let ClientResponse::Body { body, headers, .. } = parsed.response else {
        panic!("not a body")
    };
    assert!(headers.is_empty());
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        json!({"validationMessages": [{
            "fieldPath": "events",
            "description": "Event at index: [0] has invalid name [_badEventName]. Names must start with an alphabetic character.",
            "validationCode": "NAME_INVALID"
        }]})
    );

    let valid = call(
        &client(),
        Method::POST,
        DEBUG_PATH,
        "measurement_id=G-X",
        br#"{"client_id":"1.2","events":[{"name":"ok"}]}"#,
    )
    .unwrap();
    let ClientResponse::Body { body, .. } = valid.response else {
        panic!("not a body")
    };
    assert_eq!(body, br#"{"validationMessages":[]}"#);
}

#[test]
fn value_required() {
    assert_eq!(
        debug(r#"{"events":[{"name":"ok"}]}"#),
        one("client_id", "VALUE_REQUIRED")
    );
    assert_eq!(
        debug(r#"{"client_id":"1.2"}"#),
        one("events", "VALUE_REQUIRED")
    );
    assert_eq!(
        debug(r#"{"client_id":"1.2","events":[]}"#),
        one("events", "VALUE_REQUIRED")
    );
    assert_eq!(
        debug(r#"{"client_id":"1.2","events":[{"params":{}}]}"#),
        one("events", "VALUE_REQUIRED")
    );
    assert_eq!(
        debug(&body_with(json!({"items": [{"price": 1}]}), json!({}))),
        one("events.params.items", "VALUE_REQUIRED")
    );
    assert_eq!(
        debug(&body_with(
            json!({}),
            json!({"user_properties": {"tier": {"val": 1}}})
        )),
        one("user_properties", "VALUE_REQUIRED")
    );
    // Advisory: reported, but (see below) nothing is dropped for it.
    assert_eq!(
        debug(&body_with(
            json!({}),
            json!({"user_data": {"sha256_email_address": "a".repeat(64)}})
        )),
        one("user_id", "VALUE_REQUIRED")
    );
}

#[test]
fn value_invalid() {
    assert_eq!(
        debug(&body_with(
            json!({}),
            json!({"consent": {"ad_user_data": "YES"}})
        )),
        one("consent.ad_user_data", "VALUE_INVALID")
    );
    assert_eq!(
        debug(r#"{"client_id":1234,"events":[{"name":"ok"}]}"#),
        one("client_id", "VALUE_INVALID")
    );
    assert_eq!(
        debug(&body_with(json!({"value": "lots"}), json!({}))),
        one("events.params", "VALUE_INVALID")
    );
    assert_eq!(
        debug(&body_with(json!({"nested": {"a": 1}}), json!({}))),
        one("events.params", "VALUE_INVALID")
    );
    assert_eq!(
        debug(&body_with(json!({"currency": "euro"}), json!({}))),
        one("events.params", "VALUE_INVALID")
    );
    assert_eq!(
        debug(&body_with(
            json!({"items": [{"item_id": "a", "price": "cheap"}]}),
            json!({})
        )),
        one("events.params.items", "VALUE_INVALID")
    );
    assert_eq!(
        debug(&body_with(json!({}), json!({"ip_override": "not-an-ip"}))),
        one("ip_override", "VALUE_INVALID")
    );
    assert_eq!(
        debug(&body_with(
            json!({}),
            json!({"timestamp_micros": "yesterday"})
        )),
        one("timestamp_micros", "VALUE_INVALID")
    );
    assert_eq!(
        debug(&body_with(
            json!({}),
            json!({"user_id": "u1", "user_data": {"sha256_email_address": "a@example.com"}})
        )),
        one("user_data.sha256_email_address", "VALUE_INVALID")
    );
    assert_eq!(
        debug(r#"{"client_id":"1.2","events":["page_view"]}"#),
        one("events", "VALUE_INVALID")
    );
}

#[test]
fn name_invalid() {
    let long = "a".repeat(41);
    assert_eq!(
        debug(&format!(
            r#"{{"client_id":"1.2","events":[{{"name":"{long}"}}]}}"#
        )),
        one("events", "NAME_INVALID")
    );
    assert_eq!(
        debug(r#"{"client_id":"1.2","events":[{"name":"add-to-cart"}]}"#),
        one("events", "NAME_INVALID")
    );
    assert_eq!(
        debug(&body_with(json!({"1st": "x"}), json!({}))),
        one("events.params", "NAME_INVALID")
    );
    assert_eq!(
        debug(&body_with(json!({"a".repeat(41): "x"}), json!({}))),
        one("events.params", "NAME_INVALID")
    );
    assert_eq!(
        debug(&body_with(
            json!({}),
            json!({"user_properties": {"a".repeat(25): {"value": "x"}}})
        )),
        one("user_properties", "NAME_INVALID")
    );
    assert_eq!(
        debug(&body_with(
            json!({"items": [{"item_id": "a", "bad key": "x"}]}),
            json!({})
        )),
        one("events.params.items", "NAME_INVALID")
    );
    // Exactly at the limits is fine.
    assert_eq!(
        debug(&format!(
            r#"{{"client_id":"1.2","events":[{{"name":"{}","params":{{"{}":"x"}}}}]}}"#,
            "a".repeat(40),
            "b".repeat(40)
        )),
        vec![]
    );
}

#[test]
fn name_reserved() {
    for name in [
        "session_start",
        "first_visit",
        "user_engagement",
        "ga_custom",
        "firebase_x",
    ] {
        assert_eq!(
            debug(&format!(
                r#"{{"client_id":"1.2","events":[{{"name":"{name}"}}]}}"#
            )),
            one("events", "NAME_RESERVED"),
            "{name}"
        );
    }
    for param in [
        "ga_session_id",
        "google_x",
        "firebase_conversion",
        "firebase_y",
    ] {
        assert_eq!(
            debug(&body_with(json!({param: "1"}), json!({}))),
            one("events.params", "NAME_RESERVED"),
            "{param}"
        );
    }
    assert_eq!(
        debug(&body_with(
            json!({}),
            json!({"user_properties": {"first_open_time": {"value": 1}}})
        )),
        one("user_properties", "NAME_RESERVED")
    );
    // App-only reserved names are allowed on web streams.
    assert_eq!(
        debug(r#"{"client_id":"1.2","events":[{"name":"screen_view"}]}"#),
        vec![]
    );
}

#[test]
fn value_out_of_bounds() {
    let s = |n: usize| "x".repeat(n);
    assert_eq!(
        debug(&body_with(json!({"note": s(101)}), json!({}))),
        one("events.params", "VALUE_OUT_OF_BOUNDS")
    );
    assert_eq!(
        debug(&body_with(json!({"note": s(100)}), json!({}))),
        vec![]
    );
    // Page fields have GA's own, larger limits.
    assert_eq!(
        debug(&body_with(
            json!({"page_location": s(1000), "page_referrer": s(420), "page_title": s(300)}),
            json!({})
        )),
        vec![]
    );
    for (key, n) in [
        ("page_location", 1001),
        ("page_referrer", 421),
        ("page_title", 301),
    ] {
        assert_eq!(
            debug(&body_with(json!({key: s(n)}), json!({}))),
            one("events.params", "VALUE_OUT_OF_BOUNDS"),
            "{key}"
        );
    }
    assert_eq!(
        debug(&body_with(
            json!({}),
            json!({"user_properties": {"tier": {"value": s(37)}}})
        )),
        one("user_properties", "VALUE_OUT_OF_BOUNDS")
    );
    assert_eq!(
        debug(&body_with(
            json!({}),
            json!({"user_properties": {"tier": {"value": s(36)}}})
        )),
        vec![]
    );
    assert_eq!(
        debug(&body_with(
            json!({"items": [{"item_id": "a", "color": s(101)}]}),
            json!({})
        )),
        one("events.params.items", "VALUE_OUT_OF_BOUNDS")
    );
    assert_eq!(
        debug(&body_with(json!({}), json!({"user_id": s(257)}))),
        one("user_id", "VALUE_OUT_OF_BOUNDS")
    );
    let four_days_ago = (NOW_MS - 96 * 3600 * 1000) * 1000;
    assert_eq!(
        debug(&body_with(
            json!({}),
            json!({"timestamp_micros": four_days_ago})
        )),
        one("timestamp_micros", "VALUE_OUT_OF_BOUNDS")
    );
    assert_eq!(
        debug(&body_with(
            json!({"timestamp_micros": (NOW_MS + 3_600_000) * 1000}),
            json!({})
        )),
        one("events.params", "VALUE_OUT_OF_BOUNDS")
    );
}

#[test]
fn exceeded_max_entities() {
    let events: Vec<Value> = (0..26).map(|_| json!({"name": "ok"})).collect();
    assert_eq!(
        debug(&json!({"client_id": "1.2", "events": events}).to_string()),
        one("events", "EXCEEDED_MAX_ENTITIES")
    );
    let events: Vec<Value> = (0..25).map(|_| json!({"name": "ok"})).collect();
    assert_eq!(
        debug(&json!({"client_id": "1.2", "events": events}).to_string()),
        vec![]
    );

    let params: Map<String, Value> = (0..26).map(|i| (format!("p{i}"), json!(i))).collect();
    assert_eq!(
        debug(&body_with(Value::Object(params), json!({}))),
        one("events.params", "EXCEEDED_MAX_ENTITIES")
    );
    let props: Map<String, Value> = (0..26)
        .map(|i| (format!("u{i}"), json!({"value": i})))
        .collect();
    assert_eq!(
        debug(&body_with(json!({}), json!({"user_properties": props}))),
        one("user_properties", "EXCEEDED_MAX_ENTITIES")
    );
    let items: Vec<Value> = (0..201)
        .map(|i| json!({"item_id": format!("s{i}")}))
        .collect();
    assert_eq!(
        debug(&body_with(json!({"items": items}), json!({}))),
        one("events.params.items", "EXCEEDED_MAX_ENTITIES")
    );
    let item: Map<String, Value> = std::iter::once(("item_id".to_owned(), json!("a")))
        .chain((0..28).map(|i| (format!("c{i}"), json!("v"))))
        .collect();
    assert_eq!(
        debug(&body_with(json!({"items": [item]}), json!({}))),
        one("events.params.items", "EXCEEDED_MAX_ENTITIES")
    );
    let hashes: Vec<String> = (0..4).map(|_| "b".repeat(64)).collect();
    assert_eq!(
        debug(&body_with(
            json!({}),
            json!({"user_id": "u", "user_data": {"sha256_phone_number": hashes}})
        )),
        one("user_data.sha256_phone_number", "EXCEEDED_MAX_ENTITIES")
    );
}

#[test]
fn name_duplicated() {
    assert_eq!(
        debug(r#"{"client_id":"1.2","events":[{"name":"ok","params":{"a":1,"a":2}}]}"#),
        one("events.params", "NAME_DUPLICATED")
    );
    assert_eq!(
        debug(
            r#"{"client_id":"1.2","user_properties":{"t":{"value":1},"t":{"value":2}},"events":[{"name":"ok"}]}"#
        ),
        one("user_properties", "NAME_DUPLICATED")
    );
    assert_eq!(
        debug(r#"{"client_id":"1.2","client_id":"3.4","events":[{"name":"ok"}]}"#),
        one("client_id", "NAME_DUPLICATED")
    );
    assert_eq!(
        debug(
            r#"{"client_id":"1.2","events":[{"name":"ok","params":{"items":[{"item_id":"a","item_id":"b"}]}}]}"#
        ),
        one("events.params.items", "NAME_DUPLICATED")
    );
}

#[test]
fn debug_reports_every_problem_in_one_round_trip() {
    let body = json!({
        "events": [
            {"name": "_bad", "params": {"ga_x": 1}},
            {"name": "ok", "params": {"note": "x".repeat(101)}}
        ]
    });
    assert_eq!(
        debug(&body.to_string()),
        vec![
            ("client_id".into(), "VALUE_REQUIRED".into()),
            ("events".into(), "NAME_INVALID".into()),
            ("events.params".into(), "NAME_RESERVED".into()),
            ("events.params".into(), "VALUE_OUT_OF_BOUNDS".into()),
        ]
    );
}

fn names(p: &Parsed) -> Vec<&str> {
    p.events.iter().map(|e| e.event_name.as_str()).collect()
}

#[test]
fn production_drops_invalid_events_and_keeps_valid_ones() {
    let body = json!({
        "client_id": "1.2",
        "events": [
            {"name": "purchase", "params": {"value": 10, "currency": "eur"}},
            {"name": "_bad"},
            {"name": "session_start"},
            {"name": "sign_up", "params": {"method": "x".repeat(101), "ga_x": 1, "plan": "pro"}},
            "not an event"
        ]
    })
    .to_string();
    let parsed = collect(&body).unwrap();
    assert_eq!(parsed.response, ClientResponse::NoContent);
    assert_eq!(names(&parsed), vec!["purchase", "sign_up"]);
    assert_eq!(parsed.events[0].currency.as_deref(), Some("EUR"));
    // Field problems drop the field, as GA4's default RELAXED behaviour does.
    let sign_up = &parsed.events[1].params;
    assert_eq!(sign_up.get("plan"), Some(&json!("pro")));
    assert!(!sign_up.contains_key("method") && !sign_up.contains_key("ga_x"));

    let Json::Obj(top) = Json::parse(body.as_bytes()).unwrap() else {
        panic!()
    };
    let cx = Context {
        measurement_id: Some("G-X"),
        app_stream: false,
        now_ms: NOW_MS,
        collect_messages: false,
    };
    let outcome = validate::process(&top, &cx);
    assert!(outcome.messages.is_empty(), "production builds no messages");
    let mut dropped = outcome.dropped.clone();
    dropped.sort();
    assert_eq!(
        dropped,
        vec![
            ("event_invalid", 1),
            ("event_name_invalid", 1),
            ("event_name_reserved", 1),
            ("param_name_reserved", 1),
            ("param_value_too_long", 1),
        ]
    );
}

#[test]
fn enforce_recommendations_drops_the_whole_event_for_a_field_problem() {
    let body = json!({
        "client_id": "1.2",
        "validation_behavior": "ENFORCE_RECOMMENDATIONS",
        "events": [
            {"name": "sign_up", "params": {"method": "x".repeat(101)}},
            {"name": "login", "params": {"method": "email"}}
        ]
    });
    let parsed = collect(&body.to_string()).unwrap();
    assert_eq!(names(&parsed), vec!["login"]);

    let mut relaxed = body.clone();
    relaxed["validation_behavior"] = json!("RELAXED");
    assert_eq!(
        names(&collect(&relaxed.to_string()).unwrap()),
        vec!["sign_up", "login"]
    );
}

#[test]
fn request_level_problems_drop_everything_with_a_204() {
    for body in [
        r#"{"events":[{"name":"ok"}]}"#.to_owned(),
        json!({"client_id": "1.2", "events": (0..26).map(|_| json!({"name":"ok"})).collect::<Vec<_>>()})
            .to_string(),
        r#"{"client_id":"1.2","events":{"name":"ok"}}"#.to_owned(),
    ] {
        let parsed = collect(&body).unwrap();
        assert_eq!(parsed.response, ClientResponse::NoContent, "{body}");
        assert!(parsed.events.is_empty(), "{body}");
    }
}

#[test]
fn advisory_user_id_requirement_keeps_user_data() {
    let hash = "A".repeat(64);
    let body = body_with(
        json!({}),
        json!({"user_data": {
            "sha256_email_address": [hash, "b".repeat(64)],
            "sha256_phone_number": "c".repeat(64),
            "address": [{"sha256_first_name": "d".repeat(64), "sha256_street": "e".repeat(64),
                         "city": "paris", "country": "FR", "postal_code": "75001"},
                        {"city": "lyon"}]
        }}),
    );
    let parsed = collect(&body).unwrap();
    let u = &parsed.events[0].user_data;
    assert_eq!(
        u.sha256_email_address,
        Some("a".repeat(64)),
        "hex is lower-cased"
    );
    assert_eq!(u.sha256_phone_number, Some("c".repeat(64)));
    assert_eq!(u.address.sha256_first_name, Some("d".repeat(64)));
    assert_eq!(u.address.sha256_street, Some("e".repeat(64)));
    assert_eq!(u.address.city.as_deref(), Some("paris"));
    assert_eq!(u.address.country.as_deref(), Some("FR"));
    assert_eq!(u.address.postal_code.as_deref(), Some("75001"));
}

#[test]
fn timestamps_follow_googles_precedence_and_clamp() {
    let req_ts = (NOW_MS - 60_000) * 1000;
    let ev_ts = (NOW_MS - 120_000) * 1000;
    let body = json!({"client_id": "1.2", "timestamp_micros": req_ts, "events": [
        {"name": "a"},
        {"name": "b", "params": {"timestamp_micros": ev_ts.to_string()}}
    ]});
    let parsed = collect(&body.to_string()).unwrap();
    assert_eq!(parsed.events[0].timestamp_ms, NOW_MS - 60_000);
    assert_eq!(parsed.events[1].timestamp_ms, NOW_MS - 120_000);
    assert!(!parsed.events[1].params.contains_key("timestamp_micros"));

    let old = json!({"client_id": "1.2", "timestamp_micros": (NOW_MS - 100 * 3_600_000) * 1000,
                     "events": [{"name": "a"}]});
    let parsed = collect(&old.to_string()).unwrap();
    assert_eq!(
        parsed.events[0].timestamp_ms,
        NOW_MS - 72 * 3_600_000,
        "clamped to 72 h"
    );

    let none = collect(r#"{"client_id":"1.2","events":[{"name":"a"}]}"#).unwrap();
    assert_eq!(
        none.events[0].timestamp_ms, 0,
        "the ingress stamps the receive time"
    );
}

#[test]
fn typed_params_and_request_fields() {
    let body = json!({
        "client_id": "1.2",
        "non_personalized_ads": true,
        "device": {"language": "fr-FR", "screen_resolution": "1280x720", "category": "desktop"},
        "user_location": {"city": "Paris", "country_id": "FR"},
        "events": [{"name": "page_view", "params": {
            "page_location": "https://shop.example.com/?fbclid=x",
            "page_referrer": "https://google.com/",
            "page_title": "Shop",
            "event_id": "evt-1",
            "session_id": 1764912991,
            "engagement_time_msec": "100",
            "debug_mode": true,
            "transaction_id": 1024,
            "count": 3,
            "flag": false
        }}]
    });
    let parsed = collect(&body.to_string()).unwrap();
    let e = &parsed.events[0];
    assert_eq!(e.event_id, "evt-1");
    assert_eq!(
        e.page_location.as_deref(),
        Some("https://shop.example.com/?fbclid=x")
    );
    assert_eq!(e.page_referrer.as_deref(), Some("https://google.com/"));
    assert_eq!(e.page_title.as_deref(), Some("Shop"));
    assert_eq!(e.language.as_deref(), Some("fr-FR"));
    assert_eq!(e.screen_resolution.as_deref(), Some("1280x720"));
    assert_eq!(e.ga.session_id.as_deref(), Some("1764912991"));
    assert_eq!(e.ga.engagement_time_msec, Some(100));
    assert!(e.ga.debug_mode);
    assert_eq!(e.transaction_id.as_deref(), Some("1024"));
    assert_eq!(e.consent.npa.as_deref(), Some("1"));
    assert_eq!(
        Value::Object(e.params.clone()),
        json!({"count": 3, "flag": false}),
        "typed params do not repeat in params"
    );
    assert_eq!(
        e.ip_override, None,
        "the request's own IP is the sender's server"
    );
    assert_eq!(e.user_agent, None);
}

#[test]
fn app_streams_use_app_instance_id() {
    let c = client();
    let id = "0123456789abcdef0123456789ABCDEF";
    let body = format!(r#"{{"app_instance_id":"{id}","events":[{{"name":"level_up"}}]}}"#);
    let p = call(
        &c,
        Method::POST,
        COLLECT_PATH,
        "firebase_app_id=1:123:android:abc",
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(p.events[0].client_id.as_deref(), Some(id));
    assert_eq!(p.events[0].ga.measurement_id, None);

    let p = call(
        &c,
        Method::POST,
        DEBUG_PATH,
        "firebase_app_id=1:123:android:abc",
        br#"{"app_instance_id":"short","events":[{"name":"screen_view"}]}"#,
    )
    .unwrap();
    let ClientResponse::Body { body, .. } = p.response else {
        panic!()
    };
    let v: Value = serde_json::from_slice(&body).unwrap();
    let codes: Vec<(&str, &str)> = v["validationMessages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["fieldPath"].as_str().unwrap(),
                m["validationCode"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            ("app_instance_id", "VALUE_INVALID"),
            ("events", "NAME_RESERVED")
        ]
    );
}

#[test]
fn api_secret_and_measurement_id_gates() {
    let c = client_with(&["s3cret", "other-secret"], &["G-ABC"]);
    let body = br#"{"client_id":"1.2","events":[{"name":"ok"}]}"#;
    let post = |q: &str| call(&c, Method::POST, COLLECT_PATH, q, body);
    assert!(matches!(
        post("measurement_id=G-ABC"),
        Err(ClientError::Unauthorized(_))
    ));
    assert!(matches!(
        post("measurement_id=G-ABC&api_secret=s3cre"),
        Err(ClientError::Unauthorized(_))
    ));
    assert!(matches!(
        post("measurement_id=G-ABC&api_secret=S3CRET"),
        Err(ClientError::Unauthorized(_))
    ));
    assert_eq!(
        post("measurement_id=G-ABC&api_secret=s3cret")
            .unwrap()
            .events
            .len(),
        1
    );
    assert_eq!(
        post("measurement_id=G-ABC&api_secret=other-secret")
            .unwrap()
            .events
            .len(),
        1
    );
    assert_eq!(
        post("api_secret=other%2Dsecret&measurement_id=G-ABC")
            .unwrap()
            .events
            .len(),
        1
    );
    assert!(matches!(
        post("measurement_id=G-OTHER&api_secret=s3cret"),
        Err(ClientError::Unauthorized(_))
    ));
    let err = post("measurement_id=G-OTHER&api_secret=s3cret").unwrap_err();
    assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
    // The debug endpoint is gated too: it is this client's surface, not Google's.
    assert!(matches!(
        call(&c, Method::POST, DEBUG_PATH, "measurement_id=G-ABC", body),
        Err(ClientError::Unauthorized(_))
    ));
}

#[test]
fn http_level_errors() {
    let c = client();
    assert!(c.claims(&Method::POST, COLLECT_PATH));
    assert!(c.claims(&Method::GET, DEBUG_PATH));
    assert!(!c.claims(&Method::POST, "/mp/collect/x"));
    assert!(!c.claims(&Method::POST, "/g/collect"));
    assert_eq!(
        call(&c, Method::GET, COLLECT_PATH, "measurement_id=G-X", b""),
        Err(ClientError::MethodNotAllowed)
    );
    assert_eq!(
        call(&c, Method::PUT, DEBUG_PATH, "measurement_id=G-X", b"{}"),
        Err(ClientError::MethodNotAllowed)
    );
    let bad = call(
        &c,
        Method::POST,
        COLLECT_PATH,
        "measurement_id=G-X",
        b"{\"client_id\":",
    );
    assert!(
        matches!(&bad, Err(ClientError::BadRequest(m)) if m.contains("not valid JSON")),
        "{bad:?}"
    );
    let bad = call(&c, Method::POST, COLLECT_PATH, "measurement_id=G-X", b"[1]");
    assert!(
        matches!(&bad, Err(ClientError::BadRequest(m)) if m.contains("JSON object")),
        "{bad:?}"
    );
    let bad = call(&c, Method::POST, COLLECT_PATH, "api_secret=x", b"{}");
    assert!(
        matches!(&bad, Err(ClientError::BadRequest(m)) if m.contains("measurement_id")),
        "{bad:?}"
    );
}

#[test]
fn config_rejects_empty_secrets() {
    let err = MeasurementProtocolClient::from_config(&MeasurementProtocolClientConfig {
        api_secrets: vec![Secret::new("")],
        measurement_ids: vec!["G X".into()],
    })
    .unwrap_err();
    assert_eq!(err.len(), 2, "{err:?}");
    assert!(err[0].starts_with("api_secrets[0]"), "{err:?}");
    assert!(err[1].starts_with("measurement_ids[0]"), "{err:?}");
}

#[test]
fn config_loads_from_toml() {
    let cfg = crate::config::load_str(
        r#"
[[clients]]
type = "measurement_protocol"
api_secrets = ["abc"]
measurement_ids = ["G-ABC"]
"#,
        "test.toml",
        false,
    )
    .unwrap();
    let pipeline = crate::pipeline::Pipeline::build(&cfg).unwrap();
    assert_eq!(pipeline.clients.len(), 1);
    assert_eq!(pipeline.clients[0].kind(), "measurement_protocol");

    let err = crate::config::load_str(
        "[[clients]]\ntype = \"measurement_protocol\"\napi_secret = \"abc\"\n",
        "test.toml",
        false,
    )
    .unwrap_err();
    assert!(format!("{err:?}").contains("api_secret"), "{err:?}");
}

/// Arbitrary JSON trees, biased towards the keys the validator looks at.
fn arb_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("name".to_owned()),
        Just("params".to_owned()),
        Just("items".to_owned()),
        Just("value".to_owned()),
        Just("item_id".to_owned()),
        Just("session_id".to_owned()),
        Just("timestamp_micros".to_owned()),
        Just("address".to_owned()),
        "[a-z_]{0,6}",
        ".{0,4}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,120}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512), q in ".{0,40}") {
        let c = client_with(&["k"], &[]);
        for path in [COLLECT_PATH, DEBUG_PATH] {
            let _ = call(&c, Method::POST, path, &q, &body);
            let _ = call(&client(), Method::POST, path, "measurement_id=G-X", &body);
        }
    }

    #[test]
    fn arbitrary_json_never_panics(
        top in prop::collection::vec(
            (prop_oneof![
                Just("client_id".to_owned()), Just("events".to_owned()),
                Just("user_properties".to_owned()), Just("user_data".to_owned()),
                Just("consent".to_owned()), Just("device".to_owned()),
                Just("timestamp_micros".to_owned()), Just("user_id".to_owned()),
                Just("validation_behavior".to_owned()),
            ], arb_json()),
            0..8,
        )
    ) {
        let body = Value::Object(top.into_iter().collect()).to_string();
        for path in [COLLECT_PATH, DEBUG_PATH] {
            let r = call(&client(), Method::POST, path, "measurement_id=G-X", body.as_bytes());
            prop_assert!(r.is_ok(), "a JSON object is never a 4xx: {r:?}");
        }
    }
}
