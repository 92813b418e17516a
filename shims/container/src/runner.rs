//! Running an OCI bundle with youki's libcontainer, in-process: create (the container's
//! init waits at the start barrier), start, kill, delete, and exec of further processes.
//!
//! Everything here blocks: callers run it on a blocking thread. The init and exec
//! processes are children of the calling process, so the caller reaps them (waitpid on
//! their pid only: libcontainer waits for its own intermediate processes, and a wildcard
//! reaper would steal those).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::{LinuxSeccomp, Spec};

/// Runs an exec'd process under its container's seccomp profile.
///
/// libcontainer 0.7 builds an exec's spec without the container's `linux.seccomp`, so
/// exec'd processes (ExecSync, kubectl exec) would run unfiltered; runc filters them
/// like the container's process. This executor loads the profile in the exec'd process
/// right before execve, after libcontainer set it up. Loading a filter takes
/// CAP_SYS_ADMIN or no_new_privs: a process without the capability gets no_new_privs
/// set first (stricter than runc, which loads the filter before dropping capabilities).
#[derive(Clone)]
struct SeccompExecutor {
    profile: LinuxSeccomp,
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let load = || libcontainer::seccomp::initialize_seccomp(&self.profile);
        let loaded = match load() {
            Ok(fd) => Ok(fd),
            Err(first) => {
                // SAFETY: prctl with integer arguments only.
                let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                if r != 0 {
                    Err(first.to_string())
                } else {
                    load().map_err(|e| e.to_string())
                }
            }
        };
        match loaded {
            Ok(None) => DefaultExecutor {}.exec(spec),
            Ok(Some(_)) => Err(ExecutorError::Other(
                "seccomp: SCMP_ACT_NOTIFY profiles are not supported for exec".into(),
            )),
            Err(e) => Err(ExecutorError::Other(format!(
                "loading the container's seccomp profile: {e}"
            ))),
        }
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

/// The seccomp profile of the container with this bundle.
fn bundle_seccomp(bundle: &Path) -> Result<Option<LinuxSeccomp>, String> {
    let spec = Spec::load(bundle.join("config.json"))
        .map_err(|e| format!("reading {}/config.json: {e}", bundle.display()))?;
    Ok(spec.linux().as_ref().and_then(|l| l.seccomp().clone()))
}

/// The AppArmor profile of the container with this bundle. libcontainer 0.7 builds an
/// exec's process without it, so exec'd processes would run unconfined; runc confines
/// them like the container's process.
fn bundle_apparmor(bundle: &Path) -> Result<Option<String>, String> {
    let spec = Spec::load(bundle.join("config.json"))
        .map_err(|e| format!("reading {}/config.json: {e}", bundle.display()))?;
    Ok(spec
        .process()
        .as_ref()
        .and_then(|p| p.apparmor_profile().clone())
        .filter(|p| !p.is_empty()))
}

/// Errors from libcontainer, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{action} container {id}: {detail}")]
pub struct RunError {
    /// create, start, kill, delete, exec.
    pub action: &'static str,
    /// The container.
    pub id: String,
    /// libcontainer's error.
    pub detail: String,
}

fn err(action: &'static str, id: &str, e: impl std::fmt::Display) -> RunError {
    RunError {
        action,
        id: id.to_owned(),
        detail: e.to_string(),
    }
}

/// The standard streams handed to a process.
pub struct Stdio {
    /// stdin (None: /dev/null).
    pub stdin: Option<OwnedFd>,
    /// stdout.
    pub stdout: OwnedFd,
    /// stderr.
    pub stderr: OwnedFd,
}

/// Containers kept under one state directory.
#[derive(Debug, Clone)]
pub struct Runner {
    root: PathBuf,
    systemd: bool,
}

impl Runner {
    /// A runner keeping libcontainer's state under `root`.
    pub fn new(root: &Path, systemd: bool) -> Runner {
        Runner {
            root: root.to_owned(),
            systemd,
        }
    }

    fn load(&self, id: &str, action: &'static str) -> Result<Container, RunError> {
        Container::load(self.root.join(id)).map_err(|e| err(action, id, e))
    }

    /// Creates the container from `bundle/config.json`; returns its init's pid. The
    /// process exists, in its namespaces and cgroup, and waits for [`Runner::start`].
    pub fn create(&self, id: &str, bundle: &Path, stdio: Stdio) -> Result<i32, RunError> {
        self.create_inner(id, bundle, Some(stdio), None)
    }

    /// Creates a container whose process has a terminal (`process.terminal` in the
    /// spec): libcontainer sends the pty master over the unix socket at `console`.
    pub fn create_with_console(
        &self,
        id: &str,
        bundle: &Path,
        console: &Path,
    ) -> Result<i32, RunError> {
        self.create_inner(id, bundle, None, Some(console))
    }

