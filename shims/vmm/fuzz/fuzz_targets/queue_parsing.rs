//! Guest-controlled queue contents against each device's queue handling: the input is a
//! queue layout (size, ring addresses, avail index) and the bytes of a 64 KiB guest
//! memory holding descriptors, rings and request headers. Any input must leave the
//! device returning chains or refusing the queue, never panicking or looping.

#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::Arc;

use isola_vmm::devices::virtio::block::Block;
use isola_vmm::devices::virtio::console::Console;
use isola_vmm::devices::virtio::net::Net;
use isola_vmm::devices::virtio::{Activation, EventRegistrar, Interrupt, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x1_0000;

struct NullRegistrar;
impl EventRegistrar for NullRegistrar {
    fn add(&self, _fd: i32, _sub: u32, _events: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn remove(&self, _fd: i32) -> std::io::Result<()> {
        Ok(())
    }
}

struct Dgram(UnixDatagram);
impl std::io::Read for Dgram {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.recv(b)
    }
}
impl std::io::Write for Dgram {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.send(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl std::os::fd::AsRawFd for Dgram {
    fn as_raw_fd(&self) -> i32 {
        self.0.as_raw_fd()
    }
}

fn u16_at(d: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([d[i], d[i + 1]])
}

fn queue(d: &[u8], mem: &GuestMemoryMmap) -> Option<Queue> {
    let mut q = Queue::new(256).ok()?;
    q.set_size(u16_at(d, 1));
    q.set_desc_table_address(Some(u32::from(u16_at(d, 3))), Some(0));
    q.set_avail_ring_address(Some(u32::from(u16_at(d, 5))), Some(0));
    q.set_used_ring_address(Some(u32::from(u16_at(d, 7))), Some(0));
    q.set_ready(true);
    // The transport refuses an invalid queue at DRIVER_OK; devices only see valid ones.
    q.is_valid(mem).then_some(q)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let body = &data[16..];
    let _ = mem.write_slice(&body[..body.len().min(MEM_SIZE)], GuestAddress(0));
    if queue(data, &mem).is_none() {
        return;
    }
    let Ok(evt) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let interrupt = Arc::new(Interrupt::new(evt));
    let (mut device, queues): (Box<dyn VirtioDevice>, usize) = match data[0] % 3 {
        0 => {
            let Ok(mut file) = tempfile_disk() else { return };
            let _ = file.write_all(&[0u8; 4096]);
            match Block::new(file, data[9] & 1 == 1, "fuzz") {
                Ok(b) => (Box::new(b), 1),
                Err(_) => return,
            }
        }
        1 => {
            let Ok((a, _b)) = UnixDatagram::pair() else { return };
            let _ = a.set_nonblocking(true);
            (Box::new(Net::new(Dgram(a), [2, 0, 0, 0, 0, 1])), 2)
        }
        _ => {
            let Ok((a, _b)) = UnixStream::pair() else { return };
            (Box::new(Console::with_stream("isola.agent", a)), 6)
        }
    };
    let qs = (0..queues).filter_map(|_| queue(data, &mem)).collect();
    let activation = Activation {
        mem: mem.clone(),
        queues: qs,
        interrupt,
        acked_features: 1 << 1,
        registrar: Box::new(NullRegistrar),
    };
    if device.activate(activation).is_err() {
        return;
    }
    for i in 0..queues {
        device.queue_notify(i);
    }
    device.reset();
});

fn tempfile_disk() -> std::io::Result<std::fs::File> {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nothing else.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}
