//! `network: none`: a network namespace of the tool's own, with only loopback.

/// In the tool process, before the uid drop: a network namespace of its own, with only the
/// loopback interface (brought up), so the tool reaches nothing outside itself — not
/// Postgres, not the scheduler, not a metadata address. Only the unshare must succeed: where
/// the new namespace has no network stack at all (gVisor with host networking), there is no
/// loopback to bring up either, which is no less isolated. Async-signal-safe.
pub(crate) fn isolate_network() -> std::io::Result<()> {
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
