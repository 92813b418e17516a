//! Loading kernel modules listed in the initramfs, for guest kernels that build their
//! virtio drivers as modules (Debian's cloud kernel; isola's own kernel needs none).

use std::ffi::CString;
use std::os::fd::AsRawFd;

/// The list of modules to load, one path per line, in dependency order.
pub const MODULE_LIST: &str = "/lib/modules/isola.load";

/// finit_module's flag for compressed (.ko.xz, .ko.zst) files.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// Loads every module of [`MODULE_LIST`]; returns the failures as text (none if the list
/// is absent).
pub fn load_listed() -> Vec<String> {
    let Ok(list) = std::fs::read_to_string(MODULE_LIST) else {
        return Vec::new();
    };
    let mut failures = Vec::new();
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Err(e) = load(path) {
            failures.push(format!("{path}: {e}"));
        }
    }
    failures
}

fn load(path: &str) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    let params = CString::default();
    let flags = if path.ends_with(".ko") {
        0
    } else {
        MODULE_INIT_COMPRESSED_FILE
    };
    // SAFETY: finit_module reads the open module file and a NUL-terminated (empty)
    // parameter string; both outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}
