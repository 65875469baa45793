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

/// Most distinct strings [`interned`] keeps; past it, new ones read as `"other"`.
const MAX_INTERNED: usize = 256;

/// `'static` copies of strings, at most `max` of them.
struct Interner {
    seen: std::sync::Mutex<std::collections::HashSet<&'static str>>,
    max: usize,
}

impl Interner {
    fn get(&self, s: &str) -> &'static str {
        let s = truncate_chars(s, 64);
        let Ok(mut seen) = self.seen.lock() else {
            return "other";
        };
        if let Some(&k) = seen.get(s) {
            return k;
        }
        if seen.len() >= self.max {
            return "other";
        }
        let k: &'static str = Box::leak(s.to_owned().into_boxed_str());
        seen.insert(k);
        k
    }
}

/// A `'static` copy of `s`, for the few fields that name a kind (a client's, a tag's, a
/// cookie attribute) and are `&'static str` because they are constants where they are made,
/// when such a value is read back (a trace from another process). Bounded: at most
/// [`MAX_INTERNED`] strings of 64 characters are ever kept; past that, `"other"`.
pub fn interned(s: &str) -> &'static str {
    static INTERNER: std::sync::OnceLock<Interner> = std::sync::OnceLock::new();
    INTERNER
        .get_or_init(|| Interner {
            seen: Default::default(),
            max: MAX_INTERNED,
        })
        .get(s)
}

/// Reads a `&'static str` field through [`interned`] (`#[serde(deserialize_with)]`).
pub fn de_interned<'de, D: serde::Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
    Ok(interned(&s))
}

/// [`de_interned`] for an optional field.
pub fn de_interned_opt<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<&'static str>, D::Error> {
    let s = <Option<std::borrow::Cow<'de, str>> as serde::Deserialize>::deserialize(d)?;
    Ok(s.map(|s| interned(&s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interned_strings_are_shared_and_bounded() {
        let a = interned("meta_capi");
        assert!(std::ptr::eq(a, interned(&String::from("meta_capi"))));
        assert_eq!(interned(&"x".repeat(100)).chars().count(), 64);
        let small = Interner {
            seen: Default::default(),
            max: 3,
        };
        for k in ["a", "b", "c"] {
            assert_eq!(small.get(k), k);
        }
        assert_eq!(small.get("d"), "other");
        // Kinds seen before the bound was reached still read as themselves.
        assert_eq!(small.get("a"), "a");
    }
}
