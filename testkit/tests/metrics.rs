//! `GET /metrics`: Prometheus text (OpenMetrics) with what an operator graphs and alerts on —
//! jobs by queue and state, enqueues and claims, pickup and claim latency, attempt durations
//! by outcome, reclaims by reason, runners by state, heartbeat gaps, HTTP requests by route
//! and status, the database pool, the oldest transaction, open event streams — behind the
//! API token, with low-cardinality labels only.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use sluice_protocol::api::paths as api_paths;
use sluice_testkit::{poll_until, FakeRunner, Scheduler, TestDb, Timings};

const WAIT: Duration = Duration::from_secs(15);

/// Samples by `name{labels}` as exposed (labels in the exposition's order).
struct Scrape {
    text: String,
    samples: HashMap<String, f64>,
}

impl Scrape {
    fn value(&self, key: &str) -> f64 {
        *self
            .samples
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key} in\n{}", self.text))
    }
}

async fn scrape(scheduler: &Scheduler) -> Scrape {
    let api = scheduler.api();
    let (status, headers, body) = api.get_raw(api_paths::METRICS).await;
    assert_eq!(status, 200);
    let content_type = headers["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = String::from_utf8(body).expect("UTF-8");
    assert!(
        text.ends_with("# EOF\n"),
        "an OpenMetrics exposition ends with # EOF"
    );
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|line| {
            let (key, value) = line.rsplit_once(' ').expect("name value");
            (key.to_string(), value.parse::<f64>().expect("a number"))
        })
        .collect();
    Scrape { text, samples }
}

