//! `mode = "collect"`: rebuilds GA4 `/g/collect` hits from events, the way gtag.js sends them.
//!
//! Events that share a page load, browser and visitor go into one POST: parameters equal across
//! all of them ride in the URL, each event's own parameters form one `k=v&…` body line (GA
//! merges each line over the URL). A lone event goes entirely into the URL with an empty body,
//! as gtag sends it, unless that URL would be too long for intermediaries.

use std::borrow::Cow;

use bytes::Bytes;
use http::Method;
use serde_json::Value;

use super::{count_dropped, encode_component, redacted_ip, Ga4Tag, MAX_EVENTS_PER_REQUEST};
use crate::event::{format_number, Event, Item};
use crate::ga4_limits::{MAX_ITEMS, MAX_ITEM_CUSTOM_PARAMS};
use crate::tags::{Encoded, OutboundRequest};
use compact_str::CompactString;

type Pair<'a> = (Cow<'a, str>, Cow<'a, str>);

/// Beyond this a single event's parameters move into the body: 8 KiB is a common URL cap in
/// proxies and load balancers.
const MAX_QUERY_BYTES: usize = 8_000;

/// The client id sent as `cid`: the server-managed id, else what the browser sent.
pub(super) fn client_id(e: &Event) -> Option<&str> {
    [
        e.client_id.as_deref(),
        e.ga.js_client_id.as_deref(),
        e.identity.ga_client_id.as_deref(),
    ]
    .into_iter()
    .flatten()
    .find(|s| !s.is_empty())
}

/// Everything that must be equal for events to share one request: the URL carries the
/// measurement id and client id, the `User-Agent` header and `_uip` are per request, and gtag
/// never mixes page loads in one hit.
type GroupKey<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
);

pub(super) fn encode(tag: &Ga4Tag, events: &[&Event]) -> Encoded {
    let mut out = Encoded::default();
    let mut groups: Vec<(GroupKey<'_>, Vec<usize>)> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        if e.event_name.is_empty() {
            out.rejected
                .push((i, "event has no name (`en`); GA4 drops such hits".into()));
            continue;
        }
        let Some(tid) = tag.measurement_id(e) else {
            out.rejected.push((
                i,
                "no GA4 measurement id: the event has no `ga.measurement_id` (tid) and the tag sets no measurement_id".into(),
            ));
            continue;
        };
        let Some(cid) = client_id(e) else {
            out.rejected
                .push((i, "no client id: GA4 requires `cid` on every hit".into()));
            continue;
        };
        let page = e.ga.page_id.as_deref().or(e.page_location.as_deref());
        let key = (
            tid,
            cid,
            page,
            e.user_agent.as_deref(),
            e.ip_override.as_deref(),
        );
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    let per_request = tag.batch_max.clamp(1, MAX_EVENTS_PER_REQUEST);
    for (_, members) in &groups {
        for chunk in members.chunks(per_request) {
            let req = build_request(tag, events, chunk);
            out.requests.push((req, chunk.to_vec()));
        }
    }
    out
}

fn build_request(tag: &Ga4Tag, events: &[&Event], chunk: &[usize]) -> OutboundRequest {
    let params: Vec<Vec<Pair<'_>>> = chunk
        .iter()
        .filter_map(|&i| events.get(i))
        .map(|e| event_params(tag, e))
        .collect();
    let mut query = String::with_capacity(512);
    let mut body = String::new();
    match params.as_slice() {
        [single] => {
            for (k, v) in single {
                push_pair(&mut query, k, v);
            }
            if query.len() > MAX_QUERY_BYTES {
                query.clear();
                for (k, v) in single {
                    if is_event_level(k) {
                        push_pair(&mut body, k, v);
                    } else {
                        push_pair(&mut query, k, v);
                    }
                }
            }
        }
        [first, rest @ ..] => {
            // A pair can ride in the URL only if every event carries it with the same value:
            // GA would otherwise apply it to events that never had it.
            let shared: Vec<&Pair<'_>> = first
                .iter()
                .filter(|p| !is_event_level(&p.0) && rest.iter().all(|o| o.contains(p)))
                .collect();
            for (k, v) in &shared {
                push_pair(&mut query, k, v);
            }
            for (n, ps) in params.iter().enumerate() {
                if n > 0 {
                    body.push_str("\r\n");
                }
                let mut line = String::with_capacity(256);
                for p in ps.iter().filter(|p| !shared.contains(p)) {
                    push_pair(&mut line, &p.0, &p.1);
                }
                body.push_str(&line);
            }
        }
        [] => {}
    }
    let mut headers = Vec::with_capacity(2);
    headers.push((
        "Content-Type".to_owned(),
        "text/plain;charset=UTF-8".to_owned(),
    ));
    // Google derives device and browser from the User-Agent, so it must be the browser's.
    if let Some(ua) = chunk
        .first()
        .and_then(|&i| events.get(i))
        .and_then(|e| e.user_agent.as_deref())
        .filter(|ua| !ua.is_empty())
    {
        headers.push(("User-Agent".to_owned(), ua.to_owned()));
    }
    OutboundRequest {
        method: Method::POST,
        url: format!("{}/g/collect?{query}", tag.endpoint),
        headers,
        body: Bytes::from(body),
    }
}

