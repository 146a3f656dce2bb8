//! Maintenance, run by the leader of each pass: reclaim expired leases, extend them after an
//! outage, fail jobs past their deadline, promote due scheduled jobs, prune finished ones,
//! forget stops that no retry waits for. Each statement touches a bounded batch, skips rows
//! others hold, and re-checks the state it changes.

use std::time::Duration;

use sqlx::PgConnection;

use crate::Result;

/// The maintenance leadership for the current transaction, if no other replica holds it.
pub const LEAD_MAINTENANCE: &str =
    "SELECT pg_try_advisory_xact_lock(hashtext('sluice.maintenance'))";

/// Ends up to $1 expired leases: `available` again, or `failed` as `lease_expired` (last
/// attempt) or `runner_lost` ($2 losses). Answers how many were requeued and failed.
pub const RECLAIM_EXPIRED: &str = "WITH expired AS (
        SELECT j.id, j.attempt, j.runner_id, j.lease_token, j.started_at,
               (SELECT count(*) FROM sluice.job_attempts p
                WHERE p.job_id = j.id AND p.outcome = 'lease_expired') + 1 AS losses
        FROM sluice.jobs j
        WHERE j.state = 'running' AND j.lease_expires_at < now()
        LIMIT $1
        FOR UPDATE OF j SKIP LOCKED
    ), reclaimed AS (
        UPDATE sluice.jobs j
        SET state = CASE WHEN j.attempt >= j.max_attempts OR e.losses >= $2
                         THEN 'failed' ELSE 'available' END::sluice.job_state,
            error = CASE
                WHEN e.losses >= $2 THEN jsonb_build_object(
                    'code', 'runner_lost',
                    'message', 'the runner was lost ' || e.losses || ' times while running this job')
                WHEN j.attempt >= j.max_attempts THEN jsonb_build_object(
                    'code', 'lease_expired',
                    'message', 'the runner stopped renewing the lease of the last attempt')
                ELSE j.error END,
            finished_at = CASE WHEN j.attempt >= j.max_attempts OR e.losses >= $2
                               THEN now() END,
            run_at = now(),
            lease_token = NULL,
            lease_expires_at = NULL,
            runner_id = NULL
        FROM expired e
        WHERE j.id = e.id AND j.attempt = e.attempt AND j.state = 'running'
        RETURNING j.id, j.attempt, j.state
    ), recorded AS (
        INSERT INTO sluice.job_attempts
            (job_id, attempt, runner_id, lease_token, started_at, finished_at, outcome)
        SELECT e.id, e.attempt, e.runner_id, e.lease_token, e.started_at, now(),
               'lease_expired'
        FROM reclaimed r JOIN expired e ON e.id = r.id
    )
    SELECT count(*) FILTER (WHERE state = 'available'),
           count(*) FILTER (WHERE state = 'failed')
    FROM reclaimed";

/// After an outage: gives every expired lease, and every unconfirmed stop with the retry
/// waiting for it, $1 ms more.
pub const EXTEND_EXPIRED_LEASES: &str = "WITH expired AS (
        -- Rows another statement holds (a completion ending the attempt) are skipped:
        -- this never waits, so it never joins a lock cycle.
        SELECT id FROM sluice.jobs
        WHERE state = 'running' AND lease_expires_at < now()
        FOR UPDATE SKIP LOCKED
    ), held_stops AS (
        -- The same for attempts stopped before or during the outage whose runners could
        -- not confirm the stop meanwhile (a stop a heartbeat is confirming is skipped).
        SELECT job_id, attempt FROM sluice.attempt_stops
        FOR UPDATE SKIP LOCKED
    ), stops AS (
        UPDATE sluice.attempt_stops s
        SET stop_by = greatest(s.stop_by, now() + $1 * interval '1 millisecond')
        FROM held_stops h
        WHERE s.job_id = h.job_id AND s.attempt = h.attempt
        RETURNING s.job_id, s.attempt
    ), waiting AS (
        -- Their retries keep waiting another term: the retry of that very attempt only.
        SELECT j.id FROM sluice.jobs j
        JOIN stops s ON j.id = s.job_id AND j.attempt = s.attempt
        WHERE j.state = 'scheduled'
        FOR UPDATE OF j SKIP LOCKED
    ), delayed AS (
        UPDATE sluice.jobs j
        SET run_at = greatest(j.run_at, now() + $1 * interval '1 millisecond')
        FROM waiting w
        WHERE j.id = w.id
    )
    UPDATE sluice.jobs j
    SET lease_expires_at = now() + $1 * interval '1 millisecond'
    FROM expired e
    WHERE j.id = e.id AND j.state = 'running'";

