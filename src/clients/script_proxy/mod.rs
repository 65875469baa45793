//! First-party script serving: vendor scripts (gtag.js, gtm.js, fbevents.js, …) fetched from
//! a fixed upstream and served from the site's own tagging host, so blockers and ITP treat
//! them as first-party.
//!
//! Not a `Client`: clients are pure request → events parsers, and this does network I/O. The
//! ingress asks `Pipeline::script_proxies` before the event clients.
//!
//! The gateway must never become an open proxy: the upstream URL is fixed per proxy in the
//! config, its host must be on an allow-list, and only allow-listed query parameters pass.
//! Nothing identifying from the browser (cookies, IP, User-Agent, Referer) goes upstream.
//!
//! Compression: the cache keeps one entry per encoding variant the browser can take (the key
//! carries the variant) and serves the upstream's bytes as they came. The alternative, fetching
//! gzip once and decompressing for browsers without gzip, needs a compression crate and CPU
//! per request for a case no current browser hits; variants cost at most a few copies of a
//! script, in practice one or two, since every current browser sends `gzip, br`.

pub mod cache;
mod fetch;

impl crate::clients::ClientSpec for ScriptProxyConfig {
    fn build(&self) -> Result<crate::clients::BuiltClient, Vec<String>> {
        ScriptProxy::from_config(self).map(crate::clients::BuiltClient::ScriptProxy)
    }
}

#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::header::{
    ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG, VARY,
};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;

pub use cache::ScriptCache;
use cache::{Entry, Slot};
use fetch::{FetchSpec, Fetched};

/// Upstream hosts a script proxy may fetch from without `allowed_upstream_hosts`.
pub const DEFAULT_UPSTREAM_HOSTS: &[&str] = &[
    "www.googletagmanager.com",
    "www.google-analytics.com",
    "connect.facebook.net",
    "googletagmanager.com",
];

/// Largest `max_bytes` accepted: one script must fit the cache many times over.
const MAX_BYTES_LIMIT: usize = 16 << 20;
/// Longest query string passed upstream; longer requests are refused (keys stay small).
const MAX_QUERY_BYTES: usize = 2048;
/// Browsers may keep a copy at least this long, even when it is served stale.
const MIN_MAX_AGE_SECS: u64 = 60;
const CACHE_HEADER: &str = "x-tagrelay-cache";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptProxyConfig {
    /// Where the script is served (after `server.path_prefix`).
    pub path: String,
    /// Fixed upstream URL; never taken from the request.
    pub upstream: String,
    /// Query parameters passed upstream (as received); all others are dropped.
    #[serde(default)]
    pub allowed_query: Vec<String>,
    /// Fresh for this long, then served stale while revalidated in the background.
    #[serde(default = "default_ttl")]
    pub cache_ttl_secs: u64,
    /// How long past freshness a cached copy may still be served while the upstream fails.
    #[serde(default = "default_stale_if_error")]
    pub stale_if_error_secs: u64,
    /// Whole upstream request, connect to last byte.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Larger upstream responses are refused (502).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Hosts added to `DEFAULT_UPSTREAM_HOSTS`.
    #[serde(default)]
    pub allowed_upstream_hosts: Vec<String>,
}

fn default_ttl() -> u64 {
    3600
}
fn default_stale_if_error() -> u64 {
    86_400
}
fn default_timeout() -> u64 {
    3000
}
fn default_max_bytes() -> usize {
    2 << 20
}

/// One served script.
#[derive(Debug)]
pub struct ScriptProxy {
    path: String,
    /// Normalised upstream URL.
    upstream: String,
    allowed_query: Vec<String>,
    ttl: Duration,
    stale_if_error: Duration,
    spec: FetchSpec,
}

/// How a request was answered, for `x-tagrelay-cache` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Hit,
    Miss,
    Stale,
    Revalidated,
}

impl Outcome {
    fn header(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Stale => "STALE",
            Outcome::Revalidated => "REVALIDATED",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Revalidated => "revalidated",
        }
    }
}

/// The encodings asked of the upstream, from what the browser accepts. Part of the cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    BrGzip,
    Br,
    Gzip,
    Identity,
}

