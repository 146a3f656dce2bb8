//! The public API (`/api/*`): what applications, operators and the `sluice` CLI send and get,
//! typed end to end. Apart from the runner wire types ([`crate::wire`]): the two contracts
//! change for different readers. Errors answer with [`crate::ErrorBody`] on both.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::ids::{JobId, JobState};

/// Every path of the public API, defined once: the `*_ROUTE` constants are the scheduler's
/// route patterns, the functions build a concrete path.
pub mod paths {
    /// `POST`: enqueue one job ([`super::EnqueueRequest`] → [`super::EnqueueResponse`]);
    /// `GET`: jobs, newest first ([`super::JobList`]); `?queue=`, `?state=`,
    /// `?since=<RFC 3339>` (created at or after), `?before=<job id>`, `?limit=` (1–1,000).
    pub const JOBS: &str = "/api/jobs";
    /// `POST`: retry many failed (or cancelled) jobs at once, a bulk redrive
    /// ([`super::RetryManyRequest`] → [`super::RetryManyResponse`]).
    pub const JOBS_RETRY: &str = "/api/jobs/retry";
    /// `POST`: enqueue many in one transaction ([`super::BatchRequest`]).
    pub const JOBS_BATCH: &str = "/api/jobs/batch";
    /// `GET`: one job with its attempts ([`super::Job`]).
    pub const JOB_ROUTE: &str = "/api/jobs/{id}";
    /// `GET`: the job's events as Server-Sent Events (`id:` the global position, `event:` the
    /// kind, `data:` JSON), history then live, ending after the terminal event (named by the
    /// final state); `Last-Event-ID` or `?after=<position>` resumes.
    pub const JOB_EVENTS_ROUTE: &str = "/api/jobs/{id}/events";
    /// `POST`: cancel ([`super::JobStateChange`]).
    pub const JOB_CANCEL_ROUTE: &str = "/api/jobs/{id}/cancel";
    /// `POST`: retry a failed or cancelled job ([`super::JobStateChange`]).
    pub const JOB_RETRY_ROUTE: &str = "/api/jobs/{id}/retry";
    /// `GET`: every queue ([`super::QueueList`]).
    pub const QUEUES: &str = "/api/queues";
    /// `POST`: pause a queue ([`super::QueuePaused`]).
    pub const QUEUE_PAUSE_ROUTE: &str = "/api/queues/{name}/pause";
    /// `POST`: resume a queue ([`super::QueuePaused`]).
    pub const QUEUE_RESUME_ROUTE: &str = "/api/queues/{name}/resume";
    /// `GET`: every workflow's current version ([`super::WorkflowList`]).
    pub const WORKFLOWS: &str = "/api/workflows";
    /// `PUT`: register a definition, YAML or JSON (→ [`super::Workflow`]); `GET`: the current
    /// version, or `?version=<hash>`.
    pub const WORKFLOW_ROUTE: &str = "/api/workflows/{name}";
    /// `POST`: start a run ([`super::RunRequest`] → [`super::RunStarted`]).
    pub const WORKFLOWS_RUN: &str = "/api/workflows/run";
    /// `GET`: runs, newest first ([`super::RunList`]); `?workflow=`, `?state=`,
    /// `?before=<run id>`, `?limit=`.
    pub const RUNS: &str = "/api/runs";
    /// `GET`: a run with its steps ([`super::Run`]).
    pub const RUN_ROUTE: &str = "/api/runs/{id}";
    /// `GET`: the run's events (every step job's, tagged `step`) as Server-Sent Events, as
    /// [`JOB_EVENTS_ROUTE`].
    pub const RUN_EVENTS_ROUTE: &str = "/api/runs/{id}/events";
    /// `POST`: cancel a run ([`super::RunStateChange`]).
    pub const RUN_CANCEL_ROUTE: &str = "/api/runs/{id}/cancel";
    /// `GET`: a step's artifacts, a tar archive (`Content-Length`, and `X-Sluice-Sha256`).
    pub const RUN_ARTIFACTS_ROUTE: &str = "/api/runs/{id}/artifacts/{step}";
    /// `GET`: every schedule ([`super::ScheduleList`]).
    pub const SCHEDULES: &str = "/api/schedules";
    /// `PUT`: create or replace ([`super::ScheduleRequest`] → [`super::Schedule`]); `GET`;
    /// `DELETE`.
    pub const SCHEDULE_ROUTE: &str = "/api/schedules/{name}";
    /// `POST`: pause a schedule ([`super::Schedule`]).
    pub const SCHEDULE_PAUSE_ROUTE: &str = "/api/schedules/{name}/pause";
    /// `POST`: resume a schedule ([`super::Schedule`]).
    pub const SCHEDULE_RESUME_ROUTE: &str = "/api/schedules/{name}/resume";
    /// `GET`: the registered runners ([`super::RunnerList`]).
    pub const RUNNERS: &str = "/api/runners";
    /// `GET`: an agent session's history ([`super::AgentSession`]); `DELETE` forgets it.
    pub const SESSION_ROUTE: &str = "/api/sessions/{name}";
    /// `GET`: Prometheus metrics (OpenMetrics text), with the API token.
    pub const METRICS: &str = "/metrics";
    /// `GET`: the public API's OpenAPI document, without a token.
    pub const OPENAPI: &str = "/openapi.json";
    /// `GET`: liveness ([`super::Health`]), without a token.
    pub const HEALTHZ: &str = "/healthz";
    /// `GET`: readiness (Postgres reachable), without a token.
    pub const READYZ: &str = "/readyz";

