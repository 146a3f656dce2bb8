//! The five tools, described once: name, description and JSON input schema (what the agent
//! step offers a model), typed inputs, and how each call runs.
//!
//! `bash` runs through the bash executor (`crate::exec::bash`). The other four run in a
//! confined child — this binary re-executed by the tool executor (`crate::exec::tool`) with
//! the same sandbox as a bash tool: own PID namespace, the tool user, rlimits, cleared
//! environment, the workspace as cwd — so a file tool reads and writes with the tool user's
//! rights only, and a `web_fetch` connects as the tool user (egress rules by uid apply).
//!
//! - [`child`] — the child's side of a call (`sluice-runner __tool`).
//! - [`files`] — `read_file`, `write_file`, `grep`, confined beneath the workspace by
//!   `sluice_sandbox::confine` (`openat2` or the walk).
//! - [`fetch`] — `web_fetch` with the address checks; [`html`] reduces pages to text.

pub mod child;
pub mod fetch;
pub mod files;
pub mod glob;
pub mod html;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluice_protocol::ToolName;

/// A tool as offered to a model or a `tool` job.
#[derive(Debug, Clone, Serialize)]
pub struct ToolDef {
    pub name: ToolName,
    pub description: &'static str,
    pub input_schema: Value,
}

/// Every tool, in a stable order.
pub fn all() -> Vec<ToolDef> {
    [
        ToolName::Bash,
        ToolName::ReadFile,
        ToolName::WriteFile,
        ToolName::Grep,
        ToolName::WebFetch,
    ]
    .into_iter()
    .map(def)
    .collect()
}

/// One tool's definition.
pub fn def(name: ToolName) -> ToolDef {
    let (description, input_schema) = match name {
        ToolName::Bash => (
            "Run a bash command in the task's workspace (its working directory). Returns the exit code and the tails of stdout and stderr.",
            json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The script, run with bash -c."},
                    "timeout_ms": {"type": "integer", "minimum": 1, "description": "Wall-clock limit."}
                },
                "required": ["command"],
                "additionalProperties": false
            }),
        ),
        ToolName::ReadFile => (
            "Read a file beneath the workspace. Paths are relative to the workspace; symbolic links are not followed. UTF-8 text comes back as text, anything else base64-encoded.",
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "offset": {"type": "integer", "minimum": 0, "description": "Byte offset to start at."},
                    "max_bytes": {"type": "integer", "minimum": 1, "description": "Most bytes to return (capped by the runner)."}
                },
                "required": ["path"],
                "additionalProperties": false
            }),
        ),
        ToolName::WriteFile => (
            "Write a file beneath the workspace, creating missing parent directories. Replaces the file unless append is true. Symbolic links and hard links are refused.",
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "content": {"type": "string"},
                    "encoding": {"type": "string", "enum": ["utf8", "base64"], "description": "How content is encoded (default utf8)."},
                    "append": {"type": "boolean"},
                    "create_dirs": {"type": "boolean", "description": "Create missing parent directories (default true)."}
                },
                "required": ["path", "content"],
                "additionalProperties": false
            }),
        ),
        ToolName::Grep => (
            "Search files beneath the workspace for a regular expression (Rust regex syntax). Returns matching lines with paths and line numbers; binary files and symbolic links are skipped.",
            json!({
                "type": "object",
                "properties": {
                    "pattern": {"type": "string"},
                    "path": {"type": "string", "description": "File or directory to search (default: the workspace)."},
                    "glob": {"type": "string", "description": "Only files matching this glob, e.g. *.rs or src/**/*.{rs,toml}."},
                    "ignore_case": {"type": "boolean"},
                    "fixed_strings": {"type": "boolean", "description": "Treat the pattern as a literal string."},
                    "max_matches": {"type": "integer", "minimum": 1}
                },
                "required": ["pattern"],
                "additionalProperties": false
            }),
        ),
        ToolName::WebFetch => (
            "Fetch an http or https URL. Returns the status, a few headers and the body as text (HTML reduced to readable text). Private, loopback and link-local addresses are refused.",
            json!({
                "type": "object",
                "properties": {
                    "url": {"type": "string"},
                    "max_bytes": {"type": "integer", "minimum": 1},
                    "timeout_ms": {"type": "integer", "minimum": 1}
                },
                "required": ["url"],
                "additionalProperties": false
            }),
        ),
    };
    ToolDef {
        name,
        description,
        input_schema,
    }
}

/// `bash` input.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BashInput {
    pub command: String,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// `read_file` input.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFileInput {
    pub path: String,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

/// How `write_file` content is encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Utf8,
    Base64,
}

fn yes() -> bool {
    true
}

/// `write_file` input.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFileInput {
    pub path: String,
    pub content: String,
    #[serde(default)]
    pub encoding: Encoding,
    #[serde(default)]
    pub append: bool,
    #[serde(default = "yes")]
    pub create_dirs: bool,
}

/// `grep` input.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrepInput {
    pub pattern: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub glob: Option<String>,
    #[serde(default)]
    pub ignore_case: bool,
    #[serde(default)]
    pub fixed_strings: bool,
    #[serde(default)]
    pub max_matches: Option<u64>,
}

