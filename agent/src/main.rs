//! `isolad`: parses flags, sets up logging, runs the agent.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use isola_agent::config::{Config, LogFormat, DEFAULT_CONFIG_TOML};
use tracing_subscriber::EnvFilter;

/// isola: a Kubernetes node runtime serving the CRI, running each pod natively or in a
/// microVM as its RuntimeClass asks.
#[derive(Parser, Debug)]
#[command(name = "isolad", version, about)]
struct Cli {
    /// Configuration file (TOML); without it the embedded defaults apply.
    #[arg(long, env = "ISOLAD_CONFIG")]
    config: Option<PathBuf>,
    /// Persistent data directory [default: /var/lib/isola].
    #[arg(long)]
    root: Option<PathBuf>,
    /// Runtime state directory [default: /run/isola].
    #[arg(long)]
    state: Option<PathBuf>,
    /// CRI socket path [default: /run/isola/isola.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        what: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the complete default configuration, every key commented.
    Default,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Config {
        what: ConfigCommand::Default,
    }) = cli.command
    {
        print!("{DEFAULT_CONFIG_TOML}");
        return Ok(());
    }
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(root) = cli.root {
        config.root = root;
    }
    if let Some(state) = cli.state {
        config.state = state;
    }
    if let Some(socket) = cli.socket {
        config.socket = socket;
    }
    if let Some(format) = cli.log_format {
        config.log_format = format;
    }
    config.validate()?;

    let filter = EnvFilter::try_from_env("ISOLAD_LOG")
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .context("log_level")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("isolad")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(isola_agent::server::run(config))
}
