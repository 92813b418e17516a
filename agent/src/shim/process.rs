//! Shim processes by pid: identity (pid + start time, so a recycled pid is not taken for
//! the shim), liveness, signals and exit notification through a pidfd.

use std::os::fd::{FromRawFd, OwnedFd};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

use crate::records::ShimRecord;

/// The start time (clock ticks since boot, /proc/<pid>/stat field 22) of a live,
/// non-zombie process.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state).
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(22 - 3)?.parse().ok()
}

/// Whether the recorded shim process still runs.
pub fn record_alive(record: &ShimRecord) -> bool {
    proc_start_time(record.pid) == Some(record.start_time)
}

/// Signals the recorded shim, if it is still that process.
pub fn kill(record: &ShimRecord, signal: Signal) {
    if record_alive(record) {
        if let Ok(pid) = i32::try_from(record.pid) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
        }
    }
}

/// Resolves when the recorded process has exited (at once if it already has).
pub async fn wait_exit(record: &ShimRecord) {
    let Ok(pid) = libc::pid_t::try_from(record.pid) else {
        return;
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        // ESRCH: already gone. Anything else (old kernel): poll instead.
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            return;
        }
        while record_alive(record) {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        return;
    }
    // SAFETY: fd was just returned by pidfd_open and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The pid may have been recycled between the record and pidfd_open.
    if !record_alive(record) {
        return;
    }
    // SAFETY: `owned` is a valid open pidfd that the AsyncFd owns for its whole life and
    // whose as_raw_fd never changes.
    match unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) } {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => {
            while record_alive(record) {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn identity_and_exit_of_a_real_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let start = proc_start_time(pid).expect("alive");
        let rec = ShimRecord {
            socket: "/nonexistent".into(),
            pid,
            start_time: start,
        };
        assert!(record_alive(&rec));
        let wrong = ShimRecord {
            start_time: start + 1,
            ..rec.clone()
        };
        assert!(!record_alive(&wrong));
        let waiter = tokio::spawn({
            let rec = rec.clone();
            async move { wait_exit(&rec).await }
        });
        kill(&rec, Signal::SIGKILL);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("exit noticed")
            .expect("join");
        let _ = child.wait();
        assert!(!record_alive(&rec));
    }
}
