//! `isola-shim-vm`: parses flags, daemonises, serves the shim API for one VM pod.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use isola_shim_native::daemon;
use isola_vm::pod::VmShim;

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
    let d = daemon::daemonize(&cli.socket)?;
    daemon::serve(
        d,
        daemon::ShimArgs {
            id: &cli.id,
            socket: &cli.socket,
            log_file: &cli.log_file,
            log_format: &cli.log_format,
            thread_name: "shim-vm",
        },
        |tx| {
            VmShim::new(cli.id.clone(), cli.state_dir.clone(), tx).context("starting the VM thread")
        },
    )
}
