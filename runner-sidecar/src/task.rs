//! Running one claimed task: dispatch on the spec's kind, fork the tool, stream its output in
//! ordered batches, and report the completion — or abandon the attempt when its lease is gone.
//!
//! Output is bytes. A chunk that is UTF-8 without NUL goes as `{"text"}`; anything else (NUL,
//! invalid UTF-8, binary) as `{"text", "base64", "binary": true}`, where `base64` holds the
//! exact bytes and `text` a display form with U+FFFD for what is not text. Decoding `base64`
//! where present and taking `text` elsewhere gives back the output byte for byte. Every result
//! and event is scrubbed of NUL characters (Postgres stores none) before it is sent.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use sluice_protocol::{
    bounds, parse_stored_spec, paths, BashSpec, Completion, Event, EventKind, Failure, FailureCode,
    JobSpec, Network, Outcome, StreamRequest, StreamResponse, Task, ToolName, ToolSpec,
};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};

use crate::client::{CallError, Client};
use crate::config::{Config, Secret};
use crate::outbox::{Delivery, Outbox};
use crate::output::{Budget, Tail};
use crate::process::{self, ToolCommand, ToolUsage};
use crate::slots::Slot;
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
    /// The scheduler refused the attempt's events, or could not take them within the
    /// delivery budget: the attempt ends with that error instead of running unheard.
    StreamFailed,
}

impl StopReason {
    /// How long the tool gets between SIGTERM and SIGKILL: none when the lease is lost (the
    /// job may already be running elsewhere, and the self-fence's margin must cover the
    /// kill), the runner's grace otherwise.
    pub fn kill_grace(self, grace: Duration) -> Duration {
        match self {
            StopReason::LeaseLost => Duration::ZERO,
            _ => grace,
        }
    }

    /// Stops after which the attempt is abandoned: the scheduler has moved on, and nothing
    /// this attempt sends would be accepted.
    fn abandons(self) -> bool {
        matches!(
            self,
            StopReason::LeaseLost | StopReason::Cancelled | StopReason::TimedOut
        )
    }
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
    /// How long event batches are retried while the scheduler answers with errors a retry
    /// may fix.
    pub delivery_budget: Duration,
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
/// A failed tool that used this share of its memory limit ran out of memory.
const MEMORY_LIMIT_SHARE: f64 = 0.9;

/// Runs a task until its tool has ended and queues its completion in the outbox. `stop`
/// carries a reason when the task must stop early; the tools run as `slot`'s user. The slot
/// is free once this returns; the returned [`Completing`] waits for the scheduler's answer.
/// `None` when the attempt was abandoned.
pub async fn run(
    ctx: TaskContext,
    task: Task,
    stop: Arc<watch::Sender<Option<StopReason>>>,
    slot: Slot,
) -> Option<Completing> {
    let started = Instant::now();
    let report = match parse_stored_spec(&task.spec) {
        Err(err) => Some(Report::failed(
            json!({}),
            FailureCode::InvalidSpec,
            err.to_string(),
            false,
        )),
        Ok(JobSpec::Noop(_)) => Some(Report {
            outcome: Outcome::Succeeded,
            output: json!({}),
            error: None,
            retryable: true,
            final_seq: 0,
        }),
        Ok(JobSpec::Bash(spec)) => run_bash(&ctx, &task, &spec, &stop, slot).await,
        Ok(JobSpec::Tool(spec)) => run_tool(&ctx, &task, &spec, &stop, slot).await,
        Ok(other) => Some(unsupported(other.kind())),
    };
    let Some(report) = report else {
        tracing::info!(job_id = %task.job_id, attempt = %task.attempt, "attempt abandoned");
        return None;
    };
    let answer = ctx.outbox.submit(report.completion(&task));
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
        FailureCode::UnsupportedKind,
        format!("the {kind:?} kind is not supported by this runner version yet"),
        false,
    )
}

/// What the runner reports for an attempt.
struct Report {
    outcome: Outcome,
    output: Value,
    error: Option<Failure>,
    retryable: bool,
    /// The attempt's last event `seq` that reached the scheduler (0: none); later events
    /// of the attempt are refused.
    final_seq: i64,
}

