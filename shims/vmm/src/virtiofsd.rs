//! Starting virtiofsd for a `--fs TAG=DIR` share: one daemon per share, killed with the
//! VMM (PR_SET_PDEATHSIG), and exiting by itself when the VMM disconnects.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors starting virtiofsd.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    /// It could not be spawned.
    #[error("spawn {binary}: {source}")]
    Spawn {
        /// The program.
        binary: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// It exited or never made its socket.
    #[error("virtiofsd did not come up: {0}")]
    NotUp(String),
}

/// `$ISOLA_VIRTIOFSD`, else the first virtiofsd on PATH, else /usr/local/bin/virtiofsd.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ISOLA_VIRTIOFSD") {
        return p.into();
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("virtiofsd"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin/virtiofsd"))
}

/// Starts virtiofsd sharing `dir` on `socket` and waits for the socket (10 s at most).
/// `$ISOLA_VIRTIOFSD_SANDBOX` picks its sandbox (namespace, chroot or none).
pub fn spawn(socket: &Path, dir: &Path) -> Result<Child, VirtiofsdError> {
    let bin = binary();
    let _ = std::fs::remove_file(socket);
    let mut cmd = Command::new(&bin);
    cmd.arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", dir.display()))
        .arg("--cache=never")
        .arg("--log-level=error")
        .stdin(Stdio::null());
    if let Some(sandbox) = std::env::var_os("ISOLA_VIRTIOFSD_SANDBOX") {
        cmd.arg(format!("--sandbox={}", sandbox.to_string_lossy()));
    }
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| VirtiofsdError::Spawn {
        binary: bin.clone(),
        source,
    })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if socket.exists() {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(VirtiofsdError::NotUp(format!("exited with {status}")));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(VirtiofsdError::NotUp(format!(
                "no socket {} after 10 s",
                socket.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
