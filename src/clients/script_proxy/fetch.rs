//! The upstream request: one shared HTTP client, a fixed set of outgoing headers (nothing from
//! the browser but the negotiated encoding), bounded time and size.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, LAST_MODIFIED,
};
use http::{HeaderValue, StatusCode};

use super::cache::Entry;
use super::Encoding;

const USER_AGENT: &str = concat!("tagrelay/", env!("CARGO_PKG_VERSION"));
const DEFAULT_CONTENT_TYPE: &str = "application/javascript";

/// Per-proxy limits for an upstream request.
#[derive(Debug, Clone, Copy)]
pub struct FetchSpec {
    pub timeout: Duration,
    pub max_bytes: usize,
}

pub enum Fetched {
    Full(Arc<Entry>),
    /// The upstream confirmed the cached entry (`304` to our conditional request).
    NotModified,
}

/// One client for every proxy: connection pooling across scripts and reloads. Redirects are
/// not followed, because a redirect could lead off the upstream allow-list; a `3xx` is a
/// failure whose reason tells the operator to configure the final URL.
fn client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(USER_AGENT)
                .connect_timeout(Duration::from_secs(5))
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(8)
                .build()
                .map_err(|e| format!("cannot build the upstream HTTP client: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Fetches `url`; with `prior`, conditionally (its validators), so an unchanged script costs
/// a `304` and no body.
pub async fn fetch(
    spec: FetchSpec,
    url: &str,
    enc: Encoding,
    prior: Option<&Entry>,
) -> Result<Fetched, String> {
    let mut req = client()?
        .get(url)
        .timeout(spec.timeout)
        .header(ACCEPT_ENCODING, enc.upstream_value());
    if let Some(p) = prior {
        if let Some(v) = &p.upstream_etag {
            req = req.header(IF_NONE_MATCH, v.clone());
        }
        if let Some(v) = &p.upstream_last_modified {
            req = req.header(IF_MODIFIED_SINCE, v.clone());
        }
    }
    let mut resp = req.send().await.map_err(|e| describe(&e, spec))?;
    let status = resp.status();
    if status == StatusCode::NOT_MODIFIED && prior.is_some() {
        return Ok(Fetched::NotModified);
    }
    if status.is_redirection() {
        return Err(format!(
            "upstream redirected ({status}); configure the final URL as `upstream`"
        ));
    }
    if status != StatusCode::OK {
        return Err(format!("upstream answered {status}"));
    }
    let headers = resp.headers();
    let content_encoding = match headers.get(CONTENT_ENCODING) {
        None => None,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"identity") => None,
        Some(v) if enc.allows(v.as_bytes()) => Some(v.clone()),
        Some(v) => {
            return Err(format!(
                "upstream sent content-encoding `{}`, which was not asked for",
                String::from_utf8_lossy(v.as_bytes())
            ))
        }
    };
    let content_type = headers
        .get(CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static(DEFAULT_CONTENT_TYPE));
    let upstream_etag = headers.get(ETAG).cloned();
    let upstream_last_modified = headers.get(LAST_MODIFIED).cloned();
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || format!("upstream script is larger than {} bytes", spec.max_bytes);
    if declared.is_some_and(|n| n > spec.max_bytes as u64) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(declared.map_or(64 << 10, |n| n as usize));
    while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e, spec))? {
        if body.len() + chunk.len() > spec.max_bytes {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    let body = Bytes::from(body);
    Ok(Fetched::Full(Arc::new(Entry {
        etag: crate::clients::etag_of(&body),
        body,
        content_type,
        content_encoding,
        upstream_etag,
        upstream_last_modified,
        fetched_at: Instant::now(),
    })))
}

/// Why a request to the upstream failed, in words for the `502` and the log.
fn describe(e: &reqwest::Error, spec: FetchSpec) -> String {
    if e.is_timeout() {
        format!(
            "upstream did not answer within {} ms",
            spec.timeout.as_millis()
        )
    } else if e.is_connect() {
        "cannot connect to upstream".into()
    } else if e.is_body() || e.is_decode() {
        "upstream response body was cut off".into()
    } else {
        "upstream request failed".into()
    }
}
