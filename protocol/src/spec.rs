//! Job specs, tagged by `kind`: what a job runs. [`parse_spec`] is the enqueue-time check
//! (shape and [`crate::bounds`]); [`parse_stored_spec`] the runner's (shape only).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bounds;

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
            JobSpec::Agent(spec) => spec.timeout_ms,
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

/// `{"kind":"agent","prompt":"…"}`: an Anthropic Messages tool-use loop run by the sidecar,
/// its tool calls run through the same confined tools as `tool` jobs, in the task's
/// workspace. Every field but `prompt` defaults from the runner's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSpec {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The tools offered to the model (default: all five; `[]` offers none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ToolName>>,
    /// Most model responses (turns); the loop stops after exactly this many and the job
    /// fails with `max_turns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    /// `max_tokens` of each model response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Most tokens (input and output, summed over turns) the whole loop may use; past it the
    /// job fails with `token_budget`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_budget: Option<u64>,
    /// Wall time of the whole loop, tools included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Continue this conversation: the scheduler hands the attempt the session's stored
    /// history and keeps the new turns when the job succeeds. Jobs of one session run one
    /// at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
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
    if let JobSpec::Agent(agent) = spec {
        if agent.prompt.trim().is_empty() {
            return Err("prompt must not be empty".into());
        }
        bounds::check_range("timeout_ms", agent.timeout_ms, 1..=bounds::MAX_TIMEOUT_MS)?;
        bounds::check_range(
            "max_turns",
            agent.max_turns.map(u64::from),
            1..=bounds::MAX_AGENT_TURNS,
        )?;
        bounds::check_range(
            "max_tokens",
            agent.max_tokens.map(u64::from),
            1..=bounds::MAX_AGENT_RESPONSE_TOKENS,
        )?;
        bounds::check_range("token_budget", agent.token_budget, 1..=bounds::MAX_LIMIT)?;
        if let Some(model) = &agent.model {
            if model.is_empty() || model.len() > bounds::MAX_MODEL_NAME_BYTES {
                return Err(format!(
                    "model must be 1-{} bytes",
                    bounds::MAX_MODEL_NAME_BYTES
                ));
            }
        }
        if let Some(session) = &agent.session {
            bounds::check_session_name(session).map_err(|e| format!("session {e}"))?;
        }
    }
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
    for field in ["timeout_ms", "max_turns", "max_tokens", "token_budget"] {
        if object.get(field).is_some_and(not_unsigned) {
            return Err(SpecError(format!(
                "spec.{field} must be a positive integer"
            )));
        }
    }
    for (field, max) in [
        ("max_turns", bounds::MAX_AGENT_TURNS),
        ("max_tokens", bounds::MAX_AGENT_RESPONSE_TOKENS),
    ] {
        if let Some(value) = object.get(field).and_then(Value::as_u64) {
            if value > max {
                return Err(SpecError(format!(
                    "spec.{field} must be between 1 and {max}, got {value}"
                )));
            }
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
}
