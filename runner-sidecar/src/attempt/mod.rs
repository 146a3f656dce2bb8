//! One claimed attempt, from its claim to its delivered completion, top to bottom in [`run`]:
//!
//! 1. what to run: the stored spec read by shape ([`Work`]); a spec this runner cannot run
//!    ends the attempt at once with the reason;
//! 2. where: the tool's network (a runner that cannot isolate one refuses `network: none`)
//!    and a fresh workspace ([`workspace`]);
//! 3. running it: the executor for its kind (`exec::bash`, `exec::tool`) with the attempt's
//!    event stream ([`stream`]) and stop signal;
//! 4. its end: the workspace wiped; an attempt stopped because the scheduler moved on (lease
//!    lost, cancelled, timed out) is abandoned — nothing it sends would be accepted;
//!    otherwise its [`Completion`] is queued in the outbox;
//! 5. the slot freed — after the completion is queued, so the claim that refills the slot
//!    carries it — and the lease kept in heartbeats until the scheduler has the completion.
//!
//! Every NUL character is scrubbed from what is sent (Postgres stores none): bytes that are
//! not text travel as base64 (see `exec::output`).

pub mod artifacts;
pub mod stream;
pub mod workspace;

use crate::metrics::{Outcome as AttemptEnd, METRICS};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_protocol::{
    bounds, parse_stored_spec, AgentSpec, BashSpec, Completion, Failure, FailureCode, JobSpec,
    Network, Outcome, SessionTurns, SessionTurnsResponse, Task, ToolName, ToolSpec,
};
use sluice_sandbox::Sandbox;
use tokio::sync::watch;

use crate::client::{CallError, Client};
use crate::config::{Config, Secret};
use crate::exec::{self, policy, Ended, Exec, Stop, StopReason};
use crate::leases::LeaseGuard;
use crate::outbox::{Delivery, Outbox};
use crate::slots::{Slot, SlotGuard};
use crate::tools;
use workspace::Workspace;

/// What every attempt of one registration shares.
pub struct AttemptContext {
    pub config: Arc<Config>,
    pub sandbox: Arc<Sandbox>,
    pub client: Client,
    /// The runner's token for this registration.
    pub token: Secret,
    /// Turns true at the end of a drain: stop retrying POSTs.
    pub hard_stop: watch::Receiver<bool>,
    /// Where finished attempts' completions go.
    pub outbox: Arc<Outbox>,
    /// How long event batches are retried while the scheduler answers with errors a retry
    /// may fix.
    pub delivery_budget: Duration,
}

