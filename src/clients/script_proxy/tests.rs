use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, IF_NONE_MATCH};
use http::{HeaderMap, HeaderValue};

use super::cache::{Entry, ScriptCache};
use super::*;
use crate::clients::{etag_matches, etag_of};

fn cfg(upstream: &str) -> ScriptProxyConfig {
    ScriptProxyConfig {
        path: "/lib/gt.js".into(),
        upstream: upstream.into(),
        allowed_query: vec!["id".into(), "l".into()],
        cache_ttl_secs: 3600,
        stale_if_error_secs: 86_400,
        timeout_ms: 3000,
        max_bytes: 2 << 20,
        allowed_upstream_hosts: Vec::new(),
    }
}

fn problems(c: &ScriptProxyConfig) -> Vec<String> {
    match ScriptProxy::from_config(c) {
        Ok(_) => Vec::new(),
        Err(p) => p,
    }
}

fn proxy(c: &ScriptProxyConfig) -> ScriptProxy {
    match ScriptProxy::from_config(c) {
        Ok(p) => p,
        Err(p) => panic!("config rejected: {p:?}"),
    }
}

#[test]
fn default_hosts_are_accepted() {
    for url in [
        "https://www.googletagmanager.com/gtag/js",
        "https://www.googletagmanager.com/gtm.js",
        "https://connect.facebook.net/en_US/fbevents.js",
        "https://www.google-analytics.com/analytics.js",
        "https://googletagmanager.com/gtag/js",
        "https://WWW.GoogleTagManager.com/gtag/js",
    ] {
        assert_eq!(problems(&cfg(url)), Vec::<String>::new(), "{url}");
    }
}

#[test]
fn host_off_the_allow_list_is_a_config_error_naming_upstream() {
    let p = problems(&cfg("https://evil.example.com/x.js"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("upstream: "), "{p:?}");
    assert!(p[0].contains("evil.example.com"), "{p:?}");
    assert!(p[0].contains("allowed_upstream_hosts"), "{p:?}");
    // Look-alikes are not on the list either.
    for url in [
        "https://www.googletagmanager.com.evil.net/gtag/js",
        "https://evilgoogletagmanager.com/gtag/js",
        "https://127.0.0.1/gtag/js",
    ] {
        let p = problems(&cfg(url));
        assert!(
            p.iter().any(|m| m.starts_with("upstream: host")),
            "{url}: {p:?}"
        );
    }
}

#[test]
fn allowed_upstream_hosts_extends_the_list() {
    let mut c = cfg("https://cdn.example.com/s.js");
    c.allowed_upstream_hosts = vec!["CDN.example.com".into()];
    assert_eq!(problems(&c), Vec::<String>::new());
    // The defaults stay allowed.
    c.upstream = "https://connect.facebook.net/en_US/fbevents.js".into();
    assert_eq!(problems(&c), Vec::<String>::new());
    for bad in ["https://cdn.example.com", "cdn.example.com:443", "", "a/b"] {
        c.allowed_upstream_hosts = vec![bad.into()];
        let p = problems(&c);
        assert!(
            p.iter().any(|m| m.starts_with("allowed_upstream_hosts: ")),
            "{bad}: {p:?}"
        );
    }
}

#[test]
fn plain_http_only_to_loopback() {
    let mut c = cfg("http://127.0.0.1:9999/gtag/js");
    c.allowed_upstream_hosts = vec!["127.0.0.1".into()];
    assert_eq!(problems(&c), Vec::<String>::new());
    let mut c = cfg("http://www.googletagmanager.com/gtag/js");
    c.allowed_upstream_hosts = Vec::new();
    let p = problems(&c);
    assert!(p.iter().any(|m| m.contains("https://")), "{p:?}");
    let p = problems(&cfg("ftp://www.googletagmanager.com/gtag/js"));
    assert!(p.iter().any(|m| m.starts_with("upstream: ")), "{p:?}");
}

#[test]
fn bad_values_name_their_keys() {
    let mut c = cfg("not a url");
    c.path = "lib.js".into();
    c.allowed_query = vec!["a=b".into()];
    c.cache_ttl_secs = 0;
    c.timeout_ms = 0;
    c.max_bytes = 100 << 20;
    let p = problems(&c);
    for key in [
        "path: ",
        "upstream: ",
        "allowed_query: ",
        "cache_ttl_secs: ",
        "timeout_ms: ",
        "max_bytes: ",
    ] {
        assert!(p.iter().any(|m| m.starts_with(key)), "{key}: {p:?}");
    }
    let mut c = cfg("https://user:pw@www.googletagmanager.com/gtag/js#x");
    c.path = "/a?b".into();
    let p = problems(&c);
    assert!(p.iter().any(|m| m.contains("credentials")), "{p:?}");
    assert!(p.iter().any(|m| m.contains("fragment")), "{p:?}");
    assert!(p.iter().any(|m| m.starts_with("path: ")), "{p:?}");
}

#[test]
fn config_defaults_and_unknown_keys() {
    let c: ScriptProxyConfig =
        toml::from_str("path = \"/s.js\"\nupstream = \"https://connect.facebook.net/x.js\"")
            .unwrap();
    assert_eq!(c.cache_ttl_secs, 3600);
    assert_eq!(c.stale_if_error_secs, 86_400);
    assert_eq!(c.timeout_ms, 3000);
    assert_eq!(c.max_bytes, 2 * 1024 * 1024);
    assert!(c.allowed_query.is_empty() && c.allowed_upstream_hosts.is_empty());
    let e = toml::from_str::<ScriptProxyConfig>(
        "path = \"/s.js\"\nupstream = \"https://connect.facebook.net/x.js\"\nttl = 5",
    )
    .unwrap_err();
    assert!(e.to_string().contains("ttl"), "{e}");
    assert!(toml::from_str::<ScriptProxyConfig>("path = \"/s.js\"").is_err());
}

#[test]
fn type_script_proxy_is_a_registered_client() {
    let text = r#"
[[clients]]
type = "script_proxy"
path = "/lib/gt.js"
upstream = "https://www.googletagmanager.com/gtag/js"
allowed_query = ["id"]

[[clients]]
type = "script_proxy"
path = "/lib/gt.js"
upstream = "https://www.googletagmanager.com/gtm.js"
"#;
    let config = crate::config::load_str(text, "t.toml", false).unwrap();
    assert_eq!(config.clients[0].kind(), "script_proxy");
    let p = crate::pipeline::Pipeline::build(&config).unwrap_err();
    assert_eq!(
        p,
        vec!["clients[1] (type script_proxy): path: `/lib/gt.js` is already served by clients[0]"]
    );

    let text = r#"
[[clients]]
type = "ga4"

[[clients]]
type = "script_proxy"
path = "/lib/gt.js"
upstream = "https://evil.example.com/gtag/js"
"#;
    let config = crate::config::load_str(text, "t.toml", false).unwrap();
    let p = crate::pipeline::Pipeline::build(&config).unwrap_err();
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("clients[1] (type script_proxy): upstream: host `evil.example.com`"),
        "{p:?}"
    );

    let text = r#"
[[clients]]
type = "ga4"

[[clients]]
type = "script_proxy"
path = "/lib/gt.js"
upstream = "https://www.googletagmanager.com/gtag/js"
"#;
    let config = crate::config::load_str(text, "t.toml", false).unwrap();
    let pipeline = crate::pipeline::Pipeline::build(&config).unwrap();
    assert_eq!(
        pipeline.clients.len(),
        1,
        "the proxy is not an event client"
    );
    assert_eq!(pipeline.script_proxies.len(), 1);
    assert_eq!(pipeline.script_proxies[0].path(), "/lib/gt.js");
}

