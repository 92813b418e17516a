//! virtio-console with VIRTIO_CONSOLE_F_MULTIPORT and one named port: the agent channel.
//! The guest finds the port by its name (`/sys/class/virtio-ports/*/name`), exactly as
//! with QEMU's `virtio-serial-device` + `virtserialport,name=...`.
//!
//! The host end is a unix socket the VMM listens on; the host's client connects to it.
//! The port is always "host connected" for the guest (as with QEMU's chardev connected
//! at start): guest output waits in a bounded buffer until a client connects.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use tracing::{debug, info, warn};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::queue::{self, QueueError};
use super::{
    read_config_bytes, types, ActivateError, Activation, EventRegistrar, Interrupt, VirtioDevice,
    VIRTIO_MMIO_INT_VRING,
};

/// VIRTIO_CONSOLE_F_MULTIPORT.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;

const QUEUE_SIZE: u16 = 256;
/// Port 0's queues (unused: port 0 is a console port we never add), the control queues,
/// then port 1's.
const RX0: usize = 0;
const CTRL_RX: usize = 2;
const CTRL_TX: usize = 3;
const PORT_RX: usize = 4;
const PORT_TX: usize = 5;
/// Our one port's id.
pub const AGENT_PORT_ID: u32 = 1;
const MAX_PORTS: u32 = 2;

const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;

/// Bytes of guest output kept while no host client is connected.
const MAX_PENDING_TO_HOST: usize = 1 << 20;
/// Largest single chain of guest output taken (the driver sends page-sized buffers; a
/// chain of descriptors all spanning guest RAM must not size our allocation).
const MAX_TX_CHAIN: usize = 256 << 10;
/// Bytes read from the host ahead of the guest's buffers.
const MAX_PENDING_TO_GUEST: usize = 64 << 10;

const SUB_LISTENER: u32 = 256;
const SUB_CONN: u32 = 257;

/// A control message (struct virtio_console_control).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    /// Port id.
    pub id: u32,
    /// Event.
    pub event: u16,
    /// Value.
    pub value: u16,
}

impl Control {
    fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..6].copy_from_slice(&self.event.to_le_bytes());
        b[6..].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    fn from_bytes(b: [u8; 8]) -> Self {
        Self {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        }
    }
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
    registrar: Box<dyn EventRegistrar>,
}

/// The console device with its one named port.
pub struct Console {
    name: String,
    listener: Option<UnixListener>,
    conn: Option<UnixStream>,
    active: Option<Active>,
    ctrl_out: VecDeque<Vec<u8>>,
    to_host: VecDeque<u8>,
    to_guest: VecDeque<u8>,
    guest_open: bool,
    host_eof: bool,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("name", &self.name)
            .field("guest_open", &self.guest_open)
            .finish()
    }
}

impl Console {
    /// A console whose port `name` is served on `listener` (accepting one client at a
    /// time; a new client replaces the old).
    pub fn new(name: &str, listener: Option<UnixListener>) -> Self {
        // Set here, on the building thread: the device threads' seccomp lists leave out
        // the ioctl that does it.
        let listener = listener.filter(|l| l.set_nonblocking(true).is_ok());
        Self {
            name: name.into(),
            listener,
            conn: None,
            active: None,
            ctrl_out: VecDeque::new(),
            to_host: VecDeque::new(),
            to_guest: VecDeque::new(),
            guest_open: false,
            host_eof: false,
        }
    }

    /// A console connected to `conn` (tests, or a pre-connected channel).
    pub fn with_stream(name: &str, conn: UnixStream) -> Self {
        let mut c = Self::new(name, None);
        if conn.set_nonblocking(true).is_ok() {
            c.conn = Some(conn);
        }
        c
    }

    /// Whether the guest has opened the port.
    pub fn guest_open(&self) -> bool {
        self.guest_open
    }

    fn notify(active: &Active) {
        active.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
    }

