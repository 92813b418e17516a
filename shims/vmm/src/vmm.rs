//! Building a VM from a [`VmmConfig`] and running it: KVM VM with in-kernel irqchip and
//! PIT, guest memory, the PVH kernel and initramfs, the port-IO devices, the virtio-mmio
//! devices, one thread per vCPU and the device event loop.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{elf::Elf, elf::PvhBootCapability, load_cmdline, KernelLoader};
use tracing::{debug, error, info, info_span, warn};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{cpu, layout, mptable, pvh};
use crate::config::{NetBackend, VmmConfig};
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::legacy::rtc::{Rtc, RTC_BASE, RTC_PORTS};
use crate::devices::legacy::serial::{SerialDevice, COM1_BASE, UART_PORTS};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::console::Console;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::net::{open_tap, tap_from_fd, Net};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::event_loop::EventLoop;
use crate::seccomp::{self, ThreadKind};

/// The kernel's panic marker on the console.
pub const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// What the kernel prints before a requested restart or power-off.
const REBOOT_MARKERS: [&str; 3] = [
    "reboot: Restarting system",
    "reboot: Power down",
    "reboot: System halted",
];
/// Console bytes kept in memory to tell a poweroff from a panic.
const CONSOLE_TAIL_BYTES: usize = 16 << 10;

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// The config cannot be run.
    #[error("invalid config: {0}")]
    Config(String),
    /// A file (kernel, initramfs, disk, log, socket) could not be used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// Guest memory could not be created or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The kernel could not be loaded.
    #[error("loading the kernel: {0}")]
    Kernel(String),
    /// vCPU set-up failed.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// Boot structures failed.
    #[error(transparent)]
    Pvh(#[from] pvh::PvhError),
    /// The MP table failed.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// A device could not be created.
    #[error("device: {0}")]
    Device(String),
    /// The event loop failed.
    #[error(transparent)]
    EventLoop(#[from] crate::event_loop::EventLoopError),
    /// The seccomp filters could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off or rebooted on request (with `reboot=t`, a reset).
    Poweroff,
    /// The guest kernel panicked; the panic line from the console.
    Panic(String),
    /// The guest reset without saying why: a triple fault.
    TripleFault,
    /// A vCPU stopped on an error (KVM internal error, failed entry, ...).
    VcpuError(String),
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Poweroff => f.write_str("guest powered off"),
            ExitReason::Panic(line) => write!(f, "guest kernel panic: {line}"),
            ExitReason::TripleFault => {
                f.write_str("guest triple fault (reset without a reboot request)")
            }
            ExitReason::VcpuError(e) => write!(f, "vcpu error: {e}"),
        }
    }
}

/// The serial sink: the log file plus the console's last bytes in memory.
#[derive(Clone)]
struct ConsoleSink {
    file: Option<Arc<Mutex<File>>>,
    tail: Arc<Mutex<VecDeque<u8>>>,
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(f) = &self.file {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            f.write_all(buf)?;
        }
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.extend(buf);
        let excess = tail.len().saturating_sub(CONSOLE_TAIL_BYTES);
        tail.drain(..excess);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Why a VM stopped, judged from the last console output.
pub fn classify_reset(console: &str) -> ExitReason {
    if let Some(line) = console
        .lines()
        .find_map(|l| l.find(PANIC_MARKER).map(|i| l[i..].trim_end().to_string()))
    {
        return ExitReason::Panic(line);
    }
    if REBOOT_MARKERS.iter().any(|m| console.contains(m)) {
        return ExitReason::Poweroff;
    }
    ExitReason::TripleFault
}

/// A built VM, ready to run.
pub struct Vmm {
    _kvm: Kvm,
    vm: Arc<VmFd>,
    _mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    event_loop: Arc<EventLoop>,
    console_tail: Arc<Mutex<VecDeque<u8>>>,
    seccomp: bool,
    cmdline: String,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .field("cmdline", &self.cmdline)
            .finish()
    }
}

