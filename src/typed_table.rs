//! `[[clients]]` and `[[tags]]` entries are tables picked by their `type = "…"` key. This reads
//! them with errors that keep the key path, and [`typed_configs!`] declares a registry of such
//! types in one list: adding a component type is one line there.

use serde::Deserialize;

/// Reads a `type = "..."` table. Internally tagged serde enums lose the path of errors inside
/// the variant, so the variant is deserialized separately and its inner path is carried in
/// the message (`at `trigger`: …`), which the config loader folds back into the key path.
pub fn tagged<'de, D: serde::Deserializer<'de>>(
    d: D,
    what: &str,
    types: &'static [&'static str],
) -> Result<(String, serde_json::Value), D::Error> {
    use serde::de::Error;
    let mut table = serde_json::Value::deserialize(d)?;
    let kind = match table.get("type") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(D::Error::custom(format!(
                "`type` of a {what} must be a string"
            )))
        }
        None => {
            return Err(D::Error::custom(format!(
                "missing key `type` (one of: {})",
                types.join(", ")
            )))
        }
    };
    if !types.contains(&kind.as_str()) {
        return Err(D::Error::unknown_variant(&kind, types));
    }
    if let Some(map) = table.as_object_mut() {
        map.remove("type");
    }
    Ok((kind, table))
}

/// Deserializes the rest of a typed table, carrying the inner path in the message.
pub fn variant<'de, D: serde::Deserializer<'de>, T: serde::de::DeserializeOwned>(
    table: serde_json::Value,
) -> Result<T, D::Error> {
    use serde::de::Error;
    serde_path_to_error::deserialize(table).map_err(|e| {
        let path = e.path().to_string();
        if path.is_empty() || path == "." {
            D::Error::custom(e.into_inner())
        } else {
            D::Error::custom(format!("at `{path}`: {}", e.into_inner()))
        }
    })
}

/// Declares the enum of a component's config types, the list of their `type` names, its
/// `Deserialize`, `kind()`, and `spec()`, which hands out each config as the trait object the
/// component defines (what every type must be able to do: build itself, name itself…).
macro_rules! typed_configs {
    (
        $(#[$meta:meta])*
        pub enum $name:ident($what:literal, $types:ident) as dyn $spec:path {
            $($variant:ident($kind:literal, $config:ty)),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub enum $name {
            $($variant($config)),*
        }

        /// Every `type` name, in registry order.
        pub const $types: &[&str] = &[$($kind),*];

        impl $name {
            /// The `type` name.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => $kind),*
                }
            }

            /// The config as its component sees it.
            pub fn spec(&self) -> &dyn $spec {
                match self {
                    $(Self::$variant(c) => c),*
                }
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let (kind, table) = $crate::typed_table::tagged::<D>(d, $what, $types)?;
                match kind.as_str() {
                    $($kind => $crate::typed_table::variant::<D, _>(table).map(Self::$variant),)*
                    other => Err(<D::Error as serde::de::Error>::custom(format!(
                        "unknown type `{other}`"
                    ))),
                }
            }
        }
    };
}

pub(crate) use typed_configs;
