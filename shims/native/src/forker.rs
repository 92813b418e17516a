//! libcontainer's create and exec, each run in a short-lived helper process
//! (`isola-shim-native libct ...`).
//!
//! libcontainer clones with the raw clone3 syscall, so glibc's fork handlers do not run:
//! in a multi-threaded process (the shim runs tokio, log pumps and waiters) a child cloned
//! while another thread holds a malloc arena, tracing or environment lock deadlocks on
//! its first allocation or log line. The helper is single-threaded (a fresh exec), so its
//! clones are safe, as runc's are. The container's init (cloned with CLONE_PARENT, so a
//! child of the helper) is re-parented to the shim when the helper exits: the shim is a
//! child subreaper, and reaps it like its own child.

use std::collections::HashSet;
use std::io::BufRead;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use isola_container::runner::{self, Exit, RunError, Runner, Stdio};

/// Pids whose exit a waiter thread collects; the orphan reaper leaves them alone.
static WAITED: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

fn waited() -> std::sync::MutexGuard<'static, Option<HashSet<i32>>> {
    WAITED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits for a process that is (or is about to become, through re-parenting) a child of
/// the shim.
pub fn wait(pid: i32) -> Exit {
    waited().get_or_insert_with(HashSet::new).insert(pid);
    let exit = runner::wait(pid);
    if let Some(s) = waited().as_mut() {
        s.remove(&pid);
    }
    exit
}

/// Makes this process the reaper of its orphaned descendants, and starts a thread that
/// reaps zombies nobody waits for (processes re-parented to the shim). Call once, early.
pub fn become_subreaper() {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(|| {
            let me = std::process::id() as i32;
            let mut seen: HashSet<i32> = HashSet::new();
            loop {
                std::thread::sleep(std::time::Duration::from_secs(2));
                let zombies = zombie_children(me);
                let waited: HashSet<i32> = waited().clone().unwrap_or_default();
                for z in &zombies {
                    // Two scans in a row, unclaimed: nobody is going to wait for it.
                    if seen.contains(z) && !waited.contains(z) {
                        let _ = nix::sys::wait::waitpid(
                            nix::unistd::Pid::from_raw(*z),
                            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                        );
                    }
                }
                seen = zombies.into_iter().collect();
            }
        })
        .ok();
}

fn zombie_children(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(d) = std::fs::read_dir("/proc") else {
        return out;
    };
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
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next(), f.next().and_then(|p| p.parse::<i32>().ok()));
        if state == Some("Z") && ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// Runs create and exec through helper processes.
#[derive(Debug, Clone)]
pub struct Forker {
    root: PathBuf,
    systemd: bool,
    log: PathBuf,
}

fn err(action: &'static str, id: &str, detail: impl std::fmt::Display) -> RunError {
    RunError {
        action,
        id: id.to_owned(),
        detail: detail.to_string(),
    }
}

impl Forker {
    /// A forker keeping libcontainer's state under `root`; helpers log to `log`.
    pub fn new(root: &Path, systemd: bool, log: &Path) -> Forker {
        Forker {
            root: root.to_owned(),
            systemd,
            log: log.to_owned(),
        }
    }

