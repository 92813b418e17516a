//! Shared helpers of the VM integration tests: they boot real guests under QEMU.
//!
//! Assets come from `ISOLA_GUEST_KERNEL` / `ISOLA_GUEST_INITRAMFS` (default: the installed
//! /usr/share/isola/guest/{vmlinux,initramfs.cpio}); a missing asset FAILS the test and
//! says which script builds it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use isola_vm::qemu::QemuVm;
use isola_vm::select::{select, HostVirt, HypervisorChoice};
use isola_vm::{Hypervisor, VmConfig};

/// The guest kernel and initramfs, or a panic naming what is missing and how to build it.
pub fn assets() -> (PathBuf, PathBuf) {
    let kernel = isola_vm::assets::guest_kernel();
    let initramfs = isola_vm::assets::guest_initramfs();
    for (what, path) in [("kernel", &kernel), ("initramfs", &initramfs)] {
        assert!(
            path.is_file(),
            "guest {what} missing at {}: run deploy/guest/build-assets.sh \
             (or point ISOLA_GUEST_{} at one)",
            path.display(),
            what.to_uppercase()
        );
    }
    (kernel, initramfs)
}

/// virtiofsd's path, or a panic saying how to install it.
pub fn virtiofsd() -> PathBuf {
    let path = isola_vm::virtiofsd::default_binary();
    assert!(
        path.is_file(),
        "virtiofsd missing (looked for {}): run deploy/guest/build-assets.sh, which runs \
         `cargo install virtiofsd --locked --root /usr/local` (or set ISOLA_VIRTIOFSD)",
        path.display()
    );
    path
}

/// A QEMU VM for the test `name` with its run dir under `dir`.
pub fn vm(name: &str, dir: &Path, tweak: impl FnOnce(&mut VmConfig)) -> QemuVm {
    let (kernel, initramfs) = assets();
    let mut config = VmConfig::new(name, &kernel, &initramfs, &dir.join("run"));
    tweak(&mut config);
    let selection = select(HypervisorChoice::Qemu, HostVirt::detect()).expect("select qemu");
    QemuVm::new(selection, config)
}

/// Fails if any of `pids` still runs a moment later (zombies count as gone: they are
/// reaped by their parent; a killed process may take a few ms to die).
pub fn assert_gone(pids: &[u32]) {
    let running = |pid: &u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        (!matches!(state, None | Some("Z") | Some("X"))).then_some(stat)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    for pid in pids {
        while let Some(stat) = running(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "process {pid} of the VM is still running: {stat}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Fails if `dir` still holds a unix socket.
pub fn assert_no_sockets(dir: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let ft = e.file_type().expect("file type");
            assert!(!ft.is_socket(), "leaked socket {}", e.path().display());
        }
    }
}

/// Generous bounds for TCG on a busy 2-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Shuts the guest down through the agent and checks that the VM ended cleanly and left
/// nothing behind.
pub fn shutdown_cleanly(vm: &mut QemuVm, run_dir: &Path) {
    let pids = vm.pids();
    let mut agent = vm.agent().expect("agent channel");
    agent.shutdown().expect("shutdown request");
    let exit = vm
        .wait(Some(BOOT_TIMEOUT))
        .expect("VM ends cleanly after poweroff");
    assert!(exit.status.success(), "qemu exit status {}", exit.status);
    assert_gone(&pids);
    assert_no_sockets(run_dir);
    assert_no_process_mentions(run_dir);
}

/// Fails if a live process has `dir` in its command line (a leaked QEMU or virtiofsd of
/// this test: their sockets and logs live under the test's own directory).
pub fn assert_no_process_mentions(dir: &Path) {
    let needle = dir.display().to_string();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            assert_gone(&[pid]);
        }
    }
}