/// Parameters that describe one event rather than the page load; gtag always sends them in
/// the event's own body line.
fn is_event_level(k: &str) -> bool {
    matches!(
        k,
        "en" | "_et" | "_c" | "_ss" | "_fv" | "_nsi" | "_dbg" | "_ee" | "cu"
    ) || k.starts_with("ep.")
        || k.starts_with("epn.")
        || k.strip_prefix("pr")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Parameters the hit carried but we never forward: `_uip` is rebuilt from the redaction
/// policy; `richsstsse` asks a server container for a streamed reply nobody reads here.
const NEVER_PASSED_THROUGH: &[&str] = &["_uip", "richsstsse"];

fn push_pair(buf: &mut String, k: &str, v: &str) {
    if !buf.is_empty() {
        buf.push('&');
    }
    buf.push_str(&encode_component(k));
    buf.push('=');
    buf.push_str(&encode_component(v));
}

fn b(s: &str) -> Cow<'_, str> {
    Cow::Borrowed(s)
}

/// A free-form parameter under `prefix` (`ep`/`up`): numbers go as `<prefix>n.<key>` so GA4
/// keeps them numeric, nulls are left out.
fn push_typed<'a>(p: &mut Vec<Pair<'a>>, prefix: &str, k: &str, v: &'a Value) {
    match v {
        Value::Number(n) => p.push((
            Cow::Owned(format!("{prefix}n.{k}")),
            Cow::Owned(json_number(n)),
        )),
        Value::String(s) => p.push((Cow::Owned(format!("{prefix}.{k}")), b(s))),
        Value::Null => {}
        other => p.push((
            Cow::Owned(format!("{prefix}.{k}")),
            Cow::Owned(scalar_text(other)),
        )),
    }
}

fn json_number(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() => format_number(f),
        _ => n.to_string(),
    }
}

/// All parameters of one event, in gtag's order. `user_data` is deliberately absent: PII never
/// goes to Google Analytics.
fn event_params<'a>(tag: &'a Ga4Tag, e: &'a Event) -> Vec<Pair<'a>> {
    let mut p: Vec<Pair<'a>> = Vec::with_capacity(32 + e.params.len() + e.passthrough.len());
    let opt = |p: &mut Vec<Pair<'a>>, k: &'static str, v: Option<&'a str>| {
        if let Some(v) = v {
            p.push((b(k), b(v)));
        }
    };
    p.push((b("v"), b("2")));
    opt(&mut p, "tid", tag.measurement_id(e));
    opt(&mut p, "gtm", e.ga.gtm_version.as_deref());
    opt(&mut p, "_p", e.ga.page_id.as_deref());
    let c = &e.consent;
    opt(&mut p, "gcs", c.gcs.as_deref());
    opt(&mut p, "gcd", c.gcd.as_deref());
    opt(&mut p, "npa", c.npa.as_deref());
    opt(&mut p, "dma", c.dma.as_deref());
    opt(&mut p, "dma_cps", c.dma_cps.as_deref());
    opt(&mut p, "cid", client_id(e));
    opt(&mut p, "ul", e.language.as_deref());
    opt(&mut p, "sr", e.screen_resolution.as_deref());
    let g = &e.ga;
    if let Some(n) = g.request_count {
        p.push((b("_s"), Cow::Owned(n.to_string())));
    }
    opt(&mut p, "sid", g.session_id.as_deref());
    if let Some(n) = g.session_number {
        p.push((b("sct"), Cow::Owned(n.to_string())));
    }
    if let Some(engaged) = g.session_engaged {
        p.push((b("seg"), b(if engaged { "1" } else { "0" })));
    }
    opt(&mut p, "dl", e.page_location.as_deref());
    opt(&mut p, "dr", e.page_referrer.as_deref());
    opt(&mut p, "dt", e.page_title.as_deref());
    opt(&mut p, "uid", e.user_id.as_deref());
    for (k, v) in &e.user_properties {
        push_typed(&mut p, "up", k, v);
    }
    p.push((b("en"), b(&e.event_name)));
    if g.key_event {
        p.push((b("_c"), b("1")));
    }
    for (k, v) in [
        ("_fv", g.first_visit),
        ("_nsi", g.new_session_id),
        ("_ss", g.session_start),
    ] {
        if let Some(n) = v {
            p.push((b(k), Cow::Owned(n.to_string())));
        }
    }
    if g.debug_mode {
        p.push((b("_dbg"), b("1")));
    }
    opt(&mut p, "cu", e.currency.as_deref());
    opt(&mut p, "ep.transaction_id", e.transaction_id.as_deref());
    if let Some(v) = e.value {
        p.push((b("epn.value"), Cow::Owned(format_number(v))));
    }
    for (k, v) in &e.params {
        // Typed fields win over a duplicate in the free map.
        let typed = match k.as_str() {
            "value" => e.value.is_some(),
            "transaction_id" => e.transaction_id.is_some(),
            "currency" => e.currency.is_some(),
            _ => false,
        };
        if typed {
            continue;
        }
        push_typed(&mut p, "ep", k, v);
    }
    if e.items.len() > MAX_ITEMS {
        count_dropped("too_many_items");
    }
    let mut n = 0usize;
    for item in e.items.iter().take(MAX_ITEMS) {
        let encoded = encode_item(item);
        if encoded.is_empty() {
            continue;
        }
        n += 1;
        p.push((Cow::Owned(format!("pr{n}")), Cow::Owned(encoded)));
    }
    if let Some(et) = g.engagement_time_msec {
        p.push((b("_et"), Cow::Owned(et.to_string())));
    }
    let typed_len = p.len();
    for (k, v) in &e.passthrough {
        let ours = p[..typed_len].iter().any(|(tk, _)| tk == k);
        if !ours && !NEVER_PASSED_THROUGH.contains(&k.as_str()) {
            p.push((b(k), b(v)));
        }
    }
    if let Some(ip) = redacted_ip(tag.redact_ip, e.ip_override.as_deref()) {
        p.push((b("_uip"), ip));
    }
    p
}

