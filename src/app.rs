//! Application wiring: listeners, the swappable pipeline, the outbox and its dispatchers,
//! signals (SIGTERM/SIGINT stop gracefully, SIGHUP reloads).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::clients::script_proxy::ScriptCache;
use crate::config::{self, ConfigError, LoadedConfig, Source};
use crate::outbox::delivery::{spawn_dispatchers, DeliveryRuntime, DispatchSettings};
use crate::outbox::{DeliveryStore, Outbox};
use crate::pipeline::Pipeline;
use crate::trace::Traces;

/// State shared by every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    pipeline: Arc<ArcSwap<Pipeline>>,
    traces: Arc<Traces>,
    outbox: Arc<dyn Outbox>,
    /// Outlives pipeline swaps so a reload keeps proxied scripts warm.
    script_cache: Arc<ScriptCache>,
    source: Source,
    shutting_down: AtomicBool,
    /// Flips to true when shutdown starts; long-lived responses (SSE) end on it.
    stop: watch::Sender<bool>,
    admin_logins: crate::admin::throttle::LoginThrottle,
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
            inner: Arc::new(Inner {
                traces,
                pipeline: Arc::new(ArcSwap::from_pointee(pipeline)),
                outbox,
                script_cache: Arc::new(ScriptCache::default()),
                source,
                shutting_down: AtomicBool::new(false),
                stop: watch::channel(false).0,
                admin_logins: Default::default(),
            }),
        }
    }

    /// The pipeline in force now. In-flight requests keep the one they loaded.
    pub fn pipeline(&self) -> Arc<Pipeline> {
        self.inner.pipeline.load_full()
    }

    pub fn pipeline_cell(&self) -> Arc<ArcSwap<Pipeline>> {
        self.inner.pipeline.clone()
    }

    /// Failed admin authentications per client address.
    pub fn admin_logins(&self) -> &crate::admin::throttle::LoginThrottle {
        &self.inner.admin_logins
    }

    pub fn traces(&self) -> &Arc<Traces> {
        &self.inner.traces
    }

    pub fn outbox(&self) -> &Arc<dyn Outbox> {
        &self.inner.outbox
    }

    pub fn script_cache(&self) -> &Arc<ScriptCache> {
        &self.inner.script_cache
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Relaxed)
    }

    /// Resolves when shutdown starts.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.stop.subscribe();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    }

    pub fn metrics(&self) -> PrometheusHandle {
        crate::admin::metrics_handle()
    }

    /// Re-reads and re-validates the configuration and swaps the pipeline atomically.
    /// An invalid configuration leaves the current one serving.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let path = match &self.inner.source {
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
        if old.server.request_timeout_ms != new.server.request_timeout_ms {
            restart.push("server.request_timeout_ms");
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
        self.inner.pipeline.store(Arc::new(next));
        tracing::info!(source = %loaded.source, "configuration reloaded");
        Ok(())
    }
}

/// The public tracking router for a state (tests drive it with `oneshot`).
pub fn app(state: AppState) -> Router {
    crate::ingress::router(state)
}

pub struct Application {
    state: AppState,
    store: Arc<dyn DeliveryStore>,
    /// `None` with `[outbox] role = "deliver"`: such a process takes no hits.
    public: Option<TcpListener>,
    admin: TcpListener,
    public_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
}

impl Application {
    /// Validates the config, opens the outbox and binds both listeners (port 0 works).
    pub async fn build(loaded: LoadedConfig) -> anyhow::Result<Self> {
        let pipeline =
            Pipeline::build(&loaded.config).map_err(|p| ConfigError::new(&loaded.source, p))?;
        crate::admin::metrics_handle();
        metrics::gauge!("tagrelay_build_info", "version" => crate::build_info::VERSION, "commit" => crate::build_info::COMMIT).set(1.0);
        let store = crate::outbox::store::open(&loaded.config.outbox)
            .await
            .map_err(anyhow::Error::msg)?;
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
        let state = AppState::new(pipeline, store.clone() as Arc<dyn Outbox>, loaded.source);
        // With a shared store, the debug page of any replica shows the hits of all.
        store.share_traces(state.traces());
        match public_addr {
            Some(public_addr) => tracing::info!(%public_addr, %admin_addr, "tagrelay listening"),
            None => {
                tracing::info!(%admin_addr, role = "deliver", "tagrelay listening (admin only: this process delivers and takes no hits)")
            }
        }
        Ok(Application {
            state,
            store,
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

    /// Serves until SIGTERM/SIGINT; SIGHUP reloads the configuration.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let state = self.state.clone();
        tokio::spawn(async move { reload_on_sighup(state).await });
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `stop` resolves, then stops accepting, lets in-flight requests finish
    /// (bounded by `server.shutdown_timeout_ms`), stops the dispatchers and closes the outbox.
    pub async fn run_until(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let rx = self.state.inner.stop.subscribe();
        let deadline =
            Duration::from_millis(self.state.pipeline().config.server.shutdown_timeout_ms);
        let outbox_cfg = self.state.pipeline().config.outbox.clone();
        // `role = "ingest"`: other processes sharing the store deliver.
        let delivery = match outbox_cfg.role.delivers() {
            true => Some(DeliveryRuntime::start(&outbox_cfg).map_err(anyhow::Error::msg)?),
            false => None,
        };
        let dispatchers = match &delivery {
            Some(delivery) => {
                let _on_delivery_threads = delivery.handle().map(|h| h.enter());
                Some(
                    spawn_dispatchers(
                        self.store.clone(),
                        self.state.pipeline_cell(),
                        DispatchSettings::from_config(&outbox_cfg),
                        self.state.traces().clone(),
                    )
                    .map_err(anyhow::Error::msg)?,
                )
            }
            None => None,
        };
        crate::admin::spawn_metrics_upkeep();

        let public = self
            .public
            .map(|p| serve(p, app(self.state.clone()), rx.clone()));
        let admin = serve(
            self.admin,
            crate::admin::router(self.state.clone()),
            rx.clone(),
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

        stop.await;
        tracing::info!("shutdown requested: no new connections, finishing in-flight requests");
        self.state
            .inner
            .shutting_down
            .store(true, Ordering::Relaxed);
        let _ = self.state.inner.stop.send(true);
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
        if let Some(d) = dispatchers {
            d.shutdown(left).await;
        }
        if let Some(d) = delivery {
            d.shutdown();
        }
        self.store.close().await;
        tracing::info!("tagrelay stopped");
        Ok(())
    }
}

async fn serve(
    listener: TcpListener,
    router: Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = stop.wait_for(|v| *v).await;
    })
    .await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

async fn reload_on_sighup(state: AppState) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload by restarting");
        return;
    };
    while hup.recv().await.is_some() {
        if let Err(e) = state.reload() {
            tracing::error!(problems = ?e.problems, "new configuration rejected; the previous one keeps serving");
        }
    }
}
