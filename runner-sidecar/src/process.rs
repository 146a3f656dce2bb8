//! Forking tool processes under limits, and stopping them with everything they started.
//!
//! Each tool gets its own session and process group (`setsid`), `PR_SET_PDEATHSIG(SIGKILL)`,
//! `PR_SET_NO_NEW_PRIVS`, rlimits that can only be lowered, a cleared environment plus an
//! allow-list, stdin `/dev/null`, and the task's workspace as its cwd. Stopping a tool signals
//! the whole group, so `cmd &` children die with it.
//!
//! Where the sidecar may create PID namespaces (root, or inside gVisor), each tool also runs in
//! its own: a process group cannot hold a `setsid` escapee, and a `kill -9` of the sidecar
//! runs no cleanup code at all. The kernel, though, kills every process of a PID namespace
//! when its init dies. So the forked child keeps a small chain, all of it in `pre_exec`
//! (async-signal-safe calls only, no allocation):
//!
//! ```text
//! sidecar ─fork→ keeper (old namespace; mirrors the tool's exit; death signal = SIGKILL)
//!                  └─clone(VM, VFORK, FILES)→ init (PID 1 of the new namespace; reaps)
//!                                               └─clone(VM, VFORK)→ tool (execs: bash -c …)
//! ```
//!
//! Only the first step copies the sidecar's address space. Init and the tool share the
//! keeper's copy, each on a stack of its own mapped before the fork, and each `clone` is a
//! vfork: the keeper sleeps while init lives, init sleeps until the tool has exec'd, so at any
//! moment exactly one of the three runs on that memory. (Three forks cost about a third of a
//! millisecond more per tool, in page-table copies and teardowns.)
//!
//! When the tool exits, init exits with its status and the namespace's stragglers die; when
//! the sidecar dies, the keeper gets SIGKILL, then init, then everything in the namespace.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use sluice_protocol::{Limits, Network};
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
    /// Run the tool as this user instead of the sidecar's (see [`ToolUser`]).
    pub user: Option<ToolUser>,
    /// Give the tool a stdin pipe instead of `/dev/null`.
    pub stdin: bool,
    /// Execute this descriptor (`execveat(AT_EMPTY_PATH)`) instead of looking `program` up:
    /// the tool user then needs no search right on the binary's directories. `program` is
    /// still the tool's `argv[0]`, and is executed by path where `execveat` is missing.
    pub exec_fd: Option<std::os::fd::RawFd>,
    /// A descriptor the tool inherits at the same number (a script handed to bash as
    /// `/proc/self/fd/<n>`); every other descriptor above stderr is closed at the exec.
    pub pass_fd: Option<std::os::fd::RawFd>,
    /// `Network::None` gives the tool a network namespace with only loopback.
    pub network: Network,
}

/// The tool's exec, built before the fork (the children may not allocate): the program by
/// path (looked up in the tool's `PATH` when it has no slash) and, where given, by descriptor.
struct PreparedExec {
    fd: Option<std::os::fd::RawFd>,
    path: std::ffi::CString,
    _strings: Vec<std::ffi::CString>,
    argv: Vec<*const nix::libc::c_char>,
    envp: Vec<*const nix::libc::c_char>,
}

// SAFETY: the pointers point into `_strings`, owned by the same value and never mutated; the
// value is only read, in the forked children.
unsafe impl Send for PreparedExec {}
unsafe impl Sync for PreparedExec {}

impl PreparedExec {
    fn new(tool: &ToolCommand<'_>) -> std::io::Result<PreparedExec> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let nul = |_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "NUL byte in an argument or variable",
            )
        };
        let path = resolve_program(tool.program, &tool.env)?;
        let path = CString::new(path.as_os_str().as_bytes()).map_err(nul)?;
        let mut args = vec![CString::new(tool.program).map_err(nul)?];
        for arg in &tool.args {
            args.push(CString::new(arg.as_str()).map_err(nul)?);
        }
        let mut vars = Vec::new();
        for (name, value) in &tool.env {
            vars.push(CString::new(format!("{name}={value}")).map_err(nul)?);
        }
        let mut argv: Vec<_> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<_> = vars.iter().map(|v| v.as_ptr()).collect();
        envp.push(std::ptr::null());
        args.extend(vars);
        Ok(PreparedExec {
            fd: tool.exec_fd,
            path,
            _strings: args,
            argv,
            envp,
        })
    }

    /// Replaces the process image: by descriptor (`execveat(AT_EMPTY_PATH)`) where one is
    /// given, by path otherwise or where `execveat` is missing. Returns only the error.
    /// Async-signal-safe.
    fn exec(&self) -> std::io::Error {
        use nix::libc;
        if let Some(fd) = self.fd {
            // SAFETY: execveat with NUL-terminated arrays that outlive the call.
            unsafe {
                libc::syscall(
                    libc::SYS_execveat,
                    fd,
                    c"".as_ptr(),
                    self.argv.as_ptr(),
                    self.envp.as_ptr(),
                    libc::AT_EMPTY_PATH,
                );
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOSYS) {
                return err;
            }
        }
        // SAFETY: as above.
        unsafe {
            libc::execve(self.path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr());
        }
        std::io::Error::last_os_error()
    }
}

