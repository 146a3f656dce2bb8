//! Workflow artifacts (`sluice.artifact_chunks`, `sluice.step_artifacts`): chunks stored under
//! the uploading attempt's lease, sealed as a set, read back chunk by chunk by the attempts
//! of the same run and by the public API. See `sql/0009_artifacts.sql`.

use serde_json::Value;
use sluice_protocol::{Attempt, JobId, LeaseToken, RunnerId};
use sqlx::PgPool;

use crate::Result;

/// Stores chunk `$5` of the attempt `($1, $2)` if the runner `$4` holds its lease `$3`, the
/// job is a workflow step and the attempt has not sealed its artifacts yet; an upload
/// retried replaces the chunk. The first chunk drops what earlier attempts of the job left
/// (they can no longer seal). One row when stored.
///
/// The job row is not locked: a heartbeat skips locked rows rather than wait, so locking it
/// for each of a long upload's chunks would starve the lease it renews. A chunk that lands
/// in the instant a reclaim ends the attempt is harmless — only a live lease can seal
/// (`SEAL` locks the row), and the next attempt's first chunk or the step's end drops it.
pub const PUT_CHUNK: &str = "WITH lease AS (
        SELECT j.id, j.attempt, j.workflow_run_id FROM sluice.jobs j
        WHERE j.id = $1 AND j.attempt = $2 AND j.lease_token = $3 AND j.runner_id = $4
          AND j.state = 'running' AND j.workflow_run_id IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM sluice.step_artifacts a
                          WHERE a.job_id = j.id AND a.attempt = j.attempt)
    ), dropped AS (
        DELETE FROM sluice.artifact_chunks c USING lease
        WHERE $5::integer = 0 AND c.job_id = lease.id AND c.attempt < lease.attempt
    )
    INSERT INTO sluice.artifact_chunks AS c (job_id, attempt, seq, run_id, data)
    SELECT id, attempt, $5::integer, workflow_run_id, $6::bytea FROM lease
    ON CONFLICT (job_id, attempt, seq) DO UPDATE SET data = EXCLUDED.data
    RETURNING 1";

/// Seals chunks `0..$5` of the attempt as its artifacts, under its lease: the chunks must be
/// all there with `$6` bytes in all; chunks past the end (an earlier, longer try) and the
/// chunks of the job's other attempts are dropped. Returns `(leased, chunks, bytes, sealed)`.
pub const SEAL: &str = "WITH lease AS (
        SELECT j.id, j.attempt, j.workflow_run_id AS run_id, j.step_id FROM sluice.jobs j
        WHERE j.id = $1 AND j.attempt = $2 AND j.lease_token = $3 AND j.runner_id = $4
          AND j.state = 'running' AND j.workflow_run_id IS NOT NULL
        FOR UPDATE
    ), present AS (
        SELECT count(*) AS chunks, coalesce(sum(length(c.data)), 0) AS bytes
        FROM sluice.artifact_chunks c, lease
        WHERE c.job_id = lease.id AND c.attempt = lease.attempt AND c.seq < $5::integer
    ), dropped AS (
        DELETE FROM sluice.artifact_chunks c USING lease, present
        WHERE c.job_id = lease.id AND (c.attempt <> lease.attempt OR c.seq >= $5::integer)
          AND present.chunks = $5::integer AND present.bytes = $6::bigint
    ), unsealed AS (
        -- An earlier attempt's seal, whose chunks `dropped` takes: it names nothing now.
        DELETE FROM sluice.step_artifacts a USING lease, present
        WHERE a.job_id = lease.id AND a.attempt <> lease.attempt
          AND present.chunks = $5::integer AND present.bytes = $6::bigint
    ), sealed AS (
        INSERT INTO sluice.step_artifacts AS a
            (run_id, step_id, job_id, attempt, chunks, bytes, sha256, entries, skipped)
        SELECT lease.run_id, lease.step_id, lease.id, lease.attempt, $5::integer, $6::bigint, $7::text, $8::bigint, $9::jsonb
        FROM lease, present
        WHERE present.chunks = $5::integer AND present.bytes = $6::bigint
        ON CONFLICT (job_id, attempt) DO UPDATE
            SET chunks = EXCLUDED.chunks, bytes = EXCLUDED.bytes, sha256 = EXCLUDED.sha256,
                entries = EXCLUDED.entries, skipped = EXCLUDED.skipped, sealed_at = now()
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM lease) > 0, coalesce((SELECT chunks FROM present), 0),
           coalesce((SELECT bytes FROM present), 0)::bigint, (SELECT count(*) FROM sealed) > 0";

