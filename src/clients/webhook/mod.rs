//! What the webhook clients (`shopify`, `woocommerce`, `stripe`) share: signature checks on
//! the raw body (constant-time), reading the platforms' JSON (money as strings or numbers,
//! RFC 3339 times), and building an order's GA4-shaped event with its stitching keys.
//!
//! A webhook is answered `200` (what every platform takes as delivered; WooCommerce's ping
//! wants exactly 200) once its events are durable: the ingress awaits the outbox. A topic a
//! client does not use is answered `200` with the reason, so the platform does not retry it.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use http::StatusCode;
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::clients::{ClientError, ClientResponse, Parsed};
use crate::event::{order_event_id, Event, Item, OrderKey, Stitch};
use crate::secret::Secret;

pub type HmacSha256 = Hmac<Sha256>;

/// A `path` and a `secret` every webhook client has: validated here, named by key.
pub fn validate_common(path: &str, secret: &Secret, env_hint: &str) -> Vec<String> {
    let mut problems = Vec::new();
    crate::clients::data::check_path("path", path, &mut problems);
    if secret.expose().trim().is_empty() {
        problems.push(format!(
            "secret: is empty; set it to the platform's webhook signing secret, e.g. secret = \"${{{env_hint}}}\""
        ));
    }
    problems
}

/// The HMAC-SHA256 of `message` keyed with `secret` (`None` never happens: HMAC takes keys of
/// any length; callers refuse the request rather than panic).
pub fn mac(secret: &Secret, message: &[u8]) -> Option<HmacSha256> {
    let mut m = HmacSha256::new_from_slice(secret.expose().as_bytes()).ok()?;
    m.update(message);
    Some(m)
}

/// Checks a base64 HMAC-SHA256 of the raw body (Shopify, WooCommerce). The comparison is
/// constant-time (`verify_slice`); the reason never includes the expected value.
pub fn verify_base64_hmac(
    secret: &Secret,
    body: &[u8],
    header: Option<&str>,
    header_name: &str,
) -> Result<(), ClientError> {
    let Some(sig) = header.map(str::trim).filter(|s| !s.is_empty()) else {
        return Err(ClientError::Unauthorized(format!(
            "{header_name} is missing; only signed webhooks are taken"
        )));
    };
    let Ok(given) = STANDARD.decode(sig) else {
        return Err(ClientError::Unauthorized(format!(
            "{header_name} is not base64"
        )));
    };
    let m = mac(secret, body)
        .ok_or_else(|| ClientError::Unauthorized("cannot check the signature".into()))?;
    m.verify_slice(&given).map_err(|_| {
        ClientError::Unauthorized(format!(
            "{header_name} does not match the body (wrong secret, or the body was changed on the way)"
        ))
    })
}

/// The body as a JSON object.
pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, ClientError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ClientError::BadRequest("body must be a JSON object".into())),
        Err(e) => Err(ClientError::BadRequest(format!(
            "body is not valid JSON: {e}"
        ))),
    }
}

/// `200 {"ignored": "<reason>"}`: taken, nothing to send, no retry wanted.
pub fn ignored(reason: impl Into<String>) -> Parsed {
    let body = serde_json::json!({ "ignored": reason.into() }).to_string();
    Parsed {
        events: Vec::new(),
        response: ClientResponse::Body {
            status: StatusCode::OK,
            content_type: "application/json",
            body: body.into_bytes(),
            headers: Vec::new(),
        },
        set_cookies: false,
    }
}

/// The accepted order events, answered with their ids (`200 {"events": [...]}`).
pub fn accepted(events: Vec<Event>) -> Parsed {
    Parsed {
        events,
        response: ClientResponse::EventIds,
        set_cookies: false,
    }
}

/// A string, or a number as text (platforms write ids and amounts either way).
pub fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A money amount written as a decimal string (`"199.65"`) or a number.
pub fn money(v: Option<&Value>) -> Option<f64> {
    let n = match v? {
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        Value::Number(n) => n.as_f64()?,
        _ => return None,
    };
    n.is_finite().then_some(n)
}

/// An RFC 3339 time (`2024-03-14T10:32:11-04:00`) in unix milliseconds. A time without an
/// offset (WooCommerce's `*_gmt` fields) is read as UTC.
pub fn time_ms(v: Option<&Value>) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    let s = v?.as_str()?.trim();
    if s.is_empty() {
        return None;
    }
    let has_offset = s.ends_with('Z')
        || s.ends_with('z')
        || s.get(10..)
            .is_some_and(|t| t.contains('+') || t.contains('-'));
    let parsed = if has_offset {
        time::OffsetDateTime::parse(s, &Rfc3339)
    } else {
        time::OffsetDateTime::parse(&format!("{s}Z"), &Rfc3339)
    };
    let t = parsed.ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Rounds to cents (sums of amounts in floating point drift).
pub fn round2(n: f64) -> f64 {
    (n * 100.0).round() / 100.0
}

/// An order event before the stitching step: name, platform (`source`), transaction id, the
/// derived event id, time, dedup key and lookup keys.
pub struct OrderEvent {
    pub name: &'static str,
    pub source: &'static str,
    pub transaction_id: String,
    /// The refund's own id, for refunds (event id and dedup key).
    pub part: Option<String>,
    pub time_ms: Option<i64>,
    /// What tells this platform's orders apart in the dedup key (the shop), if needed.
    pub scope: Option<String>,
    pub lookup: Vec<OrderKey>,
}

