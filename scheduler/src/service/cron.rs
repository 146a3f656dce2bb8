//! Cron schedules: each due tick starts a run of the schedule's workflow, exactly once across
//! any number of scheduler replicas.
//!
//! Every replica runs [`run`], which every interval fires what is due ([`fire_due`]): it
//! locks one due schedule at a time (`FOR UPDATE SKIP LOCKED`), and in that transaction
//! records each tick as a unique `(schedule, tick_at)` row, starts its run (or applies the
//! overlap policy), and moves `next_tick_at` on. The database's clock decides what is due;
//! `next_tick_at` only moves forward, so a clock going backwards fires nothing twice. Tests
//! pass their own time (`at`), so an hour of ticks runs in a second.
//!
//! Expressions are croner's: 5 fields (minutes) or 6 (seconds first), `@hourly` and friends,
//! `L`, `W`, `#`, read in the schedule's IANA zone. Across DST, a fixed time in a skipped hour
//! fires right after the gap, once; in a repeated hour, once at its first occurrence; an
//! interval (`*/15`) fires on the wall clock, so it skips the gap and runs twice through a
//! repeated hour.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use serde_json::Value;
use sluice_protocol::api::{Schedule, ScheduleRequest, ScheduleTick};
use sqlx::PgPool;
use tokio::sync::watch;

use super::Context;
use crate::store::{schedules, workflows};
use crate::{Error, Result};

/// How late a tick may fire under `catch_up: none` (a scheduler that was busy, not down).
const LATE_TOLERANCE: chrono::Duration = chrono::Duration::seconds(60);
/// Most ticks of one schedule fired in one pass (a catch-up of more goes on next pass).
const MAX_TICKS_PER_PASS: usize = 1000;
/// Most schedules fired in one pass.
const MAX_SCHEDULES_PER_PASS: usize = 10_000;
/// Longest catch-up window: 366 days.
const MAX_WINDOW_MS: u64 = 366 * 24 * 3600 * 1000;

/// A parsed expression in its zone.
#[derive(Debug, Clone)]
pub struct Compiled {
    cron: Cron,
    zone: Tz,
}

/// Parses `cron` in `timezone`; every problem is named (for a 422).
pub fn compile(cron: &str, timezone: &str) -> std::result::Result<Compiled, Vec<(String, String)>> {
    let mut problems = Vec::new();
    let zone = match Tz::from_str(timezone) {
        Ok(zone) => Some(zone),
        Err(_) => {
            problems.push((
                "timezone".to_string(),
                format!("{timezone:?} is not an IANA time zone (such as Europe/Berlin or UTC)"),
            ));
            None
        }
    };
    let parsed = CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(cron);
    let cron = match parsed {
        Ok(cron) => Some(cron),
        Err(err) => {
            problems.push(("cron".to_string(), format!("{cron:?}: {err}")));
            None
        }
    };
    match (cron, zone) {
        (Some(cron), Some(zone)) if problems.is_empty() => Ok(Compiled { cron, zone }),
        _ => Err(problems),
    }
}

impl Compiled {
    /// The first fire time after `at` (at `at` itself when `inclusive`); `None` when it never
    /// fires again (croner bounds the search).
    pub fn next_after(&self, at: DateTime<Utc>, inclusive: bool) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&at.with_timezone(&self.zone), inclusive)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The last fire time at or before `at`.
    fn latest_at(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&at.with_timezone(&self.zone), true)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The next `count` fire times after `at`.
    pub fn upcoming(&self, at: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(count);
        let mut cursor = at;
        let mut inclusive = true;
        while out.len() < count {
            match self.next_after(cursor, inclusive) {
                Some(next) => {
                    out.push(next);
                    cursor = next;
                    inclusive = false;
                }
                None => break,
            }
        }
        out
    }

    /// The ticks to fire now: those from `due` (the schedule's next tick) to `now` that the
    /// catch-up policy keeps, at most [`MAX_TICKS_PER_PASS`]; and whether more are left.
    fn due_ticks(
        &self,
        due: DateTime<Utc>,
        now: DateTime<Utc>,
        catch_up: &str,
        window_ms: i64,
    ) -> (Vec<DateTime<Utc>>, bool) {
        if catch_up == "latest" {
            return match self.latest_at(now) {
                Some(latest) if latest >= due => (vec![latest], false),
                _ => (Vec::new(), false),
            };
        }
        let reach = match catch_up {
            "all" => chrono::Duration::milliseconds(window_ms),
            _ => LATE_TOLERANCE,
        };
        let mut ticks = Vec::new();
        let mut next = self.next_after(due.max(now - reach), true);
        while let Some(tick) = next.filter(|t| *t <= now) {
            if ticks.len() == MAX_TICKS_PER_PASS {
                return (ticks, true);
            }
            ticks.push(tick);
            next = self.next_after(tick, false);
        }
        (ticks, false)
    }
}

