//! Private directories and a fresh `/proc` for each tool: a mount namespace of its own with
//! an empty tmpfs on `/tmp`, `/var/tmp`, `/dev/shm` and `/run` (what must stay reachable bound
//! back), and in its PID namespace a `/proc` that shows only its own processes.

use std::path::Path;

use crate::descriptors::proc_fd_path;

/// Directories a tool could write that would outlive its task, or that show it what other
/// tasks left: each tool gets its own empty tmpfs on them (S-09, S-14), gone when its last
/// process exits. `(path, mode, size)`: `None` as the size means RLIMIT_FSIZE's.
const PRIVATE_DIRS: [(&std::ffi::CStr, u32, Option<u64>); 4] = [
    (c"/tmp", 0o1777, None),
    (c"/var/tmp", 0o1777, None),
    // Docker's default for /dev/shm: it is memory, not disk.
    (c"/dev/shm", 0o1777, Some(64 << 20)),
    // Root's, as on a booted system, with a private /run/lock; /var/run is a link to it.
    (c"/run", 0o755, Some(16 << 20)),
];

/// What must be bound back into a private directory at the same path: the workspace when it
/// lives beneath one, and `/etc/resolv.conf`'s target when a resolver keeps it under `/run`.
struct BindBack {
    /// The path, absolute.
    path: std::ffi::CString,
    /// Its ancestors beneath the private directory, shortest first, recreated in the tmpfs.
    ancestors: Vec<std::ffi::CString>,
    /// Which of [`PRIVATE_DIRS`] holds it.
    holder: usize,
    /// A directory (the workspace) or a file.
    is_dir: bool,
}

impl BindBack {
    fn new(path: &Path, is_dir: bool) -> Option<BindBack> {
        use std::os::unix::ffi::OsStrExt;
        for (holder, (dir, _, _)) in PRIVATE_DIRS.iter().enumerate() {
            let dir = Path::new(std::ffi::OsStr::from_bytes(dir.to_bytes()));
            let Ok(rest) = path.strip_prefix(dir) else {
                continue;
            };
            let mut ancestors = Vec::new();
            let mut at = dir.to_path_buf();
            let components: Vec<_> = rest.components().collect();
            for component in &components[..components.len().saturating_sub(1)] {
                at.push(component);
                ancestors.push(std::ffi::CString::new(at.as_os_str().as_bytes()).ok()?);
            }
            return Some(BindBack {
                path: std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?,
                ancestors,
                holder,
                is_dir,
            });
        }
        None
    }
}

/// What [`private_mounts`] needs, computed before the fork.
pub(crate) struct PrivateMounts {
    /// The workspace, absolute (the tool's working directory).
    workspace: std::ffi::CString,
    binds: Vec<BindBack>,
    /// tmpfs options per entry of [`PRIVATE_DIRS`].
    options: Vec<std::ffi::CString>,
}

impl PrivateMounts {
    pub(crate) fn new(workspace: &Path, size_bytes: u64) -> Option<PrivateMounts> {
        use std::os::unix::ffi::OsStrExt;
        let workspace = std::path::absolute(workspace).ok()?;
        let mut binds = Vec::new();
        if let Some(bind) = BindBack::new(&workspace, true) {
            binds.push(bind);
        }
        // systemd-resolved and friends keep the resolver configuration under /run: a
        // private /run must still resolve names.
        if let Ok(resolv) = std::fs::canonicalize("/etc/resolv.conf") {
            if resolv.starts_with("/run") {
                binds.extend(BindBack::new(&resolv, false));
            }
        }
        let options = PRIVATE_DIRS
            .iter()
            .map(|(_, mode, size)| {
                std::ffi::CString::new(format!(
                    "mode={mode:o},size={}",
                    size.unwrap_or(size_bytes).min(size_bytes.max(1 << 20))
                ))
                .ok()
            })
            .collect::<Option<Vec<_>>>()?;
        Some(PrivateMounts {
            workspace: std::ffi::CString::new(workspace.as_os_str().as_bytes()).ok()?,
            binds,
            options,
        })
    }
}

