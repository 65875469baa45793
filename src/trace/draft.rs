//! A trace while its hit is served: the pipeline adds the events, cookies and trigger
//! decisions, the listener the request body and, once answered, the HTTP facts.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;

use super::{
    redact_query, shorten_cookie_header, truncate, ItpNote, TagTrace, Trace, MAX_BODY_CHARS,
};
use crate::event::Event;
use crate::set_cookie::CookieDecision;

/// What the hit path learns for the debug view, filled only when the hit is traced.
#[derive(Debug, Default)]
pub struct TraceDraft {
    pub body: Bytes,
    pub events: Vec<Arc<Event>>,
    /// The events' stored size (see [`Trace::events_bytes`]).
    pub events_bytes: usize,
    pub cookies: Vec<CookieDecision>,
    pub tags: Vec<TagTrace>,
    pub itp: Option<ItpNote>,
}

/// How the hit was received and answered.
#[derive(Debug)]
pub struct Served<'a> {
    pub request: &'a http::request::Parts,
    pub client_ip: IpAddr,
    pub host: &'a str,
    /// The client that claimed the hit, if one did.
    pub client: Option<&'static str>,
    pub debug_marker: Option<&'a str>,
    pub status: u16,
    /// The reason given with an error answer.
    pub error: Option<String>,
    pub elapsed: Duration,
}

/// Headers whose values a trace never shows.
const SECRET_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "x-api-key"];

impl TraceDraft {
    pub fn finish(self, served: Served<'_>) -> Trace {
        let parts = served.request;
        let (body, body_truncated) = truncate(&String::from_utf8_lossy(&self.body), MAX_BODY_CHARS);
        let headers = parts
            .headers
            .iter()
            .map(|(k, v)| {
                let v = String::from_utf8_lossy(v.as_bytes());
                let v = if k == header::COOKIE {
                    shorten_cookie_header(&v)
                } else if SECRET_HEADERS.contains(&k.as_str()) {
                    "[redacted]".to_owned()
                } else {
                    v.into_owned()
                };
                (k.as_str().to_owned(), v)
            })
            .collect();
        Trace {
            id: uuid::Uuid::now_v7().to_string(),
            time_ms: crate::clock::now_ms(),
            method: parts.method.to_string(),
            scheme: parts
                .headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .filter(|v| matches!(*v, "http" | "https"))
                .unwrap_or("http")
                .to_owned(),
            path: parts.uri.path().to_owned(),
            query: redact_query(parts.uri.query().unwrap_or("")),
            body,
            body_truncated,
            headers,
            client_ip: served.client_ip.to_string(),
            host: served.host.to_owned(),
            client: served.client,
            status: served.status,
            error: served.error,
            debug_marker: served.debug_marker.map(str::to_owned),
            latency_us: served.elapsed.as_micros() as u64,
            events: self.events,
            cookies: self.cookies,
            tags: self.tags,
            itp: self.itp,
            events_bytes: self.events_bytes,
        }
    }
}