/// The program to execute: `program` itself when it holds a slash, else the first executable
/// file of that name in the tool's `PATH` (as a shell or `execvp` would find it).
fn resolve_program(
    program: &str,
    env: &BTreeMap<String, String>,
) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Ok(program.into());
    }
    let search = env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    // Relative entries would resolve against the sidecar's directory, not the tool's: skipped.
    for dir in search.split(':').filter(|dir| dir.starts_with('/')) {
        let candidate = Path::new(dir).join(program);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{program}: not found in the tool's PATH"),
    ))
}

/// A stack for a helper started with `clone`, mapped before the fork (the children cannot
/// map memory), with a guard page below it: an overflow faults instead of writing over the
/// keeper's heap.
struct HelperStack {
    base: *mut nix::libc::c_void,
    len: usize,
}

// SAFETY: the mapping is only used by the forked children, and unmapped by its owner.
unsafe impl Send for HelperStack {}
unsafe impl Sync for HelperStack {}

impl HelperStack {
    const SIZE: usize = 256 * 1024;
    const GUARD: usize = 4096;

    fn new() -> std::io::Result<HelperStack> {
        use nix::libc;
        // SAFETY: a fresh anonymous mapping; the guard page is inside it.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                Self::SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            let stack = HelperStack {
                base,
                len: Self::SIZE,
            };
            if libc::mprotect(base, Self::GUARD, libc::PROT_NONE) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(stack)
        }
    }

    /// The initial stack pointer (stacks grow down; page-aligned, so 16-byte aligned).
    fn top(&self) -> *mut nix::libc::c_void {
        // SAFETY: one past the end of the mapping, which is where a stack starts.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for HelperStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; the children hold their own copies.
        unsafe {
            nix::libc::munmap(self.base, self.len);
        }
    }
}

/// Everything the tool's chain needs after the fork, computed before it.
struct ToolSetup {
    /// Where init or the tool write the errno of a failure to start (4 bytes), so that the
    /// sidecar's spawn fails as it would without the namespace chain (see [`StartErrors`]).
    start_errors: std::os::fd::RawFd,
    /// Where the keeper writes the tool's wait status and resource usage when it has ended
    /// (see [`ExitReport`]).
    exit_report: std::os::fd::RawFd,
    exec: PreparedExec,
    mounts: Option<PrivateMounts>,
    /// Run the tool in a network namespace of its own with only loopback.
    network_none: bool,
    /// A descriptor the tool inherits (the script); every other one above stderr is closed.
    pass_fd: Option<std::os::fd::RawFd>,
    user: Option<ToolUser>,
    limits: Vec<(Resource, u64)>,
    init_stack: HelperStack,
    tool_stack: HelperStack,
}

/// The unprivileged identity tools run as when the sidecar runs as root (`nobody` by
/// default): a tool then cannot read the sidecar's environment or memory, signal it, or
/// write its files, and RLIMIT_NPROC applies (the kernel exempts root from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolUser {
    pub uid: u32,
    pub gid: u32,
}

impl ToolUser {
    /// The user to drop to: `name` looked up when the sidecar is root, none otherwise (an
    /// unprivileged sidecar cannot switch users, and its tools already share its identity).
    pub fn resolve(name: &str) -> Result<Option<ToolUser>, String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Ok(None);
        }
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| format!("looking up tool user {name:?}: {e}"))?
            .ok_or_else(|| format!("the tool user {name:?} does not exist"))?;
        if user.uid.is_root() {
            return Err(format!(
                "the tool user {name:?} is root; tools must not run as root"
            ));
        }
        Ok(Some(ToolUser {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }))
    }
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

fn rlimits(limits: &Limits) -> Vec<(Resource, u64)> {
    let mut out = vec![(Resource::RLIMIT_CORE, 0)];
    let pairs = [
        (Resource::RLIMIT_CPU, limits.cpu_seconds),
        (Resource::RLIMIT_DATA, limits.memory_bytes),
        (Resource::RLIMIT_AS, limits.address_space_bytes),
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

/// The pid of the tool inside its namespace, for init's signal forwarding.
static TOOL_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// The tool's raw wait status, which init leaves here for the keeper (they share memory).
static TOOL_STATUS: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward_to_tool(signal: nix::libc::c_int) {
    let pid = TOOL_PID.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            nix::libc::kill(pid, signal);
        }
    }
}

