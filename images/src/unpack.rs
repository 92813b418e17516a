//! Unpacking one layer tar into a directory of its own, as overlayfs wants it.
//!
//! The `tar` crate parses the stream (headers, GNU long names, PAX records), but the files
//! are written here, not by `tar::Entry::unpack_in`: that follows symlinks already in the
//! destination and checks paths only lexically, so a layer with `lib -> /` followed by
//! `lib/etc/shadow`, or a hard link to `../../x`, could write outside the layer. Here every
//! entry is created relative to a directory file descriptor reached one component at a
//! time with `O_NOFOLLOW` (openat-style), so no symlink inside the layer is ever followed
//! while unpacking; `..` may not climb above the layer root in an entry path, a hard-link
//! target or a relative symlink target. A refused entry fails the whole layer, and the
//! caller removes the directory: nothing of that layer stays on disk.
//!
//! Docker whiteouts become overlayfs whiteouts: `.wh.NAME` is a character device 0/0 named
//! NAME, and `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::error::{Error, IoContext, Result};

const WHITEOUT_PREFIX: &str = ".wh.";
const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
const WHITEOUT_META_PREFIX: &str = ".wh..wh.";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// What unpacking a layer found out.
#[derive(Debug, Clone)]
pub(crate) struct Unpacked {
    /// `sha256:` digest of the uncompressed tar stream (the layer's diff id).
    pub diff_id: String,
}

/// Unpacks the layer blob at `blob` (gzip, zstd or plain tar; recognised by its magic
/// bytes) into the existing empty directory `dest`. `layer` names the layer in errors.
pub(crate) fn unpack_layer(blob: &Path, layer: &str, dest: &Path) -> Result<Unpacked> {
    let file = File::open(blob).ctx(|| format!("open blob {}", blob.display()))?;
    let mut file = io::BufReader::with_capacity(256 * 1024, file);
    let magic = {
        use std::io::BufRead;
        let buf = file
            .fill_buf()
            .ctx(|| format!("read blob {}", blob.display()))?;
        buf.get(..4).map(|b| [b[0], b[1], b[2], b[3]])
    };
    let decompressed: Box<dyn Read> = match magic {
        Some([0x1f, 0x8b, _, _]) => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Some([0x28, 0xb5, 0x2f, 0xfd]) => Box::new(
            zstd::stream::read::Decoder::with_buffer(file)
                .ctx(|| format!("zstd decoder for {layer}"))?,
        ),
        _ => Box::new(file),
    };
    unpack_tar(decompressed, layer, dest)
}

/// Unpacks an uncompressed tar stream into `dest`; see [`unpack_layer`].
pub(crate) fn unpack_tar(reader: impl Read, layer: &str, dest: &Path) -> Result<Unpacked> {
    let hashing = HashingReader {
        inner: reader,
        hasher: Sha256::new(),
    };
    let mut archive = tar::Archive::new(hashing);
    let root = open_dir_path(dest).ctx(|| format!("open layer directory {}", dest.display()))?;
    let mut unpacker = Unpacker {
        layer,
        root,
        dirs: Vec::new(),
    };
    let bad = |e: io::Error| Error::BadLayer {
        layer: layer.to_string(),
        detail: e.to_string(),
    };
    for entry in archive.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        unpacker.entry(entry)?;
    }
    unpacker.finish()?;
    // The tar reader stops at the end-of-archive blocks; the diff id covers every byte.
    let mut hashing = archive.into_inner();
    io::copy(&mut hashing, &mut io::sink()).map_err(bad)?;
    Ok(Unpacked {
        diff_id: format!("sha256:{}", hex::encode(hashing.hasher.finalize())),
    })
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Metadata of one entry, with PAX records applied over the header.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: libc::timespec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

struct Unpacker<'a> {
    layer: &'a str,
    root: OwnedFd,
    /// Directories whose mtime is set at the end, when nothing more is written into them.
    dirs: Vec<(Vec<OsString>, libc::timespec)>,
}

