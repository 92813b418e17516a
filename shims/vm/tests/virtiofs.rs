//! The guest reads and writes a host directory through virtio-fs (virtiofsd).

mod common;

use common::*;
use isola_proto::guest::MountRequest;
use isola_vm::{Device, Hypervisor};

#[test]
fn guest_reads_and_writes_a_host_directory() {
    let virtiofsd = virtiofsd();
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("from-host.txt"), b"written by the host\n").unwrap();

    let mut vm = vm("virtiofs", dir.path(), |c| c.virtiofsd_binary = virtiofsd);
    vm.add_device(Device::Fs {
        tag: "pod".into(),
        shared_dir: share.clone(),
    })
    .unwrap();
    vm.start().expect("start");
    assert_eq!(vm.pids().len(), 2, "qemu and one virtiofsd");
    let mut agent = vm.agent().unwrap();
    agent.set_timeout(BOOT_TIMEOUT);
    agent.hello().expect("hello");
    agent
        .mount(MountRequest {
            source: "pod".into(),
            target: "/run/isola/shared".into(),
            fstype: "virtiofs".into(),
            data: String::new(),
            readonly: false,
        })
        .expect("mount virtiofs");
    let data = agent
        .read_file("/run/isola/shared/from-host.txt")
        .expect("read");
    assert_eq!(data, b"written by the host\n");
    agent
        .write_file(
            "/run/isola/shared/from-guest.txt",
            b"written by the guest\n",
        )
        .expect("write");
    assert_eq!(
        std::fs::read(share.join("from-guest.txt")).unwrap(),
        b"written by the guest\n"
    );
    // A file created on the host after the mount is visible at once (--cache=never).
    std::fs::write(share.join("later.txt"), b"late").unwrap();
    assert_eq!(
        agent.read_file("/run/isola/shared/later.txt").unwrap(),
        b"late"
    );
    shutdown_cleanly(&mut vm, &dir.path().join("run"));
}
