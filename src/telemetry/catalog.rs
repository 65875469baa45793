//! Every metric tagrelay exports, with the help text `/metrics` prints for it; besides these,
//! the process's own (`process_resident_memory_bytes`, `process_cpu_seconds_total`, …),
//! described by the collector that reads them (`metrics::collect_process_metrics`).
//!
//! Prometheus tooling (`promtool check metrics`, dashboards' metric browsers) expects a
//! `# HELP` line per metric, and the exporter prints one only for described metrics. One list
//! also lets tests hold the alert rules and the dashboard in `deploy/` to names that exist: a
//! unit test below fails when a `counter!`/`gauge!`/`histogram!` in `src/` is missing here or
//! an entry here is recorded nowhere.

/// The Prometheus type of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric: its name, type and help text.
#[derive(Debug, Clone, Copy)]
pub struct MetricDoc {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

const fn m(name: &'static str, kind: Kind, help: &'static str) -> MetricDoc {
    MetricDoc { name, kind, help }
}

use Kind::{Counter, Gauge, Histogram};

/// Every metric, by area.
pub const METRICS: &[MetricDoc] = &[
    // Process.
    m(
        "tagrelay_build_info",
        Gauge,
        "Always 1; the labels name the version and the commit it was built from.",
    ),
    m(
        "tagrelay_ready",
        Gauge,
        "1 while /readyz answers 200 (outbox open, not shutting down), else 0; set at each scrape.",
    ),
    // HTTP and hits.
    m(
        "tagrelay_http_requests_total",
        Counter,
        "Requests answered, by route label and status.",
    ),
    m(
        "tagrelay_http_request_duration_seconds",
        Histogram,
        "Time from a request's arrival to its answer, by route label.",
    ),
    m(
        "tagrelay_hit_duration_seconds",
        Histogram,
        "Time to take one hit (parse, cookies, triggers, outbox commit), by client.",
    ),
    m(
        "tagrelay_events_total",
        Counter,
        "Events parsed from accepted hits, by client.",
    ),
    m(
        "tagrelay_hits_rejected_total",
        Counter,
        "Hits a client claimed but that were refused, by client and reason (outbox_full, store_unavailable, store_failed, invalid, draining, ...).",
    ),
    m(
        "tagrelay_cookie_domain_mismatch_total",
        Counter,
        "Hits whose host is outside the configured cookie domain (host-only cookies set instead).",
    ),
    m(
        "tagrelay_mp_dropped_total",
        Counter,
        "Measurement Protocol items dropped as GA4 would drop them, by reason.",
    ),
    m(
        "tagrelay_script_proxy_requests_total",
        Counter,
        "Requests for proxied vendor scripts, by result.",
    ),
    m(
        "tagrelay_script_proxy_upstream_fetches_total",
        Counter,
        "Fetches of proxied scripts from their upstream, by result.",
    ),
    // Outbox: hits in.
    m(
        "tagrelay_outbox_enqueued_total",
        Counter,
        "Deliveries stored in the outbox, by tag (one per event and tag it fired).",
    ),
    m(
        "tagrelay_outbox_rejected_full_total",
        Counter,
        "Enqueues refused because the outbox reached max_records or max_bytes (hits got 503).",
    ),
    m(
        "tagrelay_outbox_commits_total",
        Counter,
        "Group commits of the outbox, by whether hits waited for an fsync of them (synced).",
    ),
    m(
        "tagrelay_outbox_commit_records",
        Histogram,
        "Records written per group commit.",
    ),
    m(
        "tagrelay_outbox_commit_wait_seconds",
        Histogram,
        "Time a hit waited for the group commit (and fsync) of its events.",
    ),
    m(
        "tagrelay_outbox_fsyncs_total",
        Counter,
        "fsyncs of the outbox log or WAL for hits (one can cover several commits).",
    ),
    m(
        "tagrelay_outbox_fsync_failures_total",
        Counter,
        "fsyncs of the outbox that failed; after one the instance refuses hits (503) until restarted.",
    ),
    m(
        "tagrelay_outbox_fsync_duration_seconds",
        Histogram,
        "Time one fsync of the outbox took.",
    ),
    m(
        "tagrelay_outbox_log_bytes",
        Gauge,
        "Bytes of the outbox log on disk (files some tag has not read past yet).",
    ),
    m(
        "tagrelay_outbox_log_files",
        Gauge,
        "Files of the outbox log on disk.",
    ),
    // Outbox: delivery.
    m(
        "tagrelay_outbox_pending",
        Gauge,
        "Deliveries not yet settled, by tag.",
    ),
    m(
        "tagrelay_outbox_oldest_pending_seconds",
        Gauge,
        "Age of the oldest unsettled delivery, by tag (0 when none).",
    ),
    m(
        "tagrelay_outbox_delivered_total",
        Counter,
        "Deliveries a vendor accepted, by tag.",
    ),
    m(
        "tagrelay_outbox_retries_total",
        Counter,
        "Failed delivery attempts scheduled for a retry, by tag and reason.",
    ),
    m(
        "tagrelay_outbox_dead_lettered_total",
        Counter,
        "Deliveries given up on (rejected, expired, invalid; crashed: every replica that took it stopped), by tag and reason.",
    ),
    m(
        "tagrelay_outbox_dead_letters_purged_total",
        Counter,
        "Dead letters deleted for their age or the dead-letter cap.",
    ),
    // Outbox on Redis (`backend = "redis"`).
    m(
        "tagrelay_outbox_redis_connected",
        Gauge,
        "1 while Redis is reachable and usable as the outbox, else 0 (hits get 503, delivery waits).",
    ),
    m(
        "tagrelay_outbox_redis_reconnects_total",
        Counter,
        "Times the connection to Redis came back after an outage (or a failover).",
    ),
    m(
        "tagrelay_outbox_redis_lag",
        Gauge,
        "Deliveries in a tag's streams that no replica has read yet (consumer-group lag, Redis 7+), by tag.",
    ),
    m(
        "tagrelay_tag_request_duration_seconds",
        Histogram,
        "Time of one request to a vendor, by tag.",
    ),
    m(
        "tagrelay_tag_dropped_total",
        Counter,
        "Events or fields a tag left out to meet its vendor's rules, by tag type and reason.",
    ),
    m(
        "tagrelay_meta_user_data_dropped_total",
        Counter,
        "Meta user_data fields left out because they did not normalise, by field.",
    ),
    m(
        "tagrelay_tiktok_user_data_dropped_total",
        Counter,
        "TikTok user fields left out because they did not normalise, by field.",
    ),
    m(
        "tagrelay_google_ads_user_data_dropped_total",
        Counter,
        "Google Ads user identifiers left out because they did not normalise, by field.",
    ),
    m(
        "tagrelay_google_ads_processing_errors_total",
        Counter,
        "Events Google's Data Manager reported failing after it accepted their request, by tag and Google's reason.",
    ),
    m(
        "tagrelay_tag_status_unknown_total",
        Counter,
        "Requests a vendor accepted whose processing outcome was not known before the status checks ended (counted as delivered), by tag.",
    ),
    // Traces.
    m(
        "tagrelay_trace_spans_dropped_total",
        Counter,
        "With [telemetry] otlp_endpoint: trace spans the collector did not take (the export failed); they are dropped.",
    ),
    // Identity and the ITP check.
    m(
        "tagrelay_itp_verdict",
        Gauge,
        "With [server] itp_check: (page host, tagging host) pairs seen, by Safari's verdict on the cookies tagrelay sets.",
    ),
    m(
        "tagrelay_visitor_cookie_age_seconds",
        Histogram,
        "With [cookies] measure_cookie_age: age of the visitor cookie browsers send back, by engine (webkit or other).",
    ),
    m(
        "tagrelay_click_ids_refused_total",
        Counter,
        "Click ids in page URLs refused as malformed (never set as a cookie), by URL parameter.",
    ),
    // Backend orders and stitching.
    m(
        "tagrelay_stitch_orders_total",
        Counter,
        "Order events of webhook clients, by client and result (stitched, unstitched, duplicate: sent before; too_old: older than the dedup window).",
    ),
    m(
        "tagrelay_stitch_sessions_recorded_total",
        Counter,
        "Keys of browsing sessions written to the stitching store for later orders.",
    ),
    m(
        "tagrelay_stitch_sessions_dropped_total",
        Counter,
        "Keys of browsing sessions not recorded, by reason (queue_full, store_error, closed): their orders go out unstitched.",
    ),
    m(
        "tagrelay_stitch_sessions_purged_total",
        Counter,
        "Recorded session keys deleted for [stitching] ttl_days or max_records.",
    ),
];

/// Registers every metric's help text with the installed recorder.
pub fn describe_all() {
    for d in METRICS {
        match d.kind {
            Kind::Counter => metrics::describe_counter!(d.name, d.help),
            Kind::Gauge => metrics::describe_gauge!(d.name, d.help),
            Kind::Histogram => metrics::describe_histogram!(d.name, d.help),
        }
    }
}

/// The entry for `name`, if it is a metric tagrelay exports.
pub fn find(name: &str) -> Option<&'static MetricDoc> {
    METRICS.iter().find(|d| d.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::Path;

    /// Every metric recorded in `src/` by a `counter!`/`gauge!`/`histogram!` with a literal name.
    fn recorded_in_source() -> BTreeMap<String, Kind> {
        let re = regex::Regex::new(r#"\b(counter|gauge|histogram)!\(\s*"(tagrelay_[a-z0-9_]+)""#)
            .unwrap();
        let mut found = BTreeMap::new();
        let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for c in re.captures_iter(&text) {
                        let kind = match &c[1] {
                            "counter" => Kind::Counter,
                            "gauge" => Kind::Gauge,
                            _ => Kind::Histogram,
                        };
                        let prev = found.insert(c[2].to_owned(), kind);
                        assert!(
                            prev.is_none_or(|p| p == kind),
                            "{} is recorded as two types",
                            &c[2]
                        );
                    }
                }
            }
        }
        found
    }

    #[test]
    fn the_catalog_lists_exactly_the_metrics_the_source_records() {
        let recorded = recorded_in_source();
        assert!(
            recorded.len() > 20,
            "the scan found too little: {recorded:?}"
        );
        for (name, kind) in &recorded {
            let doc = find(name).unwrap_or_else(|| panic!("{name} is not in METRICS"));
            assert_eq!(doc.kind, *kind, "{name}: catalog says {:?}", doc.kind);
        }
        for d in METRICS {
            assert!(
                recorded.contains_key(d.name),
                "{} is in METRICS but nothing records it",
                d.name
            );
        }
    }

    #[test]
    fn names_follow_the_conventions() {
        let mut seen = std::collections::HashSet::new();
        for d in METRICS {
            assert!(seen.insert(d.name), "{} listed twice", d.name);
            assert!(d.name.starts_with("tagrelay_"), "{}", d.name);
            assert_eq!(
                d.kind == Kind::Counter,
                d.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                d.name
            );
            assert!(!d.help.is_empty() && d.help.ends_with('.'), "{}", d.name);
        }
    }
}
