//! `isola-shim-native`: parses flags, daemonises, serves the shim API for one pod.

use std::path::PathBuf;

use clap::Parser;
use isola_shim_native::{daemon, service::NativeShim};

/// The shim of one native pod. Started by isolad, not by hand.
#[derive(Parser, Debug)]
#[command(name = "isola-shim-native", version)]
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
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("pause") {
        isola_shim_native::pause::main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some("libct") {
        isola_shim_native::forker::helper_main(&args[2..]);
    }
    let cli = Cli::parse();
    let d = daemon::daemonize(&cli.socket)?;
    // Container processes are re-parented to the shim when the libcontainer helper that
    // started them exits (see forker).
    isola_shim_native::forker::become_subreaper();
    daemon::serve(
        d,
        daemon::ShimArgs {
            id: &cli.id,
            socket: &cli.socket,
            log_file: &cli.log_file,
            log_format: &cli.log_format,
            thread_name: "shim",
        },
        |tx| Ok(NativeShim::new(cli.id.clone(), cli.state_dir.clone(), tx)),
    )
}
