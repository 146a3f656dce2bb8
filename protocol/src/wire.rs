//! The runner wire contract: every `/internal/*` path ([`paths`]), the protocol version, the
//! request and response bodies, and the enums both sides match on (cancel reasons, event kinds,
//! error codes, failure codes). The scheduler's router, the sidecar's client and the testkit's
//! fake runner all use these, so none of them can drift.
//!
//! # Versions
//!
//! - **1** — register, heartbeat, claim, stream, and one completion per
//!   `POST /internal/tasks/:id/complete`.
//! - **2** — completions carried on claims and sent in batches
//!   (`POST /internal/runners/:pod/complete`); numbered heartbeats (`seq`) and `unrenewed`
//!   leases in their answers.
//!
//! A sidecar sends the newest version it speaks at registration; the scheduler answers with
//! the version both speak (400 `protocol_mismatch` naming both when there is none), and the
//! sidecar uses the forms of that version. A sidecar that sends none gets every form this
//! scheduler has, as before versions were sent.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{Attempt, AttemptRef, JobId, JobState, LeaseRef, LeaseToken, RunnerId};

/// The newest version of the wire contract this crate describes.
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest version a scheduler built from this crate still serves.
pub const OLDEST_PROTOCOL_VERSION: u32 = 1;
/// The first version with completions on claims, batched completions and numbered
/// heartbeats.
pub const BATCHED_COMPLETIONS: u32 = 2;

/// Header carrying a runner's bearer token (`Authorization: Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";

/// Every path of the internal (runner) API, defined once. The `*_ROUTE` constants are the
/// scheduler's route patterns; the functions build a concrete path.
pub mod paths {
    /// `POST`: register with the pool's secret ([`super::RegisterRequest`]).
    pub const REGISTER: &str = "/internal/runners/register";
    /// `POST`: renew leases, hear orders ([`super::HeartbeatRequest`]).
    pub const HEARTBEAT_ROUTE: &str = "/internal/runners/{pod}/heartbeat";
    /// `POST`: long-poll for tasks, carrying completions ([`super::ClaimRequest`]).
    pub const CLAIM_ROUTE: &str = "/internal/runners/{pod}/claim";
    /// `POST`: a batch of completions ([`super::CompleteManyRequest`]).
    pub const COMPLETE_MANY_ROUTE: &str = "/internal/runners/{pod}/complete";
    /// `POST`: an attempt's events ([`super::StreamRequest`]).
    pub const STREAM_ROUTE: &str = "/internal/tasks/{id}/stream";
    /// `POST`: one attempt's completion ([`super::Completion`]).
    pub const COMPLETE_ROUTE: &str = "/internal/tasks/{id}/complete";
    /// `PUT`: one chunk (`seq` from 0, at most [`crate::bounds::ARTIFACT_CHUNK_BYTES`]) of a
    /// step's artifact archive, the raw bytes as the body, the lease in headers
    /// ([`super::lease_headers`]).
    pub const ARTIFACT_CHUNK_ROUTE: &str = "/internal/tasks/{id}/artifacts/{seq}";
    /// `POST`: seal the uploaded chunks as the attempt's artifacts ([`super::ArtifactSeal`]).
    pub const ARTIFACT_SEAL_ROUTE: &str = "/internal/tasks/{id}/artifacts";
    /// `GET`: one chunk of a parent step's sealed artifacts, for the attempt of `{id}` (its
    /// lease in headers, and the source's sealed attempt, [`super::lease_headers`]).
    pub const ARTIFACT_INPUT_ROUTE: &str = "/internal/tasks/{id}/inputs/{source}/{seq}";
    /// `POST`: an agent step's new turns for its session ([`super::SessionTurns`]).
    pub const SESSION_ROUTE: &str = "/internal/tasks/{id}/session";
    /// `GET`: liveness, on both listeners.
    pub const HEALTHZ: &str = "/healthz";

    pub fn session(job: crate::JobId) -> String {
        SESSION_ROUTE.replace("{id}", &job.to_string())
    }

