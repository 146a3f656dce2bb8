//! What a tool's output and resource use can do to a runner: bytes Postgres cannot store
//! (B-18), a script too long for argv (B-20), a memory hog (B-10) and two CPU spinners on a
//! two-core machine (B-11).

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use sluice_testkit::{procs, Runner, Scheduler, TestDb, Timings};

/// The bytes of a job's stream events of `kind`, as a consumer reassembles them: `base64`
/// where an event has it, `text` elsewhere.
async fn stream_bytes(db: &TestDb, id: i64, kind: &str) -> Vec<u8> {
    let events: Vec<(Value,)> = sqlx::query_as(
        "SELECT data FROM sluice.job_events WHERE job_id = $1 AND kind = $2 ORDER BY seq",
    )
    .bind(id)
    .bind(kind)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut bytes = Vec::new();
    for (data,) in events {
        match data.get("base64").and_then(Value::as_str) {
            Some(b64) => bytes.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .expect("base64"),
            ),
            None => bytes.extend(data["text"].as_str().expect("text").as_bytes()),
        }
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b18_bytes_postgres_cannot_store_reach_the_job_exactly_and_never_hang_it() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let _runner = Runner::start(
        &scheduler,
        "binary",
        4,
        &[("SLUICE_RUNNER_MAX_OUTPUT_BYTES", "4096")],
    )
    .await;
    // NUL, invalid UTF-8, text split around them, -print0, stderr too.
    let exact = api
        .enqueue(json!({"spec": {"kind": "bash",
            "script": r"printf 'a\0b\n\xff\xfeé'; printf 'x\0y' >&2; mkdir d; touch d/1 d/2; find d -print0 | sort -z"}}))
        .await;
    // A NUL right at the output cap.
    let at_cap = api
        .enqueue(json!({"spec": {"kind": "bash",
            "script": r"head -c 4095 /dev/zero | tr '\0' a; printf '\0'; head -c 100000 /dev/urandom"}}))
        .await;
    // Eight binary floods, then an ordinary job: every one ends, the last one promptly.
    let mut floods = Vec::new();
    for _ in 0..8 {
        floods.push(
            api.enqueue(json!({"spec": {"kind": "bash", "script": "head -c 300000 /dev/urandom"}}))
                .await,
        );
    }
    let enqueued = Instant::now();
    let ordinary = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "echo ordinary"}}))
        .await;

    let job = api.wait_terminal(exact, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["binary"], true, "{job}");
    assert!(
        job["result"]["stdout_tail"]
            .as_str()
            .unwrap()
            .contains('\u{FFFD}'),
        "{job}"
    );
    let mut expected = b"a\0b\n\xff\xfe\xc3\xa9".to_vec();
    expected.extend(b"d\0d/1\0d/2\0");
    assert_eq!(stream_bytes(&db, exact, "stdout").await, expected);
    assert_eq!(stream_bytes(&db, exact, "stderr").await, b"x\0y".to_vec());

    let job = api.wait_terminal(at_cap, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["truncated"], true, "{job}");
    let kept = stream_bytes(&db, at_cap, "stdout").await;
    assert_eq!(kept.len(), 4096);
    assert_eq!(kept[4095], 0, "the NUL at the cap is kept exactly");

    for id in floods {
        let job = api.wait_terminal(id, Duration::from_secs(30)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    let job = api.wait_terminal(ordinary, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(enqueued.elapsed() < Duration::from_secs(30));
    let running = db
        .count("SELECT count(*) FROM sluice.jobs WHERE state <> 'succeeded'")
        .await;
    assert_eq!(running, 0, "no job is left running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b20_a_script_past_the_argv_limit_runs() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let _runner = Runner::start(&scheduler, "long-script", 1, &[]).await;
    // 300 KB: more than twice MAX_ARG_STRLEN (128 KiB), which a `bash -c` argument cannot
    // exceed.
    let filler = format!(": '{}'\n", "x".repeat(300 * 1024));
    let script = format!("{filler}echo \"ran $(( 6 * 7 ))\"");
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": script}}))
        .await;
    let job = api.wait_terminal(id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["result"]["stdout_tail"], "ran 42\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b10_a_memory_hog_is_stopped_with_a_clear_code_and_the_runner_lives_on() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let runner = Runner::start(&scheduler, "hogged", 2, &[]).await;
    // Allocates 16 MiB at a time until it cannot; the spec lowers the runner's 4 GiB default.
    let hog = api
        .enqueue(json!({"spec": {"kind": "bash",
            "script": r#"perl -e '@a = (); while (1) { push @a, "x" x (16 << 20) }'"#,
            "limits": {"memory_bytes": 256 << 20}}, "max_attempts": 1}))
        .await;
    // A single huge allocation is refused outright.
    let huge = api
        .enqueue(json!({"spec": {"kind": "bash",
            "script": r#"perl -e '$x = "x" x (10 << 30); print length $x'"#},
            "max_attempts": 1}))
        .await;
    let job = api.wait_terminal(hog, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "memory_limit", "{job}");
    assert!(
        job["result"]["max_rss_bytes"].as_u64().unwrap() <= 300 << 20,
        "{job}"
    );
    let job = api.wait_terminal(huge, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "failed", "{job}");
    // The sidecar was never in danger, and goes on running work.
    let fine = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "echo fine"}}))
        .await;
    let job = api.wait_terminal(fine, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let peak_kib = procs::peak_rss_kib(runner.pid().unwrap()).unwrap();
    assert!(peak_kib < 64 * 1024, "sidecar peak RSS {peak_kib} KiB");
}

/// B-11: two CPU spinners on a two-core machine; tools run at nice 19, so the sidecar's
/// heartbeats keep their interval (last_seen_at moves at least every HB + 0.5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b11_two_cpu_spinners_do_not_delay_heartbeats() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let _runner = Runner::start(&scheduler, "spun", 2, &[]).await;
    let spin = json!({"spec": {"kind": "bash", "script": "while :; do :; done",
                               "timeout_ms": 8000}, "max_attempts": 1});
    let a = api.enqueue(spin.clone()).await;
    let b = api.enqueue(spin).await;
    sluice_testkit::wait_until("both spinners to run", Duration::from_secs(10), || {
        let pool = db.pool.clone();
        async move {
            let (n,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM sluice.jobs WHERE state = 'running'")
                    .fetch_one(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
            Ok((n == 2).then_some(()))
        }
    })
    .await;
    // Sample the runner's last heartbeat (database time) for five seconds of spinning.
    let mut seen: Vec<chrono::DateTime<chrono::Utc>> = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let (at,): (chrono::DateTime<chrono::Utc>,) = sqlx::query_as(
            "SELECT last_seen_at FROM sluice.runners WHERE pod_name = 'spun' AND state <> 'gone'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if seen.last() != Some(&at) {
            seen.push(at);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gaps: Vec<i64> = seen
        .windows(2)
        .map(|w| (w[1] - w[0]).num_milliseconds())
        .collect();
    let worst = gaps.iter().copied().max().unwrap_or(i64::MAX);
    assert!(
        seen.len() >= 4 && worst <= Timings::TEST.heartbeat_ms as i64 + 500,
        "heartbeat gaps under two spinners: {gaps:?}"
    );
    for id in [a, b] {
        let job = api.wait_terminal(id, Duration::from_secs(30)).await;
        assert_eq!(job["error"]["code"], "timed_out", "{job}");
        assert_eq!(job["attempt"], 1, "the spinners cost no lease: {job}");
    }
}
