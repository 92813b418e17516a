//! Terminals of TTY containers and TTY execs: libcontainer creates the pty inside the
//! container and sends its master over a unix socket (the OCI console socket); the shim
//! receives it here, then reads output from it, writes input to it and resizes it.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

/// How long the container may take to send its pty master.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listening console socket.
pub struct ConsoleSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    /// Listens at `path` (replacing a stale socket).
    pub fn bind(path: &Path) -> std::io::Result<ConsoleSocket> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(ConsoleSocket {
            path: path.to_owned(),
            listener,
        })
    }

    /// Its path, for libcontainer.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the pty master that libcontainer sent (after create or exec returned: the
    /// connection waits in the backlog until then).
    pub fn receive(self) -> std::io::Result<OwnedFd> {
        let deadline = Instant::now() + RECEIVE_TIMEOUT;
        let conn = loop {
            match self.listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the container sent no terminal",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(RECEIVE_TIMEOUT))?;
        let mut name = [0u8; 256];
        let mut iov = [IoSliceMut::new(&mut name)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<UnixAddr>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(v) = c {
                fds.extend(v);
            }
        }
        let mut owned: Vec<OwnedFd> = fds
            .into_iter()
            // SAFETY: SCM_RIGHTS handed us these descriptors; nothing else owns them.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        let _ = std::fs::remove_file(&self.path);
        if owned.len() != 1 {
            return Err(std::io::Error::other(format!(
                "expected one terminal descriptor, got {}",
                owned.len()
            )));
        }
        Ok(owned.remove(0))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sets the size of the terminal whose master is `fd`.
pub fn resize(fd: &impl AsRawFd, width: u16, height: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
