//! The public API: enqueue and read jobs, queues, health. Every `/api/*` route needs
//! `Authorization: Bearer <SLUICE_API_TOKEN>`; the check runs before the body is read. Each
//! handler parses, calls one function of [`crate::service::jobs`] and maps its result.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use sluice_protocol::api::{
    paths, BatchRequest, BatchResponse, EnqueueRequest, EnqueueResponse, Health, Job, JobList,
    JobStateChange, QueueList, QueuePaused, RetryManyRequest, RetryManyResponse, Run, RunList,
    RunRequest, RunStarted, RunStateChange, Schedule, ScheduleList, ScheduleRequest, Workflow,
    WorkflowList,
};
use sluice_protocol::JobId;

use super::{
    bearer_token, healthz, ApiResult, AppError, AppState, JsonBody, JsonPath, JsonQuery, TextBody,
    BODY_LIMIT_BYTES,
};
use crate::service::{cron, events, jobs, runners, sessions, workflows};
use crate::{store, Error};

/// The public router (`/api/*`, `/healthz`, `/readyz`).
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(paths::JOBS, post(enqueue).get(list_jobs))
        .route(paths::JOBS_BATCH, post(enqueue_batch))
        .route(paths::JOBS_RETRY, post(retry_jobs))
        .route(paths::JOB_ROUTE, get(get_job))
        .route(paths::JOB_EVENTS_ROUTE, get(job_events))
        .route(paths::JOB_CANCEL_ROUTE, post(cancel_job))
        .route(paths::JOB_RETRY_ROUTE, post(retry_job))
        .route(paths::QUEUES, get(list_queues))
        .route(paths::QUEUE_PAUSE_ROUTE, post(pause_queue))
        .route(paths::QUEUE_RESUME_ROUTE, post(resume_queue))
        .route(paths::WORKFLOWS, get(list_workflows))
        .route(paths::WORKFLOWS_RUN, post(start_run))
        .route(paths::RUNS, get(list_runs))
        .route(paths::RUN_ROUTE, get(get_run))
        .route(paths::RUN_EVENTS_ROUTE, get(run_events))
        .route(paths::RUN_CANCEL_ROUTE, post(cancel_run))
        .route(paths::RUN_ARTIFACTS_ROUTE, get(run_artifacts))
        .route(paths::SCHEDULES, get(list_schedules))
        .route(
            paths::SCHEDULE_ROUTE,
            put(put_schedule).get(get_schedule).delete(delete_schedule),
        )
        .route(paths::RUNNERS, get(list_runners))
        .route(paths::METRICS, get(metrics))
        .route(
            paths::SESSION_ROUTE,
            get(get_session).delete(delete_session),
        )
        .route(paths::SCHEDULE_PAUSE_ROUTE, post(pause_schedule))
        .route(paths::SCHEDULE_RESUME_ROUTE, post(resume_schedule))
        .route(
            paths::WORKFLOW_ROUTE,
            put(register_workflow)
                .layer(DefaultBodyLimit::max(workflows::MAX_DEFINITION_BYTES))
                .get(get_workflow),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_token,
        ));
    Router::new()
        .merge(api)
        .route(paths::HEALTHZ, get(healthz))
        .route(paths::READYZ, get(readyz))
        .route(paths::OPENAPI, get(super::openapi::openapi_json))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            super::track_public,
        ))
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

/// `GET /metrics`: Prometheus (OpenMetrics text), behind the API token like `/api/*`.
#[utoipa::path(
    get,
    path = paths::METRICS,
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus metrics (OpenMetrics text)", content_type = "application/openmetrics-text", body = String),
    )
)]
async fn metrics(State(state): State<AppState>) -> Response {
    let text = state
        .metrics
        .render(&state.pool, state.events.topics())
        .await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// A job id from a path; anything else names no job (404, as an unknown id does).
fn job_id(id: &str) -> crate::Result<JobId> {
    id.parse().map(JobId).map_err(|_| Error::NotFound("job"))
}

#[utoipa::path(
    post,
    path = paths::JOBS,
    tag = "jobs",
    request_body = EnqueueRequest,
    responses(
        (status = 201, description = "Enqueued", body = EnqueueResponse),
        (status = 200, description = "Its idempotency key names a stored job, which answers", body = EnqueueResponse),
        (status = 422, description = "The spec is not one sluice runs", body = sluice_protocol::ErrorBody),
    )
)]
async fn enqueue(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<EnqueueRequest>,
) -> ApiResult<(StatusCode, Json<EnqueueResponse>)> {
    let (response, created) = jobs::enqueue(&state, request).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(response)))
}

