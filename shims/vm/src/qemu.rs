//! The QEMU backend: Debian's `qemu-system-x86_64 -M microvm`, driven over QMP.
//!
//! Devices sit on virtio-mmio: the serial console goes to a log file, the agent channel
//! is a virtio-console port on a unix socket that we listen on (QEMU connects as a
//! client at start, so the channel exists before the guest boots), virtio-net takes a TAP
//! as an inherited fd, and virtio-fs is a vhost-user-fs device served by one virtiofsd
//! per share. Guest RAM is a shared memfd so that virtiofsd can map it.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tracing::{debug, info, info_span, warn};

use crate::agent::AgentClient;
use crate::hypervisor::{
    agent_client, check_device, check_file, wait_child, Device, Hypervisor, VmConfig, VmError,
    VmExit,
};
use crate::qmp::QmpClient;
use crate::select::{Accel, Backend, Selection};

/// How long QEMU gets to connect its sockets after launch.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Default timeout of guest agent calls.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Running,
    Ended,
}

/// One VM run by QEMU.
#[derive(Debug)]
pub struct QemuVm {
    selection: Selection,
    config: VmConfig,
    devices: Vec<Device>,
    prepared: bool,
    state: State,
    qemu: Option<Child>,
    helpers: Vec<Child>,
    qmp: Option<QmpClient>,
    agent_stream: Option<UnixStream>,
    sockets: Vec<PathBuf>,
    launched_at: Option<Instant>,
    exit: Option<VmExit>,
}

impl QemuVm {
    /// A VM for `config`, run by QEMU as `selection` says.
    pub fn new(selection: Selection, config: VmConfig) -> Self {
        Self {
            selection,
            config,
            devices: Vec::new(),
            prepared: false,
            state: State::Created,
            qemu: None,
            helpers: Vec::new(),
            qmp: None,
            agent_stream: None,
            sockets: Vec::new(),
            launched_at: None,
            exit: None,
        }
    }

    /// When QEMU was launched (for boot timing).
    pub fn launched_at(&self) -> Option<Instant> {
        self.launched_at
    }

