//! Statements only `sluice bench` runs: the bare-SQL reference it measures sluice against
//! (its own table, `sluice_bench_reference`, which the product's schema does not know), the
//! user-facing plain INSERT enqueue path, and the probes that time a drain. The `PGBENCH_*`
//! scripts are the same references run by `pgbench`.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sluice::{Error, Result};
use sqlx::PgPool;

/// pgbench's single-row INSERT into the reference table (the one-by-one enqueue reference).
pub const PGBENCH_INSERT_ONE: &str =
    "INSERT INTO sluice_bench_reference (payload) VALUES ('{\"kind\":\"noop\"}');\n";

/// pgbench's 1,000-row INSERT into the reference table (the bulk enqueue reference).
pub const PGBENCH_INSERT_THOUSAND: &str = "INSERT INTO sluice_bench_reference (payload) \
     SELECT '{\"kind\":\"noop\"}'::jsonb FROM generate_series(1, 1000);\n";

/// pgbench's bare SKIP LOCKED drain: claim 100 reference rows and delete them (the limit of
/// any SKIP LOCKED queue on the server).
pub const PGBENCH_CLAIM_AND_DELETE: &str =
    "WITH picked AS (SELECT id FROM sluice_bench_reference ORDER BY id \
     LIMIT 100 FOR UPDATE SKIP LOCKED) \
     DELETE FROM sluice_bench_reference r USING picked WHERE r.id = picked.id;\n";

/// Creates (empty) the reference table: a bigserial key and a jsonb payload, nothing else.
pub async fn reset_reference_table(pool: &PgPool) -> Result<()> {
    sqlx::query("DROP TABLE IF EXISTS sluice_bench_reference")
        .execute(pool)
        .await?;
    sqlx::query(
        "CREATE TABLE sluice_bench_reference (id bigserial PRIMARY KEY, payload jsonb NOT NULL)",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Drops the reference table.
pub async fn drop_reference_table(pool: &PgPool) -> Result<()> {
    sqlx::query("DROP TABLE IF EXISTS sluice_bench_reference")
        .execute(pool)
        .await?;
    Ok(())
}

/// One bare single-row INSERT (the reference for one-by-one enqueue).
pub async fn insert_reference_one(pool: &PgPool, payload: &Value) -> Result<()> {
    sqlx::query("INSERT INTO sluice_bench_reference (payload) VALUES ($1)")
        .bind(payload)
        .execute(pool)
        .await?;
    Ok(())
}

/// One bare multi-row INSERT (the reference for bulk enqueue).
pub async fn insert_reference_many(pool: &PgPool, payloads: &[Value]) -> Result<()> {
    sqlx::query("INSERT INTO sluice_bench_reference (payload) SELECT unnest($1::jsonb[])")
        .bind(payloads)
        .execute(pool)
        .await?;
    Ok(())
}

/// The README's plain SQL enqueue: `INSERT INTO sluice.jobs (spec) VALUES (…)`.
pub async fn insert_job_plain(pool: &PgPool, spec: &Value) -> Result<()> {
    sqlx::query("INSERT INTO sluice.jobs (spec) VALUES ($1)")
        .bind(spec)
        .execute(pool)
        .await?;
    Ok(())
}

/// Many jobs in one plain multi-row INSERT.
pub async fn insert_jobs_plain_many(pool: &PgPool, specs: &[Value]) -> Result<()> {
    sqlx::query("INSERT INTO sluice.jobs (spec) SELECT unnest($1::jsonb[])")
        .bind(specs)
        .execute(pool)
        .await?;
    Ok(())
}

/// The same, naming `priority` and `max_attempts`: the insert trigger then has nothing to fill
/// in from the queue, and plain specs cost no trigger call at all.
pub async fn insert_jobs_named_many(pool: &PgPool, specs: &[Value]) -> Result<()> {
    sqlx::query(
        "INSERT INTO sluice.jobs (spec, priority, max_attempts) SELECT unnest($1::jsonb[]), 0, 3",
    )
    .bind(specs)
    .execute(pool)
    .await?;
    Ok(())
}

/// Empties the job tables between measurements.
pub async fn truncate_jobs(pool: &PgPool) -> Result<()> {
    sqlx::query("TRUNCATE sluice.jobs, sluice.job_attempts, sluice.job_events")
        .execute(pool)
        .await?;
    Ok(())
}

/// The last position of job `job`'s events (0 without any).
pub async fn last_event_position(pool: &PgPool, job: i64) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(max(position), 0) FROM sluice.job_events WHERE job_id = $1",
    )
    .bind(job)
    .fetch_one(pool)
    .await?)
}

