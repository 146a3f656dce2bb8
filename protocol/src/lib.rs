//! Wire types shared by the sluice scheduler and the runner sidecar.
//!
//! This crate is the API boundary between the two processes: plain serde types with public
//! fields and no behaviour beyond parsing. It does no I/O and depends on neither side, so a
//! change here is a change of the wire contract ([`PROTOCOL_VERSION`]).
//!
//! # Layout
//!
//! - ids and the fencing triple: [`JobId`], [`Attempt`], [`LeaseToken`], [`RunnerId`], [`LeaseRef`];
//! - job specs, tagged by `kind`: [`JobSpec`] and its variants;
//! - the internal runner endpoints: [`RegisterRequest`] … [`CompleteResponse`];
//! - the JSON error body every endpoint answers with: [`ErrorBody`];
//! - [`Secret`], the redacting wrapper both sides keep tokens in;
//! - [`bounds`]: the documented range of every input, and the NUL checks both sides share.

pub mod bounds;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// A secret string — an API token, a runner token, the registration secret — whose `Debug`
/// and `Display` print `***`, so that a log line or a panic message cannot leak it. Shared by
/// both sides because both hold such tokens.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A fresh random token (256 bits from the OS generator) with a readable prefix, so that
    /// leaked tokens are easy to find with grep.
    pub fn generate(prefix: &str) -> Self {
        let a = Uuid::new_v4().simple().to_string();
        let b = Uuid::new_v4().simple().to_string();
        Secret(format!("{prefix}{a}{b}"))
    }

    /// Compares in time independent of where the first difference is.
    pub fn matches(&self, candidate: &str) -> bool {
        let a = self.0.as_bytes();
        let b = candidate.as_bytes();
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Version of the scheduler↔sidecar wire contract; sent by the sidecar at registration.
pub const PROTOCOL_VERSION: u32 = 1;

/// Header carrying a runner's bearer token (`Authorization: Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";

/// A job's id: the `bigint` primary key of `sluice.jobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub i64);

/// The attempt number of a job; the first run is attempt 1. Part of every fencing check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Attempt(pub i32);

/// A fresh random token minted with each claim; a runner write is applied only while the
/// job's current lease carries this token, so a reclaimed attempt cannot write.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseToken(pub Uuid);

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Lease tokens are capabilities for one attempt; logs get only a prefix.
        let text = self.0.simple().to_string();
        write!(f, "LeaseToken({}…)", &text[..8])
    }
}

/// A runner instance's id; a new one is minted on every registration, even for a known pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunnerId(pub Uuid);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The fencing triple that names one attempt's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseRef {
    pub job_id: JobId,
    pub attempt: Attempt,
    pub lease_token: LeaseToken,
}

/// The states of a job, mirrored by the Postgres enum `sluice.job_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waits on workflow parents.
    Blocked,
    /// `run_at` is in the future (a delay or a retry back-off).
    Scheduled,
    /// Ready to be claimed.
    Available,
    /// Leased to a runner.
    Running,
    Succeeded,
    /// Attempts exhausted, or the failure was not retryable.
    Failed,
    Cancelled,
}

impl JobState {
    /// All states, in lifecycle order.
    pub const ALL: [JobState; 7] = [
        JobState::Blocked,
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The name used in SQL, JSON and the docs.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Blocked => "blocked",
            JobState::Scheduled => "scheduled",
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Parses the SQL/JSON name.
    pub fn parse(name: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Terminal states never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Job specs
// ---------------------------------------------------------------------------------------------

/// The kinds a spec may name; the SQL trigger keeps the same list.
pub const SPEC_KINDS: [&str; 4] = ["bash", "tool", "agent", "noop"];

/// What a job runs, tagged by `kind`. Unknown fields are ignored so that a newer scheduler can
/// add fields an older sidecar does not know; unknown kinds are rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSpec {
    Bash(BashSpec),
    Tool(ToolSpec),
    Agent(AgentSpec),
    /// Completes at once without forking: health checks and queue benchmarks.
    Noop(NoopSpec),
}

impl JobSpec {
    /// The `kind` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Bash(_) => "bash",
            JobSpec::Tool(_) => "tool",
            JobSpec::Agent(_) => "agent",
            JobSpec::Noop(_) => "noop",
        }
    }

