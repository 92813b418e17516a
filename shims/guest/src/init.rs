//! PID 1 start-up: kernel filesystems, cgroups, loopback, then the agent loop.

use std::ffi::CString;
use std::io::Write;
use std::path::Path;

use crate::clock::{self, Stamp};
use crate::server::{BootInfo, Ended, Server};

/// Errors of the start-up steps.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// mount(2) failed.
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        /// Filesystem type.
        fstype: String,
        /// Mount point.
        target: String,
        /// The errno.
        source: std::io::Error,
    },
    /// A path or option held a NUL byte.
    #[error("invalid string for a syscall: {0}")]
    Nul(#[from] std::ffi::NulError),
    /// Creating a directory failed.
    #[error("mkdir {0}: {1}")]
    Mkdir(String, std::io::Error),
}

/// Which cgroup layout to mount, from `isola.cgroups=` on the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// cgroup2 at /sys/fs/cgroup (the default).
    Unified,
    /// One v1 hierarchy per controller under a tmpfs at /sys/fs/cgroup.
    Legacy,
}

/// mount(2) with a created target directory.
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), InitError> {
    std::fs::create_dir_all(target).map_err(|e| InitError::Mkdir(target.into(), e))?;
    let c_source = CString::new(source)?;
    let c_target = CString::new(target)?;
    let c_fstype = CString::new(fstype)?;
    let c_data = CString::new(data)?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c_source.as_ptr(),
            c_target.as_ptr(),
            c_fstype.as_ptr(),
            flags,
            c_data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(InitError::Mount {
            fstype: fstype.into(),
            target: target.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Mounts proc, sys, dev (devtmpfs), devpts, /dev/shm, /run, /tmp and the cgroups, in the
/// layout `isola.cgroups=v1|v2` on the kernel command line asks for (v2 by default).
pub fn mount_basics() -> Result<CgroupMode, InitError> {
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nodev, "")?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cgroups = match cmdline_value(&cmdline, "isola.cgroups").as_deref() {
        Some("v1") => CgroupMode::Legacy,
        _ => CgroupMode::Unified,
    };
    mount("sysfs", "/sys", "sysfs", nodev, "")?;
    // devtmpfs may already be there if the kernel mounted it (DEVTMPFS_MOUNT with a disk root).
    if !Path::new("/dev/null").exists() {
        mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    }
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    mount("shm", "/dev/shm", "tmpfs", nodev, "mode=1777")?;
    mount(
        "run",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )?;
    mount(
        "tmp",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    match cgroups {
        CgroupMode::Unified => mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev, "")?,
        CgroupMode::Legacy => {
            mount("cgroup", "/sys/fs/cgroup", "tmpfs", nodev, "mode=0755")?;
            for controller in enabled_v1_controllers() {
                let target = format!("/sys/fs/cgroup/{controller}");
                mount("cgroup", &target, "cgroup", nodev, &controller)?;
            }
        }
    }
    Ok(cgroups)
}

/// Controllers the kernel has, from /proc/cgroups.
fn enabled_v1_controllers() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/cgroups").unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.len() == 4 && fields[3] == "1").then(|| fields[0].to_string())
        })
        .collect()
}

/// The value of `key=` on the kernel command line.
pub fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|word| {
        word.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('='))
            .map(str::to_string)
    })
}

/// Writes one short line to the console (every byte is a VM exit on a serial port).
fn console(msg: &str) {
    let mut err = std::io::stderr();
    let _ = writeln!(err, "isola-guest: {msg}");
}

/// Ends the guest: sync and reset. Without ACPI the kernel cannot power off (it would
/// only halt); booted with `reboot=t` a reset is a triple fault, and the VMM runs with
/// "no reboot", so the reset ends the VM.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // reboot failed (we are not PID 1 with CAP_SYS_BOOT): nothing left to do but exit.
    std::process::exit(1)
}

/// Set in the environment of the re-executed /init once the root is a tmpfs.
const SWITCHED_ENV: &str = "ISOLA_GUEST_SWITCHED_ROOT";

