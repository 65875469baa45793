//! The running ITP check: judges each (page host, tagging host) pair the server sees, in the
//! background, and keeps the verdicts for the metric, the log and the debug view.
//!
//! The hit path calls [`ItpMonitor::observe`], which only looks the pair up in a published
//! table (one atomic load and a hash lookup) and, for a pair not seen before, hands it to a
//! bounded channel without waiting. A worker task resolves, evaluates, caches the verdict by
//! the DNS TTL (clamped to 1 min – 1 h) and publishes a new table.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_resolver::TokioResolver;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::evaluate::{evaluate, PairReport, Severity, Tagging, Verdict};
use super::facts::{site_of, HostFacts};
use super::resolve::{collect, ItpResolver};
use crate::identity::{host_without_port, is_ip_literal};

/// Most pairs tracked at once. Page and tagging hosts come from request headers, which anyone
/// can write: past this many, new pairs are not judged (and no DNS query is made for them).
pub const MAX_PAIRS: usize = 256;
/// Requests for new pairs waiting for the worker; more are dropped (the next hit asks again).
const QUEUE: usize = 64;
/// Pairs resolved at the same time.
const CONCURRENT: usize = 4;
/// A verdict is re-checked after the DNS TTL, but never sooner than this…
pub const MIN_RECHECK: Duration = Duration::from_secs(60);
/// …nor later than this.
pub const MAX_RECHECK: Duration = Duration::from_secs(3600);
/// How often the worker looks for verdicts to re-check and idle pairs to forget.
const TICK: Duration = Duration::from_secs(15);
/// A pair no hit has named for this long is forgotten (configured pairs never are).
const IDLE: Duration = Duration::from_secs(3600);

/// What the running check needs from the configuration.
#[derive(Debug, Clone, Default)]
pub struct ItpSettings {
    pub resolver: ItpResolver,
    /// `[server] allowed_origins`: the page hosts of the startup check.
    pub allowed_origins: Vec<String>,
    /// `[server] path_prefix`: when set, hits from those pages are taken to go to the page's
    /// own host (same-origin).
    pub path_prefix: String,
}

/// One judged pair, as the debug view shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PairView {
    pub page_host: String,
    pub tagging_host: String,
    /// From the configuration (the startup check) rather than from a hit.
    pub configured: bool,
    /// `None` while the first check is running.
    pub report: Option<Arc<PairReport>>,
    /// Unix ms of the last check.
    pub checked_at_ms: Option<i64>,
}

/// The running ITP check. Cheap to clone; the worker stops with [`ItpMonitor::shutdown`] or
/// when the runtime ends.
#[derive(Clone)]
pub struct ItpMonitor {
    shared: Arc<Shared>,
}

struct Shared {
    hasher: foldhash::fast::RandomState,
    table: ArcSwap<Table>,
    requests: mpsc::Sender<Request>,
    /// The table holds `MAX_PAIRS`: unknown pairs are ignored without allocating.
    full: AtomicBool,
    /// Advanced by the worker every tick; hits stamp their pair with it (no clock read).
    epoch: AtomicU32,
    /// Bumped on every published change, for the debug view and tests to wait on.
    changes: watch::Sender<u64>,
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Default, Clone)]
struct Table {
    pairs: HashMap<u64, Arc<Published>, foldhash::fast::RandomState>,
}

struct Published {
    view: PairView,
    last_seen: Arc<AtomicU32>,
}

struct Request {
    key: u64,
    page: String,
    tagging: String,
}

impl ItpMonitor {
    /// Starts the worker (inside a Tokio runtime) and the startup check over the configured
    /// origins. Fails only when the resolver cannot be set up.
    pub fn start(settings: ItpSettings) -> Result<Self, String> {
        let resolver = Arc::new(settings.resolver.build()?);
        let (tx, rx) = mpsc::channel(QUEUE);
        let shared = Arc::new(Shared {
            hasher: foldhash::fast::RandomState::default(),
            table: ArcSwap::from_pointee(Table::default()),
            requests: tx,
            full: AtomicBool::new(false),
            epoch: AtomicU32::new(0),
            changes: watch::channel(0).0,
            worker: Mutex::new(None),
        });
        let monitor = ItpMonitor { shared };
        set_gauges(&HashMap::new());
        let worker = Worker {
            shared: monitor.shared.clone(),
            resolver,
            settings,
            pairs: HashMap::new(),
            queue: VecDeque::new(),
            running: JoinSet::new(),
            tasks: HashMap::new(),
            warned_full: false,
        };
        let handle = tokio::spawn(worker.run(rx));
        *monitor
            .shared
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(handle);
        Ok(monitor)
    }

