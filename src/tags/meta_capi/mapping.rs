//! GA4 event → Meta server event (wire-formats §3.2, §3.5, §6).

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;

use super::normalize::{as_prehashed, normalize_and_hash, Hashed, Hex64, Key};
use super::ActionSource;
use crate::event::{Event, Item};
use crate::tags::values::{currency, finite, is_http_url, non_empty, Currency, Num};
use crate::urlenc;

/// Meta refuses a request when any event in it is older than 7 days (§3.2).
pub const MAX_AGE_MS: i64 = 7 * 24 * 3_600_000;
/// Safety margin under the 7-day limit: an event encoded just under the limit would age past
/// it while in flight, and one stale event fails the whole batch.
pub const AGE_MARGIN_MS: i64 = 60_000;
/// Clock skew tolerated for events stamped in the future.
pub const MAX_FUTURE_MS: i64 = 60_000;

/// The default GA4 → Meta standard event mapping (§6; `gtm.dom` as Stape maps it).
pub fn default_meta_name(ga4: &str) -> Option<&'static str> {
    Some(match ga4 {
        "page_view" | "gtm.dom" => "PageView",
        "view_item" => "ViewContent",
        "add_to_cart" => "AddToCart",
        "add_to_wishlist" => "AddToWishlist",
        "begin_checkout" => "InitiateCheckout",
        "add_payment_info" => "AddPaymentInfo",
        "purchase" => "Purchase",
        "search" | "view_search_results" => "Search",
        "generate_lead" => "Lead",
        "sign_up" => "CompleteRegistration",
        _ => return None,
    })
}

pub use crate::tags::batch::NotSent;

/// The per-tag mapping settings, prepared once at build time.
#[derive(Debug, Clone)]
pub struct Mapper {
    pub overrides: HashMap<String, String>,
    pub forward_unmapped: bool,
    pub purchase_event_id_from_transaction: bool,
    pub action_source: ActionSource,
    pub action_source_from_event: bool,
}

impl Mapper {
    /// Meta's name for a GA4 event: configured override, then the default table, then the GA4
    /// name itself as a custom event (unless `forward_unmapped` is off).
    pub fn meta_name<'a>(&'a self, ga4: &'a str) -> Result<&'a str, NotSent> {
        crate::tags::batch::vendor_event_name(
            "Meta",
            &self.overrides,
            default_meta_name(ga4),
            self.forward_unmapped,
            ga4,
        )
    }

    /// Builds one server event, or says why it must not be sent.
    pub fn build<'a>(
        &'a self,
        e: &'a Event,
        now_ms: i64,
        max_year: i32,
        scratch: &mut String,
    ) -> Result<ServerEvent<'a>, NotSent> {
        if e.event_name.trim().is_empty() {
            return Err(NotSent::Rejected("event has no name".into()));
        }
        let event_name = self.meta_name(&e.event_name)?;

        // Checked here rather than left to Meta: one out-of-window event fails the whole batch.
        let age = now_ms.saturating_sub(e.timestamp_ms);
        if age > MAX_AGE_MS - AGE_MARGIN_MS {
            return Err(NotSent::Rejected(format!(
                "event_time is {} h old; Meta refuses events older than 7 days",
                age / 3_600_000
            )));
        }
        if -age > MAX_FUTURE_MS {
            return Err(NotSent::Rejected(format!(
                "event_time is {} s in the future; check the sending clock",
                -age / 1000
            )));
        }

        let from_event = if self.action_source_from_event {
            event_action_source(e)?
        } else {
            None
        };
        let action_source = from_event.unwrap_or(self.action_source);
        // Website events require event_source_url and client_user_agent (§3.2); without them Meta
        // fails the request, so they are rejected here with the cause instead. Other sources
        // send them when the event has them.
        let website = action_source == ActionSource::Website;
        let event_source_url = e
            .page_location
            .as_deref()
            .map(str::trim)
            .filter(|u| is_http_url(u));
        if website && event_source_url.is_none() {
            return Err(NotSent::Rejected(
                "page_location is missing or not an http(s) URL; Meta requires event_source_url \
                 for website events (set action_source on the tag for events from elsewhere)"
                    .into(),
            ));
        }
        let client_user_agent = e
            .user_agent
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty());
        if website && client_user_agent.is_none() {
            return Err(NotSent::Rejected(
                "user_agent is missing; Meta requires client_user_agent for website events \
                 (set action_source on the tag for events from elsewhere)"
                    .into(),
            ));
        }

        let custom_data = custom_data(e);
        if event_name == "Purchase" {
            purchase_requirements(e, &custom_data)?;
        }

        let event_id = match e.transaction_id.as_deref().map(str::trim) {
            Some(t)
                if self.purchase_event_id_from_transaction
                    && event_name == "Purchase"
                    && !t.is_empty() =>
            {
                t
            }
            _ => e.event_id.trim(),
        };

        let mut user_data = user_data(e, max_year, scratch);
        user_data.client_user_agent = client_user_agent;
        // A website event always has the browser's User-Agent; an event from elsewhere may have
        // nothing Meta could match a person by, and Meta refuses the whole request for it.
        if user_data.is_empty() {
            return Err(NotSent::Rejected(
                "no customer information to match (email, phone, name, address, user_id, IP, \
                 User-Agent, fbp or fbc); Meta refuses such events"
                    .into(),
            ));
        }

        Ok(ServerEvent {
            event_name,
            event_time: e.timestamp_ms.div_euclid(1000),
            event_id,
            action_source,
            event_source_url,
            referrer_url: e
                .page_referrer
                .as_deref()
                .map(str::trim)
                .filter(|u| is_http_url(u)),
            user_data,
            custom_data,
        })
    }
}

