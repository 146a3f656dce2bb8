//! Claims: leasing available jobs to a runner. Each claim starts a new attempt on the job
//! row with a fresh lease token and expiry; the attempt's `job_attempts` row is written when
//! it ends.
//!
//! [`CLAIM`], [`CLAIM_CAPPED`] and [`super::COMPLETE_AND_CLAIM`] end alike: the `claimed`
//! CTE starts the attempts of the `picked` ids, and a test keeps the copies identical.

use std::time::Duration;

use serde_json::Value;
use sluice_protocol::{Attempt, JobId, LeaseToken, RunnerId};
use sqlx::PgPool;
use uuid::Uuid;

use crate::Result;

/// Leases up to $2 available jobs of uncapped, unpaused queues to runner $1 for $3 ms, in
/// (priority, run_at, id) order: `FOR UPDATE SKIP LOCKED` on the partial claim index, so
/// concurrent claimers never wait on each other and never get the same job.
pub const CLAIM: &str = "WITH picked AS (
        SELECT id FROM sluice.jobs j
        WHERE state = 'available' AND run_at <= now()
          -- The list is computed once (an InitPlan); queue_open keeps the planner
          -- on an ordered scan of the claim index (see its definition).
          AND sluice.queue_open(j.queue, ARRAY(
              SELECT name FROM sluice.queues WHERE paused OR max_running IS NOT NULL
          ))
          -- A runner marked gone (replaced by a new registration) leases nothing,
          -- even while a scheduler still has its token cached; nor does one ordered
          -- to drain.
          AND EXISTS (SELECT 1 FROM sluice.runners r WHERE r.id = $1
                                AND r.state NOT IN ('gone', 'draining'))
        ORDER BY priority, run_at, id
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE sluice.jobs j
        SET state = 'running',
            attempt = j.attempt + 1,
            lease_token = gen_random_uuid(),
            runner_id = $1,
            started_at = now(),
            lease_expires_at = now() + $3 * interval '1 millisecond'
        -- By primary key: a join with the CTE would let the planner hash the whole
        -- table for a large claim.
        WHERE j.id = ANY (ARRAY(SELECT id FROM picked))
        RETURNING j.id, j.attempt, j.lease_token, j.queue, j.spec, j.timeout_ms,
                  j.context, j.workflow_run_id, j.step_id, j.priority, j.run_at
    )
    SELECT id, attempt, lease_token, queue, spec, timeout_ms, context, workflow_run_id, step_id,
           greatest(extract(epoch FROM now() - run_at)::float8, 0) AS waited
    FROM claimed
    ORDER BY priority, run_at, id";

/// Serialises claims on capped queues (until the transaction ends).
pub const LOCK_CAPPED_CLAIMS: &str =
    "SELECT pg_advisory_xact_lock(hashtext('sluice.capped-claims'))";

/// Leases up to $2 jobs of queues with a `max_running` cap to runner $1 for $3 ms, never
/// more than a queue's free room; run after [`LOCK_CAPPED_CLAIMS`] in the same transaction.
pub const CLAIM_CAPPED: &str = "WITH caps AS MATERIALIZED (
        SELECT q.name,
               q.max_running - (SELECT count(*) FROM sluice.jobs r
                                WHERE r.state = 'running' AND r.queue = q.name) AS free
        FROM sluice.queues q
        WHERE q.max_running IS NOT NULL AND NOT q.paused
    ), candidates AS (
        SELECT j.id, j.queue, j.priority, j.run_at
        FROM sluice.jobs j JOIN caps c ON c.name = j.queue
        WHERE j.state = 'available' AND j.run_at <= now() AND c.free > 0
          AND EXISTS (SELECT 1 FROM sluice.runners r WHERE r.id = $1
                                AND r.state NOT IN ('gone', 'draining'))
        ORDER BY j.priority, j.run_at, j.id
        LIMIT $2
        FOR UPDATE OF j SKIP LOCKED
    ), picked AS (
        SELECT ranked.id FROM (
            SELECT c.id, c.queue,
                   row_number() OVER (PARTITION BY c.queue
                                      ORDER BY c.priority, c.run_at, c.id) AS n
            FROM candidates c
        ) ranked
        JOIN caps ON caps.name = ranked.queue
        WHERE ranked.n <= caps.free
    ), claimed AS (
        UPDATE sluice.jobs j
        SET state = 'running',
            attempt = j.attempt + 1,
            lease_token = gen_random_uuid(),
            runner_id = $1,
            started_at = now(),
            lease_expires_at = now() + $3 * interval '1 millisecond'
        -- By primary key: a join with the CTE would let the planner hash the whole
        -- table for a large claim.
        WHERE j.id = ANY (ARRAY(SELECT id FROM picked))
        RETURNING j.id, j.attempt, j.lease_token, j.queue, j.spec, j.timeout_ms,
                  j.context, j.workflow_run_id, j.step_id, j.priority, j.run_at
    )
    SELECT id, attempt, lease_token, queue, spec, timeout_ms, context, workflow_run_id, step_id,
           greatest(extract(epoch FROM now() - run_at)::float8, 0) AS waited
    FROM claimed
    ORDER BY priority, run_at, id";

