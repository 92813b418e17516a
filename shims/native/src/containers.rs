//! The containers of a native pod: root filesystem mounts, OCI bundle, libcontainer
//! process, CRI log, exit status and events.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use isola_container::cgroups;
use isola_container::logs::{self, LogWriter, Stream};
use isola_container::runner::{self, Runner, Stdio};
use isola_container::spec::{self, ImageConfig, PodContext, SpecOptions};
use isola_proto::cri;
use isola_proto::shim as sp;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

/// Errors of container operations, with the gRPC code they map to.
#[derive(Debug, thiserror::Error)]
pub enum CtrError {
    /// Bad request (names the field).
    #[error("{0}")]
    Invalid(String),
    /// Unknown container.
    #[error("container {0} is not known to this shim")]
    NotFound(String),
    /// Wrong state.
    #[error("{0}")]
    State(String),
    /// Not supported yet.
    #[error("{0}")]
    Unsupported(String),
    /// A step failed.
    #[error("{0}")]
    Failed(String),
}

impl From<CtrError> for tonic::Status {
    fn from(e: CtrError) -> tonic::Status {
        match e {
            CtrError::Invalid(m) => tonic::Status::invalid_argument(m),
            CtrError::NotFound(_) => tonic::Status::not_found(e.to_string()),
            CtrError::State(m) => tonic::Status::failed_precondition(m),
            CtrError::Unsupported(m) => tonic::Status::unimplemented(m),
            CtrError::Failed(m) => tonic::Status::internal(m),
        }
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A piece of a container's output, for attached clients.
#[derive(Clone)]
pub struct OutChunk {
    /// From stderr (else stdout or the terminal).
    pub stderr: bool,
    /// The bytes.
    pub data: Arc<[u8]>,
}

/// A reader that also hands every chunk it reads to attached clients.
struct Tee<R> {
    inner: R,
    stderr: bool,
    out: broadcast::Sender<OutChunk>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            // Nobody attached is fine.
            let _ = self.out.send(OutChunk {
                stderr: self.stderr,
                data: Arc::from(&buf[..n]),
            });
        }
        Ok(n)
    }
}

/// A short path for a console socket (a unix socket path must fit in 108 bytes).
fn console_path() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("isola-tty-{}-{n}.sock", std::process::id()))
}

/// One container.
pub struct Ctr {
    /// Its id.
    pub id: String,
    /// Its OCI bundle directory.
    pub bundle: PathBuf,
    /// Its cgroup (a cgroupfs path, also under the systemd driver).
    pub cgroups_path: String,
    /// The slice holding its scope `isola-<id>.scope`, under the systemd driver.
    pub systemd_slice: Option<String>,
    /// Its stop signal.
    pub stop_signal: i32,
    log: Option<Arc<LogWriter>>,
    status: Mutex<sp::ContainerStatus>,
    exited: watch::Sender<bool>,
    rootfs_mounted: Mutex<bool>,
    /// The container's stdin (attach), when it asked for one (and has no terminal).
    pub stdin: Mutex<Option<OwnedFd>>,
    /// Whether stdin closes when the first attached client closes it.
    pub stdin_once: bool,
    /// The master of its terminal (TTY containers).
    pub tty: Option<Arc<std::fs::File>>,
    /// Its output as it is logged, for attached clients.
    pub output: broadcast::Sender<OutChunk>,
}