    /// Notes that a hit from a page on `page` (an `Origin`, a `Referer` URL or a bare host) was
    /// sent to `tagging_host` (the `Host` or forwarded host, port allowed). Never waits,
    /// resolves or logs; allocates only for a pair it has not seen.
    pub fn observe(&self, page: &str, tagging_host: &str) {
        // Browsers send lower-case origins and hosts, so the cheap cut finds known pairs;
        // anything else takes the validating path, which lower-cases and checks every byte.
        let key = self.key(quick_host(page), quick_host(tagging_host));
        let table = self.shared.table.load();
        if let Some(p) = table.pairs.get(&key) {
            self.stamp(p);
            return;
        }
        let (Some(page), Some(tagging)) = (host_of(page), host_of(tagging_host)) else {
            return;
        };
        let key = self.key(&page, &tagging);
        if let Some(p) = table.pairs.get(&key) {
            self.stamp(p);
            return;
        }
        if self.shared.full.load(Ordering::Relaxed) {
            return;
        }
        let _ = self.shared.requests.try_send(Request {
            key,
            page: page.into_owned(),
            tagging: tagging.into_owned(),
        });
    }

    fn stamp(&self, p: &Published) {
        let epoch = self.shared.epoch.load(Ordering::Relaxed);
        // Read first: most hits find it already stamped, and a load does not contend.
        if p.last_seen.load(Ordering::Relaxed) != epoch {
            p.last_seen.store(epoch, Ordering::Relaxed);
        }
    }

    /// The verdict for a pair, if it has one: for the debug view's note on a hit.
    pub fn report_for(&self, page: &str, tagging_host: &str) -> Option<Arc<PairReport>> {
        let (page, tagging) = (host_of(page)?, host_of(tagging_host)?);
        let table = self.shared.table.load();
        table
            .pairs
            .get(&self.key(&page, &tagging))?
            .view
            .report
            .clone()
    }

    /// Every pair tracked, the worst first: for the debug view's panel.
    pub fn pairs(&self) -> Vec<PairView> {
        let table = self.shared.table.load();
        let mut list: Vec<PairView> = table.pairs.values().map(|p| p.view.clone()).collect();
        list.sort_by(|a, b| {
            let sev = |v: &PairView| v.report.as_ref().map(|r| r.severity);
            sev(b)
                .cmp(&sev(a))
                .then_with(|| a.page_host.cmp(&b.page_host))
                .then_with(|| a.tagging_host.cmp(&b.tagging_host))
        });
        list
    }

    /// One sentence per pair that is not ok, the worst first; for the debug view's summary.
    pub fn summary(&self) -> Vec<String> {
        self.pairs()
            .into_iter()
            .filter_map(|p| p.report)
            .filter(|r| r.severity > Severity::Ok)
            .map(|r| r.summary.clone())
            .collect()
    }

    /// Changes whenever a verdict is published (new pair, changed or re-checked verdict).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Stops the worker. Verdicts already published stay readable.
    pub fn shutdown(&self) {
        if let Some(h) = self
            .shared
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            h.abort();
        }
    }

    fn key(&self, page: &str, tagging: &str) -> u64 {
        self.shared.hasher.hash_one((page, tagging))
    }
}

/// The host part of an origin, URL or `Host` value, cut without checks: scheme, path and port
/// removed. Equal to [`host_of`] for what browsers send; only used to find known pairs.
fn quick_host(value: &str) -> &str {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .unwrap_or(value);
    let rest = match memchr::memchr(b'/', rest.as_bytes()) {
        Some(i) => &rest[..i],
        None => rest,
    };
    match memchr::memrchr(b':', rest.as_bytes()) {
        Some(i) => &rest[..i],
        None => rest,
    }
}

