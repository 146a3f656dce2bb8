//! F-15 / F-16 / F-17 at the store level, on a real Postgres with concurrent connections:
//! completions racing the reaper, and two reapers racing each other. A terminal state never
//! changes, and each outcome the caller was told matches what was stored.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use sluice::store::jobs::{self, Completion, NewJob};
use sluice::Error;
use sluice_protocol::{JobId, Outcome, RunnerId};
use sluice_testkit::TestDb;
use uuid::Uuid;

async fn enqueue_and_claim(db: &TestDb, runner: RunnerId, count: usize) -> Vec<jobs::ClaimedJob> {
    let new: Vec<NewJob> = (0..count)
        .map(|_| NewJob {
            queue: "default".into(),
            spec: json!({"kind": "noop"}),
            max_attempts: Some(5),
            ..Default::default()
        })
        .collect();
    jobs::insert_many(&db.pool, &new).await.unwrap();
    let mut claimed = Vec::new();
    while claimed.len() < count {
        let batch = jobs::claim_available(&db.pool, runner, 1000, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(!batch.is_empty());
        claimed.extend(batch);
    }
    claimed
}

/// A registered runner: claims lease only to runners that are not gone.
async fn register_runner(db: &TestDb) -> RunnerId {
    let params = sluice::store::runners::RegisterParams {
        pod_name: &format!("races-{}", Uuid::new_v4()),
        labels: json!({}),
        slots: 1,
        version: "",
    };
    sluice::store::runners::register(&db.pool, params)
        .await
        .unwrap()
        .0
}

async fn expire_all_leases(db: &TestDb) {
    sqlx::query(
        "UPDATE sluice.jobs SET lease_expires_at = now() - interval '1 second' WHERE state = 'running'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_racing_the_reaper_never_change_a_terminal_state() {
    let db = TestDb::new().await;
    let runner = register_runner(&db).await;
    // 20 rounds of 500: RELIABILITY.md's 10,000 interleavings (F-16).
    let rounds: u64 = std::env::var("SLUICE_RACE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut checked = 0;
    let (mut completed_total, mut reclaimed_total) = (0, 0);
    for round in 0..rounds {
        sqlx::query("TRUNCATE sluice.jobs, sluice.job_attempts, sluice.job_events")
            .execute(&db.pool)
            .await
            .unwrap();
        let mut claimed = enqueue_and_claim(&db, runner, 500).await;
        expire_all_leases(&db).await;
        // A seeded shuffle so each round interleaves differently, and replayably.
        let mut seed = 0x9e3779b97f4a7c15u64.wrapping_mul(round + 1);
        for i in (1..claimed.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            claimed.swap(i, (seed as usize) % (i + 1));
        }

        let completer = {
            let pool = db.pool.clone();
            let claimed = claimed.clone();
            tokio::spawn(async move {
                let output = json!({"ok": true});
                let mut told = HashMap::new();
                for job in &claimed {
                    let result = jobs::complete_if_leased(
                        &pool,
                        Completion {
                            runner,
                            job: job.id,
                            attempt: job.attempt,
                            lease_token: job.lease_token,
                            outcome: Outcome::Succeeded,
                            output: &output,
                            error: None,
                            retryable: true,
                            final_seq: None,
                            retry_jitter: 0.0, // a failure retries at once
                        },
                    )
                    .await;
                    told.insert(job.id, result);
                }
                told
            })
        };
        let reaper = {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                let mut reclaimed = 0;
                loop {
                    let mut conn = pool.acquire().await.unwrap();
                    let report = jobs::reclaim_expired(&mut conn, 7).await.unwrap();
                    reclaimed += report.requeued + report.failed;
                    if report.requeued + report.failed == 0 {
                        return reclaimed;
                    }
                }
            })
        };
        let told = completer.await.unwrap();
        let reclaimed = reaper.await.unwrap();

        let rows: Vec<(i64, String, Option<String>)> = sqlx::query_as(
            "SELECT j.id, j.state::text, a.outcome FROM sluice.jobs j
             JOIN sluice.job_attempts a ON a.job_id = j.id AND a.attempt = 1",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        let mut succeeded = 0;
        for (id, state, outcome) in rows {
            match told.get(&JobId(id)).unwrap() {
                Ok(_) => {
                    succeeded += 1;
                    assert_eq!(
                        (state.as_str(), outcome.as_deref()),
                        ("succeeded", Some("succeeded")),
                        "job {id}"
                    );
                }
                Err(Error::LeaseLost) => {
                    assert_eq!(
                        (state.as_str(), outcome.as_deref()),
                        ("available", Some("lease_expired")),
                        "job {id}"
                    );
                }
                Err(other) => panic!("job {id}: unexpected {other}"),
            }
            checked += 1;
        }
        assert_eq!(succeeded + reclaimed as usize, 500, "round {round}");
        completed_total += succeeded;
        reclaimed_total += reclaimed;
        // A late reaper pass or completion changes nothing now.
        expire_all_leases(&db).await;
        let mut conn = db.pool.acquire().await.unwrap();
        let report = jobs::reclaim_expired(&mut conn, 1000).await.unwrap();
        assert_eq!(report.requeued + report.failed, 0);
    }
    assert_eq!(checked, rounds as usize * 500);
    // Both sides won some races, so the interleavings were real.
    assert!(
        completed_total > 0 && reclaimed_total > 0,
        "{completed_total} completed, {reclaimed_total} reclaimed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_reapers_reclaim_each_expired_lease_exactly_once() {
    let db = TestDb::new().await;
    let runner = register_runner(&db).await;
    enqueue_and_claim(&db, runner, 1000).await;
    expire_all_leases(&db).await;
    let mut reapers = Vec::new();
    for _ in 0..2 {
        let pool = db.pool.clone();
        reapers.push(tokio::spawn(async move {
            let mut total = 0;
            loop {
                let mut conn = pool.acquire().await.unwrap();
                let report = jobs::reclaim_expired(&mut conn, 13).await.unwrap();
                total += report.requeued;
                if report.requeued == 0 {
                    return total;
                }
            }
        }));
    }
    let mut total = 0;
    for reaper in reapers {
        total += reaper.await.unwrap();
    }
    assert_eq!(total, 1000, "each lease reclaimed exactly once");
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.job_attempts WHERE outcome = 'lease_expired'")
            .await,
        1000
    );
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.jobs WHERE state = 'available' AND attempt = 1")
            .await,
        1000
    );
}
