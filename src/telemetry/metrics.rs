//! The Prometheus recorder, the HTTP request metrics every listener records, and the bounded
//! route label handlers put on their responses.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Bounded route label for metrics and logs, set by handlers as a response extension.
#[derive(Debug, Clone, Copy)]
pub struct RouteLabel(pub &'static str);

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The histogram of returned visitor cookies' ages, by browser engine (see `identity::age`).
pub const VISITOR_COOKIE_AGE: &str = "tagrelay_visitor_cookie_age_seconds";

/// Whether [`metrics_handle`] has installed the process-wide recorder.
pub(crate) fn recorder_installed() -> bool {
    PROMETHEUS.get().is_some()
}

/// Installs the process-wide metrics recorder once and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let latency = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            // Ages of returned visitor cookies: hours to 400 days, with edges around Safari's
            // 7-day cap (604800 s) so "WebKit never above 7 days" reads off the buckets.
            let day = 86_400.0;
            let cookie_age = [
                3_600.0,
                day,
                3.0 * day,
                6.0 * day,
                7.0 * day,
                8.0 * day,
                14.0 * day,
                30.0 * day,
                90.0 * day,
                180.0 * day,
                400.0 * day,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(VISITOR_COOKIE_AGE.into()), &cookie_age)
                })
                .expect("static bucket lists are not empty");
            match builder.install_recorder() {
                Ok(h) => {
                    super::catalog::describe_all();
                    process_collector().describe();
                    h
                }
                // Another recorder is installed (embedding); keep a private one for /metrics.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Reads the process's own figures (`process_resident_memory_bytes`,
/// `process_cpu_seconds_total`, open files, threads, start time) from the OS: call at each
/// scrape, so they are as fresh as the scrape and cost nothing between scrapes.
pub fn collect_process_metrics() {
    process_collector().collect();
}

/// How often histogram samples are folded into their buckets.
const METRICS_UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the metrics recorder's memory flat. Histograms buffer every raw sample until they
/// are folded into buckets, which the exporter only does on a scrape or an upkeep; without
/// this task an unscraped instance grows by several bytes per hit (~1 GiB per hour at 20k
/// hits/s). Call once inside the runtime; the task ends with it.
pub fn spawn_metrics_upkeep() {
    let handle = metrics_handle();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(METRICS_UPKEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}
