//! F-11 / F-12: a runner cut off from the scheduler for longer than its lease — both ways,
//! or only the responses — fences itself before its job is handed out again, so the old and
//! the new attempt never run at the same time, and nothing the old one sends is accepted.

use std::time::{Duration, Instant};

use serde_json::json;
use sluice_testkit::proxy::{FaultProxy, ProxyMode};
use sluice_testkit::{wait_until, Runner, Scheduler, TempDir, TestDb, Timings};

/// Last tick of `attempt` and the start of `attempt`, in ns, from the ledger.
fn ledger_times(text: &str, attempt: &str) -> (Option<i128>, Option<i128>) {
    let mut last_tick = None;
    let mut start = None;
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() != 3 || parts[1] != attempt {
            continue;
        }
        let at: i128 = parts[2].parse().unwrap();
        match parts[0] {
            "tick" => last_tick = Some(last_tick.map_or(at, |t: i128| t.max(at))),
            "start" => start = Some(at),
            _ => {}
        }
    }
    (last_tick, start)
}

async fn partition_scenario(mode: ProxyMode) {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    let proxy = FaultProxy::start(&scheduler.internal_url).await;
    let scratch = TempDir::shared("partition");
    let ledger = scratch.shared_file("ledger");
    let _cut_off = Runner::start(&scheduler, "cut-off", 1, &[("SLUICE_API_URL", &proxy.url)]).await;
    let script = r#"echo "start $ATTEMPT $(date +%s%N)" >> "$LEDGER"; for i in $(seq 40); do echo "tick $ATTEMPT $(date +%s%N)" >> "$LEDGER"; sleep 0.05; done; echo ok"#;
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": script,
                                 "env": {"LEDGER": ledger.to_string_lossy()}}}))
        .await;
    wait_until(
        "the cut-off runner to start the job",
        Duration::from_secs(10),
        || {
            let ledger = ledger.clone();
            async move {
                let text = std::fs::read_to_string(&ledger).unwrap_or_default();
                Ok::<_, String>(text.contains("tick 1").then_some(()))
            }
        },
    )
    .await;
    let _healthy = Runner::start(&scheduler, "healthy", 1, &[]).await;

    proxy.set_mode(mode);
    let cut = Instant::now();
    let job = api.wait_terminal(id, Duration::from_secs(20)).await;
    let ended_after = cut.elapsed();
    proxy.set_mode(ProxyMode::Pass);

    assert_eq!(job["state"], "succeeded", "{job}");
    // The cut-off runner's claims still reach the scheduler (only their answers are lost
    // in F-12), so it may lease a later attempt it never hears of; that one expires too.
    let last = job["attempt"].as_i64().unwrap();
    assert!((2..=3).contains(&last), "{job}");
    for earlier in 0..(last - 1) as usize {
        assert_eq!(
            job["attempts"][earlier]["outcome"], "lease_expired",
            "{job}"
        );
    }
    assert_eq!(job["result"]["stdout_tail"], "ok\n");
    // Lease + R + the 2 s the second run takes + slack.
    let bound = Duration::from_millis(
        Timings::FAST.lease_ms * 2 + Timings::FAST.reaper_interval_ms + 1000 + 2000 + 2000,
    );
    assert!(ended_after <= bound, "ended {ended_after:?} after the cut");

    let text = std::fs::read_to_string(&ledger).unwrap();
    let (last_tick_1, _) = ledger_times(&text, "1");
    let (_, start_last) = ledger_times(&text, &last.to_string());
    let (last_tick_1, start_last) = (
        last_tick_1.unwrap(),
        start_last.expect("the last attempt started"),
    );
    assert!(
        last_tick_1 < start_last,
        "attempt 1 still ran {} ms after attempt {last} started",
        (last_tick_1 - start_last) / 1_000_000
    );
    let accepted_from_first: (i64,) = sqlx::query_as(
        "SELECT count(*) FROM sluice.job_attempts WHERE job_id = $1 AND attempt = 1
           AND outcome IN ('succeeded', 'failed')",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(accepted_from_first.0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f11_a_symmetric_cut_longer_than_the_lease_fences_before_the_rerun() {
    partition_scenario(ProxyMode::Blackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f12_dropped_responses_fence_the_runner_before_the_rerun() {
    partition_scenario(ProxyMode::DropResponses).await;
}
