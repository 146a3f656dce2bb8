//! The job lifecycle in SQL: enqueue, claim, lease renewal, completion, reclaim, promotion.
//!
//! Reading this file tells the whole story of a job's state. Every transition is one guarded
//! statement whose guard is in its name: `complete_if_leased` applies only while the named
//! attempt holds the lease, `reclaim_expired` only touches `running` rows whose lease ran out,
//! so a terminal state can never be overwritten and a stale runner can never write. Lease maths
//! uses `now()` of the database, never a scheduler's clock.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sluice_protocol::{Attempt, JobId, JobState, LeaseRef, LeaseToken, Outcome, RunnerId};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{Error, Result};

/// A job to enqueue. `None` fields take the queue's defaults.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    pub queue: String,
    pub spec: Value,
    pub priority: Option<i32>,
    pub run_at: Option<DateTime<Utc>>,
    pub delay: Option<Duration>,
    pub max_attempts: Option<i32>,
    pub timeout_ms: Option<i64>,
    pub idempotency_key: Option<String>,
}

/// The outcome of an enqueue: the job, and whether this call created it (`false` when an
/// idempotency key matched a stored job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    pub id: JobId,
    pub state: JobState,
    pub created: bool,
}

fn parse_state(name: &str) -> Result<JobState> {
    JobState::parse(name).ok_or_else(|| Error::Internal(format!("unknown job state {name:?}")))
}

/// Inserts jobs in one statement (one transaction), in order. A job whose idempotency key is
/// already stored is not inserted; its entry names the stored job with `created: false`.
pub async fn insert_many(pool: &PgPool, jobs: &[NewJob]) -> Result<Vec<Enqueued>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let queues: Vec<&str> = jobs.iter().map(|j| j.queue.as_str()).collect();
    let specs: Vec<&Value> = jobs.iter().map(|j| &j.spec).collect();
    let priorities: Vec<Option<i32>> = jobs.iter().map(|j| j.priority).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = jobs.iter().map(|j| j.run_at).collect();
    let delays: Vec<Option<i64>> = jobs
        .iter()
        .map(|j| j.delay.map(|d| d.as_millis().min(i64::MAX as u128) as i64))
        .collect();
    let max_attempts: Vec<Option<i32>> = jobs.iter().map(|j| j.max_attempts).collect();
    let timeouts: Vec<Option<i64>> = jobs.iter().map(|j| j.timeout_ms).collect();
    let keys: Vec<Option<&str>> = jobs.iter().map(|j| j.idempotency_key.as_deref()).collect();

    let inserted: Vec<(i64, String, Option<String>)> = sqlx::query_as(
        "WITH input AS (
             SELECT * FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::timestamptz[],
                                  $5::bigint[], $6::int[], $7::bigint[], $8::text[])
                 WITH ORDINALITY AS i(queue, spec, priority, run_at, delay_ms, max_attempts,
                                      timeout_ms, idempotency_key, ord)
         )
         INSERT INTO sluice.jobs AS j
             (queue, spec, priority, run_at, max_attempts, timeout_ms, idempotency_key)
         SELECT i.queue, i.spec,
                coalesce(i.priority, q.default_priority, 0),
                coalesce(i.run_at, now() + coalesce(i.delay_ms, 0) * interval '1 millisecond'),
                coalesce(i.max_attempts, q.default_max_attempts, 3),
                coalesce(i.timeout_ms, q.default_timeout_ms),
                i.idempotency_key
         FROM input i LEFT JOIN sluice.queues q ON q.name = i.queue
         ORDER BY i.ord
         ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
         RETURNING j.id, j.state::text, j.idempotency_key",
    )
    .bind(&queues)
    .bind(&specs)
    .bind(&priorities)
    .bind(&run_ats)
    .bind(&delays)
    .bind(&max_attempts)
    .bind(&timeouts)
    .bind(&keys)
    .fetch_all(pool)
    .await?;

    // Rows come back per input row in insertion order; ids grow in that order.
    let mut inserted = inserted;
    inserted.sort_by_key(|row| row.0);
    let mut by_key: HashMap<String, (i64, String)> = HashMap::new();
    let mut unkeyed = Vec::new();
    for (id, state, key) in inserted {
        match key {
            Some(key) => {
                by_key.insert(key, (id, state));
            }
            None => unkeyed.push((id, state)),
        }
    }

    // Keys that matched a stored job: look those jobs up in one query.
    let missing: Vec<&str> = keys
        .iter()
        .flatten()
        .copied()
        .filter(|k| !by_key.contains_key(*k))
        .collect();
    let mut existing: HashMap<String, (i64, String)> = HashMap::new();
    if !missing.is_empty() {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT id, state::text, idempotency_key FROM sluice.jobs
             WHERE idempotency_key = ANY($1)",
        )
        .bind(&missing)
        .fetch_all(pool)
        .await?;
        for (id, state, key) in rows {
            existing.insert(key, (id, state));
        }
    }

    let mut unkeyed = unkeyed.into_iter();
    let mut seen_keys = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        let (id, state, created) = match &job.idempotency_key {
            None => {
                let (id, state) = unkeyed
                    .next()
                    .ok_or_else(|| Error::Internal("insert returned too few rows".into()))?;
                (id, state, true)
            }
            Some(key) => {
                if let Some((id, state)) = by_key.get(key) {
                    // The first occurrence in this batch created it; repeats name it.
                    (*id, state.clone(), seen_keys.insert(key.clone()))
                } else if let Some((id, state)) = existing.get(key) {
                    (*id, state.clone(), false)
                } else {
                    // The stored job was pruned between the two statements.
                    return Err(Error::Conflict(format!(
                        "idempotency key {key:?} changed during the enqueue; retry"
                    )));
                }
            }
        };
        out.push(Enqueued {
            id: JobId(id),
            state: parse_state(&state)?,
            created,
        });
    }
    Ok(out)
}

