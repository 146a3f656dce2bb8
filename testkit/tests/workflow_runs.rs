//! Workflow runs (issue 19): every step a job, independent steps in parallel on different
//! runners, outputs flowing through templates, `if`, `for_each`, failures that fail the run
//! and start its failure step, cancels, and runs started from SQL (I6 for DAGs).

use std::time::Duration;

use serde_json::{json, Value};
use sluice_protocol::api::paths as api_paths;
use sluice_testkit::{run_step as step, wait_until, Api, Scheduler, TestDb, Timings};

const DEADLINE: Duration = Duration::from_secs(60);

async fn register(api: &Api, name: &str, definition: &str) {
    api.register_workflow(name, definition).await;
}

async fn run(api: &Api, request: Value) -> i64 {
    api.start_run(request).await
}

async fn finished(api: &Api, id: i64) -> Value {
    api.run_finished(id, DEADLINE).await
}

#[tokio::test]
async fn a_diamond_runs_its_middle_steps_in_parallel_on_two_runners_and_passes_outputs_on() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _a = scheduler.runner("diamond-a", 1).await;
    let _b = scheduler.runner("diamond-b", 1).await;
    let api = scheduler.api();
    register(
        &api,
        "diamond",
        r#"
steps:
  - {id: start, kind: bash, script: "printf 'hello {{ input.who }}'"}
  - id: left
    depends_on: [start]
    kind: bash
    script: "sleep 1.5; printf 'left saw [{{ steps.start.output.stdout_tail }}]'"
  - id: right
    depends_on: [start]
    kind: bash
    script: "sleep 1.5; printf right"
  - id: join
    depends_on: [left, right]
    kind: bash
    script: "printf '{{ steps.left.output.stdout_tail }} + {{ steps.right.output.stdout_tail }}'"
"#,
    )
    .await;
    let id = run(
        &api,
        json!({"workflow": "diamond", "input": {"who": "ada"}}),
    )
    .await;
    let done = finished(&api, id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        step(&done, "join")["output"]["stdout_tail"],
        "left saw [hello ada] + right"
    );
    for id in ["start", "left", "right", "join"] {
        assert_eq!(step(&done, id)["state"], "succeeded");
        assert_eq!(step(&done, id)["jobs"].as_array().unwrap().len(), 1);
    }
    // The two middle steps ran at the same time, on different runners.
    let rows: Vec<(
        String,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
        uuid::Uuid,
    )> = sqlx::query_as(
        "SELECT j.step_id, a.started_at, a.finished_at, a.runner_id
             FROM sluice.jobs j JOIN sluice.job_attempts a ON a.job_id = j.id
             WHERE j.workflow_run_id = $1 AND j.step_id IN ('left', 'right') ORDER BY j.step_id",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    let (left, right) = (&rows[0], &rows[1]);
    assert!(left.1 < right.2 && right.1 < left.2, "no overlap: {rows:?}");
    assert_ne!(left.3, right.3, "both ran on one runner");
    // A step's context holds what it reads (its parents here), not the whole run.
    let (reads_start, reads_left): (bool, bool) = sqlx::query_as(
        "SELECT context -> 'steps' ? 'start', context -> 'steps' ? 'left'
         FROM sluice.run_steps WHERE run_id = $1 AND step_id = 'join'",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((reads_start, reads_left), (false, true));
}

#[tokio::test]
async fn a_failed_step_fails_the_run_cancels_what_is_left_and_starts_the_failure_step() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _runner = scheduler.runner("failing", 3).await;
    let api = scheduler.api();
    register(
        &api,
        "breaks",
        r#"
steps:
  - {id: slow, kind: bash, script: "sleep 30"}
  - {id: bad, kind: bash, script: "echo boom >&2; exit 3", retry: {max_attempts: 1}}
  - {id: after, depends_on: [bad], kind: noop}
on_failure:
  id: alert
  kind: bash
  script: "printf 'failed at {{ failure.step }}'"
"#,
    )
    .await;
    let id = run(&api, json!({"workflow": "breaks"})).await;
    let done = finished(&api, id).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["step"], "bad", "{done}");
    assert_eq!(done["error"]["error"]["code"], "exit_code", "{done}");
    assert_eq!(step(&done, "bad")["state"], "failed");
    assert_eq!(step(&done, "after")["state"], "cancelled");
    // The failure step runs with the failure in its context.
    let alert = wait_until("the failure step to finish", DEADLINE, || async {
        let (_, run) = api.get(&api_paths::run(id)).await;
        let alert = step(&run, "alert").clone();
        if alert["state"] == "succeeded" {
            Ok(Some(alert))
        } else {
            Err(alert.to_string())
        }
    })
    .await;
    assert_eq!(alert["output"]["stdout_tail"], "failed at bad");
    assert_eq!(alert["on_failure"], true);
    // The running sibling was cancelled, and its tool is gone.
    let slow = step(&done, "slow");
    let job = slow["jobs"][0]["id"].as_i64().unwrap();
    let (_, job) = api.get(&api_paths::job(sluice_protocol::JobId(job))).await;
    assert_eq!(job["state"], "cancelled", "{job}");
    assert_eq!(job["error"]["code"], "run_failed", "{job}");
}