impl Report {
    fn failed(output: Value, code: FailureCode, message: String, retryable: bool) -> Report {
        Report {
            outcome: Outcome::Failed,
            output,
            error: Some(Failure { code, message }),
            retryable,
            final_seq: 0,
        }
    }

    /// The completion to send, with every NUL character replaced (Postgres stores none).
    fn completion(self, task: &Task) -> Completion {
        let mut output = self.output;
        bounds::scrub_nul(&mut output);
        let error = self.error.map(|e| Failure {
            code: FailureCode::parse(&e.code.as_str().replace('\0', "\u{FFFD}")),
            message: e.message.replace('\0', "\u{FFFD}"),
        });
        Completion {
            job_id: Some(task.job_id),
            attempt: task.attempt,
            lease_token: task.lease_token,
            outcome: self.outcome,
            output,
            error,
            retryable: self.retryable,
            final_seq: Some(self.final_seq),
        }
    }
}

/// Sequences and sends a task's events in ordered batches, one POST in flight.
struct EventSender {
    tx: mpsc::Sender<Event>,
    next_seq: i64,
}

impl EventSender {
    /// Queues an event; `false` when the stream has ended (refused, or given up on: the
    /// sender has set the task's stop reason).
    async fn send(&mut self, kind: EventKind, mut data: Value) -> bool {
        bounds::scrub_nul(&mut data);
        let event = Event {
            seq: self.next_seq,
            kind,
            data,
        };
        self.next_seq += 1;
        self.tx.send(event).await.is_ok()
    }
}

/// How an attempt's stream ended.
struct Streamed {
    /// The last `seq` the scheduler stored (0: none).
    last_seq: i64,
    /// Why it ended early, if it did.
    error: Option<CallError>,
}

async fn post_batches(
    ctx: TaskContext,
    task: Task,
    mut rx: mpsc::Receiver<Event>,
    stop: Arc<watch::Sender<Option<StopReason>>>,
) -> Streamed {
    let mut last_seq = 0;
    let mut hard_stop = ctx.hard_stop.clone();
    let mut stopped = stop.subscribe();
    let path = paths::stream(task.job_id);
    loop {
        let Some(first) = rx.recv().await else {
            return Streamed {
                last_seq,
                error: None,
            };
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
        let post = ctx.client.post_retrying::<_, StreamResponse>(
            &path,
            &ctx.token,
            &request,
            Duration::from_secs(30),
            ctx.delivery_budget,
            &mut hard_stop,
        );
        // An abandoned attempt stops sending at once: nothing of it would be accepted.
        let result = tokio::select! {
            result = post => result,
            _ = stopped.wait_for(|r| r.is_some_and(StopReason::abandons)) => Err(CallError::Shutdown),
        };
        if let Err(err) = result {
            let reason = if err.is_lease_lost() {
                StopReason::LeaseLost
            } else {
                StopReason::StreamFailed
            };
            stop.send_if_modified(|current| {
                let unset = current.is_none();
                if unset {
                    *current = Some(reason);
                }
                unset
            });
            return Streamed {
                last_seq,
                error: Some(err),
            };
        }
        last_seq = request.events.last().map_or(last_seq, |e| e.seq);
        if closed {
            return Streamed {
                last_seq,
                error: None,
            };
        }
    }
}

fn event_size(event: &Event) -> usize {
    let field = |name: &str| {
        event
            .data
            .get(name)
            .and_then(Value::as_str)
            .map_or(0, str::len)
    };
    field("text") + field("base64") + 64
}

/// The failure a stream that ended early earns the attempt.
fn stream_failure(err: &CallError) -> (FailureCode, String, bool) {
    match err {
        CallError::Status { status, .. } if *status < 500 && *status != 429 => (
            FailureCode::EventsRefused,
            format!("the scheduler refused the attempt's events: {err}"),
            false,
        ),
        _ => (
            FailureCode::EventsUndeliverable,
            format!("the attempt's events could not be delivered: {err}"),
            true,
        ),
    }
}

/// Turns a pipe's bytes into event data: `{"text"}` while they are UTF-8 without NUL, else
/// `{"text", "base64", "binary": true}` (see the module doc). A character split between two
/// reads is held back until the next one, so text never turns binary by a chunk boundary.
#[derive(Default)]
struct OutputStream {
    carry: Vec<u8>,
    /// Something the stream carried was not text.
    binary: bool,
}

impl OutputStream {
    /// The data of the next event, or `None` when there is nothing to send yet. `at_end`
    /// flushes what was held back.
    fn event(&mut self, chunk: &[u8], at_end: bool) -> Option<Value> {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(chunk);
        if !at_end {
            let keep = incomplete_tail(&bytes);
            self.carry = bytes.split_off(bytes.len() - keep);
        }
        if bytes.is_empty() {
            return None;
        }
        match std::str::from_utf8(&bytes) {
            Ok(text) if !text.contains('\0') => Some(json!({ "text": text })),
            _ => {
                self.binary = true;
                let text = String::from_utf8_lossy(&bytes).replace('\0', "\u{FFFD}");
                Some(json!({
                    "text": text,
                    "base64": base64::engine::general_purpose::STANDARD.encode(&bytes),
                    "binary": true,
                }))
            }
        }
    }
}

/// How many bytes at the end of `bytes` start a UTF-8 character that is not complete yet.
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0xC0 == 0x80 {
            continue;
        }
        let needs = match byte {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0,
        };
        return if needs > back { back } else { 0 };
    }
    0
}

