//! Live events over SSE (`GET /api/jobs/:id/events`, `GET /api/runs/:id/events`): history
//! then live then the terminal event and the end; resuming by `Last-Event-ID` or `?after=`
//! without gaps or repeats; keep-alives; a slow client dropped and resuming; a thousand
//! streams on one LISTEN connection; bad input answered, never streamed.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_protocol::{api::paths as api_paths, paths, JobId, Task};
use sluice_testkit::sse::{SseEvent, SseItem};
use sluice_testkit::{wait_until, FakeRunner, Scheduler, TestDb, Timings};

const WAIT: Duration = Duration::from_secs(10);

/// Posts events `seqs` of the task's attempt, each `{"text": "line <seq>"}` plus `pad`.
async fn post_events(
    runner: &FakeRunner,
    task: &Task,
    seqs: std::ops::RangeInclusive<i64>,
    pad: usize,
) {
    let events: Vec<Value> = seqs
        .map(|seq| {
            json!({"seq": seq, "kind": "stdout",
                   "data": {"text": format!("line {seq}\n"), "pad": "x".repeat(pad)}})
        })
        .collect();
    for chunk in events.chunks(500) {
        let (status, body) = runner
            .post(
                &paths::stream(task.job_id),
                &json!({"attempt": task.attempt, "lease_token": task.lease_token, "events": chunk}),
            )
            .await;
        assert_eq!(status, 200, "stream answered {status}: {body}");
        assert_eq!(body["stored"], chunk.len(), "{body}");
    }
}

fn line_of(event: &SseEvent) -> i64 {
    event.data["seq"].as_i64().expect("seq")
}

/// Stored positions of a job's events, in order.
async fn positions(db: &TestDb, job: JobId) -> Vec<i64> {
    sqlx::query_scalar("SELECT position FROM sluice.job_events WHERE job_id = $1 ORDER BY position")
        .bind(job.0)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

async fn one_task(scheduler: &Scheduler, pod: &str) -> (FakeRunner, Task) {
    let api = scheduler.api();
    api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    let runner = FakeRunner::register(scheduler, pod).await;
    let task = runner.claim(1, 5000).await.pop().expect("a task");
    (runner, task)
}

#[tokio::test]
async fn a_job_stream_is_history_then_live_then_its_terminal_event_and_the_end() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let (runner, task) = one_task(&scheduler, "sse-1").await;
    post_events(&runner, &task, 1..=3, 0).await;

    let mut stream = api
        .events(&api_paths::job_events(task.job_id), None)
        .await
        .expect("a stream");
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(stream.next_event(WAIT).await.expect("history"));
    }
    post_events(&runner, &task, 4..=5, 0).await;
    for _ in 0..2 {
        seen.push(stream.next_event(WAIT).await.expect("live"));
    }
    assert_eq!(
        seen.iter().map(line_of).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    let ids: Vec<i64> = seen.iter().map(|e| e.id.expect("an id")).collect();
    assert_eq!(
        ids,
        positions(&db, task.job_id).await,
        "id: is the global position"
    );
    assert!(seen.iter().all(|e| e.kind == "stdout"));
    assert_eq!(seen[3].data["data"]["text"], "line 4\n");
    assert_eq!(seen[3].data["job_id"], task.job_id.0);
    assert_eq!(seen[3].data["attempt"], 1);

    let (status, body) = runner.complete(&task, json!({"answer": 42})).await;
    assert_eq!(status, 200, "{body}");
    let end = stream.next_event(WAIT).await.expect("the terminal event");
    assert_eq!(end.kind, "succeeded");
    assert_eq!(
        end.id, None,
        "the terminal event keeps the client's last id"
    );
    assert_eq!(end.data["state"], "succeeded");
    assert_eq!(end.data["result"]["answer"], 42);
    assert_eq!(
        stream.next(WAIT).await,
        SseItem::End,
        "the stream ends after it"
    );

    // A stream of an ended job is its history, the terminal event and the end, at once.
    let mut again = api
        .events(&api_paths::job_events(task.job_id), None)
        .await
        .expect("a stream");
    let all = again.until_end(WAIT).await;
    assert_eq!(all.len(), 6);
    assert_eq!(all[5].kind, "succeeded");
}

