//! Meta's `_fbp` / `_fbc` cookies (`fb.<subdomainIndex>.<ms>.<payload>[.<appendix>]`, §4).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::{Rng, RngCore};

use super::visitor::all_digits;
use crate::set_cookie::is_cookie_value;

/// Meta's client JS ignores click ids longer than this (§4.3).
const MAX_CLICK_ID_LEN: usize = 500;

/// Two-char appendix tokens written by older param builders: the base64url of the language
/// byte alone (1=PHP … 6=client JS).
const LEGACY_APPENDIX: [&str; 6] = ["AQ", "Ag", "Aw", "BA", "BQ", "Bg"];

/// Whether an `_fbp`/`_fbc` value is well-formed (§4.5, Node builder's stricter rules): `fb`,
/// digit-only index and timestamp, non-empty payload, optional valid appendix. Values written by
/// Meta's param builder (5 segments) are accepted as they are.
pub fn is_valid_meta_cookie(value: &str) -> bool {
    if value.len() > 1024 || !is_cookie_value(value) {
        return false;
    }
    let mut parts = value.split('.');
    let (Some("fb"), Some(index), Some(ts), Some(payload)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let appendix = parts.next();
    parts.next().is_none()
        && all_digits(index)
        && all_digits(ts)
        && !payload.is_empty()
        && appendix.is_none_or(is_valid_appendix)
}

/// 2-char legacy token, or 8 chars of base64url decoding to `[0x01, language 1..=6, type,
/// major, minor, patch]`.
fn is_valid_appendix(a: &str) -> bool {
    match a.len() {
        2 => LEGACY_APPENDIX.contains(&a),
        8 => {
            let mut buf = [0u8; 8];
            match URL_SAFE_NO_PAD.decode_slice(a, &mut buf) {
                Ok(6) => matches!(buf, [1, 1..=6, ..]),
                _ => false,
            }
        }
        _ => false,
    }
}

/// The click id (4th segment) of an `_fbc` value. Meta's builders compare this segment, not the
/// last one, so a builder-written 5-segment cookie is not re-minted on every hit (§7 item 20).
pub fn fbc_click_id(fbc: &str) -> Option<&str> {
    fbc.split('.').nth(3)
}

/// `fbclid` of a URL, percent-decoded like the builders' framework query parsing does, case
/// kept. Rejected (treated as absent) when empty, over 500 chars, or when it holds characters
/// that cannot sit in a cookie value or a dot that would shift the `_fbc` segments — real click
/// ids are `[A-Za-z0-9_-]`.
pub fn fbclid_from_url(url: &str) -> Option<String> {
    let id = crate::urlenc::param(url, "fbclid")?;
    let usable =
        !id.is_empty() && id.len() <= MAX_CLICK_ID_LEN && is_cookie_value(&id) && !id.contains('.');
    usable.then_some(id)
}

/// New `_fbc` for a click: `fb.<idx>.<now ms>.<fbclid>`.
pub fn mint_fbc(subdomain_index: u8, now_ms: i64, click_id: &str) -> String {
    format!("fb.{subdomain_index}.{}.{click_id}", now_ms.max(0))
}

/// New `_fbp`: `fb.<idx>.<now ms>.<random>`. The payload range is where sources disagree
/// (§7 item 18); `[1e9, 2^31)` always yields the 10 digits seen in Meta's own example while
/// staying inside the server builders' 31-bit range.
pub fn mint_fbp(subdomain_index: u8, now_ms: i64, rng: &mut dyn RngCore) -> String {
    let r: u32 = rng.gen_range(1_000_000_000..2_147_483_648);
    format!("fb.{subdomain_index}.{}.{r}", now_ms.max(0))
}
