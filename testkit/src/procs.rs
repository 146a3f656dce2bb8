//! The one `/proc` scanner of the suites: which processes live, what they carry in their
//! environment and command line, who their parents and children are, what they hold. Tests
//! ask it whether a tool outlived its task, which attempts' tools are alive, whether the
//! sidecar leaks descriptors or memory.

/// A process as `/proc` shows it at one moment.
#[derive(Debug, Clone)]
pub struct Process {
    pub pid: i32,
    /// `R`, `S`, `Z`, …
    pub state: char,
    pub ppid: i32,
    /// `NAME=value\0…`, as far as this process may read it.
    pub environ: Vec<u8>,
    /// `arg\0arg\0…`.
    pub cmdline: Vec<u8>,
}

impl Process {
    /// Reads process `pid`, if it exists (and is not gone while being read).
    pub fn read(pid: i32) -> Option<Process> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let (_, rest) = stat.rsplit_once(')')?;
        let mut fields = rest.split_whitespace();
        let state = fields.next()?.chars().next()?;
        let ppid = fields.next()?.parse().ok()?;
        Some(Process {
            pid,
            state,
            ppid,
            environ: std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default(),
            cmdline: std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default(),
        })
    }

    /// A zombie is dead: it only waits to be reaped.
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z'
    }

    /// The value of `name` in its environment.
    pub fn env(&self, name: &str) -> Option<&[u8]> {
        let prefix = format!("{name}=");
        self.environ
            .split(|b| *b == 0)
            .find_map(|var| var.strip_prefix(prefix.as_bytes()))
    }

    /// Whether its environment holds the variable `NAME=value` exactly.
    pub fn has_var(&self, var: &str) -> bool {
        self.environ.split(|b| *b == 0).any(|v| v == var.as_bytes())
    }

    /// Whether its command line or environment mention `needle`.
    pub fn mentions(&self, needle: &str) -> bool {
        let needle = needle.as_bytes();
        [&self.cmdline, &self.environ]
            .iter()
            .any(|hay| hay.windows(needle.len().max(1)).any(|w| w == needle))
    }
}

/// Every process this test can see now, zombies included.
pub fn all() -> Vec<Process> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_string_lossy().parse().ok())
        .filter_map(Process::read)
        .collect()
}

/// The live (not zombie) processes.
pub fn live() -> Vec<Process> {
    all().into_iter().filter(|p| !p.is_zombie()).collect()
}

/// Whether `pid` is a live process (a zombie counts as gone).
pub fn alive(pid: i32) -> bool {
    Process::read(pid).is_some_and(|p| !p.is_zombie())
}

/// The parent of a live process (`None` for a zombie or a process that is gone).
pub fn parent_of(pid: i32) -> Option<i32> {
    Process::read(pid)
        .filter(|p| !p.is_zombie())
        .map(|p| p.ppid)
}

/// The live processes that have `name` in their environment.
pub fn with_env(name: &str) -> Vec<i32> {
    live()
        .into_iter()
        .filter(|p| p.env(name).is_some())
        .map(|p| p.pid)
        .collect()
}

/// The children of `pid`'s main thread.
pub fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// How many descriptors `pid` holds open.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `pid`'s peak resident memory (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The line of `/proc/<pid>/status` that starts with `key:` (its value, trimmed).
pub fn status_field(pid: u32, key: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)?
                .strip_prefix(':')
                .map(|v| v.trim().to_string())
        })
}