/// Booleans as gtag writes them (`true`); arrays and objects as JSON text, since GA has no
/// structured parameter type.
fn scalar_text(v: &Value) -> String {
    match v {
        Value::Bool(b) => b.to_string(),
        other => other.to_string(),
    }
}

/// One item as a `prN` value: `~`-separated two-letter keys glued to their values, custom
/// parameters as `k<i>name~v<i>value` with ga4mp's indices `0`–`9`, `A`, `B`, … .
pub(super) fn encode_item(item: &Item) -> String {
    let mut s = String::with_capacity(96);
    let tok = |s: &mut String, key: &str, v: &str| {
        if !s.is_empty() {
            s.push('~');
        }
        s.push_str(key);
        push_item_value(s, v);
    };
    let strs: [(&str, &Option<CompactString>); 9] = [
        ("id", &item.item_id),
        ("nm", &item.item_name),
        ("br", &item.item_brand),
        ("ca", &item.item_category),
        ("c2", &item.item_category2),
        ("c3", &item.item_category3),
        ("c4", &item.item_category4),
        ("c5", &item.item_category5),
        ("va", &item.item_variant),
    ];
    for (k, v) in strs {
        if let Some(v) = v {
            tok(&mut s, k, v);
        }
    }
    for (k, v) in [("pr", item.price), ("qt", item.quantity)] {
        if let Some(v) = v {
            tok(&mut s, k, &format_number(v));
        }
    }
    if let Some(v) = &item.coupon {
        tok(&mut s, "cp", v);
    }
    if let Some(d) = item.discount {
        tok(&mut s, "ds", &format_number(d));
    }
    let more: [(&str, &Option<CompactString>); 3] = [
        ("af", &item.affiliation),
        ("li", &item.item_list_id),
        ("ln", &item.item_list_name),
    ];
    for (k, v) in more {
        if let Some(v) = v {
            tok(&mut s, k, v);
        }
    }
    if let Some(i) = item.index {
        tok(&mut s, "lp", &i.to_string());
    }
    let promo: [(&str, &Option<CompactString>); 5] = [
        ("lo", &item.location_id),
        ("cn", &item.creative_name),
        ("cs", &item.creative_slot),
        ("pi", &item.promotion_id),
        ("pn", &item.promotion_name),
    ];
    for (k, v) in promo {
        if let Some(v) = v {
            tok(&mut s, k, v);
        }
    }
    let custom = item.custom.iter().filter(|(k, _)| !k.is_empty());
    for (i, (k, v)) in custom.take(MAX_ITEM_CUSTOM_PARAMS).enumerate() {
        let Some(idx) = custom_index(i) else { break };
        let mut key = String::with_capacity(2);
        key.push('k');
        key.push(idx);
        tok(&mut s, &key, k);
        key.clear();
        key.push('v');
        key.push(idx);
        tok(&mut s, &key, v);
    }
    if item.custom.len() > MAX_ITEM_CUSTOM_PARAMS {
        count_dropped("too_many_item_params");
    }
    s
}

/// `0`–`9`, then `A`–`Z` (upper case so `vA…` never reads as the `va` variant key).
fn custom_index(i: usize) -> Option<char> {
    match i {
        0..=9 => char::from_digit(i as u32, 10),
        10..=35 => char::from_u32(u32::from(b'A') + (i as u32 - 10)),
        _ => None,
    }
}

/// `~` separates item tokens and the format has no escape, so it cannot appear inside a value;
/// it becomes `-` rather than corrupting the item.
fn push_item_value(s: &mut String, v: &str) {
    if v.contains('~') {
        s.push_str(&v.replace('~', "-"));
    } else {
        s.push_str(v);
    }
}
