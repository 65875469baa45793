//! `[stitching]`: where browsing sessions are kept for backend orders, for how long, and the
//! window in which an order is sent once however often its platform sends it.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StitchingConfig {
    /// Record browsing sessions and join backend orders to them. Off: orders still go out
    /// once each, unstitched.
    pub enabled: bool,
    /// The database file; empty = `stitching.sqlite3` in `[outbox] path`.
    pub path: String,
    /// Sessions older than this are neither matched nor kept.
    pub ttl_days: u32,
    /// At most this many recorded keys are kept, the newest.
    pub max_records: u64,
    /// How long an order's event stays "sent" for the platform's retries and duplicates; an
    /// order older than this is not sent at all (it may have been sent before).
    pub dedup_window_days: u32,
}

impl Default for StitchingConfig {
    fn default() -> Self {
        StitchingConfig {
            enabled: true,
            path: String::new(),
            ttl_days: 30,
            max_records: 1_000_000,
            dedup_window_days: 90,
        }
    }
}

/// Longest retention accepted: a visitor's cookies last at most 400 days in any browser.
pub const MAX_TTL_DAYS: u32 = 400;
/// Longest deduplication window accepted (a few years of rows, a few dozen bytes each).
pub const MAX_DEDUP_WINDOW_DAYS: u32 = 1_000;
pub const DEFAULT_FILE: &str = "stitching.sqlite3";

impl StitchingConfig {
    /// Problems as `key: message`; the caller prefixes `stitching.`.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.ttl_days == 0 || self.ttl_days > MAX_TTL_DAYS {
            problems.push(format!(
                "ttl_days: {} is out of range; use 1 to {MAX_TTL_DAYS} (30 keeps a month of sessions)",
                self.ttl_days
            ));
        }
        if self.max_records == 0 {
            problems.push(
                "max_records: must be greater than 0 (set enabled = false to keep no sessions)"
                    .into(),
            );
        }
        if self.dedup_window_days == 0 || self.dedup_window_days > MAX_DEDUP_WINDOW_DAYS {
            problems.push(format!(
                "dedup_window_days: {} is out of range; use 1 to {MAX_DEDUP_WINDOW_DAYS} (longer than the platforms retry: Shopify 48 h, Stripe 3 days)",
                self.dedup_window_days
            ));
        }
        if self.path.trim() != self.path {
            problems.push(format!(
                "path: `{}` has surrounding spaces; remove them",
                self.path
            ));
        }
        problems
    }

    /// The database file, given the outbox directory.
    pub fn file(&self, outbox_path: &str) -> std::path::PathBuf {
        if self.path.is_empty() {
            std::path::Path::new(outbox_path).join(DEFAULT_FILE)
        } else {
            std::path::PathBuf::from(&self.path)
        }
    }

    pub fn limits(&self) -> super::Limits {
        super::Limits {
            ttl_ms: self.ttl_ms(),
            max_records: self.max_records,
            dedup_window_ms: self.dedup_window_ms(),
        }
    }

    pub fn ttl_ms(&self) -> i64 {
        i64::from(self.ttl_days) * 86_400_000
    }

    pub fn dedup_window_ms(&self) -> i64 {
        i64::from(self.dedup_window_days) * 86_400_000
    }
}