/// Creates or replaces schedule `name`; the schedule and whether it was new.
pub async fn put(ctx: &Context, name: &str, request: ScheduleRequest) -> Result<(Schedule, bool)> {
    check_name(name)?;
    let timezone = request.timezone.unwrap_or_else(|| "UTC".to_string());
    let overlap = request.overlap.unwrap_or_else(|| "allow".to_string());
    let catch_up = request.catch_up.unwrap_or_else(|| "none".to_string());
    let input = request.input.unwrap_or_else(|| serde_json::json!({}));
    let window = request.catch_up_window_ms.unwrap_or(24 * 3600 * 1000);
    let mut problems = Vec::new();
    for (field, value) in [("cron", &request.cron), ("timezone", &timezone)] {
        if value.contains('\0') || value.len() > 256 {
            problems.push((
                field.to_string(),
                "must be at most 256 bytes, without NUL".to_string(),
            ));
        }
    }
    if !["allow", "skip", "queue_one", "replace"].contains(&overlap.as_str()) {
        problems.push((
            "overlap".to_string(),
            format!("{overlap:?}: must be allow, skip, queue_one or replace"),
        ));
    }
    if !["none", "latest", "all"].contains(&catch_up.as_str()) {
        problems.push((
            "catch_up".to_string(),
            format!("{catch_up:?}: must be none, latest or all"),
        ));
    }
    if window > MAX_WINDOW_MS {
        problems.push((
            "catch_up_window_ms".to_string(),
            format!("must be between 0 and {MAX_WINDOW_MS} (366 days)"),
        ));
    }
    if crate::service::jobs::valid_queue_name(&request.workflow) {
        if workflows::get(&ctx.pool, &request.workflow, None)
            .await?
            .is_none()
        {
            problems.push((
                "workflow".to_string(),
                format!(
                    "there is no workflow {:?} (register it first)",
                    request.workflow
                ),
            ));
        }
    } else {
        problems.push((
            "workflow".to_string(),
            "not a valid workflow name".to_string(),
        ));
    }
    Error::if_nul("input", &input)?;
    let compiled = if problems.is_empty() {
        match compile(&request.cron, &timezone) {
            Ok(compiled) => Some(compiled),
            Err(found) => {
                problems.extend(found);
                None
            }
        }
    } else {
        None
    };
    let now = schedules::clock(&ctx.pool, None).await?;
    let next = compiled.as_ref().and_then(|c| c.next_after(now, false));
    if compiled.is_some() && next.is_none() {
        problems.push((
            "cron".to_string(),
            format!("{:?} never fires", request.cron),
        ));
    }
    if !problems.is_empty() {
        return Err(Error::InvalidDefinition(problems));
    }
    let created = schedules::put(
        &ctx.pool,
        schedules::NewSchedule {
            name,
            cron: &request.cron,
            timezone: &timezone,
            workflow: &request.workflow,
            input: &input,
            overlap: &overlap,
            catch_up: &catch_up,
            catch_up_window_ms: window as i64,
            paused: request.paused.unwrap_or(false),
            next_tick_at: next.unwrap_or(now),
        },
    )
    .await?;
    Ok((get(ctx, name).await?, created))
}

