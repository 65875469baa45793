//! Small text helpers every layer uses: cutting to a character budget for vendor limits and
//! human-facing messages, and percent-encoding query components.

/// Characters left as-is in query values: RFC 3986 unreserved. Everything else is
/// percent-encoded, so one decode gives back exactly the original value.
const COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes a query name or value (vendor URLs, tokens).
pub fn encode_component(s: &str) -> std::borrow::Cow<'_, str> {
    percent_encoding::utf8_percent_encode(s, COMPONENT).into()
}

/// Cuts `s` to at most `max` characters (vendor limits count characters, not bytes).
pub fn truncate_chars(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((cut, _)) => &s[..cut],
        None => s,
    }
}

/// [`truncate_chars`] with `…` appended when something was cut: for values quoted in
/// human-facing reasons.
pub fn ellipsize(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    let cut = truncate_chars(s, max);
    if cut.len() < s.len() {
        std::borrow::Cow::Owned(format!("{cut}…"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}