fn workspace_of(config: &Config, task: &Task) -> PathBuf {
    config
        .workdir
        .join(format!("{}-{}", task.job_id, task.attempt))
}

/// A fresh, empty workspace for the attempt, mode 0700 and owned by the slot's user: the
/// tool's own workspace, and nothing else of the sidecar's or another slot's, is reachable
/// for it.
fn prepare_workspace(config: &Config, task: &Task, slot: Slot) -> Result<PathBuf, Report> {
    use std::os::unix::fs::PermissionsExt;
    let workspace = workspace_of(config, task);
    let _ = std::fs::remove_dir_all(&workspace);
    let prepared = std::fs::create_dir_all(&workspace)
        .and_then(|()| std::fs::set_permissions(&workspace, std::fs::Permissions::from_mode(0o700)))
        .and_then(|()| match slot.user {
            Some(user) => std::os::unix::fs::chown(&workspace, Some(user.uid), Some(user.gid)),
            None => Ok(()),
        });
    match prepared {
        Ok(()) => Ok(workspace),
        Err(err) => Err(Report::failed(
            json!({}),
            FailureCode::SpawnFailed,
            format!("cannot create the workspace: {err}"),
            true,
        )),
    }
}

/// The network a tool gets, or the failure of a job that asked for none where this runner
/// cannot give it one (fails closed: never a network when none was asked for).
fn network_for(config: &Config, asked: Option<Network>) -> Result<Network, Report> {
    let network = asked.unwrap_or(config.network);
    if network == Network::None && !process::can_isolate_network() {
        return Err(Report::failed(
            json!({}),
            FailureCode::NetworkUnavailable,
            "the job asked for network \"none\", but this runner cannot create network namespaces (it must run as root or in gVisor)".into(),
            false,
        ));
    }
    Ok(network)
}

/// The wall timeout of a tool: the tightest of the spec's, the job's and the runner's
/// default, never beyond [`bounds::MAX_TIMEOUT_MS`] (so no deadline can overflow a clock).
fn timeout_of(config: &Config, task: &Task, spec_ms: Option<u64>) -> Duration {
    [spec_ms, task.timeout_ms]
        .into_iter()
        .flatten()
        .min()
        .map(Duration::from_millis)
        .unwrap_or(config.default_timeout)
        .min(Duration::from_millis(bounds::MAX_TIMEOUT_MS))
}