/// Where the VMM has a virtio-balloon with free page reporting, the guest reports free
/// blocks of 2^order pages so the host can take them back. Linux 6.1's driver fixes the
/// order at pageblock_order (4 MiB without hugetlbfs) and overwrites a command-line
/// value; blocks that large are rare once the guest has run for a while, so the order is
/// set here, after the driver registered: `isola.page_reporting_order=N` (default 0,
/// every free page; reports run 2 s after frees, batched). The kernel's reason for large
/// blocks, not splitting the host's transparent huge pages, does not apply to guest RAM
/// in a memfd without THP; what a small order costs is a host page fault when the guest
/// reuses a reported page.
///
/// Only pages back in the buddy allocator are reported, and a freed page goes first to
/// its CPU's page list, which by default holds up to the zone's low watermark (≈2.4 MiB
/// in a 256 MiB guest) and is only drained when it overflows: an idle guest keeps that
/// much freed memory the host never gets back. `vm.percpu_pagelist_high_fraction` bounds
/// the lists by a fraction of the zone instead; the kernel's floor (4 batches, 60 pages
/// = 240 KiB here) is what remains.
///
/// Measured with tests/bench/compare.sh, 5 idle pods (docs/benchmarks.md): order 5 →
/// 69.0 MiB per pod, order 3 → 68.0, order 0 → 66.9; order 0 without the bounded lists
/// gave back only 0.3 MiB (the page cache the guest shim drops comes back in 16-64 KiB
/// pieces, and the last ones stay on the CPU's list).
fn report_free_pages() -> Result<(), String> {
    const PCP_FRACTION: &str = "/proc/sys/vm/percpu_pagelist_high_fraction";
    const PARAM: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
    if !Path::new(PARAM).exists() {
        return Ok(()); // no balloon driver or no reporting device
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let order = cmdline_value(&cmdline, "isola.page_reporting_order")
        .map(|v| {
            v.parse::<u32>()
                .map_err(|_| format!("isola.page_reporting_order={v}: not a number"))
        })
        .transpose()?
        .unwrap_or(0);
    std::fs::write(PARAM, order.to_string()).map_err(|e| format!("{PARAM}: {e}"))?;
    // Any fraction large enough that the floor applies (the zone's pages / fraction
    // below 60 pages for guests up to 1 TiB).
    std::fs::write(PCP_FRACTION, "4194304").map_err(|e| format!("{PCP_FRACTION}: {e}"))
}

/// Makes the guest's root a mount with a parent and re-executes /init there.
///
/// The initramfs is the kernel's `rootfs`, a mount without a parent, on which
/// pivot_root(2) fails (EINVAL): containers could then only be chroot-ed (runc's
/// `--no-pivot`), which a process with CAP_SYS_CHROOT can escape. A bind mount of `/`
/// moved over `/` has a parent, so the container runtime pivots as on the host — and
/// unlike switch_root's copy to a tmpfs, nothing is copied (guest memory the host would
/// have to hold).
fn leave_initramfs() -> Result<(), String> {
    let new = "/.root";
    std::fs::create_dir_all(new).map_err(|e| format!("mkdir {new}: {e}"))?;
    let c_new = CString::new(new).map_err(|e| e.to_string())?;
    let c_root = CString::new("/").map_err(|e| e.to_string())?;
    let c_dot = CString::new(".").map_err(|e| e.to_string())?;
    // SAFETY: plain syscalls on NUL-terminated strings that outlive the calls.
    unsafe {
        if libc::mount(
            c_root.as_ptr(),
            c_new.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            return Err(format!(
                "bind-mounting / at {new}: {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::chdir(c_new.as_ptr()) != 0 {
            return Err(format!("chdir {new}: {}", std::io::Error::last_os_error()));
        }
        if libc::mount(
            c_dot.as_ptr(),
            c_root.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        ) != 0
        {
            return Err(format!(
                "moving {new} to /: {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::chroot(c_dot.as_ptr()) != 0 {
            return Err(format!("chroot: {}", std::io::Error::last_os_error()));
        }
        if libc::chdir(c_root.as_ptr()) != 0 {
            return Err(format!("chdir /: {}", std::io::Error::last_os_error()));
        }
    }
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new("/init")
        .args(std::env::args_os().skip(1))
        .env(SWITCHED_ENV, "1")
        .exec();
    Err(format!("re-executing /init: {err}"))
}

/// Serves the shim API in this process (the server refuses ServeShim without a program
/// when the shim is not built in).
#[cfg(feature = "shim")]
fn serve_shim(port: std::fs::File, req: &isola_proto::guest::ServeShimRequest) {
    if let Err(e) = crate::shim::serve(port, req) {
        console(&format!("shim: {e:#}"));
    }
}

#[cfg(not(feature = "shim"))]
fn serve_shim(_port: std::fs::File, _req: &isola_proto::guest::ServeShimRequest) {
    console("shim: not built in");
}

/// The entry point of the guest shim program, executed by /init in its place
/// ([`crate::handoff`]) with the arguments after `serve-shim`: serves the shim API on the
/// channel it was handed, then powers off as /init would have. Never returns.
#[cfg(feature = "shim")]
pub fn run_handed_off(args: &[String]) -> ! {
    if std::process::id() == 1 {
        // /init (isola-guest-init, in the initramfs's tmpfs) has handed over and will not
        // run again: its ~1.4 MiB are guest memory. Our own binary is elsewhere (the
        // virtio-fs share), which /proc/self/exe tells.
        let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
        if exe != Path::new("/init") {
            if let Err(e) = std::fs::remove_file("/init") {
                console(&format!("removing /init: {e}"));
            }
        }
    }
    match crate::handoff::from_args(args) {
        Ok((port, req)) => serve_shim(port, &req),
        Err(e) => console(&e),
    }
    if std::process::id() == 1 {
        power_off();
    }
    std::process::exit(1)
}

/// The entry point of /init: never returns.
pub fn run() -> ! {
    let start = Stamp::now();
    let pid1 = std::process::id() == 1;
    if pid1 && std::env::var_os(SWITCHED_ENV).is_none() {
        if let Err(e) = leave_initramfs() {
            // Still usable for everything but pivot_root-ing containers.
            console(&format!("staying on the initramfs: {e}"));
        }
    }
    if pid1 {
        console(concat!("start ", env!("CARGO_PKG_VERSION")));
        if let Err(e) = mount_basics() {
            console(&format!("{e}"));
        }
        if let Err(e) = report_free_pages() {
            console(&format!("page reporting: {e}"));
        }
        for failure in crate::modules::load_listed() {
            console(&format!("module {failure}"));
        }
        if let Err(e) = crate::net::set_up("lo") {
            console(&format!("lo: {e}"));
        }
    }
    let uptime_ms = clock::uptime_ms();
    let port = match crate::port::open_agent_port(std::time::Duration::from_secs(10)) {
        Ok(p) => p,
        Err(e) => {
            console(&format!("agent port: {e}"));
            if pid1 {
                power_off();
            }
            std::process::exit(1);
        }
    };
    let ready = Stamp::now();
    let boot = BootInfo {
        start,
        ready,
        uptime_ms,
    };
    match Server::new(boot).serve(port) {
        Ok(Ended::PowerOff) => {}
        Ok(Ended::ServeShim(port, req, Some(program))) => {
            let e = crate::handoff::exec(program, port, &req);
            console(&format!("executing the guest shim {}: {e}", req.program));
        }
        Ok(Ended::ServeShim(port, req, None)) => serve_shim(port, &req),
        Err(e) => console(&format!("agent: {e}")),
    }
    if pid1 {
        power_off();
    }
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cmdline_values() {
        let c = "console=ttyS0 quiet isola.cgroups=v1 panic=-1";
        assert_eq!(cmdline_value(c, "isola.cgroups").as_deref(), Some("v1"));
        assert_eq!(cmdline_value(c, "panic").as_deref(), Some("-1"));
        assert_eq!(cmdline_value(c, "quiet"), None);
        assert_eq!(cmdline_value(c, "isola"), None);
    }
}
