//! The public API: enqueue and read jobs, health. Every `/api/*` route needs
//! `Authorization: Bearer <SLUICE_API_TOKEN>`; the check runs before the body is read.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluice_protocol::{bounds, parse_spec, JobId, JobState};

use super::{bearer_token, ApiResult, AppError, AppState, JsonBody, BODY_LIMIT_BYTES};
use crate::store::jobs::{self, AttemptView, CancelOutcome, Enqueued, JobView, NewJob};
use crate::store::queues;
use crate::{store, Error};

/// Most jobs one batch request may carry.
pub const MAX_BATCH: usize = 10_000;

/// The public router (`/api/*`, `/healthz`, `/readyz`).
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/jobs", post(enqueue))
        .route("/api/jobs/batch", post(enqueue_batch))
        .route("/api/jobs/{id}", get(get_job))
        .route("/api/jobs/{id}/cancel", post(cancel_job))
        .route("/api/jobs/{id}/retry", post(retry_job))
        .route("/api/queues", get(list_queues))
        .route("/api/queues/{name}/pause", post(pause_queue))
        .route("/api/queues/{name}/resume", post(resume_queue))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_token,
        ));
    Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(super::not_found)
        .method_not_allowed_fallback(super::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .with_state(state)
}

async fn require_api_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    match bearer_token(&headers) {
        None => AppError(Error::Unauthorized("missing bearer token")).into_response(),
        Some(token) if state.config.api_token.matches(token) => next.run(request).await,
        Some(_) => AppError(Error::Unauthorized("invalid API token")).into_response(),
    }
}

/// `POST /api/jobs` body.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    #[serde(default)]
    pub queue: Option<String>,
    pub spec: Value,
    #[serde(default)]
    pub priority: Option<i32>,
    #[serde(default)]
    pub run_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub delay_ms: Option<u64>,
    #[serde(default)]
    pub max_attempts: Option<i32>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// `POST /api/jobs/batch` body: `{"jobs":[…]}`, or a bare array.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum BatchRequest {
    Wrapped { jobs: Vec<EnqueueRequest> },
    Bare(Vec<EnqueueRequest>),
}

/// What an enqueue answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct EnqueueResponse {
    pub id: JobId,
    pub state: JobState,
}

fn valid_queue_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Checks a request and turns it into a [`NewJob`]; every message names the field, and every
/// number and time is held to its documented range ([`bounds`]).
pub fn validate(request: EnqueueRequest) -> crate::Result<NewJob> {
    let queue = request.queue.unwrap_or_else(|| "default".to_string());
    if !valid_queue_name(&queue) {
        return Err(Error::invalid(
            "queue",
            "must be 1-128 characters of letters, digits, '_', '.', ':' or '-', starting with a letter or digit",
        ));
    }
    let spec_bytes = serde_json::to_vec(&request.spec).map_or(0, |v| v.len());
    if spec_bytes > bounds::MAX_SPEC_BYTES {
        return Err(Error::TooLarge {
            what: "spec",
            limit_bytes: bounds::MAX_SPEC_BYTES,
        });
    }
    parse_spec(&request.spec).map_err(|e| Error::InvalidSpec(e.0))?;
    if request.run_at.is_some() && request.delay_ms.is_some() {
        return Err(Error::invalid(
            "run_at",
            "give run_at or delay_ms, not both",
        ));
    }
    if let Some(priority) = request.priority {
        if !(bounds::MIN_PRIORITY..=bounds::MAX_PRIORITY).contains(&priority) {
            return Err(Error::invalid(
                "priority",
                format!(
                    "must be between {} and {}",
                    bounds::MIN_PRIORITY,
                    bounds::MAX_PRIORITY
                ),
            ));
        }
    }
    if let Some(max_attempts) = request.max_attempts {
        if !(bounds::MIN_ATTEMPTS..=bounds::MAX_ATTEMPTS).contains(&max_attempts) {
            return Err(Error::invalid(
                "max_attempts",
                format!(
                    "must be between {} and {}",
                    bounds::MIN_ATTEMPTS,
                    bounds::MAX_ATTEMPTS
                ),
            ));
        }
    }
    let timeout_ms = match request.timeout_ms {
        Some(ms) if !(1..=bounds::MAX_TIMEOUT_MS).contains(&ms) => {
            return Err(Error::invalid(
                "timeout_ms",
                format!("must be between 1 and {} (30 days)", bounds::MAX_TIMEOUT_MS),
            ))
        }
        Some(ms) => Some(ms as i64),
        None => None,
    };
    if let Some(delay_ms) = request.delay_ms {
        if delay_ms > bounds::MAX_DELAY_MS {
            return Err(Error::invalid(
                "delay_ms",
                format!("must be between 0 and {} (366 days)", bounds::MAX_DELAY_MS),
            ));
        }
    }
    if let Some(run_at) = request.run_at {
        let latest = Utc::now() + chrono::Duration::milliseconds(bounds::MAX_DELAY_MS as i64);
        if run_at < DateTime::<Utc>::UNIX_EPOCH || run_at > latest {
            return Err(Error::invalid(
                "run_at",
                "must be between 1970-01-01T00:00:00Z and 366 days from now",
            ));
        }
    }
    if let Some(key) = &request.idempotency_key {
        if key.is_empty() || key.len() > bounds::MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(Error::invalid("idempotency_key", "must be 1-255 bytes"));
        }
        Error::if_nul_str("idempotency_key", key)?;
    }
    Ok(NewJob {
        queue,
        spec: request.spec,
        priority: request.priority,
        run_at: request.run_at,
        delay: request.delay_ms.map(Duration::from_millis),
        max_attempts: request.max_attempts,
        timeout_ms,
        idempotency_key: request.idempotency_key,
    })
}

