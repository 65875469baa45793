//! `mode = "measurement_protocol"`: documented `/mp/collect` JSON.
//!
//! MP answers 2xx even to payloads it discards, so nothing here may rely on Google to complain:
//! reserved names are skipped, over-limit names and values are cut or dropped the way GA4's
//! collection limits describe, and every cut is counted in `tagrelay_tag_dropped_total`.

use bytes::Bytes;
use http::Method;
use serde_json::{Map, Number, Value};

use super::collect::client_id;
use super::{
    count_dropped, encode_component, redacted_ip, truncate_chars, Ga4Tag, RedactIp,
    MAX_EVENTS_PER_REQUEST,
};
use crate::event::{ConsentState, Event, Item};
use crate::tags::{Encoded, OutboundRequest};

use crate::ga4_limits::{
    is_reserved_param_name, is_reserved_user_property_name, MAX_ITEMS,
    MAX_ITEM_CUSTOM_PARAMS as MAX_ITEM_CUSTOM, MAX_NAME_LEN as MAX_NAME,
    MAX_PAGE_LOCATION_LEN as MAX_PAGE_LOCATION, MAX_PAGE_REFERRER_LEN as MAX_PAGE_REFERRER,
    MAX_PAGE_TITLE_LEN as MAX_PAGE_TITLE, MAX_PARAMS, MAX_PARAM_VALUE_LEN as MAX_PARAM_VALUE,
    MAX_USER_ID_LEN as MAX_USER_ID, MAX_USER_PROPERTIES as MAX_USER_PROPS,
    MAX_USER_PROPERTY_NAME_LEN as MAX_USER_PROP_NAME,
    MAX_USER_PROPERTY_VALUE_LEN as MAX_USER_PROP_VALUE,
};

/// MP rejects bodies of 130 kB and more.
const MAX_BODY_BYTES: usize = 130_000;

/// Is `name` reserved by GA4 as an event name (and so never sent over MP to a web stream)?
pub fn is_reserved_event_name(name: &str) -> bool {
    crate::ga4_limits::is_reserved_event_name(name, false)
}

/// GA4 names: a letter, then letters, digits or `_`.
fn is_valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Cuts an over-long name, counting it. `None` (counted) when the name can never be valid.
fn checked_name<'a>(name: &'a str, max: usize, what: &'static str) -> Option<&'a str> {
    let cut = truncate_chars(name, max);
    if cut.len() != name.len() {
        count_dropped(match what {
            "user_property" => "user_property_name_truncated",
            _ => "param_name_truncated",
        });
    }
    if is_valid_name(cut) {
        Some(cut)
    } else {
        count_dropped(match what {
            "user_property" => "invalid_user_property_name",
            _ => "invalid_param_name",
        });
        None
    }
}

fn cut_value(s: &str, max: usize) -> Value {
    let cut = truncate_chars(s, max);
    if cut.len() != s.len() {
        count_dropped("param_value_truncated");
    }
    Value::String(cut.to_owned())
}

/// Whole numbers go out as integers (`134`, as the browser sent them), others as floats.
fn num(f: f64) -> Option<Value> {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Some(Value::from(f as i64))
    } else {
        Number::from_f64(f).map(Value::Number)
    }
}

/// Request-level fields shared by every event of one MP request.
type GroupKey<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    ConsentState,
    ConsentState,
);

