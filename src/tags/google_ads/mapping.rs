//! Event → Data Manager `Event` (ad-platforms §1.5; `google/ads/datamanager/v1/event.proto`,
//! `user_data.proto`, `consent.proto`, `device_info.proto`, proto3 JSON names).

use std::borrow::Cow;

use serde::Serialize;

use crate::event::{ConsentState, Event};
use crate::tags::match_keys::{
    as_prehashed, normalize_and_hash, normalized, Hashed, Hex64, Key, Policy,
};
use crate::tags::values::{currency, finite, non_empty, Currency};

/// Data Manager takes at most 10 user identifiers per event (`user_data.proto`).
const MAX_IDENTIFIERS: usize = 10;

/// Per-tag mapping settings.
#[derive(Debug, Clone, Copy)]
pub struct Mapper {
    pub send_ip_address: bool,
}

impl Mapper {
    /// One Data Manager event, or why the event cannot be sent. Data Manager fails a whole
    /// request for one invalid event (its "fast-fail" model), so what it would refuse is
    /// refused here with the cause.
    pub fn build<'a>(
        &self,
        e: &'a Event,
        max_year: i32,
        scratch: &mut String,
    ) -> Result<DmEvent<'a>, String> {
        if e.timestamp_ms <= 0 {
            return Err("event has no time".into());
        }
        let ad_identifiers = ad_identifiers(e);
        let user_identifiers = user_identifiers(e, max_year, scratch);
        if ad_identifiers.is_none() && user_identifiers.is_empty() {
            return Err(
                "no gclid, gbraid or wbraid (from the click-id keeper) and no user data (email, \
                 phone, name + address); Google refuses such events (NO_IDENTIFIERS_PROVIDED)"
                    .into(),
            );
        }
        let currency = currency(e.currency.as_deref());
        let value = conversion_value(e);
        if value.is_some() && currency.is_none() {
            let why = match non_empty(&e.currency) {
                Some(c) => format!("currency `{c}` is not an ISO 4217 code"),
                None => "currency is missing".into(),
            };
            return Err(format!("a conversion value needs its currency: {why}"));
        }
        let ip = if self.send_ip_address {
            e.ip_override.as_deref().and_then(|raw| {
                let first = raw.split(',').next().unwrap_or(raw).trim();
                match first.parse::<std::net::IpAddr>() {
                    Ok(ip) if !ip.is_unspecified() => Some(first),
                    _ => None,
                }
            })
        } else {
            None
        };
        let device = DeviceInfo {
            user_agent: non_empty(&e.user_agent),
            ip_address: ip,
        };
        Ok(DmEvent {
            transaction_id: non_empty(&e.transaction_id),
            event_timestamp: Rfc3339(e.timestamp_ms),
            user_data: (!user_identifiers.is_empty()).then_some(UserData { user_identifiers }),
            consent: consent(e),
            ad_identifiers,
            currency,
            conversion_value: value,
            event_source: "WEB",
            event_device_info: (device.user_agent.is_some() || device.ip_address.is_some())
                .then_some(device),
        })
    }
}

/// One click id: Google Ads takes one of `gclid`, `gbraid`, `wbraid` per conversion (the Ads
/// API says so; Data Manager's proto has three fields and says nothing): `gclid` first, then
/// `gbraid`, then `wbraid`, as Stape's tag sends them. From the click-id keeper, else (events
/// of clients that set no cookies) from the page URL.
fn ad_identifiers(e: &Event) -> Option<AdIdentifiers<'_>> {
    let id = &e.identity;
    fn from<'a>(e: &'a Event, kept: &'a Option<String>, param: &str) -> Option<Cow<'a, str>> {
        match non_empty(kept) {
            Some(v) => Some(Cow::Borrowed(v)),
            None => e
                .page_location
                .as_deref()
                .and_then(|u| crate::identity::click_id_in_url(u, param))
                .map(Cow::Owned),
        }
    }
    let mut out = AdIdentifiers::default();
    if let Some(g) = from(e, &id.gclid, "gclid") {
        out.gclid = Some(g);
    } else if let Some(g) = from(e, &id.gbraid, "gbraid") {
        out.gbraid = Some(g);
    } else if let Some(w) = from(e, &id.wbraid, "wbraid") {
        out.wbraid = Some(w);
    } else {
        return None;
    }
    Some(out)
}

fn dropped(field: &'static str) {
    metrics::counter!("tagrelay_google_ads_user_data_dropped_total", "field" => field).increment(1);
}

fn push(list: &mut Vec<UserIdentifier>, id: UserIdentifier) {
    if list.len() < MAX_IDENTIFIERS && !list.contains(&id) {
        list.push(id);
    }
}

