//! A validated, immutable configuration turned into running parts, swapped atomically on
//! reload; and the hit's core that runs them ([`process`]).

mod process;
#[cfg(test)]
mod tests;

pub use process::{ProcessError, Processed};

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::clients::script_proxy::ScriptProxy;
use crate::clients::{BuiltClient, Client, ClientConfig};
use crate::config::Config;
use crate::identity::config::ConsentDefault;
use crate::identity::CookiePolicy;
use crate::outbox::delivery::TagDirectory;
use crate::stitching::record::RecordPolicy;
use crate::tags::trigger::Trigger;
use crate::tags::TagInstance;

/// Shorter admin tokens are refused at load: an empty one would open the admin surface and
/// key its session HMAC with nothing.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

#[derive(Debug)]
pub struct Pipeline {
    pub config: Arc<Config>,
    pub clients: Vec<Box<dyn Client>>,
    /// `type = "script_proxy"` clients: asked before `clients` for `GET`/`HEAD`. Not event
    /// clients, because they do network I/O.
    pub script_proxies: Vec<Arc<ScriptProxy>>,
    pub tags: Vec<Arc<TagInstance>>,
    pub cookies: CookiePolicy,
}

impl Pipeline {
    /// Validates everything and builds the parts. Collects every problem, each naming its key.
    pub fn build(config: &Config) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let s = &config.server;
        if !s.path_prefix.is_empty()
            && (!s.path_prefix.starts_with('/') || s.path_prefix.ends_with('/'))
        {
            problems.push(format!(
                "server.path_prefix: `{}` must start with `/` and not end with one (e.g. \"/t\"), or be empty",
                s.path_prefix
            ));
        }
        if s.max_body_bytes == 0 {
            problems.push("server.max_body_bytes: must be greater than 0".into());
        }
        if s.request_timeout_ms == 0 {
            problems.push("server.request_timeout_ms: must be greater than 0".into());
        }
        if s.config_watch_interval_ms != 0 && s.config_watch_interval_ms < 100 {
            problems.push(format!(
                "server.config_watch_interval_ms: {} is too often; use 0 (no watching) or at least 100",
                s.config_watch_interval_ms
            ));
        }
        if s.drain_timeout_ms == 0 {
            problems.push("server.drain_timeout_ms: must be greater than 0".into());
        }
        problems.extend(config.telemetry.validate());
        if !s.admin_listen.ip().is_loopback() && config.admin.token.is_none() {
            problems.push(format!(
                "admin.token: required because server.admin_listen ({}) is not a loopback address; set token = \"${{TAGRELAY_ADMIN_TOKEN}}\"",
                s.admin_listen
            ));
        }
        if let Some(token) = &config.admin.token {
            let n = token.expose().chars().count();
            if n < MIN_ADMIN_TOKEN_CHARS {
                let what = if n == 0 {
                    "is empty (is its environment variable set but empty?)".to_owned()
                } else {
                    format!("has {n} characters")
                };
                problems.push(format!(
                    "admin.token: {what}; it must have at least {MIN_ADMIN_TOKEN_CHARS} so it cannot be guessed (e.g. the output of `openssl rand -hex 24`), or remove the key to keep the admin listener on loopback without one"
                ));
            }
        }
        if s.listen == s.admin_listen && s.listen.port() != 0 {
            problems.push(
                "server.admin_listen: must differ from server.listen (the admin surface is never public)".into(),
            );
        }
        for o in &s.allowed_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                problems.push(format!(
                    "server.allowed_origins: `{o}` must be an origin like \"https://www.example.com\" (scheme, host, optional port; no path)"
                ));
            }
        }

        let o = &config.outbox;
        let mut need = |ok: bool, msg: &str| {
            if !ok {
                problems.push(format!("outbox.{msg}"));
            }
        };
        need(!o.path.trim().is_empty(), "path: must name a directory");
        need(
            o.max_records > 0,
            "max_records: must be greater than 0 (0 refuses every hit)",
        );
        need(
            o.max_bytes > 0,
            "max_bytes: must be greater than 0 (0 refuses every hit)",
        );
        need(
            o.commit_max_records > 0,
            "commit_max_records: must be greater than 0",
        );
        need(
            o.log_segment_bytes >= 1 << 20,
            "log_segment_bytes: must be at least 1048576 (1 MiB)",
        );
        need(
            o.max_retry_age_secs >= 60,
            "max_retry_age_secs: must be at least 60 (shorter gives up on the first hiccup)",
        );
        need(
            o.retry_initial_ms > 0,
            "retry_initial_ms: must be greater than 0",
        );
        need(
            o.retry_max_ms >= o.retry_initial_ms,
            "retry_max_ms: must be at least retry_initial_ms",
        );
        need(
            o.lease_timeout_ms >= 10_000,
            "lease_timeout_ms: must be at least 10000 (a batch still being sent would be sent twice)",
        );
        need(
            o.dispatch_concurrency > 0,
            "dispatch_concurrency: must be greater than 0",
        );
        need(
            (0..=19).contains(&o.dispatch_nice),
            "dispatch_nice: must be between 0 (same priority as answering hits) and 19 (lowest)",
        );
        problems.extend(o.validate());

        problems.extend(
            config
                .stitching
                .validate()
                .into_iter()
                .map(|m| format!("stitching.{m}")),
        );
        let cookies = CookiePolicy::build(&config.cookies)
            .map_err(|p| problems.extend(p.into_iter().map(|m| format!("cookies.{m}"))))
            .ok();

        let mut clients: Vec<Box<dyn Client>> = Vec::new();
        let mut script_proxies: Vec<Arc<ScriptProxy>> = Vec::new();
        for (i, c) in config.clients.iter().enumerate() {
            match c.spec().build() {
                Ok(BuiltClient::Events(client)) => clients.push(client),
                Ok(BuiltClient::ScriptProxy(p)) => {
                    if let Some(j) = config.clients[..i].iter().position(
                        |o| matches!(o, ClientConfig::ScriptProxy(o) if o.path == p.path()),
                    ) {
                        problems.push(format!(
                            "clients[{i}] (type script_proxy): path: `{}` is already served by clients[{j}]",
                            p.path()
                        ));
                    }
                    script_proxies.push(Arc::new(p));
                }
                Err(p) => problems.extend(
                    p.into_iter()
                        .map(|m| format!("clients[{i}] (type {}): {m}", c.kind())),
                ),
            }
        }

        let mut tags = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, t) in config.tags.iter().enumerate() {
            let spec = t.spec();
            let name = spec.name();
            let label = format!("tags[{i}] (`{name}`)");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                problems.push(format!(
                    "{label}.name: use letters, digits, `_` or `-` (it becomes a metric label)"
                ));
            }
            if !names.insert(name.to_owned()) {
                problems.push(format!(
                    "{label}.name: another tag is already named `{name}`"
                ));
            }
            let trigger = Trigger::build(spec.trigger(), config.cookies.consent_default);
            match (spec.build(), trigger) {
                (Ok(tag), Ok(trigger)) => tags.push(Arc::new(TagInstance {
                    name: name.into(),
                    trigger,
                    tag,
                })),
                (b, tr) => {
                    for m in b.err().into_iter().flatten() {
                        problems.push(format!("{label}.{m}"));
                    }
                    for m in tr.err().into_iter().flatten() {
                        problems.push(format!("{label}.{m}"));
                    }
                }
            }
        }

        match (problems.is_empty(), cookies) {
            (true, Some(cookies)) => Ok(Pipeline {
                config: Arc::new(config.clone()),
                clients,
                script_proxies,
                tags,
                cookies,
            }),
            _ => Err(problems),
        }
    }

    /// How browser hits record sessions for backend orders: `None` unless `[stitching]` is
    /// enabled and a webhook client (Shopify, WooCommerce, Stripe) is configured. A walk over
    /// the few configured clients, no allocation.
    pub fn stitch_records(&self) -> Option<RecordPolicy> {
        let c = &self.config;
        if !c.stitching.enabled {
            return None;
        }
        let (mut any, mut shopify) = (false, false);
        for client in &c.clients {
            match client {
                ClientConfig::Shopify(_) => (any, shopify) = (true, true),
                ClientConfig::WooCommerce(_) | ClientConfig::Stripe(_) => any = true,
                _ => {}
            }
        }
        any.then(|| RecordPolicy {
            unknown_is_denied: c.cookies.require_consent
                && c.cookies.consent_default == ConsentDefault::Denied,
            shopify_cart: shopify,
        })
    }

    pub fn tag(&self, name: &str) -> Option<&Arc<TagInstance>> {
        self.tags.iter().find(|t| &*t.name == name)
    }
}

/// Dispatchers find the tags of whichever pipeline is in force.
impl TagDirectory for ArcSwap<Pipeline> {
    fn tag(&self, name: &str) -> Option<Arc<TagInstance>> {
        self.load().tag(name).cloned()
    }

    fn names(&self) -> Vec<Arc<str>> {
        self.load().tags.iter().map(|t| t.name.clone()).collect()
    }
}
