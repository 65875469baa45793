//! A cookie tagrelay sets: the identity layer decides it, the hit's response carries it as a
//! `Set-Cookie` header and the debug view shows it with its reason.

use std::fmt::Write as _;

use cookie::{Cookie, SameSite};
use serde::Serialize;

/// Why a cookie is being set, for the debug view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CookieReason {
    /// No usable value existed; a fresh one was minted.
    New,
    /// The request's value is re-issued unchanged (refreshes its lifetime).
    Kept,
    /// The visitor id was seeded from the GA client id the browser already had.
    MigratedFromGa,
    /// The request carried a value that was malformed, or an `_fbc` for an older click.
    Replaced,
}

/// One cookie tagrelay sets, kept structured for the debug view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CookieDecision {
    pub name: String,
    pub value: String,
    /// `None` = host-only cookie.
    pub domain: Option<String>,
    pub max_age_secs: i64,
    pub http_only: bool,
    pub secure: bool,
    pub same_site: &'static str,
    pub path: &'static str,
    pub reason: CookieReason,
}

impl CookieDecision {
    /// The `Set-Cookie` header value for this decision.
    pub fn header_value(&self) -> String {
        let same_site = match self.same_site {
            "Strict" => SameSite::Strict,
            "None" => SameSite::None,
            _ => SameSite::Lax,
        };
        let mut builder = Cookie::build((self.name.as_str(), self.value.as_str()))
            .path(self.path)
            .http_only(self.http_only)
            .secure(self.secure)
            .same_site(same_site)
            .max_age(cookie::time::Duration::seconds(self.max_age_secs));
        if let Some(domain) = &self.domain {
            builder = builder.domain(domain.as_str());
        }
        // Room for a typical header, so formatting rarely regrows the string.
        let mut out = String::with_capacity(160);
        let _ = write!(out, "{}", builder.build());
        out
    }
}

/// RFC 6265 `cookie-octet`: what may appear in a cookie value without quoting. Values we echo
/// back are checked against it so a malformed request cookie never becomes a malformed header.
pub fn is_cookie_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

pub fn is_cookie_value(v: &str) -> bool {
    v.bytes().all(is_cookie_octet)
}

/// RFC 6265 / RFC 9110 token characters, for cookie names.
pub fn is_cookie_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}
