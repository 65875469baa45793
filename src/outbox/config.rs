//! `[outbox]`: where and how events are stored, back-pressure, retries and delivery threads;
//! `[outbox.redis]`: the shared engine that lets replicas scale out.

use serde::Deserialize;

use crate::secret::Secret;

/// Which storage engine holds the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The outbox log and SQLite on this machine's disk (one per replica).
    #[default]
    Embedded,
    /// Redis / Valkey Streams shared by every replica (`[outbox.redis]`).
    Redis,
}

/// What this process does with the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Takes hits and delivers.
    #[default]
    All,
    /// Takes hits; delivers nothing (other processes sharing the store deliver).
    Ingest,
    /// Delivers only: no public listener.
    Deliver,
}

impl Role {
    pub fn takes_hits(self) -> bool {
        matches!(self, Role::All | Role::Ingest)
    }

    pub fn delivers(self) -> bool {
        matches!(self, Role::All | Role::Deliver)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Ingest => "ingest",
            Role::Deliver => "deliver",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FsyncMode {
    /// One fsync per group commit: survives power loss up to the last commit.
    #[default]
    Batch,
    /// fsync on every commit *and* wait for it before answering (same as batch in effect,
    /// kept distinct for operators who want the word).
    Always,
    /// Write through to the OS only: survives a process crash, not a power cut.
    Off,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    pub backend: Backend,
    pub role: Role,
    /// Read with `backend = "redis"` only.
    pub redis: RedisConfig,
    pub path: String,
    pub fsync: FsyncMode,
    /// Longest a hit waits for its group commit.
    pub commit_interval_ms: u64,
    /// Most records one commit takes.
    pub commit_max_records: usize,
    /// Back-pressure: above either cap new hits get 503 + Retry-After.
    pub max_records: u64,
    pub max_bytes: u64,
    /// Give up (dead-letter) after this long.
    pub max_retry_age_secs: u64,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// Requests of one tag in flight at once (each carries up to the tag's batch size).
    pub dispatch_concurrency: usize,
    /// How long a dispatcher owns leased records before they become due again (must exceed
    /// the longest batch send; only matters if a send hangs or a dispatcher dies).
    pub lease_timeout_ms: u64,
    /// When traffic is light, wait this long after a wake-up so batches fill.
    pub dispatch_linger_ms: u64,
    /// Threads that send to vendors (0 = one per CPU). They run apart from the threads that
    /// answer hits.
    pub dispatch_threads: usize,
    /// Unix nice value of the sending threads (0–19): above 0, answering hits wins the CPU
    /// whenever both want it, and sending uses what is left (the outbox holds the
    /// difference).
    pub dispatch_nice: i32,
    /// Dead letters older than this are deleted (0: kept until replayed or deleted by hand).
    pub dead_letter_max_age_secs: u64,
    /// At most this many dead letters are kept, the newest (0: no cap).
    pub dead_letter_max_records: u64,
    /// Size of each file of the outbox log (hits' events until they are delivered).
    pub log_segment_bytes: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            backend: Backend::Embedded,
            role: Role::All,
            redis: RedisConfig::default(),
            path: "data/outbox".into(),
            fsync: FsyncMode::Batch,
            commit_interval_ms: 2,
            commit_max_records: 4096,
            max_records: 1_000_000,
            max_bytes: 1 << 30,
            max_retry_age_secs: 24 * 3600,
            retry_initial_ms: 1_000,
            retry_max_ms: 300_000,
            dispatch_concurrency: 4,
            lease_timeout_ms: 300_000,
            dispatch_linger_ms: 50,
            dispatch_threads: 0,
            dispatch_nice: 10,
            dead_letter_max_age_secs: 30 * 24 * 3600,
            dead_letter_max_records: 100_000,
            log_segment_bytes: 32 << 20,
        }
    }
}

/// `[outbox.redis]`: the shared outbox on Redis or Valkey Streams.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]`, `rediss://` for TLS. A secret as a whole
    /// (it may carry a password): never printed, `${VAR}` references expanded.
    pub url: Option<Secret>,
    /// Find the primary through Sentinel instead of a fixed `url`.
    pub sentinel: Option<SentinelConfig>,
    /// Prefix of every key, so that several deployments can share one Redis.
    pub key_prefix: String,
    /// Streams per tag (each its own key: a Redis Cluster could spread them).
    pub partitions: u16,
    /// Replicas that must confirm each group commit (`WAIT`) before its hits are answered;
    /// 0 answers once the primary has the events.
    pub wait_replicas: u32,
    /// Longest a group commit waits for those replicas; fewer confirmed → 503 + Retry-After.
    pub wait_timeout_ms: u64,
    /// Connecting to Redis and each reply (other than `WAIT`) may take this long.
    pub timeout_ms: u64,
    /// Most of `max_records` / `max_bytes` one tag's backlog may take (percent), so that a
    /// vendor that is down cannot fill Redis for the tags whose vendors are fine.
    pub max_tag_share_percent: u8,
    /// Dead letters are also trimmed (oldest first) to about this many payload bytes.
    pub dead_letter_max_bytes: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            sentinel: None,
            key_prefix: "tagrelay".into(),
            partitions: 4,
            wait_replicas: 0,
            wait_timeout_ms: 1_000,
            timeout_ms: 2_000,
            max_tag_share_percent: 50,
            dead_letter_max_bytes: 256 << 20,
        }
    }
}

