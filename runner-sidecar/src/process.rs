//! Forking tool processes under limits, and stopping them with everything they started.
//!
//! Each tool gets its own session and process group (`setsid`), `PR_SET_PDEATHSIG(SIGKILL)`,
//! `PR_SET_NO_NEW_PRIVS`, rlimits that can only be lowered, a cleared environment plus an
//! allow-list, stdin `/dev/null`, and the task's workspace as its cwd. Stopping a tool signals
//! the whole group, so `cmd &` children die with it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use sluice_protocol::Limits;
use tokio::process::{Child, Command};

/// Names a job's `env` may not override: the sidecar sets them.
pub const RESERVED_ENV: [&str; 5] = [
    "HOME",
    "TASK_ID",
    "ATTEMPT",
    "SLUICE_JOB_ID",
    "SLUICE_ATTEMPT",
];

/// What to spawn.
#[derive(Debug, Clone)]
pub struct ToolCommand<'a> {
    pub program: &'a str,
    pub args: Vec<String>,
    pub workspace: &'a Path,
    /// The allow-listed environment (see [`tool_env`]).
    pub env: BTreeMap<String, String>,
    pub limits: Limits,
}

/// The environment a tool sees: fixed names, then the job's own `env` (which may set PATH or
/// LANG but not the task's identity or HOME). Nothing comes from the sidecar's environment.
pub fn tool_env(
    workspace: &Path,
    job_id: i64,
    attempt: i32,
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

fn rlimits(limits: &Limits) -> Vec<(Resource, u64)> {
    let mut out = vec![(Resource::RLIMIT_CORE, 0)];
    let pairs = [
        (Resource::RLIMIT_CPU, limits.cpu_seconds),
        (Resource::RLIMIT_AS, limits.memory_bytes),
        (Resource::RLIMIT_NOFILE, limits.open_files),
        (Resource::RLIMIT_NPROC, limits.processes),
        (Resource::RLIMIT_FSIZE, limits.file_size_bytes),
    ];
    for (resource, value) in pairs {
        if let Some(value) = value {
            out.push((resource, value));
        }
    }
    out
}

/// Spawns a tool process. Call it from an async task on a runtime *worker* thread, never from
/// `spawn_blocking`: `PR_SET_PDEATHSIG` fires when the thread that forked the child exits, and
/// blocking-pool threads exit when idle, which would kill a long tool early (B-13).
pub fn spawn_tool(tool: &ToolCommand<'_>) -> std::io::Result<Child> {
    let mut command = Command::new(tool.program);
    command
        .args(&tool.args)
        .env_clear()
        .envs(&tool.env)
        .current_dir(tool.workspace)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Computed before the fork: the child may only make async-signal-safe calls.
    let limits = rlimits(&tool.limits);
    // SAFETY: between fork and exec the closure only makes raw syscalls through nix (setsid,
    // prctl, getrlimit, setrlimit) and does not allocate (`limits` was built beforehand).
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid()?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            nix::sys::prctl::set_no_new_privs()?;
            for &(resource, wanted) in &limits {
                let (soft, hard) = getrlimit(resource)?;
                // Only ever lower: a job cannot raise the runner's limits.
                let hard = hard.min(wanted);
                setrlimit(resource, soft.min(hard), hard)?;
            }
            Ok(())
        });
    }
    command.spawn()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tool_env_is_an_allow_list_the_job_cannot_use_to_spoof_identity() {
        let job_env = BTreeMap::from([
            ("FOO".to_string(), "bar".to_string()),
            ("TASK_ID".to_string(), "999".to_string()),
            ("HOME".to_string(), "/root".to_string()),
            ("PATH".to_string(), "/opt/bin".to_string()),
        ]);
        let env = tool_env(Path::new("/w"), 7, 2, &job_env);
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_tool_sees_only_the_allow_listed_environment_and_lowered_limits() {
        let dir = std::env::temp_dir().join(format!("sluice-proc-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A canary in the sidecar's own environment must not reach the tool.
        // SAFETY: set before any thread of this test reads the environment.
        unsafe { std::env::set_var("SLUICE_CANARY_SECRET", "CANARY-must-not-leak") };
        let env = tool_env(&dir, 1, 1, &BTreeMap::new());
        let tool = ToolCommand {
            program: shell(),
            args: vec![
                "-c".into(),
                "env; ulimit -n; ulimit -c; ps -o sid= -p $$".into(),
            ],
            workspace: &dir,
            env,
            limits: Limits {
                open_files: Some(64),
                ..Default::default()
            },
        };
        let child = spawn_tool(&tool).unwrap();
        let pid = child.id().unwrap();
        let output = child.wait_with_output().await.unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(!text.contains("CANARY"), "{text}");
        assert!(text.contains("TASK_ID=1"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"64"), "NOFILE lowered: {text}");
        assert!(lines.contains(&"0"), "no core dumps: {text}");
        // Its own session: the session id is its own pid.
        assert_eq!(lines.last().unwrap().trim(), pid.to_string(), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn stopping_a_tool_kills_its_background_children() {
        let dir = std::env::temp_dir().join(format!("sluice-stop-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tool = ToolCommand {
            program: shell(),
            args: vec!["-c".into(), "sleep 300 & echo $!; wait".into()],
            workspace: &dir,
            env: tool_env(&dir, 1, 1, &BTreeMap::new()),
            limits: Limits::default(),
        };
        let mut child = spawn_tool(&tool).unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        while !line.contains('\n') {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "the tool exited before printing");
            line.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let background: i32 = line.trim().parse().unwrap();
        stop(&mut child, Duration::from_millis(500)).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let gone = match std::fs::read_to_string(format!("/proc/{background}/stat")) {
                Err(_) => true,
                Ok(stat) => stat
                    .rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
            };
            if gone {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "background child {background} survived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
