//! Boots the isola guest with `isola-vmm` on a real /dev/kvm: agent hello and exec, a
//! virtio-blk disk, virtio-net on a TAP, a virtio-fs share through virtiofsd, guest
//! poweroff (exit 0) and a guest panic (exit 2 naming the panic). Where the host has
//! vmx/svm the scenarios run directly on it; elsewhere (this host's /dev/kvm is PVM)
//! inside the nested rig ([`rig`]). `ISOLA_VMM_TEST_MODE=nested|direct` overrides.
//!
//! Needs root, QEMU, Debian's cloud kernel, busybox-static and the guest assets: run
//! `shims/vmm/rig/prepare.sh` first. Nothing is skipped: a missing piece fails the test.

mod rig;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The L2 command; `$VMM`, `$ROOT` (where l2/ and share/ are) and `$TMP` are set by
/// the runner: inside L1 (`/bin/isola-vmm`, `/`, `/tmp`) or on a host with hardware KVM.
const L2: &str = "$VMM --kernel $ROOT/l2/vmlinux --initramfs $ROOT/l2/initramfs.cpio --mem-mib 256";

#[test]
fn isola_vmm_boots_the_guest_in_the_nested_rig() {
    let host = rig::Host::find_guest();
    let dir = tempfile::tempdir().unwrap();
    let vmm = Path::new(env!("CARGO_BIN_EXE_isola-vmm"));
    let direct = rig::hardware_kvm();
    let mut l1 = if direct {
        rig::L1::direct(dir.path(), &host)
    } else {
        rig::L1::new(dir.path(), &rig::Host::find(), vmm)
    };

    // An ext4 disk holding hello.txt.
    let content = dir.path().join("disk-content");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("hello.txt"), "from the disk\n").unwrap();
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(l1.root.join("l2/disk.img"))
        .arg("8M")
        .output()
        .expect("mkfs.ext4 (e2fsprogs): run shims/vmm/rig/prepare.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // RIG_STRACE=1 runs the devices scenario under strace (debugging seccomp lists).
    let strace = if std::env::var_os("RIG_STRACE").is_some() && !direct {
        rig::copy_program(&l1.root, Path::new("/usr/bin/strace"), "/bin/strace");
        "strace -f -o /tmp/strace.log -e trace=openat,open "
    } else {
        ""
    };
    l1.scenario(
        "boot",
        &format!(
            "{L2} --serial-log $TMP/l2-boot.log --agent-socket $TMP/boot.sock \
             --selftest; rc=$?; cat $TMP/l2-boot.log; exit $rc"
        ),
    );
    // The TAP and its addresses live in L1, or in a network namespace of the test's own
    // on a host ($NETNS).
    l1.scenario(
        "devices",
        &format!(
            "$NETNS {strace}{L2} --vcpus 2 --serial-log $TMP/l2-devices.log \
             --agent-socket $TMP/agent.sock --blk $ROOT/l2/disk.img,ro --tap tap0 --selftest \
             --selftest-blk 'from the disk' --selftest-net 10.0.2.2/24; rc=$?; \
             tail -n 5 $TMP/l2-devices.log; \
             [ -f /tmp/strace.log ] && grep -v ENOENT /tmp/strace.log | tail -n 20; exit $rc"
        ),
    );
    // virtio-fs through virtiofsd (vhost-user), started by isola-vmm for --fs.
    let virtiofsd = rig::virtiofsd();
    if !direct {
        rig::copy_program(&l1.root, &virtiofsd, "/bin/virtiofsd");
    }
    std::fs::create_dir_all(l1.root.join("share")).unwrap();
    std::fs::write(l1.root.join("share/hello.txt"), "from the share\n").unwrap();
    l1.scenario(
        "fs",
        &format!(
            "{L2} --serial-log $TMP/l2-fs.log --agent-socket $TMP/fs.sock \
             --fs share=$ROOT/share --selftest --selftest-fs 'share=from the share'; \
             rc=$?; tail -n 5 $TMP/l2-fs.log; exit $rc"
        ),
    );
    // The hypervisor layer's builtin backend (isola_vm::builtin) over the same VMM.
    if !direct {
        rig::copy_program(
            &l1.root,
            &rig::example("builtin_smoke"),
            "/bin/builtin_smoke",
        );
    }
    let smoke = if direct {
        rig::example("builtin_smoke").display().to_string()
    } else {
        "/bin/builtin_smoke".into()
    };
    l1.scenario(
        "builtin",
        &format!(
            "ISOLA_VMM=$VMM {smoke} $ROOT/l2/vmlinux $ROOT/l2/initramfs.cpio $TMP/builtin; \
             rc=$?; tail -n 3 $TMP/builtin/run/vmm.log; exit $rc"
        ),
    );
    l1.scenario(
        "panic",
        &format!(
            "{L2} --serial-log $TMP/l2-panic.log \
             --cmdline 'console=ttyS0 quiet reboot=t panic=-1 rdinit=/nonexistent init=/nonexistent'"
        ),
    );
    let run = if direct {
        l1.run_direct(vmm)
    } else {
        let cpio = l1.pack(dir.path());
        rig::boot(
            &rig::Host::find(),
            &cpio,
            dir.path(),
            Duration::from_secs(600),
        )
    };
    eprintln!(
        "{} ran {:?}; output:\n{}",
        if direct { "host" } else { "L1" },
        run.elapsed,
        run.console
    );

    if !direct {
        assert!(run.console.contains("RIG: kvm ok"), "L1 has no /dev/kvm");
        assert!(
            run.console.contains("RIG: done"),
            "L1 did not finish its script"
        );
    }

    let devices = run.output("devices");
    assert_eq!(run.rc("devices"), Some(0), "devices scenario:\n{devices}");
    for line in [
        "selftest: hello ok",
        "cpus=2",
        "selftest: exec ok",
        "selftest: blk ok",
        "selftest: net ok",
        "selftest: passed",
        "isola-vmm: guest powered off",
    ] {
        assert!(devices.contains(line), "no {line:?} in:\n{devices}");
    }

    let boot = run.output("boot");
    assert_eq!(run.rc("boot"), Some(0), "boot scenario:\n{boot}");

    let fs = run.output("fs");
    assert_eq!(run.rc("fs"), Some(0), "fs scenario:\n{fs}");
    assert!(fs.contains("selftest: fs ok"), "{fs}");

    let builtin = run.output("builtin");
    assert_eq!(run.rc("builtin"), Some(0), "builtin scenario:\n{builtin}");
    for line in [
        "builtin: hello ok",
        "builtin: fs ok",
        "builtin: poweroff exit status: 0",
        "builtin: stopped signal: 15",
        "builtin: panic detected: Kernel panic - not syncing",
    ] {
        assert!(builtin.contains(line), "no {line:?} in:\n{builtin}");
    }

    let panic = run.output("panic");
    assert_eq!(run.rc("panic"), Some(2), "panic scenario:\n{panic}");
    assert!(
        panic.contains("guest kernel panic: Kernel panic - not syncing"),
        "{panic}"
    );
}

