//! `sluice serve`: binds both listeners, starts the LISTEN task and the maintenance loop, and
//! shuts all of them down together.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::api::{self, listener, AppState};
use crate::config::ServeConfig;
use crate::service::maintenance;
use crate::wake::{self, Wake};
use crate::{store, Error, Result};

/// A running scheduler.
pub struct Server {
    /// Where the public API listens (the real port when 0 was asked for).
    pub api_addr: SocketAddr,
    /// Where the internal runner API listens.
    pub internal_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Server {
    /// Binds, migrates (when configured) and starts serving in the background.
    pub async fn start(config: ServeConfig) -> Result<Server> {
        let options = store::connect_options(config.database_url.expose())?;
        let pool = store::pool(
            options,
            &store::PoolConfig {
                max_connections: config.max_connections,
                ..Default::default()
            },
        );
        if config.migrate {
            store::migrate(&pool).await?;
        }
        let public = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::invalid("SLUICE_LISTEN", format!("{}: {e}", config.listen)))?;
        let internal = tokio::net::TcpListener::bind(config.internal_listen)
            .await
            .map_err(|e| {
                Error::invalid(
                    "SLUICE_INTERNAL_LISTEN",
                    format!("{}: {e}", config.internal_listen),
                )
            })?;
        let api_addr = public
            .local_addr()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let internal_addr = internal
            .local_addr()
            .map_err(|e| Error::Internal(e.to_string()))?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let wake = Wake::new();
        let interval = config.timings.maintenance_interval;
        let lease = config.timings.lease;
        let capped_queues = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let metrics = Arc::new(crate::service::metrics::Metrics::new());
        let events = crate::service::events::Hub::new(
            pool.clone(),
            config.events,
            metrics.clone(),
            shutdown_rx.clone(),
        );
        let state = AppState {
            pool: pool.clone(),
            wake: wake.clone(),
            events: events.clone(),
            metrics: metrics.clone(),
            config: Arc::new(config),
            shutdown: shutdown_rx.clone(),
            capped_queues: capped_queues.clone(),
            runner_tokens: Arc::default(),
        };
        let mut tasks = JoinSet::new();
        tasks.spawn(events.clone().watch_ends());
        tasks.spawn(wake::listen(
            pool.clone(),
            wake.clone(),
            events,
            shutdown_rx.clone(),
        ));
        tasks.spawn(maintenance::run(
            pool.clone(),
            wake,
            maintenance::Settings {
                interval,
                lease,
                run_retention: state.config.run_retention,
            },
            capped_queues,
            metrics,
            shutdown_rx.clone(),
        ));
        // Cron ticks, on every replica: each tick's unique row fires it once.
        if let Some(cron_interval) = state.config.cron_interval {
            tasks.spawn(crate::service::cron::run(
                pool.clone(),
                cron_interval,
                shutdown_rx.clone(),
            ));
        }
        // The warm pool, with a local backend: its runners register at this process's
        // internal listener.
        if let Some(settings) = state.config.pool.clone() {
            let host = match internal_addr.ip() {
                ip if ip.is_unspecified() => std::net::IpAddr::from([127, 0, 0, 1]),
                ip => ip,
            };
            let internal_url = format!(
                "http://{}",
                std::net::SocketAddr::new(host, internal_addr.port())
            );
            let secret = state.config.runner_secret.expose().to_string();
            let shutdown = shutdown_rx.clone();
            match settings.backend.clone() {
                crate::service::pool::BackendSettings::Local(local) => {
                    tasks.spawn(crate::service::pool::run(
                        pool.clone(),
                        settings,
                        crate::service::pool::LocalBackend::new(local),
                        internal_url,
                        secret,
                        shutdown,
                    ));
                }
                crate::service::pool::BackendSettings::Kubernetes(kube) => {
                    let backend = crate::service::pool::KubernetesBackend::new(*kube)
                        .map_err(crate::Error::Setup)?;
                    tasks.spawn(crate::service::pool::run(
                        pool.clone(),
                        settings,
                        backend,
                        internal_url,
                        secret,
                        shutdown,
                    ));
                }
            }
        }
        let (public_limits, internal_limits) =
            (state.config.public_limits, state.config.internal_limits);
        tasks.spawn(listener::serve(
            public,
            api::public::router(state.clone()),
            public_limits,
            shutdown_rx.clone(),
        ));
        tasks.spawn(listener::serve(
            internal,
            api::internal::router(state),
            internal_limits,
            shutdown_rx,
        ));
        tracing::info!(%api_addr, %internal_addr, "scheduler listening");
        Ok(Server {
            api_addr,
            internal_addr,
            shutdown,
            tasks,
        })
    }

    /// Stops accepting, lets in-flight requests finish, and waits for every task.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}
