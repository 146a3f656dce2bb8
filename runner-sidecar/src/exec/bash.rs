//! The bash executor: a script run by bash from a sealed memory file, its stdout and stderr
//! streamed as events (bounded by the runner's output cap, tails kept for the result), its
//! wall timeout kept, and its end — exit code, signal, resources used — turned into the
//! result, naming a resource limit it ran into.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use sluice_protocol::{BashSpec, EventKind, FailureCode};
use sluice_sandbox::{ToolCommand, ToolUsage};
use tokio::io::AsyncReadExt;

use super::output::{Budget, OutputStream, Tail};
use super::{policy, Ended, Exec, StopReason};

/// Bytes of stdout and of stderr kept for the result.
const TAIL_BYTES: usize = 4096;
/// Largest chunk read from a pipe at once (and so the largest event).
const CHUNK_BYTES: usize = 16 * 1024;
/// How long to keep reading pipes after the tool exited (an escaped child may hold them).
const PIPE_DRAIN: Duration = Duration::from_secs(1);
/// A failed tool that used this share of its memory limit ran out of memory.
const MEMORY_LIMIT_SHARE: f64 = 0.9;

/// Runs `spec` to its end, or until the attempt is stopped (then the tool's process group is
/// killed, after the grace its stop reason allows).
pub async fn run(exec: Exec<'_>, spec: &BashSpec) -> Ended {
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
    let started = Instant::now();
    let script = match script_file(&spec.script) {
        Ok(script) => script,
        Err(err) => {
            return Ended::failed(
                json!({}),
                FailureCode::SpawnFailed,
                format!("cannot hand the script to bash: {err}"),
                true,
            )
        }
    };
    let mut env = policy::tool_env(workspace, task.job_id, task.attempt, &spec.env);
    env.insert(
        "SLUICE_OUTPUT".into(),
        workspace
            .join(policy::OUTPUT_FILE)
            .to_string_lossy()
            .into_owned(),
    );
    if task.context.is_some() {
        env.insert(
            "SLUICE_CONTEXT".into(),
            workspace
                .join(policy::CONTEXT_FILE)
                .to_string_lossy()
                .into_owned(),
        );
    }
    let limits = policy::tighter(&config.limits, &spec.limits.clone().unwrap_or_default());
    let tool = ToolCommand {
        program: policy::shell(),
        args: vec![format!("/proc/self/fd/{}", script.as_raw_fd())],
        workspace,
        env,
        limits: limits.clone(),
        user,
        stdin: false,
        exec_fd: None,
        pass_fd: Some(script.as_raw_fd()),
        network,
    };
    let spawning = std::time::Instant::now();
    let spawned = sandbox.spawn(&tool);
    crate::metrics::METRICS.spawned(spawning.elapsed());
    // The tool holds its own copy now.
    drop(script);
    let mut spawned = match spawned {
        Ok(spawned) => spawned,
        Err(err) => {
            return Ended::failed(
                json!({}),
                FailureCode::SpawnFailed,
                format!("cannot start the tool: {err}"),
                true,
            )
        }
    };
    let child = &mut spawned.child;
    let pid = child.id();
    let timeout = policy::timeout_of(config, task, spec.timeout_ms);
    events.send(EventKind::Started, json!({ "pid": pid })).await;

    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out_buf = vec![0u8; CHUNK_BYTES];
    let mut err_buf = vec![0u8; CHUNK_BYTES];
    let mut budget = Budget::new(config.max_output_bytes);
    let mut stdout_tail = Tail::new(TAIL_BYTES);
    let mut stderr_tail = Tail::new(TAIL_BYTES);
    let mut out_stream = OutputStream::default();
    let mut err_stream = OutputStream::default();
    let mut truncated = false;
    let mut stop_rx = stop.watch();
    let mut stopped: Option<StopReason> = None;
    let mut timed_out = false;
    let mut status = None;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pipes_deadline: Option<tokio::time::Instant> = None;

    loop {
        if stdout.is_none() && stderr.is_none() && status.is_some() {
            break;
        }
        let drain_deadline = pipes_deadline.unwrap_or(deadline);
        tokio::select! {
            n = read_some(&mut stdout, &mut out_buf) => {
                if n == 0 {
                    stdout = None;
                }
                stdout_tail.push(&out_buf[..n]);
                let kept = budget.take(n);
                let cut = kept < n;
                if let Some(data) = out_stream.event(&out_buf[..kept], n == 0 || cut) {
                    events.send(EventKind::Stdout, data).await;
                }
                if cut && !truncated {
                    truncated = true;
                    events.send(EventKind::Truncated, json!({"stream": "stdout", "limit_bytes": budget.limit()})).await;
                }
            }
            n = read_some(&mut stderr, &mut err_buf) => {
                if n == 0 {
                    stderr = None;
                }
                stderr_tail.push(&err_buf[..n]);
                let kept = budget.take(n);
                let cut = kept < n;
                if let Some(data) = err_stream.event(&err_buf[..kept], n == 0 || cut) {
                    events.send(EventKind::Stderr, data).await;
                }
                if cut && !truncated {
                    truncated = true;
                    events.send(EventKind::Truncated, json!({"stream": "stderr", "limit_bytes": budget.limit()})).await;
                }
            }
            exit = child.wait(), if status.is_none() => {
                status = Some(exit);
                // Background children die with the tool, and pipes they hold get a deadline.
                if let Some(pid) = pid {
                    sluice_sandbox::signal_group(pid, Signal::SIGKILL);
                }
                pipes_deadline = Some(tokio::time::Instant::now() + PIPE_DRAIN);
            }
            _ = stop_rx.changed(), if stopped.is_none() && status.is_none() => {
                let reason = *stop_rx.borrow();
                if let Some(reason) = reason {
                    stopped = Some(reason);
                    sluice_sandbox::stop(child, reason.kill_grace(config.kill_grace)).await;
                }
            }
            _ = tokio::time::sleep_until(drain_deadline), if status.is_none() || pipes_deadline.is_some() => {
                if status.is_none() {
                    timed_out = true;
                    sluice_sandbox::stop(child, config.kill_grace).await;
                } else {
                    // An escaped process still holds the pipes: stop waiting for them.
                    stdout = None;
                    stderr = None;
                }
            }
        }
    }
    if let Some(pid) = pid {
        sluice_sandbox::signal_group(pid, Signal::SIGKILL);
    }
    let status = match status {
        Some(Ok(status)) => Some(status),
        _ => None,
    };
    let usage = spawned.usage();
    let (exit_code, signal) = exit_of(status, usage);
    events
        .send(
            EventKind::Exited,
            json!({"exit_code": exit_code, "signal": signal}),
        )
        .await;
    let mut output = json!({
        "exit_code": exit_code,
        "signal": signal,
        "stdout_tail": stdout_tail.text(),
        "stderr_tail": stderr_tail.text(),
        "truncated": truncated,
        "duration_ms": started.elapsed().as_millis() as u64,
    });
    if out_stream.binary || err_stream.binary {
        output["binary"] = json!(true);
    }
    if let Some(usage) = usage {
        output["max_rss_bytes"] = json!(usage.max_rss_bytes);
        output["cpu_ms"] = json!(usage.cpu_ms);
    }
    if let Some(reason) = stopped {
        return Ended::Stopped { reason, output };
    }
    // The document the script wrote to `$SLUICE_OUTPUT`, if it wrote one: the result's
    // `value`. One that cannot be read as JSON fails an attempt that would have succeeded.
    let value = output_value(workspace, config.tool_policy.force_path_walk).await;
    match value {
        Ok(Some(value)) => output["value"] = value,
        Ok(None) => {}
        Err(message) if exit_code == Some(0) && !timed_out => {
            return Ended::failed(output, FailureCode::InvalidOutput, message, false);
        }
        Err(_) => {}
    }
    if timed_out {
        return Ended::failed(
            output,
            FailureCode::TimedOut,
            format!("the tool ran longer than {} ms", timeout.as_millis()),
            false,
        );
    }
    if exit_code == Some(0) {
        return Ended::succeeded(output);
    }
    let (code, message, retryable) = failure_of(exit_code, signal.as_deref(), usage, &limits);
    Ended::failed(output, code, message, retryable)
}

