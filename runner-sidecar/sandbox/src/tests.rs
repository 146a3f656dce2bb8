//! The sandbox's behaviour, through [`Sandbox::spawn`] on this host: confinement, cleanup
//! and failures to start. Tests that need root (namespaces, another uid) skip with a message
//! otherwise.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sluice_protocol::{Limits, Network};

use crate::{Sandbox, ToolCommand, ToolUser};

const SHELL: &str = "/bin/sh";

/// A minimal tool environment: what the sidecar's policy always sets.
fn env_for(dir: &Path) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "PATH".to_string(),
            "/usr/local/bin:/usr/bin:/bin".to_string(),
        ),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("HOME".to_string(), dir.to_string_lossy().into_owned()),
        ("TASK_ID".to_string(), "1".to_string()),
    ])
}
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_tool_that_cannot_be_executed_fails_its_spawn() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("sluice-proc-noexec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("not-executable");
    std::fs::write(&script, "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let tool = ToolCommand {
        program: script.to_str().unwrap(),
        args: Vec::new(),
        workspace: &dir,
        env: env_for(&dir),
        limits: Limits::default(),
        user: None,
        stdin: false,
        exec_fd: None,
        pass_fd: None,
        network: Network::Full,
    };
    // In a PID namespace the tool process execs by itself, and hands its errno back to
    // the spawn, which fails as it does without one.
    let err = Sandbox::start().spawn(&tool).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    let missing = ToolCommand {
        program: "no-such-tool-anywhere",
        ..tool.clone()
    };
    let err = Sandbox::start().spawn(&missing).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(
        err.to_string().contains("not found in the tool's PATH"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_tool_sees_only_the_allow_listed_environment_and_lowered_limits() {
    let dir = std::env::temp_dir().join(format!("sluice-proc-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A canary in the sidecar's own environment must not reach the tool.
    // SAFETY: set before any thread of this test reads the environment.
    unsafe { std::env::set_var("SLUICE_CANARY_SECRET", "CANARY-must-not-leak") };
    let marker = format!("SESSION_MARKER={}", std::process::id());
    let mut env = env_for(&dir);
    env.insert("SESSION_MARKER".into(), std::process::id().to_string());
    let tool = ToolCommand {
        program: SHELL,
        args: vec![
            "-c".into(),
            "env; ulimit -n; ulimit -c; echo nice=$(cut -d' ' -f19 /proc/self/stat); \
             echo oom=$(cat /proc/self/oom_score_adj); echo fds=$(ls /proc/self/fd | tr '\\n' ' '); sleep 0.3"
                .into(),
        ],
        workspace: &dir,
        env,
        limits: Limits {
            open_files: Some(64),
            ..Default::default()
        },
        user: None,
        stdin: false,
        exec_fd: None,
        pass_fd: None,
        network: Network::Full,
    };
    let child = Sandbox::start().spawn(&tool).unwrap().child;
    let pid = child.id().unwrap() as i32;
    // Every process of the tool sits in the session led by the process the sidecar forked.
    let mut tool_pids = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tool_pids.is_empty() {
        tool_pids = processes_with(&marker);
        assert!(
            std::time::Instant::now() < deadline,
            "the tool never appeared"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for tool_pid in &tool_pids {
        let stat = std::fs::read_to_string(format!("/proc/{tool_pid}/stat")).unwrap_or_default();
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let session: i32 = rest.split_whitespace().nth(3).unwrap().parse().unwrap();
            assert_eq!(session, pid, "process {tool_pid} is in another session");
        }
    }
    let output = child.wait_with_output().await.unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!text.contains("CANARY"), "{text}");
    assert!(text.contains("TASK_ID=1"), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.contains(&"64"), "NOFILE lowered: {text}");
    assert!(lines.contains(&"0"), "no core dumps: {text}");
    assert!(lines.contains(&"nice=19"), "tools run at nice 19: {text}");
    assert!(
        lines.contains(&"oom=1000"),
        "tools die first under memory pressure: {text}"
    );
    // Only stdin/out/err are inherited (3 is `ls`'s own directory handle).
    assert!(
        lines.contains(&"fds=0 1 2 3"),
        "inherited descriptors: {text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn stopping_a_tool_kills_its_background_children() {
    let dir = std::env::temp_dir().join(format!("sluice-stop-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let marker = format!("STOP_MARKER={}", std::process::id());
    let mut env = env_for(&dir);
    env.insert("STOP_MARKER".into(), std::process::id().to_string());
    let tool = ToolCommand {
        program: SHELL,
        args: vec!["-c".into(), "sleep 300 & sleep 300 & wait".into()],
        workspace: &dir,
        env,
        limits: Limits::default(),
        user: None,
        stdin: false,
        exec_fd: None,
        pass_fd: None,
        network: Network::Full,
    };
    let mut child = Sandbox::start().spawn(&tool).unwrap().child;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while processes_with(&marker).len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the tool's children never appeared"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    crate::stop(&mut child, Duration::from_millis(500)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_with(&marker);
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "survivors: {left:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
fn processes_with(marker: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if !zombie
            && environ
                .windows(marker.len())
                .any(|w| w == marker.as_bytes())
        {
            found.push(pid);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn an_escaped_setsid_child_dies_when_the_tool_ends() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: PID namespaces for tools need root (or gVisor); running as non-root");
        return;
    }
    let dir = std::env::temp_dir().join(format!("sluice-escape-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let marker = format!("ESCAPE_MARKER={}", std::process::id());
    let (name, value) = marker.split_once('=').unwrap();
    let mut env = env_for(&dir);
    env.insert(name.into(), value.into());
    let tool = ToolCommand {
        program: SHELL,
        args: vec![
            "-c".into(),
            "setsid sleep 300 </dev/null >/dev/null 2>&1 & sleep 0.2; exit 0".into(),
        ],
        workspace: &dir,
        env,
        limits: Limits::default(),
        user: None,
        stdin: false,
        exec_fd: None,
        pass_fd: None,
        network: Network::Full,
    };
    let child = Sandbox::start().spawn(&tool).unwrap().child;
    let output = child.wait_with_output().await.unwrap();
    assert_eq!(output.status.code(), Some(0));
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let left = processes_with(&marker);
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "escaped processes survived: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn tmp_dirs_are_private_to_each_tool_and_the_workspace_stays_reachable() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: private /tmp needs the right to create mount namespaces (root)");
        return;
    }
    let user = ToolUser::resolve("nobody").unwrap();
    // Under /tmp on purpose: the tmpfs covers it, and the workspace is bound back.
    let dir = std::path::Path::new("/tmp").join(format!("sluice-tmp-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    if let Some(user) = user {
        std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid)).unwrap();
    }
    let marker = format!("sluice-plant-{}", std::process::id());
    let script = format!(
        "echo planted > /tmp/{marker}; echo planted > /dev/shm/{marker}; echo planted > /var/tmp/{marker}; \
         ls -A /tmp | grep -v '^sluice-tmp-test' | wc -l; pwd; echo kept > in-workspace; cat $HOME/in-workspace"
    );
    let tool = ToolCommand {
        program: SHELL,
        args: vec!["-c".into(), script],
        workspace: &dir,
        env: env_for(&dir),
        limits: Limits::default(),
        user,
        stdin: false,
        exec_fd: None,
        pass_fd: None,
        network: Network::Full,
    };
    let output = Sandbox::start()
        .spawn(&tool)
        .unwrap()
        .child
        .wait_with_output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "{text} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        lines[0], "1",
        "the tool's /tmp holds only its planted file: {text}"
    );
    assert_eq!(lines[1], dir.to_str().unwrap());
    assert_eq!(lines[2], "kept");
    for shared in ["/tmp", "/dev/shm", "/var/tmp"] {
        assert!(
            !std::path::Path::new(shared).join(&marker).exists(),
            "{shared}/{marker} outlived the tool"
        );
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("in-workspace")).unwrap(),
        "kept\n"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_tool_under_a_root_sidecar_runs_unprivileged_and_cannot_touch_it() {
    let Some(user) = ToolUser::resolve("nobody").unwrap() else {
        eprintln!("skipped: the sidecar is not root, so tools already share its identity");
        return;
    };
    let dir = std::env::temp_dir().join(format!("sluice-uid-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid)).unwrap();
    let sidecar = std::process::id();
    let script = format!(
        "id -u; cat /proc/{sidecar}/environ >/dev/null 2>&1; echo read=$?; \
         kill -0 {sidecar} 2>/dev/null; echo signal=$?; echo hi > own-file; echo write=$?"
    );
    let tool = ToolCommand {
        program: SHELL,
        args: vec!["-c".into(), script],
        workspace: &dir,
        env: env_for(&dir),
        limits: Limits::default(),
        user: Some(user),
        stdin: false,
        exec_fd: None,
        pass_fd: None,
        network: Network::Full,
    };
    let output = Sandbox::start()
        .spawn(&tool)
        .unwrap()
        .child
        .wait_with_output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], user.uid.to_string(), "{text}");
    assert_eq!(
        lines[1], "read=1",
        "the sidecar's environment must be unreadable: {text}"
    );
    assert_eq!(
        lines[2], "signal=1",
        "the sidecar must not be signalable: {text}"
    );
    assert_eq!(
        lines[3], "write=0",
        "the workspace must be writable: {text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
