//! Faults of one runner with real sidecar processes: a graceful drain (F-19), a frozen runner
//! (F-23) and a tool that ignores SIGTERM past its timeout (F-24).

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use sluice_testkit::{procs, wait_until, Runner, Scheduler, TestDb, Timings};
use uuid::Uuid;

/// Live processes whose environment holds every one of `needles` (`NAME=value`) exactly.
fn processes_with_all(needles: &[String]) -> Vec<i32> {
    procs::live()
        .into_iter()
        .filter(|p| needles.iter().all(|n| p.has_var(n)))
        .map(|p| p.pid)
        .collect()
}

async fn running_attempt(db: &TestDb, id: i64) -> Option<(i32, String)> {
    sqlx::query_as(
        "SELECT j.attempt, r.pod_name FROM sluice.jobs j
         JOIN sluice.runners r ON r.id = j.runner_id
         WHERE j.id = $1 AND j.state = 'running'",
    )
    .bind(id)
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

/// F-19: SIGTERM mid-task drains: the sidecar stops claiming but keeps heartbeating until its
/// tool ends, so the job is not handed to the idle runner waiting next to it.
#[tokio::test]
async fn f19_a_draining_runner_finishes_its_task_without_reassignment() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    let mut draining = Runner::start(&scheduler, "draining", 1, &[]).await;
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "sleep 2; echo finished"}}))
        .await;
    wait_until(
        "the job to run on the first runner",
        Duration::from_secs(10),
        || async {
            Ok::<_, String>(
                running_attempt(&db, id)
                    .await
                    .filter(|(_, pod)| pod == "draining"),
            )
        },
    )
    .await;
    let _idle = Runner::start(&scheduler, "idle", 1, &[]).await;

    draining.signal(Signal::SIGTERM);
    let job = api.wait_terminal(id, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 1, "reassigned during the drain: {job}");
    assert_eq!(job["result"]["stdout_tail"], "finished\n");
    let status = draining.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "the drained sidecar exited with {status}");
    // After the drain it claims nothing more: a new job goes to the idle runner.
    let next = api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    let job = api.wait_terminal(next, Duration::from_secs(10)).await;
    let runner: (String,) = sqlx::query_as(
        "SELECT r.pod_name FROM sluice.job_attempts a JOIN sluice.runners r ON r.id = a.runner_id
         WHERE a.job_id = $1",
    )
    .bind(next)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(runner.0, "idle", "{job}");
}

/// F-23: a runner frozen (SIGSTOP) past its lease is reclaimed within R; when it thaws, its
/// tool is killed at once and nothing it sends is accepted.
#[tokio::test]
async fn f23_a_frozen_runner_is_reclaimed_and_its_tool_dies_when_it_thaws() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    let marker = format!("F23_MARKER={}", Uuid::new_v4().simple());
    let (name, value) = marker.split_once('=').unwrap();
    let frozen = Runner::start(&scheduler, "frozen", 1, &[]).await;
    let id = api
        .enqueue(
            json!({"spec": {"kind": "bash", "script": "sleep 4; echo done-$ATTEMPT",
                                 "env": {name: value}}}),
        )
        .await;
    wait_until(
        "the job to run on the runner to freeze",
        Duration::from_secs(10),
        || async {
            Ok::<_, String>(
                running_attempt(&db, id)
                    .await
                    .filter(|(_, pod)| pod == "frozen"),
            )
        },
    )
    .await;
    frozen.signal(Signal::SIGSTOP);
    let frozen_at = std::time::Instant::now();
    let _healthy = Runner::start(&scheduler, "healthy", 1, &[]).await;
    wait_until(
        "the job to be reclaimed and rerun",
        Duration::from_secs(10),
        || async {
            Ok::<_, String>(
                running_attempt(&db, id)
                    .await
                    .filter(|(attempt, _)| *attempt == 2),
            )
        },
    )
    .await;
    let reclaimed_after = frozen_at.elapsed();
    let r_bound =
        Duration::from_millis(Timings::FAST.lease_ms + Timings::FAST.reaper_interval_ms + 1000);
    assert!(
        reclaimed_after <= r_bound,
        "reclaimed after {reclaimed_after:?}"
    );

    frozen.signal(Signal::SIGCONT);
    let first_attempt = [marker.clone(), "ATTEMPT=1".to_string()];
    wait_until(
        "the thawed runner's tool to die",
        Duration::from_secs(1),
        || {
            let left = processes_with_all(&first_attempt);
            async move {
                if left.is_empty() {
                    Ok(Some(()))
                } else {
                    Err(format!("attempt 1 still running as {left:?}"))
                }
            }
        },
    )
    .await;
    let job = api.wait_terminal(id, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["stdout_tail"], "done-2\n", "{job}");
    assert_eq!(job["attempts"][0]["outcome"], "lease_expired");
    let late: (i64,) = sqlx::query_as(
        "SELECT count(*) FROM sluice.job_events e JOIN sluice.job_attempts a
           ON a.job_id = e.job_id AND a.attempt = e.attempt
         WHERE e.job_id = $1 AND e.attempt = 1 AND e.at > a.finished_at",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        late.0, 0,
        "events of the frozen attempt accepted after its reclaim"
    );
}

