//! virtio-net on a TAP device (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, 12-byte header): no
//! offloads are offered, so each frame moves whole with its virtio_net_hdr_v1 in front.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use tracing::{debug, warn};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::queue::{self, QueueError};
use super::{
    read_config_bytes, types, ActivateError, Activation, EventRegistrar, Interrupt, VirtioDevice,
    VIRTIO_MMIO_INT_VRING,
};

/// VIRTIO_NET_F_MAC.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The header length with VIRTIO_F_VERSION_1 (virtio_net_hdr_v1).
pub const VNET_HDR_LEN: usize = 12;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const SUB_TAP: u32 = 256;
/// Largest frame plus header we move (64 KiB covers any non-GSO frame with jumbo MTU).
const MAX_FRAME: usize = 65_562;
/// Frames held while the guest has no receive buffers.
const MAX_PENDING_RX: usize = 64;

/// Errors opening a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// A TAP name longer than IFNAMSIZ-1.
    #[error("tap name {0:?} is too long")]
    Name(String),
    /// An ioctl or open failed.
    #[error("{what}: {source}")]
    Io {
        /// The call.
        what: &'static str,
        /// The errno.
        source: std::io::Error,
    },
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating if needed) the TAP `name` for a virtio-net device.
pub fn open_tap(name: &str) -> Result<File, TapError> {
    if name.len() >= 16 || name.is_empty() {
        return Err(TapError::Name(name.into()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|source| TapError::Io {
            what: "open /dev/net/tun",
            source,
        })?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is (name, flags, padding to
    // 40 bytes); the fd is ours and open.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(TapError::Io {
            what: "TUNSETIFF",
            source: std::io::Error::last_os_error(),
        });
    }
    configure_tap(&file)?;
    Ok(file)
}

/// Sets the vnet header size and turns offloads off on an open TAP.
pub fn configure_tap(file: &File) -> Result<(), TapError> {
    let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
        return Err(TapError::Io {
            what: "TUNSETVNETHDRSZ",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
        return Err(TapError::Io {
            what: "TUNSETOFFLOAD",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: F_SETFL with an int flag set; no memory is passed.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    Ok(())
}

/// A TAP handed over as an open fd (e.g. inherited from the shim).
pub fn tap_from_fd(fd: OwnedFd) -> Result<File, TapError> {
    let file = File::from(fd);
    configure_tap(&file)?;
    Ok(file)
}

/// Wraps a raw fd number given on the command line.
///
/// # Safety
/// `fd` must be an open fd that nothing else owns.
pub unsafe fn owned_fd(fd: i32) -> OwnedFd {
    // SAFETY: the caller guarantees `fd` is open and unowned.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
    _registrar: Box<dyn EventRegistrar>,
}

/// The network device over a TAP-like fd (a socketpair end in tests).
pub struct Net<T: Read + Write + AsRawFd + Send> {
    tap: T,
    mac: [u8; 6],
    active: Option<Active>,
    pending_rx: VecDeque<Vec<u8>>,
    scratch: Box<[u8]>,
}

impl<T: Read + Write + AsRawFd + Send> std::fmt::Debug for Net<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("mac", &self.mac).finish()
    }
}

/// Parses aa:bb:cc:dd:ee:ff.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl<T: Read + Write + AsRawFd + Send> Net<T> {
    /// A device moving frames through `tap` (non-blocking), with guest MAC `mac`.
    pub fn new(tap: T, mac: [u8; 6]) -> Self {
        Self {
            tap,
            mac,
            active: None,
            pending_rx: VecDeque::new(),
            scratch: vec![0u8; MAX_FRAME].into_boxed_slice(),
        }
    }

    fn process_tx(&mut self) -> Result<(), QueueError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mem = &active.mem;
        let mut used = false;
        while let Some(chain) = queue::pop(&mut active.queues[TX], mem)? {
            let head = chain.head_index();
            match queue::reader(&chain, mem) {
                Ok(mut r) if (VNET_HDR_LEN..=MAX_FRAME).contains(&r.available_bytes()) => {
                    let mut frame = vec![0u8; r.available_bytes()];
                    if r.read_exact(&mut frame).is_ok() {
                        if let Err(e) = self.tap.write(&frame) {
                            // A full TAP queue drops the frame, as a NIC would.
                            debug!(%e, "tap write dropped a frame");
                        }
                    }
                }
                Ok(r) => warn!(len = r.available_bytes(), "tx frame of a bad size dropped"),
                Err(e) => warn!(%e, "bad net tx chain"),
            }
            queue::add_used(&mut active.queues[TX], mem, head, 0)?;
            used = true;
        }
        if used {
            active.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
        Ok(())
    }

    fn read_tap(&mut self) {
        while self.pending_rx.len() < MAX_PENDING_RX {
            match self.tap.read(&mut self.scratch) {
                Ok(0) => return,
                Ok(n) => self.pending_rx.push_back(self.scratch[..n].to_vec()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        warn!(%e, "tap read failed");
                    }
                    return;
                }
            }
        }
    }

    fn deliver_rx(&mut self) -> Result<(), QueueError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mem = &active.mem;
        let mut used = false;
        while let Some(frame) = self.pending_rx.front() {
            let Some(chain) = queue::pop(&mut active.queues[RX], mem)? else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            match queue::writer(&chain, mem) {
                Ok(mut w) if w.available_bytes() >= frame.len() => {
                    if w.write_all(frame).is_ok() {
                        written = frame.len() as u32;
                    }
                }
                Ok(w) => warn!(
                    frame = frame.len(),
                    room = w.available_bytes(),
                    "rx frame too large for the buffer: dropped"
                ),
                Err(e) => warn!(%e, "bad net rx chain"),
            }
            self.pending_rx.pop_front();
            queue::add_used(&mut active.queues[RX], mem, head, written)?;
            used = true;
        }
        if used {
            active.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
        Ok(())
    }

    /// Moves frames from the TAP to the guest until the TAP is drained (it is watched
    /// edge-triggered) or the guest runs out of buffers (its next rx notify resumes).
    fn pump_rx(&mut self) {
        loop {
            let before = self.pending_rx.len();
            self.read_tap();
            let read_some = self.pending_rx.len() > before;
            if let Err(e) = self.deliver_rx() {
                warn!(%e, "net rx queue");
                return;
            }
            if !read_some || !self.pending_rx.is_empty() {
                return;
            }
        }
    }
}

