//! S-06: secrets never in logs. Canary values — the API token, the registration secret, a
//! runner's token, `ANTHROPIC_API_KEY` and a secret in a job's environment — go through the
//! happy and the failing paths with debug logging on; then every log (scheduler, runner,
//! Postgres), every error body, every streamed event and the metrics are searched for them.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_protocol::api::paths as api_paths;
use sluice_protocol::{paths, JobId};
use sluice_testkit::anthropic::{FakeAnthropic, Reply};
use sluice_testkit::{postgres_log, FakeRunner, Runner, Scheduler, TestDb, Timings};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaries_appear_in_no_log_error_event_or_metric() {
    let (_, pg_log_start) = postgres_log(u64::MAX);
    let db = TestDb::new().await;
    let anthropic_key = format!("CANARY-anthropic-{}", uuid::Uuid::new_v4().simple());
    let env_secret = format!("CANARY-env-{}", uuid::Uuid::new_v4().simple());
    let fake = FakeAnthropic::start(|n, _| {
        if n == 0 {
            Reply::text("All done.")
        } else {
            Reply::status(401, "authentication_error", None)
        }
    })
    .await;
    let scheduler = Scheduler::start_with(&db, Timings::TEST, &[("RUST_LOG", "debug")]).await;
    let runner = Runner::start(
        &scheduler,
        "s06",
        2,
        &[
            ("RUST_LOG", "debug"),
            ("ANTHROPIC_API_KEY", anthropic_key.as_str()),
            ("ANTHROPIC_BASE_URL", fake.url.as_str()),
            ("SLUICE_AGENT_RETRY_BASE_MS", "10"),
        ],
    )
    .await;
    let api = scheduler.api();
    let mut error_bodies: Vec<Value> = Vec::new();

    // The happy and the failing paths of each kind of job.
    let jobs = [
        json!({"spec": {"kind": "bash", "script": "echo hello"}}),
        json!({"max_attempts": 1, "spec": {"kind": "bash", "env": {"SECRET_VALUE": env_secret},
               "script": "test -n \"$SECRET_VALUE\" && echo used it && exit 4"}}),
        json!({"spec": {"kind": "agent", "prompt": "Say you are done."}}),
        json!({"max_attempts": 1, "spec": {"kind": "agent", "prompt": "And again."}}),
    ];
    let mut ids = Vec::new();
    for job in jobs {
        let id = api.enqueue(job).await;
        api.wait_terminal(id, WAIT).await;
        ids.push(id);
    }
    let states: Vec<String> = {
        let mut states = Vec::new();
        for id in &ids {
            let (_, job) = api.get(&api_paths::job(JobId(*id))).await;
            states.push(job["state"].as_str().unwrap().to_string());
        }
        states
    };
    assert_eq!(states, ["succeeded", "failed", "succeeded", "failed"]);

    // Their streams, as a client reads them.
    let mut streamed = String::new();
    for id in &ids {
        let mut stream = api
            .events(&api_paths::job_events(JobId(*id)), None)
            .await
            .expect("a stream");
        for event in stream.until_end(WAIT).await {
            streamed.push_str(&format!("{} {}\n", event.kind, event.data));
        }
    }
    assert!(
        streamed.contains("used it"),
        "the env secret reached the tool: {streamed}"
    );

    // Refusals: wrong tokens, bad bodies, a task the runner does not hold.
    let http = reqwest::Client::new();
    let wrong_api = http
        .post(format!("{}{}", scheduler.api_url, api_paths::JOBS))
        .bearer_auth(format!("{}x", scheduler.api_token))
        .json(&json!({"spec": {"kind": "noop"}}))
        .send()
        .await
        .unwrap();
    error_bodies.push(wrong_api.json().await.unwrap());
    for body in [
        json!({"spec": {"kind": "nope", "token": scheduler.api_token}}),
        json!({"spec": {"kind": "bash", "script": 7}}),
    ] {
        let (status, body) = api.post(api_paths::JOBS, &body).await;
        assert!(status >= 400, "{status}");
        error_bodies.push(body);
    }
    let fake_runner = FakeRunner::register(&scheduler, "s06-fake").await;
    let wrong_secret = http
        .post(format!("{}{}", scheduler.internal_url, paths::REGISTER))
        .bearer_auth(format!("{}x", scheduler.runner_secret))
        .json(&json!({"pod_name": "x", "slots": 1, "version": "t"}))
        .send()
        .await
        .unwrap();
    error_bodies.push(wrong_secret.json().await.unwrap());
    let (status, body) = fake_runner
        .post(
            &paths::stream(JobId(ids[0])),
            &json!({"attempt": 1, "lease_token": uuid::Uuid::new_v4(), "events": []}),
        )
        .await;
    assert!(status >= 400, "{status}");
    error_bodies.push(body);
    let wrong_runner = http
        .post(format!(
            "{}{}",
            scheduler.internal_url,
            paths::heartbeat("s06-fake")
        ))
        .bearer_auth(format!("{}x", fake_runner.token))
        .json(&json!({"running": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_runner.status(), 401);
    error_bodies.push(wrong_runner.json().await.unwrap());
    let (status, headers, metrics) = api.get_raw(api_paths::METRICS).await;
    assert_eq!(status, 200, "{headers:?}");
    let metrics = String::from_utf8(metrics).unwrap();

    let (pg_log, _) = postgres_log(pg_log_start);
    let artifacts = [
        ("the scheduler's log", scheduler.log_text()),
        ("the runner's log", runner.log_text()),
        ("the Postgres log", pg_log),
        ("error bodies", format!("{error_bodies:?}")),
        ("streamed events", streamed),
        ("metrics", metrics),
    ];
    let canaries = [
        ("the API token", scheduler.api_token.clone()),
        ("the registration secret", scheduler.runner_secret.clone()),
        ("a runner token", fake_runner.token.clone()),
        ("ANTHROPIC_API_KEY", anthropic_key.clone()),
        ("a job's env secret", env_secret.clone()),
    ];
    // Debug logging was on: the logs are not empty, so their silence means something.
    assert!(
        artifacts[0].1.contains("DEBUG"),
        "the scheduler logged at debug"
    );
    assert!(
        artifacts[1].1.contains("DEBUG"),
        "the runner logged at debug"
    );
    let mut hits = Vec::new();
    for (what, text) in &artifacts {
        for (name, canary) in &canaries {
            if text.contains(canary.as_str()) {
                hits.push(format!("{name} in {what}"));
            }
        }
    }
    assert!(hits.is_empty(), "secrets leaked: {hits:?}");
}