#[tokio::test]
async fn conditions_skip_and_for_each_fans_out_and_back_in() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _runner = scheduler.runner("fan", 4).await;
    let api = scheduler.api();
    register(
        &api,
        "fan",
        r#"
steps:
  - {id: gate, kind: noop}
  - {id: never, depends_on: [gate], kind: bash, script: "exit 1", if: "input.run_never == true"}
  - {id: after_never, depends_on: [never], kind: bash, script: "printf 'never={{ steps.never.output }}'"}
  - {id: each, kind: bash, script: "printf 'item {{ item }} at {{ index }}'", for_each: input.items}
  - {id: none, kind: noop, for_each: input.empty}
  - {id: gather, depends_on: [each, none], kind: bash, script: "printf '{{ steps.each.output[2].stdout_tail }}'"}
"#,
    )
    .await;
    let id = run(
        &api,
        json!({"workflow": "fan", "input": {"run_never": false, "items": ["a", "b", "c"], "empty": []}}),
    )
    .await;
    let done = finished(&api, id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(step(&done, "never")["state"], "skipped");
    assert_eq!(
        step(&done, "after_never")["output"]["stdout_tail"],
        "never=null"
    );
    let each = step(&done, "each");
    assert_eq!(each["jobs"].as_array().unwrap().len(), 3);
    let outputs: Vec<&str> = each["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["stdout_tail"].as_str().unwrap())
        .collect();
    assert_eq!(outputs, ["item a at 0", "item b at 1", "item c at 2"]);
    assert_eq!(step(&done, "none")["output"], json!([]));
    assert_eq!(
        step(&done, "gather")["output"]["stdout_tail"],
        "item c at 2"
    );

    // A for_each over more than 10,000 elements fails the run before starting any.
    let many: Vec<i32> = (0..10_001).collect();
    let id = run(
        &api,
        json!({"workflow": "fan", "input": {"items": many, "empty": []}}),
    )
    .await;
    let done = finished(&api, id).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert!(done["error"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("longer than 10000"));
    assert!(step(&done, "each")["jobs"].as_array().unwrap().is_empty());

    // A for_each over something that is not a list fails the run naming it.
    let id = run(
        &api,
        json!({"workflow": "fan", "input": {"items": 7, "empty": []}}),
    )
    .await;
    let done = finished(&api, id).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["error"]["code"], "template_error", "{done}");
    assert!(done["error"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("input.items"));
}

#[tokio::test]
async fn a_template_that_does_not_resolve_fails_its_step_and_cancel_stops_a_run() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _runner = scheduler.runner("templates", 2).await;
    let api = scheduler.api();
    let id = run(
        &api,
        json!({"workflow": {"name": "typo", "steps": [
            {"id": "a", "kind": "bash", "script": "echo {{ input.missing.deep }}"}
        ]}}),
    )
    .await;
    let done = finished(&api, id).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["error"]["code"], "template_error", "{done}");
    assert!(done["error"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("input.missing.deep"));
    let (_, workflow) = api.get(&api_paths::workflow("typo")).await;
    assert_eq!(
        done["version"], workflow["version"],
        "an inline definition is registered"
    );

    // Cancelling a run kills its running step and leaves the rest unstarted.
    let id = run(
        &api,
        json!({"workflow": {"name": "long", "steps": [
            {"id": "a", "kind": "bash", "script": "sleep 60"},
            {"id": "b", "depends_on": ["a"], "kind": "noop"}
        ]}}),
    )
    .await;
    wait_until("step a to run", DEADLINE, || async {
        let (_, run) = api.get(&api_paths::run(id)).await;
        let job = step(&run, "a")["jobs"][0]["state"].clone();
        Ok::<_, String>((job == "running").then_some(()))
    })
    .await;
    let (status, body) = api.post(&api_paths::cancel_run(id), &json!({})).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("cancelled")),
        "{body}"
    );
    let done = finished(&api, id).await;
    assert_eq!(done["state"], "cancelled");
    assert_eq!(step(&done, "b")["state"], "cancelled");
    let (status, body) = api.post(&api_paths::cancel_run(id), &json!({})).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("cancelled")),
        "cancel is idempotent"
    );
    let (status, _) = api.post(&api_paths::cancel_run(424242), &json!({})).await;
    assert_eq!(status, 404);
    let (status, _) = api.get(&api_paths::run(424242)).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_run_started_from_sql_commits_with_the_callers_transaction() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _runner = scheduler.runner("sql-runs", 2).await;
    let api = scheduler.api();
    register(
        &api,
        "from-sql",
        "steps: [{id: a, kind: bash, script: \"printf '{{ input.n }}'\"}]",
    )
    .await;
    let mut tx = db.pool.begin().await.unwrap();
    let (_,): (i64,) = sqlx::query_as("SELECT sluice.run_workflow('from-sql', '{\"n\": 1}')")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.workflow_runs").await,
        0
    );
    assert_eq!(db.count("SELECT count(*) FROM sluice.jobs").await, 0);
    let (id,): (i64,) = sqlx::query_as("SELECT sluice.run_workflow('from-sql', '{\"n\": 2}')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let done = finished(&api, id).await;
    assert_eq!(step(&done, "a")["output"]["stdout_tail"], "2");
    let err = sqlx::query("SELECT sluice.run_workflow('nope')")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no workflow nope"), "{err}");

    // Runs are listed newest first, filtered and paged.
    let second = run(&api, json!({"workflow": "from-sql", "input": {"n": 3}})).await;
    let (_, list) = api
        .get(&format!("{}?workflow=from-sql&limit=1", api_paths::RUNS))
        .await;
    assert_eq!(list["runs"][0]["id"], second);
    assert_eq!(list["next_before"], second);
    let (_, page) = api
        .get(&format!(
            "{}?workflow=from-sql&before={second}",
            api_paths::RUNS
        ))
        .await;
    assert_eq!(page["runs"][0]["id"], id);
    for bad in [
        "state=sideways",
        "limit=0",
        "limit=1001",
        "colour=red",
        "workflow=-x",
    ] {
        let (status, _) = api.get(&format!("{}?{bad}", api_paths::RUNS)).await;
        assert_eq!(status, 400, "{bad}");
    }
    // Bad run requests.
    for (request, status) in [
        (json!({"workflow": "nope"}), 404),
        (json!({"workflow": "from-sql", "version": "abc"}), 400),
        (
            json!({"workflow": "from-sql", "input": {"k": "a\u{0}b"}}),
            400,
        ),
        (json!({"workflow": {"steps": []}}), 422),
        (json!({"workflow": "from-sql", "extra": 1}), 400),
    ] {
        let (got, body) = api.post(api_paths::WORKFLOWS_RUN, &request).await;
        assert_eq!(got, status, "{request}: {body}");
    }
}

