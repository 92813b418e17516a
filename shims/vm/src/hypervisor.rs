//! The hypervisor layer's one trait, its VM config, devices and errors.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crate::agent::{AgentClient, AgentError};
use crate::select::{SelectError, Selection};

/// Everything a backend needs to boot one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Names the VM in logs (the pod sandbox id).
    pub id: String,
    /// Guest kernel: an ELF vmlinux with the PVH note, or a bzImage.
    pub kernel: PathBuf,
    /// Guest initramfs (cpio newc, optionally gzip).
    pub initramfs: PathBuf,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Words appended to the kernel command line.
    pub extra_cmdline: String,
    /// Directory for sockets and logs of this VM; created if missing. Sockets are removed
    /// when the VM ends; logs stay.
    pub run_dir: PathBuf,
    /// Describe devices through ACPI instead of the command line: for kernels that cannot
    /// take `virtio_mmio.device=` (e.g. Debian's cloud kernel).
    pub acpi: bool,
    /// The QEMU binary.
    pub qemu_binary: PathBuf,
    /// The virtiofsd binary, used when a [`Device::Fs`] is added.
    pub virtiofsd_binary: PathBuf,
    /// QEMU's TCG translation cache in MiB (only without hardware virtualisation): host
    /// memory per VM against start-up and exec speed (12 MiB: an idle pod in 62 MiB here,
    /// ≈4.5 MiB less than 16 for ≈15% slower exec; QEMU's default is 1 GiB).
    pub tcg_tb_mib: u32,
    /// A virtio-balloon device with free page reporting: the guest hands pages it frees
    /// back to the host (the VMM discards them), so host memory follows what the guest
    /// uses, not the most it ever touched. The balloon is never inflated.
    pub free_page_reporting: bool,
}

impl VmConfig {
    /// A config with the defaults: 1 vCPU, 256 MiB, QEMU and virtiofsd from PATH.
    pub fn new(id: &str, kernel: &Path, initramfs: &Path, run_dir: &Path) -> Self {
        Self {
            id: id.into(),
            kernel: kernel.into(),
            initramfs: initramfs.into(),
            vcpus: 1,
            memory_mib: 256,
            extra_cmdline: String::new(),
            run_dir: run_dir.into(),
            acpi: false,
            qemu_binary: "qemu-system-x86_64".into(),
            virtiofsd_binary: crate::virtiofsd::default_binary(),
            tcg_tb_mib: 12,
            free_page_reporting: true,
        }
    }
}

/// A device added before start.
#[derive(Debug)]
pub enum Device {
    /// virtio-net backed by an open TAP device (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`).
    Net {
        /// The TAP's file descriptor; the VMM keeps its own copy.
        tap: OwnedFd,
        /// Guest MAC address (aa:bb:cc:dd:ee:ff), or the VMM's default.
        mac: Option<String>,
    },
    /// virtio-blk backed by a raw image file or block device; the guest sees
    /// `/dev/vda`, `/dev/vdb`, ... in the order the disks were added.
    Block {
        /// The image or device.
        path: PathBuf,
        /// Refuse guest writes.
        read_only: bool,
    },
    /// virtio-fs sharing a host directory under a tag (`mount -t virtiofs <tag> ...`).
    Fs {
        /// The mount tag the guest uses.
        tag: String,
        /// The host directory.
        shared_dir: PathBuf,
    },
}

/// How a VM ended.
#[derive(Debug, Clone)]
pub struct VmExit {
    /// The VMM process's exit status.
    pub status: ExitStatus,
}

