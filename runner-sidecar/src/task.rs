//! Running one claimed task: dispatch on the spec's kind, fork the tool, stream its output in
//! ordered batches, and report the completion — or abandon the attempt when its lease is gone.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_protocol::{
    event_kind, parse_spec, BashSpec, ErrorDetail, Event, JobSpec, Outcome, StreamRequest,
    StreamResponse, Task, TaskCompletion, ToolName, ToolSpec,
};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};

use crate::client::{CallError, Client};
use crate::config::{Config, Secret};
use crate::outbox::{Delivery, Outbox};
use crate::output::{Budget, Tail};
use crate::process::{self, ToolCommand};
use crate::tools;

/// Why a running task is being stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The lease is gone (409, a heartbeat's order, or no renewal for too long).
    LeaseLost,
    /// The scheduler cancelled the job.
    Cancelled,
    /// The scheduler's deadline for the job passed.
    TimedOut,
    /// The sidecar is shutting down and the drain deadline passed.
    Shutdown,
}

/// What a task needs from the runner around it.
#[derive(Clone)]
pub struct TaskContext {
    pub config: Arc<Config>,
    pub client: Client,
    pub token: Secret,
    /// Turns true at the end of a drain: stop retrying POSTs.
    pub hard_stop: watch::Receiver<bool>,
    /// Where finished attempts' completions go.
    pub outbox: Arc<Outbox>,
}

/// Bytes of stdout and of stderr kept for the result.
const TAIL_BYTES: usize = 4096;
/// Largest chunk read from a pipe at once (and so the largest event).
const CHUNK_BYTES: usize = 16 * 1024;
/// Events per stream POST, bytes per stream POST, and how long the first event may wait.
const BATCH_EVENTS: usize = 256;
const BATCH_BYTES: usize = 64 * 1024;
const BATCH_DELAY: Duration = Duration::from_millis(20);
/// How long to keep reading pipes after the tool exited (an escaped child may hold them).
const PIPE_DRAIN: Duration = Duration::from_secs(1);

/// Runs a task until its tool has ended and queues its completion in the outbox. `stop`
/// carries a reason when the task must stop early. The slot is free once this returns; the
/// returned [`Completing`] waits for the scheduler's answer. `None` when the attempt was
/// abandoned.
pub async fn run(
    ctx: TaskContext,
    task: Task,
    stop: Arc<watch::Sender<Option<StopReason>>>,
) -> Option<Completing> {
    let started = Instant::now();
    let report = match parse_spec(&task.spec) {
        Err(err) => Some(Report::failed(
            json!({}),
            "invalid_spec",
            err.to_string(),
            false,
        )),
        Ok(JobSpec::Noop(_)) => Some(Report {
            outcome: Outcome::Succeeded,
            output: json!({}),
            error: None,
            retryable: true,
            final_seq: None,
        }),
        Ok(JobSpec::Bash(spec)) => run_bash(&ctx, &task, &spec, &stop).await,
        Ok(JobSpec::Tool(spec)) => run_tool(&ctx, &task, &spec, &stop).await,
        Ok(other) => Some(unsupported(other.kind())),
    };
    let Some(report) = report else {
        tracing::info!(job_id = %task.job_id, attempt = %task.attempt, "attempt abandoned");
        return None;
    };
    let answer = ctx.outbox.submit(TaskCompletion {
        job_id: task.job_id,
        attempt: task.attempt,
        lease_token: task.lease_token,
        outcome: report.outcome,
        output: report.output,
        error: report.error,
        retryable: report.retryable,
        final_seq: report.final_seq,
    });
    Some(Completing {
        task,
        started,
        answer,
    })
}

/// A completion on its way: the attempt's lease must be kept until the scheduler has it.
pub struct Completing {
    task: Task,
    started: Instant,
    answer: oneshot::Receiver<Delivery>,
}

impl Completing {
    /// Waits for the scheduler's answer and logs it.
    pub async fn delivered(self) {
        let task = &self.task;
        match self.answer.await {
            Ok(Delivery::Applied(state)) => tracing::debug!(
                job_id = %task.job_id,
                attempt = %task.attempt,
                state = %state,
                elapsed_ms = self.started.elapsed().as_millis() as u64,
                "attempt completed"
            ),
            Ok(Delivery::LeaseLost) => {
                tracing::warn!(job_id = %task.job_id, attempt = %task.attempt, "lease lost before completion")
            }
            Ok(Delivery::NotDelivered(why)) => {
                tracing::warn!(job_id = %task.job_id, attempt = %task.attempt, error = %why, "completion not delivered")
            }
            Err(_) => {
                tracing::warn!(job_id = %task.job_id, attempt = %task.attempt, "completion not delivered")
            }
        }
    }
}

