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

impl LoadedConfig {
    /// The error for problems found validating this configuration: each caused by an
    /// environment variable names it (see [`Config::env_overrides`]).
    pub fn invalid(&self, problems: Vec<String>) -> ConfigError {
        ConfigError::new(&self.source, self.config.name_env_causes(problems))
    }
}

/// A key of the configuration that a `TAGRELAY__SECTION__KEY` environment variable set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvOverride {
    /// The variable, e.g. `TAGRELAY__SERVER__TRUSTED_PROXIES`.
    pub var: String,
    /// The key it set, dotted: `server.trusted_proxies`.
    pub key: String,
}

impl Config {
    /// The environment variable that set `path` (a key, or anything below it such as
    /// `server.trusted_proxies[0]`), if one did.
    pub fn env_cause(&self, path: &str) -> Option<&EnvOverride> {
        env_cause(&self.env_overrides, path)
    }

    /// Appends to each problem that starts with a key an environment variable set which
    /// variable it was: the file does not say that value, so naming the file alone misleads.
    pub fn name_env_causes(&self, problems: Vec<String>) -> Vec<String> {
        problems
            .into_iter()
            .map(|p| {
                let key = p.split([':', ' ']).next().unwrap_or("").trim_matches('`');
                match self.env_cause(key) {
                    Some(o) => format!(
                        "{p} (set by the environment variable {}, not the file)",
                        o.var
                    ),
                    None => p,
                }
            })
            .collect()
    }
}

/// The variable that set `path` or a key below it (an unknown key the environment added).
fn env_within<'a>(overrides: &'a [EnvOverride], path: &str) -> Option<&'a EnvOverride> {
    overrides.iter().find(|o| {
        o.key
            .strip_prefix(path)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    })
}

fn env_cause<'a>(overrides: &'a [EnvOverride], path: &str) -> Option<&'a EnvOverride> {
    overrides.iter().find(|o| {
        path.strip_prefix(o.key.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    })
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

/// The prefix of environment variables that override keys: `TAGRELAY__SECTION__KEY`.
pub const ENV_PREFIX: &str = "TAGRELAY__";

/// Parses TOML text (named `source_name` in messages), optionally with the
/// `TAGRELAY__SECTION__KEY` overrides of this process's environment.
pub fn load_str(text: &str, source_name: &str, env: bool) -> Result<Config, ConfigError> {
    let vars: Vec<(String, String)> = if env {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect()
    } else {
        Vec::new()
    };
    load_str_with_env(text, source_name, &vars)
}

/// [`load_str`] with these `TAGRELAY__…` variables as the environment.
pub fn load_str_with_env(
    text: &str,
    source_name: &str,
    vars: &[(String, String)],
) -> Result<Config, ConfigError> {
    let raw: serde_json::Value = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| ConfigError::new(source_name, vec![clean_toml_error(&e.to_string())]))?;
    let (raw, overrides) = apply_env(raw, vars).map_err(|p| ConfigError::new(source_name, p))?;
    deserialize_all(raw, source_name, &overrides)
        .map(|mut c| {
            c.env_overrides = overrides;
            c
        })
        .map_err(|p| ConfigError::new(source_name, p))
}

