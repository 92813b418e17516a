//! Per-process memory figures from /proc/<pid>/status.

/// Resident memory of one process, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessMemory {
    /// VmRSS: everything resident.
    pub rss_kib: u64,
    /// RssAnon: private anonymous pages (the VMM's own heap).
    pub anon_kib: u64,
    /// RssFile: mapped file pages (binaries, libraries).
    pub file_kib: u64,
    /// RssShmem: shared memory; for a VMM with a memfd guest RAM backend these are the
    /// guest pages touched so far.
    pub shmem_kib: u64,
}

impl ProcessMemory {
    /// Reads /proc/`pid`/status; `None` if the process is gone.
    pub fn of(pid: u32) -> Option<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Some(Self {
            rss_kib: field("VmRSS:"),
            anon_kib: field("RssAnon:"),
            file_kib: field("RssFile:"),
            shmem_kib: field("RssShmem:"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_status() {
        let m = ProcessMemory::of(std::process::id()).unwrap();
        assert!(m.rss_kib > 0 && m.rss_kib >= m.anon_kib);
    }
}
