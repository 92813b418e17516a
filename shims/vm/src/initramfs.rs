//! A writer for the initramfs format the kernel unpacks: cpio "newc" (SVR4, no CRC),
//! uncompressed (nothing to decompress at boot, which matters under TCG).

use std::io::{self, Write};
use std::path::Path;

/// Errors building an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// Reading an input or writing the archive failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// A path in the archive is not usable.
    #[error("invalid archive path {0:?}")]
    Path(String),
    /// A file is too large for the 32-bit size field.
    #[error("{0} is too large for a newc archive")]
    TooLarge(String),
}

/// Builds a newc archive in memory, entry by entry.
#[derive(Debug, Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;
const S_IFLNK: u32 = 0o120000;

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        Self {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    fn pad_to(&mut self, align: usize) {
        let len = self.out.len();
        self.out.resize(len.next_multiple_of(align), 0);
    }

    fn pad4(&mut self) {
        self.pad_to(4);
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), InitramfsError> {
        let name = name.trim_start_matches('/');
        if name.is_empty() && mode != 0 || name.contains('\0') || name.split('/').any(|c| c == "..")
        {
            return Err(InitramfsError::Path(name.into()));
        }
        let size = u32::try_from(data.len()).map_err(|_| InitramfsError::TooLarge(name.into()))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad4();
        self.out.extend_from_slice(data);
        self.pad4();
        Ok(())
    }

    /// Adds a directory (parents must be added first).
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), InitramfsError> {
        self.entry(path, S_IFDIR | (perm & 0o7777), (0, 0), &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), InitramfsError> {
        self.entry(path, S_IFREG | (perm & 0o7777), (0, 0), data)
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), InitramfsError> {
        self.entry(path, S_IFCHR | (perm & 0o7777), (major, minor), &[])
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), InitramfsError> {
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.next_ino = 0;
        // The trailer entry has inode 0 and mode 0.
        let _ = self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // The kernel reads initramfs in 512-byte blocks like cpio: pad for tools that check.
        self.pad_to(512);
        self.out
    }
}

/// A file to add beside /init: host `source` at guest `target` (absolute).
#[derive(Debug, Clone)]
pub struct ExtraFile {
    /// Host path.
    pub source: std::path::PathBuf,
    /// Guest path.
    pub target: String,
}

/// The guest initramfs: the skeleton directories, /dev/console, `init` as /init and the
/// `extra` files (their parent directories are created as needed).
pub fn guest_initramfs(init: &Path, extra: &[ExtraFile]) -> Result<Vec<u8>, InitramfsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| InitramfsError::Io {
            what: format!("read {}", p.display()),
            source,
        })
    };
    let mut w = CpioWriter::new();
    let mut dirs: Vec<String> = Vec::new();
    for d in ["dev", "proc", "sys", "run", "tmp", "mnt", "etc", "root"] {
        w.dir(d, if d == "tmp" { 0o1777 } else { 0o755 })?;
        dirs.push(d.into());
    }
    // The kernel opens /dev/console for init's stdio before anything mounts devtmpfs.
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("init", 0o755, &read(init)?)?;
    for f in extra {
        let target = f.target.trim_start_matches('/');
        let parts: Vec<&str> = target.split('/').collect();
        for i in 1..parts.len() {
            let d = parts[..i].join("/");
            if !dirs.contains(&d) {
                w.dir(&d, 0o755)?;
                dirs.push(d);
            }
        }
        let perm = std::fs::metadata(&f.source)
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode() & 0o777
            })
            .unwrap_or(0o644);
        w.file(target, perm, &read(&f.source)?)?;
    }
    Ok(w.finish())
}

/// Writes `bytes` to `path` atomically (temp file + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), InitramfsError> {
    let tmp = path.with_extension("tmp");
    let io = |what: &str, source| InitramfsError::Io {
        what: format!("{what} {}", path.display()),
        source,
    };
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("create", e))?;
    f.write_all(bytes).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("sync", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("rename", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut w = CpioWriter::new();
        w.dir("dev", 0o755).unwrap();
        w.file("/init", 0o755, b"hello").unwrap();
        let out = w.finish();
        assert_eq!(out.len() % 512, 0);
        assert_eq!(&out[..6], b"070701");
        // dir header: ino 1, mode 040755
        assert_eq!(&out[6..22], b"00000001000041ed");
        // name "dev\0" at 110, padded to 116 (110 + 4 = 114 → 116)
        assert_eq!(&out[110..114], b"dev\0");
        let second = 116;
        assert_eq!(&out[second..second + 6], b"070701");
        // filesize field of the file entry is the 7th field
        let size_field = second + 6 + 6 * 8;
        assert_eq!(&out[size_field..size_field + 8], b"00000005");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!"));
        assert!(w_rejects_dotdot());
    }

    fn w_rejects_dotdot() -> bool {
        CpioWriter::new().file("a/../b", 0o644, b"").is_err()
    }

    #[test]
    fn cpio_tool_reads_it_back() {
        // Cross-check with GNU cpio where it is installed.
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("init-bin");
        std::fs::write(&init, b"#!/bin/true\n").unwrap();
        let bytes = guest_initramfs(
            &init,
            &[ExtraFile {
                source: init.clone(),
                target: "/lib/modules/x.ko".into(),
            }],
        )
        .unwrap();
        let out = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(&bytes)?;
                c.wait_with_output()
            })
            .unwrap();
        let list = String::from_utf8_lossy(&out.stdout);
        for name in ["dev/console", "init", "lib/modules/x.ko", "proc"] {
            assert!(list.lines().any(|l| l == name), "{name} missing in {list}");
        }
    }
}
