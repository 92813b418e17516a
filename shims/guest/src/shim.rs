//! The shim API inside the guest: after a `ServeShimRequest` the agent port carries
//! HTTP/2 (gRPC, `proto/shim.proto`) and the native shim's service runs the pod's
//! containers here, with the same code as on the host (namespaces, cgroups, libcontainer).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use isola_proto::guest::ServeShimRequest;
use isola_proto::shim::shim_server::ShimServer;
use isola_shim_native::service::NativeShim;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// Where the guest shim keeps its pod state (bundles, console sockets, pod files).
pub const STATE_DIR: &str = "/run/isola/pod";

/// The agent port as one async byte stream, on tokio's reactor.
///
/// Not tokio's pipe types: they take a short read as "drained" and wait for the next
/// edge, but a virtio-console read returns one queued buffer at a time, so data already
/// queued behind it would never wake the reader. Here readiness is cleared only on
/// EAGAIN.
struct PortIo {
    fd: AsyncFd<File>,
}

impl AsyncRead for PortIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|f| f.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PortIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|f| f.get_ref().write(buf)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl tonic::transport::server::Connected for PortIo {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

fn set_nonblocking(f: &File) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn init_logging(req: &ServeShimRequest) {
    let filter = EnvFilter::try_new(if req.log_filter.is_empty() {
        "info"
    } else {
        req.log_filter.as_str()
    })
    .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let file = (!req.log_path.is_empty())
        .then(|| {
            let path = std::path::Path::new(&req.log_path);
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
        })
        .flatten();
    let _ = match file {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(io::stderr).try_init(),
    };
}

/// How often the guest shim drops the unmapped page cache of its own binary.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Keeps the guest's copy of this binary down to the pages processes have mapped.
///
/// Executed from the virtio-fs share ([`crate::handoff`]), the binary is read into the
/// guest's page cache with the kernel's read-around (128 KiB around every fault), so the
/// first container start pulls in all ~8 MiB of it, of which processes map ~3.5: the
/// rest is guest memory the host backs for nothing (the host's page cache has the file
/// anyway, and a later read comes from there). POSIX_FADV_DONTNEED drops clean pages no
/// process maps; free page reporting then gives them back to the host. Measured: the
/// guest's file pages 7.5 → 4.5 MiB (docs/benchmarks.md). A no-op for an /init in the
/// initramfs (tmpfs pages are not dropped). Reading it all ahead at the start instead
/// of page by page was tried: slower under TCG.
async fn trim_own_page_cache() {
    let exe = match File::open("/proc/self/exe") {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "opening /proc/self/exe: its page cache is not trimmed");
            return;
        }
    };
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // SAFETY: an advice on an fd we own; no memory is passed.
        let r = unsafe { libc::posix_fadvise(exe.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if r != 0 {
            tracing::warn!(errno = r, "posix_fadvise(DONTNEED) on our own binary");
            return;
        }
    }
}

/// Serves the shim API on `port` until the host's Shutdown call (or the host closing the
/// channel); the caller powers the guest off after.
pub fn serve(port: File, req: &ServeShimRequest) -> io::Result<()> {
    init_logging(req);
    isola_shim_native::forker::become_subreaper();
    std::fs::create_dir_all(STATE_DIR)?;
    if !req.log_path.is_empty() {
        // libcontainer's own log (the detail behind its "failed syscall" errors) goes
        // next to ours, where the host can read it.
        let _ = std::os::unix::fs::symlink(&req.log_path, format!("{STATE_DIR}/shim.log"));
    }
    set_nonblocking(&port)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("guest-shim")
        .build()?;
    let id = req.sandbox_id.clone();
    let result = rt.block_on(async move {
        // SAFETY: the File owns its fd, which stays open and the same for as long as the
        // AsyncFd owns the File.
        let fd = unsafe { AsyncFd::register(port) }.map_err(|e| io::Error::other(e.to_string()))?;
        let io = PortIo { fd };
        let (tx, mut rx) = watch::channel(false);
        let shim = NativeShim::new(id.clone(), STATE_DIR.into(), tx);
        tracing::info!(pod = %id, "guest shim serving on the agent port");
        tokio::spawn(trim_own_page_cache());
        // One connection, and then none: an incoming stream that ended would make the
        // server shut down (and close that connection) at once.
        let incoming = tokio_stream::StreamExt::chain(
            tokio_stream::once(Ok::<_, io::Error>(io)),
            tokio_stream::pending(),
        );
        let serve = tonic::transport::Server::builder()
            .add_service(ShimServer::new(shim))
            .serve_with_incoming(incoming);
        // A graceful shutdown would wait for the host to close its connection, which it
        // keeps until the VM is gone: after the Shutdown answer has gone out, just stop
        // serving (the caller powers off).
        tokio::select! {
            r = serve => r.map_err(io::Error::other),
            _ = async {
                let _ = rx.wait_for(|s| *s).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            } => Ok(()),
        }
    });
    tracing::info!(?result, "guest shim done");
    rt.shutdown_timeout(Duration::from_millis(100));
    result
}
