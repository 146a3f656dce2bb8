//! A workflow step's artifacts: packed from the workspace when its tool succeeds, uploaded in
//! chunks under the attempt's lease and sealed; and its parents' sets downloaded, checked
//! and unpacked beneath the workspace before its tool starts.
//!
//! Packing walks the workspace from descriptors (`openat` with `O_NOFOLLOW`, each entry
//! `fstatat`-ed and the opened descriptor checked to be the same inode), so a tool still
//! running cannot swap a link in and have a file outside the workspace packed. Regular files
//! with one link and directories are packed; links, special files and files with several
//! links are skipped and listed. The archive goes to a file beside the workspaces (never in
//! one), counted as it is written: past `SLUICE_ARTIFACT_MAX_BYTES` the step fails.
//!
//! Unpacking runs before the tool starts, so nothing races it. It refuses the whole archive
//! at the first entry that is not a plain file or directory, a path that is absolute, holds
//! `..` or names the step's context or output file, a size over what is left of the cap, or
//! one entry too many. Neither side holds an archive in memory: it moves in chunks of at most
//! [`bounds::ARTIFACT_CHUNK_BYTES`].

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::dir::Dir;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use sha2::{Digest, Sha256};
use sluice_protocol::{bounds, ArtifactSeal, ArtifactSealResponse, ArtifactSet, Task};
use sluice_sandbox::ToolUser;

use crate::client::{retrying, CallError};
use crate::exec::policy;
use crate::tools::glob::Glob;

use super::AttemptContext;

/// Most files and directories in one archive, packed or unpacked.
pub const MAX_ENTRIES: u64 = 50_000;
/// Most workspace entries looked at while packing.
const MAX_VISITED: u64 = 200_000;
/// Deepest directory packed; deeper ones are skipped and listed.
const MAX_DEPTH: usize = 128;

/// What was packed.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub bytes: u64,
    pub sha256: String,
    pub entries: u64,
    pub skipped: Vec<String>,
}

/// Why packing failed.
#[derive(Debug, Clone, PartialEq)]
pub enum PackError {
    /// Over the byte or entry cap: the step fails for good.
    TooLarge(String),
    /// The archive could not be written (retried).
    Io(String),
}

/// The directory of archives in the workdir: the sidecar's own (mode 0700), so no tool can
/// reach, let alone link, an archive.
pub const ARCHIVE_DIR: &str = ".archives";

/// Makes [`ARCHIVE_DIR`] afresh at start (what a killed sidecar left is removed).
pub fn prepare_archive_dir(workdir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = workdir.join(ARCHIVE_DIR);
    match std::fs::symlink_metadata(&dir) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&dir)?,
        Ok(_) => std::fs::remove_file(&dir)?,
        Err(_) => {}
    }
    std::fs::DirBuilder::new().mode(0o700).create(&dir)
}

/// The file an archive of `task` is written to or read from, in [`ARCHIVE_DIR`].
pub fn archive_path(workdir: &Path, task: &Task, what: &str) -> PathBuf {
    workdir
        .join(ARCHIVE_DIR)
        .join(format!("{what}-{}-{}.tar", task.job_id, task.attempt))
}

/// Counts and hashes what the tar builder writes; refuses to pass `max`.
struct Sink {
    file: File,
    hasher: Sha256,
    written: u64,
    max: u64,
    over: bool,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.max {
            self.over = true;
            return Err(std::io::Error::other("artifact cap"));
        }
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A pattern of `artifacts`: with a `/` it matches the path from the workspace root, without
/// one a name at the root (`report.json` is the root's, not any directory's).
struct Pattern {
    glob: Glob,
    whole_path: bool,
    /// Its components, for [`Pattern::reaches`]; `None` when braces make them unknowable.
    parts: Option<Vec<Glob>>,
    /// Which of `parts` are `**`.
    any_depth: Vec<bool>,
}

impl Pattern {
    fn new(pattern: &str) -> Result<Pattern, String> {
        let whole_path = pattern.contains('/');
        let split: Vec<&str> = pattern.split('/').collect();
        let parts = if pattern.contains('{') {
            None
        } else {
            split
                .iter()
                .map(|part| Glob::new(part))
                .collect::<Result<Vec<_>, _>>()
                .ok()
        };
        Ok(Pattern {
            glob: Glob::new(pattern)?,
            whole_path,
            parts,
            any_depth: split.iter().map(|part| *part == "**").collect(),
        })
    }