#[tokio::test]
async fn a_job_shows_in_every_family_it_passes_through_and_no_label_names_it() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let job = api
        .enqueue(json!({"queue": "mq", "spec": {"kind": "noop"}}))
        .await;
    let runner = FakeRunner::register(&scheduler, "metrics-1").await;
    let task = runner.claim(1, 5000).await.pop().expect("a task");
    let lease = sluice_protocol::LeaseRef {
        job_id: task.job_id,
        attempt: task.attempt,
        lease_token: task.lease_token,
    };
    for _ in 0..2 {
        let (status, body) = runner.heartbeat(std::slice::from_ref(&lease), None).await;
        assert_eq!(status, 200, "{body}");
    }
    let mut stream = api
        .events(&api_paths::job_events(task.job_id), None)
        .await
        .expect("a stream");
    let open = poll_until(WAIT, || async {
        let s = scrape(&scheduler).await;
        Ok::<_, String>((s.value("sluice_event_streams") == 1.0).then_some(s))
    })
    .await
    .expect("the open stream is counted");
    assert_eq!(
        open.value(r#"sluice_runners{state="idle"}"#)
            + open.value(r#"sluice_runners{state="busy"}"#),
        1.0
    );
    let (status, body) = runner.complete(&task, json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert!(stream
        .until_end(WAIT)
        .await
        .last()
        .is_some_and(|e| e.kind == "succeeded"));
    drop(stream);

    let s = poll_until(WAIT, || async {
        let s = scrape(&scheduler).await;
        Ok::<_, String>((s.value("sluice_event_streams") == 0.0).then_some(s))
    })
    .await
    .expect("the closed stream is let go");
    assert_eq!(s.value(r#"sluice_jobs_enqueued_total{queue="mq"}"#), 1.0);
    assert_eq!(s.value(r#"sluice_jobs_claimed_total{queue="mq"}"#), 1.0);
    assert_eq!(s.value("sluice_job_pickup_seconds_count"), 1.0);
    assert!(s.value("sluice_claim_statement_seconds_count") >= 1.0);
    assert_eq!(
        s.value(r#"sluice_attempt_duration_seconds_count{outcome="succeeded"}"#),
        1.0
    );
    assert_eq!(s.value(r#"sluice_jobs{queue="mq",state="succeeded"}"#), 1.0);
    assert!(s.value("sluice_runner_heartbeat_gap_seconds_count") >= 1.0);
    assert_eq!(
        s.value(r#"sluice_http_requests_total{listener="public",method="POST",route="/api/jobs",status="201"}"#),
        1.0
    );
    assert_eq!(
        s.value(r#"sluice_http_requests_total{listener="internal",method="POST",route="/internal/tasks/{id}/complete",status="200"}"#),
        1.0
    );
    assert!(s.value("sluice_db_pool_connections") >= 1.0);
    assert!(s.value("sluice_db_oldest_transaction_seconds") >= 0.0);
    assert_eq!(s.value("sluice_scrape_errors"), 0.0);
    // Low cardinality: no label carries a job id or a raw path.
    let job_path = api_paths::job(sluice_protocol::JobId(job));
    assert!(
        !s.text.contains(&job_path),
        "a raw path in a label:\n{}",
        s.text
    );
    assert!(!s.text.contains(&runner.runner_id.to_string()));
    assert!(!s.text.contains(&runner.token));
    assert!(!s.text.contains(&scheduler.api_token));
}

#[tokio::test]
async fn reclaims_are_counted_by_reason_and_metrics_need_the_token() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    api.enqueue(json!({"spec": {"kind": "noop"}, "max_attempts": 1}))
        .await;
    api.enqueue(json!({"spec": {"kind": "noop"}, "max_attempts": 2}))
        .await;
    let runner = FakeRunner::register(&scheduler, "metrics-2").await;
    let mut tasks = Vec::new();
    while tasks.len() < 2 {
        tasks.extend(runner.claim(2, 5000).await);
    }
    // Never heartbeated: both leases lapse; one job has an attempt left, one has none.
    let s = poll_until(WAIT, || async {
        let s = scrape(&scheduler).await;
        let key = r#"sluice_lease_reclaims_total{reason="lease_expired",result="requeued"}"#;
        Ok::<_, String>(s.samples.contains_key(key).then_some(s))
    })
    .await
    .expect("a reclaim is counted");
    assert_eq!(
        s.value(r#"sluice_lease_reclaims_total{reason="lease_expired",result="requeued"}"#),
        1.0
    );
    assert_eq!(
        s.value(r#"sluice_lease_reclaims_total{reason="lease_expired",result="failed"}"#),
        1.0
    );

    let url = format!("{}{}", scheduler.api_url, api_paths::METRICS);
    let anonymous = reqwest::Client::new().get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let body: serde_json::Value = anonymous.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
}

/// The sidecar's own metrics on its optional listener.
#[tokio::test]
async fn the_sidecar_serves_its_own_metrics_when_asked() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let runner = sluice_testkit::Runner::start(
        &scheduler,
        "metrics-sidecar",
        2,
        &[("SLUICE_RUNNER_METRICS_LISTEN", "127.0.0.1:0")],
    )
    .await;
    let addr = poll_until(WAIT, || async {
        let log = runner.log_text();
        let found = log.lines().find_map(|line| {
            let plain = strip_ansi(line);
            let rest = plain.split("metrics listening").nth(1)?;
            let addr = rest.split("addr=").nth(1)?.split_whitespace().next()?;
            Some(addr.to_string())
        });
        Ok::<_, String>(found)
    })
    .await
    .expect("the runner logs its metrics address");
    let api = scheduler.api();
    let job = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "true"}}))
        .await;
    api.wait_terminal(job, WAIT).await;
    let http = reqwest::Client::new();
    let text = poll_until(WAIT, || async {
        let text = http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(
            text.contains("sluice_runner_attempts_total{outcome=\"completed\"} 1\n")
                .then_some(text),
        )
    })
    .await
    .expect("the completed attempt is counted");
    assert!(
        text.contains("sluice_runner_spawn_seconds_count 1\n"),
        "{text}"
    );
    assert!(text.contains("sluice_runner_outbox_depth 0\n"), "{text}");
    assert!(
        text.contains("sluice_runner_attempts_running 0\n"),
        "{text}"
    );
    let other = http.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(other.status(), 404);
}

/// A log line without its colour codes (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Streams asked for jobs that do not exist make no topic; a stream that closes lets its
/// topic go (both visible as `sluice_event_topics`).
#[tokio::test]
async fn unknown_jobs_make_no_topics_and_closed_streams_let_theirs_go() {
    let db = TestDb::new().await;
    let scheduler =
        Scheduler::start_with(&db, Timings::TEST, &[("SLUICE_SSE_KEEPALIVE_MS", "200")]).await;
    let api = scheduler.api();
    for id in 1_000_000..1_000_050 {
        let path = api_paths::job_events(sluice_protocol::JobId(id));
        let (status, _) = api.events(&path, None).await.err().expect("refused");
        assert_eq!(status, 404);
    }
    assert_eq!(scrape(&scheduler).await.value("sluice_event_topics"), 0.0);
    let job = api
        .enqueue(json!({"spec": {"kind": "noop"}, "delay_ms": 3_600_000}))
        .await;
    let stream = api
        .events(&api_paths::job_events(sluice_protocol::JobId(job)), None)
        .await
        .expect("a stream");
    assert_eq!(scrape(&scheduler).await.value("sluice_event_topics"), 1.0);
    drop(stream);
    poll_until(WAIT, || async {
        let s = scrape(&scheduler).await;
        Ok::<_, String>((s.value("sluice_event_topics") == 0.0).then_some(()))
    })
    .await
    .expect("the closed stream's topic is let go");
}
