//! The public API: enqueue and read jobs, queues, health. Every `/api/*` route needs
//! `Authorization: Bearer <SLUICE_API_TOKEN>`; the check runs before the body is read. Each
//! handler parses, calls one function of [`crate::service::jobs`] and maps its result.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Query, State};
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
    bearer_token, healthz, ApiResult, AppError, AppState, JsonBody, JsonPath, TextBody,
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
async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(&state.pool).await;
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

async fn enqueue_batch(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<BatchRequest>,
) -> ApiResult<(StatusCode, Json<BatchResponse>)> {
    let jobs = jobs::enqueue_batch(&state, request.into_jobs()).await?;
    Ok((StatusCode::CREATED, Json(BatchResponse { jobs })))
}

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

async fn list_jobs(
    State(state): State<AppState>,
    query: Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<JobList>> {
    let Query(query) = query.map_err(|e| Error::invalid("query", e.body_text()))?;
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

async fn job_events(
    State(state): State<AppState>,
    JsonPath(id): JsonPath<String>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(|e| Error::invalid("query", e.body_text()))?;
    let topic = store::events::Topic::Job(job_id(&id)?);
    event_stream(&state, topic, &headers, query).await
}

async fn run_events(
    State(state): State<AppState>,
    JsonPath(id): JsonPath<String>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(|e| Error::invalid("query", e.body_text()))?;
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

async fn cancel_job(
    State(state): State<AppState>,
    JsonPath(id): JsonPath<String>,
) -> ApiResult<Json<JobStateChange>> {
    Ok(Json(jobs::cancel(&state, job_id(&id)?).await?))
}

async fn retry_job(
    State(state): State<AppState>,
    JsonPath(id): JsonPath<String>,
) -> ApiResult<Json<JobStateChange>> {
    Ok(Json(jobs::retry(&state, job_id(&id)?).await?))
}

async fn list_queues(State(state): State<AppState>) -> ApiResult<Json<QueueList>> {
    let queues = jobs::list_queues(&state).await?;
    Ok(Json(QueueList { queues }))
}

async fn pause_queue(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<Json<QueuePaused>> {
    Ok(Json(jobs::set_queue_paused(&state, name, true).await?))
}

async fn resume_queue(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<Json<QueuePaused>> {
    Ok(Json(jobs::set_queue_paused(&state, name, false).await?))
}

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

async fn get_workflow(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
    query: Result<Query<VersionQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Workflow>> {
    let Query(query) = query.map_err(|e| Error::invalid("query", e.body_text()))?;
    Ok(Json(
        workflows::get(&state, &name, query.version.as_deref()).await?,
    ))
}

async fn list_workflows(State(state): State<AppState>) -> ApiResult<Json<WorkflowList>> {
    Ok(Json(WorkflowList {
        workflows: workflows::list(&state).await?,
    }))
}

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

async fn get_run(
    State(state): State<AppState>,
    JsonPath(id): JsonPath<String>,
) -> ApiResult<Json<Run>> {
    Ok(Json(workflows::get_run(&state, run_id(&id)?).await?))
}

/// A step's artifacts: the tar archive its sidecar packed, streamed a chunk at a time.
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

async fn list_runs(
    State(state): State<AppState>,
    query: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<RunList>> {
    let Query(query) = query.map_err(|e| Error::invalid("query", e.body_text()))?;
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

async fn get_schedule(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<Json<Schedule>> {
    Ok(Json(cron::get(&state, &name).await?))
}

async fn delete_schedule(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<StatusCode> {
    cron::delete(&state, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_runners(
    State(state): State<AppState>,
) -> ApiResult<Json<sluice_protocol::api::RunnerList>> {
    Ok(Json(runners::list(&state).await?))
}

async fn get_session(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<Json<sluice_protocol::api::AgentSession>> {
    Ok(Json(sessions::get(&state, &name).await?))
}

async fn delete_session(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<StatusCode> {
    sessions::delete(&state, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause_schedule(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<Json<Schedule>> {
    Ok(Json(cron::set_paused(&state, &name, true).await?))
}

async fn resume_schedule(
    State(state): State<AppState>,
    JsonPath(name): JsonPath<String>,
) -> ApiResult<Json<Schedule>> {
    Ok(Json(cron::set_paused(&state, &name, false).await?))
}

async fn list_schedules(State(state): State<AppState>) -> ApiResult<Json<ScheduleList>> {
    Ok(Json(ScheduleList {
        schedules: cron::list(&state).await?,
    }))
}

async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    match tokio::time::timeout(Duration::from_secs(2), store::ping(&state.pool)).await {
        Ok(Ok(())) => Ok(Json(Health {
            status: "ready".into(),
        })),
        Ok(Err(err)) => Err(err.into()),
        Err(_) => Err(Error::Unavailable("database ping timed out".into()).into()),
    }
}
