//! The one Measurement Protocol validator, shared by `/mp/collect` and `/debug/mp/collect`.
//!
//! A single pass walks the body, builds events and flags every problem with Google's validation
//! codes. Each problem has a scope that decides what production drops:
//! - request: the whole request (no client id, no events, more than 25 events);
//! - event: that event (bad or reserved name, not an object);
//! - field: just the offending parameter / user property / item / value — this is what GA4's
//!   default `RELAXED` validation behaviour does with over-limit or malformed fields. With
//!   `validation_behavior = "ENFORCE_RECOMMENDATIONS"` field problems reject their event (or the
//!   request, for request-level fields), as Google does.
//!
//! Field paths follow Google's validation server, which points at the repeated field
//! (`events`, `events.params`) and names the index and key in the description.

use std::borrow::Cow;
use std::net::IpAddr;

use serde::Serialize;

use super::item::{self, Scalar};
use super::json::{dedup, get, Json};
use crate::event::{format_number, ConsentState, Event, Item};

pub use crate::ga4_limits::*;
const MAX_EMAILS: usize = 3;
const MAX_PHONES: usize = 3;
const MAX_ADDRESSES: usize = 2;
/// Google accepts events up to 72 hours old and clamps older ones under `RELAXED`.
const MAX_BACKDATE_MS: i64 = 72 * 3600 * 1000;
/// Sender clocks drift; a minute ahead is still "now", further is a bug on the sender's side.
const MAX_FUTURE_SKEW_MS: i64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Code {
    ValueInvalid,
    ValueRequired,
    NameInvalid,
    NameReserved,
    ValueOutOfBounds,
    ExceededMaxEntities,
    NameDuplicated,
}

/// One entry of the debug endpoint's `validationMessages`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidationMessage {
    pub field_path: Cow<'static, str>,
    pub description: String,
    pub validation_code: Code,
}

/// What the request says about itself outside the body.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// `measurement_id` (web stream), or `None` for app streams.
    pub measurement_id: Option<&'a str>,
    /// The request names a `firebase_app_id`: `app_instance_id` identifies the device.
    pub app_stream: bool,
    pub now_ms: i64,
    /// Build human-readable messages (debug endpoint). Production only counts.
    pub collect_messages: bool,
}

