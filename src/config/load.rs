//! Reading config files and environment overrides, with errors that name the file, the key
//! and, where close, the key meant.

use std::fmt;
use std::path::{Path, PathBuf};

use super::{Config, DEFAULT_CONFIG, DEFAULT_CONFIG_PATH};
use crate::clients::ClientConfig;
use crate::tags::TagConfig;

/// Where a configuration came from, for messages and reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    /// The copy of `config/tagrelay.toml` compiled into the binary.
    Embedded,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Embedded => write!(f, "{DEFAULT_CONFIG_PATH} (embedded)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Config,
    pub source: Source,
}

/// Every problem found in one configuration, each naming the file and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source: String,
    pub problems: Vec<String>,
}

impl ConfigError {
    pub fn new(source: impl fmt::Display, problems: Vec<String>) -> Self {
        ConfigError {
            source: source.to_string(),
            problems,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "{}: {n} problem{}",
            self.source,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Loads the configuration: `path` if given, else `config/tagrelay.toml` on disk, else the
/// embedded copy; then applies `TAGRELAY__SECTION__KEY` environment overrides.
pub fn load(path: Option<&Path>) -> Result<LoadedConfig, ConfigError> {
    let (text, source) = match path {
        Some(p) => (read(p)?, Source::File(p.to_path_buf())),
        None => {
            let p = Path::new(DEFAULT_CONFIG_PATH);
            if p.exists() {
                (read(p)?, Source::File(p.to_path_buf()))
            } else {
                (DEFAULT_CONFIG.to_owned(), Source::Embedded)
            }
        }
    };
    let config = load_str(&text, &source.to_string(), true)?;
    Ok(LoadedConfig { config, source })
}

fn read(p: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(p)
        .map_err(|e| ConfigError::new(p.display(), vec![format!("cannot read file: {e}")]))
}

/// Parses TOML text (named `source_name` in messages), optionally with environment overrides.
pub fn load_str(text: &str, source_name: &str, env: bool) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml));
    if env {
        builder = builder.add_source(
            config::Environment::with_prefix("TAGRELAY")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
    }
    let raw: serde_json::Value = builder
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| ConfigError::new(source_name, vec![clean_toml_error(&e.to_string())]))?;
    deserialize_all(raw, source_name).map_err(|p| ConfigError::new(source_name, p))
}

/// Deserializes section by section and entry by entry, so one run reports every problem
/// rather than stopping at the first.
fn deserialize_all(raw: serde_json::Value, source_name: &str) -> Result<Config, Vec<String>> {
    use serde_json::Value;
    let mut problems = Vec::new();
    let serde_json::Value::Object(mut top) = raw else {
        return Err(vec![format!(
            "{source_name}: the file must be a TOML table"
        )]);
    };
    let mut probe = serde_json::Map::new();
    for key in ["server", "cookies", "outbox", "admin", "stitching"] {
        if let Some(v) = top.remove(key) {
            probe.insert(key.to_owned(), v);
        }
    }
    let clients = top.remove("clients");
    let tags = top.remove("tags");
    for key in top.keys() {
        let known = [
            "server",
            "cookies",
            "outbox",
            "admin",
            "stitching",
            "clients",
            "tags",
        ];
        let hint = suggestion(key, &known)
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_else(|| format!(" (known keys: {})", known.join(", ")));
        problems.push(format!(
            "unknown key `{key}` in the top level of {source_name}{hint}"
        ));
    }
    let mut config = match serde_path_to_error::deserialize::<_, Config>(Value::Object(probe)) {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(describe(
                e.path().to_string(),
                &e.inner().to_string(),
                source_name,
            ));
            None
        }
    };
    let list = |name: &str, v: Option<Value>, problems: &mut Vec<String>| -> Vec<Value> {
        match v {
            None => Vec::new(),
            Some(Value::Array(a)) => a,
            Some(_) => {
                problems.push(format!(
                    "`{name}` in {source_name}: must be an array of tables ([[{name}]])"
                ));
                Vec::new()
            }
        }
    };
    let mut parsed_clients = Vec::new();
    for (i, v) in list("clients", clients, &mut problems)
        .into_iter()
        .enumerate()
    {
        match serde_path_to_error::deserialize::<_, ClientConfig>(v) {
            Ok(c) => parsed_clients.push(c),
            Err(e) => problems.push(describe(
                format!("clients[{i}]{}", sub(e.path().to_string())),
                &e.inner().to_string(),
                source_name,
            )),
        }
    }
    let mut parsed_tags = Vec::new();
    for (i, v) in list("tags", tags, &mut problems).into_iter().enumerate() {
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .map(|n| format!("({n})"))
            .unwrap_or_default();
        match serde_path_to_error::deserialize::<_, TagConfig>(v) {
            Ok(t) => parsed_tags.push(t),
            Err(e) => problems.push(describe(
                format!("tags[{i}]{name}{}", sub(e.path().to_string())),
                &e.inner().to_string(),
                source_name,
            )),
        }
    }
    match config.take() {
        Some(mut c) if problems.is_empty() => {
            c.clients = parsed_clients;
            c.tags = parsed_tags;
            Ok(c)
        }
        _ => Err(problems),
    }
}

