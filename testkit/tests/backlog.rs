//! L-03 at T1 size: a 20,000-job backlog enqueued through the batch API drains through real
//! sidecars, each job exactly once, with the claim on its partial index throughout.

use std::time::{Duration, Instant};

use serde_json::json;
use sluice::store::jobs;
use sluice_protocol::api::paths as api_paths;
use sluice_testkit::{wait_until, Scheduler, TestDb, Timings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20k_backlog_drains_exactly_once_on_the_claim_index() {
    // 20,000 in CI; `task soak` runs RELIABILITY.md's 100,000.
    let jobs_total: usize = std::env::var("SLUICE_BACKLOG_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();

    let started = Instant::now();
    let batch: Vec<_> = (0..1000)
        .map(|_| json!({"spec": {"kind": "noop"}}))
        .collect();
    for _ in 0..jobs_total / 1000 {
        let (status, body) = api
            .post(api_paths::JOBS_BATCH, &json!({ "jobs": batch }))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let enqueued_in = started.elapsed();
    assert!(
        enqueued_in < Duration::from_secs(60),
        "enqueue took {enqueued_in:?}"
    );
    sqlx::query("ANALYZE sluice.jobs")
        .execute(&db.pool)
        .await
        .unwrap();
    let plan = jobs::explain_claim(&db.pool).await.unwrap().join("\n");
    assert!(plan.contains("jobs_claim_idx"), "{plan}");

    let mut runners = Vec::new();
    for n in 0..4 {
        runners.push(scheduler.runner(&format!("drain-{n}"), 5).await);
    }
    wait_until("the backlog to drain", Duration::from_secs(1800), || {
        let pool = db.pool.clone();
        async move {
            let (done,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM sluice.jobs WHERE state = 'succeeded'")
                    .fetch_one(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
            if done as usize == jobs_total {
                Ok(Some(()))
            } else {
                Err(format!("{done} of {jobs_total} done"))
            }
        }
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.jobs WHERE attempt <> 1")
            .await,
        0,
        "a job ran more than once"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.job_attempts").await,
        jobs_total as i64
    );
    // Mid-drain or not, the claim plan never degrades to a scan of the table.
    let plan = jobs::explain_claim(&db.pool).await.unwrap().join("\n");
    assert!(!plan.contains("Seq Scan on jobs"), "{plan}");
    eprintln!(
        "L-03: {jobs_total} enqueued in {enqueued_in:?}, drained in {:?}",
        started.elapsed() - enqueued_in
    );
}
