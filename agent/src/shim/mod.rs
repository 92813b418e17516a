//! The agent's side of the shim API: starting a shim process per pod, connecting to it
//! over its unix socket, telling whether it still lives and noticing when it dies.

mod process;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use isola_proto::shim::shim_client::ShimClient;
use isola_proto::shim::HelloRequest;
use isola_proto::SHIM_API_VERSION;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;
use tracing::{debug, info};

pub use process::{kill, proc_start_time, record_alive, wait_exit};

use crate::classes::ShimKind;
use crate::config::LogFormat;
use crate::records::ShimRecord;

/// A connected shim client.
pub type Client = ShimClient<Channel>;

/// Longest unix socket path the kernel accepts (sun_path less the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Errors starting or talking to a shim.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The shim binary is not installed.
    #[error("shim binary {binary} not found (searched {searched})")]
    BinaryNotFound {
        /// The binary's name.
        binary: &'static str,
        /// Where it was looked for.
        searched: String,
    },
    /// The socket path would be too long for a unix socket.
    #[error("shim socket path {0} is longer than {MAX_SOCKET_PATH} bytes: use a shorter --state")]
    SocketPathTooLong(PathBuf),
    /// The binary could not be run.
    #[error("starting {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The shim started but did not come up.
    #[error("shim {binary} failed to start: {detail}")]
    StartFailed {
        /// The binary.
        binary: PathBuf,
        /// What it said.
        detail: String,
    },
    /// Connecting to the shim's socket failed.
    #[error("connecting to shim at {socket}: {reason}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        reason: String,
    },
    /// The shim speaks another version of the API.
    #[error("shim at {socket} speaks shim API v{got}, the agent v{SHIM_API_VERSION}")]
    Version {
        /// The socket.
        socket: PathBuf,
        /// The shim's version.
        got: u32,
    },
    /// A call answered an error.
    #[error("shim {method}: {message}")]
    Call {
        /// The shim method.
        method: &'static str,
        /// The gRPC code the shim answered.
        code: Code,
        /// Its message.
        message: String,
    },
    /// The shim process is gone.
    #[error("the pod's shim (pid {pid}) is gone")]
    Gone {
        /// Its pid.
        pid: u32,
    },
}

impl ShimError {
    /// Wraps a status answered by the shim.
    pub fn call(method: &'static str, status: tonic::Status) -> ShimError {
        ShimError::Call {
            method,
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// A shim the agent started or reconnected to.
pub struct Shim {
    /// Its client.
    pub client: Client,
    /// Its identity.
    pub record: ShimRecord,
    /// What it reported at connect time.
    pub hello: isola_proto::shim::HelloResponse,
}

/// Starts shim processes.
#[derive(Debug, Clone)]
pub struct ShimManager {
    shim_dir: PathBuf,
    start_timeout: Duration,
    log_format: LogFormat,
}

impl ShimManager {
    /// A manager looking for shim binaries in `shim_dir` (empty: next to this executable,
    /// then `$PATH`).
    pub fn new(shim_dir: &Path, start_timeout: Duration, log_format: LogFormat) -> ShimManager {
        ShimManager {
            shim_dir: shim_dir.to_owned(),
            start_timeout,
            log_format,
        }
    }

    /// The path of a shim kind's binary.
    pub fn find_binary(&self, kind: ShimKind) -> Result<PathBuf, ShimError> {
        let name = kind.binary();
        let mut dirs: Vec<PathBuf> = Vec::new();
        if !self.shim_dir.as_os_str().is_empty() {
            dirs.push(self.shim_dir.clone());
        } else {
            if let Some(dir) = std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_owned))
            {
                dirs.push(dir);
            }
            if let Some(path) = std::env::var_os("PATH") {
                dirs.extend(std::env::split_paths(&path));
            }
        }
        for d in &dirs {
            let candidate = d.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        Err(ShimError::BinaryNotFound {
            binary: name,
            searched: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        })
    }

    /// Starts the shim for one pod and connects to it. The shim daemonises: it keeps
    /// running when the agent exits, and the agent reconnects to it from its record.
    pub async fn spawn(
        &self,
        kind: ShimKind,
        sandbox_id: &str,
        state_dir: &Path,
        socket: &Path,
    ) -> Result<Shim, ShimError> {
        let binary = self.find_binary(kind)?;
        let socket = socket.to_owned();
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ShimError::SocketPathTooLong(socket));
        }
        let log = state_dir.join("shim.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|source| ShimError::Spawn {
                binary: binary.clone(),
                source,
            })?;
        let format = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let mut cmd = tokio::process::Command::new(&binary);
        cmd.arg("--id")
            .arg(sandbox_id)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--log-file")
            .arg(&log)
            .arg("--log-format")
            .arg(format)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|source| ShimError::Spawn {
            binary: binary.clone(),
            source,
        })?;
        // The launcher process forks the real shim, waits until it listens, prints its
        // pid and exits.
        let out = tokio::time::timeout(self.start_timeout, child.wait_with_output())
            .await
            .map_err(|_| ShimError::StartFailed {
                binary: binary.clone(),
                detail: format!(
                    "not listening after {}s; log {}",
                    self.start_timeout.as_secs(),
                    log.display()
                ),
            })?
            .map_err(|source| ShimError::Spawn {
                binary: binary.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(ShimError::StartFailed {
                binary,
                detail: format!("{}: {}", out.status, log_tail(&log)),
            });
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let pid: u32 = text.trim().parse().map_err(|_| ShimError::StartFailed {
            binary: binary.clone(),
            detail: format!("launcher printed {text:?}, not a pid"),
        })?;
        let start_time = proc_start_time(pid).ok_or(ShimError::StartFailed {
            binary: binary.clone(),
            detail: format!(
                "shim pid {pid} vanished right after start: {}",
                log_tail(&log)
            ),
        })?;
        let record = ShimRecord {
            socket,
            pid,
            start_time,
        };
        info!(pid, binary = %binary.display(), "shim started");
        match connect(&record).await {
            Ok(shim) => Ok(shim),
            Err(e) => {
                kill(&record, nix::sys::signal::Signal::SIGKILL);
                Err(e)
            }
        }
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Connects to a shim and checks it is the process the record names.
pub async fn connect(record: &ShimRecord) -> Result<Shim, ShimError> {
    if !record_alive(record) {
        return Err(ShimError::Gone { pid: record.pid });
    }
    let path = record.socket.clone();
    let channel = Endpoint::from_static("http://isola-shim")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| ShimError::Connect {
            socket: record.socket.clone(),
            reason: format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            ),
        })?;
    let mut client = ShimClient::new(channel);
    let hello = tokio::time::timeout(
        Duration::from_secs(10),
        client.hello(HelloRequest {
            api_version: SHIM_API_VERSION,
        }),
    )
    .await
    .map_err(|_| ShimError::Connect {
        socket: record.socket.clone(),
        reason: "no answer to Hello within 10s".into(),
    })?
    .map_err(|s| ShimError::call("Hello", s))?
    .into_inner();
    if hello.api_version != SHIM_API_VERSION {
        return Err(ShimError::Version {
            socket: record.socket.clone(),
            got: hello.api_version,
        });
    }
    if hello.shim_pid != record.pid {
        return Err(ShimError::Connect {
            socket: record.socket.clone(),
            reason: format!(
                "socket served by pid {}, the record names pid {}",
                hello.shim_pid, record.pid
            ),
        });
    }
    debug!(pid = record.pid, "connected to shim");
    Ok(Shim {
        client,
        record: record.clone(),
        hello,
    })
}
