//! Becoming a daemon that outlives the agent: the launcher forks the shim, the shim
//! starts its own session, binds its socket and only then tells the launcher, which
//! prints the shim's pid for the agent and exits.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

use anyhow::{bail, Context};
use nix::unistd::{fork, setsid, ForkResult};

/// What the forked shim gets: its bound socket and the pipe to report readiness on.
pub struct Daemon {
    /// The listening socket.
    pub listener: UnixListener,
    ready: Option<std::fs::File>,
}

impl Daemon {
    /// Tells the launcher the shim is ready; it then exits.
    pub fn ready(&mut self) -> anyhow::Result<()> {
        if let Some(mut f) = self.ready.take() {
            f.write_all(b"ok").context("reporting readiness")?;
        }
        Ok(())
    }
}

/// Forks. Returns in the child (the shim) only; the parent waits for readiness, prints
/// the child's pid and exits the process. Must run before any thread is started.
pub fn daemonize(socket: &Path) -> anyhow::Result<Daemon> {
    let (read_end, write_end): (OwnedFd, OwnedFd) = nix::unistd::pipe().context("pipe")?;
    // SAFETY: called from main before the async runtime or any other thread exists, so
    // the child is a faithful copy of a single-threaded process.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut buf = Vec::new();
            let mut f = std::fs::File::from(read_end);
            let _ = f.read_to_end(&mut buf);
            if buf == b"ok" {
                println!("{child}");
                std::process::exit(0);
            }
            eprintln!("isola-shim-native: the shim (pid {child}) failed before it was ready");
            std::process::exit(1);
        }
        ForkResult::Child => {
            drop(read_end);
            setsid().context("setsid")?;
            // The shim never reads stdin, and stdout is the launcher's pipe to the agent:
            // both go to /dev/null so the agent sees EOF once the launcher exits.
            let devnull = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .context("opening /dev/null")?;
            for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
                // SAFETY: dup2 on valid descriptors; no memory is involved.
                if unsafe { libc::dup2(devnull.as_raw_fd(), fd) } < 0 {
                    bail!("dup2: {}", std::io::Error::last_os_error());
                }
            }
            if socket.exists() {
                std::fs::remove_file(socket)
                    .with_context(|| format!("removing stale {}", socket.display()))?;
            }
            let listener = UnixListener::bind(socket)
                .with_context(|| format!("binding {}", socket.display()))?;
            Ok(Daemon {
                listener,
                ready: Some(std::fs::File::from(write_end)),
            })
        }
    }
}

/// How a shim binary was started (the flags both shims take from the agent).
pub struct ShimArgs<'a> {
    /// The pod sandbox id.
    pub id: &'a str,
    /// The socket the daemon listens on (removed on exit).
    pub socket: &'a Path,
    /// The shim's log file.
    pub log_file: &'a Path,
    /// "text" or "json".
    pub log_format: &'a str,
    /// Names the runtime's threads.
    pub thread_name: &'static str,
}

/// Logs to the shim's file, runs the shim API built by `make` on the daemon's socket
/// until the service sets its shutdown flag, and removes the socket. Shared by
/// `isola-shim-native` and `isola-shim-vm`.
pub fn serve<S, F>(mut d: Daemon, args: ShimArgs<'_>, make: F) -> anyhow::Result<()>
where
    S: isola_proto::shim::shim_server::Shim,
    F: FnOnce(tokio::sync::watch::Sender<bool>) -> anyhow::Result<S>,
{
    use std::time::Duration;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.log_file)
        .with_context(|| format!("opening {}", args.log_file.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("ISOLA_SHIM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(log));
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name(args.thread_name)
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(async move {
        d.listener
            .set_nonblocking(true)
            .context("socket non-blocking")?;
        let listener = tokio::net::UnixListener::from_std(d.listener.try_clone()?)
            .context("adopting the socket")?;
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let mut stopped = rx.clone();
        let shim = make(tx)?;
        d.ready()?;
        tracing::info!(pod = %args.id, pid = std::process::id(), "shim serving");
        let serve = tonic::transport::Server::builder()
            .add_service(isola_proto::shim::shim_server::ShimServer::new(shim))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                    // Let the Shutdown answer reach the agent before connections close.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                },
            );
        tokio::select! {
            r = serve => r.context("serving"),
            // Open streams (events) must not keep a shim that was told to go alive.
            _ = async {
                let _ = stopped.wait_for(|s| *s).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            } => Ok(()),
        }
    });
    let _ = std::fs::remove_file(args.socket);
    tracing::info!("shim exiting");
    // Exit directly: lingering runtime tasks (open streams) must not keep us alive.
    rt.shutdown_timeout(Duration::from_millis(100));
    result
}