/// Fails up to $1 running jobs past their `timeout_ms` (at most $2, the documented range) as
/// `timed_out`, recording their stops.
pub const FAIL_OVERDUE: &str = "WITH overdue AS (
        SELECT id, attempt, lease_expires_at FROM sluice.jobs
        WHERE state = 'running' AND timeout_ms IS NOT NULL
          -- CASE orders the tests: a timeout beyond the documented range (a row from
          -- before migration 0004) must never reach the interval arithmetic, whose
          -- overflow would fail every pass.
          AND CASE WHEN timeout_ms <= $2
                   THEN started_at + timeout_ms * interval '1 millisecond' < now()
                   ELSE false END
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    ), failed AS (
        UPDATE sluice.jobs j
        SET state = 'failed',
            error = jsonb_build_object(
                'code', 'timed_out',
                'message', 'the job ran longer than its timeout_ms of ' || j.timeout_ms),
            finished_at = now(),
            lease_expires_at = NULL
        FROM overdue o
        WHERE j.id = o.id AND j.state = 'running'
        RETURNING j.id, j.attempt, j.runner_id, j.lease_token, j.started_at, j.error
    ), recorded AS (
        INSERT INTO sluice.job_attempts
            (job_id, attempt, runner_id, lease_token, started_at, finished_at, outcome,
             error)
        SELECT id, attempt, runner_id, lease_token, started_at, now(), 'timed_out', error
        FROM failed
    ), stopped AS (
        -- A retry waits until the runner has killed the tool (see attempt_stops).
        INSERT INTO sluice.attempt_stops (job_id, attempt, runner_id, stop_by)
        SELECT f.id, f.attempt, f.runner_id, o.lease_expires_at
        FROM failed f JOIN overdue o ON o.id = f.id
        WHERE f.runner_id IS NOT NULL
        ON CONFLICT DO NOTHING
    )
    SELECT count(*) FROM failed";

/// Deletes the stops whose `stop_by` has passed.
pub const FORGET_PAST_STOPS: &str = "DELETE FROM sluice.attempt_stops WHERE stop_by < now()";

/// Deletes up to $1 finished jobs older than their queue's retention.
pub const PRUNE_FINISHED: &str = "DELETE FROM sluice.jobs
    WHERE id IN (
        SELECT expired.id
        FROM sluice.queues q
        CROSS JOIN LATERAL (
            SELECT j.id FROM sluice.jobs j
            WHERE j.state IN ('succeeded', 'failed', 'cancelled')
              AND j.finished_at < now() - q.retention
              AND j.queue = q.name
            ORDER BY j.finished_at
            LIMIT $1
        ) expired
        LIMIT $1
    )";

/// Makes up to $1 scheduled jobs whose `run_at` has come `available`.
pub const PROMOTE_DUE: &str = "WITH due AS (
        SELECT id FROM sluice.jobs
        WHERE state = 'scheduled' AND run_at <= now()
        ORDER BY run_at
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    )
    UPDATE sluice.jobs j SET state = 'available'
    FROM due WHERE j.id = due.id AND j.state = 'scheduled'";

/// Wakes every scheduler's waiting claims.
pub const NOTIFY_AVAILABLE: &str = "SELECT pg_notify('sluice_jobs', '')";

pub(super) const STATEMENTS: &[(&str, &str)] = &[
    ("LEAD_MAINTENANCE", LEAD_MAINTENANCE),
    ("RECLAIM_EXPIRED", RECLAIM_EXPIRED),
    ("EXTEND_EXPIRED_LEASES", EXTEND_EXPIRED_LEASES),
    ("FAIL_OVERDUE", FAIL_OVERDUE),
    ("FORGET_PAST_STOPS", FORGET_PAST_STOPS),
    ("PRUNE_FINISHED", PRUNE_FINISHED),
    ("PROMOTE_DUE", PROMOTE_DUE),
    ("NOTIFY_AVAILABLE", NOTIFY_AVAILABLE),
];

