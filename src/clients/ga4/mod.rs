//! GA4 web client: claims `{path_prefix}/g/collect` hits from gtag.js and compatible libraries.
//!
//! A hit is a query string of shared parameters plus, for batched POSTs, one body line per
//! event (`k=v&…`, same syntax) merged over the shared ones. Each merged parameter list maps
//! onto one [`Event`]; parameters without a typed home are kept verbatim in
//! `Event::passthrough` so the GA4 tag can forward them unchanged (wire-formats §1).

mod consent;
mod decode;
mod items;

impl crate::clients::ClientSpec for Ga4ClientConfig {
    fn build(&self) -> Result<crate::clients::BuiltClient, Vec<String>> {
        Ga4Client::from_config(self).map(|c| crate::clients::BuiltClient::Events(Box::new(c)))
    }
}

#[cfg(test)]
mod tests;

use std::net::IpAddr;

use http::Method;
use serde::Deserialize;
use serde_json::{Number, Value};

use crate::clients::{Client, ClientError, ClientResponse, HitRequest, Parsed};
use crate::event::Event;

pub use consent::{decode_consent, decode_gcd, decode_gcs};
pub use decode::{decode_component, parse_query_pairs, QueryPair};
pub use items::{parse_item, MAX_CUSTOM_ITEM_PARAMS};

/// gtag and ga4mp never send more; GA4 drops the rest.
pub const MAX_ITEMS_PER_EVENT: usize = crate::ga4_limits::MAX_ITEMS;
/// Far above what gtag batches; bounds the work one request can cause.
/// gtag batches a handful of events per request; 100 leaves room without letting one request
/// fan out into thousands of outbox records.
pub const MAX_EVENTS_PER_REQUEST: usize = 100;
/// Every body line is merged over the shared query parameters, so a long query times many
/// lines multiplies memory and outbox bytes; cap the merged size of one request.
pub const MAX_EXPANDED_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Ga4ClientConfig {}

#[derive(Debug)]
pub struct Ga4Client {}

impl Ga4Client {
    pub fn from_config(_cfg: &Ga4ClientConfig) -> Result<Self, Vec<String>> {
        Ok(Ga4Client {})
    }
}

impl Client for Ga4Client {
    fn kind(&self) -> &'static str {
        "ga4"
    }

    fn claims(&self, method: &Method, path: &str) -> bool {
        path == "/g/collect" && (method == Method::GET || method == Method::POST)
    }

    fn parse(&self, req: &HitRequest<'_>) -> Result<Parsed, ClientError> {
        let events = parse_hit(req)?;
        Ok(Parsed {
            events,
            response: ClientResponse::NoContent,
            set_cookies: true,
        })
    }
}

/// Parses a `/g/collect` request into its events, in hit order.
pub fn parse_hit(req: &HitRequest<'_>) -> Result<Vec<Event>, ClientError> {
    let is_post = match *req.method {
        Method::GET => false,
        Method::POST => true,
        _ => return Err(ClientError::MethodNotAllowed),
    };
    let shared = parse_query_pairs(req.query)
        .map_err(|e| ClientError::BadRequest(format!("query string: {e}")))?;
    let ctx = HitContext {
        user_agent: req.header("user-agent"),
        // Formatted once per hit, not once per event.
        client_ip: req.client_ip.to_string(),
        now_ms: req.now_ms,
    };

    let mut events = Vec::new();
    let mut expanded = 0usize;
    // A GET has no meaningful body; sendBeacon-style POSTs often have an empty one.
    if is_post && !req.body.is_empty() {
        let body = std::str::from_utf8(req.body)
            .map_err(|_| ClientError::BadRequest("request body is not valid UTF-8".into()))?;
        for (line_no, line) in body.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim_ascii().is_empty() {
                continue;
            }
            if events.len() == MAX_EVENTS_PER_REQUEST {
                return Err(ClientError::BadRequest(format!(
                    "request body has more than {MAX_EVENTS_PER_REQUEST} events (one per line)"
                )));
            }
            expanded += req.query.len() + line.len();
            if expanded > MAX_EXPANDED_BYTES {
                return Err(ClientError::BadRequest(format!(
                    "hit too large: the query string merged over every body line exceeds {MAX_EXPANDED_BYTES} bytes"
                )));
            }
            let bad =
                |e: String| ClientError::BadRequest(format!("body line {}: {e}", line_no + 1));
            let own = parse_query_pairs(line).map_err(bad)?;
            events.push(build_event(&shared, &own, &ctx).map_err(bad)?);
        }
    }
    if events.is_empty() {
        events.push(build_event(&shared, &[], &ctx).map_err(ClientError::BadRequest)?);
    }
    Ok(events)
}

struct HitContext<'r> {
    user_agent: Option<&'r str>,
    client_ip: String,
    now_ms: i64,
}

