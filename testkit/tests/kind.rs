//! The kind suite (issue 21): sluice as deployed by `task kind:up` (deploy/overlays/kind) on
//! a real cluster with gVisor. Runs when `SLUICE_KIND=1` and kubectl reaches a cluster;
//! otherwise every test says it is skipped and why. `task kind:test` runs it.
//!
//! It drives the cluster with kubectl (the test's own credentials) and the public API through
//! `kubectl port-forward`.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_testkit::{wait_until, Api};
use tokio::io::AsyncBufReadExt;

const RUNNERS: &str = "sluice-runners";

/// Why the suite cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    if std::env::var("SLUICE_KIND").as_deref() != Ok("1") {
        return Some("SLUICE_KIND=1 is not set (`task kind:up` then `task kind:test`)".into());
    }
    match Command::new("kubectl")
        .args(["get", "--raw", "/version"])
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "kubectl reaches no cluster: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(err) => Some(format!("kubectl is not installed: {err}")),
    }
}

macro_rules! kind_only {
    () => {
        if let Some(why) = unavailable() {
            eprintln!("skipped: the kind suite needs a cluster: {why}");
            return;
        }
    };
}

fn kubectl(args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .args(args)
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The pool's pods that are running.
fn running_pods() -> Vec<Value> {
    let list: Value = serde_json::from_str(&kubectl(&[
        "get",
        "pods",
        "-n",
        RUNNERS,
        "-l",
        "sluice.dev/pool=default",
        "-o",
        "json",
    ]))
    .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
        })
        .cloned()
        .collect()
}

/// The public API through a port-forward (kept open while the returned child lives).
async fn public_api() -> (Api, tokio::process::Child) {
    let mut child = tokio::process::Command::new("kubectl")
        .args(["port-forward", "-n", "sluice", "svc/sluice", ":7070"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl port-forward");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("port-forward within 30 s")
        .unwrap()
        .expect("a Forwarding line");
    // "Forwarding from 127.0.0.1:PORT -> 7070"
    let port = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a local port")
        .to_string();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let token = kubectl(&[
        "get",
        "secret",
        "-n",
        "sluice",
        "sluice",
        "-o",
        "jsonpath={.data.api-token}",
    ]);
    use base64::Engine;
    let token = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(token.trim())
            .unwrap(),
    )
    .unwrap();
    let api = Api {
        base: format!("http://127.0.0.1:{port}"),
        token,
        http: reqwest::Client::new(),
    };
    (api, child)
}

/// The pool warms `min_warm` (2) pods, each under gVisor: `runtimeClassName: gvisor`, and
/// the kernel inside says so.
#[tokio::test]
async fn the_pool_warms_gvisor_pods() {
    kind_only!();
    let pods = wait_until(
        "two running pool pods",
        Duration::from_secs(180),
        || async {
            let pods = running_pods();
            Ok((pods.len() >= 2).then_some(pods))
        },
    )
    .await;
    for pod in &pods {
        assert_eq!(pod["spec"]["runtimeClassName"], "gvisor", "{pod}");
        assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
        let name = pod["metadata"]["name"].as_str().unwrap();
        let dmesg = kubectl(&["exec", "-n", RUNNERS, name, "--", "dmesg"]);
        assert!(dmesg.contains("gVisor"), "{name}: {dmesg}");
    }
}

/// A job runs in a pool pod, and its tool sees gVisor's kernel.
#[tokio::test]
async fn a_job_runs_in_a_pod() {
    kind_only!();
    let (api, _forward) = public_api().await;
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "dmesg | head -3; echo done"}}))
        .await;
    let job = api.wait_terminal(id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let out = job["result"]["stdout_tail"].as_str().unwrap();
    assert!(out.contains("gVisor") && out.contains("done"), "{out}");
}

/// Deleting the pod running a job gets the job handed out again quickly, to another pod.
#[tokio::test]
async fn deleting_a_busy_pod_gets_its_job_reclaimed() {
    kind_only!();
    let (api, _forward) = public_api().await;
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": "sleep 300"}}))
        .await;
    let pod: String = wait_until("the job to run", Duration::from_secs(120), || async {
        let (_, job) = api.get(&format!("/api/jobs/{id}")).await;
        let Some(runner) = job["attempts"][0]["runner_id"].as_str().map(String::from) else {
            return Ok(None);
        };
        let (_, runners) = api.get("/api/runners").await;
        Ok(runners["runners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == runner.as_str())
            .and_then(|r| r["pod_name"].as_str().map(String::from)))
    })
    .await;
    kubectl(&[
        "delete",
        "pod",
        "-n",
        RUNNERS,
        &pod,
        "--grace-period=0",
        "--force",
        "--wait=false",
    ]);
    let started = tokio::time::Instant::now();
    wait_until("a second attempt", Duration::from_secs(60), || async {
        let (_, job) = api.get(&format!("/api/jobs/{id}")).await;
        Ok((job["attempt"].as_i64() == Some(2) && job["state"] == "running").then_some(()))
    })
    .await;
    eprintln!("reclaimed {:?} after the deletion", started.elapsed());
    let (status, _) = api
        .post(&format!("/api/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200);
}

/// A tool in a runner pod cannot reach Postgres (its own network namespace, and the
/// runners' NetworkPolicy).
#[tokio::test]
async fn a_tool_cannot_reach_postgres() {
    kind_only!();
    let (api, _forward) = public_api().await;
    let script = "if timeout 5 bash -c 'echo > /dev/tcp/postgres.sluice.svc.cluster.local/5432' 2>/dev/null; then echo REACHED; else echo BLOCKED; fi";
    let id = api
        .enqueue(json!({"spec": {"kind": "bash", "script": script}}))
        .await;
    let job = api.wait_terminal(id, Duration::from_secs(120)).await;
    let out = job["result"]["stdout_tail"].as_str().unwrap_or("");
    assert!(out.contains("BLOCKED") && !out.contains("REACHED"), "{job}");
}
