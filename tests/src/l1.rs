//! An L1 machine with systemd as PID 1, for the tests this host cannot run itself (cgroup
//! v1 hybrid here, no systemd as PID 1, no AppArmor): QEMU (TCG) boots Debian's cloud
//! kernel, whose root file system is this host's own `/`, read-only through virtiofsd,
//! under a tmpfs overlay. So L1 runs the host's systemd (cgroup v2, its default), D-Bus
//! and AppArmor (the cloud kernel's default LSM), and sees every binary of the host,
//! the workspace's test binaries and `isolad` included.
//!
//! L1's initramfs is busybox: it loads the virtio-pci, virtio-fs and overlay modules,
//! mounts the share, lays the overlay (fresh tmpfs upper, tmpfs `/tmp`), adds the rig's
//! units and switches to `/lib/systemd/systemd`, which boots straight into
//! `isola-rig.target`: basic.target (journald, D-Bus) and `isola-rig.service`, which
//! runs the command on ttyS0 (a file on this host), prints `RIG: END rc=<n>` and powers
//! off. Units L1 does not need are masked, which brings systemd up in ~15 s under TCG.
//!
//! Everything missing fails with what to install: `shims/vmm/rig/prepare.sh` (QEMU, the
//! cloud kernel, busybox-static, cpio) and `deploy/guest/build-assets.sh` (virtiofsd).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const PREPARE: &str = "run shims/vmm/rig/prepare.sh as root (QEMU, Debian's cloud kernel, busybox-static, cpio, virtiofsd)";

/// Kernel modules L1's initramfs loads, in dependency order (the cloud kernel builds
/// virtio-pci, virtio-fs and overlayfs as modules).
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "fs/fuse/fuse",
    "fs/fuse/virtiofs",
    "fs/overlayfs/overlay",
];

/// Units that slow L1's boot under TCG and that nothing here needs (device management,
/// kernel debug file systems, persistent journal, host services and timers).
const MASKED: &[&str] = &[
    "modprobe@.service",
    "systemd-journal-flush.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-update-utmp.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    "systemd-remount-fs.service",
    "systemd-sysusers.service",
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "systemd-machine-id-commit.service",
    "systemd-ask-password-console.path",
    "systemd-ask-password-wall.path",
    "systemd-initctl.socket",
    "systemd-journald-audit.socket",
    "systemd-timesyncd.service",
    "systemd-random-seed.service",
    "systemd-firstboot.service",
    "systemd-pstore.service",
    "apparmor.service",
    "getty@tty1.service",
    "serial-getty@ttyS0.service",
    "console-getty.service",
];

/// What L1 needs on this host.
#[derive(Debug, Clone)]
pub struct Host {
    /// Debian's cloud kernel.
    pub kernel: PathBuf,
    /// Its modules directory.
    pub modules: PathBuf,
    /// virtiofsd.
    pub virtiofsd: PathBuf,
}

fn need(path: &Path, what: &str) -> anyhow::Result<()> {
    if !path.exists() {
        bail!("{what} missing at {}: {PREPARE}", path.display());
    }
    Ok(())
}

impl Host {
    /// Finds the newest /boot/vmlinuz-*-cloud-amd64, its modules, virtiofsd, QEMU,
    /// busybox, cpio and systemd; fails naming what is missing.
    pub fn find() -> anyhow::Result<Host> {
        let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
            .context("reading /boot")?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
            })
            .collect();
        kernels.sort();
        let Some(kernel) = kernels.pop() else {
            bail!("no /boot/vmlinuz-*-cloud-amd64 (linux-image-cloud-amd64): {PREPARE}");
        };
        let release = kernel
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .context("kernel file name")?
            .to_string();
        let modules = PathBuf::from("/lib/modules").join(&release).join("kernel");
        for m in MODULES {
            need(&modules.join(format!("{m}.ko")), &format!("module {m}.ko"))?;
        }
        let virtiofsd = std::env::var_os("ISOLA_VIRTIOFSD")
            .map(PathBuf::from)
            .or_else(|| which("virtiofsd"))
            .unwrap_or_else(|| PathBuf::from("/usr/local/bin/virtiofsd"));
        need(&virtiofsd, "virtiofsd")?;
        for (tool, what) in [
            ("/bin/busybox", "busybox (busybox-static)"),
            ("/lib/systemd/systemd", "systemd"),
            ("/usr/bin/dbus-daemon", "dbus-daemon (dbus)"),
        ] {
            need(Path::new(tool), what)?;
        }
        for tool in ["qemu-system-x86_64", "cpio"] {
            if which(tool).is_none() {
                bail!("{tool} not found: {PREPARE}");
            }
        }
        Ok(Host {
            kernel,
            modules,
            virtiofsd,
        })
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// L1's serial console and how long L1 ran.
#[derive(Debug)]
pub struct Run {
    /// Everything L1 printed on ttyS0 (kernel warnings, the command's output).
    pub console: String,
    /// From QEMU's start to its exit.
    pub elapsed: Duration,
}

