//! Operator tools (`tagrelay outbox stats | dead-letters | replay`) for whichever engine the
//! configuration names, and what they report. Each engine's own tools do the work:
//! `embedded::tools` on the outbox directory, `redis::tools` on the shared store; both work
//! while servers run.

use std::path::Path;

use crate::outbox::config::{Backend, OutboxConfig};

/// Stats of the configured store.
pub fn stats(cfg: &OutboxConfig) -> Result<Stats, String> {
    match cfg.backend {
        Backend::Embedded => {
            super::embedded::tools::stats(Path::new(&cfg.path)).map_err(|e| e.to_string())
        }
        Backend::Redis => on_runtime(super::redis::tools::stats(cfg)),
    }
}

/// The most recent dead letters (newest first), optionally of one tag.
pub fn dead_letters(
    cfg: &OutboxConfig,
    tag: Option<&str>,
    limit: usize,
) -> Result<Vec<DeadLetter>, String> {
    match cfg.backend {
        Backend::Embedded => super::embedded::tools::dead_letters(Path::new(&cfg.path), tag, limit)
            .map_err(|e| e.to_string()),
        Backend::Redis => on_runtime(super::redis::tools::dead_letters(cfg, tag, limit)),
    }
}

/// Moves dead letters (of one tag, or all) back to pending, due now, attempts reset and a
/// fresh retry window. Returns how many moved.
pub fn replay(cfg: &OutboxConfig, tag: Option<&str>) -> Result<usize, String> {
    match cfg.backend {
        Backend::Embedded => {
            super::embedded::tools::replay(Path::new(&cfg.path), tag).map_err(|e| e.to_string())
        }
        Backend::Redis => on_runtime(super::redis::tools::replay(cfg, tag)),
    }
}

/// Runs a tool of the shared store (async) from the CLI (sync).
fn on_runtime<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?
        .block_on(f)
}

pub use super::report::{utc, DeadLetter, DeadLetterId, Stats, TagStats};
