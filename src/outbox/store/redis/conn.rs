//! Connections to the primary: how to reach it (a URL, or Sentinel), the checks a server must
//! pass before it holds events, and a supervisor that notices an outage, says so once, and
//! reconnects on its own (following a failover through Sentinel).
//!
//! Three connections per process: one for hits' group commits (a `WAIT` blocks the
//! connection it is sent on, and hits should never queue behind delivery's scripts), one for
//! everything else, and the pub/sub one (`pubsub`).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::io::tcp::TcpSettings;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisConnectionInfo, RedisError, TlsMode};
use tokio::sync::Notify;

use super::scripts;
use crate::outbox::config::{shown_url, RedisConfig};
use crate::outbox::StoreError;

/// How to reach the primary.
pub(crate) enum Connector {
    Url {
        client: redis::Client,
        shown: String,
    },
    Sentinel {
        client: tokio::sync::Mutex<SentinelClient>,
        shown: String,
    },
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// TCP settings of every connection: no Nagle (a hit's commit is a small write answered at
/// once; delayed ACKs would hold it 40 ms or more), and a dead peer noticed within the reply
/// timeout.
fn tcp(cfg: &RedisConfig) -> TcpSettings {
    let t = TcpSettings::default().set_nodelay(true);
    #[cfg(target_os = "linux")]
    let t = t.set_user_timeout(Duration::from_millis(cfg.timeout_ms.saturating_mul(2)));
    #[cfg(not(target_os = "linux"))]
    let _ = cfg;
    t
}

impl Connector {
    pub fn from_config(cfg: &RedisConfig) -> Result<Connector, String> {
        if let Some(url) = &cfg.url {
            let shown = shown_url(url.expose());
            let err =
                |e: RedisError| format!("outbox.redis.url `{shown}`: {}", redact(&e, url.expose()));
            let info = url
                .expose()
                .trim()
                .into_connection_info()
                .map_err(err)?
                .set_tcp_settings(tcp(cfg));
            let client = redis::Client::open(info).map_err(err)?;
            return Ok(Connector::Url { client, shown });
        }
        let Some(s) = &cfg.sentinel else {
            return Err("outbox.redis: set url or sentinel".into());
        };
        let scheme = if s.tls { "rediss" } else { "redis" };
        let nodes = s
            .nodes
            .iter()
            .map(|n| {
                let url = match &s.sentinel_password {
                    Some(p) => format!("{scheme}://:{}@{n}", urlencode(p.expose())),
                    None => format!("{scheme}://{n}"),
                };
                url.as_str()
                    .into_connection_info()
                    .map(|i| i.set_tcp_settings(tcp(cfg)))
                    .map_err(|e| format!("outbox.redis.sentinel.nodes `{n}`: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut redis_info = RedisConnectionInfo::default().set_db(s.db);
        if let Some(u) = &s.username {
            redis_info = redis_info.set_username(u);
        }
        if let Some(p) = &s.password {
            redis_info = redis_info.set_password(p.expose());
        }
        let mut node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(redis_info)
            .set_tcp_settings(tcp(cfg));
        if s.tls {
            node = node.set_tls_mode(TlsMode::Secure);
        }
        let client = SentinelClient::build(
            nodes,
            s.master.clone(),
            Some(node),
            SentinelServerType::Master,
        )
        .map_err(|e| format!("outbox.redis.sentinel: {e}"))?;
        Ok(Connector::Sentinel {
            client: tokio::sync::Mutex::new(client),
            shown: format!(
                "primary `{}` via sentinels {}",
                s.master,
                s.nodes.join(", ")
            ),
        })
    }

    /// For logs: where the primary is looked for (never a password).
    pub fn describe(&self) -> &str {
        match self {
            Connector::Url { shown, .. } | Connector::Sentinel { shown, .. } => shown,
        }
    }

    /// A client for the current primary (asking the sentinels where it is now).
    pub async fn client(&self) -> Result<redis::Client, RedisError> {
        match self {
            Connector::Url { client, .. } => Ok(client.clone()),
            Connector::Sentinel { client, .. } => client.lock().await.async_get_client().await,
        }
    }
}

fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// An error's text without the URL's password (some parse errors quote their input).
fn redact(e: &RedisError, url: &str) -> String {
    let text = e.to_string();
    match reqwest::Url::parse(url.trim()) {
        Ok(u) => match u.password() {
            Some(p) if !p.is_empty() => text.replace(p, "[redacted]"),
            _ => text,
        },
        Err(_) => text,
    }
}

/// What `INFO` says about the server, as far as the outbox cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ServerInfo {
    pub version: String,
    /// `valkey` or `redis`.
    pub server: String,
    pub maxmemory_policy: String,
    pub maxmemory: u64,
    pub used_memory: u64,
    pub aof: bool,
    pub role: String,
    pub replicas: u32,
    pub cluster: bool,
}

impl ServerInfo {
    pub fn parse(text: &str) -> ServerInfo {
        let mut i = ServerInfo {
            server: "redis".into(),
            ..ServerInfo::default()
        };
        for line in text.lines() {
            let Some((k, v)) = line.trim().split_once(':') else {
                continue;
            };
            match k {
                "redis_version" => i.version = v.to_owned(),
                "valkey_version" => {
                    // Valkey answers `redis_version` with the Redis version it matches.
                    i.server = "valkey".into();
                }
                "maxmemory_policy" => i.maxmemory_policy = v.to_owned(),
                "maxmemory" => i.maxmemory = v.parse().unwrap_or(0),
                "used_memory" => i.used_memory = v.parse().unwrap_or(0),
                "aof_enabled" => i.aof = v == "1",
                "role" => i.role = v.to_owned(),
                "connected_slaves" => i.replicas = v.parse().unwrap_or(0),
                "cluster_enabled" => i.cluster = v == "1",
                _ => {}
            }
        }
        i
    }

    /// Why this server must not hold the outbox at all, if it must not.
    pub fn refusal(&self) -> Option<String> {
        if self.cluster {
            return Some("the server runs Redis Cluster, which tagrelay does not support yet (a group commit would span shards): point outbox.redis at one primary, with replicas and Sentinel for failover".into());
        }
        let mut parts = self
            .version
            .split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) < (6, 2) {
            return Some(format!(
                "the server is Redis {}; the outbox needs 6.2 or newer (XAUTOCLAIM), or Valkey",
                self.version
            ));
        }
        if self.maxmemory_policy.starts_with("allkeys-") {
            return Some(format!(
                "the server's maxmemory-policy is `{}`: when memory runs out Redis would silently delete queued events. Set maxmemory-policy to `noeviction` (tagrelay then answers 503 when Redis is full; a `volatile-*` policy works too, tagrelay's queues never expire)",
                self.maxmemory_policy
            ));
        }
        None
    }

    /// Memory used of `maxmemory`, in percent (0 without a limit).
    pub fn memory_percent(&self) -> u64 {
        self.used_memory
            .saturating_mul(100)
            .checked_div(self.maxmemory)
            .unwrap_or(0)
    }
}

/// Why a connection attempt did not give a usable primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConnectError {
    /// Never usable as it is (policy, cluster, version): not retried at start.
    Refused(String),
    /// Unreachable, or not a primary right now: retried.
    Down(String),
}

/// The link's state, as a gauge and for readiness.
const UP: u8 = 1;
const DOWN: u8 = 0;

/// The connections to the primary and the task that keeps them.
pub(crate) struct Link {
    connector: Connector,
    config: AsyncConnectionConfig,
    /// For hits' group commits (`WAIT` blocks the connection it is sent on).
    hits: ArcSwapOption<MultiplexedConnection>,
    /// For delivery, upkeep and tools.
    work: ArcSwapOption<MultiplexedConnection>,
    state: AtomicU8,
    /// Asks the supervisor to check (and reconnect) now.
    kick: Notify,
    /// Signalled after each successful (re)connect.
    pub connected: Notify,
    closed: AtomicBool,
    wait_replicas: u32,
    /// What was last said about the link, so that each change is logged once.
    said: Mutex<Option<String>>,
    warned: Mutex<Vec<String>>,
    /// The last `INFO` read (at connect, then by the upkeep).
    pub info: Mutex<ServerInfo>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("primary", &self.connector.describe())
            .field("up", &self.is_up())
            .finish()
    }
}

impl Link {
    pub fn new(connector: Connector, cfg: &RedisConfig) -> Link {
        let timeout = Duration::from_millis(cfg.timeout_ms);
        // A reply may take the whole `WAIT` on the hits' connection.
        let reply = timeout + Duration::from_millis(cfg.wait_timeout_ms);
        Link {
            connector,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(reply)),
            hits: ArcSwapOption::empty(),
            work: ArcSwapOption::empty(),
            state: AtomicU8::new(DOWN),
            kick: Notify::new(),
            connected: Notify::new(),
            closed: AtomicBool::new(false),
            wait_replicas: cfg.wait_replicas,
            said: Mutex::new(None),
            warned: Mutex::new(Vec::new()),
            info: Mutex::new(ServerInfo::default()),
        }
    }

