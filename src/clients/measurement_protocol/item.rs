//! GA4 item objects (`items[]` of ecommerce events) → [`Item`]. Shared by the Measurement
//! Protocol and data clients, which differ only in how they report a bad value.

use crate::event::{format_number, Item};

/// A scalar JSON value, borrowed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar<'a> {
    Str(&'a str),
    Num(f64),
    Bool(bool),
}

/// Whether the key has a typed field; every other key is a custom item parameter.
pub fn is_standard_key(key: &str) -> bool {
    Item::TEXT_FIELDS.contains(&key) || Item::NUMBER_FIELDS.contains(&key)
}

/// Sets one item key. `Err` names the expected type ("a number", …).
pub fn set_item_field(item: &mut Item, key: &str, value: Scalar<'_>) -> Result<(), &'static str> {
    let text = |v: Scalar<'_>| -> Result<String, &'static str> {
        match v {
            Scalar::Str(s) => Ok(s.to_owned()),
            Scalar::Num(n) => Ok(format_number(n)),
            Scalar::Bool(_) => Err("a string"),
        }
    };
    if let Some(slot) = item.text_field_mut(key) {
        *slot = Some(text(value)?.into());
        return Ok(());
    }
    match key {
        "price" => item.price = Some(number(value).ok_or("a number")?),
        "quantity" => item.quantity = Some(number(value).ok_or("a number")?),
        "discount" => item.discount = Some(number(value).ok_or("a number")?),
        "index" => item.index = Some(index(value).ok_or("a non-negative integer")?),
        custom => {
            let v = match value {
                Scalar::Bool(b) => b.to_string(),
                other => text(other)?,
            };
            item.custom.push((custom.to_owned(), v));
        }
    }
    Ok(())
}

/// A finite number, from a JSON number or a numeric string (senders often stringify prices).
pub fn number(v: Scalar<'_>) -> Option<f64> {
    match v {
        Scalar::Num(n) => Some(n),
        Scalar::Str(s) => s.trim().parse::<f64>().ok(),
        Scalar::Bool(_) => None,
    }
    .filter(|n| n.is_finite())
}

fn index(v: Scalar<'_>) -> Option<u32> {
    match v {
        Scalar::Num(n) if n >= 0.0 && n.fract() == 0.0 && n <= f64::from(u32::MAX) => {
            Some(n as u32)
        }
        Scalar::Str(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// An item is only useful (and GA4 only accepts it) with an id or a name.
pub fn has_identity(item: &Item) -> bool {
    item.item_id.as_deref().is_some_and(|s| !s.is_empty())
        || item.item_name.as_deref().is_some_and(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_and_custom_keys() {
        let mut it = Item::default();
        set_item_field(&mut it, "item_id", Scalar::Num(123.0)).unwrap();
        set_item_field(&mut it, "price", Scalar::Str("59.90")).unwrap();
        set_item_field(&mut it, "index", Scalar::Num(2.0)).unwrap();
        set_item_field(&mut it, "size", Scalar::Num(42.0)).unwrap();
        set_item_field(&mut it, "gift", Scalar::Bool(true)).unwrap();
        assert_eq!(it.item_id.as_deref(), Some("123"));
        assert_eq!(it.price, Some(59.9));
        assert_eq!(it.index, Some(2));
        assert_eq!(
            it.custom,
            vec![("size".into(), "42".into()), ("gift".into(), "true".into())]
        );
        assert!(has_identity(&it));
        assert_eq!(
            set_item_field(&mut it, "quantity", Scalar::Str("two")),
            Err("a number")
        );
        assert_eq!(
            set_item_field(&mut it, "index", Scalar::Num(-1.0)),
            Err("a non-negative integer")
        );
        assert_eq!(
            set_item_field(&mut it, "item_name", Scalar::Bool(false)),
            Err("a string")
        );
        assert!(!has_identity(&Item::default()));
    }
}