    fn create_inner(
        &self,
        id: &str,
        bundle: &Path,
        stdio: Option<Stdio>,
        console: Option<&Path>,
    ) -> Result<i32, RunError> {
        std::fs::create_dir_all(&self.root).map_err(|e| err("create", id, e))?;
        let mut b = ContainerBuilder::new(id.to_owned(), SyscallType::default())
            .with_root_path(&self.root)
            .map_err(|e| err("create", id, e))?
            .with_console_socket(console);
        if let Some(stdio) = stdio {
            b = b.with_stdout(stdio.stdout).with_stderr(stdio.stderr);
            if let Some(i) = stdio.stdin {
                b = b.with_stdin(i);
            }
        }
        let c = b
            .as_init(bundle)
            .with_systemd(self.systemd)
            .with_detach(true)
            .build()
            .map_err(|e| err("create", id, e))?;
        c.pid()
            .map(|p| p.as_raw())
            .ok_or_else(|| err("create", id, "no init pid after create"))
    }

    /// Lets the created container's init run its process.
    pub fn start(&self, id: &str) -> Result<(), RunError> {
        self.load(id, "start")?
            .start()
            .map_err(|e| err("start", id, e))
    }

    /// Signals the container's init (or all its processes).
    pub fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RunError> {
        let sig = libcontainer::signal::Signal::try_from(signal).map_err(|e| err("kill", id, e))?;
        self.load(id, "kill")?
            .kill(sig, all)
            .map_err(|e| err("kill", id, e))
    }

    /// Deletes the container's state and cgroup (killing what is left with `force`).
    /// A container libcontainer does not know is already deleted.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), RunError> {
        if !self.root.join(id).exists() {
            return Ok(());
        }
        self.load(id, "delete")?
            .delete(force)
            .map_err(|e| err("delete", id, e))
    }

    /// Runs a further process in the container; returns its pid (a child of the caller).
    pub fn exec(
        &self,
        id: &str,
        args: Vec<String>,
        env: HashMap<String, String>,
        stdio: Stdio,
        bundle: &Path,
    ) -> Result<i32, RunError> {
        let mut b = ContainerBuilder::new(id.to_owned(), SyscallType::default())
            .with_root_path(&self.root)
            .map_err(|e| err("exec", id, e))?
            .with_stdout(stdio.stdout)
            .with_stderr(stdio.stderr);
        if let Some(i) = stdio.stdin {
            b = b.with_stdin(i);
        }
        if let Some(profile) = bundle_seccomp(bundle).map_err(|e| err("exec", id, e))? {
            b = b.with_executor(SeccompExecutor { profile });
        }
        let apparmor = bundle_apparmor(bundle).map_err(|e| err("exec", id, e))?;
        let pid = b
            .as_tenant()
            .with_apparmor(apparmor)
            .with_container_args(args)
            .with_env(env)
            .with_detach(true)
            .build()
            .map_err(|e| err("exec", id, format!("{e} (bundle {})", bundle.display())))?;
        Ok(pid.as_raw())
    }
}

impl Runner {
    /// Runs the process described by `process` (an OCI process JSON with `terminal`
    /// set) in the container; its pty master is sent over the unix socket at `console`.
    /// Returns its pid (a child of the caller).
    pub fn exec_with_console(
        &self,
        id: &str,
        process: &Path,
        console: &Path,
    ) -> Result<i32, RunError> {
        let bundle = self.load(id, "exec")?.bundle().to_owned();
        let mut b = ContainerBuilder::new(id.to_owned(), SyscallType::default())
            .with_root_path(&self.root)
            .map_err(|e| err("exec", id, e))?
            .with_console_socket(Some(console));
        if let Some(profile) = bundle_seccomp(&bundle).map_err(|e| err("exec", id, e))? {
            b = b.with_executor(SeccompExecutor { profile });
        }
        let pid = b
            .as_tenant()
            .with_process(Some(process))
            .with_detach(true)
            .build()
            .map_err(|e| err("exec", id, e))?;
        Ok(pid.as_raw())
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal.
    pub code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
}

/// Waits for a child process to end (blocking).
pub fn wait(pid: i32) -> Exit {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return Exit { code, signal: None },
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                return Exit {
                    code: 128 + sig as i32,
                    signal: Some(sig as i32),
                }
            }
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            // Not our child (or already reaped): nothing more can be known.
            Err(_) => {
                return Exit {
                    code: 255,
                    signal: None,
                }
            }
        }
    }
}
