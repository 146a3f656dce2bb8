//! The walking skeleton end to end: SQL and HTTP enqueue become bash runs in a real sidecar,
//! and bad input is refused with the right status and writes nothing.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_protocol::{api::paths as api_paths, paths, JobId};
use sluice_testkit::{Scheduler, TestDb, Timings};

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_job_inserted_with_plain_sql_runs_and_stores_its_stdout() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _runner = scheduler.runner("sql-runner", 2).await;

    // Exactly the statement the README gives, inside the application's own transaction.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO sluice.jobs (queue, spec) VALUES ('default', '{\"kind\":\"bash\",\"script\":\"echo hello\"}')",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let (id,): (i64,) = sqlx::query_as("SELECT id FROM sluice.jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let job = scheduler.api().wait_terminal(id, DEADLINE).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["exit_code"], 0, "{job}");
    assert_eq!(job["result"]["stdout_tail"], "hello\n", "{job}");
    assert_eq!(job["attempt"], 1);

    let (state, stdout): (String, Option<String>) =
        sqlx::query_as("SELECT state::text, result->>'stdout_tail' FROM sluice.jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(state, "succeeded");
    assert_eq!(stdout.as_deref(), Some("hello\n"));

    // The output was also streamed as events of attempt 1.
    let streamed: Vec<(String, Value)> = sqlx::query_as(
        "SELECT kind, data FROM sluice.job_events WHERE job_id = $1 AND attempt = 1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let stdout_text: String = streamed
        .iter()
        .filter(|(kind, _)| kind == "stdout")
        .filter_map(|(_, data)| data["text"].as_str())
        .collect();
    assert_eq!(stdout_text, "hello\n");
}

#[tokio::test]
async fn an_uncommitted_insert_is_never_run() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _runner = scheduler.runner("rollback-runner", 1).await;

    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO sluice.jobs (spec) VALUES ('{\"kind\":\"bash\",\"script\":\"echo no\"}')",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();

    // A later committed job runs; the rolled-back one left no row to run.
    let id = scheduler
        .api()
        .enqueue(json!({"spec": {"kind": "bash", "script": "echo yes"}}))
        .await;
    let job = scheduler.api().wait_terminal(id, DEADLINE).await;
    assert_eq!(job["state"], "succeeded");
    assert_eq!(db.count("SELECT count(*) FROM sluice.jobs").await, 1);
}

#[tokio::test]
async fn sql_enqueue_function_applies_options_and_idempotency() {
    let db = TestDb::new().await;
    let (first,): (i64,) = sqlx::query_as(
        "SELECT sluice.enqueue('reports', '{\"kind\":\"noop\"}', priority => 5, idempotency_key => 'nightly-1')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let (again,): (i64,) = sqlx::query_as(
        "SELECT sluice.enqueue('reports', '{\"kind\":\"noop\"}', idempotency_key => 'nightly-1')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(first, again);
    let (queue, priority, state): (String, i32, String) =
        sqlx::query_as("SELECT queue, priority, state::text FROM sluice.jobs WHERE id = $1")
            .bind(first)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (queue.as_str(), priority, state.as_str()),
        ("reports", 5, "available")
    );
    // The queue row was created on first use.
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.queues WHERE name = 'reports'")
            .await,
        1
    );
    // A future run_at waits as scheduled.
    let (later,): (i64,) = sqlx::query_as(
        "SELECT sluice.enqueue('default', '{\"kind\":\"noop\"}', run_at => now() + interval '1 hour')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let (state,): (String,) = sqlx::query_as("SELECT state::text FROM sluice.jobs WHERE id = $1")
        .bind(later)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "scheduled");
}

