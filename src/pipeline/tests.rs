//! Golden hits through the whole core, as the server runs it: events, cookies, outbox records
//! and the answer's shape.

use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, HeaderValue, Method};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::clients::{ClientResponse, HitRequest};
use crate::set_cookie::CookieReason;
use crate::test_fixtures::{load, Fixture};
use crate::trace::{TagState, TraceDraft};

const NOW: i64 = 1_764_913_000_123;
const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
const HOST: &str = "sst.example.com";

const CONFIG: &str = r#"
[[clients]]
type = "ga4"

[[clients]]
type = "measurement_protocol"

[[clients]]
type = "data"

[[tags]]
name = "ga4"
type = "ga4"

[[tags]]
name = "meta"
type = "meta_capi"
pixel_id = "1234567890"
access_token = "EAAB-pipeline-test"
[tags.trigger]
events = ["purchase", "view_item"]
"#;

fn pipeline() -> Pipeline {
    let cfg = crate::config::load_str(CONFIG, "test.toml", false).unwrap();
    Pipeline::build(&cfg).unwrap()
}

fn run(p: &Pipeline, f: &Fixture, trace: Option<&mut TraceDraft>) -> Processed {
    let hit = HitRequest {
        method: &f.method,
        path: &f.path,
        query: &f.query,
        headers: &f.headers,
        host: HOST,
        body: &f.body,
        client_ip: IP,
        now_ms: NOW,
    };
    let client = p.claim(&f.method, &f.path).expect("a client claims it");
    p.process(
        client,
        &hit,
        None,
        None,
        &mut StdRng::seed_from_u64(1),
        trace,
    )
    .expect("a valid hit")
}

fn names(p: &Processed) -> Vec<&str> {
    p.events.iter().map(|e| e.event_name.as_str()).collect()
}

fn queued(p: &Processed) -> Vec<(String, Vec<String>)> {
    p.queued
        .iter()
        .map(|q| {
            let event = p.events.iter().find(|e| e.event_id == q.event_id).unwrap();
            (
                event.event_name.clone(),
                q.tags.iter().map(|t| t.to_string()).collect(),
            )
        })
        .collect()
}

fn cookies(p: &Processed) -> Vec<(&str, CookieReason, Option<&str>, i64)> {
    p.cookies
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.reason,
                c.domain.as_deref(),
                c.max_age_secs,
            )
        })
        .collect()
}

const DAYS_400: i64 = 400 * 86_400;

#[test]
fn ga4_get_page_view_of_a_new_visitor() {
    let p = pipeline();
    let out = run(
        &p,
        &load(include_str!("../clients/ga4/fixtures/a_page_view_get.http")),
        None,
    );
    assert_eq!(names(&out), ["page_view"]);
    let e = &out.events[0];
    // Minted at ingress (a UUIDv7), stamped with its client and the receipt time.
    assert_eq!(e.event_id.len(), 36, "{}", e.event_id);
    assert_eq!(e.event_id.as_bytes()[14], b'7', "a UUIDv7: {}", e.event_id);
    assert_eq!(e.source, "ga4");
    assert_eq!(e.client_id.as_deref(), Some("1234567890.1764912990"));
    assert!(
        e.timestamp_ms > 0 && e.timestamp_ms <= NOW,
        "{}",
        e.timestamp_ms
    );
    // Only the GA4 tag fires for a page view.
    assert_eq!(queued(&out), [("page_view".into(), vec!["ga4".into()])]);
    assert_eq!(out.queued[0].enqueued_at_ms, NOW);
    let stored = crate::event::Event::from_payload(&out.queued[0].payload).unwrap();
    assert_eq!(&stored, &**e, "the stored payload is the event");
    // No cookies yet: a visitor id seeded from the hit's GA client id, and a new `_fbp`, both
    // on the registrable domain (no `_ga` to keep: the browser's script writes it).
    assert_eq!(
        cookies(&out),
        [
            (
                "FPID",
                CookieReason::MigratedFromGa,
                Some("example.com"),
                DAYS_400
            ),
            ("_fbp", CookieReason::New, Some("example.com"), 90 * 86_400),
        ]
    );
    assert_eq!(
        e.identity.fbp.as_deref(),
        Some(out.cookies[1].value.as_str())
    );
    assert_eq!(out.response, ClientResponse::NoContent);
}