pub(super) fn encode(tag: &Ga4Tag, events: &[&Event], now_ms: i64) -> Encoded {
    let mut out = Encoded::default();
    let Some(secret) = tag.api_secret.as_ref().map(|s| s.expose()) else {
        // from_config refuses this; kept total rather than panicking.
        out.rejected = (0..events.len())
            .map(|i| (i, "measurement_protocol mode needs api_secret".to_owned()))
            .collect();
        return out;
    };
    let mut groups: Vec<(GroupKey<'_>, Vec<(usize, Value)>)> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let Some(mid) = tag.measurement_id(e) else {
            out.rejected.push((
                i,
                "no GA4 measurement id: the event has no `ga.measurement_id` and the tag sets no measurement_id".into(),
            ));
            continue;
        };
        let Some(cid) = client_id(e) else {
            out.rejected.push((
                i,
                "no client id: Measurement Protocol requires `client_id` for web streams".into(),
            ));
            continue;
        };
        if is_reserved_event_name(&e.event_name) {
            count_dropped("reserved_event_name");
            out.skipped.push((
                i,
                format!(
                    "`{}` is a GA4-reserved event name; Measurement Protocol does not accept it",
                    e.event_name
                ),
            ));
            continue;
        }
        let name = truncate_chars(&e.event_name, MAX_NAME);
        if !is_valid_name(name) {
            count_dropped("invalid_event_name");
            out.rejected.push((
                i,
                format!(
                    "event name `{}` is not valid for GA4 (a letter, then letters, digits or `_`)",
                    e.event_name
                ),
            ));
            continue;
        }
        if name.len() != e.event_name.len() {
            count_dropped("event_name_truncated");
        }
        let ev = event_json(e, name);
        let key = (
            mid,
            cid,
            e.user_id.as_deref().filter(|u| !u.is_empty()),
            e.ip_override.as_deref(),
            e.user_agent.as_deref(),
            e.consent.ad_user_data,
            e.consent.ad_personalization,
        );
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push((i, ev)),
            None => groups.push((key, vec![(i, ev)])),
        }
    }
    let per_request = tag.batch_max.clamp(1, MAX_EVENTS_PER_REQUEST);
    let url_prefix = format!("{}/mp/collect?measurement_id=", tag.endpoint);
    let secret = encode_component(secret);
    for (key, members) in groups {
        let url = format!(
            "{url_prefix}{}&api_secret={secret}",
            encode_component(key.0)
        );
        for chunk in members.chunks(per_request) {
            push_sized(tag, &url, events, now_ms, chunk, &mut out);
        }
    }
    out
}

/// Builds one request for `chunk`, halving it until the body fits under MP's size cap.
fn push_sized(
    tag: &Ga4Tag,
    url: &str,
    events: &[&Event],
    now_ms: i64,
    chunk: &[(usize, Value)],
    out: &mut Encoded,
) {
    let body = request_body(tag, events, now_ms, chunk);
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    if bytes.len() < MAX_BODY_BYTES && !bytes.is_empty() {
        out.requests.push((
            OutboundRequest {
                method: Method::POST,
                url: url.to_owned(),
                headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
                body: Bytes::from(bytes),
            },
            chunk.iter().map(|(i, _)| *i).collect(),
        ));
        return;
    }
    match chunk {
        [(i, _)] => out.rejected.push((
            *i,
            format!(
                "Measurement Protocol body would be {} bytes; GA4 accepts under {MAX_BODY_BYTES}",
                bytes.len()
            ),
        )),
        _ => {
            let (a, b) = chunk.split_at(chunk.len() / 2);
            push_sized(tag, url, events, now_ms, a, out);
            push_sized(tag, url, events, now_ms, b, out);
        }
    }
}

fn timestamp_micros(e: &Event, now_ms: i64) -> Option<i64> {
    // MP only takes past times; a clock ahead of ours is pulled back to now.
    (e.timestamp_ms > 0).then(|| e.timestamp_ms.min(now_ms.max(1)).saturating_mul(1000))
}

fn consent_word(s: ConsentState) -> Option<&'static str> {
    match s {
        ConsentState::Granted => Some("GRANTED"),
        ConsentState::Denied => Some("DENIED"),
        ConsentState::Unknown => None,
    }
}

