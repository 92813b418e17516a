//! The builtin backend: isola's own VMM (`shims/vmm`, binary `isola-vmm`) on KVM.
//!
//! The VMM runs as a child process, not in the shim: its vCPU, event-loop and main
//! threads each install a seccomp allow-list that the shim (async gRPC, spawning, mounts)
//! could never live under; a fault in device emulation takes down the VM, not the shim;
//! and its life is that of a process, as with QEMU (pids, wait, kill). The VMM listens on
//! the agent socket in the run directory; TAPs are inherited fds; virtio-fs shares are
//! served by a virtiofsd the VMM starts (`--fs TAG=DIR`).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tracing::{debug, info, info_span, warn};

use crate::agent::AgentClient;
use crate::hypervisor::{
    agent_client, check_device, check_file, wait_child, Device, Hypervisor, VmConfig, VmError,
    VmExit,
};
use crate::select::Selection;

/// How long the VMM gets to build the VM and listen on the agent socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Default timeout of guest agent calls.
/// isola-vmm's exit status for a guest kernel panic.
const EXIT_PANIC: i32 = 2;

/// The `isola-vmm` binary: `$ISOLA_VMM`, else beside the running executable, else on
/// PATH, else /usr/local/bin/isola-vmm.
pub fn vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ISOLA_VMM") {
        return p.into();
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("isola-vmm")));
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("isola-vmm"))
            .find(|p| p.is_file())
    });
    beside
        .filter(|p| p.is_file())
        .or(on_path)
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin/isola-vmm"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Running,
    Ended,
}

/// One VM run by `isola-vmm`.
#[derive(Debug)]
pub struct BuiltinVm {
    selection: Selection,
    config: VmConfig,
    devices: Vec<Device>,
    binary: PathBuf,
    prepared: bool,
    state: State,
    vmm: Option<Child>,
    agent_stream: Option<UnixStream>,
    launched_at: Option<Instant>,
    exit: Option<VmExit>,
}

impl BuiltinVm {
    /// A VM for `config`, run by `isola-vmm`.
    pub fn new(selection: Selection, config: VmConfig) -> Self {
        Self {
            selection,
            config,
            devices: Vec::new(),
            binary: vmm_binary(),
            prepared: false,
            state: State::Created,
            vmm: None,
            agent_stream: None,
            launched_at: None,
            exit: None,
        }
    }

    /// When the VMM was launched (for boot timing).
    pub fn launched_at(&self) -> Option<Instant> {
        self.launched_at
    }

    fn path(&self, name: &str) -> PathBuf {
        self.config.run_dir.join(name)
    }

    /// The guest's command line: as the QEMU backend's under KVM (no TSC hint needed).
    pub fn kernel_cmdline(&self) -> String {
        crate::hypervisor::kernel_cmdline(&[], &self.config.extra_cmdline)
    }

    /// `isola-vmm`'s arguments.
    pub fn vmm_args(&self) -> Vec<String> {
        let c = &self.config;
        let mut args = vec![
            "--kernel".into(),
            c.kernel.display().to_string(),
            "--initramfs".into(),
            c.initramfs.display().to_string(),
            "--vcpus".into(),
            c.vcpus.to_string(),
            "--mem-mib".into(),
            c.memory_mib.to_string(),
            "--cmdline".into(),
            self.kernel_cmdline(),
            "--serial-log".into(),
            self.console_log_path().display().to_string(),
            "--agent-socket".into(),
            self.path("agent.sock").display().to_string(),
        ];
        let mut mac_given = false;
        for dev in &self.devices {
            match dev {
                Device::Net { tap, mac } => {
                    args.push("--tap-fd".into());
                    args.push(tap.as_raw_fd().to_string());
                    // isola-vmm takes one --mac, for its first network device.
                    if let (Some(mac), false) = (mac, mac_given) {
                        args.push("--mac".into());
                        args.push(mac.clone());
                        mac_given = true;
                    }
                }
                Device::Block { path, read_only } => {
                    args.push("--blk".into());
                    let ro = if *read_only { ",ro" } else { "" };
                    args.push(format!("{}{ro}", path.display()));
                }
                Device::Fs { tag, shared_dir } => {
                    args.push("--fs".into());
                    args.push(format!("{tag}={}", shared_dir.display()));
                }
            }
        }
        args
    }