impl Unpacker<'_> {
    fn refuse(&self, entry: &[u8], why: impl Into<String>) -> Error {
        Error::UnsafeLayer {
            layer: self.layer.to_string(),
            entry: String::from_utf8_lossy(entry).into_owned(),
            why: why.into(),
        }
    }

    fn io_err(&self, entry: &[u8], what: &str, e: io::Error) -> Error {
        Error::io(
            format!(
                "layer {}: {what} {:?}",
                self.layer,
                String::from_utf8_lossy(entry)
            ),
            e,
        )
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<()> {
        let raw_path = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let comps = clean_path(&raw_path)
            .ok_or_else(|| self.refuse(&raw_path, "path leaves the layer directory"))?;
        let meta = self.meta(&mut entry, &raw_path)?;

        let Some((name, parents)) = comps.split_last() else {
            // "./": the layer root itself.
            if kind.is_dir() {
                self.apply_dir_meta(&raw_path, &[], &meta)?;
            }
            return Ok(());
        };
        let parent = self.walk(parents, true, &raw_path)?;
        let name_bytes = name.as_bytes();

        // Whiteouts.
        if name_bytes.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            if name_bytes == WHITEOUT_OPAQUE.as_bytes() {
                let dir = openat(
                    parent.as_raw_fd(),
                    OsStr::new("."),
                    libc::O_RDONLY | libc::O_DIRECTORY,
                    0,
                )
                .map_err(|e| self.io_err(&raw_path, "open opaque directory", e))?;
                fsetxattr(dir.as_raw_fd(), &cstring(OPAQUE_XATTR), b"y")
                    .map_err(|e| self.io_err(&raw_path, "set opaque xattr on", e))?;
            } else if name_bytes.starts_with(WHITEOUT_META_PREFIX.as_bytes()) {
                tracing::debug!(entry = %String::from_utf8_lossy(&raw_path), "skipping aufs metadata entry");
            } else {
                let target = OsStr::from_bytes(&name_bytes[WHITEOUT_PREFIX.len()..]);
                if target.is_empty() || target == ".." || target == "." {
                    return Err(self.refuse(&raw_path, "whiteout of nothing"));
                }
                self.clear(parent.as_raw_fd(), target, false, &raw_path)?;
                let c = self.name_cstring(target, &raw_path)?;
                // SAFETY: c is a valid NUL-terminated string; parent is an open directory fd.
                let rc = unsafe {
                    libc::mknodat(
                        parent.as_raw_fd(),
                        c.as_ptr(),
                        libc::S_IFCHR,
                        libc::makedev(0, 0),
                    )
                };
                check(rc).map_err(|e| self.io_err(&raw_path, "create whiteout for", e))?;
                self.chown_at(parent.as_raw_fd(), &c, &meta, &raw_path)?;
            }
            return Ok(());
        }

        let c = self.name_cstring(name, &raw_path)?;
        let pfd = parent.as_raw_fd();
        match kind {
            tar::EntryType::Directory => {
                self.clear(pfd, name, true, &raw_path)?;
                // SAFETY: valid C string and directory fd.
                let rc = unsafe { libc::mkdirat(pfd, c.as_ptr(), 0o700) };
                match check(rc) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(self.io_err(&raw_path, "create directory", e)),
                }
                self.apply_dir_meta(&raw_path, &comps, &meta)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.clear(pfd, name, false, &raw_path)?;
                let fd = openat(
                    pfd,
                    name,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                    0o600,
                )
                .map_err(|e| self.io_err(&raw_path, "create file", e))?;
                let mut file = File::from(fd);
                io::copy(&mut entry, &mut file).map_err(|e| self.io_err(&raw_path, "write", e))?;
                self.apply_fd_meta(file.as_raw_fd(), &meta, &raw_path)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.refuse(&raw_path, "symlink without target"))?
                    .into_owned();
                if !target.starts_with(b"/") && resolve_within(parents, &target).is_none() {
                    return Err(self.refuse(
                        &raw_path,
                        format!(
                            "symlink target {:?} leaves the layer directory",
                            String::from_utf8_lossy(&target)
                        ),
                    ));
                }
                self.clear(pfd, name, false, &raw_path)?;
                let t = CString::new(target)
                    .map_err(|_| self.refuse(&raw_path, "NUL in symlink target"))?;
                // SAFETY: valid C strings and directory fd.
                let rc = unsafe { libc::symlinkat(t.as_ptr(), pfd, c.as_ptr()) };
                check(rc).map_err(|e| self.io_err(&raw_path, "create symlink", e))?;
                self.chown_at(pfd, &c, &meta, &raw_path)?;
                self.utimes_at(pfd, &c, meta.mtime, &raw_path)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.refuse(&raw_path, "hard link without target"))?
                    .into_owned();
                let tcomps = clean_path(&target).ok_or_else(|| {
                    self.refuse(
                        &raw_path,
                        format!(
                            "hard link target {:?} leaves the layer directory",
                            String::from_utf8_lossy(&target)
                        ),
                    )
                })?;
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(self.refuse(&raw_path, "hard link to the layer root"));
                };
                let tparent = self.walk(tparents, false, &raw_path)?;
                if tcomps == comps {
                    return Ok(());
                }
                self.clear(pfd, name, false, &raw_path)?;
                let tc = self.name_cstring(tname, &raw_path)?;
                // SAFETY: valid C strings and directory fds; flags 0 links the entry itself,
                // never what a symlink there points to.
                let rc =
                    unsafe { libc::linkat(tparent.as_raw_fd(), tc.as_ptr(), pfd, c.as_ptr(), 0) };
                check(rc).map_err(|e| self.io_err(&raw_path, "create hard link", e))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let fmt = match kind {
                    tar::EntryType::Char => libc::S_IFCHR,
                    tar::EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let h = entry.header();
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                self.clear(pfd, name, false, &raw_path)?;
                // SAFETY: valid C string and directory fd.
                let rc = unsafe {
                    libc::mknodat(
                        pfd,
                        c.as_ptr(),
                        fmt | (meta.mode & 0o7777),
                        libc::makedev(major, minor),
                    )
                };
                check(rc).map_err(|e| self.io_err(&raw_path, "create device node", e))?;
                self.chown_at(pfd, &c, &meta, &raw_path)?;
                // Not through an fd: opening a device node would open the device.
                // SAFETY: valid C string and directory fd; the node was just made by us.
                let rc = unsafe { libc::fchmodat(pfd, c.as_ptr(), meta.mode & 0o7777, 0) };
                check(rc).map_err(|e| self.io_err(&raw_path, "chmod", e))?;
                self.utimes_at(pfd, &c, meta.mtime, &raw_path)?;
            }
            other => {
                tracing::debug!(entry = %String::from_utf8_lossy(&raw_path), kind = ?other, "skipping tar entry of unsupported type");
            }
        }
        Ok(())
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>, raw_path: &[u8]) -> Result<Meta> {
        let h = entry.header();
        let mut mode = h.mode().unwrap_or(0o644);
        let mut uid = h.uid().unwrap_or(0);
        let mut gid = h.gid().unwrap_or(0);
        let mut mtime = libc::timespec {
            tv_sec: h.mtime().unwrap_or(0) as libc::time_t,
            tv_nsec: 0,
        };
        let mut xattrs = Vec::new();
        if let Ok(Some(pax)) = entry.pax_extensions() {
            for ext in pax {
                let ext = ext.map_err(|e| Error::BadLayer {
                    layer: self.layer.to_string(),
                    detail: format!("PAX record of {:?}: {e}", String::from_utf8_lossy(raw_path)),
                })?;
                let Ok(key) = ext.key() else { continue };
                let value = ext.value_bytes();
                let num = || {
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                };
                match key {
                    "uid" => uid = num().unwrap_or(uid),
                    "gid" => gid = num().unwrap_or(gid),
                    "mtime" => {
                        if let Some(t) = std::str::from_utf8(value).ok().and_then(parse_pax_time) {
                            mtime = t;
                        }
                    }
                    k => {
                        if let Some(name) = k.strip_prefix(PAX_XATTR_PREFIX) {
                            if let Ok(n) = CString::new(name) {
                                xattrs.push((n, value.to_vec()));
                            }
                        }
                    }
                }
            }
        }
        mode &= 0o7777;
        let to32 = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| self.refuse(raw_path, format!("{what} {v} out of range")))
        };
        Ok(Meta {
            mode,
            uid: to32(uid, "uid")?,
            gid: to32(gid, "gid")?,
            mtime,
            xattrs,
        })
    }

    /// Opens the directory `comps` under the layer root without following any symlink,
    /// creating missing directories (0755) when `create`.
    fn walk(&self, comps: &[OsString], create: bool, raw_path: &[u8]) -> Result<OwnedFd> {
        let mut cur = dup(self.root.as_raw_fd()).map_err(|e| self.io_err(raw_path, "dup", e))?;
        for comp in comps {
            let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
            let next = match openat(cur.as_raw_fd(), comp, flags, 0) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                    let c = self.name_cstring(comp, raw_path)?;
                    // SAFETY: valid C string and directory fd.
                    let rc = unsafe { libc::mkdirat(cur.as_raw_fd(), c.as_ptr(), 0o755) };
                    check(rc).map_err(|e| self.io_err(raw_path, "create parent of", e))?;
                    openat(cur.as_raw_fd(), comp, flags, 0)
                        .map_err(|e| self.io_err(raw_path, "open parent of", e))?
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                    return Err(self.refuse(
                        raw_path,
                        format!(
                            "{:?} on its path is a symlink or not a directory (never followed while unpacking)",
                            comp
                        ),
                    ));
                }
                Err(e) => return Err(self.io_err(raw_path, "open parent of", e)),
            };
            cur = next;
        }
        Ok(cur)
    }

    /// Removes what is at `name` in `parent`, unless both it and the new entry are
    /// directories (a later tar entry replaces an earlier one).
    fn clear(&self, parent: RawFd, name: &OsStr, new_is_dir: bool, raw_path: &[u8]) -> Result<()> {
        let c = self.name_cstring(name, raw_path)?;
        // SAFETY: zeroed stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string, directory fd, and a stat buffer we own.
        let rc = unsafe { libc::fstatat(parent, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        if rc != 0 {
            return Ok(());
        }
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir && new_is_dir {
            return Ok(());
        }
        if is_dir {
            let dir = openat(
                parent,
                name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(|e| self.io_err(raw_path, "open to replace", e))?;
            remove_dir_contents(dir.as_raw_fd())
                .map_err(|e| self.io_err(raw_path, "empty to replace", e))?;
            // SAFETY: valid C string and directory fd.
            let rc = unsafe { libc::unlinkat(parent, c.as_ptr(), libc::AT_REMOVEDIR) };
            check(rc).map_err(|e| self.io_err(raw_path, "remove to replace", e))
        } else {
            // SAFETY: valid C string and directory fd.
            let rc = unsafe { libc::unlinkat(parent, c.as_ptr(), 0) };
            check(rc).map_err(|e| self.io_err(raw_path, "remove to replace", e))
        }
    }

    fn apply_dir_meta(&mut self, raw_path: &[u8], comps: &[OsString], meta: &Meta) -> Result<()> {
        let dir = self.walk(comps, false, raw_path)?;
        let fd = openat(
            dir.as_raw_fd(),
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .map_err(|e| self.io_err(raw_path, "open directory", e))?;
        self.apply_fd_meta(fd.as_raw_fd(), meta, raw_path)?;
        self.dirs.push((comps.to_vec(), meta.mtime));
        Ok(())
    }

    /// Owner, mode (after the owner: chown clears set-id bits), xattrs and, for
    /// non-directories, mtime.
    fn apply_fd_meta(&self, fd: RawFd, meta: &Meta, raw_path: &[u8]) -> Result<()> {
        // SAFETY: fd is open and owned by the caller.
        check(unsafe { libc::fchown(fd, meta.uid, meta.gid) })
            .map_err(|e| self.io_err(raw_path, "chown", e))?;
        // SAFETY: as above.
        check(unsafe { libc::fchmod(fd, meta.mode) })
            .map_err(|e| self.io_err(raw_path, "chmod", e))?;
        for (name, value) in &meta.xattrs {
            fsetxattr(fd, name, value)
                .map_err(|e| self.io_err(raw_path, &format!("set xattr {name:?} on"), e))?;
        }
        let times = [meta.mtime, meta.mtime];
        // SAFETY: fd is open; times is an array of two timespecs.
        check(unsafe { libc::futimens(fd, times.as_ptr()) })
            .map_err(|e| self.io_err(raw_path, "set mtime of", e))
    }

    fn chown_at(&self, parent: RawFd, c: &CString, meta: &Meta, raw_path: &[u8]) -> Result<()> {
        // SAFETY: valid C string and directory fd; never follows a symlink.
        let rc = unsafe {
            libc::fchownat(
                parent,
                c.as_ptr(),
                meta.uid,
                meta.gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        check(rc).map_err(|e| self.io_err(raw_path, "chown", e))
    }

    fn utimes_at(
        &self,
        parent: RawFd,
        c: &CString,
        t: libc::timespec,
        raw_path: &[u8],
    ) -> Result<()> {
        let times = [t, t];
        // SAFETY: valid C string, directory fd and two timespecs; never follows a symlink.
        let rc = unsafe {
            libc::utimensat(
                parent,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        check(rc).map_err(|e| self.io_err(raw_path, "set mtime of", e))
    }

    fn name_cstring(&self, name: &OsStr, raw_path: &[u8]) -> Result<CString> {
        CString::new(name.as_bytes()).map_err(|_| self.refuse(raw_path, "NUL in path"))
    }

    /// Directory mtimes, set last: writing into a directory changes its mtime.
    fn finish(&mut self) -> Result<()> {
        for (comps, mtime) in std::mem::take(&mut self.dirs) {
            let raw: Vec<u8> = comps.join(OsStr::new("/")).into_vec();
            // A later entry may have replaced the directory with something else.
            let Ok(dir) = self.walk(&comps, false, &raw) else {
                continue;
            };
            let times = [mtime, mtime];
            // SAFETY: valid C string (".") and an O_PATH directory fd.
            let rc = unsafe { libc::utimensat(dir.as_raw_fd(), c".".as_ptr(), times.as_ptr(), 0) };
            check(rc).map_err(|e| self.io_err(&raw, "set mtime of", e))?;
        }
        Ok(())
    }
}

/// Splits a tar path into components, resolving `.` and `..` lexically; `None` when `..`
/// would climb above the root. A leading `/` is ignored (tar paths are root-relative).
fn clean_path(p: &[u8]) -> Option<Vec<OsString>> {
    let mut out: Vec<OsString> = Vec::new();
    for comp in p.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                out.pop()?;
            }
            c => out.push(OsString::from_vec(c.to_vec())),
        }
    }
    Some(out)
}

/// Whether a relative symlink target, read from the directory `dir`, stays inside the
/// layer root (`Some`) or climbs above it (`None`).
fn resolve_within(dir: &[OsString], target: &[u8]) -> Option<Vec<OsString>> {
    let mut out = dir.to_vec();
    for comp in target.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                out.pop()?;
            }
            c => out.push(OsString::from_vec(c.to_vec())),
        }
    }
    Some(out)
}

fn parse_pax_time(v: &str) -> Option<libc::timespec> {
    let (secs, frac) = match v.split_once('.') {
        Some((s, f)) => (s, f),
        None => (v, ""),
    };
    let tv_sec: i64 = secs.parse().ok()?;
    let mut nanos = String::from(frac);
    nanos.truncate(9);
    while nanos.len() < 9 {
        nanos.push('0');
    }
    let tv_nsec: i64 = if frac.is_empty() {
        0
    } else {
        nanos.parse().ok()?
    };
    Some(libc::timespec {
        tv_sec: tv_sec as libc::time_t,
        tv_nsec: tv_nsec as _,
    })
}

fn cstring(s: &str) -> CString {
    // Only called with constants without NUL.
    CString::new(s).unwrap_or_default()
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn openat(dir: RawFd, name: &OsStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C string; the result is checked before it is owned.
    let fd = unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_dir_path(p: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C string; the result is checked before it is owned.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an fd we hold; the result is checked before it is owned.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: new was just returned by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn fsetxattr(fd: RawFd, name: &CString, value: &[u8]) -> io::Result<()> {
    // SAFETY: fd is open, name a valid C string, value a live slice of the given length.
    let rc = unsafe { libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    check(rc)
}

/// Removes everything inside the open directory `dir` without following symlinks.
fn remove_dir_contents(dir: RawFd) -> io::Result<()> {
    let fd = dup(dir)?;
    // SAFETY: fdopendir takes ownership of a valid directory fd (released from OwnedFd).
    let d = unsafe { libc::fdopendir(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
    if d.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: d is a valid DIR stream until closedir below.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            break;
        }
        // SAFETY: readdir returned a valid dirent with a NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        let b = name.to_bytes();
        if b != b"." && b != b".." {
            names.push(name.to_owned());
        }
    }
    // SAFETY: d is valid and not used after this.
    unsafe { libc::closedir(d) };
    for name in names {
        // SAFETY: valid C string and directory fd.
        if unsafe { libc::unlinkat(dir, name.as_ptr(), 0) } == 0 {
            continue;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EISDIR) {
            return Err(err);
        }
        let sub = openat(
            dir,
            OsStr::from_bytes(name.to_bytes()),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        remove_dir_contents(sub.as_raw_fd())?;
        // SAFETY: valid C string and directory fd.
        check(unsafe { libc::unlinkat(dir, name.as_ptr(), libc::AT_REMOVEDIR) })?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// A tar builder that writes paths raw, so tests can make entries `tar::Builder`
    /// itself refuses (`../x`).
    pub(crate) struct RawTar(pub Vec<u8>);

    impl RawTar {
        pub(crate) fn new() -> Self {
            RawTar(Vec::new())
        }
        fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_size(size);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            let name = &mut h.as_old_mut().name;
            name.fill(0);
            name[..path.len()].copy_from_slice(path.as_bytes());
            h
        }
        fn push(&mut self, mut h: tar::Header, data: &[u8]) {
            h.set_cksum();
            self.0.extend_from_slice(h.as_bytes());
            self.0.extend_from_slice(data);
            let pad = (512 - data.len() % 512) % 512;
            self.0.extend(std::iter::repeat_n(0u8, pad));
        }
        pub(crate) fn file(mut self, path: &str, data: &[u8]) -> Self {
            let h = Self::header(path, tar::EntryType::Regular, data.len() as u64, 0o644);
            self.push(h, data);
            self
        }
        pub(crate) fn dir(mut self, path: &str) -> Self {
            let h = Self::header(path, tar::EntryType::Directory, 0, 0o755);
            self.push(h, &[]);
            self
        }
        pub(crate) fn link(mut self, path: &str, kind: tar::EntryType, target: &str) -> Self {
            let mut h = Self::header(path, kind, 0, 0o777);
            let l = &mut h.as_old_mut().linkname;
            l.fill(0);
            l[..target.len()].copy_from_slice(target.as_bytes());
            self.push(h, &[]);
            self
        }
        pub(crate) fn finish(mut self) -> Vec<u8> {
            self.0.extend(std::iter::repeat_n(0u8, 1024));
            self.0
        }
    }

    fn unpack(tar: &[u8]) -> (tempfile::TempDir, Result<Unpacked>) {
        let dir = tempfile::tempdir().unwrap();
        let r = unpack_tar(tar, "sha256:test", dir.path());
        (dir, r)
    }

    #[test]
    fn files_links_and_whiteouts() {
        let tar = RawTar::new()
            .dir("etc/")
            .file("etc/hostname", b"isola\n")
            .link("etc/hard", tar::EntryType::Link, "etc/hostname")
            .link("etc/soft", tar::EntryType::Symlink, "hostname")
            .link("bin/sh", tar::EntryType::Symlink, "/bin/busybox")
            .file("gone/.wh.old", b"")
            .file("opaque/.wh..wh..opq", b"")
            .file("opaque/new", b"n")
            .finish();
        let (dir, r) = unpack(&tar);
        let u = r.unwrap();
        let expect = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
        assert_eq!(u.diff_id, expect);
        let p = dir.path();
        assert_eq!(std::fs::read(p.join("etc/hostname")).unwrap(), b"isola\n");
        let a = std::fs::metadata(p.join("etc/hostname")).unwrap();
        let b = std::fs::metadata(p.join("etc/hard")).unwrap();
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.nlink(), 2);
        assert_eq!(a.mtime(), 1_700_000_000);
        assert_eq!(
            std::fs::read_link(p.join("etc/soft")).unwrap(),
            Path::new("hostname")
        );
        assert_eq!(
            std::fs::read_link(p.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        let w = std::fs::symlink_metadata(p.join("gone/old")).unwrap();
        assert!(w.file_type().is_char_device());
        assert_eq!(w.rdev(), 0);
        assert!(!p.join("gone/.wh.old").exists());
        let mut buf = [0u8; 8];
        let path = CString::new(p.join("opaque").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C strings and a buffer of the given size.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(n, 1, "opaque xattr set");
        assert_eq!(buf[0], b'y');
        assert!(!p.join("opaque/.wh..wh..opq").exists());
        assert_eq!(
            std::fs::metadata(p.join("etc")).unwrap().mtime(),
            1_700_000_000
        );
    }

    #[test]
    fn dotdot_entry_is_refused_and_named() {
        let tar = RawTar::new()
            .file("ok", b"1")
            .file("a/../../evil", b"x")
            .finish();
        let (_dir, r) = unpack(&tar);
        let err = r.unwrap_err();
        assert!(matches!(err, Error::UnsafeLayer { .. }), "{err}");
        assert!(err.to_string().contains("a/../../evil"), "{err}");
    }

    #[test]
    fn inner_dotdot_that_stays_inside_is_fine() {
        let tar = RawTar::new().file("a/../b", b"1").finish();
        let (dir, r) = unpack(&tar);
        r.unwrap();
        assert!(dir.path().join("b").exists());
    }

    #[test]
    fn symlink_pointing_out_is_refused() {
        let tar = RawTar::new()
            .link("x/evil", tar::EntryType::Symlink, "../../../etc")
            .finish();
        let (_dir, r) = unpack(&tar);
        let err = r.unwrap_err();
        assert!(err.to_string().contains("x/evil"), "{err}");
    }

    #[test]
    fn symlinks_are_never_followed_while_unpacking() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().to_str().unwrap().to_string();
        // An absolute symlink is legal (it resolves inside the container), but writing
        // through it must not happen.
        let tar = RawTar::new()
            .link("lib", tar::EntryType::Symlink, &target)
            .file("lib/pwned", b"x")
            .finish();
        let (_dir, r) = unpack(&tar);
        let err = r.unwrap_err();
        assert!(err.to_string().contains("lib/pwned"), "{err}");
        assert!(!outside.path().join("pwned").exists());
    }

    #[test]
    fn hard_link_out_is_refused() {
        let tar = RawTar::new()
            .link("h", tar::EntryType::Link, "../../etc/passwd")
            .finish();
        let (_dir, r) = unpack(&tar);
        let err = r.unwrap_err();
        assert!(err.to_string().contains("\"h\""), "{err}");
        assert!(err.to_string().contains("hard link target"), "{err}");
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let tar = RawTar::new()
            .dir("d/")
            .file("d/x", b"1")
            .file("d", b"now a file")
            .file("f", b"old")
            .file("f", b"new")
            .finish();
        let (dir, r) = unpack(&tar);
        r.unwrap();
        assert_eq!(std::fs::read(dir.path().join("d")).unwrap(), b"now a file");
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"new");
    }

    /// Archives made by GNU tar (gnu and pax formats: long names, long link targets,
    /// hard links, xattrs, fifos, set-id modes, owners) unpack to the same tree.
    #[test]
    fn gnu_tar_archives_round_trip() {
        use std::os::unix::fs::PermissionsExt;
        let src = tempfile::tempdir().unwrap();
        let p = src.path();
        let long_dir = "d".repeat(120);
        let long_name = format!("{long_dir}/{}", "f".repeat(150));
        std::fs::create_dir_all(p.join(&long_dir)).unwrap();
        std::fs::write(p.join(&long_name), b"long\n").unwrap();
        std::fs::write(p.join("plain"), b"plain\n").unwrap();
        std::fs::hard_link(p.join("plain"), p.join("hard")).unwrap();
        std::os::unix::fs::symlink(&long_name, p.join("longlink")).unwrap();
        std::fs::write(p.join("\u{e9}t\u{e9}"), b"utf8\n").unwrap();
        std::os::unix::fs::chown(p.join("plain"), Some(123), Some(456)).unwrap();
        std::fs::set_permissions(p.join("plain"), std::fs::Permissions::from_mode(0o4711)).unwrap();
        let c = CString::new(p.join("plain").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C strings and a value buffer of the given length.
        let rc =
            unsafe { libc::lsetxattr(c.as_ptr(), c"user.k".as_ptr(), b"v".as_ptr().cast(), 1, 0) };
        assert_eq!(rc, 0);
        let fifo = CString::new(p.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
        for format in ["gnu", "pax"] {
            let mut cmd = std::process::Command::new("tar");
            if format == "pax" {
                cmd.args(["--xattrs", "--xattrs-include=*"]);
            }
            let out = cmd
                .args(["--numeric-owner", "-C"])
                .arg(p)
                .args([&format!("--format={format}"), "-cf", "-", "."])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (dir, r) = unpack(&out.stdout);
            r.unwrap_or_else(|e| panic!("{format}: {e}"));
            let d = dir.path();
            assert_eq!(
                std::fs::read(d.join(&long_name)).unwrap(),
                b"long\n",
                "{format}"
            );
            assert_eq!(
                std::fs::read_link(d.join("longlink")).unwrap(),
                Path::new(&long_name)
            );
            let a = std::fs::metadata(d.join("plain")).unwrap();
            assert_eq!(
                a.ino(),
                std::fs::metadata(d.join("hard")).unwrap().ino(),
                "{format}"
            );
            assert_eq!(a.permissions().mode() & 0o7777, 0o4711, "{format}");
            assert_eq!((a.uid(), a.gid()), (123, 456), "{format}");
            assert_eq!(std::fs::read(d.join("\u{e9}t\u{e9}")).unwrap(), b"utf8\n");
            assert!(std::fs::symlink_metadata(d.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo());
            if format == "pax" {
                let c = CString::new(d.join("plain").as_os_str().as_bytes()).unwrap();
                let mut buf = [0u8; 4];
                // SAFETY: valid C strings and a buffer of the given size.
                let n = unsafe {
                    libc::lgetxattr(
                        c.as_ptr(),
                        c"user.k".as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                assert_eq!(n, 1, "xattr carried by pax");
            }
        }
    }

    /// Unpacks the layer blob named by `ISOLA_SAMPLE_LAYER` and prints the time: a check
    /// of speed and of real-world archives. `cargo test --release -p isola-images --lib
    /// sample -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn sample_layer_from_env() {
        let Some(path) = std::env::var_os("ISOLA_SAMPLE_LAYER") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let t = std::time::Instant::now();
        let u = unpack_layer(Path::new(&path), "sample", dir.path()).unwrap();
        println!("unpacked {} in {:?}", u.diff_id, t.elapsed());
    }

    #[test]
    fn clean_path_resolves_lexically() {
        assert_eq!(clean_path(b"./a/./b/").unwrap(), vec!["a", "b"]);
        assert_eq!(clean_path(b"/a/../b").unwrap(), vec!["b"]);
        assert!(clean_path(b"../a").is_none());
        assert!(clean_path(b"a/../../a").is_none());
        assert!(resolve_within(&["a".into()], b"../b").is_some());
        assert!(resolve_within(&["a".into()], b"../../b").is_none());
    }
}