    pub fn describe(&self) -> &str {
        self.connector.describe()
    }

    pub fn is_up(&self) -> bool {
        self.state.load(Ordering::Acquire) == UP
    }

    /// The connection for hits, or `Unavailable` while the primary is out of reach.
    pub fn hits(&self) -> Result<MultiplexedConnection, StoreError> {
        self.get(&self.hits)
    }

    /// The connection for everything else.
    pub fn work(&self) -> Result<MultiplexedConnection, StoreError> {
        self.get(&self.work)
    }

    fn get(
        &self,
        slot: &ArcSwapOption<MultiplexedConnection>,
    ) -> Result<MultiplexedConnection, StoreError> {
        if !self.is_up() {
            return Err(StoreError::Unavailable(self.down_reason()));
        }
        match slot.load_full() {
            Some(c) => Ok((*c).clone()),
            None => Err(StoreError::Unavailable(self.down_reason())),
        }
    }

    fn down_reason(&self) -> String {
        self.said
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .unwrap_or_else(|| "Redis is not connected".into())
    }

    /// A client for the current primary (pub/sub, tools).
    pub async fn client(&self) -> Result<redis::Client, RedisError> {
        self.connector.client().await
    }

    /// Notes a failed command: a lost or unusable connection takes the link down (the
    /// supervisor reconnects); any other error is the caller's to report. Returns the error
    /// as the store reports it.
    pub fn failed(&self, e: &RedisError) -> StoreError {
        if breaks_link(e) {
            self.down(&format!("Redis connection lost: {e}"));
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Io(e.to_string())
        }
    }

