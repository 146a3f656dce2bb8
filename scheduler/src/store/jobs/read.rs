//! Reads for the public API: a job, and its attempts.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sluice_protocol::{JobId, JobState};
use sqlx::PgPool;
use uuid::Uuid;

use crate::Result;

/// Job $1.
pub const GET_JOB: &str =
    "SELECT id, queue, state::text AS state, spec, priority, attempt, max_attempts,
           timeout_ms, idempotency_key, retry, result, error, run_at, created_at, started_at,
           finished_at
    FROM sluice.jobs WHERE id = $1";

/// The attempts of job $1, oldest first: the finished ones, then the running one (from the
/// job row, without outcome).
pub const LIST_ATTEMPTS: &str = "SELECT attempt, runner_id, started_at, finished_at, outcome, error
    FROM sluice.job_attempts WHERE job_id = $1
    UNION ALL
    SELECT attempt, runner_id, started_at, NULL, NULL, NULL
    FROM sluice.jobs WHERE id = $1 AND state = 'running'
    ORDER BY attempt";

/// How many jobs each queue holds in each state (for metrics).
pub const COUNT_BY_QUEUE_AND_STATE: &str =
    "SELECT queue, state::text, count(*) FROM sluice.jobs GROUP BY queue, state";

/// Jobs newest first, filtered by queue $1, state $2, created at or after $3 (each when not
/// null), with ids below $4, at most $5.
pub const LIST_JOBS: &str = "SELECT id, queue, state::text AS state, spec ->> 'kind' AS kind,
           priority, attempt, max_attempts, workflow_run_id, run_at, created_at, finished_at
    FROM sluice.jobs
    WHERE ($1::text IS NULL OR queue = $1)
      AND ($2::text IS NULL OR state = $2::sluice.job_state)
      AND ($3::timestamptz IS NULL OR created_at >= $3)
      AND id < $4
    ORDER BY id DESC
    LIMIT $5";

pub(super) const STATEMENTS: &[(&str, &str)] = &[
    ("GET_JOB", GET_JOB),
    ("LIST_JOBS", LIST_JOBS),
    ("LIST_ATTEMPTS", LIST_ATTEMPTS),
    ("COUNT_BY_QUEUE_AND_STATE", COUNT_BY_QUEUE_AND_STATE),
];

/// A job as a list shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobListRow {
    pub id: i64,
    pub queue: String,
    pub state: String,
    pub kind: Option<String>,
    pub priority: i32,
    pub attempt: i32,
    pub max_attempts: i32,
    pub workflow_run_id: Option<i64>,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What a job list is filtered by.
#[derive(Debug, Clone, Default)]
pub struct JobFilter<'a> {
    pub queue: Option<&'a str>,
    pub state: Option<JobState>,
    pub since: Option<DateTime<Utc>>,
    pub before: Option<i64>,
}

/// [`LIST_JOBS`].
pub async fn list(pool: &PgPool, filter: &JobFilter<'_>, limit: i64) -> Result<Vec<JobListRow>> {
    Ok(sqlx::query_as(LIST_JOBS)
        .bind(filter.queue)
        .bind(filter.state.map(|s| s.as_str()))
        .bind(filter.since)
        .bind(filter.before.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// [`COUNT_BY_QUEUE_AND_STATE`], given at most two seconds (a scrape must not pile up work on
/// a huge table).
pub async fn count_by_queue_and_state(pool: &PgPool) -> Result<Vec<(String, String, i64)>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL statement_timeout = 2000")
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query_as(COUNT_BY_QUEUE_AND_STATE)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows)
}

/// A job row as the public API shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
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
    pub retry: Option<Value>,
    pub result: Option<Value>,
    pub error: Option<Value>,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One attempt of a job, as the public API shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
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
    Ok(sqlx::query_as(GET_JOB)
        .bind(id.0)
        .fetch_optional(pool)
        .await?)
}

/// The attempts of a job, oldest first: the finished ones, then the running one (from the
/// job row, without outcome).
pub async fn list_attempts(pool: &PgPool, id: JobId) -> Result<Vec<AttemptView>> {
    Ok(sqlx::query_as(LIST_ATTEMPTS)
        .bind(id.0)
        .fetch_all(pool)
        .await?)
}
