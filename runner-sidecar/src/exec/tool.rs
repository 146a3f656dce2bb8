//! The tool executor: a `read_file`, `write_file`, `grep` or `web_fetch` call run in a
//! confined child — this binary re-executed (`sluice-runner __tool`, see `tools::child`)
//! through the same sandbox as a bash tool: own namespaces, the slot's uid, rlimits, a
//! cleared environment, the workspace as cwd — so a file tool reads and writes with the
//! tool user's rights only, and `web_fetch` connects as the tool user.
//!
//! The binary is executed from a descriptor opened at start (`execveat(AT_EMPTY_PATH)`), so
//! the tool user needs no search right on the directories holding it.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_protocol::{EventKind, FailureCode, Limits, Network, ToolName, ToolSpec};
use sluice_sandbox::{Sandbox, ToolCommand, ToolUser};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::{policy, stopped, Ended, Exec, StopReason};
use crate::tools::child::{ChildAnswer, ChildRequest, CHILD_ARG};
use crate::tools::{self, Policy, ToolError};

/// Runs `spec` (a confined tool; bash goes through `exec::bash`) to its answer, its timeout
/// or a stop.
pub async fn run(exec: Exec<'_>, spec: &ToolSpec) -> Ended {
    let Exec {
        sandbox,
        config,
        task,
        workspace,
        user,
        network,
        events,
        stop,
    } = exec;
    let name = tools::name_of(spec.tool);
    events
        .send(EventKind::Started, json!({ "tool": name }))
        .await;
    let mut stop_rx = stop.watch();
    let answer = call(
        sandbox,
        Call {
            tool: spec.tool,
            input: &spec.input,
            policy: &config.tool_policy,
            workspace,
            env: policy::tool_env(workspace, task.job_id, task.attempt, &BTreeMap::new()),
            limits: config.limits.clone(),
            user,
            network,
            timeout: policy::timeout_of(config, task, None),
            kill_grace: config.kill_grace,
        },
        &mut stop_rx,
    )
    .await;
    let answer = match answer {
        Answer::Answered(answer) => answer,
        Answer::Stopped(reason) => {
            if reason == StopReason::Shutdown {
                events
                    .send(EventKind::Exited, json!({ "tool": name, "ok": false }))
                    .await;
            }
            return Ended::Stopped {
                reason,
                output: json!({}),
            };
        }
    };
    events
        .send(
            EventKind::Exited,
            json!({ "tool": name, "ok": answer.is_ok() }),
        )
        .await;
    match answer {
        Ok(output) => Ended::succeeded(output),
        Err(err) => Ended::failed(
            json!({}),
            FailureCode::parse(&err.code),
            err.message,
            err.retryable,
        ),
    }
}

/// The binary confined calls execute: a descriptor opened once (before any tool ran) and
/// its path (the child's `argv[0]`, and the fallback where `execveat` is missing).
static BINARY: OnceLock<Option<(std::fs::File, String)>> = OnceLock::new();

fn binary() -> Option<&'static (std::fs::File, String)> {
    BINARY
        .get_or_init(|| {
            let file = std::fs::File::open("/proc/self/exe").ok()?;
            let path = std::env::current_exe()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "/proc/self/exe".into());
            Some((file, path))
        })
        .as_ref()
}

/// Opens this binary's descriptor now; the sidecar calls it at start.
pub fn prepare() {
    let _ = binary();
}

/// Makes confined calls execute `path` instead of this process's binary (for test harnesses
/// and benchmarks, which are not `sluice-runner`). Only the first call of the process counts.
pub fn use_binary(path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    let _ = BINARY.set(Some((file, path.to_string_lossy().into_owned())));
    Ok(())
}

/// Everything a confined call needs.
pub struct Call<'a> {
    pub tool: ToolName,
    pub input: &'a Value,
    pub policy: &'a Policy,
    pub workspace: &'a Path,
    pub env: std::collections::BTreeMap<String, String>,
    pub limits: Limits,
    pub user: Option<ToolUser>,
    pub network: Network,
    pub timeout: Duration,
    pub kill_grace: Duration,
}

/// How a confined call ended.
#[derive(Debug)]
pub enum Answer {
    Answered(Result<Value, ToolError>),
    /// Stopped from outside (lease lost, cancelled, shutdown): there is no answer.
    Stopped(StopReason),
}