#[tokio::test]
async fn a_step_hands_on_a_json_document_and_reads_its_context() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _runner = scheduler.runner("documents", 3).await;
    let api = scheduler.api();
    register(
        &api,
        "documents",
        r#"
steps:
  - id: gen
    kind: bash
    script: |
      printf '{"items": ["x", "y"], "n": %d}' "$(wc -c < "$SLUICE_CONTEXT")" > "$SLUICE_OUTPUT"
  - {id: each, depends_on: [gen], for_each: steps.gen.output.value.items, kind: bash,
     script: "printf '{\"got\": \"%s\"}' \"$(jq -r .item \"$SLUICE_CONTEXT\" 2>/dev/null || echo {{ item }})\" > $SLUICE_OUTPUT"}
  - {id: sum, depends_on: [each], kind: bash,
     script: "printf '{{ steps.each.output[0].value.got }}{{ steps.each.output[1].value.got }}'"}
"#,
    )
    .await;
    let id = run(&api, json!({"workflow": "documents", "input": {"k": 1}})).await;
    let done = finished(&api, id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let gen = &step(&done, "gen")["output"]["value"];
    assert_eq!(gen["items"], json!(["x", "y"]));
    assert!(
        gen["n"].as_i64().unwrap() > 10,
        "the context file was there: {gen}"
    );
    assert_eq!(step(&done, "sum")["output"]["stdout_tail"], "xy");

    // A document that is not JSON, or a link out of the workspace, fails the attempt.
    for script in [
        "echo 'not json' > $SLUICE_OUTPUT",
        "ln -s /etc/passwd $SLUICE_OUTPUT",
    ] {
        let job = api
            .enqueue(json!({"spec": {"kind": "bash", "script": script}, "max_attempts": 1}))
            .await;
        let job = api.wait_terminal(job, DEADLINE).await;
        assert_eq!(job["state"], "failed", "{script}: {job}");
        assert_eq!(job["error"]["code"], "invalid_output", "{script}: {job}");
        assert!(
            !job.to_string().contains("root:"),
            "{script}: a file outside the workspace was read: {job}"
        );
    }
    // A plain job may hand on a document too.
    let job = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "echo '[1, 2]' > $SLUICE_OUTPUT"}}))
        .await;
    let job = api.wait_terminal(job, DEADLINE).await;
    assert_eq!(job["result"]["value"], json!([1, 2]), "{job}");
}
