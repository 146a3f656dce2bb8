//! The runner pool (issue 21): what a runner does for the pool on its own side.

use std::time::Duration;

use serde_json::json;
use sluice_testkit::{wait_until, Runner, Scheduler, TestDb, Timings};

/// `SLUICE_RUNNER_RECYCLE_AFTER=N`: a runner takes exactly N tasks, lets them finish, and
/// exits cleanly — a pool then replaces it with a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recycled_runner_takes_exactly_n_tasks_then_exits_cleanly() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            api.enqueue(
                json!({"spec": {"kind": "bash", "script": format!("sleep 0.2; echo {n}")}}),
            )
            .await,
        );
    }
    let mut first = Runner::start(
        &scheduler,
        "recycled-1",
        4,
        &[("SLUICE_RUNNER_RECYCLE_AFTER", "2")],
    )
    .await;
    let status = first.wait_exit(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        first.log_text()
    );
    let succeeded = db
        .count("SELECT count(*) FROM sluice.jobs WHERE state = 'succeeded'")
        .await;
    assert_eq!(succeeded, 2, "a runner recycled after 2 ran 2");
    assert_eq!(
        db.count("SELECT count(*) FROM sluice.jobs WHERE state = 'available'")
            .await,
        3,
        "the rest wait for the next runner"
    );
    // A fresh runner takes the rest.
    let _second = Runner::start(
        &scheduler,
        "recycled-2",
        4,
        &[("SLUICE_RUNNER_RECYCLE_AFTER", "3")],
    )
    .await;
    for id in ids {
        let job = api.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    wait_until("every job to be done", Duration::from_secs(10), || async {
        match db
            .count("SELECT count(*) FROM sluice.jobs WHERE state <> 'succeeded'")
            .await
        {
            0 => Ok(Some(())),
            n => Err(format!("{n} not done")),
        }
    })
    .await;
}

/// `GET /api/runners` and `sluice runners ls`: each runner's state follows its heartbeats
/// (`busy` while it holds an attempt, `idle` after), with its slots in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_are_listed_with_their_state_and_slots_in_use() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let _runner = Runner::start(&scheduler, "listed", 2, &[]).await;
    // Long enough for several heartbeats (1 s apart) to see it.
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "sleep 8"}}))
        .await;
    let listed = |state: &'static str, in_use: i64| {
        let api = &api;
        async move {
            let (status, body) = api.get(sluice_protocol::api::paths::RUNNERS).await;
            assert_eq!(status, 200, "{body}");
            let runner = body["runners"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["pod_name"] == "listed")
                .cloned();
            match runner {
                Some(r) if r["state"] == state && r["slots_in_use"] == in_use => {
                    assert_eq!(r["slots"], 2);
                    assert!(!r["version"].as_str().unwrap().is_empty());
                    Ok(Some(r))
                }
                other => Err(format!("{other:?}")),
            }
        }
    };
    wait_until("the runner to be busy", Duration::from_secs(30), || {
        listed("busy", 1)
    })
    .await;
    let output = std::process::Command::new(sluice_testkit::bin("sluice"))
        .args(["runners", "ls"])
        .env("SLUICE_API_URL", &scheduler.api_url)
        .env("SLUICE_API_TOKEN", &scheduler.api_token)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("listed\t"))
        .expect(&text);
    assert!(line.contains("\tbusy\t1/2\t"), "{line}");
    assert_eq!(
        api.wait_terminal(id, Duration::from_secs(30)).await["state"],
        "succeeded"
    );
    wait_until("the runner to be idle", Duration::from_secs(30), || {
        listed("idle", 0)
    })
    .await;
}

/// A scheduler keeping a local pool of one-slot runners, at least one warm, with `settings`
/// on top; the pool's work directory lives as long as the returned guard.
async fn pooled(db: &TestDb, settings: &[(&str, &str)]) -> (Scheduler, sluice_testkit::TempDir) {
    let workdir = sluice_testkit::TempDir::new("pool");
    let runner_bin = sluice_testkit::bin("sluice-runner");
    let mut env = vec![
        ("SLUICE_POOL_BACKEND", "local"),
        ("SLUICE_POOL_MIN_WARM", "1"),
        ("SLUICE_POOL_RUNNER_SLOTS", "1"),
        ("SLUICE_POOL_RUNNER_BIN", runner_bin.to_str().unwrap()),
        ("SLUICE_POOL_WORKDIR", workdir.path().to_str().unwrap()),
    ];
    env.extend_from_slice(settings);
    let scheduler = Scheduler::start_with(db, Timings::TEST, &env).await;
    (scheduler, workdir)
}