/// Runs a `tool` spec: `bash` through the streaming path, the others in a confined child.
async fn run_tool(
    ctx: &TaskContext,
    task: &Task,
    spec: &ToolSpec,
    stop: &Arc<watch::Sender<Option<StopReason>>>,
    slot: Slot,
) -> Option<Report> {
    if let Err(err) = tools::check_input(spec.tool, &spec.input) {
        return Some(Report::failed(
            json!({}),
            FailureCode::parse(&err.code),
            err.message,
            false,
        ));
    }
    if spec.tool == ToolName::Bash {
        let input: tools::BashInput = match serde_json::from_value(spec.input.clone()) {
            Ok(input) => input,
            Err(err) => {
                let err = tools::ToolError::invalid_input(spec.tool, err);
                return Some(Report::failed(
                    json!({}),
                    FailureCode::parse(&err.code),
                    err.message,
                    false,
                ));
            }
        };
        let bash = BashSpec {
            script: input.command,
            env: Default::default(),
            timeout_ms: input.timeout_ms,
            limits: None,
            network: spec.network,
        };
        return run_bash(ctx, task, &bash, stop, slot).await;
    }
    let config = &ctx.config;
    let network = match network_for(config, spec.network) {
        Ok(network) => network,
        Err(report) => return Some(report),
    };
    let workspace = match prepare_workspace(config, task, slot) {
        Ok(workspace) => workspace,
        Err(report) => return Some(report),
    };
    let (tx, rx) = mpsc::channel(16);
    let batches = tokio::spawn(post_batches(ctx.clone(), task.clone(), rx, stop.clone()));
    let mut events = EventSender { tx, next_seq: 1 };
    let name = tools::name_of(spec.tool);
    events
        .send(EventKind::Started, json!({ "tool": name }))
        .await;
    let timeout = timeout_of(config, task, None);
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
            user: slot.user,
            network,
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
        tools::exec::Ended::Stopped(StopReason::StreamFailed) => Ok(json!({})),
        tools::exec::Ended::Stopped(_) => return None,
        tools::exec::Ended::Answered(answer) => answer,
    };
    events
        .send(
            EventKind::Exited,
            json!({ "tool": name, "ok": answer.is_ok() }),
        )
        .await;
    drop(events);
    let streamed = batches.await.unwrap_or(Streamed {
        last_seq: 0,
        error: Some(CallError::Shutdown),
    });
    if stop.borrow().is_some_and(StopReason::abandons) {
        return None;
    }
    let mut report = match (&streamed.error, answer) {
        (Some(err), _) if !matches!(err, CallError::Shutdown) => {
            let (code, message, retryable) = stream_failure(err);
            Report::failed(json!({}), code, message, retryable)
        }
        (_, Ok(output)) => Report {
            outcome: Outcome::Succeeded,
            output,
            error: None,
            retryable: true,
            final_seq: 0,
        },
        (_, Err(err)) => Report::failed(
            json!({}),
            FailureCode::parse(&err.code),
            err.message,
            err.retryable,
        ),
    };
    report.final_seq = streamed.last_seq;
    Some(report)
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