/// `sentinel = { master = "...", nodes = ["host:port", ...] }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The name the sentinels monitor the primary under.
    pub master: String,
    pub nodes: Vec<String>,
    /// For the primary (and its replicas).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// For the sentinels themselves, when they require one.
    #[serde(default)]
    pub sentinel_password: Option<Secret>,
    /// TLS to the primary and to the sentinels.
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub db: i64,
}

/// A `redis://` URL as messages may show it: the password, if any, replaced. Works on text
/// that does not parse as a URL too (the message about it must not leak the password).
pub fn shown_url(raw: &str) -> String {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return "(not a URL)".into();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return raw.to_owned();
    };
    let user = match rest[..at].split_once(':') {
        Some((user, _)) => format!("{user}:[redacted]"),
        None => rest[..at].to_owned(),
    };
    format!("{scheme}://{user}@{}", &rest[at + 1..])
}

impl OutboxConfig {
    /// Problems with `backend`, `role` and `[outbox.redis]`, each naming its key. Offline:
    /// nothing here connects anywhere (`tagrelay check`).
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.backend == Backend::Embedded && self.role != Role::All {
            problems.push(format!(
                "outbox.role: `{}` needs backend = \"redis\"; with the embedded outbox no other process can reach this one's events (use role = \"all\")",
                self.role.as_str()
            ));
        }
        if self.backend == Backend::Redis {
            self.redis.validate(&mut problems);
        }
        problems
    }
}

const CLUSTER_REFUSED: &str = "Redis Cluster is not supported yet (a group commit would span shards): point at one primary, with replicas and Sentinel for failover";

impl RedisConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        match (&self.url, &self.sentinel) {
            (None, None) => problems.push(
                "outbox.redis.url: required with backend = \"redis\" (e.g. url = \"redis://redis:6379\"), or set outbox.redis.sentinel".into(),
            ),
            (Some(_), Some(_)) => problems.push(
                "outbox.redis.sentinel: give either url or sentinel, not both".into(),
            ),
            (Some(url), None) => {
                if let Err(m) = check_url(url.expose()) {
                    problems.push(format!("outbox.redis.url: {m}"));
                }
            }
            (None, Some(s)) => {
                if s.master.trim().is_empty() {
                    problems.push("outbox.redis.sentinel.master: must name the primary the sentinels monitor (their `sentinel monitor <name> ...`)".into());
                }
                if s.nodes.is_empty() {
                    problems.push("outbox.redis.sentinel.nodes: list at least one sentinel as \"host:port\" (three or more for failover)".into());
                }
                for n in &s.nodes {
                    if !valid_host_port(n) {
                        problems.push(format!(
                            "outbox.redis.sentinel.nodes: `{n}` must be \"host:port\" (e.g. \"sentinel-0:26379\")"
                        ));
                    }
                }
                if !(0..=15).contains(&s.db) {
                    problems.push(format!(
                        "outbox.redis.sentinel.db: {} must be between 0 and 15",
                        s.db
                    ));
                }
            }
        }
        let p = &self.key_prefix;
        if p.is_empty()
            || p.len() > 64
            || p.chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '{' | '}'))
        {
            problems.push(format!(
                "outbox.redis.key_prefix: `{p}` must be 1 to 64 characters without spaces or braces (e.g. \"tagrelay\" or \"tagrelay-staging\")"
            ));
        }
        if !(1..=256).contains(&self.partitions) {
            problems.push(format!(
                "outbox.redis.partitions: {} must be between 1 and 256",
                self.partitions
            ));
        }
        if self.wait_replicas > 0 && self.wait_timeout_ms == 0 {
            problems.push(
                "outbox.redis.wait_timeout_ms: must be greater than 0 when wait_replicas is set (0 would wait forever)".into(),
            );
        }
        if self.timeout_ms < 100 {
            problems.push(format!(
                "outbox.redis.timeout_ms: {} is too short; at least 100",
                self.timeout_ms
            ));
        }
        if !(1..=100).contains(&self.max_tag_share_percent) {
            problems.push(format!(
                "outbox.redis.max_tag_share_percent: {} must be between 1 and 100",
                self.max_tag_share_percent
            ));
        }
    }
}

fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.trim().is_empty()
                && !host.contains('/')
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    }
}

