//! The per-attempt event stream (`sluice.job_events`), keyed by `(job_id, attempt, seq)` so
//! that a retried or duplicated POST stores each event once.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sluice_protocol::{Attempt, Event, JobId, LeaseToken, RunnerId};
use sqlx::PgPool;

use crate::{Error, Result};

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
    let (leased, accepted, stored): (i64, i64, i64) = sqlx::query_as(
        "WITH lease AS (
             -- The running attempt (on the job row) or a completed one (in its history).
             SELECT true AS running, NULL::bigint AS final_seq FROM sluice.jobs j
             WHERE j.id = $1 AND j.attempt = $2 AND j.lease_token = $3 AND j.runner_id = $4
               AND j.state = 'running'
             UNION ALL
             SELECT false, a.final_seq FROM sluice.job_attempts a
             WHERE a.job_id = $1 AND a.attempt = $2 AND a.lease_token = $3 AND a.runner_id = $4
               AND a.outcome IN ('succeeded', 'failed')
         ), accepted AS (
             -- A completed attempt's stream ends at its final_seq (none: it is closed).
             SELECT e.seq, e.kind, e.data
             FROM unnest($5::bigint[], $6::text[], $7::jsonb[]) AS e(seq, kind, data), lease
             WHERE lease.running OR e.seq <= lease.final_seq
         ), stored AS (
             INSERT INTO sluice.job_events (job_id, attempt, seq, kind, data)
             SELECT $1, $2, seq, kind, data FROM accepted
             ORDER BY seq
             ON CONFLICT DO NOTHING
             RETURNING 1
         )
         SELECT (SELECT count(*) FROM lease), (SELECT count(*) FROM accepted),
                (SELECT count(*) FROM stored)",
    )
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
