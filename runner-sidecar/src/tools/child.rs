//! The confined child's side of a tool call (`sluice-runner __tool`): one request on stdin,
//! the tool run with the tool user's rights in the workspace, one JSON answer on stdout. The
//! sidecar's side is `exec::tool`.

use std::io::{Read, Write};
use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_protocol::ToolName;

use super::{Policy, ToolError};

/// The first argument that makes `sluice-runner` a confined tool child.
pub const CHILD_ARG: &str = "__tool";
/// Largest request a child reads.
const MAX_REQUEST: u64 = 16 << 20;

/// What the sidecar sends a child.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildRequest {
    pub tool: ToolName,
    pub input: Value,
    pub policy: Policy,
}

/// What a child prints.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildAnswer {
    Output(Value),
    Error(ToolError),
}

/// The child's `main`: one request on stdin, one answer on stdout, exit 0 (a tool's own
/// failure is an answer too).
pub fn child_main() -> ExitCode {
    // RLIMIT_FSIZE then fails a write with EFBIG (reported) instead of killing the child.
    sluice_sandbox::signals::ignore_file_size_signal();
    let mut raw = Vec::new();
    let answer = match std::io::stdin().take(MAX_REQUEST).read_to_end(&mut raw) {
        Err(err) => ChildAnswer::Error(ToolError::new(
            "invalid_input",
            format!("reading the call: {err}"),
        )),
        Ok(_) => match serde_json::from_slice::<ChildRequest>(&raw) {
            Err(err) => {
                ChildAnswer::Error(ToolError::new("invalid_input", format!("the call: {err}")))
            }
            Ok(request) => match super::run_here(request.tool, &request.input, &request.policy) {
                Ok(output) => ChildAnswer::Output(output),
                Err(err) => ChildAnswer::Error(err),
            },
        },
    };
    let mut stdout = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut stdout, &answer)
        .and_then(|()| stdout.flush().map_err(serde_json::Error::io));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
