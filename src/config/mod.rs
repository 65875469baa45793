//! Configuration: serde schema (`deny_unknown_fields` everywhere), loading from TOML plus
//! `TAGRELAY__SECTION__KEY` environment overrides, and validation into typed parts.

mod load;
pub mod secret;

pub use load::{load, load_str, ConfigError, LoadedConfig, Source};
pub use secret::{EnvString, Secret};

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::clients::data::DataClientConfig;
use crate::clients::ga4::Ga4ClientConfig;
use crate::clients::measurement_protocol::MeasurementProtocolClientConfig;
use crate::clients::script_proxy::ScriptProxyConfig;
use crate::doctor::itp::ItpResolver;
use crate::tags::ga4::Ga4TagConfig;
use crate::tags::http::HttpTagConfig;
use crate::tags::meta_capi::MetaCapiTagConfig;

/// The embedded default configuration (`config/tagrelay.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../config/tagrelay.toml");
pub const DEFAULT_CONFIG_PATH: &str = "config/tagrelay.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub cookies: CookiesConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
    #[serde(default)]
    pub tags: Vec<TagConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Public tracking listener.
    pub listen: SocketAddr,
    /// Metrics, debug view and outbox tools; never the public listener.
    pub admin_listen: SocketAddr,
    /// Mount every tracking route under this prefix (e.g. `/t`) for same-origin deployments.
    pub path_prefix: String,
    /// CIDRs whose forwarding headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// The forwarding header your proxies set; only that one is read.
    pub client_ip_header: ClientIpHeader,
    /// CORS origins for tracking routes; empty = any origin under the request host's
    /// registrable domain.
    pub allowed_origins: Vec<String>,
    pub max_body_bytes: usize,
    pub request_timeout_ms: u64,
    /// How long shutdown waits for in-flight requests and sends.
    pub shutdown_timeout_ms: u64,
    pub log_format: LogFormat,
    /// Judge each (page host, tagging host) pair the hits name against Safari's 7-day cap on
    /// cookies from cloaked hosts, resolving in the background. Off by default: a server
    /// sends no DNS query its operator did not ask for.
    pub itp_check: bool,
    /// The resolver of that check: "system" or a DNS server's `IP[:port]`.
    pub itp_resolver: ItpResolver,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".parse().expect("static address"),
            admin_listen: "127.0.0.1:9090".parse().expect("static address"),
            path_prefix: String::new(),
            trusted_proxies: Vec::new(),
            client_ip_header: ClientIpHeader::XForwardedFor,
            allowed_origins: Vec::new(),
            max_body_bytes: 64 * 1024,
            request_timeout_ms: 5_000,
            shutdown_timeout_ms: 10_000,
            log_format: LogFormat::Pretty,
            itp_check: false,
            itp_resolver: ItpResolver::System,
        }
    }
}

/// Which forwarding header carries the client IP. Reading only the one your proxy writes
/// stops a client from supplying another one the proxy passes through untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClientIpHeader {
    #[default]
    XForwardedFor,
    Forwarded,
    XRealIp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// What to assume for a consent signal the hit does not carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConsentDefault {
    #[default]
    Granted,
    Denied,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CookiesConfig {
    /// Manage first-party cookies at all.
    pub enabled: bool,
    /// `auto` = registrable domain (eTLD+1) of the request host; or an explicit domain.
    pub domain: String,
    /// Browsers drop `Secure` cookies over plain http; turn off only for local testing.
    pub secure: bool,
    /// Name of the server-managed visitor id cookie (GTM-SS calls it FPID).
    pub visitor_cookie: String,
    pub visitor_max_age_days: u32,
    /// Seed a new visitor id from the hit's GA client id so visitors keep the id GA knows.
    pub migrate_from_ga: bool,
    /// Re-issue `_ga` server-side (lifts Safari's 7-day cap on script cookies).
    pub keep_ga: bool,
    pub ga_max_age_days: u32,
    /// Re-issue `_fbp`/`_fbc` and build `_fbc` from `fbclid`.
    pub keep_meta: bool,
    pub meta_max_age_days: u32,
    /// Gate cookies on Consent Mode: analytics_storage for the visitor id and `_ga`,
    /// ad_storage for `_fbp`/`_fbc`.
    pub require_consent: bool,
    /// Consent assumed when a hit carries no consent signals.
    pub consent_default: ConsentDefault,
    /// Set `<visitor_cookie>_set` beside the visitor cookie (when it was last set) and
    /// measure, per browser engine, how old the visitor cookies browsers return are: proof of
    /// Safari's 7-day cap from real visitors.
    pub measure_cookie_age: bool,
}

