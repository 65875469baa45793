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

/// For secrets people type or paste (the admin token): surrounding whitespace is dropped, the
/// same way typed input is trimmed, so `"  abc\n"` in a file and `abc` at the prompt match.
pub fn deserialize_trimmed<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Ok(Option::<Secret>::deserialize(d)?.map(|s| Secret(s.0.trim().to_owned())))
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
    expand_collecting(raw, lookup).map(|(s, _)| s)
}

/// Like [`expand_with`], also returning the substituted values (they are secrets to redact).
fn expand_collecting(
    raw: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(String, Vec<String>), String> {
    let mut substituted = Vec::new();
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
            Some(v) => {
                out.push_str(&v);
                substituted.push(v);
            }
            None => return Err(format!("environment variable `{name}` is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok((out, substituted))
}

/// Environment overrides are type-parsed (`TAGRELAY__ADMIN__TOKEN=12345678` arrives as a
/// number): secrets and env strings take any scalar as text.
fn scalar_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::S(s) => s,
        Scalar::I(n) => n.to_string(),
        Scalar::U(n) => n.to_string(),
        Scalar::F(n) => n.to_string(),
        Scalar::B(b) => b.to_string(),
    })
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = scalar_text(d)?;
        expand_env(&raw)
            .map(Secret)
            .map_err(serde::de::Error::custom)
    }
}

/// A string that may contain `${ENV}` references (HTTP tag URLs and header values). It
/// remembers what was substituted, so those parts can be redacted wherever the string shows.
/// `Debug` shows only the text outside the references.
#[derive(Clone, PartialEq, Eq)]
pub struct EnvString {
    pub value: String,
    pub substituted: Vec<String>,
}

impl EnvString {
    pub fn plain(value: impl Into<String>) -> Self {
        EnvString {
            value: value.into(),
            substituted: Vec::new(),
        }
    }
}

impl EnvString {
    /// The value with every substituted part replaced by `[redacted]`, for messages.
    pub fn redacted(&self) -> String {
        let mut shown = self.value.clone();
        for s in &self.substituted {
            if !s.is_empty() {
                shown = shown.replace(s.as_str(), "[redacted]");
            }
        }
        shown
    }
}

impl fmt::Debug for EnvString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = scalar_text(d)?;
        expand_collecting(&raw, |name| std::env::var(name).ok())
            .map(|(value, substituted)| EnvString { value, substituted })
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
    fn env_string_debug_hides_substituted_parts() {
        let (value, substituted) =
            expand_collecting("https://h/x?key=${K}", |_| Some("k3y".to_string())).unwrap();
        let e = EnvString { value, substituted };
        assert_eq!(e.value, "https://h/x?key=k3y");
        assert_eq!(format!("{e:?}"), "\"https://h/x?key=[redacted]\"");
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
