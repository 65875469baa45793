//! Generic HTTP tag: the event JSON to any URL (webhooks, anything without a tag yet).
//!
//! The body is the event exactly as the debug view shows it (the common event model's JSON):
//! one object per request with `batch_max = 1`, else an array. The receiver is the operator's
//! own endpoint, so nothing is filtered out.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use serde::Deserialize;

use crate::event::Event;
use crate::secret::EnvString;
use crate::tags::trigger::TriggerConfig;
use crate::tags::{Encoded, OutboundRequest, Outcome, Tag};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTagConfig {
    pub name: String,
    #[serde(default)]
    pub trigger: TriggerConfig,
    /// May contain `${ENV}` references (a secret webhook path or key); those parts are redacted.
    pub url: EnvString,
    #[serde(default = "default_method")]
    pub method: String,
    /// Header values may be `${ENV}` references; they are treated as secrets in the debug view.
    #[serde(default)]
    pub headers: BTreeMap<String, EnvString>,
    /// 1 = one request per event with the event object as body; >1 = JSON arrays.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_method() -> String {
    "POST".into()
}
fn default_batch_max() -> usize {
    1
}
fn default_timeout_ms() -> u64 {
    5_000
}

/// Upper bound on `batch_max`: keeps one request's body in the low megabytes.
pub const MAX_BATCH: usize = 1_000;

const METHODS: [&str; 4] = ["POST", "PUT", "PATCH", "GET"];

/// Headers the HTTP client manages itself; setting them by hand breaks framing.
const MANAGED_HEADERS: [&str; 4] = ["content-length", "host", "transfer-encoding", "connection"];

pub struct HttpTag {
    url: String,
    method: Method,
    headers: Vec<(String, String)>,
    /// Configured header values (and bare credentials inside them), longest first.
    secrets: Vec<String>,
    batch_max: usize,
    timeout_ms: u64,
}

/// Header values may be credentials, so `Debug` (and through it every `{:?}` of a pipeline)
/// shows header names only.
impl std::fmt::Debug for HttpTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("HttpTag")
            .field("url", &self.redact(&self.url))
            .field("method", &self.method)
            .field("headers", &names)
            .field("batch_max", &self.batch_max)
            .field("timeout_ms", &self.timeout_ms)
            .finish_non_exhaustive()
    }
}

impl HttpTag {
    pub fn from_config(cfg: &HttpTagConfig) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        if !is_http_url(&cfg.url.value) {
            problems.push(format!(
                "url: `{}` must be an http(s) URL such as \"https://hooks.example.com/events\"",
                cfg.url.redacted()
            ));
        }
        let method = cfg.method.to_ascii_uppercase();
        if !METHODS.contains(&method.as_str()) {
            problems.push(format!(
                "method: `{}` is not supported; use one of {}",
                cfg.method,
                METHODS.join(", ")
            ));
        }
        let mut headers = Vec::with_capacity(cfg.headers.len() + 1);
        if !cfg
            .headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case("content-type"))
        {
            headers.push(("Content-Type".to_owned(), "application/json".to_owned()));
        }
        let mut secrets = Vec::new();
        secrets.extend(
            cfg.url
                .substituted
                .iter()
                .filter(|s| !s.is_empty())
                .cloned(),
        );
        for (name, EnvString { value, .. }) in &cfg.headers {
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                problems.push(format!("headers.{name}: not a valid HTTP header name"));
                continue;
            }
            if MANAGED_HEADERS.iter().any(|m| name.eq_ignore_ascii_case(m)) {
                problems.push(format!("headers.{name}: set by tagrelay itself; remove it"));
                continue;
            }
            if HeaderValue::from_str(value).is_err() {
                // The value may be a secret: never echo it.
                problems.push(format!(
                    "headers.{name}: value is not a valid HTTP header value (line breaks or control characters?)"
                ));
                continue;
            }
            headers.push((name.clone(), value.clone()));
            if !value.is_empty() {
                secrets.push(value.clone());
                // `Bearer <token>`: the token alone can show up in logs too.
                if let Some((_, credential)) = value.split_once(' ') {
                    let credential = credential.trim();
                    if !credential.is_empty() {
                        secrets.push(credential.to_owned());
                    }
                }
            }
        }
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        if cfg.batch_max == 0 || cfg.batch_max > MAX_BATCH {
            problems.push(format!(
                "batch_max: must be between 1 and {MAX_BATCH}, got {}",
                cfg.batch_max
            ));
        }
        if cfg.timeout_ms == 0 {
            problems.push("timeout_ms: must be greater than 0".into());
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let method = Method::from_bytes(method.as_bytes()).map_err(|_| {
            vec![format!(
                "method: `{}` is not a valid HTTP method",
                cfg.method
            )]
        })?;
        Ok(HttpTag {
            url: cfg.url.value.clone(),
            method,
            headers,
            secrets,
            batch_max: cfg.batch_max,
            timeout_ms: cfg.timeout_ms,
        })
    }

    fn request(&self, body: Vec<u8>) -> OutboundRequest {
        OutboundRequest {
            method: self.method.clone(),
            url: self.url.clone(),
            headers: self.headers.clone(),
            body: Bytes::from(body),
        }
    }
}