/// Sets each `TAGRELAY__SECTION__KEY` variable's value at `section.key` of the parsed file.
/// A value is read as a TOML value when it is one (`8080`, `true`, `["10.0.0.0/8"]`,
/// `{ a = 1 }`), else taken as text (`0.0.0.0:8080`, `json`), so list keys can be set from
/// the environment too.
fn apply_env(
    mut raw: serde_json::Value,
    vars: &[(String, String)],
) -> Result<(serde_json::Value, Vec<EnvOverride>), Vec<String>> {
    use serde_json::Value;
    let mut problems = Vec::new();
    let mut overrides = Vec::new();
    let mut vars: Vec<&(String, String)> = vars.iter().collect();
    // Deterministic, and a parent before its children.
    vars.sort();
    for (var, value) in vars {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            problems.push(format!(
                "environment variable {var}: name the key as TAGRELAY__SECTION__KEY (e.g. TAGRELAY__SERVER__LISTEN)"
            ));
            continue;
        }
        if matches!(path[0].as_str(), "clients" | "tags") {
            problems.push(format!(
                "environment variable {var}: [[{}]] entries cannot be set from the environment (only keys of [server], [cookies], [outbox], [admin] and [telemetry]); write `${{VAR}}` in the file for a value that varies",
                path[0]
            ));
            continue;
        }
        let key = path.join(".");
        let mut at = &mut raw;
        let mut ok = true;
        for (i, seg) in path.iter().enumerate() {
            if !at.is_object() {
                if at.is_null() {
                    *at = Value::Object(serde_json::Map::new());
                } else {
                    problems.push(format!(
                        "environment variable {var}: `{}` is not a table, so it has no key `{seg}`; only keys of sections such as [server] can be set from the environment",
                        path[..i].join(".")
                    ));
                    ok = false;
                    break;
                }
            }
            let Value::Object(map) = at else {
                unreachable!("made an object above")
            };
            at = map.entry(seg.clone()).or_insert(Value::Null);
        }
        if ok {
            *at = env_value(value);
            overrides.push(EnvOverride {
                var: var.clone(),
                key,
            });
        }
    }
    if problems.is_empty() {
        Ok((raw, overrides))
    } else {
        Err(problems)
    }
}

/// An environment variable's value: the TOML value it spells, or else its text.
fn env_value(text: &str) -> serde_json::Value {
    let parsed = toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .filter(|t| t.len() == 1)
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !contains_datetime(v))
        .and_then(|v| serde_json::to_value(v).ok());
    parsed.unwrap_or_else(|| serde_json::Value::String(text.to_owned()))
}

/// TOML dates are text to tagrelay's config.
fn contains_datetime(v: &toml::Value) -> bool {
    match v {
        toml::Value::Datetime(_) => true,
        toml::Value::Array(a) => a.iter().any(contains_datetime),
        toml::Value::Table(t) => t.values().any(contains_datetime),
        _ => false,
    }
}

