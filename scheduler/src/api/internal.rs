//! The internal runner API. A runner registers with the pool's secret and gets a token; every
//! later call is authenticated by that token alone — the runner's identity never comes from
//! the body or the URL — and every task write names its `(job, attempt, lease_token)`.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;
use sluice_protocol::{
    bounds, AttemptRef, CancelOrder, ClaimRequest, ClaimResponse, CompleteManyRequest,
    CompleteManyResponse, CompleteRequest, CompleteResponse, CompletionResult, ErrorDetail,
    HeartbeatRequest, HeartbeatResponse, JobId, RegisterRequest, RegisterResponse, RunnerId,
    StreamRequest, StreamResponse, Task, TaskCompletion,
};
use tokio::time::Instant;

use super::{bearer_token, ApiResult, AppError, AppState, JsonBody, INTERNAL_BODY_LIMIT_BYTES};
use crate::lifecycle::retry_backoff;
use crate::store::runners::{self, RegisterParams, RunnerIdentity};
use crate::store::{events, jobs};
use crate::Error;

/// Most tasks one claim may take.
pub const MAX_CLAIM: u32 = 1000;
/// Most completions one request may carry.
pub const MAX_COMPLETIONS: usize = 1000;
/// Most events one stream POST may carry.
pub const MAX_EVENTS_PER_POST: usize = 10_000;
/// Most leases one heartbeat may list.
pub const MAX_HEARTBEAT_LEASES: usize = 10_000;
/// Most labels a runner may register with.
pub const MAX_LABELS: usize = 64;

/// The internal router (`/internal/*`).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/internal/runners/register", post(register))
        .route("/internal/runners/{pod}/heartbeat", post(heartbeat))
        .route("/internal/runners/{pod}/claim", post(claim))
        .route("/internal/runners/{pod}/complete", post(complete_many))
        .route("/internal/tasks/{id}/stream", post(stream))
        .route("/internal/tasks/{id}/complete", post(complete))
        .route(
            "/healthz",
            axum::routing::get(|| async { Json(json!({"status": "ok"})) }),
        )
        .fallback(super::not_found)
        .method_not_allowed_fallback(super::method_not_allowed)
        .layer(DefaultBodyLimit::max(INTERNAL_BODY_LIMIT_BYTES))
        .with_state(state)
}

/// The runner behind a request's bearer token (a lookup of the last two seconds may serve:
/// see [`runners::TokenCache`]).
pub struct Runner(pub RunnerIdentity);

impl FromRequestParts<AppState> for Runner {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let runner = state
            .runner_tokens
            .get(&state.pool, runner_token(parts)?)
            .await?;
        Ok(Runner(known(runner)?))
    }
}

/// The runner behind a request's bearer token, always looked up: for heartbeats, which must
/// tell a replaced runner at once.
pub struct LiveRunner(pub RunnerIdentity);

impl FromRequestParts<AppState> for LiveRunner {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let runner = runners::get_by_token(&state.pool, runner_token(parts)?).await?;
        Ok(LiveRunner(known(runner)?))
    }
}

fn runner_token(parts: &Parts) -> Result<&str, Error> {
    bearer_token(&parts.headers).ok_or(Error::Unauthorized("missing bearer token"))
}

fn known(runner: Option<RunnerIdentity>) -> Result<RunnerIdentity, Error> {
    runner.ok_or(Error::Unauthorized("unknown or revoked runner token"))
}

/// A runner may only use its own pod's paths.
fn check_pod(runner: &RunnerIdentity, pod: &str) -> Result<(), Error> {
    if runner.pod_name == pod {
        Ok(())
    } else {
        Err(Error::Forbidden(
            "the token belongs to another runner than the one in the path".into(),
        ))
    }
}

fn parse_job_id(id: &str) -> Result<JobId, Error> {
    // A malformed id cannot name a lease this runner holds; answer like any other stranger.
    id.parse().map(JobId).map_err(|_| Error::LeaseLost)
}