/// Runs a call in a confined child and waits for its answer, its timeout or a stop.
pub async fn call(
    sandbox: &Sandbox,
    call: Call<'_>,
    stop: &mut watch::Receiver<Option<StopReason>>,
) -> Answer {
    let request = ChildRequest {
        tool: call.tool,
        input: call.input.clone(),
        policy: call.policy.clone(),
    };
    let Ok(request) = serde_json::to_vec(&request) else {
        return Answer::Answered(Err(ToolError::new(
            "invalid_input",
            "the input cannot be encoded",
        )));
    };
    let Some((file, program)) = binary() else {
        return Answer::Answered(Err(ToolError::new(
            "spawn_failed",
            "cannot open the runner's own binary for confined tools",
        )));
    };
    let command = ToolCommand {
        program,
        args: vec![CHILD_ARG.into()],
        workspace: call.workspace,
        env: call.env,
        limits: call.limits,
        user: call.user,
        stdin: true,
        exec_fd: Some(file.as_raw_fd()),
        pass_fd: None,
        network: call.network,
    };
    let spawning = std::time::Instant::now();
    let spawned = sandbox.spawn(&command);
    crate::metrics::METRICS.spawned(spawning.elapsed());
    let mut spawned = match spawned {
        Ok(spawned) => spawned,
        Err(err) => {
            return Answer::Answered(Err(ToolError::new(
                "spawn_failed",
                format!("cannot start the confined tool: {err}"),
            )
            .retryable()))
        }
    };
    let child = &mut spawned.child;
    let mut stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let cap = 4 * call.policy.max_read_bytes.max(call.policy.fetch_max_bytes) + (1 << 20);
    let feed = async move {
        if let Some(mut stdin) = stdin.take() {
            let _ = stdin.write_all(&request).await;
            let _ = stdin.shutdown().await;
        }
    };
    let read_out = async move {
        let mut out = Vec::new();
        if let Some(stdout) = stdout {
            let _ = stdout.take(cap).read_to_end(&mut out).await;
        }
        out
    };
    let read_err = async move {
        let mut err = Vec::new();
        if let Some(stderr) = stderr {
            let _ = stderr.take(64 * 1024).read_to_end(&mut err).await;
        }
        err
    };
    // The pipes close when the child exits (everything it started dies with its namespace).
    let io = async { tokio::join!(feed, read_out, read_err) };
    let outcome = tokio::select! {
        (_, out, err) = io => Some((out, err)),
        _ = tokio::time::sleep(call.timeout) => None,
        reason = stopped(stop) => {
            sluice_sandbox::stop(child, reason.kill_grace(call.kill_grace)).await;
            return Answer::Stopped(reason);
        }
    };
    let Some((out, err)) = outcome else {
        sluice_sandbox::stop(child, call.kill_grace).await;
        return Answer::Answered(Err(ToolError::new(
            "timed_out",
            format!("the tool ran longer than {} ms", call.timeout.as_millis()),
        )));
    };
    let status = match tokio::time::timeout(call.kill_grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            sluice_sandbox::stop(child, Duration::ZERO).await;
            child.wait().await
        }
    };
    match serde_json::from_slice::<ChildAnswer>(&out) {
        Ok(ChildAnswer::Output(value)) => Answer::Answered(Ok(value)),
        Ok(ChildAnswer::Error(err)) => Answer::Answered(Err(err)),
        Err(_) => {
            use std::os::unix::process::ExitStatusExt;
            let how = match status {
                Ok(status) => match (status.code(), status.signal()) {
                    (Some(code), _) => format!("exited with {code}"),
                    (_, Some(signal)) => format!("was killed by signal {signal}"),
                    _ => "ended".into(),
                },
                Err(e) => format!("could not be waited for: {e}"),
            };
            let stderr = String::from_utf8_lossy(&err);
            let tail: String = stderr
                .chars()
                .rev()
                .take(500)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Answer::Answered(Err(ToolError::new(
                "tool_crashed",
                format!(
                    "the confined tool {how} without an answer (resource limits?): {}",
                    tail.trim()
                ),
            )))
        }
    }
}
