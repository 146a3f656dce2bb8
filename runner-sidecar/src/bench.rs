//! The spawn-path benchmark behind `sluice-runner --bench-spawn` (and so `sluice bench`):
//! how long the sandbox takes from the spawn call to an exec'd tool, and to its reaped exit.

use std::collections::BTreeMap;
use std::path::Path;

use sluice_protocol::{Attempt, JobId, Limits, Network};
use sluice_sandbox::{Sandbox, ToolCommand, ToolUser};

use crate::exec::policy;

/// What [`measure_spawn`] measured, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct SpawnTimings {
    /// From the spawn call until the tool has exec'd (std's spawn returns once the exec
    /// succeeded): fork, namespaces, uid drop, rlimits, exec.
    pub exec_p50: u64,
    pub exec_p99: u64,
    /// The whole round trip, until the tool's exit is reaped (namespace teardown included).
    pub exit_p50: u64,
    pub exit_p99: u64,
}

/// Runs `/bin/true` `count` times through the real spawn path, one after another.
pub async fn measure_spawn(
    sandbox: &Sandbox,
    count: usize,
    workspace: &Path,
    limits: &Limits,
    user: Option<ToolUser>,
) -> std::io::Result<SpawnTimings> {
    std::fs::create_dir_all(workspace)?;
    if let Some(user) = user {
        std::os::unix::fs::chown(workspace, Some(user.uid), Some(user.gid))?;
    }
    let tool = ToolCommand {
        program: "/bin/true",
        args: Vec::new(),
        workspace,
        env: policy::tool_env(workspace, JobId(0), Attempt(0), &BTreeMap::new()),
        limits: limits.clone(),
        user,
        stdin: false,
        exec_fd: None,
        pass_fd: None,
        network: Network::Full,
    };
    let mut to_exec = Vec::with_capacity(count);
    let mut to_exit = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let started = std::time::Instant::now();
        let mut child = sandbox.spawn(&tool)?.child;
        to_exec.push(started.elapsed().as_micros() as u64);
        let status = child.wait().await?;
        to_exit.push(started.elapsed().as_micros() as u64);
        if !status.success() {
            return Err(std::io::Error::other(format!("/bin/true ended {status}")));
        }
    }
    let percentiles = |samples: &mut Vec<u64>| {
        samples.sort_unstable();
        let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
        (at(0.5), at(0.99))
    };
    let (exec_p50, exec_p99) = percentiles(&mut to_exec);
    let (exit_p50, exit_p99) = percentiles(&mut to_exit);
    Ok(SpawnTimings {
        exec_p50,
        exec_p99,
        exit_p50,
        exit_p99,
    })
}
