//! Small value helpers the vendor encoders share: URLs, money, counts.

use serde::{Serialize, Serializer};

/// An absolute `http(s)://` URL with a host and no whitespace.
pub(crate) fn is_http_url(u: &str) -> bool {
    let b = u.as_bytes();
    let scheme_len = if b.len() > 8 && b[..8].eq_ignore_ascii_case(b"https://") {
        8
    } else if b.len() > 7 && b[..7].eq_ignore_ascii_case(b"http://") {
        7
    } else {
        return false;
    };
    !u[scheme_len..].starts_with(['/', '?', '#']) && !u.contains(char::is_whitespace)
}

pub(crate) fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|n| n.is_finite())
}

pub(crate) fn non_empty<T: std::ops::Deref<Target = str>>(v: &Option<T>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Upper-case ISO 4217 shape (wire-formats §7.1: the SDKs disagree on case; Meta accepts both; GA4 and the
/// Node SDK use upper case).
pub(crate) fn currency(v: Option<&str>) -> Option<Currency> {
    let b = v?.trim().as_bytes();
    if b.len() != 3 || !b.iter().all(u8::is_ascii_alphabetic) {
        return None;
    }
    Some(Currency([
        b[0].to_ascii_uppercase(),
        b[1].to_ascii_uppercase(),
        b[2].to_ascii_uppercase(),
    ]))
}

/// A count that vendors type as an integer: whole numbers go out as `2`, not `2.0`.
#[derive(Debug, Clone, Copy)]
pub struct Num(pub f64);

impl Serialize for Num {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.fract() == 0.0 && self.0.abs() < 9.0e15 {
            s.serialize_i64(self.0 as i64)
        } else {
            s.serialize_f64(self.0)
        }
    }
}

/// Upper-case three-letter currency code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Currency([u8; 3]);

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(std::str::from_utf8(&self.0).unwrap_or_default())
    }
}

/// `endpoint` must be a plain `http(s)://host[:port][/path]` base URL.
pub(crate) fn endpoint_problem(key: &str, endpoint: &str, example: &str) -> Option<String> {
    let ep = endpoint.trim_end_matches('/');
    match ep
        .strip_prefix("https://")
        .or_else(|| ep.strip_prefix("http://"))
    {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => {
            (rest.contains(['?', '#']) || rest.contains(char::is_whitespace)).then(|| {
                format!(
                    "{key}: `{endpoint}` must be a plain base URL without query, fragment or spaces"
                )
            })
        }
        _ => Some(format!(
            "{key}: `{endpoint}` must be an http(s) URL, e.g. \"{example}\""
        )),
    }
}
