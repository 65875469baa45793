//! Application wiring: listeners, the swappable pipeline, the outbox and its dispatchers,
//! traces, and the life of the process: SIGTERM/SIGINT stop gracefully (after
//! `server.shutdown_delay_ms`; a second one skips the delay), SIGHUP, `POST /admin/reload` or
//! a changed config file reload, `POST /admin/drain` delivers what the outbox holds and stops.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use axum::extract::FromRef;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::control::Reloader;
use crate::admin::throttle::LoginThrottle;
use crate::admin::AdminState;
use crate::clients::script_proxy::ScriptCache;
use crate::config::{self, ConfigError, LoadedConfig, Source};
use crate::doctor::itp::{ItpMonitor, ItpSettings};
use crate::ingress::IngressState;
use crate::lifecycle::Lifecycle;
use crate::outbox::delivery::{spawn_dispatchers_with, DeliveryRuntime, DispatchSettings};
use crate::outbox::{DeliveryStore, Outbox};
use crate::pipeline::Pipeline;
use crate::stitching::embedded::EmbeddedStitchStore;
use crate::stitching::Stitching;
use crate::telemetry::otel::Otel;
use crate::trace::Traces;

/// Everything the listeners, the dispatchers and reload share. Each listener takes its own
/// part ([`IngressState`], [`AdminState`]). Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pipeline: Arc<ArcSwap<Pipeline>>,
    traces: Arc<Traces>,
    outbox: Arc<dyn Outbox>,
    /// Outlives pipeline swaps so a reload keeps proxied scripts warm.
    script_cache: Arc<ScriptCache>,
    lifecycle: Arc<Lifecycle>,
    admin_logins: Arc<LoginThrottle>,
    source: Arc<Source>,
    /// The running ITP check, when `[server] itp_check` is on and it started.
    itp: Arc<OnceLock<ItpMonitor>>,
    /// OpenTelemetry traces, when `[telemetry] otlp_endpoint` is set.
    otel: Option<Arc<Otel>>,
    /// The stitching store, once [`Application::build`] opened it.
    stitching: Arc<OnceLock<Stitching>>,
}

impl FromRef<AppState> for IngressState {
    fn from_ref(s: &AppState) -> Self {
        IngressState {
            pipeline: s.pipeline.clone(),
            traces: s.traces.clone(),
            outbox: s.outbox.clone(),
            script_cache: s.script_cache.clone(),
            lifecycle: s.lifecycle.clone(),
            itp: s.itp.clone(),
            otel: s.otel.clone(),
            stitching: s.stitching.clone(),
        }
    }
}

impl FromRef<AppState> for AdminState {
    fn from_ref(s: &AppState) -> Self {
        AdminState {
            pipeline: s.pipeline.clone(),
            traces: s.traces.clone(),
            outbox: s.outbox.clone(),
            lifecycle: s.lifecycle.clone(),
            logins: s.admin_logins.clone(),
            itp: s.itp.clone(),
            reloader: Arc::new(s.clone()),
        }
    }
}

impl Reloader for AppState {
    fn reload(&self) -> Result<String, ConfigError> {
        AppState::reload(self)
    }
}

impl AppState {
    pub fn new(pipeline: Pipeline, outbox: Arc<dyn Outbox>, source: Source) -> Self {
        let admin = &pipeline.config.admin;
        let traces = Traces::new(
            admin.trace_capacity,
            admin.trace_max_bytes,
            admin.trace_sampling,
        );
        AppState {
            traces,
            pipeline: Arc::new(ArcSwap::from_pointee(pipeline)),
            outbox,
            script_cache: Arc::new(ScriptCache::default()),
            lifecycle: Arc::default(),
            admin_logins: Arc::default(),
            source: Arc::new(source),
            itp: Arc::default(),
            otel: None,
            stitching: Arc::default(),
        }
    }

