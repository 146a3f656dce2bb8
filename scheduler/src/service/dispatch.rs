//! Handing work to runners and taking its results back: the claim long-poll and the
//! completions (one, a batch, or carried on a claim).
//!
//! A claim leases up to `max` jobs at once or waits, between short statements, for a
//! notification (NOTIFY on insert, promotion and reclaim) or the poll interval, up to its
//! `wait_ms`; no transaction or connection is held while it waits. A claim carrying
//! completions applies them and claims in one statement and answers at once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_protocol::{
    bounds, ArtifactSet, Attempt, ClaimRequest, ClaimResponse, CompleteManyRequest,
    CompleteManyResponse, CompleteResponse, Completion, CompletionResult, ErrorDetail, JobId,
    JobState, Outcome, Task, TaskArtifacts,
};
use tokio::time::Instant;

use super::{lifecycle, sessions, workflows, Context};
use crate::store::runners::RunnerIdentity;
use crate::store::{artifacts, jobs, runners, runs};
use crate::{Error, Result};

/// Most tasks one claim may take.
pub const MAX_CLAIM: u32 = 1000;
/// Most completions one request may carry.
pub const MAX_COMPLETIONS: usize = 1000;

/// Leases up to `request.max` tasks to `runner`, applying the completions the request
/// carries first (in the same statement); waits up to `wait_ms` (capped by the configuration)
/// when there is nothing to lease and nothing was carried.
pub async fn claim(
    ctx: &Context,
    runner: &RunnerIdentity,
    request: &ClaimRequest,
) -> Result<ClaimResponse> {
    if request.max == 0 || request.max > MAX_CLAIM {
        return Err(Error::invalid(
            "max",
            format!("must be between 1 and {MAX_CLAIM}"),
        ));
    }
    check_completions(&request.complete)?;
    let config = &ctx.config;
    // A claim that carries completions answers at once: their results must not wait.
    let wait = if request.complete.is_empty() {
        Duration::from_millis(request.wait_ms).min(config.max_claim_wait)
    } else {
        Duration::ZERO
    };
    let deadline = Instant::now() + wait;
    let mut wake = ctx.wake.subscribe();
    let mut shutdown = ctx.shutdown.clone();
    let mut carried = Some(&request.complete);
    let mut completed = Vec::new();
    let mut next_drain_check = Instant::now();
    loop {
        // Mark the current wake-up as seen before looking, so a job inserted between the
        // claim and the wait still wakes us.
        wake.borrow_and_update();
        let started = Instant::now();
        let mut claimed = match carried.take().filter(|c| !c.is_empty()) {
            Some(items) => {
                let (results, claimed, ended) = jobs::complete_and_claim(
                    &ctx.pool,
                    runner.id,
                    &lifecycle::store_completions(runner.id, items),
                    request.max as i32,
                    config.timings.lease,
                )
                .await?;
                completed = completion_results(runner, items, results)?;
                observe_ended(ctx, &ended, items.iter().filter_map(|c| c.job_id));
                claimed
            }
            None => {
                jobs::claim_available(
                    &ctx.pool,
                    runner.id,
                    request.max as i32,
                    config.timings.lease,
                )
                .await?
            }
        };
        let room = request.max as usize - claimed.len();
        if room > 0 && ctx.capped_queues.load(Ordering::Relaxed) {
            claimed.extend(
                jobs::claim_capped(&ctx.pool, runner.id, room as i32, config.timings.lease).await?,
            );
        }
        let now = Instant::now();
        ctx.metrics.claimed(
            now - started,
            claimed
                .iter()
                .map(|job| (job.queue.as_str(), job.waited_seconds)),
        );
        if !claimed.is_empty() || now >= deadline || *shutdown.borrow() {
            // Workflow steps: their contexts, stored once per step.
            // Once per step, however many of its for_each jobs were claimed.
            let mut steps: Vec<(i64, String)> =
                claimed.iter().filter_map(|job| job.step.clone()).collect();
            steps.sort_unstable();
            steps.dedup();
            let views = if steps.is_empty() {
                Default::default()
            } else {
                StepViews {
                    steps: runs::step_contexts(&ctx.pool, &steps).await?,
                    inputs: artifacts::step_inputs(&ctx.pool, &steps).await?,
                }
            };
            let mut tasks = Vec::with_capacity(claimed.len());
            for job in claimed {
                if let Some(task) = task_of(ctx, runner, job, &views).await? {
                    tasks.push(task);
                }
            }
            // Every job claimed was put back (its session busy) or failed at once: nothing
            // to hand out, so the long-poll goes on waiting rather than answer empty at once
            // (the runner would claim again straight away).
            if !tasks.is_empty() || now >= deadline || *shutdown.borrow() {
                return Ok(ClaimResponse { tasks, completed });
            }
        }
        // A runner ordered to drain is leased nothing: answer now rather than at the end
        // of the long-poll, so it hears the order, finishes and exits (looked up at most
        // once per poll interval, not on every wake-up).
        if now >= next_drain_check {
            next_drain_check = now + config.claim_poll_interval;
            if runners::is_draining(&ctx.pool, runner.id).await? {
                return Ok(ClaimResponse {
                    tasks: Vec::new(),
                    completed,
                });
            }
        }
        let poll = (now + config.claim_poll_interval).min(deadline);
        tokio::select! {
            _ = wake.changed() => {}
            _ = tokio::time::sleep_until(poll) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// The task a claimed job becomes: a workflow step's templates filled from its context. A
/// step whose templates do not resolve fails at once (`template_error`, not retried: another
/// attempt would read the same context) and is not handed out.
async fn task_of(
    ctx: &Context,
    runner: &RunnerIdentity,
    mut job: jobs::ClaimedJob,
    views: &StepViews,
) -> Result<Option<Task>> {
    // A step's context, with a for_each job's own item and index.
    let context = job.step.as_ref().map(|key| {
        let mut context = views
            .steps
            .get(key)
            .and_then(|view| view.context.clone())
            .unwrap_or_else(|| serde_json::json!({}));
        if let (Some(own), Some(all)) = (
            job.context.as_ref().and_then(|c| c.as_object()),
            context.as_object_mut(),
        ) {
            all.extend(own.clone());
        }
        context
    });
    let spec = match &context {
        None => std::mem::take(&mut job.spec),
        Some(context) => match workflows::template::render(&job.spec, context) {
            Ok(spec) => spec,
            Err(message) => {
                tracing::info!(job_id = %job.id, %message, "a step's template does not resolve");
                fail_claimed(ctx, runner, &job, "template_error", message).await?;
                return Ok(None);
            }
        },
    };
    // An agent step's session: held by one attempt at a time.
    let session = match agent_session(&spec) {
        None => None,
        Some(Err(message)) => {
            fail_claimed(ctx, runner, &job, "invalid_spec", message).await?;
            return Ok(None);
        }
        Some(Ok(name)) => {
            match sessions::hand_over(ctx, &name, job.id, job.attempt, job.lease_token).await {
                Ok(sessions::HandOver::Held(session)) => Some(session),
                Ok(sessions::HandOver::Postponed) => return Ok(None),
                // This job alone is not handed out (the claim's other tasks are): put back if
                // the database lets us, else its lease runs out and it is claimed again.
                Err(err) => {
                    tracing::warn!(job_id = %job.id, error = %err, "session hand-over failed; the job waits");
                    let _ = sessions::put_back(ctx, &job).await;
                    return Ok(None);
                }
            }
        }
    };
    Ok(Some(Task {
        job_id: job.id,
        attempt: job.attempt,
        lease_token: job.lease_token,
        queue: job.queue,
        spec,
        timeout_ms: job.timeout_ms.map(|ms| ms as u64),
        context,
        artifacts: job.step.as_ref().and_then(|key| views.artifacts(key)),
        session,
    }))
}

/// The session an agent spec names, checked (a spec stored with plain SQL, or filled from a
/// template, was not checked at enqueue).
fn agent_session(spec: &serde_json::Value) -> Option<std::result::Result<String, String>> {
    if spec.get("kind").and_then(|k| k.as_str()) != Some("agent") {
        return None;
    }
    match spec.get("session")? {
        serde_json::Value::Null => None,
        serde_json::Value::String(name) => Some(
            bounds::check_session_name(name)
                .map(|()| name.clone())
                .map_err(|reason| format!("spec.session {reason}")),
        ),
        _ => Some(Err("spec.session must be a string".into())),
    }
}

/// Ends a claimed attempt at once as failed with `code` (not retried: another attempt would
/// read the same spec), without handing it out.
async fn fail_claimed(
    ctx: &Context,
    runner: &RunnerIdentity,
    job: &jobs::ClaimedJob,
    code: &str,
    message: String,
) -> Result<()> {
    let error = serde_json::json!({"code": code, "message": message});
    let output = serde_json::json!({});
    jobs::complete_if_leased(
        &ctx.pool,
        jobs::Completion {
            runner: runner.id,
            job: job.id,
            attempt: job.attempt,
            lease_token: job.lease_token,
            outcome: Outcome::Failed,
            output: &output,
            error: Some(error),
            retryable: false,
            final_seq: Some(0),
            retry_jitter: 1.0,
        },
    )
    .await?;
    Ok(())
}

/// The claimed steps' contexts, artifact globs and parents' artifacts.
#[derive(Default)]
struct StepViews {
    steps: HashMap<(i64, String), runs::StepView>,
    inputs: HashMap<(i64, String), Vec<(String, artifacts::SetRow)>>,
}

impl StepViews {
    /// What a step's attempt packs and unpacks; `None` when neither.
    fn artifacts(&self, key: &(i64, String)) -> Option<TaskArtifacts> {
        let collect = self
            .steps
            .get(key)
            .map(|view| view.collect.clone())
            .unwrap_or_default();
        let inputs: Vec<ArtifactSet> = self
            .inputs
            .get(key)
            .into_iter()
            .flatten()
            .map(
                |(step, (job, attempt, chunks, bytes, sha256))| ArtifactSet {
                    step: step.clone(),
                    job_id: JobId(*job),
                    attempt: Attempt(*attempt),
                    chunks: *chunks as u32,
                    bytes: *bytes as u64,
                    sha256: sha256.clone(),
                },
            )
            .collect();
        (!collect.is_empty() || !inputs.is_empty()).then_some(TaskArtifacts { collect, inputs })
    }
}

/// Applies one attempt's completion (`POST /internal/tasks/:id/complete`): the job named by
/// the path, which a `job_id` in the body must not contradict.
pub async fn complete(
    ctx: &Context,
    runner: &RunnerIdentity,
    job: JobId,
    mut completion: Completion,
) -> Result<CompleteResponse> {
    if completion.job_id.is_some_and(|named| named != job) {
        return Err(Error::invalid("job_id", "names another job than the path"));
    }
    completion.job_id = Some(job);
    check_completion(&completion, "")?;
    let (mut states, ended) = jobs::complete_many_if_leased(
        &ctx.pool,
        runner.id,
        &[lifecycle::store_completion(runner.id, job, &completion)],
    )
    .await?;
    observe_ended(ctx, &ended, [job]);
    let state = states.remove(0)?;
    tracing::info!(job_id = %job, attempt = %completion.attempt, runner_id = %runner.id, %state, "attempt completed");
    Ok(CompleteResponse { state })
}

/// Applies many completions of one runner in one statement and one commit.
pub async fn complete_many(
    ctx: &Context,
    runner: &RunnerIdentity,
    request: &CompleteManyRequest,
) -> Result<CompleteManyResponse> {
    check_completions(&request.completions)?;
    let (results, ended) = jobs::complete_many_if_leased(
        &ctx.pool,
        runner.id,
        &lifecycle::store_completions(runner.id, &request.completions),
    )
    .await?;
    observe_ended(
        ctx,
        &ended,
        request.completions.iter().filter_map(|c| c.job_id),
    );
    let completed = completion_results(runner, &request.completions, results)?;
    Ok(CompleteManyResponse { completed })
}

/// Metrics of the attempts a statement ended, and a nudge to the streams following their
/// jobs (`jobs`: the completions' jobs, applied or not; a stream only re-reads).
fn observe_ended(
    ctx: &Context,
    ended: &[jobs::AttemptEnded],
    jobs: impl IntoIterator<Item = JobId>,
) {
    for attempt in ended {
        ctx.metrics
            .attempt_ended(attempt.succeeded, attempt.seconds);
    }
    ctx.events.jobs_ended(jobs);
}

/// A batch of completions names its jobs, each attempt once, not too many, and each can be
/// stored.
fn check_completions(items: &[Completion]) -> Result<()> {
    if items.len() > MAX_COMPLETIONS {
        return Err(Error::invalid(
            "completions",
            format!("at most {MAX_COMPLETIONS} per request"),
        ));
    }
    let mut seen = HashSet::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let Some(job) = item.job_id else {
            return Err(Error::invalid(
                format!("completions[{index}].job_id"),
                "a completion in a batch names its job",
            ));
        };
        if !seen.insert((job, item.attempt)) {
            return Err(Error::invalid(
                "completions",
                format!(
                    "attempt {} of job {job} appears more than once",
                    item.attempt
                ),
            ));
        }
        check_completion(item, &format!("completions[{index}]"))?;
    }
    Ok(())
}

/// A completion the store can apply: no NUL anywhere (Postgres refuses it), no negative
/// `final_seq`. `field` prefixes the names in the message.
fn check_completion(completion: &Completion, field: &str) -> Result<()> {
    let name = |part: &str| bounds::field_path(field, part);
    if completion.final_seq.is_some_and(|seq| seq < 0) {
        return Err(Error::invalid(name("final_seq"), "must be >= 0"));
    }
    Error::if_nul(&name("output"), &completion.output)?;
    if let Some(error) = &completion.error {
        Error::if_nul_str(&name("error.code"), error.code.as_str())?;
        Error::if_nul_str(&name("error.message"), &error.message)?;
    }
    Ok(())
}

/// The per-completion answers; a lost lease or a conflicting replay is an answer, any other
/// error fails the request.
fn completion_results(
    runner: &RunnerIdentity,
    items: &[Completion],
    results: Vec<Result<JobState>>,
) -> Result<Vec<CompletionResult>> {
    items
        .iter()
        .zip(results)
        .map(|(item, result)| {
            let job_id = item.job_id.unwrap_or(JobId(0));
            let (state, error) = match result {
                Ok(state) => {
                    tracing::debug!(%job_id, attempt = %item.attempt, runner_id = %runner.id, %state, "attempt completed");
                    (Some(state), None)
                }
                Err(err @ (Error::LeaseLost | Error::Conflict(_))) => (
                    None,
                    Some(ErrorDetail {
                        code: err.code(),
                        message: err.to_string(),
                        details: None,
                    }),
                ),
                Err(other) => return Err(other),
            };
            Ok(CompletionResult {
                job_id,
                attempt: item.attempt,
                state,
                error,
            })
        })
        .collect()
}