/// Launch → agent hello and VMM memory, isola-vmm beside QEMU (microvm, KVM) on the same
/// kernel and initramfs, inside the rig. Run with
/// `cargo test --release -p isola-vmm --test nested -- --ignored --nocapture`;
/// `RIG_BOOTS` sets the boots per VMM (default 5).
#[test]
#[ignore = "benchmark: minutes of nested boots"]
fn rig_benchmark() {
    let host = rig::Host::find();
    let dir = tempfile::tempdir().unwrap();
    let vmm = Path::new(env!("CARGO_BIN_EXE_isola-vmm"));
    let mut l1 = rig::L1::new(dir.path(), &host, vmm);
    rig::copy_program(
        &l1.root,
        Path::new(env!("CARGO_BIN_EXE_isola-vmm-bench")),
        "/bin/isola-vmm-bench",
    );
    rig::copy_program(
        &l1.root,
        Path::new("/usr/bin/qemu-system-x86_64"),
        "/usr/bin/qemu-system-x86_64",
    );
    for f in [
        "bios-microvm.bin",
        "pvh.bin",
        "linuxboot_dma.bin",
        "kvmvapic.bin",
        "qboot.rom",
    ] {
        let from = Path::new("/usr/share/qemu").join(f);
        let to = l1.root.join("usr/share/qemu").join(f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
    let boots: usize = std::env::var("RIG_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    l1.scenario(
        "bench",
        &format!(
            "isola-vmm-bench --boots {boots} --kernel /l2/vmlinux --initramfs /l2/initramfs.cpio \
             --vmm /bin/isola-vmm --qemu /usr/bin/qemu-system-x86_64"
        ),
    );
    let cpio = l1.pack(dir.path());
    let run = rig::boot(&host, &cpio, dir.path(), Duration::from_secs(1800));
    let out = run.output("bench");
    eprintln!("{out}");
    assert_eq!(run.rc("bench"), Some(0), "bench:\n{out}");
    assert!(
        out.contains("bench: isola-vmm") && out.contains("bench: qemu"),
        "{out}"
    );
}