/// `_exit(2)`: ends a forked helper without running any of the sidecar's exit handlers.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { nix::libc::_exit(code) }
}

/// Closes every descriptor from 3 up but `keep` in a forked helper that never execs. Above
/// all this closes std's spawn error pipe (close-on-exec, which never happens here): while a
/// helper holds it, the sidecar's `spawn` would wait for the whole tool to finish.
fn close_inherited_descriptors(keep: i32) {
    let keep = keep.max(2) as u32;
    // SAFETY: close_range and close are async-signal-safe.
    let closed = unsafe {
        let below = if keep > 3 {
            nix::libc::syscall(nix::libc::SYS_close_range, 3u32, keep - 1, 0u32)
        } else {
            0
        };
        let above = nix::libc::syscall(nix::libc::SYS_close_range, keep + 1, u32::MAX, 0u32);
        below | above
    };
    if closed != 0 {
        // No close_range (old kernels, gVisor): close what is open, one by one.
        for_each_descriptor_from_3(|fd| {
            if fd as u32 != keep {
                // SAFETY: as above.
                unsafe {
                    nix::libc::close(fd);
                }
            }
        });
    }
}

/// Calls `action` on every open descriptor from 3 up, where `close_range` is missing. Lists
/// `/proc/self/fd` with raw `getdents64` into stack buffers (a syscall per descriptor number
/// up to RLIMIT_NOFILE is seconds under gVisor's ptrace platform); falls back to every
/// number below the limit when `/proc` is unreadable or holds too many. Async-signal-safe.
fn for_each_descriptor_from_3(mut action: impl FnMut(i32)) {
    use nix::libc;
    const MAX: usize = 4096;
    let mut found = [0i32; MAX];
    let mut count = 0usize;
    let mut complete = false;
    // SAFETY: raw syscalls into stack buffers; records are parsed within their bounds.
    unsafe {
        let dir = libc::open(
            c"/proc/self/fd".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if dir >= 0 {
            let mut buf = [0u8; 4096];
            loop {
                let n = libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len());
                if n < 0 {
                    break;
                }
                if n == 0 {
                    complete = true;
                    break;
                }
                let mut at = 0usize;
                while at + 19 < n as usize {
                    let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
                    if reclen == 0 {
                        break;
                    }
                    let mut fd: i64 = -1;
                    let mut i = at + 19;
                    while i < at + reclen && buf[i] != 0 {
                        let c = buf[i];
                        fd = if c.is_ascii_digit() {
                            fd.max(0) * 10 + i64::from(c - b'0')
                        } else {
                            -2
                        };
                        if fd == -2 {
                            break;
                        }
                        i += 1;
                    }
                    if fd >= 3 && fd != i64::from(dir) && fd <= i64::from(i32::MAX) {
                        if count == MAX {
                            break;
                        }
                        found[count] = fd as i32;
                        count += 1;
                    }
                    at += reclen;
                }
                if count == MAX {
                    break;
                }
            }
            libc::close(dir);
        }
    }
    if complete {
        for &fd in &found[..count] {
            action(fd);
        }
        return;
    }
    let limit = getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft.min(1 << 16))
        .unwrap_or(1024);
    for fd in 3..limit as i32 {
        action(fd);
    }
}

/// Tools yield the CPU to the sidecar (nice 19, B-11) and are the OOM killer's first choice
/// (`oom_score_adj` 1000, B-10). Best effort: neither failure stops the tool.
fn yield_to_the_sidecar() {
    // SAFETY: setpriority, open, write and close are async-signal-safe.
    unsafe {
        nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, 19);
        let fd = nix::libc::open(c"/proc/self/oom_score_adj".as_ptr(), nix::libc::O_WRONLY);
        if fd >= 0 {
            nix::libc::write(fd, b"1000".as_ptr().cast(), 4);
            nix::libc::close(fd);
        }
    }
}

