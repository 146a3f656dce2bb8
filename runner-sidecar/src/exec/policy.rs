//! What a runner allows a tool: the environment it sees, the limits it runs under (a job can
//! only lower the runner's), its wall timeout and its network.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sluice_protocol::{bounds, Attempt, JobId, Limits, Network, Task};
use sluice_sandbox::Sandbox;

use crate::config::Config;

/// Names a job's `env` may not override: the sidecar sets them.
pub const RESERVED_ENV: [&str; 7] = [
    "HOME",
    "TASK_ID",
    "ATTEMPT",
    "SLUICE_JOB_ID",
    "SLUICE_ATTEMPT",
    "SLUICE_OUTPUT",
    "SLUICE_CONTEXT",
];

/// The file in the workspace a tool may write a JSON document to (`$SLUICE_OUTPUT`): it
/// becomes the result's `value`.
pub const OUTPUT_FILE: &str = ".sluice-output.json";
/// The file in the workspace holding a workflow step's context (`$SLUICE_CONTEXT`).
pub const CONTEXT_FILE: &str = ".sluice-context.json";
/// Largest `$SLUICE_OUTPUT` document.
pub const MAX_OUTPUT_VALUE_BYTES: u64 = 1 << 20;

/// The environment a tool sees: fixed names, then the job's own `env` (which may set PATH or
/// LANG but not the task's identity or HOME). Nothing comes from the sidecar's environment.
pub fn tool_env(
    workspace: &Path,
    job_id: JobId,
    attempt: Attempt,
    job_env: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
    env.insert("LANG".into(), "C.UTF-8".into());
    for (name, value) in job_env {
        if !RESERVED_ENV.contains(&name.as_str()) && !name.is_empty() && !name.contains('=') {
            env.insert(name.clone(), value.clone());
        }
    }
    env.insert("HOME".into(), workspace.to_string_lossy().into_owned());
    env.insert("TASK_ID".into(), job_id.to_string());
    env.insert("ATTEMPT".into(), attempt.to_string());
    env.insert("SLUICE_JOB_ID".into(), job_id.to_string());
    env.insert("SLUICE_ATTEMPT".into(), attempt.to_string());
    env
}

/// The shell for bash specs: `/bin/bash`, or `/bin/sh` where there is no bash.
pub fn shell() -> &'static str {
    if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    }
}

/// The tighter of two limit sets, field by field: a job can only lower the runner's defaults.
pub fn tighter(runner: &Limits, job: &Limits) -> Limits {
    fn min(a: Option<u64>, b: Option<u64>) -> Option<u64> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
    Limits {
        cpu_seconds: min(runner.cpu_seconds, job.cpu_seconds),
        memory_bytes: min(runner.memory_bytes, job.memory_bytes),
        address_space_bytes: min(runner.address_space_bytes, job.address_space_bytes),
        open_files: min(runner.open_files, job.open_files),
        processes: min(runner.processes, job.processes),
        file_size_bytes: min(runner.file_size_bytes, job.file_size_bytes),
    }
}

/// The network a tool gets: what its spec asks for, else the runner's default. `None` where
/// this runner cannot give a tool a network of its own (fails closed: never a network when
/// none was asked for).
pub fn network_for(config: &Config, sandbox: &Sandbox, asked: Option<Network>) -> Option<Network> {
    let network = asked.unwrap_or(config.network);
    (network == Network::Full || sandbox.can_isolate_network()).then_some(network)
}

/// The wall timeout of a tool: the tightest of the spec's, the job's and the runner's
/// default, never beyond [`bounds::MAX_TIMEOUT_MS`] (so no deadline can overflow a clock).
pub fn timeout_of(config: &Config, task: &Task, spec_ms: Option<u64>) -> Duration {
    [spec_ms, task.timeout_ms]
        .into_iter()
        .flatten()
        .min()
        .map(Duration::from_millis)
        .unwrap_or(config.default_timeout)
        .min(Duration::from_millis(bounds::MAX_TIMEOUT_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_can_only_lower_the_runners_limits() {
        let runner = Limits {
            processes: Some(512),
            open_files: Some(4096),
            ..Default::default()
        };
        let job = Limits {
            processes: Some(10_000),
            open_files: Some(64),
            cpu_seconds: Some(5),
            ..Default::default()
        };
        let effective = tighter(&runner, &job);
        assert_eq!(effective.processes, Some(512));
        assert_eq!(effective.open_files, Some(64));
        assert_eq!(effective.cpu_seconds, Some(5));
        assert_eq!(effective.memory_bytes, None);
    }
    #[test]
    fn the_tool_env_is_an_allow_list_the_job_cannot_use_to_spoof_identity() {
        let job_env = BTreeMap::from([
            ("FOO".to_string(), "bar".to_string()),
            ("TASK_ID".to_string(), "999".to_string()),
            ("HOME".to_string(), "/root".to_string()),
            ("PATH".to_string(), "/opt/bin".to_string()),
        ]);
        let env = tool_env(Path::new("/w"), JobId(7), Attempt(2), &job_env);
        assert_eq!(env["FOO"], "bar");
        assert_eq!(env["TASK_ID"], "7");
        assert_eq!(env["ATTEMPT"], "2");
        assert_eq!(env["HOME"], "/w");
        assert_eq!(env["PATH"], "/opt/bin");
        let names: Vec<&str> = env.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "ATTEMPT",
                "FOO",
                "HOME",
                "LANG",
                "PATH",
                "SLUICE_ATTEMPT",
                "SLUICE_JOB_ID",
                "TASK_ID"
            ]
        );
    }
}