/// `web_fetch` input.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebFetchInput {
    pub url: String,
    #[serde(default)]
    pub max_bytes: Option<u64>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A tool call's failure, as the job's error (or the agent's `tool_result` with `is_error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolError {
    pub code: String,
    pub message: String,
    /// Whether trying again may help (a network timeout may; a refused path never does).
    #[serde(default)]
    pub retryable: bool,
}

impl ToolError {
    pub fn new(code: &str, message: impl Into<String>) -> ToolError {
        ToolError {
            code: code.into(),
            message: message.into(),
            retryable: false,
        }
    }

    pub fn retryable(mut self) -> ToolError {
        self.retryable = true;
        self
    }

    /// The input did not match the tool's schema.
    pub fn invalid_input(tool: ToolName, err: impl std::fmt::Display) -> ToolError {
        ToolError::new(
            "invalid_input",
            format!("invalid input for {}: {err}", name_of(tool)),
        )
    }
}

impl From<sluice_sandbox::confine::FsError> for ToolError {
    fn from(err: sluice_sandbox::confine::FsError) -> ToolError {
        ToolError::new(err.code, err.message)
    }
}

/// The tool's wire name, e.g. `read_file`.
pub fn name_of(tool: ToolName) -> &'static str {
    match tool {
        ToolName::Bash => "bash",
        ToolName::ReadFile => "read_file",
        ToolName::WriteFile => "write_file",
        ToolName::Grep => "grep",
        ToolName::WebFetch => "web_fetch",
    }
}

/// Caps and policy for the confined tools, from the runner's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Use the component walk even where `openat2` exists.
    pub force_path_walk: bool,
    /// Most bytes `read_file` returns, and most bytes of matches `grep` returns.
    pub max_read_bytes: u64,
    /// Most bytes of a `web_fetch` body.
    pub fetch_max_bytes: u64,
    /// Longest `web_fetch`, redirects included.
    pub fetch_timeout_ms: u64,
    /// Networks `web_fetch` may reach although they are in the deny set, e.g. `10.0.0.0/8`.
    pub fetch_allow: Vec<String>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            force_path_walk: false,
            max_read_bytes: 1 << 20,
            fetch_max_bytes: 5 << 20,
            fetch_timeout_ms: 30_000,
            fetch_allow: Vec::new(),
        }
    }
}

/// Parses a call's input for `tool`, so a bad input fails before anything is spawned.
pub fn check_input(tool: ToolName, input: &Value) -> Result<(), ToolError> {
    fn parse<T: serde::de::DeserializeOwned>(
        tool: ToolName,
        input: &Value,
    ) -> Result<(), ToolError> {
        T::deserialize(input)
            .map(|_| ())
            .map_err(|e| ToolError::invalid_input(tool, e))
    }
    match tool {
        ToolName::Bash => parse::<BashInput>(tool, input),
        ToolName::ReadFile => parse::<ReadFileInput>(tool, input),
        ToolName::WriteFile => parse::<WriteFileInput>(tool, input),
        ToolName::Grep => parse::<GrepInput>(tool, input),
        ToolName::WebFetch => parse::<WebFetchInput>(tool, input),
    }
}

/// Runs a confined call in this process: what the child does (see [`child`]). Blocking.
pub fn run_here(tool: ToolName, input: &Value, policy: &Policy) -> Result<Value, ToolError> {
    check_input(tool, input)?;
    let workspace = || {
        sluice_sandbox::confine::Workspace::open(std::path::Path::new("."), policy.force_path_walk)
    };
    let input = input.clone();
    let parse_err = |e: serde_json::Error| ToolError::invalid_input(tool, e);
    match tool {
        ToolName::ReadFile => files::read_file(
            &workspace()?,
            &serde_json::from_value(input).map_err(parse_err)?,
            policy,
        ),
        ToolName::WriteFile => files::write_file(
            &workspace()?,
            &serde_json::from_value(input).map_err(parse_err)?,
        ),
        ToolName::Grep => files::grep(
            &workspace()?,
            &serde_json::from_value(input).map_err(parse_err)?,
            policy,
        ),
        ToolName::WebFetch => {
            fetch::fetch_blocking(&serde_json::from_value(input).map_err(parse_err)?, policy)
        }
        ToolName::Bash => Err(ToolError::new(
            "invalid_input",
            "bash runs through the task path, not a confined call",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_an_object_schema_with_required_fields() {
        let defs = all();
        assert_eq!(defs.len(), 5);
        for def in defs {
            assert_eq!(def.input_schema["type"], "object", "{:?}", def.name);
            assert!(def.input_schema["required"]
                .as_array()
                .is_some_and(|r| !r.is_empty()));
            assert!(!def.description.is_empty());
        }
    }

    #[test]
    fn inputs_are_checked_against_the_schema() {
        assert!(check_input(ToolName::ReadFile, &json!({"path": "a"})).is_ok());
        let err = check_input(ToolName::ReadFile, &json!({"path": "a", "evil": 1})).unwrap_err();
        assert_eq!(err.code, "invalid_input");
        assert!(err.message.contains("evil"), "{}", err.message);
        assert!(check_input(ToolName::WriteFile, &json!({"path": "a"})).is_err());
        assert!(check_input(ToolName::Grep, &json!("x")).is_err());
        assert!(check_input(ToolName::Bash, &json!({"command": "true"})).is_ok());
    }
}