impl Default for CookiesConfig {
    fn default() -> Self {
        CookiesConfig {
            enabled: true,
            domain: "auto".into(),
            secure: true,
            visitor_cookie: "FPID".into(),
            visitor_max_age_days: 400,
            migrate_from_ga: true,
            keep_ga: true,
            ga_max_age_days: 400,
            keep_meta: true,
            meta_max_age_days: 90,
            require_consent: false,
            consent_default: ConsentDefault::Granted,
            measure_cookie_age: false,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Required when `admin_listen` is not loopback; at least 16 characters, trimmed.
    #[serde(deserialize_with = "secret::deserialize_trimmed")]
    pub token: Option<Secret>,
    /// Traces kept in memory for the debug view.
    pub trace_capacity: usize,
    pub trace_max_bytes: usize,
    /// `watching` (all while a debug page or stream is open), `all`, or `none`.
    pub trace_sampling: TraceSampling,
    /// Cookie or header (`x-tagrelay-debug`) whose value marks a browser's hits.
    pub debug_cookie: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token: None,
            trace_capacity: 1_000,
            trace_max_bytes: 16 << 20,
            trace_sampling: TraceSampling::Watching,
            debug_cookie: "tagrelay_debug".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TraceSampling {
    /// Every hit while a debug page is open, and marked hits always.
    #[default]
    Watching,
    /// Only hits marked with the debug cookie or header, even while a page is open: on a busy
    /// site, tracing every hit costs a third or more of the throughput (README).
    Marked,
    All,
    None,
}

#[derive(Debug, Clone)]
pub enum ClientConfig {
    Ga4(Ga4ClientConfig),
    MeasurementProtocol(MeasurementProtocolClientConfig),
    Data(DataClientConfig),
    ScriptProxy(ScriptProxyConfig),
}

impl<'de> Deserialize<'de> for ClientConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (kind, table) = tagged::<D>(d, "client", CLIENT_TYPES)?;
        match kind.as_str() {
            "ga4" => tagged_variant::<D, _>(table).map(ClientConfig::Ga4),
            "measurement_protocol" => {
                tagged_variant::<D, _>(table).map(ClientConfig::MeasurementProtocol)
            }
            "data" => tagged_variant::<D, _>(table).map(ClientConfig::Data),
            "script_proxy" => tagged_variant::<D, _>(table).map(ClientConfig::ScriptProxy),
            _ => unreachable_type::<D, _>(&kind),
        }
    }
}

const CLIENT_TYPES: &[&str] = &["ga4", "measurement_protocol", "data", "script_proxy"];
const TAG_TYPES: &[&str] = &["ga4", "meta_capi", "http"];

/// Reads a `type = "..."` table. Internally tagged serde enums lose the path of errors inside
/// the variant, so the variant is deserialized separately and its inner path is carried in
/// the message (`at `trigger`: …`), which `load::describe` folds back into the key path.
fn tagged<'de, D: serde::Deserializer<'de>>(
    d: D,
    what: &str,
    types: &[&str],
) -> Result<(String, serde_json::Value), D::Error> {
    use serde::de::Error;
    let table = serde_json::Value::deserialize(d)?;
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
        return Err(D::Error::unknown_variant(&kind, leak(types)));
    }
    let mut table = table;
    if let Some(map) = table.as_object_mut() {
        map.remove("type");
    }
    Ok((kind, table))
}

fn leak(types: &[&str]) -> &'static [&'static str] {
    // The known type lists are the consts above; match them to get 'static slices.
    if types == CLIENT_TYPES {
        CLIENT_TYPES
    } else {
        TAG_TYPES
    }
}

fn tagged_variant<'de, D: serde::Deserializer<'de>, T: serde::de::DeserializeOwned>(
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

fn unreachable_type<'de, D: serde::Deserializer<'de>, T>(kind: &str) -> Result<T, D::Error> {
    use serde::de::Error;
    Err(D::Error::custom(format!("unknown type `{kind}`")))
}

impl ClientConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            ClientConfig::Ga4(_) => "ga4",
            ClientConfig::MeasurementProtocol(_) => "measurement_protocol",
            ClientConfig::Data(_) => "data",
            ClientConfig::ScriptProxy(_) => "script_proxy",
        }
    }
}

#[derive(Debug, Clone)]
pub enum TagConfig {
    Ga4(Ga4TagConfig),
    MetaCapi(MetaCapiTagConfig),
    Http(HttpTagConfig),
}

impl<'de> Deserialize<'de> for TagConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (kind, table) = tagged::<D>(d, "tag", TAG_TYPES)?;
        match kind.as_str() {
            "ga4" => tagged_variant::<D, _>(table).map(TagConfig::Ga4),
            "meta_capi" => tagged_variant::<D, _>(table).map(TagConfig::MetaCapi),
            "http" => tagged_variant::<D, _>(table).map(TagConfig::Http),
            _ => unreachable_type::<D, _>(&kind),
        }
    }
}

impl TagConfig {
    pub fn name(&self) -> &str {
        match self {
            TagConfig::Ga4(c) => &c.name,
            TagConfig::MetaCapi(c) => &c.name,
            TagConfig::Http(c) => &c.name,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            TagConfig::Ga4(_) => "ga4",
            TagConfig::MetaCapi(_) => "meta_capi",
            TagConfig::Http(_) => "http",
        }
    }
}
