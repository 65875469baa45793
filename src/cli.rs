//! What the `tagrelay` binary's subcommands do; kept here so `main.rs` stays tiny.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{self, ConfigError};
use crate::pipeline::Pipeline;

/// `tagrelay check`: parse and validate, no sockets, no network.
pub fn check(path: Option<&Path>) -> ExitCode {
    let loaded = match config::load(path) {
        Ok(l) => l,
        Err(e) => return report(&e),
    };
    match Pipeline::build(&loaded.config) {
        Ok(p) => {
            println!(
                "{}: ok ({} client{}: {}; {} tag{}: {})",
                loaded.source,
                p.clients.len(),
                plural(p.clients.len()),
                p.clients
                    .iter()
                    .map(|c| c.kind())
                    .collect::<Vec<_>>()
                    .join(", "),
                p.tags.len(),
                plural(p.tags.len()),
                p.tags
                    .iter()
                    .map(|t| format!("{} ({})", t.name, t.tag.kind()))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            ExitCode::SUCCESS
        }
        Err(problems) => report(&loaded.invalid(problems)),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn report(e: &ConfigError) -> ExitCode {
    eprint!("{e}");
    ExitCode::FAILURE
}

/// `tagrelay serve`: telemetry → config → Application::build → run.
pub fn serve(path: Option<&Path>) -> ExitCode {
    let loaded = match config::load(path) {
        Ok(l) => l,
        Err(e) => return report(&e),
    };
    crate::telemetry::init(loaded.config.server.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let app = crate::app::Application::build(loaded).await?;
        app.run_until_stopped().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "tagrelay failed");
            eprintln!("tagrelay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `tagrelay healthcheck`: a self-contained probe for images without a shell. Without a URL
/// it probes the public listener of the config (`--config`, `$TAGRELAY_CONFIG`, …), as
/// `serve` with the same config and environment would bind it (the admin listener for
/// `[outbox] role = "deliver"`, which has no public one).
pub fn healthcheck(path: Option<&Path>, url: Option<&str>) -> ExitCode {
    let url = match url {
        Some(u) => u.to_owned(),
        None => match config::load(path) {
            // A process that only delivers has no public listener: its admin one answers.
            Ok(l) if !l.config.outbox.role.takes_hits() => health_url(l.config.server.admin_listen),
            Ok(l) => health_url(l.config.server.listen),
            Err(e) => return report(&e),
        },
    };
    probe(&url)
}

/// `/healthz` on `listen`; a wildcard address (0.0.0.0, ::) is reached on loopback.
fn health_url(listen: std::net::SocketAddr) -> String {
    format!("http://{}/healthz", reachable(listen))
}

/// Where a process on this machine reaches a listener bound to `listen`: a wildcard address
/// (0.0.0.0, ::) on loopback.
fn reachable(listen: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    addr
}

/// The admin listener of a config as a URL, and its token.
fn admin_of(
    path: Option<&Path>,
    url: Option<&str>,
) -> Result<(String, Option<crate::secret::Secret>), ExitCode> {
    let loaded = config::load(path).map_err(|e| report(&e))?;
    let base = match url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => format!("http://{}", reachable(loaded.config.server.admin_listen)),
    };
    Ok((base, loaded.config.admin.token))
}

/// POSTs to the admin listener; prints the answer. `Ok(status)` when it answered.
fn admin_post(
    base: &str,
    token: Option<&crate::secret::Secret>,
    path_and_query: &str,
) -> Result<u16, String> {
    let url = format!("{base}{path_and_query}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| e.to_string())?;
        let mut req = client.post(&url);
        if let Some(t) = token {
            req = req.bearer_auth(t.expose());
        }
        let r = req
            .send()
            .await
            .map_err(|e| format!("cannot reach {url}: {}", e.without_url()))?;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        if (200..300).contains(&status) {
            print!("{text}");
        } else {
            eprint!("{url}: HTTP {status}: {text}");
        }
        Ok(status)
    })
}

/// `tagrelay reload`: the running server re-reads its config (as SIGHUP does), through its
/// admin listener (the config's `admin_listen` and token, or `--url`). Exit 0 when the new
/// config is in force, 1 with its problems when it was refused.
pub fn reload(path: Option<&Path>, url: Option<&str>) -> ExitCode {
    let (base, token) = match admin_of(path, url) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match admin_post(&base, token.as_ref(), "/admin/reload") {
        Ok(200) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tagrelay reload: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `tagrelay drain`: the running server stops taking hits, delivers what its outbox holds and
/// stops when it owes nothing or after `timeout_secs` (default `server.drain_timeout_ms`).
/// With `wait`, returns once the server has stopped.
pub fn drain(
    path: Option<&Path>,
    url: Option<&str>,
    timeout_secs: Option<u64>,
    wait: bool,
) -> ExitCode {
    let (base, token) = match admin_of(path, url) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let query = timeout_secs
        .map(|s| format!("?timeout_ms={}", s.saturating_mul(1000)))
        .unwrap_or_default();
    match admin_post(&base, token.as_ref(), &format!("/admin/drain{query}")) {
        Ok(202) => {}
        Ok(_) => return ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tagrelay drain: {e}");
            return ExitCode::FAILURE;
        }
    }
    if !wait {
        return ExitCode::SUCCESS;
    }
    // Stopped once the admin listener no longer answers.
    let health = format!("{base}/healthz");
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        if answers(&health).is_none() {
            println!("tagrelay stopped");
            return ExitCode::SUCCESS;
        }
    }
}

/// Whether anything answers `url` (any status), `None` when nothing does.
fn answers(url: &str) -> Option<u16> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(2))
            .build()
            .ok()?;
        Some(client.get(url).send().await.ok()?.status().as_u16())
    })
}