fn request_body(tag: &Ga4Tag, events: &[&Event], now_ms: i64, chunk: &[(usize, Value)]) -> Value {
    let mut body = Map::new();
    let Some(first) = chunk.first().and_then(|(i, _)| events.get(*i)) else {
        return Value::Object(body);
    };
    if let Some(cid) = client_id(first) {
        body.insert("client_id".into(), Value::String(cid.to_owned()));
    }
    if let Some(uid) = first.user_id.as_deref().filter(|u| !u.is_empty()) {
        body.insert(
            "user_id".into(),
            Value::String(truncate_chars(uid, MAX_USER_ID).to_owned()),
        );
    }
    let request_ts = timestamp_micros(first, now_ms);
    if let Some(ts) = request_ts {
        body.insert("timestamp_micros".into(), Value::from(ts));
    }
    let props = user_properties(chunk.iter().filter_map(|(i, _)| events.get(*i).copied()));
    if !props.is_empty() {
        body.insert("user_properties".into(), Value::Object(props));
    }
    let mut consent = Map::new();
    for (k, s) in [
        ("ad_user_data", first.consent.ad_user_data),
        ("ad_personalization", first.consent.ad_personalization),
    ] {
        if let Some(w) = consent_word(s) {
            consent.insert(k.into(), Value::String(w.into()));
        }
    }
    if !consent.is_empty() {
        body.insert("consent".into(), Value::Object(consent));
    }
    // `ip_override` must be a real address; with full redaction it is left out (GA then uses
    // the client's tagged events for geo) rather than sending `::`.
    if tag.redact_ip != RedactIp::Full {
        if let Some(ip) = redacted_ip(tag.redact_ip, first.ip_override.as_deref()) {
            body.insert("ip_override".into(), Value::String(ip.into_owned()));
        }
    }
    if let Some(ua) = first.user_agent.as_deref().filter(|u| !u.is_empty()) {
        body.insert("user_agent".into(), Value::String(ua.to_owned()));
    }
    // Events batched from different hits keep their own time.
    let list = chunk
        .iter()
        .map(|(i, ev)| {
            let mut ev = ev.clone();
            let ts = events.get(*i).and_then(|e| timestamp_micros(e, now_ms));
            if let (Some(ts), true) = (ts, ts != request_ts) {
                if let Some(Value::Object(p)) = ev.get_mut("params") {
                    p.insert("timestamp_micros".into(), Value::from(ts));
                }
            }
            ev
        })
        .collect();
    body.insert("events".into(), Value::Array(list));
    Value::Object(body)
}

/// User properties of all events in the request, later events winning, within GA's limits.
fn user_properties<'a>(events: impl Iterator<Item = &'a Event>) -> Map<String, Value> {
    let mut out = Map::new();
    for e in events {
        for (k, v) in &e.user_properties {
            if is_reserved_user_property_name(k) {
                count_dropped("reserved_user_property");
                continue;
            }
            let Some(name) = checked_name(k, MAX_USER_PROP_NAME, "user_property") else {
                continue;
            };
            let value = match v {
                Value::String(s) => {
                    let cut = truncate_chars(s, MAX_USER_PROP_VALUE);
                    if cut.len() != s.len() {
                        count_dropped("user_property_value_truncated");
                    }
                    Value::String(cut.to_owned())
                }
                Value::Number(n) => Value::Number(n.clone()),
                Value::Bool(b) => Value::String(b.to_string()),
                Value::Null => continue,
                Value::Array(_) | Value::Object(_) => {
                    count_dropped("invalid_user_property_value");
                    continue;
                }
            };
            if !out.contains_key(name) && out.len() >= MAX_USER_PROPS {
                count_dropped("too_many_user_properties");
                continue;
            }
            let mut wrapped = Map::new();
            wrapped.insert("value".into(), value);
            out.insert(name.to_owned(), Value::Object(wrapped));
        }
    }
    out
}