#[test]
fn ga4_batched_post_fires_each_tag_per_event() {
    let p = pipeline();
    let mut trace = TraceDraft::default();
    let out = run(
        &p,
        &load(include_str!("../clients/ga4/fixtures/b_batched_post.http")),
        Some(&mut trace),
    );
    assert_eq!(names(&out), ["view_item", "scroll"]);
    assert_eq!(
        queued(&out),
        [
            ("view_item".into(), vec!["ga4".into(), "meta".into()]),
            ("scroll".into(), vec!["ga4".into()]),
        ]
    );
    let ids: std::collections::HashSet<&str> =
        out.events.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids.len(), 2, "each event has its own id");
    // The request's `_ga` and `_fbp` are kept; the visitor id comes from `_ga`.
    let names: Vec<&str> = out.cookies.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["FPID", "_ga", "_fbp"]);
    assert!(out
        .events
        .iter()
        .all(|e| e.identity.fbp.as_deref() == Some("fb.1.1764912990000.1234567890")));
    // The trace explains every tag for every event and shares the events.
    let decisions: Vec<(&str, &str, TagState)> = trace
        .tags
        .iter()
        .map(|t| (t.event_name.as_str(), t.tag.as_str(), t.outcome.state))
        .collect();
    assert_eq!(
        decisions,
        [
            ("view_item", "ga4", TagState::Queued),
            ("view_item", "meta", TagState::Queued),
            ("scroll", "ga4", TagState::Queued),
            ("scroll", "meta", TagState::NotFired),
        ]
    );
    assert!(
        trace.tags[3].reason.contains("scroll"),
        "{}",
        trace.tags[3].reason
    );
    assert_eq!(trace.events.len(), 2);
    assert!(std::sync::Arc::ptr_eq(&trace.events[0], &out.events[0]));
    assert_eq!(trace.cookies, out.cookies);
    assert!(trace.events_bytes > 0);
}