#[test]
fn only_allowed_query_parameters_pass_in_canonical_order() {
    let p = proxy(&cfg("https://www.googletagmanager.com/gtag/js"));
    let u = |q: &str| p.upstream_url(q).unwrap();
    assert_eq!(
        u("id=G-ABC&cookie=x&l=dataLayer"),
        "https://www.googletagmanager.com/gtag/js?id=G-ABC&l=dataLayer"
    );
    assert_eq!(
        u("l=dataLayer&id=G-ABC"),
        "https://www.googletagmanager.com/gtag/js?id=G-ABC&l=dataLayer"
    );
    // Passed percent-encoded as received.
    assert_eq!(
        u("id=G%2DABC+x&foo=1"),
        "https://www.googletagmanager.com/gtag/js?id=G%2DABC+x"
    );
    // An encoded name still matches.
    assert_eq!(
        u("%69d=G-1"),
        "https://www.googletagmanager.com/gtag/js?%69d=G-1"
    );
    assert_eq!(u(""), "https://www.googletagmanager.com/gtag/js");
    assert_eq!(u("x=1&&y"), "https://www.googletagmanager.com/gtag/js");
    assert_eq!(u("id"), "https://www.googletagmanager.com/gtag/js?id");
    let long = format!("id={}", "a".repeat(MAX_QUERY_BYTES));
    assert_eq!(p.upstream_url(&long), None);
    // Not allowed parameters do not count against the length.
    let long = format!("junk={}&id=1", "a".repeat(MAX_QUERY_BYTES));
    assert_eq!(
        p.upstream_url(&long).as_deref(),
        Some("https://www.googletagmanager.com/gtag/js?id=1")
    );

    let mut c = cfg("https://www.googletagmanager.com/gtm.js?l=fixed");
    c.allowed_query = vec!["id".into()];
    let p = proxy(&c);
    assert_eq!(
        p.upstream_url("id=GTM-1&l=mine").unwrap(),
        "https://www.googletagmanager.com/gtm.js?l=fixed&id=GTM-1"
    );
    c.allowed_query = Vec::new();
    let p = proxy(&c);
    assert_eq!(
        p.upstream_url("id=GTM-1").unwrap(),
        "https://www.googletagmanager.com/gtm.js?l=fixed"
    );
}