    fn accel(&self) -> Accel {
        match self.selection.backend {
            Backend::Qemu { accel } => accel,
            Backend::Builtin => Accel::Tcg,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.config.run_dir.join(name)
    }

    /// The kernel command line QEMU passes (before its own `virtio_mmio.device=` words).
    pub fn kernel_cmdline(&self) -> String {
        let mut words = Vec::new();
        // QEMU's virtio-mmio offers 1024-entry queues, and virtio-console fills each
        // receive queue with a 4 KiB buffer per entry (8 MiB of guest memory for the
        // control queue and the agent port); the guest kernel's virtio_mmio caps the size
        // (deploy/guest/patches/0001-virtio_mmio-max_queue_size.patch). 128: 1 MiB of
        // console buffers, 1.3 MiB less per idle pod than 256 and no slower in
        // tests/bench/compare.sh (docs/benchmarks.md).
        words.push("virtio_mmio.max_queue_size=128");
        if self.accel() == Accel::Tcg {
            // Without it the TCG guest hangs at "tsc: Marking TSC unstable".
            words.push("tsc_early_khz=2000000");
        }
        crate::hypervisor::kernel_cmdline(&words, &self.config.extra_cmdline)
    }

    /// QEMU's arguments, with `fs_sockets[i]` for the i-th virtio-fs device.
    fn qemu_args(&self, fs_sockets: &[PathBuf]) -> Vec<String> {
        let c = &self.config;
        let mem = c.memory_mib;
        let mut args: Vec<String> = vec![
            "-M".into(),
            format!(
                "microvm,acpi={},rtc=on,memory-backend=mem",
                if c.acpi { "on" } else { "off" }
            ),
            "-accel".into(),
            match self.accel() {
                Accel::Kvm => "kvm".into(),
                // TCG's translation cache grows to 1 GiB by default, and every MiB of
                // it is host memory: capped by the class (12 MiB by default).
                Accel::Tcg => format!("tcg,tb-size={}", self.config.tcg_tb_mib.max(1)),
            },
        ];
        if self.accel() == Accel::Kvm {
            args.extend(["-cpu".into(), "host".into()]);
        }
        args.extend([
            "-smp".into(),
            c.vcpus.to_string(),
            "-m".into(),
            format!("{mem}M"),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            // QEMU's seccomp filter: no obsolete syscalls, no setuid, no fork/exec (the TAP
            // comes as an fd, there are no helper scripts), no scheduler/affinity changes.
            "-sandbox".into(),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
            "-kernel".into(),
            c.kernel.display().to_string(),
            "-initrd".into(),
            c.initramfs.display().to_string(),
            "-append".into(),
            self.kernel_cmdline(),
            "-serial".into(),
            format!("file:{}", self.console_log_path().display()),
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                self.path("qmp.sock").display()
            ),
            "-device".into(),
            "virtio-serial-device,max_ports=2".into(),
            "-chardev".into(),
            format!("socket,id=agent,path={}", self.path("agent.sock").display()),
            "-device".into(),
            format!(
                "virtserialport,chardev=agent,name={}",
                isola_guest::AGENT_PORT_NAME
            ),
        ]);
        if c.free_page_reporting {
            // Pages the guest frees are reported in 2 MiB blocks (or the guest's
            // page_reporting.page_reporting_order) and QEMU punches them out of the memfd.
            args.push("-device".into());
            args.push("virtio-balloon-device,free-page-reporting=on".into());
        }
        let mut fs_index = 0;
        for (i, dev) in self.devices.iter().enumerate() {
            match dev {
                Device::Net { tap, mac } => {
                    args.push("-netdev".into());
                    args.push(format!("tap,id=net{i},fd={},vhost=off", tap.as_raw_fd()));
                    args.push("-device".into());
                    let mut d = format!("virtio-net-device,netdev=net{i}");
                    if let Some(mac) = mac {
                        d.push_str(&format!(",mac={mac}"));
                    }
                    args.push(d);
                }
                Device::Block { path, read_only } => {
                    // QEMU option values escape a comma by doubling it.
                    let file = path.display().to_string().replace(',', ",,");
                    let ro = if *read_only { "on" } else { "off" };
                    args.push("-drive".into());
                    args.push(format!(
                        "file={file},if=none,id=blk{i},format=raw,readonly={ro}"
                    ));
                    args.push("-device".into());
                    args.push(format!("virtio-blk-device,drive=blk{i}"));
                }
                Device::Fs { tag, .. } => {
                    if let Some(sock) = fs_sockets.get(fs_index) {
                        args.push("-chardev".into());
                        args.push(format!("socket,id=fs{fs_index},path={}", sock.display()));
                        args.push("-device".into());
                        args.push(format!(
                            "vhost-user-fs-device,chardev=fs{fs_index},tag={tag}"
                        ));
                    }
                    fs_index += 1;
                }
            }
        }
        args
    }

