//! isola's guest agent: PID 1 inside each microVM.
//!
//! It mounts the kernel filesystems ([`init`]), finds the virtio-console port named
//! [`AGENT_PORT_NAME`] ([`port`]), and serves `proto/guest.proto` over it ([`server`]):
//! length-prefixed prost messages ([`frame`]). The host side of the channel lives in the
//! `isola-vm` crate and reuses [`frame`]. For a pod, the host then switches the port to
//! the shim API: the native shim's service runs the containers in the guest (`shim`, with
//! the `shim` feature), in this process or in the program /init hands the port to
//! ([`handoff`]).

pub mod clock;
pub mod frame;
pub mod handoff;
pub mod init;
pub mod modules;
pub mod net;
pub mod port;
pub mod server;
#[cfg(feature = "shim")]
pub mod shim;

/// Name of the virtio-console port that carries the guest API (QEMU's
/// `virtserialport,name=...`; the guest reads it from `/sys/class/virtio-ports/*/name`).
pub const AGENT_PORT_NAME: &str = "isola.agent";
