//! The `sluice` command line as scripts and people use it: `tail` following a job live and
//! exiting with its status, `jobs ls|show|cancel|retry` (and the bulk redrive), `queues`,
//! `--output json` everywhere, shell completions, and one clear line with a non-zero exit for
//! every mistake.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_testkit::{bin, wait_until, Scheduler, TestDb, Timings};

struct Cli {
    api_url: String,
    token: String,
}

/// What one `sluice` invocation did.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// A failure: non-zero exit, one line on stderr that starts with `error: `.
    fn assert_one_line_error(&self) {
        assert_ne!(self.code, Some(0), "{self:?}");
        assert!(self.stderr.starts_with("error: "), "{self:?}");
        assert_eq!(self.stderr.trim_end().lines().count(), 1, "{self:?}");
        assert!(self.stdout.is_empty(), "{self:?}");
    }
}

impl Cli {
    fn new(scheduler: &Scheduler) -> Cli {
        Cli {
            api_url: scheduler.api_url.clone(),
            token: scheduler.api_token.clone(),
        }
    }

    async fn run(&self, args: &[&str]) -> Ran {
        self.run_with(args, &[]).await
    }

    /// [`Cli::run`] with `env` set.
    async fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Ran {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (url, token) = (self.api_url.clone(), self.token.clone());
        tokio::task::spawn_blocking(move || {
            let out = Command::new(bin("sluice"))
                .args(args)
                .env_remove("SLUICE_OUTPUT")
                .envs(env)
                .env("SLUICE_API_URL", url)
                .env("SLUICE_API_TOKEN", token)
                .output()
                .unwrap();
            Ran {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        })
        .await
        .unwrap()
    }
}

#[tokio::test]
async fn tail_follows_a_job_live_and_exits_with_its_status() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _runner = scheduler.runner("cli-tail", 2).await;
    let api = scheduler.api();
    let cli = Cli::new(&scheduler);

    let job = api
        .enqueue(json!({"max_attempts": 1, "spec": {"kind": "bash",
            "script": "echo first; sleep 0.3; echo oops >&2; sleep 0.3; echo second; exit 3"}}))
        .await;
    let tail = cli.run(&["tail", &job.to_string()]).await;
    assert_eq!(tail.code, Some(3), "the tool's exit code: {tail:?}");
    let lines: Vec<&str> = tail.stdout.lines().collect();
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {lines:?}"))
    };
    assert!(
        at("first") < at("oops") && at("oops") < at("second"),
        "{lines:?}"
    );
    assert!(lines.last().unwrap().starts_with("failed"), "{lines:?}");
    assert!(!tail.stdout.contains("\x1b["), "no colours off a terminal");

    // JSON: one event per line, positions rising, the terminal event last.
    let tail = cli
        .run(&["tail", &format!("job:{job}"), "--output", "json"])
        .await;
    assert_eq!(tail.code, Some(3), "{tail:?}");
    let events: Vec<Value> = tail
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let ids: Vec<i64> = events.iter().filter_map(|e| e["id"].as_i64()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(events.last().unwrap()["event"], "failed");
    assert!(events
        .iter()
        .any(|e| e["event"] == "stderr" && e["data"]["data"]["text"] == "oops\n"));

    let ok = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "echo fine"}}))
        .await;
    let tail = cli.run(&["tail", &ok.to_string()]).await;
    assert_eq!(tail.code, Some(0), "{tail:?}");
    assert!(tail.stdout.contains("fine"), "{tail:?}");

    // A job cancelled while followed: exit 1.
    let long = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "sleep 60"}}))
        .await;
    let following = {
        let cli = Cli {
            api_url: cli.api_url.clone(),
            token: cli.token.clone(),
        };
        tokio::spawn(async move { cli.run(&["tail", &long.to_string()]).await })
    };
    wait_until("the job to run", Duration::from_secs(10), || {
        let api = api.clone();
        async move {
            let (_, job) = api
                .get(&sluice_protocol::api::paths::job(sluice_protocol::JobId(
                    long,
                )))
                .await;
            Ok::<_, String>((job["state"] == "running").then_some(()))
        }
    })
    .await;
    let cancelled = cli.run(&["jobs", "cancel", &long.to_string()]).await;
    assert_eq!(cancelled.code, Some(0), "{cancelled:?}");
    let tail = following.await.unwrap();
    assert_eq!(tail.code, Some(1), "{tail:?}");
    assert!(
        tail.stdout.lines().last().unwrap().starts_with("cancelled"),
        "{tail:?}"
    );

    // A workflow run: its steps' output, each line tagged with its step; `--run` spells it too.
    api.register_workflow(
        "tail-two",
        "steps:\n  - {id: first, kind: bash, script: \"echo one\"}\n  - {id: second, depends_on: [first], kind: bash, script: \"echo two\"}\n",
    )
    .await;
    let run = api.start_run(json!({"workflow": "tail-two"})).await;
    for args in [
        vec!["tail".to_string(), format!("run:{run}")],
        vec!["tail".into(), run.to_string(), "--run".into()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let tail = cli.run(&args).await;
        assert_eq!(tail.code, Some(0), "{tail:?}");
        assert!(tail.stdout.contains("[first] one"), "{tail:?}");
        assert!(tail.stdout.contains("[second] two"), "{tail:?}");
        assert!(
            tail.stdout.lines().last().unwrap().starts_with("succeeded"),
            "{tail:?}"
        );
    }

    for bad in ["0", "run:", "step:1", "abc", "run:-3"] {
        cli.run(&["tail", bad]).await.assert_one_line_error();
    }
    let missing = cli.run(&["tail", "987654321"]).await;
    missing.assert_one_line_error();
    assert!(missing.stderr.contains("not_found"), "{missing:?}");
}

