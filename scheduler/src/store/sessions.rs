//! Agent sessions (`sluice.agent_sessions`): the conversation an agent step continues, held
//! by one attempt at a time. See `sql/0010_agent_sessions.sql`.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sluice_protocol::{Attempt, JobId, LeaseToken, RunnerId};
use sqlx::PgPool;

use crate::Result;

/// Serialises hand-overs of session $1 (until the transaction ends), so that the next
/// statement's snapshot sees every hand-over committed before it.
pub const LOCK_SESSION: &str = "SELECT pg_advisory_xact_lock(hashtext('sluice.session:' || $1))";

/// Hands session $1 to the attempt `($2, $3)` when its last holder (another attempt) is
/// neither running nor being stopped (an `attempt_stops` row its runner has not confirmed),
/// and no older agent job of the session is ready to run (available within a second, its
/// queue not paused: a delayed or paused job does not hold the others back); creates the
/// session when new. One row, the history, when handed over. Run after [`LOCK_SESSION`] in
/// the same transaction.
pub const ACQUIRE: &str = "WITH ready AS (
        SELECT 1 WHERE NOT EXISTS (
            SELECT 1 FROM sluice.jobs w
            WHERE w.spec ->> 'kind' = 'agent' AND left(w.spec ->> 'session', 129) = $1
              AND w.state = 'available' AND w.id < $2
              AND w.run_at <= now() + interval '1 second'
              AND NOT EXISTS (SELECT 1 FROM sluice.queues q WHERE q.name = w.queue AND q.paused))
    )
    INSERT INTO sluice.agent_sessions AS s (name, holder_job, holder_attempt)
    SELECT $1, $2, $3 FROM ready
    ON CONFLICT (name) DO UPDATE
        SET holder_job = EXCLUDED.holder_job, holder_attempt = EXCLUDED.holder_attempt,
            pending_attempt = NULL, pending_messages = NULL
        WHERE s.holder_job IS NULL
           OR (s.holder_job = EXCLUDED.holder_job AND s.holder_attempt = EXCLUDED.holder_attempt)
           OR (NOT EXISTS (SELECT 1 FROM sluice.jobs h
                           WHERE h.id = s.holder_job AND h.attempt = s.holder_attempt
                             AND h.state = 'running')
               AND NOT EXISTS (SELECT 1 FROM sluice.attempt_stops st
                               WHERE st.job_id = s.holder_job AND st.attempt = s.holder_attempt
                                 AND st.stop_by > now()))
    RETURNING s.messages";

/// Undoes the claim of attempt `($1, $2)` with lease $3 whose session is busy: the job is
/// `available` again from $4 ms on, its attempt number back where it was (the attempt never
/// ran), its lease gone. One row when undone.
pub const POSTPONE: &str = "UPDATE sluice.jobs
    SET state = 'available', attempt = attempt - 1, lease_token = NULL, runner_id = NULL,
        started_at = NULL, lease_expires_at = NULL,
        run_at = now() + $4 * interval '1 millisecond'
    WHERE id = $1 AND attempt = $2 AND lease_token = $3 AND state = 'running'
    RETURNING 1";

/// The history of session $1 as its holder `($2, $3)` sees it, while runner $5 holds the
/// lease $4.
pub const HELD_HISTORY: &str = "SELECT s.messages FROM sluice.agent_sessions s
    JOIN sluice.jobs j ON j.id = s.holder_job AND j.attempt = s.holder_attempt
    WHERE s.holder_job = $1 AND s.holder_attempt = $2 AND j.lease_token = $3
      AND j.runner_id = $4 AND j.state = 'running'";

/// Keeps `$5` as the history the attempt `($1, $2)` leaves if its job succeeds, while runner
/// $4 holds its lease $3. One row when kept.
pub const KEEP_PENDING: &str = "UPDATE sluice.agent_sessions s
    SET pending_attempt = $2, pending_messages = $5
    FROM sluice.jobs j
    WHERE s.holder_job = $1 AND s.holder_attempt = $2
      AND j.id = $1 AND j.attempt = $2 AND j.lease_token = $3 AND j.runner_id = $4
      AND j.state = 'running'
    RETURNING 1";

