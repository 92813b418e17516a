//! seccomp allow-lists per thread kind, as Firecracker has them: each thread installs its
//! own filter once set-up is done (after every fd is open, every mapping made), so the
//! lists cover only the steady state. A syscall outside the list traps: the SIGSYS
//! handler names the syscall on stderr and ends the process with status 159 (128 + SIGSYS).

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be compiled.
    #[error("building the {0:?} seccomp filter: {1}")]
    Build(ThreadKind, String),
    /// The kernel refused the filter.
    #[error("installing the {0:?} seccomp filter: {1}")]
    Apply(ThreadKind, String),
}

/// The kinds of VMM thread, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs KVM_RUN and the port-IO/MMIO devices.
    Vcpu,
    /// Serves queues, sockets, TAPs and disk files.
    EventLoop,
    /// Waits for the VM to end and exits.
    Main,
}

/// Compiled filters for every thread kind.
#[derive(Debug, Clone)]
pub struct Filters {
    /// Stacked on every thread's list: open/openat fail with EACCES instead of trapping.
    /// glibc's malloc opens /proc/sys/vm/overcommit_memory the first time a thread arena
    /// shrinks and copes with the failure; nothing of ours opens files after set-up.
    pub deny_open: Arc<BpfProgram>,
    /// For vCPU threads.
    pub vcpu: Arc<BpfProgram>,
    /// For the event loop.
    pub event_loop: Arc<BpfProgram>,
    /// For the main thread.
    pub main: Arc<BpfProgram>,
}

/// KVM_RUN = _IO(KVMIO, 0x80).
const KVM_RUN: u64 = 0xae80;

/// What every thread needs: memory management by the allocator, futexes, signals,
/// clocks, logging to stderr and the log file, and exit.
const COMMON: &[i64] = &[
    // Device activation runs on the vCPU that writes DRIVER_OK: it registers the device's
    // backend fds with the event loop, and virtio-fs sends its vhost-user set-up.
    libc::SYS_epoll_ctl,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
];

/// The event loop: epoll, eventfds, the agent socket, TAPs and disk files.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_accept4,
    libc::SYS_fcntl,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
];

/// The main thread: waits on a channel, then exits.
const MAIN: &[i64] = &[libc::SYS_nanosleep, libc::SYS_clock_nanosleep];

fn build(
    kind: ThreadKind,
    extra: &[i64],
    rules: Vec<(i64, Vec<SeccompRule>)>,
) -> Result<BpfProgram, SeccompError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in COMMON.iter().chain(extra) {
        map.insert(*nr, Vec::new());
    }
    for (nr, r) in rules {
        map.insert(nr, r);
    }
    let filter = SeccompFilter::new(
        map,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(kind, e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(kind, e.to_string()))
}

/// Compiles the three filters.
pub fn filters() -> Result<Filters, SeccompError> {
    let kvm_run = SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        KVM_RUN,
    )
    .map_err(|e| SeccompError::Build(ThreadKind::Vcpu, e.to_string()))?])
    .map_err(|e| SeccompError::Build(ThreadKind::Vcpu, e.to_string()))?;
    // std's fd drop checks, in debug builds, that the fd is open with fcntl(F_GETFD).
    let getfd = |kind| -> Result<SeccompRule, SeccompError> {
        SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::F_GETFD as u64,
        )
        .map_err(|e| SeccompError::Build(kind, e.to_string()))?])
        .map_err(|e| SeccompError::Build(kind, e.to_string()))
    };
    let deny_open = SeccompFilter::new(
        [(libc::SYS_open, Vec::new()), (libc::SYS_openat, Vec::new())]
            .into_iter()
            .collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(ThreadKind::Main, e.to_string()))?
    .try_into()
    .map_err(|e: seccompiler::BackendError| SeccompError::Build(ThreadKind::Main, e.to_string()))?;
    Ok(Filters {
        deny_open: Arc::new(deny_open),
        vcpu: Arc::new(build(
            ThreadKind::Vcpu,
            &[],
            vec![
                (libc::SYS_ioctl, vec![kvm_run]),
                (libc::SYS_fcntl, vec![getfd(ThreadKind::Vcpu)?]),
            ],
        )?),
        event_loop: Arc::new(build(ThreadKind::EventLoop, EVENT_LOOP, Vec::new())?),
        main: Arc::new(build(
            ThreadKind::Main,
            MAIN,
            vec![(libc::SYS_fcntl, vec![getfd(ThreadKind::Main)?])],
        )?),
    })
}