/// Reads `$SLUICE_OUTPUT` beneath the workspace without following links (the tool wrote
/// it, and this process is root): `None` when there is none.
async fn output_value(workspace: &Path, force_walk: bool) -> Result<Option<Value>, String> {
    use sluice_sandbox::confine::{code, Access, Workspace};
    use std::io::Read;
    let root = workspace.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let workspace = Workspace::open(&root, force_walk).map_err(|e| e.to_string())?;
        let file = match workspace.open_file(policy::OUTPUT_FILE, Access::Read) {
            Ok(file) => file,
            Err(err) if err.code == code::NOT_FOUND => return Ok(None),
            Err(err) => return Err(format!("$SLUICE_OUTPUT cannot be read: {err}")),
        };
        let mut bytes = Vec::new();
        file.take(policy::MAX_OUTPUT_VALUE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("$SLUICE_OUTPUT cannot be read: {e}"))?;
        if bytes.len() as u64 > policy::MAX_OUTPUT_VALUE_BYTES {
            return Err(format!(
                "$SLUICE_OUTPUT is larger than {} bytes",
                policy::MAX_OUTPUT_VALUE_BYTES
            ));
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("$SLUICE_OUTPUT is not JSON: {e}"))
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// The script as a sealed memory file, handed to bash as `/proc/self/fd/<n>` instead of in
/// argv: a script of any size up to the spec's cap runs (argv stops at 128 KiB per string),
/// and other users cannot read it in `/proc/<pid>/cmdline`.
fn script_file(script: &str) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(
        "sluice-script",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, script.as_bytes())?;
    let fd = OwnedFd::from(file);
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(fd)
}

