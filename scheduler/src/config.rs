//! The scheduler's configuration (`sluice serve`), from flags and `SLUICE_*` variables.

use std::net::SocketAddr;
use std::time::Duration;

use crate::api::listener::{connection_budget, raise_descriptor_limit, ListenerLimits};
use crate::secret::Secret;
use crate::service::lifecycle::LeaseTimings;

/// Everything `sluice serve` needs; built by the CLI, by `sluice dev` and by tests.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub database_url: Secret,
    /// The public API listener (`/api/*`).
    pub listen: SocketAddr,
    /// The internal runner listener (`/internal/*`); never the public one.
    pub internal_listen: SocketAddr,
    /// Bearer token for the public API.
    pub api_token: Secret,
    /// Registration secret that runners present to `register`.
    pub runner_secret: Secret,
    pub timings: LeaseTimings,
    /// How long a claim may wait at most, whatever the runner asks.
    pub max_claim_wait: Duration,
    /// How often a waiting claim re-checks without a notification (covers a lost LISTEN).
    pub claim_poll_interval: Duration,
    /// How often this replica fires due cron ticks; `None`: it fires none (another replica
    /// does, or tests drive the ticks).
    pub cron_interval: Option<Duration>,
    /// How long a finished workflow run (its steps, outputs and artifacts) is kept; zero:
    /// for ever.
    pub run_retention: Duration,
    /// Largest stored agent session history, in bytes of JSON.
    pub session_max_bytes: usize,
    /// Live event streams (SSE): keep-alive interval and buffers.
    pub events: crate::service::events::EventSettings,
    /// The warm runner pool this scheduler keeps, if any.
    pub pool: Option<crate::service::pool::PoolSettings>,
    pub max_connections: u32,
    /// Apply migrations at start.
    pub migrate: bool,
    /// Connection cap and header/idle timeout of the public listener.
    pub public_limits: ListenerLimits,
    /// The same for the internal listener: counted apart, so runners keep their room.
    pub internal_limits: ListenerLimits,
}

impl ServeConfig {
    /// A config with the defaults for everything but the database and the secrets.
    pub fn new(database_url: Secret, api_token: Secret, runner_secret: Secret) -> Self {
        let (public, internal) = connection_budget(raise_descriptor_limit());
        ServeConfig {
            database_url,
            listen: "127.0.0.1:7070".parse().expect("static address"),
            internal_listen: "127.0.0.1:7071".parse().expect("static address"),
            api_token,
            runner_secret,
            timings: LeaseTimings::default(),
            max_claim_wait: Duration::from_secs(60),
            claim_poll_interval: Duration::from_secs(1),
            cron_interval: Some(Duration::from_secs(1)),
            run_retention: Duration::from_secs(7 * 24 * 3600),
            session_max_bytes: 384 << 10,
            events: crate::service::events::EventSettings::default(),
            pool: None,
            max_connections: 16,
            migrate: true,
            public_limits: ListenerLimits {
                max_connections: public,
                header_timeout: Duration::from_secs(10),
            },
            internal_limits: ListenerLimits {
                max_connections: internal,
                header_timeout: Duration::from_secs(30),
            },
        }
    }
}