    /// Serving, draining or stopping; stop and drain requests go here.
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    /// The pipeline in force now. In-flight requests keep the one they loaded.
    pub fn pipeline(&self) -> Arc<Pipeline> {
        self.pipeline.load_full()
    }

    pub fn pipeline_cell(&self) -> Arc<ArcSwap<Pipeline>> {
        self.pipeline.clone()
    }

    pub fn traces(&self) -> &Arc<Traces> {
        &self.traces
    }

    /// The running ITP check (`[server] itp_check = true`), for the hit path's
    /// `observe(page, tagging_host)` and the debug view.
    pub fn itp(&self) -> Option<&ItpMonitor> {
        self.itp.get()
    }

    pub fn outbox(&self) -> &Arc<dyn Outbox> {
        &self.outbox
    }

    /// Re-reads and re-validates the configuration and swaps the pipeline atomically.
    /// An invalid configuration leaves the current one serving. Returns what is in force
    /// now, in a line.
    pub fn reload(&self) -> Result<String, ConfigError> {
        let path = match &*self.source {
            Source::File(p) => Some(p.as_path()),
            Source::Embedded => None,
        };
        let loaded = config::load(path)?;
        let next = Pipeline::build(&loaded.config).map_err(|p| loaded.invalid(p))?;
        let current = self.pipeline();
        let (old, new) = (&current.config, &next.config);
        if old.server.listen != new.server.listen
            || old.server.admin_listen != new.server.admin_listen
        {
            tracing::warn!(
                "listener addresses changed in the config; they take effect after a restart"
            );
        }
        let mut restart = Vec::new();
        if old.outbox != new.outbox {
            restart.push("[outbox]");
        }
        if old.stitching != new.stitching {
            restart.push("[stitching]");
        }
        if old.server.request_timeout_ms != new.server.request_timeout_ms {
            restart.push("server.request_timeout_ms");
        }
        if (old.server.itp_check, old.server.itp_resolver)
            != (new.server.itp_check, new.server.itp_resolver)
        {
            restart.push("server.itp_*");
        }
        let (oa, na) = (&old.admin, &new.admin);
        if (oa.trace_capacity, oa.trace_max_bytes, oa.trace_sampling)
            != (na.trace_capacity, na.trace_max_bytes, na.trace_sampling)
        {
            restart.push("admin.trace_*");
        }
        if old.telemetry != new.telemetry {
            restart.push("[telemetry]");
        }
        if old.server.config_watch_interval_ms != new.server.config_watch_interval_ms {
            restart.push("server.config_watch_interval_ms");
        }
        if !restart.is_empty() {
            tracing::warn!(
                keys = restart.join(", "),
                "these settings changed in the config; they take effect after a restart"
            );
        }
        crate::ingress::register_metrics(&next);
        let (clients, tags) = in_force(&next);
        self.pipeline.store(Arc::new(next));
        tracing::info!(
            source = %loaded.source,
            env_overrides = %env_names(&loaded.config),
            clients = %clients,
            tags = %tags,
            "configuration reloaded"
        );
        Ok(format!(
            "{} (clients: {clients}; tags: {tags})",
            loaded.source
        ))
    }
}

/// The public tracking router of a state (tests can drive it with `oneshot`).
pub fn app(state: AppState) -> Router {
    crate::ingress::router(IngressState::from_ref(&state))
}

pub struct Application {
    state: AppState,
    store: Arc<dyn DeliveryStore>,
    /// The embedded stitching store, to close; `None` when the shared store keeps sessions.
    stitch_store: Option<Arc<EmbeddedStitchStore>>,
    /// `None` with `[outbox] role = "deliver"`: such a process takes no hits.
    public: Option<TcpListener>,
    admin: TcpListener,
    public_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
}

