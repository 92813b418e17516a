//! Disk usage of a directory tree, counted as `du` does: allocated blocks, and each inode
//! once however many hard links it has.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bytes and inodes used under a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsUsage {
    /// The directory measured (for ImageFsInfo: the image store's root, which kubelet
    /// resolves to its file system).
    pub path: PathBuf,
    /// Bytes of allocated blocks.
    pub used_bytes: u64,
    /// Distinct inodes, the directory itself included.
    pub inodes_used: u64,
}

/// Measures the tree at `root` without following symlinks. Entries that vanish while it
/// walks (a pull or a container writing) are skipped.
pub(crate) fn measure(root: &Path) -> io::Result<FsUsage> {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut bytes = 0u64;
    let mut stack = vec![root.to_path_buf()];
    let top = std::fs::symlink_metadata(root)?;
    seen.insert((top.dev(), top.ino()));
    bytes += top.blocks() * 512;
    while let Some(dir) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in rd {
            let Ok(entry) = entry else { continue };
            let Ok(md) = entry.path().symlink_metadata() else {
                continue;
            };
            if seen.insert((md.dev(), md.ino())) {
                bytes += md.blocks() * 512;
            }
            if md.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(FsUsage {
        path: root.to_path_buf(),
        used_bytes: bytes,
        inodes_used: seen.len() as u64,
    })
}
