//! x86_64 machine set-up: the guest memory layout, the PVH boot structures, the MP table,
//! and each vCPU's registers, CPUID, MSRs, FPU and local APIC.

pub mod cpu;
pub mod layout;
pub mod mptable;
pub mod pvh;