async fn register(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    JsonBody(request): JsonBody<RegisterRequest>,
) -> ApiResult<(StatusCode, Json<RegisterResponse>)> {
    match bearer_token(&headers) {
        None => return Err(Error::Unauthorized("missing registration secret").into()),
        Some(secret) if !state.config.runner_secret.matches(secret) => {
            return Err(Error::Unauthorized("invalid registration secret").into())
        }
        Some(_) => {}
    }
    if request.pod_name.is_empty() || request.pod_name.len() > 253 {
        return Err(Error::invalid("pod_name", "must be 1-253 bytes").into());
    }
    Error::if_nul_str("pod_name", &request.pod_name)?;
    Error::if_nul_str("version", &request.version)?;
    if request.version.len() > 128 {
        return Err(Error::invalid("version", "must be at most 128 bytes").into());
    }
    if request.labels.len() > MAX_LABELS {
        return Err(Error::invalid("labels", format!("at most {MAX_LABELS} labels")).into());
    }
    for (key, value) in &request.labels {
        if key.is_empty() || key.len() > 253 || value.len() > 255 {
            return Err(Error::invalid(
                "labels",
                "keys must be 1-253 bytes and values at most 255",
            )
            .into());
        }
        Error::if_nul_str("labels", key)?;
        Error::if_nul_str(&format!("labels.{key}"), value)?;
    }
    if request.slots == 0 || request.slots > 10_000 {
        return Err(Error::invalid("slots", "must be between 1 and 10000").into());
    }
    let labels = serde_json::to_value(&request.labels)
        .map_err(|e| Error::invalid("labels", e.to_string()))?;
    let (runner_id, token) = runners::register(
        &state.pool,
        RegisterParams {
            pod_name: &request.pod_name,
            labels,
            slots: request.slots as i32,
            version: &request.version,
        },
    )
    .await?;
    state.runner_tokens.forget_pod(&request.pod_name);
    tracing::info!(%runner_id, pod = %request.pod_name, slots = request.slots, "runner registered");
    let timings = state.config.timings;
    Ok((
        StatusCode::CREATED,
        Json(RegisterResponse {
            runner_id,
            token: token.expose().to_string(),
            heartbeat_ms: timings.heartbeat.as_millis() as u64,
            lease_ms: timings.lease.as_millis() as u64,
        }),
    ))
}

async fn heartbeat(
    State(state): State<AppState>,
    LiveRunner(runner): LiveRunner,
    Path(pod): Path<String>,
    JsonBody(request): JsonBody<HeartbeatRequest>,
) -> ApiResult<Json<HeartbeatResponse>> {
    check_pod(&runner, &pod)?;
    if request.running.len() > MAX_HEARTBEAT_LEASES {
        return Err(Error::invalid(
            "running",
            format!("at most {MAX_HEARTBEAT_LEASES} leases per heartbeat"),
        )
        .into());
    }
    let mut seen = std::collections::HashSet::with_capacity(request.running.len());
    if let Some(twice) = request
        .running
        .iter()
        .find(|l| !seen.insert((l.job_id, l.attempt)))
    {
        return Err(Error::invalid(
            "running",
            format!(
                "attempt {} of job {} is listed more than once",
                twice.attempt, twice.job_id
            ),
        )
        .into());
    }
    let seq = match request.seq.map(i64::try_from) {
        Some(Ok(seq)) => Some(seq),
        Some(Err(_)) => return Err(Error::invalid("seq", "must be below 2^63").into()),
        None => None,
    };
    let ends = jobs::renew_leases_if_held(
        &state.pool,
        runner.id,
        &request.running,
        seq,
        state.config.timings.lease,
    )
    .await?;
    let unrenewed = request
        .running
        .iter()
        .zip(&ends)
        .filter(|(_, end)| **end == jobs::LeaseEnd::Busy)
        .map(|(lease, _)| AttemptRef {
            job_id: lease.job_id,
            attempt: lease.attempt,
        })
        .collect();
    let cancel = request
        .running
        .iter()
        .zip(ends)
        .filter_map(|(lease, end)| {
            let reason = match end {
                jobs::LeaseEnd::Renewed | jobs::LeaseEnd::Busy => return None,
                jobs::LeaseEnd::Lost => sluice_protocol::error_code::LEASE_LOST,
                jobs::LeaseEnd::Cancelled => "cancelled",
                jobs::LeaseEnd::TimedOut => "timed_out",
            };
            Some(CancelOrder {
                job_id: lease.job_id,
                attempt: lease.attempt,
                reason: reason.to_string(),
            })
        })
        .collect();
    Ok(Json(HeartbeatResponse {
        cancel,
        unrenewed,
        drain: false,
    }))
}

