//! Item encoding of `/g/collect` (`pr1`…`pr200`): `~`-separated tokens, each a two-letter key
//! glued to its value, plus custom parameters as `k<i><name>` / `v<i><value>` token pairs.

use crate::event::Item;

/// Most custom parameters kept per item (GA4's limit); the cap also bounds the key/value
/// matching work on hostile input.
pub const MAX_CUSTOM_ITEM_PARAMS: usize = crate::ga4_limits::MAX_ITEM_CUSTOM_PARAMS;

/// Parses one already percent-decoded `prN` value. Never fails: a malformed or unknown token is
/// dropped and the rest of the item is kept, because one bad field should not cost the item.
pub fn parse_item(s: &str) -> Item {
    let mut item = Item::default();
    // (index, name) in first-seen order; values are matched in a second pass so that a `v`
    // token may precede its `k` token.
    let mut custom_keys: Vec<(&str, &str)> = Vec::new();
    let mut has_custom_values = false;

    for token in s.split('~') {
        match custom_token(token) {
            Some(CustomToken::Key(rest)) => {
                let (index, name) = split_key_index(rest);
                if name.is_empty() {
                    continue;
                }
                if let Some(slot) = custom_keys.iter_mut().find(|(i, _)| *i == index) {
                    slot.1 = name;
                } else if custom_keys.len() < MAX_CUSTOM_ITEM_PARAMS {
                    custom_keys.push((index, name));
                }
            }
            Some(CustomToken::Value(_)) => has_custom_values = true,
            None => set_standard(&mut item, token),
        }
    }

    if has_custom_values && !custom_keys.is_empty() {
        let mut values: Vec<Option<&str>> = vec![None; custom_keys.len()];
        for token in s.split('~') {
            if let Some(CustomToken::Value(rest)) = custom_token(token) {
                // Edgee numbers custom params in decimal (`k10`), so `v1042` is ambiguous
                // between index 1 and 10; the longest known index is the likelier reading.
                let best = custom_keys
                    .iter()
                    .enumerate()
                    .filter(|(_, (index, _))| rest.starts_with(index))
                    .max_by_key(|(_, (index, _))| index.len());
                if let Some((slot, (index, _))) = best {
                    if let (Some(v), Some(value)) = (values.get_mut(slot), rest.get(index.len()..))
                    {
                        *v = Some(value);
                    }
                }
            }
        }
        item.custom = custom_keys
            .iter()
            .zip(values)
            .filter_map(|((_, name), value)| {
                value
                    .filter(|v| !v.is_empty())
                    .map(|v| ((*name).to_owned(), v.to_owned()))
            })
            .collect();
    }
    item
}

enum CustomToken<'a> {
    /// The token minus its leading `k`.
    Key(&'a str),
    /// The token minus its leading `v`.
    Value(&'a str),
}

/// A token is custom if it starts with `k` or `v` followed by an index character other than
/// lower-case `a` (which would make it the `va` variant key, or an unknown `ka`).
fn custom_token(token: &str) -> Option<CustomToken<'_>> {
    let rest = token.get(1..)?;
    let index_char = rest.chars().next()?;
    if index_char == 'a' {
        return None;
    }
    match token.as_bytes().first() {
        Some(b'k') => Some(CustomToken::Key(rest)),
        Some(b'v') => Some(CustomToken::Value(rest)),
        _ => None,
    }
}

/// Splits `0size` / `Asize` / `10size` into index and name. Decimal indices are read greedily
/// since GA4 parameter names start with a letter; any other index is a single character
/// (ga4mp counts `0`–`9`, then `A`, `B`, …).
fn split_key_index(rest: &str) -> (&str, &str) {
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let cut = if digits > 0 {
        digits
    } else {
        rest.chars().next().map_or(0, char::len_utf8)
    };
    match (rest.get(..cut), rest.get(cut..)) {
        (Some(index), Some(name)) => (index, name),
        _ => ("", ""),
    }
}

fn set_standard(item: &mut Item, token: &str) {
    let (Some(key), Some(value)) = (token.get(..2), token.get(2..)) else {
        return;
    };
    if value.is_empty() {
        return;
    }
    let text = || Some(value.into());
    match key {
        "id" => item.item_id = text(),
        "nm" => item.item_name = text(),
        "br" => item.item_brand = text(),
        "ca" => item.item_category = text(),
        "c2" => item.item_category2 = text(),
        "c3" => item.item_category3 = text(),
        "c4" => item.item_category4 = text(),
        "c5" => item.item_category5 = text(),
        "va" => item.item_variant = text(),
        "ln" => item.item_list_name = text(),
        "li" => item.item_list_id = text(),
        "af" => item.affiliation = text(),
        "cp" => item.coupon = text(),
        "lo" => item.location_id = text(),
        "cn" => item.creative_name = text(),
        "cs" => item.creative_slot = text(),
        "pi" => item.promotion_id = text(),
        "pn" => item.promotion_name = text(),
        "pr" => item.price = parse_finite(value).or(item.price),
        "qt" => item.quantity = parse_finite(value).or(item.quantity),
        "ds" => item.discount = parse_finite(value).or(item.discount),
        "lp" => item.index = value.parse().ok().or(item.index),
        _ => {}
    }
}

