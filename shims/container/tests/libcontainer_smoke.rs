//! libcontainer for real: a busybox rootfs, a generated spec, create/start/wait/delete,
//! exec, stdout and stderr through pipes. Needs root and Debian's busybox-static.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;

use isola_container::runner::{self, Runner, Stdio};
use isola_container::spec::{self, ImageConfig, PodContext, SpecOptions};
use isola_proto::cri;

fn busybox_rootfs(dir: &Path) {
    let bb = Path::new("/bin/busybox");
    assert!(
        bb.exists(),
        "/bin/busybox is missing: apt-get install busybox-static"
    );
    std::fs::create_dir_all(dir.join("bin")).expect("bin");
    std::fs::create_dir_all(dir.join("etc")).expect("etc");
    std::fs::copy(bb, dir.join("bin/busybox")).expect("copy busybox");
    for app in ["sh", "cat", "echo", "id", "sleep", "grep"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(app)).expect("symlink");
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(dir.join("etc/group"), "root:x:0:\nuser:x:1000:\n").expect("group");
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe().expect("pipe")
}

fn read_all(fd: OwnedFd) -> String {
    let mut s = String::new();
    std::fs::File::from(fd)
        .read_to_string(&mut s)
        .expect("read");
    s
}

#[test]
fn create_start_wait_exec_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("bundle");
    busybox_rootfs(&bundle.join("rootfs"));
    let id = format!("smoke{}", std::process::id());
    let config = cri::ContainerConfig {
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo out; echo err >&2; id -u; sleep 2; exit 3".into(),
        ],
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1000 }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let g = spec::generate(
        &id,
        &config,
        &ImageConfig::default(),
        &bundle.join("rootfs"),
        &PodContext::default(),
        &SpecOptions::default(),
    )
    .expect("spec");
    g.spec.save(bundle.join("config.json")).expect("save spec");
    let runner = Runner::new(&dir.path().join("state"), false);
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    let out_t = std::thread::spawn(move || read_all(out_r));
    let err_t = std::thread::spawn(move || read_all(err_r));
    let pid = match runner.create(
        &id,
        &bundle,
        Stdio {
            stdin: None,
            stdout: out_w,
            stderr: err_w,
        },
    ) {
        Ok(p) => p,
        Err(e) => panic!("{e}\ninit said: {}", err_t.join().expect("join")),
    };
    assert!(pid > 0);
    runner.start(&id).expect("start");

    // Exec while it runs.
    let (xo_r, xo_w) = pipe();
    let (_xe_r, xe_w) = pipe();
    let xpid = runner
        .exec(
            &id,
            vec!["/bin/sh".into(), "-c".into(), "echo exec-$((6*7))".into()],
            Default::default(),
            Stdio {
                stdin: None,
                stdout: xo_w,
                stderr: xe_w,
            },
            &bundle,
        )
        .expect("exec");
    let xout = std::thread::spawn(move || read_all(xo_r));
    let xexit = runner::wait(xpid);
    assert_eq!(xexit.code, 0);
    assert_eq!(xout.join().expect("join").trim(), "exec-42");

    let exit = runner::wait(pid);
    assert_eq!(exit.code, 3);
    assert_eq!(out_t.join().expect("join"), "out\n1000\n");
    assert_eq!(err_t.join().expect("join"), "err\n");
    runner.delete(&id, true).expect("delete");
    assert!(!dir.path().join("state").join(&id).exists());
    let _ = isola_container::cgroups::remove("/isola");
}