/// One leased attempt handed to a runner.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: JobId,
    pub attempt: Attempt,
    pub lease_token: LeaseToken,
    pub queue: String,
    pub spec: Value,
    pub timeout_ms: Option<i64>,
}

/// Leases up to `max` available jobs to `runner`, in (priority, run_at, id) order, in one
/// statement: `FOR UPDATE SKIP LOCKED` on the partial claim index, so concurrent claimers
/// never wait on each other and never get the same job. Each claim starts a new attempt with
/// a fresh lease token and records it in `job_attempts`.
pub async fn claim_available(
    pool: &PgPool,
    runner: RunnerId,
    max: i32,
    lease: Duration,
) -> Result<Vec<ClaimedJob>> {
    let rows: Vec<(i64, i32, Uuid, String, Value, Option<i64>)> = sqlx::query_as(
        "WITH picked AS (
             SELECT id FROM sluice.jobs
             WHERE state = 'available' AND run_at <= now()
             ORDER BY priority, run_at, id
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         ), claimed AS (
             UPDATE sluice.jobs j
             SET state = 'running',
                 attempt = j.attempt + 1,
                 lease_token = gen_random_uuid(),
                 lease_expires_at = now() + $3 * interval '1 millisecond',
                 runner_id = $1,
                 started_at = now()
             FROM picked
             WHERE j.id = picked.id
             RETURNING j.id, j.attempt, j.lease_token, j.queue, j.spec, j.timeout_ms
         ), attempts AS (
             INSERT INTO sluice.job_attempts (job_id, attempt, runner_id, lease_token)
             SELECT id, attempt, $1, lease_token FROM claimed
         )
         SELECT id, attempt, lease_token, queue, spec, timeout_ms FROM claimed ORDER BY id",
    )
    .bind(runner.0)
    .bind(max)
    .bind(lease.as_millis() as i64)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, attempt, token, queue, spec, timeout_ms)| ClaimedJob {
            id: JobId(id),
            attempt: Attempt(attempt),
            lease_token: LeaseToken(token),
            queue,
            spec,
            timeout_ms,
        })
        .collect())
}

/// Extends the listed leases that `runner` still holds and records that the runner is alive.
/// Returns the attempts that were renewed; any other listed attempt has lost its lease.
pub async fn renew_leases_if_held(
    pool: &PgPool,
    runner: RunnerId,
    leases: &[LeaseRef],
    lease: Duration,
) -> Result<Vec<(JobId, Attempt)>> {
    let ids: Vec<i64> = leases.iter().map(|l| l.job_id.0).collect();
    let attempts: Vec<i32> = leases.iter().map(|l| l.attempt.0).collect();
    let tokens: Vec<Uuid> = leases.iter().map(|l| l.lease_token.0).collect();
    let rows: Vec<(i64, i32)> = sqlx::query_as(
        "WITH seen AS (
             UPDATE sluice.runners SET last_seen_at = now() WHERE id = $1
         )
         UPDATE sluice.jobs j
         SET lease_expires_at = now() + $5 * interval '1 millisecond'
         FROM unnest($2::bigint[], $3::int[], $4::uuid[]) AS l(job_id, attempt, lease_token)
         WHERE j.id = l.job_id AND j.attempt = l.attempt AND j.lease_token = l.lease_token
           AND j.runner_id = $1 AND j.state = 'running'
         RETURNING j.id, j.attempt",
    )
    .bind(runner.0)
    .bind(&ids)
    .bind(&attempts)
    .bind(&tokens)
    .bind(lease.as_millis() as i64)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, attempt)| (JobId(id), Attempt(attempt)))
        .collect())
}

