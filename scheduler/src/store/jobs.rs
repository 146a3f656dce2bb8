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

/// The claim statement, as a macro so that [`explain_claim`] can prefix it at compile time.
/// The end both claims share: start the attempts of the `picked` jobs (ids, in a CTE the
/// caller's statement defines), each holding a fresh lease on the job row. The attempt's
/// `job_attempts` row is written when it ends. Binds: $1 runner, $3 lease in ms.
macro_rules! claimed_sql {
    () => {
        "), claimed AS (
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
                       j.priority, j.run_at
         )"
    };
}

/// The result of a claim alone: the leased jobs in claim order.
macro_rules! claimed_select {
    () => {
        "
         SELECT id, attempt, lease_token, queue, spec, timeout_ms FROM claimed
         ORDER BY priority, run_at, id"
    };
}

/// The `picked` CTE of the uncapped claim (opened by the caller). Binds: $2 max.
macro_rules! picked_sql {
    () => {
        "
             SELECT id FROM sluice.jobs j
             WHERE state = 'available' AND run_at <= now()
               -- The list is computed once (an InitPlan); queue_open keeps the planner
               -- on an ordered scan of the claim index (see its definition).
               AND sluice.queue_open(j.queue, ARRAY(
                   SELECT name FROM sluice.queues WHERE paused OR max_running IS NOT NULL
               ))
               -- A runner marked gone (replaced by a new registration) leases nothing,
               -- even while a scheduler still has its token cached.
               AND EXISTS (SELECT 1 FROM sluice.runners r WHERE r.id = $1 AND r.state <> 'gone')
             ORDER BY priority, run_at, id
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         "
    };
}

macro_rules! claim_sql {
    () => {
        concat!(
            "WITH picked AS (",
            picked_sql!(),
            claimed_sql!(),
            claimed_select!()
        )
    };
}

/// The completion CTEs, `input` to `recorded`: apply each completion whose attempt still
/// holds its lease, and record the finished attempt with its body's hash. Binds: $1 runner,
/// $4.. $13 the completions' columns as arrays. The caller's statement continues with `, <next CTE>` or
/// its final `SELECT`.
macro_rules! completion_ctes {
    () => {
        "WITH input AS (
             SELECT * FROM unnest($4::bigint[], $5::int[], $6::uuid[], $7::text[],
                                  $8::jsonb[], $9::jsonb[], $10::bool[], $11::bigint[],
                                  $12::bigint[], $13::bytea[])
                 AS i(job_id, attempt, lease_token, outcome, output, error,
                      retryable, backoff_ms, final_seq, completion_hash)
         ), done AS (
             -- The lease guard is in this UPDATE's own WHERE, so a row that another
             -- statement changed meanwhile is re-checked on its new version before it is
             -- written (no separate row lock needed). A failure is retried when it may be and
             -- attempts are left: `scheduled` after the back-off.
             UPDATE sluice.jobs j
             SET state = CASE
                     WHEN i.outcome = 'succeeded' THEN 'succeeded'
                     WHEN i.retryable AND j.attempt < j.max_attempts THEN 'scheduled'
                     ELSE 'failed' END::sluice.job_state,
                 result = i.output,
                 error = i.error,
                 run_at = CASE
                     WHEN i.outcome <> 'succeeded' AND i.retryable AND j.attempt < j.max_attempts
                     THEN now() + i.backoff_ms * interval '1 millisecond'
                     ELSE j.run_at END,
                 finished_at = CASE
                     WHEN i.outcome <> 'succeeded' AND i.retryable AND j.attempt < j.max_attempts
                     THEN NULL ELSE now() END,
                 lease_expires_at = NULL
             FROM input i
             WHERE j.id = i.job_id AND j.attempt = i.attempt AND j.lease_token = i.lease_token
               AND j.runner_id = $1 AND j.state = 'running'
             RETURNING j.id, j.attempt, j.state, j.lease_token, j.started_at, i.outcome,
                       i.error, i.final_seq, i.completion_hash
         ), recorded AS (
             INSERT INTO sluice.job_attempts
                 (job_id, attempt, runner_id, lease_token, started_at, finished_at, outcome,
                  error, final_seq, completion_hash)
             SELECT id, attempt, $1, lease_token, started_at, now(), outcome, error, final_seq,
                    completion_hash
             FROM done
         )"
    };
}

