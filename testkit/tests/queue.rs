//! Queue semantics through the real API and runner protocol: cancel, retry, deadlines,
//! pausing, priorities, delays and the poison-pill cap.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_protocol::{api::paths as api_paths, paths, JobId};
use sluice_testkit::{wait_until, FakeRunner, Scheduler, TestDb, Timings};

const DEADLINE: Duration = Duration::from_secs(20);

async fn heartbeat(runner: &FakeRunner, task: &sluice_protocol::Task) -> Value {
    let (status, body) = runner.heartbeat(&[task.lease()], None).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn cancelling_a_queued_job_ends_it_at_once_and_a_finished_one_is_a_conflict() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "noop"}, "delay_ms": 60000}))
        .await;

    let (status, body) = api.post(&api_paths::cancel(JobId(id)), &json!({})).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("cancelled")),
        "{body}"
    );
    let (status, _) = api.post(&api_paths::cancel(JobId(id)), &json!({})).await;
    assert_eq!(status, 200, "cancelling twice is harmless");
    let (_, job) = api.get(&api_paths::job(JobId(id))).await;
    assert_eq!(job["state"], "cancelled");
    assert_eq!(job["error"]["code"], "cancelled");

    let (status, body) = api
        .post(&api_paths::cancel(JobId(424242)), &json!({}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );

    let done = api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    let runner = FakeRunner::register(&scheduler, "r").await;
    let task = runner.claim(1, 2000).await.remove(0);
    assert_eq!(task.job_id.0, done);
    runner.complete(&task, json!({})).await;
    let (status, body) = api.post(&api_paths::cancel(JobId(done)), &json!({})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("conflict"))
    );
    let (_, job) = api.get(&api_paths::job(JobId(done))).await;
    assert_eq!(job["state"], "succeeded", "a terminal state never changes");
}

#[tokio::test]
async fn cancelling_a_running_job_orders_its_runner_to_stop_and_refuses_its_result() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "sleep 600"}}))
        .await;
    let runner = FakeRunner::register(&scheduler, "r").await;
    let task = runner.claim(1, 2000).await.remove(0);

    let (status, _) = api.post(&api_paths::cancel(JobId(id)), &json!({})).await;
    assert_eq!(status, 200);
    let orders = heartbeat(&runner, &task).await;
    assert_eq!(orders["cancel"][0]["job_id"], id, "{orders}");
    assert_eq!(orders["cancel"][0]["reason"], "cancelled", "{orders}");
    let (status, _) = runner.complete(&task, json!({"late": true})).await;
    assert_eq!(status, 409);
    let (_, job) = api.get(&api_paths::job(JobId(id))).await;
    assert_eq!(job["state"], "cancelled");
    assert_eq!(job["attempts"][0]["outcome"], "cancelled");
    assert_eq!(job["result"], Value::Null);
}

#[tokio::test]
async fn a_failed_job_can_be_retried_and_runs_another_attempt() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "noop"}, "max_attempts": 1}))
        .await;
    let runner = FakeRunner::register(&scheduler, "r").await;
    let task = runner.claim(1, 2000).await.remove(0);
    let (status, body) = runner
        .post(
            &paths::complete(JobId(id)),
            &json!({"attempt": task.attempt, "lease_token": task.lease_token,
                    "outcome": "failed", "error": {"code": "exit_code", "message": "exit 1"}}),
        )
        .await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("failed")),
        "{body}"
    );

    let (status, body) = api.post(&api_paths::retry(JobId(id)), &json!({})).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("available")),
        "{body}"
    );
    let again = runner.claim(1, 2000).await.remove(0);
    assert_eq!((again.job_id.0, again.attempt.0), (id, 2));
    runner.complete(&again, json!({"second": true})).await;
    let (_, job) = api.get(&api_paths::job(JobId(id))).await;
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 2);

    let (status, body) = api.post(&api_paths::retry(JobId(id)), &json!({})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("conflict"))
    );
}

#[tokio::test]
async fn a_job_past_its_timeout_fails_as_timed_out_even_if_its_runner_is_silent() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "sleep 600"}, "timeout_ms": 300}))
        .await;
    let runner = FakeRunner::register(&scheduler, "r").await;
    let task = runner.claim(1, 2000).await.remove(0);
    // The runner keeps its lease alive but never reports: the deadline still ends the job.
    let job = wait_until("the job to time out", DEADLINE, || async {
        heartbeat(&runner, &task).await;
        let (_, job) = api.get(&api_paths::job(JobId(id))).await;
        Ok((job["state"] == "failed").then_some(job.clone())).map_err(|_: ()| job.to_string())
    })
    .await;
    assert_eq!(job["error"]["code"], "timed_out", "{job}");
    assert_eq!(job["attempts"][0]["outcome"], "timed_out");
    let orders = heartbeat(&runner, &task).await;
    assert_eq!(orders["cancel"][0]["reason"], "timed_out", "{orders}");
}