/// The host of an `Origin`, a URL or a `Host` value: lower case, no port, no brackets, no
/// userinfo. `None` for what cannot be a host (`null` origins, empty values, odd bytes).
/// Runs on every hit the check sees, so it scans the bytes once instead of parsing a URL.
pub fn host_of(value: &str) -> Option<std::borrow::Cow<'_, str>> {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .unwrap_or_else(|| match memchr::memmem::find(value.as_bytes(), b"://") {
            Some(i) => &value[i + 3..],
            None => value,
        });
    let end = rest
        .bytes()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let mut authority = &rest[..end];
    if let Some(at) = memchr::memrchr(b'@', authority.as_bytes()) {
        authority = &authority[at + 1..];
    }
    let host = host_without_port(authority);
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    let (mut dot, mut upper) = (false, false);
    for b in host.bytes() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b':' => {}
            b'.' => dot = true,
            b'A'..=b'Z' => upper = true,
            _ => return None,
        }
    }
    // A name needs a dot (`localhost`, `null` are not sites); an IPv6 literal has none.
    if !dot && !is_ip_literal(host) {
        return None;
    }
    Some(if upper {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    })
}

struct PairState {
    page: String,
    tagging: String,
    configured: bool,
    last_seen: Arc<AtomicU32>,
    report: Option<Arc<PairReport>>,
    checked_at_ms: Option<i64>,
    /// When the verdict is due for a re-check; `None` for verdicts by name (never change).
    recheck_at: Option<Instant>,
    /// The epoch of the last check start: a later stamp means hits still name the pair.
    checked_epoch: u32,
    in_flight: bool,
}

struct Worker {
    shared: Arc<Shared>,
    resolver: Arc<TokioResolver>,
    settings: ItpSettings,
    pairs: HashMap<u64, PairState>,
    queue: VecDeque<u64>,
    running: JoinSet<(u64, PairReport, Duration)>,
    /// The pair each running check is for, so a check that fails can be tried again.
    tasks: HashMap<tokio::task::Id, u64>,
    warned_full: bool,
}

