//! `[outbox]`: where and how events are stored, back-pressure, retries and delivery threads.

use serde::Deserialize;

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