    fn matches(&self, path: &str) -> bool {
        (self.whole_path || !path.contains('/')) && self.glob.matches(path)
    }

    /// Whether something beneath directory `dir` could match: the walk does not descend where
    /// no pattern reaches (a `node_modules` beside `report.json` is never looked through).
    fn reaches(&self, dir: &str) -> bool {
        if !self.whole_path {
            return false;
        }
        let Some(parts) = &self.parts else {
            return true;
        };
        for (i, name) in dir.split('/').enumerate() {
            if i >= parts.len() {
                return false;
            }
            if self.any_depth[i] {
                return true;
            }
            if !parts[i].matches(name) {
                return false;
            }
        }
        parts.len() > dir.split('/').count()
    }
}

/// Packs what `patterns` match beneath `workspace` into `archive` (created, mode 0600). A
/// matched directory brings its whole subtree. With `owner`, files of any other owner are
/// skipped (none of the tool's own making).
pub fn pack(
    workspace: &Path,
    patterns: &[String],
    archive: &Path,
    max_bytes: u64,
    owner: Option<u32>,
) -> Result<Packed, PackError> {
    let io = |what: &str, err: &dyn std::fmt::Display| PackError::Io(format!("{what}: {err}"));
    let patterns: Vec<Pattern> = patterns
        .iter()
        .map(|p| {
            Pattern::new(p)
                .map_err(|e| PackError::TooLarge(format!("artifacts pattern {p:?}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(archive);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(archive)
            .map_err(|e| io("cannot create the archive", &e))?
    };
    let mut builder = tar::Builder::new(Sink {
        file,
        hasher: Sha256::new(),
        written: 0,
        max: max_bytes,
        over: false,
    });
    let too_large = || {
        PackError::TooLarge(format!(
            "the step's artifacts exceed SLUICE_ARTIFACT_MAX_BYTES ({max_bytes} bytes); pack less or raise the cap"
        ))
    };
    let root = nix::fcntl::open(
        workspace,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io("cannot open the workspace", &e))?;
    let mut walk = Walk {
        patterns,
        entries: 0,
        visited: 0,
        skipped: Vec::new(),
    };
    let too_many = || {
        PackError::TooLarge(format!(
            "the directories the artifacts globs reach hold more than {MAX_VISITED} entries to look through"
        ))
    };
    // Names read in all: the walk's memory stays bounded however the tree is shaped.
    let mut names_read = 0u64;
    // Depth-first with an explicit stack: each level keeps its directory and the names left.
    let mut stack = vec![Level::read(root, String::new(), false, &mut names_read)
        .map_err(|e| e.map_or_else(too_many, |e| io("cannot read the workspace", &e)))?];
    while let Some(level) = stack.last_mut() {
        let Some(name) = level.names.pop() else {
            stack.pop();
            continue;
        };
        walk.visited += 1;
        let Some(text) = std::str::from_utf8(name.to_bytes()).ok() else {
            walk.skip(
                format!("{}{}", level.prefix, name.to_string_lossy()),
                "not UTF-8",
            );
            continue;
        };
        let rel = format!("{}{text}", level.prefix);
        if level.prefix.is_empty() && (text == policy::CONTEXT_FILE || text == policy::OUTPUT_FILE)
        {
            continue;
        }
        let included = level.included || walk.patterns.iter().any(|p| p.matches(&rel));
        let Ok(stat) = fstatat(
            &level.dir,
            name.as_ref(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) else {
            continue; // gone meanwhile
        };
        let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFDIR {
            if !included && !walk.patterns.iter().any(|p| p.reaches(&rel)) {
                continue;
            }
            if stack.len() > MAX_DEPTH {
                if included {
                    walk.skip(rel, "deeper than 128 directories");
                }
                continue;
            }
            let opened = open_same(&stack.last().expect("a level").dir, &name, &stat, true);
            let Some(fd) = opened else {
                if included {
                    walk.skip(rel, "changed while packed");
                }
                continue;
            };
            if included {
                walk.count()?;
                let mut header = header(tar::EntryType::Directory, 0o700, 0, stat.st_mtime);
                builder
                    .append_data(&mut header, &rel, std::io::empty())
                    .map_err(|e| {
                        if builder.get_ref().over {
                            too_large()
                        } else {
                            io("cannot write the archive", &e)
                        }
                    })?;
            }
            let level = Level::read(fd, format!("{rel}/"), included, &mut names_read)
                .map_err(|e| e.map_or_else(too_many, |e| io("cannot read a directory", &e)))?;
            stack.push(level);
            continue;
        }
        if !included {
            continue;
        }
        if kind != SFlag::S_IFREG {
            walk.skip(
                rel,
                if kind == SFlag::S_IFLNK {
                    "a link"
                } else {
                    "not a regular file"
                },
            );
            continue;
        }
        if stat.st_nlink > 1 {
            walk.skip(rel, "a file with several links");
            continue;
        }
        if owner.is_some_and(|uid| uid != stat.st_uid) {
            walk.skip(rel, "not the tool's own file");
            continue;
        }
        let size = stat.st_size.max(0) as u64;
        // Refused before a byte of it is read: a 10 GB sparse file costs nothing.
        if builder.get_ref().written.saturating_add(size) > max_bytes {
            return Err(too_large());
        }
        let Some(fd) = open_same(&stack.last().expect("a level").dir, &name, &stat, false) else {
            walk.skip(rel, "changed while packed");
            continue;
        };
        walk.count()?;
        let mode = if stat.st_mode & 0o111 != 0 {
            0o700
        } else {
            0o600
        };
        let mut header = header(tar::EntryType::Regular, mode, size, stat.st_mtime);
        // Exactly `size` bytes whatever the file does meanwhile: short reads are padded.
        let data = File::from(fd)
            .take(size)
            .chain(std::io::repeat(0))
            .take(size);
        builder.append_data(&mut header, &rel, data).map_err(|e| {
            if builder.get_ref().over {
                too_large()
            } else {
                io("cannot write the archive", &e)
            }
        })?;
    }
    let mut sink = builder.into_inner().map_err(|e| {
        PackError::TooLarge(format!(
            "the step's artifacts exceed SLUICE_ARTIFACT_MAX_BYTES ({max_bytes} bytes): {e}"
        ))
    })?;
    sink.file
        .flush()
        .map_err(|e| io("cannot write the archive", &e))?;
    Ok(Packed {
        bytes: sink.written,
        sha256: hex(&sink.hasher.finalize()),
        entries: walk.entries,
        skipped: walk.skipped,
    })
}

struct Walk {
    patterns: Vec<Pattern>,
    entries: u64,
    visited: u64,
    skipped: Vec<String>,
}

impl Walk {
    fn skip(&mut self, path: String, why: &str) {
        if self.skipped.len() < bounds::MAX_ARTIFACT_SKIPPED {
            self.skipped.push(format!("{path} ({why})"));
        }
    }

    fn count(&mut self) -> Result<(), PackError> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(PackError::TooLarge(format!(
                "the step's artifacts hold more than {MAX_ENTRIES} files and directories"
            )));
        }
        Ok(())
    }
}

/// A directory being walked: its descriptor, the names not yet looked at, its path with a
/// trailing `/`, and whether a pattern matched it or an ancestor.
struct Level {
    dir: OwnedFd,
    names: Vec<std::ffi::CString>,
    prefix: String,
    included: bool,
}

impl Level {
    /// Reads a directory's names; `Err(None)` once `names_read` passes [`MAX_VISITED`].
    fn read(
        fd: OwnedFd,
        prefix: String,
        included: bool,
        names_read: &mut u64,
    ) -> Result<Level, Option<nix::Error>> {
        let dup = fd
            .try_clone()
            .map_err(|_| Some(nix::errno::Errno::EMFILE))?;
        let mut dir = Dir::from_fd(dup).map_err(Some)?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(Some)?;
            let name = entry.file_name();
            if name.to_bytes() != b"." && name.to_bytes() != b".." {
                names.push(name.to_owned());
                *names_read += 1;
                if *names_read > MAX_VISITED {
                    return Err(None);
                }
            }
        }
        // Popped from the end: sort descending so the archive lists names in order.
        names.sort_unstable_by(|a, b| b.cmp(a));
        Ok(Level {
            dir: fd,
            names,
            prefix,
            included,
        })
    }
}

/// Opens `name` beneath `dir` without following a link, and only if it is still the inode
/// `stat` describes.
fn open_same(dir: &OwnedFd, name: &CStr, stat: &FileStat, directory: bool) -> Option<OwnedFd> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    if directory {
        flags |= OFlag::O_DIRECTORY;
    }
    let fd = openat(dir.as_fd(), name, flags, Mode::empty()).ok()?;
    let now = fstat(&fd).ok()?;
    (now.st_dev == stat.st_dev && now.st_ino == stat.st_ino).then_some(fd)
}

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: i64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(mtime.max(0) as u64);
    header
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why an archive was not unpacked.
#[derive(Debug, Clone, PartialEq)]
pub enum UnpackError {
    /// Its content: a path, a type, a size or a count the workspace does not take (for good).
    Refused(String),
    /// This runner could not write it (a full disk: another runner may do better).
    Io(String),
}

/// Unpacks `archive` beneath `workspace` (before the tool starts), owned by `user`; refuses
/// the archive at its first entry that could reach outside the workspace or is over the
/// caps. `max_bytes` bounds the bytes of all files written. Returns the entries and bytes
/// written.
///
/// Every path is resolved from a descriptor of the workspace, one component at a time with
/// `O_NOFOLLOW` (directories made with `mkdirat`, files opened with `openat` and checked by
/// `fstat` before they are truncated, owners set with `fchown`): even a process of the
/// slot's user left over from an earlier task, swapping a directory for a link meanwhile,
/// makes an open fail instead of sending a write outside.
pub fn unpack(
    workspace: &Path,
    archive: &Path,
    max_bytes: u64,
    user: Option<ToolUser>,
) -> Result<(u64, u64), UnpackError> {
    let io = |what: &str, e: &dyn std::fmt::Display| UnpackError::Io(format!("{what}: {e}"));
    let refused = |shown: &str, why: &dyn std::fmt::Display| {
        UnpackError::Refused(format!("{shown:?}: {why}"))
    };
    let file = File::open(archive).map_err(|e| io("cannot open the archive", &e))?;
    let root = nix::fcntl::open(
        workspace,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io("cannot open the workspace", &e))?;
    let mut archive = tar::Archive::new(file);
    let mut entries = 0u64;
    let mut written = 0u64;
    for entry in archive
        .entries()
        .map_err(|e| UnpackError::Refused(format!("not a tar archive: {e}")))?
    {
        let mut entry =
            entry.map_err(|e| UnpackError::Refused(format!("a malformed entry: {e}")))?;
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(UnpackError::Refused(format!(
                "more than {MAX_ENTRIES} entries"
            )));
        }
        let path = entry
            .path()
            .map_err(|e| UnpackError::Refused(format!("an entry's path cannot be read: {e}")))?
            .into_owned();
        let shown = path.display().to_string();
        let rel = checked_path(&path).map_err(|why| refused(&shown, &why))?;
        let kind = entry.header().entry_type();
        let size = entry.size();
        let names: Vec<&OsStr> = rel.iter().collect();
        let (name, parents) = names.split_last().expect("a checked path has a name");
        let mut dir = root.try_clone().map_err(|e| io("a descriptor", &e))?;
        for part in parents {
            dir = enter_dir(&dir, part, user).map_err(|e| e.at(&shown))?;
        }
        match kind {
            tar::EntryType::Directory => {
                enter_dir(&dir, name, user).map_err(|e| e.at(&shown))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let left = max_bytes - written;
                if size > left {
                    return Err(refused(
                        &shown,
                        &format!(
                            "{size} bytes, over what is left of the cap ({left} of {max_bytes})"
                        ),
                    ));
                }
                let executable = entry.header().mode().unwrap_or(0) & 0o111 != 0;
                let mut out = create_at(&dir, name, executable, user).map_err(|e| e.at(&shown))?;
                let copied = std::io::copy(&mut (&mut entry).take(size), &mut out)
                    .map_err(|e| io(&format!("{shown:?}"), &e))?;
                if copied != size {
                    return Err(refused(&shown, &"the archive ends inside it"));
                }
                written += size;
            }
            other => {
                return Err(refused(
                    &shown,
                    &format!("a {other:?} entry (only files and directories are unpacked)"),
                ))
            }
        }
    }
    Ok((entries, written))
}

/// A failed step of the descriptor walk: what the archive asked for (refused), or what this
/// runner could not do (its disk).
enum StepError {
    Refused(String),
    Io(String),
}

impl StepError {
    fn at(self, shown: &str) -> UnpackError {
        match self {
            StepError::Refused(why) => UnpackError::Refused(format!("{shown:?}: {why}")),
            StepError::Io(why) => UnpackError::Io(format!("{shown:?}: {why}")),
        }
    }