#[tokio::test]
async fn a_paused_queue_is_skipped_until_resumed() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let (status, _) = api.post(&api_paths::pause("reports"), &json!({})).await;
    assert_eq!(status, 200);
    let paused = api
        .enqueue(json!({"queue": "reports", "spec": {"kind": "noop"}}))
        .await;
    let open = api.enqueue(json!({"spec": {"kind": "noop"}})).await;

    let runner = FakeRunner::register(&scheduler, "r").await;
    let tasks = runner.claim(10, 300).await;
    let ids: Vec<i64> = tasks.iter().map(|t| t.job_id.0).collect();
    assert_eq!(ids, vec![open]);
    let (_, queues) = api.get(api_paths::QUEUES).await;
    let reports = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "reports")
        .unwrap()
        .clone();
    assert_eq!(reports["paused"], true);
    assert_eq!(reports["jobs"]["available"], 1);

    api.post(&api_paths::resume("reports"), &json!({})).await;
    let tasks = runner.claim(10, 2000).await;
    assert_eq!(
        tasks.iter().map(|t| t.job_id.0).collect::<Vec<_>>(),
        vec![paused]
    );
}

#[tokio::test]
async fn claims_follow_priority_then_age_and_respect_delays() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    let low = api
        .enqueue(json!({"spec": {"kind": "noop"}, "priority": 5}))
        .await;
    let urgent = api
        .enqueue(json!({"spec": {"kind": "noop"}, "priority": -1}))
        .await;
    let normal_old = api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    let normal_new = api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    let delayed = api
        .enqueue(json!({"spec": {"kind": "noop"}, "delay_ms": 400}))
        .await;
    let (_, job) = api.get(&api_paths::job(JobId(delayed))).await;
    assert_eq!(job["state"], "scheduled");

    let runner = FakeRunner::register(&scheduler, "r").await;
    let order: Vec<i64> = runner
        .claim(10, 0)
        .await
        .iter()
        .map(|t| t.job_id.0)
        .collect();
    assert_eq!(order, vec![urgent, normal_old, normal_new, low]);

    let task = wait_until("the delayed job to become claimable", DEADLINE, || async {
        Ok::<_, String>(runner.claim(1, 500).await.into_iter().next())
    })
    .await;
    assert_eq!(task.job_id.0, delayed);
    let (_, job) = api.get(&api_paths::job(JobId(delayed))).await;
    let run_at = job["run_at"].as_str().unwrap();
    let started_at = job["started_at"].as_str().unwrap();
    let created_at = job["created_at"].as_str().unwrap();
    let parse = |t: &str| chrono_free_millis(t);
    assert!(parse(started_at) >= parse(run_at), "{job}");
    assert!(parse(run_at) - parse(created_at) >= 400, "{job}");
}

/// Milliseconds of an RFC 3339 timestamp within its day (enough to compare nearby instants).
fn chrono_free_millis(t: &str) -> i64 {
    let time = t.split('T').nth(1).unwrap();
    let time = time.trim_end_matches('Z');
    let time = time.split('+').next().unwrap();
    let mut parts = time.split(':');
    let h: i64 = parts.next().unwrap().parse().unwrap();
    let m: i64 = parts.next().unwrap().parse().unwrap();
    let s: f64 = parts.next().unwrap().parse().unwrap();
    (h * 3600 + m * 60) * 1000 + (s * 1000.0) as i64
}

#[tokio::test]
async fn a_job_that_loses_its_runner_three_times_fails_as_runner_lost() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "noop"}, "max_attempts": 10}))
        .await;
    let runner = FakeRunner::register(&scheduler, "r").await;
    for attempt in 1..=3 {
        // Claim and vanish: never heartbeat, never complete.
        let task = wait_until("the job to be claimable", DEADLINE, || async {
            Ok::<_, String>(runner.claim(1, 500).await.into_iter().next())
        })
        .await;
        assert_eq!((task.job_id.0, task.attempt.0), (id, attempt));
    }
    let job = api.wait_terminal(id, DEADLINE).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "runner_lost", "{job}");
    assert_eq!(job["attempt"], 3);
}