fn request(
    method: Method,
    path: &str,
    query: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Fixture {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    Fixture {
        method,
        path: path.into(),
        query: query.into(),
        headers: map,
        body: body.as_bytes().to_vec(),
    }
}

#[test]
fn measurement_protocol_purchase_sets_no_cookies() {
    let p = pipeline();
    let body = r#"{"client_id":"555.666","events":[{"name":"purchase","params":{"transaction_id":"T-9","value":42.5,"currency":"EUR"}}]}"#;
    let out = run(
        &p,
        &request(
            Method::POST,
            "/mp/collect",
            "measurement_id=G-ABCDEF1234",
            &[("content-type", "application/json")],
            body,
        ),
        None,
    );
    assert_eq!(names(&out), ["purchase"]);
    let e = &out.events[0];
    assert_eq!(e.source, "measurement_protocol");
    assert_eq!(e.client_id.as_deref(), Some("555.666"));
    assert_eq!(e.value, Some(42.5));
    assert_eq!(e.currency.as_deref(), Some("EUR"));
    assert_eq!(
        queued(&out),
        [("purchase".into(), vec!["ga4".into(), "meta".into()])]
    );
    assert!(out.cookies.is_empty(), "server-to-server: no cookies");
    assert_eq!(out.response, ClientResponse::NoContent);
}

#[test]
fn data_client_event_answers_its_event_ids() {
    let p = pipeline();
    let body = r#"{"event_name":"view_item","event_id":"browser-id-1","page_location":"https://shop.example.com/p/1?fbclid=IwAR2xYz","value":10}"#;
    let out = run(
        &p,
        &request(
            Method::POST,
            "/data",
            "",
            &[
                ("content-type", "application/json"),
                ("origin", "https://shop.example.com"),
            ],
            body,
        ),
        None,
    );
    assert_eq!(names(&out), ["view_item"]);
    // The browser's id is kept, so the pixel and the server copy deduplicate.
    assert_eq!(out.events[0].event_id, "browser-id-1");
    assert_eq!(out.events[0].source, "data");
    assert_eq!(out.response, ClientResponse::EventIds);
    // `_fbc` is built from the page's fbclid.
    let fbc = out.cookies.iter().find(|c| c.name == "_fbc").expect("_fbc");
    assert!(fbc.value.ends_with(".IwAR2xYz"), "{}", fbc.value);
    assert_eq!(fbc.reason, CookieReason::New);
}

#[test]
fn a_clock_far_ahead_is_replaced_by_the_receipt_time() {
    let p = pipeline();
    let ahead = NOW + 3_600_000;
    let body = format!(
        r#"{{"client_id":"555.666","timestamp_micros":{},"events":[{{"name":"purchase"}}]}}"#,
        ahead * 1000
    );
    let out = run(
        &p,
        &request(
            Method::POST,
            "/mp/collect",
            "measurement_id=G-X",
            &[],
            &body,
        ),
        None,
    );
    assert_eq!(out.events[0].timestamp_ms, NOW);
}

/// A browser's debug mark, and the trace context of a hit OpenTelemetry samples, are stamped
/// on its events; the trace context reaches their stored payloads too, so deliveries link to
/// the hit.
#[test]
fn a_marked_or_traced_hit_stamps_its_events() {
    let p = pipeline();
    let f = load(include_str!("../clients/ga4/fixtures/a_page_view_get.http"));
    let hit = HitRequest {
        method: &f.method,
        path: &f.path,
        query: &f.query,
        headers: &f.headers,
        host: HOST,
        body: &f.body,
        client_ip: IP,
        now_ms: NOW,
    };
    let client = p.claim(&f.method, &f.path).unwrap();
    let run = |marker, traceparent| {
        p.process(
            client,
            &hit,
            marker,
            traceparent,
            &mut StdRng::seed_from_u64(1),
            None,
        )
        .unwrap()
    };
    let marked = run(Some("qa-anna"), None);
    assert_eq!(
        marked.events[0].identity.debug_marker.as_deref(),
        Some("qa-anna")
    );
    assert_eq!(marked.events[0].traceparent, None);

    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = run(None, Some(tp));
    assert!(!traced.queued.is_empty());
    for q in &traced.queued {
        let stored = crate::event::Event::from_payload(&q.payload).unwrap();
        assert_eq!(stored.traceparent.as_deref(), Some(tp));
    }
    assert!(traced
        .events
        .iter()
        .all(|e| e.traceparent.as_deref() == Some(tp) && e.identity.debug_marker.is_none()));
}

#[test]
fn a_bad_hit_is_the_clients_error() {
    let p = pipeline();
    let f = request(
        Method::POST,
        "/mp/collect",
        "measurement_id=G-X",
        &[],
        "{not json",
    );
    let hit = HitRequest {
        method: &f.method,
        path: &f.path,
        query: &f.query,
        headers: &f.headers,
        host: HOST,
        body: &f.body,
        client_ip: IP,
        now_ms: NOW,
    };
    let client = p.claim(&f.method, &f.path).unwrap();
    let err = p
        .process(
            client,
            &hit,
            None,
            None,
            &mut StdRng::seed_from_u64(1),
            None,
        )
        .unwrap_err();
    assert!(matches!(err, ProcessError::Client(_)), "{err:?}");
}

#[test]
fn a_purchase_without_an_event_id_gets_the_id_its_order_webhook_gets() {
    let p = pipeline();
    // Measurement Protocol and the data client alike: `purchase-<transaction_id>`.
    let body = r#"{"client_id":"555.666","events":[{"name":"purchase","params":{"transaction_id":"T-9","value":1,"currency":"EUR"}},{"name":"view_item"}]}"#;
    let out = run(
        &p,
        &request(Method::POST, "/mp/collect", "measurement_id=G-X", &[], body),
        None,
    );
    assert_eq!(out.events[0].event_id, "purchase-T-9");
    assert_eq!(
        out.events[0].event_id,
        crate::event::order_event_id("purchase", "T-9", None)
    );
    assert_ne!(out.events[1].event_id, "", "others get a fresh id");
    assert!(!out.events[1].event_id.starts_with("view_item"));
    let body = r#"{"event_name":"purchase","transaction_id":" 1001 ","value":5,"currency":"EUR"}"#;
    let out = run(
        &p,
        &request(
            Method::POST,
            "/data",
            "",
            &[("content-type", "application/json")],
            body,
        ),
        None,
    );
    assert_eq!(out.events[0].event_id, "purchase-1001");
    // An id the browser sent is kept.
    let body = r#"{"event_name":"purchase","event_id":"px-1","transaction_id":"1001"}"#;
    let out = run(
        &p,
        &request(
            Method::POST,
            "/data",
            "",
            &[("content-type", "application/json")],
            body,
        ),
        None,
    );
    assert_eq!(out.events[0].event_id, "px-1");
}

#[test]
fn browser_hits_record_sessions_only_when_a_webhook_client_is_configured() {
    let hit = request(
        Method::POST,
        "/data",
        "",
        &[("content-type", "application/json"), ("user-agent", "UA/1")],
        r#"{"event_name":"begin_checkout","transaction_id":"ck-1","page_location":"https://shop.example.com/checkout"}"#,
    );
    // No webhook client: nothing recorded.
    assert!(run(&pipeline(), &hit, None).sessions.is_empty());
    let with_shop = format!(
        "{CONFIG}\n[[clients]]\ntype = \"shopify\"\npath = \"/webhooks/shopify\"\nsecret = \"s3cret\"\n"
    );
    let cfg = crate::config::load_str(&with_shop, "test.toml", false).unwrap();
    let p = Pipeline::build(&cfg).unwrap();
    let out = run(&p, &hit, None);
    let [rec] = out.sessions.as_slice() else {
        panic!("{:?}", out.sessions)
    };
    assert_eq!(rec.keys[0].0.as_str(), "r:ck-1");
    // The visitor id the identity step gave the hit.
    assert_eq!(
        rec.snapshot.client_id.as_deref(),
        out.events[0].client_id.as_deref()
    );
    assert_eq!(rec.snapshot.user_agent.as_deref(), Some("UA/1"));
    // `[stitching] enabled = false` records nothing.
    let off = format!("{with_shop}\n[stitching]\nenabled = false\n");
    let cfg = crate::config::load_str(&off, "test.toml", false).unwrap();
    assert!(run(&Pipeline::build(&cfg).unwrap(), &hit, None)
        .sessions
        .is_empty());
}

#[test]
fn stitching_settings_out_of_range_are_named() {
    let cfg = crate::config::load_str(
        "[stitching]\nttl_days = 0\ndedup_window_days = 5000\nmax_records = 0\n",
        "test.toml",
        false,
    )
    .unwrap();
    let problems = Pipeline::build(&cfg).unwrap_err();
    for key in [
        "stitching.ttl_days",
        "stitching.dedup_window_days",
        "stitching.max_records",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(key)),
            "{key}: {problems:?}"
        );
    }
}