    fn of(err: nix::errno::Errno) -> StepError {
        use nix::errno::Errno;
        match err {
            Errno::ENOSPC
            | Errno::EDQUOT
            | Errno::EIO
            | Errno::EMFILE
            | Errno::ENFILE
            | Errno::ENOMEM
            | Errno::EROFS => StepError::Io(err.desc().into()),
            Errno::ELOOP => StepError::Refused("a link where a directory or file should be".into()),
            Errno::ENOTDIR => {
                StepError::Refused("not a directory (a file or a link) where one should be".into())
            }
            Errno::EISDIR => StepError::Refused("a directory where a file should be".into()),
            other => StepError::Refused(other.desc().into()),
        }
    }
}

/// The directory `name` beneath `dir`, made (mode 0700, owned by `user`) if missing; never
/// through a link.
fn enter_dir(dir: &OwnedFd, name: &OsStr, user: Option<ToolUser>) -> Result<OwnedFd, StepError> {
    let made = match nix::sys::stat::mkdirat(dir.as_fd(), name, Mode::S_IRWXU) {
        Ok(()) => true,
        Err(nix::errno::Errno::EEXIST) => false,
        Err(err) => return Err(StepError::of(err)),
    };
    let fd = openat(
        dir.as_fd(),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(StepError::of)?;
    if made {
        fchown(&fd, user)?;
    }
    Ok(fd)
}

/// The file `name` beneath `dir`, created or emptied (mode 0600, or 0700 when executable,
/// owned by `user`): opened without following a link and without truncating, checked to be
/// a regular file with one link, then truncated.
fn create_at(
    dir: &OwnedFd,
    name: &OsStr,
    executable: bool,
    user: Option<ToolUser>,
) -> Result<File, StepError> {
    let mode = if executable {
        Mode::S_IRWXU
    } else {
        Mode::S_IRUSR | Mode::S_IWUSR
    };
    let fd = openat(
        dir.as_fd(),
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        mode,
    )
    .map_err(StepError::of)?;
    let stat = fstat(&fd).map_err(StepError::of)?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(StepError::Refused("not a regular file".into()));
    }
    if stat.st_nlink > 1 {
        return Err(StepError::Refused("a file with several links".into()));
    }
    nix::unistd::ftruncate(&fd, 0).map_err(StepError::of)?;
    nix::sys::stat::fchmod(&fd, mode).map_err(StepError::of)?;
    fchown(&fd, user)?;
    Ok(File::from(fd))
}

fn fchown(fd: &OwnedFd, user: Option<ToolUser>) -> Result<(), StepError> {
    match user {
        Some(user) => nix::unistd::fchown(
            fd,
            Some(nix::unistd::Uid::from_raw(user.uid)),
            Some(nix::unistd::Gid::from_raw(user.gid)),
        )
        .map_err(StepError::of),
        None => Ok(()),
    }
}

/// The entry's path if it stays beneath the workspace: relative, no `..`, no NUL, not the
/// step's context or output file.
fn checked_path(path: &Path) -> Result<PathBuf, &'static str> {
    let mut rel = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => {
                if part.as_bytes().contains(&0) {
                    return Err("a NUL in the path");
                }
                rel.push(part);
            }
            Component::CurDir => {}
            Component::ParentDir => return Err("'..' in the path"),
            Component::RootDir | Component::Prefix(_) => return Err("an absolute path"),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err("an empty path");
    }
    let first = rel.components().next().map(|c| c.as_os_str());
    if rel.components().count() == 1
        && [policy::CONTEXT_FILE, policy::OUTPUT_FILE]
            .iter()
            .any(|reserved| first == Some(OsStr::new(reserved)))
    {
        return Err("the step's context or output file");
    }
    Ok(rel)
}

