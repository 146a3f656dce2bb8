//! `read_file`, `write_file` and `grep`, over [`Workspace`] so every path stays beneath it.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};

use base64::Engine;
use nix::dir::{Dir, Type};
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use serde_json::{json, Value};

use super::glob::Glob;
use super::{Encoding, GrepInput, Policy, ReadFileInput, ToolError, WriteFileInput};
use sluice_sandbox::confine::{self, code, Access, FsError, Workspace};

/// Bytes looked at for a NUL to call a file binary.
const BINARY_PROBE: usize = 8 * 1024;
/// Largest file grep reads (its first bytes when larger).
const GREP_FILE_BYTES: u64 = 8 << 20;
/// Files grep opens, directories deep it goes, and characters kept per matching line.
const GREP_MAX_FILES: usize = 20_000;
const GREP_MAX_DEPTH: usize = 64;
const GREP_LINE_CHARS: usize = 400;
const GREP_DEFAULT_MATCHES: u64 = 200;
const GREP_MAX_MATCHES: u64 = 5_000;
/// Longest pattern, and the compiled regex's size limit.
const PATTERN_MAX: usize = 4096;
const REGEX_SIZE: usize = 4 << 20;

/// Reads up to the cap from `offset`; text when it is UTF-8, base64 otherwise.
pub fn read_file(
    workspace: &Workspace,
    input: &ReadFileInput,
    policy: &Policy,
) -> Result<Value, ToolError> {
    let mut file = workspace.open_file(&input.path, Access::Read)?;
    let size = file
        .metadata()
        .map_err(|e| ToolError::new(code::IO, e.to_string()))?
        .len();
    let cap = input
        .max_bytes
        .unwrap_or(policy.max_read_bytes)
        .clamp(1, policy.max_read_bytes);
    if input.offset > 0 {
        file.seek(SeekFrom::Start(input.offset))
            .map_err(|e| ToolError::new(code::IO, e.to_string()))?;
    }
    let mut bytes = Vec::new();
    file.take(cap)
        .read_to_end(&mut bytes)
        .map_err(|e| ToolError::new(code::IO, format!("reading {:?}: {e}", input.path)))?;
    let end = input.offset.saturating_add(bytes.len() as u64);
    let truncated = end < size;
    // Text is UTF-8 without NUL (which no JSON string stored in Postgres may hold).
    let (content, encoding) = match String::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') => (text, "utf8"),
        Ok(text) => (
            base64::engine::general_purpose::STANDARD.encode(text.as_bytes()),
            "base64",
        ),
        Err(err) => (
            base64::engine::general_purpose::STANDARD.encode(err.as_bytes()),
            "base64",
        ),
    };
    Ok(json!({
        "path": input.path,
        "content": content,
        "encoding": encoding,
        "size": size,
        "offset": input.offset,
        "truncated": truncated,
    }))
}

/// Writes (or appends) the content; refuses links and non-regular files.
pub fn write_file(workspace: &Workspace, input: &WriteFileInput) -> Result<Value, ToolError> {
    let bytes = match input.encoding {
        Encoding::Utf8 => input.content.as_bytes().to_vec(),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(input.content.as_bytes())
            .map_err(|e| ToolError::new("invalid_input", format!("content is not base64: {e}")))?,
    };
    let mut file = workspace.open_file(
        &input.path,
        Access::Write {
            append: input.append,
            create_dirs: input.create_dirs,
        },
    )?;
    file.write_all(&bytes)
        .map_err(|e| io_error(e, &input.path))?;
    file.flush().map_err(|e| io_error(e, &input.path))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok(json!({
        "path": input.path,
        "bytes_written": bytes.len(),
        "size": size,
    }))
}

fn io_error(err: std::io::Error, path: &str) -> ToolError {
    match err.raw_os_error() {
        Some(errno) => confine::errno_error(nix::errno::Errno::from_raw(errno), path).into(),
        None => ToolError::new(code::IO, format!("{path:?}: {err}")),
    }
}

