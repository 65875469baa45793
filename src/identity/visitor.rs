//! The server-managed visitor id (GTM-SS "FPID") and the GA client ids it competes with.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rand::{Rng, RngCore};

use crate::set_cookie::is_cookie_value;

/// Prefix of every visitor cookie value we write and accept (GTM-SS format, §5.3).
pub const VISITOR_PREFIX: &str = "FPID2.2.";

/// Longest client id we carry. Real ids are 20–60 chars; anything far longer is not one.
const CLIENT_ID_MAX_LEN: usize = 128;

/// `encodeURIComponent`'s set: what GTM-SS's FPID values show (`+`→`%2B`, `/`→`%2F`, `=`→`%3D`).
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Whether `id` looks like a GA / FPID client id and is safe to persist: GA's
/// `<digits>.<digits>` and FPID's `<base64>.<digits>` shapes both pass.
pub fn is_plausible_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= CLIENT_ID_MAX_LEN
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'.' | b'_' | b'-' | b'~')
        })
}

/// Client id carried by a visitor cookie value: the value without `FPID2.2.`, URL-decoded.
/// `None` when the value is not in that format, so the caller treats the cookie as absent.
pub fn client_id_from_visitor_cookie(value: &str) -> Option<String> {
    let rest = value.strip_prefix(VISITOR_PREFIX)?;
    if !is_cookie_value(rest) {
        return None;
    }
    let id = percent_decode_str(rest).decode_utf8().ok()?;
    is_plausible_client_id(&id).then(|| id.into_owned())
}

/// Visitor cookie value whose decoded client id is `client_id`.
///
/// Used both for fresh ids and for ids seeded from GA: writing the GA client id itself
/// (`FPID2.2.1234567890.1764912990`) rather than a new random token is what lets a migrated
/// visitor keep the id GA already knows, and lets every later hit carrying this cookie resolve
/// to the same client id as the first one.
pub fn visitor_cookie_value(client_id: &str) -> String {
    let encoded = utf8_percent_encode(client_id, URI_COMPONENT);
    format!("{VISITOR_PREFIX}{encoded}")
}

/// A brand-new visitor: `FPID2.2.<url-encoded base64 of 32 random bytes>.<unix s>`.
/// Returns `(cookie value, client id)`; the client id is `<base64>.<unix s>`.
pub fn mint_visitor(rng: &mut dyn RngCore, now_ms: i64) -> (String, String) {
    let mut bytes = [0u8; 32];
    rng.fill_bytes(&mut bytes);
    let client_id = format!("{}.{}", STANDARD.encode(bytes), unix_secs(now_ms));
    (visitor_cookie_value(&client_id), client_id)
}

/// GA-shaped throwaway id (`<31-bit random>.<unix s>`, §5.1) for hits we may not persist an id
/// for. GA4 still needs *some* client id on a cookieless ping; a per-request one carries no
/// cross-hit identity, which is the point of consent being denied.
pub fn ephemeral_client_id(rng: &mut dyn RngCore, now_ms: i64) -> String {
    let r: u32 = rng.gen_range(1_000_000_000..=2_147_483_647);
    format!("{r}.{}", unix_secs(now_ms))
}

/// Client id of a `_ga` cookie (`GA1.1.<random>.<unix s>`): the last two dot fields. The
/// version/`<n>` fields are ignored (they vary between analytics.js and gtag, §7 item 16).
pub fn client_id_from_ga_cookie(value: &str) -> Option<&str> {
    let mut fields = value.rsplitn(3, '.');
    let ts = fields.next()?;
    let random = fields.next()?;
    let head = fields.next()?;
    // At least four fields overall: the head must itself hold `GA1.<n>`.
    if !head.contains('.') || !all_digits(ts) || !all_digits(random) {
        return None;
    }
    value.get(value.len() - ts.len() - random.len() - 1..)
}

pub(crate) fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn unix_secs(now_ms: i64) -> i64 {
    now_ms.max(0) / 1000
}
