//! Golden tests from the example hits of wire-formats §1.5 (kept verbatim in `fixtures/`),
//! plus edge cases of the hit syntax.

use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, Method};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::*;
use crate::event::{Consent, ConsentState, GaSession, Item};

const NOW: i64 = 1_764_913_000_123;
const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
const CHROME_UA: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/136.0.0.0 Safari/537.36";
const SAFARI_UA: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15";

use crate::test_fixtures::load;

fn parse_fixture(text: &str) -> Result<Parsed, ClientError> {
    let f = load(text);
    let client = Ga4Client::from_config(&Ga4ClientConfig::default()).unwrap();
    assert!(client.claims(&f.method, &f.path));
    client.parse(&HitRequest {
        method: &f.method,
        path: &f.path,
        query: &f.query,
        headers: &f.headers,
        host: "sgtm.example.com",
        body: &f.body,
        client_ip: IP,
        now_ms: NOW,
    })
}

fn hit(method: Method, query: &str, body: &[u8]) -> Result<Vec<Event>, ClientError> {
    let headers = HeaderMap::new();
    parse_hit(&HitRequest {
        method: &method,
        path: "/g/collect",
        query,
        headers: &headers,
        host: "sgtm.example.com",
        body,
        client_ip: IP,
        now_ms: NOW,
    })
}

fn one(query: &str) -> Event {
    let mut events = hit(Method::GET, query, b"").unwrap();
    assert_eq!(events.len(), 1);
    events.remove(0)
}

fn bad_request(result: Result<Vec<Event>, ClientError>) -> String {
    match result {
        Err(ClientError::BadRequest(reason)) => reason,
        other => panic!("expected BadRequest, got {other:?}"),
    }
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("test helper takes object literals"),
    }
}

fn s<T: for<'a> From<&'a str>>(v: &str) -> Option<T> {
    Some(T::from(v))
}

fn all_granted_consent() -> Consent {
    Consent {
        ad_storage: ConsentState::Granted,
        analytics_storage: ConsentState::Granted,
        ad_user_data: ConsentState::Granted,
        ad_personalization: ConsentState::Granted,
        gcs: s("G111"),
        gcd: s("13t3t3t3t5l1"),
        npa: s("0"),
        dma: s("0"),
        dma_cps: None,
    }
}

#[test]
fn golden_a_page_view_get() {
    let parsed = parse_fixture(include_str!("fixtures/a_page_view_get.http")).unwrap();
    assert_eq!(parsed.response, ClientResponse::NoContent);
    assert!(parsed.set_cookies);
    let expected = Event {
        event_name: "page_view".into(),
        event_id: String::new(),
        timestamp_ms: NOW,
        source: "ga4".into(),
        client_id: s("1234567890.1764912990"),
        user_id: None,
        ip_override: s("203.0.113.7"),
        user_agent: s(CHROME_UA),
        page_location: s("https://shop.example.com/?utm_source=news"),
        page_referrer: s("https://www.google.com/"),
        page_title: s("Example Shop"),
        language: s("en-us"),
        screen_resolution: s("1920x1080"),
        ga: GaSession {
            measurement_id: s("G-ABCDEF1234"),
            session_id: s("1764912991"),
            session_number: Some(1),
            session_engaged: Some(false),
            engagement_time_msec: None,
            session_start: Some(1),
            first_visit: Some(1),
            new_session_id: Some(1),
            key_event: false,
            debug_mode: false,
            protocol_version: s("2"),
            gtm_version: s("45je5ca1v9876543210za200"),
            page_id: s("1764912991250"),
            request_count: Some(1),
            js_client_id: s("1234567890.1764912990"),
        },
        consent: all_granted_consent(),
        passthrough: pairs(&[
            ("uaa", "x86"),
            ("uab", "64"),
            // Decoded once: the brand name's own encoding survives.
            (
                "uafvl",
                "Chromium;136.0.7103.93|Google%20Chrome;136.0.7103.93",
            ),
            ("uamb", "0"),
            ("uam", ""),
            ("uap", "Windows"),
            ("uapv", "15.0.0"),
            ("uaw", "0"),
            ("are", "1"),
            ("frm", "0"),
            ("pscdl", "noapi"),
            ("tfd", "812"),
        ]),
        ..Default::default()
    };
    assert_eq!(parsed.events, vec![expected]);
}

