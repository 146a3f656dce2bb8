//! What to run and as whom: [`ToolCommand`], [`ToolUser`], and the exec prepared before the
//! fork (the forked helpers may not allocate).

use std::collections::BTreeMap;
use std::path::Path;

use sluice_protocol::{Limits, Network};

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
pub(crate) struct PreparedExec {
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
    pub(crate) fn new(tool: &ToolCommand<'_>) -> std::io::Result<PreparedExec> {
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
    pub(crate) fn exec(&self) -> std::io::Error {
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