/// A schedule with its next five fire times and its latest ticks.
pub async fn get(ctx: &Context, name: &str) -> Result<Schedule> {
    check_name(name)?;
    let row = schedules::get(&ctx.pool, name)
        .await?
        .ok_or(Error::NotFound("schedule"))?;
    let mut schedule = schedule_of(row);
    schedule.recent_ticks = schedules::recent_ticks(&ctx.pool, name, 10)
        .await?
        .into_iter()
        .map(|t| ScheduleTick {
            tick_at: t.tick_at,
            outcome: t.outcome,
            run_id: t.run_id,
            error: t.error,
            fired_at: t.fired_at,
        })
        .collect();
    Ok(schedule)
}

/// Every schedule, by name.
pub async fn list(ctx: &Context) -> Result<Vec<Schedule>> {
    Ok(schedules::list(&ctx.pool)
        .await?
        .into_iter()
        .map(schedule_of)
        .collect())
}

/// Deletes a schedule and its ticks (runs it started stay).
pub async fn delete(ctx: &Context, name: &str) -> Result<()> {
    check_name(name)?;
    if schedules::delete(&ctx.pool, name).await? {
        Ok(())
    } else {
        Err(Error::NotFound("schedule"))
    }
}

/// Pauses or resumes a schedule; a resumed one fires next at its first time from now (ticks
/// missed while paused are not caught up).
pub async fn set_paused(ctx: &Context, name: &str, paused: bool) -> Result<Schedule> {
    check_name(name)?;
    let row = schedules::get(&ctx.pool, name)
        .await?
        .ok_or(Error::NotFound("schedule"))?;
    let next = if paused {
        None
    } else {
        let now = schedules::clock(&ctx.pool, None).await?;
        compile(&row.cron, &row.timezone)
            .ok()
            .and_then(|c| c.next_after(now, false))
    };
    schedules::set_paused(&ctx.pool, name, paused, next).await?;
    get(ctx, name).await
}

fn schedule_of(row: schedules::ScheduleRow) -> Schedule {
    let next_ticks = if row.paused {
        Vec::new()
    } else {
        compile(&row.cron, &row.timezone)
            .map(|c| c.upcoming(row.next_tick_at, 5))
            .unwrap_or_default()
    };
    Schedule {
        name: row.name,
        cron: row.cron,
        timezone: row.timezone,
        workflow: row.workflow,
        input: row.input,
        overlap: row.overlap,
        catch_up: row.catch_up,
        catch_up_window_ms: row.catch_up_window_ms,
        paused: row.paused,
        next_ticks,
        last_tick_at: row.last_tick_at,
        recent_ticks: Vec::new(),
        created_at: row.created_at,
        updated_at: row.updated_at,
    }
}

fn check_name(name: &str) -> Result<()> {
    if crate::service::jobs::valid_queue_name(name) {
        Ok(())
    } else {
        Err(Error::invalid(
            "name",
            "must be 1-128 characters of letters, digits, '_', '.', ':' or '-', starting with a letter or digit",
        ))
    }
}

/// What one pass fired.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FireReport {
    /// Runs started (by new ticks, replacing ticks and queued ticks).
    pub started: u64,
    pub skipped: u64,
    pub queued: u64,
    pub failed: u64,
}

/// Fires every tick due at `at` (`None`: the database's now): one schedule per transaction,
/// each locked so that no other replica fires it meanwhile; then starts queued ticks whose
/// schedule's runs have ended.
pub async fn fire_due(pool: &PgPool, at: Option<DateTime<Utc>>) -> Result<FireReport> {
    let mut report = FireReport::default();
    for _ in 0..MAX_SCHEDULES_PER_PASS {
        let mut tx = pool.begin().await?;
        let Some(due) = schedules::claim_due(&mut tx, at).await? else {
            break;
        };
        let now = schedules::clock(&mut *tx, at).await?;
        fire_one(&mut tx, &due, now, &mut report).await?;
        tx.commit().await?;
    }
    for _ in 0..MAX_SCHEDULES_PER_PASS {
        let mut tx = pool.begin().await?;
        let Some((name, tick_at, workflow, input)) = schedules::claim_queued(&mut tx).await? else {
            break;
        };
        let (outcome, run_id, error) = start(&mut tx, &workflow, &input, "started").await?;
        schedules::set_tick(&mut tx, &name, tick_at, outcome, run_id, error.as_deref()).await?;
        tx.commit().await?;
        count(&mut report, outcome);
    }
    Ok(report)
}

