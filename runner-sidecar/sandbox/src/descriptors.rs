//! Descriptors in the forked helpers: closing what they inherited, marking the rest
//! close-on-exec, and writing `/proc/self/fd/<n>` without allocating. Async-signal-safe.

use nix::sys::resource::{getrlimit, Resource};

/// Closes every descriptor from 3 up but `keep` in a forked helper that never execs. Above
/// all this closes std's spawn error pipe (close-on-exec, which never happens here): while a
/// helper holds it, the sidecar's `spawn` would wait for the whole tool to finish.
pub(crate) fn close_inherited_descriptors(keep: i32) {
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

/// Marks every descriptor from 3 up close-on-exec in the tool process, so the tool inherits
/// only stdin, stdout and stderr whatever the sidecar's parent leaked to it (B-14). std's
/// spawn error pipe stays usable until the exec itself.
pub(crate) fn close_on_exec_above_stderr() {
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

/// Writes `/proc/self/fd/<fd>` and a NUL into `out` without allocating; the length, or 0.
pub(crate) fn proc_fd_path(fd: i32, out: &mut [u8; 32]) -> usize {
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
pub(crate) fn write_decimal(mut n: u32, out: &mut [u8]) -> usize {
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
}
