//! The benchmarked hits and the per-hit pure path, shared by `hit_path` (time) and
//! `hit_allocs` (allocations): the server's own `Pipeline::process` (parse a GA4 hit → stamp →
//! first-party cookies → triggers of two tags → the payloads the outbox stores); then, as the
//! dispatchers do later, encode for the GA4 and Meta CAPI tags. The pipeline is built from a
//! config exactly as the server builds it (`Pipeline::build`).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method};
use rand::rngs::StdRng;
use tagrelay::clients::HitRequest;
use tagrelay::config::load_str;
use tagrelay::event::Event;
use tagrelay::pipeline::Pipeline;

const CONFIG: &str = r#"
[cookies]
secure = true

[[clients]]
type = "ga4"

[[tags]]
name = "ga4"
type = "ga4"
endpoint = "http://127.0.0.1:9"

[[tags]]
name = "meta"
type = "meta_capi"
endpoint = "http://127.0.0.1:9"
pixel_id = "1234567890"
access_token = "EAAB-bench-token"
app_secret = "bench-app-secret"
[tags.trigger]
consent = ["ad_storage"]
"#;

const UA: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15";
const COOKIE: &str = "_ga=GA1.1.1234567890.1764912990; FPID=FPID2.2.1234567890.1764912990; _fbp=fb.1.1764912990000.1234567890; _ga_ABCDEF1234=GS2.1.s1764912991$o1$g1$t1764913010$j40$l0$h0";

const PAGE_VIEW: &str = "v=2&tid=G-ABCDEF1234&gtm=45je5ca1v9876543210za200&_p=1764912991250&gcs=G111&gcd=13t3t3t3t5l1&npa=0&dma=0&cid=1234567890.1764912990&ul=en-us&sr=1920x1080&_s=1&sid=1764912991&sct=1&seg=1&dl=https%3A%2F%2Fshop.example.com%2Fp%2Ftrail-shoe%3Ffbclid%3DIwAR2xYz&dt=Trail%20Shoe&en=page_view&_et=12";

const PURCHASE: &str = "v=2&tid=G-ABCDEF1234&gtm=45je5ca1v9876543210za200&_p=1764912991250&gcs=G111&gcd=13t3t3t3t5l1&npa=0&dma=0&cid=1234567890.1764912990&ul=en-us&sr=1920x1080&_s=7&sid=1764912991&sct=1&seg=1&dl=https%3A%2F%2Fshop.example.com%2Fcheckout%2Fthanks&dt=Thank%20you&uid=u_8842&en=purchase&_c=1&cu=EUR&ep.transaction_id=T-1024&epn.value=134&epn.tax=21.4&epn.shipping=4.9&ep.coupon=SUMMER&pr1=idSKU_123~nmTrail%20Shoe~brAcme~caShoes~c2Running~vablue~pr59~qt2~k0size~v042&pr2=idSKU_777~nmSocks~brAcme~caAccessories~pr16~qt1&_et=2311";

const BATCH_QUERY: &str = "v=2&tid=G-ABCDEF1234&gtm=45je5ca1v9876543210za200&_p=1764912991250&gcs=G111&cid=1234567890.1764912990&ul=en-us&sr=1920x1080&_s=4&sid=1764912991&sct=1&seg=1&dl=https%3A%2F%2Fshop.example.com%2Fp%2Ftrail-shoe&dt=Trail%20Shoe";
const BATCH_BODY: &str = "en=view_item&cu=EUR&epn.value=59&pr1=idSKU_123~nmTrail%20Shoe~brAcme~caShoes~pr59~qt1&_et=4210\r\nen=add_to_cart&cu=EUR&epn.value=59&pr1=idSKU_123~nmTrail%20Shoe~brAcme~caShoes~pr59~qt1&_et=812\r\nen=begin_checkout&cu=EUR&epn.value=75&ep.coupon=SUMMER&_et=2306";

const NOW_MS: i64 = 1_764_912_991_300;

pub fn pipeline() -> Pipeline {
    let cfg = load_str(CONFIG, "bench", false).expect("bench config is valid");
    Pipeline::build(&cfg).expect("bench pipeline builds")
}

pub fn headers(with_cookie: bool) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("sgtm.shop.example.com"));
    h.insert("user-agent", HeaderValue::from_static(UA));
    h.insert(
        "content-type",
        HeaderValue::from_static("text/plain;charset=UTF-8"),
    );
    if with_cookie {
        h.insert("cookie", HeaderValue::from_static(COOKIE));
    }
    h
}

/// One of the benchmarked hits.
pub struct Case {
    pub name: &'static str,
    pub method: Method,
    pub query: &'static str,
    pub body: &'static [u8],
    pub cookies: bool,
}

pub fn cases() -> [Case; 4] {
    let case = |name, method, query, body, cookies| Case {
        name,
        method,
        query,
        body,
        cookies,
    };
    [
        case(
            "page_view_get_new_visitor",
            Method::GET,
            PAGE_VIEW,
            b"",
            false,
        ),
        case(
            "page_view_get_with_cookies",
            Method::GET,
            PAGE_VIEW,
            b"",
            true,
        ),
        case(
            "purchase_2_items_with_cookies",
            Method::POST,
            PURCHASE,
            b"",
            true,
        ),
        case(
            "batched_post_3_events_with_cookies",
            Method::POST,
            BATCH_QUERY,
            BATCH_BODY.as_bytes(),
            true,
        ),
    ]
}

/// What the hit path does for one hit minus I/O: the server's own core
/// ([`Pipeline::process`]: parse, stamp, cookies, every tag's trigger, the stored payloads),
/// plus the `Set-Cookie` values the listener renders. Returns the events and the bytes
/// produced, so nothing is optimized away.
pub fn take_hit(
    p: &Pipeline,
    rng: &mut StdRng,
    case: &Case,
    headers: &HeaderMap,
) -> (Vec<Arc<Event>>, usize) {
    let hit = HitRequest {
        method: &case.method,
        path: "/g/collect",
        query: case.query,
        headers,
        host: "sgtm.shop.example.com",
        body: case.body,
        client_ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 77)),
        now_ms: NOW_MS,
    };
    let client = p.claim(&case.method, "/g/collect").expect("the GA4 client");
    let out = p
        .process(client, &hit, None, None, rng, None)
        .expect("valid hit");
    let produced = out
        .cookies
        .iter()
        .map(|c| c.header_value().len())
        .sum::<usize>()
        + out.queued.iter().map(|q| q.payload.len()).sum::<usize>();
    (out.events, produced)
}

/// What the dispatchers do later, off the hit path: one encoder call per tag over the events
/// its trigger fired for.
pub fn encode_for_tags(p: &Pipeline, events: &[Arc<Event>]) -> usize {
    let mut produced = 0;
    for tag in &p.tags {
        let fired: Vec<&Event> = events
            .iter()
            .map(|e| &**e)
            .filter(|e| tag.trigger.fires(e))
            .collect();
        let encoded = tag.tag.encode_batch(&fired, NOW_MS);
        produced += encoded
            .requests
            .iter()
            .map(|(r, _)| r.body.len() + r.url.len())
            .sum::<usize>();
    }
    produced
}