pub(super) const STATEMENTS: &[(&str, &str)] = &[
    ("CLAIM", CLAIM),
    ("LOCK_CAPPED_CLAIMS", LOCK_CAPPED_CLAIMS),
    ("CLAIM_CAPPED", CLAIM_CAPPED),
];

/// One leased attempt handed to a runner.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: JobId,
    pub attempt: Attempt,
    pub lease_token: LeaseToken,
    pub queue: String,
    pub spec: Value,
    pub timeout_ms: Option<i64>,
    /// A `for_each` job's own part of its step's context (`{"item", "index"}`).
    pub context: Option<Value>,
    /// The workflow run and step it runs (the step's context is filled in when it is
    /// claimed).
    pub step: Option<(i64, String)>,
    /// How long it waited to be claimed once it could be (since `run_at`).
    pub waited_seconds: f64,
}

/// Leases up to `max` available jobs of uncapped, unpaused queues to `runner`, in
/// (priority, run_at, id) order, in one statement: `FOR UPDATE SKIP LOCKED` on the partial
/// claim index, so concurrent claimers
/// never wait on each other and never get the same job. Each claim starts a new attempt with
/// a fresh lease token and expiry on the job row.
pub async fn claim_available(
    pool: &PgPool,
    runner: RunnerId,
    max: i32,
    lease: Duration,
) -> Result<Vec<ClaimedJob>> {
    let rows: Vec<ClaimedRow> = sqlx::query_as(CLAIM)
        .bind(runner.0)
        .bind(max)
        .bind(lease.as_millis() as i64)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(claimed_job).collect())
}

/// Leases up to `max` jobs of queues with a `max_running` cap, never more than a queue's
/// free room. Claims on capped queues are serialised by an advisory lock taken *before* the
/// claim statement, so the statement's snapshot sees every running job of every earlier
/// claimer: the cap is strict across all scheduler replicas. [`claim_available`] skips capped
/// queues altogether, so only this path ever runs their jobs.
pub async fn claim_capped(
    pool: &PgPool,
    runner: RunnerId,
    max: i32,
    lease: Duration,
) -> Result<Vec<ClaimedJob>> {
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK_CAPPED_CLAIMS).execute(&mut *tx).await?;
    let rows: Vec<ClaimedRow> = sqlx::query_as(CLAIM_CAPPED)
        .bind(runner.0)
        .bind(max)
        .bind(lease.as_millis() as i64)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows.into_iter().map(claimed_job).collect())
}

/// A claimed row: id, attempt, lease token, queue, spec, timeout, context, run, step.
pub(super) type ClaimedRow = (
    i64,
    i32,
    Uuid,
    String,
    Value,
    Option<i64>,
    Option<Value>,
    Option<i64>,
    Option<String>,
    f64,
);

pub(super) fn claimed_job(row: ClaimedRow) -> ClaimedJob {
    let (id, attempt, token, queue, spec, timeout_ms, context, run, step, waited) = row;
    ClaimedJob {
        id: JobId(id),
        attempt: Attempt(attempt),
        lease_token: LeaseToken(token),
        queue,
        spec,
        timeout_ms,
        context,
        step: run.zip(step),
        waited_seconds: waited,
    }
}

/// The query plan of the claim, for tests and `sluice bench` to check that it stays an index
/// scan however many finished jobs the table holds.
pub async fn explain_claim(pool: &PgPool) -> Result<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(
        // Two constants joined: no input in it.
        sqlx::AssertSqlSafe(["EXPLAIN ", CLAIM].concat()),
    )
    .bind(Uuid::nil())
    .bind(10i32)
    .bind(30_000i64)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(line,)| line).collect())
}