    fn handle_control(&mut self, msg: Control) {
        debug!(?msg, "console control message");
        match msg.event {
            DEVICE_READY if msg.value == 1 => {
                self.ctrl_out.push_back(
                    Control {
                        id: AGENT_PORT_ID,
                        event: DEVICE_ADD,
                        value: 1,
                    }
                    .to_bytes()
                    .to_vec(),
                );
            }
            DEVICE_READY => warn!("guest failed to initialise the console device"),
            PORT_READY if msg.id == AGENT_PORT_ID && msg.value == 1 => {
                let mut name = Control {
                    id: AGENT_PORT_ID,
                    event: PORT_NAME,
                    value: 1,
                }
                .to_bytes()
                .to_vec();
                name.extend_from_slice(self.name.as_bytes());
                self.ctrl_out.push_back(name);
                self.ctrl_out.push_back(
                    Control {
                        id: AGENT_PORT_ID,
                        event: PORT_OPEN,
                        value: 1,
                    }
                    .to_bytes()
                    .to_vec(),
                );
            }
            PORT_OPEN if msg.id == AGENT_PORT_ID => {
                self.guest_open = msg.value == 1;
                info!(open = self.guest_open, port = %self.name, "guest port open state");
            }
            _ => debug!(?msg, "ignored control message"),
        }
    }

    fn process_ctrl_tx(&mut self) -> Result<(), QueueError> {
        let mut msgs = Vec::new();
        if let Some(active) = self.active.as_mut() {
            let mem = &active.mem;
            let mut used = false;
            while let Some(chain) = queue::pop(&mut active.queues[CTRL_TX], mem)? {
                let head = chain.head_index();
                match queue::reader(&chain, mem) {
                    Ok(mut r) => {
                        let mut b = [0u8; 8];
                        match r.read_exact(&mut b) {
                            Ok(()) => msgs.push(Control::from_bytes(b)),
                            Err(_) => warn!("short console control message"),
                        }
                    }
                    Err(e) => warn!(%e, "bad console control chain"),
                }
                queue::add_used(&mut active.queues[CTRL_TX], mem, head, 0)?;
                used = true;
            }
            if used {
                Self::notify(active);
            }
        }
        let was_open = self.guest_open;
        for m in msgs {
            self.handle_control(m);
        }
        self.flush_ctrl_rx()?;
        if self.guest_open && !was_open {
            // Host data that waited for the guest to open the port goes in now.
            self.pump();
        }
        Ok(())
    }

