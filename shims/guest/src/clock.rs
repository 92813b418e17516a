//! Guest clock readings for the boot timestamps of the hello.

/// Nanoseconds on `clock` (CLOCK_BOOTTIME, CLOCK_MONOTONIC, ...); 0 if it cannot be read.
pub fn now_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The first field of /proc/uptime in milliseconds; 0 if unreadable.
pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|secs| (secs * 1000.0) as u64)
        .unwrap_or(0)
}

/// Clock readings taken at one point of the boot.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stamp {
    /// CLOCK_BOOTTIME in ns.
    pub boottime_ns: u64,
    /// CLOCK_MONOTONIC in ns.
    pub monotonic_ns: u64,
}

impl Stamp {
    /// Reads both clocks now.
    pub fn now() -> Self {
        Self {
            boottime_ns: now_ns(libc::CLOCK_BOOTTIME),
            monotonic_ns: now_ns(libc::CLOCK_MONOTONIC),
        }
    }
}