/// Marks every descriptor from 3 up close-on-exec in the tool process, so the tool inherits
/// only stdin, stdout and stderr whatever the sidecar's parent leaked to it (B-14). std's
/// spawn error pipe stays usable until the exec itself.
fn close_on_exec_above_stderr() {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    // SAFETY: close_range and fcntl are async-signal-safe.
    let marked = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_close_range,
            3u32,
            u32::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if marked != 0 {
        for_each_descriptor_from_3(|fd| {
            // SAFETY: as above.
            unsafe {
                nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC);
            }
        });
    }
}

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
struct PrivateMounts {
    /// The workspace, absolute (the tool's working directory).
    workspace: std::ffi::CString,
    binds: Vec<BindBack>,
    /// tmpfs options per entry of [`PRIVATE_DIRS`].
    options: Vec<std::ffi::CString>,
}

impl PrivateMounts {
    fn new(workspace: &Path, size_bytes: u64) -> Option<PrivateMounts> {
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
fn private_mounts(plan: &PrivateMounts, in_pid_namespace: bool) {
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

/// Writes `/proc/self/fd/<fd>` and a NUL into `out` without allocating; the length, or 0.
fn proc_fd_path(fd: i32, out: &mut [u8; 32]) -> usize {
    if fd < 0 {
        return 0;
    }
    let prefix = b"/proc/self/fd/";
    out[..prefix.len()].copy_from_slice(prefix);
    let count = write_decimal(fd as u32, &mut out[prefix.len()..]);
    out[prefix.len() + count] = 0;
    prefix.len() + count
}

/// Writes `n` in decimal at the start of `out` without allocating; the number of digits.
/// `out` must hold 10 bytes.
fn write_decimal(mut n: u32, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 10];
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..count {
        out[i] = digits[count - 1 - i];
    }
    count
}

/// Termination signals the keeper ignores (it must outlive them to report the tool's exit)
/// and init forwards to the tool.
const GROUP_SIGNALS: [nix::libc::c_int; 3] =
    [nix::libc::SIGTERM, nix::libc::SIGINT, nix::libc::SIGHUP];

/// In the forked child (the keeper), before exec: starts init in a new PID namespace and
/// mirrors its exit (see the module doc). Never returns once init has started; returns at
/// once when the sidecar may not create PID namespaces, and this process becomes the tool
/// (process-group cleanup only).
///
/// Only async-signal-safe calls: this runs in a fork of a multi-threaded process.
fn keep_tool_in_pid_namespace(setup: &ToolSetup) -> std::io::Result<()> {
    use nix::libc;
    // SAFETY: unshare, sigaction (through signal), clone, close and waitpid are
    // async-signal-safe; init runs on its own stack and the keeper sleeps until it has exited.
    unsafe {
        if libc::unshare(libc::CLONE_NEWPID) != 0 {
            return Ok(());
        }
        // Out of group signals' way (SIGKILL, from the death signal, still ends it); init and
        // the tool inherit this, and the tool restores the defaults before its exec.
        for sig in GROUP_SIGNALS {
            libc::signal(sig, libc::SIG_IGN);
        }
        // Init shares this process's memory and descriptor table: its closing of every
        // descriptor from 3 up closes the keeper's too (std's spawn pipe above all).
        let init = libc::clone(
            init_main,
            setup.init_stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_FILES | libc::SIGCHLD,
            std::ptr::from_ref(setup).cast_mut().cast(),
        );
        if init < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Init has exited (it never execs): report its status, which is the tool's, and what
        // the tool and everything it started used.
        close_inherited_descriptors(setup.exit_report);
        let mut status = 0;
        let mut usage: libc::rusage = std::mem::zeroed();
        loop {
            if libc::wait4(init, &mut status, 0, &mut usage) == init {
                break;
            }
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                exit_now(127);
            }
        }
        let micros = |t: libc::timeval| t.tv_sec * 1_000_000 + t.tv_usec;
        let report: [i64; 4] = [
            i64::from(TOOL_STATUS.load(std::sync::atomic::Ordering::Relaxed)),
            usage.ru_maxrss,
            micros(usage.ru_utime),
            micros(usage.ru_stime),
        ];
        // The sidecar may have stopped listening (a dropped tool): no SIGPIPE for that.
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        libc::write(
            setup.exit_report,
            report.as_ptr().cast(),
            std::mem::size_of_val(&report),
        );
        exit_now(exit_code(status))
    }
}

/// The exit code mirroring a wait status: the code, or 128 + the signal.
fn exit_code(status: nix::libc::c_int) -> i32 {
    use nix::libc;
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        127
    }
}