    /// Takes the link down (logged once per outage).
    pub fn down(&self, reason: &str) {
        let was_up = self.state.swap(DOWN, Ordering::AcqRel) == UP;
        self.hits.store(None);
        self.work.store(None);
        metrics::gauge!("tagrelay_outbox_redis_connected").set(0.0);
        if was_up {
            self.say(
                reason,
                "outbox: Redis is unreachable; hits are answered 503 with Retry-After and delivery waits until it is back",
                false,
            );
        }
        self.kick.notify_one();
    }

    /// Logs `reason` with `what` unless it was the last thing said (one line per change, not
    /// one per hit or per retry). `error`: an operator must act.
    fn say(&self, reason: &str, what: &str, error: bool) {
        let Ok(mut said) = self.said.lock() else {
            return;
        };
        if said.as_deref() == Some(reason) {
            return;
        }
        *said = Some(reason.to_owned());
        drop(said);
        if error {
            tracing::error!(primary = %self.describe(), reason = %reason, "{what}");
        } else {
            tracing::warn!(primary = %self.describe(), reason = %reason, "{what}");
        }
    }

    fn warn_once(&self, key: &str, what: &str) {
        let Ok(mut warned) = self.warned.lock() else {
            return;
        };
        if warned.iter().any(|w| w == key) {
            return;
        }
        warned.push(key.to_owned());
        tracing::warn!(primary = %self.describe(), "{what}");
    }

