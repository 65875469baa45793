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
                p.clients.iter().map(|c| c.kind()).collect::<Vec<_>>().join(", "),
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
        Err(problems) => report(&ConfigError::new(&loaded.source, problems)),
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
        let app = crate::Application::build(loaded).await?;
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

/// `tagrelay healthcheck`: a self-contained probe for images without a shell.
pub fn healthcheck(url: &str) -> ExitCode {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
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