    /// The spec's own wall timeout, if it sets one.
    pub fn timeout_ms(&self) -> Option<u64> {
        match self {
            JobSpec::Bash(spec) => spec.timeout_ms,
            _ => None,
        }
    }
}

/// `{"kind":"bash","script":"…"}`: run a script with bash in the task's workspace. The script
/// reaches bash through a descriptor, not argv, so its size is bounded only by
/// [`bounds::MAX_SPEC_BYTES`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BashSpec {
    pub script: String,
    /// Extra environment for the script; added to the sidecar's allow-list, never replacing it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// `none` runs the tool in a network namespace of its own with only loopback; unset takes
    /// the runner's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
}

/// What network a tool sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// The runner's own network: whatever the pod (or host) can reach, Postgres and the
    /// scheduler's internal port included unless NetworkPolicies or the host's firewall fence
    /// them; the runner token is still out of the tool's reach.
    Full,
    /// A fresh network namespace with only loopback: no route anywhere. A runner that cannot
    /// create one refuses the job (`network_unavailable`) rather than run it with a network.
    None,
}

/// Per-job resource limits, each per tool process. A job can only lower the runner's
/// defaults, never raise them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// CPU time (RLIMIT_CPU: SIGXCPU, then SIGKILL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<u64>,
    /// Heap and private memory (RLIMIT_DATA): an allocation beyond it fails with ENOMEM.
    /// Runtimes that reserve large virtual ranges (Go, Java, V8) still start under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Virtual address space (RLIMIT_AS), which also bounds shared mappings; none by default
    /// since it breaks runtimes that reserve large ranges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_space_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_size_bytes: Option<u64>,
}

/// The tools a runner offers, to `tool` jobs and to the agent loop alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolName {
    Bash,
    ReadFile,
    WriteFile,
    Grep,
    WebFetch,
}

/// `{"kind":"tool","tool":"read_file","input":{…}}`: one tool call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub tool: ToolName,
    #[serde(default)]
    pub input: Value,
    /// As [`BashSpec::network`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
}

/// `{"kind":"agent","prompt":"…"}`: an Anthropic Messages tool-use loop run by the sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSpec {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ToolName>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
}

/// `{"kind":"noop"}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NoopSpec {}

/// Why a spec was refused, in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError(pub String);

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpecError {}

/// Validates a spec as JSON and returns it typed. The message names the problem (a missing
/// `kind`, an unknown one, a missing field, a value out of its [`bounds`]) and the field,
/// without echoing large inputs.
pub fn parse_spec(value: &Value) -> Result<JobSpec, SpecError> {
    let spec = parse_spec_shape(value)?;
    if let Some(path) = bounds::nul_path(value) {
        return Err(SpecError(format!(
            "{} must not contain NUL characters",
            bounds::field_path("spec", &path)
        )));
    }
    let size = serde_json::to_vec(value).map(|v| v.len()).unwrap_or(0);
    if size > bounds::MAX_SPEC_BYTES {
        return Err(SpecError(format!(
            "spec is {size} bytes as JSON; at most {} are allowed",
            bounds::MAX_SPEC_BYTES
        )));
    }
    check_spec(&spec).map_err(|e| SpecError(format!("spec.{e}")))?;
    Ok(spec)
}

/// A spec as stored, typed, for the runner: its shape only. The ranges of [`parse_spec`] hold
/// for what is enqueued now; a spec enqueued before a range existed (or through an older
/// scheduler) still runs, with the runner clamping what it must.
pub fn parse_stored_spec(value: &Value) -> Result<JobSpec, SpecError> {
    parse_spec_shape(value)
}