/// Completions and a claim in one statement, so one commit (and one round trip) serves a
/// runner that reports finished attempts and refills their slots. The snapshot is shared:
/// the completions only touch `running` rows and the claim only `available` ones. Rows come
/// back as `(done, …)`: the applied completions first, then the leased jobs in claim order.
macro_rules! complete_and_claim_sql {
    () => {
        concat!(
            completion_ctes!(),
            ", picked AS (",
            picked_sql!(),
            claimed_sql!(),
            "
         SELECT done, id, attempt, lease_token, queue, spec, timeout_ms, state FROM (
             SELECT true AS done, id, attempt, NULL::uuid AS lease_token, NULL::text AS queue,
                    NULL::jsonb AS spec, NULL::bigint AS timeout_ms, state::text AS state,
                    NULL::int AS priority, NULL::timestamptz AS run_at
             FROM done
             UNION ALL
             SELECT false, id, attempt, lease_token, queue, spec, timeout_ms, NULL,
                    priority, run_at
             FROM claimed
         ) r
         ORDER BY done DESC, priority, run_at, id"
        )
    };
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
    let rows: Vec<(i64, i32, Uuid, String, Value, Option<i64>)> = sqlx::query_as(claim_sql!())
        .bind(runner.0)
        .bind(max)
        .bind(lease.as_millis() as i64)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(claimed_job).collect())
}

/// Why a listed lease was not renewed, as told to the runner in a cancel order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Renewed; keep running.
    Renewed,
    /// Still this runner's, but another statement held the row (a completion, a cancel, an
    /// outage extension): not renewed this time, and nothing to do. The heartbeat skips rows
    /// locked by others instead of waiting for them, so it can never deadlock with them.
    Busy,
    /// Reclaimed, completed, or never this runner's.
    Lost,
    /// The job was cancelled.
    Cancelled,
    /// The job ran past its deadline.
    TimedOut,
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
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('sluice.capped-claims'))")
        .execute(&mut *tx)
        .await?;
    let rows: Vec<(i64, i32, Uuid, String, Value, Option<i64>)> = sqlx::query_as(concat!(
        "WITH caps AS MATERIALIZED (
             SELECT q.name,
                    q.max_running - (SELECT count(*) FROM sluice.jobs r
                                     WHERE r.state = 'running' AND r.queue = q.name) AS free
             FROM sluice.queues q
             WHERE q.max_running IS NOT NULL AND NOT q.paused
         ), candidates AS (
             SELECT j.id, j.queue, j.priority, j.run_at
             FROM sluice.jobs j JOIN caps c ON c.name = j.queue
             WHERE j.state = 'available' AND j.run_at <= now() AND c.free > 0
               AND EXISTS (SELECT 1 FROM sluice.runners r WHERE r.id = $1 AND r.state <> 'gone')
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
         ",
        claimed_sql!(),
        claimed_select!()
    ))
    .bind(runner.0)
    .bind(max)
    .bind(lease.as_millis() as i64)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows.into_iter().map(claimed_job).collect())
}

fn claimed_job(row: (i64, i32, Uuid, String, Value, Option<i64>)) -> ClaimedJob {
    let (id, attempt, token, queue, spec, timeout_ms) = row;
    ClaimedJob {
        id: JobId(id),
        attempt: Attempt(attempt),
        lease_token: LeaseToken(token),
        queue,
        spec,
        timeout_ms,
    }
}

/// The query plan of the claim, for tests and `sluice bench` to check that it stays an index
/// scan however many finished jobs the table holds.
pub async fn explain_claim(pool: &PgPool) -> Result<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(concat!("EXPLAIN ", claim_sql!()))
        .bind(Uuid::nil())
        .bind(10i32)
        .bind(30_000i64)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|(line,)| line).collect())
}

