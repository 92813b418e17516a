//! virtio-fs as a vhost-user frontend: the queues are served by virtiofsd (the same
//! daemon the QEMU backend uses), which maps guest RAM from the memfd we share.
//!
//! The guest's queue notifications go to virtiofsd straight from KVM (the queue's
//! ioeventfd is virtiofsd's kick fd). virtiofsd's "call" eventfds come back to our event
//! loop, which sets the virtio-mmio interrupt status before raising the IRQ: the mmio
//! driver reads that status, so the call cannot go to KVM as an irqfd directly.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{
    read_config_bytes, types, ActivateError, Activation, EventRegistrar, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
};
use crate::event_loop::FIRST_BACKEND_SUB;

/// hiprio + one request queue.
const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: u16 = 1024;
const TAG_LEN: usize = 36;

/// Errors setting up the vhost-user connection.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag does not fit the config space.
    #[error("virtio-fs tag {0:?} must be 1-36 bytes")]
    Tag(String),
    /// The vhost-user conversation failed.
    #[error("vhost-user {what}: {source}")]
    VhostUser {
        /// The step.
        what: &'static str,
        /// The error.
        source: vhost::Error,
    },
    /// A ring address the driver gave is outside guest memory.
    #[error("queue {0}: ring address {1:#x} outside guest memory")]
    RingAddress(usize, u64),
    /// An eventfd could not be made.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

fn vu(what: &'static str) -> impl FnOnce(vhost::Error) -> FsError {
    move |source| FsError::VhostUser { what, source }
}

struct Active {
    interrupt: Arc<Interrupt>,
    _registrar: Box<dyn EventRegistrar>,
}

/// The virtio-fs device.
pub struct Fs {
    tag: String,
    frontend: Frontend,
    backend_features: u64,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    active: Option<Active>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs").field("tag", &self.tag).finish()
    }
}

