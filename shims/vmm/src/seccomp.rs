//! seccomp allow-lists per thread kind, as Firecracker has them: each thread installs its
//! own filter once set-up is done (after every fd is open, every mapping made), so the
//! lists cover only the steady state. A syscall outside the list kills the process.

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

fn build(kind: ThreadKind, extra: &[i64], rules: Vec<(i64, Vec<SeccompRule>)>) -> Result<BpfProgram, SeccompError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in COMMON.iter().chain(extra) {
        map.insert(*nr, Vec::new());
    }
    for (nr, r) in rules {
        map.insert(nr, r);
    }
    let filter = SeccompFilter::new(
        map,
        SeccompAction::KillProcess,
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
    Ok(Filters {
        vcpu: Arc::new(build(ThreadKind::Vcpu, &[], vec![(libc::SYS_ioctl, vec![kvm_run])])?),
        event_loop: Arc::new(build(ThreadKind::EventLoop, EVENT_LOOP, Vec::new())?),
        main: Arc::new(build(ThreadKind::Main, MAIN, Vec::new())?),
    })
}

/// Installs `filter` on the calling thread (other threads keep theirs).
pub fn apply(kind: ThreadKind, filter: &BpfProgram) -> Result<(), SeccompError> {
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
                if apply(ThreadKind::Main, &main).is_ok() {
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
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
