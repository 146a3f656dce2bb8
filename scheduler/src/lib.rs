//! The sluice scheduler: the public job API, the queue store, the runner protocol, the reaper,
//! and the `sluice` command line (`migrate`, `serve`, `enqueue`, `dev`).
//!
//! # Layout
//!
//! - [`store`] — every SQL statement, as named operations (`jobs::claim_available`,
//!   `jobs::complete_if_leased`, `jobs::reclaim_expired`, …). Nothing else sees a query string.
//! - [`lifecycle`] — the job state machine's policy: retry back-off, lease timings.
//! - [`api`] — the two HTTP listeners: the public API (`/api/*`, bearer token) and the internal
//!   runner API (`/internal/*`, runner tokens). Only this module knows HTTP status codes.
//! - [`wake`] — one shared `LISTEN sluice_jobs` connection that wakes long-polling claims.
//! - [`maintenance`] — the leader-elected loop that reclaims expired leases and promotes
//!   scheduled jobs.
//! - [`server`] — wires the above into a running scheduler (`sluice serve`).
//! - [`postgres`] — a private Postgres cluster from the system's binaries (`sluice dev`, tests).
//! - [`dev`] — `sluice dev`: cluster, scheduler, two local runners, an example job.
//! - [`bench`] — `sluice bench`: throughput and latency next to the bare-SQL limit.
//! - [`client`] — the small HTTP client behind `sluice enqueue`.
//! - [`secret`] — a wrapper that keeps tokens out of logs.

pub mod api;
pub mod bench;
pub mod client;
pub mod config;
pub mod dev;
pub mod error;
pub mod postgres;
pub mod secret;
pub mod server;
pub mod service;
pub mod store;
pub mod wake;

pub use error::{Error, Result};
