//! Retry policies (issue 19): a job's own `retry`, its queue's `default_retry`, the built-in
//! back-off — stored with the job and applied when an attempt fails, from the API and from
//! plain SQL alike; every field held to its range.

use serde_json::{json, Value};
use sluice_protocol::api::paths as api_paths;
use sluice_protocol::{paths, Completion, FailureCode, JobId, Outcome, Task};
use sluice_testkit::{FakeRunner, Scheduler, TestDb, Timings};

/// Fails `task` retryably; returns how long the job waits for its retry, in ms (run_at minus
/// the database's now, read right after).
async fn fail_and_measure_wait(db: &TestDb, runner: &FakeRunner, task: &Task) -> f64 {
    let completion = Completion {
        job_id: None,
        attempt: task.attempt,
        lease_token: task.lease_token,
        outcome: Outcome::Failed,
        output: json!({}),
        error: Some(sluice_protocol::Failure {
            code: FailureCode::ExitCode,
            message: "exited 1".into(),
        }),
        retryable: true,
        final_seq: None,
    };
    let (status, body) = runner
        .send(&paths::complete(task.job_id), &completion)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "scheduled", "{body}");
    let (wait_ms,): (f64,) = sqlx::query_as(
        "SELECT extract(epoch FROM run_at - now())::float8 * 1000 FROM sluice.jobs WHERE id = $1",
    )
    .bind(task.job_id.0)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    wait_ms
}

async fn claim_one(runner: &FakeRunner, id: i64) -> Task {
    let tasks = runner.claim(1, 2000).await;
    assert_eq!(tasks.len(), 1, "nothing to claim");
    assert_eq!(tasks[0].job_id, JobId(id));
    tasks.into_iter().next().unwrap()
}

