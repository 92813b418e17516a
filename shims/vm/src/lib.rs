//! isola's hypervisor layer for VM pods.
//!
//! * [`hypervisor`]: the [`hypervisor::Hypervisor`] trait every backend implements
//!   (prepare, add devices, start, agent channel, console log, stop, wait), the VM
//!   config, devices and errors;
//! * [`select`]: `hypervisor = "auto" | "builtin" | "qemu"` → a backend and the reason;
//! * [`builtin`]: the builtin backend, isola's own VMM (`isola-vmm`, shims/vmm) as a
//!   child process;
//! * [`qemu`]: the QEMU backend (`qemu-system-x86_64 -M microvm` over [`qmp`]), with
//!   [`virtiofsd`] for virtio-fs shares;
//! * [`agent`]: the host's client of the guest API (`proto/guest.proto`);
//! * [`initramfs`]: the cpio (newc) writer for the guest initramfs;
//! * [`memory`]: per-process memory figures for the boot benchmark;
//! * [`assets`]: where the guest kernel and initramfs are installed;
//! * [`pod`]: the shim API of one VM pod (`isola-shim-vm`), forwarded to the guest.

pub mod agent;
pub mod assets;
pub mod builtin;
pub mod console;
pub mod hypervisor;
pub mod initramfs;
pub mod memory;
pub mod pod;
pub mod qemu;
pub mod qmp;
pub mod select;
pub mod virtiofsd;

pub use hypervisor::{Device, Hypervisor, VmConfig, VmError, VmExit};
pub use select::{select, Accel, Backend, HypervisorChoice, Selection};

/// Builds the backend that `selection` names for `config`.
pub fn new_hypervisor(
    selection: Selection,
    config: VmConfig,
) -> Result<Box<dyn Hypervisor>, VmError> {
    match selection.backend {
        Backend::Qemu { .. } => Ok(Box::new(qemu::QemuVm::new(selection, config))),
        Backend::Builtin => Ok(Box::new(builtin::BuiltinVm::new(selection, config))),
    }
}