/// The ranges of a typed spec's own fields.
fn check_spec(spec: &JobSpec) -> Result<(), String> {
    if let JobSpec::Bash(bash) = spec {
        bounds::check_range("timeout_ms", bash.timeout_ms, 1..=bounds::MAX_TIMEOUT_MS)?;
        bounds::check_env(&bash.env)?;
        if let Some(limits) = &bash.limits {
            for (name, value) in [
                ("cpu_seconds", limits.cpu_seconds),
                ("memory_bytes", limits.memory_bytes),
                ("address_space_bytes", limits.address_space_bytes),
                ("open_files", limits.open_files),
                ("processes", limits.processes),
                ("file_size_bytes", limits.file_size_bytes),
            ] {
                bounds::check_range(&format!("limits.{name}"), value, 1..=bounds::MAX_LIMIT)?;
            }
        }
    }
    Ok(())
}

/// Numbers a spec may hold must be non-negative integers, and `network` one of its two
/// names: said here with the field's name,
/// which serde's message for an internally tagged enum would not give.
fn check_typed_fields(object: &serde_json::Map<String, Value>) -> Result<(), SpecError> {
    let not_unsigned = |v: &Value| !v.is_null() && !v.is_u64();
    for field in ["timeout_ms", "max_turns", "max_tokens"] {
        if object.get(field).is_some_and(not_unsigned) {
            return Err(SpecError(format!(
                "spec.{field} must be a positive integer"
            )));
        }
    }
    if let Some(network) = object.get("network") {
        if !matches!(network.as_str(), Some("full" | "none")) {
            return Err(SpecError(
                "spec.network must be \"full\" or \"none\"".into(),
            ));
        }
    }
    if let Some(Value::Object(limits)) = object.get("limits") {
        if let Some((name, _)) = limits.iter().find(|(_, v)| not_unsigned(v)) {
            return Err(SpecError(format!(
                "spec.limits.{name} must be a positive integer"
            )));
        }
    }
    Ok(())
}

/// The shape alone: a JSON object with a known `kind` and that kind's fields.
fn parse_spec_shape(value: &Value) -> Result<JobSpec, SpecError> {
    let Some(object) = value.as_object() else {
        return Err(SpecError("spec must be a JSON object".into()));
    };
    match object.get("kind") {
        None => {
            return Err(SpecError(format!(
                "spec has no \"kind\"; expected one of {}",
                SPEC_KINDS.join(", ")
            )))
        }
        Some(Value::String(kind)) if !SPEC_KINDS.contains(&kind.as_str()) => {
            let shown: String = kind.chars().take(64).collect();
            return Err(SpecError(format!(
                "unknown spec kind {shown:?}; expected one of {}",
                SPEC_KINDS.join(", ")
            )));
        }
        Some(Value::String(_)) => {}
        Some(_) => return Err(SpecError("spec \"kind\" must be a string".into())),
    }
    check_typed_fields(object)?;
    JobSpec::deserialize(value).map_err(|e| SpecError(format!("invalid spec: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Internal runner endpoints
// ---------------------------------------------------------------------------------------------

/// `POST /internal/runners/register`, authorised by the pool's registration secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub pod_name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub slots: u32,
    #[serde(default)]
    pub version: String,
}

/// The runner's identity and the timings it must keep.
#[derive(Clone, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub runner_id: RunnerId,
    /// Bearer token for every later call; stored hashed by the scheduler.
    pub token: String,
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
}

impl fmt::Debug for RegisterResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterResponse")
            .field("runner_id", &self.runner_id)
            .field("token", &"***")
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("lease_ms", &self.lease_ms)
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

/// One attempt of a job, without its lease token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttemptRef {
    pub job_id: JobId,
    pub attempt: Attempt,
}

/// One attempt the runner must kill and abandon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelOrder {
    pub job_id: JobId,
    pub attempt: Attempt,
    /// `lease_lost`, `cancelled` or `timed_out`.
    pub reason: String,
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
    pub complete: Vec<TaskCompletion>,
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
    /// The spec as stored; the sidecar parses it with [`parse_spec`] so that a spec it cannot
    /// run fails that one job instead of the whole claim.
    pub spec: Value,
    /// The job's server-side deadline, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
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

/// Event kinds the sidecar emits for a bash or tool run.
pub mod event_kind {
    /// `{"text": …}` — a chunk of the tool's stdout.
    pub const STDOUT: &str = "stdout";
    /// `{"text": …}` — a chunk of the tool's stderr.
    pub const STDERR: &str = "stderr";
    /// `{"stream", "limit_bytes"}` — output beyond the per-attempt cap was dropped.
    pub const TRUNCATED: &str = "truncated";
    /// `{"pid"}` — the tool process started.
    pub const STARTED: &str = "started";
    /// `{"exit_code", "signal"}` — the tool process ended.
    pub const EXITED: &str = "exited";
}

/// One event of an attempt; `seq` starts at 1 and is dense per attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: i64,
    pub kind: String,
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

/// A machine-readable error: `code` for programs, `message` for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// `POST /internal/tasks/:id/complete`: idempotent; a stale attempt gets 409.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteRequest {
    pub attempt: Attempt,
    pub lease_token: LeaseToken,
    pub outcome: Outcome,
    #[serde(default)]
    pub output: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
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

/// One attempt's completion inside a batch: a [`CompleteRequest`] that names its job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskCompletion {
    pub job_id: JobId,
    pub attempt: Attempt,
    pub lease_token: LeaseToken,
    pub outcome: Outcome,
    #[serde(default)]
    pub output: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
    #[serde(default = "default_true")]
    pub retryable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_seq: Option<i64>,
}

