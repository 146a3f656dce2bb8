//! `sluice dev` and `sluice enqueue` as a new user runs them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sluice_testkit::procs::{self, alive};
use sluice_testkit::{bin, Scheduler, TempDir, TestDb, Timings};

/// Live processes (but this test) whose command line or environment mention `needle`.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    procs::live()
        .into_iter()
        .filter(|p| p.pid != me && p.mentions(needle))
        .map(|p| p.pid)
        .collect()
}

#[test]
fn sluice_dev_runs_the_example_job_and_leaves_nothing_behind_on_ctrl_c() {
    let home = TempDir::new("dev");
    let state_dir = home.path().join(".sluice");
    let mut child = Command::new(bin("sluice"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--internal-listen",
            "127.0.0.1:0",
        ])
        .current_dir(home.path())
        .env_remove("DATABASE_URL")
        .env_remove("ANTHROPIC_API_KEY")
        // As a user runs the built binary (not through `cargo run`, which sets CARGO).
        .env_remove("CARGO")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sluice dev");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut transcript = Vec::new();
    let mut runner_pids = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(remaining) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "sluice dev did not finish its example job:\n{}",
                    transcript.join("\n")
                );
            }
        };
        if let Some(rest) = line.strip_prefix("runner ") {
            if let Some(pid) = rest
                .split_whitespace()
                .nth(2)
                .and_then(|p| p.parse::<i32>().ok())
            {
                runner_pids.push(pid);
            }
        }
        transcript.push(line.clone());
        if line.contains("example job") && line.contains("succeeded after") {
            break;
        }
        assert!(
            !line.contains("example job") || !line.contains("failed"),
            "{}",
            transcript.join("\n")
        );
    }
    let transcript_text = transcript.join("\n");
    assert_eq!(runner_pids.len(), 2, "{transcript_text}");
    assert!(
        transcript_text.contains("hello from sluice"),
        "{transcript_text}"
    );
    assert!(transcript_text.contains("curl -H"), "{transcript_text}");
    assert!(transcript_text.contains("psql"), "{transcript_text}");
    // Without a key, it says how to enable agent steps.
    assert!(
        transcript_text.contains("agent steps: not enabled")
            && transcript_text.contains("ANTHROPIC_API_KEY"),
        "{transcript_text}"
    );

    // dev.env is shell-sourceable and names a working API.
    let env = std::fs::read_to_string(state_dir.join("dev.env")).expect("dev.env written");
    for name in ["DATABASE_URL=", "SLUICE_API_URL=", "SLUICE_API_TOKEN="] {
        assert!(env.lines().any(|l| l.starts_with(name)), "{env}");
    }
    let value = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .to_string()
    };
    let output = Command::new(bin("sluice"))
        .args([
            "enqueue",
            "--wait",
            r#"{"kind":"bash","script":"echo from-cli"}"#,
        ])
        .env("SLUICE_API_URL", value("SLUICE_API_URL="))
        .env("SLUICE_API_TOKEN", value("SLUICE_API_TOKEN="))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "from-cli\n");

    // The first line names the cluster's data directory (a temp dir when the postgres user
    // cannot reach this one); its pid file names the postmaster.
    let data_dir = transcript
        .iter()
        .find_map(|l| l.strip_prefix("starting Postgres in "))
        .expect("data directory printed");
    let postmaster_pid: i32 = std::fs::read_to_string(format!("{data_dir}/postmaster.pid"))
        .expect("postmaster.pid while running")
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(postmaster_pid));

    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let (exited_tx, exited) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = exited_tx.send(child.wait());
    });
    let status = exited
        .recv_timeout(Duration::from_secs(60))
        .expect("sluice dev did not exit within 60 s of SIGINT")
        .expect("wait for sluice dev");
    assert!(status.success(), "sluice dev exited with {status}");
    for pid in runner_pids.iter().chain([&postmaster_pid]) {
        assert!(!alive(*pid), "process {pid} survived sluice dev");
    }
    let leftovers = processes_mentioning(&home.path().to_string_lossy());
    assert!(leftovers.is_empty(), "processes left behind: {leftovers:?}");
}