/// Builds one event from the shared (URL) pairs overridden by the event's own (body line)
/// pairs. Applying the shared pairs whose key the line does not repeat, then the line's
/// pairs, gives "line wins" for every field and keeps passthrough free of overridden pairs.
fn build_event(
    shared: &[QueryPair<'_>],
    own: &[QueryPair<'_>],
    ctx: &HitContext<'_>,
) -> Result<Event, String> {
    let overridden = KeySet::new(own);
    let mut b = EventBuilder::new(shared.len() + own.len());
    for (k, v) in shared {
        if !overridden.contains(k) {
            b.apply(k, v);
        }
    }
    for (k, v) in own {
        b.apply(k, v);
    }
    b.finish(ctx)
}

/// Membership test over a line's keys: a linear scan for typical short lines, binary search
/// for long ones so a hostile body cannot make merging quadratic.
enum KeySet<'p> {
    Few(&'p [QueryPair<'p>]),
    Many(Vec<&'p str>),
}

impl<'p> KeySet<'p> {
    const LINEAR_MAX: usize = 16;

    fn new(pairs: &'p [QueryPair<'p>]) -> Self {
        if pairs.len() <= Self::LINEAR_MAX {
            KeySet::Few(pairs)
        } else {
            let mut keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_ref()).collect();
            keys.sort_unstable();
            keys.dedup();
            KeySet::Many(keys)
        }
    }

    fn contains(&self, key: &str) -> bool {
        match self {
            KeySet::Few(pairs) => pairs.iter().any(|(k, _)| k == key),
            KeySet::Many(keys) => keys.binary_search(&key).is_ok(),
        }
    }
}

struct EventBuilder<'a> {
    event: Event,
    /// `prN` values by index; parsed only once the winners are known.
    items: Vec<(u32, &'a str)>,
    uip: Option<&'a str>,
}

/// Empty strings carry no information on the GA4 wire; a typed field set to `""` would make
/// downstream code treat an absent value (e.g. `cid=`) as present.
fn text<T: for<'a> From<&'a str>>(v: &str) -> Option<T> {
    (!v.is_empty()).then(|| T::from(v))
}

