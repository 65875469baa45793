use std::net::{IpAddr, Ipv6Addr};

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use proptest::prelude::*;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::*;
use crate::event::{ConsentState, Item};

const NOW_MS: i64 = 1_764_913_005_000;
const IP: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7));

fn client() -> DataClient {
    DataClient::from_config(&DataClientConfig::default()).unwrap()
}

fn call(
    c: &DataClient,
    method: Method,
    path: &str,
    query: &str,
    headers: &[(&'static str, &str)],
    body: &[u8],
) -> Result<Parsed, ClientError> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(*k, HeaderValue::from_str(v).unwrap());
    }
    let req = HitRequest {
        method: &method,
        path,
        query,
        headers: &map,
        host: "sgtm.example.com",
        body,
        client_ip: IP,
        now_ms: NOW_MS,
    };
    c.parse(&req)
}

fn post_json(body: &str) -> Result<Parsed, ClientError> {
    call(
        &client(),
        Method::POST,
        "/data",
        "",
        &[
            ("content-type", "application/json"),
            ("user-agent", "UA/1.0"),
        ],
        body.as_bytes(),
    )
}

fn bad_request(r: Result<Parsed, ClientError>) -> String {
    match r {
        Err(ClientError::BadRequest(m)) => m,
        other => panic!("expected a 400, got {other:?}"),
    }
}

#[test]
fn single_event_object() {
    let body = json!({
        "event_name": "purchase",
        "event_id": "e-1",
        "client_id": "c-1",
        "user_id": 42,
        "page_location": "https://shop.example.com/thanks?fbclid=abc",
        "page_referrer": "https://shop.example.com/cart",
        "page_title": "Thanks",
        "language": "fr-FR",
        "screen_resolution": "1280x720",
        "currency": "eur",
        "value": "134.5",
        "transaction_id": "T-1",
        "timestamp_ms": 1764913000000u64,
        "ga_session_id": "1764912991",
        "ga_session_number": 3,
        "user_data": {
            "email_address": ["a@example.com", "b@example.com"],
            "phone_number": "+33600000000",
            "address": {"first_name": "Ann", "city": "Paris", "country": "FR"}
        },
        "items": [{"item_id": "SKU_1", "price": 59, "quantity": 2, "size": "42"}],
        "consent": {"ad_storage": "granted", "analytics_storage": "DENIED", "ad_user_data": true},
        "user_properties": {"tier": "gold"},
        "coupon": "SUMMER",
        "nested": {"a": [1, 2]}
    });
    let p = post_json(&body.to_string()).unwrap();
    assert_eq!(p.response, ClientResponse::EventIds);
    assert!(p.set_cookies);
    assert_eq!(p.events.len(), 1);
    let e = &p.events[0];
    assert_eq!(e.event_name, "purchase");
    assert_eq!(e.event_id, "e-1");
    assert_eq!(e.client_id.as_deref(), Some("c-1"));
    assert_eq!(e.user_id.as_deref(), Some("42"));
    assert_eq!(
        e.page_location.as_deref(),
        Some("https://shop.example.com/thanks?fbclid=abc")
    );
    assert_eq!(
        e.page_referrer.as_deref(),
        Some("https://shop.example.com/cart")
    );
    assert_eq!(e.page_title.as_deref(), Some("Thanks"));
    assert_eq!(e.language.as_deref(), Some("fr-FR"));
    assert_eq!(e.screen_resolution.as_deref(), Some("1280x720"));
    assert_eq!(e.currency.as_deref(), Some("EUR"));
    assert_eq!(e.value, Some(134.5));
    assert_eq!(e.transaction_id.as_deref(), Some("T-1"));
    assert_eq!(e.timestamp_ms, 1_764_913_000_000);
    assert_eq!(e.ga.session_id.as_deref(), Some("1764912991"));
    assert_eq!(e.ga.session_number, Some(3));
    assert_eq!(e.user_data.email_address.as_deref(), Some("a@example.com"));
    assert_eq!(e.user_data.phone_number.as_deref(), Some("+33600000000"));
    assert_eq!(e.user_data.address.first_name.as_deref(), Some("Ann"));
    assert_eq!(e.user_data.address.city.as_deref(), Some("Paris"));
    assert_eq!(
        e.items,
        vec![Item {
            item_id: Some("SKU_1".into()),
            price: Some(59.0),
            quantity: Some(2.0),
            custom: vec![("size".into(), "42".into())],
            ..Default::default()
        }]
    );
    assert_eq!(e.consent.ad_storage, ConsentState::Granted);
    assert_eq!(e.consent.analytics_storage, ConsentState::Denied);
    assert_eq!(e.consent.ad_user_data, ConsentState::Granted);
    assert_eq!(e.consent.ad_personalization, ConsentState::Unknown);
    assert_eq!(e.user_properties.get("tier"), Some(&json!("gold")));
    assert_eq!(
        serde_json::Value::Object(e.params.clone()),
        json!({"coupon": "SUMMER", "nested": {"a": [1, 2]}})
    );
    // Browser hit: the request itself is the visitor.
    assert_eq!(e.user_agent.as_deref(), Some("UA/1.0"));
    assert_eq!(e.ip_override.as_deref(), Some("2001:db8::7"));
}