fn check_url(raw: &str) -> Result<(), String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("is empty (is its environment variable set but empty?)".into());
    }
    let shown = shown_url(raw);
    // `redis://a:6379,b:6379` lists nodes: that is how cluster clients are configured.
    if raw.contains(',') {
        return Err(format!("`{shown}` lists several nodes: {CLUSTER_REFUSED}"));
    }
    let url = reqwest::Url::parse(raw).map_err(|e| {
        format!("`{shown}` is not a URL ({e}); write it as \"redis://host:6379\" or \"rediss://host:6380\" for TLS")
    })?;
    match url.scheme() {
        "redis" | "rediss" => {}
        "redis+unix" | "unix" => return Ok(()),
        s if s.contains("cluster") => return Err(format!("`{shown}`: {CLUSTER_REFUSED}")),
        s => {
            return Err(format!(
                "`{shown}`: scheme `{s}` is not redis:// or rediss:// (TLS)"
            ))
        }
    }
    let host = url.host_str().unwrap_or("");
    if host.is_empty() {
        return Err(format!("`{shown}` names no host"));
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() && !db.parse::<u8>().is_ok_and(|d| d <= 15) {
        return Err(format!(
            "`{shown}`: the path must be a database number from 0 to 15, not `{db}`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis(url: &str) -> OutboxConfig {
        OutboxConfig {
            backend: Backend::Redis,
            redis: RedisConfig {
                url: Some(Secret::new(url)),
                ..RedisConfig::default()
            },
            ..OutboxConfig::default()
        }
    }

    #[test]
    fn the_default_is_the_embedded_engine_taking_hits_and_delivering() {
        let c = OutboxConfig::default();
        assert_eq!((c.backend, c.role), (Backend::Embedded, Role::All));
        assert!(c.validate().is_empty());
    }

    #[test]
    fn redis_urls_are_checked_and_passwords_never_shown() {
        assert!(redis("redis://127.0.0.1:6379").validate().is_empty());
        assert!(redis("rediss://user:pw@redis.example:6380/2")
            .validate()
            .is_empty());
        assert!(redis("redis+unix:///run/redis.sock").validate().is_empty());
        let p = redis("redis://:hunter2@a:6379,b:6379").validate();
        assert!(p[0].contains("Redis Cluster is not supported"), "{p:?}");
        assert!(!p[0].contains("hunter2"), "{p:?}");
        assert!(p[0].contains("[redacted]"), "{p:?}");
        let p = redis("redis+cluster://a:6379").validate();
        assert!(p[0].contains("Redis Cluster is not supported"), "{p:?}");
        let p = redis("http://a:6379").validate();
        assert!(
            p[0].starts_with("outbox.redis.url:") && p[0].contains("scheme `http`"),
            "{p:?}"
        );
        let p = redis("redis://a:6379/orders").validate();
        assert!(p[0].contains("database number"), "{p:?}");
        let p = redis("").validate();
        assert!(p[0].contains("is empty"), "{p:?}");
        let p = redis("redis://u:s3cret@host:port").validate();
        assert!(
            p[0].contains("not a URL") && !p[0].contains("s3cret"),
            "{p:?}"
        );
        assert_eq!(
            shown_url("rediss://u:pw@h:1/0"),
            "rediss://u:[redacted]@h:1/0"
        );
        assert_eq!(shown_url("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn every_redis_key_is_checked_by_name() {
        let mut c = OutboxConfig {
            backend: Backend::Redis,
            ..OutboxConfig::default()
        };
        assert!(c.validate()[0].starts_with("outbox.redis.url: required"));
        c.redis.sentinel = Some(SentinelConfig {
            master: String::new(),
            nodes: vec!["s1".into(), "s2:26379".into()],
            username: None,
            password: None,
            sentinel_password: None,
            tls: false,
            db: 99,
        });
        c.redis.key_prefix = "a b".into();
        c.redis.partitions = 0;
        c.redis.wait_replicas = 1;
        c.redis.wait_timeout_ms = 0;
        c.redis.max_tag_share_percent = 0;
        c.redis.timeout_ms = 5;
        let p = c.validate().join("\n");
        for key in [
            "outbox.redis.sentinel.master",
            "outbox.redis.sentinel.nodes: `s1`",
            "outbox.redis.sentinel.db",
            "outbox.redis.key_prefix",
            "outbox.redis.partitions",
            "outbox.redis.wait_timeout_ms",
            "outbox.redis.max_tag_share_percent",
            "outbox.redis.timeout_ms",
        ] {
            assert!(p.contains(key), "{key} missing from {p}");
        }
        assert!(!p.contains("s2:26379"), "a valid node is not reported: {p}");
        c.redis.url = Some(Secret::new("redis://a"));
        assert!(c.validate().join("\n").contains("either url or sentinel"));
    }

    #[test]
    fn roles_other_than_all_need_the_shared_engine() {
        let c = OutboxConfig {
            role: Role::Ingest,
            ..OutboxConfig::default()
        };
        assert!(c.validate()[0].starts_with("outbox.role: `ingest` needs backend"));
        let mut r = redis("redis://a");
        r.role = Role::Deliver;
        assert!(r.validate().is_empty());
        assert!(Role::Deliver.delivers() && !Role::Deliver.takes_hits());
        assert!(Role::Ingest.takes_hits() && !Role::Ingest.delivers());
    }
}