#[tokio::test]
async fn the_insert_trigger_rejects_specs_no_runner_understands() {
    let db = TestDb::new().await;
    for (spec, expected) in [
        (
            r#"{"kind":"python","code":"1"}"#,
            "unknown spec kind \"python\"",
        ),
        (r#"{"script":"echo"}"#, "no \"kind\""),
        (r#"["bash"]"#, "must be a JSON object"),
        (r#"{"kind":"bash"}"#, "needs a string \"script\""),
    ] {
        let err = sqlx::query("INSERT INTO sluice.jobs (spec) VALUES ($1::jsonb)")
            .bind(spec)
            .execute(&db.pool)
            .await
            .expect_err(spec);
        assert!(err.to_string().contains(expected), "{spec}: {err}");
    }
    assert_eq!(db.count("SELECT count(*) FROM sluice.jobs").await, 0);
}

#[tokio::test]
async fn an_http_job_reports_its_result_and_a_failing_one_ends_failed_after_its_attempts() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _runner = scheduler.runner("http-runner", 2).await;
    let api = scheduler.api();

    let ok = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "echo hi; echo warn >&2"}}))
        .await;
    let job = api.wait_terminal(ok, DEADLINE).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["stdout_tail"], "hi\n");
    assert_eq!(job["result"]["stderr_tail"], "warn\n");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(job["attempts"][0]["outcome"], "succeeded");

    let failing = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "echo hi; exit 3"}, "max_attempts": 2}))
        .await;
    let job = api.wait_terminal(failing, DEADLINE).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["attempt"], 2, "retried once before failing: {job}");
    assert_eq!(job["result"]["exit_code"], 3);
    assert_eq!(job["result"]["stdout_tail"], "hi\n");
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert!(attempts.iter().all(|a| a["outcome"] == "failed"), "{job}");
    assert!(job["finished_at"].is_string());
}

#[tokio::test]
async fn a_batch_is_enqueued_in_order_in_one_transaction() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();

    let jobs: Vec<Value> = (0..5)
        .map(|i| json!({"spec": {"kind": "bash", "script": format!("echo {i}")}, "priority": i}))
        .collect();
    let (status, body) = api
        .post(api_paths::JOBS_BATCH, &json!({ "jobs": jobs }))
        .await;
    assert_eq!(status, 201, "{body}");
    let ids: Vec<i64> = body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 5);
    for (i, id) in ids.iter().enumerate() {
        let (_, job) = api.get(&api_paths::job(JobId(*id))).await;
        assert_eq!(job["spec"]["script"], format!("echo {i}"));
        assert_eq!(job["priority"], i as i64);
    }

    // One invalid job refuses the whole batch, naming its index, and writes nothing.
    let mixed = json!({"jobs": [
        {"spec": {"kind": "bash", "script": "echo ok"}},
        {"spec": {"kind": "nope"}},
    ]});
    let (status, body) = api.post(api_paths::JOBS_BATCH, &mixed).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("jobs[1]"),
        "{body}"
    );
    assert_eq!(db.count("SELECT count(*) FROM sluice.jobs").await, 5);

    // Runners drain the batch.
    let _runner = scheduler.runner("batch-runner", 4).await;
    for id in ids {
        let job = api.wait_terminal(id, DEADLINE).await;
        assert_eq!(job["state"], "succeeded");
    }
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_job() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let request = json!({"spec": {"kind": "noop"}, "idempotency_key": "order-42"});
    let (first_status, first) = api.post(api_paths::JOBS, &request).await;
    let (second_status, second) = api.post(api_paths::JOBS, &request).await;
    assert_eq!(first_status, 201, "{first}");
    assert_eq!(second_status, 200, "{second}");
    assert_eq!(first["id"], second["id"]);
    assert_eq!(db.count("SELECT count(*) FROM sluice.jobs").await, 1);
}