/// `tagrelay doctor itp`: DNS against Safari's 7-day cap on cloaked hosts' cookies.
pub fn doctor_itp(path: Option<&Path>, args: &crate::doctor::itp::cli::ItpArgs) -> ExitCode {
    crate::doctor::itp::cli::run(args, || {
        let loaded = config::load(path).map_err(|e| e.to_string().trim().to_owned())?;
        Ok(crate::doctor::itp::cli::ConfigDefaults {
            source: loaded.source.to_string(),
            allowed_origins: loaded.config.server.allowed_origins,
            path_prefix: loaded.config.server.path_prefix,
        })
    })
}

/// `tagrelay identity forget`: erase a person's records from the stitching store.
pub fn identity_forget(path: Option<&Path>, args: &crate::stitching::cli::ForgetArgs) -> ExitCode {
    match config::load(path) {
        Ok(l) => {
            let c = &l.config;
            if c.outbox.backend != crate::outbox::config::Backend::Redis {
                return crate::stitching::cli::forget(&c.stitching.file(&c.outbox.path), args);
            }
            let Some(who) = crate::stitching::cli::whose(args) else {
                return ExitCode::FAILURE;
            };
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return ExitCode::FAILURE;
            };
            let erased = rt.block_on(crate::outbox::store::redis::stitch::forget(
                &c.outbox,
                c.stitching.limits(),
                &who,
            ));
            crate::stitching::cli::said(erased, "the shared store (Redis)")
        }
        Err(e) => report(&e),
    }
}

fn probe(url: &str) -> ExitCode {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return ExitCode::FAILURE;
    };
    let ok = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(2))
            .build()
            .ok()?;
        let r = client.get(url).send().await.ok()?;
        Some(r.status().is_success())
    });
    if ok == Some(true) {
        ExitCode::SUCCESS
    } else {
        eprintln!("unhealthy: {url}");
        ExitCode::FAILURE
    }
}

/// The `[outbox]` of the configuration, checked as `tagrelay check` would.
fn outbox_config(path: Option<&Path>) -> Result<crate::outbox::config::OutboxConfig, ExitCode> {
    let loaded = config::load(path).map_err(|e| report(&e))?;
    let problems = loaded.config.outbox.validate();
    if !problems.is_empty() {
        return Err(report(&ConfigError::new(&loaded.source, problems)));
    }
    Ok(loaded.config.outbox)
}

fn tool_failed(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("tagrelay outbox: {e}");
    ExitCode::FAILURE
}

fn print_json(v: &impl serde::Serialize) -> ExitCode {
    match serde_json::to_string_pretty(v) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => tool_failed(e),
    }
}

/// `tagrelay outbox stats`
pub fn outbox_stats(path: Option<&Path>, json: bool) -> ExitCode {
    let cfg = match outbox_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match crate::outbox::store::tools::stats(&cfg) {
        Ok(s) if json => print_json(&s),
        Ok(s) => {
            print!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => tool_failed(e),
    }
}

/// `tagrelay outbox dead-letters`
pub fn outbox_dead_letters(
    path: Option<&Path>,
    tag: Option<&str>,
    limit: usize,
    json: bool,
) -> ExitCode {
    let cfg = match outbox_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match crate::outbox::store::tools::dead_letters(&cfg, tag, limit) {
        Ok(list) if json => print_json(&list),
        Ok(list) => {
            if list.is_empty() {
                println!("no dead letters");
            }
            for d in list {
                println!("{d}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => tool_failed(e),
    }
}

/// `tagrelay outbox replay`
pub fn outbox_replay(path: Option<&Path>, tag: Option<&str>, all: bool) -> ExitCode {
    if tag.is_none() && !all {
        eprintln!("tagrelay outbox replay: say which dead letters: --tag NAME or --all");
        return ExitCode::FAILURE;
    }
    let cfg = match outbox_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match crate::outbox::store::tools::replay(&cfg, tag) {
        Ok(n) => {
            println!("{n} dead letter{} moved back to pending", plural(n));
            ExitCode::SUCCESS
        }
        Err(e) => tool_failed(e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_health_url_follows_the_listen_address() {
        let url = |a: &str| super::health_url(a.parse().unwrap());
        assert_eq!(url("0.0.0.0:8080"), "http://127.0.0.1:8080/healthz");
        assert_eq!(url("[::]:8081"), "http://[::1]:8081/healthz");
        assert_eq!(url("127.0.0.1:3000"), "http://127.0.0.1:3000/healthz");
        assert_eq!(url("10.1.2.3:80"), "http://10.1.2.3:80/healthz");
    }
}
