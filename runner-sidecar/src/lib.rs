//! The sluice runner sidecar: registers with a scheduler's internal API, claims tasks for its
//! free slots, runs each attempt's tool in the sandbox, streams its output, heartbeats its
//! lease and reports its completion. It never talks to Postgres, and holds no `unsafe`
//! code: every raw syscall is in the `sluice-sandbox` crate.
//!
//! # Layout, outside in
//!
//! - [`session`] — registration, the claim loop, heartbeats and the fence, draining.
//! - [`attempt`] — one claimed attempt from claim to delivered completion, top to bottom.
//! - [`exec`] — the executors (bash, confined tool) with their one shape, and the policy a
//!   runner applies to tools (environment, limits, timeout, network).
//! - [`tools`] — the five tools' definitions, the file tools, `web_fetch`, and the confined
//!   child that runs them.
//! - [`leases`] — the held leases, by `(job, attempt)`; [`outbox`] — completions on their way,
//!   carried by claims or sent in batches; [`slots`] — the slots, each with a uid of its own.
//! - [`client`] — the internal-API HTTP client with retries and back-off; [`config`] — flags
//!   and environment, validated at start; [`bench`] — the spawn-path benchmark.
//!
//! Dependencies point inward only: `session` → `attempt` → `exec` → `tools` and the sandbox;
//! `leases`, `outbox`, `slots`, `client` and `config` are leaves the outer layers share.

#![forbid(unsafe_code)]

pub mod attempt;
pub mod bench;
pub mod client;
pub mod config;
pub mod exec;
pub mod leases;
pub mod metrics;
pub mod outbox;
pub mod session;
pub mod slots;
pub mod tools;

pub use config::Config;
pub use session::run;

/// Errors of the sidecar library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable; the message names the variable.
    #[error("{0}")]
    Config(String),
}

/// `Result` with the sidecar's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
