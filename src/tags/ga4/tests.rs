use serde_json::{json, Value};

use super::*;
use crate::event::{ConsentState, Item};
use crate::identity::config::ConsentDefault;
use crate::tags::trigger::{Trigger, TriggerConfig};
use crate::tags::OutboundRequest;

const UA: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/136.0.0.0 Safari/537.36";
const BASE: &str = "https://region1.google-analytics.com";

fn cfg() -> Ga4TagConfig {
    Ga4TagConfig {
        name: "ga4".into(),
        trigger: TriggerConfig::default(),
        endpoint: format!("{BASE}/"),
        mode: Ga4Mode::Collect,
        measurement_id: None,
        api_secret: None,
        redact_ip: RedactIp::None,
        batch_max: 25,
        timeout_ms: 5_000,
    }
}

fn tag(c: Ga4TagConfig) -> Ga4Tag {
    Ga4Tag::from_config(&c).unwrap()
}

fn mp_cfg() -> Ga4TagConfig {
    Ga4TagConfig {
        mode: Ga4Mode::MeasurementProtocol,
        api_secret: Some(Secret::new("s3cr/t+x")),
        ..cfg()
    }
}

// ---- a small /g/collect decoder, independent of the encoder ----

type Params = Vec<(String, String)>;

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .unwrap()
        .into_owned()
}

fn pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// URL params and the params of each body line, decoded once.
fn split(req: &OutboundRequest) -> (Params, Vec<Params>) {
    let (_, q) = req.url.split_once('?').unwrap();
    let body = std::str::from_utf8(&req.body).unwrap();
    let lines = body
        .split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty())
        .map(pairs)
        .collect();
    (pairs(q), lines)
}

/// Each event as GA sees it: URL params with its line merged over them.
fn merged(req: &OutboundRequest) -> Vec<Vec<(String, String)>> {
    let (url, lines) = split(req);
    if lines.is_empty() {
        return vec![url];
    }
    lines
        .into_iter()
        .map(|line| {
            let mut ev: Vec<(String, String)> = url
                .iter()
                .filter(|(k, _)| !line.iter().any(|(lk, _)| lk == k))
                .cloned()
                .collect();
            ev.extend(line);
            ev
        })
        .collect()
}

fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort();
    v
}

/// Decodes a `prN` value (already URL-decoded) per reference §1.3.
/// Items decode with the GA4 client's own parser: what the tag encodes is what tagrelay (and
/// GA4) would read back.
fn decode_item(v: &str) -> Item {
    crate::clients::ga4::parse_item(v)
}

// ---- events shaped like the reference's example hits (§1.5) ----

fn base_event() -> Event {
    let mut e = Event {
        event_id: "01JXYZ".into(),
        timestamp_ms: 1_764_913_000_000,
        source: "ga4".into(),
        client_id: Some("1234567890.1764912990".into()),
        user_agent: Some(UA.into()),
        language: Some("en-us".into()),
        screen_resolution: Some("1920x1080".into()),
        ..Default::default()
    };
    e.ga.measurement_id = Some("G-ABCDEF1234".into());
    e.ga.protocol_version = Some("2".into());
    e.ga.gtm_version = Some("45je5ca1v9876543210za200".into());
    e.ga.page_id = Some("1764912991250".into());
    e.ga.session_id = Some("1764912991".into());
    e.ga.session_number = Some(1);
    e.consent.gcs = Some("G111".into());
    e
}

