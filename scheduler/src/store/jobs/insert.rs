//! Enqueue: jobs in, one statement for a whole batch, with idempotency keys answered by the
//! job they first created.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sluice_protocol::{JobId, JobState};
use sqlx::PgPool;

use super::parse_state;
use crate::{Error, Result};

/// Inserts the jobs given as parallel arrays, in order; what a job leaves out comes from its
/// queue (or the built-in defaults). A key already stored inserts nothing. Binds: $1 queues,
/// $2 specs, $3 priorities, $4 run_at, $5 delays in ms, $6 max_attempts, $7 timeouts in ms,
/// $8 idempotency keys, $9 retry policies (null: the queue's, read when a job fails).
pub const INSERT_JOBS: &str = "WITH input AS (
        SELECT * FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::timestamptz[],
                             $5::bigint[], $6::int[], $7::bigint[], $8::text[], $9::jsonb[])
            WITH ORDINALITY AS i(queue, spec, priority, run_at, delay_ms, max_attempts,
                                 timeout_ms, idempotency_key, retry, ord)
    )
    INSERT INTO sluice.jobs AS j
        (queue, spec, priority, run_at, max_attempts, timeout_ms, idempotency_key, retry)
    SELECT i.queue, i.spec,
           coalesce(i.priority, q.default_priority, 0),
           coalesce(i.run_at, now() + coalesce(i.delay_ms, 0) * interval '1 millisecond'),
           coalesce(i.max_attempts, q.default_max_attempts, 3),
           coalesce(i.timeout_ms, q.default_timeout_ms),
           i.idempotency_key,
           i.retry
    FROM input i LEFT JOIN sluice.queues q ON q.name = i.queue
    ORDER BY i.ord
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING j.id, j.state::text, j.idempotency_key";

/// The stored jobs of idempotency keys. Binds: $1 keys.
pub const JOBS_BY_IDEMPOTENCY_KEY: &str = "SELECT id, state::text, idempotency_key FROM sluice.jobs
    WHERE idempotency_key = ANY($1)";

pub(super) const STATEMENTS: &[(&str, &str)] = &[
    ("INSERT_JOBS", INSERT_JOBS),
    ("JOBS_BY_IDEMPOTENCY_KEY", JOBS_BY_IDEMPOTENCY_KEY),
];

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
    /// `{initial_ms?, max_ms?, factor?}`, checked (`sluice.retry_problem`).
    pub retry: Option<Value>,
}

/// The outcome of an enqueue: the job, and whether this call created it (`false` when an
/// idempotency key matched a stored job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    pub id: JobId,
    pub state: JobState,
    pub created: bool,
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
    let retries: Vec<Option<&Value>> = jobs.iter().map(|j| j.retry.as_ref()).collect();

    let inserted: Vec<(i64, String, Option<String>)> = sqlx::query_as(INSERT_JOBS)
        .bind(&queues)
        .bind(&specs)
        .bind(&priorities)
        .bind(&run_ats)
        .bind(&delays)
        .bind(&max_attempts)
        .bind(&timeouts)
        .bind(&keys)
        .bind(&retries)
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
        let rows: Vec<(i64, String, String)> = sqlx::query_as(JOBS_BY_IDEMPOTENCY_KEY)
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
