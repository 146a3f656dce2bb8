//! Reaping orphans when the sidecar is PID 1 (a container without an init): orphans of its
//! namespace are re-parented to it, and their zombies must be reaped (B-13). The tools the
//! sandbox spawned are left alone — tokio waits for those — so spawns are [`Tracked`].
//!
//! Tools run in PID namespaces of their own, so this only catches what escaped where those
//! could not be created. The [`Reaper`] is a task owned by the [`crate::Sandbox`]: it stops
//! when the sandbox is dropped.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::unistd::Pid;
use tokio::task::JoinHandle;

/// How often the reaper looks for zombies.
const INTERVAL: Duration = Duration::from_millis(500);

/// The pids of the tools this sandbox spawned (tokio reaps them).
#[derive(Debug, Default, Clone)]
pub(crate) struct Tracked(Arc<Mutex<BTreeSet<i32>>>);

impl Tracked {
    pub(crate) fn lock(&self) -> MutexGuard<'_, BTreeSet<i32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The reaping task; aborted when dropped.
#[derive(Debug)]
pub(crate) struct Reaper(JoinHandle<()>);

impl Reaper {
    /// Starts reaping on the current tokio runtime every [`INTERVAL`].
    pub(crate) fn start(tracked: Tracked) -> Reaper {
        Reaper(tokio::spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            loop {
                tick.tick().await;
                let tracked = tracked.clone();
                // Reads /proc: off the async worker threads.
                let reaped = tokio::task::spawn_blocking(move || reap_orphans(&tracked))
                    .await
                    .unwrap_or(0);
                if reaped > 0 {
                    tracing::debug!(reaped, "reaped orphaned processes");
                }
            }
        }))
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reaps the zombies among this process's children that it did not spawn as tools. Returns
/// how many were reaped.
fn reap_orphans(tracked: &Tracked) -> usize {
    let me = std::process::id() as i32;
    let mut reaped = 0;
    let mut live = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        live.insert(pid);
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (
            fields.next(),
            fields.next().and_then(|p| p.parse::<i32>().ok()),
        );
        if state == Some("Z") && ppid == Some(me) && !tracked.lock().contains(&pid) {
            let flags = nix::sys::wait::WaitPidFlag::WNOHANG;
            if nix::sys::wait::waitpid(Pid::from_raw(pid), Some(flags)).is_ok() {
                reaped += 1;
            }
        }
    }
    // Tools tokio has reaped are gone from /proc: forget them.
    tracked.lock().retain(|pid| live.contains(pid));
    reaped
}
