//! The per-attempt event stream (`sluice.job_events`), keyed by `(job_id, attempt, seq)` so
//! that a retried or duplicated POST stores each event once.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sluice_protocol::{Attempt, Event, JobId, LeaseToken, RunnerId};
use sqlx::PgPool;

use crate::{Error, Result};

/// The append (see [`append_if_leased`]). Two things besides the fenced insert:
///
/// - It takes a transaction-scoped advisory lock on the stream the events belong to (the
///   run's, for a workflow step; the job's otherwise) before any row is inserted — `accepted`
///   joins `locked`, so no `position` is drawn before the lock is held — and keeps it until
///   commit. Within one stream, rows therefore commit in `position` order, and a reader that
///   has seen position P has seen every row of that stream below P: resuming "after P" (an
///   SSE `Last-Event-ID`) can skip nothing that commits later.
/// - It notifies `sluice_events` ('<job> <run>') when it stored something; the notification
///   is delivered at commit.
pub const APPEND: &str = "WITH lease AS (
         -- The running attempt (on the job row) or a completed one (in its history).
         SELECT true AS running, NULL::bigint AS final_seq, j.workflow_run_id AS run
         FROM sluice.jobs j
         WHERE j.id = $1 AND j.attempt = $2 AND j.lease_token = $3 AND j.runner_id = $4
           AND j.state = 'running'
         UNION ALL
         SELECT false, a.final_seq, (SELECT j.workflow_run_id FROM sluice.jobs j WHERE j.id = $1)
         FROM sluice.job_attempts a
         WHERE a.job_id = $1 AND a.attempt = $2 AND a.lease_token = $3 AND a.runner_id = $4
           AND a.outcome IN ('succeeded', 'failed')
     ), locked AS (
         SELECT count(*) AS n FROM (
             SELECT pg_advisory_xact_lock(hashtext('sluice.events'),
                        hashtext(coalesce('r' || run::text, 'j' || $1::text)))
             FROM lease LIMIT 1
         ) l
     ), accepted AS (
         -- A completed attempt's stream ends at its final_seq (none: it is closed).
         SELECT e.seq, e.kind, e.data
         FROM unnest($5::bigint[], $6::text[], $7::jsonb[]) AS e(seq, kind, data), lease, locked
         WHERE lease.running OR e.seq <= lease.final_seq
     ), stored AS (
         INSERT INTO sluice.job_events (job_id, attempt, seq, kind, data)
         SELECT $1, $2, seq, kind, data FROM accepted
         ORDER BY seq
         ON CONFLICT DO NOTHING
         RETURNING 1
     ), notified AS (
         SELECT pg_notify('sluice_events', $1::text || ' ' || coalesce(run::text, ''))
         FROM (SELECT run FROM lease LIMIT 1) l
         WHERE EXISTS (SELECT 1 FROM stored)
     )
     SELECT (SELECT count(*) FROM lease), (SELECT count(*) FROM accepted),
            (SELECT count(*) FROM stored) + 0 * (SELECT count(*) FROM notified)";

/// Stores the events of one attempt if the runner holds (or held, and completed) that
/// attempt's lease. Events of a completed attempt are accepted only up to its `final_seq`; a
/// completion without one closed the stream. Returns how many were new (events past the end
/// are left out); errors with [`Error::LeaseLost`] for anyone else, and when every event of
/// the batch lies past the end of a completed attempt's stream.
pub async fn append_if_leased(
    pool: &PgPool,
    runner: RunnerId,
    job: JobId,
    attempt: Attempt,
    lease_token: LeaseToken,
    events: &[Event],
) -> Result<u64> {
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let data: Vec<&Value> = events.iter().map(|e| &e.data).collect();
    let (leased, accepted, stored): (i64, i64, i64) = sqlx::query_as(APPEND)
        .bind(job.0)
        .bind(attempt.0)
        .bind(lease_token.0)
        .bind(runner.0)
        .bind(&seqs)
        .bind(&kinds)
        .bind(&data)
        .fetch_one(pool)
        .await?;
    // A batch with nothing left to store for a finished attempt is refused like a stale
    // one; one that still held events up to final_seq is answered with what was stored.
    if leased == 0 || (accepted == 0 && !events.is_empty()) {
        return Err(Error::LeaseLost);
    }
    Ok(stored as u64)
}

/// One stored event, as the public API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StoredEvent {
    pub position: i64,
    pub attempt: i32,
    pub seq: i64,
    pub kind: String,
    pub data: Value,
    pub at: DateTime<Utc>,
}