    fn run(
        &self,
        action: &'static str,
        id: &str,
        args: Vec<String>,
        stdio: Option<Stdio>,
    ) -> Result<i32, RunError> {
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| err(action, id, format!("pipe: {e}")))?;
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg("libct")
            .arg(action)
            .arg("--root")
            .arg(&self.root)
            .arg("--id")
            .arg(id)
            .arg("--log")
            .arg(&self.log);
        if self.systemd {
            cmd.arg("--systemd");
        }
        cmd.args(args);
        match stdio {
            Some(s) => {
                if let Some(i) = s.stdin {
                    cmd.arg("--stdin").stdin(std::process::Stdio::from(i));
                } else {
                    cmd.stdin(std::process::Stdio::null());
                }
                cmd.stdout(std::process::Stdio::from(s.stdout))
                    .stderr(std::process::Stdio::from(s.stderr));
            }
            None => {
                cmd.stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
            }
        }
        let wr_fd = wr.as_raw_fd();
        // SAFETY: between fork and exec only dup2/fcntl run (async-signal-safe).
        unsafe {
            cmd.pre_exec(move || {
                if wr_fd == 3 {
                    // dup2 onto itself keeps O_CLOEXEC: clear it instead.
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(wr_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| err(action, id, format!("starting the libcontainer helper: {e}")))?;
        // Our copies of the container's stdio and of the result pipe must close now, or
        // the log pumps and the result read below would never see EOF.
        drop(cmd);
        drop(wr);
        // One line, not EOF: the container's init inherits the helper's end of the pipe
        // and holds it until it execs (after StartContainer).
        let mut out = String::new();
        let _ = std::io::BufReader::new(std::fs::File::from(rd)).read_line(&mut out);
        let status = child
            .wait()
            .map_err(|e| err(action, id, format!("waiting for the helper: {e}")))?;
        let line = out.trim();
        if let Some(msg) = line.strip_prefix("ERR ") {
            return Err(err(action, id, msg));
        }
        line.parse::<i32>().map_err(|_| {
            err(
                action,
                id,
                format!("libcontainer helper ended with {status} and said {line:?}"),
            )
        })
    }

    /// Creates a container (see [`Runner::create`]).
    pub fn create(&self, id: &str, bundle: &Path, stdio: Stdio) -> Result<i32, RunError> {
        self.run(
            "create",
            id,
            vec!["--bundle".into(), bundle.display().to_string()],
            Some(stdio),
        )
    }

    /// Creates a container with a terminal (see [`Runner::create_with_console`]).
    pub fn create_with_console(
        &self,
        id: &str,
        bundle: &Path,
        console: &Path,
    ) -> Result<i32, RunError> {
        self.run(
            "create",
            id,
            vec![
                "--bundle".into(),
                bundle.display().to_string(),
                "--console".into(),
                console.display().to_string(),
            ],
            None,
        )
    }

    /// Runs a process in a container (see [`Runner::exec`]).
    pub fn exec(
        &self,
        id: &str,
        args: Vec<String>,
        env: std::collections::HashMap<String, String>,
        stdio: Stdio,
        bundle: &Path,
    ) -> Result<i32, RunError> {
        let mut a = vec!["--bundle".into(), bundle.display().to_string()];
        for (k, v) in env {
            a.push("--env".into());
            a.push(format!("{k}={v}"));
        }
        a.push("--".into());
        a.extend(args);
        self.run("exec", id, a, Some(stdio))
    }

    /// Runs a process with a terminal (see [`Runner::exec_with_console`]).
    pub fn exec_with_console(
        &self,
        id: &str,
        process: &Path,
        console: &Path,
    ) -> Result<i32, RunError> {
        self.run(
            "exec",
            id,
            vec![
                "--process".into(),
                process.display().to_string(),
                "--console".into(),
                console.display().to_string(),
            ],
            None,
        )
    }
}

/// The helper's side: `isola-shim-native libct create|exec ...` with the container's
/// stdio on fds 0-2 and the result pipe on fd 3. Writes `<pid>` or `ERR <message>`.
pub fn helper_main(args: &[String]) -> ! {
    // SAFETY: fd 3 was set up by the parent for exactly this; nobody else owns it.
    let mut result = unsafe { std::fs::File::from_raw_fd(3) };
    let reply = |f: &mut std::fs::File, s: String| {
        use std::io::Write;
        let _ = f.write_all(s.as_bytes());
    };
    let get = |name: &str| -> Option<String> {
        let stop = args.iter().position(|a| a == "--").unwrap_or(args.len());
        args[..stop]
            .iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let has = |name: &str| {
        let stop = args.iter().position(|a| a == "--").unwrap_or(args.len());
        args[..stop].iter().any(|a| a == name)
    };
    if let Some(log) = get("--log") {
        if let Ok(f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let f: &'static std::fs::File = Box::leak(Box::new(f));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
                .with_ansi(false)
                .with_writer(move || f)
                .try_init();
        }
    }
    let (Some(action), Some(root), Some(id)) = (args.first(), get("--root"), get("--id")) else {
        reply(
            &mut result,
            "ERR libct: missing action, --root or --id".into(),
        );
        std::process::exit(2);
    };
    let runner = Runner::new(Path::new(&root), has("--systemd"));
    let stdio = || -> std::io::Result<Stdio> {
        let dup = |fd: i32| -> std::io::Result<OwnedFd> {
            // SAFETY: dup of one of our standard descriptors; the new fd is ours.
            let n = unsafe { libc::dup(fd) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: n is a fresh descriptor.
            Ok(unsafe { OwnedFd::from_raw_fd(n) })
        };
        Ok(Stdio {
            stdin: if has("--stdin") { Some(dup(0)?) } else { None },
            stdout: dup(1)?,
            stderr: dup(2)?,
        })
    };
    let console = get("--console").map(PathBuf::from);
    let outcome = match (action.as_str(), console) {
        ("create", Some(c)) => get("--bundle")
            .ok_or_else(|| "missing --bundle".to_string())
            .and_then(|b| {
                runner
                    .create_with_console(&id, Path::new(&b), &c)
                    .map_err(|e| e.to_string())
            }),
        ("create", None) => get("--bundle")
            .ok_or_else(|| "missing --bundle".to_string())
            .and_then(|b| {
                let s = stdio().map_err(|e| e.to_string())?;
                runner
                    .create(&id, Path::new(&b), s)
                    .map_err(|e| e.to_string())
            }),
        ("exec", Some(c)) => get("--process")
            .ok_or_else(|| "missing --process".to_string())
            .and_then(|p| {
                runner
                    .exec_with_console(&id, Path::new(&p), &c)
                    .map_err(|e| e.to_string())
            }),
        ("exec", None) => {
            let cmd: Vec<String> = args
                .iter()
                .position(|a| a == "--")
                .map(|i| args[i + 1..].to_vec())
                .unwrap_or_default();
            let stop = args.iter().position(|a| a == "--").unwrap_or(args.len());
            let mut env = std::collections::HashMap::new();
            let mut it = args[..stop].iter();
            while let Some(a) = it.next() {
                if a == "--env" {
                    if let Some((k, v)) = it.next().and_then(|kv| kv.split_once('=')) {
                        env.insert(k.to_owned(), v.to_owned());
                    }
                }
            }
            let bundle = get("--bundle").unwrap_or_default();
            stdio().map_err(|e| e.to_string()).and_then(|s| {
                runner
                    .exec(&id, cmd, env, s, Path::new(&bundle))
                    .map_err(|e| e.to_string())
            })
        }
        (other, _) => Err(format!("unknown action {other:?}")),
    };
    match outcome {
        Ok(pid) => {
            reply(&mut result, format!("{pid}\n"));
            std::process::exit(0)
        }
        Err(e) => {
            reply(&mut result, format!("ERR {}\n", e.replace('\n', " ")));
            std::process::exit(1)
        }
    }
}