#[derive(Debug, Default)]
pub struct Outcome {
    /// Events production forwards (already stripped of dropped fields).
    pub events: Vec<Event>,
    /// Empty unless `collect_messages`.
    pub messages: Vec<ValidationMessage>,
    /// Drop decisions by bounded reason label, for `tagrelay_mp_dropped_total`.
    pub dropped: Vec<(&'static str, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Request,
    Event,
    Field,
    /// Reported, never dropped (GA-only requirements that would cost other vendors data).
    Advisory,
}

/// Validates a Measurement Protocol body (a JSON object) and maps it into events.
pub fn process(top: &[(String, Json)], cx: &Context<'_>) -> Outcome {
    let mut c = Checker {
        collect: cx.collect_messages,
        enforce: false,
        in_event: false,
        event_rejected: false,
        request_rejected: false,
        out: Outcome::default(),
    };
    let fields = dedup(top, |k| {
        c.flag(
            Scope::Field,
            Code::NameDuplicated,
            "key_duplicated",
            k.to_owned(),
            || format!("Field [{k}] appears more than once; the last value is used."),
        )
    });

    match get(&fields, "validation_behavior").or_else(|| get(&fields, "validationBehavior")) {
        None | Some(Json::Null) => {}
        Some(Json::Str(s)) if s == "RELAXED" => {}
        Some(Json::Str(s)) if s == "ENFORCE_RECOMMENDATIONS" => c.enforce = true,
        Some(other) => c.flag(
            Scope::Field,
            Code::ValueInvalid,
            "validation_behavior_invalid",
            "validation_behavior",
            || {
                format!(
                    "validation_behavior must be RELAXED or ENFORCE_RECOMMENDATIONS, got {}.",
                    show(other)
                )
            },
        ),
    }

    let mut base = Event {
        ga: crate::event::GaSession {
            measurement_id: cx.measurement_id.map(Into::into),
            ..Default::default()
        },
        ..Default::default()
    };
    c.identity(&fields, cx.app_stream, &mut base);
    c.user_id(get(&fields, "user_id"), &mut base);
    let request_ts = match get(&fields, "timestamp_micros") {
        None | Some(Json::Null) => None,
        Some(v) => c.timestamp(v, "timestamp_micros", cx.now_ms),
    };
    if let Some(v) = get(&fields, "user_properties") {
        c.user_properties(v, &mut base);
    }
    if let Some(v) = get(&fields, "consent") {
        c.consent(v, &mut base);
    }
    match get(&fields, "non_personalized_ads") {
        None | Some(Json::Null) => {}
        Some(Json::Bool(b)) => base.consent.npa = Some(if *b { "1" } else { "0" }.into()),
        Some(other) => c.flag(
            Scope::Field,
            Code::ValueInvalid,
            "non_personalized_ads_invalid",
            "non_personalized_ads",
            || {
                format!(
                    "non_personalized_ads must be a boolean, got {}.",
                    show(other)
                )
            },
        ),
    }
    if let Some(v) = get(&fields, "user_data") {
        c.user_data(v, &mut base);
    }
    if let Some(v) = get(&fields, "user_location") {
        c.user_location(v);
    }
    if let Some(v) = get(&fields, "ip_override") {
        match v {
            Json::Null => {}
            Json::Str(s) if s.trim().parse::<IpAddr>().is_ok() => {
                base.ip_override = Some(s.trim().to_owned())
            }
            other => c.flag(
                Scope::Field,
                Code::ValueInvalid,
                "ip_override_invalid",
                "ip_override",
                || {
                    format!(
                        "ip_override must be an IPv4 or IPv6 address, got {}.",
                        show(other)
                    )
                },
            ),
        }
    }
    if let Some(v) = get(&fields, "device") {
        c.device(v, &mut base);
    }
    match get(&fields, "user_agent") {
        None | Some(Json::Null) => {}
        Some(Json::Str(s)) => base.user_agent = Some(s.clone()),
        Some(other) => c.flag(
            Scope::Field,
            Code::ValueInvalid,
            "user_agent_invalid",
            "user_agent",
            || format!("user_agent must be a string, got {}.", show(other)),
        ),
    }

    match get(&fields, "events") {
        None | Some(Json::Null) => c.flag(
            Scope::Request,
            Code::ValueRequired,
            "events_missing",
            "events",
            || "events is required: send between 1 and 25 events.".to_owned(),
        ),
        Some(Json::Arr(a)) if a.is_empty() => c.flag(
            Scope::Request,
            Code::ValueRequired,
            "events_missing",
            "events",
            || "events is empty: send between 1 and 25 events.".to_owned(),
        ),
        Some(Json::Arr(a)) => {
            if a.len() > MAX_EVENTS {
                c.flag(
                    Scope::Request,
                    Code::ExceededMaxEntities,
                    "too_many_events",
                    "events",
                    || format!("A maximum of {MAX_EVENTS} events can be specified per request; got {}.", a.len()),
                );
            }
            // Production stops here when nothing will be forwarded; the debug endpoint keeps
            // going so one round trip reports every problem.
            if c.collect || !c.request_rejected {
                for (i, e) in a.iter().enumerate() {
                    if let Some(ev) = c.event(i, e, &base, request_ts, cx) {
                        c.out.events.push(ev);
                    }
                }
            }
        }
        Some(other) => c.flag(
            Scope::Request,
            Code::ValueInvalid,
            "events_invalid",
            "events",
            || format!("events must be an array, got {}.", show(other)),
        ),
    }

    if c.request_rejected {
        c.out.events.clear();
    }
    c.out
}

struct Checker {
    collect: bool,
    enforce: bool,
    in_event: bool,
    event_rejected: bool,
    request_rejected: bool,
    out: Outcome,
}

impl Checker {
    /// Records a problem. `reason` is the bounded metric label; `path` and `describe` only
    /// matter to the debug endpoint, so the description is built lazily.
    fn flag(
        &mut self,
        scope: Scope,
        code: Code,
        reason: &'static str,
        path: impl Into<Cow<'static, str>>,
        describe: impl FnOnce() -> String,
    ) {
        if self.collect {
            self.out.messages.push(ValidationMessage {
                field_path: path.into(),
                description: describe(),
                validation_code: code,
            });
        }
        let scope = match scope {
            Scope::Field if self.enforce => Scope::Event,
            s => s,
        };
        match scope {
            Scope::Advisory => return,
            Scope::Field => {}
            Scope::Event if self.in_event => self.event_rejected = true,
            Scope::Event | Scope::Request => self.request_rejected = true,
        }
        match self.out.dropped.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.out.dropped.push((reason, 1)),
        }
    }