#[utoipa::path(
    post,
    path = paths::JOBS_BATCH,
    tag = "jobs",
    request_body = BatchRequest,
    responses(
        (status = 201, description = "Enqueued, all or none, in order", body = BatchResponse),
        (status = 422, description = "A spec is not one sluice runs", body = sluice_protocol::ErrorBody),
    )
)]
async fn enqueue_batch(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<BatchRequest>,
) -> ApiResult<(StatusCode, Json<BatchResponse>)> {
    let jobs = jobs::enqueue_batch(&state, request.into_jobs()).await?;
    Ok((StatusCode::CREATED, Json(BatchResponse { jobs })))
}

#[utoipa::path(
    get,
    path = paths::JOB_ROUTE,
    tag = "jobs",
    params(
        ("id" = i64, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "The job with its attempts", body = Job),
        (status = 404, description = "No such job", body = sluice_protocol::ErrorBody),
    )
)]
async fn get_job(
    State(state): State<AppState>,
    JsonPath(id): JsonPath<String>,
) -> ApiResult<Json<Job>> {
    Ok(Json(jobs::get(&state, job_id(&id)?).await?))
}

/// `GET /api/jobs` filters and paging.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    queue: Option<String>,
    state: Option<String>,
    since: Option<String>,
    before: Option<i64>,
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = paths::JOBS,
    tag = "jobs",
    params(
        ("queue" = Option<String>, Query, description = "Only this queue's jobs"),
        ("state" = Option<sluice_protocol::JobState>, Query, description = "Only jobs in this state"),
        ("since" = Option<String>, Query, description = "Created at or after (RFC 3339)"),
        ("before" = Option<i64>, Query, description = "Ids below this (the next page)"),
        ("limit" = Option<i64>, Query, description = "At most this many (1-1000, 100 by default)"),
    ),
    responses(
        (status = 200, description = "Jobs, newest first", body = JobList),
    )
)]
async fn list_jobs(
    State(state): State<AppState>,
    JsonQuery(query): JsonQuery<JobsQuery>,
) -> ApiResult<Json<JobList>> {
    Ok(Json(
        jobs::list(
            &state,
            query.queue.as_deref(),
            query.state.as_deref(),
            query.since.as_deref(),
            query.before,
            query.limit,
        )
        .await?,
    ))
}

#[utoipa::path(
    post,
    path = paths::JOBS_RETRY,
    tag = "jobs",
    request_body = RetryManyRequest,
    responses(
        (status = 200, description = "What was retried; call again while `more`", body = RetryManyResponse),
    )
)]
async fn retry_jobs(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<RetryManyRequest>,
) -> ApiResult<Json<RetryManyResponse>> {
    Ok(Json(jobs::retry_many(&state, request).await?))
}

/// `?after=<position>` of an event stream.
#[derive(Deserialize)]
struct StreamQuery {
    after: Option<String>,
}

#[utoipa::path(
    get,
    path = paths::JOB_EVENTS_ROUTE,
    tag = "events",
    params(
        ("id" = i64, Path, description = "The job's id"),
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this position"),
        ("after" = Option<i64>, Query, description = "Resume after this position (when no Last-Event-ID)"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: `id:` the position, `event:` the kind, `data:` JSON; history, live, then the terminal event (`succeeded`, `failed`, `cancelled`) and the end", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such job", body = sluice_protocol::ErrorBody),
    )
)]
async fn job_events(
    State(state): State<AppState>,
    JsonPath(id): JsonPath<String>,
    headers: HeaderMap,
    JsonQuery(query): JsonQuery<StreamQuery>,
) -> ApiResult<Response> {
    let topic = store::events::Topic::Job(job_id(&id)?);
    event_stream(&state, topic, &headers, query).await
}

