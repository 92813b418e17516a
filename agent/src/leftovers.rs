//! Cleaning up after a pod whose shim is gone: the infra process, container processes
//! (found by their cgroups), mounts under the pod's state directory and cgroups. The
//! shim normally does all of this; the agent does it when the shim died.

use std::path::Path;

use tracing::warn;

use crate::records::{ContainerRecord, SandboxRecord};

/// Every mount point at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    isola_container::mounts::under(dir)
}

/// Unmounts everything at or below `dir` (lazily: a busy mount is detached). Must run
/// before the directory is removed, or removing it would delete through the mounts.
pub fn unmount_under(dir: &Path) -> Result<(), String> {
    for p in mounts_under(dir) {
        if let Err(e) = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH) {
            if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                return Err(format!("unmounting {p}: {e}"));
            }
        }
    }
    let left = mounts_under(dir);
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("still mounted: {}", left.join(", ")))
    }
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Kills and removes what a native pod left behind when its shim died.
pub fn clean_native_pod(sb: &SandboxRecord, containers: &[ContainerRecord], state_dir: &Path) {
    // The infra process: only if it is still ours (its command line names the pod).
    if let Some(pid) = sb.info.get("pid").and_then(|p| p.parse::<i32>().ok()) {
        if pid > 0 {
            let cmd = cmdline(pid);
            if cmd.contains(" pause ") && cmd.contains(&sb.id) {
                kill(pid);
            }
        }
    }
    for c in containers {
        if c.cgroup_path.is_empty() {
            continue;
        }
        for _ in 0..3 {
            let procs = isola_container::cgroups::procs(&c.cgroup_path);
            if procs.is_empty() {
                break;
            }
            for p in procs {
                kill(p);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    if let Err(e) = unmount_under(state_dir) {
        warn!(pod = %sb.id, error = %e, "unmounting the leftovers of a dead shim");
    }
    for c in containers {
        if !c.cgroup_path.is_empty() {
            let _ = isola_container::cgroups::remove(&c.cgroup_path);
        }
    }
    if let Some(cg) = sb.info.get("cgroupPath") {
        if cg.starts_with("/isola/") {
            let _ = isola_container::cgroups::remove(cg);
        }
    }
}

/// Kills and unmounts what a VM pod left behind when its shim died: the VMM and its
/// helpers (recorded by the shim as `hostPids`; killed only if their command line still
/// names the pod's state directory, so a reused pid is never hit) and the virtio-fs
/// share's mounts. The TAP goes with the VMM, and the netns is the agent's.
pub fn clean_vm_pod(sb: &SandboxRecord, state_dir: &Path) {
    let marker = state_dir.display().to_string();
    let pids = sb
        .info
        .get("hostPids")
        .map(|s| {
            s.split(',')
                .filter_map(|p| p.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for pid in pids {
        if pid > 0 && cmdline(pid).contains(&marker) {
            kill(pid);
        }
    }
    if let Err(e) = unmount_under(state_dir) {
        warn!(pod = %sb.id, error = %e, "unmounting the leftovers of a dead vm shim");
    }
}