/// The headers naming the attempt's lease ([`sluice_protocol::lease_headers`]).
fn lease_headers(task: &Task) -> Vec<(&'static str, String)> {
    use sluice_protocol::lease_headers as names;
    vec![
        (names::ATTEMPT, task.attempt.0.to_string()),
        (names::LEASE_TOKEN, task.lease_token.0.to_string()),
    ]
}

/// Uploads `archive` in chunks under the attempt's lease and seals it.
pub async fn upload(
    ctx: &AttemptContext,
    task: &Task,
    archive: &Path,
    packed: &Packed,
) -> Result<(), CallError> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(archive)
        .await
        .map_err(|e| CallError::Transport(format!("cannot read the archive: {e}")))?;
    let headers = lease_headers(task);
    let timeout = std::time::Duration::from_secs(60);
    let mut chunks = 0u32;
    let mut sent = 0u64;
    while sent < packed.bytes {
        let want = (packed.bytes - sent).min(bounds::ARTIFACT_CHUNK_BYTES as u64) as usize;
        let mut chunk = vec![0u8; want];
        file.read_exact(&mut chunk)
            .await
            .map_err(|e| CallError::Transport(format!("cannot read the archive: {e}")))?;
        let path = sluice_protocol::paths::artifact_chunk(task.job_id, chunks);
        let mut stop = ctx.hard_stop.clone();
        retrying(&path, ctx.delivery_budget, &mut stop, || {
            ctx.client
                .put_bytes(&path, &ctx.token, &headers, chunk.clone(), timeout)
        })
        .await?;
        sent += want as u64;
        chunks += 1;
    }
    let seal = ArtifactSeal {
        attempt: task.attempt,
        lease_token: task.lease_token,
        chunks,
        bytes: packed.bytes,
        sha256: packed.sha256.clone(),
        entries: packed.entries,
        skipped: packed.skipped.clone(),
    };
    let mut stop = ctx.hard_stop.clone();
    let _: ArtifactSealResponse = ctx
        .client
        .post_retrying(
            &sluice_protocol::paths::artifact_seal(task.job_id),
            &ctx.token,
            &seal,
            timeout,
            ctx.delivery_budget,
            &mut stop,
        )
        .await?;
    Ok(())
}