fn response_of(enqueued: &Enqueued) -> EnqueueResponse {
    EnqueueResponse {
        id: enqueued.id,
        state: enqueued.state,
    }
}

async fn enqueue(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<EnqueueRequest>,
) -> ApiResult<(StatusCode, Json<EnqueueResponse>)> {
    let job = validate(request)?;
    let enqueued = jobs::insert_many(&state.pool, std::slice::from_ref(&job)).await?;
    let first = enqueued
        .first()
        .ok_or_else(|| Error::Internal("enqueue returned nothing".into()))?;
    let status = if first.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(response_of(first))))
}

async fn enqueue_batch(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<BatchRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let requests = match request {
        BatchRequest::Wrapped { jobs } | BatchRequest::Bare(jobs) => jobs,
    };
    if requests.is_empty() {
        return Err(Error::invalid("jobs", "must hold at least one job").into());
    }
    if requests.len() > MAX_BATCH {
        return Err(Error::invalid("jobs", format!("at most {MAX_BATCH} jobs per batch")).into());
    }
    let mut new_jobs = Vec::with_capacity(requests.len());
    for (index, request) in requests.into_iter().enumerate() {
        let job = validate(request).map_err(|err| match err {
            Error::InvalidSpec(message) => Error::InvalidSpec(format!("jobs[{index}]: {message}")),
            Error::Invalid { field, reason } => {
                Error::invalid(format!("jobs[{index}].{field}"), reason)
            }
            other => other,
        })?;
        new_jobs.push(job);
    }
    let enqueued = jobs::insert_many(&state.pool, &new_jobs).await?;
    let jobs: Vec<EnqueueResponse> = enqueued.iter().map(response_of).collect();
    Ok((StatusCode::CREATED, Json(json!({ "jobs": jobs }))))
}

/// `GET /api/jobs/:id`.
#[derive(Debug, Serialize)]
pub struct JobResponse {
    #[serde(flatten)]
    pub job: JobView,
    pub attempts: Vec<AttemptView>,
}

async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobResponse>> {
    let id = job_id(&id)?;
    let job = jobs::get(&state.pool, id)
        .await?
        .ok_or(Error::NotFound("job"))?;
    let attempts = jobs::list_attempts(&state.pool, id).await?;
    Ok(Json(JobResponse { job, attempts }))
}

fn job_id(id: &str) -> crate::Result<JobId> {
    id.parse().map(JobId).map_err(|_| Error::NotFound("job"))
}

async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = job_id(&id)?;
    match jobs::cancel(&state.pool, id).await? {
        None => Err(Error::NotFound("job").into()),
        Some(CancelOutcome::Cancelled)
        | Some(CancelOutcome::AlreadyFinished(JobState::Cancelled)) => {
            Ok(Json(json!({"id": id, "state": JobState::Cancelled})))
        }
        Some(CancelOutcome::AlreadyFinished(done)) => {
            Err(Error::Conflict(format!("job {id} already {done}; it cannot be cancelled")).into())
        }
    }
}

async fn retry_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = job_id(&id)?;
    match jobs::retry_if_finished_unsuccessfully(&state.pool, id).await? {
        None => Err(Error::NotFound("job").into()),
        Some(jobs::Retried {
            before: JobState::Failed | JobState::Cancelled,
            after,
        }) => Ok(Json(json!({"id": id, "state": after}))),
        Some(jobs::Retried { before, .. }) => Err(Error::Conflict(format!(
            "job {id} is {before}; only failed or cancelled jobs can be retried"
        ))
        .into()),
    }
}

async fn list_queues(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let queues = queues::list(&state.pool).await?;
    Ok(Json(json!({ "queues": queues })))
}

async fn set_queue_paused(state: AppState, name: String, paused: bool) -> ApiResult<Json<Value>> {
    if !valid_queue_name(&name) {
        return Err(Error::invalid("queue", "not a valid queue name").into());
    }
    queues::set_paused(&state.pool, &name, paused).await?;
    Ok(Json(json!({"name": name, "paused": paused})))
}

async fn pause_queue(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    set_queue_paused(state, name, true).await
}

async fn resume_queue(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    set_queue_paused(state, name, false).await
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    match tokio::time::timeout(Duration::from_secs(2), store::ping(&state.pool)).await {
        Ok(Ok(())) => Ok(Json(json!({"status": "ready"}))),
        Ok(Err(err)) => Err(err.into()),
        Err(_) => Err(Error::Unavailable("database ping timed out".into()).into()),
    }
}