impl Application {
    /// Validates the config, opens the outbox, starts the trace exporter and binds both
    /// listeners (port 0 works).
    pub async fn build(loaded: LoadedConfig) -> anyhow::Result<Self> {
        let pipeline = Pipeline::build(&loaded.config).map_err(|p| loaded.invalid(p))?;
        // Before the store: it registers its counters as it opens.
        crate::telemetry::metrics::metrics_handle();
        let store = crate::outbox::store::open(&loaded.config.outbox).await?;
        Self::with_store(loaded, pipeline, store).await
    }

    /// [`build`](Self::build) with a store already open (tests inject its faults).
    pub(crate) async fn with_store(
        loaded: LoadedConfig,
        pipeline: Pipeline,
        store: Arc<dyn DeliveryStore>,
    ) -> anyhow::Result<Self> {
        crate::telemetry::metrics::metrics_handle();
        metrics::gauge!("tagrelay_build_info", "version" => crate::telemetry::build_info::VERSION, "commit" => crate::telemetry::build_info::COMMIT).set(1.0);
        let (stitch_stores, stitch_store) =
            match store.shared_stitching(loaded.config.stitching.limits()) {
                Some(shared) => (shared, None),
                None => {
                    let own = open_stitching(&loaded.config)?;
                    let stores = crate::stitching::Stores {
                        sessions: own.clone(),
                        ledger: own.clone(),
                    };
                    (stores, Some(own))
                }
            };
        let server = &loaded.config.server;
        let public = if loaded.config.outbox.role.takes_hits() {
            Some(
                TcpListener::bind(server.listen)
                    .await
                    .with_context(|| format!("binding server.listen {}", server.listen))?,
            )
        } else {
            None
        };
        let admin = TcpListener::bind(server.admin_listen)
            .await
            .with_context(|| format!("binding server.admin_listen {}", server.admin_listen))?;
        let public_addr = public.as_ref().map(|p| p.local_addr()).transpose()?;
        let admin_addr = admin.local_addr()?;
        let otel = Otel::start(&loaded.config.telemetry).map_err(anyhow::Error::msg)?;
        crate::ingress::register_metrics(&pipeline);
        let (clients, tags) = in_force(&pipeline);
        // What an operator checks first when something behaves unexpectedly: which file, which
        // variables over it, where the outbox is, what runs.
        tracing::info!(
            config = %loaded.source,
            env_overrides = %env_names(&loaded.config),
            outbox = %outbox_place(&loaded.config.outbox),
            clients = %clients,
            tags = %tags,
            traces = %traces_to(&loaded.config.telemetry.otlp_endpoint),
            "configuration in force"
        );
        let mut state = AppState::new(pipeline, store.clone() as Arc<dyn Outbox>, loaded.source);
        state.otel = otel;
        // With a shared store, the debug page of any replica shows the hits of all.
        store.share_traces(state.traces());
        let stitching = &loaded.config.stitching;
        let _ = state.stitching.set(Stitching {
            sessions: stitch_stores.sessions,
            ledger: stitch_stores.ledger,
            enabled: stitching.enabled,
            dedup_window_ms: stitching.dedup_window_ms(),
        });
        start_itp_check(&state);
        Ok(Application {
            state,
            store,
            stitch_store,
            public,
            admin,
            public_addr,
            admin_addr,
        })
    }

    /// The public listener's address; `None` for a process that only delivers.
    pub fn public_addr(&self) -> Option<SocketAddr> {
        self.public_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Serves until SIGTERM/SIGINT (or the end of a drain); SIGHUP reloads the configuration.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        tokio::spawn(forward_stop_signals(self.state.lifecycle.clone()));
        tokio::spawn(reload_on_sighup(self.state.clone()));
        self.run_until(std::future::pending()).await
    }

