//! Opening files strictly beneath a workspace directory, for the file tools.
//!
//! A path is first checked by its text: relative, no `..`, no NUL, components of at most
//! `NAME_MAX` bytes. Then it is resolved from a descriptor of the workspace so that no symbolic
//! link is followed anywhere on the way:
//!
//! - with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` where the
//!   kernel has it (Linux 5.6+);
//! - otherwise (gVisor answers `ENOSYS`, older kernels) one component at a time with
//!   `openat(O_NOFOLLOW)` from the previous component's descriptor.
//!
//! Both are free of check-then-use races: every step is relative to a descriptor already
//! opened, and a symbolic link swapped in at any moment makes the open fail instead of being
//! followed. The final component is never followed, reads and writes open with `O_NONBLOCK` so
//! a FIFO cannot hang the tool, non-regular files are refused, a file with more than one link
//! is refused (a hard link could point at a file outside the workspace), and a write
//! truncates only after those checks.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, FileStat, Mode, SFlag};

/// Longest path component (Linux `NAME_MAX`) and whole path (`PATH_MAX`).
const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4096;

/// A refusal or failure with a stable code (the tool result's `error.code`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsError {
    pub code: &'static str,
    pub message: String,
}

impl FsError {
    pub fn new(code: &'static str, message: impl Into<String>) -> FsError {
        FsError {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Stable error codes of the file tools.
pub mod code {
    pub const INVALID_PATH: &str = "invalid_path";
    pub const OUTSIDE: &str = "path_outside_workspace";
    pub const SYMLINK: &str = "symlink_refused";
    pub const NOT_FOUND: &str = "not_found";
    pub const NOT_REGULAR: &str = "not_a_regular_file";
    pub const NOT_DIRECTORY: &str = "not_a_directory";
    pub const HARD_LINK: &str = "hard_link_refused";
    pub const PERMISSION: &str = "permission_denied";
    pub const TOO_LARGE: &str = "file_too_large";
    pub const NO_SPACE: &str = "no_space";
    pub const IO: &str = "io_error";
}

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Create or truncate (or append), creating missing parent directories when asked.
    Write {
        append: bool,
        create_dirs: bool,
    },
}

/// 0 = not probed yet, 1 = the kernel has openat2, 2 = it does not.
static OPENAT2: AtomicU8 = AtomicU8::new(0);

/// Which resolver is in use: for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    Openat2,
    Walk,
}

/// A workspace root, opened once; every path of a tool call resolves from it.
pub struct Workspace {
    root: OwnedFd,
    force_walk: bool,
}

impl Workspace {
    /// Opens `root` (a directory, not followed if it is a symbolic link). With `force_walk`
    /// the component walk is used even where the kernel has `openat2` (tests, and
    /// `SLUICE_RUNNER_FORCE_PATH_WALK`).
    pub fn open(root: &std::path::Path, force_walk: bool) -> Result<Workspace, FsError> {
        let root = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno_error(e, "the workspace"))?;
        Ok(Workspace { root, force_walk })
    }

    /// The resolver this workspace uses.
    pub fn resolver(&self) -> Resolver {
        if self.force_walk || !has_openat2() {
            Resolver::Walk
        } else {
            Resolver::Openat2
        }
    }

    /// Opens a regular file beneath the workspace.
    pub fn open_file(&self, path: &str, access: Access) -> Result<File, FsError> {
        let components = components(path)?;
        let Some((last, parents)) = components.split_last() else {
            return Err(FsError::new(
                code::NOT_REGULAR,
                "the path names the workspace itself, which is a directory",
            ));
        };
        let create_dirs = matches!(
            access,
            Access::Write {
                create_dirs: true,
                ..
            }
        );
        let dir = self.directory(parents, create_dirs)?;
        open_in(dir.as_fd(), last, access, path)
    }

    /// Opens a directory beneath the workspace (the workspace itself for `""` or `"."`), for
    /// reading its entries.
    pub fn open_dir(&self, path: &str) -> Result<OwnedFd, FsError> {
        let components = components(path)?;
        let dir = self.directory(&components, false)?;
        openat(
            dir.as_fd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno_error(e, path))
    }

