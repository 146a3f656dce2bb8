//! Leases and fencing over the real internal protocol: a runner that lost its lease cannot
//! write, concurrent claimers never share a job, and a runner acts only as itself.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use sluice_protocol::{api::paths as api_paths, paths, JobId};
use sluice_testkit::{wait_until, FakeRunner, Scheduler, TestDb, Timings};

#[tokio::test]
async fn a_stale_complete_after_the_lease_was_reclaimed_is_refused_and_changes_nothing() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "echo hi"}}))
        .await;

    let first = FakeRunner::register(&scheduler, "slow-pod").await;
    let tasks = first.claim(1, 5000).await;
    assert_eq!(tasks.len(), 1);
    let stale = tasks[0].clone();
    assert_eq!((stale.job_id.0, stale.attempt.0), (id, 1));

    // The first runner never heartbeats; the reaper hands the job out again.
    let second = FakeRunner::register(&scheduler, "fast-pod").await;
    let retaken = wait_until(
        "the job to be claimable again",
        Duration::from_secs(20),
        || {
            let second = &second;
            async move {
                let tasks = second.claim(1, 500).await;
                Ok(tasks.into_iter().next())
            }
        },
    )
    .await;
    assert_eq!((retaken.job_id.0, retaken.attempt.0), (id, 2));

    let (status, body) = first.complete(&stale, json!({"from": "stale"})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "lease_lost");
    let (status, body) = first
        .post(
            &paths::stream(JobId(id)),
            &json!({"attempt": 1, "lease_token": stale.lease_token, "events": [{"seq": 1, "kind": "stdout", "data": {"text": "late"}}]}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("lease_lost"))
    );
    let (_, job) = api.get(&api_paths::job(JobId(id))).await;
    assert_eq!(job["state"], "running");
    assert_eq!(job["attempt"], 2);
    assert_eq!(job["attempts"][0]["outcome"], "lease_expired");
    // The running attempt is listed too (from the job row), without an outcome yet.
    assert_eq!(job["attempts"].as_array().map(Vec::len), Some(2), "{job}");
    assert_eq!(job["attempts"][1]["attempt"], 2);
    assert!(job["attempts"][1]["outcome"].is_null(), "{job}");
    assert!(job["attempts"][1]["finished_at"].is_null(), "{job}");

    let (status, body) = second.complete(&retaken, json!({"from": "live"})).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("succeeded")),
        "{body}"
    );
    // Repeating the accepted completion is idempotent; the stale one still is not accepted.
    let (status, _) = second.complete(&retaken, json!({"from": "live"})).await;
    assert_eq!(status, 200);
    let (status, _) = first.complete(&stale, json!({"from": "stale"})).await;
    assert_eq!(status, 409);

    let (_, job) = api.get(&api_paths::job(JobId(id))).await;
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["result"], json!({"from": "live"}));
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.job_events").await,
        0,
        "the stale attempt's event must not be stored"
    );
}

#[tokio::test]
async fn sixteen_concurrent_claimers_claim_each_of_1000_jobs_exactly_once() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let jobs: Vec<_> = (0..1000)
        .map(|_| json!({"spec": {"kind": "noop"}}))
        .collect();
    let (status, body) = api
        .post(api_paths::JOBS_BATCH, &json!({ "jobs": jobs }))
        .await;
    assert_eq!(status, 201, "{body}");

    let mut claimers = tokio::task::JoinSet::new();
    for n in 0..16 {
        let runner = FakeRunner::register(&scheduler, &format!("claimer-{n}")).await;
        claimers.spawn(async move {
            let mut claimed = Vec::new();
            loop {
                let tasks = runner.claim(7, 0).await;
                if tasks.is_empty() {
                    return claimed;
                }
                for task in tasks {
                    let (status, body) = runner.complete(&task, json!({})).await;
                    assert_eq!(status, 200, "{body}");
                    claimed.push((task.job_id.0, task.attempt.0));
                }
            }
        });
    }
    let mut all = Vec::new();
    while let Some(claimed) = claimers.join_next().await {
        all.extend(claimed.unwrap());
    }
    let unique: HashSet<i64> = all.iter().map(|(id, _)| *id).collect();
    assert_eq!(all.len(), 1000, "claims in total");
    assert_eq!(unique.len(), 1000, "distinct jobs claimed");
    assert!(all.iter().all(|(_, attempt)| *attempt == 1));
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.jobs WHERE state = 'succeeded' AND attempt = 1")
            .await,
        1000
    );
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.job_attempts").await,
        1000
    );
}

