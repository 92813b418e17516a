//! virtio devices over the virtio-mmio transport (version 2).
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] owns it, serves the
//! register window to the vCPUs and hands the queues over at DRIVER_OK. Queue
//! notifications arrive as ioeventfds and backend readiness as fds, both on the one
//! event loop ([`crate::event_loop`]), which calls the device's handlers.

pub mod block;
pub mod console;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod queue;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use queue::QueueError;

/// VIRTIO_F_VERSION_1: the modern interface, required by the mmio transport v2.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Interrupt status bit: a used ring was updated.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

/// Device type ids.
pub mod types {
    /// virtio-net.
    pub const NET: u32 = 1;
    /// virtio-blk.
    pub const BLOCK: u32 = 2;
    /// virtio-console.
    pub const CONSOLE: u32 = 3;
    /// virtio-fs.
    pub const FS: u32 = 26;
}

/// The device's interrupt: the status bits the driver reads, and the irqfd KVM injects.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    /// An interrupt signalled through `evt` (registered as an irqfd).
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Sets `bits` in the status and raises the interrupt.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!(%e, "irqfd write failed");
        }
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd (tests read it).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Registers a device's backend fds with the event loop under the device's own tokens.
pub trait EventRegistrar: Send {
    /// Watches `fd` for `events` (EPOLLIN etc.), delivering `sub` to the device.
    fn add(&self, fd: RawFd, sub: u32, events: u32) -> std::io::Result<()>;
    /// Stops watching `fd`.
    fn remove(&self, fd: RawFd) -> std::io::Result<()>;
}

/// What a device gets at DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues as the driver configured them.
    pub queues: Vec<Queue>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// Watches backend fds on the event loop.
    pub registrar: Box<dyn EventRegistrar>,
}

/// Errors of device activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// Registering a backend fd failed.
    #[error("registering the backend with the event loop: {0}")]
    Register(std::io::Error),
    /// The driver set up the device in a way it cannot run.
    #[error("{0}")]
    Invalid(String),
}

/// One virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device type ([`types`]).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; their count is the device's queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration at `offset`; out of range reads as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver notified queue `index`.
    fn queue_notify(&mut self, index: usize);
    /// Offered the queues' ioeventfds: a device that hands them to an outside backend
    /// (vhost-user) keeps them and returns true; the event loop then leaves them alone.
    fn wants_queue_events(&mut self, _events: Vec<EventFd>) -> bool {
        false
    }
    /// A backend fd registered under `sub` is ready with `events`.
    fn backend_event(&mut self, _sub: u32, _events: u32) {}
    /// The driver reset the device: stop using the queues.
    fn reset(&mut self);
}

/// Copies `config[offset..]` into `data`, zero past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if offset < config.len() {
        let n = data.len().min(config.len() - offset);
        data[..n].copy_from_slice(&config[offset..offset + n]);
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Queues over a small guest memory, laid out as a driver would.

    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// Queue size the tests use.
    pub const SIZE: u16 = 16;

    /// Where a test queue's rings live.
    pub struct TestQueue {
        /// Start of its descriptor table.
        pub base: u64,
    }

    impl TestQueue {
        /// A queue whose rings start at `base`.
        pub fn new(_mem: &GuestMemoryMmap, base: u64) -> Self {
            Self { base }
        }
    }

    /// The device side of the test queue.
    pub fn queue_at(mem: &GuestMemoryMmap, q: &TestQueue) -> Queue {
        MockSplitQueue::create(mem, GuestAddress(q.base), SIZE)
            .create_queue()
            .expect("valid test queue")
    }
}
