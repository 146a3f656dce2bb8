//! Bad input on every field (B-06, B-19, B-20) and the runner protocol's gaps (F-13, F-14):
//! each is refused with a status and a message naming the field, and nothing is written; and
//! one row no statement can handle never stops maintenance for the others.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_protocol::{api::paths as api_paths, paths, JobId};
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
        refused(&api, api_paths::JOBS, body, status, code, field).await;
    }
    // A batch names the member.
    refused(
        &api,
        api_paths::JOBS_BATCH,
        json!({"jobs": [{"spec": noop}, {"spec": noop, "priority": 99999}]}),
        400,
        "invalid_request",
        "jobs[1].priority",
    )
    .await;
    // A member whose value does not even fit its type is named too, in either shape.
    refused(
        &api,
        api_paths::JOBS_BATCH,
        json!({"jobs": [{"spec": noop}, {"spec": noop, "timeout_ms": -1}]}),
        400,
        "invalid_request",
        "jobs[1].timeout_ms",
    )
    .await;
    refused(
        &api,
        api_paths::JOBS_BATCH,
        json!([{"spec": noop}, {"spec": noop, "delay_ms": "soon"}]),
        400,
        "invalid_request",
        "[1].delay_ms",
    )
    .await;
    refused(
        &api,
        api_paths::JOBS_BATCH,
        json!({"jobs": [{"spec": noop}, {"spec": {"kind": "bash", "script": "\u{0}"}}]}),
        400,
        "invalid_spec",
        "jobs[1]",
    )
    .await;
    let many: Vec<Value> = (0..10_001)
        .map(|_| json!({"spec": {"kind": "noop"}}))
        .collect();
    let (status, _) = api
        .post(api_paths::JOBS_BATCH, &json!({ "jobs": many }))
        .await;
    assert!(status == 400 || status == 413, "{status}");
    assert_eq!(db.count("SELECT count(*) FROM sluice.jobs").await, 0);

    // The largest accepted values are accepted.
    let (status, body) = api
        .post(
            api_paths::JOBS,
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
        match insert(sql).await {
            Err(sqlx::Error::Database(e)) => {
                // The trigger's and the checks' refusals (23514); Postgres' own refusal of a
                // NUL in jsonb (22P05).
                let code = e.code().unwrap_or_default().to_string();
                assert!(
                    code == "23514" || code == "22P05",
                    "{sql}: refused with {code}: {}",
                    e.message()
                );
            }
            other => panic!("{sql}: {other:?}"),
        }
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
        &paths::stream(JobId(id)),
        with(json!({"events": [{"seq": 1, "kind": "stdout", "data": {"text": "a\u{0}b"}}]})),
        400,
        "invalid_request",
        "events[0].data.text",
    )
    .await;
    refused(
        &internal,
        &paths::stream(JobId(id)),
        with(json!({"events": [{"seq": 1, "kind": "x".repeat(100), "data": {}}]})),
        400,
        "invalid_request",
        "events[0].kind",
    )
    .await;
    refused(
        &internal,
        &paths::complete(JobId(id)),
        with(json!({"outcome": "succeeded", "output": {"text": "\u{0}"}})),
        400,
        "invalid_request",
        "output.text",
    )
    .await;
    refused(
        &internal,
        &paths::complete(JobId(id)),
        with(json!({"outcome": "succeeded", "final_seq": -1})),
        400,
        "invalid_request",
        "final_seq",
    )
    .await;
    let held = serde_json::to_value(task.lease()).unwrap();
    let leases: Vec<Value> = (0..10_001).map(|_| held.clone()).collect();
    refused(
        &internal,
        &paths::heartbeat(&runner.pod_name),
        json!({"running": leases}),
        400,
        "invalid_request",
        "at most 10000",
    )
    .await;
    refused(
        &internal,
        &paths::heartbeat(&runner.pod_name),
        json!({"running": [held.clone(), held.clone()]}),
        400,
        "invalid_request",
        "listed more than once",
    )
    .await;
    refused(
        &internal,
        &paths::claim(&runner.pod_name),
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
        paths::REGISTER,
        json!({"pod_name": "p\u{0}", "slots": 1}),
        400,
        "invalid_request",
        "pod_name",
    )
    .await;
    refused(
        &registration,
        paths::REGISTER,
        json!({"pod_name": "p", "slots": 1, "labels": {"k": "v\u{0}"}}),
        400,
        "invalid_request",
        "labels.k",
    )
    .await;
    assert_eq!(db.count("SELECT count(*) FROM sluice.job_events").await, 0);
    let (_, job) = api.get(&api_paths::job(JobId(id))).await;
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
            &paths::stream(JobId(id)),
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
    let (_, job) = api.get(&api_paths::job(JobId(id))).await;
    assert_eq!(job["result"], json!({"n": 1}), "the first result stands");
}