/// Session $1 with whether a running attempt holds it.
pub const GET: &str = "SELECT s.name, s.messages, s.jobs,
        (SELECT h.id FROM sluice.jobs h WHERE h.id = s.holder_job
           AND h.attempt = s.holder_attempt AND h.state = 'running') AS held_by,
        s.created_at, s.updated_at
    FROM sluice.agent_sessions s WHERE s.name = $1";

/// Forgets session $1 unless a running attempt holds it. `(existed, deleted)`.
pub const DELETE: &str = "WITH target AS (
        SELECT s.name,
               EXISTS (SELECT 1 FROM sluice.jobs h WHERE h.id = s.holder_job
                         AND h.attempt = s.holder_attempt AND h.state = 'running') AS held
        FROM sluice.agent_sessions s WHERE s.name = $1
        FOR UPDATE
    ), deleted AS (
        DELETE FROM sluice.agent_sessions s USING target
        WHERE s.name = target.name AND NOT target.held
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM target), EXISTS (SELECT 1 FROM deleted)";

/// Every statement here, named, for the statement check of the testkit.
pub fn statements() -> impl Iterator<Item = (&'static str, &'static str)> {
    [
        ("LOCK_SESSION", LOCK_SESSION),
        ("ACQUIRE", ACQUIRE),
        ("POSTPONE", POSTPONE),
        ("HELD_HISTORY", HELD_HISTORY),
        ("KEEP_PENDING", KEEP_PENDING),
        ("GET", GET),
        ("DELETE", DELETE),
    ]
    .into_iter()
}

/// A session as stored.
#[derive(Debug, sqlx::FromRow)]
pub struct SessionRow {
    pub name: String,
    pub messages: Value,
    pub jobs: i64,
    pub held_by: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Hands `name` to the attempt `(job, attempt)`: its history, or `None` while another
/// attempt holds it or an older job of it waits.
pub async fn acquire(
    pool: &PgPool,
    name: &str,
    job: JobId,
    attempt: Attempt,
) -> Result<Option<Value>> {
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK_SESSION)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    let history: Option<Value> = sqlx::query_scalar(ACQUIRE)
        .bind(name)
        .bind(job.0)
        .bind(attempt.0)
        .fetch_optional(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(history)
}

/// Undoes a claim whose session is busy; the job is claimable again after `delay_ms`.
pub async fn postpone(
    pool: &PgPool,
    job: JobId,
    attempt: Attempt,
    lease_token: LeaseToken,
    delay_ms: i64,
) -> Result<bool> {
    let undone = sqlx::query(POSTPONE)
        .bind(job.0)
        .bind(attempt.0)
        .bind(lease_token.0)
        .bind(delay_ms)
        .fetch_optional(pool)
        .await?;
    Ok(undone.is_some())
}

/// The history the holding attempt started from, while its lease holds.
pub async fn held_history(
    pool: &PgPool,
    job: JobId,
    attempt: Attempt,
    lease_token: LeaseToken,
    runner: RunnerId,
) -> Result<Option<Value>> {
    Ok(sqlx::query_scalar(HELD_HISTORY)
        .bind(job.0)
        .bind(attempt.0)
        .bind(lease_token.0)
        .bind(runner.0)
        .fetch_optional(pool)
        .await?)
}

/// Keeps `messages` as the history the attempt leaves on success; whether its lease held.
pub async fn keep_pending(
    pool: &PgPool,
    job: JobId,
    attempt: Attempt,
    lease_token: LeaseToken,
    runner: RunnerId,
    messages: &Value,
) -> Result<bool> {
    let kept = sqlx::query(KEEP_PENDING)
        .bind(job.0)
        .bind(attempt.0)
        .bind(lease_token.0)
        .bind(runner.0)
        .bind(messages)
        .fetch_optional(pool)
        .await?;
    Ok(kept.is_some())
}

/// Session `name`, if it exists.
pub async fn get(pool: &PgPool, name: &str) -> Result<Option<SessionRow>> {
    Ok(sqlx::query_as(GET).bind(name).fetch_optional(pool).await?)
}

/// Forgets `name` unless held: `(existed, deleted)`. Behind the hand-over's lock, so that
/// it sees a hand-over committed while it waited.
pub async fn delete(pool: &PgPool, name: &str) -> Result<(bool, bool)> {
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK_SESSION)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    let result = sqlx::query_as(DELETE)
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(result)
}
