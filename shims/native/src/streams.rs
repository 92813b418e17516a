//! The streaming calls of the shim API: Exec (a new process in a container, its stdio
//! or terminal carried on the call), Attach (the container's own stdio) and PortForward (a TCP connection made inside the pod's network
//! namespace).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use isola_proto::shim as sp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::debug;

use crate::containers::Containers;

/// How long output may still drain after the process exited (its children may hold the
/// pipes open).
const DRAIN_GRACE: Duration = Duration::from_secs(1);

type Out = mpsc::Sender<Result<sp::StreamOutput, Status>>;

fn out(kind: sp::stream_output::Kind) -> Result<sp::StreamOutput, Status> {
    Ok(sp::StreamOutput { kind: Some(kind) })
}

async fn pump(fd: OwnedFd, tx: Out, stderr: bool) {
    let Ok(mut r) = pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let b = buf[..n].to_vec();
                let k = if stderr {
                    sp::stream_output::Kind::Stderr(b)
                } else {
                    sp::stream_output::Kind::Stdout(b)
                };
                if tx.send(out(k)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Runs an exec: `start` from the first message, the rest of `input` as stdin. Sends
/// output to `tx`, ending with the exit status.
pub async fn exec(
    containers: Arc<Containers>,
    start: sp::StreamStart,
    mut input: tonic::Streaming<sp::StreamInput>,
    tx: Out,
) {
    if start.tty {
        return exec_tty(containers, start, input, tx).await;
    }
    let id = start.container_id.clone();
    let c2 = containers.clone();
    let Some(p) = spawn_reporting(&tx, move || {
        c2.spawn_exec(&start.container_id, start.cmd, start.stdin)
    })
    .await
    else {
        return;
    };
    let pid = p.pid;
    let stdin = p.stdin.and_then(|fd| pipe::Sender::from_owned_fd(fd).ok());
    tokio::spawn(async move {
        let mut stdin = stdin;
        while let Ok(Some(m)) = input.message().await {
            match m.kind {
                Some(sp::stream_input::Kind::Stdin(b)) => {
                    if let Some(w) = stdin.as_mut() {
                        if w.write_all(&b).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Some(sp::stream_input::Kind::StdinClose(_)) => stdin = None,
                _ => {}
            }
        }
    });
    let o = tokio::spawn(pump(p.stdout, tx.clone(), false));
    let e = tokio::spawn(pump(p.stderr, tx.clone(), true));
    let exit = wait_exit(pid).await;
    let _ = tokio::time::timeout(DRAIN_GRACE, async {
        let _ = o.await;
        let _ = e.await;
    })
    .await;
    debug!(container = %id, pid, code = exit.code, "exec ended");
    let status = sp::ContainerStatus {
        container_id: id,
        state: sp::ContainerState::Exited as i32,
        pid: pid as u32,
        exit_code: exit.code,
        ..Default::default()
    };
    let _ = tx.send(out(sp::stream_output::Kind::Exit(status))).await;
}

/// Connects to 127.0.0.1:`port` inside the network namespace of `infra_pid`.
fn connect_in_netns(infra_pid: i32, port: u16) -> std::io::Result<std::net::TcpStream> {
    let ns = std::fs::File::open(format!("/proc/{infra_pid}/ns/net"))?;
    // A thread of its own: setns moves only the calling thread, and this one ends here.
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        let s = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(10),
        )?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .join()
    .map_err(|_| std::io::Error::other("the connecting thread panicked"))?
}

/// Serves one port-forward call: the first message names the port.
pub async fn port_forward(
    infra_pid: i32,
    mut input: tonic::Streaming<sp::PortForwardInput>,
    tx: mpsc::Sender<Result<sp::PortForwardOutput, Status>>,
) {
    let data = |k| Ok(sp::PortForwardOutput { kind: Some(k) });
    let port = match input.message().await {
        Ok(Some(sp::PortForwardInput {
            kind: Some(sp::port_forward_input::Kind::Start(s)),
        })) if s.port > 0 && s.port <= 65535 => s.port as u16,
        _ => {
            let _ = tx
                .send(Err(Status::invalid_argument(
                    "the first message must be start with a TCP port",
                )))
                .await;
            return;
        }
    };
    let conn = tokio::task::spawn_blocking(move || connect_in_netns(infra_pid, port)).await;
    let stream = match conn {
        Ok(Ok(s)) => tokio::net::TcpStream::from_std(s),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    };
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("connecting to 127.0.0.1:{port} in the pod: {e}");
            let _ = tx
                .send(data(sp::port_forward_output::Kind::Error(msg)))
                .await;
            return;
        }
    };
    let (mut rd, mut wr) = stream.into_split();
    tokio::spawn(async move {
        while let Ok(Some(m)) = input.message().await {
            match m.kind {
                Some(sp::port_forward_input::Kind::Data(b)) if wr.write_all(&b).await.is_err() => {
                    return;
                }
                Some(sp::port_forward_input::Kind::CloseWrite(_)) => {
                    let _ = wr.shutdown().await;
                }
                _ => {}
            }
        }
    });
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if tx
                    .send(data(sp::port_forward_output::Kind::Data(buf[..n].to_vec())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let _ = tx
                    .send(data(sp::port_forward_output::Kind::Error(format!(
                        "reading from port {port}: {e}"
                    ))))
                    .await;
                return;
            }
        }
    }
}