impl Encoding {
    /// Reads `Accept-Encoding` (q-values honoured; `q=0` refuses). `*` counts as gzip only,
    /// the conservative reading.
    pub fn negotiate(headers: &HeaderMap) -> Encoding {
        let (mut br, mut gzip) = (false, false);
        for value in headers.get_all(ACCEPT_ENCODING) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let mut parts = item.split(';');
                let name = parts.next().unwrap_or("").trim();
                let refused = parts.any(|p| {
                    let p = p.trim();
                    p.strip_prefix("q=")
                        .or_else(|| p.strip_prefix("Q="))
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                if refused {
                    continue;
                }
                if name.eq_ignore_ascii_case("br") {
                    br = true;
                } else if name.eq_ignore_ascii_case("gzip")
                    || name.eq_ignore_ascii_case("x-gzip")
                    || name == "*"
                {
                    gzip = true;
                }
            }
        }
        match (br, gzip) {
            (true, true) => Encoding::BrGzip,
            (true, false) => Encoding::Br,
            (false, true) => Encoding::Gzip,
            (false, false) => Encoding::Identity,
        }
    }

    fn key(self) -> &'static str {
        match self {
            Encoding::BrGzip => "br+gzip",
            Encoding::Br => "br",
            Encoding::Gzip => "gzip",
            Encoding::Identity => "identity",
        }
    }

    fn upstream_value(self) -> &'static str {
        match self {
            Encoding::BrGzip => "br, gzip",
            Encoding::Br => "br",
            Encoding::Gzip => "gzip",
            Encoding::Identity => "identity",
        }
    }

    /// Whether an upstream `Content-Encoding` is one this variant asked for.
    fn allows(self, coding: &[u8]) -> bool {
        let br = coding.eq_ignore_ascii_case(b"br");
        let gzip = coding.eq_ignore_ascii_case(b"gzip") || coding.eq_ignore_ascii_case(b"x-gzip");
        match self {
            Encoding::BrGzip => br || gzip,
            Encoding::Br => br,
            Encoding::Gzip => gzip,
            Encoding::Identity => false,
        }
    }
}