#[tokio::test]
async fn sluice_enqueue_wait_prints_the_output_and_exits_with_the_jobs_status() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _runner = scheduler.runner("cli-runner", 2).await;
    let run = |args: Vec<String>| {
        let api_url = scheduler.api_url.clone();
        let token = scheduler.api_token.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(bin("sluice"))
                .arg("enqueue")
                .args(args)
                .env("SLUICE_API_URL", api_url)
                .env("SLUICE_API_TOKEN", token)
                .output()
                .unwrap()
        })
    };

    let ok = run(vec![
        "--wait".into(),
        r#"{"kind":"bash","script":"uname -s"}"#.into(),
    ])
    .await
    .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "Linux\n");

    let failed = run(vec![
        "--wait".into(),
        "--max-attempts".into(),
        "1".into(),
        r#"{"kind":"bash","script":"echo out; echo err >&2; exit 7"}"#.into(),
    ])
    .await
    .unwrap();
    assert_eq!(failed.status.code(), Some(7), "{failed:?}");
    assert_eq!(String::from_utf8_lossy(&failed.stdout), "out\n");
    assert!(String::from_utf8_lossy(&failed.stderr).contains("err\n"));

    let no_wait = run(vec![r#"{"spec":{"kind":"noop"},"queue":"cli"}"#.into()])
        .await
        .unwrap();
    assert!(no_wait.status.success(), "{no_wait:?}");
    let created: serde_json::Value = serde_json::from_slice(&no_wait.stdout).unwrap();
    assert!(created["id"].is_i64(), "{created}");

    // Bad input: a clear message and a non-zero exit, nothing enqueued.
    let before = db.count("SELECT count(*) FROM sluice.jobs").await;
    for bad in ["not json", r#"{"kind":"python"}"#, "[1]"] {
        let out = run(vec![bad.into()]).await.unwrap();
        assert!(!out.status.success(), "{bad}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("error: "), "{bad}: {stderr}");
    }
    assert_eq!(db.count("SELECT count(*) FROM sluice.jobs").await, before);
}

#[tokio::test]
async fn workflows_runs_and_schedules_work_from_the_command_line() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _a = scheduler.runner("cli-wf-a", 2).await;
    let sluice = |args: &[&str]| {
        let api_url = scheduler.api_url.clone();
        let token = scheduler.api_token.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(bin("sluice"))
                .args(args)
                .env("SLUICE_API_URL", api_url)
                .env("SLUICE_API_TOKEN", token)
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let pipeline = examples.join("pipeline.yaml");
    let (code, out, err) = sluice(&["workflows", "apply", pipeline.to_str().unwrap()])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("workflow pipeline version "), "{out}");

    let (code, out, err) = sluice(&["run", "pipeline", "--wait"]).await.unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("10 even + 10 odd = 20"), "{out}");
    assert!(out.trim_end().ends_with("succeeded"), "{out}");

    // The combine step's artifacts, downloaded to a file and checked against their digest.
    let run_id: String = out
        .split("[run ")
        .nth(1)
        .unwrap_or_default()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let work = TempDir::new("cli-workflows");
    let tar_path = work.path().join("combine.tar");
    let (code, out, err) = sluice(&[
        "artifacts",
        &run_id,
        "combine",
        "-f",
        tar_path.to_str().unwrap(),
    ])
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(" bytes, sha256 "), "{out}");
    let listed = std::process::Command::new("tar")
        .arg("tf")
        .arg(&tar_path)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&listed.stdout), "out/all.txt\n");
    // A step without artifacts: a message, a non-zero exit, no file left.
    let missing = work.path().join("generate.tar");
    let (code, out, err) = sluice(&[
        "artifacts",
        &run_id,
        "evens-typo",
        "-f",
        missing.to_str().unwrap(),
    ])
    .await
    .unwrap();
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(err.contains("not found"), "{err}");
    assert!(!missing.exists());

    // A failing run exits non-zero and says which step failed.
    let failing = work.path().join("fails.yaml");
    std::fs::write(
        &failing,
        "steps:\n  - {id: boom, kind: bash, script: 'exit 3', max_attempts: 1}\n",
    )
    .unwrap();
    sluice(&["workflows", "apply", failing.to_str().unwrap()])
        .await
        .unwrap();
    let (code, out, _) = sluice(&["run", "fails", "--wait"]).await.unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("boom failed"), "{out}");

    // Schedules: set, list, get, pause, delete; bad ones are refused with the reason.
    let (code, out, err) = sluice(&[
        "schedules",
        "set",
        "nightly",
        "--cron",
        "0 3 * * *",
        "--timezone",
        "America/New_York",
        "--workflow",
        "pipeline",
        "--input",
        r#"{"n": 1}"#,
        "--overlap",
        "skip",
    ])
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("schedule nightly created"), "{out}");
    let (code, out, _) = sluice(&["schedules", "list"]).await.unwrap();
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("nightly\t0 3 * * *\tAmerica/New_York\tpipeline\tnext "),
        "{out}"
    );
    let (code, out, _) = sluice(&["schedules", "pause", "nightly"]).await.unwrap();
    assert_eq!(code, Some(0));
    let paused: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(paused["paused"], true);
    let (_, out, _) = sluice(&["schedules", "get", "nightly"]).await.unwrap();
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["input"], serde_json::json!({"n": 1}));
    assert_eq!(got["overlap"], "skip");
    let (code, out, _) = sluice(&["schedules", "delete", "nightly"]).await.unwrap();
    assert_eq!(code, Some(0), "{out}");
    let (code, _, err) = sluice(&["schedules", "get", "nightly"]).await.unwrap();
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: "), "{err}");
    for bad in [
        vec![
            "schedules",
            "set",
            "x",
            "--cron",
            "99 * * * *",
            "--workflow",
            "pipeline",
        ],
        vec![
            "schedules",
            "set",
            "x",
            "--cron",
            "* * * * *",
            "--workflow",
            "nope",
        ],
        vec![
            "schedules",
            "set",
            "x",
            "--cron",
            "* * * * *",
            "--workflow",
            "pipeline",
            "--input",
            "{",
        ],
    ] {
        let (code, out, err) = sluice(&bad).await.unwrap();
        assert_eq!(code, Some(1), "{bad:?}: {out}{err}");
        assert!(err.starts_with("error: "), "{bad:?}: {err}");
    }
    assert_eq!(db.count("SELECT count(*) FROM sluice.schedules").await, 0);
}