/// Errors of the hypervisor layer.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Backend selection failed.
    #[error(transparent)]
    Select(#[from] SelectError),
    /// A guest asset (kernel, initramfs) is missing; nothing was started.
    #[error("guest {what} not found at {path}: build it with deploy/guest/build-assets.sh")]
    MissingAsset {
        /// "kernel", "initramfs" or "agent".
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A helper binary (qemu, virtiofsd) is missing; nothing was started.
    #[error("{what} not found ({path}): {hint}")]
    MissingBinary {
        /// The program.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// How to get it.
        hint: &'static str,
    },
    /// The call does not fit the VM's state (e.g. add_device after start).
    #[error("{0}")]
    State(&'static str),
    /// Local set-up failed (run dir, sockets, spawning).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A helper process failed to come up.
    #[error("{what} failed to start: {detail}")]
    Helper {
        /// The helper.
        what: &'static str,
        /// Its exit status or log tail.
        detail: String,
    },
    /// The QMP conversation failed.
    #[error(transparent)]
    Qmp(#[from] crate::qmp::QmpError),
    /// The guest kernel panicked; the line is from the console log.
    #[error("guest kernel panicked: {line} (console log: {log})")]
    GuestPanic {
        /// The panic line, e.g. "Kernel panic - not syncing: No working init found. ...".
        line: String,
        /// The console log.
        log: PathBuf,
    },
    /// The VMM exited with a failure status.
    #[error("VMM exited with {status}: {detail}")]
    VmmFailed {
        /// Its exit status.
        status: ExitStatus,
        /// The tail of its log.
        detail: String,
    },
    /// The VM did not end (or come up) in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The guest agent channel failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

impl VmError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

// What both backends (QEMU and isola-vmm, each a child process of the shim) check and do
// the same way.

/// The start of every guest's kernel command line, whichever the VMM.
///
/// - `reboot=t` (+ QEMU's `-no-reboot`, isola-vmm's exit on reset): a guest reset (our
///   poweroff, or `panic=-1`) ends the VMM.
/// - `percpu_alloc=page`: the default "embed" first chunk has 2 MiB units, and each
///   further percpu chunk of that size brings a 4 MiB array for memcg kmem accounting
///   (one `obj_cgroup` pointer per 4 bytes of unit: 512 Ki × 8 B, vmalloc'ed by
///   `pcpu_create_chunk`; seen in /proc/vmallocinfo): one such chunk is made in every
///   guest. Page-sized units shrink it to ~300 KiB: −4.1 MiB of host memory per idle vm
///   pod (tests/bench/compare.sh, docs/benchmarks.md).
pub(crate) const BASE_CMDLINE: &[&str] = &[
    "console=ttyS0",
    "quiet",
    "reboot=t",
    "panic=-1",
    "percpu_alloc=page",
];

/// `words` after [`BASE_CMDLINE`], then the class's `extra`, as one command line.
pub(crate) fn kernel_cmdline(words: &[&str], extra: &str) -> String {
    let mut all: Vec<&str> = BASE_CMDLINE.to_vec();
    all.extend_from_slice(words);
    if !extra.trim().is_empty() {
        all.push(extra.trim());
    }
    all.join(" ")
}

/// How long one guest agent call may take.
const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A guest asset (kernel, initramfs) must be a file.
pub(crate) fn check_file(what: &'static str, path: &Path) -> Result<(), VmError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(VmError::MissingAsset {
            what,
            path: path.into(),
        })
    }
}

/// What a device refers to on the host must exist before the VMM is asked to open it.
pub(crate) fn check_device(device: &Device) -> Result<(), VmError> {
    let missing = |what: String| {
        Err(VmError::io(
            what,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ))
    };
    match device {
        Device::Fs { tag, shared_dir } if !shared_dir.is_dir() => {
            missing(format!("virtio-fs share {tag}: {}", shared_dir.display()))
        }
        Device::Block { path, .. } if !path.exists() => {
            missing(format!("virtio-blk disk {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// A client on (a clone of) the VM's agent channel.
pub(crate) fn agent_client(stream: Option<&UnixStream>) -> Result<AgentClient, VmError> {
    let stream = stream
        .ok_or(VmError::State("the VM is not running"))?
        .try_clone()
        .map_err(|e| VmError::io("agent channel", e))?;
    Ok(AgentClient::new(stream, AGENT_CALL_TIMEOUT))
}

/// Waits for the VMM process to exit, at most `timeout` (None: for ever).
pub(crate) fn wait_child(
    child: &mut Child,
    what: &'static str,
    timeout: Option<Duration>,
) -> Result<ExitStatus, VmError> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => {}
            Err(e) => return Err(VmError::io(format!("wait for {what}"), e)),
        }
        if let Some(t) = timeout {
            if start.elapsed() >= t {
                return Err(VmError::Timeout(t, "the VM to end"));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One VM, driven by a backend (isola's own VMM or QEMU).
///
/// Life: [`prepare`](Self::prepare) checks assets and creates the run directory without
/// starting anything; [`add_device`](Self::add_device) queues devices;
/// [`start`](Self::start) boots; [`agent`](Self::agent) connects to the guest agent;
/// [`wait`](Self::wait) or [`stop`](Self::stop) end it. Dropping a VM kills whatever it
/// still runs and removes its sockets.
pub trait Hypervisor: Send {
    /// The backend and why it was chosen.
    fn selection(&self) -> &Selection;
    /// Checks kernel, initramfs and helper binaries and creates the run directory.
    fn prepare(&mut self) -> Result<(), VmError>;
    /// Adds a device; only before start.
    fn add_device(&mut self, device: Device) -> Result<(), VmError>;
    /// Boots the VM; returns once the VMM runs and the agent channel is connected.
    fn start(&mut self) -> Result<(), VmError>;
    /// A client of the guest agent on the VM's agent channel.
    fn agent(&mut self) -> Result<AgentClient, VmError>;
    /// The file that receives the guest's serial console.
    fn console_log_path(&self) -> PathBuf;
    /// Process ids of every host process this VM runs (VMM and helpers).
    fn pids(&self) -> Vec<u32>;
    /// Waits for the VM to end by itself; a guest panic is [`VmError::GuestPanic`].
    fn wait(&mut self, timeout: Option<Duration>) -> Result<VmExit, VmError>;
    /// Ends the VM now (asking the VMM to quit, killing it after `grace`).
    fn stop(&mut self, grace: Duration) -> Result<VmExit, VmError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_cmdline_is_the_base_then_the_backends_words_then_the_class() {
        assert_eq!(
            kernel_cmdline(&["virtio_mmio.max_queue_size=128"], " isola.debug=1 "),
            "console=ttyS0 quiet reboot=t panic=-1 percpu_alloc=page \
             virtio_mmio.max_queue_size=128 isola.debug=1"
        );
        assert_eq!(
            kernel_cmdline(&[], ""),
            "console=ttyS0 quiet reboot=t panic=-1 percpu_alloc=page"
        );
    }
}
