//! The sluice runner sidecar: registers with a scheduler's internal API, claims tasks for its
//! free slots, forks their tools under limits, streams their output, heartbeats their leases
//! and reports their completion. It never talks to Postgres.
//!
//! # Layout
//!
//! - [`config`] — flags and environment, validated at start; [`config::Secret`].
//! - [`client`] — the internal-API HTTP client with retries and back-off.
//! - [`runner`] — registration, the claim loop, heartbeats, self-fencing, draining.
//! - [`slots`] — the task slots, each with a uid of its own, locked host-wide.
//! - [`task`] — one task: dispatch on the spec's kind, event batching, completion.
//! - [`process`] — forking tools (session, death signal, no-new-privs, rlimits, clean env)
//!   and killing their process groups.
//! - [`outbox`] — completions on their way, carried by claims or sent in batches.
//! - [`output`] — the per-attempt output cap and the tails kept for results.
//! - [`tools`] — the five tools' definitions, path confinement, the file tools, `web_fetch`,
//!   and the confined child that runs them.

pub mod client;
pub mod config;
pub mod outbox;
pub mod output;
pub mod process;
pub mod runner;
pub mod slots;
pub mod task;
pub mod tools;

pub use config::Config;
pub use runner::run;

/// Errors of the sidecar library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable; the message names the variable.
    #[error("{0}")]
    Config(String),
}

/// `Result` with the sidecar's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