#[test]
fn batch_with_shared_keys() {
    let body = json!({
        "client_id": "c-1",
        "page_location": "https://a.example/",
        "events": [
            {"event_name": "view_item", "items": [{"item_name": "Shoe"}]},
            {"event_name": "add_to_cart", "client_id": "c-2", "value": 3}
        ]
    });
    let p = post_json(&body.to_string()).unwrap();
    assert_eq!(p.events.len(), 2);
    assert_eq!(p.events[0].event_name, "view_item");
    assert_eq!(p.events[0].client_id.as_deref(), Some("c-1"));
    assert_eq!(p.events[0].items[0].item_name.as_deref(), Some("Shoe"));
    assert_eq!(
        p.events[1].client_id.as_deref(),
        Some("c-2"),
        "the event's own key wins"
    );
    assert_eq!(p.events[1].value, Some(3.0));
    assert!(p
        .events
        .iter()
        .all(|e| e.page_location.as_deref() == Some("https://a.example/")));
    assert!(
        p.events.iter().all(|e| e.params.is_empty()),
        "`events` is not a param"
    );

    let too_many: Vec<_> = (0..=MAX_EVENTS)
        .map(|_| json!({"event_name": "x"}))
        .collect();
    let m = bad_request(post_json(&json!({"events": too_many}).to_string()));
    assert!(m.starts_with("events:"), "{m}");
    let m = bad_request(post_json(r#"{"events":[]}"#));
    assert!(m.starts_with("events:"), "{m}");
    let m = bad_request(post_json(r#"{"events":{"event_name":"x"}}"#));
    assert!(m.starts_with("events:"), "{m}");
    let m = bad_request(post_json(r#"{"events":[{"event_name":"x"},{"value":1}]}"#));
    assert_eq!(m, "events[1].event_name: is required");
    let m = bad_request(post_json(r#"{"events":[{"event_name":"x"},"y"]}"#));
    assert_eq!(m, "events[1]: must be an object");
}

#[test]
fn get_query_with_dotted_keys() {
    let q = "event_name=sign_up&value=9.5&currency=USD\
             &user_data.email_address=a%40example.com&user_data.address.city=New+York\
             &consent.ad_storage=denied&method=email&items=%5B%7B%22item_id%22%3A%22S1%22%7D%5D";
    let p = call(
        &client(),
        Method::GET,
        "/data",
        q,
        &[("user-agent", "UA/2")],
        b"",
    )
    .unwrap();
    assert_eq!(p.response, ClientResponse::EventIds);
    let e = &p.events[0];
    assert_eq!(e.event_name, "sign_up");
    assert_eq!(e.value, Some(9.5));
    assert_eq!(e.currency.as_deref(), Some("USD"));
    assert_eq!(e.user_data.email_address.as_deref(), Some("a@example.com"));
    assert_eq!(e.user_data.address.city.as_deref(), Some("New York"));
    assert_eq!(e.consent.ad_storage, ConsentState::Denied);
    assert_eq!(e.items[0].item_id.as_deref(), Some("S1"));
    assert_eq!(
        serde_json::Value::Object(e.params.clone()),
        json!({"method": "email"})
    );
    assert_eq!(e.user_agent.as_deref(), Some("UA/2"));

    let m = bad_request(call(&client(), Method::GET, "/data", "value=1", &[], b""));
    assert_eq!(m, "event_name: is required");
    let m = bad_request(call(
        &client(),
        Method::GET,
        "/data",
        "event_name=x&value=abc",
        &[],
        b"",
    ));
    assert_eq!(m, "value: must be a number");
    let m = bad_request(call(
        &client(),
        Method::GET,
        "/data",
        "event_name=x&user_data.emial=a",
        &[],
        b"",
    ));
    assert!(m.starts_with("user_data.emial: unknown key"), "{m}");
}

#[test]
fn dotted_keys_in_json_bodies() {
    let p = post_json(
        r#"{"event_name":"lead","user_data.sha256_email_address":"ab","user_data.address.sha256_street":"cd","consent.ad_personalization":"granted","user_properties.plan":"pro"}"#,
    )
    .unwrap();
    let e = &p.events[0];
    assert_eq!(e.user_data.sha256_email_address.as_deref(), Some("ab"));
    assert_eq!(e.user_data.address.sha256_street.as_deref(), Some("cd"));
    assert_eq!(e.consent.ad_personalization, ConsentState::Granted);
    assert_eq!(e.user_properties.get("plan"), Some(&json!("pro")));
    assert!(e.params.is_empty());
}

#[test]
fn text_plain_body_from_send_beacon() {
    let p = call(
        &client(),
        Method::POST,
        "/data",
        "",
        &[("content-type", "text/plain;charset=UTF-8")],
        br#"{"event_name":"page_view","event_id":"id-1"}"#,
    )
    .unwrap();
    assert_eq!(p.events[0].event_name, "page_view");
    assert_eq!(p.events[0].event_id, "id-1");

    let no_type = call(
        &client(),
        Method::POST,
        "/data",
        "",
        &[],
        br#"{"event_name":"x"}"#,
    );
    assert_eq!(no_type.unwrap().events.len(), 1);

    let m = bad_request(call(
        &client(),
        Method::POST,
        "/data",
        "",
        &[("content-type", "application/x-www-form-urlencoded")],
        b"event_name=x",
    ));
    assert!(m.contains("content-type"), "{m}");
}

#[test]
fn bad_bodies_name_the_field() {
    assert_eq!(
        bad_request(post_json(r#"{"value":1}"#)),
        "event_name: is required"
    );
    assert_eq!(
        bad_request(post_json(r#"{"event_name":""}"#)),
        "event_name: is required"
    );
    assert_eq!(
        bad_request(post_json(r#"{"event_name":true}"#)),
        "event_name: must be a string"
    );
    assert_eq!(
        bad_request(post_json(
            r#"{"event_name":"x","items":[{"item_id":"a","price":"free"}]}"#
        )),
        "items[0].price: must be a number"
    );
    assert_eq!(
        bad_request(post_json(r#"{"event_name":"x","items":[{"price":1}]}"#)),
        "items[0]: needs item_id or item_name"
    );
    assert_eq!(
        bad_request(post_json(
            r#"{"event_name":"x","consent":{"ad_storage":"yes"}}"#
        )),
        "consent.ad_storage: must be \"granted\" or \"denied\""
    );
    assert_eq!(
        bad_request(post_json(r#"{"event_name":"x","timestamp_ms":-5}"#)),
        "timestamp_ms: must be a positive integer (unix milliseconds)"
    );
    assert_eq!(
        bad_request(post_json(r#"{"event_name":"x","ip_override":"nope"}"#)),
        "ip_override: must be an IPv4 or IPv6 address"
    );
    assert_eq!(
        bad_request(post_json(r#"{"event_name":"x","user_data":"a@b.c"}"#)),
        "user_data: must be an object"
    );
    let m = bad_request(post_json("{\"event_name\":"));
    assert!(m.starts_with("body is not valid JSON"), "{m}");
    let m = bad_request(post_json("[]"));
    assert!(m.starts_with("body must be an event object"), "{m}");
    let m = bad_request(post_json("  "));
    assert!(m.starts_with("body is empty"), "{m}");
    assert_eq!(
        call(&client(), Method::PUT, "/data", "", &[], b"{}"),
        Err(ClientError::MethodNotAllowed)
    );
}

#[test]
fn response_none_answers_no_content() {
    let p = call(
        &client(),
        Method::GET,
        "/data",
        "event_name=x&response=none",
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(p.response, ClientResponse::NoContent);
    assert!(p.events[0].params.is_empty(), "`response` is not a param");
    let p = call(
        &client(),
        Method::POST,
        "/data",
        "response=none",
        &[],
        br#"{"event_name":"x"}"#,
    )
    .unwrap();
    assert_eq!(p.response, ClientResponse::NoContent);
}

#[test]
fn referer_fills_page_location_and_body_overrides_request_facts() {
    let headers = [
        ("referer", "https://shop.example.com/p/1?fbclid=xyz"),
        ("user-agent", "UA/3"),
    ];
    let p = call(
        &client(),
        Method::POST,
        "/data",
        "",
        &headers,
        br#"{"event_name":"x"}"#,
    )
    .unwrap();
    assert_eq!(
        p.events[0].page_location.as_deref(),
        Some("https://shop.example.com/p/1?fbclid=xyz")
    );
    let p = call(
        &client(),
        Method::POST,
        "/data",
        "",
        &headers,
        br#"{"event_name":"x","page_location":"https://own/","user_agent":"Server/1","ip_override":"203.0.113.9"}"#,
    )
    .unwrap();
    let e = &p.events[0];
    assert_eq!(e.page_location.as_deref(), Some("https://own/"));
    assert_eq!(e.user_agent.as_deref(), Some("Server/1"));
    assert_eq!(e.ip_override.as_deref(), Some("203.0.113.9"));
}

fn script_response(
    p: Parsed,
) -> (
    StatusCode,
    &'static str,
    Vec<u8>,
    Vec<(&'static str, String)>,
) {
    assert!(p.events.is_empty());
    assert!(!p.set_cookies);
    match p.response {
        ClientResponse::Body {
            status,
            content_type,
            body,
            headers,
        } => (status, content_type, body, headers),
        other => panic!("expected a body, got {other:?}"),
    }
}

#[test]
fn snippet_is_served_with_etag_and_304() {
    let c = client();
    assert!(c.claims(&Method::GET, "/tagrelay.js"));
    assert!(c.claims(&Method::POST, "/data"));
    assert!(!c.claims(&Method::GET, "/data/x"));
    let (status, ct, body, headers) =
        script_response(call(&c, Method::GET, "/tagrelay.js", "", &[], b"").unwrap());
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ct, "application/javascript; charset=utf-8");
    let js = String::from_utf8(body.clone()).unwrap();
    assert!(js.contains(r#"const DATA_PATH = "/data";"#));
    assert!(js.contains(r#"const SCRIPT_PATH = "/tagrelay.js";"#));
    assert!(!js.contains("/*@"), "markers are consumed");
    assert_eq!(
        js.len(),
        SCRIPT.len() - "/*@data_path*/".len() - "/*@script_path*/".len()
    );
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(header("cache-control"), "public, max-age=300");
    let etag = header("etag");
    let expected = format!("\"{}\"", hex::encode(&Sha256::digest(&body)[..16]));
    assert_eq!(etag, expected);

    for inm in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"other\", {etag}"),
        "*".into(),
    ] {
        let (status, _, body, headers) = script_response(
            call(
                &c,
                Method::GET,
                "/tagrelay.js",
                "",
                &[("if-none-match", &inm)],
                b"",
            )
            .unwrap(),
        );
        assert_eq!(status, StatusCode::NOT_MODIFIED, "{inm}");
        assert!(body.is_empty());
        assert!(headers.iter().any(|(k, v)| *k == "etag" && *v == etag));
    }
    let (status, _, _, _) = script_response(
        call(
            &c,
            Method::GET,
            "/tagrelay.js",
            "",
            &[("if-none-match", "\"stale\"")],
            b"",
        )
        .unwrap(),
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        call(&c, Method::POST, "/tagrelay.js", "", &[], b""),
        Err(ClientError::MethodNotAllowed)
    );
}

#[test]
fn configured_paths_reach_the_snippet() {
    let c = DataClient::from_config(&DataClientConfig {
        path: "/ev".into(),
        script_path: "/s/t.js".into(),
    })
    .unwrap();
    assert!(c.claims(&Method::POST, "/ev"));
    assert!(!c.claims(&Method::POST, "/data"));
    let (_, _, body, headers) =
        script_response(call(&c, Method::GET, "/s/t.js", "", &[], b"").unwrap());
    let js = String::from_utf8(body).unwrap();
    assert!(js.contains(r#"const DATA_PATH = "/ev";"#), "{js}");
    assert!(js.contains(r#"const SCRIPT_PATH = "/s/t.js";"#));
    let default_etag = client().etag.clone();
    assert!(headers
        .iter()
        .any(|(k, v)| *k == "etag" && *v != default_etag));

    let off = DataClient::from_config(&DataClientConfig {
        path: "/data".into(),
        script_path: String::new(),
    })
    .unwrap();
    assert!(!off.claims(&Method::GET, "/tagrelay.js"));

    let err = DataClient::from_config(&DataClientConfig {
        path: "data".into(),
        script_path: "data".into(),
    })
    .unwrap_err();
    assert_eq!(err.len(), 3, "{err:?}");
}

#[test]
fn snippet_sanity() {
    // The markers must exist or configured paths would silently not apply.
    assert!(SCRIPT.contains(DATA_PATH_MARKER));
    assert!(SCRIPT.contains(SCRIPT_PATH_MARKER));
    for needle in [
        "keepalive: true",
        "credentials: \"include\"",
        "\"content-type\": \"text/plain\"",
        "navigator.sendBeacon",
        "crypto",
        "randomUUID",
        "document.currentScript",
        "data-endpoint",
        "data-auto-page-view",
        "tagrelayQueue",
        "page_location: location.href",
        "window.tagrelay = { track, eventId, endpoint",
    ] {
        assert!(SCRIPT.contains(needle), "snippet lacks {needle}");
    }
    assert!(SCRIPT.len() < 8 * 1024, "a few KB, got {}", SCRIPT.len());
    for (open, close) in [('(', ')'), ('{', '}'), ('[', ']')] {
        assert_eq!(
            SCRIPT.matches(open).count(),
            SCRIPT.matches(close).count(),
            "unbalanced {open}{close}"
        );
    }
}

#[test]
fn config_loads_from_toml() {
    let cfg = crate::config::load_str(
        "[[clients]]\ntype = \"data\"\npath = \"/collect-data\"\n",
        "test.toml",
        false,
    )
    .unwrap();
    let pipeline = crate::pipeline::Pipeline::build(&cfg).unwrap();
    assert_eq!(pipeline.clients[0].kind(), "data");
    assert!(pipeline.clients[0].claims(&Method::POST, "/collect-data"));
    let err = crate::config::load_str(
        "[[clients]]\ntype = \"data\"\npaht = \"/x\"\n",
        "test.toml",
        false,
    )
    .unwrap_err();
    assert!(format!("{err:?}").contains("paht"), "{err:?}");
}

proptest! {
    #[test]
    fn arbitrary_input_never_panics(
        body in prop::collection::vec(any::<u8>(), 0..512),
        query in ".{0,80}",
        inm in "[ -~]{0,40}",
        json_text in r#"\{("[a-z_.]{1,20}":("[^"\\]{0,10}"|[0-9.e+-]{1,6}|true|null|\[\]|\{\}),){0,6}"event_name":"x"\}"#,
    ) {
        let c = client();
        let _ = call(&c, Method::POST, "/data", &query, &[("content-type", "application/json")], &body);
        let _ = call(&c, Method::GET, "/data", &query, &[], b"");
        let _ = call(&c, Method::GET, "/tagrelay.js", "", &[("if-none-match", &inm)], b"");
        let _ = call(&c, Method::POST, "/data", "", &[], json_text.as_bytes());
    }
}