/// Fires a locked schedule's due ticks and moves it on.
async fn fire_one(
    tx: &mut sqlx::PgConnection,
    due: &schedules::DueSchedule,
    now: DateTime<Utc>,
    report: &mut FireReport,
) -> Result<()> {
    let Ok(compiled) = compile(&due.cron, &due.timezone) else {
        // Stored before a parser change made it invalid: look again in a day, loudly.
        tracing::error!(schedule = %due.name, cron = %due.cron, "a stored schedule no longer parses");
        let later = now + chrono::Duration::days(1);
        return schedules::advance(tx, &due.name, later, None).await;
    };
    let (ticks, more) =
        compiled.due_ticks(due.next_tick_at, now, &due.catch_up, due.catch_up_window_ms);
    for &tick in &ticks {
        let running = match schedules::last_run(tx, &due.name).await? {
            Some((run_id, state)) if state == "running" => Some(run_id),
            _ => None,
        };
        let decision = match (due.overlap.as_str(), running) {
            ("skip", Some(_)) => Decision::Record("skipped"),
            ("queue_one", Some(_)) => {
                if schedules::has_queued_tick(tx, &due.name).await? {
                    Decision::Record("skipped")
                } else {
                    Decision::Record("queued")
                }
            }
            ("replace", Some(run)) => Decision::Replace(run),
            _ => Decision::Start,
        };
        let provisional = match decision {
            Decision::Record(outcome) => outcome,
            Decision::Start => "started",
            Decision::Replace(_) => "replaced",
        };
        // The unique row first: a tick fired before (by any replica) fires nothing now.
        if !schedules::record_tick(tx, &due.name, tick, provisional, None).await? {
            continue;
        }
        match decision {
            Decision::Record(outcome) => count(report, outcome),
            Decision::Start | Decision::Replace(_) => {
                if let Decision::Replace(run) = decision {
                    schedules::cancel_run(tx, run).await?;
                }
                let (outcome, run_id, error) =
                    start(tx, &due.workflow, &due.input, provisional).await?;
                schedules::set_tick(tx, &due.name, tick, outcome, run_id, error.as_deref()).await?;
                count(report, outcome);
            }
        }
    }
    // On from the last tick fired when a catch-up goes on, else from now.
    let from = if more {
        ticks.last().copied().unwrap_or(now)
    } else {
        now
    };
    let next = compiled
        .next_after(from, false)
        .unwrap_or(now + chrono::Duration::days(3650));
    schedules::advance(tx, &due.name, next, ticks.last().copied()).await
}