    pub fn job(id: crate::JobId) -> String {
        JOB_ROUTE.replace("{id}", &id.to_string())
    }
    pub fn job_events(id: crate::JobId) -> String {
        JOB_EVENTS_ROUTE.replace("{id}", &id.to_string())
    }
    pub fn run_events(id: i64) -> String {
        RUN_EVENTS_ROUTE.replace("{id}", &id.to_string())
    }
    pub fn cancel(id: crate::JobId) -> String {
        JOB_CANCEL_ROUTE.replace("{id}", &id.to_string())
    }
    pub fn retry(id: crate::JobId) -> String {
        JOB_RETRY_ROUTE.replace("{id}", &id.to_string())
    }
    pub fn pause(queue: &str) -> String {
        QUEUE_PAUSE_ROUTE.replace("{name}", queue)
    }
    pub fn resume(queue: &str) -> String {
        QUEUE_RESUME_ROUTE.replace("{name}", queue)
    }
    pub fn workflow(name: &str) -> String {
        WORKFLOW_ROUTE.replace("{name}", name)
    }
    pub fn schedule(name: &str) -> String {
        SCHEDULE_ROUTE.replace("{name}", name)
    }
    pub fn pause_schedule(name: &str) -> String {
        SCHEDULE_PAUSE_ROUTE.replace("{name}", name)
    }
    pub fn resume_schedule(name: &str) -> String {
        SCHEDULE_RESUME_ROUTE.replace("{name}", name)
    }
    pub fn session(name: &str) -> String {
        SESSION_ROUTE.replace("{name}", name)
    }
    pub fn run(id: i64) -> String {
        RUN_ROUTE.replace("{id}", &id.to_string())
    }
    pub fn run_artifacts(id: i64, step: &str) -> String {
        RUN_ARTIFACTS_ROUTE
            .replace("{id}", &id.to_string())
            .replace("{step}", step)
    }
    pub fn cancel_run(id: i64) -> String {
        RUN_CANCEL_ROUTE.replace("{id}", &id.to_string())
    }
}

/// `POST /api/jobs`: a job to enqueue. Every field but `spec` is optional; what is left out
/// comes from the queue's defaults. Unknown fields are refused (a typo is not silently
/// ignored). Ranges: [`crate::bounds`].
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    pub spec: Value,
    /// Lower runs first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// A repeated key answers with the first job (200) instead of enqueuing another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// How failed attempts are retried; what it leaves out comes from the queue's policy
    /// when the job fails (`retry.max_attempts` is the same as `max_attempts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