impl Vmm {
    /// Builds the VM: nothing runs until [`run`](Self::run).
    pub fn build(config: VmmConfig) -> Result<Self, VmmError> {
        let span = info_span!("vmm_build", vcpus = config.vcpus, mem_mib = config.mem_mib);
        let _g = span.enter();
        let started = Instant::now();
        if config.vcpus == 0 || config.vcpus > 254 {
            return Err(VmmError::Config(format!("{} vCPUs (1-254)", config.vcpus)));
        }
        if config.mem_mib < 16 || u64::from(config.mem_mib) > layout::MAX_MEMORY_MIB {
            return Err(VmmError::Config(format!(
                "{} MiB of memory (16-{})",
                config.mem_mib,
                layout::MAX_MEMORY_MIB
            )));
        }
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mem_size = u64::from(config.mem_mib) << 20;
        let mem = guest_memory(mem_size, !config.shares.is_empty())?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the Vmm keeps for as
            // long as the VM exists; KVM only maps it into the guest.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        // Kernel.
        let mut kernel = File::open(&config.kernel)
            .map_err(io_err(format!("open kernel {}", config.kernel.display())))?;
        let loaded = Elf::load(
            &mem,
            None,
            &mut kernel,
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .map_err(|e| {
            VmmError::Kernel(format!("{} (an ELF vmlinux with a PVH note is needed)", e))
        })?;
        let entry = match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => addr,
            _ => {
                return Err(VmmError::Kernel(
                    "the kernel has no PVH entry note (CONFIG_PVH)".into(),
                ))
            }
        };

        // Initramfs at the top of RAM.
        let initramfs = match &config.initramfs {
            Some(path) => {
                let mut f = File::open(path)
                    .map_err(io_err(format!("open initramfs {}", path.display())))?;
                let size = f.metadata().map_err(io_err("stat initramfs"))?.len();
                let addr = (mem_size - size) & !0xfff;
                if size >= mem_size || addr < loaded.kernel_end {
                    return Err(VmmError::Config(format!(
                        "initramfs of {size} bytes does not fit above the kernel in {} MiB",
                        config.mem_mib
                    )));
                }
                mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
                    .map_err(|e| VmmError::Memory(format!("loading the initramfs: {e}")))?;
                Some((GuestAddress(addr), size))
            }
            None => None,
        };

        // Port-IO devices.
        let mut io_bus = Bus::new();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let log = match &config.serial_log {
            Some(p) => Some(Arc::new(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(io_err(format!("open serial log {}", p.display())))?,
            ))),
            None => None,
        };
        let console_tail = Arc::new(Mutex::new(VecDeque::new()));
        let sink = ConsoleSink {
            file: log,
            tail: console_tail.clone(),
        };
        let serial: Arc<Mutex<dyn BusDevice>> =
            Arc::new(Mutex::new(SerialDevice::new(serial_irq, sink)));
        io_bus
            .insert(serial, COM1_BASE, UART_PORTS)
            .map_err(|e| VmmError::Device(e.to_string()))?;
        io_bus
            .insert(Arc::new(Mutex::new(Rtc::default())), RTC_BASE, RTC_PORTS)
            .map_err(|e| VmmError::Device(e.to_string()))?;