#[utoipa::path(
    get,
    path = paths::RUN_EVENTS_ROUTE,
    tag = "events",
    params(
        ("id" = i64, Path, description = "The run's id"),
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this position"),
        ("after" = Option<i64>, Query, description = "Resume after this position (when no Last-Event-ID)"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events of every step job (`data.step`), then the run's terminal event", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such run", body = sluice_protocol::ErrorBody),
    )
)]
async fn run_events(
    State(state): State<AppState>,
    JsonPath(id): JsonPath<String>,
    headers: HeaderMap,
    JsonQuery(query): JsonQuery<StreamQuery>,
) -> ApiResult<Response> {
    let topic = store::events::Topic::Run(run_id(&id)?);
    event_stream(&state, topic, &headers, query).await
}

/// An SSE response (`text/event-stream`) following `topic` from the client's position.
async fn event_stream(
    state: &AppState,
    topic: store::events::Topic,
    headers: &HeaderMap,
    query: StreamQuery,
) -> ApiResult<Response> {
    let last_event_id = match headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| Error::invalid("Last-Event-ID", "must be an event position"))?,
        ),
        None => None,
    };
    let after = events::start_position(last_event_id, query.after.as_deref())?;
    let out = state.events.open(topic, after).await?;
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "text/event-stream"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
            (
                axum::http::HeaderName::from_static("x-accel-buffering"),
                "no",
            ),
        ],
        events::body(out),
    )
        .into_response())
}

#[utoipa::path(
    post,
    path = paths::JOB_CANCEL_ROUTE,
    tag = "jobs",
    params(
        ("id" = i64, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "Cancelled, or the state it had already ended in", body = JobStateChange),
        (status = 404, description = "No such job", body = sluice_protocol::ErrorBody),
    )
)]
async fn cancel_job(
    State(state): State<AppState>,
    JsonPath(id): JsonPath<String>,
) -> ApiResult<Json<JobStateChange>> {
    Ok(Json(jobs::cancel(&state, job_id(&id)?).await?))
}

#[utoipa::path(
    post,
    path = paths::JOB_RETRY_ROUTE,
    tag = "jobs",
    params(
        ("id" = i64, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "Queued again", body = JobStateChange),
        (status = 404, description = "No such job", body = sluice_protocol::ErrorBody),
        (status = 409, description = "Not failed or cancelled", body = sluice_protocol::ErrorBody),
    )
)]
async fn retry_job(
    State(state): State<AppState>,
    JsonPath(id): JsonPath<String>,
) -> ApiResult<Json<JobStateChange>> {
    Ok(Json(jobs::retry(&state, job_id(&id)?).await?))
}

#[utoipa::path(
    get,
    path = paths::QUEUES,
    tag = "queues",
    responses(
        (status = 200, description = "Every queue with its settings and job counts", body = QueueList),
    )
)]
async fn list_queues(State(state): State<AppState>) -> ApiResult<Json<QueueList>> {
    let queues = jobs::list_queues(&state).await?;
    Ok(Json(QueueList { queues }))
}

#[utoipa::path(
    post,
    path = paths::QUEUE_PAUSE_ROUTE,
    tag = "queues",
    params(
        ("name" = String, Path, description = "The queue's name"),
    ),
    responses(
        (status = 200, description = "Paused", body = QueuePaused),
    )
)]
async fn pause_queue(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<Json<QueuePaused>> {
    Ok(Json(jobs::set_queue_paused(&state, name, true).await?))
}

#[utoipa::path(
    post,
    path = paths::QUEUE_RESUME_ROUTE,
    tag = "queues",
    params(
        ("name" = String, Path, description = "The queue's name"),
    ),
    responses(
        (status = 200, description = "Resumed", body = QueuePaused),
    )
)]
async fn resume_queue(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<Json<QueuePaused>> {
    Ok(Json(jobs::set_queue_paused(&state, name, false).await?))
}

#[utoipa::path(
    put,
    path = paths::WORKFLOW_ROUTE,
    tag = "workflows",
    params(
        ("name" = String, Path, description = "The workflow's name"),
    ),
    request_body(content = String, content_type = "application/yaml", description = "The definition, YAML or JSON"),
    responses(
        (status = 201, description = "A new version", body = Workflow),
        (status = 200, description = "The same definition as the current version", body = Workflow),
        (status = 422, description = "The definition's problems, each in `details`", body = sluice_protocol::ErrorBody),
    )
)]
async fn register_workflow(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
    TextBody(text): TextBody,
) -> ApiResult<(StatusCode, Json<Workflow>)> {
    let (workflow, created) = workflows::register(&state, &name, &text).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(workflow)))
}

