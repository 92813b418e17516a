//! Boot to the agent's hello, clean poweroff, panics and missing assets.

mod common;

use std::time::{Duration, Instant};

use common::*;
use isola_vm::{Hypervisor, VmError};

#[test]
fn boots_to_agent_hello_and_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = vm("hello", dir.path(), |c| {
        c.vcpus = 2;
        c.memory_mib = 256;
    });
    let start = Instant::now();
    vm.start().expect("start");
    let mut agent = vm.agent().unwrap();
    agent.set_timeout(BOOT_TIMEOUT);
    let hello = agent.hello().expect("hello");
    eprintln!("hello after {:?}: {hello:?}", start.elapsed());
    assert!(
        hello.kernel_release.starts_with("6.1"),
        "{}",
        hello.kernel_release
    );
    assert_eq!(hello.cpus, 2);
    let mem = hello.memory_total_bytes;
    assert!((150 << 20..=256 << 20).contains(&mem), "MemTotal {mem}");
    let boot = hello.boot.expect("boot times");
    assert!(boot.init_start_boottime_ns > 0);
    assert!(boot.channel_ready_boottime_ns >= boot.init_start_boottime_ns);
    assert!(boot.hello_boottime_ns >= boot.channel_ready_boottime_ns);
    // The guest's cgroup2 and proc are mounted.
    let controllers = agent
        .read_file("/sys/fs/cgroup/cgroup.controllers")
        .expect("cgroup2");
    assert!(String::from_utf8_lossy(&controllers).contains("memory"));
    // Syscalls container workloads expect are in the kernel (inotify here).
    agent
        .read_file("/proc/sys/fs/inotify/max_user_watches")
        .expect("inotify in the guest kernel");
    // exec runs a program and returns its status and output.
    let out = agent
        .exec(isola_proto::guest::ExecRequest {
            argv: vec!["/init".into(), "--version".into()],
            timeout_ms: 10_000,
            ..Default::default()
        })
        .expect("exec");
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "isola-guest 0.1.0\n");
    let err = agent
        .exec(isola_proto::guest::ExecRequest {
            argv: vec!["/nonexistent".into()],
            ..Default::default()
        })
        .expect_err("no such program");
    assert!(err.to_string().contains("/nonexistent"), "{err}");
    // ServeShim's program (what /init hands the channel to) must be an executable file in
    // the guest: otherwise an error answer naming it, and the channel stays on the
    // framed API.
    for (program, why) in [
        ("/nonexistent/isola-guest", "No such file"),
        ("/proc/version", "not executable"),
        ("/sys", "not a regular file"),
    ] {
        let err = vm
            .agent()
            .unwrap()
            .serve_shim(isola_proto::guest::ServeShimRequest {
                sandbox_id: "boot-test".into(),
                program: program.into(),
                ..Default::default()
            })
            .expect_err(program);
        let msg = err.to_string();
        assert!(
            msg.contains(program) && msg.contains(why),
            "{program}: {msg}"
        );
    }
    // This /init has no shim of its own: ServeShim without a program is refused too.
    let err = vm
        .agent()
        .unwrap()
        .serve_shim(isola_proto::guest::ServeShimRequest {
            sandbox_id: "boot-test".into(),
            ..Default::default()
        })
        .expect_err("no program");
    assert!(err.to_string().contains("needs a program"), "{err}");
    vm.agent().unwrap().hello().expect("still the framed API");
    let console = std::fs::read_to_string(vm.console_log_path()).unwrap();
    assert!(
        console.lines().count() < 20,
        "serial output stays short:\n{console}"
    );
    shutdown_cleanly(&mut vm, &dir.path().join("run"));
}

#[test]
fn cgroup_v1_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = vm("cgv1", dir.path(), |c| {
        c.extra_cmdline = "isola.cgroups=v1".into()
    });
    vm.start().expect("start");
    let mut agent = vm.agent().unwrap();
    agent.hello().expect("hello");
    let limit = agent
        .read_file("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        .expect("v1 memory hierarchy");
    assert!(!limit.is_empty());
    shutdown_cleanly(&mut vm, &dir.path().join("run"));
}