/// PID 1 of the tool's namespace: starts the tool, forwards termination signals to it, reaps
/// orphans, and exits with the tool's status (which ends the namespace).
extern "C" fn init_main(setup: *mut nix::libc::c_void) -> nix::libc::c_int {
    use nix::libc;
    // SAFETY: `setup` is the keeper's `ToolSetup`, alive while the keeper sleeps; only
    // async-signal-safe calls follow, and the tool runs on its own stack while init sleeps.
    unsafe {
        let setup_ref = &*setup.cast_const().cast::<ToolSetup>();
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            fail_to_start(setup_ref, c"cannot set init's death signal", last_errno());
        }
        let tool = libc::clone(
            tool_main,
            setup_ref.tool_stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            setup,
        );
        if tool < 0 {
            fail_to_start(setup_ref, c"cannot start the tool process", last_errno());
        }
        // The tool has exec'd (or failed and exited): this memory is init's alone now.
        TOOL_PID.store(tool, std::sync::atomic::Ordering::Relaxed);
        close_inherited_descriptors(setup_ref.exit_report);
        for sig in GROUP_SIGNALS {
            // SAFETY: the handler only calls kill(2).
            libc::signal(sig, forward_to_tool as *const () as libc::sighandler_t);
        }
        let mut status = 0;
        loop {
            let pid = libc::waitpid(-1, &mut status, 0);
            if pid == tool {
                // For the keeper's report: the raw status tells a signal from an exit code.
                TOOL_STATUS.store(status, std::sync::atomic::Ordering::Relaxed);
                exit_now(exit_code(status));
            }
            // An orphan of the tool, reaped (or EINTR); keep waiting for the tool itself.
            if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                exit_now(127);
            }
        }
    }
}

/// The tool process: restores the default dispositions, confines itself and execs.
extern "C" fn tool_main(setup: *mut nix::libc::c_void) -> nix::libc::c_int {
    use nix::libc;
    // SAFETY: as in `init_main`; init sleeps until this process has exec'd or exited.
    unsafe {
        let setup = &*setup.cast_const().cast::<ToolSetup>();
        for sig in GROUP_SIGNALS {
            libc::signal(sig, libc::SIG_DFL);
        }
        if let Err(err) = confine_tool(setup, true) {
            fail_to_start(setup, c"cannot confine the tool", err.raw_os_error());
        }
        let err = setup.exec.exec();
        fail_to_start(setup, c"cannot execute the tool", err.raw_os_error())
    }
}

/// In the tool process, before its exec: private directories and `/proc`, the network
/// namespace when asked, priority, the uid drop, the death signal, no new privileges,
/// close-on-exec and the lowered rlimits. Async-signal-safe: raw syscalls (the uid drop with
/// no libc bookkeeping, which would try to reach the keeper's threads).
fn confine_tool(setup: &ToolSetup, in_pid_namespace: bool) -> std::io::Result<()> {
    use nix::libc;
    let check = |result: libc::c_long| {
        if result == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    if let Some(mounts) = &setup.mounts {
        private_mounts(mounts, in_pid_namespace);
    }
    if setup.network_none {
        // Fails closed: a tool that asked for no network never runs with one.
        isolate_network()?;
    }
    yield_to_the_sidecar();
    // SAFETY: raw credential and prctl syscalls on this process only.
    unsafe {
        if let Some(user) = setup.user {
            // Only the tool drops its privileges; the keeper and init stay root.
            check(libc::syscall(
                libc::SYS_setgroups,
                0,
                std::ptr::null::<libc::gid_t>(),
            ))?;
            check(libc::syscall(
                libc::SYS_setresgid,
                user.gid,
                user.gid,
                user.gid,
            ))?;
            check(libc::syscall(
                libc::SYS_setresuid,
                user.uid,
                user.uid,
                user.uid,
            ))?;
        }
        // Again: a credential change clears the death signal.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL).into())?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())?;
    }
    close_on_exec_above_stderr();
    if let Some(fd) = setup.pass_fd {
        // SAFETY: fcntl on a descriptor of this process.
        check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }.into())?;
    }
    for &(resource, wanted) in &setup.limits {
        let (soft, hard) = getrlimit(resource)?;
        // Only ever lower: a job cannot raise the runner's limits.
        let hard = hard.min(wanted);
        setrlimit(resource, soft.min(hard), hard)?;
    }
    Ok(())
}

fn last_errno() -> Option<i32> {
    std::io::Error::last_os_error().raw_os_error()
}