impl<T: Read + Write + AsRawFd + Send> VirtioDevice for Net<T> {
    fn device_type(&self) -> u32 {
        types::NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        read_config_bytes(&config, offset, data);
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if a.queues.len() < 2 {
            return Err(ActivateError::Invalid("net needs rx and tx queues".into()));
        }
        let events = (libc::EPOLLIN | libc::EPOLLET) as u32;
        a.registrar
            .add(self.tap.as_raw_fd(), SUB_TAP, events)
            .map_err(ActivateError::Register)?;
        self.active = Some(Active {
            mem: a.mem,
            queues: a.queues,
            interrupt: a.interrupt,
            _registrar: a.registrar,
        });
        // Frames already queued make the TAP readable at registration: the event loop
        // moves them.
        Ok(())
    }
    fn queue_notify(&mut self, index: usize) {
        let r = match index {
            RX => {
                self.pump_rx();
                Ok(())
            }
            TX => self.process_tx(),
            other => {
                warn!(queue = other, "notify of a queue net does not have");
                Ok(())
            }
        };
        if let Err(e) = r {
            warn!(%e, "net queue");
        }
    }
    fn backend_event(&mut self, sub: u32, _events: u32) {
        if sub == SUB_TAP {
            self.pump_rx();
        }
    }
    fn reset(&mut self) {
        if let Some(a) = self.active.take() {
            let _ = a._registrar.remove(self.tap.as_raw_fd());
        }
        self.pending_rx.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_util::{queue_at, TestQueue};
    use std::os::unix::net::UnixDatagram;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    /// A datagram socket pair keeps frame boundaries, as a TAP does.
    struct Dgram(UnixDatagram);
    impl Read for Dgram {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.recv(b)
        }
    }
    impl Write for Dgram {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.send(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl AsRawFd for Dgram {
        fn as_raw_fd(&self) -> i32 {
            self.0.as_raw_fd()
        }
    }

    fn d(addr: u64, len: u32, write: bool) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            if write { 2 } else { 0 },
            0,
        ))
    }

    #[test]
    fn frames_both_ways_and_oversize_dropped() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (host, vmm_end) = UnixDatagram::pair().unwrap();
        vmm_end.set_nonblocking(true).unwrap();
        let mut dev = Net::new(Dgram(vmm_end), parse_mac("02:00:00:00:00:01").unwrap());
        let mut cfg = [0u8; 6];
        dev.read_config(0, &mut cfg);
        assert_eq!(cfg, [2, 0, 0, 0, 0, 1]);
        let (rxq, txq) = (TestQueue::new(&m, 0x1000), TestQueue::new(&m, 0x2000));
        dev.activate(Activation {
            mem: m.clone(),
            queues: vec![queue_at(&m, &rxq), queue_at(&m, &txq)],
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            acked_features: VIRTIO_NET_F_MAC,
            registrar: Box::new(crate::devices::virtio::mmio::tests::NullRegistrar),
        })
        .unwrap();

        // Guest → host.
        let tx = MockSplitQueue::create(&m, GuestAddress(txq.base), 16);
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(b"an ethernet frame");
        m.write_slice(&frame, GuestAddress(0x4_0000)).unwrap();
        tx.add_desc_chains(
            &[
                d(0x4_0000, frame.len() as u32, false),
                d(0x4_1000, 4, false),
            ],
            0,
        )
        .unwrap();
        dev.queue_notify(TX);
        let mut got = [0u8; 64];
        let n = host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &frame[..]);
        assert_eq!(tx.used().idx().load(), 2, "the runt frame is returned too");

        // Host → guest: waits for buffers, then fills them; a frame larger than the
        // buffer is dropped.
        host.send(&frame).unwrap();
        host.send(&[1u8; 200]).unwrap();
        dev.backend_event(SUB_TAP, libc::EPOLLIN as u32);
        let rx = MockSplitQueue::create(&m, GuestAddress(rxq.base), 16);
        rx.add_desc_chains(&[d(0x5_0000, 100, true), d(0x6_0000, 100, true)], 0)
            .unwrap();
        dev.queue_notify(RX);
        assert_eq!(rx.used().idx().load(), 2);
        let mut first = vec![0u8; frame.len()];
        m.read_slice(&mut first, GuestAddress(0x5_0000)).unwrap();
        assert_eq!(first, frame);
        let used1 = rx.used().ring().ref_at(1).unwrap().load();
        assert_eq!(used1.len(), 0);
    }

    #[test]
    fn parses_macs() {
        assert_eq!(
            parse_mac("aa:bb:cc:dd:ee:ff"),
            Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff])
        );
        assert_eq!(parse_mac("aa:bb:cc:dd:ee"), None);
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:ff:00"), None);
        assert_eq!(parse_mac("zz:bb:cc:dd:ee:ff"), None);
    }
}
