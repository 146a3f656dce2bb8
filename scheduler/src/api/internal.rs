//! The internal runner API's handlers: each parses, calls one service
//! ([`crate::service::runners`], [`crate::service::dispatch`]) and maps the result. A runner
//! registers with the pool's secret and gets a token; every later call is authenticated by
//! that token alone.

use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use sluice_protocol::{
    paths, ArtifactSeal, ArtifactSealResponse, Attempt, ClaimRequest, ClaimResponse,
    CompleteManyRequest, CompleteManyResponse, CompleteResponse, Completion, HeartbeatRequest,
    HeartbeatResponse, JobId, LeaseToken, RegisterRequest, RegisterResponse, SessionTurns,
    SessionTurnsResponse, StreamRequest, StreamResponse,
};

use super::{
    bearer_token, healthz, ApiResult, AppError, AppState, JsonBody, JsonPath, RawBody,
    INTERNAL_BODY_LIMIT_BYTES,
};
use crate::service::{dispatch, runners, sessions, workflows::artifacts};
use crate::store::runners::RunnerIdentity;
use crate::Error;
use tracing::Instrument;

/// The internal router (`/internal/*`), its paths from the wire contract.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(paths::REGISTER, post(register))
        .route(paths::HEARTBEAT_ROUTE, post(heartbeat))
        .route(paths::CLAIM_ROUTE, post(claim))
        .route(paths::COMPLETE_MANY_ROUTE, post(complete_many))
        .route(paths::STREAM_ROUTE, post(stream))
        .route(paths::COMPLETE_ROUTE, post(complete))
        .route(paths::ARTIFACT_CHUNK_ROUTE, put(artifact_chunk))
        .route(paths::ARTIFACT_SEAL_ROUTE, post(artifact_seal))
        .route(paths::ARTIFACT_INPUT_ROUTE, get(artifact_input))
        .route(paths::SESSION_ROUTE, post(session_turns))
        .route(paths::HEALTHZ, get(healthz))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::track_internal,
        ))
        .fallback(super::not_found)
        .method_not_allowed_fallback(super::method_not_allowed)
        .layer(DefaultBodyLimit::max(INTERNAL_BODY_LIMIT_BYTES))
        .with_state(state)
}

/// The runner behind a request's bearer token (a lookup of the last two seconds may serve:
/// see [`crate::store::runners::TokenCache`]).
pub struct Runner(pub RunnerIdentity);

impl FromRequestParts<AppState> for Runner {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        Ok(Runner(
            runners::identify(state, bearer_token(&parts.headers), false).await?,
        ))
    }
}

/// The runner behind a request's bearer token, always looked up: for heartbeats, which must
/// tell a replaced runner at once.
pub struct LiveRunner(pub RunnerIdentity);

impl FromRequestParts<AppState> for LiveRunner {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        Ok(LiveRunner(
            runners::identify(state, bearer_token(&parts.headers), true).await?,
        ))
    }
}

fn job_id(id: &str) -> Result<JobId, Error> {
    // A malformed id cannot name a lease this runner holds; answer like any other stranger.
    id.parse().map(JobId).map_err(|_| Error::LeaseLost)
}

async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<RegisterRequest>,
) -> ApiResult<(StatusCode, Json<RegisterResponse>)> {
    let registered = runners::register(&state, bearer_token(&headers), request).await?;
    Ok((StatusCode::CREATED, Json(registered)))
}

async fn heartbeat(
    State(state): State<AppState>,
    LiveRunner(runner): LiveRunner,
    JsonPath(pod): JsonPath<String>,
    JsonBody(request): JsonBody<HeartbeatRequest>,
) -> ApiResult<Json<HeartbeatResponse>> {
    runners::check_pod(&runner, &pod)?;
    Ok(Json(runners::heartbeat(&state, &runner, request).await?))
}

async fn claim(
    State(state): State<AppState>,
    Runner(runner): Runner,
    JsonPath(pod): JsonPath<String>,
    JsonBody(request): JsonBody<ClaimRequest>,
) -> ApiResult<Json<ClaimResponse>> {
    runners::check_pod(&runner, &pod)?;
    Ok(Json(dispatch::claim(&state, &runner, &request).await?))
}

async fn stream(
    State(state): State<AppState>,
    Runner(runner): Runner,
    JsonPath(id): JsonPath<String>,
    JsonBody(request): JsonBody<StreamRequest>,
) -> ApiResult<Json<StreamResponse>> {
    let job = job_id(&id)?;
    let span = attempt_span(job, request.attempt, &runner);
    Ok(Json(
        runners::stream(&state, &runner, job, request)
            .instrument(span)
            .await?,
    ))
}

/// What a request about one attempt logs under: its job, attempt and runner.
fn attempt_span(
    job: sluice_protocol::JobId,
    attempt: sluice_protocol::Attempt,
    runner: &RunnerIdentity,
) -> tracing::Span {
    tracing::info_span!("attempt", job_id = %job, attempt = %attempt, runner_id = %runner.id)
}