/// The local pool: warms to `min_warm`, grows under a backlog to `max_warm` and no further,
/// shrinks back after `idle_timeout`, and replaces a runner killed with SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_pool_warms_grows_shrinks_and_replaces_dead_runners() {
    let db = TestDb::new().await;
    let (scheduler, _workdir) = pooled(
        &db,
        &[
            ("SLUICE_POOL_MAX_WARM", "3"),
            ("SLUICE_POOL_IDLE_TIMEOUT_MS", "2000"),
        ],
    )
    .await;
    let api = scheduler.api();
    api.one_idle_pool_runner("the pool to warm one runner", None)
        .await;

    // Six one-slot jobs of 3 s: the pool grows to its maximum of three, never past it.
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(
            api.enqueue(json!({"spec": {"kind": "bash", "script": "sleep 3"}}))
                .await,
        );
    }
    let most = std::sync::atomic::AtomicUsize::new(0);
    wait_until(
        "the pool to grow to three",
        Duration::from_secs(30),
        || async {
            let now = api.pool_runners().await.len();
            most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
            if now == 3 {
                Ok(Some(()))
            } else {
                Err(format!("{now} runners"))
            }
        },
    )
    .await;
    let mut most = most.into_inner();
    for id in &ids {
        let job = api.wait_terminal(*id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        most = most.max(api.pool_runners().await.len());
    }
    assert!(most <= 3, "the pool grew past max_warm: {most}");

    // Idle past the timeout: back to the minimum of one.
    let left = api
        .one_idle_pool_runner("the pool to shrink to one", None)
        .await;

    // A runner killed outright is replaced by a fresh one.
    let pids = sluice_testkit::procs::with_env("RUNNER_POD_NAME")
        .into_iter()
        .filter(|pid| {
            sluice_testkit::procs::Process::read(*pid)
                .is_some_and(|p| p.has_var(&format!("RUNNER_POD_NAME={left}")))
        })
        .collect::<Vec<_>>();
    assert_eq!(pids.len(), 1, "the pool runner's process: {pids:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    api.one_idle_pool_runner("a fresh runner to replace it", Some(&left))
        .await;
    // The dead one is marked gone, not left registered.
    let (_, body) = api.get(sluice_protocol::api::paths::RUNNERS).await;
    let dead = body["runners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pod_name"] == left.as_str())
        .cloned()
        .unwrap();
    assert_eq!(dead["state"], "gone", "{dead}");
}

/// `SLUICE_RUNNER_RECYCLE_AFTER=1` under the local pool: every task runs on a runner no
/// other task used, and the pool keeps replacing them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_recycle_after_one_every_task_gets_a_fresh_runner() {
    let db = TestDb::new().await;
    let (scheduler, _workdir) = pooled(
        &db,
        &[
            ("SLUICE_POOL_MAX_WARM", "2"),
            ("SLUICE_RUNNER_RECYCLE_AFTER", "1"),
        ],
    )
    .await;
    let api = scheduler.api();
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            api.enqueue(json!({"spec": {"kind": "bash", "script": format!("echo {n}")}}))
                .await,
        );
    }
    let mut runners = std::collections::HashSet::new();
    for id in ids {
        let job = api.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        let attempts = job["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "{job}");
        let runner = attempts[0]["runner_id"].as_str().unwrap().to_string();
        assert!(runners.insert(runner), "two tasks shared a runner: {job}");
    }
    // The pool is warm again afterwards.
    wait_until("a warm runner", Duration::from_secs(30), || async {
        match api
            .pool_runners()
            .await
            .iter()
            .filter(|(_, s)| s == "idle")
            .count()
        {
            0 => Err("none idle".to_string()),
            _ => Ok(Some(())),
        }
    })
    .await;
}

/// A runner ordered to drain (what the pool does to an idle runner above its minimum) claims
/// nothing more, lets its running task finish — not killed — and exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_ordered_to_drain_finishes_its_task_and_exits() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let mut runner = Runner::start(&scheduler, "drained", 2, &[]).await;
    let running = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "sleep 2; echo finished"}}))
        .await;
    wait_until("the task to run", Duration::from_secs(30), || async {
        match db
            .count("SELECT count(*) FROM sluice.jobs WHERE state = 'running'")
            .await
        {
            1 => Ok(Some(())),
            n => Err(format!("{n} running")),
        }
    })
    .await;
    sqlx::query("UPDATE sluice.runners SET state = 'draining' WHERE pod_name = 'drained' AND state <> 'gone'")
        .execute(&db.pool)
        .await
        .unwrap();
    let waiting = api.enqueue(json!({"spec": {"kind": "noop"}})).await;
    let status = runner.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        runner.log_text()
    );
    let job = api.wait_terminal(running, Duration::from_secs(10)).await;
    assert_eq!(
        job["state"], "succeeded",
        "the running task was finished, not killed: {job}"
    );
    assert!(job["result"]["stdout_tail"]
        .as_str()
        .unwrap()
        .contains("finished"));
    let (_, job) = api
        .get(&sluice_protocol::api::paths::job(sluice_protocol::JobId(
            waiting,
        )))
        .await;
    assert_eq!(
        job["state"], "available",
        "a draining runner claims nothing: {job}"
    );
}
