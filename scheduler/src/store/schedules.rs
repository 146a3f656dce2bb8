//! Cron schedules (`sluice.schedules`) and their fired ticks (`sluice.schedule_ticks`). A
//! tick is fired in one transaction with the schedule's row locked: the tick's unique row,
//! the run it starts, and the schedule's next tick commit together.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::Result;

/// The database's clock, or the given time (tests inject one).
pub const CLOCK: &str = "SELECT coalesce($1::timestamptz, now())";

/// Creates or replaces schedule $1 (cron $2, zone $3, workflow $4, input $5, overlap $6,
/// catch-up $7 within $8 ms, paused $9, next tick $10); answers whether it was new.
pub const PUT_SCHEDULE: &str = "INSERT INTO sluice.schedules AS s
        (name, cron, timezone, workflow, input, overlap, catch_up, catch_up_window_ms, paused,
         next_tick_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
    ON CONFLICT (name) DO UPDATE SET
        cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, workflow = EXCLUDED.workflow,
        input = EXCLUDED.input, overlap = EXCLUDED.overlap, catch_up = EXCLUDED.catch_up,
        catch_up_window_ms = EXCLUDED.catch_up_window_ms, paused = EXCLUDED.paused,
        next_tick_at = EXCLUDED.next_tick_at, updated_at = now()
    RETURNING (xmax = 0) AS created";

/// Schedule $1.
pub const GET_SCHEDULE: &str = "SELECT name, cron, timezone, workflow, input, overlap, catch_up,
           catch_up_window_ms, paused, next_tick_at, last_tick_at, created_at, updated_at
    FROM sluice.schedules WHERE name = $1";

/// Every schedule, by name.
pub const LIST_SCHEDULES: &str = "SELECT name, cron, timezone, workflow, input, overlap, catch_up,
           catch_up_window_ms, paused, next_tick_at, last_tick_at, created_at, updated_at
    FROM sluice.schedules ORDER BY name";

/// Deletes schedule $1 (and its ticks); answers whether it existed.
pub const DELETE_SCHEDULE: &str = "DELETE FROM sluice.schedules WHERE name = $1 RETURNING name";

/// Pauses ($2 true) or resumes schedule $1; a resumed schedule fires next at $3.
pub const SET_SCHEDULE_PAUSED: &str = "UPDATE sluice.schedules
    SET paused = $2, next_tick_at = coalesce($3, next_tick_at), updated_at = now()
    WHERE name = $1 RETURNING name";

/// Locks one schedule due at $1 (NULL: the database's now) that no other scheduler holds.
pub const CLAIM_DUE_SCHEDULE: &str =
    "SELECT name, cron, timezone, workflow, input, overlap, catch_up,
           catch_up_window_ms, next_tick_at
    FROM sluice.schedules
    WHERE NOT paused AND next_tick_at <= coalesce($1::timestamptz, now())
    ORDER BY next_tick_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED";

/// The run of schedule $1's latest tick that started one, and its state.
pub const LAST_RUN: &str = "SELECT t.run_id, r.state::text
    FROM sluice.schedule_ticks t JOIN sluice.workflow_runs r ON r.id = t.run_id
    WHERE t.schedule = $1
    ORDER BY t.tick_at DESC
    LIMIT 1";

/// Whether schedule $1 has a tick waiting for its running run (queue_one).
pub const HAS_QUEUED_TICK: &str =
    "SELECT EXISTS (SELECT 1 FROM sluice.schedule_ticks WHERE schedule = $1 AND outcome = 'queued')";

/// Records tick $2 of schedule $1 as $3 with run $4, unless it was fired already; answers
/// whether this call recorded it.
pub const RECORD_TICK: &str =
    "INSERT INTO sluice.schedule_ticks (schedule, tick_at, outcome, run_id)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT DO NOTHING
    RETURNING true";

/// Starts a run of the current version of workflow $1 with input $2.
pub const START_SCHEDULED_RUN: &str = "SELECT sluice.run_workflow($1, $2)";

/// Cancels run $1.
pub const CANCEL_SCHEDULED_RUN: &str = "SELECT sluice.cancel_run($1)::text";

/// Moves schedule $1 on: next tick $2, last fired tick $3.
pub const ADVANCE_SCHEDULE: &str = "UPDATE sluice.schedules
    SET next_tick_at = $2, last_tick_at = greatest(last_tick_at, $3)
    WHERE name = $1";

/// Locks one queued tick whose schedule's runs have all finished.
pub const CLAIM_QUEUED_TICK: &str = "SELECT t.schedule, t.tick_at, s.workflow, s.input
    FROM sluice.schedule_ticks t JOIN sluice.schedules s ON s.name = t.schedule
    WHERE t.outcome = 'queued' AND NOT s.paused
      AND NOT EXISTS (
          SELECT 1 FROM sluice.schedule_ticks p JOIN sluice.workflow_runs r ON r.id = p.run_id
          WHERE p.schedule = t.schedule AND r.state = 'running')
    ORDER BY t.tick_at
    LIMIT 1
    FOR UPDATE OF t, s SKIP LOCKED";

/// Sets tick $2 of schedule $1 to outcome $3, run $4, error $5.
pub const SET_TICK: &str = "UPDATE sluice.schedule_ticks SET outcome = $3, run_id = $4, error = $5
    WHERE schedule = $1 AND tick_at = $2";

/// Schedule $1's latest ticks, newest first, at most $2.
pub const RECENT_TICKS: &str = "SELECT tick_at, outcome, run_id, error, fired_at
    FROM sluice.schedule_ticks WHERE schedule = $1
    ORDER BY tick_at DESC LIMIT $2";

/// Every statement of this module, for the test that prepares them all.
pub fn statements() -> impl Iterator<Item = (&'static str, &'static str)> {
    [
        ("CLOCK", CLOCK),
        ("PUT_SCHEDULE", PUT_SCHEDULE),
        ("GET_SCHEDULE", GET_SCHEDULE),
        ("LIST_SCHEDULES", LIST_SCHEDULES),
        ("DELETE_SCHEDULE", DELETE_SCHEDULE),
        ("SET_SCHEDULE_PAUSED", SET_SCHEDULE_PAUSED),
        ("CLAIM_DUE_SCHEDULE", CLAIM_DUE_SCHEDULE),
        ("LAST_RUN", LAST_RUN),
        ("HAS_QUEUED_TICK", HAS_QUEUED_TICK),
        ("RECORD_TICK", RECORD_TICK),
        ("START_SCHEDULED_RUN", START_SCHEDULED_RUN),
        ("CANCEL_SCHEDULED_RUN", CANCEL_SCHEDULED_RUN),
        ("ADVANCE_SCHEDULE", ADVANCE_SCHEDULE),
        ("CLAIM_QUEUED_TICK", CLAIM_QUEUED_TICK),
        ("SET_TICK", SET_TICK),
        ("RECENT_TICKS", RECENT_TICKS),
    ]
    .into_iter()
}

/// A stored schedule.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ScheduleRow {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub workflow: String,
    pub input: Value,
    pub overlap: String,
    pub catch_up: String,
    pub catch_up_window_ms: i64,
    pub paused: bool,
    pub next_tick_at: DateTime<Utc>,
    pub last_tick_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A schedule locked for firing.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueSchedule {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub workflow: String,
    pub input: Value,
    pub overlap: String,
    pub catch_up: String,
    pub catch_up_window_ms: i64,
    pub next_tick_at: DateTime<Utc>,
}

/// What a schedule's new version is made of.
pub struct NewSchedule<'a> {
    pub name: &'a str,
    pub cron: &'a str,
    pub timezone: &'a str,
    pub workflow: &'a str,
    pub input: &'a Value,
    pub overlap: &'a str,
    pub catch_up: &'a str,
    pub catch_up_window_ms: i64,
    pub paused: bool,
    pub next_tick_at: DateTime<Utc>,
}