/// The sealed sets a claimed step unpacks: for each `(run, step)` of `$1`/`$2`, the sealed
/// set of each of its succeeded parents (their latest: a step succeeds only after sealing),
/// in `depends_on` order.
pub const STEP_INPUTS: &str = "SELECT k.run_id, k.step_id, a.step_id, a.job_id, a.attempt,
           a.chunks, a.bytes, a.sha256
    FROM unnest($1::bigint[], $2::text[]) AS k(run_id, step_id)
    JOIN sluice.run_steps s ON s.run_id = k.run_id AND s.step_id = k.step_id
    CROSS JOIN LATERAL jsonb_array_elements_text(s.plan -> 'parents')
        WITH ORDINALITY AS p(parent, ord)
    JOIN sluice.run_steps ps
      ON ps.run_id = k.run_id AND ps.step_id = p.parent AND ps.state = 'succeeded'
    CROSS JOIN LATERAL (
        SELECT * FROM sluice.step_artifacts a
        WHERE a.run_id = k.run_id AND a.step_id = p.parent
        ORDER BY a.attempt DESC LIMIT 1
    ) a
    ORDER BY k.run_id, k.step_id, p.ord";

/// One chunk of the sealed set `($5, $6)` for the attempt `($1, $2)` holding lease `$3` on
/// runner `$4`, when the set is one of its step's parents'. Returns `(leased, data)`.
pub const INPUT_CHUNK: &str = "WITH lease AS (
        SELECT j.workflow_run_id AS run_id, j.step_id FROM sluice.jobs j
        WHERE j.id = $1 AND j.attempt = $2 AND j.lease_token = $3 AND j.runner_id = $4
          AND j.state = 'running' AND j.workflow_run_id IS NOT NULL
    )
    SELECT EXISTS (SELECT 1 FROM lease),
           (SELECT c.data FROM lease
            JOIN sluice.run_steps s ON s.run_id = lease.run_id AND s.step_id = lease.step_id
            JOIN sluice.step_artifacts a
              ON a.run_id = lease.run_id AND s.plan -> 'parents' ? a.step_id
            JOIN sluice.artifact_chunks c
              ON c.job_id = a.job_id AND c.attempt = a.attempt AND c.seq = $7::integer
            WHERE a.job_id = $5 AND a.attempt = $6 AND $7::integer < a.chunks)";

/// A step's artifacts for the public API: the sealed set of a succeeded step (its latest).
pub const STEP_SET: &str = "SELECT a.job_id, a.attempt, a.chunks, a.bytes, a.sha256, a.entries,
           a.skipped
    FROM sluice.step_artifacts a
    JOIN sluice.run_steps s
      ON s.run_id = a.run_id AND s.step_id = a.step_id AND s.state = 'succeeded'
    WHERE a.run_id = $1 AND a.step_id = $2
    ORDER BY a.attempt DESC LIMIT 1";

/// One chunk of a sealed set.
pub const CHUNK: &str = "SELECT data FROM sluice.artifact_chunks
    WHERE job_id = $1 AND attempt = $2 AND seq = $3";

/// Deletes up to `$2` artifact chunks (1 MiB each) of runs finished more than `$1` seconds
/// ago: a run's artifacts are deleted in short statements before the run itself.
pub const PRUNE_EXPIRED_CHUNKS: &str = "DELETE FROM sluice.artifact_chunks
    WHERE (job_id, attempt, seq) IN (
        SELECT c.job_id, c.attempt, c.seq
        FROM sluice.workflow_runs r JOIN sluice.artifact_chunks c ON c.run_id = r.id
        WHERE r.finished_at < now() - make_interval(secs => $1)
        LIMIT $2
        FOR UPDATE OF c SKIP LOCKED)";

/// Every statement of this module, for the test that prepares them all.
pub fn statements() -> impl Iterator<Item = (&'static str, &'static str)> {
    [
        ("PUT_CHUNK", PUT_CHUNK),
        ("SEAL", SEAL),
        ("STEP_INPUTS", STEP_INPUTS),
        ("INPUT_CHUNK", INPUT_CHUNK),
        ("STEP_SET", STEP_SET),
        ("CHUNK", CHUNK),
        ("PRUNE_EXPIRED_CHUNKS", PRUNE_EXPIRED_CHUNKS),
    ]
    .into_iter()
}

/// The lease of the attempt that uploads or downloads.
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    pub runner: RunnerId,
    pub job: JobId,
    pub attempt: Attempt,
    pub lease_token: LeaseToken,
}

/// Stores one chunk; false when the lease is not held (or the job is not a step).
pub async fn put_chunk_if_leased(
    pool: &PgPool,
    lease: Lease,
    seq: u32,
    data: &[u8],
) -> Result<bool> {
    let stored: Option<i32> = sqlx::query_scalar(PUT_CHUNK)
        .bind(lease.job.0)
        .bind(lease.attempt.0)
        .bind(lease.lease_token.0)
        .bind(lease.runner.0)
        .bind(seq as i32)
        .bind(data)
        .fetch_optional(pool)
        .await?;
    Ok(stored.is_some())
}

