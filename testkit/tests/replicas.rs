//! Two `sluice serve` replicas on one database: a job inserted anywhere wakes the claims
//! waiting on either (LISTEN/NOTIFY, not polling), and maintenance goes on when a replica dies.

use std::time::{Duration, Instant};

use serde_json::json;
use sluice_testkit::{wait_until, FakeRunner, Scheduler, TestDb, Timings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_wakes_claims_waiting_on_either_replica() {
    let db = TestDb::new().await;
    // Polling is pushed out of the way: only a notification can wake a claim in time.
    let slow_poll = [("SLUICE_CLAIM_POLL_MS", "60000")];
    let a = Scheduler::start_with(&db, Timings::TEST, &slow_poll).await;
    let b = Scheduler::start_with(&db, Timings::TEST, &slow_poll).await;
    let on_a = FakeRunner::register(&a, "waits-on-a").await;
    let on_b = FakeRunner::register(&b, "waits-on-b").await;
    for round in 0..3 {
        // Due in a second, so both claims below look first, find nothing and wait: the jobs
        // reach them through the NOTIFY of the promotion, on whichever replica promotes.
        let inserted = Instant::now();
        sqlx::query(
            "INSERT INTO sluice.jobs (spec, run_at)
             SELECT '{\"kind\":\"noop\"}', now() + interval '1 second' FROM generate_series(1, 2)",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        let claim_a = tokio::spawn({
            let on_a = clone_runner(&on_a);
            async move { on_a.claim(1, 20_000).await }
        });
        let claim_b = tokio::spawn({
            let on_b = clone_runner(&on_b);
            async move { on_b.claim(1, 20_000).await }
        });
        let (got_a, got_b) = (claim_a.await.unwrap(), claim_b.await.unwrap());
        let woke_after = inserted.elapsed();
        assert_eq!((got_a.len(), got_b.len()), (1, 1), "round {round}");
        assert!(
            woke_after < Duration::from_secs(5),
            "round {round}: the claims woke after {woke_after:?}"
        );
        for (runner, task) in [(&on_a, &got_a[0]), (&on_b, &got_b[0])] {
            let (status, _) = runner.complete(task, json!({})).await;
            assert_eq!(status, 200);
        }
    }
}

fn clone_runner(runner: &FakeRunner) -> FakeRunner {
    FakeRunner {
        base: runner.base.clone(),
        pod_name: runner.pod_name.clone(),
        token: runner.token.clone(),
        runner_id: runner.runner_id,
        http: runner.http.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_goes_on_when_a_replica_dies() {
    let db = TestDb::new().await;
    let a = Scheduler::start(&db, Timings::FAST).await;
    let b = Scheduler::start(&db, Timings::FAST).await;
    // A lease that will expire, held by a runner that goes silent.
    let silent = FakeRunner::register(&a, "silent").await;
    let api_b = b.api();
    let leased = api_b.enqueue(json!({"spec": {"kind": "noop"}})).await;
    let task = silent.claim(1, 2000).await.remove(0);
    assert_eq!(task.job_id.0, leased);
    drop(a); // kill -9 of replica A (kill_on_drop), whichever of them led maintenance
    let delayed = api_b
        .enqueue(json!({"spec": {"kind": "noop"}, "delay_ms": 200}))
        .await;
    wait_until(
        "the surviving replica to promote and reclaim",
        Duration::from_secs(10),
        || {
            let pool = db.pool.clone();
            async move {
                let rows: Vec<(i64, String, i32)> = sqlx::query_as(
                    "SELECT id, state::text, attempt FROM sluice.jobs WHERE id = ANY($1) ORDER BY id",
                )
                .bind(vec![leased, delayed])
                .fetch_all(&pool)
                .await
                .map_err(|e| e.to_string())?;
                let done = rows.iter().all(|(_, state, _)| state == "available");
                if done {
                    Ok(Some(()))
                } else {
                    Err(format!("{rows:?}"))
                }
            }
        },
    )
    .await;
}
