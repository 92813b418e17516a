//! The nested KVM rig: this host's /dev/kvm (PVM) cannot run Linux, so an L1 Linux runs
//! under QEMU TCG with `-cpu max` (AMD SVM with nested paging), loads Debian's kvm and
//! kvm-amd modules, and runs `isola-vmm` there against a real /dev/kvm to boot L2 (the
//! isola guest). L1's /init is a busybox script written here; each scenario prints
//! `RIG: END <name> rc=<n>` on L1's serial console, which the test reads.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What the rig needs on the host; a missing piece fails the test with the fix.
pub struct Host {
    pub cloud_kernel: PathBuf,
    pub modules: PathBuf,
    pub guest_kernel: PathBuf,
    pub guest_initramfs: PathBuf,
}

const PREPARE: &str = "run shims/vmm/rig/prepare.sh (as root)";

fn need(path: &Path, what: &str) {
    assert!(
        path.exists(),
        "{what} missing at {}: {PREPARE}",
        path.display()
    );
}

/// An example of this package, built beside the test by `cargo test`.
pub fn example(name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_isola-vmm"));
    let p = bin
        .parent()
        .map(|d| d.join("examples").join(name))
        .unwrap_or_default();
    assert!(
        p.is_file(),
        "example {name} not built at {}: run `cargo test -p isola-vmm` (which builds examples), not `--test nested` alone",
        p.display()
    );
    p
}

/// Whether the scenarios can run on this host directly: vmx/svm and /dev/kvm, unless
/// `ISOLA_VMM_TEST_MODE` says `nested` or `direct`.
pub fn hardware_kvm() -> bool {
    match std::env::var("ISOLA_VMM_TEST_MODE").as_deref() {
        Ok("nested") => return false,
        Ok("direct") => return true,
        _ => {}
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|w| w == "vmx" || w == "svm");
    hw && Path::new("/dev/kvm").exists()
}

/// The guest assets only (the direct mode needs no L1).
pub struct Guest {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl Host {
    /// The guest kernel and initramfs; fails if missing.
    pub fn find_guest() -> Guest {
        let guest = std::env::var_os("ISOLA_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/share/isola/guest"));
        let g = Guest {
            kernel: guest.join("vmlinux"),
            initramfs: guest.join("initramfs.cpio"),
        };
        need(&g.kernel, "the isola guest kernel");
        need(&g.initramfs, "the isola guest initramfs");
        g
    }

    pub fn find() -> Self {
        let boot = std::fs::read_dir("/boot").expect("read /boot");
        let mut kernels: Vec<PathBuf> = boot
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
            })
            .collect();
        kernels.sort();
        let cloud_kernel = kernels
            .pop()
            .unwrap_or_else(|| panic!("no /boot/vmlinuz-*-cloud-amd64: {PREPARE}"));
        let release = cloud_kernel
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .expect("kernel name")
            .to_string();
        let modules = PathBuf::from("/lib/modules").join(&release);
        need(
            &modules.join("kernel/arch/x86/kvm/kvm-amd.ko"),
            "kvm-amd.ko",
        );
        for tool in ["/bin/busybox", "/usr/bin/qemu-system-x86_64"] {
            need(Path::new(tool), tool);
        }
        let guest = Self::find_guest();
        Self {
            cloud_kernel,
            modules,
            guest_kernel: guest.kernel,
            guest_initramfs: guest.initramfs,
        }
    }
}

/// The virtiofsd binary (`$ISOLA_VIRTIOFSD`, PATH, /usr/local/bin); fails if missing.
pub fn virtiofsd() -> PathBuf {
    let p = isola_vmm::virtiofsd::binary();
    assert!(
        p.is_file(),
        "virtiofsd missing at {}: {PREPARE}",
        p.display()
    );
    p
}

/// The L1 root being assembled (or, in direct mode, the host directory with l2/ and
/// share/).
pub struct L1 {
    pub root: PathBuf,
    script: String,
    scenarios: Vec<(String, String)>,
}

fn copy(from: &Path, to: &Path) {
    if let Some(p) = to.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} → {}: {e}", from.display(), to.display()));
}

/// Copies a dynamically linked program and every library `ldd` names into `root`.
pub fn copy_program(root: &Path, program: &Path, dest: &str) {
    copy(program, &root.join(dest.trim_start_matches('/')));
    let out = Command::new("ldd").arg(program).output().expect("ldd");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            let to = root.join(p.trim_start_matches('/'));
            if !to.exists() {
                copy(Path::new(p), &to);
            }
        }
    }
}

impl L1 {
    /// A root with busybox, the kvm/tun modules, the L2 assets and `isola-vmm`.
    pub fn new(dir: &Path, host: &Host, vmm: &Path) -> Self {
        let root = dir.join("l1");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        copy(Path::new("/bin/busybox"), &root.join("bin/busybox"));
        for m in [
            "kernel/virt/lib/irqbypass.ko",
            "kernel/arch/x86/kvm/kvm.ko",
            "kernel/arch/x86/kvm/kvm-amd.ko",
            "kernel/drivers/net/tun.ko",
        ] {
            let name = Path::new(m).file_name().unwrap();
            copy(&host.modules.join(m), &root.join("modules").join(name));
        }
        copy(&host.guest_kernel, &root.join("l2/vmlinux"));
        copy(&host.guest_initramfs, &root.join("l2/initramfs.cpio"));
        copy_program(&root, vmm, "/bin/isola-vmm");
        Self {
            root,
            script: String::new(),
            scenarios: Vec::new(),
        }
    }