#[tokio::test]
async fn bad_input_gets_a_json_error_and_writes_nothing() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/jobs", scheduler.api_url);
    let token = scheduler.api_token.clone();
    let valid = r#"{"spec":{"kind":"bash","script":"echo hi"}}"#.to_string();
    let oversized = format!(
        r#"{{"spec":{{"kind":"bash","script":"{}"}}}}"#,
        "x".repeat(1_100_000)
    );

    let cases: Vec<(&str, Option<String>, String, u16, &str)> = vec![
        (
            "malformed JSON",
            Some(token.clone()),
            "{\"spec\":".into(),
            400,
            "malformed_json",
        ),
        (
            "empty body",
            Some(token.clone()),
            String::new(),
            400,
            "malformed_json",
        ),
        (
            "unknown kind",
            Some(token.clone()),
            r#"{"spec":{"kind":"python"}}"#.into(),
            400,
            "invalid_spec",
        ),
        (
            "missing script",
            Some(token.clone()),
            r#"{"spec":{"kind":"bash"}}"#.into(),
            400,
            "invalid_spec",
        ),
        (
            "unknown field",
            Some(token.clone()),
            r#"{"spec":{"kind":"noop"},"queu":"x"}"#.into(),
            400,
            "invalid_request",
        ),
        (
            "bad queue name",
            Some(token.clone()),
            r#"{"queue":"a b","spec":{"kind":"noop"}}"#.into(),
            400,
            "invalid_request",
        ),
        ("missing token", None, valid.clone(), 401, "unauthorized"),
        (
            "wrong token",
            Some("not-the-token".into()),
            valid.clone(),
            401,
            "unauthorized",
        ),
        (
            "oversized body",
            Some(token.clone()),
            oversized,
            413,
            "payload_too_large",
        ),
    ];
    for (what, token, body, status, code) in cases {
        let mut request = http.post(&url).body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let got_status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(got_status, status, "{what}: {body}");
        assert!(
            content_type.starts_with("application/json"),
            "{what}: {content_type}"
        );
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    assert_eq!(db.count("SELECT count(*) FROM sluice.jobs").await, 0);

    // Reads need the token too, unknown jobs are 404, unknown paths are JSON 404s.
    let api = scheduler.api();
    let (status, body) = api.get(&api_paths::job(JobId(999999))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _) = api.get("/api/jobs/not-a-number").await;
    assert_eq!(status, 404);
    let (status, body) = api.get("/api/nothing-here").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let response = http
        .get(format!("{}/api/jobs/1", scheduler.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    // The internal routes are not served on the public listener.
    let (status, _) = api.post(paths::REGISTER, &json!({})).await;
    assert_eq!(status, 404);
    // Health needs no token.
    let health = http
        .get(format!("{}/readyz", scheduler.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

#[tokio::test]
async fn registration_agrees_on_a_wire_protocol_version_or_names_both() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let http = reqwest::Client::new();
    let register = |protocol: Value| {
        let http = http.clone();
        let url = format!("{}{}", scheduler.internal_url, paths::REGISTER);
        let secret = scheduler.runner_secret.clone();
        async move {
            let mut body = json!({"pod_name": "versions", "slots": 1, "version": "test"});
            if !protocol.is_null() {
                body["protocol"] = protocol;
            }
            let response = http
                .post(url)
                .bearer_auth(secret)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    // A runner that sends no version (before versions were sent) gets every form there is.
    let (status, body) = register(Value::Null).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["protocol"], sluice_protocol::PROTOCOL_VERSION);
    // Each served version is answered with itself.
    for version in sluice_protocol::OLDEST_PROTOCOL_VERSION..=sluice_protocol::PROTOCOL_VERSION {
        let (status, body) = register(json!(version)).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["protocol"], version);
    }
    // Anything else is refused, naming both sides' versions.
    for unknown in [0, 3, 4096] {
        let (status, body) = register(json!(unknown)).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "protocol_mismatch", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&unknown.to_string()) && message.contains("1 to 2"),
            "{message}"
        );
    }
    let (status, body) = register(json!(-1)).await;
    assert_eq!(status, 400, "{body}");

    // The real sidecar sends its version and works in the forms of the answer.
    let runner = scheduler.runner("versioned", 1).await;
    let id = scheduler
        .api()
        .enqueue(json!({"spec": {"kind": "noop"}}))
        .await;
    let job = scheduler.api().wait_terminal(id, DEADLINE).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let log = runner.log_text();
    assert!(log.contains("(wire protocol 2)"), "{log}");
}
