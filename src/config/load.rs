//! Reading config files and environment overrides, with errors that name the file, the key
//! and, where close, the key meant.

use std::fmt;
use std::path::{Path, PathBuf};

use super::{Config, DEFAULT_CONFIG, DEFAULT_CONFIG_PATH};

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
    let mut builder = config::Config::builder().add_source(config::File::from_str(
        text,
        config::FileFormat::Toml,
    ));
    if env {
        builder = builder.add_source(
            config::Environment::with_prefix("TAGRELAY")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
    }
    let raw = builder
        .build()
        .map_err(|e| ConfigError::new(source_name, vec![clean_toml_error(&e.to_string())]))?;
    serde_path_to_error::deserialize::<_, Config>(raw)
        .map_err(|e| ConfigError::new(source_name, vec![describe(&e, source_name)]))
}

fn clean_toml_error(msg: &str) -> String {
    format!("not valid TOML: {}", msg.trim())
}

/// Turns a serde error with its path into "unknown key `listn` in [server] of FILE; did you
/// mean `listen`?" style messages.
fn describe(err: &serde_path_to_error::Error<config::ConfigError>, source_name: &str) -> String {
    let path = err.path().to_string();
    let section = section_of(&path);
    let inner = err.inner().to_string();
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
        return format!("`{path}`: unknown value `{val}` in {source_name}{hint}");
    }
    let inner = strip_config_location(&inner);
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
    // serde_path_to_error paths look like `server.listn` or `tags[0].trigger.evnts`.
    let parent = match path.rsplit_once('.') {
        Some((p, _)) => p,
        None => return "the top level".into(),
    };
    format!("[{parent}]")
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
            super::super::TagConfig::Http(h) => {
                assert!(h.headers.contains_key("X-Api-Key"), "{:?}", h.headers.keys())
            }
            _ => panic!("wrong tag type"),
        }
    }
}
