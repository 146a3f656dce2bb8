//! Completions: a runner's report that attempts ended, applied while each attempt still
//! holds its lease, optionally with a claim for the slots they freed in the same statement.
//! A repeat of an applied completion is answered like the first; a different body for the
//! same attempt is a conflict.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use sluice_protocol::{Attempt, JobId, JobState, LeaseToken, Outcome, RunnerId};
use sqlx::PgPool;
use uuid::Uuid;

use super::claim::{claim_available, claimed_job, ClaimedJob};
use super::parse_state;
use crate::{Error, Result};

/// Applies completions and leases up to $2 more jobs in one statement, so one commit (and one
/// round trip) serves a runner that reports finished attempts and refills their slots. Each
/// completion (parallel arrays $4..$13) applies only while its attempt holds the lease of
/// runner $1: `succeeded`; a retryable failure with attempts left `scheduled` after its
/// back-off; else `failed`; the finished attempt is recorded with its body's hash. The claim
/// part is [`super::CLAIM`]'s (lease $3 ms). The snapshot is shared: the completions only touch
/// `running` rows and the claim only `available` ones. Rows come back as `(done, …)`: the
/// applied completions first, then the leased jobs in claim order.
pub const COMPLETE_AND_CLAIM: &str = "WITH input AS (
        SELECT * FROM unnest($4::bigint[], $5::int[], $6::uuid[], $7::text[],
                             $8::jsonb[], $9::jsonb[], $10::bool[], $11::float8[],
                             $12::bigint[], $13::bytea[])
            AS i(job_id, attempt, lease_token, outcome, output, error,
                 retryable, jitter, final_seq, completion_hash)
    ), done AS (
        -- The lease guard is in this UPDATE's own WHERE, so a row that another
        -- statement changed meanwhile is re-checked on its new version before it is
        -- written (no separate row lock needed). A failure is retried when it may be and
        -- attempts are left: `scheduled` after the back-off of the job's retry policy (its
        -- queue's when it names none; looked up only for such failures).
        UPDATE sluice.jobs j
        SET state = CASE
                WHEN i.outcome = 'succeeded' THEN 'succeeded'
                WHEN i.retryable AND j.attempt < j.max_attempts THEN 'scheduled'
                ELSE 'failed' END::sluice.job_state,
            result = i.output,
            error = i.error,
            run_at = CASE
                WHEN i.outcome <> 'succeeded' AND i.retryable AND j.attempt < j.max_attempts
                THEN now() + sluice.retry_delay_ms(
                    j.attempt,
                    coalesce(j.retry,
                             (SELECT q.default_retry FROM sluice.queues q WHERE q.name = j.queue)),
                    i.jitter) * interval '1 millisecond'
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
    ), picked AS (
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
    SELECT done, id, attempt, lease_token, queue, spec, timeout_ms, context, workflow_run_id,
           step_id, state, outcome, seconds FROM (
        -- `seconds`: how long the attempt ran (done), how long the job waited once it
        -- could be claimed (claimed).
        SELECT true AS done, id, attempt, NULL::uuid AS lease_token, NULL::text AS queue,
               NULL::jsonb AS spec, NULL::bigint AS timeout_ms, NULL::jsonb AS context,
               NULL::bigint AS workflow_run_id, NULL::text AS step_id, state::text AS state,
               outcome, extract(epoch FROM now() - started_at)::float8 AS seconds,
               NULL::int AS priority, NULL::timestamptz AS run_at
        FROM done
        UNION ALL
        SELECT false, id, attempt, lease_token, queue, spec, timeout_ms, context,
               workflow_run_id, step_id, NULL, NULL,
               greatest(extract(epoch FROM now() - run_at)::float8, 0), priority, run_at
        FROM claimed
    ) r
    ORDER BY done DESC, priority, run_at, id";

/// How attempts of runner $1 that a completion did not apply ended (parallel arrays $2 jobs,
/// $3 attempts, $4 lease tokens): a replay, or a stale attempt.
pub const RECORDED_COMPLETIONS: &str =
    "SELECT a.job_id, a.attempt, a.outcome, a.completion_hash, j.state::text
    FROM unnest($2::bigint[], $3::int[], $4::uuid[]) AS i(job_id, attempt, lease_token)
    JOIN sluice.job_attempts a
      ON a.job_id = i.job_id AND a.attempt = i.attempt
     AND a.lease_token = i.lease_token AND a.runner_id = $1
    JOIN sluice.jobs j ON j.id = a.job_id";

pub(super) const STATEMENTS: &[(&str, &str)] = &[
    ("COMPLETE_AND_CLAIM", COMPLETE_AND_CLAIM),
    ("RECORDED_COMPLETIONS", RECORDED_COMPLETIONS),
];

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
    /// When the attempt failed and may be retried: the factor (0.75–1.25) its retry
    /// policy's wait is multiplied by, so a burst of failures does not retry in lock step.
    pub retry_jitter: f64,
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
        .0
        .remove(0)
}

