//! Becoming a daemon that outlives the agent: the launcher forks the shim, the shim
//! starts its own session, binds its socket and only then tells the launcher, which
//! prints the shim's pid for the agent and exits.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

use anyhow::{bail, Context};
use nix::unistd::{fork, setsid, ForkResult};

/// What the forked shim gets: its bound socket and the pipe to report readiness on.
pub struct Daemon {
    /// The listening socket.
    pub listener: UnixListener,
    ready: Option<std::fs::File>,
}

impl Daemon {
    /// Tells the launcher the shim is ready; it then exits.
    pub fn ready(&mut self) -> anyhow::Result<()> {
        if let Some(mut f) = self.ready.take() {
            f.write_all(b"ok").context("reporting readiness")?;
        }
        Ok(())
    }
}

/// Forks. Returns in the child (the shim) only; the parent waits for readiness, prints
/// the child's pid and exits the process. Must run before any thread is started.
pub fn daemonize(socket: &Path) -> anyhow::Result<Daemon> {
    let (read_end, write_end): (OwnedFd, OwnedFd) = nix::unistd::pipe().context("pipe")?;
    // SAFETY: called from main before the async runtime or any other thread exists, so
    // the child is a faithful copy of a single-threaded process.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut buf = Vec::new();
            let mut f = std::fs::File::from(read_end);
            let _ = f.read_to_end(&mut buf);
            if buf == b"ok" {
                println!("{child}");
                std::process::exit(0);
            }
            eprintln!("isola-shim-native: the shim (pid {child}) failed before it was ready");
            std::process::exit(1);
        }
        ForkResult::Child => {
            drop(read_end);
            setsid().context("setsid")?;
            // The shim never reads stdin, and stdout is the launcher's pipe to the agent:
            // both go to /dev/null so the agent sees EOF once the launcher exits.
            let devnull = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .context("opening /dev/null")?;
            for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
                // SAFETY: dup2 on valid descriptors; no memory is involved.
                if unsafe { libc::dup2(devnull.as_raw_fd(), fd) } < 0 {
                    bail!("dup2: {}", std::io::Error::last_os_error());
                }
            }
            if socket.exists() {
                std::fs::remove_file(socket)
                    .with_context(|| format!("removing stale {}", socket.display()))?;
            }
            let listener = UnixListener::bind(socket)
                .with_context(|| format!("binding {}", socket.display()))?;
            Ok(Daemon {
                listener,
                ready: Some(std::fs::File::from(write_end)),
            })
        }
    }
}