/// Reference §1.5 (a).
fn page_view() -> Event {
    let mut e = base_event();
    e.event_name = "page_view".into();
    e.consent.gcd = Some("13t3t3t3t5l1".into());
    e.consent.npa = Some("0".into());
    e.consent.dma = Some("0".into());
    e.ga.request_count = Some(1);
    e.ga.session_engaged = Some(false);
    e.ga.first_visit = Some(1);
    e.ga.new_session_id = Some(1);
    e.ga.session_start = Some(1);
    e.page_location = Some("https://shop.example.com/?utm_source=news".into());
    e.page_referrer = Some("https://www.google.com/".into());
    e.page_title = Some("Example Shop".into());
    e.passthrough = [
        ("uaa", "x86"),
        ("uab", "64"),
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
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    e
}

fn shoe() -> Item {
    Item {
        item_id: Some("SKU_123".into()),
        item_name: Some("Trail Shoe".into()),
        item_brand: Some("Acme".into()),
        item_category: Some("Shoes".into()),
        price: Some(59.0),
        quantity: Some(1.0),
        ..Default::default()
    }
}

/// Reference §1.5 (b): two events from one batched hit.
fn view_item_and_scroll() -> Vec<Event> {
    let mut common = base_event();
    common.ga.request_count = Some(4);
    common.ga.session_engaged = Some(true);
    common.page_location = Some("https://shop.example.com/p/trail-shoe".into());
    common.page_title = Some("Trail Shoe".into());
    common.passthrough = vec![
        ("tfd".into(), "15234".into()),
        ("richsstsse".into(), String::new()),
    ];
    let mut view = common.clone();
    view.event_name = "view_item".into();
    view.currency = Some("EUR".into());
    view.value = Some(59.0);
    view.items = vec![shoe()];
    view.ga.engagement_time_msec = Some(4210);
    let mut scroll = common;
    scroll.event_name = "scroll".into();
    scroll.params.insert("percent_scrolled".into(), json!(90));
    scroll.ga.engagement_time_msec = Some(6002);
    vec![view, scroll]
}

fn purchase_items() -> Vec<Item> {
    vec![
        Item {
            item_id: Some("SKU_123".into()),
            item_name: Some("Trail Shoe".into()),
            item_brand: Some("Acme".into()),
            item_category: Some("Shoes".into()),
            item_category2: Some("Running".into()),
            item_variant: Some("blue".into()),
            price: Some(59.0),
            quantity: Some(2.0),
            custom: vec![("size".into(), "42".into())],
            ..Default::default()
        },
        Item {
            item_id: Some("SKU_777".into()),
            item_name: Some("Socks".into()),
            item_brand: Some("Acme".into()),
            item_category: Some("Accessories".into()),
            price: Some(16.0),
            quantity: Some(1.0),
            ..Default::default()
        },
    ]
}

/// Reference §1.5 (c).
fn purchase() -> Event {
    let mut e = base_event();
    e.event_name = "purchase".into();
    e.consent.gcd = Some("13t3t3t3t5l1".into());
    e.consent.npa = Some("0".into());
    e.consent.dma = Some("0".into());
    e.ga.request_count = Some(7);
    e.ga.session_engaged = Some(true);
    e.ga.key_event = true;
    e.ga.engagement_time_msec = Some(2311);
    e.page_location = Some("https://shop.example.com/checkout/thanks".into());
    e.page_title = Some("Thank you".into());
    e.user_id = Some("u_8842".into());
    e.currency = Some("EUR".into());
    e.transaction_id = Some("T-1024".into());
    e.value = Some(134.0);
    e.params.insert("tax".into(), json!(21.4));
    e.params.insert("shipping".into(), json!(4.9));
    e.params.insert("coupon".into(), json!("SUMMER"));
    e.items = purchase_items();
    e
}

fn with_pii(mut e: Event) -> Event {
    let u = &mut e.user_data;
    u.email_address = Some("jane.doe@example.org".into());
    u.sha256_email_address =
        Some("a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90".into());
    u.phone_number = Some("+33612345678".into());
    u.address.first_name = Some("Janine".into());
    u.address.last_name = Some("Doemeyer".into());
    u.address.street = Some("12 Rue Imaginaire".into());
    u.address.city = Some("Villefictive".into());
    u.address.postal_code = Some("75999".into());
    u.date_of_birth = Some("1990-04-01".into());
    e
}

fn request_text(r: &OutboundRequest) -> String {
    let headers: Vec<String> = r.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(
        "{}\n{}\n{}\n{}",
        r.url,
        decode(&r.url),
        headers.join("\n"),
        String::from_utf8_lossy(&r.body)
    )
}

fn only_request(enc: &Encoded) -> &OutboundRequest {
    assert!(enc.rejected.is_empty(), "{:?}", enc.rejected);
    assert!(enc.skipped.is_empty(), "{:?}", enc.skipped);
    assert_eq!(enc.requests.len(), 1, "{:#?}", enc.requests);
    &enc.requests[0].0
}

// ---- collect mode ----

#[test]
fn page_view_golden() {
    let mut e = page_view();
    e.ip_override = Some("203.0.113.7".into());
    let enc = tag(cfg()).encode(&[e], 0);
    let r = only_request(&enc);
    assert_eq!(enc.requests[0].1, vec![0]);
    assert_eq!(r.method, http::Method::POST);
    assert_eq!(
        r.url,
        "https://region1.google-analytics.com/g/collect?v=2&tid=G-ABCDEF1234\
         &gtm=45je5ca1v9876543210za200&_p=1764912991250&gcs=G111&gcd=13t3t3t3t5l1&npa=0&dma=0\
         &cid=1234567890.1764912990&ul=en-us&sr=1920x1080&_s=1&sid=1764912991&sct=1&seg=0\
         &dl=https%3A%2F%2Fshop.example.com%2F%3Futm_source%3Dnews\
         &dr=https%3A%2F%2Fwww.google.com%2F&dt=Example%20Shop&en=page_view&_fv=1&_nsi=1&_ss=1\
         &uaa=x86&uab=64&uafvl=Chromium%3B136.0.7103.93%7CGoogle%2520Chrome%3B136.0.7103.93\
         &uamb=0&uam=&uap=Windows&uapv=15.0.0&uaw=0&are=1&frm=0&pscdl=noapi&tfd=812\
         &_uip=203.0.113.7"
    );
    assert_eq!(
        r.headers,
        vec![
            (
                "Content-Type".to_owned(),
                "text/plain;charset=UTF-8".to_owned()
            ),
            ("User-Agent".to_owned(), UA.to_owned()),
        ]
    );
    assert!(r.body.is_empty());

    // Same parameter set as the reference hit itself (order aside), plus `_uip`.
    let reference = "v=2&tid=G-ABCDEF1234&gtm=45je5ca1v9876543210za200&_p=1764912991250\
        &gcs=G111&gcd=13t3t3t3t5l1&npa=0&dma=0&cid=1234567890.1764912990&ul=en-us&sr=1920x1080\
        &uaa=x86&uab=64&uafvl=Chromium%3B136.0.7103.93%7CGoogle%2520Chrome%3B136.0.7103.93\
        &uamb=0&uam=&uap=Windows&uapv=15.0.0&uaw=0&are=1&frm=0&pscdl=noapi&_s=1\
        &sid=1764912991&sct=1&seg=0&dl=https%3A%2F%2Fshop.example.com%2F%3Futm_source%3Dnews\
        &dr=https%3A%2F%2Fwww.google.com%2F&dt=Example%20Shop&en=page_view&_fv=1&_nsi=1&_ss=1&tfd=812\
        &_uip=203.0.113.7";
    assert_eq!(sorted(split(r).0), sorted(pairs(reference)));
}

#[test]
fn batched_view_item_and_scroll_golden() {
    let enc = tag(cfg()).encode(&view_item_and_scroll(), 0);
    let r = only_request(&enc);
    assert_eq!(enc.requests[0].1, vec![0, 1]);
    assert_eq!(
        r.url,
        "https://region1.google-analytics.com/g/collect?v=2&tid=G-ABCDEF1234\
         &gtm=45je5ca1v9876543210za200&_p=1764912991250&gcs=G111&cid=1234567890.1764912990\
         &ul=en-us&sr=1920x1080&_s=4&sid=1764912991&sct=1&seg=1\
         &dl=https%3A%2F%2Fshop.example.com%2Fp%2Ftrail-shoe&dt=Trail%20Shoe&tfd=15234"
    );
    // Exactly the reference body.
    assert_eq!(
        std::str::from_utf8(&r.body).unwrap(),
        "en=view_item&cu=EUR&epn.value=59&pr1=idSKU_123~nmTrail%20Shoe~brAcme~caShoes~pr59~qt1&_et=4210\r\n\
         en=scroll&epn.percent_scrolled=90&_et=6002"
    );
    // GA's view of the two events equals the reference hit's (minus the sGTM-only flag).
    let ref_url = "v=2&tid=G-ABCDEF1234&gtm=45je5ca1v9876543210za200&_p=1764912991250&gcs=G111\
        &cid=1234567890.1764912990&ul=en-us&sr=1920x1080&_s=4&sid=1764912991&sct=1&seg=1\
        &dl=https%3A%2F%2Fshop.example.com%2Fp%2Ftrail-shoe&dt=Trail%20Shoe&tfd=15234";
    let ref_lines = [
        "en=view_item&cu=EUR&epn.value=59&pr1=idSKU_123~nmTrail%20Shoe~brAcme~caShoes~pr59~qt1&_et=4210",
        "en=scroll&epn.percent_scrolled=90&_et=6002",
    ];
    let got = merged(r);
    for (n, line) in ref_lines.iter().enumerate() {
        let mut want = pairs(ref_url);
        want.extend(pairs(line));
        assert_eq!(sorted(got[n].clone()), sorted(want), "event {n}");
    }
}

#[test]
fn purchase_golden_and_items_round_trip() {
    let e = purchase();
    let enc = tag(cfg()).encode(std::slice::from_ref(&e), 0);
    let r = only_request(&enc);
    assert!(r.body.is_empty(), "a single event goes in the URL");
    let (url, _) = split(r);
    let expected: Vec<(String, String)> = [
        ("v", "2"),
        ("tid", "G-ABCDEF1234"),
        ("gtm", "45je5ca1v9876543210za200"),
        ("_p", "1764912991250"),
        ("gcs", "G111"),
        ("gcd", "13t3t3t3t5l1"),
        ("npa", "0"),
        ("dma", "0"),
        ("cid", "1234567890.1764912990"),
        ("ul", "en-us"),
        ("sr", "1920x1080"),
        ("_s", "7"),
        ("sid", "1764912991"),
        ("sct", "1"),
        ("seg", "1"),
        ("dl", "https://shop.example.com/checkout/thanks"),
        ("dt", "Thank you"),
        ("uid", "u_8842"),
        ("en", "purchase"),
        ("_c", "1"),
        ("cu", "EUR"),
        ("ep.transaction_id", "T-1024"),
        ("epn.value", "134"),
        ("ep.coupon", "SUMMER"),
        ("epn.shipping", "4.9"),
        ("epn.tax", "21.4"),
        (
            "pr1",
            "idSKU_123~nmTrail Shoe~brAcme~caShoes~c2Running~vablue~pr59~qt2~k0size~v042",
        ),
        ("pr2", "idSKU_777~nmSocks~brAcme~caAccessories~pr16~qt1"),
        ("_et", "2311"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(url, expected);

    // The reference hit's raw query, decoded, carries the same parameters.
    let reference = "v=2&tid=G-ABCDEF1234&gtm=45je5ca1v9876543210za200&_p=1764912991250&gcs=G111\
        &gcd=13t3t3t3t5l1&npa=0&dma=0&cid=1234567890.1764912990&ul=en-us&sr=1920x1080&_s=7\
        &sid=1764912991&sct=1&seg=1&dl=https%3A%2F%2Fshop.example.com%2Fcheckout%2Fthanks&dt=Thank%20you\
        &uid=u_8842&en=purchase&_c=1&cu=EUR&ep.transaction_id=T-1024&epn.value=134&epn.tax=21.4\
        &epn.shipping=4.9&ep.coupon=SUMMER\
        &pr1=idSKU_123~nmTrail%20Shoe~brAcme~caShoes~c2Running~vablue~pr59~qt2~k0size~v042\
        &pr2=idSKU_777~nmSocks~brAcme~caAccessories~pr16~qt1&_et=2311";
    assert_eq!(sorted(url.clone()), sorted(pairs(reference)));

    let items: Vec<Item> = url
        .iter()
        .filter(|(k, _)| k.starts_with("pr"))
        .map(|(_, v)| decode_item(v))
        .collect();
    assert_eq!(items, e.items);
}

#[test]
fn items_with_every_field_and_many_custom_params_round_trip() {
    let mut item = Item {
        item_id: Some("A&B=1".into()),
        item_name: Some("Fjellblå / Medium / Unisex".into()),
        item_brand: Some("Utekos".into()),
        item_category: Some("Yttertøy".into()),
        item_category2: Some("c2".into()),
        item_category3: Some("c3".into()),
        item_category4: Some("c4".into()),
        item_category5: Some("c5".into()),
        item_variant: Some("red".into()),
        item_list_name: Some("Search results".into()),
        item_list_id: Some("sr_1".into()),
        index: Some(3),
        affiliation: Some("Store".into()),
        coupon: Some("TEN".into()),
        discount: Some(2.5),
        location_id: Some("ChIJ".into()),
        price: Some(24.9),
        quantity: Some(3.0),
        creative_name: Some("banner".into()),
        creative_slot: Some("top".into()),
        promotion_id: Some("P1".into()),
        promotion_name: Some("Summer sale".into()),
        custom: Vec::new(),
    };
    for n in 0..12 {
        item.custom.push((format!("param_{n}"), format!("v {n}%")));
    }
    let mut e = purchase();
    e.items = vec![item.clone()];
    let enc = tag(cfg()).encode(&[e], 0);
    let r = only_request(&enc);
    let raw = r
        .url
        .split_once("pr1=")
        .unwrap()
        .1
        .split('&')
        .next()
        .unwrap();
    // Indices run 0–9 then A, B: `kA`, never a lower-case `ka` that reads as a key.
    assert!(
        raw.contains("~k9param_9~v9v%209%25~kAparam_10~vAv%2010%25~kBparam_11"),
        "{raw}"
    );
    let (url, _) = split(r);
    let pr1 = &url.iter().find(|(k, _)| k == "pr1").unwrap().1;
    assert_eq!(decode_item(pr1), item);
}

#[test]
fn pii_never_reaches_ga() {
    let events = vec![with_pii(purchase()), with_pii(page_view())];
    let pii = [
        "jane.doe",
        "example.org",
        "a1b2c3d4e5f6",
        "33612345678",
        "Janine",
        "Doemeyer",
        "Imaginaire",
        "Villefictive",
        "75999",
        "1990-04-01",
    ];
    for mode in [Ga4Mode::Collect, Ga4Mode::MeasurementProtocol] {
        let c = Ga4TagConfig { mode, ..mp_cfg() };
        let enc = tag(c).encode(&events, 1_764_913_100_000);
        assert!(!enc.requests.is_empty());
        for (r, _) in &enc.requests {
            let text = request_text(r);
            for p in pii {
                assert!(!text.contains(p), "{mode:?}: `{p}` leaked in {text}");
            }
        }
    }
}

#[test]
fn redact_ip_variants() {
    let uip = |mode: RedactIp, ip: Option<&str>| {
        let mut e = page_view();
        e.ip_override = ip.map(str::to_owned);
        let t = tag(Ga4TagConfig {
            redact_ip: mode,
            ..cfg()
        });
        let enc = t.encode(&[e], 0);
        let (url, _) = split(only_request(&enc));
        let found: Vec<String> = url
            .into_iter()
            .filter(|(k, _)| k == "_uip")
            .map(|(_, v)| v)
            .collect();
        assert!(found.len() <= 1);
        found.into_iter().next()
    };
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(uip(RedactIp::None, Some("203.0.113.7")), s("203.0.113.7"));
    assert_eq!(
        uip(RedactIp::LastOctet, Some("203.0.113.7")),
        s("203.0.113.0")
    );
    assert_eq!(uip(RedactIp::Full, Some("203.0.113.7")), s("::"));
    assert_eq!(
        uip(
            RedactIp::LastOctet,
            Some("2001:db8:85a3:1234:5678:8a2e:370:7334")
        ),
        s("2001:db8:85a3::")
    );
    assert_eq!(
        uip(RedactIp::LastOctet, Some("::ffff:198.51.100.23")),
        s("198.51.100.0")
    );
    assert_eq!(uip(RedactIp::Full, Some("2001:db8::1")), s("::"));
    assert_eq!(uip(RedactIp::None, Some("2001:db8::1")), s("2001:db8::1"));
    // Unparseable addresses cannot be redacted, so nothing is sent; no IP at all sends none
    // except under full redaction.
    assert_eq!(uip(RedactIp::LastOctet, Some("not-an-ip")), None);
    assert_eq!(uip(RedactIp::None, None), None);
    assert_eq!(uip(RedactIp::Full, None), s("::"));

    // The visitor's own `_uip` from the hit never overrides the policy.
    let mut e = page_view();
    e.ip_override = Some("203.0.113.7".into());
    e.passthrough.push(("_uip".into(), "198.51.100.99".into()));
    let t = tag(Ga4TagConfig {
        redact_ip: RedactIp::LastOctet,
        ..cfg()
    });
    let enc = t.encode(&[e], 0);
    let text = request_text(only_request(&enc));
    assert!(
        !text.contains("198.51.100.99") && !text.contains("203.0.113.7"),
        "{text}"
    );
}

#[test]
fn groups_by_visitor_page_and_caps_at_25() {
    let mut events = Vec::new();
    for n in 0..27 {
        let mut e = page_view();
        e.event_name = format!("ev_{n}");
        events.push(e);
    }
    // A second visitor interleaved, and a page_view from another page of the first visitor.
    let mut other = page_view();
    other.client_id = Some("999.111".into());
    events.insert(3, other);
    let mut other_page = page_view();
    other_page.ga.page_id = Some("1764912999999".into());
    events.push(other_page);

    let enc = tag(cfg()).encode(&events, 0);
    assert!(enc.rejected.is_empty());
    let sets: Vec<Vec<usize>> = enc.requests.iter().map(|(_, ix)| ix.clone()).collect();
    let first_visitor: Vec<usize> = (0..29).filter(|i| *i != 3 && *i != 28).collect();
    assert_eq!(sets.len(), 4, "{sets:?}");
    assert_eq!(sets[0], first_visitor[..25].to_vec());
    assert_eq!(sets[1], first_visitor[25..].to_vec());
    assert_eq!(sets[2], vec![3]);
    assert_eq!(sets[3], vec![28]);
    // Every event keeps its own name and the right client id after merging.
    for (r, ix) in &enc.requests {
        let evs = merged(r);
        assert_eq!(evs.len(), ix.len());
        for (ev, &i) in evs.iter().zip(ix) {
            let get = |k: &str| ev.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.clone());
            assert_eq!(get("en").as_deref(), Some(events[i].event_name.as_str()));
            assert_eq!(get("cid").as_deref(), events[i].client_id.as_deref());
        }
    }
    // batch_max narrows requests further.
    let small = tag(Ga4TagConfig {
        batch_max: 10,
        ..cfg()
    });
    let sizes: Vec<usize> = small
        .encode(&events, 0)
        .requests
        .iter()
        .map(|(_, ix)| ix.len())
        .collect();
    assert_eq!(sizes, vec![10, 10, 7, 1, 1]);
}

#[test]
fn measurement_id_override_and_missing_ids() {
    let t = tag(Ga4TagConfig {
        measurement_id: Some("G-OVERRIDE99".into()),
        ..cfg()
    });
    let mut no_tid = page_view();
    no_tid.ga.measurement_id = None;
    let enc = t.encode(&[page_view(), no_tid.clone()], 0);
    assert!(enc.rejected.is_empty());
    assert_eq!(enc.requests.len(), 1);
    for ev in merged(&enc.requests[0].0) {
        let tids: Vec<&String> = ev
            .iter()
            .filter(|(k, _)| k == "tid")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(tids, vec!["G-OVERRIDE99"]);
    }

    let mut no_cid = page_view();
    no_cid.client_id = None;
    let mut no_name = page_view();
    no_name.event_name.clear();
    let enc = tag(cfg()).encode(&[no_tid, page_view(), no_cid, no_name], 0);
    assert_eq!(enc.requests.len(), 1);
    assert_eq!(enc.requests[0].1, vec![1]);
    assert_eq!(enc.rejected.len(), 3);
    assert_eq!(enc.rejected[2].0, 3);
    assert!(enc.rejected[2].1.contains("no name"), "{:?}", enc.rejected);
    assert_eq!(enc.rejected[0].0, 0);
    assert!(
        enc.rejected[0].1.contains("no GA4 measurement id"),
        "{:?}",
        enc.rejected
    );
    assert_eq!(enc.rejected[1].0, 2);
    assert!(
        enc.rejected[1].1.contains("no client id"),
        "{:?}",
        enc.rejected
    );
}

#[test]
fn long_single_event_moves_its_params_to_the_body() {
    let mut e = purchase();
    e.items = (0..150)
        .map(|n| Item {
            item_id: Some(format!("SKU_{n:05}").into()),
            item_name: Some(format!("A rather long product name number {n}").into()),
            price: Some(10.0),
            ..Default::default()
        })
        .collect();
    let enc = tag(cfg()).encode(std::slice::from_ref(&e), 0);
    let r = only_request(&enc);
    assert!(r.url.len() < 2_000, "url is {} bytes", r.url.len());
    let (url, lines) = split(r);
    assert_eq!(lines.len(), 1);
    assert!(url.iter().any(|(k, _)| k == "cid"));
    assert!(!url.iter().any(|(k, _)| k == "en" || k.starts_with("pr")));
    let ev = &merged(r)[0];
    let items: Vec<Item> = ev
        .iter()
        .filter(|(k, _)| k.starts_with("pr"))
        .map(|(_, v)| decode_item(v))
        .collect();
    assert_eq!(items, e.items);
}

#[test]
fn consent_denied_event_is_blocked_by_its_trigger() {
    let trigger = Trigger::build(
        &TriggerConfig {
            consent: vec!["analytics_storage".into()],
            ..Default::default()
        },
        ConsentDefault::Granted,
    )
    .unwrap();
    let mut denied = page_view();
    denied.consent.analytics_storage = ConsentState::Denied;
    denied.consent.gcs = Some("G100".into());
    let granted = purchase();
    let batch = [denied, granted];
    let fired: Vec<Event> = batch
        .iter()
        .filter(|e| trigger.evaluate(e).fired)
        .cloned()
        .collect();
    assert_eq!(
        trigger.evaluate(&batch[0]).reason,
        "consent `analytics_storage` is denied"
    );
    let enc = tag(cfg()).encode(&fired, 0);
    let evs = merged(only_request(&enc));
    assert_eq!(evs.len(), 1);
    assert!(evs[0].contains(&("en".into(), "purchase".into())));
}

#[test]
fn build_errors() {
    let errs = Ga4Tag::from_config(&Ga4TagConfig {
        endpoint: "region1.google-analytics.com".into(),
        measurement_id: Some("UA-1234-1".into()),
        mode: Ga4Mode::MeasurementProtocol,
        api_secret: None,
        batch_max: 26,
        ..cfg()
    })
    .unwrap_err();
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert!(errs[0].starts_with("endpoint: `region1.google-analytics.com` must be an http(s) URL"));
    assert!(errs[1].starts_with("measurement_id: `UA-1234-1` is not a GA4 measurement id"));
    assert!(errs[2].starts_with("api_secret: required when mode = \"measurement_protocol\""));
    assert!(errs[3].starts_with("batch_max: must be between 1 and 25"));
    assert!(Ga4Tag::from_config(&Ga4TagConfig {
        endpoint: "ftp://x.example".into(),
        ..cfg()
    })
    .is_err());
    assert!(Ga4Tag::from_config(&Ga4TagConfig {
        endpoint: "https://x.example/?a=1".into(),
        ..cfg()
    })
    .is_err());
    // Collect mode needs no secret; the default config builds.
    let t = tag(cfg());
    assert_eq!(t.endpoint, BASE);
}

#[test]
fn classify_follows_http_rules() {
    let t = tag(cfg());
    let h = http::HeaderMap::new();
    assert_eq!(
        t.classify(StatusCode::NO_CONTENT, &h, b""),
        Outcome::Delivered
    );
    assert!(matches!(
        t.classify(StatusCode::SERVICE_UNAVAILABLE, &h, b""),
        Outcome::Retry { .. }
    ));
    assert!(matches!(
        t.classify(StatusCode::FORBIDDEN, &h, b""),
        Outcome::Rejected { .. }
    ));
}

// ---- measurement protocol mode ----

fn body_json(r: &OutboundRequest) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[test]
fn mp_purchase_golden() {
    // Reference §2.6.
    let mut e = purchase();
    e.ip_override = Some("203.0.113.7".into());
    e.user_properties
        .insert("customer_tier".into(), json!("gold"));
    e.consent.ad_user_data = ConsentState::Granted;
    e.consent.ad_personalization = ConsentState::Denied;
    e.params.remove("coupon");
    e.items = vec![
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
    ];
    let t = tag(mp_cfg());
    let enc = t.encode(&[e], 1_764_913_100_000);
    let r = only_request(&enc);
    assert_eq!(
        r.url,
        "https://region1.google-analytics.com/mp/collect?measurement_id=G-ABCDEF1234&api_secret=s3cr%2Ft%2Bx"
    );
    assert_eq!(
        r.headers,
        vec![("Content-Type".to_owned(), "application/json".to_owned())]
    );
    let want = json!({
        "client_id": "1234567890.1764912990",
        "user_id": "u_8842",
        "timestamp_micros": 1_764_913_000_000_000i64,
        "consent": {"ad_user_data": "GRANTED", "ad_personalization": "DENIED"},
        "ip_override": "203.0.113.7",
        "user_agent": UA,
        "user_properties": {"customer_tier": {"value": "gold"}},
        "events": [{"name": "purchase", "params": {
            "session_id": "1764912991", "engagement_time_msec": 2311,
            "page_location": "https://shop.example.com/checkout/thanks", "page_title": "Thank you",
            "currency": "EUR", "value": 134, "transaction_id": "T-1024", "tax": 21.4, "shipping": 4.9,
            "items": [
                {"item_id": "SKU_123", "item_name": "Trail Shoe", "item_brand": "Acme", "price": 59, "quantity": 2, "size": "42"},
                {"item_id": "SKU_777", "item_name": "Socks", "price": 16, "quantity": 1}
            ]}}]
    });
    assert_eq!(body_json(r), want);
}

#[test]
fn mp_batches_keep_event_times_and_default_engagement() {
    let mut evs = view_item_and_scroll();
    evs[1].timestamp_ms += 1_500;
    evs[1].ga.engagement_time_msec = None;
    // A clock ahead of ours is pulled back to now.
    let mut future = page_view();
    future.timestamp_ms = 1_764_999_000_000;
    future.ga = evs[0].ga.clone();
    future.event_name = "page_view".into();
    let now = 1_764_913_100_000;
    let enc = tag(mp_cfg()).encode(&[evs[0].clone(), evs[1].clone(), future], now);
    let r = only_request(&enc);
    let b = body_json(r);
    assert_eq!(b["timestamp_micros"], json!(1_764_913_000_000_000i64));
    let events = b["events"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0]["name"], "view_item");
    assert!(events[0]["params"].get("timestamp_micros").is_none());
    assert_eq!(events[0]["params"]["items"][0]["item_id"], "SKU_123");
    assert_eq!(
        events[1]["params"]["timestamp_micros"],
        json!(1_764_913_001_500_000i64)
    );
    assert_eq!(events[1]["params"]["engagement_time_msec"], json!(1));
    assert_eq!(events[1]["params"]["percent_scrolled"], json!(90));
    assert_eq!(events[2]["params"]["timestamp_micros"], json!(now * 1000));
}

#[test]
fn mp_reserved_names_are_skipped() {
    let names = [
        "session_start",
        "first_visit",
        "user_engagement",
        "page_view",
        "firebase_campaign",
        "_internal",
        "notification_open",
        "gtag.config",
        "purchase",
    ];
    let events: Vec<Event> = names
        .iter()
        .map(|n| {
            let mut e = page_view();
            e.event_name = (*n).into();
            e
        })
        .collect();
    let (enc, counts) = recording(|| tag(mp_cfg()).encode(&events, 1_764_913_100_000));
    let skipped: Vec<usize> = enc.skipped.iter().map(|(i, _)| *i).collect();
    assert_eq!(skipped, vec![0, 1, 2, 4, 5, 6, 7]);
    assert!(enc.skipped[0]
        .1
        .contains("`session_start` is a GA4-reserved event name"));
    assert!(enc.rejected.is_empty());
    assert_eq!(enc.requests.len(), 1);
    assert_eq!(enc.requests[0].1, vec![3, 8]);
    let sent: Vec<Value> = body_json(&enc.requests[0].0)["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].clone())
        .collect();
    assert_eq!(sent, vec![json!("page_view"), json!("purchase")]);
    assert_eq!(counts.get("reserved_event_name"), 7);
}

#[test]
fn mp_limits_truncate_and_drop() {
    let mut e = purchase();
    e.items.clear();
    e.event_name = format!("a{}", "b".repeat(44));
    e.params.clear();
    e.params
        .insert(format!("p{}", "x".repeat(44)), json!("short"));
    e.params.insert("long_value".into(), json!("v".repeat(150)));
    e.params.insert("ga_reserved".into(), json!("no"));
    e.params.insert("bad-name".into(), json!("no"));
    e.params.insert("nested".into(), json!({"a": 1}));
    for n in 0..30 {
        e.params.insert(format!("z{n:02}"), json!(n));
    }
    e.user_properties
        .insert(format!("a{}", "y".repeat(29)), json!("w".repeat(50)));
    e.user_properties.insert("first_open_time".into(), json!(1));
    for n in 0..30 {
        e.user_properties.insert(format!("up{n:02}"), json!(n));
    }
    let (enc, counts) = recording(|| tag(mp_cfg()).encode(&[e], 1_764_913_100_000));
    let b = body_json(only_request(&enc));
    let ev = &b["events"][0];
    assert_eq!(ev["name"], json!(format!("a{}", "b".repeat(39))));
    let params = ev["params"].as_object().unwrap();
    assert_eq!(
        params.len(),
        24,
        "one slot stays for timestamp_micros: {params:?}"
    );
    assert_eq!(params[&format!("p{}", "x".repeat(39))], json!("short"));
    assert_eq!(params["long_value"], json!("v".repeat(100)));
    for absent in ["ga_reserved", "bad-name", "nested"] {
        assert!(!params.contains_key(absent), "{absent}");
    }
    // Documented params come first and survive the cap.
    for kept in [
        "session_id",
        "engagement_time_msec",
        "currency",
        "value",
        "transaction_id",
    ] {
        assert!(params.contains_key(kept), "{kept}");
    }
    let props = b["user_properties"].as_object().unwrap();
    assert_eq!(props.len(), 25);
    assert!(!props.contains_key("first_open_time"));
    assert_eq!(
        props[&format!("a{}", "y".repeat(23))],
        json!({"value": "w".repeat(36)})
    );
    assert_eq!(counts.get("event_name_truncated"), 1);
    assert_eq!(counts.get("param_name_truncated"), 1);
    assert_eq!(counts.get("param_value_truncated"), 1);
    assert_eq!(counts.get("reserved_param_name"), 1);
    assert_eq!(counts.get("invalid_param_name"), 1);
    assert_eq!(counts.get("invalid_param_value"), 1);
    assert!(counts.get("too_many_params") > 0);
    assert_eq!(counts.get("reserved_user_property"), 1);
    assert_eq!(counts.get("user_property_name_truncated"), 1);
    assert_eq!(counts.get("user_property_value_truncated"), 1);
    assert_eq!(counts.get("too_many_user_properties"), 6);
    assert!(counts.labels_ok());

    // A name that can never be valid is rejected, not sent.
    let mut bad = page_view();
    bad.event_name = "9lives".into();
    let enc = tag(mp_cfg()).encode(&[bad], 1_764_913_100_000);
    assert!(enc.requests.is_empty());
    assert_eq!(enc.rejected.len(), 1);
    assert!(enc.rejected[0].1.contains("`9lives` is not valid"));
}

#[test]
fn mp_groups_by_measurement_id_and_client_and_caps_at_25() {
    let mut events: Vec<Event> = (0..30)
        .map(|n| {
            let mut e = page_view();
            e.event_name = format!("ev_{n}");
            e
        })
        .collect();
    events[5].client_id = Some("42.42".into());
    events[6].ga.measurement_id = Some("G-OTHER".into());
    events[7].user_id = Some("u_1".into());
    let enc = tag(mp_cfg()).encode(&events, 1_764_913_100_000);
    let sets: Vec<Vec<usize>> = enc.requests.iter().map(|(_, ix)| ix.clone()).collect();
    let main: Vec<usize> = (0..30).filter(|i| ![5, 6, 7].contains(i)).collect();
    assert_eq!(
        sets,
        vec![
            main[..25].to_vec(),
            main[25..].to_vec(),
            vec![5],
            vec![6],
            vec![7]
        ]
    );
    assert!(enc.requests[3].0.url.contains("measurement_id=G-OTHER&"));
    assert_eq!(
        body_json(&enc.requests[1].0)["client_id"],
        "1234567890.1764912990"
    );
    assert_eq!(body_json(&enc.requests[2].0)["client_id"], "42.42");
    assert_eq!(body_json(&enc.requests[4].0)["user_id"], "u_1");
    assert!(body_json(&enc.requests[0].0).get("user_id").is_none());

    // The configured measurement id replaces every event's own.
    let t = tag(Ga4TagConfig {
        measurement_id: Some("G-OVERRIDE99".into()),
        ..mp_cfg()
    });
    let enc = t.encode(&events[5..8], 1_764_913_100_000);
    assert!(enc.rejected.is_empty(), "{:?}", enc.rejected);
    assert!(!enc.requests.is_empty());
    for (r, _) in &enc.requests {
        assert!(r.url.contains("measurement_id=G-OVERRIDE99&"), "{}", r.url);
    }
}

#[test]
fn mp_splits_bodies_over_130kb() {
    let events: Vec<Event> = (0..4)
        .map(|_| {
            let mut e = purchase();
            e.items = (0..200)
                .map(|n| Item {
                    item_id: Some(format!("SKU_{n:05}").into()),
                    item_name: Some("x".repeat(90).into()),
                    item_brand: Some("y".repeat(90).into()),
                    ..Default::default()
                })
                .collect();
            e
        })
        .collect();
    let enc = tag(mp_cfg()).encode(&events, 1_764_913_100_000);
    assert!(enc.rejected.is_empty());
    assert!(enc.requests.len() > 1);
    let mut carried: Vec<usize> = Vec::new();
    for (r, ix) in &enc.requests {
        assert!(r.body.len() < 130_000, "{}", r.body.len());
        carried.extend(ix);
    }
    assert_eq!(carried, vec![0, 1, 2, 3]);
}

#[test]
fn mp_redacts_api_secret_and_ip() {
    let t = tag(Ga4TagConfig {
        redact_ip: RedactIp::Full,
        ..mp_cfg()
    });
    let mut e = purchase();
    e.ip_override = Some("203.0.113.7".into());
    let enc = t.encode(&[e], 1_764_913_100_000);
    let r = only_request(&enc);
    assert!(body_json(r).get("ip_override").is_none());
    let log = format!("POST {} failed; secret was s3cr/t+x", r.url);
    let red = t.redact(&log);
    assert!(!red.contains("s3cr"), "{red}");
    assert_eq!(
        red,
        "POST https://region1.google-analytics.com/mp/collect?measurement_id=G-ABCDEF1234&api_secret=[redacted] failed; secret was [redacted]"
    );
    let t = tag(Ga4TagConfig {
        redact_ip: RedactIp::LastOctet,
        ..mp_cfg()
    });
    let mut e = purchase();
    e.ip_override = Some("203.0.113.7".into());
    let enc = t.encode(&[e], 1_764_913_100_000);
    assert_eq!(body_json(only_request(&enc))["ip_override"], "203.0.113.0");
    // Without a secret there is nothing to hide.
    assert_eq!(tag(cfg()).redact("as is"), "as is");
}

// ---- what gets counted ----

use crate::test_metrics::{recording, Recorded};

trait DroppedCounts {
    fn get(&self, reason: &str) -> u64;
    /// Every recorded counter is the dropped counter with exactly the two bounded labels.
    fn labels_ok(&self) -> bool;
}

impl DroppedCounts for Recorded {
    fn get(&self, reason: &str) -> u64 {
        self.counter("tagrelay_tag_dropped_total", &[("reason", reason)])
    }

    fn labels_ok(&self) -> bool {
        self.series().all(|(n, l)| {
            n == "tagrelay_tag_dropped_total"
                && l.len() == 2
                && l[0] == ("tag_type".to_owned(), "ga4".to_owned())
                && l[1].0 == "reason"
        })
    }
}