/// Loads `count` finished jobs in one statement (history for the bloat measurement).
pub async fn insert_finished_jobs(pool: &PgPool, count: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO sluice.jobs (spec, state, attempt, started_at, finished_at, priority,
                                  max_attempts)
         SELECT '{\"kind\":\"noop\"}', 'succeeded', 1, now(), now(), 0, 3
         FROM generate_series(1, $1)",
    )
    .bind(count)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE sluice.jobs").execute(pool).await?;
    Ok(())
}

/// Inserts `count` copies of `spec` with the plain INSERT, in one statement (one commit);
/// returns the transaction id, for its commit timestamp.
pub async fn insert_jobs_plain_repeated(pool: &PgPool, spec: &Value, count: i64) -> Result<String> {
    let (xid,): (String,) = sqlx::query_as(
        "WITH inserted AS (
             INSERT INTO sluice.jobs (spec) SELECT $1 FROM generate_series(1, $2)
             RETURNING xmin
         )
         SELECT xmin::text FROM inserted LIMIT 1",
    )
    .bind(spec)
    .bind(count)
    .fetch_one(pool)
    .await?;
    Ok(xid)
}

/// Whether any job is still available or running (both are small partial-index lookups).
pub async fn any_unfinished(pool: &PgPool) -> Result<bool> {
    let (any,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM sluice.jobs WHERE state = 'available')
             OR EXISTS (SELECT 1 FROM sluice.jobs WHERE state = 'running')",
    )
    .fetch_one(pool)
    .await?;
    Ok(any)
}

/// The server's clock now.
pub async fn server_clock(pool: &PgPool) -> Result<DateTime<Utc>> {
    let (now,): (DateTime<Utc>,) = sqlx::query_as("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await?;
    Ok(now)
}

/// When the last finished job's completion committed (its commit timestamp; where
/// `track_commit_timestamp` is off, its `finished_at`, the completing statement's start).
pub async fn last_finished_at(pool: &PgPool) -> Result<DateTime<Utc>> {
    let last: Option<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT xmin::text, finished_at FROM sluice.jobs
         WHERE state IN ('succeeded', 'failed', 'cancelled')
         ORDER BY finished_at DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    let (xid, finished_at) = last.ok_or_else(|| Error::Internal("no job has finished".into()))?;
    Ok(commit_timestamp(pool, &xid).await?.unwrap_or(finished_at))
}

/// Succeeded jobs and recorded attempts, to check that a drain ran every job exactly once.
pub async fn succeeded_and_attempts(pool: &PgPool) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT count(*) FROM sluice.jobs WHERE state = 'succeeded'),
                (SELECT count(*) FROM sluice.job_attempts)",
    )
    .fetch_one(pool)
    .await?)
}

/// The server's durability settings, recorded with the results.
pub async fn durability_settings(pool: &PgPool) -> Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT name, setting FROM pg_settings
         WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'server_version')
         ORDER BY name",
    )
    .fetch_all(pool)
    .await?)
}

/// When the first attempt of job `id` started (the claim's `now()`), once it has.
pub async fn first_attempt_started_at(
    pool: &PgPool,
    id: i64,
) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    let (at,): (Option<chrono::DateTime<chrono::Utc>>,) = sqlx::query_as(
        "SELECT coalesce(
             (SELECT started_at FROM sluice.job_attempts WHERE job_id = $1 AND attempt = 1),
             (SELECT started_at FROM sluice.jobs WHERE id = $1 AND attempt = 1))",
    )
    .bind(id)
    .fetch_one(pool)
    .await?;
    Ok(at)
}

/// The README's plain INSERT of one job, returning its id and inserting transaction.
pub async fn insert_job_plain_returning_xid(pool: &PgPool, spec: &Value) -> Result<(i64, String)> {
    Ok(
        sqlx::query_as("INSERT INTO sluice.jobs (spec) VALUES ($1) RETURNING id, xmin::text")
            .bind(spec)
            .fetch_one(pool)
            .await?,
    )
}

/// When a transaction committed, on the server's clock; `None` without
/// `track_commit_timestamp`.
pub async fn commit_timestamp(
    pool: &PgPool,
    xid: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    let row: Result<(Option<chrono::DateTime<chrono::Utc>>,), sqlx::Error> =
        sqlx::query_as("SELECT pg_xact_commit_timestamp($1::xid)")
            .bind(xid)
            .fetch_one(pool)
            .await;
    match row {
        Ok((at,)) => Ok(at),
        // "could not get commit timestamp data": the setting is off.
        Err(sqlx::Error::Database(_)) => Ok(None),
        Err(other) => Err(other.into()),
    }
}