#[tokio::test]
async fn a_jobs_policy_then_its_queues_then_the_built_in_one_decide_the_wait() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let runner = FakeRunner::register(&scheduler, "retries").await;

    // The job's own policy: 40 s, at most 60 s; `retry.max_attempts` is `max_attempts`.
    let own = api
        .enqueue(json!({"spec": {"kind": "noop"},
                        "retry": {"max_attempts": 4, "initial_ms": 40000, "max_ms": 60000, "factor": 3}}))
        .await;
    let (_, job) = api.get(&api_paths::job(JobId(own))).await;
    assert_eq!(job["max_attempts"], 4, "{job}");
    assert_eq!(
        job["retry"],
        json!({"initial_ms": 40000, "max_ms": 60000, "factor": 3.0})
    );
    let task = claim_one(&runner, own).await;
    let wait = fail_and_measure_wait(&db, &runner, &task).await;
    assert!(
        (29_000.0..=50_500.0).contains(&wait),
        "first retry waited {wait} ms"
    );
    // The second retry would be 120 s: capped at max_ms (± jitter).
    sqlx::query("UPDATE sluice.jobs SET run_at = now(), state = 'available' WHERE id = $1")
        .bind(own)
        .execute(&db.pool)
        .await
        .unwrap();
    let task = claim_one(&runner, own).await;
    let wait = fail_and_measure_wait(&db, &runner, &task).await;
    assert!(
        (44_000.0..=75_500.0).contains(&wait),
        "capped retry waited {wait} ms"
    );

    // No policy of its own: the queue's, read when the job fails (set after the enqueue).
    let queued = api
        .enqueue(json!({"queue": "slow", "spec": {"kind": "noop"}}))
        .await;
    sqlx::query(
        "UPDATE sluice.queues SET default_retry = '{\"initial_ms\": 200000}' WHERE name = 'slow'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let task = claim_one(&runner, queued).await;
    let wait = fail_and_measure_wait(&db, &runner, &task).await;
    assert!(
        (149_000.0..=250_500.0).contains(&wait),
        "queue policy: {wait} ms"
    );
    let (_, queues) = api.get(api_paths::QUEUES).await;
    let slow = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "slow")
        .unwrap()
        .clone();
    assert_eq!(
        slow["default_retry"],
        json!({"initial_ms": 200000}),
        "{slow}"
    );

    // Neither: 1 s ± 25 %. A plain SQL insert may name its own policy too.
    let (plain,): (i64,) = sqlx::query_as(
        "INSERT INTO sluice.jobs (spec) VALUES ('{\"kind\":\"noop\"}') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let task = claim_one(&runner, plain).await;
    let wait = fail_and_measure_wait(&db, &runner, &task).await;
    assert!(
        (0.0..=1_300.0).contains(&wait),
        "built-in first retry: {wait} ms"
    );
    let (from_sql,): (i64,) = sqlx::query_as(
        "SELECT sluice.enqueue('default', '{\"kind\":\"noop\"}', retry => '{\"initial_ms\": 90000, \"factor\": 1}')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let task = claim_one(&runner, from_sql).await;
    let wait = fail_and_measure_wait(&db, &runner, &task).await;
    assert!(
        (66_000.0..=113_000.0).contains(&wait),
        "sluice.enqueue policy: {wait} ms"
    );
}

#[tokio::test]
async fn the_delay_formula_grows_caps_and_never_overflows() {
    let db = TestDb::new().await;
    let delay = |attempt: i32, policy: Value, jitter: f64| {
        let pool = db.pool.clone();
        async move {
            let (ms,): (i64,) = sqlx::query_as("SELECT sluice.retry_delay_ms($1, $2, $3)")
                .bind(attempt)
                .bind(policy)
                .bind(jitter)
                .fetch_one(&pool)
                .await
                .unwrap();
            ms
        }
    };
    assert_eq!(delay(1, Value::Null, 1.0).await, 1000);
    assert_eq!(delay(3, Value::Null, 1.0).await, 4000);
    assert_eq!(delay(100, Value::Null, 1.0).await, 3_600_000);
    assert_eq!(delay(1, Value::Null, 0.75).await, 750);
    let steep = json!({"initial_ms": 86_400_000, "max_ms": 31_622_400_000u64, "factor": 100});
    assert_eq!(
        delay(i32::MAX, steep.clone(), 1.25).await,
        39_528_000_000,
        "capped at max_ms × jitter"
    );
    assert_eq!(delay(0, steep, 1.0).await, 86_400_000);
    assert_eq!(delay(5, json!({"initial_ms": 0}), 1.0).await, 0);
}

#[tokio::test]
async fn a_policy_out_of_range_is_refused_naming_the_field() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let noop = json!({"kind": "noop"});
    let cases = [
        (json!({"factor": 0.5}), "retry.factor"),
        (json!({"factor": 101}), "retry.factor"),
        (json!({"initial_ms": 86_400_001u64}), "retry.initial_ms"),
        (json!({"initial_ms": -1}), "retry.initial_ms"),
        (json!({"max_ms": 31_622_400_001u64}), "retry.max_ms"),
        (json!({"max_attempts": 0}), "retry.max_attempts"),
        (json!({"max_attempts": 1001}), "retry.max_attempts"),
        (json!({"jitter": 0}), "retry"),
        (json!("fast"), "retry"),
    ];
    for (retry, field) in cases {
        let (status, body) = api
            .post(api_paths::JOBS, &json!({"spec": noop, "retry": retry}))
            .await;
        assert_eq!(status, 400, "{retry}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{retry}: {message}");
    }
    let (status, body) = api
        .post(
            api_paths::JOBS,
            &json!({"spec": noop, "max_attempts": 3, "retry": {"max_attempts": 5}}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("retry.max_attempts"));
    // The same ranges hold for plain SQL, and for a queue's default.
    for bad in [
        r#"{"factor": 0.5}"#,
        r#"{"initial_ms": 86400001}"#,
        r#"{"jitter": 1}"#,
        r#"[1]"#,
    ] {
        let err = sqlx::query(
            "INSERT INTO sluice.jobs (spec, retry) VALUES ('{\"kind\":\"noop\"}', $1::jsonb)",
        )
        .bind(bad)
        .execute(&db.pool)
        .await
        .unwrap_err();
        assert!(err.to_string().contains("jobs_retry_valid"), "{bad}: {err}");
        let err = sqlx::query(
            "UPDATE sluice.queues SET default_retry = $1::jsonb WHERE name = 'default'",
        )
        .bind(bad)
        .execute(&db.pool)
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("queues_default_retry_valid"),
            "{bad}: {err}"
        );
    }
    assert_eq!(db.count("SELECT count(*) FROM sluice.jobs").await, 0);
}