/// `?version=<hash>` picks a stored version instead of the current one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionQuery {
    version: Option<String>,
}

#[utoipa::path(
    get,
    path = paths::WORKFLOW_ROUTE,
    tag = "workflows",
    params(
        ("name" = String, Path, description = "The workflow's name"),
        ("version" = Option<String>, Query, description = "A stored version (its hash)"),
    ),
    responses(
        (status = 200, description = "The workflow", body = Workflow),
        (status = 404, description = "No such workflow", body = sluice_protocol::ErrorBody),
    )
)]
async fn get_workflow(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
    JsonQuery(query): JsonQuery<VersionQuery>,
) -> ApiResult<Json<Workflow>> {
    Ok(Json(
        workflows::get(&state, &name, query.version.as_deref()).await?,
    ))
}

#[utoipa::path(
    get,
    path = paths::WORKFLOWS,
    tag = "workflows",
    responses(
        (status = 200, description = "Every workflow's current version", body = WorkflowList),
    )
)]
async fn list_workflows(State(state): State<AppState>) -> ApiResult<Json<WorkflowList>> {
    Ok(Json(WorkflowList {
        workflows: workflows::list(&state).await?,
    }))
}

#[utoipa::path(
    post,
    path = paths::WORKFLOWS_RUN,
    tag = "runs",
    request_body = RunRequest,
    responses(
        (status = 201, description = "Started", body = RunStarted),
        (status = 404, description = "No such workflow", body = sluice_protocol::ErrorBody),
        (status = 422, description = "An inline definition's problems", body = sluice_protocol::ErrorBody),
    )
)]
async fn start_run(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<RunRequest>,
) -> ApiResult<(StatusCode, Json<RunStarted>)> {
    Ok((
        StatusCode::CREATED,
        Json(workflows::start_run(&state, request).await?),
    ))
}

/// A run id from a path; anything else names no run.
fn run_id(id: &str) -> crate::Result<i64> {
    id.parse().map_err(|_| Error::NotFound("run"))
}

#[utoipa::path(
    get,
    path = paths::RUN_ROUTE,
    tag = "runs",
    params(
        ("id" = i64, Path, description = "The run's id"),
    ),
    responses(
        (status = 200, description = "The run with its steps", body = Run),
        (status = 404, description = "No such run", body = sluice_protocol::ErrorBody),
    )
)]
async fn get_run(
    State(state): State<AppState>,
    JsonPath(id): JsonPath<String>,
) -> ApiResult<Json<Run>> {
    Ok(Json(workflows::get_run(&state, run_id(&id)?).await?))
}

/// A step's artifacts: the tar archive its sidecar packed, streamed a chunk at a time.
#[utoipa::path(
    get,
    path = paths::RUN_ARTIFACTS_ROUTE,
    tag = "runs",
    params(
        ("id" = i64, Path, description = "The run's id"),
        ("step" = String, Path, description = "The step"),
    ),
    responses(
        (status = 200, description = "The step's artifacts, a tar archive (`X-Sluice-Sha256`)", content_type = "application/x-tar", body = Vec<u8>),
        (status = 404, description = "No such artifact set", body = sluice_protocol::ErrorBody),
    )
)]
async fn run_artifacts(
    State(state): State<AppState>,
    JsonPath((id, step)): JsonPath<(String, String)>,
) -> ApiResult<axum::response::Response> {
    let download = workflows::artifacts::download(&state, run_id(&id)?, &step).await?;
    let mut response = axum::response::Response::new(download.body);
    let headers = response.headers_mut();
    use axum::http::{header, HeaderValue};
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(download.bytes));
    if let Ok(value) = HeaderValue::from_str(&download.sha256) {
        headers.insert("x-sluice-sha256", value);
    }
    headers.insert("x-sluice-entries", HeaderValue::from(download.entries));
    if let Ok(value) = HeaderValue::from_str(&skipped_header(&download.skipped)) {
        headers.insert("x-sluice-skipped", value);
    }
    Ok(response)
}

