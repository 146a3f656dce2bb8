//! Item 9 of issue 17, L-01's "0 deadlock detected": several runners' heartbeats, claims and
//! completion batches, the reaper, enqueues, cancels and retries all at once, with the lab's
//! `deadlock_timeout = 1s` and `log_lock_waits`; the Postgres log must hold no deadlock and no
//! runner may ever get a 500.

use std::time::{Duration, Instant};

use serde_json::json;
use sluice_protocol::{api::paths as api_paths, JobId};
use sluice_testkit::{postgres_log, FakeRunner, Runner, Scheduler, TestDb, Timings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_claims_completions_reaper_enqueues_and_cancels_never_deadlock() {
    let (_, log_start) = postgres_log(0);
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    let mut runners = Vec::new();
    for n in 0..4 {
        runners.push(Runner::start(&scheduler, &format!("busy-{n}"), 16, &[]).await);
    }
    let seconds: u64 = std::env::var("SLUICE_DEADLOCK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let until = Instant::now() + Duration::from_secs(seconds);

    // Enqueues: batches of quick jobs and short sleeps, so completions come in batches.
    let enqueuer = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            while Instant::now() < until {
                let jobs: Vec<_> = (0..40)
                    .map(|i| {
                        if i % 4 == 0 {
                            json!({"spec": {"kind": "bash", "script": "sleep 0.0$((RANDOM % 9))"}})
                        } else {
                            json!({"spec": {"kind": "noop"}})
                        }
                    })
                    .collect();
                let (status, body) = api
                    .post(api_paths::JOBS_BATCH, &json!({ "jobs": jobs }))
                    .await;
                assert_eq!(status, 201, "{body}");
                ids.extend(
                    body["jobs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter_map(|j| j["id"].as_i64()),
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ids
        })
    };
    // A silent runner that claims and never heartbeats: the reaper reclaims its leases while
    // everything else goes on.
    let silent = FakeRunner::register(&scheduler, "silent").await;
    let reaped = tokio::spawn(async move {
        let mut claimed = 0;
        while Instant::now() < until {
            claimed += silent.claim(20, 50).await.len();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        claimed
    });
    // Cancels and retries of whatever runs or waits.
    let canceller = {
        let api = api.clone();
        let pool = db.pool.clone();
        tokio::spawn(async move {
            let mut acted = 0;
            while Instant::now() < until {
                let ids: Vec<(i64, String)> = sqlx::query_as(
                    "SELECT id, state::text FROM sluice.jobs
                     WHERE state IN ('running', 'available', 'cancelled', 'failed')
                     ORDER BY random() LIMIT 8",
                )
                .fetch_all(&pool)
                .await
                .unwrap();
                for (id, state) in ids {
                    let (action, path) = if state == "cancelled" || state == "failed" {
                        ("retry", api_paths::retry(JobId(id)))
                    } else {
                        ("cancel", api_paths::cancel(JobId(id)))
                    };
                    let (status, body) = api.post(&path, &json!({})).await;
                    // On an overloaded machine a wait of over a second for a pooled
                    // connection answers 503 `unavailable` (retry later): overload, not a
                    // deadlock. A rolled-back statement would be 503 `busy`; either kind of
                    // deadlock is also caught in the Postgres log below.
                    let overloaded = status == 503 && body["error"]["code"] == "unavailable";
                    assert!(
                        status < 500 || overloaded,
                        "{action} of job {id} answered {status}: {body}"
                    );
                    acted += 1;
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            acted
        })
    };
    let enqueued = enqueuer.await.unwrap();
    let claimed_by_silent = reaped.await.unwrap();
    let acted = canceller.await.unwrap();
    assert!(
        enqueued.len() > 200,
        "only {} jobs enqueued",
        enqueued.len()
    );
    assert!(claimed_by_silent > 0, "the silent runner claimed nothing");
    assert!(acted > 20, "only {acted} cancels and retries");

    // Everything settles: no job is left running on a live runner's lost lease.
    sluice_testkit::wait_until("the queue to settle", Duration::from_secs(60), || {
        let pool = db.pool.clone();
        async move {
            let (busy,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM sluice.jobs WHERE state IN ('running', 'available')",
            )
            .fetch_one(&pool)
            .await
            .map_err(|e| e.to_string())?;
            if busy == 0 {
                Ok(Some(()))
            } else {
                Err(format!("{busy} jobs still running or available"))
            }
        }
    })
    .await;

    let (log, _) = postgres_log(log_start);
    let deadlocks: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("deadlock detected") || l.contains("Process ") || l.contains("STATEMENT")
        })
        .take(40)
        .collect();
    assert!(
        !log.contains("deadlock detected"),
        "deadlocks in the Postgres log:\n{}",
        deadlocks.join("\n")
    );
    let scheduler_log = scheduler.log_text();
    assert!(
        !scheduler_log.contains("internal error"),
        "the scheduler answered 500s:\n{}",
        scheduler_log
            .lines()
            .filter(|l| l.contains("internal error"))
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    );
    for runner in &runners {
        let text = runner.log_text();
        assert!(!text.contains(" 500 "), "a runner got a 500:\n{text}");
    }
}