async fn claim(
    State(state): State<AppState>,
    Runner(runner): Runner,
    Path(pod): Path<String>,
    JsonBody(request): JsonBody<ClaimRequest>,
) -> ApiResult<Json<ClaimResponse>> {
    check_pod(&runner, &pod)?;
    if request.max == 0 || request.max > MAX_CLAIM {
        return Err(Error::invalid("max", format!("must be between 1 and {MAX_CLAIM}")).into());
    }
    check_completions(&request.complete)?;
    let config = &state.config;
    // A claim that carries completions answers at once: their results must not wait.
    let wait = if request.complete.is_empty() {
        Duration::from_millis(request.wait_ms).min(config.max_claim_wait)
    } else {
        Duration::ZERO
    };
    let deadline = Instant::now() + wait;
    let mut wake = state.wake.subscribe();
    let mut shutdown = state.shutdown.clone();
    let mut completions = Some(&request.complete);
    let mut completed = Vec::new();
    loop {
        // Mark the current wake-up as seen before looking, so a job inserted between the
        // claim and the wait still wakes us.
        wake.borrow_and_update();
        let mut claimed = match completions.take().filter(|c| !c.is_empty()) {
            Some(items) => {
                let (results, claimed) = jobs::complete_and_claim(
                    &state.pool,
                    runner.id,
                    &completions_of(runner.id, items),
                    request.max as i32,
                    config.timings.lease,
                )
                .await?;
                completed = completion_results(runner.id, items, results)?;
                claimed
            }
            None => {
                jobs::claim_available(
                    &state.pool,
                    runner.id,
                    request.max as i32,
                    config.timings.lease,
                )
                .await?
            }
        };
        let room = request.max as usize - claimed.len();
        if room > 0
            && state
                .capped_queues
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            claimed.extend(
                jobs::claim_capped(&state.pool, runner.id, room as i32, config.timings.lease)
                    .await?,
            );
        }
        let now = Instant::now();
        if !claimed.is_empty() || now >= deadline || *shutdown.borrow() {
            let tasks = claimed
                .into_iter()
                .map(|job| Task {
                    job_id: job.id,
                    attempt: job.attempt,
                    lease_token: job.lease_token,
                    queue: job.queue,
                    spec: job.spec,
                    timeout_ms: job.timeout_ms.map(|ms| ms as u64),
                })
                .collect();
            return Ok(Json(ClaimResponse { tasks, completed }));
        }
        let poll = (now + config.claim_poll_interval).min(deadline);
        tokio::select! {
            _ = wake.changed() => {}
            _ = tokio::time::sleep_until(poll) => {}
            _ = shutdown.changed() => {}
        }
    }
}

async fn stream(
    State(state): State<AppState>,
    Runner(runner): Runner,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<StreamRequest>,
) -> ApiResult<Json<StreamResponse>> {
    let job = parse_job_id(&id)?;
    if request.events.len() > MAX_EVENTS_PER_POST {
        return Err(Error::invalid(
            "events",
            format!("at most {MAX_EVENTS_PER_POST} events per request"),
        )
        .into());
    }
    for (index, event) in request.events.iter().enumerate() {
        let field = format!("events[{index}]");
        if event.seq < 1 {
            return Err(Error::invalid(
                format!("{field}.seq"),
                format!("must be >= 1, got {}", event.seq),
            )
            .into());
        }
        if event.kind.is_empty() || event.kind.len() > bounds::MAX_EVENT_KIND_BYTES {
            return Err(Error::invalid(
                format!("{field}.kind"),
                format!("must be 1-{} bytes", bounds::MAX_EVENT_KIND_BYTES),
            )
            .into());
        }
        Error::if_nul_str(&format!("{field}.kind"), &event.kind)?;
        Error::if_nul(&format!("{field}.data"), &event.data)?;
    }
    let stored = events::append_if_leased(
        &state.pool,
        runner.id,
        job,
        request.attempt,
        request.lease_token,
        &request.events,
    )
    .await?;
    Ok(Json(StreamResponse { stored }))
}

async fn complete(
    State(state): State<AppState>,
    Runner(runner): Runner,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<CompleteRequest>,
) -> ApiResult<Json<CompleteResponse>> {
    let job = parse_job_id(&id)?;
    check_completion(
        &request.output,
        request.error.as_ref(),
        request.final_seq,
        "",
    )?;
    let item = TaskCompletion {
        job_id: job,
        attempt: request.attempt,
        lease_token: request.lease_token,
        outcome: request.outcome,
        output: request.output,
        error: request.error,
        retryable: request.retryable,
        final_seq: request.final_seq,
    };
    let state_after =
        jobs::complete_if_leased(&state.pool, completion_of(runner.id, &item)).await?;
    tracing::info!(job_id = %job, attempt = %item.attempt, runner_id = %runner.id, state = %state_after, "attempt completed");
    Ok(Json(CompleteResponse { state: state_after }))
}

