//! The sluice sandbox: everything that takes a tool from the sidecar to an exec'd process
//! under its limits, and keeps it there — the fork chain, PID, mount and network namespaces,
//! the uid drop, rlimits, descriptor hygiene, death signals, the orphan reaper, and the file
//! tools' path confinement. It is the only crate of sluice with `unsafe` code; every other
//! one forbids it, so an audit of raw syscalls reads this crate and nothing else.
//!
//! What a spawned tool gets (see [`chain`] for how):
//!
//! - its own session and process group, so stopping it ([`stop`]) takes everything it started;
//! - where the sidecar may create them (root, or gVisor): its own PID namespace, so even a
//!   `setsid` escapee dies with the tool, and its own mount namespace with private `/tmp`,
//!   `/var/tmp`, `/dev/shm`, `/run` and a fresh `/proc` ([`mounts`]);
//! - with `network: none`, its own network namespace with only loopback ([`network`]);
//! - the slot's uid, `PR_SET_NO_NEW_PRIVS`, `PR_SET_PDEATHSIG(SIGKILL)`, nice 19,
//!   `oom_score_adj` 1000, rlimits that can only be lowered, a cleared environment, and no
//!   descriptor but stdin, stdout and stderr (and a script it is handed).
//!
//! Policy — which environment, which limits, which uid — is the caller's
//! ([`ToolCommand`]); this crate applies it.

pub mod chain;
pub mod command;
pub mod confine;
mod descriptors;
pub mod mounts;
pub mod network;
mod reaper;
pub mod signals;

pub use chain::{SpawnedTool, ToolUsage};
pub use command::{ToolCommand, ToolUser};
pub use signals::{die_with_parent, signal_group, stop};

use reaper::{Reaper, Tracked};

/// The sandbox of one sidecar process: what this host lets it do (probed once, before
/// anything else is forked) and, when it is PID 1, the orphan reaper. Dropping it stops the
/// reaper.
#[derive(Debug)]
pub struct Sandbox {
    mounts: bool,
    network: bool,
    tracked: Tracked,
    _reaper: Option<Reaper>,
}

impl Sandbox {
    /// Probes the host, then — when this process is PID 1 of its container — starts reaping
    /// orphans on the current tokio runtime. The probes come first: the reaper would reap
    /// their children.
    pub fn start() -> Sandbox {
        let mounts = mounts::can_isolate_mounts();
        let network = network::can_isolate_network();
        let tracked = Tracked::default();
        let reaper = (std::process::id() == 1).then(|| Reaper::start(tracked.clone()));
        Sandbox {
            mounts,
            network,
            tracked,
            _reaper: reaper,
        }
    }

    /// Whether tools get private mounts (`/tmp`, `/run`, `/proc`) here: not under gVisor's
    /// 2022 release, where only the pod keeps tasks of one runner apart.
    pub fn can_isolate_mounts(&self) -> bool {
        self.mounts
    }

    /// Whether `network: none` can be given here (a runner that cannot refuses such jobs).
    pub fn can_isolate_network(&self) -> bool {
        self.network
    }

    /// Spawns a tool. Call it from an async task on a runtime *worker* thread, never from
    /// `spawn_blocking`: `PR_SET_PDEATHSIG` fires when the thread that forked the child exits,
    /// and blocking-pool threads exit when idle, which would kill a long tool early (B-13).
    pub fn spawn(&self, tool: &ToolCommand<'_>) -> std::io::Result<SpawnedTool> {
        chain::spawn_tool(tool, Some(&self.tracked))
    }
}

#[cfg(test)]
mod tests;