impl Run {
    /// The command's exit status (`RIG: END rc=<n>`), if L1 got that far.
    pub fn rc(&self) -> Option<i32> {
        self.console
            .lines()
            .find_map(|l| {
                l.split_once("RIG: END rc=")
                    .map(|(_, rc)| rc.trim().parse().ok())
            })
            .flatten()
    }

    /// Seconds from L1's kernel start to the command's start (`RIG: BEGIN up <s>`).
    pub fn boot_seconds(&self) -> Option<f64> {
        self.console.lines().find_map(|l| {
            l.split_once("RIG: BEGIN up ")
                .and_then(|(_, s)| s.trim().parse().ok())
        })
    }
}

/// Kills a child (virtiofsd, QEMU) when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The host directories under /tmp that L1 must see through its own tmpfs /tmp: the
/// workspace (and with it the test and isolad binaries in its target dir) when the
/// checkout lives in /tmp, as a CI clone may.
fn tmp_binds() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(ws) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        dirs.push(ws.to_path_buf());
    }
    // The running test binary: <target>/<profile>/deps/<name>.
    if let Ok(exe) = std::env::current_exe() {
        if let Some(target) = exe.ancestors().nth(3) {
            dirs.push(target.to_path_buf());
        }
    }
    dirs.retain(|d| d.starts_with("/tmp") && d != Path::new("/tmp"));
    dirs.sort();
    dirs.dedup();
    // A directory inside another one already bound comes with it.
    let all = dirs.clone();
    dirs.retain(|d| !all.iter().any(|o| o != d && d.starts_with(o)));
    dirs
}

fn init_script(binds: &[PathBuf]) -> String {
    let modules: Vec<&str> = MODULES
        .iter()
        .filter_map(|m| m.rsplit('/').next())
        .collect();
    let binds: String = binds
        .iter()
        .map(|d| {
            let d = d.display();
            format!(
                "mkdir -p '/newroot{d}' && mount -o bind '/lower{d}' '/newroot{d}' || fail \"binding {d}\"\n"
            )
        })
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() {{ echo "RIG: L1 init: $*"; echo "RIG: END rc=255"; poweroff -f; }}
for m in {modules}; do insmod /modules/$m.ko || fail "insmod $m"; done
mount -t virtiofs -o ro root /lower || fail "mounting the host's / (virtiofs)"
mount -t tmpfs -o mode=755 upper /upper
mkdir -p /upper/u /upper/w
mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay /newroot || fail "overlay"
# /tmp of its own: the agents' overlay snapshots cannot have an overlay as upper.
mount -t tmpfs -o mode=1777 tmp /newroot/tmp
{binds}cp -a /rig/. /newroot/ || fail "copying the rig's units"
# systemd takes a /.dockerenv for a container (and then ignores the kernel command line).
rm -f /newroot/.dockerenv /newroot/run/.containerenv
umount /proc /sys /dev
exec switch_root /newroot /lib/systemd/systemd --unit=isola-rig.target --show-status=0
"#,
        modules = modules.join(" "),
        binds = binds
    )
}

fn run_script(command: &str) -> String {
    format!(
        r#"exec >/dev/ttyS0 2>&1
echo "RIG: BEGIN up $(cut -d' ' -f1 /proc/uptime)"
export ISOLA_L1=1 HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
cd /tmp
{command}
echo "RIG: END rc=$?"
systemctl poweroff -ff
"#
    )
}

const TARGET: &str = "[Unit]
Description=isola L1 rig
Requires=basic.target isola-rig.service
After=basic.target isola-rig.service
AllowIsolate=yes
";

