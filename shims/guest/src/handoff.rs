//! The hand-off from /init to the guest shim program (`ServeShimRequest.program`).
//!
//! The initramfs's /init is isola-guest without its `shim` feature: the framed guest API
//! only. On ServeShim with a program (the full isola-guest, bind-mounted read-only into
//! the virtio-fs share by the host), PID 1 executes that program in its own place: the
//! channel stays open across the exec, and the request travels in the arguments. The
//! program's pages come from the share as the guest touches them, instead of the whole
//! binary living in the initramfs's memory (see docs/vm-pods.md, "Memory").
//!
//! The program is opened before the host gets its answer, and executed from that open
//! file (fexecve), so a path that cannot be executed is an error answer, not a guest that
//! powers off after saying yes.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;

use isola_proto::guest::ServeShimRequest;
use prost::Message;

/// The first argument that makes isola-guest take the channel over from /init.
pub const SUBCOMMAND: &str = "serve-shim";

/// Opens the program the host named: an executable regular file, or an error naming it.
pub fn open_program(path: &str) -> Result<File, String> {
    let file = File::open(path).map_err(|e| format!("guest shim program {path}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("guest shim program {path}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("guest shim program {path}: not a regular file"));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("guest shim program {path}: not executable"));
    }
    Ok(file)
}

fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: fcntl on a descriptor number; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Executes `program` in this process's place, handing it `port` and `req`. Returns only
/// if the exec failed.
pub fn exec(program: File, port: File, req: &ServeShimRequest) -> io::Error {
    use std::ffi::CString;
    let port_fd = port.into_raw_fd(); // stays open across the exec
    if let Err(e) = set_cloexec(port_fd, false) {
        return e;
    }
    let args = [
        req.program.clone(),
        SUBCOMMAND.to_string(),
        port_fd.to_string(),
        hex_encode(&req.encode_to_vec()),
    ];
    let env: Vec<String> = std::env::vars_os()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_str()?, v.to_str()?)))
        .collect();
    let to_c = |v: &[String]| -> Result<Vec<CString>, io::Error> {
        v.iter()
            .map(|s| CString::new(s.as_str()).map_err(io::Error::other))
            .collect()
    };
    let (argv, envp) = match (to_c(&args), to_c(&env)) {
        (Ok(a), Ok(e)) => (a, e),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    // SAFETY: NULL-terminated arrays of pointers to NUL-terminated strings that all
    // outlive the call; on success it does not return.
    unsafe { libc::fexecve(program.as_raw_fd(), argv_p.as_ptr(), envp_p.as_ptr()) };
    io::Error::last_os_error()
}

/// The channel and the request from the arguments after [`SUBCOMMAND`] (as [`exec`]
/// passed them). The channel is made close-on-exec again, so that the shim's helper
/// processes do not inherit it.
pub fn from_args(args: &[String]) -> Result<(File, ServeShimRequest), String> {
    let [fd, request] = args else {
        return Err(format!("{SUBCOMMAND}: expected <channel fd> <request hex>"));
    };
    let fd: RawFd = fd
        .parse()
        .map_err(|_| format!("{SUBCOMMAND}: channel fd {fd:?} is not a number"))?;
    let bytes = hex_decode(request).ok_or(format!("{SUBCOMMAND}: the request is not hex"))?;
    let req = ServeShimRequest::decode(bytes.as_slice())
        .map_err(|e| format!("{SUBCOMMAND}: the request: {e}"))?;
    // Only a descriptor this process holds (F_GETFD fails on any other).
    // SAFETY: fcntl on a descriptor number; no memory is passed.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("{SUBCOMMAND}: channel fd {fd} is not open"));
    }
    set_cloexec(fd, true).map_err(|e| format!("{SUBCOMMAND}: channel fd {fd}: {e}"))?;
    // SAFETY: the descriptor is open (checked above) and nothing else in this freshly
    // executed process owns it.
    Ok((unsafe { File::from_raw_fd(fd) }, req))
}

// Hex by hand: a few lines, not a dependency of the static binary in every guest.
fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_survives_the_arguments() {
        let req = ServeShimRequest {
            sandbox_id: "abc".into(),
            log_path: "/run/isola/shared/guest.log".into(),
            log_filter: "info,isola=debug".into(),
            program: "/run/isola/shared/isola-guest".into(),
        };
        let hex = hex_encode(&req.encode_to_vec());
        assert_eq!(
            hex_decode(&hex).as_deref(),
            Some(req.encode_to_vec().as_slice())
        );
        assert_eq!(hex_decode("0"), None);
        assert_eq!(hex_decode("zz"), None);

        let file = tempfile_fd();
        let fd = file.into_raw_fd();
        let (port, back) = from_args(&[fd.to_string(), hex]).expect("valid arguments");
        assert_eq!(back, req);
        // SAFETY: fcntl on the descriptor `port` owns.
        let flags = unsafe { libc::fcntl(port.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(
            flags & libc::FD_CLOEXEC,
            libc::FD_CLOEXEC,
            "close-on-exec again"
        );
    }

    #[test]
    fn bad_arguments_and_programs_are_errors_that_say_why() {
        let e = from_args(&["x".into(), "00".into()]).expect_err("fd");
        assert!(e.contains("not a number"), "{e}");
        let e = from_args(&["987654".into(), String::new()]).expect_err("closed fd");
        assert!(e.contains("not open"), "{e}");
        let e = from_args(&["5".into(), "0g".into()]).expect_err("hex");
        assert!(e.contains("not hex"), "{e}");
        let e = from_args(&[]).expect_err("missing");
        assert!(e.contains("expected"), "{e}");

        let e = open_program("/nonexistent/isola-guest").expect_err("missing program");
        assert!(e.contains("/nonexistent/isola-guest"), "{e}");
        let e = open_program("/").expect_err("a directory");
        assert!(e.contains("not a regular file"), "{e}");
        let e = open_program("/proc/self/status").expect_err("not executable");
        assert!(e.contains("not executable"), "{e}");
        assert!(open_program("/bin/sh").is_ok());
    }

    fn tempfile_fd() -> File {
        File::open("/proc/self/status").expect("a file to hold open")
    }
}