    pub fn heartbeat(pod: &str) -> String {
        HEARTBEAT_ROUTE.replace("{pod}", pod)
    }
    pub fn claim(pod: &str) -> String {
        CLAIM_ROUTE.replace("{pod}", pod)
    }
    pub fn complete_many(pod: &str) -> String {
        COMPLETE_MANY_ROUTE.replace("{pod}", pod)
    }
    pub fn stream(job: crate::JobId) -> String {
        STREAM_ROUTE.replace("{id}", &job.to_string())
    }
    pub fn complete(job: crate::JobId) -> String {
        COMPLETE_ROUTE.replace("{id}", &job.to_string())
    }
    pub fn artifact_chunk(job: crate::JobId, seq: u32) -> String {
        ARTIFACT_CHUNK_ROUTE
            .replace("{id}", &job.to_string())
            .replace("{seq}", &seq.to_string())
    }
    pub fn artifact_seal(job: crate::JobId) -> String {
        ARTIFACT_SEAL_ROUTE.replace("{id}", &job.to_string())
    }
    pub fn artifact_input(job: crate::JobId, source: crate::JobId, seq: u32) -> String {
        ARTIFACT_INPUT_ROUTE
            .replace("{id}", &job.to_string())
            .replace("{source}", &source.to_string())
            .replace("{seq}", &seq.to_string())
    }
}

/// A string enum of the wire: known names as variants, anything else kept as `Other`, so a
/// newer peer's name never fails a whole message.
macro_rules! wire_names {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A name this version does not know.
            Other(String),
        }

        impl $name {
            /// The name on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)*
                    $name::Other(text) => text,
                }
            }

            /// The variant of a wire name.
            pub fn parse(text: &str) -> $name {
                match text {
                    $($text => $name::$variant,)*
                    other => $name::Other(other.to_string()),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                Ok($name::parse(&text))
            }
        }

        /// A string; the names this version knows are its examples (a peer may send others).
        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .examples([$($text),*])
                    .into()
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}
    };
}

wire_names! {
    /// Why a runner must stop an attempt (a heartbeat's order).
    CancelReason {
        /// The attempt no longer holds its lease (reclaimed, completed, never this runner's).
        LeaseLost = "lease_lost",
        /// The job was cancelled.
        Cancelled = "cancelled",
        /// The job ran past its `timeout_ms`.
        TimedOut = "timed_out",
    }
}

wire_names! {
    /// What an event of an attempt says.
    EventKind {
        /// `{"text"}` or `{"text", "base64", "binary"}` — a chunk of the tool's stdout.
        Stdout = "stdout",
        /// The same for stderr.
        Stderr = "stderr",
        /// `{"stream", "limit_bytes"}` — output beyond the per-attempt cap was dropped.
        Truncated = "truncated",
        /// `{"pid"}` or `{"tool"}` — the tool started.
        Started = "started",
        /// `{"exit_code", "signal"}` or `{"tool", "ok"}` — the tool ended.
        Exited = "exited",
        /// `{"turn", "text"}` — an agent's text, deltas coalesced.
        Text = "text",
        /// `{"turn", "id", "name", "input"}` — an agent's tool call.
        ToolCall = "tool_call",
        /// `{"turn", "id", "name", "is_error", "content", "truncated"}` — its result, as sent
        /// back to the model (truncated for the event).
        ToolResult = "tool_result",
        /// `{"turn", "stop_reason", "input_tokens", "output_tokens", …}` — one model response's
        /// usage.
        Usage = "usage",
        /// `{"status"?, "error", "retry", "delay_ms"}` — a model request failed and is tried
        /// again.
        ModelRetry = "model_retry",
    }
}

wire_names! {
    /// The code of an error answer (`{"error":{"code","message"}}`), on either listener.
    ErrorCode {
        /// The attempt no longer holds the lease: kill the tool and abandon the task.
        LeaseLost = "lease_lost",
        Unauthorized = "unauthorized",
        Forbidden = "forbidden",
        NotFound = "not_found",
        MethodNotAllowed = "method_not_allowed",
        Malformed = "malformed_json",
        Invalid = "invalid_request",
        InvalidSpec = "invalid_spec",
        /// A workflow or schedule definition that cannot be accepted (422); `details` lists
        /// every problem.
        InvalidDefinition = "invalid_definition",
        TooLarge = "payload_too_large",
        /// The client did not send its request in time (408).
        Timeout = "request_timeout",
        /// Postgres is unreachable (503): runners ride a run of these out.
        Unavailable = "unavailable",
        /// The statement lost a deadlock or serialization conflict (503): retry at once.
        Busy = "busy",
        Conflict = "conflict",
        /// No wire version both sides speak (400 at registration).
        ProtocolMismatch = "protocol_mismatch",
        Internal = "internal",
    }
}