#[tokio::test]
async fn runners_act_only_with_their_own_token_on_their_own_leases() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let http = reqwest::Client::new();

    // Registration needs the pool's secret.
    for secret in [None, Some("wrong-secret")] {
        let mut request = http
            .post(format!(
                "{}/internal/runners/register",
                scheduler.internal_url
            ))
            .json(&json!({"pod_name": "intruder", "slots": 1}));
        if let Some(secret) = secret {
            request = request.bearer_auth(secret);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401);
    }
    assert_eq!(db.count("SELECT count(*) FROM sluice.runners").await, 0);

    let id = scheduler
        .api()
        .enqueue(json!({"spec": {"kind": "noop"}}))
        .await;
    let owner = FakeRunner::register(&scheduler, "owner").await;
    let other = FakeRunner::register(&scheduler, "other").await;
    let task = owner.claim(1, 1000).await.remove(0);

    // Another runner cannot complete, stream or renew the owner's lease, even with its token.
    let (status, _) = other.complete(&task, json!({"stolen": true})).await;
    assert_eq!(status, 409);
    let (status, _) = other.heartbeat(&[task.lease()], None).await;
    assert_eq!(status, 200);
    // A runner token cannot be used on another pod's path.
    let (status, _) = other
        .post(&paths::claim("owner"), &json!({"max": 1, "wait_ms": 0}))
        .await;
    assert_eq!(status, 403);
    // A wrong token is 401 everywhere.
    let bogus = FakeRunner {
        token: "bogus".into(),
        ..FakeRunner::register(&scheduler, "bogus").await
    };
    for path in [
        paths::claim("bogus"),
        paths::heartbeat("bogus"),
        paths::complete(JobId(id)),
        paths::stream(JobId(id)),
    ] {
        let (status, body) = bogus.post(&path, &json!({})).await;
        assert_eq!(status, 401, "{path}: {body}");
    }
    // The owner's heartbeat renews it, and it completes.
    let (status, body) = owner.heartbeat(&[task.lease()], None).await;
    assert_eq!(status, 200);
    assert_eq!(body["cancel"], json!([]), "{body}");
    let (status, _) = owner.complete(&task, json!({"ok": true})).await;
    assert_eq!(status, 200);
    let (_, job) = scheduler.api().get(&api_paths::job(JobId(id))).await;
    assert_eq!(job["result"], json!({"ok": true}));
    // Tokens are stored hashed, never in plain text.
    let (stored,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM sluice.runners WHERE position(convert_to($1, 'UTF8') in token_hash) > 0",
    )
    .bind(&owner.token)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn a_re_registered_pod_loses_the_leases_of_its_previous_instance() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let id = scheduler
        .api()
        .enqueue(json!({"spec": {"kind": "noop"}}))
        .await;
    let before = FakeRunner::register(&scheduler, "pod-a").await;
    let task = before.claim(1, 1000).await.remove(0);
    let after = FakeRunner::register(&scheduler, "pod-a").await;
    assert_ne!(before.runner_id, after.runner_id);

    // The old instance's token is revoked and its attempt is handed out again quickly
    // (by the next reaper pass, not after the 5 s lease).
    let (status, _) = before.complete(&task, json!({})).await;
    assert_eq!(status, 401);
    let retaken = after.claim(1, 3000).await;
    assert_eq!(retaken.len(), 1);
    assert_eq!((retaken[0].job_id.0, retaken[0].attempt.0), (id, 2));
}

