//! Agent steps (issue 20, B-17): the sidecar's Messages API tool-use loop against a local fake
//! of the API (the only fake: the scheduler, the sidecar and its sandboxed tools are real).
//! Each test asserts the requests the fake received and the job's result and events.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_protocol::api::paths as api_paths;
use sluice_testkit::anthropic::{FakeAnthropic, Received, Reply};
use sluice_testkit::{wait_until, Runner, Scheduler, TestDb, Timings};

/// The key every test gives the sidecar; it must never show up anywhere but in the header.
const CANARY: &str = "sk-ant-canary-7f3e9b1c5d";
const WAIT: Duration = Duration::from_secs(60);

struct Setup {
    db: TestDb,
    scheduler: Scheduler,
    runner: Runner,
    fake: FakeAnthropic,
}

async fn setup(fake: FakeAnthropic, extra_env: &[(&str, &str)]) -> Setup {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let mut env = vec![
        ("ANTHROPIC_API_KEY", CANARY),
        ("ANTHROPIC_BASE_URL", fake.url.as_str()),
        ("SLUICE_AGENT_RETRY_BASE_MS", "10"),
    ];
    env.extend_from_slice(extra_env);
    let runner = Runner::start(&scheduler, "agent", 2, &env).await;
    Setup {
        db,
        scheduler,
        runner,
        fake,
    }
}

async fn events(db: &TestDb, job: i64) -> Vec<(String, Value)> {
    sqlx::query_as(
        "SELECT kind, data FROM sluice.job_events WHERE job_id = $1 ORDER BY attempt, seq",
    )
    .bind(job)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

fn of_kind<'a>(events: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|(k, _)| k == kind)
        .map(|(_, d)| d)
        .collect()
}

/// The canary is nowhere in what the job left: result, error, events, the runner's log.
async fn assert_no_canary(setup: &Setup, job: &Value) {
    let id = job["id"].as_i64().unwrap();
    assert!(
        !job.to_string().contains(CANARY),
        "the key leaked into the job: {job}"
    );
    let stored = events(&setup.db, id).await;
    assert!(
        !format!("{stored:?}").contains(CANARY),
        "the key leaked into the events"
    );
    assert!(
        !setup.runner.log_text().contains(CANARY),
        "the key leaked into the runner's log"
    );
    assert!(
        !setup.scheduler.log_text().contains(CANARY),
        "the key leaked into the scheduler's log"
    );
}

