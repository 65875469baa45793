//! Development harness for the debug view page.
//!
//! Serves `src/admin/debug_page/index.html` at `/debug` with a fake trace API and a live SSE
//! stream, so the page can be designed and screenshotted without a running gateway.
//!
//! ```text
//! cargo run --example debug_page_demo -- 127.0.0.1:7777            # a new hit every 200 ms
//! cargo run --example debug_page_demo -- 127.0.0.1:7777 --rate 1000 # load test the page
//! cargo run --example debug_page_demo -- 127.0.0.1:7777 --weird     # add a malformed trace
//! ```
//!
//! `/debug` is the normal page; `/locked/debug` serves the same page whose API answers 401, to
//! see the signed-out state. Every 150th tick sends a malformed SSE message on purpose: the page
//! must ignore it.

#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::Stream;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;

const PAGE: &str = include_str!("../src/admin/debug_page/index.html");
/// Traces the fake server remembers (the real one keeps a ring of similar size).
const STORE_CAP: usize = 2000;
const MEASUREMENT_ID: &str = "G-DEMO12345";
const PIXEL_ID: &str = "1234567890";

#[derive(Clone, Debug)]
enum Msg {
    Trace(Arc<str>),
    Update(Arc<str>),
    Dropped(u64),
    Garbage,
}

/// A delivery step that becomes visible at `due_ms`.
struct Pending {
    due_ms: i64,
    trace_id: String,
    tag: &'static str,
    event_id: String,
    attempt: Option<Value>,
    outcome: Value,
}

#[derive(Default)]
struct Store {
    traces: HashMap<String, Value>,
    order: VecDeque<String>,
    pending: Vec<Pending>,
}

impl Store {
    fn insert(&mut self, trace: Value, pending: Vec<Pending>) {
        let id = trace["id"].as_str().unwrap_or_default().to_owned();
        self.order.push_front(id.clone());
        self.traces.insert(id, trace);
        self.pending.extend(pending);
        while self.order.len() > STORE_CAP {
            if let Some(old) = self.order.pop_back() {
                self.traces.remove(&old);
            }
        }
    }

    /// Applies every step that is due to the stored traces and returns them as `update` payloads.
    fn take_due(&mut self, now: i64) -> Vec<Value> {
        let (due, keep): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|p| p.due_ms <= now);
        self.pending = keep;
        let mut out = Vec::with_capacity(due.len());
        for p in due {
            if let Some(trace) = self.traces.get_mut(&p.trace_id) {
                let tags = trace["tags"].as_array_mut();
                if let Some(tag) = tags.into_iter().flatten().find(|t| {
                    t["tag"].as_str() == Some(p.tag) && t["event_id"].as_str() == Some(&p.event_id)
                }) {
                    if let (Some(a), Some(list)) = (&p.attempt, tag["attempts"].as_array_mut()) {
                        list.push(a.clone());
                    }
                    tag["outcome"] = p.outcome.clone();
                }
            }
            out.push(json!({
                "trace_id": p.trace_id,
                "tag": p.tag,
                "event_id": p.event_id,
                "attempt": p.attempt,
                "outcome": p.outcome,
            }));
        }
        out
    }
}

#[derive(Clone)]
struct Demo {
    store: Arc<Mutex<Store>>,
    tx: broadcast::Sender<Msg>,
}

