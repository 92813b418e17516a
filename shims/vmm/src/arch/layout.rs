//! Where things live in guest physical memory.

/// The GDT used for PVH entry.
pub const GDT_START: u64 = 0x500;
/// The (empty) IDT used for PVH entry.
pub const IDT_START: u64 = 0x520;
/// `hvm_start_info` for the PVH entry point (the guest gets its address in %ebx).
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH module list (one module: the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// The PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line the x86 kernel takes (COMMAND_LINE_SIZE), including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of the first RAM range: the MP table sits above it, in what a PC calls the EBDA.
pub const EBDA_START: u64 = 0x9_fc00;
/// The MP floating pointer and configuration table.
pub const MPTABLE_START: u64 = EBDA_START;
/// Where the kernel may be loaded from.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit device hole; RAM must end below it.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The IO-APIC's MMIO base (in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) for the in-kernel real-mode emulation.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// First GSI handed to virtio-mmio devices (0-4 and 8 are the timer, keyboard, cascade,
/// serial and RTC).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last GSI of the IO-APIC.
pub const IRQ_MAX: u32 = 23;
/// The serial port's IRQ (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// Largest guest memory this layout holds (RAM below the device hole).
pub const MAX_MEMORY_MIB: u64 = (MMIO_HOLE_START - HIMEM_START) >> 20;