/// Extends the listed leases that `runner` still holds and records that the runner is alive,
/// in one statement. Returns, per listed lease in order, whether it was renewed and if not why.
/// A renewal rewrites only `lease_expires_at`, which is in no index: a HOT update where the
/// page has room.
///
/// The same statement keeps the stops of this runner's attempts (`sluice.attempt_stops`): a
/// stopped attempt it still lists has heard its order; one it no longer lists after that is
/// gone, and a retry of its job waiting for that may start.
pub async fn renew_leases_if_held(
    pool: &PgPool,
    runner: RunnerId,
    leases: &[LeaseRef],
    heartbeat_seq: Option<i64>,
    lease: Duration,
) -> Result<Vec<LeaseEnd>> {
    let mut order: Vec<usize> = (0..leases.len()).collect();
    order.sort_by_key(|&i| (leases[i].job_id.0, leases[i].attempt.0));
    let ids: Vec<i64> = order.iter().map(|&i| leases[i].job_id.0).collect();
    let attempts: Vec<i32> = order.iter().map(|&i| leases[i].attempt.0).collect();
    let tokens: Vec<Uuid> = order.iter().map(|&i| leases[i].lease_token.0).collect();
    let rows: Vec<(i64, bool, bool, Option<String>)> = sqlx::query_as(
        "WITH listed AS (
             SELECT * FROM unnest($2::bigint[], $3::int[], $4::uuid[])
                 WITH ORDINALITY AS l(job_id, attempt, lease_token, ord)
         ), seen AS (
             UPDATE sluice.runners SET last_seen_at = now() WHERE id = $1
         ), held AS (
             -- The leases still held, as the snapshot shows them.
             SELECT j.id, j.attempt FROM sluice.jobs j JOIN listed l
               ON j.id = l.job_id AND j.attempt = l.attempt AND j.lease_token = l.lease_token
             WHERE j.runner_id = $1 AND j.state = 'running'
         ), locked AS (
             -- Those whose rows nobody else holds right now. A row another statement has
             -- locked (this runner's completion, a cancel, an outage extension) is skipped,
             -- never waited for: the heartbeat takes no part in a lock cycle.
             SELECT j.id FROM sluice.jobs j JOIN held h ON j.id = h.id AND j.attempt = h.attempt
             WHERE j.runner_id = $1 AND j.state = 'running'
             FOR UPDATE OF j SKIP LOCKED
         ), renewed AS (
             UPDATE sluice.jobs j
             SET lease_expires_at = now() + $5 * interval '1 millisecond'
             FROM locked k
             WHERE j.id = k.id
             RETURNING j.id AS job_id, j.attempt
         ), heard AS (
             -- Stopped attempts this runner still lists: it hears the order in this answer
             -- (the first such heartbeat's number is kept), and their tools may still be
             -- dying, so no retry starts within another lease term.
             UPDATE sluice.attempt_stops s
             SET heard_seq = coalesce(s.heard_seq, $6),
                 stop_by = greatest(s.stop_by, now() + $5 * interval '1 millisecond')
             FROM listed l
             WHERE s.runner_id = $1 AND s.job_id = l.job_id AND s.attempt = l.attempt
         ), confirmed AS (
             -- Stopped attempts a later heartbeat no longer lists: their tools are gone (a
             -- runner lists an attempt until its tool is dead).
             DELETE FROM sluice.attempt_stops s
             WHERE s.runner_id = $1 AND $6 > s.heard_seq
               AND NOT EXISTS (SELECT 1 FROM listed l
                               WHERE l.job_id = s.job_id AND l.attempt = s.attempt)
             RETURNING s.job_id, s.attempt
         ), released AS (
             -- A retry that waited for one of them may start now.
             UPDATE sluice.jobs j SET state = 'available', run_at = now()
             FROM confirmed c
             WHERE j.id = c.job_id AND j.attempt = c.attempt AND j.state = 'scheduled'
             RETURNING pg_notify('sluice_jobs', '')
         )
         -- Joins, not a subquery per listed lease (which scanned `renewed` once per row).
         SELECT l.ord, r.job_id IS NOT NULL, h.id IS NOT NULL, a.outcome
         FROM listed l
         LEFT JOIN renewed r ON r.job_id = l.job_id AND r.attempt = l.attempt
         LEFT JOIN held h ON h.id = l.job_id AND h.attempt = l.attempt
         LEFT JOIN sluice.job_attempts a
           ON a.job_id = l.job_id AND a.attempt = l.attempt
          AND a.lease_token = l.lease_token AND a.runner_id = $1
         ORDER BY l.ord",
    )
    // As for completion batches: a generic plan would join a long list quadratically.
    .persistent(leases.len() < CUSTOM_PLAN_FROM)
    .bind(runner.0)
    .bind(&ids)
    .bind(&attempts)
    .bind(&tokens)
    .bind(lease.as_millis() as i64)
    .bind(heartbeat_seq)
    .fetch_all(pool)
    .await?;
    // Each row names its place in the sorted list (`ord`, from 1): put each answer at its
    // lease's place. (The caller refuses a list naming an attempt twice.)
    let mut ends = vec![LeaseEnd::Lost; leases.len()];
    for (ord, renewed, held, outcome) in rows {
        let Some(&at) = usize::try_from(ord - 1).ok().and_then(|i| order.get(i)) else {
            continue;
        };
        ends[at] = match (renewed, held, outcome.as_deref()) {
            (true, _, _) => LeaseEnd::Renewed,
            (false, true, _) => LeaseEnd::Busy,
            (_, _, Some("cancelled")) => LeaseEnd::Cancelled,
            (_, _, Some("timed_out")) => LeaseEnd::TimedOut,
            _ => LeaseEnd::Lost,
        };
    }
    Ok(ends)
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

impl Completion<'_> {
    /// SHA-256 of the completion's body (outcome, output, error, retryable, final_seq) as
    /// canonical JSON: what tells a replay from a different completion of the same attempt.
    pub fn body_hash(&self) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let body = serde_json::json!({
            "outcome": outcome_name(self.outcome),
            "output": self.output,
            "error": self.error,
            "retryable": self.retryable,
            "final_seq": self.final_seq,
        });
        Sha256::digest(serde_json::to_vec(&body).unwrap_or_default()).to_vec()
    }
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
    complete_many_if_leased(pool, completion.runner, std::slice::from_ref(&completion))
        .await?
        .remove(0)
}

