//! The end-to-end harness: starts `isolad` in temporary directories on a temporary
//! socket and drives it only through CRI clients over that unix socket, as crictl does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hyper_util::rt::TokioIo;
use isola_proto::cri;
use isola_proto::cri::image_service_client::ImageServiceClient;
use isola_proto::cri::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub mod fixtures;
pub mod l1;
pub mod registry;
pub mod streaming_client;

/// A CRI runtime client.
pub type Runtime = RuntimeServiceClient<Channel>;
/// A CRI image client.
pub type Images = ImageServiceClient<Channel>;

/// Directory holding the workspace's binaries (isolad, shims): `ISOLA_BIN_DIR`, or the
/// cargo profile directory this test binary was built into.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ISOLA_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary; fails the test, naming the fix, when it is not built.
pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins), or set ISOLA_BIN_DIR",
        p.display()
    );
    p
}

/// Connects a gRPC channel over a unix socket.
pub async fn uds_channel(path: &Path) -> anyhow::Result<Channel> {
    let path = path.to_owned();
    Ok(Endpoint::from_static("http://isola")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?)
}

/// Options for starting an agent.
#[derive(Default, Clone)]
pub struct AgentOptions {
    /// Extra TOML appended to the generated config.
    pub config: String,
}

/// A running `isolad` in its own temporary directories.
pub struct Agent {
    dir: tempfile::TempDir,
    child: Option<Child>,
    options: AgentOptions,
}

impl Agent {
    /// Starts an agent with default options.
    pub async fn start() -> Agent {
        Agent::start_with(AgentOptions::default()).await
    }

    /// Starts an agent.
    pub async fn start_with(options: AgentOptions) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("isola")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let mut agent = Agent {
            dir,
            child: None,
            options,
        };
        agent.launch().await.expect("isolad starts");
        agent
    }

    /// The agent's CNI conf dir (`<dir>/cni/net.d`, empty at start) unless the options
    /// set a `[cni]` table of their own.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.path().join("cni").join("net.d")
    }

    /// The temporary directory holding everything of this agent.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `--root` directory.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The `--state` directory.
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The CRI socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("isola.sock")
    }

    /// The config file written for this agent.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("isolad.log")).unwrap_or_default()
    }

    /// Pid of the running isolad.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let classes = self.dir.path().join("runtime-classes");
        std::fs::create_dir_all(&classes)?;
        // A CNI conf dir of the agent's own (empty unless a test writes a network config
        // there), never the host's /etc/cni/net.d.
        std::fs::create_dir_all(self.cni_conf_dir())?;
        let cni = if self.options.config.contains("[cni]") {
            String::new()
        } else {
            format!("[cni]\nconf_dir = {:?}\n", self.cni_conf_dir())
        };
        // Each agent of a test run streams on a free port of its own.
        let streaming = if self.options.config.contains("[streaming]") {
            ""
        } else {
            "[streaming]\naddress = \"127.0.0.1:0\"\n"
        };
        let config = format!(
            "runtime_classes_dir = {:?}\nshim_dir = {:?}\nlog_level = \"debug\"\n{}\n{cni}{streaming}",
            classes,
            bin_dir(),
            self.options.config
        );
        std::fs::write(self.config_path(), config)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("isolad.log"))?;
        let child = Command::new(binary("isolad"))
            .arg("--config")
            .arg(self.config_path())
            .arg("--root")
            .arg(self.root())
            .arg("--state")
            .arg(self.state())
            .arg("--socket")
            .arg(self.socket())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning isolad")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!(
                        "isolad exited with {status} during start-up:\n{}",
                        self.log()
                    );
                }
            }
            if let Ok(ch) = uds_channel(&self.socket()).await {
                let mut rt = RuntimeServiceClient::new(ch);
                if rt.version(cri::VersionRequest::default()).await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("isolad did not answer Version within 20s:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A runtime client over the socket.
    pub async fn runtime(&self) -> Runtime {
        RuntimeServiceClient::new(uds_channel(&self.socket()).await.expect("connect"))
    }

    /// An image client over the socket.
    pub async fn images(&self) -> Images {
        ImageServiceClient::new(uds_channel(&self.socket()).await.expect("connect"))
    }

    /// Sends a signal to isolad and waits for it to exit; returns its exit code.
    pub fn signal_and_wait(&mut self, sig: nix::sys::signal::Signal) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
        let status = child.wait().ok()?;
        status.code()
    }

    /// kill -9 isolad, as a crash would.
    pub fn kill9(&mut self) {
        self.signal_and_wait(nix::sys::signal::Signal::SIGKILL);
    }

    /// Starts isolad again over the same directories.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart needs a stopped agent");
        self.launch().await.expect("isolad restarts");
    }

    /// Pids of live processes whose command line mentions this agent's directory (its
    /// shims, or anything they left behind).
    pub fn processes(&self) -> Vec<u32> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let own = self.child.as_ref().map(|c| c.id());
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if Some(pid) == own {
                continue;
            }
            if proc_state(pid) == Some('Z') {
                continue;
            }
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmd).contains(&needle) {
                out.push(pid);
            }
        }
        out
    }

    /// Asserts nothing of a removed pod is left: no shim processes, no pod state dirs,
    /// no mounts under the agent's directories.
    pub fn assert_no_leaks(&self) {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|p| p.starts_with(&needle))
            .collect();
        assert!(mounts.is_empty(), "leaked mounts: {mounts:?}");
        let procs = self.processes();
        assert!(procs.is_empty(), "leaked processes: {procs:?}");
        let pods = self.state().join("pods");
        let left: Vec<_> = std::fs::read_dir(&pods)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "leaked pod state: {left:?}");
        let sockets: Vec<_> = std::fs::read_dir(self.state().join("s"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(sockets.is_empty(), "leaked shim sockets: {sockets:?}");
    }
}

