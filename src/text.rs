//! Small text helpers every layer uses: cutting to a character budget for vendor limits and
//! human-facing messages, durations as people read them, and percent-encoding query components.

use std::time::Duration;

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

/// Human form of a duration for dead-letter reasons (`3h 12m`, `41s`).
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (major, unit, minor, minor_unit) = match s {
        0..=59 => return format!("{s}s"),
        60..=3599 => (s / 60, "m", s % 60, "s"),
        3600..=86_399 => (s / 3600, "h", (s % 3600) / 60, "m"),
        _ => (s / 86_400, "d", (s % 86_400) / 3600, "h"),
    };
    if minor == 0 {
        format!("{major}{unit}")
    } else {
        format!("{major}{unit} {minor}{minor_unit}")
    }
}