wire_names! {
    /// Why an attempt failed (a completion's or a job's `error.code`). Tools add their own
    /// refusal codes (`path_outside_workspace`, `address_refused`, …), kept as `Other`.
    FailureCode {
        /// The script exited non-zero.
        ExitCode = "exit_code",
        /// The script was killed by a signal.
        Signal = "signal",
        /// The tool ran past its timeout (not retried).
        TimedOut = "timed_out",
        /// The tool could not be started (retried).
        SpawnFailed = "spawn_failed",
        /// The runner shut down before the tool finished (retried).
        RunnerShutdown = "runner_shutdown",
        InvalidSpec = "invalid_spec",
        UnsupportedKind = "unsupported_kind",
        /// `network: none` asked of a runner that cannot give it.
        NetworkUnavailable = "network_unavailable",
        /// The tool failed near its memory limit (a reading, retried).
        MemoryLimit = "memory_limit",
        /// RLIMIT_CPU (SIGXCPU).
        CpuLimit = "cpu_limit",
        /// RLIMIT_FSIZE (SIGXFSZ).
        FileSizeLimit = "file_size_limit",
        /// The scheduler refused the attempt's events.
        EventsRefused = "events_refused",
        /// The attempt's events could not be delivered within the retry budget.
        EventsUndeliverable = "events_undeliverable",
        /// The scheduler refused the attempt's result; this failure replaces it.
        ResultRefused = "result_refused",
        /// The result was larger than [`crate::bounds::MAX_COMPLETION_BYTES`].
        ResultTooLarge = "result_too_large",
        /// The file named by `$SLUICE_OUTPUT` is not JSON, or too large.
        InvalidOutput = "invalid_output",
        /// The step's artifacts exceed `SLUICE_ARTIFACT_MAX_BYTES` or the entry cap (not
        /// retried).
        ArtifactsTooLarge = "artifacts_too_large",
        /// A parent's artifact archive was refused: its digest, a path outside the workspace,
        /// a link or special file, a size or entry count over the caps (not retried).
        ArtifactRefused = "artifact_refused",
        /// Artifacts could not be uploaded or downloaded within the retry budget (retried).
        ArtifactsUnavailable = "artifacts_unavailable",
        /// The runner is not configured for the job (an agent step without
        /// `ANTHROPIC_API_KEY`); not retried.
        Configuration = "configuration",
        /// An agent step used its `max_turns` without the model ending its turn (not retried).
        MaxTurns = "max_turns",
        /// An agent step used its token budget (not retried).
        TokenBudget = "token_budget",
        /// The model API refused the request (400, 401, 403, 404, 413): not retried.
        ModelRefused = "model_refused",
        /// The model API stayed unavailable (429, 529, 5xx, a cut stream) through every
        /// retry (retried).
        ModelUnavailable = "model_unavailable",
        /// The model API answered with something the protocol does not allow (not retried).
        ModelProtocol = "model_protocol",
        /// An agent step's new turns could not be handed to the scheduler (retried).
        SessionUnavailable = "session_unavailable",
    }
}

/// `POST /internal/runners/register`, authorised by the pool's registration secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub pod_name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub slots: u32,
    #[serde(default)]
    pub version: String,
    /// The newest wire version the runner speaks ([`PROTOCOL_VERSION`]); none from runners
    /// built before versions were sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
}

/// The runner's identity, the timings it must keep and the wire version to use.
#[derive(Clone, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub runner_id: RunnerId,
    /// Bearer token for every later call; stored hashed by the scheduler.
    pub token: String,
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    /// The version both sides speak; absent from schedulers built before versions were
    /// answered (treat as 1).
    #[serde(default = "first_version")]
    pub protocol: u32,
}

fn first_version() -> u32 {
    1
}

impl fmt::Debug for RegisterResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterResponse")
            .field("runner_id", &self.runner_id)
            .field("token", &"***")
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("lease_ms", &self.lease_ms)
            .field("protocol", &self.protocol)
            .finish()
    }
}

/// `POST /internal/runners/:pod/heartbeat`: renews the listed leases. A runner lists every
/// attempt whose tool may still be alive, until it has been killed and reaped.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    #[serde(default)]
    pub running: Vec<LeaseRef>,
    /// Numbers the runner's heartbeats, growing by one from 1 within a registration. A stopped
    /// attempt is confirmed gone only by a heartbeat numbered after the one that heard its
    /// order (so a late, stale heartbeat confirms nothing); without it, stops are waited out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// Orders for the runner: stop these attempts; stop claiming when `drain` is set. Every
/// listed lease that is neither cancelled nor `unrenewed` was renewed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    #[serde(default)]
    pub cancel: Vec<CancelOrder>,
    /// Leases still held but not renewed this time (their rows were busy with another
    /// statement): keep running, but do not count them as renewed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unrenewed: Vec<AttemptRef>,
    #[serde(default)]
    pub drain: bool,
}

