//! Workflow runs (`sluice.workflow_runs`, `sluice.run_steps`): started, read, listed and
//! cancelled here; advanced by the schema itself when their step jobs end (see
//! `sql/0007_workflow_runs.sql`), in the same transaction as whatever ended them.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use crate::{Error, Result};

/// Starts a run of version $3 (NULL: the current one) of workflow $1 with input $2; answers
/// its id.
pub const START_RUN: &str = "SELECT sluice.run_workflow($1, $2, $3)";

/// The version run $1 pinned.
pub const RUN_VERSION: &str = "SELECT version FROM sluice.workflow_runs WHERE id = $1";

/// Run $1.
pub const GET_RUN: &str = "SELECT id, workflow, version, state::text AS state, input, error,
           created_at, finished_at
    FROM sluice.workflow_runs WHERE id = $1";

/// The steps of run $1 in the definition's order (the failure step last), each with its jobs
/// as `[{"id", "index", "state", "attempt"}]`.
pub const RUN_STEPS: &str = "SELECT s.step_id, s.state, s.output, s.position, s.started_at,
           s.finished_at,
           coalesce((SELECT jsonb_agg(jsonb_build_object('id', j.id, 'index', j.step_index,
                                                         'state', j.state, 'attempt', j.attempt)
                                      ORDER BY j.step_index, j.id)
                     FROM sluice.jobs j
                     WHERE j.workflow_run_id = s.run_id AND j.step_id = s.step_id),
                    '[]'::jsonb) AS jobs
    FROM sluice.run_steps s WHERE s.run_id = $1
    ORDER BY s.position < 0, s.position";

/// Runs newest first, of workflow $1 and in state $2 when given, with ids below $3, at most
/// $4.
pub const LIST_RUNS: &str =
    "SELECT id, workflow, version, state::text AS state, created_at, finished_at
    FROM sluice.workflow_runs
    WHERE ($1::text IS NULL OR workflow = $1)
      AND ($2::text IS NULL OR state::text = $2)
      AND ($3::bigint IS NULL OR id < $3)
    ORDER BY id DESC
    LIMIT $4";

/// Cancels run $1 if it is running; answers its state now (NULL: no such run).
pub const CANCEL_RUN: &str = "SELECT sluice.cancel_run($1)::text";

/// The contexts of steps (parallel arrays $1 runs, $2 steps), as they were released.
pub const STEP_CONTEXTS: &str = "SELECT s.run_id, s.step_id, s.context, s.plan -> 'artifacts'
    FROM sluice.run_steps s
    JOIN unnest($1::bigint[], $2::text[]) AS k(run_id, step_id)
      ON s.run_id = k.run_id AND s.step_id = k.step_id";

/// Every statement of this module, for the test that prepares them all.
pub fn statements() -> impl Iterator<Item = (&'static str, &'static str)> {
    [
        ("START_RUN", START_RUN),
        ("GET_RUN", GET_RUN),
        ("RUN_STEPS", RUN_STEPS),
        ("LIST_RUNS", LIST_RUNS),
        ("CANCEL_RUN", CANCEL_RUN),
        ("RUN_VERSION", RUN_VERSION),
        ("STEP_CONTEXTS", STEP_CONTEXTS),
        ("PRUNE_RUNS", PRUNE_RUNS),
    ]
    .into_iter()
}

/// A run row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunRow {
    pub id: i64,
    pub workflow: String,
    pub version: String,
    pub state: String,
    pub input: Value,
    pub error: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A step row with its jobs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StepRow {
    pub step_id: String,
    pub state: String,
    pub output: Option<Value>,
    pub position: i32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub jobs: Value,
}

/// A run in a list.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunSummaryRow {
    pub id: i64,
    pub workflow: String,
    pub version: String,
    pub state: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Starts a run; its id and the version it pinned. `NotFound` when there is no such workflow
/// (or version).
pub async fn start(
    pool: &PgPool,
    workflow: &str,
    input: &Value,
    version: Option<&str>,
) -> Result<(i64, String)> {
    let id: i64 = sqlx::query_scalar(START_RUN)
        .bind(workflow)
        .bind(input)
        .bind(version)
        .fetch_one(pool)
        .await
        .map_err(|err| match &err {
            // Raised by sluice.run_workflow.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("P0002") => {
                Error::NotFound("workflow")
            }
            sqlx::Error::Database(db) if db.code().as_deref() == Some("55000") => {
                Error::Conflict(db.message().trim_start_matches("sluice: ").to_string())
            }
            _ => err.into(),
        })?;
    let version = sqlx::query_scalar(RUN_VERSION)
        .bind(id)
        .fetch_one(pool)
        .await?;
    Ok((id, version))
}

/// The contexts the given steps were released with, by (run, step).
pub async fn step_contexts(
    pool: &PgPool,
    steps: &[(i64, String)],
) -> Result<std::collections::HashMap<(i64, String), StepView>> {
    let runs: Vec<i64> = steps.iter().map(|(run, _)| *run).collect();
    let ids: Vec<&str> = steps.iter().map(|(_, step)| step.as_str()).collect();
    let rows: Vec<(i64, String, Option<Value>, Option<Value>)> = sqlx::query_as(STEP_CONTEXTS)
        .bind(&runs)
        .bind(&ids)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(run, step, context, artifacts)| {
            let collect = artifacts
                .and_then(|a| serde_json::from_value(a).ok())
                .unwrap_or_default();
            ((run, step), StepView { context, collect })
        })
        .collect())
}

/// What a claimed step's jobs are handed: its context and the globs of its artifacts.
#[derive(Debug, Clone, Default)]
pub struct StepView {
    pub context: Option<Value>,
    pub collect: Vec<String>,
}

/// A run and its steps.
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<(RunRow, Vec<StepRow>)>> {
    let Some(run) = sqlx::query_as::<_, RunRow>(GET_RUN)
        .bind(id)
        .fetch_optional(pool)
        .await?
    else {
        return Ok(None);
    };
    let steps = sqlx::query_as(RUN_STEPS).bind(id).fetch_all(pool).await?;
    Ok(Some((run, steps)))
}

/// Runs newest first.
pub async fn list(
    pool: &PgPool,
    workflow: Option<&str>,
    state: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<RunSummaryRow>> {
    Ok(sqlx::query_as(LIST_RUNS)
        .bind(workflow)
        .bind(state)
        .bind(before)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// Cancels a running run; its state now, `None` when there is no such run.
pub async fn cancel(pool: &PgPool, id: i64) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(CANCEL_RUN)
        .bind(id)
        .fetch_one(pool)
        .await?)
}

/// Deletes up to `$2` finished runs (with their steps and artifacts) finished more than `$1`
/// seconds ago, oldest first.
pub const PRUNE_RUNS: &str = "DELETE FROM sluice.workflow_runs WHERE id IN (
        SELECT id FROM sluice.workflow_runs r
        WHERE finished_at < now() - make_interval(secs => $1)
          -- Their artifacts go first, a bounded batch at a time.
          AND NOT EXISTS (SELECT 1 FROM sluice.artifact_chunks c WHERE c.run_id = r.id)
        ORDER BY finished_at LIMIT $2
        FOR UPDATE SKIP LOCKED)";

/// Deletes up to `limit` runs finished more than `retention_secs` ago; how many.
pub async fn prune_runs(
    conn: &mut sqlx::PgConnection,
    retention_secs: f64,
    limit: i64,
) -> Result<u64> {
    Ok(sqlx::query(PRUNE_RUNS)
        .bind(retention_secs)
        .bind(limit)
        .execute(conn)
        .await?
        .rows_affected())
}