/// The event as the receiver gets it: the event model, without the trace context of the hit
/// that took it (tagrelay's own bookkeeping, present only on traced hits' events).
fn write_event(e: &Event, out: &mut Vec<u8>) -> serde_json::Result<()> {
    if e.traceparent.is_none() {
        return serde_json::to_writer(out, e);
    }
    let untraced = Event {
        traceparent: None,
        ..e.clone()
    };
    serde_json::to_writer(out, &untraced)
}

fn is_http_url(raw: &str) -> bool {
    let Ok(uri) = raw.parse::<http::Uri>() else {
        return false;
    };
    matches!(uri.scheme_str(), Some("http") | Some("https"))
        && uri.host().is_some_and(|h| !h.is_empty())
}

impl Tag for HttpTag {
    fn kind(&self) -> &'static str {
        "http"
    }
    fn max_batch(&self) -> usize {
        self.batch_max
    }
    fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms)
    }
    fn encode_batch(&self, events: &[&Event], _now_ms: i64) -> Encoded {
        let mut out = Encoded::default();
        if self.batch_max <= 1 {
            for (i, e) in events.iter().enumerate() {
                let mut body = Vec::new();
                match write_event(e, &mut body) {
                    Ok(()) => out.requests.push((self.request(body), vec![i])),
                    Err(err) => out
                        .rejected
                        .push((i, format!("event cannot be written as JSON: {err}"))),
                }
            }
            return out;
        }
        let mut start = 0;
        while start < events.len() {
            let end = (start + self.batch_max).min(events.len());
            let mut body = Vec::with_capacity(512 * (end - start));
            body.push(b'[');
            let mut carried = Vec::with_capacity(end - start);
            for (i, e) in events.iter().enumerate().take(end).skip(start) {
                let mark = body.len();
                if !carried.is_empty() {
                    body.push(b',');
                }
                match write_event(e, &mut body) {
                    Ok(()) => carried.push(i),
                    Err(err) => {
                        body.truncate(mark);
                        out.rejected
                            .push((i, format!("event cannot be written as JSON: {err}")));
                    }
                }
            }
            body.push(b']');
            if !carried.is_empty() {
                out.requests.push((self.request(body), carried));
            }
            start = end;
        }
        out
    }
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Outcome {
        crate::tags::classify_http(status, headers, body)
    }
    fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "[redacted]");
            }
        }
        out
    }
}

