//! The sidecar under gVisor: `runsc --rootless --network=host do sluice-runner`, talking to a
//! scheduler on loopback. Bash, the file tools on the component-walk path (gVisor has no
//! openat2), rlimits and a fork bomb, all inside the sandbox. Skips where `runsc` is absent.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_testkit::{Runner, Scheduler, TestDb, Timings};

const DEADLINE: Duration = Duration::from_secs(90);

fn runsc() -> Option<&'static str> {
    ["/usr/bin/runsc", "/usr/local/bin/runsc"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
}

#[tokio::test]
async fn the_sidecar_runs_tools_confined_inside_gvisor() {
    let Some(runsc) = runsc() else {
        eprintln!(
            "skipped: runsc (gVisor) is not installed; `apt-get install -y runsc` (.ci/run does)"
        );
        return;
    };
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let internal_port = scheduler
        .internal_url
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let runner = Runner::start_wrapped(
        &scheduler,
        "gvisor",
        2,
        // Force the walk as well, in case a newer gVisor grows openat2.
        &[("SLUICE_RUNNER_FORCE_PATH_WALK", "true")],
        &[runsc, "--rootless", "--network=host", "do"],
    )
    .await;

    let bash = |script: &str| json!({"kind": "bash", "script": script});
    let cases: Vec<(Value, &str)> = vec![
        (bash("uname -r; id -u; echo hi > f && cat f"), "succeeded"),
        // rlimits hold inside the sandbox.
        (
            json!({"kind": "bash", "script": "ulimit -n", "limits": {"open_files": 77}}),
            "succeeded",
        ),
        // A fork bomb stops at RLIMIT_NPROC (the tool runs as its slot's uid) and the runner lives on.
        (
            json!({"kind": "bash", "script": "bomb() { bomb | bomb & }; bomb; sleep 2; echo survived", "timeout_ms": 8000, "limits": {"processes": 64}}),
            "any",
        ),
        (
            json!({"kind": "tool", "tool": "write_file", "input": {"path": "d/x.txt", "content": "gvisor"}}),
            "succeeded",
        ),
        (
            json!({"kind": "tool", "tool": "read_file", "input": {"path": "../../etc/passwd"}}),
            "failed",
        ),
        (
            json!({"kind": "tool", "tool": "grep", "input": {"pattern": "x"}}),
            "succeeded",
        ),
        (
            json!({"kind": "tool", "tool": "web_fetch", "input": {"url": "http://127.0.0.1:1/"}}),
            "failed",
        ),
        (bash("echo after the bomb"), "succeeded"),
        // network none: nothing reachable, not even the scheduler the sidecar talks to.
        (
            json!({"kind": "bash", "network": "none",
                   "script": format!("(exec 3<>/dev/tcp/127.0.0.1/{internal_port}) 2>/dev/null && echo reached || echo unreachable")}),
            "succeeded",
        ),
        // A script past argv's 128 KiB reaches bash through its descriptor.
        (
            bash(&format!(
                ": '{}'\necho long script ran",
                "x".repeat(200 * 1024)
            )),
            "succeeded",
        ),
    ];
    let mut ids = Vec::new();
    for (spec, _) in &cases {
        ids.push(api.enqueue(json!({ "spec": spec })).await);
    }
    let mut jobs = Vec::new();
    for (id, (spec, state)) in ids.iter().zip(&cases) {
        let job = api.wait_terminal(*id, DEADLINE).await;
        if *state != "any" {
            assert_eq!(job["state"], *state, "{spec}: {job}");
        }
        jobs.push(job);
    }
    let first = jobs[0]["result"]["stdout_tail"]
        .as_str()
        .unwrap_or_default();
    let lines: Vec<&str> = first.lines().collect();
    // gVisor reports its own kernel version, not the host's.
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    assert_ne!(
        lines.first().copied(),
        Some(host.trim()),
        "not inside gVisor: {first}"
    );
    let uid: u32 = lines.get(1).and_then(|l| l.parse().ok()).unwrap_or(0);
    assert!(
        (200_000..300_000).contains(&uid),
        "the tool does not run as its slot's uid: {first}"
    );
    assert_eq!(lines.get(2).copied(), Some("hi"));
    assert_eq!(jobs[1]["result"]["stdout_tail"], "77\n");
    assert_eq!(jobs[3]["result"]["bytes_written"], 6);
    assert_eq!(jobs[4]["error"]["code"], "path_outside_workspace");
    assert_eq!(jobs[6]["error"]["code"], "address_refused");
    assert_eq!(jobs[7]["result"]["stdout_tail"], "after the bomb\n");
    assert_eq!(
        jobs[8]["result"]["stdout_tail"], "unreachable\n",
        "{}",
        jobs[8]
    );
    assert_eq!(
        jobs[9]["result"]["stdout_tail"], "long script ran\n",
        "{}",
        jobs[9]
    );
    // gVisor's 2022 procfs lets any uid read any process's environment, and refuses private
    // mounts: the sidecar says so, since only the pod keeps tasks apart there.
    assert!(
        runner
            .log_text()
            .contains("tasks sharing this runner can see each other"),
        "no warning about shared /proc under gVisor"
    );

    // Artifacts inside gVisor: packed by the descriptor walk and unpacked by descriptor.
    let (status, body) = api
        .put_text(
            &sluice_protocol::api::paths::workflow("files"),
            "steps:
  - {id: make, kind: bash, script: 'mkdir -p out && echo inside > out/x && ln -s /etc/passwd out/l',
     artifacts: [out]}
  - {id: use, depends_on: [make], kind: bash, script: 'cat out/x; test -e out/l || echo no-link'}
",
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, started) = api
        .post(
            sluice_protocol::api::paths::WORKFLOWS_RUN,
            &json!({"workflow": "files"}),
        )
        .await;
    assert_eq!(status, 201, "{started}");
    let run = started["run_id"].as_i64().unwrap();
    let done = sluice_testkit::wait_until("the run to finish", DEADLINE, || async {
        let (_, run) = api.get(&sluice_protocol::api::paths::run(run)).await;
        Ok::<_, String>((run["state"] != "running").then_some(run))
    })
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        done["steps"][1]["output"]["stdout_tail"], "inside\nno-link\n",
        "{done}"
    );
}