/// The database's clock (or `at`).
pub async fn clock(
    conn: impl sqlx::PgExecutor<'_>,
    at: Option<DateTime<Utc>>,
) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar(CLOCK).bind(at).fetch_one(conn).await?)
}

/// Creates or replaces a schedule; whether it was new.
pub async fn put(pool: &PgPool, schedule: NewSchedule<'_>) -> Result<bool> {
    Ok(sqlx::query_scalar(PUT_SCHEDULE)
        .bind(schedule.name)
        .bind(schedule.cron)
        .bind(schedule.timezone)
        .bind(schedule.workflow)
        .bind(schedule.input)
        .bind(schedule.overlap)
        .bind(schedule.catch_up)
        .bind(schedule.catch_up_window_ms)
        .bind(schedule.paused)
        .bind(schedule.next_tick_at)
        .fetch_one(pool)
        .await?)
}

pub async fn get(pool: &PgPool, name: &str) -> Result<Option<ScheduleRow>> {
    Ok(sqlx::query_as(GET_SCHEDULE)
        .bind(name)
        .fetch_optional(pool)
        .await?)
}

pub async fn list(pool: &PgPool) -> Result<Vec<ScheduleRow>> {
    Ok(sqlx::query_as(LIST_SCHEDULES).fetch_all(pool).await?)
}

/// Whether it existed.
pub async fn delete(pool: &PgPool, name: &str) -> Result<bool> {
    Ok(sqlx::query_scalar::<_, String>(DELETE_SCHEDULE)
        .bind(name)
        .fetch_optional(pool)
        .await?
        .is_some())
}