/// What one maintenance pass changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Jobs whose lease expired and that were made available again.
    pub requeued: u64,
    /// Jobs whose lease expired on their last attempt, now `failed`.
    pub failed: u64,
}

/// Takes the maintenance leadership for the current transaction, if no other replica holds
/// it. Transaction-scoped, so a crashed leader releases it with its connection.
pub async fn try_lead_maintenance(conn: &mut PgConnection) -> Result<bool> {
    let (led,): (bool,) = sqlx::query_as(LEAD_MAINTENANCE).fetch_one(conn).await?;
    Ok(led)
}

/// A job whose runner vanished this many times fails as `runner_lost` (a poison pill that
/// kills its runner must not take down runner after runner).
pub const MAX_RUNNER_LOSSES: i64 = 3;

/// Ends up to `limit` expired leases: the job becomes `available` again, or `failed` when that
/// was its last attempt (`lease_expired`) or its runner was lost [`MAX_RUNNER_LOSSES`] times
/// (`runner_lost`). `SKIP LOCKED` keeps two reapers (or a reaper and a completing runner) from
/// acting on one lease; the `state = 'running'` guard (re-checked on the locked row) keeps a
/// finished attempt or a terminal job from changing.
pub async fn reclaim_expired(conn: &mut PgConnection, limit: i64) -> Result<ReclaimReport> {
    let (requeued, failed): (i64, i64) = sqlx::query_as(RECLAIM_EXPIRED)
        .bind(limit)
        .bind(MAX_RUNNER_LOSSES)
        .fetch_one(conn)
        .await?;
    Ok(ReclaimReport {
        requeued: requeued as u64,
        failed: failed as u64,
    })
}

/// After the database was unreachable, gives every lease that expired meanwhile one more
/// lease term, so that runners which kept working get a chance to heartbeat before the reaper
/// reclaims their jobs (River 1ca57d2), and every unconfirmed stop as well (its runner could
/// not say its tool was gone). Returns how many leases were extended.
pub async fn extend_expired_leases(conn: &mut PgConnection, lease: Duration) -> Result<u64> {
    let result = sqlx::query(EXTEND_EXPIRED_LEASES)
        .bind(lease.as_millis() as i64)
        .execute(conn)
        .await?;
    Ok(result.rows_affected())
}

/// Fails up to `limit` running jobs that are past their `timeout_ms` (measured from the
/// attempt's start, in database time) as `timed_out`. Their runners learn it from the next
/// heartbeat and kill the tool, even if they never report back. Returns how many.
pub async fn fail_overdue(conn: &mut PgConnection, limit: i64) -> Result<u64> {
    let (count,): (i64,) = sqlx::query_as(FAIL_OVERDUE)
        .bind(limit)
        .bind(sluice_protocol::bounds::MAX_TIMEOUT_MS as i64)
        .fetch_one(conn)
        .await?;
    Ok(count as u64)
}

/// Forgets the stops whose attempts' leases have run out (no retry waits for those any more).
pub async fn forget_past_stops(conn: &mut PgConnection) -> Result<u64> {
    let result = sqlx::query(FORGET_PAST_STOPS).execute(conn).await?;
    Ok(result.rows_affected())
}

/// Deletes up to `limit` finished jobs (with their attempts and events) older than their
/// queue's retention. Returns how many. Per queue, the cut-off is a range on the partial
/// `jobs_finished_idx`, so pruning never scans the table.
pub async fn prune_finished(conn: &mut PgConnection, limit: i64) -> Result<u64> {
    let result = sqlx::query(PRUNE_FINISHED)
        .bind(limit)
        .execute(conn)
        .await?;
    Ok(result.rows_affected())
}

/// Makes up to `limit` scheduled jobs whose `run_at` has come `available`. Returns how many.
pub async fn promote_due(conn: &mut PgConnection, limit: i64) -> Result<u64> {
    let result = sqlx::query(PROMOTE_DUE).bind(limit).execute(conn).await?;
    Ok(result.rows_affected())
}

/// Wakes every scheduler's waiting claims (after a reclaim or promotion made jobs available).
pub async fn notify_available(conn: &mut PgConnection) -> Result<()> {
    sqlx::query(NOTIFY_AVAILABLE).execute(conn).await?;
    Ok(())
}
