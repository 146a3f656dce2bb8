//! Bad input on every field (B-06, B-19, B-20) and the runner protocol's gaps (F-13, F-14):
//! each is refused with a status and a message naming the field, and nothing is written; and
//! one row no statement can handle never stops maintenance for the others.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_testkit::{wait_until, Api, FakeRunner, Scheduler, TestDb, Timings};

/// POSTs `body` and asserts the status, the error code and that the message names `field`.
async fn refused(api: &Api, path: &str, body: Value, status: u16, code: &str, field: &str) {
    let (got, answer) = api.post(path, &body).await;
    let shown: String = body.to_string().chars().take(120).collect();
    assert_eq!(got, status, "{shown}: {answer}");
    assert_eq!(answer["error"]["code"], code, "{shown}: {answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(field),
        "{shown}: the message does not name {field:?}: {message}"
    );
}

#[tokio::test]
async fn every_enqueue_field_is_held_to_its_range_and_refuses_nul() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let noop = json!({"kind": "noop"});
    let bash = |extra: Value| {
        let mut spec = json!({"kind": "bash", "script": "true"});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        spec
    };
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        // NUL anywhere (B-06).
        (
            json!({"spec": {"kind": "bash", "script": "echo \u{0}"}}),
            400,
            "invalid_spec",
            "spec.script",
        ),
        (
            json!({"spec": bash(json!({"env": {"K\u{0}": "v"}}))}),
            400,
            "invalid_spec",
            "spec.env",
        ),
        (
            json!({"spec": bash(json!({"env": {"K": "v\u{0}"}}))}),
            400,
            "invalid_spec",
            "spec.env.K",
        ),
        (
            json!({"spec": {"kind": "noop", "note": {"x": "\u{0}"}}}),
            400,
            "invalid_spec",
            "spec.note.x",
        ),
        (
            json!({"spec": noop, "queue": "q\u{0}"}),
            400,
            "invalid_request",
            "queue",
        ),
        (
            json!({"spec": noop, "idempotency_key": "k\u{0}"}),
            400,
            "invalid_request",
            "idempotency_key",
        ),
        // Numbers and times (B-19).
        (
            json!({"spec": noop, "timeout_ms": 0}),
            400,
            "invalid_request",
            "timeout_ms",
        ),
        (
            json!({"spec": noop, "timeout_ms": -1}),
            400,
            "invalid_request",
            "timeout_ms",
        ),
        (
            json!({"spec": noop, "timeout_ms": i64::MAX}),
            400,
            "invalid_request",
            "timeout_ms",
        ),
        (
            json!({"spec": noop, "timeout_ms": u64::MAX}),
            400,
            "invalid_request",
            "timeout_ms",
        ),
        (
            json!({"spec": noop, "priority": 40000}),
            400,
            "invalid_request",
            "priority",
        ),
        (
            json!({"spec": noop, "priority": 2_147_483_648u64}),
            400,
            "invalid_request",
            "priority",
        ),
        (
            json!({"spec": noop, "max_attempts": 0}),
            400,
            "invalid_request",
            "max_attempts",
        ),
        (
            json!({"spec": noop, "max_attempts": 1001}),
            400,
            "invalid_request",
            "max_attempts",
        ),
        (
            json!({"spec": noop, "delay_ms": 1_000_000_000_000_000u64}),
            400,
            "invalid_request",
            "delay_ms",
        ),
        (
            json!({"spec": noop, "delay_ms": -5}),
            400,
            "invalid_request",
            "delay_ms",
        ),
        (
            json!({"spec": noop, "run_at": "-10000-01-01T00:00:00Z"}),
            400,
            "invalid_request",
            "run_at",
        ),
        (
            json!({"spec": noop, "run_at": "9000-01-01T00:00:00Z"}),
            400,
            "invalid_request",
            "run_at",
        ),
        (
            json!({"spec": bash(json!({"timeout_ms": 0}))}),
            400,
            "invalid_spec",
            "spec.timeout_ms",
        ),
        (
            json!({"spec": bash(json!({"timeout_ms": u64::MAX}))}),
            400,
            "invalid_spec",
            "spec.timeout_ms",
        ),
        (
            json!({"spec": bash(json!({"limits": {"processes": 0}}))}),
            400,
            "invalid_spec",
            "spec.limits.processes",
        ),
        (
            json!({"spec": bash(json!({"limits": {"memory_bytes": -1}}))}),
            400,
            "invalid_spec",
            "spec.limits.memory_bytes",
        ),
        (
            json!({"spec": bash(json!({"network": "host"}))}),
            400,
            "invalid_spec",
            "spec.network",
        ),
        // Sizes (B-20).
        (
            json!({"spec": {"kind": "bash", "script": "x".repeat(600 * 1024)}}),
            413,
            "payload_too_large",
            "spec",
        ),
        (
            json!({"spec": bash(json!({"env": (0..10_000).map(|i| (format!("V{i}"), json!("x"))).collect::<serde_json::Map<_, _>>()}))}),
            400,
            "invalid_spec",
            "env",
        ),
    ];
    for (body, status, code, field) in cases {
        refused(&api, "/api/jobs", body, status, code, field).await;
    }
    // A batch names the member.
    refused(
        &api,
        "/api/jobs/batch",
        json!({"jobs": [{"spec": noop}, {"spec": noop, "priority": 99999}]}),
        400,
        "invalid_request",
        "jobs[1].priority",
    )
    .await;
    refused(
        &api,
        "/api/jobs/batch",
        json!({"jobs": [{"spec": noop}, {"spec": {"kind": "bash", "script": "\u{0}"}}]}),
        400,
        "invalid_spec",
        "jobs[1]",
    )
    .await;
    let many: Vec<Value> = (0..10_001)
        .map(|_| json!({"spec": {"kind": "noop"}}))
        .collect();
    let (status, _) = api.post("/api/jobs/batch", &json!({ "jobs": many })).await;
    assert!(status == 400 || status == 413, "{status}");
    assert_eq!(db.count("SELECT count(*) FROM sluice.jobs").await, 0);

    // The largest accepted values are accepted.
    let (status, body) = api
        .post(
            "/api/jobs",
            &json!({"spec": bash(json!({"timeout_ms": 2_592_000_000u64})),
                    "timeout_ms": 2_592_000_000u64, "priority": -32768, "max_attempts": 1000,
                    "delay_ms": 31_622_400_000u64}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["state"], "scheduled");
}