/// F-24: a tool that ignores SIGTERM is killed after its timeout plus the kill grace, the
/// job fails as timed_out, and nothing of it is left.
#[tokio::test]
async fn f24_a_tool_ignoring_sigterm_is_killed_at_its_timeout() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let marker = format!("F24_MARKER={}", Uuid::new_v4().simple());
    let (name, value) = marker.split_once('=').unwrap();
    let _runner = Runner::start(
        &scheduler,
        "stubborn",
        1,
        &[("SLUICE_RUNNER_KILL_GRACE_MS", "300")],
    )
    .await;
    let started = std::time::Instant::now();
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "timeout_ms": 500,
                                 "script": "trap '' TERM; sleep 30 & sleep 30",
                                 "env": {name: value}}}))
        .await;
    let job = api.wait_terminal(id, Duration::from_secs(10)).await;
    let elapsed = started.elapsed();
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "timed_out", "{job}");
    assert!(
        elapsed <= Duration::from_millis(500 + 300 + 1500),
        "took {elapsed:?}"
    );
    let left = processes_with_all(&[marker]);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// S-07: a hostile tool looks for the runner's secrets in every process's environment, tries
/// `kill -9 -1` and `kill -9` of every process it can see; it finds nothing, and the runner
/// keeps working.
#[tokio::test]
async fn s07_a_hostile_tool_cannot_read_secrets_or_kill_its_runner() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let canary = format!("CANARY-{}", Uuid::new_v4().simple());
    let mut runner =
        Runner::start(&scheduler, "target", 1, &[("SLUICE_TEST_CANARY", &canary)]).await;
    // The needles never appear whole in a command line (the script's own, or grep's): they
    // are assembled into a file first.
    let (canary_a, canary_b) = canary.split_at(4);
    let secret = scheduler.runner_secret.clone();
    let (secret_a, secret_b) = secret.split_at(4);
    let hostile = format!(
        r#"printf '%s%s\n%s%s\n' '{canary_a}' '{canary_b}' '{secret_a}' '{secret_b}' > needles
found=0
for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do
  if grep -a -q -f needles "$f" 2>/dev/null; then found=$((found+1)); fi
done
echo "found=$found"
kill -9 -1 2>/dev/null
for p in /proc/[0-9]*; do kill -9 "${{p#/proc/}}" 2>/dev/null; done
echo survived"#
    );
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": hostile}, "max_attempts": 1}))
        .await;
    let job = api.wait_terminal(id, Duration::from_secs(20)).await;
    let stdout = job["result"]["stdout_tail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(stdout.contains("found=0"), "the tool found a secret: {job}");

    // The runner is alive and still runs work.
    let next = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "echo still-here"}}))
        .await;
    let job = api.wait_terminal(next, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["stdout_tail"], "still-here\n");
    assert!(runner.pid().is_some());
    let _ = &mut runner;
}

