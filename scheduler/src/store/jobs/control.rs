//! What an operator does to one job: cancel it, or run a failed or cancelled one again. A
//! stopped running attempt leaves a row in `sluice.attempt_stops`, and a retry waits for it,
//! so two attempts of one job never run at once.

use sluice_protocol::{JobId, JobState};
use sqlx::PgPool;

use super::parse_state;
use crate::Result;

/// Cancels job $1 unless it has finished; a running attempt's lease ends and its stop is
/// recorded. Answers the job's state before, and whether it was cancelled now.
pub const CANCEL: &str = "WITH target AS (
        SELECT id, attempt, state, runner_id, lease_token, started_at, lease_expires_at
        FROM sluice.jobs WHERE id = $1 FOR UPDATE
    ), cancelled AS (
        UPDATE sluice.jobs j
        SET state = 'cancelled',
            finished_at = now(),
            error = jsonb_build_object('code', 'cancelled', 'message', 'cancelled through the API'),
            lease_expires_at = NULL
        FROM target t
        WHERE j.id = t.id AND t.state NOT IN ('succeeded', 'failed', 'cancelled')
        RETURNING j.id
    ), recorded AS (
        -- A running attempt ends here; a queued job had none.
        INSERT INTO sluice.job_attempts
            (job_id, attempt, runner_id, lease_token, started_at, finished_at, outcome)
        SELECT t.id, t.attempt, t.runner_id, t.lease_token, t.started_at, now(), 'cancelled'
        FROM target t JOIN cancelled c ON c.id = t.id
        WHERE t.state = 'running'
    ), stopped AS (
        -- A retry waits until the runner has killed the tool (see attempt_stops).
        INSERT INTO sluice.attempt_stops (job_id, attempt, runner_id, stop_by)
        SELECT t.id, t.attempt, t.runner_id, t.lease_expires_at
        FROM target t JOIN cancelled c ON c.id = t.id
        WHERE t.state = 'running'
        ON CONFLICT DO NOTHING
    )
    SELECT t.state::text, EXISTS (SELECT 1 FROM cancelled) FROM target t";

/// Job $1's state, its row locked until the transaction ends.
pub const LOCK_JOB_STATE: &str = "SELECT state::text FROM sluice.jobs WHERE id = $1 FOR UPDATE";

/// Makes locked job $1 `available` again (`scheduled` until a stopped attempt's `stop_by`),
/// with at least one more attempt, and wakes the claimers.
pub const RETRY: &str = "WITH stopping AS (
        SELECT max(stop_by) AS stop_by FROM sluice.attempt_stops
        WHERE job_id = $1 AND stop_by > now()
    ), retried AS (
    UPDATE sluice.jobs j
    SET state = CASE WHEN (SELECT stop_by FROM stopping) IS NULL THEN 'available'
                     ELSE 'scheduled' END::sluice.job_state,
        run_at = greatest(now(), (SELECT stop_by FROM stopping)),
        max_attempts = greatest(j.max_attempts, j.attempt + 1),
        finished_at = NULL,
        result = NULL,
        error = NULL,
        lease_token = NULL,
        runner_id = NULL
    WHERE j.id = $1
    RETURNING j.state, j.queue
    )
    SELECT r.state::text FROM retried r
    CROSS JOIN LATERAL (SELECT pg_notify('sluice_jobs', r.queue)) woke";

/// Up to $4 ids of jobs in state $1 (failed or cancelled), of queue $2 and finished at or
/// after $3 (each when not null), that are not workflow steps; oldest first.
pub const TO_RETRY: &str = "SELECT id FROM sluice.jobs
    WHERE state = $1::sluice.job_state AND workflow_run_id IS NULL
      AND ($2::text IS NULL OR queue = $2)
      AND ($3::timestamptz IS NULL OR finished_at >= $3)
    ORDER BY id
    LIMIT $4";

pub(super) const STATEMENTS: &[(&str, &str)] = &[
    ("CANCEL", CANCEL),
    ("TO_RETRY", TO_RETRY),
    ("LOCK_JOB_STATE", LOCK_JOB_STATE),
    ("RETRY", RETRY),
];

/// What [`cancel`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was queued or running and is now `cancelled`.
    Cancelled,
    /// The job had already ended in this state; nothing changed.
    AlreadyFinished(JobState),
}

/// Cancels a job that has not finished: it becomes `cancelled` at once. A running attempt's
/// lease ends in the same statement, so its runner's next heartbeat gets a cancel order and
/// kills the tool, and anything that runner still sends is refused.
pub async fn cancel(pool: &PgPool, id: JobId) -> Result<Option<CancelOutcome>> {
    let row: Option<(String, bool)> = sqlx::query_as(CANCEL)
        .bind(id.0)
        .fetch_optional(pool)
        .await?;
    match row {
        None => Ok(None),
        Some((_, true)) => Ok(Some(CancelOutcome::Cancelled)),
        Some((state, false)) => Ok(Some(CancelOutcome::AlreadyFinished(parse_state(&state)?))),
    }
}

/// [`TO_RETRY`].
pub async fn to_retry(
    pool: &PgPool,
    state: JobState,
    queue: Option<&str>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    limit: i64,
) -> Result<Vec<JobId>> {
    let ids: Vec<i64> = sqlx::query_scalar(TO_RETRY)
        .bind(state.as_str())
        .bind(queue)
        .bind(since)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(ids.into_iter().map(JobId).collect())
}

/// What [`retry_if_finished_unsuccessfully`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retried {
    /// The job's state before.
    pub before: JobState,
    /// Its state now: `available`, or `scheduled` while the stopped last attempt may still be
    /// running (see `sluice.attempt_stops`); unchanged when it was not retried.
    pub after: JobState,
}

/// Re-runs a `failed` or `cancelled` job with at least one more attempt allowed: it becomes
/// `available` now, or `scheduled` until its last attempt, if that was stopped while running,
/// is confirmed gone (or its lease would have run out) — so two attempts of one job never run
/// at once. `None` when there is no such job. Only those two states are changed; a caller
/// that sees another state answers with a conflict.
pub async fn retry_if_finished_unsuccessfully(pool: &PgPool, id: JobId) -> Result<Option<Retried>> {
    let mut tx = pool.begin().await?;
    let row: Option<(String,)> = sqlx::query_as(LOCK_JOB_STATE)
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?;
    let Some((before,)) = row else {
        return Ok(None);
    };
    let before = parse_state(&before)?;
    if !matches!(before, JobState::Failed | JobState::Cancelled) {
        return Ok(Some(Retried {
            before,
            after: before,
        }));
    }
    // A second statement, so a fresh snapshot (READ COMMITTED): it sees the stop a cancel or
    // a timeout committed while this transaction waited for the row above. One statement
    // would re-check the row after the wait but read the stops as they were before it.
    let (after,): (String,) = sqlx::query_as(RETRY).bind(id.0).fetch_one(&mut *tx).await?;
    tx.commit().await?;
    Ok(Some(Retried {
        before,
        after: parse_state(&after)?,
    }))
}