    fn launch(&mut self) -> Result<(), VmError> {
        let run_dir = self.config.run_dir.clone();
        let agent_sock = self.path("agent.sock");
        let _ = std::fs::remove_file(&agent_sock);
        let listener = UnixListener::bind(&agent_sock)
            .map_err(|e| VmError::io(format!("bind {}", agent_sock.display()), e))?;
        self.sockets.push(agent_sock);
        listener
            .set_nonblocking(true)
            .map_err(|e| VmError::io("agent listener", e))?;

        let mut fs_sockets = Vec::new();
        let shares: Vec<(String, PathBuf)> = self
            .devices
            .iter()
            .filter_map(|d| match d {
                Device::Fs { tag, shared_dir } => Some((tag.clone(), shared_dir.clone())),
                Device::Net { .. } | Device::Block { .. } => None,
            })
            .collect();
        for (i, (tag, dir)) in shares.iter().enumerate() {
            let sock = run_dir.join(format!("fs{i}.sock"));
            self.sockets.push(sock.clone());
            let log = run_dir.join(format!("virtiofsd-{i}.log"));
            debug!(tag, dir = %dir.display(), "starting virtiofsd");
            let child = crate::virtiofsd::spawn(&self.config.virtiofsd_binary, &sock, dir, &log)?;
            self.helpers.push(child);
            fs_sockets.push(sock);
        }

        let args = self.qemu_args(&fs_sockets);
        debug!(?args, "launching qemu");
        let qemu_log = self.path("qemu.log");
        let log = std::fs::File::create(&qemu_log)
            .map_err(|e| VmError::io(format!("create {}", qemu_log.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| VmError::io("dup qemu log", e))?;
        let tap_fds: Vec<i32> = self
            .devices
            .iter()
            .filter_map(|d| match d {
                Device::Net { tap, .. } => Some(tap.as_raw_fd()),
                Device::Fs { .. } | Device::Block { .. } => None,
            })
            .collect();
        let mut cmd = Command::new(&self.config.qemu_binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl
        // and fcntl, which are async-signal-safe; it touches no memory shared with the
        // parent.
        unsafe {
            cmd.pre_exec(move || {
                // A VM must not outlive its owner (the pod's shim, killed or crashed):
                // the kernel kills QEMU when the spawning thread ends.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for fd in &tap_fds {
                    // Keep the TAP across exec: QEMU gets it as `-netdev tap,fd=N`.
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| VmError::io(format!("spawn {}", self.config.qemu_binary.display()), e))?;
        self.launched_at = Some(Instant::now());
        info!(pid = child.id(), "qemu launched");
        self.qemu = Some(child);
        self.state = State::Running;

        // QEMU connects the agent chardev while it sets up, before the guest runs.
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(VmError::io("accept agent channel", e)),
            }
            self.check_alive("connecting the agent channel", deadline)?;
            std::thread::sleep(Duration::from_millis(2));
        };
        stream
            .set_nonblocking(false)
            .map_err(|e| VmError::io("agent channel", e))?;
        self.agent_stream = Some(stream);

        let qmp_sock = self.path("qmp.sock");
        self.sockets.push(qmp_sock.clone());
        let qmp = loop {
            match QmpClient::connect(&qmp_sock, Duration::from_secs(10)) {
                Ok(q) => break q,
                Err(crate::qmp::QmpError::Io(_)) => {}
                Err(e) => return Err(e.into()),
            }
            self.check_alive("connecting QMP", deadline)?;
            std::thread::sleep(Duration::from_millis(2));
        };
        self.qmp = Some(qmp);
        let status = self.qmp.as_mut().map(|q| q.status()).transpose()?;
        debug!(?status, "qemu running");
        Ok(())
    }

    /// Fails if QEMU has exited (with what its end says) or the deadline passed.
    fn check_alive(&mut self, what: &'static str, deadline: Instant) -> Result<(), VmError> {
        if let Some(status) = self.qemu.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            self.qemu = None;
            return match self.finish(status) {
                Ok(_) => Err(VmError::Helper {
                    what: "qemu",
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

    /// Tears down what QEMU left (helpers, sockets) and turns its exit into a result.
    fn finish(&mut self, status: ExitStatus) -> Result<VmExit, VmError> {
        self.state = State::Ended;
        self.qmp = None;
        self.agent_stream = None;
        self.reap_helpers();
        self.remove_sockets();
        let exit = VmExit { status };
        self.exit = Some(exit.clone());
        let log = self.console_log_path();
        if let Some(line) = crate::console::find_panic(&log) {
            warn!(%line, "guest panicked");
            return Err(VmError::GuestPanic { line, log });
        }
        if !status.success() {
            return Err(VmError::VmmFailed {
                status,
                detail: crate::console::tail(&self.path("qemu.log"), 5),
            });
        }
        info!(%status, "vm ended");
        Ok(exit)
    }

    fn reap_helpers(&mut self) {
        // virtiofsd exits by itself once QEMU disconnects; give it a moment, then kill.
        let deadline = Instant::now() + Duration::from_secs(2);
        for mut child in self.helpers.drain(..) {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        crate::virtiofsd::kill(&mut child);
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
    }

    fn remove_sockets(&mut self) {
        for s in self.sockets.drain(..) {
            let _ = std::fs::remove_file(s);
        }
    }

    fn kill_all(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            let _ = q.kill();
            if let Ok(status) = q.wait() {
                self.exit = Some(VmExit { status });
            }
        }
        for mut h in self.helpers.drain(..) {
            crate::virtiofsd::kill(&mut h);
        }
        self.qmp = None;
        self.agent_stream = None;
        self.remove_sockets();
        self.state = State::Ended;
    }
}

fn check_binary(what: &'static str, path: &Path, hint: &'static str) -> Result<(), VmError> {
    let found = if path.components().count() > 1 {
        path.is_file()
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(path).is_file()))
            .unwrap_or(false)
    };
    if found {
        Ok(())
    } else {
        Err(VmError::MissingBinary {
            what,
            path: path.into(),
            hint,
        })
    }
}

impl Hypervisor for QemuVm {
    fn selection(&self) -> &Selection {
        &self.selection
    }

    fn prepare(&mut self) -> Result<(), VmError> {
        check_file("kernel", &self.config.kernel)?;
        check_file("initramfs", &self.config.initramfs)?;
        check_binary(
            "qemu",
            &self.config.qemu_binary,
            "apt-get install qemu-system-x86",
        )?;
        std::fs::create_dir_all(&self.config.run_dir)
            .map_err(|e| VmError::io(format!("create {}", self.config.run_dir.display()), e))?;
        self.prepared = true;
        Ok(())
    }

    fn add_device(&mut self, device: Device) -> Result<(), VmError> {
        if self.state != State::Created {
            return Err(VmError::State("devices can only be added before start"));
        }
        if matches!(device, Device::Fs { .. }) {
            check_binary(
                "virtiofsd",
                &self.config.virtiofsd_binary,
                "run deploy/guest/build-assets.sh (cargo install virtiofsd --locked)",
            )?;
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
            self.kill_all();
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
        self.qemu
            .iter()
            .chain(self.helpers.iter())
            .map(Child::id)
            .collect()
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<VmExit, VmError> {
        if self.state == State::Ended {
            return self
                .exit
                .clone()
                .ok_or(VmError::State("the VM ended without an exit status"));
        }
        let qemu = self
            .qemu
            .as_mut()
            .ok_or(VmError::State("the VM was not started"))?;
        let status = wait_child(qemu, "qemu", timeout)?;
        self.qemu = None;
        self.finish(status)
    }

    fn stop(&mut self, grace: Duration) -> Result<VmExit, VmError> {
        if self.state != State::Running {
            return self.wait(None);
        }
        if let Some(qmp) = self.qmp.as_mut() {
            if let Err(e) = qmp.quit() {
                debug!(%e, "qmp quit failed; killing qemu");
            }
        }
        match self.wait(Some(grace)) {
            Err(VmError::Timeout(..)) => {
                warn!("qemu did not quit in {grace:?}; killing it");
                self.kill_all();
                self.reap_helpers();
                self.exit
                    .clone()
                    .ok_or(VmError::State("the VM ended without an exit status"))
            }
            // Asked to quit: a non-zero status is still a stop, a panic is still a panic.
            Err(VmError::VmmFailed { status, .. }) => Ok(VmExit { status }),
            other => other,
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if self.state == State::Running || !self.helpers.is_empty() || !self.sockets.is_empty() {
            self.kill_all();
        }
    }
}
