//! PC devices the guest kernel expects without ACPI: the 8250 UART and the CMOS RTC.

pub mod rtc;
pub mod serial;
