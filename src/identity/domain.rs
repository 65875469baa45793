//! Cookie domain: registrable domain (eTLD+1) via the Public Suffix List, explicit overrides,
//! and Meta's `subdomainIndex`.

use std::borrow::Cow;
use std::net::IpAddr;

/// The host of a `Host` header value: port and IPv6 brackets removed, trailing root dot dropped.
/// Not lower-cased (see [`normalized_host`]).
pub fn host_without_port(host: &str) -> &str {
    let h = host.trim();
    let h = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if h.bytes().filter(|&b| b == b':').count() == 1 {
        // Exactly one colon is `host:port`; more than one is a bare IPv6 literal.
        h.split(':').next().unwrap_or(h)
    } else {
        h
    };
    h.strip_suffix('.').unwrap_or(h)
}

/// [`host_without_port`], lower-cased; borrows when the host already is (the usual case).
pub fn normalized_host(host: &str) -> Cow<'_, str> {
    let h = host_without_port(host);
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    }
}

/// Whether `h` (already without port/brackets) is an IPv4 or IPv6 literal.
pub fn is_ip_literal(h: &str) -> bool {
    h.parse::<IpAddr>().is_ok()
}

/// A lower-case DNS name: labels of `[a-z0-9_-]`, none empty, within DNS length limits.
fn is_dns_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}

/// Registrable domain (eTLD+1) of a `Host` header value, e.g. `sgtm.shop.example.co.uk:443` →
/// `example.co.uk`. `None` when a Domain attribute cannot be used and the cookie must be
/// host-only: IP literals, single-label hosts such as `localhost`, hosts that are themselves a
/// public suffix, and anything that is not a DNS name.
///
/// Unknown TLDs fall under the PSL's implicit `*` rule, so `www.example.test` → `example.test`.
pub fn registrable_domain(host: &str) -> Option<String> {
    let h = normalized_host(host);
    if !h.contains('.') || !is_dns_name(&h) || is_ip_literal(&h) {
        return None;
    }
    psl::domain_str(&h).map(str::to_owned)
}

/// Meta's `subdomainIndex` for a cookie living on `domain`: the number of dots
/// (`example.com` → 1, `example.co.uk` → 2, `www.example.com` → 2); 0 for IP literals and
/// single-label hosts (§4.2 of the wire-format notes). Accepts a leading dot or a port.
pub fn subdomain_index(domain: &str) -> u8 {
    let d = host_without_port(domain);
    let d = d.strip_prefix('.').unwrap_or(d);
    if is_ip_literal(d) {
        return 0;
    }
    u8::try_from(d.bytes().filter(|&b| b == b'.').count()).unwrap_or(u8::MAX)
}

/// Whether `host` (normalized) is `domain` or one of its subdomains.
pub fn domain_matches(host: &str, domain: &str) -> bool {
    host == domain
        || host
            .strip_suffix(domain)
            .is_some_and(|prefix| prefix.ends_with('.'))
}

/// Validates and normalizes `cookies.domain` when it is not `auto`: leading dot and case are
/// dropped, and values browsers would reject as a Domain attribute are refused up front.
pub(crate) fn normalize_explicit_domain(raw: &str) -> Result<String, String> {
    let trimmed = raw.trim();
    let d = trimmed
        .strip_prefix('.')
        .unwrap_or(trimmed)
        .to_ascii_lowercase();
    if d.is_empty() {
        return Err("must be \"auto\" or a domain such as \"example.com\"".into());
    }
    if is_ip_literal(host_without_port(&d)) {
        return Err(format!(
            "`{raw}` is an IP address; browsers reject IP Domain attributes, use \"auto\" (IP hosts get host-only cookies)"
        ));
    }
    if !is_dns_name(&d) {
        return Err(format!(
            "`{raw}` is not a domain name (no scheme, port, path or spaces; e.g. \"example.com\")"
        ));
    }
    if !d.contains('.') {
        return Err(format!(
            "`{raw}` is a single-label name; browsers reject it as a cookie Domain, use \"auto\""
        ));
    }
    if psl::suffix_str(&d) == Some(d.as_str()) {
        return Err(format!(
            "`{raw}` is a public suffix; browsers reject cookies for it, use the site's registrable domain (e.g. \"example.{d}\")"
        ));
    }
    Ok(d)
}
