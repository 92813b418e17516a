//! What one VM is made of: kernel, initramfs, command line, size and devices.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

/// A virtio-net device.
#[derive(Debug)]
pub enum NetBackend {
    /// A TAP opened (and created if needed) by name.
    TapName(String),
    /// An open TAP fd handed to the VMM.
    TapFd(OwnedFd),
}

/// A virtio-net device and its guest MAC.
#[derive(Debug)]
pub struct NetConfig {
    /// Where frames go.
    pub backend: NetBackend,
    /// Guest MAC (defaults to a locally administered one per device).
    pub mac: Option<[u8; 6]>,
}

/// A virtio-blk disk.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// The raw image.
    pub path: PathBuf,
    /// Refuse guest writes.
    pub read_only: bool,
}

/// A virtio-fs share served by a vhost-user backend (virtiofsd).
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// The mount tag the guest uses.
    pub tag: String,
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
}

/// Everything the VMM needs to boot one VM.
#[derive(Debug)]
pub struct VmmConfig {
    /// ELF vmlinux with a PVH entry note.
    pub kernel: PathBuf,
    /// Initramfs (cpio), optional.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line; the VMM appends its `virtio_mmio.device=` words.
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// File receiving the 8250 serial output (appended); none discards it.
    pub serial_log: Option<PathBuf>,
    /// Unix socket the VMM listens on for the agent channel (virtio-console port).
    pub agent_socket: Option<PathBuf>,
    /// Name of the agent's console port.
    pub agent_port_name: String,
    /// virtio-net devices.
    pub nets: Vec<NetConfig>,
    /// virtio-blk devices, /dev/vda first.
    pub disks: Vec<DiskConfig>,
    /// virtio-fs shares (guest RAM is then a shared memfd, which virtiofsd maps).
    pub shares: Vec<FsConfig>,
    /// Apply the seccomp allow-lists once set-up is done.
    pub seccomp: bool,
}

/// The agent port name isola-guest looks for.
pub const AGENT_PORT_NAME: &str = "isola.agent";

/// The command line words the VMM's guests boot with, as the QEMU backend uses them:
/// serial console, quiet (every console byte is a VM exit), and `reboot=t panic=-1` so that
/// a poweroff or a panic resets the guest, which ends the VM.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet reboot=t panic=-1";

impl VmmConfig {
    /// A config with 1 vCPU, 256 MiB, the default command line and no devices.
    pub fn new(kernel: PathBuf) -> Self {
        Self {
            kernel,
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.into(),
            vcpus: 1,
            mem_mib: 256,
            serial_log: None,
            agent_socket: None,
            agent_port_name: AGENT_PORT_NAME.into(),
            nets: Vec::new(),
            disks: Vec::new(),
            shares: Vec::new(),
            seccomp: true,
        }
    }
}