    fn identity(&mut self, fields: &[(&str, &Json)], app_stream: bool, base: &mut Event) {
        let key: &'static str = if app_stream {
            "app_instance_id"
        } else {
            "client_id"
        };
        match get(fields, key) {
            Some(Json::Str(s)) if !s.trim().is_empty() => {
                if app_stream && !(s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())) {
                    self.flag(
                        Scope::Request,
                        Code::ValueInvalid,
                        "app_instance_id_invalid",
                        key,
                        || {
                            format!(
                                "app_instance_id must be 32 hexadecimal characters, got {}.",
                                show_str(s)
                            )
                        },
                    );
                } else {
                    base.client_id = Some(s.as_str().into());
                }
            }
            None | Some(Json::Null) | Some(Json::Str(_)) => {
                let reason = if app_stream {
                    "app_instance_id_missing"
                } else {
                    "client_id_missing"
                };
                self.flag(Scope::Request, Code::ValueRequired, reason, key, || {
                    if app_stream {
                        "app_instance_id is required for requests with firebase_app_id.".to_owned()
                    } else {
                        "client_id is required for requests with measurement_id.".to_owned()
                    }
                })
            }
            Some(other) => {
                let reason = if app_stream {
                    "app_instance_id_invalid"
                } else {
                    "client_id_invalid"
                };
                self.flag(Scope::Request, Code::ValueInvalid, reason, key, || {
                    format!("{key} must be a string, got {}.", show(other))
                })
            }
        }
    }

    fn user_id(&mut self, v: Option<&Json>, base: &mut Event) {
        match v {
            None | Some(Json::Null) => {}
            Some(Json::Str(s)) if s.is_empty() => {}
            Some(Json::Str(s)) if s.chars().count() > MAX_USER_ID_LEN => self.flag(
                Scope::Field,
                Code::ValueOutOfBounds,
                "user_id_too_long",
                "user_id",
                || format!("user_id is longer than {MAX_USER_ID_LEN} characters."),
            ),
            Some(Json::Str(s)) => base.user_id = Some(s.clone()),
            Some(other) => self.flag(
                Scope::Field,
                Code::ValueInvalid,
                "user_id_invalid",
                "user_id",
                || format!("user_id must be a string, got {}.", show(other)),
            ),
        }
    }

    /// Microsecond timestamp → event time in ms, clamped like Google under `RELAXED`.
    fn timestamp(&mut self, v: &Json, path: &'static str, now_ms: i64) -> Option<i64> {
        let micros = match v {
            Json::Num(n) => n.as_i64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite() && f.abs() < 9e18)
                    .map(|f| f as i64)
            }),
            // Protobuf JSON writes int64 as a string; Google's own clients do too.
            Json::Str(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        let Some(micros) = micros.filter(|m| *m > 0) else {
            self.flag(
                Scope::Field,
                Code::ValueInvalid,
                "timestamp_invalid",
                path,
                || {
                    format!(
                        "timestamp_micros must be a positive integer (microseconds), got {}.",
                        show(v)
                    )
                },
            );
            return None;
        };
        let ms = micros / 1000;
        if ms < now_ms - MAX_BACKDATE_MS {
            self.flag(Scope::Field, Code::ValueOutOfBounds, "timestamp_too_old", path, || {
                "timestamp_micros is more than 72 hours in the past; it is clamped to 72 hours ago.".to_owned()
            });
            return Some(now_ms - MAX_BACKDATE_MS);
        }
        if ms > now_ms + MAX_FUTURE_SKEW_MS {
            self.flag(
                Scope::Field,
                Code::ValueOutOfBounds,
                "timestamp_in_future",
                path,
                || "timestamp_micros is in the future; the receive time is used.".to_owned(),
            );
            return None;
        }
        Some(ms)
    }

    /// An optional top-level object: `None` when absent (null) or, flagged, not an object.
    fn object<'j>(
        &mut self,
        v: &'j Json,
        field: &'static str,
        reason: &'static str,
    ) -> Option<&'j Vec<(String, Json)>> {
        match v {
            Json::Null => None,
            Json::Obj(o) => Some(o),
            other => {
                self.flag(Scope::Field, Code::ValueInvalid, reason, field, || {
                    format!("{field} must be an object, got {}.", show(other))
                });
                None
            }
        }
    }

    fn user_properties(&mut self, v: &Json, base: &mut Event) {
        let Some(o) = self.object(v, "user_properties", "user_properties_invalid") else {
            return;
        };
        let props = dedup(o, |k| {
            self.flag(
                Scope::Field,
                Code::NameDuplicated,
                "user_property_duplicated",
                "user_properties",
                || format!("User property [{k}] appears more than once; the last value is used."),
            )
        });
        if props.len() > MAX_USER_PROPERTIES {
            self.flag(
                Scope::Field,
                Code::ExceededMaxEntities,
                "too_many_user_properties",
                "user_properties",
                || format!("A maximum of {MAX_USER_PROPERTIES} user properties can be specified; got {}, the rest are dropped.", props.len()),
            );
        }
        for (name, prop) in props.into_iter().take(MAX_USER_PROPERTIES) {
            if let Some(fault) = name_fault(name, MAX_USER_PROPERTY_NAME_LEN) {
                self.flag(
                    Scope::Field,
                    Code::NameInvalid,
                    "user_property_name_invalid",
                    "user_properties",
                    || {
                        format!(
                            "User property [{name}] has an invalid name. Names {}.",
                            fault.says(MAX_USER_PROPERTY_NAME_LEN)
                        )
                    },
                );
                continue;
            }
            if is_reserved_user_property_name(name) {
                self.flag(
                    Scope::Field,
                    Code::NameReserved,
                    "user_property_name_reserved",
                    "user_properties",
                    || format!("User property [{name}] has a reserved name."),
                );
                continue;
            }
            let value = match prop {
                Json::Obj(p) => get(&dedup(p, |_| ()), "value"),
                _ => None,
            };
            match value {
                // `{"value": null}` is how senders clear a user property: nothing to forward.
                Some(Json::Null) => {}
                Some(Json::Str(s)) if s.chars().count() > MAX_USER_PROPERTY_VALUE_LEN => self.flag(
                    Scope::Field,
                    Code::ValueOutOfBounds,
                    "user_property_value_too_long",
                    "user_properties",
                    || format!("User property [{name}] has a value longer than {MAX_USER_PROPERTY_VALUE_LEN} characters."),
                ),
                Some(v @ (Json::Str(_) | Json::Num(_) | Json::Bool(_))) => {
                    base.user_properties.insert(name.to_owned(), v.to_value());
                }
                Some(other) => self.flag(
                    Scope::Field,
                    Code::ValueInvalid,
                    "user_property_value_invalid",
                    "user_properties",
                    || format!("User property [{name}] must have a string or number value, got {}.", show(other)),
                ),
                None => self.flag(
                    Scope::Field,
                    Code::ValueRequired,
                    "user_property_value_missing",
                    "user_properties",
                    || format!("User property [{name}] must be an object with a `value`."),
                ),
            }
        }
    }

    fn consent(&mut self, v: &Json, base: &mut Event) {
        let Some(o) = self.object(v, "consent", "consent_invalid") else {
            return;
        };
        for (k, v) in dedup(o, |_| ()) {
            let (slot, path) = match k {
                "ad_user_data" => (&mut base.consent.ad_user_data, "consent.ad_user_data"),
                "ad_personalization" => (
                    &mut base.consent.ad_personalization,
                    "consent.ad_personalization",
                ),
                _ => continue,
            };
            match v {
                Json::Str(s) if s == "GRANTED" => *slot = ConsentState::Granted,
                Json::Str(s) if s == "DENIED" => *slot = ConsentState::Denied,
                Json::Null => {}
                other => self.flag(
                    Scope::Field,
                    Code::ValueInvalid,
                    "consent_invalid",
                    path,
                    || format!("{path} must be GRANTED or DENIED, got {}.", show(other)),
                ),
            }
        }
    }

    fn user_data(&mut self, v: &Json, base: &mut Event) {
        let Some(o) = self.object(v, "user_data", "user_data_invalid") else {
            return;
        };
        let f = dedup(o, |_| ());
        if let Some(v) = get(&f, "sha256_email_address") {
            base.user_data.sha256_email_address =
                self.hashes(v, "user_data.sha256_email_address", MAX_EMAILS);
        }
        if let Some(v) = get(&f, "sha256_phone_number") {
            base.user_data.sha256_phone_number =
                self.hashes(v, "user_data.sha256_phone_number", MAX_PHONES);
        }
        match get(&f, "address") {
            None | Some(Json::Null) => {}
            Some(Json::Obj(a)) => self.address(a, base),
            Some(Json::Arr(list)) => {
                if list.len() > MAX_ADDRESSES {
                    self.flag(
                        Scope::Field,
                        Code::ExceededMaxEntities,
                        "too_many_addresses",
                        "user_data.address",
                        || {
                            format!(
                                "A maximum of {MAX_ADDRESSES} addresses can be specified; got {}.",
                                list.len()
                            )
                        },
                    );
                }
                // The event model carries one address; the first one is the primary.
                for (i, a) in list.iter().take(MAX_ADDRESSES).enumerate() {
                    match a {
                        Json::Obj(a) if i == 0 => self.address(a, base),
                        Json::Obj(_) => {}
                        other => self.flag(
                            Scope::Field,
                            Code::ValueInvalid,
                            "address_invalid",
                            "user_data.address",
                            || {
                                format!(
                                    "Address at index [{i}] must be an object, got {}.",
                                    show(other)
                                )
                            },
                        ),
                    }
                }
            }
            Some(other) => self.flag(
                Scope::Field,
                Code::ValueInvalid,
                "address_invalid",
                "user_data.address",
                || {
                    format!(
                        "user_data.address must be an object or an array of objects, got {}.",
                        show(other)
                    )
                },
            ),
        }
        if base.user_id.is_none() {
            self.flag(Scope::Advisory, Code::ValueRequired, "user_id_missing", "user_id", || {
                "user_data requires user_id in the same request; Google Analytics ignores it otherwise.".to_owned()
            });
        }
    }

    /// A hashed identifier or a list of them; keeps the first valid one.
    fn hashes(&mut self, v: &Json, path: &'static str, max: usize) -> Option<String> {
        let list: &[Json] = match v {
            Json::Null => return None,
            Json::Arr(a) => a,
            single => std::slice::from_ref(single),
        };
        if list.len() > max {
            self.flag(
                Scope::Field,
                Code::ExceededMaxEntities,
                "too_many_user_data_values",
                path,
                || {
                    format!(
                        "A maximum of {max} values can be specified in {path}; got {}.",
                        list.len()
                    )
                },
            );
        }
        let mut first = None;
        for v in list.iter().take(max) {
            match v {
                Json::Str(s) if is_sha256_hex(s) => {
                    if first.is_none() {
                        first = Some(s.to_ascii_lowercase());
                    }
                }
                other => self.flag(Scope::Field, Code::ValueInvalid, "user_data_hash_invalid", path, || {
                    format!("{path} values must be SHA-256 hashes as 64 hexadecimal characters, got {}.", show(other))
                }),
            }
        }
        first
    }

    fn address(&mut self, a: &[(String, Json)], base: &mut Event) {
        for (k, v) in dedup(a, |_| ()) {
            let (hashed, path) = match k {
                "sha256_first_name" => (true, "user_data.address.sha256_first_name"),
                "sha256_last_name" => (true, "user_data.address.sha256_last_name"),
                "sha256_street" => (true, "user_data.address.sha256_street"),
                "city" => (false, "user_data.address.city"),
                "region" => (false, "user_data.address.region"),
                "postal_code" => (false, "user_data.address.postal_code"),
                "country" => (false, "user_data.address.country"),
                _ => continue,
            };
            let value = match v {
                Json::Null => continue,
                Json::Str(s) if hashed && is_sha256_hex(s) => s.to_ascii_lowercase(),
                Json::Str(s) if !hashed => s.clone(),
                other => {
                    let want = if hashed {
                        "a SHA-256 hash as 64 hexadecimal characters"
                    } else {
                        "a string"
                    };
                    self.flag(
                        Scope::Field,
                        Code::ValueInvalid,
                        "user_data_value_invalid",
                        path,
                        || format!("{path} must be {want}, got {}.", show(other)),
                    );
                    continue;
                }
            };
            let addr = &mut base.user_data.address;
            let slot = match k {
                "sha256_first_name" => &mut addr.sha256_first_name,
                "sha256_last_name" => &mut addr.sha256_last_name,
                "sha256_street" => &mut addr.sha256_street,
                "city" => &mut addr.city,
                "region" => &mut addr.region,
                "postal_code" => &mut addr.postal_code,
                _ => &mut addr.country,
            };
            *slot = Some(value);
        }
    }

    fn user_location(&mut self, v: &Json) {
        let Some(o) = self.object(v, "user_location", "user_location_invalid") else {
            return;
        };
        for (k, v) in dedup(o, |_| ()) {
            let path = match k {
                "city" => "user_location.city",
                "region_id" => "user_location.region_id",
                "country_id" => "user_location.country_id",
                "subcontinent_id" => "user_location.subcontinent_id",
                "continent_id" => "user_location.continent_id",
                _ => continue,
            };
            if !matches!(v, Json::Str(_) | Json::Null) {
                self.flag(
                    Scope::Field,
                    Code::ValueInvalid,
                    "user_location_invalid",
                    path,
                    || format!("{path} must be a string, got {}.", show(v)),
                );
            }
        }
    }

    fn device(&mut self, v: &Json, base: &mut Event) {
        let Some(o) = self.object(v, "device", "device_invalid") else {
            return;
        };
        for (k, v) in dedup(o, |_| ()) {
            let path = match k {
                "language" => "device.language",
                "screen_resolution" => "device.screen_resolution",
                "category" => "device.category",
                "operating_system" => "device.operating_system",
                "operating_system_version" => "device.operating_system_version",
                "model" => "device.model",
                "brand" => "device.brand",
                "browser" => "device.browser",
                "browser_version" => "device.browser_version",
                _ => continue,
            };
            match (k, v) {
                (_, Json::Null) => {}
                ("language", Json::Str(s)) => base.language = Some(s.as_str().into()),
                ("screen_resolution", Json::Str(s)) if is_resolution(s) => {
                    base.screen_resolution = Some(s.as_str().into())
                }
                ("screen_resolution", other) => self.flag(
                    Scope::Field,
                    Code::ValueInvalid,
                    "device_invalid",
                    path,
                    || {
                        format!(
                            "device.screen_resolution must look like 1280x720, got {}.",
                            show(other)
                        )
                    },
                ),
                (_, Json::Str(_)) => {}
                (_, other) => self.flag(
                    Scope::Field,
                    Code::ValueInvalid,
                    "device_invalid",
                    path,
                    || format!("{path} must be a string, got {}.", show(other)),
                ),
            }
        }
    }

    fn event(
        &mut self,
        i: usize,
        e: &Json,
        base: &Event,
        request_ts: Option<i64>,
        cx: &Context<'_>,
    ) -> Option<Event> {
        self.in_event = true;
        self.event_rejected = false;
        let ev = self.event_inner(i, e, base, request_ts, cx);
        self.in_event = false;
        ev.filter(|_| !self.event_rejected)
    }

    fn event_inner(
        &mut self,
        i: usize,
        e: &Json,
        base: &Event,
        request_ts: Option<i64>,
        cx: &Context<'_>,
    ) -> Option<Event> {
        let Json::Obj(o) = e else {
            self.flag(
                Scope::Event,
                Code::ValueInvalid,
                "event_invalid",
                "events",
                || format!("Event at index: [{i}] must be an object, got {}.", show(e)),
            );
            return None;
        };
        let f = dedup(o, |k| {
            self.flag(Scope::Field, Code::NameDuplicated, "key_duplicated", "events", || {
                format!("Event at index: [{i}] has field [{k}] more than once; the last value is used.")
            })
        });
        let name = match get(&f, "name") {
            Some(Json::Str(s)) => s.as_str(),
            None | Some(Json::Null) => {
                self.flag(
                    Scope::Event,
                    Code::ValueRequired,
                    "event_name_missing",
                    "events",
                    || format!("Event at index: [{i}] has no name."),
                );
                return None;
            }
            Some(other) => {
                self.flag(
                    Scope::Event,
                    Code::ValueInvalid,
                    "event_name_invalid",
                    "events",
                    || {
                        format!(
                            "Event at index: [{i}] has a name that is not a string ({}).",
                            show(other)
                        )
                    },
                );
                return None;
            }
        };
        if let Some(fault) = name_fault(name, MAX_NAME_LEN) {
            self.flag(
                Scope::Event,
                Code::NameInvalid,
                "event_name_invalid",
                "events",
                || {
                    format!(
                        "Event at index: [{i}] has invalid name [{}]. Names {}.",
                        show_str(name),
                        fault.says(MAX_NAME_LEN)
                    )
                },
            );
        } else if is_reserved_event_name(name, cx.app_stream) {
            self.flag(
                Scope::Event,
                Code::NameReserved,
                "event_name_reserved",
                "events",
                || format!("Event at index: [{i}] has reserved name [{name}]."),
            );
        }
        if self.event_rejected && !self.collect {
            return None;
        }

        let mut ev = base.clone();
        ev.event_name = name.to_owned();
        let mut event_ts = None;
        match get(&f, "params") {
            None | Some(Json::Null) => {}
            Some(Json::Obj(p)) => self.params(i, p, &mut ev, &mut event_ts, cx),
            Some(other) => self.flag(
                Scope::Event,
                Code::ValueInvalid,
                "params_invalid",
                "events.params",
                || {
                    format!(
                        "Event at index: [{i}] has params that are not an object ({}).",
                        show(other)
                    )
                },
            ),
        }
        ev.timestamp_ms = event_ts.or(request_ts).unwrap_or(0);
        Some(ev)
    }

    fn params(
        &mut self,
        i: usize,
        p: &[(String, Json)],
        ev: &mut Event,
        event_ts: &mut Option<i64>,
        cx: &Context<'_>,
    ) {
        let params = dedup(p, |k| {
            self.flag(Scope::Field, Code::NameDuplicated, "param_duplicated", "events.params", || {
                format!("Event at index: [{i}] has parameter [{k}] more than once; the last value is used.")
            })
        });
        if params.len() > MAX_PARAMS {
            self.flag(Scope::Field, Code::ExceededMaxEntities, "too_many_params", "events.params", || {
                format!(
                    "Event at index: [{i}] has {} parameters; a maximum of {MAX_PARAMS} is kept, the rest are dropped.",
                    params.len()
                )
            });
        }
        for (k, v) in params.into_iter().take(MAX_PARAMS) {
            if let Some(fault) = name_fault(k, MAX_NAME_LEN) {
                self.flag(
                    Scope::Field,
                    Code::NameInvalid,
                    "param_name_invalid",
                    "events.params",
                    || {
                        format!(
                            "Event at index: [{i}] has parameter with invalid name [{}]. Names {}.",
                            show_str(k),
                            fault.says(MAX_NAME_LEN)
                        )
                    },
                );
                continue;
            }
            if is_reserved_param_name(k) {
                self.flag(
                    Scope::Field,
                    Code::NameReserved,
                    "param_name_reserved",
                    "events.params",
                    || format!("Event at index: [{i}] has parameter with reserved name [{k}]."),
                );
                continue;
            }
            self.param(i, k, v, ev, event_ts, cx);
        }
    }

    fn param(
        &mut self,
        i: usize,
        k: &str,
        v: &Json,
        ev: &mut Event,
        event_ts: &mut Option<i64>,
        cx: &Context<'_>,
    ) {
        let ok = match k {
            "items" => match v {
                Json::Arr(a) => {
                    ev.items = self.items(i, a);
                    true
                }
                _ => false,
            },
            "session_id" => match integer_text(v) {
                Some(s) => {
                    ev.ga.session_id = Some(s.into());
                    true
                }
                None => false,
            },
            "engagement_time_msec" => match integer_text(v).and_then(|s| s.parse::<u64>().ok()) {
                Some(n) => {
                    ev.ga.engagement_time_msec = Some(n);
                    true
                }
                None => false,
            },
            "timestamp_micros" => {
                *event_ts = self.timestamp(v, "events.params", cx.now_ms);
                true
            }
            "debug_mode" => match v {
                Json::Bool(b) => {
                    ev.ga.debug_mode = *b;
                    true
                }
                Json::Num(n) => {
                    ev.ga.debug_mode = n.as_f64().is_some_and(|n| n != 0.0);
                    true
                }
                Json::Str(s) => {
                    ev.ga.debug_mode = !matches!(s.as_str(), "" | "0" | "false");
                    true
                }
                _ => false,
            },
            "currency" => match v {
                Json::Str(s) if s.len() == 3 && s.bytes().all(|b| b.is_ascii_alphabetic()) => {
                    ev.currency = Some(s.to_ascii_uppercase().into());
                    true
                }
                _ => false,
            },
            "value" => match scalar(v).and_then(item::number) {
                Some(n) => {
                    ev.value = Some(n);
                    true
                }
                None => false,
            },
            "event_id" | "transaction_id" | "page_location" | "page_referrer" | "page_title" => {
                let max = match k {
                    "page_location" => MAX_PAGE_LOCATION_LEN,
                    "page_referrer" => MAX_PAGE_REFERRER_LEN,
                    "page_title" => MAX_PAGE_TITLE_LEN,
                    _ => MAX_PARAM_VALUE_LEN,
                };
                let text = match v {
                    Json::Str(s) => Cow::Borrowed(s.as_str()),
                    Json::Num(n) => Cow::Owned(n.to_string()),
                    _ => return self.param_invalid(i, k, v),
                };
                if text.chars().count() > max {
                    return self.param_too_long(i, k, max);
                }
                let slot = match k {
                    "event_id" => {
                        ev.event_id = text.into_owned();
                        return;
                    }
                    "transaction_id" => &mut ev.transaction_id,
                    "page_location" => &mut ev.page_location,
                    "page_referrer" => &mut ev.page_referrer,
                    _ => &mut ev.page_title,
                };
                *slot = Some(text.into_owned());
                true
            }
            _ => match v {
                Json::Str(s) if s.chars().count() > MAX_PARAM_VALUE_LEN => {
                    return self.param_too_long(i, k, MAX_PARAM_VALUE_LEN)
                }
                Json::Str(_) | Json::Num(_) | Json::Bool(_) => {
                    ev.params.insert(k.to_owned(), v.to_value());
                    true
                }
                _ => false,
            },
        };
        if !ok {
            self.param_invalid(i, k, v);
        }
    }

    fn param_invalid(&mut self, i: usize, k: &str, v: &Json) {
        let want = match k {
            "items" => "an array of item objects",
            "session_id" | "engagement_time_msec" => "a non-negative integer",
            "currency" => "a 3-letter ISO 4217 code",
            "value" => "a number",
            "debug_mode" => "a boolean",
            _ => "a string or a number",
        };
        self.flag(Scope::Field, Code::ValueInvalid, "param_value_invalid", "events.params", || {
            format!("Event at index: [{i}] has parameter [{k}] with an invalid value ({}); expected {want}.", show(v))
        });
    }

    fn param_too_long(&mut self, i: usize, k: &str, max: usize) {
        self.flag(Scope::Field, Code::ValueOutOfBounds, "param_value_too_long", "events.params", || {
            format!("Event at index: [{i}] has parameter [{k}] with a value longer than {max} characters.")
        });
    }

    fn items(&mut self, i: usize, a: &[Json]) -> Vec<Item> {
        const PATH: &str = "events.params.items";
        if a.len() > MAX_ITEMS {
            self.flag(
                Scope::Field,
                Code::ExceededMaxEntities,
                "too_many_items",
                PATH,
                || {
                    format!(
                        "Event at index: [{i}] has {} items; a maximum of {MAX_ITEMS} is kept.",
                        a.len()
                    )
                },
            );
        }
        let mut items = Vec::with_capacity(a.len().min(MAX_ITEMS));
        for (j, it) in a.iter().take(MAX_ITEMS).enumerate() {
            let Json::Obj(o) = it else {
                self.flag(Scope::Field, Code::ValueInvalid, "item_invalid", PATH, || {
                    format!("Event at index: [{i}] has item at index [{j}] that is not an object ({}).", show(it))
                });
                continue;
            };
            let keys = dedup(o, |k| {
                self.flag(Scope::Field, Code::NameDuplicated, "item_param_duplicated", PATH, || {
                    format!("Event at index: [{i}] item at index [{j}] has parameter [{k}] more than once.")
                })
            });
            let mut item = Item::default();
            let mut custom = 0usize;
            for (k, v) in keys {
                if !item::is_standard_key(k) {
                    if let Some(fault) = name_fault(k, MAX_NAME_LEN) {
                        self.flag(Scope::Field, Code::NameInvalid, "item_param_name_invalid", PATH, || {
                            format!("Event at index: [{i}] item at index [{j}] has parameter with invalid name [{}]. Names {}.", show_str(k), fault.says(MAX_NAME_LEN))
                        });
                        continue;
                    }
                    custom += 1;
                    if custom > MAX_ITEM_CUSTOM_PARAMS {
                        if custom == MAX_ITEM_CUSTOM_PARAMS + 1 {
                            self.flag(Scope::Field, Code::ExceededMaxEntities, "too_many_item_params", PATH, || {
                                format!("Event at index: [{i}] item at index [{j}] has more than {MAX_ITEM_CUSTOM_PARAMS} custom parameters; the rest are dropped.")
                            });
                        }
                        continue;
                    }
                }
                let value = match v {
                    Json::Str(s) if s.chars().count() > MAX_PARAM_VALUE_LEN => {
                        self.flag(Scope::Field, Code::ValueOutOfBounds, "item_param_value_too_long", PATH, || {
                            format!("Event at index: [{i}] item at index [{j}] has parameter [{k}] with a value longer than {MAX_PARAM_VALUE_LEN} characters.")
                        });
                        continue;
                    }
                    other => scalar(other),
                };
                let result = match value {
                    Some(s) => item::set_item_field(&mut item, k, s),
                    None => Err("a string or a number"),
                };
                if let Err(want) = result {
                    self.flag(Scope::Field, Code::ValueInvalid, "item_param_invalid", PATH, || {
                        format!("Event at index: [{i}] item at index [{j}] has parameter [{k}] with an invalid value ({}); expected {want}.", show(v))
                    });
                }
            }
            if !item::has_identity(&item) {
                self.flag(
                    Scope::Field,
                    Code::ValueRequired,
                    "item_id_missing",
                    PATH,
                    || {
                        format!(
                            "Event at index: [{i}] item at index [{j}] needs item_id or item_name."
                        )
                    },
                );
                continue;
            }
            items.push(item);
        }
        items
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameFault {
    Empty,
    TooLong,
    BadStart,
    BadChar,
}

impl NameFault {
    fn says(self, max: usize) -> String {
        match self {
            NameFault::Empty => "must not be empty".to_owned(),
            NameFault::TooLong => format!("must be at most {max} characters"),
            NameFault::BadStart => "must start with an alphabetic character".to_owned(),
            NameFault::BadChar => {
                "may only contain alphanumeric characters and underscores".to_owned()
            }
        }
    }
}

/// GA4 name rules: `^[A-Za-z][A-Za-z0-9_]*$`, at most `max` characters.
fn name_fault(name: &str, max: usize) -> Option<NameFault> {
    let mut bytes = name.bytes();
    match bytes.next() {
        None => return Some(NameFault::Empty),
        Some(b) if !b.is_ascii_alphabetic() => return Some(NameFault::BadStart),
        Some(_) => {}
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Some(NameFault::BadChar);
    }
    // All ASCII from here on, so bytes are characters.
    (name.len() > max).then_some(NameFault::TooLong)
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_resolution(s: &str) -> bool {
    s.split_once('x').is_some_and(|(w, h)| {
        !w.is_empty()
            && !h.is_empty()
            && w.bytes().all(|b| b.is_ascii_digit())
            && h.bytes().all(|b| b.is_ascii_digit())
    })
}

/// An integer given as a JSON number or a digit string (session ids arrive as both).
fn integer_text(v: &Json) -> Option<String> {
    match v {
        Json::Num(n) if n.is_u64() => Some(n.to_string()),
        Json::Num(n) => n
            .as_f64()
            .filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f < 9e15)
            .map(format_number),
        Json::Str(s) if !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) => {
            Some(s.clone())
        }
        _ => None,
    }
}

fn scalar(v: &Json) -> Option<Scalar<'_>> {
    match v {
        Json::Str(s) => Some(Scalar::Str(s)),
        Json::Num(n) => n.as_f64().map(Scalar::Num),
        Json::Bool(b) => Some(Scalar::Bool(*b)),
        _ => None,
    }
}

/// A short rendering of a value for a description.
fn show(v: &Json) -> String {
    match v {
        Json::Str(s) => format!("\"{}\"", show_str(s)),
        Json::Num(n) => n.to_string(),
        Json::Bool(b) => b.to_string(),
        other => other.type_name().to_owned(),
    }
}

fn show_str(s: &str) -> Cow<'_, str> {
    crate::text::ellipsize(s, 60)
}

/// Lets callers render an `Outcome` as the debug endpoint's body.
pub fn messages_json(messages: &[ValidationMessage]) -> Vec<u8> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        validation_messages: &'a [ValidationMessage],
    }
    serde_json::to_vec(&Body {
        validation_messages: messages,
    })
    .unwrap_or_else(|_| br#"{"validationMessages":[]}"#.to_vec())
}
