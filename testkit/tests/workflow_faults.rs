//! F-05: a scheduler killed (SIGKILL) again and again while a run advances and while cron
//! ticks fire. A step's end and its children's release commit together, and a tick's row
//! commits with its run, so each step is released once and each tick fires once, whenever
//! the kill lands.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sluice_protocol::api::paths as api_paths;
use sluice_testkit::{wait_until, Api, Scheduler, TempDir, TestDb, Timings};

/// Kill intervals that vary without a random source, so a failure replays.
const PAUSES_MS: [u64; 7] = [350, 120, 600, 240, 480, 90, 300];

async fn finished(api: &Api, id: i64, deadline: Duration) -> Value {
    api.run_finished(id, deadline).await
}

#[derive(Debug, Default)]
struct Attempt {
    start: Option<i128>,
    end: Option<i128>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f05_a_scheduler_killed_while_a_run_advances_releases_each_step_once() {
    let db = TestDb::new().await;
    let mut scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _runner = scheduler.runner("f05-runner", 2).await;
    let scratch = TempDir::shared("f05-ledger");
    let ledger = scratch.shared_file("ledger");
    let steps = 12;
    let mut definition = Vec::new();
    for i in 0..steps {
        let mut step = json!({
            "id": format!("s{i}"),
            "kind": "bash",
            "script": format!(
                "echo \"start s{i} $TASK_ID $ATTEMPT $(date +%s%N)\" >> \"$LEDGER\"; sleep 0.{}; \
                 echo \"end s{i} $TASK_ID $ATTEMPT $(date +%s%N)\" >> \"$LEDGER\"",
                1 + i % 3
            ),
            "env": {"LEDGER": ledger.to_string_lossy()},
            "max_attempts": 10,
        });
        if i > 0 {
            step["depends_on"] = json!([format!("s{}", i - 1)]);
        }
        definition.push(step);
    }
    let api = scheduler.api();
    let (status, body) = api
        .put_text(
            &api_paths::workflow("chain"),
            json!({ "steps": definition }).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, started) = api
        .post(api_paths::WORKFLOWS_RUN, &json!({"workflow": "chain"}))
        .await;
    assert_eq!(status, 201, "{started}");
    let run_id = started["run_id"].as_i64().unwrap();

    let mut kills = 0;
    loop {
        let (_, run) = api.get(&api_paths::run(run_id)).await;
        if run["state"] != "running" || kills >= 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(PAUSES_MS[kills % PAUSES_MS.len()])).await;
        scheduler.kill_and_restart().await;
        kills += 1;
    }
    let api = scheduler.api();
    let run = finished(&api, run_id, Duration::from_secs(120)).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert!(kills >= 3, "only {kills} kills before the run ended");

    // Each step was released once: one job per step, and it succeeded.
    let jobs: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT step_id, count(*), string_agg(state::text, ',')
         FROM sluice.jobs WHERE workflow_run_id = $1 GROUP BY step_id ORDER BY step_id",
    )
    .bind(run_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(jobs.len(), steps, "{jobs:?}");
    for (step, count, states) in &jobs {
        assert_eq!((*count, states.as_str()), (1, "succeeded"), "step {step}");
    }

    // Attempts never overlap, and no step started before its parent's last attempt ended.
    let text = std::fs::read_to_string(&ledger).unwrap();
    let mut attempts: BTreeMap<(String, i64, i32), Attempt> = BTreeMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [what, step, job, attempt, at] = parts[..] else {
            panic!("ledger line {line:?}");
        };
        let entry = attempts
            .entry((step.into(), job.parse().unwrap(), attempt.parse().unwrap()))
            .or_default();
        let at = Some(at.parse().unwrap());
        match what {
            "start" => entry.start = at,
            _ => entry.end = at,
        }
    }
    let mut last_end: BTreeMap<usize, i128> = BTreeMap::new();
    let mut first_start: BTreeMap<usize, i128> = BTreeMap::new();
    for ((step, _, _), attempt) in &attempts {
        let index: usize = step[1..].parse().unwrap();
        let start = attempt.start.expect("every attempt logged its start");
        first_start
            .entry(index)
            .and_modify(|s| *s = (*s).min(start))
            .or_insert(start);
        if let Some(end) = attempt.end {
            last_end
                .entry(index)
                .and_modify(|e| *e = (*e).max(end))
                .or_insert(end);
        }
    }
    for i in 1..steps {
        assert!(
            first_start[&i] >= last_end[&(i - 1)],
            "s{i} started before s{} ended",
            i - 1
        );
    }
    let repeated = attempts.len() - steps;
    eprintln!("F-05 (steps): {kills} kills, {repeated} repeated attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f05_a_scheduler_killed_mid_tick_fires_each_tick_once() {
    let db = TestDb::new().await;
    // A short cron interval, so kills often land inside a tick's transaction.
    let mut scheduler =
        Scheduler::start_with(&db, Timings::TEST, &[("SLUICE_CRON_INTERVAL_MS", "20")]).await;
    let api = scheduler.api();
    let (status, body) = api
        .put_text(
            &api_paths::workflow("pulse"),
            "steps:\n  - {id: only, kind: noop}\n",
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = api
        .put_text(
            &api_paths::schedule("pulse"),
            json!({"cron": "* * * * * *", "workflow": "pulse"}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    for pause in PAUSES_MS.iter().chain(PAUSES_MS.iter()) {
        tokio::time::sleep(Duration::from_millis(*pause + 250)).await;
        scheduler.kill_and_restart().await;
    }
    let restarted: (DateTime<Utc>,) = sqlx::query_as("SELECT now()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // Ticks go on after the last restart.
    wait_until(
        "two ticks after the last restart",
        Duration::from_secs(20),
        || {
            let pool = db.pool.clone();
            async move {
                let (n,): (i64,) =
                    sqlx::query_as("SELECT count(*) FROM sluice.schedule_ticks WHERE tick_at > $1")
                        .bind(restarted.0)
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                if n >= 2 {
                    Ok(Some(()))
                } else {
                    Err(format!("{n} ticks"))
                }
            }
        },
    )
    .await;
    let (status, _) = api
        .post(&api_paths::pause_schedule("pulse"), &json!({}))
        .await;
    assert_eq!(status, 200);
    let (ticks, started, runs, jobs, first, last): (
        i64,
        i64,
        i64,
        i64,
        DateTime<Utc>,
        DateTime<Utc>,
    ) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM sluice.schedule_ticks),
                (SELECT count(DISTINCT run_id) FROM sluice.schedule_ticks
                  WHERE outcome = 'started'),
                (SELECT count(*) FROM sluice.workflow_runs),
                (SELECT count(*) FROM sluice.jobs WHERE workflow_run_id IS NOT NULL),
                (SELECT min(tick_at) FROM sluice.schedule_ticks),
                (SELECT max(tick_at) FROM sluice.schedule_ticks)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(started, ticks, "every tick started its own run");
    assert_eq!(runs, ticks, "one run per tick");
    assert_eq!(jobs, runs, "one step job per run");
    assert_eq!(
        (last - first).num_seconds() + 1,
        ticks,
        "a tick every second from {first} to {last}: none lost to a kill"
    );
    eprintln!("F-05 (cron): {ticks} ticks across 14 kills");
}
