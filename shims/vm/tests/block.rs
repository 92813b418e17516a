//! A raw ext4 image given as virtio-blk is mounted and read in the guest.

mod common;

use std::process::Command;

use common::*;
use isola_proto::guest::MountRequest;
use isola_vm::{Device, Hypervisor};

#[test]
fn guest_mounts_an_ext4_disk() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("hello.txt"), b"from the disk\n").unwrap();
    let image = dir.path().join("disk.img");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&image)
        .arg("8M")
        .output()
        .expect("mkfs.ext4 (e2fsprogs) is needed for this test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut vm = vm("block", dir.path(), |_| {});
    vm.add_device(Device::Block {
        path: image,
        read_only: true,
    })
    .unwrap();
    vm.start().expect("start");
    let mut agent = vm.agent().unwrap();
    agent.set_timeout(BOOT_TIMEOUT);
    agent.hello().expect("hello");
    agent
        .mount(MountRequest {
            source: "/dev/vda".into(),
            target: "/mnt/disk".into(),
            fstype: "ext4".into(),
            data: String::new(),
            readonly: true,
        })
        .expect("mount /dev/vda");
    assert_eq!(
        agent.read_file("/mnt/disk/hello.txt").unwrap(),
        b"from the disk\n"
    );
    let err = agent
        .write_file("/mnt/disk/new.txt", b"x")
        .expect_err("read-only");
    assert!(err.to_string().contains("Read-only"), "{err}");
    shutdown_cleanly(&mut vm, &dir.path().join("run"));
}
