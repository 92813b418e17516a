//! A CMOS RTC (MC146818) at ports 0x70/0x71: the wall clock in BCD, with the
//! update-in-progress bit always clear. Without it the guest's rtc_cmos probe spins on
//! all-ones reads for seconds.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::devices::bus::BusDevice;

/// The index port; data is at +1.
pub const RTC_BASE: u64 = 0x70;
/// Ports the device takes.
pub const RTC_PORTS: u64 = 2;

const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// The RTC and its 128 bytes of CMOS RAM.
#[derive(Debug)]
pub struct Rtc {
    index: u8,
    ram: [u8; 128],
    clock: fn() -> u64,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::with_clock(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        })
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Rtc {
    /// An RTC reading seconds since the epoch from `clock`.
    pub fn with_clock(clock: fn() -> u64) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A as usize] = 0x26; // 32.768 kHz base, 1024 Hz rate, UIP clear
        ram[REG_B as usize] = 0x02; // 24-hour mode, BCD
        ram[REG_D as usize] = 0x80; // valid RAM and time
        Self {
            index: 0,
            ram,
            clock,
        }
    }

    fn register(&self, index: u8) -> u8 {
        let now = (self.clock)();
        let days = (now / 86_400) as i64;
        let secs = now % 86_400;
        let (year, month, day) = civil(days);
        match index {
            0x00 => bcd(secs % 60),
            0x02 => bcd((secs / 60) % 60),
            0x04 => bcd(secs / 3600),
            0x06 => bcd(((days + 4).rem_euclid(7) + 1) as u64), // 1970-01-01 was a Thursday
            0x07 => bcd(day),
            0x08 => bcd(month),
            0x09 => bcd(year.rem_euclid(100) as u64),
            REG_CENTURY => bcd(year.div_euclid(100).max(0) as u64),
            REG_C => 0, // no interrupt pending
            i => self.ram[usize::from(i & 0x7f)],
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index,
            1 => self.register(self.index),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask; the index is the low 7 bits.
            0 => self.index = value & 0x7f,
            1 => match self.index {
                // Time registers and status C/D are read-only here: the guest cannot set
                // the host clock, and alarms are not offered.
                0x00..=0x09 | REG_C | REG_D | REG_CENTURY => {}
                // Keep UIP clear whatever the guest writes.
                REG_A => self.ram[REG_A as usize] = value & 0x7f,
                i => self.ram[usize::from(i)] = value,
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(0, &[index]);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        b[0]
    }

    #[test]
    fn reads_the_clock_in_bcd() {
        // 2026-11-28 06:21:17 UTC, a Saturday.
        let mut rtc = Rtc::with_clock(|| 1_795_846_877);
        assert_eq!(read(&mut rtc, 0x00), 0x17);
        assert_eq!(read(&mut rtc, 0x02), 0x21);
        assert_eq!(read(&mut rtc, 0x04), 0x06);
        assert_eq!(read(&mut rtc, 0x07), 0x28);
        assert_eq!(read(&mut rtc, 0x08), 0x11);
        assert_eq!(read(&mut rtc, 0x09), 0x26);
        assert_eq!(read(&mut rtc, REG_CENTURY), 0x20);
        assert_eq!(read(&mut rtc, 0x06), 0x07);
        assert_eq!(
            read(&mut rtc, REG_A) & 0x80,
            0,
            "update in progress must stay clear"
        );
        rtc.write(0, &[REG_A]);
        rtc.write(1, &[0xff]);
        assert_eq!(read(&mut rtc, REG_A) & 0x80, 0);
        // NMI-mask bit on the index port is ignored; CMOS RAM keeps what is written.
        rtc.write(0, &[0x80 | 0x40]);
        rtc.write(1, &[0x5a]);
        assert_eq!(read(&mut rtc, 0x40), 0x5a);
        rtc.write(0, &[0x00]);
        rtc.write(1, &[0x99]);
        assert_eq!(read(&mut rtc, 0x00), 0x17);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
    }
}