impl OrderEvent {
    pub fn build(self) -> Event {
        let part = self.part.as_deref();
        let event_id = order_event_id(self.name, &self.transaction_id, part);
        let mut dedup_key = format!("{}:", self.source);
        if let Some(s) = &self.scope {
            dedup_key.push_str(s);
            dedup_key.push(':');
        }
        dedup_key.push_str(&self.transaction_id);
        dedup_key.push(':');
        dedup_key.push_str(self.name);
        if let Some(p) = part {
            dedup_key.push(':');
            dedup_key.push_str(p);
        }
        Event {
            event_name: self.name.to_owned(),
            event_id,
            timestamp_ms: self.time_ms.unwrap_or(0),
            source: self.source.into(),
            transaction_id: Some(self.transaction_id),
            stitch: Some(Stitch::pending(dedup_key, self.lookup)),
            ..Event::default()
        }
    }
}

/// Pushes `value` as a lookup key when present.
pub fn key(
    list: &mut Vec<OrderKey>,
    field: &str,
    kind: crate::event::KeyKind,
    value: Option<String>,
) {
    if let Some(v) = value.filter(|v| !v.trim().is_empty()) {
        list.push(OrderKey::new(field, kind, v));
    }
}

/// Sets an ecommerce parameter (`tax`, `shipping`, `coupon`) the GA4 purchase event takes.
pub fn param_num(e: &mut Event, name: &str, v: Option<f64>) {
    if let Some(n) = v.and_then(serde_json::Number::from_f64) {
        e.params.insert(name.to_owned(), Value::Number(n));
    }
}

pub fn param_text(e: &mut Event, name: &str, v: Option<String>) {
    if let Some(s) = v.filter(|s| !s.is_empty()) {
        e.params.insert(name.to_owned(), Value::String(s));
    }
}

/// An item with the fields orders carry.
pub struct ItemFields {
    pub id: Option<String>,
    pub name: Option<String>,
    pub variant: Option<String>,
    pub brand: Option<String>,
    pub price: Option<f64>,
    pub quantity: Option<f64>,
    pub discount: Option<f64>,
}

impl ItemFields {
    /// The GA4 item, or `None` without an id or a name (GA4 needs one of them).
    pub fn build(self) -> Option<Item> {
        if self.id.is_none() && self.name.is_none() {
            return None;
        }
        let cs = |s: Option<String>| s.filter(|s| !s.is_empty()).map(Into::into);
        Some(Item {
            item_id: cs(self.id),
            item_name: cs(self.name),
            item_variant: cs(self.variant),
            item_brand: cs(self.brand),
            price: self.price,
            quantity: self.quantity,
            discount: self.discount.filter(|d| *d > 0.0),
            ..Item::default()
        })
    }
}

/// Items up to GA4's limit.
pub fn cap_items(items: &mut Vec<Item>) {
    items.truncate(crate::ga4_limits::MAX_ITEMS);
}

/// The email of an address-like object, trimmed.
pub fn opt_str(o: Option<&Value>, key: &str) -> Option<String> {
    text(o.and_then(|o| o.get(key)))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Signing helpers for the clients' tests (the platforms' side of the signature).
    use super::*;

    pub fn base64_hmac(secret: &str, body: &[u8]) -> String {
        STANDARD.encode(
            mac(&Secret::new(secret), body)
                .unwrap()
                .finalize()
                .into_bytes(),
        )
    }

    pub fn hex_hmac(secret: &str, message: &[u8]) -> String {
        hex::encode(
            mac(&Secret::new(secret), message)
                .unwrap()
                .finalize()
                .into_bytes(),
        )
    }

    /// Calls `client` with a request of `method`, `headers` and `body` received at `now_ms`.
    pub fn call(
        client: &dyn crate::clients::Client,
        method: http::Method,
        headers: &[(&str, String)],
        body: &[u8],
        now_ms: i64,
    ) -> Result<Parsed, ClientError> {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let req = crate::clients::HitRequest {
            method: &method,
            path: "/webhook",
            query: "",
            headers: &map,
            host: "t.example.com",
            body,
            client_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 9)),
            now_ms,
        };
        client.parse(&req)
    }

    /// The reason of a `200 {"ignored": …}` answer.
    pub fn ignored_reason(p: &Parsed) -> String {
        assert!(p.events.is_empty(), "{:?}", p.events);
        match &p.response {
            ClientResponse::Body { status, body, .. } => {
                assert_eq!(*status, StatusCode::OK);
                let v: Value = serde_json::from_slice(body).unwrap();
                v["ignored"].as_str().unwrap().to_owned()
            }
            other => panic!("not an ignored answer: {other:?}"),
        }
    }

    pub fn unauthorized(r: Result<Parsed, ClientError>) -> String {
        match r {
            Err(ClientError::Unauthorized(m)) => m,
            other => panic!("expected a 401, got {other:?}"),
        }
    }

    /// The lookup keys of an order event as `(field, kind, value)`.
    pub fn lookup(e: &crate::event::Event) -> Vec<(String, crate::event::KeyKind, String)> {
        e.stitch
            .as_ref()
            .unwrap()
            .lookup
            .iter()
            .map(|k| (k.field.to_string(), k.kind, k.value.clone()))
            .collect()
    }
}