impl TaskCompletion {
    /// The single-task form, for `/internal/tasks/:id/complete`.
    pub fn request(&self) -> CompleteRequest {
        CompleteRequest {
            attempt: self.attempt,
            lease_token: self.lease_token,
            outcome: self.outcome,
            output: self.output.clone(),
            error: self.error.clone(),
            retryable: self.retryable,
            final_seq: self.final_seq,
        }
    }
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
    pub completions: Vec<TaskCompletion>,
}

/// One result per completion, in the request's order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteManyResponse {
    pub completed: Vec<CompletionResult>,
}

/// The body of every error response: `{"error":{"code","message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// Error codes with a meaning the other side acts on.
pub mod error_code {
    /// The attempt no longer holds the lease: kill the tool and abandon the task.
    pub const LEASE_LOST: &str = "lease_lost";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const FORBIDDEN: &str = "forbidden";
    pub const NOT_FOUND: &str = "not_found";
    pub const MALFORMED: &str = "malformed_json";
    pub const INVALID: &str = "invalid_request";
    pub const INVALID_SPEC: &str = "invalid_spec";
    pub const TOO_LARGE: &str = "payload_too_large";
    /// The client did not send its request in time (408).
    pub const TIMEOUT: &str = "request_timeout";
    /// Postgres is unreachable (503): runners ride a run of these out, see the sidecar.
    pub const UNAVAILABLE: &str = "unavailable";
    /// The statement lost a deadlock or serialization conflict (503): retry at once.
    pub const BUSY: &str = "busy";
    pub const INTERNAL: &str = "internal";
    pub const CONFLICT: &str = "conflict";
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_bash_spec_parses_with_defaults() {
        let spec = parse_spec(&json!({"kind": "bash", "script": "echo hi"})).unwrap();
        let JobSpec::Bash(bash) = spec else {
            panic!("expected bash")
        };
        assert_eq!(bash.script, "echo hi");
        assert!(bash.env.is_empty());
        assert_eq!(bash.timeout_ms, None);
    }

    #[test]
    fn an_unknown_kind_is_named_in_the_error() {
        let err = parse_spec(&json!({"kind": "python", "code": "1"})).unwrap_err();
        assert!(err.0.contains("\"python\""), "{err}");
        assert!(err.0.contains("bash"), "{err}");
    }

