//! Pod network namespaces as bind mounts (the `ip netns` way): a namespace pinned by a
//! mount on a file outlives every process in it, so CNI can set it up before the pod's
//! infra process exists and tear it down after it is gone.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Errors creating or removing a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A step failed; the message says which, on what path.
    #[error("network namespace {path}: {what}: {source}")]
    Io {
        /// The bind-mount file.
        path: PathBuf,
        /// The step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The creating thread died.
    #[error("network namespace {0}: the creating thread panicked")]
    Thread(PathBuf),
}

fn io(path: &Path, what: &'static str, source: impl Into<std::io::Error>) -> NetnsError {
    NetnsError::Io {
        path: path.to_owned(),
        what,
        source: source.into(),
    }
}

/// Creates a new network namespace pinned on `path` (a file created for it), with its
/// loopback interface up (so `localhost` works even in a pod no CNI network attaches).
/// Blocking: call it from `spawn_blocking`. On failure nothing is left at `path`.
pub fn create(path: &Path) -> Result<(), NetnsError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(path, "creating its directory", e))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io(path, "creating the mount point", e))?;
    // unshare(CLONE_NEWNET) moves the calling thread for good: do it on a thread of its
    // own that ends right after, never on a pooled thread that would run other work in
    // the pod's namespace.
    let target = path.to_owned();
    let made = std::thread::Builder::new()
        .name("netns-create".into())
        .spawn(move || -> Result<(), NetnsError> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| io(&target, "unshare(CLONE_NEWNET)", e))?;
            loopback_up().map_err(|e| io(&target, "bringing up lo", e))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| io(&target, "bind-mounting the namespace", e))
        })
        .map_err(|e| io(path, "starting the creating thread", e))?
        .join()
        .unwrap_or_else(|_| Err(NetnsError::Thread(path.to_owned())));
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Sets IFF_UP on `lo` of the calling thread's network namespace.
fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags of the named interface into `ifr`, a valid
    // ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `ifr`, valid for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `path` is a mount point (the namespace is still pinned there).
pub fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| p == want)
}

/// Unpins and deletes the namespace file. Idempotent: a missing file is success.
/// Blocking: call it from `spawn_blocking`.
pub fn remove(path: &Path) -> Result<(), NetnsError> {
    // Detach every stacked mount (a crash between two creates could leave two).
    while is_mounted(path) {
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => break,
            Err(e) => return Err(io(path, "unmounting", e)),
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path, "removing the mount point", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_and_remove_leave_nothing() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("ns");
        create(&p).expect("create");
        assert!(is_mounted(&p));
        let own = std::fs::read_link("/proc/self/ns/net").expect("own netns");
        // The namespace is a new one, and this thread did not move into it.
        let file = std::fs::File::open(&p).expect("open");
        drop(file);
        assert_eq!(std::fs::read_link("/proc/self/ns/net").expect("own"), own);
        assert!(
            create(&p).is_err(),
            "a second create on the same path fails"
        );
        remove(&p).expect("remove");
        assert!(!is_mounted(&p));
        assert!(!p.exists());
        remove(&p).expect("idempotent");
    }
}
