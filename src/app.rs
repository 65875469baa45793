//! Application wiring: listeners, the swappable pipeline, the outbox and its dispatchers,
//! signals (SIGTERM/SIGINT stop gracefully, SIGHUP reloads).

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

use crate::admin::throttle::LoginThrottle;
use crate::admin::AdminState;
use crate::clients::script_proxy::ScriptCache;
use crate::config::{self, ConfigError, LoadedConfig, Source};
use crate::doctor::itp::{ItpMonitor, ItpSettings};
use crate::ingress::IngressState;
use crate::lifecycle::Lifecycle;
use crate::outbox::delivery::{spawn_dispatchers, DeliveryRuntime, DispatchSettings};
use crate::outbox::store::embedded::EmbeddedStore;
use crate::outbox::Outbox;
use crate::pipeline::Pipeline;
use crate::stitching::embedded::{EmbeddedStitchStore, Limits};
use crate::stitching::Stitching;
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
        }
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
            stitching: Arc::default(),
        }
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
    /// An invalid configuration leaves the current one serving.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let path = match &*self.source {
            Source::File(p) => Some(p.as_path()),
            Source::Embedded => None,
        };
        let loaded = config::load(path)?;
        let next =
            Pipeline::build(&loaded.config).map_err(|p| ConfigError::new(&loaded.source, p))?;
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
        if !restart.is_empty() {
            tracing::warn!(
                keys = restart.join(", "),
                "these settings changed in the config; they take effect after a restart"
            );
        }
        self.pipeline.store(Arc::new(next));
        tracing::info!(source = %loaded.source, "configuration reloaded");
        Ok(())
    }
}

/// The public tracking router of a state (tests can drive it with `oneshot`).
pub fn app(state: AppState) -> Router {
    crate::ingress::router(IngressState::from_ref(&state))
}

pub struct Application {
    state: AppState,
    store: Arc<EmbeddedStore>,
    stitch_store: Arc<EmbeddedStitchStore>,
    public: TcpListener,
    admin: TcpListener,
    public_addr: SocketAddr,
    admin_addr: SocketAddr,
}

impl Application {
    /// Validates the config, opens the outbox and binds both listeners (port 0 works).
    pub async fn build(loaded: LoadedConfig) -> anyhow::Result<Self> {
        let pipeline =
            Pipeline::build(&loaded.config).map_err(|p| ConfigError::new(&loaded.source, p))?;
        crate::telemetry::metrics::metrics_handle();
        metrics::gauge!("tagrelay_build_info", "version" => crate::telemetry::build_info::VERSION, "commit" => crate::telemetry::build_info::COMMIT).set(1.0);
        let store = EmbeddedStore::open(&loaded.config.outbox)
            .await
            .with_context(|| format!("opening the outbox at {}", loaded.config.outbox.path))?;
        let stitch_store = open_stitching(&loaded.config)?;
        let server = &loaded.config.server;
        let public = TcpListener::bind(server.listen)
            .await
            .with_context(|| format!("binding server.listen {}", server.listen))?;
        let admin = TcpListener::bind(server.admin_listen)
            .await
            .with_context(|| format!("binding server.admin_listen {}", server.admin_listen))?;
        let public_addr = public.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let stitching = &loaded.config.stitching;
        let state = AppState::new(pipeline, store.clone(), loaded.source);
        let _ = state.stitching.set(Stitching {
            sessions: stitch_store.clone(),
            ledger: stitch_store.clone(),
            enabled: stitching.enabled,
            dedup_window_ms: stitching.dedup_window_ms(),
        });
        tracing::info!(%public_addr, %admin_addr, "tagrelay listening");
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

    pub fn public_addr(&self) -> SocketAddr {
        self.public_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// The embedded store, for tests that inject its faults.
    #[cfg(test)]
    pub(crate) fn store(&self) -> &Arc<EmbeddedStore> {
        &self.store
    }

    /// Serves until SIGTERM/SIGINT; SIGHUP reloads the configuration.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let stop = shutdown_signal();
        tokio::spawn(reload_on_sighup(self.state.clone()));
        self.run_until(stop).await
    }

    /// Serves until `stop` resolves, then stops accepting, lets in-flight requests finish
    /// (bounded by `server.shutdown_timeout_ms`), stops the dispatchers and closes the outbox.
    pub async fn run_until(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let lifecycle = self.state.lifecycle.clone();
        let deadline =
            Duration::from_millis(self.state.pipeline().config.server.shutdown_timeout_ms);
        let outbox_cfg = self.state.pipeline().config.outbox.clone();
        let delivery =
            DeliveryRuntime::start(&outbox_cfg).context("starting the delivery threads")?;
        let dispatchers = {
            let _on_delivery_threads = delivery.handle().map(|h| h.enter());
            spawn_dispatchers(
                self.store.clone(),
                self.state.pipeline_cell(),
                DispatchSettings::from_config(&outbox_cfg),
                self.state.traces().clone(),
            )
            .context("building the HTTP client for dispatchers")?
        };
        crate::telemetry::metrics::spawn_metrics_upkeep();

        // The admin listener closes after the public one has drained, so that while in-flight
        // hits finish, probes get `/readyz` 503 rather than a refused connection.
        let (admin_stop, mut admin_rx) = watch::channel(false);
        let public = serve(self.public, app(self.state.clone()), lifecycle.stopped());
        let public = async move {
            let ended = public.await;
            let _ = admin_stop.send(true);
            ended
        };
        let admin = serve(
            self.admin,
            crate::admin::router(AdminState::from_ref(&self.state)),
            async move {
                let _ = admin_rx.wait_for(|v| *v).await;
            },
        );
        let mut servers = tokio::spawn(async move {
            let (a, b) = tokio::join!(public, admin);
            a.and(b)
        });

        stop.await;
        // Not ready before the line is logged: whoever reads the log sees /readyz 503.
        lifecycle.begin_stop();
        tracing::info!("shutdown requested: no new connections, finishing in-flight requests");
        // One deadline for everything: requests in flight, then vendor sends in flight.
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
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        if let Some(itp) = self.state.itp() {
            itp.shutdown();
        }
        dispatchers.shutdown(left).await;
        delivery.shutdown();
        self.stitch_store.close().await;
        self.store.close().await;
        tracing::info!("tagrelay stopped");
        Ok(())
    }
}

/// Opens the stitching store of `[stitching]` (its own database file, by default beside the
/// outbox's).
fn open_stitching(config: &crate::config::Config) -> anyhow::Result<Arc<EmbeddedStitchStore>> {
    let s = &config.stitching;
    let file = s.file(&config.outbox.path);
    let limits = Limits {
        ttl_ms: s.ttl_ms(),
        max_records: s.max_records,
        dedup_window_ms: s.dedup_window_ms(),
    };
    EmbeddedStitchStore::open(&file, limits)
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

/// Resolves on SIGTERM or Ctrl-C. The handler is installed when this is called, not when the
/// future is first polled: a SIGTERM that lands once the listeners serve must never meet the
/// default action (exit without draining).
fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    async move {
        match term {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; stop with Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Reloads the configuration on each SIGHUP. The handler is installed at the call (see
/// [`shutdown_signal`]; SIGHUP's default action also ends the process).
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
