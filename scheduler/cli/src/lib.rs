//! The tooling around the sluice scheduler: what the `sluice` binary and the testkit use
//! besides the server library (crate `sluice`), which depends on none of it.
//!
//! # Layout
//!
//! - [`cluster`] — a private Postgres cluster from the system's binaries (`sluice dev`,
//!   `sluice bench`, the testkit).
//! - [`provision`] — a private cluster's scheduler role and database: SCRAM verifiers, and
//!   [`provision::provision_app_database`] over [`store::provision`]'s statements.
//! - [`dev`] — `sluice dev`: cluster, scheduler, local runners, an example job.
//! - [`bench`](mod@bench) — `sluice bench`: throughput and latency next to the bare-SQL limit.
//! - [`pool`] — `sluice serve`'s warm pool settings and the choice of backend.
//! - [`client`] — a typed client of the public API, behind `sluice enqueue` and the bench.
//! - [`commands`] — `sluice jobs`, `sluice queues`, `sluice tail` over the client;
//!   [`output`] — `--output text|json`, colours and the progress indicator.
//! - [`runs`] — following a workflow run step by step (`sluice run --wait`, `sluice dev`).
//! - [`store`] — every SQL statement of the tooling (the bench's own tables and references,
//!   provisioning). The product's statements stay in the server's `sluice::store`.
//!
//! The `sluice` binary (`src/main.rs`) parses the command line and calls these, or the server
//! library for `migrate` and `serve`.

#![forbid(unsafe_code)]

pub mod bench;
pub mod client;
pub mod cluster;
pub mod commands;
pub mod dev;
pub mod output;
pub mod pool;
pub mod provision;
pub mod runs;
pub mod store;
