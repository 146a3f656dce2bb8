//! The services: the scheduler's policy, between the HTTP handlers (`api/`, which parse and
//! map) and the store (`store/`, which holds every SQL statement). A test can call any of
//! them without HTTP.
//!
//! - [`dispatch`] — handing work to runners: the claim long-poll, completions (one, or a
//!   batch, or carried on a claim).
//! - [`runners`] — a runner's session: registration (and its wire version), heartbeats and
//!   their orders, event streams.
//! - [`jobs`] — what applications and operators do: enqueue, read, cancel, retry; queues.
//! - [`lifecycle`] — the job lifecycle's policy: lease timings, retry back-off, what a
//!   completion asks of the store.
//! - [`maintenance`] — the leader-elected loop: reclaim, timeouts, promotion, pruning.
//! - [`events`] — live event streams (SSE): one LISTEN, any number of clients.
//! - [`metrics`] — Prometheus metrics: counted as things happen, sampled when scraped.
//! - [`sessions`] — agent sessions: handing one to a claimed attempt, keeping its turns,
//!   reading and forgetting it.
//!
//! Where the next capabilities go (ARCHITECTURE.md has the map): workflow advancement (a
//! step's completion releasing its children) is part of [`dispatch`]'s completion and a
//! `workflows` service beside [`jobs`]; cron ticks a `cron` service driven like
//! [`maintenance`]; the runner pool a `pool` service on the maintenance leader.

pub mod cron;
pub mod dispatch;
pub mod events;
pub mod jobs;
pub mod lifecycle;
pub mod maintenance;
pub mod metrics;
pub mod pool;
pub mod runners;
pub mod sessions;
pub mod workflows;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::config::ServeConfig;
use crate::store::runners::TokenCache;
use crate::wake::Wake;

/// What every service works with: one per scheduler, cloned into each request.
#[derive(Clone)]
pub struct Context {
    pub pool: PgPool,
    pub wake: Wake,
    /// The live event fan-out (SSE streams).
    pub events: events::Hub,
    /// What `/metrics` shows.
    pub metrics: Arc<metrics::Metrics>,
    pub config: Arc<ServeConfig>,
    /// Flips to `true` when the scheduler shuts down, ending long polls early.
    pub shutdown: watch::Receiver<bool>,
    /// Whether some queue has a `max_running` cap, refreshed by every maintenance tick; while
    /// it is false, claims skip the capped (serialised) path. A stale `false` only delays
    /// capped queues' jobs by a tick: the fast path never takes them.
    pub capped_queues: Arc<AtomicBool>,
    /// Runner tokens recently looked up, so that the hot task calls skip a round trip.
    pub runner_tokens: Arc<TokenCache>,
}
