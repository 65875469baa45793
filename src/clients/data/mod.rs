//! Data client: first-party JSON events on `/data` (the shape of Stape's Data Client, with
//! GTM-SS event-data key names), plus the `tagrelay.js` snippet that sends them.
//!
//! - `POST {path}` with an `application/json` or `text/plain` (sendBeacon) body: one event
//!   object, or `{"events": [...]}` where the other top-level keys are shared by every event.
//! - `GET {path}?event_name=…&value=…&user_data.email_address=…`: one event from the query.
//! - `GET {script_path}`: the snippet, cacheable, with a strong `ETag`.
//!
//! Keys are the event model's names (`event_name`, `page_location`, `user_data.*`, `items`,
//! `consent.*`, …); anything else becomes a custom parameter. Dotted keys
//! (`user_data.address.city`) work in bodies and queries alike.

impl crate::clients::ClientSpec for DataClientConfig {
    fn build(&self) -> Result<crate::clients::BuiltClient, Vec<String>> {
        DataClient::from_config(self).map(|c| crate::clients::BuiltClient::Events(Box::new(c)))
    }
}

#[cfg(test)]
mod tests;

use std::net::IpAddr;

use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::clients::measurement_protocol::item::{self, Scalar};
use crate::clients::{Client, ClientError, ClientResponse, HitRequest, Parsed};
use crate::event::{ConsentState, Event, Item};

/// The snippet as written; the configured paths are substituted at its markers.
pub const SCRIPT: &str = include_str!("tagrelay.js");
const DATA_PATH_MARKER: &str = "/*@data_path*/\"/data\"";
const SCRIPT_PATH_MARKER: &str = "/*@script_path*/\"/tagrelay.js\"";
const SCRIPT_CONTENT_TYPE: &str = "application/javascript; charset=utf-8";
const SCRIPT_CACHE_CONTROL: &str = "public, max-age=300";

pub const MAX_EVENTS: usize = 100;
use crate::ga4_limits::MAX_ITEMS;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataClientConfig {
    /// Where events are posted (after `server.path_prefix`).
    pub path: String,
    /// Where the snippet is served; empty = do not serve it.
    pub script_path: String,
}

impl Default for DataClientConfig {
    fn default() -> Self {
        DataClientConfig {
            path: "/data".into(),
            script_path: "/tagrelay.js".into(),
        }
    }
}

#[derive(Debug)]
pub struct DataClient {
    path: String,
    script_path: Option<String>,
    script: Vec<u8>,
    etag: http::HeaderValue,
}

impl DataClient {
    pub fn from_config(cfg: &DataClientConfig) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        check_path("path", &cfg.path, &mut problems);
        if !cfg.script_path.is_empty() {
            check_path("script_path", &cfg.script_path, &mut problems);
            if cfg.script_path == cfg.path {
                problems.push(format!(
                    "script_path: `{}` is also `path`; give the snippet its own path",
                    cfg.script_path
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let script = render_script(&cfg.path, &cfg.script_path);
        let etag = crate::clients::etag_of(script.as_bytes());
        Ok(DataClient {
            path: cfg.path.clone(),
            script_path: (!cfg.script_path.is_empty()).then(|| cfg.script_path.clone()),
            script: script.into_bytes(),
            etag,
        })
    }

    fn serve_script(&self, req: &HitRequest<'_>) -> Result<Parsed, ClientError> {
        if req.method != Method::GET && req.method != Method::HEAD {
            return Err(ClientError::MethodNotAllowed);
        }
        let headers = vec![
            ("cache-control", SCRIPT_CACHE_CONTROL.to_owned()),
            ("etag", self.etag.to_str().unwrap_or_default().to_owned()),
            ("x-content-type-options", "nosniff".to_owned()),
        ];
        let fresh = crate::clients::etag_matches(req.headers, &self.etag);
        let (status, body) = if fresh {
            (StatusCode::NOT_MODIFIED, Vec::new())
        } else {
            (StatusCode::OK, self.script.clone())
        };
        Ok(Parsed {
            events: Vec::new(),
            response: ClientResponse::Body {
                status,
                content_type: SCRIPT_CONTENT_TYPE,
                body,
                headers,
            },
            set_cookies: false,
        })
    }
}

impl Client for DataClient {
    fn kind(&self) -> &'static str {
        "data"
    }

    fn claims(&self, _method: &Method, path: &str) -> bool {
        path == self.path || self.script_path.as_deref() == Some(path)
    }

    fn parse(&self, req: &HitRequest<'_>) -> Result<Parsed, ClientError> {
        if req.path != self.path {
            return self.serve_script(req);
        }
        let mut quiet = false;
        let mut events = if req.method == Method::GET {
            let mut ev = Event::default();
            for (k, v) in crate::urlenc::pairs(req.query) {
                if k == "response" {
                    quiet = v == "none";
                    continue;
                }
                apply(&mut ev, &k, &Value::String(v.into_owned()), "")?;
            }
            require_name(&ev, "")?;
            vec![ev]
        } else if req.method == Method::POST {
            quiet = crate::urlenc::pairs(req.query).any(|(k, v)| k == "response" && v == "none");
            parse_body(req)?
        } else {
            return Err(ClientError::MethodNotAllowed);
        };

        let referer = req.header("referer").filter(|r| !r.is_empty());
        let user_agent = req.header("user-agent").filter(|u| !u.is_empty());
        let ip = req.client_ip.to_string();
        for ev in &mut events {
            if ev.user_agent.is_none() {
                ev.user_agent = user_agent.map(str::to_owned);
            }
            if ev.ip_override.is_none() {
                ev.ip_override = Some(ip.clone());
            }
            if ev.page_location.is_none() {
                ev.page_location = referer.map(str::to_owned);
            }
        }
        Ok(Parsed {
            events,
            response: if quiet {
                ClientResponse::NoContent
            } else {
                ClientResponse::EventIds
            },
            set_cookies: true,
        })
    }
}

pub(crate) fn check_path(key: &str, path: &str, problems: &mut Vec<String>) {
    let ok = path.len() > 1
        && path.starts_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'"' | b'\\'));
    if !ok {
        problems.push(format!(
            "{key}: `{path}` must be a path like \"/data\" (starts with `/`, no spaces, `?` or `#`)"
        ));
    }
}

