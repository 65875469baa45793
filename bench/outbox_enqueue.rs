//! Enqueue throughput of the embedded outbox with group commit.
//!
//! 64 concurrent tasks each enqueue one ~600-byte record at a time (like hits firing one
//! tag) until 200k records are committed, for each fsync mode. Run with
//! `cargo bench --bench outbox_enqueue`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tagrelay::outbox::config::{FsyncMode, OutboxConfig};
use tagrelay::outbox::store::embedded::EmbeddedStore;
use tagrelay::outbox::{NewEvent, Outbox};

const TASKS: usize = 64;
const RECORDS: usize = 200_000;
const PAYLOAD_BYTES: usize = 600;

struct Row {
    mode: &'static str,
    interval_ms: u64,
    secs: f64,
    commits: u64,
    p50: Duration,
    p99: Duration,
}

fn payload(i: usize) -> Bytes {
    let mut s = format!(
        r#"{{"event_name":"page_view","event_id":"{i:016x}","timestamp_ms":1700000000000,"source":"ga4","client_id":"123456789.1700000000","page_location":"https://www.example.com/products/item?id={i}","user_agent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36","params":{{"pad":""#
    );
    while s.len() < PAYLOAD_BYTES - 3 {
        s.push('x');
    }
    s.push_str("\"}}");
    Bytes::from(s)
}

async fn run(mode: FsyncMode, name: &'static str, interval_ms: u64) -> Row {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = OutboxConfig {
        path: dir.path().to_string_lossy().into_owned(),
        fsync: mode,
        commit_interval_ms: interval_ms,
        ..OutboxConfig::default()
    };
    let outbox = EmbeddedStore::open(&cfg).await.expect("open outbox");
    let tag: Arc<str> = Arc::from("ga4");
    let per_task = RECORDS / TASKS;
    let start = Instant::now();
    let mut joins = Vec::new();
    for t in 0..TASKS {
        let outbox = outbox.clone();
        let tag = tag.clone();
        joins.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_task);
            for i in 0..per_task {
                let n = t * per_task + i;
                let rec = NewEvent {
                    event_id: format!("{n:016x}"),
                    payload: payload(n),
                    event: None,
                    tags: vec![tag.clone()],
                    enqueued_at_ms: 1_700_000_000_000,
                };
                let began = Instant::now();
                outbox.enqueue(vec![rec]).await.expect("enqueue");
                latencies.push(began.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::with_capacity(RECORDS);
    for j in joins {
        latencies.extend(j.await.expect("task"));
    }
    let secs = start.elapsed().as_secs_f64();
    let commits = outbox.commit_count();
    outbox.close().await;
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Row {
        mode: name,
        interval_ms,
        secs,
        commits,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: a smoke run only.
    if !std::env::args().any(|a| a == "--bench") {
        println!("outbox_enqueue: run with `cargo bench --bench outbox_enqueue`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let records = (RECORDS / TASKS) * TASKS;
    println!(
        "outbox enqueue: {records} records of ~{PAYLOAD_BYTES} B from {TASKS} tasks, one record per enqueue"
    );
    println!(
        "{:<7} {:>9} {:>8} {:>11} {:>8} {:>11} {:>9} {:>9}",
        "fsync", "interval", "secs", "records/s", "commits", "rec/commit", "p50", "p99"
    );
    for (mode, name, interval) in [
        (FsyncMode::Batch, "batch", 2),
        (FsyncMode::Off, "off", 2),
        (FsyncMode::Batch, "batch", 0),
        (FsyncMode::Off, "off", 0),
    ] {
        let r = rt.block_on(run(mode, name, interval));
        println!(
            "{:<7} {:>7}ms {:>8.2} {:>11.0} {:>8} {:>11.1} {:>9.2?} {:>9.2?}",
            r.mode,
            r.interval_ms,
            r.secs,
            records as f64 / r.secs,
            r.commits,
            records as f64 / r.commits.max(1) as f64,
            r.p50,
            r.p99
        );
    }
}