/// The event's own `action_source` parameter, which wins over the tag's when the tag allows it
/// (`action_source_from_event`): one tag can then serve a site and a backend that says where
/// each of its events happened. A value Meta would refuse fails the event here with the cause
/// rather than the whole batch at Meta.
fn event_action_source(e: &Event) -> Result<Option<ActionSource>, NotSent> {
    use serde::de::value::{Error, StrDeserializer};
    use serde::de::IntoDeserializer;
    use serde::Deserialize;
    let raw = match e.params.get(ACTION_SOURCE_PARAM) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => s.trim(),
        // Only the kind is named: the value may be any size.
        Some(other) => {
            let kind = match other {
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::Array(_) => "an array",
                _ => "an object",
            };
            return Err(NotSent::Rejected(format!(
                "event parameter `{ACTION_SOURCE_PARAM}` must be a string, not {kind}"
            )));
        }
    };
    // Cut so a long value is not quoted whole in the reason; no accepted name is that long.
    let de: StrDeserializer<'_, Error> = crate::text::truncate_chars(raw, 64).into_deserializer();
    // serde's message names the value and lists the accepted ones.
    ActionSource::deserialize(de)
        .map(Some)
        .map_err(|err| NotSent::Rejected(format!("event parameter `{ACTION_SOURCE_PARAM}`: {err}")))
}

/// The event parameter that overrides a tag's `action_source`.
const ACTION_SOURCE_PARAM: &str = "action_source";

/// Meta requires `value` and `currency` on Purchase and fails the request without them.
///
/// Decision: reject with the cause rather than default like Stape (value 0, USD): an invented
/// currency or a zero value silently falsifies revenue reporting, while a dead letter with a
/// clear reason gets the tracking fixed.
fn purchase_requirements(e: &Event, cd: &CustomData<'_>) -> Result<(), NotSent> {
    if cd.currency.is_none() {
        let why = match e.currency.as_deref().map(str::trim) {
            Some(c) if !c.is_empty() => format!("currency `{c}` is not an ISO 4217 code"),
            _ => "currency is missing".to_owned(),
        };
        return Err(NotSent::Rejected(format!(
            "Purchase needs value and currency: {why}"
        )));
    }
    if cd.value.is_none() {
        return Err(NotSent::Rejected(
            "Purchase needs value and currency: value is missing and no item has a price".into(),
        ));
    }
    Ok(())
}

fn dropped(field: &'static str) {
    metrics::counter!("tagrelay_meta_user_data_dropped_total", "field" => field).increment(1);
}

fn add(list: &mut Vec<Hex64>, key: Key, input: Option<&str>, max_year: i32, scratch: &mut String) {
    let Some(input) = input else { return };
    match normalize_and_hash(key, input, max_year, scratch) {
        Hashed::Value(h) => {
            if !list.contains(&h) {
                list.push(h);
            }
        }
        Hashed::Invalid => dropped(key.name()),
        Hashed::Absent => {}
    }
}