#[tokio::test]
async fn resuming_by_last_event_id_or_after_skips_nothing_and_repeats_nothing() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let (runner, task) = one_task(&scheduler, "sse-2").await;
    let path = api_paths::job_events(task.job_id);
    post_events(&runner, &task, 1..=4, 0).await;

    // Read two, drop the connection, miss events while away, resume from the last id.
    let mut first = api.events(&path, None).await.expect("a stream");
    let a = first.next_event(WAIT).await.unwrap();
    let b = first.next_event(WAIT).await.unwrap();
    drop(first);
    post_events(&runner, &task, 5..=7, 0).await;
    let last = b.id.unwrap().to_string();
    let mut resumed = api.events(&path, Some(&last)).await.expect("a stream");
    let mut lines = vec![line_of(&a), line_of(&b)];
    for _ in 0..5 {
        lines.push(line_of(&resumed.next_event(WAIT).await.unwrap()));
    }
    assert_eq!(lines, [1, 2, 3, 4, 5, 6, 7]);
    runner.complete(&task, json!({})).await;
    let rest = resumed.until_end(WAIT).await;
    assert_eq!(
        rest.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["succeeded"]
    );

    // `?after=` does the same; the header wins over it.
    let ids = positions(&db, task.job_id).await;
    let mut after = api
        .events(&format!("{path}?after={}", ids[4]), None)
        .await
        .expect("a stream");
    let events = after.until_end(WAIT).await;
    assert_eq!(
        events.iter().filter_map(|e| e.id).collect::<Vec<_>>(),
        ids[5..]
    );
    let mut both = api
        .events(&format!("{path}?after=0"), Some(&ids[5].to_string()))
        .await
        .expect("a stream");
    let events = both.until_end(WAIT).await;
    assert_eq!(
        events.iter().filter_map(|e| e.id).collect::<Vec<_>>(),
        ids[6..]
    );
    // From the last id: only the terminal event.
    let mut tail = api
        .events(&path, Some(&ids[6].to_string()))
        .await
        .expect("a stream");
    let events = tail.until_end(WAIT).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, "succeeded");
}

#[tokio::test]
async fn an_idle_stream_gets_keep_alives_and_a_cancel_ends_it() {
    let db = TestDb::new().await;
    let scheduler =
        Scheduler::start_with(&db, Timings::TEST, &[("SLUICE_SSE_KEEPALIVE_MS", "200")]).await;
    let api = scheduler.api();
    let (_runner, task) = one_task(&scheduler, "sse-3").await;
    let mut stream = api
        .events(&api_paths::job_events(task.job_id), None)
        .await
        .expect("a stream");
    assert_eq!(
        stream.next(WAIT).await,
        SseItem::Comment("keep-alive".into())
    );
    assert_eq!(
        stream.next(WAIT).await,
        SseItem::Comment("keep-alive".into())
    );
    let (status, body) = api.post(&api_paths::cancel(task.job_id), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let end = stream.next_event(WAIT).await.expect("the terminal event");
    assert_eq!(end.kind, "cancelled");
    assert_eq!(stream.next_event(WAIT).await, None);
}

#[tokio::test]
async fn bad_requests_are_answered_not_streamed() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let (_runner, task) = one_task(&scheduler, "sse-4").await;
    let path = api_paths::job_events(task.job_id);
    for bad in ["-1", "abc", "99999999999999999999", "1 2"] {
        let (status, body) = api.events(&path, Some(bad)).await.err().expect("refused");
        assert_eq!(status, 400, "Last-Event-ID {bad:?}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Last-Event-ID"));
    }
    for bad in ["-5", "x", "%00"] {
        let (status, body) = api
            .events(&format!("{path}?after={bad}"), None)
            .await
            .err()
            .expect("refused");
        assert_eq!(status, 400, "after={bad}: {body}");
    }
    for missing in [
        api_paths::job_events(JobId(i64::MAX)),
        "/api/jobs/not-a-number/events".to_string(),
        api_paths::run_events(987_654),
    ] {
        let (status, body) = api.events(&missing, None).await.err().expect("refused");
        assert_eq!(status, 404, "{missing}: {body}");
    }
    // Without the token, or with a wrong one: 401 before anything is read.
    let url = format!("{}{path}", scheduler.api_url);
    let anonymous = reqwest::Client::new().get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let wrong = reqwest::Client::new()
        .get(&url)
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
}

