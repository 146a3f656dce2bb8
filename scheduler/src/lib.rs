//! The sluice scheduler as a library: the public job API, the runner protocol, the services
//! behind them and the queue store — everything `sluice serve` runs, and nothing else.
//!
//! # Layout
//!
//! - [`api`] — the two HTTP listeners: the public API (`/api/*`, bearer token) and the internal
//!   runner API (`/internal/*`, runner tokens). Only this module knows HTTP status codes.
//! - [`service`] — the policy between the handlers and the store: dispatch (claims and
//!   completions), runner sessions, jobs and queues, the lifecycle's timings and back-off, and
//!   the leader-elected maintenance loop.
//! - [`store`] — every SQL statement of the scheduler, as named operations
//!   (`jobs::claim_available`, `jobs::complete_if_leased`, `jobs::reclaim_expired`, …).
//!   Nothing else sees a query string.
//! - [`wake`] — one shared `LISTEN sluice_jobs` connection that wakes long-polling claims.
//! - [`config`] — [`config::ServeConfig`], everything a scheduler needs to start.
//! - [`server`] — wires the above into a running scheduler (`sluice serve`).
//! - [`error`] — the one [`Error`] type and its [`Result`] alias.
//! - [`secret`] — a wrapper that keeps tokens out of logs.
//!
//! **Architecture Invariant:** the tooling — the `sluice` command line, `sluice dev`,
//! `sluice bench`, the private Postgres manager and the public-API client — lives in the
//! `sluice-cli` crate (`scheduler/cli/`), which depends on this one; nothing here depends on it.

#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod error;
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