impl crate::tags::TagSpec for HttpTagConfig {
    fn name(&self) -> &str {
        &self.name
    }
    fn trigger(&self) -> &TriggerConfig {
        &self.trigger
    }
    fn build(&self) -> Result<Box<dyn Tag>, Vec<String>> {
        HttpTag::from_config(self).map(|t| Box::new(t) as Box<dyn Tag>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn cfg() -> HttpTagConfig {
        HttpTagConfig {
            name: "hook".into(),
            trigger: TriggerConfig::default(),
            url: EnvString::plain("https://hooks.example.com/events?src=tagrelay"),
            method: default_method(),
            headers: BTreeMap::new(),
            batch_max: default_batch_max(),
            timeout_ms: default_timeout_ms(),
        }
    }

    #[test]
    fn env_parts_of_the_url_are_redacted() {
        let mut c = cfg();
        c.url = EnvString {
            value: "https://hooks.example.com/services/T0/XSECRETX".into(),
            substituted: vec!["XSECRETX".into()],
        };
        let tag = HttpTag::from_config(&c).unwrap();
        let enc = tag.encode(&events(1), 0);
        let url = &enc.requests[0].0.url;
        assert!(url.ends_with("/T0/XSECRETX"), "the real URL is sent: {url}");
        let shown = tag.redact(url);
        assert_eq!(shown, "https://hooks.example.com/services/T0/[redacted]");
        assert!(!format!("{tag:?} {c:?}").contains("XSECRETX"));
    }

    fn events(n: usize) -> Vec<Event> {
        (0..n)
            .map(|i| {
                let mut e = Event {
                    event_name: format!("ev_{i}"),
                    event_id: format!("id-{i}"),
                    timestamp_ms: 1_764_913_000_000 + i as i64,
                    client_id: Some("1234567890.1764912990".into()),
                    value: Some(12.5),
                    ..Default::default()
                };
                e.user_data.email_address = Some("jane@example.org".into());
                e.params.insert("coupon".into(), json!("SUMMER"));
                e
            })
            .collect()
    }

    fn body(r: &OutboundRequest) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn one_event_per_request_as_an_object() {
        let mut c = cfg();
        c.headers
            .insert("Authorization".into(), EnvString::plain("Bearer tok-123"));
        let t = HttpTag::from_config(&c).unwrap();
        let evs = events(2);
        let enc = t.encode(&evs, 0);
        assert!(enc.rejected.is_empty() && enc.skipped.is_empty());
        assert_eq!(enc.requests.len(), 2);
        for (n, (r, ix)) in enc.requests.iter().enumerate() {
            assert_eq!(ix, &vec![n]);
            assert_eq!(r.method, Method::POST);
            assert_eq!(r.url, "https://hooks.example.com/events?src=tagrelay");
            assert_eq!(
                r.headers,
                vec![
                    ("Content-Type".to_owned(), "application/json".to_owned()),
                    ("Authorization".to_owned(), "Bearer tok-123".to_owned()),
                ]
            );
            assert_eq!(body(r), serde_json::to_value(&evs[n]).unwrap());
        }
        // The receiver gets the whole event model, round-trippable.
        let back: Event = serde_json::from_slice(&enc.requests[1].0.body).unwrap();
        assert_eq!(back, evs[1]);
        assert_eq!(
            body(&enc.requests[0].0)["user_data"]["email_address"],
            "jane@example.org"
        );
    }

    #[test]
    fn the_hit_trace_context_is_not_sent() {
        let mut evs = events(2);
        evs[0].traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        for batch_max in [1, 5] {
            let t = HttpTag::from_config(&HttpTagConfig { batch_max, ..cfg() }).unwrap();
            for (r, _) in t.encode(&evs, 0).requests {
                let text = String::from_utf8(r.body.to_vec()).unwrap();
                assert!(!text.contains("traceparent"), "{text}");
                assert!(text.contains("ev_0") || text.contains("ev_1"), "{text}");
            }
        }
    }

    #[test]
    fn batches_as_json_arrays() {
        let c = HttpTagConfig {
            batch_max: 3,
            method: "put".into(),
            ..cfg()
        };
        let t = HttpTag::from_config(&c).unwrap();
        assert_eq!(t.max_batch(), 3);
        let evs = events(7);
        let enc = t.encode(&evs, 0);
        let sets: Vec<Vec<usize>> = enc.requests.iter().map(|(_, ix)| ix.clone()).collect();
        assert_eq!(sets, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        for (r, ix) in &enc.requests {
            assert_eq!(r.method, Method::PUT);
            let want: Vec<Value> = ix
                .iter()
                .map(|&i| serde_json::to_value(&evs[i]).unwrap())
                .collect();
            assert_eq!(body(r), Value::Array(want));
        }
        assert!(t.encode(&[], 0).requests.is_empty());
    }

    #[test]
    fn configured_content_type_wins() {
        let mut c = cfg();
        c.headers.insert(
            "content-type".into(),
            EnvString::plain("application/vnd.acme+json"),
        );
        let t = HttpTag::from_config(&c).unwrap();
        let enc = t.encode(&events(1), 0);
        assert_eq!(
            enc.requests[0].0.headers,
            vec![(
                "content-type".to_owned(),
                "application/vnd.acme+json".to_owned()
            )]
        );
    }

    #[test]
    fn redact_hides_every_header_value() {
        let mut c = cfg();
        c.headers
            .insert("Authorization".into(), EnvString::plain("Bearer tok-123"));
        c.headers
            .insert("X-Api-Key".into(), EnvString::plain("k3y-abc"));
        let t = HttpTag::from_config(&c).unwrap();
        assert_eq!(
            t.redact("Authorization: Bearer tok-123; X-Api-Key: k3y-abc; leaked tok-123"),
            "Authorization: [redacted]; X-Api-Key: [redacted]; leaked [redacted]"
        );
        assert_eq!(t.redact("nothing here"), "nothing here");
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("tok-123") && !dbg.contains("k3y"), "{dbg}");
        assert!(dbg.contains("X-Api-Key"), "{dbg}");
    }

    #[test]
    fn build_errors_name_the_key() {
        let mut c = HttpTagConfig {
            url: EnvString::plain("hooks.example.com/events"),
            method: "DELETE".into(),
            batch_max: 0,
            timeout_ms: 0,
            ..cfg()
        };
        c.headers.insert("Bad Name".into(), EnvString::plain("x"));
        c.headers
            .insert("X-Token".into(), EnvString::plain("secret\nvalue"));
        c.headers
            .insert("Host".into(), EnvString::plain("evil.example"));
        let errs = HttpTag::from_config(&c).unwrap_err();
        assert_eq!(
            errs,
            vec![
                "url: `hooks.example.com/events` must be an http(s) URL such as \"https://hooks.example.com/events\"".to_owned(),
                "method: `DELETE` is not supported; use one of POST, PUT, PATCH, GET".to_owned(),
                "headers.Bad Name: not a valid HTTP header name".to_owned(),
                "headers.Host: set by tagrelay itself; remove it".to_owned(),
                "headers.X-Token: value is not a valid HTTP header value (line breaks or control characters?)".to_owned(),
                "batch_max: must be between 1 and 1000, got 0".to_owned(),
                "timeout_ms: must be greater than 0".to_owned(),
            ]
        );
        assert!(errs.iter().all(|e| !e.contains("secret")));
        for url in ["ftp://x.example/a", "https://", "/relative"] {
            let c = HttpTagConfig {
                url: EnvString::plain(url),
                ..cfg()
            };
            assert!(HttpTag::from_config(&c).is_err(), "{url}");
        }
        for m in ["post", "GET", "Patch"] {
            let c = HttpTagConfig {
                method: m.into(),
                ..cfg()
            };
            assert!(HttpTag::from_config(&c).is_ok(), "{m}");
        }
    }

    #[test]
    fn classify_uses_http_rules() {
        let t = HttpTag::from_config(&cfg()).unwrap();
        let h = HeaderMap::new();
        assert_eq!(t.classify(StatusCode::OK, &h, b""), Outcome::Delivered);
        assert!(matches!(
            t.classify(StatusCode::TOO_MANY_REQUESTS, &h, b""),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            t.classify(StatusCode::UNPROCESSABLE_ENTITY, &h, b"bad"),
            Outcome::Rejected { .. }
        ));
    }
}
