//! The streaming calls of the shim API: Exec (a new process in a container, its stdio
//! carried on the call) and PortForward (a TCP connection made inside the pod's network
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
        let _ = tx
            .send(Err(Status::unimplemented(
                "exec with a TTY is not supported by the native shim yet",
            )))
            .await;
        return;
    }
    let id = start.container_id.clone();
    let c2 = containers.clone();
    let spawned = tokio::task::spawn_blocking(move || {
        c2.spawn_exec(&start.container_id, start.cmd, start.stdin)
    })
    .await;
    let p = match spawned {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            let _ = tx.send(Err(e.into())).await;
            return;
        }
        Err(e) => {
            let _ = tx
                .send(Err(Status::internal(format!("worker thread: {e}"))))
                .await;
            return;
        }
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
    let exit = tokio::task::spawn_blocking(move || isola_container::runner::wait(pid))
        .await
        .unwrap_or(isola_container::runner::Exit {
            code: 255,
            signal: None,
        });
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
