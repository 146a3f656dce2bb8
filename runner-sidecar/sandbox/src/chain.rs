//! The fork chain: from the sidecar to an exec'd tool, confined.
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

use std::process::Stdio;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::Signal;
use sluice_protocol::{Limits, Network};
use tokio::process::{Child, Command};

use crate::command::{PreparedExec, ToolCommand, ToolUser};
use crate::descriptors::{close_inherited_descriptors, close_on_exec_above_stderr, write_decimal};
use crate::mounts::{private_mounts, PrivateMounts};
use crate::network::isolate_network;
use crate::reaper::Tracked;

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

/// Spawns a tool process (through [`crate::Sandbox::spawn`]). Call it from an async task on a runtime *worker* thread, never from
/// `spawn_blocking`: `PR_SET_PDEATHSIG` fires when the thread that forked the child exits, and
/// blocking-pool threads exit when idle, which would kill a long tool early (B-13).
pub(crate) fn spawn_tool(
    tool: &ToolCommand<'_>,
    tracked: Option<&Tracked>,
) -> std::io::Result<SpawnedTool> {
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
    let mut tracked = tracked.map(Tracked::lock);
    let child = command.spawn()?;
    if let (Some(pid), Some(tracked)) = (child.id(), tracked.as_mut()) {
        tracked.insert(pid as i32);
    }
    drop(tracked);
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
