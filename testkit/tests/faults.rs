//! Fault injection with real processes, checked against RELIABILITY.md's invariants with a
//! ledger that every tool run appends to (not by reading logs).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_protocol::api::paths as api_paths;
use sluice_testkit::{poll_until, procs, wait_until, Runner, Scheduler, TempDir, TestDb, Timings};
use uuid::Uuid;

/// Heartbeat 150 ms, lease 600 ms, reaper 100 ms: R = lease + reaper + 1 s = 1.7 s.
const FAULT_TIMINGS: Timings = Timings {
    heartbeat_ms: 150,
    lease_ms: 600,
    reaper_interval_ms: 100,
};

/// Tool processes (carrying `marker` in their environment) that no live sidecar owns: no
/// process in `live` is among their ancestors.
fn orphaned_tools(marker: &str, live: &[i32]) -> Vec<i32> {
    let mut orphans = Vec::new();
    for tool in procs::live().into_iter().filter(|p| p.has_var(marker)) {
        let mut ancestor = Some(tool.ppid);
        let mut owned = false;
        while let Some(p) = ancestor {
            if live.contains(&p) {
                owned = true;
                break;
            }
            if p <= 1 {
                break;
            }
            ancestor = procs::parent_of(p);
        }
        if !owned {
            orphans.push(tool.pid);
        }
    }
    orphans
}

/// `Some` once the runner instance holds no live lease (for `wait_until`).
async fn no_live_leases(pool: sqlx::PgPool, runner_id: Uuid) -> Result<Option<()>, String> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM sluice.jobs WHERE runner_id = $1 AND state = 'running'",
    )
    .bind(runner_id)
    .fetch_one(&pool)
    .await
    .map_err(|e| e.to_string())?;
    if n == 0 {
        Ok(Some(()))
    } else {
        Err(format!("{n} live leases"))
    }
}

#[derive(Debug, Default)]
struct LedgerAttempt {
    start: Option<i128>,
    end: Option<i128>,
}

fn read_ledger(path: &std::path::Path) -> BTreeMap<(i64, i32), LedgerAttempt> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut ledger: BTreeMap<(i64, i32), LedgerAttempt> = BTreeMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() != 4 {
            continue;
        }
        let key = (parts[1].parse().unwrap(), parts[2].parse().unwrap());
        let at: i128 = parts[3].parse().unwrap();
        let entry = ledger.entry(key).or_default();
        match parts[0] {
            "start" => entry.start = Some(at),
            "end" => entry.end = Some(at),
            _ => {}
        }
    }
    ledger
}

