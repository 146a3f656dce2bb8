//! Completions in batches, over the real internal protocol: carried by a claim (one request,
//! one commit for both) or sent alone to `POST /internal/runners/:pod/complete`. Each entry is
//! fenced and idempotent exactly like the single-task endpoint.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_protocol::Task;
use sluice_protocol::{api::paths as api_paths, paths, JobId};
use sluice_testkit::{FakeRunner, Scheduler, TestDb, Timings};

fn completion(task: &Task, outcome: &str, output: Value) -> Value {
    json!({
        "job_id": task.job_id,
        "attempt": task.attempt,
        "lease_token": task.lease_token,
        "outcome": outcome,
        "output": output,
    })
}

async fn enqueue_noops(scheduler: &Scheduler, count: usize) {
    let jobs: Vec<Value> = (0..count)
        .map(|_| json!({"spec": {"kind": "noop"}}))
        .collect();
    let (status, body) = scheduler
        .api()
        .post(api_paths::JOBS_BATCH, &json!({ "jobs": jobs }))
        .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn a_claim_carrying_completions_applies_them_and_refills_in_one_answer() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    enqueue_noops(&scheduler, 6).await;
    let runner = FakeRunner::register(&scheduler, "r").await;
    let first = runner.claim(3, 2000).await;
    assert_eq!(first.len(), 3);

    let path = paths::claim(&runner.pod_name);
    let (status, body) = runner
        .post(
            &path,
            &json!({
                "max": 3,
                "wait_ms": 10_000,
                "complete": first.iter().map(|t| completion(t, "succeeded", json!({"n": t.job_id}))).collect::<Vec<_>>(),
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let completed = body["completed"].as_array().expect("completed").clone();
    assert_eq!(completed.len(), 3, "{body}");
    for (entry, task) in completed.iter().zip(&first) {
        assert_eq!(
            entry["job_id"],
            json!(task.job_id),
            "in the request's order"
        );
        assert_eq!(entry["state"], "succeeded", "{entry}");
    }
    let refill = body["tasks"].as_array().expect("tasks");
    assert_eq!(refill.len(), 3, "the freed slots are refilled: {body}");
    for task in &first {
        let (_, job) = api.get(&api_paths::job(task.job_id)).await;
        assert_eq!(job["state"], "succeeded");
        assert_eq!(job["result"]["n"], json!(task.job_id));
    }

    // With nothing left to claim, a claim that carries completions still answers at once:
    // their results must not wait for the long poll.
    let second: Vec<Task> = serde_json::from_value(json!(refill)).unwrap();
    let started = Instant::now();
    let (status, body) = runner
        .post(
            &path,
            &json!({
                "max": 3,
                "wait_ms": 10_000,
                "complete": second.iter().map(|t| completion(t, "succeeded", json!({}))).collect::<Vec<_>>(),
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the claim waited {:?} with completions on board",
        started.elapsed()
    );
    assert_eq!(body["tasks"], json!([]));
    assert_eq!(body["completed"].as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn batch_completions_are_fenced_and_idempotent_entry_by_entry() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let retried = api
        .enqueue(json!({"spec": {"kind": "noop"}, "max_attempts": 2}))
        .await;
    enqueue_noops(&scheduler, 2).await;
    let runner = FakeRunner::register(&scheduler, "a").await;
    let other = FakeRunner::register(&scheduler, "b").await;
    let tasks = runner.claim(3, 2000).await;
    assert_eq!(tasks.len(), 3);
    let (fail_task, rest) = tasks
        .split_first()
        .map(|(f, r)| (f.clone(), r.to_vec()))
        .unwrap();
    assert_eq!(fail_task.job_id.0, retried);

    let mut stale = completion(&rest[1], "succeeded", json!({}));
    stale["lease_token"] = json!(uuid::Uuid::new_v4());
    let mut failure = completion(&fail_task, "failed", json!({}));
    failure["error"] = json!({"code": "boom", "message": "it broke"});
    let batch = json!({"completions": [
        failure,
        completion(&rest[0], "succeeded", json!({"ok": true})),
        stale,
    ]});
    let path = paths::complete_many(&runner.pod_name);
    let (status, body) = runner.post(&path, &batch).await;
    assert_eq!(status, 200, "{body}");
    let states: Vec<Value> = body["completed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].clone())
        .collect();
    assert_eq!(
        states,
        [json!("scheduled"), json!("succeeded"), Value::Null]
    );
    assert_eq!(body["completed"][2]["error"]["code"], "lease_lost");

    // The same batch again: the applied entries answer their state without writing, the
    // stale one is still refused.
    let (status, again) = runner.post(&path, &batch).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["completed"][0]["state"], "scheduled");
    assert_eq!(again["completed"][1]["state"], "succeeded");
    assert_eq!(again["completed"][2]["error"]["code"], "lease_lost");
    let (_, job) = api.get(&api_paths::job(JobId(retried))).await;
    let attempts = job["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1, "{job}");
    assert_eq!(attempts[0]["outcome"], "failed", "{job}");
    let (_, job) = api.get(&api_paths::job(rest[1].job_id)).await;
    assert_eq!(job["state"], "running", "a stale token changed nothing");

    // Another runner cannot complete this runner's attempts, batch or not.
    let (status, body) = other
        .post(
            &paths::complete_many(&other.pod_name),
            &json!({"completions": [completion(&rest[1], "succeeded", json!({}))]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["completed"][0]["error"]["code"], "lease_lost");
    // …nor use this runner's path.
    let (status, _) = other.post(&path, &json!({"completions": []})).await;
    assert_eq!(status, 403);
    let (_, job) = api.get(&api_paths::job(rest[1].job_id)).await;
    assert_eq!(job["state"], "running");
}

#[tokio::test]
async fn malformed_batches_are_refused_whole() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    enqueue_noops(&scheduler, 1).await;
    let runner = FakeRunner::register(&scheduler, "r").await;
    let task = runner.claim(1, 2000).await.remove(0);
    let path = paths::complete_many(&runner.pod_name);

    let twice = json!({"completions": [
        completion(&task, "succeeded", json!({})),
        completion(&task, "failed", json!({})),
    ]});
    let (status, body) = runner.post(&path, &twice).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    let too_many: Vec<Value> = (0..1001)
        .map(|n| {
            let mut c = completion(&task, "succeeded", json!({}));
            c["job_id"] = json!(n + 1_000_000);
            c
        })
        .collect();
    let (status, _) = runner
        .post(&path, &json!({ "completions": too_many }))
        .await;
    assert_eq!(status, 400);
    for bad in [
        json!({"completions": [{"job_id": task.job_id}]}),
        json!({"completions": [{"job_id": "x", "attempt": 1, "lease_token": task.lease_token, "outcome": "succeeded"}]}),
        json!({"completions": [{"job_id": task.job_id, "attempt": 1, "lease_token": task.lease_token, "outcome": "maybe"}]}),
        json!({"completions": "all of them"}),
    ] {
        let (status, body) = runner.post(&path, &bad).await;
        assert!(
            (400..500).contains(&status) && body["error"]["code"].is_string(),
            "{bad} answered {status}: {body}"
        );
    }
    // Nothing of the refused batches was applied.
    let (_, job) = scheduler.api().get(&api_paths::job(task.job_id)).await;
    assert_eq!(job["state"], "running");
    // A claim carrying a malformed batch is refused too, and leases nothing.
    let (status, _) = runner
        .post(
            &paths::claim(&runner.pod_name),
            &json!({"max": 1, "complete": twice["completions"]}),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_sidecars_drain_a_burst_exactly_once_with_batched_completions() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let _a = sluice_testkit::Runner::start(&scheduler, "burst-a", 8, &[]).await;
    let _b = sluice_testkit::Runner::start(&scheduler, "burst-b", 8, &[]).await;
    // Noops finish at once (their completions ride on the next claim); short bash jobs end
    // while a claim is long-polling (the flusher sends those), some of them failing.
    let mut jobs: Vec<Value> = (0..2000)
        .map(|_| json!({"spec": {"kind": "noop"}}))
        .collect();
    for n in 0..40 {
        let code = if n % 4 == 0 { 3 } else { 0 };
        jobs.push(json!({
            "spec": {"kind": "bash", "script": format!("sleep 0.0{}; exit {code}", n % 10)},
            "max_attempts": 1,
        }));
    }
    let (status, body) = api
        .post(api_paths::JOBS_BATCH, &json!({ "jobs": jobs }))
        .await;
    assert_eq!(status, 201, "{body}");

    sluice_testkit::wait_until("the burst to drain", Duration::from_secs(120), || async {
        let left = db
            .count("SELECT count(*) FROM sluice.jobs WHERE state IN ('available', 'running')")
            .await;
        Ok::<_, String>((left == 0).then_some(()))
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.jobs WHERE state = 'succeeded' AND attempt = 1")
            .await,
        2030
    );
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.jobs WHERE state = 'failed' AND attempt = 1")
            .await,
        10
    );
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.job_attempts").await,
        2040,
        "one attempt per job: nothing ran twice"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM sluice.job_attempts a JOIN sluice.jobs j ON j.id = a.job_id
             WHERE a.outcome <> j.state::text OR a.attempt <> j.attempt
                OR a.finished_at < a.started_at OR a.runner_id IS DISTINCT FROM j.runner_id"
        )
        .await,
        0,
        "every attempt was recorded as ended, with its job's outcome and runner"
    );
}