/// A retry policy: the n-th retry of a failed attempt waits `initial_ms × factor^(n-1)`, at
/// most `max_ms`, ±25 % jitter. Unset fields: the queue's policy, else 1 s, 2, one hour.
/// Ranges: [`crate::bounds`] (`MAX_RETRY_INITIAL_MS`, `MAX_RETRY_MAX_MS`, `*_RETRY_FACTOR`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Only on enqueue: the job's `max_attempts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
}

/// `POST /api/jobs/batch`: `{"jobs":[…]}`, or a bare array.
///
/// Deserialised by the body's shape rather than as an untagged enum, so that a member that
/// does not fit is named (`jobs[3].timeout_ms`) instead of "matches no variant".
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum BatchRequest {
    Wrapped { jobs: Vec<EnqueueRequest> },
    Bare(Vec<EnqueueRequest>),
}

impl<'de> Deserialize<'de> for BatchRequest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};

        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Wrapped {
            jobs: Vec<EnqueueRequest>,
        }

        struct Shape;

        impl<'de> serde::de::Visitor<'de> for Shape {
            type Value = BatchRequest;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("{\"jobs\": [...]} or an array of jobs")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<BatchRequest, A::Error> {
                Vec::deserialize(SeqAccessDeserializer::new(seq)).map(BatchRequest::Bare)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<BatchRequest, A::Error> {
                Wrapped::deserialize(MapAccessDeserializer::new(map))
                    .map(|wrapped| BatchRequest::Wrapped { jobs: wrapped.jobs })
            }
        }

        deserializer.deserialize_any(Shape)
    }
}

impl BatchRequest {
    /// The jobs, whichever form carried them.
    pub fn into_jobs(self) -> Vec<EnqueueRequest> {
        match self {
            BatchRequest::Wrapped { jobs } | BatchRequest::Bare(jobs) => jobs,
        }
    }
}

/// What an enqueue answers: 201 with a new job, 200 with the first job of a repeated
/// idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnqueueResponse {
    pub id: JobId,
    pub state: JobState,
}

/// What a batch answers: one entry per job, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchResponse {
    pub jobs: Vec<EnqueueResponse>,
}

/// `GET /api/jobs/:id`: a job and its attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Job {
    pub id: JobId,
    pub queue: String,
    pub state: JobState,
    pub spec: Value,
    pub priority: i32,
    /// The latest attempt's number (0 before the first claim).
    pub attempt: i32,
    pub max_attempts: i32,
    pub timeout_ms: Option<i64>,
    pub idempotency_key: Option<String>,
    /// The job's own retry policy (`null`: its queue's).
    pub retry: Option<RetryPolicy>,
    /// The last attempt's output.
    pub result: Option<Value>,
    /// Why the job failed (`{"code","message"}`), while it is failed or cancelled.
    pub error: Option<Value>,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Oldest first; the running one (if any) last, without `finished_at` or `outcome`.
    pub attempts: Vec<AttemptInfo>,
}

/// One attempt of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AttemptInfo {
    pub attempt: i32,
    pub runner_id: Option<Uuid>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// `succeeded`, `failed`, `lease_expired`, `cancelled` or `timed_out`.
    pub outcome: Option<String>,
    pub error: Option<Value>,
}

/// What a cancel or a retry answers: the job's state now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobStateChange {
    pub id: JobId,
    pub state: JobState,
}

/// A job in a list (`GET /api/jobs`): no spec, result or attempts (`GET /api/jobs/:id` has
/// them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobSummary {
    pub id: JobId,
    pub queue: String,
    pub state: JobState,
    /// The spec's `kind`.
    pub kind: Option<String>,
    pub priority: i32,
    pub attempt: i32,
    pub max_attempts: i32,
    /// The workflow run it is a step of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<i64>,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// `GET /api/jobs`: newest first; `next_before` continues the list (`?before=`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobList {
    pub jobs: Vec<JobSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<JobId>,
}

/// `POST /api/jobs/retry`: retries up to `limit` (default 1,000, at most 10,000) jobs in
/// `state` (`failed`, the default, or `cancelled`), oldest first, optionally of one `queue`
/// and finished at or after `since`. Workflow steps are left out (a run decides about its
/// steps). Call again while `more` is true. A request naming none of `queue`, `state` and
/// `since` must say `"all": true`, so that an empty body never redrives everything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RetryManyRequest {
    #[serde(default)]
    pub queue: Option<String>,
    #[serde(default)]
    pub state: Option<JobState>,
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
    #[serde(default)]
    pub limit: Option<u32>,
    /// Every job in the state, of every queue (required when nothing else filters).
    #[serde(default)]
    pub all: bool,
}

