//! The device event loop: one thread waiting on every queue's ioeventfd and every
//! backend fd (sockets, TAPs), calling the owning device.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use tracing::{debug, trace, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::EventRegistrar;

/// Backend tokens start here; below are queue indices.
pub const FIRST_BACKEND_SUB: u32 = 256;
const STOP_TOKEN: u64 = u64::MAX;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// An epoll call failed.
    #[error("epoll: {0}")]
    Epoll(std::io::Error),
}

fn token(device: u32, sub: u32) -> u64 {
    (u64::from(device) << 32) | u64::from(sub)
}

/// Registers fds of device `device` on the shared epoll.
#[derive(Debug, Clone)]
pub struct EpollRegistrar {
    epoll: Arc<Epoll>,
    device: u32,
}

impl EventRegistrar for EpollRegistrar {
    fn add(&self, fd: RawFd, sub: u32, events: u32) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(
                EventSet::from_bits_truncate(events),
                token(self.device, sub),
            ),
        )
    }
    fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

struct Device {
    transport: Arc<Mutex<MmioTransport>>,
    queue_events: Vec<EventFd>,
}

/// The loop's state, built before the VM runs.
pub struct EventLoop {
    epoll: Arc<Epoll>,
    devices: Vec<Device>,
    stop: EventFd,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("devices", &self.devices.len())
            .finish()
    }
}

impl EventLoop {
    /// An empty loop.
    pub fn new() -> Result<Self, EventLoopError> {
        let epoll = Arc::new(Epoll::new().map_err(EventLoopError::Epoll)?);
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .map_err(EventLoopError::Epoll)?;
        Ok(Self {
            epoll,
            devices: Vec::new(),
            stop,
        })
    }

    /// The registrar the next device added will get (its index is the device count).
    pub fn registrar_for_next(&self) -> EpollRegistrar {
        EpollRegistrar {
            epoll: self.epoll.clone(),
            device: self.devices.len() as u32,
        }
    }

    /// Adds a device and watches its queue eventfds.
    pub fn add_device(
        &mut self,
        transport: Arc<Mutex<MmioTransport>>,
        queue_events: Vec<EventFd>,
    ) -> Result<(), EventLoopError> {
        let index = self.devices.len() as u32;
        for (q, evt) in queue_events.iter().enumerate() {
            self.epoll
                .ctl(
                    ControlOperation::Add,
                    evt.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token(index, q as u32)),
                )
                .map_err(EventLoopError::Epoll)?;
        }
        self.devices.push(Device {
            transport,
            queue_events,
        });
        Ok(())
    }

    /// An eventfd that ends [`run`](Self::run) when written.
    pub fn stop_handle(&self) -> std::io::Result<EventFd> {
        self.stop.try_clone()
    }

    /// Serves events until the stop eventfd is written.
    pub fn run(&self) -> Result<(), EventLoopError> {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(EventLoopError::Epoll(e)),
            };
            for ev in &events[..n] {
                let data = ev.data();
                if data == STOP_TOKEN {
                    debug!("event loop stopping");
                    return Ok(());
                }
                let (dev, sub) = ((data >> 32) as usize, data as u32);
                let Some(device) = self.devices.get(dev) else {
                    warn!(dev, "event for an unknown device");
                    continue;
                };
                trace!(dev, sub, "event");
                if sub < FIRST_BACKEND_SUB {
                    if let Some(evt) = device.queue_events.get(sub as usize) {
                        // Drain the counter; one pass serves every notification.
                        let _ = evt.read();
                    }
                    let mut t = device.transport.lock().unwrap_or_else(|e| e.into_inner());
                    t.queue_notify(sub as usize);
                } else {
                    let mut t = device.transport.lock().unwrap_or_else(|e| e.into_inner());
                    t.backend_event(sub, ev.events);
                }
            }
        }
    }
}