/// Ends a helper that could not start the tool: hands the errno to the sidecar's spawn (which
/// then fails, so a passing shortage such as `EAGAIN` is retried like any spawn failure),
/// says why on the tool's stderr, and exits with the shell's "cannot execute" status.
/// Async-signal-safe.
fn fail_to_start(setup: &ToolSetup, what: &std::ffi::CStr, errno: Option<i32>) -> ! {
    let code = errno.unwrap_or(nix::libc::EIO).to_ne_bytes();
    // SAFETY: write is async-signal-safe; the pipe is empty, so 4 bytes never block.
    unsafe {
        nix::libc::write(setup.start_errors, code.as_ptr().cast(), code.len());
    }
    let mut line = [0u8; 160];
    let mut at = 0;
    for part in [b"sluice-runner: ".as_slice(), what.to_bytes()] {
        let n = part.len().min(line.len() - at);
        line[at..at + n].copy_from_slice(&part[..n]);
        at += n;
    }
    if let Some(errno) = errno {
        let text = b" (errno ";
        line[at..at + text.len()].copy_from_slice(text);
        at += text.len();
        at += write_decimal(errno.unsigned_abs(), &mut line[at..]);
        line[at] = b')';
        at += 1;
    }
    line[at] = b'\n';
    at += 1;
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        nix::libc::write(2, line.as_ptr().cast(), at);
    }
    exit_now(127)
}

/// Spawns a tool process. Call it from an async task on a runtime *worker* thread, never from
/// `spawn_blocking`: `PR_SET_PDEATHSIG` fires when the thread that forked the child exits, and
/// blocking-pool threads exit when idle, which would kill a long tool early (B-13).
pub fn spawn_tool(tool: &ToolCommand<'_>) -> std::io::Result<SpawnedTool> {
    let mut command = Command::new(tool.program);
    command
        .args(&tool.args)
        .env_clear()
        .envs(&tool.env)
        .current_dir(tool.workspace)
        .stdin(if tool.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Computed before the fork: the children may only make async-signal-safe calls.
    let start_errors = StartErrors::new()?;
    let exit_report = ExitReport::new()?;
    let setup = ToolSetup {
        start_errors: start_errors.write_fd(),
        exit_report: exit_report.write_fd(),
        exec: PreparedExec::new(tool)?,
        mounts: PrivateMounts::new(
            tool.workspace,
            tool.limits.file_size_bytes.unwrap_or(1 << 30),
        ),
        network_none: tool.network == Network::None,
        pass_fd: tool.pass_fd,
        user: tool.user,
        limits: rlimits(&tool.limits),
        init_stack: HelperStack::new()?,
        tool_stack: HelperStack::new()?,
    };
    // SAFETY: between fork and exec the closure only makes raw syscalls (setsid, prctl,
    // unshare, clone, getrlimit, setrlimit, exec) and does not allocate (`setup` was built
    // beforehand).
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid()?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            keep_tool_in_pid_namespace(&setup)?;
            // No PID namespace here: this process is the tool.
            confine_tool(&setup, false)?;
            Err(setup.exec.exec())
        });
    }
    // Held across the spawn, so the orphan reaper cannot see the new pid untracked.
    let mut tracked = spawned();
    let child = command.spawn()?;
    if let Some(pid) = child.id() {
        tracked.insert(pid as i32);
    }
    // The spawn returned: the tool has exec'd, or it (or init) has failed and said so.
    if let Some(err) = start_errors.received() {
        // The keeper exits 127 on its own; kill_on_drop makes sure, tokio reaps it.
        drop(child);
        return Err(err);
    }
    Ok(SpawnedTool {
        child,
        report: exit_report.sealed(),
    })
}

/// A started tool: its process (the keeper, or the tool itself without a PID namespace) and
/// the report of how it ended.
#[derive(Debug)]
pub struct SpawnedTool {
    pub child: Child,
    report: ExitReport,
}

impl SpawnedTool {
    /// How the tool ended and what it used, once the process has exited: the keeper writes
    /// it just before. `None` without a PID namespace (the tool is the process itself).
    pub fn usage(&self) -> Option<ToolUsage> {
        self.report.read()
    }
}

/// What a finished tool used, and how it ended, as its keeper saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolUsage {
    /// The signal that ended the tool, if one did (its exit status is 128 + n otherwise).
    pub signal: Option<i32>,
    /// Peak resident memory of the largest process of the tool's tree, in bytes.
    pub max_rss_bytes: u64,
    /// CPU time of the whole tree, user and system, in milliseconds.
    pub cpu_ms: u64,
}

/// A close-on-exec, non-blocking pipe on which a forked helper reports to the sidecar. The
/// sidecar closes its write end once the helpers hold theirs, so a read after they are done
/// never waits: it finds what they wrote, or nothing.
#[derive(Debug)]
struct ReportPipe {
    read: std::os::fd::OwnedFd,
    write: Option<std::os::fd::OwnedFd>,
}