/// Registered runners not marked gone whose pod name starts with `prefix`.
pub async fn live_runners(pool: &PgPool, prefix: &str) -> Result<i64> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM sluice.runners
         WHERE state NOT IN ('gone', 'starting') AND starts_with(pod_name, $1)",
    )
    .bind(prefix)
    .fetch_one(pool)
    .await?;
    Ok(n)
}

/// Empties the workflow runs (their steps and artifacts with them) between measurements.
pub async fn truncate_runs(pool: &PgPool) -> Result<()> {
    sqlx::query("TRUNCATE sluice.workflow_runs CASCADE")
        .execute(pool)
        .await?;
    Ok(())
}

/// Starts a run of `workflow` from SQL; returns its id and its transaction's id, for the
/// commit timestamp.
pub async fn start_run_returning_xid(pool: &PgPool, workflow: &str) -> Result<(i64, String)> {
    let mut tx = pool.begin().await?;
    let (run,): (i64,) = sqlx::query_as("SELECT sluice.run_workflow($1, '{}'::jsonb)")
        .bind(workflow)
        .fetch_one(&mut *tx)
        .await?;
    let (xid,): (String,) =
        sqlx::query_as("SELECT xmin::text FROM sluice.workflow_runs WHERE id = $1")
            .bind(run)
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok((run, xid))
}

/// A run's state (`running` until it ends).
pub async fn run_state(pool: &PgPool, run: i64) -> Result<String> {
    let (state,): (String,) =
        sqlx::query_as("SELECT state::text FROM sluice.workflow_runs WHERE id = $1")
            .bind(run)
            .fetch_one(pool)
            .await?;
    Ok(state)
}

/// Step edges of a run: the child's claim against its parent's completion commit (its
/// attempt row's commit timestamp; the completing statement's start where
/// `track_commit_timestamp` is off — `CASE` never asks for a timestamp that is not kept).
const EDGES: &str = "SELECT extract(epoch FROM c.started_at - CASE
               WHEN current_setting('track_commit_timestamp')::boolean
               THEN pg_xact_commit_timestamp(pa.xmin) ELSE pa.finished_at END)::float8 * 1000
    FROM sluice.run_steps s
    CROSS JOIN LATERAL jsonb_array_elements_text(s.plan -> 'parents') AS p(parent)
    JOIN sluice.jobs cj ON cj.workflow_run_id = s.run_id AND cj.step_id = s.step_id
    JOIN sluice.job_attempts c ON c.job_id = cj.id AND c.attempt = 1
    JOIN sluice.jobs pj ON pj.workflow_run_id = s.run_id AND pj.step_id = p.parent
    JOIN sluice.job_attempts pa ON pa.job_id = pj.id AND pa.attempt = pj.attempt
    WHERE s.run_id = $1";

/// For every step of `run` with a parent: from the parent's completion commit (its attempt
/// row's commit timestamp; `finished_at`, the completing statement's start, where
/// `track_commit_timestamp` is off) to the child's claim (`started_at`, the claiming
/// statement's `now()`), in milliseconds.
pub async fn step_to_step_ms(pool: &PgPool, run: i64) -> Result<Vec<f64>> {
    let rows: Vec<(f64,)> = sqlx::query_as(EDGES).bind(run).fetch_all(pool).await?;
    Ok(rows.into_iter().map(|(ms,)| ms).collect())
}

/// Insert → the first attempt's `started` event (the tool was spawned and its first event
/// stored), by the database clock, for every job with one.
pub async fn tool_start_delays_ms(pool: &PgPool) -> Result<Vec<f64>> {
    let rows: Vec<(f64,)> = sqlx::query_as(
        "SELECT (extract(epoch FROM min(e.at) - j.created_at) * 1000)::float8
         FROM sluice.jobs j
         JOIN sluice.job_events e ON e.job_id = j.id AND e.attempt = 1 AND e.kind = 'started'
         GROUP BY j.id, j.created_at",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(ms,)| ms).collect())
}

/// Milliseconds from each finished job's insert to its first attempt's claim, by the
/// database clock.
pub async fn claim_delays_ms(pool: &PgPool) -> Result<Vec<f64>> {
    let rows: Vec<(f64,)> = sqlx::query_as(
        "SELECT (extract(epoch FROM a.started_at - j.created_at) * 1000)::float8
         FROM sluice.jobs j JOIN sluice.job_attempts a ON a.job_id = j.id AND a.attempt = 1",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(ms,)| ms).collect())
}