const SERVICE: &str = "[Unit]
Description=isola L1 rig command
After=basic.target dbus.socket
[Service]
Type=oneshot
ExecStart=/bin/sh /etc/isola-rig/run.sh
";

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Builds L1's initramfs in `dir` to run `command` (a shell command line).
fn pack(host: &Host, dir: &Path, command: &str) -> anyhow::Result<PathBuf> {
    let root = dir.join("initramfs");
    for d in [
        "bin", "modules", "proc", "sys", "dev", "lower", "upper", "newroot",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("copying busybox")?;
    for m in MODULES {
        let name = m.rsplit('/').next().unwrap_or(m);
        std::fs::copy(
            host.modules.join(format!("{m}.ko")),
            root.join("modules").join(format!("{name}.ko")),
        )
        .with_context(|| format!("copying {m}.ko"))?;
    }
    let init = root.join("init");
    write(&init, &init_script(&tmp_binds()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;

    // What the initramfs copies over L1's root.
    let etc = root.join("rig/etc");
    let units = etc.join("systemd/system");
    write(&units.join("isola-rig.target"), TARGET)?;
    write(&units.join("isola-rig.service"), SERVICE)?;
    for u in MASKED {
        std::os::unix::fs::symlink("/dev/null", units.join(u))?;
    }
    let generators = etc.join("systemd/system-generators");
    std::fs::create_dir_all(&generators)?;
    if let Ok(d) = std::fs::read_dir("/lib/systemd/system-generators") {
        for g in d.flatten() {
            std::os::unix::fs::symlink("/dev/null", generators.join(g.file_name()))?;
        }
    }
    write(&etc.join("fstab"), "")?;
    write(&etc.join("isola-rig/run.sh"), &run_script(command))?;

    let cpio = dir.join("l1.cpio");
    let out = std::fs::File::create(&cpio)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet")
        .current_dir(&root)
        .stdout(out)
        .status()
        .context("cpio")?;
    if !status.success() {
        bail!("packing L1's initramfs with cpio failed: {status}");
    }
    Ok(cpio)
}

/// Boots L1, runs `command` in it as root (in `isola-rig.service`, cwd /tmp, with
/// `ISOLA_L1=1`), and returns its console once L1 has powered off; fails when L1 does
/// not finish within `timeout` (QEMU is killed).
pub fn run(command: &str, timeout: Duration) -> anyhow::Result<Run> {
    run_with(command, "", timeout)
}

/// As [`run`], with `kernel_args` added to L1's kernel command line (e.g.
/// `systemd.unified_cgroup_hierarchy=0` for systemd on cgroup v1).
pub fn run_with(command: &str, kernel_args: &str, timeout: Duration) -> anyhow::Result<Run> {
    let host = Host::find()?;
    let dir = tempfile::Builder::new().prefix("isola-l1").tempdir()?;
    let initramfs = pack(&host, dir.path(), command)?;
    let socket = dir.path().join("virtiofsd.sock");
    let virtiofsd_log = std::fs::File::create(dir.path().join("virtiofsd.log"))?;
    let _virtiofsd = Reaped(
        Command::new(&host.virtiofsd)
            .arg("--socket-path")
            .arg(&socket)
            .args([
                "--shared-dir",
                "/",
                "--readonly",
                "--sandbox",
                "none",
                "--cache",
                "auto",
                // Overlayfs cannot use a lower layer with submounts (EREMOTE).
                "--no-announce-submounts",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(virtiofsd_log)
            .spawn()
            .with_context(|| format!("starting {}", host.virtiofsd.display()))?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.path().join("virtiofsd.log")).unwrap_or_default();
            bail!("virtiofsd made no socket within 10s:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let console = dir.path().join("console.log");
    let started = Instant::now();
    let mut qemu = Reaped(
        Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-cpu", "max", "-M", "q35", "-m", "2048"])
            .args(["-smp", "2", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-no-reboot"])
            // virtio-fs needs guest memory shared with virtiofsd.
            .args(["-object", "memory-backend-memfd,id=mem,size=2048M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=fs,path={}", socket.display()))
            .args(["-device", "vhost-user-fs-pci,chardev=fs,tag=root"])
            .arg("-kernel")
            .arg(&host.kernel)
            .arg("-initrd")
            .arg(&initramfs)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet panic=-1 tsc_early_khz=2000000 rdinit=/init {kernel_args}"
            ))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64")?,
    );
    let status = loop {
        if let Some(status) = qemu.0.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = qemu.0.kill();
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            bail!("L1 did not finish within {timeout:?}; its console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = qemu.0.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        bail!("L1's QEMU exited with {status}: {err}\nconsole:\n{text}");
    }
    Ok(Run {
        console: text,
        elapsed: started.elapsed(),
    })
}
