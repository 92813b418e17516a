//! The pod's virtio-fs share: one host directory per VM, served by virtiofsd and mounted
//! at [`GUEST_SHARE`] in the guest. Container root filesystems (the overlay of image
//! layers + writable layer, mounted on the host), volumes and log directories are
//! bind-mounted into it after the VM has booted; the guest sees them at once because the
//! share is a shared mount and virtiofsd's mount namespace is its slave. The image's
//! bytes are never copied: the guest reads the host's overlay through virtio-fs.

use std::path::{Path, PathBuf};

use isola_proto::shim as sp;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Where the guest mounts the share.
pub const GUEST_SHARE: &str = "/run/isola/shared";
/// The virtio-fs tag of the share.
pub const SHARE_TAG: &str = "isola";
/// The guest agent's name at the top of the share (container ids are 64 hex characters,
/// under `c/`).
const AGENT_NAME: &str = "isola-guest";

/// Errors of the share.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// A request named something unusable.
    #[error("{0}")]
    Invalid(String),
    /// A host operation failed.
    #[error("{what}: {detail}")]
    Host {
        /// What was being done.
        what: String,
        /// Why it failed.
        detail: String,
    },
}

fn host_err(what: impl Into<String>, e: impl std::fmt::Display) -> ShareError {
    ShareError::Host {
        what: what.into(),
        detail: e.to_string(),
    }
}

/// The share of one pod.
#[derive(Debug)]
pub struct Share {
    host: PathBuf,
}

impl Share {
    /// Creates the share directory as a shared mount (idempotent).
    pub fn create(host: &Path) -> Result<Share, ShareError> {
        std::fs::create_dir_all(host)
            .map_err(|e| host_err(format!("creating {}", host.display()), e))?;
        if !isola_container::mounts::is_mount_point(host) {
            mount(
                Some(host),
                host,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| host_err(format!("bind-mounting {} on itself", host.display()), e))?;
        }
        mount(
            None::<&str>,
            host,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(|e| host_err(format!("making {} a shared mount", host.display()), e))?;
        Ok(Share { host: host.into() })
    }

    /// The host directory served to the guest.
    pub fn host_dir(&self) -> &Path {
        &self.host
    }

    fn ctr_dir(&self, cid: &str) -> Result<PathBuf, ShareError> {
        if cid.is_empty() || cid.contains('/') || cid.contains("..") {
            return Err(ShareError::Invalid(format!(
                "container_id {cid:?} is not a valid id"
            )));
        }
        Ok(self.host.join("c").join(cid))
    }

    fn guest_path(&self, host: &Path) -> String {
        let rel = host.strip_prefix(&self.host).unwrap_or(host);
        format!("{GUEST_SHARE}/{}", rel.display())
    }

    /// Mounts a container's rootfs (the agent's overlay) in the share; returns its path
    /// in the guest.
    pub fn mount_rootfs(&self, cid: &str, mounts: &[sp::Mount]) -> Result<String, ShareError> {
        let target = self.ctr_dir(cid)?.join("rootfs");
        isola_shim_native::containers::mount_rootfs(mounts, &target)
            .map_err(|e| host_err(format!("container {cid}: rootfs"), e))?;
        Ok(self.guest_path(&target))
    }

    /// Bind-mounts a host file or directory into the container's part of the share as
    /// `name`; returns its path in the guest.
    pub fn bind(
        &self,
        cid: &str,
        name: &str,
        source: &Path,
        readonly: bool,
    ) -> Result<String, ShareError> {
        let meta = std::fs::metadata(source).map_err(|e| {
            ShareError::Invalid(format!("mount host_path {}: {e}", source.display()))
        })?;
        let dir = self.ctr_dir(cid)?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| host_err(format!("creating {}", dir.display()), e))?;
        let target = dir.join(name);
        bind_at(source, meta.is_dir(), &target, readonly)?;
        Ok(self.guest_path(&target))
    }

    /// Bind-mounts the guest agent (a host file) read-only at the top of the share;
    /// returns its path in the guest.
    pub fn bind_agent(&self, source: &Path) -> Result<String, ShareError> {
        let meta = std::fs::metadata(source)
            .map_err(|e| ShareError::Invalid(format!("guest agent {}: {e}", source.display())))?;
        if !meta.is_file() {
            return Err(ShareError::Invalid(format!(
                "guest agent {}: not a file",
                source.display()
            )));
        }
        let target = self.host.join(AGENT_NAME);
        if !isola_container::mounts::is_mount_point(&target) {
            bind_at(source, false, &target, true)?;
        }
        Ok(self.guest_path(&target))
    }

    /// Unmounts and removes a container's part of the share (idempotent).
    pub fn release(&self, cid: &str) -> Result<(), ShareError> {
        let dir = self.ctr_dir(cid)?;
        unmount_all(&dir)?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(host_err(format!("removing {}", dir.display()), e)),
        }
    }

    /// Unmounts everything in the share and the share itself, and removes it.
    pub fn destroy(&self) -> Result<(), ShareError> {
        unmount_all(&self.host)?;
        match std::fs::remove_dir_all(&self.host) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(host_err(format!("removing {}", self.host.display()), e)),
        }
    }
}

/// Bind-mounts `source` (a directory if `is_dir`, else a file) at `target`, creating the
/// target; read-only if asked (undone if the remount fails).
fn bind_at(source: &Path, is_dir: bool, target: &Path, readonly: bool) -> Result<(), ShareError> {
    if is_dir {
        std::fs::create_dir_all(target)
    } else {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
            .map(|_| ())
    }
    .map_err(|e| host_err(format!("creating {}", target.display()), e))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount(Some(source), target, None::<&str>, flags, None::<&str>).map_err(|e| {
        host_err(
            format!("bind-mounting {} at {}", source.display(), target.display()),
            e,
        )
    })?;
    if readonly {
        flags |= MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
            let _ = umount2(target, MntFlags::MNT_DETACH);
            return Err(host_err(
                format!("remounting {} read-only", target.display()),
                e,
            ));
        }
    }
    Ok(())
}

/// Unmounts every mount at or below `dir`, deepest first.
fn unmount_all(dir: &Path) -> Result<(), ShareError> {
    for p in isola_container::mounts::under(dir) {
        if let Err(e) = umount2(p.as_str(), MntFlags::MNT_DETACH) {
            if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                return Err(host_err(format!("unmounting {p}"), e));
            }
        }
    }
    let left = isola_container::mounts::under(dir);
    if left.is_empty() {
        Ok(())
    } else {
        Err(host_err(
            "unmounting the share",
            format!("still mounted: {}", left.join(", ")),
        ))
    }
}
