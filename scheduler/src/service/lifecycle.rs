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

/// Retry back-off after a failed attempt: exponential from 1 s, doubling, capped at one hour,
/// with ±25 % jitter so that a burst of failures does not retry in lock step.
pub fn retry_backoff(failed_attempt: i32) -> Duration {
    let exponent = failed_attempt.clamp(1, 20) as u32 - 1;
    let base_ms = 1000u64.saturating_mul(1u64 << exponent).min(3_600_000);
    let jitter = 0.75 + fastrand::f64() * 0.5;
    Duration::from_millis((base_ms as f64 * jitter) as u64)
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
        retry_backoff: retry_backoff(c.attempt.0),
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
    fn backoff_grows_and_is_capped() {
        let first = retry_backoff(1);
        assert!(first >= Duration::from_millis(750) && first <= Duration::from_millis(1250));
        let third = retry_backoff(3);
        assert!(third >= Duration::from_millis(3000) && third <= Duration::from_millis(5000));
        let huge = retry_backoff(1000);
        assert!(huge <= Duration::from_millis(4_500_000));
        assert!(retry_backoff(0) <= Duration::from_millis(1250));
    }
}
