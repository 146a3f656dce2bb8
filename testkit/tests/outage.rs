//! Postgres outages (F-07, F-20). This file has its own test process, so stopping its
//! private cluster affects no other suite; its tests run one at a time for the same reason.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_testkit::{
    start_postgres, stop_postgres, wait_until, FakeRunner, Scheduler, TestDb, Timings,
};

/// One test at a time: they stop and start the shared cluster.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn restart_postgres_blocking(stop: bool) {
    tokio::task::spawn_blocking(move || {
        if stop {
            stop_postgres()
        } else {
            start_postgres()
        }
    })
    .await
    .unwrap();
}

#[derive(Default)]
struct History {
    acked: Vec<i64>,
    unavailable: usize,
    unavailable_without_retry_after: usize,
    unknown: usize,
    other: Vec<String>,
    slowest: Duration,
}

/// F-07: restart Postgres three times under enqueue load. Every 2xx enqueue survives and
/// runs; during the outage the API answers 503 with Retry-After within 5 s (never a hang, never
/// a 500); the scheduler is ready again within 5 s of Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f07_postgres_restarts_under_load_lose_no_acknowledged_enqueue() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _runner = scheduler.runner("f07", 4).await;
    let api = scheduler.api();
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(AtomicBool::new(false));

    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (api, history, stop) = (api.clone(), history.clone(), stop.clone());
        load.spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(6))
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let sent = http
                    .post(format!("{}/api/jobs", api.base))
                    .bearer_auth(&api.token)
                    .json(&json!({"spec": {"kind": "bash", "script": "sleep 0.02"}}))
                    .send()
                    .await;
                let elapsed = started.elapsed();
                let (status, retry_after, body) = match sent {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let retry_after = response.headers().get("retry-after").is_some();
                        let body: serde_json::Value = response.json().await.unwrap_or_default();
                        (Ok(status), retry_after, body)
                    }
                    Err(err) => (Err(err), false, serde_json::Value::Null),
                };
                let mut h = history.lock().unwrap();
                h.slowest = h.slowest.max(elapsed);
                match status {
                    Ok(201) => h.acked.push(body["id"].as_i64().unwrap()),
                    Ok(503) => {
                        h.unavailable += 1;
                        if !retry_after {
                            h.unavailable_without_retry_after += 1;
                        }
                    }
                    Ok(other) => h.other.push(format!("{other} after {elapsed:?}: {body}")),
                    Err(err) if err.is_timeout() => h.other.push(format!("hung for {elapsed:?}")),
                    Err(_) => h.unknown += 1,
                }
            }
        });
    }

    let mut ready_after = Vec::new();
    for round in 0..3 {
        let before = history.lock().unwrap().acked.len();
        wait_until("enqueues to flow", Duration::from_secs(30), || {
            let history = history.clone();
            async move {
                let n = history.lock().unwrap().acked.len();
                Ok::<_, String>((n >= before + 20).then_some(()))
            }
        })
        .await;
        restart_postgres_blocking(true).await;
        let unavailable_before = history.lock().unwrap().unavailable;
        wait_until(
            "the API to answer 503 during the outage",
            Duration::from_secs(10),
            || {
                let history = history.clone();
                async move {
                    let n = history.lock().unwrap().unavailable;
                    Ok::<_, String>((n > unavailable_before).then_some(()))
                }
            },
        )
        .await;
        restart_postgres_blocking(false).await;
        let back = Instant::now();
        let http = reqwest::Client::new();
        let ready_url = format!("{}/readyz", scheduler.api_url);
        wait_until(
            &format!("readiness after restart {round}"),
            Duration::from_secs(5),
            || {
                let (http, url) = (http.clone(), ready_url.clone());
                async move {
                    let status = http.get(&url).send().await.map(|r| r.status().as_u16());
                    Ok::<_, String>((status.ok() == Some(200)).then_some(()))
                }
            },
        )
        .await;
        ready_after.push(back.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}

    let history = Arc::try_unwrap(history).ok().unwrap().into_inner().unwrap();
    assert!(
        history.other.is_empty(),
        "non-503 errors or hangs: {:?}",
        history.other
    );
    assert_eq!(history.unavailable_without_retry_after, 0);
    assert!(
        history.slowest <= Duration::from_secs(5),
        "slowest answer {:?}",
        history.slowest
    );
    assert!(history.unavailable > 0);

    // Every acknowledged job exists and runs to success.
    let acked = history.acked.clone();
    wait_until(
        "every acknowledged job to succeed",
        Duration::from_secs(90),
        || {
            let (pool, acked) = (db.pool.clone(), acked.clone());
            async move {
                let (succeeded,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM sluice.jobs WHERE id = ANY($1) AND state = 'succeeded'",
                )
                .bind(&acked)
                .fetch_one(&pool)
                .await
                .map_err(|e| e.to_string())?;
                if succeeded as usize == acked.len() {
                    Ok(Some(()))
                } else {
                    Err(format!("{succeeded} of {} succeeded", acked.len()))
                }
            }
        },
    )
    .await;
    eprintln!(
        "F-07: {} acked, {} answered 503, {} unknown, slowest {:?}, ready after {:?}",
        history.acked.len(),
        history.unavailable,
        history.unknown,
        history.slowest,
        ready_after
    );
}

