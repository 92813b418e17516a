//! Devices emulated in the VMM process: the legacy PC parts on the port-IO bus and the
//! virtio devices on virtio-mmio.

pub mod bus;
pub mod legacy;
pub mod virtio;