fn render_script(data_path: &str, script_path: &str) -> String {
    // Paths are checked to be plain ASCII without quotes or backslashes, but JSON-quote them
    // anyway so the snippet stays valid JavaScript whatever the check lets through.
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
    SCRIPT
        .replacen(DATA_PATH_MARKER, &quote(data_path), 1)
        .replacen(SCRIPT_PATH_MARKER, &quote(script_path), 1)
}

fn parse_body(req: &HitRequest<'_>) -> Result<Vec<Event>, ClientError> {
    if let Some(ct) = req.header("content-type") {
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json")
            && !mime.eq_ignore_ascii_case("text/plain")
        {
            return Err(ClientError::BadRequest(format!(
                "content-type `{mime}` is not supported; send application/json or text/plain"
            )));
        }
    }
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Err(ClientError::BadRequest(
            "body is empty; send an event object or {\"events\": [...]}".into(),
        ));
    }
    let body: Value = serde_json::from_slice(req.body)
        .map_err(|e| ClientError::BadRequest(format!("body is not valid JSON: {e}")))?;
    let Value::Object(top) = body else {
        return Err(ClientError::BadRequest(
            "body must be an event object or {\"events\": [...]}".into(),
        ));
    };
    let Some(list) = top.get("events") else {
        let mut ev = Event::default();
        for (k, v) in &top {
            apply(&mut ev, k, v, "")?;
        }
        require_name(&ev, "")?;
        return Ok(vec![ev]);
    };
    let Value::Array(list) = list else {
        return Err(bad("", "events", "must be an array of event objects"));
    };
    if list.is_empty() || list.len() > MAX_EVENTS {
        return Err(bad(
            "",
            "events",
            &format!("must hold 1 to {MAX_EVENTS} events, got {}", list.len()),
        ));
    }
    let mut events = Vec::with_capacity(list.len());
    for (i, e) in list.iter().enumerate() {
        let at = format!("events[{i}].");
        let Value::Object(fields) = e else {
            return Err(ClientError::BadRequest(format!(
                "events[{i}]: must be an object"
            )));
        };
        let mut ev = Event::default();
        // Top-level keys are defaults for every event; the event's own keys win.
        for (k, v) in top.iter().filter(|(k, _)| k.as_str() != "events") {
            apply(&mut ev, k, v, "")?;
        }
        for (k, v) in fields {
            apply(&mut ev, k, v, &at)?;
        }
        require_name(&ev, &at)?;
        events.push(ev);
    }
    Ok(events)
}

fn bad(at: &str, key: &str, problem: &str) -> ClientError {
    ClientError::BadRequest(format!("{at}{key}: {problem}"))
}

fn require_name(ev: &Event, at: &str) -> Result<(), ClientError> {
    if ev.event_name.trim().is_empty() {
        return Err(bad(at, "event_name", "is required"));
    }
    Ok(())
}

