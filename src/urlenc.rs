//! Query strings as browsers and servers write them (`application/x-www-form-urlencoded`):
//! `&`-separated `name=value` pairs, `+` for a space, percent-escapes decoded leniently
//! (invalid UTF-8 becomes U+FFFD). One reading for every lenient caller: the MP and data
//! clients, `fbclid` lookups, the script proxy's allow-list and the trace redactor. The GA4
//! client keeps its strict decoder (`clients::ga4::decode`), which answers malformed hits 400.

use std::borrow::Cow;

/// Decodes one name or value.
pub fn decode(s: &str) -> Cow<'_, str> {
    if s.contains('+') {
        Cow::Owned(
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned(),
        )
    } else {
        percent_encoding::percent_decode_str(s).decode_utf8_lossy()
    }
}

/// The raw `(name, value)` segments of a query string: empty segments are skipped and a
/// segment without `=` has an empty value.
fn raw_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// The decoded pairs of a raw query string (no leading `?`); empty segments are skipped and
/// a segment without `=` has an empty value.
pub fn pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    raw_pairs(query).map(|(k, v)| (decode(k), decode(v)))
}

/// The first value of parameter `name` in the query of URL `url` (the fragment is not part
/// of the query).
pub fn param(url: &str, name: &str) -> Option<String> {
    let url = url.split('#').next().unwrap_or(url);
    let query = url.split_once('?')?.1;
    // Runs on every hit (fbclid): only the matching value is decoded.
    raw_pairs(query).find_map(|(k, v)| (decode(k) == name).then(|| decode(v).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_is_a_space_and_escapes_are_decoded() {
        assert_eq!(decode("a+b%2Bc%20d"), "a b+c d");
        assert!(matches!(decode("plain"), Cow::Borrowed("plain")));
        assert_eq!(
            decode("%FF%41"),
            "\u{FFFD}A",
            "invalid UTF-8 is replaced, not refused"
        );
        assert_eq!(decode("100%"), "100%", "a stray % stays");
    }

    #[test]
    fn pairs_skip_empty_segments_and_default_missing_values() {
        let got: Vec<(String, String)> = pairs("a=1&&b&c=x%3Dy&=z")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "".into()),
                ("c".into(), "x=y".into()),
                ("".into(), "z".into()),
            ]
        );
    }

    #[test]
    fn param_reads_the_query_not_the_fragment_and_matches_decoded_names() {
        let url = "https://a.b/p?x=1&fbclid=AbC%2D1&y=2#fbclid=nope";
        assert_eq!(param(url, "fbclid").as_deref(), Some("AbC-1"));
        assert_eq!(
            param("https://a.b/?%66bclid=q", "fbclid").as_deref(),
            Some("q")
        );
        assert_eq!(param("https://a.b/#?fbclid=q", "fbclid"), None);
        assert_eq!(param("https://a.b/", "fbclid"), None);
    }
}