#[test]
fn golden_b_batched_post_with_crlf() {
    let parsed = parse_fixture(include_str!("fixtures/b_batched_post.http")).unwrap();
    let shared = Event {
        timestamp_ms: NOW,
        source: "ga4".into(),
        client_id: s("1234567890.1764912990"),
        ip_override: s("203.0.113.7"),
        user_agent: None,
        page_location: s("https://shop.example.com/p/trail-shoe"),
        page_title: s("Trail Shoe"),
        language: s("en-us"),
        screen_resolution: s("1920x1080"),
        ga: GaSession {
            measurement_id: s("G-ABCDEF1234"),
            session_id: s("1764912991"),
            session_number: Some(1),
            session_engaged: Some(true),
            protocol_version: s("2"),
            gtm_version: s("45je5ca1v9876543210za200"),
            page_id: s("1764912991250"),
            request_count: Some(4),
            js_client_id: s("1234567890.1764912990"),
            ..Default::default()
        },
        consent: Consent {
            ad_storage: ConsentState::Granted,
            analytics_storage: ConsentState::Granted,
            gcs: s("G111"),
            ..Default::default()
        },
        passthrough: pairs(&[("tfd", "15234"), ("richsstsse", "")]),
        ..Default::default()
    };

    let mut view_item = shared.clone();
    view_item.event_name = "view_item".into();
    view_item.currency = s("EUR");
    view_item.value = Some(59.0);
    view_item.ga.engagement_time_msec = Some(4210);
    view_item.items = vec![Item {
        item_id: s("SKU_123"),
        item_name: s("Trail Shoe"),
        item_brand: s("Acme"),
        item_category: s("Shoes"),
        price: Some(59.0),
        quantity: Some(1.0),
        ..Default::default()
    }];

    let mut scroll = shared;
    scroll.event_name = "scroll".into();
    scroll.ga.engagement_time_msec = Some(6002);
    scroll.params = obj(json!({"percent_scrolled": 90}));

    assert_eq!(parsed.events, vec![view_item, scroll]);
}

#[test]
fn golden_c_purchase_with_items_and_custom_item_params() {
    let parsed = parse_fixture(include_str!("fixtures/c_purchase_items.http")).unwrap();
    let expected = Event {
        event_name: "purchase".into(),
        timestamp_ms: NOW,
        source: "ga4".into(),
        client_id: s("1234567890.1764912990"),
        user_id: s("u_8842"),
        ip_override: s("203.0.113.7"),
        user_agent: s(SAFARI_UA),
        page_location: s("https://shop.example.com/checkout/thanks"),
        page_title: s("Thank you"),
        language: s("en-us"),
        screen_resolution: s("1920x1080"),
        currency: s("EUR"),
        value: Some(134.0),
        transaction_id: s("T-1024"),
        items: vec![
            Item {
                item_id: s("SKU_123"),
                item_name: s("Trail Shoe"),
                item_brand: s("Acme"),
                item_category: s("Shoes"),
                item_category2: s("Running"),
                item_variant: s("blue"),
                price: Some(59.0),
                quantity: Some(2.0),
                custom: pairs(&[("size", "42")]),
                ..Default::default()
            },
            Item {
                item_id: s("SKU_777"),
                item_name: s("Socks"),
                item_brand: s("Acme"),
                item_category: s("Accessories"),
                price: Some(16.0),
                quantity: Some(1.0),
                ..Default::default()
            },
        ],
        ga: GaSession {
            measurement_id: s("G-ABCDEF1234"),
            session_id: s("1764912991"),
            session_number: Some(1),
            session_engaged: Some(true),
            engagement_time_msec: Some(2311),
            key_event: true,
            protocol_version: s("2"),
            gtm_version: s("45je5ca1v9876543210za200"),
            page_id: s("1764912991250"),
            request_count: Some(7),
            js_client_id: s("1234567890.1764912990"),
            ..Default::default()
        },
        consent: all_granted_consent(),
        params: obj(json!({"tax": 21.4, "shipping": 4.9, "coupon": "SUMMER"})),
        ..Default::default()
    };
    assert_eq!(parsed.events, vec![expected]);
}