/// One attempt the runner must kill and abandon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelOrder {
    pub job_id: JobId,
    pub attempt: Attempt,
    pub reason: CancelReason,
}

/// `POST /internal/runners/:pod/claim`: a long poll for up to `max` tasks.
///
/// `complete` may carry the completions of attempts that just ended, so that a runner whose
/// slots free up reports and refills them in one request and one commit. A claim that carries
/// completions never waits: it answers at once with what it could lease (the runner claims
/// again, without completions, to wait).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimRequest {
    pub max: u32,
    #[serde(default)]
    pub wait_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub complete: Vec<Completion>,
}

/// The tasks leased to the runner (empty when the wait ran out), and the result of each
/// completion the request carried, in the request's order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClaimResponse {
    pub tasks: Vec<Task>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub completed: Vec<CompletionResult>,
}

/// One leased attempt of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Task {
    pub job_id: JobId,
    pub attempt: Attempt,
    pub lease_token: LeaseToken,
    pub queue: String,
    /// The spec as stored; the sidecar parses it with [`crate::parse_stored_spec`] so that a
    /// spec it cannot run fails that one job instead of the whole claim.
    pub spec: Value,
    /// The job's server-side deadline, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// A workflow step's context (`{"input", "run", "steps": {id: {"output"}}, "item"?,
    /// "index"?}`); the spec's templates are filled from it already. The sidecar hands it to
    /// the tool as the file `$SLUICE_CONTEXT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Value>,
    /// A workflow step's artifacts: the parents' sets to unpack before the tool starts, the
    /// globs to pack when it succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<TaskArtifacts>,
    /// An agent step's session: the conversation so far, which the attempt continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<TaskSession>,
}

/// The stored conversation of an agent session, handed to the attempt that holds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskSession {
    pub name: String,
    /// Messages API messages (`{"role", "content"}`), oldest first; starts with a user
    /// message and ends with an assistant one.
    #[serde(default)]
    pub messages: Vec<Value>,
}

/// `POST /internal/tasks/:id/session`: the turns the attempt added to its session, kept
/// aside and made the session's history when the job succeeds. Sent before the completion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionTurns {
    pub attempt: Attempt,
    pub lease_token: LeaseToken,
    pub messages: Vec<Value>,
}

/// The answer to [`SessionTurns`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionTurnsResponse {
    pub stored: bool,
}

/// What a step's attempt does with artifacts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskArtifacts {
    /// Globs (relative to the workspace) of what to pack when the tool succeeds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub collect: Vec<String>,
    /// Sealed sets of the parent steps, in `depends_on` order, to unpack beneath the
    /// workspace before the tool starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<ArtifactSet>,
}

/// One sealed artifact archive (a tar stream split in chunks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactSet {
    /// The step that packed it.
    pub step: String,
    pub job_id: JobId,
    pub attempt: Attempt,
    pub chunks: u32,
    pub bytes: u64,
    /// Hex SHA-256 of the whole archive, checked by whoever unpacks it.
    pub sha256: String,
}

/// The headers naming an attempt's lease on the artifact routes, whose bodies are raw bytes
/// (never the query string: proxies log URLs).
pub mod lease_headers {
    /// The attempt (`i32`).
    pub const ATTEMPT: &str = "x-sluice-attempt";
    /// Its lease token (a UUID).
    pub const LEASE_TOKEN: &str = "x-sluice-lease-token";
    /// On an input download: the sealed attempt of the source step.
    pub const SOURCE_ATTEMPT: &str = "x-sluice-source-attempt";
}

/// `POST /internal/tasks/:id/artifacts`: the uploaded chunks `0..chunks` are the attempt's
/// artifacts. Sent before the attempt's completion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactSeal {
    pub attempt: Attempt,
    pub lease_token: LeaseToken,
    pub chunks: u32,
    pub bytes: u64,
    pub sha256: String,
    /// Files and directories packed.
    pub entries: u64,
    /// Paths matched but not packed (links, special files, files with several links).
    #[serde(default)]
    pub skipped: Vec<String>,
}

/// The answer to a seal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactSealResponse {
    pub sealed: bool,
}

impl Task {
    /// The fencing triple of this attempt.
    pub fn lease(&self) -> LeaseRef {
        LeaseRef {
            job_id: self.job_id,
            attempt: self.attempt,
            lease_token: self.lease_token,
        }
    }
}

/// One event of an attempt; `seq` starts at 1 and is dense per attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: i64,
    pub kind: EventKind,
    #[serde(default)]
    pub data: Value,
}

