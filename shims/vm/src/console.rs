//! Reading the guest's serial console log.

use std::path::Path;

/// The marker the kernel prints on a panic.
pub const PANIC_MARKER: &str = "Kernel panic - not syncing";

/// The first panic line of the console log at `path`, from the marker on.
pub fn find_panic(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    text.lines()
        .find_map(|l| l.find(PANIC_MARKER).map(|i| l[i..].trim_end().to_string()))
}

/// The last `n` lines of the file at `path` (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_panic_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(
            &log,
            "boot\n[    1.2] Kernel panic - not syncing: No working init found.  Try passing init= option\n[    1.3] ---[ end\n",
        )
        .unwrap();
        assert_eq!(
            find_panic(&log).unwrap(),
            "Kernel panic - not syncing: No working init found.  Try passing init= option"
        );
        assert_eq!(tail(&log, 1), "[    1.3] ---[ end");
        std::fs::write(&log, "fine\n").unwrap();
        assert_eq!(find_panic(&log), None);
    }
}
