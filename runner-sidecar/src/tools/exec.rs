//! A confined tool call: the sidecar re-executes its own binary (`sluice-runner __tool`)
//! through the same spawn path as a bash tool and hands it the call on stdin; the child runs
//! the tool with the tool user's rights in the workspace and prints one JSON answer.
//!
//! The binary is executed from a descriptor opened at start (`execveat(AT_EMPTY_PATH)`), so
//! the tool user needs no search right on the directories holding it.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_protocol::{Limits, Network, ToolName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::{Policy, ToolError};
use crate::process::{self, ToolCommand, ToolUser};
use crate::task::StopReason;

/// The first argument that makes `sluice-runner` a confined tool child.
pub const CHILD_ARG: &str = "__tool";
/// Largest request a child reads.
const MAX_REQUEST: u64 = 16 << 20;

/// What the sidecar sends a child.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildRequest {
    pub tool: ToolName,
    pub input: Value,
    pub policy: Policy,
}

/// What a child prints.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildAnswer {
    Output(Value),
    Error(ToolError),
}

/// The child's `main`: one request on stdin, one answer on stdout, exit 0 (a tool's own
/// failure is an answer too).
pub fn child_main() -> ExitCode {
    // RLIMIT_FSIZE then fails a write with EFBIG (reported) instead of killing the child.
    // SAFETY: setting a signal to SIG_IGN at start, before any thread exists.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGXFSZ,
            nix::sys::signal::SigHandler::SigIgn,
        );
    }
    let mut raw = Vec::new();
    let answer = match std::io::stdin().take(MAX_REQUEST).read_to_end(&mut raw) {
        Err(err) => ChildAnswer::Error(ToolError::new(
            "invalid_input",
            format!("reading the call: {err}"),
        )),
        Ok(_) => match serde_json::from_slice::<ChildRequest>(&raw) {
            Err(err) => {
                ChildAnswer::Error(ToolError::new("invalid_input", format!("the call: {err}")))
            }
            Ok(request) => match super::run_here(request.tool, &request.input, &request.policy) {
                Ok(output) => ChildAnswer::Output(output),
                Err(err) => ChildAnswer::Error(err),
            },
        },
    };
    let mut stdout = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut stdout, &answer)
        .and_then(|()| stdout.flush().map_err(serde_json::Error::io));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
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

/// Everything a confined call needs from the task.
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
pub enum Ended {
    Answered(Result<Value, ToolError>),
    /// Stopped from outside (lease lost, cancelled, shutdown): there is no answer.
    Stopped(StopReason),
}

/// Runs a call in a confined child and waits for its answer, its timeout or a stop.
pub async fn call(call: Call<'_>, stop: &mut watch::Receiver<Option<StopReason>>) -> Ended {
    let request = ChildRequest {
        tool: call.tool,
        input: call.input.clone(),
        policy: call.policy.clone(),
    };
    let Ok(request) = serde_json::to_vec(&request) else {
        return Ended::Answered(Err(ToolError::new(
            "invalid_input",
            "the input cannot be encoded",
        )));
    };
    let Some((file, program)) = binary() else {
        return Ended::Answered(Err(ToolError::new(
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
    let mut spawned = match process::spawn_tool(&command) {
        Ok(spawned) => spawned,
        Err(err) => {
            return Ended::Answered(Err(ToolError::new(
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
        reason = wait_stop(stop) => {
            process::stop(child, reason.kill_grace(call.kill_grace)).await;
            return Ended::Stopped(reason);
        }
    };
    let Some((out, err)) = outcome else {
        process::stop(child, call.kill_grace).await;
        return Ended::Answered(Err(ToolError::new(
            "timed_out",
            format!("the tool ran longer than {} ms", call.timeout.as_millis()),
        )));
    };
    let status = match tokio::time::timeout(call.kill_grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            process::stop(child, Duration::ZERO).await;
            child.wait().await
        }
    };
    match serde_json::from_slice::<ChildAnswer>(&out) {
        Ok(ChildAnswer::Output(value)) => Ended::Answered(Ok(value)),
        Ok(ChildAnswer::Error(err)) => Ended::Answered(Err(err)),
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
            Ended::Answered(Err(ToolError::new(
                "tool_crashed",
                format!(
                    "the confined tool {how} without an answer (resource limits?): {}",
                    tail.trim()
                ),
            )))
        }
    }
}

async fn wait_stop(stop: &mut watch::Receiver<Option<StopReason>>) -> StopReason {
    loop {
        if let Some(reason) = *stop.borrow_and_update() {
            return reason;
        }
        if stop.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