/// An attempt a completion statement ended: how, and after how long (for metrics).
#[derive(Debug, Clone, Copy)]
pub struct AttemptEnded {
    pub succeeded: bool,
    pub seconds: f64,
}

/// [`complete_if_leased`] for many attempts of one runner in one statement (one commit on
/// an autocommit connection): one result per completion, in order. The caller makes sure no
/// job appears twice.
pub async fn complete_many_if_leased(
    pool: &PgPool,
    runner: RunnerId,
    completions: &[Completion<'_>],
) -> Result<(Vec<Result<JobState>>, Vec<AttemptEnded>)> {
    let (completed, _, ended) =
        complete_and_claim(pool, runner, completions, 0, Duration::ZERO).await?;
    Ok((completed, ended))
}

/// Completion batches from this size on are planned for their size on every execution (see
/// [`complete_and_claim`]).
pub(super) const CUSTOM_PLAN_FROM: usize = 32;

/// Applies `completions` (as [`complete_if_leased`]) and leases up to `max` more jobs (as
/// [`claim_available`]) in one statement: a runner refilling the slots it just freed pays one
/// round trip and one commit for both. With `max` 0 it only completes.
pub async fn complete_and_claim(
    pool: &PgPool,
    runner: RunnerId,
    completions: &[Completion<'_>],
    max: i32,
    lease: Duration,
) -> Result<(Vec<Result<JobState>>, Vec<ClaimedJob>, Vec<AttemptEnded>)> {
    if completions.is_empty() {
        let claimed = if max > 0 {
            claim_available(pool, runner, max, lease).await?
        } else {
            Vec::new()
        };
        return Ok((Vec::new(), claimed, Vec::new()));
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
    let jitters: Vec<f64> = sorted.iter().map(|c| c.retry_jitter).collect();
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
        Option<Value>,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<f64>,
    );
    // A cached generic plan, which Postgres adopts after a few executions on a connection,
    // joins the completions to this runner's running jobs with a nested loop over the
    // unnested arrays (it assumes 10 elements): quadratic, 95 ms instead of 9 ms for 500. A
    // large batch therefore goes as an unnamed statement, planned for its real size each time
    // (about 0.7 ms of planning); a small one keeps the prepared statement and no planning.
    let rows: Vec<Row> = sqlx::query_as(COMPLETE_AND_CLAIM)
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
        .bind(&jitters)
        .bind(&final_seqs)
        .bind(&hashes)
        .fetch_all(pool)
        .await?;
    let mut states: HashMap<(i64, i32), JobState> = HashMap::with_capacity(completions.len());
    let mut claimed = Vec::new();
    let mut ended = Vec::new();
    for (
        done,
        id,
        attempt,
        token,
        queue,
        spec,
        timeout_ms,
        context,
        run,
        step,
        state,
        outcome,
        seconds,
    ) in rows
    {
        if done {
            let state = parse_state(state.as_deref().unwrap_or_default())?;
            states.insert((id, attempt), state);
            ended.push(AttemptEnded {
                succeeded: outcome.as_deref() == Some("succeeded"),
                seconds: seconds.unwrap_or_default(),
            });
        } else {
            claimed.push(claimed_job((
                id,
                attempt,
                token.unwrap_or_default(),
                queue.unwrap_or_default(),
                spec.unwrap_or_default(),
                timeout_ms,
                context,
                run,
                step,
                seconds.unwrap_or_default(),
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
        let rows: Vec<Row> = sqlx::query_as(RECORDED_COMPLETIONS)
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
    Ok((completed, claimed, ended))
}
