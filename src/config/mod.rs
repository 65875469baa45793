//! Configuration: serde schema (`deny_unknown_fields` everywhere), loading from TOML plus
//! `TAGRELAY__SECTION__KEY` environment overrides, and validation into typed parts.

mod load;

pub use load::{
    load, load_str, load_str_with_env, ConfigError, EnvOverride, LoadedConfig, Source, ENV_PREFIX,
};

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::clients::ClientConfig;
use crate::doctor::itp::ItpResolver;
use crate::identity::config::CookiesConfig;
use crate::outbox::config::OutboxConfig;
use crate::secret::{self, Secret};
use crate::stitching::config::StitchingConfig;
use crate::tags::TagConfig;
use crate::telemetry::otel::TelemetryConfig;
use crate::telemetry::LogFormat;
use crate::trace::TraceSampling;

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
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub stitching: StitchingConfig,
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
    #[serde(default)]
    pub tags: Vec<TagConfig>,
    /// The keys `TAGRELAY__…` environment variables set (not a key of the file).
    #[serde(skip)]
    pub env_overrides: Vec<EnvOverride>,
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
    /// After a stop signal, how long `/readyz` fails while both listeners keep serving, before
    /// the public one stops accepting: time for load balancers and Kubernetes endpoints to
    /// stop sending hits (a preStop sleep without a shell).
    pub shutdown_delay_ms: u64,
    /// How long `tagrelay drain` (or `POST /admin/drain`) waits for the outbox to empty
    /// before stopping anyway, unless the request names its own limit.
    pub drain_timeout_ms: u64,
    /// Reload when the config file's content changes, looked at this often (a mounted
    /// ConfigMap is updated in place); 0: only on SIGHUP, `tagrelay reload` or
    /// `POST /admin/reload`.
    pub config_watch_interval_ms: u64,
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
            shutdown_delay_ms: 0,
            drain_timeout_ms: 300_000,
            config_watch_interval_ms: 0,
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
