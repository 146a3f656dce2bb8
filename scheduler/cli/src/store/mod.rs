//! The tooling's SQL: statements only `sluice dev`, `sluice bench` and the testkit run, never
//! `sluice serve`. As in the server's `sluice::store`, each operation is a named function,
//! each statement whole (a reader can copy it into `psql`), every value a bind parameter —
//! but for the one statement a single-user server reads from stdin, which takes none
//! ([`provision::superuser_password_statement`]).
//!
//! - [`bench`](mod@bench) — the bench's own reference table, its plain-INSERT paths and its
//!   probes, the `pgbench` scripts.
//! - [`provision`] — a private cluster's scheduler role and database, and its superuser's
//!   password.

pub mod bench;
pub mod provision;