/// A runner's report that an attempt ended.
#[derive(Debug, Clone)]
pub struct Completion<'a> {
    pub runner: RunnerId,
    pub job: JobId,
    pub attempt: Attempt,
    pub lease_token: LeaseToken,
    pub outcome: Outcome,
    pub output: &'a Value,
    pub error: Option<Value>,
    pub retryable: bool,
    pub final_seq: Option<i64>,
    /// When the attempt failed and may be retried, how long to wait first.
    pub retry_backoff: Duration,
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
    }
}

/// Applies a completion if the attempt still holds its lease: `succeeded`; or, for a failure,
/// `scheduled` for a retry after the back-off when it is retryable and attempts are left, else
/// `failed`. A repeat of an applied completion (same attempt, token and outcome) returns the
/// job's current state without writing, so runners can retry the POST. Anything else is
/// [`Error::LeaseLost`].
pub async fn complete_if_leased(pool: &PgPool, completion: Completion<'_>) -> Result<JobState> {
    let outcome = outcome_name(completion.outcome);
    let row: Option<(String,)> = sqlx::query_as(
        "WITH target AS (
             SELECT id, attempt,
                    CASE WHEN $5 = 'succeeded' THEN 'succeeded'
                         WHEN $8 AND attempt < max_attempts THEN 'scheduled'
                         ELSE 'failed' END AS next_state
             FROM sluice.jobs
             WHERE id = $1 AND attempt = $2 AND lease_token = $3 AND runner_id = $4
               AND state = 'running'
             FOR UPDATE
         ), done AS (
             UPDATE sluice.jobs j
             SET state = t.next_state::sluice.job_state,
                 result = $6,
                 error = $7,
                 run_at = CASE WHEN t.next_state = 'scheduled'
                               THEN now() + $9 * interval '1 millisecond' ELSE j.run_at END,
                 finished_at = CASE WHEN t.next_state = 'scheduled' THEN NULL ELSE now() END,
                 lease_expires_at = NULL
             FROM target t
             WHERE j.id = t.id
             RETURNING j.id, j.attempt, j.state
         ), recorded AS (
             UPDATE sluice.job_attempts a
             SET outcome = $5, finished_at = now(), error = $7, final_seq = $10
             FROM done
             WHERE a.job_id = done.id AND a.attempt = done.attempt
         )
         SELECT state::text FROM done",
    )
    .bind(completion.job.0)
    .bind(completion.attempt.0)
    .bind(completion.lease_token.0)
    .bind(completion.runner.0)
    .bind(outcome)
    .bind(completion.output)
    .bind(&completion.error)
    .bind(completion.retryable)
    .bind(completion.retry_backoff.as_millis() as i64)
    .bind(completion.final_seq)
    .fetch_optional(pool)
    .await?;
    if let Some((state,)) = row {
        return parse_state(&state);
    }

    // Not applied: either a repeat of the completion that was, or a stale attempt.
    let replay: Option<(Option<String>, String)> = sqlx::query_as(
        "SELECT a.outcome, j.state::text
         FROM sluice.job_attempts a JOIN sluice.jobs j ON j.id = a.job_id
         WHERE a.job_id = $1 AND a.attempt = $2 AND a.lease_token = $3 AND a.runner_id = $4",
    )
    .bind(completion.job.0)
    .bind(completion.attempt.0)
    .bind(completion.lease_token.0)
    .bind(completion.runner.0)
    .fetch_optional(pool)
    .await?;
    match replay {
        Some((Some(recorded), state)) if recorded == outcome => parse_state(&state),
        _ => Err(Error::LeaseLost),
    }
}

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
    let (led,): (bool,) =
        sqlx::query_as("SELECT pg_try_advisory_xact_lock(hashtext('sluice.maintenance'))")
            .fetch_one(conn)
            .await?;
    Ok(led)
}

