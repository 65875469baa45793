//! GA4 event → TikTok Events API 2.0 event (ad-platforms §2.2, §2.5).

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;

use crate::event::{Event, Item};
use crate::tags::match_keys::{as_prehashed, normalize_and_hash, Hashed, Hex64, Key, Policy};
use crate::tags::values::{currency, finite, is_http_url, non_empty, Currency, Num};

/// The default GA4 → TikTok standard event mapping: TikTok's own server template where it maps
/// an event, Stape's for the ones the template passes through (§2.5).
pub fn default_tiktok_name(ga4: &str) -> Option<&'static str> {
    Some(match ga4 {
        "page_view" => "Pageview",
        "view_item" => "ViewContent",
        "add_to_cart" => "AddToCart",
        "add_to_wishlist" => "AddToWishlist",
        "begin_checkout" => "InitiateCheckout",
        "add_payment_info" => "AddPaymentInfo",
        "purchase" => "CompletePayment",
        "search" => "Search",
        "sign_up" => "CompleteRegistration",
        "generate_lead" => "SubmitForm",
        "contact" => "Contact",
        "subscribe" => "Subscribe",
        "file_download" => "Download",
        "click" => "ClickButton",
        _ => return None,
    })
}

pub use crate::tags::batch::NotSent;

#[derive(Debug, Clone)]
pub struct Mapper {
    pub overrides: HashMap<String, String>,
    pub forward_unmapped: bool,
}

impl Mapper {
    /// TikTok's name for a GA4 event: override, default table, then the GA4 name itself as a
    /// custom event (unless `forward_unmapped` is off).
    pub fn tiktok_name<'a>(&'a self, ga4: &'a str) -> Result<&'a str, NotSent> {
        crate::tags::batch::vendor_event_name(
            "TikTok",
            &self.overrides,
            default_tiktok_name(ga4),
            self.forward_unmapped,
            ga4,
        )
    }

    pub fn build<'a>(
        &'a self,
        e: &'a Event,
        max_year: i32,
        scratch: &mut String,
    ) -> Result<TikTokEvent<'a>, NotSent> {
        if e.event_name.trim().is_empty() {
            return Err(NotSent::Rejected("event has no name".into()));
        }
        let event = self.tiktok_name(&e.event_name)?;
        Ok(TikTokEvent {
            event,
            event_time: e.timestamp_ms.div_euclid(1000),
            event_id: e.event_id.trim(),
            user: user(e, max_year, scratch),
            page: Page {
                url: e
                    .page_location
                    .as_deref()
                    .map(str::trim)
                    .filter(|u| is_http_url(u)),
                referrer: e
                    .page_referrer
                    .as_deref()
                    .map(str::trim)
                    .filter(|u| is_http_url(u)),
            },
            properties: properties(e),
        })
    }
}

fn dropped(field: &'static str) {
    metrics::counter!("tagrelay_tiktok_user_data_dropped_total", "field" => field).increment(1);
}

/// The plain value normalised by TikTok's policy, else a supplied SHA-256 (`sha256_*`).
fn hashed(
    key: Key,
    plain: Option<&str>,
    prehashed: Option<&str>,
    max_year: i32,
    scratch: &mut String,
) -> Option<Hex64> {
    if let Some(p) = plain {
        match normalize_and_hash(Policy::TikTok, key, p, max_year, scratch) {
            Hashed::Value(h) => return Some(h),
            Hashed::Invalid => dropped(key.name()),
            Hashed::Absent => {}
        }
    }
    let supplied = prehashed.filter(|s| !s.trim().is_empty())?;
    let h = as_prehashed(supplied);
    if h.is_none() {
        dropped(key.name());
    }
    h
}