fn sub(path: String) -> String {
    if path.is_empty() || path == "." {
        String::new()
    } else {
        format!(".{path}")
    }
}

fn clean_toml_error(msg: &str) -> String {
    format!("not valid TOML: {}", msg.trim())
}

/// Turns a serde error with its path into "unknown key `listn` in [server] of FILE; did you
/// mean `listen`?" style messages.
fn describe(mut path: String, inner: &str, source_name: &str) -> String {
    let mut inner = strip_config_location(inner);
    // Errors from inside `type = …` tables carry their own sub-path (see config::tagged).
    if let Some(rest) = inner.strip_prefix("at `") {
        if let Some((sub, msg)) = rest.split_once("`: ") {
            path = format!("{path}.{sub}");
            inner = msg.to_owned();
        }
    }
    let section = section_of(&path);
    // serde: "unknown field `listn`, expected one of `listen`, `admin_listen`"
    if let Some(rest) = inner.strip_prefix("unknown field `") {
        let (key, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
        let hint = suggestion(key, &expected)
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_else(|| {
                if expected.is_empty() {
                    String::new()
                } else {
                    format!(" (known keys: {})", expected.join(", "))
                }
            });
        return format!("unknown key `{key}` in {section} of {source_name}{hint}");
    }
    if let Some(rest) = inner.strip_prefix("unknown variant `") {
        let (val, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
        let hint = suggestion(val, &expected)
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_else(|| format!(" (expected one of: {})", expected.join(", ")));
        return format!("`{path}` in {source_name}: unknown value `{val}`{hint}");
    }
    if path.is_empty() || path == "." {
        format!("{source_name}: {inner}")
    } else {
        format!("`{path}` in {source_name}: {inner}")
    }
}

/// The config crate appends " for key `x` in ..." / origins; the path says it better.
fn strip_config_location(msg: &str) -> String {
    let msg = msg.split(" for key `").next().unwrap_or(msg);
    msg.split(" in config/").next().unwrap_or(msg).to_owned()
}

fn section_of(path: &str) -> String {
    // Paths look like `server.listn` or `tags[1](meta).trigger.evnts`.
    let parent = match path.rsplit_once('.') {
        Some((p, _)) => p,
        None => return "the top level".into(),
    };
    match parent.split_once('.') {
        // An entry of an array of tables: say which one, then the section within it.
        Some((entry, rest)) if entry.contains('[') => {
            let table = entry.split('[').next().unwrap_or(entry);
            format!("[{table}.{rest}] of {entry}")
        }
        _ => format!("[{parent}]"),
    }
}

fn suggestion<'a>(given: &str, expected: &[&'a str]) -> Option<&'a str> {
    expected
        .iter()
        .map(|c| (strsim::jaro_winkler(given, c), *c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misspelt_key_names_key_file_and_fix() {
        let err = load_str("[server]\nlistn = \"127.0.0.1:1\"\n", "x.toml", false).unwrap_err();
        let msg = err.problems.join("\n");
        assert!(msg.contains("unknown key `listn`"), "{msg}");
        assert!(msg.contains("[server]"), "{msg}");
        assert!(msg.contains("x.toml"), "{msg}");
        assert!(msg.contains("did you mean `listen`?"), "{msg}");
    }

    #[test]
    fn embedded_default_parses() {
        let cfg = load_str(DEFAULT_CONFIG, "embedded", false).unwrap();
        assert!(!cfg.clients.is_empty());
    }

    #[test]
    fn map_keys_keep_their_case() {
        let cfg = load_str(
            "[[tags]]\nname = \"meta\"\ntype = \"http\"\nurl = \"http://127.0.0.1:1/x\"\n[tags.headers]\nX-Api-Key = \"k\"\n",
            "x.toml",
            false,
        )
        .unwrap();
        match &cfg.tags[0] {
            TagConfig::Http(h) => {
                assert!(
                    h.headers.contains_key("X-Api-Key"),
                    "{:?}",
                    h.headers.keys()
                )
            }
            _ => panic!("wrong tag type"),
        }
    }
}