#[tokio::test]
async fn jobs_and_queues_are_listed_shown_changed_and_redriven_in_bulk() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let _runner = scheduler.runner("cli-jobs", 4).await;
    let api = scheduler.api();
    let cli = Cli::new(&scheduler);

    let mut failed_a = Vec::new();
    for _ in 0..3 {
        failed_a.push(
            api.enqueue(json!({"queue": "qa", "max_attempts": 1,
                               "spec": {"kind": "bash", "script": "exit 1"}}))
                .await,
        );
    }
    let failed_b = api
        .enqueue(json!({"queue": "qb", "max_attempts": 1,
                        "spec": {"kind": "bash", "script": "exit 1"}}))
        .await;
    for id in failed_a.iter().chain([&failed_b]) {
        api.wait_terminal(*id, Duration::from_secs(20)).await;
    }

    let listed = cli
        .run(&["jobs", "ls", "--queue", "qa", "-o", "json"])
        .await;
    assert_eq!(listed.code, Some(0), "{listed:?}");
    let ids: Vec<i64> = listed.json()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    let mut newest_first = failed_a.clone();
    newest_first.reverse();
    assert_eq!(ids, newest_first);
    let limited = cli
        .run(&[
            "jobs", "ls", "--state", "failed", "--limit", "2", "--output", "json",
        ])
        .await;
    assert_eq!(limited.json()["jobs"].as_array().unwrap().len(), 2);
    let table = cli.run(&["jobs", "ls", "--queue", "qb"]).await;
    assert!(table.stdout.starts_with("ID\tSTATE\tQUEUE"), "{table:?}");
    assert!(
        table
            .stdout
            .contains(&format!("{failed_b}\tfailed\tqb\tbash")),
        "{table:?}"
    );

    let shown = cli
        .run(&["jobs", "show", &failed_b.to_string(), "-o", "json"])
        .await;
    assert_eq!(shown.json()["state"], "failed");
    assert_eq!(shown.json()["attempts"].as_array().unwrap().len(), 1);

    // Over the API, a body that names nothing is refused, never a redrive of everything.
    for nothing in [json!({}), json!([])] {
        let (status, body) = api
            .post(sluice_protocol::api::paths::JOBS_RETRY, &nothing)
            .await;
        assert_eq!(status, 400, "{nothing}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("all"),
            "{body}"
        );
    }
    // The bulk redrive: every failed job of qa, none of qb.
    let redriven = cli
        .run(&[
            "jobs", "retry", "--queue", "qa", "--state", "failed", "--since", "1h", "-o", "json",
        ])
        .await;
    assert_eq!(redriven.code, Some(0), "{redriven:?}");
    let mut retried: Vec<i64> = redriven.json()["retried"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    retried.sort_unstable();
    assert_eq!(retried, failed_a);
    for id in &failed_a {
        let job = api.wait_terminal(*id, Duration::from_secs(20)).await;
        assert_eq!(job["attempt"], 2, "retried once: {job}");
    }
    let (_, b) = api
        .get(&sluice_protocol::api::paths::job(sluice_protocol::JobId(
            failed_b,
        )))
        .await;
    assert_eq!(b["attempt"], 1, "another queue's job is left alone");
    // One job by id.
    let one = cli.run(&["jobs", "retry", &failed_b.to_string()]).await;
    assert_eq!(one.code, Some(0), "{one:?}");
    assert!(
        one.stdout.starts_with(&format!("job {failed_b} ")),
        "{one:?}"
    );

    // Queues.
    let paused = cli.run(&["queues", "pause", "qa", "-o", "json"]).await;
    assert_eq!(paused.json(), json!({"name": "qa", "paused": true}));
    let queues = cli.run(&["queues", "ls", "-o", "json"]).await;
    let qa = queues.json()["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "qa")
        .cloned()
        .unwrap();
    assert_eq!(qa["paused"], true);
    let resumed = cli.run(&["queues", "resume", "qa"]).await;
    assert_eq!(resumed.stdout, "queue qa resumed\n");

    // Mistakes: one line, a non-zero exit, nothing changed.
    for bad in [
        vec!["jobs", "retry"],
        vec!["jobs", "retry", "--state", "running", "--all"],
        vec!["jobs", "retry", "--since", "yesterday"],
        vec!["jobs", "ls", "--state", "sideways"],
        vec!["jobs", "ls", "--since", "99999999999999999999d"],
        vec!["jobs", "show", "987654321"],
        vec!["jobs", "cancel", "987654321"],
        vec!["queues", "pause", "bad name"],
        vec!["enqueue", "--delay", "soon", r#"{"kind":"noop"}"#],
    ] {
        cli.run(&bad).await.assert_one_line_error();
    }
    // Clap's own checks: exit 2, one line too.
    for bad in [
        vec!["jobs", "show", "99999999999999999999"],
        vec!["jobs", "show", "-3"],
        vec!["jobs", "frobnicate"],
        vec!["queues", "ls", "--output", "yaml"],
    ] {
        let out = cli.run(&bad).await;
        assert_eq!(out.code, Some(2), "{out:?}");
        out.assert_one_line_error();
    }
}

#[tokio::test]
async fn completions_and_json_output_are_there_for_scripts() {
    let db = TestDb::new().await;
    let scheduler = Scheduler::start(&db, Timings::TEST).await;
    let cli = Cli::new(&scheduler);
    for shell in ["bash", "zsh", "fish"] {
        let out = cli.run(&["completions", shell]).await;
        assert_eq!(out.code, Some(0), "{out:?}");
        assert!(
            out.stdout.contains("tail") && out.stdout.contains("retry"),
            "{shell}"
        );
    }
    assert_eq!(cli.run(&["completions", "cmd"]).await.code, Some(2));
    let delayed = cli
        .run(&[
            "enqueue",
            "--delay",
            "1h",
            "--idempotency-key",
            "k1",
            r#"{"kind":"noop"}"#,
        ])
        .await;
    assert_eq!(delayed.code, Some(0), "{delayed:?}");
    assert_eq!(delayed.json()["state"], "scheduled");
    let again = cli
        .run(&["enqueue", "--idempotency-key", "k1", r#"{"kind":"noop"}"#])
        .await;
    assert_eq!(
        again.json()["id"],
        delayed.json()["id"],
        "the key answers with the first job"
    );
    // Every flag also from the environment.
    let from_env = cli
        .run_with(
            &["enqueue", r#"{"kind":"noop"}"#],
            &[("SLUICE_QUEUE", "from-env"), ("SLUICE_PRIORITY", "7")],
        )
        .await;
    assert_eq!(from_env.code, Some(0), "{from_env:?}");
    let listed = cli
        .run_with(
            &["jobs", "ls"],
            &[("SLUICE_OUTPUT", "json"), ("SLUICE_QUEUE", "from-env")],
        )
        .await;
    let jobs = listed.json()["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 1, "{listed:?}");
    assert_eq!(jobs[0]["priority"], 7);
    for command in [
        vec!["runners", "ls", "-o", "json"],
        vec!["workflows", "list", "-o", "json"],
        vec!["schedules", "list", "-o", "json"],
    ] {
        let out = cli.run(&command).await;
        assert_eq!(out.code, Some(0), "{out:?}");
        assert!(out.json().is_object(), "{command:?}: {out:?}");
    }
}