impl Ctr {
    /// A snapshot of its status.
    pub fn status(&self) -> sp::ContainerStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, f: impl FnOnce(&mut sp::ContainerStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Resolves when the container's init has exited.
    pub async fn wait(&self) -> sp::ContainerStatus {
        let mut rx = self.exited.subscribe();
        let _ = rx.wait_for(|e| *e).await;
        self.status()
    }

    fn state(&self) -> sp::ContainerState {
        sp::ContainerState::try_from(self.status().state).unwrap_or(sp::ContainerState::Unknown)
    }
}

/// A process started by [`Containers::spawn_exec`] and the shim's ends of its pipes.
pub struct ExecPipes {
    /// Its pid (a child of the shim).
    pub pid: i32,
    /// Its stdin, when asked for.
    pub stdin: Option<OwnedFd>,
    /// Its stdout.
    pub stdout: OwnedFd,
    /// Its stderr.
    pub stderr: OwnedFd,
}

/// The table of a pod's containers.
pub struct Containers {
    runner: Runner,
    forker: crate::forker::Forker,
    map: Mutex<HashMap<String, Arc<Ctr>>>,
    events: broadcast::Sender<sp::Event>,
    opts: SpecOptions,
}

/// Mounts the rootfs `mounts` (overlay or bind, from the agent) at `rootfs`.
pub fn mount_rootfs(mounts: &[sp::Mount], rootfs: &Path) -> Result<(), CtrError> {
    std::fs::create_dir_all(rootfs)
        .map_err(|e| CtrError::Failed(format!("creating {}: {e}", rootfs.display())))?;
    if mounts.is_empty() {
        return Err(CtrError::Invalid(
            "no root filesystem mounts were given".into(),
        ));
    }
    for m in mounts {
        let target = if m.target.is_empty() {
            rootfs.to_owned()
        } else {
            rootfs.join(m.target.trim_start_matches('/'))
        };
        match m.r#type.as_str() {
            "overlay" => {
                let data = m.options.join(",");
                mount(
                    Some("overlay"),
                    &target,
                    Some("overlay"),
                    MsFlags::empty(),
                    Some(data.as_str()),
                )
                .map_err(|e| {
                    CtrError::Failed(format!(
                        "mounting the overlay rootfs at {}: {e}",
                        target.display()
                    ))
                })?;
            }
            "bind" | "rbind" => {
                let mut flags = MsFlags::MS_BIND | MsFlags::MS_REC;
                mount(
                    Some(m.source.as_str()),
                    &target,
                    None::<&str>,
                    flags,
                    None::<&str>,
                )
                .map_err(|e| {
                    CtrError::Failed(format!(
                        "bind-mounting {} at {}: {e}",
                        m.source,
                        target.display()
                    ))
                })?;
                if m.options.iter().any(|o| o == "ro") {
                    flags |= MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
                    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>).map_err(
                        |e| {
                            CtrError::Failed(format!(
                                "remounting {} read-only: {e}",
                                target.display()
                            ))
                        },
                    )?;
                }
            }
            other => {
                return Err(CtrError::Invalid(format!(
                    "rootfs mount type {other:?} is not supported"
                )))
            }
        }
    }
    Ok(())
}

/// A close-on-exec pipe: its ends must reach only the process they are given to (as
/// its stdio, where dup2 clears the flag), never another child of the shim, or the
/// container's log would never see EOF.
fn pipe() -> Result<(OwnedFd, OwnedFd), CtrError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| CtrError::Failed(format!("pipe: {e}")))
}

/// Signals every process of a container's cgroup until none is left (for SIGKILL) —
/// without freezing the cgroup: a v1 freezer that fails to thaw would leave the processes
/// frozen and unkillable.
fn signal_cgroup(c: &Ctr, sig: i32) {
    let Ok(signal) = nix::sys::signal::Signal::try_from(sig) else {
        return;
    };
    let init = c.status().pid as i32;
    if init > 0 && c.state() != sp::ContainerState::Exited {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(init), signal);
    }
    for _ in 0..if sig == libc::SIGKILL { 20 } else { 1 } {
        let procs = cgroups::procs(&c.cgroups_path);
        if procs.is_empty() {
            break;
        }
        for p in procs {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), signal);
        }
        if sig == libc::SIGKILL {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Whether this process holds CAP_SYS_RESOURCE (needed for a negative oom_score_adj).
pub fn has_cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("CapEff:")
                        .map(|v| u64::from_str_radix(v.trim(), 16).ok())
                })
                .flatten()
        })
        .map(|caps| caps & (1 << 24) != 0)
        .unwrap_or(false)
}