#[tokio::test]
async fn streams_past_the_cap_are_answered_503_until_one_closes() {
    let db = TestDb::new().await;
    // A client that goes away is found out by the next keep-alive.
    let scheduler = Scheduler::start_with(
        &db,
        Timings::TEST,
        &[
            ("SLUICE_SSE_MAX_STREAMS", "2"),
            ("SLUICE_SSE_KEEPALIVE_MS", "200"),
        ],
    )
    .await;
    let api = scheduler.api();
    let (_runner, task) = one_task(&scheduler, "sse-cap").await;
    let path = api_paths::job_events(task.job_id);
    let first = api.events(&path, None).await.expect("a stream");
    let _second = api.events(&path, None).await.expect("a stream");
    let (status, body) = api.events(&path, None).await.err().expect("refused");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("event streams"),
        "{body}"
    );
    drop(first);
    wait_until("a stream to close", WAIT, || async {
        Ok::<_, String>(api.events(&path, None).await.ok())
    })
    .await;
}

#[tokio::test]
async fn a_slow_client_is_dropped_and_resumes_by_position_without_loss() {
    let db = TestDb::new().await;
    // A tiny ring: a client that does not read falls out of it quickly.
    let scheduler = Scheduler::start_with(
        &db,
        Timings::TEST,
        &[
            ("SLUICE_SSE_TOPIC_BUFFER", "8"),
            ("SLUICE_SSE_CLIENT_BUFFER", "4"),
        ],
    )
    .await;
    let api = scheduler.api();
    let (runner, task) = one_task(&scheduler, "sse-5").await;
    let path = api_paths::job_events(task.job_id);
    let mut slow = api.events(&path, None).await.expect("a stream");
    // Wait until the stream is live (a keep-alive or nothing yet: read one event first).
    post_events(&runner, &task, 1..=1, 0).await;
    let first = slow.next_event(WAIT).await.expect("the first event");
    // 3,000 events of 8 KiB: far more than the socket buffers and the ring hold.
    post_events(&runner, &task, 2..=3000, 8 << 10).await;
    runner.complete(&task, json!({})).await;

    let mut lines = vec![line_of(&first)];
    let mut last = first.id.unwrap();
    let mut ended_early = false;
    loop {
        match slow.next_event(WAIT).await {
            Some(event) if event.id.is_some() => {
                last = event.id.unwrap();
                lines.push(line_of(&event));
            }
            Some(event) => {
                assert_eq!(event.kind, "succeeded");
                break;
            }
            None => {
                // Dropped: resume from the last id.
                ended_early = true;
                slow = api
                    .events(&path, Some(&last.to_string()))
                    .await
                    .expect("a stream");
            }
        }
    }
    assert!(
        ended_early,
        "a client 3,000 events behind an 8-event ring was not dropped"
    );
    assert_eq!(lines, (1..=3000).collect::<Vec<_>>(), "no gap, no repeat");
}

#[tokio::test]
async fn a_run_stream_merges_its_steps_events_tagged_with_the_step() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    api.register_workflow(
        "two",
        "steps:\n  - {id: first, kind: noop}\n  - {id: second, depends_on: [first], kind: noop}\n",
    )
    .await;
    let run = api.start_run(json!({"workflow": "two"})).await;
    let runner = FakeRunner::register(&scheduler, "sse-6").await;
    let mut stream = api
        .events(&api_paths::run_events(run), None)
        .await
        .expect("a stream");
    for _ in 0..2 {
        let task = runner.claim(1, 5000).await.pop().expect("a step's task");
        post_events(&runner, &task, 1..=2, 0).await;
        let (status, body) = runner.complete(&task, json!({})).await;
        assert_eq!(status, 200, "{body}");
    }
    let events = stream.until_end(WAIT).await;
    let steps: Vec<(&str, i64)> = events
        .iter()
        .filter(|e| e.id.is_some())
        .map(|e| (e.data["step"].as_str().unwrap(), line_of(e)))
        .collect();
    assert_eq!(
        steps,
        [("first", 1), ("first", 2), ("second", 1), ("second", 2)]
    );
    let ids: Vec<i64> = events.iter().filter_map(|e| e.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "positions rise: {ids:?}"
    );
    let end = events.last().unwrap();
    assert_eq!((end.kind.as_str(), end.id), ("succeeded", None));
    assert_eq!(end.data["state"], "succeeded");
}