impl Demo {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic elsewhere while holding the lock leaves plain data; keep serving it.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

struct Visitor {
    client_id: &'static str,
    fbp: &'static str,
    fbc: Option<&'static str>,
    marker: Option<&'static str>,
    ip: &'static str,
    ua: &'static str,
    email: &'static str,
    ad_consent: bool,
}

const VISITORS: [Visitor; 4] = [
    Visitor {
        client_id: "1187346503.1764911200",
        fbp: "fb.1.1764911200412.1873465031",
        fbc: Some("fb.1.1764912100000.IwAR2xDemoClickId"),
        marker: Some("alice"),
        ip: "203.0.113.7",
        ua: "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
        email: "alice@example.com",
        ad_consent: true,
    },
    Visitor {
        client_id: "904418277.1764900011",
        fbp: "fb.1.1764900011093.904418277",
        fbc: None,
        marker: None,
        ip: "198.51.100.23",
        ua: "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
        email: "bob@example.org",
        ad_consent: false,
    },
    Visitor {
        client_id: "1653002984.1764850330",
        fbp: "fb.1.1764850330551.1653002984",
        fbc: None,
        marker: None,
        ip: "192.0.2.141",
        ua: "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
        email: "carol@example.net",
        ad_consent: true,
    },
    Visitor {
        client_id: "288761432.1764912750",
        fbp: "fb.1.1764912750218.288761432",
        fbc: None,
        marker: Some("bob-qa"),
        ip: "203.0.113.88",
        ua: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
        email: "qa@example.com",
        ad_consent: true,
    },
];

struct Product {
    id: &'static str,
    name: &'static str,
    brand: &'static str,
    category: &'static str,
    price: f64,
}

const PRODUCTS: [Product; 4] = [
    Product {
        id: "SKU-1042",
        name: "Blue Oxford Shirt",
        brand: "Northwind",
        category: "Shirts",
        price: 59.95,
    },
    Product {
        id: "SKU-2210",
        name: "Slim Chino, Sand",
        brand: "Northwind",
        category: "Trousers",
        price: 69.95,
    },
    Product {
        id: "SKU-0387",
        name: "Merino Crew Socks (3 pack)",
        brand: "Fjellstrom",
        category: "Accessories",
        price: 24.0,
    },
    Product {
        id: "SKU-5120",
        name: "Waxed Cotton Jacket",
        brand: "Harbour & Co",
        category: "Outerwear",
        price: 249.0,
    },
];

#[derive(Clone, Copy)]
enum Kind {
    PageView,
    ViewItem,
    AddToCart,
    Purchase,
    BadHit,
    NoClient,
}

/// What happens to the Meta delivery of a purchase.
#[derive(Clone, Copy, PartialEq)]
enum MetaFate {
    Ok,
    RetryThenOk,
    Rejected,
}

struct Gen {
    rng: StdRng,
    n: u64,
}

impl Gen {
    fn next_kind(&mut self) -> Kind {
        self.n += 1;
        match self.n % 20 {
            0 => Kind::BadHit,
            7 => Kind::NoClient,
            3 | 13 => Kind::Purchase,
            5 | 10 | 15 | 18 => Kind::AddToCart,
            1 | 6 | 11 | 16 | 19 => Kind::ViewItem,
            _ => Kind::PageView,
        }
    }

    fn id(&mut self) -> String {
        uuid::Uuid::now_v7().to_string()
    }

    fn event_id(&mut self, client_id: &str) -> String {
        format!("{client_id}.{:08x}", self.rng.gen::<u32>())
    }

    /// One fake hit plus the delivery steps that will follow it.
    fn trace(&mut self, t: i64, kind: Kind, fate: Option<MetaFate>) -> (Value, Vec<Pending>) {
        let v = &VISITORS[self.rng.gen_range(0..VISITORS.len())];
        let id = self.id();
        match kind {
            Kind::BadHit => (bad_hit(&id, t, v), Vec::new()),
            Kind::NoClient => (no_client(&id, t, v), Vec::new()),
            _ => self.ga4_hit(&id, t, v, kind, fate),
        }
    }