/// Output of an exec, bounded.
const MAX_EXEC_OUTPUT: usize = 16 << 20;

fn collect(fd: OwnedFd) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut f = std::fs::File::from(fd);
        let mut buf = [0u8; 8192];
        loop {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.len() < MAX_EXEC_OUTPUT {
                        let take = n.min(MAX_EXEC_OUTPUT - out.len());
                        out.extend_from_slice(&buf[..take]);
                    }
                }
            }
        }
        out
    })
}

impl Containers {
    /// A table using libcontainer state under `state_root`.
    pub fn new(
        state_root: &Path,
        opts: SpecOptions,
        events: broadcast::Sender<sp::Event>,
    ) -> Containers {
        Containers {
            runner: Runner::new(state_root, opts.systemd_cgroup),
            forker: crate::forker::Forker::new(
                state_root,
                opts.systemd_cgroup,
                &state_root.parent().unwrap_or(state_root).join("shim.log"),
            ),
            map: Mutex::new(HashMap::new()),
            events,
            opts,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Ctr>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A container by id.
    pub fn get(&self, id: &str) -> Result<Arc<Ctr>, CtrError> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| CtrError::NotFound(id.to_owned()))
    }

    /// Every container.
    pub fn all(&self) -> Vec<Arc<Ctr>> {
        self.map().values().cloned().collect()
    }

    fn emit(&self, t: sp::EventType, c: &Ctr) {
        let _ = self.events.send(sp::Event {
            r#type: t as i32,
            container_id: c.id.clone(),
            timestamp_ns: now_ns(),
            status: Some(c.status()),
        });
    }

    /// Creates a container (blocking).
    pub fn create(
        &self,
        req: &sp::CreateContainerRequest,
        pod: &PodContext,
        pod_state: &Path,
    ) -> Result<Arc<Ctr>, CtrError> {
        use prost::Message;
        let id = req.container_id.clone();
        if id.is_empty() || id.contains('/') || id.contains("..") {
            return Err(CtrError::Invalid(format!(
                "container_id {id:?} is not a valid id"
            )));
        }
        if self.map().contains_key(&id) {
            return Err(CtrError::State(format!(
                "container {id} already exists in this pod"
            )));
        }
        let config = cri::ContainerConfig::decode(req.container_config.as_slice())
            .map_err(|e| CtrError::Invalid(format!("container_config: {e}")))?;
        let image = ImageConfig::from_json(&req.image_config_json)
            .map_err(|e| CtrError::Invalid(e.to_string()))?;
        let bundle = if req.state_dir.is_empty() {
            pod_state.join("containers").join(&id)
        } else {
            PathBuf::from(&req.state_dir)
        };
        let rootfs = bundle.join("rootfs");
        std::fs::create_dir_all(&bundle)
            .map_err(|e| CtrError::Failed(format!("creating bundle: {e}")))?;
        let cleanup = |mounted: bool| {
            if mounted {
                let _ = umount2(&rootfs, MntFlags::MNT_DETACH);
            }
            let _ = std::fs::remove_dir_all(&bundle);
        };
        if let Err(e) = mount_rootfs(&req.rootfs, &rootfs) {
            cleanup(isola_container::mounts::is_mount_point(&rootfs));
            return Err(e);
        }
        let result = self.create_mounted(&id, &config, &image, &bundle, pod, &req.log_path);
        match result {
            Ok(c) => Ok(c),
            Err(e) => {
                let _ = self.runner.delete(&id, true);
                cleanup(true);
                Err(e)
            }
        }
    }