impl ReportPipe {
    fn new() -> std::io::Result<ReportPipe> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        Ok(ReportPipe {
            read,
            write: Some(write),
        })
    }

    /// The write end, for the helpers (-1 once sealed).
    fn write_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.write.as_ref().map_or(-1, |w| w.as_raw_fd())
    }

    /// Closes the sidecar's write end.
    fn seal(&mut self) {
        drop(self.write.take());
    }

    /// Fills `buf` if a whole report of its size was written.
    fn read_whole(&self, buf: &mut [u8]) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: a read into a caller's buffer from a descriptor this value owns.
        let n =
            unsafe { nix::libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        n == buf.len() as isize
    }
}

/// The pipe on which the keeper reports, as it exits, the tool's wait status and the resource
/// usage of everything it ran (`wait4` of init, which reaped them all).
#[derive(Debug)]
struct ExitReport(ReportPipe);

impl ExitReport {
    fn new() -> std::io::Result<ExitReport> {
        ReportPipe::new().map(ExitReport)
    }

    fn write_fd(&self) -> std::os::fd::RawFd {
        self.0.write_fd()
    }

    /// Closes the sidecar's write end once the keeper holds its own.
    fn sealed(mut self) -> ExitReport {
        self.0.seal();
        self
    }

    fn read(&self) -> Option<ToolUsage> {
        let mut bytes = [0u8; 32];
        if !self.0.read_whole(&mut bytes) {
            return None;
        }
        let field =
            |i: usize| i64::from_ne_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let status = field(0) as i32;
        Some(ToolUsage {
            signal: nix::libc::WIFSIGNALED(status).then(|| nix::libc::WTERMSIG(status)),
            max_rss_bytes: (field(1).max(0) as u64).saturating_mul(1024),
            cpu_ms: (field(2).max(0) as u64 + field(3).max(0) as u64) / 1000,
        })
    }
}

/// In the tool process, before the uid drop: a network namespace of its own, with only the
/// loopback interface (brought up), so the tool reaches nothing outside itself — not
/// Postgres, not the scheduler, not a metadata address. Only the unshare must succeed: where
/// the new namespace has no network stack at all (gVisor with host networking), there is no
/// loopback to bring up either, which is no less isolated. Async-signal-safe.
fn isolate_network() -> std::io::Result<()> {
    use nix::libc;
    // SAFETY: unshare, socket, ioctl and close on this process's own objects; `request` is
    // a zeroed ifreq on the stack.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if socket < 0 {
            return Ok(());
        }
        let mut request: libc::ifreq = std::mem::zeroed();
        request.ifr_name[0] = b'l' as libc::c_char;
        request.ifr_name[1] = b'o' as libc::c_char;
        if libc::ioctl(socket, libc::SIOCGIFFLAGS, &mut request) == 0 {
            request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(socket, libc::SIOCSIFFLAGS, &request);
        }
        libc::close(socket);
    }
    Ok(())
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

/// Whether this process may give tools a network namespace of their own (`network: none`):
/// probed once, in a short-lived thread (namespaces are per thread, so the sidecar's own
/// network stays as it is).
pub fn can_isolate_network() -> bool {
    static PROBED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBED.get_or_init(|| {
        std::thread::spawn(|| {
            // SAFETY: unshare affects only this thread, which ends right after.
            unsafe { nix::libc::unshare(nix::libc::CLONE_NEWNET) == 0 }
        })
        .join()
        .unwrap_or(false)
    })
}

/// A close-on-exec pipe on which init or the tool report a failure to start. std's spawn
/// returns only once the tool has exec'd or exited (its error pipe closes then, the tool's
/// copy at the exec, init's once the tool is under way), so after the spawn the helpers have
/// either written their errno here or closed their ends: a non-blocking read never waits.
struct StartErrors(ReportPipe);

impl StartErrors {
    fn new() -> std::io::Result<StartErrors> {
        ReportPipe::new().map(StartErrors)
    }

    fn write_fd(&self) -> std::os::fd::RawFd {
        self.0.write_fd()
    }

    /// The failure the helpers reported, if any.
    fn received(mut self) -> Option<std::io::Error> {
        self.0.seal();
        let mut code = [0u8; 4];
        self.0
            .read_whole(&mut code)
            .then(|| std::io::Error::from_raw_os_error(i32::from_ne_bytes(code)))
    }
}

/// Pids of the tools this process spawned (tokio reaps them): [`reap_orphans`] leaves them be.
fn spawned() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<i32>> {
    static SPAWNED: std::sync::Mutex<std::collections::BTreeSet<i32>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    SPAWNED.lock().unwrap_or_else(|e| e.into_inner())
}