/// Events of a job after `after_position`, in stream order, at most `limit`.
pub async fn list_after(
    pool: &PgPool,
    job: JobId,
    after_position: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>> {
    Ok(sqlx::query_as(
        "SELECT position, attempt, seq, kind, data, at FROM sluice.job_events
         WHERE job_id = $1 AND position > $2
         ORDER BY position
         LIMIT $3",
    )
    .bind(job.0)
    .bind(after_position)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// A stream of events a client can follow: one job's (all its attempts), or one workflow
/// run's (every step job's, tagged with the step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    Job(JobId),
    Run(i64),
}

/// One event of a [`Topic`], with where it came from.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TopicEvent {
    pub position: i64,
    pub job_id: i64,
    pub step_id: Option<String>,
    pub step_index: Option<i32>,
    pub attempt: i32,
    pub seq: i64,
    pub kind: String,
    pub data: Value,
    pub at: DateTime<Utc>,
}

const JOB_EVENTS_AFTER: &str = "SELECT e.position, e.job_id, j.step_id, j.step_index, e.attempt,
           e.seq, e.kind, e.data, e.at
    FROM sluice.job_events e JOIN sluice.jobs j ON j.id = e.job_id
    WHERE e.job_id = $1 AND e.position > $2
    ORDER BY e.position
    LIMIT $3";

const RUN_EVENTS_AFTER: &str = "SELECT e.position, e.job_id, j.step_id, j.step_index, e.attempt,
           e.seq, e.kind, e.data, e.at
    FROM sluice.jobs j JOIN sluice.job_events e ON e.job_id = j.id
    WHERE j.workflow_run_id = $1 AND e.position > $2
    ORDER BY e.position
    LIMIT $3";

/// A topic's events after `after`, in position order, at most `limit`.
pub async fn topic_after(
    pool: &PgPool,
    topic: Topic,
    after: i64,
    limit: i64,
) -> Result<Vec<TopicEvent>> {
    let (sql, key) = match topic {
        Topic::Job(job) => (JOB_EVENTS_AFTER, job.0),
        Topic::Run(run) => (RUN_EVENTS_AFTER, run),
    };
    Ok(sqlx::query_as(sql)
        .bind(key)
        .bind(after)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// The last position of a topic's events (0 when it has none); `None` when the job or run
/// does not exist.
pub async fn topic_head(pool: &PgPool, topic: Topic) -> Result<Option<i64>> {
    let sql = match topic {
        Topic::Job(_) => {
            "SELECT coalesce((SELECT max(e.position) FROM sluice.job_events e
                              WHERE e.job_id = j.id), 0)
             FROM sluice.jobs j WHERE j.id = $1"
        }
        Topic::Run(_) => {
            "SELECT coalesce((SELECT max(e.position) FROM sluice.jobs j
                              JOIN sluice.job_events e ON e.job_id = j.id
                              WHERE j.workflow_run_id = r.id), 0)
             FROM sluice.workflow_runs r WHERE r.id = $1"
        }
    };
    let key = match topic {
        Topic::Job(job) => job.0,
        Topic::Run(run) => run,
    };
    Ok(sqlx::query_scalar(sql)
        .bind(key)
        .fetch_optional(pool)
        .await?)
}

/// How a topic ended: the terminal state and a summary (`{"state", …}`) for its last event.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TopicEnd {
    pub state: String,
    pub summary: Value,
    /// Whether every event of the ended attempts is in: each attempt's stream reached its
    /// `final_seq`, or the end is old enough (5 s) that a missing tail is not coming.
    pub settled: bool,
}

const JOB_END: &str = "SELECT j.state::text AS state,
           jsonb_build_object('state', j.state, 'attempt', j.attempt, 'result', j.result,
                              'error', j.error, 'finished_at', j.finished_at) AS summary,
           (j.finished_at < now() - interval '5 seconds'
            OR NOT EXISTS (SELECT 1 FROM sluice.job_attempts a
                           WHERE a.job_id = j.id AND a.attempt = j.attempt
                             AND a.final_seq IS NOT NULL
                             AND NOT EXISTS (SELECT 1 FROM sluice.job_events e
                                             WHERE e.job_id = j.id AND e.attempt = a.attempt
                                               AND e.seq >= a.final_seq))) AS settled
    FROM sluice.jobs j
    WHERE j.id = $1 AND j.state IN ('succeeded', 'failed', 'cancelled')";

const RUN_END: &str = "SELECT r.state::text AS state,
           jsonb_build_object('state', r.state, 'error', r.error,
                              'finished_at', r.finished_at) AS summary,
           (r.finished_at < now() - interval '5 seconds'
            OR NOT EXISTS (SELECT 1 FROM sluice.jobs j
                           JOIN sluice.job_attempts a ON a.job_id = j.id AND a.attempt = j.attempt
                           WHERE j.workflow_run_id = r.id AND a.final_seq IS NOT NULL
                             AND NOT EXISTS (SELECT 1 FROM sluice.job_events e
                                             WHERE e.job_id = j.id AND e.attempt = a.attempt
                                               AND e.seq >= a.final_seq))) AS settled
    FROM sluice.workflow_runs r
    WHERE r.id = $1 AND r.state <> 'running'";

/// Of the jobs `jobs` and runs `runs`, those that have ended (ids).
pub async fn ended_among(pool: &PgPool, jobs: &[i64], runs: &[i64]) -> Result<Vec<Topic>> {
    let rows: Vec<(bool, i64)> = sqlx::query_as(
        "SELECT true, id FROM sluice.jobs
         WHERE id = ANY($1) AND state IN ('succeeded', 'failed', 'cancelled')
         UNION ALL
         SELECT false, id FROM sluice.workflow_runs WHERE id = ANY($2) AND state <> 'running'",
    )
    .bind(jobs)
    .bind(runs)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(job, id)| {
            if job {
                Topic::Job(JobId(id))
            } else {
                Topic::Run(id)
            }
        })
        .collect())
}

/// The topic's end, when its job or run is in a terminal state; `None` while it runs (or
/// when it does not exist).
pub async fn topic_end(pool: &PgPool, topic: Topic) -> Result<Option<TopicEnd>> {
    let (sql, key) = match topic {
        Topic::Job(job) => (JOB_END, job.0),
        Topic::Run(run) => (RUN_END, run),
    };
    Ok(sqlx::query_as(sql).bind(key).fetch_optional(pool).await?)
}