/// B-12: a tool printing far past the per-attempt cap: the stored output stops at the cap
/// with a `truncated` event, the result says so, and the sidecar's memory stays small.
#[tokio::test]
async fn b12_endless_output_is_capped_and_marked_truncated() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let cap: i64 = 200_000;
    let runner = Runner::start(
        &scheduler,
        "chatty",
        1,
        &[("SLUICE_RUNNER_MAX_OUTPUT_BYTES", &cap.to_string())],
    )
    .await;
    let id = api
        .enqueue(json!({"spec": {"kind": "bash",
                                 "script": "yes 'a line of output' | head -c 20000000; echo finished >&2"}}))
        .await;
    let job = api.wait_terminal(id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["truncated"], true, "{job}");
    // The tail is the end of the output, past the cap (head cut the last line short).
    assert!(job["result"]["stdout_tail"]
        .as_str()
        .unwrap()
        .contains("a line of output\n"));
    assert_eq!(
        job["result"]["stderr_tail"], "finished\n",
        "the tail is kept past the cap"
    );

    let (stored,): (i64,) = sqlx::query_as(
        "SELECT coalesce(sum(length(data->>'text')), 0)::bigint FROM sluice.job_events
         WHERE job_id = $1 AND kind IN ('stdout', 'stderr')",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(stored <= cap + 64 * 1024, "stored {stored} bytes of output");
    assert!(stored >= cap / 2, "stored only {stored} bytes");
    let truncated = db
        .count("SELECT count(*) FROM sluice.job_events WHERE kind = 'truncated'")
        .await;
    assert_eq!(truncated, 1);

    let peak_kib = procs::peak_rss_kib(runner.pid().unwrap()).unwrap();
    assert!(peak_kib < 64 * 1024, "sidecar peak RSS {peak_kib} KiB");
}

/// B-09: a fork bomb run by the unprivileged tool user stops at RLIMIT_NPROC; the sidecar
/// keeps heartbeating and running other work, and the bomb leaves no process behind.
#[tokio::test]
async fn b09_a_fork_bomb_is_contained_and_the_runner_keeps_working() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: RLIMIT_NPROC binds only the unprivileged tool user of a root sidecar");
        return;
    }
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let marker = format!("B09_MARKER={}", Uuid::new_v4().simple());
    let (name, value) = marker.split_once('=').unwrap();
    let runner = Runner::start(
        &scheduler,
        "bombed",
        2,
        &[("SLUICE_RUNNER_LIMIT_PROCESSES", "100")],
    )
    .await;
    let bomb = api
        .enqueue(json!({"spec": {"kind": "bash", "timeout_ms": 3000,
                                 "script": "bomb() { bomb | bomb & }; bomb; sleep 10",
                                 "env": {name: value}}, "max_attempts": 1}))
        .await;
    wait_until("the bomb to spread", Duration::from_secs(10), || {
        let left = processes_with_all(std::slice::from_ref(&marker));
        async move {
            if left.len() >= 20 {
                Ok(Some(()))
            } else {
                Err(format!("{} bomb processes", left.len()))
            }
        }
    })
    .await;
    // The other slot still runs work while the bomb is at its limit.
    let fine = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "echo fine"}}))
        .await;
    let job = api.wait_terminal(fine, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        job["attempt"], 1,
        "the runner lost its lease under the bomb: {job}"
    );

    let job = api.wait_terminal(bomb, Duration::from_secs(20)).await;
    assert_eq!(job["error"]["code"], "timed_out", "{job}");
    assert_eq!(job["attempt"], 1, "{job}");
    wait_until("the bomb to be gone", Duration::from_secs(5), || {
        let left = processes_with_all(std::slice::from_ref(&marker));
        async move {
            if left.is_empty() {
                Ok(Some(()))
            } else {
                Err(format!("{} bomb processes left", left.len()))
            }
        }
    })
    .await;
    assert!(runner.pid().is_some());
}
