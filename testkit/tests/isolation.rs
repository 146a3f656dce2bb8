//! S-14: concurrent tasks on one runner and across two cannot see or starve each other: each
//! slot runs its tools as its own uid, workspaces are 0700, every tool has a fresh `/proc` of
//! its own PID namespace and a private `/run`.

use std::time::Duration;

use serde_json::json;
use sluice_testkit::{Runner, Scheduler, TempDir, TestDb, Timings};
use uuid::Uuid;

/// A runner working directory outside `/tmp` (which tools get privately): where a 0755
/// workspace used to be readable by every other task.
fn workdir_outside_tmp() -> TempDir {
    let dir = TempDir::shared("isolation-work");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

async fn neighbours_cannot_cross(runner_slots: &[u32]) {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: per-slot uids need a root sidecar");
        return;
    }
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let shared = TempDir::shared("isolation");
    let info = shared.shared_file("victim");
    let canary = format!("CANARY-{}", Uuid::new_v4().simple());
    let mut workdirs = Vec::new();
    let mut runners = Vec::new();
    for (n, slots) in runner_slots.iter().enumerate() {
        let workdir = workdir_outside_tmp();
        let path = workdir.path().to_string_lossy().into_owned();
        runners.push(
            Runner::start(
                &scheduler,
                &format!("iso-{n}"),
                *slots,
                &[
                    ("SLUICE_RUNNER_WORKDIR", &path),
                    ("SLUICE_RUNNER_LIMIT_PROCESSES", "60"),
                ],
            )
            .await,
        );
        workdirs.push(workdir);
    }
    // The victim keeps a secret in its environment and its workspace, leaves a file in
    // /run/lock, fills its process limit, and stays alive while the snooper looks around.
    let victim = api
        .enqueue(json!({"spec": {"kind": "bash", "timeout_ms": 15000,
            "env": {"SECRET": canary, "INFO": info.to_string_lossy()},
            "script": r#"echo "$SECRET" > secret.txt
echo "leftover" > /run/lock/victim-$TASK_ID
echo "$PWD $(id -u)" > "$INFO"
bomb() { bomb | bomb & }; bomb
sleep 6; echo victim-done"#}, "max_attempts": 1}))
        .await;
    let snoop = api
        .enqueue(json!({"spec": {"kind": "bash", "timeout_ms": 15000,
            "env": {"INFO": info.to_string_lossy()},
            "script": r#"for i in $(seq 100); do [ -s "$INFO" ] && break; sleep 0.1; done
read ws victim_uid < "$INFO"
sleep 1
echo "uids $(id -u) $victim_uid"
echo "procs $(ls /proc | grep -c '^[0-9]')"
echo "environ $(cat /proc/[0-9]*/environ 2>/dev/null | tr '\0' '\n' | grep -c "^SECRET=")"
echo "secret $(cat "$ws/secret.txt" 2>/dev/null | wc -c)"
(echo planted > "$ws/planted") 2>/dev/null && echo "write yes" || echo "write no"
ls "$ws" >/dev/null 2>&1 && echo "list yes" || echo "list no"
echo "lock $(ls /run/lock 2>/dev/null | grep -c victim)"
n=0; for i in $(seq 30); do (sleep 1) & n=$((n+1)); done; wait; echo "forked $n""#},
            "max_attempts": 1}))
        .await;
    let job = api.wait_terminal(snoop, Duration::from_secs(40)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let out = job["result"]["stdout_tail"].as_str().unwrap().to_string();
    let line = |name: &str| -> Vec<String> {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} line in {out}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let uids = line("uids");
    assert_ne!(uids[0], uids[1], "the two tasks share a uid: {out}");
    let procs: usize = line("procs")[0].parse().unwrap();
    assert!(procs < 20, "the tool sees {procs} processes: {out}");
    assert_eq!(line("environ"), ["0"], "{out}");
    assert_eq!(line("secret"), ["0"], "{out}");
    assert_eq!(line("write"), ["no"], "{out}");
    assert_eq!(line("list"), ["no"], "{out}");
    assert_eq!(line("lock"), ["0"], "{out}");
    assert_eq!(
        line("forked"),
        ["30"],
        "the neighbour's process limit starved this task: {out}"
    );
    assert!(!out.contains(&canary), "{out}");

    let job = api.wait_terminal(victim, Duration::from_secs(40)).await;
    assert_eq!(job["attempt"], 1, "{job}");
    // Nothing the victim left in /run/lock outlived it on the host.
    let left: Vec<_> = std::fs::read_dir("/run/lock")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("victim-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    // No snooper file reached the victim's workspace (gone with it anyway, but checked).
    for workdir in &workdirs {
        for entry in std::fs::read_dir(workdir.path()).unwrap().flatten() {
            assert!(!entry.path().join("planted").exists());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s14_tasks_on_one_runner_cannot_see_or_starve_each_other() {
    neighbours_cannot_cross(&[2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s14_tasks_on_two_runners_of_one_host_cannot_see_or_starve_each_other() {
    neighbours_cannot_cross(&[1, 1]).await;
}

/// S-13: the private Postgres requires passwords a tool cannot read, and the scheduler's role
/// is no superuser; `network: none` leaves a tool nothing but loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s13_tools_cannot_reach_postgres_or_the_scheduler_and_none_means_no_network() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let _runner = Runner::start(&scheduler, "s13", 2, &[]).await;
    let port = db.port().to_string();
    let internal_port = scheduler
        .internal_url
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let probe = r#"export PGCONNECT_TIMEOUT=3
command -v psql >/dev/null && echo "psql here" || echo "psql missing"
try() { psql "$1" -Atc "$2" >/dev/null 2>&1 && echo yes || echo no; }
echo "control $(PGPASSWORD=$CONTROL_PASSWORD try "postgresql://sluice@127.0.0.1:$PGPORT/postgres" 'select 1')"
echo "superuser $(try "postgresql://postgres@127.0.0.1:$PGPORT/postgres" 'select 1')"
echo "guessed $(PGPASSWORD=postgres try "postgresql://postgres@127.0.0.1:$PGPORT/postgres" 'select 1')"
echo "role $(try "postgresql://sluice@127.0.0.1:$PGPORT/postgres" 'select 1')"
echo "program $(try "postgresql://postgres@127.0.0.1:$PGPORT/postgres" "COPY (SELECT 1) TO PROGRAM 'id'")"
echo "secrets $(cat /proc/[0-9]*/environ 2>/dev/null | tr '\0' '\n' | grep -c -e DATABASE_URL -e SLUICE_RUNNER_SECRET)"
(exec 3<>/dev/tcp/127.0.0.1/$INTERNAL) 2>/dev/null && echo "scheduler reached" || echo "scheduler unreachable"
echo "interfaces $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\n' ,)""#;
    // The scheduler role's password, handed to the probe on purpose: the positive control
    // that proves a login would have been seen (and psql works in the tool).
    let password = db
        .url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password.to_string())
        .expect("a password in the test database URL");
    let env = json!({"PGPORT": port, "INTERNAL": internal_port, "CONTROL_PASSWORD": password});
    let full = api
        .enqueue(json!({"spec": {"kind": "bash", "script": probe, "env": env}}))
        .await;
    let none = api
        .enqueue(json!({"spec": {"kind": "bash", "script": probe, "env": env, "network": "none"}}))
        .await;
    let job = api.wait_terminal(full, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let out = job["result"]["stdout_tail"].as_str().unwrap().to_string();
    for line in [
        "psql here",
        "control yes",
        "superuser no",
        "guessed no",
        "role no",
        "program no",
        "secrets 0",
    ] {
        assert!(out.contains(line), "{line:?} missing: {out}");
    }
    // With the network on, the scheduler's port answers (its token still guards it).
    assert!(out.contains("scheduler reached"), "{out}");

    let job = api.wait_terminal(none, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let out = job["result"]["stdout_tail"].as_str().unwrap().to_string();
    assert!(
        out.contains("control no"),
        "no network, no login at all: {out}"
    );
    assert!(out.contains("scheduler unreachable"), "{out}");
    assert!(out.contains("interfaces lo,"), "only loopback: {out}");

    // The scheduler's own role is no superuser and cannot run programs.
    let (superuser,): (bool,) =
        sqlx::query_as("SELECT rolsuper FROM pg_roles WHERE rolname = 'sluice'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(!superuser);
    let scheduler_role = sqlx::PgPool::connect(&db.url).await.unwrap();
    let program = sqlx::query("COPY (SELECT 1) TO PROGRAM 'id'")
        .execute(&scheduler_role)
        .await;
    assert!(program.is_err(), "the scheduler's role ran a program");
}

/// A runner whose default is `network: none` gives it to every job that names none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_default_of_no_network_applies_to_jobs_that_name_none() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let api = scheduler.api();
    let _runner = Runner::start(
        &scheduler,
        "offline",
        1,
        &[("SLUICE_RUNNER_NETWORK", "none")],
    )
    .await;
    let id = api
        .enqueue(json!({"spec": {"kind": "bash",
            "script": "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"}}))
        .await;
    let job = api.wait_terminal(id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["stdout_tail"], "lo\n", "{job}");
}
