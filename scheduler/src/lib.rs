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

#[cfg(test)]
mod invariants {
    //! The layering rules that no crate boundary enforces here, checked on the source.

    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn only_the_store_runs_sql() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&root, &mut files);
        let store = root.join("store");
        let offenders: Vec<String> = files
            .iter()
            .filter(|path| !path.starts_with(&store))
            .filter(|path| {
                let text = std::fs::read_to_string(path).expect("read source");
                // Spelled in pieces, so this file does not match itself.
                [
                    concat!("sqlx::", "query"),
                    concat!("query_", "as("),
                    concat!("query_", "scalar("),
                    concat!(".exe", "cute("),
                ]
                .iter()
                .any(|needle| text.contains(needle))
            })
            .map(|path| path.display().to_string())
            .collect();
        assert!(
            offenders.is_empty(),
            "SQL outside store/: {offenders:?} (move the statement into a store module)"
        );
    }
}