    /// Serves until `stop` resolves or a stop is requested ([`Lifecycle::request_stop`], the
    /// end of a drain). Then: readiness fails, both listeners keep serving for
    /// `server.shutdown_delay_ms` (unless a second stop request comes, or a drain already
    /// took the instance out of rotation), the public listener stops accepting, in-flight
    /// requests and vendor sends get `server.shutdown_timeout_ms`, the outbox closes and the
    /// queued trace spans are sent.
    pub async fn run_until(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let lifecycle = self.state.lifecycle.clone();
        let outbox_cfg = self.state.pipeline().config.outbox.clone();
        // `role = "ingest"`: other processes sharing the store deliver.
        let delivery = match outbox_cfg.role.delivers() {
            true => {
                Some(DeliveryRuntime::start(&outbox_cfg).context("starting the delivery threads")?)
            }
            false => None,
        };
        let dispatchers = match &delivery {
            Some(delivery) => {
                let _on_delivery_threads = delivery.handle().map(|h| h.enter());
                Some(
                    spawn_dispatchers_with(
                        self.store.clone(),
                        self.state.pipeline_cell(),
                        DispatchSettings::from_config(&outbox_cfg),
                        self.state.traces().clone(),
                        self.state.otel.clone(),
                    )
                    .context("building the HTTP client for dispatchers")?,
                )
            }
            None => None,
        };
        crate::telemetry::metrics::spawn_metrics_upkeep();

        // The public listener closes when told, after the shutdown delay; the admin listener
        // after the public one has drained, so that while in-flight hits finish, probes get
        // `/readyz` 503 rather than a refused connection. A process without a public listener
        // (`role = "deliver"`) closes the admin listener when told instead.
        let (close_public, mut close_rx) = watch::channel(false);
        let (admin_stop, mut admin_rx) = watch::channel(false);
        let public = match self.public {
            Some(listener) => {
                let public = serve(listener, app(self.state.clone()), async move {
                    let _ = close_rx.wait_for(|v| *v).await;
                });
                Some(async move {
                    let ended = public.await;
                    let _ = admin_stop.send(true);
                    ended
                })
            }
            None => {
                tokio::spawn(async move {
                    let _ = close_rx.wait_for(|v| *v).await;
                    let _ = admin_stop.send(true);
                });
                None
            }
        };
        let admin = serve(
            self.admin,
            crate::admin::router(AdminState::from_ref(&self.state)),
            async move {
                let _ = admin_rx.wait_for(|v| *v).await;
            },
        );
        let mut servers = tokio::spawn(async move {
            match public {
                Some(public) => {
                    let (a, b) = tokio::join!(public, admin);
                    a.and(b)
                }
                None => admin.await,
            }
        });
        // Said once serving (and, from `run_until_stopped`, once stop signals are handled).
        match self.public_addr {
            Some(public_addr) => {
                tracing::info!(%public_addr, admin_addr = %self.admin_addr, "tagrelay listening")
            }
            None => {
                tracing::info!(admin_addr = %self.admin_addr, role = "deliver", "tagrelay listening (admin only: this process delivers and takes no hits)")
            }
        }
        let mut helpers = vec![tokio::spawn(drain_when_asked(
            self.state.clone(),
            self.store.clone(),
        ))];
        helpers.extend(watch_config_file(&self.state).map(tokio::spawn));

        let requested = lifecycle.stop_requested();
        tokio::select! {
            _ = stop => {}
            _ = requested => {}
        }
        let server = self.state.pipeline().config.server.clone();
        let drained = lifecycle.is_draining();
        lifecycle.begin_stop();
        let delay = Duration::from_millis(server.shutdown_delay_ms);
        if !delay.is_zero() && !drained {
            tracing::info!(
                delay_ms = server.shutdown_delay_ms,
                "shutdown requested: not ready; still serving for server.shutdown_delay_ms while load balancers stop sending hits (a second stop signal skips the wait)"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = lifecycle.hurried() => {
                    tracing::info!("a second stop request: not waiting any longer");
                }
            }
            tracing::info!("no new connections, finishing in-flight requests");
        } else {
            tracing::info!("shutdown requested: no new connections, finishing in-flight requests");
        }
        let _ = close_public.send(true);
        // One deadline for everything: requests in flight, then vendor sends in flight.
        let deadline = Duration::from_millis(server.shutdown_timeout_ms);
        let end = tokio::time::Instant::now() + deadline;
        match tokio::time::timeout_at(end, &mut servers).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "listener ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "server task failed"),
            Err(_) => {
                servers.abort();
                tracing::warn!(
                    ?deadline,
                    "in-flight requests did not finish before the deadline"
                );
            }
        }
        for h in helpers {
            h.abort();
        }
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        if let Some(itp) = self.state.itp() {
            itp.shutdown();
        }
        if let Some(d) = dispatchers {
            d.shutdown(left).await;
        }
        if let Some(d) = delivery {
            d.shutdown();
        }
        if let Some(s) = &self.stitch_store {
            s.close().await;
        }
        self.store.close().await;
        if let Some(otel) = self.state.otel.clone() {
            // Sends what is queued; blocking, so off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || otel.shutdown()).await;
        }
        tracing::info!("tagrelay stopped");
        Ok(())
    }
}

