//! The builtin backend of the hypervisor layer (`isola_vm::builtin`, which runs
//! `isola-vmm` as a child) driven through the `Hypervisor` trait, as the VM shim drives
//! it: start with a virtio-fs share, agent hello and a file read over the shim's own
//! `AgentClient`, shutdown → a clean exit; a VM stopped by the shim; then a guest that
//! panics at boot → `VmError::GuestPanic`. The nested rig runs it inside L1 (tests/nested.rs).
//!
//! Usage: builtin_smoke KERNEL INITRAMFS WORK_DIR (isola-vmm on PATH or in $ISOLA_VMM).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use isola_vm::{Backend, Device, Selection, VmConfig, VmError};

fn main() -> anyhow::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [kernel, initramfs, work] = args.as_slice() else {
        bail!("usage: builtin_smoke KERNEL INITRAMFS WORK_DIR");
    };
    let selection = || Selection {
        backend: Backend::Builtin,
        reason: "builtin_smoke".into(),
    };
    let share = work.join("share");
    std::fs::create_dir_all(&share)?;
    std::fs::write(share.join("hello.txt"), "through the shim\n")?;

    let config = VmConfig::new("smoke", kernel, initramfs, &work.join("run"));
    let mut vm = isola_vm::new_hypervisor(selection(), config)?;
    vm.add_device(Device::Fs {
        tag: "share".into(),
        shared_dir: share,
    })?;
    let started = Instant::now();
    vm.start().context("start")?;
    let mut agent = vm.agent()?;
    agent.set_timeout(Duration::from_secs(60));
    let hello = agent.hello().context("hello")?;
    println!(
        "builtin: hello ok kernel={} ms={} pids={:?}",
        hello.kernel_release,
        started.elapsed().as_millis(),
        vm.pids()
    );
    if vm.pids().len() < 2 {
        bail!("virtiofsd is not among the VM's pids {:?}", vm.pids());
    }
    agent
        .mount(isola_proto::guest::MountRequest {
            source: "share".into(),
            target: "/mnt/share".into(),
            fstype: "virtiofs".into(),
            data: String::new(),
            readonly: false,
        })
        .context("mount the share")?;
    let text = agent.read_file("/mnt/share/hello.txt")?;
    if text != b"through the shim\n" {
        bail!("share read {:?}", String::from_utf8_lossy(&text));
    }
    println!("builtin: fs ok");
    agent.shutdown().context("shutdown")?;
    let exit = vm.wait(Some(Duration::from_secs(60))).context("wait")?;
    println!("builtin: poweroff {}", exit.status);

    // The shim stops a running VM: the VMM is ended, nothing is left.
    let config = VmConfig::new("smoke-stop", kernel, initramfs, &work.join("run-stop"));
    let mut vm = isola_vm::new_hypervisor(selection(), config)?;
    vm.start().context("start the VM to stop")?;
    let mut agent = vm.agent()?;
    agent.set_timeout(Duration::from_secs(60));
    agent.hello().context("hello before stop")?;
    let exit = vm.stop(Duration::from_secs(5)).context("stop")?;
    if !vm.pids().is_empty() || work.join("run-stop/agent.sock").exists() {
        bail!("stop left the VMM or its socket behind");
    }
    println!("builtin: stopped {}", exit.status);

    let mut config = VmConfig::new("smoke-panic", kernel, initramfs, &work.join("run-panic"));
    config.extra_cmdline = "rdinit=/nonexistent init=/nonexistent".into();
    let mut vm = isola_vm::new_hypervisor(selection(), config)?;
    vm.start().context("start the panicking guest")?;
    match vm.wait(Some(Duration::from_secs(120))) {
        Err(VmError::GuestPanic { line, .. }) => println!("builtin: panic detected: {line}"),
        other => bail!("expected a guest panic, got {other:?}"),
    }
    Ok(())
}