    /// One connection attempt: finds the primary, opens both connections, checks the
    /// server and loads the scripts.
    pub async fn connect_once(&self) -> Result<ServerInfo, ConnectError> {
        let down = |e: RedisError| ConnectError::Down(e.to_string());
        let client = self.connector.client().await.map_err(down)?;
        let mut work = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
            .map_err(down)?;
        let text: String = redis::cmd("INFO")
            .query_async(&mut work)
            .await
            .map_err(down)?;
        let info = ServerInfo::parse(&text);
        if let Some(why) = info.refusal() {
            return Err(ConnectError::Refused(why));
        }
        if info.role != "master" {
            return Err(ConnectError::Down(format!(
                "the server is a read-only {} (role `{}`); point outbox.redis at the primary, or use Sentinel",
                info.server, info.role
            )));
        }
        for s in scripts::all() {
            s.load_async(&mut work).await.map_err(down)?;
        }
        let hits = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
            .map_err(down)?;
        if !info.aof {
            self.warn_once("aof", "outbox: Redis has AOF persistence off (appendonly no): if it restarts, the events written since its last RDB snapshot are lost. Turn on appendonly yes (appendfsync everysec), or use a managed Redis with persistence");
        }
        if self.wait_replicas > info.replicas {
            self.warn_once("replicas", &format!(
                "outbox: wait_replicas = {} but the primary has {} replica(s) connected: hits are answered 503 until enough replicas confirm each write",
                self.wait_replicas, info.replicas
            ));
        }
        self.work.store(Some(Arc::new(work)));
        self.hits.store(Some(Arc::new(hits)));
        if let Ok(mut i) = self.info.lock() {
            *i = info.clone();
        }
        Ok(info)
    }

    /// For a one-off user (the CLI tools): usable after `connect_once`, nothing logged.
    pub fn use_as_is(&self) {
        self.state.store(UP, Ordering::Release);
    }

    fn up(&self, info: &ServerInfo) {
        let was_down = self.state.swap(UP, Ordering::AcqRel) == DOWN;
        metrics::gauge!("tagrelay_outbox_redis_connected").set(1.0);
        if was_down {
            let mut said = self.said.lock().ok();
            let had_said = said.as_mut().is_some_and(|s| s.take().is_some());
            if had_said {
                metrics::counter!("tagrelay_outbox_redis_reconnects_total").increment(1);
                tracing::info!(primary = %self.describe(), server = %info.server, version = %info.version, "outbox: Redis is reachable again; taking hits and delivering");
            } else {
                tracing::info!(primary = %self.describe(), server = %info.server, version = %info.version, "outbox: connected to Redis");
            }
        }
        self.connected.notify_waiters();
    }