#[test]
fn consent_denied() {
    let e = one("en=page_view&gcs=G100&gcd=13p3p3q2m5l1");
    let c = &e.consent;
    assert_eq!(c.ad_storage, ConsentState::Denied);
    assert_eq!(c.analytics_storage, ConsentState::Denied);
    assert_eq!(c.ad_user_data, ConsentState::Denied);
    assert_eq!(c.ad_personalization, ConsentState::Denied);

    // gcs alone says nothing about the v2 signals.
    let e = one("en=page_view&gcs=G100");
    assert_eq!(e.consent.ad_storage, ConsentState::Denied);
    assert_eq!(e.consent.analytics_storage, ConsentState::Denied);
    assert_eq!(e.consent.ad_user_data, ConsentState::Unknown);

    // gcd wins over gcs where definite; ga4mp's `_npa` fills personalization.
    let e = one("en=page_view&gcs=G111&gcd=13p3l3t2l5l1&_npa=1");
    assert_eq!(e.consent.ad_storage, ConsentState::Denied);
    assert_eq!(e.consent.analytics_storage, ConsentState::Granted);
    assert_eq!(e.consent.ad_user_data, ConsentState::Granted);
    assert_eq!(e.consent.ad_personalization, ConsentState::Denied);
    assert_eq!(e.consent.npa.as_deref(), Some("1"));
}

#[test]
fn malformed_encodings_are_rejected_with_a_reason() {
    for (query, key) in [
        ("en=x&dt=%zz", "dt"),
        ("en=x&dt=%E2%82", "dt"),
        ("en=x&dt=%", "dt"),
        ("en=x&ep.a%=1", "ep.a%"),
    ] {
        let reason = bad_request(hit(Method::GET, query, b""));
        assert!(
            reason.starts_with("query string: invalid percent-encoding in parameter `"),
            "{reason}"
        );
        assert!(reason.contains(&format!("`{key}`")), "{reason}");
    }
    let reason = bad_request(hit(Method::POST, "v=2", b"en=a\r\nen=b&dt=%E2%82\r\n"));
    assert!(
        reason.starts_with("body line 2: invalid percent-encoding in parameter `dt`"),
        "{reason}"
    );
    assert!(reason.contains("UTF-8"), "{reason}");

    let reason = bad_request(hit(Method::POST, "v=2", b"en=a&dt=\xff"));
    assert_eq!(reason, "request body is not valid UTF-8");
}

#[test]
fn missing_event_name_is_a_bad_request() {
    let reason = bad_request(hit(Method::GET, "v=2&tid=G-1", b""));
    assert!(reason.contains("`en`"), "{reason}");
    let reason = bad_request(hit(Method::GET, "v=2&en=", b""));
    assert!(reason.contains("`en`"), "{reason}");
    let reason = bad_request(hit(Method::POST, "v=2", b"en=a\nep.x=1\n"));
    assert!(
        reason.starts_with("body line 2: missing event name"),
        "{reason}"
    );
    // A line may inherit `en` from the URL.
    let events = hit(Method::POST, "en=scroll", b"_et=1\nen=click").unwrap();
    let names: Vec<&str> = events.iter().map(|e| e.event_name.as_str()).collect();
    assert_eq!(names, ["scroll", "click"]);
}

