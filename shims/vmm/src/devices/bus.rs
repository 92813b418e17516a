//! Dispatch of port-IO and MMIO exits to the device that owns the address.

use std::sync::{Arc, Mutex};

use tracing::trace;

/// A device on a bus: reads and writes at an offset into its range.
pub trait BusDevice: Send {
    /// Fills `data` from the register at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` to the register at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Errors inserting a device.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range overlaps one already taken.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// An address space of devices (the port-IO space or the MMIO space).
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|r| (r.base, r.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base..base+len`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base.saturating_add(len);
        if self
            .ranges
            .iter()
            .any(|r| base < r.base.saturating_add(r.len) && r.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        self.ranges
            .iter()
            .find(|r| addr >= r.base && addr - r.base < r.len)
            .map(|r| (r, addr - r.base))
    }

    /// A read at `addr`; `false` if no device is there (`data` is then all ones, as an
    /// absent ISA device reads).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((r, offset)) => {
                // A poisoned lock means a device thread panicked: keep serving the others.
                let mut dev = r.device.lock().unwrap_or_else(|e| e.into_inner());
                dev.read(offset, data);
                true
            }
            None => {
                trace!(addr, "read of an unclaimed address");
                data.fill(0xff);
                false
            }
        }
    }

    /// A write at `addr`; `false` if no device is there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((r, offset)) => {
                let mut dev = r.device.lock().unwrap_or_else(|e| e.into_inner());
                dev.write(offset, data);
                true
            }
            None => {
                trace!(addr, "write to an unclaimed address");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_and_refuses_overlaps() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Reg(1))), 0x70, 2).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Reg(0))), 0x71, 4).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x71, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.write(0x70, &[9]));
        assert!(bus.read(0x70, &mut b));
        assert_eq!(b[0], 9);
        assert!(!bus.read(0x72, &mut b));
        assert_eq!(b[0], 0xff);
    }
}