#[derive(Clone, Copy)]
enum Decision {
    Start,
    Replace(i64),
    Record(&'static str),
}

/// Starts a run in a savepoint: a workflow that cannot start (deleted) makes the tick
/// `failed` with the reason, and the schedule goes on.
async fn start(
    tx: &mut sqlx::PgConnection,
    workflow: &str,
    input: &Value,
    outcome: &'static str,
) -> Result<(&'static str, Option<i64>, Option<String>)> {
    match schedules::start_run(tx, workflow, input).await? {
        Ok(run_id) => Ok((outcome, Some(run_id), None)),
        Err(err) => {
            tracing::warn!(%workflow, error = %err, "a scheduled run could not start");
            Ok(("failed", None, Some(err.to_string())))
        }
    }
}

fn count(report: &mut FireReport, outcome: &str) {
    match outcome {
        "started" | "replaced" => report.started += 1,
        "skipped" => report.skipped += 1,
        "queued" => report.queued += 1,
        _ => report.failed += 1,
    }
}

/// Fires due ticks every `interval` until `shutdown`; errors are logged and retried on the
/// next pass. Runs on every replica: the locks make each tick fire once.
pub async fn run(pool: PgPool, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        match fire_due(&pool, None).await {
            Ok(report) if report != FireReport::default() => {
                tracing::debug!(?report, "cron ticks fired")
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "firing cron ticks failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn the_cron_table_reads_its_forms_and_zones() {
        let hourly = compile("@hourly", "UTC").unwrap();
        assert_eq!(
            hourly.upcoming(at("2026-11-30T10:15:00Z"), 2),
            [at("2026-11-30T11:00:00Z"), at("2026-11-30T12:00:00Z")]
        );
        let five = compile("30 9 * * 1-5", "Europe/Berlin").unwrap();
        // Monday 2026-11-30, 09:30 in Berlin is 08:30 UTC (winter time).
        assert_eq!(
            five.next_after(at("2026-11-30T00:00:00Z"), false),
            Some(at("2026-11-30T08:30:00Z"))
        );
        let seconds = compile("*/20 * * * * *", "UTC").unwrap();
        assert_eq!(
            seconds.upcoming(at("2026-11-30T10:00:05Z"), 3),
            [
                at("2026-11-30T10:00:20Z"),
                at("2026-11-30T10:00:40Z"),
                at("2026-11-30T10:01:00Z")
            ]
        );
        for (cron, zone, field) in [
            ("61 * * * *", "UTC", "cron"),
            ("* * *", "UTC", "cron"),
            ("@sometimes", "UTC", "cron"),
            ("0 * * * *", "Mars/Olympus", "timezone"),
            ("", "UTC", "cron"),
        ] {
            let problems = compile(cron, zone).unwrap_err();
            assert_eq!(problems[0].0, field, "{cron} {zone}: {problems:?}");
        }
    }

    #[test]
    fn dst_gaps_fire_once_after_the_gap_and_repeated_hours_once() {
        // Europe/Berlin springs forward at 2026-03-29 02:00 (to 03:00) and falls back at
        // 2026-10-25 03:00 (to 02:00).
        let daily = compile("30 2 * * *", "Europe/Berlin").unwrap();
        let spring = daily.upcoming(at("2026-03-28T12:00:00Z"), 2);
        // 02:30 does not exist on the 29th: it fires at 03:00 local (01:00 UTC), once.
        assert_eq!(spring[0], at("2026-03-29T01:00:00Z"));
        assert_eq!(spring[1], at("2026-03-30T00:30:00Z"));
        let autumn = daily.upcoming(at("2026-10-24T12:00:00Z"), 2);
        // 02:30 happens twice on the 25th: it fires at the first (00:30 UTC) only.
        assert_eq!(autumn[0], at("2026-10-25T00:30:00Z"));
        assert_eq!(autumn[1], at("2026-10-26T01:30:00Z"));
    }

    #[test]
    fn a_pattern_that_never_fires_is_found_quickly() {
        let february_30 = compile("0 0 30 2 *", "UTC").unwrap();
        let started = std::time::Instant::now();
        assert_eq!(
            february_30.next_after(at("2026-11-30T00:00:00Z"), false),
            None
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn catch_up_keeps_what_its_policy_says() {
        let minutely = compile("* * * * *", "UTC").unwrap();
        let due = at("2026-11-30T10:00:00Z");
        let now = at("2026-11-30T12:00:30Z");
        let (none, _) = minutely.due_ticks(due, now, "none", 0);
        assert_eq!(none, [at("2026-11-30T12:00:00Z")], "only what is not late");
        let (latest, _) = minutely.due_ticks(due, now, "latest", 0);
        assert_eq!(latest, [at("2026-11-30T12:00:00Z")]);
        let (all, more) = minutely.due_ticks(due, now, "all", 3_600_000);
        assert_eq!(all.len(), 60, "the ticks of the last hour");
        assert!(!more);
        assert_eq!(all[0], at("2026-11-30T11:01:00Z"));
        let secondly = compile("* * * * * *", "UTC").unwrap();
        let (first, more) = secondly.due_ticks(due, now, "all", 86_400_000);
        assert_eq!(first.len(), MAX_TICKS_PER_PASS);
        assert!(more, "a long catch-up goes on next pass");
    }
}