/// F-20: Postgres is away for longer than two leases while tools run. The sidecar rides
/// through the "database unavailable" answers, the schedulers give expired leases one more
/// term when it returns, and no job of a live runner is reclaimed or run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f20_an_outage_longer_than_the_lease_reclaims_no_live_runners_work() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new().await;
    // The scheduler answers 503 after its 1 s wait for a connection; the lease must leave
    // room for that answer before the sidecar's fence (lease − margin) falls.
    let timings = Timings {
        heartbeat_ms: 500,
        lease_ms: 2500,
        reaper_interval_ms: 200,
    };
    let scheduler = Scheduler::start(&db, timings).await;
    let api = scheduler.api();
    let _runner = scheduler.runner("f20", 4).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(
            api.enqueue(json!({"spec": {"kind": "bash", "script": "sleep 9"}}))
                .await,
        );
    }
    wait_until("all four to run", Duration::from_secs(20), || {
        let pool = db.pool.clone();
        async move {
            let (n,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM sluice.jobs WHERE state = 'running'")
                    .fetch_one(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
            Ok((n == 4).then_some(())).map_err(|_: ()| n.to_string())
        }
    })
    .await;

    // A runner that takes a job just before the outage and goes silent: after it, its lease
    // must still be reclaimed (the outage extension gives it one term, not forever). The
    // real runner's slots are all busy, so this job is the silent one's.
    let silent = FakeRunner::register(&scheduler, "silent").await;
    let abandoned = api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    assert_eq!(silent.claim(1, 2000).await[0].job_id.0, abandoned);

    restart_postgres_blocking(true).await;
    let down = Instant::now();
    // Keep it away for 2.5 leases: poll the API until that long has passed.
    wait_until(
        "the outage to last 2.5 leases",
        Duration::from_secs(10),
        || {
            let api = api.clone();
            async move {
                let _ = api.get("/readyz").await;
                Ok::<_, String>((down.elapsed() >= Duration::from_millis(2500)).then_some(()))
            }
        },
    )
    .await;
    restart_postgres_blocking(false).await;

    for &id in &ids {
        let job = api.wait_terminal(id, Duration::from_secs(30)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(job["attempt"], 1, "reclaimed during the outage: {job}");
    }
    let reclaimed_live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sluice.job_attempts WHERE outcome = 'lease_expired' AND job_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(reclaimed_live, 0);
    // The silent runner's job was given its extra term, then reclaimed and run elsewhere.
    let job = api.wait_terminal(abandoned, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    let log = scheduler.log_text();
    assert!(
        log.contains("gave expired leases one more term"),
        "the outage extension ran: {log}"
    );
}