/// Exit status after a forbidden syscall.
pub const SECCOMP_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // siginfo's SIGSYS fields: the call address (8 bytes at offset 16), then the syscall
    // number (int).
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; offset 24 is
    // inside it (it is 128 bytes).
    let nr = unsafe { *(info.cast::<u8>().add(24).cast::<libc::c_int>()) };
    let kind = THREAD_KIND.with(|k| k.get());
    let mut msg = *b"isola-vmm: seccomp: forbidden syscall            in a ? thread\n";
    let mut n = nr.unsigned_abs();
    msg[54] = kind;
    let mut i = 47;
    loop {
        msg[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 38 {
            break;
        }
        i -= 1;
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe; msg is a valid buffer.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(SECCOMP_EXIT_STATUS);
    }
}

/// Installs the SIGSYS handler that reports a forbidden syscall (once per process).
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; we set a handler of the SA_SIGINFO signature
    // and an empty mask before passing it to sigaction(2).
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Apply(
                ThreadKind::Main,
                std::io::Error::last_os_error().to_string(),
            ));
        }
    }
    Ok(())
}

thread_local! {
    /// The calling thread's kind as one letter (v, e, m), for the SIGSYS report.
    static THREAD_KIND: std::cell::Cell<u8> = const { std::cell::Cell::new(b'?') };
}

/// Installs `filter` and the open-denying filter on the calling thread (other threads
/// keep theirs).
pub fn apply_with_deny_open(
    kind: ThreadKind,
    filter: &BpfProgram,
    deny_open: &BpfProgram,
) -> Result<(), SeccompError> {
    seccompiler::apply_filter(deny_open).map_err(|e| SeccompError::Apply(kind, e.to_string()))?;
    apply(kind, filter)
}

/// Installs `filter` on the calling thread (other threads keep theirs).
pub fn apply(kind: ThreadKind, filter: &BpfProgram) -> Result<(), SeccompError> {
    THREAD_KIND.with(|k| {
        k.set(match kind {
            ThreadKind::Vcpu => b'v',
            ThreadKind::EventLoop => b'e',
            ThreadKind::Main => b'm',
        })
    });
    seccompiler::apply_filter(filter).map_err(|e| SeccompError::Apply(kind, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        let f = filters().unwrap();
        assert!(!f.vcpu.is_empty() && !f.event_loop.is_empty() && !f.main.is_empty());
    }

    #[test]
    fn a_thread_outside_its_list_is_refused() {
        // Run in a child process: the filter kills the process on a forbidden syscall.
        // SAFETY: fork in a test; the child only calls async-signal-safe functions and
        // exits with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let f = filters().map(|f| f.main);
            if let Ok(main) = f {
                let deny = filters().map(|f| f.deny_open);
                if install_sigsys_handler().is_ok()
                    && deny.is_ok_and(|d| apply_with_deny_open(ThreadKind::Main, &main, &d).is_ok())
                {
                    // Opening a file fails with EACCES instead of killing.
                    // SAFETY: open with a NUL-terminated path; the result is only compared.
                    let fd = unsafe { libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) };
                    if fd >= 0
                        || std::io::Error::last_os_error().raw_os_error() != Some(libc::EACCES)
                    {
                        // SAFETY: _exit never returns.
                        unsafe { libc::_exit(3) };
                    }
                    // Allowed: getpid. Forbidden: socket.
                    // SAFETY: plain syscalls with no pointers.
                    unsafe {
                        libc::getpid();
                        libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                        libc::_exit(0);
                    }
                }
            }
            // SAFETY: _exit never returns.
            unsafe { libc::_exit(2) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; status is a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), SECCOMP_EXIT_STATUS);
    }
}

#[cfg(test)]
mod thread_exit_tests {
    use super::*;

    #[test]
    fn vcpu_thread_can_report_and_exit() {
        let f = filters().unwrap();
        install_sigsys_handler().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let vcpu = f.vcpu.clone();
        let t = std::thread::spawn(move || {
            apply(ThreadKind::Vcpu, &vcpu).unwrap();
            let span = tracing::info_span!("vcpu", id = 0);
            let _g = span.enter();
            tx.send("done".to_string()).unwrap();
        });
        assert_eq!(rx.recv().unwrap(), "done");
        t.join().unwrap();
    }
}