        // virtio-mmio devices.
        let mut mmio_bus = Bus::new();
        let mut event_loop = EventLoop::new()?;
        let mut cmdline = config.cmdline.clone();
        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
        if let Some(path) = &config.agent_socket {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path)
                .map_err(io_err(format!("bind agent socket {}", path.display())))?;
            devices.push(Box::new(Console::new(
                &config.agent_port_name,
                Some(listener),
            )));
        }
        for (i, disk) in config.disks.iter().enumerate() {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(!disk.read_only)
                .open(&disk.path)
                .map_err(io_err(format!("open disk {}", disk.path.display())))?;
            let block = Block::new(file, disk.read_only, &format!("isola-vd{i}"))
                .map_err(|e| VmmError::Device(e.to_string()))?;
            devices.push(Box::new(block));
        }
        for (i, net) in config.nets.into_iter().enumerate() {
            let tap = match net.backend {
                NetBackend::TapName(name) => open_tap(&name),
                NetBackend::TapFd(fd) => tap_from_fd(fd),
            }
            .map_err(|e| VmmError::Device(e.to_string()))?;
            let mac = net
                .mac
                .unwrap_or([0x02, 0x15, 0x01, 0x00, 0x00, i as u8 + 1]);
            devices.push(Box::new(Net::new(tap, mac)));
        }
        for share in &config.shares {
            let fs = Fs::connect(&share.tag, &share.socket)
                .map_err(|e| VmmError::Device(e.to_string()))?;
            devices.push(Box::new(fs));
        }
        for (i, mut device) in devices.into_iter().enumerate() {
            let base = layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE;
            let irq = layout::VIRTIO_IRQ_BASE
                + i as u32
                + u32::from(layout::VIRTIO_IRQ_BASE + i as u32 >= 8);
            if irq > layout::IRQ_MAX {
                return Err(VmmError::Config("too many virtio devices".into()));
            }
            let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
            vm.register_irqfd(&irq_evt, irq)
                .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
            let mut queue_events = Vec::new();
            for q in 0..device.queue_max_sizes().len() {
                let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
                vm.register_ioevent(
                    &evt,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    q as u32,
                )
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
                queue_events.push(evt);
            }
            let clones = queue_events
                .iter()
                .map(|e| e.try_clone())
                .collect::<Result<Vec<_>, _>>()
                .map_err(io_err("dup eventfd"))?;
            if device.wants_queue_events(clones) {
                // Kicks go to the outside backend, not to our loop.
                queue_events.clear();
            }
            let registrar = event_loop.registrar_for_next();
            let transport = Arc::new(Mutex::new(MmioTransport::new(
                device,
                mem.clone(),
                Arc::new(Interrupt::new(irq_evt)),
                Box::new(move || Box::new(registrar.clone())),
            )));
            mmio_bus
                .insert(transport.clone(), base, layout::VIRTIO_MMIO_SIZE)
                .map_err(|e| VmmError::Device(e.to_string()))?;
            event_loop.add_device(transport, queue_events)?;
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
        }

        // Boot structures.
        let cmd = Cmdline::try_from(&cmdline, layout::CMDLINE_MAX_SIZE)
            .map_err(|e| VmmError::Config(format!("command line: {e}")))?;
        load_cmdline(&mem, GuestAddress(layout::CMDLINE_START), &cmd)
            .map_err(|e| VmmError::Kernel(format!("writing the command line: {e}")))?;
        pvh::write_start_info(&mem, mem_size, initramfs)?;
        mptable::write(&mem, config.vcpus)?;

        // vCPUs.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msrs = cpu::boot_msrs(&kvm)?;
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            cpu::setup_vcpu(&vcpu, &cpu::cpuid_for(&supported, id, config.vcpus), &msrs)?;
            if id == 0 {
                cpu::setup_pvh_boot(&vcpu, &mem, entry)?;
            }
            vcpus.push(vcpu);
        }
        info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            %cmdline,
            entry = entry.0,
            "vm built"
        );
        Ok(Self {
            _kvm: kvm,
            vm: Arc::new(vm),
            _mem: mem,
            vcpus,
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            event_loop: Arc::new(event_loop),
            console_tail,
            seccomp: config.seccomp,
            cmdline,
        })
    }

    /// The command line the guest boots with (with the VMM's device words).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Runs the VM until a vCPU stops; returns why. The vCPU and event-loop threads are
    /// left to the process's exit.
    pub fn run(mut self) -> Result<ExitReason, VmmError> {
        let (tx, rx) = mpsc::channel::<ExitReason>();
        let filters = if self.seccomp {
            seccomp::install_sigsys_handler()?;
            Some(seccomp::filters()?)
        } else {
            None
        };
        let el = self.event_loop.clone();
        let el_filter = filters
            .as_ref()
            .map(|f| (f.event_loop.clone(), f.deny_open.clone()));
        std::thread::Builder::new()
            .name("isola-vmm-events".into())
            .spawn(move || {
                if let Some((f, deny)) = el_filter {
                    if let Err(e) = seccomp::apply_with_deny_open(ThreadKind::EventLoop, &f, &deny)
                    {
                        error!(%e, "event loop seccomp");
                        std::process::abort();
                    }
                }
                if let Err(e) = el.run() {
                    error!(%e, "event loop ended");
                }
            })
            .map_err(io_err("spawn the event loop"))?;
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            let tx = tx.clone();
            let io = self.io_bus.clone();
            let mmio = self.mmio_bus.clone();
            let filter = filters
                .as_ref()
                .map(|f| (f.vcpu.clone(), f.deny_open.clone()));
            std::thread::Builder::new()
                .name(format!("isola-vcpu{id}"))
                .spawn(move || {
                    if let Some((f, deny)) = filter {
                        if let Err(e) = seccomp::apply_with_deny_open(ThreadKind::Vcpu, &f, &deny) {
                            let _ = tx.send(ExitReason::VcpuError(format!("seccomp: {e}")));
                            return;
                        }
                    }
                    let reason = run_vcpu(id, vcpu, &io, &mmio);
                    let _ = tx.send(reason);
                })
                .map_err(io_err("spawn a vcpu thread"))?;
        }
        drop(tx);
        if let Some(f) = &filters {
            seccomp::apply_with_deny_open(ThreadKind::Main, &f.main, &f.deny_open)?;
        }
        let reason = rx
            .recv()
            .unwrap_or_else(|_| ExitReason::VcpuError("every vcpu thread ended".into()));
        let reason = match reason {
            ExitReason::TripleFault => {
                let mut tail = self.console_tail.lock().unwrap_or_else(|e| e.into_inner());
                let text = String::from_utf8_lossy(tail.make_contiguous()).into_owned();
                classify_reset(&text)
            }
            other => other,
        };
        let _ = &self.vm;
        info!(%reason, "vm ended");
        Ok(reason)
    }
}

