//! CORS for tracking routes. Browsers send hits with credentials (cookies), so the allowed
//! origin is reflected, never `*`.

use http::{HeaderMap, HeaderValue};

use crate::identity::{host_without_port, registrable_domain};

/// Whether `origin` may call tracking routes on `request_host`.
/// Explicit list: exact match. Empty list: same registrable domain as the request host
/// (or the very same host, for IPs and `localhost`).
pub fn origin_allowed(origin: &str, request_host: &str, allowed: &[String]) -> bool {
    if !allowed.is_empty() {
        return allowed.iter().any(|a| a.eq_ignore_ascii_case(origin));
    }
    let Some(origin_host) = crate::event::url_host(origin) else {
        return false;
    };
    let req = host_without_port(request_host);
    if origin_host.eq_ignore_ascii_case(req) {
        return true;
    }
    match (registrable_domain(origin_host), registrable_domain(req)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Adds the CORS response headers for an allowed origin.
pub fn apply(headers: &mut HeaderMap, origin: &HeaderValue) {
    headers.insert("access-control-allow-origin", origin.clone());
    headers.insert(
        "access-control-allow-credentials",
        HeaderValue::from_static("true"),
    );
    headers.append("vary", HeaderValue::from_static("Origin"));
    // tagrelay.js reads it on a 503 to know when to retry.
    headers.insert(
        "access-control-expose-headers",
        HeaderValue::from_static("Retry-After"),
    );
}

/// Adds the preflight answer headers.
pub fn apply_preflight(
    headers: &mut HeaderMap,
    origin: &HeaderValue,
    requested: Option<&HeaderValue>,
) {
    apply(headers, origin);
    headers.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    headers.insert(
        "access-control-allow-headers",
        requested
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("content-type")),
    );
    headers.insert("access-control-max-age", HeaderValue::from_static("86400"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_site_origins_are_allowed_by_default() {
        assert!(origin_allowed(
            "https://www.example.co.uk",
            "sgtm.example.co.uk",
            &[]
        ));
        assert!(origin_allowed(
            "http://www.example.test:8080",
            "sgtm.example.test:9",
            &[]
        ));
        assert!(!origin_allowed(
            "https://evil.co.uk",
            "sgtm.example.co.uk",
            &[]
        ));
        assert!(origin_allowed(
            "http://127.0.0.1:3000",
            "127.0.0.1:8080",
            &[]
        ));
        assert!(!origin_allowed("null", "sgtm.example.com", &[]));
    }

    #[test]
    fn explicit_list_is_exact() {
        let list = vec!["https://shop.example.com".to_string()];
        assert!(origin_allowed("https://shop.example.com", "x", &list));
        assert!(!origin_allowed(
            "https://www.example.com",
            "sgtm.example.com",
            &list
        ));
    }
}