/// The clients and tags of a pipeline, for logs: `ga4, data` and `ga4 (ga4), meta (meta_capi)`.
fn in_force(p: &Pipeline) -> (String, String) {
    let mut clients: Vec<&str> = p.clients.iter().map(|c| c.kind()).collect();
    clients.extend(p.script_proxies.iter().map(|_| "script_proxy"));
    let tags: Vec<String> = p
        .tags
        .iter()
        .map(|t| format!("{} ({})", t.name, t.tag.kind()))
        .collect();
    let none = |s: String| if s.is_empty() { "none".to_owned() } else { s };
    (none(clients.join(", ")), none(tags.join(", ")))
}

/// The `TAGRELAY__…` variables that set keys (names only: their values may be secrets).
fn env_names(c: &config::Config) -> String {
    if c.env_overrides.is_empty() {
        return "none".into();
    }
    c.env_overrides
        .iter()
        .map(|o| o.var.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where the outbox is, for the log: the directory, or the Redis engine (never its URL, which
/// may carry a password).
fn outbox_place(o: &crate::outbox::config::OutboxConfig) -> String {
    match o.backend {
        crate::outbox::config::Backend::Embedded => o.path.clone(),
        crate::outbox::config::Backend::Redis => {
            format!("redis (key prefix {})", o.redis.key_prefix)
        }
    }
}

/// Where traces go, for the log: the collector's address only (a URL may carry credentials).
fn traces_to(endpoint: &str) -> String {
    if endpoint.is_empty() {
        return "off".into();
    }
    endpoint
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| {
            u.authority()
                .map(|a| a.as_str().rsplit('@').next().unwrap_or("").to_owned())
        })
        .unwrap_or_else(|| "?".into())
}

/// Once a drain begins: waits until the outbox owes nothing to a configured tag, or the
/// drain's time limit passes, then asks for the stop.
async fn drain_when_asked(state: AppState, store: Arc<dyn DeliveryStore>) {
    let limit = state.lifecycle.drain_started().await;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let pipeline = state.pipeline();
        let owed = match store.backlog(crate::clock::now_ms()).await {
            Ok(backlog) => Some(
                backlog
                    .iter()
                    .filter(|b| pipeline.tag(&b.tag).is_some())
                    .map(|b| b.pending)
                    .sum::<u64>(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "drain: cannot read the outbox's backlog; trying again");
                None
            }
        };
        if owed == Some(0) {
            tracing::info!("drain: the outbox owes nothing to any tag; stopping");
            break;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            tracing::warn!(
                pending = owed,
                "drain: time limit reached; what is still pending stays in the outbox and is delivered after the next start"
            );
            break;
        }
        tokio::time::sleep((deadline - now).min(Duration::from_millis(250))).await;
    }
    state.lifecycle.request_stop();
}

/// With `server.config_watch_interval_ms`, a task that reloads when the config file's
/// content changes (a ConfigMap's mounted file is replaced in place, and a distroless pod has
/// no shell to send SIGHUP from).
fn watch_config_file(state: &AppState) -> Option<impl Future<Output = ()> + Send + 'static> {
    let every = state.pipeline().config.server.config_watch_interval_ms;
    let Source::File(path) = &*state.source else {
        if every > 0 {
            tracing::warn!("server.config_watch_interval_ms: there is no config file to watch (the embedded default is in use)");
        }
        return None;
    };
    if every == 0 {
        return None;
    }
    let (state, path) = (state.clone(), path.clone());
    // Read now, as serving begins, not when the task first runs: a change in between counts.
    let mut last = std::fs::read(&path).ok();
    Some(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            // A file missing for a moment (being replaced) is no change.
            let Ok(now) = tokio::fs::read(&path).await else {
                continue;
            };
            if last.as_ref() == Some(&now) {
                continue;
            }
            last = Some(now);
            tracing::info!(file = %path.display(), "the config file changed; reloading");
            let s = state.clone();
            match tokio::task::spawn_blocking(move || s.reload()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(problems = ?e.problems, "new configuration rejected; the previous one keeps serving")
                }
                Err(e) => tracing::error!(error = %e, "reload failed"),
            }
        }
    })
}

