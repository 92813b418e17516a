//! One vCPU's boot state: CPUID from KVM's supported list, boot MSRs from KVM's MSR
//! list, the FPU, the local APIC's LINT pins, and 32-bit flat protected mode for the PVH
//! entry.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{GDT_START, IDT_START, PVH_INFO_START};

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than given.
    #[error("KVM set {set} of {wanted} boot MSRs")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many we asked for.
        wanted: usize,
    },
    /// Writing the GDT/IDT failed.
    #[error("writing the boot GDT: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}

/// CPUID leaf 1 ECX: running under a hypervisor.
const CPUID_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1 EDX: HTT (the APIC-id field of EBX is valid).
const CPUID_HTT: u32 = 1 << 28;

/// KVM's supported CPUID, adjusted for vCPU `id` of `count`: APIC ids, the logical CPU
/// count and the hypervisor bit. Nothing comes from the host's own CPUID.
pub fn cpuid_for(supported: &CpuId, id: u32, count: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((count & 0xff) << 16);
                e.ecx |= CPUID_HYPERVISOR;
                if count > 1 {
                    e.edx |= CPUID_HTT;
                }
            }
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    cpuid
}

/// Boot MSRs (all zero but MISC_ENABLE's fast strings and MTRRs enabled write-back),
/// keeping only those in KVM's MSR index list.
pub fn boot_msrs(kvm: &Kvm) -> Result<Vec<kvm_msr_entry>, CpuError> {
    let supported = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let wanted: [(u32, u64); 11] = [
        (0x174, 0),             // IA32_SYSENTER_CS
        (0x175, 0),             // IA32_SYSENTER_ESP
        (0x176, 0),             // IA32_SYSENTER_EIP
        (0xc000_0081, 0),       // STAR
        (0xc000_0082, 0),       // LSTAR
        (0xc000_0083, 0),       // CSTAR
        (0xc000_0084, 0),       // SYSCALL_MASK
        (0xc000_0102, 0),       // KERNEL_GS_BASE
        (0x10, 0),              // TSC
        (0x1a0, 1),             // MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ];
    Ok(wanted
        .iter()
        .filter(|(index, _)| supported.as_slice().contains(index))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect())
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let limit = ((((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32)
        .checked_shl(if g == 1 { 12 } else { 0 })
        .unwrap_or(0)
        | if g == 1 { 0xfff } else { 0 };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Sets vCPU 0 up for the PVH entry at `entry`: 32-bit flat protected mode, paging off,
/// %ebx pointing at `hvm_start_info`.
pub fn setup_pvh_boot(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: GuestAddress,
) -> Result<(), CpuError> {
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(0xc09b, 0, 0xffff_ffff), // code
        gdt_entry(0xc093, 0, 0xffff_ffff), // data
        gdt_entry(0x008b, 0, 0x67),        // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    sregs.cr0 = 1; // PE
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 2,
        rip: entry.0,
        rbx: PVH_INFO_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}

/// CPUID, MSRs, FPU and LAPIC of one vCPU (the boot CPU and the application CPUs alike).
pub fn setup_vcpu(vcpu: &VcpuFd, cpuid: &CpuId, msrs: &[kvm_msr_entry]) -> Result<(), CpuError> {
    vcpu.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    let list = Msrs::from_entries(msrs).map_err(|_| CpuError::Msrs {
        set: 0,
        wanted: msrs.len(),
    })?;
    let set = vcpu.set_msrs(&list).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != msrs.len() {
        return Err(CpuError::Msrs {
            set,
            wanted: msrs.len(),
        });
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    setup_lint(vcpu)
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// LINT0 delivers the PIC's ExtINT, LINT1 NMIs, as firmware leaves them.
fn setup_lint(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn flat_segments() {
        let code = segment(gdt_entry(0xc09b, 0, 0xffff_ffff), 1);
        assert_eq!((code.base, code.limit, code.selector), (0, 0xffff_ffff, 8));
        assert_eq!(
            (code.type_, code.present, code.db, code.s, code.g),
            (0xb, 1, 1, 1, 1)
        );
        let tss = segment(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.s, tss.g), (0x67, 0, 0));
        let null = segment(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn cpuid_sets_apic_id_and_hypervisor_bit() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 7,
                ..Default::default()
            },
        ];
        let supported = CpuId::from_entries(&entries).unwrap();
        let c = cpuid_for(&supported, 3, 4);
        let leaf1 = c.as_slice()[0];
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800);
        assert_ne!(leaf1.ecx & CPUID_HYPERVISOR, 0);
        assert_eq!(c.as_slice()[1].edx, 3);
    }
}