    fn launch(&mut self) -> Result<(), VmError> {
        let socket = self.path("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let log_path = self.path("vmm.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| VmError::io(format!("create {}", log_path.display()), e))?;
        let log_err = log.try_clone().map_err(|e| VmError::io("dup vmm log", e))?;
        let tap_fds: Vec<i32> = self
            .devices
            .iter()
            .filter_map(|d| match d {
                Device::Net { tap, .. } => Some(tap.as_raw_fd()),
                Device::Block { .. } | Device::Fs { .. } => None,
            })
            .collect();
        let args = self.vmm_args();
        debug!(?args, "launching isola-vmm");
        let mut cmd = Command::new(&self.binary);
        cmd.args(&args)
            .env("ISOLA_VIRTIOFSD", &self.config.virtiofsd_binary)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: the closure runs in the forked child before exec and only calls fcntl
        // and prctl, which are async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &tap_fds {
                    // Keep the TAP across exec: the VMM gets it as --tap-fd N.
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // The VM dies with the thread that started it (the shim's).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| VmError::io(format!("spawn {}", self.binary.display()), e))?;
        self.launched_at = Some(Instant::now());
        info!(pid = child.id(), "isola-vmm launched");
        self.vmm = Some(child);
        self.state = State::Running;

        // The VMM listens once the VM is built, before the guest runs.
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => return Err(VmError::io("connect the agent channel", e)),
            }
            self.check_alive("connecting the agent channel", deadline)?;
            std::thread::sleep(Duration::from_millis(2));
        };
        self.agent_stream = Some(stream);
        Ok(())
    }

    fn check_alive(&mut self, what: &'static str, deadline: Instant) -> Result<(), VmError> {
        if let Some(status) = self.vmm.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            self.vmm = None;
            return match self.finish(status) {
                Ok(_) => Err(VmError::Helper {
                    what: "isola-vmm",
                    detail: format!("exited ({status}) while {what}"),
                }),
                Err(e) => Err(e),
            };
        }
        if Instant::now() >= deadline {
            return Err(VmError::Timeout(CONNECT_TIMEOUT, what));
        }
        Ok(())
    }

    /// Turns the VMM's exit into a result: 0 is a poweroff, 2 a guest panic.
    fn finish(&mut self, status: ExitStatus) -> Result<VmExit, VmError> {
        self.state = State::Ended;
        self.agent_stream = None;
        let _ = std::fs::remove_file(self.path("agent.sock"));
        let exit = VmExit { status };
        self.exit = Some(exit.clone());
        let log = self.console_log_path();
        if let Some(line) = crate::console::find_panic(&log) {
            warn!(%line, "guest panicked");
            return Err(VmError::GuestPanic { line, log });
        }
        if status.code() == Some(EXIT_PANIC) {
            return Err(VmError::GuestPanic {
                line: crate::console::tail(&self.path("vmm.log"), 1),
                log,
            });
        }
        if !status.success() {
            return Err(VmError::VmmFailed {
                status,
                detail: crate::console::tail(&self.path("vmm.log"), 5),
            });
        }
        info!(%status, "vm ended");
        Ok(exit)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.vmm.take() {
            let _ = c.kill();
            if let Ok(status) = c.wait() {
                self.exit = Some(VmExit { status });
            }
        }
        self.agent_stream = None;
        let _ = std::fs::remove_file(self.path("agent.sock"));
        self.state = State::Ended;
    }
}

/// The child pids of every thread of `pid` (/proc/PID/task/TID/children).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

impl Hypervisor for BuiltinVm {
    fn selection(&self) -> &Selection {
        &self.selection
    }

    fn prepare(&mut self) -> Result<(), VmError> {
        check_file("kernel", &self.config.kernel)?;
        check_file("initramfs", &self.config.initramfs)?;
        if !self.binary.is_file() {
            return Err(VmError::MissingBinary {
                what: "isola-vmm",
                path: self.binary.clone(),
                hint: "cargo build --release -p isola-vmm (or set ISOLA_VMM)",
            });
        }
        std::fs::create_dir_all(&self.config.run_dir)
            .map_err(|e| VmError::io(format!("create {}", self.config.run_dir.display()), e))?;
        self.prepared = true;
        Ok(())
    }

    fn add_device(&mut self, device: Device) -> Result<(), VmError> {
        if self.state != State::Created {
            return Err(VmError::State("devices can only be added before start"));
        }
        check_device(&device)?;
        self.devices.push(device);
        Ok(())
    }

