//! The job lifecycle's policy: how long leases last, how failed attempts back off, what a
//! completion asks of the store.
//!
//! The transitions themselves are guarded SQL statements in [`crate::store::jobs`]; this
//! module holds the numbers they are given, so the whole policy reads in one place:
//!
//! ```text
//!  blocked ──parents done──▶ available ◀──promote (run_at due)── scheduled
//!                               │  ▲                                 ▲
//!                         claim │  │ lease expired, attempts left    │ failed, retryable,
//!                               ▼  │                                 │ attempts left
//!                             running ───────────────────────────────┘
//!                               │
//!           succeeded ◀─────────┼──────────▶ failed (attempts used up, not retryable,
//!                               │                    or lease expired on the last attempt)
//!                               ▼
//!                           cancelled
//! ```
//!
//! Every statement that moves a job names the state it moves it from. A finished job
//! (succeeded, failed, cancelled) changes only through an operator's retry, which makes a
//! failed or cancelled one available (or scheduled, while its stopped attempt may still run).

use std::time::Duration;

use sluice_protocol::{Completion, JobId, RunnerId};

use crate::store::jobs;

/// Timings that runners and the reaper share.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTimings {
    /// How often a runner heartbeats.
    pub heartbeat: Duration,
    /// How long a lease lasts without a renewal.
    pub lease: Duration,
    /// How often the leader reclaims expired leases and promotes due jobs.
    pub maintenance_interval: Duration,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        LeaseTimings {
            heartbeat: Duration::from_secs(5),
            lease: Duration::from_secs(30),
            maintenance_interval: Duration::from_secs(1),
        }
    }
}

/// Retry back-off after a failed attempt, by its retry policy (`retry: {initial_ms, max_ms,
/// factor}` of the job, else of its queue, else 1 s doubling up to one hour): the n-th retry
/// waits `initial_ms × factor^(n-1)`, at most `max_ms`, times a jitter of ±25 % drawn here so
/// that a burst of failures does not retry in lock step. The formula is the schema's
/// `sluice.retry_delay_ms`, evaluated in the completion's statement against the job row (the
/// policy is stored with the job; the service never has to read it first).
pub fn retry_jitter() -> f64 {
    0.75 + fastrand::f64() * 0.5
}

/// What a completion asks of the store: apply it under its lease, with the retry back-off
/// its attempt earned should it fail retryably. `job` is the completion's job (named by the
/// path for a single completion, by the completion in a batch).
pub fn store_completion(runner: RunnerId, job: JobId, c: &Completion) -> jobs::Completion<'_> {
    jobs::Completion {
        runner,
        job,
        attempt: c.attempt,
        lease_token: c.lease_token,
        outcome: c.outcome,
        output: &c.output,
        error: c
            .error
            .as_ref()
            .map(|e| serde_json::to_value(e).unwrap_or_default()),
        retryable: c.retryable,
        final_seq: c.final_seq,
        retry_jitter: retry_jitter(),
    }
}

/// [`store_completion`] for a batch whose completions name their jobs (checked before).
pub fn store_completions(runner: RunnerId, items: &[Completion]) -> Vec<jobs::Completion<'_>> {
    items
        .iter()
        .map(|c| store_completion(runner, c.job_id.unwrap_or(JobId(0)), c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jitter_stays_within_a_quarter() {
        for _ in 0..1000 {
            let jitter = retry_jitter();
            assert!((0.75..=1.25).contains(&jitter), "{jitter}");
        }
    }
}