/// [`complete_if_leased`] for many attempts of one runner in one statement (one commit on
/// an autocommit connection): one result per completion, in order. The caller makes sure no
/// job appears twice.
pub async fn complete_many_if_leased(
    pool: &PgPool,
    runner: RunnerId,
    completions: &[Completion<'_>],
) -> Result<Vec<Result<JobState>>> {
    Ok(
        complete_and_claim(pool, runner, completions, 0, Duration::ZERO)
            .await?
            .0,
    )
}

/// Completion batches from this size on are planned for their size on every execution (see
/// [`complete_and_claim`]).
const CUSTOM_PLAN_FROM: usize = 32;

/// Applies `completions` (as [`complete_if_leased`]) and leases up to `max` more jobs (as
/// [`claim_available`]) in one statement: a runner refilling the slots it just freed pays one
/// round trip and one commit for both. With `max` 0 it only completes.
pub async fn complete_and_claim(
    pool: &PgPool,
    runner: RunnerId,
    completions: &[Completion<'_>],
    max: i32,
    lease: Duration,
) -> Result<(Vec<Result<JobState>>, Vec<ClaimedJob>)> {
    if completions.is_empty() {
        let claimed = if max > 0 {
            claim_available(pool, runner, max, lease).await?
        } else {
            Vec::new()
        };
        return Ok((Vec::new(), claimed));
    }
    // In job order, as renewals lock them (see renew_leases_if_held); results are matched
    // by (job, attempt) below.
    let mut sorted: Vec<&Completion> = completions.iter().collect();
    sorted.sort_by_key(|c| (c.job.0, c.attempt.0));
    let ids: Vec<i64> = sorted.iter().map(|c| c.job.0).collect();
    let attempts: Vec<i32> = sorted.iter().map(|c| c.attempt.0).collect();
    let tokens: Vec<Uuid> = sorted.iter().map(|c| c.lease_token.0).collect();
    let outcomes: Vec<&str> = sorted.iter().map(|c| outcome_name(c.outcome)).collect();
    let outputs: Vec<&Value> = sorted.iter().map(|c| c.output).collect();
    let errors: Vec<Option<&Value>> = sorted.iter().map(|c| c.error.as_ref()).collect();
    let retryable: Vec<bool> = sorted.iter().map(|c| c.retryable).collect();
    let backoffs: Vec<i64> = sorted
        .iter()
        .map(|c| c.retry_backoff.as_millis() as i64)
        .collect();
    let final_seqs: Vec<Option<i64>> = sorted.iter().map(|c| c.final_seq).collect();
    let hashes: Vec<Vec<u8>> = sorted.iter().map(|c| c.body_hash()).collect();
    type Row = (
        bool,
        i64,
        i32,
        Option<Uuid>,
        Option<String>,
        Option<Value>,
        Option<i64>,
        Option<String>,
    );
    // A cached generic plan, which Postgres adopts after a few executions on a connection,
    // joins the completions to this runner's running jobs with a nested loop over the
    // unnested arrays (it assumes 10 elements): quadratic, 95 ms instead of 9 ms for 500. A
    // large batch therefore goes as an unnamed statement, planned for its real size each time
    // (about 0.7 ms of planning); a small one keeps the prepared statement and no planning.
    let rows: Vec<Row> = sqlx::query_as(complete_and_claim_sql!())
        .persistent(completions.len() < CUSTOM_PLAN_FROM)
        .bind(runner.0)
        .bind(max)
        .bind(lease.as_millis() as i64)
        .bind(&ids)
        .bind(&attempts)
        .bind(&tokens)
        .bind(&outcomes)
        .bind(&outputs)
        .bind(&errors)
        .bind(&retryable)
        .bind(&backoffs)
        .bind(&final_seqs)
        .bind(&hashes)
        .fetch_all(pool)
        .await?;
    let mut states: HashMap<(i64, i32), JobState> = HashMap::with_capacity(completions.len());
    let mut claimed = Vec::new();
    for (done, id, attempt, token, queue, spec, timeout_ms, state) in rows {
        if done {
            states.insert(
                (id, attempt),
                parse_state(state.as_deref().unwrap_or_default())?,
            );
        } else {
            claimed.push(claimed_job((
                id,
                attempt,
                token.unwrap_or_default(),
                queue.unwrap_or_default(),
                spec.unwrap_or_default(),
                timeout_ms,
            )));
        }
    }
    let key = |c: &Completion| (c.job.0, c.attempt.0);
    let missed: Vec<&Completion> = completions
        .iter()
        .filter(|c| !states.contains_key(&key(c)))
        .collect();
    // Not applied: either repeats of completions that were, or stale attempts.
    /// How an attempt this runner completed ended: outcome, body hash, the job's state now.
    type Recorded = (String, Option<Vec<u8>>, String);
    let mut replays: HashMap<(i64, i32), Recorded> = HashMap::new();
    if !missed.is_empty() {
        type Row = (i64, i32, String, Option<Vec<u8>>, String);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT a.job_id, a.attempt, a.outcome, a.completion_hash, j.state::text
             FROM unnest($2::bigint[], $3::int[], $4::uuid[]) AS i(job_id, attempt, lease_token)
             JOIN sluice.job_attempts a
               ON a.job_id = i.job_id AND a.attempt = i.attempt
              AND a.lease_token = i.lease_token AND a.runner_id = $1
             JOIN sluice.jobs j ON j.id = a.job_id",
        )
        .bind(runner.0)
        .bind(missed.iter().map(|c| c.job.0).collect::<Vec<_>>())
        .bind(missed.iter().map(|c| c.attempt.0).collect::<Vec<_>>())
        .bind(missed.iter().map(|c| c.lease_token.0).collect::<Vec<_>>())
        .fetch_all(pool)
        .await?;
        replays.extend(
            rows.into_iter()
                .map(|(id, attempt, o, h, s)| ((id, attempt), (o, h, s))),
        );
    }
    let completed = completions
        .iter()
        .map(|c| {
            if let Some(state) = states.get(&key(c)) {
                return Ok(*state);
            }
            match replays.get(&key(c)) {
                // The attempt ended by this runner's completion: a repeat of that completion
                // is answered like the first one, a different body is a conflict (F-13).
                Some((outcome, hash, state)) if outcome == "succeeded" || outcome == "failed" => {
                    let same = match hash {
                        Some(hash) => *hash == c.body_hash(),
                        // Recorded before migration 0004: the outcome is all there is.
                        None => outcome == outcome_name(c.outcome),
                    };
                    if same {
                        parse_state(state)
                    } else {
                        Err(Error::Conflict(format!(
                            "attempt {} of job {} was already completed with a different result",
                            c.attempt, c.job
                        )))
                    }
                }
                // Ended otherwise (cancelled, timed out, reclaimed) or never this runner's.
                _ => Err(Error::LeaseLost),
            }
        })
        .collect();
    Ok((completed, claimed))
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

/// A job whose runner vanished this many times fails as `runner_lost` (a poison pill that
/// kills its runner must not take down runner after runner).
pub const MAX_RUNNER_LOSSES: i64 = 3;

/// Ends up to `limit` expired leases: the job becomes `available` again, or `failed` when that
/// was its last attempt (`lease_expired`) or its runner was lost [`MAX_RUNNER_LOSSES`] times
/// (`runner_lost`). `SKIP LOCKED` keeps two reapers (or a reaper and a completing runner) from
/// acting on one lease; the `state = 'running'` guard (re-checked on the locked row) keeps a
/// finished attempt or a terminal job from changing.
pub async fn reclaim_expired(conn: &mut PgConnection, limit: i64) -> Result<ReclaimReport> {
    let (requeued, failed): (i64, i64) = sqlx::query_as(
        "WITH expired AS (
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
         FROM reclaimed",
    )
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
    let result = sqlx::query(
        "WITH expired AS (
             -- Rows another statement holds (a completion ending the attempt) are skipped:
             -- this never waits, so it never joins a lock cycle.
             SELECT id FROM sluice.jobs
             WHERE state = 'running' AND lease_expires_at < now()
             FOR UPDATE SKIP LOCKED
         ), stops AS (
             -- The same for attempts stopped before the outage whose runners could not
             -- confirm the stop meanwhile: their retries keep waiting another term.
             UPDATE sluice.attempt_stops
             SET stop_by = greatest(stop_by, now() + $1 * interval '1 millisecond')
             RETURNING job_id
         ), waiting AS (
             UPDATE sluice.jobs j
             SET run_at = greatest(j.run_at, now() + $1 * interval '1 millisecond')
             FROM stops s
             WHERE j.id = s.job_id AND j.state = 'scheduled'
         )
         UPDATE sluice.jobs j
         SET lease_expires_at = now() + $1 * interval '1 millisecond'
         FROM expired e
         WHERE j.id = e.id AND j.state = 'running'",
    )
    .bind(lease.as_millis() as i64)
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// Fails up to `limit` running jobs that are past their `timeout_ms` (measured from the
/// attempt's start, in database time) as `timed_out`. Their runners learn it from the next
/// heartbeat and kill the tool, even if they never report back. Returns how many.
pub async fn fail_overdue(conn: &mut PgConnection, limit: i64) -> Result<u64> {
    let (count,): (i64,) = sqlx::query_as(
        "WITH overdue AS (
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
         SELECT count(*) FROM failed",
    )
    .bind(limit)
    .bind(sluice_protocol::bounds::MAX_TIMEOUT_MS as i64)
    .fetch_one(conn)
    .await?;
    Ok(count as u64)
}

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
    let row: Option<(String, bool)> = sqlx::query_as(
        "WITH target AS (
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
         SELECT t.state::text, EXISTS (SELECT 1 FROM cancelled) FROM target t",
    )
    .bind(id.0)
    .fetch_optional(pool)
    .await?;
    match row {
        None => Ok(None),
        Some((_, true)) => Ok(Some(CancelOutcome::Cancelled)),
        Some((state, false)) => Ok(Some(CancelOutcome::AlreadyFinished(parse_state(&state)?))),
    }
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
    let row: Option<(String,)> =
        sqlx::query_as("SELECT state::text FROM sluice.jobs WHERE id = $1 FOR UPDATE")
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
    let (after,): (String,) = sqlx::query_as(
        "WITH stopping AS (
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
         CROSS JOIN LATERAL (SELECT pg_notify('sluice_jobs', r.queue)) woke",
    )
    .bind(id.0)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Retried {
        before,
        after: parse_state(&after)?,
    }))
}