#[test]
fn item_count_is_capped_at_200_in_index_order() {
    let query: String = std::iter::once("en=purchase".to_owned())
        .chain((1..=500).rev().map(|i| format!("pr{i}=idSKU{i}~qt1")))
        .collect::<Vec<_>>()
        .join("&");
    let e = one(&query);
    assert_eq!(e.items.len(), MAX_ITEMS_PER_EVENT);
    for (n, item) in e.items.iter().enumerate() {
        assert_eq!(
            item.item_id.as_deref(),
            Some(format!("SKU{}", n + 1).as_str())
        );
    }
    assert!(e.passthrough.is_empty(), "{:?}", e.passthrough);
}

#[test]
fn item_keys_that_are_not_items_pass_through() {
    let e = one("en=x&pr=a&pr0=idA&pr01=idB&pr2=idC&prx=1&pr99999999999=idD");
    assert_eq!(e.items.len(), 1);
    assert_eq!(e.items[0].item_id.as_deref(), Some("C"));
    assert_eq!(
        e.passthrough,
        pairs(&[
            ("pr", "a"),
            ("pr0", "idA"),
            ("pr01", "idB"),
            ("prx", "1"),
            ("pr99999999999", "idD")
        ])
    );
}

#[test]
fn body_line_overrides_url_parameters() {
    let events = hit(
        Method::POST,
        "en=page_view&dt=Url&pr1=idURL&ep.a=url&foo=url&bar=url&sct=3",
        b"en=view_item&dt=Line&pr1=idLINE&ep.a=line&foo=line\r\nbaz=1",
    )
    .unwrap();
    let first = &events[0];
    assert_eq!(first.event_name, "view_item");
    assert_eq!(first.page_title.as_deref(), Some("Line"));
    assert_eq!(first.items.len(), 1);
    assert_eq!(first.items[0].item_id.as_deref(), Some("LINE"));
    assert_eq!(first.params.get("a"), Some(&json!("line")));
    assert_eq!(first.ga.session_number, Some(3));
    // URL pairs first (minus overridden ones), then the line's, each in original order.
    assert_eq!(first.passthrough, pairs(&[("bar", "url"), ("foo", "line")]));

    let second = &events[1];
    assert_eq!(second.event_name, "page_view");
    assert_eq!(second.page_title.as_deref(), Some("Url"));
    assert_eq!(second.items[0].item_id.as_deref(), Some("URL"));
    assert_eq!(
        second.passthrough,
        pairs(&[("foo", "url"), ("bar", "url"), ("baz", "1")])
    );
}

#[test]
fn long_body_lines_merge_the_same_way() {
    // More than KeySet::LINEAR_MAX keys switches to the sorted lookup.
    let line: String = (0..40)
        .map(|i| format!("x{i}=line"))
        .chain(std::iter::once("en=e".to_owned()))
        .collect::<Vec<_>>()
        .join("&");
    let events = hit(Method::POST, "x5=url&y=url&x39=url", line.as_bytes()).unwrap();
    let p = &events[0].passthrough;
    assert_eq!(p.len(), 41);
    assert_eq!(p[0], ("y".to_owned(), "url".to_owned()));
    assert!(p[1..].iter().all(|(_, v)| v == "line"));
}

#[test]
fn plus_and_utf8_decoding() {
    let e = one("en=x&dt=Trail+Shoe+%2B+Socks&dl=https%3A%2F%2Fa.example%2F%3Fq%3Da%2Bb");
    assert_eq!(e.page_title.as_deref(), Some("Trail Shoe + Socks"));
    assert_eq!(e.page_location.as_deref(), Some("https://a.example/?q=a+b"));
    let e = one("en=x&dt=Caf%C3%A9&ep.city=Z%C3%BCrich");
    assert_eq!(e.page_title.as_deref(), Some("Café"));
    assert_eq!(e.params.get("city"), Some(&json!("Zürich")));
}

#[test]
fn bare_flag_and_unknown_params_keep_order() {
    let e = one("zz=1&en=x&richsstsse&_eu=AAI&sst.etld=example.com&cm=cpc&dh=shop&ir=1&tt=x&tag_exp=1~2&_tu=Q");
    assert_eq!(
        e.passthrough,
        pairs(&[
            ("zz", "1"),
            ("richsstsse", ""),
            ("_eu", "AAI"),
            ("sst.etld", "example.com"),
            ("cm", "cpc"),
            ("dh", "shop"),
            ("ir", "1"),
            ("tt", "x"),
            ("tag_exp", "1~2"),
            ("_tu", "Q"),
        ])
    );
}

