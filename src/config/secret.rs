//! Secrets in config: written as `${ENV_VAR}` references, held in a type that never prints.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A secret value (API secret, access token). `Debug` and `Display` show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself. Call only where it goes on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Expands `${NAME}` references in `raw` from the environment. Text outside references is kept.
pub fn expand_env(raw: &str) -> Result<String, String> {
    expand_with(raw, |name| std::env::var(name).ok())
}

pub(crate) fn expand_with(
    raw: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unterminated `${` reference (write `${NAME}`)".into());
        };
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`${{{name}}}` is not a valid environment variable reference"
            ));
        }
        match lookup(name) {
            Some(v) => out.push_str(&v),
            None => return Err(format!("environment variable `{name}` is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        expand_env(&raw).map(Secret).map_err(serde::de::Error::custom)
    }
}

/// A plain string that may contain `${ENV}` references (e.g. HTTP tag header values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvString(pub String);

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        expand_env(&raw)
            .map(EnvString)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("EAAB-very-secret");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "EAAB-very-secret");
    }

    #[test]
    fn expansion() {
        let env = |n: &str| (n == "TOKEN").then(|| "abc".to_string());
        assert_eq!(expand_with("${TOKEN}", env).unwrap(), "abc");
        assert_eq!(expand_with("Bearer ${TOKEN}!", env).unwrap(), "Bearer abc!");
        assert_eq!(expand_with("plain", env).unwrap(), "plain");
        let err = expand_with("${MISSING}", env).unwrap_err();
        assert!(err.contains("`MISSING`"), "{err}");
        assert!(expand_with("${oops", env).is_err());
    }
}