/// Rust's float parser accepts `inf`/`NaN`, which JSON cannot carry and no vendor expects.
pub(crate) fn parse_finite(s: &str) -> Option<f64> {
    s.parse::<f64>().ok().filter(|n| n.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_and_custom_tokens() {
        let item = parse_item(
            "idSKU_123~nmTrail Shoe~brAcme~caShoes~c2Running~vablue~pr59~qt2~k0size~v042",
        );
        assert_eq!(
            item,
            Item {
                item_id: Some("SKU_123".into()),
                item_name: Some("Trail Shoe".into()),
                item_brand: Some("Acme".into()),
                item_category: Some("Shoes".into()),
                item_category2: Some("Running".into()),
                item_variant: Some("blue".into()),
                price: Some(59.0),
                quantity: Some(2.0),
                custom: vec![("size".into(), "42".into())],
                ..Default::default()
            }
        );
    }

    #[test]
    fn every_documented_key() {
        let item = parse_item(
            "idI~nmN~brB~caC1~c2C2~c3C3~c4C4~c5C5~vaV~lnLN~liLI~lp3~afAF~cpCP~ds1.5~loLO~pr9.99~qt4~cnCN~csCS~piPI~pnPN",
        );
        assert_eq!(
            item,
            Item {
                item_id: Some("I".into()),
                item_name: Some("N".into()),
                item_brand: Some("B".into()),
                item_category: Some("C1".into()),
                item_category2: Some("C2".into()),
                item_category3: Some("C3".into()),
                item_category4: Some("C4".into()),
                item_category5: Some("C5".into()),
                item_variant: Some("V".into()),
                item_list_name: Some("LN".into()),
                item_list_id: Some("LI".into()),
                index: Some(3),
                affiliation: Some("AF".into()),
                coupon: Some("CP".into()),
                discount: Some(1.5),
                location_id: Some("LO".into()),
                price: Some(9.99),
                quantity: Some(4.0),
                creative_name: Some("CN".into()),
                creative_slot: Some("CS".into()),
                promotion_id: Some("PI".into()),
                promotion_name: Some("PN".into()),
                custom: vec![],
            }
        );
    }

    #[test]
    fn custom_indices_ga4mp_and_decimal() {
        let item = parse_item("vAred~k0size~kAcolor~v0XL~k10fit~v10slim");
        let expected: Vec<(String, String)> = [("size", "XL"), ("color", "red"), ("fit", "slim")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(item.custom, expected);
    }

    #[test]
    fn ambiguous_decimal_value_goes_to_longest_index() {
        // `v1042` could be index 1 = "042" or index 10 = "42"; the longer index wins and
        // index 1, left without a value, is dropped rather than invented.
        let item = parse_item("k1cut~k10fit~v1042");
        assert_eq!(item.custom, vec![("fit".to_owned(), "42".to_owned())]);
    }

    #[test]
    fn malformed_tokens_keep_the_rest() {
        let item = parse_item("idA~prabc~qt~lp-1~zzjunk~k0~v9orphan~~x~é~nmName~dsNaN~prinf");
        assert_eq!(
            item,
            Item {
                item_id: Some("A".into()),
                item_name: Some("Name".into()),
                ..Default::default()
            }
        );
    }

    #[test]
    fn unicode_values() {
        let item = parse_item(
            "idshopify_ZZ_1~nmUtekos Dun™~caYttertøy~pr2490~qt1~vaFjellblå / Medium / Unisex",
        );
        assert_eq!(item.item_name.as_deref(), Some("Utekos Dun™"));
        assert_eq!(item.item_category.as_deref(), Some("Yttertøy"));
        assert_eq!(
            item.item_variant.as_deref(),
            Some("Fjellblå / Medium / Unisex")
        );
        assert_eq!(item.price, Some(2490.0));
    }

    #[test]
    fn custom_params_are_capped() {
        let s: String = (0..100)
            .map(|i| format!("k{i}p{i}~v{i}x"))
            .collect::<Vec<_>>()
            .join("~");
        let item = parse_item(&s);
        assert_eq!(item.custom.len(), MAX_CUSTOM_ITEM_PARAMS);
        assert_eq!(item.custom[0], ("p0".to_owned(), "x".to_owned()));
    }
}