/// Sets one event key. `at` prefixes error messages (`events[2].`).
fn apply(ev: &mut Event, key: &str, v: &Value, at: &str) -> Result<(), ClientError> {
    if v.is_null() {
        return Ok(());
    }
    let text = || text(v).ok_or_else(|| bad(at, key, "must be a string"));
    match key {
        "event_name" => ev.event_name = text()?,
        "event_id" => ev.event_id = text()?,
        "client_id" => ev.client_id = Some(text()?.into()),
        "user_id" => ev.user_id = Some(text()?),
        "page_location" => ev.page_location = Some(text()?),
        "page_referrer" => ev.page_referrer = Some(text()?),
        "page_title" => ev.page_title = Some(text()?),
        "language" => ev.language = Some(text()?.into()),
        "screen_resolution" => ev.screen_resolution = Some(text()?.into()),
        "transaction_id" => ev.transaction_id = Some(text()?),
        "user_agent" => ev.user_agent = Some(text()?),
        "currency" => ev.currency = Some(text()?.trim().to_ascii_uppercase().into()),
        "ip_override" => {
            let ip = text()?;
            if ip.trim().parse::<IpAddr>().is_err() {
                return Err(bad(at, key, "must be an IPv4 or IPv6 address"));
            }
            ev.ip_override = Some(ip.trim().to_owned());
        }
        "value" => ev.value = Some(number(v).ok_or_else(|| bad(at, key, "must be a number"))?),
        "timestamp_ms" => {
            ev.timestamp_ms = integer(v)
                .filter(|n| *n > 0 && *n <= i64::MAX as u64)
                .map(|n| n as i64)
                .ok_or_else(|| bad(at, key, "must be a positive integer (unix milliseconds)"))?
        }
        "ga_session_id" => {
            ev.ga.session_id = Some(
                integer(v)
                    .map(|n| n.to_string().into())
                    .ok_or_else(|| bad(at, key, "must be an integer"))?,
            )
        }
        "ga_session_number" => {
            ev.ga.session_number = Some(
                integer(v)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad(at, key, "must be a non-negative integer"))?,
            )
        }
        "engagement_time_msec" => {
            ev.ga.engagement_time_msec =
                Some(integer(v).ok_or_else(|| bad(at, key, "must be a non-negative integer"))?)
        }
        "items" => ev.items = items(&structured(v), at)?,
        "user_data" => match structured(v).as_ref() {
            Value::Object(o) => {
                for (k, v) in o {
                    user_data(ev, k, v, at)?;
                }
            }
            _ => return Err(bad(at, key, "must be an object")),
        },
        "consent" => match structured(v).as_ref() {
            Value::Object(o) => {
                for (k, v) in o {
                    consent(ev, k, v, at)?;
                }
            }
            _ => return Err(bad(at, key, "must be an object")),
        },
        "user_properties" => match structured(v).as_ref() {
            Value::Object(o) => {
                for (k, v) in o {
                    ev.user_properties.insert(k.clone(), v.clone());
                }
            }
            _ => return Err(bad(at, key, "must be an object")),
        },
        _ => {
            if let Some(rest) = key.strip_prefix("user_data.") {
                return user_data(ev, rest, v, at);
            }
            if let Some(rest) = key.strip_prefix("consent.") {
                return consent(ev, rest, v, at);
            }
            if let Some(rest) = key.strip_prefix("user_properties.") {
                ev.user_properties.insert(rest.to_owned(), v.clone());
                return Ok(());
            }
            ev.params.insert(key.to_owned(), v.clone());
        }
    }
    Ok(())
}

/// Query values are strings; a key that wants an object or array may carry it as JSON text.
fn structured(v: &Value) -> std::borrow::Cow<'_, Value> {
    match v {
        Value::String(s) if s.starts_with('{') || s.starts_with('[') => serde_json::from_str(s)
            .map(std::borrow::Cow::Owned)
            .unwrap_or(std::borrow::Cow::Borrowed(v)),
        _ => std::borrow::Cow::Borrowed(v),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|n| n.is_finite())
}