/// Kinds this runner version cannot run yet: the later issues replace this.
fn unsupported(kind: &str) -> Report {
    Report::failed(
        json!({}),
        "unsupported_kind",
        format!("the {kind:?} kind is not supported by this runner version yet"),
        false,
    )
}

/// What the runner reports for an attempt.
struct Report {
    outcome: Outcome,
    output: Value,
    error: Option<ErrorDetail>,
    retryable: bool,
    final_seq: Option<i64>,
}

impl Report {
    fn failed(output: Value, code: &str, message: String, retryable: bool) -> Report {
        Report {
            outcome: Outcome::Failed,
            output,
            error: Some(ErrorDetail {
                code: code.into(),
                message,
            }),
            retryable,
            final_seq: None,
        }
    }
}

/// Sequences and sends a task's events in ordered batches, one POST in flight.
struct EventSender {
    tx: mpsc::Sender<Event>,
    next_seq: i64,
}

impl EventSender {
    /// Queues an event; `false` when the stream was refused (the lease is gone).
    async fn send(&mut self, kind: &str, data: Value) -> bool {
        let event = Event {
            seq: self.next_seq,
            kind: kind.to_string(),
            data,
        };
        self.next_seq += 1;
        self.tx.send(event).await.is_ok()
    }
}

async fn post_batches(
    ctx: TaskContext,
    task: Task,
    mut rx: mpsc::Receiver<Event>,
    stop: Arc<watch::Sender<Option<StopReason>>>,
) -> Result<Option<i64>, CallError> {
    let mut last_seq = None;
    let mut hard_stop = ctx.hard_stop.clone();
    let path = format!("/internal/tasks/{}/stream", task.job_id);
    loop {
        let Some(first) = rx.recv().await else {
            return Ok(last_seq);
        };
        let mut bytes = event_size(&first);
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        let mut closed = false;
        while batch.len() < BATCH_EVENTS && bytes < BATCH_BYTES {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(event) => {
                        bytes += event_size(&event);
                        batch.push(event);
                    }
                    None => {
                        closed = true;
                        break;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let request = StreamRequest {
            attempt: task.attempt,
            lease_token: task.lease_token,
            events: batch,
        };
        let result: Result<StreamResponse, CallError> = ctx
            .client
            .post_retrying(
                &path,
                &ctx.token,
                &request,
                Duration::from_secs(30),
                &mut hard_stop,
            )
            .await;
        if let Err(err) = result {
            if err.is_lease_lost() {
                stop.send_replace(Some(StopReason::LeaseLost));
            }
            return Err(err);
        }
        last_seq = request.events.last().map(|e| e.seq);
        if closed {
            return Ok(last_seq);
        }
    }
}

fn event_size(event: &Event) -> usize {
    match event.data.get("text").and_then(Value::as_str) {
        Some(text) => text.len() + 32,
        None => 64,
    }
}

fn workspace_of(config: &Config, task: &Task) -> PathBuf {
    config
        .workdir
        .join(format!("{}-{}", task.job_id, task.attempt))
}

/// A fresh, empty workspace for the attempt, owned by the tool user: the tool's own
/// workspace, and nothing else of the sidecar's, is writable for it.
fn prepare_workspace(config: &Config, task: &Task) -> Result<PathBuf, Report> {
    let workspace = workspace_of(config, task);
    let _ = std::fs::remove_dir_all(&workspace);
    let prepared = std::fs::create_dir_all(&workspace).and_then(|()| match config.tool_user {
        Some(user) => std::os::unix::fs::chown(&workspace, Some(user.uid), Some(user.gid)),
        None => Ok(()),
    });
    match prepared {
        Ok(()) => Ok(workspace),
        Err(err) => Err(Report::failed(
            json!({}),
            "spawn_failed",
            format!("cannot create the workspace: {err}"),
            true,
        )),
    }
}

/// Runs a `tool` spec: `bash` through the streaming path, the others in a confined child.
async fn run_tool(
    ctx: &TaskContext,
    task: &Task,
    spec: &ToolSpec,
    stop: &Arc<watch::Sender<Option<StopReason>>>,
) -> Option<Report> {
    if let Err(err) = tools::check_input(spec.tool, &spec.input) {
        return Some(Report::failed(json!({}), &err.code, err.message, false));
    }
    if spec.tool == ToolName::Bash {
        let input: tools::BashInput = match serde_json::from_value(spec.input.clone()) {
            Ok(input) => input,
            Err(err) => {
                let err = tools::ToolError::invalid_input(spec.tool, err);
                return Some(Report::failed(json!({}), &err.code, err.message, false));
            }
        };
        let bash = BashSpec {
            script: input.command,
            env: Default::default(),
            timeout_ms: input.timeout_ms,
            limits: None,
        };
        return run_bash(ctx, task, &bash, stop).await;
    }
    let config = &ctx.config;
    let workspace = match prepare_workspace(config, task) {
        Ok(workspace) => workspace,
        Err(report) => return Some(report),
    };
    let (tx, rx) = mpsc::channel(16);
    let batches = tokio::spawn(post_batches(ctx.clone(), task.clone(), rx, stop.clone()));
    let mut events = EventSender { tx, next_seq: 1 };
    let name = tools::name_of(spec.tool);
    events
        .send(event_kind::STARTED, json!({ "tool": name }))
        .await;
    let timeout = task
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(config.default_timeout);
    let mut stop_rx = stop.subscribe();
    let ended = tools::exec::call(
        tools::exec::Call {
            tool: spec.tool,
            input: &spec.input,
            policy: &config.tool_policy,
            workspace: &workspace,
            env: process::tool_env(
                &workspace,
                task.job_id.0,
                task.attempt.0,
                &Default::default(),
            ),
            limits: config.limits.clone(),
            user: config.tool_user,
            timeout,
            kill_grace: config.kill_grace,
        },
        &mut stop_rx,
    )
    .await;
    let _ = std::fs::remove_dir_all(&workspace);
    let answer = match ended {
        tools::exec::Ended::Stopped(StopReason::Shutdown) => Err(tools::ToolError::new(
            "runner_shutdown",
            "the runner shut down before the tool finished",
        )
        .retryable()),
        tools::exec::Ended::Stopped(_) => return None,
        tools::exec::Ended::Answered(answer) => answer,
    };
    events
        .send(
            event_kind::EXITED,
            json!({ "tool": name, "ok": answer.is_ok() }),
        )
        .await;
    drop(events);
    let final_seq = match batches.await.unwrap_or(Err(CallError::Shutdown)) {
        Ok(seq) => seq,
        Err(err) if err.is_lease_lost() => return None,
        Err(_) => None,
    };
    if stop.borrow().is_some_and(|r| r != StopReason::Shutdown) {
        return None;
    }
    let mut report = match answer {
        Ok(output) => Report {
            outcome: Outcome::Succeeded,
            output,
            error: None,
            retryable: true,
            final_seq: None,
        },
        Err(err) => Report::failed(json!({}), &err.code, err.message, err.retryable),
    };
    report.final_seq = final_seq;
    Some(report)
}

/// Runs a bash spec. `None` means the attempt was abandoned (lease gone, cancelled, timed out
/// by the server): there is nothing to report.
async fn run_bash(
    ctx: &TaskContext,
    task: &Task,
    spec: &BashSpec,
    stop: &Arc<watch::Sender<Option<StopReason>>>,
) -> Option<Report> {
    let config = &ctx.config;
    let started = Instant::now();
    let workspace = match prepare_workspace(config, task) {
        Ok(workspace) => workspace,
        Err(report) => return Some(report),
    };
    let env = process::tool_env(&workspace, task.job_id.0, task.attempt.0, &spec.env);
    let tool = ToolCommand {
        program: process::shell(),
        args: vec!["-c".into(), spec.script.clone()],
        workspace: &workspace,
        env,
        limits: process::tighter(&config.limits, &spec.limits.clone().unwrap_or_default()),
        user: config.tool_user,
        stdin: false,
        exec_fd: None,
    };
    let mut child = match process::spawn_tool(&tool) {
        Ok(child) => child,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&workspace);
            return Some(Report::failed(
                json!({}),
                "spawn_failed",
                format!("cannot start the tool: {err}"),
                true,
            ));
        }
    };
    let pid = child.id();
    let timeout = [spec.timeout_ms, task.timeout_ms]
        .into_iter()
        .flatten()
        .min()
        .map(Duration::from_millis)
        .unwrap_or(config.default_timeout);

    let (tx, rx) = mpsc::channel(1024);
    let batches = tokio::spawn(post_batches(ctx.clone(), task.clone(), rx, stop.clone()));
    let mut events = EventSender { tx, next_seq: 1 };
    events
        .send(event_kind::STARTED, json!({ "pid": pid }))
        .await;

    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out_buf = vec![0u8; CHUNK_BYTES];
    let mut err_buf = vec![0u8; CHUNK_BYTES];
    let mut budget = Budget::new(config.max_output_bytes);
    let mut stdout_tail = Tail::new(TAIL_BYTES);
    let mut stderr_tail = Tail::new(TAIL_BYTES);
    let mut truncated = false;
    let mut stop_rx = stop.subscribe();
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
            read = read_some(&mut stdout, &mut out_buf) => {
                let n = read;
                if n == 0 {
                    stdout = None;
                } else {
                    stdout_tail.push(&out_buf[..n]);
                    let kept = budget.take(n);
                    if kept > 0 && !events.send(event_kind::STDOUT, json!({"text": String::from_utf8_lossy(&out_buf[..kept])})).await {
                        stop.send_replace(Some(StopReason::LeaseLost));
                    }
                    if kept < n && !truncated {
                        truncated = true;
                        events.send(event_kind::TRUNCATED, json!({"stream": "stdout", "limit_bytes": budget.limit()})).await;
                    }
                }
            }
            read = read_some(&mut stderr, &mut err_buf) => {
                let n = read;
                if n == 0 {
                    stderr = None;
                } else {
                    stderr_tail.push(&err_buf[..n]);
                    let kept = budget.take(n);
                    if kept > 0 && !events.send(event_kind::STDERR, json!({"text": String::from_utf8_lossy(&err_buf[..kept])})).await {
                        stop.send_replace(Some(StopReason::LeaseLost));
                    }
                    if kept < n && !truncated {
                        truncated = true;
                        events.send(event_kind::TRUNCATED, json!({"stream": "stderr", "limit_bytes": budget.limit()})).await;
                    }
                }
            }
            exit = child.wait(), if status.is_none() => {
                status = Some(exit);
                // Background children die with the tool, and pipes they hold get a deadline.
                if let Some(pid) = pid {
                    process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                }
                pipes_deadline = Some(tokio::time::Instant::now() + PIPE_DRAIN);
            }
            _ = stop_rx.changed(), if stopped.is_none() && status.is_none() => {
                let reason = *stop_rx.borrow();
                if let Some(reason) = reason {
                    stopped = Some(reason);
                    process::stop(&mut child, config.kill_grace).await;
                }
            }
            _ = tokio::time::sleep_until(drain_deadline), if status.is_none() || pipes_deadline.is_some() => {
                if status.is_none() {
                    timed_out = true;
                    process::stop(&mut child, config.kill_grace).await;
                } else {
                    // An escaped process still holds the pipes: stop waiting for them.
                    stdout = None;
                    stderr = None;
                }
            }
        }
    }
    if let Some(pid) = pid {
        process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
    }
    let status = match status {
        Some(Ok(status)) => Some(status),
        _ => None,
    };
    use std::os::unix::process::ExitStatusExt;
    let exit_code = status.and_then(|s| s.code());
    let signal = status.and_then(|s| s.signal()).map(|n| {
        nix::sys::signal::Signal::try_from(n)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| n.to_string())
    });
    events
        .send(
            event_kind::EXITED,
            json!({"exit_code": exit_code, "signal": signal}),
        )
        .await;
    drop(events);
    let streamed = batches.await.unwrap_or(Err(CallError::Shutdown));
    let _ = std::fs::remove_dir_all(&workspace);

    let current = *stop.borrow();
    let externally_stopped = stopped.or(current);
    match externally_stopped {
        Some(StopReason::LeaseLost | StopReason::Cancelled | StopReason::TimedOut) => return None,
        Some(StopReason::Shutdown) | None => {}
    }
    let final_seq = match streamed {
        Ok(seq) => seq,
        Err(err) if err.is_lease_lost() => return None,
        // The events could not be delivered before shutdown; still report the result.
        Err(_) => None,
    };
    let output = json!({
        "exit_code": exit_code,
        "signal": signal,
        "stdout_tail": stdout_tail.text(),
        "stderr_tail": stderr_tail.text(),
        "truncated": truncated,
        "duration_ms": started.elapsed().as_millis() as u64,
    });
    let mut report = if stopped == Some(StopReason::Shutdown) {
        Report::failed(
            output,
            "runner_shutdown",
            "the runner shut down before the tool finished".into(),
            true,
        )
    } else if timed_out {
        Report::failed(
            output,
            "timed_out",
            format!("the tool ran longer than {} ms", timeout.as_millis()),
            false,
        )
    } else if exit_code == Some(0) {
        Report {
            outcome: Outcome::Succeeded,
            output,
            error: None,
            retryable: true,
            final_seq: None,
        }
    } else if let Some(code) = exit_code {
        Report::failed(
            output,
            "exit_code",
            format!("the script exited with {code}"),
            true,
        )
    } else {
        let name = signal.clone().unwrap_or_else(|| "unknown".into());
        Report::failed(
            output,
            "signal",
            format!("the script was killed by {name}"),
            true,
        )
    };
    report.final_seq = final_seq;
    Some(report)
}

/// Reads from a pipe if it is still open; pends forever once it is closed.
async fn read_some(pipe: &mut Option<impl tokio::io::AsyncRead + Unpin>, buf: &mut [u8]) -> usize {
    match pipe {
        Some(pipe) => pipe.read(buf).await.unwrap_or(0),
        None => std::future::pending().await,
    }
}
