//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2): one register window
//! per device, declared to the guest with `virtio_mmio.device=4K@<base>:<irq>`.

use std::sync::Arc;

use tracing::{debug, info, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Activation, EventRegistrar, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x414c_4f53; // "SOLA"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration.
pub const REG_CONFIG: u64 = 0x100;

/// The queue-notify register's offset (its ioeventfds are registered there).
pub const QUEUE_NOTIFY_OFFSET: u64 = REG_QUEUE_NOTIFY;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

/// One device behind its register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    registrar: Option<Box<dyn EventRegistrar>>,
    make_registrar: Box<dyn Fn() -> Box<dyn EventRegistrar> + Send>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("type", &self.device.device_type())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish()
    }
}

impl MmioTransport {
    /// A transport for `device`; `make_registrar` gives each activation its event-loop
    /// handle.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        make_registrar: Box<dyn Fn() -> Box<dyn EventRegistrar> + Send>,
    ) -> Self {
        let queues = Self::fresh_queues(device.as_ref());
        Self {
            device,
            mem,
            interrupt,
            registrar: None,
            make_registrar,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            config_generation: 0,
        }
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect()
    }

    /// The device's queue count.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Whether the driver has set DRIVER_OK and the device runs.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device's status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Queue `index` was notified (ioeventfd or a trapped write).
    pub fn queue_notify(&mut self, index: usize) {
        if self.activated {
            self.device.queue_notify(index);
        }
    }

    /// A backend fd of the device is ready.
    pub fn backend_event(&mut self, sub: u32, events: u32) {
        if self.activated {
            self.device.backend_event(sub, events);
        }
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let sel = self.queue_sel as usize;
        // Queue registers are writable only before DRIVER_OK.
        if self.activated {
            return None;
        }
        self.queues.get_mut(sel)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.registrar = None;
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
        self.queues = Self::fresh_queues(self.device.as_ref());
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            debug!(device = self.device.device_type(), "driver reset");
            self.reset();
            return;
        }
        if value & STATUS_FEATURES_OK != 0
            && self.status & STATUS_FEATURES_OK == 0
            && self.driver_features & !self.offered_features() != 0
        {
            warn!(
                device = self.device.device_type(),
                features = self.driver_features,
                "driver accepted features we did not offer"
            );
            self.status = value & !STATUS_FEATURES_OK;
            return;
        }
        let was_ok = self.status & STATUS_DRIVER_OK != 0;
        self.status = value;
        if value & STATUS_DRIVER_OK != 0 && !was_ok && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let wanted = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        if self.status & wanted != wanted {
            warn!(status = self.status, "DRIVER_OK without the earlier steps");
            self.status |= STATUS_FAILED;
            return;
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                warn!(
                    device = self.device.device_type(),
                    queue = i,
                    "invalid queue set-up"
                );
                self.status |= STATUS_FAILED;
                return;
            }
        }
        let queues = std::mem::replace(&mut self.queues, Self::fresh_queues(self.device.as_ref()));
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
            registrar: (self.make_registrar)(),
        };
        match self.device.activate(activation) {
            Ok(()) => {
                self.activated = true;
                info!(
                    device = self.device.device_type(),
                    "virtio device activated"
                );
            }
            Err(e) => {
                warn!(device = self.device.device_type(), %e, "activation failed");
                self.status |= STATUS_FAILED;
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| u32::from(q.max_size()))
                .unwrap_or(0),
            REG_QUEUE_READY => {
                if self.activated {
                    1
                } else {
                    self.queues
                        .get(self.queue_sel as usize)
                        .map(|q| u32::from(q.ready()))
                        .unwrap_or(0)
                }
            }
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!(offset, "read of an unknown virtio-mmio register");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if self.status & STATUS_FEATURES_OK != 0 {
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    match u16::try_from(value) {
                        Ok(size) => q.set_size(size),
                        Err(_) => warn!(value, "queue size out of range"),
                    }
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_NOTIFY => self.queue_notify(value as usize),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            REG_QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            REG_QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            REG_QUEUE_AVAIL_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            REG_QUEUE_AVAIL_HIGH => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_USED_LOW => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            REG_QUEUE_USED_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => debug!(offset, value, "write to an unknown virtio-mmio register"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            warn!(
                offset,
                len = data.len(),
                "unaligned virtio-mmio register read"
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn!(
                offset,
                len = data.len(),
                "virtio-mmio register write not 32-bit"
            );
            return;
        };
        if offset & 3 != 0 {
            warn!(offset, "unaligned virtio-mmio register write");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    /// A registrar that records nothing (devices under test need no event loop).
    pub(crate) struct NullRegistrar;
    impl EventRegistrar for NullRegistrar {
        fn add(&self, _fd: i32, _sub: u32, _events: u32) -> std::io::Result<()> {
            Ok(())
        }
        fn remove(&self, _fd: i32) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct Probe {
        activated: Arc<Mutex<Option<(usize, u64)>>>,
        notified: Arc<Mutex<Vec<usize>>>,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            3
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            1 << 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4], offset, data);
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            *self.activated.lock().unwrap() = Some((a.queues.len(), a.acked_features));
            Ok(())
        }
        fn queue_notify(&mut self, index: usize) {
            self.notified.lock().unwrap().push(index);
        }
        fn reset(&mut self) {}
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }
    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn transport(probe: Probe) -> MmioTransport {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Arc::new(Interrupt::new(
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        MmioTransport::new(
            Box::new(probe),
            mem,
            irq,
            Box::new(|| Box::new(NullRegistrar)),
        )
    }

    #[test]
    fn driver_handshake_activates() {
        let probe = Probe::default();
        let activated = probe.activated.clone();
        let notified = probe.notified.clone();
        let mut t = transport(probe);
        assert_eq!(r(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 3);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1");
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 2);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        for (sel, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
            w(&mut t, REG_QUEUE_SEL, sel);
            assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
            w(&mut t, REG_QUEUE_NUM, 16);
            w(&mut t, REG_QUEUE_DESC_LOW, base);
            w(&mut t, REG_QUEUE_DESC_HIGH, 0);
            w(&mut t, REG_QUEUE_AVAIL_LOW, base + 0x100);
            w(&mut t, REG_QUEUE_AVAIL_HIGH, 0);
            w(&mut t, REG_QUEUE_USED_LOW, base + 0x200);
            w(&mut t, REG_QUEUE_USED_HIGH, 0);
            w(&mut t, REG_QUEUE_READY, 1);
        }
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(t.is_activated());
        assert_eq!(
            *activated.lock().unwrap(),
            Some((2, VIRTIO_F_VERSION_1 | 2))
        );
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(*notified.lock().unwrap(), vec![1]);
        let mut cfg = [0u8; 4];
        t.read(REG_CONFIG + 2, &mut cfg);
        assert_eq!(cfg, [3, 4, 0, 0]);
        w(&mut t, REG_STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(r(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn refuses_bad_set_up() {
        let mut t = transport(Probe::default());
        // Features we never offered.
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, REG_DRIVER_FEATURES, 1 << 20);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        w(&mut t, REG_STATUS, 0);
        // A queue outside guest memory.
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 16);
        w(&mut t, REG_QUEUE_DESC_LOW, 0xffff_0000);
        w(&mut t, REG_QUEUE_READY, 1);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(!t.is_activated());
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_FAILED, 0);
        // Odd sizes and out-of-range selectors are ignored, not fatal.
        t.write(REG_STATUS, &[1]);
        let mut b = [0u8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        w(&mut t, REG_QUEUE_SEL, 99);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
        w(&mut t, REG_QUEUE_NUM, 8);
    }
}
