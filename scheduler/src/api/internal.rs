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
    CancelOrder, ClaimRequest, ClaimResponse, CompleteRequest, CompleteResponse, HeartbeatRequest,
    HeartbeatResponse, JobId, RegisterRequest, RegisterResponse, StreamRequest, StreamResponse,
    Task,
};
use tokio::time::Instant;

use super::{bearer_token, ApiResult, AppError, AppState, JsonBody, BODY_LIMIT_BYTES};
use crate::lifecycle::retry_backoff;
use crate::store::runners::{self, RegisterParams, RunnerIdentity};
use crate::store::{events, jobs};
use crate::Error;

/// Most tasks one claim may take.
pub const MAX_CLAIM: u32 = 1000;
/// Most events one stream POST may carry.
pub const MAX_EVENTS_PER_POST: usize = 10_000;

/// The internal router (`/internal/*`).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/internal/runners/register", post(register))
        .route("/internal/runners/{pod}/heartbeat", post(heartbeat))
        .route("/internal/runners/{pod}/claim", post(claim))
        .route("/internal/tasks/{id}/stream", post(stream))
        .route("/internal/tasks/{id}/complete", post(complete))
        .route(
            "/healthz",
            axum::routing::get(|| async { Json(json!({"status": "ok"})) }),
        )
        .fallback(super::not_found)
        .method_not_allowed_fallback(super::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .with_state(state)
}

/// The runner behind a request's bearer token.
pub struct Runner(pub RunnerIdentity);

impl FromRequestParts<AppState> for Runner {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token =
            bearer_token(&parts.headers).ok_or(Error::Unauthorized("missing bearer token"))?;
        let runner = runners::get_by_token(&state.pool, token)
            .await?
            .ok_or(Error::Unauthorized("unknown or revoked runner token"))?;
        Ok(Runner(runner))
    }
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
    Runner(runner): Runner,
    Path(pod): Path<String>,
    JsonBody(request): JsonBody<HeartbeatRequest>,
) -> ApiResult<Json<HeartbeatResponse>> {
    check_pod(&runner, &pod)?;
    let ends = jobs::renew_leases_if_held(
        &state.pool,
        runner.id,
        &request.running,
        state.config.timings.lease,
    )
    .await?;
    let cancel = request
        .running
        .iter()
        .zip(ends)
        .filter_map(|(lease, end)| {
            let reason = match end {
                jobs::LeaseEnd::Renewed => return None,
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
    let config = &state.config;
    let deadline =
        Instant::now() + Duration::from_millis(request.wait_ms).min(config.max_claim_wait);
    let mut wake = state.wake.subscribe();
    let mut shutdown = state.shutdown.clone();
    loop {
        // Mark the current wake-up as seen before looking, so a job inserted between the
        // claim and the wait still wakes us.
        wake.borrow_and_update();
        let mut claimed = jobs::claim_available(
            &state.pool,
            runner.id,
            request.max as i32,
            config.timings.lease,
        )
        .await?;
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
            return Ok(Json(ClaimResponse { tasks }));
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
    if let Some(bad) = request.events.iter().find(|e| e.seq < 1) {
        return Err(Error::invalid("events", format!("seq must be >= 1, got {}", bad.seq)).into());
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
    let error = request
        .error
        .as_ref()
        .map(|e| serde_json::to_value(e).unwrap_or_default());
    let state_after = jobs::complete_if_leased(
        &state.pool,
        jobs::Completion {
            runner: runner.id,
            job,
            attempt: request.attempt,
            lease_token: request.lease_token,
            outcome: request.outcome,
            output: &request.output,
            error,
            retryable: request.retryable,
            final_seq: request.final_seq,
            retry_backoff: retry_backoff(request.attempt.0),
        },
    )
    .await?;
    tracing::info!(job_id = %job, attempt = %request.attempt, runner_id = %runner.id, state = %state_after, "attempt completed");
    Ok(Json(CompleteResponse { state: state_after }))
}