/// A plain value by Google's policy, then a supplied `sha256_*` one if it differs (GA's own
/// hashes follow Google's rules, so they match).
fn hashes(
    key: Key,
    plain: Option<&str>,
    prehashed: Option<&str>,
    max_year: i32,
    scratch: &mut String,
) -> [Option<Hex64>; 2] {
    let mut out = [None, None];
    if let Some(p) = plain {
        match normalize_and_hash(Policy::Google, key, p, max_year, scratch) {
            Hashed::Value(h) => out[0] = Some(h),
            Hashed::Invalid => dropped(key.name()),
            Hashed::Absent => {}
        }
    }
    if let Some(s) = prehashed.filter(|s| !s.trim().is_empty()) {
        match as_prehashed(s) {
            Some(h) if Some(h) != out[0] => out[1] = Some(h),
            Some(_) => {}
            None => dropped(key.name()),
        }
    }
    out
}

fn user_identifiers(e: &Event, max_year: i32, scratch: &mut String) -> Vec<UserIdentifier> {
    let u = &e.user_data;
    let a = &u.address;
    let mut out = Vec::new();
    for h in hashes(
        Key::Em,
        u.email_address.as_deref(),
        u.sha256_email_address.as_deref(),
        max_year,
        scratch,
    )
    .into_iter()
    .flatten()
    {
        push(&mut out, UserIdentifier::EmailAddress(h));
    }
    for h in hashes(
        Key::Ph,
        u.phone_number.as_deref(),
        u.sha256_phone_number.as_deref(),
        max_year,
        scratch,
    )
    .into_iter()
    .flatten()
    {
        push(&mut out, UserIdentifier::PhoneNumber(h));
    }
    // An address is matched only whole: Google requires all four parts.
    let [given, _] = hashes(
        Key::Fn,
        a.first_name.as_deref(),
        a.sha256_first_name.as_deref(),
        max_year,
        scratch,
    );
    let given = given.or_else(|| a.sha256_first_name.as_deref().and_then(as_prehashed));
    let [family, _] = hashes(
        Key::Ln,
        a.last_name.as_deref(),
        a.sha256_last_name.as_deref(),
        max_year,
        scratch,
    );
    let family = family.or_else(|| a.sha256_last_name.as_deref().and_then(as_prehashed));
    let region = a
        .country
        .as_deref()
        .and_then(|c| normalized(Policy::Google, Key::Country, c, max_year));
    let postal = a
        .postal_code
        .as_deref()
        .and_then(|z| normalized(Policy::Google, Key::Zp, z, max_year));
    if let (Some(given_name), Some(family_name), Some(region_code), Some(postal_code)) =
        (given, family, region, postal)
    {
        push(
            &mut out,
            UserIdentifier::Address(AddressInfo {
                given_name,
                family_name,
                region_code,
                postal_code,
            }),
        );
    }
    out
}

fn consent(e: &Event) -> Option<Consent> {
    let status = |s: ConsentState| match s {
        ConsentState::Granted => Some("CONSENT_GRANTED"),
        ConsentState::Denied => Some("CONSENT_DENIED"),
        ConsentState::Unknown => None,
    };
    let c = Consent {
        ad_user_data: status(e.consent.ad_user_data),
        ad_personalization: status(e.consent.ad_personalization),
    };
    (c.ad_user_data.is_some() || c.ad_personalization.is_some()).then_some(c)
}

/// The event's `value`, else the items' price × quantity.
fn conversion_value(e: &Event) -> Option<f64> {
    if let Some(v) = finite(e.value) {
        return Some(v);
    }
    let mut sum = 0.0;
    let mut any = false;
    for it in &e.items {
        if let Some(p) = finite(it.price) {
            any = true;
            sum += p * finite(it.quantity).unwrap_or(1.0);
        }
    }
    // Rounded so 3 × 59.99 is sent as 179.97, not 179.97000000000003.
    any.then(|| (sum * 1e6).round() / 1e6)
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DmEvent<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<&'a str>,
    pub event_timestamp: Rfc3339,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_data: Option<UserData>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consent: Option<Consent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ad_identifiers: Option<AdIdentifiers<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<Currency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversion_value: Option<f64>,
    pub event_source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_device_info: Option<DeviceInfo<'a>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserData {
    pub user_identifiers: Vec<UserIdentifier>,
}

/// Exactly one identifier per entry (a proto `oneof`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum UserIdentifier {
    EmailAddress(Hex64),
    PhoneNumber(Hex64),
    Address(AddressInfo),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressInfo {
    pub given_name: Hex64,
    pub family_name: Hex64,
    pub region_code: String,
    pub postal_code: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Consent {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ad_user_data: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ad_personalization: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
pub struct AdIdentifiers<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gclid: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbraid: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wbraid: Option<Cow<'a, str>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInfo<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<&'a str>,
}

/// A unix-milliseconds instant written as RFC 3339 in UTC with milliseconds
/// (`2025-12-05T05:36:29.500Z`), the proto3 JSON form of `google.protobuf.Timestamp`.
#[derive(Debug, Clone, Copy)]
pub struct Rfc3339(pub i64);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0;
        let days = ms.div_euclid(86_400_000);
        let in_day = ms.rem_euclid(86_400_000);
        // Howard Hinnant's civil-from-days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            in_day / 3_600_000,
            in_day / 60_000 % 60,
            in_day / 1000 % 60,
            in_day % 1000
        )
    }
}

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