/// Runs `task`'s attempt on `slot` until its completion is delivered (or the attempt is
/// abandoned); `stop` carries a reason when it must stop early, `lease` keeps it in the
/// heartbeats until the end.
pub async fn run(
    ctx: Arc<AttemptContext>,
    task: Task,
    stop: Stop,
    slot: SlotGuard,
    lease: LeaseGuard,
) {
    let started = Instant::now();
    METRICS.running(1);
    let performed = perform(&ctx, &task, &stop, slot.slot()).await;
    METRICS.running(-1);
    let Some(completion) = performed else {
        tracing::info!(job_id = %task.job_id, attempt = %task.attempt, "attempt abandoned");
        METRICS.attempt_ended(AttemptEnd::Abandoned);
        return;
    };
    // Queued before the slot is freed, so the claim that refills the slot carries it.
    let delivery = ctx.outbox.submit(completion);
    METRICS.outbox(1);
    drop(slot);
    // The lease stays listed until the scheduler has the completion; the next heartbeat
    // without it tells the scheduler the tool is gone.
    let delivered = delivery.await;
    METRICS.outbox(-1);
    METRICS.attempt_ended(match &delivered {
        Ok(Delivery::Applied(_)) => AttemptEnd::Completed,
        Ok(Delivery::LeaseLost) => AttemptEnd::LeaseLost,
        _ => AttemptEnd::NotDelivered,
    });
    match delivered {
        Ok(Delivery::Applied(state)) => tracing::debug!(
            job_id = %task.job_id,
            attempt = %task.attempt,
            state = %state,
            elapsed_ms = started.elapsed().as_millis() as u64,
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
    drop(lease);
}

/// Runs the attempt's work to its completion; `None` when the attempt is abandoned.
async fn perform(
    ctx: &Arc<AttemptContext>,
    task: &Task,
    stop: &Stop,
    slot: Slot,
) -> Option<Completion> {
    let config = &ctx.config;
    let work = match Work::of(&task.spec) {
        Ok(Work::Noop) => return Some(completion(task, Ended::succeeded(json!({})), 0)),
        Ok(work) => work,
        Err(refused) => return Some(completion(task, refused, 0)),
    };
    let Some(network) = policy::network_for(config, &ctx.sandbox, work.network()) else {
        let refused = Ended::failed(
            json!({}),
            FailureCode::NetworkUnavailable,
            "the job asked for network \"none\", but this runner cannot create network namespaces (it must run as root or in gVisor)",
            false,
        );
        return Some(completion(task, refused, 0));
    };
    let workspace = match Workspace::prepare(&config.workdir, task, slot.user).await {
        Ok(workspace) => workspace,
        Err(err) => {
            let failed = Ended::failed(
                json!({}),
                FailureCode::SpawnFailed,
                format!("cannot create the workspace: {err}"),
                true,
            );
            return Some(completion(task, failed, 0));
        }
    };
    // A workflow step's context, for the tool to read (`$SLUICE_CONTEXT`).
    if let Some(context) = &task.context {
        let bytes = serde_json::to_vec(context).unwrap_or_default();
        if let Err(err) = workspace
            .write_file(policy::CONTEXT_FILE, bytes, slot.user)
            .await
        {
            workspace.wipe().await;
            let failed = Ended::failed(
                json!({}),
                FailureCode::SpawnFailed,
                format!("cannot write the step's context: {err}"),
                true,
            );
            return Some(completion(task, failed, 0));
        }
    }
    // A workflow step's parents' artifacts, unpacked beneath the workspace.
    if let Some(failed) = unpack_inputs(ctx, task, &workspace, slot.user).await {
        workspace.wipe().await;
        return failed.map(|ended| completion(task, ended, 0));
    }
    // Stopped for good while the workspace was being made: nothing to run.
    if stop.reason().is_some_and(StopReason::abandons) {
        workspace.wipe().await;
        return None;
    }
    let (mut events, stream) = stream::start(ctx, task, stop);
    let exec = Exec {
        sandbox: &ctx.sandbox,
        config,
        task,
        workspace: workspace.path(),
        user: slot.user,
        network,
        events: &mut events,
        stop,
    };
    let ended = match &work {
        Work::Bash(spec) => exec::bash::run(exec, spec).await,
        Work::Tool(spec) => exec::tool::run(exec, spec).await,
        Work::Agent(spec) => {
            let agent = exec::agent::run(exec, spec, task.session.as_ref()).await;
            match (agent.new_turns, &task.session) {
                (Some(turns), Some(_)) => match keep_session_turns(ctx, task, turns).await {
                    Ok(()) => agent.ended,
                    Err(err) if err.is_lease_lost() => {
                        // Abandoned below, like any attempt whose lease is gone.
                        stop.order(StopReason::LeaseLost);
                        agent.ended
                    }
                    Err(err) => Ended::failed(
                        output_of(agent.ended),
                        FailureCode::SessionUnavailable,
                        format!("the session's new turns could not be handed over: {err}"),
                        true,
                    ),
                },
                _ => agent.ended,
            }
        }
        Work::Noop => Ended::succeeded(json!({})),
    };
    let streamed = stream.finish(events).await;
    // A succeeded step's artifacts, packed and sealed before its completion is sent.
    let ended = match (&ended, task.artifacts.as_ref()) {
        (Ended::Finished { failure: None, .. }, Some(artifacts))
            if !artifacts.collect.is_empty() && stop.reason().is_some() =>
        {
            // Stopped (a drain's deadline, or for good) after the tool succeeded: a step
            // whose files were not sealed is not done, whatever its tool said.
            Ended::failed(
                output_of(ended),
                FailureCode::RunnerShutdown,
                "the runner stopped before the step's artifacts were packed",
                true,
            )
        }
        (Ended::Finished { failure: None, .. }, Some(artifacts))
            if !artifacts.collect.is_empty() =>
        {
            match pack_and_upload(ctx, task, &workspace, slot.user, &artifacts.collect).await {
                Ok(()) => ended,
                Err(PackedEnd::Abandon) => {
                    workspace.wipe().await;
                    return None;
                }
                Err(PackedEnd::Failed(code, message, retryable)) => {
                    Ended::failed(output_of(ended), code, message, retryable)
                }
            }
        }
        _ => ended,
    };
    workspace.wipe().await;
    // The reason the executor acted on decides; else the one ordered meanwhile (a later
    // order, such as the drain's, does not turn an abandoned attempt into a failure).
    let decisive = match &ended {
        Ended::Stopped { reason, .. } => Some(*reason),
        Ended::Finished { .. } => stop.reason(),
    };
    if decisive.is_some_and(StopReason::abandons) {
        return None;
    }
    let ended = match (&streamed.error, ended) {
        // The events could not all be stored: the attempt ends with that, not as if it had
        // been heard (a shutdown still reports the tool's own end).
        (Some(err), ended) if !matches!(err, CallError::Shutdown) => {
            let (code, message, retryable) = stream_failure(err);
            Ended::failed(output_of(ended), code, message, retryable)
        }
        (
            _,
            Ended::Stopped {
                reason: StopReason::Shutdown,
                output,
            },
        ) => Ended::failed(
            output,
            FailureCode::RunnerShutdown,
            "the runner shut down before the tool finished",
            true,
        ),
        (_, Ended::Stopped { output, .. }) => Ended::failed(
            output,
            FailureCode::EventsUndeliverable,
            "the attempt was stopped: its events could not be delivered",
            true,
        ),
        (_, finished) => finished,
    };
    Some(completion(task, ended, streamed.last_seq))
}

/// Hands an agent attempt's new turns to the scheduler, which keeps them for its session
/// until the job succeeds.
async fn keep_session_turns(
    ctx: &Arc<AttemptContext>,
    task: &Task,
    messages: Vec<Value>,
) -> Result<(), CallError> {
    let mut messages = messages;
    sluice_protocol::cap_history(&mut messages, bounds::MAX_SESSION_TURNS_BYTES);
    let mut messages = Value::Array(messages);
    bounds::scrub_nul(&mut messages);
    let turns = SessionTurns {
        attempt: task.attempt,
        lease_token: task.lease_token,
        messages: match messages {
            Value::Array(messages) => messages,
            _ => Vec::new(),
        },
    };
    let mut stop = ctx.hard_stop.clone();
    let _: SessionTurnsResponse = ctx
        .client
        .post_retrying(
            &sluice_protocol::paths::session(task.job_id),
            &ctx.token,
            &turns,
            Duration::from_secs(60),
            ctx.delivery_budget,
            &mut stop,
        )
        .await?;
    Ok(())
}

/// Downloads and unpacks the parents' artifacts of a workflow step; `Some` when the attempt
/// ends there (`Some(None)`: abandoned, its lease gone). One `SLUICE_ARTIFACT_MAX_BYTES`
/// bounds what all parents' archives write together.
async fn unpack_inputs(
    ctx: &Arc<AttemptContext>,
    task: &Task,
    workspace: &Workspace,
    user: Option<sluice_sandbox::ToolUser>,
) -> Option<Option<Ended>> {
    let inputs = &task.artifacts.as_ref()?.inputs;
    let max = ctx.config.artifact_max_bytes;
    let mut left = max;
    let ended = |code: FailureCode, message: String, retryable: bool| {
        Some(Some(Ended::failed(json!({}), code, message, retryable)))
    };
    for set in inputs {
        let archive = artifacts::archive_path(&ctx.config.workdir, task, "input");
        let downloaded = artifacts::download(ctx, task, set, &archive, left).await;
        let result = match downloaded {
            Err(artifacts::InputError::Call(err)) if err.is_lease_lost() => Err(Some(None)),
            Err(artifacts::InputError::Call(err)) => Err(ended(
                FailureCode::ArtifactsUnavailable,
                format!(
                    "step {:?}'s artifacts could not be downloaded: {err}",
                    set.step
                ),
                true,
            )),
            Err(artifacts::InputError::Local(message)) => Err(ended(
                FailureCode::ArtifactsUnavailable,
                format!(
                    "step {:?}'s artifacts could not be stored here: {message}",
                    set.step
                ),
                true,
            )),
            Err(artifacts::InputError::Refused(message)) => {
                Err(ended(FailureCode::ArtifactRefused, message, false))
            }
            Ok(()) => {
                let (root, file) = (workspace.path().to_path_buf(), archive.clone());
                let unpacked = tokio::task::spawn_blocking(move || {
                    artifacts::unpack(&root, &file, left, user)
                })
                .await
                .unwrap_or_else(|e| Err(artifacts::UnpackError::Io(e.to_string())));
                match unpacked {
                    Ok((_, written)) => {
                        left -= written.min(left);
                        Ok(())
                    }
                    Err(artifacts::UnpackError::Refused(why)) => Err(ended(
                        FailureCode::ArtifactRefused,
                        format!("step {:?}'s artifacts were refused: {why}", set.step),
                        false,
                    )),
                    Err(artifacts::UnpackError::Io(why)) => Err(ended(
                        FailureCode::ArtifactsUnavailable,
                        format!(
                            "step {:?}'s artifacts could not be unpacked here: {why}",
                            set.step
                        ),
                        true,
                    )),
                }
            }
        };
        let _ = tokio::fs::remove_file(&archive).await;
        if let Err(end) = result {
            return end;
        }
    }
    None
}

/// How packing a step's artifacts ended the attempt, when it did.
enum PackedEnd {
    Abandon,
    Failed(FailureCode, String, bool),
}

/// Packs what the step's `artifacts` match, uploads it and seals it.
async fn pack_and_upload(
    ctx: &Arc<AttemptContext>,
    task: &Task,
    workspace: &Workspace,
    user: Option<sluice_sandbox::ToolUser>,
    patterns: &[String],
) -> Result<(), PackedEnd> {
    let archive = artifacts::archive_path(&ctx.config.workdir, task, "pack");
    let (root, file, patterns) = (
        workspace.path().to_path_buf(),
        archive.clone(),
        patterns.to_vec(),
    );
    let max = ctx.config.artifact_max_bytes;
    let owner = user.map(|u| u.uid);
    let packed =
        tokio::task::spawn_blocking(move || artifacts::pack(&root, &patterns, &file, max, owner))
            .await
            .unwrap_or_else(|e| Err(artifacts::PackError::Io(e.to_string())));
    let result = match packed {
        Err(artifacts::PackError::TooLarge(message)) => Err(PackedEnd::Failed(
            FailureCode::ArtifactsTooLarge,
            message,
            false,
        )),
        Err(artifacts::PackError::Io(message)) => Err(PackedEnd::Failed(
            FailureCode::ArtifactsUnavailable,
            format!("the step's artifacts could not be packed: {message}"),
            true,
        )),
        Ok(packed) => match artifacts::upload(ctx, task, &archive, &packed).await {
            Ok(()) => {
                tracing::debug!(job_id = %task.job_id, bytes = packed.bytes, entries = packed.entries, "artifacts sealed");
                Ok(())
            }
            Err(err) if err.is_lease_lost() => Err(PackedEnd::Abandon),
            Err(err) => Err(PackedEnd::Failed(
                FailureCode::ArtifactsUnavailable,
                format!("the step's artifacts could not be uploaded: {err}"),
                !matches!(err, CallError::Status { status, .. } if status < 500 && status != 429),
            )),
        },
    };
    let _ = tokio::fs::remove_file(&archive).await;
    result
}

/// What an attempt runs, read from its stored spec.
enum Work {
    Noop,
    Bash(BashSpec),
    /// An agent's tool-use loop.
    Agent(AgentSpec),
    /// A confined tool (a `bash` tool call runs as [`Work::Bash`]).
    Tool(ToolSpec),
}

impl Work {
    /// The work of `spec`, or the failure of a spec this runner cannot run (not retried:
    /// another attempt would fail the same way).
    fn of(spec: &Value) -> Result<Work, Ended> {
        let refused =
            |code: FailureCode, message: String| Ended::failed(json!({}), code, message, false);
        match parse_stored_spec(spec) {
            Err(err) => Err(refused(FailureCode::InvalidSpec, err.to_string())),
            Ok(JobSpec::Noop(_)) => Ok(Work::Noop),
            Ok(JobSpec::Bash(spec)) => Ok(Work::Bash(spec)),
            Ok(JobSpec::Tool(spec)) => {
                let input_error =
                    |err: tools::ToolError| refused(FailureCode::parse(&err.code), err.message);
                tools::check_input(spec.tool, &spec.input).map_err(input_error)?;
                if spec.tool != ToolName::Bash {
                    return Ok(Work::Tool(spec));
                }
                let input: tools::BashInput = serde_json::from_value(spec.input.clone())
                    .map_err(|err| input_error(tools::ToolError::invalid_input(spec.tool, err)))?;
                Ok(Work::Bash(BashSpec {
                    script: input.command,
                    env: Default::default(),
                    timeout_ms: input.timeout_ms,
                    limits: None,
                    network: spec.network,
                }))
            }
            Ok(JobSpec::Agent(spec)) => Ok(Work::Agent(spec)),
        }
    }

    /// The network its spec asks for.
    fn network(&self) -> Option<Network> {
        match self {
            Work::Noop | Work::Agent(_) => None,
            Work::Bash(spec) => spec.network,
            Work::Tool(spec) => spec.network,
        }
    }
}

/// The output an executor ended with.
fn output_of(ended: Ended) -> Value {
    match ended {
        Ended::Finished { output, .. } | Ended::Stopped { output, .. } => output,
    }
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

/// The attempt's completion, with every NUL character replaced (Postgres stores none).
/// `final_seq` is the last event `seq` that reached the scheduler (0: none): later events of
/// the attempt are refused.
fn completion(task: &Task, ended: Ended, final_seq: i64) -> Completion {
    let (outcome, mut output, error, retryable) = match ended {
        Ended::Finished {
            output,
            failure: None,
            retryable,
        } => (Outcome::Succeeded, output, None, retryable),
        Ended::Finished {
            output,
            failure: Some(failure),
            retryable,
        } => (Outcome::Failed, output, Some(failure), retryable),
        // Settled by `perform` before this; kept total.
        Ended::Stopped { output, .. } => (
            Outcome::Failed,
            output,
            Some(Failure {
                code: FailureCode::RunnerShutdown,
                message: "the attempt was stopped".into(),
            }),
            true,
        ),
    };
    bounds::scrub_nul(&mut output);
    let error = error.map(|e| Failure {
        code: FailureCode::parse(&e.code.as_str().replace('\0', "\u{FFFD}")),
        message: e.message.replace('\0', "\u{FFFD}"),
    });
    Completion {
        job_id: Some(task.job_id),
        attempt: task.attempt,
        lease_token: task.lease_token,
        outcome,
        output,
        error,
        retryable,
        final_seq: Some(final_seq),
    }
}
