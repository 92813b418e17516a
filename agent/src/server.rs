//! Serving the CRI on the unix socket: start-up, readiness, graceful shutdown.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use isola_proto::cri::image_service_server::ImageServiceServer;
use isola_proto::cri::runtime_service_server::RuntimeServiceServer;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

use crate::classes::RuntimeClasses;
use crate::config::Config;
use crate::cri::image::ImageServer;
use crate::cri::RuntimeServer;
use crate::records::Records;
use crate::runtime::Runtime;

/// Largest CRI message accepted or sent (kubelet's own limit is 16 MiB).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

fn prepare_dirs(config: &Config) -> anyhow::Result<()> {
    for (dir, mode) in [(&config.root, 0o711), (&config.state, 0o711)] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", dir.display()))?;
    }
    let pods = config.state.join("pods");
    std::fs::create_dir_all(&pods).with_context(|| format!("creating {}", pods.display()))?;
    let sockets = config.state.join("s");
    std::fs::create_dir_all(&sockets).with_context(|| format!("creating {}", sockets.display()))?;
    std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", sockets.display()))?;
    Ok(())
}

/// Binds the CRI socket, replacing a stale one but never one that a live agent serves.
async fn bind_socket(config: &Config) -> anyhow::Result<UnixListener> {
    let path = &config.socket;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "{} is served by another process (is isolad already running?)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting mode 0660 on {}", path.display()))?;
    if !config.socket_group.is_empty() {
        let group = nix::unistd::Group::from_name(&config.socket_group)
            .with_context(|| format!("looking up group {}", config.socket_group))?
            .with_context(|| format!("socket_group {} does not exist", config.socket_group))?;
        nix::unistd::chown(path, None, Some(group.gid))
            .with_context(|| format!("chown {} to {}", path.display(), config.socket_group))?;
    }
    Ok(listener)
}

fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(socket = %path.display(), error = %e, "removing the socket");
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    prepare_dirs(&config)?;
    let records = Records::open(&config.db_path())
        .with_context(|| format!("opening records {}", config.db_path().display()))?;
    let classes =
        RuntimeClasses::load(&config.runtime_classes_dir, &config.default_runtime_handler)
            .context("loading runtime classes")?;
    let images_root = config.images_root();
    let registry = config.registry.clone();
    let images = tokio::task::spawn_blocking(move || {
        isola_images::ImageStore::open(&images_root, registry)
            .with_context(|| format!("opening the image store {}", images_root.display()))
    })
    .await
    .context("opening the image store")??;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let rt = Runtime::new(
        config.clone(),
        classes,
        records,
        images,
        shutdown_rx.clone(),
    );
    rt.recover().await;

    let listener = bind_socket(&config).await?;
    let streaming = crate::streaming::server::bind(&rt).await?;
    tokio::spawn(crate::streaming::server::serve(
        streaming,
        rt.clone(),
        shutdown_rx.clone(),
    ));
    info!(
        socket = %config.socket.display(),
        root = %config.root.display(),
        state = %config.state.display(),
        handlers = ?rt.classes.handlers().collect::<Vec<_>>(),
        version = env!("CARGO_PKG_VERSION"),
        "isolad serving the CRI"
    );
    if config.cgroup_driver == crate::config::CgroupDriver::Systemd
        && !isola_container::systemd::available()
    {
        warn!(
            "cgroup_driver is systemd but systemd does not manage the unified cgroup hierarchy here: native pods' scopes are made as plain cgroups at systemd's paths, not as systemd units"
        );
    }

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
            _ = sigint.recv() => info!("SIGINT: shutting down"),
        }
        shutdown_tx.send_replace(true);
    });

    let runtime_svc = RuntimeServiceServer::new(RuntimeServer::new(rt.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let image_svc = ImageServiceServer::new(ImageServer::new(rt.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut stop = shutdown_rx.clone();
    let serve = tonic::transport::Server::builder()
        .add_service(runtime_svc)
        .add_service(image_svc)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            let _ = stop.wait_for(|s| *s).await;
        });

    // Readiness for systemd (Type=notify); a no-op without NOTIFY_SOCKET.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    let mut stopped = shutdown_rx.clone();
    let result = tokio::select! {
        r = serve => r.context("serving the CRI"),
        _ = async {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            warn!(grace_seconds = grace.as_secs(), "in-flight calls did not finish in time");
            Ok(())
        }
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    remove_socket(&config.socket);
    info!("isolad stopped");
    result
}