/// Matching lines under a file or directory, skipping links, non-regular and binary files.
pub fn grep(workspace: &Workspace, input: &GrepInput, policy: &Policy) -> Result<Value, ToolError> {
    if input.pattern.len() > PATTERN_MAX {
        return Err(ToolError::new(
            "invalid_input",
            format!("the pattern is longer than {PATTERN_MAX} bytes"),
        ));
    }
    let pattern = if input.fixed_strings {
        regex::escape(&input.pattern)
    } else {
        input.pattern.clone()
    };
    let regex = regex::RegexBuilder::new(&pattern)
        .case_insensitive(input.ignore_case)
        .size_limit(REGEX_SIZE)
        .build()
        .map_err(|e| ToolError::new("invalid_pattern", e.to_string()))?;
    let glob = match &input.glob {
        Some(glob) => Some(Glob::new(glob).map_err(|e| ToolError::new("invalid_glob", e))?),
        None => None,
    };
    let max_matches = input
        .max_matches
        .unwrap_or(GREP_DEFAULT_MATCHES)
        .clamp(1, GREP_MAX_MATCHES);
    let root = input.path.clone().unwrap_or_default();
    let mut search = Search {
        regex,
        glob,
        max_matches,
        byte_budget: policy.max_read_bytes,
        matches: Vec::new(),
        files_searched: 0,
        files_skipped: 0,
        truncated: false,
    };
    let stat = workspace.stat(&root)?;
    match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFDIR => {
            let dir = workspace.open_dir(&root)?;
            let prefix = confine::components(&root)?.join("/");
            search.directory(dir, &prefix, 0);
        }
        SFlag::S_IFREG => {
            let file = workspace.open_file(&root, Access::Read)?;
            let shown = confine::components(&root)?.join("/");
            search.file(file, &shown);
        }
        SFlag::S_IFLNK => {
            return Err(FsError::new(
                code::SYMLINK,
                format!("{root:?} is a symbolic link; file tools do not follow links"),
            )
            .into())
        }
        _ => {
            return Err(FsError::new(
                code::NOT_REGULAR,
                format!("{root:?} is not a file or directory"),
            )
            .into())
        }
    }
    Ok(json!({
        "matches": search.matches,
        "files_searched": search.files_searched,
        "files_skipped": search.files_skipped,
        "truncated": search.truncated,
    }))
}

struct Search {
    regex: regex::Regex,
    glob: Option<Glob>,
    max_matches: u64,
    byte_budget: u64,
    matches: Vec<Value>,
    files_searched: u64,
    files_skipped: u64,
    truncated: bool,
}

impl Search {
    fn full(&mut self) -> bool {
        if self.matches.len() as u64 >= self.max_matches || self.byte_budget == 0 {
            self.truncated = true;
        }
        self.truncated
    }

    /// Walks a directory (iteratively by recursion bounded by `GREP_MAX_DEPTH`), opening every
    /// entry relative to its directory's descriptor without following links.
    fn directory(&mut self, dir: OwnedFd, prefix: &str, depth: usize) {
        if depth > GREP_MAX_DEPTH || self.full() {
            return;
        }
        let mut listing = match Dir::from_fd(dir) {
            Ok(listing) => listing,
            Err(_) => return,
        };
        let mut names: Vec<(String, Option<Type>)> = listing
            .iter()
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().to_str().ok()?.to_string();
                (name != "." && name != "..").then(|| (name, entry.file_type()))
            })
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, kind) in names {
            if self.full() || (self.files_searched + self.files_skipped) as usize >= GREP_MAX_FILES
            {
                self.truncated = true;
                return;
            }
            let shown = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            match kind {
                Some(Type::Directory) => {
                    if let Ok(child) = openat(
                        listing.as_fd(),
                        name.as_str(),
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    ) {
                        self.directory(child, &shown, depth + 1);
                    }
                }
                Some(Type::File) | None => {
                    if self.glob.as_ref().is_some_and(|g| !g.matches(&shown)) {
                        continue;
                    }
                    let opened = openat(
                        listing.as_fd(),
                        name.as_str(),
                        OFlag::O_RDONLY
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_NONBLOCK
                            | OFlag::O_NOCTTY
                            | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    );
                    match opened {
                        Ok(fd) if is_regular(&fd) => self.file(std::fs::File::from(fd), &shown),
                        _ => self.files_skipped += 1,
                    }
                }
                // Links, FIFOs, sockets and devices are never opened.
                Some(_) => self.files_skipped += 1,
            }
        }
    }

    fn file(&mut self, file: std::fs::File, shown: &str) {
        let mut bytes = Vec::new();
        if file.take(GREP_FILE_BYTES).read_to_end(&mut bytes).is_err()
            || bytes[..bytes.len().min(BINARY_PROBE)].contains(&0)
        {
            self.files_skipped += 1;
            return;
        }
        self.files_searched += 1;
        let text = String::from_utf8_lossy(&bytes);
        for (index, line) in text.lines().enumerate() {
            if !self.regex.is_match(line) {
                continue;
            }
            if self.full() {
                return;
            }
            let kept: String = line.chars().take(GREP_LINE_CHARS).collect();
            self.byte_budget = self
                .byte_budget
                .saturating_sub((kept.len() + shown.len() + 16) as u64);
            self.matches.push(json!({
                "path": shown,
                "line": index + 1,
                "text": kept,
            }));
        }
    }
}

/// A regular file with one link (see `confine`: hard links are refused).
fn is_regular(fd: &OwnedFd) -> bool {
    fstat(fd.as_fd())
        .map(|s| {
            SFlag::from_bits_truncate(s.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
                && s.st_nlink == 1
        })
        .unwrap_or(false)
}