#[test]
fn empty_body_lines_are_skipped() {
    let events = hit(Method::POST, "v=2", b"\r\n\r\nen=a\r\n\r\n\n  \nen=b\n").unwrap();
    let names: Vec<&str> = events.iter().map(|e| e.event_name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn body_of_only_line_breaks_means_one_event_from_the_query() {
    let events = hit(Method::POST, "en=page_view&v=2", b"\r\n\r\n\r\n").unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_name, "page_view");
    let reason = bad_request(hit(Method::POST, "v=2", b"\r\n\r\n"));
    assert!(reason.contains("`en`"), "{reason}");
}

#[test]
fn get_ignores_a_body() {
    let events = hit(Method::GET, "en=page_view", b"en=a\nen=b").unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_name, "page_view");
}

#[test]
fn event_count_is_bounded() {
    let body = "en=e\n".repeat(MAX_EVENTS_PER_REQUEST);
    assert_eq!(
        hit(Method::POST, "v=2", body.as_bytes()).unwrap().len(),
        MAX_EVENTS_PER_REQUEST
    );
    let body = "en=e\n".repeat(MAX_EVENTS_PER_REQUEST + 1);
    let reason = bad_request(hit(Method::POST, "v=2", body.as_bytes()));
    assert!(reason.contains("more than 100 events"), "{reason}");
}

#[test]
fn unparseable_numbers_are_kept_raw() {
    let e = one("en=x&sct=abc&_s=-1&_et=1.5&seg=yes&_ss=300&_c=x&_dbg=maybe&epn.n=abc&epn.value=12abc&upn.u=NaN&epn.inf=inf");
    assert_eq!(e.ga, GaSession::default());
    assert_eq!(e.value, None);
    assert!(e.params.is_empty());
    assert!(e.user_properties.is_empty());
    assert_eq!(
        e.passthrough,
        pairs(&[
            ("sct", "abc"),
            ("_s", "-1"),
            ("_et", "1.5"),
            ("seg", "yes"),
            ("_ss", "300"),
            ("_c", "x"),
            ("_dbg", "maybe"),
            ("epn.n", "abc"),
            ("epn.value", "12abc"),
            ("upn.u", "NaN"),
            ("epn.inf", "inf"),
        ])
    );
}

#[test]
fn empty_typed_values_are_absent() {
    let e = one("en=x&cid=&dt=&sct=&seg=&_c=&ep.empty=");
    assert_eq!(e.client_id, None);
    assert_eq!(e.ga.js_client_id, None);
    assert_eq!(e.page_title, None);
    assert_eq!(e.ga, GaSession::default());
    assert!(e.passthrough.is_empty(), "{:?}", e.passthrough);
    // A custom parameter may deliberately be empty.
    assert_eq!(e.params.get("empty"), Some(&json!("")));
}

#[test]
fn params_user_properties_and_special_event_params() {
    let e = one(
        "en=x&ep.a=1&epn.b=2&epn.c=2.5&epn.big=1764912991250&up.tier=gold&upn.ltv=99.5\
         &ep.event_id=E-1&epn.transaction_id=1024&ep.value=12.5&ep.debug_mode=true&ep.=z&epn.=1",
    );
    assert_eq!(
        e.params,
        obj(json!({"a": "1", "b": 2, "c": 2.5, "big": 1_764_912_991_250_i64}))
    );
    assert_eq!(e.user_properties, obj(json!({"tier": "gold", "ltv": 99.5})));
    assert_eq!(e.event_id, "E-1");
    assert_eq!(e.transaction_id.as_deref(), Some("1024"));
    assert_eq!(e.value, Some(12.5));
    assert!(e.ga.debug_mode);
    assert_eq!(e.passthrough, pairs(&[("ep.", "z"), ("epn.", "1")]));
    assert!(one("en=x&_dbg=1").ga.debug_mode);
}