fn integer(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

const USER_DATA_KEYS: &str = "email_address, sha256_email_address, phone_number, sha256_phone_number, date_of_birth, gender, address";
const ADDRESS_KEYS: &str = "first_name, sha256_first_name, last_name, sha256_last_name, street, sha256_street, city, region, postal_code, country";

fn user_data(ev: &mut Event, key: &str, v: &Value, at: &str) -> Result<(), ClientError> {
    if v.is_null() {
        return Ok(());
    }
    let path = || format!("user_data.{key}");
    if key == "address" {
        let v = structured(v);
        let first = match v.as_ref() {
            // The event model keeps one address: the first is the primary one.
            Value::Array(list) => list.first().cloned().unwrap_or(Value::Null),
            other => other.clone(),
        };
        return match first {
            Value::Object(o) => {
                for (k, v) in &o {
                    address(ev, k, v, at)?;
                }
                Ok(())
            }
            Value::Null => Ok(()),
            _ => Err(bad(at, &path(), "must be an object or an array of objects")),
        };
    }
    if let Some(rest) = key.strip_prefix("address.") {
        return address(ev, rest, v, at);
    }
    let u = &mut ev.user_data;
    let slot = match key {
        "email_address" => &mut u.email_address,
        "sha256_email_address" => &mut u.sha256_email_address,
        "phone_number" => &mut u.phone_number,
        "sha256_phone_number" => &mut u.sha256_phone_number,
        "date_of_birth" => &mut u.date_of_birth,
        "gender" => &mut u.gender,
        _ => {
            return Err(bad(
                at,
                &path(),
                &format!("unknown key (use one of: {USER_DATA_KEYS})"),
            ))
        }
    };
    *slot = Some(
        first_text(v).ok_or_else(|| bad(at, &path(), "must be a string or an array of strings"))?,
    );
    Ok(())
}

fn address(ev: &mut Event, key: &str, v: &Value, at: &str) -> Result<(), ClientError> {
    if v.is_null() {
        return Ok(());
    }
    let path = || format!("user_data.address.{key}");
    let a = &mut ev.user_data.address;
    let slot = match key {
        "first_name" => &mut a.first_name,
        "sha256_first_name" => &mut a.sha256_first_name,
        "last_name" => &mut a.last_name,
        "sha256_last_name" => &mut a.sha256_last_name,
        "street" => &mut a.street,
        "sha256_street" => &mut a.sha256_street,
        "city" => &mut a.city,
        "region" => &mut a.region,
        "postal_code" => &mut a.postal_code,
        "country" => &mut a.country,
        _ => {
            return Err(bad(
                at,
                &path(),
                &format!("unknown key (use one of: {ADDRESS_KEYS})"),
            ))
        }
    };
    *slot = Some(text(v).ok_or_else(|| bad(at, &path(), "must be a string"))?);
    Ok(())
}

/// GTM-SS allows several emails/phones; the event model keeps the first.
fn first_text(v: &Value) -> Option<String> {
    match v {
        Value::Array(list) => list.first().and_then(text),
        other => text(other),
    }
}

fn consent(ev: &mut Event, key: &str, v: &Value, at: &str) -> Result<(), ClientError> {
    let path = || format!("consent.{key}");
    let state = match v {
        Value::Null => return Ok(()),
        Value::Bool(true) => ConsentState::Granted,
        Value::Bool(false) => ConsentState::Denied,
        Value::String(s) if s.eq_ignore_ascii_case("granted") => ConsentState::Granted,
        Value::String(s) if s.eq_ignore_ascii_case("denied") => ConsentState::Denied,
        _ => return Err(bad(at, &path(), "must be \"granted\" or \"denied\"")),
    };
    let c = &mut ev.consent;
    let slot = match key {
        "ad_storage" => &mut c.ad_storage,
        "analytics_storage" => &mut c.analytics_storage,
        "ad_user_data" => &mut c.ad_user_data,
        "ad_personalization" => &mut c.ad_personalization,
        _ => {
            return Err(bad(
                at,
                &path(),
                "unknown consent signal (use ad_storage, analytics_storage, ad_user_data or ad_personalization)",
            ))
        }
    };
    *slot = state;
    Ok(())
}

fn items(v: &Value, at: &str) -> Result<Vec<Item>, ClientError> {
    let Value::Array(list) = v else {
        return Err(bad(at, "items", "must be an array of item objects"));
    };
    if list.len() > MAX_ITEMS {
        return Err(bad(
            at,
            "items",
            &format!("at most {MAX_ITEMS} items, got {}", list.len()),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (j, it) in list.iter().enumerate() {
        let Value::Object(o) = it else {
            return Err(bad(at, &format!("items[{j}]"), "must be an object"));
        };
        out.push(item_from(o, j, at)?);
    }
    Ok(out)
}

fn item_from(o: &Map<String, Value>, j: usize, at: &str) -> Result<Item, ClientError> {
    let mut it = Item::default();
    for (k, v) in o {
        let scalar = match v {
            Value::Null => continue,
            Value::String(s) => Scalar::Str(s),
            Value::Number(n) => Scalar::Num(n.as_f64().unwrap_or(f64::NAN)),
            Value::Bool(b) => Scalar::Bool(*b),
            _ => {
                return Err(bad(
                    at,
                    &format!("items[{j}].{k}"),
                    "must be a string or a number",
                ))
            }
        };
        item::set_item_field(&mut it, k, scalar)
            .map_err(|want| bad(at, &format!("items[{j}].{k}"), &format!("must be {want}")))?;
    }
    if !item::has_identity(&it) {
        return Err(bad(
            at,
            &format!("items[{j}]"),
            "needs item_id or item_name",
        ));
    }
    Ok(it)
}