/// The skipped paths as a JSON array in ASCII (`\\uXXXX` escapes), at most 8 KiB: the
/// paths that do not fit are left out, and a last element says how many.
fn skipped_header(skipped: &serde_json::Value) -> String {
    const MAX: usize = 8 << 10;
    let paths: Vec<&str> = skipped
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_str()).collect())
        .unwrap_or_default();
    let mut out = String::from("[");
    for (n, path) in paths.iter().enumerate() {
        let mut item = String::from(if n == 0 { "\"" } else { ",\"" });
        for c in path.chars() {
            match c {
                '"' => item.push_str("\\\""),
                '\\' => item.push_str("\\\\"),
                ' '..='~' => item.push(c),
                _ => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        item.push_str(&format!("\\u{unit:04x}"));
                    }
                }
            }
        }
        item.push('"');
        if out.len() + item.len() + 64 > MAX {
            out.push_str(&format!(
                "{}\"... and {} more\"",
                if n == 0 { "" } else { "," },
                paths.len() - n
            ));
            break;
        }
        out.push_str(&item);
    }
    out.push(']');
    out
}

#[utoipa::path(
    post,
    path = paths::RUN_CANCEL_ROUTE,
    tag = "runs",
    params(
        ("id" = i64, Path, description = "The run's id"),
    ),
    responses(
        (status = 200, description = "Cancelled, or the state it had ended in", body = RunStateChange),
        (status = 404, description = "No such run", body = sluice_protocol::ErrorBody),
    )
)]
async fn cancel_run(
    State(state): State<AppState>,
    JsonPath(id): JsonPath<String>,
) -> ApiResult<Json<RunStateChange>> {
    Ok(Json(workflows::cancel_run(&state, run_id(&id)?).await?))
}

/// `GET /api/runs` filters and paging.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    workflow: Option<String>,
    state: Option<String>,
    before: Option<i64>,
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = paths::RUNS,
    tag = "runs",
    params(
        ("workflow" = Option<String>, Query, description = "Only this workflow's runs"),
        ("state" = Option<sluice_protocol::api::RunState>, Query, description = "Only runs in this state"),
        ("before" = Option<i64>, Query, description = "Ids below this (the next page)"),
        ("limit" = Option<i64>, Query, description = "At most this many"),
    ),
    responses(
        (status = 200, description = "Runs, newest first", body = RunList),
    )
)]
async fn list_runs(
    State(state): State<AppState>,
    JsonQuery(query): JsonQuery<RunsQuery>,
) -> ApiResult<Json<RunList>> {
    Ok(Json(
        workflows::list_runs(
            &state,
            query.workflow.as_deref(),
            query.state.as_deref(),
            query.before,
            query.limit,
        )
        .await?,
    ))
}

#[utoipa::path(
    put,
    path = paths::SCHEDULE_ROUTE,
    tag = "schedules",
    params(
        ("name" = String, Path, description = "The schedule's name"),
    ),
    request_body = ScheduleRequest,
    responses(
        (status = 201, description = "Created", body = Schedule),
        (status = 200, description = "Replaced", body = Schedule),
        (status = 404, description = "No such workflow", body = sluice_protocol::ErrorBody),
    )
)]
async fn put_schedule(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
    JsonBody(request): JsonBody<ScheduleRequest>,
) -> ApiResult<(StatusCode, Json<Schedule>)> {
    let (schedule, created) = cron::put(&state, &name, request).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(schedule)))
}