/// One `events[]` entry. Documented parameters come first so that they survive the 25-param
/// cap; custom parameters fill what is left. `user_data` is never included.
fn event_json(e: &Event, name: &str) -> Value {
    let mut params = Map::new();
    let g = &e.ga;
    if let Some(sid) = g.session_id.as_deref().filter(|s| !s.is_empty()) {
        params.insert("session_id".into(), Value::String(sid.to_owned()));
    }
    // GA counts activity (Realtime, sessions) only when engagement_time_msec is present and
    // positive; events that never measured engagement get the smallest positive value.
    let et = g.engagement_time_msec.unwrap_or(1);
    params.insert("engagement_time_msec".into(), Value::from(et));
    if g.debug_mode {
        params.insert("debug_mode".into(), Value::Bool(true));
    }
    for (k, v, max) in [
        (
            "page_location",
            e.page_location.as_deref(),
            MAX_PAGE_LOCATION,
        ),
        (
            "page_referrer",
            e.page_referrer.as_deref(),
            MAX_PAGE_REFERRER,
        ),
        ("page_title", e.page_title.as_deref(), MAX_PAGE_TITLE),
        ("currency", e.currency.as_deref(), MAX_PARAM_VALUE),
        (
            "transaction_id",
            e.transaction_id.as_deref(),
            MAX_PARAM_VALUE,
        ),
    ] {
        if let Some(v) = v {
            params.insert(k.into(), cut_value(v, max));
        }
    }
    if let Some(v) = e.value.and_then(num) {
        params.insert("value".into(), v);
    }
    for (k, v) in &e.params {
        if params.contains_key(k.as_str()) {
            continue;
        }
        if is_reserved_param_name(k) {
            count_dropped("reserved_param_name");
            continue;
        }
        let Some(name) = checked_name(k, MAX_NAME, "param") else {
            continue;
        };
        let value = match v {
            Value::String(s) => cut_value(s, MAX_PARAM_VALUE),
            Value::Number(_) | Value::Bool(_) => v.clone(),
            Value::Null => continue,
            Value::Array(_) | Value::Object(_) => {
                count_dropped("invalid_param_value");
                continue;
            }
        };
        if params.contains_key(name) {
            // Two names that only differ past the 40th character: the first one wins.
            count_dropped("duplicate_param_name");
            continue;
        }
        // One slot stays free for a per-event `timestamp_micros` added at request time.
        if params.len() >= MAX_PARAMS - 1 {
            count_dropped("too_many_params");
            continue;
        }
        params.insert(name.to_owned(), value);
    }
    if !e.items.is_empty() {
        if e.items.len() > MAX_ITEMS {
            count_dropped("too_many_items");
        }
        let items: Vec<Value> = e.items.iter().take(MAX_ITEMS).map(item_json).collect();
        params.insert("items".into(), Value::Array(items));
    }
    let mut ev = Map::new();
    ev.insert("name".into(), Value::String(name.to_owned()));
    ev.insert("params".into(), Value::Object(params));
    Value::Object(ev)
}

/// An MP item object; custom item parameters become item keys with string values.
pub(super) fn item_json(item: &Item) -> Value {
    let mut o = Map::new();
    for (k, v) in item.text_fields() {
        if let Some(v) = v {
            o.insert(k.into(), cut_value(v, MAX_PARAM_VALUE));
        }
    }
    for (k, v) in [
        ("discount", item.discount),
        ("price", item.price),
        ("quantity", item.quantity),
    ] {
        if let Some(n) = v.and_then(num) {
            o.insert(k.into(), n);
        }
    }
    if let Some(i) = item.index {
        o.insert("index".into(), Value::from(i));
    }
    let mut custom = 0usize;
    for (k, v) in &item.custom {
        let Some(name) = checked_name(k, MAX_NAME, "param") else {
            continue;
        };
        if o.contains_key(name) {
            continue;
        }
        if custom >= MAX_ITEM_CUSTOM {
            count_dropped("too_many_item_params");
            break;
        }
        custom += 1;
        o.insert(name.to_owned(), cut_value(v, MAX_PARAM_VALUE));
    }
    Value::Object(o)
}