#[test]
fn panic_at_boot_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = vm("panic-boot", dir.path(), |c| {
        c.extra_cmdline = "rdinit=/nonexistent".into()
    });
    let result = vm.start().and_then(|()| {
        let pids = vm.pids();
        let r = vm.wait(Some(BOOT_TIMEOUT));
        assert_gone(&pids);
        r
    });
    match result {
        Err(VmError::GuestPanic { line, .. }) => {
            // No /init in the initramfs: the kernel falls back to a root disk there is none of.
            assert!(
                line.starts_with("Kernel panic - not syncing: VFS"),
                "{line}"
            );
        }
        other => panic!("expected a guest panic, got {other:?}"),
    }
    assert_no_sockets(&dir.path().join("run"));
}

#[test]
fn panic_at_run_time_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = vm("panic-run", dir.path(), |_| {});
    vm.start().expect("start");
    let pids = vm.pids();
    let mut agent = vm.agent().unwrap();
    agent.hello().expect("hello");
    agent.set_timeout(Duration::from_secs(2));
    // The write never answers: the kernel crashes inside it.
    let _ = agent.write_file("/proc/sysrq-trigger", b"c");
    let err = vm
        .wait(Some(BOOT_TIMEOUT))
        .expect_err("a panic is an error");
    let msg = err.to_string();
    assert!(matches!(err, VmError::GuestPanic { .. }), "{msg}");
    assert!(
        msg.contains("Kernel panic - not syncing: sysrq triggered crash"),
        "{msg}"
    );
    assert_gone(&pids);
    assert_no_sockets(&dir.path().join("run"));
}

#[test]
fn missing_kernel_or_initramfs_fails_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    for which in ["kernel", "initramfs"] {
        let mut vm = vm(which, dir.path(), |c| {
            if which == "kernel" {
                c.kernel = missing.clone();
            } else {
                c.initramfs = missing.clone();
            }
        });
        let err = vm.start().expect_err("must fail");
        assert!(
            matches!(&err, VmError::MissingAsset { what, path } if *what == which && *path == missing),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("guest {which} not found")) && msg.contains("build-assets.sh"),
            "{msg}"
        );
        assert!(vm.pids().is_empty(), "nothing may run");
        assert!(!dir.path().join("run").exists(), "nothing may be created");
    }
}

#[test]
fn builtin_vmm_selection_says_why() {
    let host = isola_vm::select::HostVirt::detect();
    let hw = host.hw_flag.is_some();
    // "auto": isola's own VMM only with vmx/svm; QEMU (TCG here) otherwise.
    let auto =
        isola_vm::select(isola_vm::HypervisorChoice::Auto, host).expect("auto selects a backend");
    eprintln!("auto here: {} ({})", auto.backend, auto.reason);
    assert_eq!(
        matches!(auto.backend, isola_vm::Backend::Builtin),
        hw && host.dev_kvm,
        "{}",
        auto.reason
    );
    // "builtin" asked for explicitly is honoured, and the reason says when the CPU lacks
    // vmx/svm.
    let builtin =
        isola_vm::select(isola_vm::HypervisorChoice::Builtin, host).expect("builtin selection");
    assert!(matches!(builtin.backend, isola_vm::Backend::Builtin));
    if !hw {
        assert!(builtin.reason.contains("vmx/svm"), "{}", builtin.reason);
    }
}

#[test]
fn a_vmm_that_dies_at_start_leaves_nothing_behind() {
    let virtiofsd = virtiofsd();
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let mut vm = vm("vmm-dies", dir.path(), |c| {
        // Exits at once, after virtiofsd was started for the share.
        c.qemu_binary = "/bin/false".into();
        c.virtiofsd_binary = virtiofsd;
    });
    vm.add_device(isola_vm::Device::Fs {
        tag: "pod".into(),
        shared_dir: share,
    })
    .unwrap();
    let err = vm.start().expect_err("qemu exits at once");
    assert!(err.to_string().contains("exited"), "{err}");
    assert!(vm.pids().is_empty(), "{:?}", vm.pids());
    assert_no_process_mentions(dir.path());
    assert_no_sockets(&dir.path().join("run"));
}

#[test]
fn stop_ends_a_running_vm_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = vm("stop", dir.path(), |_| {});
    vm.start().expect("start");
    let pids = vm.pids();
    vm.agent().unwrap().hello().expect("hello");
    let started = Instant::now();
    vm.stop(Duration::from_secs(10)).expect("stop");
    eprintln!("stop took {:?}", started.elapsed());
    assert_gone(&pids);
    assert_no_sockets(&dir.path().join("run"));
    assert_no_process_mentions(dir.path());
    // A second stop and a wait are answered from the recorded exit.
    vm.stop(Duration::from_secs(1)).expect("stop is idempotent");
    vm.wait(None).expect("wait after stop");
}
