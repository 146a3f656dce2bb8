//! Signals: stopping a tool with everything it started, and the dispositions and death
//! signals the sidecar's own children need.

use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Child;

/// Sends `signal` to the tool's whole process group (its pid, as it leads its own session).
pub fn signal_group(pid: u32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pid as i32), signal);
}

/// SIGTERM to the group, then SIGKILL after `grace` unless the main process exited.
pub async fn stop(child: &mut Child, grace: Duration) {
    let Some(pid) = child.id() else {
        return;
    };
    signal_group(pid, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal_group(pid, Signal::SIGKILL);
        let _ = child.wait().await;
    }
    // Whatever the group started in the background goes too.
    signal_group(pid, Signal::SIGKILL);
}

/// Ignores SIGXFSZ in this process, so that a write past RLIMIT_FSIZE fails with `EFBIG`
/// (which a tool reports) instead of killing it. Call at the start of `main`, before any
/// thread exists.
pub fn ignore_file_size_signal() {
    // SAFETY: SIG_IGN installs no handler; called before other threads exist.
    unsafe {
        let _ = nix::sys::signal::signal(Signal::SIGXFSZ, nix::sys::signal::SigHandler::SigIgn);
    }
}

/// Makes the child `command` starts receive `signal` when the thread that spawns it exits
/// (`PR_SET_PDEATHSIG`): a scheduler's Postgres, a test's scheduler, `sluice dev`'s runners
/// go with the process that started them, even after a `kill -9`. The death signal is set
/// after any uid change `command` asks for (which would clear it). A `tokio::process::Command`
/// passes `as_std_mut()`.
pub fn die_with_parent(command: &mut std::process::Command, signal: Signal) {
    // SAFETY: prctl is async-signal-safe and the closure allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, move || {
            nix::sys::prctl::set_pdeathsig(signal).map_err(std::io::Error::from)
        });
    }
}
