//! Safe access to a queue's descriptor chains: every error a guest can cause (a bad
//! avail index, a descriptor outside memory, a loop, a length overflow) is an error of
//! that one request, never a panic.

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

/// A chain borrowed from guest memory.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Errors of one queue operation.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The avail ring or the queue configuration is invalid.
    #[error("queue: {0}")]
    Queue(virtio_queue::Error),
    /// A descriptor chain does not describe valid guest memory.
    #[error("descriptor chain: {0}")]
    Chain(virtio_queue::Error),
    /// The request is malformed (sizes, layout).
    #[error("malformed request: {0}")]
    Malformed(&'static str),
}

/// Pops the next available chain; `Ok(None)` when the ring is empty.
pub fn pop<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<Chain<'a>>, QueueError> {
    if !queue.ready() {
        return Ok(None);
    }
    // `iter` checks the avail index against the queue size before yielding anything.
    let mut iter = queue.iter(mem).map_err(QueueError::Queue)?;
    Ok(iter.next())
}

/// A reader over the chain's device-readable part.
pub fn reader<'a>(chain: &Chain<'a>, mem: &'a GuestMemoryMmap) -> Result<Reader<'a>, QueueError> {
    chain.clone().reader(mem).map_err(QueueError::Chain)
}

/// A writer over the chain's device-writable part.
pub fn writer<'a>(chain: &Chain<'a>, mem: &'a GuestMemoryMmap) -> Result<Writer<'a>, QueueError> {
    chain.clone().writer(mem).map_err(QueueError::Chain)
}

/// Returns a chain to the driver with `len` bytes written.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), QueueError> {
    queue.add_used(mem, head, len).map_err(QueueError::Queue)
}

/// Whether the driver has made chains available that are not yet consumed.
pub fn has_available(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    queue.ready()
        && queue
            .avail_idx(mem, Ordering::Acquire)
            .map(|idx| idx.0 != queue.next_avail())
            .unwrap_or(false)
}