    fn create_mounted(
        &self,
        id: &str,
        config: &cri::ContainerConfig,
        image: &ImageConfig,
        bundle: &Path,
        pod: &PodContext,
        log_path: &str,
    ) -> Result<Arc<Ctr>, CtrError> {
        let g = spec::generate(id, config, image, &bundle.join("rootfs"), pod, &self.opts)
            .map_err(|e| match e {
                spec::SpecError::Oci(m) => CtrError::Failed(m),
                other => CtrError::Invalid(other.to_string()),
            })?;
        g.spec
            .save(bundle.join("config.json"))
            .map_err(|e| CtrError::Failed(format!("writing config.json: {e}")))?;
        let log = if log_path.is_empty() {
            None
        } else {
            Some(
                LogWriter::open(Path::new(log_path))
                    .map_err(|e| CtrError::Failed(format!("opening log {log_path}: {e}")))?,
            )
        };
        let (output, _) = broadcast::channel::<OutChunk>(256);
        let pump_into = |reader: Box<dyn Read + Send>, stream: Stream| {
            let log = log.clone();
            let tee = Tee {
                inner: reader,
                stderr: stream == Stream::Stderr,
                out: output.clone(),
            };
            std::thread::spawn(move || match log {
                Some(l) => logs::pump(tee, stream, l),
                None => {
                    let mut tee = tee;
                    let _ = std::io::copy(&mut tee, &mut std::io::sink());
                }
            })
        };
        let mut pumps = Vec::new();
        let mut stdin_keep = None;
        let mut tty = None;
        let pid = if config.tty {
            // The terminal carries stdin, stdout and stderr; its output is logged as stdout.
            let console = crate::console::ConsoleSocket::bind(&console_path())
                .map_err(|e| CtrError::Failed(format!("console socket: {e}")))?;
            let pid = { self.forker.create_with_console(id, bundle, console.path()) }
                .map_err(|e| CtrError::Failed(e.to_string()))?;
            let master = console
                .receive()
                .map_err(|e| CtrError::Failed(format!("receiving the terminal: {e}")))?;
            let reader = master
                .try_clone()
                .map_err(|e| CtrError::Failed(format!("dup of the terminal: {e}")))?;
            pumps.push(pump_into(
                Box::new(std::fs::File::from(reader)),
                Stream::Stdout,
            ));
            tty = Some(Arc::new(std::fs::File::from(master)));
            pid
        } else {
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            let stdin_give = if config.stdin {
                let (r, w) = pipe()?;
                stdin_keep = Some(w);
                Some(r)
            } else {
                None
            };
            // Pumps run before create so that libcontainer's init errors (written to the
            // container's stderr) reach the log too.
            pumps.push(pump_into(
                Box::new(std::fs::File::from(out_r)),
                Stream::Stdout,
            ));
            pumps.push(pump_into(
                Box::new(std::fs::File::from(err_r)),
                Stream::Stderr,
            ));
            self.forker
                .create(
                    id,
                    bundle,
                    Stdio {
                        stdin: stdin_give,
                        stdout: out_w,
                        stderr: err_w,
                    },
                )
                .map_err(|e| CtrError::Failed(e.to_string()))?
        };
        if let Some(adj) = g.oom_score_adj {
            if let Err(e) = std::fs::write(format!("/proc/{pid}/oom_score_adj"), adj.to_string()) {
                warn!(pid, adj, error = %e, "setting oom_score_adj");
            }
        }
        let (exited, _) = watch::channel(false);
        let ctr = Arc::new(Ctr {
            id: id.to_owned(),
            bundle: bundle.to_owned(),
            cgroups_path: isola_container::systemd::fs_path(&g.cgroups_path),
            systemd_slice: g
                .cgroups_path
                .split_once(':')
                .filter(|(slice, _)| slice.ends_with(".slice"))
                .map(|(slice, _)| slice.to_owned()),
            stop_signal: g.stop_signal,
            log,
            status: Mutex::new(sp::ContainerStatus {
                container_id: id.to_owned(),
                state: sp::ContainerState::Created as i32,
                pid: pid as u32,
                created_at_ns: now_ns(),
                ..Default::default()
            }),
            exited,
            rootfs_mounted: Mutex::new(true),
            stdin: Mutex::new(stdin_keep),
            stdin_once: config.stdin_once,
            tty,
            output,
        });
        self.map().insert(id.to_owned(), ctr.clone());
        let waiter = ctr.clone();
        let events = self.events.clone();
        let stop_watch = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let oom_kills = cgroups::watch_oom_kills(&ctr.cgroups_path, stop_watch.clone());
        let parent_ooms = cgroups::parent_oom_kills(&ctr.cgroups_path).map(|(n, _)| n);
        std::thread::Builder::new()
            .name(format!("wait-{}", &id[..12.min(id.len())]))
            .spawn(move || {
                let exit = crate::forker::wait(pid);
                for p in pumps {
                    let _ = p.join();
                }
                stop_watch.store(true, std::sync::atomic::Ordering::SeqCst);
                let mut ooms = cgroups::usage(&waiter.cgroups_path)
                    .oom_kills
                    .max(oom_kills.load(std::sync::atomic::Ordering::SeqCst));
                // The watch can lose the race with systemd removing the empty scope
                // (seen under TCG in L1): a SIGKILL while the parent counted an OOM
                // kill and our cgroup is gone is taken as ours.
                if ooms == 0 && exit.signal == Some(libc::SIGKILL) {
                    if let (Some(before), Some((after, false))) =
                        (parent_ooms, cgroups::parent_oom_kills(&waiter.cgroups_path))
                    {
                        ooms = after.saturating_sub(before);
                    }
                }
                let reason = if ooms > 0 {
                    "OOMKilled"
                } else if exit.code == 0 {
                    "Completed"
                } else {
                    "Error"
                };
                waiter.set(|s| {
                    s.state = sp::ContainerState::Exited as i32;
                    s.exit_code = exit.code;
                    s.reason = reason.into();
                    s.finished_at_ns = now_ns();
                    if let Some(sig) = exit.signal {
                        s.message = format!("killed by signal {sig}");
                    }
                });
                // send_replace: `send` drops the value when nobody is subscribed at this moment.
                waiter.exited.send_replace(true);
                info!(container = %waiter.id, code = exit.code, reason, "container exited");
                let _ = events.send(sp::Event {
                    r#type: sp::EventType::ContainerExited as i32,
                    container_id: waiter.id.clone(),
                    timestamp_ns: now_ns(),
                    status: Some(waiter.status()),
                });
            })
            .map_err(|e| CtrError::Failed(format!("spawning the waiter: {e}")))?;
        self.emit(sp::EventType::ContainerCreated, &ctr);
        Ok(ctr)
    }

