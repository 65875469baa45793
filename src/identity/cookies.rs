//! Reading the `Cookie` request header and rendering `Set-Cookie` values.

use cookie::Cookie;

pub use crate::set_cookie::{is_cookie_name, is_cookie_octet, is_cookie_value};

/// `(name, value)` pairs of a `Cookie` header, in order, borrowed from `header`.
///
/// Pieces without `=` or with an empty name are skipped; a value wrapped in one pair of double
/// quotes is unwrapped. Duplicates are all yielded: callers that want "first wins" (the browser
/// sends the most specific cookie first) take the first match.
pub fn parse_cookie_header(header: &str) -> impl Iterator<Item = (&str, &str)> + '_ {
    Cookie::split_parse(header).filter_map(|parsed| {
        let c = parsed.ok()?;
        Some((c.name_raw()?, trim_quotes(c.value_raw()?)))
    })
}

/// First value of cookie `name` in a `Cookie` header.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    // Names are compared raw, so a header that does not contain `name` cannot hold it, and
    // one substring search is much cheaper than splitting every cookie out: this runs on every
    // hit for cookies most visitors lack (the debug cookie, for one).
    if !header.contains(name) {
        return None;
    }
    parse_cookie_header(header).find_map(|(n, v)| (n == name).then_some(v))
}

fn trim_quotes(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(v)
}

/// The cookies of one request that identity cares about. One pass over the header, borrowing.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RequestCookies<'a> {
    pub visitor: Option<&'a str>,
    /// When the visitor cookie was last set (`[cookies] measure_cookie_age`).
    pub visitor_set: Option<&'a str>,
    pub ga: Option<&'a str>,
    pub fbp: Option<&'a str>,
    pub fbc: Option<&'a str>,
    pub clicks: super::click_ids::ClickCookies<'a>,
}

impl<'a> RequestCookies<'a> {
    /// `set_name` is the visitor cookie's companion, or empty when it is not used.
    pub fn read(header: Option<&'a str>, visitor_name: &str, set_name: &str) -> Self {
        let mut jar = RequestCookies::default();
        for (name, value) in header.into_iter().flat_map(parse_cookie_header) {
            let slot = match name {
                "_ga" => &mut jar.ga,
                "_fbp" => &mut jar.fbp,
                "_fbc" => &mut jar.fbc,
                n if n == visitor_name => &mut jar.visitor,
                n if !set_name.is_empty() && n == set_name => &mut jar.visitor_set,
                n => {
                    jar.clicks.offer(n, value);
                    continue;
                }
            };
            if slot.is_none() {
                *slot = Some(value);
            }
        }
        jar
    }
}