/// What a seal found.
#[derive(Debug, Clone, Copy)]
pub struct Sealed {
    pub leased: bool,
    /// Chunks and bytes present below the sealed count.
    pub chunks: i64,
    pub bytes: i64,
    pub sealed: bool,
}

/// A set to seal.
#[derive(Debug, Clone)]
pub struct Seal<'a> {
    pub chunks: u32,
    pub bytes: u64,
    pub sha256: &'a str,
    pub entries: u64,
    pub skipped: &'a Value,
}

pub async fn seal_if_leased(pool: &PgPool, lease: Lease, seal: Seal<'_>) -> Result<Sealed> {
    let (leased, chunks, bytes, sealed): (bool, i64, i64, bool) = sqlx::query_as(SEAL)
        .bind(lease.job.0)
        .bind(lease.attempt.0)
        .bind(lease.lease_token.0)
        .bind(lease.runner.0)
        .bind(seal.chunks as i32)
        .bind(seal.bytes as i64)
        .bind(seal.sha256)
        .bind(seal.entries as i64)
        .bind(seal.skipped)
        .fetch_one(pool)
        .await?;
    Ok(Sealed {
        leased,
        chunks,
        bytes,
        sealed,
    })
}

/// A sealed set as stored: job, attempt, chunks, bytes, sha256.
pub type SetRow = (i64, i32, i32, i64, String);

/// The parents' sets of each claimed step, keyed by `(run, step)`, in `depends_on` order:
/// `(parent step, set)`.
pub async fn step_inputs(
    pool: &PgPool,
    steps: &[(i64, String)],
) -> Result<std::collections::HashMap<(i64, String), Vec<(String, SetRow)>>> {
    let runs: Vec<i64> = steps.iter().map(|(run, _)| *run).collect();
    let ids: Vec<&str> = steps.iter().map(|(_, step)| step.as_str()).collect();
    type Row = (i64, String, String, i64, i32, i32, i64, String);
    let rows: Vec<Row> = sqlx::query_as(STEP_INPUTS)
        .bind(&runs)
        .bind(&ids)
        .fetch_all(pool)
        .await?;
    let mut inputs: std::collections::HashMap<_, Vec<_>> = Default::default();
    for (run, step, parent, job, attempt, chunks, bytes, sha256) in rows {
        inputs
            .entry((run, step))
            .or_default()
            .push((parent, (job, attempt, chunks, bytes, sha256)));
    }
    Ok(inputs)
}

/// One chunk of `(source, source_attempt)` for the attempt holding `lease`: `None` when the
/// lease is not held, `Some(None)` when the set or chunk is not the run's.
pub async fn input_chunk_if_leased(
    pool: &PgPool,
    lease: Lease,
    source: JobId,
    source_attempt: Attempt,
    seq: u32,
) -> Result<Option<Option<Vec<u8>>>> {
    let (leased, data): (bool, Option<Vec<u8>>) = sqlx::query_as(INPUT_CHUNK)
        .bind(lease.job.0)
        .bind(lease.attempt.0)
        .bind(lease.lease_token.0)
        .bind(lease.runner.0)
        .bind(source.0)
        .bind(source_attempt.0)
        .bind(seq as i32)
        .fetch_one(pool)
        .await?;
    Ok(leased.then_some(data))
}

/// A step's sealed set, for download: job, attempt, chunks, bytes, sha256, entries, skipped.
pub type StepSetRow = (i64, i32, i32, i64, String, i64, Value);

pub async fn step_set(pool: &PgPool, run: i64, step: &str) -> Result<Option<StepSetRow>> {
    Ok(sqlx::query_as(STEP_SET)
        .bind(run)
        .bind(step)
        .fetch_optional(pool)
        .await?)
}

pub async fn chunk(pool: &PgPool, job: i64, attempt: i32, seq: i32) -> Result<Option<Vec<u8>>> {
    Ok(sqlx::query_scalar(CHUNK)
        .bind(job)
        .bind(attempt)
        .bind(seq)
        .fetch_optional(pool)
        .await?)
}

/// Deletes up to `limit` chunks of runs past `retention_secs`; how many.
pub async fn prune_expired_chunks(
    conn: &mut sqlx::PgConnection,
    retention_secs: f64,
    limit: i64,
) -> Result<u64> {
    Ok(sqlx::query(PRUNE_EXPIRED_CHUNKS)
        .bind(retention_secs)
        .bind(limit)
        .execute(conn)
        .await?
        .rows_affected())
}