/// Ends up to `limit` expired leases: the job becomes `available` again, or `failed` with
/// `lease_expired` when that was its last attempt. `SKIP LOCKED` keeps two reapers (or a
/// reaper and a completing runner) from acting on one lease; the `state = 'running'` guard
/// keeps a terminal state from changing.
pub async fn reclaim_expired(conn: &mut PgConnection, limit: i64) -> Result<ReclaimReport> {
    let (requeued, failed): (i64, i64) = sqlx::query_as(
        "WITH expired AS (
             SELECT id FROM sluice.jobs
             WHERE state = 'running' AND lease_expires_at < now()
             ORDER BY lease_expires_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED
         ), reclaimed AS (
             UPDATE sluice.jobs j
             SET state = CASE WHEN j.attempt >= j.max_attempts
                              THEN 'failed' ELSE 'available' END::sluice.job_state,
                 error = CASE WHEN j.attempt >= j.max_attempts
                              THEN jsonb_build_object(
                                  'code', 'lease_expired',
                                  'message', 'the runner stopped renewing the lease of the last attempt')
                              ELSE j.error END,
                 finished_at = CASE WHEN j.attempt >= j.max_attempts THEN now() END,
                 run_at = CASE WHEN j.attempt >= j.max_attempts THEN j.run_at ELSE now() END,
                 lease_token = NULL,
                 lease_expires_at = NULL,
                 runner_id = NULL
             FROM expired
             WHERE j.id = expired.id AND j.state = 'running'
             RETURNING j.id, j.attempt, j.state
         ), recorded AS (
             UPDATE sluice.job_attempts a
             SET outcome = 'lease_expired', finished_at = now()
             FROM reclaimed r
             WHERE a.job_id = r.id AND a.attempt = r.attempt
         )
         SELECT count(*) FILTER (WHERE state = 'available'),
                count(*) FILTER (WHERE state = 'failed')
         FROM reclaimed",
    )
    .bind(limit)
    .fetch_one(conn)
    .await?;
    Ok(ReclaimReport {
        requeued: requeued as u64,
        failed: failed as u64,
    })
}

/// Makes up to `limit` scheduled jobs whose `run_at` has come `available`. Returns how many.
pub async fn promote_due(conn: &mut PgConnection, limit: i64) -> Result<u64> {
    let result = sqlx::query(
        "WITH due AS (
             SELECT id FROM sluice.jobs
             WHERE state = 'scheduled' AND run_at <= now()
             ORDER BY run_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED
         )
         UPDATE sluice.jobs j SET state = 'available'
         FROM due WHERE j.id = due.id AND j.state = 'scheduled'",
    )
    .bind(limit)
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// Wakes every scheduler's waiting claims (after a reclaim or promotion made jobs available).
pub async fn notify_available(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_notify('sluice_jobs', '')")
        .execute(conn)
        .await?;
    Ok(())
}

/// A job as the public API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobView {
    pub id: i64,
    pub queue: String,
    pub state: String,
    pub spec: Value,
    pub priority: i32,
    pub attempt: i32,
    pub max_attempts: i32,
    pub timeout_ms: Option<i64>,
    pub idempotency_key: Option<String>,
    pub result: Option<Value>,
    pub error: Option<Value>,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One attempt of a job, as the public API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AttemptView {
    pub attempt: i32,
    pub runner_id: Option<Uuid>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    pub error: Option<Value>,
}

/// A job by id.
pub async fn get(pool: &PgPool, id: JobId) -> Result<Option<JobView>> {
    Ok(sqlx::query_as(
        "SELECT id, queue, state::text AS state, spec, priority, attempt, max_attempts,
                timeout_ms, idempotency_key, result, error, run_at, created_at, started_at,
                finished_at
         FROM sluice.jobs WHERE id = $1",
    )
    .bind(id.0)
    .fetch_optional(pool)
    .await?)
}

/// The attempts of a job, oldest first.
pub async fn list_attempts(pool: &PgPool, id: JobId) -> Result<Vec<AttemptView>> {
    Ok(sqlx::query_as(
        "SELECT attempt, runner_id, started_at, finished_at, outcome, error
         FROM sluice.job_attempts WHERE job_id = $1 ORDER BY attempt",
    )
    .bind(id.0)
    .fetch_all(pool)
    .await?)
}