/// Rows written before migration 0004's ranges existed are brought into range by it (a check
/// also holds on every later UPDATE: one such row would otherwise make every claim, heartbeat
/// or reclaim that touches it fail).
#[tokio::test]
async fn migration_0004_brings_old_rows_into_range() {
    let db = TestDb::unmigrated().await;
    sluice::store::MIGRATOR.run_to(3, &db.pool).await.unwrap();
    for sql in [
        "INSERT INTO sluice.queues (name, default_priority, default_max_attempts,
                                    default_timeout_ms, retention)
         VALUES ('old', 99999, 5000, 9223372036854775807, interval '100000 years')",
        "INSERT INTO sluice.jobs (queue, spec, priority, timeout_ms, run_at)
         VALUES ('old', '{\"kind\":\"noop\"}', -99999, 9223372036854775807, '1000-01-01')",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    sluice::store::MIGRATOR.run(&db.pool).await.unwrap();
    let (priority, timeout, run_at): (i32, i64, String) =
        sqlx::query_as("SELECT priority, timeout_ms, run_at::date::text FROM sluice.jobs")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (priority, timeout, run_at.as_str()),
        (-32768, 2_592_000_000, "1970-01-01")
    );
    let queue: (i32, i32, i64, String) = sqlx::query_as(
        "SELECT default_priority, default_max_attempts, default_timeout_ms, retention::text
         FROM sluice.queues WHERE name = 'old'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(queue, (32767, 1000, 2_592_000_000, "100 years".to_string()));
    // The constraints are in force, for old rows as for new ones.
    let invalid: (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_constraint WHERE NOT convalidated AND conname LIKE '%range'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(invalid.0, 0);
}

/// B-19: each maintenance step runs on its own. A step that fails on every pass (here the
/// pruning, by a trigger refusing to delete one queue's jobs) is logged and retried, and never
/// stops delayed jobs from being promoted or expired leases from being reclaimed.
#[tokio::test]
async fn a_failing_maintenance_step_never_stalls_the_others() {
    let db = TestDb::new().await;
    for sql in [
        "INSERT INTO sluice.queues (name, retention) VALUES ('poison', interval '0')",
        "INSERT INTO sluice.jobs (queue, spec, state, finished_at, priority, max_attempts)
         VALUES ('poison', '{\"kind\":\"noop\"}', 'succeeded', now() - interval '1 day', 0, 3)",
        "CREATE FUNCTION sluice.refuse_delete() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RAISE EXCEPTION 'refusing to delete'; END $$",
        "CREATE TRIGGER refuse_delete BEFORE DELETE ON sluice.jobs
         FOR EACH ROW WHEN (OLD.queue = 'poison') EXECUTE FUNCTION sluice.refuse_delete()",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    let silent = FakeRunner::register(&scheduler, "silent").await;
    let leased = api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    assert_eq!(silent.claim(1, 2000).await[0].job_id.0, leased);
    let delayed = api
        .enqueue(json!({"spec": {"kind": "noop"}, "delay_ms": 300}))
        .await;
    wait_until(
        "the promotion and the reclaim beside a failing prune",
        Duration::from_secs(10),
        || {
            let pool = db.pool.clone();
            async move {
                let states: Vec<(String,)> = sqlx::query_as(
                    "SELECT state::text FROM sluice.jobs WHERE id = ANY($1) ORDER BY id",
                )
                .bind(vec![leased, delayed])
                .fetch_all(&pool)
                .await
                .map_err(|e| e.to_string())?;
                if states.iter().all(|(s,)| s == "available") {
                    Ok(Some(()))
                } else {
                    Err(format!("{states:?}"))
                }
            }
        },
    )
    .await;
    assert!(
        scheduler.log_text().contains("maintenance step failed"),
        "the failing step is logged"
    );
}

#[tokio::test]
async fn paths_that_cannot_be_read_are_answered_in_json_on_both_listeners() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    for path in [
        "/api/jobs/%FF",
        "/api/workflows/%FF%FE",
        "/api/schedules/%C0",
        "/api/runs/%FF",
        "/api/runs/1/artifacts/%FF",
        "/api/runs/1/artifacts/a%00b",
    ] {
        let (status, body) = api.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{path}: {body}");
    }
    let runner = FakeRunner::register(&scheduler, "paths").await;
    let (status, body) = runner
        .put_bytes("/internal/tasks/%FF/artifacts/0", &[], vec![1])
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    // An artifact chunk over the internal body limit is a JSON 413.
    let (status, body) = runner
        .put_bytes(
            &paths::artifact_chunk(JobId(1), 0),
            &[
                (sluice_protocol::lease_headers::ATTEMPT, "1".into()),
                (
                    sluice_protocol::lease_headers::LEASE_TOKEN,
                    uuid::Uuid::new_v4().to_string(),
                ),
            ],
            vec![0u8; 9 << 20],
        )
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    // A lease missing from the headers, or malformed: 400 naming the header.
    for headers in [
        vec![],
        vec![(sluice_protocol::lease_headers::ATTEMPT, "0".to_string())],
        vec![
            (sluice_protocol::lease_headers::ATTEMPT, "1".to_string()),
            (
                sluice_protocol::lease_headers::LEASE_TOKEN,
                "not-a-uuid".to_string(),
            ),
        ],
    ] {
        let (status, body) = runner
            .put_bytes(&paths::artifact_chunk(JobId(1), 0), &headers, vec![1])
            .await;
        assert_eq!(status, 400, "{headers:?}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("x-sluice-"),
            "{body}"
        );
    }
}