/// When the sidecar is PID 1 (a container without an init), orphans of its namespace are
/// re-parented to it: reaps those that are zombies, never touching the tools it spawned
/// (tokio waits for those). Returns how many were reaped. Tools run in PID namespaces of
/// their own, so this only catches what escaped where those could not be created.
pub fn reap_orphans() -> usize {
    let me = std::process::id() as i32;
    let mut reaped = 0;
    let mut live = std::collections::BTreeSet::new();
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
        if state == Some("Z") && ppid == Some(me) && !spawned().contains(&pid) {
            let flags = nix::sys::wait::WaitPidFlag::WNOHANG;
            if nix::sys::wait::waitpid(Pid::from_raw(pid), Some(flags)).is_ok() {
                reaped += 1;
            }
        }
    }
    // Tools tokio has reaped are gone from /proc: forget them.
    spawned().retain(|pid| live.contains(pid));
    reaped
}

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
        env: tool_env(workspace, 0, 0, &BTreeMap::new()),
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
        let mut child = spawn_tool(&tool)?.child;
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
    fn the_descriptor_listing_finds_every_open_descriptor() {
        let files: Vec<std::fs::File> = (0..40)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let mut listed = Vec::new();
        for_each_descriptor_from_3(|fd| listed.push(fd));
        let mut expected: Vec<i32> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
            .filter(|fd| *fd >= 3)
            .collect();
        // read_dir's own descriptor is in the second listing only (it may also reuse one).
        expected.retain(|fd| std::fs::metadata(format!("/proc/self/fd/{fd}")).is_ok());
        listed.sort_unstable();
        expected.sort_unstable();
        use std::os::fd::AsRawFd;
        for file in &files {
            assert!(
                listed.contains(&file.as_raw_fd()),
                "{} missing",
                file.as_raw_fd()
            );
        }
        assert!(
            listed.len() + 1 >= expected.len() && listed.len() <= expected.len() + 1,
            "{listed:?} vs {expected:?}"
        );
        drop(files);
    }

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
            env: tool_env(&dir, 1, 1, &BTreeMap::new()),
            limits: Limits::default(),
            user: None,
            stdin: false,
            exec_fd: None,
            pass_fd: None,
            network: Network::Full,
        };
        // In a PID namespace the tool process execs by itself, and hands its errno back to
        // the spawn, which fails as it does without one.
        let err = spawn_tool(&tool).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
        let missing = ToolCommand {
            program: "no-such-tool-anywhere",
            ..tool.clone()
        };
        let err = spawn_tool(&missing).unwrap_err();
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
        let mut env = tool_env(&dir, 1, 1, &BTreeMap::new());
        env.insert("SESSION_MARKER".into(), std::process::id().to_string());
        let tool = ToolCommand {
            program: shell(),
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
        let child = spawn_tool(&tool).unwrap().child;
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
            let stat =
                std::fs::read_to_string(format!("/proc/{tool_pid}/stat")).unwrap_or_default();
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
        let mut env = tool_env(&dir, 1, 1, &BTreeMap::new());
        env.insert("STOP_MARKER".into(), std::process::id().to_string());
        let tool = ToolCommand {
            program: shell(),
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
        let mut child = spawn_tool(&tool).unwrap().child;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while processes_with(&marker).len() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "the tool's children never appeared"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop(&mut child, Duration::from_millis(500)).await;
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
            eprintln!(
                "skipped: PID namespaces for tools need root (or gVisor); running as non-root"
            );
            return;
        }
        let dir = std::env::temp_dir().join(format!("sluice-escape-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = format!("ESCAPE_MARKER={}", std::process::id());
        let (name, value) = marker.split_once('=').unwrap();
        let mut env = tool_env(&dir, 1, 1, &BTreeMap::new());
        env.insert(name.into(), value.into());
        let tool = ToolCommand {
            program: shell(),
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
        let child = spawn_tool(&tool).unwrap().child;
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
        let dir =
            std::path::Path::new("/tmp").join(format!("sluice-tmp-test-{}", std::process::id()));
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
            program: shell(),
            args: vec!["-c".into(), script],
            workspace: &dir,
            env: tool_env(&dir, 1, 1, &BTreeMap::new()),
            limits: Limits::default(),
            user,
            stdin: false,
            exec_fd: None,
            pass_fd: None,
            network: Network::Full,
        };
        let output = spawn_tool(&tool)
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
            program: shell(),
            args: vec!["-c".into(), script],
            workspace: &dir,
            env: tool_env(&dir, 1, 1, &BTreeMap::new()),
            limits: Limits::default(),
            user: Some(user),
            stdin: false,
            exec_fd: None,
            pass_fd: None,
            network: Network::Full,
        };
        let output = spawn_tool(&tool)
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
}