    /// What `path` is, without following a final symbolic link.
    pub fn stat(&self, path: &str) -> Result<FileStat, FsError> {
        let components = components(path)?;
        let Some((last, parents)) = components.split_last() else {
            return fstat(self.root.as_fd()).map_err(|e| errno_error(e, path));
        };
        let dir = self.directory(parents, false)?;
        fstatat(dir.as_fd(), *last, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| errno_error(e, path))
    }

    /// An `O_PATH` descriptor of the directory `components` name, every component checked.
    fn directory(&self, components: &[&str], create: bool) -> Result<OwnedFd, FsError> {
        if components.is_empty() {
            return self
                .root
                .try_clone()
                .map_err(|e| FsError::new(code::IO, e.to_string()));
        }
        if self.resolver() == Resolver::Openat2 {
            let joined = components.join("/");
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(beneath());
            match openat2(self.root.as_fd(), joined.as_str(), how) {
                Ok(fd) => return Ok(fd),
                // Missing directories are created one by one below.
                Err(Errno::ENOENT) if create => {}
                Err(e) => return Err(walk_error(self.root.as_fd(), components, e)),
            }
        }
        let mut current = self
            .root
            .try_clone()
            .map_err(|e| FsError::new(code::IO, e.to_string()))?;
        for (index, name) in components.iter().enumerate() {
            if create {
                match mkdirat(current.as_fd(), *name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(errno_error(e, &components[..=index].join("/"))),
                }
            }
            let next = openat(
                current.as_fd(),
                *name,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| walk_error(current.as_fd(), &components[index..=index], e))?;
            // With O_PATH | O_NOFOLLOW a symbolic link could come back as a descriptor of
            // the link itself: make sure this is a directory before going through it.
            let stat = fstat(next.as_fd()).map_err(|e| errno_error(e, name))?;
            if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
                return Err(FsError::new(
                    code::SYMLINK,
                    format!(
                        "{:?} is not a directory (symbolic links are not followed)",
                        components[..=index].join("/")
                    ),
                ));
            }
            current = next;
        }
        Ok(current)
    }
}

/// Whether this kernel has `openat2` (probed once).
pub fn has_openat2() -> bool {
    match OPENAT2.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
                .resolve(beneath());
            let available = !matches!(
                openat2(nix::fcntl::AT_FDCWD, ".", how),
                Err(Errno::ENOSYS | Errno::EPERM)
            );
            OPENAT2.store(if available { 1 } else { 2 }, Ordering::Relaxed);
            available
        }
    }
}

fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// The path's components after the textual checks; `.` components and repeated slashes are
/// dropped, so `""` and `"."` name the workspace itself.
pub fn components(path: &str) -> Result<Vec<&str>, FsError> {
    if path.contains('\0') {
        return Err(FsError::new(
            code::INVALID_PATH,
            "the path contains a NUL byte",
        ));
    }
    if path.len() > PATH_MAX {
        return Err(FsError::new(
            code::INVALID_PATH,
            format!("the path is longer than {PATH_MAX} bytes"),
        ));
    }
    if path.starts_with('/') {
        return Err(FsError::new(
            code::OUTSIDE,
            "absolute paths are refused; paths are relative to the workspace",
        ));
    }
    let mut out = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                return Err(FsError::new(
                    code::OUTSIDE,
                    "paths may not contain \"..\"; they must stay beneath the workspace",
                ))
            }
            name if name.len() > NAME_MAX => {
                return Err(FsError::new(
                    code::INVALID_PATH,
                    format!("a path component is longer than {NAME_MAX} bytes"),
                ))
            }
            name => out.push(name),
        }
    }
    Ok(out)
}

/// Opens the final component `name` in `dir`, never following it, and checks what it is.
fn open_in(dir: BorrowedFd<'_>, name: &str, access: Access, path: &str) -> Result<File, FsError> {
    let base = OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let (flags, mode) = match access {
        Access::Read => (base | OFlag::O_RDONLY, Mode::empty()),
        Access::Write { append, .. } => {
            let mut flags = base | OFlag::O_WRONLY | OFlag::O_CREAT;
            if append {
                flags |= OFlag::O_APPEND;
            }
            (flags, Mode::from_bits_truncate(0o644))
        }
    };
    let fd = openat(dir, name, flags, mode).map_err(|e| walk_error(dir, &[name], e))?;
    let stat = fstat(fd.as_fd()).map_err(|e| errno_error(e, path))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(FsError::new(
            code::NOT_REGULAR,
            format!("{path:?} is not a regular file"),
        ));
    }
    // A second link may be a hard link to a file outside the workspace: refused for writes
    // (the rule) and for reads too, so a link made elsewhere cannot leak a file in.
    if stat.st_nlink > 1 {
        return Err(FsError::new(
            code::HARD_LINK,
            format!(
                "{path:?} has {} hard links; file tools refuse files with more than one",
                stat.st_nlink
            ),
        ));
    }
    if let Access::Write { append, .. } = access {
        if !append {
            nix::unistd::ftruncate(fd.as_fd(), 0).map_err(|e| errno_error(e, path))?;
        }
    }
    // Regular files never block; clear O_NONBLOCK anyway so reads and writes behave plainly.
    let keep = match access {
        Access::Write { append: true, .. } => OFlag::O_APPEND,
        _ => OFlag::empty(),
    };
    let _ = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(keep));
    Ok(File::from(fd))
}