    fn ga4_hit(
        &mut self,
        id: &str,
        t: i64,
        v: &Visitor,
        kind: Kind,
        fate: Option<MetaFate>,
    ) -> (Value, Vec<Pending>) {
        let p = &PRODUCTS[self.rng.gen_range(0..PRODUCTS.len())];
        let p2 = &PRODUCTS[(self.rng.gen_range(0..PRODUCTS.len()) + 1) % PRODUCTS.len()];
        let (name, path_tail, title) = match kind {
            Kind::PageView => ("page_view", "/", "Example Store – Menswear"),
            Kind::ViewItem => ("view_item", "/products/blue-oxford-shirt", p.name),
            Kind::AddToCart => ("add_to_cart", "/products/blue-oxford-shirt", p.name),
            _ => (
                "purchase",
                "/checkout/thank-you",
                "Thank you for your order",
            ),
        };
        let page = format!("https://www.example.com{path_tail}");
        let eid = self.event_id(v.client_id);
        let session = "1764912000";
        let tx_id = format!("T-{}", 10_000 + self.n);
        let items: Vec<Value> = match kind {
            Kind::PageView => Vec::new(),
            Kind::Purchase => vec![item(p, 1, 0), item(p2, 2, 1)],
            _ => vec![item(p, 1, 0)],
        };
        let value: f64 = items
            .iter()
            .map(|i| i["price"].as_f64().unwrap_or(0.0) * i["quantity"].as_f64().unwrap_or(0.0))
            .sum();
        let value = (value * 100.0).round() / 100.0;

        let mut event = json!({
            "event_name": name,
            "event_id": eid,
            "timestamp_ms": t,
            "source": "ga4",
            "client_id": v.client_id,
            "ip_override": v.ip,
            "user_agent": v.ua,
            "page_location": page,
            "page_referrer": if matches!(kind, Kind::PageView) { "https://www.google.com/" } else { "https://www.example.com/" },
            "page_title": title,
            "language": "en-us",
            "screen_resolution": "1920x1080",
            "consent": {
                "ad_storage": if v.ad_consent { "granted" } else { "denied" },
                "analytics_storage": "granted",
                "ad_user_data": if v.ad_consent { "granted" } else { "denied" },
                "ad_personalization": if v.ad_consent { "granted" } else { "denied" },
                "gcs": if v.ad_consent { "G111" } else { "G101" },
                "gcd": if v.ad_consent { "13t3t3t3t5l1" } else { "13p3t3p3p5l1" },
            },
            "identity": { "fbp": v.fbp, "ga_client_id": v.client_id },
            "ga": {
                "measurement_id": MEASUREMENT_ID,
                "session_id": session,
                "session_number": 3,
                "session_engaged": true,
                "engagement_time_msec": self.rng.gen_range(200..9000),
                "protocol_version": "2",
                "gtm_version": "45je5ca1v9179290478za200",
                "page_id": format!("{}", self.rng.gen_range(100_000_000u32..999_999_999)),
                "request_count": self.rng.gen_range(1..12),
            },
            "params": { "content_group": if matches!(kind, Kind::PageView) { "home" } else { "products" } },
            "passthrough": [["_tu", "CA"], ["tfd", "1523"]],
        });
        if let Some(fbc) = v.fbc {
            event["identity"]["fbc"] = json!(fbc);
        }
        if let Some(m) = v.marker {
            event["identity"]["debug_marker"] = json!(m);
        }
        if !items.is_empty() {
            event["items"] = json!(items);
            event["value"] = json!(value);
            event["currency"] = json!("EUR");
        }
        if matches!(kind, Kind::Purchase) {
            event["transaction_id"] = json!(tx_id);
            event["user_data"] = json!({
                "sha256_email_address": sha256_hex(v.email),
                "address": { "city": "Utrecht", "postal_code": "3511", "country": "NL" },
            });
            event["params"]["payment_type"] = json!("credit_card");
            event["params"]["coupon"] = json!("WINTER10");
        }

        let mut query = format!(
            "v=2&tid={MEASUREMENT_ID}&gtm=45je5ca1v9179290478za200&_p={}&gcs={}&cid={}&ul=en-us&sr=1920x1080&_s=2&sid={session}&sct=3&seg=1&dl={}&dt={}&en={name}&_et=1200&tfd=1523",
            event["ga"]["page_id"].as_str().unwrap_or_default(),
            event["consent"]["gcs"].as_str().unwrap_or_default(),
            v.client_id,
            enc(&page),
            enc(title),
        );
        let mut body = String::new();
        if !items.is_empty() {
            let mut line = format!("en={name}&cu=EUR&epn.value={value}");
            if matches!(kind, Kind::Purchase) {
                line.push_str(&format!(
                    "&ep.transaction_id={tx_id}&ep.payment_type=credit_card&ep.coupon=WINTER10"
                ));
            }
            for (i, it) in items.iter().enumerate() {
                let field = |k: &str| enc(it[k].as_str().unwrap_or_default());
                line.push_str(&format!(
                    "&pr{}=id{}~nm{}~br{}~ca{}~pr{}~qt{}",
                    i + 1,
                    field("item_id"),
                    field("item_name"),
                    field("item_brand"),
                    field("item_category"),
                    it["price"],
                    it["quantity"]
                ));
            }
            body = line;
            query = query.replace(&format!("&en={name}"), "");
        }

        let mut cookie = format!(
            "_ga=GA1.1.{}; FPID=FPID2.2.kJ8mZ2x%2FqW7nVb1r0Lr4sT9yD0aXcE%3D.1764911200; _fbp={}",
            v.client_id, v.fbp
        );
        if let Some(m) = v.marker {
            cookie.push_str(&format!("; tagrelay_debug={m}"));
        }
        let headers = json!([
            ["user-agent", v.ua],
            ["accept", "*/*"],
            ["accept-language", "en-US,en;q=0.9,nl;q=0.8"],
            ["content-type", "text/plain;charset=UTF-8"],
            ["origin", "https://www.example.com"],
            ["referer", page],
            ["cookie", cookie],
            ["sec-fetch-site", "same-site"],
            ["x-forwarded-for", v.ip],
        ]);

        let meta_name = match kind {
            Kind::PageView => "PageView",
            Kind::ViewItem => "ViewContent",
            Kind::AddToCart => "AddToCart",
            _ => "Purchase",
        };
        let mut tags = vec![json!({
            "tag": "ga4", "kind": "ga4", "event_id": eid, "event_name": name, "fired": true,
            "reason": "all conditions met",
            "outcome": { "state": "queued", "detail": "waiting in the outbox", "next_attempt_ms": null },
            "attempts": [],
        })];
        let meta_fires = v.ad_consent;
        tags.push(json!({
            "tag": "meta", "kind": "meta_capi", "event_id": eid, "event_name": name, "fired": meta_fires,
            "reason": if meta_fires { "all conditions met" } else { "consent `ad_storage` is denied" },
            "outcome": if meta_fires {
                json!({ "state": "queued", "detail": "waiting in the outbox", "next_attempt_ms": null })
            } else {
                json!({ "state": "not_fired", "detail": "", "next_attempt_ms": null })
            },
            "attempts": [],
        }));

        let mut pending = Vec::new();
        let ga_at = t + self.rng.gen_range(40..160);
        let ga_lat = self.rng.gen_range(18..70);
        let ga_url = format!(
            "https://region1.google-analytics.com/g/collect?v=2&tid={MEASUREMENT_ID}&cid={}&sid={session}&en={name}&_uip={}&dl={}",
            v.client_id,
            v.ip,
            enc(&page)
        );
        pending.push(Pending {
            due_ms: ga_at,
            trace_id: id.to_owned(),
            tag: "ga4",
            event_id: eid.clone(),
            attempt: Some(json!({
                "time_ms": ga_at - ga_lat,
                "request": { "method": "POST", "url": ga_url,
                    "headers": [["user-agent", v.ua], ["content-type", "text/plain;charset=UTF-8"]],
                    "body": body },
                "status": 204, "response_body": "", "latency_ms": ga_lat, "outcome": "delivered",
            })),
            outcome: json!({ "state": "delivered", "detail": "HTTP 204", "next_attempt_ms": null }),
        });

        if meta_fires {
            let mut user_data = json!({
                "client_ip_address": v.ip,
                "client_user_agent": v.ua,
                "fbp": v.fbp,
                "external_id": [sha256_hex(v.client_id)],
            });
            if let Some(fbc) = v.fbc {
                user_data["fbc"] = json!(fbc);
            }
            if matches!(kind, Kind::Purchase) {
                user_data["em"] = json!([sha256_hex(v.email)]);
                user_data["ct"] = json!([sha256_hex("utrecht")]);
                user_data["zp"] = json!([sha256_hex("3511")]);
                user_data["country"] = json!([sha256_hex("nl")]);
            }
            let fate = if matches!(kind, Kind::Purchase) {
                fate.unwrap_or(MetaFate::RetryThenOk)
            } else {
                MetaFate::Ok
            };
            let mut custom = json!({});
            if !items.is_empty() {
                custom = json!({
                    "currency": if fate == MetaFate::Rejected { "EURO" } else { "EUR" },
                    "value": value,
                    "content_type": "product",
                    "content_ids": items.iter().map(|i| i["item_id"].clone()).collect::<Vec<_>>(),
                    "contents": items.iter().map(|i| json!({"id": i["item_id"], "quantity": i["quantity"], "item_price": i["price"]})).collect::<Vec<_>>(),
                });
                if matches!(kind, Kind::Purchase) {
                    custom["order_id"] = json!(tx_id);
                }
            }
            let capi = json!({
                "data": [{
                    "event_name": meta_name,
                    "event_time": t / 1000,
                    "event_id": eid,
                    "action_source": "website",
                    "event_source_url": page,
                    "user_data": user_data,
                    "custom_data": custom,
                }],
            });
            let request = json!({
                "method": "POST",
                "url": format!("https://graph.facebook.com/v24.0/{PIXEL_ID}/events?access_token=[redacted]"),
                "headers": [["content-type", "application/json"], ["user-agent", "tagrelay/0.1"]],
                "body": capi.to_string(),
            });
            let trace_tag = self.rng.gen::<u32>();
            let ok_body = json!({ "events_received": 1, "messages": [], "fbtrace_id": format!("A{trace_tag:08x}DemoTrace") }).to_string();
            let first = t + self.rng.gen_range(80..260);
            let lat = self.rng.gen_range(60..180);
            match fate {
                MetaFate::Ok => pending.push(meta_step(id, &eid, first, lat, &request, 200, &ok_body, "delivered",
                    json!({ "state": "delivered", "detail": "HTTP 200, events_received 1", "next_attempt_ms": null }))),
                MetaFate::RetryThenOk => {
                    let retry_at = first + 6000;
                    let err = json!({ "error": { "message": "Service temporarily unavailable", "type": "OAuthException", "is_transient": true, "code": 2, "fbtrace_id": format!("B{trace_tag:08x}DemoTrace") } }).to_string();
                    pending.push(meta_step(id, &eid, first, lat, &request, 503, &err, "retry: HTTP 503",
                        json!({ "state": "retrying", "detail": "HTTP 503 from graph.facebook.com (attempt 1 of 8)", "next_attempt_ms": retry_at })));
                    pending.push(meta_step(id, &eid, retry_at + lat, lat, &request, 200, &ok_body, "delivered",
                        json!({ "state": "delivered", "detail": "HTTP 200 on attempt 2, events_received 1", "next_attempt_ms": null })));
                }
                MetaFate::Rejected => {
                    let err = json!({ "error": { "message": "(#100) Invalid parameter", "type": "OAuthException", "code": 100, "error_subcode": 2804019, "error_user_msg": "The currency 'EURO' is not a valid ISO 4217 code.", "fbtrace_id": format!("C{trace_tag:08x}DemoTrace") } }).to_string();
                    pending.push(meta_step(id, &eid, first, lat, &request, 400, &err, "rejected: HTTP 400 (#100) Invalid parameter",
                        json!({ "state": "dead_lettered", "detail": "Meta rejected the event: currency 'EURO' is not a valid ISO 4217 code", "next_attempt_ms": null })));
                }
            }
        }

        let mut cookies = Vec::new();
        if self.n.is_multiple_of(3) {
            cookies.push(json!({ "name": "FPID", "value": "FPID2.2.kJ8mZ2x%2FqW7nVb1r0Lr4sT9yD0aXcE%3D.1764911200", "domain": "example.com", "max_age_secs": 34_560_000, "http_only": true, "secure": true, "same_site": "Lax", "path": "/" }));
            cookies.push(json!({ "name": "_fbp", "value": v.fbp, "domain": "example.com", "max_age_secs": 7_776_000, "http_only": false, "secure": true, "same_site": "Lax", "path": "/" }));
        }

        let trace = json!({
            "id": id,
            "time_ms": t,
            "method": "POST",
            "path": "/g/collect",
            "query": query,
            "body": body,
            "body_truncated": false,
            "headers": headers,
            "client_ip": v.ip,
            "host": "sgtm.example.com",
            "client": "ga4",
            "status": 204,
            "error": null,
            "debug_marker": v.marker,
            "latency_us": self.rng.gen_range(180..900),
            "events": [event],
            "cookies": cookies,
            "tags": tags,
        });
        (trace, pending)
    }
}

fn item(p: &Product, qty: u32, index: u32) -> Value {
    json!({
        "item_id": p.id, "item_name": p.name, "item_brand": p.brand, "item_category": p.category,
        "price": p.price, "quantity": qty, "index": index,
    })
}

#[allow(clippy::too_many_arguments)]
fn meta_step(
    trace_id: &str,
    event_id: &str,
    done_at: i64,
    latency: i64,
    request: &Value,
    status: u16,
    response: &str,
    attempt_outcome: &str,
    outcome: Value,
) -> Pending {
    Pending {
        due_ms: done_at,
        trace_id: trace_id.to_owned(),
        tag: "meta",
        event_id: event_id.to_owned(),
        attempt: Some(json!({
            "time_ms": done_at - latency, "request": request, "status": status,
            "response_body": response, "latency_ms": latency, "outcome": attempt_outcome,
        })),
        outcome,
    }
}

fn bad_hit(id: &str, t: i64, v: &Visitor) -> Value {
    json!({
        "id": id, "time_ms": t, "method": "POST", "path": "/g/collect",
        "query": "v=2&gtm=45je5ca1v9&cid=1187346503.1764911200&en=page_view",
        "body": "", "body_truncated": false,
        "headers": [["user-agent", v.ua], ["origin", "https://www.example.com"], ["cookie", "_ga=GA1.1.1187346503.1764911200"]],
        "client_ip": v.ip, "host": "sgtm.example.com",
        "client": "ga4", "status": 400,
        "error": "invalid GA4 hit: required parameter `tid` is missing",
        "debug_marker": v.marker, "latency_us": 95,
        "events": [], "cookies": [], "tags": [],
    })
}

fn no_client(id: &str, t: i64, v: &Visitor) -> Value {
    json!({
        "id": id, "time_ms": t, "method": "GET", "path": "/collect",
        "query": "v=1&t=pageview&tid=UA-1234567-1&cid=555&dp=%2F",
        "body": "", "body_truncated": false,
        "headers": [["user-agent", v.ua], ["referer", "https://legacy.example.com/"]],
        "client_ip": v.ip, "host": "sgtm.example.com",
        "client": null, "status": 404,
        "error": "no client claims GET /collect",
        "debug_marker": null, "latency_us": 41,
        "events": [], "cookies": [], "tags": [],
    })
}

/// A scanner probing the public endpoint: every field is attacker-controlled text that the
/// page must show as text.
fn hostile(id: &str, t: i64) -> Value {
    json!({
        "id": id, "time_ms": t, "method": "GET", "path": "/\"><img src=x onerror=alert(1)>",
        "query": "q=<script>alert(document.cookie)</script>",
        "body": "", "body_truncated": false,
        "headers": [["user-agent", "<script>alert(1)</script> sqlmap/1.8"], ["x-test", "</td></tr><b>bold?</b>"]],
        "client_ip": "192.0.2.66", "host": "sgtm.example.com",
        "client": null, "status": 404,
        "error": "no client claims GET /\"><img src=x onerror=alert(1)>",
        "debug_marker": null, "latency_us": 38,
        "events": [], "cookies": [], "tags": [],
    })
}

/// Fields of the wrong type everywhere (only with `--weird`): the page must still render.
fn malformed(id: &str) -> Value {
    json!({
        "id": id, "time_ms": "yesterday", "method": 7, "path": null,
        "headers": "not a list", "status": "two hundred",
        "events": [null, 5, {"event_name": {"nested": true}, "items": "none", "consent": ["granted"]}, {"event_name": "purchase", "event_id": "weird-1", "value": "NaN", "items": [null, {"item_id": 1}]}],
        "cookies": [null, {"name": 5, "max_age_secs": "forever"}],
        "tags": [null, 3, {"tag": "meta", "event_id": "weird-1", "fired": "yes", "outcome": "delivered", "attempts": {"x": 1}},
                 {"tag": "ga4", "event_id": "weird-1", "outcome": {"state": "teleported", "next_attempt_ms": "soon"}, "attempts": [null, {"request": "GET /", "status": "ok"}]}],
    })
}

impl Msg {
    fn into_sse(self) -> SseEvent {
        match self {
            Msg::Trace(s) => SseEvent::default().event("trace").data(&*s),
            Msg::Update(s) => SseEvent::default().event("update").data(&*s),
            Msg::Dropped(n) => SseEvent::default()
                .event("dropped")
                .data(json!({ "count": n }).to_string()),
            Msg::Garbage => SseEvent::default().event("trace").data("{not json"),
        }
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn login() -> Html<&'static str> {
    Html("<!doctype html><title>Sign in</title><p>Demo login page: the real server shows a token form here.</p>")
}

async fn traces(State(d): State<Demo>, Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(200)
        .min(STORE_CAP);
    let store = d.store();
    let list: Vec<&Value> = store
        .order
        .iter()
        .take(limit)
        .filter_map(|id| store.traces.get(id))
        .collect();
    Json(json!({ "traces": list }))
}

async fn one_trace(State(d): State<Demo>, Path(id): Path<String>) -> Response {
    match d.store().traces.get(&id) {
        Some(t) => Json(t.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, "no such trace\n").into_response(),
    }
}

async fn stream(State(d): State<Demo>) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = BroadcastStream::new(d.tx.subscribe());
    let events = rx.map(|m| {
        Ok(match m {
            Ok(msg) => msg.into_sse(),
            // A slow page fell behind the channel: tell it how much it missed, like the server does.
            Err(BroadcastStreamRecvError::Lagged(n)) => Msg::Dropped(n).into_sse(),
        })
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

async fn locked() -> Response {
    (StatusCode::UNAUTHORIZED, "sign in at /debug/login\n").into_response()
}

/// Emits `rate` hits per second and publishes delivery steps as they come due.
async fn run_generator(d: Demo, mut gen: Gen, rate: u32) {
    let period_ms = (1000 / u64::from(rate.max(1))).max(10);
    let per_tick = (u64::from(rate) * period_ms).div_ceil(1000).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(period_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        ticks += 1;
        let now = now_ms();
        let mut out = Vec::new();
        {
            let mut store = d.store();
            for _ in 0..per_tick {
                let kind = gen.next_kind();
                let fate = match gen.n % 60 {
                    23 => MetaFate::Rejected,
                    43 => MetaFate::Ok,
                    _ => MetaFate::RetryThenOk,
                };
                let (trace, pending) = gen.trace(now, kind, Some(fate));
                out.push(Msg::Trace(Arc::from(trace.to_string())));
                store.insert(trace, pending);
            }
            for u in store.take_due(now) {
                out.push(Msg::Update(Arc::from(u.to_string())));
            }
        }
        if ticks.is_multiple_of(100) {
            out.push(Msg::Dropped(3));
        }
        if ticks.is_multiple_of(150) {
            out.push(Msg::Garbage);
        }
        for m in out {
            // No subscriber is fine: the page may not be open.
            let _ = d.tx.send(m);
        }
    }
}

/// A few minutes of history so the page has something to show on first load.
fn seed(d: &Demo, gen: &mut Gen, weird: bool) {
    let now = now_ms();
    let plan: [(i64, Kind, MetaFate); 12] = [
        (95_000, Kind::PageView, MetaFate::Ok),
        (88_000, Kind::ViewItem, MetaFate::Ok),
        (80_500, Kind::NoClient, MetaFate::Ok),
        (71_000, Kind::AddToCart, MetaFate::Ok),
        (64_000, Kind::Purchase, MetaFate::Rejected),
        (52_000, Kind::PageView, MetaFate::Ok),
        (40_000, Kind::BadHit, MetaFate::Ok),
        (31_000, Kind::ViewItem, MetaFate::Ok),
        (22_000, Kind::AddToCart, MetaFate::Ok),
        (14_000, Kind::Purchase, MetaFate::RetryThenOk),
        (6_000, Kind::PageView, MetaFate::Ok),
        (800, Kind::Purchase, MetaFate::RetryThenOk),
    ];
    let mut store = d.store();
    for (ago, kind, fate) in plan {
        gen.n += 1;
        let (trace, pending) = gen.trace(now - ago, kind, Some(fate));
        store.insert(trace, pending);
    }
    let id = gen.id();
    store.insert(hostile(&id, now - 45_000), Vec::new());
    if weird {
        let id = gen.id();
        store.insert(malformed(&id), Vec::new());
    }
    store.take_due(now);
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut addr: SocketAddr = "127.0.0.1:7777".parse()?;
    let mut rate: u32 = 5;
    let mut weird = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rate" => {
                rate = args
                    .next()
                    .ok_or("--rate needs a number of hits per second")?
                    .parse()?;
            }
            "--weird" => weird = true,
            other => addr = other.parse()?,
        }
    }

    let (tx, _) = broadcast::channel(4096);
    let demo = Demo {
        store: Arc::new(Mutex::new(Store::default())),
        tx,
    };
    let mut gen = Gen {
        rng: StdRng::seed_from_u64(7),
        n: 0,
    };
    seed(&demo, &mut gen, weird);
    tokio::spawn(run_generator(demo.clone(), gen, rate));

    let app = Router::new()
        .route("/debug", get(page))
        .route("/debug/", get(page))
        .route("/debug/login", get(login))
        .route("/debug/api/traces", get(traces))
        .route("/debug/api/traces/{id}", get(one_trace))
        .route("/debug/api/stream", get(stream))
        .route("/locked/debug", get(page))
        .route("/locked/debug/login", get(login))
        .route("/locked/debug/api/{*rest}", get(locked))
        .with_state(demo);

    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("debug page demo on http://{addr}/debug ({rate} hits/s)");
    axum::serve(listener, app).await?;
    Ok(())
}