/// F-01: `kill -9` of a sidecar mid-task, repeatedly. Nothing is lost, nothing completes
/// twice, attempts of one job never overlap, every killed attempt is reclaimed within R, and
/// no tool process outlives its sidecar by more than a second. `SLUICE_F01_CYCLES` raises the
/// cycle count for a soak (`task soak`); CI runs 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f01_killing_sidecars_mid_task_loses_nothing_and_runs_nothing_twice() {
    let cycles: usize = std::env::var("SLUICE_F01_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, FAULT_TIMINGS).await;
    let api = scheduler.api();
    let scratch = TempDir::shared("f01-ledger");
    let ledger = scratch.shared_file("ledger");
    let marker = format!("F01_MARKER=f01-{}", Uuid::new_v4().simple());
    let (marker_name, marker_value) = marker.split_once('=').unwrap();

    // The background sleep would outlive a killed sidecar without a PID namespace per tool.
    let script = r#"sleep 30 & echo "start $TASK_ID $ATTEMPT $(date +%s%N)" >> "$LEDGER"; sleep 0.$((RANDOM % 7 + 2)); echo "end $TASK_ID $ATTEMPT $(date +%s%N)" >> "$LEDGER""#;
    let total_jobs = (cycles * 6).max(60);
    let jobs: Vec<_> = (0..total_jobs)
        .map(|_| {
            json!({"spec": {"kind": "bash", "script": script,
                            "env": {"LEDGER": ledger.to_string_lossy(), marker_name: marker_value}},
                   "max_attempts": 10})
        })
        .collect();
    for chunk in jobs.chunks(500) {
        let (status, body) = api
            .post(api_paths::JOBS_BATCH, &json!({ "jobs": chunk }))
            .await;
        assert_eq!(status, 201, "{body}");
    }

    let pods = ["f01-a", "f01-b", "f01-c"];
    let mut runners: Vec<Runner> = Vec::new();
    for pod in pods {
        runners.push(Runner::start(&scheduler, pod, 2, &[]).await);
    }
    let r_bound =
        Duration::from_millis(FAULT_TIMINGS.lease_ms + FAULT_TIMINGS.reaper_interval_ms + 1000);
    let mut kills = 0;
    let mut max_reclaim = Duration::ZERO;
    let mut max_rereg = Duration::ZERO;
    for cycle in 0..cycles {
        let index = cycle % runners.len();
        let pod = pods[index];
        // Kill only while the sidecar holds a live lease (mid-task).
        let busy = poll_until(Duration::from_secs(5), || {
            let pool = db.pool.clone();
            async move {
                let (n,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM sluice.jobs j JOIN sluice.runners r ON r.id = j.runner_id
                     WHERE j.state = 'running' AND r.pod_name = $1 AND r.state <> 'gone'",
                )
                .bind(pod)
                .fetch_one(&pool)
                .await
                .map_err(|e| e.to_string())?;
                Ok((n > 0).then_some(()))
            }
        })
        .await;
        if busy.is_err() {
            continue; // the backlog ran dry for this runner
        }
        let (runner_id,): (Uuid,) =
            sqlx::query_as("SELECT id FROM sluice.runners WHERE pod_name = $1 AND state <> 'gone'")
                .bind(pod)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        let killed_at = Instant::now();
        runners[index].kill().await;
        kills += 1;

        // No tool of the killed sidecar (nor its background children) may survive it by more
        // than a second.
        let live: Vec<i32> = runners
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .filter_map(|(_, r)| r.pid().map(|p| p as i32))
            .collect();
        let marker_text = marker.clone();
        wait_until(
            "the killed sidecar's tools to die",
            Duration::from_secs(1),
            || {
                let orphans = orphaned_tools(&marker_text, &live);
                async move {
                    if orphans.is_empty() {
                        Ok(Some(()))
                    } else {
                        Err(format!("orphaned tool processes {orphans:?}"))
                    }
                }
            },
        )
        .await;

        if cycle % 2 == 0 {
            // Nobody restarts: the reaper alone reclaims within R.
            wait_until(
                "the killed runner's leases to be reclaimed",
                r_bound * 2,
                || no_live_leases(db.pool.clone(), runner_id),
            )
            .await;
            let reclaim = killed_at.elapsed();
            max_reclaim = max_reclaim.max(reclaim);
            assert!(
                reclaim <= r_bound,
                "reclaimed after {reclaim:?}, bound {r_bound:?}"
            );
        }
        // Restart under the same pod name (F-25): a new instance id, and the old instance's
        // leases end at registration, so they are reclaimed within a second, not after R.
        runners[index] = Runner::start(&scheduler, pod, 2, &[]).await;
        if cycle % 2 == 1 {
            let restarted = Instant::now();
            wait_until(
                "the old instance's leases to end after re-registration",
                Duration::from_secs(5),
                || no_live_leases(db.pool.clone(), runner_id),
            )
            .await;
            let after = restarted.elapsed();
            max_rereg = max_rereg.max(after);
            assert!(
                after <= Duration::from_secs(1) + Duration::from_millis(500),
                "old leases ended {after:?} after the restart"
            );
        }
    }
    assert!(kills >= cycles / 2, "only {kills} kills happened");

    // Every job reaches a terminal state.
    let deadline = Duration::from_secs(120);
    wait_until("every job to finish", deadline, || {
        let pool = db.pool.clone();
        async move {
            let (open,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM sluice.jobs WHERE state NOT IN ('succeeded', 'failed', 'cancelled')",
            )
            .fetch_one(&pool)
            .await
            .map_err(|e| e.to_string())?;
            if open == 0 {
                Ok(Some(()))
            } else {
                Err(format!("{open} jobs still open"))
            }
        }
    })
    .await;

    // I1: nothing lost — succeeded, or failed only as a poison pill after 3 lost runners.
    let states: Vec<(i64, String, Option<String>)> =
        sqlx::query_as("SELECT id, state::text, error->>'code' FROM sluice.jobs ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(states.len(), total_jobs);
    for (id, state, code) in &states {
        assert!(
            state == "succeeded" || (state == "failed" && code.as_deref() == Some("runner_lost")),
            "job {id} ended {state} ({code:?})"
        );
    }
    // I2: at most one accepted completion per job.
    let doubles = db
        .count(
            "SELECT count(*) FROM (SELECT job_id FROM sluice.job_attempts
             WHERE outcome IN ('succeeded', 'failed') GROUP BY job_id HAVING count(*) > 1) d",
        )
        .await;
    assert_eq!(doubles, 0, "jobs with two accepted completions");
    // I3: attempts of one job never overlap in the ledger; each success has a full run.
    let ledger = read_ledger(&ledger);
    let mut by_job: HashMap<i64, Vec<(i32, &LedgerAttempt)>> = HashMap::new();
    for ((job, attempt), entry) in &ledger {
        by_job.entry(*job).or_default().push((*attempt, entry));
    }
    for (job, attempts) in &by_job {
        for pair in attempts.windows(2) {
            let (earlier, later) = (pair[0].1, pair[1].1);
            if let (Some(end), Some(start)) = (earlier.end, later.start) {
                assert!(
                    end < start,
                    "job {job}: attempts {} and {} overlap",
                    pair[0].0,
                    pair[1].0
                );
            }
        }
    }
    let succeeded: Vec<(i64, i32)> =
        sqlx::query_as("SELECT id, attempt FROM sluice.jobs WHERE state = 'succeeded'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for (job, attempt) in succeeded {
        let entry = ledger.get(&(job, attempt));
        assert!(
            entry.is_some_and(|e| e.start.is_some() && e.end.is_some()),
            "job {job} attempt {attempt} succeeded without a full ledger run"
        );
    }
    eprintln!(
        "F-01: {kills} kills, max reclaim {max_reclaim:?} (bound {r_bound:?}), \
         old leases ended at most {max_rereg:?} after a same-name restart"
    );
}