impl ScriptProxy {
    /// Validates a `type = "script_proxy"` client. Problems are phrased `key: message`.
    pub fn from_config(cfg: &ScriptProxyConfig) -> Result<ScriptProxy, Vec<String>> {
        let mut problems = Vec::new();
        if !cfg.path.starts_with('/') || cfg.path.contains(['?', '#']) || cfg.path.len() < 2 {
            problems.push(format!(
                "path: `{}` must be a path like \"/lib/gt.js\" (starts with `/`, no query)",
                cfg.path
            ));
        }
        let mut hosts: Vec<String> = DEFAULT_UPSTREAM_HOSTS
            .iter()
            .map(|h| (*h).to_owned())
            .collect();
        for h in &cfg.allowed_upstream_hosts {
            let bad_char = h
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '/' | '@' | '?' | '#'));
            let has_port = !h.starts_with('[') && h.contains(':');
            if h.is_empty() || bad_char || has_port {
                problems.push(format!(
                    "allowed_upstream_hosts: `{h}` must be a bare host name like \"cdn.example.com\" (no scheme, port or path)"
                ));
            } else {
                hosts.push(h.to_ascii_lowercase());
            }
        }
        let upstream = match reqwest::Url::parse(&cfg.upstream) {
            Err(e) => {
                problems.push(format!(
                    "upstream: `{}` is not a URL ({e}); use e.g. \"https://www.googletagmanager.com/gtag/js\"",
                    cfg.upstream
                ));
                None
            }
            Ok(url) => check_upstream(&url, &hosts, &mut problems).then(|| url.to_string()),
        };
        for q in &cfg.allowed_query {
            if q.is_empty() || q.contains(['&', '=', '#', ' ']) {
                problems.push(format!(
                    "allowed_query: `{q}` must be a query parameter name like \"id\""
                ));
            }
        }
        if cfg.cache_ttl_secs == 0 {
            problems.push("cache_ttl_secs: must be greater than 0".into());
        }
        if cfg.timeout_ms == 0 {
            problems.push("timeout_ms: must be greater than 0".into());
        }
        if cfg.max_bytes == 0 || cfg.max_bytes > MAX_BYTES_LIMIT {
            problems.push(format!(
                "max_bytes: {} must be between 1 and {MAX_BYTES_LIMIT}",
                cfg.max_bytes
            ));
        }
        match upstream {
            Some(upstream) if problems.is_empty() => Ok(ScriptProxy {
                path: cfg.path.clone(),
                upstream,
                allowed_query: cfg.allowed_query.clone(),
                ttl: Duration::from_secs(cfg.cache_ttl_secs),
                stale_if_error: Duration::from_secs(cfg.stale_if_error_secs),
                spec: FetchSpec {
                    timeout: Duration::from_millis(cfg.timeout_ms),
                    max_bytes: cfg.max_bytes,
                },
            }),
            _ => Err(problems),
        }
    }

    /// The path this proxy serves (after `server.path_prefix`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Answers a `GET`/`HEAD` for this proxy's path: from the cache when it can, else from the
    /// upstream (one fetch per key at a time, shared by every waiting request).
    pub async fn serve(&self, cache: &Arc<ScriptCache>, parts: &http::request::Parts) -> Response {
        let Some(url) = self.upstream_url(parts.uri.query().unwrap_or("")) else {
            count("rejected");
            return reason(
                StatusCode::URI_TOO_LONG,
                "query string too long for the script upstream",
            );
        };
        let enc = Encoding::negotiate(&parts.headers);
        // A space never occurs in a URL, so the key is unambiguous.
        let key = format!("{url} {}", enc.key());
        match self.lookup(cache, &key, &url, enc).await {
            Ok((entry, outcome)) => {
                count(outcome.label());
                self.respond(parts, &entry, outcome)
            }
            Err(why) => {
                count("error");
                reason(
                    StatusCode::BAD_GATEWAY,
                    &format!("script upstream unavailable: {why}"),
                )
            }
        }
    }

    /// The upstream URL for a request: the configured upstream plus the allowed parameters,
    /// in `allowed_query` order (canonical, so parameter order does not split the cache),
    /// each passed percent-encoded as received. `None` when the result would be too long.
    fn upstream_url(&self, query: &str) -> Option<String> {
        if self.allowed_query.is_empty() || query.is_empty() {
            return Some(self.upstream.clone());
        }
        let mut kept: Vec<(usize, &str)> = Vec::new();
        let mut len = 0;
        for seg in query.split('&') {
            let raw_name = seg.split('=').next().unwrap_or("");
            let name = crate::urlenc::decode(raw_name);
            if let Some(i) = self.allowed_query.iter().position(|a| *a == name) {
                len += seg.len() + 1;
                if len > MAX_QUERY_BYTES {
                    return None;
                }
                kept.push((i, seg));
            }
        }
        if kept.is_empty() {
            return Some(self.upstream.clone());
        }
        kept.sort_by_key(|(i, _)| *i);
        let mut url = String::with_capacity(self.upstream.len() + len + 1);
        url.push_str(&self.upstream);
        let mut sep = if self.upstream.contains('?') {
            '&'
        } else {
            '?'
        };
        for (_, seg) in kept {
            url.push(sep);
            url.push_str(seg);
            sep = '&';
        }
        Some(url)
    }

    fn usable(&self, e: &Entry) -> bool {
        e.fetched_at.elapsed() < self.ttl + self.stale_if_error
    }

    fn is_fresh(&self, e: &Entry) -> bool {
        e.fetched_at.elapsed() < self.ttl
    }

    /// Fresh → hit. Stale but within `stale_if_error_secs` → served at once while a background
    /// task revalidates (stale-while-revalidate). Missing or older → fetched now, under the
    /// slot's fetch lock; requests that queued behind the fetch take its result.
    async fn lookup(
        &self,
        cache: &Arc<ScriptCache>,
        key: &str,
        url: &str,
        enc: Encoding,
    ) -> Result<(Arc<Entry>, Outcome), Arc<str>> {
        let slot = cache.slot(key);
        // Read before the entry so a fetch finishing in between is seen one way or the other.
        let generation = slot.generation();
        if let Some(e) = slot.entry() {
            if self.is_fresh(&e) {
                return Ok((e, Outcome::Hit));
            }
            if self.usable(&e) {
                self.revalidate_in_background(cache, key, &slot, url, enc);
                return Ok((e, Outcome::Stale));
            }
        }
        let _fetching = slot.lock_fetch().await;
        if slot.generation() != generation {
            // Another request fetched while this one waited: its result is ours. Served from
            // memory, so it counts as a hit.
            return match slot.entry() {
                Some(e) if self.is_fresh(&e) => Ok((e, Outcome::Hit)),
                Some(e) if self.usable(&e) => Ok((e, Outcome::Stale)),
                _ => Err(slot.last_failure()),
            };
        }
        let prior = slot.entry();
        match fetch::fetch(self.spec, url, enc, prior.as_deref()).await {
            Ok(Fetched::Full(entry)) => {
                fetched("ok");
                cache.store(key, &slot, entry.clone());
                Ok((entry, Outcome::Miss))
            }
            Ok(Fetched::NotModified) => {
                fetched("not_modified");
                let Some(prior) = prior else {
                    // fetch() reports 304 only to a conditional request, which needs a prior.
                    cache.fail(
                        key,
                        &slot,
                        "upstream answered 304 to an unconditional request",
                    );
                    return Err(slot.last_failure());
                };
                let entry = Arc::new(prior.refreshed());
                cache.store(key, &slot, entry.clone());
                Ok((entry, Outcome::Revalidated))
            }
            Err(why) => {
                fetched("error");
                tracing::warn!(upstream = %self.upstream, reason = %why, "script fetch failed");
                cache.fail(key, &slot, &why);
                match prior {
                    Some(e) if self.usable(&e) => Ok((e, Outcome::Stale)),
                    _ => Err(Arc::from(why)),
                }
            }
        }
    }

    fn revalidate_in_background(
        &self,
        cache: &Arc<ScriptCache>,
        key: &str,
        slot: &Arc<Slot>,
        url: &str,
        enc: Encoding,
    ) {
        if !slot.begin_revalidation() {
            return;
        }
        let (cache, slot) = (cache.clone(), slot.clone());
        let (key, url) = (key.to_owned(), url.to_owned());
        let (spec, ttl) = (self.spec, self.ttl);
        tokio::spawn(async move {
            let _fetching = slot.lock_fetch().await;
            let prior = slot.entry();
            // A request may have refreshed the entry while this task waited for the lock.
            if prior.as_ref().is_some_and(|e| e.fetched_at.elapsed() < ttl) {
                slot.end_revalidation();
                return;
            }
            match fetch::fetch(spec, &url, enc, prior.as_deref()).await {
                Ok(Fetched::Full(entry)) => {
                    fetched("ok");
                    cache.store(&key, &slot, entry);
                }
                Ok(Fetched::NotModified) => {
                    fetched("not_modified");
                    if let Some(p) = prior {
                        cache.store(&key, &slot, Arc::new(p.refreshed()));
                    }
                }
                Err(why) => {
                    fetched("error");
                    tracing::warn!(upstream = %url, reason = %why, "script revalidation failed; serving the cached copy");
                    cache.fail(&key, &slot, &why);
                }
            }
            slot.end_revalidation();
        });
    }

    fn respond(&self, parts: &http::request::Parts, entry: &Entry, outcome: Outcome) -> Response {
        let remaining = self.ttl.saturating_sub(entry.fetched_at.elapsed());
        let max_age = remaining.as_secs().max(MIN_MAX_AGE_SECS);
        let mut headers = HeaderMap::with_capacity(8);
        headers.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
        if let Ok(v) = HeaderValue::from_str(&format!("public, max-age={max_age}")) {
            headers.insert(CACHE_CONTROL, v);
        }
        headers.insert(ETAG, entry.etag.clone());
        headers.insert(CACHE_HEADER, HeaderValue::from_static(outcome.header()));
        if crate::clients::etag_matches(&parts.headers, &entry.etag) {
            return (StatusCode::NOT_MODIFIED, headers).into_response();
        }
        headers.insert(CONTENT_TYPE, entry.content_type.clone());
        if let Some(ce) = &entry.content_encoding {
            headers.insert(CONTENT_ENCODING, ce.clone());
        }
        headers.insert(CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
        // The body goes along for HEAD too (a refcount, not a copy): hyper skips writing it
        // but keeps the length, so HEAD answers with the same headers as GET.
        (StatusCode::OK, headers, Body::from(entry.body.clone())).into_response()
    }
}