/// Deserializes section by section and entry by entry, so one run reports every problem
/// rather than stopping at the first.
fn deserialize_all(
    raw: serde_json::Value,
    source_name: &str,
    env: &[EnvOverride],
) -> Result<Config, Vec<String>> {
    use serde_json::Value;
    let mut problems = Vec::new();
    let serde_json::Value::Object(mut top) = raw else {
        return Err(vec![format!(
            "{source_name}: the file must be a TOML table"
        )]);
    };
    let mut probe = serde_json::Map::new();
    for key in [
        "server",
        "cookies",
        "outbox",
        "admin",
        "telemetry",
        "stitching",
    ] {
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
            "telemetry",
            "stitching",
            "clients",
            "tags",
        ];
        let hint = suggestion(key, &known)
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_else(|| format!(" (known keys: {})", known.join(", ")));
        match env_within(env, key) {
            Some(o) => problems.push(format!(
                "unknown section `{key}` set by the environment variable {}{hint}",
                o.var
            )),
            None => problems.push(format!(
                "unknown key `{key}` in the top level of {source_name}{hint}"
            )),
        }
    }
    let mut config = match serde_path_to_error::deserialize::<_, Config>(Value::Object(probe)) {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(describe(
                e.path().to_string(),
                &e.inner().to_string(),
                source_name,
                env,
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
                env,
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
                env,
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
/// mean `listen`?" style messages. A value an environment variable set is reported under the
/// variable's name, not the file's.
fn describe(mut path: String, inner: &str, source_name: &str, env: &[EnvOverride]) -> String {
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
        // The path ends with the unknown key itself (`server.listn`).
        if let Some(o) = env_within(env, &path) {
            return format!(
                "unknown key `{key}` in {section}, set by the environment variable {}{hint}",
                o.var
            );
        }
        return format!("unknown key `{key}` in {section} of {source_name}{hint}");
    }
    if let Some(o) = env_cause(env, &path) {
        let mut msg = format!("environment variable {} (sets `{}`): {inner}", o.var, o.key);
        if inner.contains("expected a sequence") {
            msg.push_str(&format!(
                "; write a list as TOML, e.g. {}='[\"a\", \"b\"]'",
                o.var
            ));
        }
        return msg;
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

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn list_keys_and_typed_values_come_from_the_environment() {
        let cfg = load_str_with_env(
            "[server]\nlisten = \"127.0.0.1:1\"\n",
            "x.toml",
            &env(&[
                (
                    "TAGRELAY__SERVER__TRUSTED_PROXIES",
                    r#"["10.0.0.0/8", "192.168.0.0/16"]"#,
                ),
                ("TAGRELAY__SERVER__LISTEN", "0.0.0.0:8080"),
                ("TAGRELAY__SERVER__MAX_BODY_BYTES", "1024"),
                ("TAGRELAY__SERVER__ITP_CHECK", "true"),
                ("TAGRELAY__SERVER__LOG_FORMAT", "json"),
                ("TAGRELAY__TELEMETRY__SAMPLING_RATIO", "0.25"),
                ("TAGRELAY__ADMIN__TOKEN", "1234567890123456"),
            ]),
        )
        .unwrap();
        let s = &cfg.server;
        assert_eq!(
            s.trusted_proxies,
            vec![
                "10.0.0.0/8".parse::<ipnet::IpNet>().unwrap(),
                "192.168.0.0/16".parse().unwrap()
            ]
        );
        assert_eq!(s.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(s.max_body_bytes, 1024);
        assert!(s.itp_check);
        assert_eq!(s.log_format, crate::telemetry::LogFormat::Json);
        assert_eq!(cfg.telemetry.sampling_ratio, 0.25);
        assert_eq!(
            cfg.admin.token.as_ref().unwrap().expose(),
            "1234567890123456"
        );
        assert_eq!(
            cfg.env_cause("server.trusted_proxies[1]")
                .map(|o| o.var.as_str()),
            Some("TAGRELAY__SERVER__TRUSTED_PROXIES")
        );
        assert!(cfg.env_cause("server.listen_x").is_none());
    }

    #[test]
    fn an_error_from_the_environment_names_the_variable_not_the_file() {
        let problems = |vars: &[(&str, &str)]| {
            load_str_with_env("[server]\n", "x.toml", &env(vars))
                .unwrap_err()
                .problems
                .join("\n")
        };
        let p = problems(&[("TAGRELAY__SERVER__TRUSTED_PROXIES", "10.0.0.0/8")]);
        assert!(p.contains("TAGRELAY__SERVER__TRUSTED_PROXIES"), "{p}");
        assert!(p.contains("write a list as TOML"), "{p}");
        assert!(!p.contains("x.toml"), "{p}");
        let p = problems(&[("TAGRELAY__SERVER__LISTN", "0.0.0.0:1")]);
        assert!(p.contains("TAGRELAY__SERVER__LISTN"), "{p}");
        assert!(p.contains("did you mean `listen`?"), "{p}");
        assert!(!p.contains("x.toml"), "{p}");
        let p = problems(&[("TAGRELAY__SERVR__LISTEN", "0.0.0.0:1")]);
        assert!(
            p.contains("TAGRELAY__SERVR__LISTEN") && p.contains("`server`"),
            "{p}"
        );
        let p = problems(&[("TAGRELAY__CLIENTS__TYPE", "ga4")]);
        assert!(p.contains("TAGRELAY__CLIENTS__TYPE"), "{p}");
        // The same mistake in the file names the file.
        let p = load_str_with_env(
            "[server]\ntrusted_proxies = \"10.0.0.0/8\"\n",
            "x.toml",
            &[],
        )
        .unwrap_err()
        .problems
        .join("\n");
        assert!(p.contains("x.toml") && !p.contains("TAGRELAY__"), "{p}");
        // A validation problem of a key the environment set names the variable too.
        let cfg = load_str_with_env(
            "",
            "x.toml",
            &env(&[("TAGRELAY__SERVER__PATH_PREFIX", "no-slash")]),
        )
        .unwrap();
        let named = cfg.name_env_causes(vec![
            "server.path_prefix: `no-slash` must start with `/`".into(),
            "server.listen: fine".into(),
        ]);
        assert!(
            named[0].ends_with(
                "(set by the environment variable TAGRELAY__SERVER__PATH_PREFIX, not the file)"
            ),
            "{named:?}"
        );
        assert_eq!(named[1], "server.listen: fine");
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