#[tokio::test]
async fn a_scheduler_from_before_migration_0003_cannot_end_attempts_silently() {
    // Such a scheduler ended an attempt by updating its live attempt row, which no longer
    // exists: its statement must fail whole (the job row untouched) rather than lose the
    // attempt's record, so that the runner's retry reaches an upgraded replica.
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let id = scheduler
        .api()
        .enqueue(json!({"spec": {"kind": "noop"}}))
        .await;
    let runner = FakeRunner::register(&scheduler, "old-world").await;
    let task = runner.claim(1, 5000).await.remove(0);
    let old_completion = sqlx::query(
        "WITH done AS (
             UPDATE sluice.jobs SET state = 'succeeded', finished_at = now()
             WHERE id = $1 AND state = 'running' RETURNING id, attempt
         )
         UPDATE sluice.job_attempts a SET outcome = 'succeeded', finished_at = now()
         FROM done WHERE a.job_id = done.id AND a.attempt = done.attempt AND a.outcome IS NULL",
    )
    .bind(id)
    .execute(&db.pool)
    .await;
    let err = old_completion.expect_err("the pre-0003 completion must be refused");
    assert!(err.to_string().contains("must be upgraded"), "{err}");
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.jobs WHERE state = 'running'")
            .await,
        1,
        "the job is still running"
    );
    // The current protocol completes it, and records the attempt once.
    let (status, body) = runner.complete(&task, json!({})).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("succeeded")));
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.job_attempts WHERE outcome = 'succeeded'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_heartbeat_of_many_leases_answers_each_at_its_place() {
    // A long list takes the statement's other plan path, and is bound in job order: each
    // answer must still reach the lease it belongs to, whatever order the runner listed.
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    for _ in 0..60 {
        api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    }
    let runner = FakeRunner::register(&scheduler, "busy-pod").await;
    let mut tasks = runner.claim(60, 5000).await;
    assert_eq!(tasks.len(), 60);
    // Not in job order.
    tasks.reverse();
    tasks.swap(3, 40);
    let cancelled: HashSet<i64> = tasks[..3].iter().map(|t| t.job_id.0).collect();
    for id in &cancelled {
        let (status, body) = api.post(&api_paths::cancel(JobId(*id)), &json!({})).await;
        assert_eq!(status, 200, "{body}");
    }
    let completed: HashSet<i64> = tasks[10..13].iter().map(|t| t.job_id.0).collect();
    for task in &tasks[10..13] {
        let (status, _) = runner.complete(task, json!({})).await;
        assert_eq!(status, 200);
    }
    let before: (String,) = sqlx::query_as(
        "SELECT max(lease_expires_at)::text FROM sluice.jobs WHERE state = 'running'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let leases: Vec<_> = tasks.iter().map(|t| t.lease()).collect();
    let (status, body) = runner.heartbeat(&leases, None).await;
    assert_eq!(status, 200, "{body}");
    let mut orders: Vec<(i64, String)> = body["cancel"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["job_id"].as_i64().unwrap(),
                o["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    orders.sort();
    let mut expected: Vec<(i64, String)> = cancelled
        .iter()
        .map(|id| (*id, "cancelled".to_string()))
        .chain(completed.iter().map(|id| (*id, "lease_lost".to_string())))
        .collect();
    expected.sort();
    assert_eq!(orders, expected);
    // The 54 others were renewed.
    let renewed = sqlx::query_as::<_, (i64,)>(
        "SELECT count(*) FROM sluice.jobs
         WHERE state = 'running' AND lease_expires_at > $1::timestamptz",
    )
    .bind(before.0)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(renewed.0, 54);
}

/// A heartbeat never waits for a job row another transaction holds (that is how it stays out
/// of lock cycles): the lease is answered as `unrenewed`, with no cancel order, at once; once
/// the row is free it is renewed again.
#[tokio::test]
async fn a_heartbeat_skips_a_locked_row_and_says_it_was_not_renewed() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let locked_id = api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    let runner = FakeRunner::register(&scheduler, "patient").await;
    let tasks = runner.claim(2, 2000).await;
    assert_eq!(tasks.len(), 2);
    let leases: Vec<_> = tasks.iter().map(|t| t.lease()).collect();
    let heartbeat = || {
        let runner = &runner;
        let leases = &leases;
        async move { runner.heartbeat(leases, None).await }
    };
    // Someone holds one row (an operator's open transaction, a completion in flight).
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM sluice.jobs WHERE id = $1 FOR UPDATE")
        .bind(locked_id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (status, body) = heartbeat().await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the heartbeat waited for the lock"
    );
    assert_eq!(body["cancel"], json!([]), "{body}");
    assert_eq!(
        body["unrenewed"],
        json!([{"job_id": locked_id, "attempt": 1}]),
        "{body}"
    );
    holder.rollback().await.unwrap();
    let (status, body) = heartbeat().await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("unrenewed").is_none(), "{body}");
    assert_eq!(body["cancel"], json!([]), "{body}");
}
