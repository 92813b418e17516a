//! The calling process's mount table (/proc/self/mountinfo).

use std::path::Path;

/// Every mount point at or below `dir`, deepest first.
pub fn under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().trim_end_matches('/').to_owned();
    let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    points
}

/// Whether `dir` itself is a mount point.
pub fn is_mount_point(dir: &Path) -> bool {
    let want = dir.to_string_lossy();
    under(dir)
        .iter()
        .any(|p| p.as_str() == want.trim_end_matches('/'))
}