    fn flush_ctrl_rx(&mut self) -> Result<(), QueueError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mem = &active.mem;
        let mut used = false;
        while let Some(msg) = self.ctrl_out.front() {
            let Some(chain) = queue::pop(&mut active.queues[CTRL_RX], mem)? else {
                break;
            };
            let head = chain.head_index();
            let written = match queue::writer(&chain, mem) {
                Ok(mut w) if w.available_bytes() >= msg.len() => match w.write_all(msg) {
                    Ok(()) => msg.len() as u32,
                    Err(e) => {
                        warn!(%e, "writing a console control message");
                        0
                    }
                },
                Ok(_) => {
                    warn!("console control buffer too small");
                    0
                }
                Err(e) => {
                    warn!(%e, "bad console control rx chain");
                    0
                }
            };
            if written > 0 {
                self.ctrl_out.pop_front();
            }
            queue::add_used(&mut active.queues[CTRL_RX], mem, head, written)?;
            used = true;
        }
        if used {
            Self::notify(active);
        }
        Ok(())
    }

    fn process_port_tx(&mut self) -> Result<(), QueueError> {
        if let Some(active) = self.active.as_mut() {
            let mem = &active.mem;
            let mut used = false;
            while self.to_host.len() < MAX_PENDING_TO_HOST {
                let Some(chain) = queue::pop(&mut active.queues[PORT_TX], mem)? else {
                    break;
                };
                let head = chain.head_index();
                match queue::reader(&chain, mem) {
                    Ok(r) if r.available_bytes() > MAX_TX_CHAIN => {
                        warn!(
                            len = r.available_bytes(),
                            "console tx chain too long: dropped"
                        );
                    }
                    Ok(mut r) => {
                        let mut buf = vec![0u8; r.available_bytes()];
                        match r.read_exact(&mut buf) {
                            Ok(()) => self.to_host.extend(buf),
                            Err(e) => warn!(%e, "reading guest console output"),
                        }
                    }
                    Err(e) => warn!(%e, "bad console tx chain"),
                }
                queue::add_used(&mut active.queues[PORT_TX], mem, head, 0)?;
                used = true;
            }
            if used {
                Self::notify(active);
            }
        }
        self.flush_to_host();
        Ok(())
    }

    fn flush_to_host(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match conn.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_host.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    info!(%e, "agent channel client gone");
                    self.drop_conn();
                    break;
                }
            }
        }
    }

    fn drop_conn(&mut self) {
        if let (Some(conn), Some(active)) = (self.conn.take(), self.active.as_ref()) {
            let _ = active.registrar.remove(conn.as_raw_fd());
        }
        self.to_guest.clear();
    }

    fn read_host(&mut self) {
        while self.to_guest.len() < MAX_PENDING_TO_GUEST && !self.host_eof {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            let mut buf = [0u8; 4096];
            let room = (MAX_PENDING_TO_GUEST - self.to_guest.len()).min(buf.len());
            match conn.read(&mut buf[..room]) {
                Ok(0) => {
                    info!("agent channel client closed");
                    self.drop_conn();
                    return;
                }
                Ok(n) => self.to_guest.extend(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    info!(%e, "agent channel read failed");
                    self.drop_conn();
                    return;
                }
            }
        }
    }

    fn fill_port_rx(&mut self) -> Result<(), QueueError> {
        if !self.guest_open {
            // The guest driver drops data that arrives while the port is closed.
            return Ok(());
        }
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mem = &active.mem;
        let mut used = false;
        while !self.to_guest.is_empty() {
            let Some(chain) = queue::pop(&mut active.queues[PORT_RX], mem)? else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            match queue::writer(&chain, mem) {
                Ok(mut w) => {
                    let n = w.available_bytes().min(self.to_guest.len());
                    let bytes: Vec<u8> = self.to_guest.drain(..n).collect();
                    match w.write_all(&bytes) {
                        Ok(()) => written = n as u32,
                        Err(e) => warn!(%e, "writing to the guest's console buffer"),
                    }
                }
                Err(e) => warn!(%e, "bad console rx chain"),
            }
            queue::add_used(&mut active.queues[PORT_RX], mem, head, written)?;
            used = true;
        }
        if used {
            Self::notify(active);
        }
        Ok(())
    }

    fn pump(&mut self) {
        self.read_host();
        if let Err(e) = self.fill_port_rx() {
            warn!(%e, "console receive queue");
        }
        // Room freed in to_guest: read more.
        if !self.host_eof && self.conn.is_some() && self.to_guest.len() < MAX_PENDING_TO_GUEST {
            self.read_host();
            if let Err(e) = self.fill_port_rx() {
                warn!(%e, "console receive queue");
            }
        }
    }

    fn accept(&mut self) {
        let mut accepted = Vec::new();
        if let Some(listener) = self.listener.as_ref() {
            loop {
                match accept_nonblocking(listener) {
                    Ok(conn) => accepted.push(conn),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        warn!(%e, "accepting on the agent socket");
                        break;
                    }
                }
            }
        }
        for conn in accepted {
            // A new client replaces the old one.
            self.drop_conn();
            if let Some(active) = self.active.as_ref() {
                let events =
                    (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
                if let Err(e) = active.registrar.add(conn.as_raw_fd(), SUB_CONN, events) {
                    warn!(%e, "watching the agent channel client");
                    continue;
                }
            }
            info!("agent channel client connected");
            self.conn = Some(conn);
            self.host_eof = false;
            self.flush_to_host();
        }
    }
}