/// Opens the stitching store of `[stitching]` (its own database file, by default beside the
/// outbox's).
fn open_stitching(config: &crate::config::Config) -> anyhow::Result<Arc<EmbeddedStitchStore>> {
    let s = &config.stitching;
    let file = s.file(&config.outbox.path);
    EmbeddedStitchStore::open(&file, s.limits())
        .map(Arc::new)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("opening the stitching store at {}", file.display()))
}

/// Starts the running ITP check when `[server] itp_check` is on. A check that cannot start
/// (no resolver configuration) is reported and the server runs without it: a diagnostic
/// never keeps hits from being served.
fn start_itp_check(state: &AppState) {
    let config = state.pipeline().config.clone();
    let server = &config.server;
    if !server.itp_check {
        return;
    }
    let settings = ItpSettings {
        resolver: server.itp_resolver,
        allowed_origins: server.allowed_origins.clone(),
        path_prefix: server.path_prefix.clone(),
    };
    match ItpMonitor::start(settings) {
        Ok(m) => {
            tracing::info!(resolver = %server.itp_resolver, "ITP check started");
            let _ = state.itp.set(m);
        }
        Err(e) => tracing::warn!(
            error = %e,
            "server.itp_check: the ITP check cannot start; serving without it"
        ),
    }
}

async fn serve(
    listener: TcpListener,
    router: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop)
    .await
}

/// Turns each SIGTERM or Ctrl-C into a stop request (the second skips the shutdown delay).
/// The handler is installed when this is called, not when the future is first polled: a
/// SIGTERM that lands once the listeners serve must never meet the default action (exit
/// without draining).
fn forward_stop_signals(lifecycle: Arc<Lifecycle>) -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    async move {
        match term {
            Ok(mut term) => loop {
                tokio::select! {
                    r = term.recv() => if r.is_none() { return },
                    r = tokio::signal::ctrl_c() => if r.is_err() { return },
                }
                lifecycle.request_stop();
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; stop with Ctrl-C");
                while tokio::signal::ctrl_c().await.is_ok() {
                    lifecycle.request_stop();
                }
            }
        }
    }
}

/// Reloads the configuration on each SIGHUP. The handler is installed at the call (see
/// [`forward_stop_signals`]; SIGHUP's default action also ends the process).
fn reload_on_sighup(state: AppState) -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let hup = signal(SignalKind::hangup());
    async move {
        let Ok(mut hup) = hup else {
            tracing::warn!("cannot listen for SIGHUP; reload by restarting");
            return;
        };
        while hup.recv().await.is_some() {
            if let Err(e) = state.reload() {
                tracing::error!(problems = ?e.problems, "new configuration rejected; the previous one keeps serving");
            }
        }
    }
}

#[cfg(test)]
mod tests;