/// `POST /internal/tasks/:id/stream`: idempotent on `(job, attempt, seq)`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamRequest {
    pub attempt: Attempt,
    pub lease_token: LeaseToken,
    pub events: Vec<Event>,
}

/// How many of the posted events were new.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamResponse {
    pub stored: u64,
}

/// How an attempt ended, as the runner saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
}

/// Why an attempt failed: `code` for programs, `message` for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub code: FailureCode,
    pub message: String,
}

/// An attempt's completion: the one type of every form. In a batch (on a claim, or to
/// `POST /internal/runners/:pod/complete`) it names its job; to
/// `POST /internal/tasks/:id/complete` the path does, and `job_id` may be left out.
/// Idempotent: the same completion again is answered as the first was; a stale attempt gets
/// `lease_lost`, a different completion of an attempt already completed `conflict`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completion {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    pub attempt: Attempt,
    pub lease_token: LeaseToken,
    pub outcome: Outcome,
    #[serde(default)]
    pub output: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    /// `false` for failures that another attempt cannot fix (an invalid spec, for one).
    #[serde(default = "default_true")]
    pub retryable: bool,
    /// The last event `seq` of this attempt; later events are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_seq: Option<i64>,
}

fn default_true() -> bool {
    true
}

/// The job's state after the completion was applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteResponse {
    pub state: JobState,
}

/// What became of one completion of a batch: the job's state after it (applied now, or a
/// repeat of one applied before), or an error — `lease_lost` when the attempt no longer held
/// its lease, exactly where the single-task endpoint answers 409.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResult {
    pub job_id: JobId,
    pub attempt: Attempt,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// `POST /internal/runners/:pod/complete`: many completions in one request and one commit,
/// each idempotent and fenced like the single-task endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteManyRequest {
    pub completions: Vec<Completion>,
}

/// One result per completion, in the request's order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteManyResponse {
    pub completed: Vec<CompletionResult>,
}

/// An error answer's detail: `code` for programs, `message` for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
    /// Machine-readable particulars where there are several (each problem of a definition:
    /// `[{"at", "message"}]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// The body of every error response, on both listeners: `{"error":{"code","message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn runner_tokens_are_not_printed() {
        let reg = RegisterResponse {
            runner_id: RunnerId(uuid::Uuid::new_v4()),
            token: "CANARY-secret".into(),
            heartbeat_ms: 1,
            lease_ms: 2,
            protocol: PROTOCOL_VERSION,
        };
        assert!(!format!("{reg:?}").contains("CANARY"));
    }

    #[test]
    fn wire_names_round_trip_and_keep_names_they_do_not_know() {
        let order: CancelOrder =
            serde_json::from_value(json!({"job_id": 1, "attempt": 2, "reason": "timed_out"}))
                .unwrap();
        assert_eq!(order.reason, CancelReason::TimedOut);
        let newer: CancelReason = serde_json::from_value(json!("paused")).unwrap();
        assert_eq!(newer, CancelReason::Other("paused".into()));
        assert_eq!(serde_json::to_value(&newer).unwrap(), json!("paused"));
        assert_eq!(EventKind::parse("stdout"), EventKind::Stdout);
        assert_eq!(ErrorCode::LeaseLost.as_str(), "lease_lost");
        assert_eq!(
            FailureCode::parse("address_refused").as_str(),
            "address_refused"
        );
    }

    #[test]
    fn one_completion_type_serves_every_form() {
        let single: Completion = serde_json::from_value(json!({
            "attempt": 1,
            "lease_token": uuid::Uuid::nil(),
            "outcome": "failed",
            "error": {"code": "exit_code", "message": "exited 3"},
        }))
        .unwrap();
        assert_eq!(single.job_id, None);
        assert!(single.retryable);
        assert_eq!(single.error.unwrap().code, FailureCode::ExitCode);
        let versionless: RegisterResponse = serde_json::from_value(json!({
            "runner_id": uuid::Uuid::nil(), "token": "t", "heartbeat_ms": 1, "lease_ms": 2
        }))
        .unwrap();
        assert_eq!(
            versionless.protocol, 1,
            "a scheduler that answers no version speaks 1"
        );
    }

    #[test]
    fn paths_are_built_from_their_routes() {
        assert_eq!(paths::claim("pod-1"), "/internal/runners/pod-1/claim");
        assert_eq!(paths::complete(JobId(42)), "/internal/tasks/42/complete");
        assert_eq!(paths::stream(JobId(7)), "/internal/tasks/7/stream");
    }
}