/// The exit code and signal name of a finished tool: from its keeper's report where there
/// is one (which tells a signal from an exit status of 128 + n), else from the process.
fn exit_of(
    status: Option<std::process::ExitStatus>,
    usage: Option<ToolUsage>,
) -> (Option<i32>, Option<String>) {
    use std::os::unix::process::ExitStatusExt;
    let name = |n: i32| {
        nix::sys::signal::Signal::try_from(n)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| n.to_string())
    };
    if let Some(signal) = usage.and_then(|u| u.signal) {
        return (None, Some(name(signal)));
    }
    let code = status.and_then(|s| s.code());
    let signal = status.and_then(|s| s.signal()).map(name);
    (code, signal)
}

/// The error of a tool that failed on its own: a resource limit it ran into where that is
/// clear (not retried: another attempt runs into it again), else its exit code or signal.
fn failure_of(
    exit_code: Option<i32>,
    signal: Option<&str>,
    usage: Option<ToolUsage>,
    limits: &sluice_protocol::Limits,
) -> (FailureCode, String, bool) {
    const SIGXCPU: i32 = 128 + 24;
    const SIGXFSZ: i32 = 128 + 25;
    if signal == Some("SIGXCPU") || (signal.is_none() && exit_code == Some(SIGXCPU)) {
        return (
            FailureCode::CpuLimit,
            format!(
                "the tool used up its CPU time limit of {} s",
                limits.cpu_seconds.unwrap_or_default()
            ),
            false,
        );
    }
    if signal == Some("SIGXFSZ") || (signal.is_none() && exit_code == Some(SIGXFSZ)) {
        return (
            FailureCode::FileSizeLimit,
            format!(
                "the tool wrote past its file size limit of {} bytes",
                limits.file_size_bytes.unwrap_or_default()
            ),
            false,
        );
    }
    if let (Some(usage), Some(limit)) = (usage, limits.memory_bytes) {
        // A reading, not a certainty (a tool may fail for another reason near its limit):
        // retried like any other failure.
        if usage.max_rss_bytes as f64 >= limit as f64 * MEMORY_LIMIT_SHARE {
            return (
                FailureCode::MemoryLimit,
                format!(
                    "the tool failed at {} MiB of its {} MiB memory limit (it probably ran out of memory)",
                    usage.max_rss_bytes >> 20,
                    limit >> 20
                ),
                true,
            );
        }
    }
    match (exit_code, signal) {
        (Some(code), _) => (
            FailureCode::ExitCode,
            format!("the script exited with {code}"),
            true,
        ),
        (None, name) => (
            FailureCode::Signal,
            format!(
                "the script was killed by {}",
                name.unwrap_or("an unknown signal")
            ),
            true,
        ),
    }
}

/// Reads from a pipe if it is still open; pends forever once it is closed.
async fn read_some(pipe: &mut Option<impl tokio::io::AsyncRead + Unpin>, buf: &mut [u8]) -> usize {
    match pipe {
        Some(pipe) => pipe.read(buf).await.unwrap_or(0),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_limit_is_named_when_it_is_clear() {
        let limits = sluice_protocol::Limits {
            memory_bytes: Some(100 << 20),
            cpu_seconds: Some(1),
            ..Default::default()
        };
        let usage = |mib: u64| {
            Some(ToolUsage {
                signal: None,
                max_rss_bytes: mib << 20,
                cpu_ms: 0,
            })
        };
        assert_eq!(
            failure_of(Some(1), None, usage(95), &limits).0,
            FailureCode::MemoryLimit
        );
        assert_eq!(
            failure_of(Some(1), None, usage(10), &limits).0,
            FailureCode::ExitCode
        );
        assert_eq!(
            failure_of(None, Some("SIGXCPU"), None, &limits).0,
            FailureCode::CpuLimit
        );
        assert_eq!(
            failure_of(Some(153), None, None, &limits).0,
            FailureCode::FileSizeLimit
        );
        assert_eq!(
            failure_of(None, Some("SIGKILL"), None, &limits).0,
            FailureCode::Signal
        );
    }
}