/// Only https, except plain http to a loopback test server; host on the allow-list; no
/// credentials or fragment.
fn check_upstream(url: &reqwest::Url, hosts: &[String], problems: &mut Vec<String>) -> bool {
    let before = problems.len();
    let host = url.host_str().unwrap_or("").to_ascii_lowercase();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => problems.push(format!(
            "upstream: `{url}` must be an https:// URL (plain http only for a loopback test server)"
        )),
    }
    if host.is_empty() {
        problems.push(format!("upstream: `{url}` has no host"));
    } else if !hosts.contains(&host) {
        problems.push(format!(
            "upstream: host `{host}` is not on the upstream allow-list ({}); add it to allowed_upstream_hosts if you trust it",
            hosts.join(", ")
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        problems.push("upstream: must not contain credentials".into());
    }
    if url.fragment().is_some() {
        problems.push("upstream: must not contain a `#fragment`".into());
    }
    problems.len() == before
}

/// An error answer that no cache may keep.
fn reason(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        format!("{text}\n"),
    )
        .into_response()
}

fn count(result: &'static str) {
    metrics::counter!("tagrelay_script_proxy_requests_total", "result" => result).increment(1);
}

fn fetched(result: &'static str) {
    metrics::counter!("tagrelay_script_proxy_upstream_fetches_total", "result" => result)
        .increment(1);
}