/// RELIABILITY.md: long-lived readers must not each hold a database connection.
#[tokio::test]
async fn a_thousand_streams_share_the_schedulers_connections() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let (runner, task) = one_task(&scheduler, "sse-7").await;
    // Half follow the job being run, half follow jobs of their own that stay queued.
    let mut others = Vec::new();
    for _ in 0..50 {
        others.push(JobId(
            api.enqueue(json!({"queue": "idle", "spec": {"kind": "noop"}}))
                .await,
        ));
    }
    let (status, _) = api.post(&api_paths::pause("idle"), &json!({})).await;
    assert_eq!(status, 200);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let api = sluice_testkit::Api { http, ..api };
    let mut streams = Vec::new();
    for i in 0..1000 {
        let job = if i % 2 == 0 {
            task.job_id
        } else {
            others[i % 50]
        };
        streams.push(
            api.events(&api_paths::job_events(job), None)
                .await
                .expect("a stream"),
        );
    }
    let max_connections = 16; // the scheduler's default pool size
    let connections = wait_until("the scheduler's connections", WAIT, || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&db.pool)
        .await
        .map_err(|e| e.to_string())?;
        Ok::<_, String>(Some(n))
    })
    .await;
    // Its pool (16) and its one LISTEN connection, with room for the test's own pool.
    assert!(
        connections <= max_connections + 1 + 10,
        "{connections} connections for 1,000 streams"
    );
    post_events(&runner, &task, 1..=1, 0).await;
    for (i, stream) in streams.iter_mut().enumerate().filter(|(i, _)| i % 2 == 0) {
        let event = stream
            .next_event(WAIT)
            .await
            .unwrap_or_else(|| panic!("stream {i} ended"));
        assert_eq!(line_of(&event), 1);
    }
    runner.complete(&task, json!({})).await;
    for stream in streams.iter_mut().step_by(2) {
        assert_eq!(stream.next_event(WAIT).await.unwrap().kind, "succeeded");
        assert_eq!(stream.next_event(WAIT).await, None);
    }
}

/// A stream on one replica follows a job another replica runs: its events (through NOTIFY)
/// and its end (looked up, since ends do not notify).
#[tokio::test]
async fn a_stream_on_one_replica_sees_events_and_the_end_applied_by_another() {
    let db = TestDb::new().await;
    let a = Scheduler::start(&db, Timings::TEST).await;
    let b = Scheduler::start(&db, Timings::TEST).await;
    let (runner, task) = one_task(&b, "sse-replicas").await;
    let mut stream = a
        .api()
        .events(&api_paths::job_events(task.job_id), None)
        .await
        .expect("a stream on replica A");
    post_events(&runner, &task, 1..=2, 0).await;
    for seq in 1..=2 {
        assert_eq!(line_of(&stream.next_event(WAIT).await.unwrap()), seq);
    }
    let (status, body) = runner.complete(&task, json!({})).await;
    assert_eq!(status, 200, "{body}");
    let end = stream.next_event(WAIT).await.expect("the terminal event");
    assert_eq!(end.kind, "succeeded");
    assert_eq!(stream.next_event(WAIT).await, None);
}

/// A job the scheduler fails on its own (its lease ran out, no attempts left) ends its
/// stream too.
#[tokio::test]
async fn a_reclaimed_job_ends_its_stream() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    api.enqueue(json!({"max_attempts": 1, "spec": {"kind": "noop"}}))
        .await;
    let runner = FakeRunner::register(&scheduler, "sse-lost").await;
    let task = runner.claim(1, 5000).await.pop().expect("a task");
    let mut stream = api
        .events(&api_paths::job_events(task.job_id), None)
        .await
        .expect("a stream");
    // No heartbeat: the lease runs out and the job fails.
    let end = stream.next_event(WAIT).await.expect("the terminal event");
    assert_eq!(end.kind, "failed");
    assert_eq!(end.data["state"], "failed");
    assert_eq!(stream.next_event(WAIT).await, None);
}
