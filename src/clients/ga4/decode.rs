//! Strict `application/x-www-form-urlencoded` decoding for GA4 hit strings.
//!
//! GA4 hits are query-string syntax: `k=v` pairs joined by `&`, `+` meaning space and `%XX`
//! escapes. We decode exactly once and refuse anything ambiguous (a stray `%`, bytes that are
//! not UTF-8) instead of guessing, because a silently mangled value would be forwarded to the
//! vendors as if it were what the browser sent.

use std::borrow::Cow;

use percent_encoding::percent_decode;

/// Longest key echoed back in an error message; keys are attacker-controlled.
const MAX_KEY_IN_ERROR: usize = 64;

/// One decoded `(key, value)` pair, borrowed from the input where no decoding was needed.
pub type QueryPair<'a> = (Cow<'a, str>, Cow<'a, str>);

/// Splits a query string (or one body line) into decoded `(key, value)` pairs, in order.
///
/// Empty segments (`a=1&&b=2`, a trailing `&`) are skipped. A segment without `=` (a bare
/// flag such as `richsstsse`) yields the key with an empty value. Pairs borrow from `s`
/// whenever no decoding is needed.
///
/// Errors name the offending parameter, e.g. ``invalid percent-encoding in parameter `dt`: …``.
pub fn parse_query_pairs(s: &str) -> Result<Vec<QueryPair<'_>>, String> {
    // One pair per `&` at most; a cheap upper bound that avoids regrowth on typical hits.
    let mut out = Vec::with_capacity(s.bytes().filter(|&b| b == b'&').count() + 1);
    for segment in s.split('&') {
        if segment.is_empty() {
            continue;
        }
        let (raw_key, raw_value) = segment.split_once('=').unwrap_or((segment, ""));
        let key = decode_component(raw_key).map_err(|why| param_error(raw_key, why))?;
        let value = decode_component(raw_value).map_err(|why| param_error(raw_key, why))?;
        out.push((key, value));
    }
    Ok(out)
}

fn param_error(raw_key: &str, why: &str) -> String {
    let shown = match raw_key.char_indices().nth(MAX_KEY_IN_ERROR) {
        Some((cut, _)) => raw_key.get(..cut).unwrap_or(raw_key),
        None => raw_key,
    };
    format!("invalid percent-encoding in parameter `{shown}`: {why}")
}

/// Decodes one key or value: `+` → space, `%XX` → byte, result must be UTF-8.
pub fn decode_component(raw: &str) -> Result<Cow<'_, str>, &'static str> {
    let bytes = raw.as_bytes();
    let mut has_plus = false;
    let mut has_percent = false;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => has_plus = true,
            b'%' => {
                // The percent-encoding crate passes malformed escapes through verbatim;
                // we reject them so that `%zz` never reaches a vendor as literal text.
                let hi = bytes.get(i + 1).copied();
                let lo = bytes.get(i + 2).copied();
                match (hi, lo) {
                    (Some(h), Some(l)) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {}
                    _ => return Err("`%` must be followed by two hex digits"),
                }
                has_percent = true;
                i += 2;
            }
            _ => {}
        }
        i += 1;
    }
    const NOT_UTF8: &str = "decoded bytes are not valid UTF-8";
    if has_plus {
        let replaced: Vec<u8> = bytes
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        let decoded: Vec<u8> = if has_percent {
            Cow::from(percent_decode(&replaced)).into_owned()
        } else {
            replaced
        };
        String::from_utf8(decoded)
            .map(Cow::Owned)
            .map_err(|_| NOT_UTF8)
    } else if has_percent {
        percent_decode(bytes).decode_utf8().map_err(|_| NOT_UTF8)
    } else {
        Ok(Cow::Borrowed(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(s: &str) -> Vec<(String, String)> {
        parse_query_pairs(s)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    #[test]
    fn plain_pairs_borrow_from_input() {
        let p = parse_query_pairs("en=page_view&v=2").unwrap();
        assert!(matches!(p[0].0, Cow::Borrowed("en")));
        assert!(matches!(p[0].1, Cow::Borrowed("page_view")));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn plus_percent_and_flags() {
        assert_eq!(
            pairs("dt=Trail+Shoe%20%2B1&richsstsse&&x=&=v&"),
            vec![
                ("dt".into(), "Trail Shoe +1".into()),
                ("richsstsse".into(), "".into()),
                ("x".into(), "".into()),
                ("".into(), "v".into()),
            ]
        );
        assert_eq!(
            pairs("ep.a%3Db=c%26d"),
            vec![("ep.a=b".into(), "c&d".into())]
        );
        assert_eq!(pairs("dt=Caf%C3%A9"), vec![("dt".into(), "Café".into())]);
        // Raw UTF-8 (not percent-encoded) is accepted as-is.
        assert_eq!(pairs("dt=Café"), vec![("dt".into(), "Café".into())]);
    }

    #[test]
    fn decodes_exactly_once() {
        // Client hints arrive double-encoded; one decoding leaves `%20` in place.
        assert_eq!(
            pairs("uafvl=Google%2520Chrome%3B136"),
            vec![("uafvl".into(), "Google%20Chrome;136".into())]
        );
    }

    #[test]
    fn malformed_escapes_are_rejected_with_the_parameter_name() {
        for (input, key, why) in [
            ("a=1&dt=%zz", "dt", "two hex digits"),
            ("dt=abc%", "dt", "two hex digits"),
            ("dt=%4", "dt", "two hex digits"),
            ("dt=%E2%82", "dt", "UTF-8"),
            ("dt=%FF+x", "dt", "UTF-8"),
            ("k%zz=1", "k%zz", "two hex digits"),
        ] {
            let err = parse_query_pairs(input).unwrap_err();
            assert!(
                err.starts_with(&format!("invalid percent-encoding in parameter `{key}`")),
                "{input}: {err}"
            );
            assert!(err.contains(why), "{input}: {err}");
        }
    }

    #[test]
    fn long_keys_are_truncated_in_errors() {
        let key = "k".repeat(500);
        let err = parse_query_pairs(&format!("{key}=%")).unwrap_err();
        assert!(err.len() < 200, "{err}");
    }
}