/// The state letter of a process (R, S, Z, ...).
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.chars().next()
}

/// Whether a process lives (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The evidence of a failed test: the agent's log and every shim's.
            eprintln!("---- isolad log ----\n{}", self.log());
            if let Ok(d) = std::fs::read_dir(self.state().join("pods")) {
                for e in d.flatten() {
                    let log =
                        std::fs::read_to_string(e.path().join("shim.log")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(60).collect();
                    eprintln!(
                        "---- shim log {} ----\n{}",
                        e.file_name().to_string_lossy(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Never leave anything of a failed test behind: shims, the pods' infra and
        // container processes (found by pod id and cgroup), mounts, cgroups.
        for pid in self.processes() {
            kill9(pid);
        }
        let pods: Vec<String> = std::fs::read_dir(self.state().join("pods"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for pod in &pods {
            for pid in pids_matching(&format!("pause --id {pod}")) {
                kill9(pid);
            }
            for _ in 0..3 {
                for h in ["memory", "pids", ""] {
                    let dir = std::path::Path::new("/sys/fs/cgroup")
                        .join(h)
                        .join("isola")
                        .join(pod);
                    for pid in cgroup_procs_recursive(&dir) {
                        kill9(pid);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let needle = self.dir.path().to_string_lossy().into_owned();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|p| p.starts_with(&needle))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        for pod in &pods {
            if let Ok(hs) = std::fs::read_dir("/sys/fs/cgroup") {
                for h in hs.flatten() {
                    remove_cgroup_tree(&h.path().join("isola").join(pod));
                }
            }
            remove_cgroup_tree(&std::path::Path::new("/sys/fs/cgroup/isola").join(pod));
        }
    }
}

fn kill9(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Pids whose command line contains `needle`.
pub fn pids_matching(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                if String::from_utf8_lossy(&cmd)
                    .replace('\0', " ")
                    .contains(needle)
                {
                    out.push(pid);
                }
            }
        }
    }
    out
}

fn cgroup_procs_recursive(dir: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(cgroup_procs_recursive(&e.path()));
            }
        }
    }
    out
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// A pod config with fresh identity.
pub fn pod_config(name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            namespace: "default".into(),
            uid: format!("uid-{name}-{}", std::process::id()),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: String::new(),
        labels: [("app".to_string(), name.to_string())].into(),
        annotations: [("isola.test/annotation".to_string(), "yes".to_string())].into(),
        ..Default::default()
    }
}

/// Runs a pod with the given handler; returns its id.
pub async fn run_pod(
    rt: &mut Runtime,
    config: cri::PodSandboxConfig,
    handler: &str,
) -> Result<String, tonic::Status> {
    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: handler.into(),
    })
    .await
    .map(|r| r.into_inner().pod_sandbox_id)
}

/// The pod's status.
pub async fn pod_status(
    rt: &mut Runtime,
    id: &str,
    verbose: bool,
) -> Result<cri::PodSandboxStatusResponse, tonic::Status> {
    rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose,
    })
    .await
    .map(|r| r.into_inner())
}

/// The shim pid of a pod, from its verbose status.
pub async fn shim_pid(rt: &mut Runtime, id: &str) -> Option<u32> {
    let st = pod_status(rt, id, true).await.ok()?;
    let info: serde_json::Value = serde_json::from_str(st.info.get("info")?).ok()?;
    info["shim"]["pid"].as_u64().map(|p| p as u32)
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs each async test body `async fn name(handler: &str)` once per runtime handler, as
/// the tests `name::native` (the default handler, "") and `name::vm` (a microVM per pod):
/// the same assertions for both kinds of pod.
#[macro_export]
macro_rules! for_each_handler {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn native() {
                super::$name("").await
            }
            #[tokio::test]
            async fn vm() {
                super::$name("vm").await
            }
        }
    )+};
}
