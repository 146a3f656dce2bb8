//! The sandbox through real scheduler and sidecar processes: `tool` jobs for every tool,
//! cross-task isolation on a warm runner (S-09), the sidecar as PID 1 reaping orphans
//! (B-13), and no descriptor leak over many tasks (B-14).

use std::time::Duration;

use serde_json::{json, Value};
use sluice_protocol::{api::paths as api_paths, JobId};
use sluice_testkit::{procs, wait_until, Api, Runner, Scheduler, TestDb, Timings};

const DEADLINE: Duration = Duration::from_secs(60);

async fn enqueue_batch(api: &Api, specs: Vec<Value>) -> Vec<i64> {
    let jobs: Vec<Value> = specs
        .into_iter()
        .map(|spec| json!({ "spec": spec }))
        .collect();
    let (status, body) = api
        .post(api_paths::JOBS_BATCH, &json!({ "jobs": jobs }))
        .await;
    assert_eq!(status, 201, "{body}");
    body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect()
}

async fn wait_all_terminal(db: &TestDb, ids: &[i64]) {
    wait_until("every job to end", DEADLINE * 3, || async {
        let (open,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM sluice.jobs WHERE id = ANY($1)
             AND state NOT IN ('succeeded', 'failed', 'cancelled')",
        )
        .bind(ids)
        .fetch_one(&db.pool)
        .await
        .map_err(|e| e.to_string())?;
        Ok::<_, String>((open == 0).then_some(()))
    })
    .await;
}