async fn complete(
    State(state): State<AppState>,
    Runner(runner): Runner,
    JsonPath(id): JsonPath<String>,
    JsonBody(completion): JsonBody<Completion>,
) -> ApiResult<Json<CompleteResponse>> {
    let job = job_id(&id)?;
    let span = attempt_span(job, completion.attempt, &runner);
    Ok(Json(
        dispatch::complete(&state, &runner, job, completion)
            .instrument(span)
            .await?,
    ))
}

/// Many completions in one request and one commit (the runner's batch of attempts that ended
/// while its claim was waiting).
async fn complete_many(
    State(state): State<AppState>,
    Runner(runner): Runner,
    JsonPath(pod): JsonPath<String>,
    JsonBody(request): JsonBody<CompleteManyRequest>,
) -> ApiResult<Json<CompleteManyResponse>> {
    runners::check_pod(&runner, &pod)?;
    Ok(Json(
        dispatch::complete_many(&state, &runner, &request).await?,
    ))
}

fn chunk_seq(seq: &str) -> Result<u32, Error> {
    seq.parse()
        .map_err(|_| Error::invalid("seq", "must be a chunk number"))
}

/// The lease an artifact request names in its headers ([`sluice_protocol::lease_headers`]),
/// with the source's attempt on an input download.
pub struct LeaseHeaders {
    attempt: Attempt,
    lease_token: LeaseToken,
    source_attempt: Option<Attempt>,
}

impl<S: Send + Sync> FromRequestParts<S> for LeaseHeaders {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, AppError> {
        use sluice_protocol::lease_headers as names;
        let header = |name: &'static str| {
            parts
                .headers
                .get(name)
                .map(|v| v.to_str().unwrap_or_default().trim().to_string())
        };
        let attempt = |name: &'static str| -> Result<Option<Attempt>, Error> {
            header(name)
                .map(|v| {
                    v.parse::<i32>()
                        .ok()
                        .filter(|n| *n >= 1)
                        .map(Attempt)
                        .ok_or_else(|| Error::invalid(name, "must be an attempt number"))
                })
                .transpose()
        };
        let lease_token = header(names::LEASE_TOKEN)
            .ok_or_else(|| Error::invalid(names::LEASE_TOKEN, "is missing"))?
            .parse::<uuid::Uuid>()
            .map(LeaseToken)
            .map_err(|_| Error::invalid(names::LEASE_TOKEN, "must be a UUID"))?;
        Ok(LeaseHeaders {
            attempt: attempt(names::ATTEMPT)?
                .ok_or_else(|| Error::invalid(names::ATTEMPT, "is missing"))?,
            lease_token,
            source_attempt: attempt(names::SOURCE_ATTEMPT)?,
        })
    }
}

/// One chunk of an attempt's artifacts, the raw bytes as the body.
async fn artifact_chunk(
    State(state): State<AppState>,
    Runner(runner): Runner,
    JsonPath((id, seq)): JsonPath<(String, String)>,
    lease: LeaseHeaders,
    RawBody(body): RawBody,
) -> ApiResult<StatusCode> {
    let job = job_id(&id)?;
    let (attempt, token) = (lease.attempt, lease.lease_token);
    artifacts::put_chunk(
        &state,
        &runner,
        job,
        chunk_seq(&seq)?,
        (attempt, token),
        &body,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn artifact_seal(
    State(state): State<AppState>,
    Runner(runner): Runner,
    JsonPath(id): JsonPath<String>,
    JsonBody(seal): JsonBody<ArtifactSeal>,
) -> ApiResult<Json<ArtifactSealResponse>> {
    Ok(Json(
        artifacts::seal(&state, &runner, job_id(&id)?, seal).await?,
    ))
}

/// An agent attempt's new turns for its session, kept until its job succeeds.
async fn session_turns(
    State(state): State<AppState>,
    Runner(runner): Runner,
    JsonPath(id): JsonPath<String>,
    JsonBody(turns): JsonBody<SessionTurns>,
) -> ApiResult<Json<SessionTurnsResponse>> {
    Ok(Json(
        sessions::keep_turns(&state, &runner, job_id(&id)?, turns).await?,
    ))
}

/// One chunk of a parent step's artifacts, for the attempt whose lease the query carries.
async fn artifact_input(
    State(state): State<AppState>,
    Runner(runner): Runner,
    JsonPath((id, source, seq)): JsonPath<(String, String, String)>,
    lease: LeaseHeaders,
) -> ApiResult<Vec<u8>> {
    let job = job_id(&id)?;
    let source: JobId = source
        .parse()
        .map(JobId)
        .map_err(|_| Error::NotFound("artifact chunk"))?;
    let source_attempt = lease.source_attempt.ok_or_else(|| {
        Error::invalid(sluice_protocol::lease_headers::SOURCE_ATTEMPT, "is missing")
    })?;
    let lease_of = (lease.attempt, lease.lease_token);
    Ok(artifacts::input_chunk(
        &state,
        &runner,
        job,
        (source, source_attempt),
        chunk_seq(&seq)?,
        lease_of,
    )
    .await?)
}