    fn start(&mut self) -> Result<(), VmError> {
        let span = info_span!("vm_start", id = %self.config.id, backend = %self.selection.backend);
        let _guard = span.enter();
        if self.state != State::Created {
            return Err(VmError::State("a VM starts once"));
        }
        if !self.prepared {
            self.prepare()?;
        }
        info!(reason = %self.selection.reason, "starting vm");
        let result = self.launch();
        if result.is_err() && self.state != State::Ended {
            self.kill();
        }
        result
    }

    fn agent(&mut self) -> Result<AgentClient, VmError> {
        agent_client(self.agent_stream.as_ref())
    }

    fn console_log_path(&self) -> PathBuf {
        self.path("console.log")
    }

    fn pids(&self) -> Vec<u32> {
        // The VMM and what it started: virtiofsd for --fs shares (and its sandboxed
        // worker), so that the shim can account for and confine all of them.
        let mut pids: Vec<u32> = self.vmm.iter().map(Child::id).collect();
        let mut i = 0;
        while i < pids.len() && pids.len() < 64 {
            pids.extend(children(pids[i]));
            i += 1;
        }
        pids
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<VmExit, VmError> {
        if self.state == State::Ended {
            return self
                .exit
                .clone()
                .ok_or(VmError::State("the VM ended without an exit status"));
        }
        let vmm = self
            .vmm
            .as_mut()
            .ok_or(VmError::State("the VM was not started"))?;
        let status = wait_child(vmm, "isola-vmm", timeout)?;
        self.vmm = None;
        self.finish(status)
    }

    fn stop(&mut self, grace: Duration) -> Result<VmExit, VmError> {
        if self.state != State::Running {
            return self.wait(None);
        }
        if let Some(c) = self.vmm.as_ref() {
            // SIGTERM ends isola-vmm at once (no handler): the guest is gone with it.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        match self.wait(Some(grace)) {
            Err(VmError::Timeout(..)) => {
                warn!("isola-vmm did not stop in {grace:?}; killing it");
                self.kill();
                self.exit
                    .clone()
                    .ok_or(VmError::State("the VM ended without an exit status"))
            }
            Err(VmError::VmmFailed { status, .. }) => Ok(VmExit { status }),
            other => other,
        }
    }
}

impl Drop for BuiltinVm {
    fn drop(&mut self) {
        if self.state == State::Running {
            self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::Backend;
    use std::path::Path;

    fn selection() -> Selection {
        Selection {
            backend: Backend::Builtin,
            reason: "test".into(),
        }
    }

    #[test]
    fn passes_devices_as_flags() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, [0u8; 512]).unwrap();
        let mut config = VmConfig::new("t", Path::new("/k"), Path::new("/i"), dir.path());
        config.vcpus = 2;
        config.extra_cmdline = "isola.debug=1".into();
        let mut vm = BuiltinVm::new(selection(), config);
        let tap: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let fd = tap.as_raw_fd();
        vm.add_device(Device::Net {
            tap,
            mac: Some("02:00:00:00:00:09".into()),
        })
        .unwrap();
        vm.add_device(Device::Block {
            path: disk.clone(),
            read_only: true,
        })
        .unwrap();
        vm.add_device(Device::Fs {
            tag: "share".into(),
            shared_dir: dir.path().into(),
        })
        .unwrap();
        let args = vm.vmm_args().join(" ");
        assert!(args.contains("--vcpus 2 --mem-mib 256"), "{args}");
        assert!(
            args.contains(&format!("--tap-fd {fd} --mac 02:00:00:00:00:09")),
            "{args}"
        );
        assert!(
            args.contains(&format!("--blk {},ro", disk.display())),
            "{args}"
        );
        assert!(
            args.contains(&format!("--fs share={}", dir.path().display())),
            "{args}"
        );
        assert!(args.contains("percpu_alloc=page isola.debug=1"), "{args}");
        let missing = vm.add_device(Device::Block {
            path: dir.path().join("nope"),
            read_only: false,
        });
        assert!(missing.is_err());
    }

    #[test]
    fn lists_children_of_a_process() {
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        assert!(children(std::process::id()).contains(&child.id()));
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn missing_assets_fail_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let config = VmConfig::new(
            "t",
            &dir.path().join("vmlinux"),
            &dir.path().join("initramfs"),
            &dir.path().join("run"),
        );
        let mut vm = BuiltinVm::new(selection(), config);
        let err = vm.start().unwrap_err();
        assert!(
            matches!(err, VmError::MissingAsset { what: "kernel", .. }),
            "{err}"
        );
        assert!(vm.pids().is_empty());
    }
}