fn tool_results(request: &Received) -> Vec<Value> {
    let messages = request.body["messages"].as_array().unwrap();
    let last = messages.last().unwrap();
    assert_eq!(last["role"], "user");
    last["content"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_text_ends_the_job_with_the_text_usage_and_coalesced_events() {
    let long = "The answer is forty-two. ".repeat(20);
    let setup = setup(FakeAnthropic::replay(vec![Reply::text(&long)]).await, &[]).await;
    let api = setup.scheduler.api();
    let id = api
        .enqueue(
            json!({"spec": {"kind": "agent", "prompt": "What is the answer?",
            "system": "Be brief.", "max_tokens": 512}}),
        )
        .await;
    let job = api.wait_terminal(id, WAIT).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let result = &job["result"];
    assert_eq!(result["text"], long.as_str());
    assert_eq!(result["turns"], 1);
    assert_eq!(result["stop_reason"], "end_turn");
    assert_eq!(result["usage"]["input_tokens"], 100);
    assert_eq!(result["usage"]["output_tokens"], 50);

    // The request: the key in its header, the version, a stream, the spec's fields, tools.
    let received = setup.fake.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(request.headers["x-api-key"], CANARY);
    assert_eq!(request.headers["anthropic-version"], "2023-06-01");
    assert_eq!(request.body["stream"], true);
    assert_eq!(request.body["max_tokens"], 512);
    assert_eq!(request.body["system"], "Be brief.");
    assert_eq!(
        request.body["messages"],
        json!([{"role": "user", "content": "What is the answer?"}])
    );
    let offered: Vec<&str> = request.body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        offered,
        ["bash", "read_file", "write_file", "grep", "web_fetch"]
    );

    // Text deltas are coalesced: the fake sent one per 3 characters.
    let stored = events(&setup.db, id).await;
    let texts = of_kind(&stored, "text");
    let joined: String = texts.iter().map(|d| d["text"].as_str().unwrap()).collect();
    assert_eq!(joined, long);
    let deltas = long.chars().count().div_ceil(3);
    assert!(
        texts.len() * 10 <= deltas,
        "{} text events for {deltas} deltas",
        texts.len()
    );
    let usage = of_kind(&stored, "usage");
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0]["turn"], 1);
    assert_eq!(usage[0]["output_tokens"], 50);
    assert_no_canary(&setup, &job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_run_in_the_sandbox_and_their_results_go_back_with_matching_ids() {
    let fake = FakeAnthropic::replay(vec![
        // Two calls in one turn: write a file, then read it back with bash (and print the
        // tool's environment, which must not hold the key).
        Reply::tools(
            "Writing it.",
            &[
                ("toolu_w", "write_file", r#"{"path": "notes/a.txt", "content": "hello from the model"}"#),
                ("toolu_b", "bash", r#"{"command": "cat notes/a.txt; echo; env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'"}"#),
            ],
        ),
        // One call whose input is not JSON, and one to a tool that was not offered.
        Reply::tools(
            "",
            &[
                ("toolu_bad", "read_file", r#"{"path": "notes/a.txt""#),
                ("toolu_x", "launch_missiles", r#"{}"#),
            ],
        ),
        Reply::text("All done."),
    ])
    .await;
    let setup = setup(fake, &[]).await;
    let api = setup.scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "agent", "prompt": "Write a note and read it."}}))
        .await;
    let job = api.wait_terminal(id, WAIT).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["turns"], 3);
    assert_eq!(job["result"]["text"], "All done.");

    let received = setup.fake.received();
    assert_eq!(received.len(), 3);
    // Turn 2's request: the whole conversation, results matching the calls' ids, in order.
    let second = &received[1].body["messages"];
    assert_eq!(second.as_array().unwrap().len(), 3, "{second}");
    assert_eq!(
        second[0],
        json!({"role": "user", "content": "Write a note and read it."})
    );
    assert_eq!(second[1]["role"], "assistant");
    assert_eq!(
        second[1]["content"][0],
        json!({"type": "text", "text": "Writing it."})
    );
    assert_eq!(second[1]["content"][1]["id"], "toolu_w");
    assert!(second[1]["content"][2]["input"]["command"]
        .as_str()
        .unwrap()
        .starts_with("cat"));
    let results = tool_results(&received[1]);
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["tool_use_id"], "toolu_w");
    assert_eq!(results[0]["type"], "tool_result");
    assert!(results[0].get("is_error").is_none(), "{}", results[0]);
    assert_eq!(results[1]["tool_use_id"], "toolu_b");
    let bash: Value = serde_json::from_str(results[1]["content"].as_str().unwrap()).unwrap();
    assert_eq!(bash["exit_code"], 0);
    assert!(
        bash["stdout_tail"]
            .as_str()
            .unwrap()
            .starts_with("hello from the model"),
        "{bash}"
    );
    assert!(
        !results[1].to_string().contains(CANARY),
        "the tool saw the key"
    );
    assert!(
        !results[1].to_string().contains("ANTHROPIC"),
        "the tool saw the key's name"
    );

    // Turn 3's request: the malformed input and the unknown tool came back as errors.
    let results = tool_results(&received[2]);
    assert_eq!(results[0]["tool_use_id"], "toolu_bad");
    assert_eq!(results[0]["is_error"], true);
    assert!(results[0]["content"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    assert_eq!(results[1]["tool_use_id"], "toolu_x");
    assert_eq!(results[1]["is_error"], true);
    assert!(results[1]["content"]
        .as_str()
        .unwrap()
        .contains("not one of the offered tools"));
    // The history keeps the malformed call with an empty input, so the API accepts it.
    assert_eq!(
        received[2].body["messages"][3]["content"][0]["input"],
        json!({})
    );

    // Events: each call with its input, each result, usage per turn.
    let stored = events(&setup.db, id).await;
    let calls = of_kind(&stored, "tool_call");
    assert_eq!(
        calls
            .iter()
            .map(|c| c["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["toolu_w", "toolu_b", "toolu_bad", "toolu_x"]
    );
    assert_eq!(calls[0]["input"]["path"], "notes/a.txt");
    let results = of_kind(&stored, "tool_result");
    assert_eq!(results.len(), 4);
    assert_eq!(results[2]["is_error"], true);
    assert_eq!(of_kind(&stored, "usage").len(), 3);
    // The bash call's own output streamed as the job's events too.
    assert!(of_kind(&stored, "stdout").iter().any(|d| d["text"]
        .as_str()
        .unwrap_or("")
        .contains("hello from the model")));
    assert_no_canary(&setup, &job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b17_a_model_that_calls_tools_forever_stops_at_max_turns_exactly() {
    let fake = FakeAnthropic::start(|n, _| {
        let id = format!("toolu_{n}");
        Reply::tools("again", &[(&id, "bash", r#"{"command": "echo loop"}"#)])
    })
    .await;
    let setup = setup(fake, &[]).await;
    let api = setup.scheduler.api();
    let id = api
        .enqueue(
            json!({"spec": {"kind": "agent", "prompt": "loop", "max_turns": 4}, "max_attempts": 3}),
        )
        .await;
    let job = api.wait_terminal(id, WAIT).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "max_turns");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "not retried");
    assert_eq!(job["result"]["turns"], 4);
    assert_eq!(job["result"]["stop_reason"], "max_turns");
    assert_eq!(job["result"]["usage"]["input_tokens"], 400);
    assert_eq!(setup.fake.received().len(), 4, "exactly max_turns requests");
    // The tools of the last turn were not run: three rounds of results only.
    let stored = events(&setup.db, id).await;
    assert_eq!(of_kind(&stored, "tool_result").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_budget_stops_the_loop() {
    let fake = FakeAnthropic::start(|n, _| {
        let id = format!("toolu_{n}");
        Reply::tools("", &[(&id, "bash", r#"{"command": "true"}"#)])
    })
    .await;
    let setup = setup(fake, &[]).await;
    let api = setup.scheduler.api();
    // 150 tokens a turn (100 in, 50 out): the budget of 400 is spent after the third.
    let id = api
        .enqueue(json!({"spec": {"kind": "agent", "prompt": "spend", "token_budget": 400}}))
        .await;
    let job = api.wait_terminal(id, WAIT).await;
    assert_eq!(job["error"]["code"], "token_budget", "{job}");
    assert_eq!(job["result"]["turns"], 3);
    assert_eq!(setup.fake.received().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_and_cut_streams_are_retried_and_a_401_is_not() {
    let fake = FakeAnthropic::replay(vec![
        Reply::status(529, "overloaded_error", Some("0")),
        Reply::cut("Partial answ"),
        Reply::status(500, "api_error", None),
        Reply::text("Recovered."),
        // The second job.
        Reply::status(401, "authentication_error", None),
    ])
    .await;
    let setup = setup(fake, &[]).await;
    let api = setup.scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "agent", "prompt": "retry me"}}))
        .await;
    let job = api.wait_terminal(id, WAIT).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["text"], "Recovered.");
    assert_eq!(job["result"]["turns"], 1);
    let received = setup.fake.received();
    assert_eq!(received.len(), 4);
    for request in &received {
        assert_eq!(
            request.body, received[0].body,
            "a retry sends the same request"
        );
    }
    let stored = events(&setup.db, id).await;
    let retries = of_kind(&stored, "model_retry");
    assert_eq!(retries.len(), 3, "{retries:?}");
    assert_eq!(retries[0]["status"], 529);
    assert_eq!(retries[0]["delay_ms"], 0, "retry-after: 0 was honoured");
    assert_eq!(retries[2]["status"], 500);

    let id = api
        .enqueue(json!({"spec": {"kind": "agent", "prompt": "refused"}, "max_attempts": 3}))
        .await;
    let job = api.wait_terminal(id, WAIT).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "model_refused");
    assert!(
        job["error"]["message"].as_str().unwrap().contains("401"),
        "{job}"
    );
    assert_eq!(
        job["attempts"].as_array().unwrap().len(),
        1,
        "a 401 is not retried"
    );
    assert_eq!(setup.fake.received().len(), 5);
    assert_no_canary(&setup, &job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_giant_tool_input_is_answered_with_an_error_not_run() {
    let giant = format!(
        r#"{{"path": "big.txt", "content": "{}"}}"#,
        "x".repeat(3 << 20)
    );
    let fake = FakeAnthropic::replay(vec![
        Reply::tools("", &[("toolu_big", "write_file", &giant)]),
        Reply::text("ok"),
    ])
    .await;
    let setup = setup(fake, &[]).await;
    let api = setup.scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "agent", "prompt": "write a lot"}}))
        .await;
    let job = api.wait_terminal(id, WAIT).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let received = setup.fake.received();
    let results = tool_results(&received[1]);
    assert_eq!(results[0]["is_error"], true);
    assert!(results[0]["content"].as_str().unwrap().contains("exceeded"));
    // The giant input is not sent back.
    assert!(received[1].body.to_string().len() < 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_an_agent_job_fails_with_a_configuration_error() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _runner = Runner::start(&scheduler, "keyless", 1, &[]).await;
    let api = scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "agent", "prompt": "hi"}, "max_attempts": 3}))
        .await;
    let job = api.wait_terminal(id, WAIT).await;
    assert_eq!(job["state"], "failed");
    assert_eq!(job["error"]["code"], "configuration");
    assert!(job["error"]["message"]
        .as_str()
        .unwrap()
        .contains("ANTHROPIC_API_KEY"));
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_the_loop_and_its_running_tool_at_once() {
    let fake = FakeAnthropic::replay(vec![Reply::tools(
        "",
        &[(
            "toolu_s",
            "bash",
            r#"{"command": "echo started; sleep 317"}"#,
        )],
    )])
    .await;
    let setup = setup(fake, &[]).await;
    let api = setup.scheduler.api();
    let id = api
        .enqueue(json!({"spec": {"kind": "agent", "prompt": "sleep"}}))
        .await;
    wait_until("the tool to start", WAIT, || {
        let db = &setup.db;
        async move {
            let started = events(db, id).await.iter().any(|(k, d)| {
                k == "stdout" && d["text"].as_str().unwrap_or("").contains("started")
            });
            if started {
                Ok(Some(()))
            } else {
                Err("no output yet".to_string())
            }
        }
    })
    .await;
    let (status, _) = api
        .post(&api_paths::cancel(sluice_protocol::JobId(id)), &json!({}))
        .await;
    assert_eq!(status, 200);
    // The sleep is gone within the heartbeat and the kill grace, well before its 317 s.
    wait_until("the tool to be killed", Duration::from_secs(20), || async {
        let sleeping = sluice_testkit::procs::live()
            .into_iter()
            .any(|p| p.mentions("sleep\u{0}317"));
        if sleeping {
            Err("sleep 317 still runs".to_string())
        } else {
            Ok(Some(()))
        }
    })
    .await;
    let job = api.wait_terminal(id, WAIT).await;
    assert_eq!(job["state"], "cancelled");
    assert_eq!(setup.fake.received().len(), 1, "no turn after the cancel");
}

/// The prompt of the last user message that is a prompt (not tool results).
fn prompt_of(body: &Value) -> String {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|m| m["role"] == "user" && m["content"].is_string())
        .map(|m| m["content"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_continues_the_conversation_one_job_at_a_time() {
    // Every answer is held until the test releases it, so the second job could only run
    // beside the first if the session let it.
    let fake = FakeAnthropic::start(|_, body| {
        let prompt = prompt_of(body);
        let reply = if prompt == "first" && body["messages"].as_array().unwrap().len() == 1 {
            Reply::tools(
                "",
                &[("toolu_1", "write_file", r#"{"path": "f", "content": "1"}"#)],
            )
        } else {
            Reply::text(&format!("answer to {prompt}"))
        };
        Reply::Held(Box::new(reply))
    })
    .await;
    let setup = setup(fake, &[]).await;
    let api = setup.scheduler.api();
    let first = api
        .enqueue(json!({"spec": {"kind": "agent", "prompt": "first", "session": "s-1"}}))
        .await;
    let second = api
        .enqueue(json!({"spec": {"kind": "agent", "prompt": "second", "session": "s-1"}}))
        .await;
    // The runner has two free slots; the second job is claimed and put back while the first
    // holds the session (its run_at moves on).
    wait_until("the first request to arrive", WAIT, || async {
        match setup.fake.received().len() {
            0 => Err("no request".to_string()),
            _ => Ok(Some(())),
        }
    })
    .await;
    wait_until("the second job to be put back", WAIT, || {
        let db = &setup.db;
        async move {
            let (state, later): (String, bool) = sqlx::query_as(
                "SELECT state::text, run_at > created_at + interval '100 milliseconds' FROM sluice.jobs WHERE id = $1",
            )
            .bind(second)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            if state == "available" && later {
                Ok(Some(()))
            } else {
                Err(format!("{state}, postponed: {later}"))
            }
        }
    })
    .await;
    let (status, session) = api.get(&api_paths::session("s-1")).await;
    assert_eq!(status, 200, "{session}");
    assert_eq!(session["held_by"], first, "{session}");
    let (status, _) = api.delete(&api_paths::session("s-1")).await;
    assert_eq!(status, 409, "a held session is not forgotten");
    setup.fake.release();
    let first_job = api.wait_terminal(first, WAIT).await;
    let second_job = api.wait_terminal(second, WAIT).await;
    assert_eq!(first_job["state"], "succeeded", "{first_job}");
    assert_eq!(second_job["state"], "succeeded", "{second_job}");
    assert_eq!(
        setup.fake.most_in_flight(),
        1,
        "two jobs of one session ran at once"
    );
    assert_eq!(
        second_job["attempt"], 1,
        "a put-back claim is not an attempt"
    );

    // The second job's request continues the first's conversation, whole.
    let received = setup.fake.received();
    assert_eq!(received.len(), 3);
    let first_conversation = received[1].body["messages"].as_array().unwrap().clone();
    let second_messages = received[2].body["messages"].as_array().unwrap();
    assert_eq!(second_messages.len(), first_conversation.len() + 2);
    assert_eq!(
        &second_messages[..first_conversation.len()],
        &first_conversation[..]
    );
    assert_eq!(
        second_messages[first_conversation.len()],
        json!({"role": "assistant", "content": [{"type": "text", "text": "answer to first"}]})
    );
    assert_eq!(
        second_messages[first_conversation.len() + 1],
        json!({"role": "user", "content": "second"})
    );

    let (status, session) = api.get(&api_paths::session("s-1")).await;
    assert_eq!(status, 200);
    assert_eq!(session["jobs"], 2);
    assert_eq!(session["held_by"], Value::Null);
    let stored = session["messages"].as_array().unwrap();
    assert_eq!(stored.len(), second_messages.len() + 1);
    assert_eq!(
        stored.last().unwrap()["content"][0]["text"],
        "answer to second"
    );

    let (status, _) = api.delete(&api_paths::session("s-1")).await;
    assert_eq!(status, 204);
    let (status, _) = api.get(&api_paths::session("s-1")).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_session_job_adds_no_turns() {
    let fake = FakeAnthropic::start(|_, body| match prompt_of(body).as_str() {
        "ok" => Reply::text("fine"),
        _ => Reply::status(400, "invalid_request_error", None),
    })
    .await;
    let setup = setup(fake, &[]).await;
    let api = setup.scheduler.api();
    let ok = api
        .enqueue(json!({"spec": {"kind": "agent", "prompt": "ok", "session": "s-2"}}))
        .await;
    assert_eq!(api.wait_terminal(ok, WAIT).await["state"], "succeeded");
    let bad = api
        .enqueue(json!({"spec": {"kind": "agent", "prompt": "bad", "session": "s-2"}}))
        .await;
    assert_eq!(api.wait_terminal(bad, WAIT).await["state"], "failed");
    let (_, session) = api.get(&api_paths::session("s-2")).await;
    assert_eq!(session["jobs"], 1);
    assert_eq!(
        session["messages"],
        json!([{"role": "user", "content": "ok"},
               {"role": "assistant", "content": [{"type": "text", "text": "fine"}]}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_agent_specs_and_session_names_are_refused_with_the_field_named() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    for (spec, field) in [
        (json!({"kind": "agent", "prompt": ""}), "prompt"),
        (
            json!({"kind": "agent", "prompt": "x", "max_turns": 0}),
            "max_turns",
        ),
        (
            json!({"kind": "agent", "prompt": "x", "max_turns": -1}),
            "max_turns",
        ),
        (
            json!({"kind": "agent", "prompt": "x", "max_turns": 1u64 << 40}),
            "max_turns",
        ),
        (
            json!({"kind": "agent", "prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"kind": "agent", "prompt": "x", "timeout_ms": 0}),
            "timeout_ms",
        ),
        (
            json!({"kind": "agent", "prompt": "x", "token_budget": -5}),
            "token_budget",
        ),
        (
            json!({"kind": "agent", "prompt": "x", "session": "a/b"}),
            "session",
        ),
        (
            json!({"kind": "agent", "prompt": "x", "session": "s".repeat(200)}),
            "session",
        ),
        (json!({"kind": "agent", "prompt": "x\u{0}"}), "prompt"),
        (
            json!({"kind": "agent", "prompt": "x", "tools": ["rm_rf"]}),
            "rm_rf",
        ),
    ] {
        let (status, body) = api.post(api_paths::JOBS, &json!({"spec": spec})).await;
        assert_eq!(status, 400, "{spec} → {body}");
        assert!(body.to_string().contains(field), "{spec} → {body}");
    }
    for name in ["a%2Fb", &"s".repeat(129), "x%00y"] {
        let (status, body) = api.get(&format!("/api/sessions/{name}")).await;
        assert!(status == 400 || status == 404, "{name}: {status} {body}");
        assert!(body["error"]["code"].is_string(), "{body}");
    }
}

/// `examples/coding.yaml`: the agent step's files reach the bash step as artifacts, and the
/// tests it wrote pass there. The fake plays a model that writes working scripts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coding_example_hands_the_agents_files_to_a_bash_step_that_tests_them() {
    let slugify = "#!/usr/bin/env bash\nread -r line\nprintf '%s\\n' \"$line\" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//'\n";
    let tests = "#!/usr/bin/env bash\nfail=0\ncheck() {\n  got=$(printf '%s\\n' \"$1\" | bash slugify.sh)\n  if [ \"$got\" = \"$2\" ]; then echo \"ok: $1 -> $got\"; else echo \"FAIL: $1 -> $got, want $2\"; fail=1; fi\n}\ncheck 'Hello, World!' hello-world\ncheck '  Sluice  Jobs ' sluice-jobs\ncheck 'a--b' a-b\nexit $fail\n";
    let write = |path: &str, content: &str| json!({"path": path, "content": content}).to_string();
    let (w1, w2) = (
        write("slugify.sh", slugify),
        write("test_slugify.sh", tests),
    );
    let fake = FakeAnthropic::replay(vec![
        Reply::tools(
            "Writing both scripts.",
            &[
                ("toolu_1", "write_file", &w1),
                ("toolu_2", "write_file", &w2),
            ],
        ),
        Reply::tools(
            "",
            &[("toolu_3", "bash", r#"{"command": "bash test_slugify.sh"}"#)],
        ),
        Reply::text("done"),
    ])
    .await;
    let setup = setup(fake, &[]).await;
    let api = setup.scheduler.api();
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/coding.yaml"),
    )
    .unwrap();
    api.register_workflow("coding", &example).await;
    let run = api.start_run(json!({"workflow": "coding"})).await;
    let finished = api.run_finished(run, WAIT).await;
    assert_eq!(finished["state"], "succeeded", "{finished}");
    let test = sluice_testkit::run_step(&finished, "test");
    assert_eq!(
        test["output"]["value"],
        json!({"passed": true, "agent_turns": 3}),
        "{test}"
    );

    // The model saw the example's prompt and tools, and its own check ran in the sandbox.
    let received = setup.fake.received();
    assert_eq!(received.len(), 3);
    let prompt = received[0].body["messages"][0]["content"].as_str().unwrap();
    assert!(prompt.contains("slugify.sh"), "{prompt}");
    let offered: Vec<&str> = received[0].body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(offered, ["write_file", "read_file", "bash"]);
    let check: Value =
        serde_json::from_str(tool_results(&received[2])[0]["content"].as_str().unwrap()).unwrap();
    assert_eq!(check["exit_code"], 0, "{check}");
    assert!(check["stdout_tail"]
        .as_str()
        .unwrap()
        .contains("ok: Hello, World! -> hello-world"));
}

/// The session route's contract, driven by a fake runner: only the holder's live lease may
/// keep turns, NUL is refused, and kept turns reach the next holder only once the job
/// succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_turns_are_fenced_by_the_lease_and_kept_only_on_success() {
    use sluice_protocol::{paths, LeaseToken, SessionTurns};
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let runner = sluice_testkit::FakeRunner::register(&scheduler, "fake-agent").await;
    let spec = json!({"spec": {"kind": "agent", "prompt": "p1", "session": "fenced"}});
    let first = api.enqueue(spec.clone()).await;
    let task = runner.claim(1, 5000).await.remove(0);
    assert_eq!(task.job_id.0, first);
    let session = task.session.clone().expect("the holder gets its session");
    assert_eq!(session.name, "fenced");
    assert!(session.messages.is_empty());
    let turns = |lease_token: LeaseToken, text: &str| SessionTurns {
        attempt: task.attempt,
        lease_token,
        messages: vec![
            json!({"role": "user", "content": "p1"}),
            json!({"role": "assistant", "content": [{"type": "text", "text": text}]}),
        ],
    };
    let path = paths::session(task.job_id);
    let (status, body) = runner
        .send(&path, &turns(LeaseToken(uuid::Uuid::new_v4()), "forged"))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "lease_lost");
    let (status, body) = runner
        .send(&path, &turns(task.lease_token, "nul\u{0}"))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages"),
        "{body}"
    );
    let (status, body) = runner.send(&path, &turns(task.lease_token, "a1")).await;
    assert_eq!(status, 200, "{body}");
    // Not the history until the job succeeds.
    let (_, stored) = api.get(&api_paths::session("fenced")).await;
    assert_eq!(stored["messages"], json!([]));
    assert_eq!(stored["held_by"], first);
    let (status, _) = runner.complete(&task, json!({"text": "a1"})).await;
    assert_eq!(status, 200);
    let (_, stored) = api.get(&api_paths::session("fenced")).await;
    assert_eq!(stored["messages"].as_array().unwrap().len(), 2, "{stored}");
    assert_eq!(stored["held_by"], Value::Null);
    // The next job of the session starts from it.
    let second = api.enqueue(spec).await;
    let task = runner.claim(1, 5000).await.remove(0);
    assert_eq!(task.job_id.0, second);
    let session = task.session.expect("the next holder gets its session");
    assert_eq!(session.messages[1]["content"][0]["text"], "a1");
}

/// The hand-over's edges, driven by a fake runner: a cancelled holder keeps the session
/// until its runner confirms the stop; a claim whose jobs were all put back keeps waiting
/// instead of answering empty at once; an older job of the session that cannot run (its
/// queue paused) does not hold a newer one back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_holder_keeps_the_session_until_its_stop_is_confirmed() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let runner = sluice_testkit::FakeRunner::register(&scheduler, "fake-agent").await;
    let spec = |queue: &str| json!({"queue": queue, "spec": {"kind": "agent", "prompt": "p", "session": "edges"}});
    let first = api.enqueue(spec("default")).await;
    let holder = runner.claim(1, 5000).await.remove(0);
    assert_eq!(holder.job_id.0, first);
    let (status, _) = api
        .post(
            &api_paths::cancel(sluice_protocol::JobId(first)),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200);
    let second = api.enqueue(spec("default")).await;
    // The stop is not confirmed: the second job is put back, and the long-poll waits on.
    let started = std::time::Instant::now();
    let tasks = runner.claim(1, 1500).await;
    assert!(
        tasks.is_empty(),
        "handed out beside a dying holder: {tasks:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "a claim whose jobs were all put back answered at once"
    );
    // The runner hears the cancel, then confirms its tool is gone.
    let (status, body) = runner.heartbeat(&[holder.lease()], Some(1)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cancel"][0]["reason"], "cancelled", "{body}");
    let (status, _) = runner.heartbeat(&[], Some(2)).await;
    assert_eq!(status, 200);
    let task = wait_until("the second job to get the session", WAIT, || async {
        let mut tasks = runner.claim(1, 1000).await;
        match tasks.pop() {
            Some(task) => Ok(Some(task)),
            None => Err("not handed out yet".to_string()),
        }
    })
    .await;
    assert_eq!(task.job_id.0, second);
    assert!(task.session.is_some());
    runner.complete(&task, json!({"text": "ok"})).await;

    // An older job in a paused queue does not hold the session's next job back.
    let (status, _) = api.post(&api_paths::pause("frozen"), &json!({})).await;
    assert!(status == 200 || status == 201, "{status}");
    let _frozen = api.enqueue(spec("frozen")).await;
    let third = api.enqueue(spec("default")).await;
    let task = runner.claim(1, 5000).await.remove(0);
    assert_eq!(task.job_id.0, third);
    assert!(task.session.is_some());
}