    /// First connection at start: a server that must not be used is refused (the caller
    /// stops); an unreachable one is retried by the supervisor while hits get 503.
    pub async fn start(&self) -> Result<(), String> {
        match self.connect_once().await {
            Ok(info) => {
                self.up(&info);
                Ok(())
            }
            Err(ConnectError::Refused(why)) => Err(format!(
                "outbox: refusing Redis at {}: {why}",
                self.describe()
            )),
            Err(ConnectError::Down(why)) => {
                self.say(
                    &why,
                    "outbox: Redis is unreachable at start; hits are answered 503 with Retry-After and delivery waits until it is reachable",
                    false,
                );
                Ok(())
            }
        }
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.kick.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Keeps the link: reconnects while down (backing off to 5 s), and checks it every
    /// second while up. Runs until `close`.
    pub async fn supervise(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(200);
        while !self.is_closed() {
            if self.is_up() {
                tokio::select! {
                    _ = self.kick.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                if self.is_closed() || !self.is_up() {
                    continue;
                }
                let ping = match self.work() {
                    Ok(mut c) => redis::cmd("PING").query_async::<()>(&mut c).await,
                    Err(_) => continue,
                };
                if let Err(e) = ping {
                    self.failed(&e);
                }
                continue;
            }
            match self.connect_once().await {
                Ok(info) => {
                    backoff = Duration::from_millis(200);
                    self.up(&info);
                }
                Err(e) => {
                    match &e {
                        ConnectError::Refused(why) => self.say(
                            why,
                            "outbox: refusing this Redis; hits are answered 503 until it is fixed",
                            true,
                        ),
                        // The outage was reported when it began; attempts are not.
                        ConnectError::Down(why) => {
                            tracing::debug!(primary = %self.describe(), reason = %why, "outbox: Redis still unreachable");
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.kick.notified() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Re-reads `INFO` (memory use for back-pressure; a policy changed to `allkeys-*` while
    /// running takes the store out of service until it is fixed).
    pub async fn refresh_info(&self) -> Option<ServerInfo> {
        let mut c = self.work().ok()?;
        let text: String = match redis::cmd("INFO").query_async(&mut c).await {
            Ok(t) => t,
            Err(e) => {
                self.failed(&e);
                return None;
            }
        };
        let info = ServerInfo::parse(&text);
        if let Some(why) = info.refusal() {
            self.state.store(DOWN, Ordering::Release);
            metrics::gauge!("tagrelay_outbox_redis_connected").set(0.0);
            self.say(
                &why,
                "outbox: refusing this Redis; hits are answered 503 until it is fixed",
                true,
            );
            self.kick.notify_one();
        }
        if let Ok(mut i) = self.info.lock() {
            *i = info.clone();
        }
        Some(info)
    }
}

/// Errors after which the connection (or the server behind it) cannot be used as it is.
pub(crate) fn breaks_link(e: &RedisError) -> bool {
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal() {
        return true;
    }
    matches!(
        e.code(),
        Some("READONLY" | "LOADING" | "MASTERDOWN" | "NOSCRIPT")
    )
}

/// Whether an error is Redis refusing a write for lack of memory.
pub(crate) fn is_oom(e: &RedisError) -> bool {
    e.code() == Some("OOM") || e.to_string().contains("OOM command not allowed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_is_read_and_dangerous_servers_refused() {
        let info = ServerInfo::parse(
            "# Server\r\nredis_version:7.0.15\r\n# Memory\r\nused_memory:1000\r\nmaxmemory:4000\r\nmaxmemory_policy:noeviction\r\n# Persistence\r\naof_enabled:1\r\n# Replication\r\nrole:master\r\nconnected_slaves:2\r\n# Cluster\r\ncluster_enabled:0\r\n",
        );
        assert_eq!(info.version, "7.0.15");
        assert_eq!((info.aof, info.replicas, info.cluster), (true, 2, false));
        assert_eq!(info.memory_percent(), 25);
        assert_eq!(info.refusal(), None);
        let lru = ServerInfo {
            maxmemory_policy: "allkeys-lru".into(),
            ..info.clone()
        };
        let why = lru.refusal().unwrap();
        assert!(
            why.contains("allkeys-lru") && why.contains("noeviction"),
            "{why}"
        );
        let old = ServerInfo {
            version: "6.0.9".into(),
            ..info.clone()
        };
        assert!(old.refusal().unwrap().contains("6.2 or newer"));
        let cluster = ServerInfo {
            cluster: true,
            ..info.clone()
        };
        assert!(cluster.refusal().unwrap().contains("Redis Cluster"));
        let valkey = ServerInfo::parse("redis_version:7.2.4\r\nvalkey_version:8.0.1\r\n");
        assert_eq!(valkey.server, "valkey");
    }
}
