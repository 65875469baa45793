//! A JSON tree that keeps object keys in order *with duplicates*.
//!
//! `serde_json::Value` silently keeps the last of two equal keys, but Google's validation server
//! reports them (`NAME_DUPLICATED`), so the Measurement Protocol body is parsed into this tree.
//! serde_json's recursion limit (128) still applies, so deep nesting is an error, not a stack
//! overflow.

use std::collections::HashMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(Number),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(bytes: &[u8]) -> Result<Json, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The JSON type name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "boolean",
            Json::Num(_) => "number",
            Json::Str(_) => "string",
            Json::Arr(_) => "array",
            Json::Obj(_) => "object",
        }
    }

    pub fn to_value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Num(n) => Value::Number(n.clone()),
            Json::Str(s) => Value::String(s.clone()),
            Json::Arr(a) => Value::Array(a.iter().map(Json::to_value).collect()),
            Json::Obj(o) => {
                Value::Object(o.iter().map(|(k, v)| (k.clone(), v.to_value())).collect())
            }
        }
    }
}

/// Keys of one object with duplicates collapsed to their last occurrence (JSON's usual
/// reading), in first-seen order. `dups` receives each key seen more than once.
pub fn dedup<'a>(
    obj: &'a [(String, Json)],
    mut dups: impl FnMut(&'a str),
) -> Vec<(&'a str, &'a Json)> {
    let mut out: Vec<(&str, &Json)> = Vec::with_capacity(obj.len());
    // Linear probing is fastest for the small objects real senders use; a map keeps
    // adversarial bodies with thousands of keys linear.
    if obj.len() <= 16 {
        for (k, v) in obj {
            match out.iter_mut().find(|(ok, _)| *ok == k.as_str()) {
                Some(slot) => {
                    dups(k);
                    slot.1 = v;
                }
                None => out.push((k, v)),
            }
        }
    } else {
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(obj.len());
        for (k, v) in obj {
            match index.get(k.as_str()).and_then(|&i| out.get_mut(i)) {
                Some(slot) => {
                    dups(k);
                    slot.1 = v;
                }
                None => {
                    index.insert(k, out.len());
                    out.push((k, v));
                }
            }
        }
    }
    out
}

pub fn get<'a>(fields: &[(&str, &'a Json)], key: &str) -> Option<&'a Json> {
    fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Num(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Num(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(Number::from_f64(v).map_or(Json::Null, Json::Num))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::Str(v))
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
        Json::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(Json::Arr(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some((k, v)) = map.next_entry::<String, Json>()? {
            out.push((k, v));
        }
        Ok(Json::Obj(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_duplicates_and_order() {
        let j = Json::parse(br#"{"b":1,"a":[true,null,"x"],"b":2.5}"#).unwrap();
        let Json::Obj(o) = &j else {
            panic!("not an object")
        };
        assert_eq!(o.len(), 3);
        let mut seen = Vec::new();
        let d = dedup(o, |k| seen.push(k.to_owned()));
        assert_eq!(seen, vec!["b"]);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].0, "b");
        assert_eq!(
            get(&d, "b"),
            Some(&Json::Num(Number::from_f64(2.5).unwrap()))
        );
        assert_eq!(
            j.to_value(),
            serde_json::json!({"b": 2.5, "a": [true, null, "x"]})
        );
    }

    #[test]
    fn large_objects_dedup_through_the_map() {
        let mut body = String::from("{");
        for i in 0..40 {
            body.push_str(&format!("\"k{}\":{},", i % 30, i));
        }
        body.push_str("\"end\":0}");
        let Json::Obj(o) = Json::parse(body.as_bytes()).unwrap() else {
            panic!("not an object")
        };
        let mut dups = 0;
        let d = dedup(&o, |_| dups += 1);
        assert_eq!(dups, 10);
        assert_eq!(d.len(), 31);
        assert_eq!(get(&d, "k5"), Some(&Json::Num(35.into())));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = "[".repeat(10_000);
        assert!(Json::parse(deep.as_bytes()).is_err());
    }
}
