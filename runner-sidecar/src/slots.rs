//! The runner's task slots, each with a uid of its own.
//!
//! Tools of one slot run as that slot's uid (and gid), never shared with another slot, on
//! this runner or on another runner of the same host: so a task cannot read a concurrent
//! task's `/proc/<pid>/environ` or workspace (mode 0700), signal its processes, or use up its
//! RLIMIT_NPROC (which the kernel counts per uid). `setresuid` needs no passwd entry, so the
//! uids come from a configured range (`SLUICE_RUNNER_TOOL_UIDS`, default 200000-299999).
//!
//! Runners sharing a kernel (local runners, `sluice dev`, tests; not gVisor pods, which each
//! have their own) must not pick the same uid: each runner holds an exclusive `flock` on
//! `<lock dir>/<uid>.lock` for every uid it uses, for as long as it lives. The kernel drops
//! the locks when the process dies, however it dies.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use sluice_sandbox::ToolUser;

/// A slot: its index, and the user its tools run as (`None` when the sidecar is not root and
/// cannot switch users: then every tool shares the sidecar's identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    pub user: Option<ToolUser>,
}

/// The free slots.
pub struct Slots {
    permits: Arc<Semaphore>,
    free: Mutex<Vec<Slot>>,
    /// The uid locks, held for the runner's life.
    _locks: Vec<Flock<File>>,
}

/// A slot in use; it goes back to the pool when dropped.
pub struct SlotGuard {
    slots: Arc<Slots>,
    slot: Slot,
    _permit: OwnedSemaphorePermit,
}

impl SlotGuard {
    /// The slot held.
    pub fn slot(&self) -> Slot {
        self.slot
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        // Back in the list before the permit (dropped after this) lets anyone take it.
        self.slots.free.lock().expect("lock").push(self.slot);
    }
}

impl Slots {
    /// `count` slots. With `uids` (a root sidecar), each gets a uid of the range that no
    /// other runner on this kernel holds (see the module doc); an error says why there are
    /// not enough.
    pub fn new(count: u32, uids: Option<&UidRange>) -> Result<Arc<Slots>, String> {
        let (users, locks) = match uids {
            None => (vec![None; count as usize], Vec::new()),
            Some(range) => {
                let (users, locks) = range.allocate(count as usize)?;
                (users.into_iter().map(Some).collect(), locks)
            }
        };
        let free = users
            .into_iter()
            .enumerate()
            .rev()
            .map(|(index, user)| Slot {
                index: index as u32,
                user,
            })
            .collect();
        Ok(Arc::new(Slots {
            permits: Arc::new(Semaphore::new(count as usize)),
            free: Mutex::new(free),
            _locks: locks,
        }))
    }

    /// Waits for a free slot.
    pub async fn acquire(self: &Arc<Self>) -> SlotGuard {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.guard(permit)
    }

    /// A free slot, if there is one now.
    pub fn try_acquire(self: &Arc<Self>) -> Option<SlotGuard> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(self.guard(permit))
    }

    fn guard(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> SlotGuard {
        let slot = self
            .free
            .lock()
            .expect("lock")
            .pop()
            .expect("a permit always has a free slot");
        SlotGuard {
            slots: self.clone(),
            slot,
            _permit: permit,
        }
    }
}

/// A range of uids for slots, and the directory holding their locks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
    pub lock_dir: std::path::PathBuf,
}

impl UidRange {
    /// Parses `first-last` (both inclusive, above 0, not 65534 `nobody` nor `u32::MAX`).
    pub fn parse(text: &str, lock_dir: &Path) -> Result<UidRange, String> {
        let (first, last) = text
            .split_once('-')
            .ok_or_else(|| format!("{text:?} is not first-last, e.g. 200000-299999"))?;
        let parse = |n: &str| {
            n.trim()
                .parse::<u32>()
                .map_err(|e| format!("{n:?} is not a uid: {e}"))
        };
        let (first, last) = (parse(first)?, parse(last)?);
        if first == 0 || first > last || last == u32::MAX || (first..=last).contains(&65534) {
            return Err(format!(
                "{text:?}: the range must not hold root, nobody (65534) or 4294967295"
            ));
        }
        Ok(UidRange {
            first,
            last,
            lock_dir: lock_dir.to_path_buf(),
        })
    }

    /// Locks `count` uids of the range that no other process holds.
    fn allocate(&self, count: usize) -> Result<(Vec<ToolUser>, Vec<Flock<File>>), String> {
        std::fs::create_dir_all(&self.lock_dir)
            .map_err(|e| format!("creating {}: {e}", self.lock_dir.display()))?;
        let mut users = Vec::with_capacity(count);
        let mut locks = Vec::with_capacity(count);
        for uid in self.first..=self.last {
            if users.len() == count {
                break;
            }
            let path = self.lock_dir.join(format!("{uid}.lock"));
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| format!("opening {}: {e}", path.display()))?;
            // Held by another runner: try the next uid.
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                users.push(ToolUser { uid, gid: uid });
                locks.push(lock);
            }
        }
        if users.len() < count {
            return Err(format!(
                "only {} of the {count} uids needed are free in {}-{} (other runners on this host hold the rest); widen SLUICE_RUNNER_TOOL_UIDS",
                users.len(),
                self.first,
                self.last
            ));
        }
        Ok((users, locks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_ranges_refuse_root_nobody_and_garbage() {
        let dir = Path::new("/nonexistent");
        assert!(UidRange::parse("200000-299999", dir).is_ok());
        assert!(UidRange::parse("0-10", dir).is_err());
        assert!(UidRange::parse("60000-70000", dir).is_err());
        assert!(UidRange::parse("10-5", dir).is_err());
        assert!(UidRange::parse("x-5", dir).is_err());
        assert!(UidRange::parse("5", dir).is_err());
    }

    #[test]
    fn two_runners_on_one_host_never_share_a_uid() {
        let dir = std::env::temp_dir().join(format!("sluice-uids-{}", uuid::Uuid::new_v4()));
        let range = UidRange::parse("300000-300005", &dir).unwrap();
        let (a, _a_locks) = range.allocate(3).unwrap();
        let (b, b_locks) = range.allocate(3).unwrap();
        let a: Vec<u32> = a.iter().map(|u| u.uid).collect();
        let b: Vec<u32> = b.iter().map(|u| u.uid).collect();
        assert_eq!(a, [300000, 300001, 300002]);
        assert_eq!(b, [300003, 300004, 300005]);
        // The range is used up while both live; a runner that ends frees its uids.
        assert!(range.allocate(1).unwrap_err().contains("only 0"));
        drop(b_locks);
        let (c, _c_locks) = range.allocate(1).unwrap();
        assert_eq!(c[0].uid, 300003);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn slots_are_handed_out_once_and_come_back() {
        let slots = Slots::new(2, None).unwrap();
        let a = slots.acquire().await;
        let b = slots.try_acquire().unwrap();
        assert_ne!(a.slot().index, b.slot().index);
        assert!(slots.try_acquire().is_none());
        let index = a.slot().index;
        drop(a);
        assert_eq!(slots.try_acquire().unwrap().slot().index, index);
    }
}