    #[test]
    fn a_spec_without_kind_or_not_an_object_is_refused() {
        assert!(parse_spec(&json!({"script": "x"}))
            .unwrap_err()
            .0
            .contains("no \"kind\""));
        assert!(parse_spec(&json!("bash")).is_err());
        assert!(parse_spec(&json!({"kind": 3})).is_err());
    }

    #[test]
    fn a_bash_spec_without_script_is_refused() {
        let err = parse_spec(&json!({"kind": "bash"})).unwrap_err();
        assert!(err.0.contains("script"), "{err}");
    }

    #[test]
    fn limits_refuse_unknown_fields() {
        let err = parse_spec(&json!({"kind":"bash","script":"x","limits":{"cpu":1}})).unwrap_err();
        assert!(err.0.contains("cpu"), "{err}");
    }

    #[test]
    fn spec_values_outside_their_ranges_are_refused_naming_the_field() {
        let err = |spec: Value| parse_spec(&spec).unwrap_err().0;
        assert!(
            err(json!({"kind":"bash","script":"x","timeout_ms": 0})).contains("spec.timeout_ms")
        );
        assert!(
            err(json!({"kind":"bash","script":"x","timeout_ms": u64::MAX}))
                .contains("spec.timeout_ms")
        );
        // A negative number is not a u64 at all.
        assert!(err(json!({"kind":"bash","script":"x","timeout_ms": -1})).contains("timeout_ms"));
        assert!(
            err(json!({"kind":"bash","script":"x","limits":{"processes": 0}}))
                .contains("spec.limits.processes")
        );
        assert!(err(json!({"kind":"bash","script":"x","env":{"A=B":"1"}})).contains("spec.env"));
        assert!(err(json!({"kind":"bash","script":"a\u{0}b"})).contains("spec.script"));
        assert!(
            err(json!({"kind":"tool","tool":"read_file","input":{"path":"a\u{0}"}}))
                .contains("spec.input.path")
        );
        let big = "x".repeat(bounds::MAX_SPEC_BYTES);
        assert!(err(json!({"kind":"bash","script": big})).contains("bytes"));
        assert!(err(json!({"kind":"bash","script":"x","network":"some"})).contains("network"));
        let ok = parse_spec(
            &json!({"kind":"bash","script":"x","timeout_ms": bounds::MAX_TIMEOUT_MS,
            "network":"none","limits":{"memory_bytes": 1}}),
        )
        .unwrap();
        let JobSpec::Bash(bash) = ok else {
            panic!("bash")
        };
        assert_eq!(bash.network, Some(Network::None));
    }

    #[test]
    fn job_states_round_trip_through_their_names() {
        for state in JobState::ALL {
            assert_eq!(JobState::parse(state.as_str()), Some(state));
            let json = serde_json::to_value(state).unwrap();
            assert_eq!(json, json!(state.as_str()));
        }
        assert!(JobState::Failed.is_terminal());
        assert!(!JobState::Running.is_terminal());
    }

    #[test]
    fn secrets_do_not_print_and_compare_exactly() {
        let s = Secret::new("CANARY-1");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert!(s.matches("CANARY-1"));
        assert!(!s.matches("CANARY-2"));
        assert!(!s.matches("CANARY-1x"));
        let a = Secret::generate("sk_");
        assert!(a.expose().starts_with("sk_"));
        assert_eq!(a.expose().len(), 3 + 64);
        assert_ne!(a, Secret::generate("sk_"));
    }

    #[test]
    fn lease_tokens_and_runner_tokens_are_not_printed_whole() {
        let token = LeaseToken(Uuid::new_v4());
        let shown = format!("{token:?}");
        assert!(!shown.contains(&token.0.simple().to_string()));
        let reg = RegisterResponse {
            runner_id: RunnerId(Uuid::new_v4()),
            token: "CANARY-secret".into(),
            heartbeat_ms: 1,
            lease_ms: 2,
        };
        assert!(!format!("{reg:?}").contains("CANARY"));
    }
}
