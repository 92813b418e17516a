//! `isola-shim-vm`: parses flags, daemonises, serves the shim API for one VM pod.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use isola_proto::shim::shim_server::ShimServer;
use isola_shim_native::daemon;
use isola_vm::pod::VmShim;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// The shim of one VM pod. Started by isolad, not by hand.
#[derive(Parser, Debug)]
#[command(name = "isola-shim-vm", version)]
struct Cli {
    /// The pod sandbox id.
    #[arg(long)]
    id: String,
    /// Unix socket to serve the shim API on.
    #[arg(long)]
    socket: PathBuf,
    /// The pod's runtime state directory.
    #[arg(long)]
    state_dir: PathBuf,
    /// Log file (the shim's stderr is detached from the agent).
    #[arg(long)]
    log_file: PathBuf,
    /// text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut d = daemon::daemonize(&cli.socket)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cli.log_file)
        .with_context(|| format!("opening {}", cli.log_file.display()))?;
    let filter =
        EnvFilter::try_from_env("ISOLA_SHIM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(log));
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("shim-vm")
        .build()
        .context("starting the async runtime")?;
    let socket = cli.socket.clone();
    let result = rt.block_on(async move {
        d.listener
            .set_nonblocking(true)
            .context("socket non-blocking")?;
        let listener = tokio::net::UnixListener::from_std(d.listener.try_clone()?)
            .context("adopting the socket")?;
        let (tx, mut rx) = watch::channel(false);
        let mut stopped = rx.clone();
        let shim = VmShim::new(cli.id.clone(), cli.state_dir.clone(), tx)
            .context("starting the VM thread")?;
        d.ready()?;
        tracing::info!(pod = %cli.id, pid = std::process::id(), "vm shim serving");
        let serve = tonic::transport::Server::builder()
            .add_service(ShimServer::new(shim))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                },
            );
        tokio::select! {
            r = serve => r.context("serving"),
            _ = async {
                let _ = stopped.wait_for(|s| *s).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            } => Ok(()),
        }
    });
    let _ = std::fs::remove_file(&socket);
    tracing::info!("shim exiting");
    rt.shutdown_timeout(Duration::from_millis(100));
    result
}
