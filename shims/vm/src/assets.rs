//! Where the guest assets are installed, overridable by environment variables.

use std::path::PathBuf;

/// Default install directory of deploy/guest/build-assets.sh.
pub const DEFAULT_GUEST_DIR: &str = "/usr/share/isola/guest";

/// The guest kernel: `$ISOLA_GUEST_KERNEL`, else the installed PVH vmlinux.
pub fn guest_kernel() -> PathBuf {
    std::env::var_os("ISOLA_GUEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR).join("vmlinux"))
}

/// The guest initramfs: `$ISOLA_GUEST_INITRAMFS`, else the installed one.
pub fn guest_initramfs() -> PathBuf {
    std::env::var_os("ISOLA_GUEST_INITRAMFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR).join("initramfs.cpio"))
}

/// The guest agent with the shim built in, which the initramfs's /init executes from the
/// pod's virtio-fs share: `$ISOLA_GUEST_AGENT`, else the installed one.
pub fn guest_agent() -> PathBuf {
    std::env::var_os("ISOLA_GUEST_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR).join("isola-guest"))
}