/// Forgets the stops whose attempts' leases have run out (no retry waits for those any more).
pub async fn forget_past_stops(conn: &mut PgConnection) -> Result<u64> {
    let result = sqlx::query("DELETE FROM sluice.attempt_stops WHERE stop_by < now()")
        .execute(conn)
        .await?;
    Ok(result.rows_affected())
}

/// Deletes up to `limit` finished jobs (with their attempts and events) older than their
/// queue's retention. Returns how many. Per queue, the cut-off is a range on the partial
/// `jobs_finished_idx`, so pruning never scans the table.
pub async fn prune_finished(conn: &mut PgConnection, limit: i64) -> Result<u64> {
    let result = sqlx::query(
        "DELETE FROM sluice.jobs
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
         )",
    )
    .bind(limit)
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
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

/// The attempts of a job, oldest first: the finished ones, then the running one (from the
/// job row, without outcome).
pub async fn list_attempts(pool: &PgPool, id: JobId) -> Result<Vec<AttemptView>> {
    Ok(sqlx::query_as(
        "SELECT attempt, runner_id, started_at, finished_at, outcome, error
         FROM sluice.job_attempts WHERE job_id = $1
         UNION ALL
         SELECT attempt, runner_id, started_at, NULL, NULL, NULL
         FROM sluice.jobs WHERE id = $1 AND state = 'running'
         ORDER BY attempt",
    )
    .bind(id.0)
    .fetch_all(pool)
    .await?)
}
