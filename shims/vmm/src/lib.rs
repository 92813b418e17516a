//! isola's own microVM monitor on KVM.
//!
//! * [`arch`]: guest memory layout, PVH boot structures, MP table, vCPU registers;
//! * [`devices`]: the port-IO devices (8250 UART, CMOS RTC) and the virtio-mmio devices
//!   (console with the agent port, net on a TAP, blk on a file);
//! * [`event_loop`]: the one thread that serves queue notifications and backends;
//! * [`vmm`]: builds a VM from a [`config::VmmConfig`], runs its vCPU threads and reports
//!   how it ended;
//! * [`seccomp`]: the allow-lists of each thread kind;
//! * [`selftest`]: a client of the guest agent for the `--selftest` mode.

#![warn(missing_docs)]

pub mod arch;
pub mod config;
pub mod devices;
pub mod event_loop;
pub mod seccomp;
pub mod selftest;
pub mod virtiofsd;
pub mod vmm;

pub use config::VmmConfig;
pub use vmm::{ExitReason, Vmm, VmmError};