#[utoipa::path(
    get,
    path = paths::SCHEDULE_ROUTE,
    tag = "schedules",
    params(
        ("name" = String, Path, description = "The schedule's name"),
    ),
    responses(
        (status = 200, description = "The schedule, its next ticks and latest runs", body = Schedule),
        (status = 404, description = "No such schedule", body = sluice_protocol::ErrorBody),
    )
)]
async fn get_schedule(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<Json<Schedule>> {
    Ok(Json(cron::get(&state, &name).await?))
}

#[utoipa::path(
    delete,
    path = paths::SCHEDULE_ROUTE,
    tag = "schedules",
    params(
        ("name" = String, Path, description = "The schedule's name"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such schedule", body = sluice_protocol::ErrorBody),
    )
)]
async fn delete_schedule(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<StatusCode> {
    cron::delete(&state, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = paths::RUNNERS,
    tag = "runners",
    responses(
        (status = 200, description = "Runners and pools", body = sluice_protocol::api::RunnerList),
    )
)]
async fn list_runners(
    State(state): State<AppState>,
) -> ApiResult<Json<sluice_protocol::api::RunnerList>> {
    Ok(Json(runners::list(&state).await?))
}

#[utoipa::path(
    get,
    path = paths::SESSION_ROUTE,
    tag = "sessions",
    params(
        ("name" = String, Path, description = "The session's name"),
    ),
    responses(
        (status = 200, description = "The agent session's history", body = sluice_protocol::api::AgentSession),
        (status = 404, description = "No such session", body = sluice_protocol::ErrorBody),
    )
)]
async fn get_session(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<Json<sluice_protocol::api::AgentSession>> {
    Ok(Json(sessions::get(&state, &name).await?))
}

#[utoipa::path(
    delete,
    path = paths::SESSION_ROUTE,
    tag = "sessions",
    params(
        ("name" = String, Path, description = "The session's name"),
    ),
    responses(
        (status = 204, description = "Forgotten"),
        (status = 404, description = "No such session", body = sluice_protocol::ErrorBody),
    )
)]
async fn delete_session(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<StatusCode> {
    sessions::delete(&state, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = paths::SCHEDULE_PAUSE_ROUTE,
    tag = "schedules",
    params(
        ("name" = String, Path, description = "The schedule's name"),
    ),
    responses(
        (status = 200, description = "Paused", body = Schedule),
        (status = 404, description = "No such schedule", body = sluice_protocol::ErrorBody),
    )
)]
async fn pause_schedule(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<Json<Schedule>> {
    Ok(Json(cron::set_paused(&state, &name, true).await?))
}

#[utoipa::path(
    post,
    path = paths::SCHEDULE_RESUME_ROUTE,
    tag = "schedules",
    params(
        ("name" = String, Path, description = "The schedule's name"),
    ),
    responses(
        (status = 200, description = "Resumed", body = Schedule),
        (status = 404, description = "No such schedule", body = sluice_protocol::ErrorBody),
    )
)]
async fn resume_schedule(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<Json<Schedule>> {
    Ok(Json(cron::set_paused(&state, &name, false).await?))
}

#[utoipa::path(
    get,
    path = paths::SCHEDULES,
    tag = "schedules",
    responses(
        (status = 200, description = "Every schedule", body = ScheduleList),
    )
)]
async fn list_schedules(State(state): State<AppState>) -> ApiResult<Json<ScheduleList>> {
    Ok(Json(ScheduleList {
        schedules: cron::list(&state).await?,
    }))
}

#[utoipa::path(
    get,
    path = paths::READYZ,
    tag = "operations",
    responses(
        (status = 200, description = "Postgres answers", body = Health),
    )
)]
async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    match tokio::time::timeout(Duration::from_secs(2), store::ping(&state.pool)).await {
        Ok(Ok(())) => Ok(Json(Health {
            status: "ready".into(),
        })),
        Ok(Err(err)) => Err(err.into()),
        Err(_) => Err(Error::Unavailable("database ping timed out".into()).into()),
    }
}