/// Explains a failed open of `components` relative to `dir`: a symbolic link on the way gets
/// its own code whichever errno the resolver chose for it.
fn walk_error(dir: BorrowedFd<'_>, components: &[&str], errno: Errno) -> FsError {
    let path = components.join("/");
    match errno {
        Errno::ELOOP => FsError::new(
            code::SYMLINK,
            format!("{path:?} goes through a symbolic link; file tools do not follow links"),
        ),
        Errno::EXDEV => FsError::new(
            code::OUTSIDE,
            format!("{path:?} resolves outside the workspace"),
        ),
        Errno::ENOTDIR if components.len() == 1 => {
            let is_link = fstatat(dir, components[0], nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                .map(|s| SFlag::from_bits_truncate(s.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK)
                .unwrap_or(false);
            if is_link {
                FsError::new(
                    code::SYMLINK,
                    format!("{path:?} is a symbolic link; file tools do not follow links"),
                )
            } else {
                FsError::new(code::NOT_DIRECTORY, format!("{path:?} is not a directory"))
            }
        }
        other => errno_error(other, &path),
    }
}

/// Maps an errno to a stable code.
pub fn errno_error(errno: Errno, path: &str) -> FsError {
    let (code, what) = match errno {
        Errno::ENOENT => (code::NOT_FOUND, "does not exist"),
        Errno::ENOTDIR => (
            code::NOT_DIRECTORY,
            "has a component that is not a directory",
        ),
        Errno::EISDIR => (code::NOT_REGULAR, "is a directory"),
        Errno::ELOOP => (
            code::SYMLINK,
            "is a symbolic link; file tools do not follow links",
        ),
        Errno::EXDEV => (code::OUTSIDE, "resolves outside the workspace"),
        Errno::EACCES | Errno::EPERM => (code::PERMISSION, "is not accessible"),
        Errno::ENXIO | Errno::ENODEV => (code::NOT_REGULAR, "is not a regular file"),
        Errno::ENAMETOOLONG => (code::INVALID_PATH, "is too long"),
        Errno::EFBIG => (code::TOO_LARGE, "would grow past the file size limit"),
        Errno::ENOSPC | Errno::EDQUOT => (code::NO_SPACE, "cannot grow: the workspace is full"),
        _ => (code::IO, "cannot be used"),
    };
    FsError::new(code, format!("{path:?} {what} ({})", errno.desc()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn textual_checks_refuse_escapes_and_bad_names() {
        assert_eq!(components("a/./b//c").unwrap(), vec!["a", "b", "c"]);
        assert!(components("").unwrap().is_empty());
        assert!(components(".").unwrap().is_empty());
        for path in ["../x", "a/../../x", "a/..", "/etc/passwd", "/"] {
            assert_eq!(components(path).unwrap_err().code, code::OUTSIDE, "{path}");
        }
        assert_eq!(components("a\0b").unwrap_err().code, code::INVALID_PATH);
        assert_eq!(
            components(&"x".repeat(256)).unwrap_err().code,
            code::INVALID_PATH
        );
        assert_eq!(components(&"x".repeat(255)).unwrap(), vec!["x".repeat(255)]);
        // Lookalikes are just names beneath the workspace.
        assert_eq!(components("%2e%2e/x").unwrap(), vec!["%2e%2e", "x"]);
        assert_eq!(components("...").unwrap(), vec!["..."]);
        assert_eq!(components("a\nb").unwrap(), vec!["a\nb"]);
    }
}