/// Many completions in one request and one commit (the runner's batch of attempts that ended
/// while its claim was waiting).
async fn complete_many(
    State(state): State<AppState>,
    Runner(runner): Runner,
    Path(pod): Path<String>,
    JsonBody(request): JsonBody<CompleteManyRequest>,
) -> ApiResult<Json<CompleteManyResponse>> {
    check_pod(&runner, &pod)?;
    check_completions(&request.completions)?;
    let results = jobs::complete_many_if_leased(
        &state.pool,
        runner.id,
        &completions_of(runner.id, &request.completions),
    )
    .await?;
    let completed = completion_results(runner.id, &request.completions, results)?;
    Ok(Json(CompleteManyResponse { completed }))
}

/// A batch of completions names each attempt once, and not too many, and each can be stored.
fn check_completions(items: &[TaskCompletion]) -> Result<(), Error> {
    if items.len() > MAX_COMPLETIONS {
        return Err(Error::invalid(
            "completions",
            format!("at most {MAX_COMPLETIONS} per request"),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    if let Some(twice) = items.iter().find(|c| !seen.insert((c.job_id, c.attempt))) {
        return Err(Error::invalid(
            "completions",
            format!(
                "attempt {} of job {} appears more than once",
                twice.attempt, twice.job_id
            ),
        ));
    }
    for (index, c) in items.iter().enumerate() {
        check_completion(
            &c.output,
            c.error.as_ref(),
            c.final_seq,
            &format!("completions[{index}]"),
        )?;
    }
    Ok(())
}

/// A completion the store can apply: no NUL anywhere (Postgres refuses it), no negative
/// `final_seq`. `field` prefixes the names in the message.
fn check_completion(
    output: &serde_json::Value,
    error: Option<&ErrorDetail>,
    final_seq: Option<i64>,
    field: &str,
) -> Result<(), Error> {
    let name = |part: &str| bounds::field_path(field, part);
    if final_seq.is_some_and(|seq| seq < 0) {
        return Err(Error::invalid(name("final_seq"), "must be >= 0"));
    }
    Error::if_nul(&name("output"), output)?;
    if let Some(error) = error {
        Error::if_nul_str(&name("error.code"), &error.code)?;
        Error::if_nul_str(&name("error.message"), &error.message)?;
    }
    Ok(())
}

fn completions_of(runner: RunnerId, items: &[TaskCompletion]) -> Vec<jobs::Completion<'_>> {
    items.iter().map(|c| completion_of(runner, c)).collect()
}

/// The store's form of one completion, with the retry back-off its attempt earned.
fn completion_of(runner: RunnerId, c: &TaskCompletion) -> jobs::Completion<'_> {
    jobs::Completion {
        runner,
        job: c.job_id,
        attempt: c.attempt,
        lease_token: c.lease_token,
        outcome: c.outcome,
        output: &c.output,
        error: c
            .error
            .as_ref()
            .map(|e| serde_json::to_value(e).unwrap_or_default()),
        retryable: c.retryable,
        final_seq: c.final_seq,
        retry_backoff: retry_backoff(c.attempt.0),
    }
}

/// The per-completion answers; a lost lease or a conflicting replay is an answer, any other
/// error fails the request.
fn completion_results(
    runner: RunnerId,
    items: &[TaskCompletion],
    results: Vec<crate::Result<sluice_protocol::JobState>>,
) -> Result<Vec<CompletionResult>, Error> {
    items
        .iter()
        .zip(results)
        .map(|(item, result)| {
            let (state, error) = match result {
                Ok(state) => {
                    tracing::debug!(job_id = %item.job_id, attempt = %item.attempt, runner_id = %runner, state = %state, "attempt completed");
                    (Some(state), None)
                }
                Err(err @ (Error::LeaseLost | Error::Conflict(_))) => (
                    None,
                    Some(ErrorDetail {
                        code: err.code().into(),
                        message: err.to_string(),
                    }),
                ),
                Err(other) => return Err(other),
            };
            Ok(CompletionResult {
                job_id: item.job_id,
                attempt: item.attempt,
                state,
                error,
            })
        })
        .collect()
}