/// Runs a bash spec. `None` means the attempt was abandoned (lease gone, cancelled, timed out
/// by the server): there is nothing to report.
async fn run_bash(
    ctx: &TaskContext,
    task: &Task,
    spec: &BashSpec,
    stop: &Arc<watch::Sender<Option<StopReason>>>,
    slot: Slot,
) -> Option<Report> {
    let config = &ctx.config;
    let started = Instant::now();
    let network = match network_for(config, spec.network) {
        Ok(network) => network,
        Err(report) => return Some(report),
    };
    let script = match script_file(&spec.script) {
        Ok(script) => script,
        Err(err) => {
            return Some(Report::failed(
                json!({}),
                FailureCode::SpawnFailed,
                format!("cannot hand the script to bash: {err}"),
                true,
            ))
        }
    };
    let workspace = match prepare_workspace(config, task, slot) {
        Ok(workspace) => workspace,
        Err(report) => return Some(report),
    };
    let env = process::tool_env(&workspace, task.job_id.0, task.attempt.0, &spec.env);
    let limits = process::tighter(&config.limits, &spec.limits.clone().unwrap_or_default());
    let tool = ToolCommand {
        program: process::shell(),
        args: vec![format!("/proc/self/fd/{}", script.as_raw_fd())],
        workspace: &workspace,
        env,
        limits: limits.clone(),
        user: slot.user,
        stdin: false,
        exec_fd: None,
        pass_fd: Some(script.as_raw_fd()),
        network,
    };
    let spawned = process::spawn_tool(&tool);
    // The tool holds its own copy now.
    drop(script);
    let mut spawned = match spawned {
        Ok(spawned) => spawned,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&workspace);
            return Some(Report::failed(
                json!({}),
                FailureCode::SpawnFailed,
                format!("cannot start the tool: {err}"),
                true,
            ));
        }
    };
    let child = &mut spawned.child;
    let pid = child.id();
    let timeout = timeout_of(config, task, spec.timeout_ms);

    let (tx, rx) = mpsc::channel(1024);
    let batches = tokio::spawn(post_batches(ctx.clone(), task.clone(), rx, stop.clone()));
    let mut events = EventSender { tx, next_seq: 1 };
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
                    process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                }
                pipes_deadline = Some(tokio::time::Instant::now() + PIPE_DRAIN);
            }
            _ = stop_rx.changed(), if stopped.is_none() && status.is_none() => {
                let reason = *stop_rx.borrow();
                if let Some(reason) = reason {
                    stopped = Some(reason);
                    process::stop(child, reason.kill_grace(config.kill_grace)).await;
                }
            }
            _ = tokio::time::sleep_until(drain_deadline), if status.is_none() || pipes_deadline.is_some() => {
                if status.is_none() {
                    timed_out = true;
                    process::stop(child, config.kill_grace).await;
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
    let usage = spawned.usage();
    let (exit_code, signal) = exit_of(status, usage);
    events
        .send(
            EventKind::Exited,
            json!({"exit_code": exit_code, "signal": signal}),
        )
        .await;
    drop(events);
    let streamed = batches.await.unwrap_or(Streamed {
        last_seq: 0,
        error: Some(CallError::Shutdown),
    });
    let _ = std::fs::remove_dir_all(&workspace);

    let externally_stopped = stopped.or(*stop.borrow());
    if externally_stopped.is_some_and(StopReason::abandons) {
        return None;
    }
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
    let mut report = match &streamed.error {
        // The events could not all be stored: the attempt ends with that, not as if it had
        // been heard (a shutdown still reports the tool's own end below).
        Some(err) if !matches!(err, CallError::Shutdown) => {
            let (code, message, retryable) = stream_failure(err);
            Report::failed(output, code, message, retryable)
        }
        _ if stopped == Some(StopReason::Shutdown) => Report::failed(
            output,
            FailureCode::RunnerShutdown,
            "the runner shut down before the tool finished".into(),
            true,
        ),
        _ if timed_out => Report::failed(
            output,
            FailureCode::TimedOut,
            format!("the tool ran longer than {} ms", timeout.as_millis()),
            false,
        ),
        _ if exit_code == Some(0) => Report {
            outcome: Outcome::Succeeded,
            output,
            error: None,
            retryable: true,
            final_seq: 0,
        },
        _ => {
            let (code, message, retryable) =
                failure_of(exit_code, signal.as_deref(), usage, &limits);
            Report::failed(output, code, message, retryable)
        }
    };
    report.final_seq = streamed.last_seq;
    Some(report)
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

    fn reassemble(events: &[Value]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            match e.get("base64").and_then(Value::as_str) {
                Some(b64) => out.extend(
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .unwrap(),
                ),
                None => out.extend(e["text"].as_str().unwrap().as_bytes()),
            }
        }
        out
    }

    #[test]
    fn output_round_trips_byte_for_byte_and_text_stays_text() {
        let bytes: Vec<u8> = "héllo wörld €\n".bytes().chain([0u8, 0xff, b'x']).collect();
        // Cut at every position, so characters split between reads.
        for cut in 0..bytes.len() {
            let mut stream = OutputStream::default();
            let mut events = Vec::new();
            events.extend(stream.event(&bytes[..cut], false));
            events.extend(stream.event(&bytes[cut..], false));
            events.extend(stream.event(&[], true));
            assert_eq!(reassemble(&events), bytes, "cut at {cut}");
            for e in &events {
                assert_eq!(bounds::nul_path(e), None, "{e}");
            }
            assert!(stream.binary);
        }
        let mut stream = OutputStream::default();
        let text = "€uro".as_bytes();
        let first = stream.event(&text[..2], false);
        assert_eq!(first, None, "half a character waits for the rest");
        let second = stream.event(&text[2..], false).unwrap();
        assert_eq!(second, json!({"text": "€uro"}));
        assert!(!stream.binary);
    }

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