/// Why a parent's set could not be had.
#[derive(Debug)]
pub enum InputError {
    /// The scheduler could not hand it over.
    Call(CallError),
    /// What came is not what was sealed, or is over the cap.
    Refused(String),
    /// This runner could not store it (a full disk).
    Local(String),
}

/// Downloads `set` into `archive`, checking its size and digest.
pub async fn download(
    ctx: &AttemptContext,
    task: &Task,
    set: &ArtifactSet,
    archive: &Path,
    max_bytes: u64,
) -> Result<(), InputError> {
    use tokio::io::AsyncWriteExt;
    if set.bytes > max_bytes {
        return Err(InputError::Refused(format!(
            "step {:?}'s artifacts are {} bytes, over what SLUICE_ARTIFACT_MAX_BYTES leaves ({max_bytes})",
            set.step, set.bytes
        )));
    }
    let io = |e: std::io::Error| InputError::Local(format!("cannot write the archive: {e}"));
    let _ = tokio::fs::remove_file(archive).await;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(archive)
        .await
        .map_err(io)?;
    let mut headers = lease_headers(task);
    headers.push((
        sluice_protocol::lease_headers::SOURCE_ATTEMPT,
        set.attempt.0.to_string(),
    ));
    let timeout = std::time::Duration::from_secs(60);
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    for seq in 0..set.chunks {
        let path = sluice_protocol::paths::artifact_input(task.job_id, set.job_id, seq);
        let mut stop = ctx.hard_stop.clone();
        let chunk = retrying(&path, ctx.delivery_budget, &mut stop, || {
            ctx.client.get_bytes(&path, &ctx.token, &headers, timeout)
        })
        .await
        .map_err(InputError::Call)?;
        received += chunk.len() as u64;
        if received > set.bytes || chunk.len() > bounds::ARTIFACT_CHUNK_BYTES {
            return Err(InputError::Refused(format!(
                "step {:?}'s artifacts are longer than sealed",
                set.step
            )));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    let digest = hex(&hasher.finalize());
    if received != set.bytes || !digest.eq_ignore_ascii_case(&set.sha256) {
        return Err(InputError::Refused(format!(
            "step {:?}'s artifacts do not match their seal ({received} bytes, sha256 {digest})",
            set.step
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