/// Whether it existed.
pub async fn set_paused(
    pool: &PgPool,
    name: &str,
    paused: bool,
    next_tick_at: Option<DateTime<Utc>>,
) -> Result<bool> {
    Ok(sqlx::query_scalar::<_, String>(SET_SCHEDULE_PAUSED)
        .bind(name)
        .bind(paused)
        .bind(next_tick_at)
        .fetch_optional(pool)
        .await?
        .is_some())
}

/// Locks one due schedule in `conn`'s transaction.
pub async fn claim_due(
    conn: &mut PgConnection,
    at: Option<DateTime<Utc>>,
) -> Result<Option<DueSchedule>> {
    Ok(sqlx::query_as(CLAIM_DUE_SCHEDULE)
        .bind(at)
        .fetch_optional(conn)
        .await?)
}

/// The schedule's latest run and its state.
pub async fn last_run(conn: &mut PgConnection, name: &str) -> Result<Option<(i64, String)>> {
    Ok(sqlx::query_as(LAST_RUN)
        .bind(name)
        .fetch_optional(conn)
        .await?)
}

pub async fn has_queued_tick(conn: &mut PgConnection, name: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(HAS_QUEUED_TICK)
        .bind(name)
        .fetch_one(conn)
        .await?)
}

/// Whether this call recorded the tick (it was not fired before).
pub async fn record_tick(
    conn: &mut PgConnection,
    name: &str,
    tick_at: DateTime<Utc>,
    outcome: &str,
    run_id: Option<i64>,
) -> Result<bool> {
    Ok(sqlx::query_scalar::<_, bool>(RECORD_TICK)
        .bind(name)
        .bind(tick_at)
        .bind(outcome)
        .bind(run_id)
        .fetch_optional(conn)
        .await?
        .is_some())
}

/// Starts a run in `conn`'s transaction.
/// Starts a run inside a savepoint. `Ok(Err(_))` is a run that could not start (a deleted
/// workflow, a bad input): the savepoint is rolled back and the caller's transaction goes on.
/// An unavailable database is the outer error.
pub async fn start_run(
    conn: &mut PgConnection,
    workflow: &str,
    input: &Value,
) -> Result<std::result::Result<i64, crate::Error>> {
    sqlx::query("SAVEPOINT tick").execute(&mut *conn).await?;
    let started: Result<i64> = sqlx::query_scalar(START_SCHEDULED_RUN)
        .bind(workflow)
        .bind(input)
        .fetch_one(&mut *conn)
        .await
        .map_err(Into::into);
    match started {
        Ok(run_id) => {
            sqlx::query("RELEASE SAVEPOINT tick")
                .execute(&mut *conn)
                .await?;
            Ok(Ok(run_id))
        }
        Err(crate::Error::Unavailable(message)) => Err(crate::Error::Unavailable(message)),
        Err(err) => {
            sqlx::query("ROLLBACK TO SAVEPOINT tick")
                .execute(&mut *conn)
                .await?;
            Ok(Err(err))
        }
    }
}

pub async fn cancel_run(conn: &mut PgConnection, run_id: i64) -> Result<()> {
    sqlx::query_scalar::<_, Option<String>>(CANCEL_SCHEDULED_RUN)
        .bind(run_id)
        .fetch_one(conn)
        .await?;
    Ok(())
}

pub async fn advance(
    conn: &mut PgConnection,
    name: &str,
    next_tick_at: DateTime<Utc>,
    last_tick_at: Option<DateTime<Utc>>,
) -> Result<()> {
    sqlx::query(ADVANCE_SCHEDULE)
        .bind(name)
        .bind(next_tick_at)
        .bind(last_tick_at)
        .execute(conn)
        .await?;
    Ok(())
}

/// Locks one queued tick that may start now: (schedule, tick, workflow, input).
pub async fn claim_queued(
    conn: &mut PgConnection,
) -> Result<Option<(String, DateTime<Utc>, String, Value)>> {
    Ok(sqlx::query_as(CLAIM_QUEUED_TICK)
        .fetch_optional(conn)
        .await?)
}

/// Sets a tick's outcome, run and error.
pub async fn set_tick(
    conn: &mut PgConnection,
    name: &str,
    tick_at: DateTime<Utc>,
    outcome: &str,
    run_id: Option<i64>,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query(SET_TICK)
        .bind(name)
        .bind(tick_at)
        .bind(outcome)
        .bind(run_id)
        .bind(error)
        .execute(conn)
        .await?;
    Ok(())
}

/// A fired tick.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TickRow {
    pub tick_at: DateTime<Utc>,
    pub outcome: String,
    pub run_id: Option<i64>,
    pub error: Option<String>,
    pub fired_at: DateTime<Utc>,
}

/// The schedule's latest ticks, newest first.
pub async fn recent_ticks(pool: &PgPool, name: &str, limit: i64) -> Result<Vec<TickRow>> {
    Ok(sqlx::query_as(RECENT_TICKS)
        .bind(name)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}
