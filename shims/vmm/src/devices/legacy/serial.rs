//! The 8250 UART at COM1 (vm-superio's model), its output appended to the console log
//! and its interrupt raised through an irqfd.

use std::io::Write;

use tracing::warn;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// COM1's port base.
pub const COM1_BASE: u64 = 0x3f8;
/// Ports of one UART.
pub const UART_PORTS: u64 = 8;

/// Raises the serial IRQ by writing the eventfd KVM routes to the GSI.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART on the port-IO bus.
pub struct SerialDevice<W: Write + Send> {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, W>,
}

impl<W: Write + Send> std::fmt::Debug for SerialDevice<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialDevice")
    }
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART writing to `out`, interrupting through `irq`.
    pub fn new(irq: EventFd, out: W) -> Self {
        Self {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// The sink (for tests).
    pub fn output(&self) -> &W {
        self.serial.writer()
    }
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match u8::try_from(offset) {
            Ok(o) if data.len() == 1 => self.serial.read(o),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(o), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.serial.write(o, *value) {
            warn!(?e, "serial write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmits_to_the_sink_and_interrupts() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Vec::new());
        dev.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(dev.output(), b"hi\n");
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        dev.write(0, &[1, 2]); // ignored
        assert_eq!(dev.output(), b"hi\n");
    }
}