/// In the tool process, before the uid drop: a mount namespace of its own with an empty
/// tmpfs on each of [`PRIVATE_DIRS`] (what was bound back where it must be), and — in its own
/// PID namespace — a fresh `/proc` that shows only the tool's processes. Best effort, like
/// the PID namespace: without the right to unshare (or where a mount fails, as under gVisor's
/// 2022 release) the tool keeps the shared directories, and the per-slot uid still keeps
/// tasks apart. Async-signal-safe calls only.
pub(crate) fn private_mounts(plan: &PrivateMounts, in_pid_namespace: bool) {
    use nix::libc;
    // SAFETY: raw syscalls on NUL-terminated strings computed before the fork.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return;
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return;
        }
        // What is bound back, by descriptor, opened before its parent is covered.
        const MAX_BINDS: usize = 4;
        let mut sources = [-1i32; MAX_BINDS];
        let mut source_paths = [[0u8; 32]; MAX_BINDS];
        for (index, bind) in plan.binds.iter().take(MAX_BINDS).enumerate() {
            let flags =
                libc::O_PATH | libc::O_CLOEXEC | if bind.is_dir { libc::O_DIRECTORY } else { 0 };
            sources[index] = libc::open(bind.path.as_ptr(), flags);
            proc_fd_path(sources[index], &mut source_paths[index]);
        }
        for (holder, (dir, mode, _)) in PRIVATE_DIRS.iter().enumerate() {
            let mut stat: libc::stat = std::mem::zeroed();
            if libc::lstat(dir.as_ptr(), &mut stat) != 0
                || stat.st_mode & libc::S_IFMT != libc::S_IFDIR
            {
                continue;
            }
            // The workspace must come back, or the tool could not run: skip the directory
            // holding it when its descriptor is missing.
            let workspace_lost = plan
                .binds
                .iter()
                .take(MAX_BINDS)
                .enumerate()
                .any(|(i, b)| b.holder == holder && b.is_dir && sources[i] < 0);
            if workspace_lost {
                continue;
            }
            if libc::mount(
                c"tmpfs".as_ptr(),
                dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                plan.options[holder].as_ptr().cast(),
            ) != 0
            {
                continue;
            }
            if *mode == 0o755 {
                // /run: a private, writable /run/lock like a booted system's.
                libc::mkdir(c"/run/lock".as_ptr(), 0o1777);
                libc::chmod(c"/run/lock".as_ptr(), 0o1777);
            }
            for (index, bind) in plan.binds.iter().take(MAX_BINDS).enumerate() {
                if bind.holder != holder || sources[index] < 0 {
                    continue;
                }
                for ancestor in &bind.ancestors {
                    libc::mkdir(ancestor.as_ptr(), 0o755);
                }
                if bind.is_dir {
                    libc::mkdir(bind.path.as_ptr(), 0o700);
                } else {
                    let file = libc::open(
                        bind.path.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    if file >= 0 {
                        libc::close(file);
                    }
                }
                let bound = libc::mount(
                    source_paths[index].as_ptr().cast(),
                    bind.path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) == 0;
                if !bound && bind.is_dir {
                    // Without its workspace the tool could not run: give the directory back.
                    libc::umount2(dir.as_ptr(), libc::MNT_DETACH);
                    break;
                }
            }
        }
        // The working directory now resolves through the bound path.
        libc::chdir(plan.workspace.as_ptr());
        for source in sources {
            if source >= 0 {
                libc::close(source);
            }
        }
        if in_pid_namespace {
            fresh_proc();
        }
    }
}

/// Mounts a `/proc` of the tool's own PID namespace over the sidecar's, so that the tool sees
/// its own processes only: not the host's, not other tasks' (S-14). Undone where the new
/// mount is unusable (gVisor's 2022 release answers EINVAL on reading it). Async-signal-safe.
fn fresh_proc() {
    use nix::libc;
    // SAFETY: raw syscalls on static strings.
    unsafe {
        if libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            return;
        }
        let probe = libc::open(
            c"/proc/self/stat".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        let mut byte = [0u8; 1];
        let usable = probe >= 0 && libc::read(probe, byte.as_mut_ptr().cast(), 1) == 1;
        if probe >= 0 {
            libc::close(probe);
        }
        if !usable {
            libc::umount2(c"/proc".as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Whether tools get a private mount namespace here — their own `/tmp`, `/run` and a fresh
/// `/proc` that shows their own processes only. Probed once in a forked child (a mount
/// namespace cannot be entered by one thread alone). Not under gVisor's 2022 release, which
/// refuses the propagation change (and whose procfs lets any uid read any `environ`): there
/// tasks sharing a runner can see each other's processes and environments, and only the pod
/// boundary (one slot per runner, or a fresh runner per task) keeps them apart.
pub fn can_isolate_mounts() -> bool {
    static PROBED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBED.get_or_init(|| {
        use nix::libc;
        // SAFETY: the child makes raw syscalls only (unshare, mount, _exit) and exits.
        unsafe {
            match libc::fork() {
                0 => {
                    let private = libc::unshare(libc::CLONE_NEWNS) == 0
                        && libc::mount(
                            std::ptr::null(),
                            c"/".as_ptr(),
                            std::ptr::null(),
                            libc::MS_REC | libc::MS_PRIVATE,
                            std::ptr::null(),
                        ) == 0;
                    libc::_exit(if private { 0 } else { 1 })
                }
                pid if pid > 0 => {
                    let mut status = 0;
                    libc::waitpid(pid, &mut status, 0) == pid
                        && libc::WIFEXITED(status)
                        && libc::WEXITSTATUS(status) == 0
                }
                _ => false,
            }
        }
    })
}
