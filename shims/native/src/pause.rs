//! The pod's infra process (`isola-shim-native pause`): it holds the pod's namespaces
//! (network, IPC, UTS and, for a pod-wide PID namespace, PID as its PID 1), sets the
//! pod's hostname, brings loopback up, reaps orphans and sleeps until killed. The shim
//! starts it with the namespaces already unshared (pre_exec); it prints the pid that
//! holds them on stdout.

use std::io::Write;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult};

/// Brings `lo` up in the current network namespace.
pub fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    let r = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            -1
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req)
        }
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if r < 0 {
        return Err(err);
    }
    Ok(())
}

fn hold(hostname: Option<&str>) -> ! {
    if let Some(h) = hostname {
        let _ = nix::unistd::sethostname(h);
    }
    let _ = loopback_up();
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    let _ = set.thread_block();
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => loop {
                // As PID 1 of a pod PID namespace, orphans of every container land here.
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => continue,
                }
            },
            Ok(_) => std::process::exit(0),
            Err(_) => continue,
        }
    }
}

/// Runs the infra process. `args` are the words after `pause`.
pub fn main(args: &[String]) -> ! {
    let hostname = args
        .iter()
        .position(|a| a == "--hostname")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let pidns = args.iter().any(|a| a == "--pidns");
    if pidns {
        // unshare(CLONE_NEWPID) applied to our children: the first one is PID 1 there.
        // SAFETY: single-threaded process (just exec'd).
        match unsafe { fork() } {
            Ok(ForkResult::Child) => hold(hostname),
            Ok(ForkResult::Parent { child }) => {
                let mut out = std::io::stdout();
                let _ = writeln!(out, "{child}");
                let _ = out.flush();
                // Stay as the reaper of PID 1; exit with it.
                loop {
                    match waitpid(child, None) {
                        Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(_) => {
                            std::process::exit(0)
                        }
                        Ok(_) => continue,
                    }
                }
            }
            Err(e) => {
                eprintln!("pause: fork: {e}");
                std::process::exit(1)
            }
        }
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{}", std::process::id());
    let _ = out.flush();
    hold(hostname)
}
