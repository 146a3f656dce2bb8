//! F-29: cancel a running job and retry it at once. The old attempt's tool must die within a
//! heartbeat, and the new attempt must not start until it has: at no moment do tools of two
//! attempts of one job run together, on one runner or across two.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_protocol::{api::paths as api_paths, JobId};
use sluice_testkit::{procs, wait_until, Runner, Scheduler, TestDb, Timings};
use uuid::Uuid;

/// The attempts of each job whose tools are alive now (processes carrying `marker`).
fn live_attempts(marker: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut live: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for tool in procs::live() {
        if tool.env("F29_MARKER") != Some(marker.as_bytes()) {
            continue;
        }
        if let (Some(job), Some(attempt)) = (tool.env("TASK_ID"), tool.env("ATTEMPT")) {
            live.entry(String::from_utf8_lossy(job).into_owned())
                .or_default()
                .insert(String::from_utf8_lossy(attempt).into_owned());
        }
    }
    live
}

/// Watches the process table until dropped, recording every moment two attempts of one job
/// were alive together.
struct OverlapWatch {
    stop: Arc<AtomicBool>,
    overlaps: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OverlapWatch {
    fn start(marker: String) -> OverlapWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let overlaps = Arc::new(Mutex::new(Vec::new()));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            let overlaps = overlaps.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    for (job, attempts) in live_attempts(&marker) {
                        if attempts.len() > 1 {
                            overlaps
                                .lock()
                                .unwrap()
                                .push(format!("job {job}: attempts {attempts:?} alive at once"));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        OverlapWatch {
            stop,
            overlaps,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        self.overlaps.lock().unwrap().clone()
    }
}

fn rounds() -> usize {
    std::env::var("SLUICE_F29_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

async fn cancel_and_retry_rounds(runner_slots: &[u32]) {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let mut runners = Vec::new();
    for (n, slots) in runner_slots.iter().enumerate() {
        runners.push(Runner::start(&scheduler, &format!("f29-{n}"), *slots, &[]).await);
    }
    let marker = Uuid::new_v4().simple().to_string();
    let watch = OverlapWatch::start(marker.clone());
    let heartbeat = Duration::from_millis(Timings::TEST.heartbeat_ms);
    // The first attempt runs until it is killed (it ignores nothing: SIGTERM ends it); every
    // later attempt succeeds at once.
    // Later attempts live half a second, long enough for the watch to see them beside a
    // first one that is still alive.
    let script = r#"if [ "$ATTEMPT" = 1 ]; then sleep 120 & wait; else sleep 0.5; fi; echo "attempt $ATTEMPT""#;
    for round in 0..rounds() {
        let id = api
            .enqueue(json!({"spec": {"kind": "bash", "script": script,
                                     "env": {"F29_MARKER": marker}},
                            "max_attempts": 1}))
            .await;
        let job = id.to_string();
        wait_until(
            &format!("round {round}: attempt 1 of job {id} to run"),
            Duration::from_secs(15),
            || {
                let alive = live_attempts(&marker)
                    .get(&job)
                    .is_some_and(|a| a.contains("1"));
                async move { Ok::<_, String>(alive.then_some(())) }
            },
        )
        .await;

        let cancelled_at = Instant::now();
        let (status, body) = api.post(&api_paths::cancel(JobId(id)), &json!({})).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = api.post(&api_paths::retry(JobId(id)), &json!({})).await;
        assert_eq!(status, 200, "{body}");

        // The cancelled attempt's tools are gone within one heartbeat (plus the time to
        // deliver the order and reap).
        wait_until(
            &format!("round {round}: the cancelled attempt of job {id} to die"),
            Duration::from_secs(10),
            || {
                let alive = live_attempts(&marker)
                    .get(&job)
                    .is_some_and(|a| a.contains("1"));
                async move { Ok::<_, String>((!alive).then_some(())) }
            },
        )
        .await;
        let died_after = cancelled_at.elapsed();
        assert!(
            died_after <= heartbeat + Duration::from_millis(1500),
            "round {round}: the cancelled tool lived {died_after:?} after the cancel"
        );

        let done = api.wait_terminal(id, Duration::from_secs(30)).await;
        assert_eq!(done["state"], "succeeded", "round {round}: {done}");
        assert_eq!(done["attempt"], 2, "{done}");
        assert_eq!(done["result"]["stdout_tail"], "attempt 2\n", "{done}");
        assert_eq!(done["attempts"][0]["outcome"], "cancelled", "{done}");
        assert_ne!(done["error"]["code"], "runner_lost", "{done}");
    }
    let overlaps = watch.finish();
    assert!(overlaps.is_empty(), "{overlaps:?}");
    let stops = db.count("SELECT count(*) FROM sluice.attempt_stops").await;
    assert_eq!(stops, 0, "every stop was confirmed by its runner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f29_cancel_then_retry_never_runs_two_attempts_at_once_on_one_runner() {
    cancel_and_retry_rounds(&[2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f29_cancel_then_retry_never_runs_two_attempts_at_once_across_two_runners() {
    cancel_and_retry_rounds(&[1, 1]).await;
}

/// Without a confirmation the retry still starts, once the stopped attempt's lease would have
/// run out: a runner that died with its order unheard cannot hold the job forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waits_at_most_until_the_stopped_attempts_lease_would_end() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "sleep 600"}}))
        .await;
    let silent = sluice_testkit::FakeRunner::register(&scheduler, "silent").await;
    let task = silent.claim(1, 2000).await.remove(0);
    assert_eq!(task.job_id.0, id);
    let (status, _) = api.post(&api_paths::cancel(JobId(id)), &json!({})).await;
    assert_eq!(status, 200);
    let (status, body) = api.post(&api_paths::retry(JobId(id)), &json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["state"], "scheduled",
        "the retry waits for the stop: {body}"
    );
    // The silent runner never confirms; the retry is claimable within a lease and a reaper
    // pass.
    let other = sluice_testkit::FakeRunner::register(&scheduler, "other").await;
    let started = Instant::now();
    let retried = wait_until("the retry to be claimable", Duration::from_secs(10), || {
        let other = &other;
        async move {
            let tasks = other.claim(1, 100).await;
            Ok::<_, String>(tasks.into_iter().next())
        }
    })
    .await;
    assert_eq!(retried.job_id.0, id);
    assert_eq!(retried.attempt.0, 2);
    let waited = started.elapsed();
    // A lease and a reaper pass, with room for a loaded machine.
    let bound =
        Duration::from_millis(Timings::FAST.lease_ms + Timings::FAST.reaper_interval_ms + 3000);
    assert!(waited <= bound, "waited {waited:?}, more than {bound:?}");
}

/// A retry that arrives while a cancel of the running attempt is still committing waits for
/// the row, then must see the stop that cancel wrote: it waits as `scheduled`, never starts
/// beside the old tool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_racing_a_cancel_sees_its_stop() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "sleep 600"}}))
        .await;
    let runner = sluice_testkit::FakeRunner::register(&scheduler, "held").await;
    assert_eq!(runner.claim(1, 2000).await.len(), 1);
    // A cancel in progress: the row locked, the job cancelled, its stop written, not committed.
    let mut cancel = db.pool.begin().await.unwrap();
    sqlx::query(
        "UPDATE sluice.jobs SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL
         WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *cancel)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO sluice.attempt_stops (job_id, attempt, runner_id, stop_by)
         VALUES ($1, 1, $2, now() + interval '30 seconds')",
    )
    .bind(id)
    .bind(runner.runner_id.0)
    .execute(&mut *cancel)
    .await
    .unwrap();
    let retry = tokio::spawn({
        let api = api.clone();
        async move { api.post(&api_paths::retry(JobId(id)), &json!({})).await }
    });
    wait_until(
        "the retry to wait for the row",
        Duration::from_secs(10),
        || {
            let pool = db.pool.clone();
            async move {
                let (waiting,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE%'",
                )
                .fetch_one(&pool)
                .await
                .map_err(|e| e.to_string())?;
                Ok((waiting > 0).then_some(()))
            }
        },
    )
    .await;
    cancel.commit().await.unwrap();
    let (status, body) = retry.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["state"], "scheduled",
        "the retry missed the stop: {body}"
    );
}

/// A stale heartbeat (numbered before the one that heard the stop order) that no longer
/// lists the attempt confirms nothing; a later one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_later_heartbeat_confirms_a_stop() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "sleep 600"}}))
        .await;
    let runner = sluice_testkit::FakeRunner::register(&scheduler, "numbered").await;
    let task = runner.claim(1, 2000).await.remove(0);
    let (status, _) = api.post(&api_paths::cancel(JobId(id)), &json!({})).await;
    assert_eq!(status, 200);
    let heartbeat = |seq: u64, listed: bool| {
        let runner = &runner;
        let leases = if listed { vec![task.lease()] } else { vec![] };
        async move {
            let (status, body) = runner.heartbeat(&leases, Some(seq)).await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };
    let stops = || db.count("SELECT count(*) FROM sluice.attempt_stops");
    // Heard at 5 (the order goes out with the answer).
    let answer = heartbeat(5, true).await;
    assert_eq!(answer["cancel"][0]["reason"], "cancelled", "{answer}");
    // A stale heartbeat built before the attempt was known: no confirmation.
    heartbeat(4, false).await;
    assert_eq!(stops().await, 1);
    let (status, body) = api.post(&api_paths::retry(JobId(id)), &json!({})).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("scheduled")),
        "{body}"
    );
    // The next heartbeat no longer lists it: the tool is gone, the retry may start.
    heartbeat(6, false).await;
    assert_eq!(stops().await, 0);
    let (_, job) = api.get(&api_paths::job(JobId(id))).await;
    assert_eq!(job["state"], "available", "{job}");
}