/// What a bulk retry did: the jobs it retried (each now `available` or `scheduled`) and
/// whether more matched than `limit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RetryManyResponse {
    pub retried: Vec<JobStateChange>,
    pub more: bool,
}

/// A queue with its settings and how many jobs it holds per state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Queue {
    pub name: String,
    pub paused: bool,
    pub max_running: Option<i32>,
    pub default_priority: i32,
    pub default_max_attempts: i32,
    pub default_timeout_ms: Option<i64>,
    /// The retry policy of its jobs that name none (`null`: the built-in one).
    pub default_retry: Option<RetryPolicy>,
    pub retention_seconds: f64,
    /// `{"available": n, "running": n, …}` over the jobs stored now.
    pub jobs: BTreeMap<String, i64>,
}

/// `GET /api/queues`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueueList {
    pub queues: Vec<Queue>,
}

/// What pausing or resuming a queue answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueuePaused {
    pub name: String,
    pub paused: bool,
}

/// A stored version of a workflow definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Workflow {
    pub name: String,
    /// SHA-256 of the canonical JSON definition, hex: the same content is the same version.
    pub version: String,
    pub steps: i32,
    /// The definition as stored: canonical JSON, `name` filled in.
    pub definition: Value,
    pub created_at: DateTime<Utc>,
    /// When this version was last registered: the newest is the current one.
    pub registered_at: DateTime<Utc>,
}

/// `GET /api/workflows`: every workflow's current version (definitions left out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkflowList {
    pub workflows: Vec<WorkflowSummary>,
}

/// A workflow in a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkflowSummary {
    pub name: String,
    pub version: String,
    pub steps: i32,
    pub registered_at: DateTime<Utc>,
}

/// `POST /api/workflows/run`: start a run of a registered workflow, or of a definition given
/// inline (registered first, under its `name` or `inline`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    pub workflow: WorkflowRef,
    /// What `{{ input.… }}` reads; `{}` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// A stored version (its hash) instead of the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A workflow by name, or a definition inline (a JSON object, or YAML text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum WorkflowRef {
    Name(String),
    Inline(Value),
}

/// What starting a run answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunStarted {
    pub run_id: i64,
    pub workflow: String,
    pub version: String,
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// `GET /api/runs/:id`: a run and each of its steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Run {
    pub id: i64,
    pub workflow: String,
    pub version: String,
    pub state: RunState,
    pub input: Value,
    /// Why it failed: `{"step", "error"}`.
    pub error: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// In the definition's order; the failure step last.
    pub steps: Vec<RunStep>,
}

/// A step of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunStep {
    pub id: String,
    /// `waiting`, `running`, `succeeded`, `skipped`, `failed` or `cancelled`.
    pub state: String,
    /// Its job's result (a `for_each` step: the list of its jobs' results, in order).
    pub output: Option<Value>,
    /// The failure step (`on_failure`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_failure: bool,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The jobs that run it (one, or one per `for_each` element), with their attempts.
    pub jobs: Vec<StepJob>,
}

/// A job of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepJob {
    pub id: JobId,
    pub index: i32,
    pub state: JobState,
    pub attempt: i32,
}

/// `GET /api/runs`: newest first; `next_before` pages on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunList {
    pub runs: Vec<RunSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<i64>,
}

/// A run in a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunSummary {
    pub id: i64,
    pub workflow: String,
    pub version: String,
    pub state: RunState,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What cancelling a run answers: its state now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunStateChange {
    pub id: i64,
    pub state: RunState,
}