/// Guest RAM: anonymous memory, or a shared memfd when a vhost-user backend must map it.
pub(crate) fn guest_memory(size: u64, shared: bool) -> Result<GuestMemoryMmap, VmmError> {
    let file = if shared {
        // SAFETY: memfd_create with a NUL-terminated name and flags; the fd is owned below.
        let fd = unsafe { libc::memfd_create(c"isola-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(VmmError::Memory(format!(
                "memfd_create: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: fd is fresh and owned by nothing else.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|e| VmmError::Memory(format!("sizing the memfd: {e}")))?;
        Some(vm_memory::FileOffset::new(file, 0))
    } else {
        None
    };
    GuestMemoryMmap::<()>::from_ranges_with_files([(GuestAddress(0), size as usize, file)])
        .map_err(|e| VmmError::Memory(e.to_string()))
}

fn run_vcpu(id: usize, mut vcpu: VcpuFd, io: &Bus, mmio: &Bus) -> ExitReason {
    let span = info_span!("vcpu", id);
    let _g = span.enter();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                io.read(u64::from(port), data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                io.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    debug!(addr, "mmio read of an unclaimed address");
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !mmio.write(addr, data) {
                    debug!(addr, "mmio write to an unclaimed address");
                }
            }
            // A reset: with reboot=t and panic=-1 both a poweroff and a panic end here.
            Ok(VcpuExit::Shutdown) => return ExitReason::TripleFault,
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                debug!(kind, "system event");
                return ExitReason::TripleFault;
            }
            Ok(VcpuExit::Hlt) => return ExitReason::VcpuError("vcpu halted (HLT exit)".into()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return ExitReason::VcpuError(format!(
                    "KVM_EXIT_FAIL_ENTRY: hardware reason {reason:#x} on cpu {cpu}"
                ))
            }
            Ok(VcpuExit::InternalError) => {
                return ExitReason::VcpuError("KVM_EXIT_INTERNAL_ERROR".into())
            }
            Ok(other) => {
                warn!(?other, "unexpected vcpu exit");
                return ExitReason::VcpuError(format!("unexpected exit {other:?}"));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return ExitReason::VcpuError(format!("KVM_RUN: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_poweroff_from_panic_and_triple_fault() {
        assert_eq!(
            classify_reset("x\n[    2.1] reboot: Restarting system\n"),
            ExitReason::Poweroff
        );
        assert_eq!(
            classify_reset("[ 1.0] Kernel panic - not syncing: No working init found.\n"),
            ExitReason::Panic("Kernel panic - not syncing: No working init found.".into())
        );
        assert_eq!(classify_reset("booting\n"), ExitReason::TripleFault);
    }
}
