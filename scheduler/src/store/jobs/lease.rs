//! Leases: a runner's heartbeat renews the leases it still holds, hears why the others
//! ended, and confirms that stopped attempts' tools are gone.

use std::time::Duration;

use sluice_protocol::{LeaseRef, RunnerId};
use sqlx::PgPool;
use uuid::Uuid;

use super::complete::CUSTOM_PLAN_FROM;
use crate::Result;

/// Renews the listed leases (parallel arrays $2 jobs, $3 attempts, $4 tokens) that runner $1
/// still holds by $5 ms, skipping rows others hold; marks the runner seen (and `busy` or
/// `idle`); keeps the stops of
/// its attempts for heartbeat number $6. One row per listed lease: its place, whether it was
/// renewed, whether it is still held, and how its attempt ended if it did.
pub const RENEW_LEASES: &str = "WITH listed AS (
        SELECT * FROM unnest($2::bigint[], $3::int[], $4::uuid[])
            WITH ORDINALITY AS l(job_id, attempt, lease_token, ord)
    ), seen AS (
        -- Seen now; `busy` while it lists an attempt, `idle` otherwise (a draining or gone
        -- runner stays so).
        UPDATE sluice.runners
        SET last_seen_at = now(),
            state = CASE WHEN state IN ('draining', 'gone') THEN state
                         WHEN cardinality($2::bigint[]) > 0 THEN 'busy' ELSE 'idle' END
        WHERE id = $1
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
    ORDER BY l.ord";

pub(super) const STATEMENTS: &[(&str, &str)] = &[("RENEW_LEASES", RENEW_LEASES)];

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
    let rows: Vec<(i64, bool, bool, Option<String>)> = sqlx::query_as(RENEW_LEASES)
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