    /// A directory for running the scenarios on this host (hardware KVM).
    pub fn direct(dir: &Path, guest: &Guest) -> Self {
        let root = dir.join("direct");
        copy(&guest.kernel, &root.join("l2/vmlinux"));
        copy(&guest.initramfs, &root.join("l2/initramfs.cpio"));
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        Self {
            root,
            script: String::new(),
            scenarios: Vec::new(),
        }
    }

    /// Runs the scenarios on this host, one `sh -c` each, with a network namespace of
    /// their own for the TAP; returns their output in the rig's format.
    pub fn run_direct(&self, vmm: &Path) -> Run {
        let started = Instant::now();
        let netns = format!("isola-vmmtest-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &netns])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {netns} (iproute2, root)");
        let mut console = String::new();
        for (name, command) in &self.scenarios {
            // A wedged guest must not hang the test: 5 minutes per scenario.
            let out = Command::new("timeout")
                .args(["300", "sh", "-c"])
                .arg(command)
                .env("VMM", vmm)
                .env("ROOT", &self.root)
                .env("TMP", self.root.join("tmp"))
                .env("NETNS", format!("ip netns exec {netns}"))
                .output()
                .expect("sh");
            console.push_str(&format!("RIG: BEGIN {name}\n"));
            console.push_str(&String::from_utf8_lossy(&out.stdout));
            console.push_str(&String::from_utf8_lossy(&out.stderr));
            console.push_str(&format!(
                "RIG: END {name} rc={}\n",
                out.status.code().unwrap_or(-1)
            ));
        }
        let _ = Command::new("ip").args(["netns", "del", &netns]).status();
        Run {
            console,
            elapsed: started.elapsed(),
        }
    }

    /// Adds a scenario: `command` runs in L1's shell; its exit status is reported.
    pub fn scenario(&mut self, name: &str, command: &str) {
        self.scenarios.push((name.into(), command.into()));
        self.script.push_str(&format!(
            "echo 'RIG: BEGIN {name}'\n( {command} ) 2>&1\necho \"RIG: END {name} rc=$?\"\n"
        ));
    }

    /// Writes /init and packs the root as a cpio; returns its path.
    pub fn pack(&self, dir: &Path) -> PathBuf {
        let init = format!(
            r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in irqbypass kvm kvm-amd tun; do insmod /modules/$m.ko || echo "RIG: insmod $m failed"; done
[ -e /dev/kvm ] && echo "RIG: kvm ok" || echo "RIG: no /dev/kvm"
ip link set lo up
export VMM=/bin/isola-vmm ROOT= TMP=/tmp NETNS= ISOLA_VIRTIOFSD_SANDBOX=chroot
{}
echo "RIG: done"
poweroff -f
"#,
            self.script
        );
        for d in ["proc", "sys", "dev", "tmp"] {
            std::fs::create_dir_all(self.root.join(d)).unwrap();
        }
        let init_path = self.root.join("init");
        std::fs::write(&init_path, init).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&init_path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cpio = dir.join("l1.cpio");
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
                self.root.display(),
                cpio.display()
            ))
            .status()
            .expect("cpio");
        assert!(status.success(), "packing L1's initramfs failed");
        cpio
    }
}

/// L1's console output and how long L1 ran.
pub struct Run {
    pub console: String,
    pub elapsed: Duration,
}

impl Run {
    /// The exit status a scenario reported.
    pub fn rc(&self, name: &str) -> Option<i32> {
        let marker = format!("RIG: END {name} rc=");
        self.console
            .lines()
            .find_map(|l| {
                l.find(&marker)
                    .map(|i| l[i + marker.len()..].trim().parse().ok())
            })
            .flatten()
    }

    /// The output of a scenario (between its BEGIN and END lines).
    pub fn output(&self, name: &str) -> String {
        let begin = format!("RIG: BEGIN {name}");
        let end = format!("RIG: END {name} ");
        let mut on = false;
        let mut out = String::new();
        for l in self.console.lines() {
            if l.contains(&begin) {
                on = true;
                continue;
            }
            if l.contains(&end) {
                break;
            }
            if on {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// Boots L1 with `initramfs` under QEMU TCG and waits (at most `timeout`) for it to end.
pub fn boot(host: &Host, initramfs: &Path, dir: &Path, timeout: Duration) -> Run {
    let console = dir.join("l1-console.log");
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel", "tcg", "-cpu", "max", "-M", "q35", "-m", "2048", "-smp", "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&host.cloud_kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 tsc_early_khz=2000000 rdinit=/init",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-system-x86_64");
    loop {
        if let Some(status) = child.try_wait().expect("wait qemu") {
            assert!(status.success(), "L1 QEMU exited with {status}");
            break;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            panic!("L1 did not finish within {timeout:?}; console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let bytes = std::fs::read(&console).unwrap_or_default();
    Run {
        console: String::from_utf8_lossy(&bytes).into_owned(),
        elapsed: started.elapsed(),
    }
}