/// A `sha256_*` field: must already be a SHA-256 digest. Anything else is dropped, not hashed:
/// it would be a hash of some unknown, un-normalised form.
fn add_prehashed(list: &mut Vec<Hex64>, key: Key, input: Option<&str>) {
    let Some(input) = input.filter(|s| !s.trim().is_empty()) else {
        return;
    };
    match as_prehashed(input) {
        Some(h) => {
            if !list.contains(&h) {
                list.push(h);
            }
        }
        None => dropped(key.name()),
    }
}

fn user_data<'a>(e: &'a Event, max_year: i32, scratch: &mut String) -> UserDataOut<'a> {
    let u = &e.user_data;
    let a = &u.address;
    let mut out = UserDataOut::default();
    // The plain value is normalised by Meta's rules first. A GA-style hash is added as a second
    // array entry when it differs: GA strips gmail dots and keeps `+` in phone hashes (§6), so it
    // may not match, but it never hurts matching and it is all we have when no plain value is.
    add(
        &mut out.em,
        Key::Em,
        u.email_address.as_deref(),
        max_year,
        scratch,
    );
    add_prehashed(&mut out.em, Key::Em, u.sha256_email_address.as_deref());
    add(
        &mut out.ph,
        Key::Ph,
        u.phone_number.as_deref(),
        max_year,
        scratch,
    );
    add_prehashed(&mut out.ph, Key::Ph, u.sha256_phone_number.as_deref());
    add(
        &mut out.first_name,
        Key::Fn,
        a.first_name.as_deref(),
        max_year,
        scratch,
    );
    add_prehashed(&mut out.first_name, Key::Fn, a.sha256_first_name.as_deref());
    add(
        &mut out.ln,
        Key::Ln,
        a.last_name.as_deref(),
        max_year,
        scratch,
    );
    add_prehashed(&mut out.ln, Key::Ln, a.sha256_last_name.as_deref());
    add(
        &mut out.db,
        Key::Db,
        u.date_of_birth.as_deref(),
        max_year,
        scratch,
    );
    add(&mut out.ge, Key::Ge, u.gender.as_deref(), max_year, scratch);
    add(&mut out.ct, Key::Ct, a.city.as_deref(), max_year, scratch);
    add(&mut out.st, Key::St, a.region.as_deref(), max_year, scratch);
    add(
        &mut out.zp,
        Key::Zp,
        a.postal_code.as_deref(),
        max_year,
        scratch,
    );
    add(
        &mut out.country,
        Key::Country,
        a.country.as_deref(),
        max_year,
        scratch,
    );
    add(
        &mut out.external_id,
        Key::ExternalId,
        e.user_id.as_deref(),
        max_year,
        scratch,
    );

    // Meta takes the first address when several are listed; a proxy chain that slipped through
    // would otherwise make the whole value invalid.
    if let Some(raw) = e.ip_override.as_deref() {
        let first = raw.split(',').next().unwrap_or(raw).trim();
        match first.parse::<std::net::IpAddr>() {
            // `::`/`0.0.0.0` is how IP redaction is written (§8); it identifies no one.
            Ok(ip) if ip.is_unspecified() => {}
            Ok(_) => out.client_ip_address = Some(first),
            Err(_) if first.is_empty() => {}
            Err(_) => dropped("client_ip_address"),
        }
    }

    if let Some(fbp) = e
        .identity
        .fbp
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        if is_fb_cookie(fbp) {
            out.fbp = Some(fbp);
        } else {
            dropped("fbp");
        }
    }
    if let Some(fbc) = e
        .identity
        .fbc
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        if is_fb_cookie(fbc) {
            out.fbc = Some(Cow::Borrowed(fbc));
        } else {
            dropped("fbc");
        }
    }
    // No click cookie (cookies off or not yet written) but the landing URL carries the click id:
    // build fbc the way Meta's builders do (§4.1), with the event time as creation time. The
    // fbclid is used exactly as in the URL.
    if out.fbc.is_none() {
        if let Some(fbclid) = e
            .page_location
            .as_deref()
            .and_then(|u| urlenc::param(u, "fbclid"))
            .filter(|c| !c.is_empty() && c.len() <= 500 && !c.contains(char::is_whitespace))
        {
            out.fbc = Some(Cow::Owned(format!("fb.1.{}.{fbclid}", e.timestamp_ms)));
        }
    }
    out
}

/// `fb.<subdomainIndex>.<creationTime>.<payload>[.<appendix>]` (§4.1, §4.5).
fn is_fb_cookie(v: &str) -> bool {
    let mut parts = v.split('.');
    let digits =
        |p: Option<&str>| p.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    parts.next() == Some("fb")
        && digits(parts.next())
        && digits(parts.next())
        && parts.next().is_some_and(|p| !p.is_empty())
        && !v.contains(char::is_whitespace)
}