/// `0`/`1` flags; `true`/`false` too, since `ep.debug_mode` carries a JS boolean.
fn flag(v: &str) -> Option<bool> {
    match v {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// An `epn.`/`upn.` value as a JSON number, keeping integers exact (ids and ms timestamps
/// exceed f64's exact range only past 2^53, but i64 costs nothing and avoids `59.0`).
fn json_number(v: &str) -> Option<Number> {
    if let Ok(i) = v.parse::<i64>() {
        return Some(Number::from(i));
    }
    items::parse_finite(v).and_then(Number::from_f64)
}

/// `prN` with N a decimal index ≥ 1 without leading zeros (`pr` alone, `pr0`, `pr01` are not
/// items and stay in passthrough).
fn item_index(key: &str) -> Option<u32> {
    let digits = key.strip_prefix("pr")?;
    if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl<'a> EventBuilder<'a> {
    fn new(pairs_hint: usize) -> Self {
        EventBuilder {
            event: Event {
                // Roughly half of a gtag hit's parameters have no typed field.
                passthrough: Vec::with_capacity(pairs_hint / 2),
                ..Event::default()
            },
            items: Vec::new(),
            uip: None,
        }
    }

    fn apply(&mut self, key: &'a str, value: &'a str) {
        if !self.apply_typed(key, value) {
            self.event
                .passthrough
                .push((key.to_owned(), value.to_owned()));
        }
    }

    /// Sets the typed field for `key`; `false` when there is none or the value does not fit
    /// it (e.g. `sct=abc`), so the raw pair is kept rather than lost.
    fn apply_typed(&mut self, key: &'a str, v: &'a str) -> bool {
        let e = &mut self.event;
        let g = &mut e.ga;
        // Number-typed fields: empty means absent; unparseable means "keep raw".
        macro_rules! number {
            ($field:expr) => {{
                if v.is_empty() {
                    $field = None;
                    true
                } else {
                    $field = v.parse().ok();
                    $field.is_some()
                }
            }};
        }
        match key {
            "en" => e.event_name = v.to_owned(),
            "cid" => {
                e.client_id = text(v);
                // The identity step may replace client_id with a server-managed id.
                g.js_client_id = text(v);
            }
            "uid" => e.user_id = text(v),
            "dl" => e.page_location = text(v),
            "dr" => e.page_referrer = text(v),
            "dt" => e.page_title = text(v),
            "ul" => e.language = text(v),
            "sr" => e.screen_resolution = text(v),
            "cu" => e.currency = text(v),
            "tid" => g.measurement_id = text(v),
            "v" => g.protocol_version = text(v),
            "gtm" => g.gtm_version = text(v),
            "_p" => g.page_id = text(v),
            "sid" => g.session_id = text(v),
            "_s" => return number!(g.request_count),
            "sct" => return number!(g.session_number),
            "_et" => return number!(g.engagement_time_msec),
            "_ss" => return number!(g.session_start),
            "_fv" => return number!(g.first_visit),
            "_nsi" => return number!(g.new_session_id),
            "seg" => {
                g.session_engaged = flag(v);
                return v.is_empty() || g.session_engaged.is_some();
            }
            "_c" => match v.parse::<u8>() {
                Ok(n) => g.key_event = n != 0,
                Err(_) if v.is_empty() => g.key_event = false,
                Err(_) => return false,
            },
            "_dbg" => return self.set_debug_mode(v),
            "gcs" => e.consent.gcs = text(v),
            "gcd" => e.consent.gcd = text(v),
            "npa" | "_npa" => e.consent.npa = text(v),
            "dma" => e.consent.dma = text(v),
            "dma_cps" => e.consent.dma_cps = text(v),
            "_uip" => {
                // Only a well-formed address may steer geolocation. A malformed one is
                // dropped, not passed through: `ip_override` is always set and the GA4 tag
                // sends it as `_uip`, so a raw copy would put two `_uip` on the wire.
                if v.parse::<IpAddr>().is_ok() {
                    self.uip = Some(v);
                }
            }
            _ => return self.apply_prefixed(key, v),
        }
        true
    }

    fn apply_prefixed(&mut self, key: &'a str, v: &'a str) -> bool {
        if let Some(name) = key.strip_prefix("ep.").filter(|n| !n.is_empty()) {
            return self.apply_event_param(name, v, false);
        }
        if let Some(name) = key.strip_prefix("epn.").filter(|n| !n.is_empty()) {
            return self.apply_event_param(name, v, true);
        }
        if let Some(name) = key.strip_prefix("up.").filter(|n| !n.is_empty()) {
            self.event
                .user_properties
                .insert(name.to_owned(), Value::String(v.to_owned()));
            return true;
        }
        if let Some(name) = key.strip_prefix("upn.").filter(|n| !n.is_empty()) {
            let Some(n) = json_number(v) else {
                return false;
            };
            self.event
                .user_properties
                .insert(name.to_owned(), Value::Number(n));
            return true;
        }
        if let Some(index) = item_index(key) {
            if !v.is_empty() {
                self.items.push((index, v));
            }
            return true;
        }
        false
    }

    /// `ep.<name>` (string) / `epn.<name>` (number). A few names have typed homes; ga4mp
    /// picks `epn.` whenever the JS value is a number, so those accept either prefix.
    fn apply_event_param(&mut self, name: &'a str, v: &'a str, numeric: bool) -> bool {
        let e = &mut self.event;
        match name {
            "value" => {
                e.value = items::parse_finite(v);
                e.value.is_some()
            }
            "transaction_id" => {
                e.transaction_id = text(v);
                true
            }
            "event_id" => {
                e.event_id = v.to_owned();
                true
            }
            "debug_mode" => self.set_debug_mode(v),
            _ if numeric => match json_number(v) {
                Some(n) => {
                    e.params.insert(name.to_owned(), Value::Number(n));
                    true
                }
                None => false,
            },
            _ => {
                e.params
                    .insert(name.to_owned(), Value::String(v.to_owned()));
                true
            }
        }
    }

    fn set_debug_mode(&mut self, v: &str) -> bool {
        match flag(v) {
            Some(on) => {
                self.event.ga.debug_mode = on;
                true
            }
            None => false,
        }
    }

    fn finish(mut self, ctx: &HitContext<'_>) -> Result<Event, String> {
        if self.event.event_name.is_empty() {
            return Err(
                "missing event name: no `en` parameter in the query string or body line".into(),
            );
        }
        if !self.items.is_empty() {
            self.event.items = finish_items(&mut self.items);
        }
        consent::decode_consent(&mut self.event.consent);
        let e = &mut self.event;
        e.source = "ga4".into();
        e.timestamp_ms = ctx.now_ms;
        e.user_agent = ctx.user_agent.map(str::to_owned);
        e.ip_override = Some(match self.uip {
            Some(uip) => uip.to_owned(),
            None => ctx.client_ip.clone(),
        });
        Ok(self.event)
    }
}

/// Orders items by `prN` index, lets a later duplicate index win, and keeps the first
/// [`MAX_ITEMS_PER_EVENT`]. Only the kept ones are parsed.
fn finish_items(refs: &mut [(u32, &str)]) -> Vec<crate::event::Item> {
    // Stable sort: among equal indices the later occurrence stays last.
    refs.sort_by_key(|(index, _)| *index);
    let mut out = Vec::with_capacity(refs.len().min(MAX_ITEMS_PER_EVENT));
    let mut iter = refs.iter().peekable();
    while let Some((index, raw)) = iter.next() {
        if iter.peek().is_some_and(|(next, _)| next == index) {
            continue;
        }
        if out.len() == MAX_ITEMS_PER_EVENT {
            break;
        }
        out.push(parse_item(raw));
    }
    out
}