#[tokio::test]
async fn plain_sql_inserts_meet_the_same_ranges_and_take_the_queues_defaults() {
    let db = TestDb::new().await;
    let insert = |sql: &'static str| {
        let pool = db.pool.clone();
        async move { sqlx::query(sql).execute(&pool).await.map(|_| ()) }
    };
    let refused_sql = [
        r#"INSERT INTO sluice.jobs (spec) VALUES ('{"kind":"bash","script":"\u0000"}')"#,
        r#"INSERT INTO sluice.jobs (spec, timeout_ms) VALUES ('{"kind":"noop"}', 9223372036854775807)"#,
        r#"INSERT INTO sluice.jobs (spec, priority) VALUES ('{"kind":"noop"}', 100000)"#,
        r#"INSERT INTO sluice.jobs (spec, max_attempts) VALUES ('{"kind":"noop"}', 5000)"#,
        r#"INSERT INTO sluice.jobs (spec, run_at) VALUES ('{"kind":"noop"}', '9999-01-01')"#,
        r#"INSERT INTO sluice.jobs (spec, run_at) VALUES ('{"kind":"noop"}', '1000-01-01')"#,
        r#"INSERT INTO sluice.jobs (spec) VALUES ('{"kind":"bash","script":"x","timeout_ms":99999999999999}')"#,
        r#"INSERT INTO sluice.jobs (spec) VALUES ('{"kind":"bash","script":"x","limits":{"processes":0}}')"#,
        r#"INSERT INTO sluice.jobs (spec) VALUES ('{"kind":"bash","script":"x","env":{"A=B":"1"}}')"#,
        r#"INSERT INTO sluice.jobs (spec) VALUES ('{"kind":"bash","script":"x","network":"host"}')"#,
        r#"INSERT INTO sluice.jobs (spec) VALUES ('{"kind":"tool","tool":"rm_rf"}')"#,
        r#"INSERT INTO sluice.jobs (spec) SELECT jsonb_build_object('kind', 'bash', 'script', repeat('x', 600000))"#,
    ];
    for sql in refused_sql {
        assert!(insert(sql).await.is_err(), "accepted: {sql}");
    }
    assert_eq!(db.count("SELECT count(*) FROM sluice.jobs").await, 0);

    // A queue's defaults apply to a plain INSERT that leaves them out (item 10), as they do
    // through the API.
    sqlx::query(
        "INSERT INTO sluice.queues (name, default_max_attempts, default_priority, default_timeout_ms)
         VALUES ('reports', 7, -3, 60000)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    insert(r#"INSERT INTO sluice.jobs (queue, spec) VALUES ('reports', '{"kind":"noop"}')"#)
        .await
        .unwrap();
    insert(r#"INSERT INTO sluice.jobs (queue, spec, max_attempts) VALUES ('reports', '{"kind":"noop"}', 2)"#)
        .await
        .unwrap();
    insert(r#"INSERT INTO sluice.jobs (spec) VALUES ('{"kind":"noop"}')"#)
        .await
        .unwrap();
    let rows: Vec<(i32, i32, Option<i64>)> =
        sqlx::query_as("SELECT max_attempts, priority, timeout_ms FROM sluice.jobs ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![(7, -3, Some(60000)), (2, -3, Some(60000)), (3, 0, None)]
    );
}

#[tokio::test]
async fn runner_requests_with_nul_or_out_of_range_values_are_refused_and_change_nothing() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let id = api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    let runner = FakeRunner::register(&scheduler, "careful").await;
    let task = runner.claim(1, 1000).await.remove(0);
    let internal = Api {
        base: scheduler.internal_url.clone(),
        token: runner.token.clone(),
        http: reqwest::Client::new(),
    };
    let lease = json!({"attempt": task.attempt, "lease_token": task.lease_token});
    let with = |extra: Value| {
        let mut body = lease.clone();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    refused(
        &internal,
        &format!("/internal/tasks/{id}/stream"),
        with(json!({"events": [{"seq": 1, "kind": "stdout", "data": {"text": "a\u{0}b"}}]})),
        400,
        "invalid_request",
        "events[0].data.text",
    )
    .await;
    refused(
        &internal,
        &format!("/internal/tasks/{id}/stream"),
        with(json!({"events": [{"seq": 1, "kind": "x".repeat(100), "data": {}}]})),
        400,
        "invalid_request",
        "events[0].kind",
    )
    .await;
    refused(
        &internal,
        &format!("/internal/tasks/{id}/complete"),
        with(json!({"outcome": "succeeded", "output": {"text": "\u{0}"}})),
        400,
        "invalid_request",
        "output.text",
    )
    .await;
    refused(
        &internal,
        &format!("/internal/tasks/{id}/complete"),
        with(json!({"outcome": "succeeded", "final_seq": -1})),
        400,
        "invalid_request",
        "final_seq",
    )
    .await;
    let leases: Vec<Value> = (0..10_001).map(|_| lease.clone()).collect();
    refused(
        &internal,
        &format!("/internal/runners/{}/heartbeat", runner.pod_name),
        json!({"running": leases}),
        400,
        "invalid_request",
        "running",
    )
    .await;
    refused(
        &internal,
        &format!("/internal/runners/{}/claim", runner.pod_name),
        json!({"max": 0}),
        400,
        "invalid_request",
        "max",
    )
    .await;
    let registration = Api {
        base: scheduler.internal_url.clone(),
        token: scheduler.runner_secret.clone(),
        http: reqwest::Client::new(),
    };
    refused(
        &registration,
        "/internal/runners/register",
        json!({"pod_name": "p\u{0}", "slots": 1}),
        400,
        "invalid_request",
        "pod_name",
    )
    .await;
    refused(
        &registration,
        "/internal/runners/register",
        json!({"pod_name": "p", "slots": 1, "labels": {"k": "v\u{0}"}}),
        400,
        "invalid_request",
        "labels.k",
    )
    .await;
    assert_eq!(db.count("SELECT count(*) FROM sluice.job_events").await, 0);
    let (_, job) = api.get(&format!("/api/jobs/{id}")).await;
    assert_eq!(job["state"], "running", "{job}");
}

/// F-13 / F-14 gaps: a finished attempt without `final_seq` takes no more events, and a
/// replayed completion with a different body is a conflict, an identical one a 200.
#[tokio::test]
async fn a_finished_stream_stays_closed_and_a_different_replay_is_a_conflict() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let id = api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    let runner = FakeRunner::register(&scheduler, "replayer").await;
    let task = runner.claim(1, 1000).await.remove(0);
    let (status, body) = runner.complete(&task, json!({"n": 1})).await;
    assert_eq!(status, 200, "{body}");
    // Completed without final_seq: the stream is closed.
    let (status, _) = runner
        .post(
            &format!("/internal/tasks/{id}/stream"),
            &json!({"attempt": task.attempt, "lease_token": task.lease_token,
                    "events": [{"seq": 1, "kind": "stdout", "data": {"text": "late"}}]}),
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(db.count("SELECT count(*) FROM sluice.job_events").await, 0);
    // The same completion again: 200, the same state. A different one: 409.
    let (status, body) = runner.complete(&task, json!({"n": 1})).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("succeeded")),
        "{body}"
    );
    let (status, body) = runner.complete(&task, json!({"n": 2})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "conflict", "{body}");
    let (_, job) = api.get(&format!("/api/jobs/{id}")).await;
    assert_eq!(job["result"], json!({"n": 1}), "the first result stands");
}

/// B-19: a running job with a timeout no statement can add to a timestamp (a row from before
/// the ranges existed), and a queue whose retention breaks the pruning step, must not stop
/// delayed jobs from being promoted, nor each other.
#[tokio::test]
async fn one_row_no_statement_can_handle_never_stalls_maintenance() {
    let db = TestDb::new().await;
    // Rows written before migration 0004's ranges (or by hand, with the checks off).
    for sql in [
        "ALTER TABLE sluice.jobs DROP CONSTRAINT jobs_timeout_ms_range",
        "ALTER TABLE sluice.queues DROP CONSTRAINT queues_retention_range",
        "INSERT INTO sluice.queues (name, retention) VALUES ('forever', interval '100000000 years')",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    let runner_id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO sluice.runners (id, pod_name, token_hash, slots) VALUES ($1, 'legacy', $2, 1)",
    )
    .bind(runner_id)
    .bind(vec![1u8; 32])
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO sluice.jobs (spec, state, attempt, timeout_ms, lease_token, runner_id,
                                  started_at, lease_expires_at, priority, max_attempts)
         VALUES ('{\"kind\":\"noop\"}', 'running', 1, 9223372036854775807, gen_random_uuid(), $1,
                 now() - interval '1 hour', now() + interval '1 hour', 0, 3)",
    )
    .bind(runner_id)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO sluice.jobs (queue, spec, state, finished_at, priority, max_attempts)
         VALUES ('forever', '{\"kind\":\"noop\"}', 'succeeded', now() - interval '1 day', 0, 3)",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "noop"}, "delay_ms": 300}))
        .await;
    wait_until(
        "the delayed job to be promoted",
        Duration::from_secs(10),
        || {
            let pool = db.pool.clone();
            async move {
                let (state,): (String,) =
                    sqlx::query_as("SELECT state::text FROM sluice.jobs WHERE id = $1")
                        .bind(id)
                        .fetch_one(&pool)
                        .await
                        .map_err(|e| e.to_string())?;
                if state == "available" {
                    Ok(Some(()))
                } else {
                    Err(format!("state {state}"))
                }
            }
        },
    )
    .await;
    // The legacy job is still running (its timeout is out of reach), not failed by an error.
    let (state,): (String,) = sqlx::query_as(
        "SELECT state::text FROM sluice.jobs WHERE timeout_ms = 9223372036854775807",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(state, "running");
}