impl Worker {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        self.startup_check();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.start_queued();
            tokio::select! {
                Some(req) = requests.recv() => self.add(req.key, req.page, req.tagging, false),
                Some(done) = self.running.join_next_with_id() => match done {
                    Ok((id, (key, report, ttl))) => {
                        self.tasks.remove(&id);
                        self.finish(key, report, ttl);
                    }
                    Err(e) => self.failed(e),
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    /// The pairs the configuration names. Without `path_prefix` the tagging host is only known
    /// from hits, so those pairs wait for the first one.
    fn startup_check(&mut self) {
        let pages: Vec<String> = self
            .settings
            .allowed_origins
            .iter()
            .filter_map(|o| host_of(o).map(|h| h.into_owned()))
            .collect();
        if pages.is_empty() {
            tracing::info!("ITP check on: no [server] allowed_origins to check at startup; each (page, tagging host) pair is judged when hits name it");
            return;
        }
        if self.settings.path_prefix.is_empty() {
            tracing::info!(
                pages = pages.join(", "),
                "ITP check on: the tagging host is known from the first hit to it, so these pages are judged then (`tagrelay doctor itp --site URL --tagging URL` judges them now)"
            );
            return;
        }
        for page in pages {
            let key = self.shared.hasher.hash_one((page.as_str(), page.as_str()));
            self.add(key, page.clone(), page, true);
        }
    }

    fn add(&mut self, key: u64, page: String, tagging: String, configured: bool) {
        if self.pairs.contains_key(&key) {
            return;
        }
        if self.pairs.len() >= MAX_PAIRS {
            self.shared.full.store(true, Ordering::Relaxed);
            if !self.warned_full {
                self.warned_full = true;
                tracing::warn!(
                    max = MAX_PAIRS,
                    "ITP check: {MAX_PAIRS} (page, tagging host) pairs tracked; new pairs are not judged until idle ones are forgotten"
                );
            }
            return;
        }
        let epoch = self.shared.epoch.load(Ordering::Relaxed);
        self.pairs.insert(
            key,
            PairState {
                page,
                tagging,
                configured,
                last_seen: Arc::new(AtomicU32::new(epoch)),
                report: None,
                checked_at_ms: None,
                recheck_at: None,
                checked_epoch: epoch,
                in_flight: false,
            },
        );
        self.queue.push_back(key);
        self.publish();
    }

    fn start_queued(&mut self) {
        while self.running.len() < CONCURRENT {
            let Some(key) = self.queue.pop_front() else {
                return;
            };
            let Some(p) = self.pairs.get_mut(&key) else {
                continue;
            };
            if p.in_flight {
                continue;
            }
            p.in_flight = true;
            p.checked_epoch = self.shared.epoch.load(Ordering::Relaxed);
            let (page, tagging) = (p.page.clone(), p.tagging.clone());
            let resolver = self.resolver.clone();
            let task = self.running.spawn(async move {
                let (report, ttl) = judge(&page, &tagging, &resolver).await;
                (key, report, ttl)
            });
            self.tasks.insert(task.id(), key);
        }
    }

    fn finish(&mut self, key: u64, report: PairReport, ttl: Duration) {
        let Some(p) = self.pairs.get_mut(&key) else {
            return;
        };
        p.in_flight = false;
        let changed = p.report.as_ref().map(|r| r.verdict) != Some(report.verdict);
        if changed {
            log_verdict(&report, p.report.as_ref().map(|r| r.verdict), p.configured);
        }
        p.recheck_at = (!ttl.is_zero()).then(|| Instant::now() + ttl);
        p.checked_at_ms = Some(crate::clock::now_ms());
        p.report = Some(Arc::new(report));
        self.publish();
    }

    /// A check that panicked: its pair is tried again at the next re-check.
    fn failed(&mut self, e: tokio::task::JoinError) {
        tracing::warn!(error = %e, "an ITP check failed; it is tried again in a minute");
        if let Some(p) = self
            .tasks
            .remove(&e.id())
            .and_then(|key| self.pairs.get_mut(&key))
        {
            p.in_flight = false;
            p.recheck_at = Some(Instant::now() + MIN_RECHECK);
        }
    }

    fn on_tick(&mut self) {
        let epoch = self
            .shared
            .epoch
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        let now = Instant::now();
        let idle_epochs = (IDLE.as_secs() / TICK.as_secs()) as u32;
        let mut forget = Vec::new();
        for (key, p) in &self.pairs {
            if self.queue.contains(key) {
                continue;
            }
            if p.in_flight || p.configured {
                if p.configured && !p.in_flight && p.recheck_at.is_some_and(|t| now >= t) {
                    self.queue.push_back(*key);
                }
                continue;
            }
            let seen = p.last_seen.load(Ordering::Relaxed);
            if epoch.wrapping_sub(seen) > idle_epochs {
                forget.push(*key);
            } else if p.recheck_at.is_some_and(|t| now >= t)
                && seen.wrapping_sub(p.checked_epoch) < u32::MAX / 2
            {
                // Only pairs hits still name are re-checked; the others wait to be forgotten.
                self.queue.push_back(*key);
            }
        }
        if !forget.is_empty() {
            for k in forget {
                self.pairs.remove(&k);
            }
            if self.pairs.len() < MAX_PAIRS {
                self.shared.full.store(false, Ordering::Relaxed);
                self.warned_full = false;
            }
            self.publish();
        }
    }

    /// Makes the worker's state what readers see, and the gauges match it.
    fn publish(&self) {
        let mut table = Table::default();
        let mut counts: HashMap<Verdict, u64> = HashMap::new();
        for (key, p) in &self.pairs {
            if let Some(r) = &p.report {
                *counts.entry(r.verdict).or_default() += 1;
            }
            table.pairs.insert(
                *key,
                Arc::new(Published {
                    view: PairView {
                        page_host: p.page.clone(),
                        tagging_host: p.tagging.clone(),
                        configured: p.configured,
                        report: p.report.clone(),
                        checked_at_ms: p.checked_at_ms,
                    },
                    last_seen: p.last_seen.clone(),
                }),
            );
        }
        self.shared.table.store(Arc::new(table));
        set_gauges(&counts);
        self.shared.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Resolves what the pair needs and evaluates it. Returns the verdict and how long it holds
/// (zero: judged by name, holds for good).
pub async fn judge(page: &str, tagging: &str, resolver: &TokioResolver) -> (PairReport, Duration) {
    // Path mode and third-party pairs are judged by their names, without a DNS query.
    if page == tagging {
        return (
            evaluate(&HostFacts::by_name(page), Tagging::SameOrigin),
            Duration::ZERO,
        );
    }
    if site_of(page) != site_of(tagging) {
        let t = HostFacts::by_name(tagging);
        return (
            evaluate(&HostFacts::by_name(page), Tagging::Host(&t)),
            Duration::ZERO,
        );
    }
    let (s, t) = tokio::join!(collect(page, resolver), collect(tagging, resolver));
    let ttl = [s.ttl_secs, t.ttl_secs]
        .into_iter()
        .flatten()
        .min()
        .map_or(MIN_RECHECK, |secs| Duration::from_secs(u64::from(secs)));
    let report = evaluate(&s, Tagging::Host(&t));
    (report, ttl.clamp(MIN_RECHECK, MAX_RECHECK))
}

fn log_verdict(r: &PairReport, before: Option<Verdict>, configured: bool) {
    let before = before.map_or("none", Verdict::code);
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                page_host = %r.page_host,
                tagging_host = %r.tagging_host,
                verdict = r.verdict.code(),
                severity = r.severity.code(),
                before,
                startup = configured,
                "ITP verdict: {}",
                r.summary
            )
        };
    }
    if r.severity == Severity::Ok {
        line!(info);
    } else {
        line!(warn);
    }
}

/// `tagrelay_itp_verdict{verdict}`: pairs per verdict, every verdict present.
fn set_gauges(counts: &HashMap<Verdict, u64>) {
    for v in Verdict::ALL {
        let n = counts.get(&v).copied().unwrap_or(0);
        metrics::gauge!("tagrelay_itp_verdict", "verdict" => v.code()).set(n as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A monitor whose resolver is a loopback socket of the test's own that never answers:
    /// these tests only use pairs judged by name, and [`no_dns`] checks nothing was asked.
    fn monitor(settings: ItpSettings) -> (ItpMonitor, std::net::UdpSocket) {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let mut settings = settings;
        settings.resolver = ItpResolver::Server(socket.local_addr().unwrap());
        (ItpMonitor::start(settings).unwrap(), socket)
    }

    fn no_dns(socket: &std::net::UdpSocket) {
        let mut buf = [0u8; 512];
        let got = socket.recv(&mut buf);
        assert!(
            got.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
            "a DNS query was sent: {got:?}"
        );
    }

    /// Waits until `done` holds, on the monitor's change signal.
    async fn until(m: &ItpMonitor, done: impl Fn(&ItpMonitor) -> bool) {
        let mut changes = m.subscribe();
        while !done(m) {
            changes.changed().await.unwrap();
        }
    }

    /// Lets the worker run until it has taken every request sent so far.
    async fn drain(m: &ItpMonitor) {
        while m.shared.requests.capacity() < QUEUE {
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
    }

    #[tokio::test]
    async fn a_pair_is_judged_once_however_many_hits_name_it() {
        let (m, dns) = monitor(ItpSettings::default());
        for _ in 0..100 {
            m.observe("https://www.shop.test", "www.shop.test:443");
        }
        until(&m, |m| {
            m.report_for("www.shop.test", "www.shop.test").is_some()
        })
        .await;
        drain(&m).await;
        let pairs = m.pairs();
        assert_eq!(pairs.len(), 1);
        let r = pairs[0].report.clone().unwrap();
        assert_eq!(r.verdict, Verdict::SameOrigin);
        assert!(!pairs[0].configured);
        assert!(m.summary().is_empty(), "ok pairs are not in the summary");

        m.observe("https://www.shop.test/x", "sgtm.other.test");
        until(&m, |m| {
            m.report_for("www.shop.test", "sgtm.other.test").is_some()
        })
        .await;
        assert_eq!(m.pairs()[0].tagging_host, "sgtm.other.test", "worst first");
        assert_eq!(m.summary().len(), 1);
        m.shutdown();
        no_dns(&dns);
    }

    #[tokio::test]
    async fn unusable_hosts_are_ignored() {
        let (m, dns) = monitor(ItpSettings::default());
        m.observe("null", "sgtm.shop.test");
        m.observe("https://www.shop.test", "");
        drain(&m).await;
        assert!(m.pairs().is_empty());
        no_dns(&dns);
    }

    #[tokio::test(start_paused = true)]
    async fn pairs_are_bounded_and_idle_ones_forgotten() {
        let (m, _dns) = monitor(ItpSettings::default());
        for i in 0..MAX_PAIRS {
            m.observe(&format!("https://p{i}.shop.test"), "sgtm.other.test");
            until(&m, |m| m.pairs().len() == i + 1).await;
        }
        m.observe("https://extra.shop.test", "sgtm.other.test");
        drain(&m).await;
        assert!(m.shared.full.load(Ordering::Relaxed));
        assert_eq!(m.pairs().len(), MAX_PAIRS);

        // One pair keeps being named; the others go idle and are forgotten after an hour.
        let mut elapsed = Duration::ZERO;
        while elapsed <= IDLE + TICK * 2 {
            m.observe("https://p0.shop.test", "sgtm.other.test");
            tokio::time::sleep(TICK).await;
            elapsed += TICK;
        }
        until(&m, |m| m.pairs().len() == 1).await;
        assert_eq!(m.pairs()[0].page_host, "p0.shop.test");
        assert!(!m.shared.full.load(Ordering::Relaxed));
        m.observe("https://extra.shop.test", "sgtm.other.test");
        until(&m, |m| m.pairs().len() == 2).await;
    }

    #[tokio::test(start_paused = true)]
    async fn configured_pairs_are_judged_at_start_and_kept() {
        let (m, dns) = monitor(ItpSettings {
            allowed_origins: vec!["https://www.shop.test".into(), "https://shop.test".into()],
            path_prefix: "/t".into(),
            ..ItpSettings::default()
        });
        until(&m, |m| {
            m.pairs().iter().all(|p| p.report.is_some()) && m.pairs().len() == 2
        })
        .await;
        tokio::time::sleep(IDLE * 2).await;
        let pairs = m.pairs();
        assert_eq!(pairs.len(), 2);
        assert!(pairs.iter().all(|p| p.configured));
        no_dns(&dns);
    }

    #[test]
    fn the_quick_cut_equals_host_of_for_what_browsers_send() {
        for v in [
            "https://www.shop.test",
            "http://www.shop.test:8080",
            "https://www.shop.test/a/b?c=d",
            "sgtm.shop.test",
            "sgtm.shop.test:443",
            "203.0.113.7:8443",
        ] {
            assert_eq!(quick_host(v), host_of(v).unwrap(), "{v}");
        }
    }

    #[tokio::test]
    async fn unusual_spellings_of_a_known_pair_find_it() {
        let (m, _dns) = monitor(ItpSettings::default());
        m.observe("https://www.shop.test", "www.shop.test");
        until(&m, |m| {
            m.report_for("www.shop.test", "www.shop.test").is_some()
        })
        .await;
        for (page, host) in [
            ("HTTPS://WWW.Shop.test", "WWW.SHOP.TEST"),
            ("https://user@www.shop.test:443/x", "www.shop.test."),
        ] {
            m.observe(page, host);
            assert_eq!(
                m.shared.requests.capacity(),
                QUEUE,
                "{page} {host}: sent as new"
            );
        }
    }

    #[test]
    fn host_of_takes_origins_urls_and_host_headers() {
        assert_eq!(host_of("https://www.shop.test").unwrap(), "www.shop.test");
        assert_eq!(
            host_of("https://WWW.Shop.test:8443/a/b?x#y").unwrap(),
            "www.shop.test"
        );
        assert_eq!(
            host_of("https://user:pw@www.shop.test/").unwrap(),
            "www.shop.test"
        );
        assert_eq!(host_of("sgtm.shop.test:443").unwrap(), "sgtm.shop.test");
        assert_eq!(host_of("[2001:db8::1]:443").unwrap(), "2001:db8::1");
        assert_eq!(host_of("203.0.113.7").unwrap(), "203.0.113.7");
        for bad in [
            "null",
            "",
            "https://",
            "localhost",
            "a b.test",
            "x\u{e9}.test",
        ] {
            assert!(host_of(bad).is_none(), "{bad:?}");
        }
    }
}