fn custom_data(e: &Event) -> CustomData<'_> {
    let mut cd = CustomData {
        value: finite(e.value),
        currency: currency(e.currency.as_deref()),
        order_id: non_empty(&e.transaction_id),
        search_string: match e.params.get("search_term") {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim()),
            _ => None,
        },
        ..Default::default()
    };
    if e.items.is_empty() {
        return cd;
    }
    let mut qty_sum = 0.0;
    let mut priced_sum = 0.0;
    let mut any_price = false;
    cd.contents.reserve(e.items.len());
    for it in &e.items {
        let qty = finite(it.quantity).unwrap_or(1.0);
        qty_sum += qty;
        let price = finite(it.price);
        if let Some(p) = price {
            any_price = true;
            priced_sum += p * qty;
        }
        if let Some(id) = non_empty(&it.item_id) {
            cd.content_ids.push(id);
            cd.contents.push(content(it, id, price));
        }
    }
    if cd.value.is_none() && any_price {
        // Rounded so 3 × 59.99 is sent as 179.97, not 179.97000000000003.
        cd.value = Some((priced_sum * 1e6).round() / 1e6);
    }
    if !cd.contents.is_empty() {
        cd.content_type = Some("product");
    }
    cd.num_items = Some(Num(qty_sum));
    if let [only] = e.items.as_slice() {
        cd.content_name = non_empty(&only.item_name);
        cd.content_category = non_empty(&only.item_category);
    }
    cd
}

fn content<'a>(it: &'a Item, id: &'a str, price: Option<f64>) -> Content<'a> {
    Content {
        id,
        quantity: finite(it.quantity).map(Num),
        item_price: price,
        title: non_empty(&it.item_name),
        brand: non_empty(&it.item_brand),
        category: non_empty(&it.item_category),
    }
}

/// One element of the request's `data` array. Empty fields are omitted, never `null`.
#[derive(Debug, Serialize)]
pub struct ServerEvent<'a> {
    pub event_name: &'a str,
    pub event_time: i64,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub event_id: &'a str,
    pub action_source: ActionSource,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_source_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub referrer_url: Option<&'a str>,
    pub user_data: UserDataOut<'a>,
    #[serde(skip_serializing_if = "CustomData::is_empty")]
    pub custom_data: CustomData<'a>,
}

/// Hashed keys are arrays, as both SDKs send them (Meta accepts a string or an array); an array
/// also lets a plain-derived and a supplied hash travel together. Never-hashed keys are strings.
#[derive(Debug, Default, Serialize)]
pub struct UserDataOut<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub em: Vec<Hex64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ph: Vec<Hex64>,
    #[serde(rename = "fn", skip_serializing_if = "Vec::is_empty")]
    pub first_name: Vec<Hex64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ln: Vec<Hex64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub db: Vec<Hex64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ge: Vec<Hex64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ct: Vec<Hex64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub st: Vec<Hex64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub zp: Vec<Hex64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub country: Vec<Hex64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub external_id: Vec<Hex64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip_address: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fbc: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fbp: Option<&'a str>,
}

impl UserDataOut<'_> {
    pub fn is_empty(&self) -> bool {
        let hashed = [
            &self.em,
            &self.ph,
            &self.first_name,
            &self.ln,
            &self.db,
            &self.ge,
            &self.ct,
            &self.st,
            &self.zp,
            &self.country,
            &self.external_id,
        ];
        hashed.iter().all(|v| v.is_empty())
            && self.client_ip_address.is_none()
            && self.client_user_agent.is_none()
            && self.fbc.is_none()
            && self.fbp.is_none()
    }
}

#[derive(Debug, Default, Serialize)]
pub struct CustomData<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<Currency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_category: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub content_ids: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_items: Option<Num>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search_string: Option<&'a str>,
}

impl CustomData<'_> {
    pub fn is_empty(&self) -> bool {
        self.value.is_none()
            && self.currency.is_none()
            && self.content_name.is_none()
            && self.content_category.is_none()
            && self.content_ids.is_empty()
            && self.contents.is_empty()
            && self.content_type.is_none()
            && self.num_items.is_none()
            && self.order_id.is_none()
            && self.search_string.is_none()
    }
}

#[derive(Debug, Serialize)]
pub struct Content<'a> {
    pub id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<Num>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_price: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brand: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<&'a str>,
}