/// Runs an exec with a terminal: output is the terminal's, stdin goes to it, resizes
/// set its size.
async fn exec_tty(
    containers: Arc<Containers>,
    start: sp::StreamStart,
    input: tonic::Streaming<sp::StreamInput>,
    tx: Out,
) {
    let id = start.container_id.clone();
    let Some((pid, master)) = spawn_reporting(&tx, move || {
        containers.spawn_exec_tty(&start.container_id, start.cmd)
    })
    .await
    else {
        return;
    };
    let master = Arc::new(std::fs::File::from(master));
    let reader = read_terminal(master.clone(), tx.clone());
    tokio::spawn(feed_terminal(master, input));
    let exit = wait_exit(pid).await;
    let _ = tokio::time::timeout(DRAIN_GRACE, reader).await;
    debug!(container = %id, pid, code = exit.code, "tty exec ended");
    let status = sp::ContainerStatus {
        container_id: id,
        state: sp::ContainerState::Exited as i32,
        pid: pid as u32,
        exit_code: exit.code,
        ..Default::default()
    };
    let _ = tx.send(out(sp::stream_output::Kind::Exit(status))).await;
}

/// Reads a terminal's output (on a thread: a pty master reads block) until it ends.
fn read_terminal(master: Arc<std::fs::File>, tx: Out) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // EIO once every slave side is closed: the process and its children are gone.
            match (&*master).read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx
                        .blocking_send(out(sp::stream_output::Kind::Stdout(buf[..n].to_vec())))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    })
}

/// Writes stdin to a terminal and applies resizes.
async fn feed_terminal(master: Arc<std::fs::File>, mut input: tonic::Streaming<sp::StreamInput>) {
    while let Ok(Some(m)) = input.message().await {
        match m.kind {
            Some(sp::stream_input::Kind::Stdin(b)) => {
                let m = master.clone();
                let w = tokio::task::spawn_blocking(move || {
                    use std::io::Write;
                    (&*m).write_all(&b)
                })
                .await;
                if !matches!(w, Ok(Ok(()))) {
                    return;
                }
            }
            Some(sp::stream_input::Kind::Resize(r)) => {
                let (w, h) = (r.width.min(u16::MAX as u32), r.height.min(u16::MAX as u32));
                if let Err(e) = crate::console::resize(&*master, w as u16, h as u16) {
                    debug!(error = %e, "resizing a terminal");
                }
            }
            _ => {}
        }
    }
}

/// Joins a container's own stdio: its output (as logged) from now on, stdin (and
/// resizes) to it, and its exit status when it ends.
pub async fn attach(
    containers: Arc<Containers>,
    start: sp::StreamStart,
    input: tonic::Streaming<sp::StreamInput>,
    tx: Out,
) {
    let c = match containers.get(&start.container_id) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(e.into())).await;
            return;
        }
    };
    let mut rx = c.output.subscribe();
    if c.status().state != sp::ContainerState::Running as i32 {
        let _ = tx
            .send(Err(Status::failed_precondition(format!(
                "container {} is not running",
                c.id
            ))))
            .await;
        return;
    }
    if start.stdin {
        match &c.tty {
            Some(master) => {
                tokio::spawn(feed_terminal(master.clone(), input));
            }
            None => {
                let fd = c
                    .stdin
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .and_then(|f| f.try_clone().ok());
                let ctr = c.clone();
                tokio::spawn(async move {
                    let mut input = input;
                    let mut w = fd.and_then(|f| pipe::Sender::from_owned_fd(f).ok());
                    while let Ok(Some(m)) = input.message().await {
                        match m.kind {
                            Some(sp::stream_input::Kind::Stdin(b)) => {
                                if let Some(s) = w.as_mut() {
                                    if s.write_all(&b).await.is_err() {
                                        w = None;
                                    }
                                }
                            }
                            Some(sp::stream_input::Kind::StdinClose(_)) => {
                                w = None;
                                if ctr.stdin_once {
                                    // The container sees EOF once no end is left open.
                                    ctr.stdin.lock().unwrap_or_else(|p| p.into_inner()).take();
                                }
                            }
                            _ => {}
                        }
                    }
                });
            }
        }
    }
    let exited = c.wait();
    tokio::pin!(exited);
    let wanted = |chunk: &crate::containers::OutChunk| {
        if chunk.stderr {
            start.stderr
        } else {
            start.stdout
        }
    };
    let send = |chunk: crate::containers::OutChunk| {
        let data = chunk.data.to_vec();
        out(if chunk.stderr {
            sp::stream_output::Kind::Stderr(data)
        } else {
            sp::stream_output::Kind::Stdout(data)
        })
    };
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Ok(chunk) => {
                    if wanted(&chunk) && tx.send(send(chunk)).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    debug!(container = %c.id, missed = n, "attach fell behind the output");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            status = &mut exited => {
                // The pumps finished before the exit was recorded: what is queued is all.
                while let Ok(chunk) = rx.try_recv() {
                    if wanted(&chunk) && tx.send(send(chunk)).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(out(sp::stream_output::Kind::Exit(status))).await;
                return;
            }
            _ = tx.closed() => return,
        }
    }
}

/// Starts a process on a blocking thread; a failure goes to the client's stream.
async fn spawn_reporting<T: Send + 'static>(
    tx: &Out,
    f: impl FnOnce() -> Result<T, crate::containers::CtrError> + Send + 'static,
) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            let _ = tx.send(Err(e.into())).await;
            None
        }
        Err(e) => {
            let _ = tx
                .send(Err(Status::internal(format!("worker thread: {e}"))))
                .await;
            None
        }
    }
}

/// Waits for an exec'd process on a blocking thread.
async fn wait_exit(pid: i32) -> isola_container::runner::Exit {
    tokio::task::spawn_blocking(move || crate::forker::wait(pid))
        .await
        .unwrap_or(isola_container::runner::Exit {
            code: 255,
            signal: None,
        })
}