#[tokio::test]
async fn tool_jobs_run_every_tool_and_report_refusals_as_non_retryable_failures() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    let _runner = Runner::start(&scheduler, "tools", 2, &[]).await;

    let cases = [
        (
            json!({"tool": "bash", "input": {"command": "echo hi from bash"}}),
            "succeeded",
            None,
        ),
        (
            json!({"tool": "write_file", "input": {"path": "a/b.txt", "content": "hello"}}),
            "succeeded",
            None,
        ),
        (
            json!({"tool": "grep", "input": {"pattern": "x"}}),
            "succeeded",
            None,
        ),
        (
            json!({"tool": "read_file", "input": {"path": "missing.txt"}}),
            "failed",
            Some("not_found"),
        ),
        (
            json!({"tool": "read_file", "input": {"path": "../../etc/passwd"}}),
            "failed",
            Some("path_outside_workspace"),
        ),
        (
            json!({"tool": "read_file", "input": {"path": "/etc/passwd"}}),
            "failed",
            Some("path_outside_workspace"),
        ),
        (
            json!({"tool": "write_file", "input": {"path": "x"}}),
            "failed",
            Some("invalid_input"),
        ),
        (
            json!({"tool": "web_fetch", "input": {"url": "http://127.0.0.1:1/"}}),
            "failed",
            Some("address_refused"),
        ),
        (
            json!({"tool": "web_fetch", "input": {"url": "http://169.254.169.254/latest/meta-data/"}}),
            "failed",
            Some("address_refused"),
        ),
        (
            json!({"tool": "web_fetch", "input": {"url": "file:///etc/passwd"}}),
            "failed",
            Some("unsupported_scheme"),
        ),
    ];
    let specs = cases
        .iter()
        .map(|(call, _, _)| {
            let mut spec = call.clone();
            spec["kind"] = json!("tool");
            spec
        })
        .collect();
    let ids = enqueue_batch(&api, specs).await;
    for (id, (call, state, code)) in ids.iter().zip(&cases) {
        let job = api.wait_terminal(*id, DEADLINE).await;
        assert_eq!(job["state"], *state, "{call}: {job}");
        if let Some(code) = code {
            assert_eq!(job["error"]["code"], *code, "{call}: {job}");
            // A refusal is the same on every attempt: not retried.
            assert_eq!(job["attempt"], 1, "{call}: {job}");
        }
    }
    let bash = api.wait_terminal(ids[0], DEADLINE).await;
    assert_eq!(bash["result"]["stdout_tail"], "hi from bash\n");
    let wrote = api.wait_terminal(ids[1], DEADLINE).await;
    assert_eq!(wrote["result"]["bytes_written"], 5);

    // An unknown tool is refused at enqueue.
    let (status, body) = api
        .post(
            api_paths::JOBS,
            &json!({"spec": {"kind": "tool", "tool": "rm_rf", "input": {}}}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

/// S-09: on one warm runner (one slot, so tasks follow each other), every "plant" task leaves
/// files in the workspace, `/tmp`, `/var/tmp` and `/dev/shm`, a background and a `setsid`
/// process and an exported variable; the "snoop" task right after looks for all of it.
#[tokio::test]
async fn s09_plant_and_snoop_pairs_on_one_warm_runner_find_no_residue() {
    let pairs: usize = std::env::var("SLUICE_S09_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    let plant = "export S09PLANT=planted-$SLUICE_JOB_ID; \
        for d in . /tmp /var/tmp /dev/shm; do echo S09PLANT > $d/s09-plant-$SLUICE_JOB_ID; done; \
        (S09PLANT=bg sleep 300 &) ; setsid env S09PLANT=setsid sleep 300 & \
        nohup env S09PLANT=nohup sleep 300 >/dev/null 2>&1 & \
        ls /tmp/s09-plant-$SLUICE_JOB_ID >/dev/null && echo planted";
    let snoop = "for d in . .. /tmp /var/tmp /dev/shm $HOME; do \
          ls -A $d 2>/dev/null | grep s09 | sed \"s|^|file $d/|\"; done; \
        grep -rl S09PLANT /tmp /var/tmp /dev/shm . 2>/dev/null | sed 's/^/content /'; \
        for p in /proc/[0-9]*; do tr '\\0' '\\n' < $p/environ 2>/dev/null | grep -q '^S09PLANT=' && echo \"process $p\"; done; \
        env | grep S09PLANT; true";
    let mut specs = Vec::new();
    for _ in 0..pairs {
        specs.push(json!({"kind": "bash", "script": plant}));
        specs.push(json!({"kind": "bash", "script": snoop}));
    }
    // Enqueued before the runner starts, so one slot takes them strictly in order.
    let ids = enqueue_batch(&api, specs).await;
    let runner = Runner::start(&scheduler, "warm", 1, &[]).await;
    wait_all_terminal(&db, &ids).await;
    let mut residue = Vec::new();
    for (index, id) in ids.iter().enumerate() {
        let (_, job) = api.get(&api_paths::job(JobId(*id))).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        let out = job["result"]["stdout_tail"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if index % 2 == 0 {
            assert_eq!(out, "planted\n", "the plant must have worked: {job}");
        } else if !out.is_empty() {
            residue.push(out);
        }
    }
    assert!(
        residue.is_empty(),
        "{} snoops found residue: {:?}",
        residue.len(),
        &residue[..residue.len().min(3)]
    );
    // And on the host: nothing planted is left in the shared directories, no process runs.
    for dir in ["/tmp", "/var/tmp", "/dev/shm"] {
        let planted: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("s09-plant-"))
            .collect();
        assert!(planted.is_empty(), "{dir} holds {planted:?}");
    }
    // No workspace is left, and the sidecar's own archive directory is empty.
    let left: Vec<String> = std::fs::read_dir(runner.workdir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, [".archives"], "a workspace was left");
    assert!(
        std::fs::read_dir(runner.workdir.path().join(".archives"))
            .unwrap()
            .next()
            .is_none(),
        "an archive was left"
    );
    assert!(procs::with_env("S09PLANT").is_empty());
}

/// B-13: the sidecar as PID 1 (`unshare -pf`): tools that background, `setsid`, double-fork
/// and `nohup` leave no process and no zombie, and the sidecar's children return to none.
/// B-14 on the same runner: its descriptor count does not grow over many tasks of every kind.
#[tokio::test]
async fn b13_b14_the_sidecar_as_pid_1_reaps_everything_and_leaks_no_descriptors() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: running the sidecar as PID 1 (unshare -pf) needs root");
        return;
    }
    let tasks: usize = std::env::var("SLUICE_B14_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::FAST).await;
    let api = scheduler.api();
    let runner = Runner::start_wrapped(
        &scheduler,
        "pid1",
        2,
        &[],
        &["unshare", "-pf", "--kill-child", "--"],
    )
    .await;
    let sidecar = wait_until("the sidecar under unshare", DEADLINE, || async {
        let pid = runner.pid().ok_or("unshare exited")?;
        Ok::<_, String>(procs::children_of(pid).first().copied())
    })
    .await;
    // `NSpid:` lists the pid in each namespace, the innermost last.
    let ns_pid = procs::status_field(sidecar, "NSpid").unwrap_or_default();
    assert!(
        ns_pid.split_whitespace().last() == Some("1"),
        "the sidecar is not PID 1 of its namespace: {ns_pid}"
    );

    let orphans = "sleep 301 & setsid sleep 301 & nohup sleep 301 >/dev/null 2>&1 & \
        (sh -c 'sleep 301 &' &) ; disown -a; echo done";
    let warm = enqueue_batch(&api, vec![json!({"kind": "bash", "script": orphans}); 4]).await;
    wait_all_terminal(&db, &warm).await;
    let idle = |want: usize| {
        let what = format!("the sidecar to have {want} children");
        async move {
            wait_until(&what, Duration::from_secs(10), || async {
                let children = procs::children_of(sidecar);
                Ok::<_, String>((children.len() == want).then_some(()))
            })
            .await
        }
    };
    idle(0).await;
    let baseline = procs::fd_count(sidecar);

    let kinds = [
        json!({"kind": "bash", "script": orphans}),
        json!({"kind": "tool", "tool": "write_file", "input": {"path": "f", "content": "x"}}),
        json!({"kind": "tool", "tool": "read_file", "input": {"path": "missing"}}),
        json!({"kind": "tool", "tool": "web_fetch", "input": {"url": "http://127.0.0.1:1/"}}),
        json!({"kind": "noop"}),
    ];
    let specs = (0..tasks).map(|i| kinds[i % kinds.len()].clone()).collect();
    let ids = enqueue_batch(&api, specs).await;
    wait_all_terminal(&db, &ids).await;
    idle(0).await;
    // Zombies the sidecar would have to reap (its children, as PID 1 or not).
    let processes = procs::all();
    let zombies: Vec<i32> = processes
        .iter()
        .filter(|p| p.is_zombie() && p.ppid == sidecar as i32)
        .map(|p| p.pid)
        .collect();
    assert!(zombies.is_empty(), "zombies: {zombies:?}");
    let sleepers = processes
        .iter()
        .filter(|p| p.cmdline == b"sleep\x00301\x00")
        .count();
    assert_eq!(sleepers, 0, "orphaned sleepers survived their tasks");
    // A few descriptors of slack for the HTTP client's pooled connections.
    let after = procs::fd_count(sidecar);
    assert!(
        after <= baseline + 2,
        "descriptors grew from {baseline} to {after} over {tasks} tasks"
    );
    // Stopping the runner stops the sidecar inside the namespace too (the wrapper's
    // `--kill-child`): nothing of this test outlives it.
    drop(runner);
    wait_until("the sidecar to be gone", DEADLINE, || async {
        Ok::<_, String>((!procs::alive(sidecar as i32)).then_some(()))
    })
    .await;
}