#[tokio::test]
async fn finished_jobs_are_pruned_after_their_queues_retention() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    sqlx::query(
        "INSERT INTO sluice.queues (name, retention) VALUES ('short', interval '1 second')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let short = api
        .enqueue(json!({"queue": "short", "spec": {"kind": "noop"}}))
        .await;
    let kept = api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    let runner = FakeRunner::register(&scheduler, "r").await;
    for task in runner.claim(2, 2000).await {
        runner
            .post(
                &paths::stream(task.job_id),
                &json!({"attempt": task.attempt, "lease_token": task.lease_token,
                        "events": [{"seq": 1, "kind": "stdout", "data": {"text": "x"}}]}),
            )
            .await;
        runner.complete(&task, json!({})).await;
    }
    wait_until("the short-retention job to be pruned", DEADLINE, || async {
        let (status, _) = api.get(&api_paths::job(JobId(short))).await;
        Ok::<_, String>((status == 404).then_some(()))
    })
    .await;
    let (status, job) = api.get(&api_paths::job(JobId(kept))).await;
    assert_eq!((status, job["state"].as_str()), (200, Some("succeeded")));
    // Its attempts and events went with it; the other job's stayed.
    let (attempts,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM sluice.job_attempts WHERE job_id = $1")
            .bind(short)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let (events,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM sluice.job_events WHERE job_id = $1")
            .bind(short)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((attempts, events), (0, 0));
    assert_eq!(db.count("SELECT count(*) FROM sluice.job_events").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_running_caps_a_queue_across_concurrent_claimers() {
    let db = TestDb::new().await;
    // The claimers never heartbeat: their leases must outlast the claiming rounds on a loaded
    // machine, or reclaimed jobs would be claimed again and counted twice.
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    sqlx::query("INSERT INTO sluice.queues (name, max_running) VALUES ('limited', 2)")
        .execute(&db.pool)
        .await
        .unwrap();
    let jobs: Vec<Value> = (0..6)
        .map(|_| json!({"queue": "limited", "spec": {"kind": "noop"}}))
        .collect();
    api.post(api_paths::JOBS_BATCH, &json!({ "jobs": jobs }))
        .await;
    let open = api.enqueue(json!({"spec": {"kind": "noop"}})).await;

    let mut claimers = Vec::new();
    for n in 0..4 {
        claimers.push(FakeRunner::register(&scheduler, &format!("c{n}")).await);
    }
    // Everyone claims as much as it can, at the same time, until nothing more comes.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut set = tokio::task::JoinSet::new();
        for claimer in &claimers {
            let (base, pod, token) = (
                claimer.base.clone(),
                claimer.pod_name.clone(),
                claimer.token.clone(),
            );
            set.spawn(async move {
                let http = reqwest::Client::new();
                let response = http
                    .post(format!("{base}/internal/runners/{pod}/claim"))
                    .bearer_auth(token)
                    .json(&json!({"max": 5, "wait_ms": 300}))
                    .send()
                    .await
                    .unwrap();
                let body: sluice_protocol::ClaimResponse = response.json().await.unwrap();
                body.tasks
            });
        }
        while let Some(tasks) = set.join_next().await {
            held.extend(tasks.unwrap());
        }
    }
    let limited: Vec<_> = held.iter().filter(|t| t.queue == "limited").collect();
    assert_eq!(
        limited.len(),
        2,
        "claimed {} of the capped queue",
        limited.len()
    );
    assert!(
        held.iter().any(|t| t.job_id.0 == open),
        "the uncapped queue still flows"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.jobs WHERE queue = 'limited' AND state = 'running'")
            .await,
        2
    );

    // Finishing one frees one place, and only one.
    let first = limited[0].clone();
    sqlx::query("UPDATE sluice.jobs SET state = 'succeeded', finished_at = now() WHERE id = $1")
        .bind(first.job_id.0)
        .execute(&db.pool)
        .await
        .unwrap();
    let more = wait_until("one more capped job", DEADLINE, || async {
        let tasks = claimers[0].claim(5, 300).await;
        Ok::<_, String>((!tasks.is_empty()).then_some(tasks))
    })
    .await;
    assert_eq!(
        more.iter().filter(|t| t.queue == "limited").count(),
        1,
        "{more:?}"
    );
}