/// `PUT /api/schedules/:name`: a cron schedule that starts runs of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// 5 fields (minutes), 6 (seconds first), or `@hourly`, `@daily`, `@weekly`,
    /// `@monthly`, `@yearly`; `L`, `W` and `#` as croner reads them.
    pub cron: String,
    /// An IANA zone the fields are read in (`Europe/Berlin`); `UTC` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// The workflow each tick runs (its current version when the tick fires).
    pub workflow: String,
    /// The runs' input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// While the last run still runs: `allow` (default), `skip`, `queue_one`, `replace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<String>,
    /// Ticks missed while no scheduler ran: `none` (default), `latest`, `all` (those within
    /// `catch_up_window_ms`, one day by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up_window_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
}

/// A stored schedule, with when it fires next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Schedule {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub workflow: String,
    pub input: Value,
    pub overlap: String,
    pub catch_up: String,
    pub catch_up_window_ms: i64,
    pub paused: bool,
    /// The next five fire times (none while paused).
    pub next_ticks: Vec<DateTime<Utc>>,
    pub last_tick_at: Option<DateTime<Utc>>,
    /// The latest fired ticks, newest first (`GET /api/schedules/:name` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_ticks: Vec<ScheduleTick>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A fired tick: `started`, `skipped`, `queued`, `replaced` or `failed` (the run could not
/// start; `error` says why).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleTick {
    pub tick_at: DateTime<Utc>,
    pub outcome: String,
    pub run_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub fired_at: DateTime<Utc>,
}

/// `GET /api/schedules`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleList {
    pub schedules: Vec<Schedule>,
}

/// `GET /healthz` and `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// `ok` (alive) or `ready` (Postgres reachable).
    pub status: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_batch_takes_either_shape_and_names_the_member_that_does_not_fit() {
        let wrapped: BatchRequest =
            serde_json::from_value(json!({"jobs": [{"spec": {"kind": "noop"}}]})).unwrap();
        assert_eq!(wrapped.into_jobs().len(), 1);
        let bare: BatchRequest =
            serde_json::from_value(json!([{"spec": {"kind": "noop"}}, {"spec": {}}])).unwrap();
        assert_eq!(bare.into_jobs().len(), 2);
        let body = json!({"jobs": [{"spec": {}}, {"spec": {}, "timeout_ms": -1}]}).to_string();
        let mut deserializer = serde_json::Deserializer::from_str(&body);
        let err =
            serde_path_to_error::deserialize::<_, BatchRequest>(&mut deserializer).unwrap_err();
        assert_eq!(err.path().to_string(), "jobs[1].timeout_ms");
        assert!(serde_json::from_value::<BatchRequest>(json!({"jobs": [], "x": 1})).is_err());
        assert!(serde_json::from_value::<BatchRequest>(json!("jobs")).is_err());
    }
}

/// `GET /api/sessions/:name`: an agent session's stored conversation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentSession {
    pub name: String,
    /// Messages API messages, oldest first (old tool results may be elided to keep the
    /// history under its cap).
    pub messages: Vec<Value>,
    /// Agent jobs that added turns.
    pub jobs: i64,
    /// The job whose attempt holds the session now, if any.
    pub held_by: Option<JobId>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `GET /api/runners`: runners registered now (or being started by a pool), and those gone
/// within the last hour; and the warm pools running them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunnerList {
    pub runners: Vec<RunnerInfo>,
    /// The warm pools written within the last hour (absent from older schedulers).
    #[serde(default)]
    pub pools: Vec<PoolInfo>,
}

/// A warm runner pool: where its runners come from and its last trouble.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolInfo {
    pub name: String,
    /// `local` or `kubernetes`.
    pub backend: String,
    /// The scheduler replica running it.
    pub holder: String,
    pub min_warm: i32,
    pub max_warm: i32,
    /// Why the last runner could not be started or died (pod creation refused by a quota, an
    /// image that cannot be pulled, a runner that crashes), until the pool is healthy again.
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// Starts are backed off until then.
    pub retry_at: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One runner as the scheduler knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunnerInfo {
    pub id: Uuid,
    pub pod_name: String,
    /// `starting` (started by a pool, not registered yet), `idle` (no task), `busy` (at
    /// least one), `draining` or `gone` (ended, replaced, or revoked); written as they change.
    pub state: String,
    pub slots: i32,
    /// Attempts it holds now.
    pub slots_in_use: i64,
    pub version: String,
    pub labels: Value,
    pub registered_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
}
