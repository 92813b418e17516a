//! virtiofsd, the vhost-user virtio-fs daemon: one per shared directory per VM (it
//! exits when its VMM disconnects).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::hypervisor::VmError;

/// Where to find virtiofsd: `$ISOLA_VIRTIOFSD`, then PATH, then the places
/// `cargo install` puts it.
pub fn default_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ISOLA_VIRTIOFSD") {
        return p.into();
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("virtiofsd"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(Path::new(&home).join("bin/virtiofsd"));
    }
    candidates.extend(
        [
            "/usr/local/bin/virtiofsd",
            "/root/.cargo/bin/virtiofsd",
            "/usr/libexec/virtiofsd",
        ]
        .map(PathBuf::from),
    );
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin/virtiofsd"))
}

/// Starts virtiofsd serving `shared_dir` on `socket` and waits for the socket to appear.
/// Its log goes to `log`.
pub fn spawn(
    binary: &Path,
    socket: &Path,
    shared_dir: &Path,
    log: &Path,
) -> Result<Child, VmError> {
    let _ = std::fs::remove_file(socket);
    let log_file = std::fs::File::create(log)
        .map_err(|e| VmError::io(format!("create {}", log.display()), e))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| VmError::io("dup virtiofsd log", e))?;
    let mut cmd = Command::new(binary);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            // Dies with the thread that started it (the VM's owner), like the VMM.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", shared_dir.display()))
        // The guest sees host changes at once (container rootfs binds appear after boot).
        .arg("--cache=never")
        .arg("--log-level=warn")
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        // virtiofsd forks its sandboxed worker: a group of its own lets us kill both.
        .process_group(0)
        .spawn()
        .map_err(|e| VmError::io(format!("spawn {}", binary.display()), e))?;
    let start = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(VmError::Helper {
                what: "virtiofsd",
                detail: format!("{status}: {}", crate::console::tail(log, 5)),
            });
        }
        if start.elapsed() > Duration::from_secs(10) {
            kill(&mut child);
            return Err(VmError::Helper {
                what: "virtiofsd",
                detail: format!("no socket {} after 10 s", socket.display()),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(child)
}

/// Kills virtiofsd and its sandboxed worker (its whole process group) and reaps it.
pub fn kill(child: &mut Child) {
    if let Ok(pgid) = i32::try_from(child.id()) {
        // SAFETY: killpg only sends a signal; the group is the one spawn() created, led
        // by our (not yet reaped) child, so its id cannot have been reused.
        unsafe { libc::killpg(pgid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}