    /// Starts a created container (blocking).
    pub fn start(&self, id: &str) -> Result<u32, CtrError> {
        let c = self.get(id)?;
        if c.state() != sp::ContainerState::Created {
            return Err(CtrError::State(format!(
                "container {id} is not in the created state"
            )));
        }
        // Taken before the process is released, so that a container that exits at once
        // never shows a finish before its start.
        let started = now_ns();
        self.runner
            .start(id)
            .map_err(|e| CtrError::Failed(e.to_string()))?;
        c.set(|s| {
            if s.state == sp::ContainerState::Created as i32 {
                s.state = sp::ContainerState::Running as i32;
            }
            s.started_at_ns = started;
        });
        self.emit(sp::EventType::ContainerStarted, &c);
        Ok(c.status().pid)
    }

    /// Signals a container; signal 0 means its stop signal. Exited containers are left be.
    pub fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), CtrError> {
        let c = self.get(id)?;
        if c.state() == sp::ContainerState::Exited {
            return Ok(());
        }
        let sig = if signal == 0 {
            c.stop_signal
        } else {
            signal as i32
        };
        let pid = c.status().pid as i32;
        if all {
            signal_cgroup(&c, sig);
        } else if pid > 0 {
            let signal = nix::sys::signal::Signal::try_from(sig)
                .map_err(|e| CtrError::Invalid(format!("signal {sig}: {e}")))?;
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
        Ok(())
    }

    /// Deletes a container that is not running (blocking).
    pub fn delete(&self, id: &str) -> Result<(), CtrError> {
        let Ok(c) = self.get(id) else { return Ok(()) };
        if c.state() == sp::ContainerState::Running {
            return Err(CtrError::State(format!(
                "container {id} is running: stop it first"
            )));
        }
        if c.state() == sp::ContainerState::Created {
            signal_cgroup(&c, libc::SIGKILL);
        }
        self.release(&c)?;
        self.map().remove(id);
        self.emit(sp::EventType::ContainerDeleted, &c);
        Ok(())
    }

    fn release(&self, c: &Ctr) -> Result<(), CtrError> {
        if let Err(e) = self.runner.delete(&c.id, true) {
            warn!(container = %c.id, error = %e, "libcontainer delete");
        }
        let mut mounted = c.rootfs_mounted.lock().unwrap_or_else(|p| p.into_inner());
        if *mounted {
            let rootfs = c.bundle.join("rootfs");
            if let Err(e) = umount2(&rootfs, MntFlags::MNT_DETACH) {
                if isola_container::mounts::is_mount_point(&rootfs) {
                    return Err(CtrError::Failed(format!(
                        "unmounting {}: {e}",
                        rootfs.display()
                    )));
                }
            }
            *mounted = false;
        }
        let _ = std::fs::remove_dir_all(&c.bundle);
        let _ = cgroups::remove(&c.cgroups_path);
        Ok(())
    }

    /// Kills every container and releases them all (pod stop). Blocking.
    pub fn kill_all_and_release(&self) {
        let all = self.all();
        for c in &all {
            if c.state() != sp::ContainerState::Exited {
                signal_cgroup(c, libc::SIGKILL);
            }
        }
        for c in &all {
            let mut rx = c.exited.subscribe();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !*rx.borrow_and_update() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if let Err(e) = self.release(c) {
                warn!(container = %c.id, error = %e, "releasing container");
            }
        }
    }

    /// Runs a command in a running container and collects its output (blocking); kills
    /// it after `timeout` seconds (0: none).
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: i64,
    ) -> Result<sp::ExecSyncResponse, CtrError> {
        let ExecPipes {
            pid,
            stdout,
            stderr,
            ..
        } = self.spawn_exec(id, cmd, false)?;
        let out_t = collect(stdout);
        let err_t = collect(stderr);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(crate::forker::wait(pid));
        });
        let (exit, timed_out) = if timeout > 0 {
            match rx.recv_timeout(std::time::Duration::from_secs(timeout as u64)) {
                Ok(e) => (e, false),
                Err(_) => {
                    kill_tree(pid);
                    (
                        rx.recv().unwrap_or(runner::Exit {
                            code: 137,
                            signal: Some(9),
                        }),
                        true,
                    )
                }
            }
        } else {
            (
                rx.recv().unwrap_or(runner::Exit {
                    code: 255,
                    signal: None,
                }),
                false,
            )
        };
        // Children of the command may hold the pipes open: output is what arrived by now.
        let grab = |t: std::thread::JoinHandle<Vec<u8>>| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if t.is_finished() {
                t.join().unwrap_or_default()
            } else {
                Vec::new()
            }
        };
        Ok(sp::ExecSyncResponse {
            stdout: grab(out_t),
            stderr: grab(err_t),
            exit_code: exit.code,
            timed_out,
        })
    }

    /// The running container a command is to run in.
    fn exec_target(&self, id: &str, cmd: &[String]) -> Result<Arc<Ctr>, CtrError> {
        let c = self.get(id)?;
        if c.state() != sp::ContainerState::Running {
            return Err(CtrError::State(format!("container {id} is not running")));
        }
        if cmd.is_empty() {
            return Err(CtrError::Invalid("cmd must not be empty".into()));
        }
        Ok(c)
    }

    /// Starts a command in a running container with pipes for its stdio (blocking); the
    /// caller waits for the returned pid.
    pub fn spawn_exec(
        &self,
        id: &str,
        cmd: Vec<String>,
        stdin: bool,
    ) -> Result<ExecPipes, CtrError> {
        let c = self.exec_target(id, &cmd)?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (in_keep, in_give) = if stdin {
            let (r, w) = pipe()?;
            (Some(w), Some(r))
        } else {
            (None, None)
        };
        let pid = {
            self.forker.exec(
                id,
                cmd,
                HashMap::new(),
                Stdio {
                    stdin: in_give,
                    stdout: out_w,
                    stderr: err_w,
                },
                &c.bundle,
            )
        }
        .map_err(|e| CtrError::Failed(e.to_string()))?;
        Ok(ExecPipes {
            pid,
            stdin: in_keep,
            stdout: out_r,
            stderr: err_r,
        })
    }

    /// Starts a command with a terminal in a running container (blocking); returns its
    /// pid and the terminal's master.
    pub fn spawn_exec_tty(&self, id: &str, cmd: Vec<String>) -> Result<(i32, OwnedFd), CtrError> {
        let c = self.exec_target(id, &cmd)?;
        // The container's own process (user, env, cwd, capabilities) with this command
        // and a terminal.
        let spec: serde_json::Value = std::fs::read(c.bundle.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| CtrError::Failed("reading the bundle's config.json".into()))?;
        let mut process = spec
            .get("process")
            .cloned()
            .ok_or_else(|| CtrError::Failed("config.json has no process".into()))?;
        process["args"] = serde_json::json!(cmd);
        process["terminal"] = serde_json::json!(true);
        let console = crate::console::ConsoleSocket::bind(&console_path())
            .map_err(|e| CtrError::Failed(format!("console socket: {e}")))?;
        let process_path = console.path().with_extension("json");
        std::fs::write(&process_path, process.to_string())
            .map_err(|e| CtrError::Failed(format!("writing the exec process: {e}")))?;
        let pid = {
            self.forker
                .exec_with_console(id, &process_path, console.path())
        };
        let _ = std::fs::remove_file(&process_path);
        let pid = pid.map_err(|e| CtrError::Failed(e.to_string()))?;
        let master = console
            .receive()
            .map_err(|e| CtrError::Failed(format!("receiving the terminal: {e}")))?;
        Ok((pid, master))
    }

    /// Reopens a container's log file.
    pub fn reopen_log(&self, id: &str) -> Result<(), CtrError> {
        let c = self.get(id)?;
        if c.state() != sp::ContainerState::Running {
            return Err(CtrError::State(format!("container {id} is not running")));
        }
        match &c.log {
            Some(l) => l
                .reopen()
                .map_err(|e| CtrError::Failed(format!("reopening the log: {e}"))),
            None => Err(CtrError::State(format!("container {id} has no log path"))),
        }
    }
}

/// SIGKILLs a process and every descendant of it (a timed-out exec must not leave its
/// children running). Children are collected before anyone is killed, so that none is
/// reparented away first.
fn kill_tree(root: i32) {
    let mut parents: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                continue;
            };
            if let Some(ppid) = rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i32>().ok())
            {
                parents.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut all = vec![root];
    let mut i = 0;
    while i < all.len() {
        if let Some(children) = parents.get(&all[i]) {
            all.extend(children.iter().copied());
        }
        i += 1;
    }
    for pid in all {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Converts cgroup usage to the shim API's stats.
pub fn cgroup_stats(path: &str) -> sp::CgroupStats {
    let u = cgroups::usage(path);
    sp::CgroupStats {
        timestamp_ns: now_ns(),
        cpu_usage_ns: u.cpu_ns,
        memory_usage_bytes: u.memory_usage,
        memory_working_set_bytes: u.working_set,
        memory_rss_bytes: u.rss,
        page_faults: u.page_faults,
        major_page_faults: u.major_page_faults,
        pids: u.pids,
    }
}