#[test]
fn ip_override_and_user_agent() {
    let e = one("en=x&_uip=2001%3Adb8%3A%3A1");
    assert_eq!(e.ip_override.as_deref(), Some("2001:db8::1"));
    // A malformed override falls back to the socket IP and is not forwarded twice.
    let e = one("en=x&_uip=not-an-ip");
    assert_eq!(e.ip_override.as_deref(), Some("203.0.113.7"));
    assert!(e.passthrough.is_empty());
    assert_eq!(e.user_agent, None);
    assert_eq!(e.source, "ga4");
    assert_eq!(e.timestamp_ms, NOW);
}

#[test]
fn claims_and_methods() {
    let client = Ga4Client::from_config(&Ga4ClientConfig::default()).unwrap();
    assert_eq!(client.kind(), "ga4");
    assert!(client.claims(&Method::GET, "/g/collect"));
    assert!(client.claims(&Method::POST, "/g/collect"));
    assert!(!client.claims(&Method::PUT, "/g/collect"));
    assert!(!client.claims(&Method::POST, "/g/collect/"));
    assert!(!client.claims(&Method::POST, "/mp/collect"));
    assert_eq!(
        hit(Method::PUT, "en=x", b""),
        Err(ClientError::MethodNotAllowed)
    );
}

#[test]
fn config_rejects_unknown_keys() {
    assert!(toml::from_str::<Ga4ClientConfig>("").is_ok());
    assert!(toml::from_str::<Ga4ClientConfig>("foo = 1").is_err());
}

fn known_key() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "en",
        "cid",
        "sid",
        "sct",
        "seg",
        "_et",
        "_s",
        "_ss",
        "_c",
        "_dbg",
        "gcs",
        "gcd",
        "npa",
        "_uip",
        "ep.value",
        "epn.value",
        "epn.x",
        "upn.y",
        "ep.debug_mode",
        "pr1",
        "pr2",
        "pr200",
        "pr201",
        "pr0",
        "richsstsse",
    ])
    .prop_map(str::to_owned)
}

fn wire_text() -> impl Strategy<Value = String> {
    // Biased towards the characters that drive the decoders.
    "[%+~=&a-zA-Z0-9kvé\\r\\n.-]{0,40}"
}

fn structured_query() -> impl Strategy<Value = String> {
    prop::collection::vec((known_key(), wire_text()), 0..20).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    })
}

proptest! {
    #[test]
    fn parse_never_panics_on_arbitrary_input(
        query in any::<String>(),
        body in prop::collection::vec(any::<u8>(), 0..512),
        post in any::<bool>(),
    ) {
        let method = if post { Method::POST } else { Method::GET };
        let _ = hit(method, &query, &body);
    }

    #[test]
    fn parse_never_panics_on_hit_shaped_input(
        query in structured_query(),
        lines in prop::collection::vec(structured_query(), 0..6),
        crlf in any::<bool>(),
    ) {
        let body = lines.join(if crlf { "\r\n" } else { "\n" });
        if let Ok(events) = hit(Method::POST, &query, body.as_bytes()) {
            prop_assert!(!events.is_empty());
            for e in &events {
                prop_assert!(!e.event_name.is_empty());
                prop_assert!(e.items.len() <= MAX_ITEMS_PER_EVENT);
            }
        }
    }

    #[test]
    fn items_never_panic(s in "[~a-zA-Z0-9kvé.]{0,80}") {
        let _ = parse_item(&s);
    }
}

#[test]
fn a_long_query_cannot_fan_out_over_many_lines() {
    let query = format!("v=2&tid=G-X&ep.pad={}", "x".repeat(20_000));
    let body = "en=a\n".repeat(60);
    let reason = bad_request(hit(Method::POST, &query, body.as_bytes()));
    assert!(reason.contains("hit too large"), "{reason}");
    // The same query with a few lines is fine.
    assert_eq!(hit(Method::POST, &query, b"en=a\nen=b").unwrap().len(), 2);
}