fn accept(v: &str) -> Encoding {
    let mut h = HeaderMap::new();
    h.insert(ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
    Encoding::negotiate(&h)
}

#[test]
fn encoding_variant_follows_accept_encoding() {
    assert_eq!(accept("gzip, deflate, br, zstd"), Encoding::BrGzip);
    assert_eq!(accept("gzip, deflate"), Encoding::Gzip);
    assert_eq!(accept("br"), Encoding::Br);
    assert_eq!(accept("GZIP;q=0.5"), Encoding::Gzip);
    assert_eq!(accept("gzip;q=0, br;q=0"), Encoding::Identity);
    assert_eq!(accept("br;q=0.0, gzip"), Encoding::Gzip);
    assert_eq!(accept("*"), Encoding::Gzip);
    assert_eq!(accept("identity"), Encoding::Identity);
    assert_eq!(accept("deflate"), Encoding::Identity);
    assert_eq!(Encoding::negotiate(&HeaderMap::new()), Encoding::Identity);
    assert!(Encoding::BrGzip.allows(b"br") && Encoding::BrGzip.allows(b"GZIP"));
    assert!(!Encoding::Gzip.allows(b"br"));
    assert!(!Encoding::Identity.allows(b"gzip"));
    assert!(!Encoding::BrGzip.allows(b"zstd"));
}

#[test]
fn if_none_match_uses_weak_comparison() {
    let ours = etag_of(b"console.log(1)");
    assert_ne!(ours, etag_of(b"console.log(2)"));
    let check = |v: &str| {
        let mut h = HeaderMap::new();
        h.insert(IF_NONE_MATCH, HeaderValue::from_str(v).unwrap());
        etag_matches(&h, &ours)
    };
    let ours_str = ours.to_str().unwrap();
    assert!(check(ours_str));
    assert!(check(&format!("\"x\", W/{ours_str}")));
    assert!(check("*"));
    assert!(!check("\"x\""));
    assert!(!etag_matches(&HeaderMap::new(), &ours));
}

fn entry(len: usize) -> Arc<Entry> {
    let body = Bytes::from(vec![b'x'; len]);
    Arc::new(Entry {
        etag: etag_of(&body),
        body,
        content_type: HeaderValue::from_static("application/javascript"),
        content_encoding: None,
        upstream_etag: None,
        upstream_last_modified: None,
        fetched_at: Instant::now(),
    })
}

#[test]
fn cache_bounds_bytes_and_keys_evicting_least_recently_used() {
    let cache = ScriptCache::new(3 * 1500, 100);
    for k in ["a", "b", "c"] {
        let s = cache.slot(k);
        cache.store(k, &s, entry(1000));
    }
    assert_eq!(cache.usage().0, 3);
    // Touch `a`, so `b` is the least recently used when `d` pushes past the byte bound.
    cache.slot("a");
    let s = cache.slot("d");
    cache.store("d", &s, entry(1000));
    assert!(!cache.contains("b"));
    assert!(cache.contains("a") && cache.contains("c") && cache.contains("d"));
    assert!(cache.usage().1 <= 3 * 1500);

    let cache = ScriptCache::new(1 << 20, 2);
    cache.slot("a");
    cache.slot("b");
    cache.slot("a");
    cache.slot("c");
    assert_eq!(cache.usage().0, 2);
    assert!(cache.contains("a") && cache.contains("c") && !cache.contains("b"));
}

#[test]
fn a_replaced_entry_is_accounted_once_and_failures_free_their_key() {
    let cache = ScriptCache::new(1 << 20, 10);
    let s = cache.slot("a");
    cache.store("a", &s, entry(1000));
    let (_, one) = cache.usage();
    cache.store("a", &s, entry(1000));
    assert_eq!(cache.usage(), (1, one));
    let g = s.generation();
    let cold = cache.slot("b");
    cache.fail("b", &cold, "upstream answered 500");
    assert!(!cache.contains("b"));
    assert_eq!(&*cold.last_failure(), "upstream answered 500");
    assert_eq!(cold.generation(), 1);
    // A failure on a slot with an entry keeps it (it is served stale).
    cache.fail("a", &s, "timeout");
    assert!(cache.contains("a"));
    assert_eq!(s.generation(), g + 1);
    // And holds off the next background revalidation.
    assert!(!s.begin_revalidation());
    let fresh = cache.slot("c");
    assert!(fresh.begin_revalidation());
    assert!(!fresh.begin_revalidation(), "one revalidation at a time");
    fresh.end_revalidation();
    assert!(fresh.begin_revalidation());
}

#[test]
fn freshness_windows() {
    let mut c = cfg("https://www.googletagmanager.com/gtag/js");
    c.cache_ttl_secs = 10;
    c.stale_if_error_secs = 20;
    let p = proxy(&c);
    let at = |age: u64| Entry {
        fetched_at: Instant::now()
            .checked_sub(Duration::from_secs(age))
            .unwrap_or_else(Instant::now),
        ..(*entry(1)).clone()
    };
    assert!(p.is_fresh(&at(0)) && p.usable(&at(0)));
    assert!(!p.is_fresh(&at(11)) && p.usable(&at(11)));
    assert!(!p.usable(&at(31)));
}