impl Fs {
    /// Connects to virtiofsd at `socket` and learns its features; the share is `tag`.
    pub fn connect(tag: &str, socket: &Path) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.into()));
        }
        let frontend = Frontend::connect(socket, NUM_QUEUES as u64).map_err(vu("connect"))?;
        frontend.set_owner().map_err(vu("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(vu("GET_FEATURES"))?;
        let calls = (0..NUM_QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(FsError::EventFd)?;
        Ok(Self {
            tag: tag.into(),
            frontend,
            backend_features,
            kicks: Vec::new(),
            calls,
            active: None,
        })
    }

    fn setup_backend(&mut self, a: &Activation) -> Result<(), FsError> {
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut features = a.acked_features & self.backend_features;
        if self.backend_features & protocol != 0 {
            features |= protocol;
        }
        self.frontend
            .set_features(features)
            .map_err(vu("SET_FEATURES"))?;
        if features & protocol != 0 {
            let offered = self
                .frontend
                .get_protocol_features()
                .map_err(vu("GET_PROTOCOL_FEATURES"))?;
            let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
            self.frontend
                .set_protocol_features(offered & wanted)
                .map_err(vu("SET_PROTOCOL_FEATURES"))?;
        }
        let regions = a
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(vu("guest memory is not shareable (memfd)"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(vu("SET_MEM_TABLE"))?;
        for (i, q) in a.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let host = |addr: u64| -> Result<u64, FsError> {
                a.mem
                    .get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|_| FsError::RingAddress(i, addr))
            };
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, q.size())
                .map_err(vu("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &config)
                .map_err(vu("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, 0)
                .map_err(vu("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &self.calls[i])
                .map_err(vu("SET_VRING_CALL"))?;
            if let Some(kick) = self.kicks.get(i) {
                self.frontend
                    .set_vring_kick(i, kick)
                    .map_err(vu("SET_VRING_KICK"))?;
            }
            if features & protocol != 0 {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(vu("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        types::FS
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }
    fn features(&self) -> u64 {
        // What virtiofsd offers, less the vhost-user-only bit (never shown to the guest).
        self.backend_features
            & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            & !VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; TAG_LEN + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }
    fn wants_queue_events(&mut self, events: Vec<EventFd>) -> bool {
        self.kicks = events;
        true
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.setup_backend(&a)
            .map_err(|e| ActivateError::Invalid(e.to_string()))?;
        for (i, call) in self.calls.iter().enumerate() {
            a.registrar
                .add(
                    call.as_raw_fd(),
                    FIRST_BACKEND_SUB + i as u32,
                    libc::EPOLLIN as u32,
                )
                .map_err(ActivateError::Register)?;
        }
        info!(tag = %self.tag, "virtio-fs backend ready");
        self.active = Some(Active {
            interrupt: a.interrupt,
            _registrar: a.registrar,
        });
        Ok(())
    }
    fn queue_notify(&mut self, index: usize) {
        // Only reached when a notify bypassed the ioeventfd (it should not).
        if let Some(kick) = self.kicks.get(index) {
            if let Err(e) = kick.write(1) {
                warn!(%e, "forwarding a virtio-fs kick");
            }
        }
    }
    fn backend_event(&mut self, sub: u32, _events: u32) {
        let Some(i) = sub.checked_sub(FIRST_BACKEND_SUB) else {
            return;
        };
        if let Some(call) = self.calls.get(i as usize) {
            let _ = call.read();
            if let Some(a) = &self.active {
                a.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
            }
        }
    }
    fn reset(&mut self) {
        if let Some(a) = self.active.take() {
            for call in &self.calls {
                let _ = a._registrar.remove(call.as_raw_fd());
            }
        }
        // virtiofsd has no way back to a fresh device here: a guest that resets virtio-fs
        // loses the share until the VM restarts.
        info!(tag = %self.tag, "virtio-fs reset by the guest");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::tests::NullRegistrar;
    use crate::devices::virtio::test_util::{queue_at, TestQueue};
    use std::time::{Duration, Instant};

    /// Against the real virtiofsd (the one the QEMU backend runs): the vhost-user
    /// handshake, features, config space, memory table and rings, and a "call" from
    /// virtiofsd raising the virtio-mmio interrupt with its status bit.
    #[test]
    fn sets_up_virtiofsd_and_forwards_its_calls() {
        let bin = crate::virtiofsd::binary();
        assert!(
            bin.is_file(),
            "virtiofsd missing at {}: run deploy/guest/build-assets.sh",
            bin.display()
        );
        assert!(matches!(
            Fs::connect("", Path::new("/nonexistent")),
            Err(FsError::Tag(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let sock = dir.path().join("fs.sock");
        let mut child = crate::virtiofsd::spawn(&sock, &share).unwrap();

        let mut fs = Fs::connect("share", &sock).unwrap();
        assert_eq!(fs.device_type(), types::FS);
        let mut cfg = [0u8; 40];
        fs.read_config(0, &mut cfg);
        assert_eq!(&cfg[..5], b"share");
        assert_eq!(u32::from_le_bytes([cfg[36], cfg[37], cfg[38], cfg[39]]), 1);
        assert_eq!(
            fs.features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0,
            "the vhost-user bit is not for the guest"
        );

        let mem = crate::vmm::guest_memory(1 << 20, true).unwrap();
        let kicks: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        assert!(fs.wants_queue_events(kicks));
        let queues = [0x1000, 0x4000]
            .iter()
            .map(|&b| queue_at(&mem, &TestQueue::new(&mem, b)))
            .collect();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        fs.activate(Activation {
            mem: mem.clone(),
            queues,
            interrupt: irq.clone(),
            acked_features: VIRTIO_F_VERSION_1,
            registrar: Box::new(NullRegistrar),
        })
        .expect("virtiofsd takes the memory table and rings");

        fs.calls[1].write(1).unwrap();
        fs.backend_event(FIRST_BACKEND_SUB + 1, libc::EPOLLIN as u32);
        assert_eq!(irq.status() & VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_VRING);
        assert!(irq.eventfd().read().unwrap() >= 1);

        // virtiofsd exits once its frontend goes away.
        fs.reset();
        drop(fs);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("virtiofsd outlived its frontend");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