/// accept4(2) with SOCK_NONBLOCK: one syscall, and no FIONBIO ioctl on the event loop.
fn accept_nonblocking(listener: &UnixListener) -> std::io::Result<UnixStream> {
    // SAFETY: accept4 with null address pointers; the returned fd is owned below.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket owned by nothing else.
    Ok(unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        types::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2 * (MAX_PORTS as usize + 1)]
    }

    fn features(&self) -> u64 {
        VIRTIO_CONSOLE_F_MULTIPORT
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr.
        let mut config = [0u8; 12];
        config[4..8].copy_from_slice(&MAX_PORTS.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if a.acked_features & VIRTIO_CONSOLE_F_MULTIPORT == 0 {
            return Err(ActivateError::Invalid(
                "the driver refused MULTIPORT: the agent port needs it".into(),
            ));
        }
        if let Some(l) = self.listener.as_ref() {
            a.registrar
                .add(l.as_raw_fd(), SUB_LISTENER, libc::EPOLLIN as u32)
                .map_err(ActivateError::Register)?;
        }
        if let Some(c) = self.conn.as_ref() {
            let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
            a.registrar
                .add(c.as_raw_fd(), SUB_CONN, events)
                .map_err(ActivateError::Register)?;
        }
        self.active = Some(Active {
            mem: a.mem,
            queues: a.queues,
            interrupt: a.interrupt,
            registrar: a.registrar,
        });
        // A client already waiting makes the listener readable: the event loop accepts it.
        Ok(())
    }

    fn queue_notify(&mut self, index: usize) {
        let result = match index {
            CTRL_TX => self.process_ctrl_tx(),
            CTRL_RX => self.flush_ctrl_rx(),
            PORT_TX => self.process_port_tx(),
            PORT_RX => {
                self.pump();
                Ok(())
            }
            RX0 | 1 => Ok(()),
            other => {
                warn!(queue = other, "notify of a queue the console does not have");
                Ok(())
            }
        };
        if let Err(e) = result {
            warn!(%e, queue = index, "console queue");
        }
    }

    fn backend_event(&mut self, sub: u32, events: u32) {
        match sub {
            SUB_LISTENER => self.accept(),
            SUB_CONN => {
                if events & libc::EPOLLOUT as u32 != 0 {
                    self.flush_to_host();
                    // Room freed for the guest's pending output.
                    if let Err(e) = self.process_port_tx() {
                        warn!(%e, "console transmit queue");
                    }
                }
                if events & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0 {
                    self.pump();
                }
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            if let Some(l) = self.listener.as_ref() {
                let _ = active.registrar.remove(l.as_raw_fd());
            }
            if let Some(c) = self.conn.as_ref() {
                let _ = active.registrar.remove(c.as_raw_fd());
            }
        }
        self.guest_open = false;
        self.ctrl_out.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::tests::NullRegistrar;
    use crate::devices::virtio::test_util::{queue_at, TestQueue};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write {
            virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    #[test]
    fn port_handshake_names_the_port_and_moves_data() {
        let m = mem();
        let (host, vmm_end) = UnixStream::pair().unwrap();
        let mut dev = Console::with_stream("isola.agent", vmm_end);
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        // Six queues, each in its own 64 KiB slot.
        let mocks: Vec<TestQueue> = (0..6)
            .map(|i| TestQueue::new(&m, 0x1_0000 * (i + 1)))
            .collect();
        let queues = mocks.iter().map(|q| queue_at(&m, q)).collect();
        dev.activate(Activation {
            mem: m.clone(),
            queues,
            interrupt: irq.clone(),
            acked_features: VIRTIO_CONSOLE_F_MULTIPORT | crate::devices::virtio::VIRTIO_F_VERSION_1,
            registrar: Box::new(NullRegistrar),
        })
        .unwrap();

        // The guest posts control rx buffers, then DEVICE_READY.
        let ctrl_rx = MockSplitQueue::create(&m, GuestAddress(mocks[CTRL_RX].base), 16);
        ctrl_rx
            .add_desc_chains(
                &[
                    desc(0x8_0000, 64, true),
                    desc(0x8_1000, 64, true),
                    desc(0x8_2000, 64, true),
                ],
                0,
            )
            .unwrap();
        let ctrl_tx = MockSplitQueue::create(&m, GuestAddress(mocks[CTRL_TX].base), 16);
        m.write_slice(
            &Control {
                id: 0,
                event: DEVICE_READY,
                value: 1,
            }
            .to_bytes(),
            GuestAddress(0x9_0000),
        )
        .unwrap();
        ctrl_tx
            .add_desc_chains(&[desc(0x9_0000, 8, false)], 0)
            .unwrap();
        dev.queue_notify(CTRL_TX);
        let add: [u8; 8] = m.read_obj(GuestAddress(0x8_0000)).unwrap();
        assert_eq!(
            Control::from_bytes(add),
            Control {
                id: 1,
                event: DEVICE_ADD,
                value: 1
            }
        );

        // PORT_READY → PORT_NAME "isola.agent", then PORT_OPEN (host side connected).
        m.write_slice(
            &Control {
                id: 1,
                event: PORT_READY,
                value: 1,
            }
            .to_bytes(),
            GuestAddress(0x9_1000),
        )
        .unwrap();
        ctrl_tx
            .add_desc_chains(&[desc(0x9_1000, 8, false)], 1)
            .unwrap();
        dev.queue_notify(CTRL_TX);
        let mut name = [0u8; 19];
        m.read_slice(&mut name, GuestAddress(0x8_1000)).unwrap();
        assert_eq!(
            Control::from_bytes(name[..8].try_into().unwrap()).event,
            PORT_NAME
        );
        assert_eq!(&name[8..], b"isola.agent");
        let open: [u8; 8] = m.read_obj(GuestAddress(0x8_2000)).unwrap();
        assert_eq!(Control::from_bytes(open).event, PORT_OPEN);
        assert!(irq.eventfd().read().unwrap() > 0);

        // Host data waits until the guest opens the port.
        let mut host = host;
        host.write_all(b"hello").unwrap();
        let port_rx = MockSplitQueue::create(&m, GuestAddress(mocks[PORT_RX].base), 16);
        port_rx
            .add_desc_chains(&[desc(0xa_0000, 4, true), desc(0xa_1000, 64, true)], 0)
            .unwrap();
        dev.backend_event(SUB_CONN, libc::EPOLLIN as u32);
        assert_eq!(
            port_rx.used().idx().load(),
            0,
            "nothing delivered before the guest opens"
        );
        m.write_slice(
            &Control {
                id: 1,
                event: PORT_OPEN,
                value: 1,
            }
            .to_bytes(),
            GuestAddress(0x9_2000),
        )
        .unwrap();
        ctrl_tx
            .add_desc_chains(&[desc(0x9_2000, 8, false)], 2)
            .unwrap();
        dev.queue_notify(CTRL_TX);
        assert!(dev.guest_open());
        // Opening the port delivers what waited, with no further notify.
        assert_eq!(port_rx.used().idx().load(), 2);
        let mut got = [0u8; 5];
        m.read_slice(&mut got[..4], GuestAddress(0xa_0000)).unwrap();
        m.read_slice(&mut got[4..], GuestAddress(0xa_1000)).unwrap();
        assert_eq!(&got, b"hello");

        // Guest output reaches the host.
        let port_tx = MockSplitQueue::create(&m, GuestAddress(mocks[PORT_TX].base), 16);
        m.write_slice(b"world", GuestAddress(0xb_0000)).unwrap();
        port_tx
            .add_desc_chains(&[desc(0xb_0000, 5, false)], 0)
            .unwrap();
        dev.queue_notify(PORT_TX);
        let mut out = [0u8; 5];
        host.read_exact(&mut out).unwrap();
        assert_eq!(&out, b"world");
    }

    #[test]
    fn bad_chains_fail_the_request_only() {
        let m = mem();
        let (_host, vmm_end) = UnixStream::pair().unwrap();
        let mut dev = Console::with_stream("isola.agent", vmm_end);
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mocks: Vec<TestQueue> = (0..6)
            .map(|i| TestQueue::new(&m, 0x1_0000 * (i + 1)))
            .collect();
        let queues = mocks.iter().map(|q| queue_at(&m, q)).collect();
        dev.activate(Activation {
            mem: m.clone(),
            queues,
            interrupt: irq,
            acked_features: VIRTIO_CONSOLE_F_MULTIPORT,
            registrar: Box::new(NullRegistrar),
        })
        .unwrap();
        let ctrl_tx = MockSplitQueue::create(&m, GuestAddress(mocks[CTRL_TX].base), 16);
        // Outside guest memory, then too short, then a good one.
        ctrl_tx
            .add_desc_chains(
                &[
                    desc(0xffff_0000, 8, false),
                    desc(0x9_0000, 2, false),
                    desc(0x9_1000, 8, false),
                ],
                0,
            )
            .unwrap();
        m.write_slice(
            &Control {
                id: 0,
                event: DEVICE_READY,
                value: 1,
            }
            .to_bytes(),
            GuestAddress(0x9_1000),
        )
        .unwrap();
        dev.queue_notify(CTRL_TX);
        assert_eq!(ctrl_tx.used().idx().load(), 3, "every chain is returned");
        assert_eq!(dev.ctrl_out.len(), 1, "the good message was handled");
        // Output chains whose descriptors each span all of guest memory are dropped, not
        // allocated for.
        let port_tx = MockSplitQueue::create(&m, GuestAddress(mocks[PORT_TX].base), 16);
        let whole: Vec<RawDescriptor> = (0..8u16)
            .map(|i| RawDescriptor::from(SplitDescriptor::new(0, 1 << 20, 1, i + 1)))
            .chain(std::iter::once(desc(0, 1 << 20, false)))
            .collect();
        port_tx.add_desc_chains(&whole, 0).unwrap();
        dev.queue_notify(PORT_TX);
        assert_eq!(port_tx.used().idx().load(), 1);
        assert!(dev.to_host.is_empty());
        // A wild avail index is an error of the queue, not a hang or panic.
        ctrl_tx.avail().idx().store(0x8000);
        dev.queue_notify(CTRL_TX);
        dev.queue_notify(42);
    }
}