fn user<'a>(e: &'a Event, max_year: i32, scratch: &mut String) -> User<'a> {
    let u = &e.user_data;
    let id = &e.identity;
    let ip = e.ip_override.as_deref().and_then(|raw| {
        let first = raw.split(',').next().unwrap_or(raw).trim();
        match first.parse::<std::net::IpAddr>() {
            // `::`/`0.0.0.0` is how IP redaction is written; it identifies no one.
            Ok(ip) if ip.is_unspecified() => None,
            Ok(_) => Some(first),
            Err(_) => None,
        }
    });
    User {
        email: hashed(
            Key::Em,
            u.email_address.as_deref(),
            u.sha256_email_address.as_deref(),
            max_year,
            scratch,
        ),
        phone: hashed(
            Key::Ph,
            u.phone_number.as_deref(),
            u.sha256_phone_number.as_deref(),
            max_year,
            scratch,
        ),
        external_id: hashed(
            Key::ExternalId,
            e.user_id.as_deref(),
            None,
            max_year,
            scratch,
        ),
        // From the click-id keeper, else (clients that set no cookies) the page URL.
        ttclid: match non_empty(&id.ttclid) {
            Some(t) => Some(Cow::Borrowed(t)),
            None => e
                .page_location
                .as_deref()
                .and_then(|u| crate::identity::click_id_in_url(u, "ttclid"))
                .map(Cow::Owned),
        },
        ttp: non_empty(&id.ttp),
        ip,
        user_agent: non_empty(&e.user_agent),
    }
}

fn properties(e: &Event) -> Properties<'_> {
    let mut p = Properties {
        value: finite(e.value),
        currency: currency(e.currency.as_deref()),
        order_id: non_empty(&e.transaction_id),
        query: match e.params.get("search_term") {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim()),
            _ => None,
        },
        ..Default::default()
    };
    let mut priced_sum = 0.0;
    let mut any_price = false;
    for it in &e.items {
        let price = finite(it.price);
        if let Some(pr) = price {
            any_price = true;
            priced_sum += pr * finite(it.quantity).unwrap_or(1.0);
        }
        if let Some(id) = non_empty(&it.item_id) {
            p.contents.push(content(it, id, price));
        }
    }
    if p.value.is_none() && any_price {
        // Rounded so 3 × 59.99 is sent as 179.97, not 179.97000000000003.
        p.value = Some((priced_sum * 1e6).round() / 1e6);
    }
    if !p.contents.is_empty() {
        p.content_type = Some("product");
    }
    p
}

fn content<'a>(it: &'a Item, id: &'a str, price: Option<f64>) -> Content<'a> {
    Content {
        content_id: id,
        content_type: "product",
        content_name: non_empty(&it.item_name),
        content_category: non_empty(&it.item_category),
        brand: non_empty(&it.item_brand),
        price,
        quantity: finite(it.quantity).map(Num),
    }
}

/// One element of `data[]`. Empty fields are omitted, never `null`.
#[derive(Debug, Serialize)]
pub struct TikTokEvent<'a> {
    pub event: &'a str,
    pub event_time: i64,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub event_id: &'a str,
    pub user: User<'a>,
    #[serde(skip_serializing_if = "Page::is_empty")]
    pub page: Page<'a>,
    #[serde(skip_serializing_if = "Properties::is_empty")]
    pub properties: Properties<'a>,
}

#[derive(Debug, Default, Serialize)]
pub struct User<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<Hex64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<Hex64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<Hex64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttclid: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttp: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<&'a str>,
}

#[derive(Debug, Default, Serialize)]
pub struct Page<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub referrer: Option<&'a str>,
}

impl Page<'_> {
    fn is_empty(&self) -> bool {
        self.url.is_none() && self.referrer.is_none()
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Properties<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<Currency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<&'a str>,
}

impl Properties<'_> {
    fn is_empty(&self) -> bool {
        self.contents.is_empty()
            && self.content_type.is_none()
            && self.currency.is_none()
            && self.value.is_none()
            && self.order_id.is_none()
            && self.query.is_none()
    }
}

#[derive(Debug, Serialize)]
pub struct Content<'a> {
    pub content_id: &'a str,
    pub content_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_category: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brand: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<Num>,
}
